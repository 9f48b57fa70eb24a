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
//! **Owed attach**: a CNI ADD whose VM's QEMU is not running yet (the runtime sets up a pod's
//! networks before its containers start) records the hot-plug as owed in the attachment and
//! answers; one waiter task per VM sleeps until the connector says QEMU may answer (vfplugd:
//! inotify on the pod's volume), then attaches every VF owed to it. A restart resumes it
//! ([`Executor::resume_owed_attaches`]).
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
    /// Whether this VM's QEMU has exited, asked when its QMP connection ended (QEMU may still
    /// be on its way out then, so an implementation may wait a bounded time for the pid's
    /// exit): the devices it had are out of every guest. `false` when not known.
    fn exited<'a>(&'a self, vm: &'a VmRef, link: &'a VmLink) -> BoxFuture<'a, bool>;
    /// Whether [`Self::ready`] can wait for this VM at all (its pod's volume is there): an ADD
    /// owes a hot-plug only then, and fails otherwise. Without an implementation, a connector
    /// cannot wait.
    fn can_wait(&self, vm: &VmRef) -> Result<(), ExecError> {
        Err(ExecError::new(
            ErrorKind::VmNotRunning,
            format!("VM {vm}: this connector cannot wait for QEMU to start"),
        ))
    }
    /// Resolves once this VM's QEMU may answer on its QMP socket: at once if it does now, else
    /// when the pod's volume changes (never by polling). An error when waiting is no longer
    /// possible (the pod's volume is gone).
    fn ready<'a>(&'a self, vm: &'a VmRef) -> BoxFuture<'a, Result<(), ExecError>> {
        Box::pin(async move {
            Err(ExecError::new(
                ErrorKind::VmNotRunning,
                format!("VM {vm}: this connector cannot wait for QEMU to start"),
            ))
        })
    }
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
    /// What QEMU device a VF becomes in the guest.
    pub hostdev: HostdevModel,
}

/// The QEMU device a VF is hot-plugged as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostdevModel {
    /// `vfio-pci` with `host=<VF>`: the VF itself.
    #[default]
    VfioPci,
    /// **Tests only**: a device of this QEMU driver (e.g. `e1000e`) with the same id and bus and no
    /// host device, so the sagas run against a real QEMU on a host without VFIO or SR-IOV.
    StandIn(String),
}

impl HostdevModel {
    /// Whether adding it pins the guest's RAM (VFIO does), so QEMU's RLIMIT_MEMLOCK must cover it.
    pub fn pins_guest_ram(&self) -> bool {
        matches!(self, Self::VfioPci)
    }

    /// The `device_add` for VF `pci` as `alias` on root port `port`.
    pub fn device(&self, pci: PciAddress, alias: &str, port: &str) -> DeviceAdd {
        match self {
            Self::VfioPci => DeviceAdd::vfio_pci(pci, alias, port, None),
            Self::StandIn(driver) => DeviceAdd::new(driver.as_str(), alias).bus(port),
        }
    }
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

/// How long a `device_add` may take: the QMP bound, plus what pinning the guest's RAM may take
/// when the device is the VM's first VFIO one (about 0.3 s per GiB on hardware, 17 s for 64 GiB,
/// cni-hotplug.md §0.9; ~7 s for 1 GiB under nested TCG): 2 s per GiB keeps a margin for a loaded
/// host. A reply later than this is an unknown outcome, never a failure (the VF stays
/// `Attaching`).
pub fn device_add_timeout(base: Duration, guest_ram: Option<u64>) -> Duration {
    let gib = guest_ram.map_or(0, |b| b.div_ceil(1 << 30));
    base + Duration::from_secs(2 * gib)
}

/// The connection failed while QEMU may have added the device: the attach's outcome is unknown.
fn unknown_outcome(alias: &str, e: &QmpError) -> ExecError {
    ExecError::new(
        ErrorKind::TryAgain,
        format!(
            "no answer from QMP while adding {alias}; whether the guest has it is unknown until \
             vfplugd reconnects: {e}"
        ),
    )
}

/// The VM a hot-plug is owed to, if `s` is a configured VF whose ADD answered with it owed.
fn owed_vm(s: &VfState) -> Option<&VmRef> {
    match s {
        VfState::Configured { lease } => lease
            .cni
            .as_deref()
            .filter(|c| c.attach_pending)
            .and_then(|c| c.vm.as_ref()),
        _ => None,
    }
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
        // One connect at a time per VM: QEMU's QMP monitor serves one client at a time, so a
        // second, concurrent connect (a DEL racing the start-time reconcile) would wait for a
        // greeting until its timeout. The loser of the race uses the winner's connection.
        let gate = Arc::clone(
            lock(&self.vm_connects)
                .entry(vm.qmp_socket.clone())
                .or_default(),
        );
        let _connecting = gate.lock().await;
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
        drop(sessions);
        // QEMU reached anew: hot-plugs owed to it (one that failed before included) are tried.
        if !self.owed_to(vm).is_empty() {
            self.spawn_waiter(vm.clone());
        }
        Ok(link)
    }

