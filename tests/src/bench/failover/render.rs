//! The failover section of the report: per experiment, the server's and the client's view
//! of every system, UDP loss, the TCP experiment, the control plane's restarts, `lb`'s flip
//! latency and its targets.

use std::fmt::Write as _;

use lb_user::testbed::topology::VIP;

use super::{
    super::{
        report::{self, summary_row},
        stats::Summary,
    },
    flip_load, restart,
    rig::CHECK_TIMEOUT_MS,
    tcp, Args, SystemResults, Trial, BEFORE_FAULT, LOSS_DATAGRAM,
};

/// Picks one experiment's trials out of a system's results.
type TrialsOf = fn(&SystemResults) -> &Vec<Trial>;

/// The section's Markdown.
pub fn render(args: &Args, results: &[SystemResults]) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "## Failover\n");
    let mut command = format!(
        "cargo xtask bench failover -- --trials {} --rate {} --loss-seconds {} --loss-mbit {}",
        args.trials, args.rate, args.loss_seconds, args.loss_mbit
    );
    if args.lb_timeout_ms != CHECK_TIMEOUT_MS {
        let _ = write!(command, " --lb-timeout-ms {}", args.lb_timeout_ms);
    }
    let scheduling = match args.lb_realtime_priority {
        Some(priority) => {
            let _ = write!(command, " --lb-realtime-priority {priority}");
            format!(
                "; its prober thread runs under `SCHED_FIFO` at priority {priority} \
                 (`[prober] realtime_priority`)"
            )
        }
        None => "; its prober thread is an ordinary one (no `[prober]` table)".into(),
    };
    let _ = write!(text, "{}", report::machine(&command));
    let _ = writeln!(
        text,
        "\nTopology: client, switch, master and slave, each a network namespace, joined by \
         veth pairs (the study's topology; VIP {VIP}). For `lb` the switch runs the XDP \
         program and the agent, which checks the master's link (netlink carrier events) and \
         its server with a UDP request every 1 ms, each with {timeout} ms to answer \
         (fall 3, rise 3){scheduling}. For keepalived the switch is a Linux bridge and keepalived on \
         master and slave moves the VIP; the master's \
         keepalived checks its server process with a `vrrp_script` (`pgrep`) every second, \
         keepalived's shortest script interval, fall 1, so a killed server makes it give up \
         the VIP within a second (`vrrp_track_process`, which would be event-driven, needs \
         the kernel's process connector, which only the initial network namespace has).\n\n\
         Requests: the client sends UDP requests to the VIP at {} per second; the servers \
         (one process per backend) answer each and log its time. Faults: the master's switch \
         port turned off (link down) and on again (failback); the master's server killed \
         with SIGKILL (link up; the master's kernel refuses requests to the closed port); the \
         master host silent (every frame to and from its NIC dropped by an nftables netdev \
         chain, as for a hung machine or one behind a failed switch; its carrier stays up, \
         and its VRRP adverts stop); the master's server frozen with SIGSTOP (link up, its \
         socket open: nothing answers and nothing is refused). keepalived's `pgrep` check \
         still finds a frozen server, so keepalived does not move the VIP for it.\n",
        args.rate,
        timeout = args.lb_timeout_ms,
    );
    let experiments: [(&str, &str, TrialsOf); 5] = [
        (
            "Downtime, master link down",
            "0.826 s (0.50 – 1.06)",
            |s| &s.link_down,
        ),
        ("Downtime, master server process killed", "–", |s| {
            &s.killed
        }),
        ("Downtime, master host silent, link up", "–", |s| {
            &s.silent
        }),
        ("Downtime, master server frozen (SIGSTOP)", "–", |s| {
            &s.frozen
        }),
        (
            "Failback, master link back up",
            "0.865 s (0.55 – 1.12)",
            |s| &s.failback,
        ),
    ];
    for (title, study, trials) in experiments {
        let _ = writeln!(text, "\n### {title}\n");
        let _ = writeln!(
            text,
            "Server view (first answer of the new backend − last answer of the old one; \
             negative: both answered for a moment, no gap), in milliseconds. Reference study: \
             {study}. *Incomplete*: trials in which the new backend answered nothing within \
             the stream; they are left out of the figures and count as a missed target.\n"
        );
        let _ = writeln!(
            text,
            "| system | mean | min | max | p50 | p99 | trials | incomplete |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|---|---|---|");
        for system in results {
            let all = trials(system);
            let gaps: Vec<f64> = all.iter().filter_map(|t| t.server_gap).collect();
            let _ = writeln!(
                text,
                "{} {} |",
                summary_row(&system.label, Summary::of(&gaps), 1e3, 3),
                all.len() - gaps.len()
            );
        }
        let _ = writeln!(
            text,
            "\nClient view, per trial: longest time without an answer while requests were \
             sent (ms), requests lost, and how well the client kept its schedule (slowest \
             achieved rate, longest pause between two sends; a pause longer than the gap \
             would mean the client, not the system, set the gap).\n"
        );
        let _ = writeln!(
            text,
            "| system | gap p50 | gap max | lost p50 | lost max | sent per trial | \
             send errors | slowest rate /s | longest send pause (ms) |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|---|---|---|---|");
        for system in results {
            let trials = trials(system);
            let gaps: Vec<f64> = trials.iter().map(|t| t.client_gap).collect();
            let lost: Vec<f64> = trials.iter().map(|t| t.lost as f64).collect();
            let (Some(g), Some(l)) = (Summary::of(&gaps), Summary::of(&lost)) else {
                continue;
            };
            let slowest = trials
                .iter()
                .map(|t| t.achieved_rate)
                .fold(f64::INFINITY, f64::min);
            let pause = trials
                .iter()
                .map(|t| t.largest_send_gap)
                .fold(0.0, f64::max);
            let _ = writeln!(
                text,
                "| {} | {:.3} | {:.3} | {:.0} | {:.0} | {} | {} | {:.0} | {:.3} |",
                system.label,
                g.p50 * 1e3,
                g.max * 1e3,
                l.p50,
                l.max,
                trials.first().map_or(0, |t| t.sent),
                trials.iter().map(|t| t.send_errors).sum::<u64>(),
                slowest,
                pause * 1e3
            );
        }
    }
    let pps = (args.loss_mbit * 1e6 / (LOSS_DATAGRAM as f64 * 8.0)).round();
    let _ = writeln!(text, "\n### UDP loss\n");
    let _ = writeln!(
        text,
        "{} s at {} Mbit/s ({pps} datagrams of {LOSS_DATAGRAM} bytes per second), in percent. \
         Without a failover: iperf3 `-u` through the VIP, loss as iperf3 reports it. With one \
         failover (master link down in the middle): a sequence-numbered stream of the same \
         size and rate, loss = datagrams neither server received; iperf3 cannot measure this \
         run, because its TCP control connection belongs to the master's iperf3 server and \
         does not survive the move. Reference study: 0 % without, 5.6 % (4.0 – 6.8) with one \
         failover.\n",
        args.loss_seconds, args.loss_mbit
    );
    let _ = writeln!(
        text,
        "| system | run | mean | min | max | p50 | p99 | trials |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|---|---|");
    for system in results {
        for (run, values) in [
            ("iperf3, no failover", &system.iperf_loss),
            ("stream, one failover", &system.stream_loss),
        ] {
            let row = summary_row(
                &format!("{} | {run}", system.label),
                Summary::of(values),
                1.0,
                4,
            );
            let _ = writeln!(text, "{row}");
        }
    }
    render_tcp(&mut text, results);
    render_restarts(&mut text, results);
    if let Some(lb) = results.iter().find(|s| s.label.starts_with("lb")) {
        let _ = writeln!(text, "\n### Flip latency of `lb`\n");
        let _ = writeln!(
            text,
            "Deciding event (carrier loss, last failed or passed check) → map write done, as the \
             agent measured and logged it for every move of the `requests` service between \
             master and slave in this run, in microseconds. With 10 trials or fewer per \
             experiment, p99 in the tables above is the largest trial.\n"
        );
        let _ = writeln!(
            text,
            "Under load: the agent reloaded with {} more services (link and ICMP checks of both \
             backends every {}, on the same prober thread) while a client scrapes `/metrics` \
             every {} ms, and the master's server frozen and thawed {} times.\n",
            flip_load::EXTRA_SERVICES,
            flip_load::EXTRA_INTERVAL,
            flip_load::SCRAPE_EVERY.as_millis(),
            super::FLIP_CYCLES
        );
        let _ = writeln!(text, "| flips | n | mean | min | max | p50 | p99 |");
        let _ = writeln!(text, "|---|---|---|---|---|---|---|");
        for (what, flips) in [
            ("during the experiments above", &lb.flips_us),
            ("under load", &lb.flips_loaded_us),
        ] {
            if let Some(s) = Summary::of(flips) {
                let _ = writeln!(
                    text,
                    "| {what} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    s.n, s.mean, s.min, s.max, s.p50, s.p99
                );
            }
        }
        render_targets(&mut text, lb, args.lb_timeout_ms);
        let _ = writeln!(
            text,
            "\nAt {} requests per second the server view resolves {:.0} µs.",
            lb.rate,
            1e6 / lb.rate as f64
        );
    }
    let _ = writeln!(
        text,
        "\nThe client's view of the first link-down failover of each system (answers per \
         millisecond, per backend, around the fault): {}.",
        results
            .iter()
            .map(|s| format!("`{}`", s.picture))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for system in results {
        let _ = writeln!(
            text,
            "\n![client view: {}]({})",
            system.label, system.picture
        );
    }
    text
}

