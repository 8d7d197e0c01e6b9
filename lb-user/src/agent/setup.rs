//! Starting the agent: the program loaded on the pinned maps (adopting what is there), the
//! plan written, the NICs attached, the engine and the census started. A reload reuses the
//! pieces.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use lb_common::map_names;

use super::RunOptions;
use crate::{
    config::{Config, Role, XdpModeSetting},
    control::{AgentRequest, AgentState, InterfaceStatus, Running},
    dataplane::{
        apply::Applied, carry::OldTable, pins::Pins, writer::monotonic_ns, Adoption, Attached,
        Dataplane, MapWriter,
    },
    failover::{engine::NetWatch, Engine},
    flows::{self, Census},
    health::thread::ProberThread,
    metrics::Metrics,
    net::{self, events::NetEvents, Netlink, XdpAttachment},
    pair::sync::{PairLink, PeerView},
    plan::{CurrentPlan, Numbering, Plan},
};

/// A started agent.
pub struct Started {
    /// The loaded, attached program.
    pub dataplane: Dataplane,
    /// What the endpoints read and change.
    pub state: Arc<AgentState>,
}

/// Loads the program on the pinned maps (adopting what is there), writes the plan,
/// attaches, and starts the engine and the census.
pub async fn start(
    config: &Config,
    options: &RunOptions,
    mut plan: Plan,
    pins: Pins,
    reloads: tokio::sync::mpsc::Sender<AgentRequest>,
) -> Result<Started> {
    let mode = options.xdp_mode.unwrap_or(config.xdp_mode);
    let (mut dataplane, maps, mut adoption) = Dataplane::load_pinned(plan.flows.max, pins)?;
    dataplane.forward_logs()?;
    let flow_reports = dataplane.take_flow_reports()?;
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
    // The bulk of a table of another capacity, copied while the old program serves; before
    // the plan is written, so that flows of services it drops go with the others.
    let carry_from = monotonic_ns();
    let mut carried = match &adoption.old_table {
        Some(old) if adopting => carry(&maps, old, 0, plan.flows.max, |_| true),
        _ => 0,
    };
    let applied = maps
        .apply_plan(&plan, &previous, adopting)
        .context("cannot write the plan into the maps")?;
    report_adoption(&plan, &adoption, &applied, &config.pin_path);
    // Before the program is attached anywhere: a standby never serves, not for a packet.
    crate::pair::start(&maps, &plan, adoption.kept(map_names::ROLE))?;
    let interfaces = attach_all(&mut dataplane, &plan, mode, options.force).await?;
    if let Some(old) = adoption.old_table.take() {
        if adopting {
            // What the old program made or moved on until the new one took its place.
            carried += carry(&maps, &old, carry_from, plan.flows.max, |flow| {
                plan_serves(&plan, flow)
            });
            tracing::info!(
                flows = carried,
                capacity = plan.flows.max,
                "connection table carried over into one of another capacity"
            );
        }
        old.release();
    }
    let maps = Arc::new(maps);
    let census = Arc::new(Mutex::new(Census::default()));
    let current = CurrentPlan::new(plan.clone());
    let sweeper = tokio::spawn(flows::sweep_loop(
        current.clone(),
        maps.clone(),
        census.clone(),
    ));
    let metrics = Arc::new(Metrics::new(current.clone(), maps.clone(), census.clone()));
    let engine = start_engine(&plan, &maps, &metrics, &applied, None, reloads.clone()).await?;
    log_backends(&plan);
    let peer = Arc::new(PeerView::default());
    let pair_link = match &plan.pair {
        Some(pair) => {
            let link = PairLink {
                maps: maps.clone(),
                plan: current.clone(),
                metrics: metrics.clone(),
                peer: peer.clone(),
            };
            crate::pair::sync::start(pair, flow_reports, link).await?
        }
        None => Vec::new(),
    };
    let running = Running { engine, interfaces };
    let state = AgentState::new(current, maps, metrics, census, running, reloads, peer);
    state.background.add("connection table census", sweeper);
    for (name, task) in pair_link {
        state.background.add(name, task);
    }
    Ok(Started {
        dataplane,
        state: Arc::new(state),
    })
}

