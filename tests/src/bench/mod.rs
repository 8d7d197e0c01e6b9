//! The benchmarks behind `cargo xtask bench`: failover (downtime, failback, UDP loss, beside
//! keepalived VRRP), throughput (XDP beside nftables NAT, per-packet cost, agent overhead)
//! and flood (the connection table under a flood of spoofed new flows). They run on the namespace testbed of `lb_user::testbed` and write
//! `docs/BENCHMARKS.md`.

pub mod failover;
pub mod flood;
pub mod interrupt;
pub mod keepalived;
pub mod pair;
pub mod plot;
pub mod report;
pub mod responder;
pub mod scale;
pub mod stats;
pub mod throughput;

/// Prints a progress line at once (benches run for minutes).
pub fn progress(message: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "bench: {message}");
    let _ = out.flush();
}
