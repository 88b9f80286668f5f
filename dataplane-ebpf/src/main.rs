//! tc entry points of the Bulkhead datapath.
//!
//! Each `#[classifier]` parses the packet, calls one `try_*` function (`flow::try_ingress`,
//! `flow::try_egress`, or the ICMP and fragment paths) and turns its result into a single TC action
//! in `tc_action`: the verdict is decided here and nowhere else. Nothing else lives here:
//! the flow lifecycle is `flow`, masquerade `masq`, the stack bypass `bypass`, counters
//! `counters`, the verdict vocabulary `verdict`, and the packet-context trait the tc context
//! implements `ctx`.
//!
//! `bulkhead_device` is the one entry point that is not about packets: sandboxes' device access
//! on cgroup v2 (`device`).
//!
//! Egress elsewhere than on the uplink only counts, and translates ICMP errors the node sends.
//! On both hooks, ICMP errors about translated flows are translated back (`icmp`), and later
//! fragments of a datagram follow the translation of its first (`frag`).

#![no_std]
#![no_main]
// For `atomic_xadd`: core's atomic types lack read-modify-write methods on the BPF target.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "BPF atomics are only reachable through the intrinsic"
)]

mod bypass;
mod conntrack;
mod counters;
mod ctx;
mod device;
mod flow;
mod frag;
mod icmp;
mod lb;
mod maps;
mod masq;
mod nat;
mod parse;
mod refuse;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{cgroup_device, classifier},
    programs::{DeviceContext, TcContext},
};
use aya_log_ebpf::debug;
use dataplane_common::{Reason, direction};

use crate::{
    counters::{count_iface, count_reason},
    ctx::PacketCtx,
    verdict::Verdict,
};

/// Sandboxes' device access on cgroup v2 (`device`): 1 allows, 0 refuses.
#[cgroup_device]
pub fn bulkhead_device(ctx: DeviceContext) -> i32 {
    device::check(&ctx)
}

#[classifier]
pub fn bulkhead_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::INGRESS);
    let result = match parse::parse(&ctx) {
        Ok(pkt) => frag::remembering(&ctx, &pkt, flow::try_ingress(&ctx, &pkt)),
        Err(Reason::OtherProtocol) => match icmp::translate_error(&ctx, icmp::hook::INGRESS) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Verdict::Pass(Reason::OtherProtocol)),
            Err(v) => Err(v),
        },
        Err(Reason::Fragment) => frag::follow(&ctx),
        Err(reason) => Err(Verdict::Pass(reason)),
    };
    tc_action(&ctx, result)
}

#[classifier]
pub fn bulkhead_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, direction::EGRESS);
    let cfg = conntrack::config();
    let uplink = cfg.uplink_ifindex != 0 && ctx.ifindex() == cfg.uplink_ifindex;
    if !uplink {
        // Only the uplink translates at egress. Elsewhere (every packet to a pod) the only
        // thing to look at is an ICMP error the node itself sends about a flow it forwarded;
        // one byte tells, without parsing the rest.
        if !parse::is_icmp(&ctx) {
            return TC_ACT_OK;
        }
        return tc_action(
            &ctx,
            icmp::translate_error(&ctx, icmp::hook::EGRESS).map(|_| ()),
        );
    }
    let result = match parse::parse(&ctx) {
        Ok(pkt) => frag::remembering(&ctx, &pkt, flow::try_egress(&ctx, &pkt, cfg)),
        Err(Reason::OtherProtocol) => {
            icmp::translate_error(&ctx, icmp::hook::EGRESS_UPLINK).map(|_| ())
        }
        Err(Reason::Fragment) => frag::follow(&ctx),
        _ => Ok(()),
    };
    tc_action(&ctx, result)
}

/// Turns the result of a hook's work into one TC action, counting every verdict other than a
/// plain pass by its reason.
#[inline(always)]
fn tc_action(ctx: &TcContext, result: Result<(), Verdict>) -> i32 {
    match result {
        Ok(()) => TC_ACT_OK,
        Err(Verdict::Pass(reason)) => {
            count_reason(reason);
            TC_ACT_OK
        }
        Err(Verdict::Drop(reason)) => {
            count_reason(reason);
            // Debug events cost nothing unless `bulkhead up --datapath-log debug` enabled them
            // at load time (aya-log's level is a load-time constant the verifier prunes on).
            debug!(ctx, "drop: reason {}", reason as u32);
            TC_ACT_SHOT
        }
        // SAFETY: an interface index user space registered as a veth; no flags (required).
        Err(Verdict::RedirectPeer(ifindex)) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Err(Verdict::Refuse) => {
            count_reason(Reason::NoBackend);
            match refuse::answer(ctx) {
                Ok(ifindex) => {
                    // SAFETY: an interface index and no flags: out of the interface the packet
                    // came in on (its egress).
                    unsafe { bpf_redirect(ifindex, 0) as i32 }
                }
                Err(()) => TC_ACT_SHOT,
            }
        }
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
