//! Failure detection by the health checks alone, the link staying up: a backend that goes
//! silent is declared down after `fall` missed deadlines and no sooner; one that answers
//! slowly but within its timeout stays up while several checks are in flight; one that
//! speaks again comes back after `rise` passes; the prober thread is scheduled as its
//! config says. Bounds are generous correctness bounds.

use std::{
    thread::sleep,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_user::testbed::{Host, Testbed};
use tests::{
    agent::{metrics, sample, start_agent, wait_active},
    procfs::stat_fields,
};

const LISTEN: &str = "127.0.0.1:9100";

/// A testbed with UDP responders and web servers on master and slave, the `echo` service
/// checked by UDP only with `health`, `web` by its link only; the agent running.
fn running(bed: &mut Testbed, health: &str, master_delay: Duration) {
    bed.start_slow_udp_responder(Host::Master, "master", master_delay)
        .unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    for (host, name) in [(Host::Master, "master"), (Host::Slave, "slave")] {
        bed.start_web_server(host, name).unwrap();
    }
    let web = r#"health = { checks = [{ type = "link" }], interval = "100ms" }"#;
    let config = bed.config_with(LISTEN, web, &format!("health = {health}"));
    start_agent(bed, &config, LISTEN);
    wait_active(bed, LISTEN, "echo", "master").unwrap();
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_silent_backend_is_down_after_fall_missed_deadlines_and_back_after_rise() {
    let mut bed = Testbed::new("lbdt-silent").expect("testbed");
    // 100 ms apart, each with 100 ms to answer, fall 3: the third missed deadline comes
    // 300 to 400 ms after the backend went silent (an attempt sent just before may miss
    // its deadline too, by its round trip).
    let health = r#"{ checks = [{ type = "udp", send = "health" }], interval = "100ms", timeout = "100ms", rise = 3, fall = 3 }"#;
    running(&mut bed, health, Duration::ZERO);

    // The silence begins somewhere between these two instants.
    let before = unix_now();
    bed.set_silent(Host::Master, true).unwrap();
    let after = unix_now();
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    let change = echo.last_change.clone().expect("a change was recorded");
    assert!(
        change
            .cause
            .contains("udp check failed 3 times: no answer within 100ms"),
        "{change:?}"
    );
    let (earliest, latest) = (change.at_unix_s - after, change.at_unix_s - before);
    eprintln!("declared down {earliest:.3}–{latest:.3} s after the silence");
    assert!(
        latest >= 0.25,
        "declared down {latest:.3} s after the silence: sooner than 3 missed deadlines"
    );
    // One attempt at a time would take fall × (interval + timeout) = 600 ms or more.
    assert!(
        earliest < 0.55,
        "declared down {earliest:.3} s after the silence: later than fall × interval + \
         timeout (400 ms) and a margin"
    );
    // The link check saw nothing: the other service stays.
    let web = status.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.active.as_deref(), Some("master"));

    bed.set_silent(Host::Master, false).unwrap();
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    let master = echo.backends.iter().find(|b| b.name == "master").unwrap();
    assert_eq!(master.health_cause, "udp check passed 3 times");
}

#[test]
fn a_slow_backend_answering_within_its_timeout_stays_up() {
    let mut bed = Testbed::new("lbdt-slow").expect("testbed");
    // Answers after 80 ms, 0.8 × the timeout, to checks sent every 20 ms: four or five
    // attempts are in flight at any time, each must be matched with its own answer.
    let health = r#"{ checks = [{ type = "udp", send = "health" }], interval = "20ms", timeout = "100ms", rise = 3, fall = 3 }"#;
    running(&mut bed, health, Duration::from_millis(80));
    sleep(Duration::from_millis(1500));
    let text = metrics(&bed, LISTEN);
    let labels = r#"service="echo",backend="master",check="udp""#;
    let checks = |result: &str| {
        let name = format!("lb_health_checks_total{{{labels},result=\"{result}\"}}");
        sample(&text, &name).unwrap_or(0.0)
    };
    let (passed, failed) = (checks("ok"), checks("fail"));
    assert_eq!(
        failed, 0.0,
        "a slow answer within the timeout failed:\n{text}"
    );
    assert!(passed >= 30.0, "{passed} checks passed in 1.5 s at 20 ms");
    // Answers are read at the schedule's ticks (every 20 ms) but timed by the kernel's
    // receive stamp: the round trips average the responder's 80 ms (and its own lateness,
    // a few ms), not the 100 ms of the tick that reads them.
    let histogram = |part: &str| {
        sample(
            &text,
            &format!("lb_health_check_duration_seconds_{part}{{{labels}}}"),
        )
        .unwrap()
    };
    let mean = histogram("sum") / histogram("count");
    assert!(
        (0.079..0.095).contains(&mean),
        "mean round trip {mean:.4} s for answers sent 80 ms after the request"
    );
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    assert_eq!(echo.active.as_deref(), Some("master"));
    assert!(echo.last_change.is_none(), "{:?}", echo.last_change);
}

#[test]
fn a_refused_udp_check_fails_when_the_refusal_comes_not_at_the_next_send() {
    let mut bed = Testbed::new("lbdt-refused").expect("testbed");
    // Sends 300 ms apart with a long timeout: answers are read at the next send, but a
    // refusal (the master's kernel: port unreachable) must be acted on when it comes.
    let health = r#"{ checks = [{ type = "udp", send = "health" }], interval = "300ms", timeout = "1s", rise = 1, fall = 1 }"#;
    running(&mut bed, health, Duration::ZERO);
    bed.stop_udp_responder(Host::Master);
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    sleep(Duration::from_millis(1000));
    let text = metrics(&bed, LISTEN);
    let labels = r#"service="echo",backend="master",check="udp""#;
    let refused = sample(
        &text,
        &format!("lb_health_checks_total{{{labels},result=\"fail\"}}"),
    )
    .unwrap_or(0.0);
    assert!(refused >= 3.0, "{refused} refused checks in 1 s at 300 ms");
    // The refusals were decided within 100 ms of their send (read at the next send, a
    // refusal would take 300 ms); one attempt may have reached the responder as it closed
    // and run to its deadline.
    let within = sample(
        &text,
        &format!("lb_health_check_duration_seconds_bucket{{le=\"0.1\",{labels}}}"),
    )
    .unwrap_or(0.0);
    let all = sample(
        &text,
        &format!("lb_health_check_duration_seconds_count{{{labels}}}"),
    )
    .unwrap_or(0.0);
    assert!(
        within >= 3.0 && all - within <= 1.0,
        "{within} of {all} attempts decided within 100 ms of their send:\n{text}"
    );
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    let change = echo.last_change.clone().expect("a change was recorded");
    assert!(change.cause.contains("refused"), "{change:?}");
}

/// The `lb-prober` thread of agent process `pid`: its `/proc` directory.
fn prober_task(pid: u32) -> std::path::PathBuf {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| task.unwrap().path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == "lb-prober")
        })
        .expect("the agent has an lb-prober thread")
}

