//! A fake SR-IOV node driven for real, shared by `tests/e2e.rs` and `benches/e2e.rs`: a fake
//! sysfs tree (vfplug-host's `SysfsBuilder`) whose VF netdevs are real veth ends in the host
//! netns, a fake kubelet for vfplugd to register with, the real `vfplugd` (`--vf-netlink
//! simulated`, socket in a tempdir), pods as `ip netns add` namespaces, and Debian's real
//! `host-local` as the delegated IPAM. Dropping a [`Host`] stops vfplugd and deletes every link
//! and netns it made, also when a test panics.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vfplug_api::v1;
use vfplug_cni::testing::{Plugin, PluginRun};
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::prereq;
use vfplug_kubelet::testing::FakeKubelet;

/// How long vfplugd may take to come up, and a node API call to answer.
pub const T: Duration = Duration::from_secs(30);
/// Where Debian's containernetworking-plugins are.
pub const CNI_DIR: &str = "/usr/lib/cni";
/// The network name of every config.
pub const NETWORK: &str = "e2e-net";
/// The pool (and kubelet resource `vfplug.io/net`).
pub const POOL: &str = "net";
/// The PF's address in the fake sysfs.
pub const PF: &str = "0000:3b:00.0";

const CONFIG: &str = r#"resourcePrefix: vfplug.io
pools:
  - name: net
    deviceMode: netdev
    selectors: { pfNames: ["ens1f0"] }
"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the suite cannot run here, or `None`. Callers go through `vfplug_host::prereq`, so
/// with `VFPLUG_REQUIRE=1` a missing one fails the test.
pub fn missing_prerequisite() -> Option<String> {
    prereq::root()
        .map_err(|e| format!("{e} (netns, veth)"))
        .and_then(|()| prereq::program("ip"))
        .and_then(|_| {
            prereq::file(
                &Path::new(CNI_DIR).join("host-local"),
                "apt-get install containernetworking-plugins",
            )
        })
        .err()
}

/// `ip args...`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip args...`, errors ignored (cleanup).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A link as `ip -j addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its MAC.
    pub mac: String,
    /// Its MTU.
    pub mtu: u64,
    /// `addr/prefix` of each address.
    pub addrs: Vec<String>,
}

