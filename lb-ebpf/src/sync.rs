//! Flow reports for the pair peer: every flow the program writes is put on `FLOW_SYNC`,
//! when the agent asked for it (`FlowSettings::sync`), so that the standby host holds the
//! active host's connection table.

use lb_common::{Event, Flow, FlowKey, FlowUpdate};

use crate::{maps, stats};

/// Reports flow `key` as just written (`flow`). A full ring is counted
/// (`FlowSyncLost`); the flow's next write reports it again, and the agent, seeing the
/// count rise, sends its peer the whole table.
#[inline(always)]
pub fn report(key: &FlowKey, flow: &Flow) {
    if !maps::reporting_flows() {
        return;
    }
    let update = FlowUpdate {
        key: *key,
        flow: *flow,
    };
    if maps::FLOW_SYNC.output::<FlowUpdate>(&update, 0).is_err() {
        stats::count(Event::FlowSyncLost);
    }
}
