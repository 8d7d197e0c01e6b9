//! `cargo xtask setup`: makes a fresh machine able to build, test and benchmark, idempotently.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::step;

/// Commands the tests and benchmarks use, and the Debian package that provides each.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
    ("nft", "nftables"),
    ("promtool", "prometheus"),
    ("keepalived", "keepalived"),
    ("pgrep", "procps"),
];

/// The bpf-linker release whose default build loads the nightly toolchain's own libLLVM.
const BPF_LINKER: &str = "bpf-linker@0.10.4";

/// Installs whatever is missing and says what it did.
pub fn run() -> Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    println!("setup: everything needed is installed");
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        println!(
            "setup: Debian packages present ({})",
            PACKAGES.iter().map(|p| p.1).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    if !have("apt-get") {
        bail!(
            "setup: missing {} and no apt-get to install them; install them by hand",
            missing.join(", ")
        );
    }
    println!("setup: installing Debian packages {}", missing.join(", "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    step("apt-get", &["update", "-q"], &env)
        .context("apt-get update failed (root and network to the Debian mirror needed)")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    step("apt-get", &args, &env)
}

fn nightly_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("setup: rustup not found; install Rust with rustup")?;
    if !installed.status.success() {
        bail!(
            "setup: no nightly toolchain (needed for the eBPF build with -Z build-std); \
             `rustup toolchain install nightly` failed or was not run: {}",
            String::from_utf8_lossy(&installed.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("setup: nightly rust-src present");
        return Ok(());
    }
    println!("setup: installing rust-src for the nightly toolchain");
    step(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
        &[],
    )
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        println!("setup: bpf-linker present");
        return Ok(());
    }
    println!("setup: building {BPF_LINKER} against the nightly toolchain's LLVM (a few minutes)");
    step(
        "cargo",
        &["+nightly", "install", BPF_LINKER, "--locked"],
        &[],
    )
    .context("setup: cannot install bpf-linker")
}
