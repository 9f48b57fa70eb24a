//! The controller's decisions, table by table: what [`plan::plan`] does for each shape of the
//! facts (pod, Domain, what the node holds), the status [`plan::status`] writes, and the Events
//! [`plan::events`] records between two statuses. Pure: no client, no node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{UID, Vf, records, view};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use vfplug_controller::plan::{
    self, DomainFacts, Facts, NetError, NodeView, Plan, PodFacts, domain_container_id,
};
use vfplug_core::Phase;
use vfplug_crd::{DomainSpec, DomainStatus, NetSpec};

const OLD: &str = "uid-0";
const PCI_A: &str = "0000:3b:02.0";
const PCI_B: &str = "0000:3b:02.1";

fn vm_pod(uid: &str) -> Option<PodFacts> {
    Some(PodFacts {
        uid: uid.into(),
        qmp_socket: Some(common::QMP.into()),
        deleting: false,
        ended: false,
    })
}

fn plain_pod(uid: &str) -> Option<PodFacts> {
    Some(PodFacts {
        uid: uid.into(),
        qmp_socket: None,
        deleting: false,
        ended: false,
    })
}

/// Ran to its end (phase Succeeded or Failed).
fn finished(p: Option<PodFacts>) -> Option<PodFacts> {
    p.map(|p| PodFacts { ended: true, ..p })
}

/// Being deleted, still running.
fn being_deleted(p: Option<PodFacts>) -> Option<PodFacts> {
    p.map(|p| PodFacts {
        deleting: true,
        ..p
    })
}

fn net(name: &str) -> NetSpec {
    NetSpec {
        name: name.into(),
        network: format!("sriov-{name}"),
        config: None,
    }
}

/// The Domain of the pod `uid` (finalizer set, generation 1) wanting `nets`.
fn domain(uid: &str, nets: &[NetSpec]) -> DomainFacts {
    DomainFacts {
        pod_uid: Some(uid.into()),
        generation: Some(1),
        spec: DomainSpec {
            nets: nets.to_vec(),
        },
        status: None,
        has_finalizer: true,
        deleting: false,
    }
}

fn deleting(d: DomainFacts) -> DomainFacts {
    DomainFacts {
        deleting: true,
        ..d
    }
}

fn no_finalizer(d: DomainFacts) -> DomainFacts {
    DomainFacts {
        has_finalizer: false,
        ..d
    }
}

fn facts(
    pod: Option<PodFacts>,
    domain: Option<DomainFacts>,
    live: NodeView,
    gone: NodeView,
) -> Facts {
    Facts {
        pod,
        domain,
        live,
        gone,
    }
}

fn empty() -> NodeView {
    NodeView::default()
}

