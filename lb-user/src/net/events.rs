//! Link and neighbour events, as the kernel announces them (rtnetlink link and neighbour
//! groups): the `link` health check learns of a cable pulled within microseconds, a
//! backend's new MAC is seen as soon as the kernel learns it, and a NIC deleted and made
//! again is noticed.
//!
//! When the kernel had to drop events because the socket's buffer was full (an overrun,
//! `ENOBUFS`), every link and neighbour is read again and announced as if it had changed:
//! nothing is left as it was before the lost events.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        link::{LinkAttribute, LinkFlags, LinkMessage},
        neighbour::NeighbourMessage,
        AddressFamily, RouteNetlinkMessage,
    },
    sys::SocketAddr,
    Handle, MulticastGroup,
};
use tokio::task::JoinHandle;

/// A NIC's carrier changed (or was re-announced).
#[derive(Debug, Clone, Copy)]
pub struct CarrierEvent {
    /// The NIC.
    pub ifindex: u32,
    /// Whether it is up with carrier.
    pub carrier: bool,
    /// When the message was read: the start of the failover clock.
    pub received: Instant,
}

/// Something the kernel announced.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A NIC's state (also its first announcement, or a re-read after an overrun).
    Link {
        /// Its carrier.
        carrier: CarrierEvent,
        /// Its name.
        name: String,
    },
    /// Events were lost and everything was announced again after this.
    Resynced,
    /// The kernel knows `ip`'s MAC on NIC `ifindex` (learnt, changed, or re-read).
    Neighbour {
        /// The NIC.
        ifindex: u32,
        /// The neighbour's address.
        ip: Ipv4Addr,
        /// Its MAC.
        mac: [u8; 6],
    },
}

/// A subscription to link and neighbour events. Subscribe before reading the NICs' current
/// state, so that no change between the two is missed.
pub struct NetEvents {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for NetEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl NetEvents {
    /// Subscribes to the rtnetlink link and neighbour groups (of the current network
    /// namespace) on the runtime `on`: the socket belongs to that runtime's reactor and
    /// its connection task runs there, so the thread that reads an event is the one that
    /// acts on it ([`NetEvents::run`] is to be spawned there too).
    ///
    /// `LB_NETLINK_RCVBUF` (bytes) sets the socket's receive buffer, for hosts whose
    /// bursts of link events overrun the default one (an overrun costs a full re-read).
    pub fn subscribe(on: &tokio::runtime::Handle) -> Result<Self> {
        let _runtime = on.enter();
        let (mut connection, handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .context("cannot subscribe to rtnetlink events (needs CAP_NET_ADMIN)")?;
        if let Some(size) = std::env::var("LB_NETLINK_RCVBUF")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            use rtnetlink::sys::AsyncSocket;
            connection
                .socket_mut()
                .socket_mut()
                .set_rx_buf_sz(size)
                .context("cannot set the rtnetlink receive buffer (LB_NETLINK_RCVBUF)")?;
        }
        Ok(NetEvents {
            messages,
            handle,
            connection: tokio::spawn(connection),
        })
    }

    /// Calls `on_event` for every event, in the calling task, until the socket closes
    /// (which is logged as an error: the agent's `/healthz` then fails, and a service
    /// manager's watchdog restarts it).
    pub async fn run(mut self, mut on_event: impl FnMut(NetEvent)) {
        while let Some((message, _)) = self.messages.next().await {
            let received = Instant::now();
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    on_event(link_event(&link, received));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    // A NIC deleted has no carrier any more.
                    let mut event = link_event(&link, received);
                    if let NetEvent::Link { carrier, .. } = &mut event {
                        carrier.carrier = false;
                    }
                    on_event(event);
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(neighbour)) => {
                    on_event_opt(neighbour_event(&neighbour), &mut on_event);
                }
                NetlinkPayload::Overrun(_) => {
                    tracing::warn!(
                        "rtnetlink events were lost (socket buffer overrun); reading every link \
                         and neighbour again"
                    );
                    on_event(NetEvent::Resynced);
                    if let Err(e) = self.resync(&mut on_event).await {
                        tracing::error!(error = %format!("{e:#}"), "cannot read the links and neighbours again");
                    }
                }
                _ => {}
            }
        }
        tracing::error!(
            "the rtnetlink event stream ended: carrier losses and new MACs are no longer seen"
        );
    }

    /// Announces every link and every IPv4 neighbour as they are now.
    async fn resync(&self, on_event: &mut impl FnMut(NetEvent)) -> Result<()> {
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await? {
            on_event(link_event(&link, Instant::now()));
        }
        let mut neighbours = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(neighbour) = neighbours.try_next().await? {
            on_event_opt(neighbour_event(&neighbour), on_event);
        }
        Ok(())
    }
}

fn on_event_opt(event: Option<NetEvent>, on_event: &mut impl FnMut(NetEvent)) {
    if let Some(event) = event {
        on_event(event);
    }
}

fn link_event(link: &LinkMessage, received: Instant) -> NetEvent {
    let flags = link.header.flags;
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default();
    NetEvent::Link {
        carrier: CarrierEvent {
            ifindex: link.header.index,
            carrier: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
            received,
        },
        name,
    }
}

/// A neighbour whose MAC the kernel holds as usable.
fn neighbour_event(neighbour: &NeighbourMessage) -> Option<NetEvent> {
    let (ifindex, ip, mac) = super::usable_neighbour(neighbour)?;
    Some(NetEvent::Neighbour { ifindex, ip, mac })
}
