//! Types and names shared by the eBPF datapath and its user-space loader.
//!
//! Everything here is `#![no_std]`, `#[repr(C)]` and free of implicit padding, because the kernel
//! compares hash-map keys byte for byte and the two sides must agree on every offset.
//! This crate must not depend on anything but `aya` (for `Pod`, behind the `user` feature).

#![no_std]
// The eBPF side must inline these helpers: an outlined call is a BPF-to-BPF call whose stack
// frame the verifier adds to the deepest call chain, which is limited to 512 bytes.
#![expect(
    clippy::inline_always,
    reason = "a BPF-to-BPF call costs a stack frame the verifier counts"
)]
// Pad bytes are named fields (a hash-map lookup compares raw bytes, so both sides must zero
// them in struct literals); the underscore says nothing reads them.
#![expect(
    clippy::pub_underscore_fields,
    reason = "named pad bytes that both sides zero and nothing reads"
)]

/// Program names as the loader looks them up in the object file.
pub mod program {
    /// The classifier attached at tc ingress (packets arriving on an interface).
    pub const INGRESS: &str = "bulkhead_ingress";
    /// The classifier attached at tc egress (packets leaving through an interface).
    pub const EGRESS: &str = "bulkhead_egress";
    /// The cgroup device program attached to each sandbox's cgroup on cgroup v2.
    pub const DEVICE: &str = "bulkhead_device";
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
    /// Services by virtual address: [`ServiceKey`] -> [`Service`].
    ///
    /// [`ServiceKey`]: crate::ServiceKey
    /// [`Service`]: crate::Service
    pub const SERVICES: &str = "SERVICES";
    /// Backend selection tables: [`SlotKey`] -> backend id. A service's table is the list a
    /// scheduler indexes into (weighted sequence, or a Maglev lookup table).
    ///
    /// [`SlotKey`]: crate::SlotKey
    pub const SLOTS: &str = "SLOTS";
    /// Backends by id: `u32` -> [`Backend`].
    ///
    /// [`Backend`]: crate::Backend
    pub const BACKENDS: &str = "BACKENDS";
    /// Connection tracking of TCP flows (LRU): [`FlowKey`] -> [`Flow`], one entry per
    /// direction. TCP and other flows have separate tables, so a flood of UDP flows evicts
    /// UDP entries only.
    ///
    /// [`FlowKey`]: crate::FlowKey
    /// [`Flow`]: crate::Flow
    pub const CONNTRACK_TCP: &str = "CONNTRACK_TCP";
    /// Connection tracking of UDP flows (LRU), as [`CONNTRACK_TCP`].
    pub const CONNTRACK_UDP: &str = "CONNTRACK_UDP";
    /// Per-CPU conntrack event counters, indexed by [`ct_event`](crate::ct_event).
    pub const CT_EVENTS: &str = "CT_EVENTS";
    /// Session affinity (LRU): [`AffinityKey`] -> [`Affinity`].
    ///
    /// [`AffinityKey`]: crate::AffinityKey
    /// [`Affinity`]: crate::Affinity
    pub const AFFINITY: &str = "AFFINITY";
    /// Per-CPU counters per service id: [`ServiceCounters`].
    ///
    /// [`ServiceCounters`]: crate::ServiceCounters
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU counters per backend id: [`ServiceCounters`].
    ///
    /// [`ServiceCounters`]: crate::ServiceCounters
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-CPU counters of the reply direction alone (backend to client) per service id:
    /// [`Counters`]. [`SERVICE_STATS`] counts both directions; the difference is the
    /// client's side (ipvsadm's `InPkts`, `InBytes`).
    ///
    /// [`Counters`]: crate::Counters
    pub const SERVICE_OUT_STATS: &str = "SERVICE_OUT_STATS";
    /// Per-CPU counters of the reply direction per backend id, as [`SERVICE_OUT_STATS`].
    pub const BACKEND_OUT_STATS: &str = "BACKEND_OUT_STATS";
    /// Open connections per backend id (`u64`, shared by all CPUs), for `lc`.
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    /// Per-CPU round-robin cursors per service id (`u32`).
    pub const RR_CURSORS: &str = "RR_CURSORS";
    /// Node configuration, one [`NodeConfig`] at index 0.
    ///
    /// [`NodeConfig`]: crate::NodeConfig
    pub const CONFIG: &str = "CONFIG";
    /// The node's own IPv4 addresses (network order `u32` -> `u32` 1), where `NodePort`s answer.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Translations of fragmented datagrams (LRU): [`FragKey`] -> [`FragNat`], written when the
    /// first fragment (the one with the ports) is translated, read by the later fragments.
    ///
    /// [`FragKey`]: crate::FragKey
    /// [`FragNat`]: crate::FragNat
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// Pods on this node (network order address -> [`Endpoint`]): where a translated packet can
    /// be handed straight to the pod's interface instead of through the bridge and the stack.
    ///
    /// [`Endpoint`]: crate::Endpoint
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Devices sandboxes may use (cgroup v2): [`DeviceKey`] -> access bits
    /// ([`device_access`](crate::device_access)).
    ///
    /// [`DeviceKey`]: crate::DeviceKey
    pub const DEVICES: &str = "DEVICES";

