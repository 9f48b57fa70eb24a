//! The VM sagas: a configured vfio-mode VF hot-plugged into a running QEMU, and taken out again
//! only on proof (DESIGN.md §1, §3; libvirt's qemuDomainAttachHostPCIDevice and
//! qemuDomainRemoveHostDevice, shared/research/cni-hotplug.md §1).
//!
//! **Attach** (the VF is `Configured` by a vfio-mode CNI ADD): one QMP connection per VM →
//! QEMU's RLIMIT_MEMLOCK raised to the guest's RAM + 1 GiB (the first VFIO device pins all of
//! it) → a free `pcie-root-port` found from `qom-list` and `query-pci`, never guessed →
//! `Attaching{alias, vm}` persisted → `device_add vfio-pci` → presence verified with `qom-list`
//! → `Attached`. A failed `device_add` or verification persists `AttachFailed` (back to
//! `Configured`) and the caller finalizes the removal; a port another device took between the
//! look and the add is skipped and the next one tried.
//!
//! **Detach**: `Detaching` persisted → the `DEVICE_DELETED` waiter registered, then
//! `device_del` ("already in the process of unplug" is pending, not an error) → a bounded wait.
//! Only `DEVICE_DELETED`, QEMU's exit, or the alias missing from `qom-list` completes it: then
//! `Detached` (→ `Releasing`) and the one [`Executor::finalize_removal`]. No event within the
//! wait: the detach stays pending, and the VM's event watcher finishes it when the event comes
//! late. `DEVICE_UNPLUG_GUEST_ERROR` puts the device back to `Attached`.
//!
//! Each VM's connection has a watcher task: a late `DEVICE_DELETED` finalizes the VF it names;
//! the connection's end (QEMU exited or closed it) finalizes every VF of that VM once the
//! connector says QEMU is gone, else the next call reconnects and diffs `qom-list` against the
//! ledger ([`Executor::vm_reconcile`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, debug, info, info_span, warn};
use vfplug_core::ledger::{Step, Token, VfState};
use vfplug_core::{AttachMode, PciAddress, VmRef};
use vfplug_host::vmpod::{Memlock, memlock_for_guest};
use vfplug_qmp::{DeviceAdd, Event, Qmp, QmpError, QueryMemorySizeSummary, UnplugOutcome};

use crate::error::{ErrorKind, ExecError};
use crate::ports::LedgerPort;
use crate::{Executor, lock};

/// A connected VM: its QMP client and, when known, QEMU's pid (for RLIMIT_MEMLOCK).
#[derive(Debug, Clone)]
pub struct VmLink {
    /// The QMP connection (one per VM, shared by all its VFs).
    pub qmp: Arc<Qmp>,
    /// QEMU's pid from the socket's peer credentials.
    pub pid: Option<u32>,
}

/// A boxed future, for the object-safe [`QmpConnector`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the executor reaches a VM's QEMU. vfplugd's connects to the QMP socket resolved inside
/// the VM pod's volume (vfplug-host's `vmpod`); tests hand out scripted QMP servers.
pub trait QmpConnector: Send + Sync + Debug {
    /// Connects and negotiates.
    fn connect<'a>(&'a self, vm: &'a VmRef) -> BoxFuture<'a, Result<VmLink, ExecError>>;
    /// Whether this VM's QEMU is known to have exited (its pid is gone): the devices it had are
    /// out of every guest.
    fn exited(&self, vm: &VmRef, link: &VmLink) -> bool;
}

/// The VM side of the host ports.
#[derive(Clone, Debug)]
pub struct VmPorts {
    /// QMP connections.
    pub qmp: Arc<dyn QmpConnector>,
    /// RLIMIT_MEMLOCK of QEMU.
    pub memlock: Arc<dyn Memlock>,
    /// Id prefix of the VM's hotplug-capable `pcie-root-port`s.
    pub port_prefix: String,
}

/// What [`Executor::vm_attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAttached {
    /// QEMU device id.
    pub alias: String,
    /// The root port it went into.
    pub port: String,
}

