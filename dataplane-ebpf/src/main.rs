//! tc entry points of the Bulkhead datapath.
//!
//! Each `#[classifier]` calls one `try_*` function and turns its result into a single TC action;
//! the verdict is decided here and nowhere else. Parsing, conntrack, selection and rewriting
//! live in their own modules.
//!
//! Ingress (a packet arriving from a pod, or on the bridge):
//! 1. a reply of a translated flow (backend -> client) gets the VIP back as its source;
//! 2. a packet of a known flow (client -> VIP) gets its backend as destination;
//! 3. a first packet to a service picks a backend, creates both conntrack entries, and is
//!    translated like 2;
//! 4. anything else passes unchanged.

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
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::{Counters, Flow, IfaceKey, Reason, ServiceCounters, direction, flow_dir, flow_kind};

use crate::{
    maps::{BACKEND_STATS, IFACE_STATS, REASONS, SERVICE_STATS},
    nat::End,
    parse::{Packet, tcp_flags},
};

#[classifier]
pub fn bulkhead_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::INGRESS);
    match try_ingress(&ctx) {
        Ok(()) => TC_ACT_OK,
        Err(Verdict::Pass(reason)) => {
            count_reason(reason);
            TC_ACT_OK
        }
        Err(Verdict::Drop(reason)) => {
            count_reason(reason);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn bulkhead_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::EGRESS);
    TC_ACT_OK
}

/// Why a packet was not (or not fully) handled.
enum Verdict {
    /// Leave the packet as it is.
    Pass(Reason),
    /// Drop it.
    Drop(Reason),
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<(), Verdict> {
    let pkt = parse::parse(ctx).map_err(Verdict::Pass)?;
    let now = conntrack::now();
    let len = u64::from(ctx.len());

    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::REPLY), now) {
        conntrack::touch(flow, &pkt, now);
        // SAFETY: `flow` came from a lookup in this run.
        let f = unsafe { *flow };
        closing(&pkt, &f, f.nat_addr, f.nat_port);
        nat::rewrite(ctx, &pkt, End::Source, f.nat_addr, f.nat_port).map_err(|_| Verdict::Drop(Reason::RewriteFailed))?;
        count_service(f.service_id, f.backend_id, len, false);
        return Ok(());
    }

    if let Some(flow) = conntrack::lookup(&conntrack::key(&pkt, flow_dir::ORIGINAL), now) {
        conntrack::touch(flow, &pkt, now);
        // SAFETY: as above.
        let f = unsafe { *flow };
        closing(&pkt, &f, pkt.daddr, pkt.dport);
        nat::rewrite(ctx, &pkt, End::Destination, f.nat_addr, f.nat_port)
            .map_err(|_| Verdict::Drop(Reason::RewriteFailed))?;
        count_service(f.service_id, f.backend_id, len, false);
        return Ok(());
    }

    let Some(svc) = lb::service(&pkt) else {
        return Ok(());
    };
    let (backend_id, backend) = lb::select(&svc, &pkt, now).map_err(Verdict::Drop)?;
    let state = conntrack::initial_state(&pkt);
    let orig = Flow {
        nat_addr: backend.addr,
        nat_port: backend.port,
        kind: flow_kind::SERVICE,
        state,
        service_id: svc.id,
        backend_id,
        last_seen_ns: now,
    };
    let reply = Flow { nat_addr: pkt.daddr, nat_port: pkt.dport, ..orig };
    let created = conntrack::create(
        &conntrack::key(&pkt, flow_dir::ORIGINAL),
        &orig,
        &conntrack::reply_key(&pkt, backend.addr, backend.port),
        &reply,
    );
    match created {
        Ok(()) => lb::count_connection(backend_id, true),
        // Without entries the flow still reaches a consistent backend while hashing picks it.
        Err(_) => count_reason(Reason::ConntrackFull),
    }
    nat::rewrite(ctx, &pkt, End::Destination, backend.addr, backend.port)
        .map_err(|_| Verdict::Drop(Reason::RewriteFailed))?;
    count_service(svc.id, backend_id, len, true);
    Ok(())
}

/// On the first FIN or RST of a TCP flow, takes it out of its backend's open connections (for
/// `lc`). The original-direction entry records that this happened, whichever side closed.
#[inline(always)]
fn closing(pkt: &Packet, f: &Flow, vip: u32, vport: u16) {
    if pkt.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) == 0 {
        return;
    }
    // The original key, rebuilt from either direction: client -> VIP.
    let (client, cport) = if f.nat_addr == vip && f.nat_port == vport {
        (pkt.daddr, pkt.dport) // a reply: the client is its destination
    } else {
        (pkt.saddr, pkt.sport)
    };
    let key = dataplane_common::FlowKey {
        saddr: client,
        daddr: vip,
        sport: cport,
        dport: vport,
        proto: pkt.proto,
        dir: flow_dir::ORIGINAL,
        _pad: 0,
    };
    if let Some(orig) = maps::CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: valid for this run. Two CPUs may both see `counted == 0` and decrement twice;
        // the count is advisory (it only steers `lc`).
        let o = unsafe { &mut *orig };
        if o.kind & CLOSED_COUNTED == 0 {
            o.kind |= CLOSED_COUNTED;
            lb::count_connection(f.backend_id, false);
        }
    }
}

/// Bit in [`Flow::kind`] of an original-direction entry: its close was already counted.
const CLOSED_COUNTED: u8 = 0x80;

#[inline(always)]
fn count_service(service_id: u32, backend_id: u32, len: u64, new_flow: bool) {
    let add = |c: *mut ServiceCounters| {
        // SAFETY: this CPU's value in a per-CPU map, valid for this run.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len;
        if new_flow {
            c.new_flows += 1;
        }
    };
    if let Some(c) = SERVICE_STATS.get_ptr_mut(&service_id) {
        add(c);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(&backend_id) {
        add(c);
    }
}

/// Adds this packet to its interface's per-CPU counters, creating the entry on first sight.
#[inline(always)]
fn count_iface(ctx: &TcContext, dir: u32) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program; `ifindex` is a
    // readable field of `__sk_buff` for tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = IfaceKey { ifindex, direction: dir };
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
