//! Client of the kubelet's PodResources v1 API (`<kubelet-dir>/pod-resources/kubelet.sock`).
//!
//! vfplugd uses it to learn which devices the kubelet has handed to which pod (ledger
//! `KubeletAllocated`) and which ones it no longer reports (back to `Free`). The kubelet serves
//! it rate-limited (100 qps, burst 10), so poll, don't hammer. [`spawn_poller`] lists
//! periodically and never gives up on a missing socket: the kubelet may be restarting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::api::podresources as pr;
use crate::uds;

/// Directory (below the kubelet dir) of the PodResources socket.
pub const POD_RESOURCES_DIR: &str = "pod-resources";
/// Largest response accepted (Multus uses the same limit).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// `<kubelet-dir>/pod-resources/kubelet.sock`.
pub fn socket_path(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir.join(POD_RESOURCES_DIR).join("kubelet.sock")
}

/// Devices of one resource the kubelet assigned to one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceAllocation {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Extended resource name.
    pub resource_name: String,
    /// Device ids.
    pub device_ids: Vec<String>,
}

/// Devices of one resource the kubelet considers allocatable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllocatableDevices {
    /// Extended resource name.
    pub resource_name: String,
    /// Device ids.
    pub device_ids: Vec<String>,
}

/// PodResources errors.
#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    /// Dial failed (no kubelet, or no socket yet).
    #[error(transparent)]
    Connect(#[from] uds::UdsError),
    /// The rpc failed.
    #[error("PodResources rpc failed: {0}")]
    Rpc(#[from] tonic::Status),
    /// The rpc did not answer in time.
    #[error("PodResources rpc timed out")]
    Timeout,
}

/// A connected PodResources client.
#[derive(Debug, Clone)]
pub struct PodResourcesClient {
    inner: pr::pod_resources_lister_client::PodResourcesListerClient<Channel>,
    timeout: Duration,
}

impl PodResourcesClient {
    /// Dials the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, PodResourcesError> {
        let channel = uds::connect(path).await?;
        let inner = pr::pod_resources_lister_client::PodResourcesListerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self {
            inner,
            timeout: Duration::from_secs(10),
        })
    }

    /// `List`, flattened to one entry per (pod, container, resource) with devices, sorted.
    pub async fn list(&mut self) -> Result<Vec<DeviceAllocation>, PodResourcesError> {
        let resp = tokio::time::timeout(
            self.timeout,
            self.inner.list(pr::ListPodResourcesRequest {}),
        )
        .await
        .map_err(|_| PodResourcesError::Timeout)??
        .into_inner();
        Ok(flatten_list(resp))
    }

    /// `GetAllocatableResources` (devices only), sorted.
    pub async fn allocatable(&mut self) -> Result<Vec<AllocatableDevices>, PodResourcesError> {
        let resp = tokio::time::timeout(
            self.timeout,
            self.inner
                .get_allocatable_resources(pr::AllocatableResourcesRequest {}),
        )
        .await
        .map_err(|_| PodResourcesError::Timeout)??
        .into_inner();
        let mut out: Vec<AllocatableDevices> = resp
            .devices
            .into_iter()
            .map(|d| AllocatableDevices {
                resource_name: d.resource_name,
                device_ids: d.device_ids,
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Flattens a `List` response; containers without devices are dropped.
pub fn flatten_list(resp: pr::ListPodResourcesResponse) -> Vec<DeviceAllocation> {
    let mut out = Vec::new();
    for pod in resp.pod_resources {
        for c in pod.containers {
            for d in c.devices {
                if d.device_ids.is_empty() {
                    continue;
                }
                out.push(DeviceAllocation {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    container: c.name.clone(),
                    resource_name: d.resource_name,
                    device_ids: d.device_ids,
                });
            }
        }
    }
    out.sort();
    out
}

/// The poller's published state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodResourcesState {
    /// Allocations from the last successful `List`; `None` until the first one succeeded.
    pub allocations: Option<Vec<DeviceAllocation>>,
    /// Successful `List` calls so far.
    pub polls_ok: u64,
    /// Failed connects or calls so far.
    pub polls_failed: u64,
}

/// Handle of a running poller.
#[derive(Debug)]
pub struct PodResourcesPoller {
    state: watch::Receiver<PodResourcesState>,
    task: JoinHandle<()>,
}

impl PodResourcesPoller {
    /// The published state; `changed()` fires after every poll.
    pub fn state(&self) -> watch::Receiver<PodResourcesState> {
        self.state.clone()
    }

    /// Waits for the task to end (after cancellation).
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "PodResources poller task failed");
        }
    }
}

/// Polls `List` on the socket at `path` every `interval` until cancelled. A missing socket or a
/// failed call is logged and retried at the next tick, forever; the connection is re-dialed after
/// any failure (the kubelet re-creates the socket when it restarts).
pub fn spawn_poller(
    path: PathBuf,
    interval: Duration,
    cancel: CancellationToken,
) -> PodResourcesPoller {
    let (tx, rx) = watch::channel(PodResourcesState::default());
    let task = tokio::spawn(async move {
        let mut client: Option<PodResourcesClient> = None;
        let mut failing = false;
        loop {
            let result = async {
                if client.is_none() {
                    client = Some(PodResourcesClient::connect(&path).await?);
                }
                match client.as_mut() {
                    Some(c) => c.list().await,
                    None => Err(PodResourcesError::Timeout),
                }
            };
            let result = tokio::select! {
                () = cancel.cancelled() => break,
                r = result => r,
            };
            match result {
                Ok(list) => {
                    if failing {
                        tracing::info!(path = %path.display(), "PodResources reachable again");
                    }
                    failing = false;
                    tx.send_modify(|s| {
                        s.allocations = Some(list);
                        s.polls_ok += 1;
                    });
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(path = %path.display(), error = %e, "PodResources List failed; retrying");
                    }
                    failing = true;
                    client = None;
                    tx.send_modify(|s| s.polls_failed += 1);
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
    });
    PodResourcesPoller { state: rx, task }
}
