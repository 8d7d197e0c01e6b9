//! The pair bench's hosts: both switch hosts started with `lb` and keepalived, the faults
//! the active one suffers and its return, and the client's TCP connections.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_user::{
    config::HostRole,
    testbed::{
        pair::sync_toml,
        tcp_responder::LineClient,
        topology::{TCP_PORT, VIP},
        Host, Testbed,
    },
};

use super::{NotifyMode, LISTEN};
use crate::bench::{interrupt, keepalived};

/// What happens to the active switch host.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every link goes down, as when the host loses power; it comes back with its links.
    Links,
    /// `lb` and keepalived are killed (SIGKILL), as a crash of both; they come back by
    /// being started again (the dataplane stayed pinned meanwhile).
    Kill,
}

/// The processes of a started pair, and how to start each again.
#[derive(Debug, Clone)]
pub struct PairProcesses {
    /// Process indexes (in `Testbed::processes`) of the switch's and the peer's agent.
    pub agents: [usize; 2],
    /// Those of their keepalived daemons.
    pub keepalived: [usize; 2],
    /// Each agent's config file.
    lb_configs: [String; 2],
    /// Each keepalived's config.
    keepalived_configs: [String; 2],
}

/// Starts `lb` (with `services`, a config without `[pair]`, in pair mode, the agents
/// streaming their tables to each other over the pair link) and keepalived at `advert` on
/// both switch hosts of the pair testbed `bed`, keepalived telling `lb` by `mode`; the
/// switch host (priority 150) becomes active, the peer (100) standby. Waits until the
/// switch host serves the VIP.
pub fn start_pair(
    bed: &mut Testbed,
    services: &str,
    advert: Duration,
    mode: NotifyMode,
) -> Result<PairProcesses> {
    let lb = lb_user::testbed::topology::lb_binary()?;
    let mut processes = PairProcesses {
        agents: [0; 2],
        keepalived: [0; 2],
        lb_configs: Default::default(),
        keepalived_configs: Default::default(),
    };
    for (slot, (switch, priority)) in [(Host::Switch, 150), (Host::Peer, 100)]
        .into_iter()
        .enumerate()
    {
        let name = format!("{switch:?}").to_lowercase();
        let fifo = bed.dir().join(format!("keepalived-{name}.fifo"));
        let (pair, notify) = match mode {
            NotifyMode::Fifo => (
                format!("keepalived_fifo = \"{}\"\n", fifo.display()),
                keepalived::Notify::Fifo(fifo),
            ),
            NotifyMode::Script => (
                String::new(),
                keepalived::Notify::Script(format!(
                    "{lb} notify --socket {}",
                    bed.control_socket_of(switch).display()
                )),
            ),
        };
        let config = format!("{services}\n[pair]\n{pair}{}", sync_toml(switch));
        let path = bed.write_file(&format!("lb-{name}.toml"), &config)?;
        let path = path.to_str().context("config path")?.to_string();
        let agent = bed.start_lb_on(switch, &["run", "--config", &path])?;
        bed.wait_for_agent_on(switch, agent, LISTEN)?;
        let config = keepalived::pair_config(&name, priority, advert, &notify);
        let daemon = keepalived::start(bed, switch, bed.dir(), &config)?;
        bed.processes.push(daemon);
        processes.agents[slot] = agent;
        processes.keepalived[slot] = bed.processes.len() - 1;
        processes.lb_configs[slot] = path;
        processes.keepalived_configs[slot] = config;
    }
    settle(bed, advert)?;
    Ok(processes)
}

/// Waits until the switch host is active, the peer standby, and a request is answered.
pub fn settle(bed: &Testbed, advert: Duration) -> Result<()> {
    let within = advert * 10 + Duration::from_secs(10);
    bed.wait_role(Host::Switch, LISTEN, HostRole::Active, within)?;
    bed.wait_role(Host::Peer, LISTEN, HostRole::Standby, within)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        interrupt::check()?;
        if matches!(bed.udp_request_vip("settle"), Ok((answer, _)) if answer == "master settle") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the active switch host does not serve the VIP");
        }
    }
}

/// Makes the switch host suffer `fault`.
pub fn fail(bed: &mut Testbed, processes: &PairProcesses, fault: Fault) -> Result<()> {
    match fault {
        Fault::Links => bed.set_switch_links(Host::Switch, false),
        Fault::Kill => {
            bed.processes[processes.agents[0]].kill();
            bed.processes[processes.keepalived[0]].kill();
            Ok(())
        }
    }
}

/// Brings the switch host back from `fault`: its links up, or its `lb` (adopting the pinned
/// dataplane) then keepalived started again.
pub fn restore(bed: &mut Testbed, processes: &PairProcesses, fault: Fault) -> Result<()> {
    match fault {
        Fault::Links => bed.set_switch_links(Host::Switch, true),
        Fault::Kill => {
            let config = &processes.lb_configs[0];
            let agent = bed.start_lb_on(Host::Switch, &["run", "--config", config])?;
            bed.wait_for_agent_on(Host::Switch, agent, LISTEN)?;
            let agent = bed.processes.pop().context("the agent just started")?;
            bed.processes[processes.agents[0]] = agent;
            let config = &processes.keepalived_configs[0];
            let daemon = keepalived::start(bed, Host::Switch, bed.dir(), config)?;
            bed.processes[processes.keepalived[0]] = daemon;
            Ok(())
        }
    }
}

/// `count` connections through the VIP, each answered once by `backend`.
pub fn open_connections(bed: &Testbed, count: usize, backend: &str) -> Result<Vec<LineClient>> {
    let to = SocketAddrV4::new(VIP, TCP_PORT);
    let mut connections = Vec::new();
    for _ in 0..count {
        let mut connection = LineClient::open(&bed.client, to, Duration::from_secs(1))?;
        let by = connection.ask()?;
        if by != backend {
            bail!("a new TCP connection was answered by {by:?}, not the {backend}");
        }
        connections.push(connection);
    }
    Ok(connections)
}

/// `count` connections held on the slave while the master is the active backend: made
/// while the master is drained on both hosts, then kept there (graceful failback) once it
/// is not. They survive a takeover only if the new host knows their flows.
pub fn slave_connections(bed: &Testbed, count: usize) -> Result<Vec<LineClient>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let on_both = |action: &str| -> Result<()> {
        for switch in [Host::Switch, Host::Peer] {
            let status = bed
                .lb_command_on(switch)?
                .args([action, "hold", "master"])
                .output()
                .with_context(|| format!("cannot run lb {action}"))?;
            if !status.status.success() {
                bail!(
                    "lb {action} hold master on {switch:?}: {}",
                    String::from_utf8_lossy(&status.stderr)
                );
            }
        }
        Ok(())
    };
    on_both("drain")?;
    let connections = open_connections(bed, count, "slave");
    on_both("undrain")?;
    let connections = connections?;
    let deadline = Instant::now() + Duration::from_secs(5);
    for switch in [Host::Switch, Host::Peer] {
        loop {
            let status = bed.agent_status_on(switch, LISTEN)?;
            let hold = status.services.iter().find(|s| s.name == "hold");
            if hold.and_then(|s| s.active.as_deref()) == Some("master") {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{switch:?} did not fail back to the master after lb undrain");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(connections)
}

/// How many of `connections` still answer, each by `backend`.
pub fn alive(connections: &mut [LineClient], backend: &str) -> usize {
    connections
        .iter_mut()
        .map(|c| c.ask())
        .filter(|by| by.as_ref().is_ok_and(|by| by == backend))
        .count()
}
