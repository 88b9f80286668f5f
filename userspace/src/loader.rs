//! Loading, pinning and attaching the tc datapath, and typed access to its maps.
//!
//! This is the only module that holds the eBPF object. It knows nothing about containers or
//! bridges: callers give it interface names and a bpffs pin directory.
//!
//! Pin layout under the directory: one file per map (by its name), `progs/<program>`, and, with
//! TCX, `links/<ingress|egress>/<ifname>`. bpffs refuses names with a dot (EPERM, see
//! `bpf_lookup` in kernel/bpf/inode.c), so a dot in an interface name is stored as a colon, which
//! interface names cannot contain. A TCX link lives as long as its pin, so attachments
//! survive `bulkhead` exiting, and loading a new build swaps the program inside every pinned link
//! atomically (`bpf_link_update`). With netlink `cls_bpf` (kernels before 6.6, no TCX) the filter
//! itself persists in the kernel and is found again by program name.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        CgroupDevice, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
    },
    util::KernelVersion,
};
use dataplane_common::{
    Affinity, AffinityKey, Backend, Counters, DeviceKey, Endpoint, Flow, FlowKey, IfaceKey,
    MAX_REASONS, NodeConfig, Reason, Service, ServiceCounters, ServiceKey, SlotKey, map,
    node_flags, program,
};

use crate::migrate::{self, Migration};

/// The datapath object built by `cargo xtask build`, embedded 8-byte aligned as ELF parsing needs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("BULKHEAD_EBPF_OBJECT"));

