//! Event-driven refresh: when should the daemon rescan sysfs, and when did a PF's link change?
//!
//! [`spawn_watcher`] merges four sources into one channel of [`HostEvent`]s:
//!
//! 1. **Kernel uevents** (`NETLINK_KOBJECT_UEVENT`, kernel multicast group 1): PCI
//!    add/remove/bind/unbind/change (the kernel emits `change` when it creates a VF's sysfs
//!    links, `drivers/pci/iov.c`) and net add/remove/move under a PCI device. Parsed into a typed
//!    [`Uevent`]. If the socket cannot be opened (sandbox, no privileges) a warning is logged
//!    and the polling below carries the load — never fatal.
//! 2. **PF carrier** from `class/net/<pf>/carrier`, read every 50 ms and, on a real host, also
//!    at once whenever an rtnetlink link message (`RTMGRP_LINK`, parsed by
//!    [`parse_link_messages`]) arrives. *Choice:* the sysfs file stays the single source of
//!    truth and rtnetlink is only a wake-up: one dedup path, identical behaviour on fake trees
//!    (where rtnetlink says nothing about them), and with at most a few PFs the poll is a
//!    handful of tiny reads per tick, well inside the 100 ms budget for health changes to
//!    reach kubelet (DESIGN.md §8).
//! 3. **A sysfs fingerprint** ([`Fingerprint`]) recomputed periodically: a hash of each PF's
//!    `sriov_numvfs`, driver and netdev names and each VF's driver and netdev names. Real uevents
//!    do not describe a fake tree, so on test roots this is the change detector (default every
//!    100 ms); on `/sys` it is a second line behind uevents (default every 10 s, every 1 s
//!    when the uevent socket could not be opened).
//! 4. **A resync tick** (default 60 s): rescan regardless, as the safety net for anything missed.
//!
//! Consumers treat `PciChanged` and `Resync` as "rescan soon" (coalescing bursts: creating 64
//! VFs produces hundreds of uevents) and `CarrierChanged` as a health change of the PF's VFs.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vfplug_core::PciAddress;

use crate::sysfs::{DirFd, list_virtfns, normalize, read_carrier, vf_name};

/// Something on the host may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// PCI devices, drivers, VFs or their netdevs changed. `pci` names the device when the
    /// source knows it (a uevent); `None` when only "something changed" is known (fingerprint).
    PciChanged {
        /// The device concerned, if known.
        pci: Option<PciAddress>,
    },
    /// A PF netdev's carrier went up or down.
    CarrierChanged {
        /// The PF's netdev name.
        pf_netdev: String,
        /// New carrier state.
        up: bool,
    },
    /// Periodic safety net, or events were lost (uevent socket overflow): rescan everything.
    Resync,
}

/// The `ACTION` of a uevent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UeventAction {
    /// `add`
    Add,
    /// `remove`
    Remove,
    /// `change`
    Change,
    /// `move` (rename; e.g. a netdev renamed by udev)
    Move,
    /// `online`
    Online,
    /// `offline`
    Offline,
    /// `bind` (a driver bound)
    Bind,
    /// `unbind`
    Unbind,
    /// Anything newer.
    Other(String),
}

