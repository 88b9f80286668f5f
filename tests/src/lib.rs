//! Test support: real network-namespace topologies that clean up after themselves.
//!
//! Every resource is an RAII guard ([`Netns`], [`BpffsDir`], [`Node`]) removed on drop, so a
//! panicking test leaves nothing behind. Names are unique per process and call, so tests can run
//! next to each other. Nothing here touches the caller's own network namespace: a [`Node`] is a
//! namespace of its own holding the bridge, and pods and external peers hang off it.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

pub mod engines;
pub mod packet;

/// iproute2, by full path: busybox images shadow `ip` with an applet.
pub const IP: &str = "/usr/sbin/ip";

/// A command whose process starts with every signal at its default action and none blocked,
/// whatever this test process inherited: nohup, or a shell's background job without job
/// control, leaves SIGHUP, SIGINT and SIGQUIT ignored, ignored dispositions survive exec, and a
/// non-interactive shell cannot even trap a signal that was ignored when it started.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs between fork and exec and only makes rt_sigaction(2) and
    // sigprocmask(2) calls, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            bulkhead::sandbox::process::default_signals();
            Ok(())
        });
    }
    cmd
}

/// Returns why a test that needs root and the built binaries cannot run here, if it cannot.
/// The test prints the reason and returns: it never passes silently.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into());
    }
    if bulkhead_bin().is_none() {
        return Some("BULKHEAD_BIN is not set; run the tests through `cargo xtask test`".into());
    }
    if !Path::new(IP).is_file() {
        return Some(format!(
            "{IP} (iproute2) is missing; `cargo xtask setup` installs it"
        ));
    }
    None
}

/// Prints a skip line and returns true when the test cannot run here.
#[must_use]
pub fn skip(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("SKIP {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Runs `cmd` with `stdin` written to its standard input; its output, whatever its status.
pub fn output_with_stdin(cmd: &mut Command, stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    // A child that exits without reading its input closes the pipe; that is its answer.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes());
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// The `bulkhead` binary built by `cargo xtask build`.
pub fn bulkhead_bin() -> Option<PathBuf> {
    std::env::var_os("BULKHEAD_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// A name unique to this process and call, at most 15 bytes (the interface name limit) for a
/// prefix of up to 3 bytes.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{:x}x{n:x}", std::process::id());
    assert!(name.len() <= 15, "name {name} is longer than IFNAMSIZ-1");
    name
}

/// Runs a command and panics with its stderr when it fails.
pub fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert_ok(program, args, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok<S: AsRef<OsStr>>(program: &str, args: &[S], out: &Output) {
    if !out.status.success() {
        let args: Vec<_> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        panic!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A named network namespace (`ip netns add`), deleted on drop with every interface in it.
///
/// IPv6 is off inside, so router solicitations and MLD reports do not add packets that tests
/// would have to account for.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run_ok(IP, &["netns", "add", &name]);
        let ns = Netns { name };
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NS ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ok(IP, &full)
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, name: &str, value: &str) {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || fs::write(&path, value).unwrap_or_else(|e| panic!("set {path}: {e}")));
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates stay in the
    /// namespace and can be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file =
            fs::File::open(self.path()).unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> String {
        let path = format!("/sys/class/net/{ifname}/address");
        // /sys shows the namespace of whoever mounted it, so ask through the namespace instead.
        let out = Command::new(IP)
            .args(["netns", "exec", &self.name, "cat", &path])
            .output()
            .expect("run ip netns exec");
        assert_ok(IP, &["netns", "exec", &self.name, "cat", &path], &out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(IP).args(["netns", "del", &self.name]).output();
    }
}

/// A private bpffs mount for one test's pins, unmounted and removed on drop.
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique_name("bpf"));
        fs::create_dir_all(&path).expect("create the bpffs mount point");
        nix::mount::mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs for the test");
        BpffsDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the pinned objects left at the top of the directory (the kernel's own
    /// `maps.debug`/`progs.debug` iterators excluded).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = fs::read_dir(&self.path)
            .expect("list the pin directory")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                std::path::Path::new(n)
                    .extension()
                    .is_none_or(|e| e != "debug")
            })
            .collect();
        left.sort();
        left
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(prefix));
        fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A sandbox-like namespace plugged into the node's bridge through a veth pair.
pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The host side of the veth, in the node's namespace.
    pub host_if: String,
}

impl Pod {
    /// Sends `count` datagrams of `payload` to `dst` from a socket bound in this pod.
    pub fn send_udp(&self, dst: SocketAddrV4, payload: &[u8], count: usize) {
        let payload = payload.to_vec();
        self.ns.run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket");
            for _ in 0..count {
                sock.send_to(&payload, dst).expect("send a datagram");
            }
        });
    }

    /// A UDP socket bound in this pod, with a receive timeout.
    pub fn udp_socket(&self, port: u16) -> UdpSocket {
        self.ns.run(move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind a UDP socket");
            sock.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("set a read timeout");
            sock
        })
    }
}

