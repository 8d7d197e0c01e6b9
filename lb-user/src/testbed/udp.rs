//! UDP on the testbed: a responder on a backend that names itself in every answer, and a
//! client that asks the VIP at a steady rate and records who answered each request and when
//! (the figure every failover and lifecycle test counts).

use std::{
    collections::VecDeque,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::topology::{Host, Testbed, UDP_PORT, VIP};

/// How long a responder's receive waits when no answer is due (its stop flag is read this
/// often).
const IDLE_WAIT: Duration = Duration::from_millis(100);

impl Testbed {
    /// Stops the UDP responder of `host`: its port then answers "unreachable".
    pub fn stop_udp_responder(&mut self, host: Host) {
        self.responders.retain(|(h, _)| *h != host);
    }

    /// Starts a UDP responder on `host`: every datagram to port [`UDP_PORT`] is answered
    /// with `name` followed by the request.
    pub fn start_udp_responder(&mut self, host: Host, name: &str) -> Result<()> {
        self.start_slow_udp_responder(host, name, Duration::ZERO)
    }

    /// Starts a UDP responder on `host` that answers every datagram `delay` after it came
    /// (requests keep coming meanwhile: each is answered on its own time), like a backend
    /// that is slow but alive.
    pub fn start_slow_udp_responder(
        &mut self,
        host: Host,
        name: &str,
        delay: Duration,
    ) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let name = name.to_string();
        let socket = self.host(host).enter(move || -> Result<UdpSocket> {
            let socket = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
            socket.set_read_timeout(Some(IDLE_WAIT))?;
            Ok(socket)
        })??;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut due: VecDeque<(Instant, Vec<u8>, SocketAddr)> = VecDeque::new();
            let mut waiting = IDLE_WAIT;
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                while due.front().is_some_and(|(at, _, _)| *at <= now) {
                    if let Some((_, reply, to)) = due.pop_front() {
                        let _ = socket.send_to(&reply, to);
                    }
                }
                let wait = due.front().map_or(IDLE_WAIT, |(at, _, _)| {
                    at.saturating_duration_since(now)
                        .max(Duration::from_micros(50))
                });
                if wait != waiting {
                    let _ = socket.set_read_timeout(Some(wait));
                    waiting = wait;
                }
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let mut reply = name.as_bytes().to_vec();
                    reply.push(b' ');
                    reply.extend_from_slice(&buf[..len]);
                    due.push_back((Instant::now() + delay, reply, from));
                }
            }
        });
        let responder = UdpResponder {
            stop,
            thread: Some(thread),
        };
        self.responders.push((host, responder));
        Ok(())
    }

    /// One UDP request from the client to the VIP: (answer, address it came from).
    pub fn udp_request_vip(&self, payload: &str) -> Result<(String, SocketAddrV4)> {
        let payload = payload.to_string();
        self.client
            .enter(move || -> Result<(String, SocketAddrV4)> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.send_to(payload.as_bytes(), (VIP, UDP_PORT))?;
                let mut buf = [0u8; 2048];
                let (len, from) = socket
                    .recv_from(&mut buf)
                    .context("no UDP answer within 2 s")?;
                let std::net::SocketAddr::V4(from) = from else {
                    bail!("answer from {from}")
                };
                Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
            })?
    }

    /// Starts a client stream in the background: `count` UDP requests to the VIP, one every
    /// `period`, recording who answered each and when. Bounded: it ends `count × period`
    /// plus 300 ms after it starts.
    pub fn udp_stream(
        &self,
        count: u32,
        period: Duration,
    ) -> Result<std::thread::JoinHandle<Result<Vec<Answer>>>> {
        self.client.spawn(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect((VIP, UDP_PORT))?;
            let start = Instant::now();
            let mut answers: Vec<Answer> = (0..count)
                .map(|seq| Answer {
                    seq,
                    sent: start + period * seq,
                    by: None,
                    received: None,
                })
                .collect();
            let mut buf = [0u8; 512];
            let mut receive_until = |deadline: Instant, answers: &mut Vec<Answer>| loop {
                let now = Instant::now();
                if now >= deadline {
                    return;
                }
                let wait = (deadline - now).max(Duration::from_micros(50));
                let _ = socket.set_read_timeout(Some(wait));
                let Ok(len) = socket.recv(&mut buf) else {
                    continue;
                };
                let received = Instant::now();
                let text = String::from_utf8_lossy(&buf[..len]);
                let mut words = text.split_whitespace();
                let (Some(by), Some("seq"), Some(seq)) = (words.next(), words.next(), words.next())
                else {
                    continue;
                };
                if let Some(answer) = seq.parse::<usize>().ok().and_then(|s| answers.get_mut(s)) {
                    answer.by = Some(by.to_string());
                    answer.received = Some(received);
                }
            };
            for seq in 0..count {
                receive_until(start + period * seq, &mut answers);
                let _ = socket.send(format!("seq {seq}").as_bytes());
            }
            receive_until(Instant::now() + Duration::from_millis(300), &mut answers);
            Ok(answers)
        })
    }
}

