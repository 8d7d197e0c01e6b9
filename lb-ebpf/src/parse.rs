//! Parsing: finds the headers of a frame, and refuses (returns `None` for) anything the
//! program could not rewrite with correct checksums.
//!
//! Refused on purpose (the frame goes to the kernel untouched): IPv4 with options
//! (IHL ≠ 5), fragments (MF set or non-zero offset), a bad IPv4 header checksum, a total
//! length that disagrees with the frame, a transport header shorter than its minimum,
//! ICMP other than echo request and reply, destination unreachable and time exceeded.

use aya_ebpf::programs::XdpContext;
use lb_common::{csum, proto, FlowKey};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::packet::{frame_len, header_mut};

/// Where the network layer starts, and what it is.
pub struct L2 {
    /// Ether type of the network layer (network order, as `EtherType as u16`).
    pub ether_type: u16,
    /// Offset of the network header.
    pub l3: usize,
    /// The frame carries an 802.1Q tag.
    pub tagged: bool,
}

/// The two addresses of an IPv4 header, enough to decide whether a frame is ours.
pub struct Addresses {
    /// Destination address.
    pub dst: [u8; 4],
}

/// A fully checked IPv4 packet the program may rewrite.
pub struct Ipv4 {
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// [`proto`] number.
    pub protocol: u8,
    /// Source port (TCP, UDP); for ICMP the echo identifier of a request, 0 in a reply.
    pub src_port: [u8; 2],
    /// Destination port (TCP, UDP); for ICMP 0 in a request, the identifier in a reply.
    pub dst_port: [u8; 2],
    /// ICMP type, for ICMP.
    pub icmp_type: u8,
    /// TCP flags ([`tcp_flags`]), for TCP.
    pub tcp_flags: u8,
    /// Offset of the transport header.
    pub l4: usize,
}

/// Bits of [`Ipv4::tcp_flags`].
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 1 << 0;
    /// SYN.
    pub const SYN: u8 = 1 << 1;
    /// RST.
    pub const RST: u8 = 1 << 2;
    /// ACK.
    pub const ACK: u8 = 1 << 4;
}

impl Ipv4 {
    /// The packet's addresses, ports and protocol as a connection-table key.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey::new(
            self.protocol,
            self.src,
            self.src_port,
            self.dst,
            self.dst_port,
        )
    }

    /// Whether the packet is an ICMP error (destination unreachable, time exceeded), which
    /// quotes the header of the packet it is about.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.protocol == proto::ICMP
            && (self.icmp_type == ICMP_DEST_UNREACHABLE || self.icmp_type == ICMP_TIME_EXCEEDED)
    }

    /// Whether the packet has every one of the TCP `flags`.
    #[inline(always)]
    pub fn has(&self, flags: u8) -> bool {
        self.tcp_flags & flags == flags
    }
}

/// ICMP destination unreachable (fragmentation needed is its code 4).
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
/// ICMP time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// ICMP echo request type.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP echo reply type.
pub const ICMP_ECHO_REPLY: u8 = 0;

/// The Ethernet header and at most one 802.1Q tag.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<L2> {
    let eth: &mut EthHdr = header_mut(ctx, 0)?;
    let ether_type = eth.ether_type;
    if ether_type != EtherType::Ieee8021q as u16 {
        return Some(L2 {
            ether_type,
            l3: EthHdr::LEN,
            tagged: false,
        });
    }
    let vlan: &mut VlanHdr = header_mut(ctx, EthHdr::LEN)?;
    Some(L2 {
        ether_type: vlan.ether_type,
        l3: EthHdr::LEN + VlanHdr::LEN,
        tagged: true,
    })
}

/// The addresses of an IPv4 header, if its fixed part is present.
#[inline(always)]
pub fn ipv4_addresses(ctx: &XdpContext, l2: &L2) -> Option<Addresses> {
    let ip: &mut Ipv4Hdr = header_mut(ctx, l2.l3)?;
    Some(Addresses { dst: ip.dst_addr })
}

/// The IPv4 header and the transport header, checked in full.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l2: &L2) -> Option<Ipv4> {
    let ip: &mut Ipv4Hdr = header_mut(ctx, l2.l3)?;
    if ip.vihl != 0x45 {
        return None; // not IPv4, or options present
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & 0x3fff != 0 {
        return None; // a fragment (MF or offset)
    }
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    if total < Ipv4Hdr::LEN || l2.l3 + total > frame_len(ctx) {
        return None; // truncated, or a length that lies
    }
    if !csum::ipv4_header_ok(as_bytes(ip)) {
        return None;
    }
    let l4 = l2.l3 + Ipv4Hdr::LEN;
    let l4_len = total - Ipv4Hdr::LEN;
    let mut packet = Ipv4 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        protocol: ip.proto,
        src_port: [0, 0],
        dst_port: [0, 0],
        icmp_type: 0,
        tcp_flags: 0,
        l4,
    };
    match packet.protocol {
        proto::TCP => {
            let tcp: &mut TcpHdr = header_mut(ctx, l4)?;
            if l4_len < TcpHdr::LEN {
                return None;
            }
            packet.src_port = tcp.source;
            packet.dst_port = tcp.dest;
            packet.tcp_flags = (tcp.fin() as u8)
                | (tcp.syn() as u8) << 1
                | (tcp.rst() as u8) << 2
                | (tcp.ack() as u8) << 4;
        }
        proto::UDP => {
            let udp: &mut UdpHdr = header_mut(ctx, l4)?;
            if l4_len < UdpHdr::LEN {
                return None;
            }
            packet.src_port = udp.src;
            packet.dst_port = udp.dst;
        }
        proto::ICMP => {
            let icmp: &mut Icmpv4Hdr = header_mut(ctx, l4)?;
            if l4_len < Icmpv4Hdr::LEN {
                return None;
            }
            packet.icmp_type = icmp.type_;
            let id = [icmp.data[0], icmp.data[1]];
            match (icmp.type_, icmp.code) {
                (ICMP_ECHO_REQUEST, 0) => packet.src_port = id,
                (ICMP_ECHO_REPLY, 0) => packet.dst_port = id,
                (ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED, _) => {}
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(packet)
}

/// The 20 bytes of an IPv4 header.
#[inline(always)]
pub fn as_bytes(ip: &Ipv4Hdr) -> &[u8; 20] {
    // SAFETY: `Ipv4Hdr` is `#[repr(C)]`, 20 bytes of byte fields with no padding, so every
    // byte is initialised and the layout is exactly the wire format.
    unsafe { &*(ip as *const Ipv4Hdr as *const [u8; 20]) }
}
