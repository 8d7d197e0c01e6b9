//! What the agent's endpoints read and change: the plan, the maps, the engine in force, and
//! the requests handed to the agent's main loop; and what `/healthz` finds wrong.

use std::sync::{Arc, RwLock};

use crate::{
    dataplane::MapWriter,
    failover::Engine,
    flows::Census,
    metrics::Metrics,
    net::{Netlink, XdpAttachment},
    plan::CurrentPlan,
    tasks::Background,
};

use super::InterfaceStatus;

/// Everything the endpoints read and change. Interior locks only: reading never blocks a
/// failover for longer than one service's decision.
pub struct AgentState {
    /// The plan in force.
    pub plan: CurrentPlan,
    /// The program's maps.
    pub maps: Arc<MapWriter>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The last sweep of the connection table.
    pub census: Arc<std::sync::Mutex<Census>>,
    /// The engine and attachments in force; a reload replaces them.
    running: RwLock<Arc<Running>>,
    /// Where `POST /reload` and `POST /down` hand their request to the agent's main loop.
    pub(super) requests: tokio::sync::mpsc::Sender<AgentRequest>,
    /// What is known of the pair peer.
    pub peer: Arc<crate::pair::sync::PeerView>,
    /// The census, the pair link and the keepalived follower.
    pub background: Background,
}

/// What a reload replaces: the failover engine and the list of attachments.
pub struct Running {
    /// The failover engine.
    pub engine: Engine,
    /// NICs and the mode the program runs in on each.
    pub interfaces: Vec<InterfaceStatus>,
}

/// Where the outcome of an [`AgentRequest`] goes: a summary, or the error that refused it.
pub type Reply = tokio::sync::oneshot::Sender<Result<String, String>>;

/// What the agent's main loop is asked to do, through the control socket or by the engine.
#[derive(Debug)]
pub enum AgentRequest {
    /// Read the config file again and apply it as a diff.
    Reload(Reply),
    /// Stop, remove the dataplane pinned in `pin_path` (which must be the agent's own),
    /// and exit with [`crate::agent::EXIT_TAKEN_DOWN`] (`lb down`).
    Down {
        /// The pin directory `lb down` means to remove.
        pin_path: std::path::PathBuf,
        /// Told what was removed, just before the agent exits.
        reply: Reply,
    },
}

/// Shared handle on the agent state.
pub type Shared = Arc<AgentState>;

impl AgentState {
    /// The state of a started agent; reload and down requests go to `requests`.
    pub fn new(
        plan: CurrentPlan,
        maps: Arc<MapWriter>,
        metrics: Arc<Metrics>,
        census: Arc<std::sync::Mutex<Census>>,
        running: Running,
        requests: tokio::sync::mpsc::Sender<AgentRequest>,
        peer: Arc<crate::pair::sync::PeerView>,
    ) -> Self {
        AgentState {
            plan,
            maps,
            metrics,
            census,
            running: RwLock::new(Arc::new(running)),
            requests,
            peer,
            background: Background::default(),
        }
    }

    /// A sender of reload requests to the agent's main loop (for reloads the agent decides
    /// itself, such as a NIC made again; their outcome is only logged).
    pub fn reload_requests(&self) -> tokio::sync::mpsc::Sender<AgentRequest> {
        self.requests.clone()
    }

    /// The engine and attachments in force.
    pub fn running(&self) -> Arc<Running> {
        self.running.read().expect("running lock").clone()
    }

    /// Puts `running` in force (a reload); returns what it replaces.
    pub fn replace_running(&self, running: Running) -> Arc<Running> {
        std::mem::replace(
            &mut *self.running.write().expect("running lock"),
            Arc::new(running),
        )
    }

    /// What is wrong with the agent, if anything: an attachment gone from its NIC, a probe
    /// or the carrier watcher dead. Empty when healthy.
    pub async fn problems(&self) -> Vec<String> {
        let running = self.running();
        let mut problems = Vec::new();
        let dead = running.engine.dead_tasks();
        if dead > 0 {
            problems.push(format!(
                "{dead} health probe or carrier watcher task(s) died"
            ));
        }
        for task in self.background.dead() {
            problems.push(format!(
                "the {task} died (its error is in the agent's log); restart the agent \
                 (systemd's watchdog does when configured)"
            ));
        }
        match Netlink::connect() {
            Ok(netlink) => {
                for iface in &running.interfaces {
                    match netlink.link_by_name(&iface.name).await {
                        Ok(link) if link.xdp != XdpAttachment::None => {}
                        Ok(_) => problems.push(format!("no XDP program on {}", iface.name)),
                        Err(e) => problems.push(format!("{}: {e:#}", iface.name)),
                    }
                }
            }
            Err(e) => problems.push(format!("cannot read the NICs: {e:#}")),
        }
        problems
    }
}
