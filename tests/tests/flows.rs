//! The connection table, through `BPF_PROG_TEST_RUN`: only packets of flows the program
//! created are rewritten; spoofed, reply-shaped and foreign frames come out untouched or
//! dropped as documented, counted, with the table unchanged; flows follow failover and
//! stay on their backend under graceful failback; expiry and a full table are defined.

use anyhow::Result;
use lb_common::{flow_flags, flow_state, proto, FlowKey, KEEP_FOREVER};
use tests::{
    checks::verify_checksums,
    rig::*,
    testrun::{
        BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
};

const CLIENT_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
const ATTACKER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x66];

fn web_key(port: u16) -> FlowKey {
    FlowKey::new(
        proto::TCP,
        CLIENT,
        port.to_be_bytes(),
        VIP,
        80u16.to_be_bytes(),
    )
}

/// The reply of the master to the client's port `port` of `web`, with TCP `flags`.
fn master_reply(port: u16, flags: &str) -> Vec<u8> {
    tcp_with(
        MASTER_MAC,
        BACKEND_IF_MAC,
        (MASTER, 80),
        (CLIENT, port),
        flags,
    )
}

/// A TCP segment of the client to `web`.
fn client_segment(port: u16, flags: &str) -> Vec<u8> {
    tcp_with(CLIENT_MAC, CLIENT_IF_MAC, (CLIENT, port), (VIP, 80), flags)
}

#[test]
fn a_packet_from_the_switch_hosts_own_address_is_dropped_and_learns_nothing() {
    with_rig("lbf-local", |b| {
        // The spoof that used to hijack the master's health-check replies.
        for src in [SWITCH_BACKEND_SIDE, SWITCH_CLIENT_SIDE] {
            let spoof = udp(CLIENT_MAC, CLIENT_IF_MAC, src, VIP, 40_000, 53);
            assert_eq!(b.run(b.client_if, &spoof)?.0, XDP_DROP);
        }
        assert_eq!(b.event("local_source")?, 2);
        assert!(b.flows().is_empty());
        // The master's answer to a health check of the switch host stays the kernel's.
        let check_reply = udp(
            MASTER_MAC,
            BACKEND_IF_MAC,
            MASTER,
            SWITCH_BACKEND_SIDE,
            53,
            40_000,
        );
        let (action, out) = b.run(b.backend_if, &check_reply)?;
        assert_eq!((action, out), (XDP_PASS, check_reply));
        Ok(())
    })
}

#[test]
fn sources_no_client_can_have_are_dropped() {
    with_rig("lbf-martian", |b| {
        for src in [
            VIP,
            VIP_ONE_ARM,
            [127, 0, 0, 1],
            [0, 0, 0, 0],
            [224, 0, 0, 5],
            [255; 4],
        ] {
            let spoof = udp(CLIENT_MAC, CLIENT_IF_MAC, src, VIP, 40_000, 53);
            assert_eq!(b.run(b.client_if, &spoof)?.0, XDP_DROP, "source {src:?}");
        }
        assert_eq!(b.event("bad_source")?, 6);
        assert!(b.flows().is_empty());
        Ok(())
    })
}

#[test]
fn a_source_not_routed_back_through_its_nic_or_from_another_mac_is_dropped() {
    with_rig("lbf-rpf", |b| {
        // An address of the backends' segment, arriving on the client NIC.
        let wrong_side = udp(CLIENT_MAC, CLIENT_IF_MAC, [198, 18, 2, 50], VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &wrong_side)?.0, XDP_DROP);
        // An address nothing routes to.
        let unrouted = udp(CLIENT_MAC, CLIENT_IF_MAC, [198, 18, 77, 7], VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &unrouted)?.0, XDP_DROP);
        // A client the host knows at another MAC than the frame's.
        lb_user::testbed::netns::ip(&[
            "neigh",
            "replace",
            "198.18.1.3",
            "lladdr",
            "02:00:00:00:01:03",
            "dev",
            "t-cli",
            "nud",
            "permanent",
        ])?;
        let claimed = udp(ATTACKER_MAC, CLIENT_IF_MAC, CLIENT_B, VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &claimed)?.0, XDP_DROP);
        assert_eq!(b.event("spoofed_source")?, 3);
        assert!(b.flows().is_empty());
        // The same client from its own MAC is served.
        let real = udp(CLIENT_B_MAC, CLIENT_IF_MAC, CLIENT_B, VIP, 5000, 53);
        assert_eq!(b.run(b.client_if, &real)?.0, XDP_REDIRECT);
        Ok(())
    })
}

