//! The connection table as the agent sees it: read only.
//!
//! The agent never deletes a flow: the program treats an expired flow as gone and replaces
//! it when its tuple comes back, and the table evicts its least recently used entries
//! (expired ones first) when full. A deletion from user space could race with the program
//! re-creating the same flow.

use anyhow::Result;
use lb_common::{Flow, FlowKey, FlowSettings};

use super::MapWriter;

/// One entry of the connection table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord {
    /// The flow's key, as the client sends.
    pub key: FlowKey,
    /// The flow.
    pub flow: Flow,
}

impl FlowRecord {
    /// Whether the flow's idle timeout has passed at `now` (ns on the program's clock).
    pub fn expired(&self, settings: &FlowSettings, now: u64) -> bool {
        now.saturating_sub(self.flow.seen_ns) > settings.timeout(self.key.proto, self.flow.state)
    }
}

impl MapWriter {
    /// Every flow in the table, live or not (at most `limit` entries are read: the table
    /// changes while it is read, and an entry that vanishes under the reader restarts the
    /// kernel's iteration, so counts are approximate while the table churns).
    pub fn read_flows(&self, limit: usize) -> Vec<FlowRecord> {
        let flows = self.flows.lock().expect("FLOWS map lock");
        flows
            .iter()
            .take(limit)
            .map_while(|entry| entry.ok())
            .map(|(key, flow)| FlowRecord { key, flow })
            .collect()
    }

    /// The connection table's timeouts, as the program reads them.
    pub fn flow_settings(&self) -> Result<FlowSettings> {
        Ok(self
            .plan_maps
            .lock()
            .expect("plan maps lock")
            .settings
            .get(&0, 0)?)
    }
}
