//! keepalived's notify script interface: keepalived runs the script of `notify` with four
//! arguments, `GROUP|INSTANCE name state priority`, on every state change of a VRRP
//! instance or sync group; `lb notify` takes them as they come.

use anyhow::{bail, Result};

use crate::config::HostRole;

/// The role keepalived's `state` argument asks for: `MASTER` → active; `BACKUP`, `FAULT`
/// and `STOP` → standby (a host that lost its own links, or whose keepalived stops, must
/// not go on answering for the VIPs). `DELETED` (an instance removed by a reload) asks for
/// nothing: `None`.
pub fn role_for(state: &str) -> Result<Option<HostRole>> {
    Ok(match state.to_ascii_uppercase().as_str() {
        "MASTER" => Some(HostRole::Active),
        "BACKUP" | "FAULT" | "STOP" => Some(HostRole::Standby),
        "DELETED" => None,
        other => bail!(
            "unknown keepalived state {other:?} (expected MASTER, BACKUP, FAULT, STOP or \
             DELETED)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalived_states_map_to_roles() {
        assert_eq!(role_for("MASTER").unwrap(), Some(HostRole::Active));
        assert_eq!(role_for("backup").unwrap(), Some(HostRole::Standby));
        assert_eq!(role_for("FAULT").unwrap(), Some(HostRole::Standby));
        assert_eq!(role_for("STOP").unwrap(), Some(HostRole::Standby));
        assert_eq!(role_for("DELETED").unwrap(), None);
        assert!(role_for("PRIMARY").is_err());
    }
}
