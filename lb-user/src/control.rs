//! The agent's HTTP endpoint: `/healthz`, `/status` (JSON, what `lb status` prints),
//! `/flows` (the connection table, what `lb flows` prints), and the manual actions
//! `POST /services/{service}/activate/{backend}`, `…/drain/{backend}` and
//! `…/undrain/{backend}` (what `lb activate`, `lb drain` and `lb undrain` send).

use std::sync::Arc;

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
    dataplane::MapWriter,
    failover::Engine,
    flows::{self, Census, FlowView},
    metrics::Metrics,
    plan::Plan,
};

/// Everything the endpoint reads and changes. Interior locks only: reading never blocks a
/// failover for longer than one service's decision.
pub struct AgentState {
    /// The resolved plan.
    pub plan: Plan,
    /// The program's maps.
    pub maps: Arc<MapWriter>,
    /// The failover engine.
    pub engine: Engine,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// NICs and the mode the program runs in on each.
    pub interfaces: Vec<InterfaceStatus>,
    /// The last sweep of the connection table.
    pub census: Arc<std::sync::Mutex<Census>>,
}

/// Shared handle on the agent state.
pub type Shared = Arc<AgentState>;

impl AgentState {
    /// A snapshot for `/status`.
    pub fn status(&self) -> Status {
        let services = self
            .engine
            .services
            .iter()
            .map(|runtime| {
                let service = &runtime.plan;
                // A snapshot under the lock; the counters are read after it is released, so a
                // status request never holds up a flip.
                let (active, last_change, health): (Option<usize>, _, Vec<(bool, String, bool)>) = {
                    let state = runtime.state.lock().expect("service state lock");
                    let health = state
                        .backends
                        .iter()
                        .map(|b| (b.up, b.last_cause.clone(), b.drained))
                        .collect();
                    (state.active, state.last_change.clone(), health)
                };
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
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            services,
            interfaces: self.interfaces.clone(),
        }
    }
}

/// `/status` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
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

/// The endpoint's routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/flows", get(list_flows))
        .route("/services/{service}/activate/{backend}", post(activate))
        .route("/services/{service}/drain/{backend}", post(drain))
        .route("/services/{service}/undrain/{backend}", post(undrain))
        .with_state(state)
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
    if let Some(service) = &filter.service {
        let planned = state
            .plan
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
            &state.plan,
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
    let runtime = state
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

async fn activate(
    State(state): State<Shared>,
    Path((service, backend)): Path<(String, String)>,
) -> Result<Json<Change>, (StatusCode, String)> {
    let runtime = state
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
