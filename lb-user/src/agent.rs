//! `lb run`: resolve the plan, load and attach the program, write the maps, start the
//! failover engine and the endpoint, and on SIGINT/SIGTERM detach everything.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{Config, Role, XdpModeSetting},
    control::{self, AgentState, InterfaceStatus},
    dataplane::Dataplane,
    failover::Engine,
    flows::{self, Census},
    metrics::Metrics,
    net::{self, carrier::CarrierEvents, Netlink},
    plan::Plan,
};

/// Options of `lb run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Extra NICs to attach to (`--iface`).
    pub ifaces: Vec<String>,
    /// Overrides the config's `xdp_mode`.
    pub xdp_mode: Option<XdpModeSetting>,
    /// Replace an XDP program another tool attached to one of the NICs.
    pub force: bool,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config, options: RunOptions) -> Result<()> {
    let plan = Plan::resolve(&config, &options.ifaces).await?;
    let mode = options.xdp_mode.unwrap_or(config.xdp_mode);
    // Taken before anything is attached: a busy port must not cost any traffic.
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
            "cannot listen on {} (metrics_listen); is another lb running with the same address?",
            config.metrics_listen
        )
        })?;
    let (mut dataplane, mut maps) = Dataplane::load(plan.flows.max)?;
    dataplane.forward_logs()?;
    maps.write_plan(&plan)
        .context("cannot write the plan into the maps")?;
    let netlink = Netlink::connect()?;
    let mut interfaces = Vec::new();
    for iface in &plan.interfaces {
        let mode = match dataplane.attach(&iface.name, mode) {
            Err(e)
                if options.force && format!("{e:#}").contains("already carries an XDP program") =>
            {
                tracing::warn!(
                    iface = iface.name,
                    "--force: removing the XDP program already attached"
                );
                netlink
                    .detach_xdp(iface.ifindex)
                    .await
                    .with_context(|| format!("--force on {}", iface.name))?;
                dataplane.attach(&iface.name, mode)?
            }
            other => other?,
        };
        tracing::info!(iface = iface.name, role = ?iface.role, ?mode, "attached");
        if iface.role != Role::Backend && net::forwarding(&iface.name) == Some(false) {
            tracing::warn!(
                iface = iface.name,
                "IPv4 forwarding is off on this NIC, so the program cannot check that new \
                 clients' addresses are routed back through it (spoofed sources are then only \
                 refused when they are this host's own, a VIP or a martian); on a routed \
                 switch host enable it: sysctl -w net.ipv4.conf.{}.forwarding=1",
                iface.name
            );
        }
        interfaces.push(InterfaceStatus {
            name: iface.name.clone(),
            mode: format!("{mode:?}").to_lowercase(),
        });
    }
    // Subscribe to carrier events before reading the current carriers: nothing in between
    // is missed.
    let events = CarrierEvents::subscribe()?;
    let mut carriers = HashMap::new();
    for iface in &plan.interfaces {
        let link = netlink.link_by_name(&iface.name).await?;
        carriers.insert(iface.ifindex, link.carrier);
    }
    let maps = Arc::new(maps);
    let census = Arc::new(Mutex::new(Census::default()));
    let sweeper = tokio::spawn(flows::sweep_loop(
        plan.clone(),
        maps.clone(),
        census.clone(),
    ));
    let metrics = Arc::new(Metrics::new(&plan, maps.clone(), census.clone()));
    let engine = Engine::start(&plan, maps.clone(), metrics.clone(), carriers, events).await?;
    for service in &plan.services {
        for backend in &service.backends {
            tracing::info!(
                service = service.name,
                vip = %service.vip,
                backend = backend.name,
                ip = %backend.ip,
                via = backend.iface,
                mac = net::format_mac(&backend.mac),
                checks = backend.health.checks.iter().map(|c| c.name()).collect::<Vec<_>>().join("+"),
                interval = ?backend.health.interval,
                "backend"
            );
        }
    }
    let state = Arc::new(AgentState {
        plan,
        maps,
        engine,
        metrics,
        interfaces,
        census,
    });
    tracing::info!(listen = %config.metrics_listen, "endpoint ready: /metrics /status /flows /healthz");
    axum::serve(listener, control::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP endpoint failed")?;
    sweeper.abort();
    drop(state);
    dataplane.detach_all()?;
    tracing::info!("stopped; every XDP attachment removed");
    Ok(())
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
