//! Sandboxes: `bulkhead run`, `ps`, `exec`, `stop`, `rm`, `stats`, `logs`.
//!
//! A sandbox is a process tree in new pid, mount, uts, ipc and network namespaces (user and
//! cgroup ones on request) with `bulkhead-init` as its PID 1, a veth pair into the node's bridge
//! (datapath attached, registered as an endpoint for the stack bypass) and a cgroup with its
//! limits. Its state lives in the state dir, so separate commands cooperate through it:
//!
//! ```text
//! <state>/sandboxes/<name>/record.json   what was made (the source of truth for rm)
//! <state>/sandboxes/<name>/ns/{net,uts,ipc}   namespace bind mounts
//! <state>/sandboxes/<name>/log, exit     a detached sandbox's output and exit status
//! <state>/leases/<addr>                  address leases (created exclusively: no collisions;
//!                                         `drain:HOST_IF` while a removed sandbox's veth goes)
//! ```
//!
//! Everything `run` creates is undone by [`remove`], which tolerates pieces that are already
//! gone; a `run` that fails part way calls it on what it made.

pub mod apparmor;
pub mod cgroup;
pub mod devices;
pub mod network;
pub mod process;
pub mod seccomp;
pub mod spec;

use std::{
    ffi::CString,
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
pub use spec::{Name, Publish, RunSpec};

use self::network::{NodeDoor, PortHolder};
use crate::{
    link::LinkError,
    lock::Mode,
    node::{NodeError, Paths},
    services::{Proto, ServiceTableError},
    subnet::Subnet,
};

/// The PATH a sandbox's command is looked up in (and gets) unless `--env PATH=...` says otherwise.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Environment variable naming the `bulkhead-init` binary.
pub const INIT_ENV: &str = "BULKHEAD_INIT";
/// First outside id and count of a `--userns` sandbox's mapping (root inside is this id).
const USERNS_FIRST: u32 = 100_000;
const USERNS_COUNT: u32 = 65_536;
/// Namespaces kept by bind mounts in the sandbox's state.
const BOUND_NAMESPACES: [&str; 3] = ["net", "uts", "ipc"];
/// Signals a foreground `run` passes on to the sandbox.
const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("invalid {what} {value:?}: {why}")]
    BadValue {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("a sandbox named {name} already exists")]
    NameInUse { name: Name },
    #[error("no sandbox named {name}")]
    Unknown { name: String },
    #[error("sandbox {name} is running; stop it first, or remove it with --force")]
    Running { name: Name },
    #[error("rootfs {path} is not a directory")]
    RootfsMissing { path: PathBuf },
    #[error("command not found: {command} (looked in {} of the sandbox's root {})", DEFAULT_PATH, root.display())]
    CommandNotFound { command: String, root: PathBuf },
    #[error("no command to run (give it after --)")]
    NoCommand,
    #[error(
        "cannot find bulkhead-init (set {INIT_ENV}, or put it next to bulkhead); `cargo xtask build` builds it"
    )]
    NoInit,
    #[error("the node has no pod subnet; bring it up with `bulkhead up --subnet ADDR/LEN`")]
    NoSubnet,
    #[error("{addr} is not in the pod subnet {subnet}")]
    AddressOutside { addr: Ipv4Addr, subnet: String },
    #[error("address {addr} is already in use by {holder}")]
    AddressTaken { addr: Ipv4Addr, holder: String },
    #[error("no free address left in {subnet}")]
    SubnetFull { subnet: String },
    #[error("cannot publish port {port}/{proto}: address already in use by {holder}")]
    PortInUse {
        port: u16,
        proto: Proto,
        holder: String,
    },
    #[error("setting up the sandbox failed: {message}")]
    Setup { message: String },
    /// An error the detached run's monitor reported, already worded.
    #[error("{0}")]
    Reported(String),
    #[error("cannot {action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup: cannot {action}")]
    Cgroup {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot take the node lock")]
    Lock(#[from] crate::lock::LockError),
    #[error("cannot plug the sandbox into the node")]
    Node(#[from] NodeError),
    #[error("cannot set up the sandbox's veth")]
    Link(#[from] LinkError),
    #[error("cannot publish a port")]
    Service(#[from] ServiceTableError),
}

impl SandboxError {
    fn io(action: &str, source: io::Error) -> Self {
        SandboxError::Io {
            action: action.to_owned(),
            source,
        }
    }

    fn cgroup(action: &str, e: cgroups_rs::fs::error::Error) -> Self {
        SandboxError::Cgroup {
            action: action.to_owned(),
            source: io::Error::other(e.to_string()),
        }
    }
}

type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// What `run` made, as `ps`, `exec`, `stop`, `rm` and `stats` find it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: Name,
    pub pid: i32,
    /// Start time of `pid` (clock ticks after boot), so a reused pid is not mistaken for it.
    pub start_time: u64,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// The host side of the veth pair, on the bridge.
    pub host_if: String,
    pub mac: String,
    pub hostname: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub detached: bool,
    pub userns: bool,
    pub cgroupns: bool,
    pub privileged: bool,
    pub rootfs: Option<PathBuf>,
    pub cgroup: cgroup::Placement,
    pub publish: Vec<Publish>,
    pub created_unix: u64,
    /// The process that waits for a detached sandbox and records its exit status (0: none).
    #[serde(default)]
    pub monitor_pid: i32,
    /// The capabilities its processes keep (`exec` gives them the same).
    #[serde(default = "process::default_caps")]
    pub caps: u64,
    /// The user its processes run as.
    #[serde(default)]
    pub user: Option<spec::User>,
    /// Its seccomp filter (`exec` installs the same).
    #[serde(default)]
    pub seccomp: seccomp::Policy,
    /// Its AppArmor profile (`exec` enters the same).
    #[serde(default)]
    pub apparmor: Option<String>,
}

fn sandboxes_dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("sandboxes")
}

fn sandbox_dir(paths: &Paths, name: &Name) -> PathBuf {
    sandboxes_dir(paths).join(name.as_str())
}

impl Record {
    pub fn load(paths: &Paths, name: &str) -> Result<Self> {
        let unknown = || SandboxError::Unknown {
            name: name.to_owned(),
        };
        let name: Name = name.parse().map_err(|_| unknown())?;
        let text = fs::read_to_string(sandbox_dir(paths, &name).join("record.json"))
            .map_err(|_| unknown())?;
        serde_json::from_str(&text)
            .map_err(|e| SandboxError::io("parse the sandbox record", io::Error::other(e)))
    }

    fn save(&self, paths: &Paths) -> Result<()> {
        let dir = sandbox_dir(paths, &self.name);
        let tmp = dir.join("record.json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| SandboxError::io("encode the record", io::Error::other(e)))?;
        fs::write(&tmp, text).map_err(|e| SandboxError::io("write the sandbox record", e))?;
        fs::rename(&tmp, dir.join("record.json"))
            .map_err(|e| SandboxError::io("write the sandbox record", e))
    }

    /// True while the sandbox's init runs (not a zombie, not a reused pid).
    pub fn running(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if state != 'Z' && state != 'X' && start == self.start_time)
    }

    /// Exit status of a sandbox that ended, when known (detached sandboxes record it).
    pub fn exit_code(&self, paths: &Paths) -> Option<i32> {
        fs::read_to_string(sandbox_dir(paths, &self.name).join("exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// State and start time of a process, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Every sandbox record, by name.
pub fn list(paths: &Paths) -> Vec<Record> {
    let mut all: Vec<Record> = fs::read_dir(sandboxes_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Record::load(paths, &e.file_name().to_string_lossy()).ok())
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The command's environment, for `run` and `exec` alike: PATH, HOSTNAME, HOME (and the
/// caller's TERM when given), overridden by `--env`.
fn environment(
    hostname: &str,
    env: &[(String, String)],
    term: Option<String>,
) -> Result<Vec<CString>> {
    let mut all = vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOSTNAME".to_owned(), hostname.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ];
    all.extend(term.map(|t| ("TERM".to_owned(), t)));
    for (k, v) in env {
        all.retain(|(key, _)| key != k);
        all.push((k.clone(), v.clone()));
    }
    process::c_strings(all.iter().map(|(k, v)| format!("{k}={v}")))
}

/// The PATH the command is looked up in: `--env PATH=...`, or [`DEFAULT_PATH`].
fn path_of(env: &[(String, String)]) -> &str {
    env.iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
}

/// Finds `bulkhead-init`: [`INIT_ENV`], next to this executable, or in PATH.
fn find_init() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(INIT_ENV) {
        return Ok(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("bulkhead-init")));
    let in_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("bulkhead-init"))
            .collect::<Vec<_>>()
    });
    beside
        .into_iter()
        .chain(in_path)
        .find(|p| p.is_file())
        .ok_or(SandboxError::NoInit)
}

/// The outcome of a foreground `run`: the command's exit status, as a shell reports it.
pub struct Exit(pub i32);

/// `bulkhead run`: creates the sandbox and runs the command in it. In the foreground, waits,
/// forwarding signals, removes the sandbox and returns the command's status; with `detach`,
/// returns once the command runs, leaving a monitor process to collect its status.
///
/// The node lock is held while the sandbox is made and while it is removed, not while its
/// command runs: `lock_timeout` bounds the first wait (the removal waits as long as it takes,
/// so nothing is left behind).
pub fn run(
    paths: &Paths,
    spec: &RunSpec,
    lock_timeout: Option<Duration>,
) -> Result<(Name, Option<Exit>)> {
    if spec.detach {
        return run_detached(paths, spec, lock_timeout).map(|name| (name, None));
    }
    // Blocked before the clone so none is lost; the child unblocks them.
    let forwarded = block_forwarded()?;
    let lock = paths.lock(Mode::Exclusive, lock_timeout)?;
    let record = start(paths, spec, None)?;
    drop(lock);
    let code = wait_forwarding(Pid::from_raw(record.pid), &forwarded);
    let _ = forwarded.thread_unblock();
    let _lock = paths.lock(Mode::Exclusive, None)?;
    remove_as(paths, &record, Teardown::Drain)?;
    Ok((record.name, Some(Exit(code))))
}

/// Blocks the signals a waiting `run` or `exec` passes on (and SIGCHLD), to take them with
/// `sigwait`.
fn block_forwarded() -> Result<nix::sys::signal::SigSet> {
    let mut set = nix::sys::signal::SigSet::empty();
    for &s in &FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set.thread_block()
        .map_err(|e| SandboxError::io("block signals", e.into()))?;
    Ok(set)
}

/// Waits for `pid`, passing on every forwarded signal; returns its status as a shell would.
fn wait_forwarding(pid: Pid, set: &nix::sys::signal::SigSet) -> i32 {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Err(_) => return 255,
            _ => {}
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(pid, sig);
            }
        }
    }
}

