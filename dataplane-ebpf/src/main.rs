//! tc entry points of the Bulkhead datapath.
//!
//! Each `#[classifier]` calls one `try_*` function and turns its result into a single TC action;
//! the verdict is decided here and nowhere else. Parsing, conntrack, selection and rewriting
//! live in their own modules.
//!
//! Ingress (a packet arriving on a pod's veth, the bridge, or the uplink):
//! 1. a reply of a tracked flow: a service reply gets the VIP back as its source; a masquerade
//!    reply (on the uplink) gets the pod back as its destination;
//! 2. a packet of a known service flow gets its backend as destination;
//! 3. a first packet to a service (VIP, or NodePort on a node address) picks a backend, creates
//!    both conntrack entries, and is translated like 2;
//! 4. anything else passes unchanged.
//!
//! A translated packet whose destination is a pod of this node is handed straight to the pod's
//! interface (`deliver`), skipping the bridge and the node's stack.
//!
//! Egress on the uplink: NodePort replies get the node's address and port back as their source,
//! and pod traffic leaving the node is masqueraded. Egress elsewhere only counts.
//!
//! On both hooks, ICMP errors about translated flows are translated back (`icmp`), and later
//! fragments of a datagram follow the translation of its first (`frag`).

#![no_std]
#![no_main]
// For `atomic_xadd`: core's atomic types lack read-modify-write methods on the BPF target.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "BPF atomics are only reachable through the intrinsic"
)]

mod conntrack;
mod frag;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod refuse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{
    Counters, Flow, FlowKey, IfaceKey, NodeConfig, Reason, ServiceCounters, direction, flow_dir,
    flow_kind, node_flags,
};

use crate::{
    maps::{BACKEND_STATS, ENDPOINTS, IFACE_STATS, REASONS, SERVICE_STATS},
    nat::End,
    parse::{IP_CSUM_OFF, IP_DST_OFF, IP_TTL_OFF, Packet, tcp_flags},
};

#[classifier]
pub fn bulkhead_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::INGRESS);
    let result = match parse::parse(&ctx) {
        Ok(pkt) => frag::remembering(&ctx, &pkt, try_ingress(&ctx, &pkt)),
        Err(Reason::OtherProtocol) => match icmp::translate_error(&ctx, icmp::hook::INGRESS) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Verdict::Pass(Reason::OtherProtocol)),
            Err(v) => Err(v),
        },
        Err(Reason::Fragment) => frag::follow(&ctx),
        Err(reason) => Err(Verdict::Pass(reason)),
    };
    verdict(&ctx, result)
}

#[classifier]
pub fn bulkhead_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::EGRESS);
    let cfg = conntrack::config();
    let uplink = cfg.uplink_ifindex != 0 && ifindex(&ctx) == cfg.uplink_ifindex;
    if !uplink {
        // Only the uplink translates at egress. Elsewhere (every packet to a pod) the only
        // thing to look at is an ICMP error the node itself sends about a flow it forwarded;
        // one byte tells, without parsing the rest.
        if !parse::is_icmp(&ctx) {
            return TC_ACT_OK;
        }
        return verdict(
            &ctx,
            icmp::translate_error(&ctx, icmp::hook::EGRESS).map(|_| ()),
        );
    }
    let result = match parse::parse(&ctx) {
        Ok(pkt) => frag::remembering(&ctx, &pkt, try_egress(&ctx, &pkt, cfg)),
        Err(Reason::OtherProtocol) => {
            icmp::translate_error(&ctx, icmp::hook::EGRESS_UPLINK).map(|_| ())
        }
        Err(Reason::Fragment) => frag::follow(&ctx),
        _ => Ok(()),
    };
    verdict(&ctx, result)
}

/// Why a packet was not (or not fully) handled.
enum Verdict {
    /// Leave the packet as it is.
    Pass(Reason),
    /// Drop it.
    Drop(Reason),
    /// Hand it to the peer of this veth (a pod's interface), in the pod's namespace.
    RedirectPeer(u32),
    /// A new flow to a service without backends: answer it as a closed port would.
    Refuse,
}

