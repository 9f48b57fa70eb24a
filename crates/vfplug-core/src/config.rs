//! Resource pools, read from vfplug's own YAML or from sriov-network-device-plugin's JSON.
//!
//! Start with [`Config::parse`]: it detects the format (a JSON object with a `resourceList` key is
//! SRIOV-DP's; anything else is vfplug's YAML), parses it and then runs [`Config::validate`].
//! Every error is a [`ConfigError`] naming the path of the offending field
//! (`pools[1].selectors.vendor: unknown field ...`).
//!
//! # Native format (YAML, strict)
//!
//! Unknown or misplaced keys are errors, so a `rootDevices` written next to `selectors` instead of
//! inside it (SRIOV-DP #181) is reported, not ignored.
//!
//! ```yaml
//! resourcePrefix: vfplug.io          # default prefix for every pool (default: vfplug.io)
//! pools:
//!   - name: intel_sriov_netdevice    # resource name -> vfplug.io/intel_sriov_netdevice
//!     prefix: intel.com              # optional per-pool prefix -> intel.com/intel_sriov_netdevice
//!     deviceMode: netdev             # netdev (default) | vfio
//!     bindVfio: false                # vfio pools only: vfplugd binds VFs to vfio-pci itself
//!     policy: pack                   # pack (default) | spread | numa (GetPreferredAllocation)
//!     health: { pfLinkDown: ignore } # ignore (default) | unhealthy
//!     excludeTopology: false         # true: do not report NUMA topology to kubelet
//!     needVhostNet: false            # also mount /dev/vhost-net and /dev/net/tun
//!     rdma: false                    # only VFs with RDMA devices; mount their char devices
//!     additionalInfo: { "*": { token: abc } }   # extra device-info, by VF address or "*"
//!     selectors:                     # one set, or a list of sets (a VF matching any set is in)
//!       vendors: ["8086"]
//!       devices: ["154c"]
//!       drivers: ["iavf", "vfio-pci"]
//!       pciAddresses: ["0000:3b:02.1"]
//!       pfNames: ["ens785f0#0-3,5"]      # PF netdev name, optional '#' VF index ranges
//!       rootDevices: ["0000:3b:00.0#0-7"]
//!       linkTypes: [ether]
//!       numaNodes: [0]
//! ```
//!
//! # SRIOV-DP format (JSON, lenient like Go)
//!
//! `{"resourceList": [{"resourceName": ..., "selectors": {...} | [{...}], ...}]}` is accepted
//! unchanged, with Go's quirks: keys match case-insensitively (`ResourceName`, `IsRdma`), `null`
//! means absent, `SelectorObj` is ignored, the default prefix is `intel.com`. Keys Go would ignore
//! are accepted but reported in [`Config::warnings`] (or rejected by
//! [`Config::from_sriovdp_json_strict`]). See [`Config::from_sriovdp_json`] for the mapping.
//!
//! Which VF goes to which pool: see [`crate::selector`].
//!
//! ```
//! use vfplug_core::{Config, ConfigFormat, DeviceMode};
//!
//! let dp = r#"{"resourceList": [{"resourceName": "dpdk",
//!              "selectors": {"vendors": ["8086"], "drivers": ["vfio-pci"], "IsRdma": false}}]}"#;
//! let cfg = Config::parse(dp).unwrap();
//! assert_eq!(cfg.format, ConfigFormat::SriovDp);
//! assert_eq!(cfg.resource_name(&cfg.pools[0]), "intel.com/dpdk");
//! assert_eq!(cfg.pools[0].device_mode, DeviceMode::Vfio);
//!
//! let err = Config::parse("pools:\n  - name: a\n    selectors: { vendor: [\"8086\"] }\n").unwrap_err();
//! assert_eq!(err.path, "pools[0].selectors.vendor");
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::alloc::AllocPolicy;
use crate::device::LinkType;
use crate::pci::PciAddress;
use crate::selector::{PfNameSelector, RootDeviceSelector, Selectors, norm_id};

/// Default resource prefix of the native format.
pub const DEFAULT_PREFIX: &str = "vfplug.io";
/// Default resource prefix of SRIOV-DP configs (its `--resource-prefix` default).
pub const SRIOVDP_DEFAULT_PREFIX: &str = "intel.com";

/// Drivers that give userspace (not a kernel netdev) access to a VF.
const USERSPACE_DRIVERS: &[&str] = &["vfio-pci", "igb_uio", "uio_pci_generic"];

