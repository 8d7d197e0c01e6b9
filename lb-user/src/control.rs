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

use std::{
    os::unix::fs::PermissionsExt,
    path::Path as FsPath,
    sync::{Arc, RwLock},
    time::Instant,
};

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use lb_common::Direction;
use serde::{Deserialize, Serialize};

pub use crate::failover::Change;
use crate::{
    config::HostRole,
    dataplane::MapWriter,
    failover::{engine::LastCheck, Engine},
    flows::{self, Census, FlowView},
    metrics::Metrics,
    net::{Netlink, XdpAttachment},
    plan::CurrentPlan,
    tasks::Background,
};

/// Everything the endpoints read and change. Interior locks only: reading never blocks a
/// failover for longer than one service's decision.
pub struct AgentState {
    /// The plan in force.
    pub plan: CurrentPlan,
    /// The program's maps.
    pub maps: Arc<MapWriter>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The last sweep of the connection table.
    pub census: Arc<std::sync::Mutex<Census>>,
    /// The engine and attachments in force; a reload replaces them.
    running: RwLock<Arc<Running>>,
    /// Where `POST /reload` and `POST /down` hand their request to the agent's main loop.
    requests: tokio::sync::mpsc::Sender<AgentRequest>,
    /// What is known of the pair peer.
    pub peer: Arc<crate::pair::sync::PeerView>,
    /// The census, the pair link and the keepalived follower.
    pub background: Background,
}

/// What a reload replaces: the failover engine and the list of attachments.
pub struct Running {
    /// The failover engine.
    pub engine: Engine,
    /// NICs and the mode the program runs in on each.
    pub interfaces: Vec<InterfaceStatus>,
}

/// Where the outcome of an [`AgentRequest`] goes: a summary, or the error that refused it.
pub type Reply = tokio::sync::oneshot::Sender<Result<String, String>>;

/// What the agent's main loop is asked to do, through the control socket or by the engine.
#[derive(Debug)]
pub enum AgentRequest {
    /// Read the config file again and apply it as a diff.
    Reload(Reply),
    /// Stop, remove the dataplane pinned in `pin_path` (which must be the agent's own),
    /// and exit with [`crate::agent::EXIT_TAKEN_DOWN`] (`lb down`).
    Down {
        /// The pin directory `lb down` means to remove.
        pin_path: std::path::PathBuf,
        /// Told what was removed, just before the agent exits.
        reply: Reply,
    },
}

/// Shared handle on the agent state.
pub type Shared = Arc<AgentState>;

impl AgentState {
    /// The state of a started agent; reload and down requests go to `requests`.
    pub fn new(
        plan: CurrentPlan,
        maps: Arc<MapWriter>,
        metrics: Arc<Metrics>,
        census: Arc<std::sync::Mutex<Census>>,
        running: Running,
        requests: tokio::sync::mpsc::Sender<AgentRequest>,
        peer: Arc<crate::pair::sync::PeerView>,
    ) -> Self {
        AgentState {
            plan,
            maps,
            metrics,
            census,
            running: RwLock::new(Arc::new(running)),
            requests,
            peer,
            background: Background::default(),
        }
    }

    /// A sender of reload requests to the agent's main loop (for reloads the agent decides
    /// itself, such as a NIC made again; their outcome is only logged).
    pub fn reload_requests(&self) -> tokio::sync::mpsc::Sender<AgentRequest> {
        self.requests.clone()
    }

    /// The engine and attachments in force.
    pub fn running(&self) -> Arc<Running> {
        self.running.read().expect("running lock").clone()
    }

    /// Puts `running` in force (a reload); returns what it replaces.
    pub fn replace_running(&self, running: Running) -> Arc<Running> {
        std::mem::replace(
            &mut *self.running.write().expect("running lock"),
            Arc::new(running),
        )
    }

