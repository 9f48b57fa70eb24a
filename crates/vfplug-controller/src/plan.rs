//! The controller's decisions, free of I/O: from what the API server and the ledger say of one VM
//! (its pod, its Domain, the node's view of the pod's VFs) to what to do ([`plan`]), the
//! Domain's status ([`status`]) and the Events a status change is worth ([`events`]).
//!
//! The rules (docs/domain.md):
//! - A pod on this node is a VM pod when it has the `vfplug.io/qmp-socket` annotation or the
//!   ledger holds VM records for it; each VM pod gets a Domain of its name, owned by it.
//! - The Domain's spec nets are *managed*: attached by the controller under the attachment
//!   `(domain-<pod uid>, <net name>)`, detached when removed from the spec. Nets the pod got
//!   through CNI (Multus) are shown in the status, never detached by the controller; a spec net
//!   with the name of one is refused.
//! - A pod that is gone (deleted, or replaced by one of the same name), or that ran to its end,
//!   or a VM pod being deleted, has every VF the node holds for it released; the Domain's
//!   finalizer goes only once the node holds none, and then the Domain is deleted (it is the
//!   pod's; without the pod it means nothing). A container pod being deleted keeps its VFs until
//!   the runtime's CNI DEL ([`PodFacts::done`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use vfplug_core::records::VmRecords;
use vfplug_crd::{DomainSpec, DomainStatus, NetSpec, Phase};

/// The finalizer the controller holds on every Domain until the VM's VFs are back in their
/// pools.
pub const FINALIZER: &str = "vfplug.io/release";

/// The label with the node's name on every Domain (the controller watches only its own).
pub const NODE_LABEL: &str = "vfplug.io/node";

/// The container ID of the controller's attachments for the pod `uid` (the ledger keys an
/// attachment by container ID and interface name; a CNI runtime's sandbox IDs never look like
/// this).
pub fn domain_container_id(pod_uid: &str) -> String {
    format!("vfplug-domain-{pod_uid}")
}

/// The pod, as the pod watch saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// Its UID.
    pub uid: String,
    /// The `vfplug.io/qmp-socket` annotation.
    pub qmp_socket: Option<String>,
    /// Being deleted (`deletionTimestamp` set): its containers are stopping.
    pub deleting: bool,
    /// Phase Succeeded or Failed: its containers have ended.
    pub ended: bool,
}

impl PodFacts {
    /// Whether the pod is done with its VFs, for a VM pod (`vm`) or a container pod. Nothing is
    /// attached to a done pod any more, and what it holds is released.
    ///
    /// A VM pod being deleted is done: its QEMU is stopping, and the guest can still
    /// acknowledge an unplug while it does. A container pod being deleted is not: its processes
    /// use their netdevs through the grace period, and the runtime's CNI DEL, when the sandbox
    /// stops, is what releases them (the gone-pod sweep, should that DEL never come).
    pub fn done(&self, vm: bool) -> bool {
        self.ended || (self.deleting && vm)
    }
}

/// The Domain, as the Domain watch saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DomainFacts {
    /// The UID of the pod that owns it (its owner reference).
    pub pod_uid: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// What the user wants.
    pub spec: DomainSpec,
    /// The status as last written.
    pub status: Option<DomainStatus>,
    /// Whether it carries [`FINALIZER`].
    pub has_finalizer: bool,
    /// Whether it is being deleted.
    pub deleting: bool,
}

/// What the node holds for one pod UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// The pod's VM records (nets and hostdevs), if it has a VF in or on its way to a guest.
    pub records: Option<VmRecords>,
    /// The controller's own attachments of the pod: interface name → network.
    pub managed: BTreeMap<String, String>,
    /// Interface names of the pod's other (CNI) attachments.
    pub cni: BTreeSet<String>,
}

impl NodeView {
    /// Whether the node holds anything for the pod.
    pub fn holds_any(&self) -> bool {
        self.records.is_some() || !self.managed.is_empty() || !self.cni.is_empty()
    }
}

/// Everything the controller knows of one VM (by namespace and name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// The pod of that name on this node, if the (synced) pod watch has one.
    pub pod: Option<PodFacts>,
    /// The Domain of that name, if any.
    pub domain: Option<DomainFacts>,
    /// The node's view of the live pod's UID.
    pub live: NodeView,
    /// The node's view of the UID the Domain names, when that pod is gone.
    pub gone: NodeView,
}

/// What to do for one VM. Steps are in order; [`Plan::default`] does nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Create the Domain (owned by the pod, labelled with the node, finalizer set).
    pub create_domain: bool,
    /// Put [`FINALIZER`] back on the Domain.
    pub add_finalizer: bool,
    /// Release every VF the node holds for this (gone or done) pod UID.
    pub release: Option<String>,
    /// The node holds nothing more for the gone pod: remove the finalizer and delete the Domain.
    pub finish: bool,
    /// Spec nets to attach.
    pub attach: Vec<NetSpec>,
    /// Managed nets (by interface name) to detach.
    pub detach: Vec<String>,
    /// Spec nets refused, with why (shown in the status).
    pub refused: Vec<(String, String)>,
    /// Write the status (a live pod's Domain).
    pub write_status: bool,
}

