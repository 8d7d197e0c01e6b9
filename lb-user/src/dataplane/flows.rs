//! The connection table as the agent sees it: read, and written only on a standby.
//!
//! The agent never deletes a flow: the program treats an expired flow as gone and replaces
//! it when its tuple comes back, and the table evicts its least recently used entries
//! (expired ones first) when full. A deletion from user space could race with the program
//! re-creating the same flow (the exception: a plan that removes a service or backend
//! removes its flows, see [`super::apply`]). The writers besides the program are the pair
//! link (`crate::pair::sync`), which copies the peer's flows: over anything on a standby
//! (its program writes none), only where there is no flow on an active host; and a restart
//! that changes the table's capacity ([`super::carry`]).

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

/// How a flow copied from the pair peer meets what this host's table holds.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// Over anything: a standby, whose program writes no flow.
    Overwrite,
    /// Only where this host has no flow of that key and no live flow holds its reply key
    /// (as the program decides for a new flow): an active host never replaces its own.
    IfFree {
        /// The table's timeouts, to tell a live holder from an expired one.
        settings: &'a FlowSettings,
        /// Now, on the program's clock.
        now: u64,
    },
}

/// A reply key as a flow copied to an active host finds it.
enum ReplyKeyState {
    /// No entry.
    Unused,
    /// An entry of this very flow, or of a flow gone or expired: free to take.
    Stale,
    /// An entry of a live flow of this host.
    Held,
}

/// `BPF_NOEXIST`: a map write that adds an entry but never replaces one.
pub(super) const BPF_NOEXIST: u64 = 1;

/// Whether a map write failed because the key exists (`BPF_NOEXIST`).
pub(super) fn exists(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EEXIST))
}

impl MapWriter {
    /// Every flow in the table, live or not (at most `limit` entries are read: the table
    /// changes while it is read, and an entry that vanishes under the reader restarts the
    /// kernel's iteration, so counts are approximate while the table churns).
    pub fn read_flows(&self, limit: usize) -> Vec<FlowRecord> {
        let mut records = Vec::new();
        self.for_each_flow(limit, |record| records.push(*record));
        records
    }

    /// Calls `f` on every flow in the table, live or not, as [`Self::read_flows`] reads
    /// them but without holding them all in memory; returns how many it visited.
    pub fn for_each_flow(&self, limit: usize, mut f: impl FnMut(&FlowRecord)) -> usize {
        let flows = self.flows.lock().expect("FLOWS map lock");
        let mut visited = 0;
        for (key, flow) in flows.iter().take(limit).map_while(|entry| entry.ok()) {
            f(&FlowRecord { key, flow });
            visited += 1;
        }
        visited
    }

    /// Writes flow `key` (served by the backend at `backend_ip`) and its reply index entry,
    /// as the program would have: a flow copied from the pair peer. Returns whether the
    /// flow was written; with [`Placement::IfFree`] a flow or reply key this host holds is
    /// kept as it is.
    pub fn write_flow(
        &self,
        key: &FlowKey,
        flow: &Flow,
        backend_ip: [u8; 4],
        placement: Placement,
    ) -> Result<bool> {
        let reply_key = key.answered_by(backend_ip);
        let (flow_flags, reply_flags) = match placement {
            Placement::Overwrite => (0, 0),
            Placement::IfFree { settings, now } => {
                match self.reply_key_state(key, &reply_key, settings, now) {
                    ReplyKeyState::Held => return Ok(false),
                    ReplyKeyState::Stale => (BPF_NOEXIST, 0),
                    // The program may take it meanwhile: only where it is still unused.
                    ReplyKeyState::Unused => (BPF_NOEXIST, BPF_NOEXIST),
                }
            }
        };
        let written = self
            .flows
            .lock()
            .expect("FLOWS map lock")
            .insert(key, flow, flow_flags);
        match written {
            Ok(()) => {}
            Err(e) if flow_flags == BPF_NOEXIST && exists(&e) => return Ok(false),
            Err(e) => return Err(e).context("cannot write a flow into the connection table"),
        }
        let reply = Reply {
            flow: *key,
            backend: flow.backend,
        };
        let indexed =
            self.replies
                .lock()
                .expect("REPLIES map lock")
                .insert(reply_key, reply, reply_flags);
        match indexed {
            Ok(()) => Ok(true),
            Err(e) if reply_flags == BPF_NOEXIST && exists(&e) => {
                // A flow of this host took the reply key in between: the copy goes again.
                let _ = self.flows.lock().expect("FLOWS map lock").remove(key);
                Ok(false)
            }
            Err(e) => Err(e).context("cannot write a flow's reply index entry"),
        }
    }

    /// Whether flow `key` may take reply key `reply_key`, as the program decides for a new
    /// flow.
    fn reply_key_state(
        &self,
        key: &FlowKey,
        reply_key: &FlowKey,
        settings: &FlowSettings,
        now: u64,
    ) -> ReplyKeyState {
        let Ok(holder) = self
            .replies
            .lock()
            .expect("REPLIES map lock")
            .get(reply_key, 0)
        else {
            return ReplyKeyState::Unused;
        };
        if holder.flow == *key {
            return ReplyKeyState::Stale;
        }
        let Ok(flow) = self
            .flows
            .lock()
            .expect("FLOWS map lock")
            .get(&holder.flow, 0)
        else {
            return ReplyKeyState::Stale;
        };
        let record = FlowRecord {
            key: holder.flow,
            flow,
        };
        if record.expired(settings, now) {
            ReplyKeyState::Stale
        } else {
            ReplyKeyState::Held
        }
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
