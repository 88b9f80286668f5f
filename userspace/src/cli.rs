//! Command-line interface of `bulkhead`: argument parsing and output formatting only.
//!
//! It lives in the binary, not the library: each subcommand calls into the library, which
//! returns typed values, and prints them as a table or, with `--json`, as JSON for scripts.
//! Errors reach the user through `anyhow` with their whole chain.

#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are --help text, where backticks would show literally"
)]

use std::{io::Write, net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use bulkhead::{
    doctor, link,
    loader::{self, LogLevel},
    lock::Mode,
    netns,
    node::{self, Paths},
    sandbox,
    services::{
        BackendSpec, BackendState, SchedFlags, ServiceSpec, ServiceTable, VirtualAddr,
        desired::{Config, Plan},
    },
    subnet::Subnet,
};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "eBPF service load balancing, NAT and sandboxes from plain Linux features"
)]
pub struct Cli {
    /// Run in this network namespace (a name under /run/netns, or a path), like `ip -n`.
    #[arg(long, global = true, env = "BULKHEAD_NETNS", value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// bpffs directory for pinned maps, programs and links; mounted if it is not on bpffs.
    /// Default: /sys/fs/bpf/bulkhead, or /sys/fs/bpf/bulkhead/netns/NAME in a network
    /// namespace other than PID 1's.
    #[arg(long, global = true, env = "BULKHEAD_BPFFS", value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Directory for the node record, its lock, leases and sandbox state. Default:
    /// /run/bulkhead, or /run/bulkhead/netns/NAME in a network namespace other than PID 1's.
    #[arg(long, global = true, env = "BULKHEAD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Give up waiting for the node lock (held while another command changes the node)
    /// after this many seconds; default: wait as long as it takes.
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_seconds)]
    pub lock_timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check what this machine offers: kernel, BTF, bpffs, tc, cgroups, IPVS, sysctls.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Create the bridge (if missing), load the datapath and attach it to the bridge and its ports.
    Up {
        #[arg(long, default_value = "bulkhead0")]
        bridge: String,
        /// Gateway address of the pod subnet, put on the bridge.
        #[arg(long, value_name = "ADDR/LEN", default_value = "198.18.0.1/24")]
        subnet: Subnet,
        /// The interface towards the rest of the network: `NodePorts` answer on its address and
        /// pod traffic leaving through it is masqueraded.
        #[arg(long, value_name = "IFACE")]
        uplink: Option<String>,
        /// Datapath events to emit (read them with `bulkhead events`); off by default, so the
        /// packet path pays nothing for them. Kept across restarts.
        #[arg(long, value_enum)]
        datapath_log: Option<LogLevel>,
        /// Conntrack timeouts in seconds, e.g. `udp=30,tcp-established=3600` (also tcp-syn,
        /// tcp-closing); unnamed ones keep their values (defaults 60, 21600, 10, 60).
        #[arg(long, value_name = "NAME=SECONDS,...")]
        conntrack_timeouts: Option<loader::ConntrackTimeouts>,
        /// Hand translated packets for registered pods (`bulkhead endpoint add`) straight to
        /// their interface, skipping the bridge, the node's routing and netfilter. On by
        /// default; kept across restarts.
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        bypass: Option<bool>,
    },
    /// Detach everything, unpin, and delete the bridge if `up` created it.
    Down,
    /// Attach the datapath to an interface (a veth plugged into the bridge later).
    Attach { ifname: String },
    /// Detach the datapath from an interface.
    Detach { ifname: String },
    /// Follow the datapath's debug events (enable them with `up --datapath-log debug`).
    Events {
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
    },
    /// Per-interface packet and byte counters, and datapath verdict reasons.
    Stats {
        /// A sandbox: its memory (current, peak, OOM kills), cpu (time, throttling) and pids,
        /// from cgroup accounting.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a new sandbox: `bulkhead run [OPTIONS] -- CMD ARGS`.
    Run(Box<RunArgs>),
    /// Sandboxes: name, pid, address, state, memory, cpu.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a running sandbox (its namespaces and cgroup).
    Exec {
        name: String,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Stop a sandbox: SIGTERM, then SIGKILL after the grace period.
    Stop {
        names: Vec<String>,
        /// Seconds to wait before killing.
        #[arg(long, short = 't', default_value_t = 10)]
        time: u64,
    },
    /// Remove sandboxes that have stopped (or, with --force, kill and remove running ones).
    Rm {
        names: Vec<String>,
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// The output of a detached sandbox.
    Logs { name: String },
    /// Virtual services (ipvsadm -A/-D/-L/-S/-R).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Backends of a service (ipvsadm -a/-e/-d).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// ipvsadm's own command line, as it is (`bulkhead ipvsadm -Ln`, `-A -t VIP:80 -s rr`,
    /// `-S -n`, ...); also what the binary does when it is called `ipvsadm`.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Ipvsadm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Tracked flows.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Pods the datapath hands packets to directly (stack bypass).
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Run the node agent in the foreground: it owns the node, serves the API, metrics and
    /// health, and reconciles --config. While it runs, these commands go through it.
    Agent(Box<AgentArgs>),
    /// Make the services what a YAML file says (services missing from it are deleted); only
    /// the differences are applied.
    Apply {
        /// The file (`-` for stdin).
        #[arg(long = "filename", short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// Cut the established flows of removed backends instead of letting them finish.
        #[arg(long)]
        force: bool,
    },
    /// What `apply -f FILE` would change; exits 1 when something would (as `kubectl diff`).
    Diff {
        #[arg(long = "filename", short = 'f', value_name = "FILE")]
        file: PathBuf,
    },
}

/// `bulkhead agent`'s options.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Desired state (the `apply` schema), applied at start and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The API's Unix socket (default: agent.sock in the state directory).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A group allowed to use the API socket besides root (mode 0660).
    #[arg(long, value_name = "GROUP")]
    api_group: Option<String>,
    /// Serve Prometheus metrics on /metrics here, e.g. 127.0.0.1:10249.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Serve /healthz and /readyz here, e.g. 0.0.0.0:10256 (kube-proxy's port).
    #[arg(long, value_name = "ADDR:PORT")]
    health_address: Option<std::net::SocketAddr>,
    /// How often to check the maps against the desired state, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    sync_period: Duration,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_name = "text|json", default_value = "text")]
    log_format: LogFormat,
    /// Least severe level logged (error, warn, info, debug, trace); BULKHEAD_LOG overrides.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `bulkhead run`'s options, docker's names where docker has one.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Name (default: generated); names its state, cgroup and `--backend NAME:PORT`.
    #[arg(long)]
    name: Option<String>,
    /// Hostname inside (default: the name).
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit, e.g. 256m (b, k, m, g); exceeding it gets the process OOM-killed.
    #[arg(long, short = 'm', value_name = "SIZE")]
    memory: Option<String>,
    /// CPU limit in CPUs, e.g. 0.5 (a CFS quota per 100 ms period).
    #[arg(long, value_name = "CPUS")]
    cpus: Option<String>,
    /// Most processes the sandbox may have at once.
    #[arg(long, value_name = "N")]
    pids_limit: Option<u64>,
    /// A directory to use as the root (`pivot_root`); default: the host's, privately mounted.
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Address in the pod subnet (default: the lowest free one).
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// Publish a port of the node through the datapath: HOSTPORT:PORT[/udp].
    #[arg(long, short = 'p', value_name = "HOSTPORT:PORT[/udp]")]
    publish: Vec<String>,
    /// Environment variable for the command, KEY=VALUE; repeat for each.
    #[arg(long, short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command inside.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// A user namespace: root inside is uid 100000 outside.
    #[arg(long)]
    userns: bool,
    /// A cgroup namespace.
    #[arg(long)]
    cgroupns: bool,
    /// Keep every capability, writable /sys and /proc/sys, no `no_new_privs`.
    #[arg(long)]
    privileged: bool,
    /// Create the cgroup under this one instead of under bulkhead's own.
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// Run in the background; `bulkhead logs NAME` shows its output.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Bind a host path into the sandbox: HOST:PATH[:ro|rw]; repeat for each. (The host's
    /// root, used without --rootfs, is read-only inside: volumes are how to share.)
    #[arg(long, short = 'v', value_name = "HOST:PATH[:ro|rw]")]
    volume: Vec<String>,
    /// Mount the --rootfs read-only (/tmp, /run and /var/tmp stay writable tmpfs).
    #[arg(long)]
    read_only: bool,
    /// Add a capability to docker's default set (NET_ADMIN, CAP_SYS_TIME, ALL); repeat.
    #[arg(long, value_name = "CAP")]
    cap_add: Vec<String>,
    /// Drop a capability from the set (or ALL); repeat.
    #[arg(long, value_name = "CAP")]
    cap_drop: Vec<String>,
    /// Run the command as UID[:GID] (numbers).
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    user: Option<String>,
    /// A resource limit, NAME=SOFT[:HARD] (nofile, nproc, core, stack, ...); repeat.
    #[arg(long, value_name = "NAME=SOFT[:HARD]")]
    ulimit: Vec<String>,
    /// A time namespace of its own (clocks as the host's unless --time-offset shifts them).
    #[arg(long)]
    timens: bool,
    /// Clock offsets of the time namespace in seconds: monotonic=SECS,boottime=SECS
    /// (implies --timens).
    #[arg(long, value_name = "CLOCK=SECS,...")]
    time_offset: Option<String>,
    /// Relative CPU weight against other sandboxes (cpu.shares; default 1024).
    #[arg(long, value_name = "N")]
    cpu_shares: Option<u64>,
    /// Memory soft limit the kernel reclaims down to under pressure, e.g. 64m.
    #[arg(long, value_name = "SIZE")]
    memory_reservation: Option<String>,
    /// Memory plus swap, e.g. 512m (at least --memory), or -1 for unlimited swap.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    memory_swap: Option<String>,
    /// CPUs the sandbox may run on, e.g. 0-1,3.
    #[arg(long, value_name = "LIST")]
    cpuset_cpus: Option<String>,
    /// Memory nodes the sandbox may use, e.g. 0.
    #[arg(long, value_name = "LIST")]
    cpuset_mems: Option<String>,
    /// Relative block I/O weight, 10 to 1000.
    #[arg(long, value_name = "N")]
    blkio_weight: Option<u16>,
    /// Read rate limit of a block device, /dev/X:RATE (e.g. 1mb); repeat.
    #[arg(long, value_name = "/dev/X:RATE")]
    device_read_bps: Vec<String>,
    /// Write rate limit of a block device, /dev/X:RATE; repeat.
    #[arg(long, value_name = "/dev/X:RATE")]
    device_write_bps: Vec<String>,
    /// A host device the sandbox may use: /dev/X[:/dev/NAME][:rwm]; repeat.
    #[arg(long, value_name = "/dev/X[:rwm]")]
    device: Vec<String>,
    /// seccomp=PROFILE.json (docker's format), seccomp=unconfined, apparmor=NAME,
    /// no-new-privileges (always on); repeat.
    #[arg(long, value_name = "KEY=VALUE")]
    security_opt: Vec<String>,
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Register a pod: translated packets for ADDR go straight to the peer of DEV.
    Add {
        addr: Ipv4Addr,
        /// The host side of the pod's veth pair.
        #[arg(long, value_name = "DEV")]
        dev: String,
        /// The MAC address of the pod's interface.
        #[arg(long, value_parser = parse_mac_arg)]
        mac: MacAddr,
    },
    /// Forget a pod.
    Del { addr: Ipv4Addr },
    /// Registered pods.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct MacAddr([u8; 6]);

fn parse_mac_arg(text: &str) -> Result<MacAddr, String> {
    link::parse_mac(text)
        .map(MacAddr)
        .ok_or_else(|| format!("{text} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service: `bulkhead service add 198.19.0.10:80/tcp --backend 198.18.0.2:8080@2 ...`.
    Add {
        /// Virtual address, `ADDR:PORT[/tcp|/udp]`.
        service: String,
        /// A backend `ADDR:PORT[@WEIGHT]`; repeat for each.
        #[arg(long = "backend", short = 'b')]
        backends: Vec<String>,
        /// hash (default), random, maglev, rr, wrr, lc, wlc, sh, dh, sed, nq, fo, ovf, mh, twos.
        #[arg(long, short = 's', default_value = "hash")]
        scheduler: String,
        /// Session affinity by client address, with this timeout in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        affinity: u32,
        /// Affinity by client network (ipvsadm's `-M`): clients whose addresses agree under
        /// this mask share a backend.
        #[arg(long, value_name = "NETMASK", default_value = "255.255.255.255")]
        affinity_netmask: std::net::Ipv4Addr,
        /// ipvsadm's scheduler flags (`-b`): `sh-port` or `mh-port` hash the client's port
        /// too; also sh-fallback, mh-fallback, flag-1, flag-2, flag-3.
        #[arg(long, value_name = "FLAG,...", default_value = "")]
        sched_flags: String,
        /// Also answer on this port of every node address (`NodePort`); needs `up --uplink` for
        /// clients outside the node.
        #[arg(long, value_name = "PORT")]
        nodeport: Option<u16>,
    },
    /// Delete a service, its backends and its tracked flows.
    Del { service: String },
    /// The service table with counters.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print the table in ipvsadm --save format.
    Save,
    /// Read ipvsadm --save lines from stdin and add them all, or nothing.
    Restore,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend, or change the weight of an existing one (and reactivate it).
    Add { service: String, backend: String },
    /// Remove a backend; established flows continue unless --force.
    Del {
        service: String,
        backend: String,
        /// Also drop the backend's established flows.
        #[arg(long)]
        force: bool,
    },
    /// Stop sending new flows to a backend; established flows continue.
    Drain { service: String, backend: String },
}

#[derive(Debug, Subcommand)]
pub enum ConntrackCommand {
    /// Live translated flows.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Size and activity of the TCP and UDP tables: entries, inserts, failures, evictions.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Forget tracked flows (all, or one service's).
    Flush {
        #[arg(long)]
        service: Option<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(argv());
    match &cli.command {
        Command::Agent(a) => init_tracing(&a.log_level, a.log_format == LogFormat::Json),
        _ => init_tracing("warn", false),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BULKHEAD_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

impl Command {
    /// How the command holds the node lock: changes exclusively, reads of the node's tables
    /// shared. `run` takes it itself, only while it creates and removes its sandbox.
    fn lock_mode(&self) -> Option<Mode> {
        match self {
            Command::Doctor { .. }
            | Command::Agent(_)
            | Command::Events { .. }
            | Command::Run(_)
            | Command::Ps { .. }
            | Command::Exec { .. }
            | Command::Logs { .. }
            | Command::Stats { name: Some(_), .. } => None,
            Command::Ipvsadm { args } if bulkhead::ipvsadm::reads_only(args) => Some(Mode::Shared),
            Command::Stats { name: None, .. }
            | Command::Service(ServiceCommand::List { .. } | ServiceCommand::Save)
            | Command::Conntrack(ConntrackCommand::List { .. } | ConntrackCommand::Stats { .. })
            | Command::Endpoint(EndpointCommand::List { .. })
            | Command::Diff { .. } => Some(Mode::Shared),
            Command::Up { .. }
            | Command::Down
            | Command::Attach { .. }
            | Command::Detach { .. }
            | Command::Stop { .. }
            | Command::Rm { .. }
            | Command::Service(_)
            | Command::Backend(_)
            | Command::Ipvsadm { .. }
            | Command::Conntrack(ConntrackCommand::Flush { .. })
            | Command::Endpoint(_)
            | Command::Apply { .. } => Some(Mode::Exclusive),
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(ns) = &cli.netns {
        let path = netns::resolve(ns);
        netns::enter(&path).with_context(|| format!("enter network namespace {ns}"))?;
    }
    netns::escape_private_sysfs().context("find a bpffs whose pins outlive this command")?;
    let paths = Paths::resolve(cli.bpffs, cli.state_dir, cli.netns.is_some())
        .context("find the node's directories")?;
    let mode = cli.command.lock_mode();
    match cli.command {
        Command::Agent(args) => run_agent(paths, *args),
        Command::Run(args) => Ok(run_sandbox(&paths, *args, cli.lock_timeout)),
        Command::Exec { name, command } => match sandbox::exec(&paths, &name, &command) {
            Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
            Err(e @ sandbox::SandboxError::CommandNotFound { .. }) => {
                eprintln!("bulkhead: exec in sandbox {name}: {e}");
                Ok(ExitCode::from(127))
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("exec in sandbox {name}"))),
        },
        Command::Events { duration } => {
            loader::follow_events(&paths.bpffs, duration.map(std::time::Duration::from_secs))
                .context("follow datapath events")?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            if mode.is_some()
                && let Some(agent) =
                    bulkhead::agent::client::find(&paths).context("find the node's agent")?
            {
                return forward(&agent, &command);
            }
            let _lock = match mode {
                Some(mode) => Some(
                    paths
                        .lock(mode, cli.lock_timeout)
                        .context("take the node lock")?,
                ),
                None => None,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut ctx = Ctx {
                paths: &paths,
                table: None,
                stdin: None,
                stderr: String::new(),
            };
            let code = execute(&mut ctx, command, &mut out)?;
            out.flush().context("write to stdout")?;
            eprint!("{}", ctx.stderr);
            Ok(ExitCode::from(code))
        }
    }
}

/// This process's command line as `bulkhead` reads it: called as `ipvsadm` (a link to this
/// binary), ipvsadm's command line, whole, as `bulkhead ipvsadm ...`.
fn argv() -> Vec<std::ffi::OsString> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        == Some("ipvsadm".as_ref())
    {
        argv.insert(1, "ipvsadm".into());
    }
    argv
}

/// Sends the command line to the node's agent, which runs it as this process would have, and
/// prints what it printed. Files and stdin are read here and sent along.
fn forward(agent: &bulkhead::agent::client::Client, command: &Command) -> anyhow::Result<ExitCode> {
    // The agent parses it as `bulkhead ...`, so a linked ipvsadm's line goes as `ipvsadm ...`.
    let mut args: Vec<String> = argv()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut stdin = String::new();
    match command {
        Command::Down => anyhow::bail!(
            "the node's agent (pid {}) owns it: stop the agent (SIGTERM leaves the datapath \
             serving), then run `bulkhead down`",
            agent.pid
        ),
        Command::Apply { file, .. } | Command::Diff { file } => {
            stdin = read_file_or_stdin(file)?;
            // The agent reads the file's text from the request, not from its own cwd.
            args = replace_file_arg(&args, file);
        }
        Command::Service(ServiceCommand::Restore) => {
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin)
                .context("read stdin")?;
        }
        Command::Ipvsadm { args: a } if bulkhead::ipvsadm::reads_stdin(a) => {
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin)
                .context("read stdin")?;
        }
        _ => {}
    }
    let done = agent
        .cli(&args, &stdin)
        .with_context(|| format!("send the command to the node's agent (pid {})", agent.pid))?;
    std::io::stdout()
        .write_all(done.stdout.as_bytes())
        .context("write to stdout")?;
    eprint!("{}", done.stderr);
    Ok(ExitCode::from(done.code))
}

/// `args` with the value of `-f`/`--filename` replaced by `-`.
fn replace_file_arg(args: &[String], file: &std::path::Path) -> Vec<String> {
    let file = file.to_string_lossy();
    let mut out = Vec::with_capacity(args.len());
    let mut next_is_file = false;
    for a in args {
        if next_is_file {
            out.push("-".to_owned());
            next_is_file = false;
        } else if a == "-f" || a == "--filename" {
            out.push(a.clone());
            next_is_file = true;
        } else if let Some(v) = a
            .strip_prefix("--filename=")
            .or_else(|| a.strip_prefix("-f"))
            && v == file
        {
            out.push("--filename=-".to_owned());
        } else {
            out.push(a.clone());
        }
    }
    out
}

fn read_file_or_stdin(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("read stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))
    }
}

/// Runs CLI commands inside the agent, against its open table.
pub struct InAgent;

impl bulkhead::agent::Executor for InAgent {
    fn execute(
        &self,
        paths: &Paths,
        table: &mut ServiceTable,
        args: &[String],
        stdin: &str,
    ) -> bulkhead::agent::Executed {
        let mut done = bulkhead::agent::Executed::default();
        let cli = match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => {
                done.stderr = e.render().to_string();
                done.code = 2;
                return done;
            }
        };
        done.reload = !matches!(
            cli.command,
            Command::Service(_)
                | Command::Backend(_)
                | Command::Ipvsadm { .. }
                | Command::Conntrack(_)
                | Command::Endpoint(_)
                | Command::Stats { .. }
                | Command::Apply { .. }
                | Command::Diff { .. }
        );
        let mut out = Vec::new();
        let mut ctx = Ctx {
            paths,
            table: Some(table),
            stdin: Some(stdin),
            stderr: String::new(),
        };
        match execute(&mut ctx, cli.command, &mut out) {
            Ok(code) => {
                done.code = code;
                done.stderr = std::mem::take(&mut ctx.stderr);
            }
            Err(e) => {
                done.stderr = format!("bulkhead: {e:#}\n");
                done.code = 1;
            }
        }
        done.stdout = String::from_utf8_lossy(&out).into_owned();
        done
    }
}

fn run_agent(paths: Paths, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let options = bulkhead::agent::Options {
        config: args.config,
        api_socket: args.api_socket,
        api_group: args.api_group,
        metrics_address: args.metrics_address,
        health_address: args.health_address,
        sync_period: args.sync_period.max(Duration::from_millis(100)),
    };
    bulkhead::agent::run(paths, options, std::sync::Arc::new(InAgent)).context("agent")?;
    Ok(ExitCode::SUCCESS)
}

/// Where a command runs: the node, the agent's open table when it runs there, and stdin's
/// text when it came with the request.
struct Ctx<'a> {
    paths: &'a Paths,
    table: Option<&'a mut ServiceTable>,
    stdin: Option<&'a str>,
    /// What a command that words its own errors (`ipvsadm`) has for stderr.
    stderr: String,
}

enum TableRef<'a> {
    Agent(&'a mut ServiceTable),
    Own(Box<ServiceTable>),
}

impl std::ops::Deref for TableRef<'_> {
    type Target = ServiceTable;
    fn deref(&self) -> &ServiceTable {
        match self {
            TableRef::Agent(t) => t,
            TableRef::Own(t) => t,
        }
    }
}

impl std::ops::DerefMut for TableRef<'_> {
    fn deref_mut(&mut self) -> &mut ServiceTable {
        match self {
            TableRef::Agent(t) => t,
            TableRef::Own(t) => t,
        }
    }
}

impl Ctx<'_> {
    fn table(&mut self) -> anyhow::Result<TableRef<'_>> {
        match &mut self.table {
            Some(t) => Ok(TableRef::Agent(t)),
            None => Ok(TableRef::Own(Box::new(
                ServiceTable::open(&self.paths.bpffs)
                    .context("open the service table (is the node up? `bulkhead up`)")?,
            ))),
        }
    }

    fn read_input(&self, file: &std::path::Path) -> anyhow::Result<String> {
        match self.stdin {
            Some(text) => Ok(text.to_owned()),
            None => read_file_or_stdin(file),
        }
    }
}

