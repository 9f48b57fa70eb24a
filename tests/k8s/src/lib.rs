//! The real Kubernetes tier: the real `vfplugd` against a real kubelet, kube-apiserver, scheduler,
//! controller-manager and containerd (Kubernetes 1.20 from Debian's source, built by
//! `tests/k8s/build.sh`), on a cluster `tests/k8s/cluster.sh up` starts on this machine. Read
//! docs/k8s-lab.md first.
//!
//! This library is the tests' toolkit:
//! * [`Lab`]: the cluster, from the env file `cluster.sh up` writes (`$VFPLUG_K8S_ENV`):
//!   a [`kube::Client`] ([`Lab::client`], [`Lab::client_for`]), kubectl ([`Lab::kubectl`]),
//!   `cluster.sh restart-kubelet` ([`Lab::restart_kubelet`]), daemon logs;
//!   [`Lab::for_test`] skips loudly (or fails, with `VFPLUG_REQUIRE=1`) without a cluster;
//! * [`Vfplugd`]: the real `vfplugd` binary on a fake sysfs tree ([`VfplugdOptions`], one
//!   [`PoolSpec`] per pool), registering with the lab's kubelet, its node API ([`Vfplugd::list`])
//!   and its log ([`Vfplugd::log_tail`]);
//! * [`TestNamespace`], [`pod_requesting`], [`wait_pod_running`], [`pod_logs`],
//!   [`node_resource`]: pods and the node as the API server shows them;
//! * [`wait_for`]: polling with a bound and the last observation in the failure.
//!
//! The tests share one kubelet, so they run one at a time (`--test-threads 1`), and each uses
//! pool names of its own ([`unique_name`]): the kubelet keeps a resource it has seen in the
//! node's capacity for a while after its plugin is gone.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use vfplug_api::v1::VfEntry;
use vfplug_api::v1::node_client::NodeClient;
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::prereq;

/// The environment variable naming the env file of `cluster.sh up`.
pub const ENV_VAR: &str = "VFPLUG_K8S_ENV";
/// The env file's default place (`cluster.sh`'s default lab dir).
pub const DEFAULT_ENV_FILE: &str = "/tmp/vfplug-k8s/env";
/// The resource prefix of the lab's pools (vfplug YAML's default).
pub const RESOURCE_PREFIX: &str = "vfplug.io";

/// Everything that can go wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The env file is missing, unreadable or lacks a key.
    #[error("lab env: {0}")]
    Env(String),
    /// File or process I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// kubectl or `cluster.sh` exited non-zero.
    #[error("{command}: {status}\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr and stdout.
        output: String,
    },
    /// The API server refused or could not be reached.
    #[error("Kubernetes API, {what}: {source}")]
    Kube {
        /// What was asked.
        what: String,
        /// The cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}; last seen: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
        /// The last observation.
        last: String,
    },
    /// vfplugd failed to start, exited or did not answer; with its log's tail.
    #[error("vfplugd: {what}\n--- vfplugd log (tail) ---\n{log}")]
    Vfplugd {
        /// What went wrong.
        what: String,
        /// The last lines of its log.
        log: String,
    },
    /// The fixture could not set something up (build vfplugd, build an object).
    #[error("setup: {0}")]
    Setup(String),
    /// Building the fake sysfs tree failed.
    #[error("fake sysfs: {0}")]
    Fixture(#[from] vfplug_host::fixture::FixtureError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Kube {
        what,
        source: Box::new(source),
    }
}

/// The `KEY=VALUE` lines of `cluster.sh up`'s env file (see docs/k8s-lab.md for the keys).
#[derive(Debug, Clone)]
pub struct LabEnv {
    /// The file.
    pub path: PathBuf,
    vars: BTreeMap<String, String>,
}

impl LabEnv {
    /// Reads `path`; `#` lines and blank lines are skipped.
    pub fn load(path: &Path) -> Result<Self, LabError> {
        let text = fs::read_to_string(path)
            .map_err(|e| LabError::Env(format!("reading {}: {e}", path.display())))?;
        let vars = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(Self {
            path: path.to_owned(),
            vars,
        })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Result<&str, LabError> {
        self.vars
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| LabError::Env(format!("no {key} in {}", self.path.display())))
    }

