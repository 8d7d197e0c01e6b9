//! `cargo xtask bench scale`: the dataplane and the agent with many services and a
//! million flows — the program's per-packet cost beside a small plan and table
//! ([`cost`]), and the agent's start time, memory and census work ([`agent`]).

pub mod agent;
pub mod cost;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{bail, Result};

use super::{progress, report};
use cost::{Shape, ShapeCost};

/// The client of flow `n` of a bench table: one of 65 536 addresses in 198.19.0.0/16
/// (routed through the client NIC), 16 ports each.
pub fn client_of(n: u32) -> (std::net::Ipv4Addr, u16) {
    (
        std::net::Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8),
        20_000 + (n >> 16) as u16,
    )
}

/// Options of the scale bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Services at scale (one UDP port of the VIP each, two backends each).
    #[arg(long, default_value_t = 10_000)]
    pub services: u32,
    /// Flows written into the table at scale.
    #[arg(long, default_value_t = 1_000_000)]
    pub flows: u32,
    /// The table's size at scale (`flows.max`).
    #[arg(long, default_value_t = 1_048_576)]
    pub max_flows: u32,
    /// Flows in the small table measured beside it (one service).
    #[arg(long, default_value_t = 4096)]
    pub small_flows: u32,
    /// Single runs per path and shape.
    #[arg(long, default_value_t = 20_000)]
    pub runs: u32,
    /// The report to update (its `scale` section).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
}

/// Runs the scale bench and writes its section of the report.
pub fn run(args: Args) -> Result<()> {
    if !(1..=lb_common::MAX_SERVICES).contains(&args.services)
        || args.flows == 0
        || args.flows > args.max_flows
        || args.small_flows == 0
        || !(1000..=1_000_000).contains(&args.runs)
    {
        bail!(
            "--services must be 1..={}, --flows 1..=--max-flows, --small-flows at least 1 and \
             --runs 1000..=1000000",
            lb_common::MAX_SERVICES
        );
    }
    let (started, head) = report::begin("scale");
    let small = Shape {
        services: 1,
        flows: args.small_flows,
    };
    let large = Shape {
        services: args.services,
        flows: args.flows,
    };
    let mut costs = Vec::new();
    for (shape, max_flows) in [
        (small, lb_common::DEFAULT_MAX_FLOWS),
        (large, args.max_flows),
    ] {
        progress(format!(
            "per-packet cost: {} services, {} flows ({} single runs per path)",
            shape.services, shape.flows, args.runs
        ));
        let cost = cost::measure(shape, max_flows.max(shape.flows), args.runs)?;
        progress(format!(
            "  established {:.0} ns, refreshed {:.0} ns, non-VIP {:.0} ns, new flow {:.0} ns (net); table filled in {:.1} s",
            cost.established_ns, cost.refresh_ns, cost.non_vip_ns, cost.new_flow_ns, cost.fill_secs
        ));
        costs.push(cost);
    }
    progress(format!(
        "agent: {} services, then {} flows in its table",
        args.services, args.flows
    ));
    let agent = agent::measure(args.services, args.flows, args.max_flows)?;
    let body = render(&head, &costs, &agent, started.elapsed());
    report::publish(&args.report, "scale", &body, started)?;
    Ok(())
}

