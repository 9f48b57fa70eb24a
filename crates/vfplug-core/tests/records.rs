//! Per-VM records projected from the ledger: each phase of a VM's VF, the guest's refusal and
//! its reason, old ledger JSON, the filter, phase changes; then a property test that random
//! ledger histories always give records where every VF of a VM appears exactly once.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vfplug_core::records::{ActualType, Phase, VmFilter, phase_change, vm_records};
use vfplug_core::*;

fn pci(i: u8) -> PciAddress {
    PciAddress::new(0, 0x5e, 1, i).unwrap()
}

fn owner(n: usize, ifname: &str) -> Owner {
    Owner {
        pod: PodRef::new("ns", format!("vm-{n}"), format!("uid-{n}")),
        container_id: format!("sb-{n}"),
        ifname: ifname.into(),
    }
}

fn vm(n: usize) -> VmRef {
    VmRef {
        pod: PodRef::new("ns", format!("vm-{n}"), format!("uid-{n}")),
        qmp_socket: format!("/kubelet/pods/uid-{n}/volumes/kubernetes.io~empty-dir/qmp/qmp.sock"),
        qmp_spec: "qmp/qmp.sock".into(),
    }
}

fn ledger_with(n: u8) -> Ledger {
    let mut l = Ledger::new();
    let present: BTreeSet<_> = (0..n).map(pci).collect();
    for r in l.plan_inventory(&present) {
        l.apply(&r).unwrap();
    }
    l
}

fn attachment(vm: Option<VmRef>, vlan: u16) -> CniAttachment {
    CniAttachment {
        network: "vm-net".into(),
        netns: "/run/netns/x".into(),
        mode: AttachMode::Vfio,
        config: VfConfig {
            mac: Some(MacAddr([2, 0, 0, 0, 0, vlan as u8])),
            vlan: Some(vlan),
            ..Default::default()
        },
        vm,
        ..Default::default()
    }
}

fn go(l: &mut Ledger, plan: impl FnOnce(&Ledger) -> Result<Record, LedgerError>) -> Record {
    l.apply_now(plan(l)).unwrap()
}

fn token(l: &Ledger, p: PciAddress) -> Token {
    l.get(&p).unwrap().effective_lease().unwrap().token
}

