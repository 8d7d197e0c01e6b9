//! Pair mode: the standby host serves nothing of the VIPs (no ARP answer, no forwarding,
//! no reply rewritten, every frame counted) while it keeps its connection table; keepalived's
//! notify script (`lb notify`) and `lb role` move the role, which is pinned with the
//! dataplane; becoming active announces the VIPs with gratuitous ARP. The agents stream
//! their connection tables over the pair link, so that the standby carries the active
//! host's flows on after a takeover; both hosts active is reported as a split brain.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use lb_common::{flow_state, proto, Direction, Flow, FlowKey};

use lb_user::{
    config::HostRole,
    pair::sync::parse_report,
    testbed::{
        tcp_responder::LineClient,
        topology::{
            describe_gap, describe_unanswered, longest_gap, unanswered, Testbed, TCP_PORT,
            UDP_PORT, VIP as TESTBED_VIP,
        },
        Host,
    },
};
use tests::{
    agent::{metrics, metrics_on, sample, start_agent},
    bench::pair::{start_pair, NotifyMode},
    rig::*,
    testrun::{
        BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
};

const LISTEN: &str = "127.0.0.1:9100";
/// Another host's MAC on the client segment.
const CLIENT_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
const HEALTH: &str =
    r#"{ checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms" }"#;

#[test]
fn the_standby_serves_nothing_of_the_vips_and_keeps_its_flows() {
    with_rig("lbt-pair-standby", |b| {
        let syn = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        let reply = tcp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 80, 40_000);
        let (action, sent) = b.run(b.client_if, &syn)?;
        assert_eq!(action, XDP_REDIRECT);
        let other = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_001, 80);
        // The master's "fragmentation needed" about the packet `about` (a frame).
        let frag_needed = |about: &[u8]| {
            let kind =
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                });
            icmp_error(
                (MASTER_MAC, BACKEND_IF_MAC),
                MASTER,
                CLIENT,
                kind,
                &about[14..],
            )
        };
        let traffic = |b: &Rig| -> anyhow::Result<(u64, u64)> {
            Ok((
                b.maps.traffic_of(0, Direction::Forward)?.packets,
                b.maps.traffic_of(0, Direction::Reverse)?.packets,
            ))
        };
        let (flows, counted) = (b.flows(), traffic(b)?);

        b.maps.set_role(HostRole::Standby)?;
        // What the active host would serve: dropped, untouched, counted, nothing learned.
        let served = [
            ("a known flow's packet", b.client_if, syn.clone()),
            ("a new flow's packet", b.client_if, other.clone()),
            ("the backend's reply", b.backend_if, reply.clone()),
            (
                "a reply from another MAC",
                b.backend_if,
                tcp(SLAVE_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 80, 40_000),
            ),
            (
                "an ICMP error about the flow",
                b.backend_if,
                frag_needed(&sent),
            ),
        ];
        for (what, ifindex, frame) in &served {
            assert_eq!(b.run(*ifindex, frame)?, (XDP_DROP, frame.clone()), "{what}");
        }
        // An ARP request for the VIP: to the kernel unanswered, counted.
        let arp = arp_request(CLIENT_MAC, CLIENT, VIP);
        assert_eq!(b.run(b.client_if, &arp)?, (XDP_PASS, arp.clone()), "ARP");
        assert_eq!(b.event("standby")?, served.len() as u64 + 1);
        // What the active host would not serve either: to the kernel untouched, not counted
        // as standby.
        let mut bad_checksum = other.clone();
        bad_checksum[24] ^= 0xff;
        let untouched = [
            (
                "a gratuitous ARP for the VIP",
                b.client_if,
                arp_request(CLIENT_MAC, VIP, VIP),
            ),
            (
                "traffic to another address",
                b.client_if,
                tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, OTHER, 40_000, 80),
            ),
            (
                "a packet to the VIP with a bad IP checksum",
                b.client_if,
                bad_checksum,
            ),
            (
                "an ICMP error about no flow",
                b.backend_if,
                frag_needed(&other),
            ),
        ];
        let unparsable = b.event("unparsable")?;
        for (what, ifindex, frame) in &untouched {
            assert_eq!(b.run(*ifindex, frame)?, (XDP_PASS, frame.clone()), "{what}");
        }
        assert_eq!(b.event("standby")?, served.len() as u64 + 1);
        assert_eq!(b.event("unparsable")?, unparsable + 1, "the bad checksum");
        // The table and the counters are as the active host left them.
        assert_eq!(b.flows(), flows);
        assert_eq!(traffic(b)?, counted);

        b.maps.set_role(HostRole::Active)?;
        assert_eq!(b.run(b.client_if, &syn)?.0, XDP_REDIRECT);
        assert_eq!(b.run(b.backend_if, &reply)?.0, XDP_REDIRECT);
        assert_eq!(b.event("standby")?, served.len() as u64 + 1);
        Ok(())
    })
}

