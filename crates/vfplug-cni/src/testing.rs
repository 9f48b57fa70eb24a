//! Test helpers (cargo feature `testing`), for this crate's tests and for suites that drive the
//! real `vfplug` binary:
//!
//! - [`FakeNode`]: a node API server (`vfplug.v1.Node`) over real gRPC on a unix socket, on its
//!   own thread, that records every request and answers as scripted ([`Script`]);
//! - [`Plugin`]: execs the binary with an exact environment and stdin, with a time limit, and
//!   returns exit code, stdout and stderr ([`PluginRun`]);
//! - [`FakeIpam`]: writes a shell script that plays a delegated IPAM plugin and records what it
//!   was called with.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vfplug_api::CniCode;
use vfplug_api::v1::{self, node_server};

/// One request the fake node received.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `Add`.
    Add(v1::AddRequest),
    /// `Del`.
    Del(v1::DelRequest),
    /// `Check`.
    Check(v1::CheckRequest),
    /// `Status`.
    Status(v1::StatusRequest),
    /// `Gc`.
    Gc(v1::GcRequest),
    /// `List`.
    List,
}

/// A scripted failure: the CNI code, message and details vfplugd would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// CNI code.
    pub code: CniCode,
    /// Message.
    pub msg: String,
    /// Details.
    pub details: String,
}

impl Failure {
    /// A failure with `code` and `msg`.
    pub fn new(code: CniCode, msg: &str) -> Self {
        Self {
            code,
            msg: msg.to_owned(),
            details: format!("details of {msg}"),
        }
    }

    fn status(&self) -> Status {
        vfplug_api::status(self.code, self.msg.clone(), self.details.clone())
    }
}

/// How the fake node answers. `None` answers are derived from the request (see
/// [`FakeNode::add_response_for`]).
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// `Add`: fail, or a fixed answer.
    pub add: Option<Result<v1::AddResponse, Failure>>,
    /// `Del`: fail, or a fixed answer.
    pub del: Option<Result<v1::DelResponse, Failure>>,
    /// `Check`: fail.
    pub check: Option<Failure>,
    /// `Status`: fail, or a fixed answer (default: ready, 4 free).
    pub status: Option<Result<v1::StatusResponse, Failure>>,
    /// `Gc`: fail, or a fixed answer.
    pub gc: Option<Result<v1::GcResponse, Failure>>,
    /// Wait this long before answering any call (to test time limits).
    pub delay: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    script: Script,
}

#[derive(Debug, Clone)]
struct Svc(Arc<Mutex<State>>);

impl Svc {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn record(&self, call: Call) -> Script {
        let script = {
            let mut s = self.lock();
            s.calls.push(call);
            s.script.clone()
        };
        if let Some(d) = script.delay {
            tokio::time::sleep(d).await;
        }
        script
    }
}

#[tonic::async_trait]
impl node_server::Node for Svc {
    async fn add(&self, r: Request<v1::AddRequest>) -> Result<Response<v1::AddResponse>, Status> {
        let req = r.into_inner();
        match self.record(Call::Add(req.clone())).await.add {
            Some(Ok(resp)) => Ok(Response::new(resp)),
            Some(Err(f)) => Err(f.status()),
            None => Ok(Response::new(FakeNode::add_response_for(&req))),
        }
    }

    async fn del(&self, r: Request<v1::DelRequest>) -> Result<Response<v1::DelResponse>, Status> {
        let req = r.into_inner();
        match self.record(Call::Del(req.clone())).await.del {
            Some(Ok(resp)) => Ok(Response::new(resp)),
            Some(Err(f)) => Err(f.status()),
            None => Ok(Response::new(v1::DelResponse {
                released: !req.device_id.is_empty(),
                pci_address: req.device_id,
                note: "fake".into(),
                warnings: vec![],
            })),
        }
    }

