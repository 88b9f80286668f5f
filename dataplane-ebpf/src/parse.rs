//! Bounds-checked access to packet headers, and the flow tuple of a packet.
//!
//! Every read of packet memory goes through [`ptr_at`], which proves to the verifier that the
//! whole header lies before `data_end`. Nothing here writes to the packet, and nothing here
//! looks at maps: what a tuple means is for `flow`, `lb` and `conntrack` to decide.

use core::mem;

use dataplane_common::{FlowTuple, Reason, V4, proto};

use crate::ctx::PacketCtx;

/// Length of an Ethernet II header without VLAN tags: the IPv4 header starts here.
pub const L3_OFF: usize = 14;
/// EtherType of IPv4, in network byte order as it sits in the frame.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = L3_OFF + 10;
pub const IP_SRC_OFF: usize = L3_OFF + 12;
pub const IP_DST_OFF: usize = L3_OFF + 16;
pub const IP_ID_OFF: usize = L3_OFF + 4;
pub const IP_FRAG_OFF: usize = L3_OFF + 6;
pub const IP_TTL_OFF: usize = L3_OFF + 8;
pub const IP_PROTO_OFF: usize = L3_OFF + 9;
/// Bits of the IPv4 flags-and-offset field (host order).
pub const MORE_FRAGMENTS: u16 = 0x2000;
pub const FRAG_OFFSET: u16 = 0x1fff;

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is
/// too short to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl PacketCtx, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &impl PacketCtx, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet.
    Some(unsafe { p.read_unaligned() })
}

/// A parsed TCP or UDP packet over IPv4: its flow tuple, and where its headers are.
///
/// 24 bytes: a `Packet` lives in the entry points' stack frames, which the verifier limits.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Addresses, ports, protocol and TCP flags as the packet arrived (before any rewrite).
    pub tuple: FlowTuple,
    /// Offset of the L4 header from the start of the frame (16 bits: a `Packet` lives in the
    /// entry points' stack frames, which the verifier limits).
    l4_off: u16,
    /// Offset of the L4 checksum from the start of the frame.
    l4_csum_off: u16,
    /// True for UDP datagrams sent without a checksum (zero), which must stay zero.
    pub udp_no_csum: bool,
    /// The first fragment of a fragmented datagram: later fragments follow its translation.
    pub first_fragment: bool,
    /// The IP identification field (network order), which ties fragments together.
    pub ip_id: u16,
}

impl Packet {
    /// Offset of the L4 header from the start of the frame.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4_off)
    }

    /// Offset of the L4 checksum from the start of the frame.
    #[inline(always)]
    pub fn l4_csum(&self) -> usize {
        usize::from(self.l4_csum_off)
    }
}

const _: () = assert!(mem::size_of::<Packet>() == 24);

/// True for an IPv4 packet carrying ICMP (headers not otherwise checked).
#[inline(always)]
pub fn is_icmp<C: PacketCtx>(ctx: &C) -> bool {
    read::<u16>(ctx, 12) == Some(ETH_P_IP_BE) && read::<u8>(ctx, IP_PROTO_OFF) == Some(proto::ICMP)
}

/// Parses Ethernet, IPv4 and the TCP or UDP ports. Anything else comes back as the [`Reason`]
/// the caller counts before passing the packet on unchanged.
#[inline(always)]
pub fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet, Reason> {
    let ethertype: u16 = read(ctx, 12).ok_or(Reason::Truncated)?;
    if ethertype != ETH_P_IP_BE {
        return Err(Reason::NotIpv4);
    }
    let ver_ihl: u8 = read(ctx, L3_OFF).ok_or(Reason::Truncated)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::Truncated);
    }
    let ip_id: u16 = read(ctx, L3_OFF + 4).ok_or(Reason::Truncated)?;
    let frag: u16 = read(ctx, L3_OFF + 6).ok_or(Reason::Truncated)?;
    let protocol: u8 = read(ctx, L3_OFF + 9).ok_or(Reason::Truncated)?;
    let saddr: u32 = read(ctx, IP_SRC_OFF).ok_or(Reason::Truncated)?;
    let daddr: u32 = read(ctx, IP_DST_OFF).ok_or(Reason::Truncated)?;
    if protocol != proto::TCP && protocol != proto::UDP {
        return Err(Reason::OtherProtocol);
    }
    // A non-zero fragment offset: no L4 header here (see `frag::follow`). The first fragment
    // (offset zero, more-fragments set) has the ports and is translated like any packet.
    let frag = u16::from_be(frag);
    if frag & FRAG_OFFSET != 0 {
        return Err(Reason::Fragment);
    }
    let first_fragment = frag & MORE_FRAGMENTS != 0;
    let l4_off = L3_OFF + ihl;
    let sport: u16 = read(ctx, l4_off).ok_or(Reason::Truncated)?;
    let dport: u16 = read(ctx, l4_off + 2).ok_or(Reason::Truncated)?;
    let (tcp_flags, l4_csum_off, udp_no_csum) = if protocol == proto::TCP {
        let flags: u8 = read(ctx, l4_off + 13).ok_or(Reason::Truncated)?;
        // The whole 20-byte minimum header must be there: rewriting touches the checksum at
        // offset 16, and a segment cut before it is not ours to translate.
        let _urgent: u16 = read(ctx, l4_off + 18).ok_or(Reason::Truncated)?;
        (flags, l4_off + 16, false)
    } else {
        let csum: u16 = read(ctx, l4_off + 6).ok_or(Reason::Truncated)?;
        (0, l4_off + 6, csum == 0)
    };
    Ok(Packet {
        tuple: FlowTuple {
            saddr: V4(saddr),
            daddr: V4(daddr),
            sport,
            dport,
            proto: protocol,
            tcp_flags,
        },
        l4_off: l4_off as u16,
        l4_csum_off: l4_csum_off as u16,
        udp_no_csum,
        first_fragment,
        ip_id,
    })
}
