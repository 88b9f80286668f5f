//! `bulkhead ipvsadm ...` (and the binary when it is called `ipvsadm`): ipvsadm 1.31's command
//! line over the service table, so scripts and monitoring written for IPVS run unchanged.
//!
//! The options are read as ipvsadm reads them (popt: the command first, clustered short
//! options, attached values, `-p`'s optional value), checked against ipvsadm's own
//! command-by-option table with its messages, and run against the table with IPVS's answers
//! (`Service already exists`, `No such destination`, ...) and exit codes (2 for bad options,
//! 255 for refused changes, 1 for failed listings). Listings and `-S` print ipvsadm's formats
//! byte for byte, in its order. What Bulkhead cannot do yet (direct routing and tunnelling,
//! firewall marks, thresholds, scheduler flags, one-packet scheduling, rate estimators, IPv6,
//! sync daemons) is refused, naming the option, never silently dropped.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use dataplane_common::CONNTRACK_SIZE;

use crate::services::{
    BackendSpec, BackendState, Proto, SchedFlags, Scheduler, ServiceInfo, ServiceSpec,
    ServiceTable, ServiceTableError, VirtualAddr,
};

/// What a run printed and how it ended, as ipvsadm would have.
#[derive(Debug, Default)]
pub struct Outcome {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn fail(code: u8, message: impl Into<String>) -> Self {
        let mut stderr = message.into();
        stderr.push('\n');
        Outcome {
            code,
            stdout: String::new(),
            stderr,
        }
    }
}

/// ipvsadm's version line, with what answers behind it.
pub const VERSION: &str = "ipvsadm v1.31 2019/12/24 (compiled with popt and IPVS v1.2.1; \
                           Bulkhead's eBPF datapath behind it)";

/// Whether the command line only reads the table (a listing, a save, help): it may then run
/// under the node lock's shared mode.
pub fn reads_only(args: &[String]) -> bool {
    match args.first().map(String::as_str) {
        None | Some("--list" | "--save" | "--help" | "--version") => true,
        Some(first) => {
            first.len() > 1
                && first.starts_with('-')
                && !first.starts_with("--")
                && matches!(first.as_bytes()[1], b'L' | b'l' | b'S' | b'h' | b'v')
        }
    }
}

/// Whether the command line reads a table from stdin (`-R`).
pub fn reads_stdin(args: &[String]) -> bool {
    matches!(args.first().map(String::as_str), Some("-R" | "--restore"))
}

/// Runs one ipvsadm command line (without the program name) against `table`. `prog` is the
/// name the usage hint shows; `stdin` is the text `-R` reads.
pub fn run(prog: &str, table: &mut ServiceTable, args: &[String], stdin: &str) -> Outcome {
    if args.is_empty() {
        // ipvsadm alone lists everything (names are not resolved here: always numeric).
        return list(table, &Parsed::listing());
    }
    let parsed = match parse(args) {
        Ok(p) => p,
        Err(ParseError::Usage) => {
            return Outcome::fail(
                255,
                format!("Try `{prog} -h' or '{prog} --help' for more information."),
            );
        }
        Err(ParseError::Popt(message) | ParseError::Kernel(message)) => {
            return Outcome::fail(255, message);
        }
        Err(ParseError::Fail(message)) => return Outcome::fail(2, message),
    };
    execute(table, &parsed, stdin)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    AddService,
    EditService,
    DelService,
    Flush,
    List,
    AddDest,
    DelDest,
    EditDest,
    Set,
    StartDaemon,
    StopDaemon,
    Restore,
    Save,
    Zero,
    Help,
    Version,
}

impl Cmd {
    /// The name ipvsadm's messages use.
    fn name(self) -> &'static str {
        match self {
            Cmd::AddService => "add-service",
            Cmd::EditService => "edit-service",
            Cmd::DelService => "delete-service",
            Cmd::Flush => "flush",
            Cmd::List => "list",
            Cmd::AddDest => "add-server",
            Cmd::DelDest => "delete-server",
            Cmd::EditDest => "edit-server",
            Cmd::Set => "set",
            Cmd::StartDaemon => "start-daemon",
            Cmd::StopDaemon => "stop-daemon",
            Cmd::Restore => "restore",
            Cmd::Save => "save",
            Cmd::Zero => "zero",
            Cmd::Help | Cmd::Version => "",
        }
    }

    /// ipvsadm's rule for `opt` with this command: `+` required, `x` illegal, `1` at most one
    /// of the `1`s, ' ' optional (its `commands_v_options` table).
    fn rule(self, opt: Opt) -> u8 {
        use Opt::{
            Connection, Daemon, Exact, Forward, LThreshold, McastGroup, McastInterface, McastPort,
            McastTtl, Netmask, NoSort, Numeric, Ops, Pe, Persistent, PersistentConn, Rate, Real,
            SchedFlags, Scheduler, Service, Stats, SyncId, SyncMaxlen, Thresholds, Timeout,
            TunCsum, TunInfo, TunNoCsum, TunPort, TunRemCsum, TunType, UThreshold, Weight,
        };
        let column = match self {
            Cmd::AddService => 0,
            Cmd::EditService => 1,
            Cmd::DelService => 2,
            Cmd::Flush => 3,
            Cmd::List => 4,
            Cmd::AddDest => 5,
            Cmd::DelDest => 6,
            Cmd::EditDest => 7,
            Cmd::Set => 8,
            Cmd::StartDaemon => 9,
            Cmd::StopDaemon => 10,
            Cmd::Restore => 11,
            Cmd::Save => 12,
            Cmd::Zero => 13,
            Cmd::Help | Cmd::Version => return b' ',
        };
        let row: &[u8; 14] = match opt {
            Numeric => b"xxxx xxxxxxx x",
            Connection | Timeout | Daemon => b"xxxx1xxxxxxxxx",
            Service => b"+++x1+++xxxxx ",
            Scheduler | Persistent | Netmask | Ops | Pe | SchedFlags => b"  xxxxxxxxxxxx",
            Real => b"xxxxx+++xxxxxx",
            Forward | Weight | UThreshold | LThreshold | TunType | TunPort | TunNoCsum
            | TunCsum | TunRemCsum => b"xxxxx x xxxxxx",
            McastInterface | McastGroup | McastPort | McastTtl | SyncMaxlen => b"xxxxxxxxx xxxx",
            Stats | Rate | Thresholds | PersistentConn | NoSort | Exact | TunInfo => {
                b"xxxx xxxxxxxxx"
            }
            SyncId => b"xxxx xxxx  xxx",
        };
        row[column]
    }
}

