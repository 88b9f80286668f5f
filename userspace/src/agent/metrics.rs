//! /metrics: the node's counters in Prometheus' (`OpenMetrics`) text format.
//!
//! The datapath's counters are read from the maps at scrape time (a collector over one
//! snapshot taken under the node's mutex); the agent's own (reconciles) live in the process.
//! Names and labels:
//! - `bulkhead_service_{packets,bytes,new_flows}_total{service}`, `bulkhead_service_active_flows`
//! - `bulkhead_backend_{packets,bytes,new_flows}_total{service,backend}`,
//!   `bulkhead_backend_active_flows{service,backend}`
//! - `bulkhead_conntrack_{entries,capacity}{table}`,
//!   `bulkhead_conntrack_{inserts,insert_failures,evictions}_total{table}`
//! - `bulkhead_datapath_packets_total{reason}` (verdict reasons; `bulkhead_drops_total{reason}`
//!   for the ones that drop)
//! - `bulkhead_reconciles_total`, `bulkhead_reconcile_errors_total`,
//!   `bulkhead_reconcile_duration_seconds` (histogram)
//! - `bulkhead_map_fill_ratio{map}`, `bulkhead_services`, `bulkhead_build_info{version}`

use std::time::Duration;

use dataplane_common::{MAX_BACKENDS, MAX_ENDPOINTS, MAX_SERVICES, Reason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{Node, Shared};
use crate::services::{ConntrackStats, ServiceInfo};

/// The agent's reconcile counters.
#[derive(Clone, Debug)]
pub struct Reconciles {
    total: Counter,
    errors: Counter,
    duration: Histogram,
}

impl Default for Reconciles {
    fn default() -> Self {
        Reconciles {
            total: Counter::default(),
            errors: Counter::default(),
            // 100 µs to about 13 s.
            duration: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
        }
    }
}

impl Reconciles {
    pub fn observe(&self, took: Duration, ok: bool) {
        self.total.inc();
        if !ok {
            self.errors.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}

/// The datapath's state at one scrape.
#[derive(Debug)]
struct Snapshot {
    services: Vec<ServiceInfo>,
    conntrack: Vec<ConntrackStats>,
    reasons: Vec<(&'static str, u64)>,
    endpoints: usize,
}

/// The whole /metrics page.
pub fn render(node: &mut Node, shared: &Shared) -> String {
    let snapshot = Snapshot {
        services: node.table.list(),
        conntrack: node.table.conntrack_stats(),
        reasons: crate::node::stats(&node.paths)
            .map(|s| s.reasons)
            .unwrap_or_default(),
        endpoints: crate::node::endpoints(&node.paths).map_or(0, |e| e.len()),
    };
    let mut registry = Registry::default();
    let r = &shared.metrics;
    registry.register(
        "bulkhead_reconciles",
        "Reconciles of the maps with the desired state (apply, reload, periodic)",
        r.total.clone(),
    );
    registry.register(
        "bulkhead_reconcile_errors",
        "Reconciles that failed",
        r.errors.clone(),
    );
    registry.register(
        "bulkhead_reconcile_duration_seconds",
        "How long reconciles took",
        r.duration.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let names: Vec<String> = self
            .services
            .iter()
            .map(|s| s.service.to_string())
            .collect();
        let per_service = |f: fn(&ServiceInfo) -> u64| {
            self.services
                .iter()
                .zip(&names)
                .map(move |(s, n)| (vec![("service", n.as_str())], ConstCounter::new(f(s))))
        };
        family(
            &mut e,
            "bulkhead_service_packets",
            "Packets to and from the service",
            MetricType::Counter,
            per_service(|s| s.packets),
        )?;
        family(
            &mut e,
            "bulkhead_service_bytes",
            "Bytes to and from the service",
            MetricType::Counter,
            per_service(|s| s.bytes),
        )?;
        family(
            &mut e,
            "bulkhead_service_new_flows",
            "Flows the service's scheduler placed",
            MetricType::Counter,
            per_service(|s| s.new_flows),
        )?;
        family(
            &mut e,
            "bulkhead_service_active_flows",
            "Tracked flows to the service's backends",
            MetricType::Gauge,
            self.services.iter().zip(&names).map(|(s, n)| {
                (
                    vec![("service", n.as_str())],
                    ConstGauge::new(s.backends.iter().map(|b| b.connections as i64).sum::<i64>()),
                )
            }),
        )?;
        let backends: Vec<(&str, String, &crate::services::BackendInfo)> = self
            .services
            .iter()
            .zip(&names)
            .flat_map(|(s, n)| {
                s.backends
                    .iter()
                    .map(move |b| (n.as_str(), b.addr.to_string(), b))
            })
            .collect();
        let per_backend = |f: fn(&crate::services::BackendInfo) -> u64| {
            backends.iter().map(move |(s, b, info)| {
                (
                    vec![("service", *s), ("backend", b.as_str())],
                    ConstCounter::new(f(info)),
                )
            })
        };
        family(
            &mut e,
            "bulkhead_backend_packets",
            "Packets to and from the backend",
            MetricType::Counter,
            per_backend(|b| b.packets),
        )?;
        family(
            &mut e,
            "bulkhead_backend_bytes",
            "Bytes to and from the backend",
            MetricType::Counter,
            per_backend(|b| b.bytes),
        )?;
        family(
            &mut e,
            "bulkhead_backend_new_flows",
            "Flows placed on the backend",
            MetricType::Counter,
            per_backend(|b| b.new_flows),
        )?;
        family(
            &mut e,
            "bulkhead_backend_active_flows",
            "Tracked flows to the backend",
            MetricType::Gauge,
            backends.iter().map(|(s, b, info)| {
                (
                    vec![("service", *s), ("backend", b.as_str())],
                    ConstGauge::new(info.connections as i64),
                )
            }),
        )?;
        let per_table = |f: fn(&ConntrackStats) -> u64| {
            self.conntrack
                .iter()
                .map(move |c| (vec![("table", c.table)], f(c)))
        };
        family(
            &mut e,
            "bulkhead_conntrack_entries",
            "Entries in the conntrack table",
            MetricType::Gauge,
            per_table(|c| c.entries).map(|(l, v)| (l, ConstGauge::new(v as i64))),
        )?;
        family(
            &mut e,
            "bulkhead_conntrack_capacity",
            "Capacity of the conntrack table",
            MetricType::Gauge,
            per_table(|c| c.capacity).map(|(l, v)| (l, ConstGauge::new(v as i64))),
        )?;
        family(
            &mut e,
            "bulkhead_conntrack_inserts",
            "Flows inserted into the conntrack table",
            MetricType::Counter,
            per_table(|c| c.inserts).map(|(l, v)| (l, ConstCounter::new(v))),
        )?;
        family(
            &mut e,
            "bulkhead_conntrack_insert_failures",
            "Inserts the conntrack table refused",
            MetricType::Counter,
            per_table(|c| c.insert_failures).map(|(l, v)| (l, ConstCounter::new(v))),
        )?;
        family(
            &mut e,
            "bulkhead_conntrack_evictions",
            "Live flows the LRU table evicted",
            MetricType::Counter,
            per_table(|c| c.evictions).map(|(l, v)| (l, ConstCounter::new(v))),
        )?;
        family(
            &mut e,
            "bulkhead_datapath_packets",
            "Packets by the datapath's verdict reason",
            MetricType::Counter,
            self.reasons
                .iter()
                .map(|(r, n)| (vec![("reason", *r)], ConstCounter::new(*n))),
        )?;
        family(
            &mut e,
            "bulkhead_drops",
            "Packets the datapath dropped, by reason",
            MetricType::Counter,
            self.reasons
                .iter()
                .filter(|(r, _)| drops(r))
                .map(|(r, n)| (vec![("reason", *r)], ConstCounter::new(*n))),
        )?;
        let backend_count: usize = self.services.iter().map(|s| s.backends.len()).sum();
        let mut fill = vec![
            (
                "services",
                self.services.len() as f64 / f64::from(MAX_SERVICES),
            ),
            ("backends", backend_count as f64 / f64::from(MAX_BACKENDS)),
            (
                "endpoints",
                self.endpoints as f64 / f64::from(MAX_ENDPOINTS),
            ),
        ];
        let ct: Vec<(String, f64)> = self
            .conntrack
            .iter()
            .map(|c| {
                (
                    format!("conntrack_{}", c.table),
                    c.entries as f64 / c.capacity.max(1) as f64,
                )
            })
            .collect();
        fill.extend(ct.iter().map(|(n, v)| (n.as_str(), *v)));
        family(
            &mut e,
            "bulkhead_map_fill_ratio",
            "How full each of the datapath's maps is (entries / capacity)",
            MetricType::Gauge,
            fill.into_iter()
                .map(|(m, v)| (vec![("map", m)], ConstGauge::new(v))),
        )?;
        family(
            &mut e,
            "bulkhead_services",
            "Services installed",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(self.services.len() as i64))],
        )?;
        family(
            &mut e,
            "bulkhead_build_info",
            "The running build",
            MetricType::Gauge,
            [(
                vec![("version", env!("CARGO_PKG_VERSION"))],
                ConstGauge::new(1),
            )],
        )?;
        Ok(())
    }
}

/// Whether packets counted under this reason were dropped (the rest pass unchanged).
fn drops(reason: &str) -> bool {
    [
        Reason::NoBackend,
        Reason::StaleBackend,
        Reason::RewriteFailed,
        Reason::NoMasqueradePort,
    ]
    .iter()
    .any(|r| r.name() == reason)
}
