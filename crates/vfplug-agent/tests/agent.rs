//! The agent end to end, in-process: a fake sysfs tree, a fake kubelet over real gRPC on unix
//! sockets, and the real WAL in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vfplug_agent::wal::Wal;
use vfplug_agent::{Agent, AgentOptions};
use vfplug_core::ledger::{Ledger, Owner, Record, SavedVfState, Step, VfState};
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

const NET: &str = "vfplug.io/net";
const VFIO: &str = "vfplug.io/vm";
const T: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
resourcePrefix: vfplug.io
pools:
  - name: net
    deviceMode: netdev
    health: { pfLinkDown: unhealthy }
    selectors: { pfNames: ["ens1f0"], drivers: ["iavf"] }
  - name: vm
    deviceMode: vfio
    selectors: { pfNames: ["ens1f1"] }
"#;

/// Two PFs: ens1f0 with 8 iavf VFs (NUMA 0), ens1f1 with 4 vfio-pci VFs (NUMA 1).
fn build_node(root: &Path) -> SysfsBuilder {
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("ens1f0")
        .numa(0)
        .vfs(8, |i| {
            VfSpec::new().driver("iavf").netdev(format!("ens1f0v{i}"))
        })
        .build()
        .unwrap();
    b.pf("0000:5e:00.0")
        .driver("i40e")
        .netdev("ens1f1")
        .numa(1)
        .vfs(4, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    // /dev/vfio nodes for the vfio VFs (plain files stand in; only existence is checked).
    let vfio = root.join("dev/vfio");
    std::fs::create_dir_all(&vfio).unwrap();
    std::fs::write(vfio.join("vfio"), "").unwrap();
    for g in 0..64 {
        std::fs::write(vfio.join(g.to_string()), "").unwrap();
    }
    b
}

fn options(root: &Path) -> AgentOptions {
    let cfg = root.join("config.yaml");
    if !cfg.exists() {
        std::fs::write(&cfg, CONFIG).unwrap();
    }
    let mut o = AgentOptions::rooted(root, cfg);
    o.podresources_interval = Duration::from_millis(200);
    o
}

async fn start(
    root: &Path,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<bool>,
) {
    let cancel = CancellationToken::new();
    let agent = Agent::start(options(root), cancel.clone())
        .await
        .expect("agent starts");
    let ready = agent.ready();
    let task = tokio::spawn(async move { agent.wait().await.expect("agent stops cleanly") });
    (cancel, task, ready)
}

async fn healthy_count(
    k: &FakeKubelet,
    resource: &str,
    n: usize,
) -> vfplug_kubelet::testing::Snapshot {
    k.wait_snapshot(resource, None, T, |s| s.healthy_ids().len() == n)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{resource}: no snapshot with {n} healthy devices: {e}; got {:?}",
                k.snapshots(resource).last().map(|s| s.healthy_ids())
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_pools_and_allocates_with_the_sriovdp_env_abi() {
    let dir = tempfile::tempdir().unwrap();
    let _node = build_node(dir.path());
    let kubelet = FakeKubelet::start(&dir.path().join("kubelet"))
        .await
        .unwrap();
    let (cancel, task, mut ready) = start(dir.path()).await;

    kubelet.wait_registrations(2, T).await.unwrap();
    let snap = healthy_count(&kubelet, NET, 8).await;
    assert!(
        snap.devices
            .iter()
            .all(|d| d.topology.as_ref().is_some_and(|t| t.nodes[0].id == 0))
    );
    healthy_count(&kubelet, VFIO, 4).await;
    tokio::time::timeout(T, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();

    let ids = snap.healthy_ids();
    let resp = kubelet
        .allocate(NET, vec![vec![ids[0].clone(), ids[1].clone()]])
        .await
        .unwrap();
    let envs = &resp.container_responses[0].envs;
    assert_eq!(
        envs["PCIDEVICE_VFPLUG_IO_NET"],
        format!("{},{}", ids[0], ids[1])
    );
    assert_eq!(
        envs["PCIDEVICE_VFPLUG_IO_NET_INFO"],
        format!(
            r#"{{"{a}":{{"generic":{{"deviceID":"{a}"}}}},"{b}":{{"generic":{{"deviceID":"{b}"}}}}}}"#,
            a = ids[0],
            b = ids[1]
        )
    );
    assert!(
        resp.container_responses[0].devices.is_empty(),
        "netdev mode has no device nodes"
    );
    // The device-info file of the spec is written for Multus.
    let info = std::fs::read_to_string(
        dir.path()
            .join("devinfo")
            .join(format!("vfplug.io-net-{}-device.json", ids[0])),
    )
    .unwrap();
    assert!(
        info.contains(r#""pci-address":""#) && info.contains("\"version\":\"1.1.0\""),
        "{info}"
    );

    let vm = healthy_count(&kubelet, VFIO, 4).await.healthy_ids();
    let resp = kubelet
        .allocate(VFIO, vec![vec![vm[0].clone()]])
        .await
        .unwrap();
    let paths: Vec<_> = resp.container_responses[0]
        .devices
        .iter()
        .map(|d| d.host_path.clone())
        .collect();
    assert!(paths.contains(&"/dev/vfio/vfio".to_owned()), "{paths:?}");
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("/dev/vfio/") && p != "/dev/vfio/vfio"),
        "{paths:?}"
    );
    let info = &resp.container_responses[0].envs["PCIDEVICE_VFPLUG_IO_VM_INFO"];
    assert!(
        info.contains(r#""vfio":{"dev-mount":"/dev/vfio/"#)
            && info.contains(r#""mount":"/dev/vfio/vfio""#),
        "{info}"
    );

    // An id that is not in the pool is refused with a gRPC error naming it.
    let err = kubelet
        .allocate(NET, vec![vec![vm[1].clone()]])
        .await
        .unwrap_err();
    assert!(err.message().contains(&vm[1]), "{err:?}");

    cancel.cancel();
    task.await.unwrap();
    // Sockets are removed on shutdown.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("kubelet/device-plugins"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("vfplug-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_pf_carrier_and_driver_and_reaches_the_kubelet() {
    let dir = tempfile::tempdir().unwrap();
    let node = build_node(dir.path());
    let kubelet = FakeKubelet::start(&dir.path().join("kubelet"))
        .await
        .unwrap();
    let (cancel, task, _) = start(dir.path()).await;
    healthy_count(&kubelet, NET, 8).await;

    let t0 = Instant::now();
    node.set_carrier("ens1f0", false).unwrap();
    healthy_count(&kubelet, NET, 0).await;
    eprintln!("carrier down -> kubelet snapshot: {:?}", t0.elapsed());
    node.set_carrier("ens1f0", true).unwrap();
    healthy_count(&kubelet, NET, 8).await;

    // A VF rebound away from the pool's driver leaves the pool (its selector names iavf).
    let vf = node.vf_address("0000:3b:00.0", 3).unwrap().to_string();
    node.rebind(&vf, Some("vfio-pci")).unwrap();
    let snap = kubelet
        .wait_snapshot(NET, None, T, |s| s.devices.len() == 7)
        .await
        .unwrap();
    assert!(!snap.devices.iter().any(|d| d.id == vf));
    // A vfio pool VF moved off vfio-pci stays listed but turns Unhealthy.
    let vm = node.vf_address("0000:5e:00.0", 0).unwrap().to_string();
    node.rebind(&vm, None).unwrap();
    let snap = healthy_count(&kubelet, VFIO, 3).await;
    assert!(
        snap.devices
            .iter()
            .any(|d| d.id == vm && d.health == "Unhealthy")
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replays_the_ledger_and_vfs_held_by_vfplug_are_unhealthy_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = build_node(dir.path());
    let held = node.vf_address("0000:3b:00.0", 5).unwrap();
    let half_done = node.vf_address("0000:3b:00.0", 6).unwrap();
    let kubelet = FakeKubelet::start(&dir.path().join("kubelet"))
        .await
        .unwrap();

    // First life: allocate two VFs through the kubelet.
    let (cancel, task, _) = start(dir.path()).await;
    let ids = healthy_count(&kubelet, NET, 8).await.healthy_ids();
    kubelet
        .allocate(NET, vec![vec![ids[0].clone(), ids[1].clone()]])
        .await
        .unwrap();
    cancel.cancel();
    task.await.unwrap();

    // While vfplugd is down, its ledger gains a VF reserved by a CNI attachment (as a crash right
    // after a Reserve would leave it).
    {
        let (mut wal, rec) = Wal::<Ledger, Record>::open(&dir.path().join("state")).unwrap();
        let mut ledger = rec.snapshot.unwrap_or_default();
        for r in &rec.records {
            ledger.apply(r).unwrap();
        }
        assert!(matches!(
            ledger.get(&ids[0].parse().unwrap()),
            Some(VfState::KubeletAllocated { .. })
        ));
        let owner = Owner {
            pod: "uid-1".into(),
            container_id: "c1".into(),
            ifname: "net1".into(),
        };
        let r = ledger.plan_reserve(held, &owner).unwrap();
        ledger.apply(&r).unwrap();
        wal.append(&r, true).unwrap();
        // ... and finished its ADD (a complete attachment record).
        let token = r.new_token().unwrap();
        let r = ledger
            .plan_advance(
                held,
                token,
                Step::Configure {
                    saved: SavedVfState::default(),
                    cni: Some(Box::default()),
                },
            )
            .unwrap();
        ledger.apply(&r).unwrap();
        wal.append(&r, true).unwrap();
        // A second attachment only got as far as its reservation: recovery at start undoes it.
        let half = Owner {
            pod: "uid-2".into(),
            container_id: "c2".into(),
            ifname: "net1".into(),
        };
        let r = ledger.plan_reserve(half_done, &half).unwrap();
        wal.append(&r, true).unwrap();
    }

    // Second life: capacity is unchanged, the kubelet's VFs stay healthy (they are the
    // kubelet's), the one a finished ADD holds is Unhealthy and Allocate refuses it; the
    // half-done one was released at start.
    kubelet.clear_snapshots();
    let (cancel, task, _) = start(dir.path()).await;
    let snap = healthy_count(&kubelet, NET, 7).await;
    assert_eq!(snap.devices.len(), 8);
    assert!(
        snap.devices
            .iter()
            .any(|d| d.id == held.to_string() && d.health == "Unhealthy")
    );
    let err = kubelet
        .allocate(NET, vec![vec![held.to_string()]])
        .await
        .unwrap_err();
    assert!(err.message().contains(&held.to_string()), "{err:?}");
    assert!(
        snap.devices
            .iter()
            .any(|d| d.id == half_done.to_string() && d.health == "Healthy"),
        "{snap:?}"
    );
    // The kubelet re-allocating a device it already holds (after its own restart) is fine.
    kubelet
        .allocate(NET, vec![vec![ids[0].clone()]])
        .await
        .unwrap();
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_keeps_unchanged_pools_and_rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let _node = build_node(dir.path());
    let kubelet = FakeKubelet::start(&dir.path().join("kubelet"))
        .await
        .unwrap();
    let (cancel, task, _) = start(dir.path()).await;
    kubelet.wait_registrations(2, T).await.unwrap();
    healthy_count(&kubelet, NET, 8).await;

    // A bad config (misplaced key) is rejected; the running pools stay.
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        CONFIG.replace(
            "    selectors: { pfNames: [\"ens1f1\"] }",
            "    rootDevice: x",
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(kubelet.accepted_registrations(), 2);

    // Narrowing the net pool and adding a pool: one new registration, the net pool's list shrinks
    // without re-registering.
    let new = CONFIG.replace(r#"pfNames: ["ens1f0"]"#, r#"pfNames: ["ens1f0#0-3"]"#)
        + "  - name: rest\n    selectors: { pfNames: [\"ens1f0#4-7\"] }\n";
    std::fs::write(&cfg, new).unwrap();
    kubelet.wait_registrations(3, T).await.unwrap();
    healthy_count(&kubelet, NET, 4).await;
    healthy_count(&kubelet, "vfplug.io/rest", 4).await;
    let per_net = kubelet
        .registrations()
        .iter()
        .filter(|r| r.resource_name == NET && r.accepted)
        .count();
    assert_eq!(per_net, 1, "an unchanged pool keeps its registration");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_leads_to_reregistration() {
    let dir = tempfile::tempdir().unwrap();
    let _node = build_node(dir.path());
    let kubelet = FakeKubelet::start(&dir.path().join("kubelet"))
        .await
        .unwrap();
    let (cancel, task, _) = start(dir.path()).await;
    kubelet.wait_registrations(2, T).await.unwrap();
    let t0 = Instant::now();
    kubelet.restart().unwrap();
    kubelet.wait_registrations(4, T).await.unwrap();
    eprintln!(
        "kubelet restart -> both pools registered again: {:?}",
        t0.elapsed()
    );
    healthy_count(&kubelet, NET, 8).await;
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_at_start_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let _node = build_node(dir.path());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "pools:\n  - name: a\n    selectors: { vendor: [\"8086\"] }\n",
    )
    .unwrap();
    let err = Agent::start(options(dir.path()), CancellationToken::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("vendor") && msg.contains("pools[0]"), "{msg}");
}
