//! The XDP program of the failover load balancer.
//!
//! One entry point, [`lb_xdp`], runs on every NIC the agent attaches it to. Each packet goes
//! through the same steps, top to bottom:
//!
//! 1. **parse** the Ethernet header; tagged (802.1Q) frames are not served — [`parse`];
//! 2. **ARP**: a request for a VIP on a client-facing NIC is answered in place — [`arp`];
//! 3. **look up** the packet in the connection table, as a client's packet (`FLOWS`), as a
//!    new flow to a VIP, or as a backend's reply (`REPLIES`) — [`maps`];
//! 4. **rewrite** addresses and checksums — [`forward`], [`reverse`], [`icmp`] (errors
//!    about a flow's packets), [`rewrite`];
//! 5. **forward** with `XDP_TX` or `XDP_REDIRECT` — [`rewrite::transmit`].
//!
//! In pair mode every flow written is also reported to the agent ([`sync`]), which streams
//! the connection table to the standby host.
//!
//! Only packets of flows the program created are rewritten. Anything else, or anything
//! that cannot be parsed and checksummed completely, is handed to the kernel untouched
//! (`XDP_PASS`); every refusal is counted in `EVENTS`. The standby host of a pair (`ROLE`)
//! serves nothing of the VIPs: it looks each frame up as the active host would, and drops
//! (counts) what it would have served.
#![no_std]
#![no_main]

mod arp;
mod forward;
mod icmp;
mod maps;
mod packet;
mod parse;
mod reverse;
mod rewrite;
mod route;
mod state;
mod stats;
mod sync;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{iface_flags, Event};
use network_types::eth::EtherType;
use stats::counted;

/// Entry point: classifies one frame and returns its XDP action.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Some(iface) = maps::iface(ctx.ingress_ifindex() as u32) else {
        // Not a NIC of ours (the agent has not configured it yet): hands off.
        return xdp_action::XDP_PASS;
    };
    let action = process(&ctx, &iface);
    stats::count_action(iface.slot, action);
    action
}

/// Passes every frame untouched.
///
/// veth delivers frames sent with `XDP_TX` or `XDP_REDIRECT` only to a peer that runs an XDP
/// program itself; attached to the far end of a veth pair (a container or test host), this
/// one makes that end receive them. Real NICs do not need it.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Parse → look up → rewrite → forward for one frame on a configured NIC.
#[inline(always)]
fn process(ctx: &XdpContext, iface: &lb_common::Iface) -> u32 {
    let Some(l2) = parse::ethernet(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if l2.tagged {
        // Served frames would cross segments; a tag is only valid on its own.
        return counted(Event::VlanTagged, xdp_action::XDP_PASS);
    }
    if l2.ether_type == EtherType::Arp as u16 {
        if iface.flags & iface_flags::CLIENT == 0 {
            return xdp_action::XDP_PASS;
        }
        return arp::answer(ctx, &l2, iface);
    }
    if l2.ether_type != EtherType::Ipv4 as u16 {
        return xdp_action::XDP_PASS;
    }
    let Some(packet) = parse::ipv4(ctx, &l2) else {
        if parse::ipv4_addresses(ctx, &l2).is_some_and(|ip| maps::is_vip(&ip.dst)) {
            return counted(Event::Unparsable, xdp_action::XDP_PASS);
        }
        return xdp_action::XDP_PASS;
    };
    if packet.is_icmp_error() {
        return icmp::error(ctx, &l2, &packet);
    }
    let key = packet.key();
    let Some(found) = look_up(&packet, &key) else {
        return xdp_action::XDP_PASS;
    };
    if maps::standby() {
        // The kernel here does not own the VIP and would route the frame the wrong way.
        return counted(Event::Standby, xdp_action::XDP_DROP);
    }
    match found {
        Found::Flow(flow) => forward::known(ctx, &l2, &packet, &key, flow),
        Found::Vip => forward::new(ctx, &l2, &packet, &key),
        Found::Reply(reply) => reverse::reply(ctx, &l2, &packet, &reply),
    }
}

/// What the connection table and the VIPs make of a packet the program may serve.
enum Found {
    /// A packet of the flow at this pointer (client → VIP).
    Flow(*mut lb_common::Flow),
    /// A packet to a VIP without a flow.
    Vip,
    /// A backend's answer to a flow, with its reply index entry.
    Reply(lb_common::Reply),
}

/// Looks `packet` (with flow key `key`) up: as a client's packet of a flow, a packet to a
/// VIP, or a backend's reply; `None` for anything else.
#[inline(always)]
fn look_up(packet: &parse::Ipv4, key: &lb_common::FlowKey) -> Option<Found> {
    if maps::may_be_vip(&packet.dst) {
        if let Some(flow) = maps::flow(key) {
            return Some(Found::Flow(flow));
        }
        if maps::is_vip(&packet.dst) {
            return Some(Found::Vip);
        }
    }
    maps::reply(key).map(Found::Reply)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License of the program; GPL-compatible so the kernel allows every helper it uses.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
