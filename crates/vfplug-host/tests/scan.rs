//! The fixture's layout against the kernel's, and `SysfsInventory::scan` against fixtures.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use vfplug_core::{LinkType, PciAddress};
use vfplug_host::fixture::{PCI_PARENT, SysfsBuilder, VfSpec};
use vfplug_host::sysfs::SysfsInventory;

fn pci(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// A mixed host: an X710 (i40e) with iavf VFs, one of them on vfio-pci and one whose netdev
/// was moved into a pod; an 82599 (ixgbe) with VFs all on vfio-pci; a ConnectX (mlx5)
/// InfiniBand PF; an onboard NIC without SR-IOV.
fn realistic(root: &Path) -> SysfsBuilder {
    let mut b = SysfsBuilder::new(root);
    b.pf("0000:3b:00.0")
        .vendor("8086")
        .device("1572")
        .vf_device("154c")
        .driver("i40e")
        .netdev("ens785f0")
        .numa(0)
        .vfs(4, |i| match i {
            1 => VfSpec::new().driver("vfio-pci"),
            _ => VfSpec::new().driver("iavf").netdev(format!("ens785f0v{i}")),
        })
        .build()
        .unwrap();
    b.pf("0000:5e:00.0")
        .vendor("8086")
        .device("10fb")
        .vf_device("10ed")
        .driver("ixgbe")
        .netdev("ens1f0")
        .numa(1)
        .carrier(false)
        .total_vfs(63)
        .vf_layout(0x80, 2) // 82599: VFs at 5e:10.0, 5e:10.2, ...
        .vfs(3, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    b.pf("0000:af:00.0")
        .vendor("15b3")
        .device("101b")
        .vf_device("101c")
        .class("0x020700")
        .driver("mlx5_core")
        .netdev("ib0")
        .link_type(32)
        .numa(-1)
        .vfs(2, |i| {
            VfSpec::new()
                .driver("mlx5_core")
                .netdev(format!("ib0v{i}"))
                .numa(-1)
        })
        .build()
        .unwrap();
    b.pf("0000:00:1f.6")
        .device("15bb")
        .driver("e1000e")
        .netdev("eno1")
        .sriov(false)
        .build()
        .unwrap();
    b
}

#[test]
fn fixture_symlinks_are_relative_and_resolve_like_the_kernels() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let b = realistic(dir.path());
    let root = dir.path();
    let dev = |bdf: &str| root.join(PCI_PARENT).join(bdf);
    let expect = [
        (
            root.join("bus/pci/devices/0000:3b:00.0"),
            format!("../../../{PCI_PARENT}/0000:3b:00.0"),
            dev("0000:3b:00.0"),
        ),
        (
            dev("0000:3b:00.0").join("driver"),
            "../../../../bus/pci/drivers/i40e".into(),
            root.join("bus/pci/drivers/i40e"),
        ),
        (
            dev("0000:3b:00.0").join("virtfn1"),
            "../0000:3b:01.1".into(),
            dev("0000:3b:01.1"),
        ),
        (
            dev("0000:3b:01.1").join("physfn"),
            "../0000:3b:00.0".into(),
            dev("0000:3b:00.0"),
        ),
        (
            dev("0000:3b:01.1").join("driver"),
            "../../../../bus/pci/drivers/vfio-pci".into(),
            root.join("bus/pci/drivers/vfio-pci"),
        ),
        (
            root.join("bus/pci/drivers/iavf/0000:3b:01.0"),
            format!("../../../../{PCI_PARENT}/0000:3b:01.0"),
            dev("0000:3b:01.0"),
        ),
        (
            root.join("class/net/ens785f0v2"),
            format!("../../{PCI_PARENT}/0000:3b:01.2/net/ens785f0v2"),
            dev("0000:3b:01.2").join("net/ens785f0v2"),
        ),
        (
            dev("0000:3b:01.2").join("net/ens785f0v2/device"),
            "../../../0000:3b:01.2".into(),
            dev("0000:3b:01.2"),
        ),
        (
            dev("0000:5e:10.2").join("physfn"),
            "../0000:5e:00.0".into(),
            dev("0000:5e:00.0"),
        ),
    ];
    for (link, target, resolves_to) in expect {
        let t = fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        assert!(t.is_relative(), "{} -> {}", link.display(), t.display());
        assert_eq!(t, PathBuf::from(&target), "{}", link.display());
        assert_eq!(
            fs::canonicalize(&link).unwrap(),
            fs::canonicalize(&resolves_to).unwrap(),
            "{}",
            link.display()
        );
    }
    // IOMMU groups: the device's link and the group's back-link agree.
    let group = fs::read_link(dev("0000:3b:01.1").join("iommu_group")).unwrap();
    assert!(
        group.starts_with("../../../../kernel/iommu_groups"),
        "{}",
        group.display()
    );
    let gdir = fs::canonicalize(dev("0000:3b:01.1").join("iommu_group")).unwrap();
    assert_eq!(
        fs::canonicalize(gdir.join("devices/0000:3b:01.1")).unwrap(),
        fs::canonicalize(dev("0000:3b:01.1")).unwrap()
    );
    // Attributes in the kernel's formats.
    let read = |p: PathBuf| fs::read_to_string(p).unwrap();
    assert_eq!(read(dev("0000:3b:00.0").join("vendor")), "0x8086\n");
    assert_eq!(read(dev("0000:3b:01.0").join("device")), "0x154c\n");
    assert_eq!(read(dev("0000:3b:00.0").join("sriov_numvfs")), "4\n");
    assert_eq!(
        read(dev("0000:3b:01.0").join("driver_override")),
        "(null)\n"
    );
    assert_eq!(read(root.join("class/net/ib0/type")), "32\n");
    assert!(root.join("bus/pci/drivers/vfio-pci/bind").is_file());
    assert!(root.join("bus/pci/drivers_probe").is_file());
    assert!(!dev("0000:00:1f.6").join("sriov_totalvfs").exists());
    assert_eq!(
        b.vf_address("0000:5e:00.0", 1).unwrap(),
        pci("0000:5e:10.2")
    );
}

#[test]
fn scan_of_a_realistic_host() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let b = realistic(dir.path());
    b.move_vf_netdev_away("0000:3b:01.3").unwrap();
    let inv = SysfsInventory::new(dir.path().into()).scan().unwrap();

    assert_eq!(
        inv.pfs.keys().copied().collect::<Vec<_>>(),
        [
            pci("0000:3b:00.0"),
            pci("0000:5e:00.0"),
            pci("0000:af:00.0")
        ]
    );
    assert_eq!(inv.vfs.len(), 4 + 3 + 2);

    let x710 = &inv.pfs[&pci("0000:3b:00.0")];
    assert_eq!(x710.netdev.as_deref(), Some("ens785f0"));
    assert_eq!(
        (x710.vendor.as_str(), x710.device.as_str()),
        ("8086", "1572")
    );
    assert_eq!(x710.driver.as_deref(), Some("i40e"));
    assert_eq!((x710.total_vfs, x710.num_vfs), (64, 4));
    assert_eq!(x710.numa_node, Some(0));
    assert_eq!(x710.link_type, LinkType::Ether);
    assert_eq!(x710.carrier, Some(true));

    let vf0 = &inv.vfs[&pci("0000:3b:01.0")];
    assert_eq!(vf0.pf, x710.pci);
    assert_eq!(vf0.vf_index, 0);
    assert_eq!((vf0.vendor.as_str(), vf0.device.as_str()), ("8086", "154c"));
    assert_eq!(vf0.driver.as_deref(), Some("iavf"));
    assert_eq!(vf0.netdevs, ["ens785f0v0"]);
    assert!(vf0.iommu_group.is_some());

    // vfio-pci VF: no netdev, still complete, its own IOMMU group.
    let vfio = &inv.vfs[&pci("0000:3b:01.1")];
    assert_eq!(vfio.driver.as_deref(), Some("vfio-pci"));
    assert!(vfio.netdevs.is_empty());
    assert_eq!(vfio.pf_netdev.as_deref(), Some("ens785f0"));
    assert_eq!(vfio.link_type, LinkType::Ether);
    assert_ne!(vfio.iommu_group, vf0.iommu_group);

    // Netdev moved into a pod: the VF is still there, with everything from the PF.
    let moved = &inv.vfs[&pci("0000:3b:01.3")];
    assert!(moved.netdevs.is_empty());
    assert_eq!(moved.vf_index, 3);
    assert_eq!(moved.pf_netdev.as_deref(), Some("ens785f0"));
    assert_eq!(moved.driver.as_deref(), Some("iavf"));
    assert_eq!(moved.link_type, LinkType::Ether);

    // 82599: stride-2 addresses, indices from virtfnN, NUMA 1, carrier down.
    let ixgbe = &inv.pfs[&pci("0000:5e:00.0")];
    assert_eq!(
        (ixgbe.total_vfs, ixgbe.carrier, ixgbe.numa_node),
        (63, Some(false), Some(1))
    );
    assert_eq!(inv.vfs[&pci("0000:5e:10.4")].vf_index, 2);
    assert_eq!(inv.vfs[&pci("0000:5e:10.4")].numa_node, Some(1));

    // mlx5 IB: link type from the PF; NUMA -1 on both → None.
    let ib = &inv.pfs[&pci("0000:af:00.0")];
    assert_eq!(ib.link_type, LinkType::Infiniband);
    assert_eq!(ib.numa_node, None);
    let ibvf = &inv.vfs[&pci("0000:af:01.0")];
    assert_eq!(ibvf.link_type, LinkType::Infiniband);
    assert_eq!(ibvf.numa_node, None);
    assert_eq!(ibvf.vendor, "15b3");
}

