//! A connection table carried over into one of another capacity: when `flows.max` changed
//! between two runs of the agent, the pinned `FLOWS` and `REPLIES` cannot serve the new
//! program, which gets new ones; the flows of the old ones are copied into them, so that
//! they survive the restart as they do when the table is kept.
//!
//! The copy is made twice: before the new program is attached (the bulk, while the old
//! program still serves) and after (what the old program made or changed in between). Until
//! the new program has taken over, the old maps are pinned back if the start fails, so the
//! running dataplane keeps its table for the next try.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{Flow, FlowKey, Reply};

use super::{
    flows::{exists, FlowRecord, BPF_NOEXIST},
    writer::monotonic_ns,
    MapWriter,
};

/// The connection table of the program the agent replaces, opened before its pins were
/// removed.
#[derive(Debug)]
pub struct OldTable {
    flows: Map,
    replies: Map,
    /// Where `flows` and `replies` were pinned.
    paths: [PathBuf; 2],
    /// Entries the old table holds at most.
    capacity: u32,
    /// Pinned back where it was when dropped, until [`OldTable::release`].
    armed: bool,
}

impl OldTable {
    /// The old table from its two maps, `FLOWS` and `REPLIES`, with the paths they were
    /// pinned at and their capacity.
    pub fn new(
        (flows, flows_path): (MapData, PathBuf),
        (replies, replies_path): (MapData, PathBuf),
        capacity: u32,
    ) -> Result<Self> {
        let table = OldTable {
            flows: Map::from_map_data(flows)?,
            replies: Map::from_map_data(replies)?,
            paths: [flows_path, replies_path],
            capacity,
            armed: true,
        };
        table.flow_map()?;
        table.reply_map()?;
        Ok(table)
    }

    /// The new program has taken over: the old table goes with the old program.
    pub fn release(mut self) {
        self.armed = false;
    }

    fn flow_map(&self) -> Result<HashMap<&MapData, FlowKey, Flow>> {
        HashMap::try_from(&self.flows)
            .map_err(|e| anyhow!("the pinned FLOWS is not a connection table: {e}"))
    }

    fn reply_map(&self) -> Result<HashMap<&MapData, FlowKey, Reply>> {
        HashMap::try_from(&self.replies)
            .map_err(|e| anyhow!("the pinned REPLIES is not a reply index: {e}"))
    }

    /// Puts the old maps back at their pins, in place of whatever was pinned there since.
    fn pin_back(&self) -> Result<()> {
        for (map, path) in [&self.flows, &self.replies].into_iter().zip(&self.paths) {
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot unpin {}", path.display()))?;
            }
            map.pin(path)
                .with_context(|| format!("cannot pin {} again", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for OldTable {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match self.pin_back() {
            Ok(()) => {
                tracing::info!("the start failed: the running connection table is pinned again")
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the start failed, and the running connection table could not be pinned again")
            }
        }
    }
}

impl MapWriter {
    /// Copies into this table (of `capacity` flows) the live flows of `old` last seen at or
    /// after `since_ns` (on the program's clock) that `keep` accepts, with their reply index
    /// entries; returns how many flows were written.
    ///
    /// A flow this table lacks is added; one it holds is replaced only if the old table saw
    /// it later (the old program moved it on after an earlier copy). When more flows are
    /// live than this table holds, the ones seen last are copied. The live flows are read
    /// into memory first (about 60 bytes each).
    pub fn carry_flows(
        &self,
        old: &OldTable,
        since_ns: u64,
        capacity: u32,
        keep: impl Fn(&Flow) -> bool,
    ) -> Result<usize> {
        let settings = self.flow_settings()?;
        let now = monotonic_ns();
        // Bounded: the old program may evict entries under the reader, which restarts the
        // kernel's iteration.
        let bound = 2 * old.capacity as usize;
        let mut live: Vec<FlowRecord> = old
            .flow_map()?
            .iter()
            .take(bound)
            .filter_map(|entry| entry.ok())
            .map(|(key, flow)| FlowRecord { key, flow })
            .filter(|r| r.flow.seen_ns >= since_ns && !r.expired(&settings, now) && keep(&r.flow))
            .collect();
        if live.len() > capacity as usize {
            live.sort_unstable_by_key(|r| std::cmp::Reverse(r.flow.seen_ns));
            live.truncate(capacity as usize);
        }
        let mut written = 0;
        {
            let mut flows = self.flows.lock().expect("FLOWS map lock");
            for record in &live {
                let flags = match flows.get(&record.key, 0) {
                    Ok(current) if current.seen_ns >= record.flow.seen_ns => continue,
                    Ok(_) => 0,
                    Err(_) => BPF_NOEXIST,
                };
                match flows.insert(record.key, record.flow, flags) {
                    Ok(()) => written += 1,
                    // The new program made it in between: its own is newer.
                    Err(e) if exists(&e) => {}
                    Err(e) => return Err(e).context("cannot copy a flow into the new table"),
                }
            }
        }
        let flows = self.flows.lock().expect("FLOWS map lock");
        let mut replies = self.replies.lock().expect("REPLIES map lock");
        for (key, reply) in old.reply_map()?.iter().take(bound).filter_map(|e| e.ok()) {
            // Only for a flow of the new table on the same backend (not one the new
            // program made anew on the same tuple).
            match flows.get(&reply.flow, 0) {
                Ok(flow) if flow.backend == reply.backend => {}
                _ => continue,
            }
            match replies.insert(key, reply, BPF_NOEXIST) {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(e) => return Err(e).context("cannot copy a reply index entry"),
            }
        }
        Ok(written)
    }
}
