//! Entering a network namespace, as `ip -n NAME` does.
//!
//! `bulkhead` works inside whatever network namespace it is started in; `--netns` moves it into
//! another one first. This module knows nothing about eBPF or containers.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` keeps its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot enter the mount namespace {path}, where pins outlive this command")]
    EnterMounts {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Resolves a namespace given as a name (`ip netns` style) or as a path (`/proc/PID/ns/net`).
pub fn resolve(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(NETNS_RUN_DIR).join(name_or_path)
    }
}

/// Moves the calling thread into the network namespace at `path`.
///
/// Call it before any other thread exists, so the whole process lives in that namespace; sockets
/// opened afterwards, netlink included, belong to it.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    })
}

/// Which network namespace a process is in: the nsfs inode, and the `ip netns` name bound to
/// it, if any.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub inode: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Identity {
    /// The namespace this process is in now.
    pub fn current() -> Result<Self, NetnsError> {
        let inode = inode_of(Path::new("/proc/self/ns/net"))?;
        Ok(Identity {
            inode,
            name: name_of(inode),
        })
    }

    /// A name for per-namespace directories: the `ip netns` name, else `inode-N`. bpffs
    /// refuses names containing a dot, so a dot becomes `:` as for interface names.
    pub fn dir_name(&self) -> String {
        match &self.name {
            Some(name) => name.replace('.', ":"),
            None => format!("inode-{}", self.inode),
        }
    }

    /// Whether a namespace with this inode still exists: bound under /run/netns, or held by a
    /// process. Scans /proc, so only for the rare case of a record from another namespace.
    pub fn exists(&self) -> bool {
        if name_of(self.inode).is_some() {
            return true;
        }
        std::fs::read_dir("/proc").is_ok_and(|procs| {
            procs
                .flatten()
                .any(|p| inode_of(&p.path().join("ns/net")).is_ok_and(|i| i == self.inode))
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} (inode {})", self.inode),
            None => write!(f, "inode {}", self.inode),
        }
    }
}

fn inode_of(path: &Path) -> Result<u64, NetnsError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })
}

/// The name under /run/netns bound to the namespace with this inode.
fn name_of(inode: u64) -> Option<String> {
    std::fs::read_dir(NETNS_RUN_DIR)
        .ok()?
        .flatten()
        .find(|e| inode_of(&e.path()).is_ok_and(|i| i == inode))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// `ip netns exec` runs its command in a mount namespace of its own with a fresh sysfs on
/// /sys, so a bpffs mounted at /sys/fs/bpf there (and every pin in it) vanishes when the
/// command exits, and the next command finds nothing. When the nearest ancestor process in
/// another mount namespace sees a different /sys/fs/bpf, this moves into that ancestor's mount
/// namespace, where `bulkhead --netns` would have run: the network namespace stays, and pins
/// land where they persist. (PID 1's namespaces are not always readable, even by root, so the
/// ancestors are the reference.) Returns whether it moved. Call it before any other thread
/// exists: setns(2) of a mount namespace needs a single-threaded caller.
pub fn escape_private_sysfs() -> Result<bool, NetnsError> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let Some(mine) = id("/proc/self/ns/mnt") else {
        return Ok(false);
    };
    let mut pid = std::os::unix::process::parent_id();
    let ancestor = loop {
        if pid <= 1 {
            return Ok(false);
        }
        match id(&format!("/proc/{pid}/ns/mnt")) {
            None => return Ok(false),
            Some(theirs) if theirs != mine => break pid,
            Some(_) => match parent_of(pid) {
                Some(parent) => pid = parent,
                None => return Ok(false),
            },
        }
    };
    let ours = id("/sys/fs/bpf");
    if ours.is_none() || ours == id(&format!("/proc/{ancestor}/root/sys/fs/bpf")) {
        return Ok(false);
    }
    let path = PathBuf::from(format!("/proc/{ancestor}/ns/mnt"));
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNS)
        .map_err(|source| NetnsError::EnterMounts { path, source })?;
    Ok(true)
}

/// The parent of `pid`, from /proc/PID/stat (the field after the parenthesised command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