/// The TCP experiment's table: connections that survived, per system.
fn render_tcp(text: &mut String, results: &[SystemResults]) {
    let _ = writeln!(text, "\n### TCP connections across failover and failback\n");
    let _ = writeln!(
        text,
        "Per trial: {n} TCP connections opened through the VIP, each holding a conversation \
         with its server (one line asked, one answered, now and then); the master's switch \
         port goes down; once new connections reach the slave, each old one is asked again \
         (survived the failover?); {n} more are opened during the outage; the port comes \
         back; once new connections reach the master again, each of those is asked (survived \
         the failback?). A connection survives when it answers within a second. Mean (min–max) \
         over the trials, out of {n}. No system can keep a connection whose server went away \
         (the slave has no state of the master's connections); what `lb` keeps is the \
         connections made during the outage, which graceful failback leaves on the slave \
         while new connections go to the master. keepalived moves the VIP back, so the \
         master answers them with RST.\n",
        n = tcp::CONNECTIONS
    );
    let _ = writeln!(
        text,
        "| system | survived the failover | survived the failback | trials |\n|---|---|---|---|"
    );
    for system in results {
        let cell = |values: Vec<f64>| match Summary::of(&values) {
            Some(s) => format!("{:.1} ({:.0}–{:.0})", s.mean, s.min, s.max),
            None => "–".into(),
        };
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} |",
            system.label,
            cell(
                system
                    .tcp
                    .iter()
                    .map(|t| t.survived_failover as f64)
                    .collect()
            ),
            cell(
                system
                    .tcp
                    .iter()
                    .map(|t| t.survived_failback as f64)
                    .collect()
            ),
            system.tcp.len()
        );
    }
}

