//! Discovery of SR-IOV PFs and VFs from sysfs.
//!
//! The walk is: list `bus/pci/devices`, keep the devices that have `sriov_totalvfs` (PFs), read
//! each PF's attributes and netdev once, then follow its `virtfnN` links to the VFs. Everything
//! a VF inherits (PF address, PF netdev, link type) is taken from the PF, so a VF bound to
//! `vfio-pci` or whose netdev was moved into a pod's network namespace is still complete.
//!
//! Speed: each attribute is one `open`+`read` into a stack buffer (no `stat`, no
//! `canonicalize`), and the VF index comes from the `virtfnN` name we already listed (SRIOV-DP
//! rescans all `virtfn*` links per VF, which is O(n²)).
//!
//! Races: sysfs changes under our feet (a `sriov_numvfs` write removes VFs, an unbind removes a
//! `driver` link and the netdevs). A VF that vanishes mid-scan is skipped with a debug log; a PF
//! whose mandatory attributes cannot be read is skipped with a warning. Only an unreadable
//! `bus/pci/devices` fails the whole scan.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use rustix::fd::OwnedFd;
use rustix::fs::{CWD, Dir, Mode, OFlags, openat, readlinkat_raw};
use tracing::{debug, warn};
use vfplug_core::{Inventory, LinkType, PciAddress, PfInfo, VfInfo};

use crate::HostError;

/// Reads an [`Inventory`] from a sysfs tree.
#[derive(Clone, Debug)]
pub struct SysfsInventory {
    root: PathBuf,
    threads: usize,
}

impl SysfsInventory {
    /// `root` stands for `/sys` (a fake tree in tests).
    /// Large inventories are read with up to `available_parallelism` (at most 8) threads.
    pub fn new(root: PathBuf) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self { root, threads }
    }

    /// Sets the maximum number of reader threads (1: scan on the calling thread only).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The sysfs root this reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The netdev names a PCI function has in the reader's netns right now (`net/` of the
    /// device), sorted. Empty when it has none (vfio-pci, or moved to another netns), or when the
    /// device is gone.
    pub fn netdevs_of(&self, pci: vfplug_core::PciAddress) -> Vec<String> {
        let dir = self
            .root
            .join("bus/pci/devices")
            .join(pci.to_string())
            .join("net");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Scans all SR-IOV PFs and their VFs.
    ///
    /// Fails only when `bus/pci/devices` cannot be listed; individual broken PFs and vanished
    /// VFs are skipped (see the module docs).
    pub fn scan(&self) -> Result<Inventory, HostError> {
        let devices = self.root.join("bus/pci/devices");
        let entries = fs::read_dir(&devices).map_err(|source| HostError::NotSysfs {
            path: devices.clone(),
            source,
        })?;
        let mut addrs = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    debug!(path = %devices.display(), error = %e, "read_dir entry failed; skipping");
                    continue;
                }
            };
            let name = entry.file_name();
            match name.to_str().and_then(|n| n.parse::<PciAddress>().ok()) {
                Some(pci) => addrs.push(pci),
                None => debug!(name = ?name, "not a PCI address under bus/pci/devices; skipping"),
            }
        }
        // In PCI order a PF comes before its VFs (VF routing ID = PF's + offset + i * stride,
        // offset >= 1), so VFs are already known when we reach them and need no PF probe:
        // that saves one failed open per VF.
        addrs.sort_unstable();
        let mut known_vfs: HashSet<PciAddress> = HashSet::new();
        let mut jobs = Vec::new();
        for pci in addrs {
            if known_vfs.contains(&pci) {
                continue;
            }
            let link = devices.join(pci.to_string());
            // Cheapest PF test: one open of `sriov_totalvfs`; NotFound means "not a PF".
            let total = match read_u32(&link.join("sriov_totalvfs")) {
                Ok(n) => n,
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    warn!(pf = %pci, error = %e, "unreadable sriov_totalvfs; skipping PF");
                    continue;
                }
            };
            match read_pf(pci, &link, total) {
                Ok(Some(job)) => {
                    known_vfs.extend(
                        job.virtfns
                            .iter()
                            .filter_map(|(_, t)| vf_name(t)?.parse::<PciAddress>().ok()),
                    );
                    jobs.push(job);
                }
                Ok(None) => {}
                Err(e) if e.is_not_found() => {
                    debug!(pf = %pci, error = %e, "PF vanished during scan; skipping")
                }
                Err(e) => warn!(pf = %pci, error = %e, "broken PF; skipping"),
            }
        }

        // The VFs are the bulk of the work (about ten syscalls each, mostly path lookups), and
        // independent: spread them over a few threads when there are many.
        let work: Vec<(&PfJob, u32, &Path)> = jobs
            .iter()
            .flat_map(|j| j.virtfns.iter().map(move |(i, t)| (j, *i, t.as_path())))
            .collect();
        let threads = self.threads.min(work.len() / VFS_PER_THREAD).max(1);
        let vfs: Vec<VfInfo> = if threads == 1 {
            read_vfs(&work)
        } else {
            let chunk = work.len().div_ceil(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = work
                    .chunks(chunk)
                    .map(|c| s.spawn(move || read_vfs(c)))
                    .collect();
                let mut all = Vec::with_capacity(work.len());
                for h in handles {
                    // A panic in a reader is a bug: let it propagate, never lose VFs silently.
                    all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                all
            })
        };
        Ok(Inventory {
            vfs: vfs.into_iter().map(|v| (v.pci, v)).collect(),
            pfs: jobs.into_iter().map(|j| (j.pf.pci, j.pf)).collect(),
        })
    }
}

