//! Desired state: the YAML that `bulkhead apply`, `bulkhead diff` and `bulkhead agent --config`
//! read, the plan that turns the installed table into it, and its application.
//!
//! ```yaml
//! services:
//!   - address: 198.19.0.10:80/tcp
//!     scheduler: rr            # any scheduler the CLI takes (default hash)
//!     affinity: 300            # optional, seconds
//!     affinity_netmask: 255.255.255.0   # optional: affinity by client network (ipvsadm -M)
//!     sched_flags: sh-port     # optional: ipvsadm's -b, by name
//!     nodeport: 30080          # optional
//!     backends: ["198.18.0.2:8080", "198.18.0.3:8080@2"]
//! ```
//!
//! The file is the whole table: a service missing from it is deleted. It is checked in full
//! before anything is written (unknown fields, bad values and conflicts name the field and
//! line), and applied in an order that keeps established flows: services that stay are changed
//! in place with one generation flip each, a removed backend keeps its TCP flows (unless
//! forced), and new services come last.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
};

use dataplane_common::{MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

use super::{
    MAX_LC_BACKENDS, ServiceTable, ServiceTableError,
    model::{BackendSpec, SchedFlags, Scheduler, ServiceSpec, VirtualAddr, is_host_mask},
    store::Store,
    table::same_spec,
};

/// The file as written: every field named here, nothing else.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where `bulkhead agent` brings the node up if it is not (defaults as `bulkhead up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub bridge: Option<String>,
    pub subnet: Option<String>,
    pub uplink: Option<String>,
}

/// One service: `address`, then its options.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(deserialize_with = "parsed", serialize_with = "displayed")]
    pub address: VirtualAddr,
    #[serde(
        default,
        deserialize_with = "parsed",
        serialize_with = "displayed_scheduler"
    )]
    pub scheduler: Scheduler,
    /// Session affinity timeout in seconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub affinity: u32,
    /// Affinity by client network: clients equal under this mask share a backend.
    #[serde(default = "host_mask", skip_serializing_if = "is_host_mask")]
    pub affinity_netmask: Ipv4Addr,
    /// ipvsadm's scheduler flags (`-b`) by name, comma-separated: `sh-port,sh-fallback`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sched_flags: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodeport: Option<u16>,
    #[serde(
        default,
        deserialize_with = "parsed_list",
        serialize_with = "displayed_backends"
    )]
    pub backends: Vec<BackendSpec>,
}

fn host_mask() -> Ipv4Addr {
    Ipv4Addr::BROADCAST
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn parsed_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| t.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn displayed<S: serde::Serializer>(v: &VirtualAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn displayed_scheduler<S: serde::Serializer>(v: &Scheduler, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.name())
}

fn displayed_backends<S: serde::Serializer>(v: &[BackendSpec], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|b| match b.weight {
        1 => b.addr.to_string(),
        w => format!("{}@{w}", b.addr),
    }))
}

impl ServiceConfig {
    /// The spec this asks for. Its scheduler flags were checked when it was read
    /// ([`Config::parse`], the API's [`ServiceConfig::checked`]).
    pub fn spec(&self) -> ServiceSpec {
        ServiceSpec {
            vaddr: self.address,
            scheduler: self.scheduler,
            affinity_secs: self.affinity,
            affinity_netmask: self.affinity_netmask,
            sched_flags: SchedFlags::parse(&self.sched_flags, self.scheduler).unwrap_or_default(),
            nodeport: self.nodeport,
            backends: self.backends.clone(),
        }
    }

    /// What only the whole service can tell: its scheduler flags against its scheduler.
    pub fn checked(self) -> Result<Self, ServiceTableError> {
        SchedFlags::parse(&self.sched_flags, self.scheduler)?;
        Ok(self)
    }

