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

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{programs::Xdp, Ebpf};
use lb_common::{Direction, NO_BACKEND, PASS_PROGRAM_NAME, XDP_ACTIONS};
use lb_user::dataplane::{counters::ACTION_NAMES, Dataplane, MapWriter, OBJECT};

use super::generator::{frame, Flow};
use crate::{
    bench::{interrupt, stats::Summary},
    testrun::{
        self, interface, load, namespace, BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, MASTER_MAC,
        XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    },
};

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

/// One stop point of the [`Breakdown`]: the program run on a frame and map state that make
/// it stop at a given step.
#[derive(Debug, Clone)]
pub struct Stop {
    /// What the program does up to this stop point beyond the point it is compared with.
    pub step: &'static str,
    /// The frame and map state that make it stop here.
    pub how: &'static str,
    /// XDP action it returned (checked on every call).
    pub action: &'static str,
    /// What the counters showed per call (checked on every call).
    pub evidence: String,
    /// Index in [`Breakdown::chain`] of the stop point this one is compared with.
    pub base: Option<usize>,
    /// Kernel's mean ns per run of each trial (the kernel reports whole ns).
    pub ns: Option<Summary>,
    /// Wall-clock ns per run of each trial around the system call (fractions of a ns;
    /// includes the call itself, amortised over the repeat count, and any preemption).
    pub wall: Option<Summary>,
}

/// The forward path's cost split into its steps by stop points.
#[derive(Debug, Clone)]
pub struct Breakdown {
    /// Stop points along the forward path, in the order the program reaches them; the
    /// first is the empty program, the last the full forward path.
    pub chain: Vec<Stop>,
    /// Stop points off that path, each compared with a point of the chain.
    pub side: Vec<Stop>,
    /// Repeat count of each call.
    pub repeat: u32,
    /// Trials (each runs every stop point once, in order).
    pub trials: usize,
    /// Wall time of the breakdown, seconds.
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

/// Which program a [`Probe`] runs.
#[derive(Clone, Copy)]
enum Program {
    /// The empty pass-through program.
    Pass,
    /// The fixed-point plan's copy of the load balancer.
    Fixed,
}

/// How to reach one stop point, and what the counters must show there.
struct Probe {
    step: &'static str,
    how: &'static str,
    program: Program,
    ifindex: u32,
    frame: Vec<u8>,
    action: u32,
    /// The `ACTIONS` entry (NIC slot, action) that must count every run; all others none.
    counted: Option<(u32, u32)>,
    /// Whether every run must be counted as a forward rewrite of the master (otherwise
    /// none may be, and the frame must come out unchanged).
    rewrites: bool,
    /// A source address that must not be learned as a client.
    unlearned: Option<Ipv4Addr>,
    /// Run with the service's `ACTIVE` entry set to `NO_BACKEND`.
    no_backend: bool,
    base: Option<usize>,
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