    /// The value of `key` as a path.
    pub fn path(&self, key: &str) -> Result<PathBuf, LabError> {
        self.get(key).map(PathBuf::from)
    }

    /// Every key and value.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }
}

/// The cluster of `cluster.sh up`, as its env file describes it.
#[derive(Debug, Clone)]
pub struct Lab {
    /// The whole env file.
    pub env: LabEnv,
    /// The lab dir (`K8S_LAB_DIR`).
    pub dir: PathBuf,
    /// The admin kubeconfig (`KUBECONFIG`, system:masters).
    pub kubeconfig: PathBuf,
    /// The cached kubectl 1.20 (`KUBECTL`); never the host's own kubectl.
    pub kubectl: PathBuf,
    /// The node's name (`NODE_NAME`).
    pub node_name: String,
    /// The kubelet's `--root-dir` (`KUBELET_DIR`): plugins_registry and pod-resources are in it.
    pub kubelet_dir: PathBuf,
    /// Where the kubelet dials device plugins (`KUBELET_DEVICE_PLUGIN_DIR`; hard-coded
    /// /var/lib/kubelet/device-plugins in kubelet 1.20 whatever its root dir).
    pub device_plugin_dir: PathBuf,
    /// `cluster.sh` itself (`CLUSTER_SH`).
    pub cluster_sh: PathBuf,
    /// The busybox image (`IMAGE_BUSYBOX`; pods use `imagePullPolicy: Never`).
    pub busybox_image: String,
    /// The VM pod stand-in image (`IMAGE_VM`: busybox and merged-/usr links; mount the host's
    /// /usr at /usr to run its QEMU).
    pub vm_image: String,
    /// A kubeconfig of ServiceAccount `vfplug/vfplugd` (`VFPLUGD_KUBECONFIG`).
    pub vfplugd_kubeconfig: PathBuf,
}

impl Lab {
    /// The lab for `test`: from `$VFPLUG_K8S_ENV`. Without a cluster (variable unset, file
    /// missing or incomplete) prints `SKIP <test>: <why>` and returns `None`, or panics with
    /// `VFPLUG_REQUIRE=1` ([`vfplug_host::prereq`]).
    #[track_caller]
    pub fn for_test(test: &str) -> Option<Lab> {
        prereq::need(test, Self::from_env())
    }

    /// The lab of `$VFPLUG_K8S_ENV`; `Err` says why there is none and how to get one.
    pub fn from_env() -> Result<Lab, String> {
        let how = "bring the cluster up with `tests/k8s/cluster.sh up` (after \
                   `tests/k8s/build.sh`) and set VFPLUG_K8S_ENV=<lab dir>/env";
        let path = std::env::var_os(ENV_VAR)
            .ok_or_else(|| format!("{ENV_VAR} is not set: no Kubernetes lab; {how}"))?;
        prereq::root()?;
        Self::from_file(Path::new(&path)).map_err(|e| format!("{e}; {how}"))
    }

    /// The lab described by the env file `path`.
    pub fn from_file(path: &Path) -> Result<Lab, LabError> {
        let env = LabEnv::load(path)?;
        let lab = Lab {
            dir: env.path("K8S_LAB_DIR")?,
            kubeconfig: env.path("KUBECONFIG")?,
            kubectl: env.path("KUBECTL")?,
            node_name: env.get("NODE_NAME")?.to_owned(),
            kubelet_dir: env.path("KUBELET_DIR")?,
            device_plugin_dir: env.path("KUBELET_DEVICE_PLUGIN_DIR")?,
            cluster_sh: env.path("CLUSTER_SH")?,
            busybox_image: env.get("IMAGE_BUSYBOX")?.to_owned(),
            vm_image: env.get("IMAGE_VM")?.to_owned(),
            vfplugd_kubeconfig: env.path("VFPLUGD_KUBECONFIG")?,
            env,
        };
        for p in [&lab.kubeconfig, &lab.kubectl, &lab.cluster_sh] {
            if !p.exists() {
                return Err(LabError::Env(format!(
                    "{} (named by {}) does not exist",
                    p.display(),
                    lab.env.path.display()
                )));
            }
        }
        Ok(lab)
    }

