//! The error every step of the shim returns: a CNI error code with its message, ready to print.

use vfplug_api::CniCode;

/// A CNI error: `code` (the spec's 1–99 or vfplug's 100+, see [`CniCode`]), a short `msg` that
/// names the offending variable or key, and optional `details`.
///
/// Printed on stdout as the protocol's error object by [`crate::result::ErrorResult`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    /// The number printed as `code`.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation; may be empty.
    pub details: String,
}

impl CniError {
    /// An error with one of the well-known codes.
    pub fn new(code: CniCode, msg: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error with a raw code (as passed through from vfplugd or a delegated plugin).
    pub fn raw(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Sets `details`.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Code 4: invalid or missing environment variable(s).
    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(CniCode::InvalidEnv, msg)
    }

    /// Code 6: the input could not be decoded.
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(CniCode::Decode, msg)
    }

    /// Code 7: invalid network configuration.
    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(CniCode::InvalidConfig, msg)
    }

    /// Code 1: incompatible CNI version.
    pub fn version(msg: impl Into<String>) -> Self {
        Self::new(CniCode::IncompatibleVersion, msg)
    }
}

/// Every code the shim itself can print (the spec's and vfplug's). A delegated IPAM plugin's
/// own code is passed through unchanged and may be outside this list.
pub const KNOWN_CODES: &[u32] = &[
    1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100, 101, 102, 103, 104, 105, 106,
];
