//! sriov tier: an L1 guest (q35 + emulated VT-d + an `igb` PF) runs vfplug code built on this
//! host. Run with `make vm-test TIER=sriov` (prelaunch L2). The full tier's L2 Linux run (the
//! lab's own hotplug and vfplugd's, on one L2 boot) is `vmpod_tier.rs`.

use std::time::Duration;

use vfplug_vmlab::agent::AGENT_PREFIX;
use vfplug_vmlab::l1::{self, L1Run};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::timing::Figures;

/// Boots L1 with the agent running `phases` (L2 staged), returns its report lines and figures.
async fn run_l1(
    lab: &Lab,
    phases: &str,
    memory_mb: u32,
    budget: Duration,
) -> (Vec<String>, Figures) {
    let run = tempfile::tempdir().expect("run dir");
    let vmdir = tempfile::tempdir().expect("vm dir");
    let r = L1Run {
        agent: env!("CARGO_BIN_EXE_vmlab-guest-agent").into(),
        agent_args: format!(
            "--numvfs 2 --phases {phases} --l2-kernel /lab/vmlinuz --l2-initrd /lab/l2.cpio \
             --workdir /tmp/vmlab-l2"
        ),
        binaries: Vec::new(),
        stage_l2: true,
        memory_mb,
        budget,
        total_figure: "sriov.l1_total",
    };
    l1::run_l1(lab, run.path(), vmdir.path(), &r)
        .await
        .unwrap_or_else(|e| panic!("L1 run did not finish: {e}"))
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
