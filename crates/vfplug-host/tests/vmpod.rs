//! The host side of VM pods on a real directory tree laid out like the kubelet's, with real
//! unix sockets, and `prlimit(2)` on a real child process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use vfplug_host::prereq;
use vfplug_host::vmpod::{
    Memlock, MemlockError, MemlockLimit, PrlimitMemlock, VmPodError, VolumeWatch,
    default_trusted_owners, peer_cred, raise_memlock, resolve_qmp_socket, wait_exit,
};

const UID: &str = "0b6f2c5e-1d7a-4c8e-9f00-2a1b3c4d5e6f";
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

fn me() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Trusts root, KubeVirt's qemu and whoever runs the test (the socket's owner).
fn trusted() -> BTreeSet<u32> {
    let mut t = default_trusted_owners();
    t.insert(me());
    t
}

/// `<kubelet>/pods/<uid>/volumes/kubernetes.io~empty-dir/qmp/` with `qmp.sock` bound in it.
struct Kubelet {
    dir: tempfile::TempDir,
    _listener: Option<UnixListener>,
}

impl Kubelet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let k = Self {
            dir,
            _listener: None,
        };
        fs::create_dir_all(k.volume(EMPTY_DIR, "qmp")).unwrap();
        k
    }

    fn with_socket() -> Self {
        let mut k = Self::new();
        k._listener =
            Some(UnixListener::bind(k.volume(EMPTY_DIR, "qmp").join("qmp.sock")).unwrap());
        k
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn pod(&self) -> PathBuf {
        self.root().join("pods").join(UID)
    }

    fn volume(&self, plugin: &str, volume: &str) -> PathBuf {
        self.pod().join("volumes").join(plugin).join(volume)
    }

    fn resolve(&self, spec: &str) -> Result<vfplug_host::vmpod::QmpSocket, VmPodError> {
        resolve_qmp_socket(self.root(), UID, spec, &trusted())
    }

    /// Moves `path` to `<tmp>/elsewhere/<name>` and puts a symlink to it in its place.
    fn replace_with_symlink(&self, path: &Path) {
        let away = self.root().join("elsewhere");
        fs::create_dir_all(&away).unwrap();
        let target = away.join(path.file_name().unwrap());
        fs::rename(path, &target).unwrap();
        symlink(&target, path).unwrap();
    }
}

fn symlink_at(err: VmPodError) -> PathBuf {
    match err {
        VmPodError::Symlink { path } => path,
        other => panic!("expected a Symlink error, got {other}"),
    }
}

#[tokio::test]
async fn found_under_empty_dir_and_connectable() {
    let k = Kubelet::with_socket();
    let s = k.resolve("qmp/qmp.sock").unwrap();
    let canonical = fs::canonicalize(k.root()).unwrap();
    assert_eq!(
        s.path(),
        canonical.join(format!("pods/{UID}/volumes/{EMPTY_DIR}/qmp/qmp.sock"))
    );
    assert!(!s.path().starts_with("/proc"));
    assert_eq!(s.owner_uid(), me());
    assert_eq!(s.plugin(), EMPTY_DIR);

    // The returned path is a plain path a client can connect to...
    let plain = UnixStream::connect(s.path()).unwrap();
    drop(plain);
    // ...and connect_async() reaches the very listener that was verified, whose peer is us.
    let client = s.connect_async().unwrap();
    let listener = k._listener.as_ref().unwrap();
    let (_first, _) = listener.accept().unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let server = tokio::net::UnixStream::from_std(server).unwrap();
    for end in [&client, &server] {
        let cred = peer_cred(end).unwrap();
        assert_eq!(cred.pid, std::process::id());
        assert_eq!(cred.uid, me());
    }
}

#[test]
fn a_kubelet_dir_that_is_a_symlink_is_fine() {
    // The operator's side (above pods/<uid>) may be a symlink; the result is canonical.
    let k = Kubelet::with_socket();
    let link = tempfile::tempdir().unwrap();
    let kubelet_link = link.path().join("kubelet");
    symlink(k.root(), &kubelet_link).unwrap();
    let s = resolve_qmp_socket(&kubelet_link, UID, "qmp/qmp.sock", &trusted()).unwrap();
    assert!(s.path().starts_with(fs::canonicalize(k.root()).unwrap()));
}

