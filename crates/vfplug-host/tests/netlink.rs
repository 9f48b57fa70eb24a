//! The real rtnetlink implementations against this machine's kernel: netdev placement with a
//! veth end (or a macvlan) playing the VF netdev, in throwaway netns, and the VF-setting
//! errors a kernel gives for a link that is no PF. Needs root (and `ip`); otherwise every test
//! says SKIP and why, or fails with `VFPLUG_REQUIRE=1` (`vfplug_host::prereq`). Every netns
//! and link made here is deleted by a Drop guard, even on failure.
//!
//! Figures: `cargo test -p vfplug-host --test netlink -- --nocapture` prints the place +
//! retrieve round-trip times and the socket costs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vfplug_core::{MacAddr, VfLinkState};
use vfplug_host::net::{
    IpNet, NetError, NetdevOps, PlaceRequest, RetrieveRequest, Retrieved, RouteSpec, VfChange,
    VfNetlink,
};
use vfplug_host::netdev::RtNetdevOps;
use vfplug_host::prereq;
use vfplug_host::rtnl::RtVfNetlink;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most 15 bytes: `v<pid%100000><tag><n>`.
fn uniq(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("v{}{tag}{n}", std::process::id() % 100_000)
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap()
}

/// Whether these tests can run here; if not, says so loudly (or fails, when required).
fn can_run(test: &str) -> bool {
    prereq::need(test, prereqs()).is_some()
}

