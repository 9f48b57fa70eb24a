//! CNI spec versions the shim speaks, and which commands each allows.
//!
//! Supported: 0.4.0 (CHECK and DEL's `prevResult` appeared there, so older configs cannot be
//! handled the way DEL needs), 1.0.0 and 1.1.0. STATUS and GC exist only from 1.1.0: a config
//! of an older version that asks for them gets code 1, as libcni's own plugin skeleton does.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::env::Command;
use crate::error::CniError;

/// A CNI spec version this plugin supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.4.0: CHECK; results carry `ips[].version`.
    V0_4_0,
    /// 1.0.0: `ips[].version` gone.
    V1_0_0,
    /// 1.1.0: STATUS, GC; `interfaces[].mtu`, `socketPath`, `pciID`; route attributes.
    V1_1_0,
}

impl CniVersion {
    /// All supported versions, oldest first.
    pub const ALL: [CniVersion; 3] = [Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];

    /// The newest supported version.
    pub const LATEST: CniVersion = Self::V1_1_0;

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether a config of this version may be used with `command`.
    pub fn allows(self, command: Command) -> Result<(), CniError> {
        match command {
            Command::Status | Command::Gc if self < Self::V1_1_0 => Err(CniError::version(
                format!("{command} needs cniVersion 1.1.0 or later; the config says {self}"),
            )),
            _ => Ok(()),
        }
    }

    /// `"0.4.0", "1.0.0", "1.1.0"` for messages.
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
