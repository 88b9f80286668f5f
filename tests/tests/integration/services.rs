//! Service load balancing through the real datapath: clients in one pod, real TCP and UDP
//! servers in backend pods, a virtual address that exists nowhere but in the BPF maps.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use tests::{Node, ask, skip, udp_ask};

use crate::cluster::{Cluster, TCP_PORT, UDP_PORT, VIP};

#[test]
fn tcp_service_reaches_every_backend_and_the_counters_agree() {
    if skip("tcp_service_reaches_every_backend_and_the_counters_agree") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(80, "tcp", &[]);
    let seen = c.spread(vip, 60);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        c.backends(TCP_PORT),
        "every backend answers: {seen:?}"
    );
    // The datapath's own per-backend counters saw the same flows.
    let svc = format!("{VIP}:80/tcp");
    assert_eq!(c.counted_flows(&svc), seen);
    // A service added again takes the freed ids, and its counters start from zero, not from
    // what the deleted one counted.
    c.node.bulkhead_ok(&["service", "del", &svc]);
    c.add_service(80, "tcp", &[]);
    assert_eq!(c.counted_flows(&svc), BTreeMap::new());
    let listed = c.list();
    assert_eq!(listed[0]["packets"], 0, "{listed}");
    let seen = c.spread(vip, 6);
    assert_eq!(c.counted_flows(&svc), seen);
}

#[test]
fn tcp_connection_stays_on_one_backend() {
    if skip("tcp_connection_stays_on_one_backend") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(80, "tcp", &[]);
    for _ in 0..5 {
        let mut conn = c.client().tcp_connect(vip);
        assert_eq!(
            conn.peer_addr().unwrap(),
            vip.into(),
            "the client talks to the VIP"
        );
        let first = ask(&mut conn);
        for _ in 0..10 {
            assert_eq!(ask(&mut conn), first, "a connection moved between backends");
        }
    }
}

#[test]
fn udp_service_replies_come_from_the_vip_and_flows_stick() {
    if skip("udp_service_replies_come_from_the_vip_and_flows_stick") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(53, "udp", &[]);
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let sock = c.client().udp_client();
        let (first, from) = udp_ask(&sock, vip);
        assert_eq!(from, vip.into(), "reply not translated back to the VIP");
        for _ in 0..3 {
            assert_eq!(
                udp_ask(&sock, vip).0,
                first,
                "a UDP flow moved between backends"
            );
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        c.backends(UDP_PORT),
        "{seen:?}"
    );
}

