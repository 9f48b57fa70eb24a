//! # vfplug-qmp
//!
//! An async client for QEMU's QMP monitor, sized for vfplug's attach and detach sagas: typed
//! commands and events, per-call timeouts that never break the framing, and waiters registered
//! *before* the command that causes their event (QEMU may emit `DEVICE_DELETED` before the
//! `device_del` reply).
//!
//! Where to start:
//! - [`Qmp`]: [`Qmp::connect`] to a socket path (or [`Qmp::from_stream`] on any stream), then
//!   [`Qmp::device_add`] with a [`DeviceAdd::vfio_pci`], [`Qmp::device_del_and_wait`] →
//!   [`UnplugOutcome`], and [`Qmp::peripheral_ids`] for the presence check (`query-pci` does not
//!   show devices behind root ports before firmware ran).
//! - [`QmpError`]: QMP error replies classified into the cases the sagas act on
//!   ([`error::classify`]), each keeping QEMU's raw text.
//! - [`Event`]: `DEVICE_DELETED`, `DEVICE_UNPLUG_GUEST_ERROR`, `SHUTDOWN`, `RESET`, others raw.
//! - [`commands`]: one type per command ([`commands::Command`]), sent with [`Qmp::call`];
//!   [`Qmp::execute`] is the untyped escape hatch.
//! - [`wire`]: the pure framing and parsing the reader task runs (fuzzed, property-tested).
//! - `testing` (cargo feature `testing`): a scripted QMP server for tests in any crate.
//!
//! Fuzzing: `crates/vfplug-qmp/fuzz` is a cargo-fuzz project (its own workspace) whose target
//! `qmp_reader` feeds arbitrary bytes to [`wire::parse_stream`]. It needs a nightly toolchain
//! and `cargo install cargo-fuzz`; then `cd crates/vfplug-qmp/fuzz && cargo +nightly fuzz run
//! qmp_reader`. The build machine has no nightly, so CI covers the same function with a
//! proptest (`tests/wire_props.rs`).

mod client;
pub mod commands;
pub mod error;
pub mod event;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use client::{DEFAULT_TIMEOUT, DelOutcome, EventWaiter, Qmp, QmpOptions, UnplugOutcome};
pub use commands::{
    DeviceAdd, MemorySizeSummary, ObjectProperty, PciDeviceInfo, PropValue, QueryMemorySizeSummary,
    RunState, StatusInfo, VersionInfo,
};
pub use error::QmpError;
pub use event::Event;
pub use wire::Greeting;