/// ipvsadm's options, in the order of its option table (which orders its messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Opt {
    Numeric,
    Connection,
    Service,
    Scheduler,
    Persistent,
    Netmask,
    Real,
    Forward,
    Weight,
    UThreshold,
    LThreshold,
    McastInterface,
    Timeout,
    Daemon,
    Stats,
    Rate,
    Thresholds,
    PersistentConn,
    NoSort,
    SyncId,
    Exact,
    Ops,
    Pe,
    SchedFlags,
    McastGroup,
    McastPort,
    McastTtl,
    SyncMaxlen,
    TunInfo,
    TunType,
    TunPort,
    TunNoCsum,
    TunCsum,
    TunRemCsum,
}

impl Opt {
    const ALL: [Opt; 34] = [
        Opt::Numeric,
        Opt::Connection,
        Opt::Service,
        Opt::Scheduler,
        Opt::Persistent,
        Opt::Netmask,
        Opt::Real,
        Opt::Forward,
        Opt::Weight,
        Opt::UThreshold,
        Opt::LThreshold,
        Opt::McastInterface,
        Opt::Timeout,
        Opt::Daemon,
        Opt::Stats,
        Opt::Rate,
        Opt::Thresholds,
        Opt::PersistentConn,
        Opt::NoSort,
        Opt::SyncId,
        Opt::Exact,
        Opt::Ops,
        Opt::Pe,
        Opt::SchedFlags,
        Opt::McastGroup,
        Opt::McastPort,
        Opt::McastTtl,
        Opt::SyncMaxlen,
        Opt::TunInfo,
        Opt::TunType,
        Opt::TunPort,
        Opt::TunNoCsum,
        Opt::TunCsum,
        Opt::TunRemCsum,
    ];

    fn name(self) -> &'static str {
        match self {
            Opt::Numeric => "numeric",
            Opt::Connection => "connection",
            Opt::Service => "service-address",
            Opt::Scheduler => "scheduler",
            Opt::Persistent => "persistent",
            Opt::Netmask => "netmask",
            Opt::Real => "real-server",
            Opt::Forward => "forwarding-method",
            Opt::Weight => "weight",
            Opt::UThreshold => "u-threshold",
            Opt::LThreshold => "l-threshold",
            Opt::McastInterface => "mcast-interface",
            Opt::Timeout => "timeout",
            Opt::Daemon => "daemon",
            Opt::Stats => "stats",
            Opt::Rate => "rate",
            Opt::Thresholds => "thresholds",
            Opt::PersistentConn => "persistent-conn",
            Opt::NoSort => "nosort",
            Opt::SyncId => "syncid",
            Opt::Exact => "exact",
            Opt::Ops => "ops",
            Opt::Pe => "pe",
            Opt::SchedFlags => "sched-flags",
            Opt::McastGroup => "mcast-group",
            Opt::McastPort => "mcast-port",
            Opt::McastTtl => "mcast-ttl",
            Opt::SyncMaxlen => "sync-maxlen",
            Opt::TunInfo => "tun-info",
            Opt::TunType => "tun-type",
            Opt::TunPort => "tun-port",
            Opt::TunNoCsum => "tun-nocsum",
            Opt::TunCsum => "tun-csum",
            Opt::TunRemCsum => "tun-remcsum",
        }
    }
}

/// How an option takes a value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Required,
    /// `-p`: the next word only when it does not start with `-`.
    Optional,
}

/// What a word on the command line stands for.
#[derive(Clone, Copy)]
enum Word {
    Cmd(Cmd, Arg),
    Opt(Opt, Arg, Val),
    /// `--sort`: accepted with any command, does nothing (the order is always sorted).
    Ignored,
    /// `-6`: IPv6, which Bulkhead does not balance yet.
    Ipv6,
}

/// Which value an option sets (several options share a slot: `-t`, `-u`, `-f`, ...).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Val {
    Flag,
    Tcp,
    Udp,
    Sctp,
    Fwmark,
    Masq,
    Gate,
    Ipip,
}

fn short(c: char) -> Option<Word> {
    use Arg::{None as N, Optional as O, Required as R};
    Some(match c {
        'A' => Word::Cmd(Cmd::AddService, N),
        'E' => Word::Cmd(Cmd::EditService, N),
        'D' => Word::Cmd(Cmd::DelService, N),
        'C' => Word::Cmd(Cmd::Flush, N),
        'L' | 'l' => Word::Cmd(Cmd::List, N),
        'a' => Word::Cmd(Cmd::AddDest, N),
        'd' => Word::Cmd(Cmd::DelDest, N),
        'e' => Word::Cmd(Cmd::EditDest, N),
        'R' => Word::Cmd(Cmd::Restore, N),
        'S' => Word::Cmd(Cmd::Save, N),
        'Z' => Word::Cmd(Cmd::Zero, N),
        'h' => Word::Cmd(Cmd::Help, N),
        'v' => Word::Cmd(Cmd::Version, N),
        't' => Word::Opt(Opt::Service, R, Val::Tcp),
        'u' => Word::Opt(Opt::Service, R, Val::Udp),
        'f' => Word::Opt(Opt::Service, R, Val::Fwmark),
        's' => Word::Opt(Opt::Scheduler, R, Val::Flag),
        'p' => Word::Opt(Opt::Persistent, O, Val::Flag),
        'M' => Word::Opt(Opt::Netmask, R, Val::Flag),
        'r' => Word::Opt(Opt::Real, R, Val::Flag),
        'g' => Word::Opt(Opt::Forward, N, Val::Gate),
        'i' => Word::Opt(Opt::Forward, N, Val::Ipip),
        'm' => Word::Opt(Opt::Forward, N, Val::Masq),
        'w' => Word::Opt(Opt::Weight, R, Val::Flag),
        'x' => Word::Opt(Opt::UThreshold, R, Val::Flag),
        'y' => Word::Opt(Opt::LThreshold, R, Val::Flag),
        'n' => Word::Opt(Opt::Numeric, N, Val::Flag),
        'c' => Word::Opt(Opt::Connection, N, Val::Flag),
        'X' => Word::Opt(Opt::Exact, N, Val::Flag),
        'o' => Word::Opt(Opt::Ops, N, Val::Flag),
        'b' => Word::Opt(Opt::SchedFlags, R, Val::Flag),
        '6' => Word::Ipv6,
        _ => return None,
    })
}

