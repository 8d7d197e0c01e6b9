//! End to end, the dataplane outlives its agent: a client asks the VIP 10 000 times a
//! second while the agent is killed, stopped, restarted and replaced, and not one request
//! goes unanswered; a restarted agent adopts the pinned dataplane (connection table, active
//! backends, the operator's drains) and starts in bad weather.

use std::time::{Duration, Instant};

use lb_user::testbed::{
    topology::{lb_binary, unanswered, Testbed},
    Host,
};
use tests::{
    agent::{start_agent, wait_active},
    restarts::{
        assert_all_answered_by, config, flow_age, program_id, summary, testbed, HEALTH, LISTEN,
        PERIOD,
    },
};

#[test]
fn a_killed_agent_costs_no_request_while_dead_nor_when_restarted() {
    let (mut bed, _turn) = testbed("lblc-kill");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    // 4 s of requests: the agent is killed after 0.5 s, stays dead for 1 s, then a new one
    // starts and adopts the dataplane.
    let stream = bed.udp_stream(40_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    bed.processes[agent].kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        bed.switch_has_xdp().unwrap(),
        "the program left with the agent"
    );
    let before = program_id(&bed);
    let second = start_agent(&mut bed, &config(), LISTEN);
    assert_ne!(
        program_id(&bed),
        before,
        "the new agent did not swap its program in"
    );
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(unanswered(&answers), 0, "{}", summary(&answers));
    assert!(
        answers.iter().all(|a| a.by.as_deref() == Some("master")),
        "{}",
        summary(&answers)
    );

    let status = bed.agent_status(LISTEN).unwrap();
    assert!(status.interfaces.iter().all(|i| i.adopted), "{status:?}");
    assert!(bed.processes[second].terminate().unwrap());
}