/// Runs a command that works on the node's state; returns its exit code.
fn execute(ctx: &mut Ctx<'_>, command: Command, out: &mut impl Write) -> anyhow::Result<u8> {
    let paths = ctx.paths;
    if !matches!(
        command,
        Command::Up { .. } | Command::Down | Command::Doctor { .. }
    ) {
        node::check_owner(paths).context("check the node record")?;
    }
    match command {
        Command::Doctor { json } => {
            let checks = doctor::run();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&checks)?)?;
            } else {
                for c in &checks {
                    write!(out, "{:<8}{:<26}{}", c.status.label(), c.name, c.detail)?;
                    match &c.hint {
                        Some(hint) => writeln!(out, "  ({hint})")?,
                        None => writeln!(out)?,
                    }
                }
            }
            let failed = checks.iter().any(|c| c.status == doctor::Status::Missing);
            return Ok(u8::from(failed));
        }
        Command::Up {
            bridge,
            subnet,
            uplink,
            datapath_log,
            conntrack_timeouts,
            bypass,
        } => {
            let opts = node::UpOptions {
                subnet: Some(subnet),
                uplink: uplink.as_deref(),
                datapath_log,
                timeouts: conntrack_timeouts.unwrap_or_default(),
                bypass,
            };
            let report = node::up(paths, &bridge, &opts)
                .with_context(|| format!("bring up bridge {bridge}"))?;
            for (map, entries) in &report.migrated {
                writeln!(
                    out,
                    "bulkhead up: migrated {map} to this build's layout ({entries} entries carried over)"
                )?;
            }
            let record = report.record;
            writeln!(
                out,
                "bulkhead up: bridge {} ({:?}), datapath attached to {}",
                record.bridge,
                record.mode,
                record.attached.join(", ")
            )?;
        }
        Command::Down => {
            // Sandboxes go first: their veths hang on the bridge that goes next.
            for record in sandbox::list(paths) {
                sandbox::remove(paths, &record)
                    .with_context(|| format!("remove sandbox {}", record.name))?;
            }
            sandbox::network::settle_drained(paths);
            let record = node::down(paths).context("take the node down")?;
            writeln!(
                out,
                "bulkhead down: detached from {}",
                record.attached.join(", ")
            )?;
        }
        Command::Attach { ifname } => {
            node::attach(paths, &ifname)
                .with_context(|| format!("attach the datapath to {ifname}"))?;
        }
        Command::Detach { ifname } => {
            node::detach(paths, &ifname)
                .with_context(|| format!("detach the datapath from {ifname}"))?;
        }
        Command::Stats { name: None, json } => print_stats(paths, json, out)?,
        Command::Stats {
            name: Some(name),
            json,
        } => {
            let usage =
                sandbox::stats(paths, &name).with_context(|| format!("stats of sandbox {name}"))?;
            print_usage(&name, &usage, json, out)?;
        }
        Command::Ps { json } => print_ps(paths, json, out)?,
        Command::Stop { names, time } => {
            for name in names {
                let killed = sandbox::stop(paths, &name, std::time::Duration::from_secs(time))
                    .with_context(|| format!("stop sandbox {name}"))?;
                writeln!(
                    out,
                    "{name}{}",
                    if killed {
                        " (killed after the grace period)"
                    } else {
                        ""
                    }
                )?;
            }
        }
        Command::Rm { names, force } => {
            for name in names {
                sandbox::rm(paths, &name, force)
                    .with_context(|| format!("remove sandbox {name}"))?;
                writeln!(out, "{name}")?;
            }
        }
        Command::Logs { name } => {
            out.write_all(
                &sandbox::logs(paths, &name).with_context(|| format!("logs of sandbox {name}"))?,
            )?;
        }
        Command::Service(cmd) => service(ctx, cmd, out)?,
        Command::Backend(cmd) => backend(ctx, cmd)?,
        Command::Ipvsadm { args } => {
            let stdin = if bulkhead::ipvsadm::reads_stdin(&args) {
                ctx.read_input(std::path::Path::new("-"))?
            } else {
                String::new()
            };
            let prog = std::env::args()
                .next()
                .filter(|a| a.ends_with("ipvsadm"))
                .unwrap_or_else(|| "bulkhead ipvsadm".to_owned());
            let done = {
                let mut table = ctx.table()?;
                bulkhead::ipvsadm::run(&prog, &mut table, &args, &stdin)
            };
            out.write_all(done.stdout.as_bytes())?;
            ctx.stderr.push_str(&done.stderr);
            return Ok(done.code);
        }
        Command::Conntrack(cmd) => conntrack(ctx, cmd, out)?,
        Command::Endpoint(cmd) => endpoint(paths, cmd, out)?,
        Command::Apply { file, force } => {
            let text = ctx.read_input(&file)?;
            let config =
                Config::parse(&text).with_context(|| format!("read {}", file.display()))?;
            let mut table = ctx.table()?;
            let plan = Plan::new(&table.specs(), &config.specs());
            write!(out, "{plan}")?;
            plan.apply(&mut table, force).context("apply")?;
            let (a, c, d) = plan.counts();
            writeln!(out, "bulkhead apply: {a} added, {c} changed, {d} deleted")?;
        }
        Command::Diff { file } => {
            let text = ctx.read_input(&file)?;
            let config =
                Config::parse(&text).with_context(|| format!("read {}", file.display()))?;
            let plan = Plan::new(&ctx.table()?.specs(), &config.specs());
            write!(out, "{plan}")?;
            return Ok(u8::from(!plan.is_empty()));
        }
        Command::Agent(_) | Command::Run(_) | Command::Exec { .. } | Command::Events { .. } => {
            unreachable!("run() handles these itself")
        }
    }
    Ok(0)
}

