//! The host side of a VM pod: finding its QEMU's QMP socket without being led astray, learning
//! QEMU's pid from that socket, and raising QEMU's `RLIMIT_MEMLOCK` before a VFIO device goes in.
//!
//! **Resolving the socket** ([`resolve_qmp_socket`]). A VM pod names its QMP socket as
//! `<volume>/<file>` ([`SocketSpec`], from the annotation [`QMP_SOCKET_ANNOTATION`] or the CNI
//! key). The kubelet keeps a pod's volumes at
//! `<kubelet>/pods/<uid>/volumes/<escaped-plugin>/<volume>/` (e.g. `kubernetes.io~empty-dir`).
//! The file inside the volume is written by the pod, so the pod controls it: a symlink there
//! could point vfplugd at any socket on the node (the container runtime's, another pod's QEMU).
//! So every component from `<uid>` down is opened relative to its parent's fd with `O_NOFOLLOW`
//! (each name is a single component, so `O_NOFOLLOW` covers the whole walk and works on every
//! kernel, unlike `openat2`, which is 5.6+), and the socket itself is opened `O_PATH|O_NOFOLLOW`
//! and checked with `fstat`: a unix socket owned by a trusted uid. `<kubelet>/pods` itself is
//! operator territory and may be a symlink (pods moved to another disk); it is canonicalized.
//!
//! Between resolving and connecting the pod can swap the file. [`QmpSocket::connect`] therefore
//! walks again, opens the socket `O_PATH|O_NOFOLLOW`, checks it is the same inode still owned by
//! the same uid, and connects through `/proc/self/fd/<n>` of that very fd, so what was checked
//! is what gets connected. [`QmpSocket::path`] is the plain path for logs and for callers that
//! accept the race.
//!
//! **QEMU's pid** ([`peer_cred`]): `SO_PEERCRED` of the connected QMP socket (the kernel's
//! answer, so the pod cannot lie about it).
//!
//! **Memlock** ([`Memlock`], [`PrlimitMemlock`], [`FakeMemlock`]): VFIO pins all guest RAM when
//! the first device is added; QEMU's `RLIMIT_MEMLOCK` must cover it first (libvirt's
//! `qemuDomainAdjustMaxMemLockHostdev`: guest RAM + 1 GiB, see [`memlock_for_guest`]).
//! A limit is only ever raised, never lowered (neither soft nor hard).

use std::collections::BTreeSet;
use std::fmt::{self, Debug};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, Stat, fstat, openat, statat};
use rustix::io::Errno;
use rustix::process::{Pid, Resource, Rlimit};
use tracing::{debug, info};

/// The pod annotation naming the QMP socket as `<volume>/<file>`.
pub const QMP_SOCKET_ANNOTATION: &str = "vfplug.io/qmp-socket";

/// The network-config key naming the QMP socket where no API server gives vfplugd the
/// annotation: per attachment as `args.cni.qmpSocket` (Multus fills it from the selection's
/// `cni-args`), or per network at the top level. The pod comes from `K8S_POD_UID` in `CNI_ARGS`.
/// The CNI side (vfplug-cni) reads it; see docs/vm-pods.md.
pub const QMP_SOCKET_CNI_KEY: &str = "qmpSocket";

/// The kubelet's default root directory.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// The `qemu` user of KubeVirt's virt-launcher image (kubevirt/kubevirt `pkg/util/util.go`:
/// `NonRootUID = 107`); non-root VMIs run QEMU, and so own its QMP socket, as this uid.
pub const KUBEVIRT_QEMU_UID: u32 = 107;

/// The owners vfplugd trusts by default: root and KubeVirt's `qemu` user.
pub fn default_trusted_owners() -> BTreeSet<u32> {
    BTreeSet::from([0, KUBEVIRT_QEMU_UID])
}

