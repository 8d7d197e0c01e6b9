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
    /// How the prober thread is scheduled.
    pub prober: Prober,
}

/// How the prober thread is scheduled (`[prober]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prober {
    /// An ordinary thread like the rest of the agent (no `[prober]` table).
    Ordinary,
    /// An ordinary thread at this niceness (`nice`).
    Nice(i8),
    /// Under `SCHED_FIFO` at this priority (`realtime_priority`).
    Fifo(u8),
}

impl Prober {
    /// As the report's system names say it (after a comma), or nothing.
    pub fn label(self) -> String {
        match self {
            Prober::Ordinary => String::new(),
            Prober::Nice(nice) => format!(", prober nice {nice}"),
            Prober::Fifo(priority) => format!(", prober SCHED_FIFO {priority}"),
        }
    }

    /// As file names of the report's pictures end, or nothing.
    pub fn file_suffix(self) -> String {
        match self {
            Prober::Ordinary => String::new(),
            Prober::Nice(nice) => format!("-nice{nice}"),
            Prober::Fifo(priority) => format!("-rt{priority}"),
        }
    }

    /// The agent config's `[prober]` table, or nothing.
    pub fn config_table(self) -> String {
        match self {
            Prober::Ordinary => String::new(),
            Prober::Nice(nice) => format!("\n[prober]\nnice = {nice}\n"),
            Prober::Fifo(priority) => format!("\n[prober]\nrealtime_priority = {priority}\n"),
        }
    }
}

impl Tuning {
    /// As the agent runs without a `[prober]` table, with [`CHECK_TIMEOUT_MS`].
    pub const DEFAULT: Tuning = Tuning {
        timeout_ms: CHECK_TIMEOUT_MS,
        prober: Prober::Ordinary,
    };
    /// Set for the detection targets: a 1 ms timeout (a silent master is seen within 3 to
    /// 4 ms) and the prober under `SCHED_FIFO`.
    pub const FAST: Tuning = Tuning {
        timeout_ms: 1,
        prober: Prober::Fifo(50),
    };
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.timeout_ms)?;
        match self.prober {
            Prober::Ordinary => Ok(()),
            Prober::Nice(nice) => write!(f, "+nice{nice}"),
            Prober::Fifo(priority) => write!(f, "+fifo{priority}"),
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
        let prober = match scheduling {
            None => Prober::Ordinary,
            Some(fifo) if fifo.starts_with("fifo") => Prober::Fifo(
                fifo["fifo".len()..]
                    .parse::<u8>()
                    .ok()
                    .filter(|p| (1..=99).contains(p))
                    .ok_or_else(|| format!("{}; the priority is 1 to 99", usage()))?,
            ),
            Some(nice) if nice.starts_with("nice") => Prober::Nice(
                nice["nice".len()..]
                    .parse::<i8>()
                    .ok()
                    .filter(|n| (-20..=19).contains(n))
                    .ok_or_else(|| format!("{}; the niceness is -20 to 19", usage()))?,
            ),
            Some(_) => return Err(usage()),
        };
        Ok(Tuning { timeout_ms, prober })
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
