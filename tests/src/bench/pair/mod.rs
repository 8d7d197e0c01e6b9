//! `cargo xtask bench pair`: a takeover between the two switch hosts of an lb pair under
//! keepalived, and the failback when the host comes back.
//!
//! On the pair testbed (`Testbed::pair`: two switch hosts on bridged segments and a pair
//! link, keepalived on both holding the segments' gateways and telling `lb` through its
//! notify FIFO, or with `--notify script` through `lb notify`; the agents streaming their
//! connection tables to each other over the pair link), per keepalived advert interval,
//! fault and trial: `--connections` TCP connections are opened through the VIP to the
//! active backend, `--slave-connections` more are held on the other one (graceful
//! failback), and a client sends `--rate` UDP requests a second through the VIP; one
//! second in, the active switch host fails — every link down (as when it loses power), or
//! `lb` and keepalived killed — and the stream goes on until the peer has had time to take
//! over; then every TCP connection is asked once. The host comes back (links up, or `lb`
//! and keepalived started again; keepalived's higher priority takes the VIPs back: a
//! failback), measured the same way. Reported per event: requests unanswered, the longest
//! time without an answer, and the TCP connections that still answer.

mod hosts;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use lb_user::{
    config::HostRole,
    testbed::{
        tcp_responder::LineClient,
        topology::{describe_gap, longest_gap, unanswered, Answer, TCP_PORT, UDP_PORT},
        Host, Testbed,
    },
};

pub use hosts::{start_pair, Fault, PairProcesses};

use super::{interrupt, progress, report, stats::Summary};

const PREFIX: &str = "lbpb";
const LISTEN: &str = "127.0.0.1:9100";
/// The switch-host takeover target: downtime with 10 ms adverts.
const TARGET_DOWNTIME: Duration = Duration::from_millis(50);

/// Options of the pair bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Takeovers (and failbacks) per advert interval and fault.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// UDP requests per second through the VIP.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// TCP connections held through the VIP on its active backend across each event.
    #[arg(long, default_value_t = 20)]
    pub connections: usize,
    /// TCP connections held on the other backend (the slave, kept by graceful failback)
    /// across each event: they survive only if the new host has their flows.
    #[arg(long, default_value_t = 10)]
    pub slave_connections: usize,
    /// How keepalived tells `lb` of its state changes.
    #[arg(long, value_enum, default_value_t = NotifyMode::Fifo)]
    pub notify: NotifyMode,
    /// keepalived advert intervals to measure, in milliseconds (VRRPv3 below 1000).
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 1000])]
    pub advert_ms: Vec<u64>,
    /// What happens to the active switch host.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Fault::Links, Fault::Kill])]
    pub faults: Vec<Fault>,
    /// The report to update (its `pair` section).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
}

/// One takeover or failback.
#[derive(Debug, Clone)]
struct Event {
    /// Requests sent during it.
    sent: usize,
    /// Of them unanswered.
    lost: usize,
    /// The longest time without an answer.
    gap: Duration,
    /// TCP connections on the active backend still answering after it.
    tcp_alive: usize,
    /// TCP connections on the slave still answering after it.
    slave_alive: usize,
    /// The answers around the longest gap, for the progress output.
    around_gap: String,
}

/// Every event of one advert interval and fault.
#[derive(Debug, Clone)]
struct Series {
    advert: Duration,
    fault: Fault,
    takeovers: Vec<Event>,
    failbacks: Vec<Event>,
}

/// Runs the pair bench and writes its section of the report.
pub fn run(args: Args) -> Result<()> {
    if args.trials == 0 || args.trials > 50 || args.rate == 0 || args.rate > 50_000 {
        bail!("--trials must be 1..=50 and --rate 1..=50000");
    }
    if args.connections > 500 || args.slave_connections > 500 {
        bail!("--connections and --slave-connections are at most 500 each");
    }
    if args.advert_ms.iter().any(|&ms| !(10..=5000).contains(&ms)) || args.faults.is_empty() {
        bail!("each --advert-ms must be 10..=5000, and --faults must name one at least");
    }
    let (started, head) = report::begin("pair");
    let mut series = Vec::new();
    for &ms in &args.advert_ms {
        for &fault in &args.faults {
            series.push(measure(&args, Duration::from_millis(ms), fault)?);
        }
    }
    let body = render(&args, &head, &series, started.elapsed());
    report::publish(&args.report, "pair", &body, started)?;
    Ok(())
}

