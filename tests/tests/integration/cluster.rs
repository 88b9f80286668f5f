//! A node with a client pod and backend pods running real servers, shared by the service
//! scenarios.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use tests::{Node, Server};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// A node with a client pod (198.18.0.2) and `n` backend pods (198.18.0.3 ...), each running a
/// TCP and a UDP server that answer with their own address.
pub struct Cluster {
    // Servers stop before the namespaces go.
    _servers: Vec<Server>,
    pub node: Node,
}

impl Cluster {
    pub fn new(n: u8) -> Self {
        let mut node = Node::new();
        node.add_pod(2);
        let mut servers = Vec::new();
        for i in 0..n {
            let pod = node.add_pod(3 + i);
            servers.push(pod.serve_tcp(TCP_PORT));
            servers.push(pod.serve_udp(UDP_PORT));
        }
        Cluster {
            _servers: servers,
            node,
        }
    }

    pub fn client(&self) -> &tests::Pod {
        &self.node.pods[0]
    }

    pub fn backend(&self, i: usize, port: u16) -> String {
        SocketAddrV4::new(self.node.pods[1 + i].addr, port).to_string()
    }

    pub fn backends(&self, port: u16) -> Vec<String> {
        (0..self.node.pods.len() - 1)
            .map(|i| self.backend(i, port))
            .collect()
    }

    /// `bulkhead service add VIP:vport/proto --backend ... ARGS`.
    pub fn add_service(&self, vport: u16, proto: &str, extra: &[&str]) -> SocketAddrV4 {
        let port = if proto == "udp" { UDP_PORT } else { TCP_PORT };
        let service = format!("{VIP}:{vport}/{proto}");
        let mut args = vec!["service".to_owned(), "add".to_owned(), service];
        for b in self.backends(port) {
            args.extend(["--backend".to_owned(), b]);
        }
        args.extend(extra.iter().map(std::string::ToString::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node.bulkhead_ok(&args);
        SocketAddrV4::new(VIP, vport)
    }

    /// Answers of `n` fresh TCP connections to `vip`, counted per backend.
    pub fn spread(&self, vip: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(self.client().tcp_request(vip)).or_insert(0) += 1;
        }
        seen
    }

    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.node.bulkhead_ok(&["service", "list", "--json"])).unwrap()
    }

    /// Flows per backend address of the service at `vip`, as `service list` counts them.
    pub fn counted_flows(&self, vip: &str) -> BTreeMap<String, usize> {
        let list = self.list();
        let svc = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == vip)
            .expect("service listed");
        svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["new_flows"].as_u64().unwrap() > 0)
            .map(|b| {
                (
                    b["addr"].as_str().unwrap().to_owned(),
                    b["new_flows"].as_u64().unwrap() as usize,
                )
            })
            .collect()
    }
}
