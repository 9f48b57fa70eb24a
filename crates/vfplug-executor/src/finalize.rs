//! The one finalize-removal: however a VF's use ends (CNI DEL, GC, a failed ADD's rollback, a
//! restart finding a half-done ADD, and next the VM detach), it ends here.
//!
//! Order (DESIGN.md §1 step 2, libvirt's qemuDomainRemoveHostDevice):
//! 1. the lease moves to `Releasing` (durable) — from here on the VF is never handed out until
//!    this function decides;
//! 2. the netdev comes back from the pod (netdev mode);
//! 3. the saved VF settings are restored through the PF (serialized per PF);
//! 4. the function is reset (vfio mode: the workload had the raw device);
//! 5. the driver the VF had before the lease is bound again (or the pool's, for a pool that
//!    binds vfio-pci);
//! 6. the lease ends: `Free` (or back to the kubelet's accounting for a VF the kubelet gave the
//!    pod), which the agent's reconcile loop pushes to the kubelet at once — or, if any step failed, `Quarantined`
//!    with every failure in the reason. A quarantined VF is never handed out until an operator
//!    clears it.
//!
//! Every step is idempotent and the whole is fenced by the lease's token: calling it twice, or
//! after a crash at any point, ends in the same place, and a stale caller never touches a VF that
//! a newer lease holds.

use std::path::PathBuf;

use tracing::{info, warn};
use vfplug_core::ledger::{Lease, Step, Token, VfState};
use vfplug_core::{AttachMode, PciAddress};
use vfplug_host::driver::VFIO_PCI;
use vfplug_host::net::{RetrieveRequest, Retrieved};
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::vfset;

use crate::error::{ErrorKind, ExecError};
use crate::ports::{LedgerPort, VfFacts};
use crate::{Executor, lock};

/// How a finalize-removal ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finalized {
    /// The lease ended and the VF is back in its pool.
    pub released: bool,
    /// The VF was quarantined (see `warnings` for why).
    pub quarantined: bool,
    /// One line for logs and the CNI's answer.
    pub note: String,
    /// Things the caller should hear about (not failures of the removal).
    pub warnings: Vec<String>,
}

impl Finalized {
    fn noop(note: impl Into<String>) -> Self {
        Self {
            note: note.into(),
            ..Self::default()
        }
    }
}

impl<L: LedgerPort> Executor<L> {
    /// Finalizes the removal of the lease `token` holds on `pci` (VF lock taken here).
    pub async fn finalize_removal(
        &self,
        pci: PciAddress,
        token: Token,
        why: &str,
    ) -> Result<Finalized, ExecError> {
        let vf_lock = self.vf_lock(pci);
        let _held = vf_lock.lock().await;
        self.finalize_locked(pci, token, why).await
    }

    /// As [`Self::finalize_removal`], with the VF lock held by the caller.
    pub(crate) async fn finalize_locked(
        &self,
        pci: PciAddress,
        token: Token,
        why: &str,
    ) -> Result<Finalized, ExecError> {
        let Some(state) = self.ledger.read(|l| l.get(&pci).cloned()) else {
            return Ok(Finalized::noop(format!("VF {pci} is not on this node")));
        };
        if state.effective_lease().map(|l| l.token) != Some(token) {
            return Ok(Finalized::noop(format!(
                "VF {pci} is held by a newer attachment (or none); not touched"
            )));
        }
        let lease = match &state {
            VfState::Reserved { .. } | VfState::Missing { .. } => {
                // Nothing was done to the VF yet, or it is gone from the host: just let go.
                self.ledger.commit(|l| l.plan_release(pci, token)).await?;
                let facts = self.ledger.vf(pci).ok();
                self.ledger.lease_ended(pci, facts.as_ref());
                info!(%pci, why, "VF released (nothing to restore)");
                return Ok(Finalized {
                    released: true,
                    note: "released".into(),
                    ..Finalized::default()
                });
            }
            VfState::Configured { lease } => {
                let lease = lease.clone();
                self.ledger
                    .commit(|l| l.plan_advance(pci, token, Step::BeginRelease))
                    .await?;
                crate::failpoint::hit("finalize-begin");
                lease
            }
            VfState::Releasing { lease } => lease.clone(),
            other => {
                return Err(ExecError::new(
                    ErrorKind::TryAgain,
                    format!(
                        "VF {pci} is {} (a VM hotplug step owns it); try again later",
                        other.kind()
                    ),
                ));
            }
        };

        let facts = self.ledger.vf(pci).ok();
        let (problems, warnings) = self.undo_on_host(pci, &lease, facts.as_ref()).await?;

        if problems.is_empty() {
            self.ledger.commit(|l| l.plan_release(pci, token)).await?;
            crate::failpoint::hit("finalize-freed");
            self.ledger.lease_ended(pci, facts.as_ref());
            info!(%pci, why, "VF restored and released");
            Ok(Finalized {
                released: true,
                note: "restored and released".into(),
                warnings,
                ..Finalized::default()
            })
        } else {
            let reason = format!("{why}; release failed: {}", problems.join("; "));
            warn!(%pci, %reason, "VF quarantined");
            self.ledger
                .commit(|l| l.plan_quarantine(pci, &reason))
                .await?;
            let mut w = warnings;
            w.push(format!("VF {pci} quarantined: {reason}"));
            Ok(Finalized {
                quarantined: true,
                note: "quarantined".into(),
                warnings: w,
                ..Finalized::default()
            })
        }
    }