impl UeventAction {
    fn parse(s: &str) -> Self {
        match s {
            "add" => Self::Add,
            "remove" => Self::Remove,
            "change" => Self::Change,
            "move" => Self::Move,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "bind" => Self::Bind,
            "unbind" => Self::Unbind,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// Why bytes are not a kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// A message re-broadcast by udevd (`libudev` magic), not the kernel's.
    #[error("udev-daemon message, not a kernel uevent")]
    Libudev,
    /// The `ACTION@DEVPATH` header is missing or malformed.
    #[error("malformed uevent header {0:?}")]
    Header(String),
    /// A field is not UTF-8.
    #[error("uevent is not UTF-8")]
    Utf8,
}

/// A kernel uevent: `ACTION@DEVPATH\0KEY=VALUE\0...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    /// The action.
    pub action: UeventAction,
    /// Device path below `/sys`, e.g. `/devices/pci0000:00/0000:00:03.0/0000:3b:01.0`.
    pub devpath: String,
    /// `SUBSYSTEM` (`pci`, `net`, ...).
    pub subsystem: Option<String>,
    /// `SEQNUM`, the kernel's event counter.
    pub seqnum: Option<u64>,
    /// All `KEY=VALUE` fields.
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// Parses one netlink datagram from the kernel.
    pub fn parse(buf: &[u8]) -> Result<Self, UeventError> {
        if buf.starts_with(b"libudev\0") {
            return Err(UeventError::Libudev);
        }
        let mut fields = buf.split(|b| *b == 0).filter(|f| !f.is_empty());
        let header = fields
            .next()
            .ok_or_else(|| UeventError::Header(String::new()))?;
        let header = std::str::from_utf8(header).map_err(|_| UeventError::Utf8)?;
        let (action, devpath) = header
            .split_once('@')
            .filter(|(a, p)| !a.is_empty() && p.starts_with('/'))
            .ok_or_else(|| UeventError::Header(header.to_owned()))?;
        let mut vars = BTreeMap::new();
        for f in fields {
            let f = std::str::from_utf8(f).map_err(|_| UeventError::Utf8)?;
            if let Some((k, v)) = f.split_once('=') {
                vars.insert(k.to_owned(), v.to_owned());
            }
        }
        Ok(Self {
            // The ACTION field wins over the header if both exist (they agree in practice).
            action: UeventAction::parse(vars.get("ACTION").map_or(action, String::as_str)),
            devpath: vars
                .get("DEVPATH")
                .cloned()
                .unwrap_or_else(|| devpath.to_owned()),
            subsystem: vars.get("SUBSYSTEM").cloned(),
            seqnum: vars.get("SEQNUM").and_then(|s| s.parse().ok()),
            vars,
        })
    }

    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The PCI device the event concerns: `PCI_SLOT_NAME`, else the last PCI address in the
    /// devpath (for a netdev, `/devices/.../0000:3b:01.0/net/eth0` gives its PCI parent).
    pub fn pci(&self) -> Option<PciAddress> {
        if let Some(p) = self.get("PCI_SLOT_NAME").and_then(|s| s.parse().ok()) {
            return Some(p);
        }
        self.devpath.rsplit('/').find_map(|c| c.parse().ok())
    }

    /// What this event means for vfplug, `None` when irrelevant (other subsystems, virtual
    /// netdevs such as veths, actions that change nothing we read).
    pub fn host_event(&self) -> Option<HostEvent> {
        use UeventAction::*;
        match (self.subsystem.as_deref()?, &self.action) {
            ("pci", Add | Remove | Bind | Unbind | Change) => {
                Some(HostEvent::PciChanged { pci: self.pci() })
            }
            // Only netdevs of PCI devices; /devices/virtual/net/* has no PCI address.
            ("net", Add | Remove | Move) => {
                let pci = self.pci()?;
                Some(HostEvent::PciChanged { pci: Some(pci) })
            }
            _ => None,
        }
    }
}

/// What the watcher watches and how often.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// The sysfs root (stands for `/sys`).
    pub sysfs_root: PathBuf,
    /// Listen to kernel uevents. Only meaningful when the root is the real `/sys`.
    pub uevents: bool,
    /// Listen to rtnetlink link changes (`RTMGRP_LINK`) and read PF carriers as soon as one
    /// arrives. Only meaningful when the root is the real `/sys` (same network namespace).
    pub rtnetlink: bool,
    /// How often PF carriers are read (with `rtnetlink`, only a backstop).
    pub carrier_poll: Duration,
    /// How often the sysfs fingerprint is recomputed; `None` disables it.
    pub fingerprint_poll: Option<Duration>,
    /// How often a `Resync` is sent.
    pub resync: Duration,
    /// Channel capacity.
    pub capacity: usize,
}

impl WatchConfig {
    /// Defaults for a root: on `/sys`, uevents on and a 10 s fingerprint (uevents do the real
    /// work; the fingerprint costs ~20 ms of CPU at 2048 VFs, so polling it often would not be
    /// "idle"); on any other root (a fake tree), uevents off and a 100 ms fingerprint. Carrier
    /// every 50 ms, resync 60 s. If the uevent socket cannot be opened, the fingerprint runs at
    /// least every [`FALLBACK_FINGERPRINT_POLL`].
    pub fn new(sysfs_root: PathBuf) -> Self {
        let real = sysfs_root == Path::new("/sys");
        Self {
            sysfs_root,
            uevents: real,
            rtnetlink: real,
            carrier_poll: Duration::from_millis(50),
            fingerprint_poll: Some(Duration::from_millis(if real { 10_000 } else { 100 })),
            resync: Duration::from_secs(60),
            capacity: 256,
        }
    }
}