/// Environment variable forcing the attach mechanism: `tcx`, `netlink` or `auto` (the default).
pub const TC_MODE_ENV: &str = "BULKHEAD_TC_MODE";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("this bulkhead was built without its eBPF object; build it with `cargo xtask build`")]
    NoObject,
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("cannot {action} program {name}")]
    Program {
        action: &'static str,
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot take over the pinned tc link of {ifname}")]
    Link {
        ifname: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot open pinned {path}; is the datapath up (`bulkhead up`)?")]
    Pinned {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot add the clsact qdisc to {ifname}")]
    Clsact {
        ifname: String,
        #[source]
        source: tc::TcError,
    },
    #[error("cannot detach {name} from {ifname}")]
    Detach {
        ifname: String,
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot read datapath events")]
    Events {
        #[source]
        source: io::Error,
    },
    #[error("{value} is not a tc attach mode (expected tcx, netlink or auto) in {TC_MODE_ENV}")]
    BadMode { value: String },
    #[error("cannot carry the pinned maps over to this build's layout")]
    Migration(#[from] migrate::MigrationError),
    #[error("cannot attach the device program to cgroup {path}")]
    AttachDevices {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching to {ifname} panicked")]
    AttachThread { ifname: String },
}

/// Datapath event verbosity (aya-log levels; `Off` compiles the events out at load time).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LogLevel {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Follows the datapath's events (aya-log records of the pinned programs in `dir`) for
/// `duration`, printing each as a line on stdout.
pub fn follow_events(dir: &Path, duration: Option<std::time::Duration>) -> Result<(), LoaderError> {
    struct Stdout;
    impl log::Log for Stdout {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            println!("{:<5} {}", record.level(), record.args());
        }
        fn flush(&self) {}
    }
    let path = dir.join("progs").join(program::INGRESS);
    let prog = SchedClassifier::from_pin(&path).map_err(|source| LoaderError::Program {
        action: "open pinned",
        name: program::INGRESS,
        source,
    })?;
    let id = prog
        .info()
        .map_err(|source| LoaderError::Program {
            action: "inspect",
            name: program::INGRESS,
            source,
        })?
        .id();
    let mut logger = aya_log::EbpfLogger::init_from_id_with_logger(id, Stdout).map_err(|e| {
        LoaderError::Events {
            source: io::Error::other(e.to_string()),
        }
    })?;
    let deadline = duration.map(|d| std::time::Instant::now() + d);
    loop {
        let wait = match deadline {
            Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                Some(left) => left.as_millis().min(i32::MAX as u128) as i32,
                None => return Ok(()),
            },
            None => -1,
        };
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&logger),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout =
            nix::poll::PollTimeout::try_from(wait).unwrap_or(nix::poll::PollTimeout::NONE);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => logger.flush(),
            Err(e) => return Err(LoaderError::Events { source: e.into() }),
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

/// How programs are attached at tc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// BPF links on the tcx hook (Linux 6.6+, commit e420bed02507).
    Tcx,
    /// `cls_bpf` filters on a `clsact` qdisc, in direct-action mode (Linux 4.5+).
    Netlink,
}

impl TcMode {
    /// TCX where the kernel has it, unless [`TC_MODE_ENV`] says otherwise.
    pub fn detect() -> Result<Self, LoaderError> {
        match std::env::var(TC_MODE_ENV).as_deref() {
            Ok("tcx") => Ok(TcMode::Tcx),
            Ok("netlink") => Ok(TcMode::Netlink),
            Ok("auto") | Err(_) => Ok(Self::kernel_default()),
            Ok(other) => Err(LoaderError::BadMode {
                value: other.to_owned(),
            }),
        }
    }

    /// The mechanism this kernel offers: TCX from 6.6 on.
    pub fn kernel_default() -> Self {
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            TcMode::Tcx
        } else {
            TcMode::Netlink
        }
    }
}

const HOOKS: [(TcAttachType, &str, &str); 2] = [
    (TcAttachType::Ingress, program::INGRESS, "ingress"),
    (TcAttachType::Egress, program::EGRESS, "egress"),
];

/// The loaded datapath: both classifiers, ready to attach.
pub struct Datapath {
    dir: PathBuf,
    mode: TcMode,
    ingress: SchedClassifier,
    egress: SchedClassifier,
    migrated: migrate::Report,
}

impl Datapath {
    /// Loads the embedded object, reusing the maps already pinned in `dir` (so conntrack and
    /// counters survive), pins the programs, and moves every pinned link onto the new programs.
    /// `log` is the most verbose datapath event that is emitted (fixed for the program's life).
    pub fn load(dir: &Path, log: LogLevel) -> Result<Self, LoaderError> {
        if OBJECT.is_empty() {
            return Err(LoaderError::NoObject);
        }
        for sub in ["progs", "links/ingress", "links/egress"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|source| LoaderError::Pinned { path, source })?;
        }
        let mode = TcMode::detect()?;
        let migration = Migration::prepare(dir)?;
        let loaded = Self::load_and_swap(dir, log, mode);
        let mut datapath = match loaded {
            Ok(d) => d,
            Err(e) => {
                migration.abort();
                return Err(e);
            }
        };
        datapath.migrated = migration.finish()?;
        Ok(datapath)
    }

    fn load_and_swap(dir: &Path, log: LogLevel, mode: TcMode) -> Result<Self, LoaderError> {
        let level = log as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .override_global("AYA_LOG_LEVEL", &level, true)
            .load(OBJECT)
            .map_err(LoaderError::Load)?;
        let ingress = load_program(&mut ebpf, dir, program::INGRESS)?;
        let egress = load_program(&mut ebpf, dir, program::EGRESS)?;
        load_device_program(&mut ebpf, dir)?;
        let mut datapath = Datapath {
            dir: dir.to_owned(),
            mode,
            ingress,
            egress,
            migrated: Vec::new(),
        };
        datapath.replace_pinned_links()?;
        Ok(datapath)
    }

    /// Maps this load migrated from an older layout, with the entries carried over.
    pub fn migrated(&self) -> &migrate::Report {
        &self.migrated
    }

    /// Opens the programs a previous `load` pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        let open = |name: &'static str| {
            let path = dir.join("progs").join(name);
            SchedClassifier::from_pin(&path).map_err(|source| LoaderError::Program {
                action: "open pinned",
                name,
                source,
            })
        };
        Ok(Datapath {
            dir: dir.to_owned(),
            mode: TcMode::detect()?,
            ingress: open(program::INGRESS)?,
            egress: open(program::EGRESS)?,
            migrated: Vec::new(),
        })
    }

    pub fn mode(&self) -> TcMode {
        self.mode
    }

    /// Attaches both classifiers to `ifname` (tc ingress and egress). Idempotent: an interface
    /// that already has them gets the current programs swapped in instead of a second copy.
    pub fn attach(&mut self, ifname: &str) -> Result<(), LoaderError> {
        self.attach_as(ifname, self.mode)
    }

    /// As [`Datapath::attach`], through `mode`. A pod's veth lives for one sandbox: netlink
    /// `cls_bpf` attaches it in ~2 ms, where each of the two TCX links waits for an RCU grace
    /// period under the rtnl lock (~25 ms for both, and two more when the veth is destroyed).
    pub fn attach_as(&mut self, ifname: &str, mode: TcMode) -> Result<(), LoaderError> {
        if mode == TcMode::Tcx {
            // Each TCX attachment waits for an RCU grace period (~15 ms): both hooks at once.
            let dir = &self.dir;
            let (ingress, egress) = (&mut self.ingress, &mut self.egress);
            return std::thread::scope(|scope| {
                let [(_, in_name, in_suffix), (_, eg_name, eg_suffix)] = HOOKS;
                let other = scope.spawn(move || {
                    attach_tcx(
                        dir,
                        egress,
                        ifname,
                        TcAttachType::Egress,
                        eg_name,
                        eg_suffix,
                    )
                });
                let first = attach_tcx(
                    dir,
                    ingress,
                    ifname,
                    TcAttachType::Ingress,
                    in_name,
                    in_suffix,
                );
                let second = other.join().unwrap_or_else(|_| {
                    Err(LoaderError::AttachThread {
                        ifname: ifname.to_owned(),
                    })
                });
                first.and(second)?;
                // An interface attached through cls_bpf before (a pod's veth) moves to TCX:
                // its filters go once the links are in place.
                for (hook, name, _) in HOOKS {
                    detach_netlink(ifname, hook, name)?;
                }
                Ok(())
            });
        }
        for (hook, name, _) in HOOKS {
            let prog = match hook {
                TcAttachType::Ingress => &mut self.ingress,
                _ => &mut self.egress,
            };
            let attach_err = |source| LoaderError::Program {
                action: "attach",
                name,
                source,
            };
            match mode {
                TcMode::Tcx => unreachable!("handled above"),
                TcMode::Netlink => {
                    if let Err(source) = tc::qdisc_add_clsact(ifname)
                        && !is_exists(&source)
                    {
                        return Err(LoaderError::Clsact {
                            ifname: ifname.to_owned(),
                            source,
                        });
                    }
                    // cls_bpf has no atomic swap by name: drop the old filter, then add the new.
                    detach_netlink(ifname, hook, name)?;
                    let id = prog
                        .attach_with_options(
                            ifname,
                            hook,
                            TcAttachOptions::Netlink(NlOptions::default()),
                        )
                        .map_err(attach_err)?;
                    let link = prog.take_link(id).map_err(attach_err)?;
                    // The filter must outlive this process; dropping the link would remove it.
                    std::mem::forget(link);
                }
            }
        }
        Ok(())
    }

    /// Runs the ingress classifier on `packet` (an Ethernet frame) through `BPF_PROG_TEST_RUN`,
    /// returning its TC verdict and the packet as it left the program.
    pub fn run_ingress(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), LoaderError> {
        run(&self.ingress, program::INGRESS, packet)
    }

    /// As [`Datapath::run_ingress`], for the egress classifier.
    pub fn run_egress(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), LoaderError> {
        run(&self.egress, program::EGRESS, packet)
    }

    /// Points every pinned TCX link at the freshly loaded programs (hitless upgrade).
    fn replace_pinned_links(&mut self) -> Result<(), LoaderError> {
        for ifname in attached(&self.dir) {
            self.attach(&ifname)?;
        }
        Ok(())
    }
}

