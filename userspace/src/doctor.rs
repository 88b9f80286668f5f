//! `bulkhead doctor`: what this machine offers the datapath and the sandboxes.
//!
//! Each check reads the kernel's own interfaces (uname, sysfs, procfs, statfs) and says OK or
//! what is missing, with a hint. The only change it makes is mounting bpffs where it is missing.

use std::{fs, path::Path};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, TMPFS_MAGIC, statfs};
use serde::Serialize;

use crate::{bpffs, loader::TcMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not there, but only an optional feature needs it.
    Info,
    /// Works, but not the way the datapath wants.
    Warn,
    /// Required and absent.
    Missing,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Info => "INFO",
            Status::Warn => "WARN",
            Status::Missing => "MISSING",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    hint: Option<&str>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        hint: hint.map(str::to_owned),
    }
}

/// Runs every check in a fixed order.
pub fn run() -> Vec<Check> {
    vec![
        kernel(),
        btf(),
        bpffs_check(),
        capabilities(),
        tc_mode(),
        cgroups(),
        ipvs(),
        sysctl(
            "net.ipv4.ip_forward",
            "1",
            Status::Warn,
            "`bulkhead up` turns it on in the node's network namespace",
        ),
        sysctl(
            "net.core.bpf_jit_enable",
            "1",
            Status::Warn,
            "echo 1 > /proc/sys/net/core/bpf_jit_enable",
        ),
        br_netfilter(),
        seccomp(),
        lsm(
            "apparmor",
            "/sys/kernel/security/apparmor",
            "/sys/module/apparmor/parameters/enabled",
        ),
        lsm("selinux", "/sys/fs/selinux", "/sys/fs/selinux/enforce"),
        time_namespace(),
        mount_setattr(),
        device_control(),
    ]
}

/// Whether this kernel filters system calls (`seccomp(2)` filter mode, Linux 3.5).
fn seccomp() -> Check {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("Seccomp:")) {
        Some(mode) => check(
            "seccomp",
            Status::Ok,
            format!("available (this process: mode {})", mode.trim()),
            None,
        ),
        None => check(
            "seccomp",
            Status::Info,
            "not in this kernel (CONFIG_SECCOMP)",
            None,
        ),
    }
}

/// Whether a Linux security module is enabled: its directory in securityfs or sysfs, and its
/// enablement file where it has one.
fn lsm(name: &'static str, dir: &str, enabled: &str) -> Check {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let listed = lsms.split(',').any(|l| l.trim() == name);
    let on = std::path::Path::new(dir).exists()
        && std::fs::read_to_string(enabled).map_or(true, |v| v.trim() != "N" && v.trim() != "0");
    if listed || on {
        check(name, Status::Ok, "enabled in this kernel", None)
    } else {
        check(
            name,
            Status::Info,
            "not enabled in this kernel; sandboxes cannot ask for it",
            None,
        )
    }
}

/// Time namespaces (Linux 5.6), for `run --timens`.
fn time_namespace() -> Check {
    if std::path::Path::new("/proc/self/ns/time").exists() {
        check(
            "time namespace",
            Status::Ok,
            "available (run --timens)",
            None,
        )
    } else {
        check(
            "time namespace",
            Status::Info,
            "not in this kernel (Linux 5.6+, CONFIG_TIME_NS); run --timens fails",
            None,
        )
    }
}

/// How sandboxes' device access is controlled: the v1 devices controller, or on cgroup v2 a
/// cgroup device program (Linux 4.15, which every kernel Bulkhead runs on has).
fn device_control() -> Check {
    let (layout, _) = cgroup_layout();
    if layout == "v2" {
        check(
            "device control",
            Status::Ok,
            "cgroup v2: a cgroup device program per sandbox",
            None,
        )
    } else if std::path::Path::new("/sys/fs/cgroup/devices/devices.allow").exists() {
        check(
            "device control",
            Status::Ok,
            "cgroup v1 devices controller",
            None,
        )
    } else {
        check(
            "device control",
            Status::Missing,
            "no devices controller on cgroup v1",
            Some("mount the devices controller, or boot with cgroup v2"),
        )
    }
}

