//! The packet context the flow logic runs against: a small trait over what a hook's context can
//! do to a packet (read, write, fix a checksum, tell its length and interface).
//!
//! The tc context implements it here; an XDP or socket hook would implement it for its own
//! context, and the flow, masquerade, bypass and rewrite code would serve it unchanged (cilium
//! does the same with `bpf/lib/overloadable_skb.h` and `overloadable_xdp.h`). This module owns
//! only the mapping onto helpers: no policy, no maps. Every method is `#[inline(always)]`, so
//! the trait adds no BPF-to-BPF call and no stack frame to the verifier's count.

use aya_ebpf::{EbpfContext, programs::TcContext};
use aya_ebpf_cty::c_long;

/// What the datapath's core needs from a hook's packet context. Offsets count from the start of
/// the frame (the Ethernet header); helpers' errors come back as their negative error codes.
pub trait PacketCtx: EbpfContext {
    /// Length of the whole frame in bytes.
    fn len(&self) -> u32;
    /// Index of the interface the hook runs on (host order).
    fn ifindex(&self) -> u32;
    /// Start of the directly readable packet data, for bounds-checked pointer access.
    fn data(&self) -> usize;
    /// End of the directly readable packet data.
    fn data_end(&self) -> usize;
    /// Copies a `T` out of the packet at `offset`.
    fn load<T>(&self, offset: usize) -> Result<T, c_long>;
    /// Writes `v` into the packet at `offset`.
    fn store<T>(&self, offset: usize, v: &T) -> Result<(), c_long>;
    /// Updates the IPv4 header checksum at `offset` for a `size`-byte field that changed from
    /// `from` to `to`.
    fn l3_csum_replace(&self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), c_long>;
    /// Updates the L4 checksum at `offset`, as `bpf_l4_csum_replace` does with `flags` (the
    /// field size, pseudo-header and mangled-zero bits).
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), c_long>;
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `skb` is the context pointer the kernel passed to this program; `ifindex` is a
        // readable field of `__sk_buff` for tc programs.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        TcContext::load(self, offset)
    }

    #[inline(always)]
    fn store<T>(&self, offset: usize, v: &T) -> Result<(), c_long> {
        // No flags: checksums are fixed by the explicit replace calls, never by the store.
        TcContext::store(self, offset, v, 0)
    }

    #[inline(always)]
    fn l3_csum_replace(&self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), c_long> {
        TcContext::l3_csum_replace(self, offset, from, to, size)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), c_long> {
        TcContext::l4_csum_replace(self, offset, from, to, flags)
    }
}
