//! The node API (`proto/vfplug/v1/node.proto`): what the `vfplug` CNI shim asks of vfplugd.
//!
//! Every operation follows the ledger's write-ahead rule: the record announcing a change is
//! synced before the host is touched.
//!
//! - **Add**: reserve a VF for the attachment (the given `deviceID`, or a free VF of the pool) →
//!   read the VF's settings and its netdev's identity → persist `Configured` with all of it
//!   ([`CniAttachment`]) → apply the settings through the PF (per-PF lock) → netdev mode: move
//!   the netdev into the pod; vfio mode: make sure it is on vfio-pci. Any failure after the
//!   reservation runs the same release path as DEL, so a failed ADD leaves nothing behind.
//!   A repeated ADD of the same (container ID, ifname) returns the first result.
//! - **Del**: find the VF by (container ID, ifname) in the ledger, bring the netdev back from
//!   wherever it is, restore the saved settings, release. Nothing held → success. A VF whose
//!   restore fails is quarantined (never silently freed) and the DEL still succeeds, so the
//!   runtime does not retry forever; the VF shows in `List` and metrics.
//! - **Check**: ledger, PF-side settings and netdev placement against what ADD recorded.
//! - **Gc**: release every attachment *of the named network* that is not in the valid list.
//!
//! Fencing: all of the above locate the VF through the ledger's owner index and act with the
//! lease's token, so an old attachment's DEL can never touch a VF a new attachment holds.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vfplug_api::CniCode;
use vfplug_api::v1;
use vfplug_core::ledger::{LedgerError, Owner, Record, Step, Token, VfState};
use vfplug_core::{
    AttachMode, CniAttachment, DeviceMode, MacAddr, NetdevPlacement, PciAddress, PoolConfig,
    SavedVfState, VfConfig, VfLinkState, VlanProto,
};
use vfplug_host::driver::{DriverBinder, SysfsDriverBinder, VFIO_PCI};
use vfplug_host::net::{IpNet, NetError, PlaceRequest, RetrieveRequest, Retrieved, RouteSpec};
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::vfset;

use crate::engine::{Shared, State, lock, vf_healthy};

/// A node-API failure: the CNI code the shim prints, a message, and details.
#[derive(Debug)]
pub(crate) struct NodeError {
    code: CniCode,
    msg: String,
    details: String,
}

