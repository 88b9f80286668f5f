//! tc entry points of the Bulkhead datapath.
//!
//! Each `#[classifier]` calls one `try_*` function and turns its result into a single TC action;
//! the verdict is decided here and nowhere else. This file must not hold datapath logic.

#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::{Counters, IfaceKey, Reason, direction};

use crate::{
    maps::{IFACE_STATS, REASONS},
    parse::{ETH_P_IP_BE, ethertype},
};

#[classifier]
pub fn bulkhead_ingress(ctx: TcContext) -> i32 {
    try_classify(&ctx, direction::INGRESS)
}

#[classifier]
pub fn bulkhead_egress(ctx: TcContext) -> i32 {
    try_classify(&ctx, direction::EGRESS)
}

#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u32) -> i32 {
    count_iface(ctx, dir);
    match ethertype(ctx) {
        None => count_reason(Reason::Truncated),
        Some(ETH_P_IP_BE) => {}
        Some(_) => count_reason(Reason::NotIpv4),
    }
    TC_ACT_OK
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
        // SAFETY: a per-CPU array slot of this CPU, valid for the program's run.
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
