//! Per-VM records: the **nets** and **hostdevs** of each VM pod, as projections of the ledger
//! (DESIGN.md §1, §5; libvirt keeps the two as separate lists of a domain's definition and must
//! keep them in step by hand).
//!
//! Here they cannot disagree: a VM's VF is one lease in the ledger, and [`vm_records`] derives
//! both records of that VF from that one entry, so a hostdev always names its net, and a net has
//! its hostdev in every phase but the last. The only state is the ledger's; nothing here is
//! stored. The Domain resource and its controller (issue 10) read exactly this projection into
//! `Domain.status`, and the node API's `VmRecords` serves it.
//!
//! Which ledger state is which [`Phase`]:
//!
//! | ledger | phase | hostdev record |
//! |---|---|---|
//! | `Configured` whose attachment names a VM (`cni.vm`): the ADD is under way, or the hot-plug is owed because QEMU was not running (`cni.attach_pending`; `reason` is `cni.attach_error` when a try failed) | `pending` | yes, no alias yet |
//! | `Attaching` | `attaching` | yes |
//! | `Attached` | `attached` | yes |
//! | `Attached` with a reason (the guest refused the last unplug) | `guest-error` | yes |
//! | `Detaching` | `unplug-pending` | yes |
//! | `Releasing` of a VM's attachment | `releasing` | no: out of the guest, settings being restored; the net stays until Free |
//!
//! A VF that vanished from the host (`Missing`) is shown as what it was. `Reserved`, `Free`,
//! quarantined and container-pod VFs belong to no VM.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ident::VmRef;
use crate::ledger::{Lease, Ledger, Record, VfState};
use crate::pci::PciAddress;
use crate::vfconf::MacAddr;

/// Where a VM's VF is in its life, as the VM's records show it. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The ADD recorded the VM; the device is not being added yet (e.g. QEMU not answering).
    Pending,
    /// `device_add` sent (or about to be), presence not yet verified.
    Attaching,
    /// In the guest, verified.
    Attached,
    /// `device_del` sent; waiting for the guest (`DEVICE_DELETED`).
    UnplugPending,
    /// The guest refused the last unplug; the device is still in it.
    GuestError,
    /// Out of the guest; the VF's settings are being restored. Only the net is left.
    Releasing,
}

impl Phase {
    /// Every phase, in life order (for gauges that must show zeros).
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Attaching,
        Phase::Attached,
        Phase::UnplugPending,
        Phase::GuestError,
        Phase::Releasing,
    ];

    /// The name used in logs, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::UnplugPending => "unplug-pending",
            Self::GuestError => "guest-error",
            Self::Releasing => "releasing",
        }
    }

    /// Whether the VF has a hostdev record in this phase.
    pub fn has_hostdev(self) -> bool {
        self != Self::Releasing
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of device backs a net. Only PCI hostdevs today (libvirt's `<interface
/// type='hostdev'>`); the type is spelled out so a reader never has to assume it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActualType {
    /// A PCI device passed through (vfio-pci).
    Hostdev,
}

/// The device actually behind a net.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualDevice {
    /// Always [`ActualType::Hostdev`] today.
    #[serde(rename = "type")]
    pub kind: ActualType,
    /// The VF's host PCI address.
    pub pci_address: PciAddress,
}

/// A VM's network interface backed by a VF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// The interface name (CNI_IFNAME), unique within the pod.
    pub name: String,
    /// The CNI network it came from (empty when not attached through CNI).
    pub network: String,
    /// The pool (resource name) the VF came from, when the caller knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The administrative MAC the attachment asked for (`None`: left as the VF had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The VLAN the attachment asked for (`None`: left as the VF had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The VF behind it.
    pub actual: ActualDevice,
    /// The VF's phase (the same as its hostdev's, which is gone in `releasing`).
    pub phase: Phase,
}

