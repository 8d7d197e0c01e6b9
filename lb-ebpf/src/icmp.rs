//! ICMP errors about a flow's packets — destination unreachable (fragmentation needed among
//! them) and time exceeded — carried to the flow's other end with the quoted header
//! rewritten too, so that path-MTU discovery and traceroute work through the VIP.
//!
//! An error quotes the header of the packet it is about. Mirrored, that header is the key
//! of the flow: a packet the program sent to a backend (client → backend) mirrors into the
//! flow's reply key; a reply it sent to a client (VIP → client) mirrors into the flow's key.
//! An error that matches no flow is left to the kernel like any other frame; one that
//! arrives from anywhere but the flow's own end is refused as the flow's other packets are
//! (passed from the backend side, dropped from the client side, counted).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{csum, proto, Direction, Event, Flow, FlowKey, Reply};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr};

use crate::{
    maps,
    packet::{frame_len, header_mut},
    parse::{Ipv4, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, L2},
    reverse,
    rewrite::{self, Address},
    stats::{self, counted},
};

/// Length of the ICMP header before the quoted packet.
const ICMP_HEADER_LEN: usize = 8;

/// The header an ICMP error quotes.
struct Quote {
    /// Offset of the quoted IPv4 header.
    l3: usize,
    /// Offset of the quoted transport header (at least 8 bytes of it are in the frame).
    l4: usize,
    /// The quoted packet's addresses, ports and protocol, as [`Ipv4`] has them.
    key: FlowKey,
}

/// Handles ICMP error `packet`: carries it to the other end of the flow it is about; on the
/// standby host of a pair, drops it (counted) instead.
#[inline(always)]
pub fn error(ctx: &XdpContext, l2: &L2, packet: &Ipv4) -> u32 {
    let Some((quote, mirrored)) = about(ctx, packet) else {
        return xdp_action::XDP_PASS;
    };
    // About a reply the program sent to a client: goes to the flow's backend. About a
    // packet the program sent to a backend: goes to the flow's client.
    let toward = match maps::flow(&mirrored) {
        Some(flow) => Toward::Backend(flow),
        None => match maps::reply(&mirrored) {
            Some(reply) => Toward::Client(reply),
            None => return xdp_action::XDP_PASS,
        },
    };
    if maps::standby() {
        return counted(Event::Standby, xdp_action::XDP_DROP);
    }
    match toward {
        Toward::Backend(flow) => toward_backend(ctx, l2, packet, &quote, flow),
        Toward::Client(reply) => toward_client(ctx, l2, packet, &quote, &reply),
    }
}

/// Where an ICMP error about a flow goes.
enum Toward {
    /// To the backend of the flow at this pointer.
    Backend(*mut Flow),
    /// To the client of this reply index entry's flow.
    Client(Reply),
}

/// The quoted header of ICMP error `packet` and the key the flow it is about would be
/// found under (the quoted packet's, mirrored), when it goes to the quoted packet's sender.
#[inline(always)]
fn about(ctx: &XdpContext, packet: &Ipv4) -> Option<(Quote, FlowKey)> {
    let quote = quote(ctx, packet)?;
    let q = &quote.key;
    if packet.dst != q.src {
        return None; // an error goes to the quoted packet's sender
    }
    let mirrored = FlowKey::new(q.proto, q.dst, q.dst_port, q.src, q.src_port);
    Some((quote, mirrored))
}

/// The quoted header of ICMP error `packet`, if it is one the program could have sent:
/// IPv4 without options, TCP or UDP (ports), or ICMP echo (identifier).
#[inline(always)]
fn quote(ctx: &XdpContext, packet: &Ipv4) -> Option<Quote> {
    let l3 = packet.l4 + ICMP_HEADER_LEN;
    let ip: &mut Ipv4Hdr = header_mut(ctx, l3)?;
    if ip.vihl != 0x45 {
        return None;
    }
    let (src, dst, protocol) = (ip.src_addr, ip.dst_addr, ip.proto);
    let l4 = l3 + Ipv4Hdr::LEN;
    let head: &mut [u8; 8] = header_mut(ctx, l4)?;
    let (src_port, dst_port) = match protocol {
        proto::TCP | proto::UDP => ([head[0], head[1]], [head[2], head[3]]),
        proto::ICMP => match (head[0], [head[4], head[5]]) {
            (ICMP_ECHO_REQUEST, id) => (id, [0, 0]),
            (ICMP_ECHO_REPLY, id) => ([0, 0], id),
            _ => return None,
        },
        _ => return None,
    };
    Some(Quote {
        l3,
        l4,
        key: FlowKey::new(protocol, src, src_port, dst, dst_port),
    })
}

