//! ICMP errors about translated flows.
//!
//! An ICMP error (destination unreachable, including "fragmentation needed", time exceeded,
//! parameter problem) quotes the IP header and the first bytes of the packet that caused it.
//! When that packet was translated, the quote shows the translated addresses, which the host
//! receiving the error has never used: it would drop the error, and path MTU discovery through
//! a VIP would black-hole. So the quote is matched to its flow (it is a packet of the flow
//! travelling the other way, so its reversed tuple is the key) and translated back: inner
//! addresses and ports, the inner IP checksum, the inner L4 checksum where it was quoted, and
//! the ICMP checksum over all of them. The outer address that named the translated end gets
//! the same treatment as in a normal packet of the flow.
//!
//! This module only reads flow entries; it never creates or changes one.

use dataplane_common::{Flow, FlowKey, FlowTuple, Reason, V4, flow_dir, flow_kind, proto};

use crate::{
    conntrack,
    ctx::PacketCtx,
    nat::{self, End},
    parse::{
        FRAG_OFFSET, IP_CSUM_OFF, IP_DST_OFF, IP_FRAG_OFF, IP_PROTO_OFF, IP_SRC_OFF, L3_OFF,
        MORE_FRAGMENTS,
    },
    verdict::Verdict,
};

/// Where the program runs, for [`translate_error`].
pub mod hook {
    pub const INGRESS: u32 = 0;
    /// Egress of any interface but the uplink.
    pub const EGRESS: u32 = 1;
    pub const EGRESS_UPLINK: u32 = 2;
}

pub const DEST_UNREACHABLE: u8 = 3;
pub const PORT_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// Length of the ICMP header before the quoted packet.
pub const ICMP_HDR: usize = 8;

/// The packet an ICMP error quotes: offsets into the frame and its tuple (network order; no
/// TCP flags, which the quote may not even include).
struct Quoted {
    ip_off: usize,
    l4_off: usize,
    tuple: FlowTuple,
    /// Offset of the quoted L4 checksum when the quote includes it (and it is in use).
    l4_csum_off: Option<usize>,
}

/// Translates an ICMP error about a translated flow. `Ok(false)`: not an ICMP error this hook
/// translates (the packet passes unchanged).
///
/// A BPF-to-BPF call: only ICMP pays for its instructions in the verifier's walk.
#[inline(never)]
pub fn translate_error<C: PacketCtx>(ctx: &C, at: u32) -> Result<bool, Verdict> {
    let Some(q) = quoted(ctx) else {
        return Ok(false);
    };
    let now = conntrack::now();
    // The quoted packet went the opposite way to the flow entry that translated it: it is what
    // a packet of that flow answered, so the answer's key finds the entry (in either direction).
    let mut key = FlowKey::answering(&q.tuple);
    let flow = match conntrack::lookup(&key, now) {
        Some(f) => f,
        None => {
            key.dir = flow_dir::ORIGINAL;
            match conntrack::lookup(&key, now) {
                Some(f) => f,
                None => return Ok(false),
            }
        }
    };
    // SAFETY: a lookup result from this run, copied out.
    let f: Flow = unsafe { *flow };
    if f.kind & flow_kind::HAIRPIN != 0 {
        return Ok(false);
    }
    let kind = f.kind & flow_kind::MASK;
    let reply = key.dir == flow_dir::REPLY;
    // The same hooks that translate the flow's packets in the direction the error travels.
    let here = match (kind, reply) {
        (flow_kind::SERVICE, _) => true,
        (flow_kind::NODEPORT, true) | (flow_kind::MASQUERADE, false) => at == hook::EGRESS_UPLINK,
        _ => at == hook::INGRESS,
    };
    if !here {
        return Ok(false);
    }
    // The quoted end the flow translated: a service's VIP (the quote's destination when it is
    // an original packet) or backend (its source when it is a reply); masquerade the other way.
    let inner_end = if (kind == flow_kind::MASQUERADE) == reply {
        End::Source
    } else {
        End::Destination
    };
    let fail = Verdict::rewrite_failed;
    let icmp_csum = L3_OFF + ihl(ctx).ok_or(Verdict::Pass(Reason::Truncated))? + 2;
    // The outer address naming that end, if it is the translated host itself (not a router).
    let (outer_off, V4(old_inner)) = match inner_end {
        End::Destination => (IP_SRC_OFF, q.tuple.daddr),
        End::Source => (IP_DST_OFF, q.tuple.saddr),
    };
    let outer: u32 = ctx.load(outer_off).map_err(fail)?;
    if outer == old_inner && outer != f.nat_addr {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(outer), u64::from(f.nat_addr), 4)
            .map_err(fail)?;
        ctx.store(outer_off, &f.nat_addr).map_err(fail)?;
    }
    rewrite_quoted(ctx, icmp_csum, &q, inner_end, V4(f.nat_addr), f.nat_port).map_err(fail)?;
    if f.peer_port != 0 {
        // The client's port was translated too: the other end of the quote.
        let (other, addr) = match inner_end {
            End::Destination => (End::Source, q.tuple.saddr),
            End::Source => (End::Destination, q.tuple.daddr),
        };
        rewrite_quoted(ctx, icmp_csum, &q, other, addr, f.peer_port).map_err(fail)?;
    }
    Ok(true)
}

