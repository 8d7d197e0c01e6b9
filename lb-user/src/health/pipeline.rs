//! The prober's schedule: for every check, an attempt every interval, whether or not the
//! earlier ones have answered, each with its own deadline.
//!
//! An attempt passes when its answer comes before its deadline (sent + timeout) and fails
//! at its deadline otherwise, or earlier when the backend refuses it (a reset, a port
//! unreachable). A late answer to an expired attempt does not count. So a backend that goes
//! silent is declared down `fall` attempts after it stopped answering: about
//! `fall × interval + timeout`, not `fall × (interval + timeout)` as with one attempt at a
//! time.
//!
//! Every check of a prober runs in this one loop on one timer. Sends are on a grid of the
//! interval on the monotonic clock, so the deadlines of attempts sent together fall
//! together, and a send that a stalled machine missed is skipped, not made up for in a
//! burst. Checks that send (all but link checks) and share an interval longer than the
//! prober's tick (the finest interval, at most [`STAGGER_TICK`](super::stagger::STAGGER_TICK)) are spread over the ticks
//! of their interval: a hundred services' echoes every 10 ms go out twenty per
//! millisecond, not two hundred at once, so no tick holds a long burst of sends and replies
//! ahead of another check's deadline; as few ticks are used as hold them
//! [`STAGGER_BATCH`](super::stagger::STAGGER_BATCH) to a tick, since each is a wake-up
//! ([`super::stagger`]). Answers that
//! need no wake-up of
//! their own (UDP, [`Attempt::Polled`]; ICMP, [`Attempt::Echoed`]) are read at each
//! wake-up, before the deadlines are judged: at 1 ms checks the prober wakes about
//! once per millisecond for all of them. UDP refusals wake it at once.
//!
//! A wake-up makes every decision due (answers read, deadlines judged, flips made) before
//! any send, and a long burst of sends looks at the deadlines again between two sends, so a
//! flip does not wait for other checks' requests; a passed deadline is also served before
//! awaited attempts (TCP, HTTP) that completed meanwhile. Within a wake-up the checks that
//! read their own answers (UDP, link, awaited) decide before the shared ICMP socket is
//! read, so a flip of theirs does not wait for the replies of every ICMP check.
//!
//! A timer wake-up is late by whatever the host runs first; on a loaded host, tens to
//! hundreds of microseconds. So a deadline whose miss would change a check's verdict (the
//! `fall`-th miss in a row, [`NextMiss::Decides`]) is not left to a wake-up: the prober
//! wakes [`DECISIVE_LEAD`] ahead of it and stays on the CPU until it, when the host has a
//! second CPU for everything else. That costs the lead once per decision, never while the
//! checks pass.

use std::{
    collections::VecDeque,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use futures::{
    future::BoxFuture,
    stream::{FuturesUnordered, StreamExt},
};

use super::{
    icmp,
    stagger::stagger,
    timer::{self, PreciseTimer},
    udp, Attempt, Probe,
};

/// How much longer than its deadline an expired awaited attempt may go on before it is
/// cancelled: the schedule fails it at its deadline with the precise timer; tokio's coarser
/// timer only ends its leftover work (a connect to a silent host would otherwise wait for
/// the kernel).
const CLEANUP_GRACE: Duration = Duration::from_millis(5);

/// How long before a decisive deadline (one whose miss changes a check's verdict, see
/// [`NextMiss`]) the prober wakes, to run the rest of the way on the CPU: the flip at that
/// deadline then does not wait for a timer wake-up, which a loaded host delays by tens to
/// hundreds of microseconds. Spent once per decision, never while the checks pass.
pub const DECISIVE_LEAD: Duration = Duration::from_micros(300);

/// When a check runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between two sends.
    pub interval: Duration,
    /// From a send to its deadline.
    pub timeout: Duration,
}

