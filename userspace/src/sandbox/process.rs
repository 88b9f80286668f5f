//! The sandbox's first process: cloned into new namespaces, held until the parent has placed it
//! (cgroup, user mappings, network), then given its own /proc, /dev, /tmp and root, its
//! hostname and reduced privileges, and replaced by `bulkhead-init` running the command.
//!
//! The child runs between `clone(2)` and `execve(2)` in a copy of a single-threaded process:
//! it only makes system calls and formats error strings. Any failure is written to an error
//! pipe (close-on-exec, so a successful exec reads as end of file) and the child exits 127.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::CloneFlags,
    unistd::{Pid, chdir, pivot_root, sethostname},
};

use super::{
    SandboxError,
    spec::{TimeOffsets, Ulimit, User, Volume},
};

/// What the child needs, prepared by the parent before cloning (no allocation decisions left
/// for the child except error messages).
pub struct ChildSpec {
    pub hostname: String,
    pub rootfs: Option<PathBuf>,
    pub workdir: String,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub userns: bool,
    pub cgroupns: bool,
    pub privileged: bool,
    /// `bulkhead-init`, opened before the root changes, executed through the descriptor.
    pub init: File,
    /// Standard output and error for a detached sandbox (its log), standard input /dev/null.
    pub log: Option<File>,
    /// The root read-only (always for the host's root).
    pub read_only_root: bool,
    pub volumes: Vec<Volume>,
    /// The capabilities the command keeps (ignored when privileged).
    pub caps: u64,
    pub user: Option<User>,
    pub ulimits: Vec<Ulimit>,
    pub time_offsets: Option<TimeOffsets>,
    /// Host device nodes bound into /dev besides the default ones, as (host path, name).
    pub devices: Vec<(PathBuf, String)>,
    /// The AppArmor profile to enter on exec.
    pub apparmor: Option<CString>,
    /// Seccomp filters to install last, compiled by the parent.
    pub seccomp: Vec<seccompiler::BpfProgram>,
}

/// A cloned child waiting for [`Child::open_gate`] (then sets up its mounts) and
/// [`Child::release`] (then execs).
pub struct Child {
    pub pid: Pid,
    go: Option<File>,
    /// Whether the first gate is open.
    opened: bool,
    errors: File,
}

/// Docker's default capability set as a mask: what a sandbox keeps unless `--privileged`,
/// `--cap-add` or `--cap-drop` say otherwise.
pub fn default_caps() -> u64 {
    DEFAULT_CAPS.iter().map(|c| 1u64 << c).sum()
}

/// Capabilities a sandbox keeps unless `--privileged`: docker's default set.
const DEFAULT_CAPS: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Device nodes of the sandbox's /dev, bound from the host's.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Clones the sandbox's first process into new namespaces. It waits for [`Child::release`].
pub fn spawn(spec: &ChildSpec) -> Result<Child, SandboxError> {
    if let Some(root) = &spec.rootfs {
        // The mount points the child needs, made while still privileged on the host (root of a
        // user namespace may not write to a rootfs owned by the host's root).
        for dir in ["proc", "sys", "dev", "tmp"] {
            ensure_dir(&root.join(dir)).map_err(|message| SandboxError::Setup { message })?;
        }
    }
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::io("create a pipe", e.into()))
    };
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if spec.userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    // A cgroup namespace is made by the child once it is in its cgroup (see `setup_and_exec`):
    // made at clone time, its root would be the cgroup of the process that cloned it.
    // SAFETY: clone(2) without a new stack behaves like fork(2): the child continues on a copy
    // of this (single-threaded) process's memory. It only runs `child_main`, which makes system
    // calls and exits or execs.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        -1 => Err(SandboxError::io(
            "clone the sandbox's first process",
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(go_w);
            drop(err_r);
            child_main(spec, go_r, err_w)
        }
        pid => {
            drop(go_r);
            drop(err_w);
            Ok(Child {
                pid: Pid::from_raw(pid as i32),
                go: Some(File::from(go_w)),
                opened: false,
                errors: File::from(err_r),
            })
        }
    }
}

