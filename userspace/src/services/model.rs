//! What a user names: protocols, virtual addresses, backends, schedulers, service specs, and
//! the typed rows `service list` shows. Parsing and display live here; the conversions to and
//! from map keys too, since this is where byte order is decided.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use dataplane_common::{Backend, ServiceKey, backend_state, proto, scheduler};

use super::{Result, ServiceTableError, parse_err};

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Proto::Tcp),
            proto::UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// ipvsadm's flag for this protocol.
    pub(crate) fn ipvsadm_flag(self) -> &'static str {
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
    pub(crate) fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    pub(crate) fn from_key(key: &ServiceKey) -> Option<Self> {
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
    Wrr,
    Lc,
    Wlc,
    Sh,
    Dh,
    Sed,
    Nq,
    Fo,
    Ovf,
    Mh,
    Twos,
}

impl Scheduler {
    const ALL: [Scheduler; 15] = [
        Scheduler::Hash,
        Scheduler::Random,
        Scheduler::Maglev,
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Sh,
        Scheduler::Dh,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Fo,
        Scheduler::Ovf,
        Scheduler::Mh,
        Scheduler::Twos,
    ];

    /// Whether the datapath scans this scheduler's table (each active backend once) on every
    /// new flow, so the table holds at most [`MAX_LC_BACKENDS`](super::MAX_LC_BACKENDS).
    pub fn scans(self) -> bool {
        scheduler::scans(self.code())
    }

    /// Whether the datapath keeps a round-robin cursor for the service (`rr`, `wrr`).
    pub fn uses_cursor(self) -> bool {
        matches!(self, Scheduler::Rr | Scheduler::Wrr)
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Hash => "hash",
            Scheduler::Random => "random",
            Scheduler::Maglev => "maglev",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
            Scheduler::Fo => "fo",
            Scheduler::Ovf => "ovf",
            Scheduler::Mh => "mh",
            Scheduler::Twos => "twos",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Scheduler::Hash => scheduler::HASH,
            Scheduler::Random => scheduler::RANDOM,
            Scheduler::Maglev => scheduler::MAGLEV,
            Scheduler::Rr => scheduler::RR,
            Scheduler::Wrr => scheduler::WRR,
            Scheduler::Lc => scheduler::LC,
            Scheduler::Wlc => scheduler::WLC,
            Scheduler::Sh => scheduler::SH,
            Scheduler::Dh => scheduler::DH,
            Scheduler::Sed => scheduler::SED,
            Scheduler::Nq => scheduler::NQ,
            Scheduler::Fo => scheduler::FO,
            Scheduler::Ovf => scheduler::OVF,
            Scheduler::Mh => scheduler::MH,
            Scheduler::Twos => scheduler::TWOS,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .unwrap_or_default()
    }
}

impl FromStr for Scheduler {
    type Err = ServiceTableError;

    fn from_str(input: &str) -> Result<Self> {
        const EXPECTED: &str = "expected hash, random, maglev, rr, wrr, lc, wlc, sh, dh, sed, \
                                nq, fo, ovf, mh or twos";
        Self::ALL
            .into_iter()
            .find(|k| k.name() == input)
            .ok_or_else(|| match input {
                "lblc" | "lblcr" => parse_err(
                    "scheduler",
                    input,
                    format!("IPVS's {input} scheduler is not supported yet; {EXPECTED}"),
                ),
                _ => parse_err("scheduler", input, EXPECTED),
            })
    }
}

/// ipvsadm's scheduler flags (`-b`): flag-1, flag-2 and flag-3 as bits 1, 2 and 4. `sh` and
/// `mh` name them: `*-fallback` (flag-1) and `*-port` (flag-2: the client's port is hashed
/// too). Bulkhead's tables never hold an unavailable backend, so a client whose backend went
/// is always moved to another: fallback is in effect with or without flag-1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedFlags(pub u8);

impl SchedFlags {
    /// The names of the flags for `scheduler`, as ipvsadm parses them.
    fn names(scheduler: Scheduler) -> [&'static str; 3] {
        match scheduler {
            Scheduler::Sh => ["sh-fallback", "sh-port", ""],
            Scheduler::Mh => ["mh-fallback", "mh-port", ""],
            _ => ["flag-1", "flag-2", "flag-3"],
        }
    }

    /// `sh-port,sh-fallback` and the like for `scheduler`, with ipvsadm's refusals.
    pub fn parse(text: &str, scheduler: Scheduler) -> Result<Self> {
        let mut bits = 0;
        for name in text.split(',').filter(|n| !n.is_empty()) {
            let bit = match name {
                "flag-1" => 1,
                "flag-2" => 2,
                "flag-3" => 4,
                "sh-fallback" | "mh-fallback" | "sh-port" | "mh-port" => {
                    if !Self::names(scheduler).contains(&name) {
                        return Err(parse_err(
                            "scheduler flag",
                            name,
                            format!("incompatible with scheduler {}", scheduler.name()),
                        ));
                    }
                    if name.ends_with("-port") { 2 } else { 1 }
                }
                _ => {
                    return Err(parse_err(
                        "scheduler flag",
                        name,
                        "expected flag-1, flag-2, flag-3, sh-fallback, sh-port, mh-fallback or mh-port",
                    ));
                }
            };
            bits |= bit;
        }
        Ok(SchedFlags(bits))
    }

    /// The flags by name for `scheduler`, comma-separated, as ipvsadm prints them (a flag
    /// `sh` and `mh` have no name for, flag-3, prints as nothing).
    pub fn display(self, scheduler: Scheduler) -> String {
        self.named(scheduler, "")
    }

