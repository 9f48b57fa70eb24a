//! Shared by the VM hotplug benchmark (`benches/vm.rs`) and its zero-leak test
//! (`tests/vm_concurrency.rs`): the executor over a simulated node of vfio VFs, its ledger in
//! memory or behind the agent's real journal (`store.rs`, fdatasync on a real file), and fake
//! QEMUs that answer QMP at once over real unix sockets.
//!
//! A fake QEMU keeps the devices it has (root ports `vfplug-rp0..`, `vfio-pci` devices behind
//! them) and answers what the attach and detach sagas send: `query-memory-size-summary`,
//! `qom-list`, `query-pci`, `device_add` (refused "in use" on a taken port, as QEMU does) and
//! `device_del` (answered, then `DEVICE_DELETED` at once: a guest that acknowledges instantly).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::UnixListener;
use vfplug_agent::store::{Journal, SyncMode, spawn_writer};
use vfplug_agent::wal::Wal;
use vfplug_core::ledger::{Ledger, LedgerError, Owner, Record};
use vfplug_core::{PciAddress, PodRef, PoolConfig, VmRef};
use vfplug_executor::vm::BoxFuture;
use vfplug_executor::{
    AddRequest, ErrorKind, ExecError, Executor, HostPorts, LedgerPort, QmpConnector,
    ReserveRequest, Reserved, VfFacts, VmLink, VmPorts,
};
use vfplug_host::driver::FakeDriverBinder;
use vfplug_host::sim::{DriverProfile, SimNetdevOps, SimVfNetlink};
use vfplug_host::vmpod::{FakeMemlock, MemlockLimit};
use vfplug_qmp::testing::QmpPeer;
use vfplug_qmp::{Qmp, VersionInfo};

/// The pid the fake QEMUs are said to have (memlock is faked too).
pub const QEMU_PID: u32 = 4242;
/// Root ports per fake QEMU.
pub const PORTS: usize = 8;

pub fn pci(i: usize) -> PciAddress {
    PciAddress::new(0, 0x5e, 1 + (i / 8) as u8, (i % 8) as u8).unwrap()
}

// ---- the ledger port ---------------------------------------------------------------------------

/// The ledger as the executor sees it: in memory, or with every commit awaited on the agent's
/// journal (group commit, fdatasync) as vfplugd does.
pub struct BenchLedger {
    pub ledger: Mutex<Ledger>,
    journal: Option<(Arc<Journal>, std::thread::JoinHandle<()>)>,
    facts: BTreeMap<PciAddress, VfFacts>,
    /// Records committed (each awaited when the journal is on).
    pub commits: AtomicU64,
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for BenchLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchLedger").finish_non_exhaustive()
    }
}

impl BenchLedger {
    /// Stops the journal's writer (after the last commit).
    pub fn close(&mut self) {
        if let Some((j, w)) = self.journal.take() {
            j.close();
            w.join().unwrap();
        }
    }
}

impl LedgerPort for BenchLedger {
    async fn commit<F>(&self, plan: F) -> Result<Record, ExecError>
    where
        F: FnOnce(&Ledger) -> Result<Record, LedgerError> + Send,
    {
        let (r, ticket) = {
            let mut l = self.ledger.lock().unwrap();
            let r = plan(&l).map_err(|e| ExecError::ledger(&e))?;
            l.apply(&r).map_err(|e| ExecError::ledger(&e))?;
            let t = self.journal.as_ref().map(|(j, _)| j.enqueue([r.clone()]));
            (r, t)
        };
        self.commits.fetch_add(1, Ordering::Relaxed);
        if let (Some((j, _)), Some(t)) = (&self.journal, ticket) {
            j.durable(t)
                .await
                .map_err(|e| ExecError::internal("ledger write", e))?;
        }
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
        let pci = req
            .device
            .ok_or_else(|| ExecError::new(ErrorKind::InvalidConfig, "the bench names its VFs"))?;
        let r = self.commit(|l| l.plan_reserve(pci, &req.owner)).await?;
        Ok(Reserved {
            token: r
                .new_token()
                .ok_or_else(|| ExecError::new(ErrorKind::Internal, "no token"))?,
            facts: self.vf(pci)?,
        })
    }

    fn lease_ended(&self, _pci: PciAddress, _facts: Option<&VfFacts>) {}
}

/// Where the ledger lives.
#[derive(Clone, Debug)]
pub enum Store {
    /// In memory: commits cost nothing but the apply.
    Memory,
    /// The agent's journal in a temp dir under this directory (a disk, or tmpfs).
    Journal(PathBuf),
}