fn prereqs() -> Result<(), String> {
    prereq::root().map_err(|e| format!("{e} (netns and links are created)"))?;
    prereq::program("ip")?;
    let probe = format!(
        "vfpt-{}-probe{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    ip(&["netns", "add", &probe]).map_err(|e| format!("cannot create a netns ({e})"))?;
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}

/// A netns from `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!(
            "vfpt-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip_ok(&["netns", "add", &name]);
        Self { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A link in the host netns, deleted on drop (wherever it went: the guard also tries the
/// names it may have in a netns it was moved to, via `extra`).
struct Link {
    name: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

/// A veth pair in the host netns: `vf` plays the VF netdev, `peer` stays home.
struct Veth {
    vf: String,
    _peer: Link,
}

impl Veth {
    fn new() -> Self {
        let vf = uniq("h");
        let peer = uniq("p");
        ip_ok(&["link", "add", &vf, "type", "veth", "peer", "name", &peer]);
        Self {
            vf,
            _peer: Link { name: peer },
        }
    }
}

/// What `ip -d link show` says about a link, parsed enough for the checks here.
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    mac: String,
    mtu: u32,
    up: bool,
    altnames: Vec<String>,
}

fn show(ns: Option<&Netns>, name: &str) -> Option<Shown> {
    let args = ["-o", "link", "show", "dev", name];
    let out = match ns {
        Some(n) => n.ip(&args),
        None => ip(&args),
    }
    .ok()?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .map(|i| words[i + 1].to_owned())
    };
    let flags = words.get(2).copied().unwrap_or_default();
    Some(Shown {
        mac: after("link/ether").unwrap_or_default(),
        mtu: after("mtu").and_then(|m| m.parse().ok()).unwrap_or(0),
        up: flags.trim_matches(['<', '>']).split(',').any(|f| f == "UP"),
        altnames: words
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == "altname")
            .map(|(i, _)| words[i + 1].trim_end_matches('\\').to_owned())
            .collect(),
    })
}

fn global_addrs(ns: &Netns, dev: &str) -> String {
    ns.ip(&["-o", "addr", "show", "dev", dev, "scope", "global"])
        .unwrap_or_default()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ops() -> RtNetdevOps {
    RtNetdevOps::new().expect("opening vfplugd's netns")
}

fn place_req(vf: &str, ns: &Netns, third_octet: u8) -> PlaceRequest {
    PlaceRequest {
        host_name: vf.to_owned(),
        netns: ns.path(),
        pod_ifname: "net1".into(),
        mac: Some(mac(POD_MAC)),
        mtu: Some(1400),
        addresses: vec![
            net(&format!("10.77.{third_octet}.2/24")),
            net(&format!("fd00:77:{third_octet}::2/64")),
        ],
        routes: vec![
            RouteSpec {
                dst: net(&format!("10.78.{third_octet}.0/24")),
                gw: Some(format!("10.77.{third_octet}.1").parse().unwrap()),
            },
            RouteSpec {
                dst: net("192.0.2.0/24"),
                gw: None,
            },
        ],
    }
}

/// The MAC `place_req` gives the netdev in the pod.
const POD_MAC: &str = "02:00:00:aa:bb:cc";

/// What the agent asks for: the pod's MAC and the host MAC as the stand-in's identity (a veth
/// has no parent device, so no PCI address either).
fn retrieve_req(vf: &str, ns: Option<&Netns>, orig: &Shown) -> RetrieveRequest {
    RetrieveRequest {
        netns: ns.map(Netns::path),
        pod_ifname: "net1".into(),
        host_candidates: vec![vf.to_owned(), "net1".into()],
        host_name: vf.to_owned(),
        host_mac: Some(mac(&orig.mac)),
        host_mtu: orig.mtu,
        altnames: orig.altnames.clone(),
        expect_macs: vec![mac(POD_MAC), mac(&orig.mac)],
        vf: None,
    }
}

#[test]
fn place_then_retrieve_round_trip() {
    if !can_run("place_then_retrieve_round_trip") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    ip_ok(&[
        "link",
        "set",
        &veth.vf,
        "address",
        "02:11:22:33:44:55",
        "mtu",
        "1500",
        "up",
    ]);
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();

    let req = place_req(&veth.vf, &ns, 1);
    let placed = ops.place(&req).unwrap();
    assert_eq!(placed.name, "net1");
    assert_eq!(placed.mac, Some(mac("02:00:00:aa:bb:cc")));
    assert_eq!(placed.mtu, 1400);
    assert!(placed.up);
    let mut got = placed.addresses.clone();
    got.sort_by_key(ToString::to_string);
    assert_eq!(got, vec![net("10.77.1.2/24"), net("fd00:77:1::2/64")]);

    // What `ip` sees in the pod, independently of our parser.
    assert!(show(None, &veth.vf).is_none(), "still in the host netns");
    let inside = show(Some(&ns), "net1").expect("net1 in the pod");
    assert_eq!(inside.mac, "02:00:00:aa:bb:cc");
    assert_eq!(inside.mtu, 1400);
    assert!(inside.up);
    let addrs = global_addrs(&ns, "net1");
    assert!(addrs.contains("10.77.1.2/24"), "{addrs}");
    assert!(addrs.contains("fd00:77:1::2/64"), "{addrs}");
    let routes = ns.ip(&["-4", "route", "show", "dev", "net1"]).unwrap();
    assert!(routes.contains("10.78.1.0/24 via 10.77.1.1"), "{routes}");
    assert!(routes.contains("192.0.2.0/24"), "{routes}");
    assert_eq!(
        ops.link(Some(&ns.path()), "net1").unwrap().unwrap().index,
        placed.index
    );

    let r = retrieve_req(&veth.vf, Some(&ns), &orig);
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromPod);
    assert!(show(Some(&ns), "net1").is_none(), "left in the pod");
    let home = show(None, &veth.vf).expect("back home under its name");
    assert_eq!(home.mac, orig.mac);
    assert_eq!(home.mtu, orig.mtu);
    assert!(!home.up, "retrieve leaves it down");
    let l = ops.link(None, &veth.vf).unwrap().unwrap();
    assert!(l.addresses.is_empty(), "{:?}", l.addresses);

    // Idempotent: the second call finds it home and changes nothing.
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromHost);
    assert_eq!(show(None, &veth.vf).unwrap(), home);
}

#[test]
fn altnames_travel_safely_and_come_back() {
    if !can_run("altnames_travel_safely_and_come_back") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let alt = format!("{}-altname-long", veth.vf);
    ip_ok(&["link", "property", "add", "dev", &veth.vf, "altname", &alt]);
    // A link in the pod already has that altname: moving ours in with it would fail EEXIST.
    ns.ip(&["link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        .unwrap();
    ns.ip(&["link", "property", "add", "dev", "pa", "altname", &alt])
        .unwrap();
    let orig = show(None, &veth.vf).unwrap();
    assert_eq!(orig.altnames, vec![alt.clone()]);
    let ops = ops();
    let before = ops.link(None, &veth.vf).unwrap().unwrap();
    assert_eq!(before.altnames, vec![alt.clone()]);

    let placed = ops.place(&place_req(&veth.vf, &ns, 2)).unwrap();
    assert!(placed.altnames.is_empty(), "{:?}", placed.altnames);
    assert_eq!(show(Some(&ns), "pa").unwrap().altnames, vec![alt.clone()]);

    let r = retrieve_req(&veth.vf, Some(&ns), &orig);
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromPod);
    assert_eq!(show(None, &veth.vf).unwrap().altnames, vec![alt.clone()]);
    // Looking it up by its altname finds it too.
    assert_eq!(ops.link(None, &alt).unwrap().unwrap().name, veth.vf);
    // And again: EEXIST on the altname is not an error.
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromHost);
}