    /// The stop points, from the empty program to the full forward path.
    fn probes(&self, len: usize, forward: &[u8]) -> Result<(Vec<Probe>, Vec<Probe>)> {
        let (cif, cslot) = (self.client_if, self.client_slot);
        let probe_flow = |dst_ip, dst_port| Flow {
            src_mac: CLIENT_MAC,
            dst_mac: CLIENT_IF_MAC,
            src_ip: PROBE_CLIENT,
            dst_ip,
            src_port: 40_000,
            dst_port,
        };
        let to_vip = frame(&probe_flow(VIP, PORT), len)?;
        let to_other = frame(&probe_flow(OTHER, PORT), len)?;
        let no_service = frame(&probe_flow(VIP, NO_SERVICE_PORT), len)?;
        let probe = |step, how, program, ifindex, frame, action| Probe {
            step,
            how,
            program,
            ifindex,
            frame,
            action,
            counted: None,
            rewrites: false,
            unlearned: None,
            no_backend: false,
            base: None,
        };
        let chain = vec![
            probe(
                "the kernel's loop around each run, empty program",
                "pass-through program `lb_pass`, forward frame",
                Program::Pass,
                cif,
                forward.to_vec(),
                XDP_PASS,
            ),
            Probe {
                unlearned: Some(PROBE_CLIENT),
                ..probe(
                    "`IFACES` array lookup (not a NIC of ours), return",
                    "UDP to the service on `lo`, a NIC the agent did not configure",
                    Program::Fixed,
                    LOOPBACK_IFINDEX,
                    to_vip.clone(),
                    XDP_PASS,
                )
            },
            Probe {
                counted: Some((cslot, XDP_PASS)),
                unlearned: Some(PROBE_CLIENT),
                ..probe(
                    "`IFACES` hit (value copied), Ethernet parse, `ACTIONS` per-CPU counter",
                    "ether type 0x86dd (IPv6) on the client NIC",
                    Program::Fixed,
                    cif,
                    with_ether_type(&to_other, 0x86dd),
                    XDP_PASS,
                )
            },
            Probe {
                counted: Some((cslot, XDP_PASS)),
                unlearned: Some(PROBE_CLIENT),
                ..probe(
                    "IPv4 checks (IHL, fragment, length), header checksum verification, \
                     transport header; `VIP_BITS` array lookup (clear), `REPLIES` LRU lookup \
                     (a miss)",
                    "UDP to a non-VIP address on the client NIC",
                    Program::Fixed,
                    cif,
                    to_other,
                    XDP_PASS,
                )
            },
            Probe {
                counted: Some((cslot, XDP_DROP)),
                no_backend: true,
                ..probe(
                    "`VIP_BITS` set, `FLOWS` LRU hit instead of the `REPLIES` miss, coarse \
                     clock, idle check (timeouts are read only after a second idle), client \
                     MAC and NIC check, `ACTIVE` array lookup",
                    "the established flow's next packet, its service's `ACTIVE` entry set to \
                     `NO_BACKEND`",
                    Program::Fixed,
                    cif,
                    forward.to_vec(),
                    XDP_DROP,
                )
            },
            Probe {
                counted: Some((cslot, XDP_REDIRECT)),
                rewrites: true,
                ..probe(
                    "`BACKENDS` array lookup, MAC and IPv4 rewrite, IPv4 header checksum \
                     and UDP checksum updated, `TRAFFIC` per-CPU counter, `TX_PORTS` devmap \
                     redirect: the full established-flow forward path",
                    "the established flow's next packet (fixed-point plan) on the client NIC",
                    Program::Fixed,
                    cif,
                    forward.to_vec(),
                    XDP_REDIRECT,
                )
            },
        ];
        let side = vec![Probe {
            counted: Some((cslot, XDP_PASS)),
            unlearned: Some(PROBE_CLIENT),
            base: Some(3),
            ..probe(
                "`VIP_BITS` set, `FLOWS` miss and `VIPS` hit instead of the `REPLIES` miss, \
                 the source checks (`VIPS`, `LOCAL_ADDRS` misses), 3 `SERVICES` hash \
                 lookups, all misses",
                "UDP from a new client to a port of the VIP no service listens on",
                Program::Fixed,
                cif,
                no_service,
                XDP_PASS,
            )
        }];
        Ok((chain, side))
    }

    /// All `ACTIONS` counters of both NICs, and the master's forward rewrites.
    fn counters(&self) -> Result<(Vec<u64>, u64)> {
        let mut actions = Vec::new();
        for slot in [self.client_slot, self.backend_slot] {
            actions.extend(self.fixed_maps.actions_of(slot)?);
        }
        let rewrites = Self::rewrites(&self.fixed_maps, self.master_index, Direction::Forward)?;
        Ok((actions, rewrites))
    }

