//! The ledger store's durable half: a journal with group commit, off the hot path.
//!
//! The live [`Ledger`](vfplug_core::Ledger) sits in the agent's state under a short lock. A
//! change is planned against it, *applied in memory* (which re-validates the record, so a record
//! the ledger refuses is never written) and appended to this journal's queue — all under that
//! lock, so the order of the log is the order of the applies and a replay equals the live
//! ledger. The lock is then dropped: nobody waits for the disk while holding it, so readers
//! (Allocate, ListAndWatch, STATUS, List) never wait for an fsync.
//!
//! One writer thread takes everything queued, appends it to the WAL and makes it durable with
//! *one* `fdatasync` for the whole batch (group commit: commits that arrive while a sync runs
//! share the next one). A caller that is about to act on its record (touch the host, answer the
//! CNI) first awaits its [`Ticket`]: the write-ahead rule holds per caller, without one fsync per
//! record. Records that nobody awaits (the kubelet's Allocate) become durable with the next batch.
//!
//! The writer keeps its own *shadow* ledger by applying each record it writes: snapshots
//! (compaction) are taken from it, so a snapshot always matches the log position exactly, and a
//! record that the shadow refuses (live and disk would disagree) stops the journal.
//!
//! When a write fails, the journal is *failed*: every waiting and later ticket gets
//! [`StoreError::Failed`], the agent reports not-ready and exits non-zero (its supervisor
//! restarts it, and the replay starts from what is really on disk).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use vfplug_core::ledger::{Ledger, Record};

use crate::wal::Wal;

/// Why a record did not become durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The journal could not write or sync; nothing after the failure is durable.
    #[error("ledger journal failed: {0}")]
    Failed(Arc<str>),
    /// The journal was closed (shutdown) before the record was written.
    #[error("ledger journal closed")]
    Closed,
}

/// A position in the journal: durable once the writer has synced up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a ticket is how a caller waits until its record is durable"]
pub struct Ticket(u64);

/// What the writer has made durable so far.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    /// Records durable since the journal opened (a count, not the WAL's sequence number).
    pub upto: u64,
    /// Set once a write failed; sticky.
    pub failed: Option<Arc<str>>,
    /// Set once the writer stopped (after `close`).
    pub closed: bool,
    /// How many syncs the writer made (group commit: fewer than records).
    pub syncs: u64,
}

#[derive(Debug, Default)]
struct Queue {
    records: Vec<Record>,
    /// Records ever enqueued.
    enqueued: u64,
    /// Someone may wait for what is queued (or written but not yet synced): sync it.
    needs_sync: bool,
    closed: bool,
}

/// How the writer syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// One fdatasync per batch of everything queued (the default).
    Group,
    /// One fdatasync per record (for comparison in benchmarks).
    EachRecord,
}

/// The journal. See the module docs.
#[derive(Debug)]
pub struct Journal {
    queue: Mutex<Queue>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Journal {
    /// A journal with no writer yet (see [`spawn_writer`]).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::default(),
            wake: Condvar::new(),
            durable: watch::Sender::new(Durable::default()),
        })
    }

    /// Queues records that were just applied to the live ledger, in apply order, to be made
    /// durable (the caller may await the ticket before acting). Call it under the same lock as
    /// the apply. Never blocks on I/O.
    pub fn enqueue(&self, records: impl IntoIterator<Item = Record>) -> Ticket {
        self.push(records, true)
    }

    /// As [`Self::enqueue`] for records nobody acts on (what the kubelet did, inventory): they
    /// are written with the next batch but synced only with the next record that needs it, so
    /// Allocate adds no fdatasync to the disk's work. A crash may lose them; their source (the
    /// kubelet's checkpoint and PodResources, sysfs) gives them again.
    pub fn enqueue_lazy(&self, records: impl IntoIterator<Item = Record>) -> Ticket {
        self.push(records, false)
    }

    fn push(&self, records: impl IntoIterator<Item = Record>, sync: bool) -> Ticket {
        let mut q = lock(&self.queue);
        let before = q.records.len();
        q.records.extend(records);
        let added = (q.records.len() - before) as u64;
        q.enqueued += added;
        q.needs_sync |= sync;
        let t = Ticket(q.enqueued);
        drop(q);
        if added > 0 || sync {
            self.wake.notify_one();
        }
        t
    }

    /// Waits until every record up to `ticket` is on stable storage.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.upto >= ticket.0 || d.failed.is_some() || d.closed)
            .await
            .map_err(|_| StoreError::Closed)?;
        if d.upto >= ticket.0 {
            Ok(())
        } else if let Some(f) = &d.failed {
            Err(StoreError::Failed(Arc::clone(f)))
        } else {
            Err(StoreError::Closed)
        }
    }

    /// The writer's progress (for metrics, readiness and tests).
    pub fn progress(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }

    /// Asks the writer to write what is queued and stop.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake.notify_one();
    }
}

