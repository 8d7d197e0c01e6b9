//! `cargo xtask bench flood`: the connection table under a flood of spoofed new flows.
//!
//! A client holds `--flows` established UDP flows through the VIP, each asking the master
//! once every `--period-ms`, while a generator on the same client host sends one packet from
//! each of `--sources` distinct spoofed sources (addresses of 198.19.0.0/16 times source
//! ports) to another service of the same VIP, as fast as it can. The table holds fewer
//! entries than the flood brings (`--max-flows`), so it must evict. Reported: answers per
//! phase (before, during, after the flood), and how many established flows kept their table
//! entry throughout (their age at the end covers the whole run).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use lb_user::{
    flows::FlowView,
    testbed::{
        topology::{CLIENT_IP, UDP_PORT, VIP},
        Host, Testbed,
    },
};

use super::{
    interrupt, progress, report,
    throughput::generator::{frame, Flow, PacketSocket},
};

const PREFIX: &str = "lbfl";
const LISTEN: &str = "127.0.0.1:9100";
/// The flood's service port on the VIP (nothing listens on the backends).
const SINK_PORT: u16 = 9;

/// Options of the flood bench.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Established UDP flows of the real client.
    #[arg(long, default_value_t = 1000)]
    pub flows: u16,
    /// Milliseconds between two requests of one established flow.
    #[arg(long, default_value_t = 100)]
    pub period_ms: u64,
    /// Distinct spoofed sources of the flood.
    #[arg(long, default_value_t = 1 << 20)]
    pub sources: u32,
    /// Size of the connection table (`[flows] max`).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,
    /// Seconds before and after the flood.
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// The report to update (its `flood` section).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
}

/// Requests and answers of the established flows in one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    sent: u64,
    answered: u64,
}

/// What the real client saw.
#[derive(Debug, Default)]
struct ClientView {
    phases: [Phase; 3],
    /// Flows with at least one unanswered request during the flood.
    flows_with_loss: usize,
}

/// What the flood did.
#[derive(Debug)]
struct FloodView {
    sent: u64,
    secs: f64,
}

/// Runs the flood bench.
pub fn run(args: Args) -> Result<()> {
    if args.flows == 0 || args.period_ms == 0 || args.sources == 0 {
        bail!("--flows, --period-ms and --sources must be positive");
    }
    if args.sources > 1 << 24 || args.settle_secs > 60 {
        bail!("--sources is at most 16777216 (198.19.0.0/16 × 256 ports), --settle-secs 60");
    }
    let (started, head) = report::begin("flood");
    let mut bed = Testbed::new(PREFIX).context("cannot build the lbfl testbed")?;
    bed.start_udp_responder(Host::Master, "master")?;
    let config = format!(
        "{}{}{}\n[flows]\nmax = {}\n",
        Testbed::config_head(LISTEN),
        Testbed::service_toml(
            "echo",
            "udp",
            UDP_PORT,
            r#"{ checks = [{ type = "link" }] }"#
        ),
        Testbed::service_toml(
            "sink",
            "udp",
            SINK_PORT,
            r#"{ checks = [{ type = "link" }] }"#
        ),
        args.max_flows
    );
    let path = bed.write_file("lb.toml", &config)?;
    let agent = bed.start_lb(&["run", "--config", path.to_str().unwrap_or_default()])?;
    bed.wait_for_agent(agent, LISTEN)?;
    progress(format!(
        "{} established flows, then a flood of {} spoofed sources",
        args.flows, args.sources
    ));
    let frames = flood_frames(args.sources)?;
    let settle = Duration::from_secs(args.settle_secs);
    let (flows, period) = (args.flows, Duration::from_millis(args.period_ms));
    // The client runs for the whole bench; the flood starts after `settle`, and the client
    // goes on `settle` after it ends.
    let phase = Arc::new(AtomicU8::new(0));
    let client_start = Instant::now();
    let shared = phase.clone();
    let client = bed
        .client
        .spawn(move || client_loop(flows, period, &shared))?;
    let flood = (|| -> Result<FloodView> {
        sleep_checked(settle)?;
        phase.store(1, Ordering::SeqCst);
        let flood = bed.client.spawn(move || send_flood(&frames))?;
        let flood = flood.join().map_err(|_| anyhow!("the flood panicked"))??;
        phase.store(2, Ordering::SeqCst);
        sleep_checked(settle)?;
        Ok(flood)
    })();
    phase.store(3, Ordering::SeqCst);
    let view = client
        .join()
        .map_err(|_| anyhow!("the client panicked"))??;
    let flood = flood?;
    progress(format!(
        "flood: {} frames in {:.2} s ({:.2} Mpps)",
        flood.sent,
        flood.secs,
        flood.sent as f64 / flood.secs / 1e6
    ));
    interrupt::check()?;
    let run_secs = client_start.elapsed().as_secs_f64();
    let (survived, listed) = surviving_flows(&bed, run_secs - 1.0)?;
    let events = events(&bed)?;
    drop(bed);
    let body = render(
        &args, &head, &view, &flood, survived, listed, &events, started,
    );
    report::publish(&args.report, "flood", &body, started)?;
    Ok(())
}

