//! The node: the bridge the datapath guards, and the record of what `bulkhead up` made.
//!
//! `up` creates the bridge (unless it exists), loads and pins the datapath, and attaches it to
//! the bridge and to each of its ports; `down` undoes exactly what was recorded. The record is a
//! JSON file in the state directory, so separate `bulkhead` invocations cooperate.

use std::{fs, io, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    bpffs::{self, BpffsError},
    link::{Ip, LinkError},
    loader::{self, Datapath, LoaderError, LogLevel, TcMode},
    lock::{LockError, Mode, NodeLock},
    netns::Identity,
    subnet::Subnet,
};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/bulkhead";
const RECORD: &str = "node.json";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the node is not up (no {path}); run `bulkhead up` first")]
    NotUp { path: PathBuf },
    #[error("cannot {action} the node record {path}")]
    Record {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} {ifname}")]
    Link {
        action: &'static str,
        ifname: String,
        #[source]
        source: LinkError,
    },
    #[error("interface {ifname} does not exist")]
    NoInterface { ifname: String },
    #[error("uplink {ifname} has no IPv4 address to masquerade with")]
    NoAddress { ifname: String },
    #[error("cannot set {path}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the bpffs pin directory")]
    Bpffs(#[from] BpffsError),
    #[error("cannot read this process's network namespace")]
    Netns(#[from] crate::netns::NetnsError),
    #[error(
        "the node record {path} belongs to network namespace {owner}, not to this one ({here}); \
         use that namespace (`bulkhead --netns`), or other --state-dir and --bpffs directories"
    )]
    OtherNamespace {
        path: PathBuf,
        owner: Identity,
        here: Identity,
    },
    #[error(
        "the node record {path} belongs to network namespace {owner}, which no longer exists; \
         `bulkhead up` here starts afresh, `bulkhead down` removes what is left"
    )]
    StaleNamespace { path: PathBuf, owner: Identity },
    #[error("cannot {action}")]
    Datapath {
        action: String,
        #[source]
        source: LoaderError,
    },
    #[error(
        "{ifname} is a {kind} device, not a veth: only a veth's peer can be handed packets directly"
    )]
    NotVeth { ifname: String, kind: String },
}

/// Names the datapath step that failed.
fn step(action: impl Into<String>) -> impl FnOnce(LoaderError) -> NodeError {
    let action = action.into();
    move |source| NodeError::Datapath { action, source }
}

/// Where a node keeps its pins and its record, and which network namespace it is.
#[derive(Clone, Debug)]
pub struct Paths {
    /// Pin directory on a bpffs.
    pub bpffs: PathBuf,
    /// Directory for the node record, its lock, leases and sandbox state.
    pub state_dir: PathBuf,
    /// The network namespace the node lives in (the one this process is in).
    pub netns: Identity,
}

impl Paths {
    /// The node of the network namespace this process is in, with the directories given, or
    /// the defaults: `/sys/fs/bpf/bulkhead` and `/run/bulkhead`, with `netns/NAME` beneath
    /// each for a namespace chosen with `--netns` (`entered`) or entered by `ip netns exec`
    /// (it has a name under /run/netns), so two nodes on one machine never share pins or
    /// records. NAME is the `ip netns` name, or `inode-N` for a namespace given by path only.
    pub fn resolve(
        bpffs: Option<PathBuf>,
        state_dir: Option<PathBuf>,
        entered: bool,
    ) -> Result<Self, NodeError> {
        let netns = Identity::current()?;
        let per_namespace = |base: &str| {
            let base = PathBuf::from(base);
            if entered || netns.name.is_some() {
                base.join("netns").join(netns.dir_name())
            } else {
                base
            }
        };
        Ok(Paths {
            bpffs: bpffs.unwrap_or_else(|| per_namespace(crate::bpffs::DEFAULT_DIR)),
            state_dir: state_dir.unwrap_or_else(|| per_namespace(DEFAULT_STATE_DIR)),
            netns,
        })
    }

    fn record(&self) -> PathBuf {
        self.state_dir.join(RECORD)
    }

    /// Takes this node's lock (see [`crate::lock`]).
    /// While an agent runs it holds the lock: code inside the agent inherits it, and other
    /// processes borrow the agent's hold over its API.
    pub fn lock(&self, mode: Mode, timeout: Option<Duration>) -> Result<NodeLock, LockError> {
        if crate::agent::in_agent() {
            return Ok(NodeLock::inherited());
        }
        let agent = crate::agent::client::find(self).map_err(LockError::agent)?;
        if let Some(agent) = agent {
            return agent.hold().map(NodeLock::lent).map_err(LockError::agent);
        }
        NodeLock::acquire(&self.state_dir, mode, timeout)
    }
}

