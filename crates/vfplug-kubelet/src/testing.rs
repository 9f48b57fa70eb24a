//! An in-process fake kubelet over real gRPC on unix sockets (cargo feature `testing`).
//!
//! [`FakeKubelet`] plays the kubelet's device manager in a temporary kubelet dir:
//!
//! - legacy mode: serves `v1beta1.Registration` on `device-plugins/kubelet.sock`; on `Register`
//!   it dials the plugin's socket, calls `GetDevicePluginOptions`, opens `ListAndWatch` and
//!   records every snapshot (like the real kubelet, inside the Register call);
//! - plugins_registry mode: a watcher polls `plugins_registry/` for new sockets, calls `GetInfo`,
//!   validates, connects as above and calls `NotifyRegistrationStatus`;
//! - knobs: refuse the next N registrations, restart (delete every socket in `device-plugins/`,
//!   drop every connection, serve a new `kubelet.sock`), stop, drop streams;
//! - calls `Allocate`, `GetPreferredAllocation` on the registered plugin.
//!
//! [`FakePodResources`] serves `PodResourcesLister` with a settable answer, and [`TestBackend`]
//! is a small [`PluginBackend`] over [`crate::sriov`] for tests and benchmarks.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::pluginregistration as preg;
use crate::api::podresources as pr;
use crate::api::v1beta1 as dp;
use crate::plugin::{
    AllocError, ContainerAlloc, DEVICE_PLUGIN_VERSION, DEVICE_PLUGINS_DIR, KUBELET_SOCKET,
    PLUGIN_TYPE_DEVICE_PLUGIN, PLUGINS_REGISTRY_DIR, PluginBackend, PluginDevice,
};
use crate::sriov::{self, SriovAllocParams, SriovDevice};
use crate::uds;

/// Fake-kubelet errors.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// Socket trouble.
    #[error(transparent)]
    Uds(#[from] uds::UdsError),
    /// An rpc failed.
    #[error("rpc: {0}")]
    Rpc(#[from] Status),
    /// A wait timed out.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// No plugin registered for the resource.
    #[error("no plugin registered for {0}")]
    NotRegistered(String),
    /// Filesystem trouble.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// How a registration reached the fake kubelet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationPath {
    /// `v1beta1.Registration/Register` on kubelet.sock.
    Legacy,
    /// The plugins_registry watcher (`GetInfo` + `NotifyRegistrationStatus`).
    PluginsRegistry,
}

/// One registration attempt.
#[derive(Debug, Clone)]
pub struct RegistrationRecord {
    /// Path.
    pub path: RegistrationPath,
    /// Resource name (Register's `resource_name`, or `PluginInfo.name`).
    pub resource_name: String,
    /// Register's `endpoint`, or `PluginInfo.endpoint`.
    pub endpoint: String,
    /// Register's `version`, or `PluginInfo.supported_versions` joined with `,`.
    pub version: String,
    /// Register's options (legacy only).
    pub options: Option<dp::DevicePluginOptions>,
    /// Whether the fake accepted it (and connected to the plugin).
    pub accepted: bool,
    /// When it arrived.
    pub at: Instant,
}

/// One ListAndWatch message as received.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Resource.
    pub resource: String,
    /// Devices.
    pub devices: Vec<dp::Device>,
    /// When it arrived.
    pub at: Instant,
}

impl Snapshot {
    /// Ids of healthy devices.
    pub fn healthy_ids(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| d.health == crate::plugin::HEALTHY)
            .map(|d| d.id.clone())
            .collect()
    }
}

struct Endpoint {
    client: dp::device_plugin_client::DevicePluginClient<Channel>,
    options: dp::DevicePluginOptions,
    token: CancellationToken,
}

