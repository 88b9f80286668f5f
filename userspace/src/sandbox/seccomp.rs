//! Seccomp filters for sandboxes: a default that makes docker's default profile's decisions,
//! a profile in docker's JSON format (`--security-opt seccomp=PROFILE.json`), or none
//! (`seccomp=unconfined`, and `--privileged`, as docker does).
//!
//! A profile compiles (seccompiler, in the parent: the child between clone and exec only
//! installs) into one filter per action: the default action with every ALLOW rule first, then
//! a filter per other action. The kernel runs every filter and keeps the most restrictive
//! result, the most recently installed one among equals (seccomp(2), "Filter return values"),
//! so a rule such as docker's `clone3` -> ENOSYS wins over the default EPERM.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    str::FromStr,
};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

use super::{SandboxError, spec::Capability};

/// Which filter a sandbox gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Policy {
    /// Docker's default decisions ([`default_profile`]).
    #[default]
    Default,
    /// No filter.
    Unconfined,
    /// A profile in docker's JSON format.
    Profile(PathBuf),
}

impl FromStr for Policy {
    type Err = SandboxError;

    /// `unconfined`, `default`, or a path to a JSON profile, as `--security-opt seccomp=` takes.
    fn from_str(s: &str) -> Result<Self, SandboxError> {
        Ok(match s {
            "unconfined" => Policy::Unconfined,
            "default" | "builtin" => Policy::Default,
            path => {
                let path = PathBuf::from(path);
                // Read and checked now: a bad profile is refused before anything is made.
                Profile::load(&path)?;
                Policy::Profile(path)
            }
        })
    }
}

/// A seccomp profile in docker's format (moby's `profiles/seccomp` types): a default action
/// and rules, each naming syscalls, an action, optional argument conditions, and the
/// capabilities, architectures and kernel versions it applies to.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub default_action: String,
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub syscalls: Vec<Rule>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub names: Vec<String>,
    /// The one-name form older profiles use.
    #[serde(default)]
    pub name: Option<String>,
    pub action: String,
    #[serde(default)]
    pub args: Vec<Arg>,
    #[serde(default)]
    pub errno_ret: Option<u32>,
    #[serde(default)]
    pub includes: Filter,
    #[serde(default)]
    pub excludes: Filter,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arg {
    pub index: u8,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(default)]
    pub caps: Vec<String>,
    #[serde(default)]
    pub arches: Vec<String>,
    #[serde(default)]
    pub min_kernel: Option<String>,
}

fn bad(value: &str, why: impl Into<String>) -> SandboxError {
    SandboxError::BadValue {
        what: "seccomp profile",
        value: value.to_owned(),
        why: why.into(),
    }
}

