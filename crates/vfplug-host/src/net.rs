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

use vfplug_core::{MacAddr, VfLinkState, VlanProto};

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
    /// A link found under a name other than `host_name` is only taken if its MAC is one of
    /// these (the MAC it had in the pod, its host MAC); empty: no MAC check. Together with
    /// "it must be down", this keeps a host link that merely shares the pod's interface name
    /// from being taken for the VF.
    pub expect_macs: Vec<MacAddr>,
}

/// What [`NetdevOps::retrieve`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retrieved {
    /// Moved back from the pod's netns and restored.
    FromPod,
    /// It was already in vfplugd's netns (the pod's netns died); renamed and restored.
    FromHost,
    /// Nowhere to be found (e.g. a virtual stand-in destroyed with its netns). Nothing done.
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
