//! Forward path: client → VIP, rewritten to the service's active backend.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{proto, Direction, Iface, Neighbor};
use network_types::eth::EthHdr;

use crate::{
    maps,
    packet::{frame_len, header_mut},
    parse::{self, L2},
    rewrite::{self, Address},
    stats,
};

/// Handles a frame addressed to a VIP.
///
/// Outcomes: rewritten and sent to the active backend; `XDP_DROP` when the service has no
/// backend serving; `XDP_PASS` when no service matches the protocol or port, or the packet
/// cannot be checked completely (see [`parse`]).
#[inline(always)]
pub fn forward(ctx: &XdpContext, l2: &L2, iface: &Iface) -> u32 {
    let Some(packet) = parse::ipv4(ctx, l2) else {
        return xdp_action::XDP_PASS;
    };
    if packet.protocol == proto::ICMP && packet.icmp_type != parse::ICMP_ECHO_REQUEST {
        return xdp_action::XDP_PASS;
    }
    let Some(service) = maps::service(packet.dst, packet.protocol, packet.dst_port) else {
        return xdp_action::XDP_PASS;
    };
    let Some((index, backend)) = maps::active_backend(service) else {
        return xdp_action::XDP_DROP;
    };
    let Some(eth) = header_mut::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let seen = Neighbor {
        mac: eth.src_addr,
        iface_mac: iface.mac,
        ifindex: ctx.ingress_ifindex() as u32,
    };
    maps::learn_client(&packet.src, &seen);

    if rewrite::macs(ctx, backend.mac, backend.egress_mac).is_none()
        || rewrite::address(ctx, l2, &packet, Address::Destination, backend.ip).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(index, Direction::Forward, frame_len(ctx));
    rewrite::transmit(ctx, backend.ifindex)
}
