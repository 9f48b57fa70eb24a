//! The agent's side of the executor's ports: the live ledger under the short state lock with
//! the group-committed journal behind it ([`crate::store`]), the node's view of VFs and pools,
//! and the pool policy of an ADD (which VF an attachment gets).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};
use vfplug_core::ledger::{Ledger, LedgerError, Record, VfState};
use vfplug_core::{PciAddress, PoolConfig};
use vfplug_executor::{ErrorKind, ExecError, LedgerPort, ReserveRequest, Reserved, VfFacts};

use crate::pools::{resolve_pool, vf_healthy};
use crate::state::{Shared, State, lock};

/// How long an ADD waits for a one-off PodResources answer when it must learn which of the
/// pool's kubelet-allocated VFs is its pod's.
const PODRESOURCES_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The executor as the agent runs it.
pub(crate) type AgentExecutor = vfplug_executor::Executor<AgentLedger>;

/// The executor's ledger port over the agent's shared state.
#[derive(Debug, Clone)]
pub struct AgentLedger {
    pub(crate) shared: Arc<Shared>,
}

fn store_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::internal("ledger write", e)
}

/// The resource name of the pool a VF is in.
pub(crate) fn pool_of_vf(st: &State, pci: PciAddress) -> Option<&String> {
    st.members
        .iter()
        .find(|(_, m)| m.contains(&pci))
        .map(|(r, _)| r)
}

pub(crate) fn facts(st: &State, pci: PciAddress) -> Result<VfFacts, ExecError> {
    let vf = st.inventory.vfs.get(&pci).ok_or_else(|| {
        ExecError::new(ErrorKind::NoSuchDevice, format!("no VF {pci} on this node"))
    })?;
    let (resource, pool) = pool_of_vf(st, pci)
        .and_then(|r| resolve_pool(st, r))
        .ok_or_else(|| {
            ExecError::new(
                ErrorKind::NoSuchDevice,
                format!("VF {pci} is not in any pool of vfplugd's config"),
            )
        })?;
    Ok(VfFacts {
        pci,
        pf_pci: vf.pf,
        pf_netdev: vf.pf_netdev.clone(),
        vf_index: vf.vf_index,
        driver: vf.driver.clone(),
        resource,
        pool: pool.clone(),
    })
}

/// The VFs of a pool that an ADD without deviceID may take: Free in the ledger and healthy as
/// the device plugin reports them. ADD picks from these and STATUS counts them, so the two can
/// never disagree.
pub(crate) fn free_vfs<'a>(
    st: &'a State,
    resource: &str,
    pool: &'a PoolConfig,
) -> impl Iterator<Item = PciAddress> + 'a {
    st.members
        .get(resource)
        .into_iter()
        .flatten()
        .filter_map(|pci| st.inventory.vfs.get(pci))
        .filter(move |vf| {
            matches!(st.ledger.get(&vf.pci), None | Some(VfState::Free)) && vf_healthy(st, pool, vf)
        })
        .map(|vf| vf.pci)
}

/// What the pool `resource` holds for the pod of `req`, by the kubelet: (known to be the pod's,
/// allocated to a pod not yet known).
fn kubelet_vfs_of_pod(
    st: &State,
    resource: &str,
    req: &ReserveRequest,
) -> (Vec<PciAddress>, usize) {
    let mut mine = Vec::new();
    let mut unknown = 0;
    for pci in st.members.get(resource).into_iter().flatten() {
        if let Some(VfState::KubeletAllocated { pod }) = st.ledger.get(pci) {
            match pod {
                Some(p) if req.owner.pod.is_key(p) => mine.push(*pci),
                Some(_) => {}
                None => unknown += 1,
            }
        }
    }
    (mine, unknown)
}

/// Every kubelet-allocated VF of the pod, with its pool: for the error of an ADD that names
/// neither deviceID nor pool.
fn kubelet_vfs_of(st: &State, req: &ReserveRequest) -> Vec<(PciAddress, String)> {
    st.ledger
        .iter()
        .filter_map(|(pci, s)| match s {
            VfState::KubeletAllocated { pod: Some(p) } if req.owner.pod.is_key(p) => {
                pool_of_vf(st, *pci).map(|r| (*pci, r.clone()))
            }
            _ => None,
        })
        .collect()
}

