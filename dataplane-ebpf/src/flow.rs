//! The life of a translated flow at each hook: which entry a packet belongs to, what it is
//! rewritten to, when a new flow starts, and when a closed one gives its tuple back.
//!
//! At ingress (a packet arriving on a pod's veth, the bridge, or the uplink):
//! 1. a reply of a tracked flow: a service reply gets the VIP back as its source; a masquerade
//!    reply (on the uplink) gets the pod back as its destination;
//! 2. a packet of a known service flow gets its backend as destination;
//! 3. a first packet to a service (VIP, or NodePort on a node address) picks a backend, creates
//!    both conntrack entries, and is translated like 2;
//! 4. anything else passes unchanged.
//!
//! A translated packet whose destination is a pod of this node is handed to `bypass`.
//! At egress on the uplink, NodePort replies get the node's address and port back as their
//! source, and pod traffic leaving the node is masqueraded (`masq`).
//!
//! Everything here runs against a [`PacketCtx`] and the packet's flow tuple, so another hook can
//! reuse it. It returns a [`Verdict`] and must not act on one: the entry points do.

use aya_log_ebpf::debug;
use dataplane_common::{
    Flow, FlowKey, FlowTuple, NodeConfig, Reason, V4, flow_kind, proto, tcp_state,
};

use crate::{
    bypass, conntrack,
    counters::{count_reason, count_service},
    ctx::PacketCtx,
    lb, masq,
    nat::{self, End},
    parse::Packet,
    verdict::Verdict,
};

/// Rewrites one end of `pkt`, dropping it if a helper refuses.
#[inline(always)]
fn rewrite<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    end: End,
    addr: V4,
    port: u16,
) -> Result<(), Verdict> {
    nat::rewrite(ctx, pkt, end, addr, port).map_err(Verdict::rewrite_failed)
}

/// A packet arriving on an interface.
#[inline(always)]
pub fn try_ingress<C: PacketCtx>(ctx: &C, pkt: &Packet) -> Result<(), Verdict> {
    let now = conntrack::now();
    let len = u64::from(ctx.len());
    let t = &pkt.tuple;

    if let Some(flow) = conntrack::lookup(&FlowKey::reply(t), now) {
        // SAFETY: `flow` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps); the entry is copied out at once.
        let f = unsafe { *flow };
        match f.kind & flow_kind::MASK {
            flow_kind::SERVICE => {
                conntrack::touch(flow, t, now);
                closing(t, &f, f.nat_addr, f.nat_port);
                rewrite(ctx, pkt, End::Source, V4(f.nat_addr), f.nat_port)?;
                let hairpin = f.kind & flow_kind::HAIRPIN != 0;
                if hairpin || f.peer_port != 0 {
                    // A hairpinned client is the backend itself: give it back its own address;
                    // a client whose port was translated gets its own port back.
                    let addr = if hairpin { t.saddr } else { t.daddr };
                    rewrite(
                        ctx,
                        pkt,
                        End::Destination,
                        addr,
                        port_or(f.peer_port, t.dport),
                    )?;
                }
                count_service(f.service_id, f.backend_id, len, false, true);
                if !hairpin {
                    return bypass::deliver(ctx, pkt, false);
                }
            }
            flow_kind::MASQUERADE => {
                conntrack::touch(flow, t, now);
                rewrite(ctx, pkt, End::Destination, V4(f.nat_addr), f.nat_port)?;
            }
            // NodePort replies are translated when they leave through the uplink.
            _ => {}
        }
        return Ok(());
    }

    let orig_key = FlowKey::original(t);
    if let Some(flow) = conntrack::lookup(&orig_key, now) {
        // SAFETY: `flow` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps); the entry is copied out at once.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::MASQUERADE {
            return Ok(());
        }
        let hairpin = f.kind & flow_kind::HAIRPIN != 0;
        if reopens(t, &f) {
            // A new connection on the tuple of a closed one (a client reusing its port): a new
            // flow, scheduled afresh, with entries that start over. Following the old entry
            // would leave its reply entry in the closing state, which `forget_stale_reply`
            // treats as dead. The old flow's packets left as `translated` does; its backend
            // answered them under the reply key.
            let translated =
                client_side(t, hairpin, f.peer_port).with_destination(V4(f.nat_addr), f.nat_port);
            conntrack::remove(&FlowKey::answering(&translated));
            conntrack::remove(&orig_key);
            return start_flow(ctx, pkt, now);
        }
        conntrack::touch(flow, t, now);
        closing(t, &f, t.daddr.0, t.dport);
        rewrite(ctx, pkt, End::Destination, V4(f.nat_addr), f.nat_port)?;
        translate_client(ctx, pkt, hairpin, f.peer_port)?;
        count_service(f.service_id, f.backend_id, len, false, false);
        if f.kind & (flow_kind::MASK | flow_kind::HAIRPIN) == flow_kind::SERVICE {
            return bypass::deliver(ctx, pkt, true);
        }
        return Ok(());
    }

    start_flow(ctx, pkt, now)
}

