//! The real `vfplug` binary, exec'd as a runtime would: exact `CNI_*` environment, config on
//! stdin, the protocol JSON (and nothing else) on stdout. Against a fake node API server on a
//! unix socket (which records the requests) and fake IPAM plugins (shell scripts in a CNI_PATH
//! directory that record their calls).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use vfplug_api::{CniCode, v1};
use vfplug_cni::devinfo::DeviceInfo;
use vfplug_cni::testing::{Call, Failure, FakeIpam, FakeNode, Plugin, PluginRun, Script, tempdir};
use vfplug_host::prereq;

const NETNS: &str = "/var/run/netns/pod-x";

/// Debian's host-local (package containernetworking-plugins).
fn plugin() -> Plugin {
    Plugin::new(env!("CARGO_BIN_EXE_vfplug"))
}

fn conf(socket: &std::path::Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "sriov-net",
        "type": "vfplug",
        "deviceID": "0000:3b:02.1",
        "vlan": 100,
        "spoofchk": "on",
        "socket": socket.to_str().unwrap(),
        "timeoutSeconds": 5,
    })
}

struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(cmd: &str, cni_path: &std::path::Path) -> Self {
        Self {
            vars: vec![
                ("CNI_COMMAND".into(), cmd.into()),
                ("CNI_CONTAINERID".into(), "c0ffee".into()),
                ("CNI_NETNS".into(), NETNS.into()),
                ("CNI_IFNAME".into(), "net1".into()),
                (
                    "CNI_ARGS".into(),
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod-a;K8S_POD_UID=uid-a"
                        .into(),
                ),
                ("CNI_PATH".into(), cni_path.to_str().unwrap().into()),
            ],
        }
    }

    fn without(mut self, k: &str) -> Self {
        self.vars.retain(|(n, _)| n != k);
        self
    }

    fn set(mut self, k: &str, v: &str) -> Self {
        self = self.without(k);
        self.vars.push((k.into(), v.into()));
        self
    }

    fn run(&self, stdin: &Value) -> PluginRun {
        let pairs: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        plugin().run(&pairs, stdin.to_string().as_bytes()).unwrap()
    }
}

fn ipam_add_result() -> String {
    json!({
        "cniVersion": "1.1.0",
        "ips": [{"address": "192.168.10.7/24", "gateway": "192.168.10.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["192.168.10.53"]}
    })
    .to_string()
}

#[test]
fn version_prints_only_the_version_json() {
    let out = plugin()
        .run(&[("CNI_COMMAND", "VERSION")], b"not json at all")
        .unwrap();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
    // No runtime, no socket, no logging set up: nothing on stderr either.
    assert_eq!(out.stderr, "");
}

/// VERSION must not read stdin: a runtime may leave it open, and the plugin must still answer.
#[test]
fn version_does_not_wait_for_stdin() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vfplug"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // stdin stays open (held here) until the end of the test.
    let _stdin = child.stdin.take();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("VERSION waited for stdin");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("supportedVersions"), "{out}");
}

#[test]
fn bad_inputs_print_one_error_object_and_exit_non_zero() {
    let dir = tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let good = conf(&sock);
    let cases: Vec<(Env, Value, u64, &str)> = vec![
        (
            Env::new("ADD", dir.path()).without("CNI_COMMAND"),
            good.clone(),
            4,
            "CNI_COMMAND",
        ),
        (
            Env::new("ADD", dir.path()).without("CNI_NETNS"),
            good.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            Env::new("ADD", dir.path()).set("CNI_IFNAME", "a/b"),
            good.clone(),
            4,
            "CNI_IFNAME",
        ),
        (
            Env::new("ADD", dir.path()).set("CNI_ARGS", "X=1"),
            good.clone(),
            4,
            "CNI_ARGS",
        ),
        (
            Env::new("ADD", dir.path()),
            json!("just a string"),
            6,
            "JSON object",
        ),
        (
            Env::new("ADD", dir.path()),
            json!({"cniVersion": "0.5.0", "name": "n", "type": "t"}),
            1,
            "0.5.0",
        ),
        (
            Env::new("ADD", dir.path()),
            {
                let mut c = good.clone();
                c["vlan"] = json!("ten");
                c
            },
            7,
            "vlan: expected integer 0..=4094, got \"ten\"",
        ),
        (
            Env::new("DEL", dir.path()),
            {
                let mut c = good.clone();
                c["ipam"] = json!({"type": "no-such-ipam"});
                c
            },
            7,
            "ipam plugin \"no-such-ipam\" not found in CNI_PATH",
        ),
    ];
    for (env, stdin, code, needle) in cases {
        let out = env.run(&stdin);
        assert_eq!(out.code, Some(1), "{needle}: {}", out.stderr);
        assert_eq!(out.error_code(), code, "{needle}: {}", out.stdout);
        assert!(out.error_msg().contains(needle), "{needle}: {}", out.stdout);
        // Exactly one line: the object.
        assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    }
    // The error is written in the config's version when it can be read.
    let mut c = good.clone();
    c["cniVersion"] = json!("0.4.0");
    c["mac"] = json!("bad");
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.json()["cniVersion"], "0.4.0");
    // Over the size limit.
    let big = vec![b' '; vfplug_cni::config::MAX_CONFIG_BYTES + 10];
    let out = plugin().run(&[("CNI_COMMAND", "STATUS")], &big).unwrap();
    assert_eq!(out.error_code(), 6);
    assert!(out.error_msg().contains("limit"), "{}", out.stdout);
}