impl Child {
    /// Writes the user and group mappings of a `--userns` sandbox: root inside is an
    /// unprivileged range outside.
    pub fn map_users(&self, first: u32, count: u32) -> Result<(), SandboxError> {
        let dir = PathBuf::from(format!("/proc/{}", self.pid));
        let write = |file: &str, text: String| {
            std::fs::write(dir.join(file), text)
                .map_err(|e| SandboxError::io(&format!("write {file} of the sandbox"), e))
        };
        write("setgroups", "deny".into())?;
        write("uid_map", format!("0 {first} {count}\n"))?;
        write("gid_map", format!("0 {first} {count}\n"))
    }

    /// Lets the child set up its mounts (it is in its cgroup, its user mappings written); it
    /// waits for [`Child::release`] before it execs.
    pub fn open_gate(&mut self) -> Result<(), SandboxError> {
        match self.go.as_mut() {
            Some(go) if !self.opened => {
                self.opened = true;
                go.write_all(b"g")
                    .map_err(|e| SandboxError::io("let the sandbox's first process set up", e))
            }
            _ => Ok(()),
        }
    }

    /// Lets the child exec (opening the first gate too if still closed); returns once it has
    /// exec'd, or its error.
    pub fn release(&mut self) -> Result<(), SandboxError> {
        // A child whose setup failed past the first gate is gone (EPIPE here): its message,
        // on the error pipe, is the one to report.
        let sent = match self.go.take() {
            Some(mut go) => go.write_all(if self.opened { b"g" } else { b"gg" }),
            None => Ok(()),
        };
        let mut message = String::new();
        let _ = self.errors.read_to_string(&mut message);
        if !message.is_empty() {
            return Err(SandboxError::Setup { message });
        }
        sent.map_err(|e| SandboxError::io("release the sandbox's first process", e))
    }
}

/// The child, up to exec. Never returns.
fn child_main(spec: &ChildSpec, go: OwnedFd, errors: OwnedFd) -> ! {
    let mut errors = File::from(errors);
    default_signals();
    // SAFETY: prctl(2) on this process only.
    unsafe {
        // Die with the parent while it is still setting us up.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let mut byte = [0u8; 1];
    let mut go = File::from(go);
    if !matches!(go.read(&mut byte), Ok(1)) {
        // The parent gave up (and cleans up).
        // SAFETY: exit without running this copy's destructors or atexit handlers.
        unsafe { libc::_exit(127) };
    }
    let err = match setup_and_exec(spec, &mut go) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = errors.write_all(err.as_bytes());
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

/// Every signal back to its default action and none blocked, so a sandbox starts the same
/// whatever `bulkhead` was started with: ignored dispositions survive execve(2), and nohup, a
/// shell's background job without job control (SIGINT, SIGQUIT) or a systemd unit (SIGPIPE)
/// would otherwise pass theirs on to bulkhead-init and the program (signal(7), "Signal
/// disposition": "During an execve(2), the dispositions of handled signals are reset to the
/// default; the dispositions of ignored signals are left unchanged"). The signals the parent
/// blocks to forward them must reach the command too.
/// Async-signal-safe: only sigaction(2) and sigprocmask(2).
pub fn default_signals() {
    /// The kernel's `struct sigaction` for `rt_sigaction(2)` (`x86_64` and arm64 order).
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::sighandler_t,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // Linux numbers signals 1 to 64; SIGKILL and SIGSTOP cannot be changed. The raw system
    // call, because glibc refuses to touch 32 and 33, which it keeps for itself, and an
    // ignored 32 inherited from elsewhere would otherwise stay.
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction(2) with a fully initialised kernel sigaction whose handler
            // is SIG_DFL (no handler code, so no restorer), no old action, and the kernel's
            // sigset size of 8 bytes.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &raw const default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
    }
    // SAFETY: an empty set, initialised before use, installed as this thread's mask.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
    }
}

enum Never {}