impl Profile {
    /// Reads and checks a profile: every syscall name known, every action and operator one
    /// this compiler handles.
    pub fn load(path: &std::path::Path) -> Result<Self, SandboxError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| bad(&shown, e.to_string()))?;
        let profile: Profile =
            serde_json::from_str(&text).map_err(|e| bad(&shown, e.to_string()))?;
        profile.check().map_err(|why| bad(&shown, why))?;
        Ok(profile)
    }

    fn check(&self) -> Result<(), String> {
        action(&self.default_action, self.default_errno_ret)?;
        if !self.architectures.is_empty() && !self.architectures.iter().any(|a| is_this_arch(a)) {
            return Err(format!(
                "its architectures {:?} do not include this machine's (x86_64)",
                self.architectures
            ));
        }
        for rule in &self.syscalls {
            action(&rule.action, rule.errno_ret)?;
            for name in rule.all_names() {
                if Sysno::from_str(name).is_err() && !other_arch_syscall(name) {
                    return Err(format!("unknown syscall {name:?}"));
                }
            }
            for arg in &rule.args {
                operator(arg)?;
            }
            for cap in rule.includes.caps.iter().chain(&rule.excludes.caps) {
                cap.parse::<Capability>()
                    .map_err(|_| format!("unknown capability {cap:?}"))?;
            }
        }
        Ok(())
    }

    /// The filters this profile makes for a process holding the capabilities in `caps`, in
    /// the order to install them.
    pub fn compile(&self, caps: u64) -> Result<Vec<BpfProgram>, String> {
        let default = action(&self.default_action, self.default_errno_ret)?;
        let kernel = kernel_version();
        // Rules by action, in first-seen order; each action's rules by syscall number. An
        // empty rule list matches the syscall whatever its arguments (seccompiler's form).
        let mut groups: Vec<(SeccompAction, BTreeMap<i64, Vec<SeccompRule>>)> = Vec::new();
        let mut unconditional: BTreeSet<(usize, i64)> = BTreeSet::new();
        for rule in self.syscalls.iter().filter(|r| r.applies(caps, kernel)) {
            let act = action(&rule.action, rule.errno_ret.or(self.default_errno_ret))?;
            if act == default {
                continue;
            }
            let conditions = rule
                .args
                .iter()
                .map(|a| {
                    SeccompCondition::new(
                        a.index,
                        SeccompCmpArgLen::Qword,
                        operator(a)?,
                        arg_value(a),
                    )
                    .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, String>>()?;
            let i = if let Some(i) = groups.iter().position(|(a, _)| *a == act) {
                i
            } else {
                groups.push((act, BTreeMap::new()));
                groups.len() - 1
            };
            for name in rule.all_names() {
                // A syscall of another architecture (docker's profiles name them all) does not
                // exist here: skipped, as libseccomp skips it.
                let Ok(sysno) = Sysno::from_str(name) else {
                    continue;
                };
                let nr = i64::from(sysno.id());
                let rules = groups[i].1.entry(nr).or_default();
                if conditions.is_empty() {
                    rules.clear();
                    unconditional.insert((i, nr));
                } else if !unconditional.contains(&(i, nr)) {
                    rules.push(SeccompRule::new(conditions.clone()).map_err(|e| e.to_string())?);
                }
            }
        }
        // The ALLOW rules with the default first; the other actions over everything else.
        groups.sort_by_key(|(a, _)| *a != SeccompAction::Allow);
        if groups
            .first()
            .is_none_or(|(a, _)| *a != SeccompAction::Allow)
            && default != SeccompAction::Allow
        {
            groups.insert(0, (SeccompAction::Allow, BTreeMap::new()));
        }
        groups
            .into_iter()
            .map(|(act, rules)| {
                let (mismatch, matched) = if act == SeccompAction::Allow {
                    (default.clone(), SeccompAction::Allow)
                } else {
                    (SeccompAction::Allow, act)
                };
                let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
                    .map_err(|e| e.to_string())?;
                BpfProgram::try_from(filter).map_err(|e| e.to_string())
            })
            .collect()
    }
}

impl Rule {
    fn all_names(&self) -> impl Iterator<Item = &str> {
        self.names
            .iter()
            .map(String::as_str)
            .chain(self.name.as_deref())
    }

    /// Whether the rule applies to a process with `caps` on kernel `kernel`.
    fn applies(&self, caps: u64, kernel: (u32, u32)) -> bool {
        let has = |c: &String| c.parse::<Capability>().is_ok_and(|c| caps & c.mask() != 0);
        let inc = &self.includes;
        let exc = &self.excludes;
        inc.caps.iter().all(has)
            && (inc.arches.is_empty() || inc.arches.iter().any(|a| is_this_arch(a)))
            && inc
                .min_kernel
                .as_deref()
                .is_none_or(|v| kernel >= parse_version(v))
            && !exc.caps.iter().any(has)
            && !exc.arches.iter().any(|a| is_this_arch(a))
            && exc
                .min_kernel
                .as_deref()
                .is_none_or(|v| kernel < parse_version(v))
    }
}

/// Whether `name` is a system call of some other architecture Linux supports.
fn other_arch_syscall(name: &str) -> bool {
    use syscalls::{aarch64, arm, mips64, powerpc64, riscv64, s390x, x86};
    x86::Sysno::from_str(name).is_ok()
        || arm::Sysno::from_str(name).is_ok()
        || aarch64::Sysno::from_str(name).is_ok()
        || s390x::Sysno::from_str(name).is_ok()
        || powerpc64::Sysno::from_str(name).is_ok()
        || mips64::Sysno::from_str(name).is_ok()
        || riscv64::Sysno::from_str(name).is_ok()
}

fn is_this_arch(name: &str) -> bool {
    matches!(name, "amd64" | "x86_64" | "SCMP_ARCH_X86_64" | "x86-64")
}

fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno.unwrap_or(0)),
        other => return Err(format!("unknown action {other:?}")),
    })
}