    /// As [`display`](Self::display), but flag-3 keeps its generic name with `sh` and `mh`,
    /// so the text reads back to the same flags (Bulkhead's save, YAML and API).
    pub fn canonical(self, scheduler: Scheduler) -> String {
        self.named(scheduler, "flag-3")
    }

    fn named(self, scheduler: Scheduler, unnamed: &'static str) -> String {
        let names = Self::names(scheduler);
        [1, 2, 4]
            .iter()
            .zip(names)
            .filter(|(bit, _)| self.0 & **bit != 0)
            .map(|(_, name)| if name.is_empty() { unnamed } else { name })
            .filter(|name| !name.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits as the datapath's service entry holds them.
    pub(crate) fn service_bits(self) -> u8 {
        (self.0 << 1) & dataplane_common::service_flags::SCHED_MASK
    }

    pub(crate) fn from_service_bits(flags: u8) -> Self {
        SchedFlags((flags & dataplane_common::service_flags::SCHED_MASK) >> 1)
    }
}

/// Everything needed to create a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vaddr: VirtualAddr,
    pub scheduler: Scheduler,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_secs: u32,
    /// Affinity by client network (ipvsadm's `-M`): clients whose addresses agree under this
    /// mask share a backend. 255.255.255.255, the default, keys affinity by the whole address.
    pub affinity_netmask: Ipv4Addr,
    /// ipvsadm's `-b`.
    pub sched_flags: SchedFlags,
    /// Also answer on this port of every node address (Kubernetes `NodePort`).
    pub nodeport: Option<u16>,
    pub backends: Vec<BackendSpec>,
}

/// The datapath's form of an affinity netmask: network order, zero for the whole address.
pub(crate) fn affinity_mask(netmask: Ipv4Addr) -> u32 {
    if netmask == Ipv4Addr::BROADCAST {
        0
    } else {
        u32::from(netmask).to_be()
    }
}

/// The netmask an affinity mask as the datapath holds it stands for.
pub(crate) fn affinity_netmask(mask: u32) -> Ipv4Addr {
    if mask == 0 {
        Ipv4Addr::BROADCAST
    } else {
        Ipv4Addr::from(u32::from_be(mask))
    }
}

/// Whether a netmask is the default, the whole address.
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
pub(crate) fn is_host_mask(m: &Ipv4Addr) -> bool {
    *m == Ipv4Addr::BROADCAST
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
    /// Both directions.
    pub packets: u64,
    pub bytes: u64,
    /// The reply direction alone (backend to client).
    pub out_packets: u64,
    pub out_bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServiceInfo {
    pub service: VirtualAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodeport: Option<u16>,
    pub scheduler: Scheduler,
    pub affinity_secs: u32,
    #[serde(skip_serializing_if = "is_host_mask")]
    pub affinity_netmask: Ipv4Addr,
    /// ipvsadm's `-b`, by name (absent when none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sched_flags: String,
    /// Both directions.
    pub packets: u64,
    pub bytes: u64,
    /// The reply direction alone (backend to client).
    pub out_packets: u64,
    pub out_bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendInfo>,
}

/// A backend's address as the maps hold it.
pub(crate) fn backend_addr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.addr)), u16::from_be(b.port))
}

/// The map value of a new, active backend of service `service_id`.
pub(crate) fn new_backend(spec: &BackendSpec, service_id: u32) -> Backend {
    Backend {
        addr: u32::from(*spec.addr.ip()).to_be(),
        port: spec.addr.port().to_be(),
        weight: spec.weight,
        service_id,
        state: backend_state::ACTIVE,
        _pad: [0; 3],
    }
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
    fn scheduler_flags_read_and_print_as_ipvsadm_names_them() {
        let f = SchedFlags::parse("sh-port,sh-fallback", Scheduler::Sh).unwrap();
        assert_eq!(f, SchedFlags(3));
        assert_eq!(f.display(Scheduler::Sh), "sh-fallback,sh-port");
        assert_eq!(
            SchedFlags::parse("flag-2", Scheduler::Mh)
                .unwrap()
                .display(Scheduler::Mh),
            "mh-port"
        );
        // flag-3 has no name with sh: ipvsadm prints nothing, Bulkhead's own text keeps it.
        let f = SchedFlags::parse("flag-3", Scheduler::Sh).unwrap();
        assert_eq!(f.display(Scheduler::Sh), "");
        assert_eq!(f.canonical(Scheduler::Sh), "flag-3");
        assert_eq!(
            SchedFlags::parse(&f.canonical(Scheduler::Sh), Scheduler::Sh).unwrap(),
            f
        );
        assert!(SchedFlags::parse("sh-port", Scheduler::Rr).is_err());
        assert!(SchedFlags::parse("mh-port", Scheduler::Sh).is_err());
        assert!(SchedFlags::parse("port", Scheduler::Sh).is_err());
        assert_eq!(SchedFlags::from_service_bits(f.service_bits()), f);
    }

    #[test]
    fn ipvs_scheduler_names_are_their_own_schedulers_and_come_back_as_given() {
        for (name, want) in [
            ("hash", Scheduler::Hash),
            ("maglev", Scheduler::Maglev),
            ("mh", Scheduler::Mh),
            ("rr", Scheduler::Rr),
            ("wrr", Scheduler::Wrr),
            ("lc", Scheduler::Lc),
            ("wlc", Scheduler::Wlc),
        ] {
            let got = name.parse::<Scheduler>().unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(got.name(), name);
            assert_eq!(Scheduler::from_code(got.code()), got);
        }
        assert!("lblc".parse::<Scheduler>().is_err());
    }
}
