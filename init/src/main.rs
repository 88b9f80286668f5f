//! `bulkhead-init`: a tiny static PID 1 for containers, a drop-in for tini.
//!
//! It starts one program, forwards signals to it, reaps every zombie (its own children and
//! anything re-parented to it), and exits with the program's status (128+N when killed by
//! signal N). Options, environment variables, messages and exit codes follow tini; the long
//! options (`--wait-all`, `--forward-all`, `--grace-period`, `--rewrite`, `--setsid`) go further.
//!
//! The binary is `no_std` on musl's libc: no allocator, no formatting machinery, no async
//! runtime, so the static binary stays smaller than a dynamically linked tini. Every step of
//! the PID-1 path reports one line and returns an exit code; nothing here unwraps or panics.
//!
//! Signals: everything but the synchronous faults (SEGV, BUS, ...) and TTIN/TTOU is blocked and
//! collected with `sigwaitinfo`, so a SIGCHLD wakes the reaper at once and nothing polls on a
//! timer; `sigtimedwait` is used only while a deadline (grace period, wait-all) is pending.

#![cfg_attr(not(test), no_std, no_main)]
#![cfg_attr(
    test,
    expect(
        dead_code,
        reason = "the host test build compiles the parsers it tests; the PID-1 path is no_main only"
    )
)]

use core::ptr;

use libc::{c_char, c_int, pid_t, sigset_t};

// musl's libc.a: a no_std binary gets no default libraries.
// SAFETY: the block declares no items; it only links libc.a, the musl libc whose functions the
// `libc` crate's declarations describe.
#[cfg(not(test))]
#[link(name = "c")]
unsafe extern "C" {}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: abort never returns and needs no arguments. Nothing on the PID-1 path panics on
    // purpose; this only satisfies the compiler.
    unsafe { libc::abort() }
}

const NAME: &[u8] = b"bulkhead-init";
const VERSION: &[u8] = b"bulkhead-init version 0.1.0";
/// Seconds `--wait-all` waits when given no value.
const WAIT_ALL_DEFAULT: u32 = 10;

// ---------------------------------------------------------------------------------------------
// Output: small buffered writes of byte strings and integers, no `core::fmt`.

/// A line being built for one file descriptor; written in one `write(2)` on drop.
struct Line {
    fd: c_int,
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn new(fd: c_int) -> Self {
        Line {
            fd,
            buf: [0; 512],
            len: 0,
        }
    }

