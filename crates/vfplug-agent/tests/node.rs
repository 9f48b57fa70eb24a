//! The node API end to end, in-process: the agent on a fake sysfs tree with a simulated PF and
//! simulated netdevs (fault injection), called over its real unix socket with the generated
//! client. The real netlink and the real CNI binary are exercised in vfplug-cni's and
//! vfplug-host's tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfplug_agent::wal::Wal;
use vfplug_agent::{Agent, AgentOptions, PodEntry, PodIndex};
use vfplug_api::v1;
use vfplug_api::v1::node_client::NodeClient;
use vfplug_core::ledger::{Ledger, Owner, Record, Step};
use vfplug_core::{CniAttachment, MacAddr, PciAddress, SavedVfState, VfLinkState};
use vfplug_host::driver::{BinderOp, DriverBinder, FakeDriverBinder};
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::net::{LinkInfo, NetdevOps, VfNetlink, VfSettings};
use vfplug_host::sim::{DriverProfile, Fault, SimNetdevOps, SimVfNetlink};
use vfplug_kubelet::api::podresources as pr;
use vfplug_kubelet::testing::{FakeKubelet, FakePodResources};

const CONFIG: &str = r#"
resourcePrefix: vfplug.io
pools:
  - name: net
    deviceMode: netdev
    selectors: { pfNames: ["ens1f0"] }
  - name: vm
    deviceMode: vfio
    selectors: { pfNames: ["ens1f1"] }
"#;

fn host_mac(i: u32) -> MacAddr {
    MacAddr([0x02, 0xaa, 0, 0, 0, i as u8])
}

struct Node {
    /// VF addresses: `vfs[0..4]` on ens1f0 (netdev pool), `vfs[4..6]` on ens1f1 (vfio pool).
    vfs: Vec<String>,
    _dir: tempfile::TempDir,
    root: PathBuf,
    pf: Arc<SimVfNetlink>,
    net: Arc<SimNetdevOps>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    podres: FakePodResources,
    client: NodeClient<tonic::transport::Channel>,
    kubelet: FakeKubelet,
    tweak: Tweak,
    registry: Option<Arc<prometheus_client::registry::Registry>>,
}

type Tweak = Arc<dyn Fn(&mut AgentOptions) + Send + Sync>;

impl Node {
    async fn start(profile: DriverProfile) -> Self {
        Self::start_with(profile, |_| {}).await
    }

    /// As `start`, with agent options changed by `tweak` (on every boot).
    async fn start_with(
        profile: DriverProfile,
        tweak: impl Fn(&mut AgentOptions) + Send + Sync + 'static,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut b = SysfsBuilder::new(&root.join("sys"));
        b.pf("0000:3b:00.0")
            .driver("i40e")
            .netdev("ens1f0")
            .vfs(4, |i| {
                VfSpec::new().driver("iavf").netdev(format!("ens1f0v{i}"))
            })
            .build()
            .unwrap();
        b.pf("0000:5e:00.0")
            .driver("i40e")
            .netdev("ens1f1")
            .vfs(2, |_| VfSpec::new().driver("vfio-pci"))
            .build()
            .unwrap();
        let mut vfs: Vec<String> = (0..4)
            .map(|i| b.vf_address("0000:3b:00.0", i).unwrap().to_string())
            .collect();
        vfs.extend((0..2).map(|i| b.vf_address("0000:5e:00.0", i).unwrap().to_string()));
        std::fs::write(root.join("config.yaml"), CONFIG).unwrap();
        let net = Arc::new(SimNetdevOps::default());
        for i in 0..4 {
            net.add_host_link(LinkInfo {
                index: 10 + i,
                name: format!("ens1f0v{i}"),
                mac: Some(host_mac(i)),
                mtu: 1500,
                altnames: vec![format!("enp59s0f0v{i}")],
                ..Default::default()
            });
        }
        let pf = Arc::new(SimVfNetlink::new(profile));
        let kubelet = FakeKubelet::start(&root.join("kubelet")).await.unwrap();
        let podres = FakePodResources::start(&root.join("kubelet")).unwrap();
        let mut node = Self {
            podres,
            vfs,
            _dir: dir,
            root,
            pf,
            net,
            cancel: CancellationToken::new(),
            task: None,
            client: NodeClient::new(
                tonic::transport::Channel::from_static("http://x").connect_lazy(),
            ),
            kubelet,
            tweak: Arc::new(tweak),
            registry: None,
        };
        node.boot().await;
        node
    }

    async fn boot(&mut self) {
        let mut o = AgentOptions::rooted(&self.root, self.root.join("config.yaml"));
        o.vf_netlink = self.pf.clone();
        o.netdev_ops = self.net.clone();
        o.podresources_interval = Duration::from_millis(100);
        (self.tweak)(&mut o);
        self.cancel = CancellationToken::new();
        let agent = Agent::start(o, self.cancel.clone())
            .await
            .expect("agent starts");
        self.registry = Some(agent.registry());
        self.task = Some(tokio::spawn(async move {
            agent.wait().await.expect("clean stop")
        }));
        let ch = vfplug_api::connect(&self.root.join("vfplugd.sock"), Duration::from_secs(5))
            .await
            .unwrap();
        self.client = NodeClient::new(ch);
    }

    async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    async fn stop(&mut self) {
        self.cancel.cancel();
        self.task.take().unwrap().await.unwrap();
        assert!(
            !self.root.join("vfplugd.sock").exists(),
            "socket removed on stop"
        );
    }

    fn netns(&self, name: &str) -> PathBuf {
        let p = self.root.join("netns").join(name);
        self.net.add_netns(&p);
        p
    }

    async fn add(&mut self, req: v1::AddRequest) -> Result<v1::AddResponse, (u32, String)> {
        self.client
            .add(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| (vfplug_api::cni_code_of(&s).0, s.message().to_owned()))
    }

    async fn del(&mut self, cid: &str, ifname: &str, netns: &str) -> v1::DelResponse {
        self.client
            .del(v1::DelRequest {
                attachment: Some(att(cid, ifname)),
                netns: netns.into(),
                network: "net-a".into(),
                device_id: String::new(),
            })
            .await
            .expect("DEL never fails")
            .into_inner()
    }

