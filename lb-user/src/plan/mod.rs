//! The plan: a [`Config`] checked for consistency and resolved against this host's NICs.
//!
//! [`validate`] needs nothing but the config (so `lb check-config` and the tests can run it
//! anywhere); [`Plan::resolve`] then asks the kernel for each NIC's index and MAC.

mod numbering;

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use lb_common::{proto, EndpointKey, MAX_BACKENDS, MAX_IFACES, MAX_SERVICES};
use serde::Serialize;

pub use numbering::Numbering;

use crate::{
    config::{
        CheckConfig, Config, Failback, FlowsConfig, HealthConfig, PairConfig, ProberConfig,
        Protocol, Role, ServiceConfig,
    },
    failover::policy::Policy,
    net::{self, Link, Netlink},
};

/// A NIC the program is attached to.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedInterface {
    /// Name.
    pub name: String,
    /// Index in this namespace.
    pub ifindex: u32,
    /// Its MAC.
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    /// What is behind it.
    pub role: Role,
    /// Dense slot for per-NIC counters.
    pub slot: u32,
}

/// A service with its backends in priority order.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedService {
    /// Dense id (index into the dataplane's `ACTIVE` map).
    pub id: u32,
    /// Name from the config.
    pub name: String,
    /// Virtual IP.
    pub vip: Ipv4Addr,
    /// Protocol, if the service names one.
    pub protocol: Option<Protocol>,
    /// Port, if the service names one.
    pub port: Option<u16>,
    /// Backends, highest priority first.
    pub backends: Vec<PlannedBackend>,
    /// Failover policy.
    #[serde(skip)]
    pub policy: Policy,
}

impl PlannedService {
    /// The service's key in the dataplane's `SERVICES` map.
    pub fn endpoint_key(&self) -> EndpointKey {
        EndpointKey::new(
            self.vip.octets(),
            protocol_number(self.protocol),
            self.port.unwrap_or(0).to_be_bytes(),
        )
    }
}

/// The IP protocol number of a service's protocol ([`proto::ANY`] for every protocol).
pub fn protocol_number(protocol: Option<Protocol>) -> u8 {
    match protocol {
        None => proto::ANY,
        Some(Protocol::Tcp) => proto::TCP,
        Some(Protocol::Udp) => proto::UDP,
    }
}

/// A backend and how it is reached.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedBackend {
    /// Global index (into the dataplane's `BACKENDS` map).
    pub index: u32,
    /// Name from the config.
    pub name: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Priority from the config.
    pub priority: i32,
    /// Destination MAC (all zero while unknown).
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    /// Whether `mac` is known: from the config, the neighbour table or ARP at start, or a
    /// running dataplane's pinned maps. A backend whose MAC is unknown is down until its
    /// MAC is resolved.
    pub mac_known: bool,
    /// Whether `mac` was given in the config: it is then never replaced by what the
    /// neighbour table says.
    pub mac_fixed: bool,
    /// The address whose MAC `mac` is: the backend's, or its gateway's.
    pub next_hop: Ipv4Addr,
    /// NIC it is reached through.
    pub iface: String,
    /// That NIC's index.
    pub ifindex: u32,
    /// That NIC's MAC (the rewritten source MAC).
    #[serde(serialize_with = "serialize_mac")]
    pub egress_mac: [u8; 6],
    /// How its health is checked.
    pub health: PlannedHealth,
}

/// Resolved health checking of one backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedHealth {
    /// The checks, ports filled in.
    pub checks: Vec<CheckConfig>,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Probe timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes to turn up.
    pub rise: u32,
    /// Failures to turn down.
    pub fall: u32,
}

/// The health checking a service gets when its config names none: `link`, plus `tcp` for a
/// TCP service with a port.
pub fn default_health(service: &ServiceConfig) -> HealthConfig {
    let mut checks = vec![CheckConfig::Link];
    if service.protocol == Some(Protocol::Tcp) && service.port.is_some() {
        checks.push(CheckConfig::Tcp { port: None });
    }
    HealthConfig {
        checks,
        interval: Duration::from_millis(100),
        timeout: None,
        rise: 3,
        fall: 3,
    }
}