/// Attaches `prog` at `hook` of `ifname` through a TCX link pinned under `dir`, or moves the
/// pinned link of a previous load onto `prog` (atomically, `bpf_link_update`).
fn attach_tcx(
    dir: &Path,
    prog: &mut SchedClassifier,
    ifname: &str,
    hook: TcAttachType,
    name: &'static str,
    suffix: &str,
) -> Result<(), LoaderError> {
    let attach_err = |source| LoaderError::Program {
        action: "attach",
        name,
        source,
    };
    let pin = link_pin(dir, ifname, suffix);
    let id = match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|source| LoaderError::Link {
                    ifname: ifname.to_owned(),
                    source,
                })?;
            prog.attach_to_link(link).map_err(attach_err)?
        }
        Err(_) => prog
            .attach_with_options(
                ifname,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?,
    };
    let link = prog.take_link(id).map_err(attach_err)?;
    let fd_link = FdLink::try_from(link).map_err(|source| LoaderError::Link {
        ifname: ifname.to_owned(),
        source,
    })?;
    // Replacing a pin: the old file still names the same link, so remove it first.
    let _ = fs::remove_file(&pin);
    fd_link
        .pin(&pin)
        .map(drop)
        .map_err(|source| LoaderError::Pin {
            path: pin.clone(),
            source,
        })
}