#[test]
fn pod_ifname_taken_fails_before_anything_moves() {
    if !can_run("pod_ifname_taken_fails_before_anything_moves") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let alt = format!("{}alt", veth.vf);
    ip_ok(&["link", "property", "add", "dev", &veth.vf, "altname", &alt]);
    ip_ok(&["link", "set", &veth.vf, "up"]);
    ns.ip(&[
        "link", "add", "net1", "type", "veth", "peer", "name", "other",
    ])
    .unwrap();
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();
    match ops.place(&place_req(&veth.vf, &ns, 3)) {
        Err(NetError::Exists { name, .. }) => assert_eq!(name, "net1"),
        other => panic!("want Exists, got {other:?}"),
    }
    assert_eq!(show(None, &veth.vf).unwrap(), orig, "changed at home");
}

#[test]
fn failure_after_the_move_is_undone() {
    if !can_run("failure_after_the_move_is_undone") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let alt = format!("{}alt", veth.vf);
    ip_ok(&["link", "property", "add", "dev", &veth.vf, "altname", &alt]);
    ip_ok(&[
        "link",
        "set",
        &veth.vf,
        "address",
        "02:11:22:33:44:56",
        "up",
    ]);
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();
    // The same address twice: the second add fails EEXIST after MAC, MTU, up and the first
    // address were done inside the pod.
    let mut req = place_req(&veth.vf, &ns, 4);
    req.addresses.push(req.addresses[0]);
    match ops.place(&req) {
        Err(NetError::Exists { name, .. }) => assert_eq!(name, "10.77.4.2/24"),
        other => panic!("want Exists, got {other:?}"),
    }
    assert!(show(Some(&ns), "net1").is_none(), "left in the pod");
    assert_eq!(show(None, &veth.vf).unwrap(), orig, "not restored");
    let l = ops.link(None, &veth.vf).unwrap().unwrap();
    assert!(l.addresses.is_empty(), "{:?}", l.addresses);

    // An unreachable gateway fails in the route step: undone as well.
    let mut req = place_req(&veth.vf, &ns, 4);
    req.routes = vec![RouteSpec {
        dst: net("10.99.0.0/16"),
        gw: Some("203.0.113.1".parse().unwrap()),
    }];
    let e = ops.place(&req).unwrap_err();
    assert!(matches!(e, NetError::Kernel { .. }), "{e:?}");
    assert_eq!(show(None, &veth.vf).unwrap(), orig, "not restored");
}

#[test]
fn netns_deleted_while_placed() {
    if !can_run("netns_deleted_while_placed") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();
    ops.place(&place_req(&veth.vf, &ns, 5)).unwrap();
    ip_ok(&["netns", "del", &ns.name]);
    // A veth is destroyed with its netns (the kernel gives back only devices without
    // rtnl_link_ops, i.e. physical ones such as a real VF; virtual ones are deleted, and a
    // veth takes its peer along). So there is nothing to find: NotFound, and no error. A real
    // VF would come back as `net1` (or `devN`) and be found among the host candidates.
    let r = retrieve_req(&veth.vf, Some(&ns), &orig);
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::NotFound);
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::NotFound);
}

