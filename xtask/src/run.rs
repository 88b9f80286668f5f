//! `cargo xtask build-and-run`: setup, build, then the demo scenario against the real kernel.

use crate::{build, setup};

pub fn run(opts: &build::Options) -> anyhow::Result<()> {
    setup::run()?;
    let artifacts = build::run(opts)?;
    let root = build::root();
    let mut cargo = build::host_cargo(&root, &artifacts.ebpf);
    cargo.args(["run", "--quiet", "--package", "tests", "--bin", "bulkhead-demo"]);
    if opts.release {
        cargo.arg("--release");
    }
    setup::run_cmd("demo", cargo.env("BULKHEAD_BIN", &artifacts.bulkhead).env("BULKHEAD_INIT_BIN", &artifacts.init))
}

