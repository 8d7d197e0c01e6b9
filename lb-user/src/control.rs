//! The agent's HTTP endpoint: `/healthz`, `/status` (JSON, what `lb status` prints) and
//! `POST /services/{service}/activate/{backend}` (manual failover, what `lb activate` sends).

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use lb_common::Direction;
use serde::{Deserialize, Serialize};

pub use crate::failover::Change;
use crate::{dataplane::MapWriter, failover::Engine, metrics::Metrics, plan::Plan};

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
                let (active, last_change, health): (Option<usize>, _, Vec<(bool, String)>) = {
                    let state = runtime.state.lock().expect("service state lock");
                    let health = state
                        .backends
                        .iter()
                        .map(|b| (b.up, b.last_cause.clone()))
                        .collect();
                    (state.active, state.last_change.clone(), health)
                };
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
                            BackendStatus {
                                name: b.name.clone(),
                                ip: b.ip.to_string(),
                                iface: b.iface.clone(),
                                priority: b.priority,
                                up: health.0,
                                health_cause: health.1,
                                active: active == Some(position),
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
    /// `native` or `skb`.
    pub mode: String,
}

/// The endpoint's routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/services/{service}/activate/{backend}", post(activate))
        .with_state(state)
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
