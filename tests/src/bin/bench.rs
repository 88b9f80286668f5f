//! `bulkhead-bench datapath`: the load generator, the servers and the topology of
//! `cargo xtask bench datapath`.
//!
//! For every mode and service count it builds a fresh node (client pod, three backend pods),
//! installs N services the mode's way, and measures install time, closed-loop connection rate
//! and request latency on persistent connections against the last service installed. Every
//! figure is also given as a ratio to `direct` (the client talking to the backends with no
//! balancer) from the same run. Results go to OUT/datapath.{md,json,svg}.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{Netns, Node, Pod};

const PORT: u16 = 8080;
/// Longest an install may take before its row is abandoned.
const INSTALL_BUDGET: Duration = Duration::from_mins(5);
const REQUEST: usize = 64;
/// First request byte: close after the reply (connection-rate phase) or keep the connection.
const CLOSE: u8 = b'C';
const KEEP: u8 = b'K';

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    Bulkhead,
    /// Bulkhead with the stack bypass turned off: every translated packet goes through the
    /// bridge and the node's routing, as before the bypass existed.
    BulkheadNoBypass,
    Iptables,
    Nftables,
    Ipvs,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Bulkhead => "bulkhead",
            Mode::BulkheadNoBypass => "bulkhead-nobypass",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
        }
    }
}

