//! keepalived VRRP on the same testbed, for the comparison: the switch becomes a plain L2
//! bridge, master and slave get addresses on the client's segment, and keepalived on each
//! moves the VIP between them (the slave takes over when the master's adverts stop).

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use lb_user::testbed::{
    process::Process,
    topology::{CLIENT_IP, VIP},
    Host, Testbed,
};

/// The master's address on the shared segment.
pub const MASTER_SEGMENT_IP: &str = "198.18.1.3";
/// The slave's address on the shared segment.
pub const SLAVE_SEGMENT_IP: &str = "198.18.1.4";

/// Makes the switch an L2 bridge of c0, m0 and s0, and puts master and slave on the
/// client's segment.
pub fn bridge(testbed: &Testbed) -> Result<()> {
    let switch = &testbed.switch;
    switch.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
    for port in ["c0", "m0", "s0"] {
        switch.ip(&["addr", "flush", "dev", port])?;
        switch.ip(&["link", "set", port, "master", "br0"])?;
    }
    switch.ip(&["link", "set", "br0", "up"])?;
    testbed.master.ip(&[
        "addr",
        "add",
        &format!("{MASTER_SEGMENT_IP}/24"),
        "dev",
        "eth0",
    ])?;
    testbed.slave.ip(&[
        "addr",
        "add",
        &format!("{SLAVE_SEGMENT_IP}/24"),
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// A keepalived.conf for one VRRP instance on `eth0` holding the VIP (and, while it does, a
/// route that makes replies to the client leave from the VIP, as the servers' sockets and
/// iperf3 expect). `advert_int` below one
/// second selects VRRPv3 (which counts in centiseconds). `check`, a command that fails when
/// the server is gone, runs as a `vrrp_script` every second (keepalived's shortest script
/// interval) and puts the instance in FAULT on the first failure. (`vrrp_track_process`,
/// which would be event-driven, needs the kernel's process connector, which only the initial
/// network namespace has.)
pub fn config(router_id: &str, priority: u8, advert_int: Duration, check: Option<&str>) -> String {
    let seconds = advert_int.as_secs_f64();
    let version = if seconds < 1.0 { 3 } else { 2 };
    let mut text = format!(
        "global_defs {{\n  router_id {router_id}\n  vrrp_version {version}\n  \
         script_user root\n  enable_script_security\n}}\n"
    );
    if let Some(check) = check {
        text.push_str(&format!(
            "vrrp_script server {{\n  script \"{check}\"\n  interval 1\n  timeout 1\n  \
             fall 1\n  rise 1\n}}\n"
        ));
    }
    text.push_str(&format!(
        "vrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  \
         priority {priority}\n  advert_int {seconds}\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n  \
         virtual_routes {{\n    {CLIENT_IP}/32 dev eth0 src {VIP}\n  }}\n"
    ));
    if check.is_some() {
        text.push_str("  track_script {\n    server\n  }\n");
    }
    text.push_str("}\n");
    text
}

/// How keepalived tells `lb` of its state changes.
#[derive(Debug, Clone)]
pub enum Notify {
    /// A notify script: `lb notify …`, this command line.
    Script(String),
    /// The notify FIFO at this path, which the agent reads (`[pair] keepalived_fifo`).
    Fifo(std::path::PathBuf),
}

/// A keepalived.conf for a switch host of an lb pair (`docs/pair.md`): one VRRP instance
/// advertising on the client segment (`c0`), holding the gateway `.1` of every segment, and
/// telling `lb` of every change of state as `notify` says.
pub fn pair_config(router_id: &str, priority: u8, advert_int: Duration, notify: &Notify) -> String {
    let seconds = advert_int.as_secs_f64();
    let version = if seconds < 1.0 { 3 } else { 2 };
    let (fifo, script) = match notify {
        Notify::Fifo(path) => (
            format!("  vrrp_notify_fifo {}\n", path.display()),
            String::new(),
        ),
        Notify::Script(command) => (String::new(), format!("  notify \"{command}\"\n")),
    };
    format!(
        "global_defs {{\n  router_id {router_id}\n  vrrp_version {version}\n  \
         script_user root\n  enable_script_security\n{fifo}}}\n\
         vrrp_instance LB {{\n  state BACKUP\n  interface c0\n  virtual_router_id 52\n  \
         priority {priority}\n  advert_int {seconds}\n  virtual_ipaddress {{\n    \
         198.18.1.1/24 dev c0\n    198.18.2.1/24 dev m0\n    198.18.3.1/24 dev s0\n  }}\n\
         {script}}}\n"
    )
}

/// Starts keepalived (VRRP only, in the foreground) in `host` with `config`; its files live
/// in `dir`.
pub fn start(testbed: &Testbed, host: Host, dir: &Path, config: &str) -> Result<Process> {
    let name = format!("{host:?}").to_lowercase();
    let conf = dir.join(format!("keepalived-{name}.conf"));
    std::fs::write(&conf, config).with_context(|| format!("cannot write {}", conf.display()))?;
    let log_path = dir.join(format!("keepalived-{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = testbed.host(host).command("keepalived");
    command
        .args(["--dont-fork", "--vrrp", "--no-syslog", "--log-console"])
        .arg(format!("--use-file={}", conf.display()))
        .arg(format!(
            "--pid={}",
            dir.join(format!("{name}.pid")).display()
        ))
        .arg(format!(
            "--vrrp_pid={}",
            dir.join(format!("{name}-vrrp.pid")).display()
        ))
        .arg(format!(
            "--checkers_pid={}",
            dir.join(format!("{name}-checkers.pid")).display()
        ))
        .arg(format!(
            "--bfd_pid={}",
            dir.join(format!("{name}-bfd.pid")).display()
        ))
        .stdout(log.try_clone()?)
        .stderr(log);
    Process::spawn(command, &format!("keepalived on {name}"))
}

/// Whether `host` holds the VIP now.
pub fn holds_vip(testbed: &Testbed, host: Host) -> Result<bool> {
    let (_, out, _) = testbed.output(host, "ip", &["-4", "addr", "show", "dev", "eth0"])?;
    Ok(out.contains(&format!("{VIP}/")))
}

/// Waits until `host` holds the VIP (and the other backend does not).
pub fn wait_holder(testbed: &Testbed, host: Host, other: Host, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        super::interrupt::check()?;
        if holds_vip(testbed, host)? && !holds_vip(testbed, other)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("keepalived did not move the VIP to {host:?} within {timeout:?}")
}
