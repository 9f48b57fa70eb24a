//! The guests' initramfs images, built at run time from the cached kernel modules and busybox.
//!
//! * [`hotplug_guest`]: a tiny Linux userland that only watches `/sys/bus/pci/devices` and prints a
//!   line per change. Its kernel does the real work: ACPI (or native pciehp) hotplug acknowledges
//!   QEMU's unplug requests, which is what makes `DEVICE_DELETED` arrive. Used as the qemu tier's
//!   guest and as L2 in the full sriov tier.
//! * [`l1_guest`]: the SR-IOV lab's L1. Loads igb, VFIO and 9p, mounts the host's `/usr` read-only
//!   and the per-run directory read-write over 9p, then runs `/lab/run.sh` chrooted so host-built
//!   binaries (the guest agent, QEMU itself) run unchanged with the host's shared libraries.

use crate::{LabError, cpio::NewcArchive, lab::Lab};

/// Serial-line prefix of the hotplug guest.
pub const GUEST_PREFIX: &str = "VMLAB-GUEST";
/// Serial-line prefix of the L1 init.
pub const L1_PREFIX: &str = "VMLAB-L1";

/// 9p mount tags the L1 guest expects (see [`crate::vm::VmConfig::virtfs`]).
pub const TAG_USR: &str = "usr";
/// Per-run directory shared read-write; holds run.sh, the agent and L2's images.
pub const TAG_LAB: &str = "lab";

const HOTPLUG_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
snap() { for d in /sys/bus/pci/devices/*; do echo "${d##*/}"; done; }
old=$(snap)
echo "VMLAB-GUEST READY uptime=$(cut -d' ' -f1 /proc/uptime) pci=$(echo $old | wc -w)"
# Poll, not uevents: simple, and 100 ms is far below what is being measured (QMP sees the unplug
# through DEVICE_DELETED; these lines only prove what the guest saw).
while :; do
  new=$(snap)
  for d in $new; do case "$old" in *"$d"*) ;; *)
    echo "VMLAB-GUEST PCI+ $d $(cat /sys/bus/pci/devices/$d/vendor 2>/dev/null):$(cat /sys/bus/pci/devices/$d/device 2>/dev/null)";;
  esac; done
  for d in $old; do case "$new" in *"$d"*) ;; *) echo "VMLAB-GUEST PCI- $d";; esac; done
  old=$new
  usleep 100000
done
"#;

const L1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VMLAB-L1 BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules.order); do
  insmod /lib/modules/$m.ko || echo "VMLAB-L1 WARN insmod $m failed"
done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o,ro usr /host/usr || echo "VMLAB-L1 FAIL mount usr"
mount -t 9p -o $o lab /host/lab || echo "VMLAB-L1 FAIL mount lab"
for d in proc sys dev; do mount --bind /$d /host/$d; done
for d in tmp run root dev/shm; do mkdir -p /host/$d; mount -t tmpfs tmpfs /host/$d; done
echo "VMLAB-L1 READY uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot /host /bin/sh /lab/run.sh
echo "VMLAB-L1 EXIT rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"#;

fn base(busybox: &[u8], init: &str) -> NewcArchive {
    let mut a = NewcArchive::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc",
    ] {
        a.dir(d, 0o755);
    }
    a.char_dev("dev/console", 0o600, 5, 1)
        .file("bin/busybox", 0o755, busybox)
        .symlink("bin/sh", "busybox")
        .file("init", 0o755, init.as_bytes());
    a
}

fn read(p: &std::path::Path) -> Result<Vec<u8>, LabError> {
    std::fs::read(p).map_err(|e| LabError::io(p, e))
}

/// The hotplug-acknowledging guest (no modules needed: ACPI hotplug and pciehp are built in).
pub fn hotplug_guest(lab: &Lab) -> Result<Vec<u8>, LabError> {
    Ok(base(&read(&lab.busybox)?, HOTPLUG_INIT).finish())
}

/// The L1 guest of the sriov tiers, with the modules setup.sh resolved.
pub fn l1_guest(lab: &Lab) -> Result<Vec<u8>, LabError> {
    let order = lab.module_order()?;
    let mut a = base(&read(&lab.busybox)?, L1_INIT);
    a.dir("lib", 0o755).dir("lib/modules", 0o755);
    for m in &order {
        let p = lab.modules_dir.join(format!("{m}.ko"));
        a.file(&format!("lib/modules/{m}.ko"), 0o644, &read(&p)?);
    }
    a.file(
        "modules.order",
        0o644,
        format!("{}\n", order.join("\n")).as_bytes(),
    );
    // The chroot in which host binaries run: the host's /usr (merged-usr, so /bin, /lib, /lib64 are
    // links into it) and nothing else of the host. Its /etc is empty on purpose: glibc falls back to
    // its built-in library paths, and no host configuration or secrets enter the guest.
    a.dir("host", 0o755);
    for d in [
        "usr", "lab", "proc", "sys", "dev", "tmp", "run", "root", "etc",
    ] {
        a.dir(&format!("host/{d}"), 0o755);
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        a.symlink(&format!("host/{l}"), t);
    }
    Ok(a.finish())
}

/// Parses `key=value` fields of a status line, e.g. `uptime=3.51` from
/// `VMLAB-GUEST READY uptime=3.51 pci=9`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_parses_key_values() {
        let l = "VMLAB-GUEST READY uptime=3.51 pci=9";
        assert_eq!(field(l, "uptime"), Some("3.51"));
        assert_eq!(field(l, "pci"), Some("9"));
        assert_eq!(field(l, "up"), None);
        assert_eq!(field(l, "READY"), None);
    }

    #[test]
    fn scripts_print_the_markers_tests_wait_for() {
        assert!(HOTPLUG_INIT.contains(&format!("{GUEST_PREFIX} READY")));
        assert!(HOTPLUG_INIT.contains(&format!("{GUEST_PREFIX} PCI+")));
        assert!(L1_INIT.contains(&format!("{L1_PREFIX} READY")));
        assert!(L1_INIT.contains(&format!("mount -t 9p -o $o,ro {TAG_USR} /host/usr")));
        assert!(L1_INIT.contains(&format!("mount -t 9p -o $o {TAG_LAB} /host/lab")));
    }
}
