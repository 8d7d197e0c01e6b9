//! The client's side of the failover bench: a paced stream of requests to the VIP (answers
//! recorded with who answered and when), and a one-way datagram stream for the loss
//! measurement. Both run in the client's namespace and are bounded in count and time.

use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;

/// CLOCK_REALTIME in nanoseconds: the clock the servers log with (shared by all namespaces).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The name of the server that answered.
    pub by: String,
    /// When the answer arrived (CLOCK_REALTIME ns).
    pub at_ns: u128,
}

/// What a request stream saw.
#[derive(Debug, Clone)]
pub struct StreamResult {
    /// First request number of the stream.
    pub first: u64,
    /// Requests sent.
    pub sent: u64,
    /// Requests the socket refused to send (counted as sent: their numbers are used up).
    pub send_errors: u64,
    /// Requests per second the sender achieved.
    pub achieved_rate: f64,
    /// The longest pause between two sends (s): a client-side stall the figures include.
    pub largest_send_gap: f64,
    /// When the last request left (CLOCK_REALTIME ns).
    pub last_sent_ns: u128,
    /// Answers in arrival order (a duplicate answer is kept once).
    pub replies: Vec<Reply>,
}

impl StreamResult {
    /// Requests that got no answer.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.replies.len() as u64)
    }

    /// The longest time without an answer while requests were being sent, in seconds:
    /// between two answers, or from the last answer to the last request when the answers
    /// stopped for good.
    pub fn longest_gap(&self) -> f64 {
        let between = self
            .replies
            .windows(2)
            .map(|w| w[1].at_ns.saturating_sub(w[0].at_ns))
            .max()
            .unwrap_or(0);
        let tail = self
            .replies
            .last()
            .map_or(0, |r| self.last_sent_ns.saturating_sub(r.at_ns));
        between.max(tail) as f64 / 1e9
    }
}

/// Sends requests `seq FIRST…` to `vip:port` at `rate` per second for `duration` through
/// `socket` (made in the client's namespace), calling `during` (in this thread) once
/// `fault_after` has passed; returns what came back. Answers are collected until 300 ms
/// after the last request.
#[allow(clippy::too_many_arguments)]
pub fn request_stream(
    socket: UdpSocket,
    vip: Ipv4Addr,
    port: u16,
    first: u64,
    rate: u32,
    duration: Duration,
    fault_after: Duration,
    during: impl FnOnce() -> Result<()>,
) -> Result<StreamResult> {
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let receiver_socket = socket.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || receive_replies(receiver_socket, first, stop))
    };
    let count = (rate as f64 * duration.as_secs_f64()) as u64;
    let sender = std::thread::spawn(move || {
        paced(count, rate, |i| {
            socket
                .send_to(format!("seq {}", first + i).as_bytes(), (vip, port))
                .is_ok()
        })
    });
    // On an interrupt the fault is skipped, but the threads are still joined.
    let fault = super::super::interrupt::sleep(fault_after).and_then(|()| during());
    let pacing = sender.join().expect("sender thread");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut replies = receiver.join().expect("receiver thread");
    fault?;
    replies.sort_by_key(|r| r.at_ns);
    Ok(StreamResult {
        first,
        sent: count,
        send_errors: pacing.errors,
        achieved_rate: pacing.rate(count),
        largest_send_gap: pacing.largest_gap.as_secs_f64(),
        last_sent_ns: pacing.last_sent_ns,
        replies,
    })
}

/// How a paced sender kept its schedule.
struct Pacing {
    /// Sends that failed.
    errors: u64,
    /// The longest pause between two sends.
    largest_gap: Duration,
    /// From the first send to the last.
    elapsed: Duration,
    /// When the last send happened (CLOCK_REALTIME ns).
    last_sent_ns: u128,
}

impl Pacing {
    /// Sends per second over the run.
    fn rate(&self, count: u64) -> f64 {
        match self.elapsed.as_secs_f64() {
            s if s > 0.0 => count.saturating_sub(1) as f64 / s,
            _ => 0.0,
        }
    }
}

