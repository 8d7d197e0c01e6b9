//! MAC resolution of a backend that did not answer ARP at start: it is down until the
//! kernel's ARP finds it, then its MAC is written and its checks decide.

use std::{sync::Arc, time::Duration};

use super::engine::ServiceRuntime;
use crate::net::Netlink;

/// How long to wait before asking again after a failed attempt (no netlink socket).
const RETRY: Duration = Duration::from_secs(1);

/// Resolves backend `position` of `service`, asking until it answers.
pub async fn resolve_mac(service: Arc<ServiceRuntime>, position: usize) {
    let backend = &service.plan.backends[position];
    loop {
        let netlink = match Netlink::connect() {
            Ok(netlink) => netlink,
            Err(e) => {
                tracing::warn!(backend = backend.name, error = %format!("{e:#}"), "cannot resolve the backend's MAC; trying again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        match netlink
            .wait_for_mac(&backend.iface, backend.ifindex, backend.next_hop)
            .await
        {
            Ok(mac) => {
                service.mac_resolved(position, mac);
                return;
            }
            Err(e) => {
                tracing::warn!(backend = backend.name, error = %format!("{e:#}"), "cannot resolve the backend's MAC; trying again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
