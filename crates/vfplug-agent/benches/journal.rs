//! The ledger journal: durable commits per second with group commit (one fdatasync per batch)
//! and with one fdatasync per record, for 1, 8 and 64 concurrent committers, each awaiting its
//! ticket before the next commit (as the CNI sagas do). The state directory is on the disk
//! under the target dir, not on tmpfs, so the syncs are real.
//!
//! `cargo bench -p vfplug-agent --bench journal` (prints a table; no assertions on time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfplug_agent::store::{Journal, SyncMode, spawn_writer};
use vfplug_agent::wal::Wal;
use vfplug_core::PciAddress;
use vfplug_core::ledger::{Ledger, Owner, Record};

fn pci(i: u32) -> PciAddress {
    PciAddress::new(
        0,
        0x10 + (i / 256) as u8,
        ((i % 256) / 8) as u8,
        (i % 8) as u8,
    )
    .unwrap()
}

/// Returns (commits per second, syncs made, p50, p99 of one commit's wait).
async fn run(mode: SyncMode, committers: u32, per: u32) -> (f64, u64, Duration, Duration) {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
        });
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let (wal, rec) = Wal::<Ledger, Record>::open(dir.path()).unwrap();
    assert!(rec.records.is_empty());
    let journal = Journal::new();
    let mut ledger = Ledger::new();
    let present: BTreeSet<_> = (0..committers).map(pci).collect();
    let recs = ledger.plan_inventory(&present);
    for r in &recs {
        ledger.apply(r).unwrap();
    }
    // The writer's shadow starts as the (empty) log replays: the inventory is written below.
    let writer = spawn_writer(Arc::clone(&journal), wal, Ledger::new(), 1 << 30, mode).unwrap();
    let t = journal.enqueue(recs);
    journal.durable(t).await.unwrap();
    let syncs0 = journal.progress().borrow().syncs;
    let live = Arc::new(Mutex::new(ledger));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..committers {
        let live = Arc::clone(&live);
        let journal = Arc::clone(&journal);
        tasks.push(tokio::spawn(async move {
            let owner = Owner {
                pod: format!("ns/p{c}").into(),
                container_id: format!("c{c}"),
                ifname: "net1".into(),
            };
            let mut waits = Vec::with_capacity(per as usize);
            for _ in 0..per {
                // Reserve, then release: two records per round, each awaited.
                for step in 0..2 {
                    let t = {
                        let mut l = live.lock().unwrap();
                        let r = if step == 0 {
                            l.plan_reserve(pci(c), &owner).unwrap()
                        } else {
                            let tok = l.get(&pci(c)).unwrap().lease().unwrap().token;
                            l.plan_release(pci(c), tok).unwrap()
                        };
                        l.apply(&r).unwrap();
                        journal.enqueue([r])
                    };
                    let w = Instant::now();
                    journal.durable(t).await.unwrap();
                    waits.push(w.elapsed());
                }
            }
            waits
        }));
    }
    let mut waits = Vec::new();
    for t in tasks {
        waits.extend(t.await.unwrap());
    }
    let elapsed = t0.elapsed();
    let syncs = journal.progress().borrow().syncs - syncs0;
    journal.close();
    writer.join().unwrap();
    waits.sort();
    let p = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize];
    (
        f64::from(committers * per * 2) / elapsed.as_secs_f64(),
        syncs,
        p(0.5),
        p(0.99),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("| committers | mode | commits/s | fdatasyncs | wait p50 | wait p99 |");
    println!("|---|---|---|---|---|---|");
    for committers in [1u32, 8, 64] {
        let per = 2000 / committers.max(1);
        for mode in [SyncMode::EachRecord, SyncMode::Group] {
            let (rate, syncs, p50, p99) = run(mode, committers, per).await;
            println!("| {committers} | {mode:?} | {rate:.0} | {syncs} | {p50:.2?} | {p99:.2?} |");
        }
    }
}
