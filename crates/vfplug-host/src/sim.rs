//! In-memory [`VfNetlink`] and [`NetdevOps`]. [`SimVfNetlink`] is a simulated PF that keeps each VF's settings, for fake nodes
//! (`vfplugd --vf-netlink simulated`, the demo) and for fault injection in tests.
//!
//! A [`DriverProfile`] says which knobs the "driver" refuses with EOPNOTSUPP (igb refuses link
//! state); [`SimVfNetlink::fail_next`] makes the next calls for a knob fail (EBUSY or any
//! errno) so tests can prove rollbacks. Every successful or failed call is logged in order.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use vfplug_core::ledger::SavedVfState;
use vfplug_core::{MacAddr, VfLinkState, VlanProto};

use crate::net::{
    LinkInfo, NetError, NetdevOps, PlaceRequest, RetrieveRequest, Retrieved, VfChange, VfNetlink,
    VfSettings,
};

/// Which knobs a simulated driver refuses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverProfile {
    /// Knob names (as [`VfChange::knob`]) answered with EOPNOTSUPP.
    pub unsupported: Vec<&'static str>,
}

impl DriverProfile {
    /// Like igb: everything but link state.
    pub fn igb() -> Self {
        Self {
            unsupported: vec!["link_state"],
        }
    }
}

/// An injected failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// EBUSY that outlasts the retries ([`NetError::Busy`]).
    Busy,
    /// EOPNOTSUPP.
    NotSupported,
    /// Any other errno.
    Errno(i32),
}

#[derive(Debug, Default)]
struct Inner {
    vfs: BTreeMap<(String, u32), VfSettings>,
    faults: BTreeMap<&'static str, VecDeque<Fault>>,
    log: Vec<String>,
}

/// The simulated PFs. See the module docs.
#[derive(Debug, Default)]
pub struct SimVfNetlink {
    profile: DriverProfile,
    inner: Mutex<Inner>,
    /// Where every VF's settings are kept, if anywhere (see [`SimVfNetlink::persistent`]).
    file: Option<PathBuf>,
}

/// The file of a persistent simulation: `"<pf>/<vf>"` → settings, as JSON.
type Persisted = BTreeMap<String, SavedVfState>;

fn key(pf: &str, vf: u32) -> String {
    format!("{pf}/{vf}")
}

fn to_saved(s: &VfSettings) -> SavedVfState {
    crate::vfset::saved_from(s)
}

fn from_saved(s: &SavedVfState) -> VfSettings {
    VfSettings {
        mac: MacAddr(s.mac.unwrap_or_default()),
        vlan: s.vlan,
        qos: u8::try_from(s.qos).unwrap_or(u8::MAX),
        vlan_proto: s.vlan_proto.unwrap_or_default(),
        spoofchk: s.spoofchk,
        trust: s.trust,
        link_state: s.link_state,
        min_tx_rate: s.min_tx_rate.unwrap_or(0),
        max_tx_rate: s.max_tx_rate.unwrap_or(0),
    }
}

/// Reads the file of a persistent simulation: every VF that was ever changed, by (PF netdev, VF
/// index). A missing file is an empty simulation.
pub fn read_persisted(file: &Path) -> std::io::Result<BTreeMap<(String, u32), VfSettings>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let bad = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {why}", file.display()),
        )
    };
    let map: Persisted = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    map.iter()
        .map(|(k, v)| {
            let (pf, vf) = k
                .rsplit_once('/')
                .and_then(|(pf, vf)| Some((pf.to_owned(), vf.parse().ok()?)))
                .ok_or_else(|| bad(format!("bad key {k:?} (want <pf>/<vf index>)")))?;
            Ok(((pf, vf), from_saved(v)))
        })
        .collect()
}

impl SimVfNetlink {
    /// A simulation where every VF of every PF exists with default settings (as a freshly
    /// created VF has them: no MAC, no VLAN, spoofchk on, trust off, link state auto).
    pub fn new(profile: DriverProfile) -> Self {
        Self {
            profile,
            inner: Mutex::default(),
            file: None,
        }
    }

    /// A simulation whose VF settings are also kept in `file` (read now, rewritten after every
    /// change), so they survive a crash of the process as a real PF's would: crash tests check
    /// that a restarted vfplugd restores what the crashed one applied.
    pub fn persistent(profile: DriverProfile, file: PathBuf) -> std::io::Result<Self> {
        let vfs = read_persisted(&file)?;
        Ok(Self {
            profile,
            inner: Mutex::new(Inner {
                vfs,
                ..Inner::default()
            }),
            file: Some(file),
        })
    }

