//! A timer with the kernel's precision for the probe schedule.
//!
//! tokio's timers count whole milliseconds: a 1 ms deadline fires 1 to 2 ms late, which at
//! 1 ms checks doubles the time to detect a silent backend. This one is a `timerfd` on
//! `CLOCK_MONOTONIC` (the clock of [`std::time::Instant`]) armed at an absolute time and
//! watched by tokio's reactor: the kernel arms a `timerfd` with no slack (its expiry is
//! never put off to coalesce it with others), and it costs one `read` per expiry, no
//! thread. Armed periodic on the probe grid, it needs no
//! `timerfd_settime` while the wake-ups stay on that grid, which at 1 ms checks is every
//! wake-up of a healthy pool. A wake-up is still late by whatever the host runs first (its
//! interrupts and receive work); before a deadline that would take the active backend down
//! a real-time prober wakes early and stays on the CPU for the rest ([`spin_until`]).

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::{
    time::TimeSpec,
    timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
};
use tokio::io::{unix::AsyncFd, Interest};

/// The timerfd, as tokio's reactor takes it.
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A timer that can be armed to any instant, once or from there on every period.
pub struct PreciseTimer {
    fd: AsyncFd<Fd>,
    /// The same instant on both clocks, to turn an [`Instant`] into a `CLOCK_MONOTONIC`
    /// time.
    origin: (Instant, TimeSpec),
    /// The next expiry the timer is armed for: waiting for it (again, after a wait that
    /// something else cut short, or as the next tick of a periodic arming) needs no new
    /// `timerfd_settime`.
    armed: Option<Armed>,
}

/// How the timerfd is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Armed {
    /// Its next expiry.
    next: Instant,
    /// Its period, when it repeats.
    period: Option<Duration>,
}

impl PreciseTimer {
    /// Makes the timer; must be called inside the tokio runtime that will wait on it.
    pub fn new() -> Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .context("cannot create a timerfd for the probe schedule")?;
        // SAFETY: `Fd` owns the timerfd, so the descriptor stays open and the same for as
        // long as the `AsyncFd` holding it.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("cannot watch the probe schedule's timerfd")?;
        let origin = (
            Instant::now(),
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .context("cannot read CLOCK_MONOTONIC")?,
        );
        Ok(PreciseTimer {
            fd,
            origin,
            armed: None,
        })
    }

    /// The first instant after `now` that is a whole multiple of `interval` on
    /// `CLOCK_MONOTONIC`: checks with the same interval send at the same instants, so their
    /// timers expire together and wake the prober once.
    pub fn next_on_grid(&self, now: Instant, interval: Duration) -> Instant {
        let (origin, origin_ts) = self.origin;
        let origin_ns = u128::from(origin_ts.tv_sec().unsigned_abs()) * 1_000_000_000
            + u128::from(origin_ts.tv_nsec().unsigned_abs());
        let now_ns = origin_ns + now.saturating_duration_since(origin).as_nanos();
        let step = interval.as_nanos().max(1);
        let ahead = step - now_ns % step;
        now + Duration::from_nanos(u64::try_from(ahead).unwrap_or(u64::MAX))
    }

    /// Waits until `deadline` (at once if it has passed). With a `period`, the timer goes
    /// on firing every `period` after it, so that waiting for those instants later costs no
    /// re-arming.
    pub async fn sleep_until(&mut self, deadline: Instant, period: Option<Duration>) -> Result<()> {
        if self.armed.map(|a| a.next) != Some(deadline) {
            let (origin, origin_ts) = self.origin;
            let offset = deadline.saturating_duration_since(origin);
            // A deadline before the origin cannot be expressed; it has passed anyway.
            let at = origin_ts + TimeSpec::from(offset.max(Duration::from_nanos(1)));
            let period = period.filter(|p| !p.is_zero());
            let expiration = match period {
                Some(p) => Expiration::IntervalDelayed(at, TimeSpec::from(p)),
                None => Expiration::OneShot(at),
            };
            self.fd
                .get_ref()
                .0
                .set(expiration, TimerSetTimeFlags::TFD_TIMER_ABSTIME)
                .context("cannot arm the probe schedule's timerfd")?;
            self.armed = Some(Armed {
                next: deadline,
                period,
            });
        }
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .context("cannot wait on the probe schedule's timerfd")?;
            let mut expirations = [0u8; 8];
            let read = nix::unistd::read(&self.fd.get_ref().0, &mut expirations);
            // Read or not, nothing is left to read: the next wait goes straight to the
            // reactor instead of trying a read that would fail.
            guard.clear_ready();
            match read {
                Ok(_) => {
                    // The read returns how many expiries passed since the last one read.
                    let fired = u32::try_from(u64::from_ne_bytes(expirations)).unwrap_or(u32::MAX);
                    self.armed = self.armed.and_then(|armed| {
                        let period = armed.period?;
                        Some(Armed {
                            next: armed.next.checked_add(period.checked_mul(fired)?)?,
                            period: Some(period),
                        })
                    });
                    return Ok(());
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e).context("cannot read the probe schedule's timerfd"),
            }
        }
    }
}