impl Pod {
    /// A TCP server on `port` answering each line it reads with `ADDR:PORT\n` of itself.
    pub fn serve_tcp(&self, port: u16) -> Server {
        self.tcp_server(port, Answer::Itself)
    }

    /// A TCP server on `port` answering each line with the client's `ADDR:PORT` as it sees it.
    pub fn serve_tcp_peer(&self, port: u16) -> Server {
        self.tcp_server(port, Answer::Peer)
    }

    /// A TCP server on `port` answering one line with its own address, then closing first (so
    /// the `TIME_WAIT` is the server's and the client may reuse its port at once).
    pub fn serve_tcp_once(&self, port: u16) -> Server {
        self.tcp_server(port, Answer::ItselfOnce)
    }

    fn tcp_server(&self, port: u16, answer: Answer) -> Server {
        let me = SocketAddrV4::new(self.addr, port);
        let listener = self
            .ns
            .run(move || TcpListener::bind(me).expect("bind the test TCP server"));
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        Server::spawn(move |stop| {
            let mut handlers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let stop = stop.clone();
                        let text = match answer {
                            Answer::Itself | Answer::ItselfOnce => me.to_string(),
                            Answer::Peer => peer.to_string(),
                        };
                        let once = matches!(answer, Answer::ItselfOnce);
                        handlers.push(std::thread::spawn(move || {
                            answer_lines(conn, text, once, &stop);
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept on {me}: {e}"),
                }
            }
            for h in handlers {
                drop(h.join());
            }
        })
    }

    /// A UDP server on `port` answering every datagram with `ADDR:PORT` of itself.
    pub fn serve_udp(&self, port: u16) -> Server {
        let me = SocketAddrV4::new(self.addr, port);
        let sock = self
            .ns
            .run(move || UdpSocket::bind(me).expect("bind the test UDP server"));
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set a read timeout");
        Server::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(me.to_string().as_bytes(), from);
                }
            }
        })
    }

    /// Opens a TCP connection from this pod.
    pub fn tcp_connect(&self, dst: SocketAddrV4) -> TcpStream {
        self.tcp_connect_from(dst, 0)
    }

    /// Opens a TCP connection from this pod's `sport` (0: any).
    pub fn tcp_connect_from(&self, dst: SocketAddrV4, sport: u16) -> TcpStream {
        let stream = self
            .ns
            .run(move || {
                let sock = connect_from_port(sport, dst)?;
                Ok::<_, std::io::Error>(sock)
            })
            .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("set a read timeout");
        stream
    }

    /// One request on a fresh connection: which backend answered.
    pub fn tcp_request(&self, dst: SocketAddrV4) -> String {
        ask(&mut self.tcp_connect(dst))
    }

    /// A UDP socket of this pod bound to an ephemeral port.
    pub fn udp_client(&self) -> UdpSocket {
        let sock = self
            .ns
            .run(|| UdpSocket::bind("0.0.0.0:0").expect("bind a UDP client"));
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("set a read timeout");
        sock
    }
}