    /// Rewrites the file (write a sibling, then rename: a crash leaves the old or the new).
    fn persist(&self, g: &Inner) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let map: Persisted = g
            .vfs
            .iter()
            .map(|((pf, vf), s)| (key(pf, *vf), to_saved(s)))
            .collect();
        let json = serde_json::to_string_pretty(&map).map_err(std::io::Error::other)?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, file)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock (only possible in a test) leaves plain data behind.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fresh() -> VfSettings {
        VfSettings {
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(VfLinkState::Auto),
            ..VfSettings::default()
        }
    }

    /// Sets a VF's settings directly (as if someone ran `ip link set` behind vfplug's back).
    pub fn put(&self, pf: &str, vf: u32, s: VfSettings) {
        self.lock().vfs.insert((pf.to_owned(), vf), s);
    }

    /// The next `n` calls changing `knob` fail with `fault`.
    pub fn fail_next(&self, knob: &'static str, fault: Fault, n: usize) {
        let mut g = self.lock();
        let q = g.faults.entry(knob).or_default();
        for _ in 0..n {
            q.push_back(fault);
        }
    }

    /// Every call so far, e.g. `"set ens1f0 vf 3 vlan=100 qos=0 proto=802.1q"`, `"failed ..."`.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }
}

fn describe(c: &VfChange) -> String {
    match c {
        VfChange::Mac(m) => format!("mac={m}"),
        VfChange::Vlan { vlan, qos, proto } => format!("vlan={vlan} qos={qos} proto={proto}"),
        VfChange::SpoofChk(b) => format!("spoofchk={b}"),
        VfChange::Trust(b) => format!("trust={b}"),
        VfChange::LinkState(l) => format!("link_state={l}"),
        VfChange::Rate { min, max } => format!("min_tx_rate={min} max_tx_rate={max}"),
    }
}

impl VfNetlink for SimVfNetlink {
    fn read_vf(&self, pf: &str, vf: u32) -> Result<VfSettings, NetError> {
        let g = self.lock();
        // Like the kernel, report every knob even where the driver cannot set it (a real igb
        // reads back link state `auto` and refuses to change it).
        Ok(g.vfs
            .get(&(pf.to_owned(), vf))
            .cloned()
            .unwrap_or_else(Self::fresh))
    }

    fn set_vf(&self, pf: &str, vf: u32, change: VfChange) -> Result<(), NetError> {
        let mut g = self.lock();
        let what = format!("set {pf} vf {vf} {}", describe(&change));
        let op = || format!("{pf} vf {vf} {}", change.knob());
        let fault = g
            .faults
            .get_mut(change.knob())
            .and_then(VecDeque::pop_front);
        let fault = fault.or_else(|| {
            self.profile
                .unsupported
                .contains(&change.knob())
                .then_some(Fault::NotSupported)
        });
        if let Some(f) = fault {
            g.log.push(format!("failed {what}: {f:?}"));
            return Err(match f {
                Fault::Busy => NetError::Busy {
                    op: op(),
                    attempts: 1,
                },
                Fault::NotSupported => NetError::NotSupported { op: op() },
                Fault::Errno(n) => NetError::Kernel {
                    op: op(),
                    source: std::io::Error::from_raw_os_error(n),
                },
            });
        }
        let s = g.vfs.entry((pf.to_owned(), vf)).or_insert_with(Self::fresh);
        match change {
            VfChange::Mac(m) => s.mac = m,
            VfChange::Vlan { vlan, qos, proto } => {
                s.vlan = vlan;
                s.qos = qos;
                s.vlan_proto = if vlan == 0 { VlanProto::Dot1Q } else { proto };
            }
            VfChange::SpoofChk(b) => s.spoofchk = Some(b),
            VfChange::Trust(b) => s.trust = Some(b),
            VfChange::LinkState(l) => s.link_state = Some(l),
            VfChange::Rate { min, max } => {
                if max != 0 && min > max {
                    g.log.push(format!("failed {what}: EINVAL"));
                    return Err(NetError::Kernel {
                        op: op(),
                        source: std::io::Error::from_raw_os_error(
                            rustix::io::Errno::INVAL.raw_os_error(),
                        ),
                    });
                }
                s.min_tx_rate = min;
                s.max_tx_rate = max;
            }
        }
        if let Err(e) = self.persist(&g) {
            g.log.push(format!("failed {what}: persisting: {e}"));
            return Err(NetError::Kernel {
                op: op(),
                source: e,
            });
        }
        g.log.push(what);
        Ok(())
    }
}

