//! The Prometheus exposition. Metric names are a public interface: keep them stable.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `lb_backend_up` | gauge | service, backend |
//! | `lb_backend_active` | gauge | service, backend |
//! | `lb_failovers_total` | counter | service, from, to |
//! | `lb_flip_duration_seconds` | histogram | service |
//! | `lb_health_check_duration_seconds` | histogram | service, backend, check |
//! | `lb_health_checks_total` | counter | service, backend, check, result |
//! | `lb_packets_total`, `lb_bytes_total` | counter | service, backend, direction |
//! | `lb_xdp_actions_total` | counter | interface, action |
//! | `lb_dataplane_events_total` | counter | event |
//! | `lb_flows` | gauge | service, backend, protocol |
//! | `lb_flow_table_entries` | gauge | |
//! | `lb_flow_sweep_seconds` | gauge | |
//! | `lb_host_role` | gauge (1 for the role in force) | role (`active`, `standby`) |
//! | `lb_pair_flows_sent_total` | counter | |
//! | `lb_pair_flows_received_total` | counter | outcome (`applied`, `kept`, `unmapped`, `failed`) |
//! | `lb_pair_table_sends_total` | counter | reason (`connected`, `reports_lost`, `peer_slow`) |
//! | `lb_pair_stream_up`, `lb_pair_peer_heard`, `lb_pair_split_brain` | gauge | |
//!
//! `lb_packets_total`, `lb_bytes_total`, `lb_xdp_actions_total` and
//! `lb_dataplane_events_total` are read from the XDP program's per-CPU maps at scrape time;
//! `lb_flows` is the last sweep's count of live flows in the connection table.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        MetricType,
    },
    registry::Registry,
};

use crate::{
    config::HostRole,
    dataplane::{counters::ACTION_NAMES, MapWriter},
    flows::Census,
    plan::CurrentPlan,
};

/// Labels of per-backend metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
}

/// Labels of `lb_failovers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    /// Service name.
    pub service: String,
    /// Backend that was active (`none` when none was).
    pub from: String,
    /// Backend now active (`none` when traffic is dropped).
    pub to: String,
}

/// Labels of per-service metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Service name.
    pub service: String,
}

/// Labels of health-check durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
    /// Check kind.
    pub check: String,
}

/// Labels of health-check counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckResultLabels {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
    /// Check kind.
    pub check: String,
    /// `ok` or `fail`.
    pub result: String,
}

/// Labels of `lb_pair_flows_received_total`: what became of flows the peer sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairOutcome {
    /// `applied`, `kept`, `unmapped` or `failed`.
    pub outcome: &'static str,
}

impl PairOutcome {
    /// Written into this (standby) host's table.
    pub const APPLIED: Self = PairOutcome { outcome: "applied" };
    /// Not written: this host is active and has a flow of its own with that key.
    pub const KEPT: Self = PairOutcome { outcome: "kept" };
    /// Not written: this host has no such service, backend or client NIC.
    pub const UNMAPPED: Self = PairOutcome {
        outcome: "unmapped",
    };
    /// The map write failed.
    pub const FAILED: Self = PairOutcome { outcome: "failed" };
}

/// Labels of `lb_pair_table_sends_total`: why the whole table went to the peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableReason {
    /// `connected`, `reports_lost` or `peer_slow`.
    pub reason: &'static str,
}

