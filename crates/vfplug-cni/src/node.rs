//! Calls to vfplugd's node API (I/O). Every call has the config's `timeoutSeconds`; a status
//! from vfplugd becomes the CNI error it carries ([`vfplug_api::cni_code_of`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;
use vfplug_api::v1::node_client::NodeClient;
use vfplug_api::{CniCode, v1};

use crate::error::CniError;

/// A connection to vfplugd.
#[derive(Debug)]
pub struct NodeApi {
    client: NodeClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
}

/// Why [`NodeApi::connect`] failed: the socket is missing, refuses, or does not answer.
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// The message, naming the socket.
    pub msg: String,
}

impl Unreachable {
    /// As the error a command prints: `code` is 11 for ADD, DEL, CHECK and GC (the runtime
    /// retries), 50 for STATUS.
    pub fn into_error(self, code: CniCode) -> CniError {
        CniError::new(code, self.msg)
    }
}

impl NodeApi {
    /// Dials vfplugd at `socket`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, Unreachable> {
        match vfplug_api::connect(socket, timeout).await {
            Ok(ch) => Ok(Self {
                client: NodeClient::new(ch),
                socket: socket.to_path_buf(),
                timeout,
            }),
            Err(e) => Err(Unreachable {
                msg: format!("{e} (is vfplugd running on this node?)"),
            }),
        }
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CniError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(status_error(what, &status)),
            Err(_) => Err(CniError::new(
                CniCode::TryAgainLater,
                format!(
                    "vfplugd at {} did not answer {what} within {:?}",
                    self.socket.display(),
                    self.timeout
                ),
            )),
        }
    }

    // No grpc-timeout on the request: tonic would enforce it on its own and report a plain
    // "cancelled" (106) instead of "try again later". The deadline is `call`'s alone; vfplugd's
    // Add and Del are idempotent per attachment, so finishing after the shim gave up is safe.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        tonic::Request::new(msg)
    }

    /// `Node.Add`.
    pub async fn add(&mut self, req: v1::AddRequest) -> Result<v1::AddResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Add", c.add(r)).await
    }

    /// `Node.Lookup`: vfplugd's answer for a repeat of a completed ADD, if this is one.
    pub async fn lookup(&mut self, req: v1::AddRequest) -> Result<v1::AddResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Lookup", c.lookup(r)).await
    }

    /// `Node.Del`.
    pub async fn del(&mut self, req: v1::DelRequest) -> Result<v1::DelResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Del", c.del(r)).await
    }

    /// `Node.Check`.
    pub async fn check(&mut self, req: v1::CheckRequest) -> Result<v1::CheckResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Check", c.check(r)).await
    }

    /// `Node.Status`.
    pub async fn status(&mut self, req: v1::StatusRequest) -> Result<v1::StatusResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Status", c.status(r)).await
    }

    /// `Node.Gc`.
    pub async fn gc(&mut self, req: v1::GcRequest) -> Result<v1::GcResponse, CniError> {
        let r = self.request(req);
        let mut c = self.client.clone();
        self.call("Gc", c.gc(r)).await
    }
}

/// The CNI error a failed call prints: vfplugd's code and details, its message.
pub fn status_error(what: &str, status: &tonic::Status) -> CniError {
    let (code, details) = vfplug_api::cni_code_of(status);
    let msg = if status.message().is_empty() {
        format!("vfplugd {what}: {}", status.code())
    } else {
        status.message().to_owned()
    };
    CniError::raw(code, msg, details)
}
