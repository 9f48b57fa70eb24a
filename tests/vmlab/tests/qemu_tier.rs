//! qemu tier: host QEMU (q35, TCG) with spare `pcie-root-port`s, driven through vfplug-qmp.
//! Run with `make vm-test TIER=qemu` (or `VMLAB_TIER=qemu cargo nextest run -p vfplug-vmlab
//! --no-capture -E 'binary(qemu_tier)'`).
//!
//! What it proves against a real QEMU: a hot-added NIC is seen by a real Linux guest and its unplug is
//! acknowledged (`DEVICE_DELETED`) with ACPI hotplug (q35's default) and with native PCIe hotplug;
//! a vfio-pci `device_add` of an absent host device maps to `QmpError::HostDeviceMissing`; an unplug
//! in a VM with no OS stays pending ("already in the process of unplug" → `AlreadyPending`) until
//! `system_reset` completes it.

use std::time::{Duration, Instant};

use vfplug_qmp::{DelOutcome, DeviceAdd, Event, Qmp, QmpError, RunState, UnplugOutcome};
use vfplug_vmlab::guest::{self, GUEST_PREFIX};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::qmp::{connect_retry, vfio_device};
use vfplug_vmlab::timing::{Figures, median_ms};
use vfplug_vmlab::vm::{Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(120);
const CONNECT: Duration = Duration::from_secs(20);

/// Writes the hotplug guest's initramfs into `dir` and returns the config that boots it.
fn guest_config(lab: &Lab, dir: &std::path::Path) -> VmConfig {
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, guest::hotplug_guest(lab).expect("build initramfs")).expect("write");
    VmConfig {
        kernel: Some(lab.kernel.clone()),
        initrd: Some(initrd),
        ..VmConfig::default()
    }
}

fn guest_line(kind: &str) -> impl Fn(&str) -> bool {
    let prefix = format!("{GUEST_PREFIX} {kind}");
    move |l: &str| l.starts_with(&prefix)
}

/// Boots the hotplug guest and connects QMP; records the boot time under `<tag>.guest_boot`.
async fn boot_guest(
    lab: &Lab,
    cfg: &VmConfig,
    dir: &std::path::Path,
    tag: &str,
    f: &mut Figures,
) -> (Vm, Qmp) {
    let t0 = Instant::now();
    let mut vm = Vm::spawn(lab, cfg, dir).expect("spawn QEMU");
    let qmp = connect_retry(&vm.qmp_socket(), CONNECT)
        .await
        .expect("QMP connect");
    let ready = vm
        .wait_serial("guest READY", BOOT, guest_line("READY"))
        .await
        .expect("guest boots");
    f.record(&format!("{tag}.guest_boot_to_init"), t0.elapsed());
    let pci: usize = guest::field(&ready, "pci")
        .and_then(|v| v.parse().ok())
        .expect("pci=");
    // q35 host bridge, LPC, SATA, SMBus and our 3 root ports at least.
    assert!(pci >= 7, "guest saw only {pci} PCI functions: {ready}");
    (vm, qmp)
}

