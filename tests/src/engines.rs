//! Real container engines, run privately for the tests and the benchmark: podman with its CNI
//! backend and containerd's CRI. Each keeps every config, store, socket and log in a directory
//! of its own, runs inside a node's network namespace (so its containers' namespaces hang off
//! that node's bridge), and puts its containers' cgroups beneath this process's own. Nothing is
//! written under /etc; dropping one removes what it made.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    PortMapping, Protocol, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{TempDir, command, unique_name};

/// The cgroup hierarchies mounted under /sys/fs/cgroup (v1 controllers and the unified one).
fn hierarchies() -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// A cgroup parent path for an engine's containers, beneath the deepest of this process's own
/// cgroup paths (on this hybrid host the memory controller's; the other controllers sit at
/// their roots, beneath which it also lies). Engines' defaults (`/libpod_parent`, `/k8s.io`)
/// would land outside. On drop, everything beneath it and the directories of the path that
/// did not exist before are removed, in every hierarchy.
pub struct CgroupParent {
    pub path: String,
    made: Vec<PathBuf>,
}

impl CgroupParent {
    pub fn new(prefix: &str) -> CgroupParent {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let deepest = own
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .max_by_key(|p| p.len())
            .unwrap_or("/")
            .trim_end_matches('/')
            .to_owned();
        let path = format!("{deepest}/{}", unique_name(prefix));
        let mut made = Vec::new();
        for h in hierarchies() {
            let mut dir = h.clone();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                if !dir.exists() {
                    made.push(dir.clone());
                }
            }
        }
        CgroupParent { path, made }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        // What the engine left beneath (runc removes its own; conmon's may stay), deepest first.
        for h in hierarchies() {
            let mut dirs: Vec<PathBuf> = Vec::new();
            let mut stack = vec![h.join(self.path.trim_start_matches('/'))];
            while let Some(d) = stack.pop() {
                if let Ok(entries) = fs::read_dir(&d) {
                    stack.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                    dirs.push(d);
                }
            }
            for d in dirs.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
        self.made
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in &self.made {
            let _ = fs::remove_dir(d);
        }
    }
}

/// A directory of CNI plugins: every plugin of /usr/lib/cni (containernetworking-plugins),
/// and `bulkhead-cni` as the plugin type "bulkhead" when given.
fn cni_bin_dir(dir: &Path, bulkhead_cni: Option<&Path>) {
    fs::create_dir_all(dir).unwrap();
    if let Some(cni) = bulkhead_cni {
        std::os::unix::fs::symlink(cni, dir.join("bulkhead")).unwrap();
    }
    for plugin in fs::read_dir("/usr/lib/cni").into_iter().flatten().flatten() {
        let _ = std::os::unix::fs::symlink(plugin.path(), dir.join(plugin.file_name()));
    }
}

/// A CNI network of the containernetworking bridge plugin with host-local addresses, its
/// leases in `dir`: the engines' usual network (without their iptables plugins), the baseline
/// bulkhead-cni is measured against.
pub fn bridge_conflist(name: &str, bridge: &str, subnet: &str, dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
            "hairpinMode": true,
            "ipam": {"type": "host-local", "dataDir": dir.join("ipam"),
                     "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
        }]
    })
}

/// A podman as the issue's users run it: the CNI backend with the networks given, cgroupfs,
/// runc, private storage, inside the node's namespace.
pub struct Podman {
    dir: TempDir,
    node_ns: PathBuf,
    cgroup: CgroupParent,
}