const ATTACHED_A: &[Vf<'static>] = &[("net1", PCI_A, Phase::Attached)];

fn write_status() -> Plan {
    Plan {
        write_status: true,
        ..Plan::default()
    }
}

#[test]
fn plan_decides_for_every_shape_of_pod_domain_and_node() {
    let cases: Vec<(&str, Facts, Plan)> = vec![
        (
            "nothing at all: nothing",
            facts(None, None, empty(), empty()),
            Plan::default(),
        ),
        (
            "a container pod (no qmp-socket, no VM records): nothing",
            facts(plain_pod(UID), None, empty(), empty()),
            Plan::default(),
        ),
        (
            "a container pod with CNI VFs (still not a VM): nothing",
            facts(
                plain_pod(UID),
                None,
                view(UID, &[], &[], &["net1"]),
                empty(),
            ),
            Plan::default(),
        ),
        (
            "a VM pod by its annotation, no Domain: create",
            facts(vm_pod(UID), None, empty(), empty()),
            Plan {
                create_domain: true,
                ..Plan::default()
            },
        ),
        (
            "a VM pod by its records alone (no annotation), no Domain: create",
            facts(
                plain_pod(UID),
                None,
                view(UID, ATTACHED_A, &[], &["net1"]),
                empty(),
            ),
            Plan {
                create_domain: true,
                ..Plan::default()
            },
        ),
        (
            "a finished VM pod holding VFs, no Domain: release them, no Domain",
            facts(
                finished(vm_pod(UID)),
                None,
                view(UID, ATTACHED_A, &[], &["net1"]),
                empty(),
            ),
            Plan {
                release: Some(UID.into()),
                ..Plan::default()
            },
        ),
        (
            "a VM pod being deleted, holding VFs, no Domain: release them (its QEMU is stopping)",
            facts(
                being_deleted(vm_pod(UID)),
                None,
                view(UID, ATTACHED_A, &[], &["net1"]),
                empty(),
            ),
            Plan {
                release: Some(UID.into()),
                ..Plan::default()
            },
        ),
        (
            "a container pod being deleted, holding a CNI VF: nothing (the runtime's CNI DEL \
             releases it once the containers stop)",
            facts(
                being_deleted(plain_pod(UID)),
                None,
                view(UID, &[], &[], &["eth0"]),
                empty(),
            ),
            Plan::default(),
        ),
        (
            "a container pod that ended, holding a CNI VF: release it",
            facts(
                finished(plain_pod(UID)),
                None,
                view(UID, &[], &[], &["eth0"]),
                empty(),
            ),
            Plan {
                release: Some(UID.into()),
                ..Plan::default()
            },
        ),
        (
            "a VM pod being deleted, with its Domain, VFs held: release",
            facts(
                being_deleted(vm_pod(UID)),
                Some(domain(UID, &[net("net2")])),
                view(UID, ATTACHED_A, &["net2"], &["net1"]),
                empty(),
            ),
            Plan {
                release: Some(UID.into()),
                ..Plan::default()
            },
        ),
        (
            "a finished VM pod holding nothing, no Domain: nothing (no Domain for it)",
            facts(finished(vm_pod(UID)), None, empty(), empty()),
            Plan::default(),
        ),
        (
            "a finished VM pod with its Domain, VFs held: release",
            facts(
                finished(vm_pod(UID)),
                Some(domain(UID, &[net("net2")])),
                view(UID, ATTACHED_A, &["net2"], &["net1"]),
                empty(),
            ),
            Plan {
                release: Some(UID.into()),
                ..Plan::default()
            },
        ),
        (
            "a finished VM pod with its Domain, nothing held: finish",
            facts(
                finished(vm_pod(UID)),
                Some(domain(UID, &[net("net2")])),
                empty(),
                empty(),
            ),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "the Domain's pod is gone, the node holds its VFs: release the old UID",
            facts(
                None,
                Some(domain(OLD, &[])),
                empty(),
                view(OLD, ATTACHED_A, &[], &["net1"]),
            ),
            Plan {
                release: Some(OLD.into()),
                ..Plan::default()
            },
        ),
        (
            "the Domain's pod is gone and the Domain being deleted (GC), VFs held: release",
            facts(
                None,
                Some(deleting(domain(OLD, &[]))),
                empty(),
                view(OLD, &[], &["net2"], &[]),
            ),
            Plan {
                release: Some(OLD.into()),
                ..Plan::default()
            },
        ),
        (
            "the Domain's pod is gone, nothing held: finish",
            facts(None, Some(domain(OLD, &[])), empty(), empty()),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "the Domain's pod is gone, being deleted, finalizer still ours: finish",
            facts(None, Some(deleting(domain(OLD, &[]))), empty(), empty()),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "the Domain's pod is gone, being deleted, finalizer already off: nothing (GC's)",
            facts(
                None,
                Some(no_finalizer(deleting(domain(OLD, &[])))),
                empty(),
                empty(),
            ),
            Plan::default(),
        ),
        (
            "a new pod of the same name (another UID), old VFs held: release the OLD UID only",
            facts(
                vm_pod(UID),
                Some(domain(OLD, &[net("net1")])),
                view(UID, ATTACHED_A, &[], &["net1"]),
                view(OLD, &[("net1", PCI_B, Phase::Attached)], &["net1"], &[]),
            ),
            Plan {
                release: Some(OLD.into()),
                ..Plan::default()
            },
        ),
        (
            "a new pod of the same name, old UID holds nothing: finish (a new Domain follows)",
            facts(
                vm_pod(UID),
                Some(domain(OLD, &[net("net1")])),
                view(UID, ATTACHED_A, &[], &["net1"]),
                empty(),
            ),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "a Domain made by hand (no owner) without a pod: finish",
            facts(
                None,
                Some(DomainFacts {
                    pod_uid: None,
                    ..domain(UID, &[])
                }),
                empty(),
                empty(),
            ),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "a Domain made by hand (no owner) of a live pod: it is the pod's",
            facts(
                vm_pod(UID),
                Some(DomainFacts {
                    pod_uid: None,
                    ..domain(UID, &[])
                }),
                empty(),
                empty(),
            ),
            write_status(),
        ),
        (
            "the user deletes the Domain of a live VM: detach the managed nets, not the CNI ones",
            facts(
                vm_pod(UID),
                Some(deleting(domain(UID, &[net("net2"), net("net3")]))),
                view(UID, ATTACHED_A, &["net2", "net3"], &["net1"]),
                empty(),
            ),
            Plan {
                detach: vec!["net2".into(), "net3".into()],
                ..Plan::default()
            },
        ),
        (
            "the user deletes the Domain of a live VM, managed nets gone: finish",
            facts(
                vm_pod(UID),
                Some(deleting(domain(UID, &[net("net2")]))),
                view(UID, ATTACHED_A, &[], &["net1"]),
                empty(),
            ),
            Plan {
                finish: true,
                ..Plan::default()
            },
        ),
        (
            "a live VM's Domain, deleting, finalizer already off: nothing",
            facts(
                vm_pod(UID),
                Some(no_finalizer(deleting(domain(UID, &[])))),
                empty(),
                empty(),
            ),
            Plan::default(),
        ),
        (
            "in step (spec net managed, CNI net shown): the status only",
            facts(
                vm_pod(UID),
                Some(domain(UID, &[net("net2")])),
                view(UID, ATTACHED_A, &["net2"], &["net1"]),
                empty(),
            ),
            write_status(),
        ),
        (
            "a net added to the spec: attach it",
            facts(
                vm_pod(UID),
                Some(domain(UID, &[net("net2"), net("net3")])),
                view(UID, ATTACHED_A, &["net2"], &["net1"]),
                empty(),
            ),
            Plan {
                attach: vec![net("net3")],
                write_status: true,
                ..Plan::default()
            },
        ),
        (
            "an inline config (no network) is a net like any: attach it",
            facts(
                vm_pod(UID),
                Some(domain(
                    UID,
                    &[NetSpec {
                        name: "net2".into(),
                        network: String::new(),
                        config: Some(r#"{"cniVersion":"1.0.0","type":"vfplug"}"#.into()),
                    }],
                )),
                empty(),
                empty(),
            ),
            Plan {
                attach: vec![NetSpec {
                    name: "net2".into(),
                    network: String::new(),
                    config: Some(r#"{"cniVersion":"1.0.0","type":"vfplug"}"#.into()),
                }],
                write_status: true,
                ..Plan::default()
            },
        ),
        (
            "a net removed from the spec: detach it (the CNI net stays)",
            facts(
                vm_pod(UID),
                Some(domain(UID, &[net("net2")])),
                view(UID, ATTACHED_A, &["net2", "net3"], &["net1"]),
                empty(),
            ),
            Plan {
                detach: vec!["net3".into()],
                write_status: true,
                ..Plan::default()
            },
        ),
        (
            "the finalizer is missing: put it back (and carry on)",
            facts(
                vm_pod(UID),
                Some(no_finalizer(domain(UID, &[net("net2")]))),
                view(UID, &[], &[], &[]),
                empty(),
            ),
            Plan {
                add_finalizer: true,
                attach: vec![net("net2")],
                write_status: true,
                ..Plan::default()
            },
        ),
    ];
    for (what, f, want) in cases {
        assert_eq!(plan::plan(&f), want, "{what}");
    }
}

#[test]
fn spec_nets_that_cannot_be_attached_are_refused_by_name_and_never_attached() {
    let live = view(UID, ATTACHED_A, &[], &["net1"]);
    let refused = |nets: Vec<NetSpec>| {
        let p = plan::plan(&facts(
            vm_pod(UID),
            Some(domain(UID, &nets)),
            live.clone(),
            empty(),
        ));
        assert!(
            p.write_status,
            "{nets:?}: the refusal is shown in the status"
        );
        p
    };
    let named = |name: &str| NetSpec {
        name: name.into(),
        ..net("x")
    };

    // The name of the pod's CNI net.
    let p = refused(vec![net("net1"), net("net2")]);
    assert_eq!(p.attach, vec![net("net2")], "the other net still goes in");
    assert_eq!(p.refused.len(), 1);
    assert_eq!(p.refused[0].0, "net1");
    assert!(p.refused[0].1.contains("CNI network"), "{:?}", p.refused);

    // The same name twice: both refused, none attached.
    let p = refused(vec![net("net2"), net("net2")]);
    assert!(p.attach.is_empty());
    assert_eq!(p.refused.len(), 2);
    assert!(
        p.refused
            .iter()
            .all(|(n, why)| n == "net2" && why.contains("more than once"))
    );

    // Names no interface can have.
    for bad in [
        "",
        "a-name-too-long-1",
        "a/b",
        "a b",
        "a:b",
        "a\tb",
        "a\nb",
        ".",
        "..",
    ] {
        let p = refused(vec![named(bad)]);
        assert!(p.attach.is_empty(), "{bad:?} attached");
        assert_eq!(p.refused.len(), 1, "{bad:?}");
        assert!(
            p.refused[0].1.starts_with("name "),
            "{bad:?}: {:?}",
            p.refused
        );
    }
    // 15 characters is the most an interface name has.
    assert_eq!(refused(vec![named("a-name-15-chars")]).refused, vec![]);

    // Neither a network nor a config, or both.
    for (network, config) in [("", None), (" ", None), ("sriov-a", Some("{}"))] {
        let p = refused(vec![NetSpec {
            name: "net2".into(),
            network: network.into(),
            config: config.map(str::to_owned),
        }]);
        assert!(p.attach.is_empty(), "{network:?} {config:?}");
        assert_eq!(p.refused.len(), 1);
        assert!(
            p.refused[0].1.contains("network") && p.refused[0].1.contains("config"),
            "{:?}",
            p.refused
        );
    }
}

#[test]
fn the_domain_container_id_is_unlike_a_runtime_sandbox_id() {
    assert_eq!(domain_container_id("u-1"), "vfplug-domain-u-1");
}

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn cond<'a>(s: &'a DomainStatus, kind: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {s:?}"))
}

fn err(name: &str, reason: &'static str, message: &str) -> NetError {
    NetError {
        name: name.into(),
        reason,
        message: message.into(),
    }
}

#[test]
fn status_is_the_records_with_ready_and_synced_for_the_generation() {
    let d = DomainFacts {
        generation: Some(3),
        ..domain(UID, &[net("net2")])
    };
    let v = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let s = plan::status(&d, &v, &[], &t(100));
    assert_eq!(s.net_count, 2);
    assert_eq!(s.hostdev_count, 2);
    assert_eq!(s.phase, Some(vfplug_crd::Phase::Attached));
    assert_eq!(s.observed_generation, Some(3));
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "InGuest")
    );
    assert_eq!(ready.message, "2 VF(s) in the guest");
    assert_eq!(ready.observed_generation, Some(3));
    assert_eq!(ready.last_transition_time, t(100));
    let synced = cond(&s, "Synced");
    assert_eq!(
        (synced.status.as_str(), synced.reason.as_str()),
        ("True", "Synced")
    );
    assert_eq!(synced.observed_generation, Some(3));

    // Table: (what, records, errors) → Ready (status, reason, message part), Synced status.
    type Case<'a> = (
        &'a str,
        &'a [Vf<'a>],
        Vec<NetError>,
        (&'a str, &'a str, &'a str),
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "a spec net not in the guest yet",
            ATTACHED_A,
            vec![],
            ("False", "Attaching", "not in the guest yet: net2"),
            "True",
        ),
        (
            "a spec net on its way in",
            &[
                ("net1", PCI_A, Phase::Attached),
                ("net2", PCI_B, Phase::Attaching),
            ],
            vec![],
            ("False", "Attaching", "net2"),
            "True",
        ),
        (
            "every spec net in, another VF on its way out",
            &[
                ("net1", PCI_A, Phase::UnplugPending),
                ("net2", PCI_B, Phase::Attached),
            ],
            vec![],
            ("False", "Settling", "waiting for the guest to let go"),
            "True",
        ),
        (
            "an attach that failed",
            ATTACHED_A,
            vec![err("net2", "Attach", "no free VF in pool a")],
            ("False", "Attach", "no free VF in pool a"),
            "False",
        ),
        (
            "a refused net",
            ATTACHED_A,
            vec![err(
                "net2",
                "Refused",
                "net2: the name is given more than once",
            )],
            ("False", "Refused", "more than once"),
            "False",
        ),
    ];
    for (what, vfs, errors, (status, reason, msg), synced) in cases {
        let s = plan::status(&d, &view(UID, vfs, &["net2"], &["net1"]), &errors, &t(100));
        let ready = cond(&s, "Ready");
        assert_eq!(ready.status, status, "{what}: {ready:?}");
        assert_eq!(ready.reason, reason, "{what}: {ready:?}");
        assert!(ready.message.contains(msg), "{what}: {ready:?}");
        assert_eq!(cond(&s, "Synced").status, synced, "{what}");
    }

    // Synced names every net that failed, with why.
    let s = plan::status(
        &d,
        &v,
        &[
            err("net2", "Attach", "no free VF"),
            err("net3", "Detach", "QEMU gone"),
        ],
        &t(100),
    );
    let synced = cond(&s, "Synced");
    assert_eq!(synced.reason, "Attach");
    assert_eq!(synced.message, "net2: no free VF; net3: QEMU gone");

    // No VF at all, no spec net: ready, nothing in the guest.
    let s = plan::status(&domain(UID, &[]), &empty(), &[], &t(100));
    assert_eq!((s.net_count, s.hostdev_count, s.phase), (0, 0, None));
    assert_eq!(cond(&s, "Ready").status, "True");
}