/// How a pool's VFs are handed to workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceMode {
    /// The VF keeps its kernel driver; its netdev moves into the pod.
    #[default]
    Netdev,
    /// The VF is on vfio-pci; `/dev/vfio/*` goes to the pod or the VM.
    Vfio,
}

/// What a PF link going down does to its VFs' health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PfLinkDown {
    /// Nothing (the default; PF carrier is often down in labs and before cabling).
    #[default]
    Ignore,
    /// VFs of a PF without carrier are reported Unhealthy.
    Unhealthy,
}

/// Health settings of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthConfig {
    /// Reaction to the PF's carrier going down.
    #[serde(default)]
    pub pf_link_down: PfLinkDown,
}

/// One resource pool (one kubelet extended resource).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolConfig {
    /// Resource name without prefix.
    pub name: String,
    /// Prefix override; `None` = [`Config::resource_prefix`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// netdev or vfio.
    #[serde(default)]
    pub device_mode: DeviceMode,
    /// vfplugd binds the pool's VFs to vfio-pci (via `driver_override`) itself.
    #[serde(default)]
    pub bind_vfio: bool,
    /// GetPreferredAllocation policy.
    #[serde(default)]
    pub policy: AllocPolicy,
    /// Health settings.
    #[serde(default)]
    pub health: HealthConfig,
    /// Do not report NUMA topology (SRIOV-DP `excludeTopology`).
    #[serde(default)]
    pub exclude_topology: bool,
    /// Also mount `/dev/vhost-net` and `/dev/net/tun` (SRIOV-DP `needVhostNet`).
    #[serde(default)]
    pub need_vhost_net: bool,
    /// Only VFs with RDMA devices (sysfs `infiniband/`), and their RDMA character devices and the
    /// `rdma` info in Allocate (SRIOV-DP `isRdma`).
    #[serde(default)]
    pub rdma: bool,
    /// Extra device-info by VF address or `*` (SRIOV-DP `additionalInfo`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub additional_info: BTreeMap<String, BTreeMap<String, String>>,
    /// Selector sets; a VF matching any of them is selected.
    #[serde(deserialize_with = "one_or_many")]
    pub selectors: Vec<Selectors>,
}

/// Which syntax a config was read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConfigFormat {
    /// vfplug's YAML.
    #[default]
    Native,
    /// sriov-network-device-plugin's JSON `resourceList`.
    SriovDp,
}

/// The whole config: a default prefix and the pools, in priority order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Default prefix of every pool's resource name.
    #[serde(default = "default_prefix")]
    pub resource_prefix: String,
    /// Pools in config order; a VF selected by two pools belongs to the first.
    pub pools: Vec<PoolConfig>,
    /// The syntax this was parsed from.
    #[serde(skip)]
    pub format: ConfigFormat,
    /// Things that were accepted but deserve a log line (SRIOV-DP unknown keys, ignored
    /// selectors). Always empty for native configs, which are strict.
    #[serde(skip)]
    pub warnings: Vec<ConfigWarning>,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

/// What kind of problem a [`ConfigError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// Not YAML/JSON at all.
    Syntax,
    /// Well-formed, but wrong keys or value types.
    Schema,
    /// Parsed, but semantically invalid (duplicate names, contradictions, ...).
    Invalid,
}

/// A config problem, with the path of the field (`pools[1].selectors.vendor`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", if path.is_empty() { "(root)" } else { path.as_str() })]
pub struct ConfigError {
    /// Category.
    pub kind: ConfigErrorKind,
    /// Path of the offending field; empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(kind: ConfigErrorKind, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            path: path.into(),
            message: message.into(),
        }
    }
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ConfigErrorKind::Invalid, path, message)
    }
    fn schema(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ConfigErrorKind::Schema, path, message)
    }
}

/// Something accepted from a lenient (SRIOV-DP) config that the operator should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigWarning {
    /// Path of the key, in the source's own spelling (`resourceList[0].rootDevices`).
    pub path: String,
    /// What happened to it.
    pub message: String,
    /// Whether this is an unknown key (the strict SRIOV-DP mode rejects these).
    pub unknown_key: bool,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// `selectors:` may be one object or a list of objects. Done with a visitor, not an untagged
/// enum, so errors inside keep their message and path.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Selectors>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<Selectors>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a selector object or a list of selector objects")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Selectors::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(|s| vec![s])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<Selectors>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V)
}