#[test]
fn host_candidates_never_take_an_up_link_of_another_name() {
    if !can_run("host_candidates_never_take_an_up_link_of_another_name") {
        return;
    }
    let stranger = Veth::new();
    ip_ok(&["link", "set", &stranger.vf, "up"]);
    let before = show(None, &stranger.vf).unwrap();
    let ops = ops();
    let r = RetrieveRequest {
        netns: None,
        pod_ifname: stranger.vf.clone(),
        host_candidates: vec![stranger.vf.clone()],
        host_name: uniq("gone"),
        host_mac: Some(mac("02:00:00:00:00:01")),
        host_mtu: 1280,
        altnames: vec![],
        expect_macs: vec![mac(&before.mac)],
        vf: None,
    };
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::NotFound);
    assert_eq!(show(None, &stranger.vf).unwrap(), before);

    // Down, but with a MAC the VF never had, or no MAC to prove it: still not ours.
    ip_ok(&["link", "set", &stranger.vf, "down"]);
    let down = show(None, &stranger.vf).unwrap();
    for expect_macs in [vec![mac("02:00:00:00:00:99")], vec![]] {
        let picky = RetrieveRequest {
            expect_macs,
            ..r.clone()
        };
        assert_eq!(ops.retrieve(&picky).unwrap(), Retrieved::NotFound);
        assert_eq!(show(None, &stranger.vf).unwrap(), down);
    }

    // Down, under a candidate name, it is taken as the VF back from a dead netns and renamed.
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromHost);
    let _renamed = Link {
        name: r.host_name.clone(),
    };
    let now = show(None, &r.host_name).expect("renamed to the host name");
    assert_eq!(
        (now.mac.as_str(), now.mtu, now.up),
        ("02:00:00:00:00:01", 1280, false)
    );
}

#[test]
fn retrieve_refuses_when_the_host_name_is_taken_at_home() {
    if !can_run("retrieve_refuses_when_the_host_name_is_taken_at_home") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();
    ops.place(&place_req(&veth.vf, &ns, 6)).unwrap();
    // Someone takes the name meanwhile.
    let squatter = uniq("s");
    ip_ok(&[
        "link", "add", &veth.vf, "type", "veth", "peer", "name", &squatter,
    ]);
    let _sq = Link { name: squatter };
    let r = retrieve_req(&veth.vf, Some(&ns), &orig);
    match ops.retrieve(&r) {
        Err(NetError::Exists { name, .. }) => assert_eq!(name, veth.vf),
        other => panic!("want Exists, got {other:?}"),
    }
    assert!(
        show(Some(&ns), "net1").is_some(),
        "moved although it could not be named"
    );
    ip_ok(&["link", "del", &veth.vf]);
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromPod);
}

/// Everything about a pod's own link that retrieve must not change: index (so: the same link,
/// in the same netns), name, MAC, MTU, up, altnames, global addresses.
fn pod_link(ns: &Netns, name: &str) -> Option<(String, Shown, String)> {
    let line = ns.ip(&["-o", "link", "show", "dev", name]).ok()?;
    let index = line.split(':').next()?.trim().to_owned();
    Some((index, show(Some(ns), name)?, global_addrs(ns, name)))
}

