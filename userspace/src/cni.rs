//! `bulkhead-cni`: the CNI plugin (spec 1.0.0 and 1.1.0; 0.3.x and 0.4.0 results too) that puts
//! containers of podman, containerd, CRI-O or nomad on the node's datapath.
//!
//! One process per call: the verb in `CNI_COMMAND`, the network config on stdin, the result or
//! a CNI error (`{"code", "msg", "details"}`) on stdout. ADD goes through the same door as
//! `bulkhead run` (`sandbox::network`): a lease from the same store, the veth on the bridge with
//! the datapath attached and the pod registered for the stack bypass, `portMappings` as datapath
//! services. What ADD made is recorded under `cni/` in the node's state directory, so DEL
//! removes exactly that (and succeeds when there is nothing: containerd calls it twice), CHECK
//! verifies it, and GC removes what `cni.dev/valid-attachments` no longer names. Every call that
//! changes the node holds the node lock (or borrows the agent's hold), so parallel calls from
//! an engine are serialised.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    link,
    lock::Mode,
    node::{self, NodeRecord, Paths},
    sandbox::{
        SandboxError,
        network::{self, NodeDoor, PortHolder},
        spec::Publish,
    },
    subnet::Subnet,
};

/// How long a call waits for the node lock before asking the engine to try again.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_mins(1);

/// Versions whose configs and results this plugin reads and writes.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100 and up): a host port is taken.
    pub const PORT_IN_USE: u32 = 100;
    /// Plugin-specific: CHECK found the attachment differs from what ADD made.
    pub const CHECK_FAILED: u32 = 101;
}

/// A CNI error result.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.1.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// A failed step: the message names it, the details carry the error chain.
    fn step(code: u32, step: &str, e: &dyn std::error::Error) -> Self {
        Self::new(code, format!("{step} failed"), crate::error_chain(e))
    }
}

/// The network config on stdin: the fields the spec defines, and the plugin's own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The node's bridge (`bulkhead up --bridge`); created with the node if it is not up.
    #[serde(default)]
    pub bridge: Option<String>,
    /// Gateway and prefix of the pod subnet, e.g. 198.18.0.1/24 (as `up --subnet`).
    #[serde(default)]
    pub subnet: Option<String>,
    /// The node's uplink, for host ports and masquerade when ADD brings the node up.
    #[serde(default)]
    pub uplink: Option<String>,
    /// The node's stack bypass, when ADD brings the node up.
    #[serde(default)]
    pub bypass: Option<bool>,
    /// The node's state directory (default /run/bulkhead).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The node's pin directory (default /sys/fs/bpf/bulkhead).
    #[serde(default)]
    pub bpffs: Option<PathBuf>,
    /// A chained IPAM plugin (host-local, dhcp, ...) instead of the node's leases.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC's list of attachments still in use.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One `runtimeConfig.portMappings` entry. The conventions name its fields in camelCase, but
/// containerd 1.6 (go-cni) sends Go's field names (`HostPort`, `HostIP`): Go plugins read both
/// because Go's JSON decoder ignores case, so this one takes both spellings too.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(alias = "HostPort")]
    pub host_port: u16,
    #[serde(alias = "ContainerPort")]
    pub container_port: u16,
    #[serde(default = "tcp", alias = "Protocol")]
    pub protocol: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "hostIP",
        alias = "HostIP"
    )]
    pub host_ip: Option<String>,
}

fn tcp() -> String {
    "tcp".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What ADD made for one (container, interface), so DEL undoes exactly that.
#[derive(Debug, Deserialize, Serialize)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub host_if: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
    /// The address came from the node's leases (else from a chained IPAM plugin).
    pub leased: bool,
    pub ports: Vec<PortMapping>,
    /// The result ADD printed, for CHECK and chained plugins.
    pub result: Value,
}

/// The CNI_* variables.
#[derive(Debug, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    fn require(which: &[(&str, &String)]) -> Result<(), CniError> {
        for (name, value) in which {
            if value.is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not set"),
                    "",
                ));
            }
        }
        Ok(())
    }
}

/// Runs one call; returns what to print on stdout and whether it succeeded.
pub fn main_with(env: &Env, stdin: &mut dyn std::io::Read) -> (String, bool) {
    let mut text = String::new();
    let result = stdin
        .read_to_string(&mut text)
        .map_err(|e| CniError::step(code::IO, "read the config from stdin", &e))
        .and_then(|_| dispatch(env, &text));
    match result {
        Ok(v) => (v.map_or_else(String::new, |v| v.to_string()), true),
        Err(mut e) => {
            if let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(version) = v["cniVersion"].as_str()
                && SUPPORTED.contains(&version)
            {
                version.clone_into(&mut e.cni_version);
            }
            (serde_json::to_string(&e).expect("serialises"), false)
        }
    }
}