impl Podman {
    /// None when podman or runc is not installed.
    pub fn new(
        node_ns: PathBuf,
        networks: &[Value],
        bulkhead_cni: Option<&Path>,
    ) -> Option<Podman> {
        if !Path::new("/usr/bin/podman").exists() || !Path::new("/usr/sbin/runc").exists() {
            return None;
        }
        let dir = TempDir::new("bhpm");
        let d = dir.path();
        let bin = d.join("bin");
        cni_bin_dir(&bin, bulkhead_cni);
        let net = d.join("net");
        fs::create_dir_all(&net).unwrap();
        for list in networks {
            let name = list["name"].as_str().expect("a conflist has a name");
            fs::write(net.join(format!("{name}.conflist")), list.to_string()).unwrap();
        }
        fs::write(
            d.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\ncni_plugin_dirs = [\"{}\"]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n\
                 runtime = \"runc\"\n",
                net.display(),
                bin.display(),
                d.join("events.log").display()
            ),
        )
        .unwrap();
        Some(Podman {
            dir,
            node_ns,
            cgroup: CgroupParent::new("bpm"),
        })
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let parent = format!("--cgroup-parent={}", self.cgroup.path);
        let mut args = args.to_vec();
        if args.first() == Some(&"run") {
            args.insert(1, &parent);
        }
        command("/usr/bin/nsenter")
            .arg(format!("--net={}", self.node_ns.display()))
            .arg("/usr/bin/podman")
            .arg(format!("--root={}", d.join("root").display()))
            .arg(format!("--runroot={}", d.join("runroot").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg("--storage-driver=vfs")
            .arg("--runtime=runc")
            .args(&args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env_remove("CONTAINER_HOST")
            .output()
            .expect("run podman")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman run -d` on `network` of a busybox httpd answering with the container's name (its
    /// page in a directory of its own: `--rootfs` is shared, /tmp included).
    pub fn web(&self, network: &str, name: &str, root: &str, extra: &[&str]) -> Ipv4Addr {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            network,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
            "--rootfs", root,
            "sh", "-c", "mkdir -p /tmp/$HOSTNAME && echo $HOSTNAME > /tmp/$HOSTNAME/index.html && exec httpd -f -p 8080 -h /tmp/$HOSTNAME",
        ]);
        self.ok(&args);
        self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            name,
        ])
        .parse()
        .unwrap_or_else(|e| panic!("{name} has no address on {network}: {e}"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-a", "-f", "-t", "0"]);
    }
}

/// The image every CRI container runs, built here from busybox (nothing is pulled).
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:bulkhead-test";
/// The pod sandbox ("pause") image, the same busybox sleeping.
const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";

/// containerd 1.6 with its CRI plugin, private root, state, socket and CNI directories, inside
/// the node's namespace, with a busybox and a pause image imported; driven through the CRI
/// gRPC API as the kubelet drives it.
pub struct Containerd {
    dir: TempDir,
    daemon: Option<Child>,
    cgroup: CgroupParent,
    cri: RuntimeServiceClient<Channel>,
    rt: tokio::runtime::Runtime,
    /// Whether /run/containerd (where 1.6 puts shim sockets whatever its config says) was made
    /// by this instance, to be removed with it when empty.
    made_run_dir: bool,
}

/// How a CRI call failed: its gRPC status, shown whole.
fn grpc<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, String> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| format!("{what}: {:?}: {}", s.code(), s.message()))
}

impl Containerd {
    /// Starts containerd with the CNI network `conflist`; Err says why it cannot run here.
    pub fn new(
        node_ns: &Path,
        conflist: &Value,
        bulkhead_cni: Option<&Path>,
        busybox: &Path,
    ) -> Result<Containerd, String> {
        for bin in ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc"] {
            if !Path::new(bin).exists() {
                return Err(format!(
                    "{bin} is missing (cargo xtask setup installs containerd and runc)"
                ));
            }
        }
        let dir = TempDir::new("bhcd");
        let t = dir.path().to_path_buf();
        cni_bin_dir(&t.join("cni-bin"), bulkhead_cni);
        // The network config is in place before containerd starts: 1.6 ignores files renamed
        // into its conf_dir later.
        fs::create_dir_all(t.join("cni-conf")).unwrap();
        fs::write(t.join("cni-conf/10-net.conflist"), conflist.to_string()).unwrap();
        fs::write(t.join("config.toml"), config_toml(&t)).unwrap();
        let made_run_dir = !Path::new("/run/containerd").exists();
        let log = fs::File::create(t.join("containerd.log")).unwrap();
        let daemon = command("/usr/bin/nsenter")
            .arg(format!("--net={}", node_ns.display()))
            .arg("/usr/bin/containerd")
            .arg("--config")
            .arg(t.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start containerd: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sock = t.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let channel = rt
            .block_on(unix_channel(sock))
            .map_err(|e| format!("containerd's socket does not answer: {e}"));
        let mut me = Containerd {
            cri: RuntimeServiceClient::new(match channel {
                Ok(c) => c,
                Err(e) => {
                    let log = fs::read_to_string(t.join("containerd.log")).unwrap_or_default();
                    let _ = kill_and_wait(daemon);
                    return Err(format!("{e}\n{log}"));
                }
            }),
            dir,
            daemon: Some(daemon),
            cgroup: CgroupParent::new("bcd"),
            rt,
            made_run_dir,
        };
        me.import(busybox, PAUSE_IMAGE, &["/bin/sleep", "inf"])?;
        me.import(busybox, BUSYBOX_IMAGE, &["/bin/sh", "-c", "sleep 300"])?;
        // The network is ready once containerd has loaded the CNI config.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = grpc(
                "Status",
                me.rt
                    .block_on(me.cri.status(StatusRequest { verbose: false })),
            )?;
            let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
            if conditions.iter().all(|c| c.status) && !conditions.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("containerd is not ready: {conditions:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = command("/usr/bin/ctr")
            .arg("--address")
            .arg(self.dir().join("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ctr {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds an OCI image layout of the busybox root (one uncompressed layer) named `name`,
    /// running `entrypoint`, and imports it with `ctr images import` as CRI images are.
    fn import(&self, busybox: &Path, name: &str, entrypoint: &[&str]) -> Result<(), String> {
        let layout = self.dir().join(format!("image-{}", unique_name("i")));
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let root = layout.join("rootfs");
        for d in ["etc", "proc", "sys", "dev", "root", "tmp", "var/www"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let out = command("/usr/bin/cp")
            .args(["-a"])
            .arg(busybox.join("bin"))
            .arg(&root)
            .output()
            .map_err(|e| format!("cp: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "copy the busybox root: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let layer = layout.join("layer.tar");
        let out = command("/usr/bin/tar")
            .arg("-C")
            .arg(&root)
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-cf",
            ])
            .arg(&layer)
            .arg(".")
            .output()
            .map_err(|e| format!("tar: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tar the layer: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let blob = |bytes: &[u8]| -> (String, usize) {
            let digest = sha256(bytes);
            fs::write(blobs.join(&digest), bytes).unwrap();
            (format!("sha256:{digest}"), bytes.len())
        };
        let (layer_digest, layer_size) = blob(&fs::read(&layer).unwrap());
        let layer_digest = layer_digest.trim_start_matches("sha256:").to_owned();
        let (config, config_size) = blob(
            json!({
                "architecture": "amd64", "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Entrypoint": entrypoint, "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
            })
            .to_string()
            .as_bytes(),
        );
        let (manifest, manifest_size) = blob(
            json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config, "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
            })
            .to_string()
            .as_bytes(),
        );
        fs::write(
            layout.join("index.json"),
            json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest, "size": manifest_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": name},
                }],
            })
            .to_string(),
        )
        .unwrap();
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let archive = layout.with_extension("tar");
        let out = command("/usr/bin/tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"])
            .output()
            .map_err(|e| format!("tar: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tar the layout: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.ctr(&["images", "import", archive.to_str().unwrap()])?;
        let _ = fs::remove_dir_all(&layout);
        let _ = fs::remove_file(&archive);
        Ok(())
    }

    /// `RunPodSandbox` with its own network namespace (so CNI ADD runs) and `ports` as
    /// (host port, container port) TCP mappings: the sandbox id.
    pub fn run_pod(&mut self, name: &str, ports: &[(u16, u16)]) -> Result<String, String> {
        let config = self.pod_config(name, ports);
        let r = self
            .rt
            .block_on(self.cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }));
        Ok(grpc("RunPodSandbox", r)?.pod_sandbox_id)
    }

    fn pod_config(&self, name: &str, ports: &[(u16, u16)]) -> PodSandboxConfig {
        let logs = self.dir().join("pod-logs").join(name);
        fs::create_dir_all(&logs).unwrap();
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.to_string_lossy().into_owned(),
            port_mappings: ports
                .iter()
                .map(|&(host, container)| PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: container.into(),
                    host_port: host.into(),
                    host_ip: String::new(),
                })
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup.path.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `CreateContainer` and `StartContainer` in `pod` of a busybox running `script` with sh.
    pub fn start(&mut self, pod: &str, name: &str, script: &str) -> Result<String, String> {
        let sandbox_config = self.pod_config(name, &[]);
        let r = self
            .rt
            .block_on(self.cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: BUSYBOX_IMAGE.into(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config),
            }));
        let id = grpc("CreateContainer", r)?.container_id;
        let r = self
            .rt
            .block_on(self.cri.start_container(StartContainerRequest {
                container_id: id.clone(),
            }));
        grpc("StartContainer", r)?;
        Ok(id)
    }

    /// The pod's address, as `PodSandboxStatus` reports it from the CNI result.
    pub fn pod_ip(&mut self, pod: &str) -> Result<Ipv4Addr, String> {
        let r = self
            .rt
            .block_on(self.cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            }));
        let ip = grpc("PodSandboxStatus", r)?
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        ip.parse()
            .map_err(|e| format!("the pod's address {ip:?}: {e}"))
    }

    /// `StopPodSandbox` (kills its containers, CNI DEL) then `RemovePodSandbox` (CNI DEL again,
    /// without a namespace), as the kubelet does.
    pub fn remove_pod(&mut self, pod: &str) -> Result<(), String> {
        let r = self
            .rt
            .block_on(self.cri.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }));
        grpc("StopPodSandbox", r)?;
        let r = self
            .rt
            .block_on(self.cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }));
        grpc("RemovePodSandbox", r)?;
        Ok(())
    }

    /// Every pod sandbox containerd knows.
    pub fn pods(&mut self) -> Result<Vec<String>, String> {
        let r = self.rt.block_on(
            self.cri
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        );
        Ok(grpc("ListPodSandbox", r)?
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }

    /// containerd's log, for a failing test's message.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let t = self.dir().to_path_buf();
        let sock = t.join("containerd.sock");
        // Pods first: that stops their shims and runs CNI DEL.
        for pod in self.pods().unwrap_or_default() {
            let _ = self.remove_pod(&pod);
        }
        if let Some(daemon) = self.daemon.take() {
            let _ = kill_and_wait(daemon);
        }
        // What a failed teardown may have left: containers under our runc root, shims
        // serving our socket, mounts beneath our directory.
        let runc_root = t.join("state/runc/k8s.io");
        if let Ok(out) = command("/usr/sbin/runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = command("/usr/sbin/runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        let needle = format!("-address {}", sock.display());
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("containerd-shim")
                && cmdline.contains(&needle)
                && let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = t.to_string_lossy().into_owned();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // The two places containerd 1.6 uses whatever its config says: the shim sockets
        // (named by a hash of the address, namespace and id) and libcni's result cache.
        for task in fs::read_dir(t.join("state/io.containerd.runtime.v2.task/k8s.io"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = task.file_name().to_string_lossy().into_owned();
            let key = format!("{}/k8s.io/{id}", sock.display());
            let _ = fs::remove_file(Path::new("/run/containerd/s").join(sha256(key.as_bytes())));
            for cached in fs::read_dir("/var/lib/cni/results")
                .into_iter()
                .flatten()
                .flatten()
            {
                if cached.file_name().to_string_lossy().contains(&id) {
                    let _ = fs::remove_file(cached.path());
                }
            }
        }
        if self.made_run_dir {
            let _ = fs::remove_dir("/run/containerd/s");
            let _ = fs::remove_dir("/run/containerd");
        }
    }
}

fn kill_and_wait(mut child: Child) -> std::io::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait().map(|_| ())
}

/// The hex SHA-256 of `bytes` (coreutils' sha256sum).
fn sha256(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = command("/usr/bin/sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// containerd's config: everything under `t`, CRI with runc (cgroupfs), overlayfs, the CNI
/// directories, no listener but the socket.
fn config_toml(t: &Path) -> String {
    let t = t.display();
    format!(
        r#"version = 2
root = "{t}/root"
state = "{t}/state"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{t}/containerd.sock"
[ttrpc]
  address = "{t}/containerd.sock.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{t}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # The sandbox asks for oomScoreAdj -998, which needs CAP_SYS_RESOURCE.
    restrict_oom_score_adj = true
    systemd_cgroup = false
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    tolerate_missing_hugetlb_controller = true
    disable_hugetlb_controller = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{t}/cni-bin"
      conf_dir = "{t}/cni-conf"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          Root = "{t}/state/runc"
          SystemdCgroup = false
"#
    )
}

/// A tonic channel to a gRPC server on a Unix socket (the URI only has to parse).
async fn unix_channel(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_mins(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}
