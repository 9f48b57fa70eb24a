//! Which VFs belong to which pool.
//!
//! A pool has one or more selector sets ([`Selectors`]). Inside one set, every selector that is
//! present must match (AND); inside one selector, any listed value may match (OR). A VF belongs
//! to the pool when any of its sets matches. An empty list means "no constraint", as in
//! sriov-network-device-plugin (SRIOV-DP).
//!
//! Membership is computed from the VF's PCI identity and its *PF's* netdev name and link type,
//! never from the VF's own netdev: that netdev leaves the host namespace when the VF is handed
//! to a pod, and a pool whose members change when that happens under-reports capacity after a
//! restart (SRIOV-DP #392, #565).
//!
//! A VF that two pools select goes to the **first pool in config order** (SRIOV-DP does the
//! same). [`assign_pools`] applies that rule to a whole [`Inventory`] so that every VF is in at
//! most one pool, deterministically.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::{Config, PoolConfig};
use crate::device::{Inventory, LinkType, PfInfo, VfInfo};
use crate::pci::PciAddress;

/// A set of VF indexes written as `0-3,5` (inclusive ranges and single indexes, comma-separated),
/// as in SRIOV-DP's `pfNames: ["ens785f0#0-3,5"]`. The index is N of the PF's `virtfnN` link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfIndexSet {
    ranges: Vec<(u32, u32)>,
}

/// Why a `#` index list or a `name#list` selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VF index selector {input:?}: {reason}")]
pub struct VfIndexError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl VfIndexSet {
    /// Whether `index` is in one of the ranges.
    pub fn contains(&self, index: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= index && index <= b)
    }

    /// The inclusive ranges, in the order written.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
}

impl FromStr for VfIndexSet {
    type Err = VfIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| VfIndexError {
            input: s.to_owned(),
            reason,
        };
        let num = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!("{p:?} is not a VF index")));
            }
            p.parse::<u32>()
                .map_err(|_| err(format!("{p:?} is too large")))
        };
        let mut ranges = Vec::new();
        for part in s.split(',') {
            if part.is_empty() {
                return Err(err("empty entry (stray comma?)".into()));
            }
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(part)?;
                    (n, n)
                }
            };
            if a > b {
                return Err(err(format!("range {a}-{b} runs backwards")));
            }
            ranges.push((a, b));
        }
        Ok(Self { ranges })
    }
}

impl fmt::Display for VfIndexSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

/// `pfNames` entry: a PF netdev name, optionally with `#<indexes>`. Names compare
/// case-insensitively (SRIOV-DP uses `strings.EqualFold`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PfNameSelector {
    /// The PF's netdev name.
    pub name: String,
    /// VF indexes under that PF; `None` = all.
    pub indexes: Option<VfIndexSet>,
}

/// `rootDevices` entry: a PF PCI address, optionally with `#<indexes>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDeviceSelector {
    /// The PF's PCI address.
    pub pci: PciAddress,
    /// VF indexes under that PF; `None` = all.
    pub indexes: Option<VfIndexSet>,
}

fn split_indexes(s: &str) -> Result<(&str, Option<VfIndexSet>), VfIndexError> {
    match s.split_once('#') {
        None => Ok((s, None)),
        Some((head, tail)) => {
            if tail.is_empty() {
                return Err(VfIndexError {
                    input: s.to_owned(),
                    reason: "nothing after '#'".into(),
                });
            }
            let set = tail.parse::<VfIndexSet>().map_err(|e| VfIndexError {
                input: s.to_owned(),
                reason: e.reason,
            })?;
            Ok((head, Some(set)))
        }
    }
}

impl FromStr for PfNameSelector {
    type Err = VfIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, indexes) = split_indexes(s)?;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t', '\n']) {
            return Err(VfIndexError {
                input: s.to_owned(),
                reason: "not a network interface name (1-15 chars, no '/' or spaces)".into(),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            indexes,
        })
    }
}

impl FromStr for RootDeviceSelector {
    type Err = VfIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (head, indexes) = split_indexes(s)?;
        let pci = head.parse::<PciAddress>().map_err(|e| VfIndexError {
            input: s.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { pci, indexes })
    }
}

fn fmt_with_indexes(
    f: &mut fmt::Formatter<'_>,
    head: &dyn fmt::Display,
    ix: &Option<VfIndexSet>,
) -> fmt::Result {
    match ix {
        Some(ix) => write!(f, "{head}#{ix}"),
        None => write!(f, "{head}"),
    }
}

impl fmt::Display for PfNameSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_with_indexes(f, &self.name, &self.indexes)
    }
}

impl fmt::Display for RootDeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_with_indexes(f, &self.pci, &self.indexes)
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(VfIndexSet);
serde_via_str!(PfNameSelector);
serde_via_str!(RootDeviceSelector);

