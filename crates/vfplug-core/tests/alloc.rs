//! GetPreferredAllocation policies: examples per policy, then properties for all of them.

// Helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vfplug_core::*;

fn vf(pf: u8, i: u8) -> PciAddress {
    PciAddress::new(0, pf, 2 + i / 8, i % 8).unwrap()
}

fn pf_addr(pf: u8) -> PciAddress {
    PciAddress::new(0, pf, 0, 0).unwrap()
}

/// `free[k]` free VFs on PF k (bus 0x10+k), NUMA node `numa[k]`.
fn cands(free: &[u8], numa: &[Option<u32>]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (k, n) in free.iter().enumerate() {
        let bus = 0x10 + k as u8;
        for i in 0..*n {
            out.push(Candidate {
                pci: vf(bus, i),
                pf: pf_addr(bus),
                numa: numa.get(k).copied().flatten(),
            });
        }
    }
    out
}

fn per_pf(avail: &[Candidate], got: &[PciAddress]) -> BTreeMap<PciAddress, usize> {
    let mut m = BTreeMap::new();
    for p in got {
        let c = avail.iter().find(|c| c.pci == *p).unwrap();
        *m.entry(c.pf).or_insert(0) += 1;
    }
    m
}

#[test]
fn pack_prefers_the_pf_that_fits_best() {
    // PF0 has 8 free, PF1 has 3 free: a request for 3 takes PF1 whole and keeps PF0 intact.
    let a = cands(&[8, 3], &[]);
    let got = preferred(AllocPolicy::Pack, &a, &[], 3);
    assert_eq!(per_pf(&a, &got), BTreeMap::from([(pf_addr(0x11), 3)]));
    // 5 does not fit PF1: all from PF0.
    let got = preferred(AllocPolicy::Pack, &a, &[], 5);
    assert_eq!(per_pf(&a, &got), BTreeMap::from([(pf_addr(0x10), 5)]));
    // 10 fits nowhere: the biggest first, then the rest.
    let got = preferred(AllocPolicy::Pack, &a, &[], 10);
    assert_eq!(
        per_pf(&a, &got),
        BTreeMap::from([(pf_addr(0x10), 8), (pf_addr(0x11), 2)])
    );
}

#[test]
fn pack_continues_on_the_pf_of_must_include() {
    let a = cands(&[8, 3], &[]);
    let must = [vf(0x10, 5)];
    let got = preferred(AllocPolicy::Pack, &a, &must, 3);
    assert_eq!(got[0], must[0]);
    assert_eq!(per_pf(&a, &got), BTreeMap::from([(pf_addr(0x10), 3)]));
}

#[test]
fn spread_round_robins() {
    let a = cands(&[4, 4, 4], &[]);
    let got = preferred(AllocPolicy::Spread, &a, &[], 6);
    assert_eq!(
        per_pf(&a, &got).values().copied().collect::<Vec<_>>(),
        [2, 2, 2]
    );
}

#[test]
fn numa_keeps_one_node() {
    // PF0 on node 0 (2 free), PF1 and PF2 on node 1 (2 + 2 free).
    let a = cands(&[2, 2, 2], &[Some(0), Some(1), Some(1)]);
    let got = preferred(AllocPolicy::Numa, &a, &[], 3);
    let nodes: BTreeSet<_> = got
        .iter()
        .map(|p| a.iter().find(|c| c.pci == *p).unwrap().numa)
        .collect();
    assert_eq!(nodes, BTreeSet::from([Some(1)]));
    // must_include on node 0 and 2 requested: stay on node 0.
    let got = preferred(AllocPolicy::Numa, &a, &[vf(0x10, 1)], 2);
    assert_eq!(per_pf(&a, &got), BTreeMap::from([(pf_addr(0x10), 2)]));
}

#[test]
fn unavailable_and_duplicate_inputs_are_dropped() {
    let a = cands(&[2], &[]);
    let mut dup = a.clone();
    dup.extend(a.iter().copied());
    let stranger = vf(0x99, 0);
    let got = preferred(AllocPolicy::Pack, &dup, &[stranger, a[1].pci, a[1].pci], 2);
    assert_eq!(got, [a[1].pci, a[0].pci]);
    assert!(preferred(AllocPolicy::Spread, &[], &[], 3).is_empty());
}

