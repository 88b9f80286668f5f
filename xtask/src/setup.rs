//! `cargo xtask setup`: installs what is missing, skips what is there, and says which.
//!
//! Every step checks before it acts, so running it again is cheap. A step that cannot be done
//! fails with a message naming it and the command to do it by hand.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages the tests and the demo need.
/// prometheus: the agent test has a real Prometheus scrape it (run from the test, not as a
/// service); podman, runc and containernetworking-plugins: the CNI plugin's tests run real
/// containers (podman's CNI backend, configured in the test's own directories); containerd:
/// the same through its CRI plugin (the package ships only a systemd unit, so installing it
/// starts no daemon); protobuf-compiler: the tests' CRI client (k8s-cri) compiles CRI's proto
/// files with protoc when it is built.
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "busybox-static",
    "prometheus",
    "podman",
    "runc",
    "containernetworking-plugins",
    "containerd",
    "protobuf-compiler",
];

pub fn run() -> anyhow::Result<()> {
    nightly()?;
    rustup_component("rust-src", "nightly")?;
    rustup_target("x86_64-unknown-linux-musl")?;
    bpf_linker()?;
    apt(TEST_PACKAGES)?;
    Ok(())
}

fn say(step: &str, what: &str) {
    eprintln!("setup: {step:<28} {what}");
}

/// Runs a command with inherited output; fails naming the step and the command.
pub fn run_cmd(step: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{step}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{step}: {cmd:?} failed ({status}); run it by hand to see why");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> anyhow::Result<()> {
    match output(Command::new("rustc").args(["+nightly", "--version"])) {
        Some(v) => {
            say("nightly toolchain", &format!("present: {}", v.trim()));
            Ok(())
        }
        None => bail!(
            "nightly toolchain: missing; the eBPF crate needs it: `rustup toolchain install nightly --profile minimal`"
        ),
    }
}

fn rustup_component(component: &str, toolchain: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    let step = format!("{component} ({toolchain})");
    if installed.lines().any(|l| l.starts_with(component)) {
        say(&step, "present");
        return Ok(());
    }
    say(&step, "installing");
    run_cmd(
        &step,
        Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]),
    )
}

fn rustup_target(target: &str) -> anyhow::Result<()> {
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        say(target, "present");
        return Ok(());
    }
    say(target, "installing");
    run_cmd(
        target,
        Command::new("rustup").args(["target", "add", target]),
    )
}

/// Directory for artefacts that must outlive `cargo clean` (bpf-linker's LLVM prefix).
fn cache_dir() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("bulkhead")
}

/// bpf-linker built against nightly's own libLLVM, so no system LLVM is needed.
///
/// `cargo install` finds LLVM through `LLVM_PREFIX`: a directory whose `lib/` holds `libLLVM.so`
/// and the versioned soname, both linking to the library shipped in nightly's sysroot. The
/// binary keeps that `lib/` as its RUNPATH, so the prefix lives in the cache, not in target/.
fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        say("bpf-linker", &format!("present: {}", v.trim()));
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("bpf-linker: cannot ask nightly rustc for its sysroot")?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("bpf-linker: cannot list {}", sysroot_lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("bpf-linker: no libLLVM.so.* in {}", sysroot_lib.display()))?;
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = cache_dir().join(format!(
        "llvm-prefix-{}",
        libllvm.trim_start_matches("libLLVM.so.")
    ));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("bpf-linker: cannot create {}", prefix_lib.display()))?;
    for name in [libllvm.as_str(), "libLLVM.so"] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot_lib.join(&libllvm), &link)
            .with_context(|| format!("bpf-linker: cannot link {}", link.display()))?;
    }
    say(
        "bpf-linker",
        &format!(
            "installing against {libllvm} (LLVM_PREFIX={})",
            prefix.display()
        ),
    );
    run_cmd(
        "bpf-linker",
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

/// Installs the Debian packages that are missing (apt-get update first, once).
pub fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        say(
            "debian packages",
            &format!("present: {}", packages.join(" ")),
        );
        return Ok(());
    }
    say(
        "debian packages",
        &format!("installing {}", missing.join(" ")),
    );
    if Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!(
            "debian packages: no apt-get here; install {} by hand",
            missing.join(" ")
        );
    }
    run_cmd(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run_cmd(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