fn long(name: &str) -> Option<Word> {
    use Arg::{None as N, Optional as O, Required as R};
    Some(match name {
        "add-service" => Word::Cmd(Cmd::AddService, N),
        "edit-service" => Word::Cmd(Cmd::EditService, N),
        "delete-service" => Word::Cmd(Cmd::DelService, N),
        "clear" => Word::Cmd(Cmd::Flush, N),
        "list" => Word::Cmd(Cmd::List, N),
        "add-server" => Word::Cmd(Cmd::AddDest, N),
        "delete-server" => Word::Cmd(Cmd::DelDest, N),
        "edit-server" => Word::Cmd(Cmd::EditDest, N),
        "set" => Word::Cmd(Cmd::Set, N),
        "start-daemon" => Word::Cmd(Cmd::StartDaemon, R),
        "stop-daemon" => Word::Cmd(Cmd::StopDaemon, R),
        "restore" => Word::Cmd(Cmd::Restore, N),
        "save" => Word::Cmd(Cmd::Save, N),
        "zero" => Word::Cmd(Cmd::Zero, N),
        "help" => Word::Cmd(Cmd::Help, N),
        "version" => Word::Cmd(Cmd::Version, N),
        "tcp-service" => Word::Opt(Opt::Service, R, Val::Tcp),
        "udp-service" => Word::Opt(Opt::Service, R, Val::Udp),
        "sctp-service" => Word::Opt(Opt::Service, R, Val::Sctp),
        "fwmark-service" => Word::Opt(Opt::Service, R, Val::Fwmark),
        "scheduler" => Word::Opt(Opt::Scheduler, R, Val::Flag),
        "persistent" => Word::Opt(Opt::Persistent, O, Val::Flag),
        "netmask" => Word::Opt(Opt::Netmask, R, Val::Flag),
        "real-server" => Word::Opt(Opt::Real, R, Val::Flag),
        "gatewaying" => Word::Opt(Opt::Forward, N, Val::Gate),
        "ipip" => Word::Opt(Opt::Forward, N, Val::Ipip),
        "masquerading" => Word::Opt(Opt::Forward, N, Val::Masq),
        "weight" => Word::Opt(Opt::Weight, R, Val::Flag),
        "u-threshold" => Word::Opt(Opt::UThreshold, R, Val::Flag),
        "l-threshold" => Word::Opt(Opt::LThreshold, R, Val::Flag),
        "numeric" => Word::Opt(Opt::Numeric, N, Val::Flag),
        "connection" => Word::Opt(Opt::Connection, N, Val::Flag),
        "mcast-interface" => Word::Opt(Opt::McastInterface, R, Val::Flag),
        "syncid" => Word::Opt(Opt::SyncId, R, Val::Flag),
        "timeout" => Word::Opt(Opt::Timeout, N, Val::Flag),
        "daemon" => Word::Opt(Opt::Daemon, N, Val::Flag),
        "stats" => Word::Opt(Opt::Stats, N, Val::Flag),
        "rate" => Word::Opt(Opt::Rate, N, Val::Flag),
        "thresholds" => Word::Opt(Opt::Thresholds, N, Val::Flag),
        "persistent-conn" => Word::Opt(Opt::PersistentConn, N, Val::Flag),
        "nosort" => Word::Opt(Opt::NoSort, N, Val::Flag),
        "sort" => Word::Ignored,
        "exact" => Word::Opt(Opt::Exact, N, Val::Flag),
        "ipv6" => Word::Ipv6,
        "ops" => Word::Opt(Opt::Ops, N, Val::Flag),
        "pe" => Word::Opt(Opt::Pe, R, Val::Flag),
        "sched-flags" => Word::Opt(Opt::SchedFlags, R, Val::Flag),
        "mcast-group" => Word::Opt(Opt::McastGroup, R, Val::Flag),
        "mcast-port" => Word::Opt(Opt::McastPort, R, Val::Flag),
        "mcast-ttl" => Word::Opt(Opt::McastTtl, R, Val::Flag),
        "sync-maxlen" => Word::Opt(Opt::SyncMaxlen, R, Val::Flag),
        "tun-info" => Word::Opt(Opt::TunInfo, N, Val::Flag),
        "tun-type" => Word::Opt(Opt::TunType, R, Val::Flag),
        "tun-port" => Word::Opt(Opt::TunPort, R, Val::Flag),
        "tun-nocsum" => Word::Opt(Opt::TunNoCsum, N, Val::Flag),
        "tun-csum" => Word::Opt(Opt::TunCsum, N, Val::Flag),
        "tun-remcsum" => Word::Opt(Opt::TunRemCsum, N, Val::Flag),
        _ => return None,
    })
}

#[derive(Debug)]
enum ParseError {
    /// The first word is not a command: ipvsadm's "Try ... -h" hint, exit 255.
    Usage,
    /// popt's complaint about an option after the command, exit 255.
    Popt(String),
    /// ipvsadm's own `fail()`, exit 2.
    Fail(String),
    /// What the kernel would have refused, exit 255.
    Kernel(String),
}

/// One command line, read.
#[derive(Default)]
struct Parsed {
    cmd: Option<Cmd>,
    /// The value each given option came with (`""` for switches).
    opts: HashMap<Opt, (Val, String)>,
    extra: Vec<String>,
}

impl Parsed {
    fn listing() -> Self {
        Parsed {
            cmd: Some(Cmd::List),
            ..Parsed::default()
        }
    }

    fn has(&self, o: Opt) -> bool {
        self.opts.contains_key(&o)
    }

    fn value(&self, o: Opt) -> Option<&str> {
        self.opts.get(&o).map(|(_, v)| v.as_str())
    }
}