    /// A client with the admin kubeconfig (system:masters).
    pub async fn client(&self) -> Result<kube::Client, LabError> {
        self.client_for(&self.kubeconfig).await
    }

    /// A client with the kubeconfig `path` (e.g. [`Lab::vfplugd_kubeconfig`], to check that
    /// vfplugd's RBAC allows what it does).
    pub async fn client_for(&self, path: &Path) -> Result<kube::Client, LabError> {
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| LabError::Env(format!("kubeconfig {}: {e}", path.display())))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| LabError::Env(format!("kubeconfig {}: {e}", path.display())))?;
        kube::Client::try_from(cfg).map_err(kube_err(format!("client from {}", path.display())))
    }

    /// Runs the lab's kubectl with the admin kubeconfig; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, LabError> {
        self.kubectl_stdin(args, None)
    }

    /// Runs the lab's kubectl with `stdin` (e.g. `apply -f -`); its stdout.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(c, &format!("kubectl {}", args.join(" ")), stdin)
    }

    /// `cluster.sh restart-kubelet`: stops the kubelet process, starts it again and waits for
    /// the node to be Ready. Returns how long that took.
    pub fn restart_kubelet(&self) -> Result<Duration, LabError> {
        let t = Instant::now();
        let mut c = Command::new("bash");
        c.arg(&self.cluster_sh)
            .arg("restart-kubelet")
            .env("K8S_LAB_DIR", &self.dir);
        run(c, "cluster.sh restart-kubelet", None)?;
        Ok(t.elapsed())
    }

    /// The last `lines` lines of a lab daemon's log (`kubelet`, `kube-apiserver`, `containerd`,
    /// `etcd`, `kube-scheduler`, `kube-controller-manager`).
    pub fn daemon_log_tail(&self, daemon: &str, lines: usize) -> String {
        tail(&self.dir.join("log").join(format!("{daemon}.log")), lines)
    }

    /// Writes vfplug's image (`scripts/image.sh` over [`workspace_bin_dir`]'s binaries) and
    /// imports it into the lab's containerd as `tag`. Returns how long that took.
    pub fn import_vfplug_image(&self, tag: &str) -> Result<Duration, LabError> {
        let t = Instant::now();
        let bins = workspace_bin_dir()?;
        let dir = tempfile::tempdir().map_err(io_err("tempdir"))?;
        let tar = dir.path().join("vfplug.tar");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut c = Command::new("bash");
        c.arg(repo.join("scripts/image.sh"))
            .arg("--bin-dir")
            .arg(&bins)
            .args(["--tag", tag])
            .arg("--out")
            .arg(&tar);
        run(c, "scripts/image.sh", None)?;
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.env.path("CONTAINERD_SOCKET")?)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&tar);
        run(c, &format!("ctr images import {}", tar.display()), None)?;
        Ok(t.elapsed())
    }

    /// A fresh namespace `<prefix>-<unique>` whose `default` ServiceAccount exists (pods cannot
    /// be created before the controller-manager made it). Deleted when dropped.
    pub async fn namespace(
        &self,
        client: &kube::Client,
        prefix: &str,
    ) -> Result<TestNamespace, LabError> {
        let name = unique_name(&format!("{prefix}-")).replace('_', "-");
        let ns: Namespace = json_to(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .map_err(kube_err(format!("create namespace {name}")))?;
        let guard = TestNamespace {
            name: name.clone(),
            lab: self.clone(),
        };
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            &format!("ServiceAccount {name}/default"),
            Duration::from_secs(60),
            || async {
                match sas.get_opt("default").await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err("not created yet".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        Ok(guard)
    }
}

/// A namespace of one test; `kubectl delete namespace --wait=false` when dropped (the
/// controller-manager's namespace controller finishes it).
#[derive(Debug)]
pub struct TestNamespace {
    /// Its name.
    pub name: String,
    lab: Lab,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self
            .lab
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

fn run(mut c: Command, what: &str, stdin: Option<&str>) -> Result<String, LabError> {
    use std::io::Write as _;
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(io_err(format!("starting {what}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(io_err(format!("stdin of {what}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for {what}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(LabError::Command {
            command: what.to_owned(),
            status: out.status.to_string(),
            output: format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)),
        })
    }
}

/// The last `lines` lines of the file at `path` (or why it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// `prefix` and a suffix unique to this process and moment (lower-case hex): names of pools,
/// pods and namespaces that no earlier run on this cluster used.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}{:06x}{n}",
        (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff
    )
}

fn json_to<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, LabError> {
    serde_json::from_value(v).map_err(|e| LabError::Setup(format!("building an object: {e}")))
}

/// Polls `check` every 100 ms until it returns `Ok`, for at most `timeout`. `Err(observation)`
/// means "not yet"; the last one is in the timeout error. Returns the value and the time it took.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<(T, Duration), LabError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let t = Instant::now();
    loop {
        match check().await {
            Ok(v) => return Ok((v, t.elapsed())),
            Err(last) if t.elapsed() >= timeout => {
                return Err(LabError::Timeout {
                    what: what.to_owned(),
                    after: timeout,
                    last,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One extended resource of the node as the API server shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeResource {
    /// `status.capacity[resource]`, if present.
    pub capacity: Option<i64>,
    /// `status.allocatable[resource]`, if present.
    pub allocatable: Option<i64>,
}

/// `resource` in the node `node`'s capacity and allocatable.
pub async fn node_resource(
    client: &kube::Client,
    node: &str,
    resource: &str,
) -> Result<NodeResource, LabError> {
    let n = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(kube_err(format!("get node {node}")))?;
    let status = n.status.unwrap_or_default();
    let count = |m: Option<
        BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| { m.and_then(|m| m.get(resource).and_then(|q| q.0.parse::<i64>().ok())) };
    Ok(NodeResource {
        capacity: count(status.capacity),
        allocatable: count(status.allocatable),
    })
}

/// Waits until the node shows `want` of `resource` in both capacity and allocatable.
pub async fn wait_node_resource(
    client: &kube::Client,
    node: &str,
    resource: &str,
    want: i64,
    timeout: Duration,
) -> Result<Duration, LabError> {
    let (_, took) = wait_for(
        &format!("node {node}: capacity and allocatable {resource} = {want}"),
        timeout,
        || async {
            match node_resource(client, node, resource).await {
                Ok(r) if r.capacity == Some(want) && r.allocatable == Some(want) => Ok(()),
                Ok(r) => Err(format!("{r:?}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    Ok(took)
}

/// A pod of one container (`image`, `imagePullPolicy: Never`, never restarted, 1 s grace)
/// running `command`, requesting `count` of `resource` (limits and requests), without a
/// ServiceAccount token.
pub fn pod_requesting(
    name: &str,
    image: &str,
    resource: &str,
    count: u32,
    command: &[&str],
) -> Result<Pod, LabError> {
    json_to(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "vfplug-k8slab"}},
        "spec": {
            "automountServiceAccountToken": false,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c",
                "image": image,
                "imagePullPolicy": "Never",
                "command": command,
                "resources": {
                    "limits": {resource: count.to_string()},
                    "requests": {resource: count.to_string()},
                },
            }],
        },
    }))
}

/// A VM pod stand-in: the lab's `vm` image (busybox and Debian's merged-/usr links) with the
/// host's /usr mounted read-only at /usr (hostPath), so `command` can run the host's
/// `/usr/bin/qemu-system-x86_64`; an `emptyDir` volume `vm` at /var/run/vm for sockets (QMP).
/// Never restarted, 1 s grace, no ServiceAccount token. Add annotations or resources to the
/// returned object as the test needs.
pub fn vm_pod(name: &str, image: &str, command: &[&str]) -> Result<Pod, LabError> {
    json_to(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "vfplug-k8slab"}},
        "spec": {
            "automountServiceAccountToken": false,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "vm",
                "image": image,
                "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": [
                    {"name": "host-usr", "mountPath": "/usr", "readOnly": true},
                    {"name": "vm", "mountPath": "/var/run/vm"},
                ],
            }],
            "volumes": [
                {"name": "host-usr", "hostPath": {"path": "/usr", "type": "Directory"}},
                {"name": "vm", "emptyDir": {}},
            ],
        },
    }))
}

