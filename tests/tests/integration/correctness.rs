//! Where kube-proxy, IPVS and Cilium users got burned, with real traffic: ICMP errors about
//! translated flows (path MTU discovery, port unreachable), fragmented datagrams, services
//! without backends, one backend behind two VIPs, and the stack bypass.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddrV4, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use tests::{Server, skip};

use crate::cluster::{Cluster, VIP};

/// Bytes pushed through the VIP in one connection for the path MTU test.
const BULK: usize = 256 * 1024;

/// A server on `port` of backend `i` that reads until EOF and answers with the byte count.
fn serve_count(c: &Cluster, i: usize, port: u16) -> Server {
    let me = SocketAddrV4::new(c.node.pods[1 + i].addr, port);
    let listener = c.node.pods[1 + i]
        .ns
        .run(move || TcpListener::bind(me).expect("bind"));
    listener.set_nonblocking(true).unwrap();
    Server::spawn(move |stop| {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    let mut total = 0usize;
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n;
                    }
                    let _ = conn.write_all(format!("{total}\n").as_bytes());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    })
}

#[test]
fn path_mtu_discovery_works_through_a_vip() {
    if skip("path_mtu_discovery_works_through_a_vip") {
        return;
    }
    let c = Cluster::new(1);
    // Through the node's routing (no bypass), whose way out to the backend is narrower than
    // either end's link: neither end's MSS knows, only "fragmentation needed" from the node
    // can tell the client, and it quotes the translated packet (client -> backend).
    c.node
        .bulkhead_ok(&["up", "--bridge", &c.node.bridge, "--bypass", "off"]);
    c.node
        .ns
        .ip(&["link", "set", &c.node.bridge, "mtu", "1280"]);
    let _server = serve_count(&c, 0, 9000);
    c.node.bulkhead_ok(&[
        "service",
        "add",
        &format!("{VIP}:9000"),
        "--backend",
        &c.backend(0, 9000),
    ]);
    let mut conn = c.client().tcp_connect(SocketAddrV4::new(VIP, 9000));
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    conn.write_all(&vec![7u8; BULK])
        .expect("send through the VIP");
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap_or_else(|e| {
        panic!(
            "no answer after {:?} (black-holed?): {e}",
            started.elapsed()
        )
    });
    assert_eq!(
        answer.trim(),
        BULK.to_string(),
        "the backend got everything"
    );
    // The client learnt the path MTU of the VIP from the translated error.
    let route = c.client().ns.ip(&["route", "get", &VIP.to_string()]);
    assert!(
        route.contains("mtu 1280"),
        "the client's route cache has no path MTU for the VIP: {route}"
    );
}

/// Receives on a connected UDP socket, returning the error kind or what came.
fn recv_result(sock: &UdpSocket) -> Result<Vec<u8>, ErrorKind> {
    let mut buf = vec![0u8; 65536];
    sock.recv(&mut buf)
        .map(|n| buf[..n].to_vec())
        .map_err(|e| e.kind())
}

#[test]
fn a_backends_port_unreachable_reaches_the_client() {
    if skip("a_backends_port_unreachable_reaches_the_client") {
        return;
    }
    let c = Cluster::new(1);
    // Nothing listens on 7000 in the backend: its kernel answers with port unreachable, about
    // the datagram as it arrived (client -> backend:7000).
    c.node.bulkhead_ok(&[
        "service",
        "add",
        &format!("{VIP}:7000/udp"),
        "--backend",
        &c.backend(0, 7000),
    ]);
    let sock = c.client().udp_client();
    sock.connect(SocketAddrV4::new(VIP, 7000)).unwrap();
    sock.send(b"hello?").unwrap();
    assert_eq!(
        recv_result(&sock),
        Err(ErrorKind::ConnectionRefused),
        "the error never reached the client"
    );
}