#[test]
fn vfplugd_unreachable_is_11_for_add_del_gc_and_50_for_status() {
    let dir = tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let mut c = conf(&sock);
    c["cni.dev/valid-attachments"] = json!([]);
    // DEL carries the cached result of the successful ADD: vfplugd holds a VF, retry (11).
    let mut with_prev = c.clone();
    with_prev["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "sandbox": "/var/run/netns/p", "pciID": "0000:3b:02.1"}],
        "ips": [],
    });
    for (cmd, conf, code) in [
        ("ADD", &c, 11),
        ("DEL", &with_prev, 11),
        ("GC", &c, 11),
        ("STATUS", &c, 50),
    ] {
        let out = Env::new(cmd, dir.path()).run(conf);
        assert_eq!(out.error_code(), code, "{cmd}: {}", out.stdout);
        assert!(
            out.error_msg().contains(sock.to_str().unwrap()),
            "{cmd}: {}",
            out.stdout
        );
    }
    // DEL without a prevResult: no ADD of this attachment ever succeeded, so there is nothing
    // to release and the pod must not stay Terminating while vfplugd is away (issue 8, 8).
    let out = Env::new("DEL", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);
    // Before CNI 0.4.0 DEL never carries a prevResult: nothing can be concluded, retry.
    let mut old = c.clone();
    old["cniVersion"] = json!("0.3.1");
    let out = Env::new("DEL", dir.path()).run(&old);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    // A socket file nobody listens on (vfplugd died): the same.
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(_l);
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
}

#[test]
fn add_maps_env_and_config_to_the_request_and_prints_the_result() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["runtimeConfig"] = json!({"mac": "02:00:00:00:00:aa",
        "CNIDeviceInfoFile": dir.path().join("devinfo.json").to_str().unwrap()});
    c["logFile"] = json!(dir.path().join("vfplug.log").to_str().unwrap());
    c["logLevel"] = json!("debug");
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);

    let calls = node.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let Call::Add(req) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(
        req.attachment,
        Some(v1::Attachment {
            container_id: "c0ffee".into(),
            ifname: "net1".into(),
            pod_uid: "uid-a".into(),
            pod_namespace: "ns1".into(),
            pod_name: "pod-a".into(),
        })
    );
    assert_eq!(req.netns, NETNS);
    assert_eq!(req.network, "sriov-net");
    assert_eq!(req.device_id, "0000:3b:02.1");
    assert_eq!(req.pool, "");
    assert_eq!(
        req.config,
        Some(v1::VfConfig {
            mac: Some("02:00:00:00:00:aa".into()),
            vlan: Some(100),
            spoofchk: Some(true),
            ..Default::default()
        })
    );
    assert!(req.ips.is_empty() && req.routes.is_empty());

    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "interfaces": [{
            "name": "net1", "mac": "02:00:00:00:00:aa", "mtu": 1500, "sandbox": NETNS,
            "pciID": "0000:3b:02.1"}]})
    );
    // Device info for Multus.
    let di: DeviceInfo =
        serde_json::from_slice(&std::fs::read(dir.path().join("devinfo.json")).unwrap()).unwrap();
    assert_eq!(di, DeviceInfo::pci("0000:3b:02.1", "0000:3b:00.0"));
    // Logs went to the file, not stderr; stdout had only the result.
    let log = std::fs::read_to_string(dir.path().join("vfplug.log")).unwrap();
    assert!(log.contains("attached net1"), "{log}");
    assert_eq!(out.stderr, "");

    // 1.0.0: no pciID, no mtu.
    c["cniVersion"] = json!("1.0.0");
    let out = Env::new("ADD", dir.path()).run(&c);
    let iface = &out.json()["interfaces"][0];
    assert!(
        iface.get("pciID").is_none() && iface.get("mtu").is_none(),
        "{iface}"
    );
}

#[test]
fn add_without_device_id_asks_for_the_pool() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c.as_object_mut().unwrap().remove("deviceID");
    c["pool"] = json!("intel.com/sriov_vm");
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let Call::Add(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(
        (req.device_id.as_str(), req.pool.as_str()),
        ("", "intel.com/sriov_vm")
    );
    assert_eq!(out.json()["interfaces"][0]["pciID"], "0000:3b:02.1");
}

