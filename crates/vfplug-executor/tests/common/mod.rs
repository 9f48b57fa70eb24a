//! Shared by the executor's tests: an in-memory ledger port and a node of three vfio-mode VFs
//! over vfplug-host's fakes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use vfplug_core::ledger::{Ledger, LedgerError, Owner, Record, Token, VfState};
use vfplug_core::{DeviceMode, PciAddress, PoolConfig, VfConfig};
use vfplug_executor::{
    ErrorKind, ExecError, Executor, HostPorts, LedgerPort, ReserveRequest, Reserved, VfFacts,
    VmPorts,
};
use vfplug_host::driver::FakeDriverBinder;
use vfplug_host::net::VfNetlink;
use vfplug_host::sim::{DriverProfile, SimNetdevOps, SimVfNetlink};

/// The ledger in memory: every commit is "durable" at once.
#[derive(Debug, Default)]
pub struct MemLedger {
    pub ledger: Mutex<Ledger>,
    pub facts: BTreeMap<PciAddress, VfFacts>,
    pub ended: Mutex<Vec<PciAddress>>,
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

pub fn pci(f: u8) -> PciAddress {
    PciAddress::new(0, 0x5e, 1, f).unwrap()
}

pub struct Setup {
    pub exec: Arc<Executor<MemLedger>>,
    pub pf: Arc<SimVfNetlink>,
    pub binder: Arc<FakeDriverBinder>,
}

/// Three vfio-mode VFs on PF `ens1f1`; the binder knows the first two (the third's reset fails).
pub fn setup() -> Setup {
    setup_with(None)
}

/// As [`setup`], with the VM ports given.
pub fn setup_with(vm: Option<VmPorts>) -> Setup {
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
        vm,
    };
    let port = MemLedger {
        ledger: Mutex::new(ledger),
        facts,
        ended: Mutex::default(),
    };
    Setup {
        exec: Arc::new(Executor::new(Arc::new(port), host)),
        pf,
        binder,
    }
}

pub fn owner(n: u8) -> Owner {
    Owner {
        pod: format!("ns/vm-{n}").into(),
        container_id: format!("c{n}"),
        ifname: "net1".into(),
    }
}

/// A completed vfio-mode ADD of VLAN 42 on `pci(i)`; returns its token.
pub async fn attach(s: &Setup, i: u8) -> Token {
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

pub fn token(s: &Setup, i: u8) -> Token {
    s.exec
        .ledger()
        .read(|l| l.get(&pci(i)).and_then(|st| st.lease()).map(|l| l.token))
        .unwrap()
}

pub fn state(s: &Setup, i: u8) -> VfState {
    s.exec.ledger().read(|l| l.get(&pci(i)).cloned()).unwrap()
}
