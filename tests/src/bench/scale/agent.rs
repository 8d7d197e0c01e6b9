//! The agent at scale: `lb run` on the namespace testbed with many services, its start
//! time and memory, then a million flows written into its pinned table: the time, memory
//! and CPU of its census sweeps over them, and the start time of an agent that adopts them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{flow_state, proto, Flow, FlowKey};
use lb_user::{
    config::Config,
    dataplane::writer::monotonic_ns,
    plan::Plan,
    testbed::{
        topology::{Testbed, UDP_PORT, VIP},
        Host,
    },
};

use crate::{
    agent::{metrics, sample},
    bench::interrupt,
    procfs::{process_cpu, status_value},
};

const LISTEN: &str = "127.0.0.1:9100";
/// The first service's port; service `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 10_000;
/// How long the agent runs before its memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// The window over which the agent's CPU is read.
const CPU_WINDOW: Duration = Duration::from_secs(20);

/// What the agent costs at scale.
#[derive(Debug, Clone)]
pub struct AgentScale {
    /// Services configured (two backends each).
    pub services: u32,
    /// `lb run` started until `/healthz` answered ok, fresh dataplane, seconds.
    pub start_secs: f64,
    /// Resident memory (MiB) after [`SETTLE`].
    pub rss_mib: f64,
    /// Peak resident memory (MiB) after [`SETTLE`].
    pub hwm_mib: f64,
    /// Kernel memory of the program's maps (MiB, `memlock` of their fds).
    pub maps_mib: f64,
    /// Flows written into the pinned table.
    pub flows: u32,
    /// Seconds it took to write them (one system call each).
    pub fill_secs: f64,
    /// How long a census sweep of the full table took (`lb_flow_sweep_seconds`).
    pub sweep_secs: f64,
    /// Entries that sweep counted (`lb_flow_table_entries`).
    pub counted: u64,
    /// The census's share of a core with the full table (the agent's CPU beyond that with
    /// an empty table, over [`CPU_WINDOW`]).
    pub census_core_share: f64,
    /// Resident memory (MiB) after sweeps of the full table.
    pub rss_after_sweeps_mib: f64,
    /// Peak resident memory (MiB) after sweeps of the full table.
    pub hwm_after_sweeps_mib: f64,
    /// A second `lb run`, adopting the pinned dataplane and its table, until `/healthz`
    /// answered ok, seconds.
    pub adopt_secs: f64,
    /// Resident memory (MiB) of the adopting agent after [`SETTLE`].
    pub adopt_rss_mib: f64,
}

/// The testbed's config with `services` UDP services (ports from [`FIRST_PORT`], a link
/// check and a UDP check of the responder every 10 s on each backend) and a table of
/// `max_flows`, whose UDP flows last an hour.
fn config(services: u32, max_flows: u32) -> String {
    let mut config = Testbed::config_head(LISTEN);
    let health = format!(
        "{{ checks = [{{ type = \"link\" }}, {{ type = \"udp\", port = {UDP_PORT}, send = \"ping\" }}], interval = \"10s\" }}"
    );
    for i in 0..services {
        let port = FIRST_PORT + i as u16;
        config += &Testbed::service_toml(&format!("s{i}"), "udp", port, &health);
    }
    config + &format!("\n[flows]\nmax = {max_flows}\nudp = \"1h\"\n")
}

/// Starts `lb run` with the config at `path` and waits until it is healthy; returns its
/// process index and the seconds that took.
fn start(bed: &mut Testbed, path: &Path) -> Result<(usize, f64)> {
    let started = Instant::now();
    let agent = bed.start_lb(&["run", "--config", path.to_str().context("config path")?])?;
    bed.wait_for_agent(agent, LISTEN)?;
    Ok((agent, started.elapsed().as_secs_f64()))
}

fn pid(bed: &Testbed, agent: usize) -> Result<u32> {
    bed.processes[agent]
        .pid()
        .context("the agent is not running")
}

/// (resident, peak resident) memory of `pid`, MiB.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let mib = |key| Ok::<_, anyhow::Error>(status_value(pid, key)? as f64 / 1024.0);
    Ok((mib("VmRSS")?, mib("VmHWM")?))
}

