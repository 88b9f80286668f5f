//! `bulkhead-bench-engines`: the engine rows of `cargo xtask bench sandbox`. A real podman
//! (CNI backend) running `/bin/true` with `--rm`, and a real containerd making and removing a
//! pod sandbox through CRI (`RunPodSandbox`, `StopPodSandbox`, `RemovePodSandbox`), each end to end,
//! once on a network of the containernetworking bridge plugin (host-local addresses) and once
//! on bulkhead-cni, runs interleaved. Prints one JSON array: per row its name and median and
//! p90 in microseconds, or why it did not run.
//!
//! Usage: bulkhead-bench-engines --runs N --rootfs `BUSYBOX_ROOT` (`BULKHEAD_BIN` in the environment)

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    Node, TempDir,
    engines::{Containerd, Podman, bridge_conflist},
};

fn main() {
    let mut runs = 20usize;
    let mut rootfs = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--rootfs" => rootfs = args.next().map(PathBuf::from),
            other => panic!("unknown argument {other}"),
        }
    }
    let rootfs = rootfs.expect("--rootfs DIR");
    let cni = tests::bulkhead_bin()
        .map(|b| b.with_file_name("bulkhead-cni"))
        .filter(|p| p.is_file())
        .expect("bulkhead-cni next to BULKHEAD_BIN");
    let node = Node::new();
    let scratch = TempDir::new("bhbe");
    let bulkhead_list = json!({
        "cniVersion": "1.0.0",
        "name": "bulkhead",
        "plugins": [{
            "type": "bulkhead",
            "bridge": node.bridge,
            "subnet": format!("{}/24", node.gateway),
            "stateDir": node.state_dir(),
            "bpffs": node.bpffs().path(),
            "capabilities": {"portMappings": true},
        }],
    });
    let bridge_list = bridge_conflist("bridge", "cnibench0", "10.88.77.0/24", scratch.path());
    let mut rows = Vec::new();
    for engine in [podman, containerd] {
        rows.extend(engine(
            &node,
            &rootfs,
            &cni,
            &bridge_list,
            &bulkhead_list,
            runs,
        ));
    }
    println!("{}", Value::Array(rows));
}

fn row(name: &str, times: Result<Vec<Duration>, String>) -> Value {
    match times {
        Ok(mut v) if !v.is_empty() => {
            v.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            json!({
                "name": name,
                "median_us": us(v[v.len() / 2]).round(),
                "p90_us": us(v[(v.len() * 9 / 10).min(v.len() - 1)]).round(),
            })
        }
        Ok(_) => json!({"name": name, "error": "no run"}),
        Err(e) => json!({"name": name, "error": e}),
    }
}

/// Times `one` per round for each network, interleaved, after a warm-up round that also shows
/// whether it works at all.
fn interleaved(
    runs: usize,
    names: [&str; 2],
    mut one: impl FnMut(usize, usize) -> Result<(), String>,
) -> Vec<Value> {
    let mut times: [Result<Vec<Duration>, String>; 2] = [Ok(Vec::new()), Ok(Vec::new())];
    for round in 0..=runs {
        for (i, t) in times.iter_mut().enumerate() {
            let Ok(v) = t else { continue };
            let started = Instant::now();
            match one(i, round) {
                Ok(()) if round > 0 => v.push(started.elapsed()),
                Ok(()) => {}
                Err(e) => {
                    eprintln!("bench: {}: {e}", names[i]);
                    *t = Err(e.lines().next().unwrap_or("").to_owned());
                }
            }
        }
    }
    let [a, b] = times;
    vec![row(names[0], a), row(names[1], b)]
}

fn podman(
    node: &Node,
    rootfs: &Path,
    cni: &Path,
    bridge: &Value,
    bulkhead: &Value,
    runs: usize,
) -> Vec<Value> {
    let names = ["podman, CNI bridge", "podman, bulkhead-cni"];
    let Some(podman) = Podman::new(
        node.ns.path(),
        &[bridge.clone(), bulkhead.clone()],
        Some(cni),
    ) else {
        return names
            .iter()
            .map(|n| row(n, Err("podman or runc is not installed".into())))
            .collect();
    };
    let root = rootfs.to_string_lossy().into_owned();
    interleaved(runs, names, |i, _| {
        let network = ["bridge", "bulkhead"][i];
        let out = podman.run(&[
            "run",
            "--rm",
            "--network",
            network,
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--rootfs",
            &root,
            "/bin/true",
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "podman run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    })
}

fn containerd(
    node: &Node,
    rootfs: &Path,
    cni: &Path,
    bridge: &Value,
    bulkhead: &Value,
    runs: usize,
) -> Vec<Value> {
    let names = [
        "containerd CRI pod, CNI bridge",
        "containerd CRI pod, bulkhead-cni",
    ];
    // CRI takes one network: one containerd per network.
    let mut engines = Vec::new();
    for list in [bridge, bulkhead] {
        match Containerd::new(&node.ns.path(), list, Some(cni), rootfs) {
            Ok(c) => engines.push(c),
            Err(e) => return names.iter().map(|n| row(n, Err(e.clone()))).collect(),
        }
    }
    interleaved(runs, names, |i, round| {
        let c = &mut engines[i];
        let pod = c.run_pod(&format!("bench{round}"), &[])?;
        c.remove_pod(&pod)
    })
}
