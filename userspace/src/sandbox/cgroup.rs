//! The sandbox's cgroup, through cgroups-rs, on cgroup v2 and on v1 (including the v1/v2
//! hybrid, where the controllers are on v1).
//!
//! A sandbox's cgroup is `bulkhead/<name>` beneath the cgroup `bulkhead` itself runs in (per
//! controller on v1, where each hierarchy places it differently), or beneath `--cgroup-parent`.
//! That is the subtree delegated to whoever runs `bulkhead`; no process is ever moved out of it.
//! Only the controllers the limits, device control and `stats` need are touched: memory, cpu
//! (and cpuacct on v1), pids, and devices on v1.

use std::{collections::HashMap, fs, path::PathBuf};

use cgroups_rs::fs::{
    Cgroup, Controller, Hierarchy, MaxValue, Subsystem, cgroup::get_cgroups_relative_paths,
    cpu::CpuController, cpuacct::CpuAcctController, hierarchies, memory::MemController,
    pid::PidController,
};

use super::SandboxError;

/// The controllers a sandbox uses (v1 names; v2 has no cpuacct).
const CONTROLLERS: [&str; 7] = [
    "memory", "cpu", "cpuacct", "pids", "devices", "cpuset", "blkio",
];
/// CFS period for `--cpus`, as docker uses.
const CFS_PERIOD_US: u64 = 100_000;

/// A hierarchy narrowed to [`CONTROLLERS`]: cgroups-rs would otherwise create the cgroup in every
/// v1 hierarchy mounted (cpuset among them, where a new cgroup takes no task until someone fills
/// in its CPUs and memory nodes).
#[derive(Debug)]
struct Narrowed(Box<dyn Hierarchy>);

impl Narrowed {
    fn auto() -> Self {
        Narrowed(hierarchies::auto())
    }
}

impl Hierarchy for Narrowed {
    fn subsystems(&self) -> Vec<Subsystem> {
        self.0
            .subsystems()
            .into_iter()
            .filter(|s| CONTROLLERS.contains(&s.controller_name().as_str()))
            .collect()
    }
    fn root(&self) -> PathBuf {
        self.0.root()
    }
    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(Narrowed::auto()), "")
    }
    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = std::path::Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        Cgroup::load(Box::new(Narrowed::auto()), parent)
    }
    fn v2(&self) -> bool {
        self.0.v2()
    }
}

/// Where a sandbox's cgroup is, as recorded in its state (enough to find it again).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub v2: bool,
    /// v2: the path below the cgroup2 root. v1: the path below each controller's parent.
    pub path: String,
    /// v1: each controller's parent path (the cgroup `bulkhead` runs in, per hierarchy).
    pub parents: HashMap<String, String>,
}

impl Placement {
    /// Where a sandbox called `name` goes: beneath `parent` if given, else beneath this
    /// process's own cgroup.
    pub fn for_sandbox(name: &str, parent: Option<&str>) -> Result<Self, SandboxError> {
        let v2 = hierarchies::is_cgroup2_unified_mode();
        let leaf = format!("bulkhead/{name}");
        let own = || {
            get_cgroups_relative_paths()
                .map_err(|e| SandboxError::cgroup("read /proc/self/cgroup", e))
        };
        if v2 {
            let base = match parent {
                Some(p) => p.trim_matches('/').to_owned(),
                None => own()?
                    .get("")
                    .cloned()
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_owned(),
            };
            let path = if base.is_empty() {
                leaf
            } else {
                format!("{base}/{leaf}")
            };
            return Ok(Placement {
                v2,
                path,
                parents: HashMap::new(),
            });
        }
        let parents = if let Some(p) = parent {
            CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), p.to_owned()))
                .collect()
        } else {
            let own = own()?;
            CONTROLLERS
                .iter()
                .map(|c| {
                    (
                        c.to_string(),
                        own.get(*c).cloned().unwrap_or_else(|| "/".into()),
                    )
                })
                .collect()
        };
        Ok(Placement {
            v2,
            path: leaf,
            parents,
        })
    }

    fn load(&self) -> Cgroup {
        Cgroup::load_with_relative_paths(
            Box::new(Narrowed::auto()),
            &self.path,
            self.parents.clone(),
        )
    }

    /// The directory of the v1 controller `name` (v2: the one directory), if mounted.
    pub fn controller_dir(&self, name: &str) -> Option<PathBuf> {
        self.load()
            .subsystems()
            .iter()
            .find(|s| self.v2 || s.controller_name() == name)
            .map(|s| s.to_controller().path().to_owned())
    }

    /// The directory of each controller, for messages and tests.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.load()
            .subsystems()
            .iter()
            .map(|s| s.to_controller().path().to_owned())
            .collect()
    }
}

