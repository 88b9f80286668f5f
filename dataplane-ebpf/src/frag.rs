//! IP fragments of translated flows.
//!
//! Only the first fragment of a datagram carries the ports, so only it can be matched to a
//! flow. When it is translated, the addresses it left with are recorded under the datagram's
//! identity (source, destination, IP id, protocol: RFC 791's reassembly key, as it arrived);
//! later fragments look that up and get the same addresses. Their L4 checksum needs no change:
//! it lives in the first fragment, where the translation already updated it for the whole
//! datagram. A later fragment that arrives before its first one is passed unchanged and counted
//! as `fragment`. This module owns the `FRAGMENTS` records only: flow entries are not its
//! business.

use dataplane_common::{FragKey, FragNat, Reason, V4};

use crate::{
    ctx::PacketCtx,
    maps::FRAGMENTS,
    parse::{IP_CSUM_OFF, IP_DST_OFF, IP_ID_OFF, IP_PROTO_OFF, IP_SRC_OFF, Packet},
    verdict::Verdict,
};

/// Passes `result` through, recording the translation of a first fragment.
#[inline(always)]
pub fn remembering<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    result: Result<(), Verdict>,
) -> Result<(), Verdict> {
    if pkt.first_fragment && result.is_ok() {
        remember(ctx, pkt);
    }
    result
}

/// A BPF-to-BPF call, for the same reason as `bypass::deliver`.
#[inline(never)]
fn remember<C: PacketCtx>(ctx: &C, pkt: &Packet) {
    let (Ok(saddr), Ok(daddr)) = (ctx.load::<u32>(IP_SRC_OFF), ctx.load::<u32>(IP_DST_OFF)) else {
        return;
    };
    let t = &pkt.tuple;
    let (V4(orig_saddr), V4(orig_daddr)) = (t.saddr, t.daddr);
    if saddr == orig_saddr && daddr == orig_daddr {
        return;
    }
    let key = FragKey {
        saddr: orig_saddr,
        daddr: orig_daddr,
        id: pkt.ip_id,
        proto: t.proto,
        _pad: 0,
    };
    // A full table evicts the oldest datagram; losing one only drops its later fragments.
    let _ = FRAGMENTS.insert(&key, &FragNat { saddr, daddr }, 0);
}

/// Translates a later fragment (no L4 header) as its first fragment was.
///
/// A BPF-to-BPF call: it keeps the verifier's view of the main path small.
#[inline(never)]
pub fn follow<C: PacketCtx>(ctx: &C) -> Result<(), Verdict> {
    let fail = |_| Verdict::Pass(Reason::Truncated);
    let saddr: u32 = ctx.load(IP_SRC_OFF).map_err(fail)?;
    let daddr: u32 = ctx.load(IP_DST_OFF).map_err(fail)?;
    let id: u16 = ctx.load(IP_ID_OFF).map_err(fail)?;
    let proto: u8 = ctx.load(IP_PROTO_OFF).map_err(fail)?;
    let key = FragKey {
        saddr,
        daddr,
        id,
        proto,
        _pad: 0,
    };
    // SAFETY: a lookup result, copied out at once.
    let Some(nat) = (unsafe { FRAGMENTS.get(&key) }).copied() else {
        return Err(Verdict::Pass(Reason::Fragment));
    };
    for (off, old, new) in [
        (IP_SRC_OFF, saddr, nat.saddr),
        (IP_DST_OFF, daddr, nat.daddr),
    ] {
        if old != new {
            ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
                .map_err(Verdict::rewrite_failed)?;
            ctx.store(off, &new).map_err(Verdict::rewrite_failed)?;
        }
    }
    Ok(())
}