enum Pick {
    /// Reserve these records (one or two) for this VF.
    Records(PciAddress, Vec<Record>),
    /// Ask PodResources which pod has which VF, then pick again.
    AskKubelet,
}

impl AgentLedger {
    /// The port over `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Plans the reservation under the state lock.
    fn pick(&self, st: &State, req: &ReserveRequest, asked: bool) -> Result<Pick, ExecError> {
        let owner = &req.owner;
        let ledger_err = |e: &LedgerError| ExecError::ledger(e);
        if let Some(pci) = req.device {
            let f = facts(st, pci)?;
            if let Some(pool) = &req.pool
                && resolve_pool(st, pool).map(|p| p.0) != Some(f.resource.clone())
            {
                warn!(%pci, pool = %pool, actual = %f.resource, "deviceID given: the pool key is ignored");
            }
            // A deviceID comes from the kubelet's allocation for this pod (Multus reads it from
            // the kubelet's checkpoint). If the ledger has not heard of that allocation (vfplugd
            // restarted since), ask PodResources once, so the lease is the kubelet's: it stays
            // Healthy towards the kubelet (counted once) and returns to its accounting.
            if matches!(st.ledger.get(&pci), Some(VfState::Free))
                && !asked
                && owner.pod.key().is_some()
            {
                return Ok(Pick::AskKubelet);
            }
            let records = vec![
                st.ledger
                    .plan_reserve(pci, owner)
                    .map_err(|e| ledger_err(&e))?,
            ];
            return Ok(Pick::Records(pci, records));
        }
        let Some(pool) = req.pool.as_deref() else {
            let held = kubelet_vfs_of(st, req);
            let hint = match held.first() {
                Some((pci, resource)) => format!(
                    "; the kubelet gave this pod VF {pci} of {resource}: annotate the \
                     NetworkAttachmentDefinition with k8s.v1.cni.cncf.io/resourceName: {resource} \
                     so Multus passes it as deviceID, or set \"pool\": \"{resource}\""
                ),
                None => String::new(),
            };
            return Err(ExecError::new(
                ErrorKind::InvalidConfig,
                format!(
                    "neither deviceID nor pool is set; vfplug needs the VF's PCI address or a pool{hint}"
                ),
            ));
        };
        let (resource, pool_cfg) = resolve_pool(st, pool).ok_or_else(|| {
            ExecError::new(
                ErrorKind::NoSuchDevice,
                format!("pool {pool:?} is not in vfplugd's config"),
            )
        })?;
        // The pod's own kubelet allocation in this pool comes first: the pod asked the kubelet
        // for it (limits) and its PCIDEVICE_* env names it.
        let (mine, unknown) = kubelet_vfs_of_pod(st, &resource, req);
        if let Some(pci) = mine.first() {
            let r = st
                .ledger
                .plan_reserve(*pci, owner)
                .map_err(|e| ledger_err(&e))?;
            return Ok(Pick::Records(*pci, vec![r]));
        }
        if unknown > 0 && !asked && owner.pod.key().is_some() {
            return Ok(Pick::AskKubelet);
        }
        let pci = free_vfs(st, &resource, pool_cfg).next().ok_or_else(|| {
            ExecError::new(
                ErrorKind::TryAgain,
                format!("pool {resource} has no free, healthy VF"),
            )
        })?;
        let r = st
            .ledger
            .plan_reserve(pci, owner)
            .map_err(|e| ledger_err(&e))?;
        Ok(Pick::Records(pci, vec![r]))
    }
}

impl LedgerPort for AgentLedger {
    async fn commit<F>(&self, plan: F) -> Result<Record, ExecError>
    where
        F: FnOnce(&Ledger) -> Result<Record, LedgerError> + Send,
    {
        let (rec, ticket) = {
            let mut st = lock(&self.shared.state);
            let rec = plan(&st.ledger).map_err(|e| ExecError::ledger(&e))?;
            let ticket = self
                .shared
                .commit_one(&mut st, rec.clone())
                .map_err(|e| ExecError::ledger(&e))?;
            (rec, ticket)
        };
        self.shared
            .journal
            .durable(ticket)
            .await
            .map_err(store_err)?;
        Ok(rec)
    }

    fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&lock(&self.shared.state).ledger)
    }

    fn vf(&self, pci: PciAddress) -> Result<VfFacts, ExecError> {
        facts(&lock(&self.shared.state), pci)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Reserved, ExecError> {
        let mut asked = false;
        loop {
            let picked = {
                let mut st = lock(&self.shared.state);
                match self.pick(&st, req, asked)? {
                    Pick::Records(pci, records) => {
                        let token =
                            records.last().and_then(Record::new_token).ok_or_else(|| {
                                ExecError::internal("ledger", "reservation issued no token")
                            })?;
                        let f = facts(&st, pci)?;
                        let ticket = self
                            .shared
                            .commit_all(&mut st, records)
                            .map_err(|e| ExecError::ledger(&e))?;
                        Some((ticket, token, f))
                    }
                    Pick::AskKubelet => None,
                }
            };
            match picked {
                Some((ticket, token, facts)) => {
                    self.shared
                        .journal
                        .durable(ticket)
                        .await
                        .map_err(store_err)?;
                    return Ok(Reserved { token, facts });
                }
                None => {
                    asked = true;
                    debug!(attachment = %req.owner, "asking PodResources which VFs the pod holds");
                    if let Err(e) =
                        crate::kubelet::ask_podresources(&self.shared, PODRESOURCES_ASK_TIMEOUT)
                            .await
                    {
                        info!(error = %e, "PodResources did not answer; going on with what the ledger knows");
                    }
                }
            }
        }
    }

    fn lease_ended(&self, pci: PciAddress, facts: Option<&VfFacts>) {
        // A VF back in the kubelet's accounting still belongs to the pod the kubelet gave it
        // to; its device-info file goes when the kubelet lets go (see `kubelet`).
        let free = matches!(
            lock(&self.shared.state).ledger.get(&pci),
            None | Some(VfState::Free)
        );
        if let (true, Some(f)) = (free, facts) {
            crate::kubelet::remove_device_info(&self.shared, &f.resource, pci);
        }
    }
}

/// How long a QEMU whose QMP connection ended is waited for to exit before the connection's end
/// is taken as just that (the next call reconnects and reconciles).
const QEMU_EXIT_WAIT: Duration = Duration::from_secs(30);

/// The executor's QMP connector for VM pods: the socket is resolved below the pod's volume dir
/// under the kubelet dir, never following a symlink, owned by a trusted uid (vfplug-host's
/// `vmpod`); QEMU's pid comes from the socket's peer credentials.
#[derive(Debug)]
pub struct PodQmp {
    pub(crate) kubelet_dir: std::path::PathBuf,
    pub(crate) trusted: std::collections::BTreeSet<u32>,
    /// Per VM (QMP socket path), the socket file (device, inode, ctime) that refused connections: a
    /// stale socket of a QEMU that is gone. [`Self::ready`] waits for another one.
    pub(crate) refused: Mutex<std::collections::HashMap<String, (u64, u64, i64, i64)>>,
}

impl PodQmp {
    /// A connector for VM pods below `kubelet_dir`, trusting sockets owned by `trusted`.
    pub fn new(kubelet_dir: std::path::PathBuf, trusted: std::collections::BTreeSet<u32>) -> Self {
        Self {
            kubelet_dir,
            trusted,
            refused: Mutex::default(),
        }
    }

    fn resolve(
        &self,
        vm: &vfplug_core::VmRef,
    ) -> Result<vfplug_host::vmpod::QmpSocket, vfplug_host::vmpod::VmPodError> {
        vfplug_host::vmpod::resolve_qmp_socket(
            &self.kubelet_dir,
            &vm.pod.uid,
            &vm.qmp_spec,
            &self.trusted,
        )
    }

    /// Connects; a refusal by a socket not seen refusing before is looked at twice more,
    /// briefly: QEMU binds its socket a moment before it listens, and the volume watch may
    /// wake in between. A socket that keeps refusing is remembered as stale.
    async fn connect_fresh(
        &self,
        vm: &vfplug_core::VmRef,
    ) -> Result<tokio::net::UnixStream, vfplug_host::vmpod::VmPodError> {
        let sock = self.resolve(vm)?;
        let known_stale = lock(&self.refused).get(&vm.qmp_socket) == Some(&sock.identity());
        let delays: &[u64] = if known_stale { &[] } else { &[50, 250] };
        let mut r = sock.connect_async();
        for ms in delays {
            match &r {
                Err(e) if e.is_refused() => {
                    tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
                    r = sock.connect_async();
                }
                _ => break,
            }
        }
        let mut refused = lock(&self.refused);
        match &r {
            Err(e) if e.is_refused() => {
                refused.insert(vm.qmp_socket.clone(), sock.identity());
            }
            Ok(_) => {
                refused.remove(&vm.qmp_socket);
            }
            Err(_) => {}
        }
        r
    }
}

