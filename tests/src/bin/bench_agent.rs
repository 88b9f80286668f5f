//! `bulkhead-bench-agent`: what `cargo xtask bench agent` measures.
//!
//! On one fresh node (a client pod, three backend pods):
//! - one `service add` with N services present: the CLI on its own (the baseline: a process
//!   that reads every pinned map), the CLI through the agent, and the agent's API;
//! - applying a desired state of N services, and of BIG services, through the API, against
//!   `bulkhead service restore` of the same N (the CLI's bulk path) as the baseline;
//! - the agent's resident memory with BIG services installed;
//! - a churn of RATE changes per second for SECONDS under closed-loop connection load on a VIP
//!   whose backends are among the changes, counting failed connections.
//!
//! Results go to OUT/agent.{md,json}; every figure is measured in this invocation.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bulkhead::agent::client::Client;
use tests::Node;

struct Args {
    services: usize,
    big: usize,
    adds: usize,
    churn_seconds: f64,
    churn_rate: f64,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        services: 10_000,
        big: 100_000,
        adds: 300,
        churn_seconds: 60.0,
        churn_rate: 100.0,
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("bad {flag} {v}"));
        match flag.as_str() {
            "--services" => args.services = num(&value)? as usize,
            "--big" => args.big = num(&value)? as usize,
            "--adds" => args.adds = num(&value)? as usize,
            "--churn-seconds" => args.churn_seconds = num(&value)?,
            "--churn-rate" => args.churn_rate = num(&value)?,
            "--out" => args.out = PathBuf::from(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The i-th filler service (198.20.0.0/16, then the next port), with three backends.
fn filler(i: usize) -> (String, [String; 3]) {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 20, 0, 0)) + (i % 65_536) as u32);
    let port = 80 + (i / 65_536);
    let b = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 22, 0, 0)) + (i % 65_536) as u32);
    (
        format!("{ip}:{port}"),
        [format!("{b}:80"), format!("{b}:81"), format!("{b}:82")],
    )
}

fn save_text(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let (vip, backends) = filler(i);
        let _ = writeln!(text, "-A -t {vip} -s hash");
        for b in backends {
            let _ = writeln!(text, "-a -t {vip} -r {b} -m -w 1");
        }
    }
    text
}

