//! Per-CPU counters, read and summed by the agent at scrape time.

use lb_common::{action_index, traffic_index, Direction, Event, XDP_ACTIONS};

use crate::maps::{ACTIONS, EVENTS, TRAFFIC};

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

/// Counts one `event`; returns this CPU's count of it so far (0 if unavailable).
#[inline(always)]
pub fn count(event: Event) -> u64 {
    match EVENTS.get_ptr_mut(event as u32) {
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

/// Counts `event` and returns `action`: the last step of a decision that is counted.
#[inline(always)]
pub fn counted(event: Event, action: u32) -> u32 {
    count(event);
    action
}