/// How often the fingerprint is polled when uevents were wanted but the socket failed.
pub const FALLBACK_FINGERPRINT_POLL: Duration = Duration::from_secs(1);

/// A cheap summary of what the inventory depends on, minus carrier (carrier flaps are reported
/// as `CarrierChanged` and must not force a full rescan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Hash over PFs (`sriov_numvfs`, driver, netdevs) and VFs (address, driver, netdevs).
    pub hash: u64,
    /// The PF netdevs seen, with their carrier (for the carrier poller).
    pub pf_netdevs: BTreeMap<String, Option<bool>>,
}

impl Fingerprint {
    /// Computes the fingerprint of the tree under `root`. Unreadable pieces hash as absent
    /// (a race is a change, which is what we want to report).
    pub fn compute(root: &Path) -> Self {
        let mut h = DefaultHasher::new();
        let mut pf_netdevs = BTreeMap::new();
        let devices = root.join("bus/pci/devices");
        let mut addrs: Vec<PciAddress> = match fs::read_dir(&devices) {
            Ok(it) => it
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(e) => {
                debug!(path = %devices.display(), error = %e, "fingerprint: no devices");
                Vec::new()
            }
        };
        // read_dir order is not stable across directory changes; the hash must be. PCI order
        // also puts PFs before their VFs, so VFs need no PF probe (as in the scan).
        addrs.sort_unstable();
        let mut known_vfs = HashSet::new();
        for pci in addrs {
            if known_vfs.contains(&pci) {
                continue;
            }
            let dev = devices.join(pci.to_string());
            let Ok(numvfs) = fs::read(dev.join("sriov_numvfs")) else {
                continue;
            };
            pci.hash(&mut h);
            numvfs.hash(&mut h);
            link_name(&dev.join("driver")).hash(&mut h);
            let nets = dir_names(&dev.join("net"));
            nets.hash(&mut h);
            for n in &nets {
                let carrier = read_carrier(&dev.join("net").join(n).join("carrier"));
                pf_netdevs.insert(n.to_string_lossy().into_owned(), carrier);
            }
            let virtfns = list_virtfns(&dev).unwrap_or_default();
            let parent = fs::read_link(&dev)
                .ok()
                .map(|t| normalize(&devices.join(t)))
                .and_then(|d| DirFd::open(d.parent()?.to_path_buf()).ok());
            for (i, target) in virtfns {
                i.hash(&mut h);
                target.hash(&mut h);
                let Some(name) = vf_name(&target) else {
                    continue;
                };
                if let Ok(a) = name.parse::<PciAddress>() {
                    known_vfs.insert(a);
                }
                // Same layout assumption as the scan: `virtfnN -> ../<vf>`.
                let vf = parent.as_ref().and_then(|p| p.sub(name).ok());
                vf.as_ref()
                    .and_then(|d| d.link_name("driver").ok())
                    .hash(&mut h);
                vf.as_ref().and_then(|d| d.list("net").ok()).hash(&mut h);
            }
        }
        Self {
            hash: h.finish(),
            pf_netdevs,
        }
    }
}

fn link_name(p: &Path) -> Option<std::ffi::OsString> {
    fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(ToOwned::to_owned))
}

fn dir_names(p: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = fs::read_dir(p)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.file_name()))
        .collect();
    v.sort_unstable();
    v
}

/// Starts the watcher tasks (on the current tokio runtime) and returns their event stream.
/// The stream ends after `cancel` is cancelled. Must be called within a tokio runtime.
pub fn spawn_watcher(mut cfg: WatchConfig, cancel: CancellationToken) -> mpsc::Receiver<HostEvent> {
    let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
    if cfg.uevents {
        match open_uevent_socket() {
            Ok(sock) => {
                tokio::spawn(uevent_loop(sock, tx.clone(), cancel.clone()));
            }
            Err(e) => {
                let poll = cfg.fingerprint_poll.map_or(FALLBACK_FINGERPRINT_POLL, |p| {
                    p.min(FALLBACK_FINGERPRINT_POLL)
                });
                warn!(
                    error = %e,
                    fingerprint_poll = ?poll,
                    "cannot open the kernel uevent socket; relying on sysfs polling and resyncs"
                );
                cfg.fingerprint_poll = Some(poll);
            }
        }
    }
    let link_nudge = Arc::new(Notify::new());
    if cfg.rtnetlink {
        match open_link_socket() {
            Ok(sock) => {
                tokio::spawn(link_loop(sock, link_nudge.clone(), cancel.clone()));
            }
            Err(e) => warn!(error = %e, "cannot open rtnetlink; PF carrier is polled only"),
        }
    }
    tokio::spawn(poll_loop(cfg, tx, cancel, link_nudge));
    rx
}

