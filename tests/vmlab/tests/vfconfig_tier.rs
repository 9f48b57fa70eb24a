//! sriov tier, VF settings: the L1 guest's igb PF, with real VFs, configured through
//! vfplug-host's rtnetlink (`RtVfNetlink`) and VF policy (`vfset`), by the guest agent's
//! `vfconfig` phase. Run with `make vm-test TIER=sriov`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vfplug_vmlab::agent::AGENT_PREFIX;
use vfplug_vmlab::l1::{self, L1Run};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::timing::Figures;

/// Boots L1 with the agent in `vfconfig` mode; returns its report lines and the figures.
async fn run_vfconfig(lab: &Lab) -> (Vec<String>, Figures) {
    let run = tempfile::tempdir().expect("run dir");
    let vmdir = tempfile::tempdir().expect("vm dir");
    let r = L1Run {
        agent: env!("CARGO_BIN_EXE_vmlab-guest-agent").into(),
        agent_args: "--numvfs 2 --phases vfconfig --workdir /tmp/vmlab-l2".into(),
        binaries: Vec::new(),
        stage_l2: false,
        memory_mb: 1024,
        budget: Duration::from_secs(300),
        total_figure: "vfcfg.l1_total",
    };
    l1::run_l1(lab, run.path(), vmdir.path(), &r)
        .await
        .unwrap_or_else(|e| panic!("L1 run did not finish: {e}"))
}

/// The detail of step `step`'s PASS line; fails the test (with the whole report) if absent.
fn passed<'a>(lines: &'a [String], step: &str) -> &'a str {
    let p = format!("{AGENT_PREFIX} PASS {step} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&p))
        .unwrap_or_else(|| panic!("no PASS line for {step}:\n{}", lines.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vf_settings_applied_checked_and_restored_on_igb() {
    let Gate::Run(lab) = gate(Tier::Sriov) else {
        return;
    };
    let (lines, f) = run_vfconfig(&lab).await;
    let report = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("{AGENT_PREFIX} DONE ok=true")),
        "agent reported failure:\n{report}"
    );
    passed(&lines, "pf-found");
    passed(&lines, "vfs-created");
    passed(&lines, "vfcfg-pf-up");

    // A fresh igb VF: no MAC, no VLAN, spoof checking on, not trusted; the kernel presets link
    // state "auto" and igb never overwrites it.
    let read = passed(&lines, "vfcfg-read");
    assert!(read.contains("vfs=[0, 1]"), "{read}");
    assert!(
        read.contains(
            "mac=00:00:00:00:00:00 vlan=0 qos=0 proto=802.1q spoofchk=true trust=false \
             link_state=auto rate=0/0"
        ),
        "{read}"
    );
    // igb has no ndo_set_vf_link_state: EOPNOTSUPP, skipped with a warning.
    let apply = passed(&lines, "vfcfg-apply");
    assert!(
        apply.contains("link_state: ") && apply.contains("not supported"),
        "{apply}"
    );
    let check = passed(&lines, "vfcfg-check");
    assert!(
        check.contains(
            "mac=02:00:00:00:01:01 vlan=100 qos=3 proto=802.1q spoofchk=false trust=true \
             link_state=auto rate=0/100"
        ),
        "{check}"
    );
    // The host's iproute2 runs in L1 (its /usr is L1's root), so this is never skipped here.
    let ip = passed(&lines, "vfcfg-iproute2");
    assert!(ip.contains("vlan 100, qos 3"), "{ip}");
    let ad = passed(&lines, "vfcfg-8021ad");
    assert!(ad.contains("802.1ad"), "{ad}");
    passed(&lines, "vfcfg-nosuchvf");
    let restored = passed(&lines, "vfcfg-restore");
    assert!(
        restored
            .contains("mac=00:00:00:00:00:00 vlan=0 qos=0 proto=802.1q spoofchk=true trust=false"),
        "{restored}"
    );
    assert!(
        restored.contains("line="),
        "iproute2 not consulted: {restored}"
    );
    for name in ["vfcfg.apply_all_knobs", "vfcfg.restore", "vfcfg.read_all"] {
        assert!(f.get(name).is_some(), "figure {name} missing:\n{report}");
    }
    println!("{}", f.table());
}
