//! The guest agent's logic: what `vmlab-guest-agent` does inside the L1 guest. It runs vfplug's own
//! code (the [`crate::sriov`] sysfs steps and vfplug-qmp) against a real kernel with real SR-IOV and
//! VFIO, and reports on stdout (L1's serial console) with one line per result:
//!
//! * `VMLAB-AGENT PASS <step> k=v ...` / `VMLAB-AGENT FAIL <step>: <error>`
//! * `VMLAB-AGENT FIGURE <name> <ms>` (also printed as `VMLAB FIGURE` by the host test)
//! * `VMLAB-AGENT DONE ok=<true|false>` last.
//!
//! The host test ([`tests/sriov_tier.rs`]) checks those lines; the agent itself never decides
//! whether the test passed beyond reporting each step.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfplug_core::pci::PciAddress;
use vfplug_qmp::{DelOutcome, Qmp, QmpError, UnplugOutcome};

use crate::guest::GUEST_PREFIX;
use crate::lab::Lab;
use crate::qmp::{connect_retry, vfio_device};
use crate::sriov::Sysfs;
use crate::vm::{Vm, VmConfig};

/// Serial-line prefix of the agent.
pub const AGENT_PREFIX: &str = "VMLAB-AGENT";
/// igb (82576) PF IDs as sysfs prints them.
pub const IGB_VENDOR: &str = "0x8086";
/// igb (82576) PF device ID.
pub const IGB_PF_DEVICE: &str = "0x10c9";
/// igb VF device ID (what L2 must see).
pub const IGB_VF_DEVICE: &str = "0x10ca";

/// Which L2 phases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// L2 in prelaunch (`-S`): hotplug, pending unplug, `system_reset` completes it.
    Prelaunch,
    /// L2 boots Linux, which acknowledges the unplug.
    Linux,
}

/// The agent's command line: `--key value` pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentArgs {
    /// sysfs root (`/sys`).
    pub sysfs: PathBuf,
    /// VFs to create.
    pub numvfs: u32,
    /// QEMU for L2.
    pub qemu: PathBuf,
    /// Where L2's sockets and logs go (must support unix sockets: tmpfs, not 9p).
    pub workdir: PathBuf,
    /// L2 kernel and initramfs (for [`Phase::Linux`]).
    pub l2_kernel: PathBuf,
    /// L2 initramfs.
    pub l2_initrd: PathBuf,
    /// Phases, in order.
    pub phases: Vec<Phase>,
}