    /// Every map, for unpinning and listing.
    pub const ALL: [&str; 20] = [
        IFACE_STATS,
        REASONS,
        SERVICES,
        SLOTS,
        BACKENDS,
        BACKEND_CONNS,
        CONNTRACK_TCP,
        CONNTRACK_UDP,
        CT_EVENTS,
        AFFINITY,
        SERVICE_STATS,
        BACKEND_STATS,
        SERVICE_OUT_STATS,
        BACKEND_OUT_STATS,
        RR_CURSORS,
        CONFIG,
        NODE_ADDRS,
        FRAGMENTS,
        ENDPOINTS,
        DEVICES,
    ];

    /// Value sizes every released layout of a map has had, oldest first: the last is the
    /// current one. A map pinned with an older size is migrated when a new build loads: each
    /// newer layout only appended fields whose zero value means "as before", so an old value
    /// is carried over zero-extended. A map not listed has never changed.
    pub const LAYOUT_HISTORY: [(&str, &[u32]); 3] = [
        (CONNTRACK_TCP, &[24, 32]),
        (CONNTRACK_UDP, &[24, 32]),
        (CONFIG, &[32, 40]),
    ];
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
    /// IPv4 but neither TCP nor UDP: passed unchanged.
    OtherProtocol = 2,
    /// A later fragment of a datagram whose first fragment was not translated here (out of
    /// order, or not a service flow): passed unchanged.
    Fragment = 3,
    /// A new flow to a service with no usable backend: dropped.
    NoBackend = 4,
    /// The selection table pointed at a backend that does not exist: dropped.
    StaleBackend = 5,
    /// Rewriting the packet failed: dropped.
    RewriteFailed = 6,
    /// The conntrack table refused the new flow: forwarded without an entry.
    ConntrackFull = 7,
    /// Masquerade found no free source port after several tries: dropped.
    NoMasqueradePort = 8,
}

impl Reason {
    /// Every reason, in discriminant order, for user space to label the counters.
    pub const ALL: [Reason; 9] = [
        Reason::Truncated,
        Reason::NotIpv4,
        Reason::OtherProtocol,
        Reason::Fragment,
        Reason::NoBackend,
        Reason::StaleBackend,
        Reason::RewriteFailed,
        Reason::ConntrackFull,
        Reason::NoMasqueradePort,
    ];

    /// The stable name shown by `bulkhead stats` and in JSON output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Truncated => "truncated",
            Reason::NotIpv4 => "not-ipv4",
            Reason::OtherProtocol => "other-protocol",
            Reason::Fragment => "fragment",
            Reason::NoBackend => "no-backend",
            Reason::StaleBackend => "stale-backend",
            Reason::RewriteFailed => "rewrite-failed",
            Reason::ConntrackFull => "conntrack-full",
            Reason::NoMasqueradePort => "no-masquerade-port",
        }
    }
}

/// Size of [`map::REASONS`]; larger than [`Reason::ALL`] so new reasons need no map resize.
pub const MAX_REASONS: u32 = 64;

