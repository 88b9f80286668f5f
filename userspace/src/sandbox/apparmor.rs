//! AppArmor for sandboxes, where the kernel has it: Bulkhead's default profile (loaded with
//! `apparmor_parser` the first time a sandbox needs it) or a profile the user names with
//! `--security-opt apparmor=NAME`, entered when the sandbox's first program is executed.
//! Where the kernel has no AppArmor, sandboxes run without it (as docker's do) and asking for
//! a profile is refused with the reason.

use std::{path::Path, process::Command};

use super::SandboxError;

/// The name of Bulkhead's default profile.
pub const DEFAULT_PROFILE: &str = "bulkhead-default";

/// Where the kernel lists the loaded profiles.
const PROFILES: &str = "/sys/kernel/security/apparmor/profiles";

/// Bulkhead's default profile: files, network and the capabilities the sandbox holds are left
/// to the other layers (mount namespace, seccomp, capability set); what it adds is what those
/// layers leave open to root inside: mounting, remounting and pivoting, writing the kernel's
/// tunables and triggers under /proc and /sys, and reading the kernel's memory and key
/// material.
const DEFAULT_TEXT: &str = "\
#include <tunables/global>

profile bulkhead-default flags=(attach_disconnected,mediate_deleted) {
  #include <abstractions/base>

  network,
  capability,
  file,
  umount,
  signal,
  ptrace (trace,read,tracedby,readby) peer=bulkhead-default,

  deny mount,
  deny remount,
  deny pivot_root,

  deny @{PROC}/* w,
  deny @{PROC}/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9/]*}/** w,
  deny @{PROC}/sys/[^k]** w,
  deny @{PROC}/sys/kernel/{?,??,[^s][^h][^m]**} w,
  deny @{PROC}/sysrq-trigger rwklx,
  deny @{PROC}/kcore rwklx,
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
}
";

/// Whether this kernel enforces AppArmor.
pub fn enabled() -> bool {
    Path::new("/sys/kernel/security/apparmor").exists()
        && std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|v| v.trim() == "Y")
}

fn loaded(name: &str) -> bool {
    std::fs::read_to_string(PROFILES).is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_once(' ').is_some_and(|(n, _)| n == name))
    })
}

/// The profile a sandbox enters: `requested` (a loaded profile's name), else the default
/// profile where the kernel has AppArmor (loaded now if it is not yet), else none.
pub fn profile_for(requested: Option<&str>) -> Result<Option<String>, SandboxError> {
    let bad = |value: &str, why: String| SandboxError::BadValue {
        what: "apparmor profile",
        value: value.to_owned(),
        why,
    };
    if !enabled() {
        return match requested {
            None => Ok(None),
            Some(name) => Err(bad(
                name,
                "AppArmor is not enabled in this kernel (see bulkhead doctor)".into(),
            )),
        };
    }
    match requested {
        Some("unconfined") => Ok(None),
        Some(name) if loaded(name) => Ok(Some(name.to_owned())),
        Some(name) => Err(bad(
            name,
            format!("no such profile is loaded (see {PROFILES}; load it with apparmor_parser)"),
        )),
        None => {
            if !loaded(DEFAULT_PROFILE) {
                load_default()?;
            }
            Ok(Some(DEFAULT_PROFILE.to_owned()))
        }
    }
}

/// Loads (or replaces) Bulkhead's default profile with `apparmor_parser`.
fn load_default() -> Result<(), SandboxError> {
    let dir = std::env::temp_dir().join(format!("bulkhead-apparmor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Io {
        action: "write the default AppArmor profile".into(),
        source,
    })?;
    let file = dir.join(DEFAULT_PROFILE);
    let result = std::fs::write(&file, DEFAULT_TEXT)
        .map_err(|source| SandboxError::Io {
            action: "write the default AppArmor profile".into(),
            source,
        })
        .and_then(|()| {
            let out = Command::new("apparmor_parser")
                .args(["--replace", "--skip-cache"])
                .arg(&file)
                .output()
                .map_err(|source| SandboxError::Io {
                    action: "run apparmor_parser (apt-get install apparmor)".into(),
                    source,
                })?;
            if out.status.success() {
                Ok(())
            } else {
                Err(SandboxError::Setup {
                    message: format!(
                        "apparmor_parser refused the default profile: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                })
            }
        });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Asks the kernel to move this process into `profile` when it next executes a program (the
/// `exec` attribute, apparmor(7)). Makes system calls only.
pub fn change_on_exec(profile: &std::ffi::CStr) -> Result<(), String> {
    use std::io::Write as _;
    let text = [b"exec ", profile.to_bytes()].concat();
    // The LSM-specific file on kernels that stack LSMs (5.1), the shared one before.
    for path in ["/proc/self/attr/apparmor/exec", "/proc/self/attr/exec"] {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) {
            return f
                .write_all(&text)
                .map_err(|e| format!("enter the AppArmor profile on exec: {e}"));
        }
    }
    Err("enter the AppArmor profile on exec: no /proc/self/attr/exec".into())
}
