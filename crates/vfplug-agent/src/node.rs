//! The node API (`proto/vfplug/v1/node.proto`): what the `vfplug` CNI shim asks of vfplugd.
//!
//! A thin adapter: each call's message is validated and converted to the executor's types
//! (`vfplug_executor::cni`), the executor runs the saga, and the outcome (or its
//! [`vfplug_executor::ErrorKind`], mapped to a CNI code in [`cni_code`]) is converted back.
//! Queries that only read (STATUS, List, VmRecords, Lookup's answer) read the live ledger under the short
//! state lock and never wait for the disk.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vfplug_api::CniCode;
use vfplug_api::v1;
use vfplug_core::ledger::{Owner, VfState};
use vfplug_core::records::{ActualType, Phase, VmFilter, VmRecords, vm_records};
use vfplug_core::{MacAddr, PciAddress, PodRef, PoolConfig, VfConfig, VfLinkState, VlanProto};
use vfplug_executor::{AddRequest, CheckRequest, ErrorKind, ExecError, LedgerPort};
use vfplug_host::net::{IpNet, RouteSpec};

use crate::podindex::{PodLookup, QMP_SOCKET_ANNOTATION};
use crate::pools::resolve_pool;
use crate::ports::AgentExecutor;
use crate::ports::{facts, free_vfs, pool_of_vf};
use crate::state::{Shared, lock};

/// How long a CNI ADD waits for the pod watch to show a pod it has not seen yet.
const POD_WATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a shutdown waits for node-API clients to finish their calls before closing them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A node-API failure: the CNI code the shim prints, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    code: CniCode,
    msg: String,
}

impl NodeError {
    fn new(code: CniCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    /// The CNI error code (11: try again later).
    pub fn code(&self) -> CniCode {
        self.code
    }

    /// What went wrong, for a person.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CNI code {})", self.msg, self.code.code())
    }
}

impl std::error::Error for NodeError {}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        vfplug_api::status(e.code, e.msg, String::new())
    }
}

/// The one place an executor error becomes a CNI code.
pub(crate) fn cni_code(kind: ErrorKind) -> CniCode {
    match kind {
        ErrorKind::InvalidRequest => CniCode::InvalidEnv,
        ErrorKind::InvalidConfig => CniCode::InvalidConfig,
        ErrorKind::NoSuchDevice => CniCode::NoSuchDevice,
        ErrorKind::Busy => CniCode::VfBusy,
        ErrorKind::TryAgain | ErrorKind::VmNotRunning => CniCode::TryAgainLater,
        ErrorKind::VfConfig => CniCode::VfConfig,
        ErrorKind::Netdev => CniCode::Netdev,
        ErrorKind::CheckFailed => CniCode::CheckFailed,
        ErrorKind::Unknown => CniCode::UnknownContainer,
        ErrorKind::Internal => CniCode::Internal,
    }
}

impl From<ExecError> for NodeError {
    fn from(e: ExecError) -> Self {
        Self::new(cni_code(e.kind), e.msg)
    }
}

/// The ledger's owner for an attachment: the pod with every field the runtime passed
/// (CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME / K8S_POD_UID).
fn owner_of(a: &v1::Attachment) -> Owner {
    Owner {
        pod: PodRef::new(&a.pod_namespace, &a.pod_name, &a.pod_uid),
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
    }
}