#[test]
fn add_with_delegated_ipam() {
    let dir = tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let ipam = FakeIpam::create(&bin, "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "fake-ipam", "subnet": "192.168.10.0/24"});
    // A CNI_PATH with a missing directory first: the search goes on.
    let path = format!("{}:{}", dir.path().join("nope").display(), bin.display());
    let out = Env::new("ADD", dir.path()).set("CNI_PATH", &path).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);

    // The IPAM plugin got our env and exactly our stdin.
    // First its VERSION (negotiation), then ADD.
    let calls = ipam.calls().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].env["CNI_COMMAND"], "VERSION");
    assert_eq!(calls[0].stdin, r#"{"cniVersion":"1.1.0"}"#);
    let call = &calls[1];
    for (k, v) in [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "net1"),
        ("CNI_PATH", path.as_str()),
    ] {
        assert_eq!(call.env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(call.env["CNI_ARGS"].contains("K8S_POD_UID=uid-a"));
    assert_eq!(call.stdin, c.to_string());

    // vfplugd got the addresses.
    let Call::Add(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(
        req.ips,
        vec![v1::IpConfig {
            address: "192.168.10.7/24".into(),
            gateway: "192.168.10.1".into()
        }]
    );
    assert_eq!(
        req.routes,
        vec![v1::RouteConfig {
            dst: "0.0.0.0/0".into(),
            gw: String::new()
        }]
    );
    // The result has them, pointing at our interface.
    let r = out.json();
    assert_eq!(
        r["ips"],
        json!([{"address": "192.168.10.7/24", "gateway": "192.168.10.1", "interface": 0}])
    );
    assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0"}]));
    assert_eq!(r["dns"], json!({"nameservers": ["192.168.10.53"]}));
}

#[test]
fn add_chains_after_prev_result() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["prevResult"] = json!({"cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "sandbox": NETNS}],
        "ips": [{"address": "10.0.0.5/24", "interface": 0}]});
    let out = Env::new("ADD", dir.path()).run(&c);
    let r = out.json();
    assert_eq!(r["interfaces"][0]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["name"], "net1");
    assert_eq!(r["ips"][0]["address"], "10.0.0.5/24");
}

#[test]
fn failed_node_add_prints_vfplugds_code_and_rolls_back_ipam() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    node.set_script(Script {
        add: Some(Err(Failure::new(
            CniCode::VfBusy,
            "VF 0000:3b:02.1 is held by pod ns/other",
        ))),
        ..Default::default()
    });
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "fake-ipam"});
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 102);
    let j = out.json();
    assert_eq!(j["msg"], "VF 0000:3b:02.1 is held by pod ns/other");
    assert_eq!(
        j["details"],
        "details of VF 0000:3b:02.1 is held by pod ns/other"
    );
    assert_eq!(ipam.commands().unwrap(), vec!["VERSION", "ADD", "DEL"]);
}

/// Neither deviceID nor pool (a NAD without the resourceName annotation): vfplugd's refusal,
/// which names the VF the kubelet gave the pod, reaches the runtime, and IPAM is never run.
#[test]
fn add_without_device_or_pool_gets_vfplugds_hint_before_any_ipam() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let hint = "neither deviceID nor pool is set; the kubelet gave this pod VF 0000:3b:02.4";
    node.set_script(Script {
        add: Some(Err(Failure::new(CniCode::InvalidConfig, hint))),
        ..Default::default()
    });
    let mut c = conf(&node.socket);
    c.as_object_mut().unwrap().remove("deviceID");
    c["ipam"] = json!({"type": "fake-ipam"});
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert_eq!(out.json()["msg"], hint);
    let Call::Add(req) = &node.calls()[0] else {
        panic!("{:?}", node.calls())
    };
    assert_eq!((req.device_id.as_str(), req.pool.as_str()), ("", ""));
    assert!(
        !ipam
            .commands()
            .unwrap_or_default()
            .contains(&"ADD".to_string()),
        "IPAM ran"
    );
}

#[test]
fn ipam_errors_pass_through_or_become_105() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let cni_err = r#"{"cniVersion":"1.1.0","code":11,"msg":"no free addresses","details":"pool 10.0.0.0/30"}"#;
    FakeIpam::create(dir.path(), "says-11", "", &[("ADD", cni_err, 1)]).unwrap();
    FakeIpam::create(dir.path(), "crashes", "", &[("ADD", "segfault or so", 139)]).unwrap();
    FakeIpam::create(dir.path(), "prints-junk", "{\"ips\": 5}", &[]).unwrap();
    for (name, code, needle) in [
        ("says-11", 11, "no free addresses"),
        ("crashes", 105, "failed ADD"),
        ("prints-junk", 105, "ips"),
    ] {
        let mut c = conf(&node.socket);
        c["ipam"] = json!({"type": name});
        let out = Env::new("ADD", dir.path()).run(&c);
        assert_eq!(out.error_code(), code, "{name}: {}", out.stdout);
        assert!(out.error_msg().contains(needle), "{name}: {}", out.stdout);
        assert!(out.error_msg().contains(name), "{name}: {}", out.stdout);
    }
    // The passed-through error keeps its details.
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "says-11"});
    assert_eq!(
        Env::new("ADD", dir.path()).run(&c).json()["details"],
        "pool 10.0.0.0/30"
    );
    // vfplugd was never asked for a VF.
    assert!(node.calls().is_empty(), "{:?}", node.calls());
}

