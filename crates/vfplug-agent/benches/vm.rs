//! vfplug's own share of a VM hot-plug and unplug, and 8 VMs × 8 VFs at once (issue 9).
//!
//! The executor runs a CNI ADD with a VM (reserve, settings through the simulated PF, memlock,
//! root port lookup, `device_add`, presence check) and a DEL (`device_del`, the guest's
//! `DEVICE_DELETED`, restore, reset, Free) against a fake QEMU that answers at once over a real
//! unix socket. QEMU's share is measured by replaying the same QMP exchanges on a second
//! connection to the same fake QEMU right after; vfplug's own share is the paired difference.
//! The ledger is in memory, or behind the agent's journal (group commit, fdatasync) on disk
//! (under the target dir) and on tmpfs (`VFPLUG_BENCH_TMPFS`, default /dev/shm).
//!
//! `cargo bench -p vfplug-agent --bench vm` (prints tables; `VFPLUG_BENCH_N` runs, default 300).
//! The 8 × 8 leak check is an assertion; every time is a figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vm_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfplug_qmp::{DeviceAdd, Qmp, QueryMemorySizeSummary, UnplugOutcome};
use vm_common::{Store, attach_detach_all, node, pci, q};

struct Row {
    add: Vec<Duration>,
    qadd: Vec<Duration>,
    own_add: Vec<Duration>,
    del: Vec<Duration>,
    qdel: Vec<Duration>,
    own_del: Vec<Duration>,
    add_records: u64,
    del_records: u64,
}

/// The QMP exchanges of one attach, bare: what QEMU (here: the fake) costs.
async fn qemu_attach(q: &Qmp) -> Duration {
    let t = Instant::now();
    q.call(&QueryMemorySizeSummary {}).await.unwrap();
    q.peripheral_ids().await.unwrap();
    q.query_pci().await.unwrap();
    q.device_add(&DeviceAdd::vfio_pci(pci(0), "bench-q", "vfplug-rp0", None))
        .await
        .unwrap();
    assert!(
        q.peripheral_ids()
            .await
            .unwrap()
            .contains(&"bench-q".to_owned())
    );
    t.elapsed()
}

/// The QMP exchange of one detach, bare: `device_del` with its waiter, until `DEVICE_DELETED`.
async fn qemu_detach(q: &Qmp) -> Duration {
    let t = Instant::now();
    let out = q
        .device_del_and_wait("bench-q", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(out, UnplugOutcome::Deleted);
    t.elapsed()
}

fn paired(a: &[Duration], b: &[Duration]) -> Vec<Duration> {
    let mut v: Vec<Duration> = a.iter().zip(b).map(|(x, y)| x.saturating_sub(*y)).collect();
    v.sort();
    v
}

async fn sequential(store: Store, n: usize) -> Row {
    let node = node(1, 1, store).await;
    let bare = Qmp::connect(&node.qemus[0].socket, Duration::from_secs(5))
        .await
        .unwrap();
    let (mut add, mut qadd, mut del, mut qdel) = (vec![], vec![], vec![], vec![]);
    let (mut add_records, mut del_records) = (0, 0);
    let warmup = 20;
    for i in 0..warmup + n {
        let c0 = node.commits();
        let t = Instant::now();
        node.exec.add(node.add_request(0, 0)).await.unwrap();
        let a = t.elapsed();
        let c1 = node.commits();
        let t = Instant::now();
        let d = node
            .exec
            .del("sb-0", "net0", Duration::from_secs(5))
            .await
            .unwrap();
        let dd = t.elapsed();
        assert!(d.finalized.released, "{d:?}");
        let c2 = node.commits();
        // The same QMP exchanges, bare, on the same fake QEMU, with the same port free.
        let qa = qemu_attach(&bare).await;
        let qd = qemu_detach(&bare).await;
        if i >= warmup {
            add.push(a);
            del.push(dd);
            qadd.push(qa);
            qdel.push(qd);
            (add_records, del_records) = (c1 - c0, c2 - c1);
        }
    }
    let own_add = paired(&add, &qadd);
    let own_del = paired(&del, &qdel);
    for v in [&mut add, &mut qadd, &mut del, &mut qdel] {
        v.sort();
    }
    node.exec.close_vms();
    Row {
        add,
        qadd,
        own_add,
        del,
        qdel,
        own_del,
        add_records,
        del_records,
    }
}

/// One durable record's cost on the journal: reserve/release of one VF, each awaited.
async fn per_record(base: PathBuf, n: usize) -> Vec<Duration> {
    let node = node(1, 1, Store::Journal(base)).await;
    let l = node.exec.ledger();
    let owner = node.add_request(0, 0).owner;
    let mut v = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let t = Instant::now();
        let r = l.commit(|l| l.plan_reserve(pci(0), &owner)).await.unwrap();
        v.push(t.elapsed());
        let tok = r.new_token().unwrap();
        let t = Instant::now();
        l.commit(|l| l.plan_release(pci(0), tok)).await.unwrap();
        v.push(t.elapsed());
    }
    v.sort();
    v
}

use vfplug_executor::LedgerPort;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("VFPLUG_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("vfplug-bench-vm");
    let tmpfs =
        PathBuf::from(std::env::var_os("VFPLUG_BENCH_TMPFS").unwrap_or_else(|| "/dev/shm".into()))
            .join("vfplug-bench-vm");
    let stores = [
        ("memory", Store::Memory),
        ("journal on disk", Store::Journal(target.clone())),
        ("journal on tmpfs", Store::Journal(tmpfs.clone())),
    ];
    println!("ADD/DEL of one VF into one VM, n={n} each (ms; own = total − QEMU, paired per run)");
    println!(
        "| ledger | ADD total p50/p99 | QEMU p50/p99 | own p50/p99 | DEL total p50/p99 | QEMU p50/p99 | own p50/p99 | records ADD/DEL |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, store) in stores {
        let r = sequential(store, n).await;
        let pq = |v: &[Duration]| format!("{:.3} / {:.3}", q(v, 0.5), q(v, 0.99));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} / {} |",
            pq(&r.add),
            pq(&r.qadd),
            pq(&r.own_add),
            pq(&r.del),
            pq(&r.qdel),
            pq(&r.own_del),
            r.add_records,
            r.del_records
        );
    }
    println!();
    println!(
        "One durable ledger record (commit awaited, group commit, one committer), n={}",
        2 * n
    );
    for (name, base) in [("disk", target.clone()), ("tmpfs", tmpfs.clone())] {
        let v = per_record(base, n).await;
        println!(
            "| {name} | p50 {:.3} ms | p99 {:.3} ms |",
            q(&v, 0.5),
            q(&v, 0.99)
        );
    }
    println!();
    for (name, store) in [
        ("memory", Store::Memory),
        ("journal on disk", Store::Journal(target.clone())),
    ] {
        let node = node(8, 8, store).await;
        let c = attach_detach_all(&node).await;
        println!(
            "8 VMs x 8 VFs, ledger {name}: 0 errors, 0 leaks; attach wall {:.1} ms (each p50 {:.1} / p99 {:.1}), detach wall {:.1} ms (each p50 {:.1} / p99 {:.1})",
            c.attach_wall.as_secs_f64() * 1e3,
            q(&c.attach_each, 0.5),
            q(&c.attach_each, 0.99),
            c.detach_wall.as_secs_f64() * 1e3,
            q(&c.detach_each, 0.5),
            q(&c.detach_each, 0.99),
        );
        node.exec.close_vms();
    }
    let _ = std::fs::remove_dir_all(&target);
    let _ = std::fs::remove_dir_all(&tmpfs);
}
