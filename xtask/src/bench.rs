//! `cargo xtask bench`: measured comparisons, every figure also given as a ratio to the baseline
//! measured in the same invocation. Results go to target/bench/ as markdown and JSON.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum What {
    /// Service load balancing: direct (baseline), bulkhead, bulkhead without its stack bypass,
    /// iptables and nftables (kube-proxy style), per number of services installed.
    Datapath {
        /// Run inside a VM booting Debian's kernel, which has IPVS (adds the ipvs mode).
        #[arg(long)]
        vm: bool,
        /// Numbers of services to install, comma-separated; the last one installed is measured.
        #[arg(long, default_value = "1,1000,10000,100000")]
        services: String,
        /// Seconds per phase (connection rate, then latency).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Client threads.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Modes to run, comma-separated.
        #[arg(
            long,
            default_value = "direct,bulkhead,bulkhead-nobypass,iptables,nftables"
        )]
        modes: String,
    },
    /// `bulkhead run -- /bin/true` end to end against `unshare` (the baseline: the same
    /// namespaces, nothing else), crun and runc running the same trivial bundle.
    Sandbox {
        /// Runs per program, interleaved.
        #[arg(long, default_value_t = 40)]
        runs: usize,
    },
    /// The node agent: one service added with N present (API, CLI through the agent, CLI
    /// alone as the baseline), applying N and BIG services, memory at BIG, and a churn of
    /// changes under connection load.
    Agent {
        /// Services installed while single changes are measured.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// The large desired state applied (and the memory measured at).
        #[arg(long, default_value_t = 100_000)]
        big: usize,
        /// API adds timed.
        #[arg(long, default_value_t = 300)]
        adds: usize,
        /// Seconds of churn under load.
        #[arg(long, default_value_t = 60.0)]
        churn_seconds: f64,
        /// Changes per second during the churn.
        #[arg(long, default_value_t = 100.0)]
        churn_rate: f64,
    },
    /// bulkhead-init against tini, tini-static, dumb-init and catatonit.
    Init {
        /// Runs of `INIT -- /bin/true` per program (interleaved with the baseline).
        #[arg(long, default_value_t = 300)]
        runs: usize,
    },
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    match &opts.what {
        What::Init { runs } => init(*runs),
        What::Sandbox { runs } => sandbox(*runs),
        What::Agent {
            services,
            big,
            adds,
            churn_seconds,
            churn_rate,
        } => {
            setup::run()?;
            let artifacts = build::run(&build::Options { release: true })?;
            let bench = build::tests_bin(&artifacts, "bulkhead-bench-agent")?;
            let mut run = Command::new(bench);
            for (flag, value) in [
                ("--services", services.to_string()),
                ("--big", big.to_string()),
                ("--adds", adds.to_string()),
                ("--churn-seconds", churn_seconds.to_string()),
                ("--churn-rate", churn_rate.to_string()),
            ] {
                run.arg(flag).arg(value);
            }
            run.arg("--out")
                .arg(out_dir()?)
                .env("BULKHEAD_BIN", &artifacts.bulkhead);
            setup::run_cmd("bench agent", &mut run)
        }
        What::Datapath {
            vm,
            services,
            seconds,
            concurrency,
            modes,
        } => {
            if *vm {
                return datapath_vm(services, *seconds, *concurrency, modes);
            }
            datapath(services, *seconds, *concurrency, modes)
        }
    }
}