fn render(head: &str, costs: &[ShapeCost], agent: &agent::AgentScale, elapsed: Duration) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "## Scale: many services, a million flows\n");
    t.push_str(head);
    let _ = writeln!(t, "- Run time: {:.0} s\n", elapsed.as_secs_f64());
    let _ = writeln!(
        t,
        "### Per-packet cost of the XDP program at scale (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        t,
        "The program loaded twice in one run (namespace `lbt-scale`), each time with its \
         plan written and its table filled from user space with established UDP flows \
         (clients from 198.19.0.0/16, 16 ports each, spread over the services). Each figure \
         is the mean of single runs, each on a fresh 64-byte frame of a flow picked at random \
         over the whole table, as the kernel times the run, minus the same for the empty \
         pass-through program (the kernel's set-up around one run): the lookups pay the \
         cache misses a large table costs, as live traffic would. \"Established\" is a flow \
         seen within the last second (the program then only reads the table); \"refreshed\" \
         the first packet of a flow idle for over a second, which writes the flow again (as \
         every live flow's first packet of each second does); a new flow is a client the \
         table has not seen (one of the first 60 000 after the table's).\n"
    );
    report::table_head(
        &mut t,
        &[
            "services",
            "flows written",
            "flows in the table",
            "established flow, ns",
            "refreshed flow, ns",
            "not VIP traffic, ns",
            "new flow, ns",
            "pass-through program, ns",
            "table filled in",
        ],
    );
    for c in costs {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} s |",
            c.shape.services,
            c.shape.flows,
            c.in_table,
            c.established_ns,
            c.refresh_ns,
            c.non_vip_ns,
            c.new_flow_ns,
            c.pass_ns,
            c.fill_secs
        );
    }
    if let [small, large] = costs {
        let _ = writeln!(
            t,
            "\nFrom {} services and {} flows to {} and {}: an established flow's packet costs \
             {:+.0} ns, a refreshed flow's {:+.0} ns, a packet that is not VIP traffic \
             {:+.0} ns, a new flow {:+.0} ns.\n",
            small.shape.services,
            small.shape.flows,
            large.shape.services,
            large.shape.flows,
            large.established_ns - small.established_ns,
            large.refresh_ns - small.refresh_ns,
            large.non_vip_ns - small.non_vip_ns,
            large.new_flow_ns - small.new_flow_ns
        );
    }
    let a = agent;
    let _ = writeln!(t, "### The agent at scale\n");
    let _ = writeln!(
        t,
        "`lb run` on the namespace testbed with {} UDP services on the VIP (two backends \
         each, a link check and a UDP check of the responder every 10 s on each: {} probes a \
         second), `flows.max` large enough for the flows below. Memory from \
         `/proc/PID/status`; the maps' kernel memory is the `memlock` of the map fds the \
         agent holds. Then {} established flows written into the pinned table (one system \
         call each); the agent's census sweeps over them (every 5 s, or nine times the last \
         sweep's duration when that is longer), its CPU over 20 s compared with 20 s of an \
         empty table; and a second agent started on the pinned dataplane, adopting it.\n",
        a.services,
        a.services * 2 / 10,
        a.flows
    );
    report::table_head(&mut t, &["measure", "value"]);
    let rows = [
        (
            "start, fresh dataplane (`lb run` to `/healthz` ok)",
            format!("{:.2} s", a.start_secs),
        ),
        (
            "resident memory (peak) after 5 s",
            format!("{:.1} MiB ({:.1} MiB)", a.rss_mib, a.hwm_mib),
        ),
        ("the maps' kernel memory", format!("{:.1} MiB", a.maps_mib)),
        (
            "flows written into the pinned table",
            format!("{} in {:.1} s", a.flows, a.fill_secs),
        ),
        (
            "one census sweep of the full table (`lb_flow_sweep_seconds`)",
            format!("{:.2} s, {} entries counted", a.sweep_secs, a.counted),
        ),
        (
            "the census's share of a core with the full table (20 s window)",
            format!("{:.1} %", a.census_core_share * 100.0),
        ),
        (
            "resident memory (peak) after the sweeps",
            format!(
                "{:.1} MiB ({:.1} MiB)",
                a.rss_after_sweeps_mib, a.hwm_after_sweeps_mib
            ),
        ),
        (
            "start, adopting the pinned dataplane and table",
            format!("{:.2} s", a.adopt_secs),
        ),
        (
            "resident memory of the adopting agent after 5 s",
            format!("{:.1} MiB", a.adopt_rss_mib),
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(t, "| {what} | {value} |");
    }
    t.push('\n');
    t
}
