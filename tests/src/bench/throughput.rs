//! `cargo xtask bench throughput`: packets and bits per second through the VIP, the XDP
//! program beside nftables DNAT on the same switch with the same generator; the program's
//! cost per packet (`BPF_PROG_TEST_RUN`); the agent's CPU and memory.
//!
//! Every figure is measured in the run that reports it, on the namespace testbed
//! (`lbt-*` namespaces), and written to the `throughput` section of the report.

pub mod generator;
pub mod live;
pub mod nat;
pub mod overhead;
pub mod progcost;
pub mod traffic;
pub mod wake_floor;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};

use lb_user::testbed::{
    topology::{MASTER_IP, MASTER_MAC, UDP_PORT, VIP},
    Host, Testbed,
};

use super::{interrupt, progress, report, stats::Summary};
use overhead::Placement;
use traffic::{Sample, Timing, Way};

/// Namespace prefix of this bench.
const PREFIX: &str = "lbt";
/// Where the agent listens during the XDP measurements (inside the switch).
const LISTEN: &str = "127.0.0.1:9100";
/// Target: XDP at least this many times nftables' packet rate.
const TARGET_RATIO: f64 = 3.0;
/// Target: forward path of the program below this many ns per packet.
const TARGET_FORWARD_NS: f64 = 60.0;
/// The interval of the wake-up floor beside the agent's 1 ms checks.
const WAKE_FLOOR_INTERVAL: Duration = Duration::from_millis(1);

/// Options of the throughput bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds each throughput measurement counts (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Milliseconds of sending before each measurement starts counting.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// Rounds; each measures XDP, nftables and the generator alone, interleaved.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Small frame length, bytes (Ethernet header included, FCS not).
    #[arg(long, default_value_t = 64)]
    pub small: usize,
    /// Large frame length, bytes (Ethernet header included, FCS not).
    #[arg(long, default_value_t = 1500)]
    pub large: usize,
    /// Client addresses the generator spreads its frames over (198.19.0.1 on).
    #[arg(long, default_value_t = 256)]
    pub client_addrs: u32,
    /// Source ports per client address (40000 on).
    #[arg(long, default_value_t = 16)]
    pub client_ports: u32,
    /// CPU the generator is pinned to (-1: not pinned).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub generator_cpu: i64,
    /// Keep the switch's NAPI polling in softirq context (same core as the generator)
    /// instead of kernel threads.
    #[arg(long)]
    pub softirq: bool,
    /// Trials of the per-packet cost measurement.
    #[arg(long, default_value_t = 5)]
    pub cost_trials: usize,
    /// Single BPF_PROG_TEST_RUN calls per path and trial.
    #[arg(long, default_value_t = 20_000)]
    pub single_runs: u32,
    /// Repeat count of the repeated BPF_PROG_TEST_RUN calls.
    #[arg(long, default_value_t = 2_000_000)]
    pub repeat: u32,
    /// Seconds over which the agent's CPU time is measured, per scenario.
    #[arg(long, default_value_t = 10.0)]
    pub overhead_secs: f64,
    /// Services in the large agent scenario.
    #[arg(long, default_value_t = 100)]
    pub services: u16,
    /// Skip the throughput measurements.
    #[arg(long)]
    pub no_traffic: bool,
    /// Skip the per-packet cost measurement.
    #[arg(long)]
    pub no_cost: bool,
    /// Skip the agent overhead measurement.
    #[arg(long)]
    pub no_overhead: bool,
    /// The report to update (its `throughput` section).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
}

/// How the switch forwards during a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The lb agent with its XDP program.
    Xdp,
    /// nftables DNAT, conntrack for the replies.
    Nft,
    /// Everything dropped at the switch's ingress: the generator alone.
    Ceiling,
}

/// Every sample of one (way, frame length), per mode.
#[derive(Debug, Clone)]
struct Case {
    way: Way,
    len: usize,
    xdp: Vec<Sample>,
    nft: Vec<Sample>,
    ceiling: Vec<Sample>,
}

impl Case {
    fn samples(&mut self, mode: Mode) -> &mut Vec<Sample> {
        match mode {
            Mode::Xdp => &mut self.xdp,
            Mode::Nft => &mut self.nft,
            Mode::Ceiling => &mut self.ceiling,
        }
    }
}