/// One decided attempt.
#[derive(Debug)]
pub struct Outcome {
    /// Passed, or why not.
    pub result: Result<()>,
    /// When it was sent.
    pub sent: Instant,
    /// When the prober decided it: its answer seen, or its deadline (a failure by deadline
    /// is dated at the deadline, the moment the evidence existed).
    pub decided: Instant,
    /// When the prober acted on it: the same as `decided` for an answer; for a deadline,
    /// when the prober ran after it (later by its wake-up delay).
    pub seen: Instant,
    /// Its round trip: from the send to the answer's arrival, or to the deadline.
    pub took: Duration,
}

/// What the next missed deadline of a check would do, as the receiver of its outcomes
/// answers each one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NextMiss {
    /// Nothing at once: the check passes, is down already, or needs more misses.
    #[default]
    Counts,
    /// It changes the check's verdict, and so the backend's health: the prober is running
    /// at that deadline (it wakes [`DECISIVE_LEAD`] ahead and spins the rest of the way).
    Decides,
}

/// What the schedule calls with every outcome of a check, in the order they are decided;
/// it answers what the check's next miss would do.
pub type Report = Box<dyn FnMut(Outcome) -> NextMiss + Send>;

/// One check to run: its probe, its timing, where its outcomes go.
pub struct Check {
    /// Makes the attempts.
    pub probe: Probe,
    /// When.
    pub timing: Timing,
    /// Where each outcome goes.
    pub report: Report,
}

/// Runs every check on its timing for ever. Returns only when the timer fails.
pub async fn run(checks: Vec<Check>) -> Result<()> {
    let mut timer = PreciseTimer::new()?;
    let refusals = udp::Refusals::new()?;
    let start = Instant::now();
    let placing: Vec<(Duration, bool)> = checks
        .iter()
        .map(|c| (c.timing.interval, !matches!(c.probe, Probe::Link { .. })))
        .collect();
    let mut schedules: Vec<Schedule> = checks
        .into_iter()
        .zip(stagger(&placing))
        .map(|(mut check, (phase, period))| {
            if let Probe::Udp(udp) = &mut check.probe {
                udp.report_refusals_to(&refusals);
            }
            let interval = check.timing.interval;
            Schedule {
                next_send: timer.next_on_grid(start, interval) + phase,
                period,
                check,
                pending: VecDeque::new(),
                sequence: 0,
                next_miss: NextMiss::Counts,
            }
        })
        .collect();
    // The ICMP socket the checks share (one per engine), read once per wake-up.
    let echo_socket: Option<Arc<icmp::Socket>> =
        schedules
            .iter()
            .find_map(|schedule| match &schedule.check.probe {
                Probe::Icmp(echo) => Some(echo.socket().clone()),
                _ => None,
            });
    // Spinning to a deadline needs a second CPU: on one, it would hold off the work (an
    // answer's receive path, a local backend) that decides the attempt.
    let may_spin = std::thread::available_parallelism().is_ok_and(|cpus| cpus.get() > 1);
    let mut in_flight = FuturesUnordered::new();
    loop {
        let Some(wake) = schedules.iter().map(|s| s.next_wake(may_spin)).min() else {
            return std::future::pending().await;
        };
        // A wake-up for a send goes on to the next sends: on a healthy pool every wake-up is
        // one, and the timer then needs no re-arming.
        let period = schedules
            .iter()
            .filter(|s| s.next_send == wake)
            .map(|s| s.period)
            .min();
        // The timer comes first: a deadline that has passed is evidence, and its decision
        // must not wait behind a burst of awaited attempts completing.
        tokio::select! {
            biased;
            woke = timer.sleep_until(wake, period) => {
                woke?;
                if let Some(until) = spin_target(&schedules, Instant::now()).filter(|_| may_spin) {
                    timer::spin_until(until);
                }
                decide(&mut schedules, echo_socket.as_deref(), Instant::now());
                send_due(&mut schedules, echo_socket.as_deref(), &mut in_flight);
            }
            refused = refusals.wait() => {
                refused?;
                let now = Instant::now();
                for schedule in &mut schedules {
                    schedule.read_answers(now);
                }
            }
            Some((index, number, result)) = in_flight.next(), if !in_flight.is_empty() => {
                Schedule::settle(&mut schedules[index], number, result, Instant::now());
            }
        }
    }
}

