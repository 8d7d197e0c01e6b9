//! The map writer: the only code that changes what the XDP program does.
//!
//! [`MapWriter::write_plan`] fills every map from a [`Plan`]; [`MapWriter::set_active`] is the
//! failover itself — one write of one `u32` into the `ACTIVE` array, which the program reads
//! on every packet, so the packet after the write already goes to the new backend.
//! [`MapWriter::set_keep`] tells the program how long a backend that is no longer active
//! keeps its TCP connections (graceful failback and drain).

use std::{collections::BTreeMap, sync::Mutex};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, DevMap, HashMap, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    iface_flags, map_names, proto, service_flags, vip_bit, Backend, EndpointKey, Flow, FlowKey,
    FlowSettings, Iface, ServiceValue, Traffic, VipInfo, KEEP_FOREVER, MAX_IFINDEX, NO_BACKEND,
};

use crate::{
    config::{Failback, FlowsConfig, Protocol, Role},
    plan::{Plan, PlannedService},
};

/// Owned handles on every map of the program.
///
/// Shared (`Arc`) between the failover engine, which flips `ACTIVE` and `KEEP` through
/// `&self`, the flow census, and the metrics and status readers.
pub struct MapWriter {
    services: HashMap<MapData, EndpointKey, ServiceValue>,
    active: Mutex<Array<MapData, u32>>,
    pub(super) backends: Array<MapData, Backend>,
    keep: Mutex<Array<MapData, u64>>,
    vips: HashMap<MapData, [u8; 4], VipInfo>,
    vip_bits: Array<MapData, u64>,
    ifaces: Array<MapData, Iface>,
    local_addrs: HashMap<MapData, [u8; 4], u8>,
    pub(super) settings: Array<MapData, FlowSettings>,
    tx_ports: DevMap<MapData>,
    /// The connection table (read by [`super::flows`]).
    pub(super) flows: Mutex<HashMap<MapData, FlowKey, Flow>>,
    /// Per-backend traffic counters.
    pub traffic: PerCpuArray<MapData, Traffic>,
    /// Per-NIC action counters.
    pub actions: PerCpuArray<MapData, u64>,
    /// Counted dataplane decisions, indexed by `lb_common::Event`.
    pub events: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for MapWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapWriter")
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object file"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn protocol_number(protocol: Option<Protocol>) -> u8 {
    match protocol {
        None => proto::ANY,
        Some(Protocol::Tcp) => proto::TCP,
        Some(Protocol::Udp) => proto::UDP,
    }
}

/// The timeouts of `[flows]` as the program reads them.
pub fn flow_settings(flows: &FlowsConfig) -> FlowSettings {
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    FlowSettings {
        tcp_established_ns: ns(flows.tcp_established),
        tcp_handshake_ns: ns(flows.tcp_handshake),
        tcp_closing_ns: ns(flows.tcp_closing),
        udp_ns: ns(flows.udp),
        icmp_ns: ns(flows.icmp),
    }
}

