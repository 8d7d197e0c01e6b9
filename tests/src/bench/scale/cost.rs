//! Per-packet cost of the XDP program at scale: the same program and frames, once on a
//! small plan with a small table, once on many services and a table of a million flows,
//! in the same run.
//!
//! Every figure comes from single `BPF_PROG_TEST_RUN` calls, each on a fresh frame of a
//! flow picked at random over the whole table (a repeated run would hit one flow, in cache):
//! what the kernel reports for the call, minus the same for the empty pass-through program.
//! The table's size shows in the cache misses of its lookups, as with live traffic.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{programs::Xdp, Ebpf};
use lb_common::{flow_state, proto, Flow as FlowEntry, FlowKey, PASS_PROGRAM_NAME};
use lb_user::{
    dataplane::{flows::Placement, writer::monotonic_ns, MapWriter, OBJECT},
    plan::Plan,
};

use crate::{
    bench::{
        interrupt,
        throughput::generator::{frame, Flow},
    },
    testrun::{self, interface, load, CLIENT_IF_MAC, CLIENT_MAC, XDP_PASS, XDP_REDIRECT},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const MASTER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);
/// The first service's port; service `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 10_000;
/// Frame length (Ethernet header included).
const FRAME_LEN: usize = 64;

/// One configuration measured: its services and flows.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Services, one UDP port of the VIP each, two backends each.
    pub services: u32,
    /// Established flows written into the table before measuring.
    pub flows: u32,
}

/// The figures of one [`Shape`].
#[derive(Debug, Clone)]
pub struct ShapeCost {
    /// What was measured.
    pub shape: Shape,
    /// Flows in the table after the fill (the LRU table may evict some).
    pub in_table: usize,
    /// Seconds to write the flows (and their reply index entries) from user space.
    pub fill_secs: f64,
    /// ns per packet, net of the pass-through program: an established flow's next packet,
    /// the flow seen within the last second (the common packet).
    pub established_ns: f64,
    /// The same, for the first packet after a second idle: the flow is written again.
    pub refresh_ns: f64,
    /// The same, for a packet to another address (not VIP traffic).
    pub non_vip_ns: f64,
    /// The same, for a new flow (a client the table has not seen).
    pub new_flow_ns: f64,
    /// The pass-through program itself (the kernel's set-up around one run).
    pub pass_ns: f64,
}

/// A config for the rig's namespace with `services` services (ports from
/// [`FIRST_PORT`]), each on the master and the slave, and a table of `max_flows`.
fn config(services: u32, max_flows: u32) -> String {
    let mut config = format!(
        "metrics_listen = \"127.0.0.1:9100\"\n\n[flows]\nmax = {max_flows}\n\n\
         [[interfaces]]\nname = \"t-cli\"\nrole = \"client\"\n\n\
         [[interfaces]]\nname = \"t-bck\"\nrole = \"backend\"\n"
    );
    for i in 0..services {
        let port = FIRST_PORT as u32 + i;
        config += &format!(
            "\n[[services]]\nname = \"s{i}\"\nvip = \"{VIP}\"\nprotocol = \"udp\"\nport = {port}\n\
             health = {{ checks = [{{ type = \"link\" }}] }}\nbackends = [\n\
             {{ name = \"master\", ip = \"{MASTER}\", priority = 100, mac = \"02:00:00:00:02:02\", iface = \"t-bck\" }},\n\
             {{ name = \"slave\", ip = \"198.18.3.2\", priority = 50, mac = \"02:00:00:00:03:02\", iface = \"t-bck\" }},\n]\n"
        );
    }
    config
}

/// Flow `n` of a table of a shape with `services` services: its client
/// ([`super::client_of`]) and its service.
fn flow_of(n: u32, services: u32) -> Flow {
    let (src_ip, src_port) = super::client_of(n);
    Flow {
        src_mac: CLIENT_MAC,
        dst_mac: CLIENT_IF_MAC,
        src_ip,
        dst_ip: VIP,
        src_port,
        dst_port: FIRST_PORT + (n % services) as u16,
    }
}

/// A small, fast generator of flow numbers (xorshift): the same sequence in every run.
struct Pick(u64);

impl Pick {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n)) as u32
    }
}

