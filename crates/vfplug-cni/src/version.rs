//! CNI spec versions the shim speaks, and which commands each allows.
//!
//! Supported: every version libcni's `version.All` lists (0.1.0 to 1.1.0), as sriov-cni v2.10.0
//! does (`skel.PluginMainFuncs(.., version.All, ..)`, cmd/sriov/main.go). The result has three
//! shapes (libcni's `pkg/types/{020,040,100}`): 0.1.0/0.2.0 `ip4`/`ip6`; 0.3.0 to 0.4.0
//! `interfaces` and `ips[].version`; 1.x without `ips[].version` (see [`crate::result`]).
//!
//! Commands per version, as libcni's plugin skeleton (pkg/skel/skel.go) enforces them: CHECK
//! needs 0.4.0 or later, STATUS and GC 1.1.0 or later; an older config that asks for them gets
//! code 1.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::env::Command;
use crate::error::CniError;

/// A CNI spec version this plugin supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.1.0: results are `ip4`/`ip6` objects (as 0.2.0).
    V0_1_0,
    /// 0.2.0: VERSION; results are `ip4`/`ip6` objects.
    V0_2_0,
    /// 0.3.0: results carry `interfaces`, `ips[].version` and `ips[].interface`; chaining.
    V0_3_0,
    /// 0.3.1: as 0.3.0.
    V0_3_1,
    /// 0.4.0: CHECK, DEL's `prevResult`; results as 0.3.x.
    V0_4_0,
    /// 1.0.0: `ips[].version` gone.
    V1_0_0,
    /// 1.1.0: STATUS, GC; `interfaces[].mtu`, `socketPath`, `pciID`; route attributes.
    V1_1_0,
}

impl CniVersion {
    /// All supported versions, oldest first.
    pub const ALL: [CniVersion; 7] = [
        Self::V0_1_0,
        Self::V0_2_0,
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];

    /// The oldest supported version; libcni's reading of a config without `cniVersion`.
    pub const OLDEST: CniVersion = Self::V0_1_0;

    /// The newest supported version.
    pub const LATEST: CniVersion = Self::V1_1_0;

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_1_0 => "0.1.0",
            Self::V0_2_0 => "0.2.0",
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version are 0.1.0/0.2.0's `ip4`/`ip6` objects (libcni's
    /// `types020`), without `interfaces`.
    pub fn is_legacy(self) -> bool {
        self <= Self::V0_2_0
    }

    /// Whether results of this version carry `ips[].version` (libcni's `types040`: 0.3.0,
    /// 0.3.1, 0.4.0).
    pub fn has_ip_version(self) -> bool {
        (Self::V0_3_0..=Self::V0_4_0).contains(&self)
    }

    /// Whether a config of this version may be used with `command`.
    pub fn allows(self, command: Command) -> Result<(), CniError> {
        match command {
            Command::Check if self < Self::V0_4_0 => Err(CniError::version(format!(
                "CHECK needs cniVersion 0.4.0 or later; the config says {self}"
            ))),
            Command::Status | Command::Gc if self < Self::V1_1_0 => Err(CniError::version(
                format!("{command} needs cniVersion 1.1.0 or later; the config says {self}"),
            )),
            _ => Ok(()),
        }
    }

    /// `"0.1.0, 0.2.0, ..., 1.1.0"` for messages.
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::version(format!(
                    "cniVersion {s:?} is not supported (supported: {})",
                    Self::supported_list()
                ))
            })
    }
}

/// The VERSION command's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// The version of this output's format.
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    /// Every version the plugin accepts in a config.
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

impl VersionInfo {
    /// This plugin's answer.
    pub fn current() -> Self {
        Self {
            cni_version: CniVersion::LATEST.as_str(),
            supported_versions: CniVersion::ALL.iter().map(|v| v.as_str()).collect(),
        }
    }
}
