//! Runtime options of the agent (paths and timings). Pools come from the config file instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vfplug_host::driver::DriverBinder;
use vfplug_host::net::{NetdevOps, VfNetlink};

pub use crate::store::SyncMode;

/// How vfplugd registers with the kubelet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Registration {
    /// Use `plugins_registry/` when the kubelet has it, else the legacy `kubelet.sock`.
    #[default]
    Auto,
    /// Only `device-plugins/kubelet.sock`.
    Legacy,
    /// Only `plugins_registry/`.
    PluginsRegistry,
}

/// Everything the agent needs to know that is not the pool config.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Node name, for logs and (later) the controller.
    pub node_name: String,
    /// Stands for `/sys`.
    pub sysfs_root: PathBuf,
    /// Stands for `/dev` (only for lookups; DeviceSpecs still name `/dev`).
    pub dev_root: PathBuf,
    /// Stands for `/var/lib/kubelet`; the three paths below default from it.
    pub kubelet_dir: PathBuf,
    /// The kubelet's device-plugin dir (`kubelet.sock`); `None`: `<kubelet_dir>/device-plugins`.
    pub device_plugin_dir: Option<PathBuf>,
    /// The kubelet's plugin-watcher dir; `None`: `<kubelet_dir>/plugins_registry`.
    pub plugins_registry_dir: Option<PathBuf>,
    /// The kubelet's PodResources socket; `None`: `<kubelet_dir>/pod-resources/kubelet.sock`.
    pub pod_resources_socket: Option<PathBuf>,
    /// Where the ledger lives.
    pub state_dir: PathBuf,
    /// The pool config file (vfplug YAML or sriov-network-device-plugin JSON).
    pub config_path: PathBuf,
    /// Where device-info files are written (device-info spec v1.1.0).
    pub device_info_dir: PathBuf,
    /// `--resource-prefix`: the prefix of pools that name none (SRIOV-DP's flag; `None` keeps
    /// the format's default, `intel.com` for SRIOV-DP configs, `vfplug.io` for YAML).
    pub resource_prefix: Option<String>,
    /// `--use-cdi`: one CDI spec file per pool, CDI names instead of device specs in Allocate.
    pub use_cdi: bool,
    /// Where CDI spec files are written (`--cdi-dir`, default `/var/run/cdi`).
    pub cdi_dir: PathBuf,
    /// Registration mode.
    pub registration: Registration,
    /// Full inventory rescan interval, the safety net behind event-driven refresh.
    pub resync_interval: Duration,
    /// How often the config file and the fake-friendly sysfs fingerprint are polled.
    pub poll_interval: Duration,
    /// How often the kubelet's PodResources API is asked for its allocations.
    pub podresources_interval: Duration,
    /// Where the node API (`proto/vfplug/v1`) is served; `None`: not served.
    pub node_socket: Option<PathBuf>,
    /// VF settings through the PF: real netlink, or a simulated PF on fake nodes.
    pub vf_netlink: Arc<dyn VfNetlink>,
    /// Netdev placement into pods.
    pub netdev_ops: Arc<dyn NetdevOps>,
    /// Driver binding and function reset; `None`: sysfs under `sysfs_root`.
    pub driver_binder: Option<Arc<dyn DriverBinder>>,
    /// A kubelet allocation that PodResources does not (yet) report is kept this long before it
    /// is considered released (the container may not exist yet when PodResources is asked).
    pub kubelet_alloc_grace: Duration,
    /// Compact the ledger's log into a snapshot after this many records.
    pub compact_after: usize,
    /// How the ledger journal syncs (group commit unless benchmarking).
    pub sync_mode: SyncMode,
    /// How often the per-state gauges are recomputed.
    pub metrics_interval: Duration,
    /// The pods of this node as the Domain controller's pod watch sees them (a VM pod's QMP
    /// socket annotation); `None`: no controller, network configs name `qmpSocket`.
    pub pod_index: Option<Arc<crate::podindex::PodIndex>>,
    /// How long a detach waits for the guest to acknowledge the unplug before the CNI call
    /// returns with the unplug pending (libvirt: 5 s).
    pub unplug_wait: Duration,
    /// Id prefix of the hotplug-capable `pcie-root-port`s of VM pods.
    pub vm_port_prefix: String,
    /// What QEMU device a VF becomes in a VM pod's guest: `vfio-pci`, or (tests only,
    /// `--vm-stand-in-device`) a stand-in driver on hosts without VFIO.
    pub vm_hostdev: vfplug_executor::HostdevModel,
    /// Owners a VM pod's QMP socket may have.
    pub qmp_trusted_uids: std::collections::BTreeSet<u32>,
    /// QEMU's RLIMIT_MEMLOCK; `None`: `prlimit(2)` on the real process.
    pub memlock: Option<Arc<dyn vfplug_host::vmpod::Memlock>>,
}

