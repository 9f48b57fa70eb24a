//! Real [`NetdevOps`] over rtnetlink: [`RtNetdevOps`] moves a VF's netdev into a pod's netns
//! under `CNI_IFNAME` and brings it back under its host name.
//!
//! Talking to another netns without `unsafe` and without leaving any thread in it: a netlink
//! socket belongs to the netns it was created in, whatever thread uses it later. So a
//! short-lived thread enters the netns (`setns`), creates the socket, hands it back and exits;
//! the caller's thread then uses that socket. Moving a link to a netns is `RTM_SETLINK` with
//! `IFLA_NET_NS_FD`; "home" is the netns of the process (`/proc/self/ns/net`, opened once).
//!
//! Names: a link is never renamed in vfplugd's netns on its way out (udev may be renaming it at
//! the same moment). Going in, one `RTM_SETLINK` carries both the target netns and the pod name:
//! the kernel moves the link and renames it inside the pod's netns (using the pod name directly
//! if the host name is taken there). Coming back, it is renamed inside the pod's netns first
//! (to the host name, or a temporary `vfp<index>` if that is taken there), so it arrives home
//! under the right name. Altnames are removed before going in (they travel with the link and
//! would collide: sriov-cni #445, #250) and put back at home.
//!
//! Every operation is synchronous: call from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use netlink_packet_core::Parseable;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, Prop};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rustix::io::Errno;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use vfplug_core::MacAddr;

use crate::net::{
    IpNet, LinkInfo, NetError, NetdevOps, PlaceRequest, RetrieveRequest, Retrieved, RouteSpec,
};
use crate::rtnl::{Conn, RtError};

/// `NSFS_MAGIC`: the file system of namespace files (`/proc/PID/ns/*` and their bind mounts).
const NSFS_MAGIC: u64 = 0x6e73_6673;
/// The longest interface name (`IFNAMSIZ` - 1).
const IFNAME_MAX: usize = 15;

/// Opens a netns file. `gone`: it does not exist, or is no namespace any more (e.g. the
/// file left behind under /var/run/netns once the bind mount is gone).
fn open_netns(path: &Path) -> Result<File, NetError> {
    let err = |gone, source| NetError::Netns {
        path: path.to_owned(),
        gone,
        source,
    };
    let f = File::open(path).map_err(|e| {
        let gone = e.kind() == io::ErrorKind::NotFound;
        err(gone, e)
    })?;
    let st = rustix::fs::fstatfs(&f).map_err(|e| err(false, e.into()))?;
    // f_type is signed on some targets; the magic fits either way.
    #[allow(clippy::cast_sign_loss)]
    if st.f_type as u64 != NSFS_MAGIC {
        return Err(err(
            true,
            io::Error::new(io::ErrorKind::InvalidInput, "not a namespace file"),
        ));
    }
    Ok(f)
}

/// An rtnetlink socket inside the netns `ns`, created by a thread that enters it and exits.
fn conn_in(ns: &File, path: &Path) -> Result<Conn, NetError> {
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Conn> {
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
            Conn::open()
        })
        .join()
    });
    match joined {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(NetError::Netns {
            path: path.to_owned(),
            gone: false,
            source,
        }),
        Err(_) => Err(NetError::Netns {
            path: path.to_owned(),
            gone: false,
            source: io::Error::other("the thread entering the netns panicked"),
        }),
    }
}

/// One netns as seen through one socket, with the path for error messages.
struct Ns<'a> {
    conn: &'a mut Conn,
    /// `None`: vfplugd's own.
    path: Option<&'a Path>,
}

fn link_from(m: &LinkMessage) -> LinkInfo {
    let mut l = LinkInfo {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..LinkInfo::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Mtu(n) => l.mtu = *n,
            LinkAttribute::Address(b) => {
                l.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr);
            }
            LinkAttribute::PropList(props) => {
                for p in props {
                    if let Prop::AltIfName(n) = p {
                        l.altnames.push(n.clone());
                    }
                }
            }
            LinkAttribute::ParentDevName(n) => l.parent = Some(n.clone()),
            _ => {}
        }
    }
    l
}