    /// What is wrong with the agent, if anything: an attachment gone from its NIC, a probe
    /// or the carrier watcher dead. Empty when healthy.
    pub async fn problems(&self) -> Vec<String> {
        let running = self.running();
        let mut problems = Vec::new();
        let dead = running.engine.dead_tasks();
        if dead > 0 {
            problems.push(format!(
                "{dead} health probe or carrier watcher task(s) died"
            ));
        }
        for task in self.background.dead() {
            problems.push(format!(
                "the {task} died (its error is in the agent's log); restart the agent \
                 (systemd's watchdog does when configured)"
            ));
        }
        match Netlink::connect() {
            Ok(netlink) => {
                for iface in &running.interfaces {
                    match netlink.link_by_name(&iface.name).await {
                        Ok(link) if link.xdp != XdpAttachment::None => {}
                        Ok(_) => problems.push(format!("no XDP program on {}", iface.name)),
                        Err(e) => problems.push(format!("{}: {e:#}", iface.name)),
                    }
                }
            }
            Err(e) => problems.push(format!("cannot read the NICs: {e:#}")),
        }
        problems
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> Status {
        let running = self.running();
        let services = running
            .engine
            .services
            .iter()
            .map(|runtime| {
                let service = &runtime.plan;
                // A snapshot under the lock; the counters are read after it is released, so a
                // status request never holds up a flip.
                type Health = (bool, String, bool, Vec<Option<LastCheck>>);
                let (active, last_change, health): (Option<usize>, _, Vec<Health>) = {
                    let state = runtime.state.lock().expect("service state lock");
                    let health = state
                        .backends
                        .iter()
                        .map(|b| {
                            let checks = b.last_checks.clone();
                            (b.up, b.last_cause.clone(), b.drained, checks)
                        })
                        .collect();
                    (state.active, state.last_change.clone(), health)
                };
                let now = Instant::now();
                let census = self.census.lock().expect("census lock").counts.clone();
                ServiceStatus {
                    name: service.name.clone(),
                    vip: service.vip.to_string(),
                    protocol: service.protocol.map(|p| format!("{p:?}").to_lowercase()),
                    port: service.port,
                    active: active.map(|p| service.backends[p].name.clone()),
                    last_change,
                    backends: service
                        .backends
                        .iter()
                        .zip(health)
                        .enumerate()
                        .map(|(position, (b, health))| {
                            let forward = self
                                .maps
                                .traffic_of(b.index, Direction::Forward)
                                .unwrap_or_default();
                            let reverse = self
                                .maps
                                .traffic_of(b.index, Direction::Reverse)
                                .unwrap_or_default();
                            let b_name = &b.name;
                            BackendStatus {
                                name: b.name.clone(),
                                ip: b.ip.to_string(),
                                iface: b.iface.clone(),
                                priority: b.priority,
                                up: health.0,
                                health_cause: health.1,
                                active: active == Some(position),
                                drained: health.2,
                                flows: census
                                    .iter()
                                    .filter(|((s, b, _), _)| s == &service.name && b == b_name)
                                    .map(|(_, count)| count)
                                    .sum(),
                                packets_forward: forward.packets,
                                packets_reverse: reverse.packets,
                                checks: b
                                    .health
                                    .checks
                                    .iter()
                                    .zip(health.3)
                                    .map(|(config, last)| CheckStatus {
                                        check: config.name().to_string(),
                                        ok: last.as_ref().map(|l| l.ok),
                                        ago_ms: last.as_ref().map(|l| {
                                            now.saturating_duration_since(l.at).as_secs_f64() * 1e3
                                        }),
                                        error: last.and_then(|l| l.error),
                                    })
                                    .collect(),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            role: self.maps.role().ok(),
            pair: self.plan.get().pair.is_some(),
            peer: self.peer.status(),
            services,
            interfaces: running.interfaces.clone(),
        }
    }
}

/// `/status` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This host's role (`active`, or `standby` in a pair), as the program reads it.
    #[serde(default)]
    pub role: Option<HostRole>,
    /// Whether the agent runs in pair mode.
    #[serde(default)]
    pub pair: bool,
    /// The pair peer, when one is named (`[pair] peer`).
    #[serde(default)]
    pub peer: Option<crate::pair::sync::PeerStatus>,
    /// Every service.
    pub services: Vec<ServiceStatus>,
    /// Every NIC the program is attached to.
    pub interfaces: Vec<InterfaceStatus>,
}

/// One service in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: String,
    /// `tcp`, `udp` or absent (every protocol).
    pub protocol: Option<String>,
    /// Port or absent (every port).
    pub port: Option<u16>,
    /// Name of the active backend; absent when none serves.
    pub active: Option<String>,
    /// Last change of active backend.
    pub last_change: Option<Change>,
    /// Backends, highest priority first.
    pub backends: Vec<BackendStatus>,
}

/// One backend in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub ip: String,
    /// NIC it is reached through.
    pub iface: String,
    /// Priority.
    pub priority: i32,
    /// Whether it passes its health checks.
    pub up: bool,
    /// Why its health last changed.
    pub health_cause: String,
    /// Whether it is the active backend.
    pub active: bool,
    /// Taken out of service by `lb drain`.
    #[serde(default)]
    pub drained: bool,
    /// Live flows on it, as of the last sweep of the connection table.
    #[serde(default)]
    pub flows: u64,
    /// Packets rewritten toward it.
    pub packets_forward: u64,
    /// Reply packets rewritten from it.
    pub packets_reverse: u64,
    /// Each health check's last result.
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
}

/// The last result of one health check in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckStatus {
    /// The check's type (`link`, `udp`, …).
    pub check: String,
    /// Whether its last probe passed; absent before the first one.
    pub ok: Option<bool>,
    /// Why it failed.
    pub error: Option<String>,
    /// How long ago the last probe completed, in milliseconds.
    pub ago_ms: Option<f64>,
}

/// One NIC in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Name.
    pub name: String,
    /// `native` or `skb`, as the kernel reports it.
    pub mode: String,
    /// Whether the attachment was taken over from an earlier agent.
    #[serde(default)]
    pub adopted: bool,
}

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
