//! End to end: real hosts in network namespaces, the real `lb` binary attaching the real
//! program natively to the switch's NICs, real TCP (HTTP), UDP and ICMP through the VIP.

use lb_user::testbed::{
    topology::{lb_binary, MASTER_IP, UDP_PORT, VIP},
    Host, Testbed,
};

const LISTEN: &str = "127.0.0.1:9100";

#[test]
fn http_udp_and_ping_reach_the_master_through_the_vip_and_follow_a_flip() {
    let mut bed = Testbed::new("lbe2e-flip").expect("testbed");
    bed.start_web_server(Host::Master, "master").unwrap();
    bed.start_web_server(Host::Slave, "slave").unwrap();
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    let config = bed.write_file("lb.toml", &bed.config(LISTEN)).unwrap();
    let agent = bed
        .start_lb(&["run", "--config", config.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(agent, LISTEN).unwrap();

    // TCP: a real HTTP GET of the VIP lands on the master (the handshake only completes
    // because the master's replies are rewritten to come from the VIP).
    assert_eq!(bed.http_get_vip().unwrap(), "master");

    // UDP request/response: answered by the master, seen by the client as from the VIP.
    let (answer, from) = bed.udp_request_vip("hello").unwrap();
    assert_eq!(answer, "master hello");
    assert_eq!(from, std::net::SocketAddrV4::new(VIP, UDP_PORT));

    // ICMP echo to the VIP.
    let vip = VIP.to_string();
    let (ok, out, err) = bed
        .output(
            Host::Client,
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", &vip],
        )
        .unwrap();
    assert!(ok, "ping of the VIP failed: {out}{err}");

    // The client only ever learnt the switch's MAC for the VIP, never a backend address.
    let (_, neigh, _) = bed
        .output(Host::Client, "ip", &["neigh", "show", &vip])
        .unwrap();
    assert!(
        neigh.contains("02:00:00:00:01:01"),
        "VIP resolved to {neigh}"
    );
    let (_, neigh, _) = bed.output(Host::Client, "ip", &["neigh", "show"]).unwrap();
    assert!(
        !neigh.contains(&MASTER_IP.to_string()),
        "client saw the master: {neigh}"
    );

    // Flip the web service by hand: new requests go to the slave, the UDP service stays.
    let lb = lb_binary().unwrap();
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["activate", "web", "slave"])
        .unwrap();
    assert!(ok, "lb activate failed: {out}{err}");
    assert!(out.contains("master -> slave"), "{out}");
    for _ in 0..3 {
        assert_eq!(bed.http_get_vip().unwrap(), "slave");
    }
    assert_eq!(bed.udp_request_vip("again").unwrap().0, "master again");

    // `lb status` reports it.
    let (ok, status, err) = bed.output(Host::Switch, &lb, &["status"]).unwrap();
    assert!(ok, "{err}");
    assert!(
        status.contains("service web vip 198.18.1.100 tcp/80: active slave"),
        "{status}"
    );
    assert!(
        status.contains("last change: master -> slave (manual activation)"),
        "{status}"
    );
    // Each backend's checks: the last result and when.
    let checks: Vec<&str> = status
        .lines()
        .filter(|l| l.trim_start().starts_with("checks: "))
        .collect();
    assert!(
        checks.len() >= 2
            && checks
                .iter()
                .all(|l| l.contains(" ok ") && l.contains(" ms ago") && !l.contains("FAILED")),
        "{status}"
    );

    // Once every check has passed `rise` times, no backend is said to be starting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, status, _) = bed.output(Host::Switch, &lb, &["status"]).unwrap();
        if !status.contains("(starting)") {
            assert!(status.contains("(every check passed 3 times)"), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still starting after 5 s of passing checks:\n{status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // And back.
    let (ok, _, err) = bed
        .output(Host::Switch, &lb, &["activate", "web", "master"])
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(bed.http_get_vip().unwrap(), "master");

    // An unknown backend is refused with a clear message.
    let (ok, _, err) = bed
        .output(Host::Switch, &lb, &["activate", "web", "nobody"])
        .unwrap();
    assert!(!ok);
    assert!(err.contains("has no backend \"nobody\""), "{err}");

    // Actions go through the control socket only: root's alone; the HTTP endpoint reads.
    let url = format!("http://{LISTEN}/services/web/activate/slave");
    let (_, code, _) = bed
        .output(
            Host::Switch,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &url,
            ],
        )
        .unwrap();
    assert_eq!(code, "404", "an action was taken over HTTP");
    let mode = std::fs::metadata(bed.control_socket())
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let healthz = format!("http://{LISTEN}/healthz");
    let (ok, body, _) = bed
        .output(Host::Switch, "curl", &["-sf", &healthz])
        .unwrap();
    assert!(ok && body == "ok\n", "{body}");

    // SIGTERM: the agent exits cleanly; the dataplane forwards on without it.
    assert!(bed.switch_has_xdp().unwrap());
    assert!(
        bed.processes[agent].terminate().unwrap(),
        "lb did not exit successfully"
    );
    assert!(
        bed.switch_has_xdp().unwrap(),
        "the program left with the agent"
    );
    assert_eq!(bed.http_get_vip().unwrap(), "master");
    assert_eq!(bed.udp_request_vip("alone").unwrap().0, "master alone");

    // `lb down` removes it for good: no attachment, no pin.
    let (ok, out, err) = bed.output(Host::Switch, &lb, &["down"]).unwrap();
    assert!(ok, "lb down failed: {out}{err}");
    assert!(out.contains("detached from c0"), "{out}");
    assert!(
        !bed.switch_has_xdp().unwrap(),
        "an XDP program was left attached"
    );
    assert!(!bed.pin_path().exists(), "pins left behind");
    assert!(bed.http_get_vip().is_err(), "the VIP still answers");
}

#[test]
fn a_second_agent_on_the_same_nics_is_refused() {
    let mut bed = Testbed::new("lbe2e-twice").expect("testbed");
    bed.start_web_server(Host::Master, "master").unwrap();
    let config = bed.write_file("lb.toml", &bed.config(LISTEN)).unwrap();
    let first = bed
        .start_lb(&["run", "--config", config.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(first, LISTEN).unwrap();

    let second = bed
        .write_file("lb2.toml", &bed.config("127.0.0.1:9101"))
        .unwrap();
    let lb = lb_binary().unwrap();
    // `lb run` of the second config, with these environment settings.
    let run_second = |env: &[&str]| {
        let mut args: Vec<&str> = env.to_vec();
        args.extend(["timeout", "20", &lb, "run", "--config"]);
        args.push(second.to_str().unwrap());
        let (ok, _, err) = bed.output(Host::Switch, "env", &args).unwrap();
        assert!(!ok, "a second agent started: {args:?}");
        err
    };
    let other_socket = "LB_SOCKET=/run/lb/lbe2e-twice-other.sock";
    let other_pins = "LB_PIN_PATH=/sys/fs/bpf/lbe2e-twice-other";
    // Same control socket, same pin directory, and then other ones: each is refused.
    let err = run_second(&[]);
    assert!(
        err.contains("another lb agent listens on control socket"),
        "{err}"
    );
    let err = run_second(&[other_socket]);
    assert!(err.contains("another lb agent uses pin directory"), "{err}");
    let err = run_second(&[other_socket, other_pins]);
    assert!(err.contains("already carries an XDP program"), "{err}");
    assert!(!std::path::Path::new("/run/lb/lbe2e-twice-other.sock").exists());
    let (ok, _, err) = bed
        .output(
            Host::Switch,
            "env",
            &["LB_PIN_PATH=/sys/fs/bpf/lbe2e-twice-other", &lb, "down"],
        )
        .unwrap();
    assert!(ok, "{err}");
    assert!(!std::path::Path::new("/sys/fs/bpf/lbe2e-twice-other").exists());

    // `lb down` that cannot reach the running agent is refused: the pins are not taken
    // from under it, and the first agent is unharmed.
    let (ok, _, err) = bed
        .output(Host::Switch, "env", &[other_socket, &lb, "down"])
        .unwrap();
    assert!(!ok, "lb down removed a running agent's dataplane");
    assert!(err.contains("an lb agent runs on pin directory"), "{err}");
    assert_eq!(bed.http_get_vip().unwrap(), "master");
    assert!(bed.processes[first].terminate().unwrap());
    assert!(bed.output(Host::Switch, &lb, &["down"]).unwrap().0);
    assert!(!bed.switch_has_xdp().unwrap());
}

#[test]
fn lb_down_stops_a_running_agent_for_good_in_one_command() {
    let mut bed = Testbed::new("lbe2e-down").expect("testbed");
    bed.start_web_server(Host::Master, "master").unwrap();
    let config = bed.write_file("lb.toml", &bed.config(LISTEN)).unwrap();
    // The agent's log goes to a file, as under a service manager.
    let log_path = bed.write_file("lb.log", "").unwrap();
    let mut run = bed.lb_command().unwrap();
    run.args(["run", "--config", config.to_str().unwrap()])
        .stderr(std::fs::File::create(&log_path).unwrap());
    bed.processes
        .push(lb_user::testbed::process::Process::spawn(run, "lb").unwrap());
    let agent = bed.processes.len() - 1;
    bed.wait_for_agent(agent, LISTEN).unwrap();
    assert_eq!(bed.http_get_vip().unwrap(), "master");

    let lb = lb_binary().unwrap();
    let (ok, out, err) = bed.output(Host::Switch, &lb, &["down"]).unwrap();
    assert!(ok, "lb down failed: {out}{err}");
    assert!(out.contains("detached from c0"), "{out}");
    // The agent exits with the status a service manager does not restart.
    let status = bed.processes[agent]
        .wait_exit(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        status.code(),
        Some(lb_user::agent::EXIT_TAKEN_DOWN),
        "the agent exited with {status}"
    );
    assert!(
        !bed.switch_has_xdp().unwrap(),
        "an XDP program was left attached"
    );
    assert!(!bed.pin_path().exists(), "pins left behind");
    assert!(
        !bed.control_socket().exists(),
        "the control socket was left behind"
    );
    assert!(bed.http_get_vip().is_err(), "the VIP still answers");
    // Nothing is left to remove.
    let (ok, out, err) = bed.output(Host::Switch, &lb, &["down"]).unwrap();
    assert!(ok && out.starts_with("nothing pinned"), "{out}{err}");
    // A log that is not a terminal is plain text.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("lb down: stopping"), "{log}");
    assert!(
        !log.contains(''),
        "ANSI escape codes in the log file:
{log}"
    );
}

#[test]
fn a_missing_interface_is_a_clear_error_and_leaves_nothing_attached() {
    let mut bed = Testbed::new("lbe2e-noif").expect("testbed");
    let config = bed
        .config(LISTEN)
        .replace("iface = \"s0\"", "iface = \"nosuch0\"");
    let config = bed.write_file("lb.toml", &config).unwrap();
    let lb = lb_binary().unwrap();
    let (ok, _, err) = bed
        .output(
            Host::Switch,
            "timeout",
            &["20", &lb, "run", "--config", config.to_str().unwrap()],
        )
        .unwrap();
    assert!(!ok);
    assert!(
        err.contains("network interface \"nosuch0\" does not exist"),
        "{err}"
    );
    assert!(!bed.switch_has_xdp().unwrap());
    assert!(!bed.pin_path().exists(), "pins made before the error");

    let (ok, _, err) = bed
        .output(
            Host::Switch,
            &lb,
            &["check-config", config.to_str().unwrap()],
        )
        .unwrap();
    assert!(!ok);
    assert!(err.contains("nosuch0"), "{err}");
}

#[test]
fn healthz_is_not_ok_when_an_attachment_is_gone() {
    let mut bed = Testbed::new("lbe2e-health").expect("testbed");
    let config = bed.write_file("lb.toml", &bed.config(LISTEN)).unwrap();
    let agent = bed
        .start_lb(&["run", "--config", config.to_str().unwrap()])
        .unwrap();
    bed.wait_for_agent(agent, LISTEN).unwrap();
    let healthz = format!("http://{LISTEN}/healthz");
    let check = || {
        let (_, out, _) = bed
            .output(
                Host::Switch,
                "curl",
                &["-s", "-w", " %{http_code}", &healthz],
            )
            .unwrap();
        out
    };
    assert_eq!(check(), "ok\n 200");
    // The slave's port goes away, and the program with it.
    bed.switch.ip(&["link", "del", "s0"]).unwrap();
    let out = check();
    assert!(out.ends_with(" 503"), "{out}");
    assert!(out.contains("s0"), "{out}");
    assert!(bed.processes[agent].terminate().unwrap());
}