/// `run -d`: a monitor process (its own session) creates the sandbox, reports back, and stays
/// to collect the exit status; the command's output goes to the sandbox's log.
fn run_detached(paths: &Paths, spec: &RunSpec, lock_timeout: Option<Duration>) -> Result<Name> {
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::io("create a pipe", e.into()))?;
    let name = spec.name.clone().unwrap_or_else(generated_name);
    let spec = RunSpec {
        name: Some(name.clone()),
        ..spec.clone()
    };
    // Bad input is reported here, with its own error, before the monitor exists.
    prepare(paths, &spec)?;
    if sandbox_dir(paths, &name).exists() {
        return Err(SandboxError::NameInUse { name });
    }
    // SAFETY: this process is single-threaded (the CLI runs no threads), so the child may do
    // anything the parent could.
    match unsafe { nix::unistd::fork() }
        .map_err(|e| SandboxError::io("fork the monitor", e.into()))?
    {
        nix::unistd::ForkResult::Child => {
            drop(report_r);
            let mut report = fs::File::from(report_w);
            let _ = nix::unistd::setsid();
            if let Ok(null) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                // SAFETY: dup2 onto this process's standard descriptors.
                unsafe {
                    libc::dup2(null.as_raw_fd(), 0);
                    libc::dup2(null.as_raw_fd(), 1);
                    libc::dup2(null.as_raw_fd(), 2);
                }
            }
            let code = match monitor(paths, &spec, lock_timeout, &mut report) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = write!(report, "{}", error_chain(&e));
                    1
                }
            };
            // SAFETY: leave without running the CLI's exit path in this copy.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(report_w);
            let mut message = String::new();
            let mut file = fs::File::from(report_r);
            let _ = file.read_to_string(&mut message);
            if message == "ok" {
                Ok(name)
            } else {
                let _ = waitpid(child, None);
                Err(if message.is_empty() {
                    SandboxError::Setup {
                        message: "the monitor process died".into(),
                    }
                } else {
                    SandboxError::Reported(message)
                })
            }
        }
    }
}

