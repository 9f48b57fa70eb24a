//! Delegated IPAM (I/O): find `ipam.type` in `CNI_PATH` and exec it with the same `CNI_*`
//! environment (only `CNI_COMMAND` changed where a rollback needs DEL) and the same stdin,
//! as the CNI spec's delegation rules say.
//!
//! A plugin that fails and prints a CNI error is passed through with its own code and details;
//! any other failure (no error JSON, a crash, no answer within `timeoutSeconds`, a result that
//! does not decode) is code 105.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vfplug_api::CniCode;

use crate::env::{self, CniEnv, Command};
use crate::error::CniError;
use crate::result::{CniResult, DelegateError};

/// errno "text file busy" (Linux).
const ETXTBSY: i32 = 26;

/// The most a delegated plugin may print on stdout.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The first regular, executable file named `name` in `dirs`.
pub fn find_plugin(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, CniError> {
    for d in dirs {
        let p = d.join(name);
        if is_executable_file(&p) {
            return Ok(p);
        }
    }
    Err(CniError::config(format!(
        "ipam plugin {name:?} not found in CNI_PATH ({})",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    )))
}

/// A delegated plugin, ready to run.
#[derive(Debug, Clone)]
pub struct Delegate<'a> {
    /// Its executable.
    pub plugin: PathBuf,
    /// Its name (`ipam.type`) for messages.
    pub name: String,
    /// The environment to pass on.
    pub env: &'a CniEnv,
    /// The config to pass on.
    pub stdin: &'a [u8],
    /// How long one run may take.
    pub timeout: Duration,
}

impl Delegate<'_> {
    /// Runs the plugin with `CNI_COMMAND=command`; its stdout on success.
    pub async fn exec(&self, command: Command) -> Result<Vec<u8>, CniError> {
        let name = &self.name;
        let fail = |msg: String| CniError::new(CniCode::Ipam, msg);
        let e = self.env;
        let mut cmd = tokio::process::Command::new(&self.plugin);
        cmd.env(env::COMMAND, command.as_str())
            .env(env::CONTAINERID, &e.container_id)
            .env(env::NETNS, &e.netns)
            .env(env::IFNAME, &e.ifname)
            .env(env::ARGS, &e.args_raw)
            .env(env::PATH, &e.path_raw)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Its log lines go where the runtime reads ours.
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut attempt = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                // A plugin binary being replaced right now ("text file busy"): libcni retries
                // the same way.
                Err(err) if err.raw_os_error() == Some(ETXTBSY) && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => {
                    return Err(fail(format!(
                        "ipam plugin {name:?} ({}) could not be started: {err}",
                        self.plugin.display()
                    )));
                }
            }
        };
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let input = self.stdin;
        let run = async {
            // Feed stdin and drain stdout at once, so neither side can block the other.
            let write = async {
                if let Some(mut s) = stdin.take() {
                    // A plugin that exits without reading its stdin is judged by its exit status.
                    let _ = s.write_all(input).await;
                }
            };
            let read = async {
                let mut buf = Vec::new();
                if let Some(s) = stdout.take() {
                    let mut limited = s.take(MAX_OUTPUT_BYTES as u64 + 1);
                    limited.read_to_end(&mut buf).await?;
                }
                Ok::<_, std::io::Error>(buf)
            };
            let ((), out) = tokio::join!(write, read);
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out?))
        };
        let (status, out) = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(r)) => r,
            Ok(Err(err)) => return Err(fail(format!("ipam plugin {name:?}: {err}"))),
            Err(_) => {
                return Err(fail(format!(
                    "ipam plugin {name:?} did not finish {command} within {:?}",
                    self.timeout
                )));
            }
        };
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(fail(format!(
                "ipam plugin {name:?} printed more than {MAX_OUTPUT_BYTES} bytes"
            )));
        }
        if status.success() {
            return Ok(out);
        }
        if let Ok(d) = serde_json::from_slice::<DelegateError>(&out)
            && d.code != 0
        {
            return Err(CniError::raw(
                d.code,
                format!("ipam plugin {name:?}: {}", d.msg),
                d.details,
            ));
        }
        Err(
            fail(format!("ipam plugin {name:?} failed {command} ({status})")).with_details(
                String::from_utf8_lossy(&out)
                    .trim()
                    .chars()
                    .take(2000)
                    .collect::<String>(),
            ),
        )
    }

    /// ADD: the addresses, routes and DNS the plugin allocated.
    pub async fn add(&self) -> Result<CniResult, CniError> {
        let out = self.exec(Command::Add).await?;
        CniResult::from_slice(&out, "").map_err(|e| {
            CniError::new(
                CniCode::Ipam,
                format!(
                    "ipam plugin {:?} printed a result that does not decode: {e}",
                    self.name
                ),
            )
        })
    }

    /// DEL, CHECK, STATUS or GC: success or the plugin's error.
    pub async fn run(&self, command: Command) -> Result<(), CniError> {
        self.exec(command).await.map(|_| ())
    }
}

/// The delegate for the run's `ipam`, if any.
pub fn delegate<'a>(
    ipam: Option<&crate::config::IpamConf>,
    env: &'a CniEnv,
    stdin: &'a [u8],
    timeout: Duration,
) -> Result<Option<Delegate<'a>>, CniError> {
    let Some(i) = ipam else { return Ok(None) };
    let plugin = find_plugin(&i.plugin_type, &env.path)?;
    Ok(Some(Delegate {
        plugin,
        name: i.plugin_type.clone(),
        env,
        stdin,
        timeout,
    }))
}

/// Whether `p` is a regular file (after symlinks) with an execute bit.
fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
