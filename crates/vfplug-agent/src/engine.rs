//! The agent: inventory → pools → ledger → kubelet, kept consistent by one reconcile loop.
//!
//! - One task owns every change of inventory, config and pool set (the reconcile loop); the
//!   device-plugin servers only read shared state, except Allocate, which records kubelet
//!   allocations in the ledger (in memory plus an unsynced WAL append: the kubelet's own
//!   checkpoint and PodResources are the durable source of those, so the Allocate path makes no
//!   disk-sync, netlink or API-server call).
//! - Every other ledger record is appended and synced before it is applied.
//! - Pools are keyed by their full resource name; a reload that leaves a pool's resource name
//!   alone keeps its kubelet registration, and only pushes a new device list if it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use vfplug_core::ledger::{Ledger, LedgerError, Record, VfState};
use vfplug_core::{
    AllocPolicy, Candidate, Config, DeviceMode, Inventory, PciAddress, PfLinkDown, PoolConfig,
    VfInfo, assign_pools,
};
use vfplug_host::driver::{DriverBinder, SysfsDriverBinder, VFIO_PCI};
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::watch::{HostEvent, WatchConfig, spawn_watcher};
use vfplug_kubelet::plugin::{
    AllocError, ContainerAlloc, PluginBackend, PluginDevice, PluginHandle, RegistrationMode,
    spawn_plugin,
};
use vfplug_kubelet::podresources::{PodResourcesState, spawn_poller};
use vfplug_kubelet::sriov;

use crate::metrics::{Metrics, PoolLabel, PoolState};
use crate::options::{AgentOptions, Registration};
use crate::wal::{Wal, WalError};

/// Compact the WAL into a snapshot after this many records.
const COMPACT_AFTER: usize = 1024;
/// A kubelet allocation not (yet) reported by PodResources is kept this long before it is
/// considered released (the container may not be created yet when PodResources is asked).
const KUBELET_ALLOC_GRACE: Duration = Duration::from_secs(60);

/// How often the per-state gauges are recomputed.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The pool config cannot be used at start.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong (names the key).
        message: String,
    },
    /// The ledger cannot be read or written.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The replayed ledger is inconsistent.
    #[error("replaying the ledger: {0}")]
    Replay(LedgerError),
    /// The first inventory scan failed.
    #[error("inventory: {0}")]
    Inventory(#[from] vfplug_host::HostError),
    /// A task panicked.
    #[error("internal task failed: {0}")]
    Join(String),
    /// The node API socket cannot be served.
    #[error("node API socket: {0}")]
    NodeSocket(String),
}

/// State shared by the reconcile loop and the pools' backends.
pub(crate) struct Shared {
    pub(crate) opts: AgentOptions,
    pub(crate) state: Mutex<State>,
    wal: Mutex<Wal<Ledger, Record>>,
    pub(crate) metrics: Metrics,
}

