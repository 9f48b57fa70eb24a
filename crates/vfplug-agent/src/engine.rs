//! The agent: inventory → pools → ledger → kubelet, kept consistent by one reconcile loop.
//!
//! - [`Shared`] holds the state (config, inventory, pool membership, the live ledger) under one
//!   *short* lock: nothing under it waits for the disk. Ledger records are applied there and
//!   queued to the journal ([`crate::store`]); a caller that acts on a record awaits its
//!   ticket after dropping the lock (group commit).
//! - One task owns every change of inventory, config and pool set (the reconcile loop, here);
//!   it also pushes every ledger change to the kubelet at once, so a VF taken through the node
//!   API turns Unhealthy at the kubelet before anyone else can be handed it.
//! - [`crate::pools`]: membership and health; [`crate::kubelet`]: Allocate and PodResources;
//!   [`crate::ports`] + `vfplug-executor`: the CNI sagas; [`crate::node`]: the node API adapter.
//! - Critical tasks (the loop, the inventory watcher, the ledger journal, the node API) are
//!   supervised: if one stops, the agent stops with [`AgentError::Critical`] and vfplugd exits
//!   non-zero instead of serving half.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use vfplug_core::ledger::{Ledger, LedgerError, Record, VfState};
use vfplug_core::{Config, Inventory, PciAddress};
use vfplug_executor::{Executor, HostPorts};
use vfplug_host::driver::SysfsDriverBinder;
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::watch::{HostEvent, WatchConfig, spawn_watcher};
use vfplug_kubelet::podresources::spawn_poller;

