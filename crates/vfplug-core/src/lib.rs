//! # vfplug-core
//!
//! The pure domain of vfplug: no sockets, files, threads or clocks (time comes in as `u64` unix
//! milliseconds). Start with [`pci::PciAddress`] (the key of everything), [`device`] (what the
//! node has), [`config`] (pools and selectors: [`Config::parse`] reads vfplug's YAML or
//! sriov-network-device-plugin's JSON, then validates), [`selector`] (which VF is in which pool:
//! [`assign_pools`]), [`alloc`] (GetPreferredAllocation policies: [`preferred`]) and [`ledger`]
//! (who owns each VF, with fencing tokens and write-ahead [`Record`]s; the state machine of
//! DESIGN.md §4) and [`vfconf`] (what a CNI attachment asks of a VF and what the ledger keeps
//! of it), and [`records`] (each VM's nets and hostdevs, projected from the ledger). Adapters (`vfplug-host`, `vfplug-kubelet`, `vfplug-agent`) do the I/O and call
//! into these types.

pub mod alloc;
pub mod config;
pub mod device;
pub mod ident;
pub mod ledger;
pub mod pci;
pub mod records;
pub mod selector;
pub mod vfconf;

pub use alloc::{AllocPolicy, Candidate, preferred};
pub use config::{
    Config, ConfigError, ConfigErrorKind, ConfigFormat, ConfigWarning, DeviceMode, HealthConfig,
    PfLinkDown, PoolConfig,
};
pub use device::{Inventory, LinkType, PfInfo, VfInfo};
pub use ident::{PodRef, VmRef};
pub use ledger::{
    Lease, Ledger, LedgerError, Owner, Record, SavedVfState, StateKind, Step, Token, VfLinkState,
    VfState,
};
pub use pci::{PciAddress, PciAddressError};
pub use records::{HostdevRecord, NetRecord, Phase, VmFilter, VmRecords, vm_records};
pub use selector::{
    PfNameSelector, RootDeviceSelector, Selectors, VfIndexError, VfIndexSet, assign_pools, pool_of,
};
pub use vfconf::{
    AttachMode, CniAttachment, MacAddr, MacAddrError, NetdevPlacement, VfConfig, VfConfigError,
    VlanProto,
};
