//! Timings of vfplug-core's hot paths at node scale (2048 VFs: 32 PFs x 64 VFs).
//! `cargo bench -p vfplug-core --bench core`. Prints the median and max of repeated runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use vfplug_core::*;

const PFS: u8 = 32;
const VFS_PER_PF: u32 = 64;

fn inventory() -> Inventory {
    let mut inv = Inventory::default();
    for p in 0..PFS {
        let pf = PciAddress::new(0, 0x10 + p, 0, 0).unwrap();
        inv.pfs.insert(
            pf,
            PfInfo {
                pci: pf,
                netdev: Some(format!("ens{p}f0")),
                vendor: "8086".into(),
                device: "1592".into(),
                driver: Some("ice".into()),
                total_vfs: VFS_PER_PF,
                num_vfs: VFS_PER_PF,
                numa_node: Some(u32::from(p % 2)),
                link_type: LinkType::Ether,
                carrier: Some(true),
            },
        );
        for i in 0..VFS_PER_PF {
            let pci = PciAddress::new(0, 0x10 + p, 1 + (i / 8) as u8, (i % 8) as u8).unwrap();
            inv.vfs.insert(
                pci,
                VfInfo {
                    pci,
                    pf,
                    pf_netdev: Some(format!("ens{p}f0")),
                    vf_index: i,
                    vendor: "8086".into(),
                    device: "1889".into(),
                    driver: Some(if i % 2 == 0 { "iavf" } else { "vfio-pci" }.into()),
                    iommu_group: Some(100 + i),
                    numa_node: Some(u32::from(p % 2)),
                    netdevs: vec![],
                    link_type: LinkType::Ether,
                    rdma_devices: vec![],
                },
            );
        }
    }
    inv
}

fn time<T>(name: &str, runs: usize, mut f: impl FnMut() -> T) {
    let mut d: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    d.sort();
    println!(
        "{name:<48} median {:>10.1?}  max {:>10.1?}  ({runs} runs)",
        d[runs / 2],
        d[runs - 1]
    );
}

fn main() {
    let inv = inventory();
    let yaml = "pools:\n  - name: vm\n    deviceMode: vfio\n    selectors: { drivers: [vfio-pci], pfNames: ['ens0f0#0-31', 'ens1f0'] }\n  - name: net\n    selectors: { vendors: ['8086'], drivers: [iavf] }\n";
    let sriovdp = include_str!("../tests/golden/sriovdp-readme.json");
    time("Config::parse native YAML (2 pools)", 2000, || {
        Config::parse(yaml).unwrap()
    });
    time("Config::parse SRIOV-DP README JSON (6 pools)", 2000, || {
        Config::parse(sriovdp).unwrap()
    });
    let cfg = Config::parse(yaml).unwrap();
    time("assign_pools, 2048 VFs, 2 pools", 200, || {
        assign_pools(&cfg, &inv)
    });

    let cands: Vec<Candidate> = inv
        .vfs
        .values()
        .map(|v| Candidate {
            pci: v.pci,
            pf: v.pf,
            numa: v.numa_node,
        })
        .collect();
    for policy in [AllocPolicy::Pack, AllocPolicy::Spread, AllocPolicy::Numa] {
        time(
            &format!("preferred {policy:?}, 2048 available, size 8"),
            500,
            || preferred(policy, &cands, &[], 8),
        );
    }

    let present: BTreeSet<PciAddress> = inv.vfs.keys().copied().collect();
    let mut log = Vec::new();
    let mut ledger = Ledger::new();
    for r in ledger.plan_inventory(&present) {
        ledger.apply(&r).unwrap();
        log.push(r);
    }
    // Reserve half the VFs, each for its own owner.
    let addrs: Vec<PciAddress> = present.iter().copied().collect();
    let t = Instant::now();
    for (n, pci) in addrs.iter().step_by(2).enumerate() {
        let owner = Owner {
            pod: format!("pod-{n}").into(),
            container_id: format!("c{n}"),
            ifname: "net1".into(),
        };
        let r = ledger.plan_reserve(*pci, &owner).unwrap();
        ledger.apply(&r).unwrap();
        log.push(r);
    }
    println!(
        "{:<48} {:>10.1?} per VF (1024 reserves, ledger of 2048)",
        "plan_reserve + apply",
        t.elapsed() / 1024
    );
    let last_free = *addrs.last().unwrap();
    let newcomer = Owner {
        pod: "new".into(),
        container_id: "c".into(),
        ifname: "net1".into(),
    };
    time("plan_reserve (one, ledger 2048 / 1024 owned)", 2000, || {
        ledger.plan_reserve(last_free, &newcomer).unwrap()
    });
    time(
        &format!("Ledger::replay of {} records", log.len()),
        50,
        || Ledger::replay(Ledger::new(), &log).unwrap(),
    );
    let lines: Vec<String> = log
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    time(
        &format!("decode + replay JSON log ({} KiB)", bytes / 1024),
        20,
        || {
            let recs: Vec<Record> = lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            Ledger::replay(Ledger::new(), &recs).unwrap()
        },
    );
    let snap = serde_json::to_string(&ledger).unwrap();
    time(
        &format!("snapshot serialize ({} KiB JSON)", snap.len() / 1024),
        50,
        || serde_json::to_string(&ledger).unwrap(),
    );
    time("snapshot load (parse + invariant check)", 50, || {
        serde_json::from_str::<Ledger>(&snap).unwrap()
    });
    time("counts_by_state", 500, || ledger.counts_by_state());
}