/// One selector set. All non-empty fields must match (AND); within a field any value may match
/// (OR). IDs compare case-insensitively and ignore a `0x` prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selectors {
    /// VF vendor IDs, 4 hex digits (`8086`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vendors: Vec<String>,
    /// VF device IDs, 4 hex digits (`154c`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Bound drivers (`iavf`, `vfio-pci`). In a `bindVfio` pool, a VF on `vfio-pci` also matches,
    /// because vfplugd put it there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<String>,
    /// Exact VF addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_addresses: Vec<PciAddress>,
    /// PF netdev names with optional `#` VF index lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pf_names: Vec<PfNameSelector>,
    /// PF PCI addresses with optional `#` VF index lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_devices: Vec<RootDeviceSelector>,
    /// Link types (of the PF).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_types: Vec<LinkType>,
    /// NUMA nodes; a VF with no NUMA node matches none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa_nodes: Vec<u32>,
}

/// Normalises a hex PCI ID for comparison: lowercase, no `0x`.
pub(crate) fn norm_id(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    s.to_ascii_lowercase()
}

impl Selectors {
    /// Whether this set matches the VF. `bind_vfio` is the pool's `bindVfio` setting.
    pub fn matches(&self, vf: &VfInfo, pf: Option<&PfInfo>, bind_vfio: bool) -> bool {
        let any_id = |list: &[String], v: &str| {
            let v = norm_id(v);
            list.iter().any(|x| norm_id(x) == v)
        };
        if !self.vendors.is_empty() && !any_id(&self.vendors, &vf.vendor) {
            return false;
        }
        if !self.devices.is_empty() && !any_id(&self.devices, &vf.device) {
            return false;
        }
        if !self.drivers.is_empty() {
            let ok = match vf.driver.as_deref() {
                Some(d) => self.drivers.iter().any(|x| x == d) || (bind_vfio && d == "vfio-pci"),
                None => false,
            };
            if !ok {
                return false;
            }
        }
        if !self.pci_addresses.is_empty() && !self.pci_addresses.contains(&vf.pci) {
            return false;
        }
        if !self.pf_names.is_empty() {
            // The PF's name, from the PF if we have it (fresher), else the copy on the VF.
            let pf_name = pf
                .and_then(|p| p.netdev.as_deref())
                .or(vf.pf_netdev.as_deref());
            let Some(pf_name) = pf_name else { return false };
            let ok = self.pf_names.iter().any(|s| {
                s.name.eq_ignore_ascii_case(pf_name)
                    && s.indexes.as_ref().is_none_or(|ix| ix.contains(vf.vf_index))
            });
            if !ok {
                return false;
            }
        }
        if !self.root_devices.is_empty() {
            let ok = self.root_devices.iter().any(|s| {
                s.pci == vf.pf && s.indexes.as_ref().is_none_or(|ix| ix.contains(vf.vf_index))
            });
            if !ok {
                return false;
            }
        }
        if !self.link_types.is_empty() {
            let lt = pf.map_or(vf.link_type, |p| p.link_type);
            if !self.link_types.contains(&lt) {
                return false;
            }
        }
        if !self.numa_nodes.is_empty() {
            match vf.numa_node {
                Some(n) if self.numa_nodes.contains(&n) => {}
                _ => return false,
            }
        }
        true
    }
}

impl PoolConfig {
    /// Whether the VF is selected by this pool (any of its selector sets matches). Does not look
    /// at other pools; use [`assign_pools`] for the first-pool-wins rule.
    pub fn matches(&self, vf: &VfInfo, pf: Option<&PfInfo>) -> bool {
        // SRIOV-DP's `isRdma` selector keeps only devices with RDMA resources
        // (pkg/resources/deviceSelectors.go rdmaSelector, v3.11.0).
        if self.rdma && vf.rdma_devices.is_empty() {
            return false;
        }
        self.selectors
            .iter()
            .any(|s| s.matches(vf, pf, self.bind_vfio))
    }
}

/// Assigns every VF of the inventory to at most one pool: the first pool in config order whose
/// selectors match. Every pool of the config has an entry (possibly empty); addresses are in
/// PCI order.
pub fn assign_pools(config: &Config, inventory: &Inventory) -> BTreeMap<String, Vec<PciAddress>> {
    let mut out: BTreeMap<String, Vec<PciAddress>> = config
        .pools
        .iter()
        .map(|p| (p.name.clone(), Vec::new()))
        .collect();
    for vf in inventory.vfs.values() {
        let pf = inventory.pf_of(vf);
        if let Some(pool) = config.pools.iter().find(|p| p.matches(vf, pf)) {
            out.entry(pool.name.clone()).or_default().push(vf.pci);
        }
    }
    out
}

/// The pool a single VF belongs to under the first-pool-wins rule.
pub fn pool_of<'c>(config: &'c Config, vf: &VfInfo, pf: Option<&PfInfo>) -> Option<&'c PoolConfig> {
    config.pools.iter().find(|p| p.matches(vf, pf))
}