#[test]
fn vf_numa_minus_one_falls_back_to_the_pf() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .numa(1)
        .vfs(2, |i| {
            if i == 0 {
                VfSpec::new().numa(-1)
            } else {
                VfSpec::new()
            }
        })
        .build()
        .unwrap();
    let inv = SysfsInventory::new(dir.path().into()).scan().unwrap();
    assert_eq!(inv.vfs[&pci("0000:3b:01.0")].numa_node, Some(1));
    assert_eq!(inv.vfs[&pci("0000:3b:01.1")].numa_node, Some(1));
    // A VF without a driver and without netdev is still a VF.
    assert_eq!(inv.vfs[&pci("0000:3b:01.0")].driver, None);
}

#[test]
fn vf_ids_come_from_sriov_vf_device_or_else_from_each_vf() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .vendor("15b3")
        .device("1017")
        .vf_device("1018")
        .vfs(2, |_| VfSpec::new())
        .build()
        .unwrap();
    let pf_dir = dir.path().join(PCI_PARENT).join("0000:3b:00.0");
    let inv = SysfsInventory::new(dir.path().into());
    let ids = |inv: &vfplug_core::Inventory| {
        let v = &inv.vfs[&pci("0000:3b:01.1")];
        (v.vendor.clone(), v.device.clone())
    };
    assert_eq!(ids(&inv.scan().unwrap()), ("15b3".into(), "1018".into()));
    // A pre-5.8 kernel has no sriov_vf_device: each VF's own files are read.
    fs::remove_file(pf_dir.join("sriov_vf_device")).unwrap();
    fs::write(
        dir.path().join(PCI_PARENT).join("0000:3b:01.1/device"),
        "0x101e\n",
    )
    .unwrap();
    assert_eq!(ids(&inv.scan().unwrap()), ("15b3".into(), "101e".into()));
    // ...and a kernel without CONFIG_NUMA has no numa_node: the PF's (0) is used.
    fs::remove_file(dir.path().join(PCI_PARENT).join("0000:3b:01.1/numa_node")).unwrap();
    assert_eq!(
        inv.scan().unwrap().vfs[&pci("0000:3b:01.1")].numa_node,
        Some(0)
    );
}