/// Until when the prober stays on the CPU after a wake-up at `now`: the nearest decisive
/// deadline, when it is at most [`DECISIVE_LEAD`] ahead (the wake-up made early for it), or
/// another check's deadline before it. The decision at that deadline is then made at once,
/// not after a wake-up; sends due meanwhile wait for it (decisions come before sends), at
/// most the lead.
fn spin_target(schedules: &[Schedule], now: Instant) -> Option<Instant> {
    let decisive = schedules
        .iter()
        .filter(|s| s.next_miss == NextMiss::Decides)
        .filter_map(Schedule::first_deadline)
        .min()?;
    if decisive <= now || decisive - now > DECISIVE_LEAD {
        return None;
    }
    Some(first_deadline(schedules).map_or(decisive, |d| d.min(decisive)))
}

/// Attempts driven to their end by the schedule's loop: (check, attempt number, result).
type InFlight = FuturesUnordered<BoxFuture<'static, (usize, u64, Result<()>)>>;

/// Reads every answer that has come, then fails every attempt whose deadline has passed:
/// all of the decisions due at `now`, and so every flip they make.
/// The checks that read their own answers go first: a flip of theirs does not wait for the
/// shared ICMP socket to be read.
fn decide(schedules: &mut [Schedule], echo_socket: Option<&icmp::Socket>, now: Instant) {
    for schedule in schedules.iter_mut().filter(|s| !s.echoes()) {
        schedule.read_answers(now);
        schedule.expire(now);
    }
    if let Some(socket) = echo_socket {
        socket.drain(now);
    }
    for schedule in schedules.iter_mut().filter(|s| s.echoes()) {
        schedule.read_answers(now);
        schedule.expire(now);
    }
}

/// Makes every send that is due. A burst (a hundred services on one interval) takes a while
/// on a loaded host, so between two sends the deadlines are looked at again: one that passes
/// meanwhile is decided, and its flip made, before the next send.
fn send_due(
    schedules: &mut [Schedule],
    echo_socket: Option<&icmp::Socket>,
    in_flight: &mut InFlight,
) {
    let mut next_deadline = first_deadline(schedules);
    for index in 0..schedules.len() {
        let now = Instant::now();
        if next_deadline.is_some_and(|deadline| deadline <= now) {
            decide(schedules, echo_socket, now);
            next_deadline = first_deadline(schedules);
        }
        let schedule = &mut schedules[index];
        if let Some((number, attempt)) = schedule.send_if_due(now) {
            let limit = schedule.check.timing.timeout + CLEANUP_GRACE;
            in_flight.push(Box::pin(bounded(index, number, attempt, limit)));
        }
        next_deadline = next_deadline
            .into_iter()
            .chain(schedules[index].first_deadline())
            .min();
    }
}

/// The earliest deadline of an attempt not decided yet.
fn first_deadline(schedules: &[Schedule]) -> Option<Instant> {
    schedules.iter().filter_map(Schedule::first_deadline).min()
}

/// One check's place in the schedule.
struct Schedule {
    check: Check,
    /// Attempts not decided yet, in send order (and so in deadline order).
    pending: VecDeque<Pending>,
    next_send: Instant,
    /// The period of the timer that fits its sends: the prober's tick when its sends are
    /// spread over the ticks, its interval otherwise.
    period: Duration,
    sequence: u64,
    /// What its next miss would do, as its last outcome's report answered.
    next_miss: NextMiss,
}

/// An attempt not decided yet (its deadline is `sent` + the timeout).
struct Pending {
    number: u64,
    sent: Instant,
    /// The request whose answer a wake-up reads, for a UDP attempt.
    polled: Option<udp::Sent>,
    /// The echo request whose reply a wake-up reads, for an ICMP attempt.
    echo: Option<icmp::Sent>,
}

