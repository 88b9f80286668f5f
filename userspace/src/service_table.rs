//! The service table: services, their backends and selection tables, in the datapath's maps.
//!
//! This is the only module that converts between `std::net` types and map keys, so byte order
//! is handled here and nowhere else (map fields are network order, see `dataplane-common`).
//!
//! Every change is published so that a packet sees either the old or the new backend set:
//! the new selection table is written under the other generation, then the service entry is
//! replaced in one map update, then the old table is removed after a grace period. A change
//! that fails midway removes what it wrote and leaves the previous state in place.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    str::FromStr,
    time::Duration,
};

use aya::maps::{MapError, PerCpuValues};
use dataplane_common::{
    Backend, CONNTRACK_SIZE, Flow, FlowKey, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES,
    MAX_TABLE, Service, ServiceCounters, ServiceKey, SlotKey, backend_state, ct_event, flow_dir,
    flow_kind, proto, scheduler, service_flags, tcp_state,
};

use crate::loader::{self, LoaderError, ServiceMaps};

/// How long a replaced selection table stays in the map: packets that read the old service
/// entry may still index into it. A program run takes microseconds; this is ample.
const GRACE: Duration = Duration::from_millis(5);
/// Longest weighted sequence; larger weight sums are scaled down to fit.
const MAX_SEQUENCE: u32 = 4096;
/// `lc` scans its table on every new flow, so it takes at most this many backends (the
/// datapath's `LC_SCAN`).
pub const MAX_LC_BACKENDS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ServiceTableError {
    #[error("invalid {what} {input:?}: {why}")]
    Parse {
        what: &'static str,
        input: String,
        why: String,
    },
    #[error("service {service} already exists")]
    Duplicate { service: VirtualAddr },
    #[error("node port {port}/{proto} is already used by {service}")]
    NodePortInUse {
        port: u16,
        proto: Proto,
        service: VirtualAddr,
    },
    #[error("no service {service}")]
    Unknown { service: VirtualAddr },
    #[error("service {service} has no backend {backend}")]
    UnknownBackend {
        service: VirtualAddr,
        backend: SocketAddrV4,
    },
    #[error("backend {backend} is listed twice for {service}")]
    DuplicateBackend {
        service: VirtualAddr,
        backend: SocketAddrV4,
    },
    #[error("service {service} would have {count} backends; the limit is {max}")]
    TooManyBackends {
        service: VirtualAddr,
        count: usize,
        max: usize,
    },
    #[error("the datapath holds at most {max} {what}")]
    Full { what: &'static str, max: u32 },
    #[error("cannot {action} in map {map}")]
    Map {
        action: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("line {line}: {source}")]
    Restore {
        line: usize,
        #[source]
        source: Box<ServiceTableError>,
    },
    #[error("cannot open the datapath's maps")]
    Loader(#[from] LoaderError),
}

type Result<T, E = ServiceTableError> = std::result::Result<T, E>;

fn parse_err(what: &'static str, input: &str, why: impl fmt::Display) -> ServiceTableError {
    ServiceTableError::Parse {
        what,
        input: input.to_owned(),
        why: why.to_string(),
    }
}

/// Runs a map update, retrying while the kernel answers ENOMEM.
///
/// Maps without preallocation take their elements from the BPF memory allocator, whose per-CPU
/// caches are refilled asynchronously (irq_work); a burst of updates from user space, such as a
/// restore of thousands of services, can drain them and get a transient ENOMEM with plenty of
/// memory free (seen on 6.18; amazon-linux-2023 issue 1129 describes the same on 6.12). A short
/// pause lets the refill run.
fn retrying<T>(mut update: impl FnMut() -> Result<T, MapError>) -> Result<T, MapError> {
    let mut pause = Duration::from_micros(50);
    for _ in 0..200 {
        match update() {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOMEM) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            other => return other,
        }
    }
    update()
}

/// `value` on each of `cpus` CPUs, as a per-CPU map update takes it.
fn zeroed<T: aya::Pod>(cpus: usize, value: T) -> Result<PerCpuValues<T>, MapError> {
    PerCpuValues::try_from(vec![value; cpus]).map_err(MapError::IoError)
}

fn map_err(action: &'static str, map: &'static str) -> impl FnOnce(MapError) -> ServiceTableError {
    move |source| ServiceTableError::Map {
        action,
        map,
        source,
    }
}

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Proto::Tcp),
            proto::UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// ipvsadm's flag for this protocol.
    fn ipvsadm_flag(self) -> &'static str {
        match self {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A service's virtual address: `198.19.0.10:80/tcp` (the protocol defaults to TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl FromStr for VirtualAddr {
    type Err = ServiceTableError;

    fn from_str(input: &str) -> Result<Self> {
        let (sock, proto) = match input.rsplit_once('/') {
            Some((sock, "tcp")) => (sock, Proto::Tcp),
            Some((sock, "udp")) => (sock, Proto::Udp),
            Some((_, other)) => {
                return Err(parse_err(
                    "service address",
                    input,
                    format!("unsupported protocol {other:?} (tcp or udp)"),
                ));
            }
            None => (input, Proto::Tcp),
        };
        let sock = parse_socket("service address", input, sock)?;
        Ok(VirtualAddr {
            addr: *sock.ip(),
            port: sock.port(),
            proto,
        })
    }
}

impl fmt::Display for VirtualAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

impl serde::Serialize for VirtualAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl VirtualAddr {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    fn from_key(key: &ServiceKey) -> Option<Self> {
        Some(VirtualAddr {
            addr: Ipv4Addr::from(u32::from_be(key.addr)),
            port: u16::from_be(key.port),
            proto: Proto::from_number(key.proto)?,
        })
    }
}

fn parse_socket(what: &'static str, whole: &str, input: &str) -> Result<SocketAddrV4> {
    let sock: SocketAddrV4 = input
        .parse()
        .map_err(|_| parse_err(what, whole, "expected IPV4:PORT"))?;
    if sock.port() == 0 {
        return Err(parse_err(what, whole, "port 0 is not a valid port"));
    }
    if sock.ip().is_unspecified() || sock.ip().is_broadcast() || sock.ip().is_multicast() {
        return Err(parse_err(what, whole, "not a unicast address"));
    }
    Ok(sock)
}

/// A backend as given on the command line: `198.18.0.2:8080` or `198.18.0.2:8080@3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddrV4,
    pub weight: u16,
}