pub(crate) struct State {
    pub(crate) config: Arc<Config>,
    pub(crate) inventory: Inventory,
    pub(crate) ledger: Ledger,
    /// Pool membership: resource name → VFs.
    pub(crate) members: BTreeMap<String, Vec<PciAddress>>,
    /// When a VF was last given out by Allocate, or last seen in PodResources.
    kubelet_seen: HashMap<PciAddress, Instant>,
    /// Start of this process: the grace period for kubelet allocations learned before it.
    started: Instant,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic mid-update elsewhere; the state itself is still the last
    // consistent one we wrote (ledger changes are applied in one call), so keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Appends each record and applies it at once, so the in-memory ledger always equals what a
    /// replay of the log would give, even when an append fails half-way; then syncs if asked.
    /// Callers act on the records only after this returns `Ok`.
    pub(crate) fn commit(
        &self,
        st: &mut State,
        records: Vec<Record>,
        sync: bool,
    ) -> Result<(), WalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut wal = lock(&self.wal);
        for r in &records {
            wal.append(r, false)?;
            if let Err(e) = st.ledger.apply(r) {
                // The plan came from this very ledger under the same lock; a refusal is a bug.
                error!(error = %e, ?r, "ledger refused a record it planned");
            }
        }
        if sync {
            wal.sync()?;
        }
        if wal.records_since_snapshot() >= COMPACT_AFTER
            && let Err(e) = wal.compact(&st.ledger)
        {
            warn!(error = %e, "ledger compaction failed; will retry");
        }
        Ok(())
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    ready: watch::Receiver<bool>,
    registry: Arc<Registry>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.opts.node_name)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Loads the config and the ledger, scans the inventory, then starts the pools' kubelet
    /// servers and the reconcile loop. Errors here (bad config, damaged ledger, no sysfs) stop
    /// vfplugd with a message; later errors are logged and retried.
    pub async fn start(opts: AgentOptions, cancel: CancellationToken) -> Result<Self, AgentError> {
        let config = load_config(&opts.config_path)?;
        for w in &config.warnings {
            warn!(warning = %w, "config");
        }
        let (wal, recovered) = Wal::<Ledger, Record>::open(&opts.state_dir)?;
        let mut ledger = recovered.snapshot.unwrap_or_default();
        let replayed = recovered.records.len();
        for r in &recovered.records {
            ledger.apply(r).map_err(AgentError::Replay)?;
        }
        info!(state_dir = %opts.state_dir.display(), replayed, "ledger loaded");

        let scanner = SysfsInventory::new(opts.sysfs_root.clone());
        let inventory = tokio::task::spawn_blocking(move || scanner.scan())
            .await
            .map_err(|e| AgentError::Join(e.to_string()))??;
        info!(
            pfs = inventory.pfs.len(),
            vfs = inventory.vfs.len(),
            "inventory scanned"
        );

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                config: Arc::new(config),
                inventory: Inventory::default(),
                ledger,
                members: BTreeMap::new(),
                kubelet_seen: HashMap::new(),
                started: Instant::now(),
            }),
            wal: Mutex::new(wal),
            metrics: Metrics::default(),
            opts,
        });
        let mut registry = Registry::default();
        shared.metrics.register(&mut registry);
        // The first inventory is in the ledger before the node API answers anything.
        apply_inventory(&shared, inventory)?;

        let (ready_tx, ready_rx) = watch::channel(false);
        let node_api = match shared.opts.node_socket.clone() {
            Some(path) => Some(crate::node::serve(
                Arc::clone(&shared),
                ready_rx.clone(),
                &path,
                cancel.child_token(),
            )?),
            None => None,
        };
        let main = tokio::spawn(run(Arc::clone(&shared), cancel, ready_tx));
        let task = tokio::spawn(async move {
            let result = main.await.map_err(|e| AgentError::Join(e.to_string()))?;
            if let Some(api) = node_api {
                // The loop's cancellation token is the node API's parent: it is stopping too.
                if let Err(e) = api.await {
                    warn!(error = %e, "node API task failed");
                }
            }
            result
        });
        Ok(Self {
            ready: ready_rx,
            registry: Arc::new(registry),
            task,
        })
    }

    /// True once the inventory is loaded and every pool is registered with the kubelet.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The metrics registry (for `/metrics`).
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// Waits until the agent stops (after cancellation, or on a fatal error).
    pub async fn wait(self) -> Result<(), AgentError> {
        self.task
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?
    }
}

fn load_config(path: &Path) -> Result<Config, AgentError> {
    let err = |message: String| AgentError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let config = Config::parse(&text).map_err(|e| err(e.to_string()))?;
    config.validate().map_err(|e| err(e.to_string()))?;
    Ok(config)
}

/// One pool's kubelet server and the channel feeding it.
struct PoolRuntime {
    pool: PoolConfig,
    devices: watch::Sender<Vec<PluginDevice>>,
    cancel: CancellationToken,
    handle: PluginHandle,
}