/// A link message addressed by index (0: by the name attribute instead).
fn link_msg(index: u32, attrs: Vec<LinkAttribute>) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes = attrs;
    m
}

fn addr_family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

impl Ns<'_> {
    fn where_(&self) -> String {
        self.path
            .map(|p| format!(" in netns {}", p.display()))
            .unwrap_or_default()
    }

    fn request(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<Vec<u8>>, RtError> {
        self.conn.request(&msg, false)
    }

    /// The link with this name (or alternative name), without addresses.
    fn get(&mut self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        // IFLA_IFNAME is cut at 15 bytes by the kernel; longer names can only be altnames.
        let attr = if name.len() > IFNAME_MAX {
            LinkAttribute::Other(netlink_packet_core::DefaultNla::new(
                53, // IFLA_ALT_IFNAME
                [name.as_bytes(), &[0]].concat(),
            ))
        } else {
            LinkAttribute::IfName(name.to_owned())
        };
        self.get_by(link_msg(0, vec![attr]), &format!("looking up {name}"))
    }

    fn get_index(&mut self, index: u32) -> Result<Option<LinkInfo>, NetError> {
        self.get_by(link_msg(index, vec![]), &format!("looking up link {index}"))
    }

    fn get_by(&mut self, m: LinkMessage, op: &str) -> Result<Option<LinkInfo>, NetError> {
        let op = format!("{op}{}", self.where_());
        match self.request(RouteNetlinkMessage::GetLink(m)) {
            Ok(r) => {
                let p = r.first().ok_or_else(|| NetError::Protocol {
                    op: op.clone(),
                    reason: "no RTM_NEWLINK in the answer".into(),
                })?;
                let m = LinkMessage::parse(p).map_err(|e| NetError::Protocol {
                    op,
                    reason: e.to_string(),
                })?;
                Ok(Some(link_from(&m)))
            }
            Err(e) if e.is(Errno::NODEV) => Ok(None),
            Err(e) => Err(e.into_net(&op)),
        }
    }

    /// The link's global-scope addresses, with the messages that delete them.
    fn addresses(&mut self, index: u32) -> Result<Vec<(IpNet, AddressMessage)>, NetError> {
        let op = format!("listing the addresses of link {index}{}", self.where_());
        let mut q = AddressMessage::default();
        q.header.index = index;
        let replies = self
            .conn
            .request(&RouteNetlinkMessage::GetAddress(q), true)
            .map_err(|e| e.into_net(&op))?;
        let mut out = Vec::new();
        for p in replies {
            let m = AddressMessage::parse(&p[..]).map_err(|e| NetError::Protocol {
                op: op.clone(),
                reason: e.to_string(),
            })?;
            // Old kernels ignore the index in a dump request: filter here too.
            if m.header.index != index || m.header.scope != AddressScope::Universe {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                let net = IpNet {
                    addr,
                    prefix: m.header.prefix_len,
                };
                out.push((net, m));
            }
        }
        Ok(out)
    }

    fn set(&mut self, index: u32, attrs: Vec<LinkAttribute>) -> Result<(), RtError> {
        self.request(RouteNetlinkMessage::SetLink(link_msg(index, attrs)))
            .map(drop)
    }

    fn set_up(&mut self, index: u32, up: bool) -> Result<(), NetError> {
        let mut m = link_msg(index, vec![]);
        if up {
            m.header.flags = LinkFlags::Up;
        }
        m.header.change_mask = LinkFlags::Up;
        let op = format!(
            "setting link {index} {}{}",
            if up { "up" } else { "down" },
            self.where_()
        );
        self.request(RouteNetlinkMessage::SetLink(m))
            .map(drop)
            .map_err(|e| e.into_net(&op))
    }

    /// Renames; EEXIST is [`NetError::Exists`].
    fn rename(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let op = format!("renaming link {index} to {name}{}", self.where_());
        self.set(index, vec![LinkAttribute::IfName(name.to_owned())])
            .map_err(|e| exists_or(e, &op, name))
    }

    fn set_mac(&mut self, index: u32, mac: MacAddr) -> Result<(), RtError> {
        self.set(index, vec![LinkAttribute::Address(mac.0.to_vec())])
    }

    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        let op = format!("setting the MTU of link {index} to {mtu}{}", self.where_());
        self.set(index, vec![LinkAttribute::Mtu(mtu)])
            .map_err(|e| e.into_net(&op))
    }

    /// Moves the link to the netns `to` under `name` (see the module docs for how the kernel
    /// treats the name).
    fn move_to(&mut self, index: u32, to: &File, name: &str) -> Result<(), NetError> {
        let op = format!(
            "moving link {index}{} to another netns as {name}",
            self.where_()
        );
        self.set(
            index,
            vec![
                LinkAttribute::NetNsFd(to.as_raw_fd()),
                LinkAttribute::IfName(name.to_owned()),
            ],
        )
        .map_err(|e| exists_or(e, &op, name))
    }

    fn del_altnames(&mut self, index: u32, names: &[String]) -> Result<(), NetError> {
        let op = format!(
            "removing altnames {names:?} of link {index}{}",
            self.where_()
        );
        let props = names.iter().map(|n| Prop::AltIfName(n.clone())).collect();
        let m = link_msg(index, vec![LinkAttribute::PropList(props)]);
        self.request(RouteNetlinkMessage::DelLinkProp(m))
            .map(drop)
            .map_err(|e| e.into_net(&op))
    }

    /// Adds altnames one by one; a name already there (on this link or another) is skipped
    /// with a warning, as there is nothing better to do with it.
    fn add_altnames(&mut self, index: u32, names: &[String]) -> Result<(), NetError> {
        for n in names {
            let op = format!("adding altname {n} to link {index}{}", self.where_());
            let m = link_msg(
                index,
                vec![LinkAttribute::PropList(vec![Prop::AltIfName(n.clone())])],
            );
            match self
                .conn
                .request_create(&RouteNetlinkMessage::NewLinkProp(m))
            {
                Ok(_) => {}
                Err(e) if e.is(Errno::EXIST) => {
                    tracing::debug!(altname = %n, index, "altname already present")
                }
                Err(e) => return Err(e.into_net(&op)),
            }
        }
        Ok(())
    }

    fn add_address(&mut self, index: u32, net: IpNet) -> Result<(), NetError> {
        let op = format!("adding {net} to link {index}{}", self.where_());
        let mut m = AddressMessage::default();
        m.header.family = addr_family(net.addr);
        m.header.prefix_len = net.prefix;
        m.header.index = index;
        m.header.scope = AddressScope::Universe;
        m.header.flags = AddressHeaderFlags::empty();
        if net.addr.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(net.addr));
        }
        m.attributes.push(AddressAttribute::Address(net.addr));
        self.conn
            .request_create(&RouteNetlinkMessage::NewAddress(m))
            .map(drop)
            .map_err(|e| exists_or(e, &op, &net.to_string()))
    }

    fn flush_addresses(&mut self, index: u32) -> Result<(), NetError> {
        for (net, m) in self.addresses(index)? {
            let op = format!("removing {net} from link {index}{}", self.where_());
            match self.request(RouteNetlinkMessage::DelAddress(m)) {
                // Gone already (e.g. with a primary address of the same subnet).
                Err(e) if e.is(Errno::ADDRNOTAVAIL) => {}
                r => r.map(drop).map_err(|e| e.into_net(&op))?,
            }
        }
        Ok(())
    }

    fn add_route(&mut self, index: u32, r: &RouteSpec) -> Result<(), NetError> {
        let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
        let op = format!(
            "adding route {}{via} on link {index}{}",
            r.dst,
            self.where_()
        );
        let mut m = RouteMessage::default();
        m.header.address_family = addr_family(r.dst.addr);
        m.header.destination_prefix_length = r.dst.prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        // IPv4 on-link routes are link scope (like `ip route add ... dev X`); IPv6 has none.
        m.header.scope = if r.gw.is_none() && r.dst.addr.is_ipv4() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        let route_addr = |a: IpAddr| match a {
            IpAddr::V4(v) => RouteAddress::Inet(v),
            IpAddr::V6(v) => RouteAddress::Inet6(v),
        };
        if r.dst.prefix > 0 {
            m.attributes
                .push(RouteAttribute::Destination(route_addr(r.dst.addr)));
        }
        if let Some(gw) = r.gw {
            m.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(index));
        self.conn
            .request_create(&RouteNetlinkMessage::NewRoute(m))
            .map(drop)
            .map_err(|e| exists_or(e, &op, &r.dst.to_string()))
    }

    /// A name for a link that is free in this netns: `base` if free, else `vfp<index>[-n]`.
    fn free_name(&mut self, base: &str, index: u32) -> Result<String, NetError> {
        if self.get(base)?.is_none() {
            return Ok(base.to_owned());
        }
        for n in 0..100 {
            let cand = if n == 0 {
                format!("vfp{index}")
            } else {
                format!("vfp{index}-{n}")
            };
            if cand.len() <= IFNAME_MAX && self.get(&cand)?.is_none() {
                return Ok(cand);
            }
        }
        Err(NetError::Exists {
            op: format!("finding a free temporary name{}", self.where_()),
            name: format!("vfp{index}"),
        })
    }
}

