//! `bulkhead-cni` against the real kernel: driven directly as an engine drives it (every verb,
//! errors, port mappings, parallel calls), then by real engines: podman with its CNI backend
//! (and bulkhead-init as its containers' init) and containerd's CRI driven as the kubelet
//! drives it.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    Netns, Node, Pod, UPLINK_NODE, busybox_rootfs, command,
    engines::{Containerd, Podman},
    skip,
};

fn cni_bin() -> Option<PathBuf> {
    std::env::var_os("BULKHEAD_CNI_BIN")
        .map(PathBuf::from)
        .or_else(|| tests::bulkhead_bin().map(|b| b.with_file_name("bulkhead-cni")))
        .filter(|p| p.is_file())
}

/// The plugin's network config for `node`.
fn conf(node: &Node, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "bhnet",
        "type": "bulkhead",
        "bridge": node.bridge,
        "subnet": format!("{}/24", node.gateway),
        "stateDir": node.state_dir(),
        "bpffs": node.bpffs().path(),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// One plugin call in the node's namespace, as an engine makes it.
fn call(node: &Node, verb: &str, id: &str, netns: &str, conf: &Value) -> (Value, bool) {
    let bin = cni_bin().unwrap();
    let (verb, id, netns, text) = (
        verb.to_owned(),
        id.to_owned(),
        netns.to_owned(),
        conf.to_string(),
    );
    let out: Output = node.ns.run(move || {
        let mut child = command(&bin)
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    });
    let v = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    };
    (v, out.status.success())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn the_plugin_adds_checks_and_deletes_exactly_what_it_made() {
    if skip("the_plugin_adds_checks_and_deletes_exactly_what_it_made") {
        return;
    }
    if cni_bin().is_none() {
        eprintln!(
            "SKIP the_plugin_adds_checks_and_deletes_exactly_what_it_made: no bulkhead-cni (cargo xtask build)"
        );
        return;
    }
    let mut node = Node::new();
    let external = node.add_uplink();
    let (c1, c2) = (Netns::new("bhc"), Netns::new("bhc"));
    let path = |ns: &Netns| ns.path().to_string_lossy().into_owned();

    let (v, ok) = call(&node, "VERSION", "", "", &json!({"cniVersion": "1.1.0"}));
    assert!(ok);
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
    assert!(
        call(
            &node,
            "STATUS",
            "",
            "",
            &conf(&node, json!({"cniVersion": "1.1.0"}))
        )
        .1
    );

    let with_port = conf(
        &node,
        json!({"runtimeConfig": {"portMappings": [{"hostPort": 8081, "containerPort": 80, "protocol": "tcp"}]}}),
    );
    let (r1, ok) = call(&node, "ADD", "c1", &path(&c1), &with_port);
    assert!(ok, "{r1}");
    assert_eq!(r1["cniVersion"], "1.0.0");
    assert_eq!(r1["interfaces"][1]["name"], "eth0");
    assert_eq!(r1["interfaces"][1]["sandbox"], path(&c1));
    assert_eq!(r1["ips"][0]["gateway"], "198.18.0.1");
    assert_eq!(r1["routes"][0]["dst"], "0.0.0.0/0");
    let (r2, ok) = call(&node, "ADD", "c2", &path(&c2), &conf(&node, json!({})));
    assert!(ok, "{r2}");
    let addr = |r: &Value| -> Ipv4Addr {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (a1, a2) = (addr(&r1), addr(&r2));
    assert_ne!(a1, a2);
    let host_if = |r: &Value| r["interfaces"][0]["name"].as_str().unwrap().to_owned();
    let p1 = Pod {
        ns: c1,
        addr: a1,
        host_if: host_if(&r1),
    };
    let p2 = Pod {
        ns: c2,
        addr: a2,
        host_if: host_if(&r2),
    };
    let _s1 = p1.serve_tcp(80);
    let _s2 = p2.serve_tcp(80);
    // Container to container, and the host port from outside the node.
    assert_eq!(
        p1.tcp_request(SocketAddrV4::new(a2, 80)),
        format!("{a2}:80")
    );
    assert_eq!(
        external.tcp_request(SocketAddrV4::new(UPLINK_NODE, 8081)),
        format!("{a1}:80")
    );
    // The endpoints are registered for the bypass, like `bulkhead run`'s.
    let endpoints = node.bulkhead_ok(&["endpoint", "list"]);
    assert!(endpoints.contains(&a1.to_string()) && endpoints.contains(&a2.to_string()));

    // A taken host port is refused, naming the holder, and leaves nothing.
    let c3 = Netns::new("bhc");
    let leases = listing(&node.state_dir().join("leases"));
    let (e, ok) = call(&node, "ADD", "c3", &path(&c3), &with_port);
    assert!(!ok);
    assert_eq!(e["code"], 100, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("address already in use") && msg.contains("container c1"),
        "{msg}"
    );
    assert_eq!(listing(&node.state_dir().join("leases")), leases);
    assert!(c3.ip(&["-br", "link"]).lines().all(|l| l.starts_with("lo")));

    // CHECK: fine, then not once the host side is gone.
    assert!(call(&node, "CHECK", "c2", &path(&p2.ns), &conf(&node, json!({}))).1);
    // Bad input: the spec's codes.
    let (e, _) = call(&node, "ADD", "", &path(&p2.ns), &conf(&node, json!({})));
    assert_eq!(e["code"], 4);
    let (e, _) = call(&node, "ADD", "c4", &path(&p2.ns), &json!("{"));
    assert_eq!(e["code"], 6);
    let (e, _) = call(
        &node,
        "ADD",
        "c4",
        &path(&p2.ns),
        &conf(&node, json!({"cniVersion": "0.1.0"})),
    );
    assert_eq!(e["code"], 1);

    // DEL twice (containerd does), the second without a namespace: everything goes.
    for netns in [path(&p1.ns), String::new()] {
        let (e, ok) = call(&node, "DEL", "c1", &netns, &with_port);
        assert!(ok, "{e}");
    }
    assert!(!node.bulkhead_ok(&["service", "save"]).contains(":8081"));
    assert!(
        !node
            .bulkhead_ok(&["endpoint", "list"])
            .contains(&a1.to_string())
    );
    assert!(!node.ns.ip(&["-br", "link"]).contains(&p1.host_if));
    assert!(!listing(&node.state_dir().join("leases")).contains(&a1.to_string()));
    assert_eq!(
        listing(&node.state_dir().join("cni")),
        vec!["c2_eth0.json".to_owned()]
    );

    node.ns.ip(&["link", "del", &p2.host_if]);
    let (e, ok) = call(&node, "CHECK", "c2", &path(&p2.ns), &conf(&node, json!({})));
    assert!(!ok);
    assert!(e["msg"].as_str().unwrap().contains(&p2.host_if), "{e}");

    // GC: an attachment the engine no longer lists goes.
    let (e, ok) = call(
        &node,
        "GC",
        "",
        "",
        &conf(
            &node,
            json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": []}),
        ),
    );
    assert!(ok, "{e}");
    assert!(listing(&node.state_dir().join("cni")).is_empty());
    assert!(listing(&node.state_dir().join("leases")).is_empty());
}

#[test]
fn parallel_adds_and_dels_get_distinct_addresses_and_leave_nothing() {
    if skip("parallel_adds_and_dels_get_distinct_addresses_and_leave_nothing")
        || cni_bin().is_none()
    {
        return;
    }
    let node = std::sync::Arc::new(Node::new());
    let nss: Vec<Netns> = (0..8).map(|_| Netns::new("bhc")).collect();
    let adds: Vec<_> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (node, path) = (node.clone(), ns.path().to_string_lossy().into_owned());
            std::thread::spawn(move || {
                let (r, ok) = call(
                    &node,
                    "ADD",
                    &format!("p{i}"),
                    &path,
                    &conf(&node, json!({})),
                );
                assert!(ok, "{r}");
                r["ips"][0]["address"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut addrs: Vec<String> = adds.into_iter().map(|h| h.join().unwrap()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 8, "{addrs:?}");
    let dels: Vec<_> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (node, path) = (node.clone(), ns.path().to_string_lossy().into_owned());
            std::thread::spawn(move || {
                assert!(
                    call(
                        &node,
                        "DEL",
                        &format!("p{i}"),
                        &path,
                        &conf(&node, json!({}))
                    )
                    .1
                );
            })
        })
        .collect();
    for h in dels {
        h.join().unwrap();
    }
    assert!(listing(&node.state_dir().join("leases")).is_empty());
    assert!(listing(&node.state_dir().join("cni")).is_empty());
}

/// The network "bhnet" as engines read it: a conflist of bulkhead-cni on `node`, with host
/// ports.
fn conflist(node: &Node) -> Value {
    let mut plugin = conf(node, json!({"capabilities": {"portMappings": true}}));
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    json!({"cniVersion": "1.0.0", "name": "bhnet", "plugins": [plugin]})
}

/// A podman with the CNI backend whose one network, "bhnet", is bulkhead-cni on `node`.
fn podman(node: &Node) -> Option<Podman> {
    Podman::new(node.ns.path(), &[conflist(node)], Some(&cni_bin()?))
}

/// GET / from inside `ns`: the body.
fn http_get(ns: &Netns, to: SocketAddrV4) -> String {
    ns.run(move || {
        let mut s =
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(s, "GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        let _ = s.read_to_string(&mut all);
        all.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned()
    })
}

#[test]
fn podman_containers_on_bulkhead_cni_reach_each_other_a_vip_and_a_host_port() {
    let test = "podman_containers_on_bulkhead_cni_reach_each_other_a_vip_and_a_host_port";
    if skip(test) {
        return;
    }
    let Some(rootfs) = busybox_rootfs() else {
        eprintln!("SKIP {test}: no busybox");
        return;
    };
    let mut node = Node::new();
    let external = node.add_uplink();
    node.add_pod(200);
    let Some(podman) = podman(&node) else {
        eprintln!(
            "SKIP {test}: no podman, runc or bulkhead-cni (cargo xtask setup installs podman and runc)"
        );
        return;
    };
    let root = rootfs.path().to_str().unwrap();
    let a1 = podman.web("bhnet", "web1", root, &["-p", "8082:8080"]);
    let a2 = podman.web("bhnet", "web2", root, &[]);
    let a3 = podman.web("bhnet", "web3", root, &[]);
    // Two containers reach each other.
    let got = podman.ok(&[
        "exec",
        "web1",
        "wget",
        "-qO-",
        &format!("http://{a2}:8080/"),
    ]);
    assert_eq!(got, "web2");
    // A service VIP balances across the three.
    let vip = "198.19.0.80:80/tcp";
    node.bulkhead_ok(&[
        "service",
        "add",
        vip,
        "-s",
        "rr",
        "-b",
        &format!("{a1}:8080"),
        "-b",
        &format!("{a2}:8080"),
        "-b",
        &format!("{a3}:8080"),
    ]);
    let client = &node.pods[0].ns;
    let seen: std::collections::BTreeSet<String> = (0..9)
        .map(|_| http_get(client, SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 80), 80)))
        .collect();
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["web1", "web2", "web3"]
    );
    // The host port answers from a namespace outside the node.
    assert_eq!(
        http_get(&external.ns, SocketAddrV4::new(UPLINK_NODE, 8082)),
        "web1"
    );
    node.bulkhead_ok(&["service", "del", vip]);
    // `podman rm` leaves no veth, lease, endpoint, record or map entry.
    podman.ok(&["rm", "-f", "-t", "0", "web1", "web2", "web3"]);
    assert_only_the_test_pod_is_left(&node, 8082);
}

/// What the engine's containers had is all gone: no plugin veth, lease, record, endpoint
/// other than the test's own pod, nor the host port.
fn assert_only_the_test_pod_is_left(node: &Node, host_port: u16) {
    let links = node.ns.ip(&["-br", "link"]);
    assert!(!links.lines().any(|l| l.starts_with("bc")), "{links}");
    assert!(listing(&node.state_dir().join("leases")).is_empty());
    assert!(listing(&node.state_dir().join("cni")).is_empty());
    let endpoints = node.bulkhead_ok(&["endpoint", "list"]);
    let registered: Vec<&str> = endpoints
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        registered,
        ["ADDRESS", "198.18.0.200"],
        "only the test's own pod is left"
    );
    let save = node.bulkhead_ok(&["service", "save"]);
    assert!(!save.contains(&format!(":{host_port}")), "{save}");
}

