//! The VF ledger: who owns each VF, in which step of its life (DESIGN.md §4).
//!
//! # Model
//!
//! One [`VfState`] per VF, keyed by PCI address:
//!
//! ```text
//! Free ─reserve─> Reserved ─Configure─> Configured ─Attach─> Attaching ─Attached─> Attached
//!  ^  ^              │  └──────────BeginRelease──────┐  │ ^     │  │ AttachFailed      │
//!  │  │              │                               v  │ └─────┘  └─Detach─┐  ┌─Detach┘
//!  │  └──release─────┴───────────release──────── Releasing <─Detached── Detaching ⟲ DetachRetry
//!  │                                                                (UnplugFailed -> Attached)
//!  ├─kubelet_allocate/release── KubeletAllocated{pod}   (kubelet's own allocations)
//!  └─unquarantine── Quarantined{reason}  <─quarantine─ any present state
//!                   Missing{was}  <─inventory─> any state (VF vanished / came back)
//! ```
//!
//! Every owned state carries a [`Lease`]: the [`Owner`] (pod UID, CNI container ID, interface)
//! and a fencing [`Token`] from a ledger-wide counter that only grows. Every fenced operation
//! presents its token; a token that does not match the VF's current lease is
//! [`LedgerError::Fenced`] and changes nothing, so a late DEL of an old attachment can never
//! touch a VF that now belongs to someone else (the sriov-cni #219 class of bug).
//!
//! # Write-ahead
//!
//! Nothing here mutates directly. A `plan_*` method checks the request against the current
//! state and returns a [`Record`] (serde, versioned, `op`-tagged). The caller applies it with
//! [`Ledger::apply`] — which re-validates it (expected prior state, legal transition, token
//! growth, owner uniqueness), so a refused record is never written and a corrupt or reordered
//! log is detected rather than believed — appends it to its log in apply order, and performs the
//! action the record announces only once the record is durable (vfplugd: the agent's journal,
//! whose tickets resolve after the group-committed fsync). Recovery is [`Ledger::replay`] of the log, optionally on top of a snapshot (the
//! `Ledger` itself is serde-serializable and re-validated on load).
//!
//! The save of the VF's original settings ([`SavedVfState`]) happens exactly once per lease, in
//! `Reserved → Configured`, from a VF that was Free: it is never re-saved from a dirty state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::device::Inventory;
use crate::ident::{PodRef, VmRef};
use crate::pci::PciAddress;
use crate::vfconf::{CniAttachment, VlanProto};

/// Fencing token: ledger-wide, strictly increasing, never reused once persisted.
pub type Token = u64;

/// Who holds a VF: one interface of one container of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The pod (older logs hold one string, `namespace/name` or a UID, under `pod` or
    /// `pod_uid`; both still read).
    #[serde(alias = "pod_uid")]
    pub pod: PodRef,
    /// CNI container ID (sandbox ID).
    pub container_id: String,
    /// Interface name in the pod (CNI_IFNAME).
    pub ifname: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.pod, self.container_id, self.ifname)
    }
}

/// VF link state setting (`ip link set <pf> vf N state ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfLinkState {
    /// Follow the PF.
    Auto,
    /// Forced up.
    Enable,
    /// Forced down.
    Disable,
}

/// A VF's host-side settings before vfplug changed them, restored on release.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVfState {
    /// Administrative MAC set through the PF; `None` when unset (all zero).
    pub mac: Option<[u8; 6]>,
    /// VLAN ID (0 = none).
    pub vlan: u16,
    /// VLAN QoS.
    pub qos: u32,
    /// Spoof checking, if the driver reports it.
    pub spoofchk: Option<bool>,
    /// Trust, if the driver reports it.
    pub trust: Option<bool>,
    /// Link state, if the driver reports it.
    pub link_state: Option<VfLinkState>,
    /// Minimum TX rate in Mbit/s.
    pub min_tx_rate: Option<u32>,
    /// Maximum TX rate in Mbit/s.
    pub max_tx_rate: Option<u32>,
    /// The driver bound before vfplug rebound it (e.g. `iavf`), to rebind on release.
    pub driver: Option<String>,
    /// VLAN protocol, if the driver reports it (older logs lack it: 802.1Q).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_proto: Option<VlanProto>,
}

/// An ownership of a VF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder.
    pub owner: Owner,
    /// The fencing token issued when the lease began.
    pub token: Token,
    /// Original VF settings, saved once in `Reserved → Configured`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedVfState>,
    /// The VF was claimed from `KubeletAllocated` (kubelet's device of the same pod, configured
    /// by CNI); releasing it returns it to kubelet's accounting instead of to Free.
    #[serde(default)]
    pub from_kubelet: bool,
    /// What the CNI ADD did (set by `Reserved → Configured`): DEL, CHECK and GC work from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<Box<CniAttachment>>,
}