/// How a detach stands when [`Executor::vm_detach`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDetach {
    /// Out of the guest, and the removal finalized (see the note for Free or Quarantined).
    Finalized(crate::Finalized),
    /// Asked; the guest has not acknowledged within the wait. The watcher finishes it.
    Pending,
    /// The guest refused (`DEVICE_UNPLUG_GUEST_ERROR`); the device stays attached.
    GuestRefused,
}

/// The VMs the executor is connected to, by QMP socket, with their watcher tasks. A watcher
/// ends by itself when its connection closes; [`Executor::close_vms`] ends them all.
pub(crate) type Sessions =
    std::sync::Mutex<HashMap<String, (VmLink, Vec<tokio::task::AbortHandle>)>>;

/// The QEMU device id of the hostdev of an attachment: derived from the interface name, which is
/// unique within a pod (`vfplug-net1`).
pub fn alias_for(ifname: &str) -> String {
    let clean: String = ifname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("vfplug-{clean}")
}

fn qmp_err(what: &str, e: &QmpError) -> ExecError {
    let kind = if e.is_connection_error() {
        ErrorKind::TryAgain
    } else {
        ErrorKind::Internal
    };
    ExecError::new(kind, format!("{what}: {e}"))
}

/// The connection failed while QEMU may have added the device: the attach's outcome is unknown.
fn unknown_outcome(alias: &str, e: &QmpError) -> ExecError {
    ExecError::new(
        ErrorKind::TryAgain,
        format!(
            "QMP lost while adding {alias}; whether the guest has it is unknown until vfplugd \
             reconnects: {e}"
        ),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<L: LedgerPort> Executor<L> {
    fn vm_ports(&self) -> Result<&VmPorts, ExecError> {
        self.host
            .vm
            .as_ref()
            .ok_or_else(|| ExecError::new(ErrorKind::InvalidConfig, "this vfplugd drives no VMs"))
    }

    /// The VM's connection, made (and its watcher started) if there is none or it closed.
    pub(crate) async fn vm_link(self: &Arc<Self>, vm: &VmRef) -> Result<VmLink, ExecError> {
        if let Some((link, _)) = lock(&self.sessions).get(&vm.qmp_socket)
            && !link.qmp.is_closed()
        {
            return Ok(link.clone());
        }
        let ports = self.vm_ports()?;
        let link = ports.qmp.connect(vm).await?;
        // The watcher first diffs what the ledger has in this VM *now* against QEMU (a new
        // connection may follow a lost one, or a restart), then follows the events. It takes
        // each VF's lock, so it never races a saga.
        let known = self.vfs_of(vm);
        let me = Arc::clone(self);
        let (vm2, link2) = (vm.clone(), link.clone());
        let watcher = tokio::spawn(
            async move { me.watch_vm(vm2, link2, known).await }
                .instrument(info_span!("vm_watch", socket = %vm.qmp_socket)),
        );
        // A replaced (closed) session's watcher is left to finish what the close started.
        let mut sessions = lock(&self.sessions);
        let aborts = sessions
            .remove(&vm.qmp_socket)
            .map(|(_, a)| a)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| !a.is_finished())
            .chain([watcher.abort_handle()])
            .collect();
        sessions.insert(vm.qmp_socket.clone(), (link.clone(), aborts));
        Ok(link)
    }

    /// Stops every VM watcher and drops the connections (vfplugd's shutdown). Detaches that are
    /// pending stay so in the ledger; the next start reconnects and reconciles them.
    pub fn close_vms(&self) {
        for (_, (_, aborts)) in lock(&self.sessions).drain() {
            for a in aborts {
                a.abort();
            }
        }
    }

    /// Hot-plugs the `Configured` vfio-mode VF `pci` (lease `token`) into `vm`. See the module
    /// docs. On error the VF is `Configured` again (or was never moved) and the caller decides
    /// (a CNI ADD rolls back with [`Executor::finalize_removal`]).
    pub async fn vm_attach(
        self: &Arc<Self>,
        pci: PciAddress,
        token: Token,
        vm: &VmRef,
    ) -> Result<VmAttached, ExecError> {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        self.vm_attach_locked(pci, token, vm).await
    }

    /// As [`Self::vm_attach`], with the VF lock held by the caller (a CNI ADD).
    pub(crate) async fn vm_attach_locked(
        self: &Arc<Self>,
        pci: PciAddress,
        token: Token,
        vm: &VmRef,
    ) -> Result<VmAttached, ExecError> {
        let lease = match self.ledger.read(|l| l.get(&pci).cloned()) {
            Some(VfState::Configured { lease }) if lease.token == token => lease,
            Some(s) => {
                return Err(ExecError::new(
                    ErrorKind::Busy,
                    format!(
                        "VF {pci} is {} (token {token} expected Configured)",
                        s.kind()
                    ),
                ));
            }
            None => {
                return Err(ExecError::new(
                    ErrorKind::NoSuchDevice,
                    format!("no VF {pci} in the ledger"),
                ));
            }
        };
        if lease.cni.as_deref().map(|c| c.mode) != Some(AttachMode::Vfio) {
            return Err(ExecError::new(
                ErrorKind::InvalidConfig,
                format!("VF {pci} is not on vfio-pci for this attachment (a VM needs a vfio pool)"),
            ));
        }
        let alias = alias_for(&lease.owner.ifname);
        let link = self.vm_link(vm).await?;
        let ports = self.vm_ports()?;

        // The first VFIO device pins all guest RAM: QEMU must be allowed to lock it first.
        if let Some(pid) = link.pid {
            let ram = link
                .qmp
                .call(&QueryMemorySizeSummary {})
                .await
                .map_err(|e| qmp_err("query-memory-size-summary", &e))?
                .total();
            let memlock = Arc::clone(&ports.memlock);
            let change =
                tokio::task::spawn_blocking(move || memlock.raise(pid, memlock_for_guest(ram)))
                    .await
                    .map_err(ExecError::joined)?
                    .map_err(|e| {
                        ExecError::new(
                            ErrorKind::Internal,
                            format!("raising QEMU's RLIMIT_MEMLOCK: {e}"),
                        )
                    })?;
            debug!(%pci, pid, ram, ?change, "QEMU's RLIMIT_MEMLOCK");
        }

        let candidates = self.free_ports(&link, &ports.port_prefix).await?;
        if candidates.is_empty() {
            return Err(ExecError::new(
                ErrorKind::TryAgain,
                format!(
                    "VM {vm} has no free hotplug slot (pcie-root-port with id prefix {:?})",
                    ports.port_prefix
                ),
            ));
        }
        {
            let (alias, vm) = (alias.clone(), vm.clone());
            self.ledger
                .commit(move |l| l.plan_advance(pci, token, Step::Attach { alias, vm }))
                .await?;
        }
        let mut last: Option<ExecError> = None;
        for port in candidates {
            let dev = DeviceAdd::vfio_pci(pci, &alias, &port, None);
            match link.qmp.device_add(&dev).await {
                Ok(()) => {
                    match link.qmp.peripheral_ids().await {
                        Ok(ids) if ids.contains(&alias) => {
                            self.ledger
                                .commit(|l| l.plan_advance(pci, token, Step::Attached))
                                .await?;
                            info!(%pci, %alias, %port, %vm, "VF hot-plugged");
                            return Ok(VmAttached { alias, port });
                        }
                        Ok(_) => {
                            last = Some(ExecError::new(
                                ErrorKind::Internal,
                                format!("{alias} is not in /machine/peripheral after device_add"),
                            ));
                        }
                        // The device may be in the guest and we cannot tell: it stays
                        // `Attaching`, never released on a guess; the next connection's
                        // reconcile (or a DEL, which unplugs first) decides.
                        Err(e) => return Err(unknown_outcome(&alias, &e)),
                    }
                    break;
                }
                Err(e) if e.is_connection_error() => return Err(unknown_outcome(&alias, &e)),
                // Taken between the look and the add (another device, another VM's agent):
                // try the next port.
                Err(e)
                    if e.to_string().contains("in use") || e.to_string().contains("occupied") =>
                {
                    debug!(%port, error = %e, "root port taken; trying the next");
                    last = Some(qmp_err("device_add", &e));
                }
                Err(e) => {
                    last = Some(qmp_err("device_add", &e));
                    break;
                }
            }
        }
        // Nothing in the guest: back to Configured; the caller finalizes.
        self.ledger
            .commit(|l| l.plan_advance(pci, token, Step::AttachFailed))
            .await?;
        Err(last.unwrap_or_else(|| {
            ExecError::new(ErrorKind::TryAgain, "no root port accepted the device")
        }))
    }

    /// Root ports (by id prefix) with nothing behind them, from `qom-list` (which ports exist)
    /// and `query-pci` (what sits behind each), minus the ports of devices whose attach is under
    /// way (not yet visible to `query-pci` before the guest's firmware enumerates them).
    async fn free_ports(&self, link: &VmLink, prefix: &str) -> Result<Vec<String>, ExecError> {
        let ids = link
            .qmp
            .peripheral_ids()
            .await
            .map_err(|e| qmp_err("qom-list", &e))?;
        let mut ports: Vec<String> = ids.into_iter().filter(|i| i.starts_with(prefix)).collect();
        ports.sort();
        let pci = link
            .qmp
            .query_pci()
            .await
            .map_err(|e| qmp_err("query-pci", &e))?;
        let used: BTreeSet<String> = pci
            .iter()
            .filter(|d| d.qdev_id.as_deref().is_none_or(|q| !q.starts_with(prefix)))
            .filter_map(|d| d.parent_bridge.clone())
            .collect();
        Ok(ports.into_iter().filter(|p| !used.contains(p)).collect())
    }

    /// Unplugs the hostdev of lease `token` on `pci` and, once the guest let go, finalizes the
    /// removal. Waits up to `wait` for `DEVICE_DELETED` (libvirt: 5 s), then answers `Pending`.
    pub async fn vm_detach(
        self: &Arc<Self>,
        pci: PciAddress,
        token: Token,
        wait: Duration,
    ) -> Result<VmDetach, ExecError> {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        let (alias, vm) = match self.ledger.read(|l| l.get(&pci).cloned()) {
            Some(s) if s.lease().map(|l| l.token) != Some(token) => {
                return Err(ExecError::new(
                    ErrorKind::Busy,
                    format!("VF {pci} is held by another lease"),
                ));
            }
            Some(VfState::Attaching { alias, vm, .. } | VfState::Attached { alias, vm, .. }) => {
                let since_ms = now_ms();
                self.ledger
                    .commit(|l| l.plan_advance(pci, token, Step::Detach { since_ms }))
                    .await?;
                (alias, vm)
            }
            Some(VfState::Detaching { alias, vm, .. }) => (alias, vm),
            Some(
                VfState::Configured { .. } | VfState::Reserved { .. } | VfState::Releasing { .. },
            ) => {
                // Not (or no longer) in any guest.
                let f = self
                    .finalize_locked(pci, token, "detach of a VF in no guest")
                    .await?;
                return Ok(VmDetach::Finalized(f));
            }
            other => {
                return Err(ExecError::new(
                    ErrorKind::Busy,
                    format!(
                        "VF {pci} is {:?}; nothing to detach",
                        other.map(|s| s.kind())
                    ),
                ));
            }
        };
        let link = match self.vm_link(&vm).await {
            Ok(l) => l,
            // QEMU is not running (its pod is being torn down: containers stop before the CNI
            // DEL): the device is in no guest.
            Err(e) if e.kind == ErrorKind::VmNotRunning => {
                return self
                    .detached_locked(pci, token, "QEMU is not running")
                    .await;
            }
            Err(e) => {
                warn!(%pci, %vm, error = %e, "QMP unreachable during detach; it stays pending");
                return Ok(VmDetach::Pending);
            }
        };
        match link.qmp.device_del_and_wait(&alias, wait).await {
            Ok(UnplugOutcome::Deleted) => self.detached_locked(pci, token, "DEVICE_DELETED").await,
            Ok(UnplugOutcome::Pending) => {
                info!(%pci, %alias, %vm, "unplug pending: the guest has not acknowledged yet");
                Ok(VmDetach::Pending)
            }
            Ok(UnplugOutcome::GuestError) => {
                warn!(%pci, %alias, %vm, "the guest refused the unplug; the device stays attached");
                self.ledger
                    .commit(|l| {
                        let reason = "the guest refused the unplug (DEVICE_UNPLUG_GUEST_ERROR)";
                        l.plan_advance(
                            pci,
                            token,
                            Step::UnplugFailed {
                                reason: reason.into(),
                            },
                        )
                    })
                    .await?;
                Ok(VmDetach::GuestRefused)
            }
            // QEMU no longer knows the device: it is out of the guest.
            Err(QmpError::DeviceNotFound { .. }) => {
                self.detached_locked(pci, token, "device unknown to QEMU")
                    .await
            }
            Err(e) if e.is_connection_error() => {
                // The connection was gone: is QEMU? One fresh connection tells.
                lock(&self.sessions).remove(&vm.qmp_socket);
                match self.vm_link(&vm).await {
                    Err(e2) if e2.kind == ErrorKind::VmNotRunning => {
                        self.detached_locked(pci, token, "QEMU is not running")
                            .await
                    }
                    _ => {
                        warn!(%pci, %vm, error = %e, "QMP lost during detach; it stays pending");
                        Ok(VmDetach::Pending)
                    }
                }
            }
            Err(e) => Err(qmp_err("device_del", &e)),
        }
    }

    /// Out of the guest (proved): `Detached`, then the one finalize-removal. VF lock held.
    async fn detached_locked(
        &self,
        pci: PciAddress,
        token: Token,
        why: &str,
    ) -> Result<VmDetach, ExecError> {
        self.ledger
            .commit(|l| l.plan_advance(pci, token, Step::Detached))
            .await?;
        info!(%pci, why, "hostdev removed from the guest");
        let f = self.finalize_locked(pci, token, why).await?;
        Ok(VmDetach::Finalized(f))
    }

    /// Proof of removal for `pci` arrived outside a `vm_detach` call (a late event, QEMU's exit,
    /// a reconnect diff): finalize it if it is still the lease that was detaching or attached.
    async fn removal_proved(&self, pci: PciAddress, token: Token, why: &str) {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        let state = self.ledger.read(|l| l.get(&pci).cloned());
        let in_guest = matches!(
            &state,
            Some(VfState::Attaching { lease, .. } | VfState::Attached { lease, .. }) if lease.token == token
        );
        if in_guest {
            let since_ms = now_ms();
            if let Err(e) = self
                .ledger
                .commit(|l| l.plan_advance(pci, token, Step::Detach { since_ms }))
                .await
            {
                warn!(%pci, error = %e, "cannot record the detach");
                return;
            }
        }
        let detaching = matches!(
            self.ledger.read(|l| l.get(&pci).cloned()),
            Some(VfState::Detaching { lease, .. }) if lease.token == token
        );
        if detaching && let Err(e) = self.detached_locked(pci, token, why).await {
            warn!(%pci, error = %e, "finishing the removal failed; a later pass retries");
        }
    }

    /// The VFs the ledger has in (or on their way into or out of) `vm`: (pci, token, alias).
    fn vfs_of(&self, vm: &VmRef) -> Vec<(PciAddress, Token, String, bool)> {
        self.ledger.read(|l| {
            l.iter()
                .filter_map(|(pci, s)| match s {
                    VfState::Attaching {
                        lease,
                        alias,
                        vm: v,
                    }
                    | VfState::Attached {
                        lease,
                        alias,
                        vm: v,
                        ..
                    } if v.qmp_socket == vm.qmp_socket => {
                        Some((*pci, lease.token, alias.clone(), false))
                    }
                    VfState::Detaching {
                        lease,
                        alias,
                        vm: v,
                        ..
                    } if v.qmp_socket == vm.qmp_socket => {
                        Some((*pci, lease.token, alias.clone(), true))
                    }
                    _ => None,
                })
                .collect()
        })
    }

    /// Diffs the ledger against `qom-list /machine/peripheral` of `vm` (libvirt's
    /// qemuProcessUpdateDevices): a detaching or attached hostdev QEMU no longer has is
    /// finalized; an attaching one QEMU has is marked attached.
    pub async fn vm_reconcile(self: &Arc<Self>, vm: &VmRef) -> Result<(), ExecError> {
        let link = match self.vm_link(vm).await {
            Ok(l) => l,
            // QEMU is gone (e.g. the pod was deleted while vfplugd was down): every device it
            // had is out of every guest.
            Err(e) if e.kind == ErrorKind::VmNotRunning => {
                info!(%vm, error = %e, "QEMU is not running: finalizing every VF it had");
                for (pci, token, _, _) in self.vfs_of(vm) {
                    self.removal_proved(pci, token, "QEMU is not running").await;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let known = self.vfs_of(vm);
        self.vm_reconcile_with(vm, &link, known).await;
        Ok(())
    }

    async fn vm_reconcile_with(
        &self,
        vm: &VmRef,
        link: &VmLink,
        known: Vec<(PciAddress, Token, String, bool)>,
    ) {
        for (pci, token, alias, _) in known {
            // Under the VF's lock and with a fresh look: a saga that finished meanwhile must
            // not be judged by an older list.
            let vf_lock = self.vf_lock(pci);
            let held = vf_lock.lock().await;
            let state = self.ledger.read(|l| l.get(&pci).cloned());
            let still = matches!(
                &state,
                Some(VfState::Attaching { lease, .. } | VfState::Attached { lease, .. }
                    | VfState::Detaching { lease, .. }) if lease.token == token
            );
            if !still {
                continue;
            }
            let ids = match link.qmp.peripheral_ids().await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(%vm, error = %e, "qom-list failed; reconcile stopped");
                    return;
                }
            };
            if ids.contains(&alias) {
                if matches!(state, Some(VfState::Attaching { .. }))
                    && let Err(e) = self
                        .ledger
                        .commit(|l| l.plan_advance(pci, token, Step::Attached))
                        .await
                {
                    debug!(%pci, error = %e, "reconcile: not marked attached");
                }
            } else {
                drop(held);
                self.removal_proved(pci, token, "gone from qom-list").await;
            }
        }
    }

    /// The watcher of one VM's connection: late `DEVICE_DELETED`s, and the connection's end.
    async fn watch_vm(
        self: Arc<Self>,
        vm: VmRef,
        link: VmLink,
        known: Vec<(PciAddress, Token, String, bool)>,
    ) {
        // Subscribe before reconciling, so no event falls between the two.
        let mut events = link.qmp.events();
        self.vm_reconcile_with(&vm, &link, known).await;
        loop {
            match events.recv().await {
                Ok(Event::DeviceDeleted {
                    device: Some(id), ..
                }) => {
                    let hit = self
                        .vfs_of(&vm)
                        .into_iter()
                        .find(|(_, _, alias, _)| *alias == id);
                    if let Some((pci, token, _, _)) = hit {
                        info!(%pci, alias = %id, "DEVICE_DELETED");
                        self.removal_proved(pci, token, "DEVICE_DELETED").await;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Events were lost: ask QEMU what it still has.
                    warn!(lost = n, "QMP events lost; reconciling with qom-list");
                    let known = self.vfs_of(&vm);
                    self.vm_reconcile_with(&vm, &link, known).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        // The connection ended. If QEMU is gone, every device it had is out of every guest.
        let exited = self
            .host
            .vm
            .as_ref()
            .is_some_and(|p| p.qmp.exited(&vm, &link));
        if exited {
            info!(%vm, "QEMU exited: finalizing every VF it had");
            for (pci, token, _, _) in self.vfs_of(&vm) {
                self.removal_proved(pci, token, "QEMU exited").await;
            }
        } else {
            info!(%vm, "QMP connection closed; the next call reconnects and reconciles");
        }
    }
}
