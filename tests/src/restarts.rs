//! The testbed of the tests that restart, replace, reload and upgrade the agent under a
//! client asking the VIP 10 000 times a second (`tests/lifecycle.rs`, `tests/upgrade.rs`),
//! and what they read from it.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use lb_user::testbed::{
    topology::{lb_binary, unanswered, Answer, Testbed, UDP_PORT},
    Host,
};

/// Where the agent serves `/status` and `/metrics`.
pub const LISTEN: &str = "127.0.0.1:9100";
/// 10 000 requests per second.
pub const PERIOD: Duration = Duration::from_micros(100);
/// A link check and a 10 ms UDP check, rise and fall 3.
pub const HEALTH: &str = r#"{ checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms", rise = 3, fall = 3 }"#;

/// One UDP service, `echo`, on master (priority 100) and slave.
pub fn config() -> String {
    format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH)
    )
}

/// Held by each test for its whole run: these tests count every request at 10 000 per
/// second and assert that none is lost, which measures the agent, not how a 2-core machine
/// copes with seven testbeds, their agents and streams at once.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A testbed with UDP responders on master and slave, and this test's turn.
pub fn testbed(name: &str) -> (Testbed, MutexGuard<'static, ()>) {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = Testbed::new(name).expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    (bed, turn)
}

/// The id of the XDP program on the switch's client NIC, as `ip link` shows it.
pub fn program_id(bed: &Testbed) -> u32 {
    let (_, text, _) = bed
        .output(Host::Switch, "ip", &["link", "show", "c0"])
        .unwrap();
    let id = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok());
    id.unwrap_or_else(|| panic!("no XDP program on c0: {text}"))
}

/// Who answered, as `backend × count` runs, for failure messages.
pub fn summary(answers: &[Answer]) -> String {
    format!(
        "answered by {}; {}",
        lb_user::testbed::topology::answer_runs(answers).join(", "),
        lb_user::testbed::topology::describe_unanswered(answers)
    )
}

/// Asserts that every request was answered, and all by `backend`.
pub fn assert_all_answered_by(answers: &[Answer], backend: &str) {
    assert_eq!(unanswered(answers), 0, "{}", summary(answers));
    assert!(
        answers.iter().all(|a| a.by.as_deref() == Some(backend)),
        "{}",
        summary(answers)
    );
}

/// The age in seconds of the client's flow to `echo`, as `lb flows` shows it.
pub fn flow_age(bed: &Testbed) -> f64 {
    let (ok, flows, err) = bed
        .output(Host::Switch, &lb_binary().unwrap(), &["flows"])
        .unwrap();
    assert!(ok, "{err}");
    let line = flows
        .lines()
        .find(|l| l.starts_with("echo"))
        .unwrap_or_else(|| panic!("no flow of echo: {flows}"));
    line.split_whitespace()
        .nth(6)
        .and_then(|age| age.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no age in {line:?}"))
}
