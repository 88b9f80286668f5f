//! What `bulkhead run` is asked for, parsed and checked before anything is created.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use super::SandboxError;

/// A sandbox name: like a container name, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63 bytes. It
/// names a directory under the state dir and a cgroup, so nothing that could walk a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let bad = |why: &str| SandboxError::BadName {
            name: s.to_owned(),
            why: why.to_owned(),
        };
        let first = s.chars().next().ok_or_else(|| bad("empty"))?;
        if s.len() > 63 {
            return Err(bad("longer than 63 bytes"));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(bad("must start with a letter or a digit"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(bad(&format!(
                "{c:?} is not allowed (letters, digits, '_', '.', '-')"
            )));
        }
        Ok(Name(s.to_owned()))
    }
}

impl TryFrom<String> for Name {
    type Error = SandboxError;
    fn try_from(s: String) -> Result<Self, SandboxError> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes written the way docker's `--memory` takes it: a number with an optional
/// unit `b`, `k`, `m` or `g` (powers of 1024, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, SandboxError> {
    let bad = |why: &str| SandboxError::BadValue {
        what: "memory size",
        value: s.to_owned(),
        why: why.to_owned(),
    };
    let lower = s.trim().to_ascii_lowercase();
    let (digits, shift) = match lower.strip_suffix(['b', 'k', 'm', 'g']) {
        Some(d) => (
            d,
            match lower.chars().last() {
                Some('k') => 10,
                Some('m') => 20,
                Some('g') => 30,
                _ => 0,
            },
        ),
        None => (lower.as_str(), 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("expected a number with an optional unit b, k, m or g"))?;
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| bad("too large"))?;
    // Below this the kernel cannot even start the init.
    if bytes < 6 << 20 {
        return Err(bad("at least 6m (the smallest limit docker accepts)"));
    }
    Ok(bytes)
}

/// CPUs as docker's `--cpus` takes them: a positive decimal, at most the CPUs this machine has.
pub fn parse_cpus(s: &str) -> Result<f64, SandboxError> {
    let bad = |why: String| SandboxError::BadValue {
        what: "cpus",
        value: s.to_owned(),
        why,
    };
    let cpus: f64 = s
        .trim()
        .parse()
        .map_err(|_| bad("expected a decimal number such as 0.5".into()))?;
    let available = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    if cpus.is_nan() || cpus <= 0.0 || !cpus.is_finite() {
        return Err(bad("must be more than 0".into()));
    }
    if cpus > available {
        return Err(bad(format!("this machine has {available} CPUs")));
    }
    Ok(cpus)
}

/// A port of the node published to a port of the sandbox, `HOSTPORT:PORT[/tcp|udp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publish {
    pub host_port: u16,
    pub port: u16,
    pub udp: bool,
}

impl FromStr for Publish {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let bad = |why: &str| SandboxError::BadValue {
            what: "publish",
            value: s.to_owned(),
            why: why.to_owned(),
        };
        let (ports, udp) = match s.rsplit_once('/') {
            Some((p, "udp")) => (p, true),
            Some((p, "tcp")) => (p, false),
            Some(_) => return Err(bad("the protocol is tcp or udp")),
            None => (s, false),
        };
        let (host, inner) = ports
            .split_once(':')
            .ok_or_else(|| bad("expected HOSTPORT:PORT[/udp]"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("ports are 1 to 65535"))
        };
        Ok(Publish {
            host_port: port(host)?,
            port: port(inner)?,
            udp,
        })
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.port,
            if self.udp { "udp" } else { "tcp" }
        )
    }
}

/// `K=V` for `--env`.
pub fn parse_env(s: &str) -> Result<(String, String), SandboxError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(SandboxError::BadValue {
            what: "env",
            value: s.to_owned(),
            why: "expected KEY=VALUE".into(),
        }),
    }
}