/// The link `name` in `netns` (`None`: the host's), if it exists.
pub fn link(netns: Option<&str>, name: &str) -> Option<Link> {
    let mut args = vec!["-j"];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["addr", "show", "dev", name]);
    let out = Command::new("ip").args(&args).output().expect("run ip");
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let l = v.get(0)?;
    Some(Link {
        mac: l["address"].as_str()?.to_owned(),
        mtu: l["mtu"].as_u64()?,
        addrs: l["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["family"] == "inet")
                    .map(|x| format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The names of every link in `netns`.
pub fn links_in(netns: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&ip(&["-j", "-n", netns, "link", "show"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// One VF of the fake node: its sysfs address and the veth end standing for its netdev.
#[derive(Debug, Clone)]
pub struct Vf {
    /// PCI address.
    pub pci: String,
    /// Netdev name (the VF end of a veth pair, in the host netns).
    pub name: String,
    /// The other end (stays home).
    pub peer: String,
    /// Original MAC and MTU.
    pub orig: Link,
}

/// A pod: a named netns.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `ip netns` name.
    pub name: String,
    /// `CNI_NETNS`.
    pub path: String,
}

/// The fake node with the real vfplugd on it.
pub struct Host {
    /// Scratch dir: sysfs, kubelet dir, ledger, socket, host-local's dataDir, vfplugd's log.
    pub dir: tempfile::TempDir,
    /// Runs the fake kubelet and node API calls.
    pub rt: tokio::runtime::Runtime,
    kubelet: Option<FakeKubelet>,
    vfplugd: Mutex<Option<Child>>,
    /// vfplugd's node API socket.
    pub socket: PathBuf,
    /// The VFs, by index.
    pub vfs: Vec<Vf>,
    /// The plugin binary.
    pub plugin: Plugin,
    /// host-local's dataDir.
    pub ipam_dir: PathBuf,
    tag: String,
    pods: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("tag", &self.tag).finish()
    }
}

/// The vfplugd binary next to `vfplug` (same target dir); built with cargo if missing or too
/// old to have `--vf-netlink`. `VFPLUGD_BIN` overrides.
pub fn vfplugd_bin(vfplug: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("VFPLUGD_BIN") {
        return PathBuf::from(p);
    }
    let dir = vfplug.parent().expect("target dir");
    let bin = dir.join("vfplugd");
    // A vfplugd built before it had the flags used here is as good as missing.
    let usable = Command::new(&bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--vf-netlink"));
    if !usable {
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!(
            "vfplugd missing or outdated at {}: building it (cargo build -p vfplugd --bin vfplugd{})",
            bin.display(),
            if release { " --release" } else { "" }
        );
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "vfplugd", "--bin", "vfplugd"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo");
        assert!(st.success(), "building vfplugd failed");
    }
    bin
}

impl Host {
    /// A node with `n` VFs on one PF, vfplugd registered with the fake kubelet and serving.
    pub fn start(n: u32) -> Host {
        let vfplug = PathBuf::from(env!("CARGO_BIN_EXE_vfplug"));
        let vfplugd = vfplugd_bin(&vfplug);
        let dir = tempfile::Builder::new()
            .prefix("vfplug-e2e-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_owned();
        // Unique per process and per host, short enough for 15-byte link names.
        let tag = format!(
            "{:x}-{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let names: Vec<(String, String)> = (0..n)
            .map(|i| (format!("v{tag}a{i}"), format!("v{tag}b{i}")))
            .collect();
        assert!(names.iter().all(|(a, b)| a.len() <= 15 && b.len() <= 15));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut host = Host {
            socket: root.join("vfplugd.sock"),
            ipam_dir: root.join("ipam"),
            dir,
            rt,
            kubelet: None,
            vfplugd: Mutex::new(None),
            vfs: Vec::new(),
            plugin: Plugin::new(&vfplug),
            tag,
            pods: Mutex::new(Vec::new()),
        };
        let mut sys = SysfsBuilder::new(&root.join("sys"));
        let vf_names = names.clone();
        sys.pf(PF)
            .driver("i40e")
            .netdev("ens1f0")
            .total_vfs(n)
            .vfs(n, move |i| {
                VfSpec::new()
                    .driver("iavf")
                    .netdev(vf_names[i as usize].0.clone())
            })
            .build()
            .unwrap();
        for (i, (a, b)) in names.iter().enumerate() {
            // Registered before creation, so Drop removes even a half-made pair.
            host.vfs.push(Vf {
                pci: sys.vf_address(PF, i as u32).unwrap().to_string(),
                name: a.clone(),
                peer: b.clone(),
                orig: Link {
                    mac: String::new(),
                    mtu: 0,
                    addrs: vec![],
                },
            });
            ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            host.vfs[i].orig = link(None, a).expect("the veth just made");
        }
        std::fs::write(root.join("config.yaml"), CONFIG).unwrap();
        let kubelet = host
            .rt
            .block_on(FakeKubelet::start(&root.join("kubelet")))
            .unwrap();
        let log = std::fs::File::create(root.join("vfplugd.log")).unwrap();
        let child = Command::new(&vfplugd)
            .args(["--sysfs-root", root.join("sys").to_str().unwrap()])
            .args(["--kubelet-dir", root.join("kubelet").to_str().unwrap()])
            .args(["--state-dir", root.join("state").to_str().unwrap()])
            .args(["--socket", host.socket.to_str().unwrap()])
            .args(["--vf-netlink", "simulated"])
            .args(["--config", root.join("config.yaml").to_str().unwrap()])
            .args(["--device-info-dir", root.join("devinfo").to_str().unwrap()])
            .args(["--http-addr", "127.0.0.1:0", "--node-name", "e2e-node"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vfplugd");
        *host.vfplugd.lock().unwrap() = Some(child);
        host.rt
            .block_on(kubelet.wait_registrations(1, T))
            .unwrap_or_else(|e| panic!("vfplugd did not register: {e}\n{}", host.log()));
        host.kubelet = Some(kubelet);
        // Serving, with every VF known and free.
        let deadline = Instant::now() + T;
        loop {
            if let Ok(vfs) = host.try_list()
                && vfs.len() == n as usize
                && vfs.iter().all(|v| v.state == "free")
                && host.ready()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "vfplugd's node API did not list {n} free VFs\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    /// vfplugd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vfplugd.log")).unwrap_or_default()
    }

    /// A new pod netns.
    pub fn pod(&self) -> Pod {
        let mut pods = self.pods.lock().unwrap();
        let name = format!("vfplug-e2e-{}-{}", self.tag, pods.len());
        pods.push(name.clone());
        ip(&["netns", "add", &name]);
        Pod {
            path: format!("/var/run/netns/{name}"),
            name,
        }
    }

    /// A 1.1.0 config with host-local IPAM plus the keys of `extra`.
    pub fn conf(&self, extra: Value) -> Value {
        let mut c = self.conf_no_ipam(extra);
        c["ipam"] = json!({"type": "host-local", "dataDir": self.ipam_dir.to_str().unwrap(),
            "ranges": [[{"subnet": "10.99.0.0/24", "rangeStart": "10.99.0.10", "gateway": "10.99.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]});
        c
    }

    /// A 1.1.0 config without IPAM plus the keys of `extra`.
    pub fn conf_no_ipam(&self, extra: Value) -> Value {
        let mut c = json!({"cniVersion": "1.1.0", "name": NETWORK, "type": "vfplug",
            "socket": self.socket.to_str().unwrap(), "timeoutSeconds": 10});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                c[k] = v;
            }
        }
        c
    }

    /// Execs the plugin: `command` for (`cid`, `ifname`) in `netns` (empty: unset).
    pub fn cni(
        &self,
        command: &str,
        cid: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
    ) -> PluginRun {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME={cid};K8S_POD_UID=uid-{cid}"
        );
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_PATH", CNI_DIR),
            ("CNI_ARGS", args.as_str()),
        ];
        for (k, v) in [
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
        ] {
            if !v.is_empty() {
                env.push((k, v));
            }
        }
        self.run_env(&env, conf)
    }

    /// Execs the plugin with exactly `env` and `conf` on stdin.
    pub fn run_env(&self, env: &[(&str, &str)], conf: &Value) -> PluginRun {
        self.plugin.run(env, conf.to_string().as_bytes()).unwrap()
    }

    /// A node API client.
    pub async fn client(&self) -> v1::node_client::NodeClient<tonic::transport::Channel> {
        let ch = vfplug_api::connect(&self.socket, T)
            .await
            .expect("dial vfplugd");
        v1::node_client::NodeClient::new(ch)
    }

    fn try_list(&self) -> Result<Vec<v1::VfEntry>, String> {
        self.rt.block_on(async {
            let ch = vfplug_api::connect(&self.socket, T)
                .await
                .map_err(|e| e.to_string())?;
            v1::node_client::NodeClient::new(ch)
                .list(v1::ListRequest {})
                .await
                .map(|r| r.into_inner().vfs)
                .map_err(|e| e.to_string())
        })
    }

    /// Whether the node API's Status says ready.
    pub fn ready(&self) -> bool {
        self.rt.block_on(async {
            let Ok(ch) = vfplug_api::connect(&self.socket, T).await else {
                return false;
            };
            v1::node_client::NodeClient::new(ch)
                .status(v1::StatusRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().ready)
        })
    }

    /// The node API's List.
    pub fn list(&self) -> Vec<v1::VfEntry> {
        self.try_list().expect("List")
    }

    /// The ledger state of `pci` per List.
    pub fn state(&self, pci: &str) -> String {
        self.list()
            .into_iter()
            .find(|v| v.pci_address == pci)
            .map(|v| v.state)
            .unwrap_or_else(|| panic!("{pci} not listed"))
    }

    /// Asserts every VF is free in List.
    pub fn assert_all_free(&self) {
        let vfs = self.list();
        assert!(
            vfs.iter().all(|v| v.state == "free"),
            "not all free: {:?}",
            vfs.iter()
                .map(|v| (&v.pci_address, &v.state))
                .collect::<Vec<_>>()
        );
    }

    /// host-local's lease files (one per address held).
    pub fn leases(&self) -> Vec<String> {
        let d = self.ipam_dir.join(NETWORK);
        let Ok(rd) = std::fs::read_dir(&d) else {
            return vec![];
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        v.sort();
        v
    }

    /// Asserts the VF's netdev is home under its own name with its original MAC and MTU.
    pub fn assert_home(&self, vf: &Vf) {
        let now = link(None, &vf.name).unwrap_or_else(|| panic!("{} is not home", vf.name));
        assert_eq!(
            (now.mac.as_str(), now.mtu),
            (vf.orig.mac.as_str(), vf.orig.mtu),
            "{}",
            vf.name
        );
        assert!(
            now.addrs.is_empty(),
            "{} kept addresses {:?}",
            vf.name,
            now.addrs
        );
    }

    /// Stops vfplugd (SIGTERM, then waits).
    pub fn stop_vfplugd(&self) {
        if let Some(mut c) = self.vfplugd.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_vfplugd();
        {
            // Its tasks end with the runtime it was started in.
            let _in_rt = self.rt.enter();
            drop(self.kubelet.take());
        }
        for ns in self.pods.lock().unwrap().iter() {
            ip_quiet(&["netns", "del", ns]);
        }
        for vf in &self.vfs {
            // One end is enough to delete the pair; both, in case one is already gone.
            ip_quiet(&["link", "del", &vf.name]);
            ip_quiet(&["link", "del", &vf.peer]);
        }
    }
}
