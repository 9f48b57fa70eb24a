//! The agent's shared state: config, inventory, pool membership and the live ledger under one
//! *short* lock, the journal behind the ledger, and which VFs' health at the kubelet may have
//! changed. Nothing under the lock waits for the disk: records are applied here and queued to
//! the journal ([`crate::store`]); a caller that acts on a record awaits its ticket after
//! dropping the lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;
use tracing::info;
use vfplug_core::ledger::{Ledger, LedgerError, Record, VfState};
use vfplug_core::records::{Phase, phase_change};
use vfplug_core::{Config, Inventory, PciAddress};

use crate::metrics::Metrics;
use crate::options::AgentOptions;
use crate::store::{Journal, Ticket};

/// State shared by the reconcile loop, the pools' backends and the node API.
pub(crate) struct Shared {
    pub(crate) opts: AgentOptions,
    pub(crate) state: Mutex<State>,
    pub(crate) journal: Arc<Journal>,
    pub(crate) metrics: Metrics,
    /// VFs whose health as the kubelet sees it may have changed since the reconcile loop last
    /// pushed device lists (it is woken through `health_changed`).
    pub(crate) health_dirty: Mutex<BTreeSet<PciAddress>>,
    pub(crate) health_changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.opts.node_name)
            .finish_non_exhaustive()
    }
}

/// Whether the ledger lets the kubelet be shown this VF as Healthy (PF carrier and driver are the
/// pools' part): free, the kubelet's own, or the kubelet's VF while its pod uses it — shown
/// Unhealthy, that one would be counted twice (out of allocatable *and* against the pod's
/// request). Once it is on its way back (detaching, releasing) it is not usable by anyone until
/// the release ends. The one definition for the device lists and for when to push them.
pub(crate) fn shown_free(s: Option<&VfState>) -> bool {
    match s {
        None | Some(VfState::Free | VfState::KubeletAllocated { .. }) => true,
        Some(
            VfState::Reserved { lease }
            | VfState::Configured { lease }
            | VfState::Attaching { lease, .. }
            | VfState::Attached { lease, .. },
        ) => lease.from_kubelet,
        Some(_) => false,
    }
}

/// One info line per change of a VM's VF in the VM's records (docs/vm-pods.md, "Records"): every
/// executor step goes through [`Shared::commit_one`], so this sees them all, whichever saga,
/// watcher or recovery made them.
fn log_phase_change(r: &Record) {
    if let Some(c) = phase_change(r) {
        let phase = c.to.map_or("gone", Phase::as_str);
        let from = c.from.map_or("none", Phase::as_str);
        info!(
            vm = %c.vm.pod,
            qmp_socket = %c.vm.qmp_socket,
            pci = %c.pci,
            alias = c.alias.as_deref().unwrap_or(""),
            phase,
            from,
            "VM hostdev phase"
        );
    }
}

/// Whether applying `r` can change what the kubelet is shown.
fn affects_health(r: &Record) -> bool {
    match r {
        Record::Add { .. } | Record::Remove { .. } => true,
        Record::Set { from, to, .. } => shown_free(Some(from)) != shown_free(Some(to)),
    }
}

pub(crate) struct State {
    pub(crate) config: Arc<Config>,
    pub(crate) inventory: Inventory,
    pub(crate) ledger: Ledger,
    /// Pool membership: resource name → VFs.
    pub(crate) members: BTreeMap<String, Vec<PciAddress>>,
    /// When a VF was last given out by Allocate, or last seen in PodResources.
    pub(crate) kubelet_seen: HashMap<PciAddress, Instant>,
    /// Start of this process: the grace period for kubelet allocations learned before it.
    pub(crate) started: Instant,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic mid-update elsewhere; the state itself is still the last
    // consistent one we wrote (ledger changes are applied in one call), so keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Applies one record to the live ledger (which re-validates it: a refused record is
    /// neither applied nor written) and queues it to the journal. Call with the state lock
    /// held; await the ticket after dropping it, before acting on the record.
    pub(crate) fn commit_one(&self, st: &mut State, record: Record) -> Result<Ticket, LedgerError> {
        st.ledger.apply(&record)?;
        log_phase_change(&record);
        self.mark_health(std::slice::from_ref(&record));
        Ok(self.journal.enqueue([record]))
    }