/// Below this many VFs per thread, threads cost more than they save.
const VFS_PER_THREAD: usize = 256;

/// A PF read, with what its VFs need.
#[derive(Debug)]
struct PfJob {
    pf: PfInfo,
    /// (vendor, device) for all VFs, from `sriov_vf_device`; `None` on older kernels.
    ids: Option<(String, String)>,
    dir: PathBuf,
    parent: DirFd,
    virtfns: Vec<(u32, PathBuf)>,
}

/// Reads VFs, logging and skipping those that vanished or are unreadable.
fn read_vfs(work: &[(&PfJob, u32, &Path)]) -> Vec<VfInfo> {
    let mut out = Vec::with_capacity(work.len());
    for (job, index, target) in work {
        let pf = job.pf.pci;
        match scan_vf(
            &job.pf,
            job.ids.as_ref(),
            *index,
            &job.dir,
            &job.parent,
            target,
        ) {
            Ok(vf) => out.push(vf),
            Err(e) if e.is_not_found() => {
                debug!(%pf, index, error = %e, "VF vanished during scan; skipping")
            }
            Err(e) => warn!(%pf, index, error = %e, "unreadable VF; skipping"),
        }
    }
    out
}

pub(crate) fn vf_name(target: &Path) -> Option<&str> {
    target.file_name()?.to_str()
}

/// Reads one PF and lists its `virtfnN` links. `Ok(None)`: not an SR-IOV PF after all.
fn read_pf(pci: PciAddress, link: &Path, total_vfs: u32) -> Result<Option<PfJob>, HostError> {
    // Resolve `bus/pci/devices/<bdf>` once to the real directory, so that every VF path
    // below is a plain path (no symlink walk per attribute). The link target is relative
    // (`../../../devices/...`) and `bus/pci/devices` is a real directory, so a lexical
    // join is exact.
    let dir = resolve_link(link)?;
    let num_vfs = read_u32(&dir.join("sriov_numvfs"))?;
    let vendor = read_hex_id(&dir.join("vendor"))?;
    let device = read_hex_id(&dir.join("device"))?;
    let driver = read_link_name(&dir.join("driver"))?;
    let numa_node = read_numa(&dir.join("numa_node"))?;
    let netdev = list_names(&dir.join("net"))?.into_iter().next();
    let (link_type, carrier) = match &netdev {
        Some(ifname) => {
            let net = dir.join("net").join(ifname);
            let link_type = match read_u32(&net.join("type")) {
                Ok(n) => LinkType::from_arphrd(n),
                Err(e) => {
                    debug!(pf = %pci, error = %e, "no link type; assuming other");
                    LinkType::Other
                }
            };
            (link_type, read_carrier(&net.join("carrier")))
        }
        None => (LinkType::Other, None),
    };

    // The kernel gives every VF the PF's vendor and the SR-IOV capability's VF device ID
    // (`sriov_vf_device`, Linux >= 5.8), so one read here saves two per VF. Older kernels:
    // read each VF's own files.
    let ids = match read_hex_id(&dir.join("sriov_vf_device")) {
        Ok(d) => Some((vendor.clone(), d)),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };
    let virtfns = list_virtfns(&dir)?;
    if total_vfs == 0 && virtfns.is_empty() {
        debug!(pf = %pci, "sriov_totalvfs is 0; not an SR-IOV PF");
        return Ok(None);
    }
    let pf = PfInfo {
        pci,
        netdev,
        vendor,
        device,
        driver,
        total_vfs,
        num_vfs,
        numa_node,
        link_type,
        carrier,
    };
    let parent = DirFd::open(dir.parent().unwrap_or(&dir).to_path_buf())?;
    Ok(Some(PfJob {
        pf,
        ids,
        dir,
        parent,
        virtfns,
    }))
}

