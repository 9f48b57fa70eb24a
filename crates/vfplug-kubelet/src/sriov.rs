//! SR-IOV Allocate responses, byte-compatible with sriov-network-device-plugin (SRIOV-DP).
//!
//! KubeVirt, Multus and DPDK apps parse what SRIOV-DP puts into the container, so these formats
//! are an ABI (research device-plugin.md §1.3, cni-hotplug.md §4.5). Each piece below names the
//! SRIOV-DP v3.11.0 source it reproduces:
//!
//! - `PCIDEVICE_<PREFIX>_<NAME>` = the device ids, comma-joined, in request order. The name is
//!   `"PCIDEVICE_" + prefix + "_" + name`, upper-cased, with `.` (and `/`) replaced by `_`. A `-`
//!   is kept, exactly as SRIOV-DP and KubeVirt's `ResourceNameToEnvVar` do, even though it makes
//!   a non-POSIX variable name; changing it would break both readers
//!   (pkg/resources/pool_stub.go `GetEnvs`).
//! - `PCIDEVICE_<PREFIX>_<NAME>_INFO` = compact JSON `{"<id>":{"<provider>":{"<key>":"<value>"}}}`.
//!   Go's `encoding/json` sorts map keys, so every level is sorted. The providers
//!   (pkg/infoprovider/*.go):
//!   - `generic` `{deviceID}`, always;
//!   - `vfio` `{dev-mount: /dev/vfio/<group>, mount: /dev/vfio/vfio}` for vfio-pci devices;
//!   - `extra` = the pool's `additionalInfo` for `*`, overridden by the device's own address;
//!   - `rdma` `{issm, rdma_cm, rdma_dev, umad, uverbs}` for `isRdma` pools: the char devices
//!     rdmamap finds for the VF's RDMA device (keys only for nodes found), `rdma_dev` its first
//!     RDMA device;
//!   - `vhost` `{net-mount: /dev/vhost-net, tun-mount: /dev/net/tun}` for `needVhostNet` pools.
//! - Device specs: per device, in provider order (vfio, rdma, vhost), each `rw`, de-duplicated
//!   by host path in first-seen order (netResourcePool.go `GetDeviceSpecs`). vfio:
//!   `/dev/vfio/vfio` and `/dev/vfio/<group>`; on a no-IOMMU group (sysfs group `name` says
//!   `vfio-noiommu`) the host node is `/dev/vfio/noiommu-<group>` and the container path stays
//!   `/dev/vfio/<group>` (pkg/utils/utils.go `GetVFIODeviceFile`). rdma: rdmamap's
//!   `GetRdmaCharDevices` order (ucm, issm, umad, uverbs, rdma_cm). vhost: `/dev/vhost-net`,
//!   `/dev/net/tun`.
//! - Device-info files (Network Plumbing WG device-info spec v1.1.0, written by
//!   netResourcePool.go `StoreDeviceInfoFile` through network-attachment-definition-client's
//!   `SaveDeviceInfoForDP`): `<dir>/<resource with '/'→'-'>-<id>-device.json` =
//!   `{"type":"pci","version":"1.1.0","pci":{"pci-address":...,"rdma-device":...}}`, mode 0444,
//!   keys in the Go struct's declaration order; `rdma-device` (the VF's RDMA devices,
//!   comma-joined) only for `isRdma` pools.
//!
//! Everything here is a pure function of its inputs, except [`check_nodes`] and
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
    /// RDMA devices and char devices (`isRdma` pools); `None` otherwise.
    pub rdma: Option<RdmaInfo>,
    /// `/dev/vhost-net` and `/dev/net/tun` go with the device (`needVhostNet` pools).
    pub vhost_net: bool,
    /// The `extra` provider's keys; `None` when the pool has no `additionalInfo`.
    pub extra: Option<BTreeMap<String, String>>,
}

/// What the `rdma` provider knows about one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaInfo {
    /// RDMA devices of the VF (`mlx5_3`), as listed under its sysfs `infiniband/`.
    pub devices: Vec<String>,
    /// Their character devices (`/dev/infiniband/uverbs4`), in rdmamap's order.
    pub char_devices: Vec<String>,
}

