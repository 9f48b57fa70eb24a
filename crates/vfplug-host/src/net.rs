//! The netlink side of a VF: its settings as the PF holds them, and its netdev's placement.
//!
//! Two traits, each with a real implementation over rtnetlink and an in-memory one:
//! - [`VfNetlink`]: read one VF's settings from its PF (`IFLA_VFINFO_LIST`) and change one knob
//!   at a time (`ip link set <pf> vf N ...`). One knob per call, so a driver that refuses one
//!   (EOPNOTSUPP, e.g. igb's link state) is told apart from the others. [`apply_vf_config`](crate::vfset::apply_vf_config)
//!   and [`restore_vf_config`](crate::vfset::restore_vf_config) sequence the knobs, retry transient errors a bounded number of
//!   times, and undo a half-applied change.
//! - [`NetdevOps`]: move a VF's netdev into a pod's netns under `CNI_IFNAME` (MAC, MTU, up,
//!   addresses, routes; altnames removed so they cannot collide) and bring it back under its
//!   host name (altnames restored), whichever netns it is found in.
//!
//! Synchronous: netlink requests are short syscalls. Callers on an async runtime use
//! `spawn_blocking`. Serializing writes per PF is the caller's job (vfplugd holds a per-PF lock).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use vfplug_core::{MacAddr, PciAddress, VfLinkState, VlanProto};

/// One VF's settings as its PF reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfSettings {
    /// Administrative MAC (all zero when unset).
    pub mac: MacAddr,
    /// VLAN ID (0 = none).
    pub vlan: u16,
    /// VLAN QoS.
    pub qos: u8,
    /// VLAN protocol (802.1Q when the kernel does not report one).
    pub vlan_proto: VlanProto,
    /// Spoof checking, when reported.
    pub spoofchk: Option<bool>,
    /// Trust, when reported.
    pub trust: Option<bool>,
    /// Link state, when reported.
    pub link_state: Option<VfLinkState>,
    /// Minimum TX rate, Mbit/s.
    pub min_tx_rate: u32,
    /// Maximum TX rate, Mbit/s.
    pub max_tx_rate: u32,
}

/// One knob change through the PF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfChange {
    /// Administrative MAC.
    Mac(MacAddr),
    /// VLAN, QoS and protocol (one message, as the kernel takes them together).
    Vlan {
        /// VLAN ID.
        vlan: u16,
        /// QoS.
        qos: u8,
        /// Protocol.
        proto: VlanProto,
    },
    /// Spoof checking.
    SpoofChk(bool),
    /// Trust.
    Trust(bool),
    /// Link state.
    LinkState(VfLinkState),
    /// TX rates (one message: the kernel checks min against max).
    Rate {
        /// Minimum, Mbit/s.
        min: u32,
        /// Maximum, Mbit/s.
        max: u32,
    },
}

impl VfChange {
    /// The sriov-cni config key of the knob, for messages.
    pub fn knob(&self) -> &'static str {
        match self {
            Self::Mac(_) => "mac",
            Self::Vlan { .. } => "vlan",
            Self::SpoofChk(_) => "spoofchk",
            Self::Trust(_) => "trust",
            Self::LinkState(_) => "link_state",
            Self::Rate { .. } => "max_tx_rate",
        }
    }
}

/// Netlink failures, classified for the caller's policy.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No link of that name (in the netns named, or the host's).
    #[error("no link named {name:?}{}", ns_suffix(.netns))]
    NoSuchLink {
        /// Link name.
        name: String,
        /// The netns looked in (`None`: vfplugd's own).
        netns: Option<PathBuf>,
    },
    /// The PF reports no VF of that index.
    #[error("{pf} has no VF {vf}")]
    NoSuchVf {
        /// PF netdev.
        pf: String,
        /// VF index.
        vf: u32,
    },
    /// The driver does not support the operation (EOPNOTSUPP).
    #[error("{op}: not supported by the driver")]
    NotSupported {
        /// What was asked.
        op: String,
    },
    /// Transient failure (EBUSY, EAGAIN) that persisted through the retries.
    #[error("{op}: device busy after {attempts} attempts")]
    Busy {
        /// What was asked.
        op: String,
        /// How many times it was tried.
        attempts: u32,
    },
    /// The netns path cannot be opened (`gone` when it does not exist).
    #[error("netns {path}: {source}")]
    Netns {
        /// The path.
        path: PathBuf,
        /// Whether it is simply gone (ENOENT, or not a netns any more).
        gone: bool,
        /// Cause.
        source: std::io::Error,
    },
    /// A name is taken (EEXIST).
    #[error("{op}: name {name:?} already exists")]
    Exists {
        /// What was asked.
        op: String,
        /// The name.
        name: String,
    },
    /// Any other kernel error.
    #[error("{op}: {source}")]
    Kernel {
        /// What was asked.
        op: String,
        /// The errno as an io error.
        source: std::io::Error,
    },
    /// A reply that could not be parsed.
    #[error("{op}: bad netlink reply: {reason}")]
    Protocol {
        /// What was asked.
        op: String,
        /// Why.
        reason: String,
    },
}