/// The pod fields of an [`v1::Attachment`].
fn pod_attachment(pod: &PodRef) -> v1::Attachment {
    v1::Attachment {
        pod_namespace: pod.namespace.clone(),
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        ..Default::default()
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

/// The `deviceID`, if one is given.
fn device_of(id: &str) -> Result<Option<PciAddress>, NodeError> {
    if id.is_empty() {
        return Ok(None);
    }
    id.parse().map(Some).map_err(|e| bad("deviceID", e))
}

/// The node API service.
#[derive(Debug)]
pub(crate) struct NodeService {
    shared: Arc<Shared>,
    exec: Arc<AgentExecutor>,
}

impl NodeService {
    pub(crate) fn new(shared: Arc<Shared>, exec: Arc<AgentExecutor>) -> Self {
        Self { shared, exec }
    }

    fn add_request(&self, req: &v1::AddRequest) -> Result<AddRequest, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let config = vf_config(req.config.as_ref())?;
        let ips = parse_ips(&req.ips)?;
        let routes = parse_routes(&req.routes, &req.ips)?;
        let device = device_of(&req.device_id)?;
        let vm = if req.qmp_socket.is_empty() {
            None
        } else {
            if att.pod_uid.is_empty() {
                return Err(NodeError::new(
                    CniCode::InvalidEnv,
                    "qmpSocket needs the pod's UID (K8S_POD_UID in CNI_ARGS) to find its volumes",
                ));
            }
            let pod = PodRef::new(&att.pod_namespace, &att.pod_name, &att.pod_uid);
            // Resolved (and refused) here for a clear error; the connector resolves it again,
            // without following symlinks, on every connect. The volume must be there (the
            // kubelet mounts a pod's volumes before its sandbox is made); the socket need not
            // be: QEMU may not have started yet, and the hot-plug is then owed.
            let opts = &self.shared.opts;
            let refused = |e: vfplug_host::vmpod::VmPodError| {
                let code = if e.is_missing() {
                    CniCode::TryAgainLater
                } else {
                    CniCode::InvalidConfig
                };
                NodeError::new(code, format!("qmpSocket: {e}"))
            };
            let path = match vfplug_host::vmpod::resolve_qmp_socket(
                &opts.kubelet_dir,
                &att.pod_uid,
                &req.qmp_socket,
                &opts.qmp_trusted_uids,
            ) {
                Ok(sock) => sock.path(),
                // Not there yet: where it will be, if the pod's volume is there (else 11).
                Err(e) if e.is_missing() => vfplug_host::vmpod::qmp_socket_path(
                    &opts.kubelet_dir,
                    &att.pod_uid,
                    &req.qmp_socket,
                )
                .map_err(refused)?,
                Err(e) => return Err(refused(e)),
            };
            Some(vfplug_core::VmRef {
                pod,
                qmp_socket: path.display().to_string(),
                qmp_spec: req.qmp_socket.clone(),
            })
        };
        Ok(AddRequest {
            vm,
            unplug_wait: self.shared.opts.unplug_wait,
            owner: owner_of(att),
            network: req.network.clone(),
            netns: req.netns.clone(),
            device,
            pool: (!req.pool.is_empty()).then(|| req.pool.clone()),
            config,
            ips,
            routes,
            ipam_result: req.ipam_result.clone(),
        })
    }

    fn response(&self, pci: PciAddress, existing: bool) -> Result<v1::AddResponse, NodeError> {
        let internal = |m: String| NodeError::new(CniCode::Internal, format!("ledger: {m}"));
        let st = lock(&self.shared.state);
        let state = st
            .ledger
            .get(&pci)
            .ok_or_else(|| internal(format!("VF {pci} vanished")))?;
        let lease = state
            .lease()
            .ok_or_else(|| internal(format!("VF {pci} is not held")))?;
        let cni = lease
            .cni
            .as_deref()
            .ok_or_else(|| internal(format!("VF {pci} has no attachment record")))?;
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
            attach_pending: cni.attach_pending && matches!(state, VfState::Configured { .. }),
        })
    }

    /// A VM pod's QMP socket from the pod watch (the `vfplug.io/qmp-socket` annotation) when
    /// the network config names none: no API request per CNI call (docs/domain.md).
    async fn with_pod_annotation(&self, req: &mut v1::AddRequest) -> Result<(), NodeError> {
        let Some(index) = &self.shared.opts.pod_index else {
            return Ok(());
        };
        let uid = req
            .attachment
            .as_ref()
            .map(|a| a.pod_uid.clone())
            .unwrap_or_default();
        if !req.qmp_socket.is_empty() || uid.is_empty() {
            return Ok(());
        }
        match index.lookup(&uid, POD_WATCH_WAIT).await {
            PodLookup::VmPod(spec) => req.qmp_socket = spec,
            PodLookup::NotVmPod => {}
            // The watch has never listed (the API server unreachable since vfplugd started):
            // the network config alone decides, as without a controller.
            PodLookup::Unknown if !index.synced() => {
                warn!(
                    pod_uid = %uid,
                    "the pod watch has not listed yet: {QMP_SOCKET_ANNOTATION} not consulted"
                );
            }
            // A VM pod's VF must not be configured as a container pod's: ask again.
            PodLookup::Unknown => {
                return Err(NodeError::new(
                    CniCode::TryAgainLater,
                    format!(
                        "pod {uid} is not (yet) in vfplugd's pod watch, so whether it is a VM \
                         pod ({QMP_SOCKET_ANNOTATION}) is unknown; try again"
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn add(&self, mut req: v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        self.with_pod_annotation(&mut req).await?;
        let add = self.add_request(&req)?;
        match self.exec.add(add).await {
            Ok(o) => {
                self.shared.metrics.cni_ops("add", "ok");
                self.response(o.pci, o.existing)
            }
            Err(e) => {
                self.shared.metrics.cni_ops("add", "error");
                Err(e.into())
            }
        }
    }

    /// What `add` would answer for a repeat; changes nothing.
    fn lookup(&self, req: &v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        let add = self.add_request(req)?;
        match self.exec.lookup(&add) {
            Some(pci) => self.response(pci, true),
            None => Err(NodeError::new(
                CniCode::UnknownContainer,
                "no completed ADD of this attachment with this config",
            )),
        }
    }

    async fn del(&self, req: v1::DelRequest) -> Result<v1::DelResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let out = self
            .exec
            .del(&att.container_id, &att.ifname, self.shared.opts.unplug_wait)
            .await?;
        if let Some(pci) = out.pci
            && !req.device_id.is_empty()
            && req.device_id != pci.to_string()
        {
            warn!(%pci, hint = %req.device_id, "DEL's device hint differs from the ledger; the ledger wins");
        }
        let f = &out.finalized;
        let result = if f.released {
            "ok"
        } else if f.quarantined {
            "quarantined"
        } else {
            "noop"
        };
        self.shared.metrics.cni_ops("del", result);
        Ok(v1::DelResponse {
            released: f.released,
            pci_address: out.pci.map(|p| p.to_string()).unwrap_or_default(),
            note: f.note.clone(),
            warnings: f.warnings.clone(),
        })
    }

    async fn check(&self, req: v1::CheckRequest) -> Result<v1::CheckResponse, NodeError> {
        let att = check_attachment(req.attachment.as_ref())?;
        let config = vf_config(req.config.as_ref())?;
        let prev_ips = parse_ips(&req.ips)?;
        let device =
            device_of(&req.device_id).map_err(|e| NodeError::new(CniCode::CheckFailed, e.msg))?;
        let pci = self
            .exec
            .check(CheckRequest {
                container_id: att.container_id.clone(),
                ifname: att.ifname.clone(),
                config,
                prev_ips,
                device,
            })
            .await?;
        Ok(v1::CheckResponse {
            pci_address: pci.to_string(),
        })
    }

    /// Ready when the ledger is loaded, the inventory scanned and the node API serves (all true
    /// once this answers) and the journal works; for a pool, when it has a free healthy VF. The
    /// kubelet's registration is not part of it: a kubelet restart must not make the node's
    /// network NotReady (it shows in /readyz and the metrics instead).
    fn status(&self, req: &v1::StatusRequest) -> Result<v1::StatusResponse, NodeError> {
        let failed = self.shared.journal.progress().borrow().failed.clone();
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
        let reason = match failed {
            Some(f) => format!("vfplugd's ledger cannot be written: {f}"),
            None => reason,
        };
        Ok(v1::StatusResponse {
            ready: reason.is_empty(),
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
        let out = self
            .exec
            .gc(&req.network, &valid, self.shared.opts.unplug_wait)
            .await;
        Ok(v1::GcResponse {
            released: out.released.iter().map(ToString::to_string).collect(),
            errors: out.errors,
        })
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
            let owner = match (lease, state) {
                (Some(l), _) => Some(v1::Attachment {
                    container_id: l.owner.container_id.clone(),
                    ifname: l.owner.ifname.clone(),
                    ..pod_attachment(&l.owner.pod)
                }),
                // The kubelet's allocations: the pod, once PodResources named it.
                (None, Some(VfState::KubeletAllocated { pod: Some(p) })) => {
                    Some(pod_attachment(&PodRef::from_legacy(p)))
                }
                (
                    None,
                    Some(VfState::Quarantined {
                        previous_owner: Some(o),
                        ..
                    }),
                ) => Some(v1::Attachment {
                    container_id: o.container_id.clone(),
                    ifname: o.ifname.clone(),
                    ..pod_attachment(&o.pod)
                }),
                _ => None,
            };
            vfs.push(v1::VfEntry {
                pci_address: pci.to_string(),
                pf_pci_address: vf.pf.to_string(),
                pf_netdev: vf.pf_netdev.clone().unwrap_or_default(),
                vf_index: vf.vf_index,
                pool,
                state: state.map_or_else(|| "free".to_owned(), |s| s.kind().to_string()),
                owner,
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

    /// Every VM's records (or those the filter asks for), from the live ledger.
    fn vm_records(&self, req: &v1::VmRecordsRequest) -> Result<v1::VmRecordsResponse, NodeError> {
        let filter = VmFilter {
            pod_uid: req.pod_uid.clone(),
            namespace: req.pod_namespace.clone(),
            name: req.pod_name.clone(),
        };
        filter
            .validate()
            .map_err(|e| NodeError::new(CniCode::InvalidConfig, e.to_string()))?;
        let st = lock(&self.shared.state);
        let vms = vm_records(&st.ledger, |pci| pool_of_vf(&st, *pci).cloned())
            .into_iter()
            .filter(|r| filter.matches(&r.vm))
            .map(vm_record)
            .collect();
        Ok(v1::VmRecordsResponse { vms })
    }

    async fn unquarantine(
        &self,
        req: &v1::UnquarantineRequest,
    ) -> Result<v1::UnquarantineResponse, NodeError> {
        let pci: PciAddress = req.pci_address.parse().map_err(|e| bad("pci_address", e))?;
        let previous = self.exec.ledger().read(|l| match l.get(&pci) {
            Some(VfState::Quarantined { reason, .. }) => Some(reason.clone()),
            _ => None,
        });
        self.exec
            .ledger()
            .commit(|l| l.plan_unquarantine(pci))
            .await?;
        info!(%pci, previous_reason = ?previous, "quarantine cleared by an operator");
        self.shared.metrics.cni_ops("unquarantine", "ok");
        Ok(v1::UnquarantineResponse {
            pci_address: pci.to_string(),
            previous_reason: previous.unwrap_or_default(),
        })
    }
}

fn vm_phase(p: Phase) -> v1::VmPhase {
    match p {
        Phase::Pending => v1::VmPhase::Pending,
        Phase::Attaching => v1::VmPhase::Attaching,
        Phase::Attached => v1::VmPhase::Attached,
        Phase::UnplugPending => v1::VmPhase::UnplugPending,
        Phase::GuestError => v1::VmPhase::GuestError,
        Phase::Releasing => v1::VmPhase::Releasing,
    }
}

fn vm_record(r: VmRecords) -> v1::VmRecord {
    v1::VmRecord {
        pod_namespace: r.vm.pod.namespace,
        pod_name: r.vm.pod.name,
        pod_uid: r.vm.pod.uid,
        qmp_socket: r.vm.qmp_socket,
        nets: r
            .nets
            .into_iter()
            .map(|n| v1::NetRecord {
                name: n.name,
                network: n.network,
                pool: n.pool.unwrap_or_default(),
                mac: n.mac.map(|m| m.to_string()).unwrap_or_default(),
                vlan: n.vlan.map(u32::from),
                actual: Some(v1::ActualDevice {
                    r#type: match n.actual.kind {
                        ActualType::Hostdev => "hostdev".into(),
                    },
                    pci_address: n.actual.pci_address.to_string(),
                }),
                phase: vm_phase(n.phase).into(),
            })
            .collect(),
        hostdevs: r
            .hostdevs
            .into_iter()
            .map(|h| v1::HostdevRecord {
                alias: h.alias.unwrap_or_default(),
                pci_address: h.pci_address.to_string(),
                parent_net: h.parent_net,
                phase: vm_phase(h.phase).into(),
                reason: h.reason.unwrap_or_default(),
            })
            .collect(),
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
        let mut req = r.into_inner();
        self.with_pod_annotation(&mut req).await?;
        Ok(Response::new(NodeService::lookup(self, &req)?))
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

    async fn unquarantine(
        &self,
        r: Request<v1::UnquarantineRequest>,
    ) -> Result<Response<v1::UnquarantineResponse>, Status> {
        Ok(Response::new(
            NodeService::unquarantine(self, r.get_ref()).await?,
        ))
    }

    async fn vm_records(
        &self,
        r: Request<v1::VmRecordsRequest>,
    ) -> Result<Response<v1::VmRecordsResponse>, Status> {
        Ok(Response::new(NodeService::vm_records(self, r.get_ref())?))
    }
}

/// Binds the node API on `path` (a stale socket is replaced; the file is made `0600` and only
/// peers running as root or as vfplugd's own user are served) and serves it until `cancel`.
pub(crate) fn serve(
    shared: Arc<Shared>,
    exec: Arc<AgentExecutor>,
    path: &std::path::Path,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), String>>, crate::AgentError> {
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
    let svc = Arc::new(NodeService::new(shared, exec));
    let path = path.to_path_buf();
    info!(socket = %path.display(), "node API listening");
    let span = tracing::info_span!("node_api", socket = %path.display());
    Ok(tokio::spawn(tracing::Instrument::instrument(
        async move {
            let server = tonic::transport::Server::builder()
                .add_service(v1::node_server::NodeServer::from_arc(svc))
                .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
            tokio::pin!(server);
            // A graceful shutdown waits for every client connection to close; a hung CNI shim
            // (or an idle client) must not hold vfplugd's restart until the kubelet's SIGKILL.
            let result = tokio::select! {
                r = &mut server => r,
                () = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {
                    warn!(grace = ?SHUTDOWN_GRACE, "node API: clients still connected after shutdown; closing them");
                    Ok(())
                }
            };
            vfplug_kubelet::uds::remove_if_ours(&path, id);
            result.map_err(|e| {
                tracing::error!(error = %e, "node API server failed");
                e.to_string()
            })
        },
        span,
    )))
}

/// One CNI attachment the ledger holds (for the Domain controller's view of a pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentInfo {
    /// The attachment's owner: pod, container ID, ifname.
    pub owner: Owner,
    /// The CNI network it came from.
    pub network: String,
    /// The VF.
    pub pci: PciAddress,
    /// Whether it is a VM pod's (hot-plugged, or owed to its QEMU).
    pub vm: bool,
}

/// How [`NodeHandle::release`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// The VF the attachment held, if any.
    pub pci: Option<PciAddress>,
    /// Back in its pool.
    pub released: bool,
    /// Could not be restored: quarantined.
    pub quarantined: bool,
    /// What happened, for a person.
    pub note: String,
}

/// The node API in process, for vfplugd's Domain controller (crate vfplug-controller): the same
/// calls, validation and error codes the CNI plugin gets over the socket, and what the ledger
/// holds per pod. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    svc: Arc<NodeService>,
}

impl NodeHandle {
    pub(crate) fn new(shared: Arc<Shared>, exec: Arc<AgentExecutor>) -> Self {
        Self {
            svc: Arc::new(NodeService::new(shared, exec)),
        }
    }

    /// `Node.Add`, as the CNI plugin would call it.
    pub async fn add(&self, req: v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        self.svc.add(req).await
    }

    /// `Node.Del`, as the CNI plugin would call it.
    pub async fn del(&self, req: v1::DelRequest) -> Result<v1::DelResponse, NodeError> {
        self.svc.del(req).await
    }

    /// Ends the attachment (container ID, ifname) as `Node.Del` would, and says how.
    pub async fn release(&self, container_id: &str, ifname: &str) -> Result<Released, NodeError> {
        let out = self
            .svc
            .exec
            .del(container_id, ifname, self.svc.shared.opts.unplug_wait)
            .await?;
        Ok(Released {
            pci: out.pci,
            released: out.finalized.released,
            quarantined: out.finalized.quarantined,
            note: out.finalized.note,
        })
    }

    /// The per-VM records (`Node.VmRecords`).
    pub fn vm_records(&self, filter: &VmFilter) -> Vec<VmRecords> {
        let st = lock(&self.svc.shared.state);
        vm_records(&st.ledger, |pci| pool_of_vf(&st, *pci).cloned())
            .into_iter()
            .filter(|r| filter.matches(&r.vm))
            .collect()
    }

    /// Every CNI attachment the ledger holds (VFs on their way back included, until Free).
    pub fn attachments(&self) -> Vec<AttachmentInfo> {
        let st = lock(&self.svc.shared.state);
        st.ledger
            .iter()
            .filter_map(|(pci, s)| {
                let lease = s.effective_lease()?;
                let cni = lease.cni.as_deref()?;
                Some(AttachmentInfo {
                    owner: lease.owner.clone(),
                    network: cni.network.clone(),
                    pci: *pci,
                    vm: cni.vm.is_some() || vfplug_core::records::vm_vf(s).is_some(),
                })
            })
            .collect()
    }

    /// Changes when records become durable in the ledger: a wake-up for whoever projects it.
    pub fn ledger_changes(&self) -> tokio::sync::watch::Receiver<crate::store::Durable> {
        self.svc.shared.journal.progress()
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.svc.shared.opts.node_name
    }
}