impl Config {
    /// Parses either format (detected) and validates it.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_prefix(text, None)
    }

    /// Like [`Config::parse`], with vfplugd's `--resource-prefix`: the prefix of every pool
    /// that names none itself. SRIOV-DP configs take it instead of `intel.com`, exactly as the
    /// peer's `--resource-prefix`; a native config's own top-level `resourcePrefix` still wins.
    pub fn parse_with_prefix(
        text: &str,
        default_prefix: Option<&str>,
    ) -> Result<Self, ConfigError> {
        if looks_like_sriovdp(text) {
            Self::from_sriovdp_json_inner(text, default_prefix)
        } else {
            let mut cfg = Self::from_yaml(text)?;
            if let Some(p) = default_prefix
                && !yaml_has_top_key(text, "resourcePrefix")
            {
                cfg.resource_prefix = p.to_owned();
                cfg.validate()?;
            }
            Ok(cfg)
        }
    }

    /// Parses vfplug's native YAML strictly, then validates.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = clean_path(&e.path().to_string());
            let inner = e.into_inner();
            let msg = inner.to_string();
            let kind = if is_yaml_syntax(&msg) {
                ConfigErrorKind::Syntax
            } else {
                ConfigErrorKind::Schema
            };
            // serde reports an unknown field at its parent; name the field itself.
            let path = match unknown_field_name(&msg) {
                Some(field) if path.is_empty() => field.to_owned(),
                Some(field) if path == field || path.ends_with(&format!(".{field}")) => path,
                Some(field) => format!("{path}.{field}"),
                None => path,
            };
            ConfigError::new(kind, path, msg)
        })?;
        cfg.format = ConfigFormat::Native;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses sriov-network-device-plugin's JSON, then validates. Mapping:
    ///
    /// * `resourceName` → `name`, `resourcePrefix` → `prefix` (default prefix `intel.com`);
    /// * `deviceType: netDevice` → `deviceMode: vfio` when every `drivers` entry is `vfio-pci`,
    ///   else `netdev`; `accelerator` → `vfio` when its drivers are all `vfio-pci`, else refused;
    ///   `auxNetDevice` is refused (sub-functions are not PCI VFs);
    /// * selectors `vendors devices drivers pciAddresses pfNames rootDevices linkTypes` map 1:1;
    ///   `isRdma: true` sets `rdma`, `needVhostNet: true` sets `needVhostNet` (both also accepted
    ///   at the resource level, where older SRIOV-DP versions had them). vfplug keeps them per
    ///   pool, so selector sets of one resource that disagree on them are refused;
    /// * `ddpProfiles pKeys acpiIndexes vdpaType auxTypes`, and `uio`-family drivers: refused at
    ///   load, the error naming the key and why (a pool that silently matches nothing, or more
    ///   than the peer would, is a misconfiguration the operator must hear about);
    /// * unknown keys: accepted with a warning, as Go would ignore them.
    pub fn from_sriovdp_json(text: &str) -> Result<Self, ConfigError> {
        Self::from_sriovdp_json_inner(text, None)
    }

    fn from_sriovdp_json_inner(
        text: &str,
        default_prefix: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            ConfigError::new(ConfigErrorKind::Syntax, "", format!("invalid JSON: {e}"))
        })?;
        let (mut cfg, sources) = sriovdp::convert(&value)?;
        if let Some(p) = default_prefix {
            cfg.resource_prefix = p.to_owned();
        }
        // Report semantic errors in the user's vocabulary: `resourceList[3].resourceName`, not
        // the native `pools[2].name` (skipped resources shift the pool indexes).
        cfg.validate().map_err(|mut e| {
            e.path = sriovdp::source_path(&e.path, &sources);
            e
        })?;
        Ok(cfg)
    }

    /// Like [`Config::from_sriovdp_json`], but unknown keys are errors.
    pub fn from_sriovdp_json_strict(text: &str) -> Result<Self, ConfigError> {
        let cfg = Self::from_sriovdp_json(text)?;
        if let Some(w) = cfg.warnings.iter().find(|w| w.unknown_key) {
            return Err(ConfigError::schema(w.path.clone(), w.message.clone()));
        }
        Ok(cfg)
    }

    /// The prefix a pool's resource name gets.
    pub fn prefix_of<'a>(&'a self, pool: &'a PoolConfig) -> &'a str {
        pool.prefix.as_deref().unwrap_or(&self.resource_prefix)
    }

    /// The full extended resource name, `prefix/name`.
    pub fn resource_name(&self, pool: &PoolConfig) -> String {
        format!("{}/{}", self.prefix_of(pool), pool.name)
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Semantic checks; the first problem found, with its path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_prefix("resourcePrefix", &self.resource_prefix)?;
        if self.pools.is_empty() {
            return Err(ConfigError::invalid("pools", "no pools defined"));
        }
        let mut names = BTreeSet::new();
        let mut full_names = BTreeSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let at = |f: &str| format!("pools[{i}].{f}");
            validate_pool_name(&at("name"), &pool.name)?;
            if !names.insert(pool.name.as_str()) {
                return Err(ConfigError::invalid(
                    at("name"),
                    format!("duplicate pool name {:?}", pool.name),
                ));
            }
            if let Some(p) = &pool.prefix {
                validate_prefix(&at("prefix"), p)?;
            }
            if !full_names.insert(self.resource_name(pool)) {
                return Err(ConfigError::invalid(
                    at("name"),
                    format!("duplicate resource {:?}", self.resource_name(pool)),
                ));
            }
            if pool.bind_vfio && pool.device_mode != DeviceMode::Vfio {
                return Err(ConfigError::invalid(
                    at("bindVfio"),
                    "bindVfio needs deviceMode: vfio",
                ));
            }
            if pool.selectors.is_empty() {
                return Err(ConfigError::invalid(at("selectors"), "no selector sets"));
            }
            for key in pool.additional_info.keys() {
                if key != "*" && key.parse::<PciAddress>().is_err() {
                    return Err(ConfigError::invalid(
                        at(&format!("additionalInfo.{key}")),
                        "key must be \"*\" or a PCI address",
                    ));
                }
            }
            for (j, sel) in pool.selectors.iter().enumerate() {
                validate_selectors(&at(&format!("selectors[{j}]")), pool, sel)?;
            }
        }
        Ok(())
    }
}

