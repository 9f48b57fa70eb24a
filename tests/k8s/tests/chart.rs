//! The Helm chart (deploy/helm/vfplug) on the lab's real node: `helm install` with vfplug's own
//! image (scripts/image.sh, imported into the lab's containerd), vfplugd as the DaemonSet's pod
//! on a fake sysfs node (every path a chart value), registering with the real kubelet; the CNI
//! plugin installed by the init container; the Domain controller running in-cluster with the
//! chart's RBAC; `helm uninstall` taking it all away while the ledger stays on the host.
//! Prints `TIMING ...` lines.
//!
//! Needs `tests/k8s/cluster.sh up`, `VFPLUG_K8S_ENV=<lab dir>/env` and helm (`$HELM` or on
//! PATH; scripts/get-chart-tools.sh); without them it says SKIP (or fails, with
//! `VFPLUG_REQUIRE=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use serde_json::json;
use vfplug_host::prereq;
use vfplug_k8slab::{
    Lab, PoolSpec, create_pod, delete_pod, fake_node, node_resource, pod_logs, pod_requesting,
    vm_pod, wait_for, wait_node_resource, workspace_bin_dir,
};

const IMAGE: &str = "vfplug:lab";
const WAIT: Duration = Duration::from_secs(90);

fn timing(name: &str, d: Duration) {
    eprintln!("TIMING {name} {:.3} s", d.as_secs_f64());
}

/// Runs helm with the lab's admin kubeconfig; its stdout, or a panic with everything it said.
fn helm(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(&lab.kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

    // The fake node: its sysfs, dev, ledger, socket, CNI bin dir, all under one host dir.
    let dir = vfplug_host::fixture::tempdir().unwrap();
    let root = dir.path();
    let (config, pools) = fake_node(root, &[PoolSpec::unique("chart_", 2)]).unwrap();
    let pool = pools[0].clone();
    for sub in ["state", "run", "devinfo", "cdi", "cni"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let p = |sub: &str| root.join(sub).to_str().unwrap().to_owned();
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
            "cdiDir": p("cdi"), "cniBinDir": p("cni"),
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

    // The real kubelet took vfplugd's registration from inside the pod.
    let took = wait_node_resource(&client, &lab.node_name, &pool.resource, 2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    timing("chart.ready_to_capacity", took);

    // The init container installed the CNI plugin where the runtime looks: it runs.
    let cni = root.join("cni/vfplug");
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
    let ctl = Command::new(workspace_bin_dir().unwrap().join("vfplugctl"))
        .arg("--socket")
        .arg(root.join("run/vfplugd.sock"))
        .arg("vfs")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "vfplugctl vfs: {ctl:?}");
    for vf in &pool.vfs {
        assert!(
            listed.contains(vf.as_str()),
            "{vf} not in vfplugctl vfs:\n{listed}"
        );
    }

    // A pod asking for a VF gets it in its env (Allocate answered by the DaemonSet's vfplugd).
    let env_pod = pod_requesting(
        "wants-a-vf",
        &lab.busybox_image,
        &pool.resource,
        1,
        &["sh", "-c", "env"],
    )
    .unwrap();
    create_pod(&client, &ns.name, &env_pod).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    wait_for("pod wants-a-vf to finish", WAIT, || async {
        let p = pods.get("wants-a-vf").await.map_err(|e| e.to_string())?;
        match p.status.and_then(|s| s.phase).as_deref() {
            Some("Succeeded") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&lab, &ns.name)));
    let logs = pod_logs(&client, &ns.name, "wants-a-vf").await.unwrap();
    let line = logs
        .lines()
        .find(|l| l.starts_with(&format!("{}=", pool.env_name())))
        .unwrap_or_else(|| panic!("no {} in the pod's env:\n{logs}", pool.env_name()));
    let got = line.split_once('=').unwrap().1;
    assert!(
        pool.vfs.iter().any(|v| v == got),
        "{line}: not a VF of {:?}",
        pool.vfs
    );
    delete_pod(&client, &ns.name, "wants-a-vf", WAIT)
        .await
        .unwrap();

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
}
