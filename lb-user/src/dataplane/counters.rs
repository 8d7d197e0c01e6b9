//! Reading the program's per-CPU counters, summed over CPUs.

use anyhow::Result;
use lb_common::{action_index, traffic_index, Direction, Traffic, EVENTS, XDP_ACTIONS};

use super::MapWriter;

/// XDP action names, indexed by action number.
pub const ACTION_NAMES: [&str; XDP_ACTIONS as usize] =
    ["aborted", "drop", "pass", "tx", "redirect"];

impl MapWriter {
    /// Packets and bytes rewritten for backend `index` in `direction`.
    pub fn traffic_of(&self, index: u32, direction: Direction) -> Result<Traffic> {
        let per_cpu = self.traffic.get(&traffic_index(index, direction), 0)?;
        Ok(per_cpu.iter().fold(Traffic::default(), |sum, t| Traffic {
            packets: sum.packets + t.packets,
            bytes: sum.bytes + t.bytes,
        }))
    }

    /// Packets per XDP action on the NIC in `slot`, in [`ACTION_NAMES`] order.
    pub fn actions_of(&self, slot: u32) -> Result<[u64; XDP_ACTIONS as usize]> {
        let mut counts = [0u64; XDP_ACTIONS as usize];
        for (action, count) in counts.iter_mut().enumerate() {
            let per_cpu = self.actions.get(&action_index(slot, action as u32), 0)?;
            *count = per_cpu.iter().sum();
        }
        Ok(counts)
    }
}

impl MapWriter {
    /// How often each counted dataplane decision happened, in `lb_common::EVENT_NAMES`
    /// order.
    pub fn events(&self) -> Result<[u64; EVENTS as usize]> {
        let mut counts = [0u64; EVENTS as usize];
        for (event, count) in counts.iter_mut().enumerate() {
            *count = self.events.get(&(event as u32), 0)?.iter().sum();
        }
        Ok(counts)
    }

    /// How often dataplane decision `event` happened.
    pub fn event(&self, event: lb_common::Event) -> Result<u64> {
        Ok(self.events.get(&(event as u32), 0)?.iter().sum())
    }
}
