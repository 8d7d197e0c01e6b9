//! The reference topology, built from network namespaces and veth pairs:
//!
//! ```text
//!  client ──eth0───c0── switch ──m0───eth0── master   198.18.2.2
//! 198.18.1.2        (lb, XDP)  ──s0───eth0── slave    198.18.3.2
//!                              ──b0───eth0── backup   198.18.4.2  (optional)
//!          VIP 198.18.1.100 on the client segment, answered by XDP
//! ```
//!
//! Hosts send with checksum offload off (so rewritten frames carry complete checksums), and
//! their end of each veth runs the pass-through XDP program: veth delivers frames sent with
//! `XDP_TX` or `XDP_REDIRECT` only to a peer that runs XDP.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub use super::{
    agent::lb_binary,
    tcp_responder::TCP_PORT,
    udp::{answer_runs, describe_gap, describe_unanswered, longest_gap, unanswered, Answer},
};
use super::{
    netns::{veth, Netns},
    process::Process,
    tcp_responder::TcpResponder,
};

/// The VIP of the testbed.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The master's address.
pub const MASTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The slave's address.
pub const SLAVE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// The master's MAC.
pub const MASTER_MAC: &str = "02:00:00:00:02:02";
/// The slave's MAC.
pub const SLAVE_MAC: &str = "02:00:00:00:03:02";
/// The backup's address (third backend, when the testbed has one).
pub const BACKUP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 2);
/// The backup's MAC.
pub const BACKUP_MAC: &str = "02:00:00:00:04:02";
/// The environment variable `lb run` and `lb down` read their pin directory from.
pub const PIN_PATH_ENV: &str = "LB_PIN_PATH";
/// The environment variable `lb` reads the agent's control socket from.
pub const SOCKET_ENV: &str = "LB_SOCKET";
/// The UDP port of the testbed's request/response service.
pub const UDP_PORT: u16 = 5353;

/// Four hosts, each a namespace; everything goes away on drop.
pub struct Testbed {
    /// Processes (servers, agents), stopped before the namespaces go.
    pub processes: Vec<Process>,
    pub(super) responders: Vec<(Host, super::udp::UdpResponder)>,
    tcp_responders: Vec<TcpResponder>,
    pub(super) veth_peers: Vec<(Host, crate::dataplane::PassProgram)>,
    /// The pass-through program on the fabric's bridge ports, in a pair testbed.
    pub(super) fabric_ports: Vec<crate::dataplane::PassProgram>,
    /// The client host.
    pub client: Netns,
    /// The switch host, where `lb` runs.
    pub switch: Netns,
    /// The master backend.
    pub master: Netns,
    /// The slave backend.
    pub slave: Netns,
    /// The third backend, if built.
    pub backup: Option<Netns>,
    /// The second switch host of a pair testbed ([`Testbed::pair`]).
    pub peer: Option<Netns>,
    /// The segments' bridges of a pair testbed, in a namespace of their own.
    pub fabric: Option<Netns>,
    web_servers: Vec<(Host, usize)>,
    /// Private directory for configs and web roots, removed on drop.
    files: tempfile::TempDir,
}