/// What to do for one VM. See the module docs for the rules.
pub fn plan(f: &Facts) -> Plan {
    let mut p = Plan::default();
    let is_vm_pod = |pod: &PodFacts| pod.qmp_socket.is_some() || f.live.records.is_some();
    match (&f.pod, &f.domain) {
        (None, None) => {}
        (Some(pod), None) => {
            if pod.done(is_vm_pod(pod)) {
                if f.live.holds_any() {
                    p.release = Some(pod.uid.clone());
                }
            } else {
                p.create_domain = is_vm_pod(pod);
            }
        }
        (pod, Some(d)) => {
            let owner_alive = matches!((pod, &d.pod_uid), (Some(pod), Some(uid)) if *uid == pod.uid)
                // A Domain made by hand names no owner: it belongs to the pod of its name.
                || (pod.is_some() && d.pod_uid.is_none());
            // A Domain is a VM pod's.
            let pod_done = pod.as_ref().is_some_and(|p| p.done(true));
            if !owner_alive || pod_done {
                // The pod it stood for is gone (or done): release, then let the Domain go.
                let (uid, view) = match (owner_alive, &d.pod_uid) {
                    (true, _) => (pod.as_ref().map(|p| p.uid.clone()), &f.live),
                    (false, uid) => (uid.clone(), &f.gone),
                };
                if view.holds_any() {
                    p.release = uid;
                } else if d.has_finalizer || !d.deleting {
                    p.finish = true;
                }
                return p;
            }
            if d.deleting {
                // The user deleted the Domain of a running VM: its managed nets go; the CNI nets
                // stay with the pod. A new Domain is made once this one is gone.
                p.detach = f.live.managed.keys().cloned().collect();
                p.finish = p.detach.is_empty() && d.has_finalizer;
                return p;
            }
            p.add_finalizer = !d.has_finalizer;
            let wanted: BTreeMap<&str, &NetSpec> =
                d.spec.nets.iter().map(|n| (n.name.as_str(), n)).collect();
            for n in &d.spec.nets {
                if let Some(why) = refusal(n, &f.live, &d.spec) {
                    p.refused.push((n.name.clone(), why));
                } else if !f.live.managed.contains_key(&n.name) {
                    p.attach.push(n.clone());
                }
            }
            p.detach = f
                .live
                .managed
                .keys()
                .filter(|name| !wanted.contains_key(name.as_str()))
                .cloned()
                .collect();
            p.write_status = true;
        }
    }
    p
}

/// Why a spec net cannot be attached, if it cannot.
fn refusal(n: &NetSpec, live: &NodeView, spec: &DomainSpec) -> Option<String> {
    // What the kernel takes as an interface name (dev_valid_name): 1 to 15 bytes, no '/', ':'
    // or whitespace of any kind, not "." or "..".
    if n.name.is_empty()
        || n.name.len() > 15
        || n.name == "."
        || n.name == ".."
        || n.name
            .contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        return Some(format!(
            "name {:?}: an interface name of 1 to 15 characters without '/', ':' or whitespace, \
             not \".\" or \"..\"",
            n.name
        ));
    }
    // A net is a NetworkAttachmentDefinition or an inline config (nad::resolve), never both.
    if n.network.trim().is_empty() == n.config.is_none() {
        return Some(format!(
            "{}: give exactly one of network (a NetworkAttachmentDefinition) and config (inline)",
            n.name
        ));
    }
    if spec.nets.iter().filter(|m| m.name == n.name).count() > 1 {
        return Some(format!("{}: the name is given more than once", n.name));
    }
    if live.cni.contains(&n.name) {
        return Some(format!(
            "{}: the pod already has a CNI network with this interface name",
            n.name
        ));
    }
    None
}

/// An attach or detach of a spec net that did not succeed this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetError {
    /// The net.
    pub name: String,
    /// `Attach` or `Detach` failed, `Refused` by the rules, or `Pending` (the guest has not
    /// let go yet, QEMU not answering: a later round finishes it).
    pub reason: &'static str,
    /// Why.
    pub message: String,
}