#[test]
fn symlinked_socket_is_refused() {
    let k = Kubelet::with_socket();
    let sock = k.volume(EMPTY_DIR, "qmp").join("qmp.sock");
    k.replace_with_symlink(&sock);
    // The target is a real, trusted socket: only the symlink itself is wrong.
    let path = symlink_at(k.resolve("qmp/qmp.sock").unwrap_err());
    assert!(path.ends_with("qmp/qmp.sock"), "{}", path.display());
}

#[test]
fn symlinked_volume_dir_is_refused() {
    let k = Kubelet::with_socket();
    k.replace_with_symlink(&k.volume(EMPTY_DIR, "qmp"));
    let path = symlink_at(k.resolve("qmp/qmp.sock").unwrap_err());
    assert!(
        path.ends_with(format!("{EMPTY_DIR}/qmp")),
        "{}",
        path.display()
    );
}

#[test]
fn symlinked_pod_components_are_refused() {
    // Each directory between pods/ and the volume, in turn.
    for rel in ["", "/volumes", &format!("/volumes/{EMPTY_DIR}")] {
        let k = Kubelet::with_socket();
        let component = PathBuf::from(format!("{}{rel}", k.pod().display()));
        k.replace_with_symlink(&component);
        let path = symlink_at(k.resolve("qmp/qmp.sock").unwrap_err());
        assert_eq!(
            path.file_name(),
            component.file_name(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn bad_specs_and_uids_are_refused_before_touching_the_disk() {
    let k = Kubelet::with_socket();
    for spec in [
        "../qmp/qmp.sock",
        "qmp/../qmp.sock",
        "qmp/..",
        "/var/run/qmp.sock",
        "qmp/sub/qmp.sock",
        "qmp/",
        "/qmp.sock",
        "qmp.sock",
        "",
    ] {
        let err = k.resolve(spec).unwrap_err();
        assert!(matches!(err, VmPodError::BadSpec { .. }), "{spec:?}: {err}");
    }
    for uid in ["..", ".", "", "a/b", "../pods"] {
        let err = resolve_qmp_socket(k.root(), uid, "qmp/qmp.sock", &trusted()).unwrap_err();
        assert!(matches!(err, VmPodError::BadPodUid(_)), "{uid:?}: {err}");
    }
}

#[test]
fn a_regular_file_is_not_a_socket() {
    let k = Kubelet::new();
    fs::write(k.volume(EMPTY_DIR, "qmp").join("qmp.sock"), b"").unwrap();
    match k.resolve("qmp/qmp.sock").unwrap_err() {
        VmPodError::NotASocket { path, kind } => {
            assert!(path.ends_with("qmp/qmp.sock"));
            assert_eq!(kind, "regular file");
        }
        other => panic!("expected NotASocket, got {other}"),
    }
}

#[test]
fn a_hard_linked_socket_is_refused() {
    // A socket elsewhere, hard-linked into the volume: no symlink, same inode as the other.
    let k = Kubelet::new();
    let away = k.root().join("elsewhere");
    fs::create_dir_all(&away).unwrap();
    let _other = UnixListener::bind(away.join("other.sock")).unwrap();
    let sock = k.volume(EMPTY_DIR, "qmp").join("qmp.sock");
    fs::hard_link(away.join("other.sock"), &sock).unwrap();
    match k.resolve("qmp/qmp.sock").unwrap_err() {
        VmPodError::HardLinked { path, links } => {
            assert!(path.ends_with("qmp/qmp.sock"));
            assert_eq!(links, 2);
        }
        other => panic!("expected HardLinked, got {other}"),
    }
    // With the other name gone, the same inode is acceptable.
    fs::remove_file(away.join("other.sock")).unwrap();
    k.resolve("qmp/qmp.sock").unwrap();
}

#[test]
fn missing_and_ambiguous_volumes() {
    let k = Kubelet::with_socket();
    match k.resolve("other/qmp.sock").unwrap_err() {
        VmPodError::VolumeNotFound { volume, .. } => assert_eq!(volume, "other"),
        other => panic!("expected VolumeNotFound, got {other}"),
    }
    // A missing file in an existing volume is an I/O error naming the file.
    let err = k.resolve("qmp/nope.sock").unwrap_err();
    assert!(err.to_string().contains("qmp/nope.sock"), "{err}");

    fs::create_dir_all(k.volume("kubernetes.io~configmap", "qmp")).unwrap();
    match k.resolve("qmp/qmp.sock").unwrap_err() {
        VmPodError::AmbiguousVolume {
            volume, plugins, ..
        } => {
            assert_eq!(volume, "qmp");
            assert_eq!(plugins, ["kubernetes.io~configmap", EMPTY_DIR]);
        }
        other => panic!("expected AmbiguousVolume, got {other}"),
    }
}

#[test]
fn untrusted_owner_is_refused() {
    if prereq::need("untrusted_owner_is_refused", prereq::root()).is_none() {
        return;
    }
    let k = Kubelet::with_socket();
    let sock = k.volume(EMPTY_DIR, "qmp").join("qmp.sock");
    std::os::unix::fs::chown(&sock, Some(4242), Some(4242)).unwrap();
    match resolve_qmp_socket(k.root(), UID, "qmp/qmp.sock", &default_trusted_owners()) {
        Err(VmPodError::UntrustedOwner { path, uid, trusted }) => {
            assert_eq!(path.file_name().unwrap(), "qmp.sock");
            assert_eq!(uid, 4242);
            assert_eq!(trusted, BTreeSet::from([0, 107]));
        }
        other => panic!("expected UntrustedOwner, got {other:?}"),
    }
    // Trusting that uid makes it acceptable: the owner is what was refused.
    let s = resolve_qmp_socket(k.root(), UID, "qmp/qmp.sock", &BTreeSet::from([4242])).unwrap();
    assert_eq!(s.owner_uid(), 4242);
}

#[test]
fn connect_refuses_a_socket_swapped_after_resolving() {
    let k = Kubelet::with_socket();
    let s = k.resolve("qmp/qmp.sock").unwrap();
    let sock = k.volume(EMPTY_DIR, "qmp").join("qmp.sock");

    // Another socket at the same name: another inode.
    fs::remove_file(&sock).unwrap();
    let _other = UnixListener::bind(&sock).unwrap();
    match s.connect().unwrap_err() {
        VmPodError::Replaced { path } => assert_eq!(path, s.path()),
        other => panic!("expected Replaced, got {other}"),
    }

    // A symlink to the original-looking socket elsewhere.
    k.replace_with_symlink(&sock);
    symlink_at(s.connect().unwrap_err());
}

#[tokio::test]
async fn peer_cred_of_a_socketpair_is_this_process() {
    let (a, _b) = tokio::net::UnixStream::pair().unwrap();
    let c = peer_cred(&a).unwrap();
    assert_eq!(c.pid, std::process::id());
    assert_eq!(c.uid, me());
    assert_eq!(c.gid, rustix::process::getegid().as_raw());
}

#[tokio::test]
async fn peer_cred_names_the_process_at_the_other_end() {
    // A child process connects to our listener: its pid, not ours.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let Some(python) = prereq::need(
        "peer_cred_names_the_process_at_the_other_end",
        prereq::program("python3"),
    ) else {
        return;
    };
    let mut child = tokio::process::Command::new(python)
        .arg("-c")
        .arg("import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(30)")
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let cred = peer_cred(&server).unwrap();
    assert_eq!(Some(cred.pid), child.id());
    assert_ne!(cred.pid, std::process::id());
    child.kill().await.unwrap();
}

/// A child we can prlimit; killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Self {
        Self(Command::new("sleep").arg("30").spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sets its memlock directly (the test's own setup, not the code under test).
    fn set(&self, soft: Option<u64>, hard: Option<u64>) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32);
        rustix::process::prlimit(
            pid,
            rustix::process::Resource::Memlock,
            rustix::process::Rlimit {
                current: soft,
                maximum: hard,
            },
        )
        .unwrap();
    }

    /// Its memlock as `/proc/<pid>/limits` shows it, parsed here independently.
    fn read(&self) -> (Option<u64>, Option<u64>) {
        let text = fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let v: Vec<Option<u64>> = line["Max locked memory".len()..]
            .split_whitespace()
            .take(2)
            .map(|f| (f != "unlimited").then(|| f.parse().unwrap()))
            .collect();
        (v[0], v[1])
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The child's inherited hard limit (64 MiB where unlimited): the tests without
/// `CAP_SYS_RESOURCE` move its limits below this, which any owner of the process may do.
fn base(child: &Sleeper) -> u64 {
    child.read().1.unwrap_or(64 * MIB)
}

#[test]
fn prlimit_raises_a_childs_memlock_within_its_hard_limit() {
    let child = Sleeper::spawn();
    let h = base(&child);
    child.set(Some(h / 8), Some(h));
    let change = raise_memlock(child.pid(), h / 2).unwrap();
    assert_eq!(change.pid, child.pid());
    assert_eq!(
        change.old,
        MemlockLimit {
            soft: Some(h / 8),
            hard: Some(h)
        }
    );
    assert_eq!(
        change.new,
        MemlockLimit {
            soft: Some(h / 2),
            hard: Some(h)
        }
    );
    assert!(change.changed());
    assert_eq!(child.read(), (Some(h / 2), Some(h)));
}

#[test]
fn prlimit_never_lowers() {
    let child = Sleeper::spawn();
    let h = base(&child);
    let memlock = PrlimitMemlock::default();

    // Both higher: nothing changes.
    child.set(Some(h), Some(h));
    let change = memlock.raise(child.pid(), h / 4).unwrap();
    assert!(!change.changed(), "{change:?}");
    assert_eq!(child.read(), (Some(h), Some(h)));

    // Soft lower, hard higher: only the soft one moves; the hard one is not pulled down.
    child.set(Some(h / 8), Some(h));
    memlock.raise(child.pid(), h / 4).unwrap();
    assert_eq!(child.read(), (Some(h / 4), Some(h)));
}

#[test]
fn prlimit_raises_the_hard_limit_to_guest_ram() {
    let test = "prlimit_raises_the_hard_limit_to_guest_ram";
    let child = Sleeper::spawn();
    let h = base(&child);
    child.set(Some(h), Some(h));
    let want = vfplug_host::vmpod::memlock_for_guest(2 * GIB);
    let cap = prereq::capability(prereq::CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE");
    if cap.is_err() {
        // Without the capability the kernel refuses, and that is reported, limit untouched.
        let err = raise_memlock(child.pid(), want).unwrap_err();
        assert!(
            matches!(&err, MemlockError::Prlimit { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{err}"
        );
        assert_eq!(child.read(), (Some(h), Some(h)));
    }
    if let Err(why) = cap {
        // Not a prerequisite CI can install: this machine kind runs as root without
        // CAP_SYS_RESOURCE (shared/research/k8s-lab.md), so the refusal path above is what
        // runs here; the raise itself runs where the capability exists (the VM lab's L1 guest).
        prereq::unavailable_here(test, &format!("{why}; only the refusal path was checked"));
        return;
    }
    let change = raise_memlock(child.pid(), want).unwrap();
    assert_eq!(change.old, MemlockLimit::both(h));
    assert_eq!(change.new, MemlockLimit::both(3 * GIB));
    assert_eq!(child.read(), (Some(3 * GIB), Some(3 * GIB)));

    // Higher than asked (8 GiB) stays; unlimited stays unlimited.
    child.set(Some(8 * GIB), Some(8 * GIB));
    assert!(!raise_memlock(child.pid(), want).unwrap().changed());
    assert_eq!(child.read(), (Some(8 * GIB), Some(8 * GIB)));
    child.set(Some(GIB), None);
    raise_memlock(child.pid(), want).unwrap();
    assert_eq!(child.read(), (Some(3 * GIB), None));
    child.set(None, None);
    assert!(!raise_memlock(child.pid(), 64 * GIB).unwrap().changed());
    assert_eq!(child.read(), (None, None));
}

#[test]
fn prlimit_refuses_pid_zero_and_reports_a_gone_process() {
    assert!(matches!(
        raise_memlock(0, GIB),
        Err(MemlockError::BadPid(0))
    ));
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let err = raise_memlock(pid, GIB).unwrap_err();
    assert!(
        matches!(
            err,
            MemlockError::Read { .. } | MemlockError::Prlimit { .. }
        ),
        "{err}"
    );
}

#[test]
fn prlimit_puts_back_a_limit_raised_between_read_and_write() {
    // The limit as read (a fake /proc) is older than the real one: someone raised the soft
    // limit in between. The swap returns the real one, and the higher value is put back.
    let child = Sleeper::spawn();
    let h = base(&child);
    child.set(Some(h / 2), Some(h));
    let fake_proc = tempfile::tempdir().unwrap();
    let dir = fake_proc.path().join(child.pid().to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("limits"),
        format!(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max locked memory         {}              {}              bytes     \n",
            h / 8,
            h
        ),
    )
    .unwrap();
    let change = PrlimitMemlock::new(fake_proc.path().into())
        .raise(child.pid(), h / 4)
        .unwrap();
    assert_eq!(
        change.old,
        MemlockLimit {
            soft: Some(h / 2),
            hard: Some(h)
        },
        "old is what prlimit replaced, not the stale read"
    );
    assert_eq!(change.new, change.old);
    assert_eq!(child.read(), (Some(h / 2), Some(h)));

    // A limits file without the line is an error naming the file.
    fs::write(dir.join("limits"), "Max processes 1 1 processes\n").unwrap();
    let err = PrlimitMemlock::new(fake_proc.path().into())
        .raise(child.pid(), h / 4)
        .unwrap_err();
    assert!(
        matches!(&err, MemlockError::Read { path, .. } if path.ends_with("limits")),
        "{err}"
    );
}

/// The wait for a VM pod's QEMU: the watch wakes when QEMU binds its socket in the volume (and
/// not before), and reports the volume's removal; a symlinked volume is refused as by resolve.
#[tokio::test]
async fn the_volume_watch_wakes_when_the_socket_appears_and_when_the_volume_goes() {
    let k = Kubelet::new();
    let mut w = VolumeWatch::new(k.root(), UID, "qmp/qmp.sock").unwrap();
    assert_eq!(w.path(), k.volume(EMPTY_DIR, "qmp"));
    // Nothing happened yet: no wake.
    let early = tokio::time::timeout(std::time::Duration::from_millis(100), w.changed()).await;
    assert!(early.is_err(), "woke with nothing changed: {early:?}");
    let sock = k.volume(EMPTY_DIR, "qmp").join("qmp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let gone = tokio::time::timeout(std::time::Duration::from_secs(5), w.changed())
        .await
        .expect("no wake for the socket")
        .unwrap();
    assert!(!gone);
    assert!(k.resolve("qmp/qmp.sock").is_ok());

    // QEMU exits (a bound socket keeps its directory's dentry alive, and the kernel reports
    // the directory's deletion only once it is released), then the kubelet removes the volume.
    let mut w = VolumeWatch::new(k.root(), UID, "qmp/qmp.sock").unwrap();
    drop(listener);
    fs::remove_file(&sock).unwrap();
    fs::remove_dir(k.volume(EMPTY_DIR, "qmp")).unwrap();
    let mut gone = false;
    for _ in 0..3 {
        gone = tokio::time::timeout(std::time::Duration::from_secs(5), w.changed())
            .await
            .expect("no wake for the removal")
            .unwrap();
        if gone {
            break;
        }
    }
    assert!(gone, "the volume's removal was not reported");
    assert!(matches!(
        VolumeWatch::new(k.root(), UID, "qmp/qmp.sock"),
        Err(VmPodError::VolumeNotFound { .. })
    ));
}

#[tokio::test]
async fn the_volume_watch_refuses_a_symlinked_volume() {
    let k = Kubelet::new();
    k.replace_with_symlink(&k.volume(EMPTY_DIR, "qmp"));
    let e = VolumeWatch::new(k.root(), UID, "qmp/qmp.sock").unwrap_err();
    assert!(matches!(e, VmPodError::Symlink { .. }), "{e}");
}

/// QEMU's exit after its QMP connection ended: a process that exits is seen as exited (also as
/// an unreaped zombie: it runs no guest), one that keeps running is not, within the bound.
#[tokio::test]
async fn a_process_exit_is_seen_through_its_pidfd_zombies_included() {
    use std::time::Duration;
    let mut running = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = running.id();
    assert!(!wait_exit(pid, Duration::from_millis(200)).await.unwrap());
    let mut quick = Command::new("sleep").arg("0.2").spawn().unwrap();
    // Not reaped until after the wait: it is a zombie when it exits.
    assert!(
        wait_exit(quick.id(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(
        fs::read_to_string(format!("/proc/{}/stat", quick.id()))
            .unwrap()
            .contains(") Z "),
        "the child should still be an unreaped zombie"
    );
    quick.wait().unwrap();
    running.kill().unwrap();
    running.wait().unwrap();
    // Reaped: the pid is gone.
    assert!(wait_exit(pid, Duration::from_millis(200)).await.unwrap());
}