/// Starts the writer thread over `wal`, whose contents replay to `shadow`. Snapshots are
/// written every `compact_after` records.
pub fn spawn_writer(
    journal: Arc<Journal>,
    wal: Wal<Ledger, Record>,
    shadow: Ledger,
    compact_after: usize,
    mode: SyncMode,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vfplug-ledger".into())
        .spawn(move || writer(&journal, wal, shadow, compact_after, mode))
}

fn writer(
    journal: &Journal,
    mut wal: Wal<Ledger, Record>,
    mut shadow: Ledger,
    compact_after: usize,
    mode: SyncMode,
) {
    let span = tracing::info_span!("ledger_writer");
    let _e = span.enter();
    // Records written but not yet synced (lazy ones), and how far the log is written.
    let mut unsynced = false;
    loop {
        let (batch, upto, closed, sync) = {
            let mut q = lock(&journal.queue);
            while q.records.is_empty() && !q.closed && !(q.needs_sync && unsynced) {
                if q.needs_sync && !unsynced {
                    // Everything written is synced already: nothing to wait for.
                    q.needs_sync = false;
                    let upto = q.enqueued;
                    journal.durable.send_modify(|d| d.upto = d.upto.max(upto));
                }
                q = journal
                    .wake
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            let sync = std::mem::take(&mut q.needs_sync) || q.closed;
            (std::mem::take(&mut q.records), q.enqueued, q.closed, sync)
        };
        if !batch.is_empty() || (sync && unsynced) {
            match write_batch(&mut wal, &mut shadow, &batch, mode, sync) {
                Ok(syncs) => {
                    unsynced = !sync;
                    journal.durable.send_modify(|d| {
                        if sync {
                            d.upto = upto;
                        }
                        d.syncs += syncs;
                    });
                }
                Err(msg) => {
                    error!(error = %msg, "ledger journal failed; nothing more becomes durable");
                    let msg: Arc<str> = msg.into();
                    journal.durable.send_modify(|d| d.failed = Some(msg));
                    return;
                }
            }
            debug!(records = batch.len(), "ledger batch durable");
            if wal.records_since_snapshot() >= compact_after {
                match wal.compact(&shadow) {
                    Ok(()) => debug!("ledger compacted into a snapshot"),
                    Err(e) => warn!(error = %e, "ledger compaction failed; will retry"),
                }
            }
        }
        if closed {
            // Nothing can be queued after close that anyone may act on: callers wait for
            // tickets, and those now fail with Closed.
            info!("ledger journal closed");
            journal.durable.send_modify(|d| d.closed = true);
            return;
        }
    }
}

fn write_batch(
    wal: &mut Wal<Ledger, Record>,
    shadow: &mut Ledger,
    batch: &[Record],
    mode: SyncMode,
    sync: bool,
) -> Result<u64, String> {
    let mut syncs = 0;
    for r in batch {
        // The live ledger accepted this record in this order; a refusal here means live and disk
        // would disagree: stop rather than write it.
        shadow
            .apply(r)
            .map_err(|e| format!("record refused by the replayed ledger: {e}"))?;
        let each = sync && mode == SyncMode::EachRecord;
        wal.append(r, each).map_err(|e| e.to_string())?;
        if each {
            syncs += 1;
        }
    }
    if sync && (mode == SyncMode::Group || batch.is_empty()) {
        wal.sync().map_err(|e| e.to_string())?;
        syncs += 1;
    }
    Ok(syncs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use vfplug_core::{Owner, PciAddress};

    use super::*;

    fn pci(i: u8) -> PciAddress {
        PciAddress::new(0, 0x3b, i >> 3, i & 7).unwrap()
    }

    fn owner(n: u8) -> Owner {
        Owner {
            pod: format!("ns/pod-{n}").into(),
            container_id: format!("c{n}"),
            ifname: "net1".into(),
        }
    }

    fn open(dir: &std::path::Path) -> (Wal<Ledger, Record>, Ledger) {
        let (wal, rec) = Wal::<Ledger, Record>::open(dir).unwrap();
        let mut l = rec.snapshot.unwrap_or_default();
        for r in &rec.records {
            l.apply(r).unwrap();
        }
        (wal, l)
    }

    #[tokio::test]
    async fn concurrent_commits_share_syncs_and_replay_equals_live() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, ledger) = open(dir.path());
        let journal = Journal::new();
        let writer = spawn_writer(
            Arc::clone(&journal),
            wal,
            ledger.clone(),
            16,
            SyncMode::Group,
        )
        .unwrap();
        let live = Arc::new(Mutex::new(ledger));
        let t = {
            let mut l = live.lock().unwrap();
            let present: BTreeSet<_> = (0..64).map(pci).collect();
            let recs = l.plan_inventory(&present);
            for r in &recs {
                l.apply(r).unwrap();
            }
            journal.enqueue(recs)
        };
        journal.durable(t).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let live = Arc::clone(&live);
            let journal = Arc::clone(&journal);
            tasks.push(tokio::spawn(async move {
                let t = {
                    let mut l = live.lock().unwrap();
                    let r = l.plan_reserve(pci(i), &owner(i)).unwrap();
                    l.apply(&r).unwrap();
                    journal.enqueue([r])
                };
                journal.durable(t).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let syncs = journal.progress().borrow().syncs;
        journal.close();
        writer.join().unwrap();
        // 65 batches at most; group commit usually needs far fewer syncs than records.
        assert!(syncs <= 65, "{syncs}");
        let (_wal, replayed) = open(dir.path());
        assert_eq!(replayed, *live.lock().unwrap());
    }

    #[tokio::test]
    async fn lazy_records_cost_no_sync_until_someone_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, ledger) = open(dir.path());
        let journal = Journal::new();
        let writer = spawn_writer(
            Arc::clone(&journal),
            wal,
            ledger.clone(),
            1000,
            SyncMode::Group,
        )
        .unwrap();
        let mut live = ledger;
        let recs = live.plan_inventory(&(0..4).map(pci).collect());
        for r in &recs {
            live.apply(r).unwrap();
        }
        let lazy = journal.enqueue_lazy(recs);
        // Written soon, but not synced: the durable mark stays behind and no sync is counted.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let d = journal.progress().borrow().clone();
        assert_eq!((d.upto, d.syncs), (0, 0), "{d:?}");
        // Someone who needs durability (an empty batch will do) gets one sync for all of it.
        let t = journal.enqueue([]);
        assert!(t >= lazy);
        journal.durable(t).await.unwrap();
        journal.durable(lazy).await.unwrap();
        assert_eq!(journal.progress().borrow().syncs, 1);
        journal.close();
        writer.join().unwrap();
        assert_eq!(open(dir.path()).1, live);
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, ledger) = open(dir.path());
        let journal = Journal::new();
        // The shadow disagrees with what will be enqueued (it lacks the VF): the writer must
        // refuse to write the record and fail the journal.
        let writer = spawn_writer(Arc::clone(&journal), wal, ledger, 16, SyncMode::Group).unwrap();
        let mut live = Ledger::new();
        let recs = live.plan_inventory(&[pci(0)].into_iter().collect());
        for r in &recs {
            live.apply(r).unwrap();
        }
        let r = live.plan_reserve(pci(0), &owner(0)).unwrap();
        live.apply(&r).unwrap();
        let t = journal.enqueue([r]);
        let err = journal.durable(t).await.unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        writer.join().unwrap();
        let later = journal.enqueue(recs);
        assert!(journal.durable(later).await.is_err());
        // Nothing was written.
        let (_wal, replayed) = open(dir.path());
        assert!(replayed.is_empty());
    }

    /// Crash injection: while commits run (some awaited, some not), the disk is copied at a
    /// random moment and cut at a random byte (a torn tail), as a power cut would leave it.
    /// Replaying the copy must give exactly the live ledger after some prefix of the committed
    /// records — never a record out of order, never one the live ledger refused — and that
    /// prefix must include every record whose ticket had resolved before the copy.
    mod crash {
        use proptest::prelude::*;

        use super::*;

        fn replay(dir: &std::path::Path) -> Ledger {
            let (_w, rec) = Wal::<Ledger, Record>::open(dir).unwrap();
            let mut l = rec.snapshot.unwrap_or_default();
            for r in &rec.records {
                l.apply(r).unwrap();
            }
            l
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            #[test]
            fn a_copy_of_the_disk_at_any_moment_replays_to_a_durable_prefix(
                ops in proptest::collection::vec((0u8..16, 0u8..4, any::<bool>()), 1..60),
                copy_at in 0usize..60,
                cut in 0usize..200,
                compact_after in 4usize..40,
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let copy = tempfile::tempdir().unwrap();
                    let (wal, ledger) = open(dir.path());
                    let journal = Journal::new();
                    let writer = spawn_writer(
                        Arc::clone(&journal), wal, ledger.clone(), compact_after, SyncMode::Group,
                    ).unwrap();
                    let mut live = ledger;
                    let mut history = vec![live.clone()];
                    let present: BTreeSet<_> = (0..16).map(pci).collect();
                    let recs = live.plan_inventory(&present);
                    for r in &recs {
                        live.apply(r).unwrap();
                        history.push(live.clone());
                    }
                    let t = journal.enqueue(recs);
                    journal.durable(t).await.unwrap();
                    let mut durable_len = history.len();
                    let mut copied: Option<usize> = None;
                    for (i, (vf, op, wait)) in ops.iter().enumerate() {
                        if i == copy_at.min(ops.len() - 1) {
                            for f in ["ledger.wal", "ledger.snapshot.json"] {
                                if let Ok(b) = std::fs::read(dir.path().join(f)) {
                                    std::fs::write(copy.path().join(f), b).unwrap();
                                }
                            }
                            copied = Some(durable_len);
                        }
                        let p = pci(*vf);
                        let plan = match op {
                            0 => live.plan_reserve(p, &owner(*vf)),
                            1 => match live.get(&p).and_then(|s| s.lease()).map(|l| l.token) {
                                Some(t) => live.plan_release(p, t),
                                None => continue,
                            },
                            2 => live.plan_kubelet_allocate(p, None),
                            _ => live.plan_quarantine(p, "test"),
                        };
                        let Ok(r) = plan else { continue };
                        live.apply(&r).unwrap();
                        history.push(live.clone());
                        let t = journal.enqueue([r]);
                        if *wait {
                            journal.durable(t).await.unwrap();
                            durable_len = history.len();
                        }
                    }
                    journal.close();
                    writer.join().unwrap();
                    // The whole run is durable after close.
                    prop_assert_eq!(&replay(dir.path()), &live);
                    // The copy replays to a prefix at least as long as what was durable.
                    let min = copied.unwrap_or(durable_len);
                    let got = replay(copy.path());
                    let pos = history.iter().rposition(|h| *h == got);
                    prop_assert!(pos.is_some(), "the replay is no prefix of what was committed");
                    prop_assert!(pos.unwrap() + 1 >= min.min(history.len()),
                        "a durable record was lost: replay at {:?}, durable {}", pos, min);
                    // Torn further (bytes a power cut may drop): still some prefix, in order.
                    let wal_copy = copy.path().join("ledger.wal");
                    if let Ok(b) = std::fs::read(&wal_copy) {
                        let keep = b.len().saturating_sub(cut.min(b.len()));
                        std::fs::write(&wal_copy, &b[..keep]).unwrap();
                    }
                    let torn = replay(copy.path());
                    prop_assert!(history.contains(&torn), "a torn log replays to no prefix");
                    Ok(())
                })?;
            }
        }
    }
}
