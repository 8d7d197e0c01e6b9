//! Failover and failback end to end: the agent's health checks on a namespace testbed, a
//! client streaming UDP requests through the VIP (one per millisecond) while faults are
//! injected, and checks of who answered, in order, of the longest gap, of `/status` and of
//! the Prometheus exposition. Bounds are generous correctness bounds, not speed targets.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use lb_user::testbed::{
    topology::{answer_runs, describe_gap, lb_binary, longest_gap, unanswered},
    Host, Testbed,
};
use tests::agent::sample;

const LISTEN: &str = "127.0.0.1:9100";
const WEB_FAST: &str = r#"health = { checks = [{ type = "link" }, { type = "tcp" }], interval = "10ms", rise = 3, fall = 3 }"#;
const ECHO_FAST: &str = r#"health = { checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms", rise = 3, fall = 3 }"#;
/// The widest gap in answers a failover may cause in these tests (keepalived's is ~3.5 s).
const GAP_BOUND: Duration = Duration::from_millis(500);

/// A testbed with web servers and UDP responders on every backend and `lb` running.
fn running(bed: &mut Testbed, web_extra: &str, echo_extra: &str) {
    let mut hosts = vec![(Host::Master, "master"), (Host::Slave, "slave")];
    if bed.backup.is_some() {
        hosts.push((Host::Backup, "backup"));
    }
    for (host, name) in hosts {
        bed.start_web_server(host, name).unwrap();
        bed.start_udp_responder(host, name).unwrap();
    }
    let config = bed.config_with(LISTEN, web_extra, echo_extra);
    let path = bed.write_file("lb.toml", &config).unwrap();
    let agent = bed
        .start_lb(&["run", "--config", path.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(agent, LISTEN).unwrap();
}

fn status(bed: &Testbed) -> String {
    let (ok, out, err) = bed
        .output(Host::Switch, &lb_binary().unwrap(), &["status"])
        .unwrap();
    assert!(ok, "lb status failed: {err}");
    out
}

fn active_of(bed: &Testbed, service: &str) -> String {
    let status = status(bed);
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("service {service} ")))
        .unwrap_or_else(|| panic!("no service {service} in:\n{status}"));
    line.rsplit("active ").next().unwrap().to_string()
}

/// Polls until `service` is served by `backend` (bounded), returning how long it took.
fn wait_active(bed: &Testbed, service: &str, backend: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let active = active_of(bed, service);
        if active == backend {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{service} still on {active} after {within:?}, expected {backend}\n{}",
            status(bed)
        );
        sleep(Duration::from_millis(20));
    }
}

fn metrics(bed: &Testbed) -> String {
    tests::agent::metrics(bed, LISTEN)
}