#[test]
fn status_keeps_transition_times_while_conditions_keep_their_status() {
    let v = view(UID, ATTACHED_A, &["net1"], &[]);
    let mut d = domain(UID, &[net("net1")]);
    let first = plan::status(&d, &v, &[], &t(100));

    // Nothing changed, later: the very same status (so nothing is written).
    d.status = Some(first.clone());
    assert_eq!(plan::status(&d, &v, &[], &t(200)), first);

    // The spec changed (generation 2), the node did not: same times, the new generation.
    d.generation = Some(2);
    let s = plan::status(&d, &v, &[], &t(200));
    assert_ne!(s, first, "a new observedGeneration is a change to write");
    assert_eq!(s.observed_generation, Some(2));
    for c in &s.conditions {
        assert_eq!(c.last_transition_time, t(100), "{c:?}");
        assert_eq!(c.observed_generation, Some(2), "{c:?}");
    }

    // Ready flips: its time is now; Synced's stays.
    d.status = Some(s);
    let s = plan::status(
        &d,
        &view(
            UID,
            &[("net1", PCI_A, Phase::UnplugPending)],
            &["net1"],
            &[],
        ),
        &[],
        &t(300),
    );
    assert_eq!(cond(&s, "Ready").status, "False");
    assert_eq!(cond(&s, "Ready").last_transition_time, t(300));
    assert_eq!(cond(&s, "Synced").last_transition_time, t(100));

    // A different reason with the same status is no transition.
    d.status = Some(s);
    let s = plan::status(
        &d,
        &view(
            UID,
            &[("net1", PCI_A, Phase::UnplugPending)],
            &["net1"],
            &[],
        ),
        &[err("net1", "Detach", "QEMU gone")],
        &t(400),
    );
    assert_eq!(cond(&s, "Ready").reason, "Detach");
    assert_eq!(cond(&s, "Ready").last_transition_time, t(300));
    assert_eq!(cond(&s, "Synced").last_transition_time, t(400));
}