/// The state of one VF. See the module docs for the transitions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VfState {
    /// In the pool, nobody has it.
    Free,
    /// Allocated by kubelet (Allocate, or learned from PodResources). `pod` is `None` until
    /// PodResources tells which pod it is (Allocate does not say).
    KubeletAllocated {
        /// Pod UID (or namespace/name) when known.
        pod: Option<String>,
    },
    /// Taken from the pool for an owner; nothing done to the VF yet.
    Reserved {
        /// Ownership.
        lease: Lease,
    },
    /// Original settings saved, owner's settings applied (and, in vfio mode, bound to vfio-pci).
    /// For a container pod this is also "in use".
    Configured {
        /// Ownership; `saved` is set.
        lease: Lease,
    },
    /// `device_add` sent (or pending until QEMU answers).
    Attaching {
        /// Ownership.
        lease: Lease,
        /// QEMU device id.
        alias: String,
        /// The VM it goes into, recorded before `device_add` so recovery knows which QEMU to ask.
        #[serde(default)]
        vm: VmRef,
    },
    /// In the guest, verified.
    Attached {
        /// Ownership.
        lease: Lease,
        /// QEMU device id.
        alias: String,
        /// Which VM.
        vm: VmRef,
        /// Why the last unplug failed (the guest refused it), set by `UnplugFailed` and gone
        /// with the next `Detach`. Older logs lack it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// `device_del` sent, waiting for `DEVICE_DELETED` (or QEMU exit).
    Detaching {
        /// Ownership.
        lease: Lease,
        /// QEMU device id.
        alias: String,
        /// The VM it was (being) attached to.
        #[serde(default, deserialize_with = "crate::ident::vm_or_null")]
        vm: VmRef,
        /// When the first `device_del` was sent, unix ms (from the caller's clock).
        since_ms: u64,
        /// How many `device_del`s were sent.
        attempts: u32,
    },
    /// Out of any guest; restoring settings, resetting, rebinding.
    Releasing {
        /// Ownership.
        lease: Lease,
    },
    /// Taken out of service (restore failed, or an operator said so). Never handed out.
    Quarantined {
        /// Why.
        reason: String,
        /// Who held it when it was quarantined.
        previous_owner: Option<Owner>,
    },
    /// Vanished from the host while not Free; restored when it reappears.
    Missing {
        /// The state it had.
        was: Box<VfState>,
    },
}

/// The name of a [`VfState`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    /// [`VfState::Free`].
    Free,
    /// [`VfState::KubeletAllocated`].
    KubeletAllocated,
    /// [`VfState::Reserved`].
    Reserved,
    /// [`VfState::Configured`].
    Configured,
    /// [`VfState::Attaching`].
    Attaching,
    /// [`VfState::Attached`].
    Attached,
    /// [`VfState::Detaching`].
    Detaching,
    /// [`VfState::Releasing`].
    Releasing,
    /// [`VfState::Quarantined`].
    Quarantined,
    /// [`VfState::Missing`].
    Missing,
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Free => "free",
            Self::KubeletAllocated => "kubelet_allocated",
            Self::Reserved => "reserved",
            Self::Configured => "configured",
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Releasing => "releasing",
            Self::Quarantined => "quarantined",
            Self::Missing => "missing",
        };
        f.write_str(s)
    }
}

impl VfState {
    /// The variant's name.
    pub fn kind(&self) -> StateKind {
        match self {
            Self::Free => StateKind::Free,
            Self::KubeletAllocated { .. } => StateKind::KubeletAllocated,
            Self::Reserved { .. } => StateKind::Reserved,
            Self::Configured { .. } => StateKind::Configured,
            Self::Attaching { .. } => StateKind::Attaching,
            Self::Attached { .. } => StateKind::Attached,
            Self::Detaching { .. } => StateKind::Detaching,
            Self::Releasing { .. } => StateKind::Releasing,
            Self::Quarantined { .. } => StateKind::Quarantined,
            Self::Missing { .. } => StateKind::Missing,
        }
    }

    /// The lease of an owned state (not looking through `Missing`).
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Self::Reserved { lease }
            | Self::Configured { lease }
            | Self::Attaching { lease, .. }
            | Self::Attached { lease, .. }
            | Self::Detaching { lease, .. }
            | Self::Releasing { lease } => Some(lease),
            _ => None,
        }
    }

    /// The lease, looking through `Missing` (a vanished VF is still owned).
    pub fn effective_lease(&self) -> Option<&Lease> {
        match self {
            Self::Missing { was } => was.lease(),
            s => s.lease(),
        }
    }

    /// The owner, looking through `Missing`.
    pub fn owner(&self) -> Option<&Owner> {
        self.effective_lease().map(|l| &l.owner)
    }

    /// Whether kubelet may hand this VF out (the device plugin reports it Healthy).
    pub fn is_free(&self) -> bool {
        matches!(self, Self::Free)
    }
}