fn validate_selectors(at: &str, pool: &PoolConfig, sel: &Selectors) -> Result<(), ConfigError> {
    for (field, list) in [("vendors", &sel.vendors), ("devices", &sel.devices)] {
        for (k, id) in list.iter().enumerate() {
            let n = norm_id(id);
            if n.len() != 4 || !n.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    format!("{at}.{field}[{k}]"),
                    format!("{id:?} is not a 4-digit hex PCI ID (e.g. \"8086\")"),
                ));
            }
        }
    }
    for (k, d) in sel.drivers.iter().enumerate() {
        if d.is_empty() || d.contains(['/', ' ', '\t', '\n']) {
            return Err(ConfigError::invalid(
                format!("{at}.drivers[{k}]"),
                format!("{d:?} is not a driver name"),
            ));
        }
    }
    if !sel.drivers.is_empty() {
        let userspace_only = sel
            .drivers
            .iter()
            .all(|d| USERSPACE_DRIVERS.contains(&d.as_str()));
        match pool.device_mode {
            DeviceMode::Vfio if !pool.bind_vfio && !sel.drivers.iter().any(|d| d == "vfio-pci") => {
                return Err(ConfigError::invalid(
                    format!("{at}.drivers"),
                    format!(
                        "deviceMode: vfio needs VFs on vfio-pci, but drivers {:?} never are \
                         (add vfio-pci, or set bindVfio: true)",
                        sel.drivers
                    ),
                ));
            }
            DeviceMode::Netdev if userspace_only => {
                return Err(ConfigError::invalid(
                    format!("{at}.drivers"),
                    format!(
                        "deviceMode: netdev needs a kernel network driver, but drivers {:?} \
                         are userspace-only (use deviceMode: vfio)",
                        sel.drivers
                    ),
                ));
            }
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    for (k, a) in sel.pci_addresses.iter().enumerate() {
        if !seen.insert(*a) {
            return Err(ConfigError::invalid(
                format!("{at}.pciAddresses[{k}]"),
                format!("duplicate address {a}"),
            ));
        }
    }
    Ok(())
}

/// Kubernetes extended resource names are qualified names: `prefix/name`, where `name` is at
/// most 63 characters of `[A-Za-z0-9_.-]`, starting and ending alphanumeric.
fn validate_pool_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let bad = |m: &str| Err(ConfigError::invalid(path, format!("{name:?}: {m}")));
    if name.is_empty() {
        return bad("empty pool name");
    }
    if name.len() > 63 {
        return bad("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return bad("only letters, digits, '-', '_' and '.' are allowed in a resource name");
    }
    let first = name.as_bytes()[0];
    let last = name.as_bytes()[name.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return bad("must start and end with a letter or digit");
    }
    Ok(())
}

/// A prefix is a DNS-1123 subdomain, and not in the reserved `kubernetes.io` domain.
fn validate_prefix(path: &str, prefix: &str) -> Result<(), ConfigError> {
    let bad = |m: &str| Err(ConfigError::invalid(path, format!("{prefix:?}: {m}")));
    if prefix.is_empty() {
        return bad("empty prefix");
    }
    if prefix.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in prefix.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return bad("not a DNS subdomain (lowercase letters, digits, '-' and '.')");
        }
    }
    if prefix == "kubernetes.io" || prefix.ends_with(".kubernetes.io") {
        return bad("the kubernetes.io domain is reserved");
    }
    Ok(())
}

