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
    services::{BackendSpec, Proto, Scheduler, ServiceSpec, ServiceTable, VirtualAddr},
    subnet::Subnet,
};

/// The node as a sandbox sees it.
pub struct NodeDoor<'a> {
    paths: &'a Paths,
    record: NodeRecord,
    ip: Ip,
}

/// What [`NodeDoor::plug`] made.
pub struct Plugged {
    /// The host side of the veth pair, on the bridge.
    pub host_if: String,
    /// The sandbox side's MAC address.
    pub mac: [u8; 6],
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
            ip: Ip::find()?,
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
        let o = addr.octets();
        // docker's convention: 02:42 and the IPv4 address.
        let mac = [0x02, 0x42, o[0], o[1], o[2], o[3]];
        let tag = u32::from(addr) ^ (pid as u32).rotate_left(16);
        let host_if = format!("bh{tag:08x}");
        // Two `ip` processes, not nine: each spawn costs milliseconds on every start.
        self.ip.add_pod_veth(
            &host_if,
            &self.record.bridge,
            &crate::link::format_mac(&mac),
            pid as u32,
        )?;
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        self.ip.address_pod(
            &netns,
            &format!("{addr}/{}", subnet.prefix),
            &subnet.gateway.to_string(),
        )?;
        node::attach(self.paths, &host_if)?;
        node::register_endpoint(self.paths, &self.record, addr, &host_if, mac)?;
        Ok(Plugged { host_if, mac })
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
    // The programs went with the interface: unpinning the links is now free.
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