impl Schedule {
    /// Whether its answers come on the shared ICMP socket.
    fn echoes(&self) -> bool {
        matches!(self.check.probe, Probe::Icmp(_))
    }

    /// The deadline of its oldest attempt not decided yet.
    fn first_deadline(&self) -> Option<Instant> {
        let timeout = self.check.timing.timeout;
        self.pending.front().map(|p| p.sent + timeout)
    }

    /// The earliest of the next send and the first deadline; with `early`, a decisive
    /// deadline counts [`DECISIVE_LEAD`] ahead of itself.
    fn next_wake(&self, early: bool) -> Instant {
        let lead = if early && self.next_miss == NextMiss::Decides {
            DECISIVE_LEAD
        } else {
            Duration::ZERO
        };
        self.first_deadline()
            .map(|deadline| deadline.checked_sub(lead).unwrap_or(deadline))
            .map_or(self.next_send, |deadline| deadline.min(self.next_send))
    }

    /// Awaited attempt `number` completed now.
    fn settle(&mut self, number: u64, result: Result<()>, now: Instant) {
        let at = self.pending.iter().position(|p| p.number == number);
        if let Some(Pending { sent, .. }) = at.and_then(|at| self.pending.remove(at)) {
            self.next_miss = (self.check.report)(Outcome {
                result,
                sent,
                decided: now,
                seen: now,
                took: now - sent,
            });
        }
    }

    /// Reads the answers of the polled attempts (UDP, ICMP) that have one; an answer
    /// stamped after its deadline does not count.
    fn read_answers(&mut self, now: Instant) {
        let Check {
            probe,
            timing,
            report,
        } = &mut self.check;
        let next_miss = &mut self.next_miss;
        if !matches!(probe, Probe::Udp(_) | Probe::Icmp(_)) {
            return;
        }
        self.pending.retain_mut(|pending| {
            let answer = match probe {
                Probe::Udp(udp) => udp.read(&mut pending.polled),
                Probe::Icmp(echo) => echo.read(&mut pending.echo).map(|arrived| udp::Answer {
                    result: Ok(()),
                    arrived,
                }),
                _ => None,
            };
            let Some(answer) = answer else {
                return true;
            };
            let arrived = answer.arrived.clamp(pending.sent, now);
            let took = arrived - pending.sent;
            let result = if took > timing.timeout {
                Err(anyhow!(
                    "no answer within {:?} (one came after {took:?})",
                    timing.timeout
                ))
            } else {
                answer.result
            };
            *next_miss = report(Outcome {
                result,
                sent: pending.sent,
                decided: now,
                seen: now,
                took,
            });
            false
        });
    }

    /// Fails the attempts whose deadline has passed.
    fn expire(&mut self, now: Instant) {
        let timeout = self.check.timing.timeout;
        while let Some(expired) = self.pending.front() {
            let deadline = expired.sent + timeout;
            if deadline > now {
                break;
            }
            self.next_miss = (self.check.report)(Outcome {
                result: Err(anyhow!("no answer within {timeout:?}")),
                sent: expired.sent,
                decided: deadline,
                seen: now,
                took: timeout,
            });
            self.pending.pop_front();
        }
    }

    /// Sends the next attempt if it is due; an awaited one is returned with its number for
    /// the caller to drive.
    fn send_if_due(&mut self, now: Instant) -> Option<(u64, BoxFuture<'static, Result<()>>)> {
        if self.next_send > now {
            return None;
        }
        let interval = self.check.timing.interval;
        self.next_send = skip_missed(self.next_send + interval, now, interval);
        let number = self.sequence;
        self.sequence += 1;
        let (polled, echo, awaited) = match self.check.probe.attempt() {
            Attempt::Decided(result) => {
                self.next_miss = (self.check.report)(Outcome {
                    result,
                    sent: now,
                    decided: now,
                    seen: now,
                    took: Duration::ZERO,
                });
                return None;
            }
            Attempt::Polled(sent) => (Some(sent), None, None),
            Attempt::Echoed(sent) => (None, Some(sent), None),
            Attempt::Awaited(future) => (None, None, Some((number, future))),
        };
        self.pending.push_back(Pending {
            number,
            sent: now,
            polled,
            echo,
        });
        awaited
    }
}

