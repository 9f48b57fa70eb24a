//! The client against the scripted QMP server over real unix sockets.
//!
//! Timeouts here are upper bounds on waits, never measured: each test's outcome depends only on
//! the order of messages, except the "no event" cases, which must wait out their (short) timeout.

use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use vfplug_qmp::testing::Script;
use vfplug_qmp::{
    DelOutcome, DeviceAdd, Event, Qmp, QmpError, QmpOptions, RunState, UnplugOutcome,
};

const LONG: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(150);

fn deleted(id: &str) -> serde_json::Value {
    json!({"device": id, "path": format!("/machine/peripheral/{id}")})
}

#[tokio::test]
async fn negotiates_and_exposes_greeting() {
    let (qmp, server) = Script::new().version(7, 2, 22).connect().await.unwrap();
    assert_eq!(qmp.greeting().version.qemu.major, 7);
    assert_eq!(qmp.greeting().version.qemu.minor, 2);
    assert_eq!(qmp.greeting().capabilities, vec!["oob".to_string()]);
    drop(qmp);
    // The server checked that qmp_capabilities came first, and sees the close.
    assert!(server.await.unwrap().unwrap().is_empty());
}

#[tokio::test]
async fn device_add_vfio_sends_typed_arguments() {
    let (qmp, server) = Script::new()
        .expect_args(
            "device_add",
            json!({"driver": "vfio-pci", "host": "0000:01:10.0", "id": "hostdev0",
                   "bus": "rp1", "addr": "0x0"}),
        )
        .ok()
        .connect()
        .await
        .unwrap();
    qmp.device_add(&DeviceAdd::vfio_pci(
        "0000:01:10.0",
        "hostdev0",
        "rp1",
        Some("0x0"),
    ))
    .await
    .unwrap();
    drop(qmp);
    let seen = server.await.unwrap().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].id.as_ref().is_some_and(|id| id.is_u64()));
}

