//! The device-plugin server against a foreign gRPC client (Python's grpcio) over its real unix
//! socket, with every `:authority` such clients send: the socket path (kubelets before 1.26,
//! grpcio, grpc-java), the path percent-encoded, `localhost`, and grpcio's default. h2 alone
//! resets the streams of the first two with PROTOCOL_ERROR (issue 8, finding 1).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfplug_kubelet::foreign::{AUTHORITY_MODES, PythonGrpc, Service};
use vfplug_kubelet::plugin::{PluginConfig, RegistrationMode, spawn_plugin};
use vfplug_kubelet::testing::{FakeKubelet, TestBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_reaches_the_device_plugin_with_any_authority() {
    let Some(py) = PythonGrpc::find("python_grpcio_reaches_the_device_plugin_with_any_authority")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let backend = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(3),
    ));
    let mut config = PluginConfig::new("pool0", dir.path());
    config.mode = RegistrationMode::Legacy;
    let cancel = CancellationToken::new();
    let h = spawn_plugin(config, backend.clone(), cancel.clone());
    let mut reg = h.registered();
    tokio::time::timeout(Duration::from_secs(10), reg.wait_for(|r| *r))
        .await
        .expect("registered in time")
        .expect("plugin task alive");
    let sock = dir.path().join("device-plugins/vfplug-pool0.sock");

    let mut failures = Vec::new();
    for mode in AUTHORITY_MODES {
        match py.call(Service::DevicePlugin, &sock, mode).await {
            Ok(v) => {
                assert_eq!(
                    v["options"]["get_preferred_allocation_available"], true,
                    "{v}"
                );
                assert_eq!(
                    v["devices"],
                    serde_json::json!(["0000:10:00.0", "0000:10:00.1", "0000:10:00.2"]),
                    "{v}"
                );
                assert_eq!(v["preferred"], serde_json::json!(["0000:10:00.0"]), "{v}");
                assert_eq!(
                    v["allocate_envs"]["PCIDEVICE_VFPLUG_IO_POOL0"], "0000:10:00.0",
                    "{v}"
                );
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "clients refused:\n{}",
        failures.join("\n")
    );
    // One Allocate per client reached the backend.
    assert_eq!(backend.allocations().len(), AUTHORITY_MODES.len());

    cancel.cancel();
    h.join().await;
}