impl FromStr for BackendSpec {
    type Err = ServiceTableError;

    fn from_str(input: &str) -> Result<Self> {
        let (sock, weight) = match input.split_once('@') {
            Some((sock, w)) => {
                let w: u16 = w
                    .parse()
                    .map_err(|_| parse_err("backend", input, "weight must be 0..=65535"))?;
                (sock, w)
            }
            None => (input, 1),
        };
        Ok(BackendSpec {
            addr: parse_socket("backend", input, sock)?,
            weight,
        })
    }
}

/// How a service picks the backend of a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    #[default]
    Hash,
    Random,
    Maglev,
    Rr,
    Lc,
    Sh,
    Dh,
}

impl Scheduler {
    const ALL: [Scheduler; 7] = [
        Scheduler::Hash,
        Scheduler::Random,
        Scheduler::Maglev,
        Scheduler::Rr,
        Scheduler::Lc,
        Scheduler::Sh,
        Scheduler::Dh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Hash => "hash",
            Scheduler::Random => "random",
            Scheduler::Maglev => "maglev",
            Scheduler::Rr => "rr",
            Scheduler::Lc => "lc",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
        }
    }

    fn code(self) -> u8 {
        match self {
            Scheduler::Hash => scheduler::HASH,
            Scheduler::Random => scheduler::RANDOM,
            Scheduler::Maglev => scheduler::MAGLEV,
            Scheduler::Rr => scheduler::RR,
            Scheduler::Lc => scheduler::LC,
            Scheduler::Sh => scheduler::SH,
            Scheduler::Dh => scheduler::DH,
        }
    }

    fn from_code(code: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .unwrap_or_default()
    }
}

impl FromStr for Scheduler {
    type Err = ServiceTableError;

    fn from_str(input: &str) -> Result<Self> {
        // IPVS names for the same algorithms are accepted too: every scheduler here is weighted.
        let s = match input {
            "wrr" => "rr",
            "wlc" => "lc",
            "mh" => "maglev",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                parse_err(
                    "scheduler",
                    input,
                    "expected hash, random, maglev (mh), rr (wrr), lc (wlc), sh or dh",
                )
            })
    }
}

/// Everything needed to create a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vaddr: VirtualAddr,
    pub scheduler: Scheduler,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_secs: u32,
    /// Also answer on this port of every node address (Kubernetes NodePort).
    pub nodeport: Option<u16>,
    pub backends: Vec<BackendSpec>,
}

/// Backend state as shown to users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    Draining,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BackendInfo {
    pub addr: SocketAddrV4,
    pub weight: u16,
    pub state: BackendState,
    /// Open TCP connections as the datapath counts them (for `lc`).
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServiceInfo {
    pub service: VirtualAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodeport: Option<u16>,
    pub scheduler: Scheduler,
    pub affinity_secs: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendInfo>,
}

/// The backend ids of a selection table, for the scheduler of a service.
///
/// `backends` are (id, weight) pairs of the backends that take new flows.
pub fn selection_table(sched: Scheduler, backends: &[(u32, SocketAddrV4, u16)]) -> Vec<u32> {
    let usable: Vec<&(u32, SocketAddrV4, u16)> = backends.iter().filter(|b| b.2 > 0).collect();
    if usable.is_empty() {
        return Vec::new();
    }
    match sched {
        // lc weighs connections itself, so it needs each backend exactly once.
        Scheduler::Lc => usable.iter().map(|b| b.0).collect(),
        Scheduler::Maglev => {
            let named: Vec<(String, u16)> = usable.iter().map(|b| (b.1.to_string(), b.2)).collect();
            let size = maglev_size(usable.len());
            maglev_table(&named, size)
                .into_iter()
                .map(|i| usable[i].0)
                .collect()
        }
        _ => {
            let weights: Vec<u16> = usable.iter().map(|b| b.2).collect();
            weighted_sequence(&weights)
                .into_iter()
                .map(|i| usable[i].0)
                .collect()
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Indices into `weights`, each appearing in proportion to its weight, interleaved as smooth
/// weighted round robin does (weights 5,1,1 give a a b a c a a, not a a a a a b c).
pub fn weighted_sequence(weights: &[u16]) -> Vec<usize> {
    let mut w: Vec<u32> = weights.iter().map(|&w| u32::from(w)).collect();
    let g = w.iter().copied().fold(0, gcd).max(1);
    w.iter_mut().for_each(|x| *x /= g);
    let total: u32 = w.iter().sum();
    if total > MAX_SEQUENCE {
        // Scale down, keeping every backend at least once.
        w.iter_mut().for_each(|x| {
            *x = (u64::from(*x) * u64::from(MAX_SEQUENCE) / u64::from(total)).max(1) as u32
        });
    }
    let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
    let mut current = vec![0i64; w.len()];
    (0..total)
        .map(|_| {
            current
                .iter_mut()
                .zip(&w)
                .for_each(|(c, &x)| *c += i64::from(x));
            let best = (0..current.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .unwrap_or(0);
            current[best] -= total;
            best
        })
        .collect()
}

const MAGLEV_PRIMES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Maglev table size: the smallest listed prime at least 100 times the backend count, so each
/// backend's share is within about 1% of its target.
pub fn maglev_size(backends: usize) -> u32 {
    let want = backends.saturating_mul(100) as u64;
    MAGLEV_PRIMES
        .into_iter()
        .find(|&p| u64::from(p) >= want)
        .unwrap_or(MAX_TABLE)
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4) of prime `size`, with weights:
/// in each round a backend takes `weight / max_weight` of a turn, so shares follow weights.
/// Entry `i` holds an index into `backends` (named, so the table depends only on the set).
pub fn maglev_table(backends: &[(String, u16)], size: u32) -> Vec<usize> {
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(name, _)| {
            (
                fnv1a(0x5bd1_e995, name.as_bytes()) % m,
                fnv1a(0x1b87_3593, name.as_bytes()) % (m - 1) + 1,
            )
        })
        .collect();
    let max_w = backends
        .iter()
        .map(|b| u64::from(b.1))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![usize::MAX; size as usize];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let w = u64::from(backends[i].1);
            let turns = (round + 1) * w / max_w - round * w / max_w;
            for _ in 0..turns {
                let mut c = (offset + next[i] * skip) % m;
                while table[c as usize] != usize::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c as usize] = i;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
        round += 1;
    }
    table
}

/// One service as the user-space table knows it.
#[derive(Clone, Debug)]
struct Entry {
    key: ServiceKey,
    value: Service,
    /// The NodePort face of the service: same value (with the NODEPORT flag), address zero.
    nodeport: Option<ServiceKey>,
    backends: Vec<(u32, Backend)>,
}

impl Entry {
    fn vaddr(&self) -> VirtualAddr {
        VirtualAddr::from_key(&self.key).expect("keys are written by this module")
    }

    fn find(&self, addr: SocketAddrV4) -> Option<usize> {
        self.backends
            .iter()
            .position(|(_, b)| backend_addr(b) == addr)
    }

    fn nodeport(&self) -> Option<u16> {
        self.nodeport.map(|k| u16::from_be(k.port))
    }

    /// Writes the service entry, and its NodePort face, so new flows see the current table.
    fn publish(&self, maps: &mut ServiceMaps) -> Result<()> {
        retrying(|| maps.services.insert(self.key, self.value, 0))
            .map_err(map_err("write service", "SERVICES"))?;
        if let Some(np) = self.nodeport {
            let value = Service {
                flags: self.value.flags | service_flags::NODEPORT,
                ..self.value
            };
            retrying(|| maps.services.insert(np, value, 0))
                .map_err(map_err("write node port", "SERVICES"))?;
        }
        Ok(())
    }
}

fn backend_addr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.addr)), u16::from_be(b.port))
}