/// A TCP service on `port` of the VIP with scheduler `sched` over the three backends, weights
/// 1, 2 and 3 in that order.
fn weighted_1_2_3(c: &Cluster, port: u16, sched: &str) -> SocketAddrV4 {
    let all = c.backends(TCP_PORT);
    let svc = format!("{VIP}:{port}/tcp");
    let mut args = vec![
        "service".to_owned(),
        "add".into(),
        svc,
        "-s".into(),
        sched.into(),
    ];
    for (backend, weight) in all.iter().zip(1..) {
        args.extend(["-b".to_owned(), format!("{backend}@{weight}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.node.bulkhead_ok(&args);
    SocketAddrV4::new(VIP, port)
}

#[test]
fn schedulers_spread_flows_as_they_promise() {
    if skip("schedulers_spread_flows_as_they_promise") {
        return;
    }
    let c = Cluster::new(3);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let all = c.backends(TCP_PORT);

    // rr: per-CPU cursors, so each backend is within one turn per CPU of an equal share.
    let seen = c.spread(c.add_service(81, "tcp", &["--scheduler", "rr"]), 30);
    let (min, max) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(seen.len() == 3 && max - min <= cpus, "rr: {seen:?}");

    // Weighted rr (IPVS wrr), weights 1:2:3.
    let seen = c.spread(weighted_1_2_3(&c, 82, "wrr"), 60);
    for (i, want) in [(0, 10), (1, 20), (2, 30)] {
        let got = seen.get(&all[i]).copied().unwrap_or(0);
        assert!(
            got.abs_diff(want) <= 2 * cpus,
            "wrr weight {}: {got} of 60 ({seen:?})",
            i + 1
        );
    }

    // rr (IPVS's, unlike wrr) ignores weights other than zero: 1:2:3 still gets equal shares.
    let seen = c.spread(weighted_1_2_3(&c, 88, "rr"), 30);
    let (min, max) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(
        seen.len() == 3 && max - min <= cpus,
        "rr, weights 1:2:3: {seen:?}"
    );

    // sh, mh (both hash the client address) and dh: one client, one destination: every flow
    // to one backend.
    for (port, sched) in [(83, "sh"), (84, "dh"), (89, "mh")] {
        let seen = c.spread(c.add_service(port, "tcp", &["--scheduler", sched]), 15);
        assert_eq!(seen.len(), 1, "{sched}: {seen:?}");
    }
    // With ipvsadm's sh-port / mh-port the client's port is hashed too: one client's
    // connections, each from a new port, spread again.
    for (port, sched, flag) in [(97, "sh", "sh-port"), (98, "mh", "mh-port")] {
        let args = ["--scheduler", sched, "--sched-flags", flag];
        let seen = c.spread(c.add_service(port, "tcp", &args), 30);
        assert_eq!(seen.len(), 3, "{sched} -b {flag}: {seen:?}");
    }

    // hash, random and maglev spread flows over every backend.
    for (port, sched) in [(85, "hash"), (86, "random"), (87, "maglev")] {
        let seen = c.spread(c.add_service(port, "tcp", &["--scheduler", sched]), 60);
        assert_eq!(seen.len(), 3, "{sched}: {seen:?}");
    }
}

#[test]
fn least_connections_counts_open_connections() {
    if skip("least_connections_counts_open_connections") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(80, "tcp", &["--scheduler", "lc"]);
    let mut conns: Vec<_> = (0..6).map(|_| c.client().tcp_connect(vip)).collect();
    let mut seen = BTreeMap::new();
    for conn in &mut conns {
        *seen.entry(ask(conn)).or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "lc with 6 open connections: {seen:?}"
    );
    let open = |c: &Cluster| -> Vec<u64> {
        c.list()[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["connections"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(open(&c), vec![2, 2, 2]);
    drop(conns);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(open(&c), vec![0, 0, 0], "closed connections still counted");
}

#[test]
fn affinity_pins_a_client_to_one_backend() {
    if skip("affinity_pins_a_client_to_one_backend") {
        return;
    }
    let c = Cluster::new(3);
    let sticky = c.spread(c.add_service(80, "tcp", &["--affinity", "60"]), 20);
    assert_eq!(sticky.len(), 1, "with affinity: {sticky:?}");
    let loose = c.spread(c.add_service(81, "tcp", &[]), 20);
    assert!(
        loose.len() > 1,
        "the control service should spread: {loose:?}"
    );
}

#[test]
fn affinity_by_client_network_shares_a_backend_within_the_netmask() {
    if skip("affinity_by_client_network_shares_a_backend_within_the_netmask") {
        return;
    }
    let mut c = Cluster::new(3);
    // Round robin: a client with no affinity entry gets the next backend.
    let by_host = c.add_service(82, "tcp", &["-s", "rr", "--affinity", "60"]);
    let by_net = c.add_service(
        83,
        "tcp",
        &[
            "-s",
            "rr",
            "--affinity",
            "60",
            "--affinity-netmask",
            "255.255.255.0",
        ],
    );
    // Three more clients in the same /24 (added after the services: pods past the first are
    // the cluster's backends).
    let first_new = c.node.pods.len();
    for n in 60..63 {
        c.node.add_pod(n);
    }
    let others = &c.node.pods[first_new..];
    let first = c.client();
    // Keyed by the whole address, each is a new client that round robin moves on from the
    // first one's backend. The cursor is per CPU, so two of the four first picks may share a
    // backend (one on each CPU), never all four.
    let a = first.tcp_request(by_host);
    let picks: Vec<String> = others.iter().map(|o| o.tcp_request(by_host)).collect();
    assert!(
        picks.iter().any(|p| *p != a),
        "every client got {a}: {picks:?}"
    );
    // Keyed by the /24, they are all the first client's network: same backend, every time.
    let a = first.tcp_request(by_net);
    for _ in 0..3 {
        for o in others {
            assert_eq!(o.tcp_request(by_net), a);
        }
        assert_eq!(first.tcp_request(by_net), a);
    }
    // save writes it as ipvsadm -S does, and restore reads it back unchanged.
    let save = c.node.bulkhead_ok(&["service", "save"]);
    assert!(
        save.contains(&format!("-A -t {VIP}:83 -s rr -p 60 -M 255.255.255.0\n")),
        "{save}"
    );
    assert!(
        save.contains(&format!("-A -t {VIP}:82 -s rr -p 60\n")),
        "{save}"
    );
    c.node
        .bulkhead_ok(&["service", "del", &format!("{VIP}:82/tcp")]);
    c.node
        .bulkhead_ok(&["service", "del", &format!("{VIP}:83/tcp")]);
    let out = restore(&c.node, &save);
    assert!(out.contains("restored 2 services"), "{out}");
    assert_eq!(c.node.bulkhead_ok(&["service", "save"]), save);
}

#[test]
fn draining_keeps_established_connections_and_steers_new_ones_away() {
    if skip("draining_keeps_established_connections_and_steers_new_ones_away") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(80, "tcp", &[]);
    let svc = format!("{vip}/tcp");
    let mut conn = c.client().tcp_connect(vip);
    let pinned = ask(&mut conn);

    c.node.bulkhead_ok(&["backend", "drain", &svc, &pinned]);
    let seen = c.spread(vip, 30);
    assert!(
        !seen.contains_key(&pinned),
        "a draining backend got new flows: {seen:?}"
    );
    assert_eq!(
        ask(&mut conn),
        pinned,
        "the established connection broke on drain"
    );

    // Removing it (gracefully) keeps the connection too.
    c.node.bulkhead_ok(&["backend", "del", &svc, &pinned]);
    assert_eq!(
        ask(&mut conn),
        pinned,
        "the established connection broke on graceful delete"
    );
    let listed = c.list()[0]["backends"].as_array().unwrap().len();
    assert_eq!(listed, 2);

    // --force drops it: the next segment picks another backend, which resets it.
    let mut other = c.client().tcp_connect(vip);
    let victim = ask(&mut other);
    c.node
        .bulkhead_ok(&["backend", "del", &svc, &victim, "--force"]);
    use std::io::{Read, Write};
    let _ = other.write_all(b"?\n");
    let mut buf = [0u8; 64];
    let broken = matches!(other.read(&mut buf), Ok(0) | Err(_));
    assert!(broken, "a force-deleted backend's connection still answers");
}

#[test]
fn backends_can_be_added_and_reweighted_under_traffic() {
    if skip("backends_can_be_added_and_reweighted_under_traffic") {
        return;
    }
    let c = Cluster::new(3);
    let all = c.backends(TCP_PORT);
    let svc = format!("{VIP}:80/tcp");
    c.node.bulkhead_ok(&[
        "service", "add", &svc, "-s", "rr", "-b", &all[0], "-b", &all[1],
    ]);
    let vip = SocketAddrV4::new(VIP, 80);
    let mut conn = c.client().tcp_connect(vip);
    let pinned = ask(&mut conn);

    c.node.bulkhead_ok(&["backend", "add", &svc, &all[2]]);
    assert!(
        c.spread(vip, 12).contains_key(&all[2]),
        "the new backend gets no flows"
    );
    // Weight 0 (IPVS quiesce): no new flows.
    c.node
        .bulkhead_ok(&["backend", "add", &svc, &format!("{}@0", all[0])]);
    assert!(
        !c.spread(vip, 12).contains_key(&all[0]),
        "a weight-0 backend still gets flows"
    );
    assert_eq!(
        ask(&mut conn),
        pinned,
        "an established connection broke while the set changed"
    );
}

#[test]
fn restarting_bulkhead_keeps_established_connections() {
    if skip("restarting_bulkhead_keeps_established_connections") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(80, "tcp", &[]);
    let mut conns: Vec<_> = (0..6).map(|_| c.client().tcp_connect(vip)).collect();
    let before: Vec<String> = conns.iter_mut().map(ask).collect();
    // A restart reloads the program from the binary and swaps it into the pinned links.
    c.node.bulkhead_ok(&["up", "--bridge", &c.node.bridge]);
    let after: Vec<String> = conns.iter_mut().map(ask).collect();
    assert_eq!(before, after);
    assert_eq!(
        c.spread(vip, 6).values().sum::<usize>(),
        6,
        "new connections after a restart"
    );
}

#[test]
fn ten_thousand_services_restore_in_one_command_and_the_last_works() {
    if skip("ten_thousand_services_restore_in_one_command_and_the_last_works") {
        return;
    }
    let c = Cluster::new(3);
    let all = c.backends(TCP_PORT);
    let mut text = String::new();
    let vip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    for i in 0..10_000 {
        text.push_str(&format!("-A -t {}:80 -s hash\n", vip(i)));
        for b in &all {
            text.push_str(&format!("-a -t {}:80 -r {b} -m -w 1\n", vip(i)));
        }
    }
    let started = std::time::Instant::now();
    let out = restore(&c.node, &text);
    eprintln!("restore of 10000 services took {:?}", started.elapsed());
    assert!(out.contains("restored 10000 services"), "{out}");
    let last = SocketAddrV4::new(vip(9_999), 80);
    assert_eq!(
        c.spread(last, 30).len(),
        3,
        "the last service does not balance"
    );
    // save reads back what was restored, line for line.
    assert_eq!(c.node.bulkhead_ok(&["service", "save"]), text);
}

fn restore(node: &Node, text: &str) -> String {
    let out = tests::output_with_stdin(&mut node.command(&["service", "restore"]), text);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_no_partial_state() {
    if skip("bad_input_is_refused_clearly_and_leaves_no_partial_state") {
        return;
    }
    let c = Cluster::new(1);
    c.add_service(80, "tcp", &[]);
    let before = c.node.bulkhead_ok(&["service", "save"]);
    let b = c.backend(0, TCP_PORT);
    let many: Vec<String> = (0..1025)
        .map(|i| format!("198.18.{}.{}:80", 1 + i / 250, 1 + i % 250))
        .collect();
    let mut too_many = vec!["service", "add", "198.19.0.11:80"];
    for m in &many {
        too_many.extend(["-b", m.as_str()]);
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["service", "add", "198.19.0.10:80/tcp", "-b", &b],
            "already exists",
        ),
        (
            vec!["service", "add", "198.19.0.12:0/tcp", "-b", &b],
            "port 0",
        ),
        (
            vec!["service", "add", "198.19.0.12:80/sctp", "-b", &b],
            "unsupported protocol",
        ),
        (
            vec!["service", "add", "198.19.0.300:80", "-b", &b],
            "IPV4:PORT",
        ),
        (
            vec!["service", "add", "198.19.0.12:80", "-b", &b, "-b", &b],
            "listed twice",
        ),
        (
            vec!["service", "add", "198.19.0.12:80", "-s", "lblc", "-b", &b],
            "scheduler",
        ),
        (too_many, "limit is 1024"),
        (vec!["service", "del", "198.19.0.99:80"], "no service"),
        (vec!["backend", "add", "198.19.0.99:80", &b], "no service"),
        (
            vec!["backend", "del", "198.19.0.10:80", "198.18.0.77:80"],
            "has no backend",
        ),
    ];
    for (args, why) in cases {
        let out = c.node.bulkhead(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(why),
            "{:?}: expected {why:?} in: {stderr}",
            &args[..3]
        );
    }
    // A restore with one bad line adds nothing at all.
    let bad = format!(
        "-A -t 198.19.0.20:80\n-a -t 198.19.0.20:80 -r {b}\n-A -t 198.19.0.21:80\n-a -t 198.19.0.22:80 -r {b}\n"
    );
    let out = restore(&c.node, &bad);
    assert!(out.contains("line 4"), "{out}");
    assert_eq!(
        c.node.bulkhead_ok(&["service", "save"]),
        before,
        "bad input changed the table"
    );
}

#[test]
fn conntrack_lists_translated_flows_and_flushes_them() {
    if skip("conntrack_lists_translated_flows_and_flushes_them") {
        return;
    }
    let c = Cluster::new(2);
    let vip = c.add_service(80, "tcp", &[]);
    let mut conn = c.client().tcp_connect(vip);
    let backend = ask(&mut conn);
    let flows: serde_json::Value =
        serde_json::from_str(&c.node.bulkhead_ok(&["conntrack", "list", "--json"])).unwrap();
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0]["client"], conn.local_addr().unwrap().to_string());
    assert_eq!(flows[0]["service"], vip.to_string());
    assert_eq!(flows[0]["backend"], backend);
    assert_eq!(flows[0]["state"], "established");
    assert!(
        c.node
            .bulkhead_ok(&["conntrack", "flush"])
            .contains("flushed 1 flows")
    );
    let stats: serde_json::Value =
        serde_json::from_str(&c.node.bulkhead_ok(&["conntrack", "stats", "--json"])).unwrap();
    let tcp = &stats[0];
    assert_eq!(tcp["table"], "tcp");
    assert_eq!(
        (
            tcp["inserts"].as_u64(),
            tcp["removals"].as_u64(),
            tcp["entries"].as_u64()
        ),
        (Some(2), Some(2), Some(0)),
        "{stats}"
    );
    let empty: serde_json::Value =
        serde_json::from_str(&c.node.bulkhead_ok(&["conntrack", "list", "--json"])).unwrap();
    assert_eq!(empty.as_array().unwrap().len(), 0);
}

/// Runs `bulkhead events` for two seconds while `traffic` runs, and returns what it printed.
fn events_during(node: &Node, traffic: impl FnOnce()) -> String {
    let bin = tests::bulkhead_bin().unwrap();
    let child = std::process::Command::new(bin)
        .args([
            "--netns",
            node.ns.path().to_str().unwrap(),
            "--bpffs",
            node.bpffs().path().to_str().unwrap(),
        ])
        .args([
            "--state-dir",
            node.state_dir().to_str().unwrap(),
            "events",
            "--duration",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    traffic();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "events failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn datapath_events_are_off_by_default_and_show_new_flows_when_enabled() {
    if skip("datapath_events_are_off_by_default_and_show_new_flows_when_enabled") {
        return;
    }
    let c = Cluster::new(1);
    let vip = c.add_service(80, "tcp", &[]);
    let quiet = events_during(&c.node, || drop(c.client().tcp_request(vip)));
    assert_eq!(quiet, "", "events emitted while off");

    c.node
        .bulkhead_ok(&["up", "--bridge", &c.node.bridge, "--datapath-log", "debug"]);
    let client = c.client().addr;
    let loud = events_during(&c.node, || drop(c.client().tcp_request(vip)));
    let backend = c.backend(0, TCP_PORT);
    let line = loud
        .lines()
        .find(|l| l.contains("new flow"))
        .unwrap_or_else(|| panic!("no new-flow event in {loud:?}"));
    assert!(
        line.contains(&client.to_string()) && line.contains(&backend),
        "{line}"
    );
}

#[test]
fn a_client_reusing_its_port_through_a_vip_gets_a_new_flow() {
    if skip("a_client_reusing_its_port_through_a_vip_gets_a_new_flow") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    let mut servers = Vec::new();
    for host in 3..=4 {
        servers.push(node.add_pod(host).serve_tcp_once(TCP_PORT));
    }
    let backends: Vec<String> = node.pods[1..]
        .iter()
        .map(|p| format!("{}:{TCP_PORT}", p.addr))
        .collect();
    node.bulkhead_ok(&[
        "service",
        "add",
        "198.19.0.10:80/tcp",
        "-b",
        &backends[0],
        "-b",
        &backends[1],
    ]);
    let vip = SocketAddrV4::new(VIP, 80);
    // The server closes first, so the client may reuse port 40000 at once; every connection
    // must open promptly (a stale flow would cost a SYN retransmit, a second or more).
    for round in 0..10 {
        let started = std::time::Instant::now();
        let mut conn = node.pods[0].tcp_connect_from(vip, 40000);
        let answer = ask(&mut conn);
        assert!(backends.contains(&answer), "round {round}: {answer}");
        assert!(
            started.elapsed() < std::time::Duration::from_millis(900),
            "round {round} took {:?}",
            started.elapsed()
        );
        drop(conn);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Straight to a backend from the same port afterwards works too.
    let direct: SocketAddrV4 = backends[0].parse().unwrap();
    assert_eq!(
        ask(&mut node.pods[0].tcp_connect_from(direct, 40000)),
        backends[0]
    );
    drop(servers);
}

#[test]
fn udp_flows_move_when_their_backend_is_removed() {
    if skip("udp_flows_move_when_their_backend_is_removed") {
        return;
    }
    // Servers are owned here so one can be stopped, as when its pod goes away.
    let mut node = Node::new();
    node.add_pod(2);
    let mut servers: Vec<Option<tests::Server>> = Vec::new();
    for host in 3..=4 {
        servers.push(Some(node.add_pod(host).serve_udp(UDP_PORT)));
    }
    let backends: Vec<String> = node.pods[1..]
        .iter()
        .map(|p| format!("{}:{UDP_PORT}", p.addr))
        .collect();
    let svc = "198.19.0.10:53/udp";
    node.bulkhead_ok(&[
        "service",
        "add",
        svc,
        "-b",
        &backends[0],
        "-b",
        &backends[1],
    ]);
    let vip = SocketAddrV4::new(VIP, 53);
    let sock = node.pods[0].udp_client();
    let (first, _) = udp_ask(&sock, vip);
    let gone = backends.iter().position(|b| *b == first).unwrap();
    // The backend's pod goes away, then the backend is removed (gracefully, no --force).
    servers[gone] = None;
    node.bulkhead_ok(&["backend", "del", svc, &first]);
    let (next, from) = udp_ask(&sock, vip);
    assert_eq!(
        next,
        backends[1 - gone],
        "the flow was not moved off the removed backend"
    );
    assert_eq!(from, vip.into());
}

#[test]
fn a_service_without_backends_works_once_one_is_added() {
    if skip("a_service_without_backends_works_once_one_is_added") {
        return;
    }
    let c = Cluster::new(1);
    let svc = "198.19.0.10:53/udp";
    c.node.bulkhead_ok(&["service", "add", svc]);
    let vip = SocketAddrV4::new(VIP, 53);
    let sock = c.client().udp_client();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    sock.send_to(b"?", vip).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "an answer from a service without backends"
    );
    sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    c.node
        .bulkhead_ok(&["backend", "add", svc, &c.backend(0, UDP_PORT)]);
    assert_eq!(
        udp_ask(&sock, vip).0,
        c.backend(0, UDP_PORT),
        "the next datagram after a backend appeared"
    );
}

#[test]
fn a_connection_to_a_service_without_backends_is_refused_at_once() {
    if skip("a_connection_to_a_service_without_backends_is_refused_at_once") {
        return;
    }
    let c = Cluster::new(1);
    c.node
        .bulkhead_ok(&["service", "add", "198.19.0.10:80/tcp"]);
    let vip = SocketAddrV4::new(VIP, 80);
    let started = std::time::Instant::now();
    let err = c
        .client()
        .ns
        .run(move || {
            std::net::TcpStream::connect_timeout(&vip.into(), std::time::Duration::from_secs(3))
        })
        .expect_err("connected to a service without backends");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(500),
        "refusal took {:?}",
        started.elapsed()
    );
}

#[test]
fn conntrack_timeouts_are_configurable_and_idle_flows_expire() {
    if skip("conntrack_timeouts_are_configurable_and_idle_flows_expire") {
        return;
    }
    let c = Cluster::new(3);
    c.node.bulkhead_ok(&[
        "up",
        "--bridge",
        &c.node.bridge,
        "--conntrack-timeouts",
        "udp=1",
    ]);
    let vip = c.add_service(53, "udp", &[]);
    let flows = |c: &Cluster| c.list()[0]["new_flows"].as_u64().unwrap();
    let sock = c.client().udp_client();
    let first = udp_ask(&sock, vip).0;
    assert_eq!(udp_ask(&sock, vip).0, first, "a live flow moved");
    let list = |c: &Cluster| -> usize {
        let v: serde_json::Value =
            serde_json::from_str(&c.node.bulkhead_ok(&["conntrack", "list", "--json"])).unwrap();
        v.as_array().unwrap().len()
    };
    assert_eq!(list(&c), 1);
    assert_eq!(flows(&c), 1);
    // Idle past the 1 s timeout: the entry is dead, and the next datagram starts a new flow
    // (counted as one; hashing sends it to the same backend again).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(list(&c), 0, "an expired flow is still listed");
    assert_eq!(udp_ask(&sock, vip).0, first);
    assert_eq!(
        flows(&c),
        2,
        "the datagram after the timeout did not start a new flow"
    );
    let bad = c.node.bulkhead(&[
        "up",
        "--bridge",
        &c.node.bridge,
        "--conntrack-timeouts",
        "tcp-fin=3",
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown timeout"),
        "{bad:?}"
    );
}

#[test]
fn twos_keeps_open_connections_balanced() {
    if skip("twos_keeps_open_connections_balanced") {
        return;
    }
    let c = Cluster::new(3);
    let vip = c.add_service(96, "tcp", &["--scheduler", "twos"]);
    // Sixty connections held open: each new one goes to the less loaded of two random
    // draws, which keeps the three within a few connections of each other (`random` in its
    // place broke this bound in 3 of 6 runs here).
    let mut held = Vec::new();
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let mut conn = c.client().tcp_connect(vip);
        *seen.entry(ask(&mut conn)).or_insert(0u64) += 1;
        held.push(conn);
    }
    let (min, max) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(seen.len() == 3 && max - min <= 4, "twos: {seen:?}");
    // What it compared is what the datapath counts as open.
    let open: BTreeMap<String, u64> = c.list()[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_owned(),
                b["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(open, seen);
}

#[test]
fn ipvs_scan_schedulers_pick_as_ipvs_does() {
    if skip("ipvs_scan_schedulers_pick_as_ipvs_does") {
        return;
    }
    let c = Cluster::new(3);
    let all = c.backends(TCP_PORT);
    // Weights 1:2:3 in the order the backends were added; each new connection stays open, so
    // it counts for the next choice. The expected sequences are IPVS's (ip_vs_sed.c,
    // ip_vs_nq.c, ip_vs_fo.c, ip_vs_ovf.c): scan in order, a later backend wins only when
    // strictly better.
    for (port, sched, want) in [
        // the fewest connections, weights aside: each in turn
        (94, "lc", vec![0, 1, 2, 0, 1, 2]),
        // the fewest connections per weight: C/W 0,0,0 -> first; 1,0,0 -> second; ...
        (95, "wlc", vec![0, 1, 2, 2, 1, 2]),
        // (C+1)/W: 1/1, 1/2, 1/3 -> third; then 1, .5, .67 -> second; ...
        (90, "sed", vec![2, 1, 2, 0, 1, 2]),
        // the first idle backend, each in turn; then as sed
        (91, "nq", vec![0, 1, 2, 2, 1, 2]),
        // always the highest weight
        (92, "fo", vec![2, 2, 2, 2, 2, 2]),
        // the highest weight with fewer connections than its weight
        (93, "ovf", vec![2, 2, 2, 1, 1, 0]),
    ] {
        let vip = weighted_1_2_3(&c, port, sched);
        let mut held = Vec::new();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let mut conn = c.client().tcp_connect(vip);
            let answer = ask(&mut conn);
            got.push(
                all.iter()
                    .position(|b| *b == answer)
                    .expect("a known backend"),
            );
            held.push(conn);
        }
        assert_eq!(got, want, "{sched}: backends picked in order");
        if sched == "ovf" {
            // Every backend is full: the next connection is refused, not queued.
            let err = c.client().ns.run(move || {
                std::net::TcpStream::connect_timeout(&vip.into(), std::time::Duration::from_secs(2))
                    .map(drop)
                    .map_err(|e| e.kind())
            });
            assert_eq!(
                err,
                Err(std::io::ErrorKind::ConnectionRefused),
                "ovf when full"
            );
        }
        drop(held);
    }
}
