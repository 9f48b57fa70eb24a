//! The device-plugin server: one per pool, generic over a [`PluginBackend`].
//!
//! [`spawn_plugin`] starts a task that, until its [`CancellationToken`] is cancelled:
//!
//! 1. picks the registration mode ([`RegistrationMode`]),
//! 2. binds a fresh unix socket (removing a stale one) and serves `v1beta1.DevicePlugin` on it
//!    (plus `pluginregistration.Registration` in plugins_registry mode),
//! 3. registers: legacy mode calls the kubelet's `Register` on `device-plugins/kubelet.sock`
//!    (waiting for the kubelet to come up, retrying refusals); plugins_registry mode waits for the
//!    kubelet's plugin watcher to call `GetInfo` and `NotifyRegistrationStatus`,
//! 4. watches for the things that silently kill a device plugin (research §1.5, §9.1.2): our
//!    socket file deleted or replaced (the kubelet wipes `device-plugins/` when it starts),
//!    `kubelet.sock` re-created, every `ListAndWatch` stream gone, registration refused. Each one
//!    ends the session; the loop re-binds a new socket and registers again, with capped
//!    exponential backoff after failures. It never exits on its own.
//!
//! Readiness ("registered with the kubelet now") is a `watch<bool>` on the [`PluginHandle`];
//! counters are in [`PluginMetrics`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::pluginregistration as preg;
use crate::api::v1beta1 as dp;
use crate::retrylog::{RetryLog, Verdict};
use crate::uds;

/// The device-plugin API version we implement and register with.
pub const DEVICE_PLUGIN_VERSION: &str = "v1beta1";
/// `Device.health` value of a usable device.
pub const HEALTHY: &str = "Healthy";
/// `Device.health` value of an unusable device (counted in capacity, not in allocatable).
pub const UNHEALTHY: &str = "Unhealthy";
/// `PluginInfo.type` of a device plugin in plugins_registry mode.
pub const PLUGIN_TYPE_DEVICE_PLUGIN: &str = "DevicePlugin";
/// Directory (below the kubelet dir) of device-plugin sockets and the kubelet's `kubelet.sock`.
pub const DEVICE_PLUGINS_DIR: &str = "device-plugins";
/// Directory (below the kubelet dir) watched by the kubelet's plugin watcher.
pub const PLUGINS_REGISTRY_DIR: &str = "plugins_registry";
/// The kubelet's registration socket name inside [`DEVICE_PLUGINS_DIR`].
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// One device as the kubelet sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDevice {
    /// Device id (vfplug uses the VF's PCI address); at most 63 characters.
    pub id: String,
    /// Unhealthy devices count in capacity but not in allocatable, so the kubelet never hands
    /// them out. vfplug also uses this to fence VFs reserved out of band.
    pub healthy: bool,
    /// NUMA node for the topology manager; `None` when unknown (`numa_node` = -1).
    pub numa_node: Option<u32>,
}

/// A device node to create in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceSpec {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// cgroup permissions: some of `r`, `w`, `m`.
    pub permissions: String,
}

/// A host path to mount into the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mount {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// What one container gets from an allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAlloc {
    /// Environment variables.
    pub envs: BTreeMap<String, String>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Device nodes.
    pub devices: Vec<DeviceSpec>,
    /// Container annotations for the runtime.
    pub annotations: BTreeMap<String, String>,
    /// Fully qualified CDI device names (`vendor/class=name`).
    pub cdi_devices: Vec<String>,
}

/// Why an allocation failed. Mapped to gRPC codes the kubelet reports in the pod's events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The id is not one of this pool's devices (`InvalidArgument`).
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// The device exists but cannot be handed out now (`FailedPrecondition`).
    #[error("device {id} is unavailable: {reason}")]
    Unavailable {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Anything else (`Internal`).
    #[error("{0}")]
    Internal(String),
}

