//! `cargo xtask build`: the eBPF object with nightly, then the host binaries with stable.
//!
//! The eBPF crate builds in its own target directory, so cargo's fingerprints keep it from being
//! rebuilt when only user-space code changed, and the two toolchains never share artefacts.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::setup::run_cmd;

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Build the host binaries with the release profile (the eBPF object always is).
    #[arg(long)]
    pub release: bool,
}

/// Paths of everything `build` produced.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub ebpf: PathBuf,
    pub bulkhead: PathBuf,
    pub init: PathBuf,
}

pub const MUSL: &str = "x86_64-unknown-linux-musl";

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Builds everything and returns where it is.
pub fn run(opts: &Options) -> anyhow::Result<Artifacts> {
    let root = root();
    let ebpf = build_ebpf(&root)?;
    let profile = if opts.release { "release" } else { "debug" };
    let mut cargo = host_cargo(&root, &ebpf);
    cargo.args(["build", "--package", "userspace"]);
    if opts.release {
        cargo.arg("--release");
    }
    run_cmd("build bulkhead", &mut cargo)?;
    run_cmd(
        "build bulkhead-init",
        host_cargo(&root, &ebpf).args([
            "build",
            "--package",
            "bulkhead-init",
            "--profile",
            "init",
            "--target",
            MUSL,
        ]),
    )?;
    let artifacts = Artifacts {
        ebpf,
        bulkhead: root.join("target").join(profile).join("bulkhead"),
        init: root
            .join("target")
            .join(MUSL)
            .join("init")
            .join("bulkhead-init"),
    };
    // `bulkhead run` looks for bulkhead-init next to itself first.
    let beside = artifacts.bulkhead.with_file_name("bulkhead-init");
    std::fs::copy(&artifacts.init, &beside)
        .with_context(|| format!("copy bulkhead-init to {}", beside.display()))?;
    eprintln!("build: eBPF object  {}", artifacts.ebpf.display());
    eprintln!("build: bulkhead     {}", artifacts.bulkhead.display());
    eprintln!("build: bulkhead-init {}", artifacts.init.display());
    eprintln!(
        "build: bulkhead-cni  {}",
        artifacts.bulkhead.with_file_name("bulkhead-cni").display()
    );
    Ok(artifacts)
}

/// Builds a binary of the `tests` package (the demo, the benchmark) in release, with the eBPF
/// object of `artifacts`; returns its path.
pub fn tests_bin(artifacts: &Artifacts, name: &str) -> anyhow::Result<PathBuf> {
    let root = root();
    run_cmd(
        &format!("build {name}"),
        host_cargo(&root, &artifacts.ebpf).args([
            "build",
            "--release",
            "--package",
            "tests",
            "--bin",
            name,
        ]),
    )?;
    Ok(root.join("target/release").join(name))
}

/// A stable-toolchain cargo in the workspace, with the eBPF object to embed.
pub fn host_cargo(root: &Path, ebpf: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(root).env("BULKHEAD_EBPF_OBJ", ebpf);
    cargo
}

fn build_ebpf(root: &Path) -> anyhow::Result<PathBuf> {
    let target_dir = root.join("target").join("ebpf");
    // BTF comes from the debug info, and bpf-linker only emits it when asked.
    let rustflags = ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    run_cmd(
        "build eBPF object",
        Command::new("cargo")
            .current_dir(root)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .args([
                "+nightly",
                "build",
                "--package",
                "dataplane-ebpf",
                "--release",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(&target_dir),
    )?;
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("dataplane-ebpf");
    anyhow::ensure!(
        object.is_file(),
        "build eBPF object: {} was not produced",
        object.display()
    );
    object
        .canonicalize()
        .with_context(|| format!("resolve {}", object.display()))
}
