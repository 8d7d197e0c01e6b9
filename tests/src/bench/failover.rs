//! `cargo xtask bench failover`: the reference study's experiments on the namespace testbed,
//! for `lb` and, in the same run and topology, for keepalived VRRP.
//!
//! Per system and trial: the master's switch port goes down during a request stream
//! (downtime), comes back during another (failback), the master's server process is killed
//! during a third (downtime with the link up), the master host goes silent with its link up
//! during a fourth, and its server freezes (SIGSTOP) during a fifth. Downtime is measured as
//! the study did: the servers log the time of every request they answer, downtime = first
//! answer logged by the slave − last answer logged by the master (failback: the reverse).
//! The client's own view (longest gap between answers, requests lost) is reported beside it.
//! UDP loss: iperf3 `-u` through the VIP without a failover, and a sequence-numbered datagram
//! stream of the same size and rate with one failover in the middle. Last, the control plane
//! (`lb`'s agent, keepalived on the master) is stopped and started again during a request
//! stream.

mod client;
mod flip_load;
mod render;
mod restart;
mod rig;
mod tcp;
mod trial;
mod tuning;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use lb_user::testbed::topology::{UDP_PORT, VIP};

use self::{
    rig::{Flip, Kind, Rig, IPERF_PORT},
    trial::{client_socket, distinct_in_range, measure, stream, Direction, Streamed, Trial},
    tuning::Tuning,
};
use super::{interrupt, plot, progress, report};

/// Options of the failover bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trials per experiment and system.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Client requests per second during the downtime experiments.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u32,
    /// Seconds per UDP loss run.
    #[arg(long, default_value_t = 20)]
    pub loss_seconds: u64,
    /// Bit rate of the UDP loss runs, Mbit/s (1470-byte datagrams).
    #[arg(long, default_value_t = 10.0)]
    pub loss_mbit: f64,
    /// Leave keepalived out (only `lb`).
    #[arg(long)]
    pub skip_keepalived: bool,
    /// Leave `lb` out (only keepalived).
    #[arg(long, conflicts_with = "skip_keepalived")]
    pub skip_lb: bool,
    /// The `lb` setups to measure, each a system of the report: the UDP check's timeout
    /// (checks every 1 ms, fall 3, rise 3) and, with `+fifo<N>`, the prober thread under
    /// `SCHED_FIFO` at priority N (`[prober] realtime_priority`), or with `+nice<N>` an
    /// ordinary thread at niceness N (`[prober] nice`). By default the agent's defaults with
    /// a 10 ms timeout, and the setting for the detection targets.
    #[arg(long = "lb", value_delimiter = ',', default_values_t = [Tuning::DEFAULT, Tuning::FAST])]
    pub lb: Vec<Tuning>,
    /// keepalived advertisement intervals to compare, in seconds (1 is its default; 0.01 the
    /// fastest VRRPv3 allows).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.01])]
    pub keepalived_advert: Vec<f64>,
    /// The report to update.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
}

/// Size of a loss-stream datagram's payload (iperf's default UDP length).
const LOSS_DATAGRAM: usize = 1470;
/// Freeze-and-thaw cycles of the flip latency under load (two flips each).
const FLIP_CYCLES: usize = 50;
/// How long a stream runs before the fault.
const BEFORE_FAULT: Duration = Duration::from_millis(300);
/// A fault the rig switches on (`true`) for an experiment and off after it.
type Toggle = fn(&Rig, bool) -> Result<()>;