/// Checks a health config and fills every check's port in.
fn plan_health(service: &ServiceConfig, health: &HealthConfig, at: &str) -> Result<PlannedHealth> {
    if health.checks.is_empty() {
        bail!("{at}: health.checks is empty (use at least [{{ type = \"link\" }}])");
    }
    if health.interval < Duration::from_millis(1) {
        bail!("{at}: health.interval must be at least 1ms");
    }
    let timeout = health.timeout.unwrap_or(health.interval);
    if timeout.is_zero() {
        bail!("{at}: health.timeout must be more than 0");
    }
    if health.rise == 0 || health.fall == 0 {
        bail!("{at}: health.rise and health.fall must be at least 1");
    }
    let port_of = |port: &Option<u16>, kind: &str| -> Result<Option<u16>> {
        match port.or(service.port) {
            Some(0) => bail!("{at}: {kind} check: port must be 1-65535"),
            Some(port) => Ok(Some(port)),
            None => bail!("{at}: {kind} check needs a port (the service has none)"),
        }
    };
    let mut checks = Vec::new();
    for check in &health.checks {
        checks.push(match check {
            CheckConfig::Link => CheckConfig::Link,
            CheckConfig::Icmp => CheckConfig::Icmp,
            CheckConfig::Tcp { port } => CheckConfig::Tcp {
                port: port_of(port, "tcp")?,
            },
            CheckConfig::Http { port, path, status } => CheckConfig::Http {
                port: match port.or(service.port).unwrap_or(80) {
                    0 => bail!("{at}: http check: port must be 1-65535"),
                    port => Some(port),
                },
                path: if path.starts_with('/') {
                    path.clone()
                } else {
                    bail!("{at}: http check: path must start with /")
                },
                status: *status,
            },
            CheckConfig::Udp { port, send, expect } => CheckConfig::Udp {
                port: port_of(port, "udp")?,
                send: send.clone(),
                expect: expect.clone(),
            },
        });
    }
    if checks.iter().filter(|c| c.name() == "link").count() > 1 {
        bail!("{at}: the link check is listed twice");
    }
    Ok(PlannedHealth {
        checks,
        interval: health.interval,
        timeout,
        rise: health.rise,
        fall: health.fall,
    })
}

/// Everything the dataplane is configured with.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// NICs, in slot order.
    pub interfaces: Vec<PlannedInterface>,
    /// Services, in id order.
    pub services: Vec<PlannedService>,
    /// The connection table's size and timeouts.
    pub flows: FlowsConfig,
    /// The switch host's own addresses, which are never accepted as clients.
    pub local_addresses: Vec<Ipv4Addr>,
    /// Scheduling of the thread that runs the checks.
    pub prober: ProberConfig,
    /// Pair mode, when this host is one of a pair.
    pub pair: Option<PairConfig>,
}

impl Plan {
    /// Whether this host streams its connection table to a pair peer (and so the program
    /// reports the flows it writes).
    pub fn syncs_flows(&self) -> bool {
        self.pair.as_ref().is_some_and(|pair| pair.peer.is_some())
    }
}

/// The plan in force, shared by the readers that outlive a reload (the metrics collector,
/// the connection-table sweep, the endpoint): a reload swaps it here, in one place.
#[derive(Debug, Clone)]
pub struct CurrentPlan(Arc<RwLock<Arc<Plan>>>);

impl CurrentPlan {
    /// Shares `plan`.
    pub fn new(plan: Plan) -> Self {
        CurrentPlan(Arc::new(RwLock::new(Arc::new(plan))))
    }

    /// The plan in force now.
    pub fn get(&self) -> Arc<Plan> {
        self.0.read().expect("plan lock").clone()
    }

    /// Puts `plan` in force.
    pub fn set(&self, plan: Plan) {
        *self.0.write().expect("plan lock") = Arc::new(plan);
    }
}

