//! `bulkhead run` and friends against the real kernel: namespaces, cgroup limits (this machine's
//! v1 controllers, or v2 where that is what is mounted), the veth on the bridge, services over
//! sandboxes, published ports, and a clean `rm`.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use tests::{Node, TempDir, busybox_rootfs, skip};

/// A node with a busybox rootfs to run sandboxes from.
struct Host {
    node: Node,
    rootfs: TempDir,
}

impl Host {
    fn new(test: &str) -> Option<Self> {
        if skip(test) {
            return None;
        }
        let Some(rootfs) = busybox_rootfs() else {
            eprintln!("SKIP {test}: no busybox (cargo xtask setup installs busybox-static)");
            return None;
        };
        Some(Host {
            node: Node::new(),
            rootfs,
        })
    }

    fn root(&self) -> &str {
        self.rootfs.path().to_str().unwrap()
    }

    /// `bulkhead run --rootfs ROOT ARGS -- sh -c SCRIPT`.
    fn run(&self, args: &[&str], script: &str) -> Output {
        let mut all = vec!["run", "--rootfs", self.root()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "/bin/sh", "-c", script]);
        self.node.bulkhead(&all)
    }

    /// A detached sandbox named `name`; panics unless it starts.
    fn detach(&self, name: &str, args: &[&str], script: &str) {
        let mut all = vec!["-d", "--name", name];
        all.extend_from_slice(args);
        let out = self.run(&all, script);
        assert!(out.status.success(), "run -d {name}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), name);
    }

    fn ps(&self) -> serde_json::Value {
        serde_json::from_str(&self.node.bulkhead_ok(&["ps", "--json"])).unwrap()
    }

    fn state(&self, name: &str) -> String {
        let ps = self.ps();
        ps.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["state"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    fn stats(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.node.bulkhead_ok(&["stats", name, "--json"])).unwrap()
    }

    fn record(&self, name: &str) -> serde_json::Value {
        let path = self
            .node
            .state_dir()
            .join("sandboxes")
            .join(name)
            .join("record.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Waits until `name` is no longer running.
    fn wait_exit(&self, name: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let state = self.state(name);
            if state != "running" || Instant::now() > deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// As [`Host::leftovers`] once the node is down: the datapath's maps are gone with it.
    fn leftovers_after_down(&self, record: &serde_json::Value) -> Vec<String> {
        let mut left = Vec::new();
        let name = record["name"].as_str().unwrap();
        if self.node.state_dir().join("sandboxes").join(name).exists() {
            left.push("state dir".into());
        }
        if self
            .node
            .state_dir()
            .join("leases")
            .join(record["addr"].as_str().unwrap())
            .exists()
        {
            left.push("lease".into());
        }
        if self
            .node
            .ns
            .ip(&["-o", "link"])
            .contains(record["host_if"].as_str().unwrap())
        {
            left.push("veth".into());
        }
        left.extend(
            cgroup_dirs(record)
                .into_iter()
                .filter(|d| d.exists())
                .map(|d| format!("cgroup {}", d.display())),
        );
        left
    }

    /// What a sandbox leaves on the machine, as (what, where) pairs; empty after `rm`.
    fn leftovers(&self, record: &serde_json::Value) -> Vec<String> {
        let mut left = Vec::new();
        let name = record["name"].as_str().unwrap();
        let state = self.node.state_dir().join("sandboxes").join(name);
        if state.exists() {
            left.push(format!("state dir {}", state.display()));
        }
        let lease = self
            .node
            .state_dir()
            .join("leases")
            .join(record["addr"].as_str().unwrap());
        if lease.exists() {
            left.push(format!("lease {}", lease.display()));
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if mounts.contains(state.to_str().unwrap()) {
            left.push("namespace bind mounts".into());
        }
        let host_if = record["host_if"].as_str().unwrap();
        if self.node.ns.ip(&["-o", "link"]).contains(host_if) {
            left.push(format!("veth {host_if}"));
        }
        for dir in cgroup_dirs(record) {
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        if self
            .node
            .bulkhead_ok(&["endpoint", "list", "--json"])
            .contains(&format!("\"{}\"", record["addr"].as_str().unwrap()))
        {
            left.push("endpoint".into());
        }
        left
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The directories of a sandbox's cgroup, from its record (v1: one per controller).
fn cgroup_dirs(record: &serde_json::Value) -> Vec<std::path::PathBuf> {
    let cg = &record["cgroup"];
    let path = cg["path"].as_str().unwrap();
    if cg["v2"].as_bool().unwrap() {
        return vec![Path::new("/sys/fs/cgroup").join(path)];
    }
    cg["parents"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(controller, parent)| {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(parent.as_str().unwrap().trim_start_matches('/'))
                .join(path)
        })
        .filter(|d| {
            d.parent()
                .is_some_and(|p| p.parent().is_some_and(Path::exists))
        })
        .collect()
}

/// One HTTP GET to busybox httpd, retried while it starts; the body.
fn http_get(from: &tests::Pod, to: SocketAddrV4) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = from.ns.run(move || -> std::io::Result<String> {
            let mut conn = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
            conn.set_read_timeout(Some(Duration::from_secs(3)))?;
            conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            Ok(response
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_owned())
        });
        match got {
            Ok(body) if !body.is_empty() => return body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("GET {to}: {other:?}"),
        }
    }
}

/// A sandbox command serving its own hostname over HTTP on `port`.
fn web(port: u16) -> String {
    format!(
        "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"
    )
}

#[test]
fn a_sandbox_sees_only_itself() {
    let Some(h) = Host::new("a_sandbox_sees_only_itself") else {
        return;
    };
    let out = h.run(
        &["--hostname", "inside"],
        "hostname; ls /sys/class/net | tr '\\n' ' '; echo; ps -o pid,args | tail -n +2; exit 7",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's status comes back: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("inside"), "{stdout}");
    assert_eq!(
        lines.next().map(str::trim),
        Some("eth0 lo"),
        "only lo and eth0: {stdout}"
    );
    let procs: Vec<&str> = lines.collect();
    assert!(
        procs[0].trim().starts_with("1 bulkhead-init -- /bin/sh -c"),
        "PID 1 is the init: {stdout}"
    );
    assert!(
        procs[1].trim().starts_with("2 /bin/sh -c"),
        "the command is its child: {stdout}"
    );
    assert!(
        procs.len() <= 4,
        "no process of the host is visible: {stdout}"
    );
    // Foreground runs remove themselves.
    assert_eq!(h.ps(), serde_json::json!([]));
}

#[test]
fn defaults_reduce_privileges_and_privileged_keeps_them() {
    let Some(h) = Host::new("defaults_reduce_privileges_and_privileged_keeps_them") else {
        return;
    };
    let script = "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status; touch /sys/x 2>&1; (echo 1 > /proc/sys/kernel/ns_last_pid) 2>&1; true";
    let out = text(&h.run(&[], script).stdout);
    assert!(
        out.contains("CapBnd:\t00000000a80425fb"),
        "docker's default capability set: {out}"
    );
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert_eq!(
        out.matches("Read-only file system").count(),
        2,
        "/sys and /proc/sys read-only: {out}"
    );
    let out = text(&h.run(&["--privileged"], script).stdout);
    assert!(
        !out.contains("a80425fb") && out.contains("NoNewPrivs:\t0"),
        "{out}"
    );
}

#[test]
fn exceeding_the_memory_limit_is_an_oom_kill_that_stats_shows() {
    let Some(h) = Host::new("exceeding_the_memory_limit_is_an_oom_kill_that_stats_shows") else {
        return;
    };
    h.detach(
        "hog",
        &["--memory", "32m"],
        "awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
    );
    let state = h.wait_exit("hog", Duration::from_secs(20));
    assert_eq!(state, "exited (137)", "killed by SIGKILL");
    let stats = h.stats("hog");
    assert!(stats["oom_kills"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["memory_limit_bytes"], 32 << 20, "{stats}");
    assert!(
        stats["memory_peak_bytes"].as_u64().unwrap() > 16 << 20,
        "{stats}"
    );
    h.node.bulkhead_ok(&["rm", "hog"]);
}

#[test]
fn the_pids_limit_stops_a_fork_bomb() {
    let Some(h) = Host::new("the_pids_limit_stops_a_fork_bomb") else {
        return;
    };
    h.detach(
        "bomb",
        &["--pids-limit", "20"],
        "i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; sleep 60",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let stats = h.stats("bomb");
    assert_eq!(stats["pids_limit"], 20, "{stats}");
    assert!(stats["pids"].as_u64().unwrap() <= 20, "{stats}");
    let logs = h.node.bulkhead_ok(&["logs", "bomb"]);
    assert!(logs.contains("fork"), "the shell was refused forks: {logs}");
    h.node.bulkhead_ok(&["rm", "--force", "bomb"]);
}

#[test]
fn a_cpu_limit_shows_throttling() {
    let Some(h) = Host::new("a_cpu_limit_shows_throttling") else {
        return;
    };
    h.detach("spin", &["--cpus", "0.2"], "while :; do :; done");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let stats = h.stats("spin");
    let wall = started.elapsed().as_secs_f64();
    let cpu = stats["cpu_usec"].as_u64().unwrap() as f64 / 1e6;
    assert!(stats["throttled_periods"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        cpu < 0.2 * wall * 1.5 + 0.05,
        "{cpu} s of cpu in {wall} s at 0.2 CPUs: {stats}"
    );
    h.node.bulkhead_ok(&["rm", "--force", "spin"]);
}

#[test]
fn sandboxes_reach_each_other_and_a_vip_balances_across_them() {
    let Some(mut h) = Host::new("sandboxes_reach_each_other_and_a_vip_balances_across_them") else {
        return;
    };
    for name in ["web1", "web2", "web3"] {
        h.detach(name, &["--hostname", name], &web(8080));
    }
    let addr = |name: &str| h.record(name)["addr"].as_str().unwrap().to_owned();
    // Sandbox to sandbox, over the bridge.
    let out = h.run(
        &[],
        &format!("wget -qO- http://{}:8080/index.html", addr("web2")),
    );
    assert_eq!(text(&out.stdout).trim(), "web2", "{}", text(&out.stderr));
    // A VIP whose backends are named by sandbox name.
    h.node.bulkhead_ok(&[
        "service",
        "add",
        "198.19.0.10:80",
        "-s",
        "rr",
        "-b",
        "web1:8080",
        "-b",
        "web2:8080",
        "-b",
        "web3:8080",
    ]);
    let web3 = addr("web3");
    h.node.add_pod(250);
    let client = h.node.pods.last().unwrap();
    let vip = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 10), 80);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *seen.entry(http_get(client, vip)).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["web1", "web2", "web3"],
        "{seen:?}"
    );
    let list = h.node.bulkhead_ok(&["service", "list"]);
    assert!(list.contains(&format!("{web3}:8080")), "{list}");
}

#[test]
fn exec_lands_in_the_sandboxs_namespaces_and_cgroup() {
    let Some(h) = Host::new("exec_lands_in_the_sandboxs_namespaces_and_cgroup") else {
        return;
    };
    h.detach(
        "target",
        &["--hostname", "target-host", "-e", "GREETING=hi"],
        "sleep 600",
    );
    let record = h.record("target");
    let pid = record["pid"].as_i64().unwrap();
    let out = h.node.bulkhead(&["exec", "target", "--", "/bin/sh", "-c", "hostname; echo $GREETING; for ns in net pid mnt uts ipc; do readlink /proc/self/ns/$ns; done; cat /proc/self/cgroup; ps -o pid,args | tail -n +2 | head -1; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("target-host"));
    assert_eq!(lines.next(), Some("hi"), "the sandbox's environment");
    for ns in ["net", "pid", "mnt", "uts", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_eq!(
            lines.next(),
            Some(theirs.to_str().unwrap()),
            "{ns} namespace"
        );
    }
    let rest: Vec<&str> = lines.collect();
    let cgroup = record["cgroup"]["path"].as_str().unwrap();
    assert!(
        rest.iter().any(|l| l.ends_with(cgroup)),
        "in the sandbox's cgroup: {stdout}"
    );
    assert!(
        rest.last().unwrap().trim().starts_with("1 bulkhead-init"),
        "sees the sandbox's processes: {stdout}"
    );
    let out = h
        .node
        .bulkhead(&["exec", "target", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    h.node.bulkhead_ok(&["rm", "--force", "target"]);
}

#[test]
fn stop_ends_within_the_grace_period() {
    let Some(h) = Host::new("stop_ends_within_the_grace_period") else {
        return;
    };
    h.detach(
        "polite",
        &[],
        "trap 'exit 0' TERM; while :; do sleep 1; done",
    );
    h.detach("stubborn", &[], "trap '' TERM; while :; do sleep 1; done");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(
        h.node.bulkhead_ok(&["stop", "-t", "5", "polite"]).trim(),
        "polite"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "polite took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let out = h.node.bulkhead_ok(&["stop", "-t", "1", "stubborn"]);
    let took = started.elapsed();
    assert!(out.contains("killed after the grace period"), "{out}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "stubborn took {took:?}"
    );
    assert_eq!(h.state("polite"), "exited (0)");
    assert_eq!(h.state("stubborn"), "exited (137)");
    // A stopped sandbox can be removed without --force; a running one cannot.
    h.detach("running", &[], "sleep 600");
    let out = h.node.bulkhead(&["rm", "running"]);
    assert!(
        text(&out.stderr).contains("is running"),
        "{}",
        text(&out.stderr)
    );
    h.node.bulkhead_ok(&["rm", "polite", "stubborn"]);
    h.node.bulkhead_ok(&["rm", "-f", "running"]);
}

#[test]
fn after_rm_nothing_is_left() {
    let Some(h) = Host::new("after_rm_nothing_is_left") else {
        return;
    };
    h.detach(
        "gone",
        &[
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--pids-limit",
            "50",
            "-p",
            "18080:8080",
        ],
        &web(8080),
    );
    let record = h.record("gone");
    let cgroups = cgroup_dirs(&record);
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|d| d.exists()),
        "{cgroups:?}"
    );
    // Beneath the cgroup this test runs in: nothing moved out of the delegated subtree.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    for dir in &cgroups {
        let rel = format!(
            "/{}",
            dir.strip_prefix("/sys/fs/cgroup")
                .unwrap()
                .to_string_lossy()
        );
        assert!(
            own.lines().any(|l| {
                let own_path = l.rsplit(':').next().unwrap().trim_end_matches('/');
                rel.contains(&format!("{own_path}/bulkhead/gone"))
            }),
            "{rel} is not beneath this process's cgroup:\n{own}"
        );
    }
    assert!(
        h.leftovers(&record).len() >= 5,
        "the sandbox should exist: {:?}",
        h.leftovers(&record)
    );
    h.node.bulkhead_ok(&["rm", "--force", "gone"]);
    assert_eq!(h.leftovers(&record), Vec::<String>::new());
    assert!(
        !h.node
            .bulkhead_ok(&["service", "list"])
            .contains("0.0.0.0:18080"),
        "the published port is gone"
    );
}

#[test]
fn a_published_port_reaches_the_sandbox_and_a_taken_one_is_refused() {
    let Some(mut h) = Host::new("a_published_port_reaches_the_sandbox_and_a_taken_one_is_refused")
    else {
        return;
    };
    h.detach(
        "pub",
        &["--hostname", "published", "-p", "18080:8080"],
        &web(8080),
    );
    h.node.add_pod(250);
    let client = h.node.pods.last().unwrap();
    assert_eq!(
        http_get(client, SocketAddrV4::new(h.node.gateway, 18080)),
        "published"
    );
    // Taken by another sandbox's publish...
    let out = h.run(&["-d", "--name", "second", "-p", "18080:80"], "sleep 60");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("address already in use by sandbox pub"),
        "{}",
        text(&out.stderr)
    );
    // ...or by a socket listening in the node's namespace.
    let listener = h
        .node
        .ns
        .run(|| TcpListener::bind("0.0.0.0:18081").unwrap());
    let out = h.run(&["-d", "--name", "third", "-p", "18081:80"], "sleep 60");
    assert!(
        text(&out.stderr).contains("address already in use by process"),
        "{}",
        text(&out.stderr)
    );
    drop(listener);
    assert!(
        h.ps().as_array().unwrap().len() == 1,
        "the refused runs left nothing: {}",
        h.ps()
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let Some(h) = Host::new("bad_input_gets_a_clear_error_and_leaves_nothing_behind") else {
        return;
    };
    h.detach("taken", &[], "sleep 600");
    let cases: [(&[&str], &str, &str, i32); 7] = [
        (&["--memory", "lots"], "true", "invalid memory size", 125),
        (&["--cpus", "0"], "true", "invalid cpus", 125),
        (
            &["--name", "../escape"],
            "true",
            "invalid sandbox name",
            125,
        ),
        (&["--name", "taken"], "true", "already exists", 125),
        (&["--publish", "80"], "true", "invalid publish", 125),
        (
            &["--ip", "203.0.113.5"],
            "true",
            "not in the pod subnet",
            125,
        ),
        (
            &["--rootfs", "/nonexistent/root"],
            "true",
            "is not a directory",
            125,
        ),
    ];
    for (args, script, message, code) in cases {
        let mut all = vec!["run"];
        if !args.contains(&"--rootfs") {
            all.extend_from_slice(&["--rootfs", h.root()]);
        }
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "/bin/sh", "-c", script]);
        let out = h.node.bulkhead(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(message),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = h
        .node
        .bulkhead(&["run", "--rootfs", h.root(), "--", "/no/such/command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("command not found: /no/such/command"),
        "{}",
        text(&out.stderr)
    );
    for cmd in [
        &["rm", "ghost"][..],
        &["stop", "ghost"],
        &["stats", "ghost"],
        &["logs", "ghost"],
        &["exec", "ghost", "--", "true"],
    ] {
        let out = h.node.bulkhead(cmd);
        assert!(
            text(&out.stderr).contains("no sandbox named ghost"),
            "{cmd:?}: {}",
            text(&out.stderr)
        );
    }
    // Only the first sandbox exists, with the only lease.
    let names: Vec<String> = h
        .ps()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["taken"]);
    let leases: Vec<_> = std::fs::read_dir(h.node.state_dir().join("leases"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(leases.len(), 1, "{leases:?}");
}

#[test]
fn a_user_namespace_maps_root_to_an_unprivileged_id() {
    let Some(h) = Host::new("a_user_namespace_maps_root_to_an_unprivileged_id") else {
        return;
    };
    let out = h.run(&["--userns"], "id -u; cat /proc/self/uid_map; ls /dev/null");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "0");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
}

#[test]
fn a_cgroup_namespace_hides_where_the_sandbox_sits() {
    let Some(h) = Host::new("a_cgroup_namespace_hides_where_the_sandbox_sits") else {
        return;
    };
    let script = "cat /proc/self/cgroup";
    let without = text(&h.run(&["--name", "plain"], script).stdout);
    assert!(
        without.contains("/bulkhead/plain"),
        "without it the path shows: {without}"
    );
    let with = text(&h.run(&["--name", "hidden", "--cgroupns"], script).stdout);
    assert!(
        !with.contains("bulkhead") && with.lines().any(|l| l.ends_with(":/")),
        "{with}"
    );
}

#[test]
fn a_foreground_run_forwards_signals_and_returns_the_status() {
    let Some(h) = Host::new("a_foreground_run_forwards_signals_and_returns_the_status") else {
        return;
    };
    let bin = tests::bulkhead_bin().unwrap();
    let mut cli = std::process::Command::new(bin)
        .arg("--netns")
        .arg(h.node.ns.path())
        .arg("--bpffs")
        .arg(h.node.bpffs().path())
        .arg("--state-dir")
        .arg(h.node.state_dir())
        .args([
            "run",
            "--name",
            "fg",
            "--rootfs",
            h.root(),
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg("trap 'exit 42' TERM; while :; do sleep 0.1; done")
        .envs(std::env::var_os("BULKHEAD_INIT_BIN").map(|init| ("BULKHEAD_INIT", init)))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.state("fg") != "running" {
        assert!(Instant::now() < deadline, "the sandbox never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = cli.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(42),
        "SIGTERM reached the command through the CLI and the init"
    );
    assert_eq!(
        h.ps(),
        serde_json::json!([]),
        "and the sandbox removed itself"
    );
}

#[test]
fn an_ended_runs_address_drains_with_its_veth_and_is_taken_again() {
    let Some(h) = Host::new("an_ended_runs_address_drains_with_its_veth_and_is_taken_again") else {
        return;
    };
    let leases = h.node.state_dir().join("leases");
    let held = || -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(&leases)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).unwrap_or_default(),
                )
            })
            .collect();
        v.sort();
        v
    };
    // A foreground run gives its address back without waiting for the kernel to take its
    // veth: the lease is gone, or marks the address as draining with the veth it waits for.
    let mut seen = Vec::new();
    for _ in 0..8 {
        let out = h.run(&[], "ip -4 -o addr show eth0 | grep -o 'inet [0-9.]*'");
        assert!(out.status.success(), "{}", text(&out.stderr));
        seen.push(
            text(&out.stdout)
                .trim()
                .trim_start_matches("inet ")
                .to_owned(),
        );
        for (addr, holder) in held() {
            let veth = holder.strip_prefix("drain:").unwrap_or_else(|| {
                panic!("lease {addr} is held by {holder:?} with no sandbox left")
            });
            assert!(veth.starts_with("bh"), "{addr}: {holder}");
        }
    }
    // A draining address is taken again once its veth is gone (never while the old pair is
    // still on the bridge): eight runs one after the other do not need eight addresses.
    let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert!(
        distinct.len() < seen.len(),
        "no address was taken again: {seen:?}"
    );
    // An address asked for by name waits for its veth to drain rather than failing.
    let first = seen[0].clone();
    for _ in 0..3 {
        let out = h.run(&["--ip", &first], "true");
        assert!(out.status.success(), "--ip {first}: {}", text(&out.stderr));
    }
    // `down` settles the draining leases: no lease and no veth outlive the node.
    h.node.bulkhead_ok(&["down"]);
    assert_eq!(held(), Vec::<(String, String)>::new());
    let links = h.node.ns.ip(&["-o", "link"]);
    assert!(!links.contains(": bh"), "{links}");
    h.node.bulkhead_ok(&[
        "up",
        "--bridge",
        &h.node.bridge,
        "--subnet",
        "198.18.0.1/24",
    ]);
}

#[test]
fn cgroup_parent_places_the_cgroup_and_down_removes_every_sandbox() {
    let Some(h) = Host::new("cgroup_parent_places_the_cgroup_and_down_removes_every_sandbox")
    else {
        return;
    };
    // A parent inside this process's own subtree (on v1, the memory hierarchy places it apart).
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let base = own
        .lines()
        .find_map(|l| {
            l.split(':')
                .nth(1)
                .filter(|c| *c == "memory")
                .and(l.rsplit(':').next())
        })
        .or_else(|| own.lines().find_map(|l| l.strip_prefix("0::")))
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let parent = format!("{base}/{}", tests::unique_name("bcg"));
    h.detach("placed", &["--cgroup-parent", &parent], "sleep 600");
    h.detach("other", &[], "sleep 600");
    let placed = h.record("placed");
    let dirs = cgroup_dirs(&placed);
    assert!(
        !dirs.is_empty()
            && dirs
                .iter()
                .all(|d| d.exists() && d.to_string_lossy().contains(&parent)),
        "{dirs:?}"
    );
    let records = [placed, h.record("other")];
    h.node.bulkhead_ok(&["down"]);
    for r in &records {
        assert_eq!(
            h.leftovers_after_down(r),
            Vec::<String>::new(),
            "{}",
            r["name"]
        );
    }
    // The parent and its `bulkhead` level were made for this test: remove them.
    for d in &dirs {
        let _ = std::fs::remove_dir(d.parent().unwrap());
        let _ = std::fs::remove_dir(d.parent().unwrap().parent().unwrap());
    }
}

/// The output of a sandbox run (stdout and stderr), asserting it ran.
fn ran(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout) + &text(&out.stderr)
}

#[test]
fn the_hosts_root_is_read_only_inside_and_volumes_are_shared() {
    let Some(h) = Host::new("the_hosts_root_is_read_only_inside_and_volumes_are_shared") else {
        return;
    };
    let tag = tests::unique_name("ro");
    // No --rootfs: the host's own root, which the sandbox must not be able to change.
    // Scratch space is writable where the root has the directory (the VM's has no /var/tmp).
    let script = format!(
        "for d in /etc /root /usr; do touch $d/{tag} 2>&1; done; \
         for d in /tmp /run /var/tmp; do [ -d $d ] || continue; touch $d/{tag} || exit 1; done \
         && echo scratch-writable"
    );
    let out = ran(&h.node.bulkhead(&["run", "--", "sh", "-c", &script]));
    assert_eq!(
        out.matches("Read-only file system").count(),
        3,
        "writes under /etc, /root and /usr must fail with EROFS: {out}"
    );
    assert!(out.contains("scratch-writable"), "{out}");
    for d in ["/etc", "/root", "/usr", "/tmp", "/run", "/var/tmp"] {
        assert!(
            !Path::new(d).join(&tag).exists(),
            "{d}/{tag} reached the host"
        );
    }

    // A volume is writable and seen on the host; `:ro` is not writable.
    let shared = TempDir::new("bhv");
    let vol = format!("{}:/data", shared.path().display());
    let out = ran(&h.run(&["-v", &vol], "echo from-sandbox > /data/f && cat /data/f"));
    assert!(out.contains("from-sandbox"), "{out}");
    assert_eq!(
        std::fs::read_to_string(shared.path().join("f")).unwrap(),
        "from-sandbox\n"
    );
    let ro = format!("{}:/data:ro", shared.path().display());
    let out = ran(&h.run(&["-v", &ro], "echo x > /data/g 2>&1; cat /data/f"));
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(!shared.path().join("g").exists());
    // --read-only makes a --rootfs read-only too, scratch space aside.
    let out = ran(&h.run(
        &["--read-only"],
        "touch /bin/x 2>&1; touch /tmp/x && echo tmp-ok",
    ));
    assert!(
        out.contains("Read-only file system") && out.contains("tmp-ok"),
        "{out}"
    );
}

#[test]
fn dockers_masked_and_read_only_paths_are_hidden() {
    let Some(h) = Host::new("dockers_masked_and_read_only_paths_are_hidden") else {
        return;
    };
    // Each masked file that this kernel has reads empty; each masked directory lists empty.
    let script = "for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do \
                    [ -e $p ] && echo \"file $p $(head -c 64 $p | wc -c)\"; done; \
                  for d in /proc/scsi /sys/firmware; do \
                    [ -d $d ] && echo \"dir $d $(ls -A $d | wc -l)\"; done; \
                  for p in /proc/bus /proc/fs /proc/irq /proc/sysrq-trigger; do \
                    [ -e $p ] && grep -q \" $p .*ro,\" /proc/self/mountinfo && echo \"ro $p\"; done; true";
    let masked = ran(&h.run(&[], script));
    let mut checked = 0;
    for line in masked.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["file" | "dir", path, n] => {
                assert_eq!(*n, "0", "{path} is not masked: {masked}");
                checked += 1;
            }
            ["ro", _] => checked += 1,
            _ => {}
        }
    }
    for p in ["/proc/bus", "/proc/fs", "/proc/irq"] {
        if Path::new(p).exists() {
            assert!(
                masked.contains(&format!("ro {p}")),
                "{p} is writable: {masked}"
            );
        }
    }
    assert!(
        checked >= 3,
        "too few masked paths exist to check: {masked}"
    );
    // --privileged keeps them as they are, as docker's does.
    let open = ran(&h.run(&["--privileged"], script));
    assert!(
        Path::new("/proc/timer_list").exists() == open.contains("file /proc/timer_list ")
            && !open.contains("file /proc/timer_list 0"),
        "{open}"
    );
}

#[test]
fn capabilities_user_and_ulimits_are_applied() {
    let Some(h) = Host::new("capabilities_user_and_ulimits_are_applied") else {
        return;
    };
    let out = ran(&h.run(
        &["--cap-add", "NET_ADMIN", "--cap-drop", "chown"],
        "grep CapBnd /proc/self/status",
    ));
    let bnd = u64::from_str_radix(out.split_whitespace().last().unwrap(), 16).unwrap();
    assert_ne!(bnd & (1 << 12), 0, "NET_ADMIN was not added: {out}");
    assert_eq!(bnd & 1, 0, "CHOWN was not dropped: {out}");
    let out = ran(&h.run(
        &["-u", "1000:1001", "--ulimit", "nofile=100:200"],
        "id -u; id -g; ulimit -n; ulimit -Hn; grep CapEff /proc/self/status",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], &["1000", "1001", "100", "200"], "{out}");
    assert!(
        lines[4].ends_with("0000000000000000"),
        "a user has no capabilities: {out}"
    );
}

#[test]
fn a_time_namespace_shifts_the_sandboxs_clocks() {
    let Some(h) = Host::new("a_time_namespace_shifts_the_sandboxs_clocks") else {
        return;
    };
    if !Path::new("/proc/self/ns/time").exists() {
        eprintln!(
            "SKIP a_time_namespace_shifts_the_sandboxs_clocks: no time namespaces (Linux 5.6)"
        );
        return;
    }
    let day = 86_400.0;
    let host_uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let out = ran(&h.run(
        &["--time-offset", "boottime=864000"],
        "cut -d' ' -f1 /proc/uptime; readlink /proc/self/ns/time",
    ));
    let mut lines = out.lines();
    let uptime: f64 = lines.next().unwrap().parse().unwrap();
    assert!(
        uptime - host_uptime > 10.0 * day - 60.0 && uptime - host_uptime < 10.0 * day + 60.0,
        "uptime {uptime} inside, {host_uptime} outside"
    );
    assert_ne!(
        lines.next().unwrap(),
        std::fs::read_link("/proc/self/ns/time")
            .unwrap()
            .to_str()
            .unwrap()
    );
}

#[test]
fn cpu_shares_and_memory_reservation_reach_the_cgroup() {
    let Some(h) = Host::new("cpu_shares_and_memory_reservation_reach_the_cgroup") else {
        return;
    };
    h.detach(
        "weights",
        &["--cpu-shares", "512", "--memory-reservation", "64m"],
        "sleep 30",
    );
    let record = h.record("weights");
    let files: Vec<String> = cgroup_dirs(&record)
        .iter()
        .flat_map(|d| {
            [
                "cpu.shares",
                "cpu.weight",
                "memory.soft_limit_in_bytes",
                "memory.low",
            ]
            .map(|f| d.join(f))
        })
        .filter(|f| f.exists())
        .map(|f| {
            format!(
                "{} {}",
                f.file_name().unwrap().to_string_lossy(),
                std::fs::read_to_string(&f).unwrap().trim()
            )
        })
        .collect();
    let all = files.join("\n");
    assert!(
        all.contains("cpu.shares 512") || all.contains("cpu.weight "),
        "{all}"
    );
    assert!(
        all.contains("memory.soft_limit_in_bytes 67108864") || all.contains("memory.low 67108864"),
        "{all}"
    );
    h.node.bulkhead_ok(&["rm", "-f", "weights"]);
}

#[test]
fn bad_hardening_options_are_refused_before_anything_is_made() {
    let Some(h) = Host::new("bad_hardening_options_are_refused_before_anything_is_made") else {
        return;
    };
    for (args, why) in [
        (vec!["-v", "/nonexistent-bulkhead:/data"], "does not exist"),
        (vec!["-v", "relative:/data"], "absolute"),
        (vec!["--cap-add", "CAP_FLY"], "capability"),
        (vec!["-u", "alice"], "UID[:GID]"),
        (vec!["--ulimit", "files=10"], "unknown limit"),
        (vec!["--ulimit", "nofile=20:10"], "exceeds the hard one"),
        (
            vec!["--time-offset", "boottime=99999999999"],
            "out of range",
        ),
        (vec!["--time-offset", "realtime=5"], "unknown clock"),
        (vec!["--cpu-shares", "1"], "2 to 262144"),
        (vec!["--device", "/etc/passwd"], "not a device node"),
        (vec!["--cpuset-cpus", "0-99"], "this machine has"),
        (vec!["--memory-swap", "64m"], "needs --memory"),
        (vec!["--blkio-weight", "5"], "10 to 1000"),
        (
            vec!["--device-read-bps", "/dev/null:1mb"],
            "not a block device",
        ),
        (vec!["--device", "/dev/null:/tmp/x"], "/dev/NAME"),
        (
            vec!["--security-opt", "apparmor=docker-default"],
            "AppArmor",
        ),
    ] {
        let out = h.run(&args, "true");
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(
        h.ps().as_array().unwrap().len(),
        0,
        "nothing was left behind"
    );
    assert!(
        !h.node.state_dir().join("leases").exists()
            || std::fs::read_dir(h.node.state_dir().join("leases"))
                .unwrap()
                .count()
                == 0
    );
}

/// What `bulkhead-syscall CALLS` prints inside a sandbox on the host's root, by call.
fn syscalls(h: &Host, args: &[&str], calls: &[&str]) -> std::collections::BTreeMap<String, String> {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--");
    // The test VM ships the helper elsewhere and says where.
    let helper = std::env::var("BULKHEAD_SYSCALL_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_bulkhead-syscall").to_owned());
    all.push(&helper);
    all.extend_from_slice(calls);
    let out = ran(&h.node.bulkhead(&all));
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_default_seccomp_filter_denies_what_dockers_denies() {
    let Some(h) = Host::new("the_default_seccomp_filter_denies_what_dockers_denies") else {
        return;
    };
    let calls = [
        "keyctl",
        "unshare-user",
        "mount",
        "reboot",
        "getpid",
        "uname",
    ];
    let eperm = format!("errno {}", libc::EPERM);
    let filtered = syscalls(&h, &[], &calls);
    for call in ["keyctl", "unshare-user", "mount", "reboot"] {
        assert_eq!(filtered[call], eperm, "{call}: {filtered:?}");
    }
    assert_eq!(filtered["getpid"], "ok");
    assert_eq!(filtered["uname"], "ok");
    // Ordinary programs are unaffected, and the filter shows.
    let out = ran(&h.node.bulkhead(&[
        "run",
        "--",
        "sh",
        "-c",
        "ls / | wc -l; grep -E '^Seccomp:' /proc/self/status",
    ]));
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // Unconfined: the keyring and user namespaces work, as they do outside.
    let open = syscalls(&h, &["--security-opt", "seccomp=unconfined"], &calls);
    assert_eq!(open["keyctl"], "ok", "{open:?}");
    assert_eq!(open["unshare-user"], "ok", "{open:?}");
    // A capability unlocks what docker gates on it: reboot reaches the kernel, which refuses
    // the invalid magic numbers with EINVAL.
    let boot = syscalls(&h, &["--cap-add", "SYS_BOOT"], &["reboot"]);
    assert_eq!(
        boot["reboot"],
        format!("errno {}", libc::EINVAL),
        "{boot:?}"
    );
}

#[test]
fn a_seccomp_profile_in_dockers_format_is_applied_and_bad_ones_refused() {
    let Some(h) = Host::new("a_seccomp_profile_in_dockers_format_is_applied_and_bad_ones_refused")
    else {
        return;
    };
    let dir = TempDir::new("bhp");
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                        {"names":["umount"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let out = syscalls(&h, &["--security-opt", &opt], &["uname", "keyctl"]);
    assert_eq!(out["uname"], "errno 13", "{out:?}");
    assert_eq!(out["keyctl"], "ok", "the profile allows the rest: {out:?}");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["frobnicate"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    let bad = h
        .node
        .bulkhead(&["run", "--security-opt", &opt, "--", "true"]);
    assert_eq!(bad.status.code(), Some(125));
    assert!(
        text(&bad.stderr).contains("unknown syscall \"frobnicate\""),
        "{}",
        text(&bad.stderr)
    );
    assert_eq!(h.ps().as_array().unwrap().len(), 0);
}

/// A block device a test may read: a loop device over a 4 MiB file of the test's own, or, where
/// loop devices are not to be had, a RAM disk (the test VM loads brd). The loop device is
/// detached on drop. No disk of the machine is ever used.
struct BlockDevice {
    /// Its name under /dev.
    name: String,
    /// `MAJOR:MINOR`.
    numbers: String,
    looped: bool,
    _backing: Option<TempDir>,
}

impl BlockDevice {
    fn new() -> Option<Self> {
        Self::looped().or_else(Self::ram_disk)
    }

    fn looped() -> Option<Self> {
        let dir = TempDir::new("bhb");
        let file = dir.path().join("disk");
        std::fs::write(&file, vec![7u8; 4 << 20]).ok()?;
        // `losetup -f` then `losetup DEV FILE`: what util-linux's and busybox's (the VM's)
        // losetup both take.
        let out = tests::command("losetup").arg("-f").output().ok()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let name = path.strip_prefix("/dev/")?.to_owned();
        let attached = tests::command("losetup")
            .arg(&path)
            .arg(&file)
            .status()
            .ok()?;
        if !attached.success() {
            return None;
        }
        let numbers = std::fs::read_to_string(format!("/sys/class/block/{name}/dev")).ok()?;
        Some(BlockDevice {
            name,
            numbers: numbers.trim().to_owned(),
            looped: true,
            _backing: Some(dir),
        })
    }

    fn ram_disk() -> Option<Self> {
        std::fs::read_dir("/sys/dev/block")
            .ok()?
            .flatten()
            .find_map(|e| {
                let uevent = std::fs::read_to_string(e.path().join("uevent")).ok()?;
                let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
                name.starts_with("ram").then(|| BlockDevice {
                    name: name.to_owned(),
                    numbers: e.file_name().to_string_lossy().into_owned(),
                    looped: false,
                    _backing: None,
                })
            })
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        if self.looped {
            let _ = tests::command("losetup")
                .args(["--detach", &format!("/dev/{}", self.name)])
                .output();
        }
    }
}

#[test]
fn devices_outside_dockers_list_cannot_be_opened() {
    let Some(h) = Host::new("devices_outside_dockers_list_cannot_be_opened") else {
        return;
    };
    let Some(disk) = BlockDevice::new() else {
        eprintln!("SKIP devices_outside_dockers_list_cannot_be_opened: no loop device or RAM disk");
        return;
    };
    let (name, numbers) = (&disk.name, &disk.numbers);
    let (major, minor) = numbers.split_once(':').unwrap();
    let script = format!(
        "mknod /dev/blk b {major} {minor} && echo made; \
         head -c 1 /dev/blk > /dev/null 2>/tmp/err && echo read || cat /tmp/err; \
         echo x > /dev/null && head -c 1 /dev/zero | wc -c"
    );
    let out = ran(&h.run(&[], &script));
    assert!(
        out.contains("made"),
        "mknod is allowed, as docker allows it: {out}"
    );
    assert!(
        !out.contains("read") && out.contains("Operation not permitted"),
        "the disk {name} ({numbers}) was readable: {out}"
    );
    assert!(out.trim_end().ends_with('1'), "default devices work: {out}");
    // --device grants it (read only here), under its own name.
    let host = format!("/dev/{name}:r");
    let out = ran(&h.run(
        &["--device", &host],
        &format!("head -c 1 /dev/{name} | wc -c; echo x > /dev/{name} 2>&1; true"),
    ));
    assert!(out.starts_with('1'), "{out}");
    assert!(
        out.contains("Operation not permitted"),
        "write was allowed: {out}"
    );
    // --privileged has no device control, as docker's.
    let out = ran(&h.run(&["--privileged"], &script));
    assert!(out.contains("read"), "{out}");
}

#[test]
fn cpuset_io_and_swap_limits_reach_the_cgroup_and_stats() {
    let Some(h) = Host::new("cpuset_io_and_swap_limits_reach_the_cgroup_and_stats") else {
        return;
    };
    let Some(disk) = BlockDevice::new() else {
        eprintln!(
            "SKIP cpuset_io_and_swap_limits_reach_the_cgroup_and_stats: no loop device or RAM disk"
        );
        return;
    };
    let (name, numbers) = (&disk.name, &disk.numbers);
    let dev = format!("/dev/{name}");
    let out = ran(&h.run(
        &["--cpuset-cpus", "0"],
        "grep Cpus_allowed_list /proc/self/status",
    ));
    assert!(out.trim().ends_with("\t0"), "{out}");
    h.detach(
        "placed",
        &[
            "--cpuset-cpus",
            "0",
            "--memory",
            "64m",
            "--memory-swap",
            "96m",
            "--device-read-bps",
            &format!("{dev}:1mb"),
            "--device-write-bps",
            &format!("{dev}:2mb"),
            "--device",
            &format!("{dev}:r"),
        ],
        // 64 KiB at 2 MiB: pages no one has read, so the read reaches the device (and its
        // cgroup's I/O accounting) instead of the page cache.
        &format!("dd if={dev} of=/dev/null bs=65536 skip=32 count=1 2>/dev/null; sleep 30"),
    );
    let record = h.record("placed");
    let mut files = String::new();
    for dir in cgroup_dirs(&record) {
        for f in [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
            "io.max",
            "memory.memsw.limit_in_bytes",
            "memory.swap.max",
        ] {
            if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
                files.push_str(&format!("{f}: {}\n", text.trim()));
            }
        }
    }
    let v2 = record["cgroup"]["v2"].as_bool().unwrap();
    if v2 {
        assert!(
            files.contains(&format!("io.max: {numbers} rbps=1048576 wbps=2097152")),
            "{files}"
        );
        assert!(files.contains("memory.swap.max: 33554432"), "{files}");
    } else {
        assert!(
            files.contains(&format!("read_bps_device: {numbers} 1048576")),
            "{files}"
        );
        assert!(
            files.contains(&format!("write_bps_device: {numbers} 2097152")),
            "{files}"
        );
        // Swap accounting may be off in this kernel; when the file is there it holds the total.
        if files.contains("memsw") {
            assert!(
                files.contains("memory.memsw.limit_in_bytes: 100663296"),
                "{files}"
            );
        }
    }
    // stats shows where it runs and what it read.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = h.stats("placed");
        assert_eq!(stats["cpuset_cpus"], "0", "{stats}");
        if stats["io_read_bytes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no io read bytes counted: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    h.node.bulkhead_ok(&["rm", "-f", "placed"]);
}

#[test]
fn an_apparmor_profile_confines_the_sandbox_where_the_kernel_has_apparmor() {
    let Some(h) =
        Host::new("an_apparmor_profile_confines_the_sandbox_where_the_kernel_has_apparmor")
    else {
        return;
    };
    if !bulkhead::sandbox::apparmor::enabled() {
        // Asking for a profile is refused with the reason, nothing made.
        let out = h.run(&["--security-opt", "apparmor=bulkhead-default"], "true");
        assert_eq!(out.status.code(), Some(125));
        assert!(
            text(&out.stderr).contains("AppArmor is not enabled in this kernel"),
            "{}",
            text(&out.stderr)
        );
        eprintln!(
            "SKIP an_apparmor_profile_confines_the_sandbox_where_the_kernel_has_apparmor: \
             this kernel has no AppArmor (the refusal was checked)"
        );
        return;
    }
    let out = ran(&h.run(&[], "cat /proc/self/attr/current"));
    assert!(out.contains("bulkhead-default (enforce)"), "{out}");
    let out = h.run(&["--security-opt", "apparmor=no-such-profile"], "true");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("no such profile"),
        "{}",
        text(&out.stderr)
    );
}
