//! Benchmark of the real `vfplugd` binary on a simulated 8 PF x 256 VF node (2048 VFs) with a
//! kubelet stand-in over real gRPC: time to the first full snapshot, Allocate p50/p99 for 1 and
//! 8 VFs (idle, and while CNI ADD/DEL run in a loop beside it through the node API on a ninth
//! PF's vfio pool), PF carrier change -> kubelet snapshot, and the daemon's resident memory.
//!
//! `cargo bench -p vfplugd --bench node` (prints a table; no assertions on time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

const RES: &str = "vfplug.io/net";
const T: Duration = Duration::from_secs(60);

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut b = SysfsBuilder::new(&root.join("sys"));
    for pf in 0..8u32 {
        let pci = format!("0000:{:02x}:00.0", 0x10 + pf * 0x10);
        let netdev = format!("ens{pf}f0");
        b.pf(&pci)
            .driver("ice")
            .netdev(&netdev)
            .numa((pf / 4) as i32)
            .total_vfs(256)
            .vfs(256, |i| {
                VfSpec::new().driver("iavf").netdev(format!("{netdev}v{i}"))
            })
            .build()
            .unwrap();
    }
    // A ninth PF whose VFs sit on vfio-pci: the node-API ADD/DEL loop runs on them (vfio mode
    // needs no netdev, so the loop measures vfplugd, not the kernel's netns moves).
    b.pf("0000:a0:00.0")
        .driver("ice")
        .netdev("ens8f0")
        .total_vfs(16)
        .vfs(16, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    let vm_vfs: Vec<String> = (0..16)
        .map(|i| b.vf_address("0000:a0:00.0", i).unwrap().to_string())
        .collect();
    std::fs::write(
        root.join("config.yaml"),
        "pools:\n  - name: net\n    health: { pfLinkDown: unhealthy }\n    selectors: { drivers: [iavf] }\n  - name: vm\n    deviceMode: vfio\n    selectors: { pfNames: [ens8f0] }\n",
    )
    .unwrap();
    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();

    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfplugd"))
        .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
        .args(["--kubelet-dir", root.join("kubelet").to_str().unwrap()])
        .args(["--state-dir", root.join("state").to_str().unwrap()])
        .args(["--socket", root.join("vfplugd.sock").to_str().unwrap()])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", root.join("config.yaml").to_str().unwrap()])
        .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let snap = kubelet
        .wait_snapshot(RES, None, T, |s| s.healthy_ids().len() == 2048)
        .await
        .unwrap();
    let first = t0.elapsed();
    let ids = snap.healthy_ids();

    let mut one = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        kubelet
            .allocate(RES, vec![vec![ids[i % ids.len()].clone()]])
            .await
            .unwrap();
        one.push(t.elapsed());
    }
    let mut eight = Vec::new();
    for i in 0..500 {
        let req: Vec<String> = (0..8)
            .map(|k| ids[(i * 8 + k) % ids.len()].clone())
            .collect();
        let t = Instant::now();
        kubelet.allocate(RES, vec![req]).await.unwrap();
        eight.push(t.elapsed());
    }

    // The same while CNI ADD/DEL run in a loop beside it (4 attachments at a time, each ADD
    // and DEL making two or three durable ledger commits).
    let sock = root.join("vfplugd.sock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for (w, dev) in vm_vfs.iter().take(4).enumerate() {
        let sock = sock.clone();
        let stop = std::sync::Arc::clone(&stop);
        let dev = dev.clone();
        loops.push(tokio::spawn(async move {
            let ch = vfplug_api::connect(&sock, Duration::from_secs(5))
                .await
                .unwrap();
            let mut c = vfplug_api::v1::node_client::NodeClient::new(ch);
            let att = vfplug_api::v1::Attachment {
                container_id: format!("bench-{w}"),
                ifname: "net1".into(),
                pod_uid: format!("uid-{w}"),
                ..Default::default()
            };
            let (mut adds, mut dels) = (Vec::new(), Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                c.add(vfplug_api::v1::AddRequest {
                    attachment: Some(att.clone()),
                    netns: "/var/run/netns/bench".into(),
                    network: "bench".into(),
                    device_id: dev.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
                adds.push(t.elapsed());
                let t = Instant::now();
                let d = c
                    .del(vfplug_api::v1::DelRequest {
                        attachment: Some(att.clone()),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(d.released, "{d:?}");
                dels.push(t.elapsed());
            }
            (adds, dels)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut one_busy = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        kubelet
            .allocate(RES, vec![vec![ids[i % ids.len()].clone()]])
            .await
            .unwrap();
        one_busy.push(t.elapsed());
    }
    let mut eight_busy = Vec::new();
    for i in 0..500 {
        let req: Vec<String> = (0..8)
            .map(|k| ids[(i * 8 + k) % ids.len()].clone())
            .collect();
        let t = Instant::now();
        kubelet.allocate(RES, vec![req]).await.unwrap();
        eight_busy.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for l in loops {
        let (a, d) = l.await.unwrap();
        adds.extend(a);
        dels.extend(d);
    }

    let mut health = Vec::new();
    for round in 0..10 {
        let up = round % 2 == 1;
        let t = Instant::now();
        b.set_carrier("ens3f0", up).unwrap();
        let want = if up { 2048 } else { 2048 - 256 };
        kubelet
            .wait_snapshot(RES, Some(t), T, |s| s.healthy_ids().len() == want)
            .await
            .unwrap();
        health.push(t.elapsed());
    }
    let rss = rss_kib(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    println!(
        "vfplugd on 8 PFs x 256 VFs (2048 VFs), debug={}",
        cfg!(debug_assertions)
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| start -> first full ListAndWatch snapshot (scan, ledger, registration) | {first:?} |"
    );
    println!(
        "| Allocate 1 VF over gRPC, p50 / p99 (1000 calls) | {:?} / {:?} |",
        pct(&mut one, 0.5),
        pct(&mut one, 0.99)
    );
    println!(
        "| Allocate 8 VFs over gRPC, p50 / p99 (500 calls) | {:?} / {:?} |",
        pct(&mut eight, 0.5),
        pct(&mut eight, 0.99)
    );
    println!(
        "| Allocate 1 VF while CNI ADD/DEL loop beside it, p50 / p99 (1000 calls) | {:?} / {:?} |",
        pct(&mut one_busy, 0.5),
        pct(&mut one_busy, 0.99)
    );
    println!(
        "| Allocate 8 VFs while CNI ADD/DEL loop beside it, p50 / p99 (500 calls) | {:?} / {:?} |",
        pct(&mut eight_busy, 0.5),
        pct(&mut eight_busy, 0.99)
    );
    println!(
        "| node-API ADD / DEL over gRPC meanwhile (vfio pool, simulated PF), p50 / p99 (n={}) | {:?} / {:?} ; {:?} / {:?} |",
        adds.len(),
        pct(&mut adds, 0.5),
        pct(&mut adds, 0.99),
        pct(&mut dels, 0.5),
        pct(&mut dels, 0.99)
    );
    println!(
        "| PF carrier change -> kubelet snapshot, p50 / max (10 flips) | {:?} / {:?} |",
        pct(&mut health, 0.5),
        pct(&mut health, 1.0)
    );
    println!(
        "| vfplugd RSS after all of the above | {:.1} MiB |",
        rss as f64 / 1024.0
    );
}
