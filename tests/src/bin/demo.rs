//! The `cargo xtask build-and-run` demo: a node with a bridge, a client pod and three backend
//! pods running real TCP servers, a service VIP balanced across them by the eBPF datapath, and
//! the spread and counters read back through `bulkhead`.
//!
//! Everything lives in namespaces this program creates and removes; it exits non-zero when the
//! spread or the counters do not match the traffic it sent.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
};

use tests::Node;

const CONNECTIONS: usize = 60;

fn main() -> ExitCode {
    if let Some(reason) = tests::skip_reason() {
        eprintln!("demo: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    let mut node = Node::new();
    node.add_pod(2);
    let mut servers = Vec::new();
    for host in 3..=5 {
        servers.push(node.add_pod(host).serve_tcp(8080));
    }
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    let backends: Vec<String> = node.pods[1..]
        .iter()
        .map(|p| format!("{}:8080", p.addr))
        .collect();
    println!(
        "demo: node netns {}, bridge {} ({})",
        node.ns.name(),
        node.bridge,
        node.gateway
    );
    println!(
        "demo: client {}, backends {}",
        node.pods[0].addr,
        backends.join(", ")
    );

    let mut add = vec!["service".to_owned(), "add".to_owned(), format!("{vip}/tcp")];
    for b in &backends {
        add.extend(["--backend".to_owned(), b.clone()]);
    }
    let add: Vec<&str> = add.iter().map(String::as_str).collect();
    println!("$ bulkhead {}", add.join(" "));
    node.bulkhead_ok(&add);

    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        *spread.entry(node.pods[0].tcp_request(vip)).or_insert(0) += 1;
    }
    println!("\ndemo: {CONNECTIONS} connections from the client to {vip}, answered by:");
    for (backend, n) in &spread {
        println!("  {backend:<20} {n:>3}  {}", "#".repeat(*n));
    }
    println!("\n$ bulkhead service list");
    print!("{}", node.bulkhead_ok(&["service", "list"]));
    println!("\n$ bulkhead stats");
    print!("{}", node.bulkhead_ok(&["stats"]));

    let list: serde_json::Value =
        serde_json::from_str(&node.bulkhead_ok(&["service", "list", "--json"])).unwrap();
    let counted: BTreeMap<String, usize> = list[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_owned(),
                b["new_flows"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    drop(servers);
    let ok = spread.len() == backends.len() && counted == spread;
    if ok {
        println!(
            "\ndemo: every backend answered, and the datapath's counters match the connections made"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("\ndemo: MISMATCH: answered {spread:?}, counted {counted:?}");
        ExitCode::FAILURE
    }
}