fn service(ctx: &mut Ctx<'_>, cmd: ServiceCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let paths = ctx.paths;
    match cmd {
        ServiceCommand::Add {
            service,
            backends,
            scheduler,
            affinity,
            affinity_netmask,
            sched_flags,
            nodeport,
        } => {
            let scheduler = scheduler.parse()?;
            let spec = ServiceSpec {
                vaddr: service.parse()?,
                scheduler,
                affinity_secs: affinity,
                affinity_netmask,
                sched_flags: SchedFlags::parse(&sched_flags, scheduler)?,
                nodeport,
                backends: backends
                    .iter()
                    .map(|b| sandbox::resolve_backend(paths, b).parse())
                    .collect::<Result<_, _>>()?,
            };
            ctx.table()?
                .add(&spec)
                .with_context(|| format!("add service {}", spec.vaddr))?;
        }
        ServiceCommand::Del { service } => {
            let vaddr: VirtualAddr = service.parse()?;
            ctx.table()?
                .delete(&vaddr)
                .with_context(|| format!("delete service {vaddr}"))?;
        }
        ServiceCommand::List { json } => {
            let services = ctx.table()?.list();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&services)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<28}{:<10}{:>10}{:>12}{:>14}",
                "SERVICE / BACKEND", "SCHED", "FLOWS", "PACKETS", "BYTES"
            )?;
            for s in &services {
                let sched = match (s.affinity_secs, s.affinity_netmask.octets()) {
                    (0, _) => s.scheduler.name().to_owned(),
                    (t, [255, 255, 255, 255]) => format!("{} +{t}s", s.scheduler.name()),
                    (t, m) => format!(
                        "{} +{t}s/{}",
                        s.scheduler.name(),
                        u32::from_be_bytes(m).count_ones()
                    ),
                };
                writeln!(
                    out,
                    "{:<28}{:<10}{:>10}{:>12}{:>14}",
                    s.service.to_string(),
                    sched,
                    s.new_flows,
                    s.packets,
                    s.bytes
                )?;
                if let Some(port) = s.nodeport {
                    writeln!(out, "  nodeport {port}")?;
                }
                for b in &s.backends {
                    let state = match b.state {
                        BackendState::Active => format!("w={}", b.weight),
                        BackendState::Draining => "draining".to_owned(),
                    };
                    writeln!(
                        out,
                        "  -> {:<24}{:<10}{:>10}{:>12}{:>14}",
                        b.addr.to_string(),
                        state,
                        b.new_flows,
                        b.packets,
                        b.bytes
                    )?;
                }
            }
        }
        ServiceCommand::Save => write!(out, "{}", ctx.table()?.save())?,
        ServiceCommand::Restore => {
            let text = ctx.read_input(std::path::Path::new("-"))?;
            let n = ctx.table()?.restore(&text).context("restore services")?;
            writeln!(out, "restored {n} services")?;
        }
    }
    Ok(())
}

