//! Connection tracking: one LRU entry per direction of each translated flow.
//!
//! The original-direction entry (client -> VIP) holds the chosen backend; the reply-direction
//! entry (backend -> client) holds the VIP to restore. Entries expire by protocol state using the
//! timeouts in the node config (`NodeConfig::flow_timeout`, which user space shares); the LRU
//! evicts the coldest when full. Free client ports for translated tuples are claimed here, in
//! one routine ([`claim_port`]).
//!
//! This module works on keys and tuples only: it never reads or writes the packet, and it does
//! not decide what a flow translates to (that is `flow` and `masq`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use dataplane_common::{
    Flow, FlowKey, FlowTuple, MASQ_PORT_MAX, MASQ_PORT_MIN, NodeConfig, ct_event, proto, tcp_flags,
    tcp_state,
};

use crate::maps::{CONFIG, CONNTRACK_TCP, CONNTRACK_UDP, CT_EVENTS};

const NS_PER_SEC: u64 = 1_000_000_000;
/// `last_seen_ns` is refreshed at most this often, so busy flows do not bounce the cache line
/// between CPUs on every packet.
const TOUCH_NS: u64 = NS_PER_SEC;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments, allowed for tc programs.
    unsafe { bpf_ktime_get_ns() }
}

/// What `config` reads when the map cannot be read (never: an array's entries always exist).
static UNSET: NodeConfig = NodeConfig::zeroed();

/// The node settings, read in place: copying them out would cost every caller's stack frame
/// 40 bytes, and the entry points' frames are what the verifier's 512-byte limit is spent on.
#[inline(always)]
pub fn config() -> &'static NodeConfig {
    match CONFIG.get(0) {
        Some(c) => c,
        None => &UNSET,
    }
}

/// The node's timeout for `flow`; a field left at zero (config never written) takes its
/// default. The choice is `dataplane-common`'s, so user space shows the same expiry.
#[inline(always)]
fn timeout_ns(flow: &Flow, protocol: u8) -> u64 {
    u64::from(config().flow_timeout(protocol, flow.state)) * NS_PER_SEC
}

/// The table for a protocol: TCP flows apart from the rest.
#[inline(always)]
fn table(protocol: u8) -> &'static aya_ebpf::maps::LruHashMap<FlowKey, Flow> {
    if protocol == proto::TCP {
        &CONNTRACK_TCP
    } else {
        &CONNTRACK_UDP
    }
}

/// Counts a conntrack event for `protocol`'s table.
#[inline(always)]
fn count(event: u32, protocol: u8) {
    let slot = event + u32::from(protocol != proto::TCP);
    if let Some(c) = CT_EVENTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
        unsafe { *c += 1 };
    }
}

/// Inserts one entry, counting it (or its failure).
#[inline(always)]
pub fn insert(key: &FlowKey, flow: &Flow, flags: u64) -> Result<(), i32> {
    let r = table(key.proto).insert(key, flow, flags);
    count(
        if r.is_ok() {
            ct_event::INSERTS
        } else {
            ct_event::INSERT_FAILURES
        },
        key.proto,
    );
    r
}

/// Removes one entry (a closed flow whose tuple is being reused).
#[inline(always)]
pub fn remove(key: &FlowKey) {
    if table(key.proto).remove(key).is_ok() {
        count(ct_event::REMOVALS, key.proto);
    }
}

/// The entry for `key`, live or not.
#[inline(always)]
pub fn get(key: &FlowKey) -> Option<*mut Flow> {
    table(key.proto).get_ptr_mut(key)
}

/// Looks up a live entry for `key`; an expired one counts as absent.
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64) -> Option<*mut Flow> {
    let flow = get(key)?;
    // SAFETY: a pointer from a successful lookup stays valid for this program run.
    let f = unsafe { &*flow };
    if now.saturating_sub(f.last_seen_ns) > timeout_ns(f, key.proto) {
        return None;
    }
    Some(flow)
}

/// Refreshes the entry's timestamp and TCP state after seeing a packet with tuple `t`.
#[inline(always)]
pub fn touch(flow: *mut Flow, t: &FlowTuple, now: u64) {
    // SAFETY: `flow` came from `lookup` in this program run. Concurrent updates from other CPUs
    // race benignly: each writes a timestamp and a state that are both valid.
    let f = unsafe { &mut *flow };
    if now.saturating_sub(f.last_seen_ns) > TOUCH_NS {
        f.last_seen_ns = now;
    }
    if t.proto == proto::TCP {
        let next = next_tcp_state(f.state, t.tcp_flags);
        if next != f.state {
            f.state = next;
            f.last_seen_ns = now;
        }
    }
}

/// The state after a packet with `flags`, enough to pick the right timeout.
#[inline(always)]
pub fn next_tcp_state(state: u8, flags: u8) -> u8 {
    if flags & (tcp_flags::RST | tcp_flags::FIN) != 0 {
        tcp_state::CLOSING
    } else if state == tcp_state::SYN_SENT && flags & tcp_flags::ACK != 0 {
        tcp_state::ESTABLISHED
    } else {
        state
    }
}

