//! What the node has: physical functions (PFs) and their virtual functions (VFs), as discovered
//! from sysfs by `vfplug-host`. Pure data; identity is always the PCI address, never a netdev
//! name (a VF's netdev leaves the host namespace when it is handed to a pod).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;

/// The link layer of a PF, from `/sys/class/net/<pf>/type` (ARPHRD numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum LinkType {
    /// ARPHRD_ETHER (1).
    Ether,
    /// ARPHRD_INFINIBAND (32).
    Infiniband,
    /// Anything else, or unknown (no netdev).
    Other,
}

impl LinkType {
    /// Maps the kernel's ARPHRD number.
    pub fn from_arphrd(n: u32) -> Self {
        match n {
            1 => Self::Ether,
            32 => Self::Infiniband,
            _ => Self::Other,
        }
    }

    /// The name used in configs (`ether`, `infiniband`), as sriov-network-device-plugin spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ether => "ether",
            Self::Infiniband => "infiniband",
            Self::Other => "other",
        }
    }
}

/// A physical function that has SR-IOV capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PfInfo {
    /// The PF's PCI address.
    pub pci: PciAddress,
    /// Its netdev name in the host namespace, if it has one.
    pub netdev: Option<String>,
    /// Vendor ID, e.g. `8086`.
    pub vendor: String,
    /// Device ID, e.g. `10fb`.
    pub device: String,
    /// The bound driver, e.g. `igb`.
    pub driver: Option<String>,
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// `sriov_numvfs`.
    pub num_vfs: u32,
    /// NUMA node, `None` when the kernel reports -1 or nothing.
    pub numa_node: Option<u32>,
    /// Link type of the PF netdev; VFs inherit it (SRIOV-DP #392/#565: never read it from the VF).
    pub link_type: LinkType,
    /// Carrier of the PF netdev: `Some(true)` up, `Some(false)` down, `None` unknown.
    pub carrier: Option<bool>,
}

/// A virtual function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfInfo {
    /// The VF's PCI address (its identity).
    pub pci: PciAddress,
    /// The parent PF's PCI address.
    pub pf: PciAddress,
    /// The parent PF's netdev name, if it has one.
    pub pf_netdev: Option<String>,
    /// Index N of the PF's `virtfnN` link.
    pub vf_index: u32,
    /// Vendor ID of the VF.
    pub vendor: String,
    /// Device ID of the VF.
    pub device: String,
    /// Bound driver, `None` if unbound.
    pub driver: Option<String>,
    /// IOMMU group number, if the VF is in one.
    pub iommu_group: Option<u32>,
    /// NUMA node (of the VF, falling back to the PF's).
    pub numa_node: Option<u32>,
    /// The VF's netdev names in the host namespace (empty when bound to vfio-pci or moved away).
    pub netdevs: Vec<String>,
    /// Link type (taken from the PF).
    pub link_type: LinkType,
    /// RDMA devices of the VF (`mlx5_3`): the directories under its sysfs `infiniband/`, which
    /// is what sriov-network-device-plugin's rdma provider reads (rdmamap
    /// `GetRdmaDevicesForPcidev`). Empty for VFs without RDMA. Decides `isRdma` pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rdma_devices: Vec<String>,
}

/// A full view of the node's SR-IOV devices at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// PFs by address.
    pub pfs: BTreeMap<PciAddress, PfInfo>,
    /// VFs by address.
    pub vfs: BTreeMap<PciAddress, VfInfo>,
}

impl Inventory {
    /// The PF a VF belongs to.
    pub fn pf_of(&self, vf: &VfInfo) -> Option<&PfInfo> {
        self.pfs.get(&vf.pf)
    }
}
