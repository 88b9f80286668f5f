//! `cargo xtask build-and-run`: setup, build, then the demo scenario against the real kernel,
//! here or (`--vm`) inside the test VM booting Debian's kernel.

use std::time::Duration;

use crate::{build, setup, vm};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    #[command(flatten)]
    pub build: build::Options,
    /// Run the demo inside a VM booting Debian's kernel (KVM when it works, else TCG).
    #[arg(long)]
    pub vm: bool,
}

/// The demo inside the test VM (Debian's kernel, bulkhead-init as PID 1); `artifacts` must be a
/// release build.
pub fn vm_demo(artifacts: &build::Artifacts) -> anyhow::Result<()> {
    let demo = build::tests_bin(artifacts, "bulkhead-demo")?;
    let binaries = [
        (artifacts.bulkhead.clone(), "/bin/bulkhead"),
        (artifacts.init.clone(), "/bin/bulkhead-init"),
        (demo, "/bin/bulkhead-demo"),
    ];
    vm::run(
        "BULKHEAD_BIN=/bin/bulkhead /bin/bulkhead-demo",
        &binaries,
        Duration::from_mins(15),
    )
}

pub fn run(opts: &DemoOptions) -> anyhow::Result<()> {
    setup::run()?;
    let release = opts.build.release || opts.vm;
    let artifacts = build::run(&build::Options { release })?;
    let root = build::root();
    let mut cargo = build::host_cargo(&root, &artifacts.ebpf);
    if opts.vm {
        return vm_demo(&artifacts);
    }
    cargo.args([
        "run",
        "--quiet",
        "--package",
        "tests",
        "--bin",
        "bulkhead-demo",
    ]);
    if release {
        cargo.arg("--release");
    }
    setup::run_cmd(
        "demo",
        cargo
            .env("BULKHEAD_BIN", &artifacts.bulkhead)
            .env("BULKHEAD_INIT_BIN", &artifacts.init),
    )
}