/// Runs the throughput bench.
pub fn run(args: Args) -> Result<()> {
    if args.small < generator::HEADERS || args.large < args.small || args.large > 1514 {
        bail!(
            "frame lengths must satisfy {} <= small <= large <= 1514",
            generator::HEADERS
        );
    }
    if !(args.duration > 0.0 && args.duration <= 60.0) || args.rounds == 0 || args.rounds > 20 {
        bail!("--duration must be in (0, 60] s and --rounds in 1..=20");
    }
    if !(args.overhead_secs > 0.0 && args.overhead_secs <= 120.0) {
        bail!("--overhead-secs must be in (0, 120]");
    }
    let (started, head) = report::begin("throughput");

    let costs = if args.no_cost {
        None
    } else {
        progress(format!(
            "per-packet cost: {} trials of {} single runs per path, repeat {}",
            args.cost_trials, args.single_runs, args.repeat
        ));
        Some(progcost::measure(progcost::Options {
            trials: args.cost_trials.max(1),
            single_runs: args.single_runs.max(1),
            repeat: args.repeat.max(1),
            frame_len: args.small,
        })?)
    };

    let mut bed = Testbed::new(PREFIX).context("cannot build the lbt testbed")?;
    let flowtable = match nat::flowtable_refusal(&bed.switch) {
        None => "nftables with a flowtable (`flow add @ft`) is not measured by this bench yet."
            .to_string(),
        Some(why) => format!(
            "nftables with a flowtable (`flow add @ft`) cannot be measured on this kernel: \
             `nft` refused the flowtable ({why}; as a kernel built without `CONFIG_NF_FLOW_TABLE` answers)."
        ),
    };
    let (cases, xdp_mode) = if args.no_traffic {
        (Vec::new(), String::new())
    } else {
        traffic_rounds(&mut bed, &args)?
    };

    let overhead_window = Duration::from_secs_f64(args.overhead_secs);
    let overheads = if args.no_overhead {
        Vec::new()
    } else {
        bed.start_udp_responder(Host::Master, "master")?;
        bed.start_udp_responder(Host::Slave, "slave")?;
        let settle = Duration::from_secs(2);
        let mut out = Vec::new();
        let mut runs = vec![
            (overhead::one_service_1ms(), Placement::Shared),
            (
                overhead::many_services(args.services.clamp(1, 1000)),
                Placement::Shared,
            ),
        ];
        if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
            runs.push((overhead::one_service_1ms(), Placement::Apart));
        }
        for (scenario, placement) in runs {
            out.push(overhead::measure(
                &mut bed,
                scenario,
                placement,
                settle,
                overhead_window,
            )?);
        }
        bed.stop_udp_responder(Host::Master);
        bed.stop_udp_responder(Host::Slave);
        out
    };
    drop(bed);
    let wake_floor = if args.no_overhead {
        None
    } else {
        progress("agent overhead: the floor, a thread that only wakes every 1 ms");
        Some(wake_floor::measure(
            WAKE_FLOOR_INTERVAL,
            Duration::from_secs(1),
            overhead_window,
        )?)
    };

    let body = render(
        &args,
        &head,
        &cases,
        &xdp_mode,
        &flowtable,
        costs.as_ref(),
        &overheads,
        wake_floor,
        started.elapsed(),
    );
    report::publish(&args.report, "throughput", &body, started)?;
    Ok(())
}

/// The agent config of the XDP measurements: the UDP service only, link checks.
fn agent_config() -> String {
    Testbed::config_head(LISTEN)
        + &Testbed::service_toml(
            "echo",
            "udp",
            UDP_PORT,
            "{ checks = [{ type = \"link\" }] }",
        )
}

/// A UDP request through the VIP must come back from the VIP, answered by the master.
fn check_path(bed: &mut Testbed, mode: Mode) -> Result<()> {
    bed.start_udp_responder(Host::Master, "master")?;
    let mut last = None;
    for _ in 0..5 {
        interrupt::check()?;
        match bed.udp_request_vip("probe") {
            Ok((answer, from)) if answer == "master probe" && *from.ip() == VIP => {
                last = None;
                break;
            }
            Ok((answer, from)) => last = Some(format!("answer {answer:?} from {from}")),
            Err(e) => last = Some(format!("{e:#}")),
        }
    }
    bed.stop_udp_responder(Host::Master);
    if let Some(problem) = last {
        bail!("{mode:?}: a UDP request through the VIP failed: {problem}");
    }
    Ok(())
}