/// Most services the datapath holds; service ids are below this.
pub const MAX_SERVICES: u32 = 131_072;
/// Most backends one service can have.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 1024;
/// Most backends in all; backend ids are below this.
pub const MAX_BACKENDS: u32 = 524_288;
/// Capacity of [`map::SLOTS`] (entries are allocated on demand).
pub const MAX_SLOTS: u32 = 1_048_576;
/// Longest selection table of one service.
pub const MAX_TABLE: u32 = 65_521;
/// Capacity of each conntrack table (two entries per flow).
pub const CONNTRACK_SIZE: u32 = 262_144;

/// Conntrack event counters in [`map::CT_EVENTS`]: per table (TCP at `+ 0`, UDP at `+ 1`).
pub mod ct_event {
    /// Entries inserted.
    pub const INSERTS: u32 = 0;
    /// Inserts the table refused.
    pub const INSERT_FAILURES: u32 = 2;
    /// Entries the datapath removed (a closed flow's tuple reused).
    pub const REMOVALS: u32 = 4;
    /// Entries user space removed (flush, backend removal); written by user space.
    pub const USER_REMOVALS: u32 = 6;
    /// Slots in the map.
    pub const SLOTS: u32 = 8;
}
/// Capacity of [`map::NODE_ADDRS`].
pub const MAX_NODE_ADDRS: u32 = 64;
/// Ephemeral range masquerade picks source ports from when a flow's own port is taken.
pub const MASQ_PORT_MIN: u16 = 32768;
pub const MASQ_PORT_MAX: u16 = 60999;
/// Capacity of [`map::AFFINITY`].
pub const AFFINITY_SIZE: u32 = 65_536;

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Backend schedulers, as stored in [`Service::scheduler`] (IPVS names where IPVS has one).
pub mod scheduler {
    /// Hash of the 5-tuple (the default): stateless, spreads flows evenly.
    pub const HASH: u8 = 0;
    /// A random slot per new flow.
    pub const RANDOM: u8 = 1;
    /// Maglev consistent hashing of the 5-tuple over a prime-sized table.
    pub const MAGLEV: u8 = 2;
    /// Weighted round robin (IPVS `wrr`): weights by slot repetition, with a per-CPU cursor.
    pub const WRR: u8 = 3;
    /// Weighted least connections (IPVS `wlc`): the fewest open connections per unit of
    /// weight.
    pub const WLC: u8 = 4;
    /// Source hashing: the client address alone picks the slot.
    pub const SH: u8 = 5;
    /// Destination hashing: the destination address alone picks the slot.
    pub const DH: u8 = 6;
    /// Shortest expected delay (IPVS `sed`): the fewest `(connections + 1) / weight`.
    pub const SED: u8 = 7;
    /// Never queue (IPVS `nq`): the first idle backend, else as `SED`.
    pub const NQ: u8 = 8;
    /// Weighted failover (IPVS `fo`): the backend of highest weight.
    pub const FO: u8 = 9;
    /// Weighted overflow (IPVS `ovf`): the backend of highest weight that has fewer open
    /// connections than its weight; none when every one is full.
    pub const OVF: u8 = 10;
    /// Round robin (IPVS `rr`): every backend of non-zero weight in turn, weights otherwise
    /// ignored; a per-CPU cursor.
    pub const RR: u8 = 11;
    /// Least connections (IPVS `lc`): the fewest open connections, weights otherwise ignored.
    pub const LC: u8 = 12;
    /// Maglev hashing of the client address (IPVS `mh`), over a Maglev table.
    pub const MH: u8 = 13;
    /// Weighted random twos choice (IPVS `twos`): two backends drawn at random in proportion
    /// to weight (two slots of a weighted table), the one with fewer open connections per
    /// unit of weight taken (the first on a tie).
    pub const TWOS: u8 = 14;

    /// Whether a scheduler scans its table (each active backend once) on every new flow,
    /// comparing open connections and weights, instead of indexing into it.
    #[must_use]
    pub const fn scans(code: u8) -> bool {
        matches!(code, LC | WLC | SED | NQ | FO | OVF)
    }

    /// Whether a scheduler compares backends' open connections (a scan, or `TWOS`'s two
    /// draws) rather than taking the slot it indexes.
    #[must_use]
    pub const fn compares(code: u8) -> bool {
        scans(code) || code == TWOS
    }
}

