//! `bulkhead agent`: a long-running owner of one node.
//!
//! It takes the node lock for its whole life, keeps the service table open in memory (so a
//! change costs the map writes it makes, not a reload of every pinned map), reconciles a
//! desired state (`--config`, `bulkhead apply`), and serves:
//! - the local API on a Unix socket ([`api`]): services, backends, endpoints, sandboxes,
//!   conntrack, stats, a watch stream, and the CLI's own commands, which the `bulkhead` binary
//!   forwards here while an agent runs ([`client`]);
//! - Prometheus metrics ([`metrics`]) and kube-proxy-style health on TCP addresses.
//!
//! Everything that touches the maps runs on a blocking thread under one mutex, in the order
//! requests arrive; the async side only moves bytes. SIGTERM stops the agent and leaves the
//! datapath serving; SIGHUP re-reads the config and reconciles.

pub mod api;
pub mod client;
pub mod metrics;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};
use tracing::{error, info, warn};

use crate::{
    loader::{self, TcMode},
    lock::{Mode, NodeLock},
    node::{self, NodeRecord, Paths},
    services::{
        ServiceSpec, ServiceTable, VirtualAddr,
        desired::{Config, Plan},
        table::{FlowSweep, GRACE, sweep_flows},
    },
    subnet::Subnet,
};

/// The agent's record in the state directory: how the CLI finds it.
pub const RECORD: &str = "agent.json";
/// The API socket's default name in the state directory.
pub const SOCKET: &str = "agent.sock";

static IN_AGENT: AtomicBool = AtomicBool::new(false);

/// Whether this process is an agent that holds its node's lock (commands it runs itself take
/// [`NodeLock::inherited`]).
pub fn in_agent() -> bool {
    IN_AGENT.load(Ordering::Relaxed)
}

#[derive(Debug, Clone)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    /// A group allowed to use the API socket besides root.
    pub api_group: Option<String>,
    pub metrics_address: Option<SocketAddr>,
    pub health_address: Option<SocketAddr>,
    /// How often the agent checks the maps against the desired state.
    pub sync_period: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    pub socket: PathBuf,
}

