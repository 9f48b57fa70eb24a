//! The CNI sagas: what ADD, DEL, CHECK and GC do to a VF.
//!
//! - **ADD**: reserve a VF (the node's policy: the named one, the pod's own kubelet VF in the
//!   pool, or a free healthy one) → read the VF's settings and its netdev's identity → persist
//!   `Configured` with all of it, marked incomplete ([`CniAttachment::complete`]) → apply the
//!   settings through the PF (per-PF lock) → netdev mode: move the netdev into the pod; vfio
//!   mode: bind vfio-pci if the pool says so → persist the attachment as complete. Any failure
//!   after the reservation runs [`Executor::finalize_removal`], so a failed ADD leaves nothing
//!   behind; a crash in between is finished by [`Executor::recover`] at the next start. A
//!   repeated ADD of the same (container ID, ifname, config, netns) is answered from the ledger.
//! - **DEL**: find the VF by (container ID, ifname) in the ledger and finalize its removal. No
//!   VF held → success.
//! - **CHECK**: ledger, PF-side settings and netdev placement against what ADD recorded.
//! - **GC**: finalize every attachment *of the named network* that is not in the valid list.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vfplug_core::ledger::{Owner, Step, VfState};
use vfplug_core::{
    AttachMode, CniAttachment, DeviceMode, NetdevPlacement, PciAddress, SavedVfState, VfConfig,
    VmRef,
};
use vfplug_host::driver::VFIO_PCI;
use vfplug_host::net::{IpNet, PlaceRequest, RouteSpec};
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::vfset;

use crate::error::{ErrorKind, ExecError};
use crate::ports::{LedgerPort, ReserveRequest, VfFacts};
use crate::{Executor, lock};

/// A CNI ADD, validated and typed by the caller.
#[derive(Clone, Debug, Default)]
pub struct AddRequest {
    /// The attachment (pod, CNI container ID, ifname).
    pub owner: Owner,
    /// The CNI network name.
    pub network: String,
    /// CNI_NETNS.
    pub netns: String,
    /// `deviceID`, if given.
    pub device: Option<PciAddress>,
    /// `pool`, if given.
    pub pool: Option<String>,
    /// Settings to apply through the PF.
    pub config: VfConfig,
    /// Addresses for the pod interface (from IPAM).
    pub ips: Vec<IpNet>,
    /// Routes for the pod interface.
    pub routes: Vec<RouteSpec>,
    /// The delegated IPAM result, kept to answer a repeated ADD.
    pub ipam_result: String,
    /// A VM pod's network: after configuring the VF (vfio mode), hot-plug it into this VM.
    pub vm: Option<VmRef>,
    /// How long a detach waits for the guest when this ADD must first undo an earlier one.
    pub unplug_wait: Duration,
}

/// What ADD did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddOutcome {
    /// The VF the attachment holds.
    pub pci: PciAddress,
    /// A repeated ADD: the first one's result stands.
    pub existing: bool,
    /// A VM pod whose QEMU is not running yet: the VF is reserved and configured, and the
    /// hot-plug is owed (done when the QMP socket answers; see `vm.rs`).
    pub attach_pending: bool,
}

/// What DEL did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DelOutcome {
    /// The VF it held, if any.
    pub pci: Option<PciAddress>,
    /// How its removal ended.
    pub finalized: crate::Finalized,
}

/// A CNI CHECK.
#[derive(Clone, Debug, Default)]
pub struct CheckRequest {
    /// CNI container ID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// The settings the network config asks for now.
    pub config: VfConfig,
    /// Addresses of the prevResult, which must be on the interface too.
    pub prev_ips: Vec<IpNet>,
    /// The VF the prevResult names, if it names one.
    pub device: Option<PciAddress>,
}

/// What GC did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcOutcome {
    /// VFs released.
    pub released: Vec<PciAddress>,
    /// Attachments that could not be released, with why.
    pub errors: Vec<String>,
}