#[derive(Default)]
struct Shared {
    registrations: Mutex<Vec<RegistrationRecord>>,
    snapshots: Mutex<Vec<Snapshot>>,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    refuse: AtomicUsize,
    ghost: AtomicUsize,
    events: Mutex<Option<watch::Sender<u64>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn event(&self) {
        if let Some(tx) = lock(&self.events).as_ref() {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn record(&self, r: RegistrationRecord) {
        lock(&self.registrations).push(r);
        self.event();
    }

    /// Refuses if the refuse counter is positive (and decrements it).
    fn take_refusal(&self) -> bool {
        self.refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Accepts without dialing back if the ghost counter is positive (and decrements it).
    fn take_ghost(&self) -> bool {
        self.ghost
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Connects to a plugin like the kubelet's `connectClient`: dial (10 s), options, ListAndWatch.
async fn connect_plugin(
    shared: &Arc<Shared>,
    resource: &str,
    path: &Path,
    generation: &CancellationToken,
) -> Result<(), FakeError> {
    let channel = tokio::time::timeout(Duration::from_secs(10), uds::connect(path))
        .await
        .map_err(|_| FakeError::Timeout(format!("dial {}", path.display())))??;
    let mut client = dp::device_plugin_client::DevicePluginClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024);
    let options = client
        .get_device_plugin_options(dp::Empty {})
        .await?
        .into_inner();
    let mut stream = client.list_and_watch(dp::Empty {}).await?.into_inner();
    let token = generation.child_token();
    let old = lock(&shared.endpoints).insert(
        resource.to_owned(),
        Endpoint {
            client,
            options,
            token: token.clone(),
        },
    );
    // Like the kubelet: a new registration of the same resource replaces the old endpoint.
    if let Some(old) = old {
        old.token.cancel();
    }
    let shared = Arc::clone(shared);
    let resource = resource.to_owned();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = token.cancelled() => break,
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(resp)) => {
                    lock(&shared.snapshots).push(Snapshot {
                        resource: resource.clone(),
                        devices: resp.devices,
                        at: Instant::now(),
                    });
                    shared.event();
                }
                Ok(None) | Err(_) => break,
            }
        }
        shared.event();
    });
    Ok(())
}

struct FakeRegistration {
    shared: Arc<Shared>,
    plugin_dir: PathBuf,
    generation: CancellationToken,
}

