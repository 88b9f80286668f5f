//! A node's state under concurrent writers, per-namespace defaults, the `ip netns exec` trap,
//! and sandboxes started from a parent with ignored signals.

use std::{
    collections::BTreeSet,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
};

use bulkhead::loader::ServiceMaps;
use dataplane_common::backend_state;
use tests::{IP, Netns, Node, bulkhead_bin, busybox_rootfs, skip};

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn finish(children: Vec<(String, Child)>) {
    for (what, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{what} failed: {}", text(&out));
    }
}

/// Every live selection slot of every service points at a backend of that same service, as
/// the datapath reads them.
pub(crate) fn slots_belong_to_their_services(bpffs: &Path) {
    let maps = ServiceMaps::open(bpffs).expect("open the pinned maps");
    for item in &maps.services {
        let (key, service) = item.unwrap();
        for slot in 0..service.table_len {
            let slot_key = dataplane_common::SlotKey {
                service_id: service.id,
                generation: service.generation,
                slot,
            };
            let backend_id = maps
                .slots
                .get(&slot_key, 0)
                .unwrap_or_else(|e| panic!("service {key:?}: slot {slot} missing: {e}"));
            let backend = maps.backends.get(&backend_id, 0).unwrap();
            assert_eq!(
                backend.service_id, service.id,
                "service {key:?}: slot {slot} points at backend {backend_id} of service {}",
                backend.service_id
            );
            assert_eq!(backend.state, backend_state::ACTIVE);
        }
    }
}