impl Record {
    pub fn load(state_dir: &Path) -> Option<Self> {
        let text = std::fs::read(state_dir.join(RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("an agent already runs for this node: pid {pid}, API socket {}", socket.display())]
    AlreadyRunning { pid: u32, socket: PathBuf },
    #[error("cannot take the node lock")]
    Lock(#[from] crate::lock::LockError),
    #[error("cannot read the config")]
    Config(#[source] crate::services::desired::DesiredError),
    #[error("cannot bring the node up")]
    Up(#[source] node::NodeError),
    #[error("bad node settings in the config: {0}")]
    NodeConfig(String),
    #[error("cannot open the service table")]
    Table(#[source] crate::services::ServiceTableError),
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the first reconcile failed")]
    Reconcile(#[source] crate::services::desired::DesiredError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("unknown group {0:?} (--api-group)")]
    Group(String),
}

/// What a command forwarded from the CLI produced, as the CLI would have printed it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Executed {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
    /// The command changed the node beyond the service table (sandboxes, published ports,
    /// attachments): the agent re-reads the table.
    #[serde(skip)]
    pub reload: bool,
}

/// Runs the CLI's commands inside the agent (the binary provides it: the CLI lives there).
pub trait Executor: Send + Sync + 'static {
    fn execute(
        &self,
        paths: &Paths,
        table: &mut ServiceTable,
        args: &[String],
        stdin: &str,
    ) -> Executed;
}

/// One change to the service table, as the watch stream sends it.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub revision: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`, as Kubernetes' watch says it.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub service: crate::services::desired::ServiceConfig,
}

/// The node as the agent holds it: only touched under [`Shared::node`].
pub struct Node {
    pub paths: Paths,
    pub table: ServiceTable,
    /// What the maps should hold: the config or the last apply, then every change since.
    desired: BTreeMap<VirtualAddr, ServiceSpec>,
    /// What the table held after the last change, for the watch stream.
    known: BTreeMap<VirtualAddr, ServiceSpec>,
    revision: u64,
    events: broadcast::Sender<Event>,
    /// Conntrack removals the table owes, for the sweeper thread.
    sweeper: std::sync::mpsc::Sender<Vec<FlowSweep>>,
}

impl Node {
    /// Publishes the changes of the services in `touched` (all when `None`) to the watch
    /// stream and takes them into the desired state.
    pub fn changed(&mut self, touched: Option<&[VirtualAddr]>) {
        let owed = self.table.take_flow_sweeps();
        if !owed.is_empty() {
            let _ = self.sweeper.send(owed);
        }
        let keys: Vec<VirtualAddr> = if let Some(t) = touched {
            t.to_vec()
        } else {
            let mut all: Vec<_> = self.known.keys().copied().collect();
            all.extend(self.table.specs().iter().map(|s| s.vaddr));
            all.sort_unstable();
            all.dedup();
            all
        };
        for v in keys {
            let now = self.table.spec_of(&v);
            let before = self.known.get(&v);
            let kind = match (before, &now) {
                (None, Some(_)) => "ADDED",
                (Some(_), None) => "DELETED",
                (Some(b), Some(n)) if b != n => "MODIFIED",
                _ => continue,
            };
            let shown = now
                .clone()
                .or_else(|| before.cloned())
                .expect("one side is there");
            self.revision += 1;
            let _ = self.events.send(Event {
                revision: self.revision,
                kind,
                service: crate::services::desired::ServiceConfig::from_spec(&shown),
            });
            if let Some(spec) = now {
                self.known.insert(v, spec.clone());
                self.desired.insert(v, spec);
            } else {
                self.known.remove(&v);
                self.desired.remove(&v);
            }
        }
    }

    /// Takes `table` as the node's, its flow removals deferred to the sweeper.
    fn adopt(&mut self, mut table: ServiceTable) {
        let owed = self.table.take_flow_sweeps();
        if !owed.is_empty() {
            let _ = self.sweeper.send(owed);
        }
        table.defer_flow_sweeps();
        self.table = table;
    }

    /// Re-reads the table from the maps (after a change made outside it).
    pub fn reload(&mut self) {
        match ServiceTable::open(&self.paths.bpffs) {
            Ok(t) => {
                self.adopt(t);
                self.changed(None);
            }
            Err(e) => error!(error = %e, "re-reading the service table failed"),
        }
    }

    /// Makes the maps match `desired` (replacing the desired state); returns the plan.
    pub fn apply(
        &mut self,
        desired: &[ServiceSpec],
        force: bool,
    ) -> Result<Plan, crate::services::desired::DesiredError> {
        let plan = Plan::new(&self.table.specs(), desired);
        let touched: Vec<VirtualAddr> = plan
            .add
            .iter()
            .chain(plan.delete.iter())
            .map(|s| s.vaddr)
            .chain(plan.change.iter().map(|(_, s)| s.vaddr))
            .collect();
        let result = plan.apply(&mut self.table, force);
        self.changed(Some(&touched));
        self.desired = desired.iter().map(|s| (s.vaddr, s.clone())).collect();
        result.map(|()| plan)
    }

    /// The desired state as a list, ordered by address.
    pub fn desired(&self) -> Vec<ServiceSpec> {
        self.desired.values().cloned().collect()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }
}

/// Reconcile outcomes, for /healthz and the metrics.
#[derive(Debug, Default)]
pub struct Health {
    pub last_sync: Option<Instant>,
    pub last_sync_wall: Option<SystemTime>,
    pub last_error: Option<String>,
    pub ready: bool,
}

/// What every handler shares.
pub struct Shared {
    pub node: Arc<Mutex<Node>>,
    pub events: broadcast::Sender<Event>,
    pub health: StdMutex<Health>,
    pub metrics: metrics::Reconciles,
    pub exec: Arc<dyn Executor>,
    pub options: Options,
    pub paths: Paths,
}

impl Shared {
    /// Runs `f` on the node under the mutex, on a blocking thread.
    pub async fn with_node<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Node) -> T + Send + 'static,
    ) -> T {
        let mut guard = self.node.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut guard))
            .await
            .expect("node work does not panic")
    }

    /// Runs a single-service change (tens of microseconds of map writes) right here on the
    /// runtime's thread under the mutex, without the hop to a blocking thread and back that
    /// dominated the API's tail latency, and commits it: when it replaced a selection table,
    /// the grace period before the old one goes is awaited with the mutex held (no other
    /// change may start), while the thread serves everything else.
    pub async fn with_node_now<T>(self: &Arc<Self>, f: impl FnOnce(&mut Node) -> T) -> T {
        let mut guard = self.node.lock().await;
        let out = f(&mut guard);
        if guard.table.has_retired() {
            tokio::time::sleep(GRACE).await;
            guard.table.remove_retired();
        }
        out
    }

    /// Records a reconcile's outcome.
    pub fn reconciled(&self, started: Instant, result: Result<(), String>) {
        self.metrics.observe(started.elapsed(), result.is_ok());
        let mut h = self.health.lock().expect("health lock");
        match result {
            Ok(()) => {
                h.last_sync = Some(Instant::now());
                h.last_sync_wall = Some(SystemTime::now());
                h.last_error = None;
            }
            Err(e) => h.last_error = Some(e),
        }
    }

