//! SR-IOV Allocate responses, byte-compatible with sriov-network-device-plugin (SRIOV-DP).
//!
//! KubeVirt, Multus and DPDK apps parse what SRIOV-DP puts into the container, so these formats
//! are an ABI (research device-plugin.md §1.3, cni-hotplug.md §4.5):
//!
//! - `PCIDEVICE_<PREFIX>_<NAME>` = the device ids, comma-joined, in request order. The name is
//!   `"PCIDEVICE_" + prefix + "_" + name`, upper-cased, with `.` (and `/`) replaced by `_`. A `-`
//!   is kept, exactly as SRIOV-DP and KubeVirt's `ResourceNameToEnvVar` do, even though it makes
//!   a non-POSIX variable name; changing it would break both readers.
//! - `PCIDEVICE_<PREFIX>_<NAME>_INFO` = compact JSON `{"<id>":{"<provider>":{"<key>":"<value>"}}}`.
//!   Go's `encoding/json` sorts map keys, so every level is sorted (`generic` before `vfio`,
//!   `dev-mount` before `mount`). Providers: `generic` `{deviceID}` always; `vfio`
//!   `{dev-mount: /dev/vfio/<group>, mount: /dev/vfio/vfio}` for vfio-pci devices.
//! - Device specs for vfio devices: `/dev/vfio/vfio` and `/dev/vfio/<group>`, permissions `rw`,
//!   de-duplicated by host path, in first-seen order. On a no-IOMMU host (group `name` file says
//!   `vfio-noiommu`) the host node is `/dev/vfio/noiommu-<group>`, the container path stays
//!   `/dev/vfio/<group>`.
//! - Device-info files (Network Plumbing WG device-info spec v1.1.0):
//!   `<dir>/<resource with '/'→'-'>-<id>-device.json` =
//!   `{"type":"pci","version":"1.1.0","pci":{"pci-address":...,"pf-pci-address":...}}`, keys in
//!   the Go struct's declaration order.
//!
//! Everything here is a pure function of its inputs, except [`check_vfio_nodes`] and
//! [`write_device_info`], which touch a configurable dev root and directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plugin::{ContainerAlloc, DeviceSpec};

/// Default directory of device-info files written by device plugins.
pub const DEFAULT_DEVICE_INFO_DIR: &str = "/var/run/k8s.cni.cncf.io/devinfo/dp";
/// Device-info spec version we write.
pub const DEVICE_INFO_VERSION: &str = "1.1.0";
/// The legacy VFIO container node.
pub const VFIO_CONTAINER_NODE: &str = "/dev/vfio/vfio";

/// How a VF is used in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMode {
    /// Kernel netdev (moved into the pod by the CNI); no device nodes.
    Netdev,
    /// Bound to vfio-pci (DPDK or a VM): `/dev/vfio` nodes and the `vfio` info provider.
    Vfio,
}

/// One allocated VF, as the Allocate response needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovDevice {
    /// Device id sent to the kubelet (the VF's PCI address, `0000:3b:02.6`).
    pub pci: String,
    /// The PF's PCI address, for the device-info file.
    pub pf_pci: Option<String>,
    /// Netdev or vfio.
    pub mode: DeviceMode,
    /// IOMMU group number (required for vfio devices).
    pub iommu_group: Option<u32>,
    /// The group is a vfio no-IOMMU group (host node `/dev/vfio/noiommu-<group>`).
    pub noiommu: bool,
    /// RDMA device name for the device-info file, if any.
    pub rdma_device: Option<String>,
    /// Switchdev representor netdev, for the device-info file, if any.
    pub representor: Option<String>,
}

impl SriovDevice {
    /// A netdev-mode VF.
    pub fn netdev(pci: impl Into<String>) -> Self {
        Self {
            pci: pci.into(),
            pf_pci: None,
            mode: DeviceMode::Netdev,
            iommu_group: None,
            noiommu: false,
            rdma_device: None,
            representor: None,
        }
    }

