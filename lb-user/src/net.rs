//! Facts about the host's NICs, read through rtnetlink.

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;

/// A NIC as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Hardware address.
    pub mac: [u8; 6],
}

/// Looks up NIC `name` in the current network namespace.
pub async fn link_by_name(name: &str) -> Result<Link> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("cannot open an rtnetlink socket")?;
    let task = tokio::spawn(connection);
    let result = async {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
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
        Ok(Link { name: name.to_string(), ifindex: message.header.index, mac })
    }
    .await;
    task.abort();
    result
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