use crate::kubelet::learn_kubelet_allocations;
use crate::metrics::Metrics;
use crate::options::AgentOptions;
use crate::pools::{
    PoolRuntime, bind_vfio_where_configured, membership, push_devices, push_devices_of, sync_pools,
    update_metrics,
};
use crate::ports::{AgentExecutor, AgentLedger};
use crate::state::{Shared, State, lock};
use crate::store::{Journal, StoreError, Ticket, spawn_writer};
use crate::wal::{Wal, WalError};

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
    /// A task the daemon cannot work without stopped (node API, inventory watcher, ledger
    /// journal): vfplugd exits rather than serve half.
    #[error("critical task stopped: {0}")]
    Critical(String),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    node: crate::node::NodeHandle,
    ready: watch::Receiver<bool>,
    registry: Arc<Registry>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    /// Loads the config and the ledger, scans the inventory, finishes half-done attachments,
    /// then serves the node API and starts the pools' kubelet servers and the reconcile loop.
    /// Errors here (bad config, damaged ledger, no sysfs) stop vfplugd with a message; later
    /// errors are logged and retried, except a critical task stopping (see the module docs).
    pub async fn start(opts: AgentOptions, cancel: CancellationToken) -> Result<Self, AgentError> {
        let config = load_config(&opts)?;
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
        let journal = Journal::new();
        let writer = spawn_writer(
            Arc::clone(&journal),
            wal,
            ledger.clone(),
            opts.compact_after,
            opts.sync_mode,
        )
        .map_err(|e| AgentError::Join(format!("starting the ledger writer: {e}")))?;

        let scanner = SysfsInventory::new(opts.sysfs_root.clone());
        let inventory = tokio::task::spawn_blocking(move || scanner.scan())
            .await
            .map_err(|e| AgentError::Join(e.to_string()))??;
        info!(
            pfs = inventory.pfs.len(),
            vfs = inventory.vfs.len(),
            "inventory scanned"
        );

        let host = HostPorts {
            vf_netlink: Arc::clone(&opts.vf_netlink),
            netdev: Arc::clone(&opts.netdev_ops),
            driver: opts
                .driver_binder
                .clone()
                .unwrap_or_else(|| Arc::new(SysfsDriverBinder::new(opts.sysfs_root.clone()))),
            sysfs_root: opts.sysfs_root.clone(),
            vm: Some(vfplug_executor::VmPorts {
                qmp: Arc::new(crate::ports::PodQmp::new(
                    opts.kubelet_dir.clone(),
                    opts.qmp_trusted_uids.clone(),
                )),
                memlock: opts.memlock.clone().unwrap_or_else(|| {
                    Arc::new(vfplug_host::vmpod::PrlimitMemlock::new("/proc".into()))
                }),
                port_prefix: opts.vm_port_prefix.clone(),
                hostdev: opts.vm_hostdev.clone(),
            }),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                config: Arc::new(config),
                inventory: Inventory::default(),
                ledger,
                members: BTreeMap::new(),
                kubelet_seen: HashMap::new(),
                started: Instant::now(),
            }),
            journal: Arc::clone(&journal),
            metrics: Metrics::default(),
            health_dirty: Mutex::default(),
            health_changed: watch::Sender::new(0),
            opts,
        });
        let mut registry = Registry::default();
        shared.metrics.register(&mut registry);
        // The first inventory is in the ledger before the node API answers anything.
        let t = apply_inventory(&shared, inventory);
        journal.durable(t).await.map_err(store_failed)?;

        let executor: Arc<AgentExecutor> = Arc::new(Executor::new(
            Arc::new(AgentLedger::new(Arc::clone(&shared))),
            host,
        ));
        // Half-done ADDs of a previous run are undone before any new CNI call is served.
        executor.recover().await;
        // Hot-plugs owed to VMs whose QEMU was not running when their ADD answered: waited
        // for again.
        executor.resume_owed_attaches();
        // VMs with VFs in (or on their way into or out of) their guest: reconnect and diff
        // against QEMU in the background (a VM whose QEMU is gone is finished there too).
        for vm in vms_in_ledger(&shared) {
            let exec = Arc::clone(&executor);
            tokio::spawn(
                async move {
                    if let Err(e) = exec.vm_reconcile(&vm).await {
                        warn!(%vm, error = %e, "VM not reachable at start; its next call reconciles");
                    }
                }
                .instrument(info_span!("vm_start_reconcile")),
            );
        }

        let (ready_tx, ready_rx) = watch::channel(false);
        let node = crate::node::NodeHandle::new(Arc::clone(&shared), Arc::clone(&executor));
        let node_api = match shared.opts.node_socket.clone() {
            Some(path) => Some(crate::node::serve(
                Arc::clone(&shared),
                Arc::clone(&executor),
                &path,
                cancel.child_token(),
            )?),
            None => None,
        };
        let main = tokio::spawn(
            run(Arc::clone(&shared), cancel.clone(), ready_tx).instrument(info_span!("reconcile")),
        );
        let task = tokio::spawn(
            supervise(main, node_api, journal, writer, cancel).instrument(info_span!("agent")),
        );
        Ok(Self {
            node,
            ready: ready_rx,
            registry: Arc::new(registry),
            task,
        })
    }

    /// True once the inventory is loaded and every pool is registered with the kubelet, and
    /// while every critical task runs.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The node API in process (for the Domain controller).
    pub fn node(&self) -> crate::node::NodeHandle {
        self.node.clone()
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

/// The VMs the ledger has VFs in (attaching, attached or detaching).
fn vms_in_ledger(shared: &Shared) -> Vec<vfplug_core::VmRef> {
    let st = lock(&shared.state);
    let mut vms: Vec<vfplug_core::VmRef> = st
        .ledger
        .iter()
        .filter_map(|(_, s)| match s {
            VfState::Attaching { vm, .. }
            | VfState::Attached { vm, .. }
            | VfState::Detaching { vm, .. } => Some(vm.clone()),
            _ => None,
        })
        .collect();
    vms.sort();
    vms.dedup();
    vms
}

fn store_failed(e: StoreError) -> AgentError {
    AgentError::Critical(e.to_string())
}

/// Waits for the reconcile loop; stops everything (and fails) when the node API server or the
/// ledger journal stops before a shutdown was asked for.
async fn supervise(
    mut main: JoinHandle<Result<(), AgentError>>,
    node_api: Option<JoinHandle<Result<(), String>>>,
    journal: Arc<Journal>,
    writer: std::thread::JoinHandle<()>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let mut progress = journal.progress();
    let node_api_done = async {
        match node_api {
            Some(h) => h.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(node_api_done);
    let mut failure: Option<AgentError> = None;
    let mut api_finished = false;
    let result = tokio::select! {
        r = &mut main => Some(r),
        r = &mut node_api_done => {
            api_finished = true;
            if !cancel.is_cancelled() {
                let why = match r {
                    Ok(Ok(())) => "the node API server stopped".to_owned(),
                    Ok(Err(e)) => format!("the node API server failed: {e}"),
                    Err(e) => format!("the node API task panicked: {e}"),
                };
                error!(%why, "stopping vfplugd");
                failure = Some(AgentError::Critical(why));
            }
            None
        }
        f = progress.wait_for(|d| d.failed.is_some()) => {
            let why = f.ok().and_then(|d| d.failed.clone()).map_or_else(
                || "the ledger journal stopped".to_owned(),
                |m| format!("the ledger journal failed: {m}"),
            );
            error!(%why, "stopping vfplugd");
            failure = Some(AgentError::Critical(why));
            None
        }
    };
    cancel.cancel();
    let main_result = match result {
        Some(r) => r.map_err(|e| AgentError::Join(e.to_string()))?,
        None => main.await.map_err(|e| AgentError::Join(e.to_string()))?,
    };
    // The node API removes its socket as it stops: wait for that before saying "stopped".
    if !api_finished && let Err(e) = (&mut node_api_done).await {
        warn!(error = %e, "node API task failed while stopping");
    }
    journal.close();
    if tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?
        .is_err()
    {
        warn!("the ledger writer thread panicked");
    }
    match failure {
        Some(e) => Err(e),
        None => main_result,
    }
}

fn load_config(opts: &AgentOptions) -> Result<Config, AgentError> {
    let path = &opts.config_path;
    let err = |message: String| AgentError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let config = Config::parse_with_prefix(&text, opts.resource_prefix.as_deref())
        .map_err(|e| err(e.to_string()))?;
    config.validate().map_err(|e| err(e.to_string()))?;
    Ok(config)
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
    let mut health_changes = shared.health_changed.subscribe();
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
    let metrics_every = opts.metrics_interval;
    let mut metrics_at: Option<Instant> = None;
    let mut registered: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut failure = None;
    let mut tick = tokio::time::interval(opts.poll_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = health_changes.changed() => {
                if changed.is_ok() {
                    // Reservations turn Unhealthy and releases Healthy at the kubelet at once;
                    // only the pools of the VFs concerned are recomputed.
                    let dirty = shared.take_health_dirty();
                    push_devices_of(&shared, &pools, &dirty);
                }
            }
            ev = host_events.recv() => {
                let Some(ev) = ev else {
                    // The watcher only ends on cancellation: anything else is fatal.
                    if !cancel.is_cancelled() {
                        error!("the inventory watcher stopped; stopping vfplugd");
                        failure = Some(AgentError::Critical("the inventory watcher stopped".into()));
                    }
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
                learn_kubelet_allocations(&shared, &snapshot);
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
                // vfplug_registrations: what the plugin counted since the last tick, confirmed
                // (the kubelet opened ListAndWatch) and failed (refused, or never opened).
                for (resource, p) in &pools {
                    let m = p.handle.metrics().snapshot();
                    let (ok0, failed0) = registered
                        .insert(resource.clone(), (m.registrations_confirmed, m.registrations_failed))
                        .unwrap_or((0, 0));
                    for (result, n) in [
                        ("confirmed", m.registrations_confirmed.saturating_sub(ok0)),
                        ("failed", m.registrations_failed.saturating_sub(failed0)),
                    ] {
                        if n > 0 {
                            shared
                                .metrics
                                .registrations
                                .get_or_create(&crate::metrics::RegistrationLabel {
                                    pool: resource.clone(),
                                    result: result.into(),
                                })
                                .inc_by(n);
                        }
                    }
                }
                ready.send_if_modified(|r| {
                    let changed = *r != all_registered;
                    *r = all_registered;
                    changed
                });
                if metrics_at.is_none_or(|t| t.elapsed() >= metrics_every) {
                    metrics_at = Some(Instant::now());
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
    crate::devices::remove_cdi_specs(&shared.opts, &[]);
    podres.join().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
    let _ticket = apply_inventory(shared, inv);
    Ok(())
}

/// Brings the ledger and pool membership in line with a fresh inventory.
/// Nobody acts on these records directly; the returned ticket lets the start wait for them.
fn apply_inventory(shared: &Shared, inv: Inventory) -> Ticket {
    shared.metrics.scans.inc();
    let mut st = lock(&shared.state);
    let present: BTreeSet<PciAddress> = inv.vfs.keys().copied().collect();
    let records = st.ledger.plan_inventory(&present);
    for r in &records {
        log_inventory_record(r, &st.ledger);
    }
    for e in shared.commit_all_lenient(&mut st, records) {
        error!(error = %e, "ledger refused an inventory record");
    }
    st.members = membership(&st.config, &inv);
    st.inventory = inv;
    shared.journal.enqueue([])
}

/// One line per VF that appears, vanishes or comes back (an operator's first question after a
/// PF reset or a `sriov_numvfs` change).
fn log_inventory_record(r: &Record, ledger: &Ledger) {
    match r {
        Record::Add { pci } => debug!(%pci, "VF appeared"),
        Record::Remove { pci, .. } => info!(%pci, "VF disappeared (it was free)"),
        Record::Set {
            pci,
            to: VfState::Missing { was },
            ..
        } => {
            warn!(%pci, state = %was.kind(), owner = ?was.owner().map(ToString::to_string),
                "VF disappeared while in use; kept as Missing until it returns or its owner lets go")
        }
        Record::Set {
            pci,
            from: VfState::Missing { was },
            ..
        } => {
            info!(%pci, state = %was.kind(), "VF came back")
        }
        Record::Set { .. } => {}
    }
    let _ = ledger;
}

fn reload_config(
    shared: &Arc<Shared>,
    pools: &mut BTreeMap<String, PoolRuntime>,
    cancel: &CancellationToken,
) {
    let path = &shared.opts.config_path;
    match load_config(&shared.opts) {
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