/// Defaults of the timing options, shared by vfplugd's flags and [`AgentOptions::rooted`].
pub mod defaults {
    use std::time::Duration;

    /// See [`super::AgentOptions::kubelet_alloc_grace`].
    pub const KUBELET_ALLOC_GRACE: Duration = Duration::from_secs(60);
    /// See [`super::AgentOptions::compact_after`].
    pub const COMPACT_AFTER: usize = 1024;
    /// See [`super::AgentOptions::metrics_interval`].
    pub const METRICS_INTERVAL: Duration = Duration::from_secs(1);
    /// See [`super::AgentOptions::unplug_wait`].
    pub const UNPLUG_WAIT: Duration = Duration::from_secs(5);
    /// See [`super::AgentOptions::vm_port_prefix`].
    pub const VM_PORT_PREFIX: &str = "vfplug-rp";
}

impl AgentOptions {
    /// The device-plugin config of `pool` with the kubelet paths of these options.
    pub(crate) fn plugin_config(&self, pool: String) -> vfplug_kubelet::PluginConfig {
        let mut pc = vfplug_kubelet::PluginConfig::new(pool, self.kubelet_dir.clone());
        if let Some(d) = &self.device_plugin_dir {
            pc.device_plugin_dir = d.clone();
        }
        if let Some(d) = &self.plugins_registry_dir {
            pc.plugins_registry_dir = d.clone();
        }
        pc
    }

    /// The kubelet's PodResources socket.
    pub(crate) fn pod_resources_socket(&self) -> PathBuf {
        self.pod_resources_socket
            .clone()
            .unwrap_or_else(|| vfplug_kubelet::podresources::socket_path(&self.kubelet_dir))
    }

    /// Options rooted in one directory, as tests and the demo use them: a simulated PF for VF
    /// settings and simulated netdevs (tests swap in real ones), the node API at `<root>/vfplugd.sock`.
    pub fn rooted(root: &std::path::Path, config_path: PathBuf) -> Self {
        Self {
            node_name: "test-node".into(),
            sysfs_root: root.join("sys"),
            dev_root: root.join("dev"),
            kubelet_dir: root.join("kubelet"),
            device_plugin_dir: None,
            plugins_registry_dir: None,
            pod_resources_socket: None,
            state_dir: root.join("state"),
            config_path,
            device_info_dir: root.join("devinfo"),
            resource_prefix: None,
            use_cdi: false,
            cdi_dir: root.join("cdi"),
            registration: Registration::Auto,
            resync_interval: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            podresources_interval: Duration::from_secs(5),
            node_socket: Some(root.join("vfplugd.sock")),
            vf_netlink: Arc::new(vfplug_host::sim::SimVfNetlink::default()),
            netdev_ops: Arc::new(vfplug_host::sim::SimNetdevOps::default()),
            driver_binder: None,
            kubelet_alloc_grace: defaults::KUBELET_ALLOC_GRACE,
            compact_after: defaults::COMPACT_AFTER,
            sync_mode: SyncMode::Group,
            metrics_interval: defaults::METRICS_INTERVAL,
            unplug_wait: defaults::UNPLUG_WAIT,
            vm_port_prefix: defaults::VM_PORT_PREFIX.into(),
            vm_hostdev: vfplug_executor::HostdevModel::VfioPci,
            qmp_trusted_uids: vfplug_host::vmpod::default_trusted_owners(),
            memlock: None,
            pod_index: None,
        }
    }
}