/// Connects a TCP socket bound to `sport` (`SO_REUSEADDR`, so tests can reuse it) to `dst`.
fn connect_from_port(sport: u16, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    if sport == 0 {
        return TcpStream::connect_timeout(&dst.into(), Duration::from_secs(3));
    }
    // SAFETY: plain socket(2)/setsockopt(2)/bind(2)/connect(2) on a descriptor we own; the
    // sockaddr structs are fully initialised and sized as passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let sin = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = sin(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(dst);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Sends a line on `stream` and returns the server's answer (its address).
pub fn ask(stream: &mut TcpStream) -> String {
    stream.write_all(b"?\n").expect("send a request");
    let mut line = String::new();
    BufReader::new(stream.try_clone().expect("clone the stream"))
        .read_line(&mut line)
        .expect("read the answer");
    line.trim().to_owned()
}

/// One request on a fresh connection to `to` from this thread's network namespace: whether
/// a line came back, `timeout` allowed for the connect and for the answer.
pub fn answers(to: SocketAddrV4, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to.into(), timeout) else {
        return false;
    };
    let mut line = String::new();
    s.set_read_timeout(Some(timeout)).is_ok()
        && s.write_all(b"?\n").is_ok()
        && BufReader::new(s).read_line(&mut line).is_ok()
        && !line.is_empty()
}