#[test]
fn del_uses_the_pci_hint_then_ipam_and_tolerates_a_missing_netns() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "fake-ipam"});
    c["prevResult"] = json!({"cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "sandbox": NETNS, "pciID": "0000:3b:02.6"}]});
    let out = Env::new("DEL", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    let Call::Del(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(req.device_id, "0000:3b:02.6");
    assert_eq!(req.netns, NETNS);
    assert_eq!(req.network, "sriov-net");
    assert_eq!(req.attachment.as_ref().unwrap().pod_uid, "uid-a");
    assert_eq!(ipam.commands().unwrap(), vec!["VERSION", "DEL"]);

    // No netns (gone), no prevResult: still a Del with the config's deviceID.
    c.as_object_mut().unwrap().remove("prevResult");
    let out = Env::new("DEL", dir.path()).without("CNI_NETNS").run(&c);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let Call::Del(req) = &node.calls()[1] else {
        panic!()
    };
    assert_eq!(
        (req.netns.as_str(), req.device_id.as_str()),
        ("", "0000:3b:02.1")
    );

    // A config ADD would refuse does not stop DEL.
    c["vlan"] = json!("ten");
    let out = Env::new("DEL", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}", out.stdout);

    // vfplugd fails: its code, and IPAM is left for the retried DEL.
    node.set_script(Script {
        del: Some(Err(Failure::new(CniCode::Internal, "ledger write failed"))),
        ..Default::default()
    });
    let before = ipam.commands().unwrap().len();
    let out = Env::new("DEL", dir.path()).run(&c);
    assert_eq!(out.error_code(), 106);
    assert_eq!(ipam.commands().unwrap().len(), before);
}

#[test]
fn check_asks_vfplugd_then_ipam() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "fake-ipam"});
    c["prevResult"] = json!({"cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "sandbox": NETNS, "pciID": "0000:3b:02.1"}],
        "ips": [{"address": "192.168.10.7/24", "interface": 0}]});
    let out = Env::new("CHECK", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    let Call::Check(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(req.ips[0].address, "192.168.10.7/24");
    assert_eq!(req.config.as_ref().unwrap().vlan, Some(100));
    assert_eq!(ipam.commands().unwrap(), vec!["VERSION", "CHECK"]);

    node.set_script(Script {
        check: Some(Failure::new(
            CniCode::CheckFailed,
            "VF vlan is 0, expected 100",
        )),
        ..Default::default()
    });
    let out = Env::new("CHECK", dir.path()).run(&c);
    assert_eq!(out.error_code(), 103);
    assert_eq!(ipam.commands().unwrap(), vec!["VERSION", "CHECK"]);
}

#[test]
fn status_reports_readiness() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["pool"] = json!("sriov_a");
    let env = Env::new("STATUS", dir.path());
    let out = env.run(&c);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), ""),
        "{}",
        out.stderr
    );
    assert_eq!(
        node.calls(),
        vec![Call::Status(v1::StatusRequest {
            pool: "sriov_a".into()
        })]
    );

    node.set_script(Script {
        status: Some(Ok(v1::StatusResponse {
            ready: false,
            reason: "ledger replay in progress".into(),
            free: 0,
        })),
        ..Default::default()
    });
    let out = env.run(&c);
    assert_eq!(out.error_code(), 50);
    assert!(
        out.error_msg().contains("ledger replay in progress"),
        "{}",
        out.stdout
    );

    // A transient failure of the call is "not available" too.
    node.set_script(Script {
        status: Some(Err(Failure::new(CniCode::TryAgainLater, "busy"))),
        ..Default::default()
    });
    assert_eq!(env.run(&c).error_code(), 50);
}

#[test]
fn gc_sends_the_valid_list_then_runs_ipam_gc_even_after_a_failure() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &ipam_add_result(), &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "fake-ipam"});
    c["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "net1"}]);
    let env = Env::new("GC", dir.path())
        .without("CNI_CONTAINERID")
        .without("CNI_IFNAME")
        .without("CNI_NETNS");
    let out = env.run(&c);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), ""),
        "{}",
        out.stderr
    );
    let Call::Gc(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(req.network, "sriov-net");
    assert_eq!(req.valid.len(), 1);
    assert_eq!(
        (
            req.valid[0].container_id.as_str(),
            req.valid[0].ifname.as_str()
        ),
        ("c1", "net1")
    );
    assert_eq!(ipam.commands().unwrap(), vec!["VERSION", "GC"]);

    node.set_script(Script {
        gc: Some(Err(Failure::new(CniCode::Internal, "ledger"))),
        ..Default::default()
    });
    let out = env.run(&c);
    assert_eq!(out.error_code(), 106);
    assert_eq!(
        ipam.commands().unwrap(),
        vec!["VERSION", "GC", "VERSION", "GC"]
    );
}

#[test]
fn a_slow_vfplugd_is_try_again_later_within_the_timeout() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    node.set_script(Script {
        delay: Some(Duration::from_secs(5)),
        ..Default::default()
    });
    let mut c = conf(&node.socket);
    c["timeoutSeconds"] = json!(1);
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    assert!(
        out.error_msg().contains("did not answer Add"),
        "{}",
        out.stdout
    );
    assert!(out.elapsed < Duration::from_secs(4), "{:?}", out.elapsed);
}