    /// Stops every VM watcher and waiter and drops the connections (vfplugd's shutdown).
    /// Detaches that are pending and hot-plugs that are owed stay so in the ledger; the next
    /// start reconnects, reconciles and resumes them.
    pub fn close_vms(&self) {
        for (_, (_, aborts)) in lock(&self.sessions).drain() {
            for a in aborts {
                a.abort();
            }
        }
        for (_, a) in lock(&self.waiters).drain() {
            a.abort();
        }
    }

    /// The ADD of a VM pod found its QEMU not running yet (`e`): the hot-plug of the configured
    /// VF is owed — recorded in the attachment, so that a restart owes it too — and done by the
    /// VM's waiter as soon as the QMP socket answers. VF lock held by the caller.
    pub(crate) async fn owe_attach(
        self: &Arc<Self>,
        pci: PciAddress,
        token: Token,
        vm: &VmRef,
        e: &ExecError,
    ) -> Result<(), ExecError> {
        self.vm_ports()?.qmp.can_wait(vm).map_err(|w| {
            ExecError::new(
                w.kind,
                format!("{e}; and vfplugd cannot wait for it: {}", w.msg),
            )
        })?;
        let mut cni = self
            .ledger
            .read(|l| match l.get(&pci) {
                Some(VfState::Configured { lease }) if lease.token == token => {
                    lease.cni.as_deref().cloned()
                }
                _ => None,
            })
            .ok_or_else(|| {
                ExecError::new(
                    ErrorKind::Busy,
                    format!("VF {pci} is no longer configured for lease {token}"),
                )
            })?;
        cni.attach_pending = true;
        cni.attach_error = None;
        self.ledger
            .commit(move |l| l.plan_amend_cni(pci, token, cni))
            .await?;
        crate::failpoint::hit("attach-owed");
        info!(%pci, %vm, reason = %e,
            "QEMU is not running yet: the hot-plug is owed, done when its QMP socket answers");
        self.spawn_waiter(vm.clone());
        Ok(())
    }

    /// Starts the waiters of every VM the ledger owes a hot-plug (vfplugd's start, after
    /// [`Executor::recover`]). Returns how many VMs.
    pub fn resume_owed_attaches(self: &Arc<Self>) -> usize {
        let vms: HashMap<String, VmRef> = self.ledger.read(|l| {
            l.iter()
                .filter_map(|(_, s)| owed_vm(s).map(|vm| (vm.qmp_socket.clone(), vm.clone())))
                .collect()
        });
        let n = vms.len();
        for (_, vm) in vms {
            info!(%vm, "resuming the hot-plugs owed to this VM");
            self.spawn_waiter(vm);
        }
        n
    }

    /// The waiter of `vm`, unless one runs already (one per VM: its VFs share the connection).
    fn spawn_waiter(self: &Arc<Self>, vm: VmRef) {
        let mut waiters = lock(&self.waiters);
        // Ended waiters go (VM pods come and go over a node's life).
        waiters.retain(|_, h| !h.is_finished());
        if waiters.contains_key(&vm.qmp_socket) {
            return;
        }
        let me = Arc::clone(self);
        let key = vm.qmp_socket.clone();
        let span = info_span!("vm_await", socket = %vm.qmp_socket);
        let task = tokio::spawn(async move { me.attach_when_ready(vm).await }.instrument(span));
        waiters.insert(key, task.abort_handle());
    }

