//! Types and names shared by the eBPF datapath and its user-space loader.
//!
//! Everything here is `#![no_std]`, `#[repr(C)]` and free of implicit padding, because the kernel
//! compares hash-map keys byte for byte and the two sides must agree on every offset.
//! This crate must not depend on anything but `aya` (for `Pod`, behind the `user` feature).

#![no_std]

/// Program names as the loader looks them up in the object file.
pub mod program {
    /// The classifier attached at tc ingress (packets arriving on an interface).
    pub const INGRESS: &str = "bulkhead_ingress";
    /// The classifier attached at tc egress (packets leaving through an interface).
    pub const EGRESS: &str = "bulkhead_egress";
}

/// Map names: the kernel side declares each map under this name, the loader pins it under the
/// same name in the bpffs directory.
pub mod map {
    /// Per-CPU packet and byte counters per interface and direction: [`IfaceKey`] -> [`Counters`].
    ///
    /// [`IfaceKey`]: crate::IfaceKey
    /// [`Counters`]: crate::Counters
    pub const IFACE_STATS: &str = "IFACE_STATS";
    /// Per-CPU counts of every verdict other than a plain pass, indexed by [`Reason`].
    ///
    /// [`Reason`]: crate::Reason
    pub const REASONS: &str = "REASONS";
}

/// Capacity of [`map::IFACE_STATS`]: interfaces one node can have attached at once.
pub const MAX_IFACES: u32 = 4096;

/// Traffic direction seen by a tc hook, as stored in [`IfaceKey::direction`].
pub mod direction {
    /// tc ingress: the packet arrives on the interface.
    pub const INGRESS: u32 = 0;
    /// tc egress: the packet leaves through the interface.
    pub const EGRESS: u32 = 1;
}

/// Key of [`map::IFACE_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceKey {
    /// Interface index in the network namespace the program runs in (host order).
    pub ifindex: u32,
    /// One of the [`direction`] constants.
    pub direction: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceKey>() == 8);

/// A packet and byte counter pair; per CPU in every map that holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Bytes as seen by tc: the whole frame including the Ethernet header.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);

impl Counters {
    /// Adds another CPU's share (user space sums per-CPU values with this).
    pub fn add(&mut self, other: &Counters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Why the datapath did something other than pass a packet unchanged.
///
/// The discriminant indexes [`map::REASONS`]; add new reasons at the end.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The headers could not be read within the packet bounds; passed unchanged.
    Truncated = 0,
    /// Not IPv4 (ARP, IPv6, ...): passed unchanged.
    NotIpv4 = 1,
}

impl Reason {
    /// Every reason, in discriminant order, for user space to label the counters.
    pub const ALL: [Reason; 2] = [Reason::Truncated, Reason::NotIpv4];

    /// The stable name shown by `bulkhead stats` and in JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Truncated => "truncated",
            Reason::NotIpv4 => "not-ipv4",
        }
    }
}

/// Size of [`map::REASONS`]; larger than [`Reason::ALL`] so new reasons need no map resize.
pub const MAX_REASONS: u32 = 64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, and has no padding (the
    // size asserts next to the types check it), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IfaceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
}
