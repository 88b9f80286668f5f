//! Service lookup and backend selection.
//!
//! A service's selection table (`SLOTS`, keyed by service id and table generation) lists
//! backend ids; each scheduler turns a new flow into an index into that table. Lookup cost is
//! one hash lookup for the service and two for the backend, whatever the number of services.
//!
//! Everything here takes a flow tuple, never a hook's context: it reads maps and decides, and it
//! must not touch the packet (rewriting is `nat`'s, the flow's entries are `conntrack`'s).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use aya_ebpf_cty::c_void;
use dataplane_common::{
    Affinity, AffinityKey, Backend, FlowTuple, Reason, Service, ServiceKey, SlotKey, V4,
    backend_state, flow_hash, mix32, scheduler, service_flags,
};

use crate::maps::{AFFINITY, BACKEND_CONNS, BACKENDS, NODE_ADDRS, RR_CURSORS, SERVICES, SLOTS};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The service a packet with tuple `t` is addressed to, if any: a VIP, or a NodePort on one of
/// the node's own addresses.
#[inline(always)]
pub fn service(t: &FlowTuple) -> Option<Service> {
    let V4(daddr) = t.daddr;
    let key = ServiceKey {
        addr: daddr,
        port: t.dport,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: the pointer from a successful lookup is valid for this run; copying the value out
    // keeps later reads consistent even if user space replaces the element meanwhile.
    if let Some(p) = SERVICES.get_ptr(&key) {
        return Some(unsafe { *p });
    }
    // SAFETY: only whether the lookup found an element is used; nothing is read through it.
    unsafe { NODE_ADDRS.get(&daddr) }?;
    let key = ServiceKey { addr: 0, ..key };
    // SAFETY: `p` is a pointer from a successful map lookup in this run, whose memory stays valid
    // until the program returns (the kernel frees map elements only after an RCU grace period, and
    // never those of preallocated maps); the value is copied out at once.
    SERVICES.get_ptr(&key).map(|p| unsafe { *p })
}

/// Picks the backend for a new flow of `svc` whose first packet has tuple `t`.
#[inline(always)]
pub fn select(svc: &Service, t: &FlowTuple, now: u64) -> Result<(u32, Backend), Reason> {
    if svc.table_len == 0 {
        return Err(Reason::NoBackend);
    }
    if svc.affinity_secs != 0 {
        if let Some(found) = sticky_backend(svc, t, now) {
            return Ok(found);
        }
    }
    if scheduler::compares(svc.scheduler) {
        let found = least_connections(svc)?;
        remember(svc, t, found.0, now);
        return Ok(found);
    }
    let index = match svc.scheduler {
        scheduler::RANDOM => random(),
        // rr and wrr differ only in the table user space builds.
        scheduler::RR | scheduler::WRR => round_robin(svc.id),
        // sh-port / mh-port: the client's port is hashed too.
        scheduler::SH | scheduler::MH if svc.flags & service_flags::SCHED2 != 0 => {
            mix32(t.saddr.0 ^ u32::from(t.sport).rotate_left(16))
        }
        scheduler::SH | scheduler::MH => mix32(t.saddr.0),
        scheduler::DH => mix32(t.daddr.0),
        // HASH and MAGLEV both hash the 5-tuple; they differ in the table user space builds.
        _ => flow_hash(t.saddr.0, t.daddr.0, t.sport, t.dport, t.proto),
    } % svc.table_len;
    let id = slot(svc, index)?;
    let backend = backend(id)?;
    remember(svc, t, id, now);
    Ok((id, backend))
}

/// The client as affinity sees it: its address, or its network under the service's mask.
#[inline(always)]
fn affinity_client(svc: &Service, t: &FlowTuple) -> u32 {
    if svc.affinity_mask == 0 {
        t.saddr.0
    } else {
        t.saddr.0 & svc.affinity_mask
    }
}

/// Records the client's backend for session affinity.
#[inline(always)]
fn remember(svc: &Service, t: &FlowTuple, id: u32, now: u64) {
    if svc.affinity_secs != 0 {
        let key = AffinityKey {
            service_id: svc.id,
            client: affinity_client(svc, t),
        };
        let _ = AFFINITY.insert(
            &key,
            &Affinity {
                backend_id: id,
                _pad: 0,
                last_seen_ns: now,
            },
            0,
        );
    }
}

/// Longest table `lc` scans (its table lists each active backend once).
pub const LC_SCAN: u32 = 128;

/// State of a scan, shared with the `bpf_loop` callback. `found` and `scheduler` share a word
/// so the struct (in `new_flow`'s frame, the deepest chain) keeps its size.
#[repr(C)]
struct LcScan {
    service_id: u32,
    generation: u32,
    best_id: u32,
    best_weight: u32,
    best_conns: u64,
    found: u16,
    scheduler: u16,
    /// The table's length, for `twos`'s draws (in what was padding).
    table_len: u32,
}

/// The backend the scanning scheduler of `svc` picks, comparing open connections and weights
/// in table order (the order backends were added, as IPVS walks its destinations), a later
/// backend winning only when strictly better:
/// `lc` the fewest connections per unit of weight (IPVS `wlc`: `conns_a * weight_b <
/// conns_b * weight_a`), `sed` the fewest `(conns + 1) / weight`, `nq` the first idle backend
/// or else as `sed`, `fo` the highest weight, `ovf` the highest weight among those with fewer
/// connections than their weight (none: no backend).
///
/// The scan runs under `bpf_loop` (Linux 5.17, commit e6f2dd0f8067): the verifier checks the
/// callback once, where an unrolled loop of `LC_SCAN` lookups multiplies the states it explores
/// past its limit.
#[inline(always)]
fn least_connections(svc: &Service) -> Result<(u32, Backend), Reason> {
    let mut scan = LcScan {
        service_id: svc.id,
        generation: svc.generation,
        best_id: 0,
        best_weight: 0,
        best_conns: 0,
        found: 0,
        scheduler: u16::from(svc.scheduler),
        table_len: svc.table_len,
    };
    // twos compares two random draws; the others scan the table in order.
    let len = if svc.scheduler == scheduler::TWOS {
        2
    } else if svc.table_len < LC_SCAN {
        svc.table_len
    } else {
        LC_SCAN
    };
    // SAFETY: `lc_step` has the callback signature bpf_loop expects, and `scan` outlives the
    // call; the kernel passes the pointer back unchanged.
    unsafe {
        bpf_loop(
            len,
            lc_step as *mut c_void,
            (&mut scan as *mut LcScan).cast(),
            0,
        );
    }
    if scan.found == 0 {
        return Err(Reason::NoBackend);
    }
    Ok((scan.best_id, backend(scan.best_id)?))
}

extern "C" fn lc_step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LcScan` that `least_connections` handed to bpf_loop.
    let scan = unsafe { &mut *(ctx as *mut LcScan) };
    // A remainder by a NonZero cannot divide by zero, so no panic path reaches the object.
    let slot = match core::num::NonZeroU32::new(scan.table_len) {
        Some(len) if scan.scheduler as u8 == scheduler::TWOS => random() % len,
        _ => index,
    };
    let key = SlotKey {
        service_id: scan.service_id,
        generation: scan.generation,
        slot,
    };
    // SAFETY: lookup results are valid for this run and copied out.
    let Some(id) = (unsafe { SLOTS.get(&key) }).copied() else {
        return 0;
    };
    // SAFETY: as for the slot: a lookup result of this run, copied out at once.
    let Some(b) = (unsafe { BACKENDS.get(&id) }).copied() else {
        return 0;
    };
    let conns = open_connections(id);
    let weight = u64::from(b.weight);
    let best_weight = u64::from(scan.best_weight);
    let better = match scan.scheduler as u8 {
        scheduler::SED => {
            scan.found == 0 || (conns + 1) * best_weight < (scan.best_conns + 1) * weight
        }
        scheduler::NQ => {
            // An idle backend already found stays; an idle one is taken at once.
            !(scan.found != 0 && scan.best_conns == 0)
                && (scan.found == 0
                    || conns == 0
                    || (conns + 1) * best_weight < (scan.best_conns + 1) * weight)
        }
        scheduler::FO => scan.found == 0 || weight > best_weight,
        scheduler::OVF => conns < weight && (scan.found == 0 || weight > best_weight),
        scheduler::LC => scan.found == 0 || conns < scan.best_conns,
        _ => scan.found == 0 || conns * best_weight < scan.best_conns * weight,
    };
    if better {
        scan.best_id = id;
        scan.best_weight = u32::from(b.weight);
        scan.best_conns = conns;
        scan.found = 1;
    }
    0
}

#[inline(always)]
fn open_connections(id: u32) -> u64 {
    // SAFETY: array lookup result valid for this run; a torn read of a counter only skews the
    // choice for this one flow.
    match BACKEND_CONNS.get(id) {
        Some(n) => *n,
        None => 0,
    }
}

/// Adjusts the live connection count of backend `id` (atomically: all CPUs share it).
#[inline(always)]
pub fn count_connection(id: u32, opened: bool) {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
    if let Some(p) = BACKEND_CONNS.get_ptr_mut(id) {
        // Adding the two's complement of 1 decrements; the result is unused, so this compiles to
        // a plain BPF atomic add (`lock xadd`), which every kernel with BPF atomics accepts.
        let delta = if opened { 1u64 } else { u64::MAX };
        // SAFETY: `p` points to an 8-byte aligned u64 slot of an array map, valid for this run;
        // the atomic add is safe against other CPUs doing the same.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, delta) };
    }
}

/// The backend id at `index` of the service's current table.
#[inline(always)]
fn slot(svc: &Service, index: u32) -> Result<u32, Reason> {
    let key = SlotKey {
        service_id: svc.id,
        generation: svc.generation,
        slot: index,
    };
    // SAFETY: lookup result valid for this run; u32 copy.
    if let Some(id) = unsafe { SLOTS.get(&key) } {
        return Ok(*id);
    }
    // User space switched tables between our service lookup and now and already removed the
    // old one; it keeps old tables long enough that this does not happen in practice.
    Err(Reason::StaleBackend)
}

#[inline(always)]
pub fn backend(id: u32) -> Result<Backend, Reason> {
    // SAFETY: lookup result valid for this run; copied out.
    match unsafe { BACKENDS.get(&id) } {
        Some(b) => Ok(*b),
        None => Err(Reason::StaleBackend),
    }
}

#[inline(always)]
fn sticky_backend(svc: &Service, t: &FlowTuple, now: u64) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        service_id: svc.id,
        client: affinity_client(svc, t),
    };
    let entry = AFFINITY.get_ptr_mut(&key)?;
    // SAFETY: `entry` is a pointer from a successful map lookup in this run, whose memory stays
    // valid until the program returns (the kernel frees map elements only after an RCU grace
    // period, and never those of preallocated maps); racing writers store whole valid values.
    let a = unsafe { &mut *entry };
    if now.saturating_sub(a.last_seen_ns) > u64::from(svc.affinity_secs) * NS_PER_SEC {
        return None;
    }
    let b = backend(a.backend_id).ok()?;
    if b.state != backend_state::ACTIVE || b.service_id != svc.id || b.weight == 0 {
        return None;
    }
    a.last_seen_ns = now;
    Some((a.backend_id, b))
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// The cursor a service's first rr pick leaves behind; a static, off the full stack (see
/// `counters::count_service`).
static CURSOR_AFTER_FIRST: u32 = 1;

#[inline(always)]
fn round_robin(service_id: u32) -> u32 {
    match RR_CURSORS.get_ptr_mut(&service_id) {
        Some(c) => {
            // SAFETY: this CPU's value in a per-CPU map, valid for this run.
            let cursor = unsafe { &mut *c };
            let v = *cursor;
            *cursor = v.wrapping_add(1);
            v
        }
        // The service's first new flow on this CPU: user space leaves the cursor to the
        // datapath (see `counters::count_service` for why). A failed insert picks slot 0 again.
        None => {
            let _ = RR_CURSORS.insert(&service_id, &CURSOR_AFTER_FIRST, 0);
            0
        }
    }
}