/// What `up` made, so `down` removes exactly that.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub bridge: String,
    /// The pod subnet: the gateway address on the bridge and the prefix length.
    pub subnet: Option<Subnet>,
    /// True when `up` created the bridge (then `down` deletes it).
    pub created_bridge: bool,
    pub mode: TcMode,
    /// Interfaces the datapath is attached to, the bridge first.
    pub attached: Vec<String>,
    /// The interface towards the rest of the network: `NodePorts` and masquerade act there.
    #[serde(default)]
    pub uplink: Option<String>,
    /// Datapath event verbosity the programs were loaded with.
    #[serde(default)]
    pub datapath_log: LogLevel,
    /// Whether translated packets for registered pods skip the bridge and the stack.
    #[serde(default = "enabled")]
    pub bypass: bool,
    /// The network namespace the node lives in (absent in records of older builds).
    #[serde(default)]
    pub netns: Option<Identity>,
}

fn enabled() -> bool {
    true
}

impl NodeRecord {
    /// The node record, refused when it belongs to another network namespace.
    pub fn load(paths: &Paths) -> Result<Self, NodeError> {
        let record = Self::load_unchecked(paths)?;
        match &record.netns {
            Some(owner) if owner.inode != paths.netns.inode => {
                let path = paths.record();
                let owner = owner.clone();
                Err(if owner.exists() {
                    NodeError::OtherNamespace {
                        path,
                        owner,
                        here: paths.netns.clone(),
                    }
                } else {
                    NodeError::StaleNamespace { path, owner }
                })
            }
            _ => Ok(record),
        }
    }

    fn load_unchecked(paths: &Paths) -> Result<Self, NodeError> {
        let path = paths.record();
        let text = fs::read_to_string(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NodeError::NotUp { path: path.clone() },
            _ => NodeError::Record {
                action: "read",
                path: path.clone(),
                source,
            },
        })?;
        serde_json::from_str(&text).map_err(|e| NodeError::Record {
            action: "parse",
            path,
            source: e.into(),
        })
    }

    fn save(&self, paths: &Paths) -> Result<(), NodeError> {
        let path = paths.record();
        let err = |action, source| NodeError::Record {
            action,
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&paths.state_dir).map_err(|e| err("create the directory of", e))?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("a node record always serializes");
        fs::write(&tmp, text).map_err(|e| err("write", e))?;
        fs::rename(&tmp, &path).map_err(|e| err("replace", e))
    }
}

/// Brings the node up: bridge, bpffs, datapath loaded and attached to the bridge and its ports.
/// Running it again reloads the datapath in place (pinned maps and links are kept).
/// What `up` is asked for; `None` fields keep the previous `up`'s choice.
#[derive(Clone, Debug, Default)]
pub struct UpOptions<'a> {
    pub subnet: Option<Subnet>,
    pub uplink: Option<&'a str>,
    pub datapath_log: Option<LogLevel>,
    /// Conntrack timeouts to change; the others keep their values.
    pub timeouts: loader::ConntrackTimeouts,
    /// Stack bypass on or off (`None`: as before, on for a new node).
    pub bypass: Option<bool>,
}

/// What `up` did.
pub struct UpReport {
    pub record: NodeRecord,
    /// Maps migrated from an older layout, with the entries carried over.
    pub migrated: crate::migrate::Report,
}

