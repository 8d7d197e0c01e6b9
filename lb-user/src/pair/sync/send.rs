//! The sending half: the program's flow reports, streamed to the peer.
//!
//! One loop reads the ring and keeps the schedule (hellos, attempts to reach the peer, the
//! check for lost reports); each connection has a writer task of its own, which sends the
//! whole live table first and then the frames the loop queues for it, in order. A slow
//! peer never holds the loop up: a queue that fills up, like reports the ring lost after
//! the table was read, ends the connection, and the next one starts with the whole table
//! again. Only the loop shows the link's state (`streaming`, `lb_pair_stream_up`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
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
use crate::{dataplane::writer::monotonic_ns, metrics::TableReason};

/// Reports taken from the ring at once at most, so that hellos go out between them.
const DRAIN_AT_MOST: usize = 8192;
/// How long one frame's write may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes queued for a connection at most (hellos and batches of reports, about a million
/// flows' reports); beyond, the peer takes in too slowly and the connection starts again
/// with the whole table.
const QUEUE_BYTES: usize = 64 << 20;
/// A link up this long has proved itself: its end resets the wait between attempts.
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Reports lost to a full ring are logged as a warning at most this often.
const LOST_WARNING_EVERY: Duration = Duration::from_secs(60);
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
    /// Why the next connection's table goes out.
    reason: TableReason,
    /// The wait before the next attempt to reach the peer.
    retry: Duration,
    next_attempt: Instant,
    /// Whether the failure to reach the peer was logged (once until the link is up).
    complained: bool,
    /// When a loss of reports was last logged at warning level.
    lost_warned: Option<Instant>,
}

