//! The failover engine: builds every service's state, runs the probes and the carrier
//! watcher on the prober thread, and stops them; the decisions are the services' own
//! ([`super::service`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{Context, Result};
use lb_common::{KEEP_FOREVER, NO_BACKEND};
use tokio::task::JoinHandle;

use super::{
    policy::CheckCounter,
    service::{recorded_drain, Evidence},
};
use crate::{
    config::CheckConfig,
    dataplane::{apply::Applied, MapWriter},
    health::{
        pipeline::{self, Timing},
        thread::ProberThread,
        Carriers, IcmpSocket, Probe,
    },
    metrics::{CheckLabels, CheckResultLabels, Metrics},
    net::events::{NetEvent, NetEvents},
    plan::Plan,
};

pub use super::service::{BackendState, Change, LastCheck, Report, ServiceRuntime, ServiceState};
/// Called when a NIC of the plan is made again under the same name (its index changed):
/// the agent reloads, which attaches to it and rewrites what named the old index.
pub type NicRecreated = Box<dyn Fn(&str) + Send + Sync>;

/// What the engine learns about the network from: the carrier of every NIC of the plan
/// when it starts, the link and neighbour events after that, the thread they are read on,
/// and whom to tell when a NIC is made again.
pub struct NetWatch {
    /// Carrier per interface index, read after `events` subscribed.
    pub carriers: HashMap<u32, bool>,
    /// Link and neighbour events, subscribed on `prober`'s runtime.
    pub events: NetEvents,
    /// The thread that runs the probes and reads `events`: a carrier loss is acted on
    /// where it is read, as a missed deadline is, under the prober's scheduling.
    pub prober: ProberThread,
    /// Called when a NIC of the plan is made again.
    pub on_nic_recreated: NicRecreated,
}

