//! Gratuitous ARP: the frames that tell a segment "this VIP is at this MAC now", sent when
//! this host becomes the active one of a pair.
//!
//! Each is an ARP request for the VIP from the VIP (sender = target address), broadcast,
//! from the MAC of the client NIC it goes out of, which is also the MAC the program answers
//! ARP requests for the VIP with. Hosts and routers that have the VIP in their ARP cache
//! update it at once; the standby host's program leaves such frames to its kernel.

use std::{net::Ipv4Addr, os::fd::OwnedFd, time::Duration};

use anyhow::{Context, Result};
use nix::sys::socket::{
    sendto, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike,
};
use pnet_packet::{
    arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket},
    ethernet::{EtherTypes, MutableEthernetPacket},
    MutablePacket,
};

use crate::{config::Role, plan::Plan};

/// Length of an Ethernet + ARP (IPv4) frame, without padding.
const FRAME_LEN: usize = 14 + 28;

/// A client NIC to announce the VIPs on.
#[derive(Debug, Clone)]
pub struct Nic {
    /// Its name, for errors.
    pub name: String,
    /// Its ifindex.
    pub ifindex: u32,
    /// Its MAC: where the VIPs are.
    pub mac: [u8; 6],
}

/// What to announce: every VIP of the plan, on every client NIC.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// The client NICs.
    pub nics: Vec<Nic>,
    /// The VIPs, each once.
    pub vips: Vec<Ipv4Addr>,
}

/// How much was announced.
#[derive(Debug, Clone, Copy)]
pub struct Announced {
    /// VIPs.
    pub vips: usize,
    /// On this many NICs.
    pub nics: usize,
}

/// The client NICs and VIPs of `plan`.
pub fn targets(plan: &Plan) -> Targets {
    let nics = plan
        .interfaces
        .iter()
        .filter(|i| matches!(i.role, Role::Client | Role::Both))
        .map(|i| Nic {
            name: i.name.clone(),
            ifindex: i.ifindex,
            mac: i.mac,
        })
        .collect();
    let mut vips: Vec<Ipv4Addr> = plan.services.iter().map(|s| s.vip).collect();
    vips.sort();
    vips.dedup();
    Targets { nics, vips }
}

/// Sends one gratuitous ARP per VIP and NIC at once, and `rounds - 1` more rounds
/// `interval` apart in the background (a frame lost on a busy segment is made up for),
/// each only while `still_active` says so: a host that became standby meanwhile must not
/// point the clients back at itself.
pub fn announce(
    targets: &Targets,
    rounds: u32,
    interval: Duration,
    still_active: impl Fn() -> bool + Send + 'static,
) -> Result<Announced> {
    let announced = Announced {
        vips: targets.vips.len(),
        nics: targets.nics.len(),
    };
    if rounds == 0 || targets.vips.is_empty() {
        return Ok(announced);
    }
    let socket = packet_socket()?;
    send_round(&socket, targets)?;
    if rounds > 1 {
        let targets = targets.clone();
        tokio::spawn(async move {
            for _ in 1..rounds {
                tokio::time::sleep(interval).await;
                if !still_active() {
                    return;
                }
                if let Err(e) = send_round(&socket, &targets) {
                    tracing::warn!("gratuitous ARP: {e:#}");
                    return;
                }
            }
        });
    }
    Ok(announced)
}

/// A raw packet socket that only sends.
fn packet_socket() -> Result<OwnedFd> {
    // Protocol 0: the socket receives nothing.
    socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("cannot open a packet socket for gratuitous ARP (needs CAP_NET_RAW)")
}

/// One gratuitous ARP for every VIP on every NIC.
fn send_round(socket: &OwnedFd, targets: &Targets) -> Result<()> {
    for nic in &targets.nics {
        let to = broadcast_on(nic.ifindex);
        for vip in &targets.vips {
            let frame = frame(nic.mac, *vip);
            sendto(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                &frame,
                &to,
                MsgFlags::empty(),
            )
            .with_context(|| format!("cannot send a gratuitous ARP for {vip} on {}", nic.name))?;
        }
    }
    Ok(())
}

/// The gratuitous ARP request for `vip` at `mac`.
fn frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut buf = [0u8; FRAME_LEN];
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("frame holds an Ethernet header");
    eth.set_destination([0xff; 6].into());
    eth.set_source(mac.into());
    eth.set_ethertype(EtherTypes::Arp);
    let mut arp =
        MutableArpPacket::new(eth.payload_mut()).expect("frame holds an ARP packet after it");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(mac.into());
    arp.set_sender_proto_addr(vip);
    arp.set_target_hw_addr([0xff; 6].into());
    arp.set_target_proto_addr(vip);
    buf
}

/// The link-layer broadcast address on NIC `ifindex`, as `sendto` takes it.
fn broadcast_on(ifindex: u32) -> LinkAddr {
    // SAFETY: sockaddr_ll is plain old data, for which all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is a complete, initialised sockaddr_ll of `len` bytes, alive for the
    // call; from_raw copies it.
    unsafe { LinkAddr::from_raw(std::ptr::addr_of!(sll).cast(), Some(len)) }
        .expect("a sockaddr_ll of the right family and length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_is_a_broadcast_request_from_the_vip_for_the_vip() {
        let mac = [2, 0, 0, 0, 1, 1];
        let frame = frame(mac, Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        // htype 1, ptype IPv4, hlen 6, plen 4, request.
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[198, 18, 0, 10]);
        assert_eq!(&frame[38..42], &[198, 18, 0, 10]);
    }
}