/// `mount_setattr(2)` (Linux 5.12), which makes a sandbox's root read-only recursively.
fn mount_setattr() -> Check {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if parse_release(&release) >= (5, 12) {
        check(
            "read-only roots",
            Status::Ok,
            "mount_setattr available (Linux 5.12+)",
            None,
        )
    } else {
        check(
            "read-only roots",
            Status::Missing,
            format!("Linux {release} lacks mount_setattr"),
            Some("sandboxes need Linux 5.12 or newer for a read-only root"),
        )
    }
}

fn kernel() -> Check {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (major, minor) = parse_release(&release);
    // bpf_loop (the lc scheduler) arrived in 5.17; bpf_redirect_peer (the bypass) in 5.10.
    if (major, minor) >= (5, 17) {
        check("kernel", Status::Ok, format!("Linux {release}"), None)
    } else {
        check(
            "kernel",
            Status::Missing,
            format!("Linux {release}"),
            Some("Bulkhead needs Linux 5.17 or newer (bpf_loop)"),
        )
    }
}

/// `6.18.44-foo` -> (6, 18).
pub fn parse_release(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("btf", Status::Ok, "/sys/kernel/btf/vmlinux", None)
    } else {
        check(
            "btf",
            Status::Warn,
            "no /sys/kernel/btf/vmlinux",
            Some("a kernel built with CONFIG_DEBUG_INFO_BTF=y gives better verifier errors"),
        )
    }
}

fn bpffs_check() -> Check {
    let path = Path::new(bpffs::SYSTEM_MOUNT);
    if bpffs::is_bpffs(path) {
        return check(
            "bpffs",
            Status::Ok,
            format!("mounted at {}", path.display()),
            None,
        );
    }
    match bpffs::mount_at(path) {
        Ok(_) => check(
            "bpffs",
            Status::Ok,
            format!("was missing; mounted at {}", path.display()),
            None,
        ),
        Err(e) => check(
            "bpffs",
            Status::Missing,
            format!("not mounted at {}: {e}", path.display()),
            Some("mount -t bpf bpf /sys/fs/bpf"),
        ),
    }
}

fn capabilities() -> Check {
    // Bit numbers from include/uapi/linux/capability.h.
    const NEEDED: [(u32, &str); 3] = [
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
    ];
    let eff = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        check(
            "capabilities",
            Status::Ok,
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN",
            None,
        )
    } else {
        check(
            "capabilities",
            Status::Missing,
            format!("lacking {}", missing.join(", ")),
            Some("run bulkhead as root"),
        )
    }
}

fn tc_mode() -> Check {
    match TcMode::kernel_default() {
        TcMode::Tcx => check("tc", Status::Ok, "TCX links (Linux 6.6+)", None),
        TcMode::Netlink => check(
            "tc",
            Status::Ok,
            "netlink cls_bpf on clsact (no TCX before Linux 6.6)",
            None,
        ),
    }
}

