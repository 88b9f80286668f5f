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
    pub command: Vec<String>,
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