fn exists_or(e: RtError, op: &str, name: &str) -> NetError {
    if e.is(Errno::EXIST) {
        NetError::Exists {
            op: op.to_owned(),
            name: name.to_owned(),
        }
    } else {
        e.into_net(op)
    }
}

/// How far a [`RtNetdevOps::place`] got, for undoing it.
#[derive(Debug, Default)]
struct Progress {
    altnames_removed: bool,
    downed: bool,
    move_tried: bool,
    pod_index: Option<u32>,
    mac_changed: bool,
    mtu_changed: bool,
}

/// [`NetdevOps`] over rtnetlink. See the module docs.
#[derive(Debug)]
pub struct RtNetdevOps {
    /// vfplugd's own netns.
    home: File,
    home_path: PathBuf,
    /// Idle sockets in `home`, so concurrent calls do not wait for each other.
    idle: Mutex<Vec<Conn>>,
    /// Whether a link without `IFLA_PARENT_DEV_NAME` is known to have no parent device (see
    /// [`kernel_reports_parents`]).
    parents_reported: bool,
}

/// Whether this kernel reports `IFLA_PARENT_DEV_NAME` for every link that has a parent
/// device. The attribute came in the 5.x series; only from 6.0 on is its absence taken to mean
/// "a virtual link", conservatively. Unknown: `false` (the MACs decide then).
fn kernel_reports_parents() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| r.split('.').next()?.trim().parse::<u32>().ok())
        .is_some_and(|major| major >= 6)
}

