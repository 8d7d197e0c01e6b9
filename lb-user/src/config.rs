//! The configuration file (TOML), as the operator writes it.
//!
//! Unknown keys are errors, so a typo never silently changes behaviour. See
//! `examples/lb.toml` for a complete, commented example.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Default address of the control and metrics endpoint.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9100";

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
    /// Two or more backends; the highest `priority` starts active.
    pub backends: Vec<BackendConfig>,
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
    /// The backend's MAC (or its next hop's), `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The NIC the backend is reached through.
    pub iface: String,
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
