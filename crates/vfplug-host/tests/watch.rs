//! The watcher against fake trees: changes made with the fixture's mutators come out as events.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::watch::{Fingerprint, HostEvent, WatchConfig, spawn_watcher};

fn host(root: &std::path::Path) -> SysfsBuilder {
    let mut b = SysfsBuilder::new(root);
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("p0")
        .vfs(4, |i| {
            VfSpec::new().driver("iavf").netdev(format!("p0v{i}"))
        })
        .build()
        .unwrap();
    b.pf("0000:5e:00.0")
        .driver("ixgbe")
        .netdev("p1")
        .carrier(false)
        .build()
        .unwrap();
    b
}

/// Waits for the first event matching `want`, skipping others. The timeout only guards
/// against a hang; it is not a latency assertion (latency is the benchmark's job).
async fn next_matching(
    rx: &mut Receiver<HostEvent>,
    want: impl Fn(&HostEvent) -> bool,
) -> HostEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = rx.recv().await.expect("watcher stopped");
            if want(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("no matching event")
}

#[test]
fn fingerprint_is_stable_and_sees_every_inventory_change() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = host(dir.path());
    let fp = || Fingerprint::compute(dir.path());
    let base = fp();
    assert_eq!(base, fp(), "no change, same fingerprint");
    assert_eq!(base.pf_netdevs.get("p0"), Some(&Some(true)));
    assert_eq!(base.pf_netdevs.get("p1"), Some(&Some(false)));

    // Carrier is reported separately and must not force a rescan.
    b.set_carrier("p0", false).unwrap();
    let c = fp();
    assert_eq!(c.hash, base.hash);
    assert_eq!(c.pf_netdevs.get("p0"), Some(&Some(false)));

    let mut seen = vec![base.hash];
    let mut step = |what: &str, b: &mut SysfsBuilder, f: &dyn Fn(&mut SysfsBuilder)| {
        f(b);
        let h = fp().hash;
        assert!(!seen.contains(&h), "{what} not detected");
        seen.push(h);
    };
    step("rebind", &mut b, &|b| {
        b.rebind("0000:3b:01.0", Some("vfio-pci")).unwrap()
    });
    step("netdev moved away", &mut b, &|b| {
        b.move_vf_netdev_away("0000:3b:01.1").unwrap();
    });
    step("sriov_numvfs down", &mut b, &|b| {
        b.set_num_vfs("0000:3b:00.0", 2).unwrap()
    });
    step("sriov_numvfs up", &mut b, &|b| {
        b.set_num_vfs("0000:3b:00.0", 3).unwrap()
    });
    step("PF unbound", &mut b, &|b| {
        b.rebind("0000:5e:00.0", None).unwrap()
    });
}

#[tokio::test]
async fn watcher_reports_carrier_and_pci_changes_on_a_fake_tree() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = host(dir.path());
    let mut cfg = WatchConfig::new(dir.path().to_path_buf());
    assert!(
        !cfg.uevents,
        "a fake root must not listen to the real kernel"
    );
    cfg.fingerprint_poll = Some(Duration::from_millis(20));
    cfg.carrier_poll = Duration::from_millis(10);
    cfg.resync = Duration::from_secs(3600);
    b.set_carrier("p0", true).unwrap();
    b.set_carrier("p1", false).unwrap();
    let cancel = CancellationToken::new();
    let mut rx = spawn_watcher(cfg, cancel.clone());

    // The watcher learns the PF netdevs from its first fingerprint and reports each one's
    // carrier once as it learns it (the consumer scanned earlier; a flip in between must not be
    // lost).
    let mut baseline = std::collections::BTreeMap::new();
    while baseline.len() < 2 {
        match next_matching(&mut rx, |e| matches!(e, HostEvent::CarrierChanged { .. })).await {
            HostEvent::CarrierChanged { pf_netdev, up } => {
                assert!(baseline.insert(pf_netdev, up).is_none(), "reported twice");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        baseline,
        [("p0".to_string(), true), ("p1".to_string(), false)]
            .into_iter()
            .collect()
    );
    // From here on the baseline is known: each flip gives exactly its event.
    b.set_carrier("p1", true).unwrap();
    let ev = next_matching(&mut rx, |e| matches!(e, HostEvent::CarrierChanged { .. })).await;
    assert_eq!(
        ev,
        HostEvent::CarrierChanged {
            pf_netdev: "p1".into(),
            up: true
        }
    );
    b.set_carrier("p1", false).unwrap();
    let ev = next_matching(&mut rx, |e| matches!(e, HostEvent::CarrierChanged { .. })).await;
    assert_eq!(
        ev,
        HostEvent::CarrierChanged {
            pf_netdev: "p1".into(),
            up: false
        }
    );

    b.set_num_vfs("0000:3b:00.0", 1).unwrap();
    let ev = next_matching(&mut rx, |e| matches!(e, HostEvent::PciChanged { .. })).await;
    assert_eq!(ev, HostEvent::PciChanged { pci: None });

    cancel.cancel();
    // After cancellation the stream ends (drain what was queued).
    tokio::time::timeout(Duration::from_secs(10), async {
        while rx.recv().await.is_some() {}
    })
    .await
    .expect("stream did not end after cancel");
}

#[tokio::test]
async fn watcher_sends_periodic_resyncs_and_survives_a_missing_root() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut cfg = WatchConfig::new(dir.path().join("not-there"));
    cfg.resync = Duration::from_millis(20);
    let cancel = CancellationToken::new();
    let mut rx = spawn_watcher(cfg, cancel.clone());
    let ev = next_matching(&mut rx, |_| true).await;
    assert_eq!(ev, HostEvent::Resync);
    assert_eq!(next_matching(&mut rx, |_| true).await, HostEvent::Resync);
    cancel.cancel();
}

#[tokio::test]
async fn netlink_socket_failure_is_not_fatal() {
    // Whether this sandbox allows NETLINK_KOBJECT_UEVENT / NETLINK_ROUTE or not, the watcher
    // must come up and keep delivering its polled events.
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut cfg = WatchConfig::new(dir.path().to_path_buf());
    cfg.uevents = true;
    cfg.rtnetlink = true;
    cfg.resync = Duration::from_millis(20);
    let uevents = vfplug_host::watch::open_uevent_socket().is_ok();
    let rtnl = vfplug_host::watch::open_link_socket().is_ok();
    eprintln!("uevent socket available here: {uevents}; rtnetlink socket: {rtnl}");
    let cancel = CancellationToken::new();
    let mut rx = spawn_watcher(cfg, cancel.clone());
    assert_eq!(
        next_matching(&mut rx, |e| *e == HostEvent::Resync).await,
        HostEvent::Resync
    );
    cancel.cancel();
}
