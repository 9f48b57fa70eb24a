//! The VF ledger: scenarios for each transition, fencing, inventory changes, write-ahead replay
//! and snapshots; then a property test with random operations and crashes.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use vfplug_core::*;

fn pci(i: u8) -> PciAddress {
    PciAddress::new(0, 0x3b, 2, i).unwrap()
}

fn owner(n: usize) -> Owner {
    Owner {
        pod: format!("pod-{n}").into(),
        container_id: format!("ctr-{n}"),
        ifname: "net1".into(),
    }
}

fn vm(name: &str) -> VmRef {
    VmRef {
        pod: PodRef::new("ns", name, ""),
        qmp_socket: format!("/run/{name}.qmp"),
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

fn token_of(l: &Ledger, p: PciAddress) -> Token {
    l.get(&p).unwrap().effective_lease().unwrap().token
}

/// Applies a plan to the live ledger and appends it to the log, as the agent does.
fn commit(
    l: &mut Ledger,
    log: &mut Vec<Record>,
    plan: impl FnOnce(&Ledger) -> Result<Record, LedgerError>,
) -> Record {
    let r = plan(l).unwrap();
    log.push(r.clone());
    l.apply(&r).unwrap();
    r
}

#[test]
fn full_vm_lifecycle_and_replay() {
    let mut log = Vec::new();
    let mut l = Ledger::new();
    for r in l.plan_inventory(&[pci(0), pci(1)].into()) {
        commit(&mut l, &mut log, |_| Ok(r));
    }
    let p = pci(0);
    commit(&mut l, &mut log, |l| l.plan_reserve(p, &owner(1)));
    let t = token_of(&l, p);
    assert_eq!(t, 1);
    let saved = SavedVfState {
        mac: Some([2, 0, 0, 0, 0, 1]),
        vlan: 0,
        ..Default::default()
    };
    commit(&mut l, &mut log, |l| {
        l.plan_advance(
            p,
            t,
            Step::Configure {
                saved: saved.clone(),
                cni: None,
            },
        )
    });
    commit(&mut l, &mut log, |l| {
        l.plan_advance(
            p,
            t,
            Step::Attach {
                alias: "hostdev0".into(),
                vm: vm("vm-a"),
            },
        )
    });
    commit(&mut l, &mut log, |l| l.plan_advance(p, t, Step::Attached));
    assert_eq!(l.get(&p).unwrap().kind(), StateKind::Attached);
    commit(&mut l, &mut log, |l| {
        l.plan_advance(p, t, Step::Detach { since_ms: 1000 })
    });
    commit(&mut l, &mut log, |l| {
        l.plan_advance(p, t, Step::DetachRetry)
    });
    match l.get(&p).unwrap() {
        VfState::Detaching {
            attempts,
            since_ms,
            vm: vm_ref,
            lease,
            ..
        } => {
            assert_eq!((*attempts, *since_ms), (2, 1000));
            assert_eq!(*vm_ref, vm("vm-a"));
            assert_eq!(
                lease.saved.as_ref(),
                Some(&saved),
                "saved state travels with the lease"
            );
        }
        s => panic!("{s:?}"),
    }
    // Guest refused: back to Attached, same alias and VM.
    commit(&mut l, &mut log, |l| {
        l.plan_advance(
            p,
            t,
            Step::UnplugFailed {
                reason: "guest said no".into(),
            },
        )
    });
    assert_eq!(l.get(&p).unwrap().kind(), StateKind::Attached);
    commit(&mut l, &mut log, |l| {
        l.plan_advance(p, t, Step::Detach { since_ms: 2000 })
    });
    commit(&mut l, &mut log, |l| l.plan_advance(p, t, Step::Detached));
    // Not yet Free: releasing is separate (restore happens in between).
    assert_eq!(l.get(&p).unwrap().kind(), StateKind::Releasing);
    commit(&mut l, &mut log, |l| l.plan_release(p, t));
    assert_eq!(l.get(&p), Some(&VfState::Free));
    assert_eq!(Ledger::replay(Ledger::new(), &log).unwrap(), l);
    // The log is plain serde: through JSON and back it replays the same.
    let json: Vec<String> = log
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert!(json[2].contains(r#""op":"set.v1""#), "{}", json[2]);
    let back: Vec<Record> = json
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    assert_eq!(Ledger::replay(Ledger::new(), &back).unwrap(), l);
}

#[test]
fn stale_token_is_fenced_and_changes_nothing() {
    let mut l = ledger_with(1);
    let p = pci(0);
    l.apply_now(l.plan_reserve(p, &owner(1))).unwrap();
    let old = token_of(&l, p);
    l.apply_now(l.plan_release(p, old)).unwrap();
    l.apply_now(l.plan_reserve(p, &owner(2))).unwrap();
    let new = token_of(&l, p);
    assert!(new > old);
    let before = l.clone();
    // The late DEL of the first attachment (sriov-cni #219) must not touch owner 2's VF.
    let e = l.plan_release(p, old).unwrap_err();
    assert_eq!(
        e,
        LedgerError::Fenced {
            pci: p,
            presented: old,
            current: Some(new)
        }
    );
    let e = l.plan_advance(p, old, Step::BeginRelease).unwrap_err();
    assert!(matches!(e, LedgerError::Fenced { .. }), "{e}");
    assert_eq!(l, before);
    // A token on a Free VF is fenced too.
    let l2 = ledger_with(1);
    assert!(matches!(
        l2.plan_release(p, 7),
        Err(LedgerError::Fenced { current: None, .. })
    ));
}

#[test]
fn reserve_rules() {
    let mut l = ledger_with(2);
    l.apply_now(l.plan_reserve(pci(0), &owner(1))).unwrap();
    // Owned VF cannot be reserved again.
    assert!(matches!(
        l.plan_reserve(pci(0), &owner(2)),
        Err(LedgerError::NotFree { .. })
    ));
    // An owner holds at most one VF.
    assert_eq!(
        l.plan_reserve(pci(1), &owner(1)),
        Err(LedgerError::OwnerBusy {
            owner: Box::new(owner(1)),
            pci: pci(0)
        })
    );
    assert!(matches!(
        l.plan_reserve(PciAddress::new(0, 0x3c, 0, 0).unwrap(), &owner(3)),
        Err(LedgerError::UnknownVf { .. })
    ));
    assert_eq!(l.find_by_owner(&owner(1)).map(|(p, _)| p), Some(pci(0)));
    assert_eq!(l.owner_of(&pci(0)), Some(&owner(1)));
    assert_eq!(l.owner_of(&pci(1)), None);
}

#[test]
fn kubelet_allocations() {
    let mut l = ledger_with(2);
    let p = pci(0);
    l.apply_now(l.plan_kubelet_allocate(p, None)).unwrap();
    // Reserved cannot be taken from kubelet's VF by another pod.
    l.apply_now(l.plan_kubelet_allocate(p, Some("pod-1")))
        .unwrap();
    assert!(matches!(
        l.plan_reserve(p, &owner(2)),
        Err(LedgerError::NotFree { .. })
    ));
    assert!(matches!(
        l.plan_kubelet_allocate(p, Some("pod-1")),
        Err(LedgerError::NoChange { .. })
    ));
    // The pod's own CNI ADD may claim it; release hands it back to kubelet, not to Free.
    l.apply_now(l.plan_reserve(p, &owner(1))).unwrap();
    let t = token_of(&l, p);
    assert!(matches!(
        l.plan_kubelet_allocate(p, Some("pod-9")),
        Err(LedgerError::NotFree { .. })
    ));
    l.apply_now(l.plan_advance(
        p,
        t,
        Step::Configure {
            saved: SavedVfState::default(),
            cni: None,
        },
    ))
    .unwrap();
    l.apply_now(l.plan_advance(p, t, Step::BeginRelease))
        .unwrap();
    l.apply_now(l.plan_release(p, t)).unwrap();
    assert_eq!(
        l.get(&p),
        Some(&VfState::KubeletAllocated {
            pod: Some("pod-1".into())
        })
    );
    l.apply_now(l.plan_kubelet_release(p)).unwrap();
    assert_eq!(l.get(&p), Some(&VfState::Free));
    // A reserved VF is not kubelet's to allocate.
    l.apply_now(l.plan_reserve(pci(1), &owner(3))).unwrap();
    assert!(matches!(
        l.plan_kubelet_allocate(pci(1), None),
        Err(LedgerError::NotFree { .. })
    ));
}

#[test]
fn invalid_transitions_are_typed_errors() {
    let mut l = ledger_with(1);
    let p = pci(0);
    l.apply_now(l.plan_reserve(p, &owner(1))).unwrap();
    let t = token_of(&l, p);
    for step in [
        Step::Attach {
            alias: "a".into(),
            vm: vm("v"),
        },
        Step::Attached,
        Step::Detach { since_ms: 0 },
        Step::Detached,
        Step::DetachRetry,
    ] {
        let e = l.plan_advance(p, t, step).unwrap_err();
        assert!(
            matches!(
                e,
                LedgerError::InvalidTransition {
                    from: StateKind::Reserved,
                    ..
                }
            ),
            "{e}"
        );
    }
    l.apply_now(l.plan_advance(
        p,
        t,
        Step::Configure {
            saved: SavedVfState::default(),
            cni: None,
        },
    ))
    .unwrap();
    // Saved once: a second Configure is refused.
    assert!(
        l.plan_advance(
            p,
            t,
            Step::Configure {
                saved: SavedVfState::default(),
                cni: None,
            }
        )
        .is_err()
    );
    // Configured (attached to a pod netns) cannot skip to Free.
    assert!(matches!(
        l.plan_release(p, t),
        Err(LedgerError::InvalidTransition { .. })
    ));
}

#[test]
fn apply_rejects_corrupt_or_reordered_records() {
    let l = ledger_with(2);
    let r1 = l.plan_reserve(pci(0), &owner(1)).unwrap();
    let r2 = l.plan_reserve(pci(1), &owner(2)).unwrap();
    let mut live = l.clone();
    live.apply(&r1).unwrap();
    // r2 was planned against the old ledger with the same token as r1: refused.
    let e = live.apply(&r2).unwrap_err();
    assert!(matches!(e, LedgerError::Illegal { .. }), "{e}");
    // Applying r1 twice: stale.
    assert!(matches!(live.apply(&r1), Err(LedgerError::Stale { .. })));
    // A forged jump Free -> Attached.
    let forged = Record::Set {
        pci: pci(1),
        from: VfState::Free,
        to: VfState::Attached {
            lease: Lease {
                owner: owner(5),
                token: 99,
                saved: None,
                from_kubelet: false,
                cni: None,
            },
            alias: "x".into(),
            vm: vm("v"),
            reason: None,
        },
    };
    assert!(matches!(
        live.apply(&forged),
        Err(LedgerError::Illegal { .. })
    ));
    // Removing an owned VF.
    let rm = Record::Remove {
        pci: pci(0),
        was: live.get(&pci(0)).unwrap().clone(),
    };
    assert!(matches!(live.apply(&rm), Err(LedgerError::Illegal { .. })));
}

#[test]
fn inventory_missing_and_back() {
    let mut l = ledger_with(3);
    l.apply_now(l.plan_reserve(pci(0), &owner(1))).unwrap();
    l.apply_now(l.plan_quarantine(pci(1), "restore failed"))
        .unwrap();
    let t = token_of(&l, pci(0));
    // All three vanish (sriov_numvfs=0), one new appears.
    let recs = l.plan_inventory(&[pci(5)].into());
    for r in &recs {
        l.apply(r).unwrap();
    }
    assert_eq!(l.get(&pci(2)), None, "a free VF that vanished is forgotten");
    assert_eq!(l.get(&pci(0)).unwrap().kind(), StateKind::Missing);
    assert_eq!(
        l.owner_of(&pci(0)),
        Some(&owner(1)),
        "a vanished VF keeps its owner"
    );
    assert_eq!(l.get(&pci(1)).unwrap().kind(), StateKind::Missing);
    assert_eq!(l.get(&pci(5)), Some(&VfState::Free));
    assert!(l.plan_reserve(pci(3), &owner(1)).is_err());
    // Same inventory again: nothing to do.
    assert!(l.plan_inventory(&[pci(5)].into()).is_empty());
    // They come back: previous states restored.
    for r in l.plan_inventory(&[pci(0), pci(1), pci(5)].into()) {
        l.apply(&r).unwrap();
    }
    assert_eq!(l.get(&pci(0)).unwrap().kind(), StateKind::Reserved);
    assert_eq!(l.get(&pci(1)).unwrap().kind(), StateKind::Quarantined);
    // A vanished owned VF released by its owner leaves the ledger.
    for r in l.plan_inventory(&[pci(5)].into()) {
        l.apply(&r).unwrap();
    }
    l.apply_now(l.plan_release(pci(0), t)).unwrap();
    assert_eq!(l.get(&pci(0)), None);
    assert_eq!(l.find_by_owner(&owner(1)), None);
}

#[test]
fn quarantine_keeps_previous_owner_and_unquarantine_frees() {
    let mut l = ledger_with(1);
    let p = pci(0);
    l.apply_now(l.plan_reserve(p, &owner(1))).unwrap();
    l.apply_now(l.plan_quarantine(p, "reset failed")).unwrap();
    assert_eq!(
        l.get(&p),
        Some(&VfState::Quarantined {
            reason: "reset failed".into(),
            previous_owner: Some(owner(1))
        })
    );
    assert!(matches!(
        l.plan_reserve(p, &owner(2)),
        Err(LedgerError::NotFree { .. })
    ));
    assert!(matches!(
        l.plan_quarantine(p, "again"),
        Err(LedgerError::NoChange { .. })
    ));
    l.apply_now(l.plan_unquarantine(p)).unwrap();
    assert_eq!(l.get(&p), Some(&VfState::Free));
    assert_eq!(l.counts_by_state().get(&StateKind::Free), Some(&1));
}

#[test]
fn snapshot_roundtrip_and_validation() {
    let mut l = ledger_with(3);
    l.apply_now(l.plan_reserve(pci(0), &owner(1))).unwrap();
    l.apply_now(l.plan_kubelet_allocate(pci(1), Some("p")))
        .unwrap();
    let json = serde_json::to_string(&l).unwrap();
    let back: Ledger = serde_json::from_str(&json).unwrap();
    assert_eq!(back, l);
    assert_eq!(back.last_token(), 1);
    // A snapshot whose token counter went back is refused.
    let bad = json.replace(r#""last_token":1"#, r#""last_token":0"#);
    assert!(serde_json::from_str::<Ledger>(&bad).is_err());
    let bad = json.replace(r#""version":1"#, r#""version":7"#);
    assert!(serde_json::from_str::<Ledger>(&bad).is_err());
}

// ---------------------------------------------------------------------------------------------
// Property test: random operations with crashes.

const N_VF: u8 = 6;
const N_OWNER: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        vf: u8,
        owner: usize,
    },
    KubeletAllocate {
        vf: u8,
        pod: Option<usize>,
    },
    KubeletRelease {
        vf: u8,
    },
    Advance {
        vf: u8,
        step: u8,
        stale: bool,
    },
    Release {
        vf: u8,
        stale: bool,
    },
    Quarantine {
        vf: u8,
    },
    Unquarantine {
        vf: u8,
    },
    Inventory {
        mask: u8,
    },
    /// Drop the live ledger and replay the durable state. With `lose_plan`, a plan was made
    /// but the process died before persisting it.
    Crash {
        lose_plan: bool,
    },
    /// Compact: snapshot the ledger, truncate the log.
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let vf = 0..N_VF;
    prop_oneof![
        4 => (vf.clone(), 0..N_OWNER).prop_map(|(vf, owner)| Op::Reserve { vf, owner }),
        1 => (vf.clone(), proptest::option::of(0..N_OWNER)).prop_map(|(vf, pod)| Op::KubeletAllocate { vf, pod }),
        1 => vf.clone().prop_map(|vf| Op::KubeletRelease { vf }),
        8 => (vf.clone(), 0u8..12, proptest::bool::weighted(0.15)).prop_map(|(vf, step, stale)| Op::Advance { vf, step, stale }),
        3 => (vf.clone(), proptest::bool::weighted(0.2)).prop_map(|(vf, stale)| Op::Release { vf, stale }),
        1 => vf.clone().prop_map(|vf| Op::Quarantine { vf }),
        1 => vf.prop_map(|vf| Op::Unquarantine { vf }),
        1 => any::<u8>().prop_map(|mask| Op::Inventory { mask }),
        1 => any::<bool>().prop_map(|lose_plan| Op::Crash { lose_plan }),
        1 => Just(Op::Snapshot),
    ]
}

fn step(n: u8, t: u64) -> Step {
    match n {
        0 => Step::Configure {
            saved: SavedVfState {
                vlan: 7,
                ..Default::default()
            },
            // Exercise the attachment's serde through snapshots and replays.
            cni: Some(Box::new(vfplug_core::CniAttachment {
                network: "net-a".into(),
                netns: "/run/netns/p".into(),
                netdev: Some(vfplug_core::NetdevPlacement {
                    host_name: "ens1f0v3".into(),
                    host_mtu: 1500,
                    altnames: vec!["enp59s0f0v3".into()],
                    pod_ifname: "net1".into(),
                    pod_mtu: 9000,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        },
        1 => Step::Attach {
            alias: "hostdev-net1".into(),
            vm: vm("vm"),
        },
        2 => Step::Attached,
        3 => Step::AttachFailed,
        4 => Step::Detach { since_ms: t },
        5 => Step::DetachRetry,
        6 => Step::UnplugFailed {
            reason: "refused".into(),
        },
        7 => Step::Detached,
        _ => Step::BeginRelease,
    }
}

/// Indexes (for [`step`]) of the steps legal from a state.
fn legal_steps(k: StateKind) -> &'static [u8] {
    match k {
        StateKind::Reserved => &[0, 8],
        StateKind::Configured => &[1, 8],
        StateKind::Attaching => &[2, 3, 4],
        StateKind::Attached => &[4],
        StateKind::Detaching => &[5, 6, 7, 7],
        _ => &[],
    }
}

struct Node {
    snapshot: Option<String>,
    log: Vec<Record>,
    live: Ledger,
    tokens_issued: Vec<Token>,
}

impl Node {
    fn durable(&self) -> Ledger {
        let base = match &self.snapshot {
            Some(s) => serde_json::from_str(s).expect("snapshot loads"),
            None => Ledger::new(),
        };
        Ledger::replay(base, &self.log).expect("durable log replays")
    }

    fn persist_and_apply(&mut self, r: Record) {
        if let Some(t) = r.new_token() {
            self.tokens_issued.push(t);
        }
        self.log.push(r.clone());
        self.live.apply(&r).expect("a fresh plan applies");
    }
}

/// A token that is not the VF's: an older one, or one never issued.
fn stale_token(l: &Ledger, vf: u8) -> Token {
    match l
        .get(&pci(vf))
        .and_then(|s| s.effective_lease())
        .map(|l| l.token)
    {
        Some(c) if c > 1 => c - 1,
        Some(c) => c + 1000,
        None => l.last_token() + 1,
    }
}

fn check(l: &Ledger) -> Result<(), TestCaseError> {
    prop_assert!(l.check_invariants().is_ok(), "{:?}", l.check_invariants());
    let mut owners = BTreeSet::new();
    for (p, s) in l.iter() {
        if let Some(o) = s.owner() {
            prop_assert!(owners.insert(o.clone()), "{o} owns two VFs (second: {p})");
        }
        if matches!(s, VfState::Free | VfState::KubeletAllocated { .. }) {
            prop_assert!(s.owner().is_none());
        }
    }
    Ok(())
}

static REACHED: std::sync::Mutex<BTreeSet<StateKind>> = std::sync::Mutex::new(BTreeSet::new());

fn reached(k: StateKind) {
    REACHED.lock().unwrap().insert(k);
}

/// The random walk must actually visit every state, or the property test proves little.
#[test]
fn random_walk_reaches_every_state() {
    random_operations_with_crashes_keep_the_invariants();
    let got = REACHED.lock().unwrap().clone();
    for k in [
        StateKind::Free,
        StateKind::KubeletAllocated,
        StateKind::Reserved,
        StateKind::Configured,
        StateKind::Attaching,
        StateKind::Attached,
        StateKind::Detaching,
        StateKind::Releasing,
        StateKind::Quarantined,
        StateKind::Missing,
    ] {
        assert!(got.contains(&k), "never reached {k}: {got:?}");
    }
}

proptest! {
    // A fixed seed: `random_walk_reaches_every_state` asserts coverage of this very walk, which
    // must not depend on luck (it failed once in CI with a random seed). Other property tests
    // keep random seeds.
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5f_0f_1e_d9),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_with_crashes_keep_the_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut node = Node { snapshot: None, log: Vec::new(), live: Ledger::new(), tokens_issued: Vec::new() };
        let all: BTreeSet<_> = (0..N_VF).map(pci).collect();
        for r in node.live.plan_inventory(&all) {
            node.persist_and_apply(r);
        }
        let mut clock = 0u64;
        for op in ops {
            clock += 1;
            let before = node.live.clone();
            let planned: Vec<Result<Record, LedgerError>> = match &op {
                Op::Reserve { vf, owner: o } => vec![node.live.plan_reserve(pci(*vf), &owner(*o))],
                Op::KubeletAllocate { vf, pod } => {
                    let pod = pod.map(|p| format!("pod-{p}"));
                    vec![node.live.plan_kubelet_allocate(pci(*vf), pod.as_deref())]
                }
                Op::KubeletRelease { vf } => vec![node.live.plan_kubelet_release(pci(*vf))],
                Op::Advance { vf, step: s, stale: true } => {
                    let bad = stale_token(&node.live, *vf);
                    let r = node.live.plan_advance(pci(*vf), bad, step(*s, clock));
                    prop_assert!(matches!(r, Err(LedgerError::Fenced { .. } | LedgerError::UnknownVf { .. })), "stale token not fenced: {r:?}");
                    vec![r]
                }
                Op::Release { vf, stale: true } => {
                    let bad = stale_token(&node.live, *vf);
                    let r = node.live.plan_release(pci(*vf), bad);
                    prop_assert!(matches!(r, Err(LedgerError::Fenced { .. } | LedgerError::UnknownVf { .. })), "stale token not fenced: {r:?}");
                    vec![r]
                }
                Op::Advance { vf, step: s, .. } => {
                    // Aim at an owned VF (most advances would otherwise hit a Free one and the
                    // walk would rarely get past Reserved).
                    let owned: Vec<u8> = (0..N_VF)
                        .filter(|i| node.live.get(&pci(*i)).is_some_and(|s| s.lease().is_some()))
                        .collect();
                    let vf = if owned.is_empty() { vf } else { &owned[usize::from(*vf) % owned.len()] };
                    match node.live.get(&pci(*vf)) {
                        Some(state) if state.effective_lease().is_some() => {
                            let token = state.effective_lease().map_or(0, |l| l.token);
                            // Mostly a step that is legal from here, so runs reach deep states;
                            // sometimes any step, to exercise the refusals.
                            let legal = legal_steps(state.kind());
                            let n = if *s < 10 && !legal.is_empty() { legal[usize::from(*s) % legal.len()] } else { *s };
                            vec![node.live.plan_advance(pci(*vf), token, step(n, clock))]
                        }
                        _ => vec![],
                    }
                }
                Op::Release { vf, .. } => {
                    match node.live.get(&pci(*vf)).and_then(|s| s.effective_lease()) {
                        Some(l) => vec![node.live.plan_release(pci(*vf), l.token)],
                        None => vec![],
                    }
                }
                Op::Quarantine { vf } => vec![node.live.plan_quarantine(pci(*vf), "test")],
                Op::Unquarantine { vf } => vec![node.live.plan_unquarantine(pci(*vf))],
                Op::Inventory { mask } => {
                    let present: BTreeSet<_> = (0..N_VF).filter(|i| mask & (1 << i) != 0).map(pci).collect();
                    let owned_before: Vec<_> = node.live.iter().filter_map(|(p, s)| s.owner().map(|o| (*p, o.clone()))).collect();
                    let recs = node.live.plan_inventory(&present);
                    for r in recs {
                        node.persist_and_apply(r);
                    }
                    // Every present VF is tracked and not Missing; every absent one is Missing.
                    for p in &present {
                        let s = node.live.get(p);
                        prop_assert!(s.is_some_and(|s| s.kind() != StateKind::Missing), "{p}: {s:?}");
                    }
                    for (p, s) in node.live.iter() {
                        if !present.contains(p) {
                            prop_assert_eq!(s.kind(), StateKind::Missing);
                        }
                    }
                    // No owned VF is ever lost from the ledger.
                    for (p, o) in owned_before {
                        prop_assert_eq!(node.live.owner_of(&p), Some(&o));
                    }
                    vec![]
                }
                Op::Crash { lose_plan } => {
                    if *lose_plan {
                        // Planned but never persisted: must be as if it never happened.
                        if let Some((p, _)) = node.live.iter().find(|(_, s)| s.is_free()) {
                            let free = (0..N_OWNER).map(owner).find(|o| node.live.find_by_owner(o).is_none());
                            if let Some(o) = free {
                                let _lost = node.live.plan_reserve(*p, &o);
                            }
                        }
                    }
                    node.live = node.durable();
                    prop_assert_eq!(&node.live, &before, "replay after crash differs from the live ledger");
                    vec![]
                }
                Op::Snapshot => {
                    node.snapshot = Some(serde_json::to_string(&node.live).unwrap());
                    node.log.clear();
                    vec![]
                }
            };
            for r in planned {
                match r {
                    Ok(rec) => node.persist_and_apply(rec),
                    Err(_) => prop_assert_eq!(&node.live, &before, "a refused plan changed the ledger"),
                }
            }
            check(&node.live)?;
            for (_, s) in node.live.iter() {
                reached(s.kind());
            }
            prop_assert_eq!(&node.durable(), &node.live, "durable state differs from live after {:?}", op);
            // Tokens strictly increase over the whole history, across crashes and snapshots.
            prop_assert!(node.tokens_issued.windows(2).all(|w| w[0] < w[1]), "{:?}", node.tokens_issued);
            prop_assert!(node.tokens_issued.last().is_none_or(|t| *t == node.live.last_token()));
        }
    }
}

/// Ledgers written before the owner's pod field was renamed (`pod_uid` → `pod`), and before it
/// was typed (one string), still replay; new records carry the typed form.
#[test]
fn owner_reads_the_old_pod_uid_key() {
    let old = r#"{"pod_uid":"default/web","container_id":"c1","ifname":"net1"}"#;
    let o: Owner = serde_json::from_str(old).unwrap();
    assert_eq!(o.pod, PodRef::new("default", "web", ""));
    let new = serde_json::to_string(&o).unwrap();
    assert!(
        new.contains(r#""pod":{"namespace":"default","name":"web"}"#),
        "{new}"
    );
    let uid_only: Owner =
        serde_json::from_str(r#"{"pod":"0c1d-uid","container_id":"c1","ifname":"net1"}"#).unwrap();
    assert_eq!(uid_only.pod, PodRef::new("", "", "0c1d-uid"));
}