/// Creates `pod` in `ns`.
pub async fn create_pod(client: &kube::Client, ns: &str, pod: &Pod) -> Result<Pod, LabError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), pod)
        .await
        .map_err(kube_err(format!("create pod {ns}/{name}")))
}

/// What a pod is doing, in one line: phase, conditions' reasons, containers' waiting/terminated
/// reasons and messages.
pub fn pod_summary(p: &Pod) -> String {
    let Some(s) = &p.status else {
        return "no status".into();
    };
    let mut out = format!("phase {}", s.phase.as_deref().unwrap_or("?"));
    if let Some(r) = &s.reason {
        out.push_str(&format!(
            ", reason {r}: {}",
            s.message.as_deref().unwrap_or("")
        ));
    }
    for c in s.conditions.iter().flatten() {
        if c.status != "True" {
            out.push_str(&format!(
                ", {} {} ({}: {})",
                c.type_,
                c.status,
                c.reason.as_deref().unwrap_or(""),
                c.message.as_deref().unwrap_or("")
            ));
        }
    }
    for cs in s.container_statuses.iter().flatten() {
        if let Some(st) = &cs.state {
            if let Some(w) = &st.waiting {
                out.push_str(&format!(
                    ", container {} waiting {}: {}",
                    cs.name,
                    w.reason.as_deref().unwrap_or(""),
                    w.message.as_deref().unwrap_or("")
                ));
            }
            if let Some(t) = &st.terminated {
                out.push_str(&format!(
                    ", container {} terminated {} (exit {}): {}",
                    cs.name,
                    t.reason.as_deref().unwrap_or(""),
                    t.exit_code,
                    t.message.as_deref().unwrap_or("")
                ));
            }
        }
    }
    out
}

