//! Per-CPU counters, read and summed by the agent at scrape time.

use lb_common::{action_index, traffic_index, Direction, XDP_ACTIONS};

use crate::maps::{ACTIONS, NO_PORT_DROPS, TRAFFIC};

/// Counts one frame leaving the program with `action` on the NIC in `slot`.
#[inline(always)]
pub fn count_action(slot: u32, action: u32) {
    if action >= XDP_ACTIONS {
        return;
    }
    if let Some(counter) = ACTIONS.get_ptr_mut(action_index(slot, action)) {
        // SAFETY: a per-CPU slot from a successful lookup; this CPU is its only writer.
        unsafe { *counter += 1 };
    }
}

/// Counts one rewritten frame of `bytes` bytes for `backend` in `direction`.
#[inline(always)]
pub fn count_traffic(backend: u32, direction: Direction, bytes: usize) {
    if let Some(traffic) = TRAFFIC.get_ptr_mut(traffic_index(backend, direction)) {
        // SAFETY: as in `count_action`.
        unsafe {
            (*traffic).packets += 1;
            (*traffic).bytes += bytes as u64;
        }
    }
}

/// Counts one frame dropped for want of a redirect port; returns this CPU's count so far
/// (0 if the counter is unavailable).
#[inline(always)]
pub fn count_no_port_drop() -> u64 {
    match NO_PORT_DROPS.get_ptr_mut(0) {
        Some(counter) => {
            // SAFETY: as in `count_action`.
            unsafe {
                *counter += 1;
                *counter
            }
        }
        None => 0,
    }
}
