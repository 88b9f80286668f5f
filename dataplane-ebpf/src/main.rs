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
//! Egress on the uplink: NodePort replies get the node's address and port back as their source,
//! and pod traffic leaving the node is masqueraded. Egress elsewhere only counts.

#![no_std]
#![no_main]
// For `atomic_xadd`: core's atomic types lack read-modify-write methods on the BPF target.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "BPF atomics are only reachable through the intrinsic")]

mod conntrack;
mod lb;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{
    Counters, Flow, FlowKey, IfaceKey, MASQ_PORT_MAX, MASQ_PORT_MIN, NodeConfig, Reason, ServiceCounters, direction,
    flow_dir, flow_kind,
};

use crate::{
    maps::{BACKEND_STATS, IFACE_STATS, REASONS, SERVICE_STATS},
    nat::End,
    parse::{Packet, tcp_flags},
};

#[classifier]
pub fn bulkhead_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::INGRESS);
    verdict(&ctx, try_ingress(&ctx))
}

#[classifier]
pub fn bulkhead_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::EGRESS);
    verdict(&ctx, try_egress(&ctx))
}

/// Why a packet was not (or not fully) handled.
enum Verdict {
    /// Leave the packet as it is.
    Pass(Reason),
    /// Drop it.
    Drop(Reason),
    /// Send it out of this interface (a packet turned into its own answer).
    Redirect(u32),
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
        // SAFETY: bpf_redirect with an interface index and no flags (egress of that device).
        Err(Verdict::Redirect(ifindex)) => unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) as i32 },
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
fn try_ingress(ctx: &TcContext) -> Result<(), Verdict> {
    let pkt = parse::parse(ctx).map_err(Verdict::Pass)?;
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
                if f.kind & flow_kind::HAIRPIN != 0 {
                    // The client is the backend itself: give it back its own address.
                    rewrite(ctx, &pkt, End::Destination, pkt.saddr, pkt.dport)?;
                }
                count_service(f.service_id, f.backend_id, len, false);
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
                dport: pkt.sport,
                proto: pkt.proto,
                dir: flow_dir::REPLY,
                _pad: 0,
            };
            conntrack::remove(&reply_key);
            conntrack::remove(&orig_key);
            return new_flow(ctx, &pkt, now);
        }
        conntrack::touch(flow, &pkt, now);
        closing(&pkt, &f, pkt.daddr, pkt.dport);
        rewrite(ctx, &pkt, End::Destination, f.nat_addr, f.nat_port)?;
        if f.kind & flow_kind::HAIRPIN != 0 {
            rewrite(ctx, &pkt, End::Source, pkt.daddr, pkt.sport)?;
        }
        count_service(f.service_id, f.backend_id, len, false);
        return Ok(());
    }

    new_flow(ctx, &pkt, now)
}

/// A pure SYN: the first packet of a TCP connection.
#[inline(always)]
fn is_syn(pkt: &Packet) -> bool {
    pkt.proto == dataplane_common::proto::TCP && pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
}