/// Mounts, hostname, privileges, exec. Returns only an error message.
fn setup_and_exec(spec: &ChildSpec, go: &mut File) -> Result<Never, String> {
    let sys = |what: &str, e: nix::Error| format!("{what}: {e}");
    if spec.userns {
        // Become root of the new user namespace (the parent has written the mappings).
        // SAFETY: plain credential system calls.
        let r = unsafe { libc::setresgid(0, 0, 0) | libc::setresuid(0, 0, 0) };
        if r != 0 {
            return Err(format!(
                "become root in the user namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if spec.cgroupns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| sys("create the cgroup namespace", e))?;
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| sys("make mounts private", e))?;
    let root = match &spec.rootfs {
        Some(r) => {
            mount(
                Some(r.as_path()),
                r.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| sys(&format!("bind {}", r.display()), e))?;
            r.clone()
        }
        None => PathBuf::from("/"),
    };
    let at = |p: &str| root.join(p);
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if spec.read_only_root {
        // Every mount beneath the root, in this mount namespace only: the host's mounts are
        // not touched (the namespace holds copies of them).
        read_only_tree(&root).map_err(|e| format!("make the root read-only: {e}"))?;
    }
    // /tmp first: the new /dev is assembled there when there is no separate root.
    ensure_dir(&at("tmp"))?;
    mount(
        Some("tmpfs"),
        &at("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| sys("mount /tmp", e))?;
    build_dev(&at("dev"), &at("tmp/.bulkhead-dev"), &spec.devices)?;
    // Scratch space where programs expect it, so a read-only root still runs them.
    for dir in ["run", "var/tmp"] {
        if at(dir).is_dir() || (!spec.read_only_root && std::fs::create_dir_all(at(dir)).is_ok()) {
            mount(
                Some("tmpfs"),
                &at(dir),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=1777"),
            )
            .map_err(|e| sys(&format!("mount /{dir}"), e))?;
        }
    }
    for v in &spec.volumes {
        bind_volume(&root, v, spec.read_only_root)?;
    }
    ensure_dir(&at("proc"))?;
    mount(Some("proc"), &at("proc"), Some("proc"), nodev, None::<&str>)
        .map_err(|e| sys("mount /proc", e))?;
    ensure_dir(&at("sys"))?;
    let sys_flags = if spec.privileged {
        nodev
    } else {
        nodev | MsFlags::MS_RDONLY
    };
    mount(
        Some("sysfs"),
        &at("sys"),
        Some("sysfs"),
        sys_flags,
        None::<&str>,
    )
    .map_err(|e| sys("mount /sys", e))?;
    if !spec.privileged {
        let proc_sys = at("proc/sys");
        mount(
            Some(&proc_sys),
            &proc_sys,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| sys("bind /proc/sys", e))?;
        mount(
            None::<&str>,
            &proc_sys,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nodev,
            None::<&str>,
        )
        .map_err(|e| sys("make /proc/sys read-only", e))?;
    }
    if !spec.privileged {
        mask_paths(&root)?;
    }
    if spec.rootfs.is_some() {
        // pivot_root(".", "."): the old root ends up stacked on the new one and is detached at
        // once; no directory for it is needed inside the rootfs (which root of a user
        // namespace may not be allowed to create).
        chdir(&root).map_err(|e| sys("enter the root", e))?;
        match pivot_root(".", ".") {
            Ok(()) => {
                umount2(".", MntFlags::MNT_DETACH).map_err(|e| sys("detach the old root", e))?;
            }
            // The host's root is an initramfs, which cannot be pivoted away from (an initramfs
            // boot, like the test VM's): move the new root over it and chroot, as
            // switch_root and runc's no-pivot mode do.
            Err(nix::Error::EINVAL) => {
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                    .map_err(|e| sys("move the root into place", e))?;
                nix::unistd::chroot(".").map_err(|e| sys("chroot", e))?;
            }
            Err(e) => return Err(sys("pivot_root", e)),
        }
        chdir("/").map_err(|e| sys("enter the new root", e))?;
    }
    sethostname(&spec.hostname).map_err(|e| sys("set the hostname", e))?;
    chdir(spec.workdir.as_str())
        .map_err(|e| sys(&format!("enter the working directory {}", spec.workdir), e))?;
    if let Some(log) = &spec.log {
        let null = File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
        // SAFETY: dup2 onto the standard descriptors of this process.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(log.as_raw_fd(), 1);
            libc::dup2(log.as_raw_fd(), 2);
        }
    }
    // The second gate: the network is ready (the first, before the mounts: in its cgroup).
    let mut byte = [0u8; 1];
    if !matches!(go.read(&mut byte), Ok(1)) {
        // SAFETY: the parent gave up; exit without running this copy's destructors.
        unsafe { libc::_exit(127) };
    }
    for limit in &spec.ulimits {
        let value = libc::rlimit {
            rlim_cur: limit.soft,
            rlim_max: limit.hard,
        };
        // SAFETY: setrlimit(2) with a resource number from the table of known ones and an
        // initialised struct.
        if unsafe { libc::setrlimit(limit.resource as _, &raw const value) } != 0 {
            return Err(format!(
                "set resource limit {} to {}:{} (raising a hard limit needs CAP_SYS_RESOURCE): {}",
                limit.resource,
                limit.soft,
                limit.hard,
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Some(offsets) = spec.time_offsets {
        enter_time_namespace(offsets)?;
    }
    if !spec.privileged {
        drop_privileges(spec.caps)?;
    }
    if let Some(user) = spec.user {
        become_user(user)?;
    }
    if let Some(profile) = &spec.apparmor {
        super::apparmor::change_on_exec(profile)?;
    }
    super::seccomp::install(&spec.seccomp)?;
    // Set up: from here the sandbox outlives whoever started it.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    let argv: Vec<*const libc::c_char> = spec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = spec
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: null-terminated arrays of pointers to NUL-terminated strings that outlive the
    // call; the descriptor is an open executable.
    unsafe { libc::fexecve(spec.init.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
    Err(format!(
        "exec bulkhead-init: {}",
        std::io::Error::last_os_error()
    ))
}

/// Makes every mount from `root` down read-only (`mount_setattr(2)`, Linux 5.12).
fn read_only_tree(root: &Path) -> std::io::Result<()> {
    /// `struct mount_attr`.
    #[repr(C)]
    struct MountAttr {
        set: u64,
        clear: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        set: MOUNT_ATTR_RDONLY,
        clear: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let path = CString::new(root.as_os_str().as_bytes())?;
    // SAFETY: mount_setattr(2) on a NUL-terminated path with an initialised attribute struct
    // of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds a host path into the sandbox at its target (created when the root is writable),
/// read-only if asked.
fn bind_volume(root: &Path, v: &Volume, read_only_root: bool) -> Result<(), String> {
    let target = root.join(v.target.trim_start_matches('/'));
    if !target.exists() {
        if read_only_root {
            return Err(format!(
                "volume {}: {} does not exist in the read-only root",
                v.host.display(),
                v.target
            ));
        }
        let made = if v.host.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| File::create(&target).map(drop))
        };
        made.map_err(|e| format!("create the volume target {}: {e}", v.target))?;
    }
    mount(
        Some(&v.host),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind {} at {}: {e}", v.host.display(), v.target))?;
    if v.read_only {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("make the volume {} read-only: {e}", v.target))?;
    }
    Ok(())
}

/// Files of /proc and /sys hidden from the sandbox, as docker hides them: /dev/null bound over
/// a file, an empty read-only tmpfs over a directory.
const MASKED_PATHS: [&str; 6] = [
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
];
/// Paths of /proc the sandbox may read but not write, as docker has them.
const READ_ONLY_PATHS: [&str; 4] = ["proc/bus", "proc/fs", "proc/irq", "proc/sysrq-trigger"];

fn mask_paths(root: &Path) -> Result<(), String> {
    let null = root.join("dev/null");
    for p in MASKED_PATHS {
        let path = root.join(p);
        let result = if path.is_dir() {
            mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
        } else if path.exists() {
            mount(
                Some(&null),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        } else {
            continue;
        };
        result.map_err(|e| format!("mask /{p}: {e}"))?;
    }
    for p in READ_ONLY_PATHS {
        let path = root.join(p);
        if !path.exists() {
            continue;
        }
        mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        })
        .map_err(|e| format!("make /{p} read-only: {e}"))?;
    }
    Ok(())
}

/// A new time namespace with `offsets`, entered by the program when it is executed
/// (`time_namespaces(7)`: the offsets must be written before any process is in the namespace,
/// and execve(2) moves the caller into it).
fn enter_time_namespace(offsets: TimeOffsets) -> Result<(), String> {
    // CLONE_NEWTIME, Linux 5.6.
    const CLONE_NEWTIME: libc::c_int = 0x80;
    // SAFETY: unshare(2) with a namespace flag.
    if unsafe { libc::unshare(CLONE_NEWTIME) } != 0 {
        return Err(format!(
            "create the time namespace (Linux 5.6 or newer): {}",
            std::io::Error::last_os_error()
        ));
    }
    let text = format!(
        "monotonic {} 0\nboottime {} 0\n",
        offsets.monotonic, offsets.boottime
    );
    std::fs::write("/proc/self/timens_offsets", text)
        .map_err(|e| format!("set the time namespace's clock offsets: {e}"))
}

/// Switches to `user` for good: no supplementary groups, then the group, then the user.
fn become_user(user: User) -> Result<(), String> {
    // SAFETY: plain credential system calls with integer arguments; setgroups with an empty
    // list reads nothing.
    let r = unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            -1
        } else {
            libc::setresgid(user.gid, user.gid, user.gid)
                | libc::setresuid(user.uid, user.uid, user.uid)
        }
    };
    if r != 0 {
        return Err(format!(
            "become user {}:{}: {}",
            user.uid,
            user.gid,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn ensure_dir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("create {}: {e}", path.display())),
    }
}

/// A minimal /dev at `dev`: a tmpfs with the usual device nodes bound from the host's, a new
/// devpts instance, /dev/shm, and the conventional links. Assembled at `staging` (the host's
/// /dev is still visible then) and moved into place.
fn build_dev(dev: &Path, staging: &Path, extra: &[(PathBuf, String)]) -> Result<(), String> {
    let sys = |what: String, e: nix::Error| format!("{what}: {e}");
    ensure_dir(staging)?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| sys("mount a tmpfs for /dev".into(), e))?;
    let defaults = DEVICES
        .iter()
        .map(|n| (Path::new("/dev").join(n), (*n).to_owned()));
    for (host, name) in defaults.chain(extra.iter().cloned()) {
        let node = staging.join(&name);
        File::create(&node).map_err(|e| format!("create {}: {e}", node.display()))?;
        mount(
            Some(&host),
            &node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| sys(format!("bind {}", host.display()), e))?;
    }
    for dir in ["pts", "shm"] {
        ensure_dir(&staging.join(dir))?;
    }
    mount(
        Some("devpts"),
        &staging.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )
    .map_err(|e| sys("mount /dev/pts".into(), e))?;
    mount(
        Some("shm"),
        &staging.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| sys("mount /dev/shm".into(), e))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, staging.join(link))
            .map_err(|e| format!("link /dev/{link}: {e}"))?;
    }
    ensure_dir(dev)?;
    mount(
        Some(staging),
        dev,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|e| sys("move /dev into place".into(), e))?;
    let _ = std::fs::remove_dir(staging);
    Ok(())
}

/// Keeps only the capabilities in `keep` (a mask by capability number) and sets
/// `no_new_privs`.
fn drop_privileges(keep: u64) -> Result<(), String> {
    // The highest capability this kernel knows.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if keep & (1u64 << cap) == 0 {
            // SAFETY: prctl with plain integer arguments.
            let r =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
            if r != 0 {
                return Err(format!(
                    "drop capability {cap}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    // The bounding set limits what exec grants; the sets this process holds now must shrink
    // too, or the init would run with them.
    let mask = keep;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    }; // _LINUX_CAPABILITY_VERSION_3
    let half = |shift: u32| Data {
        effective: (mask >> shift) as u32,
        permitted: (mask >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: capset(2) with a version-3 header and the two data structs it reads.
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    if r != 0 {
        return Err(format!(
            "set capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Finds `command` the way the sandbox's exec will: a path (relative to the sandbox's root),
/// or a name searched in `path_var`'s directories there. `Err` names what is missing.
pub fn resolve_command(root: &Path, command: &str, path_var: &str) -> Result<(), SandboxError> {
    use std::os::unix::fs::PermissionsExt;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // Symbolic links resolve inside the root, as they will once it is the sandbox's `/`.
    let executable = |p: &Path| {
        let mut p = p.to_owned();
        for _ in 0..40 {
            match std::fs::read_link(&p) {
                Ok(target) if target.is_absolute() => p = inside(&target),
                Ok(target) => p = p.parent().unwrap_or(root).join(target),
                Err(_) => {
                    return std::fs::metadata(&p)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                }
            }
        }
        false
    };
    let found = if command.contains('/') {
        executable(&inside(Path::new(command)))
    } else {
        path_var
            .split(':')
            .any(|dir| executable(&inside(&Path::new(dir).join(command))))
    };
    if found {
        Ok(())
    } else {
        Err(SandboxError::CommandNotFound {
            command: command.to_owned(),
            root: root.to_owned(),
        })
    }
}

/// `CString`s for exec, refusing interior NUL bytes.
pub fn c_strings<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
    items: I,
) -> Result<Vec<CString>, SandboxError> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s.as_ref().as_bytes()).map_err(|_| SandboxError::BadValue {
                what: "argument",
                value: s.as_ref().to_string_lossy().into_owned(),
                why: "contains a NUL byte".into(),
            })
        })
        .collect()
}

/// The forked child of `bulkhead exec`, already in the sandbox's namespaces: takes the
/// sandbox's identity and privileges and execs. Returns only an error message.
#[expect(
    clippy::too_many_arguments,
    reason = "the sandbox's identity, field by field, for a child that may not allocate"
)]
pub fn exec_in_sandbox(
    workdir: &str,
    userns: bool,
    privileged: bool,
    caps: u64,
    user: Option<User>,
    apparmor: Option<&std::ffi::CStr>,
    seccomp: &[seccompiler::BpfProgram],
    argv: &[CString],
    envp: &[CString],
    path_var: &str,
) -> String {
    if userns {
        // SAFETY: plain credential system calls.
        if unsafe { libc::setresgid(0, 0, 0) | libc::setresuid(0, 0, 0) } != 0 {
            return format!(
                "become root in the user namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if let Err(e) = chdir(workdir) {
        return format!("enter {workdir}: {e}");
    }
    if !privileged && let Err(e) = drop_privileges(caps) {
        return e;
    }
    if let Some(user) = user
        && let Err(e) = become_user(user)
    {
        return e;
    }
    if let Some(profile) = apparmor
        && let Err(e) = super::apparmor::change_on_exec(profile)
    {
        return e;
    }
    if let Err(e) = super::seccomp::install(seccomp) {
        return e;
    }
    let program = argv[0].to_bytes();
    let candidates: Vec<CString> = if program.contains(&b'/') {
        vec![argv[0].clone()]
    } else {
        path_var
            .split(':')
            .filter_map(|dir| CString::new([dir.as_bytes(), b"/", program].concat()).ok())
            .collect()
    };
    let argv: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut last = std::io::Error::from_raw_os_error(libc::ENOENT);
    for path in &candidates {
        // SAFETY: null-terminated arrays of NUL-terminated strings that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        last = std::io::Error::last_os_error();
    }
    format!("exec {}: {last}", String::from_utf8_lossy(program))
}