impl NodeError {
    fn new(code: CniCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        vfplug_api::status(e.code, e.msg, e.details)
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::new(CniCode::Internal, format!("{what}: {e}"))
}

fn blocking_failed(e: tokio::task::JoinError) -> NodeError {
    internal("host task failed", e)
}

/// What the release path found and did.
#[derive(Debug, Default)]
struct ReleaseOutcome {
    released: bool,
    note: String,
    warnings: Vec<String>,
}

/// The node API service.
#[derive(Debug)]
pub(crate) struct NodeService {
    shared: Arc<Shared>,
    ready: watch::Receiver<bool>,
    /// One async lock per VF: an operation on a VF holds it from its first ledger record to its
    /// last, so two operations never interleave host work on one VF.
    vf_locks: Mutex<HashMap<PciAddress, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per PF netdev, held (on a blocking thread) around every PF netlink write:
    /// concurrent VF changes on one PF fail on some drivers (sriov-cni #34, #213).
    pf_locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

/// Facts about one VF read under the state lock, used outside it.
#[derive(Clone, Debug)]
struct VfFacts {
    pci: PciAddress,
    pf_pci: PciAddress,
    pf_netdev: Option<String>,
    vf_index: u32,
    driver: Option<String>,
    resource: String,
    pool: PoolConfig,
}

/// The pod fields of an [`v1::Attachment`] from the ledger's pod key (see [`owner_of`]).
fn owner_attachment(pod: &str) -> v1::Attachment {
    match pod.split_once('/') {
        Some((ns, name)) => v1::Attachment {
            pod_namespace: ns.to_owned(),
            pod_name: name.to_owned(),
            ..Default::default()
        },
        None => v1::Attachment {
            pod_uid: pod.to_owned(),
            ..Default::default()
        },
    }
}

/// The ledger's owner for an attachment. The pod is named `namespace/name` when the runtime
/// says both (CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME), because that is how PodResources names
/// the pods of kubelet's allocations, so a VF kubelet gave this pod can be claimed; else by UID.
fn owner_of(a: &v1::Attachment) -> Owner {
    let pod = if a.pod_namespace.is_empty() || a.pod_name.is_empty() {
        a.pod_uid.clone()
    } else {
        format!("{}/{}", a.pod_namespace, a.pod_name)
    };
    Owner {
        pod,
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
    }
}

fn check_attachment(a: Option<&v1::Attachment>) -> Result<&v1::Attachment, NodeError> {
    let a = a.ok_or_else(|| NodeError::new(CniCode::InvalidEnv, "attachment is missing"))?;
    if a.container_id.is_empty() {
        return Err(NodeError::new(
            CniCode::InvalidEnv,
            "CNI_CONTAINERID is empty",
        ));
    }
    if a.ifname.is_empty() {
        return Err(NodeError::new(CniCode::InvalidEnv, "CNI_IFNAME is empty"));
    }
    Ok(a)
}

fn bad(field: &str, msg: impl std::fmt::Display) -> NodeError {
    NodeError::new(CniCode::InvalidConfig, format!("{field}: {msg}"))
}

/// The proto's settings as core's, validated (the shim validates too; vfplugd does not trust it).
fn vf_config(c: Option<&v1::VfConfig>) -> Result<VfConfig, NodeError> {
    let Some(c) = c else {
        return Ok(VfConfig::default());
    };
    let small = |field: &str, v: Option<u32>, max: u32| -> Result<Option<u32>, NodeError> {
        match v {
            Some(v) if v > max => Err(bad(field, format!("{v} is out of range 0..={max}"))),
            v => Ok(v),
        }
    };
    let cfg = VfConfig {
        mac: c
            .mac
            .as_deref()
            .map(str::parse::<MacAddr>)
            .transpose()
            .map_err(|e| bad("mac", e))?,
        vlan: small("vlan", c.vlan, 4094)?.map(|v| v as u16),
        vlan_qos: small("vlanQoS", c.vlan_qos, 7)?.map(|v| v as u8),
        vlan_proto: c
            .vlan_proto
            .as_deref()
            .map(str::parse::<VlanProto>)
            .transpose()
            .map_err(|e| bad("vlanProto", e))?,
        spoofchk: c.spoofchk,
        trust: c.trust,
        link_state: c
            .link_state
            .as_deref()
            .map(str::parse::<VfLinkState>)
            .transpose()
            .map_err(|e| bad("link_state", e))?,
        min_tx_rate: c.min_tx_rate,
        max_tx_rate: c.max_tx_rate,
        mtu: c.mtu,
    };
    cfg.validate().map_err(|e| bad(e.field, e.message))?;
    Ok(cfg)
}

fn parse_ips(ips: &[v1::IpConfig]) -> Result<Vec<IpNet>, NodeError> {
    ips.iter()
        .map(|i| i.address.parse::<IpNet>().map_err(|e| bad("ips", e)))
        .collect()
}

fn parse_routes(
    routes: &[v1::RouteConfig],
    ips: &[v1::IpConfig],
) -> Result<Vec<RouteSpec>, NodeError> {
    routes
        .iter()
        .map(|r| {
            let dst = r.dst.parse::<IpNet>().map_err(|e| bad("routes", e))?;
            let gw = if r.gw.is_empty() {
                // CNI: a route without gw goes via the gateway of its family, if IPAM gave one.
                ips.iter()
                    .filter_map(|i| i.gateway.parse::<std::net::IpAddr>().ok())
                    .find(|g| g.is_ipv4() == dst.addr.is_ipv4())
            } else {
                Some(
                    r.gw.parse()
                        .map_err(|_| bad("routes", format!("{:?} is not an IP address", r.gw)))?,
                )
            };
            Ok(RouteSpec { dst, gw })
        })
        .collect()
}

fn resolve_pool<'a>(st: &'a State, name: &str) -> Option<(String, &'a PoolConfig)> {
    st.config
        .pools
        .iter()
        .find(|p| p.name == name || st.config.resource_name(p) == name)
        .map(|p| (st.config.resource_name(p), p))
}

/// The `deviceID`, if one is given.
fn device_of(id: &str) -> Result<Option<PciAddress>, NodeError> {
    if id.is_empty() {
        return Ok(None);
    }
    id.parse().map(Some).map_err(|e| bad("deviceID", e))
}

/// The VFs of a pool that an ADD without deviceID may take: Free in the ledger and healthy as
/// the device plugin reports them. ADD picks from these and STATUS counts them, so the two can
/// never disagree.
fn free_vfs<'a>(
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

/// The resource name of the pool a VF is in.
fn pool_of_vf(st: &State, pci: PciAddress) -> Option<&String> {
    st.members
        .iter()
        .find(|(_, m)| m.contains(&pci))
        .map(|(r, _)| r)
}

fn facts(st: &State, pci: PciAddress) -> Result<VfFacts, NodeError> {
    let vf = st.inventory.vfs.get(&pci).ok_or_else(|| {
        NodeError::new(CniCode::NoSuchDevice, format!("no VF {pci} on this node"))
    })?;
    let (resource, pool) = pool_of_vf(st, pci)
        .and_then(|r| resolve_pool(st, r))
        .ok_or_else(|| {
            NodeError::new(
                CniCode::NoSuchDevice,
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

fn mode_of(pool: &PoolConfig) -> AttachMode {
    match pool.device_mode {
        DeviceMode::Netdev => AttachMode::Netdev,
        DeviceMode::Vfio => AttachMode::Vfio,
    }
}

/// Whether `state` is a completed ADD of the same request (same VF if one is named, same
/// settings, same netns): a repeat is answered from the ledger.
fn is_repeat(
    state: &VfState,
    pci: PciAddress,
    device: Option<PciAddress>,
    cfg: &VfConfig,
    netns: &str,
) -> bool {
    let VfState::Configured { lease } = state else {
        return false;
    };
    device.is_none_or(|d| d == pci)
        && lease
            .cni
            .as_deref()
            .is_some_and(|c| c.config == *cfg && c.netns == netns)
}

fn lease_token(s: &VfState) -> Option<Token> {
    s.effective_lease().map(|l| l.token)
}

impl NodeService {
    pub(crate) fn new(shared: Arc<Shared>, ready: watch::Receiver<bool>) -> Self {
        Self {
            shared,
            ready,
            vf_locks: Mutex::default(),
            pf_locks: Arc::default(),
        }
    }

    fn vf_lock(&self, pci: PciAddress) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.vf_locks).entry(pci).or_default())
    }

    fn pf_lock(&self, pf: &str) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.pf_locks).entry(pf.to_owned()).or_default())
    }

    /// Plans with `plan` under the state lock and commits (synced) the record.
    fn commit_one(
        &self,
        plan: impl FnOnce(&State) -> Result<Record, LedgerError>,
    ) -> Result<Record, NodeError> {
        let mut st = lock(&self.shared.state);
        let rec = plan(&st).map_err(|e| ledger_error(&e))?;
        self.shared
            .commit(&mut st, vec![rec.clone()], true)
            .map_err(|e| internal("ledger write", e))?;
        Ok(rec)
    }

    fn current(&self, pci: PciAddress) -> Option<VfState> {
        lock(&self.shared.state).ledger.get(&pci).cloned()
    }

    fn response(&self, pci: PciAddress, existing: bool) -> Result<v1::AddResponse, NodeError> {
        let st = lock(&self.shared.state);
        let state = st
            .ledger
            .get(&pci)
            .ok_or_else(|| internal("ledger", format!("VF {pci} vanished")))?;
        let lease = state
            .lease()
            .ok_or_else(|| internal("ledger", format!("VF {pci} is not held")))?;
        let cni = lease
            .cni
            .as_deref()
            .ok_or_else(|| internal("ledger", format!("VF {pci} has no attachment record")))?;
        let f = facts(&st, pci)?;
        let (ifname, mac, mtu) = match &cni.netdev {
            Some(n) => (
                n.pod_ifname.clone(),
                n.pod_mac.map(|m| m.to_string()).unwrap_or_default(),
                n.pod_mtu,
            ),
            None => (
                lease.owner.ifname.clone(),
                cni.config.mac.map(|m| m.to_string()).unwrap_or_default(),
                0,
            ),
        };
        Ok(v1::AddResponse {
            pci_address: pci.to_string(),
            pf_pci_address: f.pf_pci.to_string(),
            mode: cni.mode.to_string(),
            ifname,
            mac,
            mtu,
            sandbox: cni.netns.clone(),
            existing,
            warnings: cni.skipped.clone(),
            token: lease.token,
            pool: f.resource,
            ipam_result: cni.ipam_result.clone(),
        })
    }

    async fn add(&self, req: v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let owner = owner_of(att);
        let cfg = vf_config(req.config.as_ref())?;
        let ips = parse_ips(&req.ips)?;
        let routes = parse_routes(&req.routes, &req.ips)?;
        let device = device_of(&req.device_id)?;

        // Idempotency: the same attachment again.
        let earlier = {
            let st = lock(&self.shared.state);
            st.ledger
                .find_by_attachment(&owner.container_id, &owner.ifname)
                .map(|(pci, s)| (pci, s.clone()))
        };
        if let Some((pci, state)) = earlier {
            if is_repeat(&state, pci, device, &cfg, &req.netns) {
                info!(%pci, attachment = %owner, "repeated ADD: returning the first result");
                return self.response(pci, true);
            }
            // A different request for the same attachment, or an ADD that never finished
            // (vfplugd died half-way): undo it, then start afresh.
            warn!(%pci, attachment = %owner, state = %state.kind(),
                "ADD for an attachment that already holds a VF: releasing it first");
            self.release(pci, &owner, "superseded by a new ADD").await?;
        }

        // Pick the VF and reserve it (one state-lock section: two ADDs never pick the same VF).
        let (rec, f) = {
            let mut st = lock(&self.shared.state);
            let pci = match device {
                Some(pci) => pci,
                None => self.pick_free(&st, &req.pool)?,
            };
            let f = facts(&st, pci)?;
            if device.is_some()
                && !req.pool.is_empty()
                && resolve_pool(&st, &req.pool).map(|p| p.0) != Some(f.resource.clone())
            {
                warn!(%pci, pool = %req.pool, actual = %f.resource, "deviceID given: the pool key is ignored");
            }
            let rec = st
                .ledger
                .plan_reserve(pci, &owner)
                .map_err(|e| ledger_error(&e))?;
            self.shared
                .commit(&mut st, vec![rec.clone()], true)
                .map_err(|e| internal("ledger write", e))?;
            (rec, f)
        };
        let pci = f.pci;
        let token = rec
            .new_token()
            .ok_or_else(|| internal("ledger", "reservation issued no token"))?;
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        info!(%pci, attachment = %owner, token, pool = %f.resource, "VF reserved");

        match self
            .configure(&f, token, &owner, &req, cfg, ips, routes)
            .await
        {
            Ok(()) => {
                self.shared.metrics.cni_ops("add", "ok");
                self.response(pci, false)
            }
            Err(e) => {
                warn!(%pci, attachment = %owner, error = %e.msg, "ADD failed: rolling back");
                self.shared.metrics.cni_ops("add", "error");
                if let Err(re) = self.release_locked(pci, token, "ADD failed").await {
                    warn!(%pci, error = %re.msg, "rollback of the failed ADD did not finish");
                }
                Err(e)
            }
        }
    }

    /// What `add` would answer for a repeat; changes nothing.
    fn lookup(&self, req: &v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let cfg = vf_config(req.config.as_ref())?;
        let device = device_of(&req.device_id)?;
        let found = {
            let st = lock(&self.shared.state);
            st.ledger
                .find_by_attachment(&att.container_id, &att.ifname)
                .map(|(pci, s)| (pci, s.clone()))
        };
        match found {
            Some((pci, state)) if is_repeat(&state, pci, device, &cfg, &req.netns) => {
                self.response(pci, true)
            }
            _ => Err(NodeError::new(
                CniCode::UnknownContainer,
                "no completed ADD of this attachment with this config",
            )),
        }
    }

    fn pick_free(&self, st: &State, pool: &str) -> Result<PciAddress, NodeError> {
        if pool.is_empty() {
            return Err(bad("pool", "needed when there is no deviceID"));
        }
        let (resource, pool_cfg) = resolve_pool(st, pool).ok_or_else(|| {
            NodeError::new(
                CniCode::NoSuchDevice,
                format!("pool {pool:?} is not in vfplugd's config"),
            )
        })?;
        free_vfs(st, &resource, pool_cfg).next().ok_or_else(|| {
            NodeError::new(
                CniCode::TryAgainLater,
                format!("pool {resource} has no free, healthy VF"),
            )
        })
    }

    /// Reserved → Configured → settings applied → netdev placed (or vfio checked).
    #[allow(clippy::too_many_arguments)]
    async fn configure(
        &self,
        f: &VfFacts,
        token: Token,
        owner: &Owner,
        req: &v1::AddRequest,
        cfg: VfConfig,
        ips: Vec<IpNet>,
        routes: Vec<RouteSpec>,
    ) -> Result<(), NodeError> {
        let mode = mode_of(&f.pool);
        let pf = f.pf_netdev.clone().ok_or_else(|| {
            NodeError::new(
                CniCode::VfConfig,
                format!(
                    "the PF {} of VF {} has no netdev to configure VFs through",
                    f.pf_pci, f.pci
                ),
            )
        })?;
        if mode == AttachMode::Netdev && req.netns.is_empty() {
            return Err(NodeError::new(
                CniCode::InvalidEnv,
                "CNI_NETNS is empty (netdev mode needs it)",
            ));
        }
        let opts = &self.shared.opts;
        let vfnl = Arc::clone(&opts.vf_netlink);
        let netdev = Arc::clone(&opts.netdev_ops);
        let sysfs = SysfsInventory::new(opts.sysfs_root.clone());
        let pci = f.pci;
        let vf_index = f.vf_index;

        // Read (nothing changes yet): the VF's settings and its netdev's identity.
        let (settings, host_link) = {
            let pf = pf.clone();
            let netdev = Arc::clone(&netdev);
            let vfnl = Arc::clone(&vfnl);
            tokio::task::spawn_blocking(move || {
                let settings = vfnl.read_vf(&pf, vf_index);
                let link = || -> Result<Option<vfplug_host::net::LinkInfo>, NodeError> {
                    if mode != AttachMode::Netdev {
                        return Ok(None);
                    }
                    let names = sysfs.netdevs_of(pci);
                    match names.first() {
                        None => Err(NodeError::new(
                            CniCode::NoSuchDevice,
                            format!("VF {pci} has no netdev in vfplugd's netns (driver bound? moved elsewhere?)"),
                        )),
                        Some(n) => netdev
                            .link(None, n)
                            .map_err(|e| net_error(CniCode::Netdev, &e))?
                            .ok_or_else(|| {
                                NodeError::new(CniCode::Netdev, format!("sysfs names netdev {n} for VF {pci}, netlink does not know it"))
                            })
                            .map(Some),
                    }
                };
                (settings, link())
            })
            .await
            .map_err(blocking_failed)?
        };
        let settings = settings.map_err(|e| net_error(CniCode::VfConfig, &e))?;
        let host_link = host_link?;
        if mode == AttachMode::Vfio && f.driver.as_deref() != Some(VFIO_PCI) && !f.pool.bind_vfio {
            return Err(NodeError::new(
                CniCode::NoSuchDevice,
                format!(
                    "VF {pci} is on driver {}, and pool {} (vfio mode) does not bind vfio-pci",
                    f.driver.as_deref().unwrap_or("none"),
                    f.resource
                ),
            ));
        }

        let mut saved: SavedVfState = vfset::saved_from(&settings);
        saved.driver = f.driver.clone();
        let placement = host_link.as_ref().map(|l| NetdevPlacement {
            host_name: l.name.clone(),
            host_mac: l.mac,
            host_mtu: l.mtu,
            altnames: l.altnames.clone(),
            pod_ifname: owner.ifname.clone(),
            pod_mac: cfg.mac.or(l.mac),
            pod_mtu: cfg.mtu.unwrap_or(l.mtu),
        });
        let mut attachment = CniAttachment {
            network: req.network.clone(),
            netns: req.netns.clone(),
            mode,
            config: cfg.clone(),
            skipped: Vec::new(),
            netdev: placement.clone(),
            ips: ips.iter().map(ToString::to_string).collect(),
            ipam_result: req.ipam_result.clone(),
        };
        // Write-ahead: everything needed to undo is durable before anything changes.
        self.commit_one(|st| {
            st.ledger.plan_advance(
                pci,
                token,
                Step::Configure {
                    saved: saved.clone(),
                    cni: Some(Box::new(attachment.clone())),
                },
            )
        })?;

        // Apply through the PF (serialized per PF), then place the netdev or check vfio.
        let pf_lock = self.pf_lock(&pf);
        let bind = mode == AttachMode::Vfio && f.driver.as_deref() != Some(VFIO_PCI);
        let root = opts.sysfs_root.clone();
        let place = placement.map(|p| PlaceRequest {
            host_name: p.host_name,
            netns: PathBuf::from(&req.netns),
            pod_ifname: p.pod_ifname,
            mac: cfg.mac,
            mtu: cfg.mtu,
            addresses: ips,
            routes,
        });
        let skipped = tokio::task::spawn_blocking(move || -> Result<Vec<String>, NodeError> {
            let report = {
                let _pf = lock(&pf_lock);
                vfset::apply_vf_config(vfnl.as_ref(), &pf, vf_index, &cfg, &saved).map_err(|e| {
                    let code = if e.error.is_busy() {
                        CniCode::TryAgainLater
                    } else {
                        CniCode::VfConfig
                    };
                    NodeError::new(code, e.to_string())
                })?
            };
            if bind {
                SysfsDriverBinder::new(root).bind_vfio(pci).map_err(|e| {
                    NodeError::new(CniCode::VfConfig, format!("binding {pci} to vfio-pci: {e}"))
                })?;
            }
            if let Some(p) = place {
                netdev
                    .place(&p)
                    .map_err(|e| net_error(CniCode::Netdev, &e))?;
            }
            Ok(report.skipped)
        })
        .await
        .map_err(blocking_failed)??;

        if !skipped.is_empty() {
            // Record what the driver skipped, so CHECK does not expect it and restore leaves it
            // alone. A crash before this record only costs a spurious CHECK failure.
            attachment.skipped = skipped;
            self.note_skipped(pci, token, &attachment)?;
        }
        info!(%pci, attachment = %owner, mode = %mode, "VF configured");
        Ok(())
    }

    /// Re-records the attachment with the knobs the driver skipped (Configured → Configured).
    fn note_skipped(
        &self,
        pci: PciAddress,
        token: Token,
        att: &CniAttachment,
    ) -> Result<(), NodeError> {
        self.commit_one(|st| st.ledger.plan_amend_cni(pci, token, att.clone()))?;
        Ok(())
    }

    /// Releases whatever `owner`'s attachment holds in `pci` (lock taken here).
    async fn release(
        &self,
        pci: PciAddress,
        owner: &Owner,
        why: &str,
    ) -> Result<ReleaseOutcome, NodeError> {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        let Some(state) = self.current(pci) else {
            return Ok(ReleaseOutcome::default());
        };
        match state.owner() {
            Some(o) if o.container_id == owner.container_id && o.ifname == owner.ifname => {}
            _ => {
                return Ok(ReleaseOutcome {
                    note: format!("VF {pci} no longer belongs to this attachment"),
                    ..Default::default()
                });
            }
        }
        let Some(token) = lease_token(&state) else {
            return Ok(ReleaseOutcome::default());
        };
        self.release_locked(pci, token, why).await
    }

    /// The release path, fenced by `token`, with the VF lock held by the caller:
    /// Configured → Releasing → netdev back, settings restored → Free. Restore failures
    /// quarantine the VF.
    async fn release_locked(
        &self,
        pci: PciAddress,
        token: Token,
        why: &str,
    ) -> Result<ReleaseOutcome, NodeError> {
        let Some(state) = self.current(pci) else {
            return Ok(ReleaseOutcome::default());
        };
        if lease_token(&state) != Some(token) {
            return Ok(ReleaseOutcome {
                note: format!("VF {pci} is held by a newer attachment; not touched"),
                ..Default::default()
            });
        }
        let lease = match &state {
            VfState::Reserved { .. } | VfState::Missing { .. } => {
                // Nothing was done to the VF yet (or it is gone): just let go.
                self.commit_one(|st| st.ledger.plan_release(pci, token))?;
                info!(%pci, why, "VF released (nothing to restore)");
                return Ok(ReleaseOutcome {
                    released: true,
                    note: "released".into(),
                    ..Default::default()
                });
            }
            VfState::Configured { lease } => {
                let lease = lease.clone();
                self.commit_one(|st| st.ledger.plan_advance(pci, token, Step::BeginRelease))?;
                lease
            }
            VfState::Releasing { lease } => lease.clone(),
            other => {
                return Err(NodeError::new(
                    CniCode::TryAgainLater,
                    format!(
                        "VF {pci} is {} (a VM hotplug owns this step); try again later",
                        other.kind()
                    ),
                ));
            }
        };

        let (pf, vf_index) = {
            let st = lock(&self.shared.state);
            let vf = st.inventory.vfs.get(&pci);
            (
                vf.and_then(|v| v.pf_netdev.clone()),
                vf.map_or(0, |v| v.vf_index),
            )
        };
        let opts = &self.shared.opts;
        let vfnl = Arc::clone(&opts.vf_netlink);
        let netdev = Arc::clone(&opts.netdev_ops);
        let sysfs = SysfsInventory::new(opts.sysfs_root.clone());
        let pf_lock = pf.as_deref().map(|p| self.pf_lock(p));
        let cni = lease.cni.clone();
        let saved = lease.saved.clone().unwrap_or_default();
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems: Vec<String> = Vec::new();
            let mut warnings: Vec<String> = Vec::new();
            let Some(cni) = cni else {
                return (problems, warnings);
            };
            if let Some(p) = &cni.netdev {
                let mut candidates = sysfs.netdevs_of(pci);
                candidates.push(p.pod_ifname.clone());
                candidates.push(p.host_name.clone());
                let req = RetrieveRequest {
                    netns: (!cni.netns.is_empty()).then(|| PathBuf::from(&cni.netns)),
                    pod_ifname: p.pod_ifname.clone(),
                    host_candidates: candidates,
                    host_name: p.host_name.clone(),
                    host_mac: p.host_mac,
                    host_mtu: p.host_mtu,
                    altnames: p.altnames.clone(),
                    expect_macs: p.pod_mac.into_iter().chain(p.host_mac).collect(),
                };
                match netdev.retrieve(&req) {
                    Ok(Retrieved::NotFound) => warnings.push(format!(
                        "netdev {} of VF {pci} was not found in the pod or on the host",
                        p.host_name
                    )),
                    Ok(_) => {}
                    Err(e) => problems.push(format!("bringing netdev {} back: {e}", p.host_name)),
                }
            }
            match (&pf, &pf_lock) {
                (Some(pf), Some(l)) => {
                    let _pf = lock(l);
                    if let Err(errs) = vfset::restore_vf_config(
                        vfnl.as_ref(),
                        pf,
                        vf_index,
                        &saved,
                        &cni.config,
                        &cni.skipped,
                    ) {
                        for e in errs {
                            problems.push(format!("restoring VF settings: {e}"));
                        }
                    }
                }
                _ => problems.push(format!(
                    "VF {pci}: PF netdev unknown, settings not restored"
                )),
            }
            (problems, warnings)
        })
        .await
        .map_err(blocking_failed)?;
        let (problems, warnings) = problems;

        if problems.is_empty() {
            self.commit_one(|st| st.ledger.plan_release(pci, token))?;
            info!(%pci, why, "VF restored and released");
            Ok(ReleaseOutcome {
                released: true,
                note: "restored and released".into(),
                warnings,
            })
        } else {
            let reason = format!("{why}; restore failed: {}", problems.join("; "));
            warn!(%pci, %reason, "VF quarantined");
            self.commit_one(|st| st.ledger.plan_quarantine(pci, &reason))?;
            let mut w = warnings;
            w.push(format!("VF {pci} quarantined: {reason}"));
            Ok(ReleaseOutcome {
                released: false,
                note: "quarantined".into(),
                warnings: w,
            })
        }
    }

    async fn del(&self, req: v1::DelRequest) -> Result<v1::DelResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let owner = owner_of(att);
        let found = {
            let st = lock(&self.shared.state);
            match st
                .ledger
                .find_by_attachment(&owner.container_id, &owner.ifname)
            {
                Some((pci, _)) => Some(pci),
                None => {
                    let quarantined = st.ledger.iter().find(|(_, s)| {
                        matches!(s, VfState::Quarantined { previous_owner: Some(o), .. }
                            if o.container_id == owner.container_id && o.ifname == owner.ifname)
                    });
                    if let Some((pci, _)) = quarantined {
                        return Ok(v1::DelResponse {
                            released: false,
                            pci_address: pci.to_string(),
                            note: format!(
                                "VF {pci} was quarantined while this attachment held it; nothing to do"
                            ),
                            warnings: Vec::new(),
                        });
                    }
                    None
                }
            }
        };
        let Some(pci) = found else {
            self.shared.metrics.cni_ops("del", "noop");
            return Ok(v1::DelResponse {
                released: false,
                pci_address: String::new(),
                note: "no VF is held by this attachment".into(),
                warnings: Vec::new(),
            });
        };
        if !req.device_id.is_empty() && req.device_id != pci.to_string() {
            warn!(%pci, hint = %req.device_id, "DEL's device hint differs from the ledger; the ledger wins");
        }
        let out = self.release(pci, &owner, "CNI DEL").await?;
        self.shared
            .metrics
            .cni_ops("del", if out.released { "ok" } else { "quarantined" });
        Ok(v1::DelResponse {
            released: out.released,
            pci_address: pci.to_string(),
            note: out.note,
            warnings: out.warnings,
        })
    }

    async fn check(&self, req: v1::CheckRequest) -> Result<v1::CheckResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let want = vf_config(req.config.as_ref())?;
        // The prevResult's addresses, as well as those recorded at ADD, must be on the interface.
        let prev_ips: Vec<String> = parse_ips(&req.ips)?
            .iter()
            .map(ToString::to_string)
            .collect();
        let failed = |m: String| NodeError::new(CniCode::CheckFailed, m);
        let (pci, state, pf, vf_index) = {
            let st = lock(&self.shared.state);
            let (pci, state) = st
                .ledger
                .find_by_attachment(&att.container_id, &att.ifname)
                .ok_or_else(|| {
                    failed(format!(
                        "no VF is held for {}/{}",
                        att.container_id, att.ifname
                    ))
                })?;
            let vf = st.inventory.vfs.get(&pci);
            (
                pci,
                state.clone(),
                vf.and_then(|v| v.pf_netdev.clone()),
                vf.map_or(0, |v| v.vf_index),
            )
        };
        let VfState::Configured { lease } = &state else {
            return Err(failed(format!(
                "VF {pci} is {}, not configured",
                state.kind()
            )));
        };
        if !req.device_id.is_empty() && req.device_id != pci.to_string() {
            return Err(failed(format!(
                "prevResult names {}, the attachment holds {pci}",
                req.device_id
            )));
        }
        let cni = lease
            .cni
            .clone()
            .ok_or_else(|| failed(format!("VF {pci} has no attachment record")))?;
        if cni.config != want {
            return Err(failed(
                "the network config differs from the one ADD applied".into(),
            ));
        }
        let pf = pf.ok_or_else(|| failed(format!("VF {pci}: PF netdev unknown")))?;
        let opts = &self.shared.opts;
        let vfnl = Arc::clone(&opts.vf_netlink);
        let netdev = Arc::clone(&opts.netdev_ops);
        let root = opts.sysfs_root.clone();
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            match vfnl.read_vf(&pf, vf_index) {
                Ok(actual) => {
                    problems.extend(vfset::check_vf_config(&actual, &cni.config, &cni.skipped))
                }
                Err(e) => problems.push(format!("reading VF settings: {e}")),
            }
            match (&cni.mode, &cni.netdev) {
                (AttachMode::Netdev, Some(p)) => {
                    match netdev.link(Some(std::path::Path::new(&cni.netns)), &p.pod_ifname) {
                        Ok(Some(l)) => {
                            if let Some(m) = p.pod_mac
                                && l.mac != Some(m)
                            {
                                problems.push(format!(
                                    "{}: MAC is {:?}, want {m}",
                                    p.pod_ifname,
                                    l.mac.map(|m| m.to_string())
                                ));
                            }
                            if l.mtu != p.pod_mtu {
                                problems.push(format!(
                                    "{}: MTU is {}, want {}",
                                    p.pod_ifname, l.mtu, p.pod_mtu
                                ));
                            }
                            if !l.up {
                                problems.push(format!("{} is down", p.pod_ifname));
                            }
                            let have: BTreeSet<String> =
                                l.addresses.iter().map(ToString::to_string).collect();
                            let mut wanted: Vec<&String> = cni.ips.iter().collect();
                            wanted.extend(prev_ips.iter().filter(|i| !cni.ips.contains(i)));
                            for ip in wanted {
                                if !have.contains(ip) {
                                    problems
                                        .push(format!("{}: address {ip} is missing", p.pod_ifname));
                                }
                            }
                        }
                        Ok(None) => {
                            problems.push(format!("no interface {} in {}", p.pod_ifname, cni.netns))
                        }
                        Err(e) => problems.push(e.to_string()),
                    }
                }
                (AttachMode::Vfio, _) => match SysfsDriverBinder::new(root).current_driver(pci) {
                    Ok(Some(d)) if d == VFIO_PCI => {}
                    Ok(d) => problems.push(format!(
                        "VF {pci} is on driver {}, not vfio-pci",
                        d.unwrap_or_else(|| "none".into())
                    )),
                    Err(e) => problems.push(format!("reading VF {pci}'s driver: {e}")),
                },
                (AttachMode::Netdev, None) => problems.push("no netdev record".into()),
            }
            problems
        })
        .await
        .map_err(blocking_failed)?;
        if problems.is_empty() {
            Ok(v1::CheckResponse {
                pci_address: pci.to_string(),
            })
        } else {
            Err(failed(format!("VF {pci}: {}", problems.join("; "))))
        }
    }

    fn status(&self, req: &v1::StatusRequest) -> Result<v1::StatusResponse, NodeError> {
        let ready = *self.ready.borrow();
        let st = lock(&self.shared.state);
        let count_free =
            |resource: &str, pool: &PoolConfig| free_vfs(&st, resource, pool).count() as u32;
        let (free, reason) = if req.pool.is_empty() {
            let free = st
                .config
                .pools
                .iter()
                .map(|p| count_free(&st.config.resource_name(p), p))
                .sum();
            (free, String::new())
        } else {
            let (resource, pool) = resolve_pool(&st, &req.pool).ok_or_else(|| {
                NodeError::new(
                    CniCode::NotAvailable,
                    format!("pool {:?} is not in vfplugd's config", req.pool),
                )
            })?;
            let free = count_free(&resource, pool);
            (
                free,
                if free == 0 {
                    format!("pool {resource} has no free, healthy VF")
                } else {
                    String::new()
                },
            )
        };
        let reason = if ready {
            reason
        } else {
            "vfplugd is starting (inventory or kubelet registration not done)".into()
        };
        Ok(v1::StatusResponse {
            ready: ready && reason.is_empty(),
            reason,
            free,
        })
    }

    async fn gc(&self, req: v1::GcRequest) -> Result<v1::GcResponse, NodeError> {
        if req.network.is_empty() {
            return Err(bad(
                "name",
                "GC needs the network name (it only collects that network's attachments)",
            ));
        }
        let valid: BTreeSet<(String, String)> = req
            .valid
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let stale: Vec<(PciAddress, Owner)> = {
            let st = lock(&self.shared.state);
            st.ledger
                .iter()
                .filter_map(|(pci, s)| {
                    let lease = s.effective_lease()?;
                    let network = lease.cni.as_deref().map(|c| c.network.as_str());
                    // A lease without a record is an ADD that never reached Configured; its network
                    // is unknown, so only its own DEL or a later ADD releases it.
                    (network == Some(req.network.as_str())
                        && !valid.contains(&(
                            lease.owner.container_id.clone(),
                            lease.owner.ifname.clone(),
                        )))
                    .then(|| (*pci, lease.owner.clone()))
                })
                .collect()
        };
        let mut resp = v1::GcResponse::default();
        for (pci, owner) in stale {
            match self.release(pci, &owner, "CNI GC").await {
                Ok(o) if o.released => resp.released.push(pci.to_string()),
                Ok(o) => resp.errors.push(format!("{owner} on {pci}: {}", o.note)),
                Err(e) => resp.errors.push(format!("{owner} on {pci}: {}", e.msg)),
            }
        }
        info!(network = %req.network, released = resp.released.len(), errors = resp.errors.len(), "GC done");
        Ok(resp)
    }

    fn list(&self) -> v1::ListResponse {
        let st = lock(&self.shared.state);
        // VF → pool once, not a scan of every pool per VF.
        let pools: HashMap<PciAddress, &String> = st
            .members
            .iter()
            .flat_map(|(r, m)| m.iter().map(move |pci| (*pci, r)))
            .collect();
        let mut vfs = Vec::with_capacity(st.inventory.vfs.len());
        for (pci, vf) in &st.inventory.vfs {
            let state = st.ledger.get(pci);
            let pool = pools.get(pci).map(|r| (*r).clone()).unwrap_or_default();
            let lease = state.and_then(VfState::effective_lease);
            let cni = lease.and_then(|l| l.cni.as_deref());
            vfs.push(v1::VfEntry {
                pci_address: pci.to_string(),
                pf_pci_address: vf.pf.to_string(),
                pf_netdev: vf.pf_netdev.clone().unwrap_or_default(),
                vf_index: vf.vf_index,
                pool,
                state: state.map_or_else(|| "free".to_owned(), |s| s.kind().to_string()),
                owner: lease.map(|l| v1::Attachment {
                    container_id: l.owner.container_id.clone(),
                    ifname: l.owner.ifname.clone(),
                    ..owner_attachment(&l.owner.pod)
                }),
                token: lease.map_or(0, |l| l.token),
                network: cni.map(|c| c.network.clone()).unwrap_or_default(),
                netns: cni.map(|c| c.netns.clone()).unwrap_or_default(),
                mode: cni.map(|c| c.mode.to_string()).unwrap_or_default(),
                reason: match state {
                    Some(VfState::Quarantined { reason, .. }) => reason.clone(),
                    _ => String::new(),
                },
                driver: vf.driver.clone().unwrap_or_default(),
            });
        }
        v1::ListResponse { vfs }
    }
}

