//! # vfplug-host
//!
//! The node side of vfplug: everything that reads or changes the host's PCI devices. Nothing in
//! here knows about pools, pods or the ledger; it produces [`vfplug_core::Inventory`] snapshots
//! and carries out driver changes.
//!
//! Where to start:
//! - [`sysfs::SysfsInventory`] — `scan()` turns a sysfs tree (the root is always a parameter,
//!   never a hard-coded `/sys`) into an [`Inventory`](vfplug_core::Inventory) of SR-IOV PFs and
//!   their VFs. Identity and pool facts come from the PCI side and the PF only, never from a VF
//!   netdev, so a VF whose netdev sits in a pod's namespace is still found with its PF
//!   (sriov-network-device-plugin #392/#565).
//! - [`driver::DriverBinder`] — bind a VF to `vfio-pci` or back to its host driver through
//!   `driver_override` + `unbind` + `drivers_probe` (verified afterwards), and reset it;
//!   [`driver::SysfsDriverBinder`] does it for real, [`driver::FakeDriverBinder`] in memory.
//!   Synchronous: call it from `spawn_blocking`.
//! - [`watch`] — [`watch::spawn_watcher`] turns kernel uevents, rtnetlink link messages, PF
//!   carrier polling, a sysfs fingerprint poll and a periodic resync tick into a stream of
//!   [`watch::HostEvent`]s that tell the daemon when to rescan or that a PF's link changed.
//! - [`net`] — the netlink side of a VF: [`net::VfNetlink`] (its settings through the PF) and
//!   [`net::NetdevOps`] (its netdev moved into a pod's netns and back). [`vfset`] is the
//!   apply/check/restore policy on top of `VfNetlink`; [`sim`] an in-memory PF.
//! - [`rtnl::RtVfNetlink`] — `VfNetlink` for real (`RTM_GETLINK` with the VF list,
//!   `RTM_SETLINK` one knob at a time, EBUSY retried, errnos classified).
//! - [`netdev::RtNetdevOps`] — `NetdevOps` for real: a socket per netns made by a short-lived
//!   thread (`setns`), no thread ever left in a pod's netns; altnames removed on the way in and
//!   restored on the way back; a failed placement is undone.
//! - [`vmpod`] — the host side of a VM pod: its QMP socket resolved below the pod's volume
//!   directory without following symlinks ([`vmpod::resolve_qmp_socket`]), QEMU's pid from the
//!   socket's peer credentials, QEMU's `RLIMIT_MEMLOCK` raised ([`vmpod::Memlock`]).
//! - `fixture` (cargo feature `fixture`) — `SysfsBuilder` lays out fake sysfs trees the way
//!   the kernel does (real files, relative symlinks) and mutates them like the kernel would
//!   (`set_num_vfs`, `rebind`, `move_vf_netdev_away`, `set_carrier`); `FixtureKernel` plays
//!   the kernel's side of driver binding; `fixture::tempdir()` puts trees on tmpfs.
//! - `prereq` (cargo feature `fixture`) — every crate's tests that need root, `ip`, QEMU or
//!   the CNI plugins check them through it: `SKIP <test>: <why>`, or a failure with
//!   `VFPLUG_REQUIRE=1`.
//!
//! Nothing here hard-codes `/sys`: every type takes the root, so tests run in parallel on
//! fake trees and never touch the machine's devices.

pub mod devnodes;
pub mod driver;
pub mod error;
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
pub mod net;
pub mod netdev;
#[cfg(any(test, feature = "fixture"))]
pub mod prereq;
pub mod rtnl;
pub mod sim;
pub mod sysfs;
pub mod vfset;
pub mod vmpod;
pub mod watch;

pub use error::HostError;
