//! The sending half: the program's flow reports, streamed to the peer.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::FlowUpdate;
use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt, Interest},
    net::TcpStream,
};

use super::{wire, PairLink, Translator, HELLO_INTERVAL};
use crate::dataplane::writer::monotonic_ns;

/// Reports taken from the ring at once at most, so that hellos go out between them.
const DRAIN_AT_MOST: usize = 8192;
/// How long a write to the peer may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Streams every flow the program reports on `reports` to the agent at `peer`, for as long
/// as the agent runs: connects (again every [`HELLO_INTERVAL`] while the peer cannot be
/// reached), sends the whole live table, then each report as it comes, and a hello every
/// [`HELLO_INTERVAL`]. Reports made while the peer is unreachable are dropped: the table
/// sent on the next connection covers them.
pub async fn stream(reports: RingBuf<MapData>, peer: SocketAddr, link: PairLink) {
    // SAFETY: the ring owns its fd, which stays open and unchanged for as long as the ring
    // lives, and the AsyncFd owns the ring.
    let registered = unsafe { AsyncFd::register_with_interest(reports, Interest::READABLE) };
    let mut reports = match registered {
        Ok(reports) => reports,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the program's flow reports; flows are not copied to the peer");
            return;
        }
    };
    let mut connection: Option<TcpStream> = None;
    let mut tick = tokio::time::interval(HELLO_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreachable_logged = false;
    loop {
        let mut out = Vec::new();
        tokio::select! {
            ready = reports.readable_mut() => {
                let Ok(mut ready) = ready else {
                    tracing::error!("the program's flow reports can no longer be read; flows are not copied to the peer");
                    return;
                };
                let (updates, drained) = take_reports(ready.get_inner_mut());
                if drained {
                    ready.clear_ready();
                }
                if connection.is_some() {
                    let translator = Translator::new(&link.plan.get());
                    let now = monotonic_ns();
                    let records: Vec<_> = updates
                        .iter()
                        .filter_map(|u| translator.record(&u.key, &u.flow, now))
                        .collect();
                    link.metrics.pair_flows_sent.inc_by(records.len() as u64);
                    wire::encode_flows(&records, &mut out);
                }
            }
            _ = tick.tick() => {
                if connection.is_none() {
                    match connect(peer, &link).await {
                        Ok((stream, sent)) => {
                            tracing::info!(%peer, flows = sent, "pair link up: the connection table was sent to the peer");
                            unreachable_logged = false;
                            connection = Some(stream);
                            set_streaming(&link, true);
                        }
                        Err(e) => {
                            if !unreachable_logged {
                                tracing::warn!(%peer, "cannot stream flows to the peer: {e:#}; trying again every {HELLO_INTERVAL:?}");
                                unreachable_logged = true;
                            }
                        }
                    }
                    continue;
                }
                wire::encode_hello(link.maps.role().unwrap_or(crate::config::HostRole::Active), &mut out);
            }
        }
        if let Some(stream) = &mut connection {
            if let Err(e) = write(stream, &out).await {
                tracing::warn!(%peer, "pair link down: {e:#}");
                connection = None;
                set_streaming(&link, false);
            }
        }
    }
}

/// Takes the reports waiting in the ring ([`DRAIN_AT_MOST`] at most); the flag says
/// whether the ring is now empty.
fn take_reports(ring: &mut RingBuf<MapData>) -> (Vec<FlowUpdate>, bool) {
    let mut updates = Vec::new();
    while updates.len() < DRAIN_AT_MOST {
        let Some(item) = ring.next() else {
            return (updates, true);
        };
        if let Some(update) = super::parse_report(&item) {
            updates.push(update);
        }
    }
    (updates, false)
}

/// Connects to the peer and sends a hello and the whole live table; returns the
/// connection and the number of flows sent.
async fn connect(peer: SocketAddr, link: &PairLink) -> Result<(TcpStream, usize)> {
    let mut stream = tokio::time::timeout(HELLO_INTERVAL, TcpStream::connect(peer))
        .await
        .context("no answer")?
        .context("cannot connect")?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let mut out = Vec::new();
    wire::encode_hello(link.maps.role()?, &mut out);
    let maps = link.maps.clone();
    let plan = link.plan.get();
    let records = tokio::task::spawn_blocking(move || -> Result<Vec<wire::Record>> {
        let settings = maps.flow_settings()?;
        let now = monotonic_ns();
        let translator = Translator::new(&plan);
        Ok(maps
            .read_flows(plan.flows.max as usize)
            .into_iter()
            .filter(|record| !record.expired(&settings, now))
            .filter_map(|record| translator.record(&record.key, &record.flow, now))
            .collect())
    })
    .await
    .context("reading the connection table failed")??;
    wire::encode_flows(&records, &mut out);
    write(&mut stream, &out).await?;
    link.metrics.pair_table_sends.inc();
    link.metrics.pair_flows_sent.inc_by(records.len() as u64);
    Ok((stream, records.len()))
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .context("the peer takes nothing in")?
        .context("cannot write to the peer")
}

fn set_streaming(link: &PairLink, up: bool) {
    link.peer.update(|state| state.streaming = up);
    link.metrics.pair_stream_up.set(i64::from(up));
}
