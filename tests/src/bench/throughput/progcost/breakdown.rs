//! The [`Breakdown`]: the forward path's cost split into its steps by stop points, each
//! a frame and map state that make the program stop at a given step, checked on every
//! call by the action it returns and the counters it moves.

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use anyhow::{anyhow, Result};
use lb_common::{Direction, NO_BACKEND, XDP_ACTIONS};

use super::*;

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

impl Rig {
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
    pub(super) fn breakdown(&mut self, options: Options, forward: &[u8]) -> Result<Breakdown> {
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