fn backend(ctx: &mut Ctx<'_>, cmd: BackendCommand) -> anyhow::Result<()> {
    let paths = ctx.paths;
    let mut table = ctx.table()?;
    match cmd {
        BackendCommand::Add { service, backend } => {
            let (vaddr, spec): (VirtualAddr, BackendSpec) = (
                service.parse()?,
                sandbox::resolve_backend(paths, &backend).parse()?,
            );
            table
                .add_backend(&vaddr, &spec)
                .with_context(|| format!("add backend {} to {vaddr}", spec.addr))?;
        }
        BackendCommand::Del {
            service,
            backend,
            force,
        } => {
            let (vaddr, spec): (VirtualAddr, BackendSpec) = (
                service.parse()?,
                sandbox::resolve_backend(paths, &backend).parse()?,
            );
            table
                .delete_backend(&vaddr, spec.addr, force)
                .with_context(|| format!("delete backend {} of {vaddr}", spec.addr))?;
        }
        BackendCommand::Drain { service, backend } => {
            let (vaddr, spec): (VirtualAddr, BackendSpec) = (
                service.parse()?,
                sandbox::resolve_backend(paths, &backend).parse()?,
            );
            table
                .drain_backend(&vaddr, spec.addr)
                .with_context(|| format!("drain backend {} of {vaddr}", spec.addr))?;
        }
    }
    Ok(())
}

