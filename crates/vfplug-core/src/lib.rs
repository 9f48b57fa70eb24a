//! # vfplug-core
//!
//! The pure domain of vfplug: no sockets, files, threads or clocks. Start with
//! [`pci::PciAddress`] (the key of everything), [`device`] (what the node has), [`config`]
//! (pools and selectors, parsed then validated) and [`ledger`] (who owns each VF, with fencing
//! tokens; the state machine of DESIGN.md §4). Adapters (`vfplug-host`, `vfplug-kubelet`,
//! `vfplug-agent`) do the I/O and call into these types.

pub mod device;
pub mod pci;

pub use device::{Inventory, LinkType, PfInfo, VfInfo};
pub use pci::{PciAddress, PciAddressError};