/// Hot-adds an e1000e into rp1, waits for the guest to see it, unplugs it and returns the unplug
/// latency (device_del sent → DEVICE_DELETED).
async fn nic_round_trip(
    vm: &mut Vm,
    qmp: &Qmp,
    tag: &str,
    f: &mut Figures,
    wait: Duration,
) -> Duration {
    let t = Instant::now();
    qmp.device_add(&DeviceAdd::new("e1000e", "nic1").bus("rp1").addr("0x0"))
        .await
        .expect("device_add");
    f.record(&format!("{tag}.device_add_e1000e"), t.elapsed());
    let seen = vm
        .wait_serial(
            "guest sees the NIC",
            Duration::from_secs(60),
            guest_line("PCI+"),
        )
        .await
        .expect("guest enumerates the hot-added NIC");
    assert!(seen.ends_with("0x8086:0x10d3"), "unexpected device: {seen}");
    f.record(&format!("{tag}.hotplug_visible_in_guest"), t.elapsed());
    assert!(
        qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"nic1".to_string())
    );

    let t = Instant::now();
    let outcome = qmp
        .device_del_and_wait("nic1", wait)
        .await
        .expect("device_del");
    let latency = t.elapsed();
    assert_eq!(
        outcome,
        UnplugOutcome::Deleted,
        "guest did not acknowledge the unplug"
    );
    f.record(&format!("{tag}.unplug_to_device_deleted"), latency);
    vm.wait_serial(
        "guest loses the NIC",
        Duration::from_secs(30),
        guest_line("PCI-"),
    )
    .await
    .expect("guest saw the removal");
    assert!(
        !qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"nic1".to_string())
    );
    latency
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acpi_hotplug_nic_is_acknowledged_by_the_guest() {
    let Gate::Run(lab) = gate(Tier::Qemu) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = Figures::default();
    let (mut vm, qmp) = boot_guest(
        &lab,
        &guest_config(&lab, dir.path()),
        dir.path(),
        "acpi",
        &mut f,
    )
    .await;

    // QMP round trip through vfplug-qmp against a running TCG guest.
    let mut rtt = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let st = qmp.query_status().await.expect("query-status");
        rtt.push(t.elapsed());
        assert_eq!(st.status, RunState::Running);
    }
    f.record_ms(
        "acpi.qmp_round_trip_median",
        median_ms(&rtt).unwrap_or(f64::NAN),
    );

    nic_round_trip(&mut vm, &qmp, "acpi", &mut f, Duration::from_secs(20)).await;
    // A second cycle into the same slot: the slot is really free again.
    nic_round_trip(&mut vm, &qmp, "acpi.again", &mut f, Duration::from_secs(20)).await;
    println!("{}", f.table());
    vm.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_pcie_hotplug_nic_is_acknowledged_by_the_guest() {
    let Gate::Run(lab) = gate(Tier::Qemu) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = Figures::default();
    let cfg = VmConfig {
        native_pcie_hotplug: true,
        ..guest_config(&lab, dir.path())
    };
    let (mut vm, qmp) = boot_guest(&lab, &cfg, dir.path(), "native", &mut f).await;
    // pciehp waits its 5 s attention-button window before powering the slot off: a wait shorter
    // than that would report Pending, which is the case the executor's bounded wait must handle.
    nic_round_trip(&mut vm, &qmp, "native", &mut f, Duration::from_secs(30)).await;
    println!("{}", f.table());
    vm.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelaunch_unplug_stays_pending_until_system_reset() {
    let Gate::Run(lab) = gate(Tier::Qemu) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = Figures::default();
    let cfg = VmConfig {
        prelaunch: true,
        ..VmConfig::default()
    };
    let mut vm = Vm::spawn(&lab, &cfg, dir.path()).expect("spawn QEMU");
    let qmp = connect_retry(&vm.qmp_socket(), CONNECT)
        .await
        .expect("QMP connect");
    assert_eq!(
        qmp.query_status().await.expect("status").status,
        RunState::Prelaunch
    );

    // vfio-pci of a host device that does not exist: the error is classified, not generic.
    let t = Instant::now();
    let err = qmp
        .device_add(&vfio_device("0000:99:00.0", "hostdev0", "rp2"))
        .await
        .expect_err("absent host device must fail");
    f.record("prelaunch.vfio_absent_device_add_error", t.elapsed());
    assert!(
        matches!(err, QmpError::HostDeviceMissing { .. }),
        "unexpected error: {err:?}"
    );
    assert!(
        !qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"hostdev0".to_string())
    );

    let t = Instant::now();
    qmp.device_add(&DeviceAdd::new("e1000e", "nic1").bus("rp1").addr("0x0"))
        .await
        .expect("device_add");
    f.record("prelaunch.device_add_e1000e", t.elapsed());
    assert!(
        qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"nic1".to_string())
    );
    let dup = qmp
        .device_add(&DeviceAdd::new("e1000e", "nic1").bus("rp2"))
        .await
        .expect_err("dup id");
    assert!(
        matches!(dup, QmpError::DuplicateId { .. }),
        "unexpected error: {dup:?}"
    );

    // No OS: nobody acknowledges. The bounded wait reports Pending; a retry is not an error.
    let outcome = qmp
        .device_del_and_wait("nic1", Duration::from_secs(2))
        .await
        .expect("device_del");
    assert_eq!(outcome, UnplugOutcome::Pending);
    assert_eq!(
        qmp.device_del("nic1").await.expect("second device_del"),
        DelOutcome::AlreadyPending
    );
    assert!(
        qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"nic1".to_string())
    );

    // system_reset completes every pending unplug.
    let waiter = qmp.event_waiter(|e| e.is_device_deleted("nic1"));
    let t = Instant::now();
    qmp.system_reset().await.expect("system_reset");
    let ev = match waiter.wait(Duration::from_secs(10)).await {
        Ok(ev) => ev,
        Err(e) => panic!("waiting for DEVICE_DELETED: {e}\n{}", vm.diagnostics()),
    };
    f.record("prelaunch.system_reset_to_device_deleted", t.elapsed());
    assert!(
        matches!(ev, Some(Event::DeviceDeleted { .. })),
        "no DEVICE_DELETED after reset: {ev:?}"
    );
    assert!(
        !qmp.peripheral_ids()
            .await
            .expect("qom-list")
            .contains(&"nic1".to_string())
    );
    println!("{}", f.table());
    vm.kill().await;
}
