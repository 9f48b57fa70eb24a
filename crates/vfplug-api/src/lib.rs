//! vfplug's node API: the gRPC service vfplugd serves on its unix socket and the `vfplug` CNI
//! shim calls (`proto/vfplug/v1/node.proto`).
//!
//! Start with [`v1::node_client::NodeClient`] (dial it with [`connect`]) or
//! [`v1::node_server::Node`]. Errors travel as gRPC statuses carrying an [`v1::ErrorDetail`] with
//! the CNI error code the shim prints: build them with [`status`], read them with
//! [`cni_code_of`]. The codes are [`CniCode`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Generated from `proto/vfplug/v1/node.proto` (package `vfplug.v1`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("vfplug.v1");
}

/// CNI error codes: the spec's (1–99) and vfplug's own (100+). The numbers are part of the
/// stable interface (docs/node-api.md, docs/cni.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CniCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 2: unsupported field in the network configuration (the message names it).
    UnsupportedField = 2,
    /// 3: container unknown or does not exist.
    UnknownContainer = 3,
    /// 4: invalid necessary environment variables (the message names them).
    InvalidEnv = 4,
    /// 5: I/O failure.
    Io = 5,
    /// 6: failed to decode content.
    Decode = 6,
    /// 7: invalid network config.
    InvalidConfig = 7,
    /// 11: try again later (vfplugd unreachable or busy, pool empty, retries on the PF exhausted).
    TryAgainLater = 11,
    /// 50: the plugin is not available (STATUS).
    NotAvailable = 50,
    /// 51: not available, and existing containers' networking may be degraded (STATUS).
    NotAvailableDegraded = 51,
    /// 100: setting the VF through its PF failed (netlink).
    VfConfig = 100,
    /// 101: placing the VF netdev in the pod (or bringing it back) failed.
    Netdev = 101,
    /// 102: the VF is held by another attachment, quarantined or missing.
    VfBusy = 102,
    /// 103: CHECK found the attachment not as ADD left it.
    CheckFailed = 103,
    /// 104: no such VF or pool on this node, or the VF does not fit the pool's mode.
    NoSuchDevice = 104,
    /// 105: the delegated IPAM plugin failed.
    Ipam = 105,
    /// 106: vfplugd failed internally (ledger write, I/O).
    Internal = 106,
}

impl CniCode {
    /// The number printed in the CNI error's `code`.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code for a number, if it is one of these.
    pub fn from_code(code: u32) -> Option<Self> {
        use CniCode::*;
        Some(match code {
            1 => IncompatibleVersion,
            2 => UnsupportedField,
            3 => UnknownContainer,
            4 => InvalidEnv,
            5 => Io,
            6 => Decode,
            7 => InvalidConfig,
            11 => TryAgainLater,
            50 => NotAvailable,
            51 => NotAvailableDegraded,
            100 => VfConfig,
            101 => Netdev,
            102 => VfBusy,
            103 => CheckFailed,
            104 => NoSuchDevice,
            105 => Ipam,
            106 => Internal,
            _ => return None,
        })
    }

    /// The gRPC code a status carrying this CNI code uses.
    pub fn grpc_code(self) -> tonic::Code {
        use CniCode::*;
        match self {
            IncompatibleVersion | UnsupportedField | InvalidEnv | Decode | InvalidConfig => {
                tonic::Code::InvalidArgument
            }
            UnknownContainer | NoSuchDevice => tonic::Code::NotFound,
            TryAgainLater => tonic::Code::Unavailable,
            NotAvailable | NotAvailableDegraded => tonic::Code::Unavailable,
            VfBusy => tonic::Code::FailedPrecondition,
            CheckFailed => tonic::Code::FailedPrecondition,
            VfConfig | Netdev | Ipam | Io | Internal => tonic::Code::Internal,
        }
    }
}

/// An error status carrying `code` for the shim, with `msg` as the CNI error's `msg` and
/// `details` as its `details`.
pub fn status(code: CniCode, msg: impl Into<String>, details: impl Into<String>) -> tonic::Status {
    let detail = v1::ErrorDetail {
        cni_code: code.code(),
        details: details.into(),
    };
    tonic::Status::with_details(code.grpc_code(), msg, detail.encode_to_vec().into())
}

/// The CNI code and details a status carries. A status without an [`v1::ErrorDetail`] (from a
/// transport failure, or a peer that is not vfplugd) is mapped by its gRPC code: unavailable and
/// deadline exceeded are "try again later" (11), everything else is 106.
pub fn cni_code_of(status: &tonic::Status) -> (u32, String) {
    if let Ok(d) = v1::ErrorDetail::decode(status.details())
        && d.cni_code != 0
    {
        return (d.cni_code, d.details);
    }
    let code = match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => CniCode::TryAgainLater,
        tonic::Code::InvalidArgument => CniCode::InvalidConfig,
        _ => CniCode::Internal,
    };
    (code.code(), String::new())
}

/// Errors dialing the node API.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be reached in time (missing, refused, or no answer).
    #[error("cannot reach vfplugd at {path}: {reason}")]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Dials vfplugd's node API on the unix socket `path`, waiting at most `timeout` for the
/// connection. The URI is a placeholder that tonic requires; the connector ignores it.
pub async fn connect(path: &Path, timeout: Duration) -> Result<Channel, ConnectError> {
    let owned = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
    let fut = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let p = owned.clone();
        async move { UnixStream::connect(p).await.map(TokioIo::new) }
    }));
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(ConnectError::Unreachable {
            path: path.to_path_buf(),
            reason: source_chain(&e),
        }),
        Err(_) => Err(ConnectError::Unreachable {
            path: path.to_path_buf(),
            reason: format!("no connection within {timeout:?}"),
        }),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Some layers repeat their source's text in their own; say each thing once.
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_a_status() {
        for n in [
            1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100, 101, 102, 103, 104, 105, 106,
        ] {
            let c = CniCode::from_code(n).unwrap();
            assert_eq!(c.code(), n);
            let s = status(c, "m", "d");
            assert_eq!(cni_code_of(&s), (n, "d".to_string()));
        }
        assert!(CniCode::from_code(8).is_none());
    }

    #[test]
    fn plain_statuses_map_by_grpc_code() {
        assert_eq!(cni_code_of(&tonic::Status::unavailable("x")).0, 11);
        assert_eq!(cni_code_of(&tonic::Status::invalid_argument("x")).0, 7);
        assert_eq!(cni_code_of(&tonic::Status::internal("x")).0, 106);
    }
}
