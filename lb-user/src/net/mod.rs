//! Facts about the host's network, read through rtnetlink: NICs, routes, neighbours, and
//! link and neighbour events ([`events`]).

pub mod events;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, LinkXdp, XdpAttached},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute},
        AddressFamily,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};

/// A NIC as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Hardware address.
    pub mac: [u8; 6],
    /// Whether it has carrier (and is up).
    pub carrier: bool,
    /// How an XDP program is attached to it, if one is.
    pub xdp: XdpAttachment,
}

/// How an XDP program is attached to a NIC, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachment {
    /// No XDP program.
    None,
    /// In the driver (native mode).
    Driver,
    /// In the generic (skb) path.
    Generic,
    /// Offloaded, or several programs.
    Other,
}

/// Whether IPv4 forwarding is on for NIC `name` (`None` when the kernel does not say). The
/// program's reverse-path check of new clients asks the kernel's FIB, which answers only for
/// NICs that forward.
pub fn forwarding(name: &str) -> Option<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim() != "0")
}

/// A connection to the kernel's routing netlink, for queries.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long to wait for the kernel to resolve a backend's MAC with ARP.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

impl Netlink {
    /// Opens the connection (in the current network namespace).
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open an rtnetlink socket")?;
        let task = tokio::spawn(connection);
        Ok(Netlink { handle, task })
    }

    /// Looks up NIC `name`.
    pub async fn link_by_name(&self, name: &str) -> Result<Link> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let message = match links.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => bail!(
                "network interface {name:?} does not exist (see `ip link` for the NICs of this host)"
            ),
        };
        let mac = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Address(address) => <[u8; 6]>::try_from(address.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("network interface {name:?} has no Ethernet address"))?;
        let flags = message.header.flags;
        let xdp = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                    LinkXdp::Attached(XdpAttached::None) => Some(XdpAttachment::None),
                    LinkXdp::Attached(XdpAttached::Driver) => Some(XdpAttachment::Driver),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(XdpAttachment::Generic),
                    LinkXdp::Attached(_) => Some(XdpAttachment::Other),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap_or(XdpAttachment::None);
        Ok(Link {
            name: name.to_string(),
            ifindex: message.header.index,
            mac,
            carrier: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
            xdp,
        })
    }

    /// Looks up the NIC with index `ifindex`.
    pub async fn link_by_index(&self, ifindex: u32) -> Result<Link> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let message = links
            .try_next()
            .await
            .ok()
            .flatten()
            .ok_or_else(|| anyhow!("no network interface with index {ifindex}"))?;
        let name = message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
            .ok_or_else(|| anyhow!("interface {ifindex} has no name"))?;
        self.link_by_name(&name).await
    }

    /// Removes an XDP program attached to NIC `ifindex` through netlink (driver and generic
    /// mode). A program held by a BPF link (another running `lb`) cannot be removed this way;
    /// the kernel then refuses with "busy".
    pub async fn detach_xdp(&self, ifindex: u32) -> Result<()> {
        const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
        const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
        for flags in [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE] {
            let mut message = LinkUnspec::new_with_index(ifindex).build();
            message.attributes.push(LinkAttribute::Xdp(vec![
                LinkXdp::Fd(-1),
                LinkXdp::Flags(flags),
            ]));
            self.handle.link().set(message).execute().await.map_err(|e| {
                anyhow!("cannot remove the XDP program on interface {ifindex}: {e} (held by another running program?)")
            })?;
        }
        Ok(())
    }

    /// Every IPv4 address of this host (this network namespace), on any NIC: the addresses
    /// the dataplane never accepts as clients.
    pub async fn local_ipv4_addresses(&self) -> Result<Vec<Ipv4Addr>> {
        let mut messages = self.handle.address().get().execute();
        let mut addresses = Vec::new();
        while let Some(message) = messages
            .try_next()
            .await
            .context("cannot list the host's addresses")?
        {
            for attribute in message.attributes.iter() {
                if let AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) = attribute
                {
                    if !addresses.contains(ip) {
                        addresses.push(*ip);
                    }
                }
            }
        }
        Ok(addresses)
    }

    /// Where the kernel sends packets for `ip`: the egress NIC's index and the next hop (the
    /// gateway, or `ip` itself when it is on-link).
    pub async fn route_to(&self, ip: Ipv4Addr) -> Result<(u32, Ipv4Addr)> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .build();
        let mut routes = self.handle.route().get(request).execute();
        let route = routes
            .try_next()
            .await
            .ok()
            .flatten()
            .ok_or_else(|| anyhow!("no route to {ip} (see `ip route get {ip}`)"))?;
        let mut oif = None;
        let mut gateway = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => gateway = Some(*gw),
                _ => {}
            }
        }
        let oif = oif.ok_or_else(|| anyhow!("the route to {ip} has no output interface"))?;
        Ok((oif, gateway.unwrap_or(ip)))
    }

    /// The MAC of neighbour `ip` on NIC `ifindex`, if the kernel knows it.
    pub async fn neighbour(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<[u8; 6]>> {
        let mut neighbours = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(message) = neighbours.try_next().await? {
            if let Some((index, address, mac)) = usable_neighbour(&message) {
                if (index, address) == (ifindex, ip) {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
    }

    /// The MAC to send packets for `ip` to, through NIC `link`: from the neighbour table,
    /// resolving it with ARP (the kernel's) when it is missing.
    pub async fn resolve_mac(&self, link: &Link, next_hop: Ipv4Addr) -> Result<[u8; 6]> {
        let no_answer = || {
            anyhow!(
                "no ARP answer from {next_hop} on {} within {RESOLVE_TIMEOUT:?}: is the backend up? \
                 (or give its `mac` in the config)",
                link.name
            )
        };
        tokio::time::timeout(
            RESOLVE_TIMEOUT,
            self.wait_for_mac(&link.name, link.ifindex, next_hop),
        )
        .await
        .map_err(|_| no_answer())?
    }

    /// Resolves the MAC of `next_hop` on NIC `iface` (index `ifindex`) with the kernel's
    /// ARP, asking again every 50 ms until it answers.
    pub async fn wait_for_mac(
        &self,
        iface: &str,
        ifindex: u32,
        next_hop: Ipv4Addr,
    ) -> Result<[u8; 6]> {
        if let Some(mac) = self.neighbour(ifindex, next_hop).await? {
            return Ok(mac);
        }
        // Any datagram toward the next hop makes the kernel resolve it; port 9 is "discard".
        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        socket.bind_device(Some(iface.as_bytes()))?;
        loop {
            let _ = socket.try_send_to(&[], (next_hop, 9).into());
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(mac) = self.neighbour(ifindex, next_hop).await? {
                return Ok(mac);
            }
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{text:?} is not a MAC address (expected six hex bytes like 02:00:00:00:00:01)");
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)
            .ok()
            .filter(|_| part.len() == 2)
            .ok_or_else(|| anyhow!("{text:?} is not a MAC address: bad byte {part:?}"))?;
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A neighbour entry whose MAC the kernel holds as usable (not failed or incomplete), as
/// (NIC, address, MAC); `None` for any other entry.
pub(crate) fn usable_neighbour(message: &NeighbourMessage) -> Option<(u32, Ipv4Addr, [u8; 6])> {
    let usable = matches!(
        message.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut destination = None;
    let mut mac = None;
    for attribute in message.attributes.iter() {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => destination = Some(*d),
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    Some((message.header.ifindex, destination?, mac?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:0a:FF:00:10:01").unwrap();
        assert_eq!(mac, [2, 10, 255, 0, 16, 1]);
        assert_eq!(format_mac(&mac), "02:0a:ff:00:10:01");
    }

    #[test]
    fn bad_macs_are_rejected() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "2:00:00:00:00:01",
            "02-00-00-00-00-01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