    /// Steps 2–5 on a blocking thread; returns (problems, warnings). Every step runs even when
    /// an earlier one failed, so the reason names every failure.
    async fn undo_on_host(
        &self,
        pci: PciAddress,
        lease: &Lease,
        facts: Option<&VfFacts>,
    ) -> Result<(Vec<String>, Vec<String>), ExecError> {
        let host = self.host.clone();
        let pf = facts.and_then(|f| f.pf_netdev.clone());
        let vf_index = facts.map_or(0, |f| f.vf_index);
        let pool_driver = facts.and_then(|f| f.pool.bind_vfio.then(|| VFIO_PCI.to_owned()));
        let pf_lock = pf.as_deref().map(|p| self.pf_lock(p));
        let cni = lease.cni.clone();
        let saved = lease.saved.clone().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let mut problems: Vec<String> = Vec::new();
            let mut warnings: Vec<String> = Vec::new();
            let mode = cni.as_ref().map_or(AttachMode::Vfio, |c| c.mode);
            // 2. The netdev comes home.
            if let Some(p) = cni.as_ref().and_then(|c| c.netdev.as_ref().map(|p| (c, p))) {
                let (cni, p) = p;
                let sysfs = SysfsInventory::new(host.sysfs_root.clone());
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
                    // PCI addresses are the kernel's only under the real /sys (another root is
                    // a simulated node with stand-in netdevs): only then can retrieve check a
                    // link's parent device.
                    vf: (host.sysfs_root == std::path::Path::new("/sys")).then_some(pci),
                };
                match host.netdev.retrieve(&req) {
                    Ok(Retrieved::NotFound) => warnings.push(format!(
                        "netdev {} of VF {pci} was not found in the pod or on the host",
                        p.host_name
                    )),
                    Ok(_) => {}
                    Err(e) => problems.push(format!("bringing netdev {} back: {e}", p.host_name)),
                }
            }
            // 3. Settings restored through the PF. A lease that never got past the write-ahead
            // record of its settings has nothing to restore beyond what was saved.
            if let Some(cni) = &cni {
                match (&pf, &pf_lock) {
                    (Some(pf), Some(l)) => {
                        let _pf = lock(l);
                        if let Err(errs) = vfset::restore_vf_config(
                            host.vf_netlink.as_ref(),
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
            }
            crate::failpoint::hit("finalize-restored");
            // 4. Reset: in vfio mode the workload drove the device itself; its state must not
            // reach the next owner. In netdev mode the host driver stayed bound throughout and a
            // reset would only bounce its link.
            if mode == AttachMode::Vfio
                && let Err(e) = host.driver.reset(pci)
            {
                problems.push(format!("resetting VF {pci}: {e}"));
            }
            crate::failpoint::hit("finalize-reset");
            // 5. The driver it had before the lease (or the pool's).
            if let Some(want) = saved.driver.clone().or(pool_driver) {
                match host.driver.current_driver(pci) {
                    Ok(Some(d)) if d == want => {}
                    Ok(_) => {
                        if let Err(e) = host.driver.bind(pci, &want) {
                            problems.push(format!("rebinding VF {pci} to {want}: {e}"));
                        }
                    }
                    Err(e) => problems.push(format!("reading VF {pci}'s driver: {e}")),
                }
            }
            crate::failpoint::hit("finalize-rebound");
            (problems, warnings)
        })
        .await
        .map_err(ExecError::joined)
    }
}
