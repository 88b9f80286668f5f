//! Masquerade: pod traffic leaving the node through the uplink gets the uplink's address as its
//! source, and the replies get the pod back.
//!
//! This module starts a masqueraded flow (claims its reply tuple, records both entries, rewrites
//! the first packet). Packets of flows already masqueraded are translated by `flow`, from their
//! entries, like every tracked flow. It must not touch service flows.

use dataplane_common::{Flow, FlowKey, NodeConfig, Reason, V4, flow_kind};

use crate::{
    conntrack,
    counters::count_reason,
    ctx::PacketCtx,
    nat::{self, End},
    parse::Packet,
    verdict::Verdict,
};

/// True for a packet from the pod subnet to somewhere outside it: one the node masquerades
/// when it leaves through the uplink.
#[inline(always)]
pub fn applies(pkt: &Packet, cfg: &NodeConfig) -> bool {
    let t = &pkt.tuple;
    cfg.pod_mask != 0
        && t.saddr.0 & cfg.pod_mask == cfg.pod_net
        && t.daddr.0 & cfg.pod_mask != cfg.pod_net
}

/// Starts masquerading a pod's flow leaving the node: the node's address as source, with the
/// pod's own source port when no other flow to the same peer holds it, else a random one.
///
/// A BPF-to-BPF call, like `bypass::deliver`: the egress entry point's frame also sits under
/// the ICMP translation's.
#[inline(never)]
pub fn start<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    cfg: &NodeConfig,
    now: u64,
) -> Result<(), Verdict> {
    let t = &pkt.tuple;
    let uplink = V4(cfg.uplink_addr);
    let reply = Flow {
        nat_addr: t.saddr.0,
        nat_port: t.sport,
        kind: flow_kind::MASQUERADE,
        state: conntrack::initial_state(t),
        service_id: 0,
        backend_id: 0,
        last_seen_ns: now,
        peer_port: 0,
        _pad: [0; 6],
    };
    // The peer's answer: to the node's address, at the pod's own port if that is free.
    let mut key = FlowKey::answering(&t.with_source(uplink, t.sport));
    if !conntrack::claim_port(&mut key, &reply, now, true) {
        return Err(Verdict::Drop(Reason::NoMasqueradePort));
    }
    let port = key.dport;
    let orig = Flow {
        nat_addr: uplink.0,
        nat_port: port,
        ..reply
    };
    if conntrack::insert(&FlowKey::original(t), &orig, 0).is_err() {
        count_reason(Reason::ConntrackFull);
    }
    nat::rewrite(ctx, pkt, End::Source, uplink, port).map_err(Verdict::rewrite_failed)
}
