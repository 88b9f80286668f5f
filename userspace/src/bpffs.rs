//! The bpffs directory where Bulkhead pins its maps, programs and links.
//!
//! Each bpffs mount is its own instance, so a pin is only visible through the mount it was made
//! in: the directory is configurable (`--bpffs`) and gets a bpffs mounted when it has none.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// The default pin directory.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/bulkhead";
/// Where distributions mount bpffs.
pub const SYSTEM_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount bpffs on {path} (needs CAP_SYS_ADMIN)")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// True when `path` exists and lives on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs on `path` (creating the directory) unless it already is one.
pub fn mount_at(path: &Path) -> Result<bool, BpffsError> {
    if is_bpffs(path) {
        return Ok(false);
    }
    fs::create_dir_all(path).map_err(|source| BpffsError::Create {
        path: path.to_owned(),
        source,
    })?;
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|source| BpffsError::Mount {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Makes `dir` a usable pin directory and returns it.
///
/// If `dir` or its nearest existing ancestor is on bpffs the directories are simply created
/// (per-namespace nodes live in `netns/NAME` beneath the default directory). Otherwise a bpffs
/// is mounted on the system location (`/sys/fs/bpf`, missing on fresh machines) when `dir` is
/// beneath it, and on `dir` itself anywhere else.
pub fn ensure_dir(dir: &Path) -> Result<PathBuf, BpffsError> {
    if !is_bpffs(dir) {
        let existing = dir.ancestors().skip(1).find(|a| a.exists());
        let system = Path::new(SYSTEM_MOUNT);
        match existing {
            Some(a) if is_bpffs(a) => {}
            _ if dir.starts_with(system) && dir != system => {
                mount_at(system)?;
            }
            _ => {
                mount_at(dir)?;
            }
        }
    }
    fs::create_dir_all(dir).map_err(|source| BpffsError::Create {
        path: dir.to_owned(),
        source,
    })?;
    Ok(dir.to_owned())
}
