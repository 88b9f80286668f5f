//! A pod's network plumbing over rtnetlink, without spawning `ip`: the veth pair (its peer
//! created directly inside the pod's namespace, on the bridge and up in the same message), the
//! pod side's address, `lo` and default route, and deletion.
//!
//! Blocking and single-threaded on purpose: `netlink-packet-route` builds and parses the
//! messages, `netlink-sys` is the socket, and requests are sent in batches of one `sendmsg`,
//! each acknowledged. A socket for another namespace is opened by stepping this thread into
//! it and back (a socket keeps the namespace it was made in), so no thread is started and the
//! CLI can still fork afterwards.

use std::{
    fs::File,
    io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage as Rt,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;

/// A blocking rtnetlink socket in one network namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// An interface as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

impl Rtnl {
    /// A socket in this thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(32 * 1024),
        })
    }

    /// A socket in the network namespace `ns` (a `/proc/PID/ns/net` or a bind mount of one).
    pub fn open_in(ns: &File) -> io::Result<Self> {
        let here = File::open("/proc/thread-self/ns/net")?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rtnl = Self::open();
        // Back before anything else runs in this thread; failing to is not survivable.
        nix::sched::setns(here.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("return to this process's network namespace");
        rtnl
    }

    /// Sends `msgs` in one `sendmsg` and waits for every acknowledgement; returns the data
    /// replies of each. The first error is returned (the kernel still runs the rest).
    fn batch(&mut self, msgs: Vec<(Rt, u16)>) -> io::Result<Vec<Vec<Rt>>> {
        let first = self.seq + 1;
        let n = msgs.len();
        let mut out = Vec::new();
        for (m, flags) in msgs {
            self.seq += 1;
            let mut nl = NetlinkMessage::from(m);
            nl.header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
            nl.header.sequence_number = self.seq;
            nl.finalize();
            let at = out.len();
            out.resize(at + nl.buffer_len(), 0);
            nl.serialize(&mut out[at..]);
        }
        self.sock.send_to(&out, &SocketAddr::new(0, 0), 0)?;
        let mut replies = vec![Vec::new(); n];
        let (mut acked, mut failed) = (0, None);
        while acked < n {
            self.buf.clear();
            self.sock.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < self.buf.len() {
                let m = NetlinkMessage::<Rt>::deserialize(&self.buf[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                at += (m.header.length as usize + 3) & !3;
                let seq = m.header.sequence_number;
                if seq < first || seq > self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        acked += 1;
                        if let Some(c) = e.code {
                            failed.get_or_insert(io::Error::from_raw_os_error(-c.get()));
                        }
                    }
                    NetlinkPayload::Done(_) => acked += 1,
                    NetlinkPayload::InnerMessage(r) => replies[(seq - first) as usize].push(r),
                    _ => {}
                }
            }
        }
        failed.map_or(Ok(replies), Err)
    }

    /// The interface `name`, if there is one.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        match self.batch(vec![(Rt::GetLink(named(name)), 0)]) {
            Ok(r) => Ok(r.into_iter().flatten().find_map(|m| link_of(&m))),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A veth pair: `host` here on `bridge` and up, its peer `peer` (with `peer_mac`) created
    /// directly inside the namespace `peer_ns`.
    pub fn add_pod_veth(
        &mut self,
        host: &str,
        bridge: &str,
        peer: &str,
        peer_ns: &File,
        peer_mac: [u8; 6],
    ) -> io::Result<Link> {
        let bridge = self.link(bridge)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no bridge {bridge}"))
        })?;
        let mut inside = named(peer);
        inside
            .attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        inside
            .attributes
            .push(LinkAttribute::Address(peer_mac.to_vec()));
        let mut m = named(host);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(inside))),
        ]));
        m.attributes.push(LinkAttribute::Controller(bridge.index));
        up(&mut m);
        self.batch(vec![(Rt::NewLink(m), CREATE)])?;
        self.link(host)?
            .ok_or_else(|| io::Error::other(format!("{host} vanished after it was made")))
    }

    /// Inside a pod's namespace: `lo` and `ifname` up, `addr/prefix` on `ifname`, the default
    /// route via `gateway`. Returns `ifname` as the kernel has it.
    pub fn configure_pod(
        &mut self,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> io::Result<Link> {
        let mut lo = named("lo");
        up(&mut lo);
        let mut eth = named(ifname);
        up(&mut eth);
        let replies = self.batch(vec![
            (Rt::SetLink(lo), 0),
            (Rt::SetLink(eth), 0),
            (Rt::GetLink(named(ifname)), 0),
        ])?;
        let link = replies
            .into_iter()
            .flatten()
            .find_map(|m| link_of(&m))
            .ok_or_else(|| io::Error::other(format!("no {ifname} in the pod")))?;
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        a.header.prefix_len = prefix;
        a.header.index = link.index;
        a.attributes.push(AddressAttribute::Local(addr.into()));
        a.attributes.push(AddressAttribute::Address(addr.into()));
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.protocol = RouteProtocol::Boot;
        r.header.scope = RouteScope::Universe;
        r.header.kind = RouteType::Unicast;
        r.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        r.attributes.push(RouteAttribute::Oif(link.index));
        self.batch(vec![(Rt::NewAddress(a), CREATE), (Rt::NewRoute(r), CREATE)])?;
        Ok(link)
    }

    /// Deletes `name` (a veth takes its peer along); absent is fine.
    pub fn delete(&mut self, name: &str) -> io::Result<()> {
        match self.batch(vec![(Rt::DelLink(named(name)), 0)]) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// Opens a network namespace file, naming it in the error.
pub fn open_ns(path: &Path) -> io::Result<File> {
    File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn named(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m
}

fn up(m: &mut LinkMessage) {
    m.header.flags |= LinkFlags::Up;
    m.header.change_mask |= LinkFlags::Up;
}

fn link_of(m: &Rt) -> Option<Link> {
    let Rt::NewLink(l) = m else { return None };
    let mut mac = [0u8; 6];
    for a in &l.attributes {
        if let LinkAttribute::Address(b) = a
            && b.len() == 6
        {
            mac.copy_from_slice(b);
        }
    }
    Some(Link {
        index: l.header.index,
        mac,
    })
}