impl From<AllocError> for Status {
    fn from(e: AllocError) -> Self {
        match &e {
            AllocError::UnknownDevice(_) => Status::invalid_argument(e.to_string()),
            AllocError::Unavailable { .. } => Status::failed_precondition(e.to_string()),
            AllocError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// The pool behind one device-plugin server. Calls are made on the async runtime's threads, so
/// `allocate` and `preferred` must be fast and never block (the kubelet calls Allocate with no
/// deadline on the pod-admission path).
pub trait PluginBackend: Send + Sync + 'static {
    /// Extended resource name, e.g. `intel.com/intel_sriov_netdevice`.
    fn resource_name(&self) -> &str;
    /// The full device list; every change is pushed to the kubelet as a full snapshot.
    fn devices(&self) -> watch::Receiver<Vec<PluginDevice>>;
    /// One result per container request, in order. The server has already checked that every
    /// id is a known, healthy device of the current snapshot.
    fn allocate(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError>;
    /// Preferred choice of `size` devices from `available`, containing all of `must_include`.
    /// The default takes `must_include`, then fills from `available` in order.
    fn preferred(&self, available: &[String], must_include: &[String], size: usize) -> Vec<String> {
        let mut out: Vec<String> = must_include.to_vec();
        for id in available {
            if out.len() >= size {
                break;
            }
            if !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

/// How the plugin gets registered with the kubelet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistrationMode {
    /// plugins_registry when `<kubelet-dir>/plugins_registry/` exists, else legacy; re-checked
    /// before every (re)registration. Only one mode is used at a time: registering the same
    /// resource both ways makes the kubelet run two endpoints for it (kubernetes#124716 leaks).
    #[default]
    Auto,
    /// Serve on `device-plugins/vfplug-<pool>.sock` and call `Register` on `kubelet.sock`.
    Legacy,
    /// Serve `pluginregistration.Registration` and `DevicePlugin` on
    /// `plugins_registry/vfplug-<pool>.sock`; the kubelet's plugin watcher registers us.
    PluginsRegistry,
}

impl std::str::FromStr for RegistrationMode {
    type Err = String;

    /// `auto`, `legacy`, `plugins_registry` (or `plugins-registry`), for command-line flags.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "legacy" => Ok(Self::Legacy),
            "plugins_registry" | "plugins-registry" => Ok(Self::PluginsRegistry),
            other => Err(format!(
                "unknown registration mode {other:?} (expected auto, legacy or plugins_registry)"
            )),
        }
    }
}

impl std::fmt::Display for RegistrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Legacy => "legacy",
            Self::PluginsRegistry => "plugins_registry",
        })
    }
}

/// Configuration of one plugin server. The kubelet's paths default from `kubelet_dir` and can be
/// set one by one (a kubelet with `--root-dir` elsewhere, or directories mounted apart).
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Pool name; names the socket (`vfplug-<pool>.sock`).
    pub pool: String,
    /// The kubelet's root dir, normally `/var/lib/kubelet`.
    pub kubelet_dir: PathBuf,
    /// Where device-plugin sockets and the kubelet's `kubelet.sock` are (legacy registration);
    /// default `<kubelet_dir>/device-plugins`.
    pub device_plugin_dir: PathBuf,
    /// The directory the kubelet's plugin watcher watches; default `<kubelet_dir>/plugins_registry`.
    pub plugins_registry_dir: PathBuf,
    /// Registration mode.
    pub mode: RegistrationMode,
    /// Minimum spacing of ListAndWatch snapshots: a change after a quiet period is sent at once,
    /// further changes within this window are coalesced into one trailing snapshot.
    pub debounce: Duration,
    /// How often the socket files are checked (kubelet-restart detection).
    pub poll_interval: Duration,
    /// First retry delay after a failed registration.
    pub backoff_initial: Duration,
    /// Cap of the retry delay.
    pub backoff_max: Duration,
    /// Deadline of one `Register` call (the kubelet dials us back inside it, with 10 s).
    pub register_timeout: Duration,
    /// How long no ListAndWatch stream may be open, after one was, before we register again.
    pub stream_lost_grace: Duration,
    /// How long after the kubelet accepts a registration its ListAndWatch stream must open. A
    /// registration counts only then: a kubelet can answer `Register` and never dial back.
    pub stream_open_timeout: Duration,
    /// The kubelet dir as the kubelet itself sees it, when vfplugd mounts it elsewhere (e.g.
    /// `/host/var/lib/kubelet`). Used for `PluginInfo.endpoint`, a full path the kubelet dials.
    /// `None`: same as `kubelet_dir`.
    pub kubelet_dir_on_host: Option<PathBuf>,
}

impl PluginConfig {
    /// Defaults: auto mode, 100 ms debounce, 100 ms polling, backoff 100 ms .. 5 s, ListAndWatch
    /// expected within 10 s of registration.
    pub fn new(pool: impl Into<String>, kubelet_dir: impl Into<PathBuf>) -> Self {
        let kubelet_dir = kubelet_dir.into();
        Self {
            pool: pool.into(),
            device_plugin_dir: kubelet_dir.join(DEVICE_PLUGINS_DIR),
            plugins_registry_dir: kubelet_dir.join(PLUGINS_REGISTRY_DIR),
            kubelet_dir,
            mode: RegistrationMode::Auto,
            debounce: Duration::from_millis(100),
            poll_interval: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            register_timeout: Duration::from_secs(15),
            stream_lost_grace: Duration::from_secs(2),
            stream_open_timeout: Duration::from_secs(10),
            kubelet_dir_on_host: None,
        }
    }

    /// `PluginInfo.endpoint` in plugins_registry mode: our socket's path as the kubelet sees it.
    pub fn advertised_endpoint(&self) -> PathBuf {
        match &self.kubelet_dir_on_host {
            Some(dir) => dir.join(PLUGINS_REGISTRY_DIR).join(self.socket_name()),
            None => self.plugins_registry_dir.join(self.socket_name()),
        }
    }