fn mode_of(facts: &VfFacts) -> AttachMode {
    match facts.pool.device_mode {
        DeviceMode::Netdev => AttachMode::Netdev,
        DeviceMode::Vfio => AttachMode::Vfio,
    }
}

/// Whether `state` is a completed ADD of the same request: a repeat is answered from the ledger.
fn is_repeat(state: &VfState, pci: PciAddress, req: &AddRequest) -> bool {
    // A completed ADD: configured (container pod) or in its VM's guest (VM pod); an ADD whose
    // VM attach is under way or was taken out is not answered from the ledger.
    let lease = match (state, &req.vm) {
        (VfState::Configured { lease }, None) => lease,
        (VfState::Attached { lease, .. }, Some(_)) => lease,
        // Answered earlier with the hot-plug owed (QEMU was not running yet).
        (VfState::Configured { lease }, Some(_))
            if lease.cni.as_deref().is_some_and(|c| c.attach_pending) =>
        {
            lease
        }
        _ => return false,
    };
    req.device.is_none_or(|d| d == pci)
        && lease.cni.as_deref().is_some_and(|c| {
            c.complete && c.config == req.config && c.netns == req.netns && c.vm == req.vm
        })
}

impl<L: LedgerPort> Executor<L> {
    /// CNI ADD. See the module docs.
    pub async fn add(self: &Arc<Self>, req: AddRequest) -> Result<AddOutcome, ExecError> {
        let owner = req.owner.clone();
        // Idempotency: the same attachment again.
        let earlier = self.ledger.read(|l| {
            l.find_by_attachment(&owner.container_id, &owner.ifname)
                .map(|(pci, s)| (pci, s.clone()))
        });
        if let Some((pci, state)) = earlier {
            if is_repeat(&state, pci, &req) {
                info!(%pci, attachment = %owner, "repeated ADD: returning the first result");
                return Ok(AddOutcome {
                    pci,
                    existing: true,
                    attach_pending: matches!(state, VfState::Configured { .. }) && req.vm.is_some(),
                });
            }
            // A different request for the same attachment, or an ADD that never finished: undo
            // it, then start afresh.
            warn!(%pci, attachment = %owner, state = %state.kind(),
                "ADD for an attachment that already holds a VF: releasing it first");
            if let Some(token) = state.effective_lease().map(|l| l.token) {
                let f = self
                    .release(pci, token, "superseded by a new ADD", req.unplug_wait)
                    .await?;
                if !f.released && !f.quarantined {
                    return Err(ExecError::new(
                        ErrorKind::TryAgain,
                        format!(
                            "VF {pci} of the earlier ADD is still being removed: {}",
                            f.note
                        ),
                    ));
                }
            }
        }

        let reserved = self
            .ledger
            .reserve(&ReserveRequest {
                owner: owner.clone(),
                device: req.device,
                pool: req.pool.clone(),
            })
            .await?;
        let pci = reserved.facts.pci;
        let token = reserved.token;
        crate::failpoint::hit("add-reserved");
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        info!(%pci, attachment = %owner, token, pool = %reserved.facts.resource, "VF reserved");

        let configured = self.configure(&reserved.facts, token, &req).await;
        // A VM pod's network: into the guest, under the same VF lock. A QEMU that is not
        // running yet (the runtime sets up a pod's networks before starting its containers)
        // is not a failure: the hot-plug is owed and done when its QMP socket answers.
        let attached = match (configured, &req.vm) {
            (Ok(()), Some(vm)) => match self.vm_attach_locked(pci, token, vm).await {
                Ok(_) => Ok(false),
                Err(e) if e.kind == ErrorKind::VmNotRunning => {
                    self.owe_attach(pci, token, vm, &e).await.map(|()| true)
                }
                Err(e) => Err(e),
            },
            (r, _) => r.map(|()| false),
        };
        match attached {
            Ok(attach_pending) => Ok(AddOutcome {
                pci,
                existing: false,
                attach_pending,
            }),
            Err(e) => {
                warn!(%pci, attachment = %owner, error = %e, "ADD failed: rolling back");
                match self.finalize_locked(pci, token, "ADD failed").await {
                    Ok(f) if f.quarantined => {
                        warn!(%pci, note = %f.note, "rollback of the failed ADD quarantined the VF")
                    }
                    Ok(_) => {}
                    Err(re) => {
                        warn!(%pci, error = %re, "rollback of the failed ADD did not finish")
                    }
                }
                Err(e)
            }
        }
    }

