//! Reverse path: backend → client, rewritten so that the reply comes from the VIP.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{proto, Direction};

use crate::{
    maps,
    packet::frame_len,
    parse::{self, L2},
    rewrite::{self, Address},
    stats,
};

/// Handles a frame that arrived on a backend-facing NIC and is not addressed to a VIP.
///
/// It is rewritten when it comes from a backend's service port (or is an echo reply from a
/// backend) and goes to a client seen on the forward path; anything else is `XDP_PASS`.
#[inline(always)]
pub fn reverse(ctx: &XdpContext, l2: &L2) -> u32 {
    let Some(packet) = parse::ipv4(ctx, l2) else {
        return xdp_action::XDP_PASS;
    };
    if packet.protocol == proto::ICMP && packet.icmp_type != parse::ICMP_ECHO_REPLY {
        return xdp_action::XDP_PASS;
    }
    let Some(reply) = maps::reverse(packet.src, packet.protocol, packet.src_port) else {
        return xdp_action::XDP_PASS;
    };
    let Some(client) = maps::client(&packet.dst) else {
        return xdp_action::XDP_PASS;
    };
    if rewrite::macs(ctx, client.mac, client.iface_mac).is_none()
        || rewrite::address(ctx, l2, &packet, Address::Source, reply.vip).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(reply.backend, Direction::Reverse, frame_len(ctx));
    rewrite::transmit(ctx, client.ifindex)
}