/// Writes flows `0..shape.flows` into the table, each established on its service's master;
/// returns the seconds it took. Even flows are stamped as seen a minute from now, so that
/// their packets take the common path (a flow seen within the last second is not written
/// again); odd ones as seen two seconds before the fill, so that their next packet
/// refreshes the flow (one write into the table, as each live flow's first packet of
/// every second does).
fn fill(plan: &Plan, maps: &MapWriter, shape: Shape, client_if: u32) -> Result<f64> {
    let started = Instant::now();
    let services: Vec<(u32, u32)> = plan
        .services
        .iter()
        .map(|s| Ok((s.id, s.backend("master")?.index)))
        .collect::<Result<_>>()?;
    let now = monotonic_ns();
    let (fresh, stale) = (now + 60_000_000_000, now.saturating_sub(2_000_000_000));
    for n in 0..shape.flows {
        if n % 65_536 == 0 {
            interrupt::check()?;
        }
        let flow = flow_of(n, shape.services);
        let key = FlowKey::new(
            proto::UDP,
            flow.src_ip.octets(),
            flow.src_port.to_be_bytes(),
            VIP.octets(),
            flow.dst_port.to_be_bytes(),
        );
        let (service, backend) = services[(n % shape.services) as usize];
        let seen_ns = if n % 2 == 0 { fresh } else { stale };
        let entry = FlowEntry {
            created_ns: now,
            seen_ns,
            backend,
            service,
            ifindex: client_if,
            client_mac: CLIENT_MAC,
            state: flow_state::REPLIED,
            flags: 0,
            pad: 0,
        };
        maps.write_flow(&key, &entry, MASTER.octets(), Placement::Overwrite)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Mean ns the kernel reports for single runs of `program` on the frames `frames` makes
/// for `0..runs`, each expected to return `expect`.
fn single_runs(
    program: &mut Xdp,
    ifindex: u32,
    runs: u32,
    expect: u32,
    mut frames: impl FnMut(u32) -> Result<Vec<u8>>,
) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..runs {
        if i % 1024 == 0 {
            interrupt::check()?;
        }
        let data = frames(i)?;
        let (action, ns, _) = testrun::run(program, ifindex, &data, 1)?;
        if action != expect {
            bail!("run {i}: action {action}, expected {expect}");
        }
        total += ns;
    }
    Ok(total / f64::from(runs))
}

/// Measures `shape` with `runs` single runs per path, inside a namespace of its own
/// (`lbt-scale`, one veth pair), removed afterwards.
pub fn measure(shape: Shape, max_flows: u32, runs: u32) -> Result<ShapeCost> {
    let ns = testrun::namespace("lbt-scale")?;
    ns.enter(move || measure_here(shape, max_flows, runs))?
}

fn measure_here(shape: Shape, max_flows: u32, runs: u32) -> Result<ShapeCost> {
    let (plan, mut dataplane, maps) = load(&config(shape.services, max_flows))
        .with_context(|| format!("cannot load a plan of {} services", shape.services))?;
    let client_if = interface(&plan, "t-cli")?.ifindex;
    let fill_secs = fill(&plan, &maps, shape, client_if)?;
    let in_table = maps.read_flows(plan.flows.read_limit()).len();
    let mut pass = Ebpf::load(OBJECT).context("cannot load the XDP object")?;
    let pass: &mut Xdp = pass
        .program_mut(PASS_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("{PASS_PROGRAM_NAME} missing from the object"))?
        .try_into()?;
    pass.load()
        .context("cannot load the pass-through program")?;
    let program = dataplane.program()?;

    // Even flows: seen within the second; odd ones: idle for over a second, each picked
    // once at most (a refreshed flow is fresh again).
    let halves = shape.flows / 2;
    let mut pick = Pick(0x9e37_79b9_7f4a_7c15);
    let established = |_| {
        let n = pick.below(halves) * 2;
        frame(&flow_of(n, shape.services), FRAME_LEN)
    };
    let established_ns = single_runs(program, client_if, runs, XDP_REDIRECT, established)?;
    let refresh_runs = runs.min(halves);
    let refreshed = |i: u32| {
        let n = (i * 2 + 1) % shape.flows;
        frame(&flow_of(n, shape.services), FRAME_LEN)
    };
    let refresh_ns = single_runs(program, client_if, refresh_runs, XDP_REDIRECT, refreshed)?;
    let mut pick = Pick(0x2545_f491_4f6c_dd1d);
    let non_vip = |_| {
        let flow = Flow {
            dst_ip: OTHER,
            ..flow_of(pick.below(shape.flows), shape.services)
        };
        frame(&flow, FRAME_LEN)
    };
    let non_vip_ns = single_runs(program, client_if, runs, XDP_PASS, non_vip)?;
    // New clients: the flows after the table's, one port each.
    let new_flow = |i: u32| {
        let flow = Flow {
            src_port: 40_000,
            ..flow_of(shape.flows + i, shape.services)
        };
        frame(&flow, FRAME_LEN)
    };
    let new_runs = runs.min(60_000);
    let new_flow_ns = single_runs(program, client_if, new_runs, XDP_REDIRECT, new_flow)?;
    let mut pick = Pick(0x1234_5678_9abc_def1);
    let pass_frames = |_| frame(&flow_of(pick.below(shape.flows), shape.services), FRAME_LEN);
    let pass_ns = single_runs(pass, client_if, runs, XDP_PASS, pass_frames)?;
    Ok(ShapeCost {
        shape,
        in_table,
        fill_secs,
        established_ns: established_ns - pass_ns,
        refresh_ns: refresh_ns - pass_ns,
        non_vip_ns: non_vip_ns - pass_ns,
        new_flow_ns: new_flow_ns - pass_ns,
        pass_ns,
    })
}
