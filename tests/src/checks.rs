//! Packet checks done with etherparse, independently of the code under test.

use anyhow::{bail, Context, Result};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// The interesting fields of a parsed IPv4 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source IPv4.
    pub src_ip: [u8; 4],
    /// Destination IPv4.
    pub dst_ip: [u8; 4],
}

/// Parses `frame` and verifies the IPv4 header checksum and the TCP, UDP or ICMP checksum
/// (a UDP checksum of zero means "none" and is accepted).
pub fn verify_checksums(frame: &[u8]) -> Result<Summary> {
    let packet = SlicedPacket::from_ethernet(frame).context("etherparse cannot parse the frame")?;
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &packet.link else {
        bail!("no Ethernet II header");
    };
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        bail!("no IPv4 header")
    };
    let header = ip.header().to_header();
    if header.calc_header_checksum() != header.header_checksum {
        bail!("bad IPv4 header checksum {:#06x}", header.header_checksum);
    }
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected =
                tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination())?;
            if expected != tcp.checksum() {
                bail!(
                    "bad TCP checksum {:#06x}, expected {expected:#06x}",
                    tcp.checksum()
                );
            }
        }
        Some(TransportSlice::Udp(udp)) => {
            if udp.checksum() != 0 {
                let expected = udp.to_header().calc_checksum_ipv4(&header, udp.payload())?;
                if expected != udp.checksum() {
                    bail!(
                        "bad UDP checksum {:#06x}, expected {expected:#06x}",
                        udp.checksum()
                    );
                }
            }
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let expected = icmp.header().icmp_type.calc_checksum(icmp.payload());
            if expected != icmp.checksum() {
                bail!(
                    "bad ICMP checksum {:#06x}, expected {expected:#06x}",
                    icmp.checksum()
                );
            }
        }
        other => bail!("unexpected transport {other:?}"),
    }
    Ok(Summary {
        dst_mac: eth.destination(),
        src_mac: eth.source(),
        src_ip: ip.header().source(),
        dst_ip: ip.header().destination(),
    })
}

/// Parses the packet an ICMP error in `frame` quotes (after [`verify_checksums`] checked the
/// error itself), verifies the quoted IPv4 header checksum and, when the whole quoted
/// datagram is there, its TCP or UDP checksum; returns the quoted (source, destination).
pub fn verify_quoted(frame: &[u8]) -> Result<([u8; 4], [u8; 4])> {
    let packet = SlicedPacket::from_ethernet(frame).context("etherparse cannot parse the frame")?;
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else {
        bail!("not an ICMP message");
    };
    let quoted = icmp.payload();
    let inner = etherparse::Ipv4HeaderSlice::from_slice(quoted)
        .context("the quoted IPv4 header does not parse")?
        .to_header();
    if inner.calc_header_checksum() != inner.header_checksum {
        bail!(
            "bad quoted IPv4 header checksum {:#06x}",
            inner.header_checksum
        );
    }
    let total = usize::from(inner.total_len);
    if quoted.len() >= total {
        let transport = &quoted[inner.header_len()..total];
        let (stored, expected) = match inner.protocol {
            etherparse::IpNumber::UDP => {
                let udp = etherparse::UdpSlice::from_slice(transport)?;
                let stored = udp.checksum();
                if stored == 0 {
                    (0, 0)
                } else {
                    (
                        stored,
                        udp.to_header().calc_checksum_ipv4(&inner, udp.payload())?,
                    )
                }
            }
            etherparse::IpNumber::TCP => {
                let tcp = etherparse::TcpSlice::from_slice(transport)?;
                (
                    tcp.checksum(),
                    tcp.calc_checksum_ipv4(inner.source, inner.destination)?,
                )
            }
            _ => (0, 0),
        };
        if stored != expected {
            bail!("bad quoted transport checksum {stored:#06x}, expected {expected:#06x}");
        }
    }
    Ok((inner.source, inner.destination))
}
