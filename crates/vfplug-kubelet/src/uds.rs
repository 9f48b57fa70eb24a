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
    let listener = bind_then_rename(path).map_err(bind_err)?;
    let id = SocketId::of(&std::fs::symlink_metadata(path).map_err(bind_err)?);
    Ok((listener, id))
}

/// Binds at a hidden sibling (`.NAME`) and renames it into place, so that `path` appears only
/// once the socket listens. `bind(2)` creates the file before `listen(2)` runs; a watcher that
/// dials in between (the kubelet's plugin watcher polls `plugins_registry/` and dials whatever
/// appears) gets `ECONNREFUSED`. Hidden names are skipped by that watcher, and a rename within
/// one directory is atomic. A path too long for its hidden sibling is bound directly.
fn bind_then_rename(path: &Path) -> io::Result<UnixListener> {
    let Some(name) = path.file_name() else {
        return UnixListener::bind(path);
    };
    let mut hidden_name = std::ffi::OsString::from(".");
    hidden_name.push(name);
    let hidden = path.with_file_name(hidden_name);
    // A crash between bind and rename leaves the hidden socket behind; it is ours to remove.
    match std::fs::symlink_metadata(&hidden) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(&hidden)?,
        Ok(_) => return UnixListener::bind(path),
        Err(_) => {}
    }
    let listener = match UnixListener::bind(&hidden) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return UnixListener::bind(path),
        Err(e) => return Err(e),
    };
    if let Err(e) = std::fs::rename(&hidden, path) {
        let _ = std::fs::remove_file(&hidden);
        return Err(e);
    }
    Ok(listener)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    }

    /// A watcher that dials each socket the moment its path appears (as the kubelet's plugin
    /// watcher does) must never be refused: the path shows up only once the socket listens.
    #[test]
    fn a_socket_path_appears_only_once_it_listens() {
        let dir = tempfile::tempdir().unwrap();
        // bind_fresh registers the listener with tokio's reactor.
        let rt = io_runtime();
        let _guard = rt.enter();
        const N: usize = 1000;
        let base = dir.path().to_path_buf();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let watcher = std::thread::spawn(move || {
            for i in 0..N {
                let p = base.join(format!("s{i}.sock"));
                while std::fs::symlink_metadata(&p).is_err() {
                    std::hint::spin_loop();
                }
                let r = std::os::unix::net::UnixStream::connect(&p)
                    .map(drop)
                    .map_err(|e| format!("{}: {e}", p.display()));
                done_tx.send(r).unwrap();
            }
        });
        let mut refused = Vec::new();
        for i in 0..N {
            let p = dir.path().join(format!("s{i}.sock"));
            let (listener, _) = bind_fresh(&p).unwrap();
            if let Err(e) = done_rx.recv().unwrap() {
                refused.push(e);
            }
            drop(listener);
        }
        watcher.join().unwrap();
        assert!(refused.is_empty(), "dials refused: {refused:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "hidden sockets left behind: {left:?}");
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        // bind_fresh registers the listener with tokio's reactor.
        let rt = io_runtime();
        let _guard = rt.enter();
        let p = dir.path().join("a.sock");
        // A stale socket at the path and a stale hidden sibling (a crash between bind and
        // rename) are both replaced.
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        drop(std::os::unix::net::UnixListener::bind(dir.path().join(".a.sock")).unwrap());
        let (_l, id) = bind_fresh(&p).unwrap();
        assert_eq!(socket_id(&p), Some(id));
        assert!(!dir.path().join(".a.sock").exists());
        std::os::unix::net::UnixStream::connect(&p).expect("listening");

        let f = dir.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(bind_fresh(&f), Err(UdsError::NotASocket(_))));
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }
}
