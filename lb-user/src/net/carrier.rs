//! Carrier events of NICs, as the kernel announces them (rtnetlink link group): the `link`
//! health check learns of a cable pulled or a peer gone within microseconds.

use std::time::Instant;

use anyhow::{Context, Result};
use futures::StreamExt;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{link::LinkFlags, RouteNetlinkMessage},
    MulticastGroup,
};

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

/// Subscribes to link events and calls `on_event` for each, in the calling task, until the
/// socket closes.
pub async fn watch(mut on_event: impl FnMut(CarrierEvent)) -> Result<()> {
    let (connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("cannot subscribe to rtnetlink link events")?;
    let task = tokio::spawn(connection);
    while let Some((message, _)) = messages.next().await {
        let received = Instant::now();
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = message.payload {
            let flags = link.header.flags;
            on_event(CarrierEvent {
                ifindex: link.header.index,
                carrier: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
                received,
            });
        }
    }
    task.abort();
    Ok(())
}