/// Refuses a connection to a service without backends at once, as a closed port would: the
/// SYN becomes the RST|ACK answering it and goes back out of the interface it arrived on.
/// Swapping addresses and ports leaves both checksums as they are; only the sequence numbers
/// and flags change, and are updated incrementally. (UDP is still dropped: an ICMP port
/// unreachable would need the packet to grow.)
#[inline(always)]
fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<(), Verdict> {
    let fail = |_| Verdict::Drop(Reason::RewriteFailed);
    let macs: [u8; 12] = ctx.load(0).map_err(fail)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(fail)?;
    ctx.store(parse::IP_SRC_OFF, &pkt.daddr, 0).map_err(fail)?;
    ctx.store(parse::IP_DST_OFF, &pkt.saddr, 0).map_err(fail)?;
    ctx.store(pkt.l4_off, &pkt.dport, 0).map_err(fail)?;
    ctx.store(pkt.l4_off + 2, &pkt.sport, 0).map_err(fail)?;
    let seq: u32 = ctx.load(pkt.l4_off + 4).map_err(fail)?;
    let old_ack: u32 = ctx.load(pkt.l4_off + 8).map_err(fail)?;
    // RST|ACK acknowledging the SYN: seq 0, ack = their seq + 1.
    let ack = (u32::from_be(seq).wrapping_add(1)).to_be();
    let zero = 0u32;
    let old_flags: u16 = ctx.load(pkt.l4_off + 12).map_err(fail)?;
    let flags = (old_flags & 0xff00u16.to_be()) | u16::from(tcp_flags::RST | tcp_flags::ACK).to_be();
    let csum = pkt.l4_csum_off;
    ctx.l4_csum_replace(csum, u64::from(seq), u64::from(zero), 4).map_err(fail)?;
    ctx.l4_csum_replace(csum, u64::from(old_ack), u64::from(ack), 4).map_err(fail)?;
    ctx.l4_csum_replace(csum, u64::from(old_flags), u64::from(flags), 2).map_err(fail)?;
    ctx.store(pkt.l4_off + 4, &zero, 0).map_err(fail)?;
    ctx.store(pkt.l4_off + 8, &ack, 0).map_err(fail)?;
    ctx.store(pkt.l4_off + 12, &flags, 0).map_err(fail)?;
    Err(Verdict::Redirect(ifindex(ctx)))
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
#[inline(never)]
fn new_flow(ctx: &TcContext, pkt: &Packet, now: u64) -> Result<(), Verdict> {
    let pkt = *pkt;
    let len = u64::from(ctx.len());
    let Some(svc) = lb::service(&pkt) else {
        forget_stale_reply(&pkt);
        return Ok(());
    };
    let (backend_id, backend) = match lb::select(&svc, &pkt, now) {
        Ok(found) => found,
        Err(Reason::NoBackend) if is_syn(&pkt) => {
            count_reason(Reason::NoBackend);
            return refuse(ctx, &pkt);
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
    let orig = Flow {
        nat_addr: backend.addr,
        nat_port: backend.port,
        kind,
        state: conntrack::initial_state(&pkt),
        service_id: svc.id,
        backend_id,
        last_seen_ns: now,
    };
    let reply = Flow { nat_addr: pkt.daddr, nat_port: pkt.dport, ..orig };
    // A hairpinned client appears to the backend as the VIP, so its replies go to the VIP.
    let reply_dst = if hairpin { pkt.daddr } else { pkt.saddr };
    let reply_key = FlowKey {
        saddr: backend.addr,
        daddr: reply_dst,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: flow_dir::REPLY,
        _pad: 0,
    };
    match conntrack::create(&conntrack::key(&pkt, flow_dir::ORIGINAL), &orig, &reply_key, &reply) {
        Ok(()) => lb::count_connection(backend_id, true),
        // Without entries the flow still reaches a consistent backend while hashing picks it.
        Err(_) => count_reason(Reason::ConntrackFull),
    }
    rewrite(ctx, &pkt, End::Destination, backend.addr, backend.port)?;
    if hairpin {
        rewrite(ctx, &pkt, End::Source, pkt.daddr, pkt.sport)?;
    }
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
    Ok(())
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    let cfg = conntrack::config();
    if cfg.uplink_ifindex == 0 || ifindex(ctx) != cfg.uplink_ifindex {
        return Ok(());
    }
    let pkt = parse::parse(ctx).map_err(Verdict::Pass)?;
    let now = conntrack::now();

    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::REPLY), now) {
        // SAFETY: `flow` came from a lookup in this run.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::NODEPORT {
            conntrack::touch(flow, &pkt, now);
            closing(&pkt, &f, f.nat_addr, f.nat_port);
            rewrite(ctx, &pkt, End::Source, f.nat_addr, f.nat_port)?;
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
    if cfg.pod_mask != 0 && pkt.saddr & cfg.pod_mask == cfg.pod_net && pkt.daddr & cfg.pod_mask != cfg.pod_net {
        masquerade(ctx, &pkt, &cfg, now)?;
    }
    Ok(())
}

/// Starts masquerading a pod's flow leaving the node: the node's address as source, with the
/// pod's own source port when no other flow to the same peer holds it, else a random one.
#[inline(always)]
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
    };
    let span = u32::from(MASQ_PORT_MAX - MASQ_PORT_MIN) + 1;
    let mut port = pkt.sport;
    let mut claimed = false;
    for attempt in 0..8u32 {
        if attempt > 0 {
            // SAFETY: a helper without arguments.
            let r = unsafe { bpf_get_prandom_u32() };
            port = (MASQ_PORT_MIN + (r % span) as u16).to_be();
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
    let orig = Flow { nat_addr: cfg.uplink_addr, nat_port: port, ..reply };
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
    if pkt.proto != dataplane_common::proto::TCP || pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) != tcp_flags::SYN {
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
        if kind & flow_kind::MASK == flow_kind::SERVICE && state == dataplane_common::tcp_state::CLOSING {
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
        (pkt.daddr, pkt.dport) // a reply: the client is its destination
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
    let key = IfaceKey { ifindex: ifindex(ctx), direction: dir };
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
            let _ = IFACE_STATS.insert(&key, &Counters { packets: 1, bytes: len }, 0);
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
