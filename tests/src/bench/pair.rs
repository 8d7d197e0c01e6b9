//! `cargo xtask bench pair`: a takeover between the two switch hosts of an lb pair under
//! keepalived, and the failback when the host comes back.
//!
//! On the pair testbed (`Testbed::pair`: two switch hosts on bridged segments, keepalived on
//! both holding the segments' gateways and telling `lb` through its notify FIFO, or with
//! `--notify script` through `lb notify`), per keepalived advert
//! interval and trial: `--connections` TCP connections are opened through the VIP and a
//! client sends `--rate` UDP requests a second through it; one second in, the active switch
//! host loses every link (as when it loses power); the stream goes on until the peer has
//! had time to take over, then every TCP connection is asked once. The links come back
//! (keepalived's higher priority takes the VIPs back: a failback), measured the same way.
//! Reported per event: requests unanswered, the longest time without an answer, and the TCP
//! connections that still answer.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_user::{
    config::HostRole,
    testbed::{
        tcp_responder::LineClient,
        topology::{describe_gap, longest_gap, unanswered, Answer, TCP_PORT, UDP_PORT, VIP},
        Host, Testbed,
    },
};

use super::{interrupt, keepalived, progress, report, stats::Summary};

const PREFIX: &str = "lbpb";
const LISTEN: &str = "127.0.0.1:9100";
/// The switch-host takeover target: downtime with 10 ms adverts.
const TARGET_DOWNTIME: Duration = Duration::from_millis(50);

/// Options of the pair bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Takeovers (and failbacks) per advert interval.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// UDP requests per second through the VIP.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// TCP connections held through the VIP across each event.
    #[arg(long, default_value_t = 20)]
    pub connections: usize,
    /// How keepalived tells `lb` of its state changes.
    #[arg(long, value_enum, default_value_t = NotifyMode::Fifo)]
    pub notify: NotifyMode,
    /// keepalived advert intervals to measure, in milliseconds (VRRPv3 below 1000).
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 1000])]
    pub advert_ms: Vec<u64>,
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
    /// TCP connections still answering after it.
    tcp_alive: usize,
    /// The answers around the longest gap, for the progress output.
    around_gap: String,
}

/// Every event of one advert interval.
#[derive(Debug, Clone)]
struct Series {
    advert: Duration,
    takeovers: Vec<Event>,
    failbacks: Vec<Event>,
}

