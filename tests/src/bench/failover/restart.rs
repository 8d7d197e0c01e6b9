//! The control plane stopped and started again under load: `lb`'s agent (whose dataplane is
//! pinned and forwards on without it) beside keepalived on the master (whose VIP moves to the
//! slave while it is gone and back when it returns).
//!
//! Per trial: a request stream through the VIP; `BEFORE_FAULT` into it the control plane is
//! stopped, with SIGTERM and started again at once, or with SIGKILL and started again after
//! [`DEAD_FOR`]; the stream runs on until the system has settled. What the client lost is
//! what the restart cost.

use std::time::Duration;

use anyhow::Result;

use super::{
    super::interrupt,
    rig::{Kind, Rig, Stop},
    trial::{measure, stream, Direction, Trial},
    BEFORE_FAULT,
};

/// How long a killed control plane stays dead before it is started again.
pub const DEAD_FOR: Duration = Duration::from_secs(1);
/// Room for a started control plane to be ready (`lb`: load, adopt, first checks).
const START_ALLOWANCE: Duration = Duration::from_secs(2);

/// The two ways the control plane is restarted, as the report names them.
pub const RESTARTS: [(Stop, &str); 2] = [
    (Stop::Term, "SIGTERM, started again at once"),
    (Stop::Kill, "SIGKILL, started again after 1 s"),
];

/// What is stopped, as the report names it.
pub fn what_stops(kind: Kind) -> &'static str {
    match kind {
        Kind::Lb(_) => "the agent `lb`",
        Kind::Keepalived(_) => "keepalived on the master (all its processes)",
    }
}

/// One trial: a stream during which the control plane is stopped as `how` says and started
/// again.
pub fn trial(rig: &mut Rig, next_seq: &mut u64, rate: u32, how: Stop) -> Result<Trial> {
    let dead = if how == Stop::Kill {
        DEAD_FOR
    } else {
        Duration::ZERO
    };
    let length = BEFORE_FAULT + dead + START_ALLOWANCE + rig.kind.settle();
    let result = stream(rig, next_seq, rate, length, |rig| {
        rig.stop_control_plane(how)?;
        interrupt::sleep(dead)?;
        rig.start_control_plane()
    })?;
    // Only the client's view counts here: for keepalived the traffic goes to the slave and
    // back, for `lb` it should not move at all.
    measure(rig, &result, Direction::Failover)
}