#[test]
fn master_link_down_fails_over_both_services_and_link_up_fails_back() {
    let mut bed = Testbed::new("lbfo-link").expect("testbed");
    running(&mut bed, WEB_FAST, ECHO_FAST);
    assert_eq!(bed.http_get_vip().unwrap(), "master");

    let stream = bed.udp_stream(3000, Duration::from_millis(1)).unwrap();
    sleep(Duration::from_millis(800));
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, "echo", "slave", Duration::from_secs(2));
    wait_active(&bed, "web", "slave", Duration::from_secs(2));
    assert_eq!(bed.http_get_vip().unwrap(), "slave");
    sleep(Duration::from_millis(400));
    bed.set_link(Host::Master, true).unwrap();
    let answers = stream.join().unwrap().unwrap();

    assert_eq!(
        answer_runs(&answers),
        ["master", "slave", "master"],
        "who answered, in order"
    );
    let gap = longest_gap(&answers);
    assert!(
        gap < GAP_BOUND,
        "longest gap between answers {gap:?}:\n{}",
        describe_gap(&answers)
    );
    assert!(
        unanswered(&answers) < 100,
        "{} of 3000 requests unanswered",
        unanswered(&answers)
    );
    wait_active(&bed, "web", "master", Duration::from_secs(2));
    assert_eq!(bed.http_get_vip().unwrap(), "master");

    let text = metrics(&bed);
    for service in ["web", "echo"] {
        let there =
            format!("lb_failovers_total{{service=\"{service}\",from=\"master\",to=\"slave\"}}");
        let back =
            format!("lb_failovers_total{{service=\"{service}\",from=\"slave\",to=\"master\"}}");
        assert_eq!(sample(&text, &there), Some(1.0), "{there}\n{text}");
        assert_eq!(sample(&text, &back), Some(1.0), "{back}\n{text}");
        assert_eq!(
            sample(
                &text,
                &format!("lb_backend_active{{service=\"{service}\",backend=\"master\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("lb_backend_up{{service=\"{service}\",backend=\"slave\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("lb_flip_duration_seconds_count{{service=\"{service}\"}}")
            ),
            Some(2.0)
        );
    }
    let forward = sample(
        &text,
        "lb_packets_total{service=\"echo\",backend=\"slave\",direction=\"forward\"}",
    )
    .unwrap();
    let reverse = sample(
        &text,
        "lb_packets_total{service=\"echo\",backend=\"slave\",direction=\"reverse\"}",
    )
    .unwrap();
    assert!(
        forward > 0.0 && reverse > 0.0,
        "slave counters {forward} {reverse}"
    );
    assert!(
        sample(
            &text,
            "lb_xdp_actions_total{interface=\"c0\",action=\"redirect\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(sample(&text, "lb_health_checks_total{service=\"echo\",backend=\"master\",check=\"udp\",result=\"fail\"}").unwrap() > 0.0);
    assert!(
        text.contains("lb_health_check_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("lb_bytes_total{"), "{text}");

    // The exposition is valid for Prometheus' own checker.
    let file = bed.write_file("metrics.txt", &text).unwrap();
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "promtool check metrics: {report}");
}

#[test]
fn master_server_death_fails_over_with_its_link_up_and_fails_back_on_restart() {
    let mut bed = Testbed::new("lbfo-kill").expect("testbed");
    running(&mut bed, WEB_FAST, ECHO_FAST);

    let stream = bed.udp_stream(2500, Duration::from_millis(1)).unwrap();
    sleep(Duration::from_millis(700));
    bed.stop_udp_responder(Host::Master);
    bed.kill_web_server(Host::Master).unwrap();
    wait_active(&bed, "web", "slave", Duration::from_secs(2));
    assert_eq!(bed.http_get_vip().unwrap(), "slave");
    sleep(Duration::from_millis(300));
    bed.start_udp_responder(Host::Master, "master").unwrap();
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(answer_runs(&answers), ["master", "slave", "master"]);
    let gap = longest_gap(&answers);
    assert!(
        gap < GAP_BOUND,
        "longest gap between answers {gap:?}:\n{}",
        describe_gap(&answers)
    );

    bed.start_web_server(Host::Master, "master").unwrap();
    wait_active(&bed, "web", "master", Duration::from_secs(3));
    assert_eq!(bed.http_get_vip().unwrap(), "master");
    let status = status(&bed);
    assert!(
        status.contains("last change: slave -> master (master up: tcp check passed 3 times)"),
        "{status}"
    );
}

/// ICMP sockets open in the switch (ping sockets and raw ones): the agent's only.
fn icmp_sockets_in_switch(bed: &Testbed) -> usize {
    ["/proc/net/icmp", "/proc/net/raw"]
        .iter()
        .map(|table| {
            let (ok, out, err) = bed.output(Host::Switch, "cat", &[table]).unwrap();
            assert!(ok, "cat {table}: {err}");
            out.lines().skip(1).filter(|l| !l.trim().is_empty()).count()
        })
        .sum()
}

/// Whether `host` answers echo requests.
fn answer_pings(bed: &Testbed, host: Host, answer: bool) {
    let value = format!("net.ipv4.icmp_echo_ignore_all={}", u8::from(!answer));
    let (ok, _, err) = bed.output(host, "sysctl", &["-qw", &value]).unwrap();
    assert!(ok, "sysctl {value}: {err}");
}

#[test]
fn icmp_checks_share_one_socket_and_follow_a_backend_that_stops_answering() {
    let mut bed = Testbed::new("lbfo-icmp").expect("testbed");
    let icmp =
        r#"health = { checks = [{ type = "icmp" }], interval = "10ms", rise = 3, fall = 3 }"#;
    running(&mut bed, icmp, icmp);
    wait_active(&bed, "web", "master", Duration::from_secs(2));
    wait_active(&bed, "echo", "master", Duration::from_secs(2));
    // Four ICMP checks (two services, two backends), one socket.
    assert_eq!(icmp_sockets_in_switch(&bed), 1);

    // The master stops answering pings; its link and its servers stay up.
    answer_pings(&bed, Host::Master, false);
    wait_active(&bed, "web", "slave", Duration::from_secs(2));
    wait_active(&bed, "echo", "slave", Duration::from_secs(2));
    assert_eq!(bed.udp_request_vip("who").unwrap().0, "slave who");
    let text = metrics(&bed);
    for service in ["web", "echo"] {
        for (backend, up) in [("master", 0.0), ("slave", 1.0)] {
            assert_eq!(
                sample(
                    &text,
                    &format!("lb_backend_up{{service=\"{service}\",backend=\"{backend}\"}}")
                ),
                Some(up),
                "{service}/{backend}\n{text}"
            );
        }
    }

    answer_pings(&bed, Host::Master, true);
    wait_active(&bed, "web", "master", Duration::from_secs(2));
    wait_active(&bed, "echo", "master", Duration::from_secs(2));
    assert_eq!(bed.udp_request_vip("who").unwrap().0, "master who");
    assert_eq!(icmp_sockets_in_switch(&bed), 1);
}

#[test]
fn a_flapping_master_moves_traffic_once_each_way() {
    let mut bed = Testbed::new("lbfo-flap").expect("testbed");
    let slow_rise =
        r#"health = { checks = [{ type = "link" }], interval = "10ms", rise = 15, fall = 3 }"#;
    running(&mut bed, slow_rise, slow_rise);
    for _ in 0..8 {
        bed.set_link(Host::Master, false).unwrap();
        sleep(Duration::from_millis(25));
        bed.set_link(Host::Master, true).unwrap();
        sleep(Duration::from_millis(25));
    }
    wait_active(&bed, "echo", "master", Duration::from_secs(3));
    let text = metrics(&bed);
    for (from, to) in [("master", "slave"), ("slave", "master")] {
        let name = format!("lb_failovers_total{{service=\"echo\",from=\"{from}\",to=\"{to}\"}}");
        assert_eq!(
            sample(&text, &name),
            Some(1.0),
            "{name}: traffic must not follow the flapping\n{text}"
        );
    }
}

#[test]
fn every_backend_down_keeps_the_last_or_drops_as_configured() {
    let mut bed = Testbed::new("lbfo-alldown").expect("testbed");
    let link = r#"health = { checks = [{ type = "link" }], interval = "10ms" }"#;
    let link_drop = format!("{link}\non_all_down = \"drop\"");
    running(&mut bed, link, &link_drop);
    bed.set_link(Host::Master, false).unwrap();
    bed.set_link(Host::Slave, false).unwrap();
    wait_active(&bed, "echo", "none (dropping)", Duration::from_secs(2));
    assert_eq!(
        active_of(&bed, "web"),
        "slave",
        "keep-last keeps the last backend"
    );
    assert!(
        bed.udp_request_vip("anyone").is_err(),
        "a dropping service answers nothing"
    );
    let text = metrics(&bed);
    assert_eq!(
        sample(
            &text,
            "lb_failovers_total{service=\"echo\",from=\"slave\",to=\"none\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lb_backend_up{service=\"echo\",backend=\"master\"}"),
        Some(0.0)
    );

    bed.set_link(Host::Slave, true).unwrap();
    wait_active(&bed, "echo", "slave", Duration::from_secs(2));
    assert_eq!(bed.udp_request_vip("back").unwrap().0, "slave back");
    bed.set_link(Host::Master, true).unwrap();
    wait_active(&bed, "echo", "master", Duration::from_secs(2));
}

#[test]
fn three_backends_fail_over_in_priority_order_and_fail_back() {
    let mut bed = Testbed::with_backup("lbfo-three").expect("testbed");
    let link = r#"health = { checks = [{ type = "link" }], interval = "10ms" }"#;
    running(&mut bed, link, link);
    let stream = bed.udp_stream(2400, Duration::from_millis(1)).unwrap();
    sleep(Duration::from_millis(500));
    bed.set_link(Host::Master, false).unwrap();
    sleep(Duration::from_millis(500));
    bed.set_link(Host::Slave, false).unwrap();
    sleep(Duration::from_millis(500));
    bed.set_link(Host::Master, true).unwrap();
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(
        answer_runs(&answers),
        ["master", "slave", "backup", "master"]
    );
    assert!(
        longest_gap(&answers) < GAP_BOUND,
        "longest gap between answers {:?}:\n{}",
        longest_gap(&answers),
        describe_gap(&answers)
    );
}

#[test]
fn without_preempt_the_slave_keeps_the_traffic() {
    let mut bed = Testbed::new("lbfo-nopre").expect("testbed");
    let link = r#"health = { checks = [{ type = "link" }], interval = "10ms" }
preempt = false"#;
    running(&mut bed, link, link);
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, "echo", "slave", Duration::from_secs(2));
    bed.set_link(Host::Master, true).unwrap();
    sleep(Duration::from_millis(300));
    assert_eq!(active_of(&bed, "echo"), "slave");
    assert!(
        status(&bed).contains("master 198.18.2.2 via m0 priority 100: up"),
        "{}",
        status(&bed)
    );
}

#[test]
fn backend_mac_and_nic_are_resolved_and_an_unresolvable_backend_starts_down() {
    let mut bed = Testbed::new("lbfo-resolve").expect("testbed");
    let config = bed
        .config(LISTEN)
        .replace(", mac = \"02:00:00:00:02:02\", iface = \"m0\"", "")
        .replace(",  mac = \"02:00:00:00:03:02\",  iface = \"s0\"", "");
    let path = bed.write_file("lb.toml", &config).unwrap();
    let lb = lb_binary().unwrap();
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["check-config", path.to_str().unwrap()])
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("master 198.18.2.2 priority 100 via m0 to 02:00:00:00:02:02"),
        "{out}"
    );
    assert!(
        out.contains("slave 198.18.3.2 priority 50 via s0 to 02:00:00:00:03:02"),
        "{out}"
    );

    // A backend that does not answer ARP does not stop the agent: it starts down, and the
    // service is served by the others.
    bed.start_web_server(Host::Master, "master").unwrap();
    let nobody = config.replace("198.18.3.2", "198.18.3.77");
    let path = bed.write_file("nobody.toml", &nobody).unwrap();
    let agent = bed
        .start_lb(&["run", "--config", path.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(agent, LISTEN).unwrap();
    assert_eq!(bed.http_get_vip().unwrap(), "master");
    let (ok, status, err) = bed.output(Host::Switch, &lb, &["status"]).unwrap();
    assert!(ok, "{err}");
    assert!(
        status.contains("slave 198.18.3.77 via s0 priority 50: DOWN (no ARP answer at start)"),
        "{status}"
    );
    assert!(bed.processes[agent].terminate().unwrap());
}