    /// A vfio-pci VF in IOMMU group `group`.
    pub fn vfio(pci: impl Into<String>, group: u32) -> Self {
        Self {
            mode: DeviceMode::Vfio,
            iommu_group: Some(group),
            ..Self::netdev(pci)
        }
    }

    /// Sets the PF address.
    #[must_use]
    pub fn with_pf(mut self, pf: impl Into<String>) -> Self {
        self.pf_pci = Some(pf.into());
        self
    }
}

/// Pool-level parameters of an Allocate response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovAllocParams {
    /// Resource prefix, e.g. `intel.com`.
    pub prefix: String,
    /// Resource name without prefix, e.g. `intel_sriov_netdevice`.
    pub name: String,
    /// Also return CDI device names (`<prefix>/net-pci=<id>`), for runtimes with CDI specs.
    pub cdi: bool,
    /// CDI class used in CDI names (SRIOV-DP uses `net-pci`).
    pub cdi_class: String,
}

impl SriovAllocParams {
    /// Parameters without CDI.
    pub fn new(prefix: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            name: name.into(),
            cdi: false,
            cdi_class: "net-pci".to_owned(),
        }
    }

    /// The full extended resource name `<prefix>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.prefix, self.name)
    }
}

/// Errors building an SR-IOV allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SriovError {
    /// A vfio device without an IOMMU group.
    #[error("vfio device {0} has no IOMMU group")]
    NoIommuGroup(String),
    /// A required `/dev/vfio` node is missing under the dev root.
    #[error("device {pci}: {node} does not exist")]
    MissingNode {
        /// Device.
        pci: String,
        /// Missing host node (as named in the spec, below the dev root).
        node: String,
    },
    /// Writing a device-info file failed.
    #[error("device-info file {path}: {reason}")]
    DeviceInfo {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// `PCIDEVICE_<PREFIX>_<NAME>`: upper case, `.` and `/` → `_` (see the module docs for `-`).
pub fn env_name(prefix: &str, name: &str) -> String {
    format!("PCIDEVICE_{prefix}_{name}")
        .replace(['.', '/'], "_")
        .to_uppercase()
}

/// `PCIDEVICE_<PREFIX>_<NAME>_INFO`.
pub fn info_env_name(prefix: &str, name: &str) -> String {
    format!("{}_INFO", env_name(prefix, name))
}

fn vfio_paths(dev: &SriovDevice) -> Result<(String, String), SriovError> {
    let group = dev
        .iommu_group
        .ok_or_else(|| SriovError::NoIommuGroup(dev.pci.clone()))?;
    let container = format!("/dev/vfio/{group}");
    let host = if dev.noiommu {
        format!("/dev/vfio/noiommu-{group}")
    } else {
        container.clone()
    };
    Ok((host, container))
}

/// The `_INFO` JSON for `devices` (sorted keys at every level, compact, like Go's json.Marshal).
pub fn info_json(devices: &[SriovDevice]) -> Result<String, SriovError> {
    let mut all: BTreeMap<&str, BTreeMap<&str, BTreeMap<&str, String>>> = BTreeMap::new();
    for dev in devices {
        let mut providers = BTreeMap::new();
        providers.insert("generic", BTreeMap::from([("deviceID", dev.pci.clone())]));
        if dev.mode == DeviceMode::Vfio {
            let (_, container) = vfio_paths(dev)?;
            providers.insert(
                "vfio",
                BTreeMap::from([
                    ("dev-mount", container),
                    ("mount", VFIO_CONTAINER_NODE.to_owned()),
                ]),
            );
        }
        all.insert(dev.pci.as_str(), providers);
    }
    // Serializing maps of strings cannot fail; map the impossible error anyway, no panics.
    serde_json::to_string(&all).map_err(|e| SriovError::DeviceInfo {
        path: PathBuf::new(),
        reason: e.to_string(),
    })
}

/// Device specs for `devices`, de-duplicated by host path in first-seen order.
pub fn device_specs(devices: &[SriovDevice]) -> Result<Vec<DeviceSpec>, SriovError> {
    let mut specs: Vec<DeviceSpec> = Vec::new();
    let mut push = |host: String, container: String| {
        if !specs.iter().any(|s| s.host_path == host) {
            specs.push(DeviceSpec {
                container_path: container,
                host_path: host,
                permissions: "rw".to_owned(),
            });
        }
    };
    for dev in devices.iter().filter(|d| d.mode == DeviceMode::Vfio) {
        let (host, container) = vfio_paths(dev)?;
        push(
            VFIO_CONTAINER_NODE.to_owned(),
            VFIO_CONTAINER_NODE.to_owned(),
        );
        push(host, container);
    }
    Ok(specs)
}

/// Checks that the host nodes of `specs` exist below `dev_root` (a `/dev/vfio/5` spec is looked
/// up as `<dev_root>/vfio/5`). The specs themselves keep naming `/dev`, as the kubelet needs.
pub fn check_vfio_nodes(dev_root: &Path, devices: &[SriovDevice]) -> Result<(), SriovError> {
    for dev in devices.iter().filter(|d| d.mode == DeviceMode::Vfio) {
        let (host, _) = vfio_paths(dev)?;
        for node in [VFIO_CONTAINER_NODE, host.as_str()] {
            let rel = node.trim_start_matches("/dev/");
            if !dev_root.join(rel).exists() {
                return Err(SriovError::MissingNode {
                    pci: dev.pci.clone(),
                    node: node.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// CDI device name of one device: `<prefix>/<class>=<id>`.
pub fn cdi_name(params: &SriovAllocParams, pci: &str) -> String {
    format!("{}/{}={}", params.prefix, params.cdi_class, pci)
}

/// The full container allocation for `devices` (one container's request), as SRIOV-DP builds it.
pub fn container_alloc(
    params: &SriovAllocParams,
    devices: &[SriovDevice],
) -> Result<ContainerAlloc, SriovError> {
    let ids: Vec<&str> = devices.iter().map(|d| d.pci.as_str()).collect();
    let mut envs = BTreeMap::new();
    envs.insert(env_name(&params.prefix, &params.name), ids.join(","));
    envs.insert(
        info_env_name(&params.prefix, &params.name),
        info_json(devices)?,
    );
    let cdi_devices = if params.cdi {
        ids.iter().map(|id| cdi_name(params, id)).collect()
    } else {
        Vec::new()
    };
    Ok(ContainerAlloc {
        envs,
        mounts: Vec::new(),
        devices: device_specs(devices)?,
        annotations: BTreeMap::new(),
        cdi_devices,
    })
}

/// Device-info file content (spec v1.1.0). Field order is the JSON key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `"pci"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `"1.1.0"`.
    pub version: String,
    /// PCI details.
    pub pci: PciDeviceInfo,
}

/// The `pci` object of a device-info file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciDeviceInfo {
    /// VF address.
    #[serde(rename = "pci-address")]
    pub pci_address: String,
    /// vhost-net node, if any.
    #[serde(rename = "vhost-net", skip_serializing_if = "Option::is_none")]
    pub vhost_net: Option<String>,
    /// RDMA device, if any.
    #[serde(rename = "rdma-device", skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// PF address, if known.
    #[serde(rename = "pf-pci-address", skip_serializing_if = "Option::is_none")]
    pub pf_pci_address: Option<String>,
    /// Switchdev representor, if any.
    #[serde(rename = "representor-device", skip_serializing_if = "Option::is_none")]
    pub representor_device: Option<String>,
}

/// The device-info content for one device.
pub fn device_info(dev: &SriovDevice) -> DeviceInfo {
    DeviceInfo {
        kind: "pci".to_owned(),
        version: DEVICE_INFO_VERSION.to_owned(),
        pci: PciDeviceInfo {
            pci_address: dev.pci.clone(),
            vhost_net: None,
            rdma_device: dev.rdma_device.clone(),
            pf_pci_address: dev.pf_pci.clone(),
            representor_device: dev.representor.clone(),
        },
    }
}

/// Device-info file name: `<resource with '/'→'-'>-<id>-device.json`.
pub fn device_info_file_name(resource_name: &str, id: &str) -> String {
    format!("{}-{id}-device.json", resource_name.replace('/', "-"))
}

/// Writes the device-info file of `dev` into `dir` (created if missing), atomically (temp file
/// + rename) so Multus never reads half a file. Returns the path.
pub fn write_device_info(
    dir: &Path,
    resource_name: &str,
    dev: &SriovDevice,
) -> Result<PathBuf, SriovError> {
    let path = dir.join(device_info_file_name(resource_name, &dev.pci));
    let err = |reason: String| SriovError::DeviceInfo {
        path: path.clone(),
        reason,
    };
    let body = serde_json::to_vec(&device_info(dev)).map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        device_info_file_name(resource_name, &dev.pci)
    ));
    std::fs::write(&tmp, body).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
    Ok(path)
}

/// Removes the device-info file of `id`, if present (on release).
pub fn remove_device_info(dir: &Path, resource_name: &str, id: &str) -> Result<(), SriovError> {
    let path = dir.join(device_info_file_name(resource_name, id));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SriovError::DeviceInfo {
            path,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_mangle_like_sriov_dp() {
        assert_eq!(
            env_name("intel.com", "intel_sriov_netdevice"),
            "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"
        );
        assert_eq!(
            info_env_name("intel.com", "ice_sriov_netdevice3_01"),
            "PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01_INFO"
        );
        // '-' survives (SRIOV-DP replaces only '.'; KubeVirt only '.' and '/').
        assert_eq!(
            env_name("vfplug.io", "vf-pool"),
            "PCIDEVICE_VFPLUG_IO_VF-POOL"
        );
    }

    #[test]
    fn golden_single_vfio_device_matches_kubevirt_log() {
        // kubevirt/kubevirt#13583 shows SRIOV-DP's exact output for this device.
        let params = SriovAllocParams::new("intel.com", "ice_sriov_netdevice3_01");
        let alloc =
            container_alloc(&params, &[SriovDevice::vfio("0000:51:11.0", 113)]).expect("alloc");
        assert_eq!(
            alloc
                .envs
                .get("PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01")
                .map(String::as_str),
            Some("0000:51:11.0")
        );
        assert_eq!(
            alloc
                .envs
                .get("PCIDEVICE_INTEL_COM_ICE_SRIOV_NETDEVICE3_01_INFO")
                .map(String::as_str),
            Some(
                r#"{"0000:51:11.0":{"generic":{"deviceID":"0000:51:11.0"},"vfio":{"dev-mount":"/dev/vfio/113","mount":"/dev/vfio/vfio"}}}"#
            )
        );
        assert_eq!(
            alloc.devices,
            vec![
                DeviceSpec {
                    container_path: "/dev/vfio/vfio".into(),
                    host_path: "/dev/vfio/vfio".into(),
                    permissions: "rw".into()
                },
                DeviceSpec {
                    container_path: "/dev/vfio/113".into(),
                    host_path: "/dev/vfio/113".into(),
                    permissions: "rw".into()
                },
            ]
        );
        assert!(alloc.cdi_devices.is_empty());
        assert!(alloc.mounts.is_empty());
    }

    #[test]
    fn golden_several_vfio_devices_sorted_info_request_order_list() {
        let params = SriovAllocParams::new("intel.com", "sriov_dpdk");
        let devs = [
            SriovDevice::vfio("0000:3b:02.1", 71),
            SriovDevice::vfio("0000:3b:02.0", 70),
        ];
        let alloc = container_alloc(&params, &devs).expect("alloc");
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_SRIOV_DPDK"],
            "0000:3b:02.1,0000:3b:02.0"
        );
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_SRIOV_DPDK_INFO"],
            concat!(
                r#"{"0000:3b:02.0":{"generic":{"deviceID":"0000:3b:02.0"},"vfio":{"dev-mount":"/dev/vfio/70","mount":"/dev/vfio/vfio"}},"#,
                r#""0000:3b:02.1":{"generic":{"deviceID":"0000:3b:02.1"},"vfio":{"dev-mount":"/dev/vfio/71","mount":"/dev/vfio/vfio"}}}"#
            )
        );
        let hosts: Vec<&str> = alloc.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(hosts, ["/dev/vfio/vfio", "/dev/vfio/71", "/dev/vfio/70"]);
    }

    #[test]
    fn golden_netdev_devices_have_generic_only_and_no_nodes() {
        let params = SriovAllocParams::new("intel.com", "intel_sriov_netdevice");
        let devs = [
            SriovDevice::netdev("0000:3b:02.6"),
            SriovDevice::netdev("0000:3b:02.7"),
        ];
        let alloc = container_alloc(&params, &devs).expect("alloc");
        assert_eq!(alloc.envs.len(), 2);
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"],
            "0000:3b:02.6,0000:3b:02.7"
        );
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO"],
            r#"{"0000:3b:02.6":{"generic":{"deviceID":"0000:3b:02.6"}},"0000:3b:02.7":{"generic":{"deviceID":"0000:3b:02.7"}}}"#
        );
        assert!(alloc.devices.is_empty());
    }

    #[test]
    fn noiommu_group_uses_noiommu_host_node() {
        let mut dev = SriovDevice::vfio("0000:00:05.0", 3);
        dev.noiommu = true;
        let specs = device_specs(&[dev.clone()]).expect("specs");
        assert_eq!(specs[1].host_path, "/dev/vfio/noiommu-3");
        assert_eq!(specs[1].container_path, "/dev/vfio/3");
        assert!(
            info_json(&[dev])
                .expect("json")
                .contains(r#""dev-mount":"/dev/vfio/3""#)
        );
    }

    #[test]
    fn vfio_without_group_is_an_error() {
        let mut dev = SriovDevice::vfio("0000:00:05.0", 3);
        dev.iommu_group = None;
        let params = SriovAllocParams::new("a.io", "b");
        assert_eq!(
            container_alloc(&params, &[dev]),
            Err(SriovError::NoIommuGroup("0000:00:05.0".into()))
        );
    }

    #[test]
    fn cdi_names() {
        let mut params = SriovAllocParams::new("vfplug.io", "pool");
        params.cdi = true;
        let alloc = container_alloc(&params, &[SriovDevice::netdev("0000:01:00.1")]).expect("a");
        assert_eq!(alloc.cdi_devices, ["vfplug.io/net-pci=0000:01:00.1"]);
    }

    #[test]
    fn vfio_nodes_checked_under_dev_root() {
        let root = tempfile::tempdir().expect("tmp");
        let devs = [SriovDevice::vfio("0000:3b:02.0", 70)];
        assert!(matches!(
            check_vfio_nodes(root.path(), &devs),
            Err(SriovError::MissingNode { .. })
        ));
        std::fs::create_dir_all(root.path().join("vfio")).expect("mkdir");
        std::fs::write(root.path().join("vfio/vfio"), "").expect("w");
        assert!(check_vfio_nodes(root.path(), &devs).is_err());
        std::fs::write(root.path().join("vfio/70"), "").expect("w");
        assert_eq!(check_vfio_nodes(root.path(), &devs), Ok(()));
    }

    #[test]
    fn golden_device_info_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = SriovDevice::netdev("0000:18:02.5").with_pf("0000:18:00.0");
        let path =
            write_device_info(dir.path(), "intel.com/intel_sriov_netdevice", &dev).expect("write");
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some("intel.com-intel_sriov_netdevice-0000:18:02.5-device.json")
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            r#"{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:18:02.5","pf-pci-address":"0000:18:00.0"}}"#
        );
        remove_device_info(
            dir.path(),
            "intel.com/intel_sriov_netdevice",
            "0000:18:02.5",
        )
        .expect("rm");
        assert!(!path.exists());
        // Removing again is not an error.
        remove_device_info(
            dir.path(),
            "intel.com/intel_sriov_netdevice",
            "0000:18:02.5",
        )
        .expect("rm2");
    }
}