fn run(
    prog: &SchedClassifier,
    name: &'static str,
    packet: &[u8],
) -> Result<(u32, Vec<u8>), LoaderError> {
    use aya::programs::{TestRun, TestRunOptions};
    // Room for programs that grow the packet; the kernel reports the size it wrote.
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .map_err(|source| LoaderError::Program {
            action: "test-run",
            name,
            source,
        })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn load_program(
    ebpf: &mut Ebpf,
    dir: &Path,
    name: &'static str,
) -> Result<SchedClassifier, LoaderError> {
    let err = |source| LoaderError::Program {
        action: "load",
        name,
        source,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram { name })?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    let pin = pin_program(dir, name, |path| prog.pin(path))?;
    // Reopen from the pin so the returned program does not borrow `ebpf`; the maps stay pinned.
    SchedClassifier::from_pin(&pin).map_err(|source| LoaderError::Program {
        action: "reopen",
        name,
        source,
    })
}

/// Loads and pins the cgroup device program (Linux 4.15); sandboxes on cgroup v2 attach it
/// from the pin.
fn load_device_program(ebpf: &mut Ebpf, dir: &Path) -> Result<(), LoaderError> {
    let name = program::DEVICE;
    let err = |source| LoaderError::Program {
        action: "load",
        name,
        source,
    };
    let prog: &mut CgroupDevice = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram { name })?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    pin_program(dir, name, |path| prog.pin(path)).map(drop)
}