/// Everything `bulkhead run` was asked for.
#[derive(Clone, Debug, Default)]
pub struct RunSpec {
    pub name: Option<Name>,
    pub hostname: Option<String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<u64>,
    pub rootfs: Option<std::path::PathBuf>,
    pub ip: Option<Ipv4Addr>,
    pub publish: Vec<Publish>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub userns: bool,
    pub cgroupns: bool,
    pub privileged: bool,
    pub detach: bool,
    pub cgroup_parent: Option<String>,
    /// Host paths bound into the sandbox (`--volume`).
    pub volumes: Vec<Volume>,
    /// The root read-only (`--read-only`; the host's root always is).
    pub read_only: bool,
    /// Capabilities added to and dropped from docker's default set.
    pub cap_add: Vec<Capability>,
    pub cap_drop: Vec<Capability>,
    /// The user the command runs as (`--user UID[:GID]`).
    pub user: Option<User>,
    /// Resource limits (`--ulimit NAME=SOFT[:HARD]`).
    pub ulimits: Vec<Ulimit>,
    /// A time namespace with these clock offsets (`--timens`, `--time-offset`).
    pub time_offsets: Option<TimeOffsets>,
    /// Relative CPU weight (`--cpu-shares`, cgroup v1 cpu.shares; 2 to 262144).
    pub cpu_shares: Option<u64>,
    /// Memory the kernel tries to leave the sandbox under pressure (`--memory-reservation`).
    pub memory_reservation: Option<u64>,
    /// Host devices the sandbox may use besides docker's default list (`--device`).
    pub devices: Vec<super::devices::Device>,
    /// Memory plus swap (`--memory-swap`, -1: unlimited swap).
    pub memory_swap: Option<i64>,
    /// `--cpuset-cpus`, `--cpuset-mems`.
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// `--blkio-weight`, `--device-read-bps`, `--device-write-bps`.
    pub blkio_weight: Option<u16>,
    pub read_bps: Vec<IoLimit>,
    pub write_bps: Vec<IoLimit>,
    /// The seccomp filter (`--security-opt seccomp=...`); none when privileged.
    pub seccomp: super::seccomp::Policy,
    /// The AppArmor profile asked for (`--security-opt apparmor=NAME`); the default one where
    /// the kernel has AppArmor.
    pub apparmor: Option<String>,
    pub command: Vec<String>,
}

fn bad(what: &'static str, value: &str, why: impl Into<String>) -> SandboxError {
    SandboxError::BadValue {
        what,
        value: value.to_owned(),
        why: why.into(),
    }
}

/// A rate limit on one block device: docker's `--device-read-bps /dev/sda:1mb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoLimit {
    pub major: u32,
    pub minor: u32,
    /// Bytes per second.
    pub bps: u64,
}

impl FromStr for IoLimit {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let (path, rate) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("device rate", s, "expected /dev/BLOCKDEVICE:RATE"))?;
        let meta = std::fs::metadata(path).map_err(|e| bad("device rate", s, e.to_string()))?;
        if !meta.file_type().is_block_device() {
            return Err(bad("device rate", s, "not a block device"));
        }
        Ok(IoLimit {
            major: libc::major(meta.rdev()),
            minor: libc::minor(meta.rdev()),
            bps: parse_rate(rate).ok_or_else(|| {
                bad(
                    "device rate",
                    s,
                    "expected a rate such as 1mb, 512kb or 1048576",
                )
            })?,
        })
    }
}

/// A byte count with an optional unit k, m or g (powers of 1024), optionally followed by b.
fn parse_rate(s: &str) -> Option<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, shift) = match lower.chars().last()? {
        'k' => (&lower[..lower.len() - 1], 10),
        'm' => (&lower[..lower.len() - 1], 20),
        'g' => (&lower[..lower.len() - 1], 30),
        _ => (lower, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n > 0)
}

/// A cpuset list as the kernel takes it (`0-1,3`), every CPU or node below `count`.
pub fn parse_cpuset(what: &'static str, s: &str, count: usize) -> Result<String, SandboxError> {
    let number = |t: &str| -> Result<usize, SandboxError> {
        let n: usize = t
            .parse()
            .map_err(|_| bad(what, s, "expected a list such as 0-1,3"))?;
        if n >= count {
            return Err(bad(
                what,
                s,
                format!("this machine has {count} (0 to {})", count - 1),
            ));
        }
        Ok(n)
    };
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if number(a)? > number(b)? {
                    return Err(bad(what, s, "a range must go upwards"));
                }
            }
            None => {
                number(part)?;
            }
        }
    }
    Ok(s.to_owned())
}

/// A host path bound into the sandbox: docker's `-v HOST:PATH[:ro|rw]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    /// An existing absolute path on the host.
    pub host: std::path::PathBuf,
    /// An absolute path inside the sandbox.
    pub target: String,
    pub read_only: bool,
}