/// A packet leaving through the uplink.
#[inline(always)]
pub fn try_egress<C: PacketCtx>(ctx: &C, pkt: &Packet, cfg: &NodeConfig) -> Result<(), Verdict> {
    let now = conntrack::now();
    let t = &pkt.tuple;

    if let Some(flow) = conntrack::lookup(&FlowKey::reply(t), now) {
        // SAFETY: `flow` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps); the entry is copied out at once.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::NODEPORT {
            conntrack::touch(flow, t, now);
            closing(t, &f, f.nat_addr, f.nat_port);
            rewrite(ctx, pkt, End::Source, V4(f.nat_addr), f.nat_port)?;
            if f.peer_port != 0 {
                rewrite(ctx, pkt, End::Destination, t.daddr, f.peer_port)?;
            }
            count_service(
                f.service_id,
                f.backend_id,
                u64::from(ctx.len()),
                false,
                true,
            );
        }
        return Ok(());
    }
    if let Some(flow) = conntrack::lookup(&FlowKey::original(t), now) {
        // SAFETY: `flow` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps); the entry is copied out at once.
        let f = unsafe { *flow };
        if f.kind & flow_kind::MASK == flow_kind::MASQUERADE {
            conntrack::touch(flow, t, now);
            rewrite(ctx, pkt, End::Source, V4(f.nat_addr), f.nat_port)?;
        }
        return Ok(());
    }
    if masq::applies(pkt, cfg) {
        masq::start(ctx, pkt, cfg, now)?;
    }
    Ok(())
}

/// `new_flow`, then the stack bypass for the flow it created.
#[inline(always)]
fn start_flow<C: PacketCtx>(ctx: &C, pkt: &Packet, now: u64) -> Result<(), Verdict> {
    if new_flow(ctx, pkt, now)? {
        return bypass::deliver(ctx, pkt, true);
    }
    Ok(())
}

/// `port` if set (non-zero), else `own`.
#[inline(always)]
fn port_or(port: u16, own: u16) -> u16 {
    if port != 0 { port } else { own }
}

/// The original tuple `t` with the source a translated flow gives it: a hairpinned client
/// appears as the VIP, and a client whose port collided gets its translated port `peer_port`.
#[inline(always)]
fn client_side(t: &FlowTuple, hairpin: bool, peer_port: u16) -> FlowTuple {
    let addr = if hairpin { t.daddr } else { t.saddr };
    t.with_source(addr, port_or(peer_port, t.sport))
}

/// The source side of an original-direction translation (see [`client_side`]); nothing to do
/// for a flow that keeps its client's address and port.
#[inline(always)]
fn translate_client<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    hairpin: bool,
    peer_port: u16,
) -> Result<(), Verdict> {
    if !hairpin && peer_port == 0 {
        return Ok(());
    }
    let client = client_side(&pkt.tuple, hairpin, peer_port);
    rewrite(ctx, pkt, End::Source, client.saddr, client.sport)
}

/// True for a pure SYN arriving on a flow that has already closed.
#[inline(always)]
fn reopens(t: &FlowTuple, f: &Flow) -> bool {
    t.is_syn() && f.state == tcp_state::CLOSING
}