fn monitor(
    paths: &Paths,
    spec: &RunSpec,
    lock_timeout: Option<Duration>,
    report: &mut fs::File,
) -> Result<()> {
    let name = spec.name.clone().expect("named by run_detached");
    let log_path = sandbox_dir(paths, &name).join("log");
    let lock = paths.lock(Mode::Exclusive, lock_timeout)?;
    let record = start(paths, spec, Some(log_path))?;
    drop(lock);
    let _ = report.write_all(b"ok");
    drop(std::mem::replace(
        report,
        fs::File::open("/dev/null").map_err(|e| SandboxError::io("open /dev/null", e))?,
    ));
    let status = match waitpid(Pid::from_raw(record.pid), None) {
        Ok(WaitStatus::Exited(_, code)) => code,
        Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
        _ => 255,
    };
    let _ = fs::write(
        sandbox_dir(paths, &record.name).join("exit"),
        format!("{status}\n"),
    );
    Ok(())
}

pub use crate::error_chain;

fn generated_name() -> Name {
    let mut bytes = [0u8; 4];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    format!(
        "sb-{}",
        bytes.iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
    )
    .parse()
    .expect("a valid name")
}

/// What `run` checked and found before making anything.
struct Prepared<'a> {
    door: NodeDoor<'a>,
    /// The AppArmor profile the sandbox enters, if any.
    apparmor: Option<String>,
    subnet: Subnet,
    name: Name,
    hostname: String,
    root: PathBuf,
    init: fs::File,
}