/// Checks the `[flows]` table.
fn validate_flows(flows: &FlowsConfig) -> Result<()> {
    if !(MIN_FLOWS..=MAX_FLOWS).contains(&flows.max) {
        bail!(
            "flows.max = {}: must be {MIN_FLOWS} to {MAX_FLOWS}",
            flows.max
        );
    }
    for (key, value) in [
        ("tcp_established", flows.tcp_established),
        ("tcp_handshake", flows.tcp_handshake),
        ("tcp_closing", flows.tcp_closing),
        ("udp", flows.udp),
        ("icmp", flows.icmp),
        ("sweep_interval", flows.sweep_interval),
    ] {
        if value < Duration::from_secs(1) {
            bail!("flows.{key} = {value:?}: must be at least 1s");
        }
    }
    Ok(())
}

/// Checks the `[prober]` table.
fn validate_prober(prober: &ProberConfig) -> Result<()> {
    if let Some(priority) = prober.realtime_priority {
        if !(1..=99).contains(&priority) {
            bail!("prober.realtime_priority = {priority}: must be 1 to 99");
        }
    }
    if !(-20..=19).contains(&prober.nice) {
        bail!("prober.nice = {}: must be -20 to 19", prober.nice);
    }
    Ok(())
}

/// Checks the `[pair]` table.
fn validate_pair(pair: &PairConfig) -> Result<()> {
    if pair.gratuitous_arps > 100 {
        bail!(
            "pair.gratuitous_arps = {}: must be 0 to 100",
            pair.gratuitous_arps
        );
    }
    let interval = pair.gratuitous_arp_interval;
    if interval < Duration::from_millis(1) || interval > Duration::from_secs(10) {
        bail!("pair.gratuitous_arp_interval = {interval:?}: must be 1ms to 10s");
    }
    match (pair.sync_listen, pair.peer) {
        (Some(listen), Some(peer)) => {
            if listen == peer {
                bail!("pair.peer = {peer} is this agent's own pair.sync_listen: give the other host's");
            }
            if listen.ip().is_unspecified() || peer.ip().is_unspecified() {
                bail!(
                    "pair.sync_listen ({listen}) and pair.peer ({peer}) must be addresses of the \
                     hosts on the pair link, not {}: the peer accepts only the stream that \
                     comes from its pair.peer",
                    if listen.ip().is_unspecified() {
                        listen.ip()
                    } else {
                        peer.ip()
                    }
                );
            }
            if listen.is_ipv4() != peer.is_ipv4() {
                bail!("pair.sync_listen ({listen}) and pair.peer ({peer}) must be of one address family");
            }
        }
        (None, None) => {}
        _ => bail!(
            "pair.sync_listen and pair.peer go together: set both (the connection table is \
             copied to the peer) or neither"
        ),
    }
    Ok(())
}

/// The smallest connection table `flows.max` allows.
pub const MIN_FLOWS: u32 = 1024;
/// The largest connection table `flows.max` allows (about 1.3 GiB with the reply index).
pub const MAX_FLOWS: u32 = 16 * 1024 * 1024;

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&net::format_mac(mac))
}

/// A service endpoint as the dataplane keys it: IP, protocol (any when `None`), port (any
/// when `None`).
type EndpointSpec = (Ipv4Addr, Option<Protocol>, Option<u16>);

