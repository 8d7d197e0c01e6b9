//! Benches end to end, short: the failover bench with one trial per experiment for `lb` and
//! for keepalived at its fastest interval, and the scale bench on a small scale. Each must
//! measure (figures within generous bounds), write its report (and pictures), and leave
//! nothing behind.

use std::{process::Command, sync::Mutex};

/// The benches build the same namespaces (`lbf-…`), so the tests here run one at a time.
static TESTBED: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    TESTBED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `lb-bench ARGS… --report REPORT`; returns its stdout, after checking it succeeded.
fn run_bench(args: &[&str], report: &std::path::Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args(args)
        .arg("--report")
        .arg(report)
        .output()
        .expect("lb-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "lb-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
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
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("BENCHMARKS.md");
    let stdout = run_bench(
        &[
            "failover",
            "--trials",
            "1",
            "--loss-seconds",
            "2",
            "--keepalived-advert",
            "0.01",
        ],
        &report,
    );
    assert!(
        stdout.contains("bench: lb (XDP"),
        "no progress shown:\n{stdout}"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.starts_with("# Benchmarks"), "{text}");
    assert!(text.contains("<!-- bench:failover begin -->"), "{text}");
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

/// The scale bench, small: it measures both shapes and the agent, writes its section, and
/// leaves no namespace, pin or attachment behind.
#[test]
fn scale_bench_measures_reports_and_cleans_up() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("BENCHMARKS.md");
    let stdout = run_bench(
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
        &report,
    );
    assert!(
        stdout.contains("bench: per-packet cost"),
        "no progress shown:\n{stdout}"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("<!-- bench:scale begin -->"), "{text}");
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