fn new_backend(spec: &BackendSpec, service_id: u32) -> Backend {
    Backend {
        addr: u32::from(*spec.addr.ip()).to_be(),
        port: spec.addr.port().to_be(),
        weight: spec.weight,
        service_id,
        state: backend_state::ACTIVE,
        _pad: [0; 3],
    }
}

/// Something written to the maps by a change in progress, to remove if the change fails.
enum Undo {
    Service(ServiceKey),
    Slot(SlotKey),
    Backend(u32),
    ServiceStats(u32),
    BackendStats(u32),
    Cursor(u32),
}

/// The service table, loaded from the pinned maps.
pub struct ServiceTable {
    maps: ServiceMaps,
    entries: BTreeMap<VirtualAddr, Entry>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
    /// Old selection tables to remove once the grace period has passed.
    retired: Vec<SlotKey>,
    nr_cpus: usize,
}

impl ServiceTable {
    /// Reads the current table from the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let maps = ServiceMaps::open(dir)?;
        let mut by_service: StdHashMap<u32, Vec<(u32, Backend)>> = StdHashMap::new();
        let mut backend_ids = BTreeSet::new();
        for item in maps.backends.iter() {
            let (id, b) = item.map_err(map_err("read", "BACKENDS"))?;
            backend_ids.insert(id);
            by_service.entry(b.service_id).or_default().push((id, b));
        }
        let mut entries = BTreeMap::new();
        let mut service_ids = BTreeSet::new();
        let mut nodeports = StdHashMap::new();
        for item in maps.services.iter() {
            let (key, value) = item.map_err(map_err("read", "SERVICES"))?;
            if value.flags & service_flags::NODEPORT != 0 {
                nodeports.insert(value.id, key);
                continue;
            }
            let Some(vaddr) = VirtualAddr::from_key(&key) else {
                continue;
            };
            service_ids.insert(value.id);
            let mut backends = by_service.remove(&value.id).unwrap_or_default();
            backends.sort_by_key(|(id, _)| *id);
            entries.insert(
                vaddr,
                Entry {
                    key,
                    value,
                    nodeport: None,
                    backends,
                },
            );
        }
        for entry in entries.values_mut() {
            entry.nodeport = nodeports.remove(&entry.value.id);
        }
        Ok(ServiceTable {
            maps,
            entries,
            service_ids,
            backend_ids,
            retired: Vec::new(),
            nr_cpus: loader::nr_cpus(),
        })
    }

    /// Every service with its backends and counters, ordered by virtual address.
    pub fn list(&self) -> Vec<ServiceInfo> {
        let sum = |v: Result<PerCpuValues<ServiceCounters>, MapError>| {
            let mut total = ServiceCounters::default();
            if let Ok(v) = v {
                v.iter().for_each(|c| total.add(c));
            }
            total
        };
        self.entries
            .values()
            .map(|e| {
                let c = sum(self.maps.service_stats.get(&e.value.id, 0));
                ServiceInfo {
                    service: e.vaddr(),
                    nodeport: e.nodeport(),
                    scheduler: Scheduler::from_code(e.value.scheduler),
                    affinity_secs: e.value.affinity_secs,
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    backends: e
                        .backends
                        .iter()
                        .map(|(id, b)| {
                            let c = sum(self.maps.backend_stats.get(id, 0));
                            BackendInfo {
                                addr: backend_addr(b),
                                weight: b.weight,
                                state: if b.state == backend_state::DRAINING {
                                    BackendState::Draining
                                } else {
                                    BackendState::Active
                                },
                                connections: self.maps.backend_conns.get(id, 0).unwrap_or(0),
                                packets: c.packets,
                                bytes: c.bytes,
                                new_flows: c.new_flows,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The datapath's id of a service (for filtering flows).
    pub fn service_id(&self, vaddr: &VirtualAddr) -> Result<u32> {
        Ok(self.entry(vaddr)?.value.id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Creates a service; nothing is left behind when it fails.
    pub fn add(&mut self, spec: &ServiceSpec) -> Result<()> {
        let mut undo = Vec::new();
        let result = self.add_inner(spec, &mut undo);
        if result.is_err() {
            self.rollback(undo);
        }
        result
    }

    fn validate(&self, spec: &ServiceSpec) -> Result<()> {
        if self.entries.contains_key(&spec.vaddr) {
            return Err(ServiceTableError::Duplicate {
                service: spec.vaddr,
            });
        }
        let max = if spec.scheduler == Scheduler::Lc {
            MAX_LC_BACKENDS
        } else {
            MAX_BACKENDS_PER_SERVICE as usize
        };
        if spec.backends.len() > max {
            return Err(ServiceTableError::TooManyBackends {
                service: spec.vaddr,
                count: spec.backends.len(),
                max,
            });
        }
        if let Some(port) = spec.nodeport {
            if port == 0 {
                return Err(parse_err("node port", "0", "port 0 is not a valid port"));
            }
            let clash = self
                .entries
                .values()
                .find(|e| e.nodeport() == Some(port) && e.key.proto == spec.vaddr.key().proto);
            if let Some(e) = clash {
                return Err(ServiceTableError::NodePortInUse {
                    port,
                    proto: spec.vaddr.proto,
                    service: e.vaddr(),
                });
            }
        }
        let mut seen = BTreeSet::new();
        for b in &spec.backends {
            if !seen.insert(b.addr) {
                return Err(ServiceTableError::DuplicateBackend {
                    service: spec.vaddr,
                    backend: b.addr,
                });
            }
        }
        Ok(())
    }

    fn add_inner(&mut self, spec: &ServiceSpec, undo: &mut Vec<Undo>) -> Result<()> {
        self.validate(spec)?;
        let id = allocate(&self.service_ids, MAX_SERVICES).ok_or(ServiceTableError::Full {
            what: "services",
            max: MAX_SERVICES,
        })?;
        let mut entry = Entry {
            key: spec.vaddr.key(),
            value: Service {
                id,
                table_len: 0,
                generation: 0,
                affinity_secs: spec.affinity_secs,
                scheduler: spec.scheduler.code(),
                flags: 0,
                backend_count: 0,
                _pad: 0,
            },
            nodeport: spec.nodeport.map(|port| ServiceKey {
                addr: 0,
                port: port.to_be(),
                ..spec.vaddr.key()
            }),
            backends: Vec::new(),
        };
        let n = self.nr_cpus;
        retrying(|| {
            self.maps
                .service_stats
                .insert(id, zeroed(n, ServiceCounters::default())?, 0)
        })
        .map_err(map_err("create counters", "SERVICE_STATS"))?;
        undo.push(Undo::ServiceStats(id));
        if spec.scheduler == Scheduler::Rr {
            let n = self.nr_cpus;
            retrying(|| self.maps.rr_cursors.insert(id, zeroed(n, 0u32)?, 0))
                .map_err(map_err("create cursor", "RR_CURSORS"))?;
            undo.push(Undo::Cursor(id));
        }
        self.service_ids.insert(id);
        for b in &spec.backends {
            let bid = self.insert_backend(b, id, undo)?;
            entry.backends.push((bid, new_backend(b, id)));
        }
        let table = self.write_table(&mut entry, undo)?;
        entry.value.table_len = table.len() as u32;
        entry.value.backend_count = entry.backends.len() as u16;
        undo.push(Undo::Service(entry.key));
        if let Some(np) = entry.nodeport {
            undo.push(Undo::Service(np));
        }
        entry.publish(&mut self.maps)?;
        self.entries.insert(spec.vaddr, entry);
        Ok(())
    }

    fn insert_backend(
        &mut self,
        spec: &BackendSpec,
        service_id: u32,
        undo: &mut Vec<Undo>,
    ) -> Result<u32> {
        let id = allocate(&self.backend_ids, MAX_BACKENDS).ok_or(ServiceTableError::Full {
            what: "backends",
            max: MAX_BACKENDS,
        })?;
        let n = self.nr_cpus;
        retrying(|| {
            self.maps
                .backend_stats
                .insert(id, zeroed(n, ServiceCounters::default())?, 0)
        })
        .map_err(map_err("create counters", "BACKEND_STATS"))?;
        undo.push(Undo::BackendStats(id));
        retrying(|| {
            self.maps
                .backends
                .insert(id, new_backend(spec, service_id), 0)
        })
        .map_err(map_err("create backend", "BACKENDS"))?;
        undo.push(Undo::Backend(id));
        let _ = self.maps.backend_conns.set(id, 0, 0);
        self.backend_ids.insert(id);
        Ok(id)
    }

    /// Writes the selection table for `entry`'s backends under the next generation, and sets
    /// `entry.value`'s generation to it (the caller publishes the service entry).
    fn write_table(&mut self, entry: &mut Entry, undo: &mut Vec<Undo>) -> Result<Vec<u32>> {
        let usable: Vec<(u32, SocketAddrV4, u16)> = entry
            .backends
            .iter()
            .filter(|(_, b)| b.state == backend_state::ACTIVE)
            .map(|(id, b)| (*id, backend_addr(b), b.weight))
            .collect();
        let table = selection_table(Scheduler::from_code(entry.value.scheduler), &usable);
        let generation = if entry.value.table_len == 0 {
            entry.value.generation
        } else {
            entry.value.generation ^ 1
        };
        for (slot, id) in table.iter().enumerate() {
            let key = SlotKey {
                service_id: entry.value.id,
                generation,
                slot: slot as u32,
            };
            retrying(|| self.maps.slots.insert(key, *id, 0))
                .map_err(map_err("write selection table", "SLOTS"))?;
            undo.push(Undo::Slot(key));
        }
        if entry.value.table_len != 0 && generation != entry.value.generation {
            let old = entry.value.generation;
            self.retired
                .extend((0..entry.value.table_len).map(|slot| SlotKey {
                    service_id: entry.value.id,
                    generation: old,
                    slot,
                }));
        }
        entry.value.generation = generation;
        Ok(table)
    }

    /// Rebuilds and publishes the table of the service at `vaddr` after its backends changed.
    fn republish(&mut self, vaddr: VirtualAddr, mut entry: Entry) -> Result<()> {
        let mut undo = Vec::new();
        let retired_before = self.retired.len();
        let old_value = entry.value;
        let result = self.write_table(&mut entry, &mut undo).and_then(|table| {
            entry.value.table_len = table.len() as u32;
            entry.value.backend_count = entry.backends.len() as u16;
            entry.publish(&mut self.maps)
        });
        if let Err(e) = result {
            self.retired.truncate(retired_before);
            self.rollback(undo);
            entry.value = old_value;
            self.entries.insert(vaddr, entry);
            return Err(e);
        }
        self.entries.insert(vaddr, entry);
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            let _ = match u {
                Undo::Service(k) => self.maps.services.remove(&k),
                Undo::Slot(k) => self.maps.slots.remove(&k),
                Undo::Backend(id) => {
                    self.backend_ids.remove(&id);
                    self.maps.backends.remove(&id)
                }
                Undo::ServiceStats(id) => {
                    self.service_ids.remove(&id);
                    self.maps.service_stats.remove(&id)
                }
                Undo::BackendStats(id) => self.maps.backend_stats.remove(&id),
                Undo::Cursor(id) => self.maps.rr_cursors.remove(&id),
            };
        }
    }

    fn entry(&self, vaddr: &VirtualAddr) -> Result<Entry> {
        self.entries
            .get(vaddr)
            .cloned()
            .ok_or(ServiceTableError::Unknown { service: *vaddr })
    }

    /// Deletes a service, its backends, its counters and its tracked flows.
    pub fn delete(&mut self, vaddr: &VirtualAddr) -> Result<()> {
        let entry = self.entry(vaddr)?;
        // Unpublish first, so no new flow picks it while the rest goes.
        self.maps
            .services
            .remove(&entry.key)
            .map_err(map_err("delete service", "SERVICES"))?;
        if let Some(np) = entry.nodeport {
            let _ = self.maps.services.remove(&np);
        }
        self.entries.remove(vaddr);
        self.retired
            .extend((0..entry.value.table_len).map(|slot| SlotKey {
                service_id: entry.value.id,
                generation: entry.value.generation,
                slot,
            }));
        self.flush_flows(|_, f| f.service_id == entry.value.id);
        for (id, _) in &entry.backends {
            self.forget_backend(*id);
        }
        let _ = self.maps.service_stats.remove(&entry.value.id);
        let _ = self.maps.rr_cursors.remove(&entry.value.id);
        self.service_ids.remove(&entry.value.id);
        Ok(())
    }

    fn forget_backend(&mut self, id: u32) {
        let _ = self.maps.backends.remove(&id);
        let _ = self.maps.backend_stats.remove(&id);
        let _ = self.maps.backend_conns.set(id, 0, 0);
        self.backend_ids.remove(&id);
    }

    /// Adds a backend to a service, or changes its weight (and reactivates it) if it is there.
    pub fn add_backend(&mut self, vaddr: &VirtualAddr, spec: &BackendSpec) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        match entry.find(spec.addr) {
            Some(i) => {
                let (id, b) = &mut entry.backends[i];
                b.weight = spec.weight;
                b.state = backend_state::ACTIVE;
                retrying(|| self.maps.backends.insert(*id, *b, 0))
                    .map_err(map_err("update backend", "BACKENDS"))?;
            }
            None => {
                let max = if entry.value.scheduler == scheduler::LC {
                    MAX_LC_BACKENDS
                } else {
                    MAX_BACKENDS_PER_SERVICE as usize
                };
                if entry.backends.len() >= max {
                    return Err(ServiceTableError::TooManyBackends {
                        service: *vaddr,
                        count: entry.backends.len() + 1,
                        max,
                    });
                }
                let mut undo = Vec::new();
                let id = match self.insert_backend(spec, entry.value.id, &mut undo) {
                    Ok(id) => id,
                    Err(e) => {
                        self.rollback(undo);
                        return Err(e);
                    }
                };
                entry.backends.push((id, new_backend(spec, entry.value.id)));
                if let Err(e) = self.republish(*vaddr, entry) {
                    self.rollback(undo);
                    if let Some(e) = self.entries.get_mut(vaddr) {
                        e.backends.retain(|(b, _)| *b != id);
                    }
                    return Err(e);
                }
                return Ok(());
            }
        }
        self.republish(*vaddr, entry)
    }

    /// Takes a backend out of the selection table but keeps it listed (as IPVS weight 0):
    /// established flows continue, new flows avoid it. `add_backend` reactivates it.
    pub fn drain_backend(&mut self, vaddr: &VirtualAddr, addr: SocketAddrV4) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        let i = entry.find(addr).ok_or(ServiceTableError::UnknownBackend {
            service: *vaddr,
            backend: addr,
        })?;
        let (id, b) = &mut entry.backends[i];
        b.state = backend_state::DRAINING;
        retrying(|| self.maps.backends.insert(*id, *b, 0))
            .map_err(map_err("update backend", "BACKENDS"))?;
        self.republish(*vaddr, entry)
    }

    /// Removes a backend. Established TCP connections keep going to it unless `force`, which
    /// also drops their conntrack entries (their next packets pick a new backend, or are reset
    /// by it); UDP flows pinned to it are always dropped, so they move on their next datagram.
    pub fn delete_backend(
        &mut self,
        vaddr: &VirtualAddr,
        addr: SocketAddrV4,
        force: bool,
    ) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        let i = entry.find(addr).ok_or(ServiceTableError::UnknownBackend {
            service: *vaddr,
            backend: addr,
        })?;
        let (id, _) = entry.backends.remove(i);
        self.republish(*vaddr, entry)?;
        if force {
            self.flush_flows(|_, f| f.backend_id == id);
        } else {
            // UDP has no end of flow to wait for: a client that keeps its socket (a DNS
            // resolver) would send to the removed backend until the entry times out, which is
            // kube-proxy's longest-standing bug. Its next datagram picks a live backend instead.
            self.flush_flows(|k, f| f.backend_id == id && k.proto == proto::UDP);
        }
        self.forget_backend(id);
        Ok(())
    }

    /// Removes conntrack entries (both directions) whose flow matches; returns how many flows.
    pub fn flush_flows(&mut self, matches: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
        let mut flows = 0;
        for t in 0..2 {
            let doomed: Vec<(FlowKey, Flow)> = self.maps.conntrack[t]
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(k, f)| matches(k, f))
                .collect();
            let mut removed = 0u64;
            for (k, f) in &doomed {
                if self.maps.conntrack[t].remove(k).is_err() {
                    continue;
                }
                removed += 1;
                if k.dir == flow_dir::ORIGINAL {
                    flows += 1;
                    if f.kind & flow_kind::CLOSE_COUNTED == 0 && k.proto == proto::TCP {
                        // Still open: it no longer counts against its backend.
                        if let Ok(n) = self.maps.backend_conns.get(&f.backend_id, 0) {
                            let _ =
                                self.maps
                                    .backend_conns
                                    .set(f.backend_id, n.saturating_sub(1), 0);
                        }
                    }
                }
            }
            self.count_user_removals(t, removed);
        }
        flows
    }

    /// Adds to the user-space removal counter of table `t` (kept on CPU 0's slot; only user
    /// space writes it, one command at a time).
    fn count_user_removals(&mut self, t: usize, n: u64) {
        if n == 0 {
            return;
        }
        let slot = ct_event::USER_REMOVALS + t as u32;
        if let Ok(values) = self.maps.ct_events.get(&slot, 0) {
            let mut v: Vec<u64> = values.iter().copied().collect();
            v[0] += n;
            if let Ok(values) = PerCpuValues::try_from(v) {
                let _ = self.maps.ct_events.set(slot, values, 0);
            }
        }
    }

    /// Size and activity of both conntrack tables.
    pub fn conntrack_stats(&self) -> Vec<ConntrackStats> {
        let now = monotonic_ns();
        let cfg = self.maps.config.get(&0, 0).unwrap_or_default();
        let event = |slot: u32| -> u64 {
            self.maps
                .ct_events
                .get(&slot, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        (0..2)
            .map(|t| {
                let (mut entries, mut live) = (0u64, 0u64);
                for (k, f) in self.maps.conntrack[t].iter().filter_map(|r| r.ok()) {
                    entries += 1;
                    if let Some(p) = Proto::from_number(k.proto)
                        && now.saturating_sub(f.last_seen_ns) / 1_000_000_000
                            <= u64::from(flow_timeout(&cfg, p, f.state))
                    {
                        live += 1;
                    }
                }
                let t32 = t as u32;
                let inserts = event(ct_event::INSERTS + t32);
                let removals =
                    event(ct_event::REMOVALS + t32) + event(ct_event::USER_REMOVALS + t32);
                ConntrackStats {
                    table: if t == 0 { "tcp" } else { "udp" },
                    capacity: u64::from(CONNTRACK_SIZE),
                    entries,
                    live,
                    inserts,
                    insert_failures: event(ct_event::INSERT_FAILURES + t32),
                    removals,
                    // Every entry ever inserted is in the table, was removed, or was evicted.
                    evictions: inserts.saturating_sub(entries + removals),
                }
            })
            .collect()
    }

    /// Tracked flows, original direction, that have not expired.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = monotonic_ns();
        let cfg = self.maps.config.get(&0, 0).unwrap_or_default();
        let services: StdHashMap<u32, VirtualAddr> =
            self.entries.iter().map(|(v, e)| (e.value.id, *v)).collect();
        let mut flows: Vec<FlowInfo> = self
            .maps
            .conntrack
            .iter()
            .flat_map(|table| table.iter())
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.dir == flow_dir::ORIGINAL)
            .filter_map(|(k, f)| {
                let age = now.saturating_sub(f.last_seen_ns) / 1_000_000_000;
                let proto = Proto::from_number(k.proto)?;
                let timeout = flow_timeout(&cfg, proto, f.state);
                if age > u64::from(timeout) {
                    return None;
                }
                let sock = |a: u32, p: u16| {
                    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a)), u16::from_be(p))
                };
                Some(FlowInfo {
                    proto,
                    client: sock(k.saddr, k.sport),
                    service: sock(k.daddr, k.dport),
                    backend: sock(f.nat_addr, f.nat_port),
                    client_port_at_backend: (f.peer_port != 0).then(|| u16::from_be(f.peer_port)),
                    state: flow_state_name(proto, f.state),
                    idle_secs: age,
                    expires_in_secs: u64::from(timeout) - age,
                    service_name: services.get(&f.service_id).map(ToString::to_string),
                })
            })
            .collect();
        flows.sort_by_key(|f| (f.service, f.client));
        flows
    }

    /// ipvsadm `--save` format, one service then its backends, so `restore` reads it back.
    pub fn save(&self) -> String {
        let mut out = String::new();
        for e in self.entries.values() {
            let v = e.vaddr();
            let flag = v.proto.ipvsadm_flag();
            out.push_str(&format!(
                "-A {flag} {}:{} -s {}",
                v.addr,
                v.port,
                Scheduler::from_code(e.value.scheduler).name()
            ));
            if e.value.affinity_secs != 0 {
                out.push_str(&format!(" -p {}", e.value.affinity_secs));
            }
            if let Some(port) = e.nodeport() {
                // Not an ipvsadm flag: IPVS has no NodePort; Bulkhead's restore reads it.
                out.push_str(&format!(" --nodeport {port}"));
            }
            out.push('\n');
            for (_, b) in &e.backends {
                // A draining backend is saved with weight 0, IPVS's way of saying the same.
                let w = if b.state == backend_state::DRAINING {
                    0
                } else {
                    b.weight
                };
                out.push_str(&format!(
                    "-a {flag} {}:{} -r {} -m -w {w}\n",
                    v.addr,
                    v.port,
                    backend_addr(b)
                ));
            }
        }
        out
    }

    /// Reads ipvsadm `--save` lines and adds them all, or nothing: the whole text is checked
    /// first, and a failure while writing removes every service added so far. Returns how many
    /// services were added. `-C` (clear) first deletes every existing service.
    pub fn restore(&mut self, text: &str) -> Result<usize> {
        let (clear, specs) = parse_restore(text)?;
        if clear {
            let all: Vec<VirtualAddr> = self.entries.keys().copied().collect();
            for v in all {
                self.delete(&v)?;
            }
        }
        for (line, spec) in &specs {
            self.validate(spec)
                .map_err(|e| ServiceTableError::Restore {
                    line: *line,
                    source: Box::new(e),
                })?;
        }
        let mut added = Vec::new();
        for (line, spec) in &specs {
            if let Err(e) = self.add(spec) {
                for v in added {
                    let _ = self.delete(&v);
                }
                return Err(ServiceTableError::Restore {
                    line: *line,
                    source: Box::new(e),
                });
            }
            added.push(spec.vaddr);
        }
        Ok(specs.len())
    }

    /// Removes replaced selection tables once no packet can still be reading them.
    pub fn commit(&mut self) {
        if self.retired.is_empty() {
            return;
        }
        std::thread::sleep(GRACE);
        for key in std::mem::take(&mut self.retired) {
            let _ = self.maps.slots.remove(&key);
        }
    }
}

