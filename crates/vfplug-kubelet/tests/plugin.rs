//! The device-plugin server against the fake kubelet, over real gRPC on unix sockets in a
//! temporary kubelet dir: registration in both modes, ListAndWatch, Allocate, recovery.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vfplug_kubelet::plugin::{PluginConfig, RegistrationMode, spawn_plugin};
use vfplug_kubelet::sriov::SriovDevice;
use vfplug_kubelet::testing::{FakeKubelet, FakeKubeletOptions, RegistrationPath, TestBackend};

const RES: &str = "vfplug.io/pool0";
const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("vfplug_kubelet=debug")
        .try_init();
}

fn backend(n: usize) -> Arc<TestBackend> {
    Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(n),
    ))
}

fn config(dir: &Path, mode: RegistrationMode) -> PluginConfig {
    let mut c = PluginConfig::new("pool0", dir);
    c.mode = mode;
    c.stream_lost_grace = Duration::from_millis(500);
    c
}

async fn wait_registered(rx: &mut tokio::sync::watch::Receiver<bool>, want: bool) {
    tokio::time::timeout(WAIT, rx.wait_for(|r| *r == want))
        .await
        .expect("registered flag timeout")
        .expect("plugin task gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_registration_sends_snapshot_at_once() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(4);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Auto),
        b.clone(),
        cancel.clone(),
    );
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;

    let regs = kubelet.registrations();
    assert_eq!(regs.len(), 1);
    let r = &regs[0];
    assert_eq!(r.path, RegistrationPath::Legacy);
    assert_eq!(r.version, "v1beta1");
    assert_eq!(r.endpoint, "vfplug-pool0.sock");
    assert_eq!(r.resource_name, RES);
    assert!(r.accepted);
    assert!(
        r.options
            .expect("options")
            .get_preferred_allocation_available
    );
    assert!(dir.path().join("device-plugins/vfplug-pool0.sock").exists());

    let opts = kubelet.plugin_options(RES).expect("connected");
    assert!(opts.get_preferred_allocation_available);
    assert!(!opts.pre_start_required);

    let snap = kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 4)
        .await
        .unwrap();
    assert_eq!(snap.healthy_ids().len(), 4);
    assert_eq!(snap.devices[0].id, "0000:10:00.0");
    let topo = snap.devices[0].topology.clone().expect("topology");
    assert_eq!(topo.nodes[0].id, 0);
    assert_eq!(h.metrics().snapshot().registrations_ok, 1);
    assert_eq!(h.metrics().snapshot().open_streams, 1);

    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_registry_mode_registers_via_getinfo() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start_with(
        dir.path(),
        FakeKubeletOptions {
            legacy: true,
            plugins_registry: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let b = backend(3);
    let cancel = CancellationToken::new();
    // Auto picks plugins_registry because the directory exists.
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Auto),
        b.clone(),
        cancel.clone(),
    );
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;

    let regs = kubelet.registrations();
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert_eq!(regs[0].path, RegistrationPath::PluginsRegistry);
    assert_eq!(regs[0].resource_name, RES);
    assert_eq!(regs[0].version, "v1beta1");
    let sock = dir.path().join("plugins_registry/vfplug-pool0.sock");
    assert_eq!(regs[0].endpoint, sock.to_string_lossy());
    assert!(sock.exists());
    assert!(!dir.path().join("device-plugins/vfplug-pool0.sock").exists());

    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 3)
        .await
        .unwrap();
    cancel.cancel();
    h.join().await;
    assert!(!sock.exists(), "socket removed on cancellation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flip_and_membership_change_reach_kubelet() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(4);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 4)
        .await
        .unwrap();

    let t0 = Instant::now();
    b.set_health("0000:10:00.1", false);
    let snap = kubelet
        .wait_snapshot(RES, Some(t0), WAIT, |s| s.healthy_ids().len() == 3)
        .await
        .unwrap();
    let flipped = snap
        .devices
        .iter()
        .find(|d| d.id == "0000:10:00.1")
        .unwrap();
    assert_eq!(flipped.health, "Unhealthy");
    println!("health flip observed by kubelet after {:?}", snap.at - t0);

    let t1 = Instant::now();
    let mut list = b.current();
    list.truncate(2);
    b.set_devices(list);
    kubelet
        .wait_snapshot(RES, Some(t1), WAIT, |s| s.devices.len() == 2)
        .await
        .unwrap();
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_changes_is_coalesced() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(64);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 64)
        .await
        .unwrap();
    let before = kubelet.snapshots(RES).len();

    // 50 changes back to back: each marks one more device unhealthy.
    let ids: Vec<String> = b.current().iter().map(|d| d.id.clone()).collect();
    for id in ids.iter().take(50) {
        b.set_health(id, false);
    }
    // The final state must arrive.
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.healthy_ids().len() == 14)
        .await
        .unwrap();
    // Give a trailing snapshot (if any) time to land, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = kubelet.snapshots(RES).len() - before;
    println!("50 changes -> {sent} snapshots");
    assert!(sent >= 1);
    assert!(sent <= 5, "burst not coalesced: {sent} snapshots");
    let last = kubelet.snapshots(RES).pop().unwrap();
    assert_eq!(
        last.healthy_ids().len(),
        14,
        "last snapshot is the final state"
    );
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_over_grpc_returns_sriov_abi() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let devs = vec![
        SriovDevice::vfio("0000:51:11.0", 113),
        SriovDevice::vfio("0000:51:11.1", 114),
        SriovDevice::netdev("0000:51:11.2"),
    ];
    let b = Arc::new(TestBackend::new(
        "intel.com",
        "ice_sriov_netdevice3_01",
        devs,
    ));
    let res = "intel.com/ice_sriov_netdevice3_01";
    let cancel = CancellationToken::new();
    let mut cfg = config(dir.path(), RegistrationMode::Legacy);
    cfg.pool = "ice".into();
    let h = spawn_plugin(cfg, b.clone(), cancel.clone());
    kubelet
        .wait_snapshot(res, None, WAIT, |s| s.devices.len() == 3)
        .await
        .unwrap();

    let resp = kubelet
        .allocate(res, vec![vec!["0000:51:11.0".into()]])
        .await
        .unwrap();
    assert_eq!(resp.container_responses.len(), 1);
    let c = &resp.container_responses[0];
    assert_eq!(
        c.envs["PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01"],
        "0000:51:11.0"
    );
    assert_eq!(
        c.envs["PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01_INFO"],
        r#"{"0000:51:11.0":{"generic":{"deviceID":"0000:51:11.0"},"vfio":{"dev-mount":"/dev/vfio/113","mount":"/dev/vfio/vfio"}}}"#
    );
    let specs: Vec<(&str, &str, &str)> = c
        .devices
        .iter()
        .map(|d| {
            (
                d.container_path.as_str(),
                d.host_path.as_str(),
                d.permissions.as_str(),
            )
        })
        .collect();
    assert_eq!(
        specs,
        [
            ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"),
            ("/dev/vfio/113", "/dev/vfio/113", "rw")
        ]
    );

    // Two containers in one request.
    let resp = kubelet
        .allocate(
            res,
            vec![
                vec!["0000:51:11.1".into(), "0000:51:11.0".into()],
                vec!["0000:51:11.2".into()],
            ],
        )
        .await
        .unwrap();
    assert_eq!(resp.container_responses.len(), 2);
    assert_eq!(
        resp.container_responses[0].envs["PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01"],
        "0000:51:11.1,0000:51:11.0"
    );
    assert_eq!(
        resp.container_responses[1].envs["PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01_INFO"],
        r#"{"0000:51:11.2":{"generic":{"deviceID":"0000:51:11.2"}}}"#
    );
    assert!(resp.container_responses[1].devices.is_empty());

    // Unknown id: InvalidArgument naming the id; the backend never sees it.
    let seen = b.allocations().len();
    let err = kubelet
        .allocate(res, vec![vec!["0000:99:00.0".into()]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("0000:99:00.0"), "{}", err.message());
    assert_eq!(b.allocations().len(), seen);

    // Unhealthy id: FailedPrecondition naming the id.
    b.set_health("0000:51:11.1", false);
    let err = kubelet
        .allocate(res, vec![vec!["0000:51:11.1".into()]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("0000:51:11.1"), "{}", err.message());

    let m = h.metrics().snapshot();
    assert_eq!(m.allocations_ok, 2);
    assert_eq!(m.allocations_failed, 2);
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_honours_must_include_and_size() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(8);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    let ids: Vec<String> = b.current().iter().map(|d| d.id.clone()).collect();
    let got = kubelet
        .preferred(RES, ids.clone(), vec![ids[5].clone()], 3)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], ids[5]);
    assert!(got.iter().all(|g| ids.contains(g)));
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), 3);
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_rebinds_and_reregisters() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(4);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    let sock = dir.path().join("device-plugins/vfplug-pool0.sock");
    assert!(sock.exists());

    let identity = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p)
            .ok()
            .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
    };
    let before = identity(&sock);
    let t0 = Instant::now();
    kubelet.restart().unwrap();
    kubelet.wait_registrations(2, WAIT).await.unwrap();
    // A new socket, not the old one re-registered: the kubelet deleted the old file.
    assert!(identity(&sock).is_some());
    assert_ne!(identity(&sock), before, "plugin re-bound a fresh socket");
    let took = kubelet.registrations()[1].at - t0;
    println!("kubelet restart -> re-registered after {took:?}");
    // The new registration is usable: snapshot and Allocate over the new socket.
    kubelet
        .wait_snapshot(RES, Some(t0), WAIT, |s| s.devices.len() == 4)
        .await
        .unwrap();
    kubelet
        .allocate(RES, vec![vec!["0000:10:00.0".into()]])
        .await
        .unwrap();
    assert!(sock.exists());
    assert!(h.metrics().snapshot().rebinds >= 1);
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registration_is_retried_with_backoff() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.refuse_next(3);
    let b = backend(2);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;
    let regs = kubelet.registrations();
    assert_eq!(regs.len(), 4);
    assert_eq!(regs.iter().filter(|r| !r.accepted).count(), 3);
    assert!(regs[3].accepted);
    // Backoff grows: 100, 200, 400 ms between attempts (lower bounds only).
    assert!(regs[2].at - regs[1].at >= Duration::from_millis(150));
    let m = h.metrics().snapshot();
    assert_eq!(m.registrations_failed, 3);
    assert_eq!(m.registrations_ok, 1);
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_kubelet_that_is_not_up() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("device-plugins")).unwrap();
    let b = backend(2);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!*h.registered().borrow());
    assert_eq!(
        h.metrics().snapshot().registrations_failed,
        0,
        "waiting is not failing"
    );

    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;
    assert_eq!(kubelet.accepted_registrations(), 1);
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_registration_false_recovers() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start_with(
        dir.path(),
        FakeKubeletOptions {
            legacy: false,
            plugins_registry: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    kubelet.refuse_next(1);
    let b = backend(2);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::PluginsRegistry),
        b.clone(),
        cancel.clone(),
    );
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;
    let regs = kubelet.registrations();
    assert_eq!(regs.len(), 2, "{regs:?}");
    assert!(!regs[0].accepted);
    assert!(regs[1].accepted);
    assert_eq!(h.metrics().snapshot().registrations_failed, 1);
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 2)
        .await
        .unwrap();
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_streams_trigger_reregistration() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(2);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    kubelet.drop_streams();
    kubelet.wait_registrations(2, WAIT).await.unwrap();
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_everything_and_removes_socket() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(2);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;
    let sock = dir.path().join("device-plugins/vfplug-pool0.sock");
    assert!(sock.exists());
    let h_metrics = h.metrics();
    cancel.cancel();
    tokio::time::timeout(WAIT, h.join()).await.expect("join");
    assert!(!sock.exists());
    assert!(!*reg.borrow());
    assert_eq!(h_metrics.snapshot().open_streams, 0);
    // The kubelet's stream ended too: no more snapshots arrive after a change.
    let n = kubelet.snapshots(RES).len();
    b.set_health("0000:10:00.0", false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kubelet.snapshots(RES).len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_from_a_previous_run_is_replaced() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let sock = dir.path().join("device-plugins/vfplug-pool0.sock");
    // A socket file nobody listens on, as a crashed run leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let b = backend(1);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Legacy),
        b.clone(),
        cancel.clone(),
    );
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_kubelet_socket_cuts_a_long_backoff_short() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = backend(2);
    let cancel = CancellationToken::new();
    let mut cfg = config(dir.path(), RegistrationMode::Legacy);
    cfg.backoff_initial = Duration::from_secs(2);
    cfg.backoff_max = Duration::from_secs(8);
    let h = spawn_plugin(cfg, b.clone(), cancel.clone());
    kubelet.wait_registrations(1, WAIT).await.unwrap();

    // The kubelet dies and leaves its socket file behind: every Register now fails and the
    // backoff grows (2 s, 4 s, ...).
    kubelet.stop();
    drop(
        std::os::unix::net::UnixListener::bind(dir.path().join("device-plugins/kubelet.sock"))
            .unwrap(),
    );
    let metrics = h.metrics();
    tokio::time::timeout(WAIT, async {
        while metrics.snapshot().registrations_failed < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("registration failures with backoff");
    assert!(!*h.registered().borrow());

    // The kubelet comes back: registration must not wait out the (now 4 s) backoff.
    let t0 = Instant::now();
    kubelet.start_again().unwrap();
    kubelet
        .wait_registrations(2, Duration::from_millis(1500))
        .await
        .expect("re-registered well before the backoff expired");
    println!("kubelet back -> re-registered after {:?}", t0.elapsed());
    cancel.cancel();
    h.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_in_plugins_registry_mode_reregisters() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start_with(
        dir.path(),
        FakeKubeletOptions {
            legacy: true,
            plugins_registry: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let b = backend(3);
    let cancel = CancellationToken::new();
    let h = spawn_plugin(
        config(dir.path(), RegistrationMode::Auto),
        b.clone(),
        cancel.clone(),
    );
    kubelet.wait_registrations(1, WAIT).await.unwrap();

    let t0 = Instant::now();
    kubelet.restart().unwrap();
    kubelet.wait_registrations(2, WAIT).await.unwrap();
    let regs = kubelet.registrations();
    assert!(
        regs.iter()
            .all(|r| r.path == RegistrationPath::PluginsRegistry)
    );
    println!(
        "plugins_registry: kubelet restart -> re-registered after {:?}",
        regs[1].at - t0
    );
    kubelet
        .wait_snapshot(RES, Some(t0), WAIT, |s| s.devices.len() == 3)
        .await
        .unwrap();
    let mut reg = h.registered();
    wait_registered(&mut reg, true).await;
    cancel.cancel();
    h.join().await;
}

/// Issue 8, finding 3: a kubelet that answers Register but never opens ListAndWatch has not
/// registered us. Readiness stays false, the attempt counts as failed, and we register again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_counts_only_once_list_and_watch_opens() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.ghost_next(1);
    let b = backend(2);
    let cancel = CancellationToken::new();
    let mut c = config(dir.path(), RegistrationMode::Legacy);
    c.stream_open_timeout = Duration::from_millis(400);
    let h = spawn_plugin(c, b, cancel.clone());
    let mut reg = h.registered();

    // The first Register is accepted, and nothing follows.
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    let accepted = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!*reg.borrow(), "registered before any ListAndWatch");
    assert_eq!(h.metrics().snapshot().registrations_confirmed, 0);

    // After the bound, a failed registration and a second Register, which the kubelet follows
    // with ListAndWatch: now we are registered.
    wait_registered(&mut reg, true).await;
    assert!(accepted.elapsed() >= Duration::from_millis(350));
    let regs = kubelet.registrations();
    assert_eq!(regs.len(), 2, "{regs:?}");
    assert!(regs.iter().all(|r| r.accepted));
    let m = h.metrics().snapshot();
    assert_eq!(m.registrations_ok, 2);
    assert_eq!(m.registrations_confirmed, 1);
    assert_eq!(m.registrations_failed, 1);
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 2)
        .await
        .unwrap();

    cancel.cancel();
    h.join().await;
}