fn operator(arg: &Arg) -> Result<SeccompCmpOp, String> {
    Ok(match arg.op.as_str() {
        "SCMP_CMP_EQ" => SeccompCmpOp::Eq,
        "SCMP_CMP_NE" => SeccompCmpOp::Ne,
        "SCMP_CMP_LT" => SeccompCmpOp::Lt,
        "SCMP_CMP_LE" => SeccompCmpOp::Le,
        "SCMP_CMP_GT" => SeccompCmpOp::Gt,
        "SCMP_CMP_GE" => SeccompCmpOp::Ge,
        // libseccomp's (arg & value) == valueTwo.
        "SCMP_CMP_MASKED_EQ" => SeccompCmpOp::MaskedEq(arg.value),
        other => return Err(format!("unknown operator {other:?}")),
    })
}

/// The value an argument is compared with (for `MASKED_EQ`, the second one).
fn arg_value(arg: &Arg) -> u64 {
    if arg.op == "SCMP_CMP_MASKED_EQ" {
        arg.value_two
    } else {
        arg.value
    }
}

fn parse_version(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn kernel_version() -> (u32, u32) {
    nix::sys::utsname::uname().map_or((0, 0), |u| {
        crate::doctor::parse_release(&u.release().to_string_lossy())
    })
}

/// Namespace flags of clone(2) and unshare(2): `CLONE_NEWNS`, NEWCGROUP, NEWUTS, NEWIPC,
/// NEWUSER, NEWPID, NEWNET (and `CLONE_NEWTIME`'s bit, 0x80, which clone cannot take).
const NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// What docker's default profile decides, written as a profile: every syscall this machine's
/// table knows is allowed except those docker denies, some of which a capability unlocks,
/// and a few allowed only with harmless arguments. Unknown syscalls get EPERM.
pub fn default_profile() -> Profile {
    // Denied whatever the capabilities: the kernel keyring is not namespaced, io_uring has
    // been a steady source of escapes, and the rest are obsolete.
    const DENIED: [&str; 16] = [
        "add_key",
        "keyctl",
        "request_key",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "nfsservctl",
        "uselib",
        "ustat",
        "sysfs",
        "_sysctl",
        "vm86",
        "vm86old",
    ];
    // Allowed only to holders of a capability, as docker gates them.
    const GATED: [(&str, &[&str]); 13] = [
        (
            "CAP_SYS_ADMIN",
            &[
                "mount",
                "umount",
                "umount2",
                "pivot_root",
                "setns",
                "swapon",
                "swapoff",
                "quotactl",
                "quotactl_fd",
                "lookup_dcookie",
                "fanotify_init",
                "name_to_handle_at",
                "fsconfig",
                "fsmount",
                "fsopen",
                "fspick",
                "move_mount",
                "open_tree",
                "mount_setattr",
                "bpf",
                "perf_event_open",
                "unshare",
                "clone",
                "clone3",
            ],
        ),
        ("CAP_BPF", &["bpf"]),
        ("CAP_PERFMON", &["perf_event_open"]),
        ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
        (
            "CAP_SYS_MODULE",
            &["init_module", "finit_module", "delete_module"],
        ),
        ("CAP_SYS_PACCT", &["acct"]),
        (
            "CAP_SYS_PTRACE",
            &[
                "kcmp",
                "process_vm_readv",
                "process_vm_writev",
                "pidfd_getfd",
                "userfaultfd",
            ],
        ),
        ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
        (
            "CAP_SYS_TIME",
            &["settimeofday", "stime", "clock_settime", "clock_adjtime"],
        ),
        ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
        (
            "CAP_SYS_NICE",
            &["get_mempolicy", "mbind", "set_mempolicy", "move_pages"],
        ),
        ("CAP_SYSLOG", &["syslog"]),
        ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ];
    // Allowed with some arguments only (below), so not in the plain list.
    const CONDITIONAL: [&str; 4] = ["clone", "clone3", "unshare", "personality"];
    let gated: Vec<&str> = GATED.iter().flat_map(|(_, n)| n.iter().copied()).collect();
    let plain: Vec<String> = Sysno::iter()
        .map(|s| s.name())
        .filter(|n| !DENIED.contains(n) && !gated.contains(n) && !CONDITIONAL.contains(n))
        .map(str::to_owned)
        .collect();
    let allow = |names: &[&str], caps: &[&str], args: Vec<Arg>| Rule {
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        action: "SCMP_ACT_ALLOW".into(),
        args,
        includes: Filter {
            caps: caps.iter().map(|c| (*c).to_owned()).collect(),
            ..Filter::default()
        },
        ..Rule::default()
    };
    let mut rules = vec![Rule {
        names: plain,
        action: "SCMP_ACT_ALLOW".into(),
        ..Rule::default()
    }];
    for (cap, names) in GATED {
        rules.push(allow(names, &[cap], vec![]));
    }
    // clone and unshare without namespace flags: threads and fork work, new namespaces not.
    let no_namespaces = |index| Arg {
        index,
        value: NAMESPACE_FLAGS,
        value_two: 0,
        op: "SCMP_CMP_MASKED_EQ".into(),
    };
    rules.push(allow(&["clone", "unshare"], &[], vec![no_namespaces(0)]));
    // clone3's flags live in a struct a filter cannot read: ENOSYS, so libc falls back to
    // clone (docker does the same).
    rules.push(Rule {
        names: vec!["clone3".into()],
        action: "SCMP_ACT_ERRNO".into(),
        errno_ret: Some(libc::ENOSYS as u32),
        excludes: Filter {
            caps: vec!["CAP_SYS_ADMIN".into()],
            ..Filter::default()
        },
        ..Rule::default()
    });
    // personality(2): the default domain, its Linux32 variant, and queries only.
    for value in [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
        rules.push(allow(
            &["personality"],
            &[],
            vec![Arg {
                index: 0,
                value,
                value_two: 0,
                op: "SCMP_CMP_EQ".into(),
            }],
        ));
    }
    Profile {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno_ret: Some(libc::EPERM as u32),
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        syscalls: rules,
    }
}

/// The filters for `policy` and a process holding `caps`; none for unconfined.
pub fn filters(policy: &Policy, caps: u64) -> Result<Vec<BpfProgram>, SandboxError> {
    let profile = match policy {
        Policy::Unconfined => return Ok(Vec::new()),
        Policy::Default => default_profile(),
        Policy::Profile(path) => Profile::load(path)?,
    };
    profile.compile(caps).map_err(|why| SandboxError::Setup {
        message: format!("compile the seccomp profile: {why}"),
    })
}

/// Installs `filters` on the calling thread (`no_new_privs` must be set, as `drop_privileges`
/// does). Makes system calls only.
pub fn install(filters: &[BpfProgram]) -> Result<(), String> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| format!("install the seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_compiles_for_docker_caps_and_for_all() {
        let profile = default_profile();
        profile.check().unwrap();
        let docker = crate::sandbox::process::default_caps();
        assert_eq!(
            profile.compile(docker).unwrap().len(),
            2,
            "allow list, then ENOSYS"
        );
        // With CAP_SYS_ADMIN clone3 is allowed: no ENOSYS filter.
        assert_eq!(profile.compile(u64::MAX).unwrap().len(), 1);
    }

    #[test]
    fn gated_syscalls_follow_capabilities() {
        let profile = default_profile();
        let allowed = |name: &str, caps: u64| {
            profile.syscalls.iter().any(|r| {
                r.action == "SCMP_ACT_ALLOW"
                    && r.args.is_empty()
                    && r.all_names().any(|n| n == name)
                    && r.applies(caps, (6, 1))
            })
        };
        let docker = crate::sandbox::process::default_caps();
        for denied in ["keyctl", "mount", "reboot", "bpf", "unshare", "init_module"] {
            assert!(!allowed(denied, docker), "{denied}");
        }
        for ok in ["read", "openat", "execve", "chroot", "ptrace", "setuid"] {
            assert!(allowed(ok, docker), "{ok}");
        }
        let admin = docker | (1 << 21);
        assert!(allowed("mount", admin) && !allowed("keyctl", admin));
    }

    #[test]
    fn bad_profiles_are_refused_naming_what_is_wrong() {
        let bad = |json: &str, why: &str| {
            let p: Profile = serde_json::from_str(json).unwrap();
            let e = p.check().unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        };
        bad(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["frobnicate"],"action":"SCMP_ACT_ALLOW"}]}"#,
            "unknown syscall \"frobnicate\"",
        );
        bad(
            r#"{"defaultAction":"SCMP_ACT_SOMETIMES"}"#,
            "unknown action",
        );
        bad(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#,
            "architectures",
        );
        bad(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_SOMEHOW"}]}]}"#,
            "unknown operator",
        );
    }
}