/// One VF walked through every phase of its life in a VM: the records show each step, and the
/// hostdev and net always agree.
#[test]
fn each_ledger_step_is_one_phase_of_the_records() {
    let mut l = ledger_with(2);
    let p = pci(0);
    let pool = |a: &PciAddress| (*a == pci(0)).then(|| "vfplug.io/vm".to_owned());
    go(&mut l, |l| l.plan_reserve(p, &owner(1, "net1")));
    assert!(vm_records(&l, pool).is_empty(), "reserved: in no VM yet");
    let t = token(&l, p);
    go(&mut l, |l| {
        l.plan_advance(
            p,
            t,
            Step::Configure {
                saved: SavedVfState::default(),
                cni: Some(Box::new(attachment(Some(vm(1)), 42))),
            },
        )
    });

    let only = |l: &Ledger| {
        let r = vm_records(l, pool);
        assert_eq!(r.len(), 1, "{r:?}");
        r.into_iter().next().unwrap()
    };
    let r = only(&l);
    assert_eq!(r.vm, vm(1));
    assert_eq!(r.nets.len(), 1);
    let net = &r.nets[0];
    assert_eq!(net.name, "net1");
    assert_eq!(net.network, "vm-net");
    assert_eq!(net.pool.as_deref(), Some("vfplug.io/vm"));
    assert_eq!(net.vlan, Some(42));
    assert_eq!(net.mac, Some(MacAddr([2, 0, 0, 0, 0, 42])));
    assert_eq!(net.actual.kind, ActualType::Hostdev);
    assert_eq!(net.actual.pci_address, p);
    assert_eq!(net.phase, Phase::Pending);
    assert_eq!(r.hostdevs.len(), 1);
    assert_eq!(r.hostdevs[0].alias, None, "pending: no alias chosen yet");
    assert_eq!(r.hostdevs[0].parent_net, "net1");
    assert_eq!(r.hostdevs[0].phase, Phase::Pending);

    let phase_now = |l: &Ledger| {
        let r = only(l);
        assert_eq!(r.nets.len(), 1);
        let h = r.hostdevs.first();
        if let Some(h) = h {
            assert_eq!(h.parent_net, r.nets[0].name);
            assert_eq!(h.pci_address, r.nets[0].actual.pci_address);
            assert_eq!(h.phase, r.nets[0].phase);
        }
        (r.nets[0].phase, h.cloned())
    };
    go(&mut l, |l| {
        l.plan_advance(
            p,
            t,
            Step::Attach {
                alias: "vfplug-net1".into(),
                vm: vm(1),
            },
        )
    });
    let (ph, h) = phase_now(&l);
    assert_eq!(ph, Phase::Attaching);
    assert_eq!(h.unwrap().alias.as_deref(), Some("vfplug-net1"));
    go(&mut l, |l| l.plan_advance(p, t, Step::Attached));
    assert_eq!(phase_now(&l).0, Phase::Attached);
    go(&mut l, |l| {
        l.plan_advance(p, t, Step::Detach { since_ms: 5 })
    });
    assert_eq!(phase_now(&l).0, Phase::UnplugPending);
    let refused = go(&mut l, |l| {
        l.plan_advance(
            p,
            t,
            Step::UnplugFailed {
                reason: "the guest refused".into(),
            },
        )
    });
    let (ph, h) = phase_now(&l);
    assert_eq!(ph, Phase::GuestError);
    assert_eq!(h.unwrap().reason.as_deref(), Some("the guest refused"));
    let c = phase_change(&refused).unwrap();
    assert_eq!(
        (c.from, c.to, c.alias.as_deref()),
        (
            Some(Phase::UnplugPending),
            Some(Phase::GuestError),
            Some("vfplug-net1")
        )
    );
    // The next detach clears the reason.
    go(&mut l, |l| {
        l.plan_advance(p, t, Step::Detach { since_ms: 9 })
    });
    let (ph, h) = phase_now(&l);
    assert_eq!((ph, h.unwrap().reason), (Phase::UnplugPending, None));
    let retry = go(&mut l, |l| l.plan_advance(p, t, Step::DetachRetry));
    assert_eq!(phase_change(&retry), None, "a retry is no phase change");
    go(&mut l, |l| l.plan_advance(p, t, Step::Detached));
    let (ph, h) = phase_now(&l);
    assert_eq!(ph, Phase::Releasing);
    assert!(h.is_none(), "releasing: the hostdev is gone, the net stays");
    let freed = go(&mut l, |l| l.plan_release(p, t));
    assert!(vm_records(&l, pool).is_empty());
    let c = phase_change(&freed).unwrap();
    assert_eq!((c.from, c.to), (Some(Phase::Releasing), None));
    assert_eq!(c.vm, vm(1));
}

/// A container pod's VF, a VF configured for no VM and a quarantined VF are in no VM's records;
/// a VM's VF that vanished from the host still is (as what it was).
#[test]
fn only_vm_vfs_show_and_a_missing_one_shows_as_it_was() {
    let mut l = ledger_with(3);
    for (i, vm_of) in [(0u8, None), (1, Some(vm(1))), (2, Some(vm(1)))] {
        let p = pci(i);
        go(&mut l, |l| {
            l.plan_reserve(p, &owner(usize::from(i), &format!("net{i}")))
        });
        let t = token(&l, p);
        go(&mut l, |l| {
            l.plan_advance(
                p,
                t,
                Step::Configure {
                    saved: SavedVfState::default(),
                    cni: Some(Box::new(attachment(vm_of, 7))),
                },
            )
        });
    }
    let t2 = token(&l, pci(2));
    go(&mut l, |l| {
        l.plan_advance(
            pci(2),
            t2,
            Step::Attach {
                alias: "vfplug-net2".into(),
                vm: vm(1),
            },
        )
    });
    go(&mut l, |l| l.plan_advance(pci(2), t2, Step::Attached));
    // pci(2) vanishes from the host.
    let present: BTreeSet<_> = [pci(0), pci(1)].into();
    for r in l.plan_inventory(&present) {
        l.apply(&r).unwrap();
    }
    assert_eq!(l.get(&pci(2)).unwrap().kind(), StateKind::Missing);
    let r = vm_records(&l, |_| None);
    assert_eq!(r.len(), 1, "{r:?}");
    let names: Vec<_> = r[0].nets.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["net1", "net2"]);
    let phases: Vec<_> = r[0].hostdevs.iter().map(|h| h.phase).collect();
    assert_eq!(phases, [Phase::Pending, Phase::Attached]);
    // Quarantining the container pod's VF changes nothing here.
    go(&mut l, |l| l.plan_quarantine(pci(0), "restore failed"));
    assert_eq!(vm_records(&l, |_| None), r);
}