    async fn check(
        &self,
        r: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckResponse>, Status> {
        let req = r.into_inner();
        match self.record(Call::Check(req.clone())).await.check {
            Some(f) => Err(f.status()),
            None => Ok(Response::new(v1::CheckResponse {
                pci_address: req.device_id,
            })),
        }
    }

    async fn status(
        &self,
        r: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        match self.record(Call::Status(r.into_inner())).await.status {
            Some(Ok(resp)) => Ok(Response::new(resp)),
            Some(Err(f)) => Err(f.status()),
            None => Ok(Response::new(v1::StatusResponse {
                ready: true,
                reason: String::new(),
                free: 4,
            })),
        }
    }

    async fn gc(&self, r: Request<v1::GcRequest>) -> Result<Response<v1::GcResponse>, Status> {
        match self.record(Call::Gc(r.into_inner())).await.gc {
            Some(Ok(resp)) => Ok(Response::new(resp)),
            Some(Err(f)) => Err(f.status()),
            None => Ok(Response::new(v1::GcResponse::default())),
        }
    }

    async fn list(
        &self,
        _r: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        self.record(Call::List).await;
        Ok(Response::new(v1::ListResponse::default()))
    }

    /// The CNI shim never asks this (an operator call); refused so a test that reaches it fails.
    async fn unquarantine(
        &self,
        _r: Request<v1::UnquarantineRequest>,
    ) -> Result<Response<v1::UnquarantineResponse>, Status> {
        Err(Status::unimplemented(
            "the CNI shim has no business clearing quarantines",
        ))
    }

    /// The CNI shim never asks for VM records (the controller and operators do); refused so a
    /// test that reaches it fails.
    async fn vm_records(
        &self,
        _r: Request<v1::VmRecordsRequest>,
    ) -> Result<Response<v1::VmRecordsResponse>, Status> {
        Err(Status::unimplemented(
            "the CNI shim has no business reading VM records",
        ))
    }

    /// The fake never remembers an earlier ADD: every ADD is a first one. Not recorded, so the
    /// call lists tests inspect are those that act.
    async fn lookup(
        &self,
        _r: Request<v1::AddRequest>,
    ) -> Result<Response<v1::AddResponse>, Status> {
        Err(vfplug_api::status(
            vfplug_api::CniCode::UnknownContainer,
            "no completed ADD of this attachment (fake node)",
            "",
        ))
    }
}

/// A node API server on `<dir>/vfplugd.sock`, serving until dropped.
#[derive(Debug)]
pub struct FakeNode {
    /// The socket path (put it in the config's `socket`).
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeNode {
    /// Starts serving on `<dir>/vfplugd.sock`; returns once the socket accepts connections.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let socket = dir.join("vfplugd.sock");
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let svc = Svc(state.clone());
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::bind(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let _ = tonic::transport::Server::builder()
                    .add_service(node_server::NodeServer::new(svc))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("fake node thread ended before binding"))??;
        Ok(Self {
            socket,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the script.
    pub fn set_script(&self, script: Script) {
        self.lock().script = script;
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The default `Add` answer: the requested device (or `0000:3b:02.1` from the pool), netdev
    /// mode, the requested MAC (or `02:00:00:00:00:01`), MTU 1500, in the requested netns.
    pub fn add_response_for(req: &v1::AddRequest) -> v1::AddResponse {
        let att = req.attachment.clone().unwrap_or_default();
        v1::AddResponse {
            pci_address: if req.device_id.is_empty() {
                "0000:3b:02.1".into()
            } else {
                req.device_id.clone()
            },
            pf_pci_address: "0000:3b:00.0".into(),
            mode: "netdev".into(),
            ifname: att.ifname,
            mac: req
                .config
                .as_ref()
                .and_then(|c| c.mac.clone())
                .unwrap_or_else(|| "02:00:00:00:00:01".into()),
            mtu: 1500,
            sandbox: req.netns.clone(),
            existing: false,
            attach_pending: false,
            warnings: vec![],
            token: 7,
            ipam_result: req.ipam_result.clone(),
            pool: if req.pool.is_empty() {
                "sriov_a".into()
            } else {
                req.pool.clone()
            },
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one run of the plugin did.
#[derive(Debug, Clone)]
pub struct PluginRun {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl PluginRun {
    /// Stdout as JSON. Panics (with stdout and stderr in the message) if it is not exactly one
    /// JSON value: the protocol allows nothing else there.
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!(
                "stdout is not one JSON value ({e}):\n--- stdout\n{}\n--- stderr\n{}",
                self.stdout, self.stderr
            ),
        }
    }

    /// The CNI error code printed, checking the protocol: non-zero exit, one JSON error object
    /// on stdout with `cniVersion`, `code` and `msg`.
    pub fn error_code(&self) -> u64 {
        assert_ne!(
            self.code,
            Some(0),
            "expected a failure; stderr:\n{}",
            self.stderr
        );
        let v = self.json();
        assert!(v["cniVersion"].is_string(), "no cniVersion in {v}");
        assert!(v["msg"].is_string(), "no msg in {v}");
        match v["code"].as_u64() {
            Some(c) => c,
            None => panic!("no code in {v}"),
        }
    }

    /// The error's `msg`.
    pub fn error_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_owned()
    }
}

/// The plugin binary and how to run it.
#[derive(Debug, Clone)]
pub struct Plugin {
    /// The executable.
    pub bin: PathBuf,
    /// Longest a run may take before it is killed (and the helper panics).
    pub limit: Duration,
}

impl Plugin {
    /// The binary at `bin` (e.g. `env!("CARGO_BIN_EXE_vfplug")`).
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            limit: Duration::from_secs(60),
        }
    }

    /// Runs it with exactly `env` (plus `PATH`, for the shell of fake IPAM scripts) and `stdin`.
    pub fn run(&self, env: &[(&str, &str)], stdin: &[u8]) -> std::io::Result<PluginRun> {
        let mut cmd = Proc::new(&self.bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        let mut sin = child.stdin.take();
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            if let Some(s) = sin.as_mut() {
                let _ = s.write_all(&input);
            }
        });
        let mut sout = child.stdout.take();
        let mut serr = child.stderr.take();
        let out_t = std::thread::spawn(move || read_all(sout.as_mut()));
        let err_t = std::thread::spawn(move || read_all(serr.as_mut()));
        // Waited for on a thread, so the exit is seen at once (polling would blur the timings
        // the benchmark takes); the time limit kills it by pid.
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let r = child.wait();
            let _ = tx.send((r, Instant::now()));
        });
        let (status, end) = match rx.recv_timeout(self.limit) {
            Ok((r, end)) => (r?, end),
            Err(_) => {
                let _ = Proc::new("kill").args(["-9", &pid.to_string()]).status();
                let _ = waiter.join();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("plugin ran longer than {:?}", self.limit),
                ));
            }
        };
        let _ = waiter.join();
        let elapsed = end.duration_since(start);
        let _ = writer.join();
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        Ok(PluginRun {
            code: status.code(),
            stdout,
            stderr,
            elapsed,
        })
    }
}