/// An in-memory [`NetdevOps`]: named netns (by path) holding links, for in-process tests of
/// the node API without root (the real thing is `netdev::RtNetdevOps`). A netns "exists" once
/// [`SimNetdevOps::add_netns`] made it; links in a deleted netns return to the host, as the
/// kernel does with physical netdevs. `retrieve` tells the VF from a link that merely shares
/// its name with [`RetrieveRequest::identify`], as the real one does, on a kernel that does
/// not report parent devices unless [`SimNetdevOps::report_parents`] says otherwise.
#[derive(Debug, Default)]
pub struct SimNetdevOps {
    inner: Mutex<SimNet>,
}

#[derive(Debug, Default)]
struct SimNet {
    /// netns path (`None`: the host's) → links by name.
    spaces: BTreeMap<Option<std::path::PathBuf>, BTreeMap<String, LinkInfo>>,
    fail_place: usize,
    parents_reported: bool,
}

impl SimNetdevOps {
    fn lock(&self) -> MutexGuard<'_, SimNet> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a link to the host netns.
    pub fn add_host_link(&self, link: LinkInfo) {
        self.lock()
            .spaces
            .entry(None)
            .or_default()
            .insert(link.name.clone(), link);
    }

    /// Creates a netns at `path`.
    pub fn add_netns(&self, path: &Path) {
        self.lock().spaces.entry(Some(path.to_owned())).or_default();
    }

    /// Adds a link of the pod's own to the netns at `path` (made if needed).
    pub fn add_pod_link(&self, path: &Path, link: LinkInfo) {
        self.lock()
            .spaces
            .entry(Some(path.to_owned()))
            .or_default()
            .insert(link.name.clone(), link);
    }

    /// Behave like a kernel that reports every link's parent device (Linux 6.x), so a link
    /// without [`LinkInfo::parent`] is a virtual one.
    pub fn report_parents(&self, yes: bool) {
        self.lock().parents_reported = yes;
    }

    /// Deletes the netns at `path`; its links move to the host under their current names.
    pub fn del_netns(&self, path: &Path) {
        let mut g = self.lock();
        if let Some(links) = g.spaces.remove(&Some(path.to_owned())) {
            let host = g.spaces.entry(None).or_default();
            for (name, mut l) in links {
                l.addresses.clear();
                l.up = false;
                host.insert(name, l);
            }
        }
    }

    /// The next `n` calls of `place` fail after moving the link (and undo, as the real one).
    pub fn fail_next_place(&self, n: usize) {
        self.lock().fail_place += n;
    }
}