/// Resource limits from `run`.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Relative CPU weight, cgroup v1's `cpu.shares` (v2: mapped onto `cpu.weight`).
    pub cpu_shares: Option<u64>,
    /// The memory soft limit: v1's `memory.soft_limit_in_bytes`, v2's `memory.low`.
    pub memory_reservation: Option<u64>,
    /// Memory plus swap (`--memory-swap`; -1 for unlimited swap).
    pub memory_swap: Option<i64>,
    /// CPUs and memory nodes the sandbox may use, as cpuset lists (`0-1,3`).
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// Relative block I/O weight, 10 to 1000.
    pub blkio_weight: Option<u16>,
    /// Read and write limits in bytes per second per block device.
    pub read_bps: Vec<super::spec::IoLimit>,
    pub write_bps: Vec<super::spec::IoLimit>,
}

/// Creates the cgroup with `limits`; on failure removes what it created.
pub fn create(placement: &Placement, limits: &Limits) -> Result<(), SandboxError> {
    let cg = placement.load();
    if cg.subsystems().is_empty() {
        return Err(SandboxError::Cgroup {
            action: "find a cgroup hierarchy with the memory, cpu and pids controllers".into(),
            source: std::io::Error::other("none mounted"),
        });
    }
    cg.create()
        .map_err(|e| SandboxError::cgroup(&format!("create {}", placement.path), e))?;
    if let Err(e) = apply(&cg, limits) {
        let _ = cg.delete();
        return Err(e);
    }
    Ok(())
}

fn apply(cg: &Cgroup, limits: &Limits) -> Result<(), SandboxError> {
    if let Some(bytes) = limits.memory {
        let mem: &MemController = controller(cg, "memory")?;
        mem.set_limit(bytes as i64)
            .map_err(|e| SandboxError::cgroup("set the memory limit", e))?;
        // No swap beyond the limit, so exceeding it is an OOM kill, as docker does with
        // --memory alone when swap accounting is on. Absent files (no swap accounting) are fine.
        let _ = mem.set_memswap_limit(bytes as i64);
        let _ = fs::write(mem.path().join("memory.swap.max"), "0");
    }
    if let Some(cpus) = limits.cpus {
        let cpu: &CpuController = controller(cg, "cpu")?;
        let quota = (cpus * CFS_PERIOD_US as f64).round() as i64;
        cpu.set_cfs_quota_and_period(Some(quota.max(1000)), Some(CFS_PERIOD_US))
            .map_err(|e| SandboxError::cgroup("set the cpu quota", e))?;
    }
    if let Some(shares) = limits.cpu_shares {
        let cpu: &CpuController = controller(cg, "cpu")?;
        // cgroups-rs maps shares onto cpu.weight on v2, as runc does.
        cpu.set_shares(shares)
            .map_err(|e| SandboxError::cgroup("set the cpu shares", e))?;
    }
    if let Some(bytes) = limits.memory_reservation {
        let mem: &MemController = controller(cg, "memory")?;
        mem.set_soft_limit(bytes as i64)
            .map_err(|e| SandboxError::cgroup("set the memory reservation", e))?;
    }
    apply_placement_and_io(cg, limits)?;
    if let Some(max) = limits.pids {
        let pids: &PidController = controller(cg, "pids")?;
        pids.set_pid_max(MaxValue::Value(max as i64))
            .map_err(|e| SandboxError::cgroup("set the pids limit", e))?;
    }
    Ok(())
}

/// The directory of controller `name` (cgroups-rs's name: `blkio` for v2's io too).
fn dir_of(cg: &Cgroup, name: &str) -> Result<PathBuf, SandboxError> {
    cg.subsystems()
        .iter()
        .find(|s| s.controller_name() == name)
        .map(|s| s.to_controller().path().to_owned())
        .ok_or_else(|| SandboxError::Cgroup {
            action: format!("find the {name} controller"),
            source: std::io::Error::other("not available in this cgroup hierarchy"),
        })
}