/// Reads the words as popt does with ipvsadm's table, then checks them as ipvsadm does.
fn parse(args: &[String]) -> Result<Parsed, ParseError> {
    let mut p = Parsed::default();
    let mut i = 0;
    let mut only_args = false;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        if only_args || !word.starts_with('-') || word == "-" {
            if p.cmd.is_none() {
                return Err(ParseError::Usage);
            }
            p.extra.push(word.clone());
            continue;
        }
        if word == "--" {
            only_args = true;
            continue;
        }
        // Each item: what it is, how it was written, and a value attached to it.
        let mut items: Vec<(Word, String, Option<String>)> = Vec::new();
        if let Some(name) = word.strip_prefix("--") {
            let (name, attached) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (name, None),
            };
            let Some(w) = long(name) else {
                if p.cmd.is_none() {
                    return Err(ParseError::Usage);
                }
                return Err(ParseError::Popt(format!("{word}: unknown option")));
            };
            items.push((w, word.clone(), attached));
        } else {
            let cluster: Vec<char> = word[1..].chars().collect();
            let mut k = 0;
            while k < cluster.len() {
                let Some(w) = short(cluster[k]) else {
                    let cmd_before = items.iter().any(|(w, _, _)| matches!(w, Word::Cmd(..)));
                    if p.cmd.is_none() && !cmd_before {
                        return Err(ParseError::Usage);
                    }
                    return Err(ParseError::Popt(format!("{word}: unknown option")));
                };
                let takes = match w {
                    Word::Cmd(_, a) | Word::Opt(_, a, _) => a,
                    _ => Arg::None,
                };
                if takes != Arg::None && k + 1 < cluster.len() {
                    let rest: String = cluster[k + 1..].iter().collect();
                    let rest = rest.strip_prefix('=').map_or(rest.clone(), str::to_owned);
                    items.push((w, word.clone(), Some(rest)));
                    break;
                }
                items.push((w, word.clone(), None));
                k += 1;
            }
        }
        for (w, written, attached) in items {
            let takes = match w {
                Word::Cmd(_, a) | Word::Opt(_, a, _) => a,
                _ => Arg::None,
            };
            let value = match (takes, attached) {
                (Arg::None, Some(_)) => {
                    return Err(ParseError::Popt(format!(
                        "{written}: option does not take an argument"
                    )));
                }
                (Arg::None, None) => String::new(),
                (_, Some(v)) => v,
                (Arg::Required, None) => {
                    if let Some(v) = args.get(i) {
                        i += 1;
                        v.clone()
                    } else {
                        if p.cmd.is_none() {
                            return Err(ParseError::Usage);
                        }
                        return Err(ParseError::Popt(format!("{written}: missing argument")));
                    }
                }
                (Arg::Optional, None) => match args.get(i) {
                    Some(v) if !v.starts_with('-') => {
                        i += 1;
                        v.clone()
                    }
                    _ => String::new(),
                },
            };
            match w {
                Word::Cmd(cmd, _) => {
                    if p.cmd.is_some() {
                        return Err(ParseError::Fail(format!("invalid option `{written}'")));
                    }
                    p.cmd = Some(cmd);
                    if (cmd == Cmd::Set || cmd == Cmd::StartDaemon || cmd == Cmd::StopDaemon)
                        && !value.is_empty()
                    {
                        p.extra.push(value);
                    }
                }
                _ if p.cmd.is_none() => return Err(ParseError::Usage),
                Word::Opt(opt, _, val) => {
                    if p.opts.insert(opt, (val, value)).is_some() {
                        return Err(ParseError::Fail(format!(
                            "multiple '{}' options specified",
                            opt.name()
                        )));
                    }
                }
                Word::Ignored => {}
                Word::Ipv6 => {
                    return Err(ParseError::Fail(
                        "bulkhead: IPv6 services (-6) are not supported yet".into(),
                    ));
                }
            }
        }
    }
    let Some(cmd) = p.cmd else {
        return Err(ParseError::Usage);
    };
    match cmd {
        Cmd::Set => {
            if p.extra.len() < 3 {
                return Err(ParseError::Fail(
                    "--set option requires 3 timeout values".into(),
                ));
            }
            if let Some(extra) = p.extra.get(3) {
                return Err(ParseError::Fail(format!("unexpected argument {extra}")));
            }
        }
        Cmd::StartDaemon | Cmd::StopDaemon => {}
        _ => {
            if let Some(extra) = p.extra.first() {
                return Err(ParseError::Fail(format!("unexpected argument {extra}")));
            }
        }
    }
    check_options(cmd, &p)?;
    Ok(p)
}

/// ipvsadm's command-by-option check, in its order, with its messages.
fn check_options(cmd: Cmd, p: &Parsed) -> Result<(), ParseError> {
    if matches!(cmd, Cmd::Help | Cmd::Version) {
        return Ok(());
    }
    let mut first_exclusive: Option<Opt> = None;
    for opt in Opt::ALL {
        let given = p.has(opt);
        match cmd.rule(opt) {
            b'+' if !given => {
                return Err(ParseError::Fail(format!(
                    "You need to supply the '{}' option for the '{}' command",
                    opt.name(),
                    cmd.name()
                )));
            }
            b'x' if given => {
                return Err(ParseError::Fail(format!(
                    "Illegal '{}' option with the '{}' command",
                    opt.name(),
                    cmd.name()
                )));
            }
            b'1' if given => match first_exclusive {
                None => first_exclusive = Some(opt),
                Some(first) => {
                    return Err(ParseError::Fail(format!(
                        "The option '{}' conflicts with the '{}' option in the '{}' command",
                        opt.name(),
                        first.name(),
                        cmd.name()
                    )));
                }
            },
            _ => {}
        }
    }
    if cmd == Cmd::List
        && (p.has(Opt::Connection) || p.has(Opt::Timeout) || p.has(Opt::Daemon))
        && (p.has(Opt::Stats) || p.has(Opt::Rate) || p.has(Opt::Thresholds))
        || cmd == Cmd::List
            && (p.has(Opt::Timeout) || p.has(Opt::Daemon))
            && p.has(Opt::PersistentConn)
    {
        return Err(ParseError::Fail(
            "options conflicts in the list command".into(),
        ));
    }
    Ok(())
}

/// A number as ipvsadm reads one: base 10, the whole word, within `min..=max`.
fn number(text: &str, min: u64, max: u64) -> Option<u64> {
    let t = text.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<u64>().ok().filter(|n| (min..=max).contains(n))
}

/// `a.b.c.d[:port]`, as ipvsadm takes a service or real server (numeric only here: no
/// resolver, no service names).
fn addr_port(text: &str) -> Option<(Ipv4Addr, Option<u16>)> {
    if text.starts_with('[') {
        return None;
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(number(p, 0, 65535)? as u16)),
        None => (text, None),
    };
    Some((Ipv4Addr::from_str(host).ok()?, port))
}

fn unsupported(what: &str) -> ParseError {
    ParseError::Fail(format!("bulkhead: {what} not supported yet"))
}

/// The service the command names.
fn service(p: &Parsed) -> Result<(VirtualAddr, u16), ParseError> {
    let Some((val, text)) = p.opts.get(&Opt::Service) else {
        return Err(ParseError::Fail("missing service".into()));
    };
    let proto = match val {
        Val::Tcp => Proto::Tcp,
        Val::Udp => Proto::Udp,
        Val::Fwmark => return Err(unsupported("firewall-mark services (-f) are")),
        _ => return Err(unsupported("SCTP services are")),
    };
    if text.starts_with('[') || text.matches(':').count() > 1 {
        return Err(unsupported("IPv6 services are"));
    }
    let (addr, port) = addr_port(text).ok_or_else(|| {
        ParseError::Fail("illegal virtual server address[:port] specified".into())
    })?;
    let port = port.unwrap_or(0);
    Ok((VirtualAddr { addr, port, proto }, port))
}

/// Refuses the options Bulkhead cannot keep, naming each.
fn refuse_unsupported(p: &Parsed) -> Result<(), ParseError> {
    let refuse = [
        (Opt::Ops, "one-packet scheduling (-o) is"),
        (Opt::Pe, "persistence engines (--pe) are"),
        (Opt::Rate, "--rate (per-direction rate estimators) is"),
        (Opt::TunInfo, "--tun-info (tunnelling) is"),
        (Opt::TunType, "tunnelling (--tun-type) is"),
        (Opt::TunPort, "tunnelling (--tun-port) is"),
        (Opt::TunNoCsum, "tunnelling (--tun-nocsum) is"),
        (Opt::TunCsum, "tunnelling (--tun-csum) is"),
        (Opt::TunRemCsum, "tunnelling (--tun-remcsum) is"),
        (Opt::Daemon, "the connection sync daemon (--daemon) is"),
    ];
    for (opt, what) in refuse {
        if p.has(opt) {
            return Err(unsupported(what));
        }
    }
    for (opt, message) in [
        (Opt::UThreshold, "illegal u_threshold specified"),
        (Opt::LThreshold, "illegal l_threshold specified"),
    ] {
        if let Some(v) = p.value(opt) {
            match number(v, 0, 2_147_483_647) {
                None => return Err(ParseError::Fail(message.into())),
                Some(0) => {}
                Some(_) => return Err(unsupported("connection thresholds (-x, -y) are")),
            }
        }
    }
    Ok(())
}

