//! `bulkhead agent` against the real kernel: it owns the node, the CLI goes through it, its
//! API answers as docs/api/openapi.yaml says, desired state converges without cutting flows,
//! a real Prometheus scrapes it, and a SIGKILL in the middle of 10,000 services costs no
//! connection.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bulkhead::agent::client::{Answer, Client};
use serde_json::{Value, json};
use tests::{Node, TempDir, busybox_rootfs, command, skip};

/// A running agent for a test node; `SIGKILLed` if the test did not stop it.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
    _dir: TempDir,
}

impl Agent {
    fn start(node: &Node, args: &[&str]) -> Agent {
        Self::start_with(node, args, &[])
    }

    /// Starts `bulkhead agent ARGS` with extra environment; waits until it is ready.
    fn start_with(node: &Node, args: &[&str], env: &[(&str, &Path)]) -> Agent {
        let dir = TempDir::new("bha");
        let log = dir.path().join("agent.log");
        let mut all = vec!["agent"];
        all.extend_from_slice(args);
        let child = node
            .command(&all)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the agent");
        let mut agent = Agent {
            child: Some(child),
            log,
            socket: node.state_dir().join("agent.sock"),
            _dir: dir,
        };
        agent.wait_ready(node.state_dir());
        agent
    }

    fn wait_ready(&mut self, state_dir: &Path) {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the agent exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            if let Some(rec) = bulkhead::agent::Record::load(state_dir) {
                self.socket = rec.socket;
                if let Ok(a) = self.client().request("GET", "/readyz", b"")
                    && a.status == 200
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agent never got ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn client(&self) -> Client {
        Client {
            pid: self.child.as_ref().map_or(0, Child::id),
            socket: self.socket.clone(),
        }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Answer {
        self.client()
            .request(method, path, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    fn json(&self, method: &str, path: &str, body: &str) -> Value {
        let a = self.call(method, path, body);
        assert!(
            a.status < 300,
            "{method} {path}: {} {}",
            a.status,
            a.message()
        );
        serde_json::from_slice(&a.body).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.take().unwrap().wait().unwrap()
    }

    fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.take().unwrap().wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn text(out: &Output) -> (String, String, Option<i32>) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

fn save(node: &Node) -> String {
    node.bulkhead_ok(&["service", "save"])
}

#[test]
fn the_agent_owns_the_node_and_the_cli_goes_through_it() {
    if skip("the_agent_owns_the_node_and_the_cli_goes_through_it") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    node.add_pod(3);
    let _servers: Vec<_> = node.pods.iter().map(|p| p.serve_tcp(8080)).collect();
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);

    // The same mistakes without and with the agent: the same words, the same exit codes.
    let cases: [&[&str]; 7] = [
        &[
            "service",
            "add",
            "198.19.0.10:80/tcp",
            "-b",
            "198.18.0.2:8080",
            "-b",
            "198.18.0.3:8080",
        ],
        &["service", "add", "198.19.0.10:80/tcp"],
        &["backend", "del", "198.19.0.99:80", "198.18.0.2:8080"],
        &["service", "add", "198.19.0.11:80/sctp"],
        // ipvsadm's command line too, with its own words and exit codes.
        &["ipvsadm", "-A", "-t", "198.19.0.12:80", "-s", "rr"],
        &["ipvsadm", "-A", "-t", "198.19.0.12:80", "-s", "rr"],
        &["ipvsadm", "-Ln"],
    ];
    let direct: Vec<_> = cases.iter().map(|c| text(&node.bulkhead(c))).collect();
    assert_eq!(direct[0].2, Some(0), "{direct:?}");
    assert_eq!(direct[1].2, Some(1), "{direct:?}");
    assert_eq!(direct[5].2, Some(255), "{direct:?}");
    let listed_direct = node.bulkhead_ok(&["service", "list"]);
    node.bulkhead_ok(&["service", "del", "198.19.0.10:80/tcp"]);
    node.bulkhead_ok(&["service", "del", "198.19.0.12:80/tcp"]);

    let agent = Agent::start(&node, &[]);
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is root's only");
    let through: Vec<_> = cases.iter().map(|c| text(&node.bulkhead(c))).collect();
    assert_eq!(
        through, direct,
        "the CLI through the agent prints and exits as without it"
    );
    assert_eq!(node.bulkhead_ok(&["service", "list"]), listed_direct);
    // The binary linked as ipvsadm goes through the agent as well.
    let dir = tests::TempDir::new("ipvsadm");
    let link = dir.path().join("ipvsadm");
    std::os::unix::fs::symlink(tests::bulkhead_bin().unwrap(), &link).unwrap();
    let linked = tests::command(&link)
        .args(["-S", "-n"])
        .env("BULKHEAD_NETNS", node.ns.path())
        .env("BULKHEAD_BPFFS", node.bpffs().path())
        .env("BULKHEAD_STATE_DIR", node.state_dir())
        .output()
        .unwrap();
    assert_eq!(
        text(&linked),
        text(&node.bulkhead(&["ipvsadm", "-S", "-n"])),
        "ipvsadm linked, through the agent"
    );
    assert_eq!(text(&linked).2, Some(0), "{:?}", text(&linked));
    assert!(
        agent.log().is_empty() || !agent.log().contains("ERROR"),
        "{}",
        agent.log()
    );
    // Traffic flows through what the agent installed.
    let answers: std::collections::BTreeSet<String> =
        (0..20).map(|_| node.pods[0].tcp_request(vip)).collect();
    assert_eq!(answers.len(), 2, "{answers:?}");

    // A second agent for the node is refused, naming the first.
    let second = node.bulkhead(&["agent"]);
    let (_, err, code) = text(&second);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("an agent already runs for this node")
            && err.contains(&agent.pid().to_string()),
        "{err}"
    );
    // `down` is refused while the agent owns the node, with what to do.
    let (_, err, code) = text(&node.bulkhead(&["down"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("stop the agent"), "{err}");

    // SIGTERM: the agent goes, the datapath keeps serving, the CLI works directly again.
    let status = agent.stop();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    assert!(!node.state_dir().join("agent.sock").exists());
    assert!(!node.pods[1].tcp_request(vip).is_empty());
    node.bulkhead_ok(&["service", "del", "198.19.0.10:80/tcp"]);
}

#[test]
fn the_api_group_may_use_the_socket() {
    if skip("the_api_group_may_use_the_socket") {
        return;
    }
    let node = Node::new();
    let agent = Agent::start(&node, &["--api-group", "daemon"]);
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let daemon = nix::unistd::Group::from_name("daemon").unwrap().unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        daemon.gid.as_raw()
    );
    let (_, err, code) = text(&node.bulkhead(&["agent", "--api-group", "no-such-group-here"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("an agent already runs"), "{err}");
    agent.stop();
    let (_, err, code) = text(&node.bulkhead(&["agent", "--api-group", "no-such-group-here"]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown group \"no-such-group-here\""),
        "{err}"
    );
}

/// The response schemas of docs/api/openapi.yaml, checked against what the agent answers.
struct OpenApi {
    doc: Value,
    covered: std::collections::BTreeSet<(String, String)>,
}

impl OpenApi {
    fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        OpenApi {
            doc: serde_norway::from_str(&text).unwrap(),
            covered: std::collections::BTreeSet::new(),
        }
    }

    /// The documented path template matching `path`.
    fn template(&self, path: &str) -> String {
        let path = path.split('?').next().unwrap();
        let want: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|t| {
                let have: Vec<&str> = t.split('/').collect();
                have.len() == want.len()
                    && have
                        .iter()
                        .zip(&want)
                        .all(|(h, w)| h == w || (h.starts_with('{') && h.ends_with('}')))
            })
            .unwrap_or_else(|| panic!("{path} is not in the OpenAPI document"))
            .clone()
    }

    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => self.doc.pointer(r.trim_start_matches('#')).unwrap(),
            None => v,
        }
    }

    /// Checks one answer: its status is documented for the operation, and a JSON body
    /// matches the documented schema.
    fn check(&mut self, method: &str, path: &str, answer: &Answer) {
        let template = self.template(path);
        self.covered
            .insert((method.to_lowercase(), template.clone()));
        let op = &self.doc["paths"][&template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let status = answer.status.to_string();
        let response = op["responses"].get(&status).unwrap_or_else(|| {
            panic!(
                "{method} {path} answered {status}, undocumented: {}",
                answer.message()
            )
        });
        let response = self.resolve(response);
        let Some(content) = response.get("content") else {
            assert!(
                answer.body.is_empty(),
                "{method} {path}: a body where none is documented"
            );
            return;
        };
        let Some(json_content) = content.get("application/json") else {
            return;
        };
        let _ = json_content;
        // The schema's place in the document: under the operation, or under a shared response.
        let pointer = match op["responses"][&status]["$ref"].as_str() {
            Some(r) => format!(
                "{}/content/application~1json/schema",
                r.trim_start_matches('#')
            ),
            None => format!(
                "/paths/{}/{}/responses/{status}/content/application~1json/schema",
                template
                    .replace('~', "~0")
                    .replace('/', "~1")
                    .replace('{', "%7B")
                    .replace('}', "%7D"),
                method.to_lowercase()
            ),
        };
        let mut schema = self.doc.clone();
        schema["$ref"] = Value::String(format!("#{pointer}"));
        let validator = jsonschema::validator_for(&schema).unwrap();
        let body: Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", answer.message()));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} ({status}) does not match the document: {errors:?}\n{body:#}"
        );
    }

    /// Every documented operation but the streams was exercised.
    fn all_covered(&self) {
        for (path, ops) in self.doc["paths"].as_object().unwrap() {
            for method in ops
                .as_object()
                .unwrap()
                .keys()
                .filter(|m| *m != "parameters")
            {
                if path == "/v1/watch" || path == "/v1/hold" {
                    continue;
                }
                assert!(
                    self.covered.contains(&(method.clone(), path.clone())),
                    "{method} {path} is documented but the test never called it"
                );
            }
        }
    }
}

#[test]
fn the_api_answers_as_its_openapi_document_says_and_bad_input_changes_nothing() {
    if skip("the_api_answers_as_its_openapi_document_says_and_bad_input_changes_nothing") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    node.add_pod(3);
    let _servers: Vec<_> = node.pods.iter().map(|p| p.serve_tcp(8080)).collect();
    let agent = Agent::start(&node, &[]);
    let mut api = OpenApi::load();
    let mut call = |method: &str, path: &str, body: &str, want: u16| {
        let a = agent.call(method, path, body);
        assert_eq!(a.status, want, "{method} {path} {body}: {}", a.message());
        api.check(method, path, &a);
        a
    };
    let svc = r#"{"address": "198.19.0.10:80/tcp", "scheduler": "rr", "backends": ["198.18.0.2:8080", "198.18.0.3:8080@2"]}"#;
    call("POST", "/v1/services", svc, 201);
    let before = save(&node);
    // Bad input: a 4xx with a message, and nothing changes.
    for (body, want, says) in [
        (svc, 409, "already exists"),
        (
            r#"{"address": "198.19.0.11:80/tcp", "weight": 3}"#,
            400,
            "unknown field `weight`",
        ),
        (r#"{"address": "198.19.0.300:80"}"#, 400, "198.19.0.300"),
        (
            r#"{"address": "198.19.0.11:80", "scheduler": "fast"}"#,
            400,
            "fast",
        ),
        (
            r#"{"address": "198.19.0.11:80", "backends": ["198.18.0.2:8080", "198.18.0.2:8080"]}"#,
            400,
            "listed twice",
        ),
        ("{", 400, "request body"),
    ] {
        let a = call("POST", "/v1/services", body, want);
        assert!(a.message().contains(says), "{body}: {}", a.message());
    }
    let a = call(
        "POST",
        "/v1/apply",
        "services:\n  - address: 198.19.0.12:80\n    colour: blue\n",
        400,
    );
    assert!(
        a.message().contains("colour") && a.message().contains("line 3"),
        "{}",
        a.message()
    );
    call("GET", "/v1/services/tcp/198.19.0.99:80", "", 404);
    call("DELETE", "/v1/services/tcp/198.19.0.99:80", "", 404);
    call("GET", "/v1/services/sctp/198.19.0.10:80", "", 400);
    call(
        "POST",
        "/v1/services/tcp/198.19.0.10:80/backends",
        r#"{"address": "nope"}"#,
        400,
    );
    call(
        "DELETE",
        "/v1/services/tcp/198.19.0.10:80/backends/198.18.0.9:8080",
        "",
        404,
    );
    call(
        "POST",
        "/v1/services/tcp/198.19.0.10:80/backends/198.18.0.9:8080/drain",
        "",
        404,
    );
    call(
        "PUT",
        "/v1/services/tcp/198.19.0.10:80",
        r#"{"address": "198.19.0.11:80/tcp"}"#,
        400,
    );
    call(
        "PUT",
        "/v1/services/tcp/198.19.0.99:80",
        r#"{"address": "198.19.0.99:80/tcp"}"#,
        404,
    );
    call(
        "DELETE",
        "/v1/conntrack?service=198.19.0.99:80/tcp",
        "",
        404,
    );
    call("POST", "/v1/cli", r#"{"argv": []}"#, 400);
    assert_eq!(save(&node), before, "refused requests changed the table");

    // Every operation, its answer checked against the document.
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    let mut conn = node.pods[0].tcp_connect(vip);
    tests::ask(&mut conn);
    call("GET", "/v1/services", "", 200);
    let one = call("GET", "/v1/services/tcp/198.19.0.10:80", "", 200);
    let one: Value = serde_json::from_slice(&one.body).unwrap();
    assert_eq!(one["scheduler"], "rr");
    call(
        "POST",
        "/v1/services/tcp/198.19.0.10:80/backends",
        r#"{"address": "198.18.0.4:8080", "weight": 3}"#,
        201,
    );
    call(
        "POST",
        "/v1/services/tcp/198.19.0.10:80/backends/198.18.0.4:8080/drain",
        "",
        204,
    );
    call(
        "DELETE",
        "/v1/services/tcp/198.19.0.10:80/backends/198.18.0.4:8080",
        "",
        204,
    );
    call(
        "PUT",
        "/v1/services/tcp/198.19.0.10:80?force=false",
        r#"{"address": "198.19.0.10:80/tcp", "scheduler": "maglev", "affinity": 60, "backends": ["198.18.0.2:8080", "198.18.0.3:8080"]}"#,
        200,
    );
    assert!(
        save(&node).contains("-A -t 198.19.0.10:80 -s maglev -p 60"),
        "{}",
        save(&node)
    );
    let flows = call("GET", "/v1/conntrack", "", 200);
    let flows: Value = serde_json::from_slice(&flows.body).unwrap();
    assert!(
        !flows.as_array().unwrap().is_empty(),
        "the open connection is tracked"
    );
    assert!(
        !tests::ask(&mut conn).is_empty(),
        "the connection survived the change in place"
    );
    call("GET", "/v1/conntrack/stats", "", 200);
    call("GET", "/v1/stats", "", 200);
    call("GET", "/v1/endpoints", "", 200);
    call("GET", "/v1/sandboxes", "", 200);
    call("GET", "/v1/desired", "", 200);
    let dry = call("POST", "/v1/apply?dry_run=true", "services: []\n", 200);
    let dry: Value = serde_json::from_slice(&dry.body).unwrap();
    assert_eq!(dry["deleted"], 1);
    assert!(
        save(&node).contains("198.19.0.10:80"),
        "a dry run changes nothing"
    );
    let cli = call(
        "POST",
        "/v1/cli",
        &json!({"args": ["bulkhead", "service", "save"]}).to_string(),
        200,
    );
    let cli: Value = serde_json::from_slice(&cli.body).unwrap();
    assert_eq!(cli["stdout"].as_str().unwrap(), save(&node));
    call(
        "DELETE",
        "/v1/conntrack?service=198.19.0.10:80/tcp",
        "",
        200,
    );
    call("GET", "/healthz", "", 200);
    call("GET", "/readyz", "", 200);
    call(
        "POST",
        "/v1/apply",
        "services:\n  - address: 198.19.0.20:53/udp\n    backends: [\"198.18.0.2:53\"]\n",
        200,
    );
    call("DELETE", "/v1/services/udp/198.19.0.20:53", "", 204);
    api.all_covered();
    drop(conn);
    agent.stop();
}

#[test]
fn apply_and_diff_converge_and_drain_instead_of_cutting() {
    if skip("apply_and_diff_converge_and_drain_instead_of_cutting") {
        return;
    }
    let mut node = Node::new();
    for host in 2..=4 {
        node.add_pod(host);
    }
    let _servers: Vec<_> = node.pods.iter().map(|p| p.serve_tcp(8080)).collect();
    let dir = TempDir::new("bhy");
    let file = dir.path().join("services.yaml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    write(
        "services:
  - address: 198.19.0.10:80/tcp
    scheduler: rr
    backends: [\"198.18.0.2:8080\", \"198.18.0.3:8080\"]
  - address: 198.19.0.11:53/udp
    backends: [\"198.18.0.4:53\"]
",
    );
    // Without an agent, then with one: the same commands.
    let out = node.bulkhead(&["diff", "-f", f]);
    assert_eq!(out.status.code(), Some(1), "differences exit 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("+ service 198.19.0.10:80/tcp rr"));
    let applied = node.bulkhead_ok(&["apply", "-f", f]);
    assert!(
        applied.contains("bulkhead apply: 2 added, 0 changed, 0 deleted"),
        "{applied}"
    );
    assert_eq!(node.bulkhead(&["diff", "-f", f]).status.code(), Some(0));

    let agent = Agent::start(&node, &[]);
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    // Connections on each backend, then a file that removes one backend and changes weights.
    let mut conns: Vec<_> = (0..4).map(|_| node.pods[2].tcp_connect(vip)).collect();
    let on: Vec<String> = conns.iter_mut().map(tests::ask).collect();
    assert!(
        on.iter().any(|b| b.starts_with("198.18.0.2"))
            && on.iter().any(|b| b.starts_with("198.18.0.3"))
    );
    let id_before = save(&node);
    write(
        "services:
  - address: 198.19.0.10:80/tcp
    scheduler: rr
    backends: [\"198.18.0.3:8080@2\", \"198.18.0.4:8080\"]
",
    );
    let diff = node.bulkhead(&["diff", "-f", f]);
    let diff_text = String::from_utf8_lossy(&diff.stdout).into_owned();
    assert!(
        diff_text.contains("-   backend 198.18.0.2:8080@1"),
        "{diff_text}"
    );
    assert!(
        diff_text.contains("~   backend 198.18.0.3:8080 weight 1 -> 2"),
        "{diff_text}"
    );
    assert!(
        diff_text.contains("+   backend 198.18.0.4:8080@1"),
        "{diff_text}"
    );
    assert!(
        diff_text.contains("- service 198.19.0.11:53/udp"),
        "{diff_text}"
    );
    assert_eq!(save(&node), id_before, "diff changes nothing");
    let applied = node.bulkhead_ok(&["apply", "-f", f]);
    assert!(
        applied.contains("0 added, 1 changed, 1 deleted"),
        "{applied}"
    );
    // The removed backend's established connections still work: drained, not cut.
    for (c, was) in conns.iter_mut().zip(&on) {
        assert_eq!(&tests::ask(c), was, "an established flow moved or broke");
    }
    let new: std::collections::BTreeSet<String> =
        (0..12).map(|_| node.pods[0].tcp_request(vip)).collect();
    assert!(!new.iter().any(|b| b.starts_with("198.18.0.2")), "{new:?}");
    assert!(new.iter().any(|b| b.starts_with("198.18.0.4")), "{new:?}");
    assert_eq!(node.bulkhead(&["diff", "-f", f]).status.code(), Some(0));
    // A bad file: refused with the field and the line, nothing applied.
    write(
        "services:\n  - address: 198.19.0.10:80/tcp\n    backends: [\"198.18.0.9:8080\"]\n  - address: 198.19.0.12:80\n    nodeport: 0\n",
    );
    let before = save(&node);
    let out = node.bulkhead(&["apply", "-f", f]);
    let (_, err, code) = text(&out);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("services[1]") && err.contains("nodeport 0"),
        "{err}"
    );
    assert_eq!(save(&node), before);

    // SIGHUP re-reads the agent's own --config.
    agent.stop();
    write("services:\n  - address: 198.19.0.30:80/tcp\n    backends: [\"198.18.0.2:8080\"]\n");
    let agent = Agent::start(&node, &["--config", f]);
    assert!(
        save(&node).starts_with("-A -t 198.19.0.30:80 -s hash\n"),
        "{}",
        save(&node)
    );
    write("services:\n  - address: 198.19.0.31:80/tcp\n    backends: [\"198.18.0.3:8080\"]\n");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !save(&node).contains("198.19.0.31:80") {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!save(&node).contains("198.19.0.30:80"));
    drop(conns);
    agent.stop();
}

#[test]
fn the_watch_stream_sends_every_change() {
    if skip("the_watch_stream_sends_every_change") {
        return;
    }
    let node = Node::new();
    let agent = Agent::start(&node, &[]);
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .write_all(b"GET /v1/watch HTTP/1.1\r\nHost: bulkhead\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    let mut next_event = |reader: &mut BufReader<UnixStream>| loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("a watch line");
        if line.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            lines.push(v.clone());
            return v;
        }
    };
    assert_eq!(next_event(&mut reader)["type"], "BOOKMARK");
    agent.json(
        "POST",
        "/v1/services",
        r#"{"address": "198.19.0.10:80/tcp", "backends": ["198.18.0.2:80"]}"#,
    );
    node.bulkhead_ok(&["backend", "add", "198.19.0.10:80/tcp", "198.18.0.3:80@4"]);
    node.bulkhead_ok(&["service", "del", "198.19.0.10:80/tcp"]);
    let added = next_event(&mut reader);
    assert_eq!(
        (added["type"].as_str(), added["service"]["address"].as_str()),
        (Some("ADDED"), Some("198.19.0.10:80/tcp"))
    );
    let modified = next_event(&mut reader);
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(
        modified["service"]["backends"],
        json!(["198.18.0.2:80", "198.18.0.3:80@4"])
    );
    let deleted = next_event(&mut reader);
    assert_eq!(deleted["type"], "DELETED");
    assert!(added["revision"].as_u64() < modified["revision"].as_u64());
    // Each line is a WatchEvent as the document describes it.
    let api = OpenApi::load();
    let mut schema = api.doc.clone();
    schema["$ref"] = json!("#/components/schemas/WatchEvent");
    let validator = jsonschema::validator_for(&schema).unwrap();
    for l in &lines {
        assert!(validator.is_valid(l), "{l}");
    }
    agent.stop();
}

#[test]
fn health_follows_the_datapath_and_sd_notify_says_ready() {
    if skip("health_follows_the_datapath_and_sd_notify_says_ready") {
        return;
    }
    let node = Node::new();
    node.ns.ip(&["link", "set", "lo", "up"]);
    let dir = TempDir::new("bhn");
    let notify = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
    // The agent runs with NOTIFY_SOCKET, as systemd starts it.
    let agent = Agent::start_with(
        &node,
        &["--health-address", "127.0.0.1:10256"],
        &[("NOTIFY_SOCKET", &notify)],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("sd_notify message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let get = |path: &str| -> (u16, String) {
        let path = path.to_owned();
        node.ns.run(move || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:10256").unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut all = String::new();
            std::io::Read::read_to_string(&mut s, &mut all).unwrap();
            let status = all[9..12].parse().unwrap();
            (status, all)
        })
    };
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);
    // Detached from its bridge, the node is not healthy, and says why.
    node.bulkhead_ok(&["detach", &node.bridge]);
    let (status, body) = get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not attached"), "{body}");
    node.bulkhead_ok(&["attach", &node.bridge]);
    assert_eq!(get("/healthz").0, 200);
    agent.stop();
}

/// Prometheus' HTTP API: the value of an instant query, if it has one.
fn promql(node: &Node, query: &str) -> Option<f64> {
    let q: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let answer = node.ns.run(move || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:19090").ok()?;
        write!(
            s,
            "GET /api/v1/query?query={q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut all = String::new();
        std::io::Read::read_to_string(&mut s, &mut all).ok()?;
        Some(all)
    })?;
    let body = answer.split("\r\n\r\n").nth(1)?;
    let v: Value = serde_json::from_str(body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_the_agent() {
    if skip("a_real_prometheus_scrapes_the_agent") {
        return;
    }
    let prometheus = Path::new("/usr/bin/prometheus");
    if !prometheus.exists() {
        eprintln!(
            "SKIP a_real_prometheus_scrapes_the_agent: no /usr/bin/prometheus (cargo xtask setup installs it)"
        );
        return;
    }
    let mut node = Node::new();
    node.ns.ip(&["link", "set", "lo", "up"]);
    node.add_pod(2);
    node.add_pod(3);
    let _servers: Vec<_> = node.pods.iter().map(|p| p.serve_tcp(8080)).collect();
    let agent = Agent::start(&node, &["--metrics-address", "127.0.0.1:10249"]);
    agent.json("POST", "/v1/services", r#"{"address": "198.19.0.10:80/tcp", "scheduler": "rr", "backends": ["198.18.0.2:8080", "198.18.0.3:8080"]}"#);
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    const SENT: usize = 17;
    for _ in 0..SENT {
        node.pods[0].tcp_request(vip);
    }
    let dir = TempDir::new("bhp");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: bulkhead\n    static_configs:\n      - targets: ['127.0.0.1:10249']\n",
    )
    .unwrap();
    let mut cmd = command(tests::IP);
    cmd.args(["netns", "exec", node.ns.name()])
        .arg(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Killed(cmd.spawn().expect("start prometheus"));
    let query = "sum(bulkhead_service_new_flows_total{service=\"198.19.0.10:80/tcp\"})";
    let deadline = Instant::now() + Duration::from_secs(90);
    let got = loop {
        if let Some(v) = promql(&node, query) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the agent's metrics:\n{}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        got as usize, SENT,
        "Prometheus saw {got} new flows for {SENT} connections"
    );
    let per_backend = promql(
        &node,
        "count(bulkhead_backend_new_flows_total{service=\"198.19.0.10:80/tcp\"} > 0)",
    );
    assert_eq!(
        per_backend,
        Some(2.0),
        "rr spread the flows over both backends"
    );
    let up = promql(&node, "up{job=\"bulkhead\"}");
    assert_eq!(up, Some(1.0));
    assert!(promql(&node, "bulkhead_conntrack_capacity{table=\"tcp\"}").is_some_and(|c| c > 0.0));
    assert!(promql(&node, "bulkhead_reconcile_duration_seconds_count").is_some());
    agent.stop();
}

#[test]
fn two_clis_and_the_api_race_through_the_agent() {
    if skip("two_clis_and_the_api_race_through_the_agent") {
        return;
    }
    let node = Node::new();
    let agent = Agent::start(&node, &[]);
    let mut children = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for i in 1..=24u8 {
        let vip = format!("198.21.0.{i}:80");
        let b = format!("198.18.{}.1:80", 100 + i);
        expected.insert(vip.clone());
        if i % 3 == 0 {
            continue;
        }
        let args = ["service", "add", &format!("{vip}/tcp"), "-b", &b];
        let mut cmd = node.command(&args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        children.push(cmd.spawn().unwrap());
    }
    let client = agent.client();
    let api = std::thread::spawn(move || {
        for i in (3..=24u8).step_by(3) {
            let body = format!(
                r#"{{"address": "198.21.0.{i}:80/tcp", "backends": ["198.18.{}.1:80"]}}"#,
                100 + i
            );
            let a = client
                .request("POST", "/v1/services", body.as_bytes())
                .unwrap();
            assert_eq!(a.status, 201, "{}", a.message());
        }
    });
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    api.join().unwrap();
    let saved = save(&node);
    let have: std::collections::BTreeSet<String> = saved
        .lines()
        .filter_map(|l| l.strip_prefix("-A -t "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(have, expected);
    crate::state::slots_belong_to_their_services(node.bpffs().path());
    agent.stop();
}

#[test]
fn sandboxes_and_published_ports_outlive_an_agent_restart() {
    if skip("sandboxes_and_published_ports_outlive_an_agent_restart") {
        return;
    }
    let Some(rootfs) = busybox_rootfs() else {
        eprintln!("SKIP sandboxes_and_published_ports_outlive_an_agent_restart: no busybox");
        return;
    };
    let node = Node::new();
    let agent = Agent::start(&node, &[]);
    let root = rootfs.path().to_str().unwrap();
    // `run` borrows the agent's hold while it makes the sandbox.
    let name = node
        .bulkhead_ok(&[
            "run",
            "-d",
            "--name",
            "web",
            "--rootfs",
            root,
            "-p",
            "8081:8080",
            "--",
            "sleep",
            "300",
        ])
        .trim()
        .to_owned();
    assert_eq!(name, "web");
    let out = node.bulkhead_ok(&["run", "--rootfs", root, "--", "sh", "-c", "echo inside"]);
    assert_eq!(out.trim(), "inside");
    let published = |node: &Node| save(node).contains("-A -t 0.0.0.0:8081");
    assert!(published(&node));
    let sandboxes = agent.json("GET", "/v1/sandboxes", "");
    assert_eq!(sandboxes[0]["name"], "web");
    agent.stop();
    let agent = Agent::start(&node, &[]);
    assert!(published(&node), "the published port went with the agent");
    assert!(node.bulkhead_ok(&["ps"]).contains("web"));
    // The port is still refused to others, and removal through the agent cleans it up.
    let (_, err, code) = text(&node.bulkhead(&[
        "run", "-d", "--rootfs", root, "-p", "8081:80", "--", "sleep", "1",
    ]));
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("8081") && err.contains("web"), "{err}");
    node.bulkhead_ok(&["rm", "-f", "web"]);
    assert!(!published(&node));
    assert!(
        agent
            .json("GET", "/v1/sandboxes", "")
            .as_array()
            .unwrap()
            .is_empty()
    );
    agent.stop();
}

/// `n` services on distinct VIPs (198.20.x.y:80), each with three backends, in the config
/// schema, with `first` ahead of them.
fn config_of(first: &str, n: usize) -> String {
    let mut text = format!("services:\n{first}");
    for i in 0..n {
        let (a, b) = ((i / 250) as u8, (i % 250 + 1) as u8);
        text.push_str(&format!(
            "  - address: 198.20.{a}.{b}:80/tcp\n    backends: [\"198.18.{a}.{b}:80\", \"198.18.{a}.{b}:81\", \"198.18.{a}.{b}:82\"]\n"
        ));
    }
    text
}

#[test]
fn killed_mid_apply_the_agent_converges_and_no_connection_fails() {
    if skip("killed_mid_apply_the_agent_converges_and_no_connection_fails") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    node.add_pod(3);
    node.add_pod(4);
    let _servers: Vec<_> = node.pods[1..]
        .iter()
        .map(|p| p.serve_tcp_once(8080))
        .collect();
    let vip_line = "  - address: 198.19.0.10:80/tcp\n    scheduler: rr\n    backends: [\"198.18.0.3:8080\", \"198.18.0.4:8080\"]\n";
    let dir = TempDir::new("bhk");
    let file = dir.path().join("big.yaml");
    std::fs::write(&file, config_of(vip_line, 10_000)).unwrap();
    let small = dir.path().join("small.yaml");
    std::fs::write(&small, config_of(vip_line, 0)).unwrap();
    let agent = Agent::start(&node, &["--config", small.to_str().unwrap()]);

    // A client connecting through the VIP the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let ns = node.pods[0].ns.path();
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(ns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
            while !stop.load(Ordering::Relaxed) {
                let answered = tests::answers(vip, Duration::from_secs(2));
                if answered {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Apply the big file through the agent and kill it partway.
    let body = std::fs::read(&file).unwrap();
    let api = agent.client();
    let apply = std::thread::spawn(move || api.request("POST", "/v1/apply", &body));
    let deadline = Instant::now() + Duration::from_mins(1);
    let count = |node: &Node| {
        bulkhead::loader::ServiceMaps::open(node.bpffs().path())
            .map_or(0, |m| m.services.keys().count())
    };
    while count(&node) < 1_000 {
        assert!(
            Instant::now() < deadline,
            "the apply never got going:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let midway = count(&node);
    agent.kill();
    let _ = apply.join();
    assert!(
        midway < 10_001,
        "killed after the apply finished ({midway} services)"
    );

    // Started again with the big file as its config, it converges.
    let agent = Agent::start(&node, &["--config", file.to_str().unwrap()]);
    assert_eq!(
        node.bulkhead(&["diff", "-f", file.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 0, "the client never got through");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    crate::state::slots_belong_to_their_services(node.bpffs().path());
    agent.stop();
    eprintln!("killed at {midway} services; {ok} connections, none failed");
}

#[test]
fn the_agent_sweeps_a_removed_backends_udp_flows_after_the_change() {
    if skip("the_agent_sweeps_a_removed_backends_udp_flows_after_the_change") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    node.add_pod(3);
    node.add_pod(4);
    let _servers: Vec<_> = node.pods[1..].iter().map(|p| p.serve_udp(53)).collect();
    let agent = Agent::start(&node, &[]);
    agent.json(
        "POST",
        "/v1/services",
        r#"{"address": "198.19.0.53:53/udp", "scheduler": "rr", "backends": ["198.18.0.3:53", "198.18.0.4:53"]}"#,
    );
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 53), 53);
    let sock = node.pods[0].udp_client();
    let (first, _) = tests::udp_ask(&sock, vip);
    let flows_to = |backend: &str| {
        agent
            .json("GET", "/v1/conntrack", "")
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["backend"] == backend)
            .count()
    };
    assert_eq!(flows_to(&first), 1);
    let a = agent.call(
        "DELETE",
        &format!("/v1/services/udp/198.19.0.53:53/backends/{first}"),
        "",
    );
    assert_eq!(a.status, 204);
    let deadline = Instant::now() + Duration::from_secs(5);
    while flows_to(&first) > 0 {
        assert!(
            Instant::now() < deadline,
            "the removed backend's UDP flow stayed:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The same socket's next datagram goes to the backend that is left.
    let (next, _) = tests::udp_ask(&sock, vip);
    assert_ne!(next, first);
    agent.stop();
}