/// The pod's own `eth0`: a veth of its own with a MAC, an address, up.
fn pods_own_eth0(ns: &Netns, own_mac: &str) {
    ns.ip(&[
        "link", "add", "eth0", "address", own_mac, "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.88.0.2/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
}

/// Issue 8, finding 4: an ADD whose interface name already exists in the pod is refused, and
/// its rollback (the agent's release: retrieve, then restore) must take nothing of the pod's.
/// Before the fix, retrieve took the pod's `eth0` for the VF by name and failed with "exists"
/// (the VF was then quarantined), or, with the VF's host name free, moved the pod's `eth0` out.
#[test]
fn rollback_of_a_refused_place_leaves_the_pods_own_eth0_alone() {
    if !can_run("rollback_of_a_refused_place_leaves_the_pods_own_eth0_alone") {
        return;
    }
    let ns = Netns::new();
    pods_own_eth0(&ns, "02:00:00:00:e0:01");
    let before = pod_link(&ns, "eth0").unwrap();
    let veth = Veth::new();
    ip_ok(&[
        "link",
        "set",
        &veth.vf,
        "address",
        "02:11:22:33:44:57",
        "up",
    ]);
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();

    let mut req = place_req(&veth.vf, &ns, 10);
    req.pod_ifname = "eth0".into();
    match ops.place(&req) {
        Err(NetError::Exists { name, .. }) => assert_eq!(name, "eth0"),
        other => panic!("want Exists, got {other:?}"),
    }
    // The rollback asks for the VF as the agent does: pod name eth0, its MACs.
    let r = RetrieveRequest {
        pod_ifname: "eth0".into(),
        host_candidates: vec![veth.vf.clone(), "eth0".into()],
        ..retrieve_req(&veth.vf, Some(&ns), &orig)
    };
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromHost);
    assert_eq!(
        pod_link(&ns, "eth0").unwrap(),
        before,
        "the pod's eth0 changed"
    );
    let home = show(None, &veth.vf).expect("the VF's netdev is still at home");
    assert_eq!((home.mac.as_str(), home.mtu), (orig.mac.as_str(), orig.mtu));
    assert!(!home.up, "retrieve leaves it down");

    // The VF nowhere to be found: the pod's eth0 is still not taken for it.
    let gone = RetrieveRequest {
        host_name: uniq("gone"),
        host_candidates: vec![],
        ..r.clone()
    };
    let taken = Link {
        name: gone.host_name.clone(),
    };
    assert_eq!(ops.retrieve(&gone).unwrap(), Retrieved::NotFound);
    assert_eq!(
        pod_link(&ns, "eth0").unwrap(),
        before,
        "the pod's eth0 changed"
    );
    assert!(
        show(None, &taken.name).is_none(),
        "the pod's eth0 was moved out"
    );
}

/// A pod link that even has the VF's MAC is not taken when the VF's PCI address is known and
/// the kernel says the link has no parent device (a veth), or another one.
#[test]
fn a_pod_link_with_the_vfs_mac_but_not_its_parent_device_is_left_alone() {
    let test = "a_pod_link_with_the_vfs_mac_but_not_its_parent_device_is_left_alone";
    if !can_run(test) {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let major: u32 = release
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 6 {
        prereq::skip(
            test,
            &format!("needs Linux 6.x for IFLA_PARENT_DEV_NAME (have {release})"),
        );
        return;
    }
    let ns = Netns::new();
    pods_own_eth0(&ns, POD_MAC);
    let before = pod_link(&ns, "eth0").unwrap();
    let ops = ops();
    assert_eq!(
        ops.link(Some(&ns.path()), "eth0").unwrap().unwrap().parent,
        None
    );
    let host_name = uniq("gone");
    let taken = Link {
        name: host_name.clone(),
    };
    let r = RetrieveRequest {
        netns: Some(ns.path()),
        pod_ifname: "eth0".into(),
        host_candidates: vec![],
        host_name,
        host_mac: Some(mac("02:11:22:33:44:58")),
        host_mtu: 1500,
        altnames: vec![],
        expect_macs: vec![mac(POD_MAC)],
        vf: Some("0000:3b:02.1".parse().unwrap()),
    };
    assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::NotFound);
    assert_eq!(
        pod_link(&ns, "eth0").unwrap(),
        before,
        "the pod's eth0 changed"
    );
    assert!(
        show(None, &taken.name).is_none(),
        "the pod's eth0 was moved out"
    );
}

/// `LinkInfo::parent` is what the kernel says the device is: for a netdev with a device
/// (`/sys/class/net/<if>/device`), that device's name.
#[test]
fn parent_device_is_read_from_the_kernel() {
    let test = "parent_device_is_read_from_the_kernel";
    if !can_run(test) {
        return;
    }
    let with_device = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(Result::ok)
        .find_map(|e| {
            let dev = std::fs::canonicalize(e.path().join("device")).ok()?;
            Some((
                e.file_name().into_string().ok()?,
                dev.file_name()?.to_str()?.to_owned(),
            ))
        });
    let Some((name, device)) = with_device else {
        prereq::skip(test, "no netdev with a device in this netns");
        return;
    };
    let ops = ops();
    assert_eq!(ops.link(None, &name).unwrap().unwrap().parent, Some(device));
    let veth = Veth::new();
    assert_eq!(ops.link(None, &veth.vf).unwrap().unwrap().parent, None);
}

#[test]
fn macvlan_stand_in() {
    if !can_run("macvlan_stand_in") {
        return;
    }
    let ns = Netns::new();
    let lower = Veth::new();
    let mv = uniq("m");
    if let Err(e) = ip(&[
        "link", "add", &mv, "link", &lower.vf, "type", "macvlan", "mode", "bridge",
    ]) {
        prereq::skip(
            "macvlan_stand_in",
            &format!("cannot create a macvlan ({e})"),
        );
        return;
    }
    let _mv = Link { name: mv.clone() };
    let orig = show(None, &mv).unwrap();
    let ops = ops();
    let placed = ops.place(&place_req(&mv, &ns, 7)).unwrap();
    assert_eq!(placed.mac, Some(mac("02:00:00:aa:bb:cc")));
    assert!(show(Some(&ns), "net1").unwrap().up);
    assert_eq!(
        ops.retrieve(&retrieve_req(&mv, Some(&ns), &orig)).unwrap(),
        Retrieved::FromPod
    );
    let home = show(None, &mv).unwrap();
    assert_eq!((home.mac, home.mtu, home.up), (orig.mac, orig.mtu, false));
}

#[test]
fn a_missing_netns_is_reported_as_gone() {
    if !can_run("a_missing_netns_is_reported_as_gone") {
        return;
    }
    let ops = ops();
    let p = PathBuf::from(format!(
        "/var/run/netns/vfpt-{}-nonexistent",
        std::process::id()
    ));
    match ops.link(Some(&p), "eth0") {
        Err(NetError::Netns { gone: true, .. }) => {}
        other => panic!("want gone, got {other:?}"),
    }
    // A regular file is not a netns (what is left once the bind mount is gone).
    let f = tempfile::NamedTempFile::new().unwrap();
    match ops.link(Some(f.path()), "eth0") {
        Err(NetError::Netns { gone: true, .. }) => {}
        other => panic!("want gone, got {other:?}"),
    }
    let veth = Veth::new();
    let mut req = place_req(&veth.vf, &Netns::new(), 8);
    req.netns = p;
    assert!(matches!(
        ops.place(&req),
        Err(NetError::Netns { gone: true, .. })
    ));
    assert!(show(None, &veth.vf).is_some());
}

#[test]
fn vf_settings_on_links_that_are_not_pfs() {
    if !can_run("vf_settings_on_links_that_are_not_pfs") {
        return;
    }
    let nl = RtVfNetlink::new().unwrap();
    let missing = uniq("x");
    assert!(matches!(
        nl.read_vf(&missing, 0),
        Err(NetError::NoSuchLink { name, .. }) if name == missing
    ));
    assert!(matches!(
        nl.set_vf(&missing, 0, VfChange::Trust(true)),
        Err(NetError::NoSuchLink { .. })
    ));
    let veth = Veth::new();
    // A veth reports no VF list at all.
    assert!(nl.read_all(&veth.vf).unwrap().is_empty());
    assert!(matches!(
        nl.read_vf(&veth.vf, 0),
        Err(NetError::NoSuchVf { vf: 0, .. })
    ));
    // The kernel answers EOPNOTSUPP: veth has none of the ndo_set_vf_* operations.
    for change in [
        VfChange::Mac(mac("02:00:00:00:00:09")),
        VfChange::SpoofChk(false),
        VfChange::LinkState(VfLinkState::Disable),
    ] {
        match nl.set_vf(&veth.vf, 0, change) {
            Err(e) if e.is_not_supported() => {}
            other => panic!("{change:?}: want NotSupported, got {other:?}"),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn figures_place_retrieve_round_trip_and_socket_costs() {
    if !can_run("figures_place_retrieve_round_trip_and_socket_costs") {
        return;
    }
    let ns = Netns::new();
    let veth = Veth::new();
    let orig = show(None, &veth.vf).unwrap();
    let ops = ops();
    let req = place_req(&veth.vf, &ns, 9);
    let r = retrieve_req(&veth.vf, Some(&ns), &orig);
    let n = 100;
    let (mut place, mut back, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        ops.place(&req).unwrap();
        let t1 = Instant::now();
        assert_eq!(ops.retrieve(&r).unwrap(), Retrieved::FromPod);
        let t2 = Instant::now();
        place.push(t1 - t0);
        back.push(t2 - t1);
        total.push(t2 - t0);
    }
    for v in [&mut place, &mut back, &mut total] {
        v.sort();
    }
    for (what, v) in [
        ("place", &place),
        ("retrieve", &back),
        ("round trip", &total),
    ] {
        eprintln!(
            "FIGURE netdev {what} (veth, 2 addresses, 2 routes, n={n}): p50 {:?} p99 {:?}",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    assert_eq!(show(None, &veth.vf).unwrap().mac, orig.mac);

    // One shared socket versus a socket per call, for RtVfNetlink's choice.
    let nl = RtVfNetlink::new().unwrap();
    let m = 2000;
    let t = Instant::now();
    for _ in 0..m {
        assert!(nl.read_all(&veth.vf).unwrap().is_empty());
    }
    let shared = t.elapsed() / m;
    let t = Instant::now();
    for _ in 0..m {
        assert!(
            RtVfNetlink::new()
                .unwrap()
                .read_all(&veth.vf)
                .unwrap()
                .is_empty()
        );
    }
    let fresh = t.elapsed() / m;
    eprintln!(
        "FIGURE rtnetlink GETLINK+VF mask: shared socket {shared:?}/request, new socket per request {fresh:?}/request"
    );
}
