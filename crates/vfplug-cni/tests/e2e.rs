//! End to end: the real `vfplug` binary, exec'd as a runtime does, against the real `vfplugd`
//! on a fake SR-IOV node whose VF netdevs are real veth links, into real network namespaces,
//! with Debian's real `host-local` as the delegated IPAM (it speaks CNI up to 1.0.0; the configs
//! here are 1.1.0, so every call also goes through version negotiation; 0.3.1 and 0.2.0 ones
//! in `older_cni_versions_add_and_del`). The harness is
//! `tests/common/mod.rs`. Needs root, `ip` and /usr/lib/cni/host-local; skips loudly otherwise (fails with
//! `VFPLUG_REQUIRE=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{CNI_DIR, Host, Pod, link, links_in, missing_prerequisite};
use serde_json::{Value, json};
use vfplug_host::prereq;

/// The host, or `None` after saying why the test cannot run here (a failure instead with
/// `VFPLUG_REQUIRE=1`).
fn host(test: &str, vfs: u32) -> Option<Host> {
    if let Some(why) = missing_prerequisite() {
        prereq::skip(test, &why);
        return None;
    }
    Some(Host::start(vfs))
}

/// Asserts a successful run with empty or JSON stdout.
#[track_caller]
fn ok(out: &vfplug_cni::testing::PluginRun) {
    assert_eq!(
        out.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
}

fn add(h: &Host, cid: &str, pod: &Pod, conf: &Value) -> Value {
    let out = h.cni("ADD", cid, &pod.path, "net1", conf);
    ok(&out);
    out.json()
}

#[test]
fn add_with_device_id_then_check_and_repeated_add() {
    let Some(h) = host("add_with_device_id_then_check_and_repeated_add", 2) else {
        return;
    };
    let pod = h.pod();
    let vf = &h.vfs[0];
    let conf = h.conf(
        json!({"deviceID": vf.pci, "mac": "02:00:00:00:77:01", "mtu": 1400,
        "vlan": 100, "spoofchk": "on"}),
    );
    let r = add(&h, "c1", &pod, &conf);

    // The result.
    assert_eq!(r["cniVersion"], "1.1.0");
    let i = &r["interfaces"][0];
    assert_eq!(i["name"], "net1");
    assert_eq!(i["pciID"], vf.pci.as_str());
    assert_eq!(i["mac"], "02:00:00:00:77:01");
    assert_eq!(i["sandbox"], pod.path.as_str());
    assert_eq!(
        r["ips"],
        json!([{"address": "10.99.0.10/24", "gateway": "10.99.0.1", "interface": 0}])
    );
    // The host: the netdev is in the pod, renamed, with MAC, MTU and address; gone from home.
    let l = link(Some(&pod.name), "net1").expect("net1 in the pod");
    assert_eq!(
        (l.mac.as_str(), l.mtu, l.addrs.clone()),
        ("02:00:00:00:77:01", 1400, vec!["10.99.0.10/24".to_owned()])
    );
    assert!(link(None, &vf.name).is_none(), "{} still home", vf.name);
    assert_eq!(h.leases(), ["10.99.0.10"]);
    let e = h
        .list()
        .into_iter()
        .find(|e| e.pci_address == vf.pci)
        .unwrap();
    assert_eq!(e.state, "configured");
    let owner = e.owner.unwrap();
    assert_eq!(
        (owner.container_id.as_str(), owner.ifname.as_str()),
        ("c1", "net1")
    );
    assert_eq!(e.netns, pod.path);
    assert_eq!(h.state(&h.vfs[1].pci), "free");

    // CHECK with the prevResult passes; after the pod's MTU drifted it fails (103), naming it.
    let mut ck = conf.clone();
    ck["prevResult"] = r.clone();
    ok(&h.cni("CHECK", "c1", &pod.path, "net1", &ck));
    common::ip(&["-n", &pod.name, "link", "set", "net1", "mtu", "1200"]);
    let out = h.cni("CHECK", "c1", &pod.path, "net1", &ck);
    assert_eq!(out.error_code(), 103, "{}", out.stdout);
    assert!(out.error_msg().contains("MTU"), "{}", out.stdout);
    common::ip(&["-n", &pod.name, "link", "set", "net1", "mtu", "1400"]);
    ok(&h.cni("CHECK", "c1", &pod.path, "net1", &ck));

    // A repeated ADD is answered from vfplugd's ledger, IPAM result included: host-local is not
    // asked again (it would refuse a second allocation for the same container), the result is
    // identical and nothing on the host moves.
    let again = add(&h, "c1", &pod, &conf);
    assert_eq!(again, r);
    assert_eq!(h.leases(), ["10.99.0.10"]);
    assert_eq!(link(Some(&pod.name), "net1").unwrap(), l);
    assert_eq!(h.state(&vf.pci), "configured");
    assert_eq!(links_in(&pod.name).len(), 2, "{:?}", links_in(&pod.name));
}

#[test]
fn add_with_a_pool_picks_a_free_vf() {
    let Some(h) = host("add_with_a_pool_picks_a_free_vf", 2) else {
        return;
    };
    let (p1, p2) = (h.pod(), h.pod());
    let conf = h.conf(json!({"pool": "net"}));
    let r1 = add(&h, "c1", &p1, &conf);
    let r2 = add(&h, "c2", &p2, &conf);
    let (a, b) = (
        r1["interfaces"][0]["pciID"].as_str().unwrap().to_owned(),
        r2["interfaces"][0]["pciID"].as_str().unwrap().to_owned(),
    );
    assert_ne!(a, b, "two attachments got the same VF");
    for (pci, pod) in [(&a, &p1), (&b, &p2)] {
        assert!(h.vfs.iter().any(|v| &v.pci == pci), "{pci} is not ours");
        assert_eq!(h.state(pci), "configured");
        assert!(link(Some(&pod.name), "net1").is_some());
    }
    // The pool is empty now: the next ADD is told to try again later, and changes nothing.
    let p3 = h.pod();
    let out = h.cni("ADD", "c3", &p3.path, "net1", &conf);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    assert_eq!(h.leases().len(), 2, "the third ADD's lease was rolled back");
    for c in ["c1", "c2"] {
        ok(&h.cni("DEL", c, "", "net1", &conf));
    }
    h.assert_all_free();
}

#[test]
fn del_restores_the_netdev_and_frees_vf_and_lease() {
    let Some(h) = host("del_restores_the_netdev_and_frees_vf_and_lease", 1) else {
        return;
    };
    let pod = h.pod();
    let vf = &h.vfs[0];
    let conf = h.conf(json!({"deviceID": vf.pci, "mac": "02:00:00:00:77:02", "mtu": 1300}));
    let r = add(&h, "c1", &pod, &conf);
    let mut del = conf.clone();
    del["prevResult"] = r;
    ok(&h.cni("DEL", "c1", &pod.path, "net1", &del));
    h.assert_home(vf);
    assert!(link(Some(&pod.name), "net1").is_none());
    assert!(h.leases().is_empty(), "{:?}", h.leases());
    h.assert_all_free();
    // Twice: still fine, nothing changes.
    ok(&h.cni("DEL", "c1", &pod.path, "net1", &del));
    h.assert_home(vf);
    h.assert_all_free();

    // DEL with an empty CNI_NETNS (the runtime lost it): the ledger knows where the netdev is.
    add(&h, "c2", &pod, &conf);
    assert_eq!(h.state(&vf.pci), "configured");
    ok(&h.cni("DEL", "c2", "", "net1", &conf));
    h.assert_home(vf);
    assert!(h.leases().is_empty(), "{:?}", h.leases());
    h.assert_all_free();
}

/// sriov-cni NADs say 0.3.1 (its own examples) and some still 0.2.0: ADD configures the pod
/// netdev with host-local's address and prints that version's shape; DEL (without a
/// prevResult, as those versions send it) restores the VF and frees the lease.
#[test]
fn older_cni_versions_add_and_del() {
    let Some(h) = host("older_cni_versions_add_and_del", 1) else {
        return;
    };
    let vf = &h.vfs[0];
    for v in ["0.3.1", "0.2.0"] {
        let pod = h.pod();
        let conf = h.conf(json!({"cniVersion": v, "deviceID": vf.pci, "mac": "02:00:00:00:77:03"}));
        let r = add(&h, "c1", &pod, &conf);
        // host-local hands out addresses round-robin: the second run gets the next one.
        let leases = h.leases();
        assert_eq!(leases.len(), 1, "{v}: {leases:?}");
        let addr = format!("{}/24", leases[0]);
        let want = if v == "0.3.1" {
            json!({"cniVersion": v,
                "interfaces": [{"name": "net1", "mac": "02:00:00:00:77:03", "sandbox": pod.path}],
                "ips": [{"version": "4", "address": addr, "gateway": "10.99.0.1",
                         "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}})
        } else {
            json!({"cniVersion": v,
                "ip4": {"ip": addr, "gateway": "10.99.0.1",
                        "routes": [{"dst": "0.0.0.0/0"}]},
                "dns": {}})
        };
        assert_eq!(r, want, "{v}");
        let l = link(Some(&pod.name), "net1").expect("net1 in the pod");
        assert_eq!(
            (l.mac.as_str(), l.addrs.clone()),
            ("02:00:00:00:77:03", vec![addr.clone()]),
            "{v}"
        );
        assert_eq!(h.state(&vf.pci), "configured", "{v}");
        // CHECK exists from 0.4.0 only.
        let mut ck = conf.clone();
        ck["prevResult"] = r;
        assert_eq!(
            h.cni("CHECK", "c1", &pod.path, "net1", &ck).error_code(),
            1,
            "{v}"
        );

        ok(&h.cni("DEL", "c1", &pod.path, "net1", &conf));
        h.assert_home(vf);
        assert!(h.leases().is_empty(), "{v}: {:?}", h.leases());
        h.assert_all_free();
    }
}

#[test]
fn del_after_the_netns_is_gone() {
    let Some(h) = host("del_after_the_netns_is_gone", 1) else {
        return;
    };
    let pod = h.pod();
    let vf = &h.vfs[0];
    let conf = h.conf(json!({"deviceID": vf.pci}));
    add(&h, "c1", &pod, &conf);
    common::ip(&["netns", "del", &pod.name]);
    // A veth end dies with its netns (a real VF netdev would come home instead).
    assert!(link(None, &vf.name).is_none());
    ok(&h.cni("DEL", "c1", &pod.path, "net1", &conf));
    h.assert_all_free();
    assert!(h.leases().is_empty(), "{:?}", h.leases());
    ok(&h.cni("DEL", "c1", "", "net1", &conf));
}

#[test]
fn gc_keeps_only_the_valid_attachments() {
    let Some(h) = host("gc_keeps_only_the_valid_attachments", 2) else {
        return;
    };
    let (p1, p2) = (h.pod(), h.pod());
    add(&h, "keep", &p1, &h.conf(json!({"deviceID": h.vfs[0].pci})));
    add(&h, "drop", &p2, &h.conf(json!({"deviceID": h.vfs[1].pci})));
    let mut gc = h.conf(json!({}));
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "net1"}]);
    let out = h.run_env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", CNI_DIR)], &gc);
    ok(&out);
    assert_eq!(out.stdout, "");
    assert_eq!(h.state(&h.vfs[0].pci), "configured");
    assert!(link(Some(&p1.name), "net1").is_some());
    assert_eq!(h.state(&h.vfs[1].pci), "free");
    h.assert_home(&h.vfs[1]);
    // host-local 1.1.x (CNI <= 1.0.0) has no GC, so the shim does not delegate it: the dropped
    // attachment's address stays leased until its DEL (which the runtime still sends).
    assert_eq!(h.leases(), ["10.99.0.10", "10.99.0.11"]);
    ok(&h.cni("DEL", "drop", &p2.path, "net1", &h.conf(json!({}))));
    assert_eq!(h.leases(), ["10.99.0.10"]);
}

#[test]
fn status_and_vfplugd_down() {
    let Some(h) = host("status_and_vfplugd_down", 1) else {
        return;
    };
    let conf = h.conf(json!({"pool": "net"}));
    let status_env = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", CNI_DIR)];
    ok(&h.run_env(&status_env, &conf));
    h.stop_vfplugd();
    let out = h.run_env(&status_env, &conf);
    assert_eq!(out.error_code(), 50, "{}", out.stdout);
    let pod = h.pod();
    let out = h.cni("ADD", "c1", &pod.path, "net1", &conf);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    assert!(
        out.error_msg().contains(h.socket.to_str().unwrap()),
        "{}",
        out.stdout
    );
    // Nothing was allocated before vfplugd was found missing.
    assert!(h.leases().is_empty(), "{:?}", h.leases());
    h.assert_home(&h.vfs[0]);
}

/// Nothing changed on the host: every veth home as it was, nothing in the pod but `lo`, every
/// VF free, no address leased.
#[track_caller]
fn assert_untouched(h: &Host, pod: &Pod, case: &str) {
    for vf in &h.vfs {
        let now = link(None, &vf.name).unwrap_or_else(|| panic!("{case}: {} gone", vf.name));
        assert_eq!(now, vf.orig, "{case}: {} changed", vf.name);
    }
    assert_eq!(links_in(&pod.name), ["lo"], "{case}");
    let busy: Vec<_> = h
        .list()
        .into_iter()
        .filter(|v| v.state != "free")
        .map(|v| (v.pci_address, v.state))
        .collect();
    assert!(busy.is_empty(), "{case}: {busy:?}");
    assert!(h.leases().is_empty(), "{case}: leases {:?}", h.leases());
}

#[test]
fn bad_inputs_fail_with_the_right_code_and_change_nothing() {
    let Some(h) = host("bad_inputs_fail_with_the_right_code_and_change_nothing", 2) else {
        return;
    };
    let pod = h.pod();
    let vf0 = h.vfs[0].pci.clone();
    let missing_ns = format!("/var/run/netns/vfplug-e2e-absent-{}", std::process::id());
    let base_env: Vec<(&str, &str)> = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "bad"),
        ("CNI_NETNS", &pod.path),
        ("CNI_IFNAME", "net1"),
        ("CNI_PATH", CNI_DIR),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=bad"),
    ];
    let good = h.conf(json!({"deviceID": vf0}));
    // (case, env changes (None: unset), config changes (Null: remove), code, msg needle)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, Option<&'a str>)>,
        Value,
        u64,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "no container id",
            vec![("CNI_CONTAINERID", None)],
            json!({}),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "no netns",
            vec![("CNI_NETNS", None)],
            json!({}),
            4,
            "CNI_NETNS",
        ),
        (
            "relative netns",
            vec![("CNI_NETNS", Some("pod"))],
            json!({}),
            4,
            "CNI_NETNS",
        ),
        (
            "ifname too long",
            vec![("CNI_IFNAME", Some("a23456789012345678"))],
            json!({}),
            4,
            "CNI_IFNAME",
        ),
        (
            "ifname with /",
            vec![("CNI_IFNAME", Some("a/b"))],
            json!({}),
            4,
            "CNI_IFNAME",
        ),
        (
            "unknown CNI_ARGS",
            vec![("CNI_ARGS", Some("FOO=1"))],
            json!({}),
            4,
            "CNI_ARGS",
        ),
        (
            "no CNI_PATH with ipam",
            vec![("CNI_PATH", None)],
            json!({}),
            4,
            "CNI_PATH",
        ),
        (
            "bad cniVersion",
            vec![],
            json!({"cniVersion": "1.2.0"}),
            1,
            "cniVersion",
        ),
        (
            "vlan out of range",
            vec![],
            json!({"vlan": 5000}),
            7,
            "vlan",
        ),
        (
            "vlanQoS without vlan",
            vec![],
            json!({"vlanQoS": 3}),
            7,
            "vlanQoS",
        ),
        (
            "multicast mac",
            vec![],
            json!({"mac": "01:00:5e:00:00:01"}),
            7,
            "mac",
        ),
        ("mtu too small", vec![], json!({"mtu": 10}), 7, "mtu"),
        (
            "spoofchk not on/off",
            vec![],
            json!({"spoofchk": "yes"}),
            7,
            "spoofchk",
        ),
        (
            "malformed deviceID",
            vec![],
            json!({"deviceID": "zz:zz"}),
            7,
            "deviceID",
        ),
        (
            "neither deviceID nor pool",
            vec![],
            json!({"deviceID": null}),
            7,
            "deviceID",
        ),
        (
            "unknown ipam plugin",
            vec![],
            json!({"ipam": {"type": "no-such-ipam"}}),
            7,
            "no-such-ipam",
        ),
        // Only vfplugd can judge these (host-local allocated first: the rollback must free it).
        (
            "deviceID not on this node",
            vec![],
            json!({"deviceID": "0000:3b:09.7"}),
            104,
            "0000:3b:09.7",
        ),
        (
            "unknown pool",
            vec![],
            json!({"deviceID": null, "pool": "no-such-pool"}),
            104,
            "no-such-pool",
        ),
        (
            "netns that does not exist",
            vec![("CNI_NETNS", Some(&missing_ns))],
            json!({}),
            4,
            "netns",
        ),
    ];
    for (case, env_changes, conf_changes, code, needle) in &cases {
        let mut env = base_env.clone();
        for (k, v) in env_changes {
            env.retain(|(n, _)| n != k);
            if let Some(v) = v {
                env.push((k, v));
            }
        }
        let mut conf = good.clone();
        for (k, v) in conf_changes.as_object().unwrap() {
            if v.is_null() {
                conf.as_object_mut().unwrap().remove(k);
            } else {
                conf[k] = v.clone();
            }
        }
        let out = h.run_env(&env, &conf);
        assert_eq!(out.error_code(), *code, "{case}: {}", out.stdout);
        let msg = out.error_msg();
        assert!(
            msg.to_lowercase().contains(&needle.to_lowercase()),
            "{case}: msg {msg:?} does not name {needle:?}"
        );
        assert_untouched(&h, &pod, case);
    }

    // A VF held by another attachment: 102, and the holder keeps it untouched.
    let holder_pod = h.pod();
    let vf1 = &h.vfs[1];
    let held = h.conf(json!({"deviceID": vf1.pci, "mac": "02:00:00:00:77:09"}));
    let holder_ip = add(&h, "holder", &holder_pod, &held)["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/24")
        .to_owned();
    let before = link(Some(&holder_pod.name), "net1").unwrap();
    let out = h.cni("ADD", "thief", &pod.path, "net1", &held);
    assert_eq!(out.error_code(), 102, "{}", out.stdout);
    assert!(out.error_msg().contains(&vf1.pci), "{}", out.stdout);
    assert_eq!(link(Some(&holder_pod.name), "net1").unwrap(), before);
    assert_eq!(links_in(&pod.name), ["lo"]);
    let e = h
        .list()
        .into_iter()
        .find(|e| e.pci_address == vf1.pci)
        .unwrap();
    assert_eq!(
        (e.state.as_str(), e.owner.unwrap().container_id.as_str()),
        ("configured", "holder")
    );
    assert_eq!(h.leases(), [holder_ip], "the thief's lease was rolled back");
    // The thief's DEL (the runtime DELs after a failed ADD) must not touch the holder's VF.
    ok(&h.cni("DEL", "thief", &pod.path, "net1", &held));
    assert_eq!(link(Some(&holder_pod.name), "net1").unwrap(), before);
    assert_eq!(h.state(&vf1.pci), "configured");
    ok(&h.cni("DEL", "holder", &holder_pod.path, "net1", &held));
    assert_untouched(&h, &pod, "after the holder's DEL");
}