/// The Domain's status: the node's records, and two conditions. `Ready`: every spec net is in
/// the guest and nothing is on its way in or out. `Synced`: the last round did all it had to
/// (or why not). Conditions keep their transition time while their status stays.
pub fn status(d: &DomainFacts, view: &NodeView, errors: &[NetError], now: &Time) -> DomainStatus {
    let mut s = DomainStatus::from_records(view.records.as_ref());
    let attached: BTreeSet<&str> = s
        .hostdevs
        .iter()
        .filter(|h| h.phase == Phase::Attached)
        .map(|h| h.parent_net.as_str())
        .collect();
    let missing: Vec<&str> = d
        .spec
        .nets
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| !attached.contains(n))
        .collect();
    let unsettled = s.phase.is_some_and(|p| p != Phase::Attached);
    let ready = if let Some(e) = errors.first() {
        ("False", e.reason.to_owned(), e.message.clone())
    } else if !missing.is_empty() {
        (
            "False",
            "Attaching".to_owned(),
            format!("not in the guest yet: {}", missing.join(", ")),
        )
    } else if unsettled {
        (
            "False",
            "Settling".to_owned(),
            format!("a VF is {}", s.phase.map(phase_name).unwrap_or("settling")),
        )
    } else {
        (
            "True",
            "InGuest".to_owned(),
            format!("{} VF(s) in the guest", s.hostdev_count),
        )
    };
    let synced = if errors.is_empty() {
        (
            "True",
            "Synced".to_owned(),
            "the spec is applied".to_owned(),
        )
    } else {
        (
            "False",
            errors[0].reason.to_owned(),
            errors
                .iter()
                .map(|e| format!("{}: {}", e.name, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    let prev = d
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    s.conditions = vec![
        condition(prev, "Ready", ready, d.generation, now),
        condition(prev, "Synced", synced, d.generation, now),
    ];
    s.observed_generation = d.generation;
    s
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::Attaching => "attaching",
        Phase::Attached => "attached",
        Phase::UnplugPending => "waiting for the guest to let go",
        Phase::GuestError => "refused by the guest for unplug",
        Phase::Releasing => "being released",
    }
}

fn condition(
    prev: &[Condition],
    kind: &str,
    (status, reason, message): (&str, String, String),
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let since = prev
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// One Kubernetes Event a status change is worth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (else Normal).
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For a person.
    pub message: String,
}

/// The Events between the last written status and the new one: a hostdev in the guest, out of
/// it, refused by the guest, a net released; and the errors of this round.
pub fn events(prev: Option<&DomainStatus>, next: &DomainStatus, errors: &[NetError]) -> Vec<Note> {
    let empty = DomainStatus::default();
    let prev = prev.unwrap_or(&empty);
    let mut out = Vec::new();
    let before: BTreeMap<&str, Phase> = prev
        .hostdevs
        .iter()
        .map(|h| (h.pci_address.as_str(), h.phase))
        .collect();
    for h in &next.hostdevs {
        let was = before.get(h.pci_address.as_str()).copied();
        match (was, h.phase) {
            (w, Phase::Attached) if w != Some(Phase::Attached) && w != Some(Phase::GuestError) => {
                out.push(Note {
                    warning: false,
                    reason: "Attached",
                    message: format!(
                        "VF {} in the guest as {} (net {})",
                        h.pci_address,
                        h.alias.as_deref().unwrap_or("?"),
                        h.parent_net
                    ),
                })
            }
            (w, Phase::GuestError) if w != Some(Phase::GuestError) => out.push(Note {
                warning: true,
                reason: "GuestRefusedUnplug",
                message: format!(
                    "the guest refused to let go of VF {} (net {}): {}",
                    h.pci_address,
                    h.parent_net,
                    h.reason.as_deref().unwrap_or("no reason given")
                ),
            }),
            (w, Phase::UnplugPending) if w != Some(Phase::UnplugPending) => out.push(Note {
                warning: false,
                reason: "Detaching",
                message: format!(
                    "unplug of VF {} (net {}) asked of the guest",
                    h.pci_address, h.parent_net
                ),
            }),
            _ => {}
        }
    }
    let now_nets: BTreeSet<&str> = next
        .nets
        .iter()
        .map(|n| n.actual.pci_address.as_str())
        .collect();
    for n in &prev.nets {
        if !now_nets.contains(n.actual.pci_address.as_str()) {
            out.push(Note {
                warning: false,
                reason: "Released",
                message: format!(
                    "net {} released: VF {} is back in its pool",
                    n.name, n.actual.pci_address
                ),
            });
        }
    }
    // An error already reported (the same Synced message) is not reported again each retry.
    let synced = |s: &DomainStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Synced")
            .map(|c| c.message.clone())
    };
    let repeated = synced(prev) == synced(next);
    for e in errors.iter().filter(|_| !repeated) {
        if e.reason != "Pending" {
            out.push(Note {
                warning: true,
                reason: if e.reason == "Detach" {
                    "DetachFailed"
                } else if e.reason == "Refused" {
                    "NetRefused"
                } else {
                    "AttachFailed"
                },
                message: format!("{}: {}", e.name, e.message),
            });
        }
    }
    out
}