/// All services and the tasks that watch them.
pub struct Engine {
    /// Per service, in plan order.
    pub services: Vec<Arc<ServiceRuntime>>,
    /// Probes and the carrier watcher: they run for as long as the engine.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// MAC resolvers: each ends when it has found its backend's MAC.
    resolvers: Mutex<Vec<JoinHandle<()>>>,
    /// The thread the probes run on (stopped last, when the engine goes).
    prober: ProberThread,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Engine {
    /// Builds the state of every service, applies the current carrier of every NIC, and
    /// starts the probes, the carrier watcher and a MAC resolver per backend whose MAC is
    /// not known.
    ///
    /// Each service starts on the backend the maps hold (`start`). A service adopted from a
    /// running dataplane (`start.kept`) presumes only that backend up, and every other one
    /// down until `rise` checks pass, so a restart never moves traffic to a backend nobody
    /// has checked; a new service presumes its backends up (traffic flows from the first
    /// packet), but for those whose MAC is unknown. On a reload, `previous` is the engine
    /// being replaced (stopped already): a backend whose address, NIC and checks did not
    /// change keeps its state (health, check counters, drain, keep deadline).
    pub async fn start(
        plan: &Plan,
        maps: Arc<MapWriter>,
        metrics: Arc<Metrics>,
        net: NetWatch,
        start: &Applied,
        previous: Option<&Engine>,
    ) -> Result<Self> {
        let NetWatch {
            carriers,
            events,
            prober,
            on_nic_recreated,
        } = net;
        let table: Carriers = Arc::new(
            carriers
                .iter()
                .map(|(ifindex, up)| (*ifindex, AtomicBool::new(*up)))
                .collect(),
        );
        // Owned from the start, so that tasks spawned before an error are aborted with it.
        let mut engine = Engine {
            services: Vec::new(),
            tasks: Mutex::new(Vec::new()),
            resolvers: Mutex::new(Vec::new()),
            prober,
        };
        for service in &plan.services {
            let first = start.active.get(&service.id).copied().unwrap_or(NO_BACKEND);
            let active = service.backends.iter().position(|b| b.index == first);
            let adopted = start.kept.contains(&service.id);
            // A reload hands over the state of what did not change.
            let carried = previous
                .and_then(|e| {
                    e.services
                        .iter()
                        .find(|s| s.plan.name == service.name && s.plan.id == service.id)
                })
                .map(|s| {
                    let state = s.state.lock().expect("service state lock");
                    (
                        s.plan.clone(),
                        state.backends.clone(),
                        state.last_change.clone(),
                    )
                });
            let backends = service
                .backends
                .iter()
                .enumerate()
                .map(|(position, b)| {
                    if let Some((plan, states, _)) = &carried {
                        let same = plan.backends.iter().position(|old| {
                            (old.index, old.ip, old.ifindex, &old.health)
                                == (b.index, b.ip, b.ifindex, &b.health)
                        });
                        if let Some(old) = same {
                            let mut state = states[old].clone();
                            state.mac_known |= b.mac_known;
                            return state;
                        }
                    }
                    let presumed = !adopted || active == Some(position);
                    let checks: Vec<CheckCounter> = b
                        .health
                        .checks
                        .iter()
                        .map(|c| {
                            let mut counter = CheckCounter::starting(presumed);
                            if *c == CheckConfig::Link {
                                let carrier = carriers.get(&b.ifindex).copied().unwrap_or(true);
                                counter.set(carrier && presumed);
                            }
                            counter
                        })
                        .collect();
                    let up = checks.iter().all(|c| c.up) && b.mac_known;
                    let last_cause = if !b.mac_known {
                        "no ARP answer at start".to_string()
                    } else if !carriers.get(&b.ifindex).copied().unwrap_or(true) {
                        "no carrier at start".to_string()
                    } else if !presumed {
                        format!("adopted: down until {} checks pass", b.health.rise)
                    } else if adopted {
                        "adopted: active".to_string()
                    } else {
                        "starting".to_string()
                    };
                    BackendState {
                        checks,
                        up,
                        up_since: up.then(Instant::now),
                        last_cause,
                        presumed: up,
                        drained: recorded_drain(&maps, &service.name, b),
                        keep_until: KEEP_FOREVER,
                        mac_known: b.mac_known,
                        last_checks: vec![None; b.health.checks.len()],
                    }
                })
                .collect::<Vec<_>>();
            let runtime = Arc::new(ServiceRuntime {
                plan: service.clone(),
                state: Mutex::new(ServiceState {
                    backends,
                    active,
                    last_change: carried.and_then(|(_, _, change)| change),
                    recheck_at: None,
                }),
                maps: maps.clone(),
                metrics: metrics.clone(),
                carriers: table.clone(),
            });
            {
                let mut state = runtime.state.lock().expect("service state lock");
                for (position, backend) in state.backends.iter().enumerate() {
                    let labels = runtime.backend_labels(position);
                    metrics
                        .backend_up
                        .get_or_create(&labels)
                        .set(i64::from(backend.up));
                    metrics
                        .backend_active
                        .get_or_create(&labels)
                        .set(i64::from(state.active == Some(position)));
                }
                let cause = || "startup".to_string();
                if let Some(change) = runtime.decide(&mut state, Evidence::now(), &cause) {
                    runtime.log_change(&change);
                }
            }
            engine.services.push(runtime);
        }

        let watchers = engine.services.clone();
        let watched = table.clone();
        let planned: HashMap<String, u32> = plan
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), i.ifindex))
            .collect();
        let mut recreated_reported = false;
        let resyncs = metrics.netlink_resyncs.clone();
        let on_event = move |event: NetEvent| match event {
            NetEvent::Link {
                carrier: event,
                name,
            } => {
                if let Some(carrier) = watched.get(&event.ifindex) {
                    carrier.store(event.carrier, Ordering::Relaxed);
                }
                if !event.carrier {
                    // Every service flips first; the log lines follow.
                    let reports: Vec<Report> = watchers
                        .iter()
                        .flat_map(|s| s.carrier_lost(&event))
                        .collect();
                    for report in reports {
                        report.log();
                    }
                }
                let moved = planned.get(&name).is_some_and(|i| *i != event.ifindex);
                if moved && !recreated_reported {
                    recreated_reported = true;
                    tracing::warn!(
                        iface = name,
                        ifindex = event.ifindex,
                        "NIC made again (new index); reloading to attach to it"
                    );
                    on_nic_recreated(&name);
                }
            }
            NetEvent::Neighbour { ifindex, ip, mac } => {
                for service in &watchers {
                    service.neighbour_seen(ifindex, ip, mac);
                }
            }
            NetEvent::Resynced => {
                resyncs.inc();
            }
        };
        let watcher = engine.prober.handle().spawn(events.run(on_event));
        engine.spawn(watcher);
        let mut wanted = Vec::new();
        for service in engine.services.clone() {
            for (position, backend) in service.plan.backends.iter().enumerate() {
                if !backend.mac_known {
                    let task = tokio::spawn(super::resolve::resolve_mac(service.clone(), position));
                    engine
                        .resolvers
                        .lock()
                        .expect("engine tasks lock")
                        .push(task);
                }
                for check in 0..backend.health.checks.len() {
                    wanted.push((service.clone(), position, check));
                }
            }
        }
        // Probes are made on the prober thread, whose reactor their sockets then belong to.
        let schedule = engine.prober.handle().spawn(async move {
            let icmp = IcmpSocket::default();
            let mut checks = Vec::with_capacity(wanted.len());
            for (service, position, check) in wanted {
                let backend = &service.plan.backends[position];
                let probe = Probe::new(
                    &backend.health.checks[check],
                    backend.ip,
                    backend.ifindex,
                    &table,
                    &icmp,
                )
                .await?;
                checks.push(pipeline::Check {
                    probe,
                    timing: Timing {
                        interval: backend.health.interval,
                        timeout: backend.health.timeout,
                    },
                    report: reporter(service, position, check),
                });
            }
            anyhow::Ok(tokio::spawn(run_checks(checks)))
        });
        let schedule = schedule.await.context("the prober thread stopped")??;
        engine.spawn(schedule);
        Ok(engine)
    }

    fn spawn(&self, task: JoinHandle<()>) {
        self.tasks.lock().expect("engine tasks lock").push(task);
    }

    /// Stops every probe and the carrier watcher: nothing changes the maps any more (a
    /// reload stops the engine it replaces this way before the new one starts).
    pub fn stop(&self) {
        for tasks in [&self.tasks, &self.resolvers] {
            for task in tasks.lock().expect("engine tasks lock").iter() {
                task.abort();
            }
        }
    }

    /// How many of the engine's probes and carrier watcher have ended although the engine
    /// runs (each runs forever: one that ended died).
    pub fn dead_tasks(&self) -> usize {
        self.tasks
            .lock()
            .expect("engine tasks lock")
            .iter()
            .filter(|t| t.is_finished())
            .count()
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Result<&Arc<ServiceRuntime>> {
        self.services
            .iter()
            .find(|s| s.plan.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = self.services.iter().map(|s| s.plan.name.as_str()).collect();
                anyhow::anyhow!("no service {name:?} (services: {})", known.join(", "))
            })
    }
}

