//! gRPC over unix sockets: binding a listener (removing a stale socket first) and dialing a
//! socket path with tonic. The kubelet speaks gRPC only over unix sockets.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// Errors of the unix-socket helpers.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// The path exists and is not a socket; we refuse to delete it.
    #[error("{0} exists and is not a unix socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// Binding or removing the socket failed.
    #[error("bind {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Dialing the socket failed.
    #[error("connect {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: tonic::transport::Error,
    },
}

/// Identity of one socket file: inode plus change time, because a file system may hand a
/// re-created file the inode number of the one just deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl SocketId {
    fn of(md: &std::fs::Metadata) -> Self {
        Self {
            ino: md.ino(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

/// Binds a unix listener at `path`, first removing a stale socket left by an earlier run (a
/// bind on an existing path fails with `EADDRINUSE` even when nobody listens). Creates the parent
/// directory if needed. Returns the listener and the identity of the new socket file, which the
/// caller watches to notice the kubelet deleting (or someone replacing) the socket.
pub fn bind_fresh(path: &Path) -> Result<(UnixListener, SocketId), UdsError> {
    let bind_err = |source| UdsError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(bind_err)?,
        Ok(_) => return Err(UdsError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let id = SocketId::of(&std::fs::symlink_metadata(path).map_err(bind_err)?);
    Ok((listener, id))
}

/// The identity of the socket file at `path`, or `None` if there is none (or it is not a socket).
pub fn socket_id(path: &Path) -> Option<SocketId> {
    let md = std::fs::symlink_metadata(path).ok()?;
    md.file_type().is_socket().then(|| SocketId::of(&md))
}

/// Removes the socket at `path` if it is still the one with identity `id` (never somebody
/// else's newer socket at the same path).
pub fn remove_if_ours(path: &Path, id: SocketId) {
    if socket_id(path) == Some(id)
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::debug!(path = %path.display(), error = %e, "removing socket failed");
    }
}

/// Dials a gRPC server listening on the unix socket `path`. The URI is a placeholder (tonic needs
/// one); the connector ignores it. The authority is "localhost", as the kubelet uses.
pub async fn connect(path: &Path) -> Result<Channel, UdsError> {
    let owned = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://localhost");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| UdsError::Connect {
            path: path.to_path_buf(),
            source,
        })
}
