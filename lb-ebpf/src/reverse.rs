//! Reverse path: backend → client, rewritten so that the reply comes from the VIP.
//!
//! Only a packet that answers a flow the program created, and that arrives from that
//! flow's backend (on its NIC, from its MAC), is rewritten; everything else goes to the
//! kernel untouched.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Direction, Event, Reply, FLOW_REFRESH_NS};
use network_types::eth::EthHdr;

use crate::{
    maps,
    packet::{frame_len, header_mut},
    parse::{Ipv4, L2},
    rewrite::{self, Address},
    state::{self, Side},
    stats::{self, counted},
    sync,
};

/// Handles `packet`, whose addresses and ports match the reply index entry `reply`.
///
/// Outcomes: rewritten to come from the VIP and sent to the flow's client; `XDP_PASS`
/// (counted) when it arrived on another NIC or from another MAC than the backend's, or
/// its flow has expired.
#[inline(always)]
pub fn reply(ctx: &XdpContext, l2: &L2, packet: &Ipv4, reply: &Reply) -> u32 {
    if let Err(action) = sender(ctx, reply) {
        return action;
    }
    let Some(flow) = maps::flow(&reply.flow) else {
        return counted(Event::ReplyNoFlow, xdp_action::XDP_PASS);
    };
    // SAFETY: as in `forward::known`.
    let flow = unsafe { &mut *flow };
    let now = maps::now();
    let idle = now.saturating_sub(flow.seen_ns);
    // Every timeout is at least the refresh interval: a flow seen since is live.
    let refresh = idle > FLOW_REFRESH_NS;
    if refresh && maps::settings().is_none_or(|s| idle > s.timeout(packet.protocol, flow.state)) {
        return counted(Event::ReplyNoFlow, xdp_action::XDP_PASS);
    }
    if state::advance(flow, packet, Side::Backend) || refresh {
        flow.seen_ns = now;
        sync::report(&reply.flow, flow);
    }
    let Some(client_iface) = maps::iface(flow.ifindex) else {
        return xdp_action::XDP_PASS;
    };
    if rewrite::macs(ctx, flow.client_mac, client_iface.mac).is_none()
        || rewrite::address(ctx, l2, packet, Address::Source, reply.flow.dst).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(reply.backend, Direction::Reverse, frame_len(ctx));
    rewrite::transmit(ctx, flow.ifindex)
}

/// The backend `reply` must come from, when the frame does come from it: on the NIC that
/// backend is reached through, from its MAC. Otherwise the frame's action (`XDP_PASS`,
/// counted).
#[inline(always)]
pub fn sender(ctx: &XdpContext, reply: &Reply) -> Result<Backend, u32> {
    let Some(backend) = maps::backend(reply.backend) else {
        return Err(xdp_action::XDP_PASS);
    };
    if ctx.ingress_ifindex() as u32 != backend.ifindex {
        return Err(counted(Event::ReplyWrongNic, xdp_action::XDP_PASS));
    }
    let Some(eth) = header_mut::<EthHdr>(ctx, 0) else {
        return Err(xdp_action::XDP_PASS);
    };
    if eth.src_addr != backend.mac {
        return Err(counted(Event::ReplyWrongMac, xdp_action::XDP_PASS));
    }
    Ok(backend)
}
