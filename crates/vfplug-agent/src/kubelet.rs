//! The kubelet's side of the ledger: Allocate and GetPreferredAllocation of each pool
//! ([`PoolBackend`]), and what PodResources says about the kubelet's allocations.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use vfplug_core::ledger::{LedgerError, VfState};
use vfplug_core::{AllocPolicy, Candidate, PciAddress};
use vfplug_kubelet::plugin::{AllocError, ContainerAlloc, PluginBackend, PluginDevice};
use vfplug_kubelet::podresources::{DeviceAllocation, PodResourcesClient, PodResourcesState};
use vfplug_kubelet::sriov;

use crate::metrics::PoolLabel;
use crate::state::{Shared, lock};

/// Turns PodResources' view into ledger facts: devices the kubelet reports are
/// KubeletAllocated; KubeletAllocated devices it no longer reports (after a grace period) are
/// Free again.
pub(crate) fn learn_kubelet_allocations(shared: &Shared, pr: &PodResourcesState) {
    let Some(allocs) = &pr.allocations else {
        return;
    };
    learn(shared, allocs, true);
}

/// Records what the kubelet says it allocated. With `release_stale`, kubelet allocations it no
/// longer reports (after the grace period) go back to Free; a one-off answer asked for by an
/// ADD only adds knowledge.
fn learn(shared: &Shared, allocs: &[DeviceAllocation], release_stale: bool) {
    let mut st = lock(&shared.state);
    let ours: BTreeSet<&String> = st.members.keys().collect();
    let mut reported: BTreeMap<PciAddress, String> = BTreeMap::new();
    for a in allocs.iter().filter(|a| ours.contains(&a.resource_name)) {
        for id in &a.device_ids {
            if let Ok(pci) = id.parse::<PciAddress>() {
                reported.insert(pci, format!("{}/{}", a.namespace, a.pod));
            }
        }
    }
    let now = Instant::now();
    let mut records = Vec::new();
    for (pci, pod) in &reported {
        st.kubelet_seen.insert(*pci, now);
        match st.ledger.get(pci) {
            Some(VfState::Free | VfState::KubeletAllocated { .. }) => {
                match st.ledger.plan_kubelet_allocate(*pci, Some(pod)) {
                    Ok(r) => records.push(r),
                    Err(LedgerError::NoChange { .. }) => {}
                    Err(e) => debug!(%pci, error = %e, "cannot record kubelet allocation"),
                }
            }
            None => {}
            // The pod's own ADD claimed the kubelet's VF: one owner, seen from both sides.
            Some(s)
                if s.lease()
                    .is_some_and(|l| l.from_kubelet && l.owner.pod.is_key(pod)) => {}
            Some(other) => warn!(%pci, state = %other.kind(), %pod,
                "kubelet reports a VF that vfplug holds for another owner; it stays fenced"),
        }
    }
    if !release_stale {
        commit_logged(shared, &mut st, records);
        return;
    }
    let grace_from = st.started;
    let grace = shared.opts.kubelet_alloc_grace;
    let stale: Vec<PciAddress> = st
        .ledger
        .iter()
        .filter(|(pci, s)| {
            matches!(s, VfState::KubeletAllocated { .. }) && !reported.contains_key(pci)
        })
        .filter(|(pci, _)| {
            let seen = st.kubelet_seen.get(pci).copied().unwrap_or(grace_from);
            now.duration_since(seen) >= grace
        })
        .map(|(pci, _)| *pci)
        .collect();
    for pci in stale {
        match st.ledger.plan_kubelet_release(pci) {
            Ok(r) => {
                info!(%pci, "kubelet no longer reports the VF: back to Free");
                records.push(r);
            }
            Err(e) => debug!(%pci, error = %e, "cannot release kubelet allocation"),
        }
        st.kubelet_seen.remove(&pci);
    }
    let freed: Vec<(PciAddress, Option<String>)> = records
        .iter()
        .map(|r| (r.pci(), crate::ports::pool_of_vf(&st, r.pci()).cloned()))
        .collect();
    commit_logged(shared, &mut st, records);
    drop(st);
    for (pci, resource) in freed {
        if let Some(resource) = resource
            && matches!(lock(&shared.state).ledger.get(&pci), Some(VfState::Free))
        {
            remove_device_info(shared, &resource, pci);
        }
    }
}

fn commit_logged(
    shared: &Shared,
    st: &mut crate::state::State,
    records: Vec<vfplug_core::ledger::Record>,
) {
    // Nobody acts on these records (they record what the kubelet did), so nobody waits for
    // them to be durable: they go with the journal's next batch.
    for e in shared.commit_all_lenient(st, records) {
        warn!(error = %e, "ledger refused a kubelet allocation record");
    }
}

/// Asks PodResources once, now (an ADD needs to know which of a pool's kubelet VFs is its pod's
/// before the next poll).
pub(crate) async fn ask_podresources(shared: &Shared, timeout: Duration) -> Result<(), String> {
    let path = shared.opts.pod_resources_socket();
    let allocs = tokio::time::timeout(timeout, async move {
        let mut c = PodResourcesClient::connect(&path)
            .await
            .map_err(|e| e.to_string())?;
        c.list().await.map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))??;
    learn(shared, &allocs, false);
    Ok(())
}

/// Removes the device-info file of `pci` in pool `resource` (written by Allocate).
pub(crate) fn remove_device_info(shared: &Shared, resource: &str, pci: PciAddress) {
    let dir: &Path = &shared.opts.device_info_dir;
    match sriov::remove_device_info(dir, resource, &pci.to_string()) {
        Ok(()) => debug!(%pci, resource, "device-info file removed"),
        Err(e) => warn!(%pci, error = %e, "cannot remove the device-info file"),
    }
}

