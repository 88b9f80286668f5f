//! Network interfaces: bridges, veth pairs, addresses, routes.
//!
//! Driven through iproute2's `ip`, found by full path because busybox images shadow `ip` with an
//! applet that lacks JSON output. This module knows nothing about eBPF.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Environment variable naming the `ip` binary to use.
pub const IP_ENV: &str = "BULKHEAD_IP";
const IP_CANDIDATES: [&str; 4] = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "iproute2 `ip` not found (looked in {IP_CANDIDATES:?}; set {IP_ENV}); install iproute2"
    )]
    NoIp,
    #[error("cannot run {bin} {args}")]
    Spawn {
        bin: PathBuf,
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("cannot parse the output of `ip {args}`")]
    Parse {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A handle on iproute2 acting in the caller's network namespace.
#[derive(Clone, Debug)]
pub struct Ip {
    bin: PathBuf,
}

impl Ip {
    /// Finds iproute2's `ip`: [`IP_ENV`] first, then the usual locations.
    pub fn find() -> Result<Self, LinkError> {
        if let Some(bin) = std::env::var_os(IP_ENV) {
            return Ok(Ip { bin: bin.into() });
        }
        IP_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file() && !is_busybox(p))
            .map(|p| Ip { bin: p.to_owned() })
            .ok_or(LinkError::NoIp)
    }

    /// Runs `ip ARGS` and returns its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String, LinkError> {
        self.run_cmd(Command::new(&self.bin), args)
    }

    /// Runs `ip ARGS` inside the network namespace `netns` and returns its standard output.
    pub fn run_in(&self, netns: &Path, args: &[&str]) -> Result<String, LinkError> {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let ns = std::fs::File::open(netns).map_err(|source| LinkError::Spawn {
            bin: netns.to_owned(),
            args: "open the network namespace".into(),
            source,
        })?;
        let mut cmd = Command::new(&self.bin);
        let fd = ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; the descriptor stays open (owned by `ns`)
        // until the command has been spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = self.run_cmd(cmd, args);
        drop(ns);
        out
    }

    fn run_cmd(&self, mut cmd: Command, args: &[&str]) -> Result<String, LinkError> {
        let joined = args.join(" ");
        let out = cmd.args(args).output().map_err(|source| LinkError::Spawn {
            bin: self.bin.clone(),
            args: joined.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(LinkError::Failed {
                args: joined,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// True when an interface of that name exists in this namespace.
    pub fn exists(ifname: &str) -> bool {
        nix::net::if_::if_nametoindex(ifname).is_ok()
    }

    pub fn add_bridge(&self, name: &str) -> Result<(), LinkError> {
        self.run(&["link", "add", name, "type", "bridge"]).map(drop)
    }

    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), LinkError> {
        self.run(&["link", "add", name, "type", "veth", "peer", "name", peer])
            .map(drop)
    }

    pub fn set_master(&self, ifname: &str, bridge: &str) -> Result<(), LinkError> {
        self.run(&["link", "set", ifname, "master", bridge])
            .map(drop)
    }

    pub fn set_up(&self, ifname: &str) -> Result<(), LinkError> {
        self.run(&["link", "set", ifname, "up"]).map(drop)
    }

    /// Adds `cidr` (`ADDR/LEN`) to `ifname`; an address already there is fine.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<(), LinkError> {
        match self.run(&["addr", "add", cidr, "dev", ifname]) {
            Err(LinkError::Failed { stderr, .. })
                if stderr.contains("File exists") || stderr.contains("already assigned") =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    pub fn delete(&self, ifname: &str) -> Result<(), LinkError> {
        self.run(&["link", "del", ifname]).map(drop)
    }

    /// Names of the interfaces enslaved to `bridge`.
    pub fn bridge_ports(&self, bridge: &str) -> Result<Vec<String>, LinkError> {
        #[derive(serde::Deserialize)]
        struct Link {
            ifname: String,
        }
        let args = ["-j", "link", "show", "master", bridge];
        let out = self.run(&args)?;
        let links: Vec<Link> = if out.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&out).map_err(|source| LinkError::Parse {
                args: args.join(" "),
                source,
            })?
        };
        Ok(links.into_iter().map(|l| l.ifname).collect())
    }
}

impl Ip {
    /// The MAC address of `ifname` and its kind (`veth`, `bridge`, ...; empty for a plain
    /// device).
    pub fn link_info(&self, ifname: &str) -> Result<([u8; 6], String), LinkError> {
        #[derive(serde::Deserialize)]
        struct Link {
            address: String,
            #[serde(default)]
            linkinfo: Option<LinkInfo>,
        }
        #[derive(serde::Deserialize)]
        struct LinkInfo {
            #[serde(default)]
            info_kind: String,
        }
        let args = ["-j", "-d", "link", "show", "dev", ifname];
        let out = self.run(&args)?;
        let parse_err = |source| LinkError::Parse {
            args: args.join(" "),
            source,
        };
        let links: Vec<Link> = serde_json::from_str(&out).map_err(parse_err)?;
        let link = links
            .into_iter()
            .next()
            .ok_or_else(|| parse_err(serde::de::Error::custom("no such link")))?;
        let mac = parse_mac(&link.address)
            .ok_or_else(|| parse_err(serde::de::Error::custom("not a MAC address")))?;
        Ok((mac, link.linkinfo.map(|l| l.info_kind).unwrap_or_default()))
    }
}

/// The MAC address of `ifname` in this process's network namespace (SIOCGIFHWADDR: no `ip`
/// process for a value asked for on every sandbox start).
pub fn hw_addr(ifname: &str) -> std::io::Result<[u8; 6]> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid; the name fits with its NUL (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq passed by pointer.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl filled the hardware-address member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Ip {
    /// IPv4 addresses (with prefix length) of `ifname`, or of every interface when `None`.
    pub fn ipv4_addrs(
        &self,
        ifname: Option<&str>,
    ) -> Result<Vec<(std::net::Ipv4Addr, u8)>, LinkError> {
        #[derive(serde::Deserialize)]
        struct Iface {
            #[serde(default)]
            addr_info: Vec<AddrInfo>,
        }
        #[derive(serde::Deserialize)]
        struct AddrInfo {
            family: String,
            local: String,
            prefixlen: u8,
        }
        let mut args = vec!["-j", "-4", "addr", "show"];
        if let Some(dev) = ifname {
            args.extend(["dev", dev]);
        }
        let out = self.run(&args)?;
        let ifaces: Vec<Iface> = serde_json::from_str(&out).map_err(|source| LinkError::Parse {
            args: args.join(" "),
            source,
        })?;
        Ok(ifaces
            .into_iter()
            .flat_map(|i| i.addr_info)
            .filter(|a| a.family == "inet")
            .filter_map(|a| Some((a.local.parse().ok()?, a.prefixlen)))
            .collect())
    }
}

/// IPv4 addresses (with prefix length) of `ifname` inside the network namespace `netns`.
pub fn netns_ipv4_addrs(
    netns: &Path,
    ifname: &str,
) -> Result<Vec<(std::net::Ipv4Addr, u8)>, LinkError> {
    #[derive(serde::Deserialize)]
    struct Iface {
        #[serde(default)]
        addr_info: Vec<AddrInfo>,
    }
    #[derive(serde::Deserialize)]
    struct AddrInfo {
        local: String,
        prefixlen: u8,
    }
    let args = ["-j", "-4", "addr", "show", "dev", ifname];
    let out = Ip::find()?.run_in(netns, &args)?;
    let ifaces: Vec<Iface> = serde_json::from_str(&out).map_err(|source| LinkError::Parse {
        args: args.join(" "),
        source,
    })?;
    Ok(ifaces
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter_map(|a| Some((a.local.parse().ok()?, a.prefixlen)))
        .collect())
}

fn is_busybox(path: &Path) -> bool {
    std::fs::canonicalize(path).is_ok_and(|p| p.file_name().is_some_and(|n| n == "busybox"))
}

/// The name of interface `ifindex` in this namespace, or the index itself when it has gone.
pub fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}