    pub fn from_spec(spec: &ServiceSpec) -> Self {
        ServiceConfig {
            address: spec.vaddr,
            scheduler: spec.scheduler,
            affinity: spec.affinity_secs,
            affinity_netmask: spec.affinity_netmask,
            sched_flags: spec.sched_flags.canonical(spec.scheduler),
            nodeport: spec.nodeport,
            backends: spec.backends.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// serde's message names the field and the line.
    #[error("{0}")]
    Syntax(String),
    #[error("services[{index}] ({service}): {why}")]
    Invalid {
        index: usize,
        service: VirtualAddr,
        why: String,
    },
    #[error("the file asks for {count} {what}; the datapath holds at most {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("{service}: {source}")]
    Apply {
        service: VirtualAddr,
        #[source]
        source: ServiceTableError,
    },
}

impl Config {
    /// Parses and checks a whole file: every service valid on its own and with the others.
    pub fn parse(text: &str) -> Result<Self, DesiredError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_norway::from_str(text).map_err(|e| DesiredError::Syntax(e.to_string()))?
        };
        config.check()?;
        Ok(config)
    }

    pub fn read(path: &std::path::Path) -> Result<Self, DesiredError> {
        let text = std::fs::read_to_string(path).map_err(|source| DesiredError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.services.iter().map(ServiceConfig::spec).collect()
    }

    fn check(&self) -> Result<(), DesiredError> {
        let mut seen: HashMap<VirtualAddr, usize> = HashMap::new();
        let mut nodeports: HashMap<(u16, super::Proto), usize> = HashMap::new();
        let mut backends = 0usize;
        for (index, s) in self.services.iter().enumerate() {
            let bad = |why: String| DesiredError::Invalid {
                index,
                service: s.address,
                why,
            };
            if let Some(first) = seen.insert(s.address, index) {
                return Err(bad(format!("listed twice (first as services[{first}])")));
            }
            if let Err(e) = SchedFlags::parse(&s.sched_flags, s.scheduler) {
                return Err(bad(e.to_string()));
            }
            if let Some(port) = s.nodeport {
                if port == 0 {
                    return Err(bad("nodeport 0 is not a port".into()));
                }
                if let Some(first) = nodeports.insert((port, s.address.proto), index) {
                    return Err(bad(format!(
                        "nodeport {port} is already used by services[{first}]"
                    )));
                }
            }
            let mut addrs: Vec<_> = s.backends.iter().map(|b| b.addr).collect();
            addrs.sort_unstable();
            if let Some([twice, ..]) = addrs.windows(2).find(|w| w[0] == w[1]) {
                return Err(bad(format!("backend {twice} is listed twice")));
            }
            let max = if s.scheduler.scans() {
                MAX_LC_BACKENDS
            } else {
                dataplane_common::MAX_BACKENDS_PER_SERVICE as usize
            };
            if s.backends.len() > max {
                return Err(bad(format!(
                    "{} backends; {} takes at most {max}",
                    s.backends.len(),
                    s.scheduler.name()
                )));
            }
            backends += s.backends.len();
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err(DesiredError::TooMany {
                what: "services",
                count: self.services.len(),
                max: MAX_SERVICES,
            });
        }
        if backends > MAX_BACKENDS as usize {
            return Err(DesiredError::TooMany {
                what: "backends",
                count: backends,
                max: MAX_BACKENDS,
            });
        }
        Ok(())
    }
}

/// What turns the installed table into the desired one.
#[derive(Debug, Default)]
pub struct Plan {
    /// Services to create.
    pub add: Vec<ServiceSpec>,
    /// Services to change in place: (installed, desired).
    pub change: Vec<(ServiceSpec, ServiceSpec)>,
    /// Services to delete.
    pub delete: Vec<ServiceSpec>,
}

impl Plan {
    pub fn new(installed: &[ServiceSpec], desired: &[ServiceSpec]) -> Self {
        let mut have: BTreeMap<VirtualAddr, &ServiceSpec> =
            installed.iter().map(|s| (s.vaddr, s)).collect();
        let mut plan = Plan::default();
        for want in desired {
            match have.remove(&want.vaddr) {
                None => plan.add.push(want.clone()),
                Some(cur) if !same_spec(cur, want) => {
                    plan.change.push((cur.clone(), want.clone()));
                }
                Some(_) => {}
            }
        }
        plan.delete = have.into_values().cloned().collect();
        plan
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.delete.is_empty()
    }