#[test]
fn parallel_writers_leave_exactly_the_intended_table() {
    if skip("parallel_writers_leave_exactly_the_intended_table") {
        return;
    }
    let node = Node::new();
    let shared = "198.21.1.1:80";
    node.bulkhead_ok(&["service", "add", &format!("{shared}/tcp"), "-s", "rr"]);
    let mut expected: BTreeSet<String> = BTreeSet::new();
    expected.insert(format!("-A -t {shared} -s rr"));
    let mut children = Vec::new();
    let spawn = |what: String, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = node.command(&args);
        cmd.stdout(std::process::Stdio::piped());
        (what, cmd.spawn().unwrap())
    };
    for i in 1..=32u8 {
        let vip = format!("198.21.0.{i}:80");
        let backends: Vec<String> = (1..=3)
            .map(|b| format!("198.18.{}.{b}:80{i:02}", 100 + i))
            .collect();
        let mut args = vec!["service".into(), "add".into(), format!("{vip}/tcp")];
        for b in &backends {
            args.extend(["--backend".into(), b.clone()]);
            expected.insert(format!("-a -t {vip} -r {b} -m -w 1"));
        }
        expected.insert(format!("-A -t {vip} -s hash"));
        children.push(spawn(format!("service add {vip}"), args));
    }
    for j in 1..=8u8 {
        let backend = format!("198.18.200.{j}:8080");
        expected.insert(format!("-a -t {shared} -r {backend} -m -w {j}"));
        children.push(spawn(
            format!("backend add {backend}"),
            vec![
                "backend".into(),
                "add".into(),
                format!("{shared}/tcp"),
                format!("{backend}@{j}"),
            ],
        ));
    }
    // Sandboxes on the host's root: they only sleep.
    for k in 1..=8 {
        children.push(spawn(
            format!("run -d sb{k}"),
            [
                "run",
                "-d",
                "--name",
                &format!("sb{k}"),
                "--",
                "sleep",
                "60",
            ]
            .map(String::from)
            .to_vec(),
        ));
    }
    finish(children);

    let saved: BTreeSet<String> = node
        .bulkhead_ok(&["service", "save"])
        .lines()
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = expected.difference(&saved).collect();
    let extra: Vec<_> = saved.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:#?}\nunexpected {extra:#?}"
    );
    slots_belong_to_their_services(node.bpffs().path());

    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(node.state_dir().join("node.json")).unwrap())
            .unwrap();
    let attached: BTreeSet<&str> = record["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let ps: serde_json::Value = serde_json::from_str(&node.bulkhead_ok(&["ps", "--json"])).unwrap();
    assert_eq!(
        ps.as_array().unwrap().len(),
        8,
        "ps lists every sandbox: {ps}"
    );
    let mut addrs = BTreeSet::new();
    for k in 1..=8 {
        let sandbox: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                node.state_dir()
                    .join("sandboxes")
                    .join(format!("sb{k}"))
                    .join("record.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let host_if = sandbox["host_if"].as_str().unwrap();
        assert!(
            attached.contains(host_if),
            "sb{k}'s veth {host_if} is not in node.json's attached list {attached:?}"
        );
        assert!(
            node.ns
                .ip(&["-o", "link", "show", host_if])
                .contains("master"),
            "sb{k}'s veth {host_if} is not on the bridge"
        );
        // A pod's veth carries the datapath on both hooks (cls_bpf: see `node::attach_pod`).
        for hook in ["ingress", "egress"] {
            let filters = tests::run_ok(
                "tc",
                &["-n", node.ns.name(), "filter", "show", "dev", host_if, hook],
            );
            assert!(
                filters.contains("bulkhead_") && filters.contains("direct-action"),
                "sb{k}'s veth {host_if} has no datapath program at {hook}:\n{filters}"
            );
        }
        assert!(addrs.insert(sandbox["addr"].as_str().unwrap().to_owned()));
    }
    node.bulkhead_ok(&[
        "rm", "-f", "sb1", "sb2", "sb3", "sb4", "sb5", "sb6", "sb7", "sb8",
    ]);
}

#[test]
fn a_waiting_writer_names_the_holder_and_lock_timeout_bounds_the_wait() {
    if skip("a_waiting_writer_names_the_holder_and_lock_timeout_bounds_the_wait") {
        return;
    }
    let node = Node::new();
    // Hold the node's lock the way another bulkhead would: flock(1) on the same file.
    let lock = node.state_dir().join("lock");
    let mut holder = tests::command("flock")
        .arg("--exclusive")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .contains(&format!(" {} ", holder.id()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    let out = node.bulkhead(&[
        "--lock-timeout",
        "1.5",
        "service",
        "add",
        "198.21.2.1:80/tcp",
        "--backend",
        "198.18.0.2:80",
    ]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains("waiting for the node lock")
            && stderr.contains(&format!("pid {} (flock", holder.id())),
        "the waiting message does not name the holder: {stderr}"
    );
    assert!(stderr.contains("--lock-timeout"), "{stderr}");
    assert!(took >= std::time::Duration::from_millis(1400), "{took:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(
        node.bulkhead_ok(&["service", "save"]),
        "",
        "nothing was applied"
    );
    node.bulkhead_ok(&["service", "add", "198.21.2.1:80/tcp"]);
}

/// `bulkhead ARGS` with no --bpffs or --state-dir, and no environment naming them.
fn bare(args: &[&str]) -> Command {
    let mut cmd = tests::command(bulkhead_bin().unwrap());
    cmd.args(args)
        .env_remove("BULKHEAD_BPFFS")
        .env_remove("BULKHEAD_STATE_DIR");
    cmd
}

fn ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Takes the node with default directories of namespace NAME down, even when the test fails
/// half way, and removes its state directory (`down` keeps the lock file there: removing it
/// would let a waiter and a newcomer lock two different files).
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = bare(&["--netns", &self.0, "down"]).output();
        let _ = std::fs::remove_dir_all(Path::new("/run/bulkhead/netns").join(&self.0));
    }
}

#[test]
fn two_nodes_with_default_dirs_keep_their_own_state() {
    if skip("two_nodes_with_default_dirs_keep_their_own_state") {
        return;
    }
    let (a, b) = (Netns::new("bha"), Netns::new("bhb"));
    let mut guards = Vec::new();
    for (ns, vip) in [(&a, "198.21.3.1:80/tcp"), (&b, "198.21.3.2:80/tcp")] {
        guards.push(DownOnDrop(ns.name().to_owned()));
        ok(bare(&[
            "--netns",
            ns.name(),
            "up",
            "--bridge",
            "br0",
            "--subnet",
            "198.18.0.1/24",
        ]));
        ok(bare(&["--netns", ns.name(), "service", "add", vip]));
    }
    for (ns, vip) in [(&a, "198.21.3.1:80"), (&b, "198.21.3.2:80")] {
        // By name or by path: the same namespace, the same node.
        let by_path = ns.path();
        for netns in [ns.name(), by_path.to_str().unwrap()] {
            let saved = ok(bare(&["--netns", netns, "service", "save"]));
            assert_eq!(saved, format!("-A -t {vip} -s hash\n"), "node in {netns}");
        }
        let state = PathBuf::from("/run/bulkhead/netns").join(ns.name());
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("node.json")).unwrap())
                .unwrap();
        assert_eq!(record["netns"]["name"], ns.name());
        assert!(
            Path::new("/sys/fs/bpf/bulkhead/netns")
                .join(ns.name())
                .join("SERVICES")
                .exists()
        );
    }
    // A record that belongs to another namespace is refused by name.
    let a_state = format!("/run/bulkhead/netns/{}", a.name());
    let a_pins = format!("/sys/fs/bpf/bulkhead/netns/{}", a.name());
    let out = bare(&[
        "--netns",
        b.name(),
        "--state-dir",
        &a_state,
        "--bpffs",
        &a_pins,
        "service",
        "add",
        "198.21.3.9:80/tcp",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains(&format!("belongs to network namespace {}", a.name())),
        "{stderr}"
    );
    assert_eq!(
        ok(bare(&["--netns", a.name(), "service", "save"])),
        "-A -t 198.21.3.1:80 -s hash\n"
    );
    drop(guards);
    for ns in [&a, &b] {
        let state = Path::new("/run/bulkhead/netns").join(ns.name());
        assert!(!state.join("node.json").exists());
        assert!(
            !Path::new("/sys/fs/bpf/bulkhead/netns")
                .join(ns.name())
                .exists()
        );
        // `down` keeps the lock file (removing it would let a waiter and a newcomer lock two
        // different files); the test removes its directory.
        let _ = std::fs::remove_dir_all(state);
    }
}