/// Checks everything that can be checked without the host: names, counts, uniqueness, MACs.
/// Each error names the service and key at fault.
pub fn validate(config: &Config) -> Result<()> {
    if config.services.is_empty() {
        bail!("no service configured: add at least one [[services]] table");
    }
    validate_flows(&config.flows)?;
    validate_prober(&config.prober)?;
    if let Some(pair) = &config.pair {
        validate_pair(pair)?;
    }
    if config.services.len() > MAX_SERVICES as usize {
        bail!(
            "{} services configured, at most {MAX_SERVICES} are supported",
            config.services.len()
        );
    }
    let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
    if backends > MAX_BACKENDS as usize {
        bail!("{backends} backends configured, at most {MAX_BACKENDS} are supported");
    }
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    // Each service's reply key: (service, (backend ip, protocol, port)).
    let mut reverse_keys: Vec<(String, EndpointSpec)> = Vec::new();
    let vips: HashSet<Ipv4Addr> = config.services.iter().map(|s| s.vip).collect();
    for service in &config.services {
        let name = &service.name;
        if name.is_empty() {
            bail!("services.name: a service has an empty name");
        }
        if !names.insert(name.as_str()) {
            bail!("services.name: service {name:?} is defined twice");
        }
        if service.vip.is_unspecified() || service.vip.is_broadcast() || service.vip.is_multicast()
        {
            bail!(
                "service {name:?}: vip {} is not a unicast address",
                service.vip
            );
        }
        if service.drain_limit.is_some() && service.failback == Failback::Immediate {
            bail!(
                "service {name:?}: drain_limit only applies to failback = \"graceful\" \
                 (with \"immediate\" every flow moves at once)"
            );
        }
        if let Some(port) = service.port {
            if service.protocol.is_none() {
                bail!("service {name:?}: port = {port} needs protocol = \"tcp\" or \"udp\"");
            }
            if port == 0 {
                bail!("service {name:?}: port must be 1-65535 (leave it out for every port)");
            }
        }
        if !keys.insert((service.vip, service.protocol, service.port)) {
            bail!(
                "service {name:?}: another service already has vip {}, protocol {:?}, port {:?}",
                service.vip,
                service.protocol,
                service.port
            );
        }
        if service.backends.len() < 2 {
            bail!(
                "service {name:?}: backends: {} backend(s) given, a failover service needs at least 2",
                service.backends.len()
            );
        }
        let mut backend_names = HashSet::new();
        for backend in &service.backends {
            let b = &backend.name;
            if b.is_empty() {
                bail!("service {name:?}: backends.name: a backend has an empty name");
            }
            if !backend_names.insert(b.as_str()) {
                bail!("service {name:?}: backend {b:?} is defined twice");
            }
            if vips.contains(&backend.ip) {
                bail!(
                    "service {name:?}: backend {b:?}: ip {} is also a VIP",
                    backend.ip
                );
            }
            if let Some(mac) = &backend.mac {
                net::parse_mac(mac)
                    .with_context(|| format!("service {name:?}: backend {b:?}: mac"))?;
            }
            if backend.iface.as_deref() == Some("") {
                bail!("service {name:?}: backend {b:?}: iface is empty");
            }
            let health = backend.health.clone().or_else(|| service.health.clone());
            let health = health.unwrap_or_else(|| default_health(service));
            plan_health(
                service,
                &health,
                &format!("service {name:?}: backend {b:?}"),
            )?;
            // Replies are told apart by (backend ip, protocol, port), with wildcards: two
            // services whose keys overlap on one backend would get each other's replies.
            if let Some((other, _)) = reverse_keys.iter().find(|(_, (ip, p, port))| {
                *ip == backend.ip
                    && (p.is_none() || service.protocol.is_none() || *p == service.protocol)
                    && (port.is_none() || service.port.is_none() || *port == service.port)
            }) {
                if other == name {
                    bail!(
                        "service {name:?}: backend ip {} is listed twice",
                        backend.ip
                    );
                }
                bail!(
                    "service {name:?}: backend {b:?} ({}) also serves service {other:?} on an \
                     overlapping protocol and port; its replies could not be told apart \
                     (give the services different ports, or different backend addresses)",
                    backend.ip
                );
            }
            reverse_keys.push((name.clone(), (backend.ip, service.protocol, service.port)));
        }
    }
    let mut iface_names = HashSet::new();
    for iface in &config.interfaces {
        if !iface_names.insert(iface.name.as_str()) {
            bail!("interfaces: {:?} is listed twice", iface.name);
        }
    }
    Ok(())
}

