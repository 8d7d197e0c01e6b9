//! `docs/BENCHMARKS.md`: one file, one section per bench. A bench rewrites only its own
//! section (between markers), so the results of the other bench stay.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, Result};

use super::stats::Summary;

const TITLE: &str = "# Benchmarks\n\n\
Written by `cargo xtask bench failover`, `cargo xtask bench throughput`, `cargo xtask \
bench flood` and `cargo xtask bench pair`; each run replaces its own section below. Every figure was measured on the machine its section \
names, in network namespaces on that machine (veth links, no physical NIC).\n";

/// Replaces (or appends) section `name` of the report at `path` with `body`.
pub fn update(path: &Path, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- bench:{name} begin -->");
    let end = format!("<!-- bench:{name} end -->");
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read {} to update its {name} section",
                    path.display()
                )
            })
        }
    };
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &old[..b], &old[e + end.len()..])
        }
        _ if old.trim().is_empty() => format!("{TITLE}\n{block}\n"),
        _ => format!("{}\n\n{block}\n", old.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

/// The start of bench `name`: the agents it starts log warnings only (unless `RUST_LOG`
/// says otherwise); returns when it started and its section's head ([`machine`]).
pub fn begin(name: &str) -> (std::time::Instant, String) {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    (std::time::Instant::now(), machine(&command_line(name)))
}

/// The command line of bench `name` as the operator typed it (`cargo xtask bench NAME …`).
pub fn command_line(name: &str) -> String {
    format!(
        "cargo xtask bench {name}{}",
        std::env::args()
            .skip(2)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    )
}

/// Writes `body` as section `name` of the report at `path`, prints it, and says so.
pub fn publish(path: &Path, name: &str, body: &str, started: std::time::Instant) -> Result<()> {
    update(path, name, body)?;
    println!("{body}");
    super::progress(format!(
        "wrote the {name} section of {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// A few lines naming the machine, kernel, date and command of a run, for a section's head.
pub fn machine(command: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = output("uname", &["-r"]);
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut text = String::new();
    let _ = writeln!(text, "- Command: `{command}`");
    let _ = writeln!(text, "- Date: {date}");
    let _ = writeln!(
        text,
        "- Machine: {cpu}, {cores} cores, {memory_gib:.0} GiB; kernel {kernel}"
    );
    text
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// One Markdown table row: `| label | mean | min | max | p50 | p99 | extra |`, values
/// scaled by `scale` and printed with `decimals`.
pub fn summary_row(label: &str, summary: Option<Summary>, scale: f64, decimals: usize) -> String {
    match summary {
        Some(s) => format!(
            "| {label} | {:.d$} | {:.d$} | {:.d$} | {:.d$} | {:.d$} | {} |",
            s.mean * scale,
            s.min * scale,
            s.max * scale,
            s.p50 * scale,
            s.p99 * scale,
            s.n,
            d = decimals
        ),
        None => format!("| {label} | – | – | – | – | – | 0 |"),
    }
}

/// Appends a Markdown table's head (its `columns` and the separator line) to `t`.
pub fn table_head(t: &mut String, columns: &[&str]) {
    t.push_str(&format!("| {} |\n", columns.join(" | ")));
    t.push_str(&format!("|{}\n", "---|".repeat(columns.len())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        update(&path, "a", "first a").unwrap();
        update(&path, "b", "first b").unwrap();
        update(&path, "a", "second a").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Benchmarks"));
        assert!(text.contains("second a") && !text.contains("first a"));
        assert!(text.find("second a") < text.find("first b"));
    }
}