    /// Reserved → Configured (incomplete) → settings applied → netdev placed (or vfio bound)
    /// → Configured (complete).
    async fn configure(&self, f: &VfFacts, token: u64, req: &AddRequest) -> Result<(), ExecError> {
        let pci = f.pci;
        let owner = &req.owner;
        let mode = mode_of(f);
        let pf = f.pf_netdev.clone().ok_or_else(|| {
            ExecError::new(
                ErrorKind::VfConfig,
                format!(
                    "the PF {} of VF {pci} has no netdev to configure VFs through",
                    f.pf_pci
                ),
            )
        })?;
        if mode == AttachMode::Netdev && req.netns.is_empty() {
            return Err(ExecError::new(
                ErrorKind::InvalidRequest,
                "CNI_NETNS is empty (netdev mode needs it)",
            ));
        }
        if req.vm.is_some() && mode != AttachMode::Vfio {
            return Err(ExecError::new(
                ErrorKind::InvalidConfig,
                format!(
                    "qmpSocket: a VM gets its VF through vfio-pci, but pool {} is in netdev mode",
                    f.resource
                ),
            ));
        }
        if mode == AttachMode::Vfio && (!req.ips.is_empty() || !req.routes.is_empty()) {
            // Multus would report the address on an interface the pod does not have.
            return Err(ExecError::new(
                ErrorKind::InvalidConfig,
                format!(
                    "ipam: pool {} hands out VFs on vfio-pci, which have no netdev in the pod to \
                     put addresses or routes on; remove ipam from this network",
                    f.resource
                ),
            ));
        }
        if mode == AttachMode::Vfio && f.driver.as_deref() != Some(VFIO_PCI) && !f.pool.bind_vfio {
            return Err(ExecError::new(
                ErrorKind::NoSuchDevice,
                format!(
                    "VF {pci} is on driver {}, and pool {} (vfio mode) does not bind vfio-pci",
                    f.driver.as_deref().unwrap_or("none"),
                    f.resource
                ),
            ));
        }
        let host = self.host.clone();
        let vf_index = f.vf_index;

        // Read (nothing changes yet): the VF's settings and its netdev's identity.
        let (settings, host_link) = {
            let pf = pf.clone();
            let host = host.clone();
            tokio::task::spawn_blocking(move || {
                let settings = host.vf_netlink.read_vf(&pf, vf_index);
                let link = || -> Result<Option<vfplug_host::net::LinkInfo>, ExecError> {
                    if mode != AttachMode::Netdev {
                        return Ok(None);
                    }
                    let names = SysfsInventory::new(host.sysfs_root.clone()).netdevs_of(pci);
                    let Some(n) = names.first() else {
                        return Err(ExecError::new(
                            ErrorKind::NoSuchDevice,
                            format!("VF {pci} has no netdev in vfplugd's netns (driver bound? moved elsewhere?)"),
                        ));
                    };
                    host.netdev
                        .link(None, n)
                        .map_err(|e| ExecError::net(ErrorKind::Netdev, &e))?
                        .ok_or_else(|| {
                            ExecError::new(
                                ErrorKind::Netdev,
                                format!("sysfs names netdev {n} for VF {pci}, netlink does not know it"),
                            )
                        })
                        .map(Some)
                };
                (settings, link())
            })
            .await
            .map_err(ExecError::joined)?
        };
        let settings = settings.map_err(|e| ExecError::net(ErrorKind::VfConfig, &e))?;
        let host_link = host_link?;

        let mut saved: SavedVfState = vfset::saved_from(&settings);
        saved.driver = f.driver.clone();
        let cfg = req.config.clone();
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
            ips: req.ips.iter().map(ToString::to_string).collect(),
            ipam_result: req.ipam_result.clone(),
            complete: false,
            vm: req.vm.clone(),
            attach_pending: false,
            attach_error: None,
        };
        // Write-ahead: everything needed to undo is durable before anything changes.
        {
            let saved = saved.clone();
            let cni = Box::new(attachment.clone());
            self.ledger
                .commit(move |l| {
                    l.plan_advance(
                        pci,
                        token,
                        Step::Configure {
                            saved,
                            cni: Some(cni),
                        },
                    )
                })
                .await?;
        }
        crate::failpoint::hit("add-configured");