/// Ledgers written before the records existed still read, and project the same way: an
/// `Attached` without `reason`, a `Detaching` whose VM is `null` (its attachment names it), and
/// a pre-typed VM string.
#[test]
fn old_ledger_json_still_reads() {
    let lease = |ifname: &str, token: u64, vm: &str| {
        format!(
            r#"{{"owner":{{"pod":"ns/vm-a","container_id":"sb","ifname":"{ifname}"}},"token":{token},
            "saved":{{"mac":null,"vlan":0,"qos":0,"spoofchk":null,"trust":null,"link_state":null,
            "min_tx_rate":null,"max_tx_rate":null,"driver":"vfio-pci"}},
            "cni":{{"network":"vm-net","netns":"/run/netns/x","mode":"vfio","config":{{"vlan":5}}{vm}}}}}"#
        )
    };
    let cni_vm = r#","vm":{"pod":{"namespace":"ns","name":"vm-a"},"qmp_socket":"/s/qmp.sock"}"#;
    let snapshot = format!(
        r#"{{"version":1,"last_token":3,"vfs":{{
        "0000:5e:01.0":{{"state":"attached","lease":{},"alias":"hostdev-net1","vm":"/s/qmp.sock"}},
        "0000:5e:01.1":{{"state":"detaching","lease":{},"alias":"hostdev-net2","vm":null,
                         "since_ms":1,"attempts":2}},
        "0000:5e:01.2":{{"state":"free"}}}}}}"#,
        lease("net1", 1, ""),
        lease("net2", 2, cni_vm),
    );
    let l: Ledger = serde_json::from_str(&snapshot).unwrap();
    match l.get(&pci(0)).unwrap() {
        VfState::Attached { reason, .. } => assert_eq!(*reason, None),
        s => panic!("{s:?}"),
    }
    let r = vm_records(&l, |_| None);
    assert_eq!(r.len(), 1, "both VFs are of the VM at /s/qmp.sock: {r:?}");
    assert_eq!(r[0].vm.qmp_socket, "/s/qmp.sock");
    // The attachment's VmRef knows the pod; the pre-typed string did not.
    assert_eq!(r[0].vm.pod, PodRef::new("ns", "vm-a", ""));
    let got: Vec<_> = r[0]
        .hostdevs
        .iter()
        .map(|h| (h.parent_net.as_str(), h.phase, h.alias.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("net1", Phase::Attached, Some("hostdev-net1")),
            ("net2", Phase::UnplugPending, Some("hostdev-net2"))
        ]
    );
    assert_eq!(r[0].nets[1].vlan, Some(5));
    // What is written now reads back the same, and a reason survives the trip.
    let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    assert_eq!(back, l);
}

