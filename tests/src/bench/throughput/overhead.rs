//! CPU and memory of the real agent (`lb run --config …`) on the testbed's switch, idle
//! dataplane, health checks running.
//!
//! On veth, a send runs the receiving host's stack (its NAPI poll, its IP and UDP receive,
//! the wake-up of its server) inside the sender's system call, so a probe's CPU time
//! includes the backend's work on it. Each scenario is therefore measured as veth does it
//! ([`Placement::Shared`]) and with the backends' receive work on kernel threads of their
//! own on the other core ([`Placement::Apart`]), which is what separate machines give.

use std::{fmt::Write as _, time::Duration};

use anyhow::{bail, Context, Result};
use lb_user::testbed::{topology::UDP_PORT, Host, Testbed};

use crate::{
    bench::{interrupt, progress},
    procfs::{process_cpu, status_value},
};

/// Where the agent listens (inside the switch's namespace).
const LISTEN: &str = "127.0.0.1:9100";

/// One scenario to measure.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Label for the report.
    pub label: String,
    /// Health checks, as the report states them.
    pub checks: String,
    /// The config file's text.
    pub config: String,
}

/// Where the backends' receive work runs while the agent is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// As veth does it: inside the agent's sends, charged to the agent.
    Shared,
    /// On the backends' own NAPI threads (threaded NAPI on their `eth0`), pinned to core 1;
    /// the agent pinned to core 0.
    Apart,
}

impl Placement {
    /// How the report names it.
    fn describe(self) -> &'static str {
        match self {
            Placement::Shared => "in the agent's sends (veth)",
            Placement::Apart => "backends' own threads, other core",
        }
    }
}

/// The agent CPU target with 1 ms checks on two backends, % of one core.
pub const TARGET_CPU_PERCENT: f64 = 5.0;

/// What one scenario cost.
#[derive(Debug, Clone)]
pub struct Overhead {
    /// The scenario.
    pub scenario: Scenario,
    /// Where the backends' receive work ran.
    pub placement: Placement,
    /// Measured window, seconds.
    pub secs: f64,
    /// CPU time (user + system) over the window, in % of one core.
    pub cpu_percent: f64,
    /// User part of it.
    pub user_percent: f64,
    /// Resident memory at the end of the window, KiB.
    pub rss_kib: u64,
    /// Peak resident memory, KiB.
    pub hwm_kib: u64,
    /// Threads of the agent.
    pub threads: u64,
    /// Health-check probes per second over the window.
    pub probes_per_sec: f64,
    /// Of them, failed (per second).
    pub failed_per_sec: f64,
    /// Backends up / backends in total at the end.
    pub backends_up: (usize, usize),
}

/// One UDP service, two backends, link + UDP checks every millisecond.
pub fn one_service_1ms() -> Scenario {
    let config = Testbed::config_head(LISTEN)
        + &Testbed::service_toml(
            "echo",
            "udp",
            UDP_PORT,
            r#"{ checks = [{ type = "link" }, { type = "udp", send = "ping" }], interval = "1ms" }"#,
        );
    Scenario {
        label: "1 service, 2 backends, 1 ms checks".into(),
        checks: "link + UDP request/answer to a real responder on each backend, interval 1 ms \
                 (timeout 1 ms, rise/fall 3)"
            .into(),
        config,
    }
}

/// `count` UDP services on one VIP (ports 6000…), each with two backends, link + UDP checks
/// every 100 ms against the responders on port 5353.
pub fn many_services(count: u16) -> Scenario {
    let mut config = Testbed::config_head(LISTEN);
    let health = format!(
        "{{ checks = [{{ type = \"link\" }}, {{ type = \"udp\", port = {UDP_PORT}, send = \"ping\" }}], interval = \"100ms\" }}"
    );
    for i in 0..count {
        config += &Testbed::service_toml(&format!("svc{i}"), "udp", 6000 + i, &health);
    }
    Scenario {
        label: format!("{count} services, 2 backends each, 100 ms checks"),
        checks: format!(
            "link + UDP request/answer (to the responder on port {UDP_PORT} of each backend), \
             interval 100 ms (the default), per backend of every service"
        ),
        config,
    }
}

/// (all probes, failed probes) so far, from the agent's metrics.
fn probes(bed: &Testbed) -> Result<(u64, u64)> {
    let (ok, text, err) = bed.output(
        Host::Switch,
        "curl",
        &[
            "-sf",
            "--max-time",
            "2",
            &format!("http://{LISTEN}/metrics"),
        ],
    )?;
    if !ok {
        bail!("cannot read the agent's metrics: {err}");
    }
    let (mut all, mut failed) = (0u64, 0u64);
    for line in text
        .lines()
        .filter(|l| l.starts_with("lb_health_checks_total{"))
    {
        let value = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        all += value;
        if line.contains("result=\"fail\"") {
            failed += value;
        }
    }
    Ok((all, failed))
}

/// Backends up, backends in total, from `/status`.
fn backends_up(bed: &Testbed) -> Result<(usize, usize)> {
    let status = bed.agent_status(LISTEN)?;
    let all: Vec<bool> = status
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.up))
        .collect();
    Ok((all.iter().filter(|up| **up).count(), all.len()))
}

/// Sets threaded NAPI on (or off) the backends' `eth0`.
fn backends_threaded(bed: &Testbed, on: bool) -> Result<()> {
    let command = format!("echo {} > /sys/class/net/eth0/threaded", u8::from(on));
    for ns in [&bed.master, &bed.slave] {
        ns.exec("sh", &["-c", &command])?;
    }
    Ok(())
}