/// The status of the pod's VFs `vfs` for a Domain wanting `nets`, after a round with `errors`.
fn st(vfs: &[Vf<'_>], errors: &[NetError]) -> DomainStatus {
    plan::status(
        &domain(UID, &[net("net1")]),
        &view(UID, vfs, &["net1"], &[]),
        errors,
        &t(100),
    )
}

fn reasons(notes: &[plan::Note]) -> Vec<(&'static str, bool)> {
    notes.iter().map(|n| (n.reason, n.warning)).collect()
}

#[test]
fn events_tell_each_change_once() {
    let attaching = st(&[("net1", PCI_A, Phase::Attaching)], &[]);
    let attached = st(ATTACHED_A, &[]);

    // Into the guest: Attached, naming the VF, its alias and net.
    let notes = plan::events(Some(&attaching), &attached, &[]);
    assert_eq!(reasons(&notes), vec![("Attached", false)]);
    assert_eq!(
        notes[0].message,
        format!("VF {PCI_A} in the guest as vfplug-net1 (net net1)")
    );
    // The first status of a VM already in: Attached too.
    assert_eq!(
        reasons(&plan::events(None, &attached, &[])),
        vec![("Attached", false)]
    );
    // Not again while the status stays.
    assert_eq!(plan::events(Some(&attached), &attached, &[]), vec![]);
    // Nothing to say of a VF on its way in.
    assert_eq!(plan::events(None, &attaching, &[]), vec![]);

    // The guest refuses the unplug: a warning with its reason, once.
    let refused = st(&[("net1", PCI_A, Phase::GuestError)], &[]);
    let notes = plan::events(Some(&attached), &refused, &[]);
    assert_eq!(reasons(&notes), vec![("GuestRefusedUnplug", true)]);
    assert!(notes[0].message.contains("the guest said no"), "{notes:?}");
    assert_eq!(plan::events(Some(&refused), &refused, &[]), vec![]);
    // ... and back to plain Attached (the unplug given up) is no new Attached.
    assert_eq!(plan::events(Some(&refused), &attached, &[]), vec![]);

    // Unplug asked of the guest.
    let unplugging = st(&[("net1", PCI_A, Phase::UnplugPending)], &[]);
    assert_eq!(
        reasons(&plan::events(Some(&attached), &unplugging, &[])),
        vec![("Detaching", false)]
    );
    assert_eq!(plan::events(Some(&unplugging), &unplugging, &[]), vec![]);

    // The VF back in its pool: Released (from the net leaving the records).
    let gone = st(&[], &[]);
    let notes = plan::events(Some(&unplugging), &gone, &[]);
    assert_eq!(reasons(&notes), vec![("Released", false)]);
    assert_eq!(
        notes[0].message,
        format!("net net1 released: VF {PCI_A} is back in its pool")
    );
    // Releasing (net without hostdev) is not released yet.
    let releasing = st(&[("net1", PCI_A, Phase::Releasing)], &[]);
    assert_eq!(plan::events(Some(&unplugging), &releasing, &[]), vec![]);
    assert_eq!(
        reasons(&plan::events(Some(&releasing), &gone, &[])),
        vec![("Released", false)]
    );

    // Two VFs in at once: one Event each.
    let two = st(
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &[],
    );
    let notes = plan::events(Some(&gone), &two, &[]);
    assert_eq!(
        reasons(&notes),
        vec![("Attached", false), ("Attached", false)]
    );
    assert_ne!(notes[0].message, notes[1].message);
}

#[test]
fn an_error_is_reported_once_not_on_every_retry() {
    let ok = st(&[], &[]);
    let e = vec![err(
        "net1",
        "Attach",
        "NetworkAttachmentDefinition ns/a: not found",
    )];
    let failing = st(&[], &e);

    // First seen: one warning.
    let notes = plan::events(Some(&ok), &failing, &e);
    assert_eq!(reasons(&notes), vec![("AttachFailed", true)]);
    assert_eq!(
        notes[0].message,
        "net1: NetworkAttachmentDefinition ns/a: not found"
    );
    // First status of a Domain already failing: reported too.
    assert_eq!(
        reasons(&plan::events(None, &failing, &e)),
        vec![("AttachFailed", true)]
    );
    // The retry fails the same way: nothing new to say.
    assert_eq!(plan::events(Some(&failing), &failing, &e), vec![]);
    // It fails differently: said again.
    let e2 = vec![err("net1", "Attach", "no free VF in pool a")];
    assert_eq!(
        reasons(&plan::events(Some(&failing), &st(&[], &e2), &e2)),
        vec![("AttachFailed", true)]
    );

    // Each kind under its own reason; a pending unplug is no failure.
    for (reason, event) in [("Detach", "DetachFailed"), ("Refused", "NetRefused")] {
        let e = vec![err("net1", reason, "why")];
        assert_eq!(
            reasons(&plan::events(Some(&ok), &st(&[], &e), &e)),
            vec![(event, true)],
            "{reason}"
        );
    }
    let e = vec![err("net1", "Pending", "the guest has not let go yet")];
    assert_eq!(plan::events(Some(&ok), &st(&[], &e), &e), vec![]);
}

#[test]
fn records_and_status_agree_on_the_vm() {
    // The fixtures' records are what the ledger would project: one hostdev per net but releasing.
    let r = records(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Releasing),
        ],
    );
    assert_eq!((r.nets.len(), r.hostdevs.len()), (2, 1));
    let s = DomainStatus::from_records(Some(&r));
    assert_eq!(s.phase, Some(vfplug_crd::Phase::Releasing));
}
