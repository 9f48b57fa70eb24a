//! sriov tiers: an L1 guest (q35 + emulated VT-d + an `igb` PF) runs vfplug code built on this
//! host. Run with `make vm-test TIER=sriov` (prelaunch L2) or `TIER=sriov-full` (L2 Linux).

use std::path::Path;
use std::time::{Duration, Instant};

use vfplug_vmlab::agent::AGENT_PREFIX;
use vfplug_vmlab::guest::{self, L1_PREFIX, TAG_LAB, TAG_USR};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::timing::Figures;
use vfplug_vmlab::vm::{Virtfs, Vm, VmConfig};

/// The L1 VM: the lab's run directory shared as `lab`, the host's /usr read-only as `usr`.
fn l1_config(lab: &Lab, run: &Path, initrd: &Path, memory_mb: u32) -> VmConfig {
    VmConfig {
        memory_mb,
        smp: 2,
        intel_iommu: true,
        no_reboot: true,
        kernel: Some(lab.kernel.clone()),
        initrd: Some(initrd.to_path_buf()),
        // no_timer_check: under load, TCG can miss the early IO-APIC timer check, which with
        // interrupt remapping panics ("timer doesn't work through Interrupt-remapped IO-APIC").
        append: "intel_iommu=on iommu=pt no_timer_check".into(),
        virtfs: vec![
            Virtfs {
                path: "/usr".into(),
                tag: TAG_USR.into(),
                readonly: true,
            },
            Virtfs {
                path: run.to_path_buf(),
                tag: TAG_LAB.into(),
                readonly: false,
            },
        ],
        extra: [
            "-netdev",
            "user,id=pfnet",
            "-device",
            "igb,bus=rp1,netdev=pfnet,id=pf0",
        ]
        .map(String::from)
        .to_vec(),
        ..VmConfig::default()
    }
}

/// Stages the run directory L1 sees as /lab (the agent, L2's kernel and initramfs, run.sh), boots L1,
/// and returns the agent's report lines once L1 has powered off.
async fn run_l1(
    lab: &Lab,
    phases: &str,
    memory_mb: u32,
    budget: Duration,
) -> (Vec<String>, Figures) {
    let run = tempfile::tempdir().expect("run dir");
    let vmdir = tempfile::tempdir().expect("vm dir");
    let agent = env!("CARGO_BIN_EXE_vmlab-guest-agent");
    std::fs::copy(agent, run.path().join("vmlab-guest-agent")).expect("copy agent");
    std::fs::copy(&lab.kernel, run.path().join("vmlinuz")).expect("copy kernel");
    let l2 = guest::hotplug_guest(lab).expect("L2 image");
    std::fs::write(run.path().join("l2.cpio"), l2).expect("write L2 image");
    // Runs chrooted in L1 with the host's /usr: the agent is this checkout's build, unchanged.
    let script = format!(
        "echo \"{AGENT_PREFIX} START $(uname -r)\"\n\
         exec /lab/vmlab-guest-agent --numvfs 2 --phases {phases} \\\n\
         --l2-kernel /lab/vmlinuz --l2-initrd /lab/l2.cpio --workdir /tmp/vmlab-l2\n"
    );
    std::fs::write(run.path().join("run.sh"), script).expect("write run.sh");
    let initrd = vmdir.path().join("l1.cpio");
    std::fs::write(&initrd, guest::l1_guest(lab).expect("L1 image")).expect("write L1 image");

    let mut f = Figures::default();
    let t0 = Instant::now();
    let cfg = l1_config(lab, run.path(), &initrd, memory_mb);
    let mut vm = Vm::spawn(lab, &cfg, vmdir.path()).expect("spawn L1");
    let ready = format!("{L1_PREFIX} READY");
    vm.wait_serial("L1 READY", Duration::from_secs(180), |l| {
        l.starts_with(&ready)
    })
    .await
    .expect("L1 boots");
    f.record("sriov.l1_boot_to_ready", t0.elapsed());
    let exit = format!("{L1_PREFIX} EXIT");
    let done = vm
        .wait_serial("L1 agent finished", budget, |l| l.starts_with(&exit))
        .await;
    f.record("sriov.l1_total", t0.elapsed());
    let serial = vm.serial_text();
    if let Err(e) = done {
        panic!("L1 run did not finish: {e}");
    }
    let lines: Vec<String> = serial
        .lines()
        .filter(|l| l.starts_with(AGENT_PREFIX))
        .map(String::from)
        .collect();
    for l in &lines {
        println!("{l}");
        if let Some(rest) = l.strip_prefix(&format!("{AGENT_PREFIX} FIGURE ")) {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(ms)) = (it.next(), it.next().and_then(|v| v.parse().ok())) {
                f.record_ms(name, ms);
            }
        }
    }
    // Power-off is QEMU's exit; do not leave it running if it hangs.
    if vm.wait_exit(Duration::from_secs(30)).await.is_err() {
        vm.kill().await;
    }
    (lines, f)
}

fn assert_passed(lines: &[String], steps: &[&str]) {
    let report = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("{AGENT_PREFIX} DONE ok=true")),
        "agent reported failure:\n{report}"
    );
    for s in steps {
        let p = format!("{AGENT_PREFIX} PASS {s} ");
        assert!(
            lines.iter().any(|l| l.starts_with(&p)),
            "no PASS line for {s}:\n{report}"
        );
    }
}

/// Fast variant: L2 stays in prelaunch; the unplug is completed by `system_reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vf_created_bound_and_hotplugged_into_prelaunch_l2() {
    let Gate::Run(lab) = gate(Tier::Sriov) else {
        return;
    };
    let (lines, f) = run_l1(&lab, "prelaunch", 1024, Duration::from_secs(300)).await;
    assert_passed(
        &lines,
        &[
            "pf-found",
            "vfs-created",
            "vfio-bound",
            "l2-prelaunch",
            "vf-still-vfio",
        ],
    );
    println!("{}", f.table());
}

/// Full variant: L2 boots Linux (TCG inside TCG, ~1.5 min) and acknowledges the unplug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vf_unplug_is_acknowledged_by_l2_linux() {
    let Gate::Run(lab) = gate(Tier::SriovFull) else {
        return;
    };
    let (lines, f) = run_l1(&lab, "linux", 1536, Duration::from_secs(900)).await;
    assert_passed(
        &lines,
        &[
            "pf-found",
            "vfs-created",
            "vfio-bound",
            "l2-linux",
            "vf-still-vfio",
        ],
    );
    println!("{}", f.table());
}