/// Checks everything that can be checked before anything is made: bad input leaves nothing
/// behind.
fn prepare<'a>(paths: &'a Paths, spec: &RunSpec) -> Result<Prepared<'a>> {
    let command = spec.command.first().ok_or(SandboxError::NoCommand)?;
    let door = NodeDoor::open(paths)?;
    let subnet = door.subnet()?;
    let name = spec.name.clone().unwrap_or_else(generated_name);
    let hostname = spec.hostname.clone().unwrap_or_else(|| name.to_string());
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains(['/', '\0']) {
        return Err(SandboxError::BadValue {
            what: "hostname",
            value: hostname,
            why: "1 to 64 bytes, no '/'".into(),
        });
    }
    let root = match &spec.rootfs {
        Some(r) if r.is_dir() => r
            .canonicalize()
            .map_err(|e| SandboxError::io("resolve the rootfs", e))?,
        Some(r) => return Err(SandboxError::RootfsMissing { path: r.clone() }),
        None => PathBuf::from("/"),
    };
    process::resolve_command(&root, command, path_of(&spec.env))?;
    let init =
        fs::File::open(find_init()?).map_err(|e| SandboxError::io("open bulkhead-init", e))?;
    if let Some(ip) = spec.ip
        && (!subnet.contains(ip) || ip == subnet.gateway)
    {
        return Err(SandboxError::AddressOutside {
            addr: ip,
            subnet: subnet.to_string(),
        });
    }
    for p in &spec.publish {
        check_publish(paths, &door, p)?;
    }
    let apparmor = if spec.privileged {
        None
    } else {
        apparmor::profile_for(spec.apparmor.as_deref())?
    };
    Ok(Prepared {
        door,
        apparmor,
        subnet,
        name,
        hostname,
        root,
        init,
    })
}

