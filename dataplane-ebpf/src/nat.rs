//! Rewriting addresses and ports, with the IPv4 and L4 checksums kept correct.
//!
//! All writes go through the kernel helpers (`bpf_skb_store_bytes`, `bpf_l3_csum_replace`,
//! `bpf_l4_csum_replace`): they handle CHECKSUM_PARTIAL packets from local sockets, where the
//! L4 checksum field holds only the pseudo-header sum. Types live in `dataplane-common`.
//! This module decides nothing: callers say which end to rewrite and to what.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use dataplane_common::V4;

use crate::{
    ctx::PacketCtx,
    parse::{IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Packet},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Replaces the source or destination address and port of `pkt` (all in network order).
#[inline(always)]
pub fn rewrite<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    end: End,
    addr: V4,
    port: u16,
) -> Result<(), i64> {
    let t = &pkt.tuple;
    let (V4(old_addr), old_port, addr_off, port_off) = match end {
        End::Source => (t.saddr, t.sport, IP_SRC_OFF, pkt.l4()),
        End::Destination => (t.daddr, t.dport, IP_DST_OFF, pkt.l4() + 2),
    };
    let V4(addr) = addr;
    // A UDP checksum of zero means "none" and must stay zero; MANGLED_0 also turns a computed
    // zero into 0xffff, as RFC 768 requires.
    let mangled = if pkt.udp_no_csum {
        0
    } else {
        u64::from(BPF_F_MARK_MANGLED_0)
    };
    let l4 = !pkt.udp_no_csum;
    if addr != old_addr {
        if l4 {
            let flags = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
            ctx.l4_csum_replace(pkt.l4_csum(), u64::from(old_addr), u64::from(addr), flags)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(addr_off, &addr)?;
    }
    if port != old_port {
        if l4 {
            ctx.l4_csum_replace(
                pkt.l4_csum(),
                u64::from(old_port),
                u64::from(port),
                mangled | 2,
            )?;
        }
        ctx.store(port_off, &port)?;
    }
    Ok(())
}

// One's-complement arithmetic for checksums the kernel helpers cannot reach: the headers quoted
// inside an ICMP error, and packets built from scratch. Values are raw packet memory (network
// byte order read as-is); a one's-complement sum commutes with byte swapping, so no conversion
// is needed as long as every operand is raw.

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `csum` after a 32-bit field changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
pub fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!csum)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

/// `csum` after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!csum) + u32::from(!old) + u32::from(new))
}
