//! Delegated IPAM (I/O): find `ipam.type` in `CNI_PATH` and exec it with the same `CNI_*`
//! environment (only `CNI_COMMAND` changed where a rollback needs DEL) and the same stdin,
//! as the CNI spec's delegation rules say.
//!
//! Version negotiation: plugins lag behind the spec (Debian bookworm's host-local speaks up to
//! 1.0.0 and answers a 1.1.0 config with error 1). So before the first delegated call the plugin
//! is asked `VERSION`; if it does not support the config's version, it gets the config with
//! `cniVersion` lowered to the newest version both support ([`negotiate`], [`lower_config`]),
//! and its result is read as that version and converted up into the internal form (as
//! sriov-cni does with libcni's `NewResultFromResult`), then written out in the config's version
//! with the rest of the ADD result. A plugin whose `VERSION` fails or cannot be read is
//! delegated to as-is. STATUS and GC (1.1 only) are not delegated to a plugin that does not
//! support 1.1.0.
//!
//! A plugin that fails and prints a CNI error is passed through with its own code and details;
//! any other failure (no error JSON, a crash, no answer within `timeoutSeconds`, a result that
//! does not decode) is code 105.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use tracing::debug;
use vfplug_api::CniCode;

use crate::env::{self, CniEnv, Command};
use crate::error::CniError;
use crate::result::{CniResult, DelegateError};
use crate::version::CniVersion;

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
    /// The config's version (what results are written in).
    pub version: CniVersion,
    /// What the plugin is sent, once negotiated (at most one `VERSION` per shim run).
    negotiated: OnceCell<Negotiated>,
}

/// What a delegated plugin is sent after version negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The version it gets; `None` when its `VERSION` failed or named no version we can convert
    /// to (then the config goes as-is and the plugin judges it).
    pub version: Option<CniVersion>,
    /// The config it gets on stdin (ours, unless the version was lowered).
    pub stdin: Vec<u8>,
}

/// A `VERSION` answer (only the list matters).
#[derive(Debug, Deserialize)]
struct PluginVersions {
    #[serde(rename = "supportedVersions")]
    supported_versions: Vec<String>,
}

/// How a run failed: a timeout is told apart, because negotiation must not fall back (and so
/// double the wait) when the plugin hangs.
enum ExecFailure {
    TimedOut(CniError),
    Other(CniError),
}

impl ExecFailure {
    fn into_error(self) -> CniError {
        match self {
            Self::TimedOut(e) | Self::Other(e) => e,
        }
    }
}

/// The newest version we support that is `<= ours` and in the plugin's `supported` list.
pub fn negotiate(ours: CniVersion, supported: &[String]) -> Option<CniVersion> {
    CniVersion::ALL
        .into_iter()
        .rev()
        .filter(|v| *v <= ours)
        .find(|v| supported.iter().any(|s| s == v.as_str()))
}

/// `stdin` (a JSON object of version `from`) with `cniVersion` set to `to`, and a `prevResult`
/// that decodes written in `to` too (libcni decodes `prevResult` as the config's version). Keys
/// other than those two are passed unchanged (their order may change). Fails when the
/// `prevResult` cannot be written in `to` (0.2.0 and no address).
pub fn lower_config(stdin: &[u8], from: CniVersion, to: CniVersion) -> Result<Vec<u8>, String> {
    let mut v: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| e.to_string())?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "the config is not a JSON object".to_owned())?;
    obj.insert("cniVersion".into(), to.as_str().into());
    if let Some(prev) = obj.get_mut("prevResult")
        && let Ok(r) = CniResult::decode(prev.clone(), from, "prevResult")
    {
        let lowered = r.to_version(to)?;
        *prev = serde_json::to_value(lowered).map_err(|e| e.to_string())?;
    }
    serde_json::to_vec(&v).map_err(|e| e.to_string())
}

