//! Per-packet cost of the XDP program, from `BPF_PROG_TEST_RUN` on crafted frames.
//!
//! The kernel runs a test frame in place: with a repeat count, the second run sees the
//! frame the first one rewrote, which is no longer VIP traffic (the traffic counters show
//! it: one rewrite per call, whatever the repeat count). Two ways around it, both reported:
//!
//! - repeated runs on a second copy of the program whose plan puts the master at the VIP's
//!   own address: the rewrite then writes back the bytes it read, so every run takes the
//!   full forward (or return) path on an unchanged frame — counters check that each of the
//!   repeated runs was rewritten (warm caches, as in a NAPI batch);
//! - many single runs on a fresh copy of a normal frame each, minus the same timing of the
//!   empty pass-through program (the kernel's timer and set-up around one run): cold
//!   caches after each system call, an upper bound.
//!
//! A new flow cannot be repeated (its first run creates it): it is measured by single runs,
//! each from a client address the table has not seen.
//!
//! Without hardware counters, the profile of the established-flow forward path is built the
//! same way: the [`Breakdown`] runs the program, with the same repeat count, on frames and
//! map states that make it stop at successive steps of that path (a NIC it does not serve,
//! a frame that is not IPv4, an address that is not a VIP, the flow's service with no
//! backend, the full path); each stop point's cost minus the previous one is the cost of the
//! step in between. The counters and the returned action
//! check, on every call, that each stop point stops where it claims.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{programs::Xdp, Ebpf};
use lb_common::{Direction, PASS_PROGRAM_NAME};
use lb_user::dataplane::{counters::ACTION_NAMES, Dataplane, MapWriter, OBJECT};

use super::generator::{frame, Flow};
use crate::{
    bench::{interrupt, stats::Summary},
    testrun::{
        self, interface, load, namespace, BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC,
        XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    },
};

mod breakdown;

pub use breakdown::{Breakdown, Stop};

/// Loopback: present in every namespace, never among the program's NICs.
const LOOPBACK_IFINDEX: u32 = 1;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const MASTER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);
/// Source of the breakdown's frames that must stop before a flow is created: the program
/// never sees it on a full forward path, so a flow of it would show a stop point that went
/// too far.
const PROBE_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const PORT: u16 = 5353;
/// A port of the VIP no service listens on.
const NO_SERVICE_PORT: u16 = 5354;

const CONFIG: &str = r#"
metrics_listen = "127.0.0.1:9100"

[[interfaces]]
name = "t-cli"
role = "client"

[[interfaces]]
name = "t-bck"
role = "backend"

[[services]]
name = "echo"
vip = "198.18.1.100"
protocol = "udp"
port = 5353
health = { checks = [{ type = "link" }] }
backends = [
  { name = "master", ip = "198.18.2.2", priority = 100, mac = "02:00:00:00:02:02", iface = "t-bck" },
  { name = "slave",  ip = "198.18.3.2", priority = 50,  mac = "02:00:00:00:03:02", iface = "t-bck" },
]
"#;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Trials (each gives one mean per path).
    pub trials: usize,
    /// Single runs per path and trial.
    pub single_runs: u32,
    /// Repeat count of the repeated runs.
    pub repeat: u32,
    /// Frame length, bytes.
    pub frame_len: usize,
}

/// One path's figures, ns per packet.
#[derive(Debug, Clone)]
pub struct PathCost {
    /// Path name.
    pub name: &'static str,
    /// XDP action the program returned.
    pub action: &'static str,
    /// Means of single runs minus the pass-through program's, one per trial.
    pub single: Option<Summary>,
    /// Means of repeated runs, one per trial.
    pub repeated: Option<Summary>,
}

/// The whole measurement.
#[derive(Debug, Clone)]
pub struct Costs {
    /// Forward, return, non-VIP.
    pub paths: Vec<PathCost>,
    /// The pass-through program: single runs (the overhead subtracted above).
    pub baseline_single: Option<Summary>,
    /// The pass-through program with the large repeat count.
    pub baseline_repeated: Option<Summary>,
    /// Normal plan, forward frame run with the large repeat count: rewrites the counters
    /// saw (1: the repeated runs after the first did not take the forward path).
    pub forward_repeat_rewrites: u64,
    /// Fixed-point plan: rewrites the counters saw per repeated call, forward and return
    /// (both should equal the repeat count).
    pub fixed_rewrites: (u64, u64),
    /// Where the forward path's time goes.
    pub breakdown: Breakdown,
    /// Wall time of the measurement, seconds.
    pub secs: f64,
}

struct Rig {
    dataplane: Dataplane,
    maps: MapWriter,
    /// The same program with the master at the VIP's address.
    fixed: Dataplane,
    fixed_maps: MapWriter,
    pass: Ebpf,
    client_if: u32,
    backend_if: u32,
    client_slot: u32,
    backend_slot: u32,
    master_index: u32,
    service_id: u32,
}