        // Apply through the PF (serialized per PF), then place the netdev or bind vfio.
        let pf_lock = self.pf_lock(&pf);
        let bind = mode == AttachMode::Vfio && f.driver.as_deref() != Some(VFIO_PCI);
        let place = placement.map(|p| PlaceRequest {
            host_name: p.host_name,
            netns: PathBuf::from(&req.netns),
            pod_ifname: p.pod_ifname,
            mac: cfg.mac,
            mtu: cfg.mtu,
            addresses: req.ips.clone(),
            routes: req.routes.clone(),
        });
        let skipped = tokio::task::spawn_blocking(move || -> Result<Vec<String>, ExecError> {
            let report = {
                let _pf = lock(&pf_lock);
                vfset::apply_vf_config(host.vf_netlink.as_ref(), &pf, vf_index, &cfg, &saved)
                    .map_err(|e| {
                        let kind = if e.error.is_busy() {
                            ErrorKind::TryAgain
                        } else {
                            ErrorKind::VfConfig
                        };
                        ExecError::new(kind, e.to_string())
                    })?
            };
            if bind {
                host.driver.bind_vfio(pci).map_err(|e| {
                    ExecError::new(
                        ErrorKind::VfConfig,
                        format!("binding {pci} to vfio-pci: {e}"),
                    )
                })?;
            }
            if let Some(p) = place {
                host.netdev
                    .place(&p)
                    .map_err(|e| ExecError::net(ErrorKind::Netdev, &e))?;
            }
            Ok(report.skipped)
        })
        .await
        .map_err(ExecError::joined)??;
        crate::failpoint::hit("add-vfio-bound");