/// A step along the attach/detach chain, requested with [`Ledger::plan_advance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `Reserved → Configured`: original settings were read (persist before changing them).
    Configure {
        /// The VF's settings as found.
        saved: SavedVfState,
        /// What the CNI ADD is about to do, if this lease is a CNI attachment.
        cni: Option<Box<CniAttachment>>,
    },
    /// `Configured → Attaching`: about to `device_add`.
    Attach {
        /// QEMU device id.
        alias: String,
        /// The VM it goes into.
        vm: VmRef,
    },
    /// `Attaching → Attached`: verified in the guest.
    Attached,
    /// `Attaching → Configured`: `device_add` failed, nothing in the guest.
    AttachFailed,
    /// `Attaching | Attached → Detaching`: about to `device_del`.
    Detach {
        /// Now, unix ms.
        since_ms: u64,
    },
    /// `Detaching → Detaching`: `device_del` sent again.
    DetachRetry,
    /// `Detaching → Attached`: `DEVICE_UNPLUG_GUEST_ERROR`, the guest refused.
    UnplugFailed {
        /// Why, as shown in the VM's records until the next detach.
        reason: String,
    },
    /// `Detaching → Releasing`: `DEVICE_DELETED` (or QEMU exited).
    Detached,
    /// `Reserved | Configured → Releasing`: give it back without any guest involved.
    BeginRelease,
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Self::Configure { .. } => "configure",
            Self::Attach { .. } => "attach",
            Self::Attached => "mark attached",
            Self::AttachFailed => "roll back attach",
            Self::Detach { .. } => "detach",
            Self::DetachRetry => "retry detach",
            Self::UnplugFailed { .. } => "mark unplug failed",
            Self::Detached => "mark detached",
            Self::BeginRelease => "begin release",
        }
    }
}

/// One durable ledger change. Variant tags carry a version (`set.v1`) so a later format can
/// add variants while old logs stay readable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
// Records are transient (planned, persisted, applied); boxing the states would only add
// allocations on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Record {
    /// A VF appeared; it enters Free.
    #[serde(rename = "add.v1")]
    Add {
        /// The VF.
        pci: PciAddress,
    },
    /// A VF leaves the ledger: it vanished while Free, or its vanished owner let it go.
    #[serde(rename = "remove.v1")]
    Remove {
        /// The VF.
        pci: PciAddress,
        /// Its state before (Free or Missing), checked on apply.
        was: VfState,
    },
    /// A state change.
    #[serde(rename = "set.v1")]
    Set {
        /// The VF.
        pci: PciAddress,
        /// The state it must be in, checked on apply.
        from: VfState,
        /// The state it goes to.
        to: VfState,
    },
}

impl Record {
    /// The VF the record is about.
    pub fn pci(&self) -> PciAddress {
        match self {
            Self::Add { pci } | Self::Remove { pci, .. } | Self::Set { pci, .. } => *pci,
        }
    }

    /// The token this record issues, if it starts a new lease.
    pub fn new_token(&self) -> Option<Token> {
        match self {
            Self::Set { from, to, .. } => {
                let t = to.lease()?.token;
                // Restoring a Missing VF keeps its lease: look through `Missing`.
                (from.effective_lease().map(|l| l.token) != Some(t)).then_some(t)
            }
            _ => None,
        }
    }
}

/// Why a plan or an apply was refused. A refused plan changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The VF is not in the ledger.
    #[error("VF {pci} is not in the ledger")]
    UnknownVf {
        /// The VF.
        pci: PciAddress,
    },
    /// The VF cannot be taken: it is not Free (or, for a claim, kubelet's for this pod).
    #[error("VF {pci} is {state}, not free")]
    NotFree {
        /// The VF.
        pci: PciAddress,
        /// Its state.
        state: StateKind,
    },
    /// The owner already holds a VF (one VF per pod interface).
    #[error("{owner} already holds VF {pci}")]
    OwnerBusy {
        /// The owner (boxed: it is the largest field of any ledger error).
        owner: Box<Owner>,
        /// The VF it holds.
        pci: PciAddress,
    },
    /// The presented token does not own the VF: the request is stale. Nothing changed.
    #[error("fenced: token {presented} does not own VF {pci} (current lease token: {current:?})")]
    Fenced {
        /// The VF.
        pci: PciAddress,
        /// The token the caller presented.
        presented: Token,
        /// The VF's current token, if it is owned.
        current: Option<Token>,
    },
    /// The operation is not valid from the VF's state.
    #[error("VF {pci}: cannot {action} from state {from}")]
    InvalidTransition {
        /// The VF.
        pci: PciAddress,
        /// Its state.
        from: StateKind,
        /// What was asked.
        action: &'static str,
    },
    /// The VF already is in the requested state (callers usually treat this as success).
    #[error("VF {pci} already is {state}")]
    NoChange {
        /// The VF.
        pci: PciAddress,
        /// Its state.
        state: StateKind,
    },
    /// A record's expected prior state is not the VF's state (stale plan, or reordered log).
    #[error("record for VF {pci} expects {expected:?}, ledger has {found:?}")]
    Stale {
        /// The VF.
        pci: PciAddress,
        /// What the record expected (`None`: absent).
        expected: Option<StateKind>,
        /// What the ledger has (`None`: absent).
        found: Option<StateKind>,
    },
    /// A record describes a transition the state machine does not allow (corrupt log).
    #[error("record for VF {pci} is not a legal transition: {reason}")]
    Illegal {
        /// The VF.
        pci: PciAddress,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot failed validation.
    #[error("invalid ledger snapshot: {0}")]
    Snapshot(String),
}

