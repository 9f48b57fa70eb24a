//! Generated kubelet gRPC APIs (from `proto/kubelet`, compiled by `build.rs`).
//!
//! Module names follow the proto packages, because the gRPC paths are derived from them.

/// `deviceplugin/v1beta1`: `Registration` (served by the kubelet) and `DevicePlugin` (served by us).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

/// `pluginregistration/v1` (proto package `pluginregistration`): served by the plugin in
/// `plugins_registry` mode.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

/// `podresources/v1` (proto package `v1`): `PodResourcesLister`, served by the kubelet.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod podresources {
    tonic::include_proto!("v1");
}