/// The cgroup layout, as in systemd's terms: unified (v2 only), hybrid, or legacy (v1 only).
pub fn cgroup_layout() -> (&'static str, String) {
    let root = Path::new("/sys/fs/cgroup");
    let Ok(fs_type) = statfs(root).map(|s| s.filesystem_type()) else {
        return ("none", "nothing mounted at /sys/fs/cgroup".into());
    };
    if fs_type == CGROUP2_SUPER_MAGIC {
        let ctrl = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        return ("v2", format!("controllers: {}", ctrl.trim()));
    }
    let v1 = v1_controllers(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let unified = root.join("unified");
    if fs_type == TMPFS_MAGIC
        && statfs(&unified).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
    {
        let ctrl = fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
        let v2 = if ctrl.trim().is_empty() {
            "none".to_owned()
        } else {
            ctrl.trim().to_owned()
        };
        return (
            "hybrid",
            format!(
                "v1 controllers: {}; v2 at {} with controllers: {v2}",
                v1.join(","),
                unified.display()
            ),
        );
    }
    ("v1", format!("v1 controllers: {}", v1.join(",")))
}

/// Controller names of cgroup v1 (Documentation/admin-guide/cgroup-v1/).
const V1_CONTROLLERS: [&str; 14] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// Controllers of the cgroup v1 hierarchies in a mountinfo text, from each mount's superblock
/// options (`rw,cpu,cpuacct`); mount flags and named hierarchies (`name=systemd`) are skipped.
fn v1_controllers(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_once(" - cgroup "))
        .filter_map(|(_, rest)| rest.split(' ').nth(1))
        .flat_map(|opts| opts.split(','))
        .filter(|o| V1_CONTROLLERS.contains(o))
        .map(str::to_owned)
        .collect()
}

fn cgroups() -> Check {
    let (layout, detail) = cgroup_layout();
    let status = if layout == "none" {
        Status::Missing
    } else {
        Status::Ok
    };
    check(
        "cgroups",
        status,
        format!("{layout}; {detail}"),
        (layout == "none").then_some("mount cgroup2 on /sys/fs/cgroup"),
    )
}

fn ipvs() -> Check {
    if Path::new("/proc/net/ip_vs").exists() {
        return check("ipvs", Status::Ok, "loaded (/proc/net/ip_vs)", None);
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules = Path::new("/lib/modules").join(&release);
    let has_module =
        fs::read_to_string(modules.join("modules.dep")).is_ok_and(|d| d.contains("/ip_vs.ko"));
    if has_module {
        check(
            "ipvs",
            Status::Info,
            "available as a module, not loaded",
            Some("modprobe ip_vs (only the IPVS benchmark needs it)"),
        )
    } else {
        check(
            "ipvs",
            Status::Info,
            "not in this kernel",
            Some(
                "only the IPVS comparison needs it: `cargo xtask bench datapath --vm` boots a kernel that has it",
            ),
        )
    }
}

fn sysctl(name: &'static str, want: &str, status_if_not: Status, hint: &str) -> Check {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    match fs::read_to_string(&path) {
        Ok(v) if v.trim() == want => check(name, Status::Ok, format!("= {}", v.trim()), None),
        Ok(v) => check(
            name,
            status_if_not,
            format!("= {} (want {want})", v.trim()),
            Some(hint),
        ),
        Err(_) => check(name, Status::Info, "not present", None),
    }
}

fn br_netfilter() -> Check {
    let path = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    match fs::read_to_string(path) {
        Err(_) => check(
            "br_netfilter",
            Status::Ok,
            "not loaded: bridged traffic skips iptables",
            None,
        ),
        Ok(v) if v.trim() == "0" => check(
            "br_netfilter",
            Status::Ok,
            "loaded, bridge-nf-call-iptables = 0",
            None,
        ),
        Ok(_) => check(
            "br_netfilter",
            Status::Warn,
            "bridged traffic also traverses iptables",
            Some("sysctl net.bridge.bridge-nf-call-iptables=0 unless you rely on it"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn parses_kernel_releases() {
        let check = |release, expected| assert_eq!(parse_release(release), expected, "{release}");
        check("6.18.44-fc-v657", (6, 18));
        check("6.1.0-28-amd64", (6, 1));
        check("5.10", (5, 10));
        check("garbage", (0, 0));
    }

    #[test]
    fn v1_controllers_come_from_superblock_options() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
36 25 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
37 25 0:32 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
38 25 0:33 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            super::v1_controllers(mountinfo),
            ["cpu", "cpuacct", "memory"]
        );
    }
}
