//! A small network built from namespaces and veth pairs, for `lb demo` and the end-to-end
//! tests: client, switch (where `lb` runs), master and slave, each a namespace, with real
//! servers on the backends. Every address is in 198.18.0.0/15 (reserved for benchmarking);
//! everything it creates is removed on drop.
//!
//! Needs root and iproute2, ethtool, curl and python3 (`cargo xtask setup` installs them).

pub mod agent;
pub mod netns;
pub mod pair;
pub mod process;
pub mod tcp_responder;
pub mod topology;
pub mod udp;

pub use topology::{Host, Testbed};