/// The restart experiments' table: what the client lost while the control plane was
/// stopped and started again.
fn render_restarts(text: &mut String, results: &[SystemResults]) {
    let _ = writeln!(text, "\n### Control plane stopped and started under load\n");
    let _ = writeln!(
        text,
        "Per trial: a request stream as above; {before} ms into it the control plane is \
         stopped, with SIGTERM and started again at once, or with SIGKILL and started again \
         after {dead} s; the stream runs on until the system has settled. For `lb` that is \
         the agent: its XDP program, links and maps are pinned, so the dataplane forwards on \
         without it and the started agent adopts them. For keepalived it is the master's \
         keepalived (on SIGKILL its VRRP child too, as in a crash of the daemon): the slave \
         takes the VIP over, and the master takes it back when it runs again. Client view: \
         longest time without an answer (ms) and requests lost, per trial.\n",
        before = BEFORE_FAULT.as_millis(),
        dead = restart::DEAD_FOR.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "| system | stopped | how | gap p50 | gap max | lost p50 | lost max | sent per trial \
         | trials |\n|---|---|---|---|---|---|---|---|---|"
    );
    for system in results {
        for (how, trials) in &system.restarts {
            let gaps: Vec<f64> = trials.iter().map(|t| t.client_gap).collect();
            let lost: Vec<f64> = trials.iter().map(|t| t.lost as f64).collect();
            let (Some(g), Some(l)) = (Summary::of(&gaps), Summary::of(&lost)) else {
                continue;
            };
            let _ = writeln!(
                text,
                "| {} | {} | {how} | {:.3} | {:.3} | {:.0} | {:.0} | {} | {} |",
                system.label,
                system.control_plane,
                g.p50 * 1e3,
                g.max * 1e3,
                l.p50,
                l.max,
                trials.first().map_or(0, |t| t.sent),
                trials.len()
            );
        }
    }
}

