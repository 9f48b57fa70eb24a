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
        // ... and the registration the kubelet confirmed (it opened ListAndWatch), once.
        if body.contains(r#"vfplug_vfs{pool="intel.com/intel_sriov_netdevice",state="free"} 16"#)
            && body.contains(
                r#"vfplug_registrations_total{pool="intel.com/intel_sriov_netdevice",result="confirmed"} 1"#,
            )
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed 16 free VFs and one confirmed registration:\n{body}"
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

/// A fake node with one PF whose `n` VFs sit on vfio-pci in a vfio pool `vm`; returns the
/// address of the first VF.
fn vfio_node(root: &std::path::Path, n: u32) -> String {
    vfplug_host::fixture::vfio_node(root, n).unwrap()[0].to_string()
}

/// Starts vfplugd on [`vfio_node`]'s tree with its ledger in `state` and waits until its node
/// API socket exists; stderr is piped.
async fn spawn_vfplugd(
    root: &std::path::Path,
    state: &std::path::Path,
    extra: &[&str],
) -> std::process::Child {
    let sock = root.join("vfplugd.sock");
    let child = vfplug_host::fixture::vfplugd_command(
        std::path::Path::new(env!("CARGO_BIN_EXE_vfplugd")),
        root,
        state,
    )
    .args(extra)
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "vfplugd never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// Supervision: when the ledger can no longer be written (its file system is full), vfplugd
/// stops with a non-zero exit naming the journal, instead of serving on with a ledger that
/// lies. The state dir is a tiny tmpfs (root only); node-API ADD/DEL in a loop fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugd_exits_nonzero_when_its_ledger_cannot_be_written() {
    let test = "vfplugd_exits_nonzero_when_its_ledger_cannot_be_written";
    if vfplug_host::prereq::need(test, vfplug_host::prereq::root()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let vf = vfio_node(root, 4);
    let state = root.join("state");
    std::fs::create_dir(&state).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=96k",
            "vfplug-test",
            state.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    let sock = root.join("vfplugd.sock");
    // Never compact: the log only grows.
    let mut child = spawn_vfplugd(root, &state, &["--ledger-compact-after", "1000000"]).await;
    let ch = vfplug_api::connect(&sock, Duration::from_secs(10))
        .await
        .unwrap();
    let mut c = vfplug_api::v1::node_client::NodeClient::new(ch);
    let att = vfplug_api::v1::Attachment {
        container_id: "fill".into(),
        ifname: "net1".into(),
        pod_uid: "uid-fill".into(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut failed_call = false;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let add = c
            .add(vfplug_api::v1::AddRequest {
                attachment: Some(att.clone()),
                netns: "/var/run/netns/x".into(),
                network: "fill".into(),
                device_id: vf.clone(),
                ..Default::default()
            })
            .await;
        if add.is_err() {
            failed_call = true;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let _ = c
            .del(vfplug_api::v1::DelRequest {
                attachment: Some(att.clone()),
                ..Default::default()
            })
            .await;
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "vfplugd kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{status:?}\n{err}");
    assert!(failed_call, "a call failed before the exit");
    assert!(
        err.contains("ledger journal failed") && err.contains("No space left"),
        "{err}"
    );
}

/// Issue 8, finding 9: each kubelet path has its own flag. The kubelet's root dir names a place
/// with nothing in it; the device-plugin dir and the PodResources socket are given on their own
/// and are the ones used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kubelet_path_has_its_own_flag() {
    use vfplug_kubelet::testing::FakePodResources;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf("0000:af:00.0")
        .driver("ixgbe")
        .netdev("enp175s0f0")
        .vfs(2, |i| {
            VfSpec::new()
                .driver("ixgbevf")
                .netdev(format!("enp175s0f0v{i}"))
        })
        .build()
        .unwrap();
    let cfg = root.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"resourceList": [{"resourceName": "net", "selectors": {"pfNames": ["enp175s0f0"]}}]}"#,
    )
    .unwrap();
    // The kubelet's directories live apart (as when mounted one by one into a container).
    let kubelet = FakeKubelet::start(&root.join("apart")).await.unwrap();
    let podres = FakePodResources::start(&root.join("apart")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfplugd"))
        .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
        .args([
            "--kubelet-dir",
            root.join("no-kubelet-here").to_str().unwrap(),
        ])
        .args([
            "--device-plugin-dir",
            root.join("apart/device-plugins").to_str().unwrap(),
        ])
        .args([
            "--plugins-registry-dir",
            root.join("apart/plugins_registry").to_str().unwrap(),
        ])
        .args([
            "--pod-resources-socket",
            root.join("apart/pod-resources/kubelet.sock")
                .to_str()
                .unwrap(),
        ])
        .args(["--podresources-seconds", "1"])
        .args(["--state-dir", root.join("state").to_str().unwrap()])
        .args(["--socket", root.join("vfplugd.sock").to_str().unwrap()])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--dev-root", root.join("dev").to_str().unwrap()])
        .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
        .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let registered = kubelet.wait_registrations(1, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while podres.list_calls() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polled = podres.list_calls();
    let _ = child.kill();
    let _ = child.wait();
    registered.expect("registered through --device-plugin-dir");
    assert!(
        root.join("apart/device-plugins/vfplug-net.sock").exists()
            || kubelet.registrations()[0].endpoint == "vfplug-net.sock"
    );
    assert!(
        polled > 0,
        "PodResources never polled at --pod-resources-socket"
    );
    assert!(!root.join("no-kubelet-here/device-plugins").exists());
}

/// A client that keeps a node-API connection open (a hung CNI shim) does not hold vfplugd's
/// shutdown: SIGTERM still ends it within the grace period (found in the VM lab, where an idle
/// connection kept vfplugd up until it was killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_api_client_does_not_hold_the_shutdown() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    vfio_node(root, 2);
    let sock = root.join("vfplugd.sock");
    let mut child = spawn_vfplugd(root, &root.join("state"), &[]).await;
    // An HTTP/2 connection that says hello and then nothing.
    let mut idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "vfplugd still running 10 s after SIGTERM with an idle client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("SIGTERM -> exit with an idle client: {:?}", t.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed");
    drop(idle);
}

/// A failpoint name with a typo, from the flag or the environment, stops vfplugd before it serves
/// anything, and the error lists the valid names (a crash test must not silently test nothing).
#[test]
fn an_unknown_failpoint_refuses_to_start_and_lists_the_valid_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    vfio_node(root, 1);
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_vfplugd"));
    let by_flag = vfplug_host::fixture::vfplugd_command(bin, root, &root.join("state"))
        .args(["--failpoint", "attach-atached"])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let by_env = vfplug_host::fixture::vfplugd_command(bin, root, &root.join("state"))
        .env("VFPLUG_FAILPOINT", "attach-atached")
        .output()
        .unwrap();
    for out in [by_flag, by_env] {
        assert!(!out.status.success(), "{:?}", out.status);
        let err = String::from_utf8_lossy(&out.stderr);
        // (The log quotes the message, so the name's own quotes may be escaped.)
        assert!(
            err.contains("unknown failpoint") && err.contains("attach-atached"),
            "{err}"
        );
        for (name, _) in vfplug_executor::failpoint::POINTS {
            assert!(err.contains(name), "{name} not listed: {err}");
        }
        assert!(!root.join("vfplugd.sock").exists(), "it served");
    }
}