struct Args {
    services: Vec<usize>,
    seconds: f64,
    concurrency: usize,
    modes: Vec<Mode>,
    out: PathBuf,
    install_budget: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        services: vec![1, 1000, 10_000, 100_000],
        seconds: 5.0,
        concurrency: 8,
        modes: vec![
            Mode::Direct,
            Mode::Bulkhead,
            Mode::BulkheadNoBypass,
            Mode::Iptables,
            Mode::Nftables,
        ],
        out: PathBuf::from("target/bench"),
        install_budget: Duration::from_mins(5),
    };
    let mut it = std::env::args().skip(1);
    if it.next().as_deref() != Some("datapath") {
        return Err("usage: bulkhead-bench datapath [--services 1,1000] [--seconds T] [--concurrency C] [--modes direct,bulkhead,iptables,nftables] [--out DIR]".into());
    }
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--services" => {
                args.services = value
                    .split(',')
                    .map(|v| v.parse().map_err(|_| format!("bad count {v}")))
                    .collect::<Result<_, _>>()?;
            }
            "--seconds" => args.seconds = value.parse().map_err(|_| "bad --seconds")?,
            "--concurrency" => args.concurrency = value.parse().map_err(|_| "bad --concurrency")?,
            "--install-budget" => {
                args.install_budget =
                    Duration::from_secs(value.parse().map_err(|_| "bad --install-budget")?);
            }
            "--out" => args.out = PathBuf::from(value),
            "--modes" => {
                args.modes = value
                    .split(',')
                    .map(|m| match m {
                        "direct" => Ok(Mode::Direct),
                        "bulkhead" => Ok(Mode::Bulkhead),
                        "bulkhead-nobypass" => Ok(Mode::BulkheadNoBypass),
                        "iptables" => Ok(Mode::Iptables),
                        "nftables" => Ok(Mode::Nftables),
                        "ipvs" => Ok(Mode::Ipvs),
                        other => Err(format!("unknown mode {other}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The i-th virtual address: 65,536 addresses in 198.19.0.0/16, then the next port.
fn vip(i: usize) -> SocketAddrV4 {
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    SocketAddrV4::new(
        Ipv4Addr::from(base + (i % 65_536) as u32),
        80 + (i / 65_536) as u16,
    )
}

// ---------------------------------------------------------------------------------------------
// Servers and clients.

/// One backend's server: threads blocked in accept on one listener, each serving a connection
/// until the client is done (or, for `C` requests, after one reply: the server closes first,
/// so `TIME_WAIT` lands on the backend and client ports are never reused into it).
fn serve(
    pod: &Pod,
    id: u8,
    stop: Arc<AtomicBool>,
) -> (Arc<TcpListener>, Vec<std::thread::JoinHandle<()>>) {
    let me = SocketAddrV4::new(pod.addr, PORT);
    let listener = pod
        .ns
        .run(move || TcpListener::bind(me).expect("bind the bench server"));
    let listener = Arc::new(listener);
    let threads = (0..24)
        .map(|_| {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        continue;
                    };
                    let _ = conn.set_nodelay(true);
                    let mut req = [0u8; REQUEST];
                    let mut reply = [0u8; REQUEST];
                    reply[0] = id;
                    while conn.read_exact(&mut req).is_ok() {
                        if conn.write_all(&reply).is_err() || req[0] == CLOSE {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    (listener, threads)
}

/// Stops the servers: `shutdown` on a listening socket wakes every thread blocked in accept.
fn stop_servers(
    listeners: &[Arc<TcpListener>],
    stop: &AtomicBool,
    threads: Vec<std::thread::JoinHandle<()>>,
) {
    use std::os::fd::AsRawFd;
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        // SAFETY: shutdown on a socket we own; it stays open until the Arc drops.
        unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
    }
    for t in threads {
        drop(t.join());
    }
}

#[derive(Default)]
struct LoadResult {
    ok: u64,
    errors: u64,
    spread: BTreeMap<u8, u64>,
    latencies_us: Vec<u32>,
}

/// Runs `concurrency` client threads in `client` against `targets(thread, n)` for `seconds`.
fn load(
    client: &Netns,
    concurrency: usize,
    seconds: f64,
    keep: bool,
    targets: Arc<dyn Fn(usize, u64) -> SocketAddrV4 + Send + Sync>,
) -> LoadResult {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..concurrency)
        .map(|t| {
            let path = client.path();
            let targets = targets.clone();
            std::thread::spawn(move || {
                let ns = fs::File::open(path).expect("open the client namespace");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the client namespace");
                let mut r = LoadResult::default();
                let mut req = [0u8; REQUEST];
                req[0] = if keep { KEEP } else { CLOSE };
                let mut reply = [0u8; REQUEST];
                let mut n = 0u64;
                let connect = |n: u64| -> Option<TcpStream> {
                    let s =
                        TcpStream::connect_timeout(&targets(t, n).into(), Duration::from_secs(3))
                            .ok()?;
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                    Some(s)
                };
                let mut conn = None;
                while Instant::now() < deadline {
                    if conn.is_none() {
                        conn = connect(n);
                        n += 1;
                        if conn.is_none() {
                            r.errors += 1;
                            continue;
                        }
                    }
                    let s = conn.as_mut().unwrap();
                    let started = Instant::now();
                    if s.write_all(&req).is_err() || s.read_exact(&mut reply).is_err() {
                        r.errors += 1;
                        conn = None;
                        continue;
                    }
                    if keep {
                        r.latencies_us
                            .push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    } else {
                        conn = None;
                    }
                    r.ok += 1;
                    *r.spread.entry(reply[0]).or_insert(0) += 1;
                }
                r
            })
        })
        .collect();
    let mut total = LoadResult::default();
    for h in handles {
        let r = h.join().expect("client thread");
        total.ok += r.ok;
        total.errors += r.errors;
        for (k, v) in r.spread {
            *total.spread.entry(k).or_insert(0) += v;
        }
        total.latencies_us.extend(r.latencies_us);
    }
    total
}

/// TCP retransmission counters of the namespace (`TcpRetransSegs`, `TCPSynRetrans`).
fn retransmits(ns: &Netns) -> (u64, u64) {
    ns.run(|| {
        let field = |file: &str, table: &str, name: &str| -> u64 {
            let text =
                fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(table)).collect();
            if lines.len() < 2 {
                return 0;
            }
            let names: Vec<&str> = lines[0].split_whitespace().collect();
            let values: Vec<&str> = lines[1].split_whitespace().collect();
            names
                .iter()
                .position(|n| *n == name)
                .and_then(|i| values.get(i)?.parse().ok())
                .unwrap_or(0)
        };
        (
            field("snmp", "Tcp:", "RetransSegs"),
            field("netstat", "TcpExt:", "TCPSynRetrans"),
        )
    })
}

/// Waits (up to 10 s) until the machine is idle: less than 10% of CPU time busy over 200 ms.
fn wait_idle() {
    let busy = || -> (u64, u64) {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        (cpu.iter().sum::<u64>() - idle, cpu.iter().sum())
    };
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let (b0, t0) = busy();
        std::thread::sleep(Duration::from_millis(200));
        let (b1, t1) = busy();
        if t1 > t0 && (b1 - b0) * 10 < (t1 - t0) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Installing N services each mode's way.

fn backends(node: &Node) -> Vec<SocketAddrV4> {
    node.pods[1..]
        .iter()
        .map(|p| SocketAddrV4::new(p.addr, PORT))
        .collect()
}

fn run_stdin(node_ns: Option<&Netns>, program: &[&str], input: &str) -> Result<(), String> {
    let mut cmd = if let Some(ns) = node_ns {
        let mut c = Command::new(tests::IP);
        c.args(["netns", "exec", ns.name()]).args(program);
        c
    } else {
        let mut c = Command::new(program[0]);
        c.args(&program[1..]);
        c
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program:?}: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    // An install that runs past the budget is abandoned: the row says so instead of hanging.
    let until = Instant::now() + INSTALL_BUDGET;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{program:?} still running after {INSTALL_BUDGET:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = writer.join();
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn install(mode: Mode, node: &Node, n: usize) -> Result<(), String> {
    let b = backends(node);
    match mode {
        Mode::Direct => Ok(()),
        Mode::Bulkhead | Mode::BulkheadNoBypass => {
            let mut text = String::with_capacity(n * 200);
            for i in 0..n {
                let v = vip(i);
                let _ = writeln!(text, "-A -t {v} -s hash");
                for be in &b {
                    let _ = writeln!(text, "-a -t {v} -r {be} -m -w 1");
                }
            }
            let bin = tests::bulkhead_bin().ok_or("BULKHEAD_BIN is not set")?;
            let bin = bin.to_str().unwrap().to_owned();
            let (ns, pins, state) = (
                node.ns.path(),
                node.bpffs().path().to_owned(),
                node.state_dir().to_owned(),
            );
            run_stdin(
                None,
                &[
                    &bin,
                    "--netns",
                    ns.to_str().unwrap(),
                    "--bpffs",
                    pins.to_str().unwrap(),
                    "--state-dir",
                    state.to_str().unwrap(),
                    "service",
                    "restore",
                ],
                &text,
            )
        }
        Mode::Ipvs => {
            // kube-proxy's IPVS mode: every VIP on a dummy interface (IPVS intercepts traffic
            // to local addresses), virtual servers with masquerading (NAT) real servers.
            node.ns.ip(&["link", "add", "kube-ipvs0", "type", "dummy"]);
            let mut addrs = String::with_capacity(n * 48);
            let mut rules = String::with_capacity(n * 160);
            let mut seen = std::collections::HashSet::new();
            for i in 0..n {
                let v = vip(i);
                if seen.insert(*v.ip()) {
                    let _ = writeln!(addrs, "address add {}/32 dev kube-ipvs0", v.ip());
                }
                let _ = writeln!(rules, "-A -t {v} -s rr");
                for be in &b {
                    let _ = writeln!(rules, "-a -t {v} -r {be} -m -w 1");
                }
            }
            run_stdin(Some(&node.ns), &[tests::IP, "-batch", "-"], &addrs)?;
            run_stdin(Some(&node.ns), &["ipvsadm", "-R"], &rules)?;
            // Track IPVS connections in conntrack, so bridged replies are translated back (the
            // knob exists once IPVS is in use in the namespace).
            run_stdin(
                Some(&node.ns),
                &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/vs/conntrack"],
                "",
            )
        }
        Mode::Iptables => {
            // kube-proxy's iptables mode: one rule per service in a services chain, a chain per
            // service choosing an endpoint with the statistic match, a chain per endpoint.
            let mut t = String::with_capacity(n * 600);
            t.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
            for i in 0..n {
                let _ = writeln!(t, ":KUBE-SVC-{i} - [0:0]");
                for e in 0..b.len() {
                    let _ = writeln!(t, ":KUBE-SEP-{i}-{e} - [0:0]");
                }
            }
            t.push_str("-A PREROUTING -j KUBE-SERVICES\n");
            for i in 0..n {
                let v = vip(i);
                let _ = writeln!(
                    t,
                    "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j KUBE-SVC-{i}",
                    v.ip(),
                    v.port()
                );
                for (e, be) in b.iter().enumerate() {
                    let left = b.len() - e;
                    if left > 1 {
                        let _ = writeln!(
                            t,
                            "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{e}",
                            1.0 / left as f64
                        );
                    } else {
                        let _ = writeln!(t, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{e}");
                    }
                    let _ = writeln!(
                        t,
                        "-A KUBE-SEP-{i}-{e} -p tcp -m tcp -j DNAT --to-destination {be}"
                    );
                }
            }
            t.push_str("COMMIT\n");
            run_stdin(Some(&node.ns), &["iptables-restore", "--noflush"], &t)
        }
        Mode::Nftables => {
            // kube-proxy's nftables mode: a verdict map keyed by address, protocol and port, and
            // a chain per service choosing an endpoint with numgen.
            let mut t = String::with_capacity(n * 400);
            t.push_str("table ip kube-proxy {\n");
            t.push_str(
                "  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n",
            );
            t.push_str(
                "  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n",
            );
            t.push_str("  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n");
            for i in 0..n {
                let _ = write!(
                    t,
                    "  chain service-{i} {{ numgen random mod {} vmap {{ ",
                    b.len()
                );
                for e in 0..b.len() {
                    let _ = write!(
                        t,
                        "{e} : goto endpoint-{i}-{e}{}",
                        if e + 1 < b.len() { ", " } else { "" }
                    );
                }
                t.push_str(" }; }\n");
                for (e, be) in b.iter().enumerate() {
                    let _ = writeln!(
                        t,
                        "  chain endpoint-{i}-{e} {{ meta l4proto tcp dnat to {be}; }}"
                    );
                }
            }
            t.push_str("}\n");
            let mut elems = String::new();
            for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
                elems.push_str("add element ip kube-proxy service-ips { ");
                for (k, i) in chunk.iter().enumerate() {
                    let v = vip(*i);
                    let _ = write!(
                        elems,
                        "{} . tcp . {} : goto service-{i}{}",
                        v.ip(),
                        v.port(),
                        if k + 1 < chunk.len() { ", " } else { "" }
                    );
                }
                elems.push_str(" }\n");
            }
            t.push_str(&elems);
            run_stdin(Some(&node.ns), &["nft", "-f", "-"], &t)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One row: fresh topology, install, measure.

struct Row {
    mode: Mode,
    services: usize,
    install: Option<Duration>,
    conn_rate: f64,
    conn_errors: u64,
    p50_us: f64,
    p99_us: f64,
    spread: Vec<u64>,
    syn_retrans: u64,
    retrans: u64,
    /// Median ms of one `service add` with the N services present (bulkhead modes).
    add_one_ms: Option<f64>,
    note: String,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    f64::from(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// How many single `service add` commands the control-plane column times.
const ADD_RUNS: usize = 21;

/// Median milliseconds of one `bulkhead service add` (a new process: open the pinned maps,
/// read the table, take the node lock, write, publish) with `n` services present: the cost a
/// script or a CNI plugin pays per change. Each adds a service past the installed ones and
/// deletes it again outside the timing.
fn add_one(node: &Node, n: usize) -> Option<f64> {
    let b = backends(node);
    let mut times = Vec::with_capacity(ADD_RUNS);
    for k in 0..ADD_RUNS {
        let v = vip(n + 1 + k).to_string() + "/tcp";
        let backend = b[k % b.len()].to_string();
        let started = Instant::now();
        let out = node.bulkhead(&["service", "add", &v, "--backend", &backend]);
        times.push(started.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            return None;
        }
        node.bulkhead(&["service", "del", &v]);
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

fn measure(mode: Mode, n: usize, args: &Args) -> Row {
    let mut node = Node::new();
    node.add_pod(2);
    for host in 3..=5 {
        node.add_pod(host);
    }
    let client = &node.pods[0];
    // A wide ephemeral range: the connection-rate phase opens many short connections.
    client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    // kube-proxy relies on br_netfilter so bridged replies pass conntrack for un-DNAT; the
    // setting is per namespace, and this is the node's own.
    if matches!(mode, Mode::Iptables | Mode::Nftables | Mode::Ipvs) {
        node.ns.sysctl("net.bridge.bridge-nf-call-iptables", "1");
    }
    if mode == Mode::BulkheadNoBypass {
        node.bulkhead_ok(&["up", "--bridge", &node.bridge, "--bypass", "off"]);
    }

    let mut row = Row {
        mode,
        services: n,
        install: None,
        conn_rate: 0.0,
        conn_errors: 0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        spread: Vec::new(),
        syn_retrans: 0,
        retrans: 0,
        add_one_ms: None,
        note: String::new(),
    };
    let started = Instant::now();
    match install(mode, &node, n) {
        Ok(()) => row.install = (mode != Mode::Direct).then(|| started.elapsed()),
        Err(e) => {
            row.note = format!("install failed: {}", e.lines().next().unwrap_or(""));
            return row;
        }
    }
    if started.elapsed() > args.install_budget {
        row.note = format!("install took more than {:?}", args.install_budget);
        return row;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut listeners = Vec::new();
    for (i, pod) in node.pods[1..].iter().enumerate() {
        let (l, t) = serve(pod, i as u8, stop.clone());
        listeners.push(l);
        threads.extend(t);
    }
    let measured = vip(n.saturating_sub(1));
    let b = backends(&node);
    let targets: Arc<dyn Fn(usize, u64) -> SocketAddrV4 + Send + Sync> = match mode {
        // No balancer: the client spreads its own connections over the backends.
        Mode::Direct => Arc::new(move |t, k| b[(t + k as usize) % b.len()]),
        _ => Arc::new(move |_, _| measured),
    };
    wait_idle();
    let (r0, s0) = retransmits(&client.ns);
    let rate = load(
        &client.ns,
        args.concurrency,
        args.seconds,
        false,
        targets.clone(),
    );
    wait_idle();
    let lat = load(&client.ns, args.concurrency, args.seconds, true, targets);
    let (r1, s1) = retransmits(&client.ns);
    stop_servers(&listeners, &stop, threads);
    if matches!(mode, Mode::Bulkhead | Mode::BulkheadNoBypass) {
        row.add_one_ms = add_one(&node, n);
    }
    let mut latencies = lat.latencies_us;
    latencies.sort_unstable();
    row.conn_rate = rate.ok as f64 / args.seconds;
    row.conn_errors = rate.errors + lat.errors;
    row.p50_us = percentile(&latencies, 0.50);
    row.p99_us = percentile(&latencies, 0.99);
    row.spread = (0..3u8)
        .map(|i| rate.spread.get(&i).copied().unwrap_or(0))
        .collect();
    row.retrans = r1 - r0;
    row.syn_retrans = s1 - s0;
    row
}

// ---------------------------------------------------------------------------------------------
// Report.

fn report(rows: &[Row], args: &Args) -> (String, String) {
    let direct = |n: usize| {
        rows.iter()
            .find(|r| r.mode == Mode::Direct && r.services == n)
            .or_else(|| rows.iter().find(|r| r.mode == Mode::Direct))
    };
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = format!(
        "Linux {}, {cpus} CPUs; {} client threads, {} s per phase; fresh topology per row.\n\
Connection rate: closed loop (connect, 64-byte request, 64-byte reply, server closes).\n\
Latency: request/reply on persistent connections. Ratios are to `direct` at the same N.\n\n",
        kernel.trim(),
        args.concurrency,
        args.seconds
    );
    md.push_str("| mode | services | install | add one (ms) | conn/s | / direct | p50 (us) | p50 / direct | p99 (us) | p99 / direct | spread | SYN retrans | retrans | errors | note |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|\n");
    let mut json = Vec::new();
    for r in rows {
        let d = direct(r.services);
        let ratio = |a: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 && a.is_finite() => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let install = r
            .install
            .map_or_else(|| "-".into(), |d| format!("{:.3} s", d.as_secs_f64()));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r.mode.name(),
            r.services,
            install,
            r.add_one_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1}")),
            r.conn_rate,
            ratio(r.conn_rate, d.map(|d| d.conn_rate)),
            r.p50_us,
            ratio(r.p50_us, d.map(|d| d.p50_us)),
            r.p99_us,
            ratio(r.p99_us, d.map(|d| d.p99_us)),
            r.spread
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("/"),
            r.syn_retrans,
            r.retrans,
            r.conn_errors,
            r.note
        );
        json.push(format!(
            "{{\"mode\":\"{}\",\"services\":{},\"install_s\":{},\"add_one_ms\":{},\"conn_per_s\":{:.1},\"conn_ratio_to_direct\":{},\"p50_us\":{},\"p99_us\":{},\"spread\":{:?},\"syn_retrans\":{},\"retrans\":{},\"errors\":{},\"note\":{:?}}}",
            r.mode.name(),
            r.services,
            r.install.map_or_else(|| "null".into(), |d| format!("{:.4}", d.as_secs_f64())),
            r.add_one_ms.map_or_else(|| "null".into(), |ms| format!("{ms:.2}")),
            r.conn_rate,
            d.filter(|d| d.conn_rate > 0.0).map_or_else(|| "null".into(), |d| format!("{:.3}", r.conn_rate / d.conn_rate)),
            if r.p50_us.is_finite() { format!("{}", r.p50_us) } else { "null".into() },
            if r.p99_us.is_finite() { format!("{}", r.p99_us) } else { "null".into() },
            r.spread,
            r.syn_retrans,
            r.retrans,
            r.conn_errors,
            r.note
        ));
    }
    md.push_str("\n### Against the goals\n\n");
    let bulk: Vec<&Row> = rows.iter().filter(|r| r.mode == Mode::Bulkhead).collect();
    let mut goal = |text: String| {
        md.push_str(&text);
        md.push('\n');
    };
    for r in bulk.iter().filter(|r| r.conn_rate == 0.0) {
        goal(format!(
            "- bulkhead at {} services: not measured ({})",
            r.services,
            r.note.lines().next().unwrap_or("")
        ));
    }
    let bulk: Vec<&Row> = bulk.into_iter().filter(|r| r.conn_rate > 0.0).collect();
    for r in &bulk {
        if let Some(d) = direct(r.services).filter(|d| d.conn_rate > 0.0) {
            let x = r.conn_rate / d.conn_rate;
            goal(format!(
                "- bulkhead at {} services: {:.2}x direct connection rate ({}; goal 0.95x)",
                r.services,
                x,
                if x >= 0.95 { "met" } else { "NOT met" }
            ));
        }
    }
    for r in &bulk {
        if let Some(s) = rows.iter().find(|s| {
            s.mode == Mode::BulkheadNoBypass && s.services == r.services && s.conn_rate > 0.0
        }) {
            goal(format!(
                "- stack bypass at {} services: {:.2}x the connection rate and {:.2}x the p50 latency of \
                 bulkhead without it",
                r.services,
                r.conn_rate / s.conn_rate,
                r.p50_us / s.p50_us
            ));
        }
    }
    for r in rows
        .iter()
        .filter(|r| r.mode == Mode::Iptables && r.services >= 10_000)
    {
        if let Some(b) = bulk
            .iter()
            .find(|b| b.services == r.services)
            .filter(|_| r.conn_rate > 0.0)
        {
            goal(format!(
                "- at {} services bulkhead does {:.2}x the connection rate of iptables",
                r.services,
                b.conn_rate / r.conn_rate
            ));
        }
    }
    if let Some(b) = bulk.iter().find(|b| b.services == 10_000)
        && let Some(t) = b.install
    {
        goal(format!(
            "- 10,000 services installed in {:.3} s ({}; goal under 1 s)",
            t.as_secs_f64(),
            if t.as_secs_f64() < 1.0 {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    if let (Some(lo), Some(hi)) = (bulk.first(), bulk.last())
        && let (Some(a), Some(b)) = (lo.add_one_ms, hi.add_one_ms)
        && hi.services > lo.services
    {
        goal(format!(
            "- one `service add` with {} services present took {b:.1} ms, {:.2}x the {a:.1} ms with {} present",
            hi.services,
            b / a,
            lo.services
        ));
    }
    if let (Some(lo), Some(hi)) = (bulk.first(), bulk.last())
        && lo.conn_rate > 0.0
        && hi.services > lo.services
    {
        goal(format!(
            "- bulkhead connection rate at {} services is {:.2}x the rate at {} (flat is 1.00)",
            hi.services,
            hi.conn_rate / lo.conn_rate,
            lo.services
        ));
    }
    let ipvs: Vec<&Row> = rows
        .iter()
        .filter(|r| r.mode == Mode::Ipvs && r.conn_rate > 0.0)
        .collect();
    if ipvs.is_empty() {
        goal("- ipvs: not measured in this run (this kernel has no IPVS; use `--vm`)".into());
    }
    for r in ipvs {
        if let Some(b) = bulk.iter().find(|b| b.services == r.services) {
            let x = b.conn_rate / r.conn_rate;
            goal(format!(
                "- at {} services bulkhead does {:.2}x the connection rate of ipvs ({}; goal: ahead)",
                r.services,
                x,
                if x > 1.0 { "met" } else { "NOT met" }
            ));
        }
    }
    (md, format!("[{}]\n", json.join(",\n")))
}

fn chart(rows: &[Row], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max_n = rows.iter().map(|r| r.services).max().unwrap_or(1).max(10) as f64;
    let max_rate = rows.iter().map(|r| r.conn_rate).fold(1.0, f64::max) * 1.15;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "connection rate against number of services",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..max_n * 1.5).log_scale(), 0f64..max_rate)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .x_desc("services installed")
        .y_desc("connections / s")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [BLACK, BLUE, CYAN, RED, GREEN, MAGENTA];
    for (k, mode) in [
        Mode::Direct,
        Mode::Bulkhead,
        Mode::BulkheadNoBypass,
        Mode::Iptables,
        Mode::Nftables,
        Mode::Ipvs,
    ]
    .into_iter()
    .enumerate()
    {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.mode == mode && r.conn_rate > 0.0)
            .map(|r| (r.services.max(1) as f64, r.conn_rate))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = colors[k];
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(mode.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bulkhead-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(reason) = tests::skip_reason() {
        eprintln!("bulkhead-bench: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    let mut rows = Vec::new();
    for &n in &args.services {
        for &mode in &args.modes {
            if mode == Mode::Direct
                && rows
                    .iter()
                    .any(|r: &Row| r.mode == Mode::Direct && r.services == n)
            {
                continue;
            }
            eprintln!("bench: {} with {n} services ...", mode.name());
            let row = measure(mode, n, &args);
            eprintln!(
                "bench: {} {n}: install {:?}, {:.0} conn/s, p50 {:.0} us, p99 {:.0} us, errors {} {}",
                mode.name(),
                row.install,
                row.conn_rate,
                row.p50_us,
                row.p99_us,
                row.conn_errors,
                row.note
            );
            rows.push(row);
        }
    }
    let (md, json) = report(&rows, &args);
    if let Err(e) = fs::create_dir_all(&args.out) {
        eprintln!("bulkhead-bench: create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let _ = fs::write(args.out.join("datapath.md"), &md);
    let _ = fs::write(args.out.join("datapath.json"), json);
    if let Err(e) = chart(&rows, &args.out.join("datapath.svg")) {
        eprintln!("bulkhead-bench: chart: {e}");
    }
    println!("{md}");
    println!("written to {}", args.out.join("datapath.md").display());
    ExitCode::SUCCESS
}
