//! PodResources client and poller against the fake PodResources server.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfplug_kubelet::api::podresources as pr;
use vfplug_kubelet::podresources::{
    AllocatableDevices, DeviceAllocation, PodResourcesClient, socket_path, spawn_poller,
};
use vfplug_kubelet::testing::FakePodResources;

const RES: &str = "vfplug.io/pool0";
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_flattened_per_container_and_resource() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakePodResources::start(dir.path()).unwrap();
    let mut two_containers =
        FakePodResources::pod("ns1", "vm-a", "compute", RES, &["0000:10:00.1"]);
    two_containers.containers.push(pr::ContainerResources {
        name: "sidecar".into(),
        devices: vec![
            pr::ContainerDevices {
                resource_name: "other.io/gpu".into(),
                device_ids: vec!["gpu0".into()],
                topology: None,
            },
            // A resource entry with no ids is not an allocation.
            pr::ContainerDevices {
                resource_name: RES.into(),
                device_ids: vec![],
                topology: None,
            },
        ],
        ..Default::default()
    });
    fake.set_pods(vec![
        FakePodResources::pod(
            "ns2",
            "pod-b",
            "app",
            RES,
            &["0000:10:00.2", "0000:10:00.3"],
        ),
        two_containers,
    ]);
    fake.set_allocatable(vec![pr::ContainerDevices {
        resource_name: RES.into(),
        device_ids: vec!["0000:10:00.1".into(), "0000:10:00.2".into()],
        topology: None,
    }]);

    let mut client = PodResourcesClient::connect(&socket_path(dir.path()))
        .await
        .unwrap();
    let list = client.list().await.unwrap();
    assert_eq!(
        list,
        vec![
            DeviceAllocation {
                namespace: "ns1".into(),
                pod: "vm-a".into(),
                container: "compute".into(),
                resource_name: RES.into(),
                device_ids: vec!["0000:10:00.1".into()],
            },
            DeviceAllocation {
                namespace: "ns1".into(),
                pod: "vm-a".into(),
                container: "sidecar".into(),
                resource_name: "other.io/gpu".into(),
                device_ids: vec!["gpu0".into()],
            },
            DeviceAllocation {
                namespace: "ns2".into(),
                pod: "pod-b".into(),
                container: "app".into(),
                resource_name: RES.into(),
                device_ids: vec!["0000:10:00.2".into(), "0000:10:00.3".into()],
            },
        ]
    );
    assert_eq!(
        client.allocatable().await.unwrap(),
        vec![AllocatableDevices {
            resource_name: RES.into(),
            device_ids: vec!["0000:10:00.1".into(), "0000:10:00.2".into()],
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poller_survives_missing_socket_and_kubelet_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let poller = spawn_poller(
        socket_path(dir.path()),
        Duration::from_millis(20),
        cancel.clone(),
    );
    let mut state = poller.state();

    // No kubelet yet: failures are counted, nothing is published as data.
    tokio::time::timeout(WAIT, state.wait_for(|s| s.polls_failed >= 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.borrow().allocations, None);

    let fake = FakePodResources::start(dir.path()).unwrap();
    fake.set_pods(vec![FakePodResources::pod(
        "ns",
        "p",
        "c",
        RES,
        &["0000:10:00.1"],
    )]);
    let got = tokio::time::timeout(WAIT, state.wait_for(|s| s.allocations.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(got.allocations.unwrap()[0].device_ids, ["0000:10:00.1"]);

    // The pod goes away: the next poll publishes the empty list.
    fake.set_pods(vec![]);
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| s.allocations.as_ref().is_some_and(Vec::is_empty)),
    )
    .await
    .unwrap()
    .unwrap();

    // Kubelet restart: the socket disappears and comes back; the poller re-dials.
    fake.stop();
    drop(fake);
    let failed = state.borrow().polls_failed;
    tokio::time::timeout(WAIT, state.wait_for(|s| s.polls_failed > failed))
        .await
        .unwrap()
        .unwrap();
    let fake = FakePodResources::start(dir.path()).unwrap();
    fake.set_pods(vec![FakePodResources::pod(
        "ns",
        "q",
        "c",
        RES,
        &["0000:10:00.4"],
    )]);
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| {
            s.allocations
                .as_ref()
                .is_some_and(|a| a.len() == 1 && a[0].pod == "q")
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(fake.list_calls() >= 1);

    cancel.cancel();
    tokio::time::timeout(WAIT, poller.join()).await.unwrap();
}
