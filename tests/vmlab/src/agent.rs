//! The guest agent's logic: what `vmlab-guest-agent` does inside the L1 guest, against a real
//! kernel with real SR-IOV and VFIO: it creates VFs with the lab's own sysfs steps
//! ([`crate::sriov`]; vfplug does not create VFs), binds one to vfio-pci with vfplug-host's
//! `SysfsDriverBinder`, hot-plugs it through vfplug-qmp, and reports on stdout (L1's serial
//! console) with one line per result:
//!
//! * `VMLAB-AGENT PASS <step> k=v ...` / `VMLAB-AGENT FAIL <step>: <error>`
//! * `VMLAB-AGENT FIGURE <name> <ms>` (also printed as `VMLAB FIGURE` by the host test)
//! * `VMLAB-AGENT DONE ok=<true|false>` last.
//!
//! The host tests (`tests/sriov_tier.rs`, `tests/vfconfig_tier.rs`) check those lines; the agent
//! itself never decides whether the test passed beyond reporting each step.
//!
//! The `vfconfig` phase drives vfplug-host's real rtnetlink ([`RtVfNetlink`]) and its VF policy
//! ([`vfset`]) against igb's PF: apply every sriov-cni knob, read back, compare with what
//! iproute2 prints, check igb's refusals, restore, read back equal to the saved state.
//!
//! The `vfplugd` phase ([`crate::plugd`]) runs the real vfplugd and the real `vfplug` CNI binary
//! on the VFs (created with autoprobe on for it, so igbvf has them, as on a default node).
//!
//! The `vmpod` and `vmpod-linux` phases ([`crate::vmpod`]) make L2 a VM pod: its QMP socket in a
//! pod volume under vfplugd's kubelet dir; vfplugd hot-plugs a VF into it through the CNI binary.
//! `VMLAB-AGENT SAY <text>` lines narrate those phases for a human (the demo).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfplug_core::pci::PciAddress;
use vfplug_qmp::{DelOutcome, Qmp, QmpError, UnplugOutcome};

use vfplug_core::{MacAddr, VfConfig, VfLinkState, VlanProto};
use vfplug_host::driver::{DriverBinder, SysfsDriverBinder};
use vfplug_host::net::{NetError, VfChange, VfNetlink, VfSettings};
use vfplug_host::rtnl::RtVfNetlink;
use vfplug_host::vfset;

use crate::guest::GUEST_PREFIX;
use crate::lab::Lab;
use crate::plugd::{self, Binaries};
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

/// Which phases run once the VFs exist and VF0 is bound to vfio-pci.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// L2 in prelaunch (`-S`): hotplug, pending unplug, `system_reset` completes it.
    Prelaunch,
    /// L2 boots Linux, which acknowledges the unplug.
    Linux,
    /// VF settings through the PF with vfplug-host's rtnetlink, on the last VF (no L2).
    VfConfig,
    /// The real vfplugd and `vfplug` CNI binary on VF 0 (netdev pool) and VF 1 (vfio pool).
    Vfplugd,
    /// L2 in prelaunch as a VM pod: vfplugd hot-plugs a VF through the CNI binary; a DEL left
    /// pending, vfplugd SIGKILLed, `system_reset`, the restart finishes the removal; then the
    /// attach again for each further `--vmpod-ram-mb`.
    VmPod,
    /// L2 boots Linux as a VM pod: the lab's own hotplug (as [`Phase::Linux`]), then vfplugd's
    /// hotplug through the CNI binary and a DEL that the guest's acknowledgement finalizes.
    VmPodLinux,
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
    /// The host-built vfplugd and `vfplug` CNI binary (for [`Phase::Vfplugd`]).
    pub plugd: Binaries,
    /// L2's RAM for each attach of [`Phase::VmPod`], in MiB (the first VFIO device pins it all).
    pub vmpod_ram_mb: Vec<u32>,
}

