//! `GetPreferredAllocation`: which of the available VFs kubelet should take.
//!
//! Pure and deterministic. Whatever the policy, [`preferred`] always returns the
//! `must_include` IDs that are available, never a duplicate or an unavailable ID, and exactly
//! `size` IDs when enough are available. Ties are broken by PCI address, so the same input
//! always gives the same answer.
//!
//! * [`AllocPolicy::Pack`]: keep PFs whole for later big requests (SRIOV-DP #255). Take from the
//!   PF that already has the most chosen VFs; among the rest prefer the PF that can satisfy what
//!   is left with the fewest free VFs (best fit), else the PF with the most free VFs.
//! * [`AllocPolicy::Spread`]: round-robin over PFs (one PF or link failing hurts least).
//! * [`AllocPolicy::Numa`]: all from one NUMA node when possible (the node holding the
//!   `must_include` VFs, else the best-fitting node), then pack within it; falls back to pack
//!   over all candidates.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;

/// Allocation policy of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocPolicy {
    /// Bin-pack by PF.
    #[default]
    Pack,
    /// Round-robin across PFs.
    Spread,
    /// One NUMA node when possible, then pack.
    Numa,
}

/// An available VF as the allocator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The VF.
    pub pci: PciAddress,
    /// Its PF.
    pub pf: PciAddress,
    /// Its NUMA node, if known.
    pub numa: Option<u32>,
}

/// The preferred `size` VFs out of `available`, always including the available ones of
/// `must_include`. If `must_include` alone exceeds `size`, all of it is returned (kubelet never
/// asks that).
pub fn preferred(
    policy: AllocPolicy,
    available: &[Candidate],
    must_include: &[PciAddress],
    size: usize,
) -> Vec<PciAddress> {
    // Deduplicate the input; the first occurrence of an address wins.
    let mut by_pci: BTreeMap<PciAddress, Candidate> = BTreeMap::new();
    for c in available {
        by_pci.entry(c.pci).or_insert(*c);
    }
    let mut chosen: Vec<PciAddress> = Vec::new();
    let mut taken: BTreeSet<PciAddress> = BTreeSet::new();
    for m in must_include {
        if by_pci.contains_key(m) && taken.insert(*m) {
            chosen.push(*m);
        }
    }
    if chosen.len() >= size {
        return chosen;
    }
    let pool: Vec<Candidate> = by_pci
        .values()
        .copied()
        .filter(|c| !taken.contains(&c.pci))
        .collect();
    let must: Vec<Candidate> = chosen
        .iter()
        .filter_map(|p| by_pci.get(p).copied())
        .collect();
    let need = size - chosen.len();
    let extra = match policy {
        AllocPolicy::Pack => pack(&pool, &must, need),
        AllocPolicy::Spread => spread(&pool, &must, need),
        AllocPolicy::Numa => numa(&pool, &must, need),
    };
    chosen.extend(extra);
    chosen
}

/// Free candidates grouped by PF, each group in PCI order.
fn by_pf(pool: &[Candidate]) -> BTreeMap<PciAddress, Vec<PciAddress>> {
    let mut m: BTreeMap<PciAddress, Vec<PciAddress>> = BTreeMap::new();
    for c in pool {
        m.entry(c.pf).or_default().push(c.pci);
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}

fn chosen_per_pf(must: &[Candidate]) -> BTreeMap<PciAddress, usize> {
    let mut m = BTreeMap::new();
    for c in must {
        *m.entry(c.pf).or_insert(0) += 1;
    }
    m
}

fn pack(pool: &[Candidate], must: &[Candidate], need: usize) -> Vec<PciAddress> {
    let mut free = by_pf(pool);
    let mut chosen = chosen_per_pf(must);
    let mut out = Vec::with_capacity(need);
    while out.len() < need {
        let left = need - out.len();
        // Sort key: most chosen first; then PFs that fit the rest, fewest free first; then the
        // PFs that do not fit, most free first; then PCI order.
        let best = free
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .min_by_key(|(pf, v)| {
                let c = chosen.get(*pf).copied().unwrap_or(0);
                let fits = v.len() >= left;
                let size_key = if fits { v.len() } else { usize::MAX - v.len() };
                (usize::MAX - c, !fits, size_key, **pf)
            })
            .map(|(pf, _)| *pf);
        let Some(pf) = best else { break };
        let Some(list) = free.get_mut(&pf) else { break };
        let take = left.min(list.len());
        out.extend(list.drain(..take));
        *chosen.entry(pf).or_insert(0) += take;
    }
    out
}

fn spread(pool: &[Candidate], must: &[Candidate], need: usize) -> Vec<PciAddress> {
    let mut free = by_pf(pool);
    let mut chosen = chosen_per_pf(must);
    let mut out = Vec::with_capacity(need);
    while out.len() < need {
        // Fewest chosen first, then most free, then PCI order.
        let best = free
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .min_by_key(|(pf, v)| {
                (
                    chosen.get(*pf).copied().unwrap_or(0),
                    usize::MAX - v.len(),
                    **pf,
                )
            })
            .map(|(pf, _)| *pf);
        let Some(pf) = best else { break };
        let Some(list) = free.get_mut(&pf) else { break };
        out.push(list.remove(0));
        *chosen.entry(pf).or_insert(0) += 1;
    }
    out
}

fn numa(pool: &[Candidate], must: &[Candidate], need: usize) -> Vec<PciAddress> {
    let mut nodes: BTreeMap<Option<u32>, Vec<Candidate>> = BTreeMap::new();
    for c in pool {
        nodes.entry(c.numa).or_default().push(*c);
    }
    let must_nodes: BTreeSet<Option<u32>> = must.iter().map(|c| c.numa).collect();
    let node = match must_nodes.len() {
        // The node of the forced VFs, if it has room for the rest.
        1 => must_nodes
            .iter()
            .next()
            .copied()
            .filter(|n| nodes.get(n).is_some_and(|v| v.len() >= need)),
        // No forced VFs: the known node that fits with the fewest free VFs (best fit).
        0 => nodes
            .iter()
            .filter(|(n, v)| n.is_some() && v.len() >= need)
            .min_by_key(|(n, v)| (v.len(), **n))
            .map(|(n, _)| *n),
        // Forced VFs already span nodes: locality is lost anyway.
        _ => None,
    };
    match node.and_then(|n| nodes.get(&n)) {
        Some(group) => pack(group, must, need),
        None => pack(pool, must, need),
    }
}
