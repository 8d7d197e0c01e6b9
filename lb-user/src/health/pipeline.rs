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
//! prober's tick (the finest interval, at most [`STAGGER_TICK`]) are spread over the ticks
//! of their interval: a hundred services' echoes every 10 ms go out twenty per
//! millisecond, not two hundred at once, so no tick holds a long burst of sends and replies
//! ahead of another check's deadline; as few ticks are used as hold them
//! [`STAGGER_BATCH`] to a tick, since each is a wake-up ([`super::stagger`]). Answers that
//! need no wake-up of their own (UDP, [`Attempt::Polled`]; ICMP, [`Attempt::Echoed`]) are
//! read at each wake-up, before the deadlines are judged: at 1 ms checks the prober wakes
//! about once per millisecond for all of them. UDP refusals wake it at once.
//!
//! A wake-up makes every decision due (answers read, deadlines judged, flips made) before
//! any send, and a long burst of sends looks at the deadlines again between two sends, so a
//! flip does not wait for other checks' requests; a passed deadline is also served before
//! awaited attempts (TCP, HTTP) that completed meanwhile. Within a wake-up the checks that
//! read their own answers (UDP, link, awaited) decide before the shared ICMP socket is
//! read, so a flip of theirs does not wait for the replies of every ICMP check.
//!
//! A timer wake-up is late by whatever the host runs first; on a loaded host, tens to
//! hundreds of microseconds. So a deadline whose miss would take the active backend down
//! (the `fall`-th miss in a row, [`NextMiss::Decides`]; with `fall` > 1) is not left to a
//! wake-up when the prober thread is real-time and may run on a second CPU for everything
//! else ([`timer::may_spin`]): the prober wakes [`DECISIVE_LEAD`] ahead of it, reads the
//! answers that came, and stays on the CPU until the deadline. That costs the lead once
//! per such deadline, never while the checks pass. Awaited attempts (TCP, HTTP) complete only while the runtime runs, so no spin
//! reaches past one's deadline.
//!
//! [`STAGGER_TICK`]: super::stagger::STAGGER_TICK
//! [`STAGGER_BATCH`]: super::stagger::STAGGER_BATCH
//! [`Attempt::Polled`]: super::Attempt::Polled
//! [`Attempt::Echoed`]: super::Attempt::Echoed

use std::{
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
    schedule::Schedule,
    stagger::stagger,
    timer::{self, PreciseTimer},
    udp, Probe,
};

/// How much longer than its deadline an expired awaited attempt may go on before it is
/// cancelled: the schedule fails it at its deadline with the precise timer; tokio's coarser
/// timer only ends its leftover work (a connect to a silent host would otherwise wait for
/// the kernel).
const CLEANUP_GRACE: Duration = Duration::from_millis(5);