fn conntrack(ctx: &mut Ctx<'_>, cmd: ConntrackCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let mut table = ctx.table()?;
    match cmd {
        ConntrackCommand::List { json } => {
            let flows = table.flows();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&flows)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<6}{:<24}{:<24}{:<24}{:<13}{:>8}",
                "PROTO", "CLIENT", "SERVICE", "BACKEND", "STATE", "EXPIRES"
            )?;
            for f in flows {
                // A translated client port shows as `client:port>seen-port`.
                let client = match f.client_port_at_backend {
                    Some(port) => format!("{}>{port}", f.client),
                    None => f.client.to_string(),
                };
                writeln!(
                    out,
                    "{:<6}{:<24}{:<24}{:<24}{:<13}{:>7}s",
                    f.proto.to_string(),
                    client,
                    f.service.to_string(),
                    f.backend.to_string(),
                    f.state,
                    f.expires_in_secs
                )?;
            }
        }
        ConntrackCommand::Stats { json } => {
            let stats = table.conntrack_stats();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<6}{:>10}{:>10}{:>10}{:>12}{:>10}{:>10}{:>11}",
                "TABLE", "CAPACITY", "ENTRIES", "LIVE", "INSERTS", "FAILED", "REMOVED", "EVICTED"
            )?;
            for s in stats {
                writeln!(
                    out,
                    "{:<6}{:>10}{:>10}{:>10}{:>12}{:>10}{:>10}{:>11}",
                    s.table,
                    s.capacity,
                    s.entries,
                    s.live,
                    s.inserts,
                    s.insert_failures,
                    s.removals,
                    s.evictions
                )?;
            }
        }
        ConntrackCommand::Flush { service } => {
            let n = match service {
                None => table.flush_flows(|_, _| true),
                Some(s) => {
                    let vaddr: VirtualAddr = s.parse()?;
                    let id = table
                        .service_id(&vaddr)
                        .with_context(|| format!("flush flows of {vaddr}"))?;
                    table.flush_flows(|_, f| f.service_id == id)
                }
            };
            writeln!(out, "flushed {n} flows")?;
        }
    }
    Ok(())
}