#[test]
fn link_type_comes_from_the_pf_even_when_the_vf_netdev_says_otherwise() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .netdev("ib0")
        .link_type(32)
        .vfs(1, |_| VfSpec::new().driver("mlx5_core").netdev("v0"))
        .build()
        .unwrap();
    // Corrupt the VF netdev's type: scan must not look at it.
    fs::write(dir.path().join("class/net/v0/type"), "1\n").unwrap();
    let inv = SysfsInventory::new(dir.path().into()).scan().unwrap();
    assert_eq!(
        inv.vfs[&pci("0000:3b:01.0")].link_type,
        LinkType::Infiniband
    );
}

#[test]
fn numvfs_change_and_rebind_are_seen_on_rescan() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("p0")
        .vfs(4, |i| {
            VfSpec::new().driver("iavf").netdev(format!("p0v{i}"))
        })
        .build()
        .unwrap();
    let inv = SysfsInventory::new(dir.path().into());
    assert_eq!(inv.scan().unwrap().vfs.len(), 4);

    b.set_num_vfs("0000:3b:00.0", 2).unwrap();
    let s = inv.scan().unwrap();
    assert_eq!(
        s.vfs.keys().copied().collect::<Vec<_>>(),
        [pci("0000:3b:01.0"), pci("0000:3b:01.1")]
    );
    assert_eq!(s.pfs[&pci("0000:3b:00.0")].num_vfs, 2);
    // Removed VFs leave nothing behind.
    assert!(fs::symlink_metadata(dir.path().join("bus/pci/devices/0000:3b:01.3")).is_err());
    assert!(fs::symlink_metadata(dir.path().join("class/net/p0v3")).is_err());
    assert!(fs::symlink_metadata(dir.path().join("bus/pci/drivers/iavf/0000:3b:01.3")).is_err());

    b.set_num_vfs("0000:3b:00.0", 6).unwrap();
    b.rebind("0000:3b:01.0", Some("vfio-pci")).unwrap();
    let s = inv.scan().unwrap();
    assert_eq!(s.vfs.len(), 6);
    assert_eq!(s.vfs[&pci("0000:3b:01.5")].vf_index, 5);
    assert_eq!(s.vfs[&pci("0000:3b:01.5")].netdevs, ["p0v5"]);
    let vf0 = &s.vfs[&pci("0000:3b:01.0")];
    assert_eq!(vf0.driver.as_deref(), Some("vfio-pci"));
    assert!(vf0.netdevs.is_empty(), "unbinding iavf destroys the netdev");

    b.set_carrier("p0", false).unwrap();
    assert_eq!(
        inv.scan().unwrap().pfs[&pci("0000:3b:00.0")].carrier,
        Some(false)
    );
    assert!(
        b.set_num_vfs("0000:3b:00.0", 65).is_err(),
        "more than sriov_totalvfs"
    );
}