/// Why a VM pod's QMP socket could not be used, or its peer not identified. Every variant names
/// the offending input or path.
#[derive(Debug, thiserror::Error)]
pub enum VmPodError {
    /// The pod UID is not a plain UID-like name.
    #[error("pod UID {0:?} is not a plain UID (ASCII letters, digits and '-', 1 to 64 chars)")]
    BadPodUid(String),
    /// The `<volume>/<file>` spec is malformed.
    #[error("QMP socket spec {spec:?}: {reason}")]
    BadSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A component that must not be a symlink is one.
    #[error("{path} is a symlink: refused (nothing below pods/<uid> may be a symlink)")]
    Symlink {
        /// The symlink.
        path: PathBuf,
    },
    /// A component that must be a directory is something else.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The component.
        path: PathBuf,
    },
    /// No plugin directory of the pod holds the volume.
    #[error("volume {volume:?} not found in any plugin directory under {path}")]
    VolumeNotFound {
        /// The volume name.
        volume: String,
        /// The pod's `volumes` directory.
        path: PathBuf,
    },
    /// More than one plugin directory holds a volume of that name.
    #[error("volume {volume:?} is ambiguous under {path}: found in {plugins:?}")]
    AmbiguousVolume {
        /// The volume name.
        volume: String,
        /// The pod's `volumes` directory.
        path: PathBuf,
        /// The plugin directories holding it.
        plugins: Vec<String>,
    },
    /// The final entry is not a unix socket.
    #[error("{path} is not a unix socket but a {kind}")]
    NotASocket {
        /// The entry.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The socket has more than one name (a hard link to a socket elsewhere, perhaps).
    #[error("{path} has {links} hard links: refused (QEMU's socket has one name)")]
    HardLinked {
        /// The socket.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
    /// The socket's owner is not trusted.
    #[error("{path} is owned by uid {uid}, which is not a trusted owner {trusted:?}")]
    UntrustedOwner {
        /// The socket.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The trusted owners.
        trusted: BTreeSet<u32>,
    },
    /// The socket was replaced between resolving and connecting.
    #[error("{path} changed since it was resolved (another inode or owner): refused")]
    Replaced {
        /// The socket.
        path: PathBuf,
    },
    /// A system call on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `SO_PEERCRED` failed, or names no pid visible here.
    #[error("peer credentials of the QMP socket: {0}")]
    PeerCred(#[source] io::Error),
}

impl VmPodError {
    /// The pod's volume or socket is not there (yet): QEMU may simply not have started. Any
    /// other error is a refusal (symlink, wrong owner, bad spec) that waiting does not fix.
    pub fn is_missing(&self) -> bool {
        match self {
            Self::VolumeNotFound { .. } => true,
            Self::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }

    /// Nobody listens on the socket (`ECONNREFUSED`): the QEMU that created it is gone. A live
    /// QEMU keeps its QMP listener (a busy one queues connections, it does not refuse them).
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

fn io_err(op: &'static str, path: &Path, e: impl Into<io::Error>) -> VmPodError {
    VmPodError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// A pod UID as the kubelet names its directory: a UUID from the API server, an md5 hex for
/// static pods. Anything else (`.`, `..`, `/`, whitespace) is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// The UID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PodUid {
    type Err = VmPodError;

    fn from_str(s: &str) -> Result<Self, VmPodError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !s.starts_with('-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(VmPodError::BadPodUid(s.to_owned()))
        }
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `<volume>/<file>`: a volume of the pod and a file directly in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SocketSpec {
    volume: String,
    file: String,
}

impl SocketSpec {
    /// The volume name (a DNS-1123 label, as Kubernetes validates volume names).
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The file name inside the volume.
    pub fn file(&self) -> &str {
        &self.file
    }
}

impl FromStr for SocketSpec {
    type Err = VmPodError;

    fn from_str(spec: &str) -> Result<Self, VmPodError> {
        let bad = |reason| VmPodError::BadSpec {
            spec: spec.to_owned(),
            reason,
        };
        if spec.starts_with('/') {
            return Err(bad("an absolute path; expected <volume>/<file>"));
        }
        if spec.split('/').any(|c| c == "..") {
            return Err(bad("contains '..'"));
        }
        if spec.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let mut parts = spec.split('/');
        let (Some(volume), Some(file)) = (parts.next(), parts.next()) else {
            return Err(bad("expected <volume>/<file>"));
        };
        if parts.next().is_some() {
            return Err(bad(
                "more than one component after the volume; the file must sit directly in it",
            ));
        }
        if volume.is_empty() || file.is_empty() {
            return Err(bad("an empty volume or file name"));
        }
        if file == "." {
            return Err(bad("the file name is '.'"));
        }
        if !is_dns1123_label(volume) {
            return Err(bad(
                "the volume is not a valid volume name (lowercase letters, digits, '-', at most 63)",
            ));
        }
        Ok(Self {
            volume: volume.to_owned(),
            file: file.to_owned(),
        })
    }
}

impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.file)
    }
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// A QMP socket found and verified below a pod's volume directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpSocket {
    /// `<kubelet>/pods` canonicalized.
    pods_dir: PathBuf,
    uid: PodUid,
    plugin: String,
    spec: SocketSpec,
    owner: u32,
    dev: u64,
    ino: u64,
    /// Change time (s, ns): with the inode, tells a new socket from an old one whose inode
    /// number was reused.
    ctime: (i64, i64),
}

impl QmpSocket {
    /// The socket's path, built from the verified components (for logs, and for callers that
    /// accept that the pod may swap the file before they connect; [`Self::connect`] does not).
    pub fn path(&self) -> PathBuf {
        self.volume_dir().join(&self.spec.file)
    }

    /// The uid owning the socket (one of the trusted owners).
    pub fn owner_uid(&self) -> u32 {
        self.owner
    }

    /// The socket file's identity (device, inode, change time): a QEMU that starts anew binds
    /// a new socket, and even where the inode number is reused, its change time differs.
    pub fn identity(&self) -> (u64, u64, i64, i64) {
        (self.dev, self.ino, self.ctime.0, self.ctime.1)
    }

    /// The escaped plugin directory the volume was found under (e.g. `kubernetes.io~empty-dir`).
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    fn volume_dir(&self) -> PathBuf {
        self.pods_dir
            .join(self.uid.as_str())
            .join("volumes")
            .join(&self.plugin)
            .join(&self.spec.volume)
    }

    /// Connects to the socket that was verified: walks the components again without following
    /// symlinks, checks the entry is still the same socket inode with the same owner, and
    /// connects through that open file (`/proc/self/fd/<n>` of an `O_PATH` fd), so a file
    /// swapped in the meantime is refused rather than connected. Blocking; `connect(2)` on a
    /// unix socket returns at once (a listener with a full backlog: `EAGAIN`).
    pub fn connect(&self) -> Result<UnixStream, VmPodError> {
        let pods = open_dir_follow(&self.pods_dir)?;
        let volume = walk_to_volume(&pods, &self.pods_dir, &self.uid, &self.plugin, &self.spec)?;
        let (fd, st) = open_socket(&volume, &self.volume_dir(), &self.spec.file)?;
        let path = self.path();
        if st.st_uid != self.owner || st.st_dev != self.dev || st.st_ino != self.ino {
            return Err(VmPodError::Replaced { path });
        }
        let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let stream = UnixStream::connect(&via).map_err(|e| io_err("connect", &path, e))?;
        debug!(path = %path.display(), "connected to the verified QMP socket");
        Ok(stream)
    }

    /// [`Self::connect`] as a tokio stream (for `vfplug-qmp` and [`peer_cred`]). Must be called
    /// from within a tokio runtime.
    pub fn connect_async(&self) -> Result<tokio::net::UnixStream, VmPodError> {
        let path = self.path();
        let stream = self.connect()?;
        stream
            .set_nonblocking(true)
            .map_err(|e| io_err("set_nonblocking", &path, e))?;
        tokio::net::UnixStream::from_std(stream).map_err(|e| io_err("register", &path, e))
    }
}

/// Finds the QMP socket of pod `pod_uid` named by `spec` (`<volume>/<file>`) below
/// `<kubelet_dir>/pods/<uid>/volumes/<plugin>/<volume>/`, never following a symlink below
/// `pods/`, and checks it is a unix socket owned by one of `trusted` uids.
pub fn resolve_qmp_socket(
    kubelet_dir: &Path,
    pod_uid: &str,
    spec: &str,
    trusted: &BTreeSet<u32>,
) -> Result<QmpSocket, VmPodError> {
    let uid: PodUid = pod_uid.parse()?;
    let spec: SocketSpec = spec.parse()?;
    resolve(kubelet_dir, &uid, &spec, trusted)
}

/// Where the QMP socket of pod `pod_uid` named by `spec` is (or will be, once QEMU binds it):
/// the volume is found as [`resolve_qmp_socket`] finds it, and must be there; the socket need
/// not be. The same path as [`QmpSocket::path`] once it is.
pub fn qmp_socket_path(
    kubelet_dir: &Path,
    pod_uid: &str,
    spec: &str,
) -> Result<PathBuf, VmPodError> {
    let uid: PodUid = pod_uid.parse()?;
    let spec: SocketSpec = spec.parse()?;
    Ok(locate_volume(kubelet_dir, &uid, &spec)?
        .path
        .join(&spec.file))
}

/// [`resolve_qmp_socket`] on parsed inputs.
pub fn resolve(
    kubelet_dir: &Path,
    uid: &PodUid,
    spec: &SocketSpec,
    trusted: &BTreeSet<u32>,
) -> Result<QmpSocket, VmPodError> {
    let found = locate_volume(kubelet_dir, uid, spec)?;
    let (_fd, st) = open_socket(&found.fd, &found.path, &spec.file)?;
    let path = found.path.join(&spec.file);
    if !trusted.contains(&st.st_uid) {
        return Err(VmPodError::UntrustedOwner {
            path,
            uid: st.st_uid,
            trusted: trusted.clone(),
        });
    }
    debug!(path = %path.display(), owner = st.st_uid, "resolved QMP socket");
    Ok(QmpSocket {
        pods_dir: found.pods_dir,
        uid: uid.clone(),
        plugin: found.plugin,
        spec: spec.clone(),
        owner: st.st_uid,
        dev: st.st_dev,
        ino: st.st_ino,
        ctime: (st.st_ctime, i64::try_from(st.st_ctime_nsec).unwrap_or(0)),
    })
}

/// A pod volume directory found by the no-symlink walk, open.
struct Volume {
    pods_dir: PathBuf,
    plugin: String,
    fd: OwnedFd,
    path: PathBuf,
}

/// `<kubelet>/pods/<uid>/volumes/<plugin>/<volume>` of `spec`: the one plugin dir holding the
/// volume, every component below `pods/` opened without following symlinks.
fn locate_volume(
    kubelet_dir: &Path,
    uid: &PodUid,
    spec: &SocketSpec,
) -> Result<Volume, VmPodError> {
    let pods_path = kubelet_dir.join("pods");
    // The operator's own directory: symlinks allowed (and resolved once, here).
    let pods_dir =
        std::fs::canonicalize(&pods_path).map_err(|e| io_err("canonicalize", &pods_path, e))?;
    let pods = open_dir_follow(&pods_dir)?;
    let pod_path = pods_dir.join(uid.as_str());
    let pod = open_dir_nofollow(&pods, &pod_path, uid.as_str())?;
    let volumes_path = pod_path.join("volumes");
    let volumes = open_dir_nofollow(&pod, &volumes_path, "volumes")?;

    let mut found = Vec::new();
    for name in list_dir(&volumes, &volumes_path)? {
        let plugin_path = volumes_path.join(&name);
        let st = statat(&volumes, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("stat", &plugin_path, e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {}
            // The kubelet makes no symlinks here; one means tampering, and its target could
            // hold the volume, so "not found" would be the wrong answer.
            FileType::Symlink => return Err(VmPodError::Symlink { path: plugin_path }),
            _ => continue,
        }
        let plugin = open_dir_nofollow(&volumes, &plugin_path, &name)?;
        match statat(&plugin, spec.volume.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => found.push(name),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(io_err("stat", &plugin_path.join(&spec.volume), e)),
        }
    }
    let plugin = match found.len() {
        0 => {
            return Err(VmPodError::VolumeNotFound {
                volume: spec.volume.clone(),
                path: volumes_path,
            });
        }
        1 => found.remove(0),
        _ => {
            return Err(VmPodError::AmbiguousVolume {
                volume: spec.volume.clone(),
                path: volumes_path,
                plugins: found,
            });
        }
    };

    let fd = walk_to_volume(&pods, &pods_dir, uid, &plugin, spec)?;
    let path = volumes_path.join(&plugin).join(&spec.volume);
    Ok(Volume {
        pods_dir,
        plugin,
        fd,
        path,
    })
}

/// Wakes its owner when something changes in the pod volume that holds a QMP socket (an entry
/// created, renamed in, or its attributes changed; the directory itself removed): how vfplugd
/// learns, without polling, that a VM pod's QEMU may have started listening. inotify on the
/// very directory the no-symlink walk opened (through its fd), so a symlink swapped in above it
/// cannot redirect the watch; the watch only wakes, and the connect that follows checks again.
#[derive(Debug)]
pub struct VolumeWatch {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl VolumeWatch {
    /// Arms a watch on the volume of `spec` of pod `pod_uid`. Fails like
    /// [`resolve_qmp_socket`] when the volume is not there or not acceptable. Must be called
    /// from within a tokio runtime.
    pub fn new(kubelet_dir: &Path, pod_uid: &str, spec: &str) -> Result<Self, VmPodError> {
        use rustix::fs::inotify;
        let uid: PodUid = pod_uid.parse()?;
        let spec: SocketSpec = spec.parse()?;
        let volume = locate_volume(kubelet_dir, &uid, &spec)?;
        let ino = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .map_err(|e| io_err("inotify_init1", &volume.path, e))?;
        // Through /proc/self/fd: the directory the walk verified, whatever its path now holds.
        let via = PathBuf::from(format!("/proc/self/fd/{}", volume.fd.as_raw_fd()));
        let flags = inotify::WatchFlags::CREATE
            | inotify::WatchFlags::MOVED_TO
            | inotify::WatchFlags::ATTRIB
            | inotify::WatchFlags::DELETE_SELF
            | inotify::WatchFlags::MOVE_SELF
            | inotify::WatchFlags::ONLYDIR;
        inotify::add_watch(&ino, &via, flags)
            .map_err(|e| io_err("inotify_add_watch", &volume.path, e))?;
        // The safe constructor is deprecated (tokio#8587) because a `T` that does not own its fd
        // could close it while registered; an `OwnedFd` moved into the `AsyncFd` is owned by it
        // until it is dropped, which is the condition `register_with_interest` asks for, without
        // `unsafe` in this workspace (`unsafe_code = "forbid"`).
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(ino, tokio::io::Interest::READABLE)
            .map_err(|e| io_err("register inotify", &volume.path, e))?;
        Ok(Self {
            fd,
            path: volume.path,
        })
    }

    /// The watched volume directory (for logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next change (all changes queued by then are consumed at once). `Ok(true)`
    /// when the directory itself went away: nothing more will come from this watch.
    pub async fn changed(&mut self) -> Result<bool, VmPodError> {
        use rustix::fs::inotify;
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| io_err("wait on inotify", &self.path, e))?;
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            let mut reader = inotify::Reader::new(guard.get_inner(), &mut buf);
            let (mut seen, mut gone) = (false, false);
            // Drain everything queued (the reader refills from the fd until EAGAIN).
            loop {
                match reader.next() {
                    Ok(ev) => {
                        seen = true;
                        gone |= ev.events().intersects(
                            inotify::ReadFlags::DELETE_SELF
                                | inotify::ReadFlags::MOVE_SELF
                                | inotify::ReadFlags::IGNORED,
                        );
                    }
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(io_err("read inotify", &self.path, e)),
                }
            }
            guard.clear_ready();
            if seen {
                return Ok(gone);
            }
        }
    }
}

/// `<pods>/<uid>/volumes/<plugin>/<volume>`, each opened with `O_NOFOLLOW` under the last.
fn walk_to_volume(
    pods: &OwnedFd,
    pods_dir: &Path,
    uid: &PodUid,
    plugin: &str,
    spec: &SocketSpec,
) -> Result<OwnedFd, VmPodError> {
    let mut path = pods_dir.to_owned();
    let mut fd: Option<OwnedFd> = None;
    for name in [uid.as_str(), "volumes", plugin, spec.volume.as_str()] {
        path.push(name);
        let next = match &fd {
            None => open_dir_nofollow(pods, &path, name)?,
            Some(parent) => open_dir_nofollow(parent, &path, name)?,
        };
        fd = Some(next);
    }
    fd.ok_or_else(|| io_err("open", &path, Errno::NOENT))
}

fn open_dir_follow(path: &Path) -> Result<OwnedFd, VmPodError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    openat(CWD, path, flags, Mode::empty()).map_err(|e| io_err("open", path, e))
}

/// Opens the directory `name` (one component) under `parent` without following a symlink;
/// `path` is its full path, for errors.
fn open_dir_nofollow(parent: &OwnedFd, path: &Path, name: &str) -> Result<OwnedFd, VmPodError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        // A symlink gives ELOOP (or ENOTDIR with O_DIRECTORY); say which.
        Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
            match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    Err(VmPodError::Symlink {
                        path: path.to_owned(),
                    })
                }
                Ok(_) if e == Errno::NOTDIR => Err(VmPodError::NotADirectory {
                    path: path.to_owned(),
                }),
                _ => Err(io_err("open", path, e)),
            }
        }
        Err(e) => Err(io_err("open", path, e)),
    }
}