/// A connection to the peer: its writer task, the queue of frames it sends, and what the
/// writer and the loop share.
struct Connection {
    frames: mpsc::UnboundedSender<Frame>,
    writer: JoinHandle<Result<()>>,
    shared: Arc<Shared>,
    /// Since when the loop has shown the link up (`None`: the table is not out yet).
    up_since: Option<Instant>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// What a connection's writer tells the loop.
#[derive(Default)]
struct Shared {
    /// The whole table went out: the link is up.
    up: AtomicBool,
    /// The program's count of lost reports just before the table was read: a loss beyond
    /// it is not covered by the table.
    lost_at_table: AtomicU64,
    /// Bytes queued for the writer and not yet written.
    queued: AtomicUsize,
}

/// A frame queued for the peer, and the flows it carries.
struct Frame {
    bytes: Vec<u8>,
    flows: u64,
}

impl Drop for Sender {
    fn drop(&mut self) {
        set_streaming(&self.link, false);
    }
}

impl Sender {
    fn new(peer: SocketAddr, local: IpAddr, link: PairLink) -> Self {
        Sender {
            peer,
            local,
            link,
            connection: None,
            reason: TableReason::CONNECTED,
            retry: HELLO_INTERVAL,
            next_attempt: Instant::now(),
            complained: false,
            lost_warned: None,
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
        for batch in records.chunks(wire::BATCH) {
            let mut bytes = Vec::new();
            wire::encode_flows(batch, &mut bytes);
            self.queue(Frame {
                bytes,
                flows: batch.len() as u64,
            });
        }
    }

    /// Every [`HELLO_INTERVAL`]: notices a connection that came up or ended, starts the
    /// whole table again when the ring lost reports it does not cover, tries to reach the
    /// peer when due, and says hello.
    fn tick(&mut self) {
        self.reap();
        let mut lost_beyond_table = false;
        if let Some(connection) = &mut self.connection {
            if connection.up_since.is_none() && connection.shared.up.load(Ordering::Acquire) {
                connection.up_since = Some(Instant::now());
                set_streaming(&self.link, true);
            }
            if connection.up_since.is_some() {
                let lost = self.link.maps.event(Event::FlowSyncLost);
                lost_beyond_table = lost.is_ok_and(|lost| {
                    lost > connection.shared.lost_at_table.load(Ordering::Acquire)
                });
            }
        }
        if lost_beyond_table {
            self.warn_lost();
            self.restart(TableReason::REPORTS_LOST, Instant::now());
        }
        if self.connection.is_none() {
            if Instant::now() >= self.next_attempt {
                self.connect();
            }
            return;
        }
        // A role that cannot be read is not announced: a wrong one would be worse.
        if let Ok(role) = self.link.maps.role() {
            let mut bytes = Vec::new();
            wire::encode_hello(role, &mut bytes);
            self.queue(Frame { bytes, flows: 0 });
        }
    }

    /// Logs reports lost to a full ring: a warning at most once a minute, else at debug
    /// level (a ring that overflows all along would fill the log).
    fn warn_lost(&mut self) {
        let now = Instant::now();
        if self
            .lost_warned
            .is_none_or(|at| now.duration_since(at) >= LOST_WARNING_EVERY)
        {
            tracing::warn!(
                "flow reports lost to a full ring (flow_sync_lost rose): sending the peer the \
                 whole table again; if this repeats, the agent cannot keep up with the \
                 program's reports (check its CPU)"
            );
            self.lost_warned = Some(now);
        } else {
            tracing::debug!("flow reports lost to a full ring; sending the whole table again");
        }
    }

    fn connect(&mut self) {
        let (frames, queued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let writer = tokio::spawn(write_connection(
            self.peer,
            self.local,
            self.link.clone(),
            shared.clone(),
            queued,
            self.reason.clone(),
        ));
        self.connection = Some(Connection {
            frames,
            writer,
            shared,
            up_since: None,
        });
        self.reason = TableReason::CONNECTED;
    }

    /// Ends the connection, to start again at `at` with the whole table, sent for `reason`.
    fn restart(&mut self, reason: TableReason, at: Instant) {
        self.disconnect();
        self.reason = reason;
        self.next_attempt = at;
    }

    /// Handles the end of a connection whose writer finished: logs it, and schedules the
    /// next attempt (at once after a link that stayed up a while, later and later while
    /// the peer cannot be reached or does not keep the link up).
    fn reap(&mut self) {
        let Some(connection) = &mut self.connection else {
            return;
        };
        let Some(ended) = (&mut connection.writer).now_or_never() else {
            return;
        };
        let was_up = connection.shared.up.load(Ordering::Acquire);
        let stable = connection
            .up_since
            .is_some_and(|since| since.elapsed() >= STABLE_AFTER);
        self.disconnect();
        let error = match ended {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(e) => anyhow::anyhow!("the writer task failed: {e}"),
        };
        let (peer, local) = (self.peer, self.local);
        if was_up {
            tracing::warn!(%peer, "pair link down: {error:#}");
        } else if !self.complained {
            tracing::warn!(
                %peer,
                "cannot stream flows to the peer: {error:#}; check that the peer's agent runs \
                 with pair.sync_listen = {peer} and that it is reachable from {local} (trying \
                 again, up to every {RETRY_AT_MOST:?})"
            );
            self.complained = true;
        }
        if stable {
            self.retry = HELLO_INTERVAL;
            self.complained = false;
        } else {
            self.retry = (self.retry * 2).min(RETRY_AT_MOST);
        }
        self.next_attempt = Instant::now() + self.retry;
    }

    fn disconnect(&mut self) {
        self.connection = None;
        set_streaming(&self.link, false);
    }

    /// Queues `frame` for the connection; a queue past [`QUEUE_BYTES`] ends it.
    fn queue(&mut self, frame: Frame) {
        let Some(connection) = &self.connection else {
            return;
        };
        let len = frame.bytes.len();
        if connection.shared.queued.load(Ordering::Acquire) + len > QUEUE_BYTES {
            tracing::warn!(
                peer = %self.peer,
                "the peer takes the flow stream in too slowly ({} MiB queued); starting again \
                 with the whole table",
                QUEUE_BYTES >> 20
            );
            self.retry = (self.retry * 2).min(RETRY_AT_MOST);
            self.restart(TableReason::PEER_SLOW, Instant::now() + self.retry);
            return;
        }
        connection.shared.queued.fetch_add(len, Ordering::AcqRel);
        // An error means the writer ended, which the next tick handles.
        let _ = connection.frames.send(frame);
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

/// One connection's writer: connects to `peer` from `local`, sends a hello and the whole
/// live table (`reason` says why), tells the loop through `shared`, then writes every
/// frame queued on `frames` until the queue closes or a write fails.
async fn write_connection(
    peer: SocketAddr,
    local: IpAddr,
    link: PairLink,
    shared: Arc<Shared>,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    reason: TableReason,
) -> Result<()> {
    let mut stream = open(peer, local).await?;
    let sent = send_table(&mut stream, &link, &shared).await?;
    link.metrics.pair_table_sends.get_or_create(&reason).inc();
    link.metrics.pair_flows_sent.inc_by(sent as u64);
    tracing::info!(%peer, flows = sent, reason = reason.reason, "pair link up: the connection table was sent to the peer");
    shared.up.store(true, Ordering::Release);
    while let Some(frame) = frames.recv().await {
        write(&mut stream, &frame.bytes).await?;
        shared.queued.fetch_sub(frame.bytes.len(), Ordering::AcqRel);
        link.metrics.pair_flows_sent.inc_by(frame.flows);
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
        socket.bind(SocketAddr::new(local, 0)).with_context(|| {
            format!(
                "cannot connect from {local} (pair.sync_listen): it must be an address of \
                     this host on the pair link"
            )
        })?;
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
/// number of flows sent. Hellos go on while the table is read: the peer closes a stream
/// that says nothing for [`PEER_SILENT`].
async fn send_table(stream: &mut TcpStream, link: &PairLink, shared: &Shared) -> Result<usize> {
    let hello = || -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        wire::encode_hello(link.maps.role()?, &mut bytes);
        Ok(bytes)
    };
    write(stream, &hello()?).await?;
    // Losses until now are covered by the table about to be read.
    shared.lost_at_table.store(
        link.maps.event(Event::FlowSyncLost).unwrap_or(0),
        Ordering::Release,
    );
    let maps = link.maps.clone();
    let plan = link.plan.get();
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<wire::Record>> {
        let settings = maps.flow_settings()?;
        let now = monotonic_ns();
        let translator = Translator::new(&plan);
        Ok(maps
            .read_flows(plan.flows.read_limit())
            .into_iter()
            .filter(|record| !record.expired(&settings, now))
            .filter_map(|record| translator.record(&record.key, &record.flow, now))
            .collect())
    });
    tokio::pin!(read);
    let records = loop {
        tokio::select! {
            records = &mut read => break records.context("reading the connection table failed")??,
            _ = tokio::time::sleep(HELLO_INTERVAL) => write(stream, &hello()?).await?,
        }
    };
    for batch in records.chunks(wire::BATCH) {
        let mut frame = Vec::new();
        wire::encode_flows(batch, &mut frame);
        write(stream, &frame).await?;
    }
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
