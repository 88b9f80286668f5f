//! The conntrack view: tracked flows as `conntrack list` shows them, and each table's size
//! and activity for `conntrack stats`. Reads only; removing flows is a [`Store`] write.
//!
//! [`Store`]: super::store::Store

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use dataplane_common::{CONNTRACK_SIZE, NodeConfig, ct_event, flow_dir, map, proto, tcp_state};

use super::{Proto, Result, ServiceTable, VirtualAddr, map_err};

impl ServiceTable {
    /// Size and activity of both conntrack tables.
    pub fn conntrack_stats(&self) -> Vec<ConntrackStats> {
        let maps = &self.store.maps;
        let now = monotonic_ns();
        let cfg = maps.config.get(&0, 0).unwrap_or_default();
        let event =
            |slot: u32| -> u64 { maps.ct_events.get(&slot, 0).map_or(0, |v| v.iter().sum()) };
        (0..2)
            .map(|t| {
                let (mut entries, mut live) = (0u64, 0u64);
                for (k, f) in maps.conntrack[t].iter().filter_map(Result::ok) {
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

    /// The conntrack timeouts in force, in seconds: (TCP established, TCP closing, UDP).
    pub fn timeouts(&self) -> (u32, u32, u32) {
        let cfg = self.store.maps.config.get(&0, 0).unwrap_or_default();
        (
            cfg.flow_timeout(proto::TCP, tcp_state::ESTABLISHED),
            cfg.flow_timeout(proto::TCP, tcp_state::CLOSING),
            cfg.flow_timeout(proto::UDP, 0),
        )
    }

    /// Changes the timeouts given (seconds, at least one); the others keep their values.
    pub fn set_timeouts(
        &mut self,
        tcp_established: Option<u32>,
        tcp_closing: Option<u32>,
        udp: Option<u32>,
    ) -> Result<()> {
        let config = &mut self.store.maps.config;
        let mut cfg = config
            .get(&0, 0)
            .map_err(map_err("read the node config", map::CONFIG))?;
        if cfg.tcp_established_timeout == 0 {
            cfg = NodeConfig::DEFAULT;
        }
        for (slot, secs) in [
            (&mut cfg.tcp_established_timeout, tcp_established),
            (&mut cfg.tcp_closing_timeout, tcp_closing),
            (&mut cfg.udp_timeout, udp),
        ] {
            if let Some(secs) = secs {
                *slot = secs.max(1);
            }
        }
        config
            .set(0, cfg, 0)
            .map_err(map_err("write the node config", map::CONFIG))
    }

    /// Live affinity entries (clients, or client networks, pinned to a backend) per service
    /// and backend: IPVS's persistence templates, which `ipvsadm -L --persistent-conn`
    /// counts as `PersistConn`.
    pub fn affinity_counts(&self) -> HashMap<(VirtualAddr, SocketAddrV4), u64> {
        let maps = &self.store.maps;
        let now = monotonic_ns();
        let mut by_id: HashMap<u32, u64> = HashMap::new();
        let secs: HashMap<u32, u64> = self
            .entries
            .values()
            .map(|e| (e.value.id, u64::from(e.value.affinity_secs)))
            .collect();
        for (k, a) in maps.affinity.iter().filter_map(Result::ok) {
            let Some(timeout) = secs.get(&k.service_id) else {
                continue;
            };
            if now.saturating_sub(a.last_seen_ns) / 1_000_000_000 <= *timeout {
                *by_id.entry(a.backend_id).or_default() += 1;
            }
        }
        let mut counts = HashMap::new();
        for (v, e) in &self.entries {
            for (id, b) in &e.backends {
                if let Some(n) = by_id.get(id) {
                    counts.insert((*v, super::model::backend_addr(b)), *n);
                }
            }
        }
        counts
    }

    /// Tracked flows, original direction, that have not expired.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let maps = &self.store.maps;
        let now = monotonic_ns();
        let cfg = maps.config.get(&0, 0).unwrap_or_default();
        let services: HashMap<u32, VirtualAddr> =
            self.entries.iter().map(|(v, e)| (e.value.id, *v)).collect();
        let mut flows: Vec<FlowInfo> = maps
            .conntrack
            .iter()
            .flat_map(|table| table.iter())
            .filter_map(Result::ok)
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
}

/// The timeout of a flow in `state`, as the datapath applies it.
fn flow_timeout(cfg: &dataplane_common::NodeConfig, proto: Proto, state: u8) -> u32 {
    cfg.flow_timeout(proto.number(), state)
}

fn flow_state_name(proto: Proto, state: u8) -> &'static str {
    match (proto, state) {
        (Proto::Udp, _) => "udp",
        (Proto::Tcp, tcp_state::SYN_SENT) => "syn-sent",
        (Proto::Tcp, tcp_state::ESTABLISHED) => "established",
        (Proto::Tcp, _) => "closing",
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
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