/// Serialized form of a [`Ledger`] (a snapshot for log compaction).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LedgerSnapshot {
    version: u32,
    last_token: Token,
    vfs: BTreeMap<PciAddress, VfState>,
}

const SNAPSHOT_VERSION: u32 = 1;

/// The ledger. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LedgerSnapshot", into = "LedgerSnapshot")]
pub struct Ledger {
    last_token: Token,
    vfs: BTreeMap<PciAddress, VfState>,
    /// Owner -> VF, derived from `vfs` (not serialized): keeps `find_by_owner` and the
    /// one-VF-per-owner check of `apply` O(log n), so replaying a long log is not quadratic.
    by_owner: BTreeMap<Owner, PciAddress>,
}

impl From<Ledger> for LedgerSnapshot {
    fn from(l: Ledger) -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            last_token: l.last_token,
            vfs: l.vfs,
        }
    }
}

impl TryFrom<LedgerSnapshot> for Ledger {
    type Error = LedgerError;
    fn try_from(s: LedgerSnapshot) -> Result<Self, LedgerError> {
        if s.version != SNAPSHOT_VERSION {
            return Err(LedgerError::Snapshot(format!(
                "unsupported version {}",
                s.version
            )));
        }
        let mut by_owner = BTreeMap::new();
        for (pci, st) in &s.vfs {
            if let Some(o) = st.owner()
                && by_owner.insert(o.clone(), *pci).is_some()
            {
                return Err(LedgerError::Snapshot(format!("{pci}: {o} holds two VFs")));
            }
        }
        let l = Ledger {
            last_token: s.last_token,
            vfs: s.vfs,
            by_owner,
        };
        l.check_invariants()?;
        Ok(l)
    }
}

/// The key a claimed kubelet VF returns to kubelet's accounting under: `namespace/name` as
/// PodResources says it, or the UID for a pod known only by UID (older ledgers).
fn kubelet_key(pod: &PodRef) -> Option<String> {
    pod.key()
        .or_else(|| (!pod.uid.is_empty()).then(|| pod.uid.clone()))
}

fn illegal(pci: PciAddress, reason: impl Into<String>) -> LedgerError {
    LedgerError::Illegal {
        pci,
        reason: reason.into(),
    }
}