fn print_stats(paths: &Paths, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = node::stats(paths).context("read the datapath's counters")?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<16}{:<9}{:>12}{:>16}",
        "IFACE", "HOOK", "PACKETS", "BYTES"
    )?;
    for s in &stats.interfaces {
        writeln!(
            out,
            "{:<16}{:<9}{:>12}{:>16}",
            s.ifname, s.direction, s.packets, s.bytes
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:<25}{:>12}", "REASON", "PACKETS")?;
    for (r, n) in &stats.reasons {
        writeln!(out, "{r:<25}{n:>12}")?;
    }
    Ok(())
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{text}: expected on or off")),
    }
}

fn endpoint(paths: &node::Paths, cmd: EndpointCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        EndpointCommand::Add { addr, dev, mac } => {
            node::endpoint_add(paths, addr, &dev, mac.0)
                .with_context(|| format!("register endpoint {addr}"))?;
        }
        EndpointCommand::Del { addr } => {
            if !node::endpoint_del(paths, addr)
                .with_context(|| format!("remove endpoint {addr}"))?
            {
                anyhow::bail!("no endpoint {addr}");
            }
        }
        EndpointCommand::List { json } => {
            let rows = node::endpoints(paths).context("read the endpoint map")?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&rows)?)?;
            } else {
                writeln!(out, "{:<16} {:<16} MAC", "ADDRESS", "DEVICE")?;
                for r in rows {
                    writeln!(out, "{:<16} {:<16} {}", r.addr.to_string(), r.dev, r.mac)?;
                }
            }
        }
    }
    Ok(())
}