    /// Socket file name, `vfplug-<pool>.sock`, with characters unsafe in a file name replaced.
    pub fn socket_name(&self) -> String {
        let pool: String = self
            .pool
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("vfplug-{pool}.sock")
    }

    /// `<device-plugin-dir>/kubelet.sock`.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.device_plugin_dir.join(KUBELET_SOCKET)
    }

    /// The mode the next session will use.
    pub fn effective_mode(&self) -> RegistrationMode {
        match self.mode {
            RegistrationMode::Auto if self.plugins_registry_dir.is_dir() => {
                RegistrationMode::PluginsRegistry
            }
            RegistrationMode::Auto => RegistrationMode::Legacy,
            m => m,
        }
    }

    /// Socket path for `mode` (which must not be `Auto`; `Auto` is resolved first).
    pub fn socket_path(&self, mode: RegistrationMode) -> PathBuf {
        let dir = match mode {
            RegistrationMode::PluginsRegistry => &self.plugins_registry_dir,
            RegistrationMode::Legacy | RegistrationMode::Auto => &self.device_plugin_dir,
        };
        dir.join(self.socket_name())
    }
}

/// Counters of one plugin server, cheap to update from any task.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    registrations_ok: AtomicU64,
    registrations_confirmed: AtomicU64,
    registrations_failed: AtomicU64,
    rebinds: AtomicU64,
    allocations_ok: AtomicU64,
    allocations_failed: AtomicU64,
    snapshots_sent: AtomicU64,
    open_streams: AtomicU64,
}

/// A point-in-time copy of [`PluginMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Registrations the kubelet accepted (legacy Register OK, or
    /// NotifyRegistrationStatus(true)), whether or not it then opened ListAndWatch.
    pub registrations_ok: u64,
    /// Real registrations: accepted, and the kubelet's ListAndWatch stream opened in time
    /// (feeds `vfplug_registrations`).
    pub registrations_confirmed: u64,
    /// Failed or refused registrations, including accepted ones whose ListAndWatch never opened.
    pub registrations_failed: u64,
    /// Sessions ended because the socket vanished, kubelet.sock changed or streams were lost.
    pub rebinds: u64,
    /// Allocate calls answered OK.
    pub allocations_ok: u64,
    /// Allocate calls answered with an error.
    pub allocations_failed: u64,
    /// ListAndWatch snapshots sent (all streams).
    pub snapshots_sent: u64,
    /// ListAndWatch streams open now (readiness: registered and at least one stream open).
    pub open_streams: u64,
}

impl PluginMetrics {
    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            registrations_ok: self.registrations_ok.load(Ordering::Relaxed),
            registrations_confirmed: self.registrations_confirmed.load(Ordering::Relaxed),
            registrations_failed: self.registrations_failed.load(Ordering::Relaxed),
            rebinds: self.rebinds.load(Ordering::Relaxed),
            allocations_ok: self.allocations_ok.load(Ordering::Relaxed),
            allocations_failed: self.allocations_failed.load(Ordering::Relaxed),
            snapshots_sent: self.snapshots_sent.load(Ordering::Relaxed),
            open_streams: self.open_streams.load(Ordering::Relaxed),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Errors that end one registration session (the loop retries them).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Socket bind or dial failed.
    #[error(transparent)]
    Uds(#[from] uds::UdsError),
    /// The kubelet answered Register with an error.
    #[error("kubelet refused registration: {0}")]
    Refused(String),
    /// Register did not answer in time.
    #[error("Register timed out after {0:?}")]
    Timeout(Duration),
    /// The kubelet accepted the registration but never opened ListAndWatch.
    #[error("the kubelet accepted the registration but opened no ListAndWatch stream within {0:?}")]
    NoListAndWatch(Duration),
    /// The gRPC server stopped on its own.
    #[error("gRPC server stopped: {0}")]
    Server(String),
}

/// Handle of a running plugin server.
#[derive(Debug)]
pub struct PluginHandle {
    registered: watch::Receiver<bool>,
    metrics: Arc<PluginMetrics>,
    task: JoinHandle<()>,
}

impl PluginHandle {
    /// `true` while a registration is confirmed: the kubelet accepted it and its ListAndWatch
    /// stream opened (for `/readyz`).
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Shared counters.
    pub fn metrics(&self) -> Arc<PluginMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Waits for the server task to end (after its token is cancelled). By then the socket is
    /// removed.
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "device plugin task failed");
        }
    }
}

/// Starts a device-plugin server for `backend` (see the module docs). Must be called inside a
/// Tokio runtime.
pub fn spawn_plugin<B: PluginBackend>(
    config: PluginConfig,
    backend: Arc<B>,
    cancel: CancellationToken,
) -> PluginHandle {
    let (reg_tx, reg_rx) = watch::channel(false);
    let metrics = Arc::new(PluginMetrics::default());
    let task = tokio::spawn(run(config, backend, cancel, reg_tx, Arc::clone(&metrics)));
    PluginHandle {
        registered: reg_rx,
        metrics,
        task,
    }
}