/// The rounds of throughput measurements: returns the cases and the XDP attach mode.
fn traffic_rounds(bed: &mut Testbed, args: &Args) -> Result<(Vec<Case>, String)> {
    for (ip, mac, dev) in [
        ("198.18.1.2", "02:00:00:00:01:02", "c0"),
        ("198.18.2.2", MASTER_MAC, "m0"),
    ] {
        bed.switch.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    bed.switch.ip(&[
        "route",
        "replace",
        traffic::CLIENTS,
        "via",
        "198.18.1.2",
        "dev",
        "c0",
    ])?;
    if !args.softirq {
        // The switch's receive work on the other core than the generator.
        let napi_cpu = usize::try_from(args.generator_cpu)
            .ok()
            .map(|cpu| if cpu == 0 { 1 } else { 0 });
        nat::threaded_napi(&bed.switch, napi_cpu)?;
    }
    let timing = Timing {
        warmup: Duration::from_millis(args.warmup_ms),
        window: Duration::from_secs_f64(args.duration),
        addrs: args.client_addrs.clamp(1, 65_000),
        ports: args.client_ports.clamp(1, 25_000),
        cpu: usize::try_from(args.generator_cpu).ok(),
    };
    let mut cases: Vec<Case> = [Way::Forward, Way::Return]
        .into_iter()
        .flat_map(|way| {
            [args.small, args.large].map(|len| Case {
                way,
                len,
                xdp: Vec::new(),
                nft: Vec::new(),
                ceiling: Vec::new(),
            })
        })
        .collect();
    let config = bed.write_file("throughput.toml", &agent_config())?;
    let config = config.to_str().context("config path")?.to_string();
    let mut xdp_mode = String::from("unknown");
    for round in 1..=args.rounds {
        for mode in [Mode::Xdp, Mode::Nft, Mode::Ceiling] {
            interrupt::check()?;
            progress(format!("round {round}/{}: {mode:?}", args.rounds));
            let agent = if mode == Mode::Xdp {
                // A routed switch host, as with nftables: the program's reverse-path
                // check of new clients then asks the FIB.
                nat::forwarding(&bed.switch, true)?;
                let index = bed.start_lb(&["run", "--config", &config])?;
                bed.wait_for_agent(index, LISTEN)?;
                xdp_mode = attach_modes(bed)?;
                Some(index)
            } else {
                if bed.switch_has_xdp()? {
                    bail!("an XDP program is still attached on the switch");
                }
                None
            };
            let _nat = match mode {
                Mode::Nft => Some(nat::NftNat::new(&bed.switch, UDP_PORT)?),
                _ => None,
            };
            let _drop = match mode {
                Mode::Ceiling => Some(nat::IngressDrop::new(&bed.switch)?),
                _ => None,
            };
            if mode != Mode::Ceiling {
                check_path(bed, mode)?;
            }
            for case in cases.iter_mut() {
                let sample =
                    traffic::measure(bed, case.way, case.len, timing, mode != Mode::Ceiling)?;
                progress(format!(
                    "  {mode:?} {:?} {} B: offered {:.3} Mpps, delivered {:.3} Mpps{}",
                    case.way,
                    case.len,
                    sample.offered_pps() / 1e6,
                    sample.delivered_pps() / 1e6,
                    if sample.not_rewritten > 0 {
                        format!(", {} NOT rewritten", sample.not_rewritten)
                    } else {
                        String::new()
                    }
                ));
                case.samples(mode).push(sample);
            }
            drop(_drop);
            drop(_nat);
            if let Some(index) = agent {
                bed.stop_lb_for_good(index)?;
                nat::forwarding(&bed.switch, false)?;
            }
        }
    }
    Ok((cases, xdp_mode))
}

/// The agent's NICs and XDP modes, from `/status`: `c0 native, m0 native, …`.
fn attach_modes(bed: &Testbed) -> Result<String> {
    let status = bed.agent_status(LISTEN)?;
    Ok(status
        .interfaces
        .iter()
        .map(|i| format!("{} {}", i.name, i.mode))
        .collect::<Vec<_>>()
        .join(", "))
}

fn summary(values: impl Iterator<Item = f64>) -> Option<Summary> {
    Summary::of(&values.collect::<Vec<_>>())
}

fn mean_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    summary(samples.iter().map(f)).map_or(0.0, |s| s.mean)
}

fn fmt_range(s: Option<Summary>, scale: f64, d: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!(
            "{:.d$} ({:.d$}–{:.d$})",
            s.mean * scale,
            s.min * scale,
            s.max * scale
        ),
        Some(s) => format!("{:.d$}", s.mean * scale),
        None => "–".into(),
    }
}