fn write(dir: &std::path::Path, file: &str, value: &str) -> Result<(), SandboxError> {
    fs::write(dir.join(file), value).map_err(|source| SandboxError::Cgroup {
        action: format!("write {value:?} to {file}"),
        source,
    })
}

/// cpuset, swap and block I/O: files written directly, their names and formats differing
/// between v1 and v2 more than cgroups-rs hides.
fn apply_placement_and_io(cg: &Cgroup, limits: &Limits) -> Result<(), SandboxError> {
    let v2 = cg.v2();
    if let Some(cpus) = &limits.cpuset_cpus {
        write(&dir_of(cg, "cpuset")?, "cpuset.cpus", cpus)?;
    }
    if let Some(mems) = &limits.cpuset_mems {
        write(&dir_of(cg, "cpuset")?, "cpuset.mems", mems)?;
    }
    if let Some(swap) = limits.memory_swap {
        let dir = dir_of(cg, "memory")?;
        if v2 {
            // v2 limits swap alone: the total minus the memory limit.
            let value = match (swap, limits.memory) {
                (-1, _) => "max".to_owned(),
                (total, Some(memory)) => (total as u64).saturating_sub(memory).to_string(),
                (total, None) => total.to_string(),
            };
            write(&dir, "memory.swap.max", &value)?;
        } else {
            write(&dir, "memory.memsw.limit_in_bytes", &swap.to_string())?;
        }
    }
    if let Some(weight) = limits.blkio_weight {
        let dir = dir_of(cg, "blkio")?;
        // CFQ's weight is gone from recent kernels; BFQ's takes its place when BFQ is used.
        let candidates: &[(&str, String)] = if v2 {
            &[
                ("io.weight", format!("default {weight}")),
                ("io.bfq.weight", weight.to_string()),
            ]
        } else {
            &[
                ("blkio.weight", weight.to_string()),
                ("blkio.bfq.weight", weight.to_string()),
            ]
        };
        let file = candidates
            .iter()
            .find(|(f, _)| dir.join(f).exists())
            .ok_or_else(|| SandboxError::Cgroup {
                action: "set the block I/O weight".into(),
                source: std::io::Error::other(
                    "this kernel has no I/O weight (io.weight or BFQ's) for the cgroup",
                ),
            })?;
        write(&dir, file.0, &file.1)?;
    }
    let throttles = [("read", &limits.read_bps), ("write", &limits.write_bps)];
    for (way, list) in throttles {
        for l in list {
            let dir = dir_of(cg, "blkio")?;
            if v2 {
                let key = if way == "read" { "rbps" } else { "wbps" };
                write(
                    &dir,
                    "io.max",
                    &format!("{}:{} {key}={}", l.major, l.minor, l.bps),
                )?;
            } else {
                write(
                    &dir,
                    &format!("blkio.throttle.{way}_bps_device"),
                    &format!("{}:{} {}", l.major, l.minor, l.bps),
                )?;
            }
        }
    }
    Ok(())
}

fn controller<'a, T>(cg: &'a Cgroup, name: &str) -> Result<&'a T, SandboxError>
where
    &'a T: From<&'a Subsystem>,
    T: Controller + cgroups_rs::fs::ControllIdentifier,
{
    cg.controller_of::<T>().ok_or_else(|| SandboxError::Cgroup {
        action: format!("find the {name} controller"),
        source: std::io::Error::other("not available in this cgroup hierarchy"),
    })
}

/// Moves process `pid` into the sandbox's cgroup (a process entering the subtree, never
/// leaving it).
pub fn add(placement: &Placement, pid: u32) -> Result<(), SandboxError> {
    placement
        .load()
        .add_task_by_tgid(cgroups_rs::CgroupPid::from(u64::from(pid)))
        .map_err(|e| SandboxError::cgroup("add the process to its cgroup", e))
}

