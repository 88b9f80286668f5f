//! `bulkhead-init`, black-box: the built static binary, real processes, real signals, real PID
//! namespaces and a real pseudo-terminal.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use tests::TempDir;

fn init_bin() -> Option<PathBuf> {
    std::env::var_os("BULKHEAD_INIT_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// Prints why an init test cannot run here and returns true.
fn skip_init(test: &str) -> bool {
    if init_bin().is_none() {
        eprintln!(
            "SKIP {test}: BULKHEAD_INIT_BIN is not set; run the tests through `cargo xtask test`"
        );
        return true;
    }
    false
}

fn init() -> Command {
    tests::command(init_bin().expect("BULKHEAD_INIT_BIN"))
}

fn run(args: &[&str]) -> Output {
    init().args(args).output().expect("run bulkhead-init")
}

fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("bulkhead-init itself died: {:?}", out.status))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts `bulkhead-init ARGS -- sh -c SCRIPT` and waits for the script's `ready` line.
fn start(args: &[&str], script: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = init()
        .args(args)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulkhead-init");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("read the script's first line");
    assert_eq!(line.trim(), "ready", "script did not start");
    (child, out)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with a pid we started and a valid signal number.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

/// Waits up to `limit` for `child`; kills it and panics if it is still running.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bulkhead-init still running after {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills init and the program it runs (killing init alone would orphan the program).
fn kill_all(child: &mut Child) {
    for pid in children_of(child.id()) {
        // SAFETY: the program's process group (it leads its own), then init itself.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A shell loop that keeps running until a trap ends it, checking often.
const SPIN: &str = "while :; do sleep 0.02; done";

#[test]
fn is_static() {
    if skip_init("is_static") {
        return;
    }
    let out = tests::command("ldd")
        .arg(init_bin().unwrap())
        .output()
        .expect("run ldd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("not a dynamic executable"),
        "ldd says: {text}"
    );
}

#[test]
fn exit_status_is_propagated() {
    if skip_init("exit_status_is_propagated") {
        return;
    }
    for (script, want) in [
        ("exit 0", 0),
        ("exit 42", 42),
        ("exit 255", 255),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
    ] {
        assert_eq!(
            code(&run(&["-s", "--", "sh", "-c", script])),
            want,
            "{script}"
        );
    }
}

#[test]
fn exit_codes_can_be_remapped_to_zero() {
    if skip_init("exit_codes_can_be_remapped_to_zero") {
        return;
    }
    assert_eq!(
        code(&run(&["-s", "-e", "42", "--", "sh", "-c", "exit 42"])),
        0
    );
    assert_eq!(
        code(&run(&[
            "-s",
            "-e",
            "3",
            "-e",
            "143",
            "--",
            "sh",
            "-c",
            "kill -TERM $$"
        ])),
        0
    );
    assert_eq!(code(&run(&["-s", "-e42", "--", "sh", "-c", "exit 41"])), 41);
}

#[test]
fn errors_exit_as_tini_does() {
    if skip_init("errors_exit_as_tini_does") {
        return;
    }
    let dir = TempDir::new("bhi");
    let not_exec = dir.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let not_exec = not_exec.to_str().unwrap();
    let cases: [(&[&str], i32, &str); 9] = [
        (&[], 1, "Usage:"),
        (&["-s"], 1, "Usage:"),
        (
            &["-s", "--", "/nonexistent/program"],
            127,
            "exec /nonexistent/program failed: No such file or directory",
        ),
        (&["-s", "--", not_exec], 126, "Permission denied"),
        (&["-x", "--", "true"], 1, "invalid option -- 'x'"),
        (
            &["--frobnicate", "--", "true"],
            1,
            "unrecognized option '--frobnicate'",
        ),
        (
            &["-p", "SIGFOO", "--", "true"],
            1,
            "Not a valid option for -p: SIGFOO",
        ),
        (
            &["-e", "256", "--", "true"],
            1,
            "Not a valid option for -e: 256",
        ),
        (&["-p"], 1, "option requires an argument -- 'p'"),
    ];
    for (args, want, message) in cases {
        let out = run(args);
        assert_eq!(code(&out), want, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(message),
            "{args:?}: expected {message:?} in {}",
            stderr(&out)
        );
    }
    // Help, version and license go to stdout and succeed.
    for (args, text) in [
        (&["-h"][..], "Usage:"),
        (&["--version"][..], "bulkhead-init version"),
        (&["-l"][..], "license"),
    ] {
        let out = run(args);
        assert_eq!(code(&out), 0, "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(text),
            "{args:?}"
        );
    }
}

#[test]
fn warns_unless_pid1_or_subreaper() {
    if skip_init("warns_unless_pid1_or_subreaper") {
        return;
    }
    let warning = "not running as PID 1";
    assert!(stderr(&run(&["--", "true"])).contains(warning));
    assert!(!stderr(&run(&["-s", "--", "true"])).contains(warning));
    let out = init()
        .args(["--", "true"])
        .env("TINI_SUBREAPER", "1")
        .output()
        .unwrap();
    assert!(
        !stderr(&out).contains(warning),
        "TINI_SUBREAPER did not register a subreaper"
    );
    let quiet = init()
        .args(["--", "true"])
        .env("TINI_VERBOSITY", "0")
        .output()
        .unwrap();
    assert_eq!(
        stderr(&quiet),
        "",
        "TINI_VERBOSITY=0 should silence warnings"
    );
}

#[test]
fn every_catchable_signal_is_forwarded() {
    if skip_init("every_catchable_signal_is_forwarded") {
        return;
    }
    // Each signal ends the program through its trap with a code naming it.
    let signals = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("PIPE", libc::SIGPIPE),
        ("ALRM", libc::SIGALRM),
        ("TERM", libc::SIGTERM),
        ("WINCH", libc::SIGWINCH),
        ("URG", libc::SIGURG),
        ("CONT", libc::SIGCONT),
    ];
    for (name, sig) in signals {
        let script = format!("trap 'exit {}' {name}; echo ready; {SPIN}", 100 + sig);
        let (mut child, _out) = start(&["-s"], &script);
        signal(child.id(), sig);
        let status = wait_within(
            &mut child,
            Duration::from_secs(5),
            &format!("SIG{name} was sent"),
        );
        assert_eq!(
            status.code(),
            Some(100 + sig),
            "SIG{name} was not forwarded"
        );
    }
}

#[test]
fn signals_reach_the_process_group_with_g() {
    if skip_init("signals_reach_the_process_group_with_g") {
        return;
    }
    let dir = TempDir::new("bhi");
    let marker = dir.path().join("grandchild-got-usr1");
    // The program ignores USR1; its background grandchild (same group) records it.
    let script = format!(
        "(trap 'touch {m}; exit 0' USR1; {SPIN}) & trap '' USR1; sleep 0.1; echo ready; {SPIN}",
        m = marker.display()
    );
    for (args, env, reaches) in [
        (&["-s"][..], None, false),
        (&["-s", "-g"][..], None, true),
        (&["-s"][..], Some("1"), true),
    ] {
        let _ = std::fs::remove_file(&marker);
        let mut cmd = init();
        cmd.args(args)
            .args(["--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(v) = env {
            cmd.env("TINI_KILL_PROCESS_GROUP", v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        signal(child.id(), libc::SIGUSR1);
        assert_eq!(
            wait_for_file(&marker, Duration::from_millis(700)),
            reaches,
            "{args:?} env {env:?}"
        );
        kill_all(&mut child);
    }
}

#[test]
fn parent_death_signal_is_delivered_and_forwarded() {
    if skip_init("parent_death_signal_is_delivered_and_forwarded") {
        return;
    }
    let dir = TempDir::new("bhi");
    let marker = dir.path().join("got-usr1");
    let init = init_bin().unwrap();
    // A parent shell starts init in the background and exits at once: init gets USR1 (-p),
    // forwards it, and the program records it.
    let script = format!(
        "{init} -s -p SIGUSR1 -- sh -c \"trap 'touch {m}; exit 0' USR1; {SPIN}\" >/dev/null 2>&1 & sleep 0.2; exit 0",
        init = init.display(),
        m = marker.display()
    );
    let status = tests::command("sh").args(["-c", &script]).status().unwrap();
    assert!(status.success());
    assert!(
        wait_for_file(&marker, Duration::from_secs(3)),
        "the parent death signal did not reach the program"
    );
}

/// Counts zombies among the processes whose parent is `$P`, from inside a script.
const COUNT_ZOMBIES: &str = "Z=0; for f in /proc/[0-9]*/stat; do s=$(cat $f 2>/dev/null) || continue; set -- ${s##*) }; \
[ \"$1\" = Z ] && [ \"$2\" = \"$P\" ] && Z=$((Z+1)); done";

#[test]
fn reaps_orphans_as_pid1_in_a_pid_namespace() {
    if skip_init("reaps_orphans_as_pid1_in_a_pid_namespace") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP reaps_orphans_as_pid1_in_a_pid_namespace: needs root for a PID namespace");
        return;
    }
    // 50 orphans exit at once; init (PID 1 here) must reap them all. Exit 100 + zombies left.
    let script = format!(
        "[ $PPID = 1 ] || exit 99; P=1; for i in $(seq 50); do (true &); done; sleep 0.5; {COUNT_ZOMBIES}; exit $((100 + Z))"
    );
    let out = tests::command("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(init_bin().unwrap())
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(code(&out), 100, "zombies left as PID 1: {}", stderr(&out));
}

#[test]
fn reaps_orphans_as_subreaper_and_warns_with_w() {
    if skip_init("reaps_orphans_as_subreaper_and_warns_with_w") {
        return;
    }
    let script = format!(
        "P=$PPID; for i in $(seq 30); do (true &); done; sleep 0.5; {COUNT_ZOMBIES}; exit $((100 + Z))"
    );
    let out = run(&["-s", "-w", "--", "sh", "-c", &script]);
    assert_eq!(
        code(&out),
        100,
        "zombies left as subreaper: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Reaped zombie process with pid="),
        "-w printed no warning"
    );
    // Without a subreaper the orphans go elsewhere: none are ours to reap, none left as ours.
    let verbose = run(&["-s", "-vv", "--", "true"]);
    assert!(String::from_utf8_lossy(&verbose.stdout).contains("Spawned child process 'true'"));
}

#[test]
fn zombie_storm_and_signal_burst_keep_the_exit_status() {
    if skip_init("zombie_storm_and_signal_burst_keep_the_exit_status") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP zombie_storm_and_signal_burst_keep_the_exit_status: needs root for a PID namespace"
        );
        return;
    }
    // 3000 orphans, while 2000 signals hit init; the program's own status must survive.
    let script = format!(
        "trap '' USR1 USR2; echo ready; P=1; i=0; while [ $i -lt 3000 ]; do (true &); i=$((i+1)); done; sleep 1; {COUNT_ZOMBIES}; exit $((42 + Z))"
    );
    let mut child = tests::command("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(init_bin().unwrap())
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Find init (unshare's child) and flood it.
    let init_pid = children_of(child.id())
        .into_iter()
        .next()
        .expect("init under unshare");
    for i in 0..2000 {
        let sig = if i % 2 == 0 {
            libc::SIGUSR1
        } else {
            libc::SIGUSR2
        };
        // SAFETY: signalling the init we started.
        unsafe { libc::kill(init_pid, sig) };
    }
    let status = wait_within(
        &mut child,
        Duration::from_mins(1),
        "the zombie storm under a burst of signals",
    );
    assert_eq!(
        status.code(),
        Some(42),
        "exit status lost or zombies left (42 + zombies)"
    );
}

fn children_of(pid: u32) -> Vec<i32> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn wait_all_lets_the_tree_finish_then_kills_what_is_left() {
    if skip_init("wait_all_lets_the_tree_finish_then_kills_what_is_left") {
        return;
    }
    let dir = TempDir::new("bhi");
    let marker = dir.path().join("finished");
    // A background job that ignores SIGTERM and needs 0.5 s to finish its work. It is started
    // with SIGTERM already ignored (inherited from the shell, which takes its own trap back):
    // a trap set inside the job could come after --wait-all's SIGTERM, and the job would die.
    let job = format!(
        "trap '' TERM; (sleep 0.5; touch {}) & trap - TERM; exit 0",
        marker.display()
    );
    let out = run(&["-s", "--", "sh", "-c", &job]);
    assert_eq!(code(&out), 0);
    assert!(
        !marker.exists(),
        "without --wait-all the group should be killed when the program exits"
    );

    let out = run(&["-s", "--wait-all=5", "--", "sh", "-c", &job]);
    assert_eq!(code(&out), 0);
    assert!(marker.exists(), "--wait-all did not let the job finish");

    // A job that never finishes is killed when the time is up.
    let started = Instant::now();
    let out = run(&[
        "-s",
        "--wait-all=1",
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 30 & trap - TERM; exit 7",
    ]);
    assert_eq!(code(&out), 7);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

#[test]
fn forward_all_reaches_daemons_outside_the_group() {
    if skip_init("forward_all_reaches_daemons_outside_the_group") {
        return;
    }
    let dir = TempDir::new("bhi");
    let marker = dir.path().join("daemon-got-usr1");
    // A daemon in its own session (so outside the program's group) records USR1.
    let script = format!(
        "setsid sh -c \"trap 'touch {m}; exit 0' USR1; {SPIN}\" & trap '' USR1; sleep 0.2; echo ready; {SPIN}",
        m = marker.display()
    );
    for (args, reaches) in [
        (&["-s", "-g"][..], false),
        (&["-s", "--forward-all"][..], true),
    ] {
        let _ = std::fs::remove_file(&marker);
        let (mut child, _out) = start(args, &script);
        signal(child.id(), libc::SIGUSR1);
        assert_eq!(
            wait_for_file(&marker, Duration::from_millis(700)),
            reaches,
            "{args:?}"
        );
        kill_all(&mut child);
    }
    // The daemon left the group on purpose; end it by what it runs.
    let _ = tests::command("pkill")
        .args(["-f", &marker.display().to_string()])
        .status();
}

#[test]
fn grace_period_kills_a_program_that_ignores_sigterm() {
    if skip_init("grace_period_kills_a_program_that_ignores_sigterm") {
        return;
    }
    let script = format!("trap '' TERM; echo ready; {SPIN}");
    let (mut child, _out) = start(&["-s", "--grace-period", "1"], &script);
    let started = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let status = wait_within(
        &mut child,
        Duration::from_secs(5),
        "SIGTERM to a program that ignores it, grace period 1 s",
    );
    assert_eq!(
        status.code(),
        Some(137),
        "expected SIGKILL after the grace period"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Without it, SIGTERM alone does not stop the program.
    let (mut child, _out) = start(&["-s"], &script);
    signal(child.id(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "stopped without a grace period"
    );
    kill_all(&mut child);
}

#[test]
fn rewrite_forwards_one_signal_as_another() {
    if skip_init("rewrite_forwards_one_signal_as_another") {
        return;
    }
    let script = format!("trap 'exit 3' QUIT; trap 'exit 15' TERM; echo ready; {SPIN}");
    let (mut child, _out) = start(&["-s", "--rewrite", "TERM:QUIT"], &script);
    signal(child.id(), libc::SIGTERM);
    assert_eq!(
        wait_within(&mut child, Duration::from_secs(5), "a rewritten signal").code(),
        Some(3)
    );
    let (mut child, _out) = start(&["-s", "--rewrite=SIGUSR1:15"], &script);
    signal(child.id(), libc::SIGUSR1);
    assert_eq!(
        wait_within(&mut child, Duration::from_secs(5), "a rewritten signal").code(),
        Some(15)
    );
    let out = run(&["--rewrite", "TERM", "--", "true"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("FROM:TO"));
}

#[test]
fn setsid_runs_the_program_in_a_new_session() {
    if skip_init("setsid_runs_the_program_in_a_new_session") {
        return;
    }
    // Field 6 of /proc/PID/stat is the session id: equal to the pid for a session leader.
    let script = "set -- $(cut -d' ' -f6 /proc/$$/stat); [ \"$1\" = $$ ] && exit 10 || exit 20";
    assert_eq!(
        code(&run(&["-s", "--setsid", "--", "sh", "-c", script])),
        10
    );
    assert_eq!(code(&run(&["-s", "--", "sh", "-c", script])), 20);
}

#[test]
fn with_a_terminal_the_program_gets_the_foreground_and_ctrl_c() {
    if skip_init("with_a_terminal_the_program_gets_the_foreground_and_ctrl_c") {
        return;
    }
    let (mut master, slave) = openpty();
    // The program checks it is the terminal's foreground group (stat fields 5 and 8), then
    // waits for Ctrl-C.
    let script = "set -- $(cut -d' ' -f5,8 /proc/$$/stat); [ \"$1\" = \"$2\" ] && echo foreground || echo background; \
trap 'echo interrupted; exit 0' INT; echo ready; while :; do sleep 0.02; done";
    let stdio = |fd: i32| {
        // SAFETY: dup of the slave descriptor we own.
        Stdio::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(libc::dup(fd)) })
    };
    use std::os::fd::FromRawFd;
    let mut cmd = init();
    cmd.args(["-s", "--", "sh", "-c", script])
        .stdin(stdio(slave))
        .stdout(stdio(slave))
        .stderr(stdio(slave));
    // SAFETY: in the forked child only: a new session whose controlling terminal is the pty.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start bulkhead-init on a pty");
    // Only the child may hold the slave now, or the master never sees the other end close.
    drop(cmd);
    // SAFETY: closing our copy of the slave; the child holds its own.
    unsafe { libc::close(slave) };
    let mut seen = String::new();
    let until = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while !seen.contains("ready") && Instant::now() < until {
        let n = master.read(&mut buf).unwrap_or(0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains("foreground"),
        "the program is not in the foreground: {seen:?}"
    );
    master.write_all(&[0x03]).unwrap();
    let status = wait_within(
        &mut child,
        Duration::from_secs(5),
        "Ctrl-C (SIGINT) on the terminal",
    );
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains("interrupted"),
        "Ctrl-C did not reach the program: {seen:?}"
    );
    assert_eq!(status.code(), Some(0), "{status:?} {:?}", status.signal());
}

/// A pseudo-terminal pair: the master as a file, the slave as a raw descriptor.
fn openpty() -> (std::fs::File, i32) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the locals; null name/termios/winsize are
    // allowed.
    let r = unsafe {
        libc::openpty(
            &raw mut master,
            &raw mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty failed");
    // SAFETY: `master` is a descriptor we own from here on.
    let file = unsafe { std::fs::File::from_raw_fd(master) };
    // Reads must not block forever once the program has gone.
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let flags = libc::fcntl(master, libc::F_GETFL);
        libc::fcntl(master, libc::F_SETFL, flags);
    }
    (file, slave)
}