    async fn check(
        &mut self,
        cid: &str,
        ifname: &str,
        cfg: v1::VfConfig,
    ) -> Result<(), (u32, String)> {
        self.client
            .check(v1::CheckRequest {
                attachment: Some(att(cid, ifname)),
                config: Some(cfg),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| (vfplug_api::cni_code_of(&s).0, s.message().to_owned()))
    }

    async fn state_of(&mut self, pci: &str) -> v1::VfEntry {
        let list = self
            .client
            .list(v1::ListRequest {})
            .await
            .unwrap()
            .into_inner();
        list.vfs.into_iter().find(|v| v.pci_address == pci).unwrap()
    }

    async fn wait_ready(&mut self) {
        for _ in 0..200 {
            let st = self
                .client
                .status(v1::StatusRequest::default())
                .await
                .unwrap()
                .into_inner();
            if !st.reason.contains("starting") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("vfplugd never became ready");
    }

    fn pf_settings(&self, i: u32) -> VfSettings {
        self.pf.read_vf("ens1f0", i).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn att(cid: &str, ifname: &str) -> v1::Attachment {
    v1::Attachment {
        container_id: cid.into(),
        ifname: ifname.into(),
        pod_uid: format!("uid-{cid}"),
        ..Default::default()
    }
}

fn full_config() -> v1::VfConfig {
    v1::VfConfig {
        mac: Some("02:00:00:00:00:42".into()),
        vlan: Some(100),
        vlan_qos: Some(3),
        vlan_proto: Some("802.1ad".into()),
        spoofchk: Some(false),
        trust: Some(true),
        link_state: Some("enable".into()),
        min_tx_rate: Some(10),
        max_tx_rate: Some(1000),
        mtu: Some(9000),
    }
}

/// An ADD for a vfio-mode VF: no IPAM (a vfio VF has no netdev in the pod).
fn vfio_req(cid: &str, netns: &Path, device: &str, cfg: v1::VfConfig) -> v1::AddRequest {
    let mut r = add_req(cid, netns, device, cfg);
    r.ips.clear();
    r.routes.clear();
    r
}

fn add_req(cid: &str, netns: &Path, device: &str, cfg: v1::VfConfig) -> v1::AddRequest {
    v1::AddRequest {
        attachment: Some(att(cid, "net1")),
        netns: netns.display().to_string(),
        network: "net-a".into(),
        device_id: device.into(),
        pool: String::new(),
        config: Some(cfg),
        ips: vec![v1::IpConfig {
            address: "10.9.0.5/24".into(),
            gateway: "10.9.0.1".into(),
        }],
        routes: vec![v1::RouteConfig {
            dst: "0.0.0.0/0".into(),
            gw: String::new(),
        }],
        ipam_result: String::new(),
        qmp_socket: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_configures_and_places_del_restores_everything() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod-a");
    let before = n.pf_settings(1);

    let r = n
        .add(add_req("c1", &ns, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap();
    assert_eq!(r.pci_address, n.vfs[1]);
    assert_eq!(r.mode, "netdev");
    assert_eq!(
        (r.ifname.as_str(), r.mac.as_str(), r.mtu),
        ("net1", "02:00:00:00:00:42", 9000)
    );
    assert_eq!(r.sandbox, ns.display().to_string());
    assert!(!r.existing && r.warnings.is_empty());

    let s = n.pf_settings(1);
    assert_eq!(
        (s.vlan, s.qos, s.vlan_proto.to_string()),
        (100, 3, "802.1ad".into())
    );
    assert_eq!(s.mac.to_string(), "02:00:00:00:00:42");
    assert_eq!(
        (s.spoofchk, s.trust, s.link_state),
        (Some(false), Some(true), Some(VfLinkState::Enable))
    );
    assert_eq!((s.min_tx_rate, s.max_tx_rate), (10, 1000));
    let pod = n.net.link(Some(&ns), "net1").unwrap().expect("in the pod");
    assert_eq!((pod.mtu, pod.up, pod.addresses.len()), (9000, true, 1));
    assert!(pod.altnames.is_empty(), "altnames removed before the move");
    assert!(n.net.link(None, "ens1f0v1").unwrap().is_none());
    let e = n.state_of(&n.vfs[1].clone()).await;
    assert_eq!(
        (e.state.as_str(), e.network.as_str(), e.mode.as_str()),
        ("configured", "net-a", "netdev")
    );
    assert_eq!(e.owner.unwrap().container_id, "c1");

    // Same attachment again: the first result, nothing redone.
    let calls = n.pf.log().len();
    let again = n
        .add(add_req("c1", &ns, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap();
    assert!(again.existing);
    assert_eq!(
        (again.pci_address, again.token),
        (r.pci_address.clone(), r.token)
    );
    assert_eq!(n.pf.log().len(), calls, "a repeated ADD touches nothing");

    n.check("c1", "net1", full_config()).await.unwrap();

    let d = n.del("c1", "net1", &ns.display().to_string()).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.pf_settings(1), before, "{:#?}", n.pf.log());
    let home = n.net.link(None, "ens1f0v1").unwrap().expect("back home");
    assert_eq!(
        (home.mac, home.mtu, home.up),
        (Some(host_mac(1)), 1500, false)
    );
    assert_eq!(home.altnames, vec!["enp59s0f0v1".to_string()]);
    assert_eq!(n.state_of(&n.vfs[1].clone()).await.state, "free");

    // DEL again: nothing held, still success.
    let d2 = n.del("c1", "net1", "").await;
    assert!(!d2.released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_allocation_without_device_id_and_exhaustion() {
    let mut n = Node::start(DriverProfile::default()).await;
    let mut got = Vec::new();
    for i in 0..4 {
        let ns = n.netns(&format!("p{i}"));
        let mut req = add_req(&format!("c{i}"), &ns, "", v1::VfConfig::default());
        req.pool = "net".into();
        got.push(n.add(req).await.unwrap().pci_address);
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 4, "four distinct VFs");
    let ns = n.netns("p9");
    let mut req = add_req("c9", &ns, "", v1::VfConfig::default());
    req.pool = "vfplug.io/net".into();
    let (code, msg) = n.add(req).await.unwrap_err();
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("no free"), "{msg}");
    // Status for that pool says not ready, with the reason (once vfplugd itself is ready).
    n.wait_ready().await;
    let st = n
        .client
        .status(v1::StatusRequest { pool: "net".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.free, 0);
    assert!(!st.ready && st.reason.contains("no free"), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_add_leaves_nothing_behind() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    let before = n.pf_settings(2);

    // A knob fails half-way through the PF settings.
    n.pf.fail_next("trust", Fault::Errno(5), 1);
    let (code, msg) = n
        .add(add_req("c1", &ns, &n.vfs[2].clone(), full_config()))
        .await
        .unwrap_err();
    assert_eq!(code, 100, "{msg}");
    assert!(msg.contains("trust"), "{msg}");
    assert_eq!(n.pf_settings(2), before);
    assert_eq!(n.state_of(&n.vfs[2].clone()).await.state, "free");
    assert!(n.net.link(None, "ens1f0v2").unwrap().is_some());

    // The netdev move fails after the PF settings were applied.
    n.net.fail_next_place(1);
    let (code, msg) = n
        .add(add_req("c1", &ns, &n.vfs[2].clone(), full_config()))
        .await
        .unwrap_err();
    assert_eq!(code, 101, "{msg}");
    assert_eq!(n.pf_settings(2), before, "{:#?}", n.pf.log());
    assert_eq!(n.state_of(&n.vfs[2].clone()).await.state, "free");

    // EBUSY that outlasts the retries: try again later.
    n.pf.fail_next("vlan", Fault::Busy, 1);
    let (code, _) = n
        .add(add_req("c1", &ns, &n.vfs[2].clone(), full_config()))
        .await
        .unwrap_err();
    assert_eq!(code, 11);
    assert_eq!(n.state_of(&n.vfs[2].clone()).await.state, "free");

    // And then it works.
    n.add(add_req("c1", &ns, &n.vfs[2].clone(), full_config()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_optional_knob_is_a_warning_and_check_and_restore_respect_it() {
    let mut n = Node::start(DriverProfile::igb()).await;
    let ns = n.netns("pod");
    let before = n.pf_settings(0);
    let r = n
        .add(add_req("c1", &ns, &n.vfs[0].clone(), full_config()))
        .await
        .unwrap();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].starts_with("link_state:"), "{r:?}");
    n.check("c1", "net1", full_config()).await.unwrap();
    assert!(n.del("c1", "net1", "").await.released);
    assert_eq!(n.pf_settings(0), before);
    assert!(
        !n.pf
            .log()
            .iter()
            .any(|l| l.contains("link_state") && !l.starts_with("failed")),
        "restore never sets the skipped knob: {:#?}",
        n.pf.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_del_never_touches_the_next_owner() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns_a = n.netns("a");
    let ns_b = n.netns("b");
    n.add(add_req("old", &ns_a, &n.vfs[3].clone(), full_config()))
        .await
        .unwrap();
    assert!(n.del("old", "net1", "").await.released);
    let mut cfg_b = full_config();
    cfg_b.vlan = Some(200);
    cfg_b.mac = Some("02:00:00:00:00:b0".into());
    n.add(add_req("new", &ns_b, &n.vfs[3].clone(), cfg_b.clone()))
        .await
        .unwrap();
    let settings_b = n.pf_settings(3);
    // The old pod's DEL arrives again (kubelet retry), with the old deviceID as a hint.
    let d = n
        .client
        .del(v1::DelRequest {
            attachment: Some(att("old", "net1")),
            netns: ns_a.display().to_string(),
            network: "net-a".into(),
            device_id: n.vfs[3].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.released);
    assert_eq!(n.pf_settings(3), settings_b);
    assert!(n.net.link(Some(&ns_b), "net1").unwrap().is_some());
    n.check("new", "net1", cfg_b).await.unwrap();
    // And a second attachment cannot take the held VF.
    let ns_c = n.netns("c");
    let (code, msg) = n
        .add(add_req("other", &ns_c, &n.vfs[3].clone(), full_config()))
        .await
        .unwrap_err();
    assert_eq!(code, 102, "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_notices_drift() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    n.add(add_req("c1", &ns, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap();
    n.check("c1", "net1", full_config()).await.unwrap();
    // Someone changes the VLAN behind vfplug's back.
    let mut s = n.pf_settings(1);
    s.vlan = 7;
    n.pf.put("ens1f0", 1, s);
    let (code, msg) = n.check("c1", "net1", full_config()).await.unwrap_err();
    assert_eq!(code, 103);
    assert!(msg.contains("vlan: want 100, VF has 7"), "{msg}");
    // A config that is not the one ADD applied.
    let mut other = full_config();
    other.trust = Some(false);
    assert_eq!(n.check("c1", "net1", other).await.unwrap_err().0, 103);
    // Unknown attachment.
    assert_eq!(
        n.check("zz", "net1", full_config()).await.unwrap_err().0,
        103
    );
    // A prevResult address that is not on the interface.
    let e = n
        .client
        .check(v1::CheckRequest {
            attachment: Some(att("c1", "net1")),
            config: Some(full_config()),
            ips: vec![v1::IpConfig {
                address: "10.9.0.77/24".into(),
                gateway: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 103);
    assert!(
        e.message().contains("10.9.0.77/24 is missing"),
        "{}",
        e.message()
    );
    // The interface vanished from the pod.
    n.pf.put("ens1f0", 1, {
        let mut s = n.pf_settings(1);
        s.vlan = 100;
        s
    });
    n.check("c1", "net1", full_config()).await.unwrap();
    n.net.del_netns(&ns);
    let (code, msg) = n.check("c1", "net1", full_config()).await.unwrap_err();
    assert_eq!(code, 103, "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_releases_only_stale_attachments_of_its_network() {
    let mut n = Node::start(DriverProfile::default()).await;
    for (cid, net) in [
        ("keep", "net-a"),
        ("stale", "net-a"),
        ("other-net", "net-b"),
    ] {
        let ns = n.netns(cid);
        let mut req = add_req(cid, &ns, "", v1::VfConfig::default());
        req.pool = "net".into();
        req.network = net.into();
        n.add(req).await.unwrap();
    }
    let r = n
        .client
        .gc(v1::GcRequest {
            network: "net-a".into(),
            valid: vec![att("keep", "net1")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released.len(), 1, "{r:?}");
    assert!(r.errors.is_empty());
    let list = n
        .client
        .list(v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    let held: Vec<String> = list
        .vfs
        .iter()
        .filter_map(|v| v.owner.as_ref().map(|o| o.container_id.clone()))
        .collect();
    assert!(held.contains(&"keep".to_string()) && held.contains(&"other-net".to_string()));
    assert!(!held.contains(&"stale".to_string()));
    // GC without a network name is refused: it would not know what is its to collect.
    let e = n.client.gc(v1::GcRequest::default()).await.unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_after_restart_and_after_the_netns_died_restores_from_the_ledger() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    let before = n.pf_settings(1);
    n.add(add_req("c1", &ns, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap();
    n.restart().await;
    // The pod's netns dies: the kernel moves the VF netdev home under its pod name.
    n.net.del_netns(&ns);
    assert!(n.net.link(None, "net1").unwrap().is_some());
    // DEL with an empty CNI_NETNS, from a restarted vfplugd: the ledger knows everything.
    let d = n.del("c1", "net1", "").await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.pf_settings(1), before);
    let home = n.net.link(None, "ens1f0v1").unwrap().expect("renamed back");
    assert_eq!(home.mac, Some(host_mac(1)));
    assert!(n.net.link(None, "net1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restore_quarantines_and_del_still_succeeds() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    n.add(add_req("c1", &ns, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap();
    n.pf.fail_next("mac", Fault::Errno(5), 2);
    let d = n.del("c1", "net1", "").await;
    assert!(!d.released);
    assert!(
        d.warnings.iter().any(|w| w.contains("quarantined")),
        "{d:?}"
    );
    let e = n.state_of(&n.vfs[1].clone()).await;
    assert_eq!(e.state, "quarantined");
    assert!(e.reason.contains("restoring VF settings"), "{e:?}");
    // The runtime retries the DEL: still success, still quarantined, never handed out.
    let d2 = n.del("c1", "net1", "").await;
    assert!(!d2.released && d2.note.contains("quarantined"), "{d2:?}");
    let ns2 = n.netns("pod2");
    let (code, _) = n
        .add(add_req("c2", &ns2, &n.vfs[1].clone(), full_config()))
        .await
        .unwrap_err();
    assert_eq!(code, 102);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfio_mode_needs_no_netns_work() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("vm");
    let cfg = v1::VfConfig {
        mac: Some("02:00:00:00:00:77".into()),
        vlan: Some(42),
        ..Default::default()
    };
    let r = n
        .add(vfio_req("vm1", &ns, &n.vfs[4].clone(), cfg.clone()))
        .await
        .unwrap();
    assert_eq!(
        (r.mode.as_str(), r.ifname.as_str(), r.mac.as_str()),
        ("vfio", "net1", "02:00:00:00:00:77")
    );
    assert_eq!(n.pf.read_vf("ens1f1", 0).unwrap().vlan, 42);
    n.check("vm1", "net1", cfg).await.unwrap();
    assert!(n.del("vm1", "net1", "").await.released);
    assert_eq!(n.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_named_errors_and_change_nothing() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    let bad_cfg = |f: &dyn Fn(&mut v1::VfConfig)| {
        let mut c = v1::VfConfig::default();
        f(&mut c);
        c
    };
    let cases: Vec<(v1::AddRequest, u32, &str)> = vec![
        (
            add_req(
                "c",
                &ns,
                &n.vfs[0].clone(),
                bad_cfg(&|c| c.mac = Some("zz".into())),
            ),
            7,
            "mac",
        ),
        (
            add_req(
                "c",
                &ns,
                &n.vfs[0].clone(),
                bad_cfg(&|c| c.vlan = Some(5000)),
            ),
            7,
            "vlan",
        ),
        (
            add_req(
                "c",
                &ns,
                &n.vfs[0].clone(),
                bad_cfg(&|c| c.vlan_qos = Some(2)),
            ),
            7,
            "vlanQoS",
        ),
        (
            add_req(
                "c",
                &ns,
                &n.vfs[0].clone(),
                bad_cfg(&|c| c.vlan_proto = Some("802.1x".into())),
            ),
            7,
            "vlanProto",
        ),
        (
            add_req(
                "c",
                &ns,
                &n.vfs[0].clone(),
                bad_cfg(&|c| c.link_state = Some("up".into())),
            ),
            7,
            "link_state",
        ),
        (
            add_req("c", &ns, "not-a-pci", v1::VfConfig::default()),
            7,
            "deviceID",
        ),
        (
            add_req("c", &ns, "0000:99:00.1", v1::VfConfig::default()),
            104,
            "no VF",
        ),
        (
            add_req("", &ns, &n.vfs[0].clone(), v1::VfConfig::default()),
            4,
            "CNI_CONTAINERID",
        ),
        (
            add_req(
                "c",
                Path::new(""),
                &n.vfs[0].clone(),
                v1::VfConfig::default(),
            ),
            4,
            "CNI_NETNS",
        ),
        (add_req("c", &ns, "", v1::VfConfig::default()), 7, "pool"),
    ];
    let log_before = n.pf.log().len();
    for (req, code, needle) in cases {
        let (got, msg) = n.add(req.clone()).await.unwrap_err();
        assert_eq!(got, code, "{req:?}: {msg}");
        assert!(msg.contains(needle), "{msg} should name {needle}");
    }
    assert_eq!(
        n.pf.log().len(),
        log_before,
        "no PF write for a bad request"
    );
    let list = n
        .client
        .list(v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.vfs.iter().all(|v| v.state == "free"), "{list:?}");
    assert!(n.net.link(None, "ens1f0v0").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_kubelet_allocated_a_vf_to_claims_it_and_gets_it_back_to_kubelet() {
    let mut n = Node::start(DriverProfile::default()).await;
    let dev = n.vfs[2].clone();
    // Kubelet allocated the VF to pod demo/web (PodResources says so); Multus calls ADD with it.
    n.podres.set_pods(vec![pr::PodResources {
        name: "web".into(),
        namespace: "demo".into(),
        containers: vec![pr::ContainerResources {
            name: "c".into(),
            devices: vec![pr::ContainerDevices {
                resource_name: "vfplug.io/net".into(),
                device_ids: vec![dev.clone()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }]);
    for _ in 0..100 {
        if n.state_of(&dev).await.state == "kubelet_allocated" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n.state_of(&dev).await.state, "kubelet_allocated");
    let ns = n.netns("web");
    let mut req = add_req("sandbox-web", &ns, &dev, full_config());
    let a = req.attachment.as_mut().unwrap();
    a.pod_namespace = "demo".into();
    a.pod_name = "web".into();
    // Another pod cannot take it.
    let mut other = add_req("sandbox-x", &ns, &dev, full_config());
    let o = other.attachment.as_mut().unwrap();
    o.pod_namespace = "demo".into();
    o.pod_name = "other".into();
    assert_eq!(n.add(other).await.unwrap_err().0, 102);
    n.add(req).await.unwrap();
    assert_eq!(n.state_of(&dev).await.state, "configured");
    assert!(n.del("sandbox-web", "net1", "").await.released);
    // Back to kubelet's accounting, not to the free pool.
    assert_eq!(n.state_of(&dev).await.state, "kubelet_allocated");
}

/// vfplugd's own share of an ADD + DEL: ledger writes (synced), gRPC over the unix socket and
/// the per-VF/per-PF locking, with the PF and netdevs simulated (no kernel netlink). Prints
/// figures; asserts only that every call succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_add_del_round_trip_without_kernel_work() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("bench");
    let dev = n.vfs[0].clone();
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = std::time::Instant::now();
        n.add(add_req("bench", &ns, &dev, full_config()))
            .await
            .unwrap();
        add.push(t.elapsed());
        let t = std::time::Instant::now();
        assert!(n.del("bench", "net1", "").await.released);
        del.push(t.elapsed());
    }
    for (what, v) in [("Add", &mut add), ("Del", &mut del)] {
        v.sort();
        eprintln!(
            "FIGURE node API {what} without kernel work (simulated PF and netdevs, n=200): p50 {:?} p99 {:?}",
            v[v.len() / 2],
            v[v.len() * 99 / 100]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_answers_a_repeat_from_the_ledger_and_changes_nothing() {
    let mut n = Node::start(DriverProfile::default()).await;
    let ns = n.netns("pod");
    let mut req = add_req("c1", &ns, &n.vfs[1].clone(), full_config());
    req.ipam_result = r#"{"cniVersion":"1.1.0","ips":[{"address":"10.9.0.5/24"}]}"#.into();
    let e = n.client.lookup(req.clone()).await.unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 3, "{}", e.message());
    assert_eq!(n.state_of(&n.vfs[1].clone()).await.state, "free");

    let first = n.add(req.clone()).await.unwrap();
    let calls = n.pf.log().len();
    let again = n.client.lookup(req.clone()).await.unwrap().into_inner();
    assert!(again.existing);
    assert_eq!(
        (again.pci_address.clone(), again.token),
        (first.pci_address, first.token)
    );
    assert_eq!(
        again.ipam_result, req.ipam_result,
        "the IPAM result is kept with the attachment"
    );
    assert_eq!(n.pf.log().len(), calls);
    // Another config for the same attachment is not a repeat.
    let mut other = req.clone();
    other.config.as_mut().unwrap().vlan = Some(7);
    let e = n.client.lookup(other).await.unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 3);
    assert_eq!(n.state_of(&n.vfs[1].clone()).await.state, "configured");
}

// ---- issue 8: what real peers found --------------------------------------------------------

const NET: &str = "vfplug.io/net";

fn pod_req(cid: &str, netns: &Path, device: &str, pod: (&str, &str)) -> v1::AddRequest {
    let mut r = add_req(cid, netns, device, full_config());
    let a = r.attachment.as_mut().unwrap();
    a.pod_namespace = pod.0.into();
    a.pod_name = pod.1.into();
    r
}

async fn wait_state(n: &mut Node, pci: &str, want: &str) {
    for _ in 0..200 {
        if n.state_of(pci).await.state == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{pci} never became {want}: {:?}", n.state_of(pci).await);
}

/// The kubelet allocates `dev` of the net pool (Allocate over gRPC, after the first full
/// snapshot) to pod demo/web, and PodResources says so.
async fn kubelet_gives(n: &Node, dev: &str) {
    n.kubelet
        .wait_snapshot(NET, None, Duration::from_secs(10), |s| {
            s.healthy_ids().len() == 4
        })
        .await
        .unwrap();
    n.kubelet
        .allocate(NET, vec![vec![dev.to_owned()]])
        .await
        .unwrap();
    n.podres
        .set_pods(vec![FakePodResources::pod("demo", "web", "c", NET, &[dev])]);
}

/// Finding 2: a VF the kubelet gave a pod, configured by that pod's ADD, stays Healthy at the
/// kubelet: Unhealthy, the kubelet would take it out of allocatable *and* count the pod's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_vf_claimed_by_its_pod_is_counted_once() {
    let mut n = Node::start(DriverProfile::default()).await;
    let dev = n.vfs[1].clone();
    kubelet_gives(&n, &dev).await;
    let ns = n.netns("web");
    n.add(pod_req("sb-web", &ns, &dev, ("demo", "web")))
        .await
        .unwrap();
    let after = std::time::Instant::now();
    // Several PodResources polls (100 ms) and pushes later, the kubelet still sees it Healthy.
    let unhealthy = n
        .kubelet
        .wait_snapshot(NET, None, Duration::from_millis(800), |s| {
            !s.healthy_ids().contains(&dev)
        })
        .await;
    assert!(unhealthy.is_err(), "shown Unhealthy: {unhealthy:?}");
    assert!(after.elapsed() >= Duration::from_millis(700));
}

/// Finding 7: a VF taken through the node API turns Unhealthy at the kubelet at once, not at
/// the next PodResources poll (an hour here) or host event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_reaches_the_kubelet_at_once() {
    let mut n = Node::start_with(DriverProfile::default(), |o| {
        o.podresources_interval = Duration::from_secs(3600);
    })
    .await;
    n.kubelet
        .wait_snapshot(NET, None, Duration::from_secs(10), |s| {
            s.healthy_ids().len() == 4
        })
        .await
        .unwrap();
    let ns = n.netns("p");
    let mut req = add_req("c-pool", &ns, "", full_config());
    req.pool = "net".into();
    let t = std::time::Instant::now();
    let r = n.add(req).await.unwrap();
    let snap = n
        .kubelet
        .wait_snapshot(NET, Some(t), Duration::from_secs(2), |s| {
            !s.healthy_ids().contains(&r.pci_address)
        })
        .await
        .expect("the kubelet hears of the reservation at once");
    eprintln!("reservation -> kubelet snapshot: {:?}", t.elapsed());
    assert_eq!(snap.healthy_ids().len(), 3);
    // And the release: Healthy again at once.
    let t = std::time::Instant::now();
    assert!(n.del("c-pool", "net1", "").await.released);
    n.kubelet
        .wait_snapshot(NET, Some(t), Duration::from_secs(2), |s| {
            s.healthy_ids().contains(&r.pci_address)
        })
        .await
        .expect("the kubelet hears of the release at once");
}

/// Finding 5: with `pool`, the VF the kubelet gave this very pod is claimed first — also when
/// PodResources has not been polled since (it is asked on the spot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pool_the_pods_own_kubelet_vf_is_claimed_first() {
    let mut n = Node::start_with(DriverProfile::default(), |o| {
        o.podresources_interval = Duration::from_secs(3600);
    })
    .await;
    let dev = n.vfs[3].clone();
    kubelet_gives(&n, &dev).await;
    let ns = n.netns("web");
    let mut req = pod_req("sb-web", &ns, "", ("demo", "web"));
    req.pool = "net".into();
    let r = n.add(req).await.unwrap();
    assert_eq!(
        r.pci_address, dev,
        "took a second VF instead of the pod's own"
    );
    assert!(n.podres.list_calls() >= 1);
    assert!(n.del("sb-web", "net1", "").await.released);
    assert_eq!(n.state_of(&dev).await.state, "kubelet_allocated");
}

/// Finding 6: STATUS (the runtime's network readiness) does not depend on the kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_ready_without_a_kubelet_registration() {
    let mut n = Node::start(DriverProfile::default()).await;
    n.kubelet.stop();
    n.restart().await;
    let st = n
        .client
        .status(v1::StatusRequest { pool: "net".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(st.ready, "{st:?}");
    assert_eq!(st.free, 4);
}

/// Finding 8: a pod whose NAD gives neither deviceID nor pool hears which VF it holds and how
/// to get it; a netdev-style (IPAM) network on a vfio pool is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_are_refused_with_what_to_do() {
    let mut n = Node::start(DriverProfile::default()).await;
    let dev = n.vfs[2].clone();
    n.podres.set_pods(vec![FakePodResources::pod(
        "demo",
        "web",
        "c",
        NET,
        &[&dev],
    )]);
    wait_state(&mut n, &dev, "kubelet_allocated").await;
    let ns = n.netns("web");
    let (code, msg) = n
        .add(pod_req("sb-web", &ns, "", ("demo", "web")))
        .await
        .unwrap_err();
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains(&dev) && msg.contains("k8s.v1.cni.cncf.io/resourceName: vfplug.io/net"),
        "{msg}"
    );

    let vm = n.vfs[4].clone();
    let mut req = add_req("vm1", &ns, &vm, v1::VfConfig::default());
    req.ips = vec![v1::IpConfig {
        address: "10.9.0.5/24".into(),
        ..Default::default()
    }];
    let (code, msg) = n.add(req).await.unwrap_err();
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("ipam") && msg.contains("vfio"), "{msg}");
    assert_eq!(n.state_of(&vm).await.state, "free");
    assert_eq!(n.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
}

/// Finding 4 (the quarantine half): a quarantined VF says why, shows in List, and an operator
/// can clear it; clearing is refused for a VF that is not quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_has_a_reason_and_can_be_cleared() {
    let mut n = Node::start(DriverProfile::default()).await;
    let dev = n.vfs[0].clone();
    let ns = n.netns("pod");
    n.add(add_req("c1", &ns, &dev, full_config()))
        .await
        .unwrap();
    n.pf.fail_next("vlan", Fault::Errno(5), 2);
    assert!(!n.del("c1", "net1", "").await.released);
    let e = n.state_of(&dev).await;
    assert_eq!(e.state, "quarantined");
    assert!(e.reason.contains("CNI DEL"), "{e:?}");
    let owner = e.owner.expect("the previous owner is shown");
    assert_eq!(owner.container_id, "c1");
    let r = n
        .client
        .unquarantine(v1::UnquarantineRequest {
            pci_address: dev.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.previous_reason, e.reason);
    assert_eq!(n.state_of(&dev).await.state, "free");
    let err = n
        .client
        .unquarantine(v1::UnquarantineRequest {
            pci_address: dev.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&err).0, 102, "{err:?}");
    let err = n
        .client
        .unquarantine(v1::UnquarantineRequest {
            pci_address: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&err).0, 7, "{err:?}");
}

/// Finding 9: a kubelet allocation's owner shows in List; its device-info file goes when the
/// kubelet lets the VF go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_owners_are_listed_and_device_info_files_removed() {
    let mut n = Node::start_with(DriverProfile::default(), |o| {
        o.kubelet_alloc_grace = Duration::from_millis(200);
    })
    .await;
    let dev = n.vfs[1].clone();
    n.kubelet
        .wait_snapshot(NET, None, Duration::from_secs(10), |s| {
            s.healthy_ids().len() == 4
        })
        .await
        .unwrap();
    n.kubelet
        .allocate(NET, vec![vec![dev.clone()]])
        .await
        .unwrap();
    let info = std::fs::read_dir(n.root.join("devinfo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(&dev))
        .expect("Allocate wrote a device-info file");
    n.podres.set_pods(vec![FakePodResources::pod(
        "demo",
        "web",
        "c",
        NET,
        &[&dev],
    )]);
    for _ in 0..200 {
        if n.state_of(&dev).await.owner.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let owner = n.state_of(&dev).await.owner.expect("owner listed");
    assert_eq!(
        (owner.pod_namespace.as_str(), owner.pod_name.as_str()),
        ("demo", "web")
    );
    n.podres.set_pods(vec![]);
    wait_state(&mut n, &dev, "free").await;
    assert!(!info.exists(), "{} is still there", info.display());
}

/// Finding 12: release resets a VF the workload drove through vfio and rebinds the driver it
/// had; a failing reset quarantines it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_resets_and_rebinds_as_the_vf_was() {
    // The fake binder knows the first vfio VF (on vfio-pci); the second is unknown to it, so
    // its reset fails.
    let vm: PciAddress = "0000:5e:01.0".parse().unwrap();
    let binder = Arc::new(FakeDriverBinder::new([(vm, Some("vfio-pci".to_string()))]));
    let b = Arc::clone(&binder);
    let mut n = Node::start_with(DriverProfile::default(), move |o| {
        o.driver_binder = Some(b.clone());
    })
    .await;
    assert_eq!(n.vfs[4], vm.to_string());
    let other: PciAddress = n.vfs[5].parse().unwrap();
    let ns = n.netns("vm");
    n.add(vfio_req(
        "vm1",
        &ns,
        &vm.to_string(),
        v1::VfConfig::default(),
    ))
    .await
    .unwrap();
    // While the VF was in use, someone unbound it from vfio-pci.
    binder.unbind(vm).unwrap();
    assert!(n.del("vm1", "net1", "").await.released);
    let ops = binder.ops();
    let tail: Vec<&BinderOp> = ops.iter().rev().take(2).collect();
    assert_eq!(
        tail,
        vec![&BinderOp::Bind(vm, "vfio-pci".into()), &BinderOp::Reset(vm),],
        "{ops:?}"
    );
    // A VF whose reset fails is quarantined, never freed.
    n.add(vfio_req(
        "vm2",
        &ns,
        &other.to_string(),
        v1::VfConfig::default(),
    ))
    .await
    .unwrap();
    let d = n.del("vm2", "net1", "").await;
    assert!(!d.released, "{d:?}");
    let e = n.state_of(&other.to_string()).await;
    assert_eq!(e.state, "quarantined");
    assert!(e.reason.contains("resetting"), "{e:?}");
}

/// Must have 3: on start, half-done ADDs are undone as DEL would (settings written ahead but
/// the ADD never finished), while finished ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_done_adds_are_undone_at_start() {
    let mut n = Node::start(DriverProfile::default()).await;
    let done = n.vfs[0].clone();
    let ns = n.netns("pod");
    n.add(add_req("c-done", &ns, &done, full_config()))
        .await
        .unwrap();
    n.stop().await;
    // While vfplugd is down: a second ADD's records, as a crash after its write-ahead record
    // would leave them (its settings may or may not have reached the PF).
    let half: PciAddress = n.vfs[1].parse().unwrap();
    {
        let (mut wal, rec) = Wal::<Ledger, Record>::open(&n.root.join("state")).unwrap();
        let mut l = rec.snapshot.unwrap_or_default();
        for r in &rec.records {
            l.apply(r).unwrap();
        }
        let owner = Owner {
            pod: "uid-half".into(),
            container_id: "c-half".into(),
            ifname: "net1".into(),
        };
        let r = l.plan_reserve(half, &owner).unwrap();
        l.apply(&r).unwrap();
        wal.append(&r, true).unwrap();
        let token = r.new_token().unwrap();
        let saved = SavedVfState::default();
        let r = l
            .plan_advance(
                half,
                token,
                Step::Configure {
                    saved,
                    cni: Some(Box::new(CniAttachment {
                        network: "net-a".into(),
                        netns: ns.display().to_string(),
                        complete: false,
                        config: vfplug_core::VfConfig {
                            vlan: Some(7),
                            ..Default::default()
                        },
                        ..Default::default()
                    })),
                },
            )
            .unwrap();
        wal.append(&r, true).unwrap();
    }
    n.pf.set_vf(
        "ens1f0",
        1,
        vfplug_host::net::VfChange::Vlan {
            vlan: 7,
            qos: 0,
            proto: vfplug_core::VlanProto::Dot1Q,
        },
    )
    .unwrap();
    n.boot().await;
    assert_eq!(n.state_of(&n.vfs[1].clone()).await.state, "free");
    assert_eq!(
        n.pf_settings(1).vlan,
        0,
        "the half-done ADD's VLAN was undone"
    );
    assert_eq!(n.state_of(&done).await.state, "configured");
}

// ---- issue 9: a VM pod's network, through the node API ----------------------------------------

/// A node whose vfplugd trusts the test's sockets and raises memlock through a fake (the test's
/// own pid is "QEMU"), with the emptyDir volume `qmp` of pod `uid` made. Returns the volume dir.
async fn vm_node(
    uid: &str,
) -> (
    Node,
    Arc<vfplug_host::vmpod::FakeMemlock>,
    std::path::PathBuf,
) {
    vm_node_with_index(uid, None).await
}

/// As [`vm_node`], with the Domain controller's pod watch `index` handed to the agent
/// (`AgentOptions::pod_index`; `None`: the controller is off).
async fn vm_node_with_index(
    uid: &str,
    index: Option<Arc<PodIndex>>,
) -> (
    Node,
    Arc<vfplug_host::vmpod::FakeMemlock>,
    std::path::PathBuf,
) {
    use vfplug_host::vmpod::{FakeMemlock, MemlockLimit};
    let me = std::process::id();
    let memlock = Arc::new(FakeMemlock::new([(me, MemlockLimit::both(64 << 20))]));
    let ml = memlock.clone();
    let n = Node::start_with(DriverProfile::default(), move |o| {
        o.memlock = Some(ml.clone());
        o.qmp_trusted_uids.insert(rustix_euid());
        o.pod_index = index.clone();
    })
    .await;
    let qmp_dir = n
        .root
        .join("kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/qmp");
    std::fs::create_dir_all(&qmp_dir).unwrap();
    (n, memlock, qmp_dir)
}

/// A VM pod's vfio ADD of `vf` (sandbox `sb-<pod>`, netns `<pod>`) naming the socket
/// `qmp/qmp.sock` of pod `uid`.
fn vm_req(n: &Node, pod: &str, uid: &str, vf: &str) -> v1::AddRequest {
    let ns = n.netns(pod);
    let mut req = vfio_req(&format!("sb-{pod}"), &ns, vf, v1::VfConfig::default());
    req.attachment.as_mut().unwrap().pod_uid = uid.into();
    req.qmp_socket = "qmp/qmp.sock".into();
    req
}

/// The scripted QEMU of a VM pod: `vf` hot-plugged as `vfplug-net1` into `vfplug-rp1`, then
/// unplugged with the guest's acknowledgement.
fn vm_script(vf: &str) -> vfplug_qmp::testing::Script {
    use serde_json::json;
    let peripherals = |extra: &[&str]| {
        let mut v = vec![
            json!({"name": "vfplug-rp1", "type": "child<pcie-root-port>"}),
            json!({"name": "vfplug-rp2", "type": "child<pcie-root-port>"}),
        ];
        v.extend(
            extra
                .iter()
                .map(|e| json!({"name": e, "type": "child<vfio-pci>"})),
        );
        serde_json::Value::Array(v)
    };
    vfplug_qmp::testing::Script::new()
        .expect("query-memory-size-summary")
        .ret(json!({"base-memory": 1u64 << 30}))
        .expect("qom-list")
        .ret(peripherals(&[]))
        .expect("query-pci")
        .ret(json!([{"bus": 0, "devices": []}]))
        .expect_args(
            "device_add",
            json!({"driver": "vfio-pci", "id": "vfplug-net1", "bus": "vfplug-rp1", "host": vf}),
        )
        .ok()
        .expect("qom-list")
        .ret(peripherals(&["vfplug-net1"]))
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        .ok()
        .event(
            "DEVICE_DELETED",
            json!({"device": "vfplug-net1", "path": "/machine/peripheral/vfplug-net1"}),
        )
}

/// DEL of attachment `sb`/net1 of pod `uid`.
async fn vm_del(n: &mut Node, sb: &str, uid: &str) -> v1::DelResponse {
    n.client
        .del(v1::DelRequest {
            attachment: Some(v1::Attachment {
                pod_uid: uid.into(),
                ..att(sb, "net1")
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A VM pod (its QMP socket in an emptyDir volume under the kubelet dir, served by the scripted
/// QMP server) gets its vfio VF hot-plugged by ADD with `qmpSocket`, and DEL unplugs it on
/// `DEVICE_DELETED` and puts the VF back: nets and hostdevs are one lease throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pods_add_hotplugs_the_vf_and_del_unplugs_it() {
    // A short UID: the test binds the socket by path (108 bytes at most); vfplugd connects
    // through /proc/self/fd, which has no such limit.
    let uid = "vm-a-uid";
    let (mut n, memlock, qmp_dir) = vm_node(uid).await;
    let vf = n.vfs[4].clone();
    let server = vm_script(&vf).listen(&qmp_dir.join("qmp.sock")).unwrap();

    let req = vm_req(&n, "vm-a", uid, &vf);
    let r = match n.add(req.clone()).await {
        Ok(r) => r,
        Err(e) => panic!("{e:?}; QMP server: {:?}", server.await),
    };
    assert_eq!(
        (r.pci_address.as_str(), r.mode.as_str(), r.attach_pending),
        (vf.as_str(), "vfio", false)
    );
    assert_eq!(n.state_of(&vf).await.state, "attached");
    // QEMU may lock the guest's RAM + 1 GiB before the device is added.
    assert_eq!(memlock.calls(), vec![(std::process::id(), 2 << 30)]);
    // A repeated ADD is answered from the ledger, nothing sent to QEMU.
    assert!(n.add(req).await.unwrap().existing);

    let d = vm_del(&mut n, "sb-vm-a", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
    drop(server);
}

/// The runtime sets up a pod's networks before its containers start: an ADD for a VM pod whose
/// QEMU has not bound its QMP socket yet answers at once with the VF reserved and configured
/// and the hot-plug owed; a stale socket (nobody listening) does not count; the moment QEMU
/// binds a new socket in the pod's volume (inotify, not polling), vfplugd hot-plugs the VF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pods_add_before_qemu_runs_hotplugs_once_qemu_listens() {
    let uid = "vm-b-uid";
    let (mut n, memlock, qmp_dir) = vm_node(uid).await;
    let vf = n.vfs[4].clone();
    let sock = qmp_dir.join("qmp.sock");
    // A socket left behind by an earlier QEMU: bound, nobody listening.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);

    let req = vm_req(&n, "vm-b", uid, &vf);
    let r = n.add(req.clone()).await.unwrap();
    assert!(r.attach_pending && !r.existing, "{r:?}");
    assert_eq!(r.pci_address, vf);
    assert_eq!(n.state_of(&vf).await.state, "configured");
    assert!(
        memlock.calls().is_empty(),
        "nothing sent to a QEMU that is not there"
    );
    // A repeat (the runtime retrying) is answered from the ledger, still owed.
    let again = n.add(req).await.unwrap();
    assert!(again.existing && again.attach_pending, "{again:?}");

    // QEMU starts: a new socket replaces the stale one.
    std::fs::remove_file(&sock).unwrap();
    let server = vm_script(&vf).listen(&sock).unwrap();
    let mut state = String::new();
    for _ in 0..500 {
        state = n.state_of(&vf).await.state;
        if state == "attached" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state, "attached", "the owed hot-plug was not done");
    assert_eq!(memlock.calls(), vec![(std::process::id(), 2 << 30)]);

    let d = vm_del(&mut n, "sb-vm-b", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
    drop(server);
}

/// An owed hot-plug whose pod goes away before QEMU ever ran: DEL releases the VF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_before_qemu_ever_ran_releases_the_owed_vf() {
    let uid = "vm-c-uid";
    let (mut n, memlock, _qmp_dir) = vm_node(uid).await;
    let vf = n.vfs[4].clone();
    let req = vm_req(&n, "vm-c", uid, &vf);
    assert!(n.add(req).await.unwrap().attach_pending);
    let d = vm_del(&mut n, "sb-vm-c", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
    assert!(memlock.calls().is_empty());
}

/// A `qmpSocket` that resolves out of the pod (a symlink) is refused, and nothing is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qmp_socket_outside_the_pod_is_refused() {
    let mut n = Node::start(DriverProfile::default()).await;
    let vf = n.vfs[4].clone();
    let uid = "vm-b-uid";
    let vols = n
        .root
        .join("kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir");
    std::fs::create_dir_all(&vols).unwrap();
    let elsewhere = n.root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let _l = std::os::unix::net::UnixListener::bind(elsewhere.join("qmp.sock")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, vols.join("qmp")).unwrap();
    let req = vm_req(&n, "vm-b", uid, &vf);
    let (code, msg) = n.add(req).await.unwrap_err();
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("symlink"), "{msg}");
    assert_eq!(n.state_of(&vf).await.state, "free");
}

fn rustix_euid() -> u32 {
    // The test's own uid: its sockets are owned by it.
    std::fs::metadata("/proc/self").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    })
}

/// `vfplugd`'s Prometheus text, as `/metrics` serves it.
fn metrics_text(n: &Node) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, n.registry.as_ref().unwrap()).unwrap();
    out
}

/// Waits (bounded) until the metrics, recomputed every `metrics_interval`, show `line`.
async fn wait_metric(n: &Node, line: &str) {
    for _ in 0..200 {
        if metrics_text(n).lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("metrics never showed {line:?}:\n{}", metrics_text(n));
}

/// A VM pod's records over the node API, through the phases the scripted QEMU leads it into:
/// pending and attaching (QEMU slow to answer), attached, guest-error (the guest refuses the first unplug; its reason is shown), unplug
/// pending (the second unplug is acknowledged only after DEL's wait), then gone once Free. The
/// filter, the metrics gauges, and a foreign client (Python grpcio) reading the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pods_records_follow_its_vf_over_the_node_api() {
    use serde_json::json;
    use vfplug_host::vmpod::{FakeMemlock, MemlockLimit};
    use vfplug_qmp::testing::Script;

    let me = std::process::id();
    let memlock = Arc::new(FakeMemlock::new([(me, MemlockLimit::both(64 << 20))]));
    let mut n = Node::start_with(DriverProfile::default(), move |o| {
        o.memlock = Some(memlock.clone());
        o.qmp_trusted_uids.insert(rustix_euid());
        o.metrics_interval = Duration::from_millis(20);
        // The second unplug is acknowledged after this: DEL returns with it pending.
        o.unplug_wait = Duration::from_millis(200);
    })
    .await;
    let vf = n.vfs[5].clone();
    let uid = "vm-r-uid";
    let qmp_dir = n
        .root
        .join("kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/qmp");
    std::fs::create_dir_all(&qmp_dir).unwrap();
    let ports = |extra: &[&str]| {
        let mut v = vec![json!({"name": "vfplug-rp1", "type": "child<pcie-root-port>"})];
        v.extend(
            extra
                .iter()
                .map(|e| json!({"name": e, "type": "child<vfio-pci>"})),
        );
        serde_json::Value::Array(v)
    };
    let gone = json!({"device": "vfplug-net1", "path": "/machine/peripheral/vfplug-net1"});
    // QEMU is slow to answer twice, so the records can be read while the VF is pending (the
    // ADD recorded the VM, nothing sent to QEMU yet) and while it is attaching.
    let server = Script::new()
        .expect("query-memory-size-summary")
        .sleep(Duration::from_millis(800))
        .ret(json!({"base-memory": 1u64 << 30}))
        .expect("qom-list")
        .ret(ports(&[]))
        .expect("query-pci")
        .ret(json!([{"bus": 0, "devices": []}]))
        .expect("device_add")
        .sleep(Duration::from_millis(800))
        .ok()
        .expect("qom-list")
        .ret(ports(&["vfplug-net1"]))
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        .ok()
        .event("DEVICE_UNPLUG_GUEST_ERROR", gone.clone())
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        .ok()
        .sleep(Duration::from_millis(600))
        .event("DEVICE_DELETED", gone)
        .listen(&qmp_dir.join("qmp.sock"))
        .unwrap();

    let ns = n.netns("vm-r");
    let mut req = vfio_req(
        "sb-vm-r",
        &ns,
        &vf,
        v1::VfConfig {
            mac: Some("02:00:00:00:00:77".into()),
            vlan: Some(77),
            ..Default::default()
        },
    );
    {
        let a = req.attachment.as_mut().unwrap();
        a.pod_uid = uid.into();
        a.pod_namespace = "ns".into();
        a.pod_name = "vm-r".into();
    }
    req.qmp_socket = "qmp/qmp.sock".into();
    let mut c = n.client.clone();
    let adding = tokio::spawn(async move { c.add(req).await });

    let records = |n: &mut Node, f: v1::VmRecordsRequest| {
        let mut c = n.client.clone();
        async move { c.vm_records(f).await.map(tonic::Response::into_inner) }
    };
    // Seen while the ADD is under way: each phase lasts while QEMU waits (800 ms); bounded polls.
    for (want, alias) in [
        (v1::VmPhase::Pending, ""),
        (v1::VmPhase::Attaching, "vfplug-net1"),
    ] {
        let mut seen = None;
        for _ in 0..100 {
            let r = records(&mut n, v1::VmRecordsRequest::default())
                .await
                .unwrap();
            if let Some(h) = r.vms.first().and_then(|v| v.hostdevs.first())
                && h.phase() == want
            {
                seen = Some((h.alias.clone(), r.vms[0].nets[0].phase()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen, Some((alias.to_owned(), want)), "{want:?}");
    }
    if let Err(e) = adding.await.unwrap() {
        panic!("{e:?}; QMP server: {:?}", server.await);
    }
    let all = records(&mut n, v1::VmRecordsRequest::default())
        .await
        .unwrap();
    assert_eq!(all.vms.len(), 1, "{all:?}");
    let vm = &all.vms[0];
    assert_eq!(
        (
            vm.pod_namespace.as_str(),
            vm.pod_name.as_str(),
            vm.pod_uid.as_str()
        ),
        ("ns", "vm-r", uid)
    );
    assert!(vm.qmp_socket.ends_with("/qmp/qmp.sock"), "{vm:?}");
    assert_eq!(vm.nets.len(), 1);
    let net = &vm.nets[0];
    assert_eq!(
        (
            net.name.as_str(),
            net.network.as_str(),
            net.pool.as_str(),
            net.mac.as_str(),
            net.vlan
        ),
        (
            "net1",
            "net-a",
            "vfplug.io/vm",
            "02:00:00:00:00:77",
            Some(77)
        )
    );
    let actual = net.actual.as_ref().unwrap();
    assert_eq!(
        (actual.r#type.as_str(), actual.pci_address.as_str()),
        ("hostdev", vf.as_str())
    );
    assert_eq!(net.phase(), v1::VmPhase::Attached);
    assert_eq!(vm.hostdevs.len(), 1);
    let h = &vm.hostdevs[0];
    assert_eq!(
        (
            h.alias.as_str(),
            h.pci_address.as_str(),
            h.parent_net.as_str()
        ),
        ("vfplug-net1", vf.as_str(), "net1")
    );
    assert_eq!(h.phase(), v1::VmPhase::Attached);
    wait_metric(&n, r#"vfplug_vm_devices{phase="attached"} 1"#).await;
    wait_metric(&n, "vfplug_vms 1").await;

    // Filters: by UID, by namespace and name; another pod's, none; a name alone is refused.
    let f = |uid: &str, ns: &str, name: &str| v1::VmRecordsRequest {
        pod_uid: uid.into(),
        pod_namespace: ns.into(),
        pod_name: name.into(),
    };
    for (q, want) in [
        (f(uid, "", ""), 1),
        (f("", "ns", "vm-r"), 1),
        (f("", "ns", ""), 1),
        (f("other-uid", "", ""), 0),
        (f("", "ns", "vm-x"), 0),
    ] {
        let got = records(&mut n, q.clone()).await.unwrap();
        assert_eq!(got.vms.len(), want, "{q:?}");
    }
    let e = records(&mut n, f("", "", "vm-r")).await.unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 7, "{}", e.message());
    assert!(e.message().contains("namespace"), "{}", e.message());

    // The guest refuses the first unplug: DEL is "try again", the records say why.
    let del = v1::DelRequest {
        attachment: Some(v1::Attachment {
            pod_uid: uid.into(),
            ..att("sb-vm-r", "net1")
        }),
        ..Default::default()
    };
    let e = n.client.del(del.clone()).await.unwrap_err();
    assert_eq!(vfplug_api::cni_code_of(&e).0, 11, "{}", e.message());
    let now = records(&mut n, v1::VmRecordsRequest::default())
        .await
        .unwrap();
    let h = &now.vms[0].hostdevs[0];
    assert_eq!(h.phase(), v1::VmPhase::GuestError);
    assert!(h.reason.contains("DEVICE_UNPLUG_GUEST_ERROR"), "{h:?}");
    assert_eq!(now.vms[0].nets[0].phase(), v1::VmPhase::GuestError);
    wait_metric(&n, r#"vfplug_vm_devices{phase="guest-error"} 1"#).await;
    wait_metric(&n, r#"vfplug_vm_devices{phase="attached"} 0"#).await;

    // A reader nobody here wrote sees the same records.
    if let Some(py) = vfplug_kubelet::foreign::PythonGrpc::find(
        "a_vm_pods_records_follow_its_vf_over_the_node_api",
    ) {
        let v = py
            .call(
                vfplug_kubelet::foreign::Service::Node,
                &n.root.join("vfplugd.sock"),
                "localhost",
            )
            .await
            .unwrap();
        let want = json!([{
            "pod": ["ns", "vm-r", uid],
            "qmp_socket": now.vms[0].qmp_socket,
            "nets": [{"name": "net1", "network": "net-a", "pool": "vfplug.io/vm",
                      "mac": "02:00:00:00:00:77", "vlan": 77,
                      "actual": ["hostdev", vf], "phase": "VM_PHASE_GUEST_ERROR"}],
            "hostdevs": [{"alias": "vfplug-net1", "pci_address": vf, "parent_net": "net1",
                          "phase": "VM_PHASE_GUEST_ERROR", "reason": h.reason}],
        }]);
        assert_eq!(v["vms"], want, "python saw {v}");
    }

    // The second unplug is acknowledged late: pending, then gone with the VF Free.
    let d = n.client.del(del).await.unwrap().into_inner();
    assert!(!d.released, "{d:?}");
    let now = records(&mut n, v1::VmRecordsRequest::default())
        .await
        .unwrap();
    assert_eq!(
        now.vms[0].hostdevs[0].phase(),
        v1::VmPhase::UnplugPending,
        "{now:?}"
    );
    assert_eq!(
        now.vms[0].hostdevs[0].reason, "",
        "the next detach clears it"
    );
    wait_state(&mut n, &vf, "free").await;
    let after = records(&mut n, v1::VmRecordsRequest::default())
        .await
        .unwrap();
    assert!(after.vms.is_empty(), "{after:?}");
    wait_metric(&n, "vfplug_vms 0").await;
    wait_metric(&n, r#"vfplug_vm_devices{phase="unplug-pending"} 0"#).await;
    drop(server);
}

// ---- the QMP socket from the pod watch (docs/domain.md, "VM pods") ------------------------------

/// What the controller's pod watch would put in the index for pod `ns/<name>`.
fn pod_entry(name: &str, qmp_socket: Option<&str>) -> PodEntry {
    PodEntry {
        namespace: "ns".into(),
        name: name.into(),
        qmp_socket: qmp_socket.map(str::to_owned),
    }
}

/// A VM pod's vfio ADD as the CNI plugin sends it when the network config names no `qmpSocket`
/// (the pod's namespace and name from CNI_ARGS).
fn add_without_qmp(n: &Node, pod: &str, uid: &str, vf: &str) -> v1::AddRequest {
    let mut req = vm_req(n, pod, uid, vf);
    req.qmp_socket.clear();
    let a = req.attachment.as_mut().unwrap();
    a.pod_namespace = "ns".into();
    a.pod_name = pod.into();
    req
}

/// The VM records vfplugd holds for pod `uid` (`VmRecords` filtered by UID).
async fn vm_records_of(n: &Node, uid: &str) -> Vec<v1::VmRecord> {
    n.client
        .clone()
        .vm_records(v1::VmRecordsRequest {
            pod_uid: uid.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vms
}

/// With the controller on, a pod the watch shows with `vfplug.io/qmp-socket` is a VM pod even
/// though its network config names no `qmpSocket`: QEMU is not up yet, so the ADD answers with
/// the hot-plug owed and the VM records show the pod; once QEMU binds the socket the annotation
/// names (not any other path), the VF is hot-plugged, and DEL unplugs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_annotation_makes_an_add_without_qmp_socket_a_vm_attachment() {
    let uid = "vm-an-uid";
    let index = Arc::new(PodIndex::default());
    index.upsert(uid, pod_entry("vm-an", Some("qmp/qmp.sock")));
    index.set_synced();
    let (mut n, memlock, qmp_dir) = vm_node_with_index(uid, Some(index)).await;
    let vf = n.vfs[4].clone();

    let r = n.add(add_without_qmp(&n, "vm-an", uid, &vf)).await.unwrap();
    assert!(
        r.attach_pending && !r.existing,
        "the hot-plug is owed: {r:?}"
    );
    assert_eq!(
        (r.pci_address.as_str(), r.mode.as_str()),
        (vf.as_str(), "vfio")
    );
    assert_eq!(n.state_of(&vf).await.state, "configured");
    let vms = vm_records_of(&n, uid).await;
    assert_eq!(vms.len(), 1, "a VM attachment: {vms:?}");
    let vm = &vms[0];
    assert_eq!(
        (vm.pod_namespace.as_str(), vm.pod_name.as_str()),
        ("ns", "vm-an")
    );
    assert!(
        vm.qmp_socket
            .ends_with("/vm-an-uid/volumes/kubernetes.io~empty-dir/qmp/qmp.sock"),
        "the annotation's socket, in the pod's volume: {vm:?}"
    );
    assert_eq!(vm.hostdevs.len(), 1, "{vm:?}");
    assert_eq!(vm.hostdevs[0].phase(), v1::VmPhase::Pending);
    assert!(memlock.calls().is_empty(), "no QEMU yet");

    // QEMU binds the annotation's socket: the owed hot-plug is done there.
    let server = vm_script(&vf).listen(&qmp_dir.join("qmp.sock")).unwrap();
    wait_state(&mut n, &vf, "attached").await;
    assert_eq!(memlock.calls(), vec![(std::process::id(), 2 << 30)]);
    let d = vm_del(&mut n, "sb-vm-an", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
    assert!(vm_records_of(&n, uid).await.is_empty());
    drop(server);
}

/// With the controller on, a pod the watch shows without the annotation is a container pod:
/// the same ADD is a plain attachment, answered at once, with no VM record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_the_annotation_gets_a_plain_attachment() {
    let uid = "ct-an-uid";
    let index = Arc::new(PodIndex::default());
    index.upsert(uid, pod_entry("ct-an", None));
    index.set_synced();
    let (mut n, memlock, _qmp_dir) = vm_node_with_index(uid, Some(index)).await;
    let vf = n.vfs[4].clone();

    let t = std::time::Instant::now();
    let r = n.add(add_without_qmp(&n, "ct-an", uid, &vf)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the index knew the pod: no wait ({:?})",
        t.elapsed()
    );
    assert!(!r.attach_pending && !r.existing, "{r:?}");
    assert_eq!(
        (r.pci_address.as_str(), r.mode.as_str()),
        (vf.as_str(), "vfio")
    );
    assert_eq!(n.state_of(&vf).await.state, "configured");
    assert!(
        vm_records_of(&n, uid).await.is_empty(),
        "not a VM attachment"
    );
    assert!(memlock.calls().is_empty());
    let d = vm_del(&mut n, "sb-ct-an", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
}

/// With the controller on, an ADD for a pod the watch never shows cannot know whether the pod
/// is a VM pod: after the bounded wait (3 s) it fails with CNI code 11 (try again) and holds
/// nothing. A pod that shows up during the wait is answered as the index then says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_for_a_pod_the_watch_has_not_shown_waits_then_asks_again() {
    let uid = "vm-un-uid";
    let index = Arc::new(PodIndex::default());
    // The watch knows another pod of the node, not this one.
    index.upsert("someone-else", pod_entry("other", Some("qmp/qmp.sock")));
    index.set_synced();
    let (mut n, memlock, _qmp_dir) = vm_node_with_index(uid, Some(index.clone())).await;
    let vf = n.vfs[4].clone();

    let t = std::time::Instant::now();
    let (code, msg) = n
        .add(add_without_qmp(&n, "vm-un", uid, &vf))
        .await
        .unwrap_err();
    let waited = t.elapsed();
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("pod watch") && msg.contains(uid), "{msg}");
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(8),
        "the bounded wait is ~3 s: {waited:?}"
    );
    let list = n
        .client
        .list(v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    let held: Vec<_> = list
        .vfs
        .iter()
        .filter(|v| v.state != "free")
        .map(|v| (&v.pci_address, &v.state))
        .collect();
    assert!(held.is_empty(), "nothing held: {held:?}");
    assert!(vm_records_of(&n, uid).await.is_empty());
    assert!(memlock.calls().is_empty());

    // The runtime tries again; this time the watch shows the pod (a VM pod) half a second in.
    let req = add_without_qmp(&n, "vm-un", uid, &vf);
    let mut c = n.client.clone();
    let t = std::time::Instant::now();
    let adding = tokio::spawn(async move { c.add(req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!adding.is_finished(), "the ADD waits for the watch");
    index.upsert(uid, pod_entry("vm-un", Some("qmp/qmp.sock")));
    let r = adding.await.unwrap().unwrap().into_inner();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "answered when the watch showed the pod, not at the deadline: {:?}",
        t.elapsed()
    );
    assert!(r.attach_pending, "{r:?}");
    assert_eq!(vm_records_of(&n, uid).await.len(), 1);
    let d = vm_del(&mut n, "sb-vm-un", uid).await;
    assert!(d.released, "{d:?}");
    assert_eq!(n.state_of(&vf).await.state, "free");
}

/// With the controller off (no index), nothing changes: the network config alone decides. An
/// ADD naming no `qmpSocket` is a plain attachment at once, without waiting for any watch; one
/// naming it is a VM attachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_controller_the_network_config_alone_decides() {
    let uid = "vm-off-uid";
    let (mut n, _memlock, _qmp_dir) = vm_node_with_index(uid, None).await;
    let vf = n.vfs[4].clone();

    let t = std::time::Instant::now();
    let r = n
        .add(add_without_qmp(&n, "vm-off", uid, &vf))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "no watch to wait for: {:?}",
        t.elapsed()
    );
    assert!(!r.attach_pending, "{r:?}");
    assert!(vm_records_of(&n, uid).await.is_empty());
    assert!(vm_del(&mut n, "sb-vm-off", uid).await.released);
    assert_eq!(n.state_of(&vf).await.state, "free");

    let r = n.add(vm_req(&n, "vm-off", uid, &vf)).await.unwrap();
    assert!(r.attach_pending, "the config's qmpSocket: {r:?}");
    assert_eq!(vm_records_of(&n, uid).await.len(), 1);
    assert!(vm_del(&mut n, "sb-vm-off", uid).await.released);
    assert_eq!(n.state_of(&vf).await.state, "free");
}