/// Runs every check of the engine on the prober's schedule, forever; a schedule that fails
/// (its timer) is logged, and the task ends (which `/healthz` reports).
async fn run_checks(checks: Vec<pipeline::Check>) {
    if let Err(e) = pipeline::run(checks).await {
        tracing::error!(error = format!("{e:#}"), "health checks stopped");
    }
}

/// Where the outcomes of check `check` of backend `position` go: its metrics, and the
/// service's decision.
fn reporter(service: Arc<ServiceRuntime>, position: usize, check: usize) -> pipeline::Report {
    let backend = &service.plan.backends[position];
    let labels = CheckLabels {
        service: service.plan.name.clone(),
        backend: backend.name.clone(),
        check: backend.health.checks[check].name().to_string(),
    };
    let duration = service
        .metrics
        .check_duration
        .get_or_create(&labels)
        .clone();
    let result_labels = |result: &str| CheckResultLabels {
        service: labels.service.clone(),
        backend: labels.backend.clone(),
        check: labels.check.clone(),
        result: result.to_string(),
    };
    let ok = service
        .metrics
        .checks
        .get_or_create(&result_labels("ok"))
        .clone();
    let fail = service
        .metrics
        .checks
        .get_or_create(&result_labels("fail"))
        .clone();
    Box::new(move |outcome: pipeline::Outcome| {
        duration.observe(outcome.took.as_secs_f64());
        if outcome.result.is_ok() {
            ok.inc()
        } else {
            fail.inc()
        };
        let at = Evidence {
            at: outcome.decided,
            seen: outcome.seen,
        };
        service.record(position, check, &outcome.result, at)
    })
}