    fn s(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    fn n(&mut self, value: i64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = value.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if value < 0 {
            self.s(b"-");
        }
        self.s(&digits[i..])
    }

    /// Appends a NUL-terminated C string.
    fn c(&mut self, p: *const c_char) -> &mut Self {
        if p.is_null() {
            return self;
        }
        // SAFETY: callers pass NUL-terminated strings (argv entries, strerror results).
        let bytes = unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes();
        self.s(bytes)
    }

    fn errno(&mut self) -> &mut Self {
        // SAFETY: strerror returns a pointer to a static, NUL-terminated message.
        self.c(unsafe { libc::strerror(errno()) })
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let mut off = 0;
        while off < self.len {
            // SAFETY: writing initialised bytes of our own buffer.
            let n = unsafe {
                libc::write(
                    self.fd,
                    self.buf[off..self.len].as_ptr().cast(),
                    self.len - off,
                )
            };
            if n <= 0 {
                return;
            }
            off += n as usize;
        }
    }
}

#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Level {
    Fatal = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

/// Verbosity, as tini: FATAL always, WARN from 1 (the default), INFO from 2, DEBUG from 3.
static mut VERBOSITY: i32 = 1;

fn verbosity() -> i32 {
    // SAFETY: written only during single-threaded start-up, before the child exists.
    unsafe { VERBOSITY }
}

/// A message line at `level`, or `None` when the verbosity hides it. FATAL and WARN go to
/// stderr, the rest to stdout, with tini's `[LEVEL name (pid)] ` prefix.
fn msg(level: Level) -> Option<Line> {
    if level != Level::Fatal && (level as i32) > verbosity() {
        return None;
    }
    let (fd, tag): (c_int, &[u8]) = match level {
        Level::Fatal => (2, b"[FATAL "),
        Level::Warn => (2, b"[WARN  "),
        Level::Info => (1, b"[INFO  "),
        Level::Debug => (1, b"[DEBUG "),
    };
    let mut line = Line::new(fd);
    // SAFETY: getpid has no preconditions.
    line.s(tag)
        .s(NAME)
        .s(b" (")
        .n(i64::from(unsafe { libc::getpid() }))
        .s(b")] ");
    Some(line)
}

fn errno() -> c_int {
    // SAFETY: musl's errno location is valid for the calling thread.
    unsafe { *libc::__errno_location() }
}

// ---------------------------------------------------------------------------------------------
// Configuration from the command line and the environment.

struct Config {
    subreaper: bool,
    pdeathsig: c_int,
    warn_on_reap: bool,
    kill_group: bool,
    /// Exit codes remapped to 0 (`-e`), one bit each.
    expect: [u32; 8],
    /// `--wait-all`: seconds the rest of the tree gets after the main child exits.
    wait_all: Option<u32>,
    forward_all: bool,
    /// `--grace-period`: seconds between a forwarded SIGTERM and SIGKILL of the whole group.
    grace: Option<u32>,
    /// `--rewrite`: signal forwarded in place of each incoming one (0: unchanged).
    rewrite: [u8; 65],
    setsid: bool,
}

const SIGNALS: [(&[u8], c_int); 30] = [
    (b"HUP", libc::SIGHUP),
    (b"INT", libc::SIGINT),
    (b"QUIT", libc::SIGQUIT),
    (b"ILL", libc::SIGILL),
    (b"TRAP", libc::SIGTRAP),
    (b"ABRT", libc::SIGABRT),
    (b"BUS", libc::SIGBUS),
    (b"FPE", libc::SIGFPE),
    (b"KILL", libc::SIGKILL),
    (b"USR1", libc::SIGUSR1),
    (b"SEGV", libc::SIGSEGV),
    (b"USR2", libc::SIGUSR2),
    (b"PIPE", libc::SIGPIPE),
    (b"ALRM", libc::SIGALRM),
    (b"TERM", libc::SIGTERM),
    (b"STKFLT", libc::SIGSTKFLT),
    (b"CHLD", libc::SIGCHLD),
    (b"CONT", libc::SIGCONT),
    (b"STOP", libc::SIGSTOP),
    (b"TSTP", libc::SIGTSTP),
    (b"TTIN", libc::SIGTTIN),
    (b"TTOU", libc::SIGTTOU),
    (b"URG", libc::SIGURG),
    (b"XCPU", libc::SIGXCPU),
    (b"XFSZ", libc::SIGXFSZ),
    (b"VTALRM", libc::SIGVTALRM),
    (b"PROF", libc::SIGPROF),
    (b"WINCH", libc::SIGWINCH),
    (b"IO", libc::SIGIO),
    (b"SYS", libc::SIGSYS),
];

/// `SIGTERM` (what tini's `-p` takes). With `bare`, also `TERM` and a number (for `--rewrite`).
fn signal_number(name: &[u8], bare: bool) -> Option<c_int> {
    let short = match name.strip_prefix(b"SIG") {
        Some(rest) => rest,
        None if bare => name,
        None => return None,
    };
    if let Some((_, n)) = SIGNALS.iter().find(|(s, _)| *s == short) {
        return Some(*n);
    }
    if bare {
        return parse_u32(name)
            .filter(|n| (1..=64).contains(n))
            .map(|n| n as c_int);
    }
    None
}

fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 9 {
        return None;
    }
    s.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// Bytes of the NUL-terminated `p` (without the NUL).
fn bytes<'a>(p: *const c_char) -> &'a [u8] {
    // SAFETY: argv and environment strings are NUL-terminated and live for the whole run.
    unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes()
}

/// Writes all of `bytes` to `fd` (help texts longer than a [`Line`]).
fn write_all(fd: c_int, bytes: &[u8]) {
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: writing initialised bytes of a static string.
        let n = unsafe { libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

const USAGE: &[u8] = b"Usage: bulkhead-init [OPTIONS] [--] PROGRAM [ARGS] | --version

Execute a program under the supervision of a valid init process (bulkhead-init)

Command line options (as tini's):

  --version: Show version and exit.
  -h: Show this help message and exit.
  -s: Register as a process subreaper (requires Linux >= 3.4).
  -p SIGNAL: Trigger SIGNAL when parent dies, e.g. \"-p SIGKILL\".
  -v: Generate more verbose output. Repeat up to 3 times.
  -w: Print a warning when processes are getting reaped.
  -g: Send signals to the child's process group.
  -e EXIT_CODE: Remap EXIT_CODE (from 0 to 255) to 0 (can be repeated).
  -l: Show license and exit.

Beyond tini:

  --wait-all[=SECONDS]: When the program exits, let its remaining descendants finish:
      signal them SIGTERM, then SIGKILL what is left after SECONDS (default 10).
  --forward-all: Forward signals to every descendant, not just the program (or its group).
  --grace-period SECONDS: After forwarding SIGTERM, SIGKILL the program's process group
      if it has not exited within SECONDS.
  --rewrite FROM:TO: Forward signal FROM as TO (e.g. TERM:QUIT); can be repeated.
  --setsid: Run the program in a new session (as dumb-init does).

Environment variables:

  TINI_SUBREAPER: Register as a process subreaper (requires Linux >= 3.4).
  TINI_VERBOSITY: Set the verbosity level (default: 1).
  TINI_KILL_PROCESS_GROUP: Send signals to the child's process group.

";

fn usage(fd: c_int) {
    write_all(fd, b"bulkhead-init (");
    write_all(fd, VERSION);
    write_all(fd, b")\n");
    write_all(fd, USAGE);
}

fn license() {
    write_all(
        1,
        b"bulkhead-init is part of Bulkhead, licensed under the MIT license or the Apache License,
Version 2.0, at your option.
",
    );
}

fn bad_option(what: &[u8], option: &[u8]) -> c_int {
    if let Some(mut l) = msg(Level::Fatal) {
        l.s(what).s(option).s(b"\n");
    }
    1
}

/// Parses the command line as tini does (options stop at the first non-option or `--`),
/// returning the index of the program in `argv`, or the code to exit with (after printing what
/// was asked for, or an error).
fn parse_args(argc: usize, argv: *const *const c_char, cfg: &mut Config) -> Result<usize, c_int> {
    // SAFETY: the kernel passes `argc` valid pointers in `argv`.
    let arg = |i: usize| bytes(unsafe { *argv.add(i) });
    if argc == 2 && arg(1) == b"--version" {
        Line::new(1).s(VERSION).s(b"\n");
        return Err(0);
    }
    let mut i = 1;
    while i < argc {
        let a = arg(i);
        if a == b"--" {
            i += 1;
            break;
        }
        if let Some(long) = a.strip_prefix(b"--") {
            let (name, inline) = match long.iter().position(|&b| b == b'=') {
                Some(eq) => (&long[..eq], Some(&long[eq + 1..])),
                None => (long, None),
            };
            // The value of an option that takes one: after `=`, or the next argument.
            let value = |i: &mut usize| -> Option<&[u8]> {
                if let Some(v) = inline {
                    return Some(v);
                }
                *i += 1;
                (*i < argc).then(|| arg(*i))
            };
            match name {
                b"help" => {
                    usage(1);
                    return Err(0);
                }
                b"forward-all" => cfg.forward_all = true,
                b"setsid" => cfg.setsid = true,
                b"wait-all" => {
                    cfg.wait_all = Some(match inline {
                        None => WAIT_ALL_DEFAULT,
                        Some(v) => parse_u32(v)
                            .ok_or_else(|| bad_option(b"Not a valid value for --wait-all: ", v))?,
                    });
                }
                b"grace-period" => {
                    let v = value(&mut i).ok_or_else(|| bad_option(b"Missing value for ", a))?;
                    cfg.grace =
                        Some(parse_u32(v).ok_or_else(|| {
                            bad_option(b"Not a valid value for --grace-period: ", v)
                        })?);
                }
                b"rewrite" => {
                    let v = value(&mut i).ok_or_else(|| bad_option(b"Missing value for ", a))?;
                    let colon = v.iter().position(|&b| b == b':');
                    let pair = colon.and_then(|c| {
                        Some((
                            signal_number(&v[..c], true)?,
                            signal_number(&v[c + 1..], true)?,
                        ))
                    });
                    let (from, to) = pair.ok_or_else(|| {
                        bad_option(b"Not a valid value for --rewrite (FROM:TO): ", v)
                    })?;
                    cfg.rewrite[from as usize] = to as u8;
                }
                _ => {
                    Line::new(2)
                        .s(NAME)
                        .s(b": unrecognized option '")
                        .s(a)
                        .s(b"'\n");
                    usage(2);
                    return Err(1);
                }
            }
            i += 1;
            continue;
        }
        if a.len() < 2 || a[0] != b'-' {
            break;
        }
        let mut j = 1;
        while j < a.len() {
            let c = a[j];
            j += 1;
            match c {
                b'h' => {
                    usage(1);
                    return Err(0);
                }
                b'l' => {
                    license();
                    return Err(0);
                }
                b's' => cfg.subreaper = true,
                b'v' => {
                    // SAFETY: single-threaded start-up.
                    unsafe { VERBOSITY += 1 };
                }
                b'w' => cfg.warn_on_reap = true,
                b'g' => cfg.kill_group = true,
                b'p' | b'e' => {
                    let v = if j < a.len() {
                        let v = &a[j..];
                        j = a.len();
                        v
                    } else {
                        i += 1;
                        if i >= argc {
                            Line::new(2)
                                .s(NAME)
                                .s(b": option requires an argument -- '")
                                .s(&[c])
                                .s(b"'\n");
                            usage(2);
                            return Err(1);
                        }
                        arg(i)
                    };
                    if c == b'p' {
                        cfg.pdeathsig = signal_number(v, false)
                            .ok_or_else(|| bad_option(b"Not a valid option for -p: ", v))?;
                    } else {
                        let code = parse_u32(v)
                            .filter(|n| *n <= 255)
                            .ok_or_else(|| bad_option(b"Not a valid option for -e: ", v))?;
                        cfg.expect[(code / 32) as usize] |= 1 << (code % 32);
                    }
                }
                _ => {
                    Line::new(2)
                        .s(NAME)
                        .s(b": invalid option -- '")
                        .s(&[c])
                        .s(b"'\n");
                    usage(2);
                    return Err(1);
                }
            }
        }
        i += 1;
    }
    if i >= argc {
        usage(2);
        return Err(1);
    }
    Ok(i)
}

fn getenv(name: &[u8]) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated by every caller; getenv returns a pointer into the
    // environment, valid for the process's life, or null.
    let p = unsafe { libc::getenv(name.as_ptr().cast()) };
    (!p.is_null()).then(|| bytes(p))
}

fn parse_env(cfg: &mut Config) {
    if getenv(b"TINI_SUBREAPER\0").is_some() {
        cfg.subreaper = true;
    }
    if getenv(b"TINI_KILL_PROCESS_GROUP\0").is_some() {
        cfg.kill_group = true;
    }
    if let Some(v) = getenv(b"TINI_VERBOSITY\0") {
        // As atoi: leading digits, anything else is 0.
        let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
        let level = parse_u32(&v[..digits]).unwrap_or(0);
        // SAFETY: single-threaded start-up.
        unsafe { VERBOSITY = level.min(16) as i32 };
    }
}

// ---------------------------------------------------------------------------------------------
// Signals, the child, reaping.

/// Signals the main loop collects: all but the synchronous faults, which must keep their
/// default action in init itself, and TTIN/TTOU, which init ignores (the program owns the tty).
fn collected_signals() -> sigset_t {
    // SAFETY: sigset operations on a local set.
    unsafe {
        let mut set: sigset_t = core::mem::zeroed();
        libc::sigfillset(&raw mut set);
        for s in [
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGABRT,
            libc::SIGTRAP,
            libc::SIGSYS,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ] {
            libc::sigdelset(&raw mut set, s);
        }
        set
    }
}

/// What the child gets back before exec: the signal mask and TTIN/TTOU actions init started with.
struct Saved {
    mask: sigset_t,
    ttin: libc::sigaction,
    ttou: libc::sigaction,
}

fn configure_signals(set: &sigset_t) -> Result<Saved, c_int> {
    // SAFETY: plain signal-state syscalls on local, initialised structs.
    unsafe {
        let mut saved: Saved = core::mem::zeroed();
        if libc::sigprocmask(libc::SIG_SETMASK, set, &raw mut saved.mask) != 0 {
            if let Some(mut l) = msg(Level::Fatal) {
                l.s(b"sigprocmask failed: '").errno().s(b"'\n");
            }
            return Err(1);
        }
        let mut ignore: libc::sigaction = core::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        if libc::sigaction(libc::SIGTTIN, &raw const ignore, &raw mut saved.ttin) != 0
            || libc::sigaction(libc::SIGTTOU, &raw const ignore, &raw mut saved.ttou) != 0
        {
            if let Some(mut l) = msg(Level::Fatal) {
                l.s(b"Failed to ignore SIGTTIN/SIGTTOU\n");
            }
            return Err(1);
        }
        Ok(saved)
    }
}

/// In the forked child: own process group (or session) and the terminal, signals restored,
/// then exec. Returns only the exit status to use when that fails.
fn exec_child(cfg: &Config, saved: &Saved, argv: *const *const c_char) -> c_int {
    // SAFETY: we are the only thread of the freshly forked child; every call gets valid
    // pointers (argv from the kernel, structs saved before the fork).
    unsafe {
        if cfg.setsid {
            if libc::setsid() < 0 {
                if let Some(mut l) = msg(Level::Fatal) {
                    l.s(b"setsid failed: ").errno().s(b"\n");
                }
                return 1;
            }
            // Make the terminal, if any, the new session's controlling terminal; no terminal
            // (or one another session still holds) is fine.
            let _ = libc::ioctl(0, libc::TIOCSCTTY, 0);
        } else {
            if libc::setpgid(0, 0) < 0 {
                if let Some(mut l) = msg(Level::Fatal) {
                    l.s(b"setpgid failed: ").errno().s(b"\n");
                }
                return 1;
            }
            // Give the terminal to the new group from here, not from init: if init itself runs
            // under another init, the grandparent may hand the foreground to init's group and
            // leave this one in the background. TTOU is still ignored, so this cannot stop us.
            if libc::tcsetpgrp(0, libc::getpgrp()) != 0 {
                let e = errno();
                if e == libc::ENOTTY || e == libc::ENXIO {
                    if let Some(mut l) = msg(Level::Debug) {
                        l.s(b"tcsetpgrp failed: no tty (ok to proceed)\n");
                    }
                } else {
                    if let Some(mut l) = msg(Level::Fatal) {
                        l.s(b"tcsetpgrp failed: ").errno().s(b"\n");
                    }
                    return 1;
                }
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, &raw const saved.mask, ptr::null_mut()) != 0
            || libc::sigaction(libc::SIGTTIN, &raw const saved.ttin, ptr::null_mut()) != 0
            || libc::sigaction(libc::SIGTTOU, &raw const saved.ttou, ptr::null_mut()) != 0
        {
            if let Some(mut l) = msg(Level::Fatal) {
                l.s(b"Restoring child signal state failed: '")
                    .errno()
                    .s(b"'\n");
            }
            return 1;
        }
        libc::execvp(*argv, argv);
        // Shell conventions for a command that could not run.
        let status = match errno() {
            libc::ENOENT => 127,
            libc::EACCES => 126,
            _ => 1,
        };
        if let Some(mut l) = msg(Level::Fatal) {
            l.s(b"exec ").c(*argv).s(b" failed: ").errno().s(b"\n");
        }
        status
    }
}

/// Now on `CLOCK_MONOTONIC`, in milliseconds.
fn now_ms() -> i64 {
    // SAFETY: `timespec` is two integers, so all-zero bytes are a valid value.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: clock_gettime with a valid clock and a pointer to a live, writable local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Every process below init, found through /proc (parent links; orphans re-parented to init
/// count). Returns how many pids were written to `out`.
fn descendants(out: &mut [pid_t]) -> usize {
    const MAX: usize = 4096;
    let mut pids = [0 as pid_t; MAX];
    let mut parents = [0 as pid_t; MAX];
    let mut n = 0;
    // SAFETY: open/getdents64/read/close with local buffers and their lengths; getdents64
    // records are walked by their own length fields within the bytes the kernel returned.
    unsafe {
        let dir = libc::open(
            c"/proc".as_ptr().cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return 0;
        }
        // getdents64 rather than opendir: musl's opendir allocates, and this binary has no
        // other use for malloc.
        let mut ents = [0u8; 4096];
        'read: loop {
            let got =
                libc::syscall(libc::SYS_getdents64, dir, ents.as_mut_ptr(), ents.len()) as isize;
            if got <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + 19 < got as usize {
                let reclen = u16::from_ne_bytes([ents[off + 16], ents[off + 17]]) as usize;
                if reclen == 0 || n == MAX {
                    break 'read;
                }
                let name_bytes = &ents[off + 19..(off + reclen).min(got as usize)];
                let name = &name_bytes[..name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len())];
                off += reclen;
                let Some(pid) = parse_u32(name) else { continue };
                let mut path = [0u8; 32];
                let mut len = 0;
                for &b in b"/proc/".iter().chain(name).chain(b"/stat\0") {
                    if len < path.len() {
                        path[len] = b;
                        len += 1;
                    }
                }
                let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    continue;
                }
                let mut buf = [0u8; 512];
                let r = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                libc::close(fd);
                if r <= 0 {
                    continue;
                }
                // "pid (comm) state ppid ...": comm may hold anything, so parse after the last ')'.
                let stat = &buf[..r as usize];
                let Some(close) = stat.iter().rposition(|&b| b == b')') else {
                    continue;
                };
                let mut fields = stat[close + 1..]
                    .split(|&b| b == b' ')
                    .filter(|f| !f.is_empty());
                if let Some(ppid) = fields.nth(1).and_then(parse_u32) {
                    pids[n] = pid as pid_t;
                    parents[n] = ppid as pid_t;
                    n += 1;
                }
            }
        }
        libc::close(dir);
    }
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let mut found = 0;
    let mut marked = [false; MAX];
    loop {
        let mut grew = false;
        for k in 0..n {
            if marked[k] {
                continue;
            }
            let parent = parents[k];
            if parent == me || out[..found].contains(&parent) {
                marked[k] = true;
                if found < out.len() {
                    out[found] = pids[k];
                    found += 1;
                }
                grew = true;
            }
        }
        if !grew {
            return found;
        }
    }
}

/// Sends `sig` to every descendant (or, as PID 1, to every process in the namespace, which is
/// the same set and needs no /proc).
fn signal_all(sig: c_int) {
    // SAFETY: kill with a valid signal; errors (nobody left) are fine.
    unsafe {
        if libc::getpid() == 1 {
            libc::kill(-1, sig);
            return;
        }
    }
    let mut pids = [0 as pid_t; 4096];
    let n = descendants(&mut pids);
    for &pid in &pids[..n] {
        // SAFETY: as above.
        unsafe { libc::kill(pid, sig) };
    }
}

struct Init<'a> {
    cfg: &'a Config,
    child: pid_t,
    /// The main child's exit code, once it has been reaped.
    exit_code: Option<c_int>,
    /// When (ms) to SIGKILL the group after a forwarded SIGTERM.
    kill_at: Option<i64>,
    /// When (ms) `--wait-all` gives up on the rest of the tree.
    wait_all_until: Option<i64>,
    no_children: bool,
}

impl Init<'_> {
    fn forward(&mut self, sig: c_int) -> Result<(), c_int> {
        let out = match self.cfg.rewrite.get(sig as usize) {
            Some(&to) if to != 0 => c_int::from(to),
            _ => sig,
        };
        if let Some(mut l) = msg(Level::Debug) {
            l.s(b"Passing signal: ")
                .n(i64::from(sig))
                .s(b" as ")
                .n(i64::from(out))
                .s(b"\n");
        }
        if self.cfg.forward_all || self.exit_code.is_some() {
            signal_all(out);
        } else {
            let target = if self.cfg.kill_group {
                -self.child
            } else {
                self.child
            };
            // SAFETY: kill with a valid signal number.
            if unsafe { libc::kill(target, out) } != 0 {
                if errno() == libc::ESRCH {
                    if let Some(mut l) = msg(Level::Warn) {
                        l.s(b"Child was dead when forwarding signal\n");
                    }
                } else {
                    if let Some(mut l) = msg(Level::Fatal) {
                        l.s(b"Unexpected error when forwarding signal: '")
                            .errno()
                            .s(b"'\n");
                    }
                    return Err(1);
                }
            }
        }
        if sig == libc::SIGTERM
            && self.exit_code.is_none()
            && self.kill_at.is_none()
            && let Some(grace) = self.cfg.grace
        {
            self.kill_at = Some(now_ms() + i64::from(grace) * 1000);
        }
        Ok(())
    }

