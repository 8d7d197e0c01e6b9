//! TCP connections across a failover and a failback: how many stay usable.
//!
//! Per trial: 20 connections opened through the VIP (on the master); the master's switch
//! port goes down; once a new connection reaches the slave, each of the 20 is asked once
//! (survived the failover?); 20 more are opened during the outage (on the slave); the port
//! comes back; once a new connection reaches the master again, each of those 20 is asked
//! once (survived the failback?). A connection survives when it answers within a second.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_user::testbed::{
    tcp_responder::LineClient,
    topology::{TCP_PORT, VIP},
};

use super::{super::interrupt, rig::Rig};

/// Connections per group.
pub const CONNECTIONS: usize = 20;

/// One trial's counts (out of [`CONNECTIONS`] each).
#[derive(Debug, Clone, Copy)]
pub struct TcpTrial {
    /// Connections opened before the failover that still answered after it.
    pub survived_failover: usize,
    /// Connections opened during the outage that still answered after the failback.
    pub survived_failback: usize,
}

/// A connection through the VIP from the rig's client.
struct Connection(LineClient);

impl Connection {
    fn open(rig: &Rig) -> Result<Self> {
        let to = SocketAddrV4::new(VIP, TCP_PORT);
        Ok(Connection(LineClient::open(
            &rig.testbed.client,
            to,
            Duration::from_secs(1),
        )?))
    }

    /// The backend's name, if the connection still answers.
    fn ask(&mut self) -> Option<String> {
        self.0.ask().ok()
    }
}

/// Opens connections until one is answered by `backend`, for at most `within`.
fn wait_new_connections_reach(rig: &Rig, backend: &str, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        interrupt::check()?;
        if let Ok(mut probe) = Connection::open(rig) {
            if probe.ask().as_deref() == Some(backend) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("new connections did not reach the {backend} within {within:?}")
}

fn open_all(rig: &Rig, expect: &str) -> Result<Vec<Connection>> {
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut connection = Connection::open(rig)?;
        match connection.ask() {
            Some(name) if name == expect => connections.push(connection),
            other => bail!("a new connection was answered by {other:?}, not the {expect}"),
        }
    }
    Ok(connections)
}

/// Runs one trial; leaves the master's link up and serving.
pub fn trial(rig: &mut Rig, settle: Duration) -> Result<TcpTrial> {
    let mut before = open_all(rig, "master")?;
    rig.set_master_link(false)?;
    wait_new_connections_reach(rig, "slave", settle)?;
    let survived_failover = before
        .iter_mut()
        .map(|c| c.ask())
        .filter(Option::is_some)
        .count();
    let mut during = open_all(rig, "slave")?;
    rig.set_master_link(true)?;
    wait_new_connections_reach(rig, "master", settle * 2)?;
    let survived_failback = during
        .iter_mut()
        .map(|c| c.ask())
        .filter(Option::is_some)
        .count();
    Ok(TcpTrial {
        survived_failover,
        survived_failback,
    })
}