/// Everything measured for one system.
struct SystemResults {
    label: String,
    /// `lb`'s setup; `None` for keepalived.
    tuning: Option<Tuning>,
    /// File name of the client-view picture, next to the report.
    picture: String,
    link_down: Vec<Trial>,
    failback: Vec<Trial>,
    killed: Vec<Trial>,
    /// The master host silent behind a switch, its carrier up.
    silent: Vec<Trial>,
    /// The master's server frozen (SIGSTOP).
    frozen: Vec<Trial>,
    iperf_loss: Vec<f64>,
    stream_loss: Vec<f64>,
    flips: Vec<Flip>,
    /// The moves of the traffic the experiments called for (each fault and its repair);
    /// flips beyond them were made without cause.
    caused_flips: usize,
    /// `lb` only: flips under the load of more services and a scraping client.
    flips_loaded: Vec<Flip>,
    tcp: Vec<tcp::TcpTrial>,
    /// What the restart experiments stop, as the report names it.
    control_plane: &'static str,
    /// The restart experiments: how the control plane was stopped, and the trials.
    restarts: Vec<(&'static str, Vec<Trial>)>,
    plotted: Option<Streamed>,
    rate: u32,
}

/// Runs the failover bench and writes its section of the report.
pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.trials > 0, "--trials must be at least 1");
    anyhow::ensure!(args.rate >= 1000, "--rate must be at least 1000 requests/s");
    lb_user::testbed::topology::lb_binary()?;
    let mut systems = Vec::new();
    if !args.skip_lb {
        anyhow::ensure!(!args.lb.is_empty(), "--lb needs at least one setup");
        for (at, tuning) in args.lb.iter().enumerate() {
            anyhow::ensure!(
                !args.lb[..at].contains(tuning),
                "--lb names {tuning} twice: each setup is measured once"
            );
            systems.push((Kind::Lb(*tuning), "lbf"));
        }
    }
    if !args.skip_keepalived {
        for advert in &args.keepalived_advert {
            anyhow::ensure!(
                *advert >= 0.01,
                "--keepalived-advert {advert}: VRRP allows 0.01 s at the fastest"
            );
            anyhow::ensure!(
                *advert < 1.0 || advert.fract() == 0.0,
                "--keepalived-advert {advert}: from 1 s up keepalived speaks VRRPv2, which \
                 counts whole seconds"
            );
            systems.push((Kind::Keepalived(Duration::from_secs_f64(*advert)), "lbk"));
        }
    }
    let mut results = Vec::new();
    for (kind, prefix) in systems {
        progress(format!("{}: building the testbed", kind.label()));
        let mut rig = Rig::new(prefix, kind)?;
        results.push(run_system(&mut rig, &args)?);
        drop(rig);
        progress("testbed removed");
    }
    let body = render::render(&args, &results);
    report::update(&args.report, "failover", &body)?;
    progress(format!("wrote {}", args.report.display()));
    for system in &results {
        if let Some(Streamed {
            result: stream,
            fault_ns,
            ..
        }) = &system.plotted
        {
            let name = &system.picture;
            let path = args
                .report
                .parent()
                .map_or_else(|| PathBuf::from(name), |d| d.join(name));
            let points: Vec<plot::Point> = stream
                .replies
                .iter()
                .map(|r| plot::Point {
                    by: &r.by,
                    at_ms: (r.at_ns as f64 - *fault_ns as f64) / 1e6,
                })
                .collect();
            let gap_ms = stream.longest_gap() * 1e3;
            let first = points.first().map_or(-20.0, |p| p.at_ms);
            let last = points.last().map_or(80.0, |p| p.at_ms);
            let window = (
                (-(2.0 * gap_ms).max(20.0)).max(first),
                (3.0 * gap_ms).max(80.0).min(last),
            );
            plot::client_view(
                &path,
                &format!("{}: master link down", system.label),
                &points,
                window,
            )?;
            progress(format!("drew {}", path.display()));
        }
    }
    print!("{body}");
    Ok(())
}

