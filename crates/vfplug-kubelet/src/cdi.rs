//! CDI (Container Device Interface) spec files, one per pool, for `vfplugd --use-cdi`.
//!
//! With CDI the kubelet passes the names from `ContainerAllocateResponse.cdi_devices`
//! (`<prefix>/net-pci=<pci>`, KEP-4009, GA in 1.31) to the runtime, which looks them up in the
//! spec files of its CDI directories (`/var/run/cdi` by default) and adds the device nodes
//! itself. sriov-network-device-plugin (`--use-cdi`, v3.8+, pkg/cdi/cdi.go) writes the same
//! kind (`<prefix>/net-pci`) with one device per pool device holding its `deviceNodes`; it
//! names the file `sriov-dp-<prefix>-net-pci-<resource>` and hands the names over in the
//! `cdi.k8s.io/<prefix>_net-pci` annotation instead of `cdi_devices`.
//!
//! Differences from the peer, on purpose:
//! - files are `vfplug-<prefix>-net-pci-<resource>.json`, so the peer's start-up cleanup of
//!   `sriov-dp-*` and ours of `vfplug-*` never remove each other's files;
//! - a device without nodes (a netdev VF) gets no entry: CDI refuses a device with empty
//!   edits (container-device-interface pkg/cdi/device.go `validate`), and the whole file with
//!   it; a pool without any such device gets no file.
//!
//! The written spec is `cdiVersion` [`CDI_VERSION`]: 0.5.0 is the first version with
//! `deviceNodes[].hostPath` and device names starting with a digit (SPEC.md, "Released
//! versions"); both are used here.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plugin::DeviceSpec;

/// Default CDI spec directory (the runtime's dynamic, highest-priority one).
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";
/// The CDI spec version written.
pub const CDI_VERSION: &str = "0.5.0";
/// The CDI class of SR-IOV devices, as SRIOV-DP names it (pool_stub.go `poolType`).
pub const CDI_CLASS: &str = "net-pci";
/// Prefix of the spec files vfplugd owns in the CDI directory.
pub const FILE_PREFIX: &str = "vfplug-";

/// A CDI spec document (the parts vfplug writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    /// Spec version.
    pub cdi_version: String,
    /// `<prefix>/net-pci`.
    pub kind: String,
    /// One per pool device that has nodes.
    pub devices: Vec<CdiDevice>,
}

/// One CDI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDevice {
    /// The kubelet's device id (the VF's PCI address).
    pub name: String,
    /// What the runtime adds to the container for it.
    pub container_edits: CdiEdits,
}

/// Container edits of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiEdits {
    /// Device nodes.
    pub device_nodes: Vec<CdiDeviceNode>,
}

/// A device node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host.
    pub host_path: String,
    /// cgroup permissions (`rw`, as SRIOV-DP writes them).
    pub permissions: String,
}