#[test]
fn ip_netns_exec_pins_where_the_next_command_finds_them() {
    if skip("ip_netns_exec_pins_where_the_next_command_finds_them") {
        return;
    }
    let ns = Netns::new("bhx");
    let _down = DownOnDrop(ns.name().to_owned());
    let exec = |args: &[&str]| {
        let mut cmd = tests::command(IP);
        cmd.args(["netns", "exec", ns.name()])
            .arg(bulkhead_bin().unwrap())
            .args(args)
            .env_remove("BULKHEAD_BPFFS")
            .env_remove("BULKHEAD_STATE_DIR");
        cmd
    };
    ok(exec(&[
        "up",
        "--bridge",
        "br0",
        "--subnet",
        "198.18.0.1/24",
    ]));
    ok(exec(&[
        "service",
        "add",
        "198.21.4.1:80/tcp",
        "--backend",
        "198.18.0.2:80",
    ]));
    let expected = "-A -t 198.21.4.1:80 -s hash\n-a -t 198.21.4.1:80 -r 198.18.0.2:80 -m -w 1\n";
    assert_eq!(ok(exec(&["service", "save"])), expected);
    // The same node as `bulkhead --netns` sees it.
    assert_eq!(
        ok(bare(&["--netns", ns.name(), "service", "save"])),
        expected
    );
    ok(exec(&["down"]));
}

/// The signal dispositions and mask of a process, from /proc/PID/status.
fn signal_masks(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or_else(
                || panic!("no {name} in {status}"),
                |v| u64::from_str_radix(v.trim(), 16).unwrap(),
            )
    };
    (field("SigIgn:"), field("SigBlk:"))
}

#[test]
fn sandboxes_start_with_default_signals_whatever_bulkhead_inherited() {
    if skip("sandboxes_start_with_default_signals_whatever_bulkhead_inherited") {
        return;
    }
    let Some(rootfs) = busybox_rootfs() else {
        eprintln!(
            "SKIP sandboxes_start_with_default_signals_whatever_bulkhead_inherited: no busybox"
        );
        return;
    };
    let node = Node::new();
    // Started as nohup and a background job would start it, with SIGUSR1 blocked too.
    let status_of = |file: &str| {
        let mut cmd = node.command(&[
            "run",
            "--rootfs",
            rootfs.path().to_str().unwrap(),
            "--",
            "/bin/cat",
            file,
        ]);
        // SAFETY: only signal(2) and sigprocmask(2) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGPIPE] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&raw mut set);
                libc::sigaddset(&raw mut set, libc::SIGUSR1);
                libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bit = |sig: i32| 1u64 << (sig - 1);
    let inherited = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGPIPE]
        .iter()
        .fold(0, |m, &s| m | bit(s));
    let (init_ignored, _) = signal_masks(&status_of("/proc/1/status"));
    assert_eq!(
        init_ignored & inherited,
        0,
        "bulkhead-init inherited ignored signals: SigIgn {init_ignored:x}"
    );
    let (ignored, blocked) = signal_masks(&status_of("/proc/self/status"));
    assert_eq!(ignored, 0, "the program has ignored signals: {ignored:x}");
    assert_eq!(blocked, 0, "the program has blocked signals: {blocked:x}");
}

#[test]
fn default_dirs_follow_the_namespace() {
    // Pure path logic, no root needed.
    use bulkhead::node::Paths;
    let here = Paths::resolve(None, None, false).unwrap();
    if here.netns.name.is_none() {
        assert_eq!(here.bpffs, Path::new("/sys/fs/bpf/bulkhead"));
        assert_eq!(here.state_dir, Path::new("/run/bulkhead"));
    }
    let entered = Paths::resolve(None, None, true).unwrap();
    let tail = Path::new("netns").join(entered.netns.dir_name());
    assert_eq!(entered.bpffs, Path::new("/sys/fs/bpf/bulkhead").join(&tail));
    assert_eq!(entered.state_dir, Path::new("/run/bulkhead").join(&tail));
    let explicit = Paths::resolve(Some("/x".into()), Some("/y".into()), true).unwrap();
    assert_eq!(
        (explicit.bpffs, explicit.state_dir),
        (PathBuf::from("/x"), PathBuf::from("/y"))
    );
}
