//! Config parsing, validation, SRIOV-DP compatibility and pool selection.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use vfplug_core::*;

fn pci(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn vf(addr: &str, pf: &str, pf_netdev: Option<&str>, index: u32, driver: &str) -> VfInfo {
    VfInfo {
        pci: pci(addr),
        pf: pci(pf),
        pf_netdev: pf_netdev.map(str::to_owned),
        vf_index: index,
        vendor: "8086".into(),
        device: "154c".into(),
        driver: Some(driver.to_owned()),
        iommu_group: Some(40),
        numa_node: Some(0),
        netdevs: vec![],
        link_type: LinkType::Ether,
        rdma_devices: vec![],
    }
}

fn err(text: &str) -> ConfigError {
    match Config::parse(text) {
        Ok(c) => panic!("expected an error, parsed {c:#?}"),
        Err(e) => e,
    }
}

const MINIMAL: &str = "pools:\n  - name: a\n    selectors: { vendors: ['8086'] }\n";

#[test]
fn native_golden_parses_with_all_fields() {
    let cfg = Config::parse(include_str!("golden/native.yaml")).unwrap();
    assert_eq!(cfg.format, ConfigFormat::Native);
    assert!(cfg.warnings.is_empty());
    assert_eq!(cfg.pools.len(), 2);
    let a = &cfg.pools[0];
    assert_eq!(cfg.resource_name(a), "intel.com/intel_sriov_netdevice");
    assert_eq!(a.policy, AllocPolicy::Spread);
    assert_eq!(a.health.pf_link_down, PfLinkDown::Unhealthy);
    assert_eq!(a.selectors.len(), 1);
    let s = &a.selectors[0];
    assert_eq!(s.pf_names[0].name, "ens785f0");
    let ix = s.pf_names[0].indexes.as_ref().unwrap();
    assert_eq!(ix.ranges(), &[(0, 3), (5, 5)]);
    assert_eq!(s.link_types, vec![LinkType::Ether]);
    let b = &cfg.pools[1];
    assert_eq!(cfg.resource_name(b), "vfplug.io/vm_vfs");
    assert_eq!(b.device_mode, DeviceMode::Vfio);
    assert!(b.bind_vfio);
    assert_eq!(b.selectors.len(), 2);
    assert_eq!(b.selectors[0].root_devices[0].pci, pci("0000:3b:00.0"));
    assert_eq!(b.selectors[1].pci_addresses, vec![pci("0000:3c:02.1")]);
}

#[test]
fn defaults_of_native_format() {
    let cfg = Config::parse(MINIMAL).unwrap();
    let p = &cfg.pools[0];
    assert_eq!(cfg.resource_prefix, "vfplug.io");
    assert_eq!(p.device_mode, DeviceMode::Netdev);
    assert_eq!(p.policy, AllocPolicy::Pack);
    assert_eq!(p.health.pf_link_down, PfLinkDown::Ignore);
    assert!(!p.bind_vfio);
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let e = err(
        "pools:\n  - name: a\n    selectors: { vendors: ['8086'] }\n  - name: b\n    selectors:\n      vendor: ['8086']\n",
    );
    assert_eq!(e.kind, ConfigErrorKind::Schema);
    assert_eq!(e.path, "pools[1].selectors.vendor");
    assert!(e.message.contains("unknown field"), "{e}");
    assert!(
        e.message.contains("vendors"),
        "should list the expected keys: {e}"
    );
    assert!(
        e.to_string().starts_with("pools[1].selectors.vendor: "),
        "{e}"
    );
}

#[test]
fn misplaced_selector_key_is_an_error_in_native_format() {
    // SRIOV-DP #181: rootDevices next to selectors instead of inside.
    let e = err("pools:\n  - name: a\n    rootDevices: ['0000:3b:00.0']\n    selectors: {}\n");
    assert_eq!(e.path, "pools[0].rootDevices");
}

#[test]
fn duplicate_yaml_keys_are_errors() {
    let e = err("pools:\n  - name: a\n    name: b\n    selectors: {}\n");
    assert!(e.message.contains("duplicate"), "{e}");
}

#[test]
fn top_level_unknown_key() {
    let e = err("resourcePrefx: x.io\npools: []\n");
    assert_eq!(e.path, "resourcePrefx");
}

#[test]
fn bad_values_name_their_paths() {
    let cases: &[(&str, &str)] = &[
        (
            "pools:\n  - name: a\n    selectors: { pciAddresses: ['0000:3b:20.1'] }\n",
            "pools[0].selectors.pciAddresses[0]",
        ),
        (
            "pools:\n  - name: a\n    selectors: { pfNames: ['ens1#5-3'] }\n",
            "pools[0].selectors.pfNames[0]",
        ),
        (
            "pools:\n  - name: a\n    selectors: { rootDevices: ['0000:3b:00.0#'] }\n",
            "pools[0].selectors.rootDevices[0]",
        ),
        (
            "pools:\n  - name: a\n    selectors: { pfNames: ['ens1#1,,2'] }\n",
            "pools[0].selectors.pfNames[0]",
        ),
        (
            "pools:\n  - name: a\n    selectors: { linkTypes: [eth] }\n",
            "pools[0].selectors.linkTypes[0]",
        ),
        (
            "pools:\n  - name: a\n    policy: random\n    selectors: {}\n",
            "pools[0].policy",
        ),
        (
            "pools:\n  - name: a\n    deviceMode: dpdk\n    selectors: {}\n",
            "pools[0].deviceMode",
        ),
        (
            "pools:\n  - name: a\n    selectors: [{}, {numaNodes: [x]}]\n",
            "pools[0].selectors[1].numaNodes[0]",
        ),
    ];
    for (text, path) in cases {
        let e = err(text);
        assert_eq!(&e.path, path, "{text}: {e}");
        assert_eq!(e.kind, ConfigErrorKind::Schema, "{e}");
    }
    let e = err("pools:\n  - name: a\n    selectors: { pfNames: ['ens1#5-3'] }\n");
    assert!(e.message.contains("5-3 runs backwards"), "{e}");
}

#[test]
fn semantic_errors_name_their_paths() {
    let cases: &[(&str, &str, &str)] = &[
        ("pools: []\n", "pools", "no pools"),
        (
            "pools:\n  - name: ''\n    selectors: {}\n",
            "pools[0].name",
            "empty",
        ),
        (
            "pools:\n  - name: a\n    selectors: {}\n  - name: a\n    selectors: {}\n",
            "pools[1].name",
            "duplicate",
        ),
        (
            "pools:\n  - name: a/b\n    selectors: {}\n",
            "pools[0].name",
            "only letters",
        ),
        (
            "pools:\n  - name: _a\n    selectors: {}\n",
            "pools[0].name",
            "start and end",
        ),
        (
            "resourcePrefix: Intel.com\npools:\n  - name: a\n    selectors: {}\n",
            "resourcePrefix",
            "DNS",
        ),
        (
            "pools:\n  - name: a\n    prefix: kubernetes.io\n    selectors: {}\n",
            "pools[0].prefix",
            "reserved",
        ),
        (
            "pools:\n  - name: a\n    prefix: 'x..io'\n    selectors: {}\n",
            "pools[0].prefix",
            "DNS",
        ),
        (
            "pools:\n  - name: a\n    selectors: { vendors: ['80866'] }\n",
            "pools[0].selectors[0].vendors[0]",
            "hex",
        ),
        (
            "pools:\n  - name: a\n    selectors: { devices: ['zzzz'] }\n",
            "pools[0].selectors[0].devices[0]",
            "hex",
        ),
        (
            "pools:\n  - name: a\n    deviceMode: vfio\n    selectors: { drivers: [iavf] }\n",
            "pools[0].selectors[0].drivers",
            "bindVfio",
        ),
        (
            "pools:\n  - name: a\n    selectors: { drivers: [vfio-pci] }\n",
            "pools[0].selectors[0].drivers",
            "deviceMode: vfio",
        ),
        (
            "pools:\n  - name: a\n    bindVfio: true\n    selectors: {}\n",
            "pools[0].bindVfio",
            "deviceMode: vfio",
        ),
        (
            "pools:\n  - name: a\n    selectors: []\n",
            "pools[0].selectors",
            "no selector",
        ),
        (
            "pools:\n  - name: a\n    additionalInfo: { foo: {a: b} }\n    selectors: {}\n",
            "pools[0].additionalInfo.foo",
            "PCI address",
        ),
        (
            "pools:\n  - name: a\n    selectors: { pciAddresses: ['3b:02.1', '0000:3b:02.1'] }\n",
            "pools[0].selectors[0].pciAddresses[1]",
            "duplicate",
        ),
    ];
    for (text, path, needle) in cases {
        let e = err(text);
        assert_eq!(e.kind, ConfigErrorKind::Invalid, "{text}: {e}");
        assert_eq!(&e.path, path, "{text}: {e}");
        assert!(
            e.message.contains(needle),
            "{text}: {e} should mention {needle}"
        );
    }
}

#[test]
fn vfio_pool_with_bind_vfio_may_select_kernel_drivers() {
    let cfg = Config::parse(
        "pools:\n  - name: a\n    deviceMode: vfio\n    bindVfio: true\n    selectors: { drivers: [iavf] }\n",
    )
    .unwrap();
    let p = &cfg.pools[0];
    assert!(p.matches(&vf("0000:3b:02.0", "0000:3b:00.0", None, 0, "iavf"), None));
    // After vfplugd bound it, it is still in the pool.
    assert!(p.matches(
        &vf("0000:3b:02.0", "0000:3b:00.0", None, 0, "vfio-pci"),
        None
    ));
    assert!(!p.matches(
        &vf("0000:3b:02.0", "0000:3b:00.0", None, 0, "ixgbevf"),
        None
    ));
}

#[test]
fn yaml_syntax_error_is_reported_as_syntax() {
    let e = err("pools: [\n");
    assert_eq!(e.kind, ConfigErrorKind::Syntax, "{e}");
}

#[test]
fn sriovdp_readme_golden() {
    // The README's example has a vdpaType pool (resourceList[3]) and an accelerator pool on a
    // kernel driver (resourceList[4]): both are refused at load, the first one named.
    let text = include_str!("golden/sriovdp-readme.json");
    let e = err(text);
    assert_eq!(e.path, "resourceList[3].selectors[0].vdpaType", "{e}");
    assert_eq!(e.kind, ConfigErrorKind::Invalid);
    // Without those two resources the rest is accepted, with the peer's meaning.
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    let list = v["resourceList"].as_array_mut().unwrap();
    let fpga = list.remove(4);
    list.remove(3);
    let cfg = Config::parse(&v.to_string()).unwrap();
    assert_eq!(cfg.format, ConfigFormat::SriovDp);
    assert_eq!(cfg.resource_prefix, "intel.com");
    let names: Vec<_> = cfg.pools.iter().map(|p| cfg.resource_name(p)).collect();
    assert_eq!(
        names,
        [
            "intel.com/intel_sriov_netdevice",
            "intel.com/intel_sriov_dpdk",
            "mellanox.com/mlnx_sriov_rdma",
            "intel.com/intel_sriov_netdevice_pf0",
        ]
    );
    let dpdk = cfg.pool("intel_sriov_dpdk").unwrap();
    assert_eq!(dpdk.device_mode, DeviceMode::Vfio);
    assert!(dpdk.need_vhost_net);
    assert_eq!(dpdk.selectors[0].pf_names.len(), 2);
    let net = cfg.pool("intel_sriov_netdevice").unwrap();
    assert_eq!(net.device_mode, DeviceMode::Netdev);
    assert_eq!(net.selectors[0].devices, ["154c", "10ed", "1889"]);
    let rdma = cfg.pool("mlnx_sriov_rdma").unwrap();
    assert!(rdma.rdma);
    let pf0 = cfg.pool("intel_sriov_netdevice_pf0").unwrap();
    assert_eq!(pf0.selectors.len(), 1, "a selectors object is one set");
    assert_eq!(
        pf0.selectors[0].root_devices[0].to_string(),
        "0000:86:00.0#0-1,3,4"
    );
    assert_eq!(pf0.additional_info["0000:86:02.0"]["token"], "specific");
    // No unknown keys in the README example.
    assert!(cfg.warnings.iter().all(|w| !w.unknown_key));
    // The accelerator pool alone: refused, naming deviceType.
    let e = err(&serde_json::json!({ "resourceList": [fpga] }).to_string());
    assert_eq!(e.path, "resourceList[0].deviceType", "{e}");
}

#[test]
fn sriovdp_operator_generated_keys_are_case_insensitive() {
    let cfg = Config::parse(include_str!("golden/sriovdp-operator.json")).unwrap();
    assert!(
        cfg.warnings.iter().all(|w| !w.unknown_key),
        "{:?}",
        cfg.warnings
    );
    let ib = cfg.pool("ib_vfs").unwrap();
    assert!(ib.rdma, "IsRdma inside selectors");
    assert!(!ib.need_vhost_net);
    assert_eq!(ib.selectors[0].link_types, [LinkType::Infiniband]);
    let eth = cfg.pool("eth_vfs").unwrap();
    assert_eq!(cfg.resource_name(eth), "nvidia.com/eth_vfs");
    assert_eq!(eth.selectors[0].vendors, ["15b3"]);
    assert!(!eth.rdma);
}

#[test]
fn sriovdp_rdma_and_vhost_at_resource_level() {
    let cfg = Config::parse(
        r#"{"resourceList":[{"resourceName":"a","isRdma":true,"needVhostNet":true,"selectors":{"vendors":["8086"]}}]}"#,
    )
    .unwrap();
    assert!(cfg.pools[0].rdma);
    assert!(cfg.pools[0].need_vhost_net);
}

#[test]
fn sriovdp_unknown_and_misplaced_keys_warn_and_strict_rejects() {
    let text = r#"{"resourceList":[{"resourceName":"a","rootDevices":["0000:3b:00.0"],"selectors":[{"vendors":["8086"],"colour":"blue"}]}],"extra":1}"#;
    let cfg = Config::parse(text).unwrap();
    let paths: Vec<_> = cfg.warnings.iter().map(|w| w.path.as_str()).collect();
    assert!(paths.contains(&"extra"), "{paths:?}");
    assert!(paths.contains(&"resourceList[0].rootDevices"), "{paths:?}");
    assert!(
        paths.contains(&"resourceList[0].selectors[0].colour"),
        "{paths:?}"
    );
    let misplaced = cfg
        .warnings
        .iter()
        .find(|w| w.path == "resourceList[0].rootDevices")
        .unwrap();
    assert!(
        misplaced.message.contains("inside \"selectors\""),
        "{misplaced}"
    );
    let e = Config::from_sriovdp_json_strict(text).unwrap_err();
    assert_eq!(e.kind, ConfigErrorKind::Schema);
    assert!(paths.contains(&e.path.as_str()));
}

#[test]
fn sriovdp_errors_name_paths() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"resourceList":[{"selectors":{}}]}"#,
            "resourceList[0].resourceName",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a"}]}"#,
            "resourceList[0].selectors",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a","selectors":[{"pciAddresses":["0000:zz:00.0"]}]}]}"#,
            "resourceList[0].selectors[0].pciAddresses[0]",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a","selectors":[{"pfNames":["p#3-1"]}]}]}"#,
            "resourceList[0].selectors[0].pfNames[0]",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a","selectors":{"vendors":"8086"}}]}"#,
            "resourceList[0].selectors.vendors",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a","deviceType":"gpu","selectors":{}}]}"#,
            "resourceList[0].deviceType",
        ),
        (
            r#"{"resourceList":[{"resourceName":"a","ResourceName":"b","selectors":{}}]}"#,
            "resourceList[0].resourceName",
        ),
        (r#"{"resourceList":{}}"#, "resourceList"),
    ];
    for (text, path) in cases {
        let e = err(text);
        assert_eq!(&e.path, path, "{text}: {e}");
    }
    // Semantic validation applies to SRIOV-DP configs too, with paths in their vocabulary.
    let e = err(r#"{"resourceList":[{"resourceName":"ok","selectors":{}},
                            {"resourceName":"a b","selectors":{}}]}"#);
    assert_eq!(e.kind, ConfigErrorKind::Invalid);
    assert_eq!(e.path, "resourceList[1].resourceName");
    let e = err(
        r#"{"resourceList":[{"resourceName":"a","selectors":{}},{"resourceName":"b","resourcePrefix":"Bad","selectors":[{},{"vendors":["x"]}]}]}"#,
    );
    assert_eq!(e.path, "resourceList[1].resourcePrefix");
    let e = err(
        r#"{"resourceList":[{"resourceName":"a","selectors":{}},{"resourceName":"b","selectors":[{},{"vendors":["x"]}]}]}"#,
    );
    assert_eq!(e.path, "resourceList[1].selectors[1].vendors[0]");
    let e = err(
        r#"{"resourceList":[{"resourceName":"a","selectors":{}},{"resourceName":"a","selectors":{}}]}"#,
    );
    assert_eq!(e.path, "resourceList[1].resourceName");
    assert!(e.message.contains("duplicate"), "{e}");
    // Broken JSON is reported as JSON.
    let e = err(r#"{"resourceList":[}"#);
    assert_eq!(e.kind, ConfigErrorKind::Syntax);
    assert!(e.message.contains("JSON"), "{e}");
}