#[test]
fn a_hanging_ipam_plugin_is_killed_at_the_timeout() {
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let script = dir.path().join("hangs");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "hangs"});
    c["timeoutSeconds"] = json!(1);
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 105, "{}", out.stdout);
    // It hangs already on the VERSION probe; that is not retried as-is (twice the wait).
    assert!(
        out.error_msg().contains("did not finish VERSION"),
        "{}",
        out.stdout
    );
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    assert!(node.calls().is_empty());
}

/// Whether Debian's host-local is installed; if not, says so (or fails, when required).
fn host_local_present(test: &str) -> bool {
    prereq::need(
        test,
        prereq::file(
            std::path::Path::new("/usr/lib/cni/host-local"),
            "apt-get install containernetworking-plugins",
        ),
    )
    .is_some()
}

/// Debian's real host-local (containernetworking-plugins) as the delegated IPAM: the exec
/// convention holds with a real plugin, and DEL releases what ADD allocated.
#[test]
fn real_host_local_ipam() {
    if !host_local_present("real_host_local_ipam") {
        return;
    }
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let data = dir.path().join("ipam-data");
    let mut c = conf(&node.socket);
    // Debian bookworm's plugins (1.1.x) speak up to 1.0.0.
    c["cniVersion"] = json!("1.0.0");
    c["ipam"] = json!({"type": "host-local", "dataDir": data.to_str().unwrap(),
        "ranges": [[{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10", "gateway": "10.77.0.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]});
    let out = Env::new("ADD", std::path::Path::new("/usr/lib/cni")).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let r = out.json();
    assert_eq!(r["ips"][0]["address"], "10.77.0.10/24", "{r}");
    assert_eq!(r["ips"][0]["interface"], 0);
    let Call::Add(req) = &node.calls()[0] else {
        panic!()
    };
    assert_eq!(req.ips[0].address, "10.77.0.10/24");
    assert_eq!(req.ips[0].gateway, "10.77.0.1");
    // host-local records the lease as a file named by the address.
    let lease = data.join("sriov-net").join("10.77.0.10");
    assert!(lease.exists(), "{}", lease.display());

    let out = Env::new("DEL", std::path::Path::new("/usr/lib/cni")).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(!lease.exists(), "DEL must release the address");
}

/// A config of 1.1.0 and an IPAM plugin that speaks only up to 1.0.0 (Debian bookworm's
/// host-local, played by a script that rejects 1.1.0 with code 1): the plugin is asked VERSION,
/// gets the config as 1.0.0, and its result comes back in 1.1.0.
#[test]
fn ipam_plugin_older_than_the_config_gets_a_lowered_version() {
    let dir = tempdir().unwrap();
    let v10 = json!({"cniVersion": "1.0.0",
        "ips": [{"address": "192.168.10.7/24", "gateway": "192.168.10.1"}],
        "routes": [{"dst": "0.0.0.0/0"}]})
    .to_string();
    let ipam =
        FakeIpam::create_with_versions(dir.path(), "old-ipam", &v10, &[], &["0.4.0", "1.0.0"])
            .unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "old-ipam", "subnet": "192.168.10.0/24"});

    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let r = out.json();
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["interfaces"][0]["pciID"], "0000:3b:02.1");
    assert_eq!(
        r["ips"],
        json!([{"address": "192.168.10.7/24", "gateway": "192.168.10.1", "interface": 0}])
    );
    let calls = ipam.calls().unwrap();
    let cmds: Vec<&str> = calls
        .iter()
        .map(|c| c.env["CNI_COMMAND"].as_str())
        .collect();
    assert_eq!(cmds, ["VERSION", "ADD"]);
    assert_eq!(calls[0].stdin, r#"{"cniVersion":"1.1.0"}"#);
    let sent: Value = serde_json::from_str(&calls[1].stdin).unwrap();
    let mut expected = c.clone();
    expected["cniVersion"] = json!("1.0.0");
    assert_eq!(sent, expected, "only cniVersion changes");

    // DEL and CHECK (with a 1.1.0 prevResult, written as 1.0.0 for the plugin) go lowered too.
    assert_eq!(Env::new("DEL", dir.path()).run(&c).code, Some(0));
    let mut ck = c.clone();
    ck["prevResult"] = r.clone();
    let out = Env::new("CHECK", dir.path()).run(&ck);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let calls = ipam.calls().unwrap();
    let check: Value = serde_json::from_str(&calls.last().unwrap().stdin).unwrap();
    assert_eq!(check["cniVersion"], "1.0.0");
    assert_eq!(check["prevResult"]["cniVersion"], "1.0.0");
    assert!(check["prevResult"]["interfaces"][0].get("pciID").is_none());

    // STATUS and GC exist only in 1.1: the plugin is asked VERSION and nothing else.
    let before = calls.len();
    let bare = Env::new("STATUS", dir.path())
        .without("CNI_CONTAINERID")
        .without("CNI_IFNAME")
        .without("CNI_NETNS");
    let out = bare.run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let mut gc = c.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = Env::new("GC", dir.path())
        .without("CNI_CONTAINERID")
        .without("CNI_IFNAME")
        .without("CNI_NETNS")
        .run(&gc);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        ipam.commands().unwrap()[before..],
        ["VERSION", "VERSION"],
        "STATUS/GC must not reach a 1.0.0 plugin"
    );
}