#[test]
fn the_filter_picks_vms_by_uid_or_namespace_and_name() {
    let v = vm(3);
    let f = |uid: &str, ns: &str, name: &str| VmFilter {
        pod_uid: uid.into(),
        namespace: ns.into(),
        name: name.into(),
    };
    assert!(f("", "", "").matches(&v));
    assert!(f("uid-3", "", "").matches(&v));
    assert!(!f("uid-4", "", "").matches(&v));
    assert!(f("", "ns", "").matches(&v));
    assert!(f("", "ns", "vm-3").matches(&v));
    assert!(!f("", "ns", "vm-4").matches(&v));
    assert!(!f("", "other", "").matches(&v));
    let e = f("", "", "vm-3").validate().unwrap_err();
    assert!(e.to_string().contains("needs its namespace"), "{e}");
    assert_eq!(f("", "ns", "vm-3").validate(), Ok(()));
}

// ---- property: random histories --------------------------------------------------------------

const N_VF: u8 = 6;
const N_OWNER: usize = 5;
const N_VM: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Reserve { vf: u8, owner: usize },
    Configure { vf: u8, vm: Option<usize> },
    Attach { vf: u8, vm: usize },
    Step { vf: u8, step: u8 },
    Release { vf: u8 },
    Quarantine { vf: u8 },
    Unquarantine { vf: u8 },
    Inventory { mask: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let vf = 0..N_VF;
    prop_oneof![
        3 => (vf.clone(), 0..N_OWNER).prop_map(|(vf, owner)| Op::Reserve { vf, owner }),
        3 => (vf.clone(), proptest::option::weighted(0.8, 0..N_VM)).prop_map(|(vf, vm)| Op::Configure { vf, vm }),
        3 => (vf.clone(), 0..N_VM).prop_map(|(vf, vm)| Op::Attach { vf, vm }),
        8 => (vf.clone(), 0u8..7).prop_map(|(vf, step)| Op::Step { vf, step }),
        2 => vf.clone().prop_map(|vf| Op::Release { vf }),
        1 => vf.clone().prop_map(|vf| Op::Quarantine { vf }),
        1 => vf.prop_map(|vf| Op::Unquarantine { vf }),
        1 => any::<u8>().prop_map(|mask| Op::Inventory { mask }),
    ]
}

fn run(l: &mut Ledger, op: &Op) {
    let tok = |l: &Ledger, vf: u8| {
        l.get(&pci(vf))
            .and_then(|s| s.effective_lease())
            .map(|x| x.token)
    };
    let planned = match op {
        Op::Reserve { vf, owner: o } => l.plan_reserve(pci(*vf), &owner(*o, &format!("net{o}"))),
        Op::Configure { vf, vm: v } => match tok(l, *vf) {
            Some(t) => l.plan_advance(
                pci(*vf),
                t,
                Step::Configure {
                    saved: SavedVfState::default(),
                    cni: Some(Box::new(attachment(v.map(vm), 3))),
                },
            ),
            None => return,
        },
        Op::Attach { vf, vm: v } => match tok(l, *vf) {
            Some(t) => l.plan_advance(
                pci(*vf),
                t,
                Step::Attach {
                    alias: format!("vfplug-{vf}"),
                    vm: vm(*v),
                },
            ),
            None => return,
        },
        Op::Step { vf, step } => match tok(l, *vf) {
            Some(t) => {
                let s = match step {
                    0 => Step::Attached,
                    1 => Step::AttachFailed,
                    2 => Step::Detach { since_ms: 1 },
                    3 => Step::DetachRetry,
                    4 => Step::UnplugFailed {
                        reason: "no".into(),
                    },
                    5 => Step::Detached,
                    _ => Step::BeginRelease,
                };
                l.plan_advance(pci(*vf), t, s)
            }
            None => return,
        },
        Op::Release { vf } => match tok(l, *vf) {
            Some(t) => l.plan_release(pci(*vf), t),
            None => return,
        },
        Op::Quarantine { vf } => l.plan_quarantine(pci(*vf), "test"),
        Op::Unquarantine { vf } => l.plan_unquarantine(pci(*vf)),
        Op::Inventory { mask } => {
            let present: BTreeSet<_> = (0..N_VF)
                .filter(|i| mask & (1 << i) != 0)
                .map(pci)
                .collect();
            for r in l.plan_inventory(&present) {
                l.apply(&r).unwrap();
            }
            return;
        }
    };
    if let Ok(r) = planned {
        l.apply(&r).unwrap();
    }
}

