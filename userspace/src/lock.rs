//! The node lock: one writer at a time on a node's state, any number of readers.
//!
//! A node's state is spread over pinned maps, `node.json`, leases and sandbox records, and a
//! change touches several of them (a service add allocates ids from what it read, writes a
//! selection table, then publishes). Two writers interleaving would allocate the same ids and
//! wire one service's slots to another's backends. Every command that changes a node holds an
//! exclusive `flock(2)` on `lock` in the node's state directory for the whole change; readers
//! hold it shared, so they never see a change half applied. `flock` locks belong to the open
//! file description: the kernel releases them when the holder exits, however it exits, so a
//! crashed writer never leaves the node locked.
//!
//! While `bulkhead agent` runs it holds the lock for its whole life and serialises changes
//! itself: a command in another process borrows the agent's hold ([`NodeLock::lent`], over
//! the agent's API), and code running inside the agent uses [`NodeLock::inherited`].
//!
//! This module knows nothing about what the lock protects.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The lock file's name inside the state directory.
pub const FILE: &str = "lock";
/// How long a command waits quietly before saying who holds the lock.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the node lock {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the node's agent holds the lock and did not lend it")]
    Agent(#[source] crate::agent::client::ClientError),
    #[error("the node lock {path} is still held by {holder} after {waited:?} (--lock-timeout)")]
    Timeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
}