impl AgentArgs {
    /// Parses `--sysfs P --numvfs N --qemu P --workdir P --l2-kernel P --l2-initrd P
    /// --phases prelaunch,linux,vfconfig,vfplugd,vmpod,vmpod-linux --vmpod-ram-mb 256,512` (all
    /// optional; defaults suit the L1 guest).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<AgentArgs, String> {
        let mut a = AgentArgs {
            sysfs: "/sys".into(),
            numvfs: 2,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            workdir: "/tmp/vmlab-l2".into(),
            l2_kernel: "/lab/vmlinuz".into(),
            l2_initrd: "/lab/l2.cpio".into(),
            phases: vec![Phase::Prelaunch],
            plugd: Binaries {
                vfplugd: "/lab/vfplugd".into(),
                cni: "/lab/vfplug".into(),
            },
            vmpod_ram_mb: vec![256, 512],
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
                "--vfplugd" => a.plugd.vfplugd = v.into(),
                "--cni" => a.plugd.cni = v.into(),
                "--phases" => {
                    a.phases = v
                        .split(',')
                        .map(|p| match p {
                            "prelaunch" => Ok(Phase::Prelaunch),
                            "linux" => Ok(Phase::Linux),
                            "vfconfig" => Ok(Phase::VfConfig),
                            "vfplugd" => Ok(Phase::Vfplugd),
                            "vmpod" => Ok(Phase::VmPod),
                            "vmpod-linux" => Ok(Phase::VmPodLinux),
                            other => Err(format!("unknown phase {other:?}")),
                        })
                        .collect::<Result<_, _>>()?
                }
                "--vmpod-ram-mb" => {
                    a.vmpod_ram_mb = v
                        .split(',')
                        .map(|m| match m.parse::<u32>() {
                            Ok(n) if n >= 64 => Ok(n),
                            _ => Err(format!("--vmpod-ram-mb: {m:?} is not a size >= 64 (MiB)")),
                        })
                        .collect::<Result<_, _>>()?
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if a.numvfs == 0 {
            return Err("--numvfs must be at least 1".into());
        }
        if a.vmpod_ram_mb.is_empty() {
            return Err("--vmpod-ram-mb needs at least one size".into());
        }
        Ok(a)
    }
}

/// Result of one step, for the report line.
type Step<T> = Result<T, String>;

pub(crate) fn figure(name: &str, d: Duration) {
    println!(
        "{AGENT_PREFIX} FIGURE {name} {:.1}",
        d.as_secs_f64() * 1000.0
    );
}

pub(crate) fn pass(step: &str, detail: &str) {
    println!("{AGENT_PREFIX} PASS {step} {detail}");
}

/// A line for a human following the run (the demo prints these with their time).
pub(crate) fn say(text: &str) {
    println!("{AGENT_PREFIX} SAY {text}");
}

/// [`Vm::wait_serial`], with a `SAY` progress line every 10 s (`<label>… 40 s`): slow TCG boots
/// must not look like a hang to a human.
pub(crate) async fn wait_serial_progress(
    vm: &mut Vm,
    what: &str,
    total: Duration,
    label: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<String, crate::LabError> {
    let t = Instant::now();
    loop {
        let left = total.saturating_sub(t.elapsed());
        match vm
            .wait_serial(what, left.min(Duration::from_secs(10)), &pred)
            .await
        {
            Err(crate::LabError::Timeout { .. }) if t.elapsed() < total => {
                say(&format!("{label}… {} s", t.elapsed().as_secs()));
            }
            r => return r,
        }
    }
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

    // The L2 phases want VF 0 driverless for vfio-pci; vfplugd wants them on igbvf, as a node
    // with the default autoprobe has them.
    let l2 = args.phases.iter().any(|p| {
        matches!(
            p,
            Phase::Prelaunch | Phase::Linux | Phase::VmPod | Phase::VmPodLinux
        )
    });
    let autoprobe = args.phases.contains(&Phase::Vfplugd);
    let t = Instant::now();
    let vfs = sys
        .create_vfs(&pf, args.numvfs, autoprobe)
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
        &format!(
            "n={} vfs={} autoprobe={autoprobe}",
            vfs.len(),
            list.join(",")
        ),
    );
    let vf = vfs[0];
    // Only the L2 phases want VF 0 on vfio-pci before they start; vfplugd binds its own.
    if l2 {
        bind_vf0(args, &sys, &vf)?;
    }

    for phase in &args.phases {
        match phase {
            Phase::Prelaunch => prelaunch(args, &vf, vfs.get(1)).await?,
            Phase::Linux => linux(args, &vf).await?,
            Phase::VfConfig => vf_config(&sys, &pf, args.numvfs - 1)?,
            Phase::Vfplugd => plugd::run(&sys, &pf, &vfs, &args.plugd).await?,
            Phase::VmPod => crate::vmpod::run(args, &sys, &pf, &vfs, false).await?,
            Phase::VmPodLinux => crate::vmpod::run(args, &sys, &pf, &vfs, true).await?,
        }
    }
    if !l2 {
        return Ok(());
    }
    // The VF stays with vfio-pci after the unplug: returning it to the pool is the executor's job.
    let after = sys.driver(&vf).map_err(|e| format!("vf-still-vfio: {e}"))?;
    if after.as_deref() != Some("vfio-pci") {
        return Err(format!("vf-still-vfio: driver is {after:?}"));
    }
    pass("vf-still-vfio", &format!("vf={vf}"));
    Ok(())
}

/// VF 0 onto vfio-pci with vfplug-host's binder, for the L2 phases.
fn bind_vf0(args: &AgentArgs, sys: &Sysfs, vf: &PciAddress) -> Step<()> {
    // vfplug-host's binder, the one vfplugd binds vfio pools with: driver_override, unbind,
    // drivers_probe, and the driver read back (a probe that did not take is an error).
    let t = Instant::now();
    SysfsDriverBinder::new(args.sysfs.clone())
        .bind_vfio(*vf)
        .map_err(|e| format!("vfio-bound: {e}"))?;
    figure("sriov.vfio_bind", t.elapsed());
    let group = sys
        .iommu_group(vf)
        .map_err(|e| format!("vfio-bound: {e}"))?;
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    if !node.exists() {
        return Err(format!("vfio-bound: {} missing", node.display()));
    }
    pass("vfio-bound", &format!("vf={vf} group={group}"));
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

pub(crate) async fn start_l2(args: &AgentArgs, name: &str, cfg: &VmConfig) -> Step<(Vm, Qmp)> {
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

/// L2's tiny Linux guest (256 MiB), booted with `port_prefix` root ports and `extra` QEMU
/// arguments; returns once the guest says READY (TCG inside TCG: about two minutes).
pub(crate) async fn boot_l2_linux(
    args: &AgentArgs,
    step: &str,
    port_prefix: &str,
    extra: Vec<String>,
) -> Step<(Vm, Qmp)> {
    let cfg = VmConfig {
        memory_mb: 256,
        kernel: Some(args.l2_kernel.clone()),
        initrd: Some(args.l2_initrd.clone()),
        port_prefix: port_prefix.into(),
        extra,
        ..VmConfig::default()
    };
    let (mut vm, qmp) = start_l2(args, step, &cfg).await?;
    let t = Instant::now();
    let ready = format!("{GUEST_PREFIX} READY");
    say("booting L2 Linux (TCG inside TCG: about two minutes)");
    wait_serial_progress(
        &mut vm,
        "L2 READY",
        Duration::from_secs(400),
        "still booting L2",
        |l| l.starts_with(&ready),
    )
    .await
    .map_err(|x| format!("{step}: L2 boot: {x}"))?;
    figure("l2.linux.boot", t.elapsed());
    say(&format!(
        "L2 Linux is up after {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    Ok((vm, qmp))
}

async fn linux(args: &AgentArgs, vf: &PciAddress) -> Step<()> {
    let step = "l2-linux";
    let (mut vm, qmp) = boot_l2_linux(args, step, "rp", Vec::new()).await?;
    linux_direct(&mut vm, &qmp, vf, "rp1").await?;
    vm.kill().await;
    Ok(())
}

/// The lab's own hotplug into a running L2 Linux through vfplug-qmp (not vfplugd): VF `vf` as
/// `hostdev0` into `port`, seen by the guest, unplugged with the guest's acknowledgement.
/// Leaves L2 running, its serial consumed up to the guest's removal line.
pub(crate) async fn linux_direct(vm: &mut Vm, qmp: &Qmp, vf: &PciAddress, port: &str) -> Step<()> {
    let step = "l2-linux";
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{step}: {what}: {err}");
    let t = Instant::now();
    qmp.device_add(&vfio_device(vf, "hostdev0", port))
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
    pass(
        step,
        &format!("vf={vf} guest={} unplug=DEVICE_DELETED", seen.trim()),
    );
    Ok(())
}

/// The settings the `vfconfig` phase applies: every sriov-cni knob (802.1Q VLAN).
pub fn vfconfig_request() -> VfConfig {
    VfConfig {
        mac: Some(MacAddr([0x02, 0, 0, 0, 0x01, 0x01])),
        vlan: Some(100),
        vlan_qos: Some(3),
        vlan_proto: Some(VlanProto::Dot1Q),
        spoofchk: Some(false),
        trust: Some(true),
        link_state: Some(VfLinkState::Enable),
        min_tx_rate: None,
        max_tx_rate: Some(100),
        mtu: None,
    }
}

/// One line for a report: `mac=… vlan=… qos=… proto=… spoofchk=… trust=… link_state=… rate=min/max`.
pub fn describe(s: &VfSettings) -> String {
    let b = |v: Option<bool>| v.map_or("unreported".to_owned(), |b| b.to_string());
    let l = s
        .link_state
        .map_or("unreported".to_owned(), |l| l.to_string());
    format!(
        "mac={} vlan={} qos={} proto={} spoofchk={} trust={} link_state={l} rate={}/{}",
        s.mac,
        s.vlan,
        s.qos,
        s.vlan_proto,
        b(s.spoofchk),
        b(s.trust),
        s.min_tx_rate,
        s.max_tx_rate
    )
}

/// The `vf N ...` line of `ip link show <pf>` output, trimmed.
pub fn iproute2_vf_line(output: &str, vf: u32) -> Option<&str> {
    let want = format!("vf {vf} ");
    output.lines().map(str::trim).find(|l| l.starts_with(&want))
}

/// Where iproute2's VF line disagrees with `s` (empty: it agrees). iproute2 prints the fields
/// comma-separated and leaves out a zero VLAN/QoS/rate and unreported flags.
pub fn iproute2_mismatches(line: &str, s: &VfSettings) -> Vec<String> {
    let fields: Vec<&str> = line.split(", ").map(str::trim).collect();
    let first = fields.first().copied().unwrap_or_default();
    let mut out = Vec::new();
    if !first.contains(&format!("link/ether {}", s.mac)) {
        out.push(format!("MAC {} not in {first:?}", s.mac));
    }
    // A non-zero value must be printed as exactly this field; a zero one not at all.
    let mut number = |value: u32, prefix: &str, suffix: &str| {
        let want = format!("{prefix} {value}{suffix}");
        let found: Vec<&&str> = fields
            .iter()
            .filter(|f| {
                f.strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix(' '))
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .collect();
        let ok = if value == 0 {
            found.is_empty()
        } else {
            found.len() == 1 && **found[0] == want
        };
        if !ok {
            out.push(format!("want {want:?}, iproute2 has {found:?}"));
        }
    };
    number(u32::from(s.vlan), "vlan", "");
    number(u32::from(s.qos), "qos", "");
    number(s.max_tx_rate, "max_tx_rate", "Mbps");
    number(s.min_tx_rate, "min_tx_rate", "Mbps");
    let mut expect = |present: bool, field: String| {
        let has = fields.iter().any(|f| *f == field);
        if present != has {
            out.push(format!(
                "{} {field:?}",
                if present { "missing" } else { "unexpected" }
            ));
        }
    };
    expect(
        s.vlan_proto == VlanProto::Dot1Ad,
        "vlan protocol 802.1ad".to_owned(),
    );
    if let Some(b) = s.spoofchk {
        expect(
            true,
            format!("spoof checking {}", if b { "on" } else { "off" }),
        );
    }
    if let Some(b) = s.trust {
        expect(true, format!("trust {}", if b { "on" } else { "off" }));
    }
    if let Some(l) = s.link_state {
        expect(true, format!("link-state {l}"));
    }
    out
}

/// `ip` from the L1 root (the host's iproute2 over 9p), if there is one.
fn ip_binary() -> Option<PathBuf> {
    ["/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run_ip(ip: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(ip)
        .args(args)
        .output()
        .map_err(|e| format!("{} {args:?}: {e}", ip.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Compares iproute2's view of VF `vf` with `want`; `Ok(None)` when there is no iproute2.
fn iproute2_agrees(pf_dev: &str, vf: u32, want: &VfSettings) -> Step<Option<String>> {
    let Some(ip) = ip_binary() else {
        return Ok(None);
    };
    let out = run_ip(&ip, &["link", "show", "dev", pf_dev])?;
    let line = iproute2_vf_line(&out, vf)
        .ok_or_else(|| format!("no `vf {vf}` line in `ip link show {pf_dev}`:\n{out}"))?;
    let bad = iproute2_mismatches(line, want);
    if bad.is_empty() {
        Ok(Some(line.to_owned()))
    } else {
        Err(format!("{}; line: {line:?}", bad.join("; ")))
    }
}

pub(crate) fn pf_netdev(sys: &Sysfs, pf: &PciAddress) -> Step<String> {
    let dir = sys.device(pf).join("net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no netdev", dir.display()))
}

/// Brings the PF up and waits for carrier: igb takes a VF rate limit only with the link up.
fn pf_up(sys: &Sysfs, pf: &PciAddress, pf_dev: &str) -> Step<()> {
    let ip = ip_binary().ok_or("no iproute2 in L1 to bring the PF up")?;
    run_ip(&ip, &["link", "set", "dev", pf_dev, "up"])?;
    let carrier = sys.device(pf).join("net").join(pf_dev).join("carrier");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::read_to_string(&carrier).is_ok_and(|c| c.trim() == "1") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{pf_dev}: no carrier after 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vf_config(sys: &Sysfs, pf: &PciAddress, vf: u32) -> Step<()> {
    let pf_dev = pf_netdev(sys, pf).map_err(|e| format!("vfcfg-pf-up: {e}"))?;
    let t = Instant::now();
    pf_up(sys, pf, &pf_dev).map_err(|e| format!("vfcfg-pf-up: {e}"))?;
    figure("vfcfg.pf_up_to_carrier", t.elapsed());
    pass("vfcfg-pf-up", &format!("pf={pf} netdev={pf_dev}"));

    let nl = RtVfNetlink::new().map_err(|e| format!("vfcfg-read: {e}"))?;
    let t = Instant::now();
    let all = nl
        .read_all(&pf_dev)
        .map_err(|e| format!("vfcfg-read: {e}"))?;
    figure("vfcfg.read_all", t.elapsed());
    let ids: Vec<u32> = all.iter().map(|(i, _)| *i).collect();
    if !ids.contains(&vf) {
        return Err(format!(
            "vfcfg-read: {pf_dev} reports VFs {ids:?}, not {vf}"
        ));
    }
    let before = nl
        .read_vf(&pf_dev, vf)
        .map_err(|e| format!("vfcfg-read: {e}"))?;
    let saved = vfset::saved_from(&before);
    pass(
        "vfcfg-read",
        &format!("vf={vf} vfs={ids:?} {}", describe(&before)),
    );

    let cfg = vfconfig_request();
    let t = Instant::now();
    let report = vfset::apply_vf_config(&nl, &pf_dev, vf, &cfg, &saved)
        .map_err(|e| format!("vfcfg-apply: {e}"))?;
    figure("vfcfg.apply_all_knobs", t.elapsed());
    // igb has no ndo_set_vf_link_state: the one knob that must be skipped, and only that one.
    let knobs: Vec<&str> = report
        .skipped
        .iter()
        .filter_map(|s| s.split(':').next())
        .collect();
    if knobs != ["link_state"] {
        return Err(format!(
            "vfcfg-apply: expected only link_state skipped (EOPNOTSUPP on igb), got {:?}",
            report.skipped
        ));
    }
    pass(
        "vfcfg-apply",
        &format!("skipped={:?}", report.skipped.join("; ")),
    );

    let now = nl
        .read_vf(&pf_dev, vf)
        .map_err(|e| format!("vfcfg-check: {e}"))?;
    let diff = vfset::check_vf_config(&now, &cfg, &report.skipped);
    if !diff.is_empty() {
        return Err(format!("vfcfg-check: {}", diff.join("; ")));
    }
    pass("vfcfg-check", &describe(&now));
    match iproute2_agrees(&pf_dev, vf, &now).map_err(|e| format!("vfcfg-iproute2: {e}"))? {
        Some(line) => pass("vfcfg-iproute2", &format!("applied line={line:?}")),
        None => pass("vfcfg-iproute2", "skipped=no-iproute2-in-L1"),
    }

    // 802.1ad: igb answers EPROTONOSUPPORT; a VLAN is never optional, so the apply fails and
    // the VF keeps what it had.
    let ad = VfConfig {
        vlan: Some(200),
        vlan_proto: Some(VlanProto::Dot1Ad),
        ..VfConfig::default()
    };
    match vfset::apply_vf_config(&nl, &pf_dev, vf, &ad, &saved) {
        Err(e) if e.knob == "vlan" && e.error.is_not_supported() && e.rollback.is_empty() => {
            let after = nl
                .read_vf(&pf_dev, vf)
                .map_err(|e| format!("vfcfg-8021ad: {e}"))?;
            if after != now {
                return Err(format!(
                    "vfcfg-8021ad: VF changed by a refused apply: {}",
                    describe(&after)
                ));
            }
            pass(
                "vfcfg-8021ad",
                &format!("refused={:?}", e.error.to_string()),
            );
        }
        other => {
            return Err(format!(
                "vfcfg-8021ad: expected the vlan knob NotSupported, got {other:?}"
            ));
        }
    }

    // A VF index the PF does not have: igb says EINVAL, which RtVfNetlink must tell apart.
    let missing = vf + 8;
    let read = nl.read_vf(&pf_dev, missing);
    let set = nl.set_vf(&pf_dev, missing, VfChange::Trust(true));
    match (&read, &set) {
        (Err(NetError::NoSuchVf { .. }), Err(NetError::NoSuchVf { .. })) => {
            pass("vfcfg-nosuchvf", &format!("vf={missing}"));
        }
        _ => {
            return Err(format!(
                "vfcfg-nosuchvf: expected NoSuchVf twice, got {read:?} / {set:?}"
            ));
        }
    }

    let t = Instant::now();
    vfset::restore_vf_config(&nl, &pf_dev, vf, &saved, &cfg, &report.skipped).map_err(|errs| {
        let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
        format!("vfcfg-restore: {}", list.join("; "))
    })?;
    figure("vfcfg.restore", t.elapsed());
    let after = nl
        .read_vf(&pf_dev, vf)
        .map_err(|e| format!("vfcfg-restore: {e}"))?;
    if after != before {
        return Err(format!(
            "vfcfg-restore: VF differs from the saved state: before {} / after {}",
            describe(&before),
            describe(&after)
        ));
    }
    match iproute2_agrees(&pf_dev, vf, &after).map_err(|e| format!("vfcfg-restore: {e}"))? {
        Some(line) => pass(
            "vfcfg-restore",
            &format!("{} line={line:?}", describe(&after)),
        ),
        None => pass("vfcfg-restore", &describe(&after)),
    }
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
        let a = parse("--numvfs 3 --phases prelaunch,linux,vfconfig --sysfs /fake").unwrap();
        assert_eq!(a.numvfs, 3);
        assert_eq!(a.phases, [Phase::Prelaunch, Phase::Linux, Phase::VfConfig]);
        assert_eq!(a.sysfs, PathBuf::from("/fake"));
        assert_eq!(d.vmpod_ram_mb, [256, 512]);
        let v = parse("--phases vmpod,vmpod-linux --vmpod-ram-mb 512,2048").unwrap();
        assert_eq!(v.phases, [Phase::VmPod, Phase::VmPodLinux]);
        assert_eq!(v.vmpod_ram_mb, [512, 2048]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse("--numvfs").unwrap_err().contains("needs a value"));
        assert!(parse("--numvfs 0").is_err());
        assert!(parse("--phases warp").unwrap_err().contains("warp"));
        assert!(parse("--bogus 1").unwrap_err().contains("--bogus"));
        assert!(parse("--vmpod-ram-mb 256,x").unwrap_err().contains("\"x\""));
        assert!(parse("--vmpod-ram-mb 32").is_err());
    }
    /// `ip link show` of a PF as iproute2 6.1 prints it (one VF configured, one fresh).
    const IP_LINK: &str = "2: enp1s0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc mq state UP mode DEFAULT group default qlen 1000
    link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff
    vf 0     link/ether 00:00:00:00:00:00 brd ff:ff:ff:ff:ff:ff, spoof checking on, link-state auto, trust off
    vf 1     link/ether 02:00:00:00:01:01 brd ff:ff:ff:ff:ff:ff, vlan 100, qos 3, tx rate 100 (Mbps), max_tx_rate 100Mbps, spoof checking off, link-state auto, trust on
";

    fn applied() -> VfSettings {
        VfSettings {
            mac: MacAddr([0x02, 0, 0, 0, 0x01, 0x01]),
            vlan: 100,
            qos: 3,
            vlan_proto: VlanProto::Dot1Q,
            spoofchk: Some(false),
            trust: Some(true),
            link_state: Some(VfLinkState::Auto),
            min_tx_rate: 0,
            max_tx_rate: 100,
        }
    }

    #[test]
    fn iproute2_vf_lines_are_compared_field_by_field() {
        let l1 = iproute2_vf_line(IP_LINK, 1).unwrap();
        assert!(l1.starts_with("vf 1 "));
        assert_eq!(iproute2_mismatches(l1, &applied()), Vec::<String>::new());
        let fresh = VfSettings {
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(VfLinkState::Auto),
            ..VfSettings::default()
        };
        let l0 = iproute2_vf_line(IP_LINK, 0).unwrap();
        assert_eq!(iproute2_mismatches(l0, &fresh), Vec::<String>::new());
        // Each disagreement is found: VLAN 1000 is not VLAN 100, a rate that should be gone is
        // reported, and another MAC is noticed.
        let mut other = applied();
        other.vlan = 1000;
        assert_eq!(iproute2_mismatches(l1, &other).len(), 1);
        assert_eq!(
            iproute2_mismatches(l1, &fresh).len(),
            6,
            "{:?}",
            iproute2_mismatches(l1, &fresh)
        );
        assert!(iproute2_vf_line(IP_LINK, 2).is_none());
    }

    #[test]
    fn vfconfig_request_is_valid_and_described() {
        let c = vfconfig_request();
        assert!(c.validate().is_ok());
        assert_eq!(
            describe(&applied()),
            "mac=02:00:00:00:01:01 vlan=100 qos=3 proto=802.1q spoofchk=false trust=true \
             link_state=auto rate=0/100"
        );
    }
}
