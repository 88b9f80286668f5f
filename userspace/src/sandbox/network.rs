//! The sandbox's one door to the node: plug a veth into the bridge with the datapath attached
//! and the pod registered for the stack bypass, take it out again, and publish a port as a
//! datapath service. Nothing else in `sandbox` reaches `node`, `services`, `loader` or `link`;
//! the CNI plugin and the agent are meant to come through the same door.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{Result, SandboxError, spec::Publish};
use crate::{
    link::Ip,
    loader::Endpoints,
    node::{self, NodeRecord, Paths},
    services::{BackendSpec, Proto, SchedFlags, Scheduler, ServiceSpec, ServiceTable, VirtualAddr},
    subnet::Subnet,
};

/// The node as a sandbox sees it.
pub struct NodeDoor<'a> {
    paths: &'a Paths,
    record: NodeRecord,
}

/// What [`NodeDoor::plug`] made.
pub struct Plugged {
    /// The host side of the veth pair, on the bridge.
    pub host_if: String,
    /// The sandbox side's MAC address.
    pub mac: [u8; 6],
    /// The host side's MAC address.
    pub host_mac: [u8; 6],
}

/// Who holds a host port a sandbox asks to publish.
pub enum PortHolder {
    /// A datapath service on every node address at that port: another sandbox's publish, or a
    /// service added by hand.
    Published(VirtualAddr),
    /// The `NodePort` of a service.
    NodePort(VirtualAddr),
    /// A socket listening in the node's namespace, as `ss` describes it.
    Listener(String),
}

impl<'a> NodeDoor<'a> {
    /// The node at `paths`; fails when it is not up.
    pub fn open(paths: &'a Paths) -> Result<Self> {
        Ok(NodeDoor {
            paths,
            record: NodeRecord::load(paths)?,
        })
    }

    /// The pod subnet sandboxes get their addresses from.
    pub fn subnet(&self) -> Result<Subnet> {
        self.record.subnet.ok_or(SandboxError::NoSubnet)
    }

    /// Pods registered with the datapath by any means (`bulkhead endpoint add` too), whose
    /// addresses a lease must skip.
    pub fn registered_pods(&self) -> Vec<Ipv4Addr> {
        Endpoints::open(&self.paths.bpffs)
            .map(|e| e.list().into_iter().map(|(a, _)| a).collect())
            .unwrap_or_default()
    }

    /// The veth pair of the sandbox whose first process is `pid`: the host side on the bridge
    /// with the datapath attached and the pod registered for the bypass, the other side `eth0`
    /// inside with `addr` and a default route through the bridge.
    pub fn plug(&self, pid: i32, addr: Ipv4Addr, subnet: Subnet) -> Result<Plugged> {
        let tag = u32::from(addr) ^ (pid as u32).rotate_left(16);
        let host_if = format!("bh{tag:08x}");
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        self.plug_netns(
            &netns,
            "eth0",
            &host_if,
            addr,
            subnet.prefix,
            subnet.gateway,
        )
    }