/// A plugin whose VERSION fails is delegated to as-is: here it then rejects 1.1.0 with its own
/// code 1, passed through (which is also what an unnegotiated delegation would do).
#[test]
fn ipam_plugin_whose_version_fails_gets_the_config_as_is() {
    let dir = tempdir().unwrap();
    let ipam = FakeIpam::create_with_versions(
        dir.path(),
        "no-version",
        &ipam_add_result(),
        &[("VERSION", "boom", 2)],
        &["0.4.0", "1.0.0"],
    )
    .unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "no-version"});
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.error_code(), 1, "{}", out.stdout);
    assert!(out.error_msg().contains("incompatible"), "{}", out.stdout);
    let calls = ipam.calls().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].stdin, c.to_string(), "as-is");
    assert!(node.calls().is_empty());
    // STATUS goes as-is too (the plugin answers 1, passed through).
    let out = Env::new("STATUS", dir.path()).run(&c);
    assert_eq!(out.error_code(), 1, "{}", out.stdout);
}

/// Debian's real host-local with a 1.1.0 config (it speaks up to 1.0.0): ADD, DEL and STATUS
/// work through negotiation.
#[test]
fn real_host_local_with_a_1_1_0_config() {
    if !host_local_present("real_host_local_with_a_1_1_0_config") {
        return;
    }
    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let data = dir.path().join("ipam-data");
    let mut c = conf(&node.socket);
    c["ipam"] = json!({"type": "host-local", "dataDir": data.to_str().unwrap(),
        "ranges": [[{"subnet": "10.78.0.0/24", "rangeStart": "10.78.0.10", "gateway": "10.78.0.1"}]]});
    let cni = std::path::Path::new("/usr/lib/cni");
    let out = Env::new("ADD", cni).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let r = out.json();
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["ips"][0]["address"], "10.78.0.10/24", "{r}");
    let lease = data.join("sriov-net").join("10.78.0.10");
    assert!(lease.exists(), "{}", lease.display());
    let out = Env::new("STATUS", cni).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let out = Env::new("DEL", cni).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(!lease.exists(), "DEL must release the address");
}

/// sriov-cni's own example NAD says 0.3.1 (docs/configuration-reference.md, v2.10.0) with
/// `type` changed: ADD and DEL end to end against the node API, the result in 0.3.1's shape
/// (`interfaces`, `ips[].version`, `ips[].interface`, `dns` always), and CHECK refused as the
/// spec says (it exists from 0.4.0).
#[test]
fn a_0_3_1_nad_add_and_del() {
    let dir = tempdir().unwrap();
    let r031 = json!({"cniVersion": "0.3.1",
        "ips": [{"version": "4", "address": "192.168.10.7/24", "gateway": "192.168.10.1"},
                {"version": "6", "address": "fd00:10::7/64"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}})
    .to_string();
    let ipam = FakeIpam::create(dir.path(), "fake-ipam", &r031, &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let c = json!({
        "cniVersion": "0.3.1",
        "name": "sriov-dpdk",
        "type": "vfplug",
        "deviceID": "0000:03:02.0",
        "mac": "CA:FE:C0:FF:EE:00",
        "vlan": 1000,
        "vlanQoS": 4,
        "vlanProto": "802.1ad",
        "min_tx_rate": 100,
        "max_tx_rate": 200,
        "spoofchk": "off",
        "trust": "on",
        "link_state": "enable",
        "logLevel": "debug",
        "logFile": dir.path().join("vfplug.log").to_str().unwrap(),
        "ipam": {"type": "fake-ipam"},
        "socket": node.socket.to_str().unwrap(),
    });
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "0.3.1",
            "interfaces": [{"name": "net1", "mac": "ca:fe:c0:ff:ee:00", "sandbox": NETNS}],
            "ips": [{"version": "4", "address": "192.168.10.7/24", "gateway": "192.168.10.1",
                     "interface": 0},
                    {"version": "6", "address": "fd00:10::7/64", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}})
    );
    // The plugin supports 0.3.1: asked VERSION, then given the config unchanged.
    let calls = ipam.calls().unwrap();
    assert_eq!(ipam.commands().unwrap(), ["VERSION", "ADD"]);
    assert_eq!(calls[0].stdin, r#"{"cniVersion":"0.3.1"}"#);
    assert_eq!(calls[1].stdin, c.to_string());
    let Call::Add(req) = &node.calls()[0] else {
        panic!("{:?}", node.calls())
    };
    assert_eq!(req.device_id, "0000:03:02.0");
    assert_eq!(req.network, "sriov-dpdk");
    let vf = req.config.clone().unwrap();
    assert_eq!(
        (vf.vlan, vf.vlan_qos, vf.vlan_proto.as_deref()),
        (Some(1000), Some(4), Some("802.1ad"))
    );
    assert_eq!(
        req.ips
            .iter()
            .map(|i| i.address.as_str())
            .collect::<Vec<_>>(),
        ["192.168.10.7/24", "fd00:10::7/64"]
    );

    let out = Env::new("DEL", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    let Call::Del(req) = &node.calls()[1] else {
        panic!("{:?}", node.calls())
    };
    assert_eq!(req.device_id, "0000:03:02.0");
    assert_eq!(
        ipam.commands().unwrap(),
        ["VERSION", "ADD", "VERSION", "DEL"]
    );

    // CHECK does not exist in 0.3.1: code 1, nothing asked.
    let mut chk = c.clone();
    chk["prevResult"] = out_of_add(&c, dir.path());
    let calls_before = node.calls().len();
    let ipam_before = ipam.commands().unwrap().len();
    let out = Env::new("CHECK", dir.path()).run(&chk);
    assert_eq!(out.error_code(), 1, "{}", out.stdout);
    assert_eq!(
        out.error_msg(),
        "CHECK needs cniVersion 0.4.0 or later; the config says 0.3.1"
    );
    assert_eq!(out.json()["cniVersion"], "0.3.1");
    assert_eq!(node.calls().len(), calls_before, "vfplugd was not asked");
    assert_eq!(
        ipam.commands().unwrap().len(),
        ipam_before,
        "IPAM was not asked"
    );

    // Without ipam: the interface only, and 0.3.x's dns object.
    let mut bare = c.clone();
    bare.as_object_mut().unwrap().remove("ipam");
    let out = Env::new("ADD", dir.path()).run(&bare);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "0.3.1",
            "interfaces": [{"name": "net1", "mac": "ca:fe:c0:ff:ee:00", "sandbox": NETNS}],
            "dns": {}})
    );
}

