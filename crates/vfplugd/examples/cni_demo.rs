//! The CNI part of `scripts/demo.sh`: the real `vfplug` CNI binary, exec'd with the CNI calling
//! convention (env + stdin + stdout), against the real `vfplugd` on a simulated SR-IOV node whose
//! VF netdevs are real veth links, into real network namespaces, with Debian's `host-local` as
//! the delegated IPAM. VF settings go to a simulated PF (`--vf-netlink simulated`): this machine
//! has no SR-IOV (the VM lab shows the real PF side).
//!
//! Needs root, `ip` (iproute2) and /usr/lib/cni/host-local.
//!
//! `cargo run -p vfplugd --example cni_demo -- target/debug/vfplugd target/debug/vfplug`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfplug_api::v1;
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_kubelet::testing::FakeKubelet;

const T: Duration = Duration::from_secs(15);
const NET: &str = "vfplug.io/net";
const VFS: u32 = 3;

const CONFIG: &str = r#"resourcePrefix: vfplug.io
pools:
  - name: net
    deviceMode: netdev
    selectors: { pfNames: ["ens1f0"] }
"#;

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn vf_name(i: u32) -> String {
    format!("vfdemo-vf{i}")
}

/// Removes what a previous, interrupted run may have left.
fn cleanup() {
    for i in 0..VFS {
        let _ = Command::new("ip")
            .args(["link", "del", &vf_name(i)])
            .stderr(Stdio::null())
            .status();
    }
    for ns in ["vfdemo-pod1", "vfdemo-pod2"] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

struct Cni {
    bin: PathBuf,
    cni_path: String,
    socket: PathBuf,
    ipam_dir: PathBuf,
}

impl Cni {
    fn conf(&self, extra: &str) -> String {
        format!(
            r#"{{"cniVersion": "1.1.0", "name": "sriov-net", "type": "vfplug",
  "socket": "{}", {extra}
  "ipam": {{"type": "host-local", "dataDir": "{}",
           "ranges": [[{{"subnet": "10.56.0.0/24", "gateway": "10.56.0.1"}}]],
           "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#,
            self.socket.display(),
            self.ipam_dir.display()
        )
    }

    /// Execs the plugin: returns (exit ok, stdout, elapsed).
    fn run(&self, cmd: &str, cid: &str, netns: &str, conf: &str) -> (bool, String, Duration) {
        let t = Instant::now();
        let mut child = Command::new(&self.bin)
            .env_clear()
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={cid};K8S_POD_UID=uid-{cid}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("exec vfplug");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), stdout, t.elapsed())
    }
}

/// Stops vfplugd and removes the demo's links and netns even when a step panics.
struct Teardown(Option<Child>);

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup();
    }
}

fn spawn_vfplugd(bin: &Path, root: &Path) -> Child {
    Command::new(bin)
        .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
        .args(["--kubelet-dir", root.join("kubelet").to_str().unwrap()])
        .args(["--state-dir", root.join("state").to_str().unwrap()])
        .args(["--socket", root.join("vfplugd.sock").to_str().unwrap()])
        .args(["--vf-netlink", "simulated"])
        .args(["--config", root.join("config.yaml").to_str().unwrap()])
        .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0", "--node-name", "demo-node"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start vfplugd")
}