/// Pins every thread of process `pid` to CPU `cpu`.
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the threads of {pid}"))?
    {
        if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
            super::generator::pin(tid, cpu)?;
        }
    }
    Ok(())
}

/// Runs `scenario` on `bed` (UDP responders on master and slave must run) with the
/// backends' receive work placed as `placement` says: starts the agent, lets it settle for
/// `settle`, measures over `window`, stops it.
pub fn measure(
    bed: &mut Testbed,
    scenario: Scenario,
    placement: Placement,
    settle: Duration,
    window: Duration,
) -> Result<Overhead> {
    backends_threaded(bed, placement == Placement::Apart)?;
    let path = bed.write_file("overhead.toml", &scenario.config)?;
    let path = path.to_str().context("config path")?.to_string();
    let index = bed.start_lb(&["run", "--config", &path])?;
    bed.wait_for_agent(index, LISTEN)?;
    let pid = bed.processes[index]
        .pid()
        .context("the agent exited before it was measured")?;
    if placement == Placement::Apart {
        pin_process(pid, 0)?;
        for napi in super::nat::napi_threads(&["eth0"])? {
            super::generator::pin(napi, 1)?;
        }
    }
    progress(format!(
        "agent overhead: {}, backends' receive {} (pid {pid}), settling {:?}, measuring {:?}",
        scenario.label,
        placement.describe(),
        settle,
        window
    ));
    interrupt::sleep(settle)?;
    let (probes0, failed0) = probes(bed)?;
    let cpu0 = process_cpu(pid)?;
    let start = std::time::Instant::now();
    interrupt::sleep(window)?;
    let cpu1 = process_cpu(pid)?;
    let secs = start.elapsed().as_secs_f64();
    let (probes1, failed1) = probes(bed)?;
    let up = backends_up(bed)?;
    let result = Overhead {
        secs,
        cpu_percent: (cpu1.total - cpu0.total) / secs * 100.0,
        user_percent: (cpu1.user - cpu0.user) / secs * 100.0,
        rss_kib: status_value(pid, "VmRSS")?,
        hwm_kib: status_value(pid, "VmHWM")?,
        threads: status_value(pid, "Threads")?,
        probes_per_sec: (probes1 - probes0) as f64 / secs,
        failed_per_sec: (failed1 - failed0) as f64 / secs,
        backends_up: up,
        scenario,
        placement,
    };
    bed.stop_lb_for_good(index)?;
    backends_threaded(bed, false)?;
    Ok(result)
}

/// The report's table of `overheads`.
pub fn render(overheads: &[Overhead]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "### Agent overhead (`lb run`, idle dataplane)\n");
    let _ = writeln!(
        t,
        "CPU = utime + stime of the agent process (`/proc/PID/stat`) over the window, in % \
         of one core; memory from `/proc/PID/status` at the end of the window. UDP responders \
         (threads of the bench) answer on both backends. On veth a send runs the receiving \
         backend's stack inside the sender's system call, so each probe's CPU time includes \
         the backend's receive work; the rows \"backends' own threads\" move that work to \
         threaded NAPI on the backends' `eth0`, pinned to core 1 with the agent on core 0, as \
         separate machines would (the agent still pays for waking those threads).\n"
    );
    crate::bench::report::table_head(
        &mut t,
        &[
            "scenario",
            "checks",
            "backends' receive work",
            "window",
            "probes/s",
            "failed probes/s",
            "backends up",
            "CPU % of one core (user)",
            "VmRSS MiB",
            "VmHWM MiB",
            "threads",
        ],
    );
    for o in overheads {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.1} s | {:.0} | {:.1} | {}/{} | {:.2} ({:.2}) | {:.1} | {:.1} | {} |",
            o.scenario.label,
            o.scenario.checks,
            o.placement.describe(),
            o.secs,
            o.probes_per_sec,
            o.failed_per_sec,
            o.backends_up.0,
            o.backends_up.1,
            o.cpu_percent,
            o.user_percent,
            o.rss_kib as f64 / 1024.0,
            o.hwm_kib as f64 / 1024.0,
            o.threads
        );
    }
    t.push('\n');
    t
}

/// The target line for the agent's CPU with 1 ms checks on two backends, if measured.
pub fn target_line(overheads: &[Overhead]) -> Option<String> {
    let one_ms: Vec<&Overhead> = overheads
        .iter()
        .filter(|o| o.scenario.label == one_service_1ms().label)
        .collect();
    let figure = |placement| {
        one_ms
            .iter()
            .find(|o| o.placement == placement)
            .map(|o| o.cpu_percent)
    };
    let shared = figure(Placement::Shared)?;
    let verdict = |cpu: f64| {
        if cpu < TARGET_CPU_PERCENT {
            "met"
        } else {
            "missed"
        }
    };
    let apart = figure(Placement::Apart).map_or(String::new(), |cpu| {
        format!(
            "; {cpu:.2} % with the backends' receive work on their own threads — {}",
            verdict(cpu)
        )
    });
    Some(format!(
        "- Agent < {TARGET_CPU_PERCENT} % of a core with 1 ms checks on two backends: \
         {shared:.2} % with veth running the backends' receive inside the agent's sends — \
         {}{apart}.",
        verdict(shared)
    ))
}