/// What delays a flip.
const FLIP_DELAY: &str = "The flip is one map update syscall, made on the prober thread \
    that saw the evidence; a slow one is that thread being descheduled or busy with other \
    checks between the evidence and the write, which the machine's load (client, servers \
    and agent on 2 cores) explains. `[prober] realtime_priority` takes the thread out of \
    the scheduler's competition.";

/// What bounds the detection of a silent master.
fn silent_floor(timeout_ms: u64) -> String {
    format!(
        "A silent master is seen only by missed deadlines: an attempt is sent every 1 ms, \
         each with {t} ms to answer, and the third consecutive miss moves the traffic, {lo} \
         to {hi} ms after the silence began (the last attempt sent before it may miss too). \
         A timeout of 1 ms would give 3 to 4 ms, but the master's server answers the \
         client's requests on the same socket, and under this load on 2 cores a healthy \
         answer sometimes takes milliseconds: runs with 1 and 2 ms timeouts moved the \
         traffic without cause (88 and 130 flips in 2 trials, where about 24 are caused). \
         Anything beyond the window is the prober thread woken late, which the flip latency \
         table and the load of the machine (client, servers and agent on 2 cores) show.",
        t = timeout_ms,
        lo = 2 + timeout_ms,
        hi = 3 + timeout_ms
    )
}

/// One target of the issue: its name, the measured value (`None`: not measured, or a trial
/// did not complete), whether it is met, and what explains a miss.
struct Target {
    name: &'static str,
    measured: Option<f64>,
    unit: &'static str,
    met: fn(f64) -> bool,
    when_missed: String,
}