/// Processes in the cgroup.
pub fn procs(placement: &Placement) -> Vec<u32> {
    let mut pids: Vec<u32> = placement
        .load()
        .procs()
        .into_iter()
        .map(|p| p.pid as u32)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in the cgroup, then removes it (waiting a little for the kernel to
/// let go of the dying processes).
pub fn destroy(placement: &Placement) -> Result<(), SandboxError> {
    let cg = placement.load();
    if !cg.exists() {
        return Ok(());
    }
    let mut last = None;
    for _ in 0..100 {
        for pid in procs(placement) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match cg.delete() {
            Ok(()) if !cg.exists() => return Ok(()),
            Ok(()) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(match last {
        Some(e) => SandboxError::cgroup(&format!("remove {}", placement.path), e),
        None => SandboxError::Cgroup {
            action: format!("remove {}", placement.path),
            source: std::io::Error::other("still busy"),
        },
    })
}

/// What `bulkhead stats` reports, from the cgroup's own accounting.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub oom_kills: u64,
    pub cpu_usec: u64,
    pub throttled_usec: u64,
    pub throttled_periods: u64,
    pub pids: u64,
    pub pids_limit: Option<u64>,
    /// Bytes read from and written to block devices.
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    /// The CPUs the sandbox may run on.
    pub cpuset_cpus: String,
}

/// Reads the sandbox's usage.
pub fn usage(placement: &Placement) -> Usage {
    let cg = placement.load();
    let mut u = Usage::default();
    let read = |dir: &std::path::Path, file: &str| fs::read_to_string(dir.join(file)).ok();
    let keyed = |text: &str, key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    if let Some(mem) = cg.controller_of::<MemController>() {
        let dir = mem.path();
        if placement.v2 {
            u.memory_bytes = read(dir, "memory.current")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            u.memory_peak_bytes = read(dir, "memory.peak")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            u.memory_limit_bytes = read(dir, "memory.max").and_then(|s| s.trim().parse().ok());
            u.oom_kills = read(dir, "memory.events")
                .and_then(|s| keyed(&s, "oom_kill"))
                .unwrap_or(0);
        } else {
            let m = mem.memory_stat();
            u.memory_bytes = m.usage_in_bytes;
            u.memory_peak_bytes = m.max_usage_in_bytes;
            // v1 reports "no limit" as a huge page-aligned number.
            u.memory_limit_bytes = u64::try_from(m.limit_in_bytes)
                .ok()
                .filter(|&l| l < 1 << 62);
            u.oom_kills = m.oom_control.oom_kill;
        }
    }
    if let Some(cpu) = cg.controller_of::<CpuController>() {
        let stat = read(cpu.path(), "cpu.stat").unwrap_or_default();
        u.throttled_periods = keyed(&stat, "nr_throttled").unwrap_or(0);
        if placement.v2 {
            u.cpu_usec = keyed(&stat, "usage_usec").unwrap_or(0);
            u.throttled_usec = keyed(&stat, "throttled_usec").unwrap_or(0);
        } else {
            u.throttled_usec = keyed(&stat, "throttled_time").unwrap_or(0) / 1000;
        }
    }
    if !placement.v2
        && let Some(acct) = cg.controller_of::<CpuAcctController>()
    {
        u.cpu_usec = acct.cpuacct().usage / 1000;
    }
    if let Ok(dir) = dir_of(&cg, "blkio") {
        let (file, read_key, write_key) = if placement.v2 {
            ("io.stat", "rbytes=", "wbytes=")
        } else {
            (
                "blkio.throttle.io_service_bytes_recursive",
                "Read ",
                "Write ",
            )
        };
        for line in read(&dir, file).unwrap_or_default().lines() {
            let field = |key: &str| -> u64 {
                if placement.v2 {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(key)?.parse().ok())
                        .unwrap_or(0)
                } else {
                    // `MAJ:MIN Read N`
                    line.split_once(' ')
                        .and_then(|(_, rest)| rest.strip_prefix(key)?.trim().parse().ok())
                        .unwrap_or(0)
                }
            };
            u.io_read_bytes += field(read_key);
            u.io_write_bytes += field(write_key);
        }
    }
    if let Ok(dir) = dir_of(&cg, "cpuset") {
        let file = if placement.v2 {
            "cpuset.cpus.effective"
        } else {
            "cpuset.cpus"
        };
        read(&dir, file)
            .unwrap_or_default()
            .trim()
            .clone_into(&mut u.cpuset_cpus);
    }
    if let Some(pids) = cg.controller_of::<PidController>() {
        u.pids = pids.get_pid_current().unwrap_or(0);
        u.pids_limit = match pids.get_pid_max() {
            Ok(MaxValue::Value(v)) => u64::try_from(v).ok(),
            _ => None,
        };
    }
    u
}
