//! `bulkhead-syscall NAME...`: makes each named system call with harmless arguments and prints
//! `NAME ok` or `NAME errno N`, so tests can see what a sandbox's seccomp filter and
//! capabilities allow. `reboot` passes invalid magic numbers: allowed, it fails with EINVAL;
//! it can never reboot.

fn main() {
    for name in std::env::args().skip(1) {
        // SAFETY: each call passes valid pointers (or none) and arguments that change nothing
        // outside this process: a keyring lookup, a user namespace for this process only, a
        // tmpfs mount in a scratch directory of its own mount namespace, a reboot with invalid
        // magic numbers.
        let r = unsafe {
            match name.as_str() {
                // KEYCTL_GET_KEYRING_ID of the session keyring, not creating it.
                "keyctl" => libc::syscall(libc::SYS_keyctl, 0, -3i64, 0) as i32,
                "unshare-user" => libc::unshare(libc::CLONE_NEWUSER),
                "mount" => libc::mount(
                    c"none".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ),
                "reboot" => libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) as i32,
                "uname" => {
                    let mut u: libc::utsname = std::mem::zeroed();
                    libc::uname(&raw mut u)
                }
                "getpid" => i32::from(libc::getpid() <= 0),
                other => {
                    eprintln!("unknown call {other}");
                    std::process::exit(2);
                }
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            println!("{name} errno {e}");
        } else {
            println!("{name} ok");
        }
    }
}
