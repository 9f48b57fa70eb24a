//! Starting a QEMU VM for the lab and watching its serial console.
//!
//! The command line is built by [`VmConfig::args`] (a pure function, unit-tested); [`Vm::spawn`] runs
//! it with `kill_on_drop`, so a failing or panicking test never leaves QEMU behind. The serial console
//! goes to a file in the VM's directory (kept for diagnostics) and [`Vm::wait_serial`] tails it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::{LabError, lab::Lab};

/// A 9p share exported to the guest.
#[derive(Debug, Clone)]
pub struct Virtfs {
    /// Host directory.
    pub path: PathBuf,
    /// Mount tag the guest uses.
    pub tag: String,
    /// Export read-only.
    pub readonly: bool,
}

/// What VM to start. Defaults: q35, TCG, 512 MiB, 1 vCPU, 3 spare `pcie-root-port`s (`rp1`..`rp3`),
/// ACPI hotplug (q35's default), no firmware-less boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Memory in MiB.
    pub memory_mb: u32,
    /// vCPUs.
    pub smp: u32,
    /// Number of hotplug-capable root ports, named `<port_prefix>1`, `<port_prefix>2`, ... on
    /// `pcie.0`.
    pub root_ports: u8,
    /// Id prefix of the root ports: `rp` for the lab's own hotplugs, `vfplug-rp` (vfplugd's
    /// default `--vm-port-prefix`) for a VM pod whose slots vfplugd finds.
    pub port_prefix: String,
    /// Start paused in prelaunch (`-S`).
    pub prelaunch: bool,
    /// Guest kernel; `None` boots nothing (SeaBIOS finds no disk).
    pub kernel: Option<PathBuf>,
    /// Guest initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line (after the console and speed options).
    pub append: String,
    /// Native PCIe hotplug (pciehp) instead of ACPI hotplug.
    pub native_pcie_hotplug: bool,
    /// Emulated VT-d with interrupt remapping, as VFIO inside the guest needs.
    pub intel_iommu: bool,
    /// 9p shares.
    pub virtfs: Vec<Virtfs>,
    /// Exit instead of rebooting (`-no-reboot`): a guest panic ends the run at once. Leave off when
    /// the test uses `system_reset`, which `-no-reboot` turns into a shutdown.
    pub no_reboot: bool,
    /// Anything else, appended verbatim.
    pub extra: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mb: 512,
            smp: 1,
            root_ports: 3,
            port_prefix: "rp".into(),
            prelaunch: false,
            kernel: None,
            initrd: None,
            append: String::new(),
            native_pcie_hotplug: false,
            intel_iommu: false,
            virtfs: Vec::new(),
            no_reboot: false,
            extra: Vec::new(),
        }
    }
}

/// Kernel options that make a TCG boot several times faster and keep the console quiet; measured in
/// shared/research/vm-lab.md (cryptomgr self-tests alone cost ~30 s in L2).
pub const FAST_BOOT_APPEND: &str =
    "console=ttyS0 quiet mitigations=off cryptomgr.notests panic=-1 rdinit=/init";

