//! Device control for sandboxes on cgroup v2, where the devices controller of v1 became a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program (Linux 4.15): the kernel asks it before a process of
//! the cgroup opens or creates a device node, and allows the access only when it returns 1.
//!
//! The rules live in `DEVICES`: those keyed by cgroup id 0 apply to every sandbox (docker's
//! default list), those keyed by a sandbox cgroup's id to that sandbox alone (`--device`).
//! A process in a cgroup nested beneath a sandbox's gets the default list only.
//! Nothing here touches packets.

use aya_ebpf::{helpers::bpf_get_current_cgroup_id, programs::DeviceContext};
use dataplane_common::DeviceKey;

use crate::maps::DEVICES;

/// 1 when the access the kernel asks about is allowed, 0 when it is not.
#[inline(always)]
pub fn check(ctx: &DeviceContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_cgroup_dev_ctx` to a cgroup device program;
    // reading its fields is what the verifier allows this program type.
    let (access_type, major, minor) = unsafe {
        let d = &*ctx.device;
        (d.access_type, d.major, d.minor)
    };
    // The low 16 bits are the kind of device, the high 16 the access asked for.
    let kind = (access_type & 0xffff) as u8;
    let access = access_type >> 16;
    // SAFETY: a helper with no arguments, available to cgroup device programs.
    let own = unsafe { bpf_get_current_cgroup_id() };
    let mut allowed = 0u32;
    for cgroup_id in [0, own] {
        for (maj, min) in [
            (major, minor),
            (major, DeviceKey::ANY),
            (DeviceKey::ANY, DeviceKey::ANY),
        ] {
            // SAFETY: a lookup in a map this program owns; the value is copied out at once.
            if let Some(bits) = unsafe { DEVICES.get(&DeviceKey::new(cgroup_id, kind, maj, min)) } {
                allowed |= *bits;
            }
        }
    }
    i32::from(access & !allowed == 0)
}
