//! Carrier events of NICs, as the kernel announces them (rtnetlink link group): the `link`
//! health check learns of a cable pulled or a peer gone within microseconds.

use std::time::Instant;

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{link::LinkFlags, RouteNetlinkMessage},
    sys::SocketAddr,
    MulticastGroup,
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

/// A subscription to link events. Subscribe before reading the NICs' current state, so that
/// no change between the two is missed.
pub struct CarrierEvents {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: JoinHandle<()>,
}

impl Drop for CarrierEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl CarrierEvents {
    /// Subscribes to the rtnetlink link group (of the current network namespace).
    pub fn subscribe() -> Result<Self> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .context("cannot subscribe to rtnetlink link events (needs CAP_NET_ADMIN)")?;
        Ok(CarrierEvents {
            messages,
            connection: tokio::spawn(connection),
        })
    }

    /// Calls `on_event` for every link message, in the calling task, until the socket
    /// closes (which is logged as an error: link checks then no longer see carrier losses).
    pub async fn run(mut self, mut on_event: impl FnMut(CarrierEvent)) {
        while let Some((message, _)) = self.messages.next().await {
            let received = Instant::now();
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) =
                message.payload
            {
                let flags = link.header.flags;
                on_event(CarrierEvent {
                    ifindex: link.header.index,
                    carrier: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
                    received,
                });
            }
        }
        tracing::error!(
            "the rtnetlink link event stream ended: carrier losses are no longer seen at once \
             (link checks still poll the last known state); restart lb"
        );
    }
}
