//! One service under failover: its backends' state behind one lock, and the decisions —
//! a check's verdict, a carrier lost, an operator's drain or activation — each taken and
//! written (the flip) in the task that brought the evidence.

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use lb_common::{KEEP_FOREVER, NO_BACKEND};
use serde::{Deserialize, Serialize};

use super::policy::{choose, Candidate, CheckCounter};
use crate::{
    config::{CheckConfig, Failback},
    dataplane::{writer::monotonic_ns, MapWriter},
    health::{pipeline::NextMiss, Carriers},
    metrics::{BackendLabels, FailoverLabels, Metrics, ServiceLabels},
    net::events::CarrierEvent,
    plan::{PlannedBackend, PlannedService},
};

/// A change of a service's active backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// Previous backend name (absent: none was active).
    pub from: Option<String>,
    /// New backend name (absent: traffic is dropped).
    pub to: Option<String>,
    /// What decided it.
    pub cause: String,
    /// When, in seconds since the Unix epoch.
    pub at_unix_s: f64,
    /// Time from the deciding event to the completed map write, in microseconds.
    pub flip_us: f64,
    /// Of `flip_us`, the time from the event until the agent acted on it: for a deadline,
    /// how late the prober ran after it; about 0 for an answer or an event read as it came.
    #[serde(default)]
    pub waited_us: f64,
}

/// When the evidence for a decision existed, and when the agent acted on it. A flip is
/// timed from the first; the time to the second is the agent waiting to run, reported
/// apart ([`Change::waited_us`]).
#[derive(Debug, Clone, Copy)]
pub struct Evidence {
    /// When it existed: an answer read, a deadline passed, a carrier event received.
    pub at: Instant,
    /// When the agent acted on it.
    pub seen: Instant,
}

impl Evidence {
    /// Evidence acted on as it came.
    pub fn now() -> Self {
        let now = Instant::now();
        Evidence { at: now, seen: now }
    }
}

/// Health of one backend.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// One counter per check, in the order of the backend's `health.checks`.
    pub checks: Vec<CheckCounter>,
    /// All checks up.
    pub up: bool,
    /// Since when it has been up.
    pub up_since: Option<Instant>,
    /// Why it last changed state.
    pub last_cause: String,
    /// Up only by presumption since the agent started (a new service's backends, an
    /// adopted service's active one), until every check has passed `rise` times; then
    /// `last_cause` says so.
    pub presumed: bool,
    /// Taken out of service by `lb drain`: it gets no new flows, whatever its health.
    pub drained: bool,
    /// Until when it may keep its sticky flows while healthy (written to `KEEP`; 0 is
    /// written instead while it is down, and this is restored when it is up again).
    pub keep_until: u64,
    /// Whether its MAC is known; a backend whose MAC is not is down whatever its checks say.
    pub mac_known: bool,
    /// The last result of each check, in the order of `checks`.
    pub last_checks: Vec<Option<LastCheck>>,
}

/// The last result of one health check.
#[derive(Debug, Clone)]
pub struct LastCheck {
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// When it completed.
    pub at: Instant,
}

/// Mutable state of one service.
#[derive(Debug)]
pub struct ServiceState {
    /// Backends, in the plan's (priority) order.
    pub backends: Vec<BackendState>,
    /// Position of the active backend; `None` when traffic is dropped.
    pub active: Option<usize>,
    /// The last change.
    pub last_change: Option<Change>,
    pub(super) recheck_at: Option<Instant>,
}

/// What a health change did, logged once every flip it caused is written.
pub struct Report {
    service: Arc<ServiceRuntime>,
    backend: usize,
    cause: String,
    change: Option<Change>,
}

impl Report {
    /// One line for the health change, one for the flip it caused, if any.
    pub fn log(&self) {
        let plan = &self.service.plan;
        let up = self
            .service
            .state
            .lock()
            .expect("service state lock")
            .backends[self.backend]
            .up;
        tracing::info!(
            service = plan.name,
            backend = plan.backends[self.backend].name,
            state = if up { "up" } else { "down" },
            cause = self.cause,
            "backend health changed"
        );
        if let Some(change) = &self.change {
            self.service.log_change(change);
        }
    }
}

