//! The pair testbed: two switch hosts on shared segments, as an active/standby pair runs.
//!
//! ```text
//!  client ──┐                ┌── c0 switch (lb) m0 ──┐            ┌── master
//!           br1 (fabric) ────┤                       ├── br2 ─────┘
//!           │                └── c0 peer   (lb) m0 ──┘   br3 ──────── slave (s0 alike)
//! ```
//!
//! Each segment 198.18.N.0/24 is a bridge in the `PREFIX-fabric` namespace; the client and
//! the backends sit on theirs with `.2`, the switch with `.11`, the peer with `.12`. The
//! two switch hosts also have a link of their own, the pair link (`pl0`, 198.18.9.0/24,
//! `.11` and `.12`), over which their agents stream their connection tables. The
//! segment's gateway `.1`, the hosts' default route, belongs to whichever switch host is
//! active (keepalived moves it). The fabric's ports toward the switches run the
//! pass-through program: veth delivers frames a switch sends with `XDP_REDIRECT` only to a
//! peer that runs XDP.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::HostRole;

use super::{
    netns::veth,
    topology::{Host, Port, Testbed},
};

/// The MAC of `switch`'s port on segment `subnet` (the switch's are the single testbed's).
pub fn switch_port_mac(switch: Host, subnet: u8) -> String {
    match switch {
        Host::Peer => format!("02:00:00:01:{subnet:02x}:01"),
        _ => format!("02:00:00:00:{subnet:02x}:01"),
    }
}

/// The pair link's segment.
pub const PAIR_SUBNET: u8 = 9;
/// The pair link's NIC on both switch hosts.
pub const PAIR_LINK: &str = "pl0";
/// The port on which the testbed's agents accept their peer's stream (`[pair] sync_listen`).
pub const SYNC_PORT: u16 = 7470;

/// `[pair]` lines that make the agent on `switch` stream its table to the other one over
/// the pair link.
pub fn sync_toml(switch: Host) -> String {
    let other = if switch == Host::Peer {
        Host::Switch
    } else {
        Host::Peer
    };
    format!(
        "sync_listen = \"{}:{SYNC_PORT}\"\npeer = \"{}:{SYNC_PORT}\"\n",
        switch_address(switch, PAIR_SUBNET),
        switch_address(other, PAIR_SUBNET)
    )
}

/// The address of `switch` on segment `subnet`.
pub fn switch_address(switch: Host, subnet: u8) -> String {
    let host = if switch == Host::Peer { 12 } else { 11 };
    format!("198.18.{subnet}.{host}")
}

impl Testbed {
    /// Connects `host` to its segment's bridge, and both switch hosts to it too.
    pub(super) fn wire_bridged(&mut self, host: Host) -> Result<()> {
        let port = Port::of(host)?;
        let net = port.subnet;
        let fabric = self.fabric.as_ref().context("not a pair testbed")?;
        let bridge = format!("br{net}");
        fabric.ip(&["link", "add", &bridge, "type", "bridge"])?;
        fabric.ip(&["link", "set", &bridge, "up"])?;

        let ns = self.host(host);
        let host_port = format!("h{net}");
        veth(
            ns,
            "eth0",
            port.host_mac,
            fabric,
            &host_port,
            &format!("02:00:00:0f:{net:02x}:02"),
        )?;
        fabric.ip(&["link", "set", &host_port, "master", &bridge])?;
        ns.ip(&["addr", "add", &format!("198.18.{net}.2/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
        ns.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])?;
        let pass = ns.enter(|| crate::dataplane::PassProgram::attach("eth0"))??;
        self.veth_peers.push((host, pass));

        for (switch, letter) in [(Host::Switch, 'a'), (Host::Peer, 'b')] {
            let fabric_port = format!("{letter}{net}");
            let (switch_ns, fabric) = (self.host(switch), self.fabric.as_ref().expect("fabric"));
            veth(
                switch_ns,
                port.name,
                &switch_port_mac(switch, net),
                fabric,
                &fabric_port,
                &format!(
                    "02:00:00:0f:{net:02x}:{:02x}",
                    0x0a + u8::from(letter == 'b')
                ),
            )?;
            fabric.ip(&["link", "set", &fabric_port, "master", &bridge])?;
            switch_ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", switch_address(switch, net)),
                "dev",
                port.name,
            ])?;
            let name = fabric_port.clone();
            let pass = fabric.enter(move || crate::dataplane::PassProgram::attach(&name))??;
            self.fabric_ports.push(pass);
        }
        Ok(())
    }

    /// Links the two switch hosts directly: the pair link.
    pub(super) fn wire_pair_link(&mut self) -> Result<()> {
        let (switch, peer) = (self.host(Host::Switch), self.host(Host::Peer));
        veth(
            switch,
            PAIR_LINK,
            "02:00:00:00:09:01",
            peer,
            PAIR_LINK,
            "02:00:00:01:09:01",
        )?;
        for host in [Host::Switch, Host::Peer] {
            let address = format!("{}/24", switch_address(host, PAIR_SUBNET));
            self.host(host)
                .ip(&["addr", "add", &address, "dev", PAIR_LINK])?;
        }
        Ok(())
    }

    /// Takes every link of switch host `switch` down (or up again), the pair link too: the
    /// host is gone, as when it loses power.
    pub fn set_switch_links(&self, switch: Host, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        for host in [Host::Client, Host::Master, Host::Slave] {
            let port = Port::of(host)?.name;
            self.host(switch).ip(&["link", "set", port, state])?;
        }
        self.host(switch).ip(&["link", "set", PAIR_LINK, state])
    }

    /// Makes the pair link silent on `switch`'s side, or speaking again: every frame on its
    /// `pl0` is dropped with the carrier up, as for a peer that hangs or a link that fails
    /// without a carrier signal.
    pub fn set_pair_link_silent(&self, switch: Host, silent: bool) -> Result<()> {
        super::topology::silence(self.host(switch), PAIR_LINK, silent)
    }

    /// Waits (`within` at most) until the agent on switch host `switch`, listening on
    /// `listen`, reports `role`.
    pub fn wait_role(
        &self,
        switch: Host,
        listen: &str,
        role: HostRole,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.agent_status_on(switch, listen)?.role;
            if now == Some(role) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{switch:?} is {now:?}, not {role:?}, after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
