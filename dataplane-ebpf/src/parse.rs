//! Bounds-checked access to packet headers.
//!
//! Every read of packet memory goes through [`ptr_at`], which proves to the verifier that the
//! whole header lies before `data_end`. Nothing here writes to the packet.

use core::mem;

use aya_ebpf::programs::TcContext;

/// EtherType of IPv4, in network byte order as it sits in the frame.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is
/// too short to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads the EtherType of an untagged Ethernet frame (network byte order).
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    let p = ptr_at::<u16>(ctx, 12)?;
    // SAFETY: `ptr_at` checked that bytes 12..14 lie inside the packet.
    Some(unsafe { p.read_unaligned() })
}