fn execute(table: &mut ServiceTable, p: &Parsed, stdin: &str) -> Outcome {
    let cmd = p.cmd.unwrap_or(Cmd::List);
    if let Err(e) = refuse_unsupported(p) {
        return outcome(Err(e));
    }
    let result = match cmd {
        Cmd::Help => Ok(Outcome {
            stdout: usage(),
            ..Outcome::default()
        }),
        Cmd::Version => Ok(Outcome {
            stdout: format!("{VERSION}\n"),
            ..Outcome::default()
        }),
        Cmd::StartDaemon | Cmd::StopDaemon => Err(unsupported(
            "the connection sync daemon (--start-daemon, --stop-daemon) is",
        )),
        Cmd::List => return list(table, p),
        Cmd::Save => {
            return Outcome {
                stdout: save(&table.list()),
                ..Outcome::default()
            };
        }
        Cmd::AddService | Cmd::EditService => edit_service(table, p, cmd),
        Cmd::DelService => service(p).and_then(|(v, _)| {
            table
                .delete(&v)
                .map(|()| Outcome::default())
                .map_err(|e| kernel(&e, "No such service"))
        }),
        Cmd::Flush => {
            let all: Vec<VirtualAddr> = table.specs().iter().map(|s| s.vaddr).collect();
            all.iter()
                .try_for_each(|v| table.delete(v))
                .map(|()| Outcome::default())
                .map_err(|e| kernel(&e, ""))
        }
        Cmd::AddDest | Cmd::EditDest | Cmd::DelDest => edit_dest(table, p, cmd),
        Cmd::Zero => {
            let v = if p.has(Opt::Service) {
                match service(p) {
                    Ok((v, _)) => Some(v),
                    Err(e) => return outcome(Err(e)),
                }
            } else {
                None
            };
            table
                .zero(v.as_ref())
                .map(|()| Outcome::default())
                .map_err(|e| kernel(&e, "No such service"))
        }
        Cmd::Set => set_timeouts(table, p),
        Cmd::Restore => restore(table, stdin),
    };
    table.commit();
    outcome(result)
}

fn outcome(result: Result<Outcome, ParseError>) -> Outcome {
    match result {
        Ok(o) => o,
        Err(ParseError::Fail(m)) => Outcome::fail(2, m),
        Err(ParseError::Kernel(m) | ParseError::Popt(m)) => Outcome::fail(255, m),
        Err(ParseError::Usage) => Outcome::fail(255, "Try `ipvsadm -h' for more information."),
    }
}

/// A refused change as IPVS would word it: `unknown` for a missing service or destination,
/// the table's own message otherwise.
fn kernel(e: &ServiceTableError, unknown: &str) -> ParseError {
    match e {
        ServiceTableError::Unknown { .. } | ServiceTableError::UnknownBackend { .. }
            if !unknown.is_empty() =>
        {
            ParseError::Kernel(unknown.into())
        }
        ServiceTableError::Duplicate { .. } => ParseError::Kernel("Service already exists".into()),
        other => ParseError::Kernel(format!("bulkhead: {}", crate::error_chain(other))),
    }
}

fn edit_service(table: &mut ServiceTable, p: &Parsed, cmd: Cmd) -> Result<Outcome, ParseError> {
    let (vaddr, port) = service(p)?;
    // As ipvsadm: every -A and -E sends the whole service, so what is not given is reset to
    // its default (wlc, no persistence).
    let sched_name = p.value(Opt::Scheduler).unwrap_or("wlc");
    let scheduler = match Scheduler::from_str(sched_name) {
        Ok(s) => s,
        Err(_) if matches!(sched_name, "lblc" | "lblcr") => {
            return Err(ParseError::Kernel(format!(
                "bulkhead: IPVS's {sched_name} scheduler is not supported yet"
            )));
        }
        Err(_) => {
            return Err(ParseError::Kernel(
                "Scheduler or persistence engine not found".into(),
            ));
        }
    };
    let affinity_secs = match p.value(Opt::Persistent) {
        None => 0,
        Some("") => 360,
        Some(v) => number(v, 1, 2_678_400)
            .ok_or_else(|| ParseError::Fail(format!("invalid timeout value `{v}' specified")))?
            as u32,
    };
    // As ipvsadm, the flags are checked against -s (or its default, wlc).
    let sched_flags = match p.value(Opt::SchedFlags) {
        None => SchedFlags::default(),
        Some(text) => sched_flags(text, scheduler)?,
    };
    let affinity_netmask = match p.value(Opt::Netmask) {
        None => Ipv4Addr::BROADCAST,
        Some(m) => Ipv4Addr::from_str(m).map_err(|_| {
            ParseError::Fail("illegal virtual server persistent mask specified".into())
        })?,
    };
    if port == 0 {
        if affinity_secs == 0 {
            return Err(ParseError::Fail(
                "Zero port specified for non-persistent service".into(),
            ));
        }
        return Err(unsupported("all-port services (port 0) are"));
    }
    let mut spec = ServiceSpec {
        vaddr,
        scheduler,
        affinity_secs,
        affinity_netmask,
        sched_flags,
        nodeport: None,
        backends: Vec::new(),
    };
    if cmd == Cmd::AddService {
        table
            .add(&spec)
            .map_err(|e| kernel(&e, "No such service"))?;
    } else {
        let Some(old) = table.spec_of(&vaddr) else {
            return Err(ParseError::Kernel("No such service".into()));
        };
        spec.nodeport = old.nodeport;
        spec.backends = old.backends;
        table
            .update(&spec, false)
            .map_err(|e| kernel(&e, "No such service"))?;
    }
    Ok(Outcome::default())
}

/// `-b`'s list as ipvsadm reads it: each name known, and a scheduler's own names only with it.
fn sched_flags(text: &str, scheduler: Scheduler) -> Result<SchedFlags, ParseError> {
    for name in text.split(',') {
        let known = [
            "flag-1",
            "flag-2",
            "flag-3",
            "sh-fallback",
            "sh-port",
            "mh-fallback",
            "mh-port",
        ];
        if !known.contains(&name) {
            return Err(ParseError::Fail(format!("invalid scheduler flag `{name}'")));
        }
        if SchedFlags::parse(name, scheduler).is_err() {
            return Err(ParseError::Fail(format!(
                "incompatible scheduler flag `{name}'"
            )));
        }
    }
    SchedFlags::parse(text, scheduler)
        .map_err(|_| ParseError::Fail(format!("invalid scheduler flag `{text}'")))
}

