//! ICMP errors about a flow's packets, through `BPF_PROG_TEST_RUN`: carried to the flow's
//! other end with the quoted header rewritten, every checksum (outer, ICMP, quoted IPv4
//! and quoted TCP/UDP) verified with etherparse; errors about no flow, or from the wrong
//! place, are left alone.

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use tests::{
    checks::{verify_checksums, verify_quoted},
    rig::*,
    testrun::{BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_PASS, XDP_REDIRECT},
};

/// A router next to the client, and one between the switch and the backends.
const CLIENT_ROUTER: [u8; 4] = [198, 18, 1, 254];
const BACKEND_ROUTER: [u8; 4] = [198, 18, 2, 254];

/// The IPv4 packet (without Ethernet) of `frame`.
fn ip_of(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

fn frag_needed() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    })
}

#[test]
fn fragmentation_needed_on_the_way_to_a_backend_reaches_the_client_about_the_vip() {
    with_rig("lbi-tobackend", |b| {
        let request = tcp_with(CLIENT_MAC, CLIENT_IF_MAC, (CLIENT, 40_000), (VIP, 80), "A");
        let (_, sent) = b.run(b.client_if, &request)?;
        // A router behind the switch (reached through the master's next-hop MAC) and the
        // master itself both complain about the packet as the master got it.
        for src in [BACKEND_ROUTER, MASTER] {
            let error = icmp_error(
                (MASTER_MAC, BACKEND_IF_MAC),
                src,
                CLIENT,
                frag_needed(),
                &ip_of(&sent),
            );
            let (action, out) = b.run(b.backend_if, &error)?;
            assert_eq!(action, XDP_REDIRECT, "error from {src:?}");
            let s = verify_checksums(&out)?;
            let expected_src = if src == MASTER { VIP } else { BACKEND_ROUTER };
            assert_eq!(
                (s.src_ip, s.dst_ip, s.dst_mac),
                (expected_src, CLIENT, CLIENT_MAC)
            );
            assert_eq!(
                verify_quoted(&out)?,
                (CLIENT, VIP),
                "quoted header about the VIP"
            );
        }
        Ok(())
    })
}

#[test]
fn an_error_about_a_reply_reaches_the_backend_about_itself() {
    with_rig("lbi-toclient", |b| {
        b.run(
            b.client_if,
            &udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53),
        )?;
        let reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5000);
        let (_, sent) = b.run(b.backend_if, &reply)?;
        for kind in [
            frag_needed(),
            Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        ] {
            let error = icmp_error(
                (CLIENT_MAC, CLIENT_IF_MAC),
                CLIENT_ROUTER,
                VIP,
                kind,
                &ip_of(&sent),
            );
            let (action, out) = b.run(b.client_if, &error)?;
            assert_eq!(action, XDP_REDIRECT);
            let s = verify_checksums(&out)?;
            assert_eq!(
                (s.src_ip, s.dst_ip, s.dst_mac),
                (CLIENT_ROUTER, MASTER, MASTER_MAC)
            );
            assert_eq!(verify_quoted(&out)?, (MASTER, CLIENT));
        }
        Ok(())
    })
}

#[test]
fn an_error_about_a_ping_is_carried_too() {
    with_rig("lbi-ping", |b| {
        let (_, sent) = b.run(b.client_if, &echo_request(CLIENT, VIP))?;
        let error = icmp_error(
            (MASTER_MAC, BACKEND_IF_MAC),
            BACKEND_ROUTER,
            CLIENT,
            Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
            &ip_of(&sent),
        );
        let (action, out) = b.run(b.backend_if, &error)?;
        assert_eq!(action, XDP_REDIRECT);
        verify_checksums(&out)?;
        assert_eq!(verify_quoted(&out)?, (CLIENT, VIP));
        Ok(())
    })
}

#[test]
fn errors_about_no_flow_or_from_the_wrong_place_are_left_alone() {
    with_rig("lbi-refused", |b| {
        let request = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5000, 53);
        let (_, sent) = b.run(b.client_if, &request)?;
        let quoted = ip_of(&sent);
        // About a packet of no flow (another client port).
        let other = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, MASTER, 5001, 53);
        let no_flow = icmp_error(
            (MASTER_MAC, BACKEND_IF_MAC),
            MASTER,
            CLIENT,
            frag_needed(),
            &ip_of(&other),
        );
        // About the flow, but from another MAC, or on the client's NIC.
        let wrong_mac = icmp_error(
            ([2, 0, 0, 0, 2, 0x66], BACKEND_IF_MAC),
            MASTER,
            CLIENT,
            frag_needed(),
            &quoted,
        );
        let wrong_nic = icmp_error(
            (MASTER_MAC, CLIENT_IF_MAC),
            MASTER,
            CLIENT,
            frag_needed(),
            &quoted,
        );
        for (what, ifindex, frame) in [
            ("no flow", b.backend_if, no_flow),
            ("wrong MAC", b.backend_if, wrong_mac),
            ("wrong NIC", b.client_if, wrong_nic),
        ] {
            assert_eq!(b.run(ifindex, &frame)?, (XDP_PASS, frame.clone()), "{what}");
        }
        assert_eq!(b.event("reply_wrong_mac")?, 1);
        assert_eq!(b.event("reply_wrong_nic")?, 1);
        Ok(())
    })
}
