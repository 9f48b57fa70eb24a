//! Foreign gRPC clients for tests (cargo feature `testing`): Python's grpcio, driven over a real
//! unix socket with a chosen `:authority`, to prove every vfplugd socket serves clients other
//! than tonic's own. The client script is `tests/foreign/grpc_client.py`; it generates its stubs
//! from the repository's `proto/` when it runs.
//!
//! A missing interpreter or grpcio is a loud SKIP, or a failure when `VFPLUG_REQUIRE=1` (CI).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The `:authority` a client sends: the raw socket path, the path percent-encoded,
/// `localhost`, or grpcio's default.
pub const AUTHORITY_MODES: [&str; 4] = ["path", "percent", "localhost", "default"];

const SCRIPT: &str = include_str!("../tests/foreign/grpc_client.py");

/// Which service the client calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `v1beta1.DevicePlugin`: GetDevicePluginOptions, the first ListAndWatch message,
    /// GetPreferredAllocation, Allocate.
    DevicePlugin,
    /// `vfplug.v1.Node`: List, Status, VmRecords (every VM's records, phases by enum name).
    Node,
}

/// A Python interpreter that has grpcio and grpc_tools (Debian: `python3-grpcio`,
/// `python3-grpc-tools`), plus the script written where it can run.
#[derive(Debug)]
pub struct PythonGrpc {
    python: PathBuf,
    script: PathBuf,
}

fn required() -> bool {
    std::env::var("VFPLUG_REQUIRE").is_ok_and(|v| v == "1")
}

impl PythonGrpc {
    /// Finds the interpreter: `$VFPLUG_PYTHON` when set, else `/usr/bin/python3`, then `python3`
    /// on `PATH`.
    /// `None` after printing a SKIP line when there is none; panics instead under
    /// `VFPLUG_REQUIRE=1`.
    pub fn find(test: &str) -> Option<Self> {
        // An explicit choice is the only candidate, so a wrong one is not silently replaced.
        let candidates: Vec<PathBuf> = match std::env::var_os("VFPLUG_PYTHON") {
            Some(p) => vec![p.into()],
            // Debian's python3-grpcio installs for /usr/bin/python3, which a pyenv or venv
            // python3 on PATH may hide.
            None => vec!["/usr/bin/python3".into(), "python3".into()],
        };
        let python = candidates.into_iter().find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import grpc, grpc_tools.protoc"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        let Some(python) = python else {
            let msg = format!(
                "{test}: no python3 with grpcio and grpc_tools (apt-get install python3-grpcio \
                 python3-grpc-tools, or set VFPLUG_PYTHON)"
            );
            if required() {
                panic!("VFPLUG_REQUIRE=1 and {msg}");
            }
            eprintln!("\n!!!!! SKIP {msg} !!!!!\n");
            return None;
        };
        let script = std::env::temp_dir().join(format!(
            "vfplug-grpc-client-{}-{}.py",
            std::process::id(),
            test.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        if let Err(e) = std::fs::write(&script, SCRIPT) {
            panic!("writing {}: {e}", script.display());
        }
        Some(Self { python, script })
    }

    /// Runs one client against `socket`. `Ok` holds the script's JSON answer; `Err` the reason a
    /// call failed (the script's output and exit status).
    pub async fn call(
        &self,
        service: Service,
        socket: &Path,
        authority: &str,
    ) -> Result<serde_json::Value, String> {
        let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg(&self.script)
            .arg("--proto-root")
            .arg(&proto_root)
            .arg("--socket")
            .arg(socket)
            .arg("--service")
            .arg(match service {
                Service::DevicePlugin => "deviceplugin",
                Service::Node => "node",
            })
            .args(["--authority", authority, "--timeout", "10"])
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| "python client did not finish in 60 s".to_owned())?
            .map_err(|e| format!("running {}: {e}", self.python.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "{service:?} with :authority mode {authority}: {} stdout={stdout} stderr={stderr}",
                out.status
            ));
        }
        serde_json::from_str(stdout.trim())
            .map_err(|e| format!("client output is not JSON ({e}): {stdout}"))
    }
}

impl Drop for PythonGrpc {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

/// How the grpc-go client sets `:authority`: `kubelet` dials the bare socket path like kubelets
/// before 1.26 (grpc-go then sends the path), `percent` sets it to the path percent-encoded,
/// `localhost` to `localhost` (what kubelets since 1.26 send).
pub const GO_AUTHORITY_MODES: [&str; 3] = ["kubelet", "percent", "localhost"];

const GO_CLIENT: &str = include_str!("../tests/foreign/grpc_go_client/main.go");
/// Debian's GOPATH with `golang-google-grpc-dev`.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// A grpc-go device-plugin client built from `tests/foreign/grpc_go_client` against Debian's
/// `golang-google-grpc-dev` (GOPATH mode, no network), dialing as kubelets before 1.26 do.
#[derive(Debug)]
pub struct GoGrpc {
    binary: PathBuf,
    dir: PathBuf,
}

impl GoGrpc {
    /// Builds the client (`go` from `$VFPLUG_GO` or `PATH`). `None` after printing a SKIP line
    /// when go or grpc-go is missing; panics instead under `VFPLUG_REQUIRE=1`, or when the build
    /// fails.
    pub fn build(test: &str) -> Option<Self> {
        let go: PathBuf = std::env::var_os("VFPLUG_GO").map_or_else(|| "go".into(), Into::into);
        let have_go = std::process::Command::new(&go)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let have_grpc = Path::new(DEBIAN_GOPATH)
            .join("src/google.golang.org/grpc")
            .is_dir();
        if !have_go || !have_grpc {
            let msg = format!(
                "{test}: no go toolchain or grpc-go in {DEBIAN_GOPATH} (apt-get install golang-go \
                 golang-google-grpc-dev)"
            );
            if required() {
                panic!("VFPLUG_REQUIRE=1 and {msg}");
            }
            eprintln!("\n!!!!! SKIP {msg} !!!!!\n");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "vfplug-grpc-go-{}-{}",
            std::process::id(),
            test.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        let src = dir.join("main.go");
        let binary = dir.join("client");
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&src, GO_CLIENT))
        {
            panic!("writing {}: {e}", src.display());
        }
        let out = std::process::Command::new(&go)
            .arg("build")
            .arg("-o")
            .arg(&binary)
            .arg(&src)
            .env("GOPATH", DEBIAN_GOPATH)
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", std::env::temp_dir().join("vfplug-gocache"))
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { binary, dir }),
            Ok(o) => panic!(
                "building the grpc-go client failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("running {}: {e}", go.display()),
        }
    }

    /// Calls GetDevicePluginOptions, the first ListAndWatch message, GetPreferredAllocation and
    /// Allocate for `device` on `socket`. `Ok` holds the client's JSON answer.
    pub async fn call(
        &self,
        socket: &Path,
        authority: &str,
        device: &str,
    ) -> Result<serde_json::Value, String> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("-socket")
            .arg(socket)
            .args(["-authority", authority, "-device", device])
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .map_err(|_| "grpc-go client did not finish in 30 s".to_owned())?
            .map_err(|e| format!("running {}: {e}", self.binary.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "grpc-go with :authority mode {authority}: {} stdout={stdout} stderr={}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_str(stdout.trim())
            .map_err(|e| format!("client output is not JSON ({e}): {stdout}"))
    }
}

impl Drop for GoGrpc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