/// One request of [`Testbed::udp_stream`].
#[derive(Debug, Clone)]
pub struct Answer {
    /// Sequence number.
    pub seq: u32,
    /// When it was sent.
    pub sent: Instant,
    /// Who answered it, if anyone.
    pub by: Option<String>,
    /// When the answer arrived.
    pub received: Option<Instant>,
}

/// Who answered, in the order the requests were sent, with repeats folded:
/// `["master", "slave"]`. (In arrival order, a request sent just before a flip and answered
/// by the old backend a little after a newer one was answered by the new backend would look
/// like a flap.)
pub fn answer_runs(answers: &[Answer]) -> Vec<String> {
    let mut received: Vec<&Answer> = answers.iter().filter(|a| a.received.is_some()).collect();
    received.sort_by_key(|a| a.seq);
    let mut runs: Vec<String> = Vec::new();
    for answer in received {
        let by = answer.by.clone().unwrap_or_default();
        if runs.last() != Some(&by) {
            runs.push(by);
        }
    }
    runs
}

/// The answered requests in the order their answers arrived, and the position in it of the
/// answer after which the longest gap began (`None` with fewer than two answers).
fn around_longest_gap(answers: &[Answer]) -> (Vec<(&Answer, Instant)>, Option<usize>) {
    let mut received: Vec<(&Answer, Instant)> = answers
        .iter()
        .filter_map(|a| Some((a, a.received?)))
        .collect();
    received.sort_by_key(|(_, at)| *at);
    let at = received
        .windows(2)
        .enumerate()
        .max_by_key(|(_, w)| w[1].1 - w[0].1)
        .map(|(i, _)| i);
    (received, at)
}

/// The longest time between two consecutive answers.
pub fn longest_gap(answers: &[Answer]) -> Duration {
    match around_longest_gap(answers) {
        (received, Some(at)) => received[at + 1].1 - received[at].1,
        _ => Duration::ZERO,
    }
}

/// The answers around the longest gap, one line each (sequence number, who answered, when
/// it was sent and answered relative to the first request): what a failed gap assertion
/// prints, so the failure says where the traffic stopped and who resumed it.
pub fn describe_gap(answers: &[Answer]) -> String {
    let Some(start) = answers.first().map(|a| a.sent) else {
        return String::from("no requests");
    };
    let (received, Some(at)) = around_longest_gap(answers) else {
        return String::from("fewer than two answers");
    };
    let ms = |t: Instant| (t - start).as_secs_f64() * 1e3;
    received[at.saturating_sub(3)..(at + 5).min(received.len())]
        .iter()
        .map(|(a, answered)| {
            format!(
                "seq {} by {} sent {:.1} ms answered {:.1} ms\n",
                a.seq,
                a.by.as_deref().unwrap_or("?"),
                ms(a.sent),
                ms(*answered)
            )
        })
        .collect()
}

/// The runs of consecutive unanswered requests (first five), with when they were sent
/// relative to the first request: where a failed "nothing lost" assertion lost them.
pub fn describe_unanswered(answers: &[Answer]) -> String {
    let Some(start) = answers.first().map(|a| a.sent) else {
        return String::from("no requests");
    };
    let mut runs: Vec<(&Answer, &Answer)> = Vec::new();
    for answer in answers.iter().filter(|a| a.received.is_none()) {
        match runs.last_mut() {
            Some((_, last)) if last.seq + 1 == answer.seq => *last = answer,
            _ => runs.push((answer, answer)),
        }
    }
    let ms = |a: &Answer| (a.sent - start).as_secs_f64() * 1e3;
    let mut text: Vec<String> = runs
        .iter()
        .take(5)
        .map(|(first, last)| {
            format!(
                "seq {}–{} (sent {:.1}–{:.1} ms)",
                first.seq,
                last.seq,
                ms(first),
                ms(last)
            )
        })
        .collect();
    if runs.len() > 5 {
        text.push(format!("and {} more runs", runs.len() - 5));
    }
    format!("unanswered: {}", text.join(", "))
}

/// Requests that got no answer.
pub fn unanswered(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.received.is_none()).count()
}

pub(super) struct UdpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