fn ns_suffix(ns: &Option<PathBuf>) -> String {
    ns.as_ref()
        .map(|p| format!(" in netns {}", p.display()))
        .unwrap_or_default()
}

impl NetError {
    /// EOPNOTSUPP.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, Self::NotSupported { .. })
    }

    /// EBUSY / EAGAIN after retries: the caller should say "try again later".
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy { .. })
    }
}

/// Reads and changes VF settings through the PF. See the module docs.
pub trait VfNetlink: Send + Sync + fmt::Debug {
    /// The settings of VF `vf` of PF netdev `pf`.
    fn read_vf(&self, pf: &str, vf: u32) -> Result<VfSettings, NetError>;
    /// Changes one knob. Implementations retry EBUSY/EAGAIN a bounded number of times and then
    /// return [`NetError::Busy`]; EOPNOTSUPP is [`NetError::NotSupported`].
    fn set_vf(&self, pf: &str, vf: u32, change: VfChange) -> Result<(), NetError>;
}

/// An address with its prefix length, e.g. `10.1.2.3/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an address/prefix"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is too long for {addr}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A route to add in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination.
    pub dst: IpNet,
    /// Next hop (`None`: on-link).
    pub gw: Option<IpAddr>,
}

/// A link as netlink reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index (in its netns).
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC, if it has one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Alternative names.
    pub altnames: Vec<String>,
    /// Addresses (CIDR), global scope only.
    pub addresses: Vec<IpNet>,
    /// The device the kernel names as the link's parent (`IFLA_PARENT_DEV_NAME`): a VF
    /// netdev's is its PCI address, whatever netns it is in. `None`: a virtual link (veth,
    /// macvlan, ...), or a kernel that does not report it.
    pub parent: Option<String>,
}

/// Move a host netdev into a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaceRequest {
    /// The netdev's name in vfplugd's netns.
    pub host_name: String,
    /// CNI_NETNS.
    pub netns: PathBuf,
    /// CNI_IFNAME.
    pub pod_ifname: String,
    /// MAC to set in the pod (`None`: keep).
    pub mac: Option<MacAddr>,
    /// MTU to set in the pod (`None`: keep).
    pub mtu: Option<u32>,
    /// Addresses to add.
    pub addresses: Vec<IpNet>,
    /// Routes to add (after the addresses).
    pub routes: Vec<RouteSpec>,
}

/// Bring a netdev back from a pod. It is looked for as `pod_ifname` in `netns` (if given and
/// still there), then under any of `host_candidates` in vfplugd's netns (the kernel moves a
/// physical netdev back to the initial netns when its netns dies, keeping or changing its name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrieveRequest {
    /// CNI_NETNS, if known and non-empty.
    pub netns: Option<PathBuf>,
    /// Its name in the pod.
    pub pod_ifname: String,
    /// Names it may have in vfplugd's netns right now (from the VF's sysfs `net/` directory, and
    /// the pod and host names).
    pub host_candidates: Vec<String>,
    /// Name to restore.
    pub host_name: String,
    /// MAC to restore (`None`: leave).
    pub host_mac: Option<MacAddr>,
    /// MTU to restore.
    pub host_mtu: u32,
    /// Altnames to put back.
    pub altnames: Vec<String>,
    /// MACs the VF's netdev may have (the one it had in the pod, its host MAC). A link in the
    /// pod, or at home under a name other than `host_name`, is only taken if it is proved to be
    /// the VF (see [`RetrieveRequest::identify`]); empty: nothing in the pod is ever taken.
    pub expect_macs: Vec<MacAddr>,
    /// The VF's PCI address: when the kernel reports a link's parent device, that decides
    /// whether the link is the VF (`None`: only the MACs can, e.g. for a veth stand-in).
    pub vf: Option<PciAddress>,
}

impl RetrieveRequest {
    /// Whether `l`, found by name in the pod (or at home under a name other than
    /// `host_name`), is provably the VF's netdev; `Err` says why not. The pod's own interfaces
    /// may share the name (an ADD refused with "eth0 already exists" is rolled back through
    /// here), so a name is never enough:
    /// 1. the VF's PCI address known and the link's parent device reported: they must match;
    /// 2. the VF known, the kernel reporting parents (`parents_reported`) and the link having
    ///    none: a virtual link, not the VF;
    /// 3. otherwise the link's MAC must be one of [`expect_macs`](Self::expect_macs).
    pub fn identify(&self, l: &LinkInfo, parents_reported: bool) -> Result<(), String> {
        match (&self.vf, &l.parent) {
            (Some(vf), Some(parent)) => {
                return if *parent == vf.to_string() {
                    Ok(())
                } else {
                    Err(format!("its parent device is {parent}, not the VF {vf}"))
                };
            }
            (Some(vf), None) if parents_reported => {
                return Err(format!(
                    "it has no parent device (a virtual link), not the VF {vf}"
                ));
            }
            _ => {}
        }
        match l.mac {
            Some(m) if self.expect_macs.contains(&m) => Ok(()),
            Some(m) => Err(format!(
                "its MAC {m} is none of the VF's [{}]",
                self.expect_macs_text()
            )),
            None => Err("it has no MAC".into()),
        }
    }

