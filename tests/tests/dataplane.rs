//! The XDP program run on crafted frames through `BPF_PROG_TEST_RUN`: every rewrite checked
//! byte by byte, every checksum verified with etherparse, ARP answers, untouched non-VIP
//! traffic, and the defined fate of malformed frames. The connection table's own rules
//! (spoofing, failover of flows, expiry) are in `flows.rs`.

use std::net::Ipv4Addr;

use anyhow::Result;
use etherparse::PacketBuilder;
use lb_common::{Direction, NO_BACKEND};
use lb_user::testbed::netns::Netns;
use tests::{
    checks::verify_checksums,
    rig::*,
    testrun::{
        BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC, XDP_ABORTED, XDP_DROP, XDP_PASS,
        XDP_REDIRECT, XDP_TX,
    },
};

#[test]
fn tcp_to_vip_is_rewritten_to_the_master_and_redirected() {
    with_rig("lbt-fwd-tcp", |b| {
        let frame = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        let (action, out) = b.run(b.client_if, &frame)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.dst_mac, s.src_mac), (MASTER_MAC, BACKEND_IF_MAC));
        assert_eq!((s.src_ip, s.dst_ip), (CLIENT, MASTER));
        assert_only_changed(&frame, &out, &[0..12, IP_CHECK, IP_DST, TCP_CHECK]);
        let traffic = b.maps.traffic_of(0, Direction::Forward)?;
        assert_eq!((traffic.packets, traffic.bytes), (1, frame.len() as u64));
        Ok(())
    })
}

#[test]
fn reply_from_master_is_rewritten_to_come_from_the_vip() {
    with_rig("lbt-rev-tcp", |b| {
        // The client must have been seen on the forward path first.
        let (action, _) = b.run(
            b.client_if,
            &tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80),
        )?;
        assert_eq!(action, XDP_REDIRECT);
        let reply = tcp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 80, 40_000);
        let (action, out) = b.run(b.backend_if, &reply)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.dst_mac, s.src_mac), (CLIENT_MAC, CLIENT_IF_MAC));
        assert_eq!((s.src_ip, s.dst_ip), (VIP, CLIENT));
        assert_only_changed(&reply, &out, &[0..12, IP_CHECK, IP_SRC, TCP_CHECK]);
        assert_eq!(b.maps.traffic_of(0, Direction::Reverse)?.packets, 1);
        Ok(())
    })
}

#[test]
fn reply_to_an_unknown_client_goes_to_the_kernel_untouched() {
    with_rig("lbt-rev-unk", |b| {
        let reply = tcp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 80, 40_000);
        let (action, out) = b.run(b.backend_if, &reply)?;
        assert_eq!((action, out), (XDP_PASS, reply));
        Ok(())
    })
}

#[test]
fn backend_traffic_from_other_ports_is_untouched() {
    with_rig("lbt-rev-port", |b| {
        b.run(
            b.client_if,
            &tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80),
        )?;
        let other = tcp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 22, 40_000);
        let (action, out) = b.run(b.backend_if, &other)?;
        assert_eq!((action, out), (XDP_PASS, other));
        Ok(())
    })
}

#[test]
fn udp_to_vip_is_rewritten_and_checksum_zero_stays_zero() {
    with_rig("lbt-fwd-udp", |b| {
        let frame = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5353, 53);
        let (action, out) = b.run(b.client_if, &frame)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.dst_mac, s.dst_ip), (MASTER_MAC, MASTER));
        assert_ne!(&out[UDP_CHECK], &[0, 0]);
        assert_only_changed(&frame, &out, &[0..12, IP_CHECK, IP_DST, UDP_CHECK]);

        let mut no_checksum = frame.clone();
        no_checksum[UDP_CHECK].copy_from_slice(&[0, 0]);
        let (action, out) = b.run(b.client_if, &no_checksum)?;
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[UDP_CHECK], &[0, 0], "a UDP checksum of 0 must stay 0");
        verify_checksums(&out)?;

        let reply = udp(MASTER_MAC, BACKEND_IF_MAC, MASTER, CLIENT, 53, 5353);
        let (action, out) = b.run(b.backend_if, &reply)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.src_ip, s.dst_ip, s.dst_mac), (VIP, CLIENT, CLIENT_MAC));
        Ok(())
    })
}

