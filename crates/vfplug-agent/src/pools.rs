//! Pools: which VF is in which pool, what each pool shows the kubelet (health), and the
//! kubelet device-plugin server of each pool.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use vfplug_core::ledger::VfState;
use vfplug_core::records::{Phase, vm_vf};
use vfplug_core::{
    Config, DeviceMode, Inventory, PciAddress, PfLinkDown, PoolConfig, VfInfo, assign_pools,
};
use vfplug_host::driver::{DriverBinder, SysfsDriverBinder, VFIO_PCI};
use vfplug_kubelet::plugin::{PluginDevice, PluginHandle, RegistrationMode, spawn_plugin};

use crate::kubelet::PoolBackend;
use crate::metrics::{PhaseLabel, PoolState};
use crate::options::Registration;
use crate::state::{Shared, State, lock};

/// One pool's kubelet server and the channel feeding it.
pub(crate) struct PoolRuntime {
    pub(crate) pool: PoolConfig,
    pub(crate) devices: watch::Sender<Vec<PluginDevice>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) handle: PluginHandle,
}

/// Starts servers for new pools, stops removed ones, and pushes device lists to all.
pub(crate) fn sync_pools(
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
            tokio::spawn(
                p.handle
                    .join()
                    .instrument(info_span!("pool_stop", resource = %name)),
            );
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
/// As [`push_devices`], for the pools holding one of `vfs` only.
pub(crate) fn push_devices_of(
    shared: &Shared,
    pools: &BTreeMap<String, PoolRuntime>,
    vfs: &std::collections::BTreeSet<PciAddress>,
) {
    if vfs.is_empty() {
        return;
    }
    let st = lock(&shared.state);
    for (resource, rt) in pools {
        let touched = st
            .members
            .get(resource)
            .is_some_and(|m| m.iter().any(|p| vfs.contains(p)));
        if touched {
            send_devices(&st, resource, rt);
        }
    }
}

/// Recomputes every pool's device list and sends it where it changed; then the CDI spec files.
pub(crate) fn push_devices(shared: &Shared, pools: &BTreeMap<String, PoolRuntime>) {
    let st = lock(&shared.state);
    for (resource, rt) in pools {
        send_devices(&st, resource, rt);
    }
    // The CDI files' sysfs reads and writes happen outside the lock Allocate takes.
    let cdi = crate::devices::cdi_snapshot(&shared.opts, &st);
    drop(st);
    crate::devices::sync_cdi_specs(&shared.opts, cdi);
}

/// Sends `resource`'s device list to its ListAndWatch streams if it changed.
fn send_devices(st: &State, resource: &str, rt: &PoolRuntime) {
    let devices = pool_devices(st, resource, &rt.pool);
    rt.devices.send_if_modified(|cur| {
        if *cur == devices {
            false
        } else {
            *cur = devices;
            true
        }
    });
}

/// Whether a VF may be handed out by the kubelet right now.
pub(crate) fn vf_healthy(st: &State, pool: &PoolConfig, vf: &VfInfo) -> bool {
    if !crate::state::shown_free(st.ledger.get(&vf.pci)) {
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

pub(crate) fn membership(config: &Config, inv: &Inventory) -> BTreeMap<String, Vec<PciAddress>> {
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

/// The pool named `name` (its name or full resource name): (resource name, config).
pub(crate) fn resolve_pool<'a>(st: &'a State, name: &str) -> Option<(String, &'a PoolConfig)> {
    st.config
        .pools
        .iter()
        .find(|p| p.name == name || st.config.resource_name(p) == name)
        .map(|p| (st.config.resource_name(p), p))
}

/// Binds Free VFs of `bindVfio` pools to vfio-pci (outside the state lock).
pub(crate) async fn bind_vfio_where_configured(shared: &Arc<Shared>) {
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

/// The VM gauges, from the same projection the node API's VmRecords serves: VFs per phase (every
/// phase set, zeros too, so a phase that empties reads 0) and VMs.
fn update_vm_metrics(shared: &Shared, ledger: &vfplug_core::Ledger) {
    let mut by_phase: BTreeMap<Phase, i64> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
    let mut vms = std::collections::BTreeSet::new();
    for (_, s) in ledger.iter() {
        if let Some(v) = vm_vf(s) {
            *by_phase.entry(v.phase).or_default() += 1;
            vms.insert(v.vm.qmp_socket.as_str());
        }
    }
    for (phase, n) in by_phase {
        shared
            .metrics
            .vm_devices
            .get_or_create(&PhaseLabel {
                phase: phase.as_str().to_owned(),
            })
            .set(n);
    }
    shared.metrics.vms.set(vms.len() as i64);
}

pub(crate) fn update_metrics(shared: &Shared, pools: &BTreeMap<String, PoolRuntime>) {
    let st = lock(&shared.state);
    update_vm_metrics(shared, &st.ledger);
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