#[test]
fn a_stopped_and_restarted_agent_costs_no_request_and_keeps_the_connection_table() {
    let (mut bed, _turn) = testbed("lblc-term");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    let lb = lb_binary().unwrap();
    let stream = bed.udp_stream(30_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (ok, before, err) = bed.output(Host::Switch, &lb, &["flows"]).unwrap();
    assert!(ok && before.contains("1 flows"), "{before}{err}");

    // Stop and start at once, as a service manager's restart does.
    assert!(bed.processes[agent].terminate().unwrap());
    let second = start_agent(&mut bed, &config(), LISTEN);
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(unanswered(&answers), 0, "{}", summary(&answers));

    // The client's flow is the one made before the restart (its age says so).
    assert!(flow_age(&bed) >= 3.0, "the flow was made anew");
    assert!(bed.processes[second].terminate().unwrap());
}

#[test]
fn a_restarted_agent_keeps_the_backend_in_use_and_checks_the_others_first() {
    let (mut bed, _turn) = testbed("lblc-keep");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    bed.processes[agent].kill();

    // The master comes back while no agent runs: a new agent must not send traffic to it
    // before its checks pass, nor move traffic off the slave at start.
    bed.set_link(Host::Master, true).unwrap();
    bed.stop_udp_responder(Host::Master);
    let stream = bed.udp_stream(20_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = start_agent(&mut bed, &config(), LISTEN);
    assert_all_answered_by(&stream.join().unwrap().unwrap(), "slave");
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = &status.services[0];
    assert_eq!(echo.active.as_deref(), Some("slave"));
    assert!(!echo.backends[0].up, "{:?}", echo.backends[0]);

    // Once the master answers its checks again, traffic fails back to it.
    bed.start_udp_responder(Host::Master, "master").unwrap();
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    assert_eq!(bed.udp_request_vip("back").unwrap().0, "master back");
    assert!(bed.processes[second].terminate().unwrap());
}

#[test]
fn a_drain_by_hand_outlives_the_agent_until_undrained() {
    let (mut bed, _turn) = testbed("lblc-drain");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    let lb = lb_binary().unwrap();
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["drain", "echo", "master"])
        .unwrap();
    assert!(ok && out.contains("master -> slave"), "{out}{err}");

    // Restarted, the agent finds the drain in the pinned maps: the master, healthy, gets
    // nothing, neither during the restart nor once its checks pass again.
    let stream = bed.udp_stream(20_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(bed.processes[agent].terminate().unwrap());
    let second = start_agent(&mut bed, &config(), LISTEN);
    assert_all_answered_by(&stream.join().unwrap().unwrap(), "slave");
    let status = bed.agent_status(LISTEN).unwrap();
    let master = &status.services[0].backends[0];
    assert!(master.drained && master.up, "{master:?}");
    assert_eq!(status.services[0].active.as_deref(), Some("slave"));

    // Undrained, it takes the traffic back, and a further restart keeps it undrained.
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["undrain", "echo", "master"])
        .unwrap();
    assert!(ok, "{out}{err}");
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    assert!(bed.processes[second].terminate().unwrap());
    let third = start_agent(&mut bed, &config(), LISTEN);
    let status = bed.agent_status(LISTEN).unwrap();
    assert!(!status.services[0].backends[0].drained, "{status:?}");
    assert_eq!(bed.udp_request_vip("back").unwrap().0, "master back");
    assert!(bed.processes[third].terminate().unwrap());
}

#[test]
fn an_agent_starts_while_a_backend_does_not_answer_arp_and_finds_it_later() {
    let (mut bed, _turn) = testbed("lblc-arp");
    // The slave's MAC is left to ARP, and the slave is unplugged.
    let config = config().replace(",  mac = \"02:00:00:00:03:02\"", "");
    bed.slave.ip(&["link", "set", "eth0", "down"]).unwrap();
    let agent = start_agent(&mut bed, &config, LISTEN);
    assert_eq!(bed.udp_request_vip("hi").unwrap().0, "master hi");
    let status = bed.agent_status(LISTEN).unwrap();
    let slave = &status.services[0].backends[1];
    assert!(!slave.up, "{slave:?}");
    assert!(slave.health_cause.contains("ARP"), "{slave:?}");

    // Plugged in, it answers ARP; with its MAC known it comes up and can take over.
    bed.slave.ip(&["link", "set", "eth0", "up"]).unwrap();
    // (A link down took the slave's default route with it.)
    bed.slave
        .ip(&["route", "replace", "default", "via", "198.18.3.1"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = bed.agent_status(LISTEN).unwrap();
        if status.services[0].backends[1].up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slave never came up: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    assert_eq!(bed.udp_request_vip("there").unwrap().0, "slave there");
    assert!(bed.processes[agent].terminate().unwrap());
}

#[test]
fn a_reload_adds_and_removes_services_without_disturbing_the_others() {
    let (mut bed, _turn) = testbed("lblc-reload");
    let with = |name: &str, port: u16| {
        format!(
            "{}{}",
            config(),
            Testbed::service_toml(name, "udp", port, HEALTH)
        )
    };
    let agent = start_agent(&mut bed, &with("old", 5354), LISTEN);
    let lb = lb_binary().unwrap();

    // `old` goes, `new` comes, while the client asks `echo` 10 000 times a second.
    let stream = bed.udp_stream(20_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    bed.write_file("lb.toml", &with("new", 5355)).unwrap();
    let (ok, out, err) = bed.output(Host::Switch, &lb, &["reload"]).unwrap();
    assert!(ok, "lb reload failed: {out}{err}");
    assert!(
        out.contains("added [new], removed [old], changed [], 1 unchanged"),
        "{out}"
    );
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(unanswered(&answers), 0, "{}", summary(&answers));
    let status = bed.agent_status(LISTEN).unwrap();
    let names: Vec<&str> = status.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["echo", "new"]);
    assert!(status.services[0].backends[0].up);

    // An invalid config is refused with its error, and nothing changes.
    let typo = with("new", 5355).replace("port = 5355", "port = 5355\nweigth = 2");
    bed.write_file("lb.toml", &typo).unwrap();
    let (ok, _, err) = bed.output(Host::Switch, &lb, &["reload"]).unwrap();
    assert!(!ok, "a config with a typo was applied");
    assert!(err.contains("unknown field `weigth`"), "{err}");
    let missing = with("new", 5355).replace("iface = \"s0\"", "iface = \"nosuch0\"");
    bed.write_file("lb.toml", &missing).unwrap();
    let (ok, _, err) = bed.output(Host::Switch, &lb, &["reload"]).unwrap();
    assert!(!ok, "a config naming a missing NIC was applied");
    assert!(err.contains("nosuch0"), "{err}");
    let unchanged = bed.agent_status(LISTEN).unwrap();
    let names: Vec<&str> = unchanged.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["echo", "new"]);
    assert_eq!(bed.udp_request_vip("still").unwrap().0, "master still");

    // SIGHUP reloads too.
    bed.write_file("lb.toml", &config()).unwrap();
    let pid = bed.processes[agent].pid().unwrap();
    // SAFETY: kill(2) on the pid of a child of this test that has not been reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.agent_status(LISTEN).unwrap().services.len() != 1 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(bed.processes[agent].is_running());
    assert!(bed.processes[agent].terminate().unwrap());
}

#[test]
fn a_reload_that_changes_a_services_checks_applies_them_at_once() {
    let (mut bed, _turn) = testbed("lblc-checks");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    let lb = lb_binary().unwrap();
    // Checks only the slave passes: the master's answers start with "master".
    let slave_only = config().replace(
        r#"send = "health" }"#,
        r#"send = "health", expect = "slave" }"#,
    );
    assert_ne!(slave_only, config());
    let reload = |bed: &mut Testbed, text: &str| {
        bed.write_file("lb.toml", text).unwrap();
        let (ok, out, err) = bed.output(Host::Switch, &lb, &["reload"]).unwrap();
        assert!(ok, "lb reload failed: {out}{err}");
        assert!(out.contains("changed [echo]"), "{out}");
    };
    let active = |bed: &Testbed| {
        let status = bed.agent_status(LISTEN).unwrap();
        status.services[0].active.clone()
    };
    let wait_for = |bed: &Testbed, backend: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while active(bed).as_deref() != Some(backend) {
            assert!(Instant::now() < deadline, "{backend} did not become active");
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    let stream = bed.udp_stream(30_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    reload(&mut bed, &slave_only);
    wait_for(&bed, "slave");
    let status = bed.agent_status(LISTEN).unwrap();
    let master = &status.services[0].backends[0];
    assert!(
        !master.up,
        "the master passes checks it cannot pass: {status:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    reload(&mut bed, &config());
    wait_for(&bed, "master");
    let answers = stream.join().unwrap().unwrap();
    assert_eq!(unanswered(&answers), 0, "{}", summary(&answers));
    assert_eq!(
        lb_user::testbed::topology::answer_runs(&answers),
        ["master", "slave", "master"],
        "{}",
        summary(&answers)
    );
    assert!(bed.processes[agent].terminate().unwrap());
}

#[test]
fn under_systemd_the_agent_notifies_ready_reloading_watchdog_and_stopping() {
    let (mut bed, _turn) = testbed("lblc-notify");
    let socket_path = bed.dir().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The next message that contains `what`, skipping others (watchdog pings).
    let expect = |what: &str| {
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no {what} within 10 s");
            let len = socket.recv(&mut buf).expect("a notification");
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            if text.lines().any(|l| l == what) {
                return text;
            }
        }
    };
    let path = bed.write_file("lb.toml", &config()).unwrap();
    let mut lb = bed.lb_command().unwrap();
    lb.args(["run", "--config", path.to_str().unwrap()]);
    // As systemd does: WATCHDOG_PID is the service's own pid (the shell's, which `exec`
    // hands on through nsenter to lb).
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(lb.get_program())
        .args(lb.get_args())
        .envs(lb.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000");
    bed.processes
        .push(lb_user::testbed::process::Process::spawn(command, "lb").unwrap());
    let agent = bed.processes.len() - 1;

    expect("READY=1");
    // Serving when it says so.
    assert_eq!(bed.udp_request_vip("up").unwrap().0, "master up");
    expect("WATCHDOG=1");
    expect("WATCHDOG=1");
    let pid = bed.processes[agent].pid().unwrap();
    // SAFETY: kill(2) on the pid of a child of this test that has not been reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let reloading = expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect("READY=1");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    expect("STOPPING=1");
    assert!(bed.processes[agent].terminate().is_ok());
}

/// The capabilities `deploy/lb.service` leaves the agent (its `CapabilityBoundingSet=`), as
/// setpriv(1) names them (`bpf`, `net_admin`, …).
fn unit_capabilities() -> Vec<String> {
    let unit = include_str!("../../deploy/lb.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("no CapabilityBoundingSet= in deploy/lb.service");
    line.split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// Starts `lb run` with `config` as root holding only `caps`, as the unit keeps it (the
/// bounding set, no new privileges), its log in `log`; returns its process index.
fn start_with_capabilities(bed: &mut Testbed, config: &str, caps: &[String], log: &str) -> usize {
    let path = bed.write_file("lb.toml", config).unwrap();
    let log = bed.write_file(log, "").unwrap();
    let mut lb = bed.lb_command().unwrap();
    lb.args(["run", "--config", path.to_str().unwrap()]);
    let set: Vec<String> = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|cap| format!("+{cap}")))
        .collect();
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--bounding-set", &set.join(","), "--no-new-privs", "--"])
        .arg(lb.get_program())
        .args(lb.get_args())
        .envs(lb.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stderr(std::fs::File::create(log).unwrap());
    bed.processes
        .push(lb_user::testbed::process::Process::spawn(command, "lb").unwrap());
    bed.processes.len() - 1
}

/// Capability sets of process `pid`: (effective, bounding), as `/proc/PID/status` gives them.
fn capability_sets(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let set = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    (set("CapEff:"), set("CapBnd:"))
}

#[test]
fn the_units_capabilities_are_all_the_agent_needs() {
    let (mut bed, _turn) = testbed("lblc-caps");
    let caps = unit_capabilities();
    assert!(caps.iter().any(|cap| cap == "bpf"), "{caps:?}");
    // With ICMP checks too, which need a raw socket.
    let config = config().replace(
        r#"{ type = "link" }, "#,
        r#"{ type = "link" }, { type = "icmp" }, "#,
    );
    assert_ne!(config, tests::restarts::config());
    let agent = start_with_capabilities(&mut bed, &config, &caps, "caps.log");
    bed.wait_for_agent(agent, LISTEN).unwrap();
    let pid = bed.processes[agent].pid().unwrap();
    let (effective, bounding) = capability_sets(pid);
    assert_eq!(bounding.count_ones() as usize, caps.len(), "{bounding:#x}");
    assert_eq!(effective, bounding, "{effective:#x}");

    // It serves, checks, reloads and stops for good with them.
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    let status = bed.agent_status(LISTEN).unwrap();
    assert!(
        status.services[0].backends.iter().all(|b| b.up),
        "{status:?}"
    );
    assert_eq!(bed.udp_request_vip("caps").unwrap().0, "master caps");
    let (ok, out, err) = bed
        .output(Host::Switch, &lb_binary().unwrap(), &["reload"])
        .unwrap();
    assert!(ok, "lb reload failed: {out}{err}");
    bed.stop_lb_for_good(agent).unwrap();

    // Without CAP_NET_RAW it cannot open the ICMP checks' socket: it says so, exits, and
    // leaves nothing.
    let fewer: Vec<String> = caps.into_iter().filter(|cap| cap != "net_raw").collect();
    let agent = start_with_capabilities(&mut bed, &config, &fewer, "fewer.log");
    let exit = bed.processes[agent]
        .wait_exit(Duration::from_secs(10))
        .unwrap();
    assert!(!exit.success(), "the agent ran without CAP_NET_RAW");
    let log = std::fs::read_to_string(bed.dir().join("fewer.log")).unwrap();
    assert!(log.contains("cannot open the ICMP socket"), "{log}");
    let (_, links, _) = bed.output(Host::Switch, "ip", &["link"]).unwrap();
    assert!(!links.contains("xdp"), "{links}");
    assert!(!bed.pin_path().exists(), "pins left behind");
}

#[test]
fn tcp_checks_every_millisecond_leave_no_time_wait_behind() {
    let (mut bed, _turn) = testbed("lblc-twait");
    bed.start_tcp_responder(Host::Master, "master").unwrap();
    bed.start_tcp_responder(Host::Slave, "slave").unwrap();
    let health = r#"{ checks = [{ type = "tcp" }], interval = "1ms", timeout = "50ms", rise = 3, fall = 3 }"#;
    let config = format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("web", "tcp", lb_user::testbed::topology::TCP_PORT, health)
    );
    let agent = start_agent(&mut bed, &config, LISTEN);
    let waiting = |host| {
        let (_, out, _) = bed
            .output(host, "ss", &["-Htan", "state", "time-wait"])
            .unwrap();
        out.lines().count()
    };
    // 60 s, as long as a normal close leaves a socket in TIME_WAIT: about 2 × 60 000
    // probes, each of which would still be waiting at the end.
    let mut most = (0, 0);
    for _ in 0..12 {
        std::thread::sleep(Duration::from_secs(5));
        let (switch, master) = (waiting(Host::Switch), waiting(Host::Master));
        most = (most.0.max(switch), most.1.max(master));
    }
    let status = bed.agent_status(LISTEN).unwrap();
    assert!(
        status.services[0].backends.iter().all(|b| b.up),
        "{status:?}"
    );
    assert!(
        status.services[0].backends.iter().all(|b| b
            .checks
            .iter()
            .all(|c| c.ok == Some(true) && c.ago_ms.is_some_and(|ago| ago < 1_000.0))),
        "a check's last result is not a fresh pass: {status:?}"
    );
    assert!(
        most.0 < 50 && most.1 < 50,
        "TIME_WAIT at most: switch {}, master {}",
        most.0,
        most.1
    );
    assert!(bed.processes[agent].terminate().unwrap());
}
