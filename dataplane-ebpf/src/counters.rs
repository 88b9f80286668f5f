//! The per-CPU counters the datapath keeps: per interface and direction, per verdict reason, and
//! per service and backend.
//!
//! Counting never changes what happens to a packet: a missing or full counter map only loses
//! counts. This module must not decide anything or touch the packet.

use dataplane_common::{Counters, IfaceKey, Reason, ServiceCounters};

use crate::{
    ctx::PacketCtx,
    maps::{BACKEND_STATS, IFACE_STATS, REASONS, SERVICE_STATS},
};

/// Adds a packet of `len` bytes to its service's and backend's counters.
#[inline(always)]
pub fn count_service(service_id: u32, backend_id: u32, len: u64, new_flow: bool) {
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
pub fn count_iface<C: PacketCtx>(ctx: &C, dir: u32) {
    let key = IfaceKey {
        ifindex: ctx.ifindex(),
        direction: dir,
    };
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
            let _ = IFACE_STATS.insert(
                &key,
                &Counters {
                    packets: 1,
                    bytes: len,
                },
                0,
            );
        }
    }
}

/// Counts a verdict other than a plain pass under its reason.
#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot of this CPU, valid for this run.
        unsafe { *c += 1 };
    }
}