/// Creates the sandbox and starts its command; on failure removes whatever it made.
fn start(paths: &Paths, spec: &RunSpec, log: Option<PathBuf>) -> Result<Record> {
    let Prepared {
        door,
        apparmor,
        subnet,
        name,
        hostname,
        root,
        init,
    } = prepare(paths, spec)?;
    let dir = sandbox_dir(paths, &name);
    fs::create_dir_all(sandboxes_dir(paths))
        .map_err(|e| SandboxError::io("create the state dir", e))?;
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(SandboxError::NameInUse { name });
        }
        Err(e) => return Err(SandboxError::io("create the sandbox's state dir", e)),
    }
    // From here on, a failure removes what was made.
    let mut record = Record {
        name: name.clone(),
        pid: 0,
        start_time: 0,
        addr: Ipv4Addr::UNSPECIFIED,
        prefix: subnet.prefix,
        host_if: String::new(),
        mac: String::new(),
        hostname,
        command: spec.command.clone(),
        env: spec.env.clone(),
        workdir: spec.workdir.clone().unwrap_or_else(|| "/".into()),
        detached: spec.detach,
        userns: spec.userns,
        cgroupns: spec.cgroupns,
        privileged: spec.privileged,
        rootfs: spec.rootfs.as_ref().map(|_| root.clone()),
        cgroup: cgroup::Placement {
            v2: false,
            path: String::new(),
            parents: std::collections::HashMap::new(),
        },
        publish: Vec::new(),
        caps: spec
            .cap_add
            .iter()
            .fold(process::default_caps(), |m, c| m | c.mask())
            & !spec.cap_drop.iter().fold(0, |m, c| m | c.mask()),
        user: spec.user,
        seccomp: spec.seccomp.clone(),
        apparmor,
        monitor_pid: if spec.detach {
            std::process::id() as i32
        } else {
            0
        },
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    match build(paths, spec, &door, subnet, init, log, &mut record) {
        Ok(()) => Ok(record),
        Err(e) => {
            if record.pid > 0 {
                let _ = kill(Pid::from_raw(record.pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(record.pid), None);
            }
            let _ = remove(paths, &record);
            Err(e)
        }
    }
}

fn build(
    paths: &Paths,
    spec: &RunSpec,
    door: &NodeDoor<'_>,
    subnet: Subnet,
    init: fs::File,
    log: Option<PathBuf>,
    record: &mut Record,
) -> Result<()> {
    record.addr = lease(
        paths,
        &record.name,
        spec.ip,
        subnet,
        &door.registered_pods(),
    )?;
    record.cgroup =
        cgroup::Placement::for_sandbox(record.name.as_str(), spec.cgroup_parent.as_deref())?;
    cgroup::create(
        &record.cgroup,
        &cgroup::Limits {
            memory: spec.memory,
            cpus: spec.cpus,
            pids: spec.pids_limit,
            cpu_shares: spec.cpu_shares,
            memory_reservation: spec.memory_reservation,
            memory_swap: spec.memory_swap,
            cpuset_cpus: spec.cpuset_cpus.clone(),
            cpuset_mems: spec.cpuset_mems.clone(),
            blkio_weight: spec.blkio_weight,
            read_bps: spec.read_bps.clone(),
            write_bps: spec.write_bps.clone(),
        },
    )?;
    if !spec.privileged {
        devices::restrict(paths, &record.cgroup, &spec.devices)?;
    }

    let mut argv = vec!["bulkhead-init".to_owned(), "--".to_owned()];
    argv.extend(spec.command.iter().cloned());
    let log = match log {
        Some(path) => Some(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(|e| SandboxError::io("create the sandbox's log", e))?,
        ),
        None => None,
    };
    let child_spec = process::ChildSpec {
        hostname: record.hostname.clone(),
        rootfs: record.rootfs.clone(),
        workdir: record.workdir.clone(),
        argv: process::c_strings(&argv)?,
        envp: environment(&record.hostname, &spec.env, std::env::var("TERM").ok())?,
        userns: spec.userns,
        cgroupns: spec.cgroupns,
        privileged: spec.privileged,
        init,
        log,
        read_only_root: spec.rootfs.is_none() || spec.read_only,
        volumes: spec.volumes.clone(),
        caps: record.caps,
        user: spec.user,
        ulimits: spec.ulimits.clone(),
        time_offsets: spec.time_offsets,
        devices: spec
            .devices
            .iter()
            .map(|d| (d.host.clone(), d.name.clone()))
            .collect(),
        apparmor: record
            .apparmor
            .as_deref()
            .map(CString::new)
            .transpose()
            .map_err(|_| SandboxError::BadValue {
                what: "apparmor profile",
                value: record.apparmor.clone().unwrap_or_default(),
                why: "contains a NUL byte".into(),
            })?,
        seccomp: if spec.privileged {
            Vec::new()
        } else {
            seccomp::filters(&spec.seccomp, record.caps)?
        },
    };
    let mut child = process::spawn(&child_spec)?;
    record.pid = child.pid.as_raw();
    record.start_time = proc_stat(record.pid).map_or(0, |(_, t)| t);
    // The cgroup move (v1: an RCU grace period for cgroup_threadgroup_rwsem) and the veth
    // are independent, and the child's mounts need only the first: all at once.
    let (pid, addr) = (record.pid, record.addr);
    let (plugged, placed) = std::thread::scope(|scope| {
        let net = scope.spawn(move || door.plug(pid, addr, subnet));
        let placed = (|| {
            cgroup::add(&record.cgroup, pid as u32)?;
            if spec.userns {
                child.map_users(USERNS_FIRST, USERNS_COUNT)?;
            }
            child.open_gate()
        })();
        let plugged = net.join().unwrap_or_else(|_| {
            Err(SandboxError::Setup {
                message: "the thread plugging the veth panicked".into(),
            })
        });
        (plugged, placed)
    });
    placed?;
    let plugged = plugged?;
    record.host_if = plugged.host_if;
    record.mac = crate::link::format_mac(&plugged.mac);
    bind_namespaces(paths, record)?;
    record.save(paths)?;
    for p in &spec.publish {
        network::publish(paths, p, SocketAddrV4::new(record.addr, p.port))?;
        record.publish.push(*p);
        record.save(paths)?;
    }
    child.release()
}

/// Takes an address for `name` (see [`network::lease`]).
fn lease(
    paths: &Paths,
    name: &Name,
    wanted: Option<Ipv4Addr>,
    subnet: Subnet,
    registered: &[Ipv4Addr],
) -> Result<Ipv4Addr> {
    network::lease(paths, name.as_str(), wanted, subnet, registered)
}

fn release_lease(paths: &Paths, record: &Record) {
    network::release(paths, record.addr, record.name.as_str());
}

/// Bind mounts of the sandbox's namespaces in its state dir: they outlive the processes, so the
/// network namespace (and its veth) stays findable until `rm`.
fn bind_namespaces(paths: &Paths, record: &Record) -> Result<()> {
    let dir = sandbox_dir(paths, &record.name).join("ns");
    fs::create_dir_all(&dir).map_err(|e| SandboxError::io("create the namespace dir", e))?;
    for ns in BOUND_NAMESPACES {
        let target = dir.join(ns);
        fs::File::create(&target)
            .map_err(|e| SandboxError::io("create a namespace mount point", e))?;
        let source = PathBuf::from(format!("/proc/{}/ns/{ns}", record.pid));
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| SandboxError::io(&format!("bind the {ns} namespace"), e.into()))?;
    }
    Ok(())
}