async fn run(
    shared: Arc<Shared>,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<(), AgentError> {
    let opts = shared.opts.clone();
    let mut pools: BTreeMap<String, PoolRuntime> = BTreeMap::new();

    let mut watch_cfg = WatchConfig::new(opts.sysfs_root.clone());
    watch_cfg.resync = opts.resync_interval;
    watch_cfg.carrier_poll = opts.poll_interval;
    if watch_cfg.fingerprint_poll.is_some() && opts.sysfs_root != Path::new("/sys") {
        watch_cfg.fingerprint_poll = Some(opts.poll_interval);
    }
    let mut host_events = spawn_watcher(watch_cfg, cancel.child_token());
    let podres = spawn_poller(
        opts.pod_resources_socket(),
        opts.podresources_interval,
        cancel.child_token(),
    );
    let mut podres_state = podres.state();

    sync_pools(&shared, &mut pools, &cancel);
    bind_vfio_where_configured(&shared).await;

    let mut config_stamp = file_stamp(&opts.config_path);
    // Metrics walk every VF under the state lock that Allocate takes: once a second is plenty
    // for Prometheus and keeps that work off the Allocate path's way.
    let mut metrics_at = Instant::now() - METRICS_EVERY;
    let mut tick = tokio::time::interval(opts.poll_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = host_events.recv() => {
                let Some(ev) = ev else {
                    // The watcher only ends on cancellation.
                    break;
                };
                // Carrier flips only change health: apply them in memory at once (the health
                // path must reach the kubelet fast). Anything else ends in one rescan for the
                // whole burst.
                let mut rescan = false;
                let mut pending = Some(ev);
                while let Some(ev) = pending.take().or_else(|| host_events.try_recv().ok()) {
                    match ev {
                        HostEvent::CarrierChanged { pf_netdev, up } => {
                            set_carrier(&shared, &pf_netdev, up);
                        }
                        other => {
                            debug!(ev = ?other, "host event");
                            rescan = true;
                        }
                    }
                }
                if rescan {
                    match rescan_inventory(&shared).await {
                        Ok(()) => bind_vfio_where_configured(&shared).await,
                        Err(e) => warn!(error = %e, "inventory rescan failed; keeping the last one"),
                    }
                }
                push_devices(&shared, &pools);
            }
            changed = podres_state.changed() => {
                if changed.is_err() {
                    continue;
                }
                let snapshot = podres_state.borrow_and_update().clone();
                if let Err(e) = learn_kubelet_allocations(&shared, &snapshot) {
                    error!(error = %e, "cannot persist ledger changes");
                }
                push_devices(&shared, &pools);
            }
            _ = tick.tick() => {
                let stamp = file_stamp(&opts.config_path);
                if stamp != config_stamp {
                    config_stamp = stamp;
                    reload_config(&shared, &mut pools, &cancel);
                    bind_vfio_where_configured(&shared).await;
                }
                let all_registered = pools.values().all(|p| *p.handle.registered().borrow());
                ready.send_if_modified(|r| {
                    let changed = *r != all_registered;
                    *r = all_registered;
                    changed
                });
                if metrics_at.elapsed() >= METRICS_EVERY {
                    metrics_at = Instant::now();
                    update_metrics(&shared, &pools);
                }
            }
        }
    }

    info!("shutting down: stopping device-plugin servers");
    let _ = ready.send(false);
    for (_, p) in std::mem::take(&mut pools) {
        p.cancel.cancel();
        p.handle.join().await;
    }
    podres.join().await;
    if let Err(e) = lock(&shared.wal).sync() {
        warn!(error = %e, "final ledger sync failed");
    }
    Ok(())
}

/// Records a PF carrier change reported by the watcher (the next scan reads it from sysfs too).
fn set_carrier(shared: &Shared, pf_netdev: &str, up: bool) {
    let mut st = lock(&shared.state);
    for pf in st.inventory.pfs.values_mut() {
        if pf.netdev.as_deref() == Some(pf_netdev) && pf.carrier != Some(up) {
            info!(pf = %pf.pci, netdev = pf_netdev, up, "PF carrier changed");
            pf.carrier = Some(up);
        }
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.modified().ok()?, md.len()))
}