impl NetdevOps for SimNetdevOps {
    fn link(&self, netns: Option<&Path>, name: &str) -> Result<Option<LinkInfo>, NetError> {
        let g = self.lock();
        let key = netns.map(Path::to_owned);
        let space = g.spaces.get(&key).ok_or_else(|| NetError::Netns {
            path: key.clone().unwrap_or_default(),
            gone: true,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        Ok(space.get(name).cloned())
    }

    fn place(&self, req: &PlaceRequest) -> Result<LinkInfo, NetError> {
        let mut g = self.lock();
        let ns = Some(req.netns.clone());
        if !g.spaces.contains_key(&ns) {
            return Err(NetError::Netns {
                path: req.netns.clone(),
                gone: true,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        if g.spaces[&ns].contains_key(&req.pod_ifname) {
            return Err(NetError::Exists {
                op: "rename in the pod".into(),
                name: req.pod_ifname.clone(),
            });
        }
        if g.fail_place > 0 {
            g.fail_place -= 1;
            return Err(NetError::Kernel {
                op: "set link up (injected)".into(),
                source: std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()),
            });
        }
        let mut link = g
            .spaces
            .entry(None)
            .or_default()
            .remove(&req.host_name)
            .ok_or_else(|| NetError::NoSuchLink {
                name: req.host_name.clone(),
                netns: None,
            })?;
        link.name = req.pod_ifname.clone();
        link.altnames.clear();
        if let Some(m) = req.mac {
            link.mac = Some(m);
        }
        if let Some(m) = req.mtu {
            link.mtu = m;
        }
        link.up = true;
        link.addresses = req.addresses.clone();
        g.spaces
            .entry(ns)
            .or_default()
            .insert(link.name.clone(), link.clone());
        Ok(link)
    }

    fn retrieve(&self, req: &RetrieveRequest) -> Result<Retrieved, NetError> {
        let mut g = self.lock();
        let parents = g.parents_reported;
        let mut found = None;
        if let Some(ns) = &req.netns
            && let Some(space) = g.spaces.get_mut(&Some(ns.clone()))
            && space
                .get(&req.pod_ifname)
                .is_some_and(|l| req.identify(l, parents).is_ok())
            && let Some(l) = space.remove(&req.pod_ifname)
        {
            found = Some((l, Retrieved::FromPod));
        }
        if found.is_none() {
            let host = g.spaces.entry(None).or_default();
            let order = std::iter::once(&req.host_name).chain(&req.host_candidates);
            for c in order {
                let ours = host.get(c).is_some_and(|l| {
                    if *c == req.host_name {
                        req.foreign_at_home(l, parents).is_none()
                    } else {
                        !l.up && req.identify(l, parents).is_ok()
                    }
                });
                if ours && let Some(l) = host.remove(c) {
                    found = Some((l, Retrieved::FromHost));
                    break;
                }
            }
        }
        let Some((mut l, how)) = found else {
            return Ok(Retrieved::NotFound);
        };
        l.name = req.host_name.clone();
        if req.host_mac.is_some() {
            l.mac = req.host_mac;
        }
        l.mtu = req.host_mtu;
        l.altnames = req.altnames.clone();
        l.up = false;
        l.addresses.clear();
        g.spaces.entry(None).or_default().insert(l.name.clone(), l);
        Ok(how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfset::{apply_vf_config, check_vf_config, restore_vf_config, saved_from};
    use vfplug_core::VfConfig;

    /// What a crashed process applied is what the next one reads, and a restore is kept too.
    #[test]
    fn a_persistent_simulation_survives_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pf.json");
        let first = SimVfNetlink::persistent(DriverProfile::default(), file.clone()).unwrap();
        let saved = saved_from(&first.read_vf("ens1f0", 3).unwrap());
        apply_vf_config(&first, "ens1f0", 3, &cfg(), &saved).unwrap();
        let applied = first.read_vf("ens1f0", 3).unwrap();
        assert_eq!(applied.vlan, 100);
        drop(first);

        let second = SimVfNetlink::persistent(DriverProfile::default(), file.clone()).unwrap();
        assert_eq!(second.read_vf("ens1f0", 3).unwrap(), applied);
        assert_eq!(
            read_persisted(&file)
                .unwrap()
                .get(&("ens1f0".to_owned(), 3)),
            Some(&applied)
        );
        restore_vf_config(&second, "ens1f0", 3, &saved, &cfg(), &[]).unwrap();
        let back = read_persisted(&file).unwrap()[&("ens1f0".to_owned(), 3)].clone();
        assert_eq!(back, SimVfNetlink::fresh());
        assert!(
            read_persisted(&dir.path().join("none.json"))
                .unwrap()
                .is_empty()
        );
        std::fs::write(&file, "{\"ens1f0\": {}}").unwrap();
        assert!(
            read_persisted(&file).is_err(),
            "a key without a VF index is refused"
        );
    }

    fn cfg() -> VfConfig {
        VfConfig {
            mac: Some("02:00:00:00:00:42".parse().unwrap()),
            vlan: Some(100),
            vlan_qos: Some(3),
            vlan_proto: Some(VlanProto::Dot1Ad),
            spoofchk: Some(false),
            trust: Some(true),
            link_state: Some(VfLinkState::Enable),
            min_tx_rate: Some(0),
            max_tx_rate: Some(500),
            mtu: None,
        }
    }

    #[test]
    fn retrieve_leaves_a_pod_link_that_only_shares_the_name_alone() {
        let net = SimNetdevOps::default();
        let ns = std::path::PathBuf::from("/var/run/netns/pod");
        let vf_mac: MacAddr = "02:00:00:00:00:07".parse().unwrap();
        net.add_host_link(LinkInfo {
            name: "ens1f0v0".into(),
            mac: Some(vf_mac),
            ..LinkInfo::default()
        });
        let own = LinkInfo {
            name: "eth0".into(),
            mac: Some("02:00:00:00:e0:01".parse().unwrap()),
            up: true,
            ..LinkInfo::default()
        };
        net.add_pod_link(&ns, own.clone());
        let place = PlaceRequest {
            host_name: "ens1f0v0".into(),
            netns: ns.clone(),
            pod_ifname: "eth0".into(),
            mac: None,
            mtu: None,
            addresses: vec![],
            routes: vec![],
        };
        assert!(matches!(net.place(&place), Err(NetError::Exists { .. })));
        let req = RetrieveRequest {
            netns: Some(ns.clone()),
            pod_ifname: "eth0".into(),
            host_candidates: vec!["ens1f0v0".into(), "eth0".into()],
            host_name: "ens1f0v0".into(),
            host_mac: Some(vf_mac),
            host_mtu: 1500,
            altnames: vec![],
            expect_macs: vec![vf_mac],
            vf: Some("0000:3b:02.0".parse().unwrap()),
        };
        assert_eq!(net.retrieve(&req).unwrap(), Retrieved::FromHost);
        assert_eq!(net.link(Some(&ns), "eth0").unwrap(), Some(own.clone()));
        // With the VF nowhere, still NotFound rather than the pod's link.
        let gone = RetrieveRequest {
            host_name: "gone".into(),
            host_candidates: vec![],
            ..req.clone()
        };
        assert_eq!(net.retrieve(&gone).unwrap(), Retrieved::NotFound);
        net.report_parents(true);
        assert_eq!(net.retrieve(&gone).unwrap(), Retrieved::NotFound);
        assert_eq!(net.link(Some(&ns), "eth0").unwrap(), Some(own));
    }

    #[test]
    fn apply_check_restore_round_trip() {
        let nl = SimVfNetlink::new(DriverProfile::default());
        let before = nl.read_vf("pf0", 2).unwrap();
        let saved = saved_from(&before);
        let r = apply_vf_config(&nl, "pf0", 2, &cfg(), &saved).unwrap();
        assert!(r.skipped.is_empty());
        let now = nl.read_vf("pf0", 2).unwrap();
        assert_eq!(check_vf_config(&now, &cfg(), &[]), Vec::<String>::new());
        assert_eq!(now.vlan_proto, VlanProto::Dot1Ad);
        restore_vf_config(&nl, "pf0", 2, &saved, &cfg(), &[]).unwrap();
        assert_eq!(nl.read_vf("pf0", 2).unwrap(), before);
        assert!(!check_vf_config(&before, &cfg(), &[]).is_empty());
    }

    #[test]
    fn unsupported_optional_knob_is_skipped_not_half_applied() {
        let nl = SimVfNetlink::new(DriverProfile::igb());
        let saved = saved_from(&nl.read_vf("pf0", 0).unwrap());
        let r = apply_vf_config(&nl, "pf0", 0, &cfg(), &saved).unwrap();
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].starts_with("link_state:"), "{r:?}");
        let now = nl.read_vf("pf0", 0).unwrap();
        assert_eq!(
            check_vf_config(&now, &cfg(), &r.skipped),
            Vec::<String>::new()
        );
        assert_eq!(now.max_tx_rate, 500);
    }

    #[test]
    fn failing_knob_rolls_back_everything_before_it() {
        let nl = SimVfNetlink::new(DriverProfile::default());
        let before = nl.read_vf("pf0", 1).unwrap();
        let saved = saved_from(&before);
        nl.fail_next("trust", Fault::Errno(5), 1);
        let e = apply_vf_config(&nl, "pf0", 1, &cfg(), &saved).unwrap_err();
        assert_eq!(e.knob, "trust");
        assert!(e.rollback.is_empty());
        assert_eq!(nl.read_vf("pf0", 1).unwrap(), before, "{:#?}", nl.log());
    }

    #[test]
    fn unsupported_mac_is_an_error() {
        let nl = SimVfNetlink::new(DriverProfile {
            unsupported: vec!["mac"],
        });
        let saved = saved_from(&nl.read_vf("pf0", 1).unwrap());
        let e = apply_vf_config(&nl, "pf0", 1, &cfg(), &saved).unwrap_err();
        assert_eq!(e.knob, "mac");
        assert_eq!(nl.read_vf("pf0", 1).unwrap().vlan, 0);
    }

    #[test]
    fn clearing_mac_falls_back_to_alt_zero() {
        let nl = SimVfNetlink::new(DriverProfile::default());
        nl.put(
            "pf0",
            4,
            VfSettings {
                mac: MacAddr([2, 1, 1, 1, 1, 1]),
                ..SimVfNetlink::fresh()
            },
        );
        let saved = saved_from(&SimVfNetlink::fresh());
        nl.fail_next("mac", Fault::Errno(22), 1);
        restore_vf_config(&nl, "pf0", 4, &saved, &VfConfig::default(), &[]).unwrap();
        assert_eq!(
            nl.read_vf("pf0", 4).unwrap().mac,
            crate::vfset::ALT_ZERO_MAC
        );
    }
}
