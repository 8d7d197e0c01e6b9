//! The configuration file (TOML), as the operator writes it.
//!
//! Unknown keys are errors, so a typo never silently changes behaviour. See
//! `examples/lb.toml` for a complete, commented example.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::failover::policy::{AllDown, Failback};

/// Default address of the read-only HTTP endpoint (`/metrics` …): not node_exporter's 9100.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP endpoint (`/status`, `/healthz`, control) listens.
    #[serde(default = "default_listen")]
    pub metrics_listen: SocketAddr,
    /// How the program is attached.
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// NICs to attach to, with their role. NICs named by backends are added automatically.
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
    /// The services: one VIP (and optionally protocol and port) each.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The dataplane's connection table: size and timeouts.
    #[serde(default)]
    pub flows: FlowsConfig,
    /// The bpffs directory where the program's maps and NIC attachments are pinned, so the
    /// dataplane forwards on while the agent is stopped, restarted or upgraded, and a new
    /// agent adopts it. One directory per agent. Default `/sys/fs/bpf/lb`.
    #[serde(default = "default_pin_path")]
    pub pin_path: std::path::PathBuf,
    /// The Unix socket (only root may open it) through which `lb status`, `lb activate`,
    /// `lb drain`, `lb reload` … reach the agent. Default `/run/lb/lb.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: std::path::PathBuf,
    /// How the thread that runs the health checks is scheduled.
    #[serde(default)]
    pub prober: ProberConfig,
    /// Pair mode (`[pair]`): this host is one of two switch hosts, and keepalived decides
    /// which one serves. Without it the host always serves.
    pub pair: Option<PairConfig>,
}

/// Whether this switch host serves the VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Answers ARP for the VIPs and forwards their traffic.
    Active,
    /// Serves nothing of the VIPs; keeps its dataplane ready for a takeover.
    Standby,
}

impl std::fmt::Display for HostRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostRole::Active => "active",
            HostRole::Standby => "standby",
        })
    }
}

/// Pair mode (`[pair]`): two switch hosts with the same services, keepalived on both
/// deciding which is active; keepalived's notify script (`lb notify`) or `lb role` tells
/// the agent. See `docs/pair.md`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// The role at the first start, before keepalived said anything. Default `"standby"`:
    /// two hosts starting together never both serve. A restarted agent keeps the role the
    /// dataplane has (it is pinned), whatever this says.
    #[serde(default = "default_initial_role")]
    pub initial_role: HostRole,
    /// Gratuitous ARP requests sent for every VIP on every client NIC when this host
    /// becomes active (the first at once, the others `gratuitous_arp_interval` apart), so
    /// that clients and routers move the VIPs to this host's MACs. Default 3.
    #[serde(default = "default_gratuitous_arps")]
    pub gratuitous_arps: u32,
    /// Between two rounds of gratuitous ARP. Default `"100ms"`.
    #[serde(default = "default_gratuitous_arp_interval", with = "humantime_serde")]
    pub gratuitous_arp_interval: Duration,
    /// keepalived's notify FIFO (`vrrp_notify_fifo` in its `global_defs`), read by the agent:
    /// every state change in order, without a process per change (faster than `lb notify`,
    /// and never reordered). Made (mode 0600) if missing. None by default.
    pub keepalived_fifo: Option<std::path::PathBuf>,
    /// Where this agent accepts its peer's connection (TCP), over which the peer streams
    /// its connection table and its role; the pair link's address, e.g.
    /// `"198.18.9.11:7470"`, from which this agent's own stream to the peer also comes.
    /// Set with `peer`, or neither (no flow is copied then).
    pub sync_listen: Option<std::net::SocketAddr>,
    /// The peer agent's `sync_listen`: where this agent streams its own connection table
    /// and role. Only a connection from the peer's address is accepted on `sync_listen`.
    pub peer: Option<std::net::SocketAddr>,
}

fn default_initial_role() -> HostRole {
    HostRole::Standby
}

fn default_gratuitous_arps() -> u32 {
    3
}

fn default_gratuitous_arp_interval() -> Duration {
    Duration::from_millis(100)
}