#[inline(always)]
fn verdict(ctx: &TcContext, result: Result<(), Verdict>) -> i32 {
    match result {
        Ok(()) => TC_ACT_OK,
        Err(Verdict::Pass(reason)) => {
            count_reason(reason);
            TC_ACT_OK
        }
        Err(Verdict::Drop(reason)) => {
            count_reason(reason);
            // Debug events cost nothing unless `bulkhead up --datapath-log debug` enabled them
            // at load time (aya-log's level is a load-time constant the verifier prunes on).
            debug!(ctx, "drop: reason {}", reason as u32);
            TC_ACT_SHOT
        }
        // SAFETY: an interface index user space registered as a veth; no flags (required).
        Err(Verdict::RedirectPeer(ifindex)) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Err(Verdict::Refuse) => {
            count_reason(Reason::NoBackend);
            match refuse::answer(ctx) {
                Ok(ifindex) => {
                    // SAFETY: an interface index and no flags: out of the interface the packet
                    // came in on (its egress).
                    unsafe { bpf_redirect(ifindex, 0) as i32 }
                }
                Err(()) => TC_ACT_SHOT,
            }
        }
    }
}

#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet, end: End, addr: u32, port: u16) -> Result<(), Verdict> {
    nat::rewrite(ctx, pkt, end, addr, port).map_err(|_| Verdict::Drop(Reason::RewriteFailed))
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program; `ifindex` is a
    // readable field of `__sk_buff` for tc programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn try_ingress(ctx: &TcContext, pkt: &Packet) -> Result<(), Verdict> {
    let now = conntrack::now();
    let len = u64::from(ctx.len());

    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::REPLY), now) {
        // SAFETY: `flow` came from a lookup in this run.
        let f = unsafe { *flow };
        match f.kind & flow_kind::MASK {
            flow_kind::SERVICE => {
                conntrack::touch(flow, &pkt, now);
                closing(&pkt, &f, f.nat_addr, f.nat_port);
                rewrite(ctx, &pkt, End::Source, f.nat_addr, f.nat_port)?;
                let hairpin = f.kind & flow_kind::HAIRPIN != 0;
                if hairpin || f.peer_port != 0 {
                    // A hairpinned client is the backend itself: give it back its own address;
                    // a client whose port was translated gets its own port back.
                    let addr = if hairpin { pkt.saddr } else { pkt.daddr };
                    rewrite(
                        ctx,
                        &pkt,
                        End::Destination,
                        addr,
                        port_or(f.peer_port, pkt.dport),
                    )?;
                }
                count_service(f.service_id, f.backend_id, len, false);
                if !hairpin {
                    return deliver(ctx, &pkt, false);
                }
            }
            flow_kind::MASQUERADE => {
                conntrack::touch(flow, &pkt, now);
                rewrite(ctx, &pkt, End::Destination, f.nat_addr, f.nat_port)?;
            }
            // NodePort replies are translated when they leave through the uplink.
            _ => {}
        }
        return Ok(());
    }

    let orig_key = conntrack::key(&pkt, flow_dir::ORIGINAL);
    if let Some(flow) = conntrack::lookup(&orig_key, now) {
        // SAFETY: as above.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::MASQUERADE {
            return Ok(());
        }
        if reopens(&pkt, &f) {
            // A new connection on the tuple of a closed one (a client reusing its port): a new
            // flow, scheduled afresh, with entries that start over. Following the old entry
            // would leave its reply entry in the closing state, which `forget_stale_reply`
            // treats as dead.
            let hairpin = f.kind & flow_kind::HAIRPIN != 0;
            let reply_key = FlowKey {
                saddr: f.nat_addr,
                daddr: if hairpin { pkt.daddr } else { pkt.saddr },
                sport: f.nat_port,
                dport: port_or(f.peer_port, pkt.sport),
                proto: pkt.proto,
                dir: flow_dir::REPLY,
                _pad: 0,
            };
            conntrack::remove(&reply_key);
            conntrack::remove(&orig_key);
            return start_flow(ctx, &pkt, now);
        }
        conntrack::touch(flow, &pkt, now);
        closing(&pkt, &f, pkt.daddr, pkt.dport);
        rewrite(ctx, &pkt, End::Destination, f.nat_addr, f.nat_port)?;
        let hairpin = f.kind & flow_kind::HAIRPIN != 0;
        translate_client(ctx, &pkt, hairpin, f.peer_port)?;
        count_service(f.service_id, f.backend_id, len, false);
        if f.kind & (flow_kind::MASK | flow_kind::HAIRPIN) == flow_kind::SERVICE {
            return deliver(ctx, &pkt, true);
        }
        return Ok(());
    }

    start_flow(ctx, &pkt, now)
}

/// `new_flow`, then the stack bypass for the flow it created.
#[inline(always)]
fn start_flow(ctx: &TcContext, pkt: &Packet, now: u64) -> Result<(), Verdict> {
    if new_flow(ctx, pkt, now)? {
        return deliver(ctx, pkt, true);
    }
    Ok(())
}