fn run_sandbox(paths: &Paths, args: RunArgs, lock_timeout: Option<Duration>) -> ExitCode {
    let spec = match run_spec(args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            return ExitCode::from(125);
        }
    };
    match sandbox::run(paths, &spec, lock_timeout) {
        Ok((name, None)) => {
            println!("{name}");
            ExitCode::SUCCESS
        }
        Ok((_, Some(sandbox::Exit(code)))) => ExitCode::from(code.clamp(0, 255) as u8),
        // docker's convention: 127 for a command that is not there, 125 for run itself failing.
        Err(e) => {
            eprintln!("bulkhead: run: {}", sandbox::error_chain(&e));
            ExitCode::from(
                if matches!(e, sandbox::SandboxError::CommandNotFound { .. }) {
                    127
                } else {
                    125
                },
            )
        }
    }
}

fn run_spec(args: RunArgs) -> Result<sandbox::RunSpec, sandbox::SandboxError> {
    use sandbox::spec;
    let (seccomp, apparmor) = security_opts(&args.security_opt)?;
    let memory = args.memory.as_deref().map(spec::parse_size).transpose()?;
    let cpus_here = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // Memory nodes: /sys/devices/system/node/nodeN, one at least.
    let mems_here = || {
        std::fs::read_dir("/sys/devices/system/node").map_or(1, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
                .count()
                .max(1)
        })
    };
    Ok(sandbox::RunSpec {
        name: args.name.as_deref().map(str::parse).transpose()?,
        hostname: args.hostname,
        memory,
        cpus: args.cpus.as_deref().map(spec::parse_cpus).transpose()?,
        pids_limit: args.pids_limit,
        rootfs: args.rootfs,
        ip: args.ip,
        publish: parse_all(&args.publish)?,
        env: args
            .env
            .iter()
            .map(|e| spec::parse_env(e))
            .collect::<Result<_, _>>()?,
        workdir: args.workdir,
        userns: args.userns,
        cgroupns: args.cgroupns,
        privileged: args.privileged,
        detach: args.detach,
        cgroup_parent: args.cgroup_parent,
        volumes: parse_all(&args.volume)?,
        read_only: args.read_only,
        cap_add: parse_all(&args.cap_add)?,
        cap_drop: parse_all(&args.cap_drop)?,
        user: args.user.as_deref().map(str::parse).transpose()?,
        ulimits: parse_all(&args.ulimit)?,
        time_offsets: match (args.timens, args.time_offset.as_deref()) {
            (_, Some(offsets)) => Some(offsets.parse()?),
            (true, None) => Some(sandbox::spec::TimeOffsets::default()),
            (false, None) => None,
        },
        cpu_shares: args
            .cpu_shares
            .map(|n| within("cpu shares", n, 2..=262_144))
            .transpose()?,
        memory_reservation: args
            .memory_reservation
            .as_deref()
            .map(spec::parse_size)
            .transpose()?,
        devices: parse_all(&args.device)?,
        memory_swap: match args.memory_swap.as_deref() {
            None => None,
            Some("-1") => Some(-1),
            Some(size) => {
                let bytes = spec::parse_size(size)?;
                if args.memory.is_none() || memory.is_some_and(|m| bytes < m) {
                    return Err(sandbox::SandboxError::BadValue {
                        what: "memory swap",
                        value: size.to_owned(),
                        why: "needs --memory, and is memory plus swap: at least --memory".into(),
                    });
                }
                Some(bytes as i64)
            }
        },
        cpuset_cpus: args
            .cpuset_cpus
            .as_deref()
            .map(|s| spec::parse_cpuset("cpuset cpus", s, cpus_here))
            .transpose()?,
        cpuset_mems: args
            .cpuset_mems
            .as_deref()
            .map(|s| spec::parse_cpuset("cpuset mems", s, mems_here()))
            .transpose()?,
        blkio_weight: args
            .blkio_weight
            .map(|w| within("blkio weight", w, 10..=1000))
            .transpose()?,
        read_bps: parse_all(&args.device_read_bps)?,
        write_bps: parse_all(&args.device_write_bps)?,
        seccomp,
        apparmor,
        command: args.command,
    })
}

