//! Pair mode: the standby host serves nothing of the VIPs (no ARP answer, no forwarding,
//! no reply rewritten, every frame counted) while it keeps its connection table; keepalived's
//! notify script (`lb notify`) and `lb role` move the role, which is pinned with the
//! dataplane; becoming active announces the VIPs with gratuitous ARP. The pair link (the
//! connection tables streamed between the hosts) is tested in `pair_link.rs`.

use std::time::{Duration, Instant};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use lb_common::Direction;

use lb_user::{
    config::HostRole,
    testbed::{
        topology::{
            describe_gap, describe_unanswered, longest_gap, unanswered, Testbed, UDP_PORT,
            VIP as TESTBED_VIP,
        },
        Host,
    },
};
use tests::{
    agent::{lb_on, metrics, sample, start_agent},
    bench::pair::{start_pair, NotifyMode},
    rig::*,
    testrun::{
        BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
};

const LISTEN: &str = "127.0.0.1:9100";
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
