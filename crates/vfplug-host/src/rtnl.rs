//! Real rtnetlink for VF settings: [`RtVfNetlink`] implements [`VfNetlink`] with
//! `RTM_GETLINK` (`IFLA_EXT_MASK` = `RTEXT_FILTER_VF`) and `RTM_SETLINK` on the PF, the way
//! `ip link show <pf>` / `ip link set <pf> vf N ...` do.
//!
//! Messages are built and (mostly) parsed with `netlink-packet-route`, over a synchronous
//! `netlink_sys::Socket`: one request at a time, each with its own sequence number, answered by
//! an ACK or an `NLMSG_ERROR` (whose extended-ACK text is kept for the error message). The VF
//! list is walked by hand around the crate's per-field parsers for one reason: the kernel presets
//! spoofchk and trust to -1 (`u32::MAX`) when the driver does not report them, and the crate folds
//! that into `false`; here it becomes `None`.
//!
//! `Conn` (crate-private) is the transport, shared with [`crate::netdev`], which opens one inside
//! a pod's netns.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, Parseable,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac,
    VfInfoRate, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState as NlVfLinkState, VfVlan,
    VfVlanInfo, VlanProtocol,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rustix::io::Errno;
use vfplug_core::{MacAddr, VfLinkState, VlanProto};

use crate::net::{NetError, VfChange, VfNetlink, VfSettings};

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `NLM_F_CAPPED` / `NLM_F_ACK_TLVS` on an `NLMSG_ERROR`: the echoed request is only its header,
/// and extended-ACK attributes follow it.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const IFINFOMSG_LEN: usize = 16;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_VLAN: u16 = 2;
const IFLA_VF_TX_RATE: u16 = 3;
const IFLA_VF_SPOOFCHK: u16 = 4;
const IFLA_VF_LINK_STATE: u16 = 5;
const IFLA_VF_RATE: u16 = 6;
const IFLA_VF_TRUST: u16 = 9;
const IFLA_VF_VLAN_LIST: u16 = 12;

/// How long a reply may take before the request is given up (the kernel answers rtnetlink
/// requests synchronously, so this only guards against the unexpected).
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump the kernel marks inconsistent (`NLM_F_DUMP_INTR`) is redone this many times.
const DUMP_ATTEMPTS: u32 = 3;
/// EBUSY/EAGAIN from a VF setting: this many tries in all, sleeping 10 ms, 20, 40, 80, then
/// 100 ms between them (about 0.7 s in the worst case).
pub const SET_VF_ATTEMPTS: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// A failed request, before it is given a meaning by the caller.
#[derive(Debug)]
pub(crate) enum RtError {
    /// The kernel refused: the errno (positive) and its extended-ACK message, if any.
    Nack { errno: i32, msg: Option<String> },
    /// The socket failed (send, receive, timeout).
    Io(io::Error),
    /// A reply that does not parse.
    Protocol(String),
}

impl RtError {
    /// The kernel's errno, if it refused.
    pub(crate) fn errno(&self) -> Option<Errno> {
        match self {
            Self::Nack { errno, .. } => Some(Errno::from_raw_os_error(*errno)),
            _ => None,
        }
    }

    /// Whether the kernel refused with `e`.
    pub(crate) fn is(&self, e: Errno) -> bool {
        self.errno() == Some(e)
    }

    /// The generic meaning: EOPNOTSUPP is [`NetError::NotSupported`], an unparsable reply
    /// [`NetError::Protocol`], anything else [`NetError::Kernel`] (with the kernel's text).
    pub(crate) fn into_net(self, op: &str) -> NetError {
        match self {
            Self::Nack { errno, msg } => {
                let op = match msg {
                    Some(m) => format!("{op} (kernel: {m})"),
                    None => op.to_owned(),
                };
                if Errno::from_raw_os_error(errno) == Errno::OPNOTSUPP {
                    NetError::NotSupported { op }
                } else {
                    NetError::Kernel {
                        op,
                        source: io::Error::from_raw_os_error(errno),
                    }
                }
            }
            Self::Io(source) => NetError::Kernel {
                op: op.to_owned(),
                source,
            },
            Self::Protocol(reason) => NetError::Protocol {
                op: op.to_owned(),
                reason,
            },
        }
    }
}

