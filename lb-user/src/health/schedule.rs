//! One check's place in the prober's schedule: its attempts not decided yet, in send order,
//! and its next send on the grid. [`Schedule::read_answers`] and [`Schedule::expire`] decide
//! attempts, [`Schedule::send_if_due`] makes them; every outcome goes to the check's report,
//! whose answer (what the next miss would do) the schedule keeps for the prober's timing.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use futures::future::BoxFuture;

use super::{
    icmp,
    pipeline::{Check, NextMiss, Outcome, DECISIVE_LEAD},
    udp, Attempt, Probe,
};

/// One check's place in the schedule.
pub(super) struct Schedule {
    pub(super) check: Check,
    /// Attempts not decided yet, in send order (and so in deadline order).
    pending: VecDeque<Pending>,
    pub(super) next_send: Instant,
    /// The period of the timer that fits its sends: the prober's tick when its sends are
    /// spread over the ticks, its interval otherwise.
    pub(super) period: Duration,
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
    /// `check`, its first send at `next_send`, its timer period `period`.
    pub(super) fn new(check: Check, next_send: Instant, period: Duration) -> Self {
        Schedule {
            check,
            pending: VecDeque::new(),
            next_send,
            period,
            sequence: 0,
            next_miss: NextMiss::Counts,
        }
    }

    /// Whether its answers come on the shared ICMP socket.
    pub(super) fn echoes(&self) -> bool {
        matches!(self.check.probe, Probe::Icmp(_))
    }

    /// Whether its attempts complete as futures on the prober's runtime (TCP, HTTP): their
    /// completion is seen only while the runtime runs, never during a spin.
    fn awaits(&self) -> bool {
        matches!(self.check.probe, Probe::Tcp(_) | Probe::Http { .. })
    }

    /// The deadline of its oldest attempt not decided yet.
    pub(super) fn first_deadline(&self) -> Option<Instant> {
        let timeout = self.check.timing.timeout;
        self.pending.front().map(|p| p.sent + timeout)
    }

    /// Its first deadline, when a miss there would change its verdict and the prober may
    /// wait for it on the CPU, with how long ahead to wake for it: [`DECISIVE_LEAD`], at
    /// most half the timeout. An awaited attempt's deadline is never one (its completion
    /// needs the runtime to run).
    pub(super) fn decisive_deadline(&self) -> Option<(Instant, Duration)> {
        if self.next_miss != NextMiss::Decides || self.awaits() {
            return None;
        }
        let lead = DECISIVE_LEAD.min(self.check.timing.timeout / 2);
        self.first_deadline().map(|deadline| (deadline, lead))
    }

    /// Whether an awaited attempt of it has its deadline at or before `instant`.
    pub(super) fn awaits_until(&self, instant: Instant) -> bool {
        self.awaits() && self.first_deadline().is_some_and(|d| d <= instant)
    }

    /// The earliest of the next send and the first deadline.
    pub(super) fn next_wake(&self) -> Instant {
        self.first_deadline()
            .map_or(self.next_send, |deadline| deadline.min(self.next_send))
    }

    /// Awaited attempt `number` completed now.
    pub(super) fn settle(&mut self, number: u64, result: Result<()>, now: Instant) {
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
    /// stamped after its deadline does not count (it fails the attempt, dated at its
    /// deadline).
    pub(super) fn read_answers(&mut self, now: Instant) {
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
            let (result, decided) = if took > timing.timeout {
                let late = anyhow!(
                    "no answer within {:?} (one came after {took:?})",
                    timing.timeout
                );
                (Err(late), pending.sent + timing.timeout)
            } else {
                (answer.result, now)
            };
            *next_miss = report(Outcome {
                result,
                sent: pending.sent,
                decided,
                seen: now,
                took,
            });
            false
        });
    }

    /// Fails the attempts whose deadline has passed.
    pub(super) fn expire(&mut self, now: Instant) {
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
    pub(super) fn send_if_due(
        &mut self,
        now: Instant,
    ) -> Option<(u64, BoxFuture<'static, Result<()>>)> {
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

/// The first send time on the grid from `next` that is still ahead of `now`.
fn skip_missed(next: Instant, now: Instant, interval: Duration) -> Instant {
    if next > now {
        return next;
    }
    let behind = (now - next).as_nanos() / interval.as_nanos().max(1) + 1;
    next + interval * u32::try_from(behind).unwrap_or(u32::MAX)
}

#[cfg(test)]
impl Schedule {
    /// A schedule of a link check (its probe never runs) with attempts pending until
    /// `deadlines`, each with `timeout`, its next miss `next_miss`, and a report that
    /// answers `next_miss` for every outcome.
    pub(super) fn pending_until(
        deadlines: &[Instant],
        timeout: Duration,
        next_miss: NextMiss,
    ) -> Self {
        let probe = Probe::Link {
            carriers: Default::default(),
            ifindex: 0,
        };
        Self::with_pending(probe, deadlines, timeout, next_miss)
    }

    /// A TCP check, its next miss deciding, with one attempt pending until `deadline`.
    pub(super) fn awaiting_until(deadline: Instant, timeout: Duration) -> Self {
        let probe = Probe::Tcp(std::net::SocketAddr::from(([198, 18, 0, 1], 80)));
        Self::with_pending(probe, &[deadline], timeout, NextMiss::Decides)
    }

    fn with_pending(
        probe: Probe,
        deadlines: &[Instant],
        timeout: Duration,
        next_miss: NextMiss,
    ) -> Self {
        let interval = Duration::from_secs(3600);
        let last = deadlines.iter().max().copied().unwrap_or_else(Instant::now);
        let mut schedule = Schedule::new(
            Check {
                probe,
                timing: super::pipeline::Timing { interval, timeout },
                report: Box::new(move |_| next_miss),
            },
            last + interval,
            interval,
        );
        schedule.next_miss = next_miss;
        schedule.pending = deadlines
            .iter()
            .enumerate()
            .map(|(number, &deadline)| Pending {
                number: number as u64,
                sent: deadline - timeout,
                polled: None,
                echo: None,
            })
            .collect();
        schedule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reports_answer_to_each_outcome_decides_the_next_deadline() {
        let ms = Duration::from_millis(1);
        let first = Instant::now() + 40 * ms;
        let second = first + ms;
        let timeout = 20 * ms;
        // The report will answer that the next miss decides; nothing has been reported yet.
        let mut schedule = Schedule::pending_until(&[first, second], timeout, NextMiss::Counts);
        schedule.check.report = Box::new(|_| NextMiss::Decides);
        assert_eq!(schedule.decisive_deadline(), None);
        schedule.expire(first - ms);
        assert_eq!(schedule.decisive_deadline(), None, "nothing expired yet");
        schedule.expire(first);
        assert_eq!(schedule.decisive_deadline(), Some((second, DECISIVE_LEAD)));
        // A short timeout shortens the lead to half of it.
        let short = Duration::from_micros(400);
        let schedule = Schedule::pending_until(&[first], short, NextMiss::Decides);
        assert_eq!(schedule.decisive_deadline(), Some((first, short / 2)));
        // An awaited attempt's deadline is never waited for on the CPU.
        let awaited = Schedule::awaiting_until(first, timeout);
        assert_eq!(awaited.decisive_deadline(), None);
        assert!(awaited.awaits_until(first) && !awaited.awaits_until(first - ms));
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
