//! The protocol's messages as types: the ADD result (and `prevResult`, and a delegated IPAM
//! plugin's result), and the error object.
//!
//! One set of structs reads every supported version (fields of other versions are optional);
//! [`CniResult::shaped`] then writes exactly the fields of the version the config asked for:
//! 0.4.0 has `ips[].version`; 1.1.0 adds `interfaces[].mtu`, `socketPath`, `pciID` and the
//! route attributes `mtu`, `advmss`, `priority`, `table`, `scope`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CniError;
use crate::version::CniVersion;

/// An address with its prefix length, `10.1.2.3/24` or `fd00::3/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// `"4"` or `"6"`, as 0.4.0's `ips[].version`.
    pub fn family(&self) -> &'static str {
        if self.addr.is_ipv4() { "4" } else { "6" }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not an address in CIDR form (e.g. 10.1.2.3/24)");
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        // Digits only: u8's parser would also take "+24".
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let prefix: u8 = p.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An ADD result, a `prevResult`, or an IPAM plugin's result (which has no `interfaces` and no
/// `ips[].interface`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version of this result's format.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Interfaces, in order; `ips[].interface` indexes this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// `interfaces[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name (in the sandbox when `sandbox` is set).
    pub name: String,
    /// Hardware address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path (or hypervisor id) the interface is in; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A socket a userspace interface is reached by (1.1).
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// PCI address of the device behind the interface (1.1): the VF.
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// `ips[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"` (0.4.0 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The address with its prefix.
    pub address: Cidr,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// `routes[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: Cidr,
    /// Next hop; absent means the default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Priority (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Scope (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// `dns`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set (then `dns` is left out).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// This result written as `version` expects: `cniVersion` set, 0.4.0's `ips[].version`
    /// filled in (and removed for later versions), 1.1-only fields removed for older versions.
    pub fn shaped(mut self, version: CniVersion) -> Self {
        self.cni_version = version.as_str().to_owned();
        for ip in &mut self.ips {
            ip.version = (version == CniVersion::V0_4_0).then(|| ip.address.family().to_owned());
        }
        if version < CniVersion::V1_1_0 {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for r in &mut self.routes {
                r.mtu = None;
                r.advmss = None;
                r.priority = None;
                r.table = None;
                r.scope = None;
            }
        }
        self
    }

    /// Decodes a result (`prevResult`, or an IPAM plugin's stdout); the error names the path of
    /// the offending field below `prefix` (`prevResult.interfaces[0].mtu: ...`).
    pub fn from_value(v: serde_json::Value, prefix: &str) -> Result<Self, String> {
        decode_at(v, prefix)
    }

    /// Decodes a result from bytes (see [`CniResult::from_value`]).
    pub fn from_slice(b: &[u8], prefix: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        Self::from_value(v, prefix)
    }

    /// The index of the interface named `name` in `sandbox` (any sandbox when `sandbox` is
    /// empty).
    pub fn find_interface(&self, name: &str, sandbox: &str) -> Option<usize> {
        self.interfaces.iter().position(|i| {
            i.name == name
                && (sandbox.is_empty() || i.sandbox.as_deref().is_none_or(|s| s == sandbox))
        })
    }
}

/// The error object printed on stdout when a command fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResult {
    /// The config's version, or the newest supported one if the config was not read.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorResult {
    /// The object for `e` in `version`.
    pub fn new(e: &CniError, version: CniVersion) -> Self {
        Self {
            cni_version: version.as_str().to_owned(),
            code: e.code,
            msg: e.msg.clone(),
            details: e.details.clone(),
        }
    }
}

/// An error a delegated plugin printed: only `code` is needed to pass it through.
#[derive(Clone, Debug, Deserialize)]
pub struct DelegateError {
    /// Its code.
    pub code: u32,
    /// Its message.
    #[serde(default)]
    pub msg: String,
    /// Its details.
    #[serde(default)]
    pub details: String,
}

/// Decodes `v` as `T`; an error names the offending field's path below `prefix`
/// (`prefix.a[0].b: message`).
pub(crate) fn decode_at<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    prefix: &str,
) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let at = match (prefix.is_empty(), path == ".") {
            (true, true) => String::new(),
            (true, false) => format!("{path}: "),
            (false, true) => format!("{prefix}: "),
            (false, false) if path.starts_with('[') => format!("{prefix}{path}: "),
            (false, false) => format!("{prefix}.{path}: "),
        };
        format!("{at}{}", e.inner())
    })
}
