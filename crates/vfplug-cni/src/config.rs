//! The network configuration on stdin: sriov-cni's keys, the CNI spec's reserved ones and
//! vfplug's own (`socket`, `pool`, `timeoutSeconds`).
//!
//! Codes: input over [`MAX_CONFIG_BYTES`], input that is not JSON, and malformed data the
//! *runtime* fills in (`prevResult`, `cni.dev/valid-attachments`) are 6 (decode failure); a
//! key the *administrator* wrote with a wrong type or value is 7 and the message starts with the
//! key (`vlan: expected integer 0..=4094, got "ten"`); an unsupported `cniVersion` is 1.
//!
//! DEL, STATUS and GC read the config leniently: a bad value of a key they do not need (the VF
//! settings, `deviceID`, `logLevel`, ...) is recorded in [`NetConf::ignored`] instead of failing,
//! because a DEL that fails on a config ADD already refused would be retried forever.
//! Unknown top-level keys are accepted (they may be other plugins') and listed in
//! [`NetConf::unknown_keys`] for the debug log.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use vfplug_core::{MacAddr, PciAddress, VfConfig, VfLinkState, VlanProto};

use crate::env::Command;
use crate::error::CniError;
use crate::result::{CniResult, decode_at};
use crate::version::CniVersion;

/// The largest config accepted on stdin (1 MiB). Real configs are a few hundred bytes; a
/// `prevResult` of a long chain a few KiB.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// vfplugd's node API socket when the config has no `socket`.
pub const DEFAULT_SOCKET: &str = "/run/vfplug/vfplugd.sock";

/// Per-call time limit when the config has no `timeoutSeconds`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest `timeoutSeconds` accepted.
pub const MAX_TIMEOUT_SECONDS: u64 = 3600;

/// Keys this plugin reads, or knows to be the runtime's and deliberately ignores
/// (`cniVersions`, `capabilities`, `disableCheck`, `disableGC`).
pub const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "deviceID",
    "pool",
    "qmpSocket",
    "mac",
    "vlan",
    "vlanQoS",
    "vlanProto",
    "spoofchk",
    "trust",
    "link_state",
    "min_tx_rate",
    "max_tx_rate",
    "mtu",
    "ipam",
    "runtimeConfig",
    "args",
    "prevResult",
    "logLevel",
    "logFile",
    "socket",
    "timeoutSeconds",
    "capabilities",
    "disableCheck",
    "disableGC",
    VALID_ATTACHMENTS,
    OLD_ATTACHMENTS,
];

/// GC's list of attachments to keep (CNI 1.1).
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The key an earlier draft of the spec used; libcni sends both.
pub const OLD_ATTACHMENTS: &str = "cni.dev/attachments";

/// Log verbosity (`logLevel`, sriov-cni's values plus `warn` and `trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// `error` (also sriov-cni's `panic`).
    Error,
    /// `warning` / `warn`.
    Warn,
    /// `info` (the default).
    Info,
    /// `debug`.
    Debug,
    /// `trace`.
    Trace,
}

impl LogLevel {
    /// The `tracing` level name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "panic" | "error" => Self::Error,
            "warning" | "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }
}

/// The delegated IPAM plugin (`ipam`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConf {
    /// `ipam.type`: the executable's name in `CNI_PATH`.
    pub plugin_type: String,
}

/// `runtimeConfig`: what the runtime (Multus) fills in per attachment from the capabilities the
/// plugin declares. Other keys (`ips`, ...) are for the IPAM plugin, which gets the same stdin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// `runtimeConfig.mac` (highest MAC precedence).
    pub mac: Option<MacAddr>,
    /// `runtimeConfig.deviceID` (used only when the top-level `deviceID` is absent).
    pub device_id: Option<PciAddress>,
    /// `runtimeConfig.CNIDeviceInfoFile`: where to write the device-info file.
    pub device_info_file: Option<PathBuf>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    /// The container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    pub ifname: String,
}

