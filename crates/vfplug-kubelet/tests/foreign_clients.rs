//! The device-plugin server against a foreign gRPC client (Python's grpcio) over its real unix
//! socket, with every `:authority` such clients send: the socket path (kubelets before 1.26,
//! grpcio, grpc-java), the path percent-encoded, `localhost`, and grpcio's default. h2 alone
//! resets the streams of the first two with PROTOCOL_ERROR (issue 8, finding 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// A minimal HTTP/2 gRPC client written frame by frame, because no gRPC library sends a request
/// without `:authority` (and h2's client then drops `:scheme` too). Returns the `grpc-status` of
/// a unary call with an empty message, or the RST_STREAM error code.
async fn raw_h2_unary(
    sock: &std::path::Path,
    authority: Option<&[u8]>,
    path: &str,
) -> Result<String, u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
    ];
    if let Some(a) = authority {
        headers.push((b":authority", a));
    }
    headers.push((b"content-type", b"application/grpc"));
    headers.push((b"te", b"trailers"));
    let block = loona_hpack::Encoder::new().encode(headers);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block));
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    s.write_all(&out).await.unwrap();
    let mut dec = loona_hpack::Decoder::new();
    let mut buf = Vec::new();
    let mut open: Vec<u8> = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("server answers")
            .unwrap();
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
            let payload: Vec<u8> = buf.drain(..9 + len).skip(9).collect();
            match kind {
                0x4 if flags & 0x1 == 0 => s.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
                0x3 if stream == 1 => {
                    return Err(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                0x1 | 0x9 if stream == 1 => {
                    open.extend_from_slice(&payload);
                    if flags & 0x4 != 0 {
                        let got = dec.decode(&std::mem::take(&mut open)).unwrap();
                        if let Some((_, v)) = got.iter().find(|(n, _)| n == b"grpc-status") {
                            return Ok(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// No `:authority` at all, a socket path, and an empty one: every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_or_with_unusable_authority_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let _kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let backend = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(1),
    ));
    let mut config = PluginConfig::new("pool0", dir.path());
    config.mode = RegistrationMode::Legacy;
    let cancel = CancellationToken::new();
    let h = spawn_plugin(config, backend, cancel.clone());
    let mut reg = h.registered();
    tokio::time::timeout(Duration::from_secs(10), reg.wait_for(|r| *r))
        .await
        .expect("registered in time")
        .expect("plugin task alive");
    let sock = dir.path().join("device-plugins/vfplug-pool0.sock");
    let path = "/v1beta1.DevicePlugin/GetDevicePluginOptions";
    let sock_path = sock.to_str().unwrap().as_bytes().to_vec();
    for authority in [
        None,
        Some(&sock_path[..]),
        Some(&b""[..]),
        Some(&b"localhost"[..]),
    ] {
        let got = raw_h2_unary(&sock, authority, path).await;
        assert_eq!(
            got,
            Ok("0".to_owned()),
            ":authority {:?}",
            authority.map(String::from_utf8_lossy)
        );
    }
    cancel.cancel();
    h.join().await;
}

/// grpc-go dialing the way kubelets before 1.26 do (the socket path as `:authority`), plus the
/// percent-encoded path and `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_dialing_like_an_old_kubelet_reaches_the_device_plugin() {
    use vfplug_kubelet::foreign::{GO_AUTHORITY_MODES, GoGrpc};
    let Some(go) = GoGrpc::build("grpc_go_dialing_like_an_old_kubelet_reaches_the_device_plugin")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let backend = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(2),
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
    for mode in GO_AUTHORITY_MODES {
        match go.call(&sock, mode, "0000:10:00.1").await {
            Ok(v) => {
                assert_eq!(v["list_and_watch_has_device"], true, "{v}");
                assert_eq!(v["preferred_has_device"], true, "{v}");
                assert_eq!(v["allocate_has_device"], true, "{v}");
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "clients refused:\n{}",
        failures.join("\n")
    );
    assert_eq!(backend.allocations().len(), GO_AUTHORITY_MODES.len());
    cancel.cancel();
    h.join().await;
}
