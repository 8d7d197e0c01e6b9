//! Which backend should serve: pure decisions, no I/O, so every rule is unit-tested.
//!
//! - A check turns a backend down after `fall` consecutive failures and up again after
//!   `rise` consecutive successes ([`CheckCounter`]); a carrier loss turns it down at once.
//! - A backend is up when every one of its checks is up.
//! - The service's active backend is the highest-priority backend that is up
//!   ([`choose`]), except that with `preempt = false` a healthy active backend is kept, and
//!   with a `failback_delay` a recovered higher-priority backend must stay up that long
//!   before traffic moves back to it.
//! - With every backend down, [`AllDown`] says whether to keep the last one or drop.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Rise/fall hysteresis of one health check of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckCounter {
    /// Current verdict.
    pub up: bool,
    successes: u32,
    failures: u32,
}

impl CheckCounter {
    /// A check that starts up: a backend is presumed alive until its checks say otherwise,
    /// so traffic flows from the first packet.
    pub const fn starting_up() -> Self {
        Self::starting(true)
    }

    /// A check that starts with verdict `up` (down: it needs `rise` passing probes).
    pub const fn starting(up: bool) -> Self {
        CheckCounter {
            up,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    /// Whether the check is up on evidence: its last `rise` probes passed (not only
    /// presumed up at start).
    pub fn confirmed(&self, rise: u32) -> bool {
        self.up && self.successes >= rise.max(1)
    }

    /// Whether the next failure changes the verdict of a check that is already failing:
    /// its next deadline decides, and the prober is awake for it. With `fall` = 1 a check
    /// has not failed yet when its next failure decides, so no deadline is singled out
    /// while it passes.
    pub fn next_failure_decides(&self, fall: u32) -> bool {
        self.up && self.failures > 0 && self.failures.saturating_add(1) >= fall.max(1)
    }

    /// Sets the verdict at once (carrier events); returns it when it changed.
    pub fn set(&mut self, up: bool) -> Option<bool> {
        self.successes = 0;
        self.failures = 0;
        (self.up != up).then(|| {
            self.up = up;
            up
        })
    }
}

/// What to do when every backend of a service is down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Keep sending to the last active backend (a false alarm of the checks then costs
    /// nothing; a real outage loses what it would lose anyway).
    #[default]
    KeepLast,
    /// Drop the service's packets in XDP until a backend is up again.
    Drop,
}

/// What happens to a service's flows when its active backend changes while the previous
/// one is still healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failback {
    /// TCP connections finish on the backend they started on (until FIN/RST, their idle
    /// timeout, or the service's `drain_limit`); new connections go to the new backend.
    #[default]
    Graceful,
    /// Every flow follows the new active backend at its next packet.
    Immediate,
}

/// A service's failover policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Move back to a higher-priority backend once it is up again.
    pub preempt: bool,
    /// How long a recovered higher-priority backend must stay up before traffic moves back.
    pub failback_delay: Duration,
    /// Every backend down.
    pub all_down: AllDown,
    /// What happens to the flows of a healthy backend that is no longer active.
    pub failback: Failback,
    /// With graceful failback, how long such flows may stay (`None`: until they end).
    pub drain_limit: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            preempt: true,
            failback_delay: Duration::ZERO,
            all_down: AllDown::KeepLast,
            failback: Failback::Graceful,
            drain_limit: None,
        }
    }
}

/// One backend as [`choose`] sees it. Backends are given highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Whether the backend may serve new flows: every check is up and it is not drained.
    pub up: bool,
    /// Since when it has been up (for `failback_delay`).
    pub up_since: Option<Instant>,
}

/// The outcome of [`choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Position of the backend that should be active; `None`: drop the traffic.
    pub active: Option<usize>,
    /// When to decide again (a failback waiting for its delay).
    pub recheck_at: Option<Instant>,
}