/// One frame from each spoofed source: 198.19.0.0/16 with source ports 1024, 1025, … to
/// the sink port of the VIP, from the client host's MAC to the switch's.
fn flood_frames(sources: u32) -> Result<Vec<Vec<u8>>> {
    (0..sources)
        .map(|i| {
            frame(
                &Flow {
                    src_mac: [0x02, 0, 0, 0, 0x01, 0x02],
                    dst_mac: [0x02, 0, 0, 0, 0x01, 0x01],
                    src_ip: Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8),
                    dst_ip: VIP,
                    src_port: 1024 + (i >> 16) as u16,
                    dst_port: SINK_PORT,
                },
                64,
            )
        })
        .collect()
}

/// Sends every frame once, in batches, out of the client's NIC.
fn send_flood(frames: &[Vec<u8>]) -> Result<FloodView> {
    let socket = PacketSocket::open("eth0")?;
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < frames.len() {
        if sent % 65_536 < 64 {
            interrupt::check()?;
        }
        let end = (sent + 64).min(frames.len());
        let n = socket.send_each(&frames[sent..end])?;
        if n == 0 {
            std::thread::yield_now();
        }
        sent += n;
    }
    Ok(FloodView {
        sent: sent as u64,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Sleeps `duration`, failing early on an interrupt.
fn sleep_checked(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        interrupt::check()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}

/// The real client: `flows` connected UDP sockets to the VIP, each asking every `period`,
/// until `phase` is 3; requests are counted in the phase (0 before, 1 during, 2 after the
/// flood) they were sent in. Bounded: it stops by itself after 10 minutes.
fn client_loop(flows: u16, period: Duration, phase: &AtomicU8) -> Result<ClientView> {
    let sockets: Vec<UdpSocket> = (0..flows)
        .map(|_| -> Result<UdpSocket> {
            let socket = UdpSocket::bind((CLIENT_IP, 0))?;
            socket.connect(SocketAddrV4::new(VIP, UDP_PORT))?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<Result<_>>()?;
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let start = Instant::now();
    let mut view = ClientView::default();
    let mut outstanding = vec![None::<usize>; flows as usize];
    let mut lost_during = vec![false; flows as usize];
    let step = period / u32::from(flows);
    let mut next = 0usize;
    let mut due = start;
    let mut buf = [0u8; 512];
    while start.elapsed() < Duration::from_secs(600) {
        let current = phase.load(Ordering::SeqCst) as usize;
        if current >= 3 {
            break;
        }
        let now = Instant::now();
        while due <= now {
            let phase = current;
            if let Some(previous) = outstanding[next].take() {
                if previous == 1 {
                    lost_during[next] = true;
                }
            }
            if sockets[next].send(b"seq 0").is_ok() {
                view.phases[phase].sent += 1;
                outstanding[next] = Some(phase);
            }
            next = (next + 1) % sockets.len();
            due += step.max(Duration::from_micros(1));
        }
        // SAFETY: poll reads and writes the pollfd array we own, for its length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
        if ready <= 0 {
            continue;
        }
        for (i, fd) in fds.iter_mut().enumerate() {
            if fd.revents & libc::POLLIN != 0 {
                while sockets[i].recv(&mut buf).is_ok() {
                    if let Some(phase) = outstanding[i].take() {
                        view.phases[phase].answered += 1;
                    }
                }
            }
            fd.revents = 0;
        }
    }
    view.flows_with_loss = lost_during.iter().filter(|l| **l).count();
    Ok(view)
}

/// Established flows whose table entry is at least `min_age_s` old (created before the
/// flood and never replaced), and how many of the client's flows the table lists.
fn surviving_flows(bed: &Testbed, min_age_s: f64) -> Result<(usize, usize)> {
    let url = format!("http://{LISTEN}/flows?service=echo");
    let (ok, body, err) = bed.output(Host::Switch, "curl", &["-sS", "--max-time", "30", &url])?;
    if !ok {
        bail!("cannot read the agent's flows: {err}");
    }
    let flows: Vec<FlowView> = serde_json::from_str(&body).context("the agent's /flows")?;
    let mine: Vec<&FlowView> = flows
        .iter()
        .filter(|f| *f.client.ip() == CLIENT_IP)
        .collect();
    let old = mine.iter().filter(|f| f.age_s >= min_age_s).count();
    Ok((old, mine.len()))
}

/// `lb_dataplane_events_total` samples, by event.
fn events(bed: &Testbed) -> Result<Vec<(String, u64)>> {
    let url = format!("http://{LISTEN}/metrics");
    let (ok, text, err) = bed.output(Host::Switch, "curl", &["-sS", "--max-time", "10", &url])?;
    if !ok {
        bail!("cannot read the agent's metrics: {err}");
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("lb_dataplane_events_total{event=\""))
        .filter_map(|l| {
            let (event, rest) = l.split_once("\"}")?;
            Some((event.to_string(), rest.trim().parse().ok()?))
        })
        .filter(|(_, count)| *count > 0)
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    head: &str,
    view: &ClientView,
    flood: &FloodView,
    survived: usize,
    listed: usize,
    events: &[(String, u64)],
    started: Instant,
) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "## The connection table under a flood of spoofed new flows\n"
    );
    t.push_str(head);
    let _ = writeln!(t, "- Run time: {:.0} s\n", started.elapsed().as_secs_f64());
    let _ = writeln!(
        t,
        "{} established UDP flows of one client ask the master through the VIP, each once \
         every {} ms; after {} s a generator on the same client host sends one frame from \
         each of {} distinct spoofed sources (198.19.0.0/16 × source ports) to another UDP \
         service of the same VIP, as fast as it can, into a table of {} flows; the client \
         goes on for {} s after it. The switch does not forward (IPv4 forwarding off), so \
         the program's reverse-path check cannot refuse the spoofed sources: every spoofed \
         frame starts a flow, the worst case for the table (and the master's kernel answers \
         some with port unreachable, which the program carries back).\n",
        args.flows,
        args.period_ms,
        args.settle_secs,
        args.sources,
        args.max_flows,
        args.settle_secs
    );
    let _ = writeln!(
        t,
        "Flood: {} frames in {:.2} s, {:.2} Mpps offered.\n",
        flood.sent,
        flood.secs,
        flood.sent as f64 / flood.secs / 1e6
    );
    let _ = writeln!(
        t,
        "| phase | requests | answered | lost |\n|---|---|---|---|"
    );
    for (name, p) in ["before the flood", "during the flood", "after the flood"]
        .iter()
        .zip(view.phases)
    {
        let lost = p.sent.saturating_sub(p.answered);
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {lost} ({:.3} %) |",
            p.sent,
            p.answered,
            lost as f64 / p.sent.max(1) as f64 * 100.0
        );
    }
    let _ = writeln!(
        t,
        "\nEstablished flows that kept their table entry through the flood (created before \
         it, never replaced): **{survived} of {}** ({listed} of the client's flows listed at \
         the end; a UDP flow whose entry was evicted is started afresh by its next packet, \
         on the same active backend). Flows with at least one request unanswered within \
         {} ms during the flood: {}. Requests lost during the flood are the price of the \
         shared capacity, not of the table: the generator, the client and the switch's \
         receive work share two cores and one veth link, and each spoofed frame costs the \
         program a new flow (two table inserts, about 1 µs; see the per-packet cost).\n",
        args.flows, args.period_ms, view.flows_with_loss
    );
    let _ = writeln!(
        t,
        "Dataplane events of the run: {}.\n",
        events
            .iter()
            .map(|(e, n)| format!("`{e}` {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    t
}
