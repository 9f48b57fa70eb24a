//! The finalize-removal and recovery against an in-memory ledger port and vfplug-host's fakes
//! (simulated PF, simulated netdevs, recording driver binder): idempotence, fencing, every
//! failure collected, half-done ADDs undone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{attach, owner, pci, setup, state, token};
use vfplug_core::ledger::{Step, VfState};
use vfplug_core::{AttachMode, CniAttachment, SavedVfState, VfConfig};
use vfplug_executor::LedgerPort;
use vfplug_host::driver::BinderOp;
use vfplug_host::net::{VfChange, VfNetlink};
use vfplug_host::sim::Fault;

#[tokio::test]
async fn finalize_restores_resets_and_frees_and_a_second_call_changes_nothing() {
    let s = setup();
    let t = attach(&s, 0).await;
    let f = s.exec.finalize_removal(pci(0), t, "test").await.unwrap();
    assert!(f.released && !f.quarantined, "{f:?}");
    assert_eq!(state(&s, 0), VfState::Free);
    assert_eq!(s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
    assert_eq!(s.binder.ops(), vec![BinderOp::Reset(pci(0))]);
    assert_eq!(*s.exec.ledger().ended.lock().unwrap(), vec![pci(0)]);

    let again = s.exec.finalize_removal(pci(0), t, "test").await.unwrap();
    assert!(!again.released && !again.quarantined, "{again:?}");
    assert_eq!(s.binder.ops().len(), 1, "{:?}", s.binder.ops());
    assert_eq!(s.exec.ledger().ended.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_stale_token_never_touches_the_next_lease() {
    let s = setup();
    let old = attach(&s, 1).await;
    s.exec.finalize_removal(pci(1), old, "first").await.unwrap();
    let new = attach(&s, 1).await;
    assert!(new > old);
    let ops_before = s.binder.ops().len();
    let f = s.exec.finalize_removal(pci(1), old, "late").await.unwrap();
    assert!(!f.released, "{f:?}");
    assert!(matches!(state(&s, 1), VfState::Configured { .. }));
    assert_eq!(s.pf.read_vf("ens1f1", 1).unwrap().vlan, 42);
    assert_eq!(s.binder.ops().len(), ops_before);
}

#[tokio::test]
async fn every_failure_is_collected_and_the_vf_quarantined() {
    let s = setup();
    // pci(2) is unknown to the binder: its reset fails; the PF refuses the VLAN restore too.
    let t = attach(&s, 2).await;
    s.pf.fail_next("vlan", Fault::Errno(5), 5);
    let f = s.exec.finalize_removal(pci(2), t, "test").await.unwrap();
    assert!(f.quarantined && !f.released, "{f:?}");
    let VfState::Quarantined {
        reason,
        previous_owner,
    } = state(&s, 2)
    else {
        panic!("{:?}", state(&s, 2))
    };
    assert!(reason.contains("restoring VF settings"), "{reason}");
    assert!(reason.contains("resetting"), "{reason}");
    assert_eq!(previous_owner, Some(owner(2)));
    assert!(s.exec.ledger().ended.lock().unwrap().is_empty());
}

#[tokio::test]
async fn recovery_undoes_half_done_adds_and_keeps_finished_ones() {
    let s = setup();
    let done = attach(&s, 0).await;
    // VF 1: reserved only. VF 2 is not used. A half-done ADD on VF 1 of another kind is below.
    s.exec
        .ledger()
        .commit(|l| l.plan_reserve(pci(1), &owner(1)))
        .await
        .unwrap();
    let f = s.exec.recover().await;
    assert_eq!(f.released, vec![pci(1)]);
    assert!(matches!(state(&s, 0), VfState::Configured { .. }));
    assert_eq!(token(&s, 0), done);
    assert_eq!(state(&s, 1), VfState::Free);

    // Settings written ahead and applied, the ADD never marked complete.
    let r = s
        .exec
        .ledger()
        .commit(|l| l.plan_reserve(pci(1), &owner(1)))
        .await
        .unwrap();
    let t = r.new_token().unwrap();
    s.exec
        .ledger()
        .commit(|l| {
            l.plan_advance(
                pci(1),
                t,
                Step::Configure {
                    saved: SavedVfState::default(),
                    cni: Some(Box::new(CniAttachment {
                        mode: AttachMode::Vfio,
                        config: VfConfig {
                            vlan: Some(9),
                            ..VfConfig::default()
                        },
                        complete: false,
                        ..CniAttachment::default()
                    })),
                },
            )
        })
        .await
        .unwrap();
    s.pf.set_vf(
        "ens1f1",
        1,
        VfChange::Vlan {
            vlan: 9,
            qos: 0,
            proto: vfplug_core::VlanProto::Dot1Q,
        },
    )
    .unwrap();
    let f = s.exec.recover().await;
    assert_eq!(f.released, vec![pci(1)]);
    assert_eq!(state(&s, 1), VfState::Free);
    assert_eq!(s.pf.read_vf("ens1f1", 1).unwrap().vlan, 0);
    assert!(matches!(state(&s, 0), VfState::Configured { .. }));
}