/// Reads one VF. `target` is the `virtfnN` link target (`../0000:3b:01.0`).
fn scan_vf(
    pf: &PfInfo,
    ids: Option<&(String, String)>,
    index: u32,
    pf_dir: &Path,
    parent: &DirFd,
    target: &Path,
) -> Result<VfInfo, HostError> {
    let name = vf_name(target)
        .ok_or_else(|| parse_err(pf_dir, target.display().to_string(), "virtfn target"))?;
    let pci: PciAddress = name.parse().map_err(|_| {
        parse_err(
            pf_dir,
            name.to_owned(),
            "virtfn target is not a PCI address",
        )
    })?;
    // Kernel layout: VFs are siblings of their PF (`virtfnN -> ../<vf>`), so open the VF
    // directory relative to the already open parent; anything else is followed literally.
    // Opening it is also the existence check: NotFound here means the VF just vanished.
    let dir = if target.parent() == Some(Path::new("..")) {
        parent.sub(name)?
    } else {
        DirFd::open(normalize(&pf_dir.join(target)))?
    };
    let numa_node = match dir.read_small("numa_node") {
        Ok(s) => parse_numa(&dir.path.join("numa_node"), s)?.or(pf.numa_node),
        // Kernels without CONFIG_NUMA have no numa_node.
        Err(e) if e.is_not_found() => pf.numa_node,
        Err(e) => return Err(e),
    };
    let (vendor, device) = match ids {
        Some((v, d)) => (v.clone(), d.clone()),
        None => (
            parse_hex_id(&dir.path.join("vendor"), dir.read_small("vendor")?)?,
            parse_hex_id(&dir.path.join("device"), dir.read_small("device")?)?,
        ),
    };
    let driver = dir.link_name("driver")?;
    let iommu_group = match dir.link_name("iommu_group")? {
        Some(g) => Some(g.parse::<u32>().map_err(|_| {
            parse_err(
                &dir.path.join("iommu_group"),
                g.clone(),
                "iommu group number",
            )
        })?),
        None => None,
    };
    // Drivers that never create netdevs (nor RDMA devices): skip the directory listings (3-4
    // syscalls per VF each).
    let (netdevs, rdma_devices) = match driver.as_deref() {
        None | Some("vfio-pci" | "uio_pci_generic" | "igb_uio" | "pci-stub") => {
            (Vec::new(), Vec::new())
        }
        // RDMA devices as sriov-network-device-plugin finds them: rdmamap
        // GetRdmaDevicesForPcidev lists `<bdf>/infiniband/`.
        Some(_) => (dir.list("net")?, dir.list("infiniband")?),
    };
    Ok(VfInfo {
        pci,
        pf: pf.pci,
        pf_netdev: pf.netdev.clone(),
        vf_index: index,
        vendor,
        device,
        driver,
        iommu_group,
        numa_node,
        netdevs,
        link_type: pf.link_type,
        rdma_devices,
    })
}

/// The `virtfnN` entries of a PF directory, as (N, link target), sorted by N.
pub(crate) fn list_virtfns(pf_dir: &Path) -> Result<Vec<(u32, PathBuf)>, HostError> {
    let entries = fs::read_dir(pf_dir).map_err(|e| HostError::io("read_dir", pf_dir, e))?;
    let dir = DirFd::open(pf_dir.to_path_buf())?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HostError::io("read_dir", pf_dir, e))?;
        let name = entry.file_name();
        let Some((name, index)) = name
            .to_str()
            .and_then(|n| Some((n, n.strip_prefix("virtfn")?.parse::<u32>().ok()?)))
        else {
            continue;
        };
        match dir.link_target(name)? {
            Some(target) => out.push((index, target)),
            // The VF was removed between read_dir and readlink.
            None => debug!(pf = %pf_dir.display(), name, "virtfn link vanished"),
        }
    }
    out.sort_unstable_by_key(|(i, _)| *i);
    Ok(out)
}

/// Follows one symlink level and normalizes the result lexically.
fn resolve_link(link: &Path) -> Result<PathBuf, HostError> {
    match fs::read_link(link) {
        Ok(target) if target.is_absolute() => Ok(target),
        Ok(target) => Ok(normalize(
            &link.parent().unwrap_or(Path::new("/")).join(target),
        )),
        // Not a symlink: already the directory.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(link.to_path_buf()),
        Err(e) => Err(HostError::io("readlink", link, e)),
    }
}

