//! Which devices a sandbox may use: docker's default list, plus `--device`.
//!
//! On cgroup v1 the devices controller takes the rules as text (`devices.deny`,
//! `devices.allow`); on cgroup v2 the datapath's cgroup device program is attached to the
//! sandbox's cgroup and reads them from the `DEVICES` map (the default list is written there
//! by `up`, a sandbox's own rules under its cgroup's id). Either way, a device node the
//! sandbox creates with mknod cannot be opened unless a rule allows it.

use std::{os::unix::fs::FileTypeExt as _, path::PathBuf, str::FromStr};

use dataplane_common::{DeviceKey, device_access, device_kind};

use super::{SandboxError, cgroup::Placement};
use crate::{
    loader::{DEFAULT_DEVICES, DeviceRules},
    node::Paths,
};

/// A host device given to a sandbox: `--device /dev/X[:/dev/Y][:rwm]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Device {
    pub host: PathBuf,
    /// Its name inside the sandbox's /dev.
    pub name: String,
    /// A `device_kind` constant.
    pub kind: u8,
    pub major: u32,
    pub minor: u32,
    /// `device_access` bits.
    pub access: u32,
}

impl FromStr for Device {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let bad = |why: &str| SandboxError::BadValue {
            what: "device",
            value: s.to_owned(),
            why: why.into(),
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (host, inside, perms) = match parts.as_slice() {
            [h] => (*h, *h, "rwm"),
            [h, p] if !p.starts_with('/') => (*h, *h, *p),
            [h, i] => (*h, *i, "rwm"),
            [h, i, p] => (*h, *i, *p),
            _ => return Err(bad("expected /dev/HOST[:/dev/NAME][:rwm]")),
        };
        let meta = std::fs::metadata(host).map_err(|e| bad(&e.to_string()))?;
        let kind = if meta.file_type().is_char_device() {
            device_kind::CHAR
        } else if meta.file_type().is_block_device() {
            device_kind::BLOCK
        } else {
            return Err(bad("not a device node"));
        };
        let name = inside
            .strip_prefix("/dev/")
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            .ok_or_else(|| bad("the sandbox's path must be /dev/NAME"))?;
        if perms.is_empty() || !perms.chars().all(|c| "rwm".contains(c)) {
            return Err(bad("permissions are letters of rwm"));
        }
        let access = perms.chars().fold(0, |a, c| {
            a | match c {
                'r' => device_access::READ,
                'w' => device_access::WRITE,
                _ => device_access::MKNOD,
            }
        });
        use std::os::unix::fs::MetadataExt as _;
        Ok(Device {
            host: PathBuf::from(host),
            name: name.to_owned(),
            kind,
            major: libc::major(meta.rdev()),
            minor: libc::minor(meta.rdev()),
            access,
        })
    }
}

/// v1's text form of a rule: `c 1:3 rwm`, `b *:* m`.
fn v1_rule(kind: u8, major: u32, minor: u32, access: u32) -> String {
    let number = |n: u32| {
        if n == DeviceKey::ANY {
            "*".to_owned()
        } else {
            n.to_string()
        }
    };
    let mut perms = String::new();
    for (bit, c) in [
        (device_access::READ, 'r'),
        (device_access::WRITE, 'w'),
        (device_access::MKNOD, 'm'),
    ] {
        if access & bit != 0 {
            perms.push(c);
        }
    }
    format!(
        "{} {}:{} {perms}",
        if kind == device_kind::BLOCK { 'b' } else { 'c' },
        number(major),
        number(minor)
    )
}

/// Restricts the sandbox in `placement` to docker's default devices and `extra`.
pub fn restrict(
    paths: &Paths,
    placement: &Placement,
    extra: &[Device],
) -> Result<(), SandboxError> {
    let io = |action: &str| {
        let action = action.to_owned();
        move |e: std::io::Error| SandboxError::Io { action, source: e }
    };
    if placement.v2 {
        let dir = placement
            .dirs()
            .into_iter()
            .next()
            .ok_or_else(|| SandboxError::Setup {
                message: "the sandbox's cgroup has no directory".into(),
            })?;
        let cgroup_id = cgroup_id(&dir).map_err(io("read the cgroup's id"))?;
        let mut rules = DeviceRules::open(&paths.bpffs).map_err(loader_err)?;
        for d in extra {
            rules
                .allow(
                    DeviceKey::new(cgroup_id, d.kind, d.major, d.minor),
                    d.access,
                )
                .map_err(loader_err)?;
        }
        return rules.attach(&dir).map_err(loader_err);
    }
    let Some(dir) = placement.controller_dir("devices") else {
        return Err(SandboxError::Setup {
            message: "no devices controller in this cgroup v1 hierarchy".into(),
        });
    };
    std::fs::write(dir.join("devices.deny"), "a").map_err(io("deny every device"))?;
    let defaults = DEFAULT_DEVICES.iter().copied();
    let extras = extra.iter().map(|d| (d.kind, d.major, d.minor, d.access));
    for (kind, major, minor, access) in defaults.chain(extras) {
        let rule = v1_rule(kind, major, minor, access);
        std::fs::write(dir.join("devices.allow"), &rule)
            .map_err(io(&format!("allow device {rule}")))?;
    }
    Ok(())
}

/// Forgets a sandbox's own device rules (v2; v1's go with its cgroup).
pub fn forget(paths: &Paths, placement: &Placement) {
    if !placement.v2 {
        return;
    }
    if let (Some(dir), Ok(mut rules)) = (
        placement.dirs().into_iter().next(),
        DeviceRules::open(&paths.bpffs),
    ) && let Ok(id) = cgroup_id(&dir)
    {
        rules.forget(id);
    }
}

/// A cgroup v2 directory's id, as `bpf_get_current_cgroup_id` reports it: its inode number.
fn cgroup_id(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).map(|m| m.ino())
}

fn loader_err(e: crate::loader::LoaderError) -> SandboxError {
    SandboxError::Setup {
        message: format!("device control: {}", super::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options_parse_and_rules_print_as_v1_takes_them() {
        let d: Device = "/dev/null:rw".parse().unwrap();
        assert_eq!(
            (d.kind, d.major, d.minor, d.name.as_str()),
            (device_kind::CHAR, 1, 3, "null")
        );
        assert_eq!(d.access, device_access::READ | device_access::WRITE);
        let d: Device = "/dev/zero:/dev/nothing".parse().unwrap();
        assert_eq!((d.name.as_str(), d.access), ("nothing", 7));
        for bad in [
            "/dev/nonexistent-x",
            "/etc/passwd",
            "/dev/null:/tmp/x",
            "/dev/null:rx",
        ] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert_eq!(v1_rule(device_kind::CHAR, 1, 3, 7), "c 1:3 rwm");
        assert_eq!(
            v1_rule(device_kind::BLOCK, DeviceKey::ANY, DeviceKey::ANY, 1),
            "b *:* m"
        );
    }
}