fn dispatch(env: &Env, text: &str) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        let asked = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(json!({
            "cniVersion": asked,
            "supportedVersions": SUPPORTED,
        })));
    }
    let conf: NetConf = serde_json::from_str(text).map_err(|e| {
        CniError::new(
            code::DECODE,
            "the network config is not valid",
            e.to_string(),
        )
    })?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED.join(", ")),
        ));
    }
    let paths = Paths::resolve(conf.bpffs.clone(), conf.state_dir.clone(), false)
        .map_err(|e| CniError::step(code::IO, "find the node", &e))?;
    let out = match env.command.as_str() {
        "ADD" => add(env, &conf, &paths).map(Some),
        "DEL" => del(env, &paths).map(|()| None),
        "CHECK" => check(env, &paths).map(|()| None),
        "STATUS" => status(&paths).map(|()| None),
        "GC" => gc(&conf, &paths).map(|()| None),
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }?;
    Ok(out.map(|mut v| {
        v["cniVersion"] = Value::String(conf.cni_version.clone());
        v
    }))
}

fn records_dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("cni")
}

/// The record's file: the container id and interface name, which the spec limits to
/// characters safe in a file name (a slash is refused before this).
fn record_path(paths: &Paths, id: &str, ifname: &str) -> PathBuf {
    records_dir(paths).join(format!("{id}_{ifname}.json"))
}

fn load_record(paths: &Paths, id: &str, ifname: &str) -> Option<Record> {
    let text = std::fs::read(record_path(paths, id, ifname)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn all_records(paths: &Paths) -> Vec<Record> {
    std::fs::read_dir(records_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

/// The container id and interface name are file-name safe, as the spec requires of them.
fn check_names(env: &Env) -> Result<(), CniError> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s != "."
            && s != ".."
    };
    if !ok(&env.container_id) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_CONTAINERID {:?} is not a valid container id",
                env.container_id
            ),
            "letters, digits, '-', '_' and '.'",
        ));
    }
    if !ok(&env.ifname) || env.ifname.len() > 15 {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {:?} is not a valid interface name", env.ifname),
            "at most 15 letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// The host side's name: `bc` and a hash of the container id and interface.
fn host_ifname(id: &str, ifname: &str) -> String {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("bc{:010x}", h & 0xff_ffff_ffff)
}

fn publishes(ports: &[PortMapping]) -> Result<Vec<Publish>, CniError> {
    ports
        .iter()
        .map(|p| {
            let udp = match p.protocol.to_ascii_lowercase().as_str() {
                "tcp" => false,
                "udp" => true,
                other => {
                    return Err(CniError::new(
                        code::UNSUPPORTED_FIELD,
                        format!("portMappings protocol {other:?} is not supported"),
                        "tcp or udp",
                    ));
                }
            };
            if p.host_ip
                .as_deref()
                .is_some_and(|ip| !ip.is_empty() && ip != "0.0.0.0")
            {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!("portMappings hostIP {:?} is not supported", p.host_ip),
                    "host ports answer on every node address",
                ));
            }
            if p.host_port == 0 || p.container_port == 0 {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "portMappings need a hostPort and a containerPort",
                    format!("{p:?}"),
                ));
            }
            Ok(Publish {
                host_port: p.host_port,
                port: p.container_port,
                udp,
            })
        })
        .collect()
}

/// Brings the node up from the config's settings if it is not.
fn ensure_node(conf: &NetConf, paths: &Paths) -> Result<NodeRecord, CniError> {
    if let Ok(record) = NodeRecord::load(paths) {
        return Ok(record);
    }
    let subnet: Subnet = conf
        .subnet
        .as_deref()
        .unwrap_or("198.18.0.1/24")
        .parse()
        .map_err(|e| CniError::step(code::INVALID_CONFIG, "read \"subnet\"", &e))?;
    let bridge = conf.bridge.clone().unwrap_or_else(|| "bulkhead0".into());
    node::up(
        paths,
        &bridge,
        &node::UpOptions {
            subnet: Some(subnet),
            uplink: conf.uplink.as_deref(),
            datapath_log: None,
            timeouts: crate::loader::ConntrackTimeouts::default(),
            bypass: conf.bypass,
        },
    )
    .map(|r| r.record)
    .map_err(|e| CniError::step(code::IO, "bring the node up", &e))
}

