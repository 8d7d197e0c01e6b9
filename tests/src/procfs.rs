//! A process's or thread's figures as `/proc` gives them (proc(5)), for the benches and
//! tests that watch the agent or a thread of their own.

use anyhow::{Context, Result};

/// The fields of the `stat` file at `path` from field 3 (the state) on: field `n` of
/// proc(5), counted from 1, is at index `n - 3`. The command (field 2) may hold spaces, so
/// the fields are taken after its closing parenthesis.
pub fn stat_fields(path: &str) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let (_, rest) = stat
        .rsplit_once(')')
        .with_context(|| format!("no command in {path}"))?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU time used so far, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct CpuSecs {
    /// In user mode.
    pub user: f64,
    /// In user and kernel mode.
    pub total: f64,
}

/// The CPU time of process `pid`, all its threads.
pub fn process_cpu(pid: u32) -> Result<CpuSecs> {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// The CPU time of thread `tid` of this process alone (`/proc/TID/stat` would give the
/// whole process's).
pub fn own_thread_cpu(tid: u32) -> Result<CpuSecs> {
    cpu_of(&format!("/proc/self/task/{tid}/stat"))
}

/// utime (field 14) and stime (field 15) of the `stat` file at `path`, in seconds.
fn cpu_of(path: &str) -> Result<CpuSecs> {
    let fields = stat_fields(path)?;
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {n} of {path}"))
    };
    let (user, system) = (ticks(14)?, ticks(15)?);
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(CpuSecs {
        user: user as f64 / per_sec,
        total: (user + system) as f64 / per_sec,
    })
}

/// A `/proc/PID/status` value in kB (or a count).
pub fn status_value(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Datagrams dropped so far in the calling thread's network namespace because a UDP
/// socket's receive buffer was full (`RcvbufErrors` of `/proc/thread-self/net/snmp`).
pub fn udp_rcvbuf_errors() -> Result<u64> {
    let path = "/proc/thread-self/net/snmp";
    let snmp = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        anyhow::bail!("no Udp lines in {path}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .with_context(|| format!("no Udp RcvbufErrors in {path}"))
}
