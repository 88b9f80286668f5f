//! `cargo xtask test`: setup, build, then the workspace's tests.
//!
//! Integration tests find the built binaries through environment variables set here, and run
//! one at a time (each builds real namespaces and attaches real programs).

use anyhow::Context as _;

use crate::{build, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Skip `setup` (for quick reruns on a machine already set up).
    #[arg(long)]
    pub no_setup: bool,
    /// Passed to the test binaries (e.g. a test name filter).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_setup {
        setup::run()?;
    }
    let artifacts = build::run(&build::Options { release: false })?;
    let root = build::root();
    let mut cargo = build::host_cargo(&root, &artifacts.ebpf);
    cargo
        .args(["test", "--workspace", "--exclude", "dataplane-ebpf", "--", "--test-threads=1"])
        .args(&opts.args)
        .env("BULKHEAD_BIN", &artifacts.bulkhead)
        .env("BULKHEAD_INIT_BIN", &artifacts.init);
    setup::run_cmd("cargo test", &mut cargo).context("tests failed")
}
