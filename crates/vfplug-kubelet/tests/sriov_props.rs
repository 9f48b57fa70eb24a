//! Properties of the SR-IOV Allocate ABI over arbitrary device sets: the `_INFO` JSON is valid,
//! complete and sorted like Go's encoding/json, and the device specs are exactly what the vfio
//! and vhost devices need (or, with CDI, CDI names for exactly the devices that have nodes).

use std::collections::BTreeSet;

use proptest::prelude::*;
use vfplug_kubelet::sriov::{SriovAllocParams, SriovDevice, container_alloc, info_json};

fn device() -> impl Strategy<Value = SriovDevice> {
    (
        0u8..4,
        0u8..32,
        0u8..8,
        prop::option::of(0u32..512),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(bus, dev, func, group, noiommu, vhost)| {
            let pci = format!("0000:{bus:02x}:{dev:02x}.{func}");
            let mut d = match group {
                Some(g) => {
                    let mut d = SriovDevice::vfio(pci, g);
                    d.noiommu = noiommu;
                    d
                }
                None => SriovDevice::netdev(pci),
            };
            d.vhost_net = vhost;
            d
        })
}

fn devices() -> impl Strategy<Value = Vec<SriovDevice>> {
    prop::collection::vec(device(), 1..12).prop_map(|v| {
        // Unique PCI addresses, as in a real request.
        let mut seen = BTreeSet::new();
        v.into_iter()
            .filter(|d| seen.insert(d.pci.clone()))
            .collect()
    })
}

proptest! {
    #[test]
    fn info_json_is_complete_and_sorted(devs in devices()) {
        let json = info_json(&devs).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let obj = v.as_object().unwrap();
        let keys: Vec<&String> = obj.keys().collect();
        let mut want: Vec<&String> = devs.iter().map(|d| &d.pci).collect();
        want.sort();
        prop_assert_eq!(keys, want);
        for d in &devs {
            let entry = &obj[&d.pci];
            prop_assert_eq!(entry["generic"]["deviceID"].as_str(), Some(d.pci.as_str()));
            match d.iommu_group {
                Some(g) => {
                    let dev_mount = format!("/dev/vfio/{g}");
                    prop_assert_eq!(entry["vfio"]["dev-mount"].as_str(), Some(dev_mount.as_str()));
                    prop_assert_eq!(entry["vfio"]["mount"].as_str(), Some("/dev/vfio/vfio"));
                }
                None => prop_assert!(entry.get("vfio").is_none()),
            }
            prop_assert_eq!(entry.get("vhost").is_some(), d.vhost_net);
        }
        // Compact, and keys in sorted order at every level, like Go's json.Marshal of maps.
        prop_assert!(!json.contains(' '));
        prop_assert_eq!(serde_json::to_string(&v).unwrap(), json);
    }

    #[test]
    fn device_specs_cover_exactly_the_vfio_groups(devs in devices()) {
        let params = SriovAllocParams::new("vfplug.io", "pool");
        let alloc = container_alloc(&params, &devs).unwrap();
        let ids: Vec<&str> = devs.iter().map(|d| d.pci.as_str()).collect();
        prop_assert_eq!(&alloc.envs["PCIDEVICE_VFPLUG_IO_POOL"], &ids.join(","));
        let hosts: Vec<&str> = alloc.devices.iter().map(|s| s.host_path.as_str()).collect();
        let unique: BTreeSet<&str> = hosts.iter().copied().collect();
        prop_assert_eq!(unique.len(), hosts.len(), "host paths de-duplicated");
        let any_vfio = devs.iter().any(|d| d.iommu_group.is_some());
        prop_assert_eq!(unique.contains("/dev/vfio/vfio"), any_vfio);
        for d in devs.iter().filter(|d| d.iommu_group.is_some()) {
            let g = d.iommu_group.unwrap();
            let host = if d.noiommu { format!("/dev/vfio/noiommu-{g}") } else { format!("/dev/vfio/{g}") };
            let spec = alloc.devices.iter().find(|s| s.host_path == host);
            prop_assert!(spec.is_some(), "missing {}", host);
            let spec = spec.unwrap();
            prop_assert_eq!(&spec.container_path, &format!("/dev/vfio/{g}"));
            prop_assert_eq!(spec.permissions.as_str(), "rw");
        }
        let any_vhost = devs.iter().any(|d| d.vhost_net);
        prop_assert_eq!(unique.contains("/dev/vhost-net"), any_vhost);
        prop_assert_eq!(unique.contains("/dev/net/tun"), any_vhost);
        prop_assert!(alloc.devices.iter().all(|s| s.host_path.starts_with("/dev/vfio/")
            || s.host_path == "/dev/vhost-net" || s.host_path == "/dev/net/tun"));
    }

    #[test]
    fn with_cdi_exactly_the_devices_with_nodes_are_named(devs in devices()) {
        let mut params = SriovAllocParams::new("vfplug.io", "pool");
        params.cdi = true;
        let alloc = container_alloc(&params, &devs).unwrap();
        prop_assert!(alloc.devices.is_empty());
        let want: Vec<String> = devs
            .iter()
            .filter(|d| d.iommu_group.is_some() || d.vhost_net)
            .map(|d| format!("vfplug.io/net-pci={}", d.pci))
            .collect();
        prop_assert_eq!(&alloc.cdi_devices, &want);
    }
}