/// Starts the failover engine on `plan` with the carriers of its NICs as they are now;
/// `previous` is the engine a reload replaces. A NIC of the plan made again makes the
/// engine ask `reloads` for a reload.
pub async fn start_engine(
    plan: &Plan,
    maps: &Arc<MapWriter>,
    metrics: &Arc<Metrics>,
    applied: &Applied,
    previous: Option<&Engine>,
    reloads: tokio::sync::mpsc::Sender<AgentRequest>,
) -> Result<Engine> {
    // The probes, and the link events with the flips a carrier loss makes, all run on
    // the prober thread: the thread that sees the evidence writes the map.
    let prober = ProberThread::start(&plan.prober)?;
    // Subscribe to events before reading the current carriers: nothing in between is
    // missed.
    let events = NetEvents::subscribe(prober.handle())?;
    let netlink = Netlink::connect()?;
    let mut carriers = HashMap::new();
    for iface in &plan.interfaces {
        let link = netlink.link_by_name(&iface.name).await?;
        carriers.insert(iface.ifindex, link.carrier);
    }
    Engine::start(
        plan,
        maps.clone(),
        metrics.clone(),
        NetWatch {
            carriers,
            events,
            prober,
            on_nic_recreated: Box::new(move |_| {
                // The outcome is logged by the main loop; nobody waits for it here.
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = reloads.try_send(AgentRequest::Reload(reply));
            }),
        },
        applied,
        previous,
    )
    .await
}

/// Attaches the program to every NIC of `plan` (taking over pinned attachments), and
/// removes the attachments of NICs the plan no longer names.
pub async fn attach_all(
    dataplane: &mut Dataplane,
    plan: &Plan,
    mode: XdpModeSetting,
    force: bool,
) -> Result<Vec<InterfaceStatus>> {
    let netlink = Netlink::connect()?;
    let mut interfaces = Vec::new();
    for iface in &plan.interfaces {
        let how = match dataplane.attach(&iface.name, mode) {
            Err(e) if force && format!("{e:#}").contains("already carries an XDP program") => {
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
    detach_stale(dataplane, plan)?;
    Ok(interfaces)
}

fn log_backends(plan: &Plan) {
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
}

/// Gives each backend whose MAC could not be resolved at start the MAC the adopted maps
/// hold for it, if any.
pub fn adopt_macs(plan: &mut Plan, maps: &MapWriter) -> Result<()> {
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

/// Copies the live flows of `old` seen since `since_ns` that `keep` accepts into the new
/// table; returns how many. A failed copy is logged, and costs the flows it missed their
/// place in the table only (their next packet makes them again).
fn carry(
    maps: &MapWriter,
    old: &OldTable,
    since_ns: u64,
    capacity: u32,
    keep: impl Fn(&lb_common::Flow) -> bool,
) -> usize {
    maps.carry_flows(old, since_ns, capacity, keep)
        .unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "cannot carry the connection table over in full");
            0
        })
}

/// Whether `flow`'s service and backend are both in `plan`.
fn plan_serves(plan: &Plan, flow: &lb_common::Flow) -> bool {
    plan.services.iter().any(|service| {
        service.id == flow.service && service.backends.iter().any(|b| b.index == flow.backend)
    })
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
        connection_table_carried_over = adoption.old_table.is_some(),
        services_kept_on_their_backend = kept.join(","),
        flows_removed = applied.flows_removed,
        "adopted the running dataplane"
    );
}

/// Removes the pinned attachments of NICs the plan no longer names.
fn detach_stale(dataplane: &mut Dataplane, plan: &Plan) -> Result<()> {
    let pinned = match dataplane.pins() {
        Some(pins) => pins.link_names()?,
        None => Vec::new(),
    };
    let attached = dataplane.attachments().iter().map(|a| a.iface.clone());
    let mut names: Vec<String> = pinned.into_iter().chain(attached).collect();
    names.sort();
    names.dedup();
    for name in names {
        if !plan.interfaces.iter().any(|i| i.name == name) {
            dataplane.detach(&name)?;
            tracing::info!(iface = name, "detached: no longer in the config");
        }
    }
    Ok(())
}