fn yaml_has_top_key(text: &str, key: &str) -> bool {
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => m.contains_key(key),
        _ => false,
    }
}

fn looks_like_sriovdp(text: &str) -> bool {
    if !text.trim_start().starts_with('{') {
        return false;
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m.keys().any(|k| k.eq_ignore_ascii_case("resourceList")),
        // Broken JSON that mentions resourceList: report it as JSON, not as YAML.
        Ok(_) => false,
        Err(_) => text.to_ascii_lowercase().contains("resourcelist"),
    }
}

fn is_yaml_syntax(msg: &str) -> bool {
    // serde_yaml has no error kind; its scanner/parser messages are the syntax errors.
    [
        "did not find expected",
        "found character that cannot start",
        "mapping values are not allowed",
        "while scanning",
        "while parsing",
        "found unexpected end of stream",
        "control characters are not allowed",
        "invalid leading UTF-8",
        "found unknown escape",
        "recursion limit",
    ]
    .iter()
    .any(|p| msg.contains(p))
}

fn unknown_field_name(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(f, _)| f)
}

fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_owned()
    }
}

/// The SRIOV-DP JSON walker. Go's `encoding/json` semantics: case-insensitive keys (an exact
/// match preferred), `null` = absent, unknown keys ignored (here: warned about).
mod sriovdp {
    use super::*;