#[test]
fn a_datagram_to_a_service_without_backends_is_refused_at_once() {
    if skip("a_datagram_to_a_service_without_backends_is_refused_at_once") {
        return;
    }
    let c = Cluster::new(1);
    c.node
        .bulkhead_ok(&["service", "add", &format!("{VIP}:7001/udp")]);
    let sock = c.client().udp_client();
    sock.connect(SocketAddrV4::new(VIP, 7001)).unwrap();
    let started = Instant::now();
    sock.send(b"hello?").unwrap();
    assert_eq!(recv_result(&sock), Err(ErrorKind::ConnectionRefused));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused only after {:?}",
        started.elapsed()
    );
    // Backends arrive: the next datagram is answered.
    let _server = c.node.pods[1].serve_udp(7001);
    c.node.bulkhead_ok(&[
        "backend",
        "add",
        &format!("{VIP}:7001/udp"),
        &c.backend(0, 7001),
    ]);
    sock.send(b"hello?").unwrap();
    assert_eq!(recv_result(&sock), Ok(c.backend(0, 7001).into_bytes()));
}

/// A UDP server on `port` of backend `i` echoing every datagram back whole.
fn serve_echo(c: &Cluster, i: usize, port: u16) -> Server {
    let me = SocketAddrV4::new(c.node.pods[1 + i].addr, port);
    let sock = c.node.pods[1 + i]
        .ns
        .run(move || UdpSocket::bind(me).expect("bind"));
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    Server::spawn(move |stop| {
        let mut buf = vec![0u8; 65536];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    })
}

#[test]
fn a_fragmented_datagram_reaches_one_backend_whole() {
    if skip("a_fragmented_datagram_reaches_one_backend_whole") {
        return;
    }
    let c = Cluster::new(3);
    let _servers: Vec<Server> = (0..3).map(|i| serve_echo(&c, i, 7002)).collect();
    let backends: Vec<String> = (0..3).map(|i| c.backend(i, 7002)).collect();
    let mut args = vec![
        "service".to_owned(),
        "add".to_owned(),
        format!("{VIP}:7002/udp"),
    ];
    for b in &backends {
        args.extend(["--backend".to_owned(), b.clone()]);
    }
    c.node
        .bulkhead_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // 4,000 bytes over a 1,500-byte MTU: three fragments each way. Several clients (ports),
    // so more than one backend is involved; the echo proves both directions arrived whole.
    for n in 0..6u8 {
        let sock = c.client().udp_client();
        sock.connect(SocketAddrV4::new(VIP, 7002)).unwrap();
        let datagram: Vec<u8> = (0..4000u32)
            .map(|i| (i as u8).wrapping_mul(n + 1))
            .collect();
        sock.send(&datagram).unwrap();
        let mut buf = vec![0u8; 65536];
        let got = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {n}: no echo: {e}"));
        assert_eq!(&buf[..got], &datagram[..], "datagram {n} came back damaged");
    }
}