/// A VF passed through into a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostdevRecord {
    /// QEMU's device id; `None` while pending (the attach chooses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The VF's host PCI address.
    pub pci_address: PciAddress,
    /// The net it backs ([`NetRecord::name`]).
    pub parent_net: String,
    /// Where it is.
    pub phase: Phase,
    /// Why the guest refused the last unplug (`guest-error` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One VM's records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecords {
    /// The VM pod and its QMP socket.
    pub vm: VmRef,
    /// Its nets, by name.
    pub nets: Vec<NetRecord>,
    /// Its hostdevs, by parent net.
    pub hostdevs: Vec<HostdevRecord>,
}

/// One VF of a VM as the ledger has it: its VM, its phase and (while it has one) its alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmVf<'a> {
    /// The VM (from the VM step's state, else from the attachment record).
    pub vm: &'a VmRef,
    /// The phase.
    pub phase: Phase,
    /// QEMU's device id, once the attach recorded it.
    pub alias: Option<&'a str>,
}

/// The VM the attachment record names.
fn cni_vm(lease: &Lease) -> Option<&VmRef> {
    lease.cni.as_deref().and_then(|c| c.vm.as_ref())
}

/// The VM of a VM step's state: its own `VmRef`, unless an older log left it empty (`null`),
/// then the one the attachment recorded.
fn vm_of<'a>(vm: &'a VmRef, lease: &'a Lease) -> &'a VmRef {
    match cni_vm(lease) {
        Some(c) if vm.qmp_socket.is_empty() => c,
        _ => vm,
    }
}

/// Which VM a VF is in (or on its way into or out of), and in which phase; `None` for a VF of
/// no VM. Looks through `Missing`.
pub fn vm_vf(state: &VfState) -> Option<VmVf<'_>> {
    let (vm, phase, alias) = match state {
        VfState::Missing { was } => return vm_vf(was),
        VfState::Configured { lease } => (cni_vm(lease)?, Phase::Pending, None),
        VfState::Attaching {
            lease, alias, vm, ..
        } => (vm_of(vm, lease), Phase::Attaching, Some(alias.as_str())),
        VfState::Attached {
            lease,
            alias,
            vm,
            reason,
        } => {
            let phase = if reason.is_some() {
                Phase::GuestError
            } else {
                Phase::Attached
            };
            (vm_of(vm, lease), phase, Some(alias.as_str()))
        }
        VfState::Detaching {
            lease, alias, vm, ..
        } => (vm_of(vm, lease), Phase::UnplugPending, Some(alias.as_str())),
        VfState::Releasing { lease } => (cni_vm(lease)?, Phase::Releasing, None),
        _ => return None,
    };
    Some(VmVf { vm, phase, alias })
}

/// The records of one VF of a VM: its net, and its hostdev unless it is `releasing`.
fn records_of(
    pci: PciAddress,
    state: &VfState,
    pool: Option<String>,
) -> Option<(&VmRef, NetRecord, Option<HostdevRecord>)> {
    let v = vm_vf(state)?;
    let lease = state.effective_lease()?;
    let cni = lease.cni.as_deref();
    let name = lease.owner.ifname.clone();
    let net = NetRecord {
        name: name.clone(),
        network: cni.map(|c| c.network.clone()).unwrap_or_default(),
        pool,
        mac: cni.and_then(|c| c.config.mac),
        vlan: cni.and_then(|c| c.config.vlan),
        actual: ActualDevice {
            kind: ActualType::Hostdev,
            pci_address: pci,
        },
        phase: v.phase,
    };
    let reason = match state {
        VfState::Attached { reason, .. } => reason.clone(),
        // An owed hot-plug (QEMU not running when its ADD answered) that failed when tried.
        VfState::Configured { lease } => lease.cni.as_deref().and_then(|c| c.attach_error.clone()),
        VfState::Missing { was } => match &**was {
            VfState::Attached { reason, .. } => reason.clone(),
            _ => None,
        },
        _ => None,
    };
    let hostdev = v.phase.has_hostdev().then(|| HostdevRecord {
        alias: v.alias.map(str::to_owned),
        pci_address: pci,
        parent_net: name,
        phase: v.phase,
        reason,
    });
    Some((v.vm, net, hostdev))
}