/// Stays on the CPU until `deadline` (returns at once if it has passed): the last stretch
/// before an instant that must not be missed, which a wake-up — late by whatever the host
/// runs first — could miss. Costs the CPU for as long as it waits, so it is kept to a few
/// hundred microseconds, and only before a deadline that decides something.
pub fn spin_until(deadline: Instant) {
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// Whether the calling thread may wait on the CPU ([`spin_until`]): it runs under a
/// real-time policy, so no ordinary process preempts it while it spins (an ordinary thread
/// that spins uses up its share, and the scheduler may then put it aside for a whole slice
/// right at the instant it waits for), and it may run on more than one CPU, so that its
/// spin leaves another CPU to everything else. Asked of the kernel each time: the thread's
/// policy and CPUs can be changed under it (`chrt`, `taskset`, a cpuset).
pub fn may_spin() -> bool {
    use nix::sched::{sched_getaffinity, CpuSet};
    // SAFETY: sched_getscheduler(2) of the calling thread (pid 0) only reads its policy.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy != libc::SCHED_FIFO && policy != libc::SCHED_RR {
        return false;
    }
    sched_getaffinity(nix::unistd::Pid::from_raw(0)).is_ok_and(|set| {
        (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .nth(1)
            .is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }

    #[test]
    fn a_periodic_arming_fires_on_its_grid_and_counts_missed_expiries() {
        runtime().block_on(async {
            let mut timer = PreciseTimer::new().expect("a timerfd");
            let ms = Duration::from_millis(1);
            let first = Instant::now() + 2 * ms;
            timer.sleep_until(first, Some(ms)).await.expect("first");
            assert!(Instant::now() >= first);
            let armed = timer.armed.expect("still armed");
            assert_eq!(armed.next, first + ms, "the next tick of the period");
            timer
                .sleep_until(first + ms, Some(ms))
                .await
                .expect("second");
            assert!(Instant::now() >= first + ms);
            // Four periods go by unread: the next wait returns at once and the expiry after
            // it is the one on the grid after those four.
            std::thread::sleep(4 * ms + ms / 2);
            timer
                .sleep_until(first + 2 * ms, Some(ms))
                .await
                .expect("third");
            let next = timer.armed.expect("still armed").next;
            assert!(next > Instant::now() && next <= first + 7 * ms, "{next:?}");
            assert_eq!((next - first).as_nanos() % ms.as_nanos(), 0, "on the grid");
        });
    }

    #[test]
    fn a_one_shot_arming_is_forgotten_once_it_fired() {
        runtime().block_on(async {
            let mut timer = PreciseTimer::new().expect("a timerfd");
            let at = Instant::now() + Duration::from_millis(1);
            timer.sleep_until(at, None).await.expect("one shot");
            assert!(Instant::now() >= at);
            assert!(timer.armed.is_none());
        });
    }
}
