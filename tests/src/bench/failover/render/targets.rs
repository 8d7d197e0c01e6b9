//! `lb`'s part of the failover section: the flip latency of every `lb` setup, with the flips
//! no fault called for, and the targets, one column per setup, each miss explained
//! from the run's own figures.

use std::fmt::Write as _;

use super::super::{
    super::stats::Summary, flip_load, rig::Flip, tuning::Prober, SystemResults, Trial, FLIP_CYCLES,
};

/// The `lb` systems of the run.
fn lb_systems(results: &[SystemResults]) -> Vec<&SystemResults> {
    results.iter().filter(|s| s.tuning.is_some()).collect()
}

/// The flip latency table: every `lb` setup, during the experiments and under load.
pub fn render_flips(text: &mut String, results: &[SystemResults]) {
    let systems = lb_systems(results);
    if systems.is_empty() {
        return;
    }
    let _ = writeln!(text, "\n### Flip latency of `lb`\n");
    let _ = writeln!(
        text,
        "Deciding event (carrier loss, last failed or passed check) → map write done, as the \
         agent measured and logged it for every move of the `requests` service between \
         master and slave in this run, in microseconds. With 10 trials or fewer per \
         experiment, p99 in the tables above is the largest trial. *Waited*: the part of a \
         flip between the event and the agent acting on it, which for a missed deadline is \
         how late the prober thread ran after it (a `SCHED_FIFO` prober wakes {} µs ahead \
         of a deadline that decides, and stays on the CPU until it); the rest is the \
         agent's own work.\n",
        lb_user::health::pipeline::DECISIVE_LEAD.as_micros()
    );
    let _ = writeln!(
        text,
        "Under load: the agent reloaded with {} more services (link and ICMP checks of both \
         backends every {}, on the same prober thread) while a client scrapes `/metrics` \
         every {} ms, and the master's server frozen and thawed {FLIP_CYCLES} times.\n",
        flip_load::EXTRA_SERVICES,
        flip_load::EXTRA_INTERVAL,
        flip_load::SCRAPE_EVERY.as_millis(),
    );
    let _ = writeln!(
        text,
        "*Called for*: the moves the experiments asked for (per trial, a failover and a \
         failback in each of the four fault experiments, in the UDP stream with a failover \
         and in the TCP experiment; under load, one each way per freeze and thaw). Flips \
         beyond them were made without cause: three healthy answers in a row later than the \
         timeout, on a machine whose 2 cores also run the client, the servers and the \
         agent.\n"
    );
    let _ = writeln!(
        text,
        "| system | flips | n | called for | mean | min | max | p50 | p99 | waited p99 | \
         cause of the slowest |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|---|---|---|---|---|");
    for system in systems {
        for (what, flips, called_for) in [
            (
                "during the experiments above",
                &system.flips,
                system.caused_flips,
            ),
            ("under load", &system.flips_loaded, 2 * FLIP_CYCLES),
        ] {
            let Some(s) = Summary::of(&micros(flips)) else {
                continue;
            };
            let waited = Summary::of(&flips.iter().map(|f| f.waited_us).collect::<Vec<_>>())
                .map_or(0.0, |w| w.p99);
            let slowest = flips
                .iter()
                .max_by(|a, b| a.us.total_cmp(&b.us))
                .map_or(String::new(), |f| {
                    format!("{} (waited {:.1})", f.cause, f.waited_us)
                });
            let _ = writeln!(
                text,
                "| {} | {what} | {} | {called_for} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | \
                 {waited:.1} | {slowest} |",
                system.label, s.n, s.mean, s.min, s.max, s.p50, s.p99
            );
        }
    }
}

/// The flips' durations in µs.
fn micros(flips: &[Flip]) -> Vec<f64> {
    flips.iter().map(|f| f.us).collect()
}

/// What delays the flips of `system` during the experiments.
fn flip_delay_experiments(system: &SystemResults) -> String {
    flip_delay(system, &system.flips)
}

/// What delays the flips of `system` under load.
fn flip_delay_loaded(system: &SystemResults) -> String {
    flip_delay(system, &system.flips_loaded)
}