/// Opens `file` in `dir` as `O_PATH|O_NOFOLLOW` and checks it is a unix socket.
fn open_socket(dir: &OwnedFd, dir_path: &Path, file: &str) -> Result<(OwnedFd, Stat), VmPodError> {
    let path = dir_path.join(file);
    // O_PATH|O_NOFOLLOW opens a symlink itself instead of failing; fstat tells.
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = openat(dir, file, flags, Mode::empty()).map_err(|e| io_err("open", &path, e))?;
    let st = fstat(&fd).map_err(|e| io_err("stat", &path, e))?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        // A hard link is the one way to alias another socket without a symlink; QEMU's own
        // socket has exactly one name.
        FileType::Socket if st.st_nlink != 1 => {
            return Err(VmPodError::HardLinked {
                path,
                links: st.st_nlink,
            });
        }
        FileType::Socket => return Ok((fd, st)),
        FileType::Symlink => return Err(VmPodError::Symlink { path }),
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Fifo => "fifo",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "file of unknown type",
    };
    Err(VmPodError::NotASocket { path, kind })
}

fn list_dir(dir: &OwnedFd, path: &Path) -> Result<Vec<String>, VmPodError> {
    let err = |e: Errno| io_err("read_dir", path, e);
    let mut names = Vec::new();
    for entry in Dir::read_from(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        match entry.file_name().to_bytes() {
            b"." | b".." => {}
            // Kubelet plugin dirs are ASCII; a non-UTF-8 name cannot be one.
            n => {
                if let Ok(n) = std::str::from_utf8(n) {
                    names.push(n.to_owned());
                }
            }
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// The credentials of the process at the other end of a connected unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its pid (in our pid namespace).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected unix socket, through tokio's `UnixStream::peer_cred()`. Fails
/// when the peer's pid is not visible in our pid namespace (the kernel reports 0: vfplugd needs
/// `hostPID`). Not rustix's `socket_peercred`: its `Pid` is non-zero by type, and 0 is a real
/// answer here. A `std` stream: `tokio::net::UnixStream::from_std` (non-blocking) first, or
/// [`QmpSocket::connect_async`].
pub fn peer_cred(socket: &tokio::net::UnixStream) -> Result<PeerCred, VmPodError> {
    let c = socket.peer_cred().map_err(VmPodError::PeerCred)?;
    let pid = c
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            VmPodError::PeerCred(io::Error::other(format!(
                "the peer's pid ({:?}) is not visible in this pid namespace (hostPID?)",
                c.pid()
            )))
        })?;
    Ok(PeerCred {
        pid,
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// libvirt's margin over guest RAM for `RLIMIT_MEMLOCK` with a VFIO hostdev (1 GiB).
pub const MEMLOCK_MARGIN: u64 = 1 << 30;

/// Waits up to `within` for process `pid` to exit (QEMU, after its QMP connection ended):
/// `true` once it has exited (a zombie counts: it runs no guest), `false` if it still runs
/// after `within`. Woken by the kernel through a pidfd, not by polling `/proc`. A pid that does
/// not exist (any more) has exited.
pub async fn wait_exit(pid: u32, within: std::time::Duration) -> Result<bool, VmPodError> {
    use rustix::process::{PidfdFlags, pidfd_open};
    let path = PathBuf::from(format!("/proc/{pid}"));
    let Some(p) = Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else {
        return Err(io_err("pidfd_open", &path, Errno::INVAL));
    };
    let fd = match pidfd_open(p, PidfdFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(Errno::SRCH) => return Ok(true),
        Err(e) => return Err(io_err("pidfd_open", &path, e)),
    };
    // As for `VolumeWatch`: the `OwnedFd` is owned by the `AsyncFd` until it is dropped.
    #[allow(deprecated)]
    let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
        .map_err(|e| io_err("register pidfd", &path, e))?;
    // A pidfd becomes readable when its process exits.
    match tokio::time::timeout(within, fd.readable()).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(io_err("wait on pidfd", &path, e)),
        Err(_) => Ok(false),
    }
}

/// The memlock a guest with `ram_bytes` of RAM needs for VFIO: RAM + [`MEMLOCK_MARGIN`]
/// (libvirt's `qemuDomainAdjustMaxMemLockHostdev` without a vIOMMU).
pub fn memlock_for_guest(ram_bytes: u64) -> u64 {
    ram_bytes.saturating_add(MEMLOCK_MARGIN)
}

/// An `RLIMIT_MEMLOCK` value pair; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockLimit {
    /// The soft limit (what the kernel enforces).
    pub soft: Option<u64>,
    /// The hard limit (the ceiling for the soft one).
    pub hard: Option<u64>,
}

impl MemlockLimit {
    /// Both limits at `bytes`.
    pub fn both(bytes: u64) -> Self {
        Self {
            soft: Some(bytes),
            hard: Some(bytes),
        }
    }

    /// This limit raised so both values cover `at_least`, never lowered.
    pub fn raised_to(self, at_least: u64) -> Self {
        let up = |v: Option<u64>| v.map(|v| v.max(at_least));
        Self {
            soft: up(self.soft),
            hard: up(self.hard),
        }
    }

    /// The larger of the two, per value (`None` = unlimited wins).
    fn max(self, other: Self) -> Self {
        let m = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.max(b));
        Self {
            soft: m(self.soft, other.soft),
            hard: m(self.hard, other.hard),
        }
    }
}

impl From<Rlimit> for MemlockLimit {
    fn from(r: Rlimit) -> Self {
        Self {
            soft: r.current,
            hard: r.maximum,
        }
    }
}

impl From<MemlockLimit> for Rlimit {
    fn from(l: MemlockLimit) -> Self {
        Rlimit {
            current: l.soft,
            maximum: l.hard,
        }
    }
}

/// What [`Memlock::raise`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockChange {
    /// The process.
    pub pid: u32,
    /// Its limit before.
    pub old: MemlockLimit,
    /// Its limit after (equal to `old` when it already covered the request).
    pub new: MemlockLimit,
}