/// The transition table, used by [`Ledger::apply`] to re-validate every record.
fn check_transition(pci: PciAddress, from: &VfState, to: &VfState) -> Result<(), LedgerError> {
    use VfState::*;
    let ok = match (from, to) {
        (Missing { was }, to) => **was == *to,
        (_, Missing { .. }) => matches!(to, Missing { was } if **was == *from),
        (Quarantined { .. }, Free) => true,
        (Quarantined { .. }, _) => false,
        (from, Quarantined { previous_owner, .. }) => previous_owner.as_ref() == from.owner(),
        (Free, KubeletAllocated { .. }) => true,
        (KubeletAllocated { pod: a }, KubeletAllocated { pod: b }) => a != b,
        (KubeletAllocated { .. }, Free) => true,
        (Free, Reserved { lease }) => lease.saved.is_none() && !lease.from_kubelet,
        (KubeletAllocated { pod }, Reserved { lease }) => {
            lease.saved.is_none()
                && lease.from_kubelet
                && pod.as_ref().is_none_or(|p| lease.owner.pod.is_key(p))
        }
        (Reserved { lease: a }, Configured { lease: b }) => {
            a.saved.is_none()
                && b.saved.is_some()
                && a.owner == b.owner
                && a.token == b.token
                && a.from_kubelet == b.from_kubelet
        }
        // An amended attachment record (what the driver skipped); nothing else may change.
        (Configured { lease: a }, Configured { lease: b }) => {
            a.owner == b.owner
                && a.token == b.token
                && a.saved == b.saved
                && a.from_kubelet == b.from_kubelet
                && a.cni != b.cni
        }
        (Configured { lease: a }, Attaching { lease: b, .. }) => a == b,
        (
            Attaching {
                lease: a,
                alias: x,
                vm: v,
            },
            Attached {
                lease: b,
                alias: y,
                vm: w,
                reason: None,
            },
        ) => a == b && x == y && v == w,
        (Attaching { lease: a, .. }, Configured { lease: b }) => a == b,
        (
            Attaching {
                lease: a,
                alias: x,
                vm: v,
            }
            | Attached {
                lease: a,
                alias: x,
                vm: v,
                ..
            },
            Detaching {
                lease: b,
                alias: y,
                vm: w,
                attempts: 1,
                ..
            },
        ) => a == b && x == y && v == w,
        (
            Detaching {
                lease: a,
                alias: x,
                vm: v,
                since_ms: s,
                attempts: n,
            },
            Detaching {
                lease: b,
                alias: y,
                vm: w,
                since_ms: t,
                attempts: m,
            },
        ) => a == b && x == y && v == w && s == t && n.checked_add(1) == Some(*m),
        (
            Detaching {
                lease: a,
                alias: x,
                vm: v,
                ..
            },
            Attached {
                lease: b,
                alias: y,
                vm: w,
                ..
            },
        ) => a == b && x == y && v == w,
        (Detaching { lease: a, .. }, Releasing { lease: b }) => a == b,
        (Reserved { lease: a } | Configured { lease: a }, Releasing { lease: b }) => a == b,
        (Reserved { lease } | Releasing { lease }, Free) => !lease.from_kubelet,
        (Reserved { lease } | Releasing { lease }, KubeletAllocated { pod }) => {
            lease.from_kubelet
                && pod
                    .as_deref()
                    .is_some_and(|p| Some(p) == kubelet_key(&lease.owner.pod).as_deref())
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(illegal(
            pci,
            format!(
                "{} -> {} is not allowed with these fields",
                from.kind(),
                to.kind()
            ),
        ))
    }
}

impl Ledger {
    /// An empty ledger (no VFs, no tokens issued).
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a ledger by applying records in order to `base` (an empty ledger, or a
    /// snapshot). Fails on the first record that does not apply.
    pub fn replay<'a>(
        base: Ledger,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<Ledger, (usize, LedgerError)> {
        let mut l = base;
        for (i, r) in records.into_iter().enumerate() {
            l.apply(r).map_err(|e| (i, e))?;
        }
        Ok(l)
    }

    /// The state of a VF.
    pub fn get(&self, pci: &PciAddress) -> Option<&VfState> {
        self.vfs.get(pci)
    }

    /// All VFs in PCI order.
    pub fn iter(&self) -> impl Iterator<Item = (&PciAddress, &VfState)> {
        self.vfs.iter()
    }

    /// Number of VFs tracked.
    pub fn len(&self) -> usize {
        self.vfs.len()
    }

    /// Whether no VF is tracked.
    pub fn is_empty(&self) -> bool {
        self.vfs.is_empty()
    }

    /// The highest token ever issued (persisted).
    pub fn last_token(&self) -> Token {
        self.last_token
    }

    /// The owner of a VF (looking through `Missing`).
    pub fn owner_of(&self, pci: &PciAddress) -> Option<&Owner> {
        self.vfs.get(pci).and_then(VfState::owner)
    }

    /// The VF an owner holds (at most one), looking through `Missing`.
    pub fn find_by_owner(&self, owner: &Owner) -> Option<(PciAddress, &VfState)> {
        let pci = self.by_owner.get(owner)?;
        self.vfs.get(pci).map(|s| (*pci, s))
    }

    /// The VF held by the CNI attachment (container ID, interface), whatever the pod UID (a CNI
    /// DEL may not be told the pod UID). Looks through `Missing`, not at `Quarantined`.
    pub fn find_by_attachment(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Option<(PciAddress, &VfState)> {
        self.by_owner
            .iter()
            .find(|(o, _)| o.container_id == container_id && o.ifname == ifname)
            .and_then(|(_, pci)| self.vfs.get(pci).map(|s| (*pci, s)))
    }

    /// All VFs held by a pod (any container, any interface).
    pub fn find_by_pod<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> impl Iterator<Item = (PciAddress, &'a VfState)> + 'a {
        self.vfs
            .iter()
            .filter(move |(_, s)| s.owner().is_some_and(|o| o.pod.same_pod(pod)))
            .map(|(p, s)| (*p, s))
    }

    /// How many VFs are in each state.
    pub fn counts_by_state(&self) -> BTreeMap<StateKind, usize> {
        let mut m = BTreeMap::new();
        for s in self.vfs.values() {
            *m.entry(s.kind()).or_insert(0) += 1;
        }
        m
    }

    fn state(&self, pci: PciAddress) -> Result<&VfState, LedgerError> {
        self.vfs.get(&pci).ok_or(LedgerError::UnknownVf { pci })
    }

    fn set(pci: PciAddress, from: &VfState, to: VfState) -> Record {
        Record::Set {
            pci,
            from: from.clone(),
            to,
        }
    }

    /// Take a Free VF for `owner` (a new lease with a new token). Also claims a VF that kubelet
    /// allocated to the owner's pod (or to a pod not yet known); its release then returns it to
    /// kubelet's accounting.
    pub fn plan_reserve(&self, pci: PciAddress, owner: &Owner) -> Result<Record, LedgerError> {
        let from = self.state(pci)?;
        if let Some((held, _)) = self.find_by_owner(owner) {
            return Err(LedgerError::OwnerBusy {
                owner: Box::new(owner.clone()),
                pci: held,
            });
        }
        let from_kubelet = match from {
            VfState::Free => false,
            VfState::KubeletAllocated { pod }
                if pod.as_ref().is_none_or(|p| owner.pod.is_key(p)) =>
            {
                true
            }
            s => {
                return Err(LedgerError::NotFree {
                    pci,
                    state: s.kind(),
                });
            }
        };
        let token = self
            .last_token
            .checked_add(1)
            .ok_or_else(|| illegal(pci, "token space exhausted"))?;
        let lease = Lease {
            owner: owner.clone(),
            token,
            saved: None,
            from_kubelet,
            cni: None,
        };
        Ok(Self::set(pci, from, VfState::Reserved { lease }))
    }

    /// Kubelet allocated the VF (Allocate), or PodResources told us which pod has it.
    pub fn plan_kubelet_allocate(
        &self,
        pci: PciAddress,
        pod: Option<&str>,
    ) -> Result<Record, LedgerError> {
        let from = self.state(pci)?;
        let pod = pod.map(str::to_owned);
        match from {
            VfState::Free => {}
            VfState::KubeletAllocated { pod: p } if *p == pod => {
                return Err(LedgerError::NoChange {
                    pci,
                    state: from.kind(),
                });
            }
            // Kubelet only hands out devices it considers free, and never tells a plugin that a
            // pod ended: a new allocation means the previous pod is gone.
            VfState::KubeletAllocated { .. } => {}
            s => {
                return Err(LedgerError::NotFree {
                    pci,
                    state: s.kind(),
                });
            }
        }
        Ok(Self::set(pci, from, VfState::KubeletAllocated { pod }))
    }

    /// Kubelet's pod is gone (learned from PodResources): the VF returns to Free.
    pub fn plan_kubelet_release(&self, pci: PciAddress) -> Result<Record, LedgerError> {
        let from = self.state(pci)?;
        match from {
            VfState::KubeletAllocated { .. } => Ok(Self::set(pci, from, VfState::Free)),
            VfState::Missing { was } if matches!(**was, VfState::KubeletAllocated { .. }) => {
                Ok(Record::Remove {
                    pci,
                    was: from.clone(),
                })
            }
            s => Err(LedgerError::InvalidTransition {
                pci,
                from: s.kind(),
                action: "kubelet release",
            }),
        }
    }

    fn fenced_lease(
        &self,
        pci: PciAddress,
        token: Token,
    ) -> Result<(&VfState, &Lease), LedgerError> {
        let from = self.state(pci)?;
        match from.effective_lease() {
            Some(l) if l.token == token => Ok((from, l)),
            other => Err(LedgerError::Fenced {
                pci,
                presented: token,
                current: other.map(|l| l.token),
            }),
        }
    }

    /// One step along the attach/detach chain, fenced by `token`.
    pub fn plan_advance(
        &self,
        pci: PciAddress,
        token: Token,
        step: Step,
    ) -> Result<Record, LedgerError> {
        use VfState::*;
        let (from, lease) = self.fenced_lease(pci, token)?;
        let lease = lease.clone();
        let invalid = || LedgerError::InvalidTransition {
            pci,
            from: from.kind(),
            action: step.name(),
        };
        let to = match (from, &step) {
            (Reserved { .. }, Step::Configure { saved, cni }) => Configured {
                lease: Lease {
                    saved: Some(saved.clone()),
                    cni: cni.clone(),
                    ..lease
                },
            },
            (Configured { .. }, Step::Attach { alias, vm }) => Attaching {
                lease,
                alias: alias.clone(),
                vm: vm.clone(),
            },
            (Attaching { alias, vm, .. }, Step::Attached) => Attached {
                lease,
                alias: alias.clone(),
                vm: vm.clone(),
                reason: None,
            },
            (Attaching { .. }, Step::AttachFailed) => Configured { lease },
            (
                Attaching { alias, vm, .. } | Attached { alias, vm, .. },
                Step::Detach { since_ms },
            ) => Detaching {
                lease,
                alias: alias.clone(),
                vm: vm.clone(),
                since_ms: *since_ms,
                attempts: 1,
            },
            (
                Detaching {
                    alias,
                    vm,
                    since_ms,
                    attempts,
                    ..
                },
                Step::DetachRetry,
            ) => Detaching {
                lease,
                alias: alias.clone(),
                vm: vm.clone(),
                since_ms: *since_ms,
                attempts: attempts.checked_add(1).ok_or_else(invalid)?,
            },
            (Detaching { alias, vm, .. }, Step::UnplugFailed { reason }) => Attached {
                lease,
                alias: alias.clone(),
                vm: vm.clone(),
                reason: Some(reason.clone()),
            },
            (Detaching { .. }, Step::Detached) => Releasing { lease },
            (Reserved { .. } | Configured { .. }, Step::BeginRelease) => Releasing { lease },
            _ => return Err(invalid()),
        };
        check_transition(pci, from, &to)?;
        Ok(Self::set(pci, from, to))
    }

    /// Rewrites the attachment record of a Configured VF (e.g. to note knobs the driver
    /// skipped), fenced by `token`. Owner, token and saved settings stay as they are.
    pub fn plan_amend_cni(
        &self,
        pci: PciAddress,
        token: Token,
        cni: CniAttachment,
    ) -> Result<Record, LedgerError> {
        let (from, lease) = self.fenced_lease(pci, token)?;
        let VfState::Configured { .. } = from else {
            return Err(LedgerError::InvalidTransition {
                pci,
                from: from.kind(),
                action: "amend the attachment record",
            });
        };
        if lease.cni.as_deref() == Some(&cni) {
            return Err(LedgerError::NoChange {
                pci,
                state: from.kind(),
            });
        }
        let to = VfState::Configured {
            lease: Lease {
                cni: Some(Box::new(cni)),
                ..lease.clone()
            },
        };
        check_transition(pci, from, &to)?;
        Ok(Self::set(pci, from, to))
    }

    /// End a lease, fenced by `token`: from Releasing (restore done) or Reserved (nothing was
    /// done yet) back to Free (or to kubelet's accounting for a claimed kubelet VF). A VF that
    /// vanished while owned leaves the ledger.
    pub fn plan_release(&self, pci: PciAddress, token: Token) -> Result<Record, LedgerError> {
        let (from, lease) = self.fenced_lease(pci, token)?;
        let to = if lease.from_kubelet {
            VfState::KubeletAllocated {
                pod: kubelet_key(&lease.owner.pod),
            }
        } else {
            VfState::Free
        };
        match from {
            VfState::Missing { .. } => Ok(Record::Remove {
                pci,
                was: from.clone(),
            }),
            VfState::Reserved { .. } | VfState::Releasing { .. } => Ok(Self::set(pci, from, to)),
            s => Err(LedgerError::InvalidTransition {
                pci,
                from: s.kind(),
                action: "release",
            }),
        }
    }

    /// Take a VF out of service. Unfenced: used by the executor when a restore fails and by
    /// operators. Not for Missing or already Quarantined VFs.
    pub fn plan_quarantine(&self, pci: PciAddress, reason: &str) -> Result<Record, LedgerError> {
        let from = self.state(pci)?;
        match from {
            VfState::Quarantined { .. } => Err(LedgerError::NoChange {
                pci,
                state: from.kind(),
            }),
            VfState::Missing { .. } => Err(LedgerError::InvalidTransition {
                pci,
                from: from.kind(),
                action: "quarantine",
            }),
            s => Ok(Self::set(
                pci,
                s,
                VfState::Quarantined {
                    reason: reason.to_owned(),
                    previous_owner: s.owner().cloned(),
                },
            )),
        }
    }

    /// Return a Quarantined VF to Free (operator action). A quarantined VF that vanished leaves
    /// the ledger.
    pub fn plan_unquarantine(&self, pci: PciAddress) -> Result<Record, LedgerError> {
        let from = self.state(pci)?;
        match from {
            VfState::Quarantined { .. } => Ok(Self::set(pci, from, VfState::Free)),
            VfState::Missing { was } if matches!(**was, VfState::Quarantined { .. }) => {
                Ok(Record::Remove {
                    pci,
                    was: from.clone(),
                })
            }
            s => Err(LedgerError::InvalidTransition {
                pci,
                from: s.kind(),
                action: "unquarantine",
            }),
        }
    }

    /// Reconcile with the VFs present on the host: new VFs enter Free, Free VFs that vanished
    /// leave, other VFs that vanished become Missing (keeping owner and token), Missing VFs that
    /// reappear get their state back. Records are in PCI order, independent of each other.
    pub fn plan_inventory(&self, present: &BTreeSet<PciAddress>) -> Vec<Record> {
        let mut out = Vec::new();
        for (pci, s) in &self.vfs {
            if present.contains(pci) {
                if let VfState::Missing { was } = s {
                    out.push(Self::set(*pci, s, (**was).clone()));
                }
            } else {
                match s {
                    VfState::Free => out.push(Record::Remove {
                        pci: *pci,
                        was: VfState::Free,
                    }),
                    VfState::Missing { .. } => {}
                    s => out.push(Self::set(
                        *pci,
                        s,
                        VfState::Missing {
                            was: Box::new(s.clone()),
                        },
                    )),
                }
            }
        }
        for pci in present {
            if !self.vfs.contains_key(pci) {
                out.push(Record::Add { pci: *pci });
            }
        }
        out.sort_by_key(Record::pci);
        out
    }

    /// [`Ledger::plan_inventory`] for the VFs of an inventory.
    pub fn plan_inventory_from(&self, inventory: &Inventory) -> Vec<Record> {
        self.plan_inventory(&inventory.vfs.keys().copied().collect())
    }

    /// Apply a persisted record. Re-validates it: the VF must be in the record's expected prior
    /// state, the transition must be legal, a new lease's token must exceed every earlier token,
    /// and no owner may end up holding two VFs. On error nothing changes.
    pub fn apply(&mut self, record: &Record) -> Result<(), LedgerError> {
        let pci = record.pci();
        let found = self.vfs.get(&pci);
        let stale = |expected: Option<&VfState>| LedgerError::Stale {
            pci,
            expected: expected.map(VfState::kind),
            found: found.map(VfState::kind),
        };
        match record {
            Record::Add { .. } => {
                if found.is_some() {
                    return Err(stale(None));
                }
                self.vfs.insert(pci, VfState::Free);
            }
            Record::Remove { was, .. } => {
                if found != Some(was) {
                    return Err(stale(Some(was)));
                }
                if !matches!(was, VfState::Free | VfState::Missing { .. }) {
                    return Err(illegal(pci, format!("cannot remove a {} VF", was.kind())));
                }
                if let Some(o) = was.owner() {
                    self.by_owner.remove(o);
                }
                self.vfs.remove(&pci);
            }
            Record::Set { from, to, .. } => {
                if found != Some(from) {
                    return Err(stale(Some(from)));
                }
                check_transition(pci, from, to)?;
                let new_token = record.new_token();
                if let Some(t) = new_token
                    && t <= self.last_token
                {
                    return Err(illegal(
                        pci,
                        format!(
                            "token {t} does not exceed the last issued token {}",
                            self.last_token
                        ),
                    ));
                }
                if let Some(owner) = to.owner()
                    && let Some((held, _)) = self.find_by_owner(owner)
                    && held != pci
                {
                    return Err(LedgerError::OwnerBusy {
                        owner: Box::new(owner.clone()),
                        pci: held,
                    });
                }
                if let Some(t) = new_token {
                    self.last_token = t;
                }
                if let Some(o) = from.owner() {
                    self.by_owner.remove(o);
                }
                if let Some(o) = to.owner() {
                    self.by_owner.insert(o.clone(), pci);
                }
                self.vfs.insert(pci, to.clone());
            }
        }
        Ok(())
    }

    /// Plan and apply in one go, for callers without a durable log (tests, dry runs).
    pub fn apply_now(
        &mut self,
        planned: Result<Record, LedgerError>,
    ) -> Result<Record, LedgerError> {
        let r = planned?;
        self.apply(&r)?;
        Ok(r)
    }

    /// Checks the invariants a well-formed ledger keeps: at most one VF per owner, lease tokens
    /// unique and not above the last issued token, no `Missing` inside `Missing`.
    pub fn check_invariants(&self) -> Result<(), LedgerError> {
        let mut owners = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        for (pci, s) in &self.vfs {
            if let VfState::Missing { was } = s
                && matches!(**was, VfState::Missing { .. })
            {
                return Err(LedgerError::Snapshot(format!(
                    "{pci}: missing inside missing"
                )));
            }
            if let Some(l) = s.effective_lease() {
                if !owners.insert(&l.owner) {
                    return Err(LedgerError::Snapshot(format!(
                        "{pci}: {} holds two VFs",
                        l.owner
                    )));
                }
                if !tokens.insert(l.token) {
                    return Err(LedgerError::Snapshot(format!(
                        "{pci}: token {} used twice",
                        l.token
                    )));
                }
                if l.token > self.last_token {
                    return Err(LedgerError::Snapshot(format!(
                        "{pci}: token {} above last issued {}",
                        l.token, self.last_token
                    )));
                }
            }
        }
        let derived: BTreeMap<&Owner, &PciAddress> = self
            .vfs
            .iter()
            .filter_map(|(p, s)| s.owner().map(|o| (o, p)))
            .collect();
        if derived.len() != self.by_owner.len()
            || derived
                .iter()
                .any(|(o, p)| self.by_owner.get(*o) != Some(*p))
        {
            return Err(LedgerError::Snapshot(
                "owner index out of step with the states".into(),
            ));
        }
        Ok(())
    }
}