pub fn up(paths: &Paths, bridge: &str, opts: &UpOptions<'_>) -> Result<UpReport, NodeError> {
    let (subnet, uplink) = (opts.subnet, opts.uplink);
    let ip = Ip::find().map_err(|source| NodeError::Link {
        action: "find iproute2 for",
        ifname: bridge.into(),
        source,
    })?;
    let previous = match NodeRecord::load(paths) {
        Ok(record) => Some(record),
        Err(NodeError::NotUp { .. }) => None,
        // What a node of a namespace that is gone left here is cleared, not inherited: its
        // maps hold another node's services.
        Err(NodeError::StaleNamespace { .. }) => {
            clear_stale(paths);
            None
        }
        Err(e) => return Err(e),
    };
    let created_bridge = match &previous {
        Some(p) if p.bridge == bridge => p.created_bridge,
        _ if Ip::exists(bridge) => false,
        _ => {
            let err = |source| NodeError::Link {
                action: "create bridge",
                ifname: bridge.into(),
                source,
            };
            ip.add_bridge(bridge).map_err(err)?;
            true
        }
    };
    if let Some(subnet) = subnet {
        ip.add_addr(bridge, &subnet.to_string())
            .map_err(|source| NodeError::Link {
                action: "address",
                ifname: bridge.into(),
                source,
            })?;
    }
    ip.set_up(bridge).map_err(|source| NodeError::Link {
        action: "bring up",
        ifname: bridge.into(),
        source,
    })?;
    // Routing between the bridge and the uplink, and DNAT to local backends, need forwarding
    // on. After DNAT a packet from a pod is routed back out of the bridge it came in on; the
    // kernel would answer that with ICMP redirects to the client, which must not happen.
    // A hairpinned packet (a backend reaching its own service) is routed with the VIP as its
    // source, which has no route back: reverse-path filtering must be off on the bridge (the
    // effective value is the larger of `all` and the device's).
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv4/conf/all/send_redirects", "0"),
        ("/proc/sys/net/ipv4/conf/default/send_redirects", "0"),
        ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
    ] {
        fs::write(path, value).map_err(|source| NodeError::Sysctl { path, source })?;
    }
    for knob in ["send_redirects", "rp_filter"] {
        let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{bridge}/{knob}"), "0");
    }

    bpffs::ensure_dir(&paths.bpffs)?;
    let datapath_log = opts
        .datapath_log
        .or(previous.as_ref().map(|p| p.datapath_log))
        .unwrap_or_default();
    let mut datapath =
        Datapath::load(&paths.bpffs, datapath_log).map_err(step("load the datapath"))?;
    let mut record = NodeRecord {
        bridge: bridge.to_owned(),
        subnet: subnet.or(previous.as_ref().and_then(|p| p.subnet)),
        created_bridge,
        mode: datapath.mode(),
        uplink: uplink
            .map(str::to_owned)
            .or(previous.as_ref().and_then(|p| p.uplink.clone())),
        datapath_log,
        bypass: opts
            .bypass
            .or(previous.as_ref().map(|p| p.bypass))
            .unwrap_or(true),
        attached: previous.map(|p| p.attached).unwrap_or_default(),
        netns: Some(paths.netns.clone()),
    };
    let mut node_settings = settings(&ip, &record)?;
    node_settings.timeouts = opts.timeouts;
    node_settings.bypass = record.bypass;
    loader::configure(&paths.bpffs, &node_settings).map_err(step("write the node settings"))?;
    let ports = ip.bridge_ports(bridge).map_err(|source| NodeError::Link {
        action: "list the ports of",
        ifname: bridge.into(),
        source,
    })?;
    for ifname in std::iter::once(bridge.to_owned())
        .chain(ports)
        .chain(record.uplink.clone())
    {
        datapath
            .attach(&ifname)
            .map_err(step(format!("attach the datapath to {ifname}")))?;
        if !record.attached.contains(&ifname) {
            record.attached.push(ifname);
        }
    }
    record.save(paths)?;
    Ok(UpReport {
        record,
        migrated: datapath.migrated().clone(),
    })
}

/// The datapath's view of the node: pod subnet, uplink and the node's own addresses.
fn settings(ip: &Ip, record: &NodeRecord) -> Result<loader::NodeSettings, NodeError> {
    let pod_subnet = record.subnet.map(|s| (s.network(), s.prefix));
    let uplink = match &record.uplink {
        None => None,
        Some(dev) => {
            let err = |source| NodeError::Link {
                action: "read the addresses of",
                ifname: dev.clone(),
                source,
            };
            let addr = ip.ipv4_addrs(Some(dev)).map_err(err)?.first().map(|a| a.0);
            let addr = addr.ok_or_else(|| NodeError::NoAddress {
                ifname: dev.clone(),
            })?;
            let index = nix::net::if_::if_nametoindex(dev.as_str()).map_err(|_| {
                NodeError::NoInterface {
                    ifname: dev.clone(),
                }
            })?;
            Some((index, addr))
        }
    };
    let node_addrs = ip
        .ipv4_addrs(None)
        .map_err(|source| NodeError::Link {
            action: "read the addresses of",
            ifname: "the node".into(),
            source,
        })?
        .into_iter()
        .map(|a| a.0)
        .collect();
    Ok(loader::NodeSettings {
        pod_subnet,
        uplink,
        node_addrs,
        timeouts: loader::ConntrackTimeouts::default(),
        bypass: record.bypass,
    })
}