impl Drop for ServiceTable {
    fn drop(&mut self) {
        self.commit();
    }
}

/// Parses ipvsadm `--save` text into service specs, with their line numbers.
fn parse_restore(text: &str) -> Result<(bool, Vec<(usize, ServiceSpec)>)> {
    let mut clear = false;
    let mut specs: Vec<(usize, ServiceSpec)> = Vec::new();
    let mut index: StdHashMap<VirtualAddr, usize> = StdHashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let wrap = |e| ServiceTableError::Restore {
            line,
            source: Box::new(e),
        };
        let words: Vec<&str> = raw
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let Some((&cmd, rest)) = words.split_first() else {
            continue;
        };
        let opts = Options::parse(rest).map_err(wrap)?;
        match cmd {
            "-C" | "--clear" => clear = true,
            "-A" | "--add-service" => {
                let vaddr = opts.service().map_err(wrap)?;
                if index.contains_key(&vaddr) {
                    return Err(wrap(ServiceTableError::Duplicate { service: vaddr }));
                }
                let scheduler = match opts.get(&["-s", "--scheduler"]) {
                    Some(s) => s.parse().map_err(wrap)?,
                    None => Scheduler::default(),
                };
                let affinity_secs = match opts.get(&["-p", "--persistent"]) {
                    Some(p) => p.parse().map_err(|_| {
                        wrap(parse_err("persistence timeout", p, "expected seconds"))
                    })?,
                    None => 0,
                };
                let nodeport = match opts.get(&["--nodeport"]) {
                    Some(p) => Some(
                        p.parse()
                            .map_err(|_| wrap(parse_err("node port", p, "expected 1..=65535")))?,
                    ),
                    None => None,
                };
                index.insert(vaddr, specs.len());
                specs.push((
                    line,
                    ServiceSpec {
                        vaddr,
                        scheduler,
                        affinity_secs,
                        nodeport,
                        backends: Vec::new(),
                    },
                ));
            }
            "-a" | "--add-server" => {
                let vaddr = opts.service().map_err(wrap)?;
                let i = *index
                    .get(&vaddr)
                    .ok_or_else(|| wrap(ServiceTableError::Unknown { service: vaddr }))?;
                if opts.has(&["-g", "--gatewaying", "-i", "--ipip"]) {
                    return Err(wrap(parse_err(
                        "forwarding method",
                        raw,
                        "only masquerading (-m, NAT) is supported",
                    )));
                }
                let real = opts
                    .get(&["-r", "--real-server"])
                    .ok_or_else(|| wrap(parse_err("server line", raw, "missing -r ADDR:PORT")))?;
                let mut spec: BackendSpec = real.parse().map_err(wrap)?;
                if let Some(w) = opts.get(&["-w", "--weight"]) {
                    spec.weight = w
                        .parse()
                        .map_err(|_| wrap(parse_err("weight", w, "expected 0..=65535")))?;
                }
                specs[i].1.backends.push(spec);
            }
            other => return Err(wrap(parse_err("command", other, "expected -A, -a or -C"))),
        }
    }
    Ok((clear, specs))
}

