//! What a VF's device nodes are, read from sysfs the way sriov-network-device-plugin (v3.11.0)
//! reads them at Allocate: no-IOMMU vfio groups (pkg/utils/utils.go `GetVFIODeviceFile`) and
//! RDMA character devices (Mellanox/rdmamap `GetRdmaCharDevices`). Both roots are injectable
//! (`/sys` and `/dev` in production, a fixture in tests).

use std::path::Path;

/// Whether IOMMU group `group` is a vfio no-IOMMU group: its `name` file says `vfio-noiommu`
/// (the file is absent on bare metal). Its node is then `/dev/vfio/noiommu-<group>`.
pub fn is_noiommu_group(sys_root: &Path, group: u32) -> bool {
    let name = sys_root
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("name");
    std::fs::read_to_string(name).is_ok_and(|n| n.trim() == "vfio-noiommu")
}

/// The RDMA devices of PCI device `pci` (`mlx5_3`): the directories under its sysfs
/// `infiniband/` (rdmamap `GetRdmaDevicesForPcidev`), sorted; empty when it has none.
pub fn rdma_devices(sys_root: &Path, pci: vfplug_core::PciAddress) -> Vec<String> {
    let dir = sys_root
        .join("bus/pci/devices")
        .join(pci.to_string())
        .join("infiniband");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// The char devices of RDMA device `ibdev`, as rdmamap finds them, in its order: `ucm`
/// (`class/infiniband_cm`), `issm` and `umad` (`class/infiniband_mad`), `uverbs`
/// (`class/infiniband_verbs`), each the first entry whose name contains the prefix and whose
/// `ibdev` file names `ibdev`; then `/dev/infiniband/rdma_cm` if it exists under `dev_root`.
/// Paths name `/dev` (they go into device specs).
pub fn rdma_char_devices(sys_root: &Path, dev_root: &Path, ibdev: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (class, prefix) in [
        ("infiniband_cm", "ucm"),
        ("infiniband_mad", "issm"),
        ("infiniband_mad", "umad"),
        ("infiniband_verbs", "uverbs"),
    ] {
        let dir = sys_root.join("class").join(class);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        // rdmamap takes the first in directory order; sorted here so the answer is stable.
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.contains(prefix))
            .collect();
        names.sort();
        let found = names.into_iter().find(|n| {
            std::fs::read_to_string(dir.join(n).join("ibdev"))
                .is_ok_and(|s| s.trim_end_matches('\n') == ibdev)
        });
        if let Some(n) = found {
            out.push(format!("/dev/infiniband/{n}"));
        }
    }
    if dev_root.join("infiniband/rdma_cm").exists() {
        out.push("/dev/infiniband/rdma_cm".to_owned());
    }
    out
}

#[cfg(all(test, feature = "fixture"))]
mod tests {
    use super::*;
    use crate::fixture::{SysfsBuilder, VfSpec};

    #[test]
    fn noiommu_and_rdma_nodes_from_a_fixture() {
        let tmp = crate::fixture::tempdir().expect("tmp");
        let sys = tmp.path().join("sys");
        let dev = tmp.path().join("dev");
        let mut b = SysfsBuilder::new(&sys);
        b.pf("0000:3b:00.0")
            .driver("mlx5_core")
            .vfs(2, |_| VfSpec::new().driver("mlx5_core"))
            .build()
            .expect("pf");
        let vf = b.vf_address("0000:3b:00.0", 0).expect("vf").to_string();
        assert!(!is_noiommu_group(&sys, 7));
        b.set_noiommu(7).expect("noiommu");
        assert!(is_noiommu_group(&sys, 7));

        b.add_rdma(&vf, "mlx5_3", 4).expect("rdma");
        b.add_rdma("0000:3b:00.0", "mlx5_0", 0).expect("rdma pf");
        assert_eq!(
            rdma_char_devices(&sys, &dev, "mlx5_3"),
            [
                "/dev/infiniband/issm4",
                "/dev/infiniband/umad4",
                "/dev/infiniband/uverbs4"
            ]
        );
        std::fs::create_dir_all(dev.join("infiniband")).expect("mkdir");
        std::fs::write(dev.join("infiniband/rdma_cm"), "").expect("w");
        assert_eq!(
            rdma_char_devices(&sys, &dev, "mlx5_0")
                .last()
                .map(String::as_str),
            Some("/dev/infiniband/rdma_cm")
        );
        assert!(
            rdma_char_devices(&sys, &dev, "mlx5_9").len() == 1,
            "only rdma_cm"
        );
        // The scan reports the VF's RDMA device (what isRdma pools select on).
        let inv = crate::sysfs::SysfsInventory::new(sys.clone())
            .scan()
            .expect("scan");
        let v = &inv.vfs[&vf.parse().expect("pci")];
        assert_eq!(v.rdma_devices, ["mlx5_3"]);
        assert_eq!(rdma_devices(&sys, v.pci), ["mlx5_3"]);
    }
}