/// Key of [`map::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IPv4 address, network order. Zero for a `NodePort` entry, which matches any of the
    /// node's own addresses.
    pub addr: u32,
    /// Virtual port, network order.
    pub port: u16,
    /// A [`proto`] number.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// Service flags in [`Service::flags`].
pub mod service_flags {
    /// This entry is the `NodePort` face of a service (key address zero).
    pub const NODEPORT: u8 = 1;
    /// ipvsadm's scheduler flags (`-b`), as IPVS numbers them (`IP_VS_SVC_F_SCHED1..3`)
    /// shifted down by two: flag-1 (`sh-fallback`, `mh-fallback`), flag-2 (`sh-port`,
    /// `mh-port`: `sh` and `mh` hash the client's port too), flag-3.
    pub const SCHED1: u8 = 2;
    pub const SCHED2: u8 = 4;
    pub const SCHED3: u8 = 8;
    /// All three scheduler flags.
    pub const SCHED_MASK: u8 = SCHED1 | SCHED2 | SCHED3;
}

/// Value of [`map::SERVICES`].
///
/// Replaced whole on every change, so a packet sees either the old or the new selection table
/// (tables are keyed by `generation`, and the old one is removed after the switch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service counters and key of its selection table.
    pub id: u32,
    /// Length of the current selection table; zero when the service has no usable backend.
    pub table_len: u32,
    /// Which of the two tables is current (0 or 1).
    pub generation: u32,
    /// Session affinity timeout in seconds; zero disables affinity.
    pub affinity_secs: u32,
    /// A [`scheduler`] constant.
    pub scheduler: u8,
    /// [`service_flags`].
    pub flags: u8,
    /// Number of backends in the current table (for `lc`, which scans them).
    pub backend_count: u16,
    /// Session affinity by client network (ipvsadm's `-M`): the client address is masked with
    /// this before the affinity lookup, network order. Zero (what the padding held before the
    /// field existed) means the whole address.
    pub affinity_mask: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 24);

/// Key of [`map::SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    /// [`Service::generation`] of the table this slot belongs to.
    pub generation: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 12);

/// Backend states in [`Backend::state`].
pub mod backend_state {
    /// Takes new flows.
    pub const ACTIVE: u8 = 0;
    /// Out of the selection table; established flows continue.
    pub const DRAINING: u8 = 1;
}

/// Value of [`map::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 address, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// Relative weight (IPVS semantics: 0 takes no new flows).
    pub weight: u16,
    /// The service this backend belongs to.
    pub service_id: u32,
    /// A [`backend_state`] constant.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

/// Directions of a tracked flow, in [`FlowKey::dir`].
pub mod flow_dir {
    /// Client to service: key is (client, virtual address); value holds the backend.
    pub const ORIGINAL: u8 = 0;
    /// Backend to client: key is (backend, client); value holds the virtual address.
    pub const REPLY: u8 = 1;
}

/// Key of [`map::CONNTRACK`]: the packet's own addresses and ports as it arrives, before any
/// translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    /// A [`flow_dir`] constant.
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// An address of one family, as a [`FlowTuple`] carries it.
///
/// Code written over a tuple of `A: Addr` serves a second family by adding its address type; the
/// map keys of each family stay concrete (for IPv4, `u32` fields), so their layouts never change.
pub trait Addr: Copy + Eq {}

/// An IPv4 address: its four bytes in network order, read as a native `u32`, which is the form
/// every map key and value of this crate holds.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4(pub u32);

impl Addr for V4 {}

/// The identity of a TCP or UDP packet: addresses and ports (network order) and protocol, as the
/// packet carries them at the moment it is read.
///
/// Load balancing and connection tracking take a tuple rather than a hook's packet context, so
/// any hook that can read one (tc, XDP, a socket hook) can use them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple<A: Addr = V4> {
    pub saddr: A,
    pub daddr: A,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    /// A [`proto`] number.
    pub proto: u8,
    /// The TCP flags byte of the packet the tuple was read from (zero for UDP): the conntrack
    /// state machine and the SYN checks read it. It sits where padding would otherwise be, so
    /// the IPv4 tuple stays 16 bytes.
    pub tcp_flags: u8,
}
const _: () = assert!(core::mem::size_of::<FlowTuple<V4>>() == 16);