    /// Notes the VFs of applied records whose health at the kubelet may change, and wakes the
    /// reconcile loop to push them at once (a reservation turns Unhealthy before anyone else can
    /// be handed the VF). Allocate's own records change nothing there and wake nobody.
    fn mark_health(&self, applied: &[Record]) {
        let mut any = false;
        {
            let mut dirty = lock(&self.health_dirty);
            for r in applied.iter().filter(|r| affects_health(r)) {
                dirty.insert(r.pci());
                any = true;
            }
        }
        if any {
            self.health_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Takes the VFs marked by [`Self::mark_health`] since the last call.
    pub(crate) fn take_health_dirty(&self) -> BTreeSet<PciAddress> {
        std::mem::take(&mut *lock(&self.health_dirty))
    }

    /// As [`Self::commit_one`] for a batch planned together under this lock (Allocate of
    /// several VFs). Each record was planned against the state it is applied to, so a refusal
    /// is a bug; should one happen, the records applied before it are still queued (memory and
    /// log never disagree) and the error is returned, so the caller does not act.
    pub(crate) fn commit_all(
        &self,
        st: &mut State,
        records: Vec<Record>,
    ) -> Result<Ticket, LedgerError> {
        self.commit_batch(st, records, true)
    }

    /// As [`Self::commit_all`] for records nobody waits for (Allocate: the kubelet's checkpoint
    /// is the durable source of its allocations): no fdatasync of their own.
    pub(crate) fn commit_all_unawaited(
        &self,
        st: &mut State,
        records: Vec<Record>,
    ) -> Result<Ticket, LedgerError> {
        self.commit_batch(st, records, false)
    }

    fn commit_batch(
        &self,
        st: &mut State,
        records: Vec<Record>,
        sync: bool,
    ) -> Result<Ticket, LedgerError> {
        let enqueue = |applied: Vec<Record>| {
            if sync {
                self.journal.enqueue(applied)
            } else {
                self.journal.enqueue_lazy(applied)
            }
        };
        let mut applied = Vec::with_capacity(records.len());
        for r in records {
            if let Err(e) = st.ledger.apply(&r) {
                self.mark_health(&applied);
                let _ticket = enqueue(applied);
                return Err(e);
            }
            applied.push(r);
        }
        self.mark_health(&applied);
        Ok(enqueue(applied))
    }

    /// Applies and queues each record of independent ones (inventory, PodResources); a refused
    /// record is skipped and returned, the others go ahead. Nobody acts on these: they are
    /// queued lazily (synced with the next record someone waits for).
    pub(crate) fn commit_all_lenient(
        &self,
        st: &mut State,
        records: Vec<Record>,
    ) -> Vec<LedgerError> {
        let mut ok = Vec::with_capacity(records.len());
        let mut refused = Vec::new();
        for r in records {
            match st.ledger.apply(&r) {
                Ok(()) => ok.push(r),
                Err(e) => refused.push(e),
            }
        }
        self.mark_health(&ok);
        let _ticket = self.journal.enqueue_lazy(ok);
        refused
    }
}

#[cfg(test)]
mod tests {
    use vfplug_core::ledger::{Lease, Owner};
    use vfplug_core::{PodRef, VmRef};

    use super::*;

    fn lease(from_kubelet: bool) -> Lease {
        Lease {
            owner: Owner {
                pod: PodRef::new("ns", "p", ""),
                container_id: "c".into(),
                ifname: "net1".into(),
            },
            token: 1,
            saved: None,
            from_kubelet,
            cni: None,
        }
    }

    #[test]
    fn the_kubelets_vf_is_shown_free_while_its_pod_uses_it_and_not_on_its_way_back() {
        let vm = VmRef::default();
        let in_use = |l: Lease| {
            [
                VfState::Reserved { lease: l.clone() },
                VfState::Configured { lease: l.clone() },
                VfState::Attaching {
                    lease: l.clone(),
                    alias: "a".into(),
                    vm: vm.clone(),
                },
                VfState::Attached {
                    lease: l,
                    alias: "a".into(),
                    vm: vm.clone(),
                    reason: None,
                },
            ]
        };
        let going_back = |l: Lease| {
            [
                VfState::Detaching {
                    lease: l.clone(),
                    alias: "a".into(),
                    vm: vm.clone(),
                    since_ms: 0,
                    attempts: 1,
                },
                VfState::Releasing { lease: l },
            ]
        };
        assert!(shown_free(None));
        assert!(shown_free(Some(&VfState::Free)));
        assert!(shown_free(Some(&VfState::KubeletAllocated { pod: None })));
        for s in in_use(lease(true)) {
            assert!(shown_free(Some(&s)), "{s:?}");
        }
        for s in in_use(lease(false))
            .into_iter()
            .chain(going_back(lease(true)))
            .chain(going_back(lease(false)))
        {
            assert!(!shown_free(Some(&s)), "{s:?}");
        }
        let q = VfState::Quarantined {
            reason: "x".into(),
            previous_owner: None,
        };
        assert!(!shown_free(Some(&q)));
        // What the push is woken by follows the same rule.
        let r = Record::Set {
            pci: "0000:3b:02.0".parse().unwrap(),
            from: VfState::Configured { lease: lease(true) },
            to: VfState::Releasing { lease: lease(true) },
        };
        assert!(affects_health(&r));
    }
}