/// `port` if set (non-zero), else `own`.
#[inline(always)]
fn port_or(port: u16, own: u16) -> u16 {
    if port != 0 { port } else { own }
}

/// The source side of an original-direction translation: a hairpinned client appears as the
/// VIP, and a client whose port collided gets its translated port.
#[inline(always)]
fn translate_client(
    ctx: &TcContext,
    pkt: &Packet,
    hairpin: bool,
    peer_port: u16,
) -> Result<(), Verdict> {
    if !hairpin && peer_port == 0 {
        return Ok(());
    }
    let addr = if hairpin { pkt.daddr } else { pkt.saddr };
    rewrite(ctx, pkt, End::Source, addr, port_or(peer_port, pkt.sport))
}

/// Stack bypass: a translated packet for a pod of this node goes straight to the pod's
/// interface (`bpf_redirect_peer`: from this ingress hook to the ingress of the veth's other
/// end, in the pod's namespace) with the MAC addresses the bridge and the node's routing would
/// have given it, and the TTL decremented when the node would have routed it. Skips the
/// bridge, the node's routing and netfilter. Anything else (no endpoint registered, bypass
/// turned off, a first fragment, a TTL about to expire) takes the normal path.
///
/// A BPF-to-BPF call: its buffers stay out of the entry point's stack frame, which sits under
/// the deepest call chain (see `new_flow`).
#[inline(never)]
fn deliver(ctx: &TcContext, pkt: &Packet, routed: bool) -> Result<(), Verdict> {
    let cfg = conntrack::config();
    if cfg.flags & node_flags::NO_BYPASS != 0 || pkt.first_fragment {
        return Ok(());
    }
    let Ok(daddr) = ctx.load::<u32>(IP_DST_OFF) else {
        return Ok(());
    };
    // SAFETY: a lookup result, copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }).copied() else {
        return Ok(());
    };
    if ep.ifindex == ifindex(ctx) {
        return Ok(());
    }
    let fail = |_| Verdict::Drop(Reason::RewriteFailed);
    if routed {
        // TTL and protocol share a checksum word; as raw memory the TTL is its low byte.
        let word: u16 = ctx.load(IP_TTL_OFF).map_err(fail)?;
        if word & 0xff <= 1 {
            return Ok(()); // the stack sends the time-exceeded error
        }
        let next = word - 1;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(word), u64::from(next), 2)
            .map_err(fail)?;
        ctx.store(IP_TTL_OFF, &next, 0).map_err(fail)?;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.mac);
    macs[6..].copy_from_slice(&ep.gateway_mac);
    ctx.store(0, &macs, 0).map_err(fail)?;
    Err(Verdict::RedirectPeer(ep.ifindex))
}

/// A pure SYN: the first packet of a TCP connection.
#[inline(always)]
pub(crate) fn is_syn(pkt: &Packet) -> bool {
    pkt.proto == dataplane_common::proto::TCP
        && pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
}

/// True for a pure SYN arriving on a flow that has already closed.
#[inline(always)]
fn reopens(pkt: &Packet, f: &Flow) -> bool {
    is_syn(pkt) && f.state == dataplane_common::tcp_state::CLOSING
}