/// The vhost-net node of the `vhost` provider.
pub const VHOST_NET_NODE: &str = "/dev/vhost-net";
/// The tun node of the `vhost` provider.
pub const TUN_NODE: &str = "/dev/net/tun";

impl SriovDevice {
    /// A netdev-mode VF.
    pub fn netdev(pci: impl Into<String>) -> Self {
        Self {
            pci: pci.into(),
            pf_pci: None,
            mode: DeviceMode::Netdev,
            iommu_group: None,
            noiommu: false,
            rdma: None,
            vhost_net: false,
            extra: None,
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
    /// A required device node is missing under the dev root.
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

/// The `_INFO` providers of one device: provider name → key → value.
pub fn device_providers(
    dev: &SriovDevice,
) -> Result<BTreeMap<&'static str, BTreeMap<String, String>>, SriovError> {
    let mut providers = BTreeMap::new();
    providers.insert(
        "generic",
        BTreeMap::from([("deviceID".to_owned(), dev.pci.clone())]),
    );
    if dev.mode == DeviceMode::Vfio {
        let (_, container) = vfio_paths(dev)?;
        providers.insert(
            "vfio",
            BTreeMap::from([
                ("dev-mount".to_owned(), container),
                ("mount".to_owned(), VFIO_CONTAINER_NODE.to_owned()),
            ]),
        );
    }
    if let Some(extra) = &dev.extra {
        providers.insert("extra", extra.clone());
    }
    if let Some(rdma) = &dev.rdma {
        // rdmaInfoProvider.GetEnvVal: a key per kind of node found, by substring of the path
        // (ucm nodes match none), plus the first RDMA device.
        let mut env = BTreeMap::new();
        for node in &rdma.char_devices {
            for kind in ["uverbs", "umad", "issm", "rdma_cm"] {
                if node.contains(kind) {
                    env.insert(kind.to_owned(), node.clone());
                    break;
                }
            }
        }
        if let Some(first) = rdma.devices.first() {
            env.insert("rdma_dev".to_owned(), first.clone());
        }
        providers.insert("rdma", env);
    }
    if dev.vhost_net {
        providers.insert(
            "vhost",
            BTreeMap::from([
                ("net-mount".to_owned(), VHOST_NET_NODE.to_owned()),
                ("tun-mount".to_owned(), TUN_NODE.to_owned()),
            ]),
        );
    }
    Ok(providers)
}

/// The `_INFO` JSON for `devices` (sorted keys at every level, compact, like Go's json.Marshal).
pub fn info_json(devices: &[SriovDevice]) -> Result<String, SriovError> {
    let mut all = BTreeMap::new();
    for dev in devices {
        all.insert(dev.pci.as_str(), device_providers(dev)?);
    }
    // Serializing maps of strings cannot fail; map the impossible error anyway, no panics.
    serde_json::to_string(&all).map_err(|e| SriovError::DeviceInfo {
        path: PathBuf::new(),
        reason: e.to_string(),
    })
}

/// The (host, container) device nodes of one device, in SRIOV-DP's provider order.
fn device_nodes(dev: &SriovDevice) -> Result<Vec<(String, String)>, SriovError> {
    let mut nodes = Vec::new();
    if dev.mode == DeviceMode::Vfio {
        let (host, container) = vfio_paths(dev)?;
        nodes.push((
            VFIO_CONTAINER_NODE.to_owned(),
            VFIO_CONTAINER_NODE.to_owned(),
        ));
        nodes.push((host, container));
    }
    if let Some(rdma) = &dev.rdma {
        nodes.extend(rdma.char_devices.iter().map(|n| (n.clone(), n.clone())));
    }
    if dev.vhost_net {
        for n in [VHOST_NET_NODE, TUN_NODE] {
            nodes.push((n.to_owned(), n.to_owned()));
        }
    }
    Ok(nodes)
}

/// Device specs for `devices`, de-duplicated by host path in first-seen order.
pub fn device_specs(devices: &[SriovDevice]) -> Result<Vec<DeviceSpec>, SriovError> {
    let mut specs: Vec<DeviceSpec> = Vec::new();
    for dev in devices {
        for (host, container) in device_nodes(dev)? {
            if !specs.iter().any(|s| s.host_path == host) {
                specs.push(DeviceSpec {
                    container_path: container,
                    host_path: host,
                    permissions: "rw".to_owned(),
                });
            }
        }
    }
    Ok(specs)
}

/// Checks that every host node of `devices` (vfio, rdma, vhost) exists below `dev_root` (a
/// `/dev/vfio/5` spec is looked up as `<dev_root>/vfio/5`). The specs themselves keep naming
/// `/dev`, as the kubelet needs.
pub fn check_nodes(dev_root: &Path, devices: &[SriovDevice]) -> Result<(), SriovError> {
    for dev in devices {
        for (host, _) in device_nodes(dev)? {
            let rel = host.trim_start_matches("/dev/");
            if !dev_root.join(rel).exists() {
                return Err(SriovError::MissingNode {
                    pci: dev.pci.clone(),
                    node: host,
                });
            }
        }
    }
    Ok(())
}

/// The vfio part of [`check_nodes`] (kept for callers that only hand out vfio devices).
pub fn check_vfio_nodes(dev_root: &Path, devices: &[SriovDevice]) -> Result<(), SriovError> {
    let vfio: Vec<SriovDevice> = devices
        .iter()
        .filter(|d| d.mode == DeviceMode::Vfio)
        .map(|d| SriovDevice {
            rdma: None,
            vhost_net: false,
            ..d.clone()
        })
        .collect();
    check_nodes(dev_root, &vfio)
}

/// The `extra` provider's keys for device `pci`: `additionalInfo["*"]`, then the device's own
/// entry over it (infoprovider/extraInfoProvider.go `GetEnvVal`).
pub fn extra_info(
    additional_info: &BTreeMap<String, BTreeMap<String, String>>,
    pci: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in ["*", pci] {
        if let Some(kv) = additional_info.get(key) {
            out.extend(kv.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    out
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
    // With CDI the runtime takes the nodes from the pool's spec file (crate::cdi), so the
    // response names CDI devices instead of carrying device specs, as SRIOV-DP's --use-cdi
    // does. A device without nodes has no CDI entry (CDI refuses empty edits), so no name.
    let (devices_out, cdi_devices) = if params.cdi {
        let mut names = Vec::new();
        for dev in devices {
            if !device_nodes(dev)?.is_empty() {
                names.push(cdi_name(params, &dev.pci));
            }
        }
        (Vec::new(), names)
    } else {
        (device_specs(devices)?, Vec::new())
    };
    Ok(ContainerAlloc {
        envs,
        mounts: Vec::new(),
        devices: devices_out,
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
    #[serde(rename = "pci-address", skip_serializing_if = "String::is_empty")]
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
            // SRIOV-DP sets neither vhost-net, pf-pci-address nor representor-device.
            vhost_net: None,
            rdma_device: dev
                .rdma
                .as_ref()
                .filter(|r| !r.devices.is_empty())
                .map(|r| r.devices.join(",")),
            pf_pci_address: None,
            representor_device: None,
        },
    }
}

/// Device-info file name: `<resource with '/'→'-'>-<id with '/'→'-'>-device.json`.
pub fn device_info_file_name(resource_name: &str, id: &str) -> String {
    format!(
        "{}-{}-device.json",
        resource_name.replace('/', "-"),
        id.replace('/', "-")
    )
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
    // A leftover read-only temp file would make the write fail.
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, body).map_err(|e| err(e.to_string()))?;
    // Read-only, as network-attachment-definition-client's saveDeviceInfo writes it (0444).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| err(e.to_string()))?;
    }
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
        let alloc = container_alloc(&params, &[SriovDevice::vfio("0000:01:00.1", 9)]).expect("a");
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

    fn spec(host: &str, container: &str) -> DeviceSpec {
        DeviceSpec {
            container_path: container.into(),
            host_path: host.into(),
            permissions: "rw".into(),
        }
    }

    fn rdma_dev(pci: &str, n: u32) -> SriovDevice {
        let mut d = SriovDevice::netdev(pci);
        d.rdma = Some(RdmaInfo {
            devices: vec![format!("mlx5_{n}")],
            // rdmamap GetRdmaCharDevices order: ucm, issm, umad, uverbs, rdma_cm.
            char_devices: vec![
                format!("/dev/infiniband/issm{n}"),
                format!("/dev/infiniband/umad{n}"),
                format!("/dev/infiniband/uverbs{n}"),
                "/dev/infiniband/rdma_cm".into(),
            ],
        });
        d
    }

    #[test]
    fn golden_rdma_provider() {
        // pkg/infoprovider/rdmaInfoProvider_test.go (v3.11.0) "should the rdma mounts from
        // deviceSpecs": issm4, umad4, uverbs4, rdma_cm and rdma device mlx5_3 give these five
        // keys; Go's json.Marshal sorts them.
        let mut dev = rdma_dev("0000:3b:02.2", 4);
        if let Some(r) = dev.rdma.as_mut() {
            r.devices = vec!["mlx5_3".into()];
        }
        let params = SriovAllocParams::new("nvidia.com", "mlnx_rdma");
        let alloc = container_alloc(&params, &[dev]).expect("alloc");
        assert_eq!(
            alloc.envs["PCIDEVICE_NVIDIA_COM_MLNX_RDMA_INFO"],
            r#"{"0000:3b:02.2":{"generic":{"deviceID":"0000:3b:02.2"},"rdma":{"issm":"/dev/infiniband/issm4","rdma_cm":"/dev/infiniband/rdma_cm","rdma_dev":"mlx5_3","umad":"/dev/infiniband/umad4","uverbs":"/dev/infiniband/uverbs4"}}}"#
        );
        assert_eq!(
            alloc.devices,
            [
                spec("/dev/infiniband/issm4", "/dev/infiniband/issm4"),
                spec("/dev/infiniband/umad4", "/dev/infiniband/umad4"),
                spec("/dev/infiniband/uverbs4", "/dev/infiniband/uverbs4"),
                spec("/dev/infiniband/rdma_cm", "/dev/infiniband/rdma_cm"),
            ]
        );
    }

    #[test]
    fn rdma_nodes_shared_by_two_devices_are_given_once() {
        let params = SriovAllocParams::new("nvidia.com", "r");
        let alloc = container_alloc(
            &params,
            &[rdma_dev("0000:3b:02.2", 4), rdma_dev("0000:3b:02.3", 5)],
        )
        .expect("alloc");
        let hosts: Vec<&str> = alloc.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(
            hosts,
            [
                "/dev/infiniband/issm4",
                "/dev/infiniband/umad4",
                "/dev/infiniband/uverbs4",
                "/dev/infiniband/rdma_cm",
                "/dev/infiniband/issm5",
                "/dev/infiniband/umad5",
                "/dev/infiniband/uverbs5",
            ]
        );
    }

    #[test]
    fn golden_vhost_and_vfio_providers() {
        // README.md (v3.11.0) "Pod device information" shows vfio + vhost for one device; the
        // README's key names there are stale (`vfio-dev-mount`), the code's are `dev-mount` and
        // `mount` (vfioInfoProvider.go), `net-mount` and `tun-mount` (vhostNetInfoProvider.go).
        let mut dev = SriovDevice::vfio("0000:3b:02.6", 169);
        dev.vhost_net = true;
        let params = SriovAllocParams::new("intel.com", "dpdk_nic_1");
        let alloc = container_alloc(&params, &[dev]).expect("alloc");
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_DPDK_NIC_1_INFO"],
            r#"{"0000:3b:02.6":{"generic":{"deviceID":"0000:3b:02.6"},"vfio":{"dev-mount":"/dev/vfio/169","mount":"/dev/vfio/vfio"},"vhost":{"net-mount":"/dev/vhost-net","tun-mount":"/dev/net/tun"}}}"#
        );
        // vhostNetInfoProvider_test.go: the two specs, vhost-net first, rw.
        assert_eq!(
            alloc.devices,
            [
                spec("/dev/vfio/vfio", "/dev/vfio/vfio"),
                spec("/dev/vfio/169", "/dev/vfio/169"),
                spec("/dev/vhost-net", "/dev/vhost-net"),
                spec("/dev/net/tun", "/dev/net/tun"),
            ]
        );
    }

    #[test]
    fn golden_extra_provider() {
        // extraInfoProvider_test.go (v3.11.0): "*" gives every device its keys, the device's own
        // address overrides them key by key.
        let info = BTreeMap::from([
            (
                "*".to_owned(),
                BTreeMap::from([
                    ("test".to_owned(), "test".to_owned()),
                    ("bla".to_owned(), "bla".to_owned()),
                ]),
            ),
            (
                "0000:00:00.1".to_owned(),
                BTreeMap::from([("test".to_owned(), "test1".to_owned())]),
            ),
        ]);
        let mut a = SriovDevice::netdev("0000:00:00.1");
        a.extra = Some(extra_info(&info, &a.pci));
        let mut b = SriovDevice::netdev("0000:00:00.2");
        b.extra = Some(extra_info(&info, &b.pci));
        let params = SriovAllocParams::new("intel.com", "x");
        let alloc = container_alloc(&params, &[a, b]).expect("alloc");
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_X_INFO"],
            r#"{"0000:00:00.1":{"extra":{"bla":"bla","test":"test1"},"generic":{"deviceID":"0000:00:00.1"}},"0000:00:00.2":{"extra":{"bla":"bla","test":"test"},"generic":{"deviceID":"0000:00:00.2"}}}"#
        );
        assert!(alloc.devices.is_empty());
        // A pool with additionalInfo for other devices only still has the provider: "extra":{}.
        let mut c = SriovDevice::netdev("0000:00:00.3");
        c.extra = Some(extra_info(
            &BTreeMap::from([("0000:00:00.9".to_owned(), BTreeMap::new())]),
            &c.pci,
        ));
        assert_eq!(
            info_json(&[c]).expect("json"),
            r#"{"0000:00:00.3":{"extra":{},"generic":{"deviceID":"0000:00:00.3"}}}"#
        );
    }

    #[test]
    fn cdi_mode_names_devices_with_nodes_instead_of_specs() {
        let mut params = SriovAllocParams::new("intel.com", "p");
        params.cdi = true;
        let alloc = container_alloc(
            &params,
            &[
                SriovDevice::vfio("0000:3b:02.0", 70),
                SriovDevice::netdev("0000:3b:02.1"),
            ],
        )
        .expect("alloc");
        assert!(alloc.devices.is_empty());
        assert_eq!(alloc.cdi_devices, ["intel.com/net-pci=0000:3b:02.0"]);
        assert_eq!(
            alloc.envs["PCIDEVICE_INTEL_COM_P"],
            "0000:3b:02.0,0000:3b:02.1"
        );
    }

    #[test]
    fn all_nodes_checked_under_dev_root() {
        let root = tempfile::tempdir().expect("tmp");
        let mut dev = rdma_dev("0000:3b:02.2", 4);
        dev.vhost_net = true;
        let devs = [dev];
        let missing = |r: Result<(), SriovError>| match r {
            Err(SriovError::MissingNode { node, .. }) => node,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            missing(check_nodes(root.path(), &devs)),
            "/dev/infiniband/issm4"
        );
        std::fs::create_dir_all(root.path().join("infiniband")).expect("mkdir");
        for n in ["issm4", "umad4", "uverbs4", "rdma_cm"] {
            std::fs::write(root.path().join("infiniband").join(n), "").expect("w");
        }
        assert_eq!(missing(check_nodes(root.path(), &devs)), "/dev/vhost-net");
        std::fs::write(root.path().join("vhost-net"), "").expect("w");
        assert_eq!(missing(check_nodes(root.path(), &devs)), "/dev/net/tun");
        std::fs::create_dir_all(root.path().join("net")).expect("mkdir");
        std::fs::write(root.path().join("net/tun"), "").expect("w");
        assert_eq!(check_nodes(root.path(), &devs), Ok(()));
    }

    #[test]
    fn golden_rdma_device_info_file() {
        // netResourcePool.go StoreDeviceInfoFile: rdma-device = the VF's RDMA devices joined.
        let dir = tempfile::tempdir().expect("tmp");
        let path = write_device_info(dir.path(), "nvidia.com/r", &rdma_dev("0000:3b:02.2", 3))
            .expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            r#"{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:3b:02.2","rdma-device":"mlx5_3"}}"#
        );
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
            // SRIOV-DP writes only the address (and rdma-device): no pf-pci-address.
            r#"{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:18:02.5"}}"#
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(
                mode & 0o777,
                0o444,
                "read-only like the NAD client writes it"
            );
        }
        // Rewriting over the read-only file works (a re-Allocate after a kubelet restart).
        write_device_info(dir.path(), "intel.com/intel_sriov_netdevice", &dev).expect("rewrite");
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
