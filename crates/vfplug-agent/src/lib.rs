//! # vfplug-agent
//!
//! vfplugd's engine, as a library so that tests drive it in-process. Start at [`Agent::start`]
//! ([`engine`]): it loads the pool config and the ledger ([`wal`]), scans the inventory, starts
//! one kubelet device-plugin server per pool and runs the reconcile loop. [`http`] serves
//! `/healthz`, `/readyz` and `/metrics` ([`metrics`]); [`node`] serves the node API the `vfplug`
//! CNI shim calls; [`options`] holds every path and timing.

mod devices;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod node;
pub mod options;
pub mod wal;

pub use engine::{Agent, AgentError};
pub use options::{AgentOptions, Registration};
