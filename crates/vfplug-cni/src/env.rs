//! The `CNI_*` environment: which variables each command needs, their validation, and the
//! `CNI_ARGS` key/value list.
//!
//! Works on an injected map (tests and the fuzzer feed it); only `main` reads the process
//! environment. Every error is code 4 and names the variable.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use vfplug_core::MacAddr;

use crate::error::CniError;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach (idempotent, best effort).
    Del,
    /// Verify an attachment against `prevResult`.
    Check,
    /// Ready for ADD? (1.1)
    Status,
    /// Release everything not in `cni.dev/valid-attachments`. (1.1)
    Gc,
    /// Report the supported spec versions.
    Version,
}

impl Command {
    /// The name as written in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// The variables besides `CNI_COMMAND` this command cannot do without (CNI spec 1.1,
    /// "Parameters" of each operation). `CNI_PATH` is also needed whenever IPAM is delegated;
    /// that is checked once the config is known.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Self::Add | Self::Check => &[CONTAINERID, NETNS, IFNAME],
            Self::Del => &[CONTAINERID, IFNAME],
            Self::Gc => &[PATH],
            Self::Status | Self::Version => &[],
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            _ => {
                return Err(CniError::env(format!(
                    "{COMMAND}: unknown command {s:?} (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
                )));
            }
        })
    }
}

/// `CNI_COMMAND`.
pub const COMMAND: &str = "CNI_COMMAND";
/// `CNI_CONTAINERID`.
pub const CONTAINERID: &str = "CNI_CONTAINERID";
/// `CNI_NETNS`.
pub const NETNS: &str = "CNI_NETNS";
/// `CNI_IFNAME`.
pub const IFNAME: &str = "CNI_IFNAME";
/// `CNI_ARGS`.
pub const ARGS: &str = "CNI_ARGS";
/// `CNI_PATH`.
pub const PATH: &str = "CNI_PATH";

/// What `CNI_ARGS` says (`K=V;K=V`). Only the keys below are understood; any other key is an
/// error unless `IgnoreUnknown` is true (the CNI conventions), in which case it is kept in
/// `ignored` for the debug log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID` (accepted, not used).
    pub infra_container_id: Option<String>,
    /// `MAC`: sriov-cni's per-attachment MAC (below `runtimeConfig.mac` in precedence).
    pub mac: Option<MacAddr>,
    /// `IgnoreUnknown`.
    pub ignore_unknown: bool,
    /// Unknown keys that `IgnoreUnknown` let through.
    pub ignored: Vec<String>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Empty items (`a=b;;c=d`, a trailing `;`) are skipped, as libcni does.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut out = Self::default();
        let mut unknown = Vec::new();
        for item in s.split(';').filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(CniError::env(format!("{ARGS}: {item:?} is not KEY=VALUE")));
            };
            let v = v.to_owned();
            match k {
                "K8S_POD_NAMESPACE" => out.pod_namespace = Some(v),
                "K8S_POD_NAME" => out.pod_name = Some(v),
                "K8S_POD_UID" => out.pod_uid = Some(v),
                "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = Some(v),
                "MAC" => {
                    out.mac = Some(
                        v.parse()
                            .map_err(|e| CniError::env(format!("{ARGS}: MAC: {e}")))?,
                    )
                }
                "IgnoreUnknown" => {
                    out.ignore_unknown = match v.to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(CniError::env(format!(
                                "{ARGS}: IgnoreUnknown={v:?} is not a boolean (1, true, 0, false)"
                            )));
                        }
                    }
                }
                _ => unknown.push(k.to_owned()),
            }
        }
        if !unknown.is_empty() && !out.ignore_unknown {
            return Err(CniError::env(format!(
                "{ARGS}: unknown key(s) {} (set IgnoreUnknown=1 to ignore them)",
                unknown.join(", ")
            )));
        }
        out.ignored = unknown;
        Ok(out)
    }
}

/// The parsed and validated `CNI_*` environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty when the command does not take one and none was set).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL, STATUS, GC, VERSION).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// `CNI_ARGS` as given, to pass to delegated plugins unchanged.
    pub args_raw: String,
    /// `CNI_PATH`, split on `:` (empty entries dropped).
    pub path: Vec<PathBuf>,
    /// `CNI_PATH` as given, to pass to delegated plugins unchanged.
    pub path_raw: String,
}

impl CniEnv {
    /// Parses the environment in `vars`. A variable set to the empty string counts as unset (as
    /// libcni's skeleton treats it).
    pub fn parse(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let command: Command = get(COMMAND)
            .ok_or_else(|| CniError::env(format!("{COMMAND} is not set")))?
            .parse()?;
        let missing: Vec<&str> = command
            .required()
            .iter()
            .copied()
            .filter(|k| get(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::env(format!(
                "{command} needs environment variable(s) {} (missing or empty)",
                missing.join(", ")
            )));
        }
        let container_id = get(CONTAINERID).unwrap_or_default().to_owned();
        let netns = get(NETNS).unwrap_or_default().to_owned();
        let ifname = get(IFNAME).unwrap_or_default().to_owned();
        // Only what is set is validated: a command that does not need a variable must still
        // not be handed a malformed one silently.
        if !container_id.is_empty() {
            validate_container_id(&container_id)?;
        }
        if !ifname.is_empty() {
            validate_ifname(&ifname)?;
        }
        if !netns.is_empty() {
            validate_netns(&netns)?;
        }
        let args_raw = get(ARGS).unwrap_or_default().to_owned();
        let args = CniArgs::parse(&args_raw)?;
        let path_raw = get(PATH).unwrap_or_default().to_owned();
        let path = path_raw
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            args_raw,
            path,
            path_raw,
        })
    }
}

/// The spec's container ID rule: an alphanumeric character, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(CniError::env(format!(
            "{CONTAINERID} {id:?} is invalid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
        )));
    }
    Ok(())
}

/// The spec's interface name rule (Linux's): 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 15 {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("cannot be \".\" or \"..\"")
    } else if name.contains(['/', ':', '\0']) {
        Some("contains '/', ':' or NUL")
    } else if name.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else {
        None
    };
    match why {
        Some(w) => Err(CniError::env(format!(
            "{IFNAME} {name:?} {w} (interface names are 1-15 bytes without '/', ':' or whitespace)"
        ))),
        None => Ok(()),
    }
}

/// `CNI_NETNS` must be an absolute path (`/proc/<pid>/ns/net` or a bind mount of one).
pub fn validate_netns(netns: &str) -> Result<(), CniError> {
    if !netns.starts_with('/') || netns.contains('\0') {
        return Err(CniError::env(format!(
            "{NETNS} {netns:?} is not an absolute path"
        )));
    }
    Ok(())
}
