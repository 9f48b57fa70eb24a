//! Prometheus metrics of vfplugd, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-pool, per-state gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    /// Resource name with prefix.
    pub pool: String,
    /// Ledger state, or `healthy` / `unhealthy` for what the kubelet is shown.
    pub state: String,
}

/// Labels of per-pool counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// Resource name with prefix.
    pub pool: String,
}

/// Labels of registration attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrationLabel {
    /// Resource name with prefix.
    pub pool: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of node-API (CNI) operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniOpLabel {
    /// `add`, `del`, `check`.
    pub op: String,
    /// `ok`, `error`, `noop`, `quarantined`.
    pub result: String,
}

/// Labels of the VM gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `pending`, `attaching`, `attached`, `unplug-pending`, `guest-error`, `releasing`.
    pub phase: String,
}

/// Every metric vfplugd exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// VFs per pool and ledger state.
    pub vfs: Family<PoolState, Gauge>,
    /// Devices per pool as shown to the kubelet (`healthy` / `unhealthy`).
    pub advertised: Family<PoolState, Gauge>,
    /// Allocate calls answered, per pool.
    pub allocations: Family<PoolLabel, Counter>,
    /// Allocate calls refused, per pool.
    pub allocation_errors: Family<PoolLabel, Counter>,
    /// Registration attempts with the kubelet.
    pub registrations: Family<RegistrationLabel, Counter>,
    /// Inventory scans done.
    pub scans: Counter,
    /// Config reloads that failed validation (the old config stays in force).
    pub config_reload_errors: Counter,
    /// Node-API operations by result.
    pub cni: Family<CniOpLabel, Counter>,
    /// VM pods' VFs per phase of the VM records (each one net; a hostdev but in `releasing`).
    pub vm_devices: Family<PhaseLabel, Gauge>,
    /// VM pods with at least one VF in their records.
    pub vms: Gauge,
}

impl Metrics {
    /// Counts one node-API operation.
    pub fn cni_ops(&self, op: &str, result: &str) {
        self.cni
            .get_or_create(&CniOpLabel {
                op: op.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Registers all metrics in `registry` under the `vfplug` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vfplug");
        r.register("vfs", "VFs per pool and ledger state", self.vfs.clone());
        r.register(
            "advertised_devices",
            "Devices per pool as shown to the kubelet",
            self.advertised.clone(),
        );
        r.register(
            "allocations",
            "Allocate calls answered",
            self.allocations.clone(),
        );
        r.register(
            "allocation_errors",
            "Allocate calls refused",
            self.allocation_errors.clone(),
        );
        r.register(
            "registrations",
            "Registrations with the kubelet by result: confirmed (ListAndWatch opened) or failed",
            self.registrations.clone(),
        );
        r.register("inventory_scans", "Inventory scans", self.scans.clone());
        r.register(
            "cni_operations",
            "Node-API (CNI) operations by result",
            self.cni.clone(),
        );
        r.register(
            "vm_devices",
            "VFs of VM pods per phase of their records (hostdev gone in releasing)",
            self.vm_devices.clone(),
        );
        r.register(
            "vms",
            "VM pods with at least one VF in their records",
            self.vms.clone(),
        );
        r.register(
            "config_reload_errors",
            "Config reloads rejected by validation",
            self.config_reload_errors.clone(),
        );
    }
}