/// The parsed network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: CniVersion,
    /// `name`: the network; GC is scoped by it.
    pub name: String,
    /// `type`.
    pub plugin_type: String,
    /// `deviceID`, or `runtimeConfig.deviceID` when the top-level key is absent.
    pub device_id: Option<PciAddress>,
    /// `pool`: pool or resource name to allocate from when there is no device ID.
    pub pool: Option<String>,
    /// `qmpSocket`: a VM pod's QMP socket as `<volume>/<file>` (docs/vm-pods.md); the VF is
    /// hot-plugged into that QEMU by vfplugd.
    pub qmp_socket: Option<String>,
    /// The VF settings from the top-level keys. `mac` here is the config's own `mac`; the
    /// effective MAC (precedence with `runtimeConfig.mac` and `CNI_ARGS`) is chosen later.
    pub vf: VfConfig,
    /// `runtimeConfig`.
    pub runtime_config: RuntimeConfig,
    /// `ipam`, if set and not empty (`"ipam": {}` means none, as in sriov-cni).
    pub ipam: Option<IpamConf>,
    /// `prevResult`.
    pub prev_result: Option<CniResult>,
    /// `logLevel`.
    pub log_level: Option<LogLevel>,
    /// `logFile` (stderr when absent).
    pub log_file: Option<PathBuf>,
    /// `socket`: vfplugd's node API.
    pub socket: PathBuf,
    /// `timeoutSeconds`, per node API call and per delegated plugin run.
    pub timeout: Duration,
    /// `cni.dev/valid-attachments` (falling back to `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Top-level keys not in [`KNOWN_KEYS`] (for the debug log).
    pub unknown_keys: Vec<String>,
    /// Lenient commands: errors of keys the command does not need, skipped.
    pub ignored: Vec<String>,
}

impl NetConf {
    /// Parses `stdin` for `command` (see the module docs for codes and leniency).
    pub fn parse(stdin: &[u8], command: Command) -> Result<Self, CniError> {
        if stdin.len() > MAX_CONFIG_BYTES {
            return Err(CniError::decode(format!(
                "network config on stdin is larger than the {MAX_CONFIG_BYTES}-byte limit"
            )));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::decode(format!("network config on stdin is not valid JSON: {e}"))
        })?;
        let Value::Object(map) = value else {
            return Err(CniError::decode(format!(
                "network config must be a JSON object, got {}",
                describe(&value)
            )));
        };
        let lenient = matches!(command, Command::Del | Command::Status | Command::Gc);
        let mut r = Reader {
            map,
            lenient,
            ignored: Vec::new(),
        };
        let unknown_keys = r
            .map
            .keys()
            .filter(|k| !KNOWN_KEYS.iter().any(|known| known.eq_ignore_ascii_case(k)))
            .cloned()
            .collect();