impl From<io::Error> for RtError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// One message of a datagram from the kernel, as far as the transport cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    /// An answer (e.g. `RTM_NEWLINK`): type, netlink flags and the payload after `nlmsghdr`.
    Data {
        kind: u16,
        flags: u16,
        payload: &'a [u8],
    },
    /// `NLMSG_ERROR` with code 0.
    Ack,
    /// `NLMSG_ERROR` with a negative code: the errno (positive) and the extended-ACK message.
    Error { errno: i32, msg: Option<String> },
    /// `NLMSG_DONE`, with the dump's final errno (positive; 0 when it went well).
    Done { errno: i32 },
}

/// Splits one datagram into `(sequence number, message)` pairs. `NLMSG_NOOP` is dropped.
pub(crate) fn parse_datagram(buf: &[u8]) -> Result<Vec<(u32, Reply<'_>)>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        let nl = NetlinkBuffer::new_checked(rest).map_err(|e| format!("netlink header: {e}"))?;
        let len = nl.length() as usize;
        let (kind, flags, seq) = (nl.message_type(), nl.flags(), nl.sequence_number());
        let payload = &rest[NLMSG_HDRLEN..len];
        let reply = match kind {
            NLMSG_NOOP => None,
            NLMSG_ERROR => {
                let code = i32_at(payload, 0).ok_or("truncated NLMSG_ERROR")?;
                if code == 0 {
                    Some(Reply::Ack)
                } else {
                    Some(Reply::Error {
                        errno: code.saturating_neg(),
                        msg: extack_message(payload, flags),
                    })
                }
            }
            NLMSG_DONE => Some(Reply::Done {
                errno: i32_at(payload, 0).unwrap_or(0).saturating_neg(),
            }),
            _ => Some(Reply::Data {
                kind,
                flags,
                payload,
            }),
        };
        out.extend(reply.map(|r| (seq, r)));
        off += (len + 3) & !3;
    }
    Ok(out)
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The `NLMSGERR_ATTR_MSG` of an `NLMSG_ERROR` payload (errno, echoed request, then TLVs).
fn extack_message(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32_at(payload, 4)? as usize
    };
    let tlvs = payload.get(4 + ((echoed + 3) & !3)..)?;
    NlasIterator::new(tlvs)
        .filter_map(Result::ok)
        .find(|n| n.kind() == NLMSGERR_ATTR_MSG)
        .map(|n| c_string(n.value()))
}

/// A NUL-terminated (or not) string attribute.
pub(crate) fn c_string(v: &[u8]) -> String {
    let s = v.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(s).into_owned()
}

/// Serializes a request.
pub(crate) fn encode(msg: RouteNetlinkMessage, seq: u32, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// A `NETLINK_ROUTE` socket bound to the netns of the thread that opened it, used for one
/// request at a time.
#[derive(Debug)]
pub(crate) struct Conn {
    sock: Socket,
    seq: u32,
}

impl Conn {
    /// Opens a socket in the calling thread's netns.
    pub(crate) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Both are optional (older kernels lack them): extended ACKs give the kernel's reason in
        // words, capped ACKs keep error replies small.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        // Strict checking makes the kernel filter address dumps by interface index itself.
        let _ = sock.set_netlink_get_strict_chk(true);
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends a request and collects its answers: for a plain request, whatever comes before the
    /// ACK (e.g. the one `RTM_NEWLINK` of a `RTM_GETLINK`); for a dump, every message up to
    /// `NLMSG_DONE` (redone if the kernel says the dump was interrupted). Each answer is the
    /// payload after `nlmsghdr`.
    pub(crate) fn request(
        &mut self,
        msg: &RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<Vec<u8>>, RtError> {
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        self.request_flags(msg, flags)
    }

    /// A request that creates something (`NLM_F_CREATE | NLM_F_EXCL`): an address, a route, an
    /// altname. EEXIST if it is there already.
    pub(crate) fn request_create(
        &mut self,
        msg: &RouteNetlinkMessage,
    ) -> Result<Vec<Vec<u8>>, RtError> {
        self.request_flags(msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
    }

    fn request_flags(
        &mut self,
        msg: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<Vec<u8>>, RtError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request_once(msg, flags)? {
                (out, false) => return Ok(out),
                (out, true) if attempt >= DUMP_ATTEMPTS => {
                    tracing::debug!("rtnetlink dump still inconsistent; using the last one");
                    return Ok(out);
                }
                (_, true) => {}
            }
        }
    }

    fn request_once(
        &mut self,
        msg: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(Vec<Vec<u8>>, bool), RtError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.sock.send(&encode(msg.clone(), seq, flags), 0)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (buf, _) = self.sock.recv_from_full().map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {RECV_TIMEOUT:?}"),
                    )
                } else {
                    e
                }
            })?;
            for (s, reply) in parse_datagram(&buf).map_err(RtError::Protocol)? {
                // Answers to an earlier request given up on (timeout) are not ours.
                if s != seq {
                    continue;
                }
                match reply {
                    Reply::Data { flags, payload, .. } => {
                        interrupted |= flags & NLM_F_DUMP_INTR != 0;
                        out.push(payload.to_vec());
                    }
                    Reply::Ack => return Ok((out, interrupted)),
                    Reply::Error { errno, msg } => return Err(RtError::Nack { errno, msg }),
                    Reply::Done { errno: 0 } => return Ok((out, interrupted)),
                    Reply::Done { errno } => return Err(RtError::Nack { errno, msg: None }),
                }
            }
        }
    }
}

