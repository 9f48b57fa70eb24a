//! sriov tier, vfplugd: the real `vfplugd` and the real `vfplug` CNI binary, built on this host,
//! run in the L1 guest on the igb PF's real VFs (real sysfs, rtnetlink, netns moves, vfio-pci),
//! driven by the guest agent's `vfplugd` phase (`vfplug_vmlab::plugd`). Run with
//! `make vm-test TIER=sriov`.
//!
//! The binaries: [`l1::host_binaries`] has `lab::host_binaries` build `vfplugd` and `vfplug`
//! into the agent's target dir and profile (a no-op when they are fresh), strips them, and they
//! are staged in /lab.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use vfplug_vmlab::agent::AGENT_PREFIX;
use vfplug_vmlab::l1::{self, L1Run};
use vfplug_vmlab::lab::{Gate, Tier, gate};
use vfplug_vmlab::plugd::{NETDEV_MAC, NETDEV_VLAN, VFIO_VLAN};

/// The detail of step `step`'s PASS line; fails the test (with the whole report) if absent.
fn passed<'a>(lines: &'a [String], step: &str) -> &'a str {
    let p = format!("{AGENT_PREFIX} PASS {step} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&p))
        .unwrap_or_else(|| panic!("no PASS line for {step}:\n{}", lines.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugd_and_the_cni_plugin_on_real_vfs() {
    let Gate::Run(lab) = gate(Tier::Sriov) else {
        return;
    };
    let bins = tempfile::tempdir().expect("bin dir");
    let (vfplugd, cni) = l1::host_binaries(
        Path::new(env!("CARGO_BIN_EXE_vmlab-guest-agent")),
        bins.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = tempfile::tempdir().expect("run dir");
    let vmdir = tempfile::tempdir().expect("vm dir");
    let r = L1Run {
        agent: env!("CARGO_BIN_EXE_vmlab-guest-agent").into(),
        agent_args: "--numvfs 2 --phases vfplugd --vfplugd /lab/vfplugd --cni /lab/vfplug".into(),
        binaries: vec![vfplugd, cni],
        stage_l2: false,
        memory_mb: 1024,
        budget: Duration::from_secs(400),
        total_figure: "plugd.l1_total",
    };
    let (lines, f) = l1::run_l1(&lab, run.path(), vmdir.path(), &r)
        .await
        .unwrap_or_else(|e| panic!("L1 run did not finish: {e}"));
    let report = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("{AGENT_PREFIX} DONE ok=true")),
        "agent reported failure:\n{report}"
    );
    passed(&lines, "pf-found");
    passed(&lines, "vfs-created");
    passed(&lines, "plugd-setup");

    // No kubelet, yet ready; both VFs listed Free in their pools.
    let ready = passed(&lines, "plugd-ready");
    assert!(
        ready.contains("vf0: state=free pool=vfplug.io/lab_net ")
            && ready.contains("vf1: state=free pool=vfplug.io/lab_vfio ")
            && ready.contains("vf1_driver=vfio-pci"),
        "{ready}"
    );

    // The PF says exactly what the NAD asked for, the netdev is in the pod, the ledger says whose.
    for step in ["plugd-add-netdev", "plugd-add-netdev-again"] {
        let add = passed(&lines, step);
        for want in [
            format!("link/ether {NETDEV_MAC} "),
            format!(", vlan {NETDEV_VLAN}, "),
            ", spoof checking off".to_owned(),
            "state=configured pool=vfplug.io/lab_net ".to_owned(),
            "netns=labpod ifname=net1".to_owned(),
        ] {
            assert!(add.contains(&want), "{step}: no {want:?} in {add}");
        }
    }
    passed(&lines, "plugd-check");
    for step in ["plugd-del-netdev", "plugd-del-after-restart"] {
        let del = passed(&lines, step);
        assert!(
            del.contains("restored=true state=free pool=vfplug.io/lab_net "),
            "{step}: {del}"
        );
        assert!(!del.contains(&format!(", vlan {NETDEV_VLAN}")), "{del}");
    }

    let vfio = passed(&lines, "plugd-add-vfio");
    assert!(
        vfio.contains("driver=vfio-pci")
            && vfio.contains("state=configured pool=vfplug.io/lab_vfio owner=vm-a/net1 ")
            && vfio.contains(&format!(", vlan {VFIO_VLAN}, ")),
        "{vfio}"
    );
    let del = passed(&lines, "plugd-del-vfio");
    assert!(
        del.contains("driver=vfio-pci state=free pool=vfplug.io/lab_vfio "),
        "{del}"
    );
    assert!(!del.contains(&format!(", vlan {VFIO_VLAN}")), "{del}");

    let restart = passed(&lines, "plugd-restart");
    assert!(
        restart.contains("state=configured pool=vfplug.io/lab_net owner=pod-b/net1 ")
            && restart.contains("repeated_add=same check=ok"),
        "{restart}"
    );

    for name in [
        "plugd.start_to_ready",
        "plugd.cni_add_netdev",
        "plugd.cni_del_netdev",
        "plugd.cni_add_vfio",
        "plugd.cni_del_vfio",
        "plugd.cni_add_netdev_again",
        "plugd.restart_to_ready",
        "plugd.cni_del_after_restart",
    ] {
        assert!(f.get(name).is_some(), "figure {name} missing:\n{report}");
    }
    println!("{}", f.table());
}