/// The kubelet-facing side of one pool.
pub(crate) struct PoolBackend {
    pub(crate) shared: Arc<Shared>,
    pub(crate) resource: String,
    pub(crate) devices: watch::Receiver<Vec<PluginDevice>>,
}

impl PoolBackend {
    fn label(&self) -> PoolLabel {
        PoolLabel {
            pool: self.resource.clone(),
        }
    }
}

impl PluginBackend for PoolBackend {
    fn resource_name(&self) -> &str {
        &self.resource
    }

    fn devices(&self) -> watch::Receiver<Vec<PluginDevice>> {
        self.devices.clone()
    }

    fn allocate(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
        let result = self.allocate_inner(req);
        match &result {
            Ok(_) => self
                .shared
                .metrics
                .allocations
                .get_or_create(&self.label())
                .inc(),
            Err(e) => {
                warn!(resource = %self.resource, error = %e, "Allocate refused");
                self.shared
                    .metrics
                    .allocation_errors
                    .get_or_create(&self.label())
                    .inc()
            }
        };
        result
    }

    fn preferred(&self, available: &[String], must_include: &[String], size: usize) -> Vec<String> {
        let st = lock(&self.shared.state);
        let Some(pool) = st
            .config
            .pools
            .iter()
            .find(|p| st.config.resource_name(p) == self.resource)
        else {
            return Vec::new();
        };
        let policy: AllocPolicy = pool.policy;
        let cands: Vec<Candidate> = available
            .iter()
            .filter_map(|id| id.parse::<PciAddress>().ok())
            .filter_map(|pci| st.inventory.vfs.get(&pci))
            .map(|vf| Candidate {
                pci: vf.pci,
                pf: vf.pf,
                numa: vf.numa_node,
            })
            .collect();
        let must: Vec<PciAddress> = must_include
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        vfplug_core::preferred(policy, &cands, &must, size)
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

impl PoolBackend {
    fn allocate_inner(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
        let shared = &self.shared;
        let mut st = lock(&shared.state);
        let config = Arc::clone(&st.config);
        let pool = config
            .pools
            .iter()
            .find(|p| config.resource_name(p) == self.resource)
            .ok_or_else(|| AllocError::Internal(format!("pool {} is gone", self.resource)))?;
        let mut params = sriov::SriovAllocParams::new(config.prefix_of(pool), pool.name.clone());
        params.cdi = shared.opts.use_cdi;
        let members: BTreeSet<PciAddress> = st
            .members
            .get(&self.resource)
            .into_iter()
            .flatten()
            .copied()
            .collect();

        let mut out = Vec::with_capacity(req.len());
        let mut records = Vec::new();
        let mut planned = BTreeSet::new();
        for ids in req {
            let mut devs = Vec::with_capacity(ids.len());
            for id in ids {
                let pci: PciAddress = id
                    .parse()
                    .map_err(|_| AllocError::UnknownDevice(id.clone()))?;
                if !members.contains(&pci) {
                    return Err(AllocError::UnknownDevice(id.clone()));
                }
                let vf = st
                    .inventory
                    .vfs
                    .get(&pci)
                    .ok_or_else(|| AllocError::UnknownDevice(id.clone()))?;
                match st.ledger.get(&pci) {
                    None | Some(VfState::Free) => {
                        if planned.insert(pci) {
                            let r = st.ledger.plan_kubelet_allocate(pci, None).map_err(|e| {
                                AllocError::Unavailable {
                                    id: id.clone(),
                                    reason: e.to_string(),
                                }
                            })?;
                            records.push(r);
                        }
                    }
                    // The kubelet re-allocates devices it already holds (e.g. after its restart),
                    // including one its pod's ADD has configured (or attached to its VM) since.
                    // One being set up or restored right now is refused until that is done.
                    Some(VfState::KubeletAllocated { .. }) => {}
                    Some(VfState::Configured { lease } | VfState::Attached { lease, .. })
                        if lease.from_kubelet => {}
                    Some(other) => {
                        return Err(AllocError::Unavailable {
                            id: id.clone(),
                            reason: format!(
                                "held by vfplug ({}), not by the kubelet",
                                other.kind()
                            ),
                        });
                    }
                }
                let dev =
                    crate::devices::sriov_device(&shared.opts, pool, vf).map_err(|reason| {
                        AllocError::Unavailable {
                            id: id.clone(),
                            reason,
                        }
                    })?;
                devs.push(dev);
            }
            sriov::check_nodes(&shared.opts.dev_root, &devs)
                .map_err(|e| AllocError::Internal(e.to_string()))?;
            let alloc = sriov::container_alloc(&params, &devs)
                .map_err(|e| AllocError::Internal(e.to_string()))?;
            for d in &devs {
                if let Err(e) =
                    sriov::write_device_info(&shared.opts.device_info_dir, &self.resource, d)
                {
                    warn!(pci = %d.pci, error = %e, "cannot write the device-info file");
                }
            }
            out.push(alloc);
        }
        // The kubelet's own checkpoint and PodResources are the durable source of its
        // allocations: the records go with the journal's next batch and Allocate does not wait.
        let _ticket = shared
            .commit_all_unawaited(&mut st, records)
            .map_err(|e| AllocError::Internal(format!("ledger: {e}")))?;
        let now = Instant::now();
        for pci in planned {
            st.kubelet_seen.insert(pci, now);
        }
        Ok(out)
    }
}