/// Whether the holder changes the node or only reads it.
impl LockError {
    /// The agent that holds the lock could not lend it.
    pub fn agent(e: crate::agent::client::ClientError) -> Self {
        LockError::Agent(e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Readers: any number at once, never during a change.
    Shared,
    /// Writers: alone.
    Exclusive,
}

/// A held node lock; dropping it releases the lock.
pub struct NodeLock {
    file: Option<File>,
    mode: Mode,
    /// Keeps a lent hold alive (the agent releases it when this is dropped).
    lent: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for NodeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLock")
            .field("file", &self.file)
            .field("mode", &self.mode)
            .field("lent", &self.lent.is_some())
            .finish()
    }
}

impl NodeLock {
    /// Takes the lock of the node whose state lives in `state_dir`, waiting at most `timeout`
    /// (`None`: as long as it takes). After a second of waiting, says on stderr who holds it.
    pub fn acquire(
        state_dir: &Path,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<Self, LockError> {
        let path = state_dir.join(FILE);
        let open_err = |source| LockError::Open {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(open_err)?;
        // Close-on-exec (std's default), so programs this process starts do not inherit it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open_err)?;
        let op = match mode {
            Mode::Shared => libc::LOCK_SH,
            Mode::Exclusive => libc::LOCK_EX,
        };
        let start = Instant::now();
        let mut told = false;
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(LockError::Lock { path, source: err });
            }
            let waited = start.elapsed();
            if timeout.is_some_and(|t| waited >= t) {
                let holder = holders(&file).unwrap_or_else(|| "another process".into());
                return Err(LockError::Timeout {
                    path,
                    holder,
                    waited,
                });
            }
            if !told && waited >= QUIET {
                told = true;
                let holder = holders(&file).unwrap_or_else(|| "another process".into());
                eprintln!(
                    "bulkhead: waiting for the node lock {}, held by {holder}",
                    path.display()
                );
            }
            // Polling rather than a blocking flock: a blocked call could only be bounded by a
            // signal or a thread, and this process must stay single-threaded (it forks).
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        let mut lock = NodeLock {
            file: Some(file),
            mode,
            lent: None,
        };
        if mode == Mode::Exclusive {
            lock.record_holder();
        }
        Ok(lock)
    }

    /// Writes this process's pid and command line into the lock file, for `cat` and for
    /// waiters on kernels where /proc/locks is not readable.
    /// The lock as held by the agent on this process's behalf: `hold` keeps it until dropped.
    pub fn lent(hold: Box<dyn Send>) -> Self {
        NodeLock {
            file: None,
            mode: Mode::Exclusive,
            lent: Some(hold),
        }
    }

    /// The lock this process already holds (the agent, running a command itself).
    pub fn inherited() -> Self {
        NodeLock {
            file: None,
            mode: Mode::Exclusive,
            lent: None,
        }
    }

    /// The holders of the lock at `state_dir`, as "pid N (command line)", if anyone holds it.
    pub fn holder(state_dir: &Path) -> Option<String> {
        let file = File::open(state_dir.join(FILE)).ok()?;
        let meta = file.metadata().ok()?;
        let text = fs::read_to_string("/proc/locks").ok()?;
        let pids = lock_holders(&text, meta.dev(), meta.ino());
        (!pids.is_empty()).then(|| holders(&file)).flatten()
    }

    fn record_holder(&mut self) {
        let Some(file) = &self.file else { return };
        let _ = file.set_len(0);
        let _ = writeln!(
            &mut &*file,
            "{} {}",
            std::process::id(),
            command_line("self")
        );
    }
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        if let (Some(file), Mode::Exclusive) = (&self.file, self.mode) {
            let _ = file.set_len(0);
        }
        // Closing the descriptor releases the lock; nothing else to do.
    }
}

/// Who holds the lock on `file`, from /proc/locks (which names the pid of every flock on the
/// file's inode), as `pid 1234 (bulkhead service add ...)`; several readers are listed
/// together.
fn holders(file: &File) -> Option<String> {
    let meta = file.metadata().ok()?;
    let text = fs::read_to_string("/proc/locks").ok()?;
    let pids = lock_holders(&text, meta.dev(), meta.ino());
    if pids.is_empty() {
        // Fall back to what an exclusive holder wrote into the file.
        let written = fs::read_to_string(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        let (pid, cmd) = written.trim().split_once(' ')?;
        return Some(format!("pid {pid} ({cmd})"));
    }
    Some(
        pids.iter()
            .map(|pid| format!("pid {pid} ({})", command_line(&pid.to_string())))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The pids holding a FLOCK on the inode `ino` of device `dev`, from /proc/locks' text (lines
/// like `1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF`; waiters are marked `->`).
fn lock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut pids: Vec<u32> = text
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid: u32 = fields.get(4)?.parse().ok()?;
            let mut id = fields.get(5)?.split(':');
            let maj = u32::from_str_radix(id.next()?, 16).ok()?;
            let min = u32::from_str_radix(id.next()?, 16).ok()?;
            let inode: u64 = id.next()?.parse().ok()?;
            (maj == major && min == minor && inode == ino).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A process's command line with spaces between the arguments, or `?` if it is gone.
fn command_line(pid: &str) -> String {
    fs::read(format!("/proc/{pid}/cmdline")).map_or_else(
        |_| "?".into(),
        |raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_holders_of_one_inode() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 00:19:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 4343 00:19:1234 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 00:19:1234 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 7 00:19:1234 0 EOF\n\
                    4: FLOCK  ADVISORY  READ 8 00:19:999 0 EOF\n";
        let dev = libc::makedev(0, 0x19);
        assert_eq!(lock_holders(text, dev, 1234), vec![7, 4242]);
        assert_eq!(lock_holders(text, dev, 5), Vec::<u32>::new());
    }

    #[test]
    fn a_second_exclusive_holder_waits_and_times_out_naming_the_first() {
        let dir = std::env::temp_dir().join(format!("bulkhead-lock-{}", std::process::id()));
        let first = NodeLock::acquire(&dir, Mode::Exclusive, None).unwrap();
        let err = NodeLock::acquire(&dir, Mode::Shared, Some(Duration::from_millis(50)))
            .expect_err("the lock is taken");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        let a = NodeLock::acquire(&dir, Mode::Shared, Some(Duration::ZERO)).unwrap();
        let b = NodeLock::acquire(&dir, Mode::Shared, Some(Duration::ZERO)).unwrap();
        assert!(NodeLock::acquire(&dir, Mode::Exclusive, Some(Duration::ZERO)).is_err());
        drop((a, b));
        NodeLock::acquire(&dir, Mode::Exclusive, Some(Duration::ZERO)).unwrap();
        let _ = fs::remove_dir_all(dir);
    }
}
