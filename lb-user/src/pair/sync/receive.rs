//! The receiving half: the peer's stream, written into this host's table, and the peer's
//! role, watched for a split brain.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};

use super::{
    heard, wire, Heard, PairLink, Translator, HELLO_INTERVAL, PEER_SILENT, SPLIT_BRAIN_AFTER,
};
use crate::{
    config::HostRole,
    dataplane::{flows::Placement, writer::monotonic_ns},
    metrics::PairOutcome,
};

/// Listens on `listen` (`[pair] sync_listen`).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen} (pair.sync_listen): it must be an address of this host \
             on the pair link, and free"
        )
    })
}

/// Batches of the peer's flows waiting for the applier at most; beyond, the connection
/// waits (TCP holds the peer's stream back).
const APPLY_QUEUE: usize = 64;

/// Accepts the peer's connections on `listener` for as long as the agent runs; only a
/// connection from `peer`'s address is served (one at a time: a new one replaces the
/// old), anything else is closed at once. Watches for a split brain meanwhile. The flows
/// are written by one blocking thread, in the order they came, off the runtime.
pub async fn serve(listener: TcpListener, peer: SocketAddr, link: PairLink) {
    let (batches, queued) = mpsc::channel(APPLY_QUEUE);
    let applier_link = link.clone();
    // Ends when the last sender is gone (this task and its connection's), or if it panics.
    let mut applier = tokio::task::spawn_blocking(move || apply_all(queued, &applier_link));
    // The connection's task; dropping the set aborts it: a new connection, or the end.
    let mut current: JoinSet<()>;
    let mut tick = tokio::time::interval(HELLO_INTERVAL);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, from) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: waiting keeps the loop from spinning.
                        tracing::warn!(error = %e, "pair link: accept failed");
                        tokio::time::sleep(HELLO_INTERVAL).await;
                        continue;
                    }
                };
                if from.ip() != peer.ip() {
                    tracing::warn!(%from, expected = %peer.ip(), "pair link: connection from another address than the peer's, closed");
                    continue;
                }
                current = JoinSet::new();
                let (link, batches) = (link.clone(), batches.clone());
                current.spawn(async move {
                    match follow(stream, &link, &batches).await {
                        Ok(()) => tracing::info!(%from, "pair link: the peer closed its stream"),
                        Err(e) => tracing::warn!(%from, "pair link: the peer's stream ended: {e:#}"),
                    }
                });
            }
            _ = tick.tick() => check_split_brain(&link),
            ended = &mut applier => {
                // The receiver ends with it: its health shows it, and the agent's
                // supervisor restarts the agent.
                tracing::error!(
                    "pair link: the thread that writes the peer's flows ended ({}); the peer's \
                     flows are no longer written: restart the agent",
                    ended.err().map_or_else(|| "no panic".to_string(), |e| e.to_string())
                );
                return;
            }
        }
    }
}

/// Reads the peer's frames from `stream` until it ends or stays silent for
/// [`PEER_SILENT`] (hellos come every [`HELLO_INTERVAL`]); flows go to `batches`.
async fn follow(
    stream: TcpStream,
    link: &PairLink,
    batches: &mpsc::Sender<Vec<wire::Record>>,
) -> Result<()> {
    let (mut reader, _writer) = stream.into_split();
    loop {
        let message = tokio::time::timeout(PEER_SILENT, wire::read(&mut reader))
            .await
            .map_err(|_| anyhow::anyhow!("the peer said nothing for {PEER_SILENT:?}"))??;
        match message {
            None => return Ok(()),
            Some(wire::Message::Hello(role)) => {
                let now = Instant::now();
                link.peer.update(|state| {
                    // A run of hellos broken by a silence starts again.
                    let since = match state.role {
                        Some(heard)
                            if heard.role == role && now.duration_since(heard.at) < PEER_SILENT =>
                        {
                            heard.since
                        }
                        _ => now,
                    };
                    state.role = Some(Heard {
                        role,
                        at: now,
                        since,
                    });
                });
                check_split_brain(link);
            }
            // Waits while the applier is behind (TCP then holds the peer back); hellos
            // behind the flows wait too, so the peer's role may read as unknown for a
            // moment during a large table.
            Some(wire::Message::Flows(records)) => batches
                .send(records)
                .await
                .context("the thread that writes the peer's flows has ended")?,
        }
    }
}

/// Writes each batch from `queued` into this host's table, until every sender is gone.
fn apply_all(mut queued: mpsc::Receiver<Vec<wire::Record>>, link: &PairLink) {
    while let Some(records) = queued.blocking_recv() {
        apply(&records, link);
    }
}