/// Who limited a figure: the generator (delivered close to what it can offer with a
/// switch that does nothing) or the switch.
fn limiter(delivered: f64, ceiling: f64, offered: f64) -> &'static str {
    if ceiling > 0.0 && delivered >= 0.9 * ceiling {
        "generator"
    } else if offered > 0.0 && delivered < 0.95 * offered {
        "switch (drops)"
    } else {
        "switch (back-pressure)"
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    head: &str,
    cases: &[Case],
    xdp_mode: &str,
    flowtable: &str,
    costs: Option<&progcost::Costs>,
    overheads: &[overhead::Overhead],
    wake_floor: Option<f64>,
    elapsed: Duration,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "## Throughput, per-packet cost, agent overhead\n");
    t.push_str(head);
    let _ = writeln!(t, "- Run time: {:.0} s\n", elapsed.as_secs_f64());

    if !cases.is_empty() {
        let _ = writeln!(t, "### Packets and bits per second through the VIP\n");
        let _ = writeln!(
            t,
            "Same switch namespace, same generator, same run; {} rounds, each measuring the XDP \
             program (the real `lb run` agent, attached as: {xdp_mode}), then nftables DNAT \
             (`ip daddr {VIP} udp dport {UDP_PORT} dnat to {MASTER_IP}` in prerouting, \
             conntrack rewriting the replies back to the VIP, `ip_forward=1`, no XDP; no \
             SNAT rule, because the XDP program keeps the client's address as the backend's \
             peer and a masquerade would be a different job: conntrack's reverse NAT of the \
             replies is the SNAT half of this job), then \
             the generator alone (every frame dropped at the switch's ingress hook). Each \
             measurement: {} ms warm-up, then {:.1} s counted. {} UDP flows: {} client \
             addresses from {} with {} source ports each from {} (the switch routes {} \
             through the client host), each flow known to the switch before the count (one \
             frame each way, then one more from the client). {}\n",
            args.rounds,
            args.warmup_ms,
            args.duration,
            u64::from(args.client_addrs) * u64::from(args.client_ports),
            args.client_addrs,
            traffic::FIRST_CLIENT,
            args.client_ports,
            traffic::CLIENT_PORT,
            traffic::CLIENTS,
            flowtable,
        );
        let _ = writeln!(
            t,
            "Generator: an XDP program run by `BPF_PROG_TEST_RUN` in live-frames mode \
             (`BPF_F_TEST_XDP_LIVE_FRAMES`, the method of xdp-trafficgen) on the sending \
             host's veth: the kernel builds each frame from one template, the program gives \
             it the next flow (address, port, checksums) and returns `XDP_TX`, and the frame \
             leaves through the veth's `ndo_xdp_xmit`, in batches of 64, with no system call \
             per frame{}; offered = frames the generator ran (frames the veth's ring could \
             not take are dropped on the sending side and count as offered). Delivered = \
             frames counted (then dropped) by an \
             nftables rule at the ingress of the receiving host's `eth0`, matching only the \
             rewritten addresses (forward: to the master; return: from the VIP); a second \
             rule counts frames that arrive un-rewritten (\"not rewritten\"). The receivers \
             keep the pass-through XDP program (`lb_pass`) in every mode, which veth needs \
             to deliver frames redirected by XDP. \
             The switch's ports poll {}. \
             Frame lengths include the Ethernet header, not the FCS; bit rates are frame \
             bits (add 24 bytes per frame for preamble, FCS and gap on a wire).\n",
            match usize::try_from(args.generator_cpu) {
                Ok(cpu) => format!(", the sending thread pinned to CPU {cpu}"),
                Err(_) => String::new(),
            },
            if args.softirq {
                "in softirq context (on the generator's core)"
            } else {
                "from kernel threads (threaded NAPI, GRO on), so the switch's work can run on \
                 the other core than the generator"
            }
        );
        let _ = writeln!(
            t,
            "| way | frame | XDP Mpps | XDP Gbit/s | nftables Mpps | nftables Gbit/s | XDP / nftables | generator alone Mpps | XDP limited by | nftables limited by |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
        for c in cases {
            let bits = (c.len * 8) as f64;
            let xdp = summary(c.xdp.iter().map(Sample::delivered_pps));
            let nft = summary(c.nft.iter().map(Sample::delivered_pps));
            let ceiling = mean_of(&c.ceiling, Sample::offered_pps);
            let (x, n) = (xdp.map_or(0.0, |s| s.mean), nft.map_or(0.0, |s| s.mean));
            let _ = writeln!(
                t,
                "| {} | {} B | {} | {:.2} | {} | {:.2} | {} | {} | {} | {} |",
                c.way.label(),
                c.len,
                fmt_range(xdp, 1e-6, 3),
                x * bits / 1e9,
                fmt_range(nft, 1e-6, 3),
                n * bits / 1e9,
                if n > 0.0 {
                    format!("{:.2}×", x / n)
                } else {
                    "–".into()
                },
                fmt_range(summary(c.ceiling.iter().map(Sample::offered_pps)), 1e-6, 3),
                limiter(x, ceiling, mean_of(&c.xdp, Sample::offered_pps)),
                limiter(n, ceiling, mean_of(&c.nft, Sample::offered_pps)),
            );
        }
        let _ = writeln!(
            t,
            "\nMean (min–max) over the rounds. \"Limited by generator\": delivered is at least \
             90 % of what the generator offers against a switch that drops everything; \
             otherwise the switch was the limit (\"drops\": it lost offered frames; \
             \"back-pressure\": the veth queue refused frames, so the generator offered less).\n"
        );
        let _ = writeln!(
            t,
            "| way | frame | mode | offered Mpps | delivered Mpps | delivered / offered | not rewritten |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|");
        for c in cases {
            for (mode, samples) in [("XDP", &c.xdp), ("nftables", &c.nft)] {
                let offered = mean_of(samples, Sample::offered_pps);
                let delivered = mean_of(samples, Sample::delivered_pps);
                let _ = writeln!(
                    t,
                    "| {} | {} B | {mode} | {:.3} | {:.3} | {:.1} % | {} |",
                    if c.way == Way::Forward {
                        "forward"
                    } else {
                        "return"
                    },
                    c.len,
                    offered / 1e6,
                    delivered / 1e6,
                    if offered > 0.0 {
                        delivered / offered * 100.0
                    } else {
                        0.0
                    },
                    samples.iter().map(|s| s.not_rewritten).sum::<u64>()
                );
            }
        }
        t.push('\n');
    }

    if let Some(c) = costs {
        let _ = writeln!(
            t,
            "### Per-packet cost of the XDP program (BPF_PROG_TEST_RUN)\n"
        );
        let base_r = c.baseline_repeated.map_or(0.0, |s| s.mean);
        let _ = writeln!(
            t,
            "{}-byte UDP frames, program loaded with the maps written from a one-service plan, \
             in namespace `lbt-cost`; {} trials, mean (min–max) of the trial means. The kernel \
             runs a test frame in place: with a repeat count, every run after the first sees \
             the frame the first one rewrote (measured: the forward frame run with repeat {} \
             on the normal plan was rewritten {} time(s), per the traffic counters). So the \
             repeated runs of the forward and return paths use a second copy of the program \
             whose plan puts the master at the VIP's own address (a plan the config \
             validation would refuse, written to the maps directly): the rewrite then writes \
             back the bytes it read and every run takes the full path on an unchanged frame \
             (counters: {} forward and {} return rewrites per call of repeat {}). \
             \"Repeated\" is the kernel's mean duration per run, warm caches as in a NAPI \
             batch; \"net\" subtracts the empty pass-through program run the same way \
             ({} ns: the kernel's loop around each run). \"Single runs\" is the mean of {} \
             calls with repeat 1, each on a fresh copy of a normal frame, minus the same for \
             the pass-through program ({} ns): cold caches after each system call, an upper \
             bound. Measurement took {:.1} s.\n",
            args.small,
            args.cost_trials,
            args.repeat,
            c.forward_repeat_rewrites,
            c.fixed_rewrites.0,
            c.fixed_rewrites.1,
            args.repeat,
            fmt_range(c.baseline_repeated, 1.0, 0),
            args.single_runs,
            fmt_range(c.baseline_single, 1.0, 1),
            c.secs
        );
        let _ = writeln!(
            t,
            "| path | action | ns per packet, repeated ({}) | net of the pass-through program | single runs − pass-through (cold) |",
            args.repeat
        );
        let _ = writeln!(t, "|---|---|---|---|---|");
        for p in &c.paths {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} |",
                p.name,
                p.action,
                fmt_range(p.repeated, 1.0, 0),
                p.repeated
                    .map_or("–".into(), |s| format!("{:.0}", s.mean - base_r)),
                fmt_range(p.single, 1.0, 1),
            );
        }
        t.push('\n');
        t.push_str(&c.breakdown.render(TARGET_FORWARD_NS));
    }

    t.push_str(&overhead::render(overheads));
    if let Some(percent) = wake_floor {
        t.push_str(&wake_floor::render(WAKE_FLOOR_INTERVAL, percent));
    }

    let _ = writeln!(t, "### Targets\n");
    if !cases.is_empty() {
        for c in cases {
            let x = mean_of(&c.xdp, Sample::delivered_pps);
            let n = mean_of(&c.nft, Sample::delivered_pps);
            let ratio = if n > 0.0 { x / n } else { 0.0 };
            let ceiling = mean_of(&c.ceiling, Sample::offered_pps);
            let verdict = if ratio >= TARGET_RATIO {
                "met".to_string()
            } else if ceiling > 0.0 && x >= 0.9 * ceiling {
                format!(
                    "missed: XDP delivered what the generator could offer at all \
                     ({:.3} Mpps against a switch that drops everything), so the generator, \
                     not the XDP program, set the XDP figure on this 2-core machine",
                    ceiling / 1e6
                )
            } else {
                let program = costs
                    .and_then(|k| match c.way {
                        Way::Forward => k.paths.first(),
                        Way::Return => k.paths.get(1),
                    })
                    .and_then(|p| p.repeated)
                    .map(|s| s.mean);
                match program {
                    Some(ns) => format!(
                        "missed: the switch's core limited the XDP figure, and the program is \
                         a small part of it: {ns:.0} ns per packet × {:.3} Mpps = {:.0} % of \
                         one core; the rest is the veth driver's own per-packet work around \
                         XDP (NAPI poll of the peer's ring, the redirect into the other \
                         veth's queue, the receiving host's stack), which a physical NIC's \
                         driver does not have",
                        x / 1e6,
                        ns * x / 1e9 * 100.0
                    ),
                    None => "missed: the switch's core limited the XDP figure (run without \
                             --no-cost for the program's share of it)"
                        .to_string(),
                }
            };
            let _ = writeln!(
                t,
                "- XDP ≥ {TARGET_RATIO}× nftables pps, {} {} B: {ratio:.2}× — {verdict}.",
                if c.way == Way::Forward {
                    "forward"
                } else {
                    "return"
                },
                c.len
            );
        }
    }
    if let Some(c) = costs {
        if let Some(s) = c.paths.first().and_then(|p| p.repeated) {
            let net = s.mean - c.baseline_repeated.map_or(0.0, |b| b.mean);
            let _ = writeln!(
                t,
                "- Program < {TARGET_FORWARD_NS} ns per packet on the forward path \
                 (BPF_PROG_TEST_RUN, repeat {}): {:.0} ns as the kernel reports it, {net:.0} ns \
                 net of the empty program — {}.",
                args.repeat,
                s.mean,
                if s.mean < TARGET_FORWARD_NS {
                    "met".to_string()
                } else if net < TARGET_FORWARD_NS {
                    "missed as reported; met net of the kernel's per-run loop".to_string()
                } else {
                    "missed".to_string()
                }
            );
        }
    }
    if let Some(line) = overhead::target_line(overheads) {
        let _ = writeln!(t, "{line}");
    }
    let _ = writeln!(
        t,
        "\n### Reference figures (docs: baselines.md; not measured here)\n"
    );
    let _ = writeln!(t, "| reference | figure |\n|---|---|");
    for (r, f) in [
        (
            "XDP paper (CoNEXT 2018), one core",
            "XDP_DROP 24 Mpps, XDP_TX 16.9 Mpps, XDP_REDIRECT 8.6 Mpps",
        ),
        (
            "Katran (XDP L4 LB) vs IPVS, 1 core",
            "5.2 Mpps vs 1.2 Mpps (4.3× on 1–6 cores)",
        ),
        (
            "Katran BPF program alone (its perf tester)",
            "about 100–120 ns per packet",
        ),
        (
            "Cilium XDP vs kube-proxy (10 Mpps offered)",
            "XDP forwards all 10 Mpps; iptables about 2.3 Mpps; IPVS about 1.9 Mpps",
        ),
        (
            "line rate, 64-byte frames",
            "10GbE 14.88 Mpps, 25GbE 37.2 Mpps, 100GbE 148.8 Mpps",
        ),
    ] {
        let _ = writeln!(t, "| {r} | {f} |");
    }
    let _ = writeln!(
        t,
        "\nThose references ran on physical NICs with dedicated cores; the figures above run \
         on veth pairs on a {}-core machine where the generator, the switch and the receivers \
         share the cores, so compare the ratios and the per-packet cost, not the absolute \
         rates.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    t
}