/// Pins a loaded program (`pin` is its own `pin` method: aya has no trait for it) as
/// `progs/<name>`, replacing the previous build's pin; returns the path.
fn pin_program(
    dir: &Path,
    name: &str,
    pin_at: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<PathBuf, LoaderError> {
    let pin = dir.join("progs").join(name);
    let _ = fs::remove_file(&pin);
    pin_at(&pin).map_err(|source| LoaderError::Pin {
        path: pin.clone(),
        source,
    })?;
    Ok(pin)
}

/// Docker's default device rules, as (kind, major, minor, access): creating any device node,
/// and using null, zero, full, random, urandom, tty, console, ptmx, the pseudo-terminals and
/// tun. Everything else (disks above all) is refused.
pub const DEFAULT_DEVICES: [(u8, u32, u32, u32); 12] = {
    use dataplane_common::{
        device_access::{MKNOD, READ, WRITE},
        device_kind::{BLOCK, CHAR},
    };
    const ANY: u32 = DeviceKey::ANY;
    const RWM: u32 = READ | WRITE | MKNOD;
    [
        (CHAR, ANY, ANY, MKNOD),
        (BLOCK, ANY, ANY, MKNOD),
        (CHAR, 1, 3, RWM),
        (CHAR, 1, 5, RWM),
        (CHAR, 1, 7, RWM),
        (CHAR, 1, 8, RWM),
        (CHAR, 1, 9, RWM),
        (CHAR, 5, 0, RWM),
        (CHAR, 5, 1, RWM),
        (CHAR, 5, 2, RWM),
        (CHAR, 136, ANY, RWM),
        (CHAR, 10, 200, RWM),
    ]
};

/// The device rules of sandboxes on cgroup v2 (`DEVICES`) and the program that applies them.
pub struct DeviceRules {
    map: HashMap<MapData, DeviceKey, u32>,
    dir: PathBuf,
}

impl DeviceRules {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        Ok(DeviceRules {
            map: typed(dir, map::DEVICES)?,
            dir: dir.to_owned(),
        })
    }

    /// Allows `access` on a device to the cgroup `cgroup_id` (0: every sandbox).
    pub fn allow(&mut self, key: DeviceKey, access: u32) -> Result<(), LoaderError> {
        self.map
            .insert(key, access, 0)
            .map_err(|source| LoaderError::Map {
                name: map::DEVICES,
                source,
            })
    }

    /// Forgets the rules of cgroup `cgroup_id`.
    pub fn forget(&mut self, cgroup_id: u64) {
        let keys: Vec<DeviceKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id == cgroup_id)
            .collect();
        for k in keys {
            let _ = self.map.remove(&k);
        }
    }

    /// Attaches the device program to the cgroup v2 directory `cgroup` with `BPF_PROG_ATTACH`
    /// rather than a link: the attachment then lasts as long as the cgroup, not as long as
    /// this process, with nothing to pin or unpin.
    pub fn attach(&self, cgroup: &Path) -> Result<(), LoaderError> {
        /// The `BPF_PROG_ATTACH` part of `union bpf_attr`, zero-padded to the size the kernel
        /// reads for this command (it checks that the unused tail is zero).
        #[repr(C)]
        #[expect(
            clippy::struct_field_names,
            reason = "the kernel's field names, as bpf(2) documents them"
        )]
        struct Attach {
            target_fd: u32,
            attach_bpf_fd: u32,
            attach_type: u32,
            attach_flags: u32,
            replace_bpf_fd: u32,
            _rest: [u32; 3],
        }
        const BPF_PROG_ATTACH: libc::c_long = 8;
        const BPF_CGROUP_DEVICE: u32 = 6;
        let path = self.dir.join("progs").join(program::DEVICE);
        let prog = CgroupDevice::from_pin(&path).map_err(|source| LoaderError::Program {
            action: "open pinned",
            name: program::DEVICE,
            source,
        })?;
        let prog_fd = prog.fd().map_err(|source| LoaderError::Program {
            action: "open",
            name: program::DEVICE,
            source,
        })?;
        let cgroup_dir = fs::File::open(cgroup).map_err(|source| LoaderError::AttachDevices {
            path: cgroup.to_owned(),
            source,
        })?;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let attr = Attach {
            target_fd: cgroup_dir.as_raw_fd() as u32,
            attach_bpf_fd: prog_fd.as_fd().as_raw_fd() as u32,
            attach_type: BPF_CGROUP_DEVICE,
            attach_flags: 0,
            replace_bpf_fd: 0,
            _rest: [0; 3],
        };
        // SAFETY: bpf(2) BPF_PROG_ATTACH with a fully initialised attribute of the size passed;
        // both descriptors are open for the duration of the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_ATTACH,
                &raw const attr,
                std::mem::size_of::<Attach>(),
            )
        };
        if r != 0 {
            return Err(LoaderError::AttachDevices {
                path: cgroup.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

fn link_pin(dir: &Path, ifname: &str, hook: &str) -> PathBuf {
    dir.join("links").join(hook).join(ifname.replace('.', ":"))
}

fn is_exists(err: &tc::TcError) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<io::Error>())
        .is_some_and(|e| e.kind() == io::ErrorKind::AlreadyExists)
        || err.to_string().contains("exists")
}

fn detach_netlink(ifname: &str, hook: TcAttachType, name: &'static str) -> Result<(), LoaderError> {
    // A filter is named after its program as aya knows it: the ELF name after a load, the
    // kernel's (15 bytes, BPF_OBJ_NAME_LEN - 1) for a program opened from its pin.
    let short = &name[..name.len().min(15)];
    for candidate in std::iter::once(name).chain((short != name).then_some(short)) {
        match tc::qdisc_detach_program(ifname, hook, candidate) {
            Ok(()) => {}
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(LoaderError::Detach {
                    ifname: ifname.to_owned(),
                    name,
                    source: io::Error::other(e),
                });
            }
        }
    }
    Ok(())
}

