//! What the executor needs from the rest of vfplugd, as traits and plain data it defines itself
//! (the consumer owns the port): the ledger store, the node's view of VFs and pools, and the
//! host adapters.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use vfplug_core::ledger::{Ledger, LedgerError, Owner, Record, Token};
use vfplug_core::{PciAddress, PoolConfig};
use vfplug_host::driver::DriverBinder;
use vfplug_host::net::{NetdevOps, VfNetlink};

use crate::error::ExecError;

/// Facts about one VF from the node's inventory and pool config, read at one moment.
#[derive(Clone, Debug)]
pub struct VfFacts {
    /// The VF.
    pub pci: PciAddress,
    /// Its PF.
    pub pf_pci: PciAddress,
    /// The PF's netdev, through which VF settings are made.
    pub pf_netdev: Option<String>,
    /// The VF's index on its PF.
    pub vf_index: u32,
    /// The driver the VF is bound to now.
    pub driver: Option<String>,
    /// The pool's full resource name.
    pub resource: String,
    /// The pool.
    pub pool: PoolConfig,
}

/// Which VF an ADD wants.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    /// The attachment that will hold it.
    pub owner: Owner,
    /// The VF the runtime named (`deviceID`), if any.
    pub device: Option<PciAddress>,
    /// The pool to pick from when no VF is named (pool name or resource name).
    pub pool: Option<String>,
}

/// A VF reserved for an ADD (durable before this is returned).
#[derive(Clone, Debug)]
pub struct Reserved {
    /// The lease's fencing token.
    pub token: Token,
    /// The VF.
    pub facts: VfFacts,
}

/// The ledger store and the node's view, as the executor sees them. Implemented by vfplugd's
/// agent (live ledger under a short lock, group-committed journal) and by in-memory fakes.
pub trait LedgerPort: Send + Sync + 'static {
    /// Plans one record against the live ledger, applies it (which re-validates it) and
    /// resolves once the record is durable. The caller acts only after this returns `Ok`.
    fn commit<F>(&self, plan: F) -> impl Future<Output = Result<Record, ExecError>> + Send
    where
        F: FnOnce(&Ledger) -> Result<Record, LedgerError> + Send;

    /// Reads the live ledger. Never waits for the disk.
    fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R;

    /// The VF's inventory and pool facts.
    fn vf(&self, pci: PciAddress) -> Result<VfFacts, ExecError>;

    /// Chooses the VF for an ADD (the named one, the pod's own kubelet allocation in the pool,
    /// or a free healthy VF of the pool) and reserves it durably — pool policy is the node's.
    fn reserve(
        &self,
        req: &ReserveRequest,
    ) -> impl Future<Output = Result<Reserved, ExecError>> + Send;

    /// A lease ended and the VF is back in its pool (or in the kubelet's accounting): drop
    /// per-lease leftovers such as device-info files.
    fn lease_ended(&self, pci: PciAddress, facts: Option<&VfFacts>);
}

/// The host adapters the sagas drive (real ones in vfplugd, fakes in tests).
#[derive(Clone, Debug)]
pub struct HostPorts {
    /// VF settings through the PF.
    pub vf_netlink: Arc<dyn VfNetlink>,
    /// Netdev placement into pods and back.
    pub netdev: Arc<dyn NetdevOps>,
    /// Driver binding and function reset.
    pub driver: Arc<dyn DriverBinder>,
    /// Stands for `/sys` (for the VF's netdev names).
    pub sysfs_root: PathBuf,
    /// QEMU of VM pods (`None`: this vfplugd hot-plugs into no VM).
    pub vm: Option<crate::vm::VmPorts>,
}