        // libcni reads a config without `cniVersion` (or with "") as 0.1.0
        // (pkg/types/create/create.go, `DecodeVersion`), and so does sriov-cni.
        let cni_version: CniVersion = match r.take("cniVersion") {
            None => CniVersion::OLDEST,
            Some(v) => match as_str("cniVersion", v)?.as_str() {
                "" => CniVersion::OLDEST,
                s => s.parse()?,
            },
        };
        cni_version.allows(command)?;
        let name = r
            .take("name")
            .map(|v| as_str("name", v))
            .transpose()?
            .ok_or_else(|| CniError::config("name: missing network name"))?;
        validate_network_name(&name)?;
        let plugin_type = r
            .take("type")
            .map(|v| as_str("type", v))
            .transpose()?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CniError::config("type: missing plugin type"))?;

        let socket = match r.take("socket") {
            None => PathBuf::from(DEFAULT_SOCKET),
            Some(v) => abs_path("socket", v)?,
        };
        let timeout = match r.take("timeoutSeconds") {
            None => DEFAULT_TIMEOUT,
            Some(v) => {
                let s = as_uint("timeoutSeconds", v, MAX_TIMEOUT_SECONDS, "1..=3600")?;
                if s == 0 {
                    return Err(CniError::config(format!(
                        "timeoutSeconds: expected integer 1..={MAX_TIMEOUT_SECONDS}, got 0"
                    )));
                }
                Duration::from_secs(s)
            }
        };
        let ipam = match r.take("ipam") {
            None => None,
            Some(v) => parse_ipam(v)?,
        };

        let top_device_id = r.soft_take("deviceID", |v| pci("deviceID", v))?;
        let qmp_socket = r.soft_take("qmpSocket", |v| qmp_socket_spec("qmpSocket", v))?;
        let pool = r.soft_take("pool", |v| {
            let s = as_str("pool", v)?;
            if s.is_empty() || s.chars().any(char::is_control) {
                return Err(CniError::config(format!(
                    "pool: {s:?} is not a pool or resource name"
                )));
            }
            Ok(s)
        })?;
        let vf = VfConfig {
            mac: r.soft_take("mac", |v| mac("mac", v))?,
            vlan: r.soft_take("vlan", |v| {
                as_uint("vlan", v, u64::from(u16::MAX), "0..=4094").map(|n| n as u16)
            })?,
            vlan_qos: r.soft_take("vlanQoS", |v| {
                as_uint("vlanQoS", v, u64::from(u8::MAX), "0..=7").map(|n| n as u8)
            })?,
            vlan_proto: r.soft_take("vlanProto", |v| {
                let s = as_str("vlanProto", v)?;
                s.parse::<VlanProto>()
                    .map_err(|e| CniError::config(format!("vlanProto: {e}")))
            })?,
            spoofchk: r.soft_take("spoofchk", |v| on_off("spoofchk", v))?,
            trust: r.soft_take("trust", |v| on_off("trust", v))?,
            link_state: r.soft_take("link_state", |v| {
                let s = as_str("link_state", v)?;
                s.parse::<VfLinkState>()
                    .map_err(|e| CniError::config(format!("link_state: {e}")))
            })?,
            min_tx_rate: r.soft_take("min_tx_rate", |v| {
                as_uint(
                    "min_tx_rate",
                    v,
                    u64::from(u32::MAX),
                    "0..=4294967295 (Mbit/s)",
                )
                .map(|n| n as u32)
            })?,
            max_tx_rate: r.soft_take("max_tx_rate", |v| {
                as_uint(
                    "max_tx_rate",
                    v,
                    u64::from(u32::MAX),
                    "0..=4294967295 (Mbit/s)",
                )
                .map(|n| n as u32)
            })?,
            mtu: r.soft_take("mtu", |v| {
                as_uint("mtu", v, u64::from(u32::MAX), "68..=65535").map(|n| n as u32)
            })?,
        };
        let runtime_config = r
            .soft_take("runtimeConfig", parse_runtime_config)?
            .unwrap_or_default();
        // `args.cni` is per attachment (Multus fills it from the network selection's `cni-args`):
        // its `qmpSocket` wins over the network's.
        let args_qmp = r
            .soft_take("args", |v| match v {
                Value::Object(m) => match m.get("cni").and_then(|c| c.get("qmpSocket")) {
                    None | Some(Value::Null) => Ok(None),
                    Some(q) => qmp_socket_spec("args.cni.qmpSocket", q.clone()).map(Some),
                },
                other => Err(CniError::config(format!(
                    "args: expected an object, got {}",
                    describe(&other)
                ))),
            })?
            .flatten();
        let qmp_socket = args_qmp.or(qmp_socket);
        let log_level = r.soft_take("logLevel", |v| {
            let s = as_str("logLevel", v)?;
            LogLevel::parse(&s).ok_or_else(|| {
                CniError::config(format!(
                    "logLevel: {s:?} is not a level (error, warning, info, debug, trace)"
                ))
            })
        })?;
        let log_file = r.soft_take("logFile", |v| abs_path("logFile", v))?;

        // prevResult is the runtime's: malformed means "cannot decode" (6). DEL only uses it
        // as a hint, so there it is skipped (lenient). It is read in its own version's shape,
        // else the config's, and converted up (libcni's `ParsePrevResult`).
        let prev_result = r.soft_take("prevResult", |v| {
            CniResult::decode(v, cni_version, "prevResult").map_err(CniError::decode)
        })?;

        let valid = r.take(VALID_ATTACHMENTS);
        let old = r.take(OLD_ATTACHMENTS);
        let valid_attachments = match (valid, old) {
            (Some(v), _) => Some(decode_at(v, VALID_ATTACHMENTS).map_err(CniError::decode)?),
            (None, Some(v)) => Some(decode_at(v, OLD_ATTACHMENTS).map_err(CniError::decode)?),
            (None, None) => None,
        };

        let device_id = top_device_id.or(runtime_config.device_id);
        Ok(Self {
            cni_version,
            name,
            plugin_type,
            device_id,
            pool,
            qmp_socket,
            vf,
            runtime_config,
            ipam,
            prev_result,
            log_level,
            log_file,
            socket,
            timeout,
            valid_attachments,
            unknown_keys,
            ignored: r.ignored,
        })
    }

    /// The cniVersion a config declares, if it can be read at all, for the version of an error
    /// printed when the rest of the config is bad (an object without one is 0.1.0's, as
    /// above).
    pub fn peek_version(stdin: &[u8]) -> Option<CniVersion> {
        #[derive(Deserialize)]
        struct V {
            #[serde(rename = "cniVersion", default)]
            v: Option<String>,
        }
        if stdin.len() > MAX_CONFIG_BYTES {
            return None;
        }
        match serde_json::from_slice::<V>(stdin).ok()?.v.as_deref() {
            None | Some("") => Some(CniVersion::OLDEST),
            Some(s) => s.parse().ok(),
        }
    }
}

/// Takes keys out of the config object one by one.
struct Reader {
    map: Map<String, Value>,
    lenient: bool,
    ignored: Vec<String>,
}