/// TCP flag bits in [`FlowTuple::tcp_flags`].
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

impl<A: Addr> FlowTuple<A> {
    /// The tuple of a packet travelling the other way (an answer to this one); flags cleared.
    #[inline(always)]
    #[must_use]
    pub fn reversed(&self) -> Self {
        FlowTuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            tcp_flags: 0,
        }
    }

    /// This tuple after its source was rewritten to `addr`:`port`.
    #[inline(always)]
    #[must_use]
    pub fn with_source(&self, addr: A, port: u16) -> Self {
        FlowTuple {
            saddr: addr,
            sport: port,
            ..*self
        }
    }

    /// This tuple after its destination was rewritten to `addr`:`port`.
    #[inline(always)]
    #[must_use]
    pub fn with_destination(&self, addr: A, port: u16) -> Self {
        FlowTuple {
            daddr: addr,
            dport: port,
            ..*self
        }
    }

    /// A pure SYN: the first packet of a TCP connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == proto::TCP
            && self.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    /// A FIN or RST: one side is closing the connection.
    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0
    }
}

impl FlowKey {
    /// The key of `t` in direction `dir` (a [`flow_dir`] constant), addresses as they are.
    #[must_use]
    #[inline(always)]
    pub const fn new(t: &FlowTuple<V4>, dir: u8) -> FlowKey {
        FlowKey {
            saddr: t.saddr.0,
            daddr: t.daddr.0,
            sport: t.sport,
            dport: t.dport,
            proto: t.proto,
            dir,
            _pad: 0,
        }
    }

    /// The original-direction key of a packet `t` (client -> VIP, or pod -> peer), as it
    /// arrives.
    #[must_use]
    #[inline(always)]
    pub const fn original(t: &FlowTuple<V4>) -> FlowKey {
        FlowKey::new(t, flow_dir::ORIGINAL)
    }

    /// The reply-direction key of a packet `t` (backend -> client, or peer -> node), as it
    /// arrives.
    #[must_use]
    #[inline(always)]
    pub const fn reply(t: &FlowTuple<V4>) -> FlowKey {
        FlowKey::new(t, flow_dir::REPLY)
    }

    /// The reply-direction key the answer to a packet `t` will carry: `t` as it leaves (after
    /// any translation), reversed. A new flow's reply entry goes under this key.
    #[must_use]
    #[inline(always)]
    pub fn answering(t: &FlowTuple<V4>) -> FlowKey {
        FlowKey::reply(&t.reversed())
    }
}

/// Kinds of translation a flow entry applies, in the low bits of [`Flow::kind`].
pub mod flow_kind {
    /// Service DNAT for a client on the bridge: original packets get the backend as
    /// destination (at tc ingress), replies the VIP as source (at the backend's veth ingress).
    pub const SERVICE: u8 = 0;
    /// `NodePort` DNAT for a client outside the node: as `SERVICE`, but replies are routed by the
    /// node and translated back at the uplink's egress (the node's own address as a source
    /// arriving on the bridge would be dropped as martian).
    pub const NODEPORT: u8 = 1;
    /// Masquerade: pod traffic leaving through the uplink gets the node's address as source
    /// (at uplink egress); replies get the pod back as destination (at uplink ingress).
    pub const MASQUERADE: u8 = 2;
    /// Mask of the kind in [`Flow::kind`](crate::Flow::kind).
    pub const MASK: u8 = 0x0f;
    /// Flag: a backend reaching its own service. The source is rewritten to the VIP too (and
    /// back on replies), or the backend would receive a packet from itself and drop it.
    pub const HAIRPIN: u8 = 0x40;
    /// Flag on an original-direction entry: its close was already counted for `lc`.
    pub const CLOSE_COUNTED: u8 = 0x80;
}

/// TCP states tracked in [`Flow::state`], enough to choose a timeout.
pub mod tcp_state {
    pub const SYN_SENT: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    pub const CLOSING: u8 = 2;
    pub const CLOSED: u8 = 3;
}