/// Attaches the datapath to one more interface (a veth plugged into the bridge later).
pub fn attach(paths: &Paths, ifname: &str) -> Result<(), NodeError> {
    attach_via(paths, ifname, None)
}

/// Attaches the datapath to `ifname` through `mode`, or the node's own mode, and lists it
/// in the node record.
fn attach_via(paths: &Paths, ifname: &str, mode: Option<TcMode>) -> Result<(), NodeError> {
    let mut record = NodeRecord::load(paths)?;
    if !Ip::exists(ifname) {
        return Err(NodeError::NoInterface {
            ifname: ifname.to_owned(),
        });
    }
    let mut datapath = Datapath::open(&paths.bpffs).map_err(step("open the pinned datapath"))?;
    let mode = mode.unwrap_or(datapath.mode());
    datapath
        .attach_as(ifname, mode)
        .map_err(step(format!("attach the datapath to {ifname}")))?;
    if !record.attached.iter().any(|a| a == ifname) {
        record.attached.push(ifname.to_owned());
    }
    record.save(paths)
}

/// Attaches the datapath to a pod's veth: through netlink `cls_bpf` (see
/// [`Datapath::attach_as`]); a later `up` moves it to TCX if the pod lives that long.
pub fn attach_pod(paths: &Paths, ifname: &str) -> Result<(), NodeError> {
    attach_via(paths, ifname, Some(TcMode::Netlink))
}

/// Forgets the datapath's attachment to an interface that is gone or going away with its
/// namespace, without waiting for the kernel to release it (see [`loader::forget_links`]);
/// `cls_bpf` filters go with the interface.
pub fn forget_attachment(paths: &Paths, ifname: &str) -> Result<(), NodeError> {
    let mut record = NodeRecord::load(paths)?;
    loader::forget_links(&paths.bpffs, ifname);
    record.attached.retain(|a| a != ifname);
    record.save(paths)
}

/// Detaches the datapath from one interface.
pub fn detach(paths: &Paths, ifname: &str) -> Result<(), NodeError> {
    let mut record = NodeRecord::load(paths)?;
    loader::detach(&paths.bpffs, ifname, record.mode)
        .map_err(step(format!("detach the datapath from {ifname}")))?;
    record.attached.retain(|a| a != ifname);
    record.save(paths)
}