// ---- fake QEMU ---------------------------------------------------------------------------------

/// What one fake QEMU has: device id → the root port it sits in.
#[derive(Debug, Default)]
pub struct QemuDevices {
    pub devices: BTreeMap<String, String>,
}

/// A fake QEMU listening on a unix socket; every connection is served in its own task.
pub struct FakeQemu {
    pub socket: PathBuf,
    pub state: Arc<Mutex<QemuDevices>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn port(i: usize) -> String {
    format!("vfplug-rp{i}")
}

fn answer(
    state: &Mutex<QemuDevices>,
    execute: &str,
    args: Option<&Value>,
) -> Result<Value, String> {
    let mut s = state.lock().unwrap();
    let arg = |k: &str| {
        args.and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match execute {
        "query-memory-size-summary" => Ok(json!({"base-memory": 1u64 << 30})),
        "qom-list" => {
            let mut v: Vec<Value> = (0..PORTS)
                .map(|i| json!({"name": port(i), "type": "child<pcie-root-port>"}))
                .collect();
            v.extend(
                s.devices
                    .keys()
                    .map(|d| json!({"name": d, "type": "child<vfio-pci>"})),
            );
            Ok(Value::Array(v))
        }
        "query-pci" => {
            let devices: Vec<Value> = (0..PORTS)
                .map(|i| {
                    let behind: Vec<Value> = s
                        .devices
                        .iter()
                        .filter(|(_, p)| **p == port(i))
                        .map(|(d, _)| {
                            json!({"bus": i + 1, "slot": 0, "function": 0,
                                   "class_info": {"class": 512},
                                   "id": {"vendor": 32902, "device": 5580}, "qdev_id": d})
                        })
                        .collect();
                    json!({"bus": 0, "slot": i + 2, "function": 0, "class_info": {"class": 1540},
                           "id": {"vendor": 6966, "device": 12}, "qdev_id": port(i),
                           "pci_bridge": {"bus": {"number": 0, "secondary": i + 1,
                                                  "subordinate": i + 1},
                                          "devices": behind}})
                })
                .collect();
            Ok(json!([{"bus": 0, "devices": devices}]))
        }
        "device_add" => {
            let (id, bus) = (arg("id"), arg("bus"));
            if s.devices.values().any(|p| *p == bus) {
                return Err(format!(
                    "PCI: slot 0 function 0 not available for vfio-pci, in use by {bus}"
                ));
            }
            if s.devices.contains_key(&id) {
                return Err(format!("Duplicate device ID '{id}'"));
            }
            s.devices.insert(id, bus);
            Ok(json!({}))
        }
        "device_del" => {
            let id = arg("id");
            if s.devices.remove(&id).is_none() {
                return Err(format!("Device '{id}' not found"));
            }
            Ok(json!({}))
        }
        other => Err(format!("The command {other} has not been found")),
    }
}

async fn serve(stream: tokio::net::UnixStream, state: Arc<Mutex<QemuDevices>>) {
    let mut peer = QmpPeer::new(stream);
    let version = VersionInfo {
        qemu: vfplug_qmp::wire::QemuVersion {
            major: 10,
            minor: 0,
            micro: 2,
        },
        package: "vfplug bench".into(),
    };
    if peer.handshake(&version).await.is_err() {
        return;
    }
    while let Ok(Some(req)) = peer.next_request().await {
        let out = answer(&state, &req.execute, req.arguments.as_ref());
        let sent = match &out {
            Ok(v) => peer.reply(&req, v).await,
            Err(desc) => {
                let class = if desc.contains("not found") && req.execute == "device_del" {
                    "DeviceNotFound"
                } else {
                    "GenericError"
                };
                peer.reply_error(&req, class, desc).await
            }
        };
        if sent.is_err() {
            return;
        }
        // A guest that acknowledges at once.
        if req.execute == "device_del" && out.is_ok() {
            let id = req
                .arguments
                .as_ref()
                .and_then(|a| a.get("id"))
                .cloned()
                .unwrap_or_default();
            let data = json!({"device": id, "path": format!("/machine/peripheral/{}", id.as_str().unwrap_or_default())});
            if peer
                .send_event("DEVICE_DELETED", Some(&data))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

impl FakeQemu {
    pub fn start(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let state = Arc::new(Mutex::new(QemuDevices::default()));
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&st)));
            }
        });
        Self {
            socket: socket.to_path_buf(),
            state,
            task,
        }
    }

    /// The vfio-pci devices it has now.
    pub fn devices(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().devices.keys().cloned().collect()
    }
}

