//! Forward path: client → VIP, rewritten to the backend of the packet's flow.
//!
//! A packet of a known flow goes to the flow's backend ([`known`]), unless that backend
//! may no longer keep it; a packet to a VIP without a flow starts one ([`new`]) on the
//! service's active backend, once its source has been checked.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    flow_flags, flow_state, proto, service_flags, Backend, Direction, Event, Flow, FlowKey,
    FLOW_REFRESH_NS,
};
use network_types::eth::EthHdr;

use crate::{
    maps,
    packet::{frame_len, header_mut},
    parse::{self, tcp_flags, Ipv4, L2},
    rewrite::{self, Address},
    route,
    state::{self, Side},
    stats::{self, counted},
    sync,
};

/// Handles a packet of the flow at `flow` (its key is `key`).
///
/// Outcomes: sent to the flow's backend (or, if that one may no longer keep it, to the
/// service's active backend, which the flow then follows); `XDP_DROP` when the packet
/// comes from another MAC or NIC than the flow's client, or the flow must move and the
/// service has no backend serving. An expired flow, or a new TCP connection on the tuple
/// of a closing one, is started afresh by [`new`].
#[inline(always)]
pub fn known(ctx: &XdpContext, l2: &L2, packet: &Ipv4, key: &FlowKey, flow: *mut Flow) -> u32 {
    // SAFETY: `flow` comes from a successful lookup and stays valid for this program run.
    // Other CPUs may update the same flow; every field is a plain value, and a lost
    // update of `seen_ns` or `state` is corrected by the flow's next packet.
    let flow = unsafe { &mut *flow };
    let now = maps::now();
    let idle = now.saturating_sub(flow.seen_ns);
    // Every timeout is at least the refresh interval: a flow seen since is live.
    let mut refresh = idle > FLOW_REFRESH_NS;
    if refresh {
        let Some(settings) = maps::settings() else {
            return xdp_action::XDP_ABORTED;
        };
        if idle > settings.timeout(packet.protocol, flow.state) {
            return new(ctx, l2, packet, key);
        }
    }
    let Some(eth) = header_mut::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    if eth.src_addr != flow.client_mac || ctx.ingress_ifindex() as u32 != flow.ifindex {
        return counted(Event::ClientMismatch, xdp_action::XDP_DROP);
    }
    if packet.protocol == proto::TCP
        && flow.state == flow_state::CLOSING
        && packet.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    {
        return new(ctx, l2, packet, key); // a new connection on the same ports
    }
    let active = maps::active(flow.service);
    if active != Some(flow.backend) && !may_stay(flow, now) {
        let Some(active) = active else {
            return counted(Event::NoBackend, xdp_action::XDP_DROP);
        };
        flow.backend = active;
        stats::count(Event::FlowMoved);
        refresh = true;
    }
    let Some(backend) = maps::backend(flow.backend) else {
        return xdp_action::XDP_ABORTED;
    };
    if state::advance(flow, packet, Side::Client) || refresh {
        flow.seen_ns = now;
        // Keeps the reply index entry fresh too, so LRU eviction does not take it alone;
        // never over another live flow's.
        if maps::reply_key_free(key, backend.ip, now)
            && maps::insert_reply(key, flow.backend, backend.ip).is_err()
        {
            stats::count(Event::FlowTableError);
        }
        sync::report(key, flow);
    }
    send(ctx, l2, packet, flow.backend, &backend)
}

/// Handles a packet to a VIP that belongs to no (live) flow: checks its source, finds its
/// service and starts a flow on the active backend.
///
/// Outcomes: sent to the active backend; `XDP_DROP` for a source no client can have (the
/// switch host's own addresses, VIPs, martians, an address not routed back out of this
/// NIC to this MAC), a service with no backend serving, a reply key another live flow
/// holds, or a flow the table refused; `XDP_PASS` when no service matches, or for ICMP other
/// than an echo request.
#[inline(always)]
pub fn new(ctx: &XdpContext, l2: &L2, packet: &Ipv4, key: &FlowKey) -> u32 {
    if packet.protocol == proto::ICMP && packet.icmp_type != parse::ICMP_ECHO_REQUEST {
        return counted(Event::NoService, xdp_action::XDP_PASS);
    }
    let Some(eth) = header_mut::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (client_mac, ifindex) = (eth.src_addr, ctx.ingress_ifindex() as u32);
    if let Some(refused) = refused_source(&packet.src) {
        return counted(refused, xdp_action::XDP_DROP);
    }
    let Some(service) = maps::service(packet.dst, packet.protocol, packet.dst_port) else {
        return counted(Event::NoService, xdp_action::XDP_PASS);
    };
    if !route::leads_back(ctx, packet.src, ifindex, &client_mac) {
        return counted(Event::SpoofedSource, xdp_action::XDP_DROP);
    }
    let Some(active) = maps::active(service.id) else {
        return counted(Event::NoBackend, xdp_action::XDP_DROP);
    };
    let Some(backend) = maps::backend(active) else {
        return xdp_action::XDP_ABORTED;
    };
    let now = maps::now();
    if !maps::reply_key_free(key, backend.ip, now) {
        return counted(Event::FlowCollision, xdp_action::XDP_DROP);
    }
    let sticky = packet.protocol == proto::TCP && service.flags & service_flags::GRACEFUL != 0;
    let mut flow = Flow {
        created_ns: now,
        seen_ns: now,
        backend: active,
        service: service.id,
        ifindex,
        client_mac,
        state: flow_state::NEW,
        flags: if sticky { flow_flags::STICKY } else { 0 },
        pad: 0,
    };
    state::advance(&mut flow, packet, Side::Client);
    if maps::insert_flow(key, &flow, backend.ip).is_err() {
        return counted(Event::FlowTableError, xdp_action::XDP_DROP);
    }
    sync::report(key, &flow);
    if packet.protocol == proto::TCP && !packet.has(tcp_flags::SYN) {
        stats::count(Event::FlowPickedUp);
    } else {
        stats::count(Event::FlowCreated);
    }
    send(ctx, l2, packet, active, &backend)
}

/// Why a packet from `src` may not start a flow, if it may not (before the route check).
#[inline(always)]
fn refused_source(src: &[u8; 4]) -> Option<Event> {
    // 0/8 ("this network"), 127/8 (loopback), 224/4 (multicast), 240/4 (reserved and the
    // broadcast address): never the source of a real client.
    if src[0] == 0 || src[0] == 127 || src[0] >= 224 || maps::is_vip(src) {
        return Some(Event::BadSource);
    }
    maps::is_local(src).then_some(Event::LocalSource)
}

/// Whether a sticky flow may stay on its backend although the service's active backend
/// is another one, or none (graceful failback or drain, within the backend's `KEEP`
/// deadline).
#[inline(always)]
fn may_stay(flow: &Flow, now: u64) -> bool {
    flow.flags & flow_flags::STICKY != 0 && now < maps::keep_until(flow.backend)
}

/// Rewrites `packet` toward backend `index` and sends it.
#[inline(always)]
fn send(ctx: &XdpContext, l2: &L2, packet: &Ipv4, index: u32, backend: &Backend) -> u32 {
    if rewrite::macs(ctx, backend.mac, backend.egress_mac).is_none()
        || rewrite::address(ctx, l2, packet, Address::Destination, backend.ip).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(index, Direction::Forward, frame_len(ctx));
    rewrite::transmit(ctx, backend.ifindex)
}
