//! The connection table as the agent sees it: reading flows, and sweeping out the expired
//! ones with their reply index entries.
//!
//! The program itself never needs the sweep — it treats an expired flow as gone, and the
//! table evicts its least recently used entry when full — so the sweep only keeps `lb
//! flows` and the flow counts on `/metrics` true, and frees entries early.

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
    /// Calls `visit` for every live flow (at most `limit` entries are read: the table
    /// changes while it is read, and a vanished entry restarts the kernel's iteration), and
    /// removes the expired ones and their reply index entries. Returns how many were
    /// removed.
    pub fn sweep_flows(
        &self,
        settings: &FlowSettings,
        now: u64,
        limit: usize,
        mut visit: impl FnMut(&FlowRecord),
    ) -> Result<usize> {
        let mut expired = Vec::new();
        {
            let flows = self.flows.lock().expect("FLOWS map lock");
            for entry in flows.iter().take(limit) {
                let Ok((key, flow)) = entry else {
                    break; // the entry vanished under us: the next sweep reads on
                };
                let record = FlowRecord { key, flow };
                if record.expired(settings, now) {
                    expired.push(record);
                } else {
                    visit(&record);
                }
            }
        }
        let mut removed = 0;
        for record in &expired {
            // Re-checked under the lock: a packet may have refreshed the flow meanwhile.
            let mut flows = self.flows.lock().expect("FLOWS map lock");
            let Ok(current) = flows.get(&record.key, 0) else {
                continue;
            };
            let current = FlowRecord {
                key: record.key,
                flow: current,
            };
            if !current.expired(settings, now) {
                continue;
            }
            if flows.remove(&record.key).is_ok() {
                removed += 1;
            }
            drop(flows);
            if let Ok(backend) = self.backends.get(&current.flow.backend, 0) {
                let reply = record.key.answered_by(backend.ip);
                let _ = self
                    .replies
                    .lock()
                    .expect("REPLIES map lock")
                    .remove(&reply);
            }
        }
        Ok(removed)
    }

    /// Every flow in the table, live or not (at most `limit`).
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
        Ok(self.settings.get(&0, 0)?)
    }
}