#[tonic::async_trait]
impl dp::registration_server::Registration for FakeRegistration {
    async fn register(
        &self,
        req: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let r = req.into_inner();
        let mut rec = RegistrationRecord {
            path: RegistrationPath::Legacy,
            resource_name: r.resource_name.clone(),
            endpoint: r.endpoint.clone(),
            version: r.version.clone(),
            options: r.options,
            accepted: false,
            at: Instant::now(),
        };
        if r.version != DEVICE_PLUGIN_VERSION {
            self.shared.record(rec);
            return Err(Status::invalid_argument("unsupported version"));
        }
        if self.shared.take_refusal() {
            self.shared.record(rec);
            return Err(Status::unavailable("registration refused by fake kubelet"));
        }
        if self.shared.take_ghost() {
            rec.accepted = true;
            self.shared.record(rec);
            return Ok(Response::new(dp::Empty {}));
        }
        let path = self.plugin_dir.join(&r.endpoint);
        let res = connect_plugin(&self.shared, &r.resource_name, &path, &self.generation).await;
        rec.accepted = res.is_ok();
        self.shared.record(rec);
        res.map(|()| Response::new(dp::Empty {}))
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// Which registration paths the fake kubelet offers.
#[derive(Debug, Clone, Copy)]
pub struct FakeKubeletOptions {
    /// Serve `device-plugins/kubelet.sock`.
    pub legacy: bool,
    /// Create `plugins_registry/` and watch it.
    pub plugins_registry: bool,
    /// Watcher poll interval.
    pub watch_interval: Duration,
}

impl Default for FakeKubeletOptions {
    fn default() -> Self {
        Self {
            legacy: true,
            plugins_registry: false,
            watch_interval: Duration::from_millis(50),
        }
    }
}

/// The fake kubelet. Dropping it stops its tasks (sockets stay; use a temp dir).
pub struct FakeKubelet {
    dir: PathBuf,
    options: FakeKubeletOptions,
    shared: Arc<Shared>,
    events: watch::Receiver<u64>,
    generation: Mutex<CancellationToken>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Starts a legacy-mode fake kubelet in `kubelet_dir`.
    pub async fn start(kubelet_dir: &Path) -> Result<Self, FakeError> {
        Self::start_with(kubelet_dir, FakeKubeletOptions::default()).await
    }

    /// Starts a fake kubelet with `options`.
    pub async fn start_with(
        kubelet_dir: &Path,
        options: FakeKubeletOptions,
    ) -> Result<Self, FakeError> {
        let (tx, rx) = watch::channel(0u64);
        let shared = Arc::new(Shared::default());
        *lock(&shared.events) = Some(tx);
        let this = Self {
            dir: kubelet_dir.to_path_buf(),
            options,
            shared,
            events: rx,
            generation: Mutex::new(CancellationToken::new()),
            tasks: Mutex::new(Vec::new()),
        };
        std::fs::create_dir_all(this.plugin_dir())?;
        if options.plugins_registry {
            std::fs::create_dir_all(this.registry_dir())?;
        }
        this.spawn_generation()?;
        Ok(this)
    }

    /// `<dir>/device-plugins`.
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join(DEVICE_PLUGINS_DIR)
    }

    /// `<dir>/plugins_registry`.
    pub fn registry_dir(&self) -> PathBuf {
        self.dir.join(PLUGINS_REGISTRY_DIR)
    }

    fn spawn_generation(&self) -> Result<(), FakeError> {
        let token = lock(&self.generation).clone();
        let mut tasks = lock(&self.tasks);
        if self.options.legacy {
            let (listener, _) = uds::bind_fresh(&self.plugin_dir().join(KUBELET_SOCKET))?;
            let svc = FakeRegistration {
                shared: Arc::clone(&self.shared),
                plugin_dir: self.plugin_dir(),
                generation: token.clone(),
            };
            let stop = token.clone();
            tasks.push(tokio::spawn(async move {
                let res = tonic::transport::Server::builder()
                    .add_service(dp::registration_server::RegistrationServer::new(svc))
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(listener),
                        stop.cancelled_owned(),
                    )
                    .await;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "fake kubelet registration server failed");
                }
            }));
        }
        if self.options.plugins_registry {
            tasks.push(tokio::spawn(watch_registry(
                Arc::clone(&self.shared),
                self.registry_dir(),
                self.options.watch_interval,
                token,
            )));
        }
        Ok(())
    }

    /// Refuses the next `n` registrations (legacy: error status; plugins_registry:
    /// `NotifyRegistrationStatus(false)`).
    pub fn refuse_next(&self, n: usize) {
        self.shared.refuse.store(n, Ordering::SeqCst);
    }

    /// Accepts the next `n` legacy registrations but never dials the plugin back (no
    /// ListAndWatch), as a kubelet whose endpoint setup failed after `Register` answered.
    pub fn ghost_next(&self, n: usize) {
        self.shared.ghost.store(n, Ordering::SeqCst);
    }

    /// Every registration attempt so far.
    pub fn registrations(&self) -> Vec<RegistrationRecord> {
        lock(&self.shared.registrations).clone()
    }

    /// Accepted registrations so far.
    pub fn accepted_registrations(&self) -> usize {
        lock(&self.shared.registrations)
            .iter()
            .filter(|r| r.accepted)
            .count()
    }

    /// Every snapshot received so far, for all resources, in arrival order.
    pub fn snapshots(&self, resource: &str) -> Vec<Snapshot> {
        lock(&self.shared.snapshots)
            .iter()
            .filter(|s| s.resource == resource)
            .cloned()
            .collect()
    }

    /// Forgets recorded snapshots.
    pub fn clear_snapshots(&self) {
        lock(&self.shared.snapshots).clear();
    }

    /// Waits until `pred` holds (checked after every recorded event).
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Self) -> bool,
    ) -> Result<(), FakeError> {
        let mut events = self.events.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            events.borrow_and_update();
            if pred(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return if pred(self) {
                        Ok(())
                    } else {
                        Err(FakeError::Timeout(what.to_owned()))
                    };
                }
            }
        }
    }

    /// Waits for at least `n` accepted registrations.
    pub async fn wait_registrations(&self, n: usize, timeout: Duration) -> Result<(), FakeError> {
        self.wait_until(&format!("{n} accepted registrations"), timeout, |k| {
            k.accepted_registrations() >= n
        })
        .await
    }

    /// Waits for a snapshot of `resource` (received after `after`, if given) matching `pred`.
    pub async fn wait_snapshot(
        &self,
        resource: &str,
        after: Option<Instant>,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Result<Snapshot, FakeError> {
        // Newest first, cloning only the match: snapshots of 2048 devices add up.
        let find = |k: &Self| {
            lock(&k.shared.snapshots)
                .iter()
                .rev()
                .take_while(|s| after.is_none_or(|a| s.at >= a))
                .find(|s| s.resource == resource && pred(s))
                .cloned()
        };
        self.wait_until(&format!("snapshot of {resource}"), timeout, |k| {
            find(k).is_some()
        })
        .await?;
        find(self).ok_or_else(|| FakeError::Timeout(format!("snapshot of {resource}")))
    }

    fn client(
        &self,
        resource: &str,
    ) -> Result<dp::device_plugin_client::DevicePluginClient<Channel>, FakeError> {
        lock(&self.shared.endpoints)
            .get(resource)
            .map(|e| e.client.clone())
            .ok_or_else(|| FakeError::NotRegistered(resource.to_owned()))
    }

    /// Options the plugin reported when it was connected.
    pub fn plugin_options(&self, resource: &str) -> Option<dp::DevicePluginOptions> {
        lock(&self.shared.endpoints)
            .get(resource)
            .map(|e| e.options)
    }

    /// Calls `Allocate` with one container request per element of `containers`.
    pub async fn allocate(
        &self,
        resource: &str,
        containers: Vec<Vec<String>>,
    ) -> Result<dp::AllocateResponse, Status> {
        let mut client = self
            .client(resource)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = dp::AllocateRequest {
            container_requests: containers
                .into_iter()
                .map(|devices_ids| dp::ContainerAllocateRequest { devices_ids })
                .collect(),
        };
        client.allocate(req).await.map(Response::into_inner)
    }

    /// Calls `GetPreferredAllocation` for one container.
    pub async fn preferred(
        &self,
        resource: &str,
        available: Vec<String>,
        must_include: Vec<String>,
        size: i32,
    ) -> Result<Vec<String>, Status> {
        let mut client = self
            .client(resource)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: available,
                must_include_device_i_ds: must_include,
                allocation_size: size,
            }],
        };
        let resp = client.get_preferred_allocation(req).await?.into_inner();
        Ok(resp
            .container_responses
            .into_iter()
            .next()
            .map(|c| c.device_i_ds)
            .unwrap_or_default())
    }

    /// Closes every ListAndWatch stream and connection but keeps serving (a kubelet that
    /// dropped its endpoints without restarting).
    pub fn drop_streams(&self) {
        for (_, ep) in lock(&self.shared.endpoints).drain() {
            ep.token.cancel();
        }
    }

    fn stop_generation(&self) {
        let mut g = lock(&self.generation);
        g.cancel();
        *g = CancellationToken::new();
        drop(g);
        lock(&self.shared.endpoints).clear();
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Stops serving and removes `kubelet.sock` (a kubelet that is down).
    pub fn stop(&self) {
        self.stop_generation();
        let _ = std::fs::remove_file(self.plugin_dir().join(KUBELET_SOCKET));
    }

    /// Simulates a kubelet restart: drops every connection, deletes every socket in
    /// `device-plugins/` (as `CleanupPluginDirectory` does), serves a new `kubelet.sock`, and
    /// re-walks `plugins_registry/`.
    pub fn restart(&self) -> Result<(), FakeError> {
        self.stop_generation();
        for entry in std::fs::read_dir(self.plugin_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_socket() {
                std::fs::remove_file(entry.path())?;
            }
        }
        self.spawn_generation()
    }

    /// Starts serving again after [`FakeKubelet::stop`].
    pub fn start_again(&self) -> Result<(), FakeError> {
        self.spawn_generation()
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop_generation();
    }
}

