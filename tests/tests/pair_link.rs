//! The pair link: the agents stream their connection tables to each other, so that the
//! standby carries the active host's flows on after a takeover; the program reports each
//! flow it writes; both hosts active is reported as a split brain; a peer that goes silent
//! or unreachable is noticed within seconds, and the whole table is sent again when the
//! link comes back.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use lb_common::{flow_state, proto, Flow, FlowKey};
use lb_user::{
    config::HostRole,
    dataplane::flows::Placement,
    pair::sync::parse_report,
    testbed::{
        tcp_responder::LineClient,
        topology::{Testbed, TCP_PORT, UDP_PORT, VIP as TESTBED_VIP},
        Host,
    },
};
use tests::{
    agent::{lb_on, metrics_on, sample},
    bench::pair::{start_pair, NotifyMode},
    rig::*,
    testrun::{
        BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
};

const LISTEN: &str = "127.0.0.1:9100";
/// Whole tables sent on a new connection.
const CONNECTED_TABLES: &str = "lb_pair_table_sends_total{reason=\"connected\"}";
/// Another host's MAC on the client segment.
const CLIENT_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
const HEALTH: &str =
    r#"{ checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms" }"#;

/// Waits (5 s at most) until `lb flows` on `switch` lists `count` flows of service
/// `service` on backend `backend`.
fn wait_flows(bed: &Testbed, switch: Host, service: &str, backend: &str, count: usize) {
    let wanted = format!("{count} flows");
    wait_until(Duration::from_secs(5), || {
        let (ok, listing, _) = lb_on(
            bed,
            switch,
            &["flows", "--service", service, "--backend", backend],
        );
        (ok && listing.contains(&wanted))
            .then_some(())
            .ok_or_else(|| format!("{switch:?} does not list {wanted} on the {backend}: {listing}"))
    });
}

/// Polls `probe` every 20 ms until it succeeds; fails with its last error after `within`.
fn wait_until(within: Duration, mut probe: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "{why}, after {within:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
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
    wait_flows(&bed, Host::Peer, "hold", "master", 10);
    wait_flows(&bed, Host::Peer, "hold", "slave", 1);
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
        sample(&switch_text, CONNECTED_TABLES).unwrap_or(0.0) >= 1.0,
        "{switch_text}"
    );
}

/// Starts an agent with the pair link on both switch hosts (both standby, serving `echo`
/// on the master), makes the switch active and waits until each streams to the other;
/// returns the agents' process indices (the switch's, the peer's).
fn start_linked_pair(bed: &mut Testbed) -> [usize; 2] {
    let mut agents = [0; 2];
    for (i, switch) in [Host::Switch, Host::Peer].into_iter().enumerate() {
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
        agents[i] = agent;
    }
    let (ok, out, err) = lb_on(bed, Host::Switch, &["role", "active"]);
    assert!(ok, "{out}{err}");
    wait_views(bed, SEES_STANDBY, SEES_ACTIVE, Duration::from_secs(3));
    agents
}

/// How many flows of service `service` `lb flows` lists on `switch`.
fn flow_count(bed: &Testbed, switch: Host, service: &str) -> usize {
    let (ok, listing, err) = lb_on(bed, switch, &["flows", "--service", service]);
    assert!(ok, "{err}");
    listing
        .lines()
        .find_map(|line| line.strip_suffix(" flows")?.parse().ok())
        .unwrap_or_else(|| panic!("no count in {listing}"))
}

/// What `switch`'s agent knows of its peer: (the peer's role as heard, streaming to it,
/// split brain).
fn peer_view(bed: &Testbed, switch: Host) -> PeerView {
    let peer = bed.agent_status_on(switch, LISTEN).unwrap().peer.unwrap();
    (peer.role, peer.streaming, peer.split_brain)
}

/// What a host sees of its peer: (its role as heard, streaming to it, split brain).
type PeerView = (Option<HostRole>, bool, bool);
/// The switch sees a standby peer it streams to, no split brain.
const SEES_STANDBY: PeerView = (Some(HostRole::Standby), true, false);
/// The peer sees an active switch it streams to, no split brain.
const SEES_ACTIVE: PeerView = (Some(HostRole::Active), true, false);

