//! Carrying pinned maps across a change of their layout.
//!
//! Maps are pinned so that a new build, loaded over a running one, finds established flows and
//! settings where the old one left them. aya reuses whatever is pinned under a map's name
//! without comparing layouts, so a map whose value grew would either be refused by the verifier
//! or, worse, be read with the wrong layout. `dataplane_common::map::LAYOUT_HISTORY` lists
//! every value size a map has had. Before loading, [`Migration::prepare`] finds pinned maps
//! with an older size and takes them out of the pin directory (keeping them open: the running
//! program still uses them), so the load creates them afresh; once the new programs are in
//! place, [`Migration::finish`] copies every old entry over, zero-extended (each layout only
//! appended fields whose zero means "as before"). An entry the new program already wrote wins.
//! A size that is in no history is refused, naming the map: nothing is silently reset.

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use dataplane_common::map;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "pinned map {path} has {found}-byte values, a layout this build cannot migrate (it knows {known:?}); \
         `bulkhead down` removes the old state"
    )]
    UnknownLayout {
        path: PathBuf,
        found: u32,
        known: &'static [u32],
    },
    #[error("cannot {action} pinned map {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A map taken out of the pin directory, to be copied into its successor.
struct Stale {
    name: &'static str,
    path: PathBuf,
    old: MapData,
    old_size: u32,
    new_size: u32,
}

/// Maps being migrated by one load.
#[must_use = "call finish() after loading, or abort() if the load failed"]
pub struct Migration {
    stale: Vec<Stale>,
}

/// What one finished migration did, per map: (name, entries copied).
pub type Report = Vec<(&'static str, usize)>;

impl Migration {
    /// Unpins maps in `dir` whose layout is older than this build's.
    pub fn prepare(dir: &Path) -> Result<Self, MigrationError> {
        let mut stale = Vec::new();
        for (name, sizes) in map::LAYOUT_HISTORY {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let io_err = |action, source| MigrationError::Io {
                action,
                path: path.clone(),
                source,
            };
            let info =
                MapInfo::from_pin(&path).map_err(|e| io_err("inspect", io::Error::other(e)))?;
            let (found, current) = (info.value_size(), sizes[sizes.len() - 1]);
            if found == current {
                continue;
            }
            if !sizes[..sizes.len() - 1].contains(&found) {
                return Err(MigrationError::UnknownLayout {
                    path,
                    found,
                    known: sizes,
                });
            }
            let old = MapData::from_pin(&path).map_err(|e| io_err("open", io::Error::other(e)))?;
            fs::remove_file(&path).map_err(|e| io_err("unpin", e))?;
            stale.push(Stale {
                name,
                path,
                old,
                old_size: found,
                new_size: current,
            });
        }
        Ok(Migration { stale })
    }

    /// Puts the old maps back where they were (the load failed).
    pub fn abort(self) {
        for s in self.stale {
            let _ = fs::remove_file(&s.path);
            let _ = s.old.pin(&s.path);
        }
    }

    /// Copies the old entries into the maps the load created.
    pub fn finish(self) -> Result<Report, MigrationError> {
        let mut report = Vec::new();
        for s in self.stale {
            let new = MapData::from_pin(&s.path).map_err(|e| MigrationError::Io {
                action: "open",
                path: s.path.clone(),
                source: io::Error::other(e),
            })?;
            let copied = copy_entries(&s, &new).map_err(|source| MigrationError::Io {
                action: "migrate",
                path: s.path.clone(),
                source,
            })?;
            report.push((s.name, copied));
        }
        Ok(report)
    }
}

fn copy_entries(s: &Stale, new: &MapData) -> io::Result<usize> {
    let info = s.old.info().map_err(io::Error::other)?;
    let key_size = info.key_size() as usize;
    // Arrays have every key already; hashes take only what the new program has not written.
    let flags = if matches!(info.map_type(), Ok(aya::maps::MapType::Array)) {
        BPF_ANY
    } else {
        BPF_NOEXIST
    };
    let old_fd = s.old.fd().as_fd().as_raw_fd();
    let new_fd = new.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; s.old_size as usize];
    let mut first = true;
    let mut copied = 0;
    loop {
        let prev = if first { None } else { Some(key.as_slice()) };
        if !sys::next_key(old_fd, prev, &mut next)? {
            return Ok(copied);
        }
        first = false;
        key.copy_from_slice(&next);
        if !sys::lookup(old_fd, &key, &mut value)? {
            continue; // gone between the two calls (expired, evicted)
        }
        let mut grown = value.clone();
        grown.resize(s.new_size as usize, 0);
        match sys::update(new_fd, &key, &grown, flags) {
            Ok(()) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
}

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// The three map commands a layout-agnostic copy needs; aya's typed maps insist on knowing the
/// value type, which is the one thing a migration does not have.
mod sys {
    use std::io;

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    /// `union bpf_attr` as the element commands use it.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf(cmd: libc::c_long, attr: &ElemAttr) -> io::Result<()> {
        // SAFETY: `attr` is a fully initialised bpf_attr prefix for this command, and the
        // pointers in it name buffers of the sizes the map was created with (checked by the
        // callers through the map's info).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_ref::<ElemAttr>(attr),
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The key after `key` (the first with `None`); false at the end.
    pub fn next_key(fd: i32, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads `key`'s value; false if there is none.
    pub fn lookup(fd: i32, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn update(fd: i32, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &attr)
    }
}