/// The kernel memory of the BPF maps `pid` holds open (each map once), MiB.
fn maps_memory(pid: u32) -> Result<f64> {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                bytes += memlock;
            }
        }
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Writes `count` established UDP flows, spread over the plan's services, into the table
/// pinned under `pin_path`; returns the seconds it took.
fn fill(pin_path: &Path, plan: &Plan, count: u32) -> Result<f64> {
    let started = Instant::now();
    let path = pin_path.join("maps").join(lb_common::map_names::FLOWS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open the pinned table {}", path.display()))?;
    let mut flows: BpfHashMap<MapData, FlowKey, Flow> =
        BpfHashMap::try_from(Map::LruHashMap(data))?;
    let ifindex = plan
        .interfaces
        .iter()
        .find(|i| i.name == "c0")
        .context("c0 missing from the plan")?
        .ifindex;
    let services: Vec<(u32, u16, u32)> = plan
        .services
        .iter()
        .map(|s| {
            Ok((
                s.id,
                s.port.context("a service without a port")?,
                s.backend("master")?.index,
            ))
        })
        .collect::<Result<_>>()?;
    let now = monotonic_ns();
    for n in 0..count {
        if n % 65_536 == 0 {
            interrupt::check()?;
        }
        let (service, port, backend) = services[n as usize % services.len()];
        let (client, client_port) = super::client_of(n);
        let key = FlowKey::new(
            proto::UDP,
            client.octets(),
            client_port.to_be_bytes(),
            VIP.octets(),
            port.to_be_bytes(),
        );
        let flow = Flow {
            created_ns: now,
            seen_ns: now,
            backend,
            service,
            ifindex,
            client_mac: [0x02, 0, 0, 0, 0x01, 0x02],
            state: flow_state::REPLIED,
            flags: 0,
            pad: 0,
        };
        flows.insert(key, flow, 0)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Measures the agent with `services` services and `flows` flows in a table of
/// `max_flows`.
pub fn measure(services: u32, flows: u32, max_flows: u32) -> Result<AgentScale> {
    let mut bed = Testbed::new("lbs-agent")?;
    bed.start_udp_responder(Host::Master, "master")?;
    bed.start_udp_responder(Host::Slave, "slave")?;
    let text = config(services, max_flows);
    let path = bed.write_file("lb-scale.toml", &text)?;
    let parsed = Config::parse(&text)?;
    let plan = bed.switch.enter(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(Plan::resolve(&parsed, &[]))
    })??;

    let (agent, start_secs) = start(&mut bed, &path)?;
    std::thread::sleep(SETTLE);
    let agent_pid = pid(&bed, agent)?;
    let (rss_mib, hwm_mib) = memory(agent_pid)?;
    let maps_mib = maps_memory(agent_pid)?;

    // The agent's CPU over a window with the empty table (the probes, the sweeps of
    // nothing), then with the full one after its first sweep: the difference is the
    // census's.
    let cpu_over_window = || -> Result<f64> {
        let before = process_cpu(agent_pid)?.total;
        std::thread::sleep(CPU_WINDOW);
        Ok(process_cpu(agent_pid)?.total - before)
    };
    let empty = cpu_over_window()?;
    let fill_secs = fill(&bed.pin_path(), &plan, flows)?;
    std::thread::sleep(plan.flows.sweep_interval + Duration::from_secs(3));
    let text = metrics(&bed, LISTEN);
    let sweep_secs = sample(&text, "lb_flow_sweep_seconds").context("no lb_flow_sweep_seconds")?;
    let counted = sample(&text, "lb_flow_table_entries").unwrap_or(0.0);
    let full = cpu_over_window()?;
    let census_core_share = (full - empty).max(0.0) / CPU_WINDOW.as_secs_f64();
    let (rss_after_sweeps_mib, hwm_after_sweeps_mib) = memory(agent_pid)?;

    let mut old = bed.processes.remove(agent);
    old.terminate()?;
    let (agent, adopt_secs) = start(&mut bed, &path)?;
    std::thread::sleep(SETTLE);
    let (adopt_rss_mib, _) = memory(pid(&bed, agent)?)?;
    bed.stop_lb_for_good(agent)?;
    Ok(AgentScale {
        services,
        start_secs,
        rss_mib,
        hwm_mib,
        maps_mib,
        flows,
        fill_secs,
        sweep_secs,
        counted: counted as u64,
        census_core_share,
        rss_after_sweeps_mib,
        hwm_after_sweeps_mib,
        adopt_secs,
        adopt_rss_mib,
    })
}
