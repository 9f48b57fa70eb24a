//! The demonstration behind `scripts/demo.sh`: the real `vfplugd` binary on a simulated SR-IOV
//! node (a fake sysfs tree laid out as the kernel does) with a kubelet stand-in speaking the real
//! device-plugin gRPC protocol over unix sockets. Each step prints what happened and how long it
//! took.
//!
//! `cargo run -p vfplugd --example demo -- [path/to/vfplugd] [work-dir]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

const NET: &str = "vfplug.io/net";
const VM: &str = "vfplug.io/vm";
const T: Duration = Duration::from_secs(15);

const CONFIG: &str = r#"# vfplug pools (YAML; sriov-network-device-plugin's JSON works too)
resourcePrefix: vfplug.io
pools:
  - name: net            # container pods: VF netdevs
    deviceMode: netdev
    health: { pfLinkDown: unhealthy }
    selectors: { pfNames: ["ens1f0"], drivers: ["iavf"] }
  - name: vm             # VM pods: VFs on vfio-pci
    deviceMode: vfio
    policy: numa
    selectors: { pfNames: ["ens1f1"] }
"#;

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn spawn_vfplugd(bin: &Path, root: &Path) -> Child {
    Command::new(bin)
        .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
        .args(["--kubelet-dir", root.join("kubelet").to_str().unwrap()])
        .args(["--state-dir", root.join("state").to_str().unwrap()])
        .args(["--socket", root.join("vfplugd.sock").to_str().unwrap()])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", root.join("config.yaml").to_str().unwrap()])
        .args(["--dev-root", root.join("dev").to_str().unwrap()])
        .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0", "--node-name", "demo-node"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start vfplugd")
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    println!("    vfplugd exited: {status}");
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bin = PathBuf::from(args.next().unwrap_or_else(|| "target/debug/vfplugd".into()));
    let keep = args.next().map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&root).unwrap();

    step(
        1,
        "simulated node: PF ens1f0 with 8 iavf VFs (NUMA 0), PF ens1f1 with 8 vfio-pci VFs (NUMA 1)",
    );
    let t = Instant::now();
    let mut node = SysfsBuilder::new(&root.join("sys"));
    node.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("ens1f0")
        .numa(0)
        .vfs(8, |i| {
            VfSpec::new().driver("iavf").netdev(format!("ens1f0v{i}"))
        })
        .build()
        .unwrap();
    node.pf("0000:5e:00.0")
        .driver("i40e")
        .netdev("ens1f1")
        .numa(1)
        .vfs(8, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    let vfio = root.join("dev/vfio");
    std::fs::create_dir_all(&vfio).unwrap();
    std::fs::write(vfio.join("vfio"), "").unwrap();
    for g in 0..64 {
        std::fs::write(vfio.join(g.to_string()), "").unwrap();
    }
    std::fs::write(root.join("config.yaml"), CONFIG).unwrap();
    println!(
        "    sysfs tree at {} ({:?})",
        root.join("sys").display(),
        t.elapsed()
    );

    step(
        2,
        "kubelet stand-in listening on device-plugins/kubelet.sock (real v1beta1 gRPC)",
    );
    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();

    step(
        3,
        "start vfplugd --sysfs-root --kubelet-dir --state-dir --config",
    );
    let t = Instant::now();
    let child = spawn_vfplugd(&bin, &root);
    kubelet
        .wait_registrations(2, T)
        .await
        .expect("both pools register");
    for r in kubelet.registrations() {
        println!(
            "    registered {} (endpoint {}, {})",
            r.resource_name, r.endpoint, r.version
        );
    }
    let net = kubelet
        .wait_snapshot(NET, None, T, |s| s.healthy_ids().len() == 8)
        .await
        .unwrap();
    let vm = kubelet
        .wait_snapshot(VM, None, T, |s| s.healthy_ids().len() == 8)
        .await
        .unwrap();
    println!(
        "    first snapshots: {NET} 8/8 healthy, {VM} 8/8 healthy ({:?} after start)",
        t.elapsed()
    );

    step(
        4,
        "kubelet asks for a preferred pair, then Allocate, for a VM pod (vfio pool, NUMA policy)",
    );
    let ids = vm.healthy_ids();
    let pick = kubelet.preferred(VM, ids.clone(), vec![], 2).await.unwrap();
    println!("    GetPreferredAllocation -> {pick:?}");
    let t = Instant::now();
    let resp = kubelet.allocate(VM, vec![pick.clone()]).await.unwrap();
    let c = &resp.container_responses[0];
    println!("    Allocate answered in {:?}", t.elapsed());
    for (k, v) in &c.envs {
        println!("    env {k}={v}");
    }
    for d in &c.devices {
        println!(
            "    device {} -> {} ({})",
            d.host_path, d.container_path, d.permissions
        );
    }

    step(
        5,
        "PF ens1f0 loses carrier: its VFs turn Unhealthy at the kubelet",
    );
    let t = Instant::now();
    node.set_carrier("ens1f0", false).unwrap();
    kubelet
        .wait_snapshot(NET, Some(t), T, |s| s.healthy_ids().is_empty())
        .await
        .unwrap();
    println!("    0/8 healthy after {:?}", t.elapsed());
    node.set_carrier("ens1f0", true).unwrap();
    kubelet
        .wait_snapshot(NET, None, T, |s| s.healthy_ids().len() == 8)
        .await
        .unwrap();
    println!("    carrier back: 8/8 healthy");

    step(
        6,
        "sriov_numvfs on ens1f0 goes 8 -> 4: the pool shrinks without a restart",
    );
    let t = Instant::now();
    node.set_num_vfs("0000:3b:00.0", 4).unwrap();
    kubelet
        .wait_snapshot(NET, Some(t), T, |s| s.devices.len() == 4)
        .await
        .unwrap();
    println!("    {NET} lists 4 devices after {:?}", t.elapsed());

    step(
        7,
        "restart vfplugd: the ledger replays; the VM pod's VFs stay the kubelet's",
    );
    stop(child);
    kubelet.clear_snapshots();
    let t = Instant::now();
    let child = spawn_vfplugd(&bin, &root);
    kubelet.wait_registrations(4, T).await.unwrap();
    let vm2 = kubelet
        .wait_snapshot(VM, None, T, |s| s.devices.len() == 8)
        .await
        .unwrap();
    println!(
        "    re-registered in {:?}; {VM}: {} devices, {} healthy (kubelet-held VFs stay healthy)",
        t.elapsed(),
        vm2.devices.len(),
        vm2.healthy_ids().len()
    );
    let ledger = std::fs::read_to_string(root.join("state/ledger.wal")).unwrap_or_default();
    println!(
        "    ledger: {} records in {}",
        ledger.lines().count(),
        root.join("state/ledger.wal").display()
    );
    let _ = net;

    step(
        8,
        "kubelet restarts (deletes every socket): vfplugd re-registers",
    );
    let t = Instant::now();
    kubelet.restart().unwrap();
    kubelet.wait_registrations(6, T).await.unwrap();
    println!("    both pools registered again after {:?}", t.elapsed());

    stop(child);
    if keep.is_some() {
        println!("\nwork dir kept at {}", root.display());
    }
    println!("\ndemo: OK");
}
