//! `lb`'s flip latency under load: the agent reloaded with [`EXTRA_SERVICES`] more services
//! (link and ICMP checks of both backends every 10 ms, on the same prober thread) while a
//! client scrapes `/metrics` every 50 ms; then the master's server is frozen and thawed
//! again and again, and every move of the `requests` service (deadline or check evidence →
//! map write, as the agent logs it) is collected. The extra services' ICMP checks are
//! answered by the master's kernel, so a frozen server moves `requests` only.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_user::testbed::{process::Process, Testbed};

use super::{
    super::interrupt,
    rig::{lb_config, Flip, Rig, LISTEN},
    tuning::Tuning,
};

/// Services added for the load.
pub const EXTRA_SERVICES: u16 = 100;
/// Their check interval.
pub const EXTRA_INTERVAL: &str = "10ms";
/// Between two scrapes of `/metrics`.
pub const SCRAPE_EVERY: Duration = Duration::from_millis(50);

/// The flips made under load.
pub fn run(rig: &mut Rig, tuning: Tuning, cycles: usize) -> Result<Vec<Flip>> {
    let already = rig.flips()?.len();
    let mut extra = String::new();
    let health = format!(
        "{{ checks = [{{ type = \"link\" }}, {{ type = \"icmp\" }}], interval = \"{EXTRA_INTERVAL}\" }}"
    );
    for i in 0..EXTRA_SERVICES {
        extra += &Testbed::service_toml(&format!("load{i}"), "udp", 7000 + i, &health);
    }
    reload(rig, &(lb_config(tuning) + &extra))?;
    // Bounded: enough scrapes for the cycles at their slowest, then it ends by itself.
    let scrapes = (cycles as u64 * 4_000 / SCRAPE_EVERY.as_millis() as u64).max(1);
    let mut scraper = rig.testbed.switch.command("sh");
    scraper
        .args([
            "-c",
            &format!(
                "for i in $(seq {scrapes}); do curl -s -o /dev/null --max-time 2 \
                 http://{LISTEN}/metrics; sleep {}; done",
                SCRAPE_EVERY.as_secs_f64()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let scraper = Process::spawn(scraper, "the /metrics scraper")?;
    let measured = cycle(rig, cycles);
    drop(scraper);
    let thawed = rig.freeze_master_server(false);
    reload(rig, &lb_config(tuning))?;
    measured?;
    thawed?;
    Ok(rig.flips()?.split_off(already))
}

/// `cycles` times: the master's server frozen until `requests` is on the slave, thawed until
/// it is back on the master.
fn cycle(rig: &mut Rig, cycles: usize) -> Result<()> {
    for _ in 0..cycles {
        for (frozen, on) in [(true, "slave"), (false, "master")] {
            interrupt::check()?;
            rig.freeze_master_server(frozen)?;
            wait_requests_on(rig, on)?;
        }
    }
    Ok(())
}

/// Writes `config` and has the agent reload it (SIGHUP); returns once `/status` lists every
/// service of it.
fn reload(rig: &mut Rig, config: &str) -> Result<()> {
    rig.testbed.write_file("lb.toml", config)?;
    let services = config.matches("[[services]]").count();
    let pid = rig.agent_pid().context("the agent is not running")?;
    // SAFETY: kill(2) on the pid of the agent, a child of this process.
    if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot signal the agent");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        interrupt::check()?;
        if let Ok(status) = rig.testbed.agent_status(LISTEN) {
            if status.services.len() == services {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the agent did not reload to {services} services within 30 s")
}

/// Waits (5 s at most) until the `requests` service is on `backend`.
fn wait_requests_on(rig: &Rig, backend: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let status = rig.testbed.agent_status(LISTEN)?;
        let active = status
            .services
            .iter()
            .find(|s| s.name == "requests")
            .and_then(|s| s.active.clone());
        if active.as_deref() == Some(backend) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("requests did not move to {backend} within 5 s under load")
}
