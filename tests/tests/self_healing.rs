//! End to end, the agent keeps up with a network that changes under it: a backend that
//! comes back with a new MAC gets its traffic at once, a NIC deleted and made again is
//! served again, and events the kernel had to drop (a netlink overrun) leave no stale state.

use std::time::{Duration, Instant};

use lb_user::testbed::{
    topology::{answer_runs, describe_unanswered, unanswered, Testbed, MASTER_MAC, UDP_PORT},
    Host,
};
use tests::agent::{metrics, sample, start_agent, wait_active};

const LISTEN: &str = "127.0.0.1:9100";
/// 10 000 requests per second.
const PERIOD: Duration = Duration::from_micros(100);
const HEALTH: &str = r#"{ checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms", rise = 3, fall = 3 }"#;
/// Carrier only: nothing but link events can move the service.
const LINK_ONLY: &str =
    r#"{ checks = [{ type = "link" }], interval = "10ms", rise = 1, fall = 1 }"#;

fn config(health: &str) -> String {
    format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, health)
    )
}

fn testbed(name: &str) -> Testbed {
    let mut bed = Testbed::new(name).expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    bed
}

#[test]
fn a_backend_with_a_new_mac_gets_its_traffic_at_once() {
    let mut bed = testbed("lbsh-mac");
    // The master's MAC is learnt from the neighbour table, not fixed in the config.
    let text = config(HEALTH).replacen(&format!("mac = \"{MASTER_MAC}\", "), "", 1);
    assert!(!text.contains(MASTER_MAC));
    let agent = start_agent(&mut bed, &text, LISTEN);
    std::thread::sleep(Duration::from_millis(1500));

    // The master's machine is replaced: same address, new MAC, announced with a
    // gratuitous ARP as the kernel sends one on a MAC change (`arp_notify`).
    let stream = bed.udp_stream(10_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    bed.master
        .exec("sysctl", &["-qw", "net.ipv4.conf.eth0.arp_notify=1"])
        .unwrap();
    bed.master
        .ip(&["link", "set", "eth0", "address", "02:00:00:00:02:99"])
        .unwrap();
    let changed = Instant::now();
    let answers = stream.join().unwrap().unwrap();

    // Every request sent a check interval after the change is answered by the master.
    let late: Vec<_> = answers
        .iter()
        .filter(|a| a.sent > changed + Duration::from_millis(10))
        .collect();
    assert!(
        late.len() > 5_000,
        "{} requests after the change",
        late.len()
    );
    let lost = late.iter().filter(|a| a.received.is_none()).count();
    assert_eq!(lost, 0, "{lost} requests lost after the MAC change");
    assert!(late.iter().all(|a| a.by.as_deref() == Some("master")));
    assert!(
        unanswered(&answers) < 200,
        "{} requests lost",
        unanswered(&answers)
    );

    let status = bed.agent_status(LISTEN).unwrap();
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    assert_eq!(echo.active.as_deref(), Some("master"), "{status:?}");
    assert!(bed.processes[agent].terminate().unwrap());
}

#[test]
fn a_nic_made_again_is_attached_again_and_serves() {
    let mut bed = testbed("lbsh-nic");
    let agent = start_agent(&mut bed, &config(HEALTH), LISTEN);

    // The slave's NIC goes and comes back (a driver reload): a new interface index, no
    // program on it.
    bed.remake_port(Host::Slave).unwrap();
    bed.stop_udp_responder(Host::Slave);
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text, _) = bed
            .output(Host::Switch, "ip", &["link", "show", "s0"])
            .unwrap();
        if text.contains("prog/xdp") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "s0 is not attached again: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then healthy through it: the kernel reports a new NIC's carrier up to a second late
    // (linkwatch), and the link check waits for it.
    let slave_up = |bed: &Testbed| {
        bed.agent_status(LISTEN).unwrap().services[0]
            .backends
            .iter()
            .any(|b| b.name == "slave" && b.up)
    };
    while !slave_up(&bed) {
        assert!(
            Instant::now() < deadline,
            "the slave is not healthy through its new NIC"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The slave, reached through the new NIC, takes over when the master goes.
    let stream = bed.udp_stream(10_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    let answers = stream.join().unwrap().unwrap();
    let tail = &answers[answers.len() - 2_000..];
    assert!(
        tail.iter().all(|a| a.by.as_deref() == Some("slave")),
        "the slave does not answer through its new NIC: {} of the last 2000 unanswered ({}; {})",
        unanswered(tail),
        describe_unanswered(&answers),
        answer_runs(&answers).join(", ")
    );
    let status = bed.agent_status(LISTEN).unwrap();
    assert!(
        status.interfaces.iter().any(|i| i.name == "s0"),
        "{status:?}"
    );
    assert!(bed.processes[agent].terminate().unwrap());
}

/// Runs one `ip -batch` in the switch: 150 veth pairs made, `port` set up or down, 150
/// more made and set up (about 1 000 link events around one carrier change); the pairs
/// are numbered from `first`.
fn burst(bed: &mut Testbed, first: usize, port: &str, up: bool) {
    let pair = |n: usize| format!("link add lbd{n}a type veth peer name lbd{n}b\n");
    let mut lines: String = (first..first + 150).map(pair).collect();
    let state = if up { "up" } else { "down" };
    lines.push_str(&format!("link set {port} {state}\n"));
    for n in first + 150..first + 300 {
        lines.push_str(&pair(n));
        lines.push_str(&format!("link set lbd{n}a up\nlink set lbd{n}b up\n"));
    }
    let path = bed.write_file(&format!("burst-{first}"), &lines).unwrap();
    bed.switch.ip(&["-batch", path.to_str().unwrap()]).unwrap();
}

#[test]
fn events_lost_in_an_overrun_are_read_again() {
    let mut bed = testbed("lbsh-overrun");
    // A receive buffer a burst of link events overflows.
    let path = bed.write_file("lb.toml", &config(LINK_ONLY)).unwrap();
    let mut command = bed.lb_command().unwrap();
    command
        .env("LB_NETLINK_RCVBUF", "4096")
        .args(["run", "--config", path.to_str().unwrap()]);
    bed.processes
        .push(lb_user::testbed::process::Process::spawn(command, "lb").unwrap());
    let agent = bed.processes.len() - 1;
    bed.wait_for_agent(agent, LISTEN).unwrap();

    // The master's carrier goes in the middle of a thousand link events while the agent
    // is not scheduled (stopped), so that the buffer overflows and that event is lost: with
    // link checks only, only the re-read after the overrun can move the service.
    let pid = bed.processes[agent].pid().unwrap().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name} {pid}");
    };
    signal("-STOP");
    burst(&mut bed, 0, "m0", false);
    signal("-CONT");
    wait_active(&bed, LISTEN, "echo", "slave").unwrap();
    signal("-STOP");
    burst(&mut bed, 300, "m0", true);
    signal("-CONT");
    wait_active(&bed, LISTEN, "echo", "master").unwrap();
    let text = metrics(&bed, LISTEN);
    assert!(
        sample(&text, "lb_netlink_resyncs_total").unwrap_or(0.0) >= 2.0,
        "no overrun was seen: {}",
        text.lines()
            .filter(|l| l.contains("netlink"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (answer, _) = bed.udp_request_vip("seq 0").unwrap();
    assert!(answer.starts_with("master"), "{answer}");
    assert!(bed.processes[agent].terminate().unwrap());
}
