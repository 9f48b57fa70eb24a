//! sriov-network-device-plugin parity (issue 11), end to end in-process: a fake node (sysfs and
//! /dev trees), the peer's JSON config, and Allocate over real gRPC from the fake kubelet, for
//! each info provider (generic, vfio with a no-IOMMU group, vhost, rdma, extra), and CDI spec
//! files on the fake node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfplug_agent::{Agent, AgentOptions};
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

const T: Duration = Duration::from_secs(10);

/// ens1f0 (0000:3b:00.0): 2 vfio-pci VFs; ens1f1 (0000:5e:00.0, Mellanox): 3 mlx5_core VFs,
/// the first two with RDMA devices mlx5_2 / mlx5_3 (char devices 2 / 3).
fn build_node(root: &Path) -> SysfsBuilder {
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("ens1f0")
        .vfs(2, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    b.pf("0000:5e:00.0")
        .vendor("15b3")
        .device("1017")
        .vf_device("1018")
        .driver("mlx5_core")
        .netdev("ens1f1")
        .vfs(3, |i| {
            VfSpec::new()
                .driver("mlx5_core")
                .netdev(format!("ens1f1v{i}"))
        })
        .build()
        .unwrap();
    for i in 0..2u32 {
        let vf = b.vf_address("0000:5e:00.0", i).unwrap().to_string();
        b.add_rdma(&vf, &format!("mlx5_{}", i + 2), i + 2).unwrap();
    }
    let dev = root.join("dev");
    for d in ["vfio", "net", "infiniband"] {
        std::fs::create_dir_all(dev.join(d)).unwrap();
    }
    let mut nodes = vec!["vfio/vfio".to_owned(), "vhost-net".into(), "net/tun".into()];
    nodes.extend((0..64).map(|g| format!("vfio/{g}")));
    nodes.extend(
        ["issm", "umad", "uverbs"]
            .iter()
            .flat_map(|k| (2..4).map(move |n| format!("infiniband/{k}{n}"))),
    );
    nodes.push("infiniband/rdma_cm".into());
    for n in nodes {
        std::fs::write(dev.join(n), "").unwrap();
    }
    b
}

fn group_of(root: &Path, pci: &str) -> u32 {
    let link = std::fs::read_link(
        root.join("sys/bus/pci/devices")
            .join(pci)
            .join("iommu_group"),
    )
    .unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

const SRIOVDP_CONFIG: &str = r#"{"resourceList": [
  {"resourceName": "dpdk",
   "selectors": [{"pfNames": ["ens1f0"], "drivers": ["vfio-pci"], "needVhostNet": true}],
   "additionalInfo": {"*": {"token": "generic"}, "0000:3b:01.1": {"token": "specific"}}},
  {"resourceName": "rdma", "resourcePrefix": "nvidia.com",
   "selectors": [{"pfNames": ["ens1f1"], "IsRdma": true}]}
]}"#;

async fn start(opts: AgentOptions) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let agent = Agent::start(opts, cancel.clone())
        .await
        .expect("agent starts");
    let task = tokio::spawn(async move { agent.wait().await.expect("agent stops cleanly") });
    (cancel, task)
}

