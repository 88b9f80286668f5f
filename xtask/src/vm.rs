//! The test VM: Debian's kernel (it has IPVS; this machine's does not), an initramfs with
//! `bulkhead-init` as PID 1, and a scenario script whose result comes back on the serial
//! console as one marker line.
//!
//! Everything is cached under target/vm/. KVM is used when a probe boot answers within a
//! timeout, else TCG. Debian's busybox shadows `ip`/`tc` with applets, so iproute2 is copied to
//! /usr/sbin and called by full path.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build, setup};

/// Modules the scenarios need, with their dependencies added from modules.dep. crc32c comes
/// first: libcrc32c (under conntrack, IPVS and `nf_tables`) needs it as a soft dependency, which
/// modules.dep does not list.
const MODULES: &[&str] = &[
    "crc32c_generic",
    // Block devices for the sandbox device-control and I/O-limit tests: loop devices, and
    // RAM disks where loop devices fail.
    "loop",
    "brd",
    "veth",
    "bridge",
    "br_netfilter",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "ip_vs_mh",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_fo",
    "ip_vs_ovf",
    "ip_vs_dh",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_numgen",
    "nft_compat",
    "xt_statistic",
    "xt_tcpudp",
    "xt_nat",
    "xt_conntrack",
    "iptable_nat",
    "xt_MASQUERADE",
];

/// Host programs copied in, with the shared libraries `ldd` names.
const PROGRAMS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/ipvsadm",
    "/usr/sbin/nft",
    "/usr/sbin/xtables-nft-multi",
];

const MARKER: &str = "BULKHEAD-VM-RESULT:";
const BOOTED: &str = "BULKHEAD-VM-BOOTED";

pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub root: PathBuf,
    pub version: String,
}

fn vm_dir() -> PathBuf {
    build::root().join("target").join("vm")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian's current kernel package, downloaded and unpacked once.
pub fn kernel() -> anyhow::Result<Kernel> {
    let dir = vm_dir().join("kernel");
    fs::create_dir_all(&dir)?;
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let package = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("apt-cache names no linux-image package (run apt-get update)")?
        .to_owned();
    let version = package.trim_start_matches("linux-image-").to_owned();
    let root = dir.join(&package);
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        eprintln!("vm: downloading {package}");
        setup::run_cmd(
            "download the kernel",
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .context("apt-get download left no .deb")?;
        setup::run_cmd(
            "unpack the kernel",
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        )?;
        setup::run_cmd(
            "index the modules",
            Command::new("depmod").arg("-b").arg(&root).arg(&version),
        )?;
    }
    Ok(Kernel {
        vmlinuz,
        root,
        version,
    })
}

/// Files and links of the initramfs, collected before writing the archive.
#[derive(Default)]
struct Tree {
    files: Vec<(String, PathBuf, u32)>,
    links: Vec<(String, String)>,
    dirs: BTreeSet<String>,
}

impl Tree {
    fn dir(&mut self, path: &str) {
        let mut p = String::new();
        for part in path.trim_matches('/').split('/').filter(|s| !s.is_empty()) {
            p.push('/');
            p.push_str(part);
            self.dirs.insert(p.clone());
        }
    }

    fn file(&mut self, dest: &str, src: &Path, mode: u32) {
        if let Some((parent, _)) = dest.rsplit_once('/') {
            self.dir(parent);
        }
        if !self.files.iter().any(|(d, _, _)| d == dest) {
            self.files.push((dest.to_owned(), src.to_owned(), mode));
        }
    }

    /// A program and every library `ldd` lists for it, at their host paths.
    fn program(&mut self, dest: &str, src: &Path) -> anyhow::Result<()> {
        let real = fs::canonicalize(src).with_context(|| format!("resolve {}", src.display()))?;
        self.file(dest, &real, 0o755);
        let ldd = Command::new("ldd").arg(&real).output()?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim().split(' ').next().unwrap_or(""),
                None => line.trim().split(' ').next().unwrap_or(""),
            };
            if path.starts_with('/') {
                let lib = fs::canonicalize(path).with_context(|| format!("resolve {path}"))?;
                self.file(path, &lib, 0o755);
            }
        }
        Ok(())
    }

    /// Writes the tree as a gzip-compressed newc cpio archive.
    fn write(&self, out: &Path) -> anyhow::Result<()> {
        let mut cpio = Vec::new();
        let mut ino = 1u32;
        let mut entry = |cpio: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
            let name = name.trim_start_matches('/');
            let header = format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            );
            ino += 1;
            cpio.extend_from_slice(header.as_bytes());
            cpio.extend_from_slice(name.as_bytes());
            cpio.push(0);
            while !cpio.len().is_multiple_of(4) {
                cpio.push(0);
            }
            cpio.extend_from_slice(data);
            while !cpio.len().is_multiple_of(4) {
                cpio.push(0);
            }
        };
        for d in &self.dirs {
            entry(&mut cpio, d, 0o040_755, &[]);
        }
        for (dest, src, mode) in &self.files {
            let data = fs::read(src).with_context(|| format!("read {}", src.display()))?;
            entry(&mut cpio, dest, 0o100_000 | mode, &data);
        }
        for (link, target) in &self.links {
            entry(&mut cpio, link, 0o120_777, target.as_bytes());
        }
        entry(&mut cpio, "TRAILER!!!", 0, &[]);
        let mut gz = Command::new("gzip")
            .args(["-1", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdin = gz.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&cpio));
        let compressed = gz.wait_with_output()?;
        writer.join().expect("gzip writer")?;
        fs::write(out, compressed.stdout).with_context(|| format!("write {}", out.display()))
    }
}

