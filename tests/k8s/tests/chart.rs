//! The Helm chart (deploy/helm/vfplug) on the lab's real node: `helm install` with vfplug's own
//! image (scripts/image.sh, imported into the lab's containerd), vfplugd as the DaemonSet's pod
//! on a fake sysfs node (every path a chart value; its VF netdevs real veths), registering with
//! the real kubelet; the CNI plugin installed by the init container into containerd's bin dir
//! and called by containerd itself for a pod's VF (ADD and DEL); the Domain controller running
//! in-cluster with the chart's RBAC; `helm uninstall` taking it all away while the CNI binary
//! and the ledger stay on the host. Prints `CHART ...` (the story, scripts/demo.sh part 6) and
//! `TIMING ...` lines.
//!
//! It adds a conflist to the lab's containerd conf dir (every new pod's network while it runs;
//! removed when done) and veth pairs `lab0v<i>`/`lab0v<i>p` in the host's namespace (deleted
//! when done).
//!
//! Needs `tests/k8s/cluster.sh up`, `VFPLUG_K8S_ENV=<lab dir>/env` and helm (`$HELM` or on
//! PATH; scripts/get-chart-tools.sh); without them it says SKIP (or fails, with
//! `VFPLUG_REQUIRE=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use serde_json::json;
use vfplug_host::prereq;
use vfplug_k8slab::{
    Lab, PoolSpec, create_pod, delete_pod, fake_node, node_resource, pod_logs, pod_requesting,
    vm_pod, wait_for, wait_node_resource, wait_pod_running, workspace_bin_dir,
};

const IMAGE: &str = "vfplug:lab";
const WAIT: Duration = Duration::from_secs(90);

/// A line of the story (scripts/demo.sh part 6 shows these and the TIMING lines).
fn say(msg: impl std::fmt::Display) {
    eprintln!("CHART {msg}");
}

fn timing(name: &str, d: Duration) {
    eprintln!("TIMING {name} {:.3} s", d.as_secs_f64());
}

/// Runs helm with the lab's admin kubeconfig; its stdout, or a panic with everything it said.
fn helm(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let mut all = vec!["--kubeconfig", vfplug_chart::path_str(&lab.kubeconfig)];
    all.extend_from_slice(args);
    let out = vfplug_chart::run(bin, &all);
    assert!(
        out.ok,
        "helm {}:\n{}{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Uninstalls the release if the test ends before it did (a vfplugd with its controller left
/// running would act on the next tests' pods).
struct Release {
    helm: PathBuf,
    kubeconfig: PathBuf,
    name: String,
    ns: String,
    installed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = Command::new(&self.helm)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["uninstall", &self.name, "-n", &self.ns, "--wait"])
                .status();
        }
    }
}

/// The fake node's VF netdevs made real: a veth pair per VF, `lab0v<i>` (the name the fake
/// sysfs gives VF `i`'s netdev) and its peer `lab0v<i>p`, both in the host's namespace.
/// Deleted when dropped (through the peer, which never leaves the host).
struct VfLinks {
    names: Vec<String>,
    peers: Vec<String>,
    macs: Vec<String>,
}

impl VfLinks {
    fn create(n: usize) -> VfLinks {
        let mut l = VfLinks {
            names: Vec::new(),
            peers: Vec::new(),
            macs: Vec::new(),
        };
        for i in 0..n {
            let (name, peer) = (format!("lab0v{i}"), format!("lab0v{i}p"));
            // A pair an interrupted run left behind.
            let _ = Command::new("ip").args(["link", "del", &peer]).status();
            l.names.push(name.clone());
            l.peers.push(peer.clone());
            let st = Command::new("ip")
                .args(["link", "add", &name, "type", "veth", "peer", "name", &peer])
                .status()
                .unwrap();
            assert!(st.success(), "ip link add {name}: {st}");
            l.macs.push(link_mac(&name));
        }
        l
    }
}

impl Drop for VfLinks {
    fn drop(&mut self) {
        for p in &self.peers {
            let _ = Command::new("ip").args(["link", "del", p]).status();
        }
    }
}