/// Flags of one ipvsadm line: `-t ADDR:PORT -s rr -w 3 -m`.
struct Options<'a> {
    pairs: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Options<'a> {
    fn parse(words: &[&'a str]) -> Result<Self> {
        const SWITCHES: [&str; 6] = ["-m", "--masquerading", "-g", "--gatewaying", "-i", "--ipip"];
        let mut pairs = Vec::new();
        let mut it = words.iter();
        while let Some(&w) = it.next() {
            if SWITCHES.contains(&w) {
                pairs.push((w, None));
            } else {
                let v = it
                    .next()
                    .ok_or_else(|| parse_err("option", w, "missing its value"))?;
                pairs.push((w, Some(*v)));
            }
        }
        Ok(Options { pairs })
    }

    fn get(&self, names: &[&str]) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| names.contains(k))
            .and_then(|(_, v)| *v)
    }

    fn has(&self, names: &[&str]) -> bool {
        self.pairs.iter().any(|(k, _)| names.contains(k))
    }

    fn service(&self) -> Result<VirtualAddr> {
        if let Some(a) = self.get(&["-t", "--tcp-service"]) {
            return format!("{a}/tcp").parse();
        }
        if let Some(a) = self.get(&["-u", "--udp-service"]) {
            return format!("{a}/udp").parse();
        }
        Err(parse_err("service line", "", "missing -t or -u ADDR:PORT"))
    }
}