impl Testbed {
    /// Builds the topology with namespaces named `PREFIX-client` … `PREFIX-slave`.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::build(prefix, false, false)
    }

    /// The same with a third backend, `PREFIX-backup`.
    pub fn with_backup(prefix: &str) -> Result<Self> {
        Self::build(prefix, true, false)
    }

    /// Two switch hosts, `PREFIX-switch` and `PREFIX-peer`, on shared segments (bridges in
    /// `PREFIX-fabric`); see [`super::pair`].
    pub fn pair(prefix: &str) -> Result<Self> {
        Self::build(prefix, false, true)
    }

    fn build(prefix: &str, backup: bool, pair: bool) -> Result<Self> {
        let mut testbed = Testbed {
            processes: Vec::new(),
            responders: Vec::new(),
            tcp_responders: Vec::new(),
            veth_peers: Vec::new(),
            fabric_ports: Vec::new(),
            peer: if pair {
                Some(Netns::new(&format!("{prefix}-peer"))?)
            } else {
                None
            },
            fabric: if pair {
                Some(Netns::new(&format!("{prefix}-fabric"))?)
            } else {
                None
            },
            client: Netns::new(&format!("{prefix}-client"))?,
            switch: Netns::new(&format!("{prefix}-switch"))?,
            master: Netns::new(&format!("{prefix}-master"))?,
            slave: Netns::new(&format!("{prefix}-slave"))?,
            backup: if backup {
                Some(Netns::new(&format!("{prefix}-backup"))?)
            } else {
                None
            },
            web_servers: Vec::new(),
            files: tempfile::Builder::new()
                .prefix(&format!("{prefix}-"))
                .tempdir()
                .context("cannot create a temporary directory")?,
        };
        let mut hosts = vec![Host::Client, Host::Master, Host::Slave];
        if testbed.backup.is_some() {
            hosts.push(Host::Backup);
        }
        for host in hosts {
            testbed.wire(host)?;
        }
        if pair {
            testbed.wire_pair_link()?;
        }
        Ok(testbed)
    }

    /// Connects `host` to the switch: a veth pair (`eth0` on the host, its port on the
    /// switch) with fixed MACs, addresses on the host's /24, the host's default route via
    /// the switch, checksum offload off, and the pass-through program on `eth0`.
    fn wire(&mut self, host: Host) -> Result<()> {
        if self.fabric.is_some() {
            return self.wire_bridged(host);
        }
        let port = Port::of(host)?;
        let (ns, switch) = (self.host(host), &self.switch);
        veth(
            ns,
            "eth0",
            port.host_mac,
            switch,
            port.name,
            port.switch_mac,
        )?;
        let net = port.subnet;
        switch.ip(&[
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            port.name,
        ])?;
        ns.ip(&["addr", "add", &format!("198.18.{net}.2/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
        ns.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])?;
        let peer = ns.enter(|| crate::dataplane::PassProgram::attach("eth0"))??;
        self.veth_peers.push((host, peer));
        Ok(())
    }

    /// Deletes `host`'s switch port (and with it the host's `eth0`) and makes it again as
    /// it was, under the same names and MACs: a NIC re-created, as a driver reload or a
    /// replaced card does it. The switch's port gets a new interface index.
    pub fn remake_port(&mut self, host: Host) -> Result<()> {
        let port = Port::of(host)?;
        self.switch.ip(&["link", "del", port.name])?;
        self.veth_peers.retain(|(h, _)| *h != host);
        self.wire(host)
    }

    /// The agent config for this testbed: service `web` (TCP 80) and `echo` (UDP), master
    /// preferred, default health checks.
    pub fn config(&self, listen: &str) -> String {
        self.config_with(listen, "", "")
    }

    /// The config with extra keys for the `web` and `echo` services (health checks,
    /// policy), each a TOML fragment such as `health = { checks = [{ type = "link" }] }`.
    pub fn config_with(&self, listen: &str, web_extra: &str, echo_extra: &str) -> String {
        let backends = Self::backend_lines(self.backup.is_some());
        let head = Self::config_head(listen);
        format!(
            r#"{head}
[[services]]
name = "web"
vip = "{VIP}"
protocol = "tcp"
port = 80
{web_extra}
backends = [
{backends}]

[[services]]
name = "echo"
vip = "{VIP}"
protocol = "udp"
port = {UDP_PORT}
{echo_extra}
backends = [
{backends}]
"#
        )
    }

    /// The head of an agent config for the testbed: `metrics_listen` and the client-facing
    /// NIC `c0`.
    pub fn config_head(listen: &str) -> String {
        format!(
            "metrics_listen = \"{listen}\"\n\n[[interfaces]]\nname = \"c0\"\nrole = \"client\"\n"
        )
    }

    /// The backends of a service on the testbed, as the lines inside `backends = [ … ]`:
    /// master (priority 100) through `m0`, slave (50) through `s0`, and with `backup` the
    /// backup (10) through `b0`.
    pub fn backend_lines(backup: bool) -> String {
        let mut lines = format!(
            "  {{ name = \"master\", ip = \"{MASTER_IP}\", priority = 100, mac = \"{MASTER_MAC}\", iface = \"m0\" }},\n  \
             {{ name = \"slave\",  ip = \"{SLAVE_IP}\",  priority = 50,  mac = \"{SLAVE_MAC}\",  iface = \"s0\" }},\n"
        );
        if backup {
            lines.push_str(&format!(
                "  {{ name = \"backup\", ip = \"{BACKUP_IP}\", priority = 10, mac = \"{BACKUP_MAC}\", iface = \"b0\" }},\n"
            ));
        }
        lines
    }

    /// A `[[services]]` table for the VIP: `protocol` (`"udp"` or `"tcp"`) `port`, health
    /// checks `health` (an inline TOML table), master and slave as backends.
    pub fn service_toml(name: &str, protocol: &str, port: u16, health: &str) -> String {
        format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{VIP}\"\nprotocol = \"{protocol}\"\n\
             port = {port}\nhealth = {health}\nbackends = [\n{}]\n",
            Self::backend_lines(false)
        )
    }

    /// Writes `text` to a file removed with the testbed; returns its path.
    pub fn write_file(&mut self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.files.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The testbed's private directory (removed with it), for logs and configs.
    pub fn dir(&self) -> &std::path::Path {
        self.files.path()
    }

    /// The directory the web server of backend `name` serves (unique to this testbed).
    pub fn web_root(&self, name: &str) -> PathBuf {
        self.files.path().join(format!("www-{name}"))
    }

    /// Starts a real web server (Python's http.server) on port 80 of `host`, serving a page
    /// that says `name`, and waits until it answers.
    pub fn start_web_server(&mut self, host: Host, name: &str) -> Result<()> {
        let dir = self.web_root(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("index.html"), format!("{name}\n"))?;
        let ns = self.host(host);
        let mut command = ns.command("python3");
        command
            .args([
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(&dir);
        command
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let process = Process::spawn(command, &format!("web server on {name}"))?;
        self.processes.push(process);
        self.web_servers.push((host, self.processes.len() - 1));
        let ns = self.host(host);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let ok = ns
                .command("curl")
                .args(["-sf", "--max-time", "1", "http://127.0.0.1/"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the web server on {name} did not start within 15 s")
    }

    /// Kills the web server of `host` (its link stays up).
    pub fn kill_web_server(&mut self, host: Host) -> Result<()> {
        let index = self
            .web_servers
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, i)| *i)
            .context("no web server on that host")?;
        self.processes[index].kill();
        Ok(())
    }

    /// Turns the switch port of backend `host` off or on, as the reference study injected
    /// faults: the backend's link goes down (the agent sees the carrier go), the backend
    /// itself keeps its addresses and routes.
    pub fn set_link(&self, host: Host, up: bool) -> Result<()> {
        let port = Port::of(host)?.name;
        self.switch
            .ip(&["link", "set", port, if up { "up" } else { "down" }])
    }

    /// Makes `host` silent with its link up, or speaking again: every frame arriving on its
    /// NIC or leaving it is dropped (nftables ingress and egress chains), as for a hung
    /// machine or one behind a failed switch. The carrier stays up, so only the health
    /// checks (or, for VRRP, the missing adverts) can tell.
    pub fn set_silent(&self, host: Host, silent: bool) -> Result<()> {
        silence(self.host(host), "eth0", silent)
    }

    /// Starts a TCP responder on `host` (port [`TCP_PORT`]): every line a client sends on a
    /// connection is answered with `name`.
    pub fn start_tcp_responder(&mut self, host: Host, name: &str) -> Result<()> {
        let responder = TcpResponder::start(self.host(host), name)?;
        self.tcp_responders.push(responder);
        Ok(())
    }

    /// The namespace of `host`.
    pub fn host(&self, host: Host) -> &Netns {
        match host {
            Host::Client => &self.client,
            Host::Switch => &self.switch,
            Host::Master => &self.master,
            Host::Slave => &self.slave,
            Host::Backup => self
                .backup
                .as_ref()
                .expect("testbed built without a backup"),
            Host::Peer => self.peer.as_ref().expect("testbed built without a peer"),
        }
    }

    /// `curl` from the client to `http://VIP/`: the body, or an error.
    pub fn http_get_vip(&self) -> Result<String> {
        let output = self
            .client
            .command("curl")
            .args(["-sS", "--max-time", "3", &format!("http://{VIP}/")])
            .output()?;
        if !output.status.success() {
            bail!(
                "curl http://{VIP}/ failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Runs `program args…` in `host` and returns (success, stdout, stderr).
    pub fn output(
        &self,
        host: Host,
        program: &str,
        args: &[&str],
    ) -> Result<(bool, String, String)> {
        let mut command = self.host(host).command(program);
        if matches!(host, Host::Switch | Host::Peer) {
            command
                .env(PIN_PATH_ENV, self.pin_path_of(host))
                .env(SOCKET_ENV, self.control_socket_of(host));
        }
        let output: std::process::Output = command.args(args).output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

/// A host's link to the switch.
pub(super) struct Port {
    /// The switch's end.
    pub(super) name: &'static str,
    /// The MAC of the host's end.
    pub(super) host_mac: &'static str,
    /// The MAC of the switch's end.
    pub(super) switch_mac: &'static str,
    /// The third octet of the link's 198.18.N.0/24 (switch .1, host .2).
    pub(super) subnet: u8,
}

impl Port {
    pub(super) fn of(host: Host) -> Result<Port> {
        let (name, host_mac, switch_mac, subnet) = match host {
            Host::Client => ("c0", "02:00:00:00:01:02", "02:00:00:00:01:01", 1),
            Host::Master => ("m0", MASTER_MAC, "02:00:00:00:02:01", 2),
            Host::Slave => ("s0", SLAVE_MAC, "02:00:00:00:03:01", 3),
            Host::Backup => ("b0", BACKUP_MAC, "02:00:00:00:04:01", 4),
            Host::Switch | Host::Peer => bail!("a switch has no switch port"),
        };
        Ok(Port {
            name,
            host_mac,
            switch_mac,
            subnet,
        })
    }
}

/// Hosts of the testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The client.
    Client,
    /// The switch.
    Switch,
    /// The master backend.
    Master,
    /// The slave backend.
    Slave,
    /// The third backend.
    Backup,
    /// The second switch host of a pair testbed.
    Peer,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.processes.clear();
        // The agents are gone; what they pinned goes too (the namespaces, and the NICs the
        // program was attached to, go with the fields below).
        let switches: &[Host] = if self.peer.is_some() {
            &[Host::Switch, Host::Peer]
        } else {
            &[Host::Switch]
        };
        for switch in switches {
            if let Err(e) = crate::dataplane::pins::remove(&self.pin_path_of(*switch)) {
                eprintln!("cleanup: {e:#}");
            }
            let _ = std::fs::remove_file(self.control_socket_of(*switch));
        }
        self.responders.clear();
        self.tcp_responders.clear();
        self.veth_peers.clear();
        self.fabric_ports.clear();
    }
}

/// Drops every frame arriving on `device` in `namespace` or leaving it (nftables netdev
/// ingress and egress chains), or lets them pass again; the carrier stays up.
pub(super) fn silence(namespace: &Netns, device: &str, silent: bool) -> Result<()> {
    if silent {
        namespace.exec(
            "nft",
            &[&format!(
                "add table netdev lb_silence_{device}; \
                 add chain netdev lb_silence_{device} ingress \
                 {{ type filter hook ingress device {device} priority 0; policy drop; }}; \
                 add chain netdev lb_silence_{device} egress \
                 {{ type filter hook egress device {device} priority 0; policy drop; }}"
            )],
        )
    } else {
        namespace.exec(
            "nft",
            &[&format!("delete table netdev lb_silence_{device}")],
        )
    }
}