/// Interfaces with pinned TCX links in `dir`.
pub fn attached(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("links").join("ingress"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some(e.file_name().into_string().ok()?.replace(':', ".")))
        .collect();
    names.sort();
    names
}

/// Removes the datapath from `ifname`. A missing interface or attachment is not an error:
/// the kernel drops attachments of deleted interfaces by itself.
pub fn detach(dir: &Path, ifname: &str, mode: TcMode) -> Result<(), LoaderError> {
    for (hook, name, suffix) in HOOKS {
        let pin = link_pin(dir, ifname, suffix);
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            // Unpinning drops the last reference once the returned fd closes: that detaches.
            let _ = link.unpin();
        }
        if mode == TcMode::Netlink && nix::net::if_::if_nametoindex(ifname).is_ok() {
            detach_netlink(ifname, hook, name)?;
        }
    }
    Ok(())
}

/// Forgets the datapath's TCX links on `ifname`, an interface that is gone or going away
/// with its namespace: the pins are removed without being opened, so the kernel drops the
/// links in a worker (bpffs eviction defers the last `bpf_link_put`). Closing a link's last
/// descriptor instead releases it in the caller, which takes the rtnl lock and waits out the
/// namespace teardown holding it (~20 ms).
pub fn forget_links(dir: &Path, ifname: &str) {
    for (_, _, suffix) in HOOKS {
        let _ = fs::remove_file(link_pin(dir, ifname, suffix));
    }
}

/// Removes the pinned programs and maps from `dir` (links must be detached first).
pub fn unpin_all(dir: &Path) {
    for name in [program::INGRESS, program::EGRESS, program::DEVICE] {
        let _ = fs::remove_file(dir.join("progs").join(name));
    }
    for name in map::ALL {
        let _ = fs::remove_file(dir.join(name));
    }
    for sub in ["progs", "links/ingress", "links/egress", "links", ""] {
        let _ = fs::remove_dir(dir.join(sub));
    }
}

fn pinned_map(dir: &Path, name: &'static str) -> Result<MapData, LoaderError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| LoaderError::Pinned {
        path,
        source: io::Error::other(source),
    })
}

/// Opens the pinned map `name` as the typed handle `T`.
fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, LoaderError> {
    let err = |source| LoaderError::Map { name, source };
    Map::from_map_data(pinned_map(dir, name)?)
        .map_err(err)?
        .try_into()
        .map_err(err)
}

/// Typed handles on the service-related maps, for `service_table` to read and write.
pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub backend_conns: Array<MapData, u64>,
    /// Conntrack tables: TCP first, then UDP.
    pub conntrack: [HashMap<MapData, FlowKey, Flow>; 2],
    pub ct_events: PerCpuArray<MapData, u64>,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub service_stats: PerCpuHashMap<MapData, u32, ServiceCounters>,
    pub backend_stats: PerCpuHashMap<MapData, u32, ServiceCounters>,
    /// The reply-direction counters; `None` on a node a build without them brought up
    /// (until `up` loads this one): they read as zero.
    pub service_out_stats: Option<PerCpuHashMap<MapData, u32, Counters>>,
    pub backend_out_stats: Option<PerCpuHashMap<MapData, u32, Counters>>,
    pub rr_cursors: PerCpuHashMap<MapData, u32, u32>,
    pub config: Array<MapData, NodeConfig>,
}

impl ServiceMaps {
    /// Opens the maps pinned in `dir` by `Datapath::load`.
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        Ok(ServiceMaps {
            services: typed(dir, map::SERVICES)?,
            slots: typed(dir, map::SLOTS)?,
            backends: typed(dir, map::BACKENDS)?,
            backend_conns: typed(dir, map::BACKEND_CONNS)?,
            conntrack: [
                typed(dir, map::CONNTRACK_TCP)?,
                typed(dir, map::CONNTRACK_UDP)?,
            ],
            ct_events: typed(dir, map::CT_EVENTS)?,
            affinity: typed(dir, map::AFFINITY)?,
            service_stats: typed(dir, map::SERVICE_STATS)?,
            backend_stats: typed(dir, map::BACKEND_STATS)?,
            service_out_stats: typed(dir, map::SERVICE_OUT_STATS).ok(),
            backend_out_stats: typed(dir, map::BACKEND_OUT_STATS).ok(),
            rr_cursors: typed(dir, map::RR_CURSORS)?,
            config: typed(dir, map::CONFIG)?,
        })
    }
}

