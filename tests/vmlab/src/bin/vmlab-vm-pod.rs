//! What a VM pod on the real Kubernetes tier runs, for a script (`scripts/demo-domain.sh`):
//! writes the VM lab's kernel (`vmlinuz`) and the hotplug-acknowledging guest
//! ([`vfplug_vmlab::guest::hotplug_guest`], `initrd.cpio`) into `<dir>`, and prints as one JSON
//! array the container command that boots them: QEMU under TCG with its QMP socket and serial
//! log in `<qmp-dir>` (the pod's emptyDir mount), 256 MiB, and two `vfplug-rp` root ports for
//! vfplugd's hot-plugs — the VM of `tests/k8s/tests/domain.rs`. The pod must mount `<dir>` at
//! the same path and the host's `/usr` (QEMU).
//!
//! `cargo run -p vfplug-vmlab --bin vmlab-vm-pod -- <dir> [qmp-dir=/qmp]`
//! (needs `tests/vmlab/setup.sh`'s cache; `VMLAB_CACHE` as for the lab's tests)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn run(dir: &Path, qmp_dir: &Path) -> Result<Vec<String>, String> {
    let lab = vfplug_vmlab::lab::Lab::discover()
        .map_err(|e| format!("the VM lab's kernel and busybox: {e} (run tests/vmlab/setup.sh)"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let kernel = dir.join("vmlinuz");
    std::fs::copy(&lab.kernel, &kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let initrd = dir.join("initrd.cpio");
    let image = vfplug_vmlab::guest::hotplug_guest(&lab).map_err(|e| e.to_string())?;
    std::fs::write(&initrd, image).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let cfg = vfplug_vmlab::vm::VmConfig {
        memory_mb: 256,
        root_ports: 2,
        port_prefix: "vfplug-rp".into(),
        kernel: Some(kernel),
        initrd: Some(initrd),
        ..Default::default()
    };
    let mut cmd = vec!["/usr/bin/qemu-system-x86_64".to_owned()];
    cmd.extend(cfg.args(qmp_dir));
    Ok(cmd)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: vmlab-vm-pod <dir> [qmp-dir=/qmp]");
        return ExitCode::from(2);
    };
    let qmp_dir = args
        .next()
        .map_or_else(|| PathBuf::from("/qmp"), PathBuf::from);
    match run(&dir, &qmp_dir) {
        Ok(cmd) => {
            println!("{}", serde_json::Value::from(cmd));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmlab-vm-pod: {e}");
            ExitCode::FAILURE
        }
    }
}