impl Plan {
    /// Validates `config`, adds the NICs named in `extra_ifaces`, finds each backend's NIC
    /// (routing table) and MAC (neighbour table, ARP if needed) where the config does not
    /// give them, and looks every NIC up.
    pub async fn resolve(config: &Config, extra_ifaces: &[String]) -> Result<Plan> {
        validate(config)?;
        let netlink = Netlink::connect()?;
        // NIC name → explicit role, in first-mention order.
        let mut order: Vec<String> = Vec::new();
        let mut explicit: BTreeMap<String, Option<Role>> = BTreeMap::new();
        let mut add = |name: &str, role: Option<Role>, order: &mut Vec<String>| {
            if !explicit.contains_key(name) {
                order.push(name.to_string());
                explicit.insert(name.to_string(), role);
            }
        };
        for iface in &config.interfaces {
            add(&iface.name, iface.role, &mut order);
        }
        for name in extra_ifaces {
            add(name, None, &mut order);
        }
        let mut links: BTreeMap<String, Link> = BTreeMap::new();
        for name in &order {
            let link = netlink
                .link_by_name(name)
                .await
                .with_context(|| format!("interface {name:?}"))?;
            links.insert(name.clone(), link);
        }

        let mut services = Vec::new();
        let mut backend_ifaces: HashSet<String> = HashSet::new();
        let mut next_backend = 0u32;
        for (id, service) in config.services.iter().enumerate() {
            let mut ordered: Vec<_> = service.backends.iter().collect();
            ordered.sort_by_key(|b| std::cmp::Reverse(b.priority));
            let mut backends = Vec::new();
            for backend in ordered {
                let at = format!(
                    "service {:?}: backend {:?} ({})",
                    service.name, backend.name, backend.ip
                );
                let (link, next_hop) = match &backend.iface {
                    Some(name) => {
                        let link = match links.get(name) {
                            Some(link) => link.clone(),
                            None => netlink
                                .link_by_name(name)
                                .await
                                .with_context(|| at.clone())?,
                        };
                        let next_hop = match netlink.route_to(backend.ip).await {
                            Ok((oif, hop)) if oif == link.ifindex => hop,
                            _ => backend.ip,
                        };
                        (link, next_hop)
                    }
                    None => {
                        let (oif, hop) = netlink
                            .route_to(backend.ip)
                            .await
                            .with_context(|| at.clone())?;
                        (
                            netlink
                                .link_by_index(oif)
                                .await
                                .with_context(|| at.clone())?,
                            hop,
                        )
                    }
                };
                let mac = match &backend.mac {
                    Some(mac) => Some(net::parse_mac(mac)?),
                    None => match netlink.resolve_mac(&link, next_hop).await {
                        Ok(mac) => Some(mac),
                        Err(e) => {
                            tracing::warn!(
                                "{at}: {e:#}; it starts down, and its MAC is looked up again \
                                 while it is checked"
                            );
                            None
                        }
                    },
                };
                let health = backend.health.clone().or_else(|| service.health.clone());
                let health = health.unwrap_or_else(|| default_health(service));
                let health = plan_health(service, &health, &at)?;
                backend_ifaces.insert(link.name.clone());
                add(&link.name, None, &mut order);
                links.insert(link.name.clone(), link.clone());
                backends.push(PlannedBackend {
                    index: next_backend,
                    name: backend.name.clone(),
                    ip: backend.ip,
                    priority: backend.priority,
                    mac: mac.unwrap_or_default(),
                    mac_known: mac.is_some(),
                    mac_fixed: backend.mac.is_some(),
                    next_hop,
                    iface: link.name.clone(),
                    ifindex: link.ifindex,
                    egress_mac: link.mac,
                    health,
                });
                next_backend += 1;
            }
            services.push(PlannedService {
                id: id as u32,
                name: service.name.clone(),
                vip: service.vip,
                protocol: service.protocol,
                port: service.port,
                backends,
                policy: Policy {
                    preempt: service.preempt,
                    failback_delay: service.failback_delay,
                    all_down: service.on_all_down,
                    failback: service.failback,
                    drain_limit: service.drain_limit,
                },
            });
        }
        if order.len() > MAX_IFACES as usize {
            bail!(
                "{} interfaces, at most {MAX_IFACES} are supported",
                order.len()
            );
        }
        let interfaces: Vec<PlannedInterface> = order
            .iter()
            .enumerate()
            .map(|(slot, name)| {
                let link = &links[name];
                let behind = backend_ifaces.contains(name);
                let role = match explicit[name] {
                    None if behind => Role::Backend,
                    None => Role::Client,
                    Some(Role::Client) if behind => {
                        return Err(anyhow::anyhow!(
                            "interface {name:?} has role \"client\" but backends are reached \
                         through it: their replies would not be rewritten; use role = \"both\""
                        ))
                    }
                    Some(role) => role,
                };
                Ok(PlannedInterface {
                    name: name.clone(),
                    ifindex: link.ifindex,
                    mac: link.mac,
                    role,
                    slot: slot as u32,
                })
            })
            .collect::<Result<_>>()?;
        if !interfaces
            .iter()
            .any(|i| matches!(i.role, Role::Client | Role::Both))
        {
            bail!("no client-facing interface: name the NIC clients arrive on with --iface or [[interfaces]]");
        }
        let local_addresses = netlink
            .local_ipv4_addresses()
            .await
            .context("cannot read this host's own addresses")?;
        Ok(Plan {
            interfaces,
            services,
            flows: config.flows.clone(),
            local_addresses,
            prober: config.prober.clone(),
            pair: config.pair.clone(),
        })
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Result<&PlannedService> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| {
                let known: Vec<_> = self.services.iter().map(|s| s.name.as_str()).collect();
                format!("no service {name:?} (services: {})", known.join(", "))
            })
    }
}

