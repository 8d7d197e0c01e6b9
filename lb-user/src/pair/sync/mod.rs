//! The connection table across the pair: each agent streams the flows its program writes
//! to its peer, and the standby writes what it receives into its own table, so that the
//! flows of the active host carry on, on the same backend, after a takeover.
//!
//! - [`send`]: reads the program's flow reports (`FLOW_SYNC`) and streams them to the
//!   peer's `sync_listen` in batches; on each (re)connection the whole live table first,
//!   for what the stream missed; a hello with this host's role every [`HELLO_INTERVAL`];
//! - [`receive`]: accepts the peer's connection (from the peer's address only) and writes
//!   its flows (a standby over anything, an active host only where it has no flow of its
//!   own and no live flow of its own holds the reply key), and watches the peer's role: both hosts active is a split brain, logged and
//!   exported;
//! - [`wire`]: the frames.
//!
//! Both hosts run both halves: whichever is active streams, the other applies.

pub mod receive;
pub mod send;
pub mod wire;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::{Flow, FlowKey, FlowUpdate};
use serde::{Deserialize, Serialize};

use crate::{
    config::{HostRole, PairConfig},
    dataplane::MapWriter,
    metrics::Metrics,
    plan::{CurrentPlan, Plan},
};
use wire::Record;

/// Between two hellos on the pair link.
pub const HELLO_INTERVAL: Duration = Duration::from_millis(100);
/// A peer not heard for this long is taken as gone: its role is unknown, the stream from it
/// is closed, and data of the stream to it not acknowledged within this time ends that
/// connection (`TCP_USER_TIMEOUT`).
pub const PEER_SILENT: Duration = Duration::from_secs(1);
/// How long both hosts must have been active, as a hello shows, before it is a split brain:
/// during a preemption the two roles cross for a few milliseconds.
pub const SPLIT_BRAIN_AFTER: Duration = Duration::from_millis(300);

/// What the agent knows of its peer, for `/status`.
#[derive(Debug, Default)]
pub struct PeerView {
    state: Mutex<PeerState>,
}

#[derive(Debug, Default, Clone)]
struct PeerState {
    address: Option<SocketAddr>,
    streaming: bool,
    /// The peer's role, as its hellos say.
    role: Option<Heard>,
    /// This host's role, and since when (as first seen by the split-brain check).
    own: Option<(HostRole, Instant)>,
    split_brain: bool,
}

/// A role as the peer's hellos said it.
#[derive(Debug, Clone, Copy)]
struct Heard {
    role: HostRole,
    /// The last hello.
    at: Instant,
    /// The first hello of an unbroken run saying `role`.
    since: Instant,
}

/// The peer in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer agent's `sync_listen`.
    pub address: String,
    /// Whether this agent's stream to the peer is connected.
    pub streaming: bool,
    /// The peer's role, as its last hello (within a second) said; `None` when not heard.
    pub role: Option<HostRole>,
    /// Whether both hosts are active.
    pub split_brain: bool,
}

impl PeerView {
    /// The peer's state now; `None` outside pair mode with a peer.
    pub fn status(&self) -> Option<PeerStatus> {
        let state = self.state.lock().expect("peer view lock").clone();
        Some(PeerStatus {
            address: state.address?.to_string(),
            streaming: state.streaming,
            role: heard(&state),
            split_brain: state.split_brain,
        })
    }

    fn update(&self, change: impl FnOnce(&mut PeerState)) {
        change(&mut self.state.lock().expect("peer view lock"));
    }
}

/// The peer's role, when heard within [`PEER_SILENT`].
fn heard(state: &PeerState) -> Option<HostRole> {
    state
        .role
        .filter(|heard| heard.at.elapsed() < PEER_SILENT)
        .map(|heard| heard.role)
}

/// What both halves share.
#[derive(Clone)]
pub struct PairLink {
    /// The program's maps.
    pub maps: Arc<MapWriter>,
    /// The plan in force (services, backends and NICs, to translate records).
    pub plan: CurrentPlan,
    /// Counters on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// What is known of the peer.
    pub peer: Arc<PeerView>,
}