/// Runs the pair bench.
pub fn run(args: Args) -> Result<()> {
    if args.trials == 0 || args.trials > 50 || args.rate == 0 || args.rate > 50_000 {
        bail!("--trials must be 1..=50 and --rate 1..=50000");
    }
    if args.connections > 500 || args.advert_ms.iter().any(|&ms| !(10..=5000).contains(&ms)) {
        bail!("--connections is at most 500, and each --advert-ms 10..=5000");
    }
    let (started, head) = report::begin("pair");
    let mut series = Vec::new();
    for &ms in &args.advert_ms {
        series.push(measure(&args, Duration::from_millis(ms))?);
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

/// Starts `lb` (with `services`, a config without `[pair]`, in pair mode) and keepalived at
/// `advert` on both switch hosts of the pair testbed `bed`, keepalived telling `lb` by
/// `mode`; the switch host (priority 150) becomes active, the peer (100) standby. Waits
/// until the switch host serves the VIP.
pub fn start_pair(
    bed: &mut Testbed,
    services: &str,
    advert: Duration,
    mode: NotifyMode,
) -> Result<()> {
    let lb = lb_user::testbed::topology::lb_binary()?;
    for (switch, priority) in [(Host::Switch, 150), (Host::Peer, 100)] {
        let name = format!("{switch:?}").to_lowercase();
        let fifo = bed.dir().join(format!("keepalived-{name}.fifo"));
        let (pair, notify) = match mode {
            NotifyMode::Fifo => (
                format!("keepalived_fifo = \"{}\"\n", fifo.display()),
                keepalived::Notify::Fifo(fifo),
            ),
            NotifyMode::Script => (
                String::new(),
                keepalived::Notify::Script(format!(
                    "{lb} notify --socket {}",
                    bed.control_socket_of(switch).display()
                )),
            ),
        };
        let config = format!("{services}\n[pair]\n{pair}");
        let path = bed.write_file(&format!("lb-{name}.toml"), &config)?;
        let path = path.to_str().context("config path")?.to_string();
        let agent = bed.start_lb_on(switch, &["run", "--config", &path])?;
        bed.wait_for_agent_on(switch, agent, LISTEN)?;
        let config = keepalived::pair_config(&name, priority, advert, &notify);
        let daemon = keepalived::start(bed, switch, bed.dir(), &config)?;
        bed.processes.push(daemon);
    }
    settle(bed, advert)
}

/// A pair testbed with responders on both backends, both agents and keepalived at
/// `advert`, the switch host active.
fn start(advert: Duration, mode: NotifyMode) -> Result<Testbed> {
    let mut bed = Testbed::pair(PREFIX).context("cannot build the pair testbed")?;
    for (host, name) in [(Host::Master, "master"), (Host::Slave, "slave")] {
        bed.start_udp_responder(host, name)?;
        bed.start_tcp_responder(host, name)?;
    }
    start_pair(&mut bed, &services(), advert, mode)?;
    Ok(bed)
}

/// Waits until the switch host is active, the peer standby, and a request is answered.
fn settle(bed: &Testbed, advert: Duration) -> Result<()> {
    let within = advert * 10 + Duration::from_secs(10);
    bed.wait_role(Host::Switch, LISTEN, HostRole::Active, within)?;
    bed.wait_role(Host::Peer, LISTEN, HostRole::Standby, within)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        interrupt::check()?;
        if matches!(bed.udp_request_vip("settle"), Ok((answer, _)) if answer == "master settle") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the active switch host does not serve the VIP");
        }
    }
}

