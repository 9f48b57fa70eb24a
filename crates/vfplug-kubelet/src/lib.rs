//! Kubelet device-plugin v1beta1 server, plugin registration and PodResources client.
//!
//! Where to start:
//! - [`plugin`]: implement [`plugin::PluginBackend`] for a pool and call [`plugin::spawn_plugin`];
//!   the returned [`plugin::PluginHandle`] gives readiness (`registered`) and counters.
//! - [`sriov`]: builds Allocate responses byte-compatible with sriov-network-device-plugin
//!   (`PCIDEVICE_*` env, `/dev/vfio` device specs, CDI names) and device-info files.
//! - [`podresources`]: client and poller of the kubelet's PodResources v1 API.
//! - [`authority`]: lets every gRPC client in, whatever `:authority` it sends (a socket path
//!   included), by mending the header blocks before h2 sees them.
//! - [`api`]: the generated kubelet protocol types (from `proto/kubelet`).
//! - `testing` (cargo feature `testing`): an in-process fake kubelet for tests.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use tokio::sync::watch;
//! use tokio_util::sync::CancellationToken;
//! use vfplug_kubelet::sriov::{self, SriovAllocParams, SriovDevice};
//! use vfplug_kubelet::{AllocError, ContainerAlloc, PluginBackend, PluginConfig, PluginDevice};
//!
//! struct Pool {
//!     params: SriovAllocParams,
//!     resource: String,
//!     devices: watch::Sender<Vec<PluginDevice>>,
//!     vfs: BTreeMap<String, SriovDevice>,
//! }
//!
//! impl PluginBackend for Pool {
//!     fn resource_name(&self) -> &str {
//!         &self.resource
//!     }
//!     fn devices(&self) -> watch::Receiver<Vec<PluginDevice>> {
//!         self.devices.subscribe()
//!     }
//!     fn allocate(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
//!         req.iter()
//!             .map(|ids| {
//!                 let devs = ids
//!                     .iter()
//!                     .map(|id| self.vfs.get(id).cloned().ok_or_else(|| AllocError::UnknownDevice(id.clone())))
//!                     .collect::<Result<Vec<_>, _>>()?;
//!                 // Record KubeletAllocated in the ledger and write device-info files here.
//!                 sriov::container_alloc(&self.params, &devs).map_err(|e| AllocError::Internal(e.to_string()))
//!             })
//!             .collect()
//!     }
//! }
//!
//! # async fn example(pool: Pool) {
//! let cancel = CancellationToken::new();
//! let handle = vfplug_kubelet::spawn_plugin(
//!     PluginConfig::new("pool0", "/var/lib/kubelet"),
//!     Arc::new(pool),
//!     cancel.clone(),
//! );
//! let ready = handle.registered(); // for /readyz
//! # drop(ready);
//! cancel.cancel();
//! handle.join().await; // socket removed
//! # }
//! ```

pub mod api;
pub mod authority;
pub mod cdi;
#[cfg(feature = "testing")]
pub mod foreign;
pub mod plugin;
pub mod podresources;
pub mod retrylog;
pub mod sriov;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uds;

pub use plugin::{
    AllocError, ContainerAlloc, DeviceSpec, MetricsSnapshot, Mount, PluginBackend, PluginConfig,
    PluginDevice, PluginError, PluginHandle, PluginMetrics, RegistrationMode, spawn_plugin,
};