/// An ADD's stdout for `c` (a prevResult for a later call).
fn out_of_add(c: &Value, dir: &std::path::Path) -> Value {
    let out = Env::new("ADD", dir).run(c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.json()
}

/// 0.2.0: the IPAM plugin's ip4/ip6 result goes to vfplugd as addresses and routes, and the
/// result is ip4/ip6 again. An IPAM result without an address cannot be written in 0.2.0: 105,
/// and the lease is rolled back before vfplugd is asked.
#[test]
fn a_0_2_0_add_prints_ip4_and_ip6() {
    let dir = tempdir().unwrap();
    let r020 = json!({"cniVersion": "0.2.0",
        "ip4": {"ip": "192.168.10.7/24", "gateway": "192.168.10.1",
                "routes": [{"dst": "0.0.0.0/0"}]},
        "ip6": {"ip": "fd00:10::7/64", "routes": [{"dst": "::/0", "gw": "fd00:10::1"}]},
        "dns": {"nameservers": ["192.168.10.53"]}})
    .to_string();
    FakeIpam::create(dir.path(), "fake-ipam", &r020, &[]).unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["cniVersion"] = json!("0.2.0");
    c["ipam"] = json!({"type": "fake-ipam"});
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json(), serde_json::from_str::<Value>(&r020).unwrap());
    let Call::Add(req) = &node.calls()[0] else {
        panic!("{:?}", node.calls())
    };
    assert_eq!(
        req.ips,
        vec![
            v1::IpConfig {
                address: "192.168.10.7/24".into(),
                gateway: "192.168.10.1".into()
            },
            v1::IpConfig {
                address: "fd00:10::7/64".into(),
                gateway: String::new()
            }
        ]
    );
    assert_eq!(
        req.routes,
        vec![
            v1::RouteConfig {
                dst: "0.0.0.0/0".into(),
                gw: String::new()
            },
            v1::RouteConfig {
                dst: "::/0".into(),
                gw: "fd00:10::1".into()
            }
        ]
    );

    // No address from IPAM.
    let dir2 = tempdir().unwrap();
    let empty = FakeIpam::create(
        dir2.path(),
        "fake-ipam",
        r#"{"cniVersion":"0.2.0","dns":{}}"#,
        &[],
    )
    .unwrap();
    let node2 = FakeNode::start(dir2.path()).unwrap();
    c["socket"] = json!(node2.socket.to_str().unwrap());
    let out = Env::new("ADD", dir2.path()).run(&c);
    assert_eq!(out.error_code(), 105, "{}", out.stdout);
    assert!(out.error_msg().contains("no IP address"), "{}", out.stdout);
    assert_eq!(out.json()["cniVersion"], "0.2.0");
    assert_eq!(empty.commands().unwrap(), ["VERSION", "ADD", "DEL"]);
    assert!(
        !node2.calls().iter().any(|c| matches!(c, Call::Add(_))),
        "{:?}",
        node2.calls()
    );

    // No ipam at all: refused before anything is done.
    c.as_object_mut().unwrap().remove("ipam");
    let out = Env::new("ADD", dir2.path()).run(&c);
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert!(out.error_msg().starts_with("ipam:"), "{}", out.stdout);
}