/// The state a new flow whose first packet has tuple `t` starts in.
#[inline(always)]
pub fn initial_state(t: &FlowTuple) -> u8 {
    if t.proto == proto::TCP && t.tcp_flags & tcp_flags::SYN == 0 {
        // A flow picked up mid-stream (say, after the table was flushed) is already open.
        next_tcp_state(tcp_state::ESTABLISHED, t.tcp_flags)
    } else {
        tcp_state::SYN_SENT
    }
}

/// Why a new service flow got no entries.
pub enum CreateError {
    /// The table refused the insert.
    Full,
    /// Another flow owns the reply tuple and no free client port was found.
    NoFreePort,
}

/// Inserts both entries of a new service flow.
///
/// The reply tuple (backend -> client) must name one flow only. It can already be taken by a
/// live flow of another VIP: the same client port reaching the same backend through two
/// services (Linux picks ephemeral ports per destination, so this is ordinary). The backend
/// would then see two connections on one tuple. The new flow's client port is translated to a
/// free one instead: `orig.peer_port` gets the port the client appears with, `reply.peer_port`
/// the client's own, and `reply_key` is updated to match.
///
/// A BPF-to-BPF call: its port search stays out of `new_flow`'s frame, which is on the
/// deepest call chain (entry point, `new_flow`, the `lc` loop callback).
#[inline(never)]
pub fn create(
    orig_key: &FlowKey,
    orig: &mut Flow,
    reply_key: &mut FlowKey,
    reply: &mut Flow,
    now: u64,
) -> Result<(), CreateError> {
    let taken = table(reply_key.proto)
        .insert(&*reply_key, &*reply, NOEXIST)
        .is_err();
    if !taken {
        count(ct_event::INSERTS, reply_key.proto);
    } else {
        let other_vip = match lookup(reply_key, now) {
            // SAFETY: `f` is a pointer from a successful map lookup in this run, whose memory stays
            // valid until the program returns (the kernel frees map elements only after an RCU
            // grace period, and never those of preallocated maps); two fields are read.
            Some(f) => unsafe {
                (*f).nat_addr != reply.nat_addr || (*f).nat_port != reply.nat_port
            },
            None => false,
        };
        if other_vip {
            reply.peer_port = reply_key.dport;
            if !claim_port(reply_key, reply, now, false) {
                return Err(CreateError::NoFreePort);
            }
            orig.peer_port = reply_key.dport;
        } else {
            // Expired, or this same flow's (its original entry was evicted): take it over.
            insert(reply_key, reply, 0).map_err(|_| CreateError::Full)?;
        }
    }
    insert(orig_key, orig, 0).map_err(|_| CreateError::Full)
}

/// A random port (network order) from the ephemeral range translations pick from.
#[inline(always)]
fn random_port() -> u16 {
    let span = u32::from(MASQ_PORT_MAX - MASQ_PORT_MIN) + 1;
    // SAFETY: a helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    (MASQ_PORT_MIN + (r % span) as u16).to_be()
}

/// `BPF_NOEXIST`: insert only if the key is new.
const NOEXIST: u64 = 1;

/// Ports [`claim_port`] tries before giving up.
const CLAIM_TRIES: u32 = 8;

/// Finds a free client port for a translated flow and claims its reply entry: the reply key
/// `key` (whose destination port is the client's port as the peer will see it) is inserted
/// with `BPF_NOEXIST`, trying `key.dport` as given first when `keep_own` is set, then random
/// ports of the ephemeral range, [`CLAIM_TRIES`] in all. On success `key.dport` holds the port
/// claimed and `flow` is stored under `key`.
///
/// Masquerade (the node's address for a pod's flow, the pod's own port when free) and a service
/// flow whose client port already reaches the same backend through another VIP both use it.
#[inline(always)]
pub fn claim_port(key: &mut FlowKey, flow: &Flow, now: u64, keep_own: bool) -> bool {
    for attempt in 0..CLAIM_TRIES {
        if attempt > 0 || !keep_own {
            key.dport = random_port();
        }
        if claim(key, flow, now) {
            return true;
        }
    }
    false
}

/// Claims `reply` for a new flow: fails if a live flow already owns that reply tuple (an
/// expired owner is replaced).
#[inline(always)]
fn claim(reply: &FlowKey, reply_flow: &Flow, now: u64) -> bool {
    // A taken tuple is the expected case here, not a failure worth counting.
    if table(reply.proto)
        .insert(reply, reply_flow, NOEXIST)
        .is_ok()
    {
        count(ct_event::INSERTS, reply.proto);
        return true;
    }
    if lookup(reply, now).is_none() {
        return insert(reply, reply_flow, 0).is_ok();
    }
    false
}