/// The events of the object `name` in `ns`, one per line (`kubectl get events`).
pub fn events_of(lab: &Lab, ns: &str, name: &str) -> String {
    lab.kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message",
    ])
    .unwrap_or_else(|e| e.to_string())
}

/// Waits until pod `ns/name` is Running with all containers ready; fails at once when it
/// ends up Failed or Succeeded. The error carries the pod's state and events.
pub async fn wait_pod_running(
    lab: &Lab,
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<(Pod, Duration), LabError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < timeout {
        match pods.get_opt(name).await {
            Ok(Some(p)) => {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready));
                match phase.as_deref() {
                    Some("Running") if ready => return Ok((p, t.elapsed())),
                    Some("Failed" | "Succeeded") => {
                        return Err(LabError::Timeout {
                            what: format!("pod {ns}/{name} Running (it ended)"),
                            after: t.elapsed(),
                            last: format!(
                                "{}\nevents:\n{}",
                                pod_summary(&p),
                                events_of(lab, ns, name)
                            ),
                        });
                    }
                    _ => last = pod_summary(&p),
                }
            }
            Ok(None) => last = "not found".into(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(LabError::Timeout {
        what: format!("pod {ns}/{name} Running"),
        after: timeout,
        last: format!("{last}\nevents:\n{}", events_of(lab, ns, name)),
    })
}

/// The log of pod `ns/name`'s only container, through the API server (which asks the kubelet).
pub async fn pod_logs(client: &kube::Client, ns: &str, name: &str) -> Result<String, LabError> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .logs(name, &LogParams::default())
        .await
        .map_err(kube_err(format!("logs of pod {ns}/{name}")))
}

