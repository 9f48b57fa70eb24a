//! # vfplug-agent
//!
//! vfplugd's engine, as a library so that tests drive it in-process. Start at [`Agent::start`]
//! ([`engine`]): it loads the pool config and the ledger ([`wal`] on disk, [`store`] the
//! group-committed journal in front of it), scans the inventory, finishes half-done
//! attachments, starts one kubelet device-plugin server per pool (pools, kubelet modules) and
//! runs the reconcile loop. The CNI sagas live in the `vfplug-executor` crate; [`ports`] gives
//! it the ledger and the node's pool policy, and [`node`] is the thin gRPC adapter the `vfplug`
//! CNI shim calls. [`http`] serves `/healthz`, `/readyz` and `/metrics` ([`metrics`]);
//! [`options`] holds every path and timing.

mod devices;
pub mod engine;
pub mod http;
pub(crate) mod kubelet;
pub mod metrics;
pub mod node;
pub mod options;
pub mod podindex;
pub(crate) mod pools;
pub mod ports;
pub(crate) mod state;
pub mod store;
pub mod wal;

pub use engine::{Agent, AgentError};
pub use node::{AttachmentInfo, NodeError, NodeHandle, Released};
pub use options::{AgentOptions, Registration};
pub use podindex::{PodEntry, PodIndex, PodLookup, QMP_SOCKET_ANNOTATION};