impl PlannedService {
    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Result<&PlannedBackend> {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| {
                let known: Vec<_> = self.backends.iter().map(|b| b.name.as_str()).collect();
                format!(
                    "service {:?} has no backend {name:?} (backends: {})",
                    self.name,
                    known.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[services]]
        name = "web"
        vip = "198.18.1.100"
        protocol = "tcp"
        port = 80
        backends = [
          { name = "master", ip = "198.18.2.2", priority = 100, mac = "02:00:00:00:02:02", iface = "sw-m" },
          { name = "slave",  ip = "198.18.3.2", priority = 50,  mac = "02:00:00:00:03:02", iface = "sw-s" },
        ]
    "#;

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|c| validate(&c)) {
            Ok(()) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn good_config_validates() {
        validate(&Config::parse(GOOD).unwrap()).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = error_of(&GOOD.replace("port = 80", "port = 80\nweight = 3"));
        assert!(e.contains("unknown field `weight`"), "{e}");
    }

    #[test]
    fn missing_vip_is_named() {
        let e = error_of(&GOOD.replace("vip = \"198.18.1.100\"", ""));
        assert!(e.contains("missing field `vip`"), "{e}");
    }

    #[test]
    fn one_backend_is_refused() {
        let text = GOOD.replace(
            "{ name = \"slave\",  ip = \"198.18.3.2\", priority = 50,  mac = \"02:00:00:00:03:02\", iface = \"sw-s\" },",
            "",
        );
        let e = error_of(&text);
        assert!(e.contains("at least 2"), "{e}");
    }

    #[test]
    fn port_without_protocol_is_refused() {
        let e = error_of(&GOOD.replace("protocol = \"tcp\"", ""));
        assert!(e.contains("needs protocol"), "{e}");
    }

    #[test]
    fn bad_mac_is_named() {
        let e = error_of(&GOOD.replace("02:00:00:00:03:02", "02:00:00:03:02"));
        assert!(e.contains("backend \"slave\": mac"), "{e}");
    }

    #[test]
    fn duplicate_backend_name_is_refused() {
        let e = error_of(&GOOD.replace("name = \"slave\"", "name = \"master\""));
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn the_shipped_example_validates() {
        let text = include_str!("../../../examples/lb.toml");
        validate(&Config::parse(text).unwrap()).unwrap();
    }

    #[test]
    fn health_parameters_are_checked() {
        let with = |health: &str| GOOD.replace("port = 80", &format!("port = 80\n{health}"));
        let e = error_of(&with(r#"health = { checks = [], interval = "10ms" }"#));
        assert!(e.contains("health.checks is empty"), "{e}");
        let e = error_of(&with(
            r#"health = { checks = [{ type = "link" }], interval = "100us" }"#,
        ));
        assert!(e.contains("at least 1ms"), "{e}");
        let e = error_of(&with(r#"health = { checks = [{ type = "smtp" }] }"#));
        assert!(e.contains("unknown variant `smtp`"), "{e}");
        let e = error_of(&with(
            r#"health = { checks = [{ type = "tcp", prot = 80 }] }"#,
        ));
        assert!(e.contains("unknown field `prot`"), "{e}");
        let e = error_of(&with(r#"on_all_down = "panic""#));
        assert!(e.contains("unknown variant `panic`"), "{e}");
    }

    #[test]
    fn a_backend_in_two_services_with_overlapping_ports_is_refused() {
        let second = GOOD.replace("name = \"web\"", "name = \"all\"").replace(
            "vip = \"198.18.1.100\"\n        protocol = \"tcp\"\n        port = 80",
            "vip = \"198.18.1.101\"",
        );
        let e = error_of(&format!("{GOOD}\n{second}"));
        assert!(e.contains("overlapping protocol and port"), "{e}");
        // Distinct ports on the same backend are fine.
        let other_port = GOOD
            .replace("name = \"web\"", "name = \"alt\"")
            .replace("port = 80", "port = 8080");
        validate(&Config::parse(&format!("{GOOD}\n{other_port}")).unwrap()).unwrap();
    }

    #[test]
    fn flow_table_settings_are_checked() {
        let e = error_of(&format!("{GOOD}\n[flows]\nmax = 10\n"));
        assert!(e.contains("flows.max = 10"), "{e}");
        let e = error_of(&format!("{GOOD}\n[flows]\nudp = \"10ms\"\n"));
        assert!(e.contains("flows.udp"), "{e}");
        let e = error_of(&format!("{GOOD}\n[flows]\ntcp = \"1h\"\n"));
        assert!(e.contains("unknown field `tcp`"), "{e}");
        let e = error_of(&GOOD.replace(
            "port = 80",
            "port = 80\nfailback = \"immediate\"\ndrain_limit = \"1m\"",
        ));
        assert!(e.contains("drain_limit only applies"), "{e}");
        let e = error_of(&GOOD.replace("port = 80", "port = 80\nfailback = \"later\""));
        assert!(e.contains("unknown variant `later`"), "{e}");
    }

    #[test]
    fn no_service_is_refused() {
        let e = error_of("metrics_listen = \"127.0.0.1:9100\"\n");
        assert!(e.contains("no service"), "{e}");
    }

    #[test]
    fn the_pair_link_needs_both_ends() {
        let pair = |lines: &str| format!("{GOOD}\n[pair]\n{lines}");
        let both = "sync_listen = \"198.18.9.11:7470\"\npeer = \"198.18.9.12:7470\"\n";
        validate(&Config::parse(&pair(both)).unwrap()).unwrap();
        let e = error_of(&pair("peer = \"198.18.9.12:7470\"\n"));
        assert!(e.contains("go together"), "{e}");
        let e = error_of(&pair(
            "sync_listen = \"198.18.9.11:7470\"\npeer = \"198.18.9.11:7470\"\n",
        ));
        assert!(e.contains("own pair.sync_listen"), "{e}");
        let e = error_of(&pair(
            "sync_listen = \"0.0.0.0:7470\"\npeer = \"198.18.9.12:7470\"\n",
        ));
        assert!(e.contains("not 0.0.0.0"), "{e}");
        let e = error_of(&pair(
            "peer = \"somewhere\"\nsync_listen = \"198.18.9.11:1\"\n",
        ));
        assert!(e.contains("invalid socket address"), "{e}");
    }
}