#[test]
fn a_second_flow_cannot_take_a_live_flows_reply_key() {
    with_rig_config(
        "lbf-collide",
        config(
            &[
                service("first", "198.18.1.100", "tcp", 80, ""),
                service("second", "198.18.1.101", "udp", 53, ""),
            ],
            "",
        ),
        |b| {
            // One echo identifier to two VIPs of the same backend (as `fping` does): the
            // master's echo replies to both would carry the same addresses and identifier.
            let first = echo_request(CLIENT, VIP);
            assert_eq!(b.run(b.client_if, &first)?.0, XDP_REDIRECT);
            let second = echo_request(CLIENT, VIP_ONE_ARM);
            assert_eq!(b.run(b.client_if, &second)?.0, XDP_DROP);
            assert_eq!(b.event("flow_collision")?, 1);
            // The first flow's answers still carry its own VIP.
            let mut reply = Vec::new();
            etherparse::PacketBuilder::ethernet2(MASTER_MAC, BACKEND_IF_MAC)
                .ipv4(MASTER, CLIENT, 64)
                .icmpv4_echo_reply(7, 1)
                .write(&mut reply, b"ping payload")?;
            let (action, out) = b.run(b.backend_if, &reply)?;
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(verify_checksums(&out)?.src_ip, VIP);
            Ok(())
        },
    )
}

#[test]
fn a_flow_is_recorded_with_its_client_and_backend() {
    with_rig("lbf-record", |b| {
        assert_eq!(
            b.run(b.client_if, &client_segment(40_000, "S"))?.0,
            XDP_REDIRECT
        );
        let flow = b.flow(&web_key(40_000)).expect("flow recorded").flow;
        let master = b.plan.service("web")?.backend("master")?.index;
        assert_eq!(flow.backend, master);
        assert_eq!(flow.client_mac, CLIENT_MAC);
        assert_eq!(flow.ifindex, b.client_if);
        assert_eq!(flow.state, flow_state::NEW);
        assert_ne!(
            flow.flags & flow_flags::STICKY,
            0,
            "graceful is the default"
        );
        assert_eq!(b.event("flow_created")?, 1);
        Ok(())
    })
}

#[test]
fn tcp_states_follow_the_handshake_and_the_close() {
    with_rig("lbf-states", |b| {
        let state = |b: &Rig| b.flow(&web_key(40_000)).map(|f| f.flow.state);
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        assert_eq!(
            b.run(b.backend_if, &master_reply(40_000, "SA"))?.0,
            XDP_REDIRECT
        );
        assert_eq!(state(b), Some(flow_state::REPLIED));
        b.run(b.client_if, &client_segment(40_000, "A"))?;
        assert_eq!(state(b), Some(flow_state::ESTABLISHED));
        // A half-closed connection goes on: the backend may answer for long after the
        // client's FIN.
        b.run(b.client_if, &client_segment(40_000, "FA"))?;
        assert_eq!(state(b), Some(flow_state::ESTABLISHED));
        assert_eq!(
            b.run(b.backend_if, &master_reply(40_000, "A"))?.0,
            XDP_REDIRECT
        );
        b.run(b.backend_if, &master_reply(40_000, "FA"))?;
        assert_eq!(state(b), Some(flow_state::CLOSING));
        // The port reused for a new connection starts a new flow.
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        assert_eq!(state(b), Some(flow_state::NEW));
        assert_eq!(b.event("flow_created")?, 2);
        Ok(())
    })
}