    /// kube-proxy's rule: healthy while the last reconcile succeeded less than two sync
    /// periods (at least a minute) ago and the datapath is attached.
    pub fn healthy(&self) -> (bool, String) {
        let h = self.health.lock().expect("health lock");
        let limit = (self.options.sync_period * 2).max(Duration::from_mins(1));
        if let Some(e) = &h.last_error {
            return (false, format!("the last reconcile failed: {e}"));
        }
        match h.last_sync {
            None => return (false, "no reconcile has finished yet".into()),
            Some(t) if t.elapsed() > limit => {
                return (
                    false,
                    format!("the last reconcile finished {:?} ago", t.elapsed()),
                );
            }
            Some(_) => {}
        }
        drop(h);
        match datapath_attached(&self.paths) {
            Ok(()) => (true, "ok".into()),
            Err(why) => (false, why),
        }
    }
}

/// Whether the node's programs are pinned and attached to its bridge.
pub fn datapath_attached(paths: &Paths) -> Result<(), String> {
    let record = NodeRecord::load(paths).map_err(|e| format!("no node: {e}"))?;
    if !paths
        .bpffs
        .join("progs")
        .join(dataplane_common::program::INGRESS)
        .exists()
    {
        return Err("the datapath's programs are not pinned".into());
    }
    if record.mode == TcMode::Tcx && !loader::attached(&paths.bpffs).contains(&record.bridge) {
        return Err(format!("the datapath is not attached to {}", record.bridge));
    }
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(paths: Paths, options: Options, exec: Arc<dyn Executor>) -> Result<(), AgentError> {
    let lock = take_lock(&paths)?;
    IN_AGENT.store(true, Ordering::Relaxed);
    let config = options
        .config
        .as_deref()
        .map(Config::read)
        .transpose()
        .map_err(AgentError::Config)?;
    ensure_up(&paths, config.as_ref())?;
    let mut table = ServiceTable::open(&paths.bpffs).map_err(AgentError::Table)?;
    let swept = table.remove_orphans();
    if swept > 0 {
        warn!(
            backends = swept,
            "removed backends an interrupted change left behind"
        );
    }
    let known: BTreeMap<VirtualAddr, ServiceSpec> =
        table.specs().into_iter().map(|s| (s.vaddr, s)).collect();
    table.defer_flow_sweeps();
    let (events, _) = broadcast::channel(4096);
    let sweeper = spawn_sweeper(paths.bpffs.clone());
    let node = Node {
        paths: paths.clone(),
        table,
        desired: known.clone(),
        known,
        revision: 0,
        events: events.clone(),
        sweeper,
    };
    let shared = Arc::new(Shared {
        node: Arc::new(Mutex::new(node)),
        events,
        health: StdMutex::default(),
        metrics: metrics::Reconciles::default(),
        exec,
        options: options.clone(),
        paths: paths.clone(),
    });
    // One thread serves every connection: a request's work is tens of microseconds, and on
    // a small node a second worker only adds cross-thread wake-ups to the latency tail. Long
    // work (apply, resync, listings of every flow) goes to blocking threads (`with_node`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let result = runtime.block_on(serve(shared, config));
    drop(lock);
    result
}

/// The thread that removes the tracked flows changes leave behind, off the changes' path:
/// listing a conntrack table costs a scan of all its buckets, once per batch here instead of
/// once per change.
fn spawn_sweeper(bpffs: PathBuf) -> std::sync::mpsc::Sender<Vec<FlowSweep>> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<FlowSweep>>();
    let _ = std::thread::Builder::new()
        .name("flow-sweeper".into())
        .spawn(move || {
            while let Ok(mut batch) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                if let Err(e) = sweep_flows(&bpffs, &batch) {
                    warn!(error = %crate::error_chain(&e), "removing the flows of removed backends failed");
                }
            }
        });
    tx
}

fn take_lock(paths: &Paths) -> Result<NodeLock, AgentError> {
    if let Some(r) = Record::load(&paths.state_dir)
        && std::os::unix::net::UnixStream::connect(&r.socket).is_ok()
    {
        return Err(AgentError::AlreadyRunning {
            pid: r.pid,
            socket: r.socket,
        });
    }
    // A command in flight finishes first; an agent that is starting is named by the error.
    Ok(paths.lock(Mode::Exclusive, Some(Duration::from_secs(30)))?)
}