/// How a session ended.
enum SessionEnd {
    Cancelled,
    Rebind(&'static str),
    Failed(PluginError),
}

struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }
    fn reset(&mut self) {
        self.next = self.initial;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

async fn run<B: PluginBackend>(
    config: PluginConfig,
    backend: Arc<B>,
    cancel: CancellationToken,
    registered: watch::Sender<bool>,
    metrics: Arc<PluginMetrics>,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut retry_log = RetryLog::new(RETRY_WARN_EVERY);
    let resource = backend.resource_name().to_owned();
    'sessions: while !cancel.is_cancelled() {
        let mode = config.effective_mode();
        tracing::debug!(resource, ?mode, "starting device plugin session");
        let end = session(
            &config,
            mode,
            &backend,
            &cancel,
            &registered,
            &metrics,
            &mut backoff,
            &mut retry_log,
        )
        .await;
        registered.send_replace(false);
        match end {
            SessionEnd::Cancelled => break,
            SessionEnd::Rebind(why) => {
                bump(&metrics.rebinds);
                tracing::info!(
                    resource,
                    reason = why,
                    "re-binding device plugin socket and registering again"
                );
            }
            SessionEnd::Failed(err) => {
                bump(&metrics.registrations_failed);
                let delay = backoff.step();
                log_failure(&resource, &err, delay, retry_log.failure(Instant::now()));
                // Sleep out the backoff, but retry at once when a new kubelet.sock appears (a
                // restarted kubelet), so a long backoff never delays re-registration.
                let kubelet_sock = config.kubelet_socket();
                let before = uds::socket_id(&kubelet_sock);
                let deadline = Instant::now() + delay;
                loop {
                    let step = config
                        .poll_interval
                        .min(deadline.saturating_duration_since(Instant::now()));
                    if step.is_zero() {
                        break;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break 'sessions,
                        () = tokio::time::sleep(step) => {}
                    }
                    let now = uds::socket_id(&kubelet_sock);
                    if mode == RegistrationMode::Legacy && now.is_some() && now != before {
                        tracing::info!(resource, "kubelet.sock re-created; retrying now");
                        break;
                    }
                }
            }
        }
    }
    tracing::info!(resource, "device plugin stopped");
}

/// At most one warning per this interval while registration keeps failing.
const RETRY_WARN_EVERY: Duration = Duration::from_secs(30);

/// Logs a failed registration as [`RetryLog`] says: the first of a run and a periodic summary
/// loudly (an accepted registration without ListAndWatch as an error: the kubelet misbehaves),
/// the rest at debug.
fn log_failure(resource: &str, err: &PluginError, retry_in: Duration, verdict: Verdict) {
    let loud = matches!(err, PluginError::NoListAndWatch(_));
    match verdict {
        Verdict::Quiet => {
            tracing::debug!(resource, error = %err, ?retry_in, "device plugin registration failed again");
        }
        Verdict::First if loud => {
            tracing::error!(resource, error = %err, ?retry_in, "device plugin registration failed; retrying");
        }
        Verdict::First => {
            tracing::warn!(resource, error = %err, ?retry_in, "device plugin registration failed; retrying");
        }
        Verdict::Summary {
            suppressed,
            consecutive,
            failing_for,
        } if loud => {
            tracing::error!(resource, error = %err, ?retry_in, suppressed, consecutive, ?failing_for, "device plugin registration still failing");
        }
        Verdict::Summary {
            suppressed,
            consecutive,
            failing_for,
        } => {
            tracing::warn!(resource, error = %err, ?retry_in, suppressed, consecutive, ?failing_for, "device plugin registration still failing");
        }
    }
}

/// Per-session state shared between the gRPC services and the session loop.
#[derive(Debug, Default)]
struct SessionShared {
    active_streams: AtomicUsize,
    streams_opened: AtomicU64,
}

/// Decrements the active-stream counts when a ListAndWatch stream's task ends.
struct StreamGuard(Arc<SessionShared>, Arc<PluginMetrics>);