/// A socket in vfplugd's netns, back to the idle list when dropped.
struct HomeConn<'a> {
    ops: &'a RtNetdevOps,
    conn: Option<Conn>,
}

impl Drop for HomeConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.ops
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
        }
    }
}

impl HomeConn<'_> {
    fn ns(&mut self) -> Ns<'_> {
        Ns {
            // Always Some until dropped.
            conn: self.conn.as_mut().unwrap_or_else(|| unreachable!()),
            path: None,
        }
    }
}

impl RtNetdevOps {
    /// Opens vfplugd's netns (`/proc/self/ns/net`: the process's, whatever thread calls).
    pub fn new() -> Result<Self, NetError> {
        Self::with_home(Path::new("/proc/self/ns/net"))
    }

    /// Uses the netns at `path` as "home" (tests).
    pub fn with_home(path: &Path) -> Result<Self, NetError> {
        let home = open_netns(path)?;
        let first = conn_in(&home, path)?;
        Ok(Self {
            home,
            home_path: path.to_owned(),
            idle: Mutex::new(vec![first]),
            parents_reported: kernel_reports_parents(),
        })
    }

    fn home(&self) -> Result<HomeConn<'_>, NetError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match idle {
            Some(c) => c,
            None => conn_in(&self.home, &self.home_path)?,
        };
        Ok(HomeConn {
            ops: self,
            conn: Some(conn),
        })
    }

    fn with_addresses(ns: &mut Ns<'_>, mut l: LinkInfo) -> Result<LinkInfo, NetError> {
        l.addresses = ns.addresses(l.index)?.into_iter().map(|(n, _)| n).collect();
        Ok(l)
    }

    fn place_steps(
        &self,
        host: &mut Ns<'_>,
        pod: &mut Ns<'_>,
        ns: &File,
        req: &PlaceRequest,
        orig: &LinkInfo,
        p: &mut Progress,
    ) -> Result<LinkInfo, NetError> {
        if !orig.altnames.is_empty() {
            host.del_altnames(orig.index, &orig.altnames)?;
            p.altnames_removed = true;
        }
        if orig.up {
            host.set_up(orig.index, false)?;
            p.downed = true;
        }
        p.move_tried = true;
        host.move_to(orig.index, ns, &req.pod_ifname)?;
        let l = pod
            .get(&req.pod_ifname)?
            .filter(|l| l.name == req.pod_ifname)
            .ok_or_else(|| NetError::Protocol {
                op: format!("moving {} into {}", req.host_name, req.netns.display()),
                reason: format!("moved, but no {} there", req.pod_ifname),
            })?;
        p.pod_index = Some(l.index);
        if let Some(mac) = req.mac.filter(|m| Some(*m) != l.mac) {
            let op = format!("setting the MAC of {} to {mac}", req.pod_ifname);
            pod.set_mac(l.index, mac).map_err(|e| e.into_net(&op))?;
            p.mac_changed = true;
        }
        if let Some(mtu) = req.mtu.filter(|m| *m != l.mtu) {
            pod.set_mtu(l.index, mtu)?;
            p.mtu_changed = true;
        }
        pod.set_up(l.index, true)?;
        for a in &req.addresses {
            pod.add_address(l.index, *a)?;
        }
        for r in &req.routes {
            pod.add_route(l.index, r)?;
        }
        let now = pod
            .get_index(l.index)?
            .ok_or_else(|| NetError::NoSuchLink {
                name: req.pod_ifname.clone(),
                netns: Some(req.netns.clone()),
            })?;
        Self::with_addresses(pod, now)
    }

    /// Brings link `index` of `pod` home as `arrive_as`: down, addresses flushed, renamed in
    /// the pod first, then moved. Returns its index at home.
    fn bring_home(
        &self,
        pod: &mut Ns<'_>,
        index: u32,
        host: &mut Ns<'_>,
        arrive_as: &str,
    ) -> Result<u32, NetError> {
        let l = pod.get_index(index)?.ok_or_else(|| NetError::NoSuchLink {
            name: format!("link {index}"),
            netns: pod.path.map(Path::to_owned),
        })?;
        if l.up {
            pod.set_up(index, false)?;
        }
        // The kernel drops a link's addresses when it changes netns; flushing here as well
        // keeps that from depending on it (and on the routes that go with them).
        pod.flush_addresses(index)?;
        if l.name != arrive_as {
            let name = pod.free_name(arrive_as, index)?;
            pod.rename(index, &name)?;
        }
        pod.move_to(index, &self.home, arrive_as)?;
        let back = host
            .get(arrive_as)?
            .filter(|h| h.name == arrive_as)
            .ok_or_else(|| NetError::Protocol {
                op: format!("moving {arrive_as} home"),
                reason: format!("moved, but no {arrive_as} here"),
            })?;
        Ok(back.index)
    }

    /// Puts a failed placement back; errors are logged (the caller returns the first error).
    fn undo_place(
        &self,
        host: &mut Ns<'_>,
        pod: &mut Ns<'_>,
        req: &PlaceRequest,
        orig: &LinkInfo,
        p: &Progress,
    ) -> Result<(), NetError> {
        let mut index = orig.index;
        if p.move_tried {
            let still_home = host
                .get_index(orig.index)?
                .is_some_and(|l| l.name == orig.name);
            if !still_home {
                // Where the kernel left it: under the pod name, or (if the rename part of the
                // move failed) under its host name; by index first, which the move keeps.
                let mut found = match p.pod_index {
                    Some(i) => pod.get_index(i)?,
                    None => None,
                };
                for name in [&req.pod_ifname, &req.host_name] {
                    if found.is_none() {
                        found = pod.get(name)?.filter(|l| l.name == *name);
                    }
                }
                let Some(l) = found else {
                    return Err(NetError::NoSuchLink {
                        name: req.pod_ifname.clone(),
                        netns: Some(req.netns.clone()),
                    });
                };
                // Someone may have taken the host name meanwhile: then it comes home under a
                // temporary name rather than stay in the pod.
                let arrive_as = host.free_name(&req.host_name, l.index)?;
                if arrive_as != req.host_name {
                    tracing::error!(
                        host_name = %req.host_name,
                        temporary = %arrive_as,
                        "host name taken while placing; netdev brought home under a temporary name"
                    );
                }
                index = self.bring_home(pod, l.index, host, &arrive_as)?;
            }
        }
        if p.mac_changed
            && let Some(mac) = orig.mac
        {
            host.set_mac(index, mac)
                .map_err(|e| e.into_net(&format!("restoring the MAC of {}", req.host_name)))?;
        }
        if p.mtu_changed {
            host.set_mtu(index, orig.mtu)?;
        }
        if p.altnames_removed {
            host.add_altnames(index, &orig.altnames)?;
        }
        if p.downed {
            host.set_up(index, true)?;
        }
        Ok(())
    }

    /// At home: down, host name (renamed from `current` if needed), MAC, MTU, altnames.
    fn restore_at_home(
        &self,
        host: &mut Ns<'_>,
        index: u32,
        req: &RetrieveRequest,
    ) -> Result<(), NetError> {
        let l = host.get_index(index)?.ok_or_else(|| NetError::NoSuchLink {
            name: req.host_name.clone(),
            netns: None,
        })?;
        if l.up {
            host.set_up(index, false)?;
        }
        if l.name != req.host_name {
            if host.get(&req.host_name)?.is_some_and(|o| o.index != index) {
                return Err(NetError::Exists {
                    op: format!("renaming {} back", l.name),
                    name: req.host_name.clone(),
                });
            }
            host.rename(index, &req.host_name)?;
        }
        if let Some(mac) = req.host_mac.filter(|m| Some(*m) != l.mac) {
            match host.set_mac(index, mac) {
                Ok(()) => {}
                // A VF whose admin MAC is set on the PF may refuse its own MAC until the PF
                // side is restored (which the caller does next, and which sets it anyway).
                Err(e) if e.is(Errno::PERM) || e.is(Errno::ADDRNOTAVAIL) => {
                    tracing::warn!(netdev = %req.host_name, %mac, error = ?e,
                        "the driver refused the netdev MAC; the PF's admin MAC decides it");
                }
                Err(e) => {
                    return Err(e.into_net(&format!("restoring the MAC of {}", req.host_name)));
                }
            }
        }
        if req.host_mtu != 0 && req.host_mtu != l.mtu {
            host.set_mtu(index, req.host_mtu)?;
        }
        let missing: Vec<String> = req
            .altnames
            .iter()
            .filter(|a| !l.altnames.contains(a))
            .cloned()
            .collect();
        host.add_altnames(index, &missing)
    }

    fn retrieve_from_pod(
        &self,
        host: &mut Ns<'_>,
        path: &Path,
        req: &RetrieveRequest,
    ) -> Result<bool, NetError> {
        let ns = match open_netns(path) {
            Ok(ns) => ns,
            Err(NetError::Netns { gone: true, .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut conn = conn_in(&ns, path)?;
        let mut pod = Ns {
            conn: &mut conn,
            path: Some(path),
        };
        let Some(l) = pod
            .get(&req.pod_ifname)?
            .filter(|l| l.name == req.pod_ifname)
        else {
            return Ok(false);
        };
        // The pod's own interface of that name (an ADD refused with "exists" comes back
        // here): not renamed, moved or changed.
        if let Err(why) = req.identify(&l, self.parents_reported) {
            tracing::warn!(netns = %path.display(), link = %l.name, %why,
                "a link in the pod has the VF's name but is not the VF; left alone");
            return Ok(false);
        }
        if let Some(other) = host.get(&req.host_name)? {
            return Err(NetError::Exists {
                op: format!(
                    "bringing {} back from {} (taken by link {})",
                    req.pod_ifname,
                    path.display(),
                    other.index
                ),
                name: req.host_name.clone(),
            });
        }
        let index = self.bring_home(&mut pod, l.index, host, &req.host_name)?;
        self.restore_at_home(host, index, req)?;
        Ok(true)
    }
}

impl NetdevOps for RtNetdevOps {
    fn link(&self, netns: Option<&Path>, name: &str) -> Result<Option<LinkInfo>, NetError> {
        let mut pod_conn;
        let mut home;
        let mut ns = match netns {
            None => {
                home = self.home()?;
                home.ns()
            }
            Some(p) => {
                pod_conn = conn_in(&open_netns(p)?, p)?;
                Ns {
                    conn: &mut pod_conn,
                    path: Some(p),
                }
            }
        };
        match ns.get(name)? {
            Some(l) => Self::with_addresses(&mut ns, l).map(Some),
            None => Ok(None),
        }
    }

    fn place(&self, req: &PlaceRequest) -> Result<LinkInfo, NetError> {
        let ns = open_netns(&req.netns)?;
        let mut pod_conn = conn_in(&ns, &req.netns)?;
        let mut pod = Ns {
            conn: &mut pod_conn,
            path: Some(&req.netns),
        };
        let mut home = self.home()?;
        let mut host = home.ns();
        let orig = host
            .get(&req.host_name)?
            .filter(|l| l.name == req.host_name)
            .ok_or_else(|| NetError::NoSuchLink {
                name: req.host_name.clone(),
                netns: None,
            })?;
        if pod.get(&req.pod_ifname)?.is_some() {
            return Err(NetError::Exists {
                op: format!("placing {} into {}", req.host_name, req.netns.display()),
                name: req.pod_ifname.clone(),
            });
        }
        let mut p = Progress::default();
        match self.place_steps(&mut host, &mut pod, &ns, req, &orig, &mut p) {
            Ok(l) => Ok(l),
            Err(e) => {
                if let Err(u) = self.undo_place(&mut host, &mut pod, req, &orig, &p) {
                    tracing::error!(netdev = %req.host_name, error = %e, undo_error = %u,
                        "placing failed and undoing it failed too");
                }
                Err(e)
            }
        }
    }

    fn retrieve(&self, req: &RetrieveRequest) -> Result<Retrieved, NetError> {
        let mut home = self.home()?;
        let mut host = home.ns();
        if let Some(path) = &req.netns
            && self.retrieve_from_pod(&mut host, path, req)?
        {
            return Ok(Retrieved::FromPod);
        }
        // At home already (a dead netns gives physical netdevs back to the initial netns, under
        // their pod name or `devN`), or after an earlier retrieve.
        let mut seen: Vec<&str> = Vec::new();
        let order = std::iter::once(&req.host_name).chain(&req.host_candidates);
        for cand in order {
            if seen.contains(&cand.as_str()) {
                continue;
            }
            seen.push(cand);
            let Some(l) = host.get(cand)?.filter(|l| l.name == *cand) else {
                continue;
            };
            if *cand == req.host_name {
                if let Some(why) = req.foreign_at_home(&l, self.parents_reported) {
                    tracing::warn!(candidate = %cand, %why, "a link has the VF's host name but is not the VF; skipped");
                    continue;
                }
            } else {
                // A name other than the host name (e.g. `eth0`) may belong to one of the host's
                // own links. A netdev back from a dead netns is down (the kernel closes it when
                // it changes netns), so an up link under such a name is not ours.
                if l.up {
                    tracing::warn!(candidate = %cand, "a link of that name is up: not the VF's; skipped");
                    continue;
                }
                if let Err(why) = req.identify(&l, self.parents_reported) {
                    tracing::warn!(candidate = %cand, %why, "a link of that name is not the VF; skipped");
                    continue;
                }
            }
            self.restore_at_home(&mut host, l.index, req)?;
            return Ok(Retrieved::FromHost);
        }
        Ok(Retrieved::NotFound)
    }
}