fn host_has_link(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn link_mac(name: &str) -> String {
    let p = Path::new("/sys/class/net").join(name).join("address");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// A CNI network config in the lab containerd's conf dir, named to sort first; removed when
/// dropped, which gives new pods the lab's bridge again.
struct PodNetwork(PathBuf);

impl PodNetwork {
    fn install(conf_dir: &Path, conflist: &serde_json::Value) -> PodNetwork {
        let path = conf_dir.join("00-vfplug-chart.conflist");
        // Created in place (containerd reacts to a file created there, not renamed into it).
        std::fs::write(&path, conflist.to_string()).unwrap();
        PodNetwork(path)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `vfplugctl --socket SOCKET vfs`: what vfplugd's node API lists.
fn vfplugctl_vfs(socket: &Path) -> String {
    let out = Command::new(workspace_bin_dir().unwrap().join("vfplugctl"))
        .arg("--socket")
        .arg(socket)
        .arg("vfs")
        .output()
        .unwrap();
    assert!(out.status.success(), "vfplugctl vfs: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The STATE column of `pci`'s row in `vfplugctl vfs` (PCI PF VF POOL STATE ...).
fn vf_state(listed: &str, pci: &str) -> Option<String> {
    listed
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&pci))
        .and_then(|cells| cells.get(4).map(|s| (*s).to_owned()))
}

/// What the DaemonSet's pods, the kubelet and vfplugd said, for a failure message.
fn diagnose(lab: &Lab, ns: &str) -> String {
    let pods = lab
        .kubectl(&["-n", ns, "get", "pods", "-o", "wide"])
        .unwrap_or_else(|e| e.to_string());
    let logs = lab
        .kubectl(&[
            "-n",
            ns,
            "logs",
            "-l",
            "app.kubernetes.io/component=vfplugd",
            "--tail",
            "40",
        ])
        .unwrap_or_else(|e| e.to_string());
    let events = lab
        .kubectl(&["-n", ns, "get", "events", "--sort-by", ".lastTimestamp"])
        .unwrap_or_else(|e| e.to_string());
    format!(
        "--- pods ---\n{pods}\n--- vfplugd log ---\n{logs}\n--- events ---\n{events}\n--- kubelet log ---\n{}",
        lab.daemon_log_tail("kubelet", 30)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_runs_vfplugd_on_the_node() {
    let test = "helm_chart_runs_vfplugd_on_the_node";
    let Some(lab) = Lab::for_test(test) else {
        return;
    };
    let Some(helm_bin) = prereq::need(test, vfplug_chart::helm()) else {
        return;
    };
    let client = lab.client().await.unwrap();
    let ns = lab.namespace(&client, "vfplug-chart").await.unwrap();

    let took = lab.import_vfplug_image(IMAGE).unwrap();
    timing("chart.image_write_and_import", took);
    say(format!(
        "image {IMAGE} written by scripts/image.sh and imported into the node's containerd"
    ));

    // The fake node: its sysfs, dev, ledger, socket and IPAM data, all under one host dir.
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let root = dir.path();
    let (config, pools) = fake_node(root, &[PoolSpec::unique("chart_", 2)]).unwrap();
    let pool = pools[0].clone();
    for sub in ["state", "run", "devinfo", "cdi", "ipam"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let p = |sub: &str| root.join(sub).to_str().unwrap().to_owned();
    let cni_bin_dir = lab.env.path("CNI_BIN_DIR").unwrap();
    let cni_conf_dir = lab.env.path("CNI_CONF_DIR").unwrap();
    let links = VfLinks::create(pool.vfs.len());
    let api = lab.env.get("K8S_API_SERVER").unwrap().to_owned();
    let (api_host, api_port) = api
        .trim_start_matches("https://")
        .rsplit_once(':')
        .expect("K8S_API_SERVER is https://host:port");
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let values = json!({
        "image": {"repository": "vfplug", "tag": "lab", "pullPolicy": "Never"},
        "config": config,
        "controller": "on",
        "apiServer": {"host": api_host, "port": api_port},
        "vfNetlink": "simulated",
        "http": {"port": http_port},
        "log": {"level": "info"},
        "terminationGracePeriodSeconds": 10,
        "paths": {
            "sysfsRoot": p("sys"), "devRoot": p("dev"),
            "kubeletDir": lab.kubelet_dir.to_str().unwrap(),
            "devicePluginDir": lab.device_plugin_dir.to_str().unwrap(),
            "stateDir": p("state"), "socketDir": p("run"), "deviceInfoDir": p("devinfo"),
            "cdiDir": p("cdi"),
            // Where the lab's containerd looks for CNI plugins: the chart installs vfplug there.
            "cniBinDir": cni_bin_dir.to_str().unwrap(),
            // netnsDir: the default, /run/netns, where containerd pins pods' namespaces; a
            // HostToContainer mount needs a shared source, which a temp dir on /dev/shm is not.
        },
    });
    let values_file = root.join("values.json");
    std::fs::write(&values_file, values.to_string()).unwrap();
    let chart = vfplug_chart::chart_dir();
    let release = ns.name.clone();
    let mut guard = Release {
        helm: helm_bin.clone(),
        kubeconfig: lab.kubeconfig.clone(),
        name: release.clone(),
        ns: ns.name.clone(),
        installed: true,
    };

    let t = Instant::now();
    let out = helm(
        &lab,
        &helm_bin,
        &[
            "install",
            &release,
            chart.to_str().unwrap(),
            "-n",
            &ns.name,
            "--values",
            values_file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    timing("chart.helm_install", t.elapsed());
    say(format!(
        "helm install {release} deploy/helm/vfplug -n {}: STATUS deployed",
        ns.name
    ));
    assert!(out.contains("STATUS: deployed"), "{out}");
    // helm's --wait counts a DaemonSet ready at desired - maxUnavailable ready pods: 0 on one
    // node. `rollout status` waits for the pod's readiness: vfplugd's /readyz (inventory done,
    // node API serving, registration confirmed).
    let ds = format!("daemonset/{release}");
    lab.kubectl(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        &ds,
        "--timeout",
        "120s",
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.install_to_ready", t.elapsed());
    say("DaemonSet rolled out: vfplugd Ready (inventory, kubelet registration, node API)");

    // The real kubelet took vfplugd's registration from inside the pod.
    let took = wait_node_resource(&client, &lab.node_name, &pool.resource, 2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.ready_to_capacity", took);
    say(format!(
        "node {}: capacity and allocatable {} = 2",
        lab.node_name, pool.resource
    ));

    // The init container installed the CNI plugin where the runtime looks: it runs.
    let cni = cni_bin_dir.join("vfplug");
    let out = Command::new(&cni)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: {e}: {out:?}", cni.display()));
    assert!(
        v["supportedVersions"]
            .as_array()
            .is_some_and(|a| a.len() > 3),
        "{v}"
    );

    // The node API is on the host, where the CNI plugin dials it.
    let listed = vfplugctl_vfs(&root.join("run/vfplugd.sock"));
    for vf in &pool.vfs {
        assert!(
            listed.contains(vf.as_str()),
            "{vf} not in vfplugctl vfs:\n{listed}"
        );
    }

    // containerd calls the installed plugin for a pod's network: a conflist that sorts first in
    // the lab's conf dir (containerd watches it and takes the first) makes vfplug every new
    // pod's eth0, by pool, with Debian's host-local for the address.
    let socket = root.join("run/vfplugd.sock");
    let net = PodNetwork::install(
        &cni_conf_dir,
        &json!({
            "cniVersion": "1.0.0",
            "name": "vfplug-chart",
            "plugins": [{
                "type": "vfplug",
                "socket": socket,
                "pool": pool.resource,
                "timeoutSeconds": 10,
                "ipam": {
                    "type": "host-local",
                    "dataDir": p("ipam"),
                    "ranges": [[{"subnet": "10.98.0.0/24"}]],
                },
            }],
        }),
    );
    // containerd reloads on the inotify event; give it a moment (a pod that still got the
    // bridge fails below on its MAC, saying so).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A pod asking for a VF: Allocate (the DaemonSet's vfplugd) puts the VF in its env, and
    // containerd's CNI ADD makes that VF's netdev its eth0.
    let vf_pod = pod_requesting(
        "wants-a-vf",
        &lab.busybox_image,
        &pool.resource,
        1,
        &[
            "sh",
            "-c",
            "echo mac=$(cat /sys/class/net/eth0/address); ip -o -4 addr show dev eth0; env; sleep 3600",
        ],
    )
    .unwrap();
    let t = Instant::now();
    create_pod(&client, &ns.name, &vf_pod).await.unwrap();
    wait_pod_running(&lab, &client, &ns.name, "wants-a-vf", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.vf_pod_create_to_running", t.elapsed());
    let env_name = pool.env_name();
    let (logs, _) = wait_for("the pod's report", WAIT, || async {
        let logs = pod_logs(&client, &ns.name, "wants-a-vf")
            .await
            .map_err(|e| e.to_string())?;
        if logs.contains(&format!("{env_name}=")) {
            Ok(logs)
        } else {
            Err(logs)
        }
    })
    .await
    .unwrap();
    let field = |prefix: &str| {
        logs.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the pod's output:\n{logs}"))
            .to_owned()
    };
    let got = field(&format!("{env_name}="));
    let idx = pool
        .vfs
        .iter()
        .position(|v| *v == got)
        .unwrap_or_else(|| panic!("{env_name}={got}: not a VF of {:?}", pool.vfs));
    let netdev = &links.names[idx];
    assert_eq!(
        field("mac="),
        links.macs[idx],
        "the pod's eth0 is not the VF {got}'s netdev {netdev} (did containerd still use the \
         bridge config?):\n{logs}\n{}",
        diagnose(&lab, &ns.name)
    );
    assert!(
        logs.contains("inet 10.98.0."),
        "no host-local address on eth0:\n{logs}"
    );
    assert!(
        !host_has_link(netdev),
        "{netdev} is still in the host's namespace"
    );
    let listed = vfplugctl_vfs(&socket);
    let row = listed
        .lines()
        .find(|l| l.contains(got.as_str()))
        .unwrap_or_else(|| panic!("{got} not listed:\n{listed}"));
    assert_eq!(
        vf_state(&listed, &got).as_deref(),
        Some("configured"),
        "{listed}"
    );
    assert!(
        row.contains(&format!("/eth0 ({}/wants-a-vf)", ns.name)),
        "{row}"
    );
    say(format!(
        "pod wants-a-vf: env {env_name}={got}; eth0 is VF {got}'s netdev {netdev} (MAC {}), \
         address from host-local; containerd called vfplug, vfplugd moved it",
        links.macs[idx]
    ));
    say(format!(
        "vfplugctl vfs: {}",
        row.split_whitespace().collect::<Vec<_>>().join(" ")
    ));

    // Deleting the pod: containerd's CNI DEL gives the netdev back to the host, named as
    // before with its MAC, and the pod's attachment is gone: the VF is back in the kubelet's
    // accounting (`kubelet_allocated` until the kubelet stops reporting it for the pod, or
    // `--kubelet-alloc-grace-seconds` after that) or free.
    let t = Instant::now();
    delete_pod(&client, &ns.name, "wants-a-vf", WAIT)
        .await
        .unwrap();
    wait_for("the VF's netdev back on the host", WAIT, || async {
        let listed = vfplugctl_vfs(&socket);
        let state = vf_state(&listed, &got);
        if host_has_link(netdev) && matches!(state.as_deref(), Some("free" | "kubelet_allocated")) {
            Ok(())
        } else {
            Err(listed)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.vf_pod_delete_to_netdev_home", t.elapsed());
    say(format!(
        "pod deleted: containerd's CNI DEL gave {netdev} back to the host, VF {got} {}",
        vf_state(&vfplugctl_vfs(&socket), &got).unwrap_or_default()
    ));
    // And it was containerd's DEL that released it (the plugin logs to stderr, which containerd
    // logs), not the controller pulling the netdev out of the terminating pod.
    let released_by_del = format!("from vfplug-chart released=true pci={got}");
    let containerd_log = lab.daemon_log_tail("containerd", 400);
    assert!(
        containerd_log.contains(&released_by_del),
        "no CNI DEL released {got} ({released_by_del:?} not in containerd's log):\n{}\n{}",
        containerd_log
            .lines()
            .filter(|l| l.contains("vfplug-chart"))
            .collect::<Vec<_>>()
            .join("\n"),
        lab.kubectl(&[
            "-n",
            &ns.name,
            "logs",
            "-l",
            "app.kubernetes.io/component=vfplugd"
        ])
        .unwrap_or_default()
    );
    assert_eq!(link_mac(netdev), links.macs[idx], "{netdev}'s MAC");
    drop(net);

    // The chart's ServiceAccount may do what the controller needs and no more.
    let sa = format!("system:serviceaccount:{}:{release}", ns.name);
    for (verb, what, want) in [
        ("watch", "pods", "yes"),
        ("delete", "pods", "no"),
        ("create", "domains.vfplug.io", "yes"),
        ("patch", "domains.vfplug.io/status", "yes"),
        ("update", "domains.vfplug.io", "no"),
        ("get", "secrets", "no"),
    ] {
        let said = match lab.kubectl(&["auth", "can-i", verb, what, "--as", &sa]) {
            Ok(s) => s,
            Err(e) => e.to_string(),
        };
        assert!(
            said.trim_end().ends_with(want) || said.contains(&format!("\n{want}")),
            "can-i {verb} {what} as {sa}: want {want}, got {said}"
        );
    }
    say(format!(
        "kubectl auth can-i as {sa}: watch pods, create Domains, patch their status: yes; \
         delete pods, update Domains, get secrets: no"
    ));

    // The controller runs in-cluster with that account: a VM pod gets its Domain, owned by the
    // pod, and the Domain goes with the pod.
    let mut vm = vm_pod("vm-a", &lab.vm_image, &["sleep", "3600"]).unwrap();
    vm.metadata.annotations =
        Some([("vfplug.io/qmp-socket".to_owned(), "vm/qmp.sock".to_owned())].into());
    let created = create_pod(&client, &ns.name, &vm).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let ar = ApiResource {
        group: "vfplug.io".into(),
        version: "v1alpha1".into(),
        api_version: "vfplug.io/v1alpha1".into(),
        kind: "Domain".into(),
        plural: "domains".into(),
    };
    let doms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let (dom, took) = wait_for("the Domain of VM pod vm-a", WAIT, || async {
        doms.get_opt("vm-a")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not yet".to_owned())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.vm_pod_to_domain", took);
    say(
        "VM pod vm-a (vfplug.io/qmp-socket annotation): its Domain made by the in-cluster controller",
    );
    let owner = dom.metadata.owner_references.unwrap_or_default();
    assert!(
        owner.iter().any(|o| o.uid == uid),
        "owner {owner:?}, pod uid {uid}"
    );
    delete_pod(&client, &ns.name, "vm-a", WAIT).await.unwrap();
    let (_, took) = wait_for("the Domain of vm-a gone", WAIT, || async {
        match doms.get_opt("vm-a").await {
            Ok(None) => Ok(()),
            Ok(Some(d)) => Err(format!("finalizers {:?}", d.metadata.finalizers)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.pod_gone_to_domain_gone", took);
    say("VM pod deleted: its Domain gone with it");

    // Uninstall: vfplugd stops (its pools drop to 0 on the node), the CNI binary stays for the
    // pods still using it, the ledger stays on the host.
    let t = Instant::now();
    helm(
        &lab,
        &helm_bin,
        &["uninstall", &release, "-n", &ns.name, "--wait"],
    );
    guard.installed = false;
    timing("chart.uninstall", t.elapsed());
    let (_, took) = wait_for("the pool at 0 on the node", WAIT, || async {
        match node_resource(&client, &lab.node_name, &pool.resource).await {
            Ok(r) if r.allocatable == Some(0) => Ok(()),
            Ok(r) => Err(format!("{r:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap();
    timing("chart.uninstall_to_allocatable_0", took);
    say(format!(
        "helm uninstall: DaemonSet gone, {} at 0 allocatable",
        pool.resource
    ));
    let left = lab
        .kubectl(&["-n", &ns.name, "get", "daemonsets,pods", "-o", "name"])
        .unwrap();
    assert!(
        !left.contains("daemonset"),
        "still there after uninstall: {left}"
    );
    assert!(cni.exists(), "the CNI plugin stays for pods still using it");
    let ledger: Vec<_> = std::fs::read_dir(root.join("state"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!ledger.is_empty(), "the ledger stays on the host");
    say(format!(
        "left on the host: {} and the ledger in {}",
        cni.display(),
        root.join("state").display()
    ));
}