impl StreamGuard {
    fn new(shared: Arc<SessionShared>, metrics: Arc<PluginMetrics>) -> Self {
        shared.active_streams.fetch_add(1, Ordering::SeqCst);
        shared.streams_opened.fetch_add(1, Ordering::SeqCst);
        metrics.open_streams.fetch_add(1, Ordering::Relaxed);
        Self(shared, metrics)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::SeqCst);
        self.1.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn session<B: PluginBackend>(
    config: &PluginConfig,
    mode: RegistrationMode,
    backend: &Arc<B>,
    cancel: &CancellationToken,
    registered: &watch::Sender<bool>,
    metrics: &Arc<PluginMetrics>,
    backoff: &mut Backoff,
    retry_log: &mut RetryLog,
) -> SessionEnd {
    let resource = backend.resource_name().to_owned();
    let kubelet_sock = config.kubelet_socket();

    // Legacy: a kubelet that is not up yet has no kubelet.sock; wait for it rather than fail.
    if mode == RegistrationMode::Legacy && uds::socket_id(&kubelet_sock).is_none() {
        tracing::info!(resource, path = %kubelet_sock.display(), "waiting for the kubelet socket");
        loop {
            tokio::select! {
                () = cancel.cancelled() => return SessionEnd::Cancelled,
                () = tokio::time::sleep(config.poll_interval) => {}
            }
            if uds::socket_id(&kubelet_sock).is_some() {
                break;
            }
            if config.effective_mode() != mode {
                return SessionEnd::Rebind("registration mode changed");
            }
        }
    }

    let sock = config.socket_path(mode);
    let (listener, sock_id) = match uds::bind_fresh(&sock) {
        Ok(x) => x,
        Err(e) => return SessionEnd::Failed(e.into()),
    };
    let session_token = cancel.child_token();
    let shared = Arc::new(SessionShared::default());
    let (status_tx, mut status_rx) = mpsc::channel::<preg::RegistrationStatus>(16);

    let dp_service = DevicePluginService {
        backend: Arc::clone(backend),
        index: std::sync::Mutex::new(DeviceIndex::new(backend.devices())),
        shared: Arc::clone(&shared),
        metrics: Arc::clone(metrics),
        debounce: config.debounce,
        session: session_token.clone(),
    };
    let mut router = tonic::transport::Server::builder().add_service(
        dp::device_plugin_server::DevicePluginServer::new(dp_service),
    );
    if mode == RegistrationMode::PluginsRegistry {
        let reg = RegistryService {
            info: preg::PluginInfo {
                r#type: PLUGIN_TYPE_DEVICE_PLUGIN.to_owned(),
                name: resource.clone(),
                endpoint: config.advertised_endpoint().to_string_lossy().into_owned(),
                supported_versions: vec![DEVICE_PLUGIN_VERSION.to_owned()],
            },
            status: status_tx,
        };
        router = router.add_service(preg::registration_server::RegistrationServer::new(reg));
    }
    // Kubelets before 1.26 send our socket path as :authority, which h2 refuses.
    let incoming = crate::authority::incoming(listener);
    let stop = session_token.clone();
    let mut server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
    });

    let end = supervise(
        config,
        mode,
        &resource,
        &sock,
        sock_id,
        cancel,
        registered,
        metrics,
        backoff,
        retry_log,
        &shared,
        &mut status_rx,
        &mut server,
    )
    .await;

    // Tear down: end the streams and the server, then remove our socket (only if it is still
    // ours: after a kubelet restart the path may already hold nothing, or a new socket).
    session_token.cancel();
    if !server.is_finished()
        && tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
    {
        tracing::warn!(resource, "gRPC server did not stop in 2 s; aborting it");
        server.abort();
    }
    uds::remove_if_ours(&sock, sock_id);
    end
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    config: &PluginConfig,
    mode: RegistrationMode,
    resource: &str,
    sock: &Path,
    sock_id: uds::SocketId,
    cancel: &CancellationToken,
    registered: &watch::Sender<bool>,
    metrics: &PluginMetrics,
    backoff: &mut Backoff,
    retry_log: &mut RetryLog,
    shared: &SessionShared,
    status_rx: &mut mpsc::Receiver<preg::RegistrationStatus>,
    server: &mut JoinHandle<Result<(), tonic::transport::Error>>,
) -> SessionEnd {
    let kubelet_sock = config.kubelet_socket();
    let mut kubelet_id = None;
    // Set when the kubelet accepts the registration, cleared once its ListAndWatch opened.
    let mut accepted_at: Option<Instant> = None;
    if mode == RegistrationMode::Legacy {
        kubelet_id = uds::socket_id(&kubelet_sock);
        let register = register_legacy(config, resource);
        let res = tokio::select! {
            () = cancel.cancelled() => return SessionEnd::Cancelled,
            r = register => r,
        };
        if let Err(e) = res {
            return SessionEnd::Failed(e);
        }
        bump(&metrics.registrations_ok);
        accepted_at = Some(Instant::now());
        tracing::debug!(
            resource,
            "kubelet accepted Register; waiting for ListAndWatch"
        );
    } else {
        tracing::info!(resource, socket = %sock.display(), "serving in plugins_registry; waiting for the kubelet");
    }

    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streams_gone_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return SessionEnd::Cancelled,
            res = &mut *server => {
                let msg = match res {
                    Ok(Ok(())) => "server ended".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return SessionEnd::Failed(PluginError::Server(msg));
            }
            Some(status) = status_rx.recv() => {
                if status.plugin_registered {
                    bump(&metrics.registrations_ok);
                    accepted_at = Some(Instant::now());
                    tracing::debug!(resource, "kubelet accepted the plugin (plugins_registry); waiting for ListAndWatch");
                } else {
                    // SRIOV-DP only stops its server here and stays dead; we serve again.
                    return SessionEnd::Failed(PluginError::Refused(status.error));
                }
            }
            _ = tick.tick() => {
                if let Some(at) = accepted_at {
                    if shared.streams_opened.load(Ordering::SeqCst) > 0 {
                        accepted_at = None;
                        bump(&metrics.registrations_confirmed);
                        backoff.reset();
                        registered.send_replace(true);
                        tracing::info!(resource, socket = %sock.display(), ?mode, "registered with the kubelet (ListAndWatch open)");
                        if let Some(r) = retry_log.success(Instant::now()) {
                            tracing::info!(resource, failures = r.failures, after = ?r.after, "device plugin registration recovered");
                        }
                    } else if at.elapsed() >= config.stream_open_timeout {
                        return SessionEnd::Failed(PluginError::NoListAndWatch(config.stream_open_timeout));
                    }
                }
                if uds::socket_id(sock) != Some(sock_id) {
                    return SessionEnd::Rebind("plugin socket removed or replaced (kubelet restart?)");
                }
                if mode == RegistrationMode::Legacy && uds::socket_id(&kubelet_sock) != kubelet_id {
                    return SessionEnd::Rebind("kubelet.sock re-created");
                }
                if config.mode == RegistrationMode::Auto && config.effective_mode() != mode {
                    return SessionEnd::Rebind("registration mode changed");
                }
                // The kubelet never re-opens a broken ListAndWatch stream; only a new
                // registration makes it connect again.
                let opened = shared.streams_opened.load(Ordering::SeqCst) > 0;
                if opened && shared.active_streams.load(Ordering::SeqCst) == 0 {
                    let since = *streams_gone_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= config.stream_lost_grace {
                        return SessionEnd::Rebind("kubelet closed every ListAndWatch stream");
                    }
                } else {
                    streams_gone_since = None;
                }
            }
        }
    }
}