    /// Runs one stop point once with the large repeat count, checks where it stopped:
    /// (kernel ns per run, wall-clock ns per run, evidence).
    fn run_probe(&mut self, probe: &Probe, repeat: u32) -> Result<(f64, f64, String)> {
        if probe.no_backend {
            self.fixed_maps.set_active(self.service_id, NO_BACKEND)?;
        }
        let (before, rewrites_before) = self.counters()?;
        let started = Instant::now();
        let result = match probe.program {
            Program::Pass => testrun::run(self.pass()?, probe.ifindex, &probe.frame, repeat),
            Program::Fixed => {
                testrun::run(self.fixed.program()?, probe.ifindex, &probe.frame, repeat)
            }
        };
        let wall = started.elapsed().as_nanos() as f64 / f64::from(repeat);
        if probe.no_backend {
            self.fixed_maps
                .set_active(self.service_id, self.master_index)?;
        }
        let (action, ns, out) = result?;
        let (after, rewrites_after) = self.counters()?;
        let fail = |what: String| anyhow!("stop point \"{}\": {what}", probe.how);
        if action != probe.action {
            return Err(fail(format!(
                "action {}, expected {}",
                action_name(action),
                action_name(probe.action)
            )));
        }
        let mut evidence = Vec::new();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let slot = if i < XDP_ACTIONS as usize {
                self.client_slot
            } else {
                self.backend_slot
            };
            let act = (i % XDP_ACTIONS as usize) as u32;
            let expected = match probe.counted {
                Some(c) if c == (slot, act) => u64::from(repeat),
                _ => 0,
            };
            if a - b != expected {
                return Err(fail(format!(
                    "ACTIONS[{} NIC, {}] counted {}, expected {expected}",
                    if slot == self.client_slot {
                        "client"
                    } else {
                        "backend"
                    },
                    action_name(act),
                    a - b
                )));
            }
        }
        match probe.counted {
            Some((slot, act)) => evidence.push(format!(
                "`ACTIONS` {} NIC {} +{repeat}, other actions +0",
                if slot == self.client_slot {
                    "client"
                } else {
                    "backend"
                },
                action_name(act)
            )),
            None if matches!(probe.program, Program::Fixed) => {
                evidence.push("`ACTIONS` +0 (returned before counting)".into());
            }
            None => {}
        }
        let rewrites = rewrites_after - rewrites_before;
        let expected = if probe.rewrites { u64::from(repeat) } else { 0 };
        if rewrites != expected {
            return Err(fail(format!(
                "{rewrites} forward rewrites counted, expected {expected}"
            )));
        }
        if matches!(probe.program, Program::Fixed) {
            evidence.push(format!("`TRAFFIC` forward +{rewrites}"));
        }
        if !probe.rewrites {
            if out != probe.frame {
                return Err(fail("the frame came out changed".into()));
            }
            evidence.push("frame unchanged".into());
        }
        if let Some(ip) = probe.unlearned {
            let flows = self.fixed_maps.read_flows(usize::MAX);
            if flows.iter().any(|f| f.key.src == ip.octets()) {
                return Err(fail(format!("a flow of {ip} was created")));
            }
            evidence.push(format!("no flow of {ip} in `FLOWS`"));
        }
        Ok((ns, wall, evidence.join(", ")))
    }

    /// Every stop point, `options.trials` times in turn, with `options.repeat` runs a call.
    fn breakdown(&mut self, options: Options, forward: &[u8]) -> Result<Breakdown> {
        let started = Instant::now();
        let (chain, side) = self.probes(options.frame_len, forward)?;
        let probes: Vec<Probe> = chain.into_iter().chain(side).collect();
        let mut ns = vec![Vec::new(); probes.len()];
        let mut wall = vec![Vec::new(); probes.len()];
        let mut evidence = vec![String::new(); probes.len()];
        for _ in 0..options.trials {
            for (i, probe) in probes.iter().enumerate() {
                interrupt::check()?;
                let (n, w, e) = self.run_probe(probe, options.repeat)?;
                ns[i].push(n);
                wall[i].push(w);
                evidence[i] = e;
            }
        }
        let mut stops: Vec<Stop> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| Stop {
                step: p.step,
                how: p.how,
                action: match p.action {
                    XDP_DROP => "XDP_DROP",
                    XDP_PASS => "XDP_PASS",
                    XDP_TX => "XDP_TX",
                    XDP_REDIRECT => "XDP_REDIRECT",
                    _ => "?",
                },
                evidence: evidence[i].clone(),
                base: p.base.or(i.checked_sub(1)),
                ns: Summary::of(&ns[i]),
                wall: Summary::of(&wall[i]),
            })
            .collect();
        let side = stops.split_off(stops.len() - 1);
        Ok(Breakdown {
            chain: stops,
            side,
            repeat: options.repeat,
            trials: options.trials,
            secs: started.elapsed().as_secs_f64(),
        })
    }
}