/// A chained IPAM plugin's verb: runs `CNI_PATH/<ipam.type>` with the same config.
fn ipam(env: &Env, conf_text: &Value, verb: &str) -> Result<Value, CniError> {
    let kind = conf_text["ipam"]["type"]
        .as_str()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "ipam needs a \"type\"", ""))?;
    let bin = env
        .path
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {kind} not found in CNI_PATH"),
                env.path.clone(),
            )
        })?;
    let mut child = std::process::Command::new(&bin)
        .env("CNI_COMMAND", verb)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CniError::step(code::IO, &format!("run IPAM plugin {kind}"), &e))?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("piped");
        let _ = stdin.write_all(conf_text.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::step(code::IO, &format!("run IPAM plugin {kind}"), &e))?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        return Err(CniError::new(
            v["code"].as_u64().map_or(code::IO, |c| c as u32),
            format!(
                "IPAM plugin {kind} failed: {}",
                v["msg"].as_str().unwrap_or("")
            ),
            v["details"].as_str().unwrap_or("").to_owned(),
        ));
    }
    Ok(v)
}

fn add(env: &Env, conf: &NetConf, paths: &Paths) -> Result<Value, CniError> {
    Env::require(&[
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
    ])?;
    check_names(env)?;
    let netns = PathBuf::from(&env.netns);
    if !netns.exists() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} does not exist", env.netns),
            "",
        ));
    }
    let ports = publishes(&conf.runtime_config.port_mappings)?;
    let _lock = paths
        .lock(Mode::Exclusive, Some(LOCK_WAIT))
        .map_err(|e| CniError::step(code::TRY_AGAIN, "take the node lock", &e))?;
    let record = ensure_node(conf, paths)?;
    if load_record(paths, &env.container_id, &env.ifname).is_some() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "container {} already has interface {} on this network",
                env.container_id, env.ifname
            ),
            "DEL it first",
        ));
    }
    let door = NodeDoor::open(paths).map_err(|e| CniError::step(code::IO, "open the node", &e))?;
    let subnet = record.subnet.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "the node has no pod subnet",
            "bulkhead up --subnet",
        )
    })?;
    // Host ports first: a taken one refuses the attachment before anything is made.
    for p in &ports {
        if let Some(holder) = door.port_holder(p) {
            let holder = match holder {
                PortHolder::Published(v) => all_records(paths)
                    .iter()
                    .find(|r| r.ports.iter().any(|m| m.host_port == p.host_port))
                    .map_or_else(
                        || format!("the published port {v}"),
                        |r| format!("container {}", r.container_id),
                    ),
                PortHolder::NodePort(v) => format!("the NodePort of {v}"),
                PortHolder::Listener(l) => l,
            };
            return Err(CniError::new(
                code::PORT_IN_USE,
                format!(
                    "address already in use: host port {}/{} is held by {holder}",
                    p.host_port,
                    network::protocol(p)
                ),
                "",
            ));
        }
    }
    let holder = format!("cni:{}/{}", env.container_id, env.ifname);
    let conf_value: Value = serde_json::to_value(conf_raw(conf)).unwrap_or(Value::Null);
    let (addr, prefix, gateway, leased) = if conf.ipam.is_some() {
        let r = ipam(env, &conf_value, "ADD")?;
        let ip = r["ips"][0]["address"].as_str().unwrap_or("");
        let (a, p) = ip.split_once('/').unwrap_or((ip, "24"));
        let addr: Ipv4Addr = a.parse().map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM gave no IPv4 address: {r}"),
                "",
            )
        })?;
        let gw = r["ips"][0]["gateway"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .unwrap_or(subnet.gateway);
        (addr, p.parse().unwrap_or(subnet.prefix), gw, false)
    } else {
        let addr = network::lease(paths, &holder, None, subnet, &door.registered_pods())
            .map_err(|e| CniError::step(code::IO, "lease an address", &e))?;
        (addr, subnet.prefix, subnet.gateway, true)
    };
    let host_if = host_ifname(&env.container_id, &env.ifname);
    let mut undo = Undo {
        paths,
        env,
        conf_value: &conf_value,
        addr,
        holder: &holder,
        leased,
        ipam: conf.ipam.is_some(),
        host_if: None,
        published: Vec::new(),
        done: false,
    };
    let plugged = door
        .plug_netns(&netns, &env.ifname, &host_if, addr, prefix, gateway)
        .map_err(|e| CniError::step(code::IO, "plug the veth", &e))?;
    undo.host_if = Some(host_if.clone());
    for p in &ports {
        network::publish(paths, p, SocketAddrV4::new(addr, p.port))
            .map_err(|e| CniError::step(code::IO, "publish a host port", &e))?;
        undo.published.push(*p);
    }
    let mac = link::format_mac(&plugged.mac);
    let mut result = json!({
        "interfaces": [
            {"name": host_if, "mac": link::format_mac(&plugged.host_mac)},
            {"name": env.ifname, "mac": mac, "sandbox": env.netns},
        ],
        "ips": [{"address": format!("{addr}/{prefix}"), "gateway": gateway.to_string(), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway.to_string()}],
        "dns": {},
    });
    if conf.cni_version.starts_with("0.") {
        result["ips"][0]["version"] = json!("4");
    }
    if let Some(prev) = &conf.prev_result {
        result = chain(prev, result);
    }
    let rec = Record {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns,
        host_if,
        addr,
        prefix,
        gateway,
        mac,
        leased,
        ports: conf.runtime_config.port_mappings.clone(),
        result: result.clone(),
    };
    std::fs::create_dir_all(records_dir(paths))
        .and_then(|()| {
            std::fs::write(
                record_path(paths, &env.container_id, &env.ifname),
                serde_json::to_vec_pretty(&rec).expect("serialises"),
            )
        })
        .map_err(|e| CniError::step(code::IO, "record the attachment", &e))?;
    undo.done = true;
    Ok(result)
}

