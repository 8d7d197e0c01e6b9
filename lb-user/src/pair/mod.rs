//! Pair mode: two switch hosts with the same services, one active, one standby, and
//! keepalived deciding which is which.
//!
//! The role lives in the dataplane (the pinned `ROLE` map), so the standby serves nothing
//! of the VIPs even while its agent is down, and a restarted agent keeps the role keepalived
//! gave. The agent changes it when told (`lb role`, or keepalived's notify script through
//! `lb notify`, [`keepalived`], or its notify FIFO, [`fifo`]); becoming active also
//! announces every VIP with gratuitous ARP ([`garp`]), so that clients and routers send to
//! this host's MACs at once. With a peer named, the two agents stream their connection tables to each other ([`sync`]), so
//! that the active host's flows carry on after a takeover.

pub mod fifo;
pub mod garp;
pub mod keepalived;
pub mod sync;

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::{config::HostRole, dataplane::MapWriter, plan::Plan};

/// Sets the role of a starting agent, before the program is attached: the pinned role when
/// the `ROLE` map was adopted (`pinned`), else `[pair] initial_role`; always active outside
/// pair mode. Returns the role in force.
pub fn start(maps: &MapWriter, plan: &Plan, pinned: bool) -> Result<HostRole> {
    let role = match &plan.pair {
        Some(_) if pinned => maps.role()?,
        Some(pair) => pair.initial_role,
        None => {
            if pinned && maps.role()? == HostRole::Standby {
                tracing::warn!(
                    "the dataplane was left standby, and the config has no [pair]: this host \
                     serves now"
                );
            }
            HostRole::Active
        }
    };
    maps.set_role(role)?;
    tracing::info!(role = %role, pair = plan.pair.is_some(), "host role");
    Ok(role)
}

/// Makes this host `role` on the running dataplane, as keepalived or the operator asked;
/// becoming active announces the VIPs of `plan` (see [`garp::announce`]), for as long as the
/// host stays active. Returns what was done, for the caller to show. Refused outside pair
/// mode for a standby: a single host that stopped serving would take every VIP down.
pub fn set(maps: &Arc<MapWriter>, plan: &Plan, role: HostRole, why: &str) -> Result<String> {
    let Some(pair) = &plan.pair else {
        if role == HostRole::Standby {
            bail!(
                "this agent is not in pair mode (no [pair] in its config): it always serves, \
                 and cannot become standby"
            );
        }
        return Ok("active (not in pair mode: always)".to_string());
    };
    let before = maps.role()?;
    maps.set_role(role)?;
    if before != role {
        tracing::warn!(from = %before, to = %role, why, "host role changed");
    }
    if role == HostRole::Active {
        let targets = garp::targets(plan);
        let watched = maps.clone();
        let still_active = move || watched.role().is_ok_and(|r| r == HostRole::Active);
        let sent = garp::announce(
            &targets,
            pair.gratuitous_arps,
            pair.gratuitous_arp_interval,
            still_active,
        )
        .with_context(|| {
            format!("this host is active now (was {before}), but announcing its VIPs failed")
        })?;
        return Ok(format!(
            "active (was {before}); announced {} VIP(s) on {} NIC(s) with gratuitous ARP",
            sent.vips, sent.nics
        ));
    }
    Ok(format!("standby (was {before})"))
}

/// After a reload: a config without `[pair]` makes the host serve; with one, the role in
/// force stays.
pub fn after_reload(maps: &MapWriter, plan: &Plan) -> Result<()> {
    if plan.pair.is_none() && maps.role()? == HostRole::Standby {
        maps.set_role(HostRole::Active)?;
        tracing::warn!("[pair] removed from the config: this host serves now");
    }
    Ok(())
}