/// The plugins_registry watcher: registers every new socket (by inode) it finds.
async fn watch_registry(
    shared: Arc<Shared>,
    dir: PathBuf,
    interval: Duration,
    generation: CancellationToken,
) {
    let mut seen: HashMap<PathBuf, uds::SocketId> = HashMap::new();
    loop {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let hidden = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_none_or(|n| n.starts_with('.'));
                if hidden {
                    continue;
                }
                if let Some(ino) = uds::socket_id(&path)
                    && seen.get(&path) != Some(&ino)
                {
                    found.push((path, ino));
                }
            }
        }
        // A socket is marked seen only once it registered: the real kubelet's plugin manager
        // keeps a socket in its desired state and its reconciler tries again each loop until
        // registration succeeds, so a failed dial is not the end of it there either.
        for (path, ino) in found {
            match register_via_registry(&shared, &path, &generation).await {
                Ok(()) => {
                    seen.insert(path, ino);
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "fake plugin watcher: registration failed; trying again");
                }
            }
        }
        tokio::select! {
            () = generation.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn register_via_registry(
    shared: &Arc<Shared>,
    path: &Path,
    generation: &CancellationToken,
) -> Result<(), FakeError> {
    let channel = uds::connect(path).await?;
    let mut reg = preg::registration_client::RegistrationClient::new(channel);
    // The kubelet gives GetInfo one second (kubernetes#127457).
    let info = tokio::time::timeout(Duration::from_secs(1), reg.get_info(preg::InfoRequest {}))
        .await
        .map_err(|_| FakeError::Timeout("GetInfo".into()))??
        .into_inner();
    let mut rec = RegistrationRecord {
        path: RegistrationPath::PluginsRegistry,
        resource_name: info.name.clone(),
        endpoint: info.endpoint.clone(),
        version: info.supported_versions.join(","),
        options: None,
        accepted: false,
        at: Instant::now(),
    };
    let mut error = String::new();
    if info.r#type != PLUGIN_TYPE_DEVICE_PLUGIN {
        error = format!("unsupported plugin type {}", info.r#type);
    } else if !info
        .supported_versions
        .iter()
        .any(|v| v == DEVICE_PLUGIN_VERSION)
    {
        error = "no supported version".to_owned();
    } else if shared.take_refusal() {
        error = "registration refused by fake kubelet".to_owned();
    } else {
        let endpoint = if info.endpoint.is_empty() {
            path.to_path_buf()
        } else {
            PathBuf::from(&info.endpoint)
        };
        if let Err(e) = connect_plugin(shared, &info.name, &endpoint, generation).await {
            error = e.to_string();
        }
    }
    rec.accepted = error.is_empty();
    shared.record(rec);
    reg.notify_registration_status(preg::RegistrationStatus {
        plugin_registered: error.is_empty(),
        error,
    })
    .await?;
    Ok(())
}

/// A [`PluginBackend`] over a fixed set of SR-IOV devices whose health and membership tests can
/// change; Allocate answers with [`sriov::container_alloc`].
#[derive(Debug)]
pub struct TestBackend {
    params: SriovAllocParams,
    resource: String,
    devices: Mutex<HashMap<String, SriovDevice>>,
    tx: watch::Sender<Vec<PluginDevice>>,
    allocations: Mutex<Vec<Vec<Vec<String>>>>,
}

impl TestBackend {
    /// A backend for `<prefix>/<name>` with `devices`, all healthy, NUMA node 0.
    pub fn new(prefix: &str, name: &str, devices: Vec<SriovDevice>) -> Self {
        let list = devices
            .iter()
            .map(|d| PluginDevice {
                id: d.pci.clone(),
                healthy: true,
                numa_node: Some(0),
            })
            .collect();
        let (tx, _) = watch::channel(list);
        let params = SriovAllocParams::new(prefix, name);
        Self {
            resource: params.resource_name(),
            params,
            devices: Mutex::new(devices.into_iter().map(|d| (d.pci.clone(), d)).collect()),
            tx,
            allocations: Mutex::new(Vec::new()),
        }
    }

    /// `n` vfio VFs `0000:<bus>:<dev>.<fn>` (8 functions per device) in groups 100.. .
    pub fn vfio_devices(n: usize) -> Vec<SriovDevice> {
        (0..n)
            .map(|i| {
                let bus = 0x10 + i / 256;
                let dev = (i % 256) / 8;
                let func = i % 8;
                let group = u32::try_from(100 + i).unwrap_or(u32::MAX);
                SriovDevice::vfio(format!("0000:{bus:02x}:{dev:02x}.{func}"), group)
            })
            .collect()
    }

    /// Sets one device's health (pushes a snapshot).
    pub fn set_health(&self, id: &str, healthy: bool) {
        self.tx.send_modify(|list| {
            for d in list.iter_mut().filter(|d| d.id == id) {
                d.healthy = healthy;
            }
        });
    }

    /// Replaces the advertised list.
    pub fn set_devices(&self, list: Vec<PluginDevice>) {
        self.tx.send_replace(list);
    }

    /// The advertised list now.
    pub fn current(&self) -> Vec<PluginDevice> {
        self.tx.borrow().clone()
    }

    /// Every Allocate request the backend saw.
    pub fn allocations(&self) -> Vec<Vec<Vec<String>>> {
        lock(&self.allocations).clone()
    }
}

impl PluginBackend for TestBackend {
    fn resource_name(&self) -> &str {
        &self.resource
    }

    fn devices(&self) -> watch::Receiver<Vec<PluginDevice>> {
        self.tx.subscribe()
    }

    fn allocate(&self, req: &[Vec<String>]) -> Result<Vec<ContainerAlloc>, AllocError> {
        lock(&self.allocations).push(req.to_vec());
        let devices = lock(&self.devices);
        req.iter()
            .map(|ids| {
                let devs = ids
                    .iter()
                    .map(|id| {
                        devices
                            .get(id)
                            .cloned()
                            .ok_or_else(|| AllocError::UnknownDevice(id.clone()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                sriov::container_alloc(&self.params, &devs)
                    .map_err(|e| AllocError::Internal(e.to_string()))
            })
            .collect()
    }
}

/// A fake PodResources server on `<kubelet-dir>/pod-resources/kubelet.sock`.
#[derive(Debug)]
pub struct FakePodResources {
    state: Arc<Mutex<PodResourcesAnswer>>,
    token: CancellationToken,
    path: PathBuf,
}

#[derive(Debug, Default, Clone)]
struct PodResourcesAnswer {
    pods: Vec<pr::PodResources>,
    allocatable: Vec<pr::ContainerDevices>,
    list_calls: u64,
}

struct PodResourcesSvc(Arc<Mutex<PodResourcesAnswer>>);

#[tonic::async_trait]
impl pr::pod_resources_lister_server::PodResourcesLister for PodResourcesSvc {
    async fn list(
        &self,
        _req: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        let mut s = lock(&self.0);
        s.list_calls += 1;
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: s.pods.clone(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _req: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(pr::AllocatableResourcesResponse {
            devices: lock(&self.0).allocatable.clone(),
            cpu_ids: Vec::new(),
            memory: Vec::new(),
        }))
    }

    async fn get(
        &self,
        req: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        let r = req.into_inner();
        let pod = lock(&self.0)
            .pods
            .iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .cloned();
        match pod {
            Some(p) => Ok(Response::new(pr::GetPodResourcesResponse {
                pod_resources: Some(p),
            })),
            None => Err(Status::not_found("pod not found")),
        }
    }
}

impl FakePodResources {
    /// Starts serving in `kubelet_dir`.
    pub fn start(kubelet_dir: &Path) -> Result<Self, FakeError> {
        let path = crate::podresources::socket_path(kubelet_dir);
        let (listener, _) = uds::bind_fresh(&path)?;
        let state = Arc::new(Mutex::new(PodResourcesAnswer::default()));
        let token = CancellationToken::new();
        let svc = PodResourcesSvc(Arc::clone(&state));
        let stop = token.clone();
        tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(pr::pod_resources_lister_server::PodResourcesListerServer::new(svc))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "fake PodResources server failed");
            }
        });
        Ok(Self { state, token, path })
    }

    /// Sets the `List` answer.
    pub fn set_pods(&self, pods: Vec<pr::PodResources>) {
        lock(&self.state).pods = pods;
    }

    /// Sets the `GetAllocatableResources` devices.
    pub fn set_allocatable(&self, devices: Vec<pr::ContainerDevices>) {
        lock(&self.state).allocatable = devices;
    }

    /// `List` calls served.
    pub fn list_calls(&self) -> u64 {
        lock(&self.state).list_calls
    }

    /// Stops serving and removes the socket.
    pub fn stop(&self) {
        self.token.cancel();
        let _ = std::fs::remove_file(&self.path);
    }

    /// A pod with one container holding `ids` of `resource`.
    pub fn pod(
        namespace: &str,
        name: &str,
        container: &str,
        resource: &str,
        ids: &[&str],
    ) -> pr::PodResources {
        pr::PodResources {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            containers: vec![pr::ContainerResources {
                name: container.to_owned(),
                devices: vec![pr::ContainerDevices {
                    resource_name: resource.to_owned(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                    topology: None,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

impl Drop for FakePodResources {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