impl FromStr for Volume {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let parts: Vec<&str> = s.split(':').collect();
        let (host, target, read_only) = match parts.as_slice() {
            [h, t] | [h, t, "rw"] => (*h, *t, false),
            [h, t, "ro"] => (*h, *t, true),
            [_, _, mode] => {
                return Err(bad("volume", s, format!("mode {mode:?} is not ro or rw")));
            }
            _ => return Err(bad("volume", s, "expected HOST:PATH[:ro|rw]")),
        };
        for (which, path) in [("host path", host), ("sandbox path", target)] {
            if !path.starts_with('/') {
                return Err(bad("volume", s, format!("the {which} must be absolute")));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(bad("volume", s, format!("the {which} must not contain ..")));
            }
        }
        if target == "/" {
            return Err(bad("volume", s, "cannot replace the sandbox's root"));
        }
        let host = std::path::Path::new(host);
        if !host.exists() {
            return Err(bad("volume", s, "the host path does not exist"));
        }
        Ok(Volume {
            host: host.to_owned(),
            target: target.to_owned(),
            read_only,
        })
    }
}

/// Capability names as capabilities(7) spells them, by number.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability for `--cap-add`/`--cap-drop`: `NET_ADMIN` or `CAP_NET_ADMIN` (any case), or
/// `ALL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    All,
    One(u32),
}

impl Capability {
    /// The capabilities this stands for, as a bit mask.
    pub fn mask(self) -> u64 {
        match self {
            Capability::All => (1u64 << CAPABILITIES.len()) - 1,
            Capability::One(n) => 1 << n,
        }
    }
}

impl FromStr for Capability {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let upper = s.to_ascii_uppercase();
        let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
        if name == "ALL" {
            return Ok(Capability::All);
        }
        CAPABILITIES
            .iter()
            .position(|c| *c == name)
            .map(|n| Capability::One(n as u32))
            .ok_or_else(|| bad("capability", s, "not a capability capabilities(7) names"))
    }
}

/// `--user UID[:GID]`, numeric (the sandbox's /etc/passwd is not consulted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for User {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let number = |t: &str| {
            t.parse::<u32>()
                .ok()
                .filter(|n| *n != u32::MAX)
                .ok_or_else(|| bad("user", s, "expected UID[:GID], numbers"))
        };
        let (uid, gid) = match s.split_once(':') {
            Some((u, g)) => (number(u)?, number(g)?),
            None => (number(s)?, number(s)?),
        };
        Ok(User { uid, gid })
    }
}

/// `--ulimit NAME=SOFT[:HARD]`, docker's names for setrlimit(2)'s resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ulimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

impl FromStr for Ulimit {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        const NAMES: [(&str, u32); 15] = [
            ("core", libc::RLIMIT_CORE),
            ("cpu", libc::RLIMIT_CPU),
            ("data", libc::RLIMIT_DATA),
            ("fsize", libc::RLIMIT_FSIZE),
            ("locks", libc::RLIMIT_LOCKS),
            ("memlock", libc::RLIMIT_MEMLOCK),
            ("msgqueue", libc::RLIMIT_MSGQUEUE),
            ("nice", libc::RLIMIT_NICE),
            ("nofile", libc::RLIMIT_NOFILE),
            ("nproc", libc::RLIMIT_NPROC),
            ("rss", libc::RLIMIT_RSS),
            ("rtprio", libc::RLIMIT_RTPRIO),
            ("rttime", libc::RLIMIT_RTTIME),
            ("sigpending", libc::RLIMIT_SIGPENDING),
            ("stack", libc::RLIMIT_STACK),
        ];
        let (name, values) = s
            .split_once('=')
            .ok_or_else(|| bad("ulimit", s, "expected NAME=SOFT[:HARD]"))?;
        let resource = NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .ok_or_else(|| bad("ulimit", s, format!("unknown limit {name:?}")))?;
        let number = |t: &str| {
            t.parse::<u64>()
                .map_err(|_| bad("ulimit", s, "limits are numbers"))
        };
        let (soft, hard) = match values.split_once(':') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(values)?, number(values)?),
        };
        if soft > hard {
            return Err(bad("ulimit", s, "the soft limit exceeds the hard one"));
        }
        Ok(Ulimit {
            resource,
            soft,
            hard,
        })
    }
}

/// Clock offsets of a time namespace, in seconds: `monotonic=SECS,boottime=SECS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeOffsets {
    pub monotonic: i64,
    pub boottime: i64,
}

/// Largest offset accepted, in seconds (a century): far beyond any test of uptime handling,
/// far below where the kernel's clocks would overflow.
const MAX_OFFSET: i64 = 100 * 365 * 24 * 3600;