/// `RTM_GETLINK` for one link by name, asking for the VF list (and no statistics).
pub(crate) fn getlink_vf_message(pf: &str) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(pf.to_owned()));
    m.attributes.push(LinkAttribute::ExtMask(vec![
        LinkExtentMask::Vf,
        LinkExtentMask::SkipStats,
    ]));
    RouteNetlinkMessage::GetLink(m)
}

/// `RTM_SETLINK` on the PF (found by name) carrying one VF knob in
/// `IFLA_VFINFO_LIST [IFLA_VF_INFO [knob]]`.
pub(crate) fn set_vf_message(pf: &str, vf: u32, change: &VfChange) -> RouteNetlinkMessage {
    let info = match *change {
        VfChange::Mac(m) => VfInfo::Mac(VfInfoMac::new(vf, &m.0)),
        // Plain 802.1Q goes as IFLA_VF_VLAN, which every kernel and driver takes; only 802.1ad
        // needs the list form (kernel 4.9+), whose protocol field is big-endian on the wire.
        VfChange::Vlan {
            vlan,
            qos,
            proto: VlanProto::Dot1Q,
        } => VfInfo::Vlan(VfInfoVlan::new(vf, u32::from(vlan), u32::from(qos))),
        VfChange::Vlan {
            vlan,
            qos,
            proto: VlanProto::Dot1Ad,
        } => VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
            vf,
            u32::from(vlan),
            u32::from(qos),
            VlanProtocol::Ieee8021Ad,
        ))]),
        VfChange::SpoofChk(b) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, b)),
        VfChange::Trust(b) => VfInfo::Trust(VfInfoTrust::new(vf, b)),
        VfChange::LinkState(l) => VfInfo::LinkState(VfInfoLinkState::new(
            vf,
            match l {
                VfLinkState::Auto => NlVfLinkState::Auto,
                VfLinkState::Enable => NlVfLinkState::Enable,
                VfLinkState::Disable => NlVfLinkState::Disable,
            },
        )),
        VfChange::Rate { min, max } => VfInfo::Rate(VfInfoRate::new(vf, min, max)),
    };
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(pf.to_owned()));
    m.attributes
        .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
    RouteNetlinkMessage::SetLink(m)
}

/// What one `IFLA_VF_INFO` holds, before it is turned into [`VfSettings`].
#[derive(Debug, Default)]
struct RawVf {
    id: Option<u32>,
    settings: VfSettings,
    rate_seen: bool,
    tx_rate: Option<u32>,
}

/// The VFs an `RTM_NEWLINK` payload (`ifinfomsg` + attributes) reports, as `(index, settings)`.
/// Empty when the link reports no VF list (not a PF, or no VFs enabled).
pub(crate) fn parse_vfs(link_payload: &[u8]) -> Result<Vec<(u32, VfSettings)>, String> {
    let attrs = link_payload
        .get(IFINFOMSG_LEN..)
        .ok_or("link message shorter than ifinfomsg")?;
    let mut out = Vec::new();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| format!("link attribute: {e}"))?;
        if nla.kind() != IFLA_VFINFO_LIST {
            continue;
        }
        for info in NlasIterator::new(nla.value()) {
            let info = info.map_err(|e| format!("IFLA_VFINFO_LIST: {e}"))?;
            if info.kind() != IFLA_VF_INFO {
                continue;
            }
            let raw = parse_vf_info(info.value())?;
            let Some(id) = raw.id else {
                return Err("IFLA_VF_INFO without a VF number".into());
            };
            let mut s = raw.settings;
            if !raw.rate_seen {
                // Kernels before 3.16 report only IFLA_VF_TX_RATE (the maximum).
                s.max_tx_rate = raw.tx_rate.unwrap_or(0);
            }
            out.push((id, s));
        }
    }
    Ok(out)
}