/// Modules to include: `MODULES` and their dependencies, as paths relative to the module dir.
fn module_closure(kernel: &Kernel) -> anyhow::Result<Vec<String>> {
    let dir = kernel.root.join("lib/modules").join(&kernel.version);
    let dep = fs::read_to_string(dir.join("modules.dep")).context("read modules.dep")?;
    let by_name = |name: &str| -> Option<(String, Vec<String>)> {
        dep.lines().find_map(|l| {
            let (path, deps) = l.split_once(':')?;
            let file = path.rsplit('/').next()?;
            let stem = file.split(".ko").next()?;
            (stem == name || stem.replace('-', "_") == name).then(|| {
                (
                    path.to_owned(),
                    deps.split_whitespace().map(str::to_owned).collect(),
                )
            })
        })
    };
    let mut all = BTreeSet::new();
    for m in MODULES {
        if let Some((path, deps)) = by_name(m) {
            all.insert(path);
            all.extend(deps);
        }
    }
    Ok(all.into_iter().collect())
}

/// Builds the initramfs for `scenario` (a shell script body) and the host binaries it uses,
/// given as (host path, path in the VM).
pub fn initramfs(
    kernel: &Kernel,
    binaries: &[(PathBuf, &str)],
    scenario: &str,
) -> anyhow::Result<PathBuf> {
    let mut tree = Tree::default();
    for d in [
        "/proc", "/sys", "/dev", "/run", "/tmp", "/etc", "/sbin", "/usr/bin",
    ] {
        tree.dir(d);
    }
    tree.file("/bin/busybox", Path::new("/usr/bin/busybox"), 0o755);
    tree.links.push(("/bin/sh".into(), "busybox".into()));
    for (host, dest) in binaries {
        tree.program(dest, host)?;
    }
    for p in PROGRAMS {
        let dest = if p.ends_with("/ip") {
            "/usr/sbin/ip"
        } else {
            p
        };
        tree.program(dest, Path::new(p))?;
    }
    for name in ["iptables", "iptables-restore", "iptables-save"] {
        tree.links
            .push((format!("/usr/sbin/{name}"), "xtables-nft-multi".into()));
    }
    let xtables = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    for e in fs::read_dir(xtables)?.flatten() {
        let dest = format!("{}/{}", xtables.display(), e.file_name().to_string_lossy());
        tree.file(&dest, &e.path(), 0o644);
    }
    for etc in ["/etc/protocols", "/etc/services"] {
        if Path::new(etc).exists() {
            tree.file(etc, Path::new(etc), 0o644);
        }
    }
    let moddir = format!("/lib/modules/{}", kernel.version);
    let host_moddir = kernel.root.join("lib/modules").join(&kernel.version);
    for m in module_closure(kernel)? {
        tree.file(&format!("{moddir}/{m}"), &host_moddir.join(&m), 0o644);
    }
    for f in [
        "modules.dep",
        "modules.alias",
        "modules.symbols",
        "modules.builtin",
        "modules.order",
    ] {
        if host_moddir.join(f).exists() {
            tree.file(&format!("{moddir}/{f}"), &host_moddir.join(f), 0o644);
        }
    }
    let script = vm_dir().join("scenario.sh");
    fs::write(&script, scenario)?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    tree.file("/scenario.sh", &script, 0o755);
    let out = vm_dir().join("initramfs.gz");
    tree.write(&out)?;
    Ok(out)
}