fn config_text(n: usize, extra: &str) -> String {
    let mut text = format!("services:\n{extra}");
    for i in 0..n {
        let (vip, [a, b, c]) = filler(i);
        let _ = writeln!(
            text,
            "  - address: {vip}/tcp\n    backends: [\"{a}\", \"{b}\", \"{c}\"]"
        );
    }
    text
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// `bulkhead ARGS < stdin` against the node; panics unless it succeeds.
fn bulkhead_stdin(node: &Node, args: &[&str], stdin: &str) {
    let out = tests::output_with_stdin(&mut node.command(args), stdin);
    assert!(
        out.status.success(),
        "bulkhead {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Median wall time of `runs` CLI `service add` commands, each undone outside the timing.
fn cli_adds(node: &Node, runs: usize) -> Vec<Duration> {
    let mut times = Vec::new();
    for i in 0..runs {
        let vip = format!("198.23.0.{}:80/tcp", i % 250 + 1);
        let (t, out) = timed(|| node.bulkhead(&["service", "add", &vip, "-b", "198.18.0.3:8080"]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        times.push(t);
        node.bulkhead_ok(&["service", "del", &vip]);
    }
    times.sort();
    times
}

struct Agent {
    child: Child,
    client: Client,
}

impl Agent {
    fn start(node: &Node) -> Agent {
        let child = node
            .command(&["agent", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let mut agent = Agent {
            child,
            client: Client {
                pid: 0,
                socket: PathBuf::new(),
            },
        };
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            if let Some(r) = bulkhead::agent::Record::load(node.state_dir()) {
                agent.client = Client {
                    pid: r.pid,
                    socket: r.socket,
                };
                if agent
                    .client
                    .request("GET", "/readyz", b"")
                    .is_ok_and(|a| a.status == 200)
                {
                    return agent;
                }
            }
            assert!(Instant::now() < deadline, "the agent never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: &str, want: u16) {
        let a = self
            .client
            .request(method, path, body.as_bytes())
            .expect("the agent answers");
        assert_eq!(a.status, want, "{method} {path}: {}", a.message());
    }

    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// An API client that keeps its connection open between requests (HTTP/1.1's default), as
/// controllers and HTTP client libraries do; `Agent::call` opens one per request, as the CLI.
struct KeepAlive {
    stream: std::os::unix::net::UnixStream,
}

impl KeepAlive {
    fn connect(agent: &Agent) -> KeepAlive {
        KeepAlive {
            stream: std::os::unix::net::UnixStream::connect(&agent.client.socket)
                .expect("connect to the agent"),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: &str, want: u16) {
        use std::io::{Read as _, Write as _};
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: bulkhead\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream
            .write_all(request.as_bytes())
            .expect("send the request");
        // The head, then as many body bytes as it announces.
        let mut raw = Vec::new();
        let mut byte = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.stream.read(&mut byte).expect("read the answer");
            assert!(n > 0, "the agent closed the connection");
            raw.extend_from_slice(&byte[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while raw.len() < head_end + length {
            let n = self.stream.read(&mut byte).expect("read the answer");
            assert!(n > 0, "the agent closed the connection");
            raw.extend_from_slice(&byte[..n]);
        }
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert_eq!(status, want, "{method} {path}: {head}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend's server for the whole run: two threads accepting, each answering one line with
/// the pod's address and closing (no thread per connection: the churn makes hundreds of
/// thousands).
fn serve(pod: &tests::Pod) {
    let me = SocketAddrV4::new(pod.addr, 8080);
    let listener = pod
        .ns
        .run(move || std::net::TcpListener::bind(me).expect("bind the backend"));
    for _ in 0..2 {
        let listener = listener.try_clone().expect("clone the listener");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                let mut line = String::new();
                let mut reader = BufReader::new(&conn);
                if reader.read_line(&mut line).is_ok() {
                    let _ = (&conn).write_all(format!("{me}\n").as_bytes());
                }
            }
        });
    }
}

/// Closed-loop connections to `vip` from `client` on `threads` threads until `stop`.
fn load(
    client: PathBuf,
    vip: SocketAddrV4,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handles = (0..threads)
        .map(|_| {
            let (client, stop, ok, failed) =
                (client.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let ns = fs::File::open(client).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let answered = tests::answers(vip, Duration::from_secs(3));
                    if answered {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    (handles, ok, failed)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bulkhead-bench-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(reason) = tests::skip_reason() {
        eprintln!("bulkhead-bench-agent: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    let n = args.services;
    let mut node = Node::new();
    for host in 2..=5 {
        node.add_pod(host);
    }
    for pod in &node.pods[1..] {
        serve(pod);
    }
    let mut md = String::new();
    let mut json = Vec::new();

    // The CLI's own bulk path and single add, without an agent: the baselines.
    eprintln!("bench agent: restore {n} services (CLI) ...");
    let (restore, ()) = timed(|| bulkhead_stdin(&node, &["service", "restore"], &save_text(n)));
    eprintln!("bench agent: CLI adds with {n} present ...");
    let cli = cli_adds(&node, 21);
    let cli_p50 = percentile(&cli, 0.5);

    let mut agent = Agent::start(&node);
    eprintln!("bench agent: CLI adds through the agent ...");
    let through = cli_adds(&node, 21);
    eprintln!("bench agent: {} API adds with {n} present ...", args.adds);
    // The i-th VIP of the /16 `net` (198.23: one connection per request, 198.24: kept alive).
    let vip = |net: u8, i: usize| format!("198.{net}.{}.{}:80", 1 + i / 250, i % 250 + 1);
    let add = |net: u8, call: &mut dyn FnMut(&str)| -> Vec<Duration> {
        (0..args.adds)
            .map(|i| {
                let body = format!(
                    r#"{{"address": "{}/tcp", "backends": ["198.18.0.3:8080"]}}"#,
                    vip(net, i)
                );
                timed(|| call(&body)).0
            })
            .collect()
    };
    let mut api = add(23, &mut |body| {
        agent.call("POST", "/v1/services", body, 201);
    });
    // The same through one kept-alive connection.
    let mut kept = KeepAlive::connect(&agent);
    let mut api_kept = add(24, &mut |body| kept.call("POST", "/v1/services", body, 201));
    for i in 0..args.adds {
        kept.call(
            "DELETE",
            &format!("/v1/services/tcp/{}", vip(24, i)),
            "",
            204,
        );
    }
    drop(kept);
    api_kept.sort();
    let mut api_del = Vec::new();
    for i in 0..args.adds {
        let path = format!("/v1/services/tcp/{}", vip(23, i));
        let (t, ()) = timed(|| agent.call("DELETE", &path, "", 204));
        api_del.push(t);
    }
    api_del.sort();
    api.sort();
    let _ = writeln!(
        md,
        "## One service added with {n} services present\n\n\
         | path | runs | p50 (ms) | p99 (ms) | p50 / CLI alone |\n|---|---:|---:|---:|---:|"
    );
    for (name, v) in [
        (
            "CLI alone (baseline: a process reading every pinned map)",
            &cli,
        ),
        ("CLI through the agent", &through),
        (
            "agent API (POST /v1/services), a connection per request",
            &api,
        ),
        (
            "agent API (POST /v1/services), one kept-alive connection",
            &api_kept,
        ),
        ("agent API, delete (DELETE /v1/services/...)", &api_del),
    ] {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        let _ = writeln!(
            md,
            "| {name} | {} | {:.3} | {:.3} | {:.4} |",
            v.len(),
            ms(p50),
            ms(p99),
            p50.as_secs_f64() / cli_p50.as_secs_f64()
        );
        json.push(format!(
            "{{\"what\":\"add one at {n}\",\"path\":\"{name}\",\"runs\":{},\"p50_ms\":{:.4},\"p99_ms\":{:.4}}}",
            v.len(),
            ms(p50),
            ms(p99)
        ));
    }

    // Desired state through the API.
    eprintln!("bench agent: apply ...");
    let (clear, ()) = timed(|| agent.call("POST", "/v1/apply", "services: []\n", 200));
    let (apply_n, ()) = timed(|| agent.call("POST", "/v1/apply", &config_text(n, ""), 200));
    let (apply_same, ()) = timed(|| agent.call("POST", "/v1/apply", &config_text(n, ""), 200));
    let big_text = config_text(args.big, "");
    let (apply_big, ()) = timed(|| agent.call("POST", "/v1/apply", &big_text, 200));
    let rss_big = agent.rss_kib();
    let (apply_big_same, ()) = timed(|| agent.call("POST", "/v1/apply", &big_text, 200));
    let _ = writeln!(
        md,
        "\n## Desired state through the API\n\n\
         | what | time (s) | / CLI restore of {n} |\n|---|---:|---:|\n\
         | `bulkhead service restore` of {n} services (baseline, no agent) | {:.3} | 1.00 |\n\
         | apply: delete {n} services | {:.3} | {:.2} |\n\
         | apply {n} services to an empty table | {:.3} | {:.2} |\n\
         | apply the same {n} again (nothing to do) | {:.3} | {:.2} |\n\
         | apply {} services (from {n}) | {:.3} | {:.2} |\n\
         | apply the same {} again | {:.3} | {:.2} |\n\n\
         Agent resident memory with {} services installed: {:.1} MiB.",
        restore.as_secs_f64(),
        clear.as_secs_f64(),
        clear.as_secs_f64() / restore.as_secs_f64(),
        apply_n.as_secs_f64(),
        apply_n.as_secs_f64() / restore.as_secs_f64(),
        apply_same.as_secs_f64(),
        apply_same.as_secs_f64() / restore.as_secs_f64(),
        args.big,
        apply_big.as_secs_f64(),
        apply_big.as_secs_f64() / restore.as_secs_f64(),
        args.big,
        apply_big_same.as_secs_f64(),
        apply_big_same.as_secs_f64() / restore.as_secs_f64(),
        args.big,
        rss_big as f64 / 1024.0
    );
    json.push(format!(
        "{{\"what\":\"apply\",\"restore_{n}_s\":{:.4},\"apply_{n}_s\":{:.4},\"apply_{n}_again_s\":{:.4},\"apply_{}_s\":{:.4},\"apply_{}_again_s\":{:.4},\"rss_kib_at_{}\":{rss_big}}}",
        restore.as_secs_f64(),
        apply_n.as_secs_f64(),
        apply_same.as_secs_f64(),
        args.big,
        apply_big.as_secs_f64(),
        args.big,
        apply_big_same.as_secs_f64(),
        args.big
    ));

    // Churn under load: the loaded VIP's own backends change, and other services come and go.
    eprintln!("bench agent: churn ...");
    agent.call("POST", "/v1/apply", &config_text(n, "  - address: 198.19.0.10:80/tcp\n    scheduler: rr\n    backends: [\"198.18.0.3:8080\", \"198.18.0.4:8080\"]\n"), 200);
    let stop = Arc::new(AtomicBool::new(false));
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    let (handles, ok, failed) = load(node.pods[0].ns.path(), vip, 4, stop.clone());
    let period = Duration::from_secs_f64(1.0 / args.churn_rate);
    let started = Instant::now();
    let mut changes = Vec::new();
    let mut next = Instant::now();
    let mut i = 0usize;
    while started.elapsed().as_secs_f64() < args.churn_seconds {
        let svc = "/v1/services/tcp/198.19.0.10:80";
        let (t, ()) = timed(|| match i % 6 {
            0 => agent.call(
                "POST",
                &format!("{svc}/backends"),
                r#"{"address": "198.18.0.5:8080"}"#,
                201,
            ),
            1 => agent.call(
                "POST",
                &format!("{svc}/backends"),
                r#"{"address": "198.18.0.4:8080", "weight": 3}"#,
                201,
            ),
            2 => agent.call(
                "POST",
                &format!("{svc}/backends/198.18.0.5:8080/drain"),
                "",
                204,
            ),
            3 => agent.call(
                "DELETE",
                &format!("{svc}/backends/198.18.0.5:8080"),
                "",
                204,
            ),
            4 => agent.call(
                "POST",
                "/v1/services",
                &format!(
                    r#"{{"address": "198.23.2.{}:80/tcp", "backends": ["198.18.0.3:8080"]}}"#,
                    i / 6 % 250 + 1
                ),
                201,
            ),
            _ => agent.call(
                "DELETE",
                &format!("/v1/services/tcp/198.23.2.{}:80", i / 6 % 250 + 1),
                "",
                204,
            ),
        });
        changes.push(t);
        i += 1;
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let churn_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    changes.sort();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let rate = changes.len() as f64 / churn_time.as_secs_f64();
    let _ = writeln!(
        md,
        "\n## Churn under connection load\n\n\
         {} changes in {:.1} s ({rate:.1}/s; asked {:.0}/s) with {n} other services installed: \
         a backend added, reweighted, drained and removed on the loaded VIP, and services added \
         and deleted. Change latency p50 {:.3} ms, p99 {:.3} ms. Closed-loop connections \
         through the VIP meanwhile (4 threads): {ok} answered, **{failed} failed**.",
        changes.len(),
        churn_time.as_secs_f64(),
        args.churn_rate,
        ms(percentile(&changes, 0.5)),
        ms(percentile(&changes, 0.99))
    );
    json.push(format!(
        "{{\"what\":\"churn\",\"changes\":{},\"seconds\":{:.2},\"p50_ms\":{:.4},\"p99_ms\":{:.4},\"connections\":{ok},\"failed\":{failed}}}",
        changes.len(),
        churn_time.as_secs_f64(),
        ms(percentile(&changes, 0.5)),
        ms(percentile(&changes, 0.99))
    ));
    agent.stop();

    let header = format!(
        "# `cargo xtask bench agent`\n\n{}, {} CPUs; release build; one invocation.\n\n",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "Linux".into(), |r| format!("Linux {}", r.trim())),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );
    let md = header + &md;
    if let Err(e) = fs::create_dir_all(&args.out) {
        eprintln!("bulkhead-bench-agent: create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let _ = fs::write(args.out.join("agent.md"), &md);
    let _ = fs::write(
        args.out.join("agent.json"),
        format!("[{}]\n", json.join(",\n")),
    );
    println!("{md}");
    println!(
        "written to {}",
        Path::new(&args.out).join("agent.md").display()
    );
    if failed > 0 {
        eprintln!("bulkhead-bench-agent: {failed} connections failed during the churn");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