#[test]
fn a_connection_without_a_flow_is_picked_up_mid_stream() {
    with_rig("lbf-pickup", |b| {
        let (action, out) = b.run(b.client_if, &client_segment(40_000, "A"))?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(verify_checksums(&out)?.dst_ip, MASTER);
        assert_eq!(b.event("flow_picked_up")?, 1);
        assert_eq!(
            b.run(b.backend_if, &master_reply(40_000, "A"))?.0,
            XDP_REDIRECT
        );
        Ok(())
    })
}

#[test]
fn reply_shaped_frames_from_the_client_side_or_a_wrong_mac_are_not_rewritten() {
    with_rig("lbf-spoofreply", |b| {
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        // The master's address and port, but on the client NIC.
        let from_client_side = tcp_with(
            CLIENT_MAC,
            CLIENT_IF_MAC,
            (MASTER, 80),
            (CLIENT, 40_000),
            "SA",
        );
        let (action, out) = b.run(b.client_if, &from_client_side)?;
        assert_eq!((action, out), (XDP_PASS, from_client_side));
        assert_eq!(b.event("reply_wrong_nic")?, 1);
        // On the backend NIC, but from another MAC than the master's.
        let wrong_mac = tcp_with(
            ATTACKER_MAC,
            BACKEND_IF_MAC,
            (MASTER, 80),
            (CLIENT, 40_000),
            "SA",
        );
        let (action, out) = b.run(b.backend_if, &wrong_mac)?;
        assert_eq!((action, out), (XDP_PASS, wrong_mac));
        assert_eq!(b.event("reply_wrong_mac")?, 1);
        // Neither changed the flow.
        assert_eq!(
            b.flow(&web_key(40_000)).unwrap().flow.state,
            flow_state::NEW
        );
        // The real reply still goes through.
        assert_eq!(
            b.run(b.backend_if, &master_reply(40_000, "SA"))?.0,
            XDP_REDIRECT
        );
        Ok(())
    })
}

#[test]
fn a_flows_packets_from_another_mac_are_dropped_and_cannot_steal_its_replies() {
    with_rig("lbf-steal", |b| {
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        let spoof = tcp_with(
            ATTACKER_MAC,
            CLIENT_IF_MAC,
            (CLIENT, 40_000),
            (VIP, 80),
            "A",
        );
        assert_eq!(b.run(b.client_if, &spoof)?.0, XDP_DROP);
        assert_eq!(b.event("client_mismatch")?, 1);
        let flow = b.flow(&web_key(40_000)).unwrap().flow;
        assert_eq!(
            flow.client_mac, CLIENT_MAC,
            "the flow's client is unchanged"
        );
        let (action, out) = b.run(b.backend_if, &master_reply(40_000, "SA"))?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(verify_checksums(&out)?.dst_mac, CLIENT_MAC);
        Ok(())
    })
}

#[test]
fn each_client_gets_its_own_replies() {
    with_rig("lbf-twoclients", |b| {
        let a = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        let c = udp(CLIENT_B_MAC, CLIENT_IF_MAC, CLIENT_B, VIP, 5000, 53);
        b.run(b.client_if, &a)?;
        b.run(b.client_if, &c)?;
        for (client, mac) in [(CLIENT, CLIENT_MAC), (CLIENT_B, CLIENT_B_MAC)] {
            let reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, client, 53, 5000);
            let (action, out) = b.run(b.backend_if, &reply)?;
            assert_eq!(action, XDP_REDIRECT);
            let s = verify_checksums(&out)?;
            assert_eq!((s.src_ip, s.dst_ip, s.dst_mac), (VIP, client, mac));
        }
        Ok(())
    })
}

