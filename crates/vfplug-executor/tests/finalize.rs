//! The finalize-removal and recovery against an in-memory ledger port and vfplug-host's fakes
//! (simulated PF, simulated netdevs, recording driver binder): idempotence, fencing, every
//! failure collected, half-done ADDs undone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use vfplug_core::ledger::{Ledger, LedgerError, Owner, Record, Step, Token, VfState};
use vfplug_core::{
    AttachMode, CniAttachment, DeviceMode, PciAddress, PoolConfig, SavedVfState, VfConfig,
};
use vfplug_executor::{
    ErrorKind, ExecError, Executor, HostPorts, LedgerPort, ReserveRequest, Reserved, VfFacts,
};
use vfplug_host::driver::{BinderOp, FakeDriverBinder};
use vfplug_host::net::{VfChange, VfNetlink};
use vfplug_host::sim::{DriverProfile, Fault, SimNetdevOps, SimVfNetlink};

/// The ledger in memory: every commit is "durable" at once.
#[derive(Debug, Default)]
struct MemLedger {
    ledger: Mutex<Ledger>,
    facts: BTreeMap<PciAddress, VfFacts>,
    ended: Mutex<Vec<PciAddress>>,
}

impl LedgerPort for MemLedger {
    async fn commit<F>(&self, plan: F) -> Result<Record, ExecError>
    where
        F: FnOnce(&Ledger) -> Result<Record, LedgerError> + Send,
    {
        let mut l = self.ledger.lock().unwrap();
        let r = plan(&l).map_err(|e| ExecError::ledger(&e))?;
        l.apply(&r).map_err(|e| ExecError::ledger(&e))?;
        Ok(r)
    }

    fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&self.ledger.lock().unwrap())
    }

    fn vf(&self, pci: PciAddress) -> Result<VfFacts, ExecError> {
        self.facts
            .get(&pci)
            .cloned()
            .ok_or_else(|| ExecError::new(ErrorKind::NoSuchDevice, format!("no VF {pci}")))
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Reserved, ExecError> {
        let pci = req.device.expect("these tests name the VF");
        let r = self.commit(|l| l.plan_reserve(pci, &req.owner)).await?;
        Ok(Reserved {
            token: r.new_token().unwrap(),
            facts: self.vf(pci)?,
        })
    }

    fn lease_ended(&self, pci: PciAddress, _facts: Option<&VfFacts>) {
        self.ended.lock().unwrap().push(pci);
    }
}

fn pci(f: u8) -> PciAddress {
    PciAddress::new(0, 0x5e, 1, f).unwrap()
}

struct Setup {
    exec: Executor<MemLedger>,
    pf: Arc<SimVfNetlink>,
    binder: Arc<FakeDriverBinder>,
}

/// Three vfio-mode VFs on PF `ens1f1`; the binder knows the first two (the third's reset fails).
fn setup() -> Setup {
    let mut facts = BTreeMap::new();
    let config = vfplug_core::Config::parse(
        "pools:\n  - name: vm\n    deviceMode: vfio\n    selectors: { pfNames: [ens1f1] }\n",
    )
    .unwrap();
    let pool: PoolConfig = config.pools[0].clone();
    assert_eq!(pool.device_mode, DeviceMode::Vfio);
    for i in 0..3u8 {
        facts.insert(
            pci(i),
            VfFacts {
                pci: pci(i),
                pf_pci: PciAddress::new(0, 0x5e, 0, 0).unwrap(),
                pf_netdev: Some("ens1f1".into()),
                vf_index: u32::from(i),
                driver: Some("vfio-pci".into()),
                resource: "vfplug.io/vm".into(),
                pool: pool.clone(),
            },
        );
    }
    let mut ledger = Ledger::new();
    let present: BTreeSet<_> = facts.keys().copied().collect();
    for r in ledger.plan_inventory(&present) {
        ledger.apply(&r).unwrap();
    }
    let pf = Arc::new(SimVfNetlink::new(DriverProfile::default()));
    let binder = Arc::new(FakeDriverBinder::new([
        (pci(0), Some("vfio-pci".to_string())),
        (pci(1), Some("vfio-pci".to_string())),
    ]));
    let host = HostPorts {
        vf_netlink: pf.clone(),
        netdev: Arc::new(SimNetdevOps::default()),
        driver: binder.clone(),
        sysfs_root: "/nonexistent-sysfs".into(),
    };
    let port = MemLedger {
        ledger: Mutex::new(ledger),
        facts,
        ended: Mutex::default(),
    };
    Setup {
        exec: Executor::new(Arc::new(port), host),
        pf,
        binder,
    }
}

fn owner(n: u8) -> Owner {
    Owner {
        pod: format!("ns/vm-{n}").into(),
        container_id: format!("c{n}"),
        ifname: "net1".into(),
    }
}

/// A completed vfio-mode ADD of VLAN 42 on `pci(i)`; returns its token.
async fn attach(s: &Setup, i: u8) -> Token {
    let req = vfplug_executor::AddRequest {
        owner: owner(i),
        network: "vm-net".into(),
        device: Some(pci(i)),
        config: VfConfig {
            vlan: Some(42),
            ..VfConfig::default()
        },
        ..Default::default()
    };
    let out = s.exec.add(req).await.unwrap();
    assert_eq!(out.pci, pci(i));
    assert_eq!(s.pf.read_vf("ens1f1", u32::from(i)).unwrap().vlan, 42);
    token(s, i)
}

fn token(s: &Setup, i: u8) -> Token {
    s.exec
        .ledger()
        .read(|l| l.get(&pci(i)).and_then(|st| st.lease()).map(|l| l.token))
        .unwrap()
}

fn state(s: &Setup, i: u8) -> VfState {
    s.exec.ledger().read(|l| l.get(&pci(i)).cloned()).unwrap()
}

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