async fn register_legacy(config: &PluginConfig, resource: &str) -> Result<(), PluginError> {
    let channel = uds::connect(&config.kubelet_socket()).await?;
    let mut client = dp::registration_client::RegistrationClient::new(channel);
    let req = dp::RegisterRequest {
        version: DEVICE_PLUGIN_VERSION.to_owned(),
        endpoint: config.socket_name(),
        resource_name: resource.to_owned(),
        options: Some(plugin_options()),
    };
    match tokio::time::timeout(config.register_timeout, client.register(req)).await {
        Err(_) => Err(PluginError::Timeout(config.register_timeout)),
        Ok(Err(status)) => Err(PluginError::Refused(status.message().to_owned())),
        Ok(Ok(_)) => Ok(()),
    }
}

fn plugin_options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// Converts a device list to the wire snapshot.
pub fn to_list_and_watch(devices: &[PluginDevice]) -> dp::ListAndWatchResponse {
    dp::ListAndWatchResponse {
        devices: devices
            .iter()
            .map(|d| dp::Device {
                id: d.id.clone(),
                health: if d.healthy { HEALTHY } else { UNHEALTHY }.to_owned(),
                topology: d.numa_node.map(|n| dp::TopologyInfo {
                    nodes: vec![dp::NumaNode { id: i64::from(n) }],
                }),
            })
            .collect(),
    }
}

fn to_container_response(a: ContainerAlloc) -> dp::ContainerAllocateResponse {
    dp::ContainerAllocateResponse {
        envs: a.envs.into_iter().collect(),
        mounts: a
            .mounts
            .into_iter()
            .map(|m| dp::Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                read_only: m.read_only,
            })
            .collect(),
        devices: a
            .devices
            .into_iter()
            .map(|d| dp::DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        annotations: a.annotations.into_iter().collect(),
        cdi_devices: a
            .cdi_devices
            .into_iter()
            .map(|name| dp::CdiDevice { name })
            .collect(),
    }
}

struct DevicePluginService<B> {
    backend: Arc<B>,
    index: std::sync::Mutex<DeviceIndex>,
    shared: Arc<SessionShared>,
    metrics: Arc<PluginMetrics>,
    debounce: Duration,
    session: CancellationToken,
}

/// id -> healthy of the backend's current snapshot, rebuilt only when the snapshot changed, so
/// Allocate checks ids in O(1) instead of scanning a 2048-device list per id.
struct DeviceIndex {
    rx: watch::Receiver<Vec<PluginDevice>>,
    health: std::collections::HashMap<String, bool>,
}

impl DeviceIndex {
    fn new(mut rx: watch::Receiver<Vec<PluginDevice>>) -> Self {
        let health = Self::build(&rx.borrow_and_update());
        Self { rx, health }
    }

    fn build(list: &[PluginDevice]) -> std::collections::HashMap<String, bool> {
        list.iter().map(|d| (d.id.clone(), d.healthy)).collect()
    }