        // Done: record it (with the knobs the driver skipped, so CHECK does not expect them and
        // restore leaves them alone). A crash before this record: recovery undoes the ADD.
        attachment.skipped = skipped;
        attachment.complete = true;
        self.ledger
            .commit(move |l| l.plan_amend_cni(pci, token, attachment))
            .await?;
        crate::failpoint::hit("add-complete");
        info!(%pci, attachment = %owner, mode = %mode, "VF configured");
        Ok(())
    }

    /// What ADD would answer for a repeat (the VF), without changing anything.
    pub fn lookup(&self, req: &AddRequest) -> Option<PciAddress> {
        self.ledger.read(|l| {
            l.find_by_attachment(&req.owner.container_id, &req.owner.ifname)
                .filter(|(pci, s)| is_repeat(s, *pci, req))
                .map(|(pci, _)| pci)
        })
    }

    /// CNI DEL for the attachment (container ID, ifname); the pod is not needed (a DEL may not
    /// be told it).
    pub async fn del(
        self: &Arc<Self>,
        container_id: &str,
        ifname: &str,
        wait: Duration,
    ) -> Result<DelOutcome, ExecError> {
        let found = self.ledger.read(|l| {
            if let Some((pci, s)) = l.find_by_attachment(container_id, ifname) {
                return Ok(Some((pci, s.effective_lease().map(|l| l.token))));
            }
            let quarantined = l.iter().find(|(_, s)| {
                matches!(s, VfState::Quarantined { previous_owner: Some(o), .. }
                    if o.container_id == container_id && o.ifname == ifname)
            });
            match quarantined {
                Some((pci, _)) => Err(*pci),
                None => Ok(None),
            }
        });
        let (pci, token) = match found {
            Ok(Some((pci, Some(token)))) => (pci, token),
            Ok(Some((pci, None))) => {
                return Ok(DelOutcome {
                    pci: Some(pci),
                    finalized: crate::Finalized {
                        note: format!("VF {pci} holds no lease"),
                        ..Default::default()
                    },
                });
            }
            Ok(None) => {
                return Ok(DelOutcome {
                    pci: None,
                    finalized: crate::Finalized {
                        note: "no VF is held by this attachment".into(),
                        ..Default::default()
                    },
                });
            }
            Err(pci) => {
                return Ok(DelOutcome {
                    pci: Some(pci),
                    finalized: crate::Finalized {
                        note: format!(
                            "VF {pci} was quarantined while this attachment held it; nothing to do"
                        ),
                        ..Default::default()
                    },
                });
            }
        };
        let finalized = self.release(pci, token, "CNI DEL", wait).await?;
        Ok(DelOutcome {
            pci: Some(pci),
            finalized,
        })
    }

    /// Ends lease `token` on `pci` whatever step it is in: a VF in (or on its way into or out
    /// of) a guest is unplugged first ([`Executor::vm_detach`], waiting up to `wait`); anything
    /// else goes straight to [`Executor::finalize_removal`]. An unplug the guest has not
    /// acknowledged yet is reported as not released, with a note: the VM's watcher finishes it.
    pub async fn release(
        self: &Arc<Self>,
        pci: PciAddress,
        token: u64,
        why: &str,
        wait: Duration,
    ) -> Result<crate::Finalized, ExecError> {
        let in_vm = || {
            self.ledger.read(|l| {
                matches!(
                    l.get(&pci),
                    Some(
                        VfState::Attaching { .. }
                            | VfState::Attached { .. }
                            | VfState::Detaching { .. }
                    )
                )
            })
        };
        if !in_vm() {
            match self.finalize_removal(pci, token, why).await {
                // An owed hot-plug went in between the look and the VF lock: unplug it first.
                Err(e) if e.kind == ErrorKind::TryAgain && in_vm() => {}
                r => return r,
            }
        }
        match self.vm_detach(pci, token, wait).await? {
            crate::VmDetach::Finalized(f) => Ok(f),
            crate::VmDetach::Pending => Ok(crate::Finalized {
                note: format!(
                    "unplug of VF {pci} pending: the guest has not acknowledged it yet; vfplugd \
                     finishes the removal when it does (or when QEMU exits)"
                ),
                ..Default::default()
            }),
            crate::VmDetach::GuestRefused => Err(ExecError::new(
                ErrorKind::TryAgain,
                format!("the guest refused to release VF {pci}; it stays attached"),
            )),
        }
    }

    /// CNI CHECK: `Ok(pci)` when the attachment is as ADD left it.
    pub async fn check(&self, req: CheckRequest) -> Result<PciAddress, ExecError> {
        let failed = |m: String| ExecError::new(ErrorKind::CheckFailed, m);
        let (pci, state) = self
            .ledger
            .read(|l| {
                l.find_by_attachment(&req.container_id, &req.ifname)
                    .map(|(pci, s)| (pci, s.clone()))
            })
            .ok_or_else(|| {
                failed(format!(
                    "no VF is held for {}/{}",
                    req.container_id, req.ifname
                ))
            })?;
        let (VfState::Configured { lease } | VfState::Attached { lease, .. }) = &state else {
            return Err(failed(format!(
                "VF {pci} is {}, not configured (or attached to its VM)",
                state.kind()
            )));
        };
        if let Some(d) = req.device
            && d != pci
        {
            return Err(failed(format!(
                "prevResult names {d}, the attachment holds {pci}"
            )));
        }
        let cni = lease
            .cni
            .clone()
            .ok_or_else(|| failed(format!("VF {pci} has no attachment record")))?;
        if !cni.complete {
            return Err(failed(format!("VF {pci}: the ADD did not finish")));
        }
        if cni.config != req.config {
            return Err(failed(
                "the network config differs from the one ADD applied".into(),
            ));
        }
        let facts = self.ledger.vf(pci).map_err(|e| failed(e.msg))?;
        let pf = facts
            .pf_netdev
            .ok_or_else(|| failed(format!("VF {pci}: PF netdev unknown")))?;
        let vf_index = facts.vf_index;
        let host = self.host.clone();
        let prev_ips: Vec<String> = req.prev_ips.iter().map(ToString::to_string).collect();
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            match host.vf_netlink.read_vf(&pf, vf_index) {
                Ok(actual) => {
                    problems.extend(vfset::check_vf_config(&actual, &cni.config, &cni.skipped))
                }
                Err(e) => problems.push(format!("reading VF settings: {e}")),
            }
            match (&cni.mode, &cni.netdev) {
                (AttachMode::Netdev, Some(p)) => {
                    check_netdev(&host, &cni, p, &prev_ips, &mut problems);
                }
                (AttachMode::Vfio, _) => match host.driver.current_driver(pci) {
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
        .map_err(ExecError::joined)?;
        if problems.is_empty() {
            Ok(pci)
        } else {
            Err(failed(format!("VF {pci}: {}", problems.join("; "))))
        }
    }

    /// CNI GC for `network`: every attachment of that network not in `valid` (container ID,
    /// ifname) is finalized.
    pub async fn gc(
        self: &Arc<Self>,
        network: &str,
        valid: &BTreeSet<(String, String)>,
        wait: Duration,
    ) -> GcOutcome {
        let stale: Vec<(PciAddress, Owner, u64)> = self.ledger.read(|l| {
            l.iter()
                .filter_map(|(pci, s)| {
                    let lease = s.effective_lease()?;
                    // A lease without a record is an ADD that never reached Configured; its
                    // network is unknown, so only its own DEL, a later ADD or recovery
                    // releases it.
                    let net = lease.cni.as_deref().map(|c| c.network.as_str());
                    (net == Some(network)
                        && !valid.contains(&(
                            lease.owner.container_id.clone(),
                            lease.owner.ifname.clone(),
                        )))
                    .then(|| (*pci, lease.owner.clone(), lease.token))
                })
                .collect()
        });
        let mut out = GcOutcome::default();
        for (pci, owner, token) in stale {
            match self.release(pci, token, "CNI GC", wait).await {
                Ok(f) if f.released => out.released.push(pci),
                Ok(f) => out.errors.push(format!("{owner} on {pci}: {}", f.note)),
                Err(e) => out.errors.push(format!("{owner} on {pci}: {e}")),
            }
        }
        info!(
            network,
            released = out.released.len(),
            errors = out.errors.len(),
            "GC done"
        );
        out
    }
}

fn check_netdev(
    host: &crate::HostPorts,
    cni: &CniAttachment,
    p: &NetdevPlacement,
    prev_ips: &[String],
    problems: &mut Vec<String>,
) {
    match host.netdev.link(Some(Path::new(&cni.netns)), &p.pod_ifname) {
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
            let have: BTreeSet<String> = l.addresses.iter().map(ToString::to_string).collect();
            let mut wanted: Vec<&String> = cni.ips.iter().collect();
            wanted.extend(prev_ips.iter().filter(|i| !cni.ips.contains(i)));
            for ip in wanted {
                if !have.contains(ip) {
                    problems.push(format!("{}: address {ip} is missing", p.pod_ifname));
                }
            }
        }
        Ok(None) => problems.push(format!("no interface {} in {}", p.pod_ifname, cni.netns)),
        Err(e) => problems.push(e.to_string()),
    }
}