impl TableReason {
    /// A new connection to the peer (the agent started, the peer came back, the link
    /// failed and came back).
    pub const CONNECTED: Self = TableReason {
        reason: "connected",
    };
    /// The program's ring lost reports (`flow_sync_lost` rose) while the link was up.
    pub const REPORTS_LOST: Self = TableReason {
        reason: "reports_lost",
    };
    /// The peer took the stream in too slowly, and its queue filled up.
    pub const PEER_SLOW: Self = TableReason {
        reason: "peer_slow",
    };
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn flip_histogram() -> Histogram {
    // 1 µs … 10 ms: a flip is a map write.
    Histogram::new([
        1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2,
    ])
}

fn check_histogram() -> Histogram {
    // 10 µs … 1 s.
    Histogram::new([
        1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0,
    ])
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// `lb_backend_up`.
    pub backend_up: Family<BackendLabels, Gauge>,
    /// `lb_backend_active`.
    pub backend_active: Family<BackendLabels, Gauge>,
    /// `lb_failovers_total`.
    pub failovers: Family<FailoverLabels, Counter>,
    /// `lb_flip_duration_seconds`.
    pub flip_duration: HistogramFamily<ServiceLabels>,
    /// `lb_health_check_duration_seconds`.
    pub check_duration: HistogramFamily<CheckLabels>,
    /// `lb_health_checks_total`.
    pub checks: Family<CheckResultLabels, Counter>,
    /// `lb_netlink_resyncs_total`.
    pub netlink_resyncs: Counter,
    /// `lb_pair_flows_sent_total`.
    pub pair_flows_sent: Counter,
    /// `lb_pair_flows_received_total`.
    pub pair_flows_received: Family<PairOutcome, Counter>,
    /// `lb_pair_table_sends_total`.
    pub pair_table_sends: Family<TableReason, Counter>,
    /// `lb_pair_stream_up`.
    pub pair_stream_up: Gauge,
    /// `lb_pair_peer_heard`.
    pub pair_peer_heard: Gauge,
    /// `lb_pair_split_brain`.
    pub pair_split_brain: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric; the dataplane counters come from `maps` at scrape time, the
    /// flow counts from `census`.
    pub fn new(plan: CurrentPlan, maps: Arc<MapWriter>, census: Arc<Mutex<Census>>) -> Self {
        let mut registry = Registry::default();
        let backend_up = Family::<BackendLabels, Gauge>::default();
        let backend_active = Family::<BackendLabels, Gauge>::default();
        let failovers = Family::<FailoverLabels, Counter>::default();
        let flip_duration: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(flip_histogram);
        let check_duration: HistogramFamily<CheckLabels> =
            Family::new_with_constructor(check_histogram);
        let checks = Family::<CheckResultLabels, Counter>::default();
        let netlink_resyncs = Counter::default();
        registry.register(
            "lb_netlink_resyncs",
            "Full re-reads of links and neighbours after rtnetlink events were lost (overrun)",
            netlink_resyncs.clone(),
        );
        registry.register(
            "lb_backend_up",
            "Whether the backend passes its health checks (1) or not (0)",
            backend_up.clone(),
        );
        registry.register(
            "lb_backend_active",
            "Whether the backend is the one the VIP's traffic goes to",
            backend_active.clone(),
        );
        registry.register(
            "lb_failovers",
            "Changes of a service's active backend",
            failovers.clone(),
        );
        registry.register(
            "lb_flip_duration_seconds",
            "Time from the event that decided a flip to the completed map write",
            flip_duration.clone(),
        );
        registry.register(
            "lb_health_check_duration_seconds",
            "Duration of one health-check probe",
            check_duration.clone(),
        );
        registry.register(
            "lb_health_checks",
            "Health-check probes by result",
            checks.clone(),
        );
        let pair_flows_sent = Counter::default();
        let pair_flows_received = Family::<PairOutcome, Counter>::default();
        let pair_table_sends = Family::<TableReason, Counter>::default();
        let (pair_stream_up, pair_peer_heard, pair_split_brain) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "lb_pair_flows_sent",
            "Flows streamed to the pair peer (each write the program reported, and the whole \
             table on each connection)",
            pair_flows_sent.clone(),
        );
        registry.register(
            "lb_pair_flows_received",
            "Flows the pair peer streamed, by what became of them",
            pair_flows_received.clone(),
        );
        registry.register(
            "lb_pair_table_sends",
            "Whole connection tables sent to the pair peer (one per connection), by why",
            pair_table_sends.clone(),
        );
        registry.register(
            "lb_pair_stream_up",
            "Whether this agent's stream to its pair peer is connected",
            pair_stream_up.clone(),
        );
        registry.register(
            "lb_pair_peer_heard",
            "Whether the pair peer's hello arrived within the last second",
            pair_peer_heard.clone(),
        );
        registry.register(
            "lb_pair_split_brain",
            "Whether this host and its pair peer are both active",
            pair_split_brain.clone(),
        );
        registry.register_collector(Box::new(DataplaneCollector { plan, maps, census }));
        Metrics {
            pair_flows_sent,
            pair_flows_received,
            pair_table_sends,
            pair_stream_up,
            pair_peer_heard,
            pair_split_brain,
            registry,
            backend_up,
            backend_active,
            failovers,
            flip_duration,
            check_duration,
            checks,
            netlink_resyncs,
        }
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// The exposition in the classic Prometheus text format (0.0.4), which every Prometheus
    /// and `promtool check metrics` read.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }
}

/// Converts OpenMetrics text to the classic format: a counter family `x` is announced as
/// `x_total` (its samples already carry that name), and the `# EOF` marker goes.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let mut parts = line.splitn(4, ' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("#"), Some(kind @ ("HELP" | "TYPE")), Some(name), rest)
                if counters.contains(name) =>
            {
                out.push_str(&format!("# {kind} {name}_total"));
                if let Some(rest) = rest {
                    out.push(' ');
                    out.push_str(rest);
                }
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Reads the XDP program's counters and the last flow census when scraped.
#[derive(Debug)]
struct DataplaneCollector {
    plan: CurrentPlan,
    maps: Arc<MapWriter>,
    census: Arc<Mutex<Census>>,
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use lb_common::Direction;
        let plan = self.plan.get();
        let mut rows = Vec::new();
        for service in &plan.services {
            for backend in &service.backends {
                for (direction, name) in [
                    (Direction::Forward, "forward"),
                    (Direction::Reverse, "reverse"),
                ] {
                    let traffic = self
                        .maps
                        .traffic_of(backend.index, direction)
                        .unwrap_or_default();
                    let labels = vec![
                        ("service", service.name.clone()),
                        ("backend", backend.name.clone()),
                        ("direction", name.to_string()),
                    ];
                    rows.push((labels, traffic));
                }
            }
        }
        let mut packets = encoder.encode_descriptor(
            "lb_packets",
            "Packets rewritten by the XDP program",
            None,
            MetricType::Counter,
        )?;
        for (labels, traffic) in &rows {
            ConstCounter::new(traffic.packets).encode(packets.encode_family(labels)?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "lb_bytes",
            "Bytes (whole frames) rewritten by the XDP program",
            None,
            MetricType::Counter,
        )?;
        for (labels, traffic) in &rows {
            ConstCounter::new(traffic.bytes).encode(bytes.encode_family(labels)?)?;
        }
        let mut actions = encoder.encode_descriptor(
            "lb_xdp_actions",
            "Frames leaving the XDP program, by interface and action",
            None,
            MetricType::Counter,
        )?;
        for iface in &plan.interfaces {
            let counts = self.maps.actions_of(iface.slot).unwrap_or_default();
            for (count, action) in counts.iter().zip(ACTION_NAMES) {
                let labels = vec![
                    ("interface", iface.name.clone()),
                    ("action", action.to_string()),
                ];
                ConstCounter::new(*count).encode(actions.encode_family(&labels)?)?;
            }
        }
        let mut events = encoder.encode_descriptor(
            "lb_dataplane_events",
            "Decisions of the XDP program: flows created, moved or picked up, and every frame \
             it refused to rewrite, by reason",
            None,
            MetricType::Counter,
        )?;
        let counts = self.maps.events().unwrap_or_default();
        for (count, event) in counts.iter().zip(lb_common::EVENT_NAMES) {
            let labels = [("event", event.to_string())];
            ConstCounter::new(*count).encode(events.encode_family(&labels)?)?;
        }
        let (flow_counts, entries, sweep_seconds) = {
            let census = self.census.lock().expect("census lock");
            (census.counts.clone(), census.entries, census.sweep_seconds)
        };
        let mut flows = encoder.encode_descriptor(
            "lb_flows",
            "Live flows in the connection table, as of the last sweep",
            None,
            MetricType::Gauge,
        )?;
        for ((service, backend, protocol), count) in &flow_counts {
            let labels = [
                ("service", service.clone()),
                ("backend", backend.clone()),
                ("protocol", protocol.to_string()),
            ];
            ConstGauge::new(*count as i64).encode(flows.encode_family(&labels)?)?;
        }
        let table = encoder.encode_descriptor(
            "lb_flow_table_entries",
            "Entries in the connection table as of the last sweep, expired ones not yet evicted \
             or replaced included (see flows.max)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(entries as i64).encode(table)?;
        let sweep = encoder.encode_descriptor(
            "lb_flow_sweep_seconds",
            "How long the last sweep of the connection table took (the next waits at least \
             nine times as long, and flows.sweep_interval)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(sweep_seconds).encode(sweep)?;
        if let Ok(role) = self.maps.role() {
            let mut roles = encoder.encode_descriptor(
                "lb_host_role",
                "This switch host's role, as the XDP program reads it: 1 for the role in force \
                 (always active outside pair mode)",
                None,
                MetricType::Gauge,
            )?;
            for candidate in [HostRole::Active, HostRole::Standby] {
                let labels = [("role", candidate.to_string())];
                ConstGauge::new(i64::from(candidate == role))
                    .encode(roles.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::openmetrics_to_prometheus;

    #[test]
    fn counters_are_announced_with_their_total_suffix() {
        let open = "# HELP lb_failovers Changes.\n# TYPE lb_failovers counter\nlb_failovers_total{service=\"web\"} 1\n\
                    # HELP lb_backend_up Up.\n# TYPE lb_backend_up gauge\nlb_backend_up 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(open),
            "# HELP lb_failovers_total Changes.\n# TYPE lb_failovers_total counter\nlb_failovers_total{service=\"web\"} 1\n\
             # HELP lb_backend_up Up.\n# TYPE lb_backend_up gauge\nlb_backend_up 1\n"
        );
    }
}
