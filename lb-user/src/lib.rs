//! The agent of the XDP failover load balancer, as a library: the `lb` binary is a thin
//! command line over it, and the end-to-end tests drive the same code.
//!
//! - [`config`]: the TOML file an operator writes;
//! - [`plan`]: that file checked and resolved against the host's NICs;
//! - [`dataplane`]: the embedded XDP program, its attachment and the map writer;
//! - [`health`]: health probes; [`failover`]: the rules and the engine that flips;
//! - [`flows`]: the connection table as the agent sees it (sweep, counts, `lb flows`);
//! - [`metrics`]: the Prometheus exposition;
//! - [`control`]: the HTTP endpoint (`/metrics`, `/status`, manual activation);
//! - [`agent`]: ties them together for `lb run`;
//! - [`testbed`]: a namespace network for `lb demo` and the end-to-end tests.
#![deny(missing_docs)]

pub mod agent;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod failover;
pub mod flows;
pub mod health;
pub mod metrics;
pub mod net;
pub mod pair;
pub mod plan;
pub mod tasks;
pub mod testbed;