impl Delegate<'_> {
    /// What the plugin is sent: asks its `VERSION` once (not for 0.1.0, the oldest version: there
    /// is nothing to lower to). A timeout is an error (code 105); any other failure delegates
    /// as-is.
    pub async fn negotiated(&self) -> Result<&Negotiated, CniError> {
        self.negotiated
            .get_or_try_init(|| async {
                let as_is = |version| Negotiated {
                    version,
                    stdin: self.stdin.to_vec(),
                };
                if self.version == CniVersion::OLDEST {
                    return Ok(as_is(Some(self.version)));
                }
                let probe = format!(r#"{{"cniVersion":"{}"}}"#, self.version);
                let out = match self.exec_raw(Command::Version, probe.as_bytes()).await {
                    Ok(out) => out,
                    Err(ExecFailure::TimedOut(e)) => return Err(e),
                    Err(ExecFailure::Other(e)) => {
                        debug!(plugin = %self.name, "VERSION failed, delegating as-is: {}", e.msg);
                        return Ok(as_is(None));
                    }
                };
                let supported = match serde_json::from_slice::<PluginVersions>(&out) {
                    Ok(p) => p.supported_versions,
                    Err(e) => {
                        debug!(plugin = %self.name, "VERSION answer unreadable ({e}), delegating as-is");
                        return Ok(as_is(None));
                    }
                };
                match negotiate(self.version, &supported) {
                    Some(v) if v == self.version => Ok(as_is(Some(v))),
                    Some(v) => match lower_config(self.stdin, self.version, v) {
                        Ok(stdin) => {
                            debug!(plugin = %self.name, from = %self.version, to = %v, "delegating with a lowered cniVersion");
                            Ok(Negotiated { version: Some(v), stdin })
                        }
                        Err(e) => {
                            debug!(plugin = %self.name, "cannot lower the config ({e}), delegating as-is");
                            Ok(as_is(None))
                        }
                    },
                    None => {
                        debug!(plugin = %self.name, ?supported, "no common version, delegating as-is");
                        Ok(as_is(None))
                    }
                }
            })
            .await
    }

    /// Runs the plugin with `CNI_COMMAND=command` and the negotiated config; its stdout on
    /// success.
    pub async fn exec(&self, command: Command) -> Result<Vec<u8>, CniError> {
        let n = self.negotiated().await?;
        self.exec_raw(command, &n.stdin)
            .await
            .map_err(ExecFailure::into_error)
    }

    /// Runs the plugin with `CNI_COMMAND=command` and `input` on stdin.
    async fn exec_raw(&self, command: Command, input: &[u8]) -> Result<Vec<u8>, ExecFailure> {
        let name = &self.name;
        let fail = |msg: String| ExecFailure::Other(CniError::new(CniCode::Ipam, msg));
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
                return Err(ExecFailure::TimedOut(CniError::new(
                    CniCode::Ipam,
                    format!(
                        "ipam plugin {name:?} did not finish {command} within {:?}",
                        self.timeout
                    ),
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
            return Err(ExecFailure::Other(CniError::raw(
                d.code,
                format!("ipam plugin {name:?}: {}", d.msg),
                d.details,
            )));
        }
        Err(ExecFailure::Other(
            CniError::new(
                CniCode::Ipam,
                format!("ipam plugin {name:?} failed {command} ({status})"),
            )
            .with_details(
                String::from_utf8_lossy(&out)
                    .trim()
                    .chars()
                    .take(2000)
                    .collect::<String>(),
            ),
        ))
    }

    /// ADD: the addresses, routes and DNS the plugin allocated, in the internal form (read as
    /// the version it was sent; libcni's `ExecPluginWithResult`).
    pub async fn add(&self) -> Result<CniResult, CniError> {
        let out = self.exec(Command::Add).await?;
        let sent = self.negotiated().await?.version.unwrap_or(self.version);
        CniResult::decode_slice(&out, sent, "").map_err(|e| {
            CniError::new(
                CniCode::Ipam,
                format!(
                    "ipam plugin {:?} printed a result that does not decode: {e}",
                    self.name
                ),
            )
        })
    }

    /// DEL, CHECK, STATUS or GC: success or the plugin's error. STATUS and GC are skipped
    /// (success) for a plugin that does not support 1.1.0, where they do not exist.
    pub async fn run(&self, command: Command) -> Result<(), CniError> {
        if matches!(command, Command::Status | Command::Gc)
            && let Some(v) = self.negotiated().await?.version
            && v < CniVersion::V1_1_0
        {
            debug!(plugin = %self.name, version = %v, "not delegating {command}: the plugin does not support 1.1.0");
            return Ok(());
        }
        self.exec(command).await.map(|_| ())
    }
}

/// The delegate for the run's `ipam`, if any; `version` is the config's.
pub fn delegate<'a>(
    ipam: Option<&crate::config::IpamConf>,
    env: &'a CniEnv,
    stdin: &'a [u8],
    timeout: Duration,
    version: CniVersion,
) -> Result<Option<Delegate<'a>>, CniError> {
    let Some(i) = ipam else { return Ok(None) };
    let plugin = find_plugin(&i.plugin_type, &env.path)?;
    Ok(Some(Delegate {
        plugin,
        name: i.plugin_type.clone(),
        env,
        stdin,
        timeout,
        version,
        negotiated: OnceCell::new(),
    }))
}

