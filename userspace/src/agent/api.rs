//! The agent's HTTP/1.1 API: JSON on a Unix socket (docs/api/openapi.yaml describes it), and
//! the metrics and health listeners on TCP.
//!
//! Errors are `{"error": "..."}` with a 4xx status for what the request got wrong (bad input
//! 400, unknown service or backend 404, conflicts 409) and 5xx for what the node could not do;
//! a refused request changes nothing.

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;

use super::{AgentError, Executed, Node, Shared};
use crate::{
    node,
    services::{
        BackendSpec, ServiceTableError, VirtualAddr,
        desired::{Config, DesiredError, ServiceConfig},
    },
};

type S = State<Arc<Shared>>;

/// The largest request body taken (a whole desired state).
pub const MAX_BODY: usize = 256 << 20;

/// An error as the API answers it.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ServiceTableError> for ApiError {
    fn from(e: ServiceTableError) -> Self {
        let status = match &e {
            ServiceTableError::Parse { .. }
            | ServiceTableError::DuplicateBackend { .. }
            | ServiceTableError::TooManyBackends { .. }
            | ServiceTableError::Restore { .. } => StatusCode::BAD_REQUEST,
            ServiceTableError::Unknown { .. } | ServiceTableError::UnknownBackend { .. } => {
                StatusCode::NOT_FOUND
            }
            ServiceTableError::Duplicate { .. }
            | ServiceTableError::NodePortInUse { .. }
            | ServiceTableError::Full { .. } => StatusCode::CONFLICT,
            ServiceTableError::Map { .. } | ServiceTableError::Loader(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, crate::error_chain(&e))
    }
}

impl From<DesiredError> for ApiError {
    fn from(e: DesiredError) -> Self {
        let status = match &e {
            DesiredError::Apply { source, .. } => ApiError::from_ref(source),
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, crate::error_chain(&e))
    }
}

impl ApiError {
    fn from_ref(e: &ServiceTableError) -> StatusCode {
        match e {
            ServiceTableError::Map { .. } | ServiceTableError::Loader(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::CONFLICT,
        }
    }

    fn bad(why: impl std::fmt::Display) -> Self {
        ApiError(StatusCode::BAD_REQUEST, why.to_string())
    }
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Binds the API socket: root only (0600), or root and `group` (0660).
pub fn bind(path: &Path, group: Option<&str>) -> Result<tokio::net::UnixListener, AgentError> {
    let io = |action, source| AgentError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    // The socket of an agent that was killed: nothing answers on it (checked under the lock).
    let _ = std::fs::remove_file(path);
    let gid = group
        .map(|g| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid)
                .ok_or_else(|| AgentError::Group(g.to_owned()))
        })
        .transpose()?;
    // No window in which the socket is open to others: created 0600, widened after.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| io("listen on", e))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| io("change the group of", e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| io("set the mode of", e))?;
    }
    Ok(listener)
}

pub async fn serve_unix(listener: tokio::net::UnixListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "the API server stopped");
    }
}

pub async fn serve_tcp(listener: tokio::net::TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "a TCP server stopped");
    }
}

/// The API on the Unix socket.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/services", get(list_services).post(add_service))
        .route(
            "/v1/services/{proto}/{address}",
            get(get_service).put(put_service).delete(delete_service),
        )
        .route("/v1/services/{proto}/{address}/backends", post(add_backend))
        .route(
            "/v1/services/{proto}/{address}/backends/{backend}",
            axum::routing::delete(delete_backend),
        )
        .route(
            "/v1/services/{proto}/{address}/backends/{backend}/drain",
            post(drain_backend),
        )
        .route("/v1/desired", get(desired))
        .route("/v1/apply", post(apply))
        .route("/v1/endpoints", get(endpoints))
        .route("/v1/sandboxes", get(sandboxes))
        .route("/v1/conntrack", get(conntrack).delete(flush_conntrack))
        .route("/v1/conntrack/stats", get(conntrack_stats))
        .route("/v1/stats", get(stats))
        .route("/v1/watch", get(watch))
        .route("/v1/cli", post(cli))
        .route("/v1/hold", post(hold))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such path".into()) })
        // A desired state of 100,000 services is about 10 MB of YAML.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
}

pub fn health_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

fn vaddr(proto: &str, address: &str) -> Result<VirtualAddr> {
    Ok(format!("{address}/{proto}").parse::<VirtualAddr>()?)
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("request body: {e}")))
}

async fn list_services(State(s): S) -> Json<Vec<crate::services::ServiceInfo>> {
    Json(s.with_node(|n| n.table.list()).await)
}