/// A free id: one past the highest in use, or, once the top of the range is taken, the lowest
/// gap. Freed ids are thus not reused at once, so conntrack entries of a deleted backend cannot
/// be credited to its successor.
fn allocate(used: &BTreeSet<u32>, max: u32) -> Option<u32> {
    match used.last() {
        None => Some(0).filter(|_| max > 0),
        Some(&last) if last + 1 < max => Some(last + 1),
        Some(_) => (0..max)
            .zip(used.iter().copied().chain(std::iter::once(max)))
            .find(|(want, have)| want != have)
            .map(|(want, _)| want),
    }
}

fn flow_timeout(cfg: &dataplane_common::NodeConfig, proto: Proto, state: u8) -> u32 {
    let d = dataplane_common::NodeConfig::default();
    let pick = |v: u32, def: u32| if v == 0 { def } else { v };
    match (proto, state) {
        (Proto::Udp, _) => pick(cfg.udp_timeout, d.udp_timeout),
        (Proto::Tcp, tcp_state::SYN_SENT) => pick(cfg.tcp_syn_timeout, d.tcp_syn_timeout),
        (Proto::Tcp, tcp_state::ESTABLISHED) => {
            pick(cfg.tcp_established_timeout, d.tcp_established_timeout)
        }
        (Proto::Tcp, _) => pick(cfg.tcp_closing_timeout, d.tcp_closing_timeout),
    }
}