/// The test's own reading of the ledger: which VM socket and phase each VF should show with.
fn expected(l: &Ledger) -> BTreeMap<PciAddress, (String, Phase)> {
    let mut out = BTreeMap::new();
    for (pci, s) in l.iter() {
        let s = match s {
            VfState::Missing { was } => &**was,
            s => s,
        };
        let cni_sock = |lease: &Lease| {
            lease
                .cni
                .as_ref()
                .and_then(|c| c.vm.as_ref())
                .map(|v| v.qmp_socket.clone())
        };
        let e = match s {
            VfState::Configured { lease } => cni_sock(lease).map(|v| (v, Phase::Pending)),
            VfState::Attaching { vm, .. } => Some((vm.qmp_socket.clone(), Phase::Attaching)),
            VfState::Attached {
                vm, reason: None, ..
            } => Some((vm.qmp_socket.clone(), Phase::Attached)),
            VfState::Attached { vm, .. } => Some((vm.qmp_socket.clone(), Phase::GuestError)),
            VfState::Detaching { vm, .. } => Some((vm.qmp_socket.clone(), Phase::UnplugPending)),
            VfState::Releasing { lease } => cni_sock(lease).map(|v| (v, Phase::Releasing)),
            _ => None,
        };
        if let Some(e) = e {
            out.insert(*pci, e);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After every step of a random history: every VF of a VM is exactly one net of exactly
    /// that VM, with the phase the ledger says; it has exactly one hostdev unless it is
    /// releasing, and that hostdev names its net and agrees with it; nothing else shows.
    #[test]
    fn every_vf_of_a_vm_appears_exactly_once(ops in proptest::collection::vec(op(), 1..60)) {
        let mut l = ledger_with(N_VF);
        for op in &ops {
            let before = l.clone();
            run(&mut l, op);
            let want = expected(&l);
            let recs = vm_records(&l, |_| None);
            let mut nets: BTreeMap<PciAddress, (String, Phase)> = BTreeMap::new();
            let mut hostdevs = 0usize;
            for r in &recs {
                prop_assert!(!r.nets.is_empty(), "a VM without nets is not listed: {r:?}");
                for n in &r.nets {
                    let again = nets.insert(n.actual.pci_address, (r.vm.qmp_socket.clone(), n.phase));
                    prop_assert!(again.is_none(), "{} shows twice", n.actual.pci_address);
                    let h: Vec<_> = r.hostdevs.iter().filter(|h| h.parent_net == n.name).collect();
                    if n.phase == Phase::Releasing {
                        prop_assert!(h.is_empty(), "releasing {} still has a hostdev", n.name);
                    } else {
                        prop_assert_eq!(h.len(), 1, "net {} of {:?}", n.name, r.vm);
                        prop_assert_eq!(h[0].pci_address, n.actual.pci_address);
                        prop_assert_eq!(h[0].phase, n.phase);
                        prop_assert_eq!(h[0].alias.is_none(), n.phase == Phase::Pending);
                        prop_assert_eq!(h[0].reason.is_some(), n.phase == Phase::GuestError);
                    }
                }
                hostdevs += r.hostdevs.len();
            }
            prop_assert_eq!(&nets, &want, "after {:?}", op);
            prop_assert_eq!(
                hostdevs,
                want.values().filter(|(_, p)| *p != Phase::Releasing).count()
            );
            // The change each record makes is the change the records show.
            let had = expected(&before);
            for (p, s) in l.iter() {
                let Some(old) = before.get(p).filter(|o| *o != s) else { continue };
                let rec = Record::Set { pci: *p, from: old.clone(), to: s.clone() };
                let (was, is) = (had.get(p).map(|e| e.1), want.get(p).map(|e| e.1));
                let c = phase_change(&rec);
                prop_assert_eq!(c.as_ref().map(|c| (c.from, c.to)), (was != is).then_some((was, is)));
            }
        }
    }
}
