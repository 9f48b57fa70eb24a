//! The real `vfplugd` binary with its stable flags, against a fake kubelet over real gRPC and a
//! fake sysfs tree: registration, the first snapshot, /readyz, /metrics, SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugd_registers_serves_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf("0000:af:00.0")
        .driver("ixgbe")
        .netdev("enp175s0f0")
        .vfs(16, |i| {
            VfSpec::new()
                .driver("ixgbevf")
                .netdev(format!("enp175s0f0v{i}"))
        })
        .build()
        .unwrap();
    // sriov-network-device-plugin's own config format, unchanged.
    let cfg = root.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"resourceList": [{"resourceName": "intel_sriov_netdevice",
            "selectors": {"vendors": ["8086"], "drivers": ["ixgbevf"], "pfNames": ["enp175s0f0"]}}]}"#,
    )
    .unwrap();
    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
    let addr = format!("127.0.0.1:{}", free_port());

    let mut child = Command::new(env!("CARGO_BIN_EXE_vfplugd"))
        .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
        .args(["--kubelet-dir", root.join("kubelet").to_str().unwrap()])
        .args(["--state-dir", root.join("state").to_str().unwrap()])
        .args(["--socket", root.join("vfplugd.sock").to_str().unwrap()])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--dev-root", root.join("dev").to_str().unwrap()])
        .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
        .args(["--http-addr", &addr, "--node-name", "node-a"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let t0 = Instant::now();
    kubelet
        .wait_registrations(1, Duration::from_secs(15))
        .await
        .unwrap();
    let reg = &kubelet.registrations()[0];
    assert_eq!(reg.resource_name, "intel.com/intel_sriov_netdevice");
    assert_eq!(reg.version, "v1beta1");
    let snap = kubelet
        .wait_snapshot(
            "intel.com/intel_sriov_netdevice",
            None,
            Duration::from_secs(10),
            |s| s.healthy_ids().len() == 16,
        )
        .await
        .unwrap();
    assert!(snap.devices.iter().all(|d| d.id.starts_with("0000:af:")));
    eprintln!("vfplugd start -> first full snapshot: {:?}", t0.elapsed());

    // Ready after inventory and registration; metrics count the VFs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((200, _)) = http_get(&addr, "/readyz") {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never became 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = http_get(&addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        if body.contains(r#"vfplug_vfs{pool="intel.com/intel_sriov_netdevice",state="free"} 16"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed 16 free VFs:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The node API answers on its socket, which only root may open.
    let node_sock = root.join("vfplugd.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&node_sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "node API socket mode {mode:o}");
    }
    let ch = vfplug_api::connect(&node_sock, Duration::from_secs(5))
        .await
        .unwrap();
    let list = vfplug_api::v1::node_client::NodeClient::new(ch)
        .list(vfplug_api::v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.vfs.len(), 16);
    assert!(
        list.vfs
            .iter()
            .all(|v| v.state == "free" && v.pool == "intel.com/intel_sriov_netdevice"),
        "{list:?}"
    );

    // SIGTERM: clean exit, sockets gone.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let sock = root.join("kubelet/device-plugins/vfplug-intel_sriov_netdevice.sock");
    assert!(!sock.exists(), "plugin socket left behind");
    assert!(!node_sock.exists(), "node API socket left behind");
}

/// vfplugd run with a config whose one selector is wrong; stderr piped (not a terminal).
fn run_with_a_bad_config() -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "pools:\n  - name: net\n    selectors:\n      pfNames: [\"eth0#5-3\"]\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_vfplugd"))
        .args(["--sysfs-root", dir.path().join("sys").to_str().unwrap()])
        .args([
            "--kubelet-dir",
            dir.path().join("kubelet").to_str().unwrap(),
        ])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args([
            "--socket",
            dir.path().join("vfplugd.sock").to_str().unwrap(),
        ])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0"])
        // tracing-subscriber would drop colours for NO_COLOR itself; the test is about a pipe.
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn vfplugd_names_the_bad_key_and_exits_nonzero() {
    let out = run_with_a_bad_config();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools[0].selectors.pfNames"), "{err}");
}

/// Issue 8, finding 9: a log that goes to a file or journald carries no ANSI colour codes.
#[test]
fn log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let out = run_with_a_bad_config();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vfplugd failed"), "no log line at all: {err}");
    assert!(
        !err.contains("\x1b["),
        "colour codes in a piped log: {err:?}"
    );
}