/// An attempt of check `index` numbered `number`, cancelled after `limit`.
async fn bounded(
    index: usize,
    number: u64,
    attempt: impl Future<Output = Result<()>>,
    limit: Duration,
) -> (usize, u64, Result<()>) {
    let result = tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {limit:?}")));
    (index, number, result)
}

/// The first send time on the grid from `next` that is still ahead of `now`.
fn skip_missed(next: Instant, now: Instant, interval: Duration) -> Instant {
    if next > now {
        return next;
    }
    let behind = (now - next).as_nanos() / interval.as_nanos().max(1) + 1;
    next + interval * u32::try_from(behind).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schedule of one link check (the probe never runs) with one attempt pending until
    /// `deadline`, whose miss `decides` or not.
    fn pending_until(deadline: Instant, decides: bool) -> Schedule {
        let timeout = Duration::from_millis(50);
        let interval = Duration::from_secs(3600);
        Schedule {
            check: Check {
                probe: Probe::Link {
                    carriers: Default::default(),
                    ifindex: 0,
                },
                timing: Timing { interval, timeout },
                report: Box::new(|_| NextMiss::Counts),
            },
            pending: VecDeque::from([Pending {
                number: 0,
                sent: deadline - timeout,
                polled: None,
                echo: None,
            }]),
            next_send: deadline + interval,
            period: interval,
            sequence: 1,
            next_miss: if decides {
                NextMiss::Decides
            } else {
                NextMiss::Counts
            },
        }
    }

    #[test]
    fn the_prober_is_on_the_cpu_at_a_deadline_that_decides() {
        let deadline = Instant::now() + Duration::from_millis(20);
        let decisive = pending_until(deadline, true);
        assert_eq!(decisive.next_wake(true), deadline - DECISIVE_LEAD);
        assert_eq!(decisive.next_wake(false), deadline);
        let counting = pending_until(deadline, false);
        assert_eq!(
            counting.next_wake(true),
            deadline,
            "no lead for a miss that counts"
        );
        let lead = DECISIVE_LEAD;
        let before = |ahead: Duration| deadline - ahead;
        // Farther than the lead, passed, or a miss that only counts: no spinning.
        assert_eq!(
            spin_target(&[pending_until(deadline, true)], before(2 * lead)),
            None
        );
        assert_eq!(
            spin_target(&[pending_until(deadline, true)], deadline),
            None
        );
        assert_eq!(spin_target(&[counting], before(lead / 2)), None);
        // Within the lead: up to the deadline.
        assert_eq!(spin_target(&[decisive], before(lead)), Some(deadline));
        // Another check's deadline before it ends the spin there, to be decided first.
        let other = pending_until(before(lead / 4), false);
        let schedules = [pending_until(deadline, true), other];
        assert_eq!(
            spin_target(&schedules, before(lead / 2)),
            Some(before(lead / 4))
        );
        // A spin returns at its instant, not before.
        let at = Instant::now() + lead;
        timer::spin_until(at);
        assert!(Instant::now() >= at);
    }

    #[test]
    fn missed_sends_are_skipped_on_the_grid() {
        let start = Instant::now();
        let ms = Duration::from_millis(1);
        assert_eq!(skip_missed(start + 2 * ms, start, ms), start + 2 * ms);
        // 3.5 intervals late: the next send is the first grid point after now.
        let next = skip_missed(start, start + ms * 7 / 2, ms);
        assert_eq!(next, start + 4 * ms);
        assert_eq!(skip_missed(start, start, ms), start + ms);
    }
}