/// Chooses the active backend among `candidates` (highest priority first), given the one
/// active now.
pub fn choose(
    candidates: &[Candidate],
    current: Option<usize>,
    policy: &Policy,
    now: Instant,
) -> Choice {
    let best = candidates.iter().position(|c| c.up);
    let current_up = current.is_some_and(|i| candidates.get(i).is_some_and(|c| c.up));
    let stay = Choice {
        active: current,
        recheck_at: None,
    };
    let Some(best) = best else {
        return match policy.all_down {
            AllDown::KeepLast => stay,
            AllDown::Drop => Choice {
                active: None,
                recheck_at: None,
            },
        };
    };
    if !current_up {
        // The active backend is down (or none is active): take the best one now.
        return Choice {
            active: Some(best),
            recheck_at: None,
        };
    }
    let current = current.expect("current_up implies current");
    if best >= current || !policy.preempt {
        return stay;
    }
    // A higher-priority backend is up again: fail back once it has been up long enough.
    let since = candidates[best].up_since.unwrap_or(now);
    let due = since + policy.failback_delay;
    if due <= now {
        Choice {
            active: Some(best),
            recheck_at: None,
        }
    } else {
        Choice {
            active: Some(current),
            recheck_at: Some(due),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::default()
    }

    fn up(at: Instant) -> Candidate {
        Candidate {
            up: true,
            up_since: Some(at),
        }
    }

    const DOWN: Candidate = Candidate {
        up: false,
        up_since: None,
    };

    #[test]
    fn fall_consecutive_failures_turn_a_check_down() {
        let mut c = CheckCounter::starting_up();
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(
            c.record(true, 2, 3),
            None,
            "a success resets the failure count"
        );
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), Some(false));
        assert_eq!(c.record(false, 2, 3), None, "already down");
    }

    #[test]
    fn only_the_miss_that_would_turn_a_failing_check_down_decides() {
        let mut c = CheckCounter::starting_up();
        assert!(!c.next_failure_decides(3), "passing");
        c.record(false, 2, 3);
        assert!(!c.next_failure_decides(3), "one miss of three");
        c.record(false, 2, 3);
        assert!(c.next_failure_decides(3), "two misses of three");
        c.record(true, 2, 3);
        assert!(!c.next_failure_decides(3), "a pass starts again");
        c.record(false, 2, 3);
        c.record(false, 2, 3);
        c.record(false, 2, 3);
        assert!(!c.next_failure_decides(3), "down already");
        let mut c = CheckCounter::starting_up();
        c.record(false, 2, 2);
        assert!(c.next_failure_decides(2), "one miss of two");
        let passing = CheckCounter::starting_up();
        assert!(
            !passing.next_failure_decides(1),
            "with fall 1 no deadline of a passing check is singled out"
        );
    }

    #[test]
    fn rise_consecutive_successes_turn_it_up_again() {
        let mut c = CheckCounter::starting_up();
        c.set(false);
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(
            c.record(false, 2, 3),
            None,
            "a failure resets the success count"
        );
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(true));
    }

    #[test]
    fn a_flapping_check_never_changes_state_faster_than_rise_and_fall_allow() {
        let mut c = CheckCounter::starting_up();
        let mut changes = 0;
        for i in 0..1000 {
            if c.record(i % 2 == 0, 3, 3).is_some() {
                changes += 1;
            }
        }
        assert_eq!(changes, 0, "alternating results never reach rise or fall");
    }

    #[test]
    fn carrier_events_act_at_once() {
        let mut c = CheckCounter::starting_up();
        assert_eq!(c.set(false), Some(false));
        assert_eq!(c.set(false), None);
        assert_eq!(c.set(true), Some(true));
    }

    #[test]
    fn the_highest_priority_live_backend_is_chosen() {
        let now = Instant::now();
        let choice = choose(&[DOWN, up(now), up(now)], Some(0), &policy(), now);
        assert_eq!(choice.active, Some(1));
    }

    #[test]
    fn preempt_fails_back_to_the_master() {
        let now = Instant::now();
        let choice = choose(&[up(now), up(now)], Some(1), &policy(), now);
        assert_eq!(choice.active, Some(0));
    }

    #[test]
    fn without_preempt_a_healthy_slave_keeps_the_traffic() {
        let now = Instant::now();
        let p = Policy {
            preempt: false,
            ..policy()
        };
        assert_eq!(
            choose(&[up(now), up(now)], Some(1), &p, now).active,
            Some(1)
        );
        // … until it fails.
        assert_eq!(choose(&[up(now), DOWN], Some(1), &p, now).active, Some(0));
    }

    #[test]
    fn failback_waits_for_the_delay() {
        let now = Instant::now();
        let p = Policy {
            failback_delay: Duration::from_secs(5),
            ..policy()
        };
        let choice = choose(&[up(now), up(now)], Some(1), &p, now);
        assert_eq!(
            choice,
            Choice {
                active: Some(1),
                recheck_at: Some(now + Duration::from_secs(5))
            }
        );
        let later = now + Duration::from_secs(5);
        assert_eq!(
            choose(&[up(now), up(now)], Some(1), &p, later).active,
            Some(0)
        );
    }

    #[test]
    fn failover_ignores_the_failback_delay() {
        let now = Instant::now();
        let p = Policy {
            failback_delay: Duration::from_secs(5),
            ..policy()
        };
        assert_eq!(choose(&[DOWN, up(now)], Some(0), &p, now).active, Some(1));
    }

    #[test]
    fn every_backend_down_keeps_the_last_or_drops() {
        let now = Instant::now();
        assert_eq!(
            choose(&[DOWN, DOWN], Some(1), &policy(), now).active,
            Some(1)
        );
        let p = Policy {
            all_down: AllDown::Drop,
            ..policy()
        };
        assert_eq!(choose(&[DOWN, DOWN], Some(1), &p, now).active, None);
        // Back from "drop" as soon as one is up.
        assert_eq!(choose(&[DOWN, up(now)], None, &p, now).active, Some(1));
    }

    #[test]
    fn more_than_two_backends_fail_over_in_priority_order() {
        let now = Instant::now();
        assert_eq!(
            choose(&[DOWN, DOWN, up(now)], Some(0), &policy(), now).active,
            Some(2)
        );
        assert_eq!(
            choose(&[DOWN, up(now), up(now)], Some(2), &policy(), now).active,
            Some(1)
        );
    }
}
