//! The stack bypass: a translated packet for a pod of this node goes straight to the pod's
//! interface instead of through the bridge, the node's routing and netfilter.
//!
//! This module only prepares the packet for the hand-over (MAC addresses, the TTL the node's
//! routing would have decremented) and says where it goes; the entry point performs the
//! redirect. It must not change a packet it then lets take the normal path, apart from the
//! TTL and MACs of one it is about to redirect.

use dataplane_common::node_flags;

use crate::{
    conntrack,
    ctx::PacketCtx,
    maps::ENDPOINTS,
    parse::{IP_CSUM_OFF, IP_DST_OFF, IP_TTL_OFF, Packet},
    verdict::Verdict,
};

/// Stack bypass: a translated packet for a pod of this node goes straight to the pod's
/// interface (`bpf_redirect_peer`: from this ingress hook to the ingress of the veth's other
/// end, in the pod's namespace) with the MAC addresses the bridge and the node's routing would
/// have given it, and the TTL decremented when the node would have routed it (`routed`). Skips
/// the bridge, the node's routing and netfilter. Anything else (no endpoint registered, bypass
/// turned off, a first fragment, a TTL about to expire) takes the normal path (`Ok`).
///
/// A BPF-to-BPF call: its buffers stay out of the entry point's stack frame, which sits under
/// the deepest call chain (see `flow::new_flow`).
#[inline(never)]
pub fn deliver<C: PacketCtx>(ctx: &C, pkt: &Packet, routed: bool) -> Result<(), Verdict> {
    let cfg = conntrack::config();
    if cfg.flags & node_flags::NO_BYPASS != 0 || pkt.first_fragment {
        return Ok(());
    }
    // The destination as rewritten, not as parsed: the translation happened in place.
    let Ok(daddr) = ctx.load::<u32>(IP_DST_OFF) else {
        return Ok(());
    };
    // SAFETY: a lookup result, copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }).copied() else {
        return Ok(());
    };
    if ep.ifindex == ctx.ifindex() {
        return Ok(());
    }
    if routed {
        // TTL and protocol share a checksum word; as raw memory the TTL is its low byte.
        let word: u16 = ctx.load(IP_TTL_OFF).map_err(Verdict::rewrite_failed)?;
        if word & 0xff <= 1 {
            return Ok(()); // the stack sends the time-exceeded error
        }
        let next = word - 1;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(word), u64::from(next), 2)
            .map_err(Verdict::rewrite_failed)?;
        ctx.store(IP_TTL_OFF, &next)
            .map_err(Verdict::rewrite_failed)?;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.mac);
    macs[6..].copy_from_slice(&ep.gateway_mac);
    ctx.store(0, &macs).map_err(Verdict::rewrite_failed)?;
    Err(Verdict::RedirectPeer(ep.ifindex))
}