/// Whether `p` is a regular file (after symlinks) with an execute bit.
fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn negotiate_picks_the_newest_common_version_not_above_ours() {
        let bookworm = list(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        assert_eq!(
            negotiate(CniVersion::V1_1_0, &bookworm),
            Some(CniVersion::V1_0_0)
        );
        assert_eq!(
            negotiate(CniVersion::V1_0_0, &bookworm),
            Some(CniVersion::V1_0_0)
        );
        let newer = list(&["1.0.0", "1.1.0", "1.2.0"]);
        assert_eq!(
            negotiate(CniVersion::V1_1_0, &newer),
            Some(CniVersion::V1_1_0)
        );
        assert_eq!(
            negotiate(CniVersion::V1_0_0, &newer),
            Some(CniVersion::V1_0_0)
        );
        assert_eq!(
            negotiate(CniVersion::V1_1_0, &list(&["0.4.0"])),
            Some(CniVersion::V0_4_0)
        );
        assert_eq!(
            negotiate(CniVersion::V1_1_0, &list(&["0.3.1"])),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(
            negotiate(CniVersion::V0_3_1, &list(&["0.1.0", "0.2.0"])),
            Some(CniVersion::V0_2_0)
        );
        assert_eq!(negotiate(CniVersion::V0_2_0, &list(&["0.3.1"])), None);
        assert_eq!(negotiate(CniVersion::V0_4_0, &list(&["1.0.0"])), None);
        assert_eq!(negotiate(CniVersion::V1_1_0, &[]), None);
    }

    #[test]
    fn lower_config_rewrites_the_version_and_prev_result_only() {
        let conf = br#"{"cniVersion":"1.1.0","name":"n","type":"vfplug",
            "ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.0.0/24"}]]},
            "prevResult":{"cniVersion":"1.1.0",
              "interfaces":[{"name":"net1","mtu":1500,"pciID":"0000:3b:02.1","sandbox":"/n"}],
              "ips":[{"address":"10.0.0.2/24","interface":0}],
              "routes":[{"dst":"0.0.0.0/0","table":100}]}}"#;
        let out: serde_json::Value = serde_json::from_slice(
            &lower_config(conf, CniVersion::V1_1_0, CniVersion::V1_0_0).unwrap(),
        )
        .unwrap();
        let orig: serde_json::Value = serde_json::from_slice(conf).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["ipam"], orig["ipam"]);
        assert_eq!(out["name"], "n");
        assert_eq!(
            out["prevResult"],
            serde_json::json!({"cniVersion": "1.0.0",
                "interfaces": [{"name": "net1", "sandbox": "/n"}],
                "ips": [{"address": "10.0.0.2/24", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}]})
        );
        let out: serde_json::Value = serde_json::from_slice(
            &lower_config(conf, CniVersion::V1_1_0, CniVersion::V0_4_0).unwrap(),
        )
        .unwrap();
        assert_eq!(out["prevResult"]["ips"][0]["version"], "4");
        // Down to 0.2.0: libcni's ip4/ip6 form; without an address it cannot be written.
        let out: serde_json::Value = serde_json::from_slice(
            &lower_config(conf, CniVersion::V1_1_0, CniVersion::V0_2_0).unwrap(),
        )
        .unwrap();
        assert_eq!(
            out["prevResult"],
            serde_json::json!({"cniVersion": "0.2.0",
                "ip4": {"ip": "10.0.0.2/24", "routes": [{"dst": "0.0.0.0/0"}]}, "dns": {}})
        );
        let no_ip = br#"{"cniVersion":"0.3.1","prevResult":{"interfaces":[{"name":"a"}]}}"#;
        assert!(lower_config(no_ip, CniVersion::V0_3_1, CniVersion::V0_2_0).is_err());
        assert!(lower_config(b"[1]", CniVersion::V1_1_0, CniVersion::V1_0_0).is_err());
        assert!(lower_config(b"{", CniVersion::V1_1_0, CniVersion::V1_0_0).is_err());
    }
}