fn flow_state_name(proto: Proto, state: u8) -> &'static str {
    match (proto, state) {
        (Proto::Udp, _) => "udp",
        (Proto::Tcp, tcp_state::SYN_SENT) => "syn-sent",
        (Proto::Tcp, tcp_state::ESTABLISHED) => "established",
        (Proto::Tcp, _) => "closing",
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// One conntrack table as `bulkhead conntrack stats` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConntrackStats {
    pub table: &'static str,
    pub capacity: u64,
    /// Entries present (two per flow), expired or not.
    pub entries: u64,
    /// Entries within their timeout.
    pub live: u64,
    pub inserts: u64,
    pub insert_failures: u64,
    /// Entries removed on purpose (reused tuples, flushes, backend removals).
    pub removals: u64,
    /// Entries the LRU pushed out to make room.
    pub evictions: u64,
}

/// One tracked flow as `bulkhead conntrack list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlowInfo {
    pub proto: Proto,
    pub client: SocketAddrV4,
    pub service: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// The port the backend sees the client on, when it differs from the client's own (the
    /// same client port already reached this backend through another VIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_port_at_backend: Option<u16>,
    pub state: &'static str,
    pub idle_secs: u64,
    pub expires_in_secs: u64,
    #[serde(skip)]
    pub service_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_addresses() {
        let ok =
            |s: &str, want: &str| assert_eq!(s.parse::<VirtualAddr>().unwrap().to_string(), want);
        ok("198.19.0.10:80/tcp", "198.19.0.10:80/tcp");
        ok("198.19.0.10:53/udp", "198.19.0.10:53/udp");
        ok("198.19.0.10:80", "198.19.0.10:80/tcp");
        let bad = |s: &str, why: &str| {
            let e = s.parse::<VirtualAddr>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        };
        bad("198.19.0.10:80/sctp", "unsupported protocol");
        bad("198.19.0.10:0/tcp", "port 0");
        bad("198.19.0.300:80", "IPV4:PORT");
        bad("198.19.0.10", "IPV4:PORT");
        bad("0.0.0.0:80", "unicast");
    }

    #[test]
    fn parses_backends_with_weights() {
        let b: BackendSpec = "198.18.0.2:8080@3".parse().unwrap();
        assert_eq!(
            (b.addr.to_string(), b.weight),
            ("198.18.0.2:8080".to_owned(), 3)
        );
        assert_eq!("198.18.0.2:8080".parse::<BackendSpec>().unwrap().weight, 1);
        assert!("198.18.0.2:8080@x".parse::<BackendSpec>().is_err());
        assert!("198.18.0.2:8080@70000".parse::<BackendSpec>().is_err());
    }

    #[test]
    fn scheduler_names_include_ipvs_aliases() {
        let check = |name: &str, want: Scheduler| {
            assert_eq!(name.parse::<Scheduler>().unwrap(), want, "{name}")
        };
        check("hash", Scheduler::Hash);
        check("mh", Scheduler::Maglev);
        check("wrr", Scheduler::Rr);
        check("wlc", Scheduler::Lc);
        assert!("lblc".parse::<Scheduler>().is_err());
    }

    fn shares(seq: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        seq.iter().for_each(|&i| c[i] += 1);
        c
    }

    #[test]
    fn weighted_sequence_follows_weights_and_interleaves() {
        let check = |weights: &[u16], want: &[usize]| {
            let seq = weighted_sequence(weights);
            assert_eq!(shares(&seq, weights.len()), want, "{weights:?}: {seq:?}");
        };
        check(&[1, 1, 1], &[1, 1, 1]);
        check(&[2, 4, 6], &[1, 2, 3]);
        check(&[5, 1, 1], &[5, 1, 1]);
        // Smooth: the heavy backend never takes more than its share in a row.
        assert_eq!(weighted_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        // Huge weight sums are scaled to fit, keeping every backend.
        let seq = weighted_sequence(&[65535, 1]);
        assert!(seq.len() <= MAX_SEQUENCE as usize + 1 && seq.contains(&1));
    }

    #[test]
    fn maglev_tables_are_balanced_weighted_and_stable() {
        let names: Vec<(String, u16)> = (0..5)
            .map(|i| (format!("198.18.0.{}:80", i + 2), 1))
            .collect();
        let m = maglev_size(names.len());
        assert_eq!(m, 509);
        let table = maglev_table(&names, m);
        for (i, c) in shares(&table, 5).iter().enumerate() {
            assert!((101..=102).contains(c), "backend {i} has {c} of {m}");
        }
        // Removing one backend moves only the entries that were its own (plus a few).
        let fewer = maglev_table(&names[1..], m);
        let moved = table
            .iter()
            .zip(&fewer)
            .filter(|(a, b)| **a != 0 && **a != **b + 1)
            .count();
        assert!(moved < (m as usize) / 20, "{moved} of {m} entries moved");
        // Weights 1:3.
        let weighted = vec![("a:1".to_owned(), 1), ("b:1".to_owned(), 3)];
        let s = shares(&maglev_table(&weighted, 251), 2);
        assert!((60..=66).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn selection_tables_skip_weight_zero() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 80);
        assert_eq!(
            selection_table(Scheduler::Hash, &[(7, a, 1), (9, b, 0)]),
            vec![7]
        );
        assert_eq!(
            selection_table(Scheduler::Lc, &[(7, a, 5), (9, b, 1)]),
            vec![7, 9]
        );
        assert!(selection_table(Scheduler::Rr, &[(7, a, 0)]).is_empty());
    }

    #[test]
    fn allocates_past_the_highest_then_the_lowest_gap() {
        assert_eq!(allocate(&BTreeSet::new(), 10), Some(0));
        assert_eq!(allocate(&[0, 1, 3].into(), 10), Some(4));
        assert_eq!(allocate(&[0, 1, 3, 9].into(), 10), Some(2));
        assert_eq!(allocate(&[1, 9].into(), 10), Some(0));
        assert_eq!(allocate(&(0..4).collect(), 4), None);
    }

    #[test]
    fn restore_reads_ipvsadm_save_output() {
        let text = "\
-A -t 198.19.0.10:80 -s wrr -p 300
-a -t 198.19.0.10:80 -r 198.18.0.2:8080 -m -w 1
-a -t 198.19.0.10:80 -r 198.18.0.3:8080 -m -w 2
-A -u 198.19.0.11:53 -s mh
-a -u 198.19.0.11:53 -r 198.18.0.4:53 -m -w 1
";
        let (clear, specs) = parse_restore(text).unwrap();
        assert!(!clear);
        assert_eq!(specs.len(), 2);
        let (_, web) = &specs[0];
        assert_eq!(web.vaddr.to_string(), "198.19.0.10:80/tcp");
        assert_eq!(
            (web.scheduler, web.affinity_secs, web.backends.len()),
            (Scheduler::Rr, 300, 2)
        );
        assert_eq!(web.backends[1].weight, 2);
        assert_eq!(specs[1].1.scheduler, Scheduler::Maglev);

        let err = |text: &str, why: &str| {
            let e = parse_restore(text).unwrap_err();
            let msg = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(msg.contains(why), "{text:?}: {msg}");
        };
        err("-a -t 198.19.0.10:80 -r 198.18.0.2:80\n", "no service");
        err("-A -t 198.19.0.10:80\n-A -t 198.19.0.10:80\n", "line 2");
        err(
            "-A -t 198.19.0.10:80\n-a -t 198.19.0.10:80 -r 198.18.0.2:80 -g\n",
            "masquerading",
        );
        err("-X\n", "expected -A");
    }
}