impl MemlockChange {
    /// Whether the limit was changed.
    pub fn changed(&self) -> bool {
        self.old != self.new
    }
}

/// Why a memlock limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum MemlockError {
    /// Pid 0 or out of range: `prlimit` would act on vfplugd itself.
    #[error("invalid pid {0} for prlimit")]
    BadPid(u32),
    /// Reading the current limit failed.
    #[error("reading RLIMIT_MEMLOCK of pid {pid} from {path}: {source}")]
    Read {
        /// The process.
        pid: u32,
        /// The `limits` file.
        path: PathBuf,
        /// The OS error, or what could not be parsed.
        #[source]
        source: io::Error,
    },
    /// `prlimit(2)` failed (`ESRCH`: the process is gone; `EPERM`: not allowed).
    #[error("prlimit(RLIMIT_MEMLOCK) on pid {pid}: {source}")]
    Prlimit {
        /// The process.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Raises another process's `RLIMIT_MEMLOCK`.
pub trait Memlock: Send + Sync + Debug {
    /// Raises `pid`'s soft and hard `RLIMIT_MEMLOCK` to at least `at_least` bytes; a limit
    /// already higher (or unlimited) stays as it is. Returns the limits before and after.
    fn raise(&self, pid: u32, at_least: u64) -> Result<MemlockChange, MemlockError>;
}

/// [`Memlock`] for real: reads the limit from `<proc>/<pid>/limits` (`prlimit(2)` cannot read
/// another process's limit through rustix without setting it) and sets it with `prlimit(2)`.
/// Needs `CAP_SYS_RESOURCE` to raise a hard limit.
#[derive(Clone, Debug)]
pub struct PrlimitMemlock {
    proc_root: PathBuf,
}

impl Default for PrlimitMemlock {
    fn default() -> Self {
        Self::new("/proc".into())
    }
}

impl PrlimitMemlock {
    /// With `proc_root` standing for `/proc` (used to read the current limit).
    pub fn new(proc_root: PathBuf) -> Self {
        Self { proc_root }
    }

    /// `pid`'s current `RLIMIT_MEMLOCK`.
    pub fn read(&self, pid: u32) -> Result<MemlockLimit, MemlockError> {
        let path = self.proc_root.join(pid.to_string()).join("limits");
        let read_err = |source| MemlockError::Read {
            pid,
            path: path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&path).map_err(read_err)?;
        parse_memlock(&text).ok_or_else(|| {
            read_err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no parsable \"Max locked memory\" line",
            ))
        })
    }
}