/// The flags of a listed service as ipvsadm prints them ("" for none).
fn flags_of(s: &ServiceInfo) -> (bool, String) {
    let flags = SchedFlags::parse(&s.sched_flags, s.scheduler).unwrap_or_default();
    (!flags.is_empty(), flags.display(s.scheduler))
}

fn edit_dest(table: &mut ServiceTable, p: &Parsed, cmd: Cmd) -> Result<Outcome, ParseError> {
    let (vaddr, port) = service(p)?;
    let real = p.value(Opt::Real).unwrap_or_default();
    let (addr, rport) = addr_port(real)
        .ok_or_else(|| ParseError::Fail("illegal real server address[:port] specified".into()))?;
    let real = SocketAddrV4::new(addr, rport.unwrap_or(port));
    let weight = match p.value(Opt::Weight) {
        None => 1,
        Some(w) => {
            let w = number(w, 0, 2_147_483_647)
                .ok_or_else(|| ParseError::Fail("illegal weight specified".into()))?;
            u16::try_from(w).map_err(|_| {
                ParseError::Fail(format!(
                    "bulkhead: weight {w} is beyond 65535, the largest Bulkhead keeps"
                ))
            })?
        }
    };
    if cmd != Cmd::DelDest {
        match p.opts.get(&Opt::Forward).map(|(v, _)| *v) {
            Some(Val::Masq) => {}
            Some(Val::Ipip) => return Err(unsupported("tunnelling (-i) is")),
            _ => {
                return Err(unsupported(
                    "direct routing (-g, ipvsadm's default without -m or -i) is; add -m for \
                     masquerading (NAT), which is",
                ));
            }
        }
    }
    let Some(spec) = table.spec_of(&vaddr) else {
        return Err(ParseError::Kernel("Service not defined".into()));
    };
    let exists = spec.backends.iter().any(|b| b.addr == real);
    match cmd {
        Cmd::AddDest if exists => Err(ParseError::Kernel("Destination already exists".into())),
        Cmd::EditDest | Cmd::DelDest if !exists => {
            Err(ParseError::Kernel("No such destination".into()))
        }
        Cmd::DelDest => table
            .delete_backend(&vaddr, real, false)
            .map(|()| Outcome::default())
            .map_err(|e| kernel(&e, "No such destination")),
        _ => table
            .add_backend(&vaddr, &BackendSpec { addr: real, weight })
            .map(|()| Outcome::default())
            .map_err(|e| kernel(&e, "Service not defined")),
    }
}

fn set_timeouts(table: &mut ServiceTable, p: &Parsed) -> Result<Outcome, ParseError> {
    let mut values = [None; 3];
    for (slot, v) in values.iter_mut().zip(&p.extra) {
        let n = number(v, 0, 2_678_400)
            .ok_or_else(|| ParseError::Fail(format!("invalid timeout value `{v}' specified")))?;
        // As IPVS: zero keeps the current value.
        *slot = (n != 0).then_some(n as u32);
    }
    table
        .set_timeouts(values[0], values[1], values[2])
        .map(|()| Outcome::default())
        .map_err(|e| kernel(&e, ""))
}

fn restore(table: &mut ServiceTable, stdin: &str) -> Result<Outcome, ParseError> {
    // ipvsadm -R drops every word "ipvsadm" (lines may be whole command lines).
    let text: String = stdin
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter(|w| *w != "ipvsadm")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n");
    table
        .restore(&text)
        .map(|_| Outcome::default())
        .map_err(|e| ParseError::Fail(format!("bulkhead: restore: {}", crate::error_chain(&e))))
}

/// glibc 2.36's `qsort` (a top-down merge sort; the left half is the first n/2 elements, and
/// a tie takes the left one), so that ipvsadm's comparators, which are not transitive, order
/// entries exactly as ipvsadm does.
fn glibc_sort<T: Clone>(v: &mut [T], cmp: &impl Fn(&T, &T) -> i64) {
    let n = v.len();
    if n <= 1 {
        return;
    }
    let (left, right) = v.split_at_mut(n / 2);
    glibc_sort(left, cmp);
    glibc_sort(right, cmp);
    let (left, right) = (left.to_vec(), right.to_vec());
    let (mut i, mut j) = (0, 0);
    for slot in v.iter_mut() {
        if j >= right.len() || (i < left.len() && cmp(&left[i], &right[j]) <= 0) {
            *slot = left[i].clone();
            i += 1;
        } else {
            *slot = right[j].clone();
            j += 1;
        }
    }
}

/// `uint32 - uint32` stored in an `int`, as ipvsadm compares addresses.
fn wrapping_diff(a: Ipv4Addr, b: Ipv4Addr) -> i64 {
    i64::from(u32::from(a).wrapping_sub(u32::from(b)) as i32)
}

/// Services and their backends in ipvsadm's order (`ipvs_cmp_services`, `ipvs_cmp_dests`).
fn sorted(mut services: Vec<ServiceInfo>) -> Vec<ServiceInfo> {
    let proto = |s: &ServiceInfo| i64::from(s.service.proto.number());
    glibc_sort(&mut services, &|a: &ServiceInfo, b: &ServiceInfo| {
        let r = proto(a) - proto(b);
        if r != 0 {
            return r;
        }
        let r = wrapping_diff(a.service.addr, b.service.addr);
        if r != 0 {
            return r;
        }
        i64::from(a.service.port) - i64::from(b.service.port)
    });
    for s in &mut services {
        glibc_sort(&mut s.backends, &|a, b| {
            let r = wrapping_diff(*a.addr.ip(), *b.addr.ip());
            if r != 0 {
                return r;
            }
            i64::from(a.addr.port()) - i64::from(b.addr.port())
        });
    }
    services
}

/// The weight ipvsadm shows: a draining backend is IPVS's quiesced one, weight 0.
fn shown_weight(b: &crate::services::BackendInfo) -> u16 {
    if b.state == BackendState::Draining {
        0
    } else {
        b.weight
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    }
}

/// `ipvsadm -S -n`.
fn save(services: &[ServiceInfo]) -> String {
    let mut out = String::new();
    for s in sorted(services.to_vec()) {
        let v = s.service;
        let flag = v.proto.ipvsadm_flag();
        let _ = write!(
            out,
            "-A {flag} {}:{} -s {}",
            v.addr,
            v.port,
            s.scheduler.name()
        );
        if s.affinity_secs != 0 {
            let _ = write!(out, " -p {}", s.affinity_secs);
            if s.affinity_netmask != Ipv4Addr::BROADCAST {
                let _ = write!(out, " -M {}", s.affinity_netmask);
            }
        }
        let (any, names) = flags_of(&s);
        if any {
            let _ = write!(out, " -b {names}");
        }
        if let Some(port) = s.nodeport {
            // Not ipvsadm's: IPVS has no NodePort. Bulkhead's -R reads it back.
            let _ = write!(out, " --nodeport {port}");
        }
        out.push('\n');
        for b in &s.backends {
            let _ = writeln!(
                out,
                "-a {flag} {}:{} -r {} -m -w {}",
                v.addr,
                v.port,
                b.addr,
                shown_weight(b)
            );
        }
    }
    out
}