/// The records of every VM the ledger has a VF in, derived from the ledger alone (one VF, one
/// lease, one entry of each list). `pool_of` names the pool of a VF (the ledger does not know
/// pools; pass `|_| None` when that does not matter). VMs are keyed by their QMP socket and
/// ordered by pod, then socket; nets and hostdevs by interface name.
pub fn vm_records(
    ledger: &Ledger,
    pool_of: impl Fn(&PciAddress) -> Option<String>,
) -> Vec<VmRecords> {
    let mut by_socket: BTreeMap<&str, VmRecords> = BTreeMap::new();
    for (pci, state) in ledger.iter() {
        let Some((vm, net, hostdev)) = records_of(*pci, state, pool_of(pci)) else {
            continue;
        };
        let rec = by_socket
            .entry(vm.qmp_socket.as_str())
            .or_insert_with(|| VmRecords {
                vm: vm.clone(),
                nets: Vec::new(),
                hostdevs: Vec::new(),
            });
        // An older record may know less of the pod than a newer one of the same VM.
        if rec.vm.pod == crate::ident::PodRef::default() && vm.pod != rec.vm.pod {
            rec.vm = vm.clone();
        }
        rec.nets.push(net);
        rec.hostdevs.extend(hostdev);
    }
    let mut out: Vec<VmRecords> = by_socket.into_values().collect();
    for r in &mut out {
        r.nets.sort_by(|a, b| a.name.cmp(&b.name));
        r.hostdevs.sort_by(|a, b| a.parent_net.cmp(&b.parent_net));
    }
    out.sort_by(|a, b| (&a.vm.pod, &a.vm.qmp_socket).cmp(&(&b.vm.pod, &b.vm.qmp_socket)));
    out
}

/// Which VMs a caller asks for: empty fields match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFilter {
    /// The VM pod's UID.
    pub pod_uid: String,
    /// The VM pod's namespace.
    pub namespace: String,
    /// The VM pod's name (needs `namespace`: names are unique only within one).
    pub name: String,
}

/// Why a [`VmFilter`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmFilterError {
    /// A pod name without its namespace.
    #[error("pod name {0:?} needs its namespace (pod names are unique only within one)")]
    NameWithoutNamespace(String),
}

impl VmFilter {
    /// Checks the filter.
    pub fn validate(&self) -> Result<(), VmFilterError> {
        if !self.name.is_empty() && self.namespace.is_empty() {
            return Err(VmFilterError::NameWithoutNamespace(self.name.clone()));
        }
        Ok(())
    }

    /// Whether `vm` is one of the VMs asked for.
    pub fn matches(&self, vm: &VmRef) -> bool {
        let field = |want: &str, have: &str| want.is_empty() || want == have;
        field(&self.pod_uid, &vm.pod.uid)
            && field(&self.namespace, &vm.pod.namespace)
            && field(&self.name, &vm.pod.name)
    }
}

/// A VF's phase changed in a VM (or it entered or left one): what the log line and the Domain
/// controller need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseChange {
    /// The VF.
    pub pci: PciAddress,
    /// Its VM (after the change, else before).
    pub vm: VmRef,
    /// QEMU's device id, when known (after the change, else before).
    pub alias: Option<String>,
    /// The phase before (`None`: in no VM).
    pub from: Option<Phase>,
    /// The phase after (`None`: in no VM any more, e.g. Free).
    pub to: Option<Phase>,
}

/// The phase change a record makes, if it makes one.
pub fn phase_change(record: &Record) -> Option<PhaseChange> {
    let Record::Set { pci, from, to } = record else {
        return None;
    };
    let (a, b) = (vm_vf(from), vm_vf(to));
    let (pa, pb) = (a.as_ref().map(|v| v.phase), b.as_ref().map(|v| v.phase));
    if pa == pb {
        return None;
    }
    let now = b.as_ref().or(a.as_ref())?;
    Some(PhaseChange {
        pci: *pci,
        vm: now.vm.clone(),
        alias: b
            .as_ref()
            .and_then(|v| v.alias)
            .or(a.as_ref().and_then(|v| v.alias))
            .map(str::to_owned),
        from: pa,
        to: pb,
    })
}
