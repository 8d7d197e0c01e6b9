//! How `lb` is set up in the failover bench (`--lb`): its checks' timeout and its prober
//! thread's scheduling.

/// How long `lb`'s UDP check of the master may take by default, in ms (checks every 1 ms).
/// The master's server answers the client's 20 000 requests per second on the same socket,
/// and on 2 cores a healthy answer sometimes takes more than a millisecond or two: with a
/// timeout that short the checks now and then fail three in a row and move the traffic
/// without cause, which the report counts.
pub const CHECK_TIMEOUT_MS: u64 = 10;

/// How `lb` is set up: its checks' timeout and its prober thread's scheduling. Written and
/// read as `10ms`, `1ms+fifo50` (`+fifo<N>`: `[prober] realtime_priority = N`) or
/// `10ms+nice-10` (`+nice<N>`: `[prober] nice = N`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// The UDP check's timeout, in ms (checks every 1 ms, fall 3, rise 3).
    pub timeout_ms: u64,
    /// `[prober] realtime_priority`: the prober thread under `SCHED_FIFO` at this priority.
    pub realtime: Option<u8>,
    /// `[prober] nice`: the prober an ordinary thread at this niceness (0: as the agent).
    pub nice: i8,
}

impl Tuning {
    /// As the agent runs without a `[prober]` table, with [`CHECK_TIMEOUT_MS`].
    pub const DEFAULT: Tuning = Tuning {
        timeout_ms: CHECK_TIMEOUT_MS,
        realtime: None,
        nice: 0,
    };
    /// Set for the detection targets: a 1 ms timeout (a silent master is seen within 3 to
    /// 4 ms) and the prober under `SCHED_FIFO`.
    pub const FAST: Tuning = Tuning {
        timeout_ms: 1,
        realtime: Some(50),
        nice: 0,
    };
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.timeout_ms)?;
        match (self.realtime, self.nice) {
            (Some(priority), _) => write!(f, "+fifo{priority}"),
            (None, 0) => Ok(()),
            (None, nice) => write!(f, "+nice{nice}"),
        }
    }
}

impl std::str::FromStr for Tuning {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "`{text}`: expected a timeout and an optional scheduling, as `10ms`, \
                 `1ms+fifo50` or `10ms+nice-10`"
            )
        };
        let (timeout, scheduling) = match text.split_once('+') {
            Some((timeout, scheduling)) => (timeout, Some(scheduling)),
            None => (text, None),
        };
        let timeout_ms: u64 = timeout
            .strip_suffix("ms")
            .and_then(|ms| ms.parse().ok())
            .filter(|ms| *ms >= 1)
            .ok_or_else(usage)?;
        let mut tuning = Tuning {
            timeout_ms,
            ..Tuning::DEFAULT
        };
        match scheduling {
            None => {}
            Some(fifo) if fifo.starts_with("fifo") => {
                tuning.realtime = Some(
                    fifo["fifo".len()..]
                        .parse::<u8>()
                        .ok()
                        .filter(|p| (1..=99).contains(p))
                        .ok_or_else(|| format!("{}; the priority is 1 to 99", usage()))?,
                );
            }
            Some(nice) if nice.starts_with("nice") => {
                tuning.nice = nice["nice".len()..]
                    .parse::<i8>()
                    .ok()
                    .filter(|n| (-20..=19).contains(n))
                    .ok_or_else(|| format!("{}; the niceness is -20 to 19", usage()))?;
            }
            Some(_) => return Err(usage()),
        }
        Ok(tuning)
    }
}

#[cfg(test)]
mod tests {
    use super::Tuning;

    #[test]
    fn tunings_read_as_they_are_written() {
        for text in ["10ms", "1ms+fifo50", "10ms+nice-10", "2ms+nice5"] {
            let tuning: Tuning = text.parse().unwrap();
            assert_eq!(tuning.to_string(), text);
        }
        assert_eq!("10ms".parse::<Tuning>().unwrap(), Tuning::DEFAULT);
        assert_eq!("1ms+fifo50".parse::<Tuning>().unwrap(), Tuning::FAST);
        for bad in [
            "10",
            "0ms",
            "1ms+fifo0",
            "1ms+fifo100",
            "1ms+nice-21",
            "1ms+rt5",
        ] {
            assert!(bad.parse::<Tuning>().is_err(), "{bad} was taken");
        }
    }
}
