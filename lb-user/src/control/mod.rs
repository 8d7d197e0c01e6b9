//! The agent's endpoints.
//!
//! - HTTP on `metrics_listen`, read only: `/metrics`, `/healthz`, `/status` (JSON),
//!   `/flows` (the connection table) — [`read_router`];
//! - the control socket (`control_socket`, a Unix socket only root may open): the same,
//!   plus what changes state: `POST /services/{service}/activate/{backend}`,
//!   `…/drain/{backend}`, `…/undrain/{backend}`, `POST /reload`, `POST /role/{role}`
//!   (pair mode) and `POST /down` — [`control_router`].
//!   Every `lb` command but `run`, `check-config` and `demo` talks to it (`down` only
//!   while an agent runs).

mod state;
mod status;

use std::{os::unix::fs::PermissionsExt, path::Path as FsPath};

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;

pub use self::{
    state::{AgentRequest, AgentState, Reply, Running, Shared},
    status::{BackendStatus, CheckStatus, InterfaceStatus, ServiceStatus, Status},
};
pub use crate::failover::Change;
use crate::{
    config::HostRole,
    flows::{self, FlowView},
};

/// The read-only routes, served on `metrics_listen`.
pub fn read_router(state: Shared) -> Router {
    read_routes().with_state(state)
}

/// Every route, served on the control socket.
pub fn control_router(state: Shared) -> Router {
    read_routes()
        .route("/services/{service}/activate/{backend}", post(activate))
        .route("/services/{service}/drain/{backend}", post(drain))
        .route("/services/{service}/undrain/{backend}", post(undrain))
        .route("/reload", post(reload))
        .route("/down", post(down))
        .route("/role/{role}", post(set_role))
        .with_state(state)
}

fn read_routes() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/flows", get(list_flows))
}

/// Binds the control socket at `path`: its directory is made if missing, a socket file no
/// one listens on any more is replaced, and only root may connect (mode 0600).
pub fn bind_control_socket(path: &FsPath) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another lb agent listens on control socket {} (give each agent its own \
                 control_socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale control socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to root", path.display()))?;
    Ok(listener)
}

/// `/healthz`: `ok`, or 503 with what is wrong.
async fn healthz(State(state): State<Shared>) -> (StatusCode, String) {
    let problems = state.problems().await;
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
    }
}

/// `POST /reload`: handed to the agent's main loop; answers with its outcome.
async fn reload(State(state): State<Shared>) -> (StatusCode, String) {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    ask_main_loop(&state, AgentRequest::Reload(reply), outcome).await
}

/// Where `lb down` says which dataplane it means.
#[derive(Debug, Deserialize)]
struct DownTarget {
    pin_path: std::path::PathBuf,
}

/// `POST /down?pin_path=DIR`: handed to the agent's main loop, which removes the dataplane
/// and answers with what it removed before it exits.
async fn down(
    State(state): State<Shared>,
    Query(target): Query<DownTarget>,
) -> (StatusCode, String) {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let request = AgentRequest::Down {
        pin_path: target.pin_path,
        reply,
    };
    ask_main_loop(&state, request, outcome).await
}

/// Sends `request` to the agent's main loop and answers with its `outcome`.
async fn ask_main_loop(
    state: &AgentState,
    request: AgentRequest,
    outcome: tokio::sync::oneshot::Receiver<Result<String, String>>,
) -> (StatusCode, String) {
    if state.requests.send(request).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping\n".into(),
        );
    }
    match outcome.await {
        Ok(Ok(summary)) => (StatusCode::OK, format!("{summary}\n")),
        Ok(Err(error)) => (StatusCode::BAD_REQUEST, format!("{error}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping\n".into(),
        ),
    }
}

/// Filters of `/flows`.
#[derive(Debug, Deserialize)]
struct FlowFilter {
    service: Option<String>,
    backend: Option<String>,
}

async fn list_flows(
    State(state): State<Shared>,
    Query(filter): Query<FlowFilter>,
) -> Result<Json<Vec<FlowView>>, (StatusCode, String)> {
    let plan = state.plan.get();
    if let Some(service) = &filter.service {
        let planned = plan
            .service(service)
            .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}\n")))?;
        if let Some(backend) = &filter.backend {
            planned
                .backend(backend)
                .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}\n")))?;
        }
    }
    // One syscall per table entry: off the runtime's thread.
    let listed = tokio::task::spawn_blocking(move || {
        flows::list(
            &plan,
            &state.maps,
            filter.service.as_deref(),
            filter.backend.as_deref(),
        )
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?;
    listed
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")))
}

async fn drain(
    State(state): State<Shared>,
    Path((service, backend)): Path<(String, String)>,
) -> Result<Json<Change>, (StatusCode, String)> {
    set_drained(&state, &service, &backend, true)
}

async fn undrain(
    State(state): State<Shared>,
    Path((service, backend)): Path<(String, String)>,
) -> Result<Json<Change>, (StatusCode, String)> {
    set_drained(&state, &service, &backend, false)
}

fn set_drained(
    state: &Shared,
    service: &str,
    backend: &str,
    drained: bool,
) -> Result<Json<Change>, (StatusCode, String)> {
    let running = state.running();
    let runtime = running
        .engine
        .service(service)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}\n")))?;
    if let Err(e) = runtime.plan.backend(backend) {
        return Err((StatusCode::NOT_FOUND, format!("{e:#}\n")));
    }
    runtime
        .set_drained(backend, drained)
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")))
}

async fn status(State(state): State<Shared>) -> Json<Status> {
    Json(state.status())
}

/// `/metrics`: the classic Prometheus text format, or OpenMetrics when the scraper asks
/// for it.
async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.encode_openmetrics(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_prometheus(),
        )
    }
}

/// `?why=` of `POST /role/{role}`: who asked (keepalived's instance and state), for the log.
#[derive(Deserialize)]
struct RoleReason {
    why: Option<String>,
}

async fn set_role(
    State(state): State<Shared>,
    Path(role): Path<String>,
    Query(reason): Query<RoleReason>,
) -> (StatusCode, String) {
    let Ok(role) = <HostRole as clap::ValueEnum>::from_str(&role, false) else {
        return (
            StatusCode::NOT_FOUND,
            format!("unknown role {role:?}: active or standby\n"),
        );
    };
    let plan = state.plan.get();
    let why = reason
        .why
        .as_deref()
        .unwrap_or("asked through the control socket");
    match crate::pair::set(&state.maps, &plan, role, why) {
        Ok(done) => (StatusCode::OK, format!("{done}\n")),
        Err(e) => (StatusCode::CONFLICT, format!("{e:#}\n")),
    }
}

async fn activate(
    State(state): State<Shared>,
    Path((service, backend)): Path<(String, String)>,
) -> Result<Json<Change>, (StatusCode, String)> {
    let running = state.running();
    let runtime = running
        .engine
        .service(&service)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}\n")))?;
    if runtime.plan.backend(&backend).is_err() {
        let e = runtime.plan.backend(&backend).unwrap_err();
        return Err((StatusCode::NOT_FOUND, format!("{e:#}\n")));
    }
    runtime
        .activate(&backend)
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")))
}