/// Issue 8, finding 4, through the real binaries: an ADD whose interface name the pod already
/// has is refused (101), and its rollback leaves the pod's own interface as it was and the VF
/// free at home (before the fix it took the pod's link for the VF and quarantined the VF), so
/// the next ADD gets the VF.
#[test]
fn add_over_an_existing_pod_interface_touches_neither_it_nor_the_vf() {
    let Some(h) = host(
        "add_over_an_existing_pod_interface_touches_neither_it_nor_the_vf",
        1,
    ) else {
        return;
    };
    let pod = h.pod();
    let n = pod.name.as_str();
    common::ip(&[
        "-n",
        n,
        "link",
        "add",
        "net1",
        "address",
        "02:00:00:00:e0:01",
        "type",
        "veth",
        "peer",
        "name",
        "net1p",
    ]);
    common::ip(&["-n", n, "addr", "add", "10.88.0.2/24", "dev", "net1"]);
    common::ip(&["-n", n, "link", "set", "net1", "up"]);
    let before = link(Some(n), "net1").unwrap();
    let conf = h.conf(json!({"deviceID": h.vfs[0].pci}));

    let out = h.cni("ADD", "c1", &pod.path, "net1", &conf);
    assert_eq!(out.error_code(), 101, "{}", out.stdout);
    assert!(out.error_msg().contains("exists"), "{}", out.stdout);
    assert_eq!(
        link(Some(n), "net1").unwrap(),
        before,
        "the pod's net1 changed"
    );
    assert_eq!(h.state(&h.vfs[0].pci), "free", "{}", h.log());
    h.assert_home(&h.vfs[0]);

    let other = h.pod();
    let r = add(&h, "c2", &other, &conf);
    assert_eq!(r["interfaces"][0]["pciID"], h.vfs[0].pci.as_str());
}
