//! Failover: health results in, one map write out.
//!
//! - [`policy`]: the pure rules (rise/fall, priority, preempt, failback delay, all down);
//! - [`service`]: one service's state and its decisions. The task in which a probe result
//!   or a carrier event arrives takes the decision and writes the map itself — no queue
//!   between the event and the flip;
//! - [`engine`]: builds the services' state, runs the probes and the carrier watcher;
//! - `resolve`: finds the MAC of a backend that did not answer ARP at start.

pub mod engine;
pub mod policy;
mod resolve;
pub mod service;

pub use engine::{Change, Engine};