/// Deletes pod `ns/name` and waits until the kubelet has torn it down and it is gone.
pub async fn delete_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<Duration, LabError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete(name, &DeleteParams::default())
        .await
        .map_err(kube_err(format!("delete pod {ns}/{name}")))?;
    let (_, took) = wait_for(&format!("pod {ns}/{name} gone"), timeout, || async {
        match pods.get_opt(name).await {
            Ok(None) => Ok(()),
            Ok(Some(p)) => Err(pod_summary(&p)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await?;
    Ok(took)
}

/// How vfplugd registers with the kubelet (`--registration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// `legacy`: `Register` on `<device-plugin-dir>/kubelet.sock`.
    Legacy,
    /// `plugins-registry`: a socket in `<kubelet-dir>/plugins_registry` the kubelet finds.
    PluginsRegistry,
    /// `auto`.
    Auto,
}

impl Registration {
    /// The flag's value.
    pub fn flag(self) -> &'static str {
        match self {
            Registration::Legacy => "legacy",
            Registration::PluginsRegistry => "plugins-registry",
            Registration::Auto => "auto",
        }
    }
}

/// One pool of the fake node: a PF of its own (netdev `<name>p0`, driver `ice`) whose `vfs` VFs
/// are netdev VFs (`iavf`), selected by the PF's netdev. Netdev mode: Allocate hands out no
/// device nodes, so the pod's container starts on a host without the VF's `/dev/vfio` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Pool name; the resource is `vfplug.io/<name>`.
    pub name: String,
    /// How many VFs.
    pub vfs: u32,
}

impl PoolSpec {
    /// A pool with a name of its own (`<prefix><unique>`) and `vfs` VFs.
    pub fn unique(prefix: &str, vfs: u32) -> Self {
        Self {
            name: unique_name(prefix),
            vfs,
        }
    }
}

/// How to run vfplugd.
#[derive(Debug, Clone)]
pub struct VfplugdOptions {
    /// The pools.
    pub pools: Vec<PoolSpec>,
    /// `--registration`.
    pub registration: Registration,
    /// `--podresources-seconds` (the lab default: 1).
    pub podresources_seconds: u64,
    /// `--kubelet-alloc-grace-seconds` (the lab default: 5).
    pub kubelet_alloc_grace_seconds: u64,
    /// More arguments (e.g. a kubeconfig for the controller).
    pub extra_args: Vec<String>,
    /// `RUST_LOG` (default `info`).
    pub rust_log: String,
}

impl VfplugdOptions {
    /// `pools`, registering in `registration` mode.
    pub fn new(registration: Registration, pools: Vec<PoolSpec>) -> Self {
        Self {
            pools,
            registration,
            podresources_seconds: 1,
            kubelet_alloc_grace_seconds: 5,
            extra_args: Vec::new(),
            rust_log: "info".into(),
        }
    }
}

/// A pool of a running [`Vfplugd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Resource name, `vfplug.io/<name>`.
    pub resource: String,
    /// The PF's PCI address.
    pub pf: String,
    /// The VFs' PCI addresses, VF 0 first.
    pub vfs: Vec<String>,
}

impl Pool {
    /// The variable the container gets, as sriov-network-device-plugin names it:
    /// `PCIDEVICE_VFPLUG_IO_<NAME>`, upper case, `.` and `/` as `_`.
    pub fn env_name(&self) -> String {
        format!("PCIDEVICE_{}_{}", RESOURCE_PREFIX, self.name)
            .replace(['.', '/'], "_")
            .to_uppercase()
    }
}

