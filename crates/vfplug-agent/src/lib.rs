//! # vfplug-agent
//!
//! vfplugd's engine. Start at [`wal`] (the ledger's write-ahead log).
pub mod wal;