#[test]
fn direct_traffic_to_and_from_a_backend_is_untouched() {
    with_rig("lbf-direct", |b| {
        // The client uses the VIP from one port …
        b.run(
            b.client_if,
            &udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53),
        )?;
        // … and talks to the slave and the master directly from others, on the service's
        // port and on any other.
        for (dst, port) in [(SLAVE, 53), (MASTER, 53), (MASTER, 22)] {
            let out = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, dst, 5001, port);
            assert_eq!(b.run(b.client_if, &out)?, (XDP_PASS, out.clone()));
            let mac = if dst == SLAVE { SLAVE_MAC } else { MASTER_MAC };
            let back = udp(mac, BACKEND_IF_MAC, dst, CLIENT, port, 5001);
            assert_eq!(b.run(b.backend_if, &back)?, (XDP_PASS, back.clone()));
        }
        assert_eq!(b.flows().len(), 1);
        Ok(())
    })
}

#[test]
fn a_backend_of_two_services_answers_ping_with_the_right_vip() {
    let two_vips = config(
        &[
            service("first", "198.18.1.100", "tcp", 80, ""),
            service("second", "198.18.1.101", "udp", 53, ""),
        ],
        "",
    );
    with_rig_config("lbf-twovips", two_vips, |b| {
        for (vip, id) in [(VIP, 7u16), (VIP_ONE_ARM, 8)] {
            let mut request = Vec::new();
            etherparse::PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_IF_MAC)
                .ipv4(CLIENT, vip, 64)
                .icmpv4_echo_request(id, 1)
                .write(&mut request, b"ping")?;
            assert_eq!(b.run(b.client_if, &request)?.0, XDP_REDIRECT);
        }
        for (vip, id) in [(VIP_ONE_ARM, 8u16), (VIP, 7)] {
            let mut reply = Vec::new();
            etherparse::PacketBuilder::ethernet2(MASTER_MAC, BACKEND_IF_MAC)
                .ipv4(MASTER, CLIENT, 64)
                .icmpv4_echo_reply(id, 1)
                .write(&mut reply, b"ping")?;
            let (action, out) = b.run(b.backend_if, &reply)?;
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(verify_checksums(&out)?.src_ip, vip, "identifier {id}");
        }
        Ok(())
    })
}

#[test]
fn an_echo_reply_to_the_vip_starts_no_flow() {
    with_rig("lbf-echoreply", |b| {
        let mut reply = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_IF_MAC)
            .ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_reply(7, 1)
            .write(&mut reply, b"pong")?;
        assert_eq!(b.run(b.client_if, &reply)?, (XDP_PASS, reply.clone()));
        assert!(b.flows().is_empty());
        Ok(())
    })
}

#[test]
fn a_udp_flow_follows_the_active_backend_at_once() {
    with_rig("lbf-udpfail", |b| {
        let query = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        assert_eq!(
            verify_checksums(&b.run(b.client_if, &query)?.1)?.dst_ip,
            MASTER
        );
        b.activate("dns", "slave")?;
        assert_eq!(
            verify_checksums(&b.run(b.client_if, &query)?.1)?.dst_ip,
            SLAVE
        );
        assert_eq!(b.event("flow_moved")?, 1);
        // The slave's replies are rewritten, and so are the master's still in flight.
        for (ip, mac) in [(SLAVE, SLAVE_MAC), (MASTER, MASTER_MAC)] {
            let reply = udp(mac, BACKEND_IF_MAC, ip, CLIENT, 53, 5000);
            let (action, out) = b.run(b.backend_if, &reply)?;
            assert_eq!(action, XDP_REDIRECT, "reply of {ip:?}");
            assert_eq!(verify_checksums(&out)?.src_ip, VIP);
        }
        Ok(())
    })
}

#[test]
fn graceful_tcp_flows_stay_on_their_backend_until_it_may_not_keep_them() {
    with_rig("lbf-graceful", |b| {
        // Established on the slave while the master is away.
        b.activate("web", "slave")?;
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        // The master is back: new connections go to it, the old one stays.
        b.activate("web", "master")?;
        b.keep("web", "slave", KEEP_FOREVER)?;
        let dst = |b: &mut Rig, port, flags| -> Result<[u8; 4]> {
            Ok(verify_checksums(&b.run(b.client_if, &client_segment(port, flags))?.1)?.dst_ip)
        };
        assert_eq!(dst(b, 40_000, "A")?, SLAVE);
        assert_eq!(dst(b, 40_001, "S")?, MASTER);
        // The slave's keep deadline passes (drain limit, or the slave went down).
        b.keep("web", "slave", 0)?;
        assert_eq!(dst(b, 40_000, "A")?, MASTER);
        assert_eq!(b.event("flow_moved")?, 1);
        Ok(())
    })
}