/// Removes `.` and `..` lexically. Only correct when no component before a `..` is a symlink,
/// which holds for the sysfs paths we build (`<root>/bus/pci/devices/..`, `<pf dir>/..`).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Reads a small sysfs attribute (they are at most a page; ours are a few bytes) into a stack
/// buffer and returns it trimmed. One open, one or two reads, no stat.
pub(crate) fn read_small(path: &Path) -> Result<String, HostError> {
    let mut file = File::open(path).map_err(|e| HostError::io("read", path, e))?;
    let mut buf = [0u8; 256];
    // One read: sysfs returns a whole attribute on the first read at offset 0, and a regular
    // file (fixtures) this small is returned whole as well. Saves a syscall per attribute.
    let len = file
        .read(&mut buf)
        .map_err(|e| HostError::io("read", path, e))?;
    if len == buf.len() {
        return Err(parse_err(
            path,
            String::from_utf8_lossy(&buf).into_owned(),
            "too long",
        ));
    }
    let s = std::str::from_utf8(&buf[..len]).map_err(|_| {
        parse_err(
            path,
            String::from_utf8_lossy(&buf[..len]).into_owned(),
            "utf-8",
        )
    })?;
    Ok(s.trim().to_owned())
}

fn read_u32(path: &Path) -> Result<u32, HostError> {
    let s = read_small(path)?;
    s.parse()
        .map_err(|_| parse_err(path, s, "unsigned integer"))
}

/// `numa_node`: `-1` (no affinity) becomes `None`.
fn read_numa(path: &Path) -> Result<Option<u32>, HostError> {
    parse_numa(path, read_small(path)?)
}

fn parse_numa(path: &Path, s: String) -> Result<Option<u32>, HostError> {
    match s.parse::<i64>() {
        Ok(n) if n < 0 => Ok(None),
        Ok(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| parse_err(path, s, "NUMA node")),
        Err(_) => Err(parse_err(path, s, "NUMA node")),
    }
}

/// `vendor`/`device` hold `0x8086`; the core types want `8086`.
fn read_hex_id(path: &Path) -> Result<String, HostError> {
    parse_hex_id(path, read_small(path)?)
}

fn parse_hex_id(path: &Path, s: String) -> Result<String, HostError> {
    let id = s.strip_prefix("0x").unwrap_or(&s);
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(parse_err(path, s, "hex ID like 0x8086"));
    }
    Ok(id.to_ascii_lowercase())
}

/// `carrier` reads `1`/`0`; the kernel answers EINVAL while the interface is down, which means
/// no carrier as far as a pool is concerned.
pub(crate) fn read_carrier(path: &Path) -> Option<bool> {
    match read_small(path) {
        Ok(s) if s == "1" => Some(true),
        Ok(s) if s == "0" => Some(false),
        Err(HostError::Io { source, .. }) if source.raw_os_error() == Some(22) => Some(false),
        Ok(_) | Err(_) => None,
    }
}

/// The file name of a symlink's target (`driver`, `iommu_group`), `None` if there is no link.
pub(crate) fn read_link_name(path: &Path) -> Result<Option<String>, HostError> {
    match fs::read_link(path) {
        Ok(target) => target
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| Some(n.to_owned()))
            .ok_or_else(|| parse_err(path, target.display().to_string(), "link target name")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::io("readlink", path, e)),
    }
}

/// Sorted entry names of a directory; a missing directory is empty (no netdevs).
fn list_names(dir: &Path) -> Result<Vec<String>, HostError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostError::io("read_dir", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HostError::io("read_dir", dir, e))?;
        if let Some(n) = entry.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// An open directory for `*at` calls. Attributes below it are found with a one-component
/// lookup instead of a walk of the whole path from the root each time; path lookup was the
/// top cost of a scan in the profile (`__d_lookup_rcu`, `link_path_walk`).
#[derive(Debug)]
pub(crate) struct DirFd {
    fd: OwnedFd,
    /// For error messages only.
    path: PathBuf,
}

impl DirFd {
    const DIR: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

    pub(crate) fn open(path: PathBuf) -> Result<Self, HostError> {
        match openat(CWD, &path, Self::DIR, Mode::empty()) {
            Ok(fd) => Ok(Self { fd, path }),
            Err(e) => Err(HostError::io("open", path, e.into())),
        }
    }

