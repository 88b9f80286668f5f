//! Where the node meets the outside: `NodePort` from an external namespace and from pods,
//! masquerade of pod traffic leaving through the uplink, and hairpin (a backend reaching its
//! own service).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use tests::{UPLINK_EXTERNAL, UPLINK_NODE, ask, skip};

use crate::cluster::{Cluster, TCP_PORT, VIP};

#[test]
fn nodeport_reaches_the_service_from_outside_the_node() {
    if skip("nodeport_reaches_the_service_from_outside_the_node") {
        return;
    }
    let mut c = Cluster::new(3);
    let external = c.node.add_uplink();
    c.add_service(80, "tcp", &["--nodeport", "30080"]);
    let nodeport = SocketAddrV4::new(UPLINK_NODE, 30080);
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let mut conn = external.tcp_connect(nodeport);
        assert_eq!(conn.peer_addr().unwrap(), nodeport.into());
        *seen.entry(ask(&mut conn)).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        c.backends(TCP_PORT),
        "{seen:?}"
    );
    // The same NodePort from a pod, on both node addresses; the VIP keeps working.
    for addr in [UPLINK_NODE, c.node.gateway] {
        assert!(
            c.backends(TCP_PORT)
                .contains(&c.client().tcp_request(SocketAddrV4::new(addr, 30080)))
        );
    }
    assert!(
        c.backends(TCP_PORT)
            .contains(&c.client().tcp_request(SocketAddrV4::new(VIP, 80)))
    );
    // A second service cannot take the same node port.
    let out = c.node.bulkhead(&[
        "service",
        "add",
        "198.19.0.11:80",
        "-b",
        &c.backend(0, TCP_PORT),
        "--nodeport",
        "30080",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already used"),
        "{out:?}"
    );
}

#[test]
fn pod_traffic_leaving_the_node_is_masqueraded_without_port_collisions() {
    if skip("pod_traffic_leaving_the_node_is_masqueraded_without_port_collisions") {
        return;
    }
    let mut c = Cluster::new(1);
    let external = c.node.add_uplink();
    let _server = external.serve_tcp_peer(9000);
    let target = SocketAddrV4::new(UPLINK_EXTERNAL, 9000);

    // The external host has no route to the pods: only masquerade lets replies come back.
    let mut first = c.node.pods[0].tcp_connect_from(target, 40000);
    let seen_first = ask(&mut first);
    assert_eq!(
        seen_first,
        format!("{UPLINK_NODE}:40000"),
        "the pod's own port is kept when free"
    );

    // Another pod using the same source port towards the same server gets another port.
    let mut second = c.node.pods[1].tcp_connect_from(target, 40000);
    let seen_second = ask(&mut second);
    assert!(
        seen_second.starts_with(&format!("{UPLINK_NODE}:")),
        "{seen_second}"
    );
    assert_ne!(
        seen_second, seen_first,
        "two flows share one masqueraded tuple"
    );
    // Both keep working side by side.
    assert_eq!(ask(&mut first), seen_first);
    assert_eq!(ask(&mut second), seen_second);

    // Many short connections: every one gets a distinct live tuple.
    let mut conns = Vec::new();
    let mut tuples = BTreeSet::new();
    for _ in 0..20 {
        let mut conn = c.client().tcp_connect(target);
        tuples.insert(ask(&mut conn));
        conns.push(conn);
    }
    assert_eq!(tuples.len(), 20);
}

#[test]
fn a_backend_reaches_its_own_service() {
    if skip("a_backend_reaches_its_own_service") {
        return;
    }
    let c = Cluster::new(2);
    // Only backend 0 behind the service: backend 0 connecting to the VIP must hairpin.
    let only = c.backend(0, TCP_PORT);
    c.node
        .bulkhead_ok(&["service", "add", "198.19.0.10:80/tcp", "-b", &only]);
    let me = &c.node.pods[1];
    for _ in 0..5 {
        let mut conn = me.tcp_connect(SocketAddrV4::new(VIP, 80));
        assert_eq!(ask(&mut conn), only);
        assert_eq!(
            ask(&mut conn),
            only,
            "the hairpinned connection broke after one exchange"
        );
    }
}