#[test]
fn immediate_failback_moves_tcp_flows_at_once() {
    let immediate = config(
        &[service(
            "web",
            "198.18.1.100",
            "tcp",
            80,
            "failback = \"immediate\"",
        )],
        "",
    );
    with_rig_config("lbf-immediate", immediate, |b| {
        b.activate("web", "slave")?;
        b.run(b.client_if, &client_segment(40_000, "S"))?;
        assert_eq!(
            b.flow(&web_key(40_000)).unwrap().flow.flags & flow_flags::STICKY,
            0
        );
        b.activate("web", "master")?;
        let out = b.run(b.client_if, &client_segment(40_000, "A"))?.1;
        assert_eq!(verify_checksums(&out)?.dst_ip, MASTER);
        Ok(())
    })
}

#[test]
fn an_expired_flow_is_gone_for_replies_and_started_afresh_by_the_client() {
    let short = config(
        &[service("dns", "198.18.1.100", "udp", 53, "")],
        "[flows]\nudp = \"1s\"\n",
    );
    with_rig_config("lbf-expire", short, |b| {
        let query = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        let reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5000);
        b.run(b.client_if, &query)?;
        assert_eq!(b.run(b.backend_if, &reply)?.0, XDP_REDIRECT);
        std::thread::sleep(std::time::Duration::from_millis(1300));
        assert_eq!(b.run(b.backend_if, &reply)?, (XDP_PASS, reply.clone()));
        assert_eq!(b.event("reply_no_flow")?, 1);
        // The agent no longer lists it.
        let settings = b.maps.flow_settings()?;
        let now = lb_user::dataplane::writer::monotonic_ns();
        assert!(b.flows().iter().all(|f| f.expired(&settings, now)));
        // The client's next packet starts a new flow in its place.
        assert_eq!(b.run(b.client_if, &query)?.0, XDP_REDIRECT);
        assert_eq!(b.event("flow_created")?, 2);
        Ok(())
    })
}

#[test]
fn a_full_table_evicts_idle_flows_and_keeps_busy_ones() {
    let small = config(
        &[service("dns", "198.18.1.100", "udp", 53, "")],
        "[flows]\nmax = 1024\n",
    );
    with_rig_config("lbf-full", small, |b| {
        let busy = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        let busy_reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5000);
        b.run(b.client_if, &busy)?;
        // Four times the table's size in new flows from distinct sources, while the busy
        // flow keeps sending and receiving.
        for i in 0..4096u32 {
            let src = [198, 19, (i >> 8) as u8, i as u8];
            let flood = udp(ATTACKER_MAC, CLIENT_IF_MAC, src, VIP, 6000, 53);
            assert_eq!(
                b.run(b.client_if, &flood)?.0,
                XDP_REDIRECT,
                "flood packet {i}"
            );
            if i % 64 == 0 {
                assert_eq!(b.run(b.client_if, &busy)?.0, XDP_REDIRECT);
                assert_eq!(
                    b.run(b.backend_if, &busy_reply)?.0,
                    XDP_REDIRECT,
                    "after {i}"
                );
            }
        }
        let flows = b.flows();
        assert!(
            flows.len() <= 1024,
            "{} flows in a table of 1024",
            flows.len()
        );
        let key = FlowKey::new(
            proto::UDP,
            CLIENT,
            5000u16.to_be_bytes(),
            VIP,
            53u16.to_be_bytes(),
        );
        assert!(
            flows.iter().any(|f| f.key == key),
            "the busy flow was evicted"
        );
        assert_eq!(b.event("flow_table_error")?, 0);
        assert_eq!(b.event("flow_created")?, 4097);
        Ok(())
    })
}