/// `ActiveConn` and `InActConn` per (service, backend), as IPVS counts them: established TCP
/// connections are active; everything else tracked (handshakes, closing, UDP) is inactive.
fn connection_counts(table: &ServiceTable) -> HashMap<(VirtualAddr, SocketAddrV4), (u64, u64)> {
    let mut counts: HashMap<(VirtualAddr, SocketAddrV4), (u64, u64)> = HashMap::new();
    for f in table.flows() {
        let v = VirtualAddr {
            addr: *f.service.ip(),
            port: f.service.port(),
            proto: f.proto,
        };
        let c = counts.entry((v, f.backend)).or_default();
        if f.state == "established" {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    counts
}

fn truncated(text: String, max: usize) -> String {
    if text.len() > max {
        text[..max].to_owned()
    } else {
        text
    }
}

fn list(table: &ServiceTable, p: &Parsed) -> Outcome {
    if p.has(Opt::Timeout) {
        let (tcp, fin, udp) = table.timeouts();
        return Outcome {
            stdout: format!("Timeout (tcp tcpfin udp): {tcp} {fin} {udp}\n"),
            ..Outcome::default()
        };
    }
    if p.has(Opt::Connection) {
        return Outcome {
            stdout: list_connections(table, p.has(Opt::PersistentConn)),
            ..Outcome::default()
        };
    }
    let mut services = table.list();
    let one = if p.has(Opt::Service) {
        match service(p) {
            Ok((v, _)) => {
                services.retain(|s| s.service == v);
                if services.is_empty() {
                    return Outcome::fail(1, "No such service");
                }
                true
            }
            Err(e) => {
                let mut o = outcome(Err(e));
                if o.code == 255 {
                    o.code = 1;
                }
                return o;
            }
        }
    } else {
        false
    };
    let stats = p.has(Opt::Stats);
    let thresholds = !stats && p.has(Opt::Thresholds);
    let persistent = !stats && !thresholds && p.has(Opt::PersistentConn);
    let persist_counts = if persistent {
        table.affinity_counts()
    } else {
        HashMap::new()
    };
    let exact = p.has(Opt::Exact);
    let conns = connection_counts(table);
    let mut out = String::new();
    if !one {
        let _ = writeln!(
            out,
            "IP Virtual Server version 1.2.1 (size={CONNTRACK_SIZE})"
        );
    }
    if stats {
        let _ = writeln!(
            out,
            "{:<33} {:>8} {:>8} {:>8} {:>8} {:>8}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"
        );
    } else if thresholds {
        let _ = writeln!(
            out,
            "{:<33} {:<10} {:<10} {:<10} {:<10}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Uthreshold", "Lthreshold", "ActiveConn", "InActConn"
        );
    } else if persistent {
        let _ = writeln!(
            out,
            "{:<33} {:<9} {:<11} {:<10} {:<10}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Weight", "PersistConn", "ActiveConn", "InActConn"
        );
    } else {
        out.push_str(
            "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward \
             Weight ActiveConn InActConn\n",
        );
    }
    for s in sorted(services) {
        let v = s.service;
        let name = truncated(
            format!("{:<4} {}:{}", proto_name(v.proto), v.addr, v.port),
            33,
        );
        if stats {
            // Conns, InPkts, OutPkts, InBytes, OutBytes: the datapath counts both directions
            // and the reply direction apart.
            let _ = write!(out, "{name:<33}");
            for v in [
                s.new_flows,
                s.packets.saturating_sub(s.out_packets),
                s.out_packets,
                s.bytes.saturating_sub(s.out_bytes),
                s.out_bytes,
            ] {
                out.push_str(&largenum(v, exact));
            }
            out.push('\n');
            for b in &s.backends {
                let _ = write!(out, "  -> {:<28}", truncated(b.addr.to_string(), 28));
                // ipvsadm reads a destination's connection and packet counters as 32-bit.
                let low = |v: u64| v & u64::from(u32::MAX);
                for v in [
                    low(b.new_flows),
                    low(b.packets.saturating_sub(b.out_packets)),
                    low(b.out_packets),
                    b.bytes.saturating_sub(b.out_bytes),
                    b.out_bytes,
                ] {
                    out.push_str(&largenum(v, exact));
                }
                out.push('\n');
            }
            continue;
        }
        let _ = write!(out, "{name} {}", s.scheduler.name());
        let (any, names) = flags_of(&s);
        if any {
            let _ = write!(out, " ({names})");
        }
        if s.affinity_secs != 0 {
            let _ = write!(out, " persistent {}", s.affinity_secs);
            if s.affinity_netmask != Ipv4Addr::BROADCAST {
                let _ = write!(out, " mask {}", s.affinity_netmask);
            }
        }
        out.push('\n');
        for b in &s.backends {
            let (active, inactive) = conns.get(&(v, b.addr)).copied().unwrap_or((0, 0));
            let dest = truncated(b.addr.to_string(), 28);
            if thresholds {
                let _ = writeln!(
                    out,
                    "  -> {dest:<28} {:<10} {:<10} {active:<10} {inactive:<10}",
                    0, 0
                );
            } else if persistent {
                let templates = persist_counts.get(&(v, b.addr)).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "  -> {dest:<28} {:<9} {templates:<11} {active:<10} {inactive:<10}",
                    shown_weight(b)
                );
            } else {
                let _ = writeln!(
                    out,
                    "  -> {dest:<28} {:<7} {:<6} {active:<10} {inactive:<10}",
                    "Masq",
                    shown_weight(b)
                );
            }
        }
    }
    Outcome {
        stdout: out,
        ..Outcome::default()
    }
}

/// A counter as ipvsadm prints one: exact in at least nine columns with `--exact`, else in
/// nine columns with K, M, G or T past eight digits (integer division).
fn largenum(v: u64, exact: bool) -> String {
    if exact {
        let digits = v.to_string().len();
        let width = if digits <= 8 { 9 } else { digits + 1 };
        return format!("{v:>width$}");
    }
    match v {
        0..100_000_000 => format!("{v:>9}"),
        100_000_000..1_000_000_000 => format!("{:>8}K", v / 1_000),
        1_000_000_000..100_000_000_000 => format!("{:>8}M", v / 1_000_000),
        100_000_000_000..100_000_000_000_000 => format!("{:>8}G", v / 1_000_000_000),
        _ => format!("{:>8}T", v / 1_000_000_000_000),
    }
}

/// `ipvsadm -L -c -n`: the tracked flows.
fn list_connections(table: &ServiceTable, persistent: bool) -> String {
    let mut out = String::from("IPVS connection entries\n");
    if persistent {
        // No persistence engine here: every row is a plain one.
        let _ = writeln!(
            out,
            "pro expire {:<11} {:<18} {:<18} {:<18} {:<16} pe_data",
            "state", "source", "virtual", "destination", "pe name"
        );
    } else {
        let _ = writeln!(
            out,
            "pro expire {:<11} {:<18} {:<18} destination",
            "state", "source", "virtual"
        );
    }
    for f in table.flows() {
        let state = match (f.proto, f.state) {
            (Proto::Udp, _) => "UDP",
            (_, "established") => "ESTABLISHED",
            (_, "syn-sent") => "SYN_RECV",
            _ => "FIN_WAIT",
        };
        let secs = f.expires_in_secs;
        let _ = writeln!(
            out,
            "{:<3} {:<6} {state:<11} {:<18} {:<18} {}",
            proto_name(f.proto),
            format!("{:02}:{:02}", secs / 60, secs % 60),
            f.client.to_string(),
            f.service.to_string(),
            f.backend
        );
    }
    out
}

fn usage() -> String {
    let mut text = format!("{VERSION}\n");
    text.push_str(
        "Usage:
  ipvsadm -A|E virtual-service [-s scheduler] [-p [timeout]] [-M netmask]
  ipvsadm -D virtual-service
  ipvsadm -C
  ipvsadm -R
  ipvsadm -S [-n]
  ipvsadm -a|e virtual-service -r server-address -m [-w weight]
  ipvsadm -d virtual-service -r server-address
  ipvsadm -L|l [virtual-service] [-n] [--stats [--exact]|--thresholds|--persistent-conn]
  ipvsadm -L|l -c [-n] | --timeout
  ipvsadm -Z [virtual-service]
  ipvsadm --set tcp tcpfin udp
  ipvsadm -h

virtual-service: --tcp-service|-t service-address | --udp-service|-u service-address
Schedulers: rr, wrr, lc, wlc, sh, dh, sed, nq, fo, ovf, mh, twos (and Bulkhead's hash,
random, maglev). Not supported yet, and refused by name: -g, -i, -f, -o, -b, -x, -y, --pe, --rate,
IPv6, the sync daemon.
",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn error(line: &str) -> (u8, String) {
        match parse(&args(line)) {
            Ok(_) => panic!("{line:?} parsed"),
            Err(ParseError::Usage) => (255, "usage".into()),
            Err(ParseError::Popt(m) | ParseError::Kernel(m)) => (255, m),
            Err(ParseError::Fail(m)) => (2, m),
        }
    }

    #[test]
    fn options_read_as_popt_reads_them() {
        let p = parse(&args("-Ln")).unwrap();
        assert_eq!(p.cmd, Some(Cmd::List));
        assert!(p.has(Opt::Numeric));
        let p = parse(&args("-A -t198.19.0.1:80 -s rr -p")).unwrap();
        assert_eq!(p.value(Opt::Service), Some("198.19.0.1:80"));
        assert_eq!(p.value(Opt::Persistent), Some(""));
        let p = parse(&args("-A --tcp-service=198.19.0.1:80 -p 60 -s wlc")).unwrap();
        assert_eq!(p.value(Opt::Persistent), Some("60"));
        let p = parse(&args("-a -t 198.19.0.1:80 -r 198.18.0.2 -m -w=5")).unwrap();
        assert_eq!(p.value(Opt::Weight), Some("5"));
        let p = parse(&args("--set 900 0 300")).unwrap();
        assert_eq!(p.extra, ["900", "0", "300"]);
    }

    #[test]
    fn bad_command_lines_get_ipvsadms_messages_and_codes() {
        for (line, code, message) in [
            ("-n -L", 255, "usage"),
            ("", 255, "usage"),
            ("-L --tim", 255, "--tim: unknown option"),
            ("-Lq", 255, "-Lq: unknown option"),
            ("-A -t 198.19.0.1:80 -s", 255, "-s: missing argument"),
            ("-A -t 198.19.0.1:80 -L", 2, "invalid option `-L'"),
            (
                "-a -t 198.19.0.1:80 -m",
                2,
                "You need to supply the 'real-server' option for the 'add-server' command",
            ),
            (
                "-A -t 198.19.0.1:80 -w 3",
                2,
                "Illegal 'weight' option with the 'add-service' command",
            ),
            (
                "-Z -n",
                2,
                "Illegal 'numeric' option with the 'zero' command",
            ),
            (
                "-L --timeout -c",
                2,
                "The option 'timeout' conflicts with the 'connection' option in the 'list' command",
            ),
            ("-L -c --stats", 2, "options conflicts in the list command"),
            (
                "-A -t 198.19.0.1:80 -u 198.19.0.1:53",
                2,
                "multiple 'service-address' options specified",
            ),
            ("--set 1 2", 2, "--set option requires 3 timeout values"),
            ("--set 1 2 3 4", 2, "unexpected argument 4"),
            ("-C extra", 2, "unexpected argument extra"),
        ] {
            let got = if line.is_empty() {
                (255, "usage".into())
            } else {
                error(line)
            };
            assert_eq!(got, (code, message.to_owned()), "{line:?}");
        }
    }

    #[test]
    fn counters_print_as_ipvsadms_largenum() {
        for (v, short, exact) in [
            (0, "        0", "        0"),
            (99_999_999, " 99999999", " 99999999"),
            (123_456_789, "  123456K", " 123456789"),
            (1_000_000_000, "    1000M", " 1000000000"),
            (99_999_999_999, "   99999M", " 99999999999"),
            (123_456_789_012_345, "     123T", " 123456789012345"),
        ] {
            assert_eq!(largenum(v, false), short, "{v}");
            assert_eq!(largenum(v, true), exact, "{v}");
        }
    }

    #[test]
    fn numbers_are_read_as_strtol_and_ipvsadm_read_them() {
        assert_eq!(number("+5", 0, 9), Some(5));
        assert_eq!(number(" 5", 0, 9), Some(5));
        assert_eq!(number("5 ", 0, 9), None);
        assert_eq!(number("5x", 0, 9), None);
        assert_eq!(number("10", 0, 9), None);
    }

    #[test]
    fn the_sort_is_ipvsadms_including_its_wrapping_address_compare() {
        // The order glibc's qsort gave ipvsadm's comparator for this input on Debian 12.
        let mut v: Vec<Ipv4Addr> = ["192.168.0.1", "10.0.0.1", "100.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        glibc_sort(&mut v, &|a, b| wrapping_diff(*a, *b));
        let got: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["192.168.0.1", "10.0.0.1", "100.0.0.1"]);
    }

    #[test]
    fn read_only_lines_are_known_before_parsing() {
        for (line, ro) in [
            ("-Ln", true),
            ("-L -n", true),
            ("-S -n", true),
            ("--list", true),
            ("-A -t 198.19.0.1:80", false),
            ("-R", false),
            ("-Z", false),
        ] {
            assert_eq!(reads_only(&args(line)), ro, "{line}");
        }
        assert!(reads_only(&[]));
    }
}
