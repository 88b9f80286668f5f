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
    let root = build::root();
    let mut cargo = build::host_cargo(&root, &artifacts.ebpf);
    cargo
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "tests",
            "--bin",
            "bulkhead-bench",
            "--",
            "datapath",
        ])
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
    setup::run_cmd("bench datapath", &mut cargo)
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
    let root = build::root();
    let mut cargo = build::host_cargo(&root, &artifacts.ebpf);
    setup::run_cmd(
        "build the benchmark",
        cargo.args([
            "build",
            "--release",
            "--package",
            "tests",
            "--bin",
            "bulkhead-bench",
        ]),
    )?;
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
        (
            root.join("target/release/bulkhead-bench"),
            "/bin/bulkhead-bench",
        ),
    ];
    let console = crate::vm::run_capture(&body, &binaries, Duration::from_secs(3 * 3600))?;
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

/// True when the ELF file has no PT_INTERP program header (no dynamic loader).
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

/// Wall time of one run of `argv`, output discarded.
fn time_once(argv: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("run {argv:?}"))?;
    let took = started.elapsed();
    if !status.success() {
        bail!("{argv:?} failed: {status}");
    }
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Peak resident set of the init process itself (VmHWM), sampled while its child sleeps.
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