    /// Counts of (added, changed, deleted) services.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.add.len(), self.change.len(), self.delete.len())
    }

    /// Applies the plan: deletions first (so their node ports are free), then changes in
    /// place, then new services. Stops at the first failure, naming the service.
    pub fn apply<S: Store>(
        &self,
        table: &mut ServiceTable<S>,
        force: bool,
    ) -> Result<(), DesiredError> {
        let wrap = |service: VirtualAddr| move |source| DesiredError::Apply { service, source };
        for s in &self.delete {
            table.delete(&s.vaddr).map_err(wrap(s.vaddr))?;
        }
        for (_, s) in &self.change {
            table.update(s, force).map_err(wrap(s.vaddr))?;
        }
        for s in &self.add {
            table.add(s).map_err(wrap(s.vaddr))?;
        }
        table.commit();
        Ok(())
    }
}

/// `{"add": [service...], "change": [{"from": service, "to": service}...], "delete": [...]}`,
/// services in the file's schema.
impl Serialize for Plan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        #[derive(Serialize)]
        struct Change {
            from: ServiceConfig,
            to: ServiceConfig,
        }
        let list = |v: &[ServiceSpec]| v.iter().map(ServiceConfig::from_spec).collect::<Vec<_>>();
        let mut st = s.serialize_struct("Plan", 3)?;
        st.serialize_field("add", &list(&self.add))?;
        st.serialize_field(
            "change",
            &self
                .change
                .iter()
                .map(|(a, b)| Change {
                    from: ServiceConfig::from_spec(a),
                    to: ServiceConfig::from_spec(b),
                })
                .collect::<Vec<_>>(),
        )?;
        st.serialize_field("delete", &list(&self.delete))?;
        st.end()
    }
}