    /// Reaps every zombie there is now; records the main child's status.
    fn reap(&mut self) -> Result<(), c_int> {
        loop {
            let mut status: c_int = 0;
            // SAFETY: waitpid with a local status word.
            let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
            if pid == 0 {
                return Ok(());
            }
            if pid < 0 {
                if errno() == libc::ECHILD {
                    self.no_children = true;
                    return Ok(());
                }
                if errno() == libc::EINTR {
                    continue;
                }
                if let Some(mut l) = msg(Level::Fatal) {
                    l.s(b"Error while waiting for pids: '").errno().s(b"'\n");
                }
                return Err(1);
            }
            if pid == self.child {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    if let Some(mut l) = msg(Level::Fatal) {
                        l.s(b"Main child exited for unknown reason\n");
                    }
                    return Err(1);
                } % 256;
                let remapped = self.cfg.expect[(code / 32) as usize] & (1 << (code % 32)) != 0;
                if let Some(mut l) = msg(Level::Info) {
                    l.s(b"Main child exited with status ")
                        .n(i64::from(code))
                        .s(b"\n");
                }
                self.exit_code = Some(if remapped { 0 } else { code });
            } else if self.cfg.warn_on_reap
                && let Some(mut l) = msg(Level::Warn)
            {
                l.s(b"Reaped zombie process with pid=")
                    .n(i64::from(pid))
                    .s(b"\n");
            }
        }
    }

    /// Waits for the next signal, or until the nearest deadline.
    fn wait_signal(&mut self, set: &sigset_t) -> Result<Option<c_int>, c_int> {
        let deadline = match (self.kill_at, self.wait_all_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // SAFETY: siginfo and timespec are local; the set is initialised.
        let got = unsafe {
            let mut info: libc::siginfo_t = core::mem::zeroed();
            match deadline {
                None => libc::sigwaitinfo(set, &raw mut info),
                Some(at) => {
                    let left = (at - now_ms()).max(0);
                    let ts = libc::timespec {
                        tv_sec: left / 1000,
                        tv_nsec: (left % 1000) * 1_000_000,
                    };
                    libc::sigtimedwait(set, &raw mut info, &raw const ts)
                }
            }
        };
        if got > 0 {
            return Ok(Some(got));
        }
        match errno() {
            libc::EAGAIN | libc::EINTR => Ok(None),
            _ => {
                if let Some(mut l) = msg(Level::Fatal) {
                    l.s(b"Unexpected error in sigtimedwait: '")
                        .errno()
                        .s(b"'\n");
                }
                Err(1)
            }
        }
    }

    fn run(&mut self, set: &sigset_t) -> c_int {
        loop {
            match self.wait_signal(set) {
                Err(code) => return code,
                Ok(Some(sig)) if sig != libc::SIGCHLD => {
                    if let Err(code) = self.forward(sig) {
                        return code;
                    }
                }
                Ok(_) => {}
            }
            if let Err(code) = self.reap() {
                return code;
            }
            let now = now_ms();
            if self.kill_at.is_some_and(|at| now >= at) {
                self.kill_at = None;
                if self.exit_code.is_none() {
                    if let Some(mut l) = msg(Level::Warn) {
                        l.s(b"Grace period over: killing the process group\n");
                    }
                    // SAFETY: kill with a valid signal; a gone group is fine.
                    unsafe { libc::kill(-self.child, libc::SIGKILL) };
                    if self.cfg.forward_all {
                        signal_all(libc::SIGKILL);
                    }
                }
            }
            let Some(code) = self.exit_code else { continue };
            match (self.cfg.wait_all, self.wait_all_until) {
                (Some(secs), None) if !self.no_children => {
                    // The program is done; ask the rest of the tree to finish.
                    if let Some(mut l) = msg(Level::Info) {
                        l.s(b"Waiting up to ")
                            .n(i64::from(secs))
                            .s(b"s for the remaining processes\n");
                    }
                    signal_all(libc::SIGTERM);
                    self.wait_all_until = Some(now + i64::from(secs) * 1000);
                }
                (Some(_), Some(until)) if !self.no_children => {
                    if now >= until {
                        if let Some(mut l) = msg(Level::Warn) {
                            l.s(b"Processes left after --wait-all: killing them\n");
                        }
                        signal_all(libc::SIGKILL);
                        self.finish();
                        return code;
                    }
                }
                _ => {
                    self.finish();
                    return code;
                }
            }
        }
    }

    /// Leaves nothing of the program's process group behind: SIGKILL it and reap what dies
    /// within a second.
    fn finish(&mut self) {
        // SAFETY: kill with a valid signal; ESRCH (empty group) is the common case.
        if unsafe { libc::kill(-self.child, libc::SIGKILL) } != 0 {
            return;
        }
        let until = now_ms() + 1000;
        while now_ms() < until {
            let mut status = 0;
            // SAFETY: waitpid on the group with a local status word.
            let pid = unsafe { libc::waitpid(-self.child, &raw mut status, libc::WNOHANG) };
            if pid < 0 {
                return;
            }
            if pid == 0 {
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 5_000_000,
                };
                // SAFETY: nanosleep with a valid duration.
                unsafe { libc::nanosleep(&raw const ts, ptr::null_mut()) };
            }
        }
    }
}