/// The `Max locked memory` line of a `/proc/<pid>/limits` file.
pub fn parse_memlock(limits: &str) -> Option<MemlockLimit> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let mut fields = line
        .trim_start_matches("Max locked memory")
        .split_whitespace();
    let value = |f: Option<&str>| match f? {
        "unlimited" => Some(None),
        n => n.parse::<u64>().ok().map(Some),
    };
    let soft = value(fields.next())?;
    let hard = value(fields.next())?;
    Some(MemlockLimit { soft, hard })
}

impl Memlock for PrlimitMemlock {
    fn raise(&self, pid: u32, at_least: u64) -> Result<MemlockChange, MemlockError> {
        let raw = i32::try_from(pid).map_err(|_| MemlockError::BadPid(pid))?;
        let target = Pid::from_raw(raw).ok_or(MemlockError::BadPid(pid))?;
        let old = self.read(pid)?;
        let want = old.raised_to(at_least);
        if want == old {
            debug!(
                pid,
                ?old,
                at_least,
                "RLIMIT_MEMLOCK already covers the request"
            );
            return Ok(MemlockChange { pid, old, new: old });
        }
        let set = |l: MemlockLimit| {
            rustix::process::prlimit(Some(target), Resource::Memlock, l.into())
                .map(MemlockLimit::from)
                .map_err(|e| MemlockError::Prlimit {
                    pid,
                    source: e.into(),
                })
        };
        // prlimit swaps atomically and returns what it replaced: if someone raised the limit
        // between our read and this write, put the higher of the two back.
        let replaced = set(want)?;
        let mut new = want;
        if replaced != old {
            let merged = want.max(replaced);
            if merged != want {
                set(merged)?;
                new = merged;
            }
        }
        info!(pid, ?replaced, ?new, "raised QEMU's RLIMIT_MEMLOCK");
        Ok(MemlockChange {
            pid,
            old: replaced,
            new,
        })
    }
}