/// One `BPF_PROG_TEST_RUN`: (action, mean ns per run).
fn test_run(program: &mut Xdp, ifindex: u32, data: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let (action, ns, _) = testrun::run(program, ifindex, data, repeat)?;
    Ok((action, ns))
}

fn action_name(action: u32) -> &'static str {
    ACTION_NAMES.get(action as usize).copied().unwrap_or("?")
}

/// `frame` with another ether type (the IPv4 header stays, unread).
fn with_ether_type(frame: &[u8], ether_type: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[12..14].copy_from_slice(&ether_type.to_be_bytes());
    out
}

/// Mean ns of `runs` single runs of UDP to the VIP, each from a client address the table
/// has not seen (the `first`-th onwards), so each creates a flow.
fn new_flow_runs(
    program: &mut Xdp,
    ifindex: u32,
    len: usize,
    first: u32,
    runs: u32,
) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..runs {
        if i % 1024 == 0 {
            interrupt::check()?;
        }
        let n = first + i;
        let data = frame(
            &Flow {
                src_mac: CLIENT_MAC,
                dst_mac: CLIENT_IF_MAC,
                src_ip: Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8),
                dst_ip: VIP,
                src_port: 10_000 + (n >> 16) as u16,
                dst_port: PORT,
            },
            len,
        )?;
        let (action, ns) = test_run(program, ifindex, &data, 1)?;
        if action != XDP_REDIRECT {
            bail!("a new flow got action {action}, expected XDP_REDIRECT");
        }
        total += ns;
    }
    Ok(total / f64::from(runs))
}

/// Mean ns of `runs` single runs; fails if any returns another action than `expect`.
fn single_runs(
    program: &mut Xdp,
    ifindex: u32,
    data: &[u8],
    runs: u32,
    expect: u32,
) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..runs {
        if i % 1024 == 0 {
            interrupt::check()?;
        }
        let (action, ns) = test_run(program, ifindex, data, 1)?;
        if action != expect {
            bail!("the program returned action {action}, expected {expect}");
        }
        total += ns;
    }
    Ok(total / f64::from(runs))
}

impl Rig {
    fn new() -> Result<Self> {
        let (plan, dataplane, maps) = load(CONFIG)?;
        // Not a valid config (validation refuses a backend at a VIP's address), written to
        // a second program only, so that the rewrite leaves the frame as it was.
        let mut fixed_plan = plan.clone();
        for backend in &mut fixed_plan.services[0].backends {
            if backend.name == "master" {
                // The forward rewrite then writes back the client's addresses and MACs, and
                // the reverse one the VIP and the client NIC's MAC: both are fixed points.
                backend.ip = VIP;
                backend.mac = CLIENT_IF_MAC;
                backend.egress_mac = CLIENT_MAC;
            }
        }
        let (fixed, fixed_maps) = Dataplane::load(plan.flows.max)?;
        fixed_maps.write_plan(&fixed_plan)?;
        let master_index = plan.service("echo")?.backend("master")?.index;
        let service_id = plan.service("echo")?.id;
        let mut pass = Ebpf::load(OBJECT).context("cannot load the XDP object")?;
        let program: &mut Xdp = pass
            .program_mut(PASS_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("{PASS_PROGRAM_NAME} missing from the object"))?
            .try_into()?;
        program
            .load()
            .context("cannot load the pass-through program")?;
        Ok(Rig {
            client_if: interface(&plan, "t-cli")?.ifindex,
            backend_if: interface(&plan, "t-bck")?.ifindex,
            client_slot: interface(&plan, "t-cli")?.slot,
            backend_slot: interface(&plan, "t-bck")?.slot,
            master_index,
            service_id,
            dataplane,
            maps,
            fixed,
            fixed_maps,
            pass,
        })
    }

