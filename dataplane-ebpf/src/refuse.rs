//! Answers for new flows to a service without backends, as a closed port would give them: a
//! TCP RST for a SYN, an ICMP port unreachable for a datagram. The client learns at once
//! instead of retrying into a black hole until it times out. The packet is turned into its
//! own answer and leaves through the interface it came in on.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, helpers::bpf_skb_change_tail,
    programs::TcContext,
};
use dataplane_common::{proto, tcp_flags};

use crate::{
    ctx::PacketCtx,
    icmp::{DEST_UNREACHABLE, ICMP_HDR, PORT_UNREACHABLE},
    nat,
    parse::{self, L3_OFF, Packet},
};

/// Rewrites the packet into its answer; returns the interface to send it out of.
///
/// A BPF-to-BPF call from the verdict, so its buffers never share a stack frame with the
/// flow-creation path that decided on it.
#[inline(never)]
pub fn answer(ctx: &TcContext) -> Result<u32, ()> {
    let pkt = parse::parse(ctx).map_err(|_| ())?;
    let done = if pkt.tuple.proto == proto::TCP {
        tcp_reset(ctx, &pkt)
    } else {
        port_unreachable(ctx, &pkt)
    };
    done.map(|()| ctx.ifindex()).map_err(|_| ())
}

/// The SYN becomes the RST|ACK answering it. Swapping addresses and ports leaves both
/// checksums as they are; only the sequence numbers and flags change, and are updated
/// incrementally.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    let fail = |e| e;
    let macs: [u8; 12] = ctx.load(0).map_err(fail)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(fail)?;
    let t = &pkt.tuple;
    ctx.store(parse::IP_SRC_OFF, &t.daddr, 0).map_err(fail)?;
    ctx.store(parse::IP_DST_OFF, &t.saddr, 0).map_err(fail)?;
    ctx.store(pkt.l4(), &t.dport, 0).map_err(fail)?;
    ctx.store(pkt.l4() + 2, &t.sport, 0).map_err(fail)?;
    let seq: u32 = ctx.load(pkt.l4() + 4).map_err(fail)?;
    let old_ack: u32 = ctx.load(pkt.l4() + 8).map_err(fail)?;
    // RST|ACK acknowledging the SYN: seq 0, ack = their seq + 1.
    let ack = (u32::from_be(seq).wrapping_add(1)).to_be();
    let zero = 0u32;
    let old_flags: u16 = ctx.load(pkt.l4() + 12).map_err(fail)?;
    let flags =
        (old_flags & 0xff00u16.to_be()) | u16::from(tcp_flags::RST | tcp_flags::ACK).to_be();
    let csum = pkt.l4_csum();
    ctx.l4_csum_replace(csum, u64::from(seq), u64::from(zero), 4)
        .map_err(fail)?;
    ctx.l4_csum_replace(csum, u64::from(old_ack), u64::from(ack), 4)
        .map_err(fail)?;
    ctx.l4_csum_replace(csum, u64::from(old_flags), u64::from(flags), 2)
        .map_err(fail)?;
    ctx.store(pkt.l4() + 4, &zero, 0).map_err(fail)?;
    ctx.store(pkt.l4() + 8, &ack, 0).map_err(fail)?;
    ctx.store(pkt.l4() + 12, &flags, 0).map_err(fail)?;
    Ok(())
}

/// The datagram becomes an ICMP port unreachable: it is cut to its IP header and first 8
/// bytes (the quote), and a new IP and ICMP header go in front.
///
/// Only datagrams without IP options (the quote is then 28 bytes); others are dropped.
/// The answer is written word by word (no buffers: this runs on top of the entry point's
/// stack frame), checksums computed from scratch. A datagram from a local socket may still be
/// marked `CHECKSUM_PARTIAL`, pointing at the quoted UDP checksum; the veth it leaves through
/// hands it over without ever computing that.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    const QUOTE: usize = 28;
    const NEW: usize = 20 + ICMP_HDR;
    if pkt.l4() != L3_OFF + 20 || pkt.first_fragment {
        return Err(-1);
    }
    // Host-order 32-bit words; a checksum adds their 16-bit halves.
    let halves = |w: u32| (w >> 16) + (w & 0xffff);
    let mut quote_sum = 0u32;
    for i in 0..QUOTE / 4 {
        quote_sum += halves(u32::from_be(ctx.load::<u32>(L3_OFF + 4 * i)?));
    }
    // The answer goes back where the datagram came from: MAC addresses swapped.
    let dst_hi: u32 = ctx.load(0)?;
    let dst_lo: u16 = ctx.load(4)?;
    let src_hi: u16 = ctx.load(6)?;
    let src_lo: u32 = ctx.load(8)?;
    // SAFETY: the context's own skb; shrinking to a length the packet already exceeds.
    let cut = unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, (L3_OFF + QUOTE) as u32, 0) };
    if cut != 0 {
        return Err(cut);
    }
    ctx.adjust_room(NEW as i32, BPF_ADJ_ROOM_MAC, 0)?;
    ctx.store(0, &src_hi, 0)?;
    ctx.store(2, &src_lo, 0)?;
    ctx.store(6, &dst_hi, 0)?;
    ctx.store(10, &dst_lo, 0)?;

    // IPv4: version 4, 20 bytes, total length; id 0; TTL 64, ICMP; from the address the
    // datagram was sent to, back to its sender.
    let (from, to) = (
        u32::from_be(pkt.tuple.daddr.0),
        u32::from_be(pkt.tuple.saddr.0),
    );
    let w0 = 0x4500_0000 | (NEW + QUOTE) as u32;
    let w2 = (64 << 24) | (u32::from(proto::ICMP) << 16);
    let csum = !nat::fold(halves(w0) + halves(w2) + halves(from) + halves(to));
    let ip = L3_OFF;
    for (i, w) in [w0, 0, w2 | u32::from(csum), from, to]
        .into_iter()
        .enumerate()
    {
        ctx.store(ip + 4 * i, &w.to_be(), 0)?;
    }
    let w5 = u32::from(DEST_UNREACHABLE) << 24 | u32::from(PORT_UNREACHABLE) << 16;
    let csum = !nat::fold(halves(w5) + quote_sum);
    ctx.store(ip + 20, &(w5 | u32::from(csum)).to_be(), 0)?;
    ctx.store(ip + 24, &0u32, 0)?;
    Ok(())
}