/// How long before a decisive deadline (one whose miss would take the active backend down,
/// see [`NextMiss`]) a real-time prober wakes, to run the rest of the way on the CPU: the flip at
/// that deadline then does not wait for a timer wake-up, which a loaded host delays by tens
/// to hundreds of microseconds. At most half the check's timeout. Spent once per decisive
/// deadline (also one that the answer then meets), never while the checks pass.
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
    /// Nothing at once: the check passes (with `fall` = 1 every miss would decide, so none
    /// is singled out), is down already, needs more misses, or its backend is not the
    /// active one.
    #[default]
    Counts,
    /// It takes the active backend down, after `fall` − 1 misses in a row: a real-time
    /// prober is running at that deadline (it wakes [`DECISIVE_LEAD`] ahead and spins the
    /// rest of the way), unless the attempt is awaited (TCP, HTTP), whose completion needs
    /// the prober's runtime to run.
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
            Schedule::new(check, timer.next_on_grid(start, interval) + phase, period)
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
    let mut in_flight = FuturesUnordered::new();
    loop {
        // A decisive deadline is woken for early only where the prober may spin: under a
        // real-time policy, with a second CPU to run everything else (the answer's receive
        // path, a local backend).
        let early = decisive(&schedules)
            .filter(|_| timer::may_spin())
            .map(|(deadline, lead)| deadline.checked_sub(lead).unwrap_or(deadline));
        let Some(wake) = schedules.iter().map(Schedule::next_wake).chain(early).min() else {
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
                decide(&mut schedules, echo_socket.as_deref(), Instant::now());
                // Only a wake-up that may have been early looks for a spin: a healthy pool's
                // wake-ups scan nothing more.
                let spin = early.and_then(|_| spin_target(&schedules, Instant::now()));
                if let Some(until) = spin {
                    timer::spin_until(until);
                    decide(&mut schedules, echo_socket.as_deref(), Instant::now());
                }
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

/// The nearest deadline whose miss would change a check's verdict, with how long ahead of
/// it the prober wakes ([`Schedule::decisive_deadline`]); none when an awaited attempt's
/// deadline comes at or before it, as its completion needs the runtime to run, not spin.
fn decisive(schedules: &[Schedule]) -> Option<(Instant, Duration)> {
    let (deadline, lead) = schedules
        .iter()
        .filter_map(Schedule::decisive_deadline)
        .min_by_key(|(deadline, _)| *deadline)?;
    let awaited = schedules.iter().any(|s| s.awaits_until(deadline));
    (!awaited).then_some((deadline, lead))
}

/// Until when the prober stays on the CPU after a wake-up at `now`, its answers read: the
/// nearest decisive deadline, when it is at most its lead ahead (the wake-up made early for
/// it), or another check's deadline before it. The decision at that deadline is then made
/// at once, not after a wake-up; sends due meanwhile wait for it (decisions come before
/// sends), at most the lead.
fn spin_target(schedules: &[Schedule], now: Instant) -> Option<Instant> {
    let (deadline, lead) = decisive(schedules)?;
    if deadline <= now || deadline - now > lead {
        return None;
    }
    Some(first_deadline(schedules).map_or(deadline, |d| d.min(deadline)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prober_is_on_the_cpu_at_a_deadline_that_decides() {
        let deadline = Instant::now() + Duration::from_millis(20);
        let timeout = Duration::from_millis(50);
        let decides = |deadline| Schedule::pending_until(&[deadline], timeout, NextMiss::Decides);
        let counts = |deadline| Schedule::pending_until(&[deadline], timeout, NextMiss::Counts);
        let lead = DECISIVE_LEAD;
        let before = |ahead: Duration| deadline - ahead;
        assert_eq!(decisive(&[counts(deadline)]), None);
        assert_eq!(decisive(&[decides(deadline)]), Some((deadline, lead)));
        // Farther than the lead, passed, or a miss that only counts: no spinning.
        assert_eq!(spin_target(&[decides(deadline)], before(2 * lead)), None);
        assert_eq!(spin_target(&[decides(deadline)], deadline), None);
        assert_eq!(spin_target(&[counts(deadline)], before(lead / 2)), None);
        // Within the lead: up to the deadline.
        assert_eq!(
            spin_target(&[decides(deadline)], before(lead)),
            Some(deadline)
        );
        // Another check's deadline before it ends the spin there, to be decided first.
        let schedules = [decides(deadline), counts(before(lead / 4))];
        assert_eq!(
            spin_target(&schedules, before(lead / 2)),
            Some(before(lead / 4))
        );
        // An awaited attempt due before it or with it: no spin (its completion needs the
        // runtime), and no early wake-up either.
        let awaited = Schedule::awaiting_until(deadline, timeout);
        assert_eq!(decisive(&[decides(deadline), awaited]), None);
        let awaited_later = Schedule::awaiting_until(deadline + lead, timeout);
        assert_eq!(
            decisive(&[decides(deadline), awaited_later]),
            Some((deadline, lead))
        );
        // A spin returns at its instant, not before.
        let at = Instant::now() + lead;
        timer::spin_until(at);
        assert!(Instant::now() >= at);
    }
}