/// A spoofchk/trust word: the kernel presets -1 and the driver overwrites it if it knows.
fn reported_bool(v: &[u8]) -> Result<Option<bool>, String> {
    match u32_at(v, 4).ok_or("truncated VF flag")? {
        u32::MAX => Ok(None),
        n => Ok(Some(n != 0)),
    }
}

fn parse_vf_info(value: &[u8]) -> Result<RawVf, String> {
    let mut raw = RawVf::default();
    let mut list_vlan = None;
    for nla in NlasIterator::new(value) {
        let nla = nla.map_err(|e| format!("IFLA_VF_INFO: {e}"))?;
        let v = nla.value();
        // Every VF structure starts with the VF number.
        if raw.id.is_none() && nla.kind() != IFLA_VF_VLAN_LIST {
            raw.id = u32_at(v, 0);
        }
        match nla.kind() {
            IFLA_VF_SPOOFCHK => raw.settings.spoofchk = reported_bool(v)?,
            IFLA_VF_TRUST => raw.settings.trust = reported_bool(v)?,
            IFLA_VF_MAC | IFLA_VF_VLAN | IFLA_VF_TX_RATE | IFLA_VF_LINK_STATE | IFLA_VF_RATE
            | IFLA_VF_VLAN_LIST => {
                let parsed =
                    VfInfo::parse(&nla).map_err(|e| format!("VF attribute {}: {e}", nla.kind()))?;
                apply_vf_attr(&mut raw, parsed, &mut list_vlan)?;
            }
            _ => {}
        }
    }
    // The list form carries the protocol; when present it wins over IFLA_VF_VLAN.
    if let Some((vlan, qos, proto)) = list_vlan {
        raw.settings.vlan = vlan;
        raw.settings.qos = qos;
        raw.settings.vlan_proto = proto;
    }
    Ok(raw)
}

type ListVlan = Option<(u16, u8, VlanProto)>;

fn apply_vf_attr(raw: &mut RawVf, attr: VfInfo, list_vlan: &mut ListVlan) -> Result<(), String> {
    let s = &mut raw.settings;
    let vlan_id = |v: u32| u16::try_from(v).map_err(|_| format!("VLAN {v} out of range"));
    let qos = |q: u32| u8::try_from(q).map_err(|_| format!("QoS {q} out of range"));
    match attr {
        VfInfo::Mac(m) => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&m.mac[..6]);
            s.mac = MacAddr(mac);
        }
        VfInfo::Vlan(v) => {
            s.vlan = vlan_id(v.vlan_id)?;
            s.qos = qos(v.qos)?;
        }
        VfInfo::VlanList(list) => {
            for entry in list {
                if let VfVlan::Info(i) = entry {
                    let proto = match i.protocol {
                        VlanProtocol::Ieee8021Ad => VlanProto::Dot1Ad,
                        _ => VlanProto::Dot1Q,
                    };
                    *list_vlan = Some((vlan_id(i.vlan_id)?, qos(i.qos)?, proto));
                    break;
                }
            }
        }
        VfInfo::LinkState(l) => {
            s.link_state = match l.state {
                NlVfLinkState::Auto => Some(VfLinkState::Auto),
                NlVfLinkState::Enable => Some(VfLinkState::Enable),
                NlVfLinkState::Disable => Some(VfLinkState::Disable),
                _ => None,
            };
        }
        VfInfo::Rate(r) => {
            s.min_tx_rate = r.min_tx_rate;
            s.max_tx_rate = r.max_tx_rate;
            raw.rate_seen = true;
        }
        VfInfo::TxRate(t) => raw.tx_rate = Some(t.rate),
        _ => {}
    }
    Ok(())
}

/// [`VfNetlink`] over rtnetlink. One socket, opened at construction in the caller's netns (the
/// PFs' netns), guarded by a mutex: a request is a few microseconds of kernel work, so sharing
/// costs nothing measurable, while a socket per call would add socket+bind+setsockopt each time
/// (see the `netlink` integration test's figures).
#[derive(Debug)]
pub struct RtVfNetlink {
    conn: Mutex<Conn>,
}