#[test]
fn vlan_tagged_frames_are_not_served() {
    with_rig("lbt-vlan", |b| {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_IF_MAC)
            .single_vlan(etherparse::VlanId::try_new(42)?)
            .ipv4(CLIENT, VIP, 64)
            .tcp(40_001, 80, 1, 1000)
            .syn()
            .write(&mut frame, b"tagged")?;
        let (action, out) = b.run(b.client_if, &frame)?;
        assert_eq!((action, out), (XDP_PASS, frame));
        // An ARP request for the VIP on a VLAN is not answered either.
        let mut arp = arp_request(CLIENT_MAC, CLIENT, VIP);
        arp.splice(12..12, [0x81, 0x00, 0x00, 42]);
        let (action, out) = b.run(b.client_if, &arp)?;
        assert_eq!((action, out), (XDP_PASS, arp));
        assert_eq!(b.event("vlan_tagged")?, 2);
        assert!(b.flows().is_empty(), "no flow for a tagged frame");
        Ok(())
    })
}

#[test]
fn ping_of_the_vip_is_carried_both_ways() {
    with_rig("lbt-icmp", |b| {
        let request = echo_request(CLIENT, VIP);
        let (action, out) = b.run(b.client_if, &request)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.dst_ip, s.dst_mac), (MASTER, MASTER_MAC));
        assert_only_changed(&request, &out, &[0..12, IP_CHECK, IP_DST]);

        let mut reply = Vec::new();
        PacketBuilder::ethernet2(MASTER_MAC, BACKEND_IF_MAC)
            .ipv4(MASTER, CLIENT, 64)
            .icmpv4_echo_reply(7, 1)
            .write(&mut reply, b"ping payload")?;
        let (action, out) = b.run(b.backend_if, &reply)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.src_ip, s.dst_ip), (VIP, CLIENT));
        Ok(())
    })
}

#[test]
fn flipping_the_active_entry_moves_new_flows_to_the_slave() {
    with_rig("lbt-flip", |b| {
        let first = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        assert_eq!(
            verify_checksums(&b.run(b.client_if, &first)?.1)?.dst_ip,
            MASTER
        );
        b.activate("web", "slave")?;
        let second = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_001, 80);
        let (action, out) = b.run(b.client_if, &second)?;
        assert_eq!(action, XDP_REDIRECT);
        let s = verify_checksums(&out)?;
        assert_eq!((s.dst_ip, s.dst_mac), (SLAVE, SLAVE_MAC));
        // The other service on the same VIP did not move.
        let query = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5353, 53);
        assert_eq!(
            verify_checksums(&b.run(b.client_if, &query)?.1)?.dst_ip,
            MASTER
        );
        b.activate("web", "master")?;
        let third = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_002, 80);
        assert_eq!(
            verify_checksums(&b.run(b.client_if, &third)?.1)?.dst_ip,
            MASTER
        );
        Ok(())
    })
}

#[test]
fn service_without_backend_drops_its_traffic() {
    with_rig("lbt-nobk", |b| {
        let id = b.plan.service("web")?.id;
        b.maps.set_active(id, NO_BACKEND)?;
        let frame = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        assert_eq!(b.run(b.client_if, &frame)?.0, XDP_DROP);
        Ok(())
    })
}

#[test]
fn backend_behind_the_ingress_nic_is_sent_with_xdp_tx() {
    with_rig("lbt-onearm", |b| {
        let frame = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP_ONE_ARM, 1234, 9999);
        let (action, out) = b.run(b.client_if, &frame)?;
        assert_eq!(action, XDP_TX);
        let s = verify_checksums(&out)?;
        assert_eq!(
            (s.dst_ip, s.dst_mac, s.src_mac),
            (LOCAL_A, LOCAL_A_MAC, CLIENT_IF_MAC)
        );
        Ok(())
    })
}

#[test]
fn vip_port_without_a_service_goes_to_the_kernel() {
    with_rig("lbt-noport", |b| {
        let frame = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 22);
        let (action, out) = b.run(b.client_if, &frame)?;
        assert_eq!((action, out), (XDP_PASS, frame));
        Ok(())
    })
}