/// Refuses a node record that belongs to another network namespace; a node that is not up
/// is left to the command to report.
pub fn check_owner(paths: &Paths) -> Result<(), NodeError> {
    match NodeRecord::load(paths) {
        Ok(_) | Err(NodeError::NotUp { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the pins and record a node of a namespace that no longer exists left behind (its
/// interfaces, and so its attachments and bridge, went with the namespace).
fn clear_stale(paths: &Paths) {
    if let Ok(record) = NodeRecord::load_unchecked(paths) {
        for ifname in &record.attached {
            let _ = loader::detach(&paths.bpffs, ifname, record.mode);
        }
    }
    loader::unpin_all(&paths.bpffs);
    let _ = fs::remove_file(paths.record());
}

/// Removes everything `up` made: attachments, pins, the bridge if it created it, the record.
pub fn down(paths: &Paths) -> Result<NodeRecord, NodeError> {
    let record = match NodeRecord::load(paths) {
        Err(NodeError::StaleNamespace { .. }) => {
            let record = NodeRecord::load_unchecked(paths)?;
            clear_stale(paths);
            return Ok(record);
        }
        other => other?,
    };
    for ifname in &record.attached {
        loader::detach(&paths.bpffs, ifname, record.mode)
            .map_err(step(format!("detach the datapath from {ifname}")))?;
    }
    loader::unpin_all(&paths.bpffs);
    if record.created_bridge && Ip::exists(&record.bridge) {
        let ip = Ip::find().map_err(|source| NodeError::Link {
            action: "find iproute2 for",
            ifname: record.bridge.clone(),
            source,
        })?;
        ip.delete(&record.bridge)
            .map_err(|source| NodeError::Link {
                action: "delete bridge",
                ifname: record.bridge.clone(),
                source,
            })?;
    }
    let path = paths.record();
    fs::remove_file(&path).map_err(|source| NodeError::Record {
        action: "remove",
        path,
        source,
    })?;
    Ok(record)
}

/// Registers a pod for the stack bypass: packets translated for `addr` go straight to the
/// peer of `ifname` (the host side of the pod's veth) with destination MAC `mac`, as if the
/// node's bridge had forwarded them.
pub fn endpoint_add(
    paths: &Paths,
    addr: std::net::Ipv4Addr,
    ifname: &str,
    mac: [u8; 6],
) -> Result<(), NodeError> {
    let record = NodeRecord::load(paths)?;
    let ip = Ip::find().map_err(|source| NodeError::Link {
        action: "find iproute2 for",
        ifname: ifname.into(),
        source,
    })?;
    if !Ip::exists(ifname) {
        return Err(NodeError::NoInterface {
            ifname: ifname.to_owned(),
        });
    }
    let (_, kind) = ip.link_info(ifname).map_err(|source| NodeError::Link {
        action: "inspect",
        ifname: ifname.into(),
        source,
    })?;
    if kind != "veth" {
        return Err(NodeError::NotVeth {
            ifname: ifname.to_owned(),
            kind: if kind.is_empty() {
                "plain".into()
            } else {
                kind
            },
        });
    }
    register_endpoint(paths, &record, addr, ifname, mac)
}

/// Registers a pod whose host-side interface is known to be a veth (one `bulkhead run` made).
pub fn register_endpoint(
    paths: &Paths,
    record: &NodeRecord,
    addr: std::net::Ipv4Addr,
    ifname: &str,
    mac: [u8; 6],
) -> Result<(), NodeError> {
    let gateway_mac = crate::link::hw_addr(&record.bridge).map_err(|_| NodeError::NoInterface {
        ifname: record.bridge.clone(),
    })?;
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|_| NodeError::NoInterface {
        ifname: ifname.to_owned(),
    })?;
    let endpoint = dataplane_common::Endpoint {
        ifindex,
        mac,
        gateway_mac,
    };
    loader::Endpoints::open(&paths.bpffs)
        .map_err(step("open the endpoint map"))?
        .insert(addr, endpoint)
        .map_err(step(format!("register endpoint {addr}")))?;
    Ok(())
}

/// Forgets a pod registered with [`endpoint_add`]; false if it was not registered.
pub fn endpoint_del(paths: &Paths, addr: std::net::Ipv4Addr) -> Result<bool, NodeError> {
    NodeRecord::load(paths)?;
    loader::Endpoints::open(&paths.bpffs)
        .map_err(step("open the endpoint map"))?
        .remove(addr)
        .map_err(step(format!("remove endpoint {addr}")))
}

/// A registered pod as `bulkhead endpoint list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointInfo {
    pub addr: std::net::Ipv4Addr,
    /// The host side of its veth.
    pub dev: String,
    pub mac: String,
}

/// Every pod registered for the stack bypass.
pub fn endpoints(paths: &Paths) -> Result<Vec<EndpointInfo>, NodeError> {
    Ok(loader::Endpoints::open(&paths.bpffs)
        .map_err(step("open the endpoint map"))?
        .list()
        .into_iter()
        .map(|(addr, e)| EndpointInfo {
            addr,
            dev: crate::link::ifname(e.ifindex),
            mac: crate::link::format_mac(&e.mac),
        })
        .collect())
}

/// Packet and byte counters of one interface and hook, as `bulkhead stats` shows them.
#[derive(Clone, Debug, Serialize)]
pub struct IfaceStats {
    pub ifname: String,
    pub ifindex: u32,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The datapath's counters: per interface and hook, and per verdict reason.
#[derive(Clone, Debug)]
pub struct Stats {
    pub interfaces: Vec<IfaceStats>,
    /// In the order of [`dataplane_common::Reason`].
    pub reasons: Vec<(&'static str, u64)>,
}

impl Serialize for Stats {
    /// `{"interfaces": [...], "reasons": {"name": count, ...}}`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let reasons: std::collections::BTreeMap<&str, u64> = self.reasons.iter().copied().collect();
        let mut st = s.serialize_struct("Stats", 2)?;
        st.serialize_field("interfaces", &self.interfaces)?;
        st.serialize_field("reasons", &reasons)?;
        st.end()
    }
}

/// Reads the datapath's counters.
pub fn stats(paths: &Paths) -> Result<Stats, NodeError> {
    let interfaces = loader::iface_counters(&paths.bpffs)
        .map_err(step("read the interface counters"))?
        .into_iter()
        .map(|(k, c)| IfaceStats {
            ifname: crate::link::ifname(k.ifindex),
            ifindex: k.ifindex,
            direction: if k.direction == dataplane_common::direction::INGRESS {
                "ingress"
            } else {
                "egress"
            },
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let reasons = loader::reason_counters(&paths.bpffs)
        .map_err(step("read the verdict reasons"))?
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .collect();
    Ok(Stats {
        interfaces,
        reasons,
    })
}