/// Scheduling of the prober thread (`[prober]`): the one thread that sends every health
/// check, sees its answer or its deadline, reads the kernel's link events, decides, and
/// writes the flip. The agent's other
/// work (scrapes, control requests, logging) runs on other threads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProberConfig {
    /// `SCHED_FIFO` priority (1–99) for the prober thread; none by default. With it, no
    /// ordinary process on the host can delay a check or a flip; the risk is the other way
    /// round: while it runs, no ordinary process runs on its CPU (it stays on the CPU up to
    /// [`DECISIVE_LEAD`](crate::health::pipeline::DECISIVE_LEAD) before a deadline that
    /// would take the active backend down), and a prober with too many checks for its
    /// intervals would hold that CPU, so keep checks at sane intervals. Needs
    /// `CAP_SYS_NICE`.
    pub realtime_priority: Option<u8>,
    /// Niceness of the prober thread when it is not real-time (-20 … 19). Default 0; a
    /// negative value needs `CAP_SYS_NICE`.
    #[serde(default)]
    pub nice: i32,
}

/// Default of `control_socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";

fn default_control_socket() -> std::path::PathBuf {
    DEFAULT_CONTROL_SOCKET.into()
}

/// Default of `pin_path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

fn default_pin_path() -> std::path::PathBuf {
    DEFAULT_PIN_PATH.into()
}

/// The connection table (`[flows]`): how many flows it holds and how long an idle flow
/// lives. A flow whose timeout passed is gone: its next packet starts a new flow on the
/// active backend, and a reply to it is no longer rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsConfig {
    /// Flows the table holds; when it is full, the least recently used flow is evicted.
    /// Default 262144 (about 20 MiB with the reply index).
    #[serde(default = "default_max_flows")]
    pub max: u32,
    /// Idle timeout of an established TCP connection. Default `"3h"`: longer than the
    /// default TCP keepalive time (2 h), so idle connections with keepalives survive.
    #[serde(default = "default_tcp_established", with = "humantime_serde")]
    pub tcp_established: Duration,
    /// Idle timeout of a TCP connection whose handshake has not completed (also one picked
    /// up mid-stream, until its backend answers). Default `"30s"`.
    #[serde(default = "default_tcp_handshake", with = "humantime_serde")]
    pub tcp_handshake: Duration,
    /// Idle timeout of a TCP connection after a FIN or RST. Default `"10s"`.
    #[serde(default = "default_tcp_closing", with = "humantime_serde")]
    pub tcp_closing: Duration,
    /// Idle timeout of a UDP flow. Default `"60s"`.
    #[serde(default = "default_udp", with = "humantime_serde")]
    pub udp: Duration,
    /// Idle timeout of an ICMP echo flow. Default `"10s"`.
    #[serde(default = "default_icmp", with = "humantime_serde")]
    pub icmp: Duration,
    /// How often the agent reads the table to count the live flows for `/metrics`.
    /// Default `"5s"`.
    #[serde(default = "default_sweep", with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl FlowsConfig {
    /// How many entries one read of the table may visit: the table changes while it is
    /// read, and an entry that vanishes under the reader restarts the kernel's iteration.
    pub fn read_limit(&self) -> usize {
        self.max as usize * 2
    }
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            max: default_max_flows(),
            tcp_established: default_tcp_established(),
            tcp_handshake: default_tcp_handshake(),
            tcp_closing: default_tcp_closing(),
            udp: default_udp(),
            icmp: default_icmp(),
            sweep_interval: default_sweep(),
        }
    }
}

fn default_max_flows() -> u32 {
    lb_common::DEFAULT_MAX_FLOWS
}

fn default_tcp_established() -> Duration {
    Duration::from_secs(3 * 3600)
}

fn default_tcp_handshake() -> Duration {
    Duration::from_secs(30)
}

fn default_tcp_closing() -> Duration {
    Duration::from_secs(10)
}

fn default_udp() -> Duration {
    Duration::from_secs(60)
}

fn default_icmp() -> Duration {
    Duration::from_secs(10)
}

fn default_sweep() -> Duration {
    Duration::from_secs(5)
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("valid default address")
}

/// Attachment mode of the XDP program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode; falls back to generic mode with a warning if the driver refuses.
    #[default]
    Native,
    /// Generic (SKB) mode: works on any NIC, slower.
    Skb,
}

/// A NIC the program runs on.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name, as `ip link` shows it.
    pub name: String,
    /// What is behind it. Default: `backend` when a backend is reached through it, else
    /// `client`.
    pub role: Option<Role>,
}

/// What is behind a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Clients: ARP requests for VIPs are answered here.
    Client,
    /// Backends: their replies are rewritten back to the VIP.
    Backend,
    /// Both (one-armed set-ups).
    Both,
}