#[tokio::test]
async fn device_add_failures_are_classified_from_real_qemu_text() {
    let cases = [
        "vfio /sys/bus/pci/devices/0000:99:00.0: no such host device: No such file or directory",
        "vfio 0000:00:00.0: no iommu_group found: No such file or directory",
        "vfio 0000:01:10.2: Could not open '/dev/vfio/9': No such file or directory",
        "vfio 0000:01:10.0: device is already attached",
        "Duplicate device ID 'hostdev0' for device",
    ];
    let mut script = Script::new();
    for desc in cases {
        script = script.expect("device_add").error("GenericError", desc);
    }
    let (qmp, server) = script.connect().await.unwrap();
    let mut got = Vec::new();
    for _ in cases {
        let dev = DeviceAdd::vfio_pci("0000:01:10.0", "hostdev0", "rp1", None);
        got.push(qmp.device_add(&dev).await.unwrap_err());
    }
    assert!(
        matches!(got[0], QmpError::HostDeviceMissing { .. }),
        "{:?}",
        got[0]
    );
    assert!(
        matches!(got[1], QmpError::NoIommuGroup { .. }),
        "{:?}",
        got[1]
    );
    assert!(
        matches!(got[2], QmpError::VfioGroupOpen { .. }),
        "{:?}",
        got[2]
    );
    assert!(
        matches!(got[3], QmpError::AlreadyAttached { .. }),
        "{:?}",
        got[3]
    );
    assert!(
        matches!(got[4], QmpError::DuplicateId { .. }),
        "{:?}",
        got[4]
    );
    for (err, desc) in got.iter().zip(cases) {
        assert_eq!(err.qmp_desc(), Some(desc));
    }
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unplug_event_after_reply_is_deleted() {
    let (qmp, server) = Script::new()
        .expect_args("device_del", json!({"id": "hostdev0"}))
        .ok()
        .event("DEVICE_DELETED", deleted("hostdev0"))
        .connect()
        .await
        .unwrap();
    let out = qmp.device_del_and_wait("hostdev0", LONG).await.unwrap();
    assert_eq!(out, UnplugOutcome::Deleted);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unplug_event_before_reply_is_not_lost() {
    // QEMU's fast unplug (slot powered off) emits DEVICE_DELETED before the device_del return.
    let (qmp, server) = Script::new()
        .expect("device_del")
        .event("DEVICE_DELETED", deleted("hostdev0"))
        .ok()
        .connect()
        .await
        .unwrap();
    let out = qmp.device_del_and_wait("hostdev0", LONG).await.unwrap();
    assert_eq!(out, UnplugOutcome::Deleted);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unplug_matched_by_peripheral_path_but_not_child_or_other_device() {
    let (qmp, server) = Script::new()
        .expect("device_del")
        .ok()
        // Child object of the device, another device, then the device itself by path only.
        .event(
            "DEVICE_DELETED",
            json!({"path": "/machine/peripheral/n1/virtio-backend"}),
        )
        .event("DEVICE_DELETED", deleted("n2"))
        .event("DEVICE_DELETED", json!({"path": "/machine/peripheral/n1"}))
        .expect("device_del")
        .ok()
        .event(
            "DEVICE_DELETED",
            json!({"path": "/machine/peripheral/n3/virtio-backend"}),
        )
        .connect()
        .await
        .unwrap();
    assert_eq!(
        qmp.device_del_and_wait("n1", LONG).await.unwrap(),
        UnplugOutcome::Deleted
    );
    // Only a child of n3 went away: n3 itself is still pending.
    assert_eq!(
        qmp.device_del_and_wait("n3", SHORT).await.unwrap(),
        UnplugOutcome::Pending
    );
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn no_event_ever_is_pending_and_connection_stays_usable() {
    let (qmp, server) = Script::new()
        .expect("device_del")
        .ok()
        .expect("query-status")
        .ret(json!({"running": false, "status": "prelaunch"}))
        .connect()
        .await
        .unwrap();
    assert_eq!(
        qmp.device_del_and_wait("hostdev0", SHORT).await.unwrap(),
        UnplugOutcome::Pending
    );
    let st = qmp.query_status().await.unwrap();
    assert_eq!(st.status, RunState::Prelaunch);
    assert!(!st.running);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn guest_error_event_is_reported() {
    let (qmp, server) = Script::new()
        .expect("device_del")
        .ok()
        .event(
            "DEVICE_UNPLUG_GUEST_ERROR",
            json!({"device": "hostdev0", "path": "/machine/peripheral/hostdev0"}),
        )
        .connect()
        .await
        .unwrap();
    assert_eq!(
        qmp.device_del_and_wait("hostdev0", LONG).await.unwrap(),
        UnplugOutcome::GuestError
    );
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn already_pending_is_not_a_failure() {
    let desc = "Device hostdev0 is already in the process of unplug";
    let (qmp, server) = Script::new()
        .expect("device_del")
        .error("GenericError", desc)
        .expect("device_del")
        .event("MARKER", json!({}))
        .error("GenericError", desc)
        .expect("system_reset")
        .event(
            "RESET",
            json!({"guest": false, "reason": "host-qmp-system-reset"}),
        )
        .event("DEVICE_DELETED", deleted("hostdev0"))
        .ok()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        qmp.device_del("hostdev0").await.unwrap(),
        DelOutcome::AlreadyPending
    );
    // The waiter outlives the command: a reset completes the pending unplug.
    let marker = qmp.event_waiter(|e| e.name() == "MARKER");
    let q = qmp.clone();
    let waiting = tokio::spawn(async move { q.device_del_and_wait("hostdev0", LONG).await });
    // The server says when it has read the second device_del, so system_reset goes out after it.
    assert!(marker.wait(LONG).await.unwrap().is_some());
    qmp.system_reset().await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), UnplugOutcome::Deleted);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn device_not_found_is_an_error() {
    let (qmp, server) = Script::new()
        .expect("device_del")
        .error("DeviceNotFound", "Device 'ghost' not found")
        .expect("device_del")
        .error("DeviceNotFound", "Device 'ghost' not found")
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        qmp.device_del("ghost").await,
        Err(QmpError::DeviceNotFound { .. })
    ));
    assert!(matches!(
        qmp.device_del_and_wait("ghost", LONG).await,
        Err(QmpError::DeviceNotFound { .. })
    ));
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn disconnect_mid_command_fails_call_waiters_and_subscribers() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        .disconnect()
        .connect()
        .await
        .unwrap();
    let mut events = qmp.events();
    let waiter = qmp.event_waiter(|e| e.is_device_deleted("hostdev0"));
    let err = qmp.query_status().await.unwrap_err();
    match &err {
        QmpError::Disconnected { reason } => assert!(reason.contains("EOF"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(err.is_connection_error());
    assert!(matches!(
        waiter.wait(LONG).await,
        Err(QmpError::Disconnected { .. })
    ));
    assert!(matches!(events.recv().await, Err(RecvError::Closed)));
    assert!(qmp.is_closed());
    // Later calls fail at once, not after the timeout.
    assert!(matches!(
        qmp.query_version().await,
        Err(QmpError::Disconnected { .. })
    ));
    assert!(matches!(
        qmp.wait_event(|_| true, LONG).await,
        Err(QmpError::Disconnected { .. })
    ));
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn garbage_lines_are_reported_and_skipped() {
    let (qmp, server) = Script::new()
        .expect("query-version")
        .raw(&b"this is not json\r\n"[..])
        .raw(&b"[1, 2, 3]\r\n"[..])
        .raw(&b"{\"neither\": \"return nor event\"}\r\n"[..])
        .raw(&b"\r\n"[..])
        .ret(json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}))
        .connect()
        .await
        .unwrap();
    let v = qmp.query_version().await.unwrap();
    assert_eq!(v.qemu.major, 10);
    assert_eq!(qmp.protocol_errors(), 3);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn over_long_line_is_skipped_without_desync() {
    let mut long = vec![b'x'; 3 * 4096];
    long.extend_from_slice(b"\r\n");
    let (client, server) = Script::new()
        .expect("query-status")
        .raw(long)
        .ret(json!({"running": true, "status": "running"}))
        .pair()
        .unwrap();
    let opts = QmpOptions {
        max_line: 4096,
        ..QmpOptions::default()
    };
    let qmp = Qmp::from_stream_with(client, opts).await.unwrap();
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Running);
    assert_eq!(qmp.protocol_errors(), 1);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn default_bound_is_one_mib_and_large_valid_replies_pass() {
    // 2 MiB of garbage is dropped; a 600 KiB valid qom-list reply gets through.
    let mut huge = vec![b'{'; 2 << 20];
    huge.extend_from_slice(b"\n");
    let entries: Vec<_> = (0..12_000)
        .map(|i| json!({"name": format!("dev{i:05}"), "type": "child<vfio-pci>"}))
        .collect();
    let (qmp, server) = Script::new()
        .expect("qom-list")
        .raw(huge)
        .ret(serde_json::Value::Array(entries))
        .connect()
        .await
        .unwrap();
    let ids = qmp.peripheral_ids().await.unwrap();
    assert_eq!(ids.len(), 12_000);
    assert_eq!(ids[11_999], "dev11999");
    assert_eq!(qmp.protocol_errors(), 1);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn late_reply_after_timeout_is_dropped_and_next_call_works() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        // Do not answer until the client has given up and sent its next command.
        .expect("query-version")
        .ret_to(0, json!({"running": true, "status": "running"}))
        .ret_to(
            1,
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}),
        )
        .connect()
        .await
        .unwrap();
    let err = qmp
        .call_timeout(
            &vfplug_qmp::commands::QueryStatus {},
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { ref command, .. } if command == "query-status"));
    // The late query-status reply arrives first; it must not be taken for this one.
    let v = qmp.query_version().await.unwrap();
    assert_eq!(v.qemu.micro, 2);
    assert_eq!(qmp.protocol_errors(), 0);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn concurrent_calls_are_routed_by_id() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        .event("MARKER", json!({}))
        .expect("query-version")
        // Answer in reverse order.
        .ret_to(
            1,
            json!({"qemu": {"major": 9, "minor": 1, "micro": 0}, "package": ""}),
        )
        .ret_to(0, json!({"running": false, "status": "paused"}))
        .connect()
        .await
        .unwrap();
    let marker = qmp.event_waiter(|e| e.name() == "MARKER");
    let q2 = qmp.clone();
    let status = tokio::spawn(async move { q2.query_status().await });
    // The server signals that query-status arrived, so query-version goes out second.
    assert!(marker.wait(LONG).await.unwrap().is_some());
    let version = qmp.query_version().await.unwrap();
    assert_eq!(version.qemu.major, 9);
    assert_eq!(status.await.unwrap().unwrap().status, RunState::Paused);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn events_are_typed_and_broadcast_in_order() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        .event("RESET", json!({"guest": true, "reason": "guest-reset"}))
        .event("STOP", json!({}))
        .event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        )
        .ret(json!({"running": false, "status": "shutdown"}))
        .connect()
        .await
        .unwrap();
    let mut rx = qmp.events();
    qmp.query_status().await.unwrap();
    assert_eq!(
        rx.recv().await.unwrap(),
        Event::Reset {
            guest: true,
            reason: "guest-reset".into()
        }
    );
    assert_eq!(
        rx.recv().await.unwrap(),
        Event::Other {
            name: "STOP".into(),
            data: Some(json!({}))
        }
    );
    assert_eq!(
        rx.recv().await.unwrap(),
        Event::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn queries_are_typed() {
    let (qmp, server) = Script::new()
        .expect_args("qom-list", json!({"path": "/machine/peripheral"}))
        .ret(json!([
            {"name": "type", "type": "string"},
            {"name": "rp1", "type": "child<pcie-root-port>"},
            {"name": "hostdev0", "type": "child<vfio-pci>"}
        ]))
        .expect("query-pci")
        .ret(json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 2, "function": 0, "class_info": {"class": 1540, "desc": "PCI bridge"},
             "id": {"vendor": 6966, "device": 12}, "qdev_id": "rp1",
             "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1},
               "devices": [{"bus": 1, "slot": 0, "function": 0,
                 "class_info": {"class": 512, "desc": "Ethernet controller"},
                 "id": {"vendor": 32902, "device": 4298}, "qdev_id": "hostdev0"}]}}]}]))
        .expect("system_reset")
        .ok()
        .expect_args("human-monitor-command", json!({"command-line": "info pci"}))
        .ret(json!("Bus 0 ...\r\n"))
        .expect("query-status")
        .ret(json!({"running": "yes", "status": 3}))
        .connect()
        .await
        .unwrap();
    assert_eq!(qmp.peripheral_ids().await.unwrap(), vec!["rp1", "hostdev0"]);
    let pci = qmp.query_pci().await.unwrap();
    assert_eq!(pci.len(), 2);
    assert_eq!(pci[1].qdev_id.as_deref(), Some("hostdev0"));
    assert_eq!((pci[1].bus, pci[1].slot, pci[1].function), (1, 0, 0));
    assert_eq!(pci[1].parent_bridge.as_deref(), Some("rp1"));
    qmp.system_reset().await.unwrap();
    let raw = qmp
        .execute(
            "human-monitor-command",
            Some(&json!({"command-line": "info pci"})),
        )
        .await
        .unwrap();
    assert_eq!(raw, json!("Bus 0 ...\r\n"));
    // A reply of the wrong shape is a protocol error, not a panic or a hang.
    assert!(matches!(
        qmp.query_status().await,
        Err(QmpError::Protocol(_))
    ));
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn connect_over_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = Script::new()
        .expect("query-version")
        .ret(json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "x"}))
        .listen(&path)
        .unwrap();
    let qmp = Qmp::connect(&path, LONG).await.unwrap();
    assert_eq!(qmp.query_version().await.unwrap().package, "x");
    drop(qmp);
    server.await.unwrap().unwrap();

    let missing = dir.path().join("nope.sock");
    match Qmp::connect(&missing, LONG).await {
        Err(QmpError::Connect { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_or_missing_greeting() {
    let (client, server) = tokio::net::UnixStream::pair().unwrap();
    let mut peer = vfplug_qmp::testing::QmpPeer::new(server);
    peer.send_raw(b"{\"return\": {}}\r\n").await.unwrap();
    assert!(matches!(
        Qmp::from_stream(client).await,
        Err(QmpError::Protocol(_))
    ));

    let (client, server) = tokio::net::UnixStream::pair().unwrap();
    drop(server);
    assert!(matches!(
        Qmp::from_stream(client).await,
        Err(QmpError::Disconnected { .. })
    ));

    // Greeting but no answer to qmp_capabilities: bounded by the default timeout.
    let (client, server) = tokio::net::UnixStream::pair().unwrap();
    let mut peer = vfplug_qmp::testing::QmpPeer::new(server);
    let version = vfplug_qmp::VersionInfo {
        qemu: vfplug_qmp::commands::QemuVersion {
            major: 10,
            minor: 0,
            micro: 2,
        },
        package: String::new(),
    };
    peer.send_greeting(&version).await.unwrap();
    let opts = QmpOptions {
        default_timeout: Duration::from_millis(50),
        ..QmpOptions::default()
    };
    assert!(matches!(
        Qmp::from_stream_with(client, opts).await,
        Err(QmpError::Timeout { ref command, .. }) if command == "qmp_capabilities"
    ));
}

#[tokio::test]
async fn error_without_id_does_not_break_the_stream() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        .raw(&b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n"[..])
        .ret(json!({"running": true, "status": "running"}))
        .connect()
        .await
        .unwrap();
    assert!(qmp.query_status().await.unwrap().running);
    assert_eq!(qmp.protocol_errors(), 1);
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn dropping_last_handle_closes_connection() {
    let (qmp, server) = Script::new().connect().await.unwrap();
    let clone = qmp.clone();
    drop(qmp);
    // Still one handle: the server must not have seen EOF yet.
    assert!(!clone.is_closed());
    drop(clone);
    // The server ends only when it reads EOF.
    tokio::time::timeout(LONG, server)
        .await
        .expect("server saw the close")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn waiter_predicate_may_call_back_into_the_handle() {
    let (qmp, server) = Script::new()
        .expect("query-status")
        .event(
            "RESET",
            json!({"guest": false, "reason": "host-qmp-system-reset"}),
        )
        .ret(json!({"running": true, "status": "running"}))
        .connect()
        .await
        .unwrap();
    let q = qmp.clone();
    // The predicate takes the client's state lock; dispatch must not hold it meanwhile.
    let waiter = qmp.event_waiter(move |e| !q.is_closed() && e.name() == "RESET");
    assert!(qmp.query_status().await.unwrap().running);
    assert!(waiter.wait(LONG).await.unwrap().is_some());
    drop(qmp);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn wait_event_times_out_with_none_then_sees_later_event() {
    let (qmp, server) = Script::new()
        .expect("system_reset")
        .event(
            "RESET",
            json!({"guest": false, "reason": "host-qmp-system-reset"}),
        )
        .ok()
        .connect()
        .await
        .unwrap();
    let is_reset = |e: &Event| matches!(e, Event::Reset { .. });
    assert_eq!(qmp.wait_event(is_reset, SHORT).await.unwrap(), None);
    let waiter = qmp.event_waiter(is_reset);
    qmp.system_reset().await.unwrap();
    assert_eq!(
        waiter.wait(LONG).await.unwrap(),
        Some(Event::Reset {
            guest: false,
            reason: "host-qmp-system-reset".into()
        })
    );
    drop(qmp);
    server.await.unwrap().unwrap();
}