/// The scenario's frame: mounts, modules, the body, the result marker, power off.
pub fn scenario(body: &str) -> String {
    let modules = MODULES.join(" ");
    format!(
        "/bin/busybox --install -s /bin\n\
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root\n\
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
mount -t tmpfs run /run; mount -t tmpfs tmp /tmp; mkdir -p /run/netns /sys/fs/bpf\n\
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null\n\
ln -s /bin/busybox /sbin/modprobe\n\
for m in {modules}; do modprobe $m || echo \"vm: modprobe $m failed\"; done\n\
echo {BOOTED} $(cut -d' ' -f1 /proc/uptime)\n\
(\n{body}\n); rc=$?\n\
echo {MARKER} $rc\n\
poweroff -f\n"
    )
}

fn qemu(kernel: &Kernel, initrd: &Path, accel: &str, memory_mib: u32) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet rdinit=/bin/bulkhead-init -- /bin/sh /scenario.sh",
    ]);
    match accel {
        "kvm" => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg", "-cpu", "max"]),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Boots the VM and streams its console; returns the scenario's exit status (None when it
/// produced no result within `limit`), when it booted, and the console text.
fn boot(
    mut cmd: Command,
    limit: Duration,
    echo: bool,
) -> anyhow::Result<(Option<i32>, Option<Duration>, String)> {
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut result = None;
    let mut booted = None;
    let mut console = String::new();
    while started.elapsed() < limit {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if echo
                    && !line.starts_with("BENCH-FILE")
                    && console.matches("BENCH-FILE-BEGIN").count()
                        == console.matches("BENCH-FILE-END").count()
                {
                    println!("vm| {line}");
                }
                console.push_str(&line);
                console.push('\n');
                if line.contains(BOOTED) {
                    booted = Some(started.elapsed());
                }
                if let Some(rest) = line.split(MARKER).nth(1) {
                    result = rest.trim().parse().ok();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok((result, booted, console))
}

/// KVM if a probe boot reaches the scenario within 30 s (TCG itself needs about 14), else TCG:
/// KVM is present on some hosts but hangs.
fn accel(kernel: &Kernel, initrd: &Path) -> &'static str {
    if !Path::new("/dev/kvm").exists() {
        return "tcg";
    }
    let probe = qemu(kernel, initrd, "kvm", 512);
    match boot(probe, Duration::from_secs(30), false) {
        Ok((_, Some(_), _)) => "kvm",
        _ => "tcg",
    }
}

/// Runs `body` in the VM with `binaries` inside; fails unless it exits 0.
pub fn run(body: &str, binaries: &[(PathBuf, &str)], limit: Duration) -> anyhow::Result<()> {
    run_capture(body, binaries, limit).map(drop)
}

/// As [`run`], returning the console text.
pub fn run_capture(
    body: &str,
    binaries: &[(PathBuf, &str)],
    limit: Duration,
) -> anyhow::Result<String> {
    setup::apt(&[
        "qemu-system-x86",
        "busybox-static",
        "ipvsadm",
        "iptables",
        "nftables",
        "kmod",
    ])?;
    let started = Instant::now();
    let kernel = kernel()?;
    let probe = initramfs(&kernel, binaries, &scenario("exit 0"))?;
    let accel = accel(&kernel, &probe);
    let initrd = initramfs(&kernel, binaries, &scenario(body))?;
    eprintln!("vm: Linux {} under {accel}", kernel.version);
    let (result, booted, console) = boot(qemu(&kernel, &initrd, accel, 2048), limit, true)?;
    eprintln!(
        "vm: booted in {}, total {:.1} s, scenario status {}",
        booted.map_or_else(|| "(never)".into(), |b| format!("{:.1} s", b.as_secs_f64())),
        started.elapsed().as_secs_f64(),
        result.map_or_else(|| "missing".into(), |r| r.to_string())
    );
    match result {
        Some(0) => Ok(console),
        Some(code) => bail!("the VM scenario failed with status {code}"),
        None => bail!("the VM scenario reported no result within {limit:?}"),
    }
}
