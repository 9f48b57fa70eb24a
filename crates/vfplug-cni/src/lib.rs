//! The `vfplug` CNI plugin: a thin shim that parses the CNI call (the `CNI_*` environment and
//! the network config on stdin), delegates IPAM, forwards the attachment to vfplugd's node API
//! on a unix socket, and prints the CNI result or error. No netlink and no state of its own:
//! vfplugd's ledger holds everything, so DEL works without caches or a live netns.
//!
//! Start with [`Invocation::parse`] (pure: environment + stdin to a checked run; what the fuzzer
//! and property tests drive), then [`run::run`] (the commands, with I/O). The pieces:
//!
//! - [`env`](mod@env): `CNI_*` variables and `CNI_ARGS` (errors are code 4 and name the variable);
//! - [`config`]: the network config (sriov-cni's keys plus `socket`, `pool`, `timeoutSeconds`);
//! - [`version`]: supported spec versions and what each allows;
//! - [`result`]: the protocol's result and error messages, shaped per version;
//! - [`mapping`]: the run to node API requests, vfplugd's answer to the result (pure);
//! - [`ipam`], [`node`], [`devinfo`], [`run`]: the I/O.
//!
//! The binary (`src/main.rs`) only reads the process environment and stdin, sets up logging
//! and prints. The user-facing reference is `docs/cni.md`. With the `testing` feature,
//! `testing` has a fake node API server and helpers to exec the binary.

pub mod config;
pub mod devinfo;
pub mod env;
pub mod error;
pub mod install;
pub mod invocation;
pub mod ipam;
pub mod mapping;
pub mod node;
pub mod result;
pub mod run;
pub mod version;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::NetConf;
pub use env::{CniArgs, CniEnv, Command};
pub use error::CniError;
pub use invocation::{Invocation, MacSource};
pub use result::{CniResult, ErrorResult, Result020, VersionedResult};
pub use version::{CniVersion, VersionInfo};