/// Raises `pid`'s `RLIMIT_MEMLOCK` to at least `at_least_bytes` with [`PrlimitMemlock`].
pub fn raise_memlock(pid: u32, at_least_bytes: u64) -> Result<MemlockChange, MemlockError> {
    PrlimitMemlock::default().raise(pid, at_least_bytes)
}

#[derive(Debug, Default)]
struct FakeMemlockState {
    limits: std::collections::BTreeMap<u32, MemlockLimit>,
    calls: Vec<(u32, u64)>,
    failing: BTreeSet<u32>,
}

/// In-memory [`Memlock`] for tests of the attach saga: knows some pids' limits, records calls,
/// applies the same never-lower rule.
#[derive(Debug, Default)]
pub struct FakeMemlock {
    state: Mutex<FakeMemlockState>,
}

impl FakeMemlock {
    /// Knows the given processes and their limits; any other pid is "gone" (`ESRCH`).
    pub fn new(processes: impl IntoIterator<Item = (u32, MemlockLimit)>) -> Self {
        Self {
            state: Mutex::new(FakeMemlockState {
                limits: processes.into_iter().collect(),
                ..FakeMemlockState::default()
            }),
        }
    }

    /// Makes raises on `pid` fail with `EPERM` (`fail = false` lifts it).
    pub fn fail(&self, pid: u32, fail: bool) {
        let mut st = self.lock();
        if fail {
            st.failing.insert(pid);
        } else {
            st.failing.remove(&pid);
        }
    }