impl VmConfig {
    /// The QEMU arguments for a VM whose files (QMP socket, serial log) live in `dir`.
    pub fn args(&self, dir: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        let machine = if self.intel_iommu {
            "q35,kernel-irqchip=split"
        } else {
            "q35"
        };
        push(&[
            "-machine",
            machine,
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ]);
        push(&[
            "-m",
            &self.memory_mb.to_string(),
            "-smp",
            &self.smp.to_string(),
        ]);
        if self.no_reboot {
            push(&["-no-reboot"]);
        }
        if self.intel_iommu {
            // VFIO in the guest needs a (v)IOMMU; caching-mode makes QEMU see the guest's mappings,
            // which emulated devices behind it need for DMA. -cpu max: x2apic etc. for intremap.
            push(&[
                "-cpu",
                "max",
                "-device",
                "intel-iommu,intremap=on,caching-mode=on",
            ]);
        }
        if self.native_pcie_hotplug {
            push(&[
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            ]);
        }
        if self.prelaunch {
            push(&["-S"]);
        }
        let qmp = format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display());
        let serial = format!("file:{}", dir.join("serial.log").display());
        push(&["-qmp", &qmp, "-serial", &serial]);
        for i in 1..=self.root_ports {
            let dev = format!(
                "pcie-root-port,id={}{i},bus=pcie.0,chassis={i},slot={i},addr={:#x}",
                self.port_prefix,
                u32::from(i) + 1
            );
            push(&["-device", &dev]);
        }
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.display().to_string()]);
            let append = format!("{FAST_BOOT_APPEND} {}", self.append);
            push(&["-append", append.trim_end()]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.display().to_string()]);
        }
        for v in &self.virtfs {
            let ro = if v.readonly { ",readonly=on" } else { "" };
            let spec = format!(
                "local,path={},mount_tag={},security_model=none,id={}{ro}",
                v.path.display(),
                v.tag,
                v.tag
            );
            push(&["-virtfs", &spec]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A running QEMU. Dropping it kills the process.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    dir: PathBuf,
    /// Serial lines already handed out by [`Vm::wait_serial`].
    consumed: usize,
    /// When the process was spawned.
    pub started: Instant,
}

impl Vm {
    /// Starts QEMU for `cfg` with its files in `dir` (which must exist).
    pub fn spawn(lab: &Lab, cfg: &VmConfig, dir: &Path) -> Result<Vm, LabError> {
        let args = cfg.args(dir);
        tracing::info!(qemu = %lab.qemu.display(), args = %args.join(" "), "starting VM");
        let stderr_path = dir.join("qemu.stderr");
        let stderr =
            std::fs::File::create(&stderr_path).map_err(|e| LabError::io(&stderr_path, e))?;
        let child = Command::new(&lab.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| LabError::io(&lab.qemu, e))?;
        Ok(Vm {
            child,
            dir: dir.to_path_buf(),
            consumed: 0,
            started: Instant::now(),
        })
    }

    /// The QMP socket path.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// QEMU's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything the guest printed so far (lossy UTF-8, `\r` removed).
    pub fn serial_text(&self) -> String {
        std::fs::read(self.dir.join("serial.log"))
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// QEMU's stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }

    /// Waits for the next serial line (after those already returned) that satisfies `pred`, and
    /// returns it. Fails if QEMU exits first or `timeout` passes.
    pub async fn wait_serial(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial_text();
            // Only complete lines: the last one may still be being written.
            let complete = text.rsplit_once('\n').map_or("", |(head, _)| head);
            let lines: Vec<&str> = complete.split('\n').collect();
            let lines = if complete.is_empty() {
                &[][..]
            } else {
                &lines[..]
            };
            for (i, l) in lines.iter().enumerate().skip(self.consumed) {
                if pred(l) {
                    self.consumed = i + 1;
                    return Ok((*l).to_string());
                }
            }
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| LabError::io(&self.dir, e))?
            {
                return Err(LabError::Exited {
                    what: what.into(),
                    status: status.to_string(),
                    tail: self.diagnostics(),
                });
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: what.into(),
                    after: timeout,
                    tail: self.diagnostics(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, LabError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(r) => r.map_err(|e| LabError::io(&self.dir, e)),
            Err(_) => Err(LabError::Timeout {
                what: "QEMU exit".into(),
                after: timeout,
                tail: self.diagnostics(),
            }),
        }
    }

    /// Last serial lines and QEMU's stderr, for error messages.
    pub fn diagnostics(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited: {s}"),
            Ok(None) => "running".to_string(),
            Err(e) => format!("unknown: {e}"),
        };
        let serial = self.serial_text();
        let tail: Vec<&str> = serial.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- QEMU {status}; serial (last 40 lines) ---\n{}\n--- qemu stderr ---\n{}",
            tail.join("\n"),
            self.stderr_text()
        )
    }

    /// Kills QEMU now and reaps it.
    pub async fn kill(&mut self) {
        // Already exited is fine: the point is that it is gone.
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_pair(args: &[String], k: &str, v: &str) -> bool {
        args.windows(2).any(|w| w[0] == k && w[1] == v)
    }

    #[test]
    fn default_args_are_q35_tcg_with_root_ports_and_qmp() {
        let a = VmConfig::default().args(Path::new("/run/vm"));
        assert!(has_pair(&a, "-machine", "q35"));
        assert!(has_pair(&a, "-accel", "tcg"));
        assert!(has_pair(
            &a,
            "-qmp",
            "unix:/run/vm/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(&a, "-serial", "file:/run/vm/serial.log"));
        assert!(has_pair(
            &a,
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=0x2"
        ));
        assert!(has_pair(
            &a,
            "-device",
            "pcie-root-port,id=rp3,bus=pcie.0,chassis=3,slot=3,addr=0x4"
        ));
        assert!(
            !a.iter()
                .any(|x| x == "-S" || x == "-global" || x == "-kernel" || x == "-no-reboot")
        );
    }

    #[test]
    fn options_map_to_flags() {
        let cfg = VmConfig {
            prelaunch: true,
            no_reboot: true,
            native_pcie_hotplug: true,
            intel_iommu: true,
            root_ports: 1,
            port_prefix: "vfplug-rp".into(),
            kernel: Some("/k/vmlinuz".into()),
            initrd: Some("/k/initrd".into()),
            append: "x=1".into(),
            virtfs: vec![Virtfs {
                path: "/usr".into(),
                tag: "usr".into(),
                readonly: true,
            }],
            ..VmConfig::default()
        };
        let a = cfg.args(Path::new("/d"));
        assert!(a.iter().any(|x| x == "-S"));
        assert!(a.iter().any(|x| x == "-no-reboot"));
        assert!(has_pair(
            &a,
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"
        ));
        assert!(has_pair(&a, "-machine", "q35,kernel-irqchip=split"));
        assert!(has_pair(
            &a,
            "-device",
            "intel-iommu,intremap=on,caching-mode=on"
        ));
        assert!(has_pair(&a, "-kernel", "/k/vmlinuz"));
        assert!(has_pair(&a, "-initrd", "/k/initrd"));
        assert!(has_pair(&a, "-append", &format!("{FAST_BOOT_APPEND} x=1")));
        assert!(has_pair(
            &a,
            "-virtfs",
            "local,path=/usr,mount_tag=usr,security_model=none,id=usr,readonly=on"
        ));
        assert!(has_pair(
            &a,
            "-device",
            "pcie-root-port,id=vfplug-rp1,bus=pcie.0,chassis=1,slot=1,addr=0x2"
        ));
        assert!(!a.iter().any(|x| x.contains("rp2")));
    }
}