/// Every value of a repeatable option, parsed; the first bad one is the error.
fn parse_all<T: std::str::FromStr>(values: &[String]) -> Result<Vec<T>, T::Err> {
    values.iter().map(|v| v.parse()).collect()
}

/// `value` if it lies in `range`, else the error naming both.
fn within<T: PartialOrd + std::fmt::Display>(
    what: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, sandbox::SandboxError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(sandbox::SandboxError::BadValue {
            what,
            value: value.to_string(),
            why: format!("must be {} to {}", range.start(), range.end()),
        })
    }
}

/// `--security-opt` values, docker's names: the seccomp policy and the AppArmor profile asked
/// for.
fn security_opts(
    opts: &[String],
) -> Result<(sandbox::seccomp::Policy, Option<String>), sandbox::SandboxError> {
    let mut policy = sandbox::seccomp::Policy::Default;
    let mut apparmor = None;
    for opt in opts {
        let bad = |why: &str| sandbox::SandboxError::BadValue {
            what: "security option",
            value: opt.clone(),
            why: why.into(),
        };
        match opt.split_once(['=', ':']) {
            Some(("seccomp", value)) => policy = value.parse()?,
            Some(("apparmor", name)) if !name.is_empty() => apparmor = Some(name.to_owned()),
            None if opt == "no-new-privileges" => {}
            Some(("no-new-privileges", "true")) => {}
            _ => {
                return Err(bad(
                    "expected seccomp=PROFILE|unconfined, apparmor=NAME or no-new-privileges",
                ));
            }
        }
    }
    Ok((policy, apparmor))
}

fn print_ps(paths: &Paths, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows = sandbox::statuses(paths);
    if json {
        writeln!(out, "{}", serde_json::to_string(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20}{:>8}  {:<16}{:<14}{:>10}{:>10}  COMMAND",
        "NAME", "PID", "ADDRESS", "STATE", "MEMORY", "CPU"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<20}{:>8}  {:<16}{:<14}{:>10}{:>9}s  {}",
            r.name,
            r.pid,
            r.address.to_string(),
            r.state,
            human_bytes(r.memory_bytes),
            format!("{:.2}", r.cpu_usec as f64 / 1e6),
            r.command
        )?;
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

fn print_usage(
    name: &str,
    u: &sandbox::cgroup::Usage,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(u)?)?;
        return Ok(());
    }
    let limit = |l: Option<u64>, f: fn(u64) -> String| l.map_or_else(|| "no limit".to_owned(), f);
    writeln!(out, "sandbox {name}")?;
    writeln!(
        out,
        "memory   {} (peak {}, limit {}), OOM kills {}",
        human_bytes(u.memory_bytes),
        human_bytes(u.memory_peak_bytes),
        limit(u.memory_limit_bytes, human_bytes),
        u.oom_kills
    )?;
    writeln!(
        out,
        "cpu      {:.3} s, throttled {:.3} s in {} periods",
        u.cpu_usec as f64 / 1e6,
        u.throttled_usec as f64 / 1e6,
        u.throttled_periods
    )?;
    writeln!(
        out,
        "pids     {} (limit {})",
        u.pids,
        limit(u.pids_limit, |n| n.to_string())
    )?;
    writeln!(
        out,
        "io       read {}, written {}",
        human_bytes(u.io_read_bytes),
        human_bytes(u.io_write_bytes)
    )?;
    writeln!(out, "cpuset   {}", u.cpuset_cpus)?;
    Ok(())
}