fn ledger_error(e: &LedgerError) -> NodeError {
    let code = match e {
        LedgerError::NotFree { .. }
        | LedgerError::OwnerBusy { .. }
        | LedgerError::Fenced { .. } => CniCode::VfBusy,
        LedgerError::UnknownVf { .. } => CniCode::NoSuchDevice,
        LedgerError::InvalidTransition { .. } | LedgerError::NoChange { .. } => CniCode::VfBusy,
        _ => CniCode::Internal,
    };
    NodeError::new(code, e.to_string())
}

fn net_error(default: CniCode, e: &NetError) -> NodeError {
    let code = if e.is_busy() {
        CniCode::TryAgainLater
    } else {
        default
    };
    match e {
        NetError::Netns { gone: true, .. } => {
            NodeError::new(CniCode::InvalidEnv, format!("CNI_NETNS: {e}"))
        }
        _ => NodeError::new(code, e.to_string()),
    }
}

#[tonic::async_trait]
impl v1::node_server::Node for NodeService {
    async fn add(&self, r: Request<v1::AddRequest>) -> Result<Response<v1::AddResponse>, Status> {
        Ok(Response::new(NodeService::add(self, r.into_inner()).await?))
    }

    async fn lookup(
        &self,
        r: Request<v1::AddRequest>,
    ) -> Result<Response<v1::AddResponse>, Status> {
        Ok(Response::new(NodeService::lookup(self, r.get_ref())?))
    }