#[test]
fn json_without_resource_list_is_native() {
    let cfg =
        Config::parse(r#"{"pools":[{"name":"a","selectors":{"vendors":["8086"]}}]}"#).unwrap();
    assert_eq!(cfg.format, ConfigFormat::Native);
}

#[test]
fn sriovdp_converts_to_native_yaml_and_back() {
    let cfg = Config::parse(include_str!("golden/sriovdp-operator.json")).unwrap();
    let yaml = serde_yaml::to_string(&cfg).unwrap();
    let back = Config::parse(&yaml).unwrap();
    assert_eq!(back.pools, cfg.pools, "{yaml}");
    assert_eq!(back.resource_prefix, "intel.com");
    assert!(
        back.pools.iter().any(|p| p.rdma),
        "rdma survives the round trip"
    );
}

#[test]
fn selectors_and_within_or_across() {
    let cfg = Config::parse(
        "pools:\n  - name: a\n    selectors:\n      vendors: ['0x8086', '15B3']\n      pfNames: ['ENS1#0-1,3']\n",
    )
    .unwrap();
    let p = &cfg.pools[0];
    let pf = "0000:3b:00.0";
    assert!(p.matches(&vf("0000:3b:02.0", pf, Some("ens1"), 0, "iavf"), None));
    assert!(p.matches(&vf("0000:3b:02.3", pf, Some("ens1"), 3, "iavf"), None));
    assert!(
        !p.matches(&vf("0000:3b:02.2", pf, Some("ens1"), 2, "iavf"), None),
        "index 2 not in 0-1,3"
    );
    assert!(
        !p.matches(&vf("0000:3b:02.0", pf, Some("ens2"), 0, "iavf"), None),
        "other PF"
    );
    assert!(
        !p.matches(&vf("0000:3b:02.0", pf, None, 0, "iavf"), None),
        "unknown PF name"
    );
    let mut other_vendor = vf("0000:3b:02.0", pf, Some("ens1"), 0, "iavf");
    other_vendor.vendor = "1af4".into();
    assert!(!p.matches(&other_vendor, None), "AND across selectors");
}

#[test]
fn membership_ignores_the_vf_netdev_and_uses_the_pf() {
    let cfg = Config::parse(
        "pools:\n  - name: ib\n    selectors: { linkTypes: [infiniband], pfNames: [ib0] }\n",
    )
    .unwrap();
    let p = &cfg.pools[0];
    let mut v = vf("0000:3b:02.0", "0000:3b:00.0", Some("ib0"), 0, "mlx5_core");
    v.link_type = LinkType::Infiniband;
    v.netdevs = vec!["ib0v0".into()];
    assert!(p.matches(&v, None));
    // The VF's netdev moved into a pod: still in the pool.
    v.netdevs.clear();
    assert!(p.matches(&v, None));
    // PF info wins over the copy on the VF (PF renamed).
    let pf = PfInfo {
        pci: v.pf,
        netdev: Some("ib1".into()),
        vendor: "15b3".into(),
        device: "101b".into(),
        driver: Some("mlx5_core".into()),
        total_vfs: 8,
        num_vfs: 8,
        numa_node: None,
        link_type: LinkType::Infiniband,
        carrier: Some(true),
    };
    assert!(!p.matches(&v, Some(&pf)));
}

#[test]
fn rdma_pool_takes_only_vfs_with_rdma_devices() {
    let cfg = Config::parse(
        r#"{"resourceList":[{"resourceName":"a","selectors":{"vendors":["8086"],"isRdma":true}}]}"#,
    )
    .unwrap();
    let mut v = vf("0000:3b:02.0", "0000:3b:00.0", None, 0, "mlx5_core");
    assert!(!cfg.pools[0].matches(&v, None));
    v.rdma_devices = vec!["mlx5_3".into()];
    assert!(cfg.pools[0].matches(&v, None));
}

#[test]
fn assign_pools_first_pool_wins() {
    let cfg = Config::parse(
        "pools:\n  - name: first\n    selectors: { rootDevices: ['0000:3b:00.0#0-1'] }\n  - name: all\n    selectors: { vendors: ['8086'] }\n  - name: none\n    selectors: { vendors: ['1af4'] }\n",
    )
    .unwrap();
    let mut inv = Inventory::default();
    for i in 0..4u8 {
        let v = vf(
            &format!("0000:3b:02.{i}"),
            "0000:3b:00.0",
            Some("ens1"),
            u32::from(i),
            "iavf",
        );
        inv.vfs.insert(v.pci, v);
    }
    let mut foreign = vf("0000:5e:02.0", "0000:5e:00.0", None, 0, "virtio");
    foreign.vendor = "1234".into();
    inv.vfs.insert(foreign.pci, foreign);
    let a = assign_pools(&cfg, &inv);
    assert_eq!(a["first"], [pci("0000:3b:02.0"), pci("0000:3b:02.1")]);
    assert_eq!(a["all"], [pci("0000:3b:02.2"), pci("0000:3b:02.3")]);
    assert!(a["none"].is_empty());
    let total: usize = a.values().map(Vec::len).sum();
    assert_eq!(total, 4, "each VF at most once, unmatched VFs nowhere");
}

#[test]
fn index_set_display_roundtrip() {
    for s in ["0", "0-3,5", "1,2,3", "7-7"] {
        let set: VfIndexSet = s.parse().unwrap();
        let again: VfIndexSet = set.to_string().parse().unwrap();
        assert_eq!(set, again);
    }
    for bad in ["", "a", "1-", "-1", "5-3", "1,,2", "1 ,2", "99999999999"] {
        assert!(bad.parse::<VfIndexSet>().is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Never panic, whatever the input (the stable-toolchain stand-in for fuzz/fuzz_targets/config.rs).

mod no_panic {
    use proptest::prelude::*;
    use serde_json::{Map, Value};
    use vfplug_core::Config;

    /// Keys that the parsers know, in various spellings, plus junk, so random documents get
    /// deep into the walkers instead of failing at the first key.
    const KEYS: &[&str] = &[
        "resourceList",
        "ResourceList",
        "resourceName",
        "resourcePrefix",
        "deviceType",
        "selectors",
        "Selectors",
        "vendors",
        "devices",
        "drivers",
        "pciAddresses",
        "pfNames",
        "rootDevices",
        "linkTypes",
        "isRdma",
        "IsRdma",
        "needVhostNet",
        "vdpaType",
        "ddpProfiles",
        "acpiIndexes",
        "additionalInfo",
        "SelectorObj",
        "excludeTopology",
        "pools",
        "name",
        "prefix",
        "deviceMode",
        "bindVfio",
        "policy",
        "health",
        "pfLinkDown",
        "numaNodes",
        "x",
        "",
    ];
    const WORDS: &[&str] = &[
        "8086",
        "154c",
        "vfio-pci",
        "iavf",
        "0000:3b:02.1",
        "3b:02.1",
        "ens1#0-3,5",
        "ens1#5-3",
        "0000:3b:00.0#0-7",
        "0000:3b:00.0#",
        "ether",
        "infiniband",
        "netDevice",
        "accelerator",
        "auxNetDevice",
        "netdev",
        "vfio",
        "pack",
        "spread",
        "numa",
        "unhealthy",
        "a",
        "intel.com",
        "kubernetes.io",
        "",
        "#",
        "-",
        "0x8086",
        "\u{0}",
        "é",
    ];

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            proptest::sample::select(WORDS).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..6).prop_map(
                    |kv| Value::Object(
                        kv.into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect::<Map<_, _>>()
                    )
                ),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_text(s in ".*") {
            let _ = Config::parse(&s);
        }

        #[test]
        fn arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Config::parse(&String::from_utf8_lossy(&b));
        }

        #[test]
        fn structured_json_and_yaml(v in value(), wrap in any::<bool>()) {
            // Often wrap in a resourceList so the SRIOV-DP walker is exercised.
            let v = if wrap { serde_json::json!({ "resourceList": [v] }) } else { v };
            let json = serde_json::to_string(&v).unwrap();
            if let Ok(cfg) = Config::parse(&json) {
                // Whatever parses must also validate, and every pool must have selectors.
                prop_assert!(cfg.validate().is_ok());
                prop_assert!(cfg.pools.iter().all(|p| !p.selectors.is_empty()));
            }
            let yaml = serde_yaml::to_string(&v).unwrap();
            let _ = Config::parse(&yaml);
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(Config::parse(&deep).is_err());
        let deep_json = format!("{{\"resourceList\":{}", "[".repeat(100_000));
        assert!(Config::parse(&deep_json).is_err());
    }
}

mod selection_properties {
    use proptest::prelude::*;
    use vfplug_core::*;

    const CFG: &str = "pools:
  - name: by_pf
    selectors: { pfNames: ['ens0#0-3', 'ENS2'] }
  - name: by_root
    selectors: { rootDevices: ['0000:11:00.0#2,4-6'], linkTypes: [ether] }
  - name: vfio
    deviceMode: vfio
    selectors: [{ drivers: [vfio-pci], numaNodes: [1] }, { pciAddresses: ['0000:12:01.3'] }]
  - name: intel
    selectors: { vendors: ['8086'], devices: ['154c', '1889'] }
";

    fn vf_strategy() -> impl Strategy<Value = VfInfo> {
        (
            0u8..3,
            0u32..8,
            prop_oneof![Just("8086"), Just("15b3")],
            prop_oneof![Just("154c"), Just("1889"), Just("1018")],
            proptest::option::of(prop_oneof![
                Just("iavf"),
                Just("vfio-pci"),
                Just("mlx5_core")
            ]),
            proptest::option::of(0u32..2),
            any::<bool>(),
        )
            .prop_map(|(pf, idx, vendor, device, driver, numa, ib)| {
                let pf_pci = PciAddress::new(0, 0x10 + pf, 0, 0).unwrap();
                VfInfo {
                    pci: PciAddress::new(0, 0x10 + pf, 1, idx as u8).unwrap(),
                    pf: pf_pci,
                    pf_netdev: Some(format!("ens{pf}")),
                    vf_index: idx,
                    vendor: vendor.into(),
                    device: device.into(),
                    driver: driver.map(str::to_owned),
                    iommu_group: None,
                    numa_node: numa,
                    netdevs: vec![format!("ens{pf}v{idx}")],
                    link_type: if ib {
                        LinkType::Infiniband
                    } else {
                        LinkType::Ether
                    },
                    rdma_devices: vec![],
                }
            })
    }

    proptest! {
        #[test]
        fn membership_does_not_depend_on_the_vf_netdev(vf in vf_strategy(), names in proptest::collection::vec("[a-z0-9]{1,8}", 0..3)) {
            let cfg = Config::parse(CFG).unwrap();
            let mut moved = vf.clone();
            moved.netdevs = names;
            for p in &cfg.pools {
                prop_assert_eq!(p.matches(&vf, None), p.matches(&moved, None), "pool {}", p.name);
            }
        }

        #[test]
        fn assign_pools_gives_each_vf_to_its_first_matching_pool(vfs in proptest::collection::vec(vf_strategy(), 0..30)) {
            let cfg = Config::parse(CFG).unwrap();
            let mut inv = Inventory::default();
            for v in vfs {
                inv.vfs.insert(v.pci, v);
            }
            let a = assign_pools(&cfg, &inv);
            prop_assert_eq!(a.len(), cfg.pools.len());
            let mut seen = std::collections::BTreeSet::new();
            for (pool, members) in &a {
                for pci in members {
                    prop_assert!(seen.insert(*pci), "{} in two pools", pci);
                    let vf = &inv.vfs[pci];
                    let first = cfg.pools.iter().find(|p| p.matches(vf, None)).map(|p| p.name.as_str());
                    prop_assert_eq!(first, Some(pool.as_str()));
                }
            }
            // Every VF that some pool selects is assigned.
            for vf in inv.vfs.values() {
                let selected = cfg.pools.iter().any(|p| p.matches(vf, None));
                prop_assert_eq!(selected, seen.contains(&vf.pci));
            }
        }
    }
}