impl RtVfNetlink {
    /// Opens the rtnetlink socket in the calling thread's netns.
    pub fn new() -> Result<Self, NetError> {
        let conn = Conn::open().map_err(|source| NetError::Kernel {
            op: "opening an rtnetlink socket".into(),
            source,
        })?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        // A panic while holding the lock leaves a socket behind, still usable (stale replies
        // are skipped by sequence number).
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// All VFs `pf` reports, by index. Empty: `pf` is not a PF or has no VFs enabled.
    pub fn read_all(&self, pf: &str) -> Result<Vec<(u32, VfSettings)>, NetError> {
        let op = format!("reading the VFs of {pf}");
        let replies = match self.conn().request(&getlink_vf_message(pf), false) {
            Ok(r) => r,
            Err(e) if e.is(Errno::NODEV) => {
                return Err(NetError::NoSuchLink {
                    name: pf.to_owned(),
                    netns: None,
                });
            }
            Err(e) => return Err(e.into_net(&op)),
        };
        let payload = replies.first().ok_or_else(|| NetError::Protocol {
            op: op.clone(),
            reason: "no RTM_NEWLINK in the answer".into(),
        })?;
        parse_vfs(payload).map_err(|reason| NetError::Protocol { op, reason })
    }

    /// What an EINVAL/ERANGE from the PF means: the VF index does not exist, or something else.
    fn classify_invalid(&self, pf: &str, vf: u32, e: RtError, op: &str) -> NetError {
        match self.read_all(pf) {
            Ok(vfs) if !vfs.iter().any(|(i, _)| *i == vf) => NetError::NoSuchVf {
                pf: pf.to_owned(),
                vf,
            },
            _ => e.into_net(op),
        }
    }
}

impl VfNetlink for RtVfNetlink {
    fn read_vf(&self, pf: &str, vf: u32) -> Result<VfSettings, NetError> {
        self.read_all(pf)?
            .into_iter()
            .find(|(i, _)| *i == vf)
            .map(|(_, s)| s)
            .ok_or_else(|| NetError::NoSuchVf {
                pf: pf.to_owned(),
                vf,
            })
    }