#[test]
fn eight_pfs_of_256_vfs() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    for p in 0..8u32 {
        let pf = format!("0000:{:02x}:00.0", 0x10 + 2 * p);
        b.pf(&pf)
            .driver("ice")
            .netdev(&format!("p{p}"))
            .numa((p % 2) as i32)
            .total_vfs(256)
            .vfs(256, |i| {
                if i % 2 == 0 {
                    VfSpec::new().driver("iavf").netdev(format!("p{p}v{i}"))
                } else {
                    VfSpec::new().driver("vfio-pci")
                }
            })
            .build()
            .unwrap();
    }
    let inv = SysfsInventory::new(dir.path().into()).scan().unwrap();
    assert_eq!(inv.pfs.len(), 8);
    assert_eq!(inv.vfs.len(), 8 * 256);
    for pf in inv.pfs.values() {
        let vfs: Vec<_> = inv.vfs.values().filter(|v| v.pf == pf.pci).collect();
        assert_eq!(vfs.len(), 256);
        let mut idx: Vec<u32> = vfs.iter().map(|v| v.vf_index).collect();
        idx.sort_unstable();
        assert_eq!(idx, (0..256).collect::<Vec<_>>());
        assert_eq!(
            vfs.iter()
                .filter(|v| v.driver.as_deref() == Some("vfio-pci"))
                .count(),
            128
        );
    }
    // The threaded reader and the single-threaded one see the same inventory.
    for threads in [1, 3, 8] {
        let other = SysfsInventory::new(dir.path().into())
            .with_threads(threads)
            .scan()
            .unwrap();
        assert_eq!(other, inv, "threads = {threads}");
    }
    let groups: std::collections::BTreeSet<_> = inv.vfs.values().map(|v| v.iommu_group).collect();
    assert_eq!(groups.len(), 2048, "one IOMMU group per VF");
}