/// Waits (`within` at most) until the switch's view of its peer is `switch_sees` and the
/// peer's is `peer_sees`.
fn wait_views(bed: &Testbed, switch_sees: PeerView, peer_sees: PeerView, within: Duration) {
    for (switch, want) in [(Host::Switch, switch_sees), (Host::Peer, peer_sees)] {
        wait_until(within, || {
            let view = peer_view(bed, switch);
            (view == want)
                .then_some(())
                .ok_or_else(|| format!("{switch:?} sees its peer as {view:?}, not {want:?}"))
        });
    }
}

/// The pair link fails without a carrier signal (every frame on it dropped, as for a hung
/// peer): the stream to the peer ends within seconds (data left unacknowledged), each
/// host stops hearing the other, and neither calls it a split brain. When the link
/// speaks again, the stream connects again and starts with the whole table, flows made
/// meanwhile included.
#[test]
fn a_silent_pair_link_is_noticed_and_the_whole_table_goes_out_again_when_it_is_back() {
    let mut bed = Testbed::pair("lbpl-silent").expect("pair testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    start_linked_pair(&mut bed);
    // Without keepalived no host holds the backends' gateway, so the request goes
    // unanswered: its flow is made all the same.
    let _ = bed.udp_request_vip("before");
    wait_flows(&bed, Host::Peer, "echo", "master", 1);
    let sends =
        |bed: &Testbed| sample(&metrics_on(bed, LISTEN, Host::Switch), CONNECTED_TABLES).unwrap();
    let sent_before = sends(&bed);

    bed.set_pair_link_silent(Host::Peer, true).unwrap();
    // TCP_USER_TIMEOUT (1 s) ends the stream; hellos stop, so the peer's role is unknown.
    let noticed = Duration::from_secs(5);
    let gone = (None, false, false);
    wait_views(&bed, gone, gone, noticed);
    let text = metrics_on(&bed, LISTEN, Host::Peer);
    assert_eq!(sample(&text, "lb_pair_peer_heard"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "lb_pair_stream_up"), Some(0.0), "{text}");
    // A flow made while the link is silent reaches the peer only with the next table.
    let _ = bed.udp_request_vip("during");

    bed.set_pair_link_silent(Host::Peer, false).unwrap();
    wait_views(&bed, SEES_STANDBY, SEES_ACTIVE, noticed);
    wait_flows(&bed, Host::Peer, "echo", "master", 2);
    assert!(sends(&bed) > sent_before, "no new table sent");
    let text = metrics_on(&bed, LISTEN, Host::Switch);
    assert_eq!(sample(&text, "lb_pair_split_brain"), Some(0.0), "{text}");
}

/// Reports lost to a full ring (the agent frozen while 20 000 flows are made: the ring
/// holds 16 384) are made good: the agent notices the loss and sends the whole table
/// again, and the peer ends with every flow.
#[test]
fn reports_lost_to_a_full_ring_are_made_good_by_the_whole_table() {
    let mut bed = Testbed::pair("lbpl-lost").expect("pair testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    let [switch_agent, _] = start_linked_pair(&mut bed);
    let text = metrics_on(&bed, LISTEN, Host::Switch);
    let sent_before = sample(&text, CONNECTED_TABLES).unwrap();

    // Frozen for well under a second, so that the peer does not take it for gone (which
    // would also bring the whole table).
    bed.processes[switch_agent].freeze(true).unwrap();
    let made = bed.client.enter(|| -> std::io::Result<()> {
        for port in 20_000..40_000u16 {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", port))?;
            socket.send_to(b"flow", (TESTBED_VIP, UDP_PORT))?;
            if port % 200 == 0 {
                // Paced, so that no frame is dropped on its way to the program.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    });
    bed.processes[switch_agent].freeze(false).unwrap();
    made.unwrap().unwrap();

    let own = flow_count(&bed, Host::Switch, "echo");
    assert!(own > 16_384, "only {own} flows made");
    wait_until(Duration::from_secs(10), || {
        let copied = flow_count(&bed, Host::Peer, "echo");
        (copied == own)
            .then_some(())
            .ok_or_else(|| format!("the peer holds {copied} of {own} flows"))
    });
    let text = metrics_on(&bed, LISTEN, Host::Switch);
    let lost = sample(&text, "lb_dataplane_events_total{event=\"flow_sync_lost\"}");
    assert!(lost.unwrap_or(0.0) > 0.0, "no report lost: {text}");
    let lost_tables = "lb_pair_table_sends_total{reason=\"reports_lost\"}";
    assert!(
        sample(&text, lost_tables).unwrap_or(0.0) >= 1.0,
        "the loss brought no new table: {text}"
    );
    if sample(&text, CONNECTED_TABLES) != Some(sent_before) {
        eprintln!("the stream also connected again (the freeze outlasted the peer's patience)");
    }
}

/// Both hosts active (keepalived's VRRP path cut, or an operator's mistake) is a split
/// brain: each agent reports it; each keeps its own flows and takes only those of the
/// other it does not have.
#[test]
fn both_hosts_active_is_a_split_brain_that_each_reports_and_neither_loses_its_own_flows() {
    let mut bed = Testbed::pair("lbpr-split").expect("pair testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    start_linked_pair(&mut bed);
    let within = Duration::from_secs(3);

    let (ok, out, err) = lb_on(&bed, Host::Peer, &["role", "active"]);
    assert!(ok, "{out}{err}");
    wait_views(
        &bed,
        (Some(HostRole::Active), true, true),
        (Some(HostRole::Active), true, true),
        within,
    );
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
    wait_until(Duration::from_secs(3), || {
        let (switch, peer) = (flows(&bed, Host::Switch), flows(&bed, Host::Peer));
        assert_eq!((switch.1, switch.2, peer.1, peer.2), (0.0, 0.0, 0.0, 0.0));
        (switch.0 + peer.0 >= 1.0)
            .then_some(())
            .ok_or_else(|| "the flow did not reach the other host".to_string())
    });

    // One host stands down: the split brain is over on both.
    let (ok, out, err) = lb_on(&bed, Host::Peer, &["role", "standby"]);
    assert!(ok, "{out}{err}");
    wait_views(&bed, SEES_STANDBY, SEES_ACTIVE, within);
}

/// With a peer named, the program reports each flow it writes (a new flow, a change of
/// state or backend; not a packet that changes nothing, nor a refused one: spoofed, from
/// another client, malformed) on `FLOW_SYNC`; without one, nothing. A flow the pair link
/// writes is served as one of the program's own — a backend's packet that comes first is
/// rewritten — and an active host keeps a flow of its own (and a reply key a live flow of
/// its own holds; an expired one's is free) where a standby takes the peer's.
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
        let settings = b.maps.flow_settings()?;
        let if_free = Placement::IfFree {
            settings: &settings,
            now,
        };
        assert!(b.maps.write_flow(&copied_key, &copied, MASTER, if_free)?);
        let first = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5001);
        let (action, out) = b.run(b.backend_if, &first)?;
        assert_eq!(action, XDP_REDIRECT);
        let rewritten = tests::checks::verify_checksums(&out)?;
        assert_eq!((rewritten.src_ip, rewritten.dst_ip), (VIP, CLIENT));

        // Nor a flow whose reply key a live flow of its own holds (another VIP, the same
        // client port and backend): the backend's replies could not be told apart.
        let clash = FlowKey::new(
            proto::UDP,
            CLIENT,
            5001u16.to_be_bytes(),
            [198, 18, 1, 101],
            [0, 53],
        );
        assert!(!b.maps.write_flow(&clash, &copied, MASTER, if_free)?);
        assert!(b.flow(&clash).is_none(), "a flow took a held reply key");

        // An active host keeps its own flow; a standby takes the peer's over it.
        let other = Flow {
            backend: slave,
            ..copied
        };
        assert!(!b.maps.write_flow(&copied_key, &other, SLAVE, if_free)?);
        assert_eq!(b.flow(&copied_key).unwrap().flow.backend, master);
        assert!(b
            .maps
            .write_flow(&copied_key, &other, SLAVE, Placement::Overwrite)?);
        assert_eq!(b.flow(&copied_key).unwrap().flow.backend, slave);

        // A reply key whose holder has expired is free again, as for the program.
        let third = FlowKey::new(
            proto::UDP,
            CLIENT,
            5001u16.to_be_bytes(),
            [198, 18, 1, 102],
            [0, 53],
        );
        assert!(!b.maps.write_flow(&third, &other, SLAVE, if_free)?);
        let expired = Flow {
            seen_ns: 1,
            ..other
        };
        b.maps
            .write_flow(&copied_key, &expired, SLAVE, Placement::Overwrite)?;
        assert!(b.maps.write_flow(&third, &other, SLAVE, if_free)?);
        assert_eq!(b.flow(&third).unwrap().flow.backend, slave);
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