/// Every trial at keepalived advert interval `advert`.
fn measure(args: &Args, advert: Duration) -> Result<Series> {
    progress(format!(
        "advert {advert:?}: {} takeovers and failbacks, {} requests/s, {} TCP connections",
        args.trials, args.rate, args.connections
    ));
    let bed = start(advert, args.notify)?;
    let period = Duration::from_secs(1) / args.rate;
    // keepalived's master-down interval is 3 adverts plus skew; the stream covers it twice.
    let outage = advert * 8 + Duration::from_millis(500);
    let count = u32::try_from((Duration::from_secs(1) + outage).as_nanos() / period.as_nanos())
        .context("stream too long")?;
    let mut series = Series {
        advert,
        takeovers: Vec::new(),
        failbacks: Vec::new(),
    };
    for trial in 1..=args.trials {
        interrupt::check()?;
        let mut connections = open_connections(&bed, args.connections)?;
        let takeover = event(&bed, count, period, &mut connections, false)?;
        bed.wait_role(Host::Peer, LISTEN, HostRole::Active, Duration::from_secs(5))?;
        let failback = event(&bed, count, period, &mut connections, true)?;
        settle(&bed, advert)?;
        progress(format!(
            "  trial {trial}: takeover {} lost, gap {:.1} ms, TCP {}/{}; failback {} lost, \
             gap {:.1} ms, TCP {}/{}",
            takeover.lost,
            takeover.gap.as_secs_f64() * 1e3,
            takeover.tcp_alive,
            args.connections,
            failback.lost,
            failback.gap.as_secs_f64() * 1e3,
            failback.tcp_alive,
            args.connections
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

/// `count` connections through the VIP, each answered once by the master.
fn open_connections(bed: &Testbed, count: usize) -> Result<Vec<LineClient>> {
    let to = SocketAddrV4::new(VIP, TCP_PORT);
    let mut connections = Vec::new();
    for _ in 0..count {
        let mut connection = LineClient::open(&bed.client, to, Duration::from_secs(1))?;
        let by = connection.ask()?;
        if by != "master" {
            bail!("a new TCP connection was answered by {by:?}, not the master");
        }
        connections.push(connection);
    }
    Ok(connections)
}

/// Streams `count` requests `period` apart and, one second in, takes the switch host's
/// links down (or, with `restore`, up again); then asks every connection once.
fn event(
    bed: &Testbed,
    count: u32,
    period: Duration,
    connections: &mut [LineClient],
    restore: bool,
) -> Result<Event> {
    let stream = bed.udp_stream(count, period)?;
    interrupt::sleep(Duration::from_secs(1))?;
    bed.set_switch_links(Host::Switch, restore)?;
    let answers: Vec<Answer> = stream
        .join()
        .map_err(|_| anyhow::anyhow!("the client stream panicked"))??;
    let tcp_alive = connections
        .iter_mut()
        .map(|c| c.ask())
        .filter(|by| by.as_ref().is_ok_and(|by| by == "master"))
        .count();
    Ok(Event {
        sent: answers.len(),
        lost: unanswered(&answers),
        gap: longest_gap(&answers),
        tcp_alive,
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
        "Two switch hosts on bridged segments (`Testbed::pair`), both running `lb` in pair \
         mode and keepalived (one VRRP instance on the client segment holding every \
         segment's gateway, telling `lb` of its state {}). A client sends {} UDP requests a \
         second through the VIP and holds {} TCP connections through it; one second in, \
         every link of the active switch host goes down (takeover by the peer), and in the \
         next run comes back (keepalived's higher priority takes the VIPs back: failback). \
         Downtime is the longest time without an answer; lost requests are unanswered ones; \
         a TCP connection survived when it still answers afterwards. The connection tables \
         are not synchronised: connections survive by the mid-stream pick-up on the same \
         active backend (see `docs/pair.md`).\n",
        match args.notify {
            NotifyMode::Fifo =>
                "through its notify FIFO (`vrrp_notify_fifo`), which the agent reads",
            NotifyMode::Script => "with a notify script running `lb notify`",
        },
        args.rate,
        args.connections
    );
    let _ = writeln!(
        t,
        "| advert | event | downtime ms: mean | min | max | p50 | p99 | n | lost requests (mean, max) | TCP connections surviving (min of {}) |",
        args.connections
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for s in series {
        for (name, events) in [("takeover", &s.takeovers), ("failback", &s.failbacks)] {
            let gaps: Vec<f64> = events.iter().map(|e| e.gap.as_secs_f64()).collect();
            let row = report::summary_row(
                &format!("{:?} | {name}", s.advert),
                Summary::of(&gaps),
                1e3,
                1,
            );
            let lost: Vec<f64> = events.iter().map(|e| e.lost as f64).collect();
            let lost = Summary::of(&lost).map_or("–".into(), |l| {
                format!("{:.0}, {:.0} of {}", l.mean, l.max, events[0].sent)
            });
            let tcp = events.iter().map(|e| e.tcp_alive).min().unwrap_or(0);
            let _ = writeln!(t, "{row} {lost} | {tcp} |");
        }
    }
    let _ = writeln!(t, "\n### Target\n");
    if let Some(s) = series
        .iter()
        .find(|s| s.advert == Duration::from_millis(10))
    {
        let worst = s.takeovers.iter().map(|e| e.gap).max().unwrap_or_default();
        let tcp = s.takeovers.iter().map(|e| e.tcp_alive).min().unwrap_or(0);
        let met = worst < TARGET_DOWNTIME && tcp == args.connections;
        let _ = writeln!(
            t,
            "- Switch-host takeover with 10 ms adverts: downtime < {} ms and every TCP \
             connection surviving: worst {:.1} ms, {tcp}/{} connections — {}.",
            TARGET_DOWNTIME.as_millis(),
            worst.as_secs_f64() * 1e3,
            args.connections,
            if met { "met" } else { "missed" }
        );
    }
    t
}