/// Writes the peer's `records` into this host's table: over anything on a standby, only
/// where the table has no flow of that key and no live flow holds its reply key on an
/// active host (a host that came back and took over before the peer's table reached it, or
/// a split brain): an active host never replaces a flow of its own.
fn apply(records: &[wire::Record], link: &PairLink) {
    let standby = link.maps.role().is_ok_and(|role| role == HostRole::Standby);
    let settings = if standby {
        None
    } else {
        match link.maps.flow_settings() {
            Ok(settings) => Some(settings),
            Err(e) => {
                tracing::warn!("cannot read the connection table's timeouts: {e:#}");
                link.metrics
                    .pair_flows_received
                    .get_or_create(&PairOutcome::FAILED)
                    .inc_by(records.len() as u64);
                return;
            }
        }
    };
    let translator = Translator::new(&link.plan.get());
    let now = monotonic_ns();
    let placement = match &settings {
        None => Placement::Overwrite,
        Some(settings) => Placement::IfFree { settings, now },
    };
    let (mut applied, mut kept, mut unmapped, mut failed) = (0, 0, 0, 0);
    for record in records {
        let service = link.maps.service_of(&record.key);
        let Some(flow) = service.and_then(|s| translator.flow(record, s.id, now)) else {
            unmapped += 1;
            continue;
        };
        match link
            .maps
            .write_flow(&record.key, &flow, record.backend_ip, placement)
        {
            Ok(true) => applied += 1,
            Ok(false) => kept += 1,
            Err(e) => {
                failed += 1;
                tracing::debug!("{e:#}");
            }
        }
    }
    let metrics = &link.metrics.pair_flows_received;
    for (outcome, count) in [
        (PairOutcome::APPLIED, applied),
        (PairOutcome::KEPT, kept),
        (PairOutcome::UNMAPPED, unmapped),
        (PairOutcome::FAILED, failed),
    ] {
        if count > 0 {
            metrics.get_or_create(&outcome).inc_by(count);
        }
    }
}

/// Compares the peer's role with this host's: both active is a split brain, logged when it
/// starts and ends, and exported. It counts only once a hello shows both hosts active for
/// [`SPLIT_BRAIN_AFTER`]: the roles cross briefly during a preemption, and a peer that died
/// active (the very reason for a takeover) says nothing more.
fn check_split_brain(link: &PairLink) {
    let own = link.maps.role().ok();
    let now = Instant::now();
    link.peer.update(|state| {
        if own.is_some() && state.own.map(|(role, _)| role) != own {
            state.own = own.map(|role| (role, now));
        }
        let peer = heard(state);
        let split = both_active(state.own, state.role.filter(|_| peer.is_some()));
        if split != state.split_brain {
            if split {
                tracing::error!(
                    "split brain: this host and its peer are both active. Both serve the VIPs; \
                     each keeps its own flows and takes only those of the other it does not \
                     have; check the VRRP path between the hosts (keepalived's logs)"
                );
            } else {
                tracing::warn!(peer = ?peer, "split brain over");
            }
            state.split_brain = split;
        }
        link.metrics.pair_split_brain.set(i64::from(split));
        link.metrics.pair_peer_heard.set(i64::from(peer.is_some()));
    });
}

/// Whether this host's role (`own`, since when) and the peer's (`peer`, as still heard)
/// make a split brain: both active, as a hello received [`SPLIT_BRAIN_AFTER`] after both
/// became active shows.
fn both_active(own: Option<(HostRole, Instant)>, peer: Option<Heard>) -> bool {
    match (own, peer) {
        (Some((HostRole::Active, own_since)), Some(heard)) if heard.role == HostRole::Active => {
            heard
                .at
                .saturating_duration_since(own_since.max(heard.since))
                >= SPLIT_BRAIN_AFTER
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn heard(role: HostRole, since_ms: u64, at_ms: u64, start: Instant) -> Option<Heard> {
        Some(Heard {
            role,
            at: start + Duration::from_millis(at_ms),
            since: start + Duration::from_millis(since_ms),
        })
    }

    #[test]
    fn both_active_only_once_a_hello_shows_it_for_long_enough() {
        let start = Instant::now();
        let active = Some((HostRole::Active, start));
        let standby = Some((HostRole::Standby, start));
        let later = Some((HostRole::Active, start + Duration::from_millis(500)));
        // Roles that cross during a preemption: a hello within the grace.
        assert!(!both_active(active, heard(HostRole::Active, 0, 100, start)));
        // Still active 300 ms on: a split brain.
        assert!(both_active(active, heard(HostRole::Active, 0, 300, start)));
        // The peer only just turned active, however long this host has been.
        assert!(!both_active(
            active,
            heard(HostRole::Active, 900, 1000, start)
        ));
        // A hello from before this host became active (the peer that died active).
        assert!(!both_active(later, heard(HostRole::Active, 0, 400, start)));
        assert!(!both_active(
            standby,
            heard(HostRole::Active, 0, 900, start)
        ));
        assert!(!both_active(
            active,
            heard(HostRole::Standby, 0, 900, start)
        ));
        assert!(!both_active(active, None));
    }
}