/// The real `vfplugd` on a fake sysfs tree of its own (tmpfs), its ledger, node API socket and
/// device-info files in a temporary dir, `--vf-netlink simulated`, registering with the lab's
/// kubelet: `--kubelet-dir` = the kubelet's root dir (plugins_registry, pod-resources),
/// `--device-plugin-dir` = the dir kubelet 1.20 really dials. Stopped (SIGTERM, then SIGKILL)
/// when dropped.
#[derive(Debug)]
pub struct Vfplugd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Node API socket.
    pub socket: PathBuf,
    /// Its log file (stderr).
    pub log: PathBuf,
    /// The pools, as configured.
    pub pools: Vec<Pool>,
    /// How long from spawn until the node API answered.
    pub started_in: Duration,
}

/// The `vfplugd` binary: `$VFPLUGD_BIN`, or built with cargo into this test binary's target dir
/// and profile (a no-op when it is fresh). Built once per process.
pub fn vfplugd_binary() -> Result<PathBuf, LabError> {
    if let Some(b) = std::env::var_os("VFPLUGD_BIN") {
        return Ok(b.into());
    }
    Ok(workspace_bin_dir()?.join("vfplugd"))
}

/// The dir holding `vfplugd`, `vfplugctl` and the `vfplug` CNI plugin, built with cargo into
/// this test binary's target dir and profile (a no-op when they are fresh). Built once per
/// process.
pub fn workspace_bin_dir() -> Result<PathBuf, LabError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_binaries().map_err(|e| e.to_string()))
        .clone()
        .map_err(LabError::Setup)
}

fn build_binaries() -> Result<PathBuf, LabError> {
    let exe = std::env::current_exe().map_err(io_err("current_exe"))?;
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| LabError::Setup(format!("no profile dir above {}", exe.display())))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| LabError::Setup(format!("no target dir above {}", exe.display())))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let mut c = Command::new(cargo);
    c.args([
        "build",
        "--quiet",
        "-p",
        "vfplugd",
        "-p",
        "vfplug-cni",
        "--bins",
    ])
    .arg("--manifest-path")
    .arg(&manifest)
    .arg("--target-dir")
    .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        c.arg("--release");
    }
    run(c, "cargo build -p vfplugd -p vfplug-cni --bins", None)?;
    Ok(profile_dir.to_path_buf())
}