    fn pass(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .pass
            .program_mut(PASS_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("{PASS_PROGRAM_NAME} missing"))?
            .try_into()?)
    }

    fn rewrites(maps: &MapWriter, index: u32, direction: Direction) -> Result<u64> {
        Ok(maps.traffic_of(index, direction)?.packets)
    }

    fn measure(&mut self, options: Options) -> Result<Costs> {
        let started = Instant::now();
        let len = options.frame_len;
        let forward = frame(
            &Flow {
                src_mac: CLIENT_MAC,
                dst_mac: CLIENT_IF_MAC,
                src_ip: CLIENT,
                dst_ip: VIP,
                src_port: 40_000,
                dst_port: PORT,
            },
            len,
        )?;
        let reply = frame(
            &Flow {
                src_mac: MASTER_MAC,
                dst_mac: BACKEND_IF_MAC,
                src_ip: MASTER,
                dst_ip: CLIENT,
                src_port: PORT,
                dst_port: 40_000,
            },
            len,
        )?;
        let other = frame(
            &Flow {
                src_mac: CLIENT_MAC,
                dst_mac: CLIENT_IF_MAC,
                src_ip: CLIENT,
                dst_ip: OTHER,
                src_port: 40_000,
                dst_port: PORT,
            },
            len,
        )?;
        let fixed_reply = frame(
            &Flow {
                src_mac: CLIENT_IF_MAC,
                dst_mac: CLIENT_MAC,
                src_ip: VIP,
                dst_ip: CLIENT,
                src_port: PORT,
                dst_port: 40_000,
            },
            len,
        )?;
        let (cif, bif, mi) = (self.client_if, self.backend_if, self.master_index);
        // The forward run creates the flow, which the return path needs.
        let (action, _) = test_run(self.dataplane.program()?, cif, &forward, 1)?;
        if action != XDP_REDIRECT {
            bail!("the forward frame got action {action}, expected XDP_REDIRECT");
        }
        let (action, _) = test_run(self.fixed.program()?, cif, &forward, 1)?;
        if action != XDP_REDIRECT {
            bail!("the forward frame got action {action} from the fixed-point plan");
        }
        let (mut base_s, mut base_r) = (Vec::new(), Vec::new());
        let (mut fwd, mut ret, mut non, mut non_r) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut fwd_r, mut ret_r) = (Vec::new(), Vec::new());
        let mut created = Vec::new();
        let mut fixed_rewrites = (0, 0);
        let runs = options.single_runs;
        for trial in 0..options.trials {
            interrupt::check()?;
            let base = single_runs(self.pass()?, cif, &forward, runs, XDP_PASS)?;
            base_s.push(base);
            let program = self.dataplane.program()?;
            created.push(new_flow_runs(program, cif, len, trial as u32 * runs, runs)? - base);
            let program = self.dataplane.program()?;
            fwd.push(single_runs(program, cif, &forward, runs, XDP_REDIRECT)? - base);
            ret.push(single_runs(program, bif, &reply, runs, XDP_REDIRECT)? - base);
            non.push(single_runs(program, cif, &other, runs, XDP_PASS)? - base);
            let (action, ns) = test_run(program, cif, &other, options.repeat)?;
            if action != XDP_PASS {
                bail!("the non-VIP frame got action {action}, expected XDP_PASS");
            }
            non_r.push(ns);
            base_r.push(test_run(self.pass()?, cif, &other, options.repeat)?.1);
            for (way, data, ifindex, out) in [
                (Direction::Forward, &forward, cif, &mut fwd_r),
                (Direction::Reverse, &fixed_reply, bif, &mut ret_r),
            ] {
                let before = Self::rewrites(&self.fixed_maps, mi, way)?;
                let (action, ns) = test_run(self.fixed.program()?, ifindex, data, options.repeat)?;
                let done = Self::rewrites(&self.fixed_maps, mi, way)? - before;
                if action != XDP_REDIRECT || done != u64::from(options.repeat) {
                    bail!(
                        "fixed-point plan, {way:?}: action {action}, {done} rewrites in {} runs",
                        options.repeat
                    );
                }
                match way {
                    Direction::Forward => fixed_rewrites.0 = done,
                    Direction::Reverse => fixed_rewrites.1 = done,
                }
                out.push(ns);
            }
        }
        let before = Self::rewrites(&self.maps, mi, Direction::Forward)?;
        test_run(self.dataplane.program()?, cif, &forward, options.repeat)?;
        let forward_repeat_rewrites = Self::rewrites(&self.maps, mi, Direction::Forward)? - before;
        let breakdown = self.breakdown(options, &forward)?;
        Ok(Costs {
            paths: vec![
                PathCost {
                    name: "forward, established flow (UDP to the VIP)",
                    action: "XDP_REDIRECT",
                    single: Summary::of(&fwd),
                    repeated: Summary::of(&fwd_r),
                },
                PathCost {
                    name: "forward, new flow (a new client address each run)",
                    action: "XDP_REDIRECT",
                    single: Summary::of(&created),
                    repeated: None,
                },
                PathCost {
                    name: "return (reply of the master)",
                    action: "XDP_REDIRECT",
                    single: Summary::of(&ret),
                    repeated: Summary::of(&ret_r),
                },
                PathCost {
                    name: "non-VIP (UDP to another address)",
                    action: "XDP_PASS",
                    single: Summary::of(&non),
                    repeated: Summary::of(&non_r),
                },
            ],
            baseline_single: Summary::of(&base_s),
            baseline_repeated: Summary::of(&base_r),
            forward_repeat_rewrites,
            fixed_rewrites,
            breakdown,
            secs: started.elapsed().as_secs_f64(),
        })
    }
}

/// Measures the program inside a namespace of its own (`lbt-cost`, one veth pair), removed
/// afterwards.
pub fn measure(options: Options) -> Result<Costs> {
    let ns = namespace("lbt-cost")?;
    ns.enter(move || -> Result<Costs> { Rig::new()?.measure(options) })?
}
