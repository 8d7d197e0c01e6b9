//! ARP: answers requests for a VIP from XDP, so no host has to own the VIP.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Event, Iface};
use network_types::arp::ArpHdr;

use crate::{maps, packet::header_mut, parse::L2, rewrite, stats::counted};

const HTYPE_ETHERNET: [u8; 2] = [0, 1];
const PTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const OP_REQUEST: [u8; 2] = [0, 1];
const OP_REPLY: [u8; 2] = [0, 2];

/// Turns an Ethernet/IPv4 ARP request for a VIP into the reply, in place, and sends it back
/// with `XDP_TX`: the VIP is at this NIC's MAC. Gratuitous requests (sender = target) and
/// every other ARP frame go to the kernel, and so do requests for a VIP on the standby host
/// of a pair (counted): the VIP is the active host's.
#[inline(always)]
pub fn answer(ctx: &XdpContext, l2: &L2, iface: &Iface) -> u32 {
    let Some(arp) = header_mut::<ArpHdr>(ctx, l2.l3) else {
        return xdp_action::XDP_PASS;
    };
    if arp.htype != HTYPE_ETHERNET
        || arp.ptype != PTYPE_IPV4
        || arp.hlen != 6
        || arp.plen != 4
        || arp.oper != OP_REQUEST
        || arp.spa == arp.tpa
        || !maps::is_vip(&arp.tpa)
    {
        return xdp_action::XDP_PASS;
    }
    if maps::standby() {
        return counted(Event::Standby, xdp_action::XDP_PASS);
    }
    let (requester_mac, requester_ip, vip) = (arp.sha, arp.spa, arp.tpa);
    arp.oper = OP_REPLY;
    arp.sha = iface.mac;
    arp.spa = vip;
    arp.tha = requester_mac;
    arp.tpa = requester_ip;
    match rewrite::macs(ctx, requester_mac, iface.mac) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}