    fn set_vf(&self, pf: &str, vf: u32, change: VfChange) -> Result<(), NetError> {
        let op = format!("{pf} vf {vf} {}", change.knob());
        let msg = set_vf_message(pf, vf, &change);
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The lock is not held while sleeping: other PFs' requests go on meanwhile.
            let r = self.conn().request(&msg, false);
            let e = match r {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if e.is(Errno::BUSY) || e.is(Errno::AGAIN) {
                if attempt >= SET_VF_ATTEMPTS {
                    return Err(NetError::Busy {
                        op,
                        attempts: attempt,
                    });
                }
                tracing::debug!(pf, vf, knob = change.knob(), attempt, "VF busy; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_BACKOFF);
                continue;
            }
            return Err(match e.errno() {
                Some(Errno::NODEV) => NetError::NoSuchLink {
                    name: pf.to_owned(),
                    netns: None,
                },
                // A driver without 802.1ad says so with EPROTONOSUPPORT (e.g. igb).
                Some(Errno::PROTONOSUPPORT) => NetError::NotSupported {
                    op: format!("{op} proto 802.1ad"),
                },
                Some(Errno::INVAL | Errno::RANGE) => self.classify_invalid(pf, vf, e, &op),
                _ => e.into_net(&op),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An NLA as the kernel lays it out: header, value, padding to 4.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + value.len()).unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(value);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// One IFLA_VF_INFO the way `rtnl_fill_vfinfo` writes it.
    #[allow(clippy::too_many_arguments)]
    fn kernel_vf_info(
        vf: u32,
        mac: [u8; 6],
        vlan: u32,
        qos: u32,
        proto_wire: [u8; 2],
        spoofchk: u32,
        trust: u32,
        link_state: u32,
        rate: Option<(u32, u32)>,
        tx_rate: u32,
    ) -> Vec<u8> {
        let mut mac32 = [0u8; 32];
        mac32[..6].copy_from_slice(&mac);
        let mut b = Vec::new();
        let mut macv = vf.to_ne_bytes().to_vec();
        macv.extend_from_slice(&mac32);
        b.extend(nla(IFLA_VF_MAC, &macv));
        b.extend(nla(IFLA_VF_VLAN, &words(&[vf, vlan, qos])));
        if let Some((min, max)) = rate {
            b.extend(nla(IFLA_VF_RATE, &words(&[vf, min, max])));
        }
        b.extend(nla(IFLA_VF_TX_RATE, &words(&[vf, tx_rate])));
        b.extend(nla(IFLA_VF_SPOOFCHK, &words(&[vf, spoofchk])));
        b.extend(nla(IFLA_VF_LINK_STATE, &words(&[vf, link_state])));
        b.extend(nla(7, &words(&[vf, u32::MAX]))); // IFLA_VF_RSS_QUERY_EN: ignored
        b.extend(nla(IFLA_VF_TRUST, &words(&[vf, trust])));
        // struct ifla_vf_vlan_info { u32 vf, vlan, qos; __be16 proto; } + 2 bytes padding
        let mut vi = words(&[vf, vlan, qos]);
        vi.extend_from_slice(&proto_wire);
        vi.extend_from_slice(&[0, 0]);
        b.extend(nla(IFLA_VF_VLAN_LIST, &nla(1, &vi)));
        nla(IFLA_VF_INFO, &b)
    }

    fn link_payload(vf_infos: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p.extend(nla(3, b"ens1f0\0"));
        p.extend(nla(21, &words(&[u32::try_from(vf_infos.len()).unwrap()])));
        p.extend(nla(IFLA_VFINFO_LIST, &vf_infos.concat()));
        p
    }

    #[test]
    fn parses_kernel_vf_list_including_unreported_flags_and_8021ad() {
        let p = link_payload(&[
            kernel_vf_info(0, [0; 6], 0, 0, [0x81, 0x00], 1, 0, 0, Some((0, 0)), 0),
            // 802.1ad is 0x88a8 big-endian on the wire; spoofchk/trust not reported (-1).
            kernel_vf_info(
                1,
                [2, 0, 0, 0, 0, 0x42],
                100,
                3,
                [0x88, 0xa8],
                u32::MAX,
                u32::MAX,
                2,
                Some((10, 500)),
                500,
            ),
            // No IFLA_VF_RATE (old kernel): the maximum comes from IFLA_VF_TX_RATE.
            kernel_vf_info(2, [0; 6], 7, 0, [0x81, 0x00], 0, 1, 1, None, 300),
        ]);
        let vfs = parse_vfs(&p).unwrap();
        assert_eq!(vfs.len(), 3);
        assert_eq!(
            vfs[0],
            (
                0,
                VfSettings {
                    spoofchk: Some(true),
                    trust: Some(false),
                    link_state: Some(VfLinkState::Auto),
                    ..VfSettings::default()
                }
            )
        );
        assert_eq!(
            vfs[1],
            (
                1,
                VfSettings {
                    mac: MacAddr([2, 0, 0, 0, 0, 0x42]),
                    vlan: 100,
                    qos: 3,
                    vlan_proto: VlanProto::Dot1Ad,
                    spoofchk: None,
                    trust: None,
                    link_state: Some(VfLinkState::Disable),
                    min_tx_rate: 10,
                    max_tx_rate: 500,
                }
            )
        );
        assert_eq!(vfs[2].1.max_tx_rate, 300);
        assert_eq!(vfs[2].1.vlan, 7);
        assert_eq!(vfs[2].1.vlan_proto, VlanProto::Dot1Q);
        assert_eq!(vfs[2].1.spoofchk, Some(false));
        assert_eq!(vfs[2].1.trust, Some(true));
        assert_eq!(vfs[2].1.link_state, Some(VfLinkState::Enable));
    }

    #[test]
    fn a_link_without_vf_list_has_no_vfs_and_garbage_is_an_error() {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p.extend(nla(3, b"veth0\0"));
        assert!(parse_vfs(&p).unwrap().is_empty());
        assert!(parse_vfs(&[0u8; 4]).is_err());
        let mut bad = vec![0u8; IFINFOMSG_LEN];
        bad.extend(nla(
            IFLA_VFINFO_LIST,
            &nla(IFLA_VF_INFO, &nla(IFLA_VF_MAC, &[1])),
        ));
        assert!(parse_vfs(&bad).is_err());
    }

    /// Decodes a request the way the kernel would see it, through the crate's parser.
    fn decode(bytes: &[u8]) -> (NetlinkHeader, LinkMessage) {
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).unwrap();
        assert_eq!(m.header.length as usize, bytes.len());
        match m.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::SetLink(l) | RouteNetlinkMessage::GetLink(l),
            ) => (m.header, l),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn only_vf_info(l: &LinkMessage) -> Vec<VfInfo> {
        let lists: Vec<&Vec<LinkVfInfo>> = l
            .attributes
            .iter()
            .filter_map(|a| match a {
                LinkAttribute::VfInfoList(v) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].len(), 1);
        lists[0][0].0.clone()
    }

    #[test]
    fn set_messages_round_trip_one_knob_each() {
        let mac = MacAddr([2, 1, 2, 3, 4, 5]);
        let cases = [
            (VfChange::Mac(mac), VfInfo::Mac(VfInfoMac::new(3, &mac.0))),
            (
                VfChange::Vlan {
                    vlan: 42,
                    qos: 5,
                    proto: VlanProto::Dot1Q,
                },
                VfInfo::Vlan(VfInfoVlan::new(3, 42, 5)),
            ),
            (
                VfChange::Vlan {
                    vlan: 42,
                    qos: 5,
                    proto: VlanProto::Dot1Ad,
                },
                VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                    3,
                    42,
                    5,
                    VlanProtocol::Ieee8021Ad,
                ))]),
            ),
            (
                VfChange::SpoofChk(false),
                VfInfo::SpoofCheck(VfInfoSpoofCheck::new(3, false)),
            ),
            (
                VfChange::Trust(true),
                VfInfo::Trust(VfInfoTrust::new(3, true)),
            ),
            (
                VfChange::LinkState(VfLinkState::Disable),
                VfInfo::LinkState(VfInfoLinkState::new(3, NlVfLinkState::Disable)),
            ),
            (
                VfChange::Rate { min: 1, max: 900 },
                VfInfo::Rate(VfInfoRate::new(3, 1, 900)),
            ),
        ];
        for (change, want) in cases {
            let bytes = encode(
                set_vf_message("ens1f0", 3, &change),
                77,
                NLM_F_REQUEST | NLM_F_ACK,
            );
            let (h, l) = decode(&bytes);
            assert_eq!(h.message_type, 19, "RTM_SETLINK"); // RTM_SETLINK
            assert_eq!(h.sequence_number, 77);
            assert_eq!(h.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(l.header.index, 0, "the PF is found by name");
            assert!(
                l.attributes
                    .contains(&LinkAttribute::IfName("ens1f0".into()))
            );
            assert_eq!(only_vf_info(&l), vec![want], "{change:?}");
        }
    }

