//! `lb run`: resolve the plan, load the program on the pinned maps (adopting a running
//! dataplane), write the plan, attach, start the failover engine and the endpoints; apply
//! a changed config on SIGHUP or `lb reload`; on SIGINT/SIGTERM stop, leaving the dataplane
//! forwarding. `lb down` removes it (asking the running agent to, when there is one).
//!
//! - `setup`: starting (load, adopt, write, attach, engine);
//! - `reload`: a changed config applied as a diff;
//! - `notify`: systemd's readiness and watchdog notifications.

mod notify;
mod reload;
mod setup;

use std::{future::IntoFuture, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{Config, XdpModeSetting},
    control::{self, AgentRequest},
    dataplane::pins::{self, Pins, Removed},
    plan::Plan,
};

/// Exit status of `lb run` when `lb down` took its dataplane down: not a failure, and not
/// to be restarted (the systemd unit says both: `SuccessExitStatus=`,
/// `RestartPreventExitStatus=`).
pub const EXIT_TAKEN_DOWN: i32 = 3;

/// How a run of the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// SIGINT or SIGTERM: the agent stopped alone; the dataplane forwards on.
    Stopped,
    /// `lb down`: the dataplane is removed; `lb run` exits with [`EXIT_TAKEN_DOWN`].
    TakenDown,
}

/// Options of `lb run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file (read again on reload).
    pub config: PathBuf,
    /// Extra NICs to attach to (`--iface`).
    pub ifaces: Vec<String>,
    /// Overrides the config's `xdp_mode`.
    pub xdp_mode: Option<XdpModeSetting>,
    /// Replace an XDP program another tool attached to one of the NICs.
    pub force: bool,
    /// Overrides the config's `pin_path`.
    pub pin_path: Option<PathBuf>,
    /// Overrides the config's `control_socket`.
    pub control_socket: Option<PathBuf>,
}

impl RunOptions {
    /// Reads the config file, with the command line's overrides.
    pub fn load_config(&self) -> Result<Config> {
        let mut config = Config::load(&self.config)?;
        if let Some(pin_path) = &self.pin_path {
            config.pin_path = pin_path.clone();
        }
        if let Some(socket) = &self.control_socket {
            config.control_socket = socket.clone();
        }
        Ok(config)
    }
}

