//! The connection table as the agent sees it: read, and written only on a standby.
//!
//! The agent never deletes a flow: the program treats an expired flow as gone and replaces
//! it when its tuple comes back, and the table evicts its least recently used entries
//! (expired ones first) when full. A deletion from user space could race with the program
//! re-creating the same flow. The one writer besides the program is the pair link
//! (`crate::pair::sync`), which copies the peer's flows: over anything on a standby (its
//! program writes none), only where there is no flow on an active host.

use anyhow::{Context, Result};
use aya::maps::MapError;
use lb_common::{EndpointKey, Flow, FlowKey, FlowSettings, Reply, ServiceValue};

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

    /// Writes flow `key` (served by the backend at `backend_ip`) and its reply index entry,
    /// as the program would have: a flow copied from the pair peer. With `overwrite` false
    /// a flow already in the table is kept as it is; returns whether the flow was written.
    pub fn write_flow(
        &self,
        key: &FlowKey,
        flow: &Flow,
        backend_ip: [u8; 4],
        overwrite: bool,
    ) -> Result<bool> {
        const BPF_NOEXIST: u64 = 1;
        let flags = if overwrite { 0 } else { BPF_NOEXIST };
        let written = self
            .flows
            .lock()
            .expect("FLOWS map lock")
            .insert(key, flow, flags);
        match written {
            Ok(()) => {}
            Err(MapError::SyscallError(e))
                if !overwrite && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e).context("cannot write a flow into the connection table"),
        }
        let reply = Reply {
            flow: *key,
            backend: flow.backend,
        };
        self.replies
            .lock()
            .expect("REPLIES map lock")
            .insert(key.answered_by(backend_ip), reply, 0)
            .context("cannot write a flow's reply index entry")?;
        Ok(true)
    }

    /// The service a packet with flow key `key` belongs to, looked up as the program does
    /// (the most specific of the VIP's service keys).
    pub fn service_of(&self, key: &FlowKey) -> Option<ServiceValue> {
        let maps = self.plan_maps.lock().expect("plan maps lock");
        EndpointKey::candidates(key.dst, key.proto, key.dst_port)
            .iter()
            .find_map(|candidate| maps.services.get(candidate, 0).ok())
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