#[test]
fn one_backend_behind_two_vips_keeps_both_connections_apart() {
    if skip("one_backend_behind_two_vips_keeps_both_connections_apart") {
        return;
    }
    let c = Cluster::new(1);
    let _peer = c.node.pods[1].serve_tcp_peer(8081);
    let vips = [
        SocketAddrV4::new(VIP, 81),
        SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 12), 81),
    ];
    for vip in vips {
        c.node.bulkhead_ok(&[
            "service",
            "add",
            &vip.to_string(),
            "--backend",
            &c.backend(0, 8081),
        ]);
    }
    // The same client port to both VIPs: two connections whose translated tuples would be the
    // same (client:40500 -> backend:8081) without a client-port translation.
    let mut first = c.client().tcp_connect_from(vips[0], 40500);
    let mut second = c.client().tcp_connect_from(vips[1], 40500);
    let seen_first = tests::ask(&mut first);
    let seen_second = tests::ask(&mut second);
    let client = c.client().addr;
    assert_eq!(
        seen_first,
        format!("{client}:40500"),
        "the first connection keeps its port"
    );
    assert!(
        seen_second.starts_with(&format!("{client}:")) && seen_second != seen_first,
        "{seen_second}"
    );
    // Both stay usable, each answered on its own connection.
    for _ in 0..3 {
        assert_eq!(tests::ask(&mut first), seen_first);
        assert_eq!(tests::ask(&mut second), seen_second);
    }
    assert_eq!(first.peer_addr().unwrap(), vips[0].into());
    assert_eq!(second.peer_addr().unwrap(), vips[1].into());
    // `conntrack list` shows the translated port of the second flow only.
    let flows: serde_json::Value =
        serde_json::from_str(&c.node.bulkhead_ok(&["conntrack", "list", "--json"])).unwrap();
    let seen_port = |vip: SocketAddrV4| {
        flows
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["service"] == vip.to_string())
            .map(|f| f["client_port_at_backend"].clone())
    };
    let translated: u16 = seen_second.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(seen_port(vips[0]), Some(serde_json::Value::Null), "{flows}");
    assert_eq!(seen_port(vips[1]), Some(translated.into()), "{flows}");
}

/// IP datagrams the node's namespace has forwarded (its routing, not the bypass).
fn forwarded(c: &Cluster) -> u64 {
    let snmp = c
        .node
        .ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp"));
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .expect("ForwDatagrams");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn the_bypass_skips_the_nodes_routing_and_can_be_turned_off() {
    if skip("the_bypass_skips_the_nodes_routing_and_can_be_turned_off") {
        return;
    }
    let c = Cluster::new(2);
    let vip = c.add_service(80, "tcp", &[]);
    let endpoints = c.node.bulkhead_ok(&["endpoint", "list", "--json"]);
    for pod in &c.node.pods {
        assert!(
            endpoints.contains(&format!("\"{}\"", pod.addr)),
            "{endpoints}"
        );
    }
    let requests = 50;
    let mut per_mode = Vec::new();
    for mode in ["on", "off"] {
        c.node
            .bulkhead_ok(&["up", "--bridge", &c.node.bridge, "--bypass", mode]);
        let before = forwarded(&c);
        let seen = c.spread(vip, requests);
        assert_eq!(seen.values().sum::<usize>(), requests);
        assert_eq!(
            seen.len(),
            2,
            "both backends answer with bypass {mode}: {seen:?}"
        );
        per_mode.push(forwarded(&c) - before);
    }
    // Every connection sends at least SYN, request, ACKs and FIN to the VIP.
    assert_eq!(
        per_mode[0], 0,
        "with the bypass on, the node routed {} packets",
        per_mode[0]
    );
    assert!(
        per_mode[1] >= 4 * requests as u64,
        "with it off, the node routed only {}",
        per_mode[1]
    );
}

#[test]
fn endpoint_registration_refuses_what_is_not_a_veth() {
    if skip("endpoint_registration_refuses_what_is_not_a_veth") {
        return;
    }
    let c = Cluster::new(1);
    let out = c.node.bulkhead(&[
        "endpoint",
        "add",
        "198.18.0.50",
        "--dev",
        &c.node.bridge,
        "--mac",
        "02:00:00:00:00:50",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a veth"), "{err}");
    let out = c.node.bulkhead(&[
        "endpoint",
        "add",
        "198.18.0.50",
        "--dev",
        "nosuchdev0",
        "--mac",
        "02:00:00:00:00:50",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
    let out = c.node.bulkhead(&[
        "endpoint",
        "add",
        "198.18.0.50",
        "--dev",
        &c.node.pods[0].host_if,
        "--mac",
        "zz",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a MAC address"),
        "{out:?}"
    );
    let out = c.node.bulkhead(&["endpoint", "del", "198.18.0.50"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no endpoint 198.18.0.50"),
        "{out:?}"
    );
}