fn run_system(rig: &mut Rig, args: &Args) -> Result<SystemResults> {
    let label = rig.kind.label();
    let settle = rig.kind.settle();
    let stream_length = BEFORE_FAULT + settle;
    let mut results = SystemResults {
        label: label.clone(),
        tuning: match rig.kind {
            Kind::Lb(tuning) => Some(tuning),
            Kind::Keepalived(_) => None,
        },
        picture: rig.kind.picture(),
        link_down: Vec::new(),
        failback: Vec::new(),
        killed: Vec::new(),
        silent: Vec::new(),
        frozen: Vec::new(),
        iperf_loss: Vec::new(),
        stream_loss: Vec::new(),
        flips: Vec::new(),
        caused_flips: 0,
        flips_loaded: Vec::new(),
        tcp: Vec::new(),
        control_plane: restart::what_stops(rig.kind),
        restarts: Vec::new(),
        plotted: None,
        rate: args.rate,
    };
    let mut next_seq = 0u64;
    for trial in 1..=args.trials {
        let mut faulted =
            |rig: &mut Rig, what: &str, direction, fault: &dyn Fn(&mut Rig) -> Result<()>| {
                progress(format!("{label}: trial {trial}/{}: {what}", args.trials));
                let result = stream(rig, &mut next_seq, args.rate, stream_length, fault)?;
                Ok::<_, anyhow::Error>((measure(rig, &result, direction)?, result))
            };
        let (down, stream_down) = faulted(rig, "master link down", Direction::Failover, &|rig| {
            rig.set_master_link(false)
        })?;
        results.link_down.push(down);
        if results.plotted.is_none() {
            results.plotted = Some(stream_down);
        }

        let (up, _) = faulted(rig, "master link up", Direction::Failback, &|rig| {
            rig.set_master_link(true)
        })?;
        results.failback.push(up);
        rig.wait_master_serving(Duration::from_secs(30))?;
        results.caused_flips += 2;

        let (killed, _) = faulted(rig, "master server killed", Direction::Failover, &|rig| {
            rig.kill_master_server();
            Ok(())
        })?;
        results.killed.push(killed);
        rig.restart_master_server()?;
        rig.wait_master_serving(Duration::from_secs(30))?;
        results.caused_flips += 2;

        // Faults switched on for the experiment and off after it.
        let toggled: [(&str, Toggle, &mut Vec<_>); 2] = [
            (
                "master host silent",
                Rig::set_master_silent,
                &mut results.silent,
            ),
            (
                "master server frozen",
                Rig::freeze_master_server,
                &mut results.frozen,
            ),
        ];
        for (what, set, into) in toggled {
            let (gap, _) = faulted(rig, what, Direction::Failover, &|rig| set(rig, true))?;
            into.push(gap);
            set(rig, false)?;
            rig.wait_master_serving(Duration::from_secs(30))?;
            results.caused_flips += 2;
        }
    }
    let pps = (args.loss_mbit * 1e6 / (LOSS_DATAGRAM as f64 * 8.0)).round() as u32;
    let duration = Duration::from_secs(args.loss_seconds);
    for trial in 1..=args.trials {
        interrupt::check()?;
        progress(format!(
            "{label}: trial {trial}/{}: iperf3 -u, {} s, no failover",
            args.trials, args.loss_seconds
        ));
        results.iperf_loss.push(iperf_loss(rig, args)?);
    }
    for trial in 1..=args.trials {
        progress(format!(
            "{label}: trial {trial}/{}: UDP stream, {} s, one failover",
            args.trials, args.loss_seconds
        ));
        let first = next_seq;
        next_seq += pps as u64 * args.loss_seconds + 1000;
        rig.new_log_entries()?;
        let socket = client_socket(rig)?;
        let sent = {
            let testbed = &rig.testbed;
            client::oneway_stream(
                socket,
                VIP,
                UDP_PORT,
                first,
                pps,
                LOSS_DATAGRAM,
                duration,
                Some(duration / 2),
                || testbed.set_link(lb_user::testbed::Host::Master, false),
            )?
        };
        interrupt::sleep(Duration::from_millis(300))?;
        let (master, slave) = rig.new_log_entries()?;
        let received = distinct_in_range(&master, &slave, first, first + sent, false);
        results
            .stream_loss
            .push(100.0 * (sent - received) as f64 / sent as f64);
        rig.set_master_link(true)?;
        rig.wait_master_serving(Duration::from_secs(30))?;
        results.caused_flips += 2;
    }
    for trial in 1..=args.trials {
        interrupt::check()?;
        progress(format!(
            "{label}: trial {trial}/{}: TCP connections across failover and failback",
            args.trials
        ));
        results.tcp.push(tcp::trial(rig, settle)?);
        rig.wait_master_serving(Duration::from_secs(30))?;
        results.caused_flips += 2;
    }
    for (how, name) in restart::RESTARTS {
        let mut trials = Vec::new();
        for trial in 1..=args.trials {
            progress(format!(
                "{label}: trial {trial}/{}: {}: {name}",
                args.trials, results.control_plane
            ));
            trials.push(restart::trial(rig, &mut next_seq, args.rate, how)?);
            rig.wait_master_serving(Duration::from_secs(30))?;
        }
        results.restarts.push((name, trials));
    }
    results.flips = rig.flips()?;
    if let Kind::Lb(tuning) = rig.kind {
        progress(format!(
            "{label}: flip latency under load ({} more services, /metrics scraped)",
            flip_load::EXTRA_SERVICES
        ));
        results.flips_loaded = flip_load::run(rig, tuning, FLIP_CYCLES)?;
    }
    Ok(results)
}

/// One iperf3 `-u` run through the VIP without a fault: the loss iperf3 reports (%).
fn iperf_loss(rig: &Rig, args: &Args) -> Result<f64> {
    let (ok, out, err) = rig.testbed.output(
        lb_user::testbed::Host::Client,
        "iperf3",
        &[
            "-c",
            &VIP.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-u",
            "-b",
            &format!("{}M", args.loss_mbit),
            "-l",
            &LOSS_DATAGRAM.to_string(),
            "-t",
            &args.loss_seconds.to_string(),
            "--json",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 printed no JSON: {}", err.trim()))?;
    if !ok {
        anyhow::bail!(
            "iperf3 failed: {}",
            json["error"].as_str().unwrap_or(err.trim())
        );
    }
    json["end"]["sum"]["lost_percent"]
        .as_f64()
        .with_context(|| {
            let end = json["end"].to_string();
            format!(
                "iperf3's JSON has no end.sum.lost_percent (error: {}; end: {})",
                json["error"].as_str().unwrap_or("none"),
                &end[..end.len().min(400)]
            )
        })
}