    /// The hot-plugs owed to `vm`: (pci, token).
    fn owed_to(&self, vm: &VmRef) -> Vec<(PciAddress, Token)> {
        self.ledger.read(|l| {
            l.iter()
                .filter(|(_, s)| owed_vm(s).is_some_and(|v| v.qmp_socket == vm.qmp_socket))
                .filter_map(|(pci, s)| s.lease().map(|l| (*pci, l.token)))
                .collect()
        })
    }

    /// The waiter: until nothing is owed to `vm` any more, connect; if QEMU answers, do the
    /// owed hot-plugs; if not, sleep until the connector says it may answer now. Ends when an
    /// owed hot-plug failed for another reason than QEMU not running (the reason is recorded
    /// in the attachment; the next connection to this VM, or vfplugd's next start, tries
    /// again), or when waiting is no longer possible (the pod's volume is gone: its DEL comes).
    async fn attach_when_ready(self: Arc<Self>, vm: VmRef) {
        let Some(ports) = self.host.vm.clone() else {
            return;
        };
        loop {
            let owed = self.owed_to(&vm);
            if owed.is_empty() {
                debug!(%vm, "no hot-plug owed any more");
                return;
            }
            match self.vm_link(&vm).await {
                Ok(_) => {
                    let mut retry = false;
                    for (pci, token) in owed {
                        match self.vm_attach(pci, token, &vm).await {
                            Ok(a) => info!(%pci, %vm, alias = %a.alias, port = %a.port,
                                "owed hot-plug done"),
                            // QEMU went away again: wait for the next one.
                            Err(e) if e.kind == ErrorKind::VmNotRunning => retry = true,
                            // Released (DEL) or taken meanwhile: nothing owed.
                            Err(e)
                                if matches!(e.kind, ErrorKind::Busy | ErrorKind::NoSuchDevice) =>
                            {
                                debug!(%pci, error = %e, "owed hot-plug no longer owed");
                            }
                            Err(e) => {
                                warn!(%pci, %vm, error = %e, "owed hot-plug failed; it stays owed");
                                self.record_attach_error(pci, token, &e).await;
                            }
                        }
                    }
                    if !retry {
                        return;
                    }
                }
                Err(e) if e.kind == ErrorKind::VmNotRunning => {
                    debug!(%vm, error = %e, "QEMU not running yet");
                }
                Err(e) => {
                    // A socket there but not usable (an untrusted owner, a failed handshake):
                    // waiting for the volume to change is all that can help.
                    warn!(%vm, error = %e, "QMP socket not usable yet; waiting for it to change");
                }
            }
            if let Err(e) = ports.qmp.ready(&vm).await {
                warn!(%vm, error = %e,
                    "cannot wait for QEMU any more; the owed hot-plugs stay recorded (DEL \
                     releases them, vfplugd's next start tries again)");
                return;
            }
        }
    }

