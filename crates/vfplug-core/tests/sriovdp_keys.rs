//! Every key of sriov-network-device-plugin v3.11.0's config file, one row each: either vfplug
//! gives it the peer's meaning (checked here on the parsed pool), or refuses the config at load
//! with an error that names the key (issue 11).
//!
//! Where each key is documented: the peer's README.md at tag v3.11.0, "Config parameters"
//! (lines 283-290), "Accelerator devices selectors" (313-322), "Network devices selectors"
//! (325-343), "Auxiliary network devices selectors" (346-360), "AdditionalInfo field" (363-414);
//! the Go types are pkg/types/types.go (ResourceConfig, NetDeviceSelectors, ...).

#![allow(clippy::unwrap_used)]

use vfplug_core::*;

/// What vfplug does with a row's config.
enum Want {
    /// Accepted; the check sees the one pool it makes.
    Effect(fn(&Config, &PoolConfig)),
    /// Refused; the error's path.
    Refused(&'static str),
}

/// (key, where the peer documents it, resource JSON, what vfplug does)
fn rows() -> Vec<(&'static str, &'static str, &'static str, Want)> {
    use Want::*;
    vec![
        (
            "resourceName",
            "README Config parameters, line 285",
            r#"{"resourceName":"sriov_net_A","selectors":[{"vendors":["8086"]}]}"#,
            Effect(|c, p| assert_eq!(c.resource_name(p), "intel.com/sriov_net_A")),
        ),
        (
            "resourcePrefix",
            "README Config parameters, line 286",
            r#"{"resourceName":"a","resourcePrefix":"yourcompany.com","selectors":[{}]}"#,
            Effect(|c, p| assert_eq!(c.resource_name(p), "yourcompany.com/a")),
        ),
        (
            "deviceType netDevice",
            "README Config parameters, line 287",
            r#"{"resourceName":"a","deviceType":"netDevice","selectors":[{"drivers":["iavf"]}]}"#,
            Effect(|_, p| assert_eq!(p.device_mode, DeviceMode::Netdev)),
        ),
        (
            "deviceType accelerator (vfio-pci)",
            "README Config parameters, line 287; Accelerator devices selectors",
            r#"{"resourceName":"a","deviceType":"accelerator","selectors":[{"drivers":["vfio-pci"]}]}"#,
            Effect(|_, p| assert_eq!(p.device_mode, DeviceMode::Vfio)),
        ),
        (
            "deviceType accelerator (kernel driver)",
            "README Config parameters, line 287",
            r#"{"resourceName":"a","deviceType":"accelerator","selectors":[{"vendors":["8086"]}]}"#,
            Refused("resourceList[0].deviceType"),
        ),
        (
            "deviceType auxNetDevice",
            "README Config parameters, line 287; Auxiliary network devices selectors",
            r#"{"resourceName":"a","deviceType":"auxNetDevice","selectors":[{"vendors":["15b3"]}]}"#,
            Refused("resourceList[0].deviceType"),
        ),
        (
            "excludeTopology",
            "README Config parameters, line 288",
            r#"{"resourceName":"a","excludeTopology":true,"selectors":[{}]}"#,
            Effect(|_, p| assert!(p.exclude_topology)),
        ),
        (
            "selectors (object)",
            "README Device selectors, line 297",
            r#"{"resourceName":"a","selectors":{"vendors":["8086"]}}"#,
            Effect(|_, p| assert_eq!(p.selectors.len(), 1)),
        ),
        (
            "selectors (list)",
            "README Device selectors, line 301",
            r#"{"resourceName":"a","selectors":[{"vendors":["8086"]},{"vendors":["15b3"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors.len(), 2)),
        ),
        (
            "additionalInfo",
            "README AdditionalInfo field, line 363",
            r#"{"resourceName":"a","selectors":[{}],"additionalInfo":{"*":{"token":"t"},"0000:86:00.0":{"token":"s"}}}"#,
            Effect(|_, p| {
                assert_eq!(p.additional_info["*"]["token"], "t");
                assert_eq!(p.additional_info["0000:86:00.0"]["token"], "s");
            }),
        ),
        (
            "vendors",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"vendors":["8086","15b3"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors[0].vendors, ["8086", "15b3"])),
        ),
        (
            "devices",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"devices":["154c"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors[0].devices, ["154c"])),
        ),
        (
            "drivers",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"drivers":["vfio-pci"]}]}"#,
            Effect(|_, p| {
                assert_eq!(p.selectors[0].drivers, ["vfio-pci"]);
                assert_eq!(p.device_mode, DeviceMode::Vfio);
            }),
        ),
        (
            "drivers (igb_uio)",
            "README Features line 52 (UIO drivers); pkg/factory GetDefaultInfoProvider",
            r#"{"resourceName":"a","selectors":[{"drivers":["igb_uio"]}]}"#,
            Refused("resourceList[0].selectors[0].drivers[0]"),
        ),
        (
            "pciAddresses",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"pciAddresses":["0000:03:02.0"]}]}"#,
            Effect(|_, p| {
                assert_eq!(
                    p.selectors[0].pci_addresses,
                    ["0000:03:02.0".parse::<PciAddress>().unwrap()]
                )
            }),
        ),
        (
            "acpiIndexes",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"acpiIndexes":["101"]}]}"#,
            Refused("resourceList[0].selectors[0].acpiIndexes"),
        ),
        (
            "pfNames",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"pfNames":["enp2s2f0#0-3"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors[0].pf_names[0].to_string(), "enp2s2f0#0-3")),
        ),
        (
            "rootDevices",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"rootDevices":["0000:86:00.0"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors[0].root_devices[0].to_string(), "0000:86:00.0")),
        ),
        (
            "linkTypes",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"linkTypes":["ether"]}]}"#,
            Effect(|_, p| assert_eq!(p.selectors[0].link_types, [LinkType::Ether])),
        ),
        (
            "ddpProfiles",
            "README Network devices selectors",
            r#"{"resourceName":"a","selectors":[{"ddpProfiles":["GTPv1-C/U IPv4/IPv6 payload"]}]}"#,
            Refused("resourceList[0].selectors[0].ddpProfiles"),
        ),
        (
            "pKeys",
            "README Network devices selectors, line 340",
            r#"{"resourceName":"a","selectors":[{"linkTypes":["infiniband"],"pKeys":["0x1"]}]}"#,
            Refused("resourceList[0].selectors[0].pKeys"),
        ),
        (
            "isRdma",
            "README Network devices selectors, line 341",
            r#"{"resourceName":"a","selectors":[{"isRdma":true}]}"#,
            Effect(|_, p| assert!(p.rdma)),
        ),
        (
            "IsRdma (Go's case-insensitive key, operator-generated)",
            "pkg/types/types.go GenericNetDeviceSelectors.IsRdma has no json tag",
            r#"{"resourceName":"a","selectors":[{"IsRdma":true}]}"#,
            Effect(|_, p| assert!(p.rdma)),
        ),
        (
            "needVhostNet",
            "README Network devices selectors, line 342",
            r#"{"resourceName":"a","selectors":[{"needVhostNet":true}]}"#,
            Effect(|_, p| assert!(p.need_vhost_net)),
        ),
        (
            "needVhostNet differing between selector sets",
            "README Device selectors, line 301 (per-object needVhostNet)",
            r#"{"resourceName":"a","selectors":[{"vendors":["8086"]},{"vendors":["8086"],"needVhostNet":true}]}"#,
            Refused("resourceList[0].selectors[1].needVhostNet"),
        ),
        (
            "vdpaType",
            "README Network devices selectors, line 343",
            r#"{"resourceName":"a","selectors":[{"vdpaType":"vhost"}]}"#,
            Refused("resourceList[0].selectors[0].vdpaType"),
        ),
        (
            "auxTypes",
            "README Auxiliary network devices selectors",
            r#"{"resourceName":"a","selectors":[{"auxTypes":["sf"]}]}"#,
            Refused("resourceList[0].selectors[0].auxTypes"),
        ),
        (
            "SelectorObj (operator-generated, internal Go field)",
            "pkg/types/types.go ResourceConfig.SelectorObjs",
            r#"{"resourceName":"a","selectors":[{}],"SelectorObj":null}"#,
            Effect(|c, _| assert!(c.warnings.is_empty(), "{:?}", c.warnings)),
        ),
    ]
}

