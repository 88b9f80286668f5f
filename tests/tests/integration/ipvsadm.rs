//! `bulkhead ipvsadm`: ipvsadm's command line over the real datapath, with ipvsadm's output,
//! messages and exit codes (checked against ipvsadm 1.31's source and binary; the VM ring
//! compares it with the real ipvsadm over real IPVS).

use std::process::Command;

use tests::{Node, skip};

use crate::cluster::{Cluster, TCP_PORT, VIP};

/// Runs `bulkhead ipvsadm ARGS` against `node` with `stdin`; (exit code, stdout, stderr).
fn ipvsadm(node: &Node, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut all = vec!["ipvsadm"];
    all.extend_from_slice(args);
    finish(node.command(&all), stdin)
}

fn finish(mut cmd: Command, stdin: &str) -> (i32, String, String) {
    let out = tests::output_with_stdin(&mut cmd, stdin);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(node: &Node, args: &[&str]) -> String {
    let (code, out, err) = ipvsadm(node, args, "");
    assert_eq!(code, 0, "ipvsadm {args:?}: {err}");
    assert_eq!(err, "", "ipvsadm {args:?}");
    out
}

#[test]
fn ipvsadm_commands_drive_the_datapath_and_print_what_ipvsadm_prints() {
    if skip("ipvsadm_commands_drive_the_datapath_and_print_what_ipvsadm_prints") {
        return;
    }
    let c = Cluster::new(3);
    let n = &c.node;
    let svc = format!("{VIP}:80");
    let real = |host: u8| format!("198.18.0.{host}:{TCP_PORT}");
    ok(n, &["-A", "-t", &svc, "-s", "rr"]);
    ok(n, &["-a", "-t", &svc, "-r", &real(3), "-m"]);
    ok(n, &["-a", "-t", &svc, "-r", &real(4), "-m", "-w", "2"]);
    ok(n, &["-a", "-t", &svc, "-r", &real(5), "-m"]);

    // ipvsadm's listing, byte for byte (its lines end in padding).
    assert_eq!(
        ok(n, &["-Ln"]),
        "IP Virtual Server version 1.2.1 (size=262144)\n\
         Prot LocalAddress:Port Scheduler Flags\n\
         \x20 -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
         TCP  198.19.0.10:80 rr\n\
         \x20 -> 198.18.0.3:8080              Masq    1      0          0         \n\
         \x20 -> 198.18.0.4:8080              Masq    2      0          0         \n\
         \x20 -> 198.18.0.5:8080              Masq    1      0          0         \n"
    );

    // The service it made balances real connections: rr ignores the weight of 2.
    let seen = c.spread(std::net::SocketAddrV4::new(VIP, 80), 30);
    assert_eq!(seen.len(), 3, "{seen:?}");
    // An open connection is an ActiveConn of its backend, as IPVS counts it.
    let mut conn = c.client().tcp_connect(std::net::SocketAddrV4::new(VIP, 80));
    let pinned = tests::ask(&mut conn);
    let listing = ok(n, &["-L", "-n", "-t", &svc]);
    let line = listing
        .lines()
        .find(|l| l.contains(&pinned))
        .expect("the backend is listed");
    let active: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(active[4], "1", "{listing}");
    assert!(
        !listing.starts_with("IP Virtual Server"),
        "one service: no header"
    );
    // --stats splits the datapath's counters by direction, as IPVS's statistics do: the
    // client's packets in, the backends' replies out, and both add up to the listed totals.
    let listed = c.list();
    let stats = ok(n, &["-Ln", "--stats", "--exact"]);
    let line = stats
        .lines()
        .find(|l| l.starts_with("TCP  198.19.0.10:80"))
        .unwrap_or_else(|| panic!("{stats}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(2)
        .map(|w| w.parse().unwrap())
        .collect();
    let total = |field: &str| listed[0][field].as_u64().unwrap();
    assert_eq!(numbers[0], total("new_flows"), "{stats}");
    assert_eq!(numbers[1] + numbers[2], total("packets"), "{stats}");
    assert_eq!(numbers[3] + numbers[4], total("bytes"), "{stats}");
    assert!(numbers[1] > 0 && numbers[2] > 0, "both directions: {stats}");
    assert!(
        stats.starts_with(
            "IP Virtual Server version 1.2.1 (size=262144)\n\
             Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes\n\
             \x20 -> RemoteAddress:Port\n"
        ),
        "{stats}"
    );
    // --persistent-conn counts the clients an affinity pins (IPVS's templates): none here yet.
    assert!(
        ok(n, &["-Ln", "--persistent-conn"])
            .contains("  -> 198.18.0.3:8080              1         0           "),
    );
    // -Z starts the counters from zero (while the connection idles: no packet meanwhile).
    assert!(c.list()[0]["packets"].as_u64().unwrap() > 0);
    ok(n, &["-Z"]);
    assert_eq!(c.list()[0]["packets"], 0);
    drop(conn);

    // Edits send the whole service, as ipvsadm does.
    ok(
        n,
        &[
            "-E",
            "-t",
            &svc,
            "-s",
            "wrr",
            "-p",
            "60",
            "-M",
            "255.255.255.0",
        ],
    );
    ok(n, &["-e", "-t", &svc, "-r", &real(4), "-m", "-w", "5"]);
    ok(n, &["-d", "-t", &svc, "-r", &real(5)]);
    ok(n, &["-A", "-u", "198.19.0.11:53", "-p"]);
    ok(
        n,
        &[
            "-A",
            "-t",
            "198.19.0.12:80",
            "-s",
            "sh",
            "-b",
            "sh-port,sh-fallback",
        ],
    );
    assert!(ok(n, &["-Ln"]).contains("TCP  198.19.0.12:80 sh (sh-fallback,sh-port)\n"));
    assert!(ok(n, &["-S", "-n"]).contains("-A -t 198.19.0.12:80 -s sh -b sh-fallback,sh-port\n"));
    ok(n, &["-D", "-t", "198.19.0.12:80"]);
    let save = ok(n, &["-S", "-n"]);
    assert_eq!(
        save,
        "-A -t 198.19.0.10:80 -s wrr -p 60 -M 255.255.255.0\n\
         -a -t 198.19.0.10:80 -r 198.18.0.3:8080 -m -w 1\n\
         -a -t 198.19.0.10:80 -r 198.18.0.4:8080 -m -w 5\n\
         -A -u 198.19.0.11:53 -s wlc -p 360\n"
    );
    assert!(ok(n, &["-Ln"]).contains("TCP  198.19.0.10:80 wrr persistent 60 mask 255.255.255.0\n"));
    // With persistence, the client's next connection makes a template on its backend.
    let mut conn = c.client().tcp_connect(std::net::SocketAddrV4::new(VIP, 80));
    let pinned = tests::ask(&mut conn);
    drop(conn);
    let listing = ok(n, &["-Ln", "--persistent-conn"]);
    let line = listing
        .lines()
        .find(|l| l.contains(&pinned))
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(line.split_whitespace().nth(3), Some("1"), "{listing}");

    // Refusals word what IPVS says, exit as ipvsadm does, and change nothing.
    for (args, code, message) in [
        (
            vec!["-A", "-t", &svc, "-s", "rr"],
            255,
            "Service already exists\n",
        ),
        (
            vec!["-a", "-t", &svc, "-r", &real(3), "-m"],
            255,
            "Destination already exists\n",
        ),
        (
            vec!["-d", "-t", &svc, "-r", "198.18.0.9:8080"],
            255,
            "No such destination\n",
        ),
        (
            vec!["-a", "-t", "198.19.0.99:80", "-r", &real(3), "-m"],
            255,
            "Service not defined\n",
        ),
        (vec!["-D", "-t", "198.19.0.99:80"], 255, "No such service\n"),
        (
            vec!["-A", "-t", "198.19.0.12:80", "-s", "bogus"],
            255,
            "Scheduler or persistence engine not found\n",
        ),
        (
            vec!["-A", "-t", "198.19.0.12:80", "-w", "1"],
            2,
            "Illegal 'weight' option with the 'add-service' command\n",
        ),
        (
            vec!["-A", "-t", "198.19.0.12", "-s", "rr"],
            2,
            "Zero port specified for non-persistent service\n",
        ),
        (
            vec!["-a", "-t", &svc, "-r", "198.18.0.x", "-m"],
            2,
            "illegal real server address[:port] specified\n",
        ),
        (
            vec!["-n", "-L"],
            255,
            "Try `bulkhead ipvsadm -h' or 'bulkhead ipvsadm --help' for more information.\n",
        ),
        (
            vec!["-L", "-n", "-t", "198.19.0.99:80"],
            1,
            "No such service\n",
        ),
    ] {
        let got = ipvsadm(n, &args, "");
        assert_eq!((got.0, got.2.as_str()), (code, message), "{args:?}");
    }
    // What Bulkhead cannot keep is refused by name, never dropped.
    for (args, names) in [
        (
            vec!["-a", "-t", &svc, "-r", "198.18.0.6:8080"],
            "direct routing",
        ),
        (
            vec!["-a", "-t", &svc, "-r", "198.18.0.6:8080", "-i"],
            "tunnelling",
        ),
        (vec!["-A", "-f", "10", "-s", "rr"], "firewall-mark"),
        (
            vec!["-A", "-t", "198.19.0.12:80", "-s", "lblc"],
            "lblc scheduler",
        ),
        (
            vec!["-a", "-t", &svc, "-r", "198.18.0.6:8080", "-m", "-x", "10"],
            "thresholds",
        ),
        (
            vec![
                "-a",
                "-t",
                &svc,
                "-r",
                "198.18.0.6:8080",
                "-m",
                "-w",
                "70000",
            ],
            "65535",
        ),
    ] {
        let (code, _, err) = ipvsadm(n, &args, "");
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    assert_eq!(
        ok(n, &["-S", "-n"]),
        save,
        "a refused command changed the table"
    );

    // Timeouts: tcp, tcpfin, udp; zero keeps a value.
    ok(n, &["--set", "100", "20", "30"]);
    ok(n, &["--set", "0", "0", "40"]);
    assert_eq!(
        ok(n, &["-L", "--timeout"]),
        "Timeout (tcp tcpfin udp): 100 20 40\n"
    );

    // -C, then -R of what -S printed (with ipvsadm's own words in it, as scripts write it).
    ok(n, &["-C"]);
    assert_eq!(ok(n, &["-S", "-n"]), "");
    let script: String = save.lines().flat_map(|l| ["ipvsadm ", l, "\n"]).collect();
    let (code, _, err) = ipvsadm(n, &["-R"], &script);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ok(n, &["-S", "-n"]), save);

    // The binary answers to the name ipvsadm (a link, as packages install it).
    let dir = tests::TempDir::new("ipvsadm");
    let link = dir.path().join("ipvsadm");
    std::os::unix::fs::symlink(tests::bulkhead_bin().unwrap(), &link).unwrap();
    let mut cmd = Command::new(&link);
    cmd.args(["-S", "-n"])
        .env("BULKHEAD_NETNS", n.ns.path())
        .env("BULKHEAD_BPFFS", n.bpffs().path())
        .env("BULKHEAD_STATE_DIR", n.state_dir());
    let (code, out, err) = finish(cmd, "");
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, save);
}

/// One ipvsadm command line run by the real ipvsadm over IPVS in `ns`; (code, stdout, stderr).
fn real_ipvsadm(ns: &tests::Netns, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::os::unix::process::CommandExt as _;
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.to_owned();
    // A child forked by a thread inside the namespace starts in it.
    ns.run(move || {
        let mut cmd = tests::command(REAL_IPVSADM);
        cmd.arg0("ipvsadm").args(&args);
        finish(cmd, &stdin)
    })
}

const REAL_IPVSADM: &str = "/usr/sbin/ipvsadm";

/// The listing's header names the connection table's size, which differs by design.
fn without_size(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(" (size=") {
            Some(i) if l.starts_with("IP Virtual Server version") => {
                format!("{}(size=N)", &l[..=i])
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn ipvsadm_answers_as_the_real_ipvsadm_over_ipvs_does() {
    let name = "ipvsadm_answers_as_the_real_ipvsadm_over_ipvs_does";
    if skip(name) {
        return;
    }
    if !std::path::Path::new(REAL_IPVSADM).exists() {
        eprintln!("SKIP {name}: no {REAL_IPVSADM} (setup installs ipvsadm)");
        return;
    }
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        eprintln!("SKIP {name}: this kernel has no IPVS loaded (the VM ring runs this test)");
        return;
    }
    let node = Node::new();
    let ipvs = tests::Netns::new("bhipvs");
    let dir = tests::TempDir::new("ipvsadm");
    let link = dir.path().join("ipvsadm");
    std::os::unix::fs::symlink(tests::bulkhead_bin().unwrap(), &link).unwrap();
    let ours = |args: &[&str], stdin: &str| {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = tests::command(&link);
        cmd.arg0("ipvsadm")
            .args(args)
            .env("BULKHEAD_NETNS", node.ns.path())
            .env("BULKHEAD_BPFFS", node.bpffs().path())
            .env("BULKHEAD_STATE_DIR", node.state_dir());
        finish(cmd, stdin)
    };
    let vip = "198.19.0.10:80";
    let restore = "-A -t 198.19.0.30:80 -s rr\n-a -t 198.19.0.30:80 -r 198.18.0.7:80 -m -w 4\n\
                   -A -u 198.19.0.31:53 -s sh -p 120\n";
    let script: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-Ln"], ""),
        (vec!["-A", "-t", vip, "-s", "rr"], ""),
        (vec!["-a", "-t", vip, "-r", "198.18.0.3:8080", "-m"], ""),
        (
            vec!["-a", "-t", vip, "-r", "198.18.0.4:8080", "-m", "-w", "2"],
            "",
        ),
        (
            vec!["-a", "-t", vip, "-r", "198.18.0.10:8080", "-m", "-w", "0"],
            "",
        ),
        (
            vec![
                "-A",
                "-u",
                "198.19.0.11:53",
                "-s",
                "wlc",
                "-p",
                "300",
                "-M",
                "255.255.255.0",
            ],
            "",
        ),
        (
            vec![
                "-a",
                "-u",
                "198.19.0.11:53",
                "-r",
                "198.18.0.5:53",
                "-m",
                "-w",
                "3",
            ],
            "",
        ),
        // Addresses ipvsadm's wrapping compare puts out of numeric order: 10.0.0.1 after
        // 200.0.0.1. (All within half the address space of each other, where that compare is
        // a total order; across more, ipvsadm's order follows the kernel's hash buckets.)
        (vec!["-A", "-t", "192.168.0.1:80", "-s", "sed"], ""),
        (vec!["-A", "-t", "10.0.0.1:80", "-s", "nq"], ""),
        (vec!["-A", "-t", "200.0.0.1:443", "-s", "fo"], ""),
        (vec!["-A", "-t", "198.19.0.12:80", "-s", "ovf"], ""),
        (vec!["-A", "-t", "198.19.0.13:80", "-s", "mh"], ""),
        (vec!["-A", "-t", "198.19.0.14:80", "-s", "dh"], ""),
        (vec!["-A", "-t", "198.19.0.15:80", "-s", "lc"], ""),
        (vec!["-A", "-t", "198.19.0.16:80", "-s", "wrr", "-p"], ""),
        (vec!["-A", "-t", "198.19.0.17:80"], ""),
        (
            vec![
                "-A",
                "-t",
                "198.19.0.19:80",
                "-s",
                "sh",
                "-b",
                "sh-port,sh-fallback",
            ],
            "",
        ),
        (
            vec![
                "-A",
                "-t",
                "198.19.0.20:80",
                "-s",
                "mh",
                "-b",
                "mh-port",
                "-p",
                "30",
            ],
            "",
        ),
        (
            vec![
                "-A",
                "-t",
                "198.19.0.21:80",
                "-s",
                "rr",
                "-b",
                "flag-1,flag-3",
            ],
            "",
        ),
        (
            vec!["-A", "-t", "198.19.0.23:80", "-s", "sh", "-b", "flag-3"],
            "",
        ),
        (vec!["-Ln"], ""),
        (vec!["-L", "-n"], ""),
        (vec!["-S", "-n"], ""),
        (vec!["-Sn"], ""),
        (vec!["-L", "-n", "-t", vip], ""),
        (vec!["-Ln", "--thresholds"], ""),
        (vec!["-Ln", "--stats"], ""),
        (vec!["-Ln", "--persistent-conn"], ""),
        (vec!["-Ln", "--thresholds", "--persistent-conn"], ""),
        (vec!["-L", "-n", "-c", "--persistent-conn"], ""),
        (vec!["-L", "-n", "-c"], ""),
        (vec!["-L", "-n", "--stats", "--exact", "-t", vip], ""),
        (vec!["-E", "-t", vip, "-s", "wrr", "-p", "60"], ""),
        (vec!["-E", "-t", "198.19.0.16:80"], ""),
        (vec!["-E", "-t", "198.19.0.21:80", "-s", "rr"], ""),
        (
            vec!["-e", "-t", vip, "-r", "198.18.0.4:8080", "-m", "-w", "5"],
            "",
        ),
        (vec!["-d", "-t", vip, "-r", "198.18.0.3:8080"], ""),
        (vec!["-D", "-t", "192.168.0.1:80"], ""),
        (vec!["-S", "-n"], ""),
        (vec!["-Ln"], ""),
        // Refusals: the same words and exit codes.
        (vec!["-A", "-t", vip, "-s", "rr"], ""),
        (vec!["-a", "-t", vip, "-r", "198.18.0.4:8080", "-m"], ""),
        (vec!["-e", "-t", vip, "-r", "198.18.0.9:8080", "-m"], ""),
        (vec!["-d", "-t", vip, "-r", "198.18.0.9:8080"], ""),
        (
            vec!["-a", "-t", "198.19.0.99:80", "-r", "198.18.0.4:8080", "-m"],
            "",
        ),
        (vec!["-D", "-t", "198.19.0.99:80"], ""),
        (vec!["-E", "-t", "198.19.0.99:80"], ""),
        (vec!["-Z", "-t", "198.19.0.99:80"], ""),
        (vec!["-L", "-n", "-t", "198.19.0.99:80"], ""),
        (vec!["-A", "-t", "198.19.0.18:80", "-s", "bogus"], ""),
        (
            vec!["-A", "-t", "198.19.0.18:80", "-s", "rr", "-b", "sh-port"],
            "",
        ),
        (vec!["-A", "-t", "198.19.0.18:80", "-b", "mh-port"], ""),
        (
            vec!["-A", "-t", "198.19.0.18:80", "-s", "sh", "-b", "sh-bogus"],
            "",
        ),
        (vec!["-A", "-t", "198.19.0.18:80", "-w", "1"], ""),
        (vec!["-A", "-t", "198.19.0.18", "-s", "rr"], ""),
        (vec!["-A", "-t", "198.19.0.18:80", "-p", "0"], ""),
        (vec!["-A", "-t", "198.19.0.x:80"], ""),
        (
            vec!["-A", "-t", "198.19.0.18:80", "-M", "255.255.x.0", "-p"],
            "",
        ),
        (vec!["-a", "-t", vip, "-r", "198.18.0.x", "-m"], ""),
        (
            vec!["-a", "-t", vip, "-r", "198.18.0.6", "-m", "-w", "x"],
            "",
        ),
        (vec!["-a", "-t", vip, "-m"], ""),
        (vec!["-A", "-t", vip, "-u", vip], ""),
        (vec!["-A", "-t", vip, "-L"], ""),
        (vec!["-n", "-L"], ""),
        (vec!["-L", "--tim"], ""),
        (vec!["-Lq"], ""),
        (vec!["-A", "-t", vip, "-s"], ""),
        (vec!["-L", "--timeout", "-c"], ""),
        (vec!["-L", "-c", "--stats"], ""),
        (vec!["-Z", "-n"], ""),
        (vec!["-R", "-n"], ""),
        (vec!["--set", "1", "2"], ""),
        (vec!["--set", "1", "2", "3", "4"], ""),
        (vec!["--set", "1", "x", "3"], ""),
        (vec!["-C", "extra"], ""),
        (vec!["-S", "-n"], ""),
        // Timeouts (ipvsadm reads back IPVS's after setting them; zero keeps one).
        (vec!["--set", "900", "120", "300"], ""),
        (vec!["--set", "0", "60", "0"], ""),
        (vec!["-L", "--timeout"], ""),
        (vec!["-Z"], ""),
        (vec!["-Z", "-t", vip], ""),
        (vec!["-C"], ""),
        (vec!["-S", "-n"], ""),
        (vec!["-R"], restore),
        (vec!["-S", "-n"], ""),
        (vec!["-Ln"], ""),
        (vec!["-C"], ""),
        (vec!["-Ln"], ""),
    ];
    let mut differences = Vec::new();
    for (args, stdin) in &script {
        let real = real_ipvsadm(&ipvs, args, stdin);
        let got = ours(args, stdin);
        let real = (real.0, without_size(&real.1), real.2);
        let got = (got.0, without_size(&got.1), got.2);
        println!("ipvsadm {}: {} {:?}", args.join(" "), real.0, real.2.trim());
        if real != got {
            differences.push(format!(
                "ipvsadm {}\n  IPVS:     {real:?}\n  Bulkhead: {got:?}",
                args.join(" ")
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} command lines differ:\n{}",
        differences.len(),
        script.len(),
        differences.join("\n")
    );
}