/// A packet of no known flow: a service's first packet picks a backend and creates the flow.
///
/// A BPF-to-BPF call rather than inlined: it is reached from two places, and inlining it twice
/// let LLVM merge the tails into code the verifier rejects (a register read before any write on
/// one of the merged paths).
///
/// `Ok(true)`: a service flow that may bypass the stack (the caller calls `deliver`, which
/// keeps its stack frame out of this one's).
#[inline(never)]
fn new_flow(ctx: &TcContext, pkt: &Packet, now: u64) -> Result<bool, Verdict> {
    let len = u64::from(ctx.len());
    let Some(svc) = lb::service(&pkt) else {
        forget_stale_reply(&pkt);
        return Ok(false);
    };
    let (backend_id, backend) = match lb::select(&svc, &pkt, now) {
        Ok(found) => found,
        Err(Reason::NoBackend) if is_syn(&pkt) || pkt.proto == dataplane_common::proto::UDP => {
            return Err(Verdict::Refuse);
        }
        Err(reason) => return Err(Verdict::Drop(reason)),
    };
    let cfg = conntrack::config();
    let mut kind = if cfg.uplink_ifindex != 0 && ifindex(ctx) == cfg.uplink_ifindex {
        flow_kind::NODEPORT
    } else {
        flow_kind::SERVICE
    };
    let hairpin = backend.addr == pkt.saddr;
    if hairpin {
        kind |= flow_kind::HAIRPIN;
    }
    let mut orig = Flow {
        nat_addr: backend.addr,
        nat_port: backend.port,
        kind,
        state: conntrack::initial_state(&pkt),
        service_id: svc.id,
        backend_id,
        last_seen_ns: now,
        peer_port: 0,
        _pad: [0; 6],
    };
    let mut reply = Flow {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..orig
    };
    // A hairpinned client appears to the backend as the VIP, so its replies go to the VIP.
    let reply_dst = if hairpin { pkt.daddr } else { pkt.saddr };
    let mut reply_key = FlowKey {
        saddr: backend.addr,
        daddr: reply_dst,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: flow_dir::REPLY,
        _pad: 0,
    };
    match conntrack::create(
        &conntrack::key(&pkt, flow_dir::ORIGINAL),
        &mut orig,
        &mut reply_key,
        &mut reply,
        now,
    ) {
        Ok(()) => lb::count_connection(backend_id, true),
        // The backend already has a live flow from this client port (through another VIP) and
        // no free port was found to tell the two apart: forwarding would merge them.
        Err(conntrack::CreateError::NoFreePort) => {
            return Err(Verdict::Drop(Reason::NoMasqueradePort));
        }
        // Without entries the flow still reaches a consistent backend while hashing picks it.
        Err(conntrack::CreateError::Full) => count_reason(Reason::ConntrackFull),
    }
    rewrite(ctx, &pkt, End::Destination, backend.addr, backend.port)?;
    translate_client(ctx, &pkt, hairpin, orig.peer_port)?;
    count_service(svc.id, backend_id, len, true);
    debug!(
        ctx,
        "new flow: {:i}:{} -> service {} backend {} {:i}:{} kind {}",
        u32::from_be(pkt.saddr),
        u16::from_be(pkt.sport),
        svc.id,
        backend_id,
        u32::from_be(backend.addr),
        u16::from_be(backend.port),
        kind
    );
    Ok(kind == flow_kind::SERVICE)
}

/// Egress on the uplink.
#[inline(always)]
fn try_egress(ctx: &TcContext, pkt: &Packet, cfg: &NodeConfig) -> Result<(), Verdict> {
    let now = conntrack::now();

    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::REPLY), now) {
        // SAFETY: `flow` came from a lookup in this run.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::NODEPORT {
            conntrack::touch(flow, &pkt, now);
            closing(&pkt, &f, f.nat_addr, f.nat_port);
            rewrite(ctx, &pkt, End::Source, f.nat_addr, f.nat_port)?;
            if f.peer_port != 0 {
                rewrite(ctx, &pkt, End::Destination, pkt.daddr, f.peer_port)?;
            }
            count_service(f.service_id, f.backend_id, u64::from(ctx.len()), false);
        }
        return Ok(());
    }
    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::ORIGINAL), now) {
        // SAFETY: as above.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::MASQUERADE {
            conntrack::touch(flow, &pkt, now);
            rewrite(ctx, &pkt, End::Source, f.nat_addr, f.nat_port)?;
        }
        return Ok(());
    }
    if cfg.pod_mask != 0
        && pkt.saddr & cfg.pod_mask == cfg.pod_net
        && pkt.daddr & cfg.pod_mask != cfg.pod_net
    {
        masquerade(ctx, &pkt, cfg, now)?;
    }
    Ok(())
}

/// Starts masquerading a pod's flow leaving the node: the node's address as source, with the
/// pod's own source port when no other flow to the same peer holds it, else a random one.
///
/// A BPF-to-BPF call, like `deliver`: the egress entry point's frame also sits under the ICMP
/// translation's.
#[inline(never)]
fn masquerade(ctx: &TcContext, pkt: &Packet, cfg: &NodeConfig, now: u64) -> Result<(), Verdict> {
    let state = conntrack::initial_state(pkt);
    let reply = Flow {
        nat_addr: pkt.saddr,
        nat_port: pkt.sport,
        kind: flow_kind::MASQUERADE,
        state,
        service_id: 0,
        backend_id: 0,
        last_seen_ns: now,
        peer_port: 0,
        _pad: [0; 6],
    };
    let mut port = pkt.sport;
    let mut claimed = false;
    for attempt in 0..8u32 {
        if attempt > 0 {
            port = conntrack::random_port();
        }
        let key = FlowKey {
            saddr: pkt.daddr,
            daddr: cfg.uplink_addr,
            sport: pkt.dport,
            dport: port,
            proto: pkt.proto,
            dir: flow_dir::REPLY,
            _pad: 0,
        };
        if conntrack::claim(&key, &reply, now) {
            claimed = true;
            break;
        }
    }
    if !claimed {
        return Err(Verdict::Drop(Reason::NoMasqueradePort));
    }
    let orig = Flow {
        nat_addr: cfg.uplink_addr,
        nat_port: port,
        ..reply
    };
    if conntrack::insert(&conntrack::key(pkt, flow_dir::ORIGINAL), &orig, 0).is_err() {
        count_reason(Reason::ConntrackFull);
    }
    rewrite(ctx, pkt, End::Source, cfg.uplink_addr, port)
}