/// Errors writing or removing a spec file.
#[derive(Debug, thiserror::Error)]
#[error("CDI spec {path}: {source}")]
pub struct CdiError {
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// The CDI kind of a prefix: `<prefix>/net-pci`.
pub fn kind(prefix: &str) -> String {
    format!("{prefix}/{CDI_CLASS}")
}

/// The spec file name of a pool: `vfplug-<prefix>-net-pci-<name>.json`.
pub fn spec_file_name(prefix: &str, name: &str) -> String {
    format!("{FILE_PREFIX}{prefix}-{CDI_CLASS}-{name}.json")
}

/// The spec of one pool from each device's id and device specs; `None` when no device has a
/// node (CDI refuses a spec without devices).
pub fn pool_spec<'a>(
    prefix: &str,
    devices: impl IntoIterator<Item = (&'a str, Vec<DeviceSpec>)>,
) -> Option<CdiSpec> {
    let devices: Vec<CdiDevice> = devices
        .into_iter()
        .filter(|(_, specs)| !specs.is_empty())
        .map(|(id, specs)| CdiDevice {
            name: id.to_owned(),
            container_edits: CdiEdits {
                device_nodes: specs
                    .into_iter()
                    .map(|s| CdiDeviceNode {
                        path: s.container_path,
                        host_path: s.host_path,
                        permissions: s.permissions,
                    })
                    .collect(),
            },
        })
        .collect();
    (!devices.is_empty()).then(|| CdiSpec {
        cdi_version: CDI_VERSION.to_owned(),
        kind: kind(prefix),
        devices,
    })
}

/// Writes `spec` as `dir/file` unless the file already holds exactly that (a device-list push
/// that changed only health rewrites nothing). Atomic: temp file, then rename, so a runtime
/// never reads half a spec. Returns whether it wrote.
pub fn write_spec(dir: &Path, file: &str, spec: &CdiSpec) -> Result<bool, CdiError> {
    let path = dir.join(file);
    let err = |source| CdiError {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec_pretty(spec).map_err(|e| err(std::io::Error::other(e)))?;
    if std::fs::read(&path).ok().as_deref() == Some(body.as_slice()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    // Not `*.json`: a runtime scanning the directory must not pick up the half-written file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, &body).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(true)
}

/// Removes `dir/file` if present.
pub fn remove_spec(dir: &Path, file: &str) -> Result<(), CdiError> {
    let path = dir.join(file);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CdiError { path, source }),
    }
}

/// Removes every `vfplug-*.json` spec in `dir` whose name is not in `keep` (left by a previous
/// vfplugd, or by a pool that no longer exists). Returns the files removed.
pub fn remove_stale(dir: &Path, keep: &[String]) -> Result<Vec<String>, CdiError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CdiError {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with(FILE_PREFIX) && name.ends_with(".json") && !keep.contains(&name) {
            remove_spec(dir, &name)?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(p: &str) -> DeviceSpec {
        DeviceSpec {
            container_path: p.into(),
            host_path: p.into(),
            permissions: "rw".into(),
        }
    }

    #[test]
    fn golden_pool_spec() {
        let s = pool_spec(
            "intel.com",
            [
                (
                    "0000:3b:02.0",
                    vec![spec("/dev/vfio/vfio"), spec("/dev/vfio/70")],
                ),
                ("0000:3b:02.1", vec![]),
            ],
        )
        .expect("spec");
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            r#"{"cdiVersion":"0.5.0","kind":"intel.com/net-pci","devices":[{"name":"0000:3b:02.0","containerEdits":{"deviceNodes":[{"path":"/dev/vfio/vfio","hostPath":"/dev/vfio/vfio","permissions":"rw"},{"path":"/dev/vfio/70","hostPath":"/dev/vfio/70","permissions":"rw"}]}}]}"#
        );
        assert_eq!(pool_spec("intel.com", [("0000:3b:02.1", vec![])]), None);
    }

    #[test]
    fn write_is_idempotent_and_stale_files_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = pool_spec("a.io", [("0000:01:00.1", vec![spec("/dev/vfio/1")])]).expect("s");
        let f = spec_file_name("a.io", "pool");
        assert_eq!(f, "vfplug-a.io-net-pci-pool.json");
        assert!(write_spec(dir.path(), &f, &s).expect("w"));
        assert!(
            !write_spec(dir.path(), &f, &s).expect("w2"),
            "unchanged: not rewritten"
        );
        std::fs::write(dir.path().join("vfplug-old.json"), "{}").expect("w");
        std::fs::write(dir.path().join("sriov-dp-x.yaml"), "{}").expect("w");
        let removed = remove_stale(dir.path(), std::slice::from_ref(&f)).expect("rm");
        assert_eq!(removed, ["vfplug-old.json"]);
        assert!(dir.path().join(&f).exists());
        assert!(
            dir.path().join("sriov-dp-x.yaml").exists(),
            "the peer's are not ours"
        );
        remove_spec(dir.path(), &f).expect("rm");
        remove_spec(dir.path(), &f).expect("rm twice");
        assert!(!dir.path().join(&f).exists());
    }
}
