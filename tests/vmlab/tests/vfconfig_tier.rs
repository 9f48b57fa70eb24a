//! sriov tier, VF settings: the L1 guest's igb PF, with real VFs, configured through
//! vfplug-host's rtnetlink (`RtVfNetlink`) and VF policy (`vfset`), by the guest agent's
//! `vfconfig` phase. Run with `make vm-test TIER=sriov`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use vfplug_vmlab::agent::AGENT_PREFIX;
use vfplug_vmlab::guest::{self, L1_PREFIX, TAG_LAB, TAG_USR};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate};
use vfplug_vmlab::timing::Figures;
use vfplug_vmlab::vm::{Virtfs, Vm, VmConfig};

/// L1 as in `sriov_tier.rs`: q35 + VT-d + an igb PF, host /usr read-only, the run dir as /lab.
fn l1_config(lab: &Lab, run: &Path, initrd: &Path) -> VmConfig {
    VmConfig {
        memory_mb: 1024,
        smp: 2,
        intel_iommu: true,
        no_reboot: true,
        kernel: Some(lab.kernel.clone()),
        initrd: Some(initrd.to_path_buf()),
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

/// Boots L1 with the agent in `vfconfig` mode; returns its report lines and the figures.
async fn run_vfconfig(lab: &Lab) -> (Vec<String>, Figures) {
    let run = tempfile::tempdir().expect("run dir");
    let vmdir = tempfile::tempdir().expect("vm dir");
    let agent = env!("CARGO_BIN_EXE_vmlab-guest-agent");
    std::fs::copy(agent, run.path().join("vmlab-guest-agent")).expect("copy agent");
    let script = format!(
        "echo \"{AGENT_PREFIX} START $(uname -r)\"\n\
         exec /lab/vmlab-guest-agent --numvfs 2 --phases vfconfig --workdir /tmp/vmlab-l2\n"
    );
    std::fs::write(run.path().join("run.sh"), script).expect("write run.sh");
    let initrd = vmdir.path().join("l1.cpio");
    std::fs::write(&initrd, guest::l1_guest(lab).expect("L1 image")).expect("write L1 image");

    let mut f = Figures::default();
    let t0 = Instant::now();
    let mut vm =
        Vm::spawn(lab, &l1_config(lab, run.path(), &initrd), vmdir.path()).expect("spawn L1");
    let ready = format!("{L1_PREFIX} READY");
    vm.wait_serial("L1 READY", Duration::from_secs(180), |l| {
        l.starts_with(&ready)
    })
    .await
    .expect("L1 boots");
    f.record("sriov.l1_boot_to_ready", t0.elapsed());
    let exit = format!("{L1_PREFIX} EXIT");
    let done = vm
        .wait_serial("L1 agent finished", Duration::from_secs(300), |l| {
            l.starts_with(&exit)
        })
        .await;
    f.record("vfcfg.l1_total", t0.elapsed());
    if let Err(e) = done {
        panic!("L1 run did not finish: {e}");
    }
    let lines: Vec<String> = vm
        .serial_text()
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
    if vm.wait_exit(Duration::from_secs(30)).await.is_err() {
        vm.kill().await;
    }
    (lines, f)
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