#[test]
fn races_skip_the_broken_piece_not_the_scan() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("a")
        .vfs(3, |_| VfSpec::new().driver("iavf"))
        .build()
        .unwrap();
    b.pf("0000:5e:00.0")
        .driver("i40e")
        .netdev("b")
        .vfs(2, |_| VfSpec::new())
        .build()
        .unwrap();
    let root = dir.path();
    let dev = |bdf: &str| root.join(PCI_PARENT).join(bdf);

    // VF 1 vanished after its virtfn link was listed: its directory is gone.
    fs::remove_dir_all(dev("0000:3b:01.1")).unwrap();
    // VF 2 holds garbage (a half-written attribute).
    fs::write(dev("0000:3b:01.2").join("numa_node"), "x\n").unwrap();
    // The second PF is broken (garbage in sriov_numvfs).
    fs::write(dev("0000:5e:00.0").join("sriov_numvfs"), "garbage\n").unwrap();
    // A dangling bus/pci/devices entry and a non-PCI name.
    std::os::unix::fs::symlink(
        "../../../devices/nowhere",
        root.join("bus/pci/devices/0000:77:00.0"),
    )
    .unwrap();
    fs::write(root.join("bus/pci/devices/README"), "").unwrap();

    let inv = SysfsInventory::new(root.into()).scan().unwrap();
    assert_eq!(
        inv.pfs.keys().copied().collect::<Vec<_>>(),
        [pci("0000:3b:00.0")]
    );
    assert_eq!(
        inv.vfs.keys().copied().collect::<Vec<_>>(),
        [pci("0000:3b:01.0")]
    );
}

#[test]
fn a_root_that_is_not_sysfs_is_a_typed_error_with_the_path() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let err = SysfsInventory::new(dir.path().join("nope"))
        .scan()
        .unwrap_err();
    assert!(err.is_not_found());
    assert!(err.to_string().contains("nope/bus/pci/devices"), "{err}");
}

#[test]
fn scans_racing_with_sriov_numvfs_changes_never_fail_and_stay_consistent() {
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let mut b = SysfsBuilder::new(dir.path());
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("p0")
        .total_vfs(64)
        .vfs(64, |i| {
            VfSpec::new().driver("iavf").netdev(format!("p0v{i}"))
        })
        .build()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            // The kernel's own sequence: to change a non-zero count, write 0 first.
            for n in [0, 17, 0, 64, 0, 5, 0, 64].iter().cycle().take(24) {
                b.set_num_vfs("0000:3b:00.0", *n).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let inv = SysfsInventory::new(dir.path().into());
        let mut scans = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) || scans == 0 {
            let s = inv.scan().expect("a racing scan must not fail");
            for vf in s.vfs.values() {
                assert!(s.pfs.contains_key(&vf.pf), "VF {} without its PF", vf.pci);
                assert!(vf.vf_index < 64);
                assert_eq!(vf.pf_netdev.as_deref(), Some("p0"));
            }
            scans += 1;
        }
        writer.join().unwrap();
        eprintln!("{scans} scans raced with 24 sriov_numvfs changes");
    });
    // Settled: the last write was 64.
    assert_eq!(
        SysfsInventory::new(dir.path().into())
            .scan()
            .unwrap()
            .vfs
            .len(),
        64
    );
}
