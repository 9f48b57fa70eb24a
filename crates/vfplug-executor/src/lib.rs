//! # vfplug-executor
//!
//! The sagas of vfplugd, free of gRPC and Kubernetes: start at [`Executor`].
//!
//! - [`Executor::add`], [`Executor::del`], [`Executor::check`], [`Executor::gc`] and
//!   [`Executor::lookup`] ([`cni`]) are what a CNI call asks for; the node API (crate
//!   vfplug-agent) only converts its messages to these and the answers back.
//! - [`Executor::finalize_removal`] ([`finalize`]) is the one way a lease ends: restore, reset,
//!   rebind, then Free — or Quarantined with the reason. DEL, GC, a failed ADD's rollback and
//!   [`Executor::recover`] all end there, and the VM detach will too.
//! - The executor is generic over a [`LedgerPort`] (the ledger store and the node's view, with
//!   durable commits) and gets its host adapters in [`HostPorts`], so tests drive it with the
//!   in-memory fakes of vfplug-host.
//!
//! - [`failpoint`] names a point after every persisted step, where a test build of vfplugd
//!   (`--failpoint`) SIGKILLs itself: the crash tests of the VM lab.
//!
//! Every step is persisted in the ledger before it acts (write-ahead), operations on one VF are
//! serialized by a per-VF lock, and PF netlink writes by a per-PF lock (concurrent VF changes on
//! one PF fail on some drivers: sriov-cni #34, #213).

pub mod cni;
pub mod error;
pub mod failpoint;
pub mod finalize;
pub mod ports;
pub mod vm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};
use vfplug_core::PciAddress;
use vfplug_core::ledger::VfState;

pub use cni::{AddOutcome, AddRequest, CheckRequest, DelOutcome, GcOutcome};
pub use error::{ErrorKind, ExecError};
pub use finalize::Finalized;
pub use ports::{HostPorts, LedgerPort, ReserveRequest, Reserved, VfFacts};
pub use vm::{HostdevModel, QmpConnector, VmAttached, VmDetach, VmLink, VmPorts};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock guards only `()` or a map of locks: nothing half-updated to fear.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The executor. Cheap to share behind an `Arc`; see the crate docs.
#[derive(Debug)]
pub struct Executor<L> {
    pub(crate) ledger: Arc<L>,
    pub(crate) host: HostPorts,
    /// One async lock per VF: an operation on a VF holds it from its first ledger record to its
    /// last, so two operations never interleave host work on one VF.
    vf_locks: Mutex<HashMap<PciAddress, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per PF netdev, held (on a blocking thread) around every PF netlink write.
    pf_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// One QMP connection per VM.
    pub(crate) sessions: vm::Sessions,
    /// Per VM (by QMP socket), the task waiting for its QEMU to do the hot-plugs owed to it.
    pub(crate) waiters: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// One connect at a time per VM (by QMP socket).
    pub(crate) vm_connects: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What [`Executor::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Half-done ADDs (and releases) finished as DEL would: VFs back in their pools.
    pub released: Vec<PciAddress>,
    /// VFs that could not be restored.
    pub quarantined: Vec<PciAddress>,
}

impl<L: LedgerPort> Executor<L> {
    /// An executor over `ledger` and `host`.
    pub fn new(ledger: Arc<L>, host: HostPorts) -> Self {
        Self {
            ledger,
            host,
            vf_locks: Mutex::default(),
            pf_locks: Mutex::default(),
            sessions: Mutex::default(),
            waiters: Mutex::default(),
            vm_connects: Mutex::default(),
        }
    }

    /// The ledger port.
    pub fn ledger(&self) -> &Arc<L> {
        &self.ledger
    }

    pub(crate) fn vf_lock(&self, pci: PciAddress) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.vf_locks).entry(pci).or_default())
    }

    pub(crate) fn pf_lock(&self, pf: &str) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.pf_locks).entry(pf.to_owned()).or_default())
    }

    /// Run once at start, before any CNI call is served: every ADD that never finished (a
    /// reservation, settings written ahead but the ADD not done, a VM pod's VF configured but
    /// not yet in its guest) and every release that was under way is finished as DEL would
    /// finish it. Completed attachments, and VFs in or on their way into or out of a guest (the
    /// VM reconcile's), are left alone.
    pub async fn recover(&self) -> Recovered {
        let todo: Vec<(PciAddress, u64)> = self.ledger.read(|l| {
            l.iter()
                .filter_map(|(pci, s)| {
                    let half_done = match s {
                        VfState::Reserved { .. } | VfState::Releasing { .. } => true,
                        // A VM pod's attachment is finished only once it is in the guest.
                        // (An ADD that answered with the hot-plug owed is finished: the
                        // attach is resumed by `resume_owed_attaches`.)
                        VfState::Configured { lease } => lease
                            .cni
                            .as_deref()
                            .is_some_and(|c| !c.complete || (c.vm.is_some() && !c.attach_pending)),
                        _ => false,
                    };
                    half_done.then(|| (*pci, s.effective_lease().map_or(0, |l| l.token)))
                })
                .collect()
        });
        let mut out = Recovered::default();
        for (pci, token) in todo {
            match self.finalize_removal(pci, token, "recovery at start").await {
                Ok(f) if f.released => out.released.push(pci),
                Ok(f) if f.quarantined => out.quarantined.push(pci),
                Ok(f) => info!(%pci, note = %f.note, "recovery: nothing to do"),
                Err(e) => {
                    warn!(%pci, error = %e, "recovery could not finish this VF; DEL or GC will")
                }
            }
        }
        if !out.released.is_empty() || !out.quarantined.is_empty() {
            info!(
                released = out.released.len(),
                quarantined = out.quarantined.len(),
                "recovery finished half-done attachments"
            );
        }
        out
    }
}
