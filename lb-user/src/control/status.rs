//! `/status`: a snapshot of every service, backend and check, and of the NICs.

use std::time::Instant;

use lb_common::Direction;
use serde::{Deserialize, Serialize};

use super::AgentState;
use crate::{
    config::HostRole,
    failover::{engine::LastCheck, Change},
};

impl AgentState {
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