/// Connects the executor to the fake QEMU at the VM's socket path.
#[derive(Debug)]
struct Connector;

impl QmpConnector for Connector {
    fn connect<'a>(&'a self, vm: &'a VmRef) -> BoxFuture<'a, Result<VmLink, ExecError>> {
        Box::pin(async move {
            let q = Qmp::connect(Path::new(&vm.qmp_socket), Duration::from_secs(5))
                .await
                .map_err(|e| ExecError::new(ErrorKind::TryAgain, e.to_string()))?;
            Ok(VmLink {
                qmp: Arc::new(q),
                pid: Some(QEMU_PID),
            })
        })
    }

    fn exited<'a>(&'a self, _vm: &'a VmRef, _link: &'a VmLink) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

// ---- the node ----------------------------------------------------------------------------------

/// The executor on `vms` × `per_vm` vfio VFs of one simulated PF, one fake QEMU per VM.
pub struct Node {
    pub exec: Arc<Executor<BenchLedger>>,
    pub qemus: Vec<FakeQemu>,
    pub vms: Vec<VmRef>,
    pub per_vm: usize,
    _dir: tempfile::TempDir,
}

pub async fn node(vms: usize, per_vm: usize, store: Store) -> Node {
    let dir = tempfile::Builder::new()
        .prefix("vfb")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let config = vfplug_core::Config::parse(
        "pools:\n  - name: vm\n    deviceMode: vfio\n    selectors: { pfNames: [ens1f1] }\n",
    )
    .unwrap();
    let pool: PoolConfig = config.pools[0].clone();
    let n = vms * per_vm;
    let mut facts = BTreeMap::new();
    for i in 0..n {
        facts.insert(
            pci(i),
            VfFacts {
                pci: pci(i),
                pf_pci: PciAddress::new(0, 0x5e, 0, 0).unwrap(),
                pf_netdev: Some("ens1f1".into()),
                vf_index: i as u32,
                driver: Some("vfio-pci".into()),
                resource: "vfplug.io/vm".into(),
                pool: pool.clone(),
            },
        );
    }
    let mut ledger = Ledger::new();
    let present: BTreeSet<_> = facts.keys().copied().collect();
    let inventory = ledger.plan_inventory(&present);
    for r in &inventory {
        ledger.apply(r).unwrap();
    }
    let (journal, jdir) = match store {
        Store::Memory => (None, None),
        Store::Journal(base) => {
            std::fs::create_dir_all(&base).unwrap();
            let d = tempfile::tempdir_in(&base).unwrap();
            let (wal, rec) = Wal::<Ledger, Record>::open(d.path()).unwrap();
            assert!(rec.records.is_empty());
            let j = Journal::new();
            let w =
                spawn_writer(Arc::clone(&j), wal, Ledger::new(), 1024, SyncMode::Group).unwrap();
            let t = j.enqueue(inventory);
            j.durable(t).await.unwrap();
            (Some((j, w)), Some(d))
        }
    };
    let port = BenchLedger {
        ledger: Mutex::new(ledger),
        journal,
        facts,
        commits: AtomicU64::new(0),
        _dir: jdir,
    };
    let memlock = Arc::new(FakeMemlock::new([(QEMU_PID, MemlockLimit::both(64 << 20))]));
    let host = HostPorts {
        vf_netlink: Arc::new(SimVfNetlink::new(DriverProfile::default())),
        netdev: Arc::new(SimNetdevOps::default()),
        driver: Arc::new(FakeDriverBinder::new(
            (0..n).map(|i| (pci(i), Some("vfio-pci".to_string()))),
        )),
        sysfs_root: "/nonexistent-sysfs".into(),
        vm: Some(VmPorts {
            qmp: Arc::new(Connector),
            memlock,
            port_prefix: "vfplug-rp".into(),
            hostdev: Default::default(),
        }),
    };
    let mut qemus = Vec::new();
    let mut refs = Vec::new();
    for v in 0..vms {
        let sock = dir.path().join(format!("vm{v}.qmp"));
        qemus.push(FakeQemu::start(&sock));
        refs.push(VmRef {
            pod: PodRef::new("bench", format!("vm-{v}"), format!("uid-{v}")),
            qmp_socket: sock.display().to_string(),
            qmp_spec: "qmp/qmp.sock".into(),
        });
    }
    Node {
        exec: Arc::new(Executor::new(Arc::new(port), host)),
        qemus,
        vms: refs,
        per_vm,
        _dir: dir,
    }
}