    struct Obj<'a> {
        path: String,
        map: &'a serde_json::Map<String, Value>,
        used: BTreeSet<&'a str>,
    }

    impl<'a> Obj<'a> {
        fn new(path: String, v: &'a Value) -> Result<Self, ConfigError> {
            match v {
                Value::Object(map) => Ok(Self {
                    path,
                    map,
                    used: BTreeSet::new(),
                }),
                other => Err(ConfigError::schema(
                    path,
                    format!("expected an object, found {}", kind(other)),
                )),
            }
        }

        fn key_path(&self, key: &str) -> String {
            if self.path.is_empty() {
                key.to_owned()
            } else {
                format!("{}.{key}", self.path)
            }
        }

        /// The value of `field`, matched like Go does; `None` when absent or null.
        fn get(&mut self, field: &str) -> Result<Option<(&'a str, &'a Value)>, ConfigError> {
            let mut found: Option<(&'a str, &'a Value)> = None;
            for (k, v) in self.map.iter() {
                if k.eq_ignore_ascii_case(field) {
                    if let Some((prev, _)) = found {
                        return Err(ConfigError::schema(
                            self.key_path(k),
                            format!(
                                "duplicate key (also given as {prev:?}; keys are case-insensitive)"
                            ),
                        ));
                    }
                    found = Some((k.as_str(), v));
                }
            }
            if let Some((k, _)) = found {
                self.used.insert(k);
            }
            Ok(found.filter(|(_, v)| !v.is_null()))
        }

        fn string(&mut self, field: &str) -> Result<Option<String>, ConfigError> {
            match self.get(field)? {
                None => Ok(None),
                Some((_, Value::String(s))) => Ok(Some(s.clone())),
                Some((k, other)) => Err(ConfigError::schema(
                    self.key_path(k),
                    format!("expected a string, found {}", kind(other)),
                )),
            }
        }

        fn boolean(&mut self, field: &str) -> Result<Option<bool>, ConfigError> {
            match self.get(field)? {
                None => Ok(None),
                Some((_, Value::Bool(b))) => Ok(Some(*b)),
                Some((k, other)) => Err(ConfigError::schema(
                    self.key_path(k),
                    format!("expected true or false, found {}", kind(other)),
                )),
            }
        }

        /// A list of strings, with the path of each element for error messages.
        fn strings(&mut self, field: &str) -> Result<Vec<(String, String)>, ConfigError> {
            match self.get(field)? {
                None => Ok(Vec::new()),
                Some((k, Value::Array(items))) => items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let p = format!("{}[{i}]", self.key_path(k));
                        match v {
                            Value::String(s) => Ok((p, s.clone())),
                            other => Err(ConfigError::schema(
                                p,
                                format!("expected a string, found {}", kind(other)),
                            )),
                        }
                    })
                    .collect(),
                Some((k, other)) => Err(ConfigError::schema(
                    self.key_path(k),
                    format!("expected a list of strings, found {}", kind(other)),
                )),
            }
        }

        /// Warns about every key that no field consumed.
        fn finish(
            self,
            warnings: &mut Vec<ConfigWarning>,
            hint: &dyn Fn(&str) -> Option<&'static str>,
        ) {
            for k in self.map.keys() {
                if !self.used.contains(k.as_str()) {
                    let mut message =
                        "unknown key, ignored (as sriov-network-device-plugin would)".to_owned();
                    if let Some(h) = hint(k) {
                        message.push_str("; ");
                        message.push_str(h);
                    }
                    warnings.push(ConfigWarning {
                        path: self.key_path(k),
                        message,
                        unknown_key: true,
                    });
                }
            }
        }
    }

    fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        }
    }

    const SELECTOR_KEYS: &[&str] = &[
        "vendors",
        "devices",
        "drivers",
        "pciAddresses",
        "acpiIndexes",
        "pfNames",
        "rootDevices",
        "linkTypes",
        "ddpProfiles",
        "pKeys",
        "isRdma",
        "needVhostNet",
        "vdpaType",
        "auxTypes",
    ];

    /// SRIOV-DP selectors vfplug refuses, and why (the error text).
    const REFUSED_SELECTORS: &[(&str, &str)] = &[
        (
            "acpiIndexes",
            "not supported: acpi_index is a firmware attribute of physical functions, VFs have \
             none, so on vfplug (which offers VFs only) it could never match; use pfNames, \
             rootDevices or pciAddresses",
        ),
        (
            "ddpProfiles",
            "not supported: vfplug does not read Intel DDP profiles (SRIOV-DP asks devlink or \
             runs ddptool); select the PF's VFs with pfNames or rootDevices instead",
        ),
        (
            "pKeys",
            "not supported: vfplug does not read InfiniBand partition keys; select the VFs with \
             pfNames, rootDevices or pciAddresses instead",
        ),
        (
            "vdpaType",
            "not supported: vfplug does not create or hand out vDPA devices",
        ),
        (
            "auxTypes",
            "not supported: auxiliary devices (deviceType auxNetDevice) are not PCI VFs",
        ),
    ];

    /// Drivers whose devices SRIOV-DP hands out as `/dev/uioN` (infoprovider/uioInfoProvider.go)
    /// or, for uio_pci_generic, as nothing at all.
    const UIO_DRIVERS: &[&str] = &["uio", "igb_uio", "uio_pci_generic"];

    fn misplaced_selector(k: &str) -> Option<&'static str> {
        SELECTOR_KEYS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(k))
            .then_some("this is a selector: did you mean to put it inside \"selectors\"?")
    }

    /// Rewrites a native path (`pools[2].selectors[0].drivers`) into the SRIOV-DP source path
    /// (`resourceList[3].selectors[0].drivers`); `sources[i]` is pool i's resourceList index.
    pub(super) fn source_path(path: &str, sources: &[usize]) -> String {
        let Some(rest) = path.strip_prefix("pools[") else {
            return path.to_owned();
        };
        let Some((idx, tail)) = rest.split_once(']') else {
            return path.to_owned();
        };
        let Some(src) = idx.parse::<usize>().ok().and_then(|i| sources.get(i)) else {
            return path.to_owned();
        };
        let tail = match tail {
            ".name" => ".resourceName",
            ".prefix" => ".resourcePrefix",
            t => t,
        };
        format!("resourceList[{src}]{tail}")
    }

    /// The config, and for each pool the index of its resource in `resourceList`.
    pub(super) fn convert(v: &Value) -> Result<(Config, Vec<usize>), ConfigError> {
        let mut warnings = Vec::new();
        let mut top = Obj::new(String::new(), v)?;
        let list = match top.get("resourceList")? {
            Some((_, Value::Array(items))) => items,
            Some((k, other)) => {
                return Err(ConfigError::schema(
                    k,
                    format!("expected a list, found {}", kind(other)),
                ));
            }
            None => return Err(ConfigError::schema("resourceList", "missing or null")),
        };
        top.finish(&mut warnings, &|_| None);
        let mut pools = Vec::new();
        let mut sources = Vec::new();
        for (i, res) in list.iter().enumerate() {
            if let Some(pool) = resource(&format!("resourceList[{i}]"), res, &mut warnings)? {
                pools.push(pool);
                sources.push(i);
            }
        }
        let cfg = Config {
            resource_prefix: SRIOVDP_DEFAULT_PREFIX.to_owned(),
            pools,
            format: ConfigFormat::SriovDp,
            warnings,
        };
        Ok((cfg, sources))
    }

    fn resource(
        path: &str,
        v: &Value,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<Option<PoolConfig>, ConfigError> {
        let mut o = Obj::new(path.to_owned(), v)?;
        let name = o
            .string("resourceName")?
            .ok_or_else(|| ConfigError::schema(o.key_path("resourceName"), "missing (required)"))?;
        let prefix = o.string("resourcePrefix")?.filter(|p| !p.is_empty());
        let device_type = o
            .string("deviceType")?
            .unwrap_or_else(|| "netDevice".to_owned());
        let exclude_topology = o.boolean("excludeTopology")?.unwrap_or(false);
        let top_rdma = o.boolean("isRdma")?.unwrap_or(false);
        let top_vhost = o.boolean("needVhostNet")?.unwrap_or(false);
        // Operator-generated configs carry `"SelectorObj": null`; Go has it as an internal field.
        let _ = o.get("SelectorObj")?;
        let additional_info = match o.get("additionalInfo")? {
            None => BTreeMap::new(),
            Some((k, v)) => {
                serde_json::from_value::<BTreeMap<String, BTreeMap<String, String>>>(v.clone())
                    .map_err(|e| {
                        ConfigError::schema(
                            o.key_path(k),
                            format!("expected {{\"<pci or *>\": {{\"key\": \"value\"}}}}: {e}"),
                        )
                    })?
            }
        };
        let sel_values: Vec<(String, &Value)> = match o.get("selectors")? {
            None => Vec::new(),
            Some((k, Value::Array(items))) => items
                .iter()
                .enumerate()
                .map(|(j, v)| (format!("{}[{j}]", o.key_path(k)), v))
                .collect(),
            Some((k, v @ Value::Object(_))) => vec![(o.key_path(k), v)],
            Some((k, other)) => {
                return Err(ConfigError::schema(
                    o.key_path(k),
                    format!(
                        "expected an object or a list of objects, found {}",
                        kind(other)
                    ),
                ));
            }
        };
        let sel_key_path = o.key_path("selectors");
        o.finish(warnings, &misplaced_selector);

        let mut rdma = top_rdma;
        let mut vhost = top_vhost;
        let mut selectors = Vec::new();
        let mut all_drivers: Vec<String> = Vec::new();
        // SRIOV-DP applies isRdma and needVhostNet per selector object; vfplug per pool. Equal
        // on every set, both mean the same; different sets would silently change what some
        // devices get, so that is refused.
        let mut first: Option<(bool, bool)> = None;
        for (p, sv) in sel_values {
            let (s, r, vh) = selector(&p, sv, warnings)?;
            match first {
                None => first = Some((r, vh)),
                Some((r0, vh0)) => {
                    for (key, a, b) in [("isRdma", r0, r), ("needVhostNet", vh0, vh)] {
                        if a != b {
                            return Err(ConfigError::invalid(
                                format!("{p}.{key}"),
                                format!(
                                    "{key} differs between the selector sets of one resource; \
                                     vfplug applies it to the whole pool: split the sets into \
                                     two resources, or set it the same on every set"
                                ),
                            ));
                        }
                    }
                }
            }
            rdma |= r;
            vhost |= vh;
            all_drivers.extend(s.drivers.iter().cloned());
            selectors.push(s);
        }
        if selectors.is_empty() {
            return Err(ConfigError::schema(
                sel_key_path,
                "missing: a resource needs selectors",
            ));
        }
        let vfio_only = !all_drivers.is_empty() && all_drivers.iter().all(|d| d == "vfio-pci");
        let device_mode = match device_type.as_str() {
            "netDevice" => {
                if vfio_only {
                    DeviceMode::Vfio
                } else {
                    DeviceMode::Netdev
                }
            }
            "accelerator" if vfio_only => DeviceMode::Vfio,
            "accelerator" => {
                return Err(ConfigError::invalid(
                    format!("{path}.deviceType"),
                    "deviceType accelerator is supported only with drivers: [\"vfio-pci\"]: \
                     vfplug hands out VFs as netdevs or as vfio devices, and an accelerator VF \
                     on a kernel driver is neither",
                ));
            }
            "auxNetDevice" => {
                return Err(ConfigError::invalid(
                    format!("{path}.deviceType"),
                    "deviceType auxNetDevice is not supported: auxiliary devices (mlx5 \
                     sub-functions) are not PCI VFs, and vfplug manages PCI VFs only",
                ));
            }
            other => {
                return Err(ConfigError::schema(
                    format!("{path}.deviceType"),
                    format!(
                        "unknown deviceType {other:?}, expected netDevice, accelerator or auxNetDevice"
                    ),
                ));
            }
        };
        Ok(Some(PoolConfig {
            name,
            prefix,
            device_mode,
            bind_vfio: false,
            policy: AllocPolicy::default(),
            health: HealthConfig::default(),
            exclude_topology,
            need_vhost_net: vhost,
            rdma,
            additional_info,
            selectors,
        }))
    }

    fn parse_each<T: std::str::FromStr>(items: Vec<(String, String)>) -> Result<Vec<T>, ConfigError>
    where
        T::Err: fmt::Display,
    {
        items
            .into_iter()
            .map(|(p, s)| {
                s.parse::<T>()
                    .map_err(|e| ConfigError::schema(p, e.to_string()))
            })
            .collect()
    }

    /// One selector object → (selectors, isRdma, needVhostNet).
    fn selector(
        path: &str,
        v: &Value,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<(Selectors, bool, bool), ConfigError> {
        let mut o = Obj::new(path.to_owned(), v)?;
        let ids =
            |items: Vec<(String, String)>| items.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        let mut s = Selectors {
            vendors: ids(o.strings("vendors")?),
            devices: ids(o.strings("devices")?),
            drivers: ids(o.strings("drivers")?),
            pci_addresses: parse_each::<PciAddress>(o.strings("pciAddresses")?)?,
            pf_names: parse_each::<PfNameSelector>(o.strings("pfNames")?)?,
            root_devices: parse_each::<RootDeviceSelector>(o.strings("rootDevices")?)?,
            ..Selectors::default()
        };
        for (p, lt) in o.strings("linkTypes")? {
            let t = match lt.to_ascii_lowercase().as_str() {
                "ether" | "eth" | "ethernet" => LinkType::Ether,
                "infiniband" | "ib" => LinkType::Infiniband,
                _ => {
                    warnings.push(ConfigWarning {
                        path: p,
                        message: format!(
                            "link type {lt:?} is neither ether nor infiniband; matched as \"other\""
                        ),
                        unknown_key: false,
                    });
                    LinkType::Other
                }
            };
            s.link_types.push(t);
        }
        let rdma = o.boolean("isRdma")?.unwrap_or(false);
        let vhost = o.boolean("needVhostNet")?.unwrap_or(false);
        for (field, why) in REFUSED_SELECTORS {
            // An empty list or string is no constraint in SRIOV-DP either: accept it.
            let given = if *field == "vdpaType" {
                o.string(field)?.is_some_and(|t| !t.is_empty())
            } else {
                !o.strings(field)?.is_empty()
            };
            if given {
                return Err(ConfigError::invalid(o.key_path(field), *why));
            }
        }
        for (k, d) in s.drivers.iter().enumerate() {
            if UIO_DRIVERS.contains(&d.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{}[{k}]", o.key_path("drivers")),
                    format!(
                        "{d:?}: uio-bound VFs are not supported (SRIOV-DP's uio provider hands \
                         out /dev/uioN; vfplug does not): bind the VFs to vfio-pci, which DPDK \
                         also drives"
                    ),
                ));
            }
        }
        o.finish(warnings, &|_| None);
        Ok((s, rdma, vhost))
    }
}