/// An error from the backend's side about a packet sent to backend `reply.backend`: the
/// quoted destination becomes the VIP (and so does the error's source, if the backend
/// itself sent it), and it goes to the flow's client.
#[inline(always)]
fn toward_client(ctx: &XdpContext, l2: &L2, packet: &Ipv4, quote: &Quote, reply: &Reply) -> u32 {
    let backend = match reverse::sender(ctx, reply) {
        Ok(backend) => backend,
        Err(action) => return action,
    };
    let Some(flow) = maps::flow(&reply.flow) else {
        return counted(Event::ReplyNoFlow, xdp_action::XDP_PASS);
    };
    // SAFETY: a pointer from a successful lookup, valid for this program run; read only.
    let flow = unsafe { *flow };
    let Some(client_iface) = maps::iface(flow.ifindex) else {
        return xdp_action::XDP_PASS;
    };
    let vip = reply.flow.dst;
    if quoted_address(ctx, packet, quote, Address::Destination, vip).is_none()
        || (packet.src == backend.ip
            && rewrite::address(ctx, l2, packet, Address::Source, vip).is_none())
        || rewrite::macs(ctx, flow.client_mac, client_iface.mac).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(reply.backend, Direction::Reverse, frame_len(ctx));
    rewrite::transmit(ctx, flow.ifindex)
}

/// An error from the client's side about a reply sent from the VIP: the error's destination
/// and the quoted source become the flow's backend, and it goes to that backend.
#[inline(always)]
fn toward_backend(ctx: &XdpContext, l2: &L2, packet: &Ipv4, quote: &Quote, flow: *mut Flow) -> u32 {
    // SAFETY: a pointer from a successful lookup, valid for this program run; read only.
    let flow = unsafe { *flow };
    let Some(eth) = header_mut::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    if eth.src_addr != flow.client_mac || ctx.ingress_ifindex() as u32 != flow.ifindex {
        return counted(Event::ClientMismatch, xdp_action::XDP_DROP);
    }
    let Some(backend) = maps::backend(flow.backend) else {
        return xdp_action::XDP_ABORTED;
    };
    if quoted_address(ctx, packet, quote, Address::Source, backend.ip).is_none()
        || rewrite::address(ctx, l2, packet, Address::Destination, backend.ip).is_none()
        || rewrite::macs(ctx, backend.mac, backend.egress_mac).is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    stats::count_traffic(flow.backend, Direction::Forward, frame_len(ctx));
    rewrite::transmit(ctx, backend.ifindex)
}

/// Replaces one address of the quoted header with `new`, and fixes the quoted IPv4 and
/// transport checksums (where quoted) and the ICMP checksum, which covers all of them.
#[inline(always)]
fn quoted_address(
    ctx: &XdpContext,
    packet: &Ipv4,
    quote: &Quote,
    which: Address,
    new: [u8; 4],
) -> Option<()> {
    let icmp: &mut Icmpv4Hdr = header_mut(ctx, packet.l4)?;
    let ip: &mut Ipv4Hdr = header_mut(ctx, quote.l3)?;
    let old = match which {
        Address::Source => core::mem::replace(&mut ip.src_addr, new),
        Address::Destination => core::mem::replace(&mut ip.dst_addr, new),
    };
    let old_ip_check = ip.check;
    ip.check = csum::replace4(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    let mut check = u16::from_be_bytes(icmp.check);
    check = csum::replace4(check, old, new);
    check = csum::replace2(check, old_ip_check, ip.check);
    // The quoted transport checksum, where the quote holds it (UDP's always, TCP's when
    // more than 8 bytes are quoted), covers the address through the pseudo-header.
    let at = match quote.key.proto {
        proto::UDP => quote.l4 + 6,
        proto::TCP => quote.l4 + 16,
        _ => 0,
    };
    if at != 0 {
        if let Some(l4_check) = header_mut::<[u8; 2]>(ctx, at) {
            let old_l4 = *l4_check;
            let value = u16::from_be_bytes(old_l4);
            let updated = if quote.key.proto == proto::UDP {
                csum::udp_replace4(value, old, new)
            } else {
                csum::replace4(value, old, new)
            };
            *l4_check = updated.to_be_bytes();
            check = csum::replace2(check, old_l4, *l4_check);
        }
    }
    icmp.check = check.to_be_bytes();
    Some(())
}
