//! `lb run`: resolve the plan, load and attach the program, write the maps, serve the
//! endpoint, and on SIGINT/SIGTERM detach everything.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{Config, XdpModeSetting},
    control::{self, AgentState},
    dataplane::Dataplane,
    net,
    plan::Plan,
};

/// Options of `lb run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Extra NICs to attach to (`--iface`).
    pub ifaces: Vec<String>,
    /// Overrides the config's `xdp_mode`.
    pub xdp_mode: Option<XdpModeSetting>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config, options: RunOptions) -> Result<()> {
    let plan = Plan::resolve(&config, &options.ifaces).await?;
    let mode = options.xdp_mode.unwrap_or(config.xdp_mode);
    let mut dataplane = Dataplane::load()?;
    dataplane
        .maps
        .write_plan(&plan)
        .context("cannot write the plan into the maps")?;
    for iface in &plan.interfaces {
        let mode = dataplane.attach(&iface.name, mode)?;
        tracing::info!(iface = iface.name, role = ?iface.role, ?mode, "attached");
    }
    for service in &plan.services {
        let active = service.backends.first();
        tracing::info!(
            service = service.name,
            vip = %service.vip,
            active = active.map_or("-", |b| b.name.as_str()),
            backend_mac = active.map(|b| net::format_mac(&b.mac)).unwrap_or_default(),
            "serving"
        );
    }
    let state = Arc::new(Mutex::new(AgentState::new(plan, dataplane)));
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
            "cannot listen on {} (metrics_listen); is another lb running with the same address?",
            config.metrics_listen
        )
        })?;
    tracing::info!(listen = %config.metrics_listen, "endpoint ready: /status /healthz");
    axum::serve(listener, control::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP endpoint failed")?;
    let mut state = state.lock().expect("agent state lock");
    state.dataplane.detach_all()?;
    tracing::info!("stopped; every XDP attachment removed");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}
