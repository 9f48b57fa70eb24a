//! Kubelet device-plugin v1beta1 server, plugin registration and PodResources client.
//!
//! Where to start:
//! - [`plugin`]: implement [`plugin::PluginBackend`] for a pool and call [`plugin::spawn_plugin`];
//!   the returned [`plugin::PluginHandle`] gives readiness (`registered`) and counters.
//! - [`sriov`]: builds Allocate responses byte-compatible with sriov-network-device-plugin
//!   (`PCIDEVICE_*` env, `/dev/vfio` device specs, CDI names) and device-info files.
//! - [`podresources`]: client and poller of the kubelet's PodResources v1 API.
//! - [`api`]: the generated kubelet protocol types (from `proto/kubelet`).
//! - `testing` (cargo feature `testing`): an in-process fake kubelet for tests.

pub mod api;
pub mod plugin;
pub mod podresources;
pub mod sriov;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uds;

pub use plugin::{
    AllocError, ContainerAlloc, DeviceSpec, MetricsSnapshot, Mount, PluginBackend, PluginConfig,
    PluginDevice, PluginError, PluginHandle, PluginMetrics, RegistrationMode, spawn_plugin,
};
