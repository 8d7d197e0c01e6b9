//! The failover section of the report: per experiment, the server's and the client's view
//! of every system, UDP loss, the TCP experiment and the control plane's restarts; `lb`'s
//! flip latency and its targets are in [`targets`].

mod targets;

use std::fmt::Write as _;

use lb_user::testbed::topology::VIP;

use super::{
    super::{
        report::{self, summary_row},
        stats::Summary,
    },
    restart, tcp,
    trial::Trial,
    Args, SystemResults, BEFORE_FAULT, LOSS_DATAGRAM,
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
    let setups: Vec<String> = args.lb.iter().map(ToString::to_string).collect();
    if args.skip_lb {
        command += " --skip-lb";
    } else {
        let _ = write!(command, " --lb {}", setups.join(","));
    }
    if args.skip_keepalived {
        command += " --skip-keepalived";
    }
    let _ = write!(text, "{}", report::machine(&command));
    let _ = writeln!(
        text,
        "\nTopology: client, switch, master and slave, each a network namespace, joined by \
         veth pairs (the study's topology; VIP {VIP}). For `lb` the switch runs the XDP \
         program and the agent, which checks the master's link (netlink carrier events) and \
         its server with a UDP request every 1 ms (fall 3, rise 3), each with the time to \
         answer that the system's name gives: 10 ms is the bench's default, 1 ms the setting \
         for the detection targets; `prober SCHED_FIFO N` in the name: its prober thread runs \
         under `SCHED_FIFO` at priority N (`[prober] realtime_priority`); `prober nice N`: \
         an ordinary thread at niceness N (`[prober] nice`); otherwise an ordinary thread \
         like the rest of the agent. For keepalived the switch is a Linux bridge and keepalived on \
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
            "Server view (first answer of the new backend after the fault − last answer of \
             the old one to a request sent before it; negative: both answered for a moment, no \
             gap), in milliseconds. Reference study: \
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
    targets::render_flips(&mut text, results);
    targets::render_targets(&mut text, results);
    if let Some(lb) = results.iter().find(|s| s.tuning.is_some()) {
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
         longest time without an answer (ms) and requests lost, per trial. Over all trials: \
         the requests lost, those of them a server logged (answered, the answer not \
         received; no server logged the rest), and the datagrams of any kind (requests, \
         answers, health probes) that the bench's own sockets, the client's and the \
         servers' on the same two cores, dropped for a full receive buffer.\n",
        before = BEFORE_FAULT.as_millis(),
        dead = restart::DEAD_FOR.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "| system | stopped | how | gap p50 | gap max | lost p50 | lost max | lost in all \
         | of them answered | endpoint socket drops | sent per trial | trials |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
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
                "| {} | {} | {how} | {:.3} | {:.3} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                system.label,
                system.control_plane,
                g.p50 * 1e3,
                g.max * 1e3,
                l.p50,
                l.max,
                trials.iter().map(|t| t.lost).sum::<u64>(),
                trials.iter().map(|t| t.lost_after_server).sum::<u64>(),
                trials.iter().map(|t| t.socket_drops).sum::<u64>(),
                trials.first().map_or(0, |t| t.sent),
                trials.len()
            );
        }
    }
}