async fn get_service(
    State(s): S,
    UrlPath((proto, address)): UrlPath<(String, String)>,
) -> Result<Json<ServiceConfig>> {
    let v = vaddr(&proto, &address)?;
    s.with_node(move |n| n.table.spec_of(&v))
        .await
        .map(|spec| Json(ServiceConfig::from_spec(&spec)))
        .ok_or(ApiError(StatusCode::NOT_FOUND, format!("no service {v}")))
}

async fn add_service(State(s): S, body: Bytes) -> Result<(StatusCode, Json<ServiceConfig>)> {
    let config: ServiceConfig = json_body::<ServiceConfig>(&body)?.checked()?;
    let spec = config.spec();
    s.with_node_now(move |n| {
        n.table.add(&spec)?;
        n.changed(Some(&[spec.vaddr]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(config)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn put_service(
    State(s): S,
    UrlPath((proto, address)): UrlPath<(String, String)>,
    Query(q): Query<Force>,
    body: Bytes,
) -> Result<Json<ServiceConfig>> {
    let v = vaddr(&proto, &address)?;
    let config: ServiceConfig = json_body::<ServiceConfig>(&body)?.checked()?;
    if config.address != v {
        return Err(ApiError::bad(format!(
            "the body's address {} is not the path's {v}",
            config.address
        )));
    }
    let spec = config.spec();
    s.with_node_now(move |n| {
        n.table.update(&spec, q.force)?;
        n.changed(Some(&[v]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(Json(config))
}

async fn delete_service(
    State(s): S,
    UrlPath((proto, address)): UrlPath<(String, String)>,
) -> Result<StatusCode> {
    let v = vaddr(&proto, &address)?;
    s.with_node_now(move |n| {
        n.table.delete(&v)?;
        n.changed(Some(&[v]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendBody {
    address: String,
    #[serde(default = "one")]
    weight: u16,
}

fn one() -> u16 {
    1
}

async fn add_backend(
    State(s): S,
    UrlPath((proto, address)): UrlPath<(String, String)>,
    body: Bytes,
) -> Result<StatusCode> {
    let v = vaddr(&proto, &address)?;
    let b: BackendBody = json_body(&body)?;
    let spec = BackendSpec {
        weight: b.weight,
        ..b.address.parse::<BackendSpec>()?
    };
    s.with_node_now(move |n| {
        n.table.add_backend(&v, &spec)?;
        n.changed(Some(&[v]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(StatusCode::CREATED)
}

fn backend_addr(text: &str) -> Result<SocketAddrV4> {
    Ok(text.parse::<BackendSpec>()?.addr)
}

async fn delete_backend(
    State(s): S,
    UrlPath((proto, address, backend)): UrlPath<(String, String, String)>,
    Query(q): Query<Force>,
) -> Result<StatusCode> {
    let v = vaddr(&proto, &address)?;
    let addr = backend_addr(&backend)?;
    s.with_node_now(move |n| {
        n.table.delete_backend(&v, addr, q.force)?;
        n.changed(Some(&[v]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn drain_backend(
    State(s): S,
    UrlPath((proto, address, backend)): UrlPath<(String, String, String)>,
) -> Result<StatusCode> {
    let v = vaddr(&proto, &address)?;
    let addr = backend_addr(&backend)?;
    s.with_node_now(move |n| {
        n.table.drain_backend(&v, addr)?;
        n.changed(Some(&[v]));
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The desired state in the config's schema.
async fn desired(State(s): S) -> Json<Config> {
    let specs = s.with_node(|n| n.desired()).await;
    Json(Config {
        node: None,
        services: specs.iter().map(ServiceConfig::from_spec).collect(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
}

/// `bulkhead apply` and `diff`: the body is the YAML file (JSON is YAML too).
async fn apply(State(s): S, Query(q): Query<ApplyQuery>, body: Bytes) -> Result<Response> {
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad("the body is not UTF-8"))?;
    let config = Config::parse(text)?;
    let specs = config.specs();
    let started = Instant::now();
    let result = s
        .with_node(move |n| {
            if q.dry_run {
                Ok(crate::services::desired::Plan::new(
                    &n.table.specs(),
                    &specs,
                ))
            } else {
                n.apply(&specs, q.force)
            }
        })
        .await;
    if !q.dry_run {
        s.reconciled(
            started,
            result.as_ref().map(|_| ()).map_err(ToString::to_string),
        );
    }
    let plan = result?;
    let (added, changed, deleted) = plan.counts();
    Ok(Json(json!({
        "dry_run": q.dry_run,
        "added": added,
        "changed": changed,
        "deleted": deleted,
        "diff": plan.to_string(),
        "plan": plan,
    }))
    .into_response())
}

async fn endpoints(State(s): S) -> Result<Json<Vec<node::EndpointInfo>>> {
    let paths = s.paths.clone();
    tokio::task::spawn_blocking(move || node::endpoints(&paths))
        .await
        .expect("no panic")
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e)))
}

async fn sandboxes(State(s): S) -> Json<Vec<crate::sandbox::Status>> {
    let paths = s.paths.clone();
    Json(
        tokio::task::spawn_blocking(move || crate::sandbox::statuses(&paths))
            .await
            .expect("no panic"),
    )
}

async fn conntrack(State(s): S) -> Json<Vec<crate::services::FlowInfo>> {
    Json(s.with_node(|n| n.table.flows()).await)
}

async fn conntrack_stats(State(s): S) -> Json<Vec<crate::services::ConntrackStats>> {
    Json(s.with_node(|n| n.table.conntrack_stats()).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushQuery {
    service: Option<String>,
}

async fn flush_conntrack(
    State(s): S,
    Query(q): Query<FlushQuery>,
) -> Result<Json<serde_json::Value>> {
    let service = q.service.map(|t| t.parse::<VirtualAddr>()).transpose()?;
    let n = s
        .with_node(move |n| {
            Ok::<_, ApiError>(match service {
                None => n.table.flush_flows(|_, _| true),
                Some(v) => {
                    let id = n.table.service_id(&v)?;
                    n.table.flush_flows(|_, f| f.service_id == id)
                }
            })
        })
        .await?;
    Ok(Json(json!({ "flushed": n })))
}

async fn stats(State(s): S) -> Result<Json<node::Stats>> {
    let paths = s.paths.clone();
    tokio::task::spawn_blocking(move || node::stats(&paths))
        .await
        .expect("no panic")
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e)))
}

/// Newline-delimited JSON: a `BOOKMARK` with the current revision, then one line per change
/// (`ADDED`, `MODIFIED`, `DELETED`). A client that falls behind gets an `ERROR` line and the
/// end of the stream, and lists again (Kubernetes' 410 Gone, in-band).
async fn watch(State(s): S) -> Response {
    let rx = s.events.subscribe();
    let revision = s.with_node(|n| n.revision()).await;
    let first = format!("{}\n", json!({ "type": "BOOKMARK", "revision": revision }));
    let stream = futures_util::stream::unfold((Some(first), Some(rx)), |(first, rx)| async move {
        if let Some(line) = first {
            return Some((Ok::<_, Infallible>(Bytes::from(line)), (None, rx)));
        }
        let mut rx = rx?;
        match rx.recv().await {
            Ok(e) => {
                let line = format!("{}\n", serde_json::to_string(&e).expect("serialises"));
                Some((Ok(Bytes::from(line)), (None, Some(rx))))
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let line = format!(
                    "{}\n",
                    json!({ "type": "ERROR", "message": format!("{n} changes missed: list again") })
                );
                Some((Ok(Bytes::from(line)), (None, None)))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CliRequest {
    args: Vec<String>,
    #[serde(default)]
    stdin: String,
}

/// A CLI command, run here as the CLI would run it, with its output and exit code.
async fn cli(State(s): S, body: Bytes) -> Result<Json<Executed>> {
    let req: CliRequest = json_body(&body)?;
    let exec = s.exec.clone();
    Ok(Json(
        s.with_node(move |n| {
            let out = exec.execute(&n.paths, &mut n.table, &req.args, &req.stdin);
            if out.reload {
                n.reload();
            } else {
                n.changed(None);
            }
            out
        })
        .await,
    ))
}

/// Keeps the node's mutex for the caller until it hangs up (a `bulkhead run` creating its
/// sandbox: the lock it would take is the agent's), then re-reads the table.
async fn hold(State(s): S) -> Response {
    struct Held(Option<tokio::sync::OwnedMutexGuard<Node>>);
    impl Drop for Held {
        fn drop(&mut self) {
            if let Some(mut node) = self.0.take() {
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn_blocking(move || node.reload());
                    }
                    Err(_) => node.reload(),
                }
            }
        }
    }
    let guard = s.node.clone().lock_owned().await;
    let held = Held(Some(guard));
    // A heartbeat: writing it is how a hang-up is noticed.
    let stream = futures_util::stream::unfold((held, true), |(held, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from_static(b"\n")),
            (held, false),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// kube-proxy's /healthz: 200 while the last reconcile succeeded recently and the datapath
/// is attached, 503 otherwise, with the reason.
async fn healthz(State(s): S) -> Response {
    let (ok, why) = s.healthy();
    let last = s
        .health
        .lock()
        .expect("health lock")
        .last_sync_wall
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "healthy": ok, "reason": why, "lastUpdated": last })),
    )
        .into_response()
}

/// 200 once the first reconcile is done and the API is up.
async fn readyz(State(s): S) -> Response {
    if s.health.lock().expect("health lock").ready {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): S) -> Response {
    let shared = s.clone();
    let text = s
        .with_node(move |n| super::metrics::render(n, &shared))
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