fn unbind_namespaces(paths: &Paths, record: &Record) {
    let dir = sandbox_dir(paths, &record.name).join("ns");
    for ns in BOUND_NAMESPACES {
        let target = dir.join(ns);
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&target);
    }
    let _ = fs::remove_dir(&dir);
}

/// Refuses a host port that something already holds, naming it: a published port or `NodePort`
/// of the datapath, or a socket listening in the node's namespace.
fn check_publish(paths: &Paths, door: &NodeDoor<'_>, p: &Publish) -> Result<()> {
    let holder = match door.port_holder(p) {
        None => return Ok(()),
        Some(PortHolder::Published(vaddr)) => {
            let owner = list(paths).into_iter().find(|r| {
                r.publish
                    .iter()
                    .any(|q| network::published_vaddr(q) == vaddr)
            });
            match owner {
                Some(r) => format!("sandbox {} (published)", r.name),
                None => format!("service {vaddr}"),
            }
        }
        Some(PortHolder::NodePort(service)) => format!("the NodePort of service {service}"),
        Some(PortHolder::Listener(who)) => who,
    };
    Err(network::in_use(p, holder))
}

/// How [`remove_as`] treats the veth pair.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// Wait until the kernel has deleted it (deleting it by hand after a while): nothing is
    /// left when `rm` returns.
    Wait,
    /// Leave it to the namespace's teardown in the background; the address stays leased until
    /// it is gone (see [`network::release_draining`]). A foreground `run` ending.
    Drain,
}