/// A chained plugin's result: what came before, with ours appended (interface indices
/// shifted).
fn chain(prev: &Value, ours: Value) -> Value {
    let mut out = prev.clone();
    let shift = prev["interfaces"].as_array().map_or(0, Vec::len);
    let mut append = |key: &str, items: &Value, shift_iface: bool| {
        let list = out[key].as_array().cloned().unwrap_or_default();
        let mut list = list;
        for item in items.as_array().into_iter().flatten() {
            let mut item = item.clone();
            if shift_iface && let Some(i) = item["interface"].as_u64() {
                item["interface"] = json!(i as usize + shift);
            }
            list.push(item);
        }
        out[key] = Value::Array(list);
    };
    append("interfaces", &ours["interfaces"], false);
    append("ips", &ours["ips"], true);
    append("routes", &ours["routes"], false);
    if out.get("dns").is_none() {
        out["dns"] = json!({});
    }
    out
}

/// The config as the IPAM plugin must see it: the whole of it.
fn conf_raw(conf: &NetConf) -> Value {
    json!({
        "cniVersion": conf.cni_version,
        "name": conf.name,
        "type": conf.kind,
        "ipam": conf.ipam,
    })
}

/// Removes what a failed ADD made.
struct Undo<'a> {
    paths: &'a Paths,
    env: &'a Env,
    conf_value: &'a Value,
    addr: Ipv4Addr,
    holder: &'a str,
    leased: bool,
    ipam: bool,
    host_if: Option<String>,
    published: Vec<Publish>,
    done: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        network::unpublish(self.paths, &self.published);
        if let Some(h) = &self.host_if {
            network::unregister(self.paths, self.addr);
            network::unplug_now(self.paths, h);
        }
        if self.leased {
            network::release(self.paths, self.addr, self.holder);
        } else if self.ipam {
            let _ = ipam(self.env, self.conf_value, "DEL");
        }
    }
}

fn remove(paths: &Paths, rec: &Record) {
    let ports = publishes(&rec.ports).unwrap_or_default();
    network::unpublish(paths, &ports);
    network::unregister(paths, rec.addr);
    network::unplug_now(paths, &rec.host_if);
    if rec.leased {
        network::release(
            paths,
            rec.addr,
            &format!("cni:{}/{}", rec.container_id, rec.ifname),
        );
    }
    let _ = std::fs::remove_file(record_path(paths, &rec.container_id, &rec.ifname));
}

fn del(env: &Env, paths: &Paths) -> Result<(), CniError> {
    Env::require(&[
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_IFNAME", &env.ifname),
    ])?;
    check_names(env)?;
    // Nothing recorded (a second DEL, or an ADD that never happened): nothing to do.
    if load_record(paths, &env.container_id, &env.ifname).is_none() {
        return Ok(());
    }
    let _lock = paths
        .lock(Mode::Exclusive, Some(LOCK_WAIT))
        .map_err(|e| CniError::step(code::TRY_AGAIN, "take the node lock", &e))?;
    if let Some(rec) = load_record(paths, &env.container_id, &env.ifname) {
        remove(paths, &rec);
    }
    Ok(())
}