/// Sends one datagram to `dst` and returns (answer, where the answer came from).
pub fn udp_ask(sock: &UdpSocket, dst: SocketAddrV4) -> (String, SocketAddr) {
    sock.send_to(b"?", dst).expect("send a datagram");
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {dst}: {e}"));
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

#[derive(Clone, Copy)]
enum Answer {
    Itself,
    ItselfOnce,
    Peer,
}

fn answer_lines(conn: TcpStream, me: String, once: bool, stop: &AtomicBool) {
    conn.set_nonblocking(false)
        .expect("make the connection blocking");
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("set a read timeout");
    let mut writer = conn.try_clone().expect("clone the connection");
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{me}\n").as_bytes()).is_err() || once {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A server thread that stops (and is joined) when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Runs `body` on a thread until the server is dropped (it should return once the flag is
    /// set).
    pub fn spawn(body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Server {
            stop,
            thread: Some(std::thread::spawn(move || body(flag))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receives datagrams until `count` arrived or the timeout hits; returns how many arrived.
pub fn recv_count(sock: &UdpSocket, count: usize) -> usize {
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < count && sock.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    got
}

/// The node's address on its uplink, and the external host's.
pub const UPLINK_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const UPLINK_EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);

/// A node: its own network namespace holding the Bulkhead bridge, with pods attached.
///
/// `bulkhead up` runs on creation and `bulkhead down` on drop; the namespaces go with it.
pub struct Node {
    pub ns: Netns,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
    bpffs: BpffsDir,
    state: TempDir,
    /// Extra environment for every `bulkhead` call (e.g. `BULKHEAD_TC_MODE`).
    env: Vec<(String, String)>,
}

impl Node {
    /// A node whose bridge is the gateway 198.18.0.1/24 of its pods.
    pub fn new() -> Self {
        Self::with_env(&[])
    }

    pub fn with_env(env: &[(&str, &str)]) -> Self {
        let node = Node {
            ns: Netns::new("bhn"),
            bridge: unique_name("br"),
            gateway: Ipv4Addr::new(198, 18, 0, 1),
            pods: Vec::new(),
            bpffs: BpffsDir::new(),
            state: TempDir::new("bhs"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        node.bulkhead_ok(&[
            "up",
            "--bridge",
            &node.bridge,
            "--subnet",
            &format!("{}/24", node.gateway),
        ]);
        node
    }

    pub fn bpffs(&self) -> &BpffsDir {
        &self.bpffs
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The `bulkhead` command line against this node, to run or spawn.
    pub fn command(&self, args: &[&str]) -> Command {
        let bin = bulkhead_bin().expect("BULKHEAD_BIN names the built bulkhead");
        let mut cmd = command(&bin);
        cmd.arg("--netns")
            .arg(self.ns.path())
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(std::env::var_os("BULKHEAD_INIT_BIN").map(|init| ("BULKHEAD_INIT", init)));
        cmd
    }

    /// Runs the `bulkhead` binary against this node.
    pub fn bulkhead(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run bulkhead")
    }

    /// Runs `bulkhead ARGS`, panics unless it succeeds, returns its stdout.
    pub fn bulkhead_ok(&self, args: &[&str]) -> String {
        let out = self.bulkhead(args);
        assert_ok("bulkhead", args, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bulkhead stats --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.bulkhead_ok(&["stats", "--json"])).expect("stats --json is JSON")
    }

    /// Packets and bytes counted on `ifname` at `hook` ("ingress" or "egress").
    pub fn counters(&self, ifname: &str, hook: &str) -> (u64, u64) {
        let stats = self.stats();
        stats["interfaces"]
            .as_array()
            .expect("interfaces is an array")
            .iter()
            .find(|s| s["ifname"] == ifname && s["direction"] == hook)
            .map_or((0, 0), |s| {
                (s["packets"].as_u64().unwrap(), s["bytes"].as_u64().unwrap())
            })
    }

    /// Plugs a new pod with address 198.18.0.`host` into the bridge, attaches the datapath to
    /// its veth and registers it as an endpoint (as `bulkhead run` will).
    pub fn add_pod(&mut self, host: u8) -> &Pod {
        let ns = Netns::new("bhp");
        let host_if = unique_name("vh");
        let addr = Ipv4Addr::new(198, 18, 0, host);
        self.ns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.ns
            .ip(&["link", "set", &host_if, "master", &self.bridge, "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &self.gateway.to_string()]);
        self.bulkhead_ok(&["attach", &host_if]);
        let mac = ns.mac("eth0");
        self.bulkhead_ok(&[
            "endpoint",
            "add",
            &addr.to_string(),
            "--dev",
            &host_if,
            "--mac",
            &mac,
        ]);
        self.pods.push(Pod { ns, addr, host_if });
        self.pods.last().expect("just pushed")
    }

    /// Adds an uplink: a veth from this node (198.18.200.1/24) to a new "external" namespace
    /// (198.18.200.2/24) that has no route to the pods, and brings the node up again with it.
    /// Returns the external host as a pod-like handle (`host_if` is the node's uplink).
    pub fn add_uplink(&mut self) -> Pod {
        let ns = Netns::new("bhx");
        let uplink = unique_name("up");
        self.ns.ip(&[
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.ns
            .ip(&["addr", "add", &format!("{UPLINK_NODE}/24"), "dev", &uplink]);
        self.ns.ip(&["link", "set", &uplink, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{UPLINK_EXTERNAL}/24"),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        self.bulkhead_ok(&["up", "--bridge", &self.bridge, "--uplink", &uplink]);
        Pod {
            ns,
            addr: UPLINK_EXTERNAL,
            host_if: uplink,
        }
    }

    /// Permanent ARP entries between every pod and the gateway, so no ARP traffic mixes with
    /// the packets a test counts.
    pub fn pin_neighbors(&self) {
        let gw_mac = self.ns.mac(&self.bridge);
        for pod in &self.pods {
            let mac = pod.ns.mac("eth0");
            self.ns.ip(&[
                "neigh",
                "replace",
                &pod.addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                &self.bridge,
                "nud",
                "permanent",
            ]);
            pod.ns.ip(&[
                "neigh",
                "replace",
                &self.gateway.to_string(),
                "lladdr",
                &gw_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            for other in self.pods.iter().filter(|o| o.addr != pod.addr) {
                let other_mac = other.ns.mac("eth0");
                pod.ns.ip(&[
                    "neigh",
                    "replace",
                    &other.addr.to_string(),
                    "lladdr",
                    &other_mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
            }
        }
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.bulkhead(&["down"]);
    }
}

/// A root filesystem of busybox alone (`/bin/busybox` and a relative link per applet), for
/// `bulkhead run --rootfs`; `None` where busybox is not installed (`cargo xtask setup`
/// installs busybox-static).
pub fn busybox_rootfs() -> Option<TempDir> {
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())?;
    let root = TempDir::new("bhroot");
    let bin = root.path().join("bin");
    fs::create_dir_all(&bin).ok()?;
    fs::copy(busybox, bin.join("busybox")).ok()?;
    let list = Command::new(busybox).arg("--list").output().ok()?;
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
    Some(root)
}