    pub(crate) fn sub(&self, name: &str) -> Result<Self, HostError> {
        match openat(&self.fd, name, Self::DIR, Mode::empty()) {
            Ok(fd) => Ok(Self {
                fd,
                path: self.path.join(name),
            }),
            Err(e) => Err(HostError::io("open", self.path.join(name), e.into())),
        }
    }

    /// Like [`read_small`], relative to this directory.
    fn read_small(&self, name: &str) -> Result<String, HostError> {
        let err = |op, e: rustix::io::Errno| HostError::io(op, self.path.join(name), e.into());
        let fd = openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("read", e))?;
        let mut buf = [0u8; 256];
        let len = rustix::io::read(&fd, &mut buf).map_err(|e| err("read", e))?;
        let path = || self.path.join(name);
        if len == buf.len() {
            return Err(parse_err(
                &path(),
                String::from_utf8_lossy(&buf).into_owned(),
                "too long",
            ));
        }
        let s = std::str::from_utf8(&buf[..len]).map_err(|_| {
            parse_err(
                &path(),
                String::from_utf8_lossy(&buf[..len]).into_owned(),
                "utf-8",
            )
        })?;
        Ok(s.trim().to_owned())
    }

    /// A symlink's target, `None` if there is no such link.
    fn link_target(&self, name: &str) -> Result<Option<PathBuf>, HostError> {
        let mut buf = [0u8; 512];
        match readlinkat_raw(&self.fd, name, &mut buf) {
            Ok(len) if len < buf.len() => {
                use std::os::unix::ffi::OsStrExt;
                Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(
                    &buf[..len],
                ))))
            }
            Ok(_) => Err(parse_err(
                &self.path.join(name),
                String::new(),
                "link target too long",
            )),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(HostError::io("readlink", self.path.join(name), e.into())),
        }
    }

    /// Like [`read_link_name`], relative to this directory.
    pub(crate) fn link_name(&self, name: &str) -> Result<Option<String>, HostError> {
        let mut buf = [0u8; 512];
        let len = match readlinkat_raw(&self.fd, name, &mut buf) {
            Ok(len) => len,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(HostError::io("readlink", self.path.join(name), e.into())),
        };
        let target = &buf[..len];
        let base = target.rsplit(|b| *b == b'/').next().unwrap_or(target);
        match std::str::from_utf8(base) {
            Ok(b) if !b.is_empty() && len < buf.len() => Ok(Some(b.to_owned())),
            _ => Err(parse_err(
                &self.path.join(name),
                String::from_utf8_lossy(target).into_owned(),
                "link target name",
            )),
        }
    }

    /// Like [`list_names`], relative to this directory.
    pub(crate) fn list(&self, name: &str) -> Result<Vec<String>, HostError> {
        let err = |e: rustix::io::Errno| HostError::io("read_dir", self.path.join(name), e.into());
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut names = Vec::new();
        for entry in Dir::new(fd).map_err(err)? {
            let entry = entry.map_err(err)?;
            match entry.file_name().to_bytes() {
                b"." | b".." => {}
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
}

fn parse_err(path: &Path, content: String, reason: &'static str) -> HostError {
    HostError::Parse {
        path: path.to_path_buf(),
        content,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_pops_parent_components() {
        assert_eq!(
            normalize(Path::new(
                "/r/bus/pci/devices/../../../devices/p/0000:3b:00.0"
            )),
            PathBuf::from("/r/devices/p/0000:3b:00.0")
        );
        assert_eq!(normalize(Path::new("a/./b/../c")), PathBuf::from("a/c"));
    }

    #[test]
    fn small_file_readers_parse_kernel_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        fs::write(p("vendor"), "0x8086\n").unwrap();
        fs::write(p("numa"), "-1\n").unwrap();
        fs::write(p("numa1"), "1\n").unwrap();
        fs::write(p("bad"), "zz\n").unwrap();
        fs::write(p("carrier"), "0\n").unwrap();
        assert_eq!(read_hex_id(&p("vendor")).unwrap(), "8086");
        assert_eq!(read_numa(&p("numa")).unwrap(), None);
        assert_eq!(read_numa(&p("numa1")).unwrap(), Some(1));
        let e = read_u32(&p("bad")).unwrap_err();
        assert!(e.to_string().contains("bad"), "error names the path: {e}");
        assert!(read_u32(&p("missing")).unwrap_err().is_not_found());
        assert_eq!(read_carrier(&p("carrier")), Some(false));
        assert_eq!(read_carrier(&p("missing")), None);
        assert_eq!(read_link_name(&p("missing")).unwrap(), None);
    }
}