    /// Keeps why an owed hot-plug failed in its attachment (shown with the VM's records).
    async fn record_attach_error(&self, pci: PciAddress, token: Token, e: &ExecError) {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        let cni = self.ledger.read(|l| match l.get(&pci) {
            Some(VfState::Configured { lease }) if lease.token == token => {
                lease.cni.as_deref().cloned()
            }
            _ => None,
        });
        if let Some(mut cni) = cni {
            cni.attach_error = Some(e.msg.clone());
            if let Err(e) = self
                .ledger
                .commit(move |l| l.plan_amend_cni(pci, token, cni))
                .await
            {
                debug!(%pci, error = %e, "attach error not recorded");
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
        let ram = if ports.hostdev.pins_guest_ram() {
            Some(
                link.qmp
                    .call(&QueryMemorySizeSummary {})
                    .await
                    .map_err(|e| qmp_err("query-memory-size-summary", &e))?
                    .total(),
            )
        } else {
            None
        };
        if let (Some(pid), Some(ram)) = (link.pid, ram) {
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
        let add_timeout = device_add_timeout(link.qmp.default_timeout(), ram);

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
        crate::failpoint::hit("attach-attaching");
        let mut last: Option<ExecError> = None;
        for port in candidates {
            let dev = ports.hostdev.device(pci, &alias, &port);
            match link.qmp.call_timeout(&dev, add_timeout).await.map(drop) {
                Ok(()) => {
                    crate::failpoint::hit("attach-device-added");
                    match link.qmp.peripheral_ids().await {
                        Ok(ids) if ids.contains(&alias) => {
                            self.ledger
                                .commit(|l| l.plan_advance(pci, token, Step::Attached))
                                .await?;
                            crate::failpoint::hit("attach-attached");
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
                // No answer (lost, or not within the bound): QEMU may still add it.
                Err(e) if e.is_connection_error() || matches!(e, QmpError::Timeout { .. }) => {
                    return Err(unknown_outcome(&alias, &e));
                }
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
    /// and `query-pci` (what sits behind each). Two attaches into one VM at once may pick the
    /// same port: QEMU refuses the second `device_add` ("in use"/"occupied") and the attach
    /// tries the next port.
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
                crate::failpoint::hit("detach-detaching");
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
            // QEMU may be there (hung, or busy with another client) and the device in its
            // guest: nothing was asked of it, so nothing would finish the detach by itself.
            // The caller fails (a CNI DEL answers 11 and the runtime retries it); the VF stays
            // `Detaching`, which the next connection's reconcile also picks up.
            Err(e) => {
                warn!(%pci, %vm, error = %e, "QMP unreachable during detach; try again");
                return Err(ExecError::new(
                    ErrorKind::TryAgain,
                    format!(
                        "unplug of VF {pci} from VM {vm} not sent, QMP unreachable: {}",
                        e.msg
                    ),
                ));
            }
        };
        match link.qmp.device_del_and_wait(&alias, wait).await {
            Ok(UnplugOutcome::Deleted) => self.detached_locked(pci, token, "DEVICE_DELETED").await,
            Ok(UnplugOutcome::Pending) => {
                crate::failpoint::hit("detach-unplug-pending");
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
                    // Reconnected: the new connection's reconcile re-sends the unplug if QEMU
                    // still has the device, and its watcher finishes it on the event.
                    Ok(_) => {
                        warn!(%pci, %vm, error = %e, "QMP lost during detach; it stays pending");
                        Ok(VmDetach::Pending)
                    }
                    Err(e2) => {
                        warn!(%pci, %vm, error = %e2, "QMP lost during detach and not regained");
                        Err(ExecError::new(
                            ErrorKind::TryAgain,
                            format!(
                                "unplug of VF {pci} from VM {vm}: QMP lost ({e}) and not \
                                 regained: {}",
                                e2.msg
                            ),
                        ))
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
        crate::failpoint::hit("detach-proved");
        self.ledger
            .commit(|l| l.plan_advance(pci, token, Step::Detached))
            .await?;
        crate::failpoint::hit("detach-detached");
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
                // An unplug asked on a connection that was lost (or never sent): ask again.
                // QEMU answers "already in the process of unplug" if it has it; the watcher
                // finishes the removal on DEVICE_DELETED.
                if matches!(state, Some(VfState::Detaching { .. })) {
                    match link.qmp.device_del(&alias).await {
                        Ok(o) => {
                            debug!(%pci, %alias, outcome = ?o, "reconcile: unplug asked again")
                        }
                        Err(e) => warn!(%pci, %alias, error = %e, "reconcile: unplug not asked"),
                    }
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
        let exited = match &self.host.vm {
            Some(p) => p.qmp.exited(&vm, &link).await,
            None => false,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_add_bound_grows_with_the_ram_vfio_pins() {
        let base = Duration::from_secs(10);
        assert_eq!(device_add_timeout(base, None), base);
        assert_eq!(device_add_timeout(base, Some(0)), base);
        // A partial GiB counts whole.
        assert_eq!(
            device_add_timeout(base, Some(256 << 20)),
            Duration::from_secs(12)
        );
        assert_eq!(
            device_add_timeout(base, Some(64 << 30)),
            Duration::from_secs(138)
        );
    }
}