/// What the datapath needs to know about the node, in host terms.
#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    /// The pod subnet (network, prefix length): its traffic leaving the uplink is masqueraded.
    pub pod_subnet: Option<(std::net::Ipv4Addr, u8)>,
    /// The uplink: ifindex and the address masquerade uses as source.
    pub uplink: Option<(u32, std::net::Ipv4Addr)>,
    /// Every IPv4 address of the node, where `NodePorts` answer.
    pub node_addrs: Vec<std::net::Ipv4Addr>,
    /// Conntrack timeouts to change; the others keep their values.
    pub timeouts: ConntrackTimeouts,
    /// Hand translated packets straight to registered pod interfaces (see [`Endpoints`]).
    pub bypass: bool,
}

/// Names of the conntrack timeouts `up --conntrack-timeouts` sets.
pub const TIMEOUT_NAMES: [&str; 4] = ["tcp-syn", "tcp-established", "tcp-closing", "udp"];

/// Conntrack timeouts in seconds, as `up --conntrack-timeouts tcp-syn=60,udp=30` names them;
/// `None` keeps the current value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_syn: Option<u32>,
    pub tcp_established: Option<u32>,
    pub tcp_closing: Option<u32>,
    pub udp: Option<u32>,
}

impl std::str::FromStr for ConntrackTimeouts {
    type Err = String;

    /// `udp=30,tcp-established=3600`; names from [`TIMEOUT_NAMES`], at least one second each.
    fn from_str(input: &str) -> Result<Self, String> {
        let mut t = ConntrackTimeouts::default();
        for pair in input.split(',') {
            let (name, secs) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not NAME=SECONDS"))?;
            let slot = match name {
                "tcp-syn" => &mut t.tcp_syn,
                "tcp-established" => &mut t.tcp_established,
                "tcp-closing" => &mut t.tcp_closing,
                "udp" => &mut t.udp,
                _ => {
                    return Err(format!(
                        "unknown timeout {name:?} (expected one of {TIMEOUT_NAMES:?})"
                    ));
                }
            };
            let secs: u32 = secs
                .parse()
                .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
            if secs == 0 {
                return Err(format!("{name} must be at least 1 second"));
            }
            *slot = Some(secs);
        }
        Ok(t)
    }
}

/// Writes the node settings into the config and address maps, keeping configured timeouts
/// (defaults when none were set yet).
pub fn configure(dir: &Path, settings: &NodeSettings) -> Result<(), LoaderError> {
    let err = |source| LoaderError::Map {
        name: map::CONFIG,
        source,
    };
    let mut config: Array<MapData, NodeConfig> = typed(dir, map::CONFIG)?;
    let mut cfg = config.get(&0, 0).map_err(err)?;
    if cfg.tcp_established_timeout == 0 {
        cfg = NodeConfig::default();
    }
    let be = |a: std::net::Ipv4Addr| u32::from(a).to_be();
    (cfg.pod_net, cfg.pod_mask) = match settings.pod_subnet {
        Some((net, len)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            ((u32::from(net) & mask).to_be(), mask.to_be())
        }
        None => (0, 0),
    };
    (cfg.uplink_ifindex, cfg.uplink_addr) = settings.uplink.map_or((0, 0), |(i, a)| (i, be(a)));
    cfg.flags = if settings.bypass {
        0
    } else {
        node_flags::NO_BYPASS
    };
    let t = settings.timeouts;
    for (slot, secs) in [
        (&mut cfg.tcp_syn_timeout, t.tcp_syn),
        (&mut cfg.tcp_established_timeout, t.tcp_established),
        (&mut cfg.tcp_closing_timeout, t.tcp_closing),
        (&mut cfg.udp_timeout, t.udp),
    ] {
        if let Some(secs) = secs {
            *slot = secs.max(1);
        }
    }
    config.set(0, cfg, 0).map_err(err)?;

    // Every sandbox's device rules (cgroup v2): docker's default list under cgroup id 0.
    let mut devices = DeviceRules::open(dir)?;
    for (kind, major, minor, access) in DEFAULT_DEVICES {
        devices.allow(DeviceKey::new(0, kind, major, minor), access)?;
    }

    let err = |source| LoaderError::Map {
        name: map::NODE_ADDRS,
        source,
    };
    let mut addrs: HashMap<MapData, u32, u32> = typed(dir, map::NODE_ADDRS)?;
    let stale: Vec<u32> = addrs.keys().filter_map(Result::ok).collect();
    for k in stale {
        addrs.remove(&k).map_err(err)?;
    }
    for a in &settings.node_addrs {
        addrs.insert(be(*a), 1, 0).map_err(err)?;
    }
    Ok(())
}