async fn list(socket: &Path) -> Vec<v1::VfEntry> {
    let ch = vfplug_api::connect(socket, T).await.unwrap();
    v1::node_client::NodeClient::new(ch)
        .list(v1::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .vfs
}

fn show(vfs: &[v1::VfEntry]) {
    for v in vfs {
        let owner = v
            .owner
            .as_ref()
            .map(|o| format!("{}/{}", o.container_id, o.ifname))
            .unwrap_or_default();
        println!(
            "    {} {:<6} {:<11} {:<14} {}",
            v.pci_address, v.pf_netdev, v.state, owner, v.netns
        );
    }
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_owned())
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let vfplugd = PathBuf::from(args.next().unwrap_or_else(|| "target/debug/vfplugd".into()));
    let vfplug = PathBuf::from(args.next().unwrap_or_else(|| "target/debug/vfplug".into()));
    if !(is_root() && Path::new("/usr/lib/cni/host-local").exists()) {
        println!(
            "SKIP the CNI demo: it needs root and /usr/lib/cni/host-local (containernetworking-plugins)"
        );
        return;
    }
    let vfplug = std::fs::canonicalize(&vfplug).expect("vfplug binary");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    cleanup();
    let mut guard = Teardown(None);

    step(
        1,
        "simulated node: PF ens1f0 with 3 VFs whose netdevs are real veth links",
    );
    let mut node = SysfsBuilder::new(&root.join("sys"));
    node.pf("0000:3b:00.0")
        .driver("i40e")
        .netdev("ens1f0")
        .vfs(VFS, |i| VfSpec::new().driver("iavf").netdev(vf_name(i)))
        .build()
        .unwrap();
    for i in 0..VFS {
        ip(&[
            "link",
            "add",
            &vf_name(i),
            "type",
            "veth",
            "peer",
            "name",
            &format!("vfdemo-pe{i}"),
        ]);
        ip(&["link", "set", &vf_name(i), "mtu", "1500"]);
    }
    println!("{}", ip(&["-br", "link", "show", "dev", &vf_name(0)]));
    std::fs::write(root.join("config.yaml"), CONFIG).unwrap();

    step(
        2,
        "kubelet stand-in, then vfplugd --socket ... --vf-netlink simulated",
    );
    let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
    guard.0 = Some(spawn_vfplugd(&vfplugd, &root));
    kubelet.wait_registrations(1, T).await.expect("registers");
    let socket = root.join("vfplugd.sock");
    let cni = Cni {
        bin: vfplug.clone(),
        cni_path: format!("/usr/lib/cni:{}", vfplug.parent().unwrap().display()),
        socket: socket.clone(),
        ipam_dir: root.join("ipam"),
    };
    show(&list(&socket).await);

    step(
        3,
        "pod 1: kubelet Allocate (as for a pod with limits vfplug.io/net: 1)",
    );
    let snap = kubelet
        .wait_snapshot(NET, None, T, |s| s.healthy_ids().len() == VFS as usize)
        .await
        .unwrap();
    let dev = snap.healthy_ids()[0].clone();
    let resp = kubelet
        .allocate(NET, vec![vec![dev.clone()]])
        .await
        .unwrap();
    for (k, v) in &resp.container_responses[0].envs {
        println!("    env {k}={v}");
    }
    ip(&["netns", "add", "vfdemo-pod1"]);
    let ns1 = "/var/run/netns/vfdemo-pod1";

    step(
        4,
        "CNI ADD (Multus passes deviceID): vlan 100, MAC, spoofchk, host-local IPAM",
    );
    let conf1 = cni.conf(&format!(
        r#""deviceID": "{dev}", "vlan": 100, "vlanQoS": 3, "mac": "02:00:00:00:56:01", "spoofchk": "on", "trust": "off","#
    ));
    let (ok, out, took) = cni.run("ADD", "pod1", ns1, &conf1);
    println!("    exit ok={ok} in {took:?}\n{}", pretty(&out));
    assert!(ok, "ADD failed: {out}");
    println!(
        "    inside the pod:\n    {}",
        ip(&["-n", "vfdemo-pod1", "-br", "addr", "show", "dev", "net1"])
    );
    println!(
        "    {}",
        ip(&["-n", "vfdemo-pod1", "route", "show", "default"])
    );

    step(
        5,
        "the same ADD again (answered from vfplugd's ledger; host-local is not asked twice), CHECK",
    );
    let (ok, again, took) = cni.run("ADD", "pod1", ns1, &conf1);
    println!(
        "    repeated ADD ok={ok} in {took:?}, identical result: {}",
        again == out
    );
    let mut check_conf: serde_json::Value = serde_json::from_str(&conf1).unwrap();
    check_conf["prevResult"] = serde_json::from_str(&out).unwrap();
    let (ok, out_c, took) = cni.run("CHECK", "pod1", ns1, &check_conf.to_string());
    println!("    CHECK ok={ok} in {took:?} {out_c}");

    step(
        6,
        "pod 2 without deviceID and without IPAM: vfplugd picks a free VF of pool 'net'",
    );
    ip(&["netns", "add", "vfdemo-pod2"]);
    let conf2 = format!(
        r#"{{"cniVersion": "1.1.0", "name": "sriov-net", "type": "vfplug", "socket": "{}", "pool": "net", "mtu": 9000}}"#,
        socket.display()
    );
    let (ok, out2, took) = cni.run("ADD", "pod2", "/var/run/netns/vfdemo-pod2", &conf2);
    println!("    exit ok={ok} in {took:?}\n{}", pretty(&out2));
    let (ok, again, took) = cni.run("ADD", "pod2", "/var/run/netns/vfdemo-pod2", &conf2);
    println!(
        "    the same ADD again: ok={ok} in {took:?}, identical result: {}",
        again == out2
    );
    show(&list(&socket).await);

    step(
        7,
        "a bad config: vlan 5000 → CNI error JSON on stdout, non-zero exit, nothing changed",
    );
    let bad = cni.conf(r#""pool": "net", "vlan": 5000,"#);
    let (ok, out_b, _) = cni.run("ADD", "pod3", ns1, &bad);
    println!("    exit ok={ok}\n{}", pretty(&out_b));

    step(
        8,
        "CNI DEL pod 1: netdev back home under its name, VF settings restored, VF back in the kubelet's accounting (the kubelet gave it)",
    );
    let (ok, _, took) = cni.run("DEL", "pod1", ns1, &conf1);
    println!("    DEL ok={ok} in {took:?}");
    println!("    {}", ip(&["-br", "link", "show", "dev", &vf_name(0)]));
    let (ok, _, _) = cni.run("DEL", "pod1", ns1, &conf1);
    println!("    DEL again ok={ok}");

    step(
        9,
        "pod 2's netns is deleted first (kubelet order), then DEL with empty CNI_NETNS",
    );
    ip(&["netns", "del", "vfdemo-pod2"]);
    let (ok, _, _) = cni.run("DEL", "pod2", "", &conf2);
    println!("    DEL ok={ok} (a veth dies with its netns; a real VF netdev would come home)");

    step(10, "GC with no valid attachments, STATUS");
    let gc = serde_json::json!({"cniVersion": "1.1.0", "name": "sriov-net", "type": "vfplug",
        "socket": socket, "cni.dev/valid-attachments": []});
    let (ok, out_g, _) = cni.run("GC", "", "", &gc.to_string());
    println!("    GC ok={ok} {out_g}");
    let (ok, out_s, _) = cni.run("STATUS", "", "", &conf2);
    println!("    STATUS ok={ok} {out_s}");
    show(&list(&socket).await);

    step(11, "vfplugd stops: STATUS answers 50, ADD 11");
    let mut daemon = guard.0.take().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    println!("    vfplugd exited: {}", daemon.wait().unwrap());
    let (_, out_s, _) = cni.run("STATUS", "", "", &conf2);
    println!("    STATUS: {out_s}");
    let (_, out_a, _) = cni.run("ADD", "pod4", ns1, &conf2);
    println!("    ADD: {out_a}");

    drop(guard);
    println!("\nCNI demo done.");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
