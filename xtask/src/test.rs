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
    /// Only the VM rings (after the build): for work on what runs there.
    #[arg(long, conflicts_with = "no_vm")]
    pub vm_only: bool,
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
    // The workspace lints (clippy's pedantic group, with the allowed ones and their reasons in
    // Cargo.toml) are part of the test: a warning fails it. The eBPF crate builds only for
    // its own target, and bulkhead-init's binary only with the init profile; its tests are
    // linted.
    setup::run_cmd(
        "cargo clippy",
        build::host_cargo(&root, &artifacts.ebpf).args([
            "clippy",
            "--workspace",
            "--exclude",
            "dataplane-ebpf",
            "--exclude",
            "bulkhead-init",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    setup::run_cmd(
        "cargo clippy (bulkhead-init's tests)",
        build::host_cargo(&root, &artifacts.ebpf).args([
            "clippy",
            "--package",
            "bulkhead-init",
            "--tests",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The tests run with SIGHUP, SIGINT, SIGQUIT and SIGPIPE ignored, as under nohup or a
    // shell's background job without job control: tests must not depend on how their parent
    // was started, and this shows they do not. `sh`'s `trap ''` sets the dispositions and
    // `exec` passes them on (ignored dispositions survive execve(2)). So Ctrl-C does not stop
    // the test binaries; SIGTERM does.
    let mut cargo = std::process::Command::new("sh");
    cargo
        .current_dir(&root)
        .env("BULKHEAD_EBPF_OBJ", &artifacts.ebpf)
        .args([
            "-c",
            "trap '' HUP INT QUIT PIPE; exec \"$@\"",
            "sh",
            "cargo",
        ])
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
    if !opts.vm_only {
        setup::run_cmd("cargo test", &mut cargo).context("tests failed")?;
    }
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
    vm_tests(&release).context("the tests in the VM failed")?;
    eprintln!("test: the VM tests passed (cgroup v2 sandboxes, ipvsadm against IPVS)");
    Ok(())
}

/// Tests run again inside the VM: sandbox tests whose subject is the cgroup hierarchy (its
/// kernel mounts cgroup v2 alone, where this machine has the v1/v2 hybrid), and the ipvsadm
/// comparison with the real ipvsadm over IPVS (which this machine's kernel lacks). None of
/// them may skip there.
const VM_TESTS: &[&str] = &[
    "ipvsadm::ipvsadm_answers_as_the_real_ipvsadm_over_ipvs_does",
    "sandboxes::a_sandbox_sees_only_itself",
    "sandboxes::exceeding_the_memory_limit_is_an_oom_kill_that_stats_shows",
    "sandboxes::the_pids_limit_stops_a_fork_bomb",
    "sandboxes::a_cpu_limit_shows_throttling",
    "sandboxes::exec_lands_in_the_sandboxs_namespaces_and_cgroup",
    "sandboxes::after_rm_nothing_is_left",
    "sandboxes::the_hosts_root_is_read_only_inside_and_volumes_are_shared",
    "sandboxes::cpu_shares_and_memory_reservation_reach_the_cgroup",
    "sandboxes::a_time_namespace_shifts_the_sandboxs_clocks",
    "sandboxes::devices_outside_dockers_list_cannot_be_opened",
    "sandboxes::cpuset_io_and_swap_limits_reach_the_cgroup_and_stats",
    "sandboxes::capabilities_user_and_ulimits_are_applied",
    "sandboxes::dockers_masked_and_read_only_paths_are_hidden",
    "sandboxes::the_default_seccomp_filter_denies_what_dockers_denies",
];

fn vm_tests(artifacts: &build::Artifacts) -> anyhow::Result<()> {
    let root = build::root();
    let out = build::host_cargo(&root, &artifacts.ebpf)
        .args([
            "test",
            "--package",
            "tests",
            "--test",
            "integration",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("build the integration tests")?;
    let executable_of = |name: &str| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("\"name\":\"{name}\"")))
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(std::path::PathBuf::from(v["executable"].as_str()?))
            })
    };
    let executable =
        executable_of("integration").context("cargo did not name the integration test binary")?;
    let syscall_helper = executable_of("bulkhead-syscall")
        .context("cargo did not name the bulkhead-syscall helper")?;
    // Without debug info it is a tenth of the size in the initramfs.
    let stripped = root.join("target/vm/bulkhead-tests");
    std::fs::create_dir_all(stripped.parent().unwrap())?;
    setup::run_cmd(
        "strip the test binary",
        std::process::Command::new("strip")
            .arg("--strip-debug")
            .arg(&executable)
            .arg("-o")
            .arg(&stripped),
    )?;
    let body = format!(
        "grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || {{ echo 'vm: no cgroup2'; exit 1; }}\n\
export BULKHEAD_BIN=/bin/bulkhead BULKHEAD_INIT_BIN=/bin/bulkhead-init BULKHEAD_SYSCALL_BIN=/bin/bulkhead-syscall\n\
/bin/bulkhead-tests --test-threads=1 --nocapture {} > /tmp/tests.out 2>&1; rc=$?\n\
cat /tmp/tests.out\n\
if grep -q '^SKIP ' /tmp/tests.out; then echo 'vm: a test skipped in the VM'; exit 1; fi\n\
exit $rc",
        VM_TESTS.join(" ")
    );
    let binaries = [
        (artifacts.bulkhead.clone(), "/bin/bulkhead"),
        (artifacts.init.clone(), "/bin/bulkhead-init"),
        (stripped, "/bin/bulkhead-tests"),
        (syscall_helper, "/bin/bulkhead-syscall"),
    ];
    crate::vm::run(&body, &binaries, std::time::Duration::from_mins(20))
}

fn is_root() -> bool {
    // `id -u` rather than a libc dependency: xtask keeps its dependencies few.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