/// `diff -u`-like lines: `+` for what is added, `-` for what goes, `~` for a changed service
/// with its changes beneath.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = |s: &ServiceSpec| {
            let mut h = format!("{} {}", s.vaddr, s.scheduler.name());
            if s.affinity_secs != 0 {
                h.push_str(&format!(" affinity {}s", s.affinity_secs));
            }
            if s.affinity_netmask != Ipv4Addr::BROADCAST {
                h.push_str(&format!(" netmask {}", s.affinity_netmask));
            }
            if !s.sched_flags.is_empty() {
                h.push_str(&format!(" flags {}", s.sched_flags.canonical(s.scheduler)));
            }
            if let Some(p) = s.nodeport {
                h.push_str(&format!(" nodeport {p}"));
            }
            h
        };
        for s in &self.delete {
            writeln!(f, "- service {}", head(s))?;
            for b in &s.backends {
                writeln!(f, "-   backend {}@{}", b.addr, b.weight)?;
            }
        }
        for (old, new) in &self.change {
            if head(old) == head(new) {
                writeln!(f, "~ service {}", head(new))?;
            } else {
                writeln!(f, "~ service {} -> {}", head(old), head(new))?;
            }
            for b in &old.backends {
                match new.backends.iter().find(|n| n.addr == b.addr) {
                    None => writeln!(f, "-   backend {}@{}", b.addr, b.weight)?,
                    Some(n) if n.weight != b.weight => writeln!(
                        f,
                        "~   backend {} weight {} -> {}",
                        b.addr, b.weight, n.weight
                    )?,
                    Some(_) => {}
                }
            }
            for n in &new.backends {
                if !old.backends.iter().any(|b| b.addr == n.addr) {
                    writeln!(f, "+   backend {}@{}", n.addr, n.weight)?;
                }
            }
        }
        for s in &self.add {
            writeln!(f, "+ service {}", head(s))?;
            for b in &s.backends {
                writeln!(f, "+   backend {}@{}", b.addr, b.weight)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::store::FakeStore;

    const FILE: &str = "services:
  - address: 198.19.0.10:80/tcp
    scheduler: rr
    affinity: 300
    affinity_netmask: 255.255.255.0
    backends: [\"198.18.0.2:8080\", \"198.18.0.3:8080@2\"]
  - address: 198.19.0.11:53/udp
    backends: [\"198.18.0.4:53\"]
  - address: 198.19.0.12:80/tcp
    scheduler: sh
    sched_flags: sh-port
";

    #[test]
    fn the_documented_shape_parses() {
        let c = Config::parse(FILE).unwrap();
        let specs = c.specs();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[2].sched_flags, SchedFlags(2));
        assert_eq!(specs[0].sched_flags, SchedFlags::default());
        let err = Config::parse(
            "services:\n  - address: 198.19.0.10:80\n    scheduler: rr\n    sched_flags: sh-port\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services[0]") && err.contains("sh-port"),
            "{err}"
        );
        assert_eq!(specs[0].scheduler, Scheduler::Rr);
        assert_eq!(specs[0].affinity_secs, 300);
        assert_eq!(specs[0].affinity_netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(specs[0].backends[1].weight, 2);
        assert_eq!(specs[1].scheduler, Scheduler::Hash);
        assert_eq!(specs[1].affinity_netmask, Ipv4Addr::BROADCAST);
        assert!(
            Config::parse(
                "services:\n  - address: 198.19.0.10:80\n    affinity_netmask: 255.255.255\n"
            )
            .unwrap_err()
            .to_string()
            .contains("line 3")
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_name_their_place() {
        let err = Config::parse("services:\n  - address: 198.19.0.10:80\n    weight: 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field `weight`") && err.contains("line 3"),
            "{err}"
        );
        let err = Config::parse("services:\n  - address: 198.19.0.10:80\n    scheduler: fast\n")
            .unwrap_err()
            .to_string();
        // A bad value is placed at its service's entry.
        assert!(
            err.contains("services[0]")
                && err.contains("scheduler \"fast\"")
                && err.contains("line 2"),
            "{err}"
        );
        let err = Config::parse(
            "services:\n  - address: 198.19.0.10:80\n  - address: 198.19.0.10:80/tcp\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services[1]") && err.contains("listed twice"),
            "{err}"
        );
    }

    #[test]
    fn a_plan_changes_in_place_and_an_applied_plan_leaves_nothing_to_do() {
        let mut table = ServiceTable::load(FakeStore::default()).unwrap();
        let first = Config::parse(FILE).unwrap().specs();
        let plan = Plan::new(&table.specs(), &first);
        assert_eq!(plan.counts(), (3, 0, 0));
        plan.apply(&mut table, false).unwrap();
        assert!(Plan::new(&table.specs(), &first).is_empty());
        let id = table.service_id(&first[0].vaddr).unwrap();

        let second = Config::parse(
            "services:
  - address: 198.19.0.10:80/tcp
    scheduler: maglev
    backends: [\"198.18.0.3:8080@5\", \"198.18.0.9:8080\"]
",
        )
        .unwrap()
        .specs();
        let plan = Plan::new(&table.specs(), &second);
        assert_eq!(plan.counts(), (0, 1, 2));
        let text = plan.to_string();
        assert!(text.contains("- service 198.19.0.11:53/udp"), "{text}");
        assert!(
            text.contains("~   backend 198.18.0.3:8080 weight 2 -> 5"),
            "{text}"
        );
        assert!(text.contains("-   backend 198.18.0.2:8080@1"), "{text}");
        assert!(text.contains("+   backend 198.18.0.9:8080@1"), "{text}");
        plan.apply(&mut table, false).unwrap();
        assert_eq!(
            table.service_id(&second[0].vaddr).unwrap(),
            id,
            "changed in place"
        );
        assert!(Plan::new(&table.specs(), &second).is_empty());
    }
}