fn read_all<R: Read>(r: Option<&mut R>) -> String {
    let mut buf = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One call a [`FakeIpam`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamCall {
    /// Its `CNI_*` environment.
    pub env: HashMap<String, String>,
    /// Its stdin.
    pub stdin: String,
}

/// A shell script in a directory (use the directory as `CNI_PATH`) that plays an IPAM plugin:
/// answers `VERSION` with the versions it supports, rejects a config of any other version with
/// code 1 (as libcni's skeleton does), prints `add_result` on ADD, fails as told, and records
/// every call (`VERSION` included).
#[derive(Debug, Clone)]
pub struct FakeIpam {
    /// The directory holding the script and its records.
    pub dir: PathBuf,
    /// The script's name (the config's `ipam.type`).
    pub name: String,
}

impl FakeIpam {
    /// Writes the script `dir/name`, supporting every version vfplug does. On ADD it prints
    /// `add_result`; for a command in `fail` it prints the given stdout and exits with the given
    /// status instead.
    pub fn create(
        dir: &Path,
        name: &str,
        add_result: &str,
        fail: &[(&str, &str, i32)],
    ) -> std::io::Result<Self> {
        let all: Vec<&str> = crate::CniVersion::ALL.iter().map(|v| v.as_str()).collect();
        Self::create_with_versions(dir, name, add_result, fail, &all)
    }

    /// As [`FakeIpam::create`], supporting only `versions` (e.g. `["0.4.0", "1.0.0"]`, like
    /// Debian bookworm's host-local). The config's version is the first `"cniVersion"` on
    /// stdin (the top-level one in the shim's compact, key-sorted JSON).
    pub fn create_with_versions(
        dir: &Path,
        name: &str,
        add_result: &str,
        fail: &[(&str, &str, i32)],
        versions: &[&str],
    ) -> std::io::Result<Self> {
        let rec = dir.join(format!("{name}.calls"));
        std::fs::create_dir_all(&rec)?;
        let mut cases = String::new();
        for (cmd, out, status) in fail {
            cases.push_str(&format!(
                "  {cmd}) printf '%s' {} ; exit {status} ;;\n",
                shell_quote(out)
            ));
        }
        let list = versions
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(",");
        let version_answer = format!(
            r#"{{"cniVersion":"{}","supportedVersions":[{list}]}}"#,
            versions.last().copied().unwrap_or("1.1.0")
        );
        let accepted = versions
            .iter()
            .map(|v| shell_quote(v))
            .collect::<Vec<_>>()
            .join("|");
        let script = format!(
            r#"#!/bin/sh
# Fake IPAM plugin written by vfplug-cni's tests: records the call, answers as scripted.
n=$(ls {rec} | wc -l)
f={rec}/$(printf '%04d' "$n")
env | grep '^CNI_' > "$f.env"
cat > "$f.stdin"
case "$CNI_COMMAND" in
{cases}  VERSION) printf '%s' {version_answer}; exit 0 ;;
esac
v=$(grep -o '"cniVersion" *: *"[^"]*"' "$f.stdin" | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/')
case "$v" in
  {accepted}) ;;
  *) printf '{{"code":1,"msg":"incompatible CNI versions","details":"config is %s"}}' "$v"; exit 1 ;;
esac
[ "$CNI_COMMAND" = ADD ] && printf '%s' {result}
exit 0
"#,
            rec = shell_quote(&rec.display().to_string()),
            result = shell_quote(add_result),
            version_answer = shell_quote(&version_answer),
            accepted = if accepted.is_empty() {
                "''".to_owned()
            } else {
                accepted
            },
        );
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        })
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> std::io::Result<Vec<IpamCall>> {
        let rec = self.dir.join(format!("{}.calls", self.name));
        let mut names: Vec<String> = std::fs::read_dir(&rec)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".env").map(str::to_owned))
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let env = std::fs::read_to_string(rec.join(format!("{n}.env")))?
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let stdin = std::fs::read_to_string(rec.join(format!("{n}.stdin")))?;
                Ok(IpamCall { env, stdin })
            })
            .collect()
    }

    /// The `CNI_COMMAND` of each call so far.
    pub fn commands(&self) -> std::io::Result<Vec<String>> {
        Ok(self
            .calls()?
            .into_iter()
            .map(|c| c.env.get("CNI_COMMAND").cloned().unwrap_or_default())
            .collect())
    }
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A scratch directory for a test (removed when dropped).
pub fn tempdir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("vfplug-cni-").tempdir()
}