/// Value of [`map::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The address to write: the backend (original direction) or the VIP (reply), network order.
    pub nat_addr: u32,
    /// The port to write, network order.
    pub nat_port: u16,
    /// A [`flow_kind`] constant.
    pub kind: u8,
    /// A [`tcp_state`] constant (TCP only).
    pub state: u8,
    pub service_id: u32,
    pub backend_id: u32,
    /// `bpf_ktime_get_ns` when a packet of the flow was last seen in this direction.
    pub last_seen_ns: u64,
    /// Client port translation, network order, zero for none. On an original entry: the port
    /// the client's source port becomes (its own was taken: the same client port already
    /// reaches the same backend through another VIP). On a reply entry: the client's own port,
    /// restored as the reply's destination.
    pub peer_port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Flow>() == 32);

/// Key of [`map::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    /// Client address, network order.
    pub client: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// Value of [`map::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity>() == 16);

/// Per-CPU counters of a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows for which this service/backend was chosen.
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceCounters>() == 24);

impl ServiceCounters {
    pub fn add(&mut self, other: &ServiceCounters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

/// Node-wide settings, written by `bulkhead up`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Conntrack timeouts in seconds (zero: the default).
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    /// The pod subnet, network order: traffic from it leaving through the uplink is
    /// masqueraded.
    pub pod_net: u32,
    /// Netmask of the pod subnet, network order (zero: no masquerade).
    pub pod_mask: u32,
    /// The uplink's ifindex (zero: none) and its address, network order, used as the
    /// masquerade source.
    pub uplink_ifindex: u32,
    pub uplink_addr: u32,
    /// [`node_flags`].
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 40);

/// Bits of [`NodeConfig::flags`]; zero is the default behaviour.
pub mod node_flags {
    /// Never hand packets straight to a pod's interface (see [`map::ENDPOINTS`]); always go
    /// through the bridge and the node's stack.
    ///
    /// [`map::ENDPOINTS`]: crate::map::ENDPOINTS
    pub const NO_BYPASS: u32 = 1;
}

impl NodeConfig {
    /// All zero: a config map nobody has written yet.
    #[must_use]
    pub const fn zeroed() -> Self {
        NodeConfig {
            tcp_syn_timeout: 0,
            tcp_established_timeout: 0,
            tcp_closing_timeout: 0,
            udp_timeout: 0,
            pod_net: 0,
            pod_mask: 0,
            uplink_ifindex: 0,
            uplink_addr: 0,
            flags: 0,
            _pad: 0,
        }
    }
}

impl NodeConfig {
    /// The defaults: timeouts of the same order of magnitude as Linux's `nf_conntrack` and
    /// Cilium's, nothing else set.
    pub const DEFAULT: NodeConfig = NodeConfig {
        tcp_syn_timeout: 60,
        tcp_established_timeout: 6 * 3600,
        tcp_closing_timeout: 10,
        udp_timeout: 60,
        ..NodeConfig::zeroed()
    };
}

impl NodeConfig {
    /// Seconds a flow entry of protocol `protocol` (a [`proto`] number) in TCP state `state` (a
    /// [`tcp_state`] constant, ignored for UDP) lives without traffic. A timeout left at zero
    /// (config never written, or a field a flag did not name) takes its [`NodeConfig::DEFAULT`].
    ///
    /// The datapath expires entries with this; user space calls it to show the same expiry.
    #[must_use]
    #[inline(always)]
    pub const fn flow_timeout(&self, protocol: u8, state: u8) -> u32 {
        const fn pick(set: u32, default: u32) -> u32 {
            if set == 0 { default } else { set }
        }
        let d = NodeConfig::DEFAULT;
        if protocol == proto::TCP {
            match state {
                tcp_state::SYN_SENT => pick(self.tcp_syn_timeout, d.tcp_syn_timeout),
                tcp_state::ESTABLISHED => {
                    pick(self.tcp_established_timeout, d.tcp_established_timeout)
                }
                _ => pick(self.tcp_closing_timeout, d.tcp_closing_timeout),
            }
        } else {
            pick(self.udp_timeout, d.udp_timeout)
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig::DEFAULT
    }
}

/// Kinds of device in [`DeviceKey::kind`], as the kernel's `BPF_DEVCG_DEV_*`.
pub mod device_kind {
    pub const BLOCK: u8 = 1;
    pub const CHAR: u8 = 2;
}

/// Access bits in [`map::DEVICES`] values, as the kernel's `BPF_DEVCG_ACC_*`.
pub mod device_access {
    pub const MKNOD: u32 = 1;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
}

/// Key of [`map::DEVICES`]: which cgroup (its id; 0 for every sandbox) may use which device.
/// A major or minor of [`DeviceKey::ANY`] matches every number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub cgroup_id: u64,
    pub major: u32,
    pub minor: u32,
    /// A [`device_kind`] constant.
    pub kind: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<DeviceKey>() == 24);

impl DeviceKey {
    /// The wildcard major or minor number.
    pub const ANY: u32 = u32::MAX;