impl vfplug_executor::QmpConnector for PodQmp {
    fn connect<'a>(
        &'a self,
        vm: &'a vfplug_core::VmRef,
    ) -> vfplug_executor::vm::BoxFuture<'a, Result<vfplug_executor::VmLink, ExecError>> {
        Box::pin(async move {
            // A socket (or pod volume) that is gone, or one nobody listens on: QEMU is not
            // running. Anything else (a refusal, a timeout) says nothing about QEMU.
            let classify = |e: &vfplug_host::vmpod::VmPodError| {
                let kind = if e.is_missing() || e.is_refused() {
                    ErrorKind::VmNotRunning
                } else {
                    ErrorKind::TryAgain
                };
                ExecError::new(kind, format!("VM {vm}: QMP socket not usable: {e}"))
            };
            let stream = self.connect_fresh(vm).await.map_err(|e| classify(&e))?;
            let not_there = |e: &dyn std::fmt::Display| {
                ExecError::new(
                    ErrorKind::TryAgain,
                    format!("VM {vm}: QMP negotiation failed: {e}"),
                )
            };
            let pid = vfplug_host::vmpod::peer_cred(&stream)
                .map(|c| c.pid)
                .map_err(|e| warn!(%vm, error = %e, "no QEMU pid from the QMP socket; RLIMIT_MEMLOCK not raised"))
                .ok();
            let qmp = vfplug_qmp::Qmp::from_stream(stream)
                .await
                .map_err(|e| not_there(&e))?;
            Ok(vfplug_executor::VmLink {
                qmp: Arc::new(qmp),
                pid,
            })
        })
    }

    fn can_wait(&self, vm: &vfplug_core::VmRef) -> Result<(), ExecError> {
        vfplug_host::vmpod::VolumeWatch::new(&self.kubelet_dir, &vm.pod.uid, &vm.qmp_spec)
            .map(drop)
            .map_err(|e| {
                ExecError::new(
                    ErrorKind::TryAgain,
                    format!("VM {vm}: the pod's QMP socket volume is not usable: {e}"),
                )
            })
    }

    fn ready<'a>(
        &'a self,
        vm: &'a vfplug_core::VmRef,
    ) -> vfplug_executor::vm::BoxFuture<'a, Result<(), ExecError>> {
        Box::pin(async move {
            let gone = |e: &dyn std::fmt::Display| {
                ExecError::new(
                    ErrorKind::VmNotRunning,
                    format!("VM {vm}: cannot watch the pod's QMP socket volume: {e}"),
                )
            };
            loop {
                // Armed before the look, so that nothing created in between is missed.
                let mut watch = vfplug_host::vmpod::VolumeWatch::new(
                    &self.kubelet_dir,
                    &vm.pod.uid,
                    &vm.qmp_spec,
                )
                .map_err(|e| gone(&e))?;
                // A socket there that is not the stale one: QEMU (re)started.
                if let Ok(sock) = self.resolve(vm)
                    && lock(&self.refused).get(&vm.qmp_socket) != Some(&sock.identity())
                {
                    return Ok(());
                }
                debug!(%vm, dir = %watch.path().display(), "waiting for QEMU's QMP socket");
                if watch.changed().await.map_err(|e| gone(&e))? {
                    return Err(gone(&"the volume was removed"));
                }
            }
        })
    }

    fn exited<'a>(
        &'a self,
        vm: &'a vfplug_core::VmRef,
        link: &'a vfplug_executor::VmLink,
    ) -> vfplug_executor::vm::BoxFuture<'a, bool> {
        Box::pin(async move {
            // No pid (another pid namespace): only a closed connection is known, which is not
            // proof. With one: QEMU closes its QMP connection while it exits, and may take a
            // while to be gone (unpinning a large guest's RAM), so its exit is waited for.
            let Some(pid) = link.pid else {
                return false;
            };
            match vfplug_host::vmpod::wait_exit(pid, QEMU_EXIT_WAIT).await {
                Ok(exited) => exited,
                Err(e) => {
                    warn!(%vm, pid, error = %e, "cannot wait for QEMU's exit");
                    false
                }
            }
        })
    }
}
