//! Command-line interface of `bulkhead`: argument parsing and output formatting only.
//!
//! Each subcommand calls into the library modules and prints their result as a table or, with
//! `--json`, as JSON for scripts. Errors reach the user through `anyhow` with their whole chain.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dataplane_common::direction;

use crate::{
    bpffs, doctor,
    link::ifname,
    loader,
    netns,
    node::{self, Paths},
};

#[derive(Debug, Parser)]
#[command(name = "bulkhead", version, about = "eBPF service load balancing, NAT and sandboxes from plain Linux features")]
pub struct Cli {
    /// Run in this network namespace (a name under /run/netns, or a path), like `ip -n`.
    #[arg(long, global = true, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// bpffs directory for pinned maps, programs and links; mounted if it is not on bpffs.
    #[arg(long, global = true, env = "BULKHEAD_BPFFS", default_value = bpffs::DEFAULT_DIR)]
    pub bpffs: PathBuf,
    /// Directory for the node record and sandbox state.
    #[arg(long, global = true, env = "BULKHEAD_STATE_DIR", default_value = node::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
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
        subnet: String,
    },
    /// Detach everything, unpin, and delete the bridge if `up` created it.
    Down,
    /// Attach the datapath to an interface (a veth plugged into the bridge later).
    Attach { ifname: String },
    /// Detach the datapath from an interface.
    Detach { ifname: String },
    /// Per-interface packet and byte counters, and datapath verdict reasons.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BULKHEAD_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(ns) = &cli.netns {
        let path = netns::resolve(ns);
        netns::enter(&path).with_context(|| format!("enter network namespace {ns}"))?;
    }
    let paths = Paths { bpffs: cli.bpffs, state_dir: cli.state_dir };
    let mut out = std::io::stdout().lock();
    match cli.command {
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
            return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS });
        }
        Command::Up { bridge, subnet } => {
            let record = node::up(&paths, &bridge, Some(&subnet)).with_context(|| format!("bring up bridge {bridge}"))?;
            writeln!(
                out,
                "bulkhead up: bridge {} ({:?}), datapath attached to {}",
                record.bridge,
                record.mode,
                record.attached.join(", ")
            )?;
        }
        Command::Down => {
            let record = node::down(&paths).context("take the node down")?;
            writeln!(out, "bulkhead down: detached from {}", record.attached.join(", "))?;
        }
        Command::Attach { ifname } => {
            node::attach(&paths, &ifname).with_context(|| format!("attach the datapath to {ifname}"))?;
        }
        Command::Detach { ifname } => {
            node::detach(&paths, &ifname).with_context(|| format!("detach the datapath from {ifname}"))?;
        }
        Command::Stats { json } => print_stats(&paths, json, &mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct IfaceStats {
    ifname: String,
    ifindex: u32,
    direction: &'static str,
    packets: u64,
    bytes: u64,
}

fn print_stats(paths: &Paths, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let ifaces: Vec<IfaceStats> = loader::iface_counters(&paths.bpffs)
        .context("read interface counters")?
        .into_iter()
        .map(|(k, c)| IfaceStats {
            ifname: ifname(k.ifindex),
            ifindex: k.ifindex,
            direction: if k.direction == direction::INGRESS { "ingress" } else { "egress" },
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let reasons = loader::reason_counters(&paths.bpffs).context("read verdict reasons")?;
    if json {
        let reasons: serde_json::Map<String, serde_json::Value> =
            reasons.iter().map(|(r, n)| (r.name().to_owned(), (*n).into())).collect();
        let doc = serde_json::json!({ "interfaces": ifaces, "reasons": reasons });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    writeln!(out, "{:<16}{:<9}{:>12}{:>16}", "IFACE", "HOOK", "PACKETS", "BYTES")?;
    for s in &ifaces {
        writeln!(out, "{:<16}{:<9}{:>12}{:>16}", s.ifname, s.direction, s.packets, s.bytes)?;
    }
    writeln!(out)?;
    writeln!(out, "{:<25}{:>12}", "REASON", "PACKETS")?;
    for (r, n) in reasons {
        writeln!(out, "{:<25}{:>12}", r.name(), n)?;
    }
    Ok(())
}