fn reaper_check() {
    // SAFETY: getpid/prctl with valid arguments.
    unsafe {
        if libc::getpid() == 1 {
            return;
        }
        let mut bit: c_int = 0;
        if libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &raw mut bit) == 0 && bit == 1 {
            return;
        }
    }
    if let Some(mut l) = msg(Level::Warn) {
        l.s(b"bulkhead-init is not running as PID 1 and isn't registered as a child subreaper.\n");
    }
    if verbosity() >= Level::Warn as i32 {
        write_all(
            2,
            b"Zombie processes will not be re-parented to bulkhead-init, so zombie reaping won't work.
To fix the problem, use the -s option or set the environment variable TINI_SUBREAPER to register
bulkhead-init as a child subreaper, or run bulkhead-init as PID 1.
",
        );
    }
}

fn real_main(argc: usize, argv: *const *const c_char) -> c_int {
    let mut cfg = Config {
        subreaper: false,
        pdeathsig: 0,
        warn_on_reap: false,
        kill_group: false,
        expect: [0; 8],
        wait_all: None,
        forward_all: false,
        grace: None,
        rewrite: [0; 65],
        setsid: false,
    };
    let program = match parse_args(argc, argv, &mut cfg) {
        Ok(i) => i,
        Err(code) => return code,
    };
    parse_env(&mut cfg);
    let set = collected_signals();
    let saved = match configure_signals(&set) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // SAFETY: prctl with documented arguments.
    if cfg.pdeathsig != 0
        && unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, cfg.pdeathsig as libc::c_ulong) } != 0
    {
        if let Some(mut l) = msg(Level::Fatal) {
            l.s(b"Failed to set up parent death signal\n");
        }
        return 1;
    }
    // SAFETY: as above.
    if cfg.subreaper
        && unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0
    {
        if let Some(mut l) = msg(Level::Fatal) {
            l.s(b"Failed to register as child subreaper: ")
                .errno()
                .s(b"\n");
        }
        return 1;
    }
    reaper_check();
    // SAFETY: `program < argc`, so this points at the program's argv entry, and argv is
    // NULL-terminated after it.
    let child_argv = unsafe { argv.add(program) };
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        if let Some(mut l) = msg(Level::Fatal) {
            l.s(b"fork failed: ").errno().s(b"\n");
        }
        return 1;
    }
    if pid == 0 {
        let status = exec_child(&cfg, &saved, child_argv);
        // SAFETY: leave the forked child without running anything of the parent's.
        unsafe { libc::_exit(status) };
    }
    if let Some(mut l) = msg(Level::Info) {
        // SAFETY: child_argv[0] is the program name.
        l.s(b"Spawned child process '")
            .c(unsafe { *child_argv })
            .s(b"' with pid '")
            .n(i64::from(pid))
            .s(b"'\n");
    }
    let mut init = Init {
        cfg: &cfg,
        child: pid,
        exit_code: None,
        kill_at: None,
        wait_all_until: None,
        no_children: false,
    };
    init.run(&set)
}

#[cfg(not(test))]
#[unsafe(no_mangle)]
pub extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    real_main(argc.max(0) as usize, argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_follow_tini_for_p_and_are_looser_for_rewrite() {
        assert_eq!(signal_number(b"SIGKILL", false), Some(libc::SIGKILL));
        assert_eq!(signal_number(b"KILL", false), None);
        assert_eq!(signal_number(b"TERM", true), Some(libc::SIGTERM));
        assert_eq!(signal_number(b"3", true), Some(3));
        assert_eq!(signal_number(b"65", true), None);
        assert_eq!(signal_number(b"SIGNOPE", false), None);
    }

    #[test]
    fn numbers_parse_strictly() {
        assert_eq!(parse_u32(b"255"), Some(255));
        assert_eq!(parse_u32(b""), None);
        assert_eq!(parse_u32(b"1x"), None);
        assert_eq!(parse_u32(b"-1"), None);
    }
}
