//! Benches end to end, short: the failover bench with one trial per experiment for `lb` and
//! for keepalived at its fastest interval, the throughput bench's agent overhead with short
//! windows, and the scale bench on a small scale. Each must measure (figures within generous
//! bounds), write its report (and pictures), and leave nothing behind.

use std::{process::Command, sync::Mutex};

/// The benches build the same namespaces (`lbf-…`), so the tests here run one at a time.
static TESTBED: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    TESTBED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A bench run into a directory of its own.
struct Run {
    /// Holds the report and the pictures; removed with the run.
    dir: tempfile::TempDir,
    /// The report written.
    text: String,
}

/// Runs `lb-bench ARGS… --report DIR/BENCHMARKS.md` in a fresh directory, and checks that
/// it succeeded, showed `progress` while it ran, and wrote its `section`.
fn run_bench(args: &[&str], progress: &str, section: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("BENCHMARKS.md");
    let output = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("lb-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "lb-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("bench: {progress}")),
        "no progress shown:\n{stdout}"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(
        text.contains(&format!("<!-- bench:{section} begin -->")),
        "{text}"
    );
    Run { dir, text }
}

/// The mean (ms) of `label`'s row in the first table after `heading`.
fn mean_after(report: &str, heading: &str, label: &str) -> f64 {
    let section = &report[report.find(heading).expect("heading in the report")..];
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row for {label} under {heading}"));
    row.split('|')
        .nth(2)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mean in {row}"))
}

#[test]
fn failover_bench_measures_reports_and_cleans_up() {
    let _serial = one_at_a_time();
    let Run { dir, text } = run_bench(
        &[
            "failover",
            "--trials",
            "1",
            "--loss-seconds",
            "2",
            "--keepalived-advert",
            "0.01",
        ],
        "lb (XDP",
        "failover",
    );
    assert!(text.starts_with("# Benchmarks"), "{text}");
    assert!(text.contains("- Machine: "), "{text}");
    // Both default setups of `lb` are measured.
    for lb in [
        "lb (XDP, link + 1 ms UDP checks, 10 ms timeout)",
        "lb (XDP, link + 1 ms UDP checks, 1 ms timeout, prober SCHED_FIFO 50)",
    ] {
        let lb_down = mean_after(&text, "### Downtime, master link down", lb);
        assert!(lb_down < 500.0, "{lb}: link-down downtime {lb_down} ms");
        let lb_killed = mean_after(&text, "### Downtime, master server process killed", lb);
        assert!(
            lb_killed < 500.0,
            "{lb}: downtime with the server killed {lb_killed} ms"
        );
        let lb_silent = mean_after(&text, "### Downtime, master host silent", lb);
        assert!(
            lb_silent < 500.0,
            "{lb}: downtime with the master silent {lb_silent} ms"
        );
    }
    let keepalived = "keepalived VRRP, advert_int 0.01 s";
    let vrrp_down = mean_after(&text, "### Downtime, master link down", keepalived);
    assert!(
        vrrp_down > 0.0 && vrrp_down < 2000.0,
        "keepalived link-down downtime {vrrp_down} ms"
    );
    // Every flip split into the wait before the agent acted and the rest (the split's
    // format; its figures are the run's).
    let flips = &text[text.find("### Flip latency of `lb`").expect("flip section")..];
    assert!(flips.contains("| waited p99 |"), "{flips}");
    let rows: Vec<&str> = flips
        .lines()
        .filter(|l| l.starts_with("| lb (XDP") && l.contains("| during the experiments above |"))
        .collect();
    assert_eq!(rows.len(), 2, "a flip row per setup:\n{flips}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let p99: f64 = cells[9].parse().unwrap_or_else(|_| panic!("p99 in {row}"));
        let waited: f64 = cells[10]
            .parse()
            .unwrap_or_else(|_| panic!("waited in {row}"));
        assert!(p99 > 0.0 && (0.0..=p99).contains(&waited), "{row}");
        assert!(cells[11].contains("(waited "), "{row}");
    }
    assert!(text.contains("### Targets (`lb`)"), "{text}");
    for picture in [
        "failover-lb.svg",
        "failover-lb-1ms-rt50.svg",
        "failover-keepalived-0.01.svg",
    ] {
        let svg = std::fs::read_to_string(dir.path().join(picture)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("slave"),
            "{picture}"
        );
    }
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains("lbf-") && !namespaces.contains("lbk-"),
        "namespaces left behind:\n{namespaces}"
    );
}