    /// The veth pair of a pod whose network namespace is `netns`: `host_if` on the bridge
    /// with the datapath attached and the pod registered for the bypass, `ifname` inside with
    /// `addr/prefix` and a default route via `gateway`. Over netlink: two requests here, one
    /// batch inside, no process spawned. Nothing is left when it fails.
    pub fn plug_netns(
        &self,
        netns: &std::path::Path,
        ifname: &str,
        host_if: &str,
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<Plugged> {
        use crate::netlink::{Rtnl, open_ns};
        let o = addr.octets();
        // docker's convention: 02:42 and the IPv4 address.
        let mac = [0x02, 0x42, o[0], o[1], o[2], o[3]];
        let failed = |step: &'static str| move |e: std::io::Error| SandboxError::io(step, e);
        let ns = open_ns(netns).map_err(failed("open the pod's network namespace"))?;
        let mut here = Rtnl::open().map_err(failed("open a netlink socket"))?;
        let host = here
            .add_pod_veth(host_if, &self.record.bridge, ifname, &ns, mac)
            .map_err(failed("create the veth pair"))?;
        let plugged = (|| {
            Rtnl::open_in(&ns)
                .and_then(|mut inside| inside.configure_pod(ifname, addr, prefix, gateway))
                .map_err(failed("address the pod's interface"))?;
            node::attach_pod(self.paths, host_if)?;
            node::register_endpoint(self.paths, &self.record, addr, host_if, mac)?;
            Ok(Plugged {
                host_if: host_if.to_owned(),
                mac,
                host_mac: host.mac,
            })
        })();
        if plugged.is_err() {
            let _ = node::endpoint_del(self.paths, addr);
            let _ = here.delete(host_if);
            let _ = node::detach(self.paths, host_if);
        }
        plugged
    }

    /// What holds the host port `p` asks for, if anything.
    pub fn port_holder(&self, p: &Publish) -> Option<PortHolder> {
        let vaddr = published_vaddr(p);
        if let Ok(table) = ServiceTable::open(&self.paths.bpffs) {
            // Specs, not `list()`: only addresses are compared, no counter needs reading.
            for s in table.specs() {
                if s.vaddr.proto != vaddr.proto {
                    continue;
                }
                if s.vaddr == vaddr {
                    return Some(PortHolder::Published(vaddr));
                }
                if s.nodeport == Some(p.host_port) {
                    return Some(PortHolder::NodePort(s.vaddr));
                }
            }
        }
        let flag = if p.udp { "-Hlnup" } else { "-Hlntp" };
        let out = std::process::Command::new("ss")
            .args([flag, &format!("sport = :{}", p.host_port)])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        Some(PortHolder::Listener(
            line.split("users:").nth(1).map_or_else(
                || line.trim().to_owned(),
                |u| format!("process {}", u.trim()),
            ),
        ))
    }
}

/// The service a published port is: every node address at the host port, to the sandbox.
pub fn published_vaddr(p: &Publish) -> VirtualAddr {
    VirtualAddr {
        addr: Ipv4Addr::UNSPECIFIED,
        port: p.host_port,
        proto: protocol(p),
    }
}

pub fn protocol(p: &Publish) -> Proto {
    if p.udp { Proto::Udp } else { Proto::Tcp }
}

/// Publishes host port `p` of every node address to `backend`.
pub fn publish(paths: &Paths, p: &Publish, backend: SocketAddrV4) -> Result<()> {
    ServiceTable::open(&paths.bpffs)?.add(&ServiceSpec {
        vaddr: published_vaddr(p),
        scheduler: Scheduler::default(),
        affinity_secs: 0,
        affinity_netmask: Ipv4Addr::BROADCAST,
        sched_flags: SchedFlags::default(),
        nodeport: None,
        backends: vec![BackendSpec {
            addr: backend,
            weight: 1,
        }],
    })?;
    Ok(())
}

/// Withdraws published ports, whatever is already gone.
pub fn unpublish(paths: &Paths, ports: &[Publish]) {
    if ports.is_empty() {
        return;
    }
    if let Ok(mut table) = ServiceTable::open(&paths.bpffs) {
        for p in ports {
            let _ = table.delete(&published_vaddr(p));
        }
    }
}

/// Forgets the pod at `addr` for the stack bypass, whatever is already gone.
pub fn unregister(paths: &Paths, addr: Ipv4Addr) {
    let _ = node::endpoint_del(paths, addr);
}

/// Takes the veth `host_if` out of the node, whatever is already gone. Call it after the
/// sandbox's namespaces are unbound, so the kernel's teardown can take the pair.
pub fn unplug(paths: &Paths, host_if: &str) {
    // With its processes gone and its bind mount undone, the sandbox's network namespace is
    // torn down by the kernel in the background, veth pair included, in a few milliseconds;
    // deleting the veth here would wait ~40 ms for the network to settle. Deleting it by
    // hand is the fallback (something else still holds the namespace).
    let deadline = Instant::now() + Duration::from_millis(500);
    while Ip::exists(host_if) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Ok(ip) = Ip::find()
        && Ip::exists(host_if)
    {
        let _ = ip.delete(host_if);
    }
    // The programs went (or go) with the interface: drop the pins, the kernel frees the links.
    let _ = node::forget_attachment(paths, host_if);
}

/// Takes the veth `host_if` out of the node at once (the pod's namespace may live on, as an
/// engine's does after a CNI DEL), whatever is already gone.
pub fn unplug_now(paths: &Paths, host_if: &str) {
    if let Ok(mut rtnl) = crate::netlink::Rtnl::open() {
        let _ = rtnl.delete(host_if);
    }
    let _ = node::detach(paths, host_if);
}

/// A published port in use, as the error names it.
pub fn in_use(p: &Publish, holder: String) -> SandboxError {
    SandboxError::PortInUse {
        port: p.host_port,
        proto: protocol(p),
        holder,
    }
}

fn leases_dir(paths: &Paths) -> std::path::PathBuf {
    paths.state_dir.join("leases")
}

/// Takes an address for `holder` (a sandbox's name, or `cni:ID/IFNAME` for a CNI attachment):
/// `wanted`, or the lowest free one of the subnet. A lease is a file created exclusively, so
/// two attachments never get the same address; pods registered with the datapath by other
/// means (`bulkhead endpoint add`) are skipped too.
pub fn lease(
    paths: &Paths,
    holder: &str,
    wanted: Option<Ipv4Addr>,
    subnet: Subnet,
    registered: &[Ipv4Addr],
) -> Result<Ipv4Addr> {
    use std::io::Write as _;
    let dir = leases_dir(paths);
    std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io("create the lease dir", e))?;
    let take = |addr: Ipv4Addr| -> Result<bool> {
        if registered.contains(&addr) {
            return Ok(false);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(addr.to_string()))
        {
            Ok(mut f) => {
                let _ = f.write_all(holder.as_bytes());
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(reclaim_drained(&dir.join(addr.to_string()), holder, false))
            }
            Err(e) => Err(SandboxError::io("write an address lease", e)),
        }
    };
    if let Some(addr) = wanted {
        // An address asked for by name waits for a draining veth rather than failing.
        if take(addr)? || reclaim_drained(&dir.join(addr.to_string()), holder, true) {
            return Ok(addr);
        }
        let holder = std::fs::read_to_string(dir.join(addr.to_string())).map_or_else(
            |_| "a pod registered with the datapath".into(),
            |n| match (n.strip_prefix("cni:"), n.strip_prefix(DRAINING)) {
                (Some(id), _) => format!("container {id}"),
                (_, Some(veth)) => format!("a removed sandbox whose veth {veth} lingers"),
                _ => format!("sandbox {n}"),
            },
        );
        return Err(SandboxError::AddressTaken { addr, holder });
    }
    for addr in subnet.pod_addresses() {
        if take(addr)? {
            return Ok(addr);
        }
    }
    Err(SandboxError::SubnetFull {
        subnet: format!("{}/{}", subnet.network(), subnet.prefix),
    })
}