fn check(env: &Env, paths: &Paths) -> Result<(), CniError> {
    Env::require(&[
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
    ])?;
    check_names(env)?;
    let rec = load_record(paths, &env.container_id, &env.ifname).ok_or_else(|| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "no attachment of container {} as {}",
                env.container_id, env.ifname
            ),
            "",
        )
    })?;
    let failed = |what: String| CniError::new(code::CHECK_FAILED, what, "");
    if !link::Ip::exists(&rec.host_if) {
        return Err(failed(format!("the host side {} is gone", rec.host_if)));
    }
    let addrs = link::netns_ipv4_addrs(Path::new(&env.netns), &env.ifname)
        .map_err(|e| failed(format!("{} in {}: {e}", env.ifname, env.netns)))?;
    if !addrs.contains(&(rec.addr, rec.prefix)) {
        return Err(failed(format!(
            "{} in {} does not have {}/{} (has {addrs:?})",
            env.ifname, env.netns, rec.addr, rec.prefix
        )));
    }
    let registered: BTreeSet<Ipv4Addr> = crate::loader::Endpoints::open(&paths.bpffs)
        .map(|e| e.list().into_iter().map(|(a, _)| a).collect())
        .unwrap_or_default();
    if !registered.contains(&rec.addr) {
        return Err(failed(format!(
            "{} is not registered with the datapath",
            rec.addr
        )));
    }
    Ok(())
}

fn status(paths: &Paths) -> Result<(), CniError> {
    match NodeRecord::load(paths) {
        // No node yet: the first ADD brings it up.
        Err(_) => Ok(()),
        Ok(_) => crate::agent::datapath_attached(paths).map_err(|why| {
            CniError::new(code::NOT_AVAILABLE, "the datapath is not available", why)
        }),
    }
}

fn gc(conf: &NetConf, paths: &Paths) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let _lock = paths
        .lock(Mode::Exclusive, Some(LOCK_WAIT))
        .map_err(|e| CniError::step(code::TRY_AGAIN, "take the node lock", &e))?;
    for rec in all_records(paths) {
        let keep = valid
            .iter()
            .any(|a| a.container_id == rec.container_id && a.ifname == rec.ifname);
        if !keep {
            remove(paths, &rec);
        }
    }
    Ok(())
}

impl From<SandboxError> for CniError {
    fn from(e: SandboxError) -> Self {
        CniError::step(code::IO, "change the node", &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, stdin: &str) -> (Value, bool) {
        let env = Env {
            command: command.into(),
            ..Env::default()
        };
        let (out, ok) = main_with(&env, &mut stdin.as_bytes());
        (serde_json::from_str(&out).unwrap_or(Value::Null), ok)
    }

    #[test]
    fn version_lists_what_is_supported() {
        let (v, ok) = run("VERSION", r#"{"cniVersion": "1.0.0"}"#);
        assert!(ok);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
    }

    #[test]
    fn bad_input_gets_the_specs_codes() {
        let (v, ok) = run("ADD", "{");
        assert!(!ok);
        assert_eq!(v["code"], code::DECODE);
        let (v, _) = run(
            "ADD",
            r#"{"cniVersion": "9.9.9", "name": "n", "type": "bulkhead"}"#,
        );
        assert_eq!(v["code"], code::INCOMPATIBLE_VERSION);
        let (v, _) = run(
            "ADD",
            r#"{"cniVersion": "1.0.0", "name": "n", "type": "bulkhead", "stateDir": "/nonexistent-bh", "bpffs": "/nonexistent-bh"}"#,
        );
        assert_eq!(v["code"], code::INVALID_ENV);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
            "{v}"
        );
    }

    #[test]
    fn port_mappings_are_read_as_podman_and_containerd_send_them() {
        let podman: PortMapping = serde_json::from_str(
            r#"{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}"#,
        )
        .unwrap();
        let containerd: PortMapping = serde_json::from_str(
            r#"{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}"#,
        )
        .unwrap();
        assert_eq!(podman, containerd);
        assert_eq!(podman.host_port, 8080);
        assert_eq!(podman.host_ip.as_deref(), Some(""));
    }

    #[test]
    fn host_names_are_short_and_stable() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a.len(), 12);
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
    }

    #[test]
    fn a_chained_result_keeps_what_came_before() {
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "x"}], "ips": [], "dns": {"nameservers": ["10.0.0.53"]}});
        let ours = json!({"interfaces": [{"name": "h"}, {"name": "eth0"}], "ips": [{"address": "198.18.0.2/24", "interface": 1}], "routes": []});
        let c = chain(&prev, ours);
        assert_eq!(c["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(c["ips"][0]["interface"], 2);
        assert_eq!(c["dns"]["nameservers"][0], "10.0.0.53");
    }
}
