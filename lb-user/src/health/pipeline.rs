//! The schedule of one check: an attempt every interval, whether or not the earlier ones
//! have answered, each with its own deadline.
//!
//! An attempt passes when its answer comes before its deadline (sent + timeout) and fails
//! at its deadline otherwise, or earlier when the backend refuses it (a reset, a port
//! unreachable). A late answer to an expired attempt does not count. So a backend that goes
//! silent is declared down `fall` attempts after it stopped answering: about
//! `fall × interval + timeout`, not `fall × (interval + timeout)` as with one attempt at a
//! time. Sends are on a grid of the interval on the monotonic clock, shared by every check
//! with that interval, so the checks of one agent wake it together; a send that a stalled
//! machine missed is skipped, not made up for in a burst.

use std::{
    collections::VecDeque,
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use futures::stream::{FuturesUnordered, StreamExt};

use super::{timer::PreciseTimer, Probe};

/// How much longer than its deadline an expired attempt may go on before it is cancelled:
/// the schedule fails it at its deadline with the precise timer; tokio's coarser timer only
/// ends its leftover work (a connect to a silent host would otherwise wait for the kernel).
const CLEANUP_GRACE: Duration = Duration::from_millis(5);

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
    /// When it was decided: its answer seen, or its deadline (a failure by deadline is
    /// dated at the deadline, the moment the evidence existed).
    pub decided: Instant,
}

/// An attempt not decided yet (its deadline is `sent` + the timeout).
struct Pending {
    number: u64,
    sent: Instant,
}

/// Runs `probe` on `timing` for ever, calling `report` with every attempt's outcome, in
/// the order they are decided. Returns only when the timer fails.
pub async fn run(probe: Probe, timing: Timing, mut report: impl FnMut(Outcome)) -> Result<()> {
    let mut timer = PreciseTimer::new()?;
    let mut in_flight = FuturesUnordered::new();
    // Attempts not yet decided, in send order (and so in deadline order).
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next_send = timer.next_on_grid(Instant::now(), timing.interval);
    let mut sequence: u64 = 0;
    loop {
        let wake = pending
            .front()
            .map_or(next_send, |p| (p.sent + timing.timeout).min(next_send));
        tokio::select! {
            biased;
            Some((number, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let at = pending.iter().position(|p| p.number == number);
                if let Some(Pending { sent, .. }) = at.and_then(|at| pending.remove(at)) {
                    report(Outcome { result, sent, decided: Instant::now() });
                }
            }
            woke = timer.sleep_until(wake) => {
                woke?;
                let now = Instant::now();
                while let Some(expired) = pending.front() {
                    let deadline = expired.sent + timing.timeout;
                    if deadline > now {
                        break;
                    }
                    report(Outcome {
                        result: Err(anyhow!("no answer within {:?}", timing.timeout)),
                        sent: expired.sent,
                        decided: deadline,
                    });
                    pending.pop_front();
                }
                if next_send <= now {
                    let limit = timing.timeout + CLEANUP_GRACE;
                    in_flight.push(bounded(sequence, probe.attempt(), limit));
                    pending.push_back(Pending { number: sequence, sent: now });
                    sequence += 1;
                    next_send = skip_missed(next_send + timing.interval, now, timing.interval);
                }
            }
        }
    }
}

/// An attempt numbered `number`, cancelled after `limit`.
async fn bounded(
    number: u64,
    attempt: impl Future<Output = Result<()>>,
    limit: Duration,
) -> (u64, Result<()>) {
    let result = tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {limit:?}")));
    (number, result)
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