    /// The bytes of the one VF attribute inside a SETLINK request.
    fn vf_attr_bytes(bytes: &[u8]) -> (u16, Vec<u8>) {
        let p = &bytes[NLMSG_HDRLEN + IFINFOMSG_LEN..];
        let list = NlasIterator::new(p)
            .map(Result::unwrap)
            .find(|n| n.kind() == IFLA_VFINFO_LIST)
            .unwrap();
        let info = NlasIterator::new(list.value()).next().unwrap().unwrap();
        let attr = NlasIterator::new(info.value()).next().unwrap().unwrap();
        (attr.kind(), attr.value().to_vec())
    }

    #[test]
    fn vlan_8021ad_protocol_is_big_endian_on_the_wire_and_parses_back() {
        let change = VfChange::Vlan {
            vlan: 100,
            qos: 2,
            proto: VlanProto::Dot1Ad,
        };
        let bytes = encode(set_vf_message("pf", 7, &change), 1, NLM_F_REQUEST);
        let (kind, v) = vf_attr_bytes(&bytes);
        assert_eq!(kind, IFLA_VF_VLAN_LIST);
        let entry = NlasIterator::new(&v[..]).next().unwrap().unwrap();
        assert_eq!(entry.kind(), 1, "IFLA_VF_VLAN_INFO");
        let e = entry.value();
        assert_eq!(e.len(), 16);
        assert_eq!(&e[0..12], &words(&[7, 100, 2])[..]);
        assert_eq!(&e[12..14], &[0x88, 0xa8], "ETH_P_8021AD in network order");
        // And our reply parser reads that layout back as 802.1ad.
        let mut info = nla(IFLA_VF_MAC, &[&7u32.to_ne_bytes()[..], &[0u8; 32]].concat());
        info.extend(nla(IFLA_VF_VLAN_LIST, &v));
        let p = link_payload(&[nla(IFLA_VF_INFO, &info)]);
        let vfs = parse_vfs(&p).unwrap();
        assert_eq!(vfs[0].0, 7);
        assert_eq!(
            (vfs[0].1.vlan, vfs[0].1.qos, vfs[0].1.vlan_proto),
            (100, 2, VlanProto::Dot1Ad)
        );
        // Plain 802.1Q uses IFLA_VF_VLAN (struct ifla_vf_vlan, no protocol).
        let q = encode(
            set_vf_message(
                "pf",
                7,
                &VfChange::Vlan {
                    vlan: 100,
                    qos: 2,
                    proto: VlanProto::Dot1Q,
                },
            ),
            1,
            NLM_F_REQUEST,
        );
        assert_eq!(vf_attr_bytes(&q), (IFLA_VF_VLAN, words(&[7, 100, 2])));
    }