/// Prefix of a lease whose holder is gone while its veth may still be on its way out with the
/// holder's network namespace: `drain:HOST_IF`.
const DRAINING: &str = "drain:";
/// How long a draining veth may take to go with its namespace before a lease of its address
/// deletes it by hand (something else still holds the namespace).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Gives back `addr` without waiting for the veth `host_if` to go: the kernel deletes the pair
/// with the sandbox's namespace, in the background. Until it has, the lease stays, marked
/// draining, so the address and its MAC are not handed out while the old pair is still on the
/// bridge; the next [`lease`] reaching it takes it over once the veth is gone. Call it under
/// the node lock, after the namespaces are unbound.
pub fn release_draining(paths: &Paths, addr: Ipv4Addr, holder: &str, host_if: &str) {
    let path = leases_dir(paths).join(addr.to_string());
    if !std::fs::read_to_string(&path).is_ok_and(|n| n == holder) {
        return;
    }
    let _ = node::forget_attachment(paths, host_if);
    if !Ip::exists(host_if) {
        let _ = std::fs::remove_file(path);
        return;
    }
    let tmp = leases_dir(paths).join(format!(".{addr}.tmp"));
    if std::fs::write(&tmp, format!("{DRAINING}{host_if}")).is_err()
        || std::fs::rename(&tmp, &path).is_err()
    {
        unplug(paths, host_if);
        let _ = std::fs::remove_file(path);
    }
}

/// Takes over the draining lease at `path` for `holder` once its veth is gone; `wait`: up to
/// [`DRAIN_GRACE`] for it, else only when it is gone already (or outlived the grace, then it is
/// deleted by hand). False when the address is not free.
fn reclaim_drained(path: &std::path::Path, holder: &str, wait: bool) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Some(host_if) = text.strip_prefix(DRAINING) else {
        return false;
    };
    let age = || {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    };
    while wait && Ip::exists(host_if) && age() < DRAIN_GRACE {
        std::thread::sleep(Duration::from_millis(2));
    }
    if Ip::exists(host_if) {
        if age() < DRAIN_GRACE {
            return false;
        }
        if let Ok(mut rtnl) = crate::netlink::Rtnl::open() {
            let _ = rtnl.delete(host_if);
        }
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, holder).is_ok() && std::fs::rename(&tmp, path).is_ok()
}

/// Settles every draining lease: waits for its veth to go (deleting it by hand after a while)
/// and gives the address back. `down` calls it, so nothing of an ended sandbox outlives the
/// node.
pub fn settle_drained(paths: &Paths) {
    for entry in std::fs::read_dir(leases_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(host_if) = text.strip_prefix(DRAINING)
        {
            unplug(paths, host_if);
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Gives back `addr` if `holder` holds it.
pub fn release(paths: &Paths, addr: Ipv4Addr, holder: &str) {
    let path = leases_dir(paths).join(addr.to_string());
    if std::fs::read_to_string(&path).is_ok_and(|n| n == holder) {
        let _ = std::fs::remove_file(path);
    }
}
