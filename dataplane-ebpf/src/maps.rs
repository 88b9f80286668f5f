//! Every map of the datapath, declared once and named from `dataplane_common::map`.
//!
//! Maps are pinned by name, so a reload finds the maps of the previous program in the bpffs
//! directory the loader names, and established state survives restarts.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use dataplane_common::{Counters, IfaceKey, MAX_IFACES, MAX_REASONS};

/// See [`dataplane_common::map::IFACE_STATS`].
#[map(name = "IFACE_STATS")]
pub static IFACE_STATS: PerCpuHashMap<IfaceKey, Counters> =
    PerCpuHashMap::pinned(MAX_IFACES * 2, 0);

/// See [`dataplane_common::map::REASONS`].
#[map(name = "REASONS")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_REASONS, 0);