async fn rescan_inventory(shared: &Arc<Shared>) -> Result<(), AgentError> {
    let scanner = SysfsInventory::new(shared.opts.sysfs_root.clone());
    let inv = tokio::task::spawn_blocking(move || scanner.scan())
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??;
    apply_inventory(shared, inv)
}

/// Brings the ledger and pool membership in line with a fresh inventory.
fn apply_inventory(shared: &Shared, inv: Inventory) -> Result<(), AgentError> {
    shared.metrics.scans.inc();
    let mut st = lock(&shared.state);
    let present: BTreeSet<PciAddress> = inv.vfs.keys().copied().collect();
    let records = st.ledger.plan_inventory(&present);
    shared.commit(&mut st, records, true)?;
    st.members = membership(&st.config, &inv);
    st.inventory = inv;
    Ok(())
}

fn membership(config: &Config, inv: &Inventory) -> BTreeMap<String, Vec<PciAddress>> {
    let by_name = assign_pools(config, inv);
    config
        .pools
        .iter()
        .map(|p| {
            (
                config.resource_name(p),
                by_name.get(&p.name).cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn reload_config(
    shared: &Arc<Shared>,
    pools: &mut BTreeMap<String, PoolRuntime>,
    cancel: &CancellationToken,
) {
    let path = &shared.opts.config_path;
    match load_config(path) {
        Ok(config) => {
            for w in &config.warnings {
                warn!(warning = %w, "config");
            }
            {
                let mut st = lock(&shared.state);
                st.members = membership(&config, &st.inventory);
                st.config = Arc::new(config);
            }
            info!(path = %path.display(), "config reloaded");
            sync_pools(shared, pools, cancel);
        }
        Err(e) => {
            shared.metrics.config_reload_errors.inc();
            error!(error = %e, "config reload rejected; the previous config stays in force");
        }
    }
}

/// Starts servers for new pools, stops removed ones, and pushes device lists to all.
fn sync_pools(
    shared: &Arc<Shared>,
    pools: &mut BTreeMap<String, PoolRuntime>,
    cancel: &CancellationToken,
) {
    let config = Arc::clone(&lock(&shared.state).config);
    let wanted: BTreeMap<String, PoolConfig> = config
        .pools
        .iter()
        .map(|p| (config.resource_name(p), p.clone()))
        .collect();

    let gone: Vec<String> = pools
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    for name in gone {
        if let Some(p) = pools.remove(&name) {
            info!(resource = %name, "pool removed from config: unregistering");
            p.cancel.cancel();
            tokio::spawn(p.handle.join());
        }
    }
    for (resource, pool) in wanted {
        if let Some(rt) = pools.get_mut(&resource) {
            rt.pool = pool;
            continue;
        }
        let devices = pool_devices(&lock(&shared.state), &resource, &pool);
        let (tx, rx) = watch::channel(devices);
        let backend = Arc::new(PoolBackend {
            shared: Arc::clone(shared),
            resource: resource.clone(),
            devices: rx,
        });
        let mut pc = shared.opts.plugin_config(pool.name.clone());
        pc.mode = match shared.opts.registration {
            Registration::Auto => RegistrationMode::Auto,
            Registration::Legacy => RegistrationMode::Legacy,
            Registration::PluginsRegistry => RegistrationMode::PluginsRegistry,
        };
        let token = cancel.child_token();
        let handle = spawn_plugin(pc, backend, token.clone());
        info!(%resource, "pool started");
        pools.insert(
            resource,
            PoolRuntime {
                pool,
                devices: tx,
                cancel: token,
                handle,
            },
        );
    }
    push_devices(shared, pools);
}

/// Recomputes every pool's device list and sends it where it changed.
fn push_devices(shared: &Shared, pools: &BTreeMap<String, PoolRuntime>) {
    let st = lock(&shared.state);
    for (resource, rt) in pools {
        let devices = pool_devices(&st, resource, &rt.pool);
        rt.devices.send_if_modified(|cur| {
            if *cur == devices {
                false
            } else {
                *cur = devices;
                true
            }
        });
    }
}

/// Whether a VF may be handed out by the kubelet right now.
pub(crate) fn vf_healthy(st: &State, pool: &PoolConfig, vf: &VfInfo) -> bool {
    let held_elsewhere = !matches!(
        st.ledger.get(&vf.pci),
        None | Some(VfState::Free) | Some(VfState::KubeletAllocated { .. })
    );
    if held_elsewhere {
        return false;
    }
    if pool.health.pf_link_down == PfLinkDown::Unhealthy
        && st.inventory.pf_of(vf).and_then(|pf| pf.carrier) == Some(false)
    {
        return false;
    }
    driver_fits(pool, vf.driver.as_deref())
}

/// A VF whose driver does not match the pool's mode is not usable as advertised.
pub(crate) fn driver_fits(pool: &PoolConfig, driver: Option<&str>) -> bool {
    match (pool.device_mode, driver) {
        (DeviceMode::Vfio, Some(d)) => d == VFIO_PCI,
        (DeviceMode::Vfio, None) => false,
        (DeviceMode::Netdev, Some(d)) => !matches!(d, VFIO_PCI | "igb_uio" | "uio_pci_generic"),
        (DeviceMode::Netdev, None) => false,
    }
}

fn pool_devices(st: &State, resource: &str, pool: &PoolConfig) -> Vec<PluginDevice> {
    let Some(members) = st.members.get(resource) else {
        return Vec::new();
    };
    members
        .iter()
        .filter_map(|pci| st.inventory.vfs.get(pci))
        .map(|vf| PluginDevice {
            id: vf.pci.to_string(),
            healthy: vf_healthy(st, pool, vf),
            numa_node: if pool.exclude_topology {
                None
            } else {
                vf.numa_node
            },
        })
        .collect()
}

/// Turns PodResources' view into ledger facts: devices the kubelet reports are
/// KubeletAllocated; KubeletAllocated devices it no longer reports (after a grace period) are
/// Free again.
fn learn_kubelet_allocations(shared: &Shared, pr: &PodResourcesState) -> Result<(), WalError> {
    let Some(allocs) = &pr.allocations else {
        return Ok(());
    };
    let mut st = lock(&shared.state);
    let ours: BTreeSet<&String> = st.members.keys().collect();
    let mut reported: BTreeMap<PciAddress, String> = BTreeMap::new();
    for a in allocs.iter().filter(|a| ours.contains(&a.resource_name)) {
        for id in &a.device_ids {
            if let Ok(pci) = id.parse::<PciAddress>() {
                reported.insert(pci, format!("{}/{}", a.namespace, a.pod));
            }
        }
    }
    let now = Instant::now();
    let mut records = Vec::new();
    for (pci, pod) in &reported {
        st.kubelet_seen.insert(*pci, now);
        match st.ledger.get(pci) {
            Some(VfState::Free | VfState::KubeletAllocated { .. }) => {
                match st.ledger.plan_kubelet_allocate(*pci, Some(pod)) {
                    Ok(r) => records.push(r),
                    Err(LedgerError::NoChange { .. }) => {}
                    Err(e) => debug!(%pci, error = %e, "cannot record kubelet allocation"),
                }
            }
            None => {}
            Some(other) => warn!(%pci, state = ?other, %pod,
                "kubelet reports a VF that vfplug holds for another owner; it stays fenced"),
        }
    }
    let grace_from = st.started;
    let stale: Vec<PciAddress> = st
        .ledger
        .iter()
        .filter(|(pci, s)| {
            matches!(s, VfState::KubeletAllocated { .. }) && !reported.contains_key(pci)
        })
        .filter(|(pci, _)| {
            let seen = st.kubelet_seen.get(pci).copied().unwrap_or(grace_from);
            now.duration_since(seen) >= KUBELET_ALLOC_GRACE
        })
        .map(|(pci, _)| *pci)
        .collect();
    for pci in stale {
        match st.ledger.plan_kubelet_release(pci) {
            Ok(r) => {
                info!(%pci, "kubelet no longer reports the VF: back to Free");
                records.push(r);
            }
            Err(e) => debug!(%pci, error = %e, "cannot release kubelet allocation"),
        }
        st.kubelet_seen.remove(&pci);
    }
    shared.commit(&mut st, records, true)
}

/// Binds Free VFs of `bindVfio` pools to vfio-pci (outside the state lock).
async fn bind_vfio_where_configured(shared: &Arc<Shared>) {
    let todo: Vec<PciAddress> = {
        let st = lock(&shared.state);
        st.config
            .pools
            .iter()
            .filter(|p| p.bind_vfio)
            .flat_map(|p| {
                st.members
                    .get(&st.config.resource_name(p))
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|pci| matches!(st.ledger.get(pci), None | Some(VfState::Free)))
            .filter(|pci| {
                st.inventory.vfs.get(pci).and_then(|v| v.driver.as_deref()) != Some(VFIO_PCI)
            })
            .collect()
    };
    if todo.is_empty() {
        return;
    }
    let root = shared.opts.sysfs_root.clone();
    let result = tokio::task::spawn_blocking(move || {
        let binder = SysfsDriverBinder::new(root);
        for pci in todo {
            match binder.bind_vfio(pci) {
                Ok(()) => info!(%pci, "bound to vfio-pci"),
                Err(e) => warn!(%pci, error = %e, "cannot bind to vfio-pci; VF stays unhealthy"),
            }
        }
    })
    .await;
    if let Err(e) = result {
        error!(error = %e, "vfio binding task failed");
    }
}

fn update_metrics(shared: &Shared, pools: &BTreeMap<String, PoolRuntime>) {
    let st = lock(&shared.state);
    shared.metrics.vfs.clear();
    shared.metrics.advertised.clear();
    for (resource, rt) in pools {
        let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
        for pci in st.members.get(resource).into_iter().flatten() {
            let name = st
                .ledger
                .get(pci)
                .map_or_else(|| "free".to_owned(), |s| s.kind().to_string());
            *by_state.entry(name).or_default() += 1;
        }
        for (state, n) in by_state {
            shared
                .metrics
                .vfs
                .get_or_create(&PoolState {
                    pool: resource.clone(),
                    state,
                })
                .set(n);
        }
        let devs = rt.devices.borrow();
        let healthy = devs.iter().filter(|d| d.healthy).count() as i64;
        for (state, n) in [
            ("healthy", healthy),
            ("unhealthy", devs.len() as i64 - healthy),
        ] {
            shared
                .metrics
                .advertised
                .get_or_create(&PoolState {
                    pool: resource.clone(),
                    state: state.into(),
                })
                .set(n);
        }
    }
}

/// The kubelet-facing side of one pool.
struct PoolBackend {
    shared: Arc<Shared>,
    resource: String,
    devices: watch::Receiver<Vec<PluginDevice>>,
}

impl PoolBackend {
    fn label(&self) -> PoolLabel {
        PoolLabel {
            pool: self.resource.clone(),
        }
    }
}

impl PluginBackend for PoolBackend {
    fn resource_name(&self) -> &str {
        &self.resource
    }

    fn devices(&self) -> watch::Receiver<Vec<PluginDevice>> {
        self.devices.clone()
    }

    fn allocate(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
        let result = self.allocate_inner(req);
        match &result {
            Ok(_) => self
                .shared
                .metrics
                .allocations
                .get_or_create(&self.label())
                .inc(),
            Err(e) => {
                warn!(resource = %self.resource, error = %e, "Allocate refused");
                self.shared
                    .metrics
                    .allocation_errors
                    .get_or_create(&self.label())
                    .inc()
            }
        };
        result
    }

    fn preferred(&self, available: &[String], must_include: &[String], size: usize) -> Vec<String> {
        let st = lock(&self.shared.state);
        let Some(pool) = st
            .config
            .pools
            .iter()
            .find(|p| st.config.resource_name(p) == self.resource)
        else {
            return Vec::new();
        };
        let policy: AllocPolicy = pool.policy;
        let cands: Vec<Candidate> = available
            .iter()
            .filter_map(|id| id.parse::<PciAddress>().ok())
            .filter_map(|pci| st.inventory.vfs.get(&pci))
            .map(|vf| Candidate {
                pci: vf.pci,
                pf: vf.pf,
                numa: vf.numa_node,
            })
            .collect();
        let must: Vec<PciAddress> = must_include
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        vfplug_core::preferred(policy, &cands, &must, size)
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

impl PoolBackend {
    fn allocate_inner(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
        let shared = &self.shared;
        let mut st = lock(&shared.state);
        let config = Arc::clone(&st.config);
        let pool = config
            .pools
            .iter()
            .find(|p| config.resource_name(p) == self.resource)
            .ok_or_else(|| AllocError::Internal(format!("pool {} is gone", self.resource)))?;
        let mut params = sriov::SriovAllocParams::new(config.prefix_of(pool), pool.name.clone());
        params.cdi = false;
        let members: BTreeSet<PciAddress> = st
            .members
            .get(&self.resource)
            .into_iter()
            .flatten()
            .copied()
            .collect();

        let mut out = Vec::with_capacity(req.len());
        let mut records = Vec::new();
        let mut planned = BTreeSet::new();
        for ids in req {
            let mut devs = Vec::with_capacity(ids.len());
            for id in ids {
                let pci: PciAddress = id
                    .parse()
                    .map_err(|_| AllocError::UnknownDevice(id.clone()))?;
                if !members.contains(&pci) {
                    return Err(AllocError::UnknownDevice(id.clone()));
                }
                let vf = st
                    .inventory
                    .vfs
                    .get(&pci)
                    .ok_or_else(|| AllocError::UnknownDevice(id.clone()))?;
                match st.ledger.get(&pci) {
                    None | Some(VfState::Free) => {
                        if planned.insert(pci) {
                            let r = st.ledger.plan_kubelet_allocate(pci, None).map_err(|e| {
                                AllocError::Unavailable {
                                    id: id.clone(),
                                    reason: e.to_string(),
                                }
                            })?;
                            records.push(r);
                        }
                    }
                    // The kubelet re-allocates devices it already holds (e.g. after its restart).
                    Some(VfState::KubeletAllocated { .. }) => {}
                    Some(other) => {
                        return Err(AllocError::Unavailable {
                            id: id.clone(),
                            reason: format!(
                                "held by vfplug ({}), not by the kubelet",
                                other.kind()
                            ),
                        });
                    }
                }
                let dev = match pool.device_mode {
                    DeviceMode::Vfio => {
                        let group = vf.iommu_group.ok_or_else(|| AllocError::Unavailable {
                            id: id.clone(),
                            reason: "vfio mode but the VF has no IOMMU group".into(),
                        })?;
                        sriov::SriovDevice::vfio(id.clone(), group)
                    }
                    DeviceMode::Netdev => sriov::SriovDevice::netdev(id.clone()),
                }
                .with_pf(vf.pf.to_string());
                devs.push(dev);
            }
            if pool.device_mode == DeviceMode::Vfio {
                sriov::check_vfio_nodes(&shared.opts.dev_root, &devs)
                    .map_err(|e| AllocError::Internal(e.to_string()))?;
            }
            let alloc = sriov::container_alloc(&params, &devs)
                .map_err(|e| AllocError::Internal(e.to_string()))?;
            for d in &devs {
                if let Err(e) =
                    sriov::write_device_info(&shared.opts.device_info_dir, &self.resource, d)
                {
                    warn!(pci = %d.pci, error = %e, "cannot write the device-info file");
                }
            }
            out.push(alloc);
        }
        // Unsynced append: see the module docs.
        shared
            .commit(&mut st, records, false)
            .map_err(|e| AllocError::Internal(format!("ledger: {e}")))?;
        let now = Instant::now();
        for pci in planned {
            st.kubelet_seen.insert(pci, now);
        }
        Ok(out)
    }
}
