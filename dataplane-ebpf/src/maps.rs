//! Every map of the datapath, declared once and named from `dataplane_common::map`.
//!
//! Maps are pinned by name, so a reload finds the maps of the previous program in the bpffs
//! directory the loader names, and established state survives restarts. Maps that user space
//! rewrites while packets flow (services, tables, backends) are not preallocated: a replaced
//! element is freed only after an RCU grace period, so a reader never sees it half-reused.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use dataplane_common::{
    AFFINITY_SIZE, Affinity, AffinityKey, Backend, CONNTRACK_SIZE, Counters, DeviceKey, Endpoint,
    FRAGMENTS_SIZE, Flow, FlowKey, FragKey, FragNat, IfaceKey, MAX_BACKENDS, MAX_DEVICE_RULES,
    MAX_ENDPOINTS, MAX_IFACES, MAX_NODE_ADDRS, MAX_REASONS, MAX_SERVICES, MAX_SLOTS, NodeConfig,
    Service, ServiceCounters, ServiceKey, SlotKey, ct_event,
};

/// See [`dataplane_common::map::IFACE_STATS`].
#[map(name = "IFACE_STATS")]
pub static IFACE_STATS: PerCpuHashMap<IfaceKey, Counters> =
    PerCpuHashMap::pinned(MAX_IFACES * 2, 0);

/// See [`dataplane_common::map::REASONS`].
#[map(name = "REASONS")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_REASONS, 0);

/// See [`dataplane_common::map::SERVICES`].
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::pinned(MAX_SERVICES * 2, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::SLOTS`].
#[map(name = "SLOTS")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::BACKENDS`].
#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Open connections per backend id, for `lc`; shared by all CPUs and updated atomically.
#[map(name = "BACKEND_CONNS")]
pub static BACKEND_CONNS: Array<u64> = Array::pinned(MAX_BACKENDS, 0);

/// See [`dataplane_common::map::CONNTRACK_TCP`].
#[map(name = "CONNTRACK_TCP")]
pub static CONNTRACK_TCP: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_SIZE, 0);

/// See [`dataplane_common::map::CONNTRACK_UDP`].
#[map(name = "CONNTRACK_UDP")]
pub static CONNTRACK_UDP: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_SIZE, 0);

/// See [`dataplane_common::map::CT_EVENTS`].
#[map(name = "CT_EVENTS")]
pub static CT_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(ct_event::SLOTS, 0);

/// See [`dataplane_common::map::AFFINITY`].
#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(AFFINITY_SIZE, 0);

// Per-CPU counters are hashes, not arrays: a per-CPU array preallocates every element on every
// CPU at load time (a quarter of a second for 256k elements on two CPUs). The datapath inserts
// an entry on the first packet that needs it; user space only deletes entries, when an id is
// freed or taken again (see `counters::count_service`).

/// See [`dataplane_common::map::SERVICE_STATS`].
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuHashMap<u32, ServiceCounters> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::BACKEND_STATS`].
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuHashMap<u32, ServiceCounters> =
    PerCpuHashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::SERVICE_OUT_STATS`].
#[map(name = "SERVICE_OUT_STATS")]
pub static SERVICE_OUT_STATS: PerCpuHashMap<u32, Counters> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::BACKEND_OUT_STATS`].
#[map(name = "BACKEND_OUT_STATS")]
pub static BACKEND_OUT_STATS: PerCpuHashMap<u32, Counters> =
    PerCpuHashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::RR_CURSORS`].
#[map(name = "RR_CURSORS")]
pub static RR_CURSORS: PerCpuHashMap<u32, u32> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::NODE_ADDRS`].
#[map(name = "NODE_ADDRS")]
pub static NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(MAX_NODE_ADDRS, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::CONFIG`].
#[map(name = "CONFIG")]
pub static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// See [`dataplane_common::map::FRAGMENTS`].
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragNat> = LruHashMap::pinned(FRAGMENTS_SIZE, 0);

/// See [`dataplane_common::map::ENDPOINTS`].
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);

/// See [`dataplane_common::map::DEVICES`].
#[map(name = "DEVICES")]
pub static DEVICES: HashMap<DeviceKey, u32> = HashMap::pinned(MAX_DEVICE_RULES, BPF_F_NO_PREALLOC);