fn mean(s: Option<Summary>) -> f64 {
    s.map_or(f64::NAN, |s| s.mean)
}

fn range(s: Option<Summary>, d: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.d$} ({:.d$}–{:.d$})", s.mean, s.min, s.max),
        Some(s) => format!("{:.d$}", s.mean),
        None => "–".into(),
    }
}

impl Breakdown {
    /// Mean ns per run of chain point `i` net of the empty program (point 0).
    fn net(&self, i: usize) -> f64 {
        mean(self.chain[i].ns) - mean(self.chain[0].ns)
    }

    /// The chain's increments (kernel ns): step `i` = point `i` − point `i − 1`.
    fn increments(&self) -> Vec<f64> {
        (1..self.chain.len())
            .map(|i| mean(self.chain[i].ns) - mean(self.chain[i - 1].ns))
            .collect()
    }

    /// The Markdown subsection of the report: tables and the reading of them against
    /// `target_ns` (the forward path's target, ns per packet as the kernel reports it).
    pub fn render(&self, target_ns: f64) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "#### Where the forward path's time goes (stop points)\n\n\
             No hardware counters on this machine, so the profile is measured: the same \
             program (the fixed-point copy above) run with BPF_PROG_TEST_RUN, repeat {}, on \
             frames and map states that make it stop at successive steps of the forward path; \
             each point's cost minus the previous one is the cost of the step in between. \
             {} trials, each running every point once in the order below; mean (min–max) of \
             the kernel's per-run figure (whole ns), with the wall-clock time of the call \
             divided by the repeat count as a finer cross-check. Every call is checked: the \
             returned action, the per-CPU `ACTIONS` counters of both NICs (only the expected \
             one moves, by exactly the repeat count, or none for a return before counting), \
             the master's `TRAFFIC` forward counter, the frame as the last run left it, and \
             that the probe frames' source ({PROBE_CLIENT}) never gets a flow in `FLOWS`. \
             The breakdown took {:.1} s.\n",
            self.repeat, self.trials, self.secs
        );
        let _ = writeln!(
            t,
            "| # | step: what the program does beyond the previous point | stop point (frame, maps) | action | counters per call | ns per run | cumulative, net of the empty program | increment | increment, wall clock |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
        for (i, stop) in self.chain.iter().enumerate() {
            let (net, inc, winc) = if i == 0 {
                ("0".to_string(), "–".to_string(), "–".to_string())
            } else {
                (
                    format!("{:.0}", self.net(i)),
                    format!("{:+.0}", mean(stop.ns) - mean(self.chain[i - 1].ns)),
                    format!("{:+.1}", mean(stop.wall) - mean(self.chain[i - 1].wall)),
                )
            };
            let _ = writeln!(
                t,
                "| {i} | {} | {} | {} | {} | {} | {net} | {inc} | {winc} |",
                stop.step,
                stop.how,
                stop.action,
                stop.evidence,
                range(stop.ns, 0),
            );
        }
        let _ = writeln!(
            t,
            "\nOff the forward path, compared with the point of the table above it names:\n"
        );
        let _ = writeln!(
            t,
            "| step | stop point (frame, maps) | action | counters per call | ns per run | compared with | increment | increment, wall clock |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
        for stop in &self.side {
            let base = stop.base.unwrap_or(0);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | #{base} | {:+.0} | {:+.1} |",
                stop.step,
                stop.how,
                stop.action,
                stop.evidence,
                range(stop.ns, 0),
                mean(stop.ns) - mean(self.chain[base].ns),
                mean(stop.wall) - mean(self.chain[base].wall),
            );
        }
        t.push('\n');
        t.push_str(&self.reading(target_ns));
        t
    }

    /// A few sentences on what dominates and what reaching the target would take.
    fn reading(&self, target_ns: f64) -> String {
        let n = self.chain.len();
        if n < 6 || self.side.is_empty() {
            return String::new();
        }
        let base = mean(self.chain[0].ns);
        let total = self.net(n - 1);
        let inc = self.increments();
        let share = |x: f64| x / total * 100.0;
        let before_parse = self.net(2);
        let (decided, flow, rewrite) = (inc[2], inc[3], inc[4]);
        let new_flow_extra =
            mean(self.side[0].ns) - mean(self.chain[self.side[0].base.unwrap_or(3)].ns);
        let reported_total = mean(self.chain[n - 1].ns);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "Reading: the established-flow forward path costs {total:.0} ns net of the \
             kernel's loop ({base:.0} ns), {reported_total:.0} ns as the kernel reports it. \
             Before the program looks at the IPv4 header it has spent {before_parse:.0} ns \
             ({:.0} %: `IFACES`, now an array, Ethernet, the action counter, #1–#2); checking \
             the IPv4 packet completely, with the lookups a frame that is not VIP traffic \
             takes (`VIP_BITS`, an array, and a `REPLIES` miss), costs {decided:.0} ns (#3); \
             an established flow replaces the miss with a `FLOWS` hit and its checks (clock, \
             idle timeout, client MAC and NIC, `ACTIVE`) for {flow:+.0} ns more (#4); \
             the backend, the rewrite with both checksums, the traffic counter and the \
             redirect take {rewrite:.0} ns ({:.0} %, #5). A new flow's extra work before its \
             service is known (a `FLOWS` miss, the `VIPS` hit, the source checks against \
             `VIPS` and `LOCAL_ADDRS`, three `SERVICES` lookups) costs {new_flow_extra:+.0} ns \
             beside #3 (side point); creating it adds the reverse-path FIB lookup, the reply \
             key check and the two inserts (`FLOWS`, `REPLIES`) that the \"new flow\" row \
             above includes.\n",
            share(before_parse),
            share(rewrite),
        );
        let _ = writeln!(
            t,
            "Against the targets: the established-flow forward path is at \
             {reported_total:.0} ns as the kernel reports it (target ≤ 100 ns: {}), and \
             {total:.0} ns net of the empty program (target < {target_ns:.0} ns: {}). \
             Katran's whole program costs about 100–120 ns per packet in its own tester \
             (baselines.md), with a per-CPU connection LRU lookup per packet as here.\n",
            if reported_total <= 100.0 {
                "met"
            } else {
                "missed"
            },
            if total < target_ns { "met" } else { "missed" },
        );
        let gap = self
            .chain
            .iter()
            .skip(1)
            .enumerate()
            .map(|(i, s)| {
                ((mean(s.ns) - mean(self.chain[i].ns)) - (mean(s.wall) - mean(self.chain[i].wall)))
                    .abs()
            })
            .fold(0.0, f64::max);
        let _ = writeln!(
            t,
            "The kernel's and the wall-clock increments differ by up to {gap:.1} ns: read \
             each increment as ± that much (the machine is shared, 2 cores).\n"
        );
        t
    }
}

/// Measures the program inside a namespace of its own (`lbt-cost`, one veth pair), removed
/// afterwards.
pub fn measure(options: Options) -> Result<Costs> {
    let ns = namespace("lbt-cost")?;
    ns.enter(move || -> Result<Costs> { Rig::new()?.measure(options) })?
}