/// The fake node of `pools` under `root`: a sysfs tree in `root/sys` (one PF of its own per
/// pool, netdev `lab<i>p0`, driver `ice`, its VFs `iavf` netdevs) and an empty `root/dev`.
/// Returns vfplug's YAML pool config for it (netdev mode, selected by the PF's netdev) and the
/// pools with their PCI addresses.
pub fn fake_node(root: &Path, pools: &[PoolSpec]) -> Result<(String, Vec<Pool>), LabError> {
    let mut b = SysfsBuilder::new(&root.join("sys"));
    let mut cfg = format!("resourcePrefix: {RESOURCE_PREFIX}\npools:\n");
    let mut out = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        let pf = format!("0000:{:02x}:00.0", 0x3b + i);
        let pf_netdev = format!("lab{i}p0");
        b.pf(&pf)
            .driver("ice")
            .netdev(&pf_netdev)
            .vfs(p.vfs, |v| {
                VfSpec::new().driver("iavf").netdev(format!("lab{i}v{v}"))
            })
            .build()?;
        let vfs = (0..p.vfs)
            .map(|v| b.vf_address(&pf, v).map(|a| a.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        cfg.push_str(&format!(
            "  - name: {}\n    deviceMode: netdev\n    selectors: {{ pfNames: [{pf_netdev}] }}\n",
            p.name
        ));
        out.push(Pool {
            name: p.name.clone(),
            resource: format!("{RESOURCE_PREFIX}/{}", p.name),
            pf,
            vfs,
        });
    }
    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(io_err(format!("create {}", dev.display())))?;
    Ok((cfg, out))
}

impl Vfplugd {
    /// Builds the fake node for `opts.pools`, starts vfplugd and waits (30 s at most) until its
    /// node API answers. Registration with the kubelet happens in the background from then on.
    pub async fn start(lab: &Lab, opts: VfplugdOptions) -> Result<Vfplugd, LabError> {
        let bin = vfplugd_binary()?;
        let dir = vfplug_host::fixture::tempdir().map_err(io_err("tempdir"))?;
        let root = dir.path();
        let (cfg, pools) = fake_node(root, &opts.pools)?;
        let config = root.join("config.yaml");
        fs::write(&config, cfg).map_err(io_err(format!("write {}", config.display())))?;
        let socket = root.join("vfplugd.sock");
        let log = root.join("vfplugd.log");
        let logf = fs::File::create(&log).map_err(io_err(format!("create {}", log.display())))?;
        let logf2 = logf.try_clone().map_err(io_err("dup log"))?;
        let mut c = Command::new(&bin);
        c.arg("--node-name")
            .arg(&lab.node_name)
            .arg("--sysfs-root")
            .arg(root.join("sys"))
            .arg("--dev-root")
            .arg(root.join("dev"))
            .arg("--kubelet-dir")
            .arg(&lab.kubelet_dir)
            .arg("--device-plugin-dir")
            .arg(&lab.device_plugin_dir)
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--socket")
            .arg(&socket)
            .args(["--vf-netlink", "simulated"])
            .arg("--config")
            .arg(&config)
            .arg("--device-info-dir")
            .arg(root.join("devinfo"))
            .arg("--cdi-dir")
            .arg(root.join("cdi"))
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--registration", opts.registration.flag()])
            .arg("--podresources-seconds")
            .arg(opts.podresources_seconds.to_string())
            .arg("--kubelet-alloc-grace-seconds")
            .arg(opts.kubelet_alloc_grace_seconds.to_string())
            .args(&opts.extra_args)
            .env("RUST_LOG", &opts.rust_log)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2);
        let t = Instant::now();
        let child = c
            .spawn()
            .map_err(io_err(format!("starting {}", bin.display())))?;
        let mut d = Vfplugd {
            child: Some(child),
            dir,
            socket,
            log,
            pools,
            started_in: Duration::ZERO,
        };
        loop {
            if let Some(st) = d.exited() {
                return Err(d.failed(format!("exited during start ({st})")));
            }
            if d.list().await.is_ok() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(d.failed("node API did not answer within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d.started_in = t.elapsed();
        Ok(d)
    }

    /// The temporary dir holding its sysfs tree (`sys/`), ledger (`state/`) and config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The error for `what`, with the log's tail.
    pub fn failed(&self, what: String) -> LabError {
        LabError::Vfplugd {
            what,
            log: self.log_tail(60),
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// How many lines of its log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .map(|t| t.lines().filter(|l| l.contains(needle)).count())
            .unwrap_or(0)
    }

    /// How many times a pool's plugin registered with the kubelet and saw its ListAndWatch
    /// stream open (its log line "registered with the kubelet").
    pub fn registrations(&self, pool: &Pool) -> usize {
        fs::read_to_string(&self.log)
            .map(|t| {
                t.lines()
                    .filter(|l| {
                        l.contains("registered with the kubelet") && l.contains(&pool.resource)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Every VF with its ledger state and owner (the node API's `List`).
    pub async fn list(&self) -> Result<Vec<VfEntry>, LabError> {
        let ch = vfplug_api::connect(&self.socket, Duration::from_secs(2))
            .await
            .map_err(|e| LabError::Vfplugd {
                what: format!("connecting to {}: {e}", self.socket.display()),
                log: String::new(),
            })?;
        let r = NodeClient::new(ch)
            .list(vfplug_api::v1::ListRequest {})
            .await
            .map_err(|e| LabError::Vfplugd {
                what: format!("List: {e}"),
                log: String::new(),
            })?;
        Ok(r.into_inner().vfs)
    }

    /// Stops it: SIGTERM, then SIGKILL after 10 s. Returns its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus, LabError> {
        let Some(mut child) = self.child.take() else {
            return Err(self.failed("already stopped".into()));
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().map_err(io_err("waiting for vfplugd"))? {
                return Ok(st);
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return child.wait().map_err(io_err("waiting for vfplugd"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vfplugd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}