/// One service: its plan and its state behind one lock.
pub struct ServiceRuntime {
    /// The plan of the service.
    pub plan: PlannedService,
    /// State; every decision happens with this lock held.
    pub state: Mutex<ServiceState>,
    pub(super) maps: Arc<MapWriter>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) carriers: Carriers,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Whether the operator's drain of `backend` is recorded in the (pinned) maps: a drain
/// outlives the agent that took it. Unreadable counts as not drained, with a warning.
pub(super) fn recorded_drain(maps: &MapWriter, service: &str, backend: &PlannedBackend) -> bool {
    let drained = maps.drained(backend.index).unwrap_or_else(|e| {
        tracing::warn!(service, backend = backend.name, error = %format!("{e:#}"), "cannot read whether the backend is drained; taking it as not");
        false
    });
    if drained {
        tracing::info!(
            service,
            backend = backend.name,
            "backend drained by hand before this start: stays drained"
        );
    }
    drained
}

impl ServiceRuntime {
    pub(super) fn backend_labels(&self, position: usize) -> BackendLabels {
        BackendLabels {
            service: self.plan.name.clone(),
            backend: self.plan.backends[position].name.clone(),
        }
    }

    fn name_of(&self, position: Option<usize>) -> Option<String> {
        position.map(|p| self.plan.backends[p].name.clone())
    }

    /// Applies a changed check verdict to backend `position`; if its health changed,
    /// decides (and flips) at once and returns what to log — logging waits until every
    /// flip the event causes is written.
    fn apply(
        self: &Arc<Self>,
        state: &mut ServiceState,
        position: usize,
        at: Evidence,
        cause: &dyn Fn() -> String,
    ) -> Option<Report> {
        let backend = &mut state.backends[position];
        let up = backend.checks.iter().all(|c| c.up) && backend.mac_known;
        if up == backend.up {
            return None;
        }
        backend.up = up;
        backend.up_since = up.then(Instant::now);
        let name = &self.plan.backends[position].name;
        let verdict = if up { "up" } else { "down" };
        let change = self.decide(state, at, &|| format!("{name} {verdict}: {}", cause()));
        // A backend that is down loses its connections to the active one at their next
        // packet; one that is up again keeps those that did not move meanwhile.
        if !up {
            self.write_keep(position, 0);
        } else {
            self.write_keep(position, state.backends[position].keep_until);
        }
        state.backends[position].last_cause = cause();
        state.backends[position].presumed = false;
        self.metrics
            .backend_up
            .get_or_create(&self.backend_labels(position))
            .set(i64::from(up));
        Some(Report {
            service: self.clone(),
            backend: position,
            cause: state.backends[position].last_cause.clone(),
            change,
        })
    }

    /// Records one probe result of check `check` of backend `position`; returns what the
    /// check's next miss would do: [`NextMiss::Decides`] when it would take the active
    /// backend down, for the prober to be on the CPU at that deadline.
    pub fn record(
        self: &Arc<Self>,
        position: usize,
        check: usize,
        result: &Result<()>,
        at: Evidence,
    ) -> NextMiss {
        let health = &self.plan.backends[position].health;
        let mut state = self.state.lock().expect("service state lock");
        // A link probe's reading may predate a carrier loss handled since: re-read it now,
        // under the lock the carrier-loss handler also takes.
        let current;
        let result = if health.checks[check] == CheckConfig::Link {
            current = self.carrier_of(position);
            &current
        } else {
            result
        };
        // Only a failure allocates (its text); a pass at 1 ms intervals costs nothing here.
        state.backends[position].last_checks[check] = Some(LastCheck {
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            at: at.at,
        });
        let changed =
            state.backends[position].checks[check].record(result.is_ok(), health.rise, health.fall);
        let mut report = None;
        if changed.is_some() {
            let name = health.checks[check].name();
            let cause = || match result {
                Ok(()) => format!("{name} check passed {} times", health.rise),
                Err(e) => format!("{name} check failed {} times: {e:#}", health.fall),
            };
            report = self.apply(&mut state, position, at, &cause);
        }
        // A backend presumed up at start is up on evidence once every check has passed
        // `rise` times.
        let backend = &mut state.backends[position];
        if backend.presumed
            && backend.up
            && result.is_ok()
            && backend.checks.iter().all(|c| c.confirmed(health.rise))
        {
            backend.presumed = false;
            backend.last_cause = format!("every check passed {} times", health.rise);
        }
        // Only the active backend's going down moves traffic: the prober is on the CPU for
        // that deadline alone.
        let backend = &state.backends[position];
        let flips = state.active == Some(position) && backend.up && !backend.drained;
        let next_miss = if flips && backend.checks[check].next_failure_decides(health.fall) {
            NextMiss::Decides
        } else {
            NextMiss::Counts
        };
        drop(state);
        if let Some(report) = report {
            report.log();
        }
        next_miss
    }