#[test]
fn every_peer_key_has_its_effect_or_is_refused_by_name() {
    for (key, doc, resource, want) in rows() {
        let text = format!(r#"{{"resourceList":[{resource}]}}"#);
        match (Config::parse(&text), want) {
            (Ok(cfg), Want::Effect(check)) => {
                assert_eq!(cfg.pools.len(), 1, "{key} ({doc})");
                check(&cfg, &cfg.pools[0]);
            }
            (Err(e), Want::Refused(path)) => {
                assert_eq!(e.path, path, "{key} ({doc}): {e}");
                assert!(e.message.len() > 20, "{key}: the error says why: {e}");
            }
            (Ok(cfg), Want::Refused(path)) => {
                panic!("{key} ({doc}): accepted, expected refusal at {path}: {cfg:#?}")
            }
            (Err(e), Want::Effect(_)) => panic!("{key} ({doc}): refused: {e}"),
        }
    }
}

#[test]
fn empty_refused_selectors_are_no_constraint_like_the_peer() {
    // An empty list (or empty vdpaType) is "no filter" in SRIOV-DP; it must not be refused.
    let cfg = Config::parse(
        r#"{"resourceList":[{"resourceName":"a","selectors":[{"vendors":["8086"],"ddpProfiles":[],"pKeys":[],"acpiIndexes":[],"auxTypes":[],"vdpaType":""}]}]}"#,
    )
    .unwrap();
    assert_eq!(cfg.pools[0].selectors[0].vendors, ["8086"]);
}

#[test]
fn resource_prefix_flag_replaces_the_default_only() {
    // `--resource-prefix` (README Command line arguments, line 437): the default for resources
    // that name none; a resource's own resourcePrefix still wins.
    let text = r#"{"resourceList":[{"resourceName":"a","selectors":[{}]},{"resourceName":"b","resourcePrefix":"own.io","selectors":[{}]}]}"#;
    let cfg = Config::parse_with_prefix(text, Some("example.com")).unwrap();
    assert_eq!(cfg.resource_name(&cfg.pools[0]), "example.com/a");
    assert_eq!(cfg.resource_name(&cfg.pools[1]), "own.io/b");
    // Native YAML: the flag is the default when the file names no resourcePrefix.
    let yaml = "pools:\n  - name: a\n    selectors: { vendors: ['8086'] }\n";
    let cfg = Config::parse_with_prefix(yaml, Some("example.com")).unwrap();
    assert_eq!(cfg.resource_name(&cfg.pools[0]), "example.com/a");
    let cfg = Config::parse_with_prefix(&format!("resourcePrefix: file.io\n{yaml}"), Some("x.io"))
        .unwrap();
    assert_eq!(cfg.resource_name(&cfg.pools[0]), "file.io/a");
    // A bad flag value is refused like a bad file value.
    assert!(Config::parse_with_prefix(text, Some("Bad_Prefix")).is_err());
}