#[inline(always)]
fn ihl<C: PacketCtx>(ctx: &C) -> Option<usize> {
    let ver_ihl: u8 = ctx.load(L3_OFF).ok()?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    (ver_ihl >> 4 == 4 && ihl >= 20).then_some(ihl)
}

/// The packet quoted by an ICMP error in this frame, if it is one about TCP or UDP.
#[inline(always)]
fn quoted<C: PacketCtx>(ctx: &C) -> Option<Quoted> {
    let protocol: u8 = ctx.load(IP_PROTO_OFF).ok()?;
    let frag: u16 = ctx.load(IP_FRAG_OFF).ok()?;
    if protocol != proto::ICMP || u16::from_be(frag) & (FRAG_OFFSET | MORE_FRAGMENTS) != 0 {
        return None;
    }
    let icmp_off = L3_OFF + ihl(ctx)?;
    let ty: u8 = ctx.load(icmp_off).ok()?;
    if ty != DEST_UNREACHABLE && ty != TIME_EXCEEDED && ty != PARAMETER_PROBLEM {
        return None;
    }
    let ip_off = icmp_off + ICMP_HDR;
    let ver_ihl: u8 = ctx.load(ip_off).ok()?;
    let inner_ihl = usize::from(ver_ihl & 0x0f) * 4;
    let inner_proto: u8 = ctx.load(ip_off + 9).ok()?;
    let inner_frag: u16 = ctx.load(ip_off + 6).ok()?;
    if ver_ihl >> 4 != 4
        || inner_ihl < 20
        || (inner_proto != proto::TCP && inner_proto != proto::UDP)
        || u16::from_be(inner_frag) & FRAG_OFFSET != 0
    {
        return None;
    }
    // Bounded for the verifier: the quote's header is at most 60 bytes.
    let l4_off = ip_off + (inner_ihl & 0x3c);
    let csum_off = l4_off + if inner_proto == proto::TCP { 16 } else { 6 };
    let l4_csum_off = match ctx.load::<u16>(csum_off) {
        // A UDP checksum of zero means "none": leave it.
        Ok(0) if inner_proto == proto::UDP => None,
        Ok(_) => Some(csum_off),
        Err(_) => None,
    };
    Some(Quoted {
        ip_off,
        l4_off,
        tuple: FlowTuple {
            saddr: V4(ctx.load(ip_off + 12).ok()?),
            daddr: V4(ctx.load(ip_off + 16).ok()?),
            sport: ctx.load(l4_off).ok()?,
            dport: ctx.load(l4_off + 2).ok()?,
            proto: inner_proto,
            tcp_flags: 0,
        },
        l4_csum_off,
    })
}

/// Rewrites one end of the quoted packet, keeping the quoted checksums and the ICMP checksum
/// (at `icmp_csum`, which covers every quoted byte) correct.
#[inline(always)]
fn rewrite_quoted<C: PacketCtx>(
    ctx: &C,
    icmp_csum: usize,
    q: &Quoted,
    end: End,
    addr: V4,
    port: u16,
) -> Result<(), i64> {
    let t = &q.tuple;
    let (addr_off, port_off, V4(old_addr), old_port) = match end {
        End::Source => (q.ip_off + 12, q.l4_off, t.saddr, t.sport),
        End::Destination => (q.ip_off + 16, q.l4_off + 2, t.daddr, t.dport),
    };
    let V4(addr) = addr;
    // Each changed 16-bit word of the quote changes the ICMP checksum the same way.
    let icmp = |old: u64, new: u64, size: u64| ctx.l4_csum_replace(icmp_csum, old, new, size);
    if addr != old_addr {
        let old_csum: u16 = ctx.load(q.ip_off + 10)?;
        let csum = nat::csum_replace4(old_csum, old_addr, addr);
        ctx.store(q.ip_off + 10, &csum)?;
        icmp(u64::from(old_csum), u64::from(csum), 2)?;
        if let Some(off) = q.l4_csum_off {
            // The L4 checksum covers the addresses through the pseudo-header.
            let old_l4: u16 = ctx.load(off)?;
            let l4 = mangle_zero(q, nat::csum_replace4(old_l4, old_addr, addr));
            ctx.store(off, &l4)?;
            icmp(u64::from(old_l4), u64::from(l4), 2)?;
        }
        ctx.store(addr_off, &addr)?;
        icmp(u64::from(old_addr), u64::from(addr), 4)?;
    }
    if port != old_port {
        if let Some(off) = q.l4_csum_off {
            let old_l4: u16 = ctx.load(off)?;
            let l4 = mangle_zero(q, nat::csum_replace2(old_l4, old_port, port));
            ctx.store(off, &l4)?;
            icmp(u64::from(old_l4), u64::from(l4), 2)?;
        }
        ctx.store(port_off, &port)?;
        icmp(u64::from(old_port), u64::from(port), 2)?;
    }
    Ok(())
}

/// A computed UDP checksum of zero is sent as all ones (RFC 768).
#[inline(always)]
fn mangle_zero(q: &Quoted, csum: u16) -> u16 {
    if csum == 0 && q.tuple.proto == proto::UDP {
        0xffff
    } else {
        csum
    }
}