/// The prober thread of an agent run with `prober` as its `[prober]` section: its
/// `/proc/PID/task/TID/stat` fields ([`stat_fields`]).
fn prober_with(name: &str, prober: &str) -> Vec<String> {
    let mut bed = Testbed::new(name).expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    let echo = r#"health = { checks = [{ type = "udp", send = "health" }], interval = "10ms" }"#;
    let web = r#"health = { checks = [{ type = "link" }] }"#;
    let config = bed.config_with(LISTEN, web, echo) + "\n[prober]\n" + prober + "\n";
    let agent = start_agent(&mut bed, &config, LISTEN);
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    let pid = bed.processes[agent].pid().expect("the agent runs");
    stat_fields(prober_task(pid).join("stat").to_str().unwrap()).unwrap()
}

/// Needs what the agent needs for `realtime_priority`: `CAP_SYS_NICE` and real-time
/// runtime for its cgroup (root on an ordinary host has both).
#[test]
fn the_prober_thread_is_scheduled_as_configured() {
    // Field numbers of proc(5), counted from 1: nice 19, rt_priority 40, policy 41.
    let field = |fields: &[String], n: usize| fields[n - 3].clone();
    let fields = prober_with("lbdt-nice", "nice = 5");
    assert_eq!(field(&fields, 19), "5", "nice");
    assert_eq!(field(&fields, 41), libc::SCHED_OTHER.to_string(), "policy");
    let fields = prober_with("lbdt-rt", "realtime_priority = 10");
    assert_eq!(field(&fields, 40), "10", "rt_priority");
    assert_eq!(field(&fields, 41), libc::SCHED_FIFO.to_string(), "policy");
}