/// What delays `flips` of `system`, from the slowest: the wait before the agent acted on
/// the evidence, and the agent's own work after it.
fn flip_delay(system: &SystemResults, flips: &[Flip]) -> String {
    let slowest = flips.iter().max_by(|a, b| a.us.total_cmp(&b.us));
    let split = slowest.map_or(String::new(), |f| {
        format!(
            " The slowest of these flips took {:.1} µs: {:.1} µs before the agent acted on \
             the evidence, {:.1} µs of its own work after it (the answers due at that moment \
             read, the decision, the write).",
            f.us,
            f.waited_us,
            f.us - f.waited_us
        )
    });
    let cure = if system
        .tuning
        .is_some_and(|t| matches!(t.prober, Prober::Fifo(_)))
    {
        format!(
            "This setup's prober runs under `SCHED_FIFO`, so no ordinary process delays it, \
             and it is on the CPU at a deadline that decides (woken {} µs ahead); what can \
             still take the CPU from it is the kernel's interrupt and receive work (the \
             client's traffic through veth and XDP), and a wake-up later than the lead.",
            lb_user::health::pipeline::DECISIVE_LEAD.as_micros()
        )
    } else {
        "`[prober] realtime_priority` takes the thread out of the scheduler's competition, \
         and lets it wait for a deciding deadline on the CPU."
            .to_string()
    };
    format!(
        "The flip is one map update syscall, made on the prober thread that saw the \
         evidence; a slow one is that thread woken late, descheduled or busy with other \
         checks between the evidence and the write, which the machine's load (client, \
         servers and agent on 2 cores) explains.{split} {cure}"
    )
}

/// What bounds the detection of a silent master, for `system`.
fn silent_floor(system: &SystemResults) -> String {
    let timeout_ms = timeout_ms(system);
    format!(
        "A silent master is seen only by missed deadlines: an attempt is sent every 1 ms, \
         each with {t} ms to answer, and the third consecutive miss moves the traffic, {lo} \
         to {hi} ms after the silence began (the last attempt sent before it may miss too); \
         the server view can read less, as it starts at the master server's last answer, \
         which can come a little after the silence began (to a request it had already \
         received; the answer is lost). \
         A shorter timeout sees it sooner but must stay above the slowest healthy answer: \
         the master's server answers the client's requests on the same socket, and under \
         this load on 2 cores a healthy answer sometimes takes more than a millisecond (the \
         flips without cause in the flip latency table). Anything beyond the window is the \
         prober thread woken late.",
        t = timeout_ms,
        lo = 2 + timeout_ms,
        hi = 3 + timeout_ms
    )
}

/// `system`'s UDP check timeout in ms.
fn timeout_ms(system: &SystemResults) -> u64 {
    system.tuning.map_or(0, |t| t.timeout_ms)
}

/// The slowest-trial figure of one experiment: `None` when a trial did not complete (the
/// figure is then unmeasured and the target missed).
fn gaps(trials: &[Trial]) -> Option<Summary> {
    let gaps: Option<Vec<f64>> = trials.iter().map(|t| t.server_gap).collect();
    Summary::of(&gaps?)
}

/// One target: its name, how to measure it in a system's results (`None`: not
/// measured, or a trial did not complete), whether it is met, and what explains a miss.
struct Target {
    name: &'static str,
    measure: fn(&SystemResults) -> Option<f64>,
    unit: &'static str,
    met: fn(f64) -> bool,
    when_missed: fn(&SystemResults) -> String,
}