#[test]
fn arp_request_for_the_vip_is_answered_on_the_client_nic() {
    with_rig("lbt-arp", |b| {
        let request = arp_request(CLIENT_MAC, CLIENT, VIP);
        let (action, out) = b.run(b.client_if, &request)?;
        assert_eq!(action, XDP_TX);
        let packet = etherparse::SlicedPacket::from_ethernet(&out)?;
        let Some(etherparse::NetSlice::Arp(arp)) = packet.net else {
            panic!("no ARP in reply")
        };
        assert_eq!(arp.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!(arp.sender_hw_addr(), &CLIENT_IF_MAC);
        assert_eq!(arp.sender_protocol_addr(), &VIP);
        assert_eq!(arp.target_hw_addr(), &CLIENT_MAC);
        assert_eq!(arp.target_protocol_addr(), &CLIENT);
        assert_eq!(&out[0..6], &CLIENT_MAC);
        assert_eq!(&out[6..12], &CLIENT_IF_MAC);
        Ok(())
    })
}

#[test]
fn other_arp_goes_to_the_kernel_untouched() {
    with_rig("lbt-arp-other", |b| {
        for (ifindex, frame) in [
            (b.client_if, arp_request(CLIENT_MAC, CLIENT, OTHER)), // not a VIP
            (b.backend_if, arp_request(MASTER_MAC, MASTER, VIP)),  // backend-facing NIC
            (b.client_if, arp_request(CLIENT_MAC, VIP, VIP)),      // gratuitous
        ] {
            let (action, out) = b.run(ifindex, &frame)?;
            assert_eq!((action, out), (XDP_PASS, frame));
        }
        let mut reply = arp_request(CLIENT_MAC, CLIENT, VIP);
        reply[21] = 2; // an ARP reply, not a request
        let (action, out) = b.run(b.client_if, &reply)?;
        assert_eq!((action, out), (XDP_PASS, reply));
        Ok(())
    })
}

#[test]
fn non_vip_traffic_is_byte_identical() {
    with_rig("lbt-nonvip", |b| {
        let mut ipv6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_IF_MAC)
            .ipv6([0xfe; 16], [0xfd; 16], 64)
            .udp(1, 2)
            .write(&mut ipv6, b"v6")?;
        let frames = [
            tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, OTHER, 40_000, 80),
            udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, OTHER, 1, 53),
            echo_request(CLIENT, OTHER),
            ipv6,
        ];
        for frame in frames {
            for ifindex in [b.client_if, b.backend_if] {
                let (action, out) = b.run(ifindex, &frame)?;
                assert_eq!((action, &out), (XDP_PASS, &frame));
            }
        }
        let actions = b.maps.actions_of(0)?;
        assert_eq!(actions[XDP_PASS as usize], 4);
        Ok(())
    })
}

#[test]
fn frames_on_an_unconfigured_nic_are_untouched() {
    let ns = Netns::new("lbt-unconf").unwrap();
    ns.ip(&[
        "link", "add", "t-cli", "type", "veth", "peer", "name", "t-bck",
    ])
    .unwrap();
    ns.ip(&["link", "add", "t-x", "type", "veth", "peer", "name", "t-y"])
        .unwrap();
    ns.ip(&["link", "add", "t-u", "type", "veth", "peer", "name", "t-v"])
        .unwrap();
    ns.enter(|| -> Result<()> {
        let mut b = Rig::new(&standard_config())?;
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        let other = unsafe { libc::if_nametoindex(c"t-u".as_ptr()) };
        assert_ne!(other, 0);
        let frame = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        let (action, out) = b.run(other, &frame)?;
        assert_eq!((action, out), (XDP_PASS, frame));
        Ok(())
    })
    .unwrap()
    .unwrap();
}

