//! The sending half: the program's flow reports, streamed to the peer.
//!
//! One loop reads the ring and keeps the schedule (hellos, attempts to reach the peer, the
//! check for lost reports); each connection has a writer task of its own, which sends the
//! whole live table first and then the frames the loop queues for it, in order. A slow
//! peer never holds the loop up: a queue that fills up, like reports the ring lost, ends
//! the connection, and the next one starts with the whole table again.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use futures::FutureExt;
use lb_common::{Event, FlowUpdate};
use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt, Interest},
    net::{TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

use super::{wire, PairLink, Translator, HELLO_INTERVAL, PEER_SILENT};
use crate::dataplane::writer::monotonic_ns;

/// Reports taken from the ring at once at most, so that hellos go out between them.
const DRAIN_AT_MOST: usize = 8192;
/// How long one frame's write may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames queued for a connection at most (hellos and batches of reports); beyond, the
/// peer takes in too slowly and the connection starts again with the whole table.
const QUEUE_FRAMES: usize = 4096;
/// The longest wait between two attempts to reach the peer (the wait doubles from
/// [`HELLO_INTERVAL`] while the peer cannot be reached).
const RETRY_AT_MOST: Duration = Duration::from_secs(1);

/// Streams every flow the program reports on `reports` to the agent at `peer`, from
/// `local` (this host's `sync_listen`, the address the peer accepts), for as long as the
/// agent runs. Reports made while the peer is unreachable are dropped: the table sent on
/// the next connection covers them. Ends only when the ring can no longer be read.
pub async fn stream(reports: RingBuf<MapData>, peer: SocketAddr, local: IpAddr, link: PairLink) {
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
    let mut sender = Sender::new(peer, local, link);
    let mut tick = tokio::time::interval(HELLO_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
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
                sender.send_reports(&updates);
            }
            _ = tick.tick() => sender.tick(),
        }
    }
}

/// The schedule of the stream to the peer, and its connection.
struct Sender {
    peer: SocketAddr,
    local: IpAddr,
    link: PairLink,
    connection: Option<Connection>,
    /// The wait before the next attempt to reach the peer.
    retry: Duration,
    next_attempt: Instant,
    /// Whether the failure to reach the peer was logged (once until the link is up).
    complained: bool,
    /// The program's count of reports lost to a full ring, when last read.
    lost: u64,
}

/// A connection to the peer: its writer task and the queue of frames it sends.
struct Connection {
    frames: mpsc::Sender<Vec<u8>>,
    writer: JoinHandle<Result<(), Ended>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Why a connection's writer ended.
struct Ended {
    /// Whether the whole table had gone out (the link was up).
    was_up: bool,
    error: anyhow::Error,
}

impl Drop for Sender {
    fn drop(&mut self) {
        set_streaming(&self.link, false);
    }
}

impl Sender {
    fn new(peer: SocketAddr, local: IpAddr, link: PairLink) -> Self {
        let lost = lost_reports(&link).unwrap_or(0);
        Sender {
            peer,
            local,
            link,
            connection: None,
            retry: HELLO_INTERVAL,
            next_attempt: Instant::now(),
            complained: false,
            lost,
        }
    }

    /// Queues `updates` for the peer, when connected.
    fn send_reports(&mut self, updates: &[FlowUpdate]) {
        if self.connection.is_none() || updates.is_empty() {
            return;
        }
        let translator = Translator::new(&self.link.plan.get());
        let now = monotonic_ns();
        let records: Vec<_> = updates
            .iter()
            .filter_map(|u| translator.record(&u.key, &u.flow, now))
            .collect();
        self.link
            .metrics
            .pair_flows_sent
            .inc_by(records.len() as u64);
        for batch in records.chunks(wire::BATCH) {
            let mut frame = Vec::new();
            wire::encode_flows(batch, &mut frame);
            self.queue(frame);
        }
    }

    /// Every [`HELLO_INTERVAL`]: notices a connection that ended, starts the whole table
    /// again when the ring lost reports, tries to reach the peer when due, and says hello.
    fn tick(&mut self) {
        self.reap();
        let lost = lost_reports(&self.link);
        if let Ok(lost) = lost {
            if lost > self.lost && self.connection.is_some() {
                tracing::warn!(
                    lost = lost - self.lost,
                    "flow reports lost to a full ring; sending the peer the whole table again"
                );
                self.disconnect();
                self.next_attempt = Instant::now();
            }
            self.lost = lost;
        }
        if self.connection.is_none() {
            if Instant::now() >= self.next_attempt {
                self.connect();
            }
            return;
        }
        // A role that cannot be read is not announced: a wrong one would be worse.
        if let Ok(role) = self.link.maps.role() {
            let mut frame = Vec::new();
            wire::encode_hello(role, &mut frame);
            self.queue(frame);
        }
    }

    fn connect(&mut self) {
        let (frames, queued) = mpsc::channel(QUEUE_FRAMES);
        let writer = tokio::spawn(write_connection(
            self.peer,
            self.local,
            self.link.clone(),
            queued,
        ));
        self.connection = Some(Connection { frames, writer });
    }