/// A packet of no known flow: a service's first packet picks a backend and creates the flow.
///
/// A BPF-to-BPF call rather than inlined: it is reached from two places, and inlining it twice
/// let LLVM merge the tails into code the verifier rejects (a register read before any write on
/// one of the merged paths). It sits on the deepest call chain (entry point, `new_flow`, the
/// `lc` loop callback), so nothing may grow its frame or call below it in a frame of its own.
///
/// `Ok(true)`: a service flow that may bypass the stack (the caller calls `bypass::deliver`,
/// which keeps its stack frame out of this one's).
#[inline(never)]
fn new_flow<C: PacketCtx>(ctx: &C, pkt: &Packet, now: u64) -> Result<bool, Verdict> {
    let len = u64::from(ctx.len());
    let t = &pkt.tuple;
    let Some(svc) = lb::service(t) else {
        forget_stale_reply(t);
        return Ok(false);
    };
    let (backend_id, backend) = match lb::select(&svc, t, now) {
        Ok(found) => found,
        Err(Reason::NoBackend) if t.is_syn() || t.proto == proto::UDP => {
            return Err(Verdict::Refuse);
        }
        Err(reason) => return Err(Verdict::Drop(reason)),
    };
    let cfg = conntrack::config();
    let mut kind = if cfg.uplink_ifindex != 0 && ctx.ifindex() == cfg.uplink_ifindex {
        flow_kind::NODEPORT
    } else {
        flow_kind::SERVICE
    };
    let hairpin = backend.addr == t.saddr.0;
    if hairpin {
        kind |= flow_kind::HAIRPIN;
    }
    let mut orig = Flow {
        nat_addr: backend.addr,
        nat_port: backend.port,
        kind,
        state: conntrack::initial_state(t),
        service_id: svc.id,
        backend_id,
        last_seen_ns: now,
        peer_port: 0,
        _pad: [0; 6],
    };
    let mut reply = Flow {
        nat_addr: t.daddr.0,
        nat_port: t.dport,
        ..orig
    };
    // The backend answers the packet as it leaves: to the client (the VIP for a hairpinned
    // client, which appears to the backend as the VIP), from the backend.
    let mut reply_key = FlowKey::answering(
        &client_side(t, hairpin, 0).with_destination(V4(backend.addr), backend.port),
    );
    match conntrack::create(
        &FlowKey::original(t),
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
    rewrite(ctx, pkt, End::Destination, V4(backend.addr), backend.port)?;
    translate_client(ctx, pkt, hairpin, orig.peer_port)?;
    count_service(svc.id, backend_id, len, true, false);
    debug!(
        ctx,
        "new flow: {:i}:{} -> service {} backend {} {:i}:{} kind {}",
        u32::from_be(t.saddr.0),
        u16::from_be(t.sport),
        svc.id,
        backend_id,
        u32::from_be(backend.addr),
        u16::from_be(backend.port),
        kind
    );
    Ok(kind == flow_kind::SERVICE)
}

/// A client opening a new TCP connection straight to an address and port that a closed
/// translated flow used as its backend, from the same source port: that flow is over, but its
/// reply entry lingers for the closing timeout and would otherwise rewrite this connection's
/// SYN-ACK to come from the VIP, and the client would reset it. Only SYNs pay for the lookup.
#[inline(always)]
fn forget_stale_reply(t: &FlowTuple) {
    if !t.is_syn() {
        return;
    }
    let key = FlowKey::answering(t);
    if let Some(flow) = conntrack::get(&key) {
        // SAFETY: `flow` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps); two bytes are read.
        let (kind, state) = unsafe { ((*flow).kind, (*flow).state) };
        // Only a flow that has closed: the translated SYN of a live flow passes here too (on the
        // bridge device, already addressed to its backend) while its reply entry is new.
        if kind & flow_kind::MASK == flow_kind::SERVICE && state == tcp_state::CLOSING {
            conntrack::remove(&key);
        }
    }
}

/// On the first FIN or RST of a TCP flow, takes it out of its backend's open connections (for
/// `lc`). The original-direction entry records that this happened, whichever side closed.
/// `vip` and `vport` are the service's address and port (network order).
#[inline(always)]
fn closing(t: &FlowTuple, f: &Flow, vip: u32, vport: u16) {
    if !t.is_closing() {
        return;
    }
    // The original key, rebuilt from either direction: client -> VIP.
    let (mut client, cport) = if f.nat_addr == vip && f.nat_port == vport {
        // A reply: the client is its destination (with its own port, if it was translated).
        (t.daddr, port_or(f.peer_port, t.dport))
    } else {
        (t.saddr, t.sport)
    };
    if f.kind & flow_kind::HAIRPIN != 0 {
        // A hairpinned client is the backend itself.
        client = if client.0 == vip { t.saddr } else { client };
    }
    let original = FlowTuple {
        saddr: client,
        daddr: V4(vip),
        sport: cport,
        dport: vport,
        proto: t.proto,
        tcp_flags: 0,
    };
    if let Some(orig) = conntrack::get(&FlowKey::original(&original)) {
        // SAFETY: `orig` is a pointer from a successful map lookup in this run, whose memory stays
        // valid until the program returns (the kernel frees map elements only after an RCU grace
        // period, and never those of preallocated maps). Two CPUs may both see the flag clear and
        // decrement twice; the count is advisory (it only steers `lc`).
        let o = unsafe { &mut *orig };
        if o.kind & flow_kind::CLOSE_COUNTED == 0 {
            o.kind |= flow_kind::CLOSE_COUNTED;
            lb::count_connection(f.backend_id, false);
        }
    }
}
