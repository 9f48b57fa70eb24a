//! Applying, checking and restoring a VF's settings through a [`VfNetlink`]: the policy on top
//! of the one-knob-at-a-time trait.
//!
//! Order (sriov-cni's, which drivers are known to accept): VLAN/QoS/proto, admin MAC, rates,
//! spoofchk, trust, link state. A knob the driver refuses with EOPNOTSUPP is *optional* if it is
//! spoofchk, trust, link state or a rate: it is skipped with a warning and remembered, so CHECK
//! does not expect it and restore does not touch it. MAC and VLAN are what isolate a workload;
//! if they fail, or any knob fails otherwise, everything already changed is put back and the
//! error returned, so no VF is left half-applied.

use vfplug_core::{MacAddr, SavedVfState, VfConfig, VfLinkState, VlanProto};

use crate::net::{NetError, VfChange, VfNetlink, VfSettings};

/// The locally administered all-zero MAC some drivers want instead of 00:00:00:00:00:00 when an
/// admin MAC is cleared (libvirt's `altZeroMAC`).
pub const ALT_ZERO_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0]);

/// What [`apply_vf_config`] did besides succeeding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Knobs skipped because the driver does not support them, as `"<knob>: <why>"`.
    pub skipped: Vec<String>,
}

/// Why [`apply_vf_config`] failed; the VF was put back as it was (except for `rollback` errors).
#[derive(Debug, thiserror::Error)]
#[error("setting {knob} on {pf} VF {vf}: {error}{}", rollback_suffix(.rollback))]
pub struct ApplyError {
    /// PF netdev.
    pub pf: String,
    /// VF index.
    pub vf: u32,
    /// The knob that failed.
    pub knob: &'static str,
    /// The failure.
    pub error: NetError,
    /// Failures while undoing (empty: the VF is as it was).
    pub rollback: Vec<NetError>,
}

fn rollback_suffix(r: &[NetError]) -> String {
    if r.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = r.iter().map(ToString::to_string).collect();
        format!(" (and undoing failed: {})", list.join("; "))
    }
}

/// The settings to keep in the ledger from what the PF reported before any change.
pub fn saved_from(s: &VfSettings) -> SavedVfState {
    SavedVfState {
        mac: (!s.mac.is_zero()).then_some(s.mac.0),
        vlan: s.vlan,
        qos: u32::from(s.qos),
        spoofchk: s.spoofchk,
        trust: s.trust,
        link_state: s.link_state,
        min_tx_rate: Some(s.min_tx_rate),
        max_tx_rate: Some(s.max_tx_rate),
        driver: None,
        vlan_proto: Some(s.vlan_proto),
    }
}

/// The knob changes `cfg` asks for, in application order.
pub fn changes_for(cfg: &VfConfig) -> Vec<VfChange> {
    let mut out = Vec::new();
    if cfg.vlan.is_some() || cfg.vlan_qos.is_some() || cfg.vlan_proto.is_some() {
        out.push(VfChange::Vlan {
            vlan: cfg.vlan.unwrap_or(0),
            qos: cfg.vlan_qos.unwrap_or(0),
            proto: cfg.vlan_proto.unwrap_or_default(),
        });
    }
    if let Some(m) = cfg.mac {
        out.push(VfChange::Mac(m));
    }
    if cfg.min_tx_rate.is_some() || cfg.max_tx_rate.is_some() {
        out.push(VfChange::Rate {
            min: cfg.min_tx_rate.unwrap_or(0),
            max: cfg.max_tx_rate.unwrap_or(0),
        });
    }
    if let Some(b) = cfg.spoofchk {
        out.push(VfChange::SpoofChk(b));
    }
    if let Some(b) = cfg.trust {
        out.push(VfChange::Trust(b));
    }
    if let Some(l) = cfg.link_state {
        out.push(VfChange::LinkState(l));
    }
    out
}

/// The change that puts `knob` back as `saved` had it (`None` if `saved` does not know it).
fn undo_for(change: &VfChange, saved: &SavedVfState) -> Option<VfChange> {
    Some(match change {
        VfChange::Vlan { .. } => VfChange::Vlan {
            vlan: saved.vlan,
            qos: u8::try_from(saved.qos).unwrap_or(0),
            proto: saved.vlan_proto.unwrap_or_default(),
        },
        VfChange::Mac(_) => VfChange::Mac(MacAddr(saved.mac.unwrap_or([0; 6]))),
        VfChange::Rate { .. } => VfChange::Rate {
            min: saved.min_tx_rate.unwrap_or(0),
            max: saved.max_tx_rate.unwrap_or(0),
        },
        VfChange::SpoofChk(_) => VfChange::SpoofChk(saved.spoofchk?),
        VfChange::Trust(_) => VfChange::Trust(saved.trust?),
        VfChange::LinkState(_) => VfChange::LinkState(saved.link_state?),
    })
}

fn optional(change: &VfChange) -> bool {
    matches!(
        change,
        VfChange::SpoofChk(_) | VfChange::Trust(_) | VfChange::LinkState(_) | VfChange::Rate { .. }
    )
}

/// Sets a MAC; when clearing (zero) and the driver refuses, tries [`ALT_ZERO_MAC`].
fn set_mac(nl: &dyn VfNetlink, pf: &str, vf: u32, mac: MacAddr) -> Result<(), NetError> {
    match nl.set_vf(pf, vf, VfChange::Mac(mac)) {
        Err(e) if mac.is_zero() && !e.is_busy() => nl
            .set_vf(pf, vf, VfChange::Mac(ALT_ZERO_MAC))
            .map_err(|_| e),
        r => r,
    }
}