/// Malformed frames of every header layer: each has a defined fate, and none is rewritten.
#[test]
fn malformed_frames_are_never_rewritten() {
    with_rig("lbt-malformed", |b| {
        let good = tcp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 80);
        let good_udp = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 5353, 53);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

        // Ethernet only, network header missing.
        cases.push(("ethernet header only", good[..14].to_vec()));
        // 802.1Q tag truncated.
        let mut vlan = good[..12].to_vec();
        vlan.extend_from_slice(&[0x81, 0x00, 0x00]);
        vlan.resize(14.max(vlan.len()), 0);
        cases.push(("vlan tag truncated", vlan));
        // IPv4 header truncated at every length.
        for len in [15, 20, 33] {
            cases.push(("ipv4 header truncated", good[..len].to_vec()));
        }
        // TCP header truncated (total length fixed up so only the TCP header is short).
        let mut short_tcp = good[..34 + 12].to_vec();
        short_tcp[16..18].copy_from_slice(&(20u16 + 12).to_be_bytes());
        fix_ip_checksum(&mut short_tcp);
        cases.push(("tcp header truncated", short_tcp));
        // UDP header truncated.
        let mut short_udp = good_udp[..34 + 4].to_vec();
        short_udp[16..18].copy_from_slice(&(20u16 + 4).to_be_bytes());
        fix_ip_checksum(&mut short_udp);
        cases.push(("udp header truncated", short_udp));
        // Frame shorter than the IPv4 total length says.
        cases.push(("payload truncated", good[..good.len() - 3].to_vec()));
        // Total length below the header size.
        let mut tiny_total = good.clone();
        tiny_total[16..18].copy_from_slice(&10u16.to_be_bytes());
        fix_ip_checksum(&mut tiny_total);
        cases.push(("total length < 20", tiny_total));
        // Bad IPv4 header checksum.
        let mut bad_check = good.clone();
        bad_check[24] ^= 0x55;
        cases.push(("bad ipv4 checksum", bad_check));
        // IP options (IHL 6).
        let mut options = good[..34].to_vec();
        options[14] = 0x46;
        options.extend_from_slice(&[1, 1, 1, 0]);
        options.extend_from_slice(&good[34..]);
        let total = (options.len() - 14) as u16;
        options[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ip_checksum(&mut options);
        cases.push(("ip options", options));
        // Fragments: MF set, and a non-zero offset.
        for frags in [0x2000u16, 0x0010] {
            let mut fragment = good.clone();
            fragment[20..22].copy_from_slice(&frags.to_be_bytes());
            fix_ip_checksum(&mut fragment);
            cases.push(("fragment", fragment));
        }
        // Not IPv4 despite the ether type.
        let mut version6 = good.clone();
        version6[14] = 0x65;
        cases.push(("ip version 6 in an ipv4 ether type", version6));
        // ICMP other than echo request to the VIP.
        let mut unreachable = echo_request(CLIENT, VIP);
        unreachable[34] = 3;
        cases.push(("icmp destination unreachable", unreachable));
        // Unknown transport protocol (GRE) to the VIP.
        let mut gre = good.clone();
        gre[23] = 47;
        fix_ip_checksum(&mut gre);
        cases.push(("gre", gre));

        for (what, frame) in cases {
            let (action, out) = b.run(b.client_if, &frame)?;
            assert_eq!(action, XDP_PASS, "{what}: action");
            assert_eq!(out, frame, "{what}: frame must be untouched");
        }
        assert_eq!(b.maps.traffic_of(0, Direction::Forward)?.packets, 0);
        assert_ne!(b.run(b.client_if, &good)?.0, XDP_ABORTED);
        Ok(())
    })
}

/// Recomputes the IPv4 header checksum of an untagged frame after a test altered it.
fn fix_ip_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let mut header = [0u8; 20];
    header.copy_from_slice(&frame[14..34]);
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let sum = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..14 + ihl])
        .map(|h| h.to_header().calc_header_checksum())
        .unwrap_or_else(|_| lb_common::csum::ipv4_header(&header));
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn the_service_vip_is_an_address_the_plan_reports() {
    with_rig("lbt-plan", |b| {
        let web = b.plan.service("web")?;
        assert_eq!(web.vip, Ipv4Addr::from(VIP));
        assert_eq!(web.backends[0].name, "master");
        assert_eq!(b.maps.active(web.id)?, web.backends[0].index);
        Ok(())
    })
}

/// Collects log records of the program.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn a_backend_whose_nic_vanished_is_dropped_and_logged() {
    with_rig("lbt-gone", |b| {
        let records = Records::default();
        let mut logger = b.dataplane.capture_logs(records.clone())?;
        let gone = b
            .plan
            .interfaces
            .iter()
            .find(|i| i.name == "t-x")
            .unwrap()
            .ifindex;
        lb_user::testbed::netns::ip(&["link", "del", "t-x"]).ok();
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        assert_eq!(
            unsafe { libc::if_nametoindex(c"t-x".as_ptr()) },
            0,
            "t-x still exists"
        );
        let frame = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, [198, 18, 1, 102], 1, 2);
        for _ in 0..100 {
            let (action, _) = b.run(b.client_if, &frame)?;
            assert_eq!(action, XDP_DROP);
        }
        logger.flush();
        let records = records.0.lock().unwrap().clone();
        let first = format!(
            "WARN no redirect port for ifindex {gone}: frame dropped (1 such drops on this CPU)"
        );
        assert!(records.contains(&first), "{records:?}");
        // 100 drops log only at 1, 2, 4, …, 64 per CPU: never one line per packet.
        assert!(
            records.len() <= 2 * 7,
            "{} records for 100 drops: {records:?}",
            records.len()
        );
        Ok(())
    })
}