/// The agents' services: a UDP and a TCP service on the VIP, checks every 10 ms.
fn services() -> String {
    let health = format!(
        "{{ checks = [{{ type = \"link\" }}, {{ type = \"udp\", port = {UDP_PORT}, send = \"health\" }}], interval = \"10ms\" }}"
    );
    format!(
        "{}{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, &health),
        Testbed::service_toml("hold", "tcp", TCP_PORT, &health)
    )
}

/// How keepalived tells `lb` of its state changes in a run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyMode {
    /// keepalived's notify FIFO, read by the agent (`[pair] keepalived_fifo`).
    Fifo,
    /// A notify script running `lb notify`.
    Script,
}

/// A pair testbed with responders on both backends, both agents and keepalived at
/// `advert`, the switch host active.
fn start(advert: Duration, mode: NotifyMode) -> Result<(Testbed, PairProcesses)> {
    let mut bed = Testbed::pair(PREFIX).context("cannot build the pair testbed")?;
    for (host, name) in [(Host::Master, "master"), (Host::Slave, "slave")] {
        bed.start_udp_responder(host, name)?;
        bed.start_tcp_responder(host, name)?;
    }
    let processes = start_pair(&mut bed, &services(), advert, mode)?;
    Ok((bed, processes))
}

/// Every trial at keepalived advert interval `advert` with `fault`.
fn measure(args: &Args, advert: Duration, fault: Fault) -> Result<Series> {
    progress(format!(
        "advert {advert:?}, fault {fault:?}: {} takeovers and failbacks, {} requests/s, {} + {} \
         TCP connections",
        args.trials, args.rate, args.connections, args.slave_connections
    ));
    let (mut bed, processes) = start(advert, args.notify)?;
    let period = Duration::from_secs(1) / args.rate;
    // keepalived's master-down interval is 3 adverts plus skew; the stream covers it twice.
    // Coming back from a kill starts lb (adopting its dataplane) and keepalived first.
    let outage = advert * 8 + Duration::from_millis(500);
    let restart = if fault == Fault::Kill {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    let requests = |extra: Duration| -> Result<(u32, Duration)> {
        let total = Duration::from_secs(1) + outage + extra;
        let count =
            u32::try_from(total.as_nanos() / period.as_nanos()).context("stream too long")?;
        Ok((count, period))
    };
    let mut series = Series {
        advert,
        fault,
        takeovers: Vec::new(),
        failbacks: Vec::new(),
    };
    for trial in 1..=args.trials {
        interrupt::check()?;
        let mut connections = hosts::open_connections(&bed, args.connections, "master")?;
        let mut on_slave = hosts::slave_connections(&bed, args.slave_connections)?;
        let takeover = event(
            &mut bed,
            &processes,
            fault,
            false,
            requests(Duration::ZERO)?,
            &mut connections,
            &mut on_slave,
        )?;
        bed.wait_role(Host::Peer, LISTEN, HostRole::Active, Duration::from_secs(5))?;
        let failback = event(
            &mut bed,
            &processes,
            fault,
            true,
            requests(restart)?,
            &mut connections,
            &mut on_slave,
        )?;
        hosts::settle(&bed, advert)?;
        progress(format!(
            "  trial {trial}: takeover {} lost, gap {:.1} ms, TCP {}/{} + {}/{}; failback {} \
             lost, gap {:.1} ms, TCP {}/{} + {}/{}",
            takeover.lost,
            takeover.gap.as_secs_f64() * 1e3,
            takeover.tcp_alive,
            args.connections,
            takeover.slave_alive,
            args.slave_connections,
            failback.lost,
            failback.gap.as_secs_f64() * 1e3,
            failback.tcp_alive,
            args.connections,
            failback.slave_alive,
            args.slave_connections
        ));
        for (name, e) in [("takeover", &takeover), ("failback", &failback)] {
            if e.gap >= TARGET_DOWNTIME * 2 {
                progress(format!(
                    "  {name}: around the longest gap:\n{}",
                    e.around_gap
                ));
            }
        }
        series.takeovers.push(takeover);
        series.failbacks.push(failback);
    }
    Ok(series)
}

/// Streams `count` requests `period` apart and, one second in, makes the switch host
/// suffer `fault` (or, with `back`, come back from it); then asks every connection once.
fn event(
    bed: &mut Testbed,
    processes: &PairProcesses,
    fault: Fault,
    back: bool,
    (count, period): (u32, Duration),
    connections: &mut [LineClient],
    on_slave: &mut [LineClient],
) -> Result<Event> {
    let stream = bed.udp_stream(count, period)?;
    interrupt::sleep(Duration::from_secs(1))?;
    if back {
        hosts::restore(bed, processes, fault)?;
    } else {
        hosts::fail(bed, processes, fault)?;
    }
    let answers: Vec<Answer> = stream
        .join()
        .map_err(|_| anyhow::anyhow!("the client stream panicked"))??;
    Ok(Event {
        sent: answers.len(),
        lost: unanswered(&answers),
        gap: longest_gap(&answers),
        tcp_alive: hosts::alive(connections, "master"),
        slave_alive: hosts::alive(on_slave, "slave"),
        around_gap: describe_gap(&answers),
    })
}

fn render(args: &Args, head: &str, series: &[Series], elapsed: Duration) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "## Switch-host takeover in a pair under keepalived\n");
    t.push_str(head);
    let _ = writeln!(t, "- Run time: {:.0} s\n", elapsed.as_secs_f64());
    let _ = writeln!(
        t,
        "Two switch hosts on bridged segments and a pair link (`Testbed::pair`), both running \
         `lb` in pair mode and keepalived (one VRRP instance on the client segment holding \
         every segment's gateway, telling `lb` of its state {}); the agents stream their \
         connection tables to each other over the pair link. A client sends {} UDP requests \
         a second through the VIP and holds {} TCP connections through it on the active \
         backend (the master) and {} on the slave (made while the master was drained, kept \
         there by graceful failback: the new host must know their flows, or it moves them \
         to the master, which resets them). One second in, the active switch host fails: \
         every link down (`links`: the host loses power), or `lb` and keepalived killed with \
         SIGKILL (`kill`; the dataplane stays pinned). The peer takes over; in the next run \
         the host comes back (links up, or `lb` then keepalived started again) and \
         keepalived's higher priority takes the VIPs back: failback. Downtime is the longest \
         time without an answer; lost requests are unanswered ones; a TCP connection \
         survived when it still answers, from the same backend, afterwards.\n",
        match args.notify {
            NotifyMode::Fifo =>
                "through its notify FIFO (`vrrp_notify_fifo`), which the agent reads",
            NotifyMode::Script => "with a notify script running `lb notify`",
        },
        args.rate,
        args.connections,
        args.slave_connections
    );
    let _ = writeln!(
        t,
        "| advert | fault | event | downtime ms: mean | min | max | p50 | p99 | n | lost requests (mean, max) | TCP on the master surviving (min of {}) | TCP on the slave surviving (min of {}) |",
        args.connections, args.slave_connections
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in series {
        for (name, events) in [("takeover", &s.takeovers), ("failback", &s.failbacks)] {
            let gaps: Vec<f64> = events.iter().map(|e| e.gap.as_secs_f64()).collect();
            let fault = format!("{:?}", s.fault).to_lowercase();
            let row = report::summary_row(
                &format!("{:?} | {fault} | {name}", s.advert),
                Summary::of(&gaps),
                1e3,
                1,
            );
            let lost: Vec<f64> = events.iter().map(|e| e.lost as f64).collect();
            let lost = Summary::of(&lost).map_or("–".into(), |l| {
                format!("{:.0}, {:.0} of {}", l.mean, l.max, events[0].sent)
            });
            let tcp = events.iter().map(|e| e.tcp_alive).min().unwrap_or(0);
            let slave = events.iter().map(|e| e.slave_alive).min().unwrap_or(0);
            let _ = writeln!(t, "{row} {lost} | {tcp} | {slave} |");
        }
    }
    let _ = writeln!(t, "\n### Target\n");
    for s in series
        .iter()
        .filter(|s| s.advert == Duration::from_millis(10))
    {
        let worst = s.takeovers.iter().map(|e| e.gap).max().unwrap_or_default();
        let tcp = s.takeovers.iter().map(|e| e.tcp_alive).min().unwrap_or(0);
        let slave = s.takeovers.iter().map(|e| e.slave_alive).min().unwrap_or(0);
        let met =
            worst < TARGET_DOWNTIME && tcp == args.connections && slave == args.slave_connections;
        let _ = writeln!(
            t,
            "- Switch-host takeover ({}) with 10 ms adverts: downtime < {} ms and every TCP \
             connection surviving: worst {:.1} ms, {tcp}/{} on the master and {slave}/{} on \
             the slave — {}.",
            format!("{:?}", s.fault).to_lowercase(),
            TARGET_DOWNTIME.as_millis(),
            worst.as_secs_f64() * 1e3,
            args.connections,
            args.slave_connections,
            if met { "met" } else { "missed" }
        );
    }
    t
}
