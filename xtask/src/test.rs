//! `cargo xtask test`: setup, build, then the workspace's tests.
//!
//! Integration tests find the built binaries through environment variables set here, and run
//! one at a time (each builds real namespaces and attaches real programs). The last ring boots
//! the test VM and runs the demo there.

use anyhow::Context as _;

use crate::{build, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Skip `setup` (for quick reruns on a machine already set up).
    #[arg(long)]
    pub no_setup: bool,
    /// Skip the last ring: the demo inside the test VM (Debian's kernel, IPVS modules, netlink
    /// tc, bulkhead-init as PID 1), about two minutes under TCG.
    #[arg(long)]
    pub no_vm: bool,
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
        .args([
            "test",
            "--workspace",
            "--exclude",
            "dataplane-ebpf",
            "--",
            "--test-threads=1",
        ])
        .args(&opts.args)
        .env("BULKHEAD_BIN", &artifacts.bulkhead)
        .env("BULKHEAD_INIT_BIN", &artifacts.init);
    setup::run_cmd("cargo test", &mut cargo).context("tests failed")?;
    if opts.no_vm {
        eprintln!("test: SKIP the VM demo: --no-vm");
        return Ok(());
    }
    if !is_root() {
        eprintln!("test: SKIP the VM demo: needs root to install qemu and build the initramfs");
        return Ok(());
    }
    let release = build::run(&build::Options { release: true })?;
    crate::run::vm_demo(&release).context("the VM demo failed")?;
    eprintln!("test: the VM demo passed");
    Ok(())
}

fn is_root() -> bool {
    // `id -u` rather than a libc dependency: xtask keeps its dependencies few.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