impl Reader {
    /// The key's value; `null` counts as absent (like Go's pointer fields). As Go's
    /// `encoding/json` (which sriov-cni and libcni decode with) does, a key spelled in another
    /// case (`"VLAN"`) counts when the exact spelling is absent: a NAD that works with sriov-cni
    /// must not silently lose a setting here.
    fn take(&mut self, key: &str) -> Option<Value> {
        let found = if self.map.contains_key(key) {
            Some(key.to_owned())
        } else {
            self.map
                .keys()
                .find(|k| k.eq_ignore_ascii_case(key))
                .cloned()
        };
        found
            .and_then(|k| self.map.remove(&k))
            .filter(|v| !v.is_null())
    }

    /// Reads a key a lenient command may do without: its error is recorded and skipped there.
    fn soft_take<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(Value) -> Result<T, CniError>,
    ) -> Result<Option<T>, CniError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        match parse(v) {
            Ok(t) => Ok(Some(t)),
            Err(e) if self.lenient => {
                self.ignored.push(e.msg);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// A VM pod's QMP socket as `<volume>/<file>` (docs/vm-pods.md); vfplugd resolves it inside the
/// pod's own volumes, this only refuses what can never name a file there.
fn qmp_socket_spec(key: &str, v: Value) -> Result<String, CniError> {
    let s = as_str(key, v)?;
    if s.is_empty() || s.starts_with('/') || s.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(CniError::config(format!(
            "{key}: {s:?} is not <volume>/<file> below the pod's volumes"
        )));
    }
    Ok(s)
}

fn parse_ipam(v: Value) -> Result<Option<IpamConf>, CniError> {
    let Value::Object(m) = v else {
        return Err(CniError::config(format!(
            "ipam: expected an object, got {}",
            describe(&v)
        )));
    };
    if m.is_empty() {
        return Ok(None);
    }
    let t = match m.get("type") {
        None | Some(Value::Null) => {
            return Err(CniError::config(
                "ipam.type: missing (an ipam object needs the IPAM plugin's type)",
            ));
        }
        Some(t) => as_str("ipam.type", t.clone())?,
    };
    // A bare file name: it is looked up in CNI_PATH and must not walk out of it.
    if t.is_empty() || t == "." || t == ".." || t.contains(['/', '\0']) {
        return Err(CniError::config(format!(
            "ipam.type: {t:?} is not a plugin name"
        )));
    }
    Ok(Some(IpamConf { plugin_type: t }))
}

fn parse_runtime_config(v: Value) -> Result<RuntimeConfig, CniError> {
    let Value::Object(mut m) = v else {
        return Err(CniError::config(format!(
            "runtimeConfig: expected an object, got {}",
            describe(&v)
        )));
    };
    let mut take = |k: &str| m.remove(k).filter(|v| !v.is_null());
    Ok(RuntimeConfig {
        mac: take("mac")
            .map(|v| mac("runtimeConfig.mac", v))
            .transpose()?,
        device_id: take("deviceID")
            .map(|v| pci("runtimeConfig.deviceID", v))
            .transpose()?,
        device_info_file: take("CNIDeviceInfoFile")
            .map(|v| abs_path("runtimeConfig.CNIDeviceInfoFile", v))
            .transpose()?,
    })
}

/// The CNI rule for network names (libcni's `ValidateNetworkName`).
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut b = name.bytes();
    let ok = b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::config(format!(
            "name: {name:?} is not a valid network name (a letter or digit, then letters, digits, '_', '.' or '-')"
        )))
    }
}

/// A JSON value for a message, cut to a readable length.
pub(crate) fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn as_str(key: &str, v: Value) -> Result<String, CniError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(CniError::config(format!(
            "{key}: expected a string, got {}",
            describe(&other)
        ))),
    }
}

fn as_uint(key: &str, v: Value, max: u64, range: &str) -> Result<u64, CniError> {
    match v.as_u64() {
        Some(n) if n <= max => Ok(n),
        _ => Err(CniError::config(format!(
            "{key}: expected integer {range}, got {}",
            describe(&v)
        ))),
    }
}

fn on_off(key: &str, v: Value) -> Result<bool, CniError> {
    match v.as_str() {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        _ => Err(CniError::config(format!(
            "{key}: expected \"on\" or \"off\", got {}",
            describe(&v)
        ))),
    }
}

fn mac(key: &str, v: Value) -> Result<MacAddr, CniError> {
    let s = as_str(key, v)?;
    s.parse()
        .map_err(|e| CniError::config(format!("{key}: {e}")))
}

fn pci(key: &str, v: Value) -> Result<PciAddress, CniError> {
    let s = as_str(key, v)?;
    s.parse()
        .map_err(|e| CniError::config(format!("{key}: {e}")))
}

fn abs_path(key: &str, v: Value) -> Result<PathBuf, CniError> {
    let s = as_str(key, v)?;
    if !s.starts_with('/') || s.contains('\0') {
        return Err(CniError::config(format!(
            "{key}: {s:?} is not an absolute path"
        )));
    }
    Ok(PathBuf::from(s))
}