    #[must_use]
    #[inline(always)]
    pub const fn new(cgroup_id: u64, kind: u8, major: u32, minor: u32) -> Self {
        DeviceKey {
            cgroup_id,
            major,
            minor,
            kind,
            _pad: [0; 7],
        }
    }
}

/// Capacity of [`map::DEVICES`].
pub const MAX_DEVICE_RULES: u32 = 4096;

/// Capacity of [`map::FRAGMENTS`]: datagrams in flight in fragments at once.
pub const FRAGMENTS_SIZE: u32 = 8192;

/// Key of [`map::FRAGMENTS`]: what identifies the fragments of one datagram (RFC 791), as
/// they arrive, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
    /// The IP identification field, network order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// Value of [`map::FRAGMENTS`]: the addresses the first fragment left with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragNat {
    pub saddr: u32,
    pub daddr: u32,
}
const _: () = assert!(core::mem::size_of::<FragNat>() == 8);

/// Capacity of [`map::ENDPOINTS`].
pub const MAX_ENDPOINTS: u32 = 65_536;

/// Value of [`map::ENDPOINTS`]: how to hand a packet to a pod directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The host side of the pod's veth pair (its peer is the pod's interface).
    pub ifindex: u32,
    /// The pod interface's MAC address.
    pub mac: [u8; 6],
    /// The MAC the pod knows its gateway by (the bridge's).
    pub gateway_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 16);

/// 32-bit mixing hash (the finalizer of `MurmurHash3`), shared by both sides so user space can
/// predict which slot a flow takes.
#[must_use]
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow's 5-tuple, as the `hash` and `maglev` schedulers use it.
#[must_use]
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix32(saddr ^ 0x9e37_79b9);
    h = mix32(h ^ daddr);
    h = mix32(h ^ ((sport as u32) << 16 | dport as u32));
    mix32(h ^ proto as u32)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, and has no padding (the
    // size asserts next to the types check it), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IfaceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Affinity {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DeviceKey {}
}

// The current layout in `map::LAYOUT_HISTORY` must be the one this build declares: changing a
// type without recording its new size there would load over pinned maps of the old layout.
const fn current_size(entry: usize) -> usize {
    let sizes = map::LAYOUT_HISTORY[entry].1;
    sizes[sizes.len() - 1] as usize
}
const _: () = assert!(current_size(0) == core::mem::size_of::<Flow>());
const _: () = assert!(current_size(1) == core::mem::size_of::<Flow>());
const _: () = assert!(current_size(2) == core::mem::size_of::<NodeConfig>());

#[cfg(test)]
mod tests {
    use super::{FlowKey, FlowTuple, NodeConfig, V4, flow_dir, proto, tcp_flags, tcp_state};

    /// Client 10.0.0.1:40000 to VIP 10.96.0.1:80, TCP, in the byte order packets carry.
    fn tuple() -> FlowTuple {
        FlowTuple {
            saddr: V4(u32::from_be_bytes([10, 0, 0, 1]).to_be()),
            daddr: V4(u32::from_be_bytes([10, 96, 0, 1]).to_be()),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: proto::TCP,
            tcp_flags: tcp_flags::SYN,
        }
    }