    #[test]
    fn getlink_asks_for_vfs_without_stats() {
        let bytes = encode(getlink_vf_message("ens1f0"), 5, NLM_F_REQUEST | NLM_F_ACK);
        let (h, l) = decode(&bytes);
        assert_eq!(h.message_type, 18, "RTM_GETLINK");
        // IFLA_EXT_MASK (29) = RTEXT_FILTER_VF | RTEXT_FILTER_SKIP_STATS.
        let p = &bytes[NLMSG_HDRLEN + IFINFOMSG_LEN..];
        let mask = NlasIterator::new(p)
            .map(Result::unwrap)
            .find(|n| n.kind() == 29)
            .unwrap();
        assert_eq!(mask.value(), &(1u32 | 8).to_ne_bytes());
        assert!(
            l.attributes
                .contains(&LinkAttribute::IfName("ens1f0".into()))
        );
    }

    fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(
            &u32::try_from(NLMSG_HDRLEN + payload.len())
                .unwrap()
                .to_ne_bytes(),
        );
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    #[test]
    fn datagram_parsing_acks_errors_with_extack_and_dumps() {
        // An answer, then the ACK, in one datagram.
        let mut d = nlmsg(16, 0, 9, &[1, 2, 3, 4, 5]);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend(nlmsg(19, 5, 9, &[])); // echoed request header
        d.extend(nlmsg(NLMSG_ERROR, NLM_F_CAPPED, 9, &ack));
        let r = parse_datagram(&d).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            (
                9,
                Reply::Data {
                    kind: 16,
                    flags: 0,
                    payload: &[1, 2, 3, 4, 5][..]
                }
            )
        );
        assert_eq!(r[1], (9, Reply::Ack));

        // EOPNOTSUPP (95) with an extended-ACK message after a capped echo.
        let mut e = (-95i32).to_ne_bytes().to_vec();
        e.extend(nlmsg(19, 5, 10, &[]));
        e.extend(nla(NLMSGERR_ATTR_MSG, b"VF link state not supported\0"));
        let d = nlmsg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 10, &e);
        assert_eq!(
            parse_datagram(&d).unwrap(),
            vec![(
                10,
                Reply::Error {
                    errno: 95,
                    msg: Some("VF link state not supported".into())
                }
            )]
        );
        let err = RtError::Nack {
            errno: 95,
            msg: Some("x".into()),
        }
        .into_net("pf vf 0 link_state");
        assert!(err.is_not_supported(), "{err}");
        assert!(err.to_string().contains("kernel: x"), "{err}");

        // A non-capped error echoes the whole request before the TLVs.
        let req = nlmsg(19, 5, 11, &[0u8; 20]);
        let mut e = (-16i32).to_ne_bytes().to_vec();
        e.extend(&req);
        e.extend(nla(NLMSGERR_ATTR_MSG, b"busy\0"));
        let d = nlmsg(NLMSG_ERROR, NLM_F_ACK_TLVS, 11, &e);
        assert_eq!(
            parse_datagram(&d).unwrap()[0].1,
            Reply::Error {
                errno: 16,
                msg: Some("busy".into())
            }
        );

        // NLMSG_DONE carries the dump's errno.
        let d = nlmsg(NLMSG_DONE, 2, 12, &(-4i32).to_ne_bytes());
        assert_eq!(parse_datagram(&d).unwrap()[0].1, Reply::Done { errno: 4 });
        let d = nlmsg(NLMSG_DONE, 2, 12, &0i32.to_ne_bytes());
        assert_eq!(parse_datagram(&d).unwrap()[0].1, Reply::Done { errno: 0 });

        // A length that runs past the datagram is an error, not a panic.
        let mut bad = nlmsg(16, 0, 1, &[0u8; 8]);
        bad.truncate(20);
        assert!(parse_datagram(&bad).is_err());
    }
}
