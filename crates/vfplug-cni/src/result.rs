//! The protocol's messages as types: the ADD result (and `prevResult`, and a delegated IPAM
//! plugin's result), and the error object.
//!
//! [`CniResult`] is the one internal form (1.1.0's fields; older versions' results are converted
//! up into it on reading, as sriov-cni does with libcni's `NewResultFromResult`).
//! [`CniResult::decode`] reads a result of any supported version; [`CniResult::to_version`]
//! writes exactly the fields of the version the config asked for. The three shapes, as the spec
//! of each version and libcni's `pkg/types/{020,040,100}` define them:
//!
//! - 1.0.0, 1.1.0 (`types100`): `interfaces`, `ips` (`address`, `gateway`, `interface`),
//!   `routes`, `dns` (left out when empty); 1.1.0 adds `interfaces[].mtu`, `socketPath`,
//!   `pciID` and the route attributes `mtu`, `advmss`, `priority`, `table`, `scope`;
//! - 0.3.0, 0.3.1, 0.4.0 (`types040`): as 1.0.0 plus `ips[].version` (`"4"`/`"6"`, from the
//!   address, as `types100.convertIPConfigTo040` does); `dns` always written (Go's `omitempty`
//!   never leaves out a struct);
//! - 0.1.0, 0.2.0 (`types020`, [`Result020`]): `ip4` and `ip6` objects (`ip`, `gateway`,
//!   `routes`) and `dns`; no interfaces. Only the first address of each family fits, routes go
//!   under the object of their destination's family, and a result without any address cannot be
//!   written (`types040.convertTo02x`: "cannot convert: no valid IP addresses").

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
    /// `"4"` or `"6"`, as 0.3.x/0.4.0's `ips[].version`.
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
    /// `"4"` or `"6"` (0.3.0 to 0.4.0 only; never set in the internal form).
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
    /// This result written as `version` expects (see the module docs). Fails only for 0.1.0 and
    /// 0.2.0 when there is no address to write.
    pub fn to_version(&self, version: CniVersion) -> Result<VersionedResult, String> {
        if version.is_legacy() {
            return self.to_020(version).map(VersionedResult::V02);
        }
        let mut r = self.clone();
        r.cni_version = version.as_str().to_owned();
        for ip in &mut r.ips {
            ip.version = version
                .has_ip_version()
                .then(|| ip.address.family().to_owned());
        }
        if version < CniVersion::V1_1_0 {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for rt in &mut r.routes {
                *rt = rt.dst_gw();
            }
        }
        Ok(if version.has_ip_version() {
            VersionedResult::V04(r)
        } else {
            VersionedResult::V1(r)
        })
    }

    /// 0.1.0/0.2.0's form, as libcni's `types040.convertTo02x`: the first address of each
    /// family with its gateway, the routes (destination and gateway only) under the object of
    /// their destination's family (dropped when that family has no address), `dns` as is.
    fn to_020(&self, version: CniVersion) -> Result<Result020, String> {
        let first = |v4: bool| {
            self.ips
                .iter()
                .find(|ip| ip.address.addr.is_ipv4() == v4)
                .map(|ip| IpConfig020 {
                    ip: ip.address,
                    gateway: ip.gateway,
                    routes: Vec::new(),
                })
        };
        let mut out = Result020 {
            cni_version: version.as_str().to_owned(),
            ip4: first(true),
            ip6: first(false),
            dns: self.dns.clone(),
        };
        if out.ip4.is_none() && out.ip6.is_none() {
            return Err(format!(
                "a cniVersion {version} result needs an IP address, and there is none \
                 (0.1.0 and 0.2.0 results are ip4/ip6 objects)"
            ));
        }
        for rt in &self.routes {
            let family = if rt.dst.addr.is_ipv4() {
                &mut out.ip4
            } else {
                &mut out.ip6
            };
            if let Some(ip) = family {
                ip.routes.push(rt.dst_gw());
            }
        }
        Ok(out)
    }

    /// Decodes a result (`prevResult`, or an IPAM plugin's stdout) into the internal form. Its
    /// shape is that of its own `cniVersion` when that names a supported version, else that of
    /// `expected` (the config's: libcni reads a `prevResult` without `cniVersion` as the
    /// config's version). 0.1.0/0.2.0 results are converted up as libcni's
    /// `types040.convertFrom02x` does: `ip4` then `ip6`, each followed by its routes. The error
    /// names the path of the offending field below `prefix` (`prevResult.interfaces[0].mtu: ...`).
    pub fn decode(
        v: serde_json::Value,
        expected: CniVersion,
        prefix: &str,
    ) -> Result<Self, String> {
        let own = v
            .get("cniVersion")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| s.parse::<CniVersion>().ok());
        if own.unwrap_or(expected).is_legacy() {
            return decode_at::<Result020>(v, prefix).map(Result020::into_current);
        }
        let mut r: Self = decode_at(v, prefix)?;
        // The internal form is 1.x's: 0.3.x/0.4.0's `version` is implied by the address.
        for ip in &mut r.ips {
            ip.version = None;
        }
        Ok(r)
    }

    /// Decodes a result from bytes (see [`CniResult::decode`]).
    pub fn decode_slice(b: &[u8], expected: CniVersion, prefix: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        Self::decode(v, expected, prefix)
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

impl Route {
    /// Only `dst` and `gw`: a route as versions before 1.1.0 write it.
    fn dst_gw(&self) -> Self {
        Self {
            dst: self.dst,
            gw: self.gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// A 0.1.0/0.2.0 result (libcni's `types020.Result`; spec 0.2.0, "Result").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Result020 {
    /// The version; libcni reads a missing one as 0.1.0.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub cni_version: String,
    /// The IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip4: Option<IpConfig020>,
    /// The IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<IpConfig020>,
    /// DNS settings (always written, as libcni does).
    #[serde(default)]
    pub dns: Dns,
}

/// `ip4` / `ip6` of a 0.1.0/0.2.0 result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig020 {
    /// The address with its prefix.
    pub ip: Cidr,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Routes of this family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

impl Result020 {
    /// The internal form (libcni's `types040.convertFrom02x`, then `types100.convertFrom04x`):
    /// `ip4` then `ip6` with their gateways, each one's routes in that order, `dns`; no
    /// interfaces, so no `ips[].interface`.
    pub fn into_current(self) -> CniResult {
        let mut out = CniResult {
            cni_version: if self.cni_version.is_empty() {
                CniVersion::OLDEST.as_str().to_owned()
            } else {
                self.cni_version
            },
            dns: self.dns,
            ..CniResult::default()
        };
        for ip in [self.ip4, self.ip6].into_iter().flatten() {
            out.ips.push(IpConfig {
                version: None,
                address: ip.ip,
                gateway: ip.gateway,
                interface: None,
            });
            out.routes.extend(ip.routes);
        }
        out
    }
}

/// A result in the shape of one version (what ADD prints; a `prevResult` handed on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionedResult {
    /// 1.0.0, 1.1.0: an empty `dns` is left out (libcni's `types100` `MarshalJSON`).
    V1(CniResult),
    /// 0.3.0, 0.3.1, 0.4.0: with `ips[].version`, and `dns` always written.
    V04(CniResult),
    /// 0.1.0, 0.2.0.
    V02(Result020),
}

impl Serialize for VersionedResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// 0.3.x/0.4.0's field list: as [`CniResult`]'s, but `dns` even when empty.
        #[derive(Serialize)]
        struct V04<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            #[serde(skip_serializing_if = "no_items")]
            interfaces: &'a [Interface],
            #[serde(skip_serializing_if = "no_items")]
            ips: &'a [IpConfig],
            #[serde(skip_serializing_if = "no_items")]
            routes: &'a [Route],
            dns: &'a Dns,
        }
        fn no_items<T>(v: &&[T]) -> bool {
            v.is_empty()
        }
        match self {
            Self::V1(r) => r.serialize(s),
            Self::V04(r) => V04 {
                cni_version: &r.cni_version,
                interfaces: &r.interfaces,
                ips: &r.ips,
                routes: &r.routes,
                dns: &r.dns,
            }
            .serialize(s),
            Self::V02(r) => r.serialize(s),
        }
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