/// Opens a `NETLINK_KOBJECT_UEVENT` socket bound to the kernel's multicast group 1.
pub fn open_uevent_socket() -> io::Result<TokioSocket> {
    let mut sock = TokioSocket::new(protocols::NETLINK_KOBJECT_UEVENT)?;
    // VF creation emits bursts of hundreds of events; a larger buffer avoids ENOBUFS.
    if let Err(e) = sock.socket_ref().set_rx_buf_sz(4 * 1024 * 1024) {
        debug!(error = %e, "could not enlarge the uevent socket buffer");
    }
    sock.socket_mut().bind(&SocketAddr::new(0, 1))?;
    Ok(sock)
}

/// What one datagram received on the uevent socket means. Only the kernel (netlink port 0)
/// is believed: any local process can send to the multicast group.
pub fn datagram_event(buf: &[u8], sender_port: u32) -> Option<HostEvent> {
    if sender_port != 0 {
        debug!(sender_port, "ignoring uevent not sent by the kernel");
        return None;
    }
    match Uevent::parse(buf) {
        Ok(u) => {
            debug!(action = ?u.action, devpath = %u.devpath, "uevent");
            u.host_event()
        }
        Err(e) => {
            debug!(error = %e, "ignoring datagram");
            None
        }
    }
}

async fn uevent_loop(sock: TokioSocket, tx: mpsc::Sender<HostEvent>, cancel: CancellationToken) {
    info!("listening to kernel uevents");
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            r = sock.recv_from_full() => r,
        };
        let event = match received {
            Ok((buf, addr)) => datagram_event(&buf, addr.port_number()),
            // Overflow: events were lost, so the only honest answer is a full rescan.
            Err(e) if e.raw_os_error() == Some(105) => {
                warn!("uevent socket overflow (ENOBUFS); requesting a resync");
                Some(HostEvent::Resync)
            }
            Err(e) => {
                warn!(error = %e, "uevent socket failed; relying on sysfs polling and resyncs");
                return;
            }
        };
        if let Some(ev) = event
            && tx.send(ev).await.is_err()
        {
            return;
        }
    }
}