    #[test]
    fn original_and_reply_keep_the_tuple() {
        let t = tuple();
        for (key, dir) in [
            (FlowKey::original(&t), flow_dir::ORIGINAL),
            (FlowKey::reply(&t), flow_dir::REPLY),
            (FlowKey::new(&t, flow_dir::REPLY), flow_dir::REPLY),
        ] {
            assert_eq!(
                key,
                FlowKey {
                    saddr: t.saddr.0,
                    daddr: t.daddr.0,
                    sport: t.sport,
                    dport: t.dport,
                    proto: proto::TCP,
                    dir,
                    _pad: 0,
                }
            );
        }
    }

    #[test]
    fn answering_is_the_translated_packet_reversed() {
        let t = tuple();
        let backend = V4(u32::from_be_bytes([10, 0, 1, 7]).to_be());
        let key = FlowKey::answering(&t.with_destination(backend, 8080u16.to_be()));
        assert_eq!(
            key,
            FlowKey {
                saddr: backend.0,
                daddr: t.saddr.0,
                sport: 8080u16.to_be(),
                dport: t.sport,
                proto: proto::TCP,
                dir: flow_dir::REPLY,
                _pad: 0,
            }
        );
        // A translated source (masquerade, a translated client port) is where the answer goes.
        let node = V4(u32::from_be_bytes([192, 0, 2, 1]).to_be());
        let key = FlowKey::answering(&t.with_source(node, 33000u16.to_be()));
        assert_eq!((key.daddr, key.dport), (node.0, 33000u16.to_be()));
        assert_eq!((key.saddr, key.sport), (t.daddr.0, t.dport));
    }

    #[test]
    fn reversed_twice_is_the_tuple_without_flags() {
        let t = tuple();
        assert_eq!(t.reversed().reversed(), FlowTuple { tcp_flags: 0, ..t });
    }

    #[test]
    fn syn_and_closing_flags() {
        let mut t = tuple();
        assert!(t.is_syn() && !t.is_closing());
        t.tcp_flags = tcp_flags::SYN | tcp_flags::ACK;
        assert!(!t.is_syn());
        t.tcp_flags = tcp_flags::ACK | tcp_flags::FIN;
        assert!(t.is_closing());
        t.tcp_flags = tcp_flags::RST;
        assert!(t.is_closing());
        t.proto = proto::UDP;
        t.tcp_flags = tcp_flags::SYN;
        assert!(!t.is_syn(), "only TCP has a SYN");
    }

    #[test]
    fn timeout_by_protocol_and_state() {
        let cfg = NodeConfig {
            tcp_syn_timeout: 5,
            tcp_established_timeout: 600,
            tcp_closing_timeout: 7,
            udp_timeout: 30,
            ..NodeConfig::zeroed()
        };
        assert_eq!(cfg.flow_timeout(proto::TCP, tcp_state::SYN_SENT), 5);
        assert_eq!(cfg.flow_timeout(proto::TCP, tcp_state::ESTABLISHED), 600);
        assert_eq!(cfg.flow_timeout(proto::TCP, tcp_state::CLOSING), 7);
        assert_eq!(cfg.flow_timeout(proto::TCP, tcp_state::CLOSED), 7);
        // UDP has no states: whatever the entry holds, the UDP timeout applies.
        assert_eq!(cfg.flow_timeout(proto::UDP, tcp_state::ESTABLISHED), 30);
    }

    #[test]
    fn unset_timeouts_take_the_defaults() {
        let d = NodeConfig::DEFAULT;
        let cfg = NodeConfig {
            tcp_established_timeout: 99,
            ..NodeConfig::zeroed()
        };
        assert_eq!(
            cfg.flow_timeout(proto::TCP, tcp_state::SYN_SENT),
            d.tcp_syn_timeout
        );
        assert_eq!(cfg.flow_timeout(proto::TCP, tcp_state::ESTABLISHED), 99);
        assert_eq!(
            cfg.flow_timeout(proto::TCP, tcp_state::CLOSING),
            d.tcp_closing_timeout
        );
        assert_eq!(cfg.flow_timeout(proto::UDP, 0), d.udp_timeout);
        assert_eq!(
            NodeConfig::zeroed().flow_timeout(proto::TCP, tcp_state::ESTABLISHED),
            d.tcp_established_timeout
        );
    }
}
