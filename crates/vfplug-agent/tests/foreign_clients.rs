//! The node API against a foreign gRPC client (Python's grpcio) over vfplugd's real socket,
//! with every `:authority` such clients send: the socket path, the path percent-encoded,
//! `localhost`, and grpcio's default. h2 alone resets the streams of the first two with
//! PROTOCOL_ERROR (issue 8, finding 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfplug_agent::{Agent, AgentOptions};
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::sim::{DriverProfile, SimNetdevOps, SimVfNetlink};
use vfplug_kubelet::foreign::{AUTHORITY_MODES, PythonGrpc, Service};
use vfplug_kubelet::testing::{FakeKubelet, FakePodResources};

const CONFIG: &str = r#"
resourcePrefix: vfplug.io
pools:
  - name: vm
    deviceMode: vfio
    selectors: { pfNames: ["ens1f1"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_reaches_the_node_api_with_any_authority() {
    let Some(py) = PythonGrpc::find("python_grpcio_reaches_the_node_api_with_any_authority") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf("0000:5e:00.0")
        .driver("i40e")
        .netdev("ens1f1")
        .vfs(2, |_| VfSpec::new().driver("vfio-pci"))
        .build()
        .unwrap();
    let vfs: Vec<String> = (0..2)
        .map(|i| b.vf_address("0000:5e:00.0", i).unwrap().to_string())
        .collect();
    std::fs::write(root.join("config.yaml"), CONFIG).unwrap();
    let _kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
    let _podres = FakePodResources::start(&root.join("kubelet")).unwrap();
    let mut o = AgentOptions::rooted(&root, root.join("config.yaml"));
    o.vf_netlink = Arc::new(SimVfNetlink::new(DriverProfile::default()));
    o.netdev_ops = Arc::new(SimNetdevOps::default());
    let cancel = CancellationToken::new();
    let agent = Agent::start(o, cancel.clone()).await.expect("agent starts");
    let task = tokio::spawn(async move { agent.wait().await.expect("clean stop") });
    let sock = root.join("vfplugd.sock");
    // The socket is served once Agent::start returns; give the listener task a moment.
    vfplug_api::connect(&sock, Duration::from_secs(5))
        .await
        .expect("node API up");

    let mut failures = Vec::new();
    for mode in AUTHORITY_MODES {
        match py.call(Service::Node, &sock, mode).await {
            Ok(v) => {
                let listed: Vec<String> = v["vfs"]
                    .as_array()
                    .expect("vfs array")
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_owned())
                    .collect();
                assert_eq!(listed, vfs, "{v}");
                assert!(v["status_reason"].is_string(), "{v}");
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "clients refused:\n{}",
        failures.join("\n")
    );

    cancel.cancel();
    task.await.unwrap();
}