fn datapath(services: &str, seconds: f64, concurrency: usize, modes: &str) -> anyhow::Result<()> {
    setup::run()?;
    setup::apt(&["iptables", "nftables"])?;
    let artifacts = build::run(&build::Options { release: true })?;
    let bench = build::tests_bin(&artifacts, "bulkhead-bench")?;
    let mut run = Command::new(bench);
    run.arg("datapath")
        .args([
            "--services",
            services,
            "--seconds",
            &seconds.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .args(["--modes", modes])
        .arg("--out")
        .arg(out_dir()?)
        .env("BULKHEAD_BIN", &artifacts.bulkhead);
    setup::run_cmd("bench datapath", &mut run)
}

/// The same benchmark inside the test VM, with IPVS; results come back on the console between
/// markers and are written next to the local ones as datapath-vm.*.
fn datapath_vm(
    services: &str,
    seconds: f64,
    concurrency: usize,
    modes: &str,
) -> anyhow::Result<()> {
    setup::run()?;
    let artifacts = build::run(&build::Options { release: true })?;
    let bench = build::tests_bin(&artifacts, "bulkhead-bench")?;
    let modes = if modes.contains("ipvs") {
        modes.to_owned()
    } else {
        format!("{modes},ipvs")
    };
    let body = format!(
        "BULKHEAD_BIN=/bin/bulkhead /bin/bulkhead-bench datapath --services {services} --seconds {seconds} \
--concurrency {concurrency} --modes {modes} --out /tmp/bench || exit 1\n\
for f in md json svg; do echo \"BENCH-FILE-BEGIN $f\"; cat /tmp/bench/datapath.$f; echo \"BENCH-FILE-END\"; done"
    );
    let binaries = [
        (artifacts.bulkhead.clone(), "/bin/bulkhead"),
        (artifacts.init.clone(), "/bin/bulkhead-init"),
        (bench, "/bin/bulkhead-bench"),
    ];
    let console = crate::vm::run_capture(&body, &binaries, Duration::from_hours(3))?;
    let dir = out_dir()?;
    let mut current: Option<(String, String)> = None;
    for line in console.lines() {
        if let Some(ext) = line.strip_prefix("BENCH-FILE-BEGIN ") {
            current = Some((ext.trim().to_owned(), String::new()));
        } else if line.starts_with("BENCH-FILE-END") {
            if let Some((ext, text)) = current.take() {
                fs::write(dir.join(format!("datapath-vm.{ext}")), text)?;
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    println!("written to {}", dir.join("datapath-vm.md").display());
    Ok(())
}

fn out_dir() -> anyhow::Result<PathBuf> {
    let dir = build::root().join("target").join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// True when the ELF file has no `PT_INTERP` program header (no dynamic loader).
fn is_static(path: &Path) -> anyhow::Result<bool> {
    let elf = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    Ok((0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    }))
}

/// Wall time of one run of `argv`, output discarded (standard error kept for the failure).
fn time_once(argv: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {argv:?}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} failed ({}): {}",
            argv[0],
            out.status,
            stderr.trim().lines().last().unwrap_or("")
        );
    }
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Peak resident set of the init process itself (`VmHWM`), sampled while its child sleeps.
fn peak_rss_kib(init: &[&str]) -> anyhow::Result<u64> {
    let mut child = Command::new(init[0])
        .args(&init[1..])
        .args(["/bin/sleep", "0.3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {init:?}"))?;
    std::thread::sleep(Duration::from_millis(150));
    let status = fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    child.wait()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM for {init:?}"))
}

struct InitRow {
    name: &'static str,
    path: PathBuf,
    size: u64,
    is_static: bool,
    median: Duration,
    rss_kib: u64,
}

fn init(runs: usize) -> anyhow::Result<()> {
    setup::run()?;
    setup::apt(&["tini", "dumb-init", "catatonit"])?;
    let artifacts = build::run(&build::Options { release: true })?;
    let init_path = artifacts.init.to_string_lossy().into_owned();
    // Each init as a container entrypoint outside a PID namespace, registered as a subreaper
    // where it has the option, so none of them warns.
    let contenders: [(&'static str, Vec<String>); 5] = [
        ("bulkhead-init", vec![init_path, "-s".into(), "--".into()]),
        (
            "tini",
            vec!["/usr/bin/tini".into(), "-s".into(), "--".into()],
        ),
        (
            "tini-static",
            vec!["/usr/bin/tini-static".into(), "-s".into(), "--".into()],
        ),
        ("dumb-init", vec!["/usr/bin/dumb-init".into()]),
        ("catatonit", vec!["/usr/bin/catatonit".into(), "--".into()]),
    ];
    let truth = ["/bin/true"];
    let mut baseline = Vec::with_capacity(runs);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); contenders.len()];
    // Warm the page cache, then interleave so drift hits every program alike.
    for (_, argv) in &contenders {
        let mut a: Vec<&str> = argv.iter().map(String::as_str).collect();
        a.push("/bin/true");
        time_once(&a)?;
    }
    for _ in 0..runs {
        baseline.push(time_once(&truth)?);
        for (i, (_, argv)) in contenders.iter().enumerate() {
            let mut a: Vec<&str> = argv.iter().map(String::as_str).collect();
            a.push("/bin/true");
            times[i].push(time_once(&a)?);
        }
    }
    let base = median(baseline);
    let mut rows = Vec::new();
    for ((name, argv), t) in contenders.iter().zip(times) {
        let path = PathBuf::from(&argv[0]);
        let a: Vec<&str> = argv.iter().map(String::as_str).collect();
        rows.push(InitRow {
            name,
            size: fs::metadata(&path)?.len(),
            is_static: is_static(&path)?,
            median: median(t),
            rss_kib: peak_rss_kib(&a)?,
            path,
        });
    }
    let tini = rows.iter().find(|r| r.name == "tini").expect("tini row");
    let (tini_size, tini_rss) = (tini.size as f64, tini.rss_kib as f64);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut md = String::new();
    md.push_str(&format!(
        "Start plus exit of `INIT -- /bin/true`, median of {runs} interleaved runs; baseline `/bin/true` alone: {:.0} us.\n\
Sizes and peak RSS as ratios to dynamically linked tini.\n\n",
        us(base)
    ));
    md.push_str("| init | size (bytes) | size / tini | static | median (us) | / /bin/true | overhead (us) | peak RSS (KiB) | RSS / tini |\n");
    md.push_str("|---|---:|---:|:---:|---:|---:|---:|---:|---:|\n");
    let mut json = Vec::new();
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.0} | {:.2} | {:.0} | {} | {:.2} |\n",
            r.name,
            r.size,
            r.size as f64 / tini_size,
            if r.is_static { "yes" } else { "no" },
            us(r.median),
            us(r.median) / us(base),
            us(r.median) - us(base),
            r.rss_kib,
            r.rss_kib as f64 / tini_rss,
        ));
        json.push(format!(
            "{{\"name\":\"{}\",\"path\":\"{}\",\"size\":{},\"static\":{},\"median_us\":{:.1},\"baseline_us\":{:.1},\"peak_rss_kib\":{}}}",
            r.name,
            r.path.display(),
            r.size,
            r.is_static,
            us(r.median),
            us(base),
            r.rss_kib
        ));
    }
    let dir = out_dir()?;
    fs::write(dir.join("init.md"), &md)?;
    fs::write(dir.join("init.json"), format!("[{}]\n", json.join(",\n")))?;
    println!("{md}");
    println!("written to {}", dir.join("init.md").display());
    Ok(())
}