fn pair_config() -> String {
    format!(
        "{}{}\n[pair]\ngratuitous_arps = 2\ngratuitous_arp_interval = \"50ms\"\n",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH)
    )
}

/// Runs `lb ARGS…` on the switch: (success, stdout, stderr).
fn lb(bed: &Testbed, args: &[&str]) -> (bool, String, String) {
    lb_on(bed, Host::Switch, args)
}

fn role(bed: &Testbed) -> Option<HostRole> {
    bed.agent_status(LISTEN).unwrap().role
}

/// Whether a UDP request to the VIP is answered by the master.
fn served(bed: &Testbed) -> bool {
    matches!(bed.udp_request_vip("pair"), Ok((answer, _)) if answer == "master pair")
}

/// The MAC the client's ARP cache has for the VIP, if any.
fn client_neighbour(bed: &Testbed) -> Option<String> {
    let (_, text, _) = bed
        .output(
            Host::Client,
            "ip",
            &["neigh", "show", &TESTBED_VIP.to_string(), "dev", "eth0"],
        )
        .unwrap();
    text.split("lladdr ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

fn switch_mac(bed: &Testbed, dev: &str) -> String {
    let (_, text, _) = bed
        .output(Host::Switch, "ip", &["-o", "link", "show", dev])
        .unwrap();
    text.split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC for {dev}: {text}"))
        .to_string()
}

/// Stops the agent started as process `agent` (SIGTERM: the dataplane stays) and starts a
/// new one with the pair config; returns its process index.
fn restart(bed: &mut Testbed, agent: usize) -> usize {
    let mut old = bed.processes.remove(agent);
    assert!(old.terminate().unwrap(), "lb did not exit cleanly");
    start_agent(bed, &pair_config(), LISTEN)
}

#[test]
fn keepalived_moves_the_role_the_new_active_announces_the_vips_and_a_restart_keeps_it() {
    let mut bed = Testbed::new("lbpr-role").expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    let agent = start_agent(&mut bed, &pair_config(), LISTEN);

    // A pair's host starts standby: the VIP is not answered, and that is counted.
    assert_eq!(role(&bed), Some(HostRole::Standby));
    assert!(!served(&bed), "a standby host served the VIP");
    let text = metrics(&bed, LISTEN);
    assert!(
        sample(&text, "lb_dataplane_events_total{event=\"standby\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "lb_host_role{role=\"standby\"}"), Some(1.0));

    // keepalived becomes MASTER: the client learns the VIP from the gratuitous ARP alone
    // (it accepts unsolicited ARP, and its cache was emptied), then is served.
    bed.output(
        Host::Client,
        "sysctl",
        &["-qw", "net.ipv4.conf.eth0.arp_accept=1"],
    )
    .unwrap();
    bed.output(Host::Client, "ip", &["neigh", "flush", "dev", "eth0"])
        .unwrap();
    let (ok, out, err) = lb(&bed, &["notify", "INSTANCE", "VI_LB", "MASTER", "150"]);
    assert!(ok, "lb notify MASTER failed: {out}{err}");
    assert!(out.contains("active"), "{out}");
    let mac = switch_mac(&bed, "c0");
    let deadline = Instant::now() + Duration::from_secs(2);
    while client_neighbour(&bed).as_deref() != Some(mac.as_str()) {
        assert!(
            Instant::now() < deadline,
            "no gratuitous ARP for the VIP reached the client ({}; the client has {:?}, not {mac})",
            out.trim(),
            client_neighbour(&bed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(role(&bed), Some(HostRole::Active));
    assert!(served(&bed), "the active host did not serve the VIP");

    // BACKUP (and FAULT, STOP) make it standby again; an unknown state is refused.
    let (ok, out, err) = lb(&bed, &["notify", "INSTANCE", "VI_LB", "BACKUP", "150"]);
    assert!(ok, "lb notify BACKUP failed: {out}{err}");
    assert!(!served(&bed), "a standby host served the VIP");
    let (ok, _, err) = lb(&bed, &["notify", "INSTANCE", "VI_LB", "PRIMARY", "150"]);
    assert!(!ok && err.contains("unknown keepalived state"), "{err}");
    assert_eq!(role(&bed), Some(HostRole::Standby));

    // The role is the dataplane's: a restarted agent keeps it, whatever initial_role says.
    let agent = restart(&mut bed, agent);
    assert_eq!(role(&bed), Some(HostRole::Standby));
    let (ok, out, err) = lb(&bed, &["role", "active"]);
    assert!(ok, "lb role active failed: {out}{err}");
    assert!(served(&bed), "the active host did not serve the VIP");
    let agent = restart(&mut bed, agent);
    assert_eq!(role(&bed), Some(HostRole::Active));
    assert!(
        served(&bed),
        "the restarted active host did not serve the VIP"
    );

    // keepalived notifies once: a change that comes while the agent is down (restarting)
    // waits for it, and is applied when it is back.
    let mut stopped = bed.processes.remove(agent);
    assert!(stopped.terminate().unwrap(), "lb did not exit cleanly");
    let mut notify = bed
        .lb_command()
        .unwrap()
        .args(["notify", "INSTANCE", "VI_LB", "BACKUP", "150"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let agent = start_agent(&mut bed, &pair_config(), LISTEN);
    assert!(notify.wait().unwrap().success(), "lb notify gave up");
    assert_eq!(role(&bed), Some(HostRole::Standby));
    assert!(!served(&bed), "a standby host served the VIP");
    bed.stop_lb_for_good(agent).unwrap();
}

#[test]
fn a_host_not_in_a_pair_always_serves_and_refuses_to_stand_by() {
    let mut bed = Testbed::new("lbpr-solo").expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    let config = format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH)
    );
    let agent = start_agent(&mut bed, &config, LISTEN);
    assert_eq!(role(&bed), Some(HostRole::Active));
    let (ok, _, err) = lb(&bed, &["role", "standby"]);
    assert!(!ok && err.contains("not in pair mode"), "{err}");
    assert!(served(&bed), "a host not in a pair stopped serving");
    bed.stop_lb_for_good(agent).unwrap();
}

/// Both switch hosts with keepalived at 10 ms adverts telling `lb` by `mode`; the active
/// switch host loses every link under a stream of requests, and the peer takes over.
fn takeover(prefix: &str, mode: NotifyMode) {
    let mut bed = Testbed::pair(prefix).expect("pair testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    let services = format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH)
    );
    start_pair(&mut bed, &services, Duration::from_millis(10), mode).unwrap();

    // 1 000 requests a second for 3 s; the active switch host loses every link after 1 s.
    let stream = bed.udp_stream(3000, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    bed.set_switch_links(Host::Switch, false).unwrap();
    let answers = stream.join().unwrap().unwrap();
    bed.wait_role(
        Host::Peer,
        LISTEN,
        HostRole::Active,
        Duration::from_secs(10),
    )
    .unwrap();
    let lost = unanswered(&answers);
    let gap = longest_gap(&answers);
    eprintln!(
        "switch-host takeover, 10 ms adverts, {mode:?}: {lost} of {} requests unanswered, longest gap {gap:?}",
        answers.len()
    );
    assert!(
        answers[2000..]
            .iter()
            .all(|a| a.by.as_deref() == Some("master")),
        "the peer does not serve the VIP a second after the takeover: {}",
        describe_unanswered(&answers)
    );
    assert!(gap < Duration::from_secs(1), "{}", describe_gap(&answers));
}

#[test]
fn keepalived_hands_the_vips_to_the_peer_through_lb_notify_when_the_active_host_dies() {
    takeover("lbpr-tscr", NotifyMode::Script);
}

#[test]
fn keepalived_hands_the_vips_to_the_peer_through_its_fifo_when_the_active_host_dies() {
    takeover("lbpr-tfif", NotifyMode::Fifo);
}

/// Runs `lb ARGS…` on switch host `switch`: (success, stdout, stderr).
fn lb_on(bed: &Testbed, switch: Host, args: &[&str]) -> (bool, String, String) {
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

/// Waits (5 s at most) until `lb flows` on `switch` lists `count` flows of service `hold`
/// on backend `backend`.
fn wait_flows(bed: &Testbed, switch: Host, backend: &str, count: usize) {
    let wanted = format!("{count} flows");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, listing, _) = lb_on(
            bed,
            switch,
            &["flows", "--service", "hold", "--backend", backend],
        );
        if ok && listing.contains(&wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{switch:?} does not list {wanted} on the {backend}: {listing}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TCP connections held on a backend that is not the service's active one (the master,
/// drained) carry on through the peer after a takeover: the standby holds the active host's
/// flows. Its agent was stopped while they were made, so they reach it as the whole table
/// the active host sends when the pair link connects again.
#[test]
fn the_standby_holds_the_active_hosts_flows_and_carries_them_on_after_a_takeover() {
    let mut bed = Testbed::pair("lbpr-sync").expect("pair testbed");
    for (host, name) in [(Host::Master, "master"), (Host::Slave, "slave")] {
        bed.start_tcp_responder(host, name).unwrap();
        bed.start_udp_responder(host, name).unwrap();
    }
    let tcp_health = r#"{ checks = [{ type = "link" }, { type = "tcp" }], interval = "10ms" }"#;
    let services = format!(
        "{}{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("hold", "tcp", TCP_PORT, tcp_health),
        Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH)
    );
    let processes = start_pair(
        &mut bed,
        &services,
        Duration::from_millis(10),
        NotifyMode::Fifo,
    )
    .unwrap();
    let peer_agent = processes.agents[1];
    let peer_config = bed.dir().join("lb-peer.toml");

    // The peer's agent is down (its dataplane stays standby) while connections are made.
    let mut stopped = bed.processes.remove(peer_agent);
    assert!(stopped.terminate().unwrap(), "lb did not exit cleanly");
    let vip = SocketAddrV4::new(TESTBED_VIP, TCP_PORT);
    let open = |bed: &Testbed| LineClient::open(&bed.client, vip, Duration::from_secs(2));
    let mut held: Vec<LineClient> = (0..10).map(|_| open(&bed).unwrap()).collect();
    for connection in &mut held {
        assert_eq!(connection.ask().unwrap(), "master");
    }
    // Drained, the master keeps its connections; new ones go to the slave.
    let (ok, out, err) = lb_on(&bed, Host::Switch, &["drain", "hold", "master"]);
    assert!(ok && out.contains("master -> slave"), "{out}{err}");
    let mut after = open(&bed).unwrap();
    assert_eq!(after.ask().unwrap(), "slave");

    // The peer's agent comes back: the pair link connects, and the active host sends its
    // whole table.
    let agent = bed
        .start_lb_on(
            Host::Peer,
            &["run", "--config", peer_config.to_str().unwrap()],
        )
        .unwrap();
    bed.wait_for_agent_on(Host::Peer, agent, LISTEN).unwrap();
    let (ok, out, err) = lb_on(&bed, Host::Peer, &["drain", "hold", "master"]);
    assert!(ok, "{out}{err}");
    wait_flows(&bed, Host::Peer, "master", 10);
    wait_flows(&bed, Host::Peer, "slave", 1);
    let status = bed.agent_status_on(Host::Peer, LISTEN).unwrap();
    let peer = status.peer.expect("the peer's status names its peer");
    assert_eq!(peer.role, Some(HostRole::Active), "{peer:?}");
    assert!(peer.streaming && !peer.split_brain, "{peer:?}");

    // The active host dies: the peer takes over, and every connection carries on, on the
    // backend it was on, through the peer's copy of its flow.
    bed.set_switch_links(Host::Switch, false).unwrap();
    bed.wait_role(Host::Peer, LISTEN, HostRole::Active, Duration::from_secs(5))
        .unwrap();
    for (i, connection) in held.iter_mut().enumerate() {
        assert_eq!(
            connection.ask().unwrap(),
            "master",
            "connection {i} after the takeover"
        );
    }
    assert_eq!(after.ask().unwrap(), "slave");
    let text = metrics_on(&bed, LISTEN, Host::Peer);
    let received = |outcome: &str| {
        sample(
            &text,
            &format!("lb_pair_flows_received_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(received("applied") >= 11.0, "{text}");
    assert_eq!(received("unmapped"), 0.0, "{text}");
    assert_eq!(
        sample(&text, "lb_dataplane_events_total{event=\"flow_picked_up\"}").unwrap_or(0.0),
        0.0,
        "the peer picked a connection up instead of knowing it: {text}"
    );
    assert_eq!(
        sample(&text, "lb_pair_split_brain"),
        Some(0.0),
        "a takeover from a dead host is no split brain: {text}"
    );
    let switch_text = metrics_on(&bed, LISTEN, Host::Switch);
    assert!(
        sample(&switch_text, "lb_pair_table_sends_total").unwrap_or(0.0) >= 1.0,
        "{switch_text}"
    );
}

/// Both hosts active (keepalived's VRRP path cut, or an operator's mistake) is a split
/// brain: each agent reports it; each keeps its own flows and takes only those of the
/// other it does not have.
#[test]
fn both_hosts_active_is_a_split_brain_that_each_reports_and_neither_loses_its_own_flows() {
    let mut bed = Testbed::pair("lbpr-split").expect("pair testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    for switch in [Host::Switch, Host::Peer] {
        let config = format!(
            "{}{}\n[pair]\n{}",
            Testbed::config_head(LISTEN),
            Testbed::service_toml("echo", "udp", UDP_PORT, HEALTH),
            lb_user::testbed::pair::sync_toml(switch)
        );
        let name = format!("lb-{switch:?}.toml");
        let path = bed.write_file(&name, &config).unwrap();
        let agent = bed
            .start_lb_on(switch, &["run", "--config", path.to_str().unwrap()])
            .unwrap();
        bed.wait_for_agent_on(switch, agent, LISTEN).unwrap();
    }
    let split = |bed: &Testbed, switch| {
        let peer = bed.agent_status_on(switch, LISTEN).unwrap().peer.unwrap();
        (peer.role, peer.split_brain)
    };
    let wait = |bed: &Testbed, switch, want: (Option<HostRole>, bool)| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while split(bed, switch) != want {
            assert!(
                Instant::now() < deadline,
                "{switch:?} reports {:?}, not {want:?}",
                split(bed, switch)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (ok, out, err) = lb_on(&bed, Host::Switch, &["role", "active"]);
    assert!(ok, "{out}{err}");
    wait(&bed, Host::Switch, (Some(HostRole::Standby), false));
    wait(&bed, Host::Peer, (Some(HostRole::Active), false));

    let (ok, out, err) = lb_on(&bed, Host::Peer, &["role", "active"]);
    assert!(ok, "{out}{err}");
    wait(&bed, Host::Switch, (Some(HostRole::Active), true));
    wait(&bed, Host::Peer, (Some(HostRole::Active), true));
    for switch in [Host::Switch, Host::Peer] {
        let text = metrics_on(&bed, LISTEN, switch);
        assert_eq!(sample(&text, "lb_pair_split_brain"), Some(1.0), "{text}");
    }
    // A flow made on one host now reaches the other, which has none of that key.
    let flows = |bed: &Testbed, switch| {
        let text = metrics_on(bed, LISTEN, switch);
        let count = |outcome: &str| {
            let name = format!("lb_pair_flows_received_total{{outcome=\"{outcome}\"}}");
            sample(&text, &name).unwrap_or(0.0)
        };
        (count("applied"), count("failed"), count("unmapped"))
    };
    let _ = bed.udp_request_vip("split");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (switch, peer) = (flows(&bed, Host::Switch), flows(&bed, Host::Peer));
        assert_eq!((switch.1, switch.2, peer.1, peer.2), (0.0, 0.0, 0.0, 0.0));
        if switch.0 + peer.0 >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flow did not reach the other host"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // One host stands down: the split brain is over on both.
    let (ok, out, err) = lb_on(&bed, Host::Peer, &["role", "standby"]);
    assert!(ok, "{out}{err}");
    wait(&bed, Host::Switch, (Some(HostRole::Standby), false));
    wait(&bed, Host::Peer, (Some(HostRole::Active), false));
}

/// With a peer named, the program reports each flow it writes (a new flow, a change of
/// state or backend; not a packet that changes nothing, nor a refused one: spoofed, from
/// another client, malformed) on `FLOW_SYNC`; without one, nothing. A flow the pair link
/// writes is served as one of the program's own — a backend's packet that comes first is
/// rewritten — and an active host keeps a flow of its own where a standby takes the peer's.
#[test]
fn the_program_reports_its_flows_and_serves_a_flow_the_pair_link_wrote() {
    let pair = "[pair]\nsync_listen = \"198.18.9.11:7470\"\npeer = \"198.18.9.12:7470\"\n";
    let dns = || config(&[service("dns", "198.18.1.100", "udp", 53, "")], pair);
    with_rig_config("lbt-pair-copy", dns(), |b| {
        let mut reports = b.dataplane.take_flow_reports()?;
        let mut next = || reports.next().and_then(|item| parse_report(&item));
        let svc = b.plan.service("dns")?.clone();
        let (master, slave) = (svc.backend("master")?.index, svc.backend("slave")?.index);
        let query = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        let key = FlowKey::new(proto::UDP, CLIENT, 5000u16.to_be_bytes(), VIP, [0, 53]);
        let (action, out) = b.run(b.client_if, &query)?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(tests::checks::verify_checksums(&out)?.dst_ip, MASTER);
        let created = next().expect("the new flow is reported");
        assert_eq!((created.key, created.flow.backend), (key, master));
        assert_eq!(created.flow.state, flow_state::NEW);
        assert_eq!(
            created.flow,
            b.flow(&key).unwrap().flow,
            "reported as written"
        );
        assert_eq!(b.run(b.client_if, &query)?.0, XDP_REDIRECT);
        assert!(
            next().is_none(),
            "a packet that changes nothing is not reported"
        );

        // Refused frames write nothing and report nothing: a spoofed reply (another MAC),
        // a packet of the flow from another client MAC, a query with a broken checksum.
        let spoofed = udp(SLAVE_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5000);
        assert_eq!(b.run(b.backend_if, &spoofed)?, (XDP_PASS, spoofed.clone()));
        assert_eq!(b.event("reply_wrong_mac")?, 1);
        let stranger = udp(CLIENT_B_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &stranger)?.0, XDP_DROP);
        assert_eq!(b.event("client_mismatch")?, 1);
        let mut broken = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5002, 53);
        broken[IP_CHECK.start] ^= 0xff;
        assert_eq!(b.run(b.client_if, &broken)?, (XDP_PASS, broken.clone()));
        assert_eq!(b.event("unparsable")?, 1);
        assert!(next().is_none(), "a refused frame was reported");
        assert_eq!(b.flow(&key).unwrap().flow, created.flow, "the flow changed");

        let reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5000);
        let (action, out) = b.run(b.backend_if, &reply)?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(tests::checks::verify_checksums(&out)?.src_ip, VIP);
        let replied = next().expect("the change of state is reported");
        assert_eq!(replied.flow.state, flow_state::REPLIED);

        // A flow that follows its service to another backend is reported with it.
        b.activate("dns", "slave")?;
        let (action, out) = b.run(b.client_if, &query)?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(tests::checks::verify_checksums(&out)?.dst_ip, SLAVE);
        let moved = next().expect("the move is reported");
        assert_eq!((moved.key, moved.flow.backend), (key, slave));
        assert_eq!(b.flow(&key).unwrap().flow.backend, slave);
        assert_eq!(b.event("flow_sync_lost")?, 0);
        b.activate("dns", "master")?;

        // A flow copied in by the pair link: the backend's packet comes first.
        let copied_key = FlowKey::new(proto::UDP, CLIENT, 5001u16.to_be_bytes(), VIP, [0, 53]);
        let now = lb_user::dataplane::writer::monotonic_ns();
        let copied = Flow {
            created_ns: now,
            seen_ns: now,
            backend: master,
            service: svc.id,
            ifindex: b.client_if,
            client_mac: CLIENT_MAC,
            state: flow_state::REPLIED,
            flags: 0,
            pad: 0,
        };
        assert!(b.maps.write_flow(&copied_key, &copied, MASTER, false)?);
        let first = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5001);
        let (action, out) = b.run(b.backend_if, &first)?;
        assert_eq!(action, XDP_REDIRECT);
        let rewritten = tests::checks::verify_checksums(&out)?;
        assert_eq!((rewritten.src_ip, rewritten.dst_ip), (VIP, CLIENT));

        // An active host keeps its own flow; a standby takes the peer's over it.
        let other = Flow {
            backend: slave,
            ..copied
        };
        assert!(!b.maps.write_flow(&copied_key, &other, SLAVE, false)?);
        assert_eq!(b.flow(&copied_key).unwrap().flow.backend, master);
        assert!(b.maps.write_flow(&copied_key, &other, SLAVE, true)?);
        assert_eq!(b.flow(&copied_key).unwrap().flow.backend, slave);
        Ok(())
    });
    let alone = config(&[service("dns", "198.18.1.100", "udp", 53, "")], "");
    with_rig_config("lbt-pair-alone", alone, |b| {
        let mut reports = b.dataplane.take_flow_reports()?;
        let query = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &query)?.0, XDP_REDIRECT);
        assert!(reports.next().is_none(), "reported without a peer");
        Ok(())
    });
}