async fn poll_loop(
    cfg: WatchConfig,
    tx: mpsc::Sender<HostEvent>,
    cancel: CancellationToken,
    link_nudge: Arc<Notify>,
) {
    let root = cfg.sysfs_root.clone();
    let mut carrier_tick = interval(cfg.carrier_poll.max(Duration::from_millis(1)));
    carrier_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Without fingerprint polling the PF list is still needed for carriers: compute it at
    // resync time only.
    let fp_period = cfg.fingerprint_poll.unwrap_or(cfg.resync);
    let mut fp_tick = interval(fp_period.max(Duration::from_millis(1)));
    fp_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut resync_tick = interval(cfg.resync.max(Duration::from_millis(1)));
    resync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    resync_tick.tick().await; // the first tick is immediate; the caller scans at start anyway

    let mut last: Option<Fingerprint> = None;
    let mut carriers: BTreeMap<String, Option<bool>> = BTreeMap::new();
    loop {
        let mut out = Vec::new();
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = carrier_tick.tick() => check_carriers(&root, &mut carriers, &mut out),
            // An rtnetlink link message arrived: read the carriers now instead of at the next
            // tick. The files stay the single source of truth, so there is one dedup path.
            () = link_nudge.notified() => check_carriers(&root, &mut carriers, &mut out),
            _ = fp_tick.tick() => {
                let r = root.clone();
                let Ok(fp) = tokio::task::spawn_blocking(move || Fingerprint::compute(&r)).await
                else { continue };
                if last.as_ref().is_some_and(|l| l.hash != fp.hash) {
                    out.push(HostEvent::PciChanged { pci: None });
                }
                // Keep the carriers we already track (their change is the carrier poller's to
                // report); learn new PFs with their current state as baseline, and report that
                // state once: the consumer scanned before this task first looked, and a carrier
                // that changed in between would otherwise never be reported.
                carriers.retain(|k, _| fp.pf_netdevs.contains_key(k));
                for (k, v) in &fp.pf_netdevs {
                    if let std::collections::btree_map::Entry::Vacant(e) = carriers.entry(k.clone()) {
                        e.insert(*v);
                        if let Some(up) = *v {
                            out.push(HostEvent::CarrierChanged { pf_netdev: k.clone(), up });
                        }
                    }
                }
                last = Some(fp);
            }
            _ = resync_tick.tick() => out.push(HostEvent::Resync),
        }
        for ev in out {
            debug!(?ev, "host event");
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

fn check_carriers(
    root: &Path,
    carriers: &mut BTreeMap<String, Option<bool>>,
    out: &mut Vec<HostEvent>,
) {
    for (ifname, old) in carriers.iter_mut() {
        let new = read_carrier(&root.join("class/net").join(ifname).join("carrier"));
        if let (Some(was), Some(now)) = (*old, new)
            && was != now
        {
            out.push(HostEvent::CarrierChanged {
                pf_netdev: ifname.clone(),
                up: now,
            });
        }
        if new.is_some() {
            *old = new;
        }
    }
}

/// `RTM_NEWLINK` or `RTM_DELLINK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMessageKind {
    /// `RTM_NEWLINK` (16): a link appeared or changed (carrier, flags, name).
    New,
    /// `RTM_DELLINK` (17): a link went away (or left the namespace).
    Del,
}

/// The part of an rtnetlink link message the watcher uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkMessage {
    /// New or deleted.
    pub kind: LinkMessageKind,
    /// `ifi_index`.
    pub ifindex: i32,
    /// `IFLA_IFNAME`.
    pub ifname: Option<String>,
    /// `IFLA_CARRIER` if present, else the `IFF_LOWER_UP` flag.
    pub carrier: bool,
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const IFLA_CARRIER: u16 = 33;
const IFF_LOWER_UP: u32 = 0x1_0000;
/// `RTMGRP_LINK`: the multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the link messages of one rtnetlink datagram (`nlmsghdr` + `ifinfomsg` + `rtattr`s,
/// several per datagram, 4-byte aligned, host byte order). Other message types and anything
/// truncated are skipped.
pub fn parse_link_messages(buf: &[u8]) -> Vec<LinkMessage> {
    let mut out = Vec::new();
    let mut off = 0;
    while let (Some(len), Some(ty)) = (u32_at(buf, off), u16_at(buf, off + 4)) {
        let len = len as usize;
        let Some(msg) = buf
            .get(off + NLMSG_HDRLEN..off + len)
            .filter(|_| len >= NLMSG_HDRLEN)
        else {
            break;
        };
        let kind = match ty {
            RTM_NEWLINK => Some(LinkMessageKind::New),
            RTM_DELLINK => Some(LinkMessageKind::Del),
            _ => None,
        };
        if let (Some(kind), Some(index), Some(flags)) = (kind, u32_at(msg, 4), u32_at(msg, 8)) {
            let mut ifname = None;
            let mut carrier = None;
            let mut a = IFINFOMSG_LEN;
            while let (Some(alen), Some(aty)) = (u16_at(msg, a), u16_at(msg, a + 2)) {
                let alen = alen as usize;
                let Some(data) = msg.get(a + 4..a + alen).filter(|_| alen >= 4) else {
                    break;
                };
                // The top two bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER.
                match aty & 0x3fff {
                    IFLA_IFNAME => {
                        let name = data.split(|b| *b == 0).next().unwrap_or_default();
                        ifname = std::str::from_utf8(name).ok().map(str::to_owned);
                    }
                    IFLA_CARRIER => carrier = data.first().map(|c| *c != 0),
                    _ => {}
                }
                a += align4(alen);
            }
            out.push(LinkMessage {
                kind,
                ifindex: index as i32,
                ifname,
                carrier: carrier.unwrap_or(flags & IFF_LOWER_UP != 0),
            });
        }
        off += align4(len);
    }
    out
}

/// Opens a `NETLINK_ROUTE` socket subscribed to link changes (`RTMGRP_LINK`).
pub fn open_link_socket() -> io::Result<TokioSocket> {
    let mut sock = TokioSocket::new(protocols::NETLINK_ROUTE)?;
    sock.socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    Ok(sock)
}

async fn link_loop(sock: TokioSocket, nudge: Arc<Notify>, cancel: CancellationToken) {
    info!("listening to rtnetlink link changes");
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            r = sock.recv_from_full() => r,
        };
        match received {
            Ok((buf, addr)) if addr.port_number() == 0 => {
                let msgs = parse_link_messages(&buf);
                for m in &msgs {
                    debug!(?m.kind, m.ifindex, ifname = ?m.ifname, m.carrier, "link message");
                }
                if !msgs.is_empty() {
                    nudge.notify_one();
                }
            }
            Ok(_) => {}
            // Lost messages: read the carriers anyway.
            Err(e) if e.raw_os_error() == Some(105) => nudge.notify_one(),
            Err(e) => {
                warn!(error = %e, "rtnetlink socket failed; carrier changes are polled only");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a datagram the way the kernel's `kobject_uevent_env` does: the header, then each
    /// `KEY=VALUE`, all NUL-terminated.
    fn datagram(header: &str, vars: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for f in std::iter::once(header).chain(vars.iter().copied()) {
            b.extend_from_slice(f.as_bytes());
            b.push(0);
        }
        b
    }

    const VF: &str = "/devices/pci0000:3a/0000:3a:00.0/0000:3b:01.0";

    #[test]
    fn parses_a_pci_bind_uevent() {
        let dp = format!("DEVPATH={VF}");
        let buf = datagram(
            &format!("bind@{VF}"),
            &[
                "ACTION=bind",
                &dp,
                "SUBSYSTEM=pci",
                "DRIVER=vfio-pci",
                "PCI_CLASS=20000",
                "PCI_ID=8086:154C",
                "PCI_SUBSYS_ID=8086:0000",
                "PCI_SLOT_NAME=0000:3b:01.0",
                "MODALIAS=pci:v00008086d0000154Csv00008086sd00000000bc02sc00i00",
                "SEQNUM=4521",
            ],
        );
        let u = Uevent::parse(&buf).unwrap();
        assert_eq!(u.action, UeventAction::Bind);
        assert_eq!(u.devpath, VF);
        assert_eq!(u.subsystem.as_deref(), Some("pci"));
        assert_eq!(u.seqnum, Some(4521));
        assert_eq!(u.get("DRIVER"), Some("vfio-pci"));
        // MODALIAS contains no '=' after the first; values keep everything after it.
        assert!(u.get("MODALIAS").unwrap().starts_with("pci:v00008086"));
        let pci: PciAddress = "0000:3b:01.0".parse().unwrap();
        assert_eq!(
            u.host_event(),
            Some(HostEvent::PciChanged { pci: Some(pci) })
        );
    }

    #[test]
    fn net_events_map_to_their_pci_parent_and_virtual_ones_are_ignored() {
        let path = format!("{VF}/net/ens785f0v0");
        let dp = format!("DEVPATH={path}");
        let old = format!("DEVPATH_OLD={VF}/net/eth0");
        let mv = datagram(
            &format!("move@{path}"),
            &[
                "ACTION=move",
                &dp,
                "SUBSYSTEM=net",
                &old,
                "INTERFACE=ens785f0v0",
                "IFINDEX=7",
                "SEQNUM=9",
            ],
        );
        let u = Uevent::parse(&mv).unwrap();
        assert_eq!(u.action, UeventAction::Move);
        assert_eq!(u.pci(), Some("0000:3b:01.0".parse().unwrap()));
        assert!(matches!(
            u.host_event(),
            Some(HostEvent::PciChanged { pci: Some(_) })
        ));

        let veth = datagram(
            "add@/devices/virtual/net/veth12ab",
            &[
                "ACTION=add",
                "DEVPATH=/devices/virtual/net/veth12ab",
                "SUBSYSTEM=net",
                "INTERFACE=veth12ab",
                "SEQNUM=10",
            ],
        );
        assert_eq!(Uevent::parse(&veth).unwrap().host_event(), None);

        let block = datagram(
            "add@/devices/virtual/block/loop0",
            &[
                "ACTION=add",
                "DEVPATH=/devices/virtual/block/loop0",
                "SUBSYSTEM=block",
                "MAJOR=7",
                "SEQNUM=11",
            ],
        );
        assert_eq!(Uevent::parse(&block).unwrap().host_event(), None);

        // A netdev carrier change is not a uevent action we act on.
        let online = datagram(&format!("online@{VF}"), &["ACTION=online", "SUBSYSTEM=pci"]);
        assert_eq!(Uevent::parse(&online).unwrap().host_event(), None);
    }

    #[test]
    fn sriov_vf_creation_change_event_is_relevant() {
        // pci_iov_sysfs_link() sends KOBJ_CHANGE for the new VF.
        let buf = datagram(
            &format!("change@{VF}"),
            &[
                "ACTION=change",
                &format!("DEVPATH={VF}"),
                "SUBSYSTEM=pci",
                "SEQNUM=12",
            ],
        );
        let u = Uevent::parse(&buf).unwrap();
        assert_eq!(u.action, UeventAction::Change);
        // No PCI_SLOT_NAME: the address comes from the devpath.
        assert_eq!(
            u.host_event(),
            Some(HostEvent::PciChanged {
                pci: Some("0000:3b:01.0".parse().unwrap())
            })
        );
    }

    /// Builds an rtnetlink link message the way the kernel lays it out (`rtnl_fill_ifinfo`).
    fn link_msg(ty: u16, index: i32, flags: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[0u8, 0]); // ifi_family AF_UNSPEC, pad
        body.extend_from_slice(&1u16.to_ne_bytes()); // ifi_type ARPHRD_ETHER
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
        for (t, data) in attrs {
            body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(data);
            body.resize(align4(body.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes()); // flags
        m.extend_from_slice(&0u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn parses_rtnetlink_link_messages() {
        const UP_LOWER_UP: u32 = 0x1 | 0x1_0000;
        let mut buf = link_msg(
            RTM_NEWLINK,
            4,
            UP_LOWER_UP,
            &[
                (IFLA_IFNAME, b"ens785f0\0"),
                (13, &1500u32.to_ne_bytes()),
                (IFLA_CARRIER, &[0]),
            ],
        );
        // Two messages in one datagram; the second has no IFLA_CARRIER: flags decide.
        buf.extend(link_msg(
            RTM_NEWLINK,
            5,
            UP_LOWER_UP,
            &[(IFLA_IFNAME, b"ens785f1\0")],
        ));
        buf.extend(link_msg(RTM_DELLINK, 6, 0, &[(IFLA_IFNAME, b"eth9\0")]));
        buf.extend(link_msg(20, 7, 0, &[])); // RTM_NEWADDR: not ours
        let msgs = parse_link_messages(&buf);
        assert_eq!(
            msgs,
            vec![
                LinkMessage {
                    kind: LinkMessageKind::New,
                    ifindex: 4,
                    ifname: Some("ens785f0".into()),
                    carrier: false
                },
                LinkMessage {
                    kind: LinkMessageKind::New,
                    ifindex: 5,
                    ifname: Some("ens785f1".into()),
                    carrier: true
                },
                LinkMessage {
                    kind: LinkMessageKind::Del,
                    ifindex: 6,
                    ifname: Some("eth9".into()),
                    carrier: false
                },
            ]
        );
        // Truncation anywhere never panics and never invents a message.
        for cut in 0..buf.len() {
            assert!(parse_link_messages(&buf[..cut]).len() <= 3);
        }
        assert!(parse_link_messages(&buf[..20]).is_empty());
    }

    #[test]
    fn only_the_kernel_is_believed() {
        let buf = datagram(
            &format!("remove@{VF}"),
            &[
                "ACTION=remove",
                &format!("DEVPATH={VF}"),
                "SUBSYSTEM=pci",
                "SEQNUM=13",
            ],
        );
        assert!(matches!(
            datagram_event(&buf, 0),
            Some(HostEvent::PciChanged { .. })
        ));
        assert_eq!(
            datagram_event(&buf, 4242),
            None,
            "a userspace sender is ignored"
        );
        assert_eq!(datagram_event(b"garbage", 0), None);
    }

    #[test]
    fn rejects_udev_and_malformed_datagrams() {
        assert_eq!(
            Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"),
            Err(UeventError::Libudev)
        );
        assert!(matches!(
            Uevent::parse(b"add-no-at\0ACTION=add\0"),
            Err(UeventError::Header(_))
        ));
        assert!(matches!(Uevent::parse(b""), Err(UeventError::Header(_))));
        assert_eq!(
            Uevent::parse(b"add@/devices/\xff\0"),
            Err(UeventError::Utf8)
        );
        let u = Uevent::parse(b"frobnicate@/devices/x\0SUBSYSTEM=pci\0").unwrap();
        assert_eq!(u.action, UeventAction::Other("frobnicate".into()));
        assert_eq!(u.host_event(), None);
    }
}