/// Calls `send(i)` for `i` in `0..count` at `rate` per second (catching up without sleeping
/// when late); `send` says whether the send went out.
fn paced(count: u64, rate: u32, mut send: impl FnMut(u64) -> bool) -> Pacing {
    reduce_timer_slack();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut pacing = Pacing {
        errors: 0,
        largest_gap: Duration::ZERO,
        elapsed: Duration::ZERO,
        last_sent_ns: 0,
    };
    let mut previous: Option<Instant> = None;
    for i in 0..count {
        let due = start + period.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if !send(i) {
            pacing.errors += 1;
        }
        let sent_at = Instant::now();
        if let Some(previous) = previous {
            pacing.largest_gap = pacing.largest_gap.max(sent_at - previous);
        }
        previous = Some(sent_at);
    }
    pacing.elapsed = previous.map_or(Duration::ZERO, |p| p - start);
    pacing.last_sent_ns = now_ns();
    pacing
}

fn receive_replies(socket: UdpSocket, first: u64, stop: Arc<AtomicBool>) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((len, _)) = socket.recv_from(&mut buf) {
            record_reply(&buf[..len], first, &mut seen, &mut replies);
        }
    }
    // What is still queued arrived in time too: a client that fell behind reads it now.
    if socket.set_nonblocking(true).is_ok() {
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            record_reply(&buf[..len], first, &mut seen, &mut replies);
        }
    }
    replies
}

/// Keeps `datagram` when it is the first answer to a request numbered `first` or later.
fn record_reply(
    datagram: &[u8],
    first: u64,
    seen: &mut std::collections::HashSet<u64>,
    replies: &mut Vec<Reply>,
) {
    let at_ns = now_ns();
    let text = String::from_utf8_lossy(datagram);
    let mut words = text.split_whitespace();
    let (Some(by), Some("seq"), Some(seq)) = (words.next(), words.next(), words.next()) else {
        return;
    };
    let Ok(seq) = seq.parse::<u64>() else {
        return;
    };
    if seq >= first && seen.insert(seq) {
        replies.push(Reply {
            by: by.to_string(),
            at_ns,
        });
    }
}

/// Sends datagrams `loss N` padded to `size` bytes to `vip:port` at `pps` for `duration`
/// through `socket` (made in the client's namespace), calling `during` once `fault_after`
/// has passed; returns the datagrams sent. A datagram the socket refuses is counted as sent
/// and lost (its number is used up); more than 1 % refused fails the run, since the stream
/// would then measure the client rather than the failover.
#[allow(clippy::too_many_arguments)]
pub fn oneway_stream(
    socket: UdpSocket,
    vip: Ipv4Addr,
    port: u16,
    first: u64,
    pps: u32,
    size: usize,
    duration: Duration,
    fault_after: Option<Duration>,
    during: impl FnOnce() -> Result<()>,
) -> Result<u64> {
    let count = (pps as f64 * duration.as_secs_f64()) as u64;
    let sender = std::thread::spawn(move || {
        let mut datagram = Vec::with_capacity(size);
        paced(count, pps, |i| {
            datagram.clear();
            datagram.extend_from_slice(format!("loss {} ", first + i).as_bytes());
            datagram.resize(size.max(datagram.len()), b'.');
            socket.send_to(&datagram, (vip, port)).is_ok()
        })
    });
    let fault = match fault_after {
        Some(after) => super::super::interrupt::sleep(after).and_then(|()| during()),
        None => Ok(()),
    };
    let pacing = sender.join().expect("sender thread");
    fault?;
    anyhow::ensure!(
        pacing.errors * 100 <= count,
        "the client could not send {} of {count} loss-stream datagrams",
        pacing.errors
    );
    Ok(count)
}

/// Asks for 1 µs timer slack, so that sleeps between requests end when they should.
fn reduce_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
}