fn set(nl: &dyn VfNetlink, pf: &str, vf: u32, change: VfChange) -> Result<(), NetError> {
    match change {
        VfChange::Mac(m) => set_mac(nl, pf, vf, m),
        c => nl.set_vf(pf, vf, c),
    }
}

/// Applies `cfg` to VF `vf` of `pf`. `saved` is what the VF had before (used to undo). See the
/// module docs for the order and the EOPNOTSUPP policy.
pub fn apply_vf_config(
    nl: &dyn VfNetlink,
    pf: &str,
    vf: u32,
    cfg: &VfConfig,
    saved: &SavedVfState,
) -> Result<ApplyReport, Box<ApplyError>> {
    let mut report = ApplyReport::default();
    let mut done: Vec<VfChange> = Vec::new();
    for change in changes_for(cfg) {
        match set(nl, pf, vf, change) {
            Ok(()) => done.push(change),
            Err(e) if e.is_not_supported() && optional(&change) => {
                tracing::warn!(
                    pf,
                    vf,
                    knob = change.knob(),
                    "driver does not support this VF setting; skipped"
                );
                report.skipped.push(format!("{}: {e}", change.knob()));
            }
            Err(error) => {
                let mut rollback = Vec::new();
                for c in done.iter().rev() {
                    if let Some(u) = undo_for(c, saved)
                        && let Err(e) = set(nl, pf, vf, u)
                    {
                        rollback.push(e);
                    }
                }
                return Err(Box::new(ApplyError {
                    pf: pf.to_owned(),
                    vf,
                    knob: change.knob(),
                    error,
                    rollback,
                }));
            }
        }
    }
    Ok(report)
}

/// Puts back what `applied` changed, from `saved`. The admin MAC and the VLAN are always put
/// back (a VF must not keep a departed pod's MAC: sriov-network-device-plugin #685), the other
/// knobs only if they were applied and not skipped. Tries every knob; returns all failures.
pub fn restore_vf_config(
    nl: &dyn VfNetlink,
    pf: &str,
    vf: u32,
    saved: &SavedVfState,
    applied: &VfConfig,
    skipped: &[String],
) -> Result<(), Vec<NetError>> {
    let was_skipped = |knob: &str| skipped.iter().any(|s| s.starts_with(&format!("{knob}:")));
    let mut changes = vec![
        VfChange::Vlan {
            vlan: 0,
            qos: 0,
            proto: VlanProto::Dot1Q,
        },
        VfChange::Mac(MacAddr::ZERO),
    ];
    for c in changes_for(applied) {
        if !matches!(c, VfChange::Vlan { .. } | VfChange::Mac(_)) && !was_skipped(c.knob()) {
            changes.push(c);
        }
    }
    let mut errors = Vec::new();
    for c in changes {
        let Some(u) = undo_for(&c, saved) else {
            continue;
        };
        if let Err(e) = set(nl, pf, vf, u) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Where the VF differs from what `cfg` asked (skipped knobs are not expected). Empty: matches.
pub fn check_vf_config(actual: &VfSettings, cfg: &VfConfig, skipped: &[String]) -> Vec<String> {
    let was_skipped = |knob: &str| skipped.iter().any(|s| s.starts_with(&format!("{knob}:")));
    let mut out = Vec::new();
    let mut want = |knob: &str, ok: bool, w: String, a: String| {
        if !ok && !was_skipped(knob) {
            out.push(format!("{knob}: want {w}, VF has {a}"));
        }
    };
    if let Some(m) = cfg.mac {
        want(
            "mac",
            actual.mac == m,
            m.to_string(),
            actual.mac.to_string(),
        );
    }
    if let Some(v) = cfg.vlan {
        want(
            "vlan",
            actual.vlan == v,
            v.to_string(),
            actual.vlan.to_string(),
        );
    }
    if let Some(q) = cfg.vlan_qos {
        want(
            "vlanQoS",
            actual.qos == q,
            q.to_string(),
            actual.qos.to_string(),
        );
    }
    if let Some(p) = cfg.vlan_proto {
        want(
            "vlanProto",
            actual.vlan_proto == p,
            p.to_string(),
            actual.vlan_proto.to_string(),
        );
    }
    let opt = |b: Option<bool>| {
        b.map_or("unknown".to_owned(), |b| {
            if b { "on" } else { "off" }.to_owned()
        })
    };
    if let Some(b) = cfg.spoofchk {
        want(
            "spoofchk",
            actual.spoofchk == Some(b),
            opt(Some(b)),
            opt(actual.spoofchk),
        );
    }
    if let Some(b) = cfg.trust {
        want(
            "trust",
            actual.trust == Some(b),
            opt(Some(b)),
            opt(actual.trust),
        );
    }
    if let Some(l) = cfg.link_state {
        let a = actual
            .link_state
            .map_or("unknown".to_owned(), |l: VfLinkState| l.to_string());
        want("link_state", actual.link_state == Some(l), l.to_string(), a);
    }
    if let Some(r) = cfg.min_tx_rate {
        want(
            "min_tx_rate",
            actual.min_tx_rate == r,
            r.to_string(),
            actual.min_tx_rate.to_string(),
        );
    }
    if let Some(r) = cfg.max_tx_rate {
        want(
            "max_tx_rate",
            actual.max_tx_rate == r,
            r.to_string(),
            actual.max_tx_rate.to_string(),
        );
    }
    out
}