async fn healthy(k: &FakeKubelet, resource: &str, n: usize) -> Vec<String> {
    k.wait_snapshot(resource, None, T, |s| s.healthy_ids().len() == n)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{resource}: no snapshot with {n} healthy devices: {e}; got {:?}",
                k.snapshots(resource).last().map(|s| s.healthy_ids())
            )
        })
        .healthy_ids()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sriovdp_config_allocates_every_provider_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let node = build_node(root);
    let vf0 = node.vf_address("0000:3b:00.0", 0).unwrap().to_string();
    let vf1 = node.vf_address("0000:3b:00.0", 1).unwrap().to_string();
    assert_eq!(vf1, "0000:3b:01.1", "additionalInfo names this address");
    // VF0's group is a no-IOMMU group, with its /dev/vfio/noiommu-N node.
    let g0 = group_of(root, &vf0);
    let g1 = group_of(root, &vf1);
    node.set_noiommu(g0).unwrap();
    std::fs::write(root.join(format!("dev/vfio/noiommu-{g0}")), "").unwrap();

    let cfg = root.join("config.json");
    std::fs::write(&cfg, SRIOVDP_CONFIG).unwrap();
    let mut opts = AgentOptions::rooted(root, cfg);
    opts.resource_prefix = Some("example.com".into());
    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
    let (cancel, task) = start(opts).await;
    kubelet.wait_registrations(2, T).await.unwrap();

    // --resource-prefix replaced intel.com; the pool's own resourcePrefix still wins.
    healthy(&kubelet, "example.com/dpdk", 2).await;
    // isRdma: only the two VFs with RDMA devices are in the pool.
    let rdma_ids = healthy(&kubelet, "nvidia.com/rdma", 2).await;
    let mut sorted = rdma_ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["0000:5e:01.0", "0000:5e:01.1"]);

    // vfio (no-IOMMU and plain) + vhost + extra.
    let resp = kubelet
        .allocate("example.com/dpdk", vec![vec![vf0.clone(), vf1.clone()]])
        .await
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(c.envs["PCIDEVICE_EXAMPLE_COM_DPDK"], format!("{vf0},{vf1}"));
    assert_eq!(
        c.envs["PCIDEVICE_EXAMPLE_COM_DPDK_INFO"],
        format!(
            concat!(
                r#"{{"{a}":{{"extra":{{"token":"generic"}},"generic":{{"deviceID":"{a}"}},"vfio":{{"dev-mount":"/dev/vfio/{ga}","mount":"/dev/vfio/vfio"}},"vhost":{{"net-mount":"/dev/vhost-net","tun-mount":"/dev/net/tun"}}}},"#,
                r#""{b}":{{"extra":{{"token":"specific"}},"generic":{{"deviceID":"{b}"}},"vfio":{{"dev-mount":"/dev/vfio/{gb}","mount":"/dev/vfio/vfio"}},"vhost":{{"net-mount":"/dev/vhost-net","tun-mount":"/dev/net/tun"}}}}}}"#
            ),
            a = vf0,
            b = vf1,
            ga = g0,
            gb = g1
        )
    );
    let specs: Vec<(String, String, String)> = c
        .devices
        .iter()
        .map(|d| {
            (
                d.host_path.clone(),
                d.container_path.clone(),
                d.permissions.clone(),
            )
        })
        .collect();
    let rw = |h: &str, c: &str| (h.to_owned(), c.to_owned(), "rw".to_owned());
    assert_eq!(
        specs,
        [
            rw("/dev/vfio/vfio", "/dev/vfio/vfio"),
            rw(
                &format!("/dev/vfio/noiommu-{g0}"),
                &format!("/dev/vfio/{g0}")
            ),
            rw("/dev/vhost-net", "/dev/vhost-net"),
            rw("/dev/net/tun", "/dev/net/tun"),
            rw(&format!("/dev/vfio/{g1}"), &format!("/dev/vfio/{g1}")),
        ]
    );
    assert!(c.cdi_devices.is_empty());
    assert_eq!(
        std::fs::read_to_string(
            root.join("devinfo")
                .join(format!("example.com-dpdk-{vf0}-device.json"))
        )
        .unwrap(),
        format!(r#"{{"type":"pci","version":"1.1.0","pci":{{"pci-address":"{vf0}"}}}}"#)
    );

    // rdma.
    let resp = kubelet
        .allocate("nvidia.com/rdma", vec![vec!["0000:5e:01.1".into()]])
        .await
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(
        c.envs["PCIDEVICE_NVIDIA_COM_RDMA_INFO"],
        r#"{"0000:5e:01.1":{"generic":{"deviceID":"0000:5e:01.1"},"rdma":{"issm":"/dev/infiniband/issm3","rdma_cm":"/dev/infiniband/rdma_cm","rdma_dev":"mlx5_3","umad":"/dev/infiniband/umad3","uverbs":"/dev/infiniband/uverbs3"}}}"#
    );
    let hosts: Vec<&str> = c.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(
        hosts,
        [
            "/dev/infiniband/issm3",
            "/dev/infiniband/umad3",
            "/dev/infiniband/uverbs3",
            "/dev/infiniband/rdma_cm"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(
            root.join("devinfo")
                .join("nvidia.com-rdma-0000:5e:01.1-device.json")
        )
        .unwrap(),
        r#"{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:5e:01.1","rdma-device":"mlx5_3"}}"#
    );

    // Every node is checked under the dev root: without /dev/net/tun, Allocate says so.
    std::fs::remove_file(root.join("dev/net/tun")).unwrap();
    let err = kubelet
        .allocate("example.com/dpdk", vec![vec![vf1.clone()]])
        .await
        .unwrap_err();
    assert!(err.message().contains("/dev/net/tun"), "{err:?}");

    cancel.cancel();
    task.await.unwrap();
}

const YAML_CONFIG: &str = r#"
pools:
  - name: vm
    deviceMode: vfio
    selectors: { pfNames: ["ens1f0"] }
  - name: net
    selectors: { pfNames: ["ens1f1"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_cdi_writes_one_spec_per_pool_and_names_cdi_devices() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let node = build_node(root);
    let vf0 = node.vf_address("0000:3b:00.0", 0).unwrap().to_string();
    let vf1 = node.vf_address("0000:3b:00.0", 1).unwrap().to_string();
    let cfg = root.join("config.yaml");
    std::fs::write(&cfg, YAML_CONFIG).unwrap();
    let mut opts = AgentOptions::rooted(root, cfg.clone());
    opts.use_cdi = true;
    let cdi = opts.cdi_dir.clone();
    // A spec left by an earlier run is cleaned up; another vendor's file is not touched.
    std::fs::create_dir_all(&cdi).unwrap();
    std::fs::write(cdi.join("vfplug-vfplug.io-net-pci-gone.json"), "{}").unwrap();
    std::fs::write(cdi.join("sriov-dp-intel.com-net-pci-x.yaml"), "{}").unwrap();

    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
    let (cancel, task) = start(opts).await;
    kubelet.wait_registrations(2, T).await.unwrap();
    healthy(&kubelet, "vfplug.io/vm", 2).await;

    let spec_file = cdi.join("vfplug-vfplug.io-net-pci-vm.json");
    let files = || {
        let mut f: Vec<String> = std::fs::read_dir(&cdi)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        f.sort();
        f
    };
    // Only the vfio pool has device nodes, so only it has a spec.
    assert_eq!(
        files(),
        [
            "sriov-dp-intel.com-net-pci-x.yaml",
            "vfplug-vfplug.io-net-pci-vm.json"
        ]
    );
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_file).unwrap()).unwrap();
    assert_eq!(spec["kind"], "vfplug.io/net-pci");
    assert_eq!(spec["cdiVersion"], "0.5.0");
    let names: Vec<&str> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [vf0.as_str(), vf1.as_str()]);
    let g0 = group_of(root, &vf0);
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][1],
        serde_json::json!({"path": format!("/dev/vfio/{g0}"), "hostPath": format!("/dev/vfio/{g0}"), "permissions": "rw"})
    );

    // Allocate names the CDI devices instead of giving device specs; envs are unchanged.
    let resp = kubelet
        .allocate("vfplug.io/vm", vec![vec![vf1.clone()]])
        .await
        .unwrap();
    let c = &resp.container_responses[0];
    assert!(c.devices.is_empty(), "{:?}", c.devices);
    let cdi_names: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(cdi_names, [format!("vfplug.io/net-pci={vf1}")]);
    assert_eq!(c.envs["PCIDEVICE_VFPLUG_IO_VM"], vf1);
    let netdev = kubelet
        .allocate("vfplug.io/net", vec![vec!["0000:5e:01.0".into()]])
        .await
        .unwrap();
    assert!(netdev.container_responses[0].cdi_devices.is_empty());

    // The pool goes from the config: its spec goes too.
    std::fs::write(
        &cfg,
        "pools:\n  - name: net\n    selectors: { pfNames: [\"ens1f1\"] }\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    while spec_file.exists() {
        assert!(std::time::Instant::now() < deadline, "spec still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back again, then shutdown removes it.
    std::fs::write(&cfg, YAML_CONFIG).unwrap();
    while !spec_file.exists() {
        assert!(std::time::Instant::now() < deadline, "spec not rewritten");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(files(), ["sriov-dp-intel.com-net-pci-x.yaml"]);
}

/// Figures (printed, not asserted): at 8 PFs × 256 vfio VFs with `needVhostNet`, the time from
/// start to a CDI spec holding every VF, and Allocate of one VF over gRPC with and without
/// `--use-cdi` (debug build; the sysfs reads for each VF's nodes are on this path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_cdi_and_allocate_at_2048_vfs() {
    for use_cdi in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut b = SysfsBuilder::new(&root.join("sys"));
        for p in 0..8u32 {
            b.pf(&format!("0000:{:02x}:00.0", 0x10 + p * 8))
                .driver("i40e")
                .netdev(&format!("ens{p}"))
                .total_vfs(256)
                .vfs(256, |_| VfSpec::new().driver("vfio-pci"))
                .build()
                .unwrap();
        }
        std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        std::fs::create_dir_all(root.join("dev/net")).unwrap();
        for n in ["vfio/vfio", "vhost-net", "net/tun"] {
            std::fs::write(root.join("dev").join(n), "").unwrap();
        }
        for g in 0..2100 {
            std::fs::write(root.join(format!("dev/vfio/{g}")), "").unwrap();
        }
        let cfg = root.join("config.yaml");
        std::fs::write(
            &cfg,
            "pools:\n  - name: vm\n    deviceMode: vfio\n    needVhostNet: true\n    selectors: { drivers: [vfio-pci] }\n",
        )
        .unwrap();
        let mut opts = AgentOptions::rooted(root, cfg);
        opts.use_cdi = use_cdi;
        let spec = opts.cdi_dir.join("vfplug-vfplug.io-net-pci-vm.json");
        let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
        let t = std::time::Instant::now();
        let (cancel, task) = start(opts).await;
        let ids = healthy(&kubelet, "vfplug.io/vm", 2048).await;
        if use_cdi {
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
            assert_eq!(doc["devices"].as_array().unwrap().len(), 2048);
            eprintln!(
                "FIGURE start to a 2048-device snapshot and CDI spec ({} KiB): {:?}",
                std::fs::metadata(&spec).unwrap().len() / 1024,
                t.elapsed()
            );
        }
        let mut lat = Vec::new();
        for id in ids.iter().take(500) {
            let t = std::time::Instant::now();
            kubelet
                .allocate("vfplug.io/vm", vec![vec![id.clone()]])
                .await
                .unwrap();
            lat.push(t.elapsed());
        }
        lat.sort();
        eprintln!(
            "FIGURE Allocate 1 vfio+vhost VF over gRPC at 2048 VFs, use_cdi={use_cdi} (n=500): p50 {:?} p99 {:?}",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
        cancel.cancel();
        task.await.unwrap();
    }
}