    /// The calls made so far: `(pid, at_least)`.
    pub fn calls(&self) -> Vec<(u32, u64)> {
        self.lock().calls.clone()
    }

    /// `pid`'s current limit.
    pub fn limit(&self, pid: u32) -> Option<MemlockLimit> {
        self.lock().limits.get(&pid).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeMemlockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Memlock for FakeMemlock {
    fn raise(&self, pid: u32, at_least: u64) -> Result<MemlockChange, MemlockError> {
        let mut st = self.lock();
        st.calls.push((pid, at_least));
        if pid == 0 {
            return Err(MemlockError::BadPid(pid));
        }
        let prlimit_err = |e: Errno| MemlockError::Prlimit {
            pid,
            source: e.into(),
        };
        if st.failing.contains(&pid) {
            return Err(prlimit_err(Errno::PERM));
        }
        let slot = st.limits.get_mut(&pid).ok_or(prlimit_err(Errno::SRCH))?;
        let old = *slot;
        let new = old.raised_to(at_least);
        *slot = new;
        Ok(MemlockChange { pid, old, new })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_refuse() {
        let s: SocketSpec = "qmp/qmp.sock".parse().unwrap();
        assert_eq!((s.volume(), s.file()), ("qmp", "qmp.sock"));
        for bad in [
            "",
            "qmp",
            "qmp/",
            "/qmp.sock",
            "/abs/qmp.sock",
            "../qmp/x",
            "qmp/..",
            "qmp/.",
            "qmp/a/b",
            "Qmp/x",
            "-q/x",
            "q_m/x",
            "qmp//x",
        ] {
            assert!(
                matches!(bad.parse::<SocketSpec>(), Err(VmPodError::BadSpec { .. })),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn pod_uids_are_plain() {
        for ok in [
            "0b6f2c5e-1d7a-4c8e-9f00-2a1b3c4d5e6f",
            "d41d8cd98f00b204e9800998ecf8427e",
        ] {
            assert!(ok.parse::<PodUid>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "-x", "a b", "a.b", &"a".repeat(65)] {
            assert!(
                matches!(bad.parse::<PodUid>(), Err(VmPodError::BadPodUid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_only_go_up() {
        let l = MemlockLimit {
            soft: Some(64 << 20),
            hard: Some(8 << 30),
        };
        assert_eq!(
            l.raised_to(2 << 30),
            MemlockLimit {
                soft: Some(2 << 30),
                hard: Some(8 << 30)
            }
        );
        let unl = MemlockLimit {
            soft: None,
            hard: None,
        };
        assert_eq!(unl.raised_to(1 << 40), unl);
        assert_eq!(memlock_for_guest(2 << 30), 3 << 30);
    }

    #[test]
    fn parses_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max locked memory         8388608              unlimited            bytes     \n";
        assert_eq!(
            parse_memlock(text),
            Some(MemlockLimit {
                soft: Some(8 << 20),
                hard: None
            })
        );
        assert_eq!(parse_memlock("Max locked memory  x y bytes"), None);
    }

    #[test]
    fn fake_records_and_never_lowers() {
        let fake = FakeMemlock::new([(10, MemlockLimit::both(4 << 30))]);
        let c = fake.raise(10, 1 << 30).unwrap();
        assert!(!c.changed());
        let c = fake.raise(10, 5 << 30).unwrap();
        assert_eq!(c.new, MemlockLimit::both(5 << 30));
        assert!(fake.raise(11, 1).is_err());
        fake.fail(10, true);
        assert!(fake.raise(10, 6 << 30).is_err());
        assert_eq!(
            fake.calls(),
            vec![(10, 1 << 30), (10, 5 << 30), (11, 1), (10, 6 << 30)]
        );
        assert_eq!(fake.limit(10), Some(MemlockLimit::both(5 << 30)));
    }
}