fn ensure_up(paths: &Paths, config: Option<&Config>) -> Result<(), AgentError> {
    let settings = config.and_then(|c| c.node.as_ref());
    if datapath_attached(paths).is_ok() {
        return Ok(());
    }
    let bridge = settings
        .and_then(|n| n.bridge.clone())
        .unwrap_or_else(|| "bulkhead0".into());
    let subnet: Subnet = settings
        .and_then(|n| n.subnet.as_deref())
        .unwrap_or("198.18.0.1/24")
        .parse()
        .map_err(|e| AgentError::NodeConfig(format!("node.subnet: {e}")))?;
    let uplink = settings.and_then(|n| n.uplink.clone());
    info!(bridge, "bringing the node up");
    let report = node::up(
        paths,
        &bridge,
        &node::UpOptions {
            subnet: Some(subnet),
            uplink: uplink.as_deref(),
            datapath_log: None,
            timeouts: loader::ConntrackTimeouts::default(),
            bypass: None,
        },
    )
    .map_err(AgentError::Up)?;
    info!(attached = ?report.record.attached, "datapath attached");
    Ok(())
}

async fn serve(shared: Arc<Shared>, config: Option<Config>) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    if let Some(config) = config {
        let started = Instant::now();
        let specs = config.specs();
        let result = shared.with_node(move |n| n.apply(&specs, false)).await;
        match result {
            Ok(plan) => {
                let (a, c, d) = plan.counts();
                info!(added = a, changed = c, deleted = d, "first reconcile done");
                shared.reconciled(started, Ok(()));
            }
            Err(e) => {
                shared.reconciled(started, Err(e.to_string()));
                return Err(AgentError::Reconcile(e));
            }
        }
    } else {
        shared.reconciled(Instant::now(), Ok(()));
    }
    let socket = shared
        .options
        .api_socket
        .clone()
        .unwrap_or_else(|| shared.paths.state_dir.join(SOCKET));
    let listener = api::bind(&socket, shared.options.api_group.as_deref())?;
    let record = Record {
        pid: std::process::id(),
        socket: socket.clone(),
    };
    let record_path = shared.paths.state_dir.join(RECORD);
    std::fs::write(
        &record_path,
        serde_json::to_vec(&record).expect("a record serialises"),
    )
    .map_err(|source| AgentError::Io {
        action: "write",
        path: record_path.clone(),
        source,
    })?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(api::serve_unix(listener, api::router(shared.clone())));
    if let Some(addr) = shared.options.metrics_address {
        let l = tcp(addr).await?;
        info!(%addr, "serving metrics");
        tasks.spawn(api::serve_tcp(l, api::metrics_router(shared.clone())));
    }
    if let Some(addr) = shared.options.health_address {
        let l = tcp(addr).await?;
        info!(%addr, "serving health");
        tasks.spawn(api::serve_tcp(l, api::health_router(shared.clone())));
    }
    shared.health.lock().expect("health lock").ready = true;
    info!(socket = %socket.display(), "agent ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Runtime)?;
    let mut tick = tokio::time::interval(shared.options.sync_period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload_config(&shared).await,
            _ = tick.tick() => resync(&shared).await,
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("stopping; the datapath keeps serving (`bulkhead down` tears it down)");
    tasks.abort_all();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&record_path);
    Ok(())
}

async fn tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, AgentError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Io {
            action: "listen on",
            path: PathBuf::from(addr.to_string()),
            source,
        })
}

/// SIGHUP: the config again, applied as a diff.
async fn reload_config(shared: &Arc<Shared>) {
    let Some(path) = shared.options.config.clone() else {
        info!("SIGHUP without --config: nothing to reload");
        return;
    };
    let started = Instant::now();
    match Config::read(&path) {
        Err(e) => {
            error!(error = %crate::error_chain(&e), "config not reloaded; the previous one stays");
        }
        Ok(config) => {
            let specs = config.specs();
            let result = shared.with_node(move |n| n.apply(&specs, false)).await;
            match result {
                Ok(plan) => {
                    let (a, c, d) = plan.counts();
                    info!(added = a, changed = c, deleted = d, "config reloaded");
                    shared.reconciled(started, Ok(()));
                }
                Err(e) => {
                    error!(error = %crate::error_chain(&e), "reconcile after reload failed");
                    shared.reconciled(started, Err(e.to_string()));
                }
            }
        }
    }
}

/// The periodic check: the maps as they are against the desired state.
async fn resync(shared: &Arc<Shared>) {
    let started = Instant::now();
    let result = shared
        .with_node(|n| {
            let fresh = ServiceTable::open(&n.paths.bpffs).map_err(|e| e.to_string())?;
            n.adopt(fresh);
            let desired = n.desired();
            n.apply(&desired, false).map_err(|e| e.to_string())
        })
        .await;
    match result {
        Ok(plan) if !plan.is_empty() => {
            let (a, c, d) = plan.counts();
            warn!(
                added = a,
                changed = c,
                deleted = d,
                "the maps had drifted; repaired"
            );
            shared.reconciled(started, Ok(()));
        }
        Ok(_) => shared.reconciled(started, Ok(())),
        Err(e) => {
            error!(error = %e, "resync failed");
            shared.reconciled(started, Err(e));
        }
    }
}
