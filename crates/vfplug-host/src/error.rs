//! The one error type of this crate. Every variant that comes from the file system carries the
//! path, because "No such file or directory" alone is useless on a node with 2048 VFs.

use std::io;
use std::path::PathBuf;

use vfplug_core::PciAddress;

/// What went wrong talking to the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A read, readlink, read_dir or write failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted (`read`, `readlink`, `read_dir`, `write`).
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A sysfs file held something we cannot interpret.
    #[error("{path}: unexpected content {content:?} ({reason})")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held (trimmed).
        content: String,
        /// What was expected.
        reason: &'static str,
    },
    /// The sysfs root does not look like sysfs at all (no `bus/pci/devices`).
    #[error("{path} is not a sysfs root: {source}")]
    NotSysfs {
        /// The `bus/pci/devices` directory that could not be listed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A bind finished but the device ended up on another driver (or none).
    #[error("binding {pci} to {wanted}: device is bound to {actual:?} after the probe")]
    BindFailed {
        /// The device.
        pci: PciAddress,
        /// The driver asked for.
        wanted: String,
        /// The driver it has now.
        actual: Option<String>,
    },
    /// A driver name that cannot be a kernel driver name (empty, or with `/` or whitespace).
    #[error("invalid driver name {0:?}")]
    InvalidDriver(String),
}

impl HostError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the error means "the file is not there" — in sysfs, usually a device that
    /// disappeared while we looked (a VF removed by an `sriov_numvfs` write, a driver unbound).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::Io { source, .. } | Self::NotSysfs { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}
