//! `lb run`: resolve the plan, load the program on the pinned maps (adopting a running
//! dataplane), write the plan, attach, start the failover engine and the endpoint; on
//! SIGINT/SIGTERM stop, leaving the dataplane forwarding. `lb down` removes it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use std::path::Path;

use anyhow::{Context, Result};
use lb_common::map_names;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{Config, Role, XdpModeSetting},
    control::{self, AgentState, InterfaceStatus},
    dataplane::{
        apply::Applied,
        pins::{self, Pins, Removed},
        Adoption, Attached, Dataplane, MapWriter,
    },
    failover::Engine,
    flows::{self, Census},
    metrics::Metrics,
    net::{self, carrier::CarrierEvents, Netlink, XdpAttachment},
    plan::{Numbering, Plan},
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
///
/// The dataplane is pinned in the config's `pin_path`: what a previous agent left there is
/// adopted (see [`Dataplane::load_pinned`]), and on SIGINT/SIGTERM the agent stops alone —
/// the program stays attached and forwards with the last decision until an agent adopts
/// it again, or [`down`] removes it.
pub async fn run(config: Config, options: RunOptions) -> Result<()> {
    let plan = Plan::resolve(&config, &options.ifaces).await?;
    // Taken before anything is attached: a busy port must not cost any traffic.
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
            "cannot listen on {} (metrics_listen); is another lb running with the same address?",
            config.metrics_listen
        )
        })?;
    let pins = Pins::open(&config.pin_path)?;
    let fresh = pins.is_empty()?;
    let (dataplane, state, sweeper) = match start(&config, &options, plan, pins).await {
        Ok(running) => running,
        Err(e) => {
            // A dataplane this run made is removed again; an adopted one forwards on.
            if fresh {
                if let Err(cleanup) = pins::remove(&config.pin_path) {
                    tracing::warn!(error = %format!("{cleanup:#}"), "cannot remove the pins made before the error");
                }
            }
            return Err(e);
        }
    };
    tracing::info!(listen = %config.metrics_listen, "endpoint ready: /metrics /status /flows /healthz");
    axum::serve(listener, control::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP endpoint failed")?;
    sweeper.abort();
    drop(state);
    drop(dataplane);
    tracing::info!(
        pin_path = %config.pin_path.display(),
        "stopped; the dataplane forwards on with the last decision (`lb down` removes it)"
    );
    Ok(())
}

/// Loads the program on the pinned maps (adopting what is there), writes the plan,
/// attaches, and starts the engine and the census.
async fn start(
    config: &Config,
    options: &RunOptions,
    mut plan: Plan,
    pins: Pins,
) -> Result<(Dataplane, Arc<AgentState>, tokio::task::JoinHandle<()>)> {
    let mode = options.xdp_mode.unwrap_or(config.xdp_mode);
    let (mut dataplane, mut maps, adoption) = Dataplane::load_pinned(plan.flows.max, pins)?;
    dataplane.forward_logs()?;
    let adopting = adoption.state_kept();
    let previous = if adopting {
        maps.numbering()?
    } else {
        Numbering::default()
    };
    plan.renumber(&previous);
    if adopting {
        adopt_macs(&mut plan, &maps)?;
    }
    let applied = maps
        .apply_plan(&plan, &previous, adopting)
        .context("cannot write the plan into the maps")?;
    report_adoption(&plan, &adoption, &applied, &config.pin_path);
    let netlink = Netlink::connect()?;
    let mut interfaces = Vec::new();
    for iface in &plan.interfaces {
        let how = match dataplane.attach(&iface.name, mode) {
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
        let kernel_mode = match netlink.link_by_name(&iface.name).await?.xdp {
            XdpAttachment::Driver => "native",
            XdpAttachment::Generic => "skb",
            XdpAttachment::None | XdpAttachment::Other => "unknown",
        };
        let adopted = how == Attached::Adopted;
        tracing::info!(
            iface = iface.name,
            role = ?iface.role,
            mode = kernel_mode,
            adopted,
            "attached"
        );
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
            mode: kernel_mode.to_string(),
            adopted,
        });
    }
    detach_stale_links(&dataplane, &plan)?;
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
    let engine = Engine::start(
        &plan,
        maps.clone(),
        metrics.clone(),
        carriers,
        events,
        &applied,
    )
    .await?;
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
    Ok((dataplane, state, sweeper))
}

/// Gives each backend whose MAC could not be resolved at start the MAC the adopted maps
/// hold for it, if any.
fn adopt_macs(plan: &mut Plan, maps: &MapWriter) -> Result<()> {
    for service in &mut plan.services {
        for backend in &mut service.backends {
            if backend.mac_known {
                continue;
            }
            let pinned = maps.backend(backend.index)?;
            if pinned.ip == backend.ip.octets() && pinned.mac != [0; 6] {
                backend.mac = pinned.mac;
                backend.mac_known = true;
                tracing::info!(
                    service = service.name,
                    backend = backend.name,
                    mac = net::format_mac(&pinned.mac),
                    "MAC taken from the pinned dataplane"
                );
            }
        }
    }
    Ok(())
}

/// Logs what was adopted from the pin directory.
fn report_adoption(plan: &Plan, adoption: &Adoption, applied: &Applied, pin_path: &Path) {
    if adoption.kept_maps.is_empty() {
        tracing::info!(pin_path = %pin_path.display(), "new dataplane");
        return;
    }
    let kept: Vec<&str> = plan
        .services
        .iter()
        .filter(|s| applied.kept.contains(&s.id))
        .map(|s| s.name.as_str())
        .collect();
    tracing::info!(
        pin_path = %pin_path.display(),
        maps_kept = adoption.kept_maps.len(),
        connection_table_kept = adoption.kept(map_names::FLOWS),
        services_kept_on_their_backend = kept.join(","),
        flows_removed = applied.flows_removed,
        "adopted the running dataplane"
    );
}

/// Removes the pinned attachments of NICs the plan no longer names.
fn detach_stale_links(dataplane: &Dataplane, plan: &Plan) -> Result<()> {
    let Some(pins) = dataplane.pins() else {
        return Ok(());
    };
    for name in pins.link_names()? {
        if !plan.interfaces.iter().any(|i| i.name == name) {
            pins.remove_link(&name)?;
            tracing::info!(iface = name, "detached: no longer in the config");
        }
    }
    Ok(())
}

/// `lb down`: removes the dataplane pinned in `pin_path` — every attachment (the program
/// leaves each NIC) and every map. Refused while an agent runs on it.
pub fn down(pin_path: &Path) -> Result<Removed> {
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
