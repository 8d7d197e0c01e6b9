//! The receiving half: the peer's stream, written into this host's table, and the peer's
//! role, watched for a split brain.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

use super::{heard, wire, PairLink, Translator, HELLO_INTERVAL};
use crate::{config::HostRole, dataplane::writer::monotonic_ns, metrics::PairOutcome};

/// Listens on `listen` (`[pair] sync_listen`).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen} (pair.sync_listen): it must be an address of this host \
             on the pair link, and free"
        )
    })
}

/// Accepts the peer's connections on `listener` for as long as the agent runs; only a
/// connection from `peer`'s address is served (one at a time: a new one replaces the
/// old), anything else is closed at once. Watches for a split brain meanwhile.
pub async fn serve(listener: TcpListener, peer: SocketAddr, link: PairLink) {
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(HELLO_INTERVAL);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, from) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "pair link: accept failed");
                        continue;
                    }
                };
                if from.ip() != peer.ip() {
                    tracing::warn!(%from, expected = %peer.ip(), "pair link: connection from another address than the peer's, closed");
                    continue;
                }
                if let Some(old) = current.take() {
                    old.abort();
                }
                let link = link.clone();
                current = Some(tokio::spawn(async move {
                    match follow(stream, &link).await {
                        Ok(()) => tracing::info!(%from, "pair link: the peer closed its stream"),
                        Err(e) => tracing::warn!(%from, "pair link: the peer's stream ended: {e:#}"),
                    }
                }));
            }
            _ = tick.tick() => check_split_brain(&link),
        }
    }
}

/// Reads the peer's frames from `stream` until it ends.
async fn follow(stream: TcpStream, link: &PairLink) -> Result<()> {
    let (mut reader, _writer) = stream.into_split();
    while let Some(message) = wire::read(&mut reader).await? {
        match message {
            wire::Message::Hello(role) => {
                link.peer
                    .update(|state| state.role = Some((role, std::time::Instant::now())));
                check_split_brain(link);
            }
            wire::Message::Flows(records) => apply(&records, link),
        }
    }
    Ok(())
}

/// Writes the peer's `records` into this host's table: over anything on a standby, only
/// where the table has no flow of that key on an active host (a host that came back and
/// took over before the peer's table reached it, or a split brain): an active host never
/// replaces a flow of its own.
fn apply(records: &[wire::Record], link: &PairLink) {
    let overwrite = link.maps.role().is_ok_and(|role| role == HostRole::Standby);
    let translator = Translator::new(&link.plan.get());
    let now = monotonic_ns();
    let (mut applied, mut kept, mut unmapped, mut failed) = (0, 0, 0, 0);
    for record in records {
        let service = link.maps.service_of(&record.key);
        let Some(flow) = service.and_then(|s| translator.flow(record, s.id, now)) else {
            unmapped += 1;
            continue;
        };
        match link
            .maps
            .write_flow(&record.key, &flow, record.backend_ip, overwrite)
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
/// starts and ends, and exported. Only a hello sent after this host became active counts:
/// a peer that died active (the very reason for a takeover) says nothing more.
fn check_split_brain(link: &PairLink) {
    let own = link.maps.role().ok();
    let now = std::time::Instant::now();
    link.peer.update(|state| {
        if own.is_some() && state.own.map(|(role, _)| role) != own {
            state.own = own.map(|role| (role, now));
        }
        let peer = heard(state);
        let since = state.own.map_or(now, |(_, since)| since);
        let split = own == Some(HostRole::Active)
            && peer == Some(HostRole::Active)
            && state.role.is_some_and(|(_, at)| at > since);
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
