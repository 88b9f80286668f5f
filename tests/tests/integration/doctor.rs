//! `bulkhead doctor` reports this machine as independent sources describe it.

use std::{fs, path::Path};

use tests::{run_ok, skip};

fn doctor() -> Vec<serde_json::Value> {
    let bin = tests::bulkhead_bin().expect("BULKHEAD_BIN");
    let out = std::process::Command::new(bin)
        .args(["doctor", "--json"])
        .output()
        .expect("run bulkhead doctor");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("doctor --json is JSON")
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[test]
fn doctor_reports_this_machine() {
    if skip("doctor_reports_this_machine") {
        return;
    }
    let checks = doctor();
    let release = run_ok::<&str>("uname", &["-r"]);
    assert!(
        find(&checks, "kernel")["detail"]
            .as_str()
            .unwrap()
            .contains(release.trim())
    );

    let btf = if Path::new("/sys/kernel/btf/vmlinux").exists() {
        "ok"
    } else {
        "warn"
    };
    assert_eq!(find(&checks, "btf")["status"], btf);

    // Doctor mounts bpffs when it is missing; afterwards the mount table must show it.
    assert_eq!(find(&checks, "bpffs")["status"], "ok");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    );

    let fs_type = run_ok("stat", &["-fc", "%T", "/sys/fs/cgroup"]);
    let cgroups = find(&checks, "cgroups")["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let unified = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
    let layout = match fs_type.trim() {
        "cgroup2fs" => "v2",
        "tmpfs" if unified => "hybrid",
        _ => "v1",
    };
    assert!(
        cgroups.starts_with(layout),
        "cgroup layout: doctor says {cgroups}, stat says {fs_type}"
    );

    let ipvs = find(&checks, "ipvs");
    assert_eq!(
        ipvs["status"] == "ok",
        Path::new("/proc/net/ip_vs").exists(),
        "{ipvs}"
    );

    let forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want = if forward.trim() == "1" { "ok" } else { "warn" };
    assert_eq!(find(&checks, "net.ipv4.ip_forward")["status"], want);
}

#[test]
fn doctor_prints_one_line_per_check() {
    if skip("doctor_prints_one_line_per_check") {
        return;
    }
    let bin = tests::bulkhead_bin().unwrap();
    let text = run_ok(bin.to_str().unwrap(), &["doctor"]);
    let checks = doctor();
    assert_eq!(text.lines().count(), checks.len(), "{text}");
    for (line, check) in text.lines().zip(&checks) {
        assert!(line.contains(check["name"].as_str().unwrap()), "{line}");
    }
}