/// The targets `lb` is measured against.
const TARGETS: [Target; 9] = [
    Target {
        name: "downtime, link down, p50 < 1 ms",
        measure: |lb| gaps(&lb.link_down).map(|s| s.p50 * 1e3),
        unit: "ms",
        met: |v| v < 1.0,
        when_missed: link_down_profile,
    },
    Target {
        name: "downtime, link down, p99 < 2 ms",
        measure: |lb| gaps(&lb.link_down).map(|s| s.p99 * 1e3),
        unit: "ms",
        met: |v| v < 2.0,
        when_missed: link_down_profile,
    },
    Target {
        name: "downtime, server killed, p50 < 5 ms",
        measure: |lb| gaps(&lb.killed).map(|s| s.p50 * 1e3),
        unit: "ms",
        met: |v| v < 5.0,
        when_missed: |lb| {
            format!(
                "A killed server is seen by the UDP check: each probe after the kill is \
                 refused by the master's ICMP port unreachable, and `fall = 3` such probes \
                 at a 1 ms interval move the traffic, so the floor is about 3 ms. The \
                 master's kernel rate-limits ICMP errors (`net.ipv4.icmp_msgs_per_sec`, \
                 1000 per second for the whole namespace), and the client's requests to the \
                 dead port use that budget up: a probe whose refusal was not sent fails at \
                 its deadline instead, {} ms after it was sent.",
                timeout_ms(lb)
            )
        },
    },
    Target {
        name: "downtime, master host silent, p50 < 4 ms",
        measure: |lb| gaps(&lb.silent).map(|s| s.p50 * 1e3),
        unit: "ms",
        met: |v| v < 4.0,
        when_missed: silent_floor,
    },
    Target {
        name: "downtime, master host silent, p99 < 5 ms",
        measure: |lb| gaps(&lb.silent).map(|s| s.p99 * 1e3),
        unit: "ms",
        met: |v| v < 5.0,
        when_missed: silent_floor,
    },
    Target {
        name: "failback without a lost request (most lost in a trial)",
        measure: |lb| {
            gaps(&lb.failback).and(lb.failback.iter().map(|t| t.lost as f64).reduce(f64::max))
        },
        unit: "requests",
        met: |v| v == 0.0,
        when_missed: |_| {
            "Requests in flight to the slave when the map entry flips back are still \
             answered by the slave, so a lost request means the master was chosen before it \
             could answer, which the `cause` of that flip in the agent's log shows. An \
             incomplete trial means the master answered nothing within the stream (1.5 s \
             after the port came back up): the agent fails back only once the kernel has \
             announced the carrier and the checks passed `rise` times, and the agent's log \
             shows when that was."
                .into()
        },
    },
    Target {
        name: "UDP loss with one failover < 0.05 % (worst trial)",
        measure: |lb| lb.stream_loss.iter().copied().reduce(f64::max),
        unit: "%",
        met: |v| v < 0.05,
        when_missed: |_| {
            "The loss is the datagrams sent between the carrier loss and the map write, plus \
             any the veth queues dropped under the client's burst; compare with the \
             link-down downtime above, which bounds the first part."
                .into()
        },
    },
    Target {
        name: "flip latency p99 < 100 µs",
        measure: |lb| Summary::of(&micros(&lb.flips)).map(|s| s.p99),
        unit: "µs",
        met: |v| v < 100.0,
        when_missed: flip_delay_experiments,
    },
    Target {
        name: "flip latency p99 < 100 µs under load",
        measure: |lb| Summary::of(&micros(&lb.flips_loaded)).map(|s| s.p99),
        unit: "µs",
        met: |v| v < 100.0,
        when_missed: flip_delay_loaded,
    },
];

/// The targets table, one column per `lb` setup, with an explanation under every missed
/// target (one for the setups that miss it for the same reason).
pub fn render_targets(text: &mut String, results: &[SystemResults]) {
    let systems = lb_systems(results);
    if systems.is_empty() {
        return;
    }
    let _ = writeln!(text, "\n### Targets (`lb`)\n");
    let names: Vec<&str> = systems.iter().map(|s| s.label.as_str()).collect();
    let _ = writeln!(text, "| target | {} |", names.join(" | "));
    let _ = writeln!(text, "|---|{}", "---|".repeat(systems.len()));
    let mut missed: Vec<(&Target, String, Vec<&str>)> = Vec::new();
    for target in &TARGETS {
        let _ = write!(text, "| {} |", target.name);
        for system in &systems {
            let (shown, met) = match (target.measure)(system) {
                Some(v) => (format!("{v:.3} {}", target.unit), (target.met)(v)),
                None => ("not measured (a trial did not complete)".into(), false),
            };
            let verdict = if met { "yes" } else { "**no**" };
            let _ = write!(text, " {shown}: {verdict} |");
            if met {
                continue;
            }
            let why = (target.when_missed)(system);
            match missed
                .iter_mut()
                .find(|(t, w, _)| t.name == target.name && *w == why)
            {
                Some((_, _, by)) => by.push(&system.label),
                None => missed.push((target, why, vec![&system.label])),
            }
        }
        let _ = writeln!(text);
    }
    for (target, why, by) in missed {
        let _ = writeln!(
            text,
            "\n**Missed by {}: {}.** {why}",
            by.join(" and "),
            target.name
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
    let flip = lb.flips.iter().map(|f| f.us).fold(0.0, f64::max);
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