/// Removes the bench's node namespace and state, whatever happened.
struct BenchNode {
    ns: String,
    bulkhead: Vec<String>,
    dir: PathBuf,
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        let mut down = self.bulkhead.clone();
        down.push("down".into());
        let _ = Command::new(&down[0])
            .args(&down[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits (up to a second) until the namespace `ns` holds no sandbox veth (`bh...`).
fn settle_veths(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let out = Command::new("ip").args(["-n", ns, "-o", "link"]).output();
        if out.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(": bh")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sandbox(runs: usize) -> anyhow::Result<()> {
    setup::run()?;
    setup::apt(&["crun", "runc", "busybox-static", "util-linux"])?;
    let artifacts = build::run(&build::Options { release: true })?;
    let work = build::root().join("target/bench/sandbox");
    let _ = fs::remove_dir_all(&work);
    // A busybox root, shared by every contender.
    let rootfs = work.join("bundle/rootfs");
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox"))?;
    for applet in ["sh", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    // The OCI bundle: runc's default spec running /bin/true, its cgroup beneath this process's
    // own (the memory hierarchy places it apart from the others on this machine's v1 hybrid).
    let bundle = work.join("bundle");
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .context("runc spec")?;
    if !status.success() {
        bail!("runc spec failed");
    }
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&fs::read_to_string(&config_path)?)?;
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["process"]["terminal"] = serde_json::json!(false);
    config["root"]["readonly"] = serde_json::json!(false);
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let memory = own
        .lines()
        .find_map(|l| {
            l.split(':')
                .nth(1)
                .filter(|c| *c == "memory")
                .and(l.rsplit(':').next())
        })
        .or_else(|| own.lines().find_map(|l| l.strip_prefix("0::")))
        .unwrap_or("/")
        .trim_end_matches('/')
        .to_owned();
    config["linux"]["cgroupsPath"] = serde_json::json!(format!("{memory}/bulkhead-bench-oci"));
    fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;

    // A node for bulkhead: its own namespace, bridge and pin directory.
    let ns = format!("bhbench{}", std::process::id());
    let status = Command::new("ip").args(["netns", "add", &ns]).status()?;
    if !status.success() {
        bail!("ip netns add {ns} failed");
    }
    let bulkhead: Vec<String> = vec![
        artifacts.bulkhead.to_string_lossy().into_owned(),
        "--netns".into(),
        ns.clone(),
        "--bpffs".into(),
        format!("/sys/fs/bpf/{ns}"),
        "--state-dir".into(),
        work.join("state").to_string_lossy().into_owned(),
    ];
    let node = BenchNode {
        ns: ns.clone(),
        bulkhead: bulkhead.clone(),
        dir: PathBuf::from(format!("/sys/fs/bpf/{ns}")),
    };
    let mut up = bulkhead.clone();
    up.extend(["up", "--bridge", "bhbench0", "--subnet", "198.18.0.1/24"].map(String::from));
    time_once(&up.iter().map(String::as_str).collect::<Vec<_>>())?;

    let rootfs_s = rootfs.to_string_lossy().into_owned();
    let bundle_s = bundle.to_string_lossy().into_owned();
    let mut bulkhead_run = bulkhead.clone();
    bulkhead_run.extend(["run", "--rootfs", &rootfs_s, "--", "/bin/true"].map(String::from));
    let contenders: Vec<(&str, Vec<String>)> = vec![
        (
            "unshare",
            [
                "unshare",
                "--fork",
                "--pid",
                "--mount-proc",
                "--net",
                "--uts",
                "--ipc",
                "/bin/true",
            ]
            .map(String::from)
            .to_vec(),
        ),
        ("bulkhead", bulkhead_run),
        (
            "crun",
            ["crun", "run", "--bundle", &bundle_s, "ID"]
                .map(String::from)
                .to_vec(),
        ),
        (
            "runc",
            ["runc", "run", "--bundle", &bundle_s, "ID"]
                .map(String::from)
                .to_vec(),
        ),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); contenders.len()];
    let mut failures: Vec<Option<String>> = vec![None; contenders.len()];
    // One warm-up each (and the check that it works at all), then interleaved runs.
    for round in 0..=runs {
        for (i, (name, argv)) in contenders.iter().enumerate() {
            if failures[i].is_some() {
                continue;
            }
            let id = format!("bhbench-{}-{round}", std::process::id());
            let argv: Vec<&str> = argv
                .iter()
                .map(|a| if a == "ID" { id.as_str() } else { a.as_str() })
                .collect();
            match time_once(&argv) {
                Ok(t) if round > 0 => times[i].push(t),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench: {name}: {e:#}");
                    failures[i] = Some(format!("{e:#}"));
                }
            }
            // bulkhead run returns before the kernel has taken the sandbox's veth (with its
            // namespace, in a worker): let that finish, untimed, so the next program does
            // not pay for it.
            if *name == "bulkhead" {
                settle_veths(&ns);
            }
        }
    }
    drop(node);
    // The engines, each on the containernetworking bridge plugin and on bulkhead-cni.
    let engines_bin = build::tests_bin(&artifacts, "bulkhead-bench-engines")?;
    let out = Command::new(engines_bin)
        .args(["--runs", &runs.to_string(), "--rootfs", &rootfs_s])
        .env("BULKHEAD_BIN", &artifacts.bulkhead)
        .stderr(Stdio::inherit())
        .output()
        .context("run bulkhead-bench-engines")?;
    let engines: Vec<serde_json::Value> = if out.status.success() {
        serde_json::from_slice(&out.stdout).context("bulkhead-bench-engines' output")?
    } else {
        bail!("bulkhead-bench-engines failed ({})", out.status)
    };
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p90 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[(v.len() * 9 / 10).min(v.len() - 1)]
    };
    let base = if times[0].is_empty() {
        bail!("the unshare baseline did not run: {:?}", failures[0])
    } else {
        median(times[0].clone())
    };
    let mut md = format!(
        "Creating a sandbox around `/bin/true`, running it and removing it, end to end; median and p90 of {runs} \
interleaved runs per program. Baseline: `unshare --fork --pid --mount-proc --net --uts --ipc /bin/true`, {:.0} us. \
bulkhead also creates and removes a cgroup, a veth pair on the bridge with an address, the datapath attachment and \
the endpoint entry; it returns before the kernel has taken the veth with the sandbox's namespace, and the bench \
waits for that, untimed, before the next program runs. crun and runc run the same busybox bundle (runc's default spec, \
no network setup). \
The engine rows: podman 4.3 (CNI backend, runc, vfs storage) running `/bin/true` with `--rm` and `--rootfs`, and \
containerd 1.6 making and removing a pod sandbox through CRI (RunPodSandbox, StopPodSandbox, RemovePodSandbox), \
each on a network of the containernetworking bridge plugin with host-local addresses and on bulkhead-cni, \
interleaved.\n\n",
        us(base)
    );
    md.push_str(
        "| program | median (ms) | / unshare | p90 (ms) | note |\n|---|---:|---:|---:|---|\n",
    );
    let mut json = Vec::new();
    for (i, (name, _)) in contenders.iter().enumerate() {
        if let Some(e) = &failures[i] {
            md.push_str(&format!(
                "| {name} | - | - | - | did not run: {} |\n",
                e.lines().next().unwrap_or("")
            ));
        } else {
            let m = median(times[i].clone());
            md.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {:.2} | |\n",
                us(m) / 1000.0,
                us(m) / us(base),
                us(p90(&times[i])) / 1000.0
            ));
            json.push(format!(
                "{{\"name\":\"{name}\",\"median_us\":{:.0},\"baseline_us\":{:.0}}}",
                us(m),
                us(base)
            ));
        }
    }
    let mut engine_us = std::collections::BTreeMap::new();
    for e in &engines {
        let name = e["name"].as_str().unwrap_or("?");
        match (e["median_us"].as_f64(), e["p90_us"].as_f64()) {
            (Some(m), Some(p90)) => {
                engine_us.insert(name.to_owned(), m);
                md.push_str(&format!(
                    "| {name} | {:.2} | {:.2} | {:.2} | |\n",
                    m / 1000.0,
                    m / us(base),
                    p90 / 1000.0
                ));
                json.push(format!(
                    "{{\"name\":\"{name}\",\"median_us\":{m:.0},\"baseline_us\":{:.0}}}",
                    us(base)
                ));
            }
            _ => md.push_str(&format!(
                "| {name} | - | - | - | did not run: {} |\n",
                e["error"].as_str().unwrap_or("")
            )),
        }
    }
    // The goals, as ratios of rows of this run.
    let median_of = |name: &str| {
        contenders
            .iter()
            .position(|(n, _)| *n == name)
            .filter(|&i| !times[i].is_empty())
            .map(|i| us(median(times[i].clone())))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let engine = |name: &str| engine_us.get(name).copied();
    md.push_str(&format!(
        "\nbulkhead / runc: {} (goal: at most 1.5). bulkhead-cni / bridge plugin, end to end: podman {}, \
containerd {} (goal: below 1). bulkhead run / podman on the bridge plugin: {}; / containerd's pod on it: {}.\n",
        ratio(median_of("bulkhead"), median_of("runc")),
        ratio(engine("podman, bulkhead-cni"), engine("podman, CNI bridge")),
        ratio(
            engine("containerd CRI pod, bulkhead-cni"),
            engine("containerd CRI pod, CNI bridge")
        ),
        ratio(median_of("bulkhead"), engine("podman, CNI bridge")),
        ratio(median_of("bulkhead"), engine("containerd CRI pod, CNI bridge")),
    ));
    let dir = out_dir()?;
    fs::write(dir.join("sandbox.md"), &md)?;
    fs::write(
        dir.join("sandbox.json"),
        format!("[{}]\n", json.join(",\n")),
    )?;
    println!("{md}");
    println!("written to {}", dir.join("sandbox.md").display());
    Ok(())
}
