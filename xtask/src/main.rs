//! `cargo xtask`: the one entry point for setting up a machine, building, testing and running.
//!
//! - `setup`: installs what a fresh machine lacks (Debian packages, nightly `rust-src`,
//!   `bpf-linker`), idempotently, saying what it did;
//! - `build [--release]`: the XDP object (nightly, via `lb-user`'s build script) and `lb`;
//! - `test`: setup, `cargo fmt --check`, clippy with `-D warnings` (userspace and eBPF), then
//!   every test of the workspace;
//! - `run [-- ARGS]`: builds and runs `lb ARGS`; without arguments, `lb demo`;
//! - `bench failover|throughput|flood|pair|scale [-- ARGS]`: release builds of `lb` and `lb-bench`, then the
//!   bench, which writes `docs/BENCHMARKS.md`;
//! - `install`: a release `lb` in `/usr/local/bin`, the systemd unit, and an example config in
//!   `/etc/lb/lb.toml` unless one is there.

mod setup;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tasks of the XDP failover load balancer workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks to build, test and benchmark.
    Setup,
    /// Build the XDP program and the `lb` binary.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Setup, formatting and lint checks, then every test.
    Test,
    /// Build, then run `lb` with ARGS (the demo when none are given).
    Run {
        /// Optimised build.
        #[arg(long)]
        release: bool,
        /// Arguments for `lb`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install `lb` (release build) in /usr/local/bin, its systemd unit in
    /// /etc/systemd/system, and the example config in /etc/lb/lb.toml unless one is there.
    Install,
    /// Run a benchmark (release builds) and write docs/BENCHMARKS.md.
    Bench {
        /// Which bench: `failover`, `throughput`, `flood`, `pair` or `scale`.
        #[arg(value_parser = ["failover", "throughput", "flood", "pair", "scale"])]
        which: String,
        /// Options for the bench (`cargo xtask bench failover -- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Test => test(),
        Task::Run { release, args } => run(release, args),
        Task::Bench { which, args } => bench(&which, args),
        Task::Install => install(),
    }
}

/// `cargo xtask install`.
fn install() -> Result<()> {
    if !is_root() {
        bail!("installing into /usr/local/bin and /etc needs root");
    }
    let lb = build(true)?;
    let copy = |from: &Path, to: &Path| -> Result<()> {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::copy(from, to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        println!("installed {}", to.display());
        Ok(())
    };
    // Through a temporary name: a running agent keeps its binary, the next start gets this one.
    let staged = Path::new("/usr/local/bin/.lb.new");
    copy(&lb, staged)?;
    std::fs::rename(staged, "/usr/local/bin/lb").context("cannot install /usr/local/bin/lb")?;
    copy(
        &root().join("deploy/lb.service"),
        Path::new("/etc/systemd/system/lb.service"),
    )?;
    let config = Path::new("/etc/lb/lb.toml");
    if config.exists() {
        println!(
            "kept {} (the example is examples/lb.toml)",
            config.display()
        );
    } else {
        copy(&root().join("examples/lb.toml"), config)?;
        println!(
            "edit {} for this host's NICs and services",
            config.display()
        );
    }
    if Path::new("/run/systemd/system").exists() {
        step("systemctl", &["daemon-reload"], &[])?;
        println!("then: systemctl enable --now lb   (restart: hitless; stop for good: systemctl stop lb && lb down)");
    } else {
        println!("systemd is not running here: start `lb run --config /etc/lb/lb.toml` as you run services");
    }
    Ok(())
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it; fails if it fails.
pub fn step(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    println!("==> {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds `lb` (and through its build script the XDP object); returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--package", "lb-user", "--bin", "lb"];
    if release {
        args.push("--release");
    }
    step("cargo", &args, &[])?;
    let profile = if release { "release" } else { "debug" };
    Ok(root().join("target").join(profile).join("lb"))
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("the tests attach XDP programs and create network namespaces: run them as root");
    }
    setup::run()?;
    step("cargo", &["fmt", "--all", "--", "--check"], &[])?;
    step(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "bench-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    step(
        "cargo",
        &[
            "+nightly",
            "clippy",
            "--package",
            "lb-ebpf",
            "--package",
            "bench-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    let lb = build(false)?;
    let lb = lb.to_string_lossy().into_owned();
    let args = [
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--exclude",
        "bench-ebpf",
        "--lib",
        "--bins",
        "--tests",
    ];
    println!("==> cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(args)
        .env("LB_BIN", &lb)
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// (passed, failed) from a libtest summary line such as
/// `test result: ok. 17 passed; 0 failed; 0 ignored; …`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split([';', '.'])
            .map(str::trim)
            .find_map(|part| part.strip_suffix(word)?.trim().parse::<u64>().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

fn run(release: bool, args: Vec<String>) -> Result<()> {
    if is_root() {
        setup::run()?;
    }
    let lb = build(release)?;
    let args = if args.is_empty() {
        vec!["demo".to_string()]
    } else {
        args
    };
    let mut command = if is_root() {
        Command::new(&lb)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&lb);
        sudo
    };
    command.args(&args);
    println!("==> {} {}", lb.display(), args.join(" "));
    // Ctrl-C reaches `lb` too; this process only waits for it to finish cleaning up.
    ignore_interrupts_while_waiting();
    let status = command
        .status()
        .with_context(|| format!("cannot run {}", lb.display()))?;
    if !status.success() {
        bail!("lb exited with {status}");
    }
    Ok(())
}

fn bench(which: &str, args: Vec<String>) -> Result<()> {
    if !is_root() {
        bail!("the benches create network namespaces and attach XDP programs: run them as root");
    }
    setup::run()?;
    let lb = build(true)?;
    step(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "tests",
            "--bin",
            "lb-bench",
        ],
        &[],
    )?;
    let bench = root().join("target/release/lb-bench");
    println!("==> {} {which} {}", bench.display(), args.join(" "));
    // Ctrl-C reaches the bench too; it cleans up and exits, this process waits for it.
    ignore_interrupts_while_waiting();
    let status = Command::new(&bench)
        .arg(which)
        .args(&args)
        .env("LB_BIN", &lb)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {}", bench.display()))?;
    if !status.success() {
        bail!("the {which} bench failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Catches SIGINT with a handler that does nothing (a handler, unlike SIG_IGN, is not
/// inherited by the child).
fn ignore_interrupts_while_waiting() {
    // SAFETY: installs an async-signal-safe handler that does nothing.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn libtest_summaries_are_counted() {
        let line = "test result: ok. 17 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.22s";
        assert_eq!(parse_test_result(line), Some((17, 2)));
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
