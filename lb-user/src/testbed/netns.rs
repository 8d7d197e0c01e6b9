//! Network namespaces as RAII values: created on `new`, deleted (with every veth inside) on
//! drop, also when a test panics.

use std::{fs::File, os::fd::AsRawFd, process::Command};

use anyhow::{bail, Context, Result};

/// A named network namespace (`ip netns`), deleted on drop.
pub struct Netns {
    name: String,
}

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `program ARGS…`, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed? `cargo xtask setup`)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespace `name` (deleting a leftover of the same name first) with `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `PROGRAM ARGS…` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A `Command` for `PROGRAM` inside the namespace. Only the network namespace changes
    /// (`nsenter --net`): the program sees this host's mounts, the bpf filesystem included,
    /// so what an agent pins there outlives it as on a real host.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        command
    }

    /// Starts `f` on a new thread inside this namespace and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            f()
        }))
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens, ifindexes it
    /// resolves and BPF test runs it starts all belong to the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Creates a veth pair: `a` in `ns_a` and `b` in `ns_b`, with fixed MACs, both up.
pub fn veth(ns_a: &Netns, a: &str, mac_a: &str, ns_b: &Netns, b: &str, mac_b: &str) -> Result<()> {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "address",
        mac_a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "address",
        mac_b,
        "netns",
        ns_b.name(),
    ])?;
    ns_a.ip(&["link", "set", a, "up"])?;
    ns_b.ip(&["link", "set", b, "up"])?;
    Ok(())
}