/// Number of possible CPUs: the length of every per-CPU value.
pub fn nr_cpus() -> usize {
    aya::util::nr_cpus().map_or(1, |n| n.max(1))
}

/// Packet and byte counters per (ifindex, direction), summed over CPUs.
pub fn iface_counters(dir: &Path) -> Result<Vec<(IfaceKey, Counters)>, LoaderError> {
    let err = |source| LoaderError::Map {
        name: map::IFACE_STATS,
        source,
    };
    let stats: PerCpuHashMap<_, IfaceKey, Counters> =
        Map::PerCpuHashMap(pinned_map(dir, map::IFACE_STATS)?)
            .try_into()
            .map_err(err)?;
    let mut out = Vec::new();
    for entry in &stats {
        let (key, per_cpu) = entry.map_err(err)?;
        let mut total = Counters::default();
        per_cpu.iter().for_each(|c| total.add(c));
        out.push((key, total));
    }
    out.sort_by_key(|(k, _)| (k.ifindex, k.direction));
    Ok(out)
}

/// How often each non-pass [`Reason`] occurred, summed over CPUs.
pub fn reason_counters(dir: &Path) -> Result<Vec<(Reason, u64)>, LoaderError> {
    let err = |source| LoaderError::Map {
        name: map::REASONS,
        source,
    };
    let reasons: PerCpuArray<_, u64> = Map::PerCpuArray(pinned_map(dir, map::REASONS)?)
        .try_into()
        .map_err(err)?;
    debug_assert!(Reason::ALL.len() as u32 <= MAX_REASONS);
    Reason::ALL
        .iter()
        .map(|&r| {
            let per_cpu = reasons.get(&(r as u32), 0).map_err(err)?;
            Ok((r, per_cpu.iter().sum()))
        })
        .collect()
}

/// The pods of this node the datapath may hand packets to directly ([`map::ENDPOINTS`]).
pub struct Endpoints {
    map: HashMap<MapData, u32, Endpoint>,
}

impl Endpoints {
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        Ok(Endpoints {
            map: typed(dir, map::ENDPOINTS)?,
        })
    }

    /// Registers (or updates) the pod with `addr`.
    pub fn insert(
        &mut self,
        addr: std::net::Ipv4Addr,
        endpoint: Endpoint,
    ) -> Result<(), LoaderError> {
        let err = |source| LoaderError::Map {
            name: map::ENDPOINTS,
            source,
        };
        self.map
            .insert(u32::from(addr).to_be(), endpoint, 0)
            .map_err(err)
    }

    /// Forgets the pod with `addr`; false if it was not registered.
    pub fn remove(&mut self, addr: std::net::Ipv4Addr) -> Result<bool, LoaderError> {
        let key = u32::from(addr).to_be();
        if self.map.get(&key, 0).is_err() {
            return Ok(false);
        }
        self.map.remove(&key).map_err(|source| LoaderError::Map {
            name: map::ENDPOINTS,
            source,
        })?;
        Ok(true)
    }

    /// Every registered pod, by address.
    pub fn list(&self) -> Vec<(std::net::Ipv4Addr, Endpoint)> {
        let mut all: Vec<_> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, e)| (std::net::Ipv4Addr::from(u32::from_be(k)), e))
            .collect();
        all.sort_by_key(|(a, _)| *a);
        all
    }
}