/// A 0.4.0 config and a plugin that speaks only up to 0.3.1 (built with an older libcni): it
/// gets the config as 0.3.1, prevResult included, and its result is read as 0.3.1.
#[test]
fn ipam_plugin_older_than_a_0_4_0_config_gets_0_3_1() {
    let dir = tempdir().unwrap();
    let r031 = json!({"cniVersion": "0.3.1",
        "ips": [{"version": "4", "address": "192.168.10.7/24"}]})
    .to_string();
    let ipam = FakeIpam::create_with_versions(
        dir.path(),
        "old-ipam",
        &r031,
        &[],
        &["0.1.0", "0.2.0", "0.3.0", "0.3.1"],
    )
    .unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let mut c = conf(&node.socket);
    c["cniVersion"] = json!("0.4.0");
    c["ipam"] = json!({"type": "old-ipam"});
    c["prevResult"] = json!({"cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": NETNS}],
        "ips": [{"version": "4", "address": "10.0.0.5/24", "interface": 0}]});
    let out = Env::new("ADD", dir.path()).run(&c);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let calls = ipam.calls().unwrap();
    assert_eq!(ipam.commands().unwrap(), ["VERSION", "ADD"]);
    let sent: Value = serde_json::from_str(&calls[1].stdin).unwrap();
    assert_eq!(sent["cniVersion"], "0.3.1");
    assert_eq!(sent["prevResult"]["cniVersion"], "0.3.1");
    assert_eq!(sent["prevResult"]["ips"], c["prevResult"]["ips"]);
    let r = out.json();
    assert_eq!(r["cniVersion"], "0.4.0");
    assert_eq!(
        r["ips"][1],
        json!({"version": "4", "address": "192.168.10.7/24", "interface": 1})
    );
}

/// Debian's real host-local (it supports 0.1.0 to 1.0.0) under a 0.3.1 and a 0.2.0 config: ADD
/// allocates and prints that version's shape, DEL releases.
#[test]
fn real_host_local_with_0_3_1_and_0_2_0_configs() {
    if !host_local_present("real_host_local_with_0_3_1_and_0_2_0_configs") {
        return;
    }
    let cni = std::path::Path::new("/usr/lib/cni");
    for (v, subnet) in [("0.3.1", "10.79.0"), ("0.2.0", "10.80.0")] {
        let dir = tempdir().unwrap();
        let node = FakeNode::start(dir.path()).unwrap();
        let data = dir.path().join("ipam-data");
        let mut c = conf(&node.socket);
        c["cniVersion"] = json!(v);
        c["ipam"] = json!({"type": "host-local", "dataDir": data.to_str().unwrap(),
            "ranges": [[{"subnet": format!("{subnet}.0/24"), "rangeStart": format!("{subnet}.10"),
                         "gateway": format!("{subnet}.1")}]],
            "routes": [{"dst": "0.0.0.0/0"}]});
        let out = Env::new("ADD", cni).run(&c);
        assert_eq!(out.code, Some(0), "{v}: {}\n{}", out.stdout, out.stderr);
        let addr = format!("{subnet}.10/24");
        let gw = format!("{subnet}.1");
        let want = if v == "0.3.1" {
            json!({"cniVersion": v,
                "interfaces": [{"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": NETNS}],
                "ips": [{"version": "4", "address": addr, "gateway": gw, "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}})
        } else {
            json!({"cniVersion": v,
                "ip4": {"ip": addr, "gateway": gw, "routes": [{"dst": "0.0.0.0/0"}]},
                "dns": {}})
        };
        assert_eq!(out.json(), want, "{v}");
        let Call::Add(req) = &node.calls()[0] else {
            panic!("{:?}", node.calls())
        };
        assert_eq!(
            (req.ips[0].address.as_str(), req.ips[0].gateway.as_str()),
            (addr.as_str(), gw.as_str())
        );
        let lease = data.join("sriov-net").join(format!("{subnet}.10"));
        assert!(lease.exists(), "{v}: {}", lease.display());
        let out = Env::new("DEL", cni).run(&c);
        assert_eq!(out.code, Some(0), "{v}: {}\n{}", out.stdout, out.stderr);
        assert!(!lease.exists(), "{v}: DEL must release the address");
    }
}

/// `vfplug install DIR` (the Helm chart's init container) copies the binary itself; with a
/// `CNI_COMMAND` in the environment the same arguments are a CNI call, never an install.
#[test]
fn install_copies_the_binary_and_only_outside_a_cni_call() {
    let d = tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_vfplug");
    let out = std::process::Command::new(bin)
        .arg("install")
        .arg(d.path())
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout stays protocol-only");
    let installed = d.path().join("vfplug");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(bin).unwrap()
    );

    let missing = d.path().join("missing");
    let out = std::process::Command::new(bin)
        .arg("install")
        .arg(&missing)
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing is not a directory"), "{err}");

    let other = tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .arg("install")
        .arg(other.path())
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"].is_array(), "{v}");
    assert!(
        !other.path().join("vfplug").exists(),
        "a CNI call installs nothing"
    );
}