    /// Handles the end of a connection whose writer finished: logs it, and schedules the
    /// next attempt (at once after a link that was up, later and later while the peer
    /// cannot be reached).
    fn reap(&mut self) {
        let Some(connection) = &mut self.connection else {
            return;
        };
        let Some(ended) = (&mut connection.writer).now_or_never() else {
            return;
        };
        self.disconnect();
        let Ended { was_up, error } = match ended {
            Ok(Ok(())) => return,
            Ok(Err(ended)) => ended,
            Err(e) => Ended {
                was_up: false,
                error: anyhow::anyhow!("the writer task failed: {e}"),
            },
        };
        let peer = self.peer;
        if was_up {
            tracing::warn!(%peer, "pair link down: {error:#}");
            self.retry = HELLO_INTERVAL;
            self.complained = false;
        } else {
            if !self.complained {
                tracing::warn!(%peer, "cannot stream flows to the peer: {error:#}; trying again every {:?} at most", RETRY_AT_MOST);
                self.complained = true;
            }
            self.retry = (self.retry * 2).min(RETRY_AT_MOST);
        }
        self.next_attempt = Instant::now() + self.retry;
    }

    fn disconnect(&mut self) {
        self.connection = None;
        set_streaming(&self.link, false);
    }

    /// Queues `frame` for the connection; a full queue ends it.
    fn queue(&mut self, frame: Vec<u8>) {
        let Some(connection) = &self.connection else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = connection.frames.try_send(frame) {
            tracing::warn!(
                peer = %self.peer,
                "the peer takes the flow stream in too slowly; starting again with the whole table"
            );
            self.disconnect();
            self.next_attempt = Instant::now() + self.retry;
        }
        // Closed: the writer ended, which the next tick handles.
    }
}

/// The program's count of flow reports lost to a full ring.
fn lost_reports(link: &PairLink) -> Result<u64> {
    Ok(link.maps.events()?[Event::FlowSyncLost as usize])
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

/// One connection's writer: connects to `peer` from `local`, sends a hello and the whole
/// live table, then every frame queued on `frames` until the queue closes or a write fails.
async fn write_connection(
    peer: SocketAddr,
    local: IpAddr,
    link: PairLink,
    mut frames: mpsc::Receiver<Vec<u8>>,
) -> Result<(), Ended> {
    let down = |error| Ended {
        was_up: false,
        error,
    };
    let mut stream = open(peer, local).await.map_err(down)?;
    let sent = send_table(&mut stream, &link).await.map_err(down)?;
    tracing::info!(%peer, flows = sent, "pair link up: the connection table was sent to the peer");
    set_streaming(&link, true);
    while let Some(frame) = frames.recv().await {
        write(&mut stream, &frame).await.map_err(|error| Ended {
            was_up: true,
            error,
        })?;
    }
    Ok(())
}

/// Connects to `peer` from `local`, with data left unacknowledged for [`PEER_SILENT`]
/// ending the connection (a peer that died without a word).
async fn open(peer: SocketAddr, local: IpAddr) -> Result<TcpStream> {
    let socket = match peer {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("cannot make a socket")?;
    if !local.is_unspecified() {
        socket
            .bind(SocketAddr::new(local, 0))
            .with_context(|| format!("cannot connect from {local} (pair.sync_listen)"))?;
    }
    let unacked_ms = u32::try_from(PEER_SILENT.as_millis()).expect("a second");
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::TcpUserTimeout,
        &unacked_ms,
    )
    .context("TCP_USER_TIMEOUT")?;
    let stream = tokio::time::timeout(PEER_SILENT, socket.connect(peer))
        .await
        .context("no answer")?
        .context("cannot connect")?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(stream)
}

/// Sends a hello and the whole live table on `stream`, a frame at a time; returns the
/// number of flows sent.
async fn send_table(stream: &mut TcpStream, link: &PairLink) -> Result<usize> {
    let mut hello = Vec::new();
    wire::encode_hello(link.maps.role()?, &mut hello);
    write(stream, &hello).await?;
    let maps = link.maps.clone();
    let plan = link.plan.get();
    let records = tokio::task::spawn_blocking(move || -> Result<Vec<wire::Record>> {
        let settings = maps.flow_settings()?;
        let now = monotonic_ns();
        let translator = Translator::new(&plan);
        Ok(maps
            .read_flows(crate::flows::read_limit(&plan))
            .into_iter()
            .filter(|record| !record.expired(&settings, now))
            .filter_map(|record| translator.record(&record.key, &record.flow, now))
            .collect())
    })
    .await
    .context("reading the connection table failed")??;
    for batch in records.chunks(wire::BATCH) {
        let mut frame = Vec::new();
        wire::encode_flows(batch, &mut frame);
        write(stream, &frame).await?;
    }
    link.metrics.pair_table_sends.inc();
    link.metrics.pair_flows_sent.inc_by(records.len() as u64);
    Ok(records.len())
}

/// Writes one frame, within [`WRITE_TIMEOUT`].
async fn write(stream: &mut TcpStream, frame: &[u8]) -> Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(frame))
        .await
        .context("the peer takes nothing in")?
        .context("cannot write to the peer")
}

fn set_streaming(link: &PairLink, up: bool) {
    link.peer.update(|state| state.streaming = up);
    link.metrics.pair_stream_up.set(i64::from(up));
}
