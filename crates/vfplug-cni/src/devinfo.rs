//! The device-info file (k8snetworkplumbingwg device-info-spec 1.1.0) that Multus asks for with
//! `runtimeConfig.CNIDeviceInfoFile` and copies into the pod's `network-status`. Written after a
//! successful ADD, so a VF vfplugd allocated itself (no device plugin involved, e.g. a VM pod's
//! hotplug) is visible to the workload too.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's content for a PCI device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Always `"pci"` here.
    #[serde(rename = "type")]
    pub kind: String,
    /// The spec version, `"1.1.0"`.
    pub version: String,
    /// The addresses.
    pub pci: PciInfo,
}

/// `pci` of a [`DeviceInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciInfo {
    /// The VF.
    #[serde(rename = "pci-address")]
    pub pci_address: String,
    /// Its PF.
    #[serde(
        rename = "pf-pci-address",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub pf_pci_address: String,
}

impl DeviceInfo {
    /// The info for a VF and its PF.
    pub fn pci(vf: &str, pf: &str) -> Self {
        Self {
            kind: "pci".to_owned(),
            version: "1.1.0".to_owned(),
            pci: PciInfo {
                pci_address: vf.to_owned(),
                pf_pci_address: pf.to_owned(),
            },
        }
    }

    /// Writes the file at `path`, replacing it whole (a temporary file in the same directory,
    /// then a rename), so a reader never sees half of it.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let (tmp, mut f) = tempfile_in(dir, path)?;
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let res = f.write_all(&body).and_then(|()| f.sync_all());
        if let Err(e) = res.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }
}

/// A file next to `path`, named after it and this process (the pid makes the name unique among
/// running plugins; a leftover of a crashed run with the same pid is overwritten).
fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{base}.vfplug-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    Ok((tmp, f))
}