/// Runs the agent until SIGINT, SIGTERM or `lb down`.
///
/// The dataplane is pinned in the config's `pin_path`: what a previous agent left there is
/// adopted (see [`crate::dataplane::Dataplane::load_pinned`]), and on SIGINT/SIGTERM the
/// agent stops alone — the program stays attached and forwards with the last decision
/// until an agent adopts it again, or [`down`] removes it. Asked by `lb down` (through the
/// control socket), the agent stops and removes the dataplane itself.
pub async fn run(options: RunOptions) -> Result<Ended> {
    // First of all: a signal that arrives while the agent starts is acted on once it has
    // started (SIGHUP's default action would kill it).
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut config = options.load_config()?;
    let plan = Plan::resolve(&config, &options.ifaces).await?;
    // Taken before anything is attached: a busy port must not cost any traffic.
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (metrics_listen); is another lb running with the same \
                 address?",
                config.metrics_listen
            )
        })?;
    let control_listener = control::bind_control_socket(&config.control_socket)?;
    let pins = Pins::open(&config.pin_path)?;
    let fresh = pins.is_empty()?;
    let (reload_tx, mut reloads) = tokio::sync::mpsc::channel(1);
    let started = match setup::start(&config, &options, plan, pins, reload_tx).await {
        Ok(started) => started,
        Err(e) => {
            // A dataplane this run made is removed again; an adopted one forwards on.
            if fresh {
                if let Err(cleanup) = pins::remove(&config.pin_path) {
                    tracing::warn!(error = %format!("{cleanup:#}"), "cannot remove the pins made before the error");
                }
            }
            let _ = std::fs::remove_file(&config.control_socket);
            return Err(e);
        }
    };
    let setup::Started {
        mut dataplane,
        state,
    } = started;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let http = tokio::spawn(
        axum::serve(listener, control::read_router(state.clone()))
            .with_graceful_shutdown(until_stopped(stopping.clone()))
            .into_future(),
    );
    let control_server = tokio::spawn(
        axum::serve(control_listener, control::control_router(state.clone()))
            .with_graceful_shutdown(until_stopped(stopping))
            .into_future(),
    );
    tracing::info!(
        listen = %config.metrics_listen,
        control_socket = %config.control_socket.display(),
        "ready: /metrics /status /flows /healthz; actions on the control socket"
    );
    let keepalived_fifo = state
        .plan
        .get()
        .pair
        .as_ref()
        .and_then(|pair| pair.keepalived_fifo.clone());
    if let Some(path) = keepalived_fifo {
        let follower = tokio::spawn(follow_keepalived(path, state.clone()));
        state.background.add("keepalived FIFO follower", follower);
    }
    notify::ready();
    let watchdog_interval = notify::watchdog_interval();
    // Without a watchdog the tick is never fed to anyone: a day apart costs nothing.
    let mut watchdog =
        tokio::time::interval(watchdog_interval.unwrap_or(Duration::from_secs(86_400)));
    let mut taken_down = None;
    loop {
        let reply = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received, stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT received, stopping"); break; }
            _ = hup.recv() => { tracing::info!("SIGHUP received, reloading"); None }
            Some(request) = reloads.recv() => match request {
                AgentRequest::Reload(reply) => Some(reply),
                AgentRequest::Down { pin_path, reply } => {
                    if same_dir(&pin_path, &config.pin_path) {
                        tracing::info!("lb down: stopping and removing the dataplane");
                        taken_down = Some(reply);
                        break;
                    }
                    let _ = reply.send(Err(format!(
                        "this agent runs on pin directory {}, not {}",
                        config.pin_path.display(),
                        pin_path.display()
                    )));
                    continue;
                }
            },
            _ = watchdog.tick() => {
                // Fed while the engine's probes and carrier watcher and the background
                // tasks run: a dead one stops the feeding, and the service manager
                // restarts the agent (hitless).
                let dead = state.running().engine.dead_tasks();
                let background = state.background.dead();
                if watchdog_interval.is_some() {
                    if dead == 0 && background.is_empty() {
                        notify::watchdog();
                    } else {
                        tracing::error!(dead, ?background, "agent tasks died; not feeding the watchdog");
                    }
                }
                continue;
            }
        };
        notify::reloading();
        let outcome = reload::reload(&mut dataplane, &state, &options, &config).await;
        notify::ready();
        let answer = match outcome {
            Ok((new_config, summary)) => {
                config = new_config;
                tracing::info!("{summary}");
                Ok(summary)
            }
            Err(e) => {
                let error = format!("reload refused: {e:#}");
                tracing::error!("{error}");
                Err(error)
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }
    notify::stopping();
    let _ = stop.send(true);
    // Taken down before the servers are waited for: the control socket's server ends
    // once `lb down` has its answer.
    let kept = match taken_down {
        Some(reply) => {
            take_down(&state, dataplane, &config.pin_path, reply);
            None
        }
        None => Some(dataplane),
    };
    for server in [http, control_server] {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    let _ = std::fs::remove_file(&config.control_socket);
    state.background.abort_all();
    drop(state);
    // The pin directory's lock goes last, with the dataplane, once the engine is gone.
    let Some(dataplane) = kept else {
        return Ok(Ended::TakenDown);
    };
    drop(dataplane);
    tracing::info!(
        pin_path = %config.pin_path.display(),
        "stopped; the dataplane forwards on with the last decision (`lb down` removes it)"
    );
    Ok(Ended::Stopped)
}

/// `lb down` asked the running agent: stops the engine (nothing is written on the way
/// out), lets go of the pin directory with `dataplane`, removes the directory with its pins
/// and tells `reply` what was removed.
fn take_down(
    state: &control::AgentState,
    dataplane: crate::dataplane::Dataplane,
    pin_path: &std::path::Path,
    reply: control::Reply,
) {
    state.running().engine.stop();
    drop(dataplane);
    let removed = pins::remove(pin_path)
        .map(|removed| removed.describe(pin_path))
        .map_err(|e| format!("{e:#}"));
    match &removed {
        Ok(summary) => tracing::info!("{}", summary.trim_end().replace('\n', "; ")),
        Err(e) => tracing::error!("lb down: {e}"),
    }
    let _ = reply.send(removed);
}

/// Whether `a` and `b` name the same directory (as given, or once resolved).
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// `lb down` with no agent running: removes the dataplane pinned in `pin_path` — every
/// attachment (the program leaves each NIC) and every map. Refused while an agent runs on
/// it (see [`pins::in_use`]: that agent is asked instead, through its control socket).
pub fn down(pin_path: &std::path::Path) -> Result<Removed> {
    pins::remove(pin_path)
}

/// Resolves on the first SIGINT or SIGTERM.
///
/// The handlers are installed when this is called (not when it is first awaited), so a signal
/// that arrives while the caller is still setting up is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
    }
}

/// Applies the state changes keepalived writes to its notify FIFO at `path`, in order, for
/// as long as the agent runs.
async fn follow_keepalived(path: PathBuf, state: control::Shared) {
    let followed = crate::pair::fifo::follow(&path, |role, why| {
        let plan = state.plan.get();
        match crate::pair::set(&state.maps, &plan, role, why) {
            Ok(done) => tracing::info!(why, "{done}"),
            Err(e) => tracing::error!(why, "{e:#}"),
        }
    })
    .await;
    if let Err(e) = followed {
        tracing::error!(
            "keepalived's notify FIFO is no longer followed: {e:#}; /healthz reports it and \
             systemd's watchdog restarts the agent (`lb notify` and `lb role` work meanwhile)"
        );
    }
}
