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

/// Adds a packet of `len` bytes to its service's and backend's counters, creating each entry
/// on the first packet that needs it.
///
/// User space never creates these entries: a per-CPU element costs the kernel about 15 µs to
/// allocate from a system call (against 0.4 µs for a plain hash element), which made counters
/// most of the cost of installing 10,000 services. It only deletes them when an id is freed or
/// taken again, so an absent entry means zero, and only services that see traffic pay for one.
#[inline(always)]
pub fn count_service(service_id: u32, backend_id: u32, len: u64, new_flow: bool) {
    let first = ServiceCounters {
        packets: 1,
        bytes: len,
        new_flows: u64::from(new_flow),
    };
    match SERVICE_STATS.get_ptr_mut(&service_id) {
        Some(c) => bump(c, len, new_flow),
        // A full map or an empty allocator cache only loses this packet's count.
        None => {
            let _ = SERVICE_STATS.insert(&service_id, &first, 0);
        }
    }
    match BACKEND_STATS.get_ptr_mut(&backend_id) {
        Some(c) => bump(c, len, new_flow),
        None => {
            let _ = BACKEND_STATS.insert(&backend_id, &first, 0);
        }
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
