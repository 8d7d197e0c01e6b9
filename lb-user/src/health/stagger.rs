//! Where each check's sends fall on the prober's ticks. Checks that send and share an
//! interval longer than the prober's tick are spread over the ticks of their interval, so
//! that no tick holds a long burst of sends and replies ahead of another check's deadline;
//! but every tick used is a wake-up of its own, so as few ticks are used as hold them
//! [`STAGGER_BATCH`] to a tick.

use std::{collections::HashMap, time::Duration};

/// The coarsest tick the sends of checks sharing an interval are spread over. A finer
/// interval in the prober makes the tick finer.
pub const STAGGER_TICK: Duration = Duration::from_millis(1);

/// How many checks of one interval may send on the same tick. Spreading stops there: every
/// tick used is a wake-up of its own each interval, and a wake-up costs more than a few
/// sends in one.
pub const STAGGER_BATCH: usize = 20;

/// Where each check's sends fall on the prober's ticks: for every check (in order), given
/// as its interval and whether its attempts send anything (a link check only reads the
/// carrier table), its offset from the interval's grid and the timer period that fits its
/// sends. The prober's tick is the finest interval of the checks that send, at most
/// [`STAGGER_TICK`]; the sending checks of one interval take the interval's ticks in turn,
/// as few ticks as hold them [`STAGGER_BATCH`] to a tick, at most the interval's count of
/// them. Checks that fit in one tick, and checks that send nothing, stay on the grid, with
/// their interval as the period.
pub(super) fn stagger(checks: &[(Duration, bool)]) -> Vec<(Duration, Duration)> {
    let sending = || checks.iter().filter(|(_, sends)| *sends).map(|(i, _)| *i);
    let tick = sending()
        .filter(|i| !i.is_zero())
        .fold(STAGGER_TICK, Duration::min);
    let mut sharing: HashMap<Duration, usize> = HashMap::new();
    for interval in sending() {
        *sharing.entry(interval).or_default() += 1;
    }
    let mut taken: HashMap<Duration, usize> = HashMap::new();
    checks
        .iter()
        .map(|&(interval, sends)| {
            if !sends {
                return (Duration::ZERO, interval);
            }
            let ticks = usize::try_from(interval.as_nanos() / tick.as_nanos().max(1))
                .unwrap_or(usize::MAX)
                .min(sharing[&interval].div_ceil(STAGGER_BATCH));
            if ticks <= 1 {
                return (Duration::ZERO, interval);
            }
            let rank = taken.entry(interval).or_default();
            let slot = u32::try_from(*rank % ticks).unwrap_or(0);
            *rank += 1;
            (tick * slot, tick)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_sharing_an_interval_are_spread_over_the_finest_ticks() {
        let ms = Duration::from_millis(1);
        let batch = STAGGER_BATCH;
        let sending = |intervals: Vec<Duration>| -> Vec<(Duration, bool)> {
            intervals.into_iter().map(|i| (i, true)).collect()
        };
        // One 1 ms check, 3 batches and one check more at 10 ms, one 5 s check alone.
        let mut intervals = vec![ms];
        intervals.extend(vec![10 * ms; 3 * batch + 1]);
        intervals.push(Duration::from_secs(5));
        let placed = stagger(&sending(intervals));
        assert_eq!(placed[0], (Duration::ZERO, ms));
        let offsets: Vec<usize> = placed[1..=3 * batch + 1]
            .iter()
            .map(|(offset, period)| {
                assert_eq!(*period, ms, "spread checks wake on the tick");
                usize::try_from(offset.as_micros() / 1000).unwrap()
            })
            .collect();
        // Four ticks hold them, in turn.
        assert_eq!(offsets[..6], [0, 1, 2, 3, 0, 1]);
        assert!(offsets.iter().all(|&o| o < 4));
        assert_eq!(
            offsets.iter().filter(|&&o| o == 0).count(),
            (3 * batch + 1).div_ceil(4)
        );
        assert_eq!(
            placed[3 * batch + 2],
            (Duration::ZERO, Duration::from_secs(5))
        );
        // Ten batches at 10 ms take every tick of the interval, no more.
        let placed = stagger(&sending(vec![10 * ms; 12 * batch]));
        assert_eq!(placed.iter().map(|p| p.0).max(), Some(9 * ms));
        // Checks that fit in one tick stay on the grid.
        let placed = stagger(&sending(vec![10 * ms, 10 * ms]));
        assert_eq!(placed, [(Duration::ZERO, 10 * ms); 2]);
        // Checks that send nothing stay on the grid and count for nothing: a batch and one
        // more sending checks take two ticks, whatever the link checks beside them.
        let mut checks = vec![(10 * ms, false); 4 * batch];
        checks.extend(sending(vec![10 * ms; batch + 1]));
        let placed = stagger(&checks);
        assert!(placed[..4 * batch]
            .iter()
            .all(|p| *p == (Duration::ZERO, 10 * ms)));
        assert_eq!(placed[4 * batch..].iter().map(|p| p.0).max(), Some(ms));
        // A sub-millisecond interval makes the tick finer.
        let micros = Duration::from_micros(250);
        let mut intervals = vec![micros];
        intervals.extend(vec![ms; batch + 1]);
        let placed = stagger(&sending(intervals));
        assert_eq!(placed[1..3], [(Duration::ZERO, micros), (micros, micros)]);
    }
}