    async fn del(&self, r: Request<v1::DelRequest>) -> Result<Response<v1::DelResponse>, Status> {
        Ok(Response::new(NodeService::del(self, r.into_inner()).await?))
    }

    async fn check(
        &self,
        r: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckResponse>, Status> {
        let out = NodeService::check(self, r.into_inner()).await;
        self.shared
            .metrics
            .cni_ops("check", if out.is_ok() { "ok" } else { "error" });
        Ok(Response::new(out?))
    }

    async fn status(
        &self,
        r: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(NodeService::status(self, r.get_ref())?))
    }

    async fn gc(&self, r: Request<v1::GcRequest>) -> Result<Response<v1::GcResponse>, Status> {
        Ok(Response::new(NodeService::gc(self, r.into_inner()).await?))
    }

    async fn list(
        &self,
        _r: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        Ok(Response::new(NodeService::list(self)))
    }
}

/// Binds the node API on `path` (a stale socket is replaced; the file is made `0600` and only
/// peers running as root or as vfplugd's own user are served) and serves it until `cancel`.
pub(crate) fn serve(
    shared: Arc<Shared>,
    ready: watch::Receiver<bool>,
    path: &std::path::Path,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, crate::AgentError> {
    use std::os::unix::fs::PermissionsExt;
    use tokio_stream::StreamExt;

    let sock_err = |e: &dyn std::fmt::Display| {
        crate::AgentError::NodeSocket(format!("{}: {e}", path.display()))
    };
    let (listener, id) = vfplug_kubelet::uds::bind_fresh(path).map_err(|e| sock_err(&e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| sock_err(&e))?;
    // chmod changed the file's ctime, which is part of its identity: take it again.
    let id = vfplug_kubelet::uds::socket_id(path).unwrap_or(id);
    let me = rustix::process::geteuid().as_raw();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .filter(move |conn| match conn {
            Ok(stream) => match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me => true,
                Ok(c) => {
                    warn!(
                        uid = c.uid(),
                        "node API: refusing a peer that is neither root nor vfplugd's user"
                    );
                    false
                }
                Err(e) => {
                    warn!(error = %e, "node API: cannot read the peer's credentials; refused");
                    false
                }
            },
            Err(_) => true,
        })
        // grpcio, grpc-java and old grpc-go send the socket path as :authority, which h2 refuses.
        .map(|conn| conn.map(vfplug_kubelet::authority::AuthorityFixed::new));
    let svc = Arc::new(NodeService::new(shared, ready));
    let path = path.to_path_buf();
    info!(socket = %path.display(), "node API listening");
    Ok(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(v1::node_server::NodeServer::from_arc(svc))
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "node API server failed");
        }
        vfplug_kubelet::uds::remove_if_ours(&path, id);
    }))
}