/// One service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Free-text name, unique, used in logs, metrics and the control endpoint.
    pub name: String,
    /// The virtual IP clients connect to.
    pub vip: Ipv4Addr,
    /// `tcp` or `udp`; absent: every protocol the dataplane rewrites (TCP, UDP, ICMP echo).
    pub protocol: Option<Protocol>,
    /// Destination port; needs `protocol`. Absent: every port.
    pub port: Option<u16>,
    /// Two or more backends; the highest `priority` that is healthy is active.
    pub backends: Vec<BackendConfig>,
    /// Health checks of every backend (a backend may override them). Default: `link`, plus
    /// `tcp` for a TCP service with a port.
    pub health: Option<HealthConfig>,
    /// Fail back to a higher-priority backend once it is healthy again (it has passed
    /// `rise` checks, and `failback_delay` has passed). Default true.
    #[serde(default = "default_true")]
    pub preempt: bool,
    /// How long a recovered higher-priority backend must stay healthy before traffic moves
    /// back to it, for example `"30s"`. Default `"0s"`.
    #[serde(default, with = "humantime_serde")]
    pub failback_delay: Duration,
    /// Every backend down: `"keep-last"` (default) keeps sending to the last active one,
    /// `"drop"` drops the service's packets until one is back.
    #[serde(default)]
    pub on_all_down: AllDown,
    /// When the active backend changes while the previous one is still healthy (failback,
    /// `lb activate`, `lb drain`): `"graceful"` (default) lets TCP connections finish on
    /// the backend they started on while new ones go to the new active backend;
    /// `"immediate"` moves every flow at once. UDP and ICMP always follow at once.
    #[serde(default)]
    pub failback: Failback,
    /// With graceful failback, the longest TCP connections may stay on a backend that is no
    /// longer active, for example `"10m"`; then they follow the active backend. Default:
    /// until they end (FIN/RST) or idle out.
    #[serde(default, with = "humantime_serde::option")]
    pub drain_limit: Option<Duration>,
}

fn default_true() -> bool {
    true
}

/// Health checking of a backend. Parameters mean what they mean in keepalived.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// The checks; a backend is healthy when all of them pass. For example
    /// `[{ type = "link" }, { type = "tcp" }]`.
    pub checks: Vec<CheckConfig>,
    /// Time between two probes of one check, down to `"1ms"`. Default `"100ms"`.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long a probe may take before it counts as failed. Default: the interval.
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Consecutive successes that make a down backend up. Default 3.
    #[serde(default = "default_count")]
    pub rise: u32,
    /// Consecutive failures that make an up backend down. Default 3.
    #[serde(default = "default_count")]
    pub fall: u32,
}

fn default_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_count() -> u32 {
    3
}

/// One kind of health check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CheckConfig {
    /// Carrier of the NIC the backend is reached through, from netlink events: instant.
    Link,
    /// ICMP echo to the backend.
    Icmp,
    /// TCP connect to `port` (default: the service's port).
    Tcp {
        /// Port; default the service's port.
        port: Option<u16>,
    },
    /// HTTP GET of `path` on `port`, expecting `status`.
    Http {
        /// Port; default the service's port, else 80.
        port: Option<u16>,
        /// Path. Default `/`.
        #[serde(default = "default_path")]
        path: String,
        /// Expected status code. Default 200.
        #[serde(default = "default_status")]
        status: u16,
    },
    /// UDP request `send` to `port`; any reply passes, or one starting with `expect`.
    Udp {
        /// Port; default the service's port.
        port: Option<u16>,
        /// Request payload.
        send: String,
        /// Expected start of the reply.
        expect: Option<String>,
    },
}

fn default_path() -> String {
    "/".to_string()
}

fn default_status() -> u16 {
    200
}

impl CheckConfig {
    /// The name used in metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            CheckConfig::Link => "link",
            CheckConfig::Icmp => "icmp",
            CheckConfig::Tcp { .. } => "tcp",
            CheckConfig::Http { .. } => "http",
            CheckConfig::Udp { .. } => "udp",
        }
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One backend of a service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Free-text name (for example `master`, `slave`), unique within the service.
    pub name: String,
    /// The backend's IPv4 address.
    pub ip: Ipv4Addr,
    /// Higher wins. Ties keep the order of the file.
    #[serde(default)]
    pub priority: i32,
    /// The backend's MAC (or its next hop's), `aa:bb:cc:dd:ee:ff`. Default: looked up in
    /// the neighbour table (resolved with ARP if missing).
    pub mac: Option<String>,
    /// The NIC the backend is reached through. Default: from the routing table.
    pub iface: Option<String>,
    /// Health checks of this backend, replacing the service's.
    pub health: Option<HealthConfig>,
}

impl Config {
    /// Reads and parses `path`; the error names the file, the line and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }
}