impl FromStr for TimeOffsets {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let mut t = TimeOffsets::default();
        for pair in s.split(',') {
            let (name, secs) = pair
                .split_once('=')
                .ok_or_else(|| bad("time offset", s, "expected monotonic=SECS,boottime=SECS"))?;
            let secs: i64 = secs
                .parse()
                .map_err(|_| bad("time offset", s, "offsets are whole seconds"))?;
            if secs.abs() > MAX_OFFSET {
                return Err(bad("time offset", s, "out of range (at most a century)"));
            }
            match name {
                "monotonic" => t.monotonic = secs,
                "boottime" => t.boottime = secs,
                _ => {
                    return Err(bad(
                        "time offset",
                        s,
                        format!("unknown clock {name:?} (monotonic or boottime)"),
                    ));
                }
            }
        }
        // A clock may not be shifted below zero: the kernel refuses it when the offsets are
        // written, after the sandbox is half made.
        for (name, offset, clock) in [
            (
                "monotonic",
                t.monotonic,
                nix::time::ClockId::CLOCK_MONOTONIC,
            ),
            ("boottime", t.boottime, nix::time::ClockId::CLOCK_BOOTTIME),
        ] {
            let now = nix::time::clock_gettime(clock).map_or(0, |ts| ts.tv_sec());
            if now + offset < 0 {
                return Err(bad(
                    "time offset",
                    s,
                    format!("{name} would go below zero (it reads {now} s)"),
                ));
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_walk_a_path_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b", &"x".repeat(64)] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?}");
        }
        for good in ["web1", "db.primary", "a_b-c", "9"] {
            assert_eq!(good.parse::<Name>().unwrap().as_str(), good);
        }
    }

    #[test]
    fn hardening_options_parse_and_refuse_like_docker() {
        let v: Volume = "/tmp:/data:ro".parse().unwrap();
        assert_eq!((v.target.as_str(), v.read_only), ("/data", true));
        for bad in [
            "/tmp",
            "tmp:/data",
            "/tmp:data",
            "/tmp:/",
            "/tmp:/a:rx",
            "/nonexistent-x:/a",
            "/tmp:/../etc",
        ] {
            assert!(bad.parse::<Volume>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "net_admin".parse::<Capability>().unwrap(),
            Capability::One(12)
        );
        assert_eq!(
            "CAP_SYS_TIME".parse::<Capability>().unwrap(),
            Capability::One(25)
        );
        assert_eq!("ALL".parse::<Capability>().unwrap().mask().count_ones(), 41);
        assert!("CAP_FLY".parse::<Capability>().is_err());
        assert_eq!(
            "1000".parse::<User>().unwrap(),
            User {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            "1000:10".parse::<User>().unwrap(),
            User { uid: 1000, gid: 10 }
        );
        assert!("alice".parse::<User>().is_err());
        let u: Ulimit = "nofile=100:200".parse().unwrap();
        assert_eq!((u.soft, u.hard), (100, 200));
        for bad in ["nofile", "files=1", "nofile=2:1", "nofile=x"] {
            assert!(bad.parse::<Ulimit>().is_err(), "{bad:?}");
        }
        let t: TimeOffsets = "monotonic=3600,boottime=86400".parse().unwrap();
        assert_eq!((t.monotonic, t.boottime), (3600, 86400));
        for bad in [
            "realtime=1",
            "boottime=x",
            "monotonic=-99999999999",
            "boottime=9999999999",
        ] {
            assert!(bad.parse::<TimeOffsets>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_cpus_and_ports_parse_like_docker() {
        assert_eq!(parse_size("256m").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("8388608").unwrap(), 8 << 20);
        for bad in ["", "12x", "1m", "-5m", "99999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!((parse_cpus("0.5").unwrap() - 0.5).abs() < f64::EPSILON);
        for bad in ["0", "-1", "abc", "NaN", "100000"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "8080:80".parse::<Publish>().unwrap(),
            Publish {
                host_port: 8080,
                port: 80,
                udp: false
            }
        );
        assert_eq!(
            "53:5353/udp".parse::<Publish>().unwrap(),
            Publish {
                host_port: 53,
                port: 5353,
                udp: true
            }
        );
        for bad in ["8080", "0:80", "8080:80/sctp", "x:80"] {
            assert!(bad.parse::<Publish>().is_err(), "{bad:?}");
        }
    }
}