#[test]
fn containerd_cri_pods_on_bulkhead_cni_answer_on_their_address_and_a_host_port() {
    let test = "containerd_cri_pods_on_bulkhead_cni_answer_on_their_address_and_a_host_port";
    if skip(test) {
        return;
    }
    let Some(rootfs) = busybox_rootfs() else {
        eprintln!("SKIP {test}: no busybox");
        return;
    };
    let Some(cni) = cni_bin() else {
        eprintln!("SKIP {test}: no bulkhead-cni next to bulkhead (cargo xtask build makes it)");
        return;
    };
    let mut node = Node::new();
    let external = node.add_uplink();
    node.add_pod(200);
    let mut cri =
        match Containerd::new(&node.ns.path(), &conflist(&node), Some(&cni), rootfs.path()) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("SKIP {test}: {why}");
                return;
            }
        };
    // A pod with a host port and a busybox httpd in it, as the kubelet makes one.
    let pod = cri
        .run_pod("web", &[(8083, 8080)])
        .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
    cri.start(
        &pod,
        "web",
        "mkdir -p /www && echo cri-web > /www/index.html && exec httpd -f -p 8080 -h /www",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
    let ip = cri.pod_ip(&pod).unwrap();
    assert!(
        node.state_dir().join("cni").read_dir().unwrap().count() == 1,
        "the plugin recorded the pod's attachment"
    );
    // The pod's address answers from another pod on the node.
    let addr = SocketAddrV4::new(ip, 8080);
    let client = &node.pods[0].ns;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .run(move || TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok())
    {
        assert!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(client, addr), "cri-web");
    // The host port answers from a namespace outside the node.
    assert_eq!(
        http_get(&external.ns, SocketAddrV4::new(UPLINK_NODE, 8083)),
        "cri-web"
    );
    // StopPodSandbox and RemovePodSandbox (two DELs, the second without a namespace) leave
    // nothing.
    cri.remove_pod(&pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
    assert_eq!(cri.pods().unwrap(), Vec::<String>::new());
    assert_only_the_test_pod_is_left(&node, 8083);
}

#[test]
fn bulkhead_init_is_a_real_engines_container_init() {
    let test = "bulkhead_init_is_a_real_engines_container_init";
    if skip(test) {
        return;
    }
    let Some(rootfs) = busybox_rootfs() else {
        eprintln!("SKIP {test}: no busybox");
        return;
    };
    let Some(init) = std::env::var_os("BULKHEAD_INIT_BIN") else {
        eprintln!("SKIP {test}: BULKHEAD_INIT_BIN is not set (cargo xtask test sets it)");
        return;
    };
    let node = Node::new();
    let Some(podman) = podman(&node) else {
        eprintln!("SKIP {test}: no podman or runc (cargo xtask setup installs them)");
        return;
    };
    let init = init.to_string_lossy().into_owned();
    let root = rootfs.path().to_str().unwrap();
    let base = [
        "--init",
        "--init-path",
        &init,
        "--network",
        "none",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        "--rootfs",
        root,
    ];
    let run = |name: &str, detach: bool, script: &str| {
        let mut args = vec!["run", "--name", name];
        if detach {
            args.push("-d");
        }
        args.extend_from_slice(&base);
        args.extend_from_slice(&["sh", "-c", script]);
        podman.run(&args)
    };
    // Exit codes come through.
    assert_eq!(run("code", false, "exit 3").status.code(), Some(3));
    // Orphans are reaped: a grandchild left behind never stays a zombie.
    let out = run(
        "reap",
        false,
        "sh -c 'sleep 0.2 &' ; sleep 1; grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    // `podman stop` returns well inside its 10 s when the program honours SIGTERM, which
    // bulkhead-init, as PID 1, passes on.
    let out = run(
        "stop",
        true,
        "trap 'exit 7' TERM; while :; do sleep 0.2; done",
    );
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    podman.ok(&["stop", "stop"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "podman stop took {took:?}");
    assert_eq!(
        podman.ok(&["inspect", "-f", "{{.State.ExitCode}}", "stop"]),
        "7"
    );
    // It really is bulkhead-init at PID 1 (podman mounts it as /run/podman-init).
    let out = run("pid1", false, "cat /proc/1/cmdline | tr '\\0' ' '");
    let cmdline = String::from_utf8_lossy(&out.stdout);
    assert!(cmdline.starts_with("/run/podman-init -- sh"), "{cmdline}");
}