/// The targets table for `lb`, with an explanation under every missed target.
fn render_targets(text: &mut String, lb: &SystemResults, timeout_ms: u64) {
    let gaps = |trials: &[Trial]| -> Option<Summary> {
        // A trial that did not complete makes the figure unmeasured, so the target is missed.
        let gaps: Option<Vec<f64>> = trials.iter().map(|t| t.server_gap).collect();
        Summary::of(&gaps?)
    };
    let targets = [
        Target {
            name: "downtime, link down, p50 < 1 ms",
            measured: gaps(&lb.link_down).map(|s| s.p50 * 1e3),
            unit: "ms",
            met: |v| v < 1.0,
            when_missed: link_down_profile(lb),
        },
        Target {
            name: "downtime, link down, p99 < 2 ms",
            measured: gaps(&lb.link_down).map(|s| s.p99 * 1e3),
            unit: "ms",
            met: |v| v < 2.0,
            when_missed: link_down_profile(lb),
        },
        Target {
            name: "downtime, server killed, p50 < 5 ms",
            measured: gaps(&lb.killed).map(|s| s.p50 * 1e3),
            unit: "ms",
            met: |v| v < 5.0,
            when_missed: format!(
                "A killed server is seen by the UDP check: each probe after the \
                kill is refused by the master's ICMP port unreachable, and `fall = 3` such \
                probes at a 1 ms interval move the traffic, so the floor is about 3 ms. The \
                master's kernel rate-limits ICMP errors (`net.ipv4.icmp_msgs_per_sec`, 1000 \
                per second for the whole namespace), and the client's requests to the dead \
                port use that budget up: a probe whose refusal was not sent fails at its \
                deadline instead, {timeout_ms} ms after it was sent."
            ),
        },
        Target {
            name: "downtime, master host silent, p50 < 4 ms",
            measured: gaps(&lb.silent).map(|s| s.p50 * 1e3),
            unit: "ms",
            met: |v| v < 4.0,
            when_missed: silent_floor(timeout_ms),
        },
        Target {
            name: "downtime, master host silent, p99 < 5 ms",
            measured: gaps(&lb.silent).map(|s| s.p99 * 1e3),
            unit: "ms",
            met: |v| v < 5.0,
            when_missed: silent_floor(timeout_ms),
        },
        Target {
            name: "failback without a lost request (most lost in a trial)",
            measured: gaps(&lb.failback)
                .and(lb.failback.iter().map(|t| t.lost as f64).reduce(f64::max)),
            unit: "requests",
            met: |v| v == 0.0,
            when_missed: "Requests in flight to the slave when the map entry flips back are \
                still answered by the slave, so a lost request means the master was chosen \
                before it could answer, which the `cause` of that flip in the agent's log \
                shows. An incomplete trial means the master answered nothing within the \
                stream (1.5 s after the port came back up): the agent fails back only once \
                the kernel has announced the carrier and the checks passed `rise` times, and \
                the agent's log shows when that was."
                .into(),
        },
        Target {
            name: "UDP loss with one failover < 0.05 % (worst trial)",
            measured: lb.stream_loss.iter().copied().reduce(f64::max),
            unit: "%",
            met: |v| v < 0.05,
            when_missed: "The loss is the datagrams sent between the carrier loss and the map \
                write, plus any the veth queues dropped under the client's burst; compare \
                with the link-down downtime above, which bounds the first part."
                .into(),
        },
        Target {
            name: "flip latency p99 < 100 µs",
            measured: Summary::of(&lb.flips_us).map(|s| s.p99),
            unit: "µs",
            met: |v| v < 100.0,
            when_missed: FLIP_DELAY.into(),
        },
        Target {
            name: "flip latency p99 < 100 µs under load",
            measured: Summary::of(&lb.flips_loaded_us).map(|s| s.p99),
            unit: "µs",
            met: |v| v < 100.0,
            when_missed: FLIP_DELAY.into(),
        },
    ];
    let _ = writeln!(text, "\n### Targets (`lb`)\n");
    let _ = writeln!(text, "| target | measured | met |");
    let _ = writeln!(text, "|---|---|---|");
    let mut missed = Vec::new();
    for target in &targets {
        let (shown, met) = match target.measured {
            Some(v) => (format!("{v:.3} {}", target.unit), (target.met)(v)),
            None => ("not measured (a trial did not complete)".into(), false),
        };
        let _ = writeln!(
            text,
            "| {} | {shown} | {} |",
            target.name,
            if met { "yes" } else { "**no**" }
        );
        if !met {
            missed.push(target);
        }
    }
    for target in missed {
        let _ = writeln!(
            text,
            "\n**Missed: {}.** {}",
            target.name, target.when_missed
        );
    }
}

/// What the link-down downtime is made of, from this run's own figures, for a missed target.
fn link_down_profile(lb: &SystemResults) -> String {
    let slowest = lb
        .link_down
        .iter()
        .filter_map(|t| t.server_gap)
        .fold(0.0, f64::max);
    let flip = lb.flips_us.iter().copied().fold(0.0, f64::max);
    let pause = lb
        .link_down
        .iter()
        .map(|t| t.largest_send_gap)
        .fold(0.0, f64::max);
    format!(
        "The link-down downtime is: the kernel taking the port down and sending the carrier \
         event, the agent's flip (event → map write, at most {flip:.0} µs in this run, see \
         the flip latency), and the slave's first answer after it (at most one request \
         interval, {:.0} µs). So nearly all of the slowest trial's {:.3} ms lies before the \
         agent got the event: in the kernel's interface shutdown, which waits for RCU grace \
         periods before it announces the change, and in scheduling on a machine whose 2 \
         cores also run the client and both servers. The same stalls show on the client: \
         during the link-down trials its sending thread paused for up to {:.3} ms (client \
         view above).",
        1e6 / lb.rate as f64,
        slowest * 1e3,
        pause * 1e3
    )
}