/// Now on the clock the program reads (`bpf_ktime_get_coarse_ns`), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl MapWriter {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(MapWriter {
            services: take(ebpf, map_names::SERVICES)?,
            active: Mutex::new(take(ebpf, map_names::ACTIVE)?),
            backends: take(ebpf, map_names::BACKENDS)?,
            keep: Mutex::new(take(ebpf, map_names::KEEP)?),
            vips: take(ebpf, map_names::VIPS)?,
            vip_bits: take(ebpf, map_names::VIP_BITS)?,
            ifaces: take(ebpf, map_names::IFACES)?,
            local_addrs: take(ebpf, map_names::LOCAL_ADDRS)?,
            settings: take(ebpf, map_names::SETTINGS)?,
            tx_ports: take(ebpf, map_names::TX_PORTS)?,
            flows: Mutex::new(take(ebpf, map_names::FLOWS)?),
            traffic: take(ebpf, map_names::TRAFFIC)?,
            actions: take(ebpf, map_names::ACTIONS)?,
            events: take(ebpf, map_names::EVENTS)?,
        })
    }

    /// Writes the whole plan; each service starts on its highest-priority backend.
    ///
    /// The NICs are written last, so the program ignores traffic until everything it could
    /// look up is in place.
    pub fn write_plan(&mut self, plan: &Plan) -> Result<()> {
        self.settings
            .set(0, flow_settings(&plan.flows), 0)
            .context("cannot write the connection table's timeouts")?;
        for ip in &plan.local_addresses {
            self.local_addrs
                .insert(ip.octets(), 1, 0)
                .with_context(|| format!("cannot write local address {ip}"))?;
        }
        let mut vips: BTreeMap<[u8; 4], u32> = BTreeMap::new();
        for service in &plan.services {
            self.write_service(service)?;
            *vips.entry(service.vip.octets()).or_default() += 1;
        }
        // ICMP echo to a VIP goes to the first service on that VIP, unless one takes every
        // protocol (its wildcard key already matches echo).
        for service in &plan.services {
            let vip = service.vip.octets();
            let takes_all = plan
                .services
                .iter()
                .any(|s| s.vip == service.vip && s.protocol.is_none());
            let echo = EndpointKey::new(vip, proto::ICMP, [0, 0]);
            if takes_all || self.services.get(&echo, 0).is_ok() {
                continue;
            }
            self.services
                .insert(echo, service_value(service), 0)
                .with_context(|| format!("cannot write the echo entry of {}", service.name))?;
        }
        for (vip, services) in vips {
            self.vips
                .insert(vip, VipInfo { services }, 0)
                .context("cannot write a VIP")?;
            let (entry, bit) = vip_bit(&vip);
            let bits = self.vip_bits.get(&entry, 0)?;
            self.vip_bits
                .set(entry, bits | bit, 0)
                .context("cannot write a VIP's bit")?;
        }
        for iface in &plan.interfaces {
            if iface.ifindex >= MAX_IFINDEX {
                bail!(
                    "interface {} has index {}; the dataplane serves indexes below {MAX_IFINDEX}",
                    iface.name,
                    iface.ifindex
                );
            }
            self.tx_ports
                .set(iface.ifindex, iface.ifindex, None, 0)
                .with_context(|| format!("cannot add {} to the redirect map", iface.name))?;
        }
        for iface in &plan.interfaces {
            let flags = match iface.role {
                Role::Client => iface_flags::CLIENT,
                Role::Backend => iface_flags::BACKEND,
                Role::Both => iface_flags::CLIENT | iface_flags::BACKEND,
            };
            let value = Iface {
                mac: iface.mac,
                flags,
                slot: iface.slot,
            };
            self.ifaces.set(iface.ifindex, value, 0)?;
        }
        Ok(())
    }

    fn write_service(&mut self, service: &PlannedService) -> Result<()> {
        let vip = service.vip.octets();
        let proto = protocol_number(service.protocol);
        let port = service.port.unwrap_or(0).to_be_bytes();
        for backend in &service.backends {
            let value = Backend {
                ip: backend.ip.octets(),
                mac: backend.mac,
                egress_mac: backend.egress_mac,
                ifindex: backend.ifindex,
            };
            self.backends.set(backend.index, value, 0)?;
            self.set_keep(backend.index, KEEP_FOREVER)?;
        }
        let first = service.backends.first().map_or(NO_BACKEND, |b| b.index);
        self.set_active(service.id, first)?;
        let key = EndpointKey::new(vip, proto, port);
        self.services
            .insert(key, service_value(service), 0)
            .with_context(|| format!("cannot write service {}", service.name))?;
        Ok(())
    }

    /// Makes backend `backend` (a global index, or [`NO_BACKEND`]) the one serving service
    /// `service`: a single map write.
    pub fn set_active(&self, service: u32, backend: u32) -> Result<()> {
        self.active
            .lock()
            .expect("ACTIVE map lock")
            .set(service, backend, 0)
            .with_context(|| format!("cannot write the active backend of service {service}"))
    }

    /// The backend index the program currently uses for `service`.
    pub fn active(&self, service: u32) -> Result<u32> {
        Ok(self
            .active
            .lock()
            .expect("ACTIVE map lock")
            .get(&service, 0)?)
    }

    /// Lets backend `backend` keep its sticky (graceful) TCP flows until `until` on the
    /// [`monotonic_ns`] clock: [`KEEP_FOREVER`] for as long as they last, 0 to move them to
    /// the active backend at their next packet. One map write.
    pub fn set_keep(&self, backend: u32, until: u64) -> Result<()> {
        self.keep
            .lock()
            .expect("KEEP map lock")
            .set(backend, until, 0)
            .with_context(|| format!("cannot write the keep deadline of backend {backend}"))
    }
}

fn service_value(service: &PlannedService) -> ServiceValue {
    let flags = match service.policy.failback {
        Failback::Graceful => service_flags::GRACEFUL,
        Failback::Immediate => 0,
    };
    ServiceValue {
        id: service.id,
        flags,
    }
}
