//! qemu tier: host QEMU (q35, TCG) with a tiny Linux guest, driven through vfplug-qmp.
//! Run with `make vm-test TIER=qemu` (or `VMLAB_TIER=qemu cargo nextest run -p vfplug-vmlab --no-capture`).

use std::time::{Duration, Instant};

use vfplug_vmlab::guest::{self, GUEST_PREFIX};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::timing::Figures;
use vfplug_vmlab::vm::{Vm, VmConfig};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_reports_its_pci_devices() {
    let Gate::Run(lab) = gate(Tier::Qemu) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = guest_config(&lab, dir.path());
    let mut figures = Figures::default();
    let t0 = Instant::now();
    let mut vm = Vm::spawn(&lab, &cfg, dir.path()).expect("spawn");
    let ready = vm
        .wait_serial("guest READY", Duration::from_secs(120), |l| {
            l.starts_with(&format!("{GUEST_PREFIX} READY"))
        })
        .await
        .expect("guest boots");
    figures.record("qemu.guest_boot_to_init", t0.elapsed());
    let pci: usize = guest::field(&ready, "pci")
        .and_then(|v| v.parse().ok())
        .expect("pci=");
    // q35 host bridge + LPC/SATA/SMBus + 3 root ports at least.
    assert!(pci >= 7, "guest saw only {pci} PCI functions: {ready}");
    vm.kill().await;
}