    /// Whether the link at home under `host_name` is not the VF after all: only a parent
    /// device other than the VF's (or none, where the kernel reports parents) says so; its MAC
    /// proves nothing there (the PF's admin MAC may have changed it).
    pub fn foreign_at_home(&self, l: &LinkInfo, parents_reported: bool) -> Option<String> {
        match (&self.vf, &l.parent) {
            (Some(vf), Some(parent)) if *parent != vf.to_string() => {
                Some(format!("its parent device is {parent}, not the VF {vf}"))
            }
            (Some(vf), None) if parents_reported => Some(format!(
                "it has no parent device (a virtual link), not the VF {vf}"
            )),
            _ => None,
        }
    }

    fn expect_macs_text(&self) -> String {
        let macs: Vec<String> = self.expect_macs.iter().map(ToString::to_string).collect();
        macs.join(", ")
    }
}

/// What [`NetdevOps::retrieve`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retrieved {
    /// Moved back from the pod's netns and restored.
    FromPod,
    /// It was already in vfplugd's netns (the pod's netns died); renamed and restored.
    FromHost,
    /// Nowhere to be found (e.g. a virtual stand-in destroyed with its netns), or only links
    /// that merely share a name with it (left untouched). Nothing done.
    NotFound,
}

/// Netdev placement. See the module docs.
pub trait NetdevOps: Send + Sync + fmt::Debug {
    /// A link in vfplugd's netns (`netns: None`) or in the netns at a path.
    /// `Ok(None)`: no such link. A netns that cannot be opened is [`NetError::Netns`].
    fn link(&self, netns: Option<&Path>, name: &str) -> Result<Option<LinkInfo>, NetError>;
    /// Moves the netdev into the pod and configures it. On failure, undoes what it did (the
    /// netdev is back under `host_name` in vfplugd's netns) before returning the error.
    fn place(&self, req: &PlaceRequest) -> Result<LinkInfo, NetError>;
    /// Brings the netdev back and restores name, MAC, MTU and altnames; it is left down.
    /// Idempotent: a second call finds it at home and returns [`Retrieved::FromHost`].
    fn retrieve(&self, req: &RetrieveRequest) -> Result<Retrieved, NetError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(vf: Option<&str>, macs: &[&str]) -> RetrieveRequest {
        RetrieveRequest {
            netns: None,
            pod_ifname: "eth0".into(),
            host_candidates: vec![],
            host_name: "ens1f0v2".into(),
            host_mac: None,
            host_mtu: 1500,
            altnames: vec![],
            expect_macs: macs.iter().map(|m| m.parse().unwrap()).collect(),
            vf: vf.map(|v| v.parse().unwrap()),
        }
    }

    fn link(mac: &str, parent: Option<&str>) -> LinkInfo {
        LinkInfo {
            name: "eth0".into(),
            mac: Some(mac.parse().unwrap()),
            parent: parent.map(str::to_owned),
            ..LinkInfo::default()
        }
    }

    const VF: &str = "0000:3b:02.1";
    const M: &str = "02:00:00:00:00:01";
    const OTHER: &str = "02:00:00:00:00:02";

    #[test]
    fn the_parent_device_decides_when_known() {
        let r = req(Some(VF), &[M]);
        for reported in [false, true] {
            assert!(r.identify(&link(OTHER, Some(VF)), reported).is_ok());
            assert!(
                r.identify(&link(M, Some("0000:3b:02.2")), reported)
                    .is_err()
            );
            assert!(r.identify(&link(M, Some("virtio2")), reported).is_err());
        }
        // No parent where the kernel reports parents: a virtual link, whatever its MAC.
        assert!(r.identify(&link(M, None), true).is_err());
        // Where it may not: the MAC decides.
        assert!(r.identify(&link(M, None), false).is_ok());
        assert!(r.identify(&link(OTHER, None), false).is_err());
    }

    #[test]
    fn without_the_vf_address_only_an_expected_mac_proves_it() {
        assert!(req(None, &[M]).identify(&link(M, None), true).is_ok());
        assert!(req(None, &[M]).identify(&link(M, Some(VF)), true).is_ok());
        let e = req(None, &[M])
            .identify(&link(OTHER, None), true)
            .unwrap_err();
        assert!(e.contains(OTHER) && e.contains(M), "{e}");
        assert!(req(None, &[]).identify(&link(M, None), false).is_err());
        let no_mac = LinkInfo::default();
        assert!(req(None, &[M]).identify(&no_mac, false).is_err());
    }

    #[test]
    fn at_home_under_its_name_only_another_parent_makes_it_foreign() {
        let r = req(Some(VF), &[M]);
        assert_eq!(r.foreign_at_home(&link(OTHER, Some(VF)), true), None);
        assert!(
            r.foreign_at_home(&link(M, Some("0000:3b:02.2")), false)
                .is_some()
        );
        assert!(r.foreign_at_home(&link(M, None), true).is_some());
        assert_eq!(r.foreign_at_home(&link(M, None), false), None);
        assert_eq!(
            req(None, &[]).foreign_at_home(&link(OTHER, None), true),
            None
        );
    }
}