    fn refresh(&mut self) {
        // An error means the backend dropped its sender: keep the last known snapshot.
        if self.rx.has_changed().unwrap_or(false) {
            self.health = Self::build(&self.rx.borrow_and_update());
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

impl<B: PluginBackend> DevicePluginService<B> {
    /// Rejects ids that are not in the current snapshot or are unhealthy, before the backend
    /// sees them (unhealthy = fenced or broken; the kubelet should not have picked it).
    fn check_ids(&self, req: &[Vec<String>]) -> Result<(), AllocError> {
        let mut index = self
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        index.refresh();
        for id in req.iter().flatten() {
            match index.health.get(id) {
                None => return Err(AllocError::UnknownDevice(id.clone())),
                Some(false) => {
                    return Err(AllocError::Unavailable {
                        id: id.clone(),
                        reason: "device is unhealthy".to_owned(),
                    });
                }
                Some(true) => {}
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<B: PluginBackend> dp::device_plugin_server::DevicePlugin for DevicePluginService<B> {
    async fn get_device_plugin_options(
        &self,
        _req: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = SnapshotStream;

    async fn list_and_watch(
        &self,
        _req: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut devices = self.backend.devices();
        let guard = StreamGuard::new(Arc::clone(&self.shared), Arc::clone(&self.metrics));
        let session = self.session.clone();
        let metrics = Arc::clone(&self.metrics);
        let debounce = self.debounce;
        tokio::spawn(async move {
            let _guard = guard;
            // First snapshot at once: the kubelet's capacity is 0 until it arrives.
            let first = to_list_and_watch(&devices.borrow_and_update());
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            bump(&metrics.snapshots_sent);
            let mut last_send = Instant::now();
            loop {
                tokio::select! {
                    () = session.cancelled() => return,
                    () = tx.closed() => return,
                    r = devices.changed() => {
                        if r.is_err() {
                            // The backend is gone; keep the stream open (closing it would make
                            // the kubelet mark every device unhealthy) until the session ends.
                            tokio::select! {
                                () = session.cancelled() => {}
                                () = tx.closed() => {}
                            }
                            return;
                        }
                    }
                }
                // Throttle: at most one snapshot per `debounce`; changes inside the window are
                // coalesced and the latest state is sent at its end.
                let next_allowed = last_send + debounce;
                if Instant::now() < next_allowed {
                    tokio::select! {
                        () = session.cancelled() => return,
                        () = tx.closed() => return,
                        () = tokio::time::sleep_until(next_allowed) => {}
                    }
                }
                let snap = to_list_and_watch(&devices.borrow_and_update());
                if tx.send(Ok(snap)).await.is_err() {
                    return;
                }
                bump(&metrics.snapshots_sent);
                last_send = Instant::now();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let container_responses = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                dp::ContainerPreferredAllocationResponse {
                    device_i_ds: self.backend.preferred(
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                    ),
                }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let ids: Vec<Vec<String>> = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        let result = self
            .check_ids(&ids)
            .and_then(|()| self.backend.allocate(&ids))
            .and_then(|allocs| {
                if allocs.len() == ids.len() {
                    Ok(allocs)
                } else {
                    Err(AllocError::Internal(format!(
                        "backend returned {} container responses for {} requests",
                        allocs.len(),
                        ids.len()
                    )))
                }
            });
        match result {
            Ok(allocs) => {
                bump(&self.metrics.allocations_ok);
                Ok(Response::new(dp::AllocateResponse {
                    container_responses: allocs.into_iter().map(to_container_response).collect(),
                }))
            }
            Err(e) => {
                bump(&self.metrics.allocations_failed);
                tracing::warn!(resource = self.backend.resource_name(), error = %e, "Allocate failed");
                Err(e.into())
            }
        }
    }

    async fn pre_start_container(
        &self,
        _req: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

struct RegistryService {
    info: preg::PluginInfo,
    status: mpsc::Sender<preg::RegistrationStatus>,
}

#[tonic::async_trait]
impl preg::registration_server::Registration for RegistryService {
    /// Answered from a prepared value, no locks: the kubelet gives GetInfo 1 s and never retries
    /// (kubernetes#127457).
    async fn get_info(
        &self,
        _req: Request<preg::InfoRequest>,
    ) -> Result<Response<preg::PluginInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        req: Request<preg::RegistrationStatus>,
    ) -> Result<Response<preg::RegistrationStatusResponse>, Status> {
        let status = req.into_inner();
        if !status.plugin_registered {
            tracing::warn!(
                name = self.info.name,
                error = status.error,
                "kubelet did not register the plugin"
            );
        }
        if self.status.try_send(status).is_err() {
            tracing::warn!(
                name = self.info.name,
                "registration status dropped (session ending)"
            );
        }
        Ok(Response::new(preg::RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl PluginBackend for Fixed {
        fn resource_name(&self) -> &str {
            "a.io/b"
        }
        fn devices(&self) -> watch::Receiver<Vec<PluginDevice>> {
            watch::channel(Vec::new()).1
        }
        fn allocate(&self, _req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
            Ok(Vec::new())
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn default_preferred_keeps_must_include_and_size() {
        let avail = ids(&["a", "b", "c", "d"]);
        assert_eq!(Fixed.preferred(&avail, &ids(&["c"]), 2), ids(&["c", "a"]));
        assert_eq!(Fixed.preferred(&avail, &[], 0), Vec::<String>::new());
        // Never duplicates, never more than available.
        assert_eq!(
            Fixed.preferred(&avail, &ids(&["a"]), 10),
            ids(&["a", "b", "c", "d"])
        );
        // must_include wins even over size.
        assert_eq!(
            Fixed.preferred(&avail, &ids(&["d", "c"]), 1),
            ids(&["d", "c"])
        );
    }

    #[test]
    fn alloc_errors_map_to_grpc_codes_naming_the_device() {
        let s: Status = AllocError::UnknownDevice("0000:01:00.1".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("0000:01:00.1"));
        let s: Status = AllocError::Unavailable {
            id: "0000:01:00.2".into(),
            reason: "reserved".into(),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("0000:01:00.2"));
        let s: Status = AllocError::Internal("x".into()).into();
        assert_eq!(s.code(), tonic::Code::Internal);
    }

    #[test]
    fn registration_mode_parses_and_prints() {
        for m in [
            RegistrationMode::Auto,
            RegistrationMode::Legacy,
            RegistrationMode::PluginsRegistry,
        ] {
            assert_eq!(m.to_string().parse::<RegistrationMode>(), Ok(m));
        }
        assert_eq!(
            "plugins-registry".parse::<RegistrationMode>(),
            Ok(RegistrationMode::PluginsRegistry)
        );
        assert!("both".parse::<RegistrationMode>().is_err());
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let seq: Vec<u128> = (0..5).map(|_| b.step().as_millis()).collect();
        assert_eq!(seq, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn socket_names_and_paths() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = PluginConfig::new("pool/a b", dir.path());
        assert_eq!(c.socket_name(), "vfplug-pool_a_b.sock");
        assert_eq!(c.effective_mode(), RegistrationMode::Legacy);
        assert_eq!(
            c.socket_path(RegistrationMode::Legacy),
            dir.path().join("device-plugins/vfplug-pool_a_b.sock")
        );
        std::fs::create_dir(dir.path().join("plugins_registry")).expect("mkdir");
        assert_eq!(c.effective_mode(), RegistrationMode::PluginsRegistry);
        assert_eq!(
            c.socket_path(RegistrationMode::PluginsRegistry),
            dir.path().join("plugins_registry/vfplug-pool_a_b.sock")
        );
        assert_eq!(
            c.advertised_endpoint(),
            dir.path().join("plugins_registry/vfplug-pool_a_b.sock")
        );
        c.kubelet_dir_on_host = Some(PathBuf::from("/var/lib/kubelet"));
        assert_eq!(
            c.advertised_endpoint(),
            Path::new("/var/lib/kubelet/plugins_registry/vfplug-pool_a_b.sock")
        );
        c.mode = RegistrationMode::Legacy;
        assert_eq!(c.effective_mode(), RegistrationMode::Legacy);
        assert_eq!(
            c.kubelet_socket(),
            dir.path().join("device-plugins/kubelet.sock")
        );
    }

    #[test]
    fn each_kubelet_path_can_be_set_on_its_own() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = PluginConfig::new("p", "/nonexistent/kubelet");
        c.device_plugin_dir = dir.path().join("dp");
        c.plugins_registry_dir = dir.path().join("reg");
        assert_eq!(c.kubelet_socket(), dir.path().join("dp/kubelet.sock"));
        assert_eq!(
            c.socket_path(RegistrationMode::Legacy),
            dir.path().join("dp/vfplug-p.sock")
        );
        assert_eq!(c.effective_mode(), RegistrationMode::Legacy);
        std::fs::create_dir(dir.path().join("reg")).expect("mkdir");
        assert_eq!(c.effective_mode(), RegistrationMode::PluginsRegistry);
        assert_eq!(
            c.advertised_endpoint(),
            dir.path().join("reg/vfplug-p.sock")
        );
    }

    #[test]
    fn snapshot_conversion() {
        let resp = to_list_and_watch(&[
            PluginDevice {
                id: "x".into(),
                healthy: true,
                numa_node: Some(1),
            },
            PluginDevice {
                id: "y".into(),
                healthy: false,
                numa_node: None,
            },
        ]);
        assert_eq!(resp.devices[0].health, HEALTHY);
        assert_eq!(
            resp.devices[0].topology.as_ref().map(|t| t.nodes[0].id),
            Some(1)
        );
        assert_eq!(resp.devices[1].health, UNHEALTHY);
        assert!(resp.devices[1].topology.is_none());
    }
}