/// Starts both halves when `pair` names a peer: the stream of the program's reports
/// (`reports`, the `FLOW_SYNC` ring) to it, and the listener for its stream. Returns the
/// tasks by name; each runs for as long as the agent (one that ended died).
pub async fn start(
    pair: &PairConfig,
    reports: aya::maps::RingBuf<aya::maps::MapData>,
    link: PairLink,
) -> Result<Vec<(&'static str, tokio::task::JoinHandle<()>)>> {
    let (Some(listen), Some(peer)) = (pair.sync_listen, pair.peer) else {
        return Ok(Vec::new());
    };
    link.peer.update(|state| state.address = Some(peer));
    let listener = receive::bind(listen).await?;
    tracing::info!(%listen, %peer, "pair link: streaming the connection table to the peer, accepting its own");
    Ok(vec![
        (
            "pair link sender",
            tokio::spawn(send::stream(reports, peer, listen.ip(), link.clone())),
        ),
        (
            "pair link receiver",
            tokio::spawn(receive::serve(listener, peer, link)),
        ),
    ])
}

/// Translates flows between this host's own numbering and the pair link's records; built
/// once per batch from the plan in force.
struct Translator {
    backend_ips: HashMap<u32, Ipv4Addr>,
    nic_names: HashMap<u32, String>,
    /// (service id, backend address) → backend index.
    backends: HashMap<(u32, [u8; 4]), u32>,
    /// Client-facing NICs by name → ifindex.
    client_nics: HashMap<String, u32>,
}

impl Translator {
    fn new(plan: &Plan) -> Self {
        let backends = || plan.services.iter().flat_map(|s| &s.backends);
        Translator {
            backend_ips: backends().map(|b| (b.index, b.ip)).collect(),
            nic_names: plan
                .interfaces
                .iter()
                .map(|i| (i.ifindex, i.name.clone()))
                .collect(),
            backends: plan
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| ((s.id, b.ip.octets()), b.index)))
                .collect(),
            client_nics: plan
                .interfaces
                .iter()
                .filter(|i| i.role != crate::config::Role::Backend)
                .map(|i| (i.name.clone(), i.ifindex))
                .collect(),
        }
    }

    /// Flow `key` (`flow`) as a record, at `now` on the program's clock; `None` when its
    /// backend or NIC is not in the plan (a reload removed it).
    fn record(&self, key: &FlowKey, flow: &Flow, now: u64) -> Option<Record> {
        Some(Record {
            key: *key,
            backend_ip: self.backend_ips.get(&flow.backend)?.octets(),
            client_mac: flow.client_mac,
            state: flow.state,
            flags: flow.flags,
            nic: Record::nic_field(self.nic_names.get(&flow.ifindex)?),
            idle_ns: now.saturating_sub(flow.seen_ns),
            age_ns: now.saturating_sub(flow.created_ns),
        })
    }

    /// `record` as a flow of `service` on this host (its backend and NIC numbers, its
    /// clock at `now`); `None` when this host has no such backend or client NIC.
    fn flow(&self, record: &Record, service: u32, now: u64) -> Option<Flow> {
        if usize::from(record.state) >= lb_common::flow_state::NAMES.len() {
            return None;
        }
        let backend = *self.backends.get(&(service, record.backend_ip))?;
        let ifindex = match self.client_nics.get(&record.nic_name()) {
            Some(&ifindex) => ifindex,
            // NICs named otherwise on the two hosts: the only client NIC is the one.
            None if self.client_nics.len() == 1 => *self.client_nics.values().next()?,
            None => return None,
        };
        Some(Flow {
            created_ns: now.saturating_sub(record.age_ns),
            seen_ns: now.saturating_sub(record.idle_ns),
            backend,
            service,
            ifindex,
            client_mac: record.client_mac,
            state: record.state,
            flags: record.flags,
            pad: 0,
        })
    }
}

/// The flow update in one item of the program's `FLOW_SYNC` ring; `None` for an item of
/// another size.
pub fn parse_report(item: &[u8]) -> Option<FlowUpdate> {
    (item.len() == std::mem::size_of::<FlowUpdate>()).then(|| {
        // SAFETY: the item holds exactly one `FlowUpdate` as the program wrote it (plain
        // data, valid for any bytes); read unaligned, since the bytes are borrowed.
        unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowUpdate>()) }
    })
}