/// Removes everything `run` made for `record`, whatever is already gone. Kills what still
/// runs in its cgroup.
pub fn remove(paths: &Paths, record: &Record) -> Result<()> {
    remove_as(paths, record, Teardown::Wait)
}

/// As [`remove`], with the veth pair's teardown as `how` says.
pub fn remove_as(paths: &Paths, record: &Record, how: Teardown) -> Result<()> {
    network::unpublish(paths, &record.publish);
    if record.addr != Ipv4Addr::UNSPECIFIED {
        network::unregister(paths, record.addr);
    }
    unbind_namespaces(paths, record);
    let cgroup_result = if record.cgroup.path.is_empty() {
        Ok(())
    } else {
        devices::forget(paths, &record.cgroup);
        cgroup::destroy(&record.cgroup)
    };
    if record.pid > 0 {
        // Reap it if it is ours (a foreground run); harmless otherwise.
        let _ = waitpid(Pid::from_raw(record.pid), Some(WaitPidFlag::WNOHANG));
    }
    let drain = how == Teardown::Drain
        && !record.host_if.is_empty()
        && record.addr != Ipv4Addr::UNSPECIFIED;
    if drain {
        network::release_draining(paths, record.addr, record.name.as_str(), &record.host_if);
    } else {
        if !record.host_if.is_empty() {
            network::unplug(paths, &record.host_if);
        }
        if record.addr != Ipv4Addr::UNSPECIFIED {
            release_lease(paths, record);
        }
    }
    cgroup_result?;
    // A detached sandbox's monitor writes the exit status into the state dir when the init
    // dies: let it finish before the directory goes.
    if record.monitor_pid > 0 && record.monitor_pid != std::process::id() as i32 {
        let deadline = Instant::now() + Duration::from_secs(3);
        while proc_stat(record.monitor_pid).is_some_and(|(state, _)| state != 'Z')
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = fs::remove_dir_all(sandbox_dir(paths, &record.name));
    Ok(())
}

/// `bulkhead rm`.
pub fn rm(paths: &Paths, name: &str, force: bool) -> Result<()> {
    let record = Record::load(paths, name)?;
    if record.running() && !force {
        return Err(SandboxError::Running { name: record.name });
    }
    remove(paths, &record)
}

/// `bulkhead stop`: SIGTERM to the init (which passes it on), SIGKILL to everything in the
/// cgroup after `grace`. Returns whether it had to kill.
pub fn stop(paths: &Paths, name: &str, grace: Duration) -> Result<bool> {
    let record = Record::load(paths, name)?;
    if !record.running() {
        return Ok(false);
    }
    let pid = Pid::from_raw(record.pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !record.running() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in cgroup::procs(&record.cgroup) {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    let _ = kill(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while record.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// One sandbox as `bulkhead ps` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub name: String,
    pub pid: i32,
    pub address: Ipv4Addr,
    /// `running`, `exited (CODE)`, or `exited` when the status was not recorded.
    pub state: String,
    pub memory_bytes: u64,
    pub cpu_usec: u64,
    pub command: String,
}

/// `bulkhead ps`: every sandbox of the node, by name.
pub fn statuses(paths: &Paths) -> Vec<Status> {
    list(paths)
        .into_iter()
        .map(|r| {
            let usage = cgroup::usage(&r.cgroup);
            let state = if r.running() {
                "running".to_owned()
            } else {
                match r.exit_code(paths) {
                    Some(code) => format!("exited ({code})"),
                    None => "exited".to_owned(),
                }
            };
            Status {
                name: r.name.to_string(),
                pid: r.pid,
                address: r.addr,
                state,
                memory_bytes: usage.memory_bytes,
                cpu_usec: usage.cpu_usec,
                command: r.command.join(" "),
            }
        })
        .collect()
}

/// `bulkhead stats`.
pub fn stats(paths: &Paths, name: &str) -> Result<cgroup::Usage> {
    Ok(cgroup::usage(&Record::load(paths, name)?.cgroup))
}

/// `bulkhead logs`: the output of a detached sandbox.
pub fn logs(paths: &Paths, name: &str) -> Result<Vec<u8>> {
    let record = Record::load(paths, name)?;
    match fs::read(sandbox_dir(paths, &record.name).join("log")) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(SandboxError::io("read the log", e)),
    }
}

/// `bulkhead exec`: runs `command` inside a running sandbox: its cgroup and every namespace
/// (the mount namespace last, which also enters its root), with its environment and
/// privileges. Returns the command's status.
pub fn exec(paths: &Paths, name: &str, command: &[String]) -> Result<i32> {
    let record = Record::load(paths, name)?;
    if !record.running() {
        return Err(SandboxError::Setup {
            message: format!("sandbox {name} is not running"),
        });
    }
    let program = command.first().ok_or(SandboxError::NoCommand)?;
    let mut order = Vec::new();
    if record.userns {
        order.push(("user", libc::CLONE_NEWUSER));
    }
    if record.cgroupns {
        order.push(("cgroup", libc::CLONE_NEWCGROUP));
    }
    order.extend([
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ]);
    let fds: Vec<(fs::File, i32)> = order
        .iter()
        .map(|(ns, flag)| {
            fs::File::open(format!("/proc/{}/ns/{ns}", record.pid))
                .map(|f| (f, *flag))
                .map_err(|e| SandboxError::io(&format!("open the sandbox's {ns} namespace"), e))
        })
        .collect::<Result<_>>()?;
    let filters = if record.privileged {
        Vec::new()
    } else {
        seccomp::filters(&record.seccomp, record.caps)?
    };
    let apparmor_profile = record
        .apparmor
        .as_deref()
        .and_then(|p| CString::new(p).ok());
    let argv = process::c_strings(command)?;
    let envp = environment(&record.hostname, &record.env, None)?;
    cgroup::add(&record.cgroup, std::process::id())?;
    for (file, flag) in &fds {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a namespace descriptor; this process is single-threaded, as
        // entering a mount or user namespace requires.
        if unsafe { libc::setns(file.as_raw_fd(), *flag) } != 0 {
            return Err(SandboxError::io(
                "enter the sandbox's namespaces",
                io::Error::last_os_error(),
            ));
        }
    }
    let path_var = path_of(&record.env);
    process::resolve_command(Path::new("/"), program, path_var)?;
    let forwarded = block_forwarded()?;
    // SAFETY: single-threaded; the child only sets itself up and execs.
    match unsafe { nix::unistd::fork() }.map_err(|e| SandboxError::io("fork", e.into()))? {
        nix::unistd::ForkResult::Child => {
            process::default_signals();
            let err = process::exec_in_sandbox(
                &record.workdir,
                record.userns,
                record.privileged,
                record.caps,
                record.user,
                apparmor_profile.as_deref(),
                &filters,
                &argv,
                &envp,
                path_var,
            );
            eprintln!("bulkhead exec: {err}");
            // SAFETY: leave without the parent's exit path.
            unsafe {
                libc::_exit(if err.contains("No such file") {
                    127
                } else {
                    126
                })
            }
        }
        nix::unistd::ForkResult::Parent { child } => Ok(wait_forwarding(child, &forwarded)),
    }
}

/// A backend written as `NAME:PORT[@WEIGHT]` with the name of a sandbox becomes its address;
/// anything else is returned as it is (and parsed as an address later).
pub fn resolve_backend(paths: &Paths, text: &str) -> String {
    let Some((host, rest)) = text.split_once(':') else {
        return text.to_owned();
    };
    if host.parse::<Ipv4Addr>().is_ok() {
        return text.to_owned();
    }
    match Record::load(paths, host) {
        Ok(r) => format!("{}:{rest}", r.addr),
        Err(_) => text.to_owned(),
    }
}
