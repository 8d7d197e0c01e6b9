//! Rewriting a checked packet in place, and sending it on.
//!
//! Addresses change together with every checksum that covers them, each updated
//! incrementally (RFC 1624): the IPv4 header checksum (the header was verified when it was
//! parsed), and the TCP and UDP checksums, whose pseudo-header holds the addresses; ICMP's
//! checksum does not cover them.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{csum, proto, Event};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    maps::TX_PORTS,
    packet::header_mut,
    parse::{Ipv4, L2},
    stats,
};

/// Which IPv4 address to replace.
#[derive(Clone, Copy)]
pub enum Address {
    /// The source (reverse path: backend → VIP).
    Source,
    /// The destination (forward path: VIP → backend).
    Destination,
}

/// Sets both MAC addresses of the frame.
#[inline(always)]
pub fn macs(ctx: &XdpContext, dst: [u8; 6], src: [u8; 6]) -> Option<()> {
    let eth: &mut EthHdr = header_mut(ctx, 0)?;
    eth.dst_addr = dst;
    eth.src_addr = src;
    Some(())
}

/// Replaces one IPv4 address of `packet` with `new` and fixes every checksum it is part of.
#[inline(always)]
pub fn address(
    ctx: &XdpContext,
    l2: &L2,
    packet: &Ipv4,
    which: Address,
    new: [u8; 4],
) -> Option<()> {
    let ip: &mut Ipv4Hdr = header_mut(ctx, l2.l3)?;
    let old = match which {
        Address::Source => core::mem::replace(&mut ip.src_addr, new),
        Address::Destination => core::mem::replace(&mut ip.dst_addr, new),
    };
    // The header was verified on parsing, so an incremental update keeps it correct.
    ip.check = csum::replace4(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    match packet.protocol {
        proto::TCP => {
            let tcp: &mut TcpHdr = header_mut(ctx, packet.l4)?;
            tcp.check = csum::replace4(u16::from_be_bytes(tcp.check), old, new).to_be_bytes();
        }
        proto::UDP => {
            let udp: &mut UdpHdr = header_mut(ctx, packet.l4)?;
            udp.check = csum::udp_replace4(u16::from_be_bytes(udp.check), old, new).to_be_bytes();
        }
        _ => {}
    }
    Some(())
}

/// Sends the rewritten frame out of NIC `ifindex`: back out of the NIC it came in on with
/// `XDP_TX`, through the `TX_PORTS` devmap otherwise (dropped, with a log record the agent
/// forwards, if that NIC is not in it).
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    match TX_PORTS.redirect(ifindex, u64::from(xdp_action::XDP_DROP)) {
        Ok(action) => action,
        Err(action) => {
            // The agent puts every NIC it plans with into TX_PORTS, so this means the maps
            // and the NICs disagree (an interface was re-created under the agent). Logged on
            // the 1st, 2nd, 4th, 8th… such drop of each CPU, never at line rate.
            let drops = stats::count(Event::NoRedirectPort);
            if drops & (drops - 1) == 0 {
                aya_log_ebpf::warn!(
                    ctx,
                    "no redirect port for ifindex {}: frame dropped ({} such drops on this CPU)",
                    ifindex,
                    drops
                );
            }
            action
        }
    }
}
