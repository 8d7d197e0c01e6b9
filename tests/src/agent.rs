//! The agent on a namespace testbed, as the end-to-end tests drive it: start it with a
//! config, read its metrics, wait for a service to move.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lb_user::testbed::{Host, Testbed};

/// Starts `lb run` with `config` on the testbed's switch and waits until it serves on
/// `listen`; returns its process index.
pub fn start_agent(bed: &mut Testbed, config: &str, listen: &str) -> usize {
    let path = bed.write_file("lb.toml", config).unwrap();
    let agent = bed
        .start_lb(&["run", "--config", path.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(agent, listen).unwrap();
    agent
}

/// Runs `lb ARGS…` on switch host `switch`: (success, stdout, stderr).
pub fn lb_on(bed: &Testbed, switch: Host, args: &[&str]) -> (bool, String, String) {
    let out = bed
        .lb_command_on(switch)
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The agent's `/metrics` text.
pub fn metrics(bed: &Testbed, listen: &str) -> String {
    metrics_on(bed, listen, Host::Switch)
}

/// The `/metrics` text of the agent on switch host `switch`.
pub fn metrics_on(bed: &Testbed, listen: &str, switch: Host) -> String {
    let url = format!("http://{listen}/metrics");
    let (ok, text, err) = bed
        .output(switch, "curl", &["-sSf", "--max-time", "3", &url])
        .unwrap();
    assert!(ok, "GET /metrics on {switch:?} failed: {err}");
    text
}

/// The value of the sample `name{labels}` in an exposition (`None` when absent).
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .trim()
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// Waits (10 s at most) until `service`'s active backend is `backend`.
pub fn wait_active(bed: &Testbed, listen: &str, service: &str, backend: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let status = bed.agent_status(listen)?;
        let active = status
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.active.clone());
        if active.as_deref() == Some(backend) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{service} did not switch to {backend} within 10 s")
}
