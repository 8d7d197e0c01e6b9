//! `lb-bench`: the benchmarks of the XDP failover load balancer. Run it through
//! `cargo xtask bench failover|throughput|flood|pair|scale`, which builds `lb` and this binary in release mode
//! and runs them as root.

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::bench;

#[derive(Parser)]
#[command(about = "Benchmarks of the XDP failover load balancer (needs root)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Downtime, failback and UDP loss per failover, beside keepalived VRRP.
    Failover(bench::failover::Args),
    /// Packets and bits per second through the VIP beside nftables NAT, per-packet cost of
    /// the program, agent overhead.
    Throughput(bench::throughput::Args),
    /// The connection table under a flood of spoofed new flows: established flows' answers
    /// and table entries.
    Flood(bench::flood::Args),
    /// A switch-host takeover in an lb pair under keepalived: downtime, requests lost, TCP
    /// connections surviving.
    Pair(bench::pair::Args),
    /// The program's per-packet cost and the agent's start time and memory with many
    /// services and a million flows.
    Scale(bench::scale::Args),
    /// A benchmark server (started by the failover bench inside a backend's namespace).
    #[command(hide = true)]
    Responder(bench::responder::Args),
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Failover(args) => {
            bench::interrupt::install()?;
            bench::failover::run(args)
        }
        Bench::Throughput(args) => {
            bench::interrupt::install()?;
            bench::throughput::run(args)
        }
        Bench::Flood(args) => {
            bench::interrupt::install()?;
            bench::flood::run(args)
        }
        Bench::Pair(args) => {
            bench::interrupt::install()?;
            bench::pair::run(args)
        }
        Bench::Scale(args) => {
            bench::interrupt::install()?;
            bench::scale::run(args)
        }
        Bench::Responder(args) => bench::responder::run(args),
    }
}
