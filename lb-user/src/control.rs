//! The agent's HTTP endpoint: `/healthz`, `/status` (JSON, what `lb status` prints) and
//! `POST /services/{service}/activate/{backend}` (manual failover, what `lb activate` sends).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use lb_common::Direction;
use serde::{Deserialize, Serialize};

use crate::{dataplane::Dataplane, plan::Plan};

/// Everything the endpoint reads and changes, behind one lock.
pub struct AgentState {
    /// The resolved plan.
    pub plan: Plan,
    /// The loaded, attached program.
    pub dataplane: Dataplane,
    /// Per service: position of the active backend in its `backends`, if any.
    pub active: Vec<Option<usize>>,
    /// Per service: the last change of active backend.
    pub last_change: Vec<Option<Change>>,
}

/// A change of a service's active backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// Previous backend name.
    pub from: Option<String>,
    /// New backend name.
    pub to: Option<String>,
    /// Why.
    pub cause: String,
    /// When, as seconds since the Unix epoch.
    pub at_unix_s: f64,
    /// Time the map write took, in microseconds.
    pub write_us: f64,
}

/// Shared handle on the agent state.
pub type Shared = Arc<Mutex<AgentState>>;

impl AgentState {
    /// State for a freshly written plan: every service on its first backend.
    pub fn new(plan: Plan, dataplane: Dataplane) -> Self {
        let active = plan
            .services
            .iter()
            .map(|s| (!s.backends.is_empty()).then_some(0))
            .collect();
        let last_change = vec![None; plan.services.len()];
        AgentState {
            plan,
            dataplane,
            active,
            last_change,
        }
    }

    /// Makes `backend` the active backend of `service`; returns the change made.
    pub fn activate(&mut self, service: &str, backend: &str, cause: &str) -> Result<Change> {
        let svc = self.plan.service(service)?;
        let position = svc.backends.iter().position(|b| b.name == backend);
        let target = svc.backend(backend)?;
        let (id, index) = (svc.id, target.index);
        let from = self.active[id as usize].map(|p| svc.backends[p].name.clone());
        let started = Instant::now();
        self.dataplane.maps.set_active(id, index)?;
        let write = started.elapsed();
        let change = Change {
            from,
            to: Some(backend.to_string()),
            cause: cause.to_string(),
            at_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64(),
            write_us: write.as_secs_f64() * 1e6,
        };
        self.active[id as usize] = position;
        self.last_change[id as usize] = Some(change.clone());
        tracing::info!(
            service,
            from = change.from.as_deref().unwrap_or("-"),
            to = backend,
            cause,
            write_us = change.write_us,
            "active backend changed"
        );
        Ok(change)
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> Status {
        let services = self
            .plan
            .services
            .iter()
            .map(|service| {
                let active = self.active[service.id as usize];
                ServiceStatus {
                    name: service.name.clone(),
                    vip: service.vip.to_string(),
                    protocol: service.protocol.map(|p| format!("{p:?}").to_lowercase()),
                    port: service.port,
                    active: active.map(|p| service.backends[p].name.clone()),
                    last_change: self.last_change[service.id as usize].clone(),
                    backends: service
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(position, b)| {
                            let maps = &self.dataplane.maps;
                            let forward = maps
                                .traffic_of(b.index, Direction::Forward)
                                .unwrap_or_default();
                            let reverse = maps
                                .traffic_of(b.index, Direction::Reverse)
                                .unwrap_or_default();
                            BackendStatus {
                                name: b.name.clone(),
                                ip: b.ip.to_string(),
                                iface: b.iface.clone(),
                                priority: b.priority,
                                active: active == Some(position),
                                packets_forward: forward.packets,
                                packets_reverse: reverse.packets,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        let interfaces = self
            .dataplane
            .attachments()
            .iter()
            .map(|a| InterfaceStatus {
                name: a.iface.clone(),
                mode: format!("{:?}", a.mode).to_lowercase(),
            })
            .collect();
        Status {
            services,
            interfaces,
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
        .route("/services/{service}/activate/{backend}", post(activate))
        .with_state(state)
}

async fn status(State(state): State<Shared>) -> Json<Status> {
    Json(state.lock().expect("agent state lock").status())
}

async fn activate(
    State(state): State<Shared>,
    Path((service, backend)): Path<(String, String)>,
) -> Result<Json<Change>, (StatusCode, String)> {
    let mut state = state.lock().expect("agent state lock");
    state
        .activate(&service, &backend, "manual activation")
        .map(Json)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}\n")))
}
