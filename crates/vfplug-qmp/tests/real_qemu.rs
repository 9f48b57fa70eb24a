//! The client against a real QEMU (host-only, `-S` prelaunch, TCG, no guest OS, no host devices
//! touched). Proves the classification strings and the unplug behaviour of vm-lab.md §2 against
//! the real peer: device_del stays pending without a guest, a second one is "already in the
//! process of unplug", and system_reset completes it with DEVICE_DELETED.
//!
//! Skips (loudly) when no QEMU is found, fails then with `VFPLUG_REQUIRE=1`; set `VFPLUG_QEMU`
//! to a binary to choose one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use vfplug_host::prereq;
use vfplug_qmp::{DelOutcome, DeviceAdd, Event, Qmp, QmpError, RunState, UnplugOutcome};

fn qemu_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VFPLUG_QEMU") {
        return prereq::file(Path::new(&p), "VFPLUG_QEMU names no file");
    }
    prereq::program("qemu-system-x86_64").map_err(|e| format!("{e} (or set VFPLUG_QEMU)"))
}

async fn connect_with_retry(path: &Path) -> Qmp {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Qmp::connect(path, Duration::from_secs(10)).await {
            Ok(q) => return q,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("QEMU's QMP socket never answered: {e}"),
        }
    }
}

#[tokio::test]
async fn real_qemu_prelaunch_hotplug_cycle() {
    let Some(qemu) = prereq::need("real_qemu_prelaunch_hotplug_cycle", qemu_binary()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = tokio::process::Command::new(&qemu)
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args([
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=0x2",
            "-device",
            "pcie-root-port,id=rp2,bus=pcie.0,chassis=2,slot=2,addr=0x3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let qmp = connect_with_retry(&sock).await;
    assert!(qmp.greeting().version.qemu.major >= 7);
    let version = qmp.query_version().await.unwrap();
    assert_eq!(version.qemu, qmp.greeting().version.qemu);
    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::Prelaunch
    );

    // vfio-pci of a host address that does not exist: QEMU only fails to find it in sysfs.
    let err = qmp
        .device_add(&DeviceAdd::vfio_pci(
            "0000:99:1f.7",
            "hostdev0",
            "rp1",
            None,
        ))
        .await
        .unwrap_err();
    eprintln!("QEMU: {err}");
    assert!(matches!(err, QmpError::HostDeviceMissing { .. }), "{err:?}");

    // A device without host resources, hot-added behind a root port.
    let rng = DeviceAdd::new("virtio-rng-pci", "rng1").bus("rp1");
    qmp.device_add(&rng).await.unwrap();
    let ids = qmp.peripheral_ids().await.unwrap();
    assert!(ids.contains(&"rng1".to_string()), "{ids:?}");
    assert!(ids.contains(&"rp1".to_string()), "{ids:?}");
    let dup = qmp
        .device_add(&DeviceAdd::new("virtio-rng-pci", "rng1").bus("rp2"))
        .await
        .unwrap_err();
    eprintln!("QEMU: {dup}");
    assert!(matches!(dup, QmpError::DuplicateId { .. }), "{dup:?}");
    let pci = qmp.query_pci().await.unwrap();
    assert!(pci.iter().any(|d| d.qdev_id.as_deref() == Some("rp1")));

    // No guest: the unplug stays pending, a second request says so.
    let out = qmp
        .device_del_and_wait("rng1", Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(out, UnplugOutcome::Pending);
    assert_eq!(
        qmp.device_del("rng1").await.unwrap(),
        DelOutcome::AlreadyPending
    );

    // A reset completes it.
    let deleted = qmp.event_waiter(|e| e.is_device_deleted("rng1"));
    qmp.system_reset().await.unwrap();
    assert!(
        deleted
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .is_some(),
        "no DEVICE_DELETED after system_reset"
    );
    let ids = qmp.peripheral_ids().await.unwrap();
    assert!(!ids.contains(&"rng1".to_string()), "{ids:?}");
    assert!(matches!(
        qmp.device_del("rng1").await,
        Err(QmpError::DeviceNotFound { .. })
    ));

    // quit: SHUTDOWN, then the connection ends and calls fail with Disconnected.
    let shutdown = qmp.event_waiter(|e| matches!(e, Event::Shutdown { .. }));
    qmp.execute("quit", None).await.unwrap();
    assert!(
        shutdown
            .wait(Duration::from_secs(10))
            .await
            .unwrap()
            .is_some()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let after = qmp.query_status().await.unwrap_err();
    assert!(after.is_connection_error(), "{after:?}");
}