fn scenario() -> impl Strategy<Value = (Vec<Candidate>, Vec<PciAddress>, usize, AllocPolicy)> {
    let pfs = proptest::collection::vec((0u8..10, proptest::option::of(0u32..3)), 1..5);
    (
        pfs,
        any::<u64>(),
        0usize..16,
        prop_oneof![
            Just(AllocPolicy::Pack),
            Just(AllocPolicy::Spread),
            Just(AllocPolicy::Numa)
        ],
    )
        .prop_map(|(pfs, seed, size, policy)| {
            let free: Vec<u8> = pfs.iter().map(|p| p.0).collect();
            let numa: Vec<Option<u32>> = pfs.iter().map(|p| p.1).collect();
            let a = cands(&free, &numa);
            // A deterministic pseudo-random subset as must_include (at most `size`), plus one
            // address that is not available at all.
            let mut must: Vec<PciAddress> = a
                .iter()
                .enumerate()
                .filter(|(i, _)| (seed >> (i % 64)) & 1 == 1 && (seed >> ((i + 7) % 64)) & 1 == 1)
                .map(|(_, c)| c.pci)
                .take(size)
                .collect();
            if seed % 5 == 0 {
                must.push(vf(0x7f, 0));
            }
            (a, must, size, policy)
        })
}

proptest! {
    #[test]
    fn preferred_allocation_properties((a, must, size, policy) in scenario()) {
        let got = preferred(policy, &a, &must, size);
        let avail: BTreeSet<_> = a.iter().map(|c| c.pci).collect();
        let uniq: BTreeSet<_> = got.iter().copied().collect();
        prop_assert_eq!(uniq.len(), got.len(), "duplicates in {:?}", got);
        prop_assert!(got.iter().all(|p| avail.contains(p)), "unavailable ID in {:?}", got);
        let must_avail: BTreeSet<_> = must.iter().copied().filter(|p| avail.contains(p)).collect();
        prop_assert!(must_avail.iter().all(|p| uniq.contains(p)), "must_include missing");
        prop_assert_eq!(got.len(), size.min(avail.len()).max(must_avail.len()));
        // Deterministic.
        prop_assert_eq!(&got, &preferred(policy, &a, &must, size));
    }

    #[test]
    fn pack_uses_one_pf_when_one_fits(free in proptest::collection::vec(0u8..10, 1..5), size in 1usize..10) {
        let a = cands(&free, &[]);
        let got = preferred(AllocPolicy::Pack, &a, &[], size);
        if free.iter().any(|f| usize::from(*f) >= size) {
            prop_assert_eq!(per_pf(&a, &got).len(), 1);
        }
    }

    #[test]
    fn spread_is_balanced(free in proptest::collection::vec(8u8..10, 1..5), size in 1usize..16) {
        // With enough room on every PF, per-PF counts differ by at most one.
        let a = cands(&free, &[]);
        let got = preferred(AllocPolicy::Spread, &a, &[], size);
        let mut counts: Vec<usize> = (0..free.len()).map(|k| per_pf(&a, &got).get(&pf_addr(0x10 + k as u8)).copied().unwrap_or(0)).collect();
        counts.sort();
        prop_assert!(counts[counts.len() - 1] - counts[0] <= 1, "{counts:?}");
    }

    #[test]
    fn numa_stays_on_one_node_when_one_fits(
        pfs in proptest::collection::vec((0u8..10, 0u32..3), 1..5),
        size in 1usize..10,
    ) {
        let free: Vec<u8> = pfs.iter().map(|p| p.0).collect();
        let numa: Vec<Option<u32>> = pfs.iter().map(|p| Some(p.1)).collect();
        let a = cands(&free, &numa);
        let mut per_node: BTreeMap<u32, usize> = BTreeMap::new();
        for (f, n) in &pfs {
            *per_node.entry(*n).or_insert(0) += usize::from(*f);
        }
        let got = preferred(AllocPolicy::Numa, &a, &[], size);
        if per_node.values().any(|v| *v >= size) {
            let nodes: BTreeSet<_> = got.iter().map(|p| a.iter().find(|c| c.pci == *p).unwrap().numa).collect();
            prop_assert_eq!(nodes.len(), 1, "{:?}", got);
        }
    }
}