impl Node {
    /// The CNI ADD of VF `j` of VM `v` (interface `net<j>`, VLAN 100 + j).
    pub fn add_request(&self, v: usize, j: usize) -> AddRequest {
        AddRequest {
            owner: Owner {
                pod: self.vms[v].pod.clone(),
                container_id: format!("sb-{v}"),
                ifname: format!("net{j}"),
            },
            network: "vm-net".into(),
            device: Some(pci(v * self.per_vm + j)),
            config: vfplug_core::VfConfig {
                vlan: Some(100 + j as u16),
                ..Default::default()
            },
            vm: Some(self.vms[v].clone()),
            unplug_wait: Duration::from_secs(5),
            ..Default::default()
        }
    }

    pub fn commits(&self) -> u64 {
        self.exec.ledger().commits.load(Ordering::Relaxed)
    }
}

/// p-quantile of sorted durations, in ms.
pub fn q(v: &[Duration], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// What [`attach_detach_all`] measured.
#[derive(Debug)]
pub struct Concurrent {
    /// Wall time from the first ADD to the last one's answer.
    pub attach_wall: Duration,
    /// The same for the DELs.
    pub detach_wall: Duration,
    /// Each ADD's own time, sorted.
    pub attach_each: Vec<Duration>,
    /// Each DEL's own time, sorted.
    pub detach_each: Vec<Duration>,
}

/// Every VF of every VM attached concurrently (one CNI ADD each), then every one detached
/// concurrently (one DEL each). Panics on any error and on any leak: a VF not Free at the end,
/// a device left in a fake QEMU, or a VF that was not in its own VM's QEMU while attached.
pub async fn attach_detach_all(node: &Node) -> Concurrent {
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for v in 0..node.vms.len() {
        for j in 0..node.per_vm {
            let exec = Arc::clone(&node.exec);
            let req = node.add_request(v, j);
            tasks.push(tokio::spawn(async move {
                let t = std::time::Instant::now();
                exec.add(req).await.map(|o| (o, t.elapsed()))
            }));
        }
    }
    let mut errors = Vec::new();
    let mut attach_each = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((o, d)) => {
                assert!(!o.existing);
                attach_each.push(d);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let attach_wall = t0.elapsed();
    assert!(
        errors.is_empty(),
        "{} ADDs failed: {errors:#?}",
        errors.len()
    );
    for (v, q) in node.qemus.iter().enumerate() {
        let want: BTreeSet<String> = (0..node.per_vm).map(|j| format!("vfplug-net{j}")).collect();
        assert_eq!(q.devices(), want, "VM {v}'s QEMU");
    }
    node.exec.ledger().read(|l| {
        for (p, s) in l.iter() {
            assert_eq!(
                s.kind(),
                vfplug_core::StateKind::Attached,
                "{p} after the ADDs"
            );
        }
    });

    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for v in 0..node.vms.len() {
        for j in 0..node.per_vm {
            let exec = Arc::clone(&node.exec);
            tasks.push(tokio::spawn(async move {
                let t = std::time::Instant::now();
                exec.del(
                    &format!("sb-{v}"),
                    &format!("net{j}"),
                    Duration::from_secs(5),
                )
                .await
                .map(|o| (o, t.elapsed()))
            }));
        }
    }
    let mut detach_each = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((o, d)) if o.finalized.released => detach_each.push(d),
            Ok((o, _)) => errors.push(format!("{:?} not released: {}", o.pci, o.finalized.note)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let detach_wall = t0.elapsed();
    assert!(
        errors.is_empty(),
        "{} DELs failed: {errors:#?}",
        errors.len()
    );
    node.exec.ledger().read(|l| {
        assert_eq!(l.len(), node.vms.len() * node.per_vm);
        for (p, s) in l.iter() {
            assert_eq!(*s, vfplug_core::VfState::Free, "{p} leaked");
        }
    });
    for (v, q) in node.qemus.iter().enumerate() {
        assert!(
            q.devices().is_empty(),
            "VM {v}'s QEMU still has {:?}",
            q.devices()
        );
    }
    attach_each.sort();
    detach_each.sort();
    Concurrent {
        attach_wall,
        detach_wall,
        attach_each,
        detach_each,
    }
}
