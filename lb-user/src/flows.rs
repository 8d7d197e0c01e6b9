//! The agent's view of the connection table: the periodic sweep that counts the live flows
//! per service and backend (for `/metrics`), and the listing behind `lb flows`.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::{flow_flags, flow_state, proto, FlowSettings};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{flows::FlowRecord, writer::monotonic_ns, MapWriter},
    plan::{CurrentPlan, Plan},
};

/// Live flows per (service, backend, protocol), as of the last sweep.
pub type FlowCounts = BTreeMap<(String, String, &'static str), u64>;

/// The last sweep's results, shared with the metrics.
#[derive(Debug, Default)]
pub struct Census {
    /// Live flows per service, backend and protocol.
    pub counts: FlowCounts,
    /// Entries in the table, expired ones (not yet evicted or replaced) included.
    pub entries: u64,
    /// How long the last sweep took (it grows with the table, and stretches the interval
    /// between sweeps).
    pub sweep_seconds: f64,
}

/// One flow as `lb flows` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowView {
    /// Service name.
    pub service: String,
    /// `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// The client's address and port (ICMP: the echo identifier).
    pub client: SocketAddrV4,
    /// The VIP and port the client sent to.
    pub vip: SocketAddrV4,
    /// Name of the backend serving it.
    pub backend: String,
    /// `new`, `replied`, `established` or `closing`.
    pub state: String,
    /// Stays on its backend under graceful failback.
    pub sticky: bool,
    /// Seconds since its first packet.
    pub age_s: f64,
    /// Seconds since it was last seen (refreshed about once a second).
    pub idle_s: f64,
}

/// Names a protocol number.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        _ => "other",
    }
}

/// Service and backend names of a flow, from the plan.
fn names(plan: &Plan, record: &FlowRecord) -> (String, String) {
    names_of(plan, record.flow.service, record.flow.backend)
}

/// Names of service `id` and of its backend `index`, from the plan (`#N` for one it lacks).
fn names_of(plan: &Plan, id: u32, index: u32) -> (String, String) {
    let service = plan.services.get(id as usize);
    let backend = service.and_then(|s| {
        s.backends
            .iter()
            .find(|b| b.index == index)
            .map(|b| b.name.clone())
    });
    (
        service.map_or_else(|| format!("#{id}"), |s| s.name.clone()),
        backend.unwrap_or_else(|| format!("#{index}")),
    )
}

/// Sweeps once: recounts the live flows and the table's entries into `census`.
pub fn sweep(plan: &Plan, maps: &MapWriter, settings: &FlowSettings, census: &Mutex<Census>) {
    let mut counts = FlowCounts::new();
    for service in &plan.services {
        for backend in &service.backends {
            for protocol in ["tcp", "udp", "icmp"] {
                counts.insert((service.name.clone(), backend.name.clone(), protocol), 0);
            }
        }
    }
    let now = monotonic_ns();
    // Counted by number, named once per (service, backend, protocol) afterwards: the
    // table may hold millions of flows.
    let mut live: HashMap<(u32, u32, u8), u64> = HashMap::new();
    let entries = maps.for_each_flow(plan.flows.read_limit(), |record| {
        if !record.expired(settings, now) {
            let flow = &record.flow;
            *live
                .entry((flow.service, flow.backend, record.key.proto))
                .or_default() += 1;
        }
    });
    for ((service, backend, proto), count) in live {
        let (service, backend) = names_of(plan, service, backend);
        *counts
            .entry((service, backend, protocol_name(proto)))
            .or_default() += count;
    }
    let mut census = census.lock().expect("census lock");
    census.counts = counts;
    census.entries = entries as u64;
}

/// A sweep waits at least this many times its own last duration before the next: the
/// census takes a tenth of a core at most, however large the table.
const SWEEP_DUTY: u32 = 9;

/// Sweeps every `flows.sweep_interval` of the plan in force, forever; less often when a
/// sweep takes long (see [`SWEEP_DUTY`]).
pub async fn sweep_loop(plan: CurrentPlan, maps: Arc<MapWriter>, census: Arc<Mutex<Census>>) {
    let mut last = Duration::ZERO;
    let mut stretched = false;
    loop {
        let configured = plan.get().flows.sweep_interval.max(Duration::from_secs(1));
        let interval = configured.max(last * SWEEP_DUTY);
        if interval > configured && !stretched {
            tracing::info!(
                sweep = ?last,
                every = ?interval,
                "the connection table is large: lb_flows is recounted less often than \
                 flows.sweep_interval, so that the census takes a tenth of a core at most"
            );
        }
        stretched = interval > configured;
        tokio::time::sleep(interval).await;
        let settings = match maps.flow_settings() {
            Ok(settings) => settings,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the connection table's timeouts");
                continue;
            }
        };
        let (plan, maps, shared) = (plan.get(), maps.clone(), census.clone());
        // Reading the table is one syscall per entry: off the runtime's thread.
        let started = std::time::Instant::now();
        let swept = tokio::task::spawn_blocking(move || sweep(&plan, &maps, &settings, &shared));
        let swept = swept.await;
        last = started.elapsed();
        census.lock().expect("census lock").sweep_seconds = last.as_secs_f64();
        if swept.is_err() {
            tracing::error!("the connection table sweep panicked");
        }
    }
}

/// The live flows, optionally only those of `service` and of `backend`.
pub fn list(
    plan: &Plan,
    maps: &MapWriter,
    service: Option<&str>,
    backend: Option<&str>,
) -> anyhow::Result<Vec<FlowView>> {
    let settings = maps.flow_settings()?;
    let now = monotonic_ns();
    let mut views = Vec::new();
    for record in maps.read_flows(plan.flows.read_limit()) {
        if record.expired(&settings, now) {
            continue;
        }
        let (service_name, backend_name) = names(plan, &record);
        if service.is_some_and(|s| s != service_name) || backend.is_some_and(|b| b != backend_name)
        {
            continue;
        }
        let key = &record.key;
        let seconds = |since: u64| now.saturating_sub(since) as f64 / 1e9;
        views.push(FlowView {
            service: service_name,
            protocol: protocol_name(key.proto).to_string(),
            client: SocketAddrV4::new(Ipv4Addr::from(key.src), u16::from_be_bytes(key.src_port)),
            vip: SocketAddrV4::new(Ipv4Addr::from(key.dst), u16::from_be_bytes(key.dst_port)),
            backend: backend_name,
            state: flow_state::NAMES
                .get(record.flow.state as usize)
                .unwrap_or(&"unknown")
                .to_string(),
            sticky: record.flow.flags & flow_flags::STICKY != 0,
            age_s: seconds(record.flow.created_ns),
            idle_s: seconds(record.flow.seen_ns),
        });
    }
    views.sort_by(|a, b| {
        (&a.service, &a.backend, a.client).cmp(&(&b.service, &b.backend, b.client))
    });
    Ok(views)
}