    /// Backend `position`'s MAC, unknown until now, is `mac`: written to its map entry
    /// (one write), after which its checks alone decide its health.
    pub fn mac_resolved(self: &Arc<Self>, position: usize, mac: [u8; 6]) {
        let backend = &self.plan.backends[position];
        if self.state.lock().expect("service state lock").backends[position].mac_known {
            return; // the resolver and a neighbour event both found it
        }
        if let Err(e) = self.maps.set_backend_mac(backend.index, mac) {
            tracing::error!(service = self.plan.name, backend = backend.name, error = %e, "cannot write the backend's MAC");
            return;
        }
        tracing::info!(
            service = self.plan.name,
            backend = backend.name,
            mac = crate::net::format_mac(&mac),
            "backend MAC resolved"
        );
        let mut state = self.state.lock().expect("service state lock");
        state.backends[position].mac_known = true;
        let cause = || "MAC resolved".to_string();
        let report = self.apply(&mut state, position, Evidence::now(), &cause);
        drop(state);
        if let Some(report) = report {
            report.log();
        }
    }

    /// The kernel holds `mac` for `ip` on NIC `ifindex`: a backend reached through that
    /// neighbour whose MAC is not fixed by the config gets it, in one map write, if it
    /// changed (a machine replaced, or a first answer after no ARP answer at start).
    pub fn neighbour_seen(self: &Arc<Self>, ifindex: u32, ip: std::net::Ipv4Addr, mac: [u8; 6]) {
        for (position, backend) in self.plan.backends.iter().enumerate() {
            if backend.ifindex != ifindex || backend.next_hop != ip || backend.mac_fixed {
                continue;
            }
            let known = self.state.lock().expect("service state lock").backends[position].mac_known;
            if !known {
                self.mac_resolved(position, mac);
                continue;
            }
            match self.maps.backend(backend.index) {
                Ok(current) if current.mac != mac => {
                    if let Err(e) = self.maps.set_backend_mac(backend.index, mac) {
                        tracing::error!(service = self.plan.name, backend = backend.name, error = %e, "cannot write the backend's new MAC");
                        continue;
                    }
                    tracing::warn!(
                        service = self.plan.name,
                        backend = backend.name,
                        from = crate::net::format_mac(&current.mac),
                        to = crate::net::format_mac(&mac),
                        "backend MAC changed; traffic follows it"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(backend = backend.name, error = %e, "cannot read the backend's entry")
                }
            }
        }
    }

    /// `Ok` when the NIC backend `position` is reached through has carrier.
    fn carrier_of(&self, position: usize) -> Result<()> {
        let backend = &self.plan.backends[position];
        match self
            .carriers
            .get(&backend.ifindex)
            .map(|c| c.load(Ordering::Relaxed))
        {
            Some(true) => Ok(()),
            _ => Err(anyhow::anyhow!("no carrier on {}", backend.iface)),
        }
    }

    /// Applies a carrier loss to the backends reached through that NIC at once. (A carrier
    /// return is seen by the link probes, and needs `rise` of them.)
    pub fn carrier_lost(self: &Arc<Self>, event: &CarrierEvent) -> Vec<Report> {
        let mut reports = Vec::new();
        let mut state = self.state.lock().expect("service state lock");
        for (position, backend) in self.plan.backends.iter().enumerate() {
            if backend.ifindex != event.ifindex {
                continue;
            }
            let Some(link) = backend
                .health
                .checks
                .iter()
                .position(|c| *c == CheckConfig::Link)
            else {
                continue;
            };
            if state.backends[position].checks[link].set(false).is_some() {
                let iface = backend.iface.clone();
                let cause = || format!("carrier lost on {iface}");
                let at = Evidence {
                    at: event.received,
                    seen: Instant::now(),
                };
                reports.extend(self.apply(&mut state, position, at, &cause));
            }
        }
        reports
    }

    /// Chooses the active backend and, if it changed, writes the map — now, in this task.
    /// Returns the change made, for the caller to log.
    pub(super) fn decide(
        self: &Arc<Self>,
        state: &mut ServiceState,
        at: Evidence,
        cause: &dyn Fn() -> String,
    ) -> Option<Change> {
        let candidates: Vec<Candidate> = state
            .backends
            .iter()
            .map(|b| Candidate {
                up: b.up && !b.drained,
                up_since: b.up_since,
            })
            .collect();
        let choice = choose(&candidates, state.active, &self.plan.policy, Instant::now());
        let change = (choice.active != state.active)
            .then(|| self.flip(state, choice.active, at, cause))
            .flatten();
        if let Some(due) = choice.recheck_at {
            if state.recheck_at.is_none_or(|pending| due < pending) {
                state.recheck_at = Some(due);
                let runtime = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    let mut state = runtime.state.lock().expect("service state lock");
                    state.recheck_at = None;
                    let cause = || "failback delay elapsed".to_string();
                    let at = Evidence {
                        at: due,
                        seen: Instant::now(),
                    };
                    if let Some(change) = runtime.decide(&mut state, at, &cause) {
                        runtime.log_change(&change);
                    }
                });
            }
        }
        change
    }

    pub(super) fn log_change(&self, change: &Change) {
        tracing::info!(
            service = self.plan.name,
            from = change.from.as_deref().unwrap_or("none"),
            to = change.to.as_deref().unwrap_or("none (dropping)"),
            cause = change.cause,
            flip_us = (change.flip_us * 10.0).round() / 10.0,
            waited_us = (change.waited_us * 10.0).round() / 10.0,
            "active backend changed"
        );
    }

    /// Makes `target` active: one map write, timed from `at`. Everything else (metrics, the
    /// record of the change) happens after the write.
    fn flip(
        &self,
        state: &mut ServiceState,
        target: Option<usize>,
        at: Evidence,
        cause: &dyn Fn() -> String,
    ) -> Option<Change> {
        let index = target.map_or(NO_BACKEND, |p| self.plan.backends[p].index);
        if let Err(e) = self.maps.set_active(self.plan.id, index) {
            tracing::error!(service = self.plan.name, error = %e, "cannot write the active backend");
            return None;
        }
        let flip = at.at.elapsed();
        let waited = at.seen.saturating_duration_since(at.at);
        // Then the previous backend's connections: graceful failback lets a healthy one keep
        // its TCP connections (up to the drain limit); otherwise they follow at once.
        if let Some(previous) = state.active {
            self.deactivate(state, previous);
        }
        if let Some(next) = target {
            state.backends[next].keep_until = KEEP_FOREVER;
            self.write_keep(next, KEEP_FOREVER);
        }
        let from = self.name_of(state.active);
        let to = self.name_of(target);
        self.metrics
            .flip_duration
            .get_or_create(&ServiceLabels {
                service: self.plan.name.clone(),
            })
            .observe(flip.as_secs_f64());
        self.metrics
            .failovers
            .get_or_create(&FailoverLabels {
                service: self.plan.name.clone(),
                from: from.clone().unwrap_or_else(|| "none".into()),
                to: to.clone().unwrap_or_else(|| "none".into()),
            })
            .inc();
        if let Some(previous) = state.active {
            self.metrics
                .backend_active
                .get_or_create(&self.backend_labels(previous))
                .set(0);
        }
        if let Some(next) = target {
            self.metrics
                .backend_active
                .get_or_create(&self.backend_labels(next))
                .set(1);
        }
        let change = Change {
            from,
            to,
            cause: cause(),
            at_unix_s: unix_now(),
            flip_us: flip.as_secs_f64() * 1e6,
            waited_us: waited.as_secs_f64() * 1e6,
        };
        state.active = target;
        state.last_change = Some(change.clone());
        Some(change)
    }

    /// Backend `position` stops being active (or is drained) now: under graceful failback
    /// it keeps its sticky flows up to the drain limit, otherwise they follow at once. The
    /// deadline is remembered, so a flap of its health cannot extend it.
    fn deactivate(&self, state: &mut ServiceState, position: usize) {
        let until = match (self.plan.policy.failback, self.plan.policy.drain_limit) {
            (Failback::Immediate, _) => 0,
            (Failback::Graceful, None) => KEEP_FOREVER,
            (Failback::Graceful, Some(limit)) => {
                monotonic_ns().saturating_add(limit.as_nanos().try_into().unwrap_or(u64::MAX))
            }
        };
        let backend = &mut state.backends[position];
        backend.keep_until = backend.keep_until.min(until);
        self.write_keep(position, if backend.up { backend.keep_until } else { 0 });
    }

    /// Writes backend `position`'s keep deadline; a failed write is logged (the flows then
    /// keep the previous deadline).
    fn write_keep(&self, position: usize, until: u64) {
        let backend = &self.plan.backends[position];
        if let Err(e) = self.maps.set_keep(backend.index, until) {
            tracing::error!(service = self.plan.name, backend = backend.name, error = %e, "cannot write the keep deadline");
        }
    }

    /// Position of backend `name` in the plan; the error lists the known backends.
    fn position_of(&self, name: &str) -> Result<usize> {
        match self.plan.backends.iter().position(|b| b.name == name) {
            Some(position) => Ok(position),
            None => Err(self.plan.backend(name).unwrap_err()),
        }
    }

    /// Takes backend `name` out of service (`drained`) or puts it back: a drained backend
    /// gets no new flows; if it was active, the next one takes over at once, and its TCP
    /// connections finish on it under the service's failback rules (graceful: until they
    /// end or the drain limit; immediate: they move now). UDP and ICMP flows move at once.
    pub fn set_drained(self: &Arc<Self>, name: &str, drained: bool) -> Result<Change> {
        let position = self.position_of(name)?;
        let mut state = self.state.lock().expect("service state lock");
        // Recorded first, in the pinned maps: a restarted agent finds it there.
        self.maps
            .set_drained(self.plan.backends[position].index, drained)?;
        let was = state.backends[position].drained;
        state.backends[position].drained = drained;
        let what = if drained { "drained" } else { "undrained" };
        tracing::info!(
            service = self.plan.name,
            backend = name,
            "backend {what} by hand"
        );
        let cause = || format!("{name} {what} by hand");
        let change = self.decide(&mut state, Evidence::now(), &cause);
        if drained && !was && state.active != Some(position) {
            self.deactivate(&mut state, position);
        } else if !drained && was && state.active != Some(position) {
            // Back in service: its remaining connections may stay as before the drain.
            state.backends[position].keep_until = KEEP_FOREVER;
            if state.backends[position].up {
                self.write_keep(position, KEEP_FOREVER);
            }
        }
        if let Some(change) = &change {
            self.log_change(change);
        }
        let active = self.name_of(state.active);
        Ok(change.unwrap_or_else(|| Change {
            from: active.clone(),
            to: active,
            cause: format!("{name} {what}; active backend unchanged"),
            at_unix_s: unix_now(),
            flip_us: 0.0,
            waited_us: 0.0,
        }))
    }

    /// Makes backend `name` active now (`lb activate`); the health checks keep deciding
    /// afterwards.
    pub fn activate(self: &Arc<Self>, name: &str) -> Result<Change> {
        let position = self.position_of(name)?;
        let mut state = self.state.lock().expect("service state lock");
        if state.backends[position].drained {
            self.maps
                .set_drained(self.plan.backends[position].index, false)?;
        }
        state.backends[position].drained = false;
        if state.active == Some(position) {
            let name = Some(name.to_string());
            let cause = "already active: nothing written".to_string();
            return Ok(Change {
                from: name.clone(),
                to: name,
                cause,
                at_unix_s: unix_now(),
                flip_us: 0.0,
                waited_us: 0.0,
            });
        }
        let cause = || "manual activation".to_string();
        let change = self
            .flip(&mut state, Some(position), Evidence::now(), &cause)
            .ok_or_else(|| anyhow::anyhow!("cannot write the active backend"))?;
        self.log_change(&change);
        Ok(change)
    }
}