/// A client opening a new TCP connection straight to an address and port that a closed
/// translated flow used as its backend, from the same source port: that flow is over, but its
/// reply entry lingers for the closing timeout and
/// would otherwise rewrite this connection's SYN-ACK to come from the VIP, and the client would
/// reset it. Only SYNs pay for the lookup.
#[inline(always)]
fn forget_stale_reply(pkt: &Packet) {
    if pkt.proto != dataplane_common::proto::TCP
        || pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) != tcp_flags::SYN
    {
        return;
    }
    let key = FlowKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: flow_dir::REPLY,
        _pad: 0,
    };
    if let Some(flow) = conntrack::get(&key) {
        // SAFETY: valid for this run; two bytes are read.
        let (kind, state) = unsafe { ((*flow).kind, (*flow).state) };
        // Only a flow that has closed: the translated SYN of a live flow passes here too (on the
        // bridge device, already addressed to its backend) while its reply entry is new.
        if kind & flow_kind::MASK == flow_kind::SERVICE
            && state == dataplane_common::tcp_state::CLOSING
        {
            conntrack::remove(&key);
        }
    }
}

/// On the first FIN or RST of a TCP flow, takes it out of its backend's open connections (for
/// `lc`). The original-direction entry records that this happened, whichever side closed.
#[inline(always)]
fn closing(pkt: &Packet, f: &Flow, vip: u32, vport: u16) {
    if pkt.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) == 0 {
        return;
    }
    // The original key, rebuilt from either direction: client -> VIP.
    let (mut client, cport) = if f.nat_addr == vip && f.nat_port == vport {
        // A reply: the client is its destination (with its own port, if it was translated).
        (pkt.daddr, port_or(f.peer_port, pkt.dport))
    } else {
        (pkt.saddr, pkt.sport)
    };
    if f.kind & flow_kind::HAIRPIN != 0 {
        // A hairpinned client is the backend itself.
        client = if client == vip { pkt.saddr } else { client };
    }
    let key = FlowKey {
        saddr: client,
        daddr: vip,
        sport: cport,
        dport: vport,
        proto: pkt.proto,
        dir: flow_dir::ORIGINAL,
        _pad: 0,
    };
    if let Some(orig) = conntrack::get(&key) {
        // SAFETY: valid for this run. Two CPUs may both see `counted == 0` and decrement twice;
        // the count is advisory (it only steers `lc`).
        let o = unsafe { &mut *orig };
        if o.kind & flow_kind::CLOSE_COUNTED == 0 {
            o.kind |= flow_kind::CLOSE_COUNTED;
            lb::count_connection(f.backend_id, false);
        }
    }
}

#[inline(always)]
fn count_service(service_id: u32, backend_id: u32, len: u64, new_flow: bool) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(&service_id) {
        bump(c, len, new_flow);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(&backend_id) {
        bump(c, len, new_flow);
    }
}

#[inline(always)]
fn bump(c: *mut ServiceCounters, len: u64, new_flow: bool) {
    // SAFETY: this CPU's value in a per-CPU map, from a lookup in this run.
    let c = unsafe { &mut *c };
    c.packets += 1;
    c.bytes += len;
    if new_flow {
        c.new_flows += 1;
    }
}

/// Adds this packet to its interface's per-CPU counters, creating the entry on first sight.
#[inline(always)]
fn count_iface(ctx: &TcContext, dir: u32) {
    let key = IfaceKey {
        ifindex: ifindex(ctx),
        direction: dir,
    };
    let len = u64::from(ctx.len());
    match IFACE_STATS.get_ptr_mut(&key) {
        Some(c) => {
            // SAFETY: the pointer came from a successful lookup in a per-CPU map, so it points to
            // this CPU's value, which no other program instance can touch while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += len;
            }
        }
        None => {
            // A full map only loses counts; the packet itself is unaffected.
            let _ = IFACE_STATS.insert(
                &key,
                &Counters {
                    packets: 1,
                    bytes: len,
                },
                0,
            );
        }
    }
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot of this CPU, valid for this run.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