#[test]
fn interrupted_failover_bench_leaves_nothing_behind() {
    let _serial = one_at_a_time();
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("BENCHMARKS.md");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args(["failover", "--trials", "3", "--skip-keepalived", "--report"])
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lb-bench starts");
    let stdout = bench.stdout.take().unwrap();
    // Interrupt it once a trial is running: the testbed and the agent are up then.
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let running = line.contains("trial 1/3: master link up");
        seen.push(line);
        if running {
            // SAFETY: kill(2) on the child this test spawned and still owns.
            unsafe { libc::kill(bench.id() as libc::pid_t, libc::SIGINT) };
            break;
        }
    }
    let output = bench.wait_with_output().expect("lb-bench exits");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        seen.last().is_some_and(|l| l.contains("trial 1/3")),
        "the bench never reached a trial:\n{}\n{stderr}",
        seen.join("\n")
    );
    assert!(!output.status.success(), "an interrupted bench must fail");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!report.exists(), "an interrupted bench wrote a report");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains("lbf-"),
        "namespaces left behind:\n{namespaces}"
    );
    // The servers and the agent name the testbed (`lbf-…`) on their command lines; the
    // iperf3 servers are the only ones on the machine.
    for pattern in [&["-f", "lbf-"][..], &["-x", "iperf3"][..]] {
        let pgrep = Command::new("pgrep")
            .arg("-a")
            .args(pattern)
            .output()
            .unwrap();
        assert!(
            pgrep.stdout.is_empty(),
            "processes left behind:\n{}",
            String::from_utf8_lossy(&pgrep.stdout)
        );
    }
}

/// The throughput bench's agent overhead alone, with short windows: every scenario measured
/// with its checks running and its backends up, the wake-up floor beside it, and no
/// namespace or pin left behind.
#[test]
fn throughput_bench_measures_the_agents_overhead_and_cleans_up() {
    let _serial = one_at_a_time();
    let Run { dir: _dir, text } = run_bench(
        &[
            "throughput",
            "--no-traffic",
            "--no-cost",
            "--overhead-secs",
            "2",
            "--services",
            "10",
        ],
        "agent overhead",
        "throughput",
    );
    // Each scenario measured in each of its placements: probes sent at about the rate the
    // checks call for, the backends up (at 1 ms a healthy backend on this loaded testbed
    // may be out for a moment when the window ends), CPU time counted (the kernel counts it
    // in 10 ms ticks, which 2 s of 100 ms checks may not reach).
    for (scenario, backends, least_up, least_probes, some_cpu) in [
        ("1 service, 2 backends, 1 ms checks", 2, 1, 1000.0, true),
        (
            "10 services, 2 backends each, 100 ms checks",
            20,
            20,
            100.0,
            false,
        ),
    ] {
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("| {scenario} |")))
            .collect();
        assert!(!rows.is_empty(), "no row for {scenario}:\n{text}");
        for row in rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let probes: f64 = cells[5]
                .parse()
                .unwrap_or_else(|_| panic!("probes/s in {row}"));
            let failed: f64 = cells[6]
                .parse()
                .unwrap_or_else(|_| panic!("failed in {row}"));
            assert!(probes >= least_probes, "{row}");
            assert!(failed < probes / 10.0, "{row}");
            let (up, of) = cells[7]
                .split_once('/')
                .unwrap_or_else(|| panic!("up in {row}"));
            assert_eq!(of, backends.to_string(), "{row}");
            assert!(up.parse::<usize>().is_ok_and(|up| up >= least_up), "{row}");
            let cpu: f64 = cells[8]
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("CPU in {row}"));
            assert!(
                (0.0..100.0).contains(&cpu) && (cpu > 0.0 || !some_cpu),
                "{row}"
            );
        }
    }
    assert!(
        text.contains("a thread that only waits on the agent's timer"),
        "no wake-up floor:\n{text}"
    );
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains("lbt-"),
        "namespaces left behind:\n{namespaces}"
    );
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("lbt-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pins left behind: {pins:?}");
}

/// The scale bench, small: it measures both shapes and the agent, writes its section, and
/// leaves no namespace, pin or attachment behind.
#[test]
fn scale_bench_measures_reports_and_cleans_up() {
    let _serial = one_at_a_time();
    let Run { dir: _dir, text } = run_bench(
        &[
            "scale",
            "--services",
            "50",
            "--flows",
            "20000",
            "--max-flows",
            "32768",
            "--runs",
            "1000",
        ],
        "per-packet cost",
        "scale",
    );
    // Both shapes measured, every flow written found in the table.
    for row in ["| 1 | 4096 | 4096 |", "| 50 | 20000 | 20000 |"] {
        assert!(text.contains(row), "no row {row}:\n{text}");
    }
    assert!(
        text.contains("| one census sweep of the full table (`lb_flow_sweep_seconds`) |")
            && text.contains("20000 entries counted"),
        "{text}"
    );
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains("lbs-") && !namespaces.contains("lbt-scale"),
        "namespaces left behind:\n{namespaces}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/lbs-agent-switch").exists(),
        "pins left behind"
    );
}