impl AgentArgs {
    /// Parses `--sysfs P --numvfs N --qemu P --workdir P --l2-kernel P --l2-initrd P
    /// --phases prelaunch,linux` (all optional; defaults suit the L1 guest).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<AgentArgs, String> {
        let mut a = AgentArgs {
            sysfs: "/sys".into(),
            numvfs: 2,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            workdir: "/tmp/vmlab-l2".into(),
            l2_kernel: "/lab/vmlinuz".into(),
            l2_initrd: "/lab/l2.cpio".into(),
            phases: vec![Phase::Prelaunch],
        };
        let mut it = args.into_iter();
        while let Some(k) = it.next() {
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            match k.as_str() {
                "--sysfs" => a.sysfs = v.into(),
                "--numvfs" => a.numvfs = v.parse().map_err(|e| format!("--numvfs {v}: {e}"))?,
                "--qemu" => a.qemu = v.into(),
                "--workdir" => a.workdir = v.into(),
                "--l2-kernel" => a.l2_kernel = v.into(),
                "--l2-initrd" => a.l2_initrd = v.into(),
                "--phases" => {
                    a.phases = v
                        .split(',')
                        .map(|p| match p {
                            "prelaunch" => Ok(Phase::Prelaunch),
                            "linux" => Ok(Phase::Linux),
                            other => Err(format!("unknown phase {other:?}")),
                        })
                        .collect::<Result<_, _>>()?
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if a.numvfs == 0 {
            return Err("--numvfs must be at least 1".into());
        }
        Ok(a)
    }
}

/// Result of one step, for the report line.
type Step<T> = Result<T, String>;

fn figure(name: &str, d: Duration) {
    println!(
        "{AGENT_PREFIX} FIGURE {name} {:.1}",
        d.as_secs_f64() * 1000.0
    );
}

fn pass(step: &str, detail: &str) {
    println!("{AGENT_PREFIX} PASS {step} {detail}");
}

/// Runs every step; returns whether all passed. Each step prints its own line.
pub async fn run(args: &AgentArgs) -> bool {
    let ok = match run_steps(args).await {
        Ok(()) => true,
        Err(e) => {
            // The step name is part of `e`.
            println!("{AGENT_PREFIX} FAIL {e}");
            false
        }
    };
    println!("{AGENT_PREFIX} DONE ok={ok}");
    ok
}

async fn run_steps(args: &AgentArgs) -> Step<()> {
    let sys = Sysfs::new(&args.sysfs);
    let pf = sys
        .find_pf(IGB_VENDOR, IGB_PF_DEVICE)
        .map_err(|e| format!("pf-found: {e}"))?;
    pass("pf-found", &format!("pf={pf}"));

    let t = Instant::now();
    let vfs = sys
        .create_vfs(&pf, args.numvfs)
        .map_err(|e| format!("vfs-created: {e}"))?;
    figure("sriov.vf_create", t.elapsed());
    if vfs.len() != args.numvfs as usize {
        return Err(format!(
            "vfs-created: asked for {} VFs, sysfs lists {vfs:?}",
            args.numvfs
        ));
    }
    let list: Vec<String> = vfs.iter().map(ToString::to_string).collect();
    pass(
        "vfs-created",
        &format!("n={} vfs={}", vfs.len(), list.join(",")),
    );
    let vf = vfs[0];

    let t = Instant::now();
    let bound = sys
        .bind_override(&vf, "vfio-pci")
        .map_err(|e| format!("vfio-bound: {e}"))?;
    figure("sriov.vfio_bind", t.elapsed());
    if bound.as_deref() != Some("vfio-pci") {
        return Err(format!(
            "vfio-bound: {vf} is bound to {bound:?} after driver_override"
        ));
    }
    let group = sys
        .iommu_group(&vf)
        .map_err(|e| format!("vfio-bound: {e}"))?;
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    if !node.exists() {
        return Err(format!("vfio-bound: {} missing", node.display()));
    }
    pass("vfio-bound", &format!("vf={vf} group={group}"));

    for phase in &args.phases {
        match phase {
            Phase::Prelaunch => prelaunch(args, &vf, vfs.get(1)).await?,
            Phase::Linux => linux(args, &vf).await?,
        }
    }
    // The VF stays with vfio-pci after the unplug: returning it to the pool is the executor's job.
    let after = sys.driver(&vf).map_err(|e| format!("vf-still-vfio: {e}"))?;
    if after.as_deref() != Some("vfio-pci") {
        return Err(format!("vf-still-vfio: driver is {after:?}"));
    }
    pass("vf-still-vfio", &format!("vf={vf}"));
    Ok(())
}

fn l2_lab(args: &AgentArgs) -> Lab {
    Lab {
        qemu: args.qemu.clone(),
        cache: args.workdir.clone(),
        kernel: args.l2_kernel.clone(),
        modules_dir: args.workdir.clone(),
        busybox: args.workdir.clone(),
    }
}

async fn start_l2(args: &AgentArgs, name: &str, cfg: &VmConfig) -> Step<(Vm, Qmp)> {
    let dir = args.workdir.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{name}: {}: {e}", dir.display()))?;
    let t = Instant::now();
    let vm = Vm::spawn(&l2_lab(args), cfg, &dir).map_err(|e| format!("{name}: spawn: {e}"))?;
    let qmp = connect_retry(&vm.qmp_socket(), Duration::from_secs(60))
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    figure(&format!("{name}.spawn_to_qmp"), t.elapsed());
    Ok((vm, qmp))
}

async fn prelaunch(args: &AgentArgs, vf: &PciAddress, other_vf: Option<&PciAddress>) -> Step<()> {
    let step = "l2-prelaunch";
    let cfg = VmConfig {
        prelaunch: true,
        memory_mb: 256,
        ..VmConfig::default()
    };
    let (mut vm, qmp) = start_l2(args, step, &cfg).await?;
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{step}: {what}: {err}");

    let t = Instant::now();
    qmp.device_add(&vfio_device(vf, "hostdev0", "rp1"))
        .await
        .map_err(|x| e("device_add vfio-pci", &x))?;
    figure("l2.prelaunch.vfio_device_add", t.elapsed());
    let ids = qmp.peripheral_ids().await.map_err(|x| e("qom-list", &x))?;
    if !ids.iter().any(|i| i == "hostdev0") {
        return Err(format!(
            "{step}: hostdev0 not in /machine/peripheral: {ids:?}"
        ));
    }

    // The same VF twice, and a VF not bound to vfio-pci: the errors the executor must tell apart.
    match qmp.device_add(&vfio_device(vf, "hostdev1", "rp2")).await {
        Err(QmpError::AlreadyAttached { .. }) => {}
        other => {
            return Err(format!(
                "{step}: second add of {vf}: expected AlreadyAttached, got {other:?}"
            ));
        }
    }
    if let Some(o) = other_vf {
        match qmp.device_add(&vfio_device(o, "hostdev2", "rp3")).await {
            Err(QmpError::VfioGroupOpen { .. }) => {}
            other => {
                return Err(format!(
                    "{step}: add of unbound {o}: expected VfioGroupOpen, got {other:?}"
                ));
            }
        }
    }

    let outcome = qmp
        .device_del_and_wait("hostdev0", Duration::from_secs(2))
        .await
        .map_err(|x| e("device_del", &x))?;
    if outcome != UnplugOutcome::Pending {
        return Err(format!(
            "{step}: unplug with no guest OS: expected Pending, got {outcome:?}"
        ));
    }
    let again = qmp
        .device_del("hostdev0")
        .await
        .map_err(|x| e("device_del again", &x))?;
    if again != DelOutcome::AlreadyPending {
        return Err(format!(
            "{step}: second device_del: expected AlreadyPending, got {again:?}"
        ));
    }
    let waiter = qmp.event_waiter(|ev| ev.is_device_deleted("hostdev0"));
    let t = Instant::now();
    qmp.system_reset()
        .await
        .map_err(|x| e("system_reset", &x))?;
    let ev = waiter
        .wait(Duration::from_secs(30))
        .await
        .map_err(|x| e("waiting", &x))?;
    if ev.is_none() {
        return Err(format!(
            "{step}: no DEVICE_DELETED within 30 s of system_reset"
        ));
    }
    figure("l2.prelaunch.reset_to_device_deleted", t.elapsed());

    // The VFIO group was released: the same VF can be attached again at once.
    let t = Instant::now();
    qmp.device_add(&vfio_device(vf, "hostdev0", "rp1"))
        .await
        .map_err(|x| e("re-add after reset", &x))?;
    figure("l2.prelaunch.vfio_readd", t.elapsed());
    vm.kill().await;
    pass(
        step,
        &format!("vf={vf} unplug=pending->system_reset->DEVICE_DELETED"),
    );
    Ok(())
}

async fn linux(args: &AgentArgs, vf: &PciAddress) -> Step<()> {
    let step = "l2-linux";
    let cfg = VmConfig {
        memory_mb: 256,
        kernel: Some(args.l2_kernel.clone()),
        initrd: Some(args.l2_initrd.clone()),
        ..VmConfig::default()
    };
    let (mut vm, qmp) = start_l2(args, step, &cfg).await?;
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{step}: {what}: {err}");
    let t = Instant::now();
    let ready = format!("{GUEST_PREFIX} READY");
    vm.wait_serial("L2 READY", Duration::from_secs(400), |l| {
        l.starts_with(&ready)
    })
    .await
    .map_err(|x| e("L2 boot", &x))?;
    figure("l2.linux.boot", t.elapsed());

    let t = Instant::now();
    qmp.device_add(&vfio_device(vf, "hostdev0", "rp1"))
        .await
        .map_err(|x| e("device_add vfio-pci", &x))?;
    figure("l2.linux.vfio_device_add", t.elapsed());
    let plus = format!("{GUEST_PREFIX} PCI+");
    let seen = vm
        .wait_serial("L2 sees the VF", Duration::from_secs(120), |l| {
            l.starts_with(&plus)
        })
        .await
        .map_err(|x| e("L2 enumeration", &x))?;
    figure("l2.linux.visible_in_guest", t.elapsed());
    if !seen.ends_with(&format!("{IGB_VENDOR}:{IGB_VF_DEVICE}")) {
        return Err(format!("{step}: L2 saw an unexpected device: {seen}"));
    }

    let t = Instant::now();
    let outcome = qmp
        .device_del_and_wait("hostdev0", Duration::from_secs(60))
        .await
        .map_err(|x| e("device_del", &x))?;
    if outcome != UnplugOutcome::Deleted {
        return Err(format!(
            "{step}: L2 did not acknowledge the unplug: {outcome:?}"
        ));
    }
    figure("l2.linux.unplug_to_device_deleted", t.elapsed());
    let minus = format!("{GUEST_PREFIX} PCI-");
    vm.wait_serial("L2 loses the VF", Duration::from_secs(60), |l| {
        l.starts_with(&minus)
    })
    .await
    .map_err(|x| e("L2 removal", &x))?;
    vm.kill().await;
    pass(
        step,
        &format!("vf={vf} guest={} unplug=DEVICE_DELETED", seen.trim()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AgentArgs, String> {
        AgentArgs::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse("").unwrap();
        assert_eq!(d.sysfs, PathBuf::from("/sys"));
        assert_eq!(d.phases, [Phase::Prelaunch]);
        let a = parse("--numvfs 3 --phases prelaunch,linux --sysfs /fake").unwrap();
        assert_eq!(a.numvfs, 3);
        assert_eq!(a.phases, [Phase::Prelaunch, Phase::Linux]);
        assert_eq!(a.sysfs, PathBuf::from("/fake"));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse("--numvfs").unwrap_err().contains("needs a value"));
        assert!(parse("--numvfs 0").is_err());
        assert!(parse("--phases warp").unwrap_err().contains("warp"));
        assert!(parse("--bogus 1").unwrap_err().contains("--bogus"));
    }
}
