//! The map writer: the only code that changes what the XDP program does.
//!
//! [`MapWriter::write_plan`] fills every map from a [`Plan`]; [`MapWriter::set_active`] is the
//! failover itself — one write of one `u32` into the `ACTIVE` array, which the program reads
//! on every packet, so the packet after the write already goes to the new backend.

use std::{collections::BTreeMap, sync::Mutex};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    iface_flags, map_names, proto, Backend, EndpointKey, Iface, Neighbor, ReverseValue,
    ServiceValue, Traffic, VipInfo, NO_BACKEND,
};

use crate::{
    config::{Protocol, Role},
    plan::{Plan, PlannedService},
};

/// Owned handles on every map of the program.
///
/// Shared (`Arc`) between the failover engine, which flips `ACTIVE` through `&self`, and the
/// metrics and status readers.
pub struct MapWriter {
    services: HashMap<MapData, EndpointKey, ServiceValue>,
    active: Mutex<Array<MapData, u32>>,
    backends: Array<MapData, Backend>,
    reverse: HashMap<MapData, EndpointKey, ReverseValue>,
    vips: HashMap<MapData, [u8; 4], VipInfo>,
    ifaces: HashMap<MapData, u32, Iface>,
    tx_ports: DevMapHash<MapData>,
    /// Learned clients (read-only here: for diagnostics).
    pub clients: HashMap<MapData, [u8; 4], Neighbor>,
    /// Per-backend traffic counters.
    pub traffic: PerCpuArray<MapData, Traffic>,
    /// Per-NIC action counters.
    pub actions: PerCpuArray<MapData, u64>,
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

impl MapWriter {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(MapWriter {
            services: take(ebpf, map_names::SERVICES)?,
            active: Mutex::new(take(ebpf, map_names::ACTIVE)?),
            backends: take(ebpf, map_names::BACKENDS)?,
            reverse: take(ebpf, map_names::REVERSE)?,
            vips: take(ebpf, map_names::VIPS)?,
            ifaces: take(ebpf, map_names::IFACES)?,
            tx_ports: take(ebpf, map_names::TX_PORTS)?,
            clients: take(ebpf, map_names::CLIENTS)?,
            traffic: take(ebpf, map_names::TRAFFIC)?,
            actions: take(ebpf, map_names::ACTIONS)?,
        })
    }

    /// Writes the whole plan; each service starts on its highest-priority backend.
    ///
    /// The NICs are written last, so the program ignores traffic until everything it could
    /// look up is in place.
    pub fn write_plan(&mut self, plan: &Plan) -> Result<()> {
        let mut vips: BTreeMap<[u8; 4], u32> = BTreeMap::new();
        for service in &plan.services {
            self.write_service(service)?;
            *vips.entry(service.vip.octets()).or_default() += 1;
        }
        // ICMP echo to a VIP goes to the first service on that VIP, unless one takes every
        // protocol (its wildcard key already matches echo). A backend's echo replies carry
        // the VIP of the first service that claimed its echo key.
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
                .insert(echo, ServiceValue { id: service.id }, 0)
                .with_context(|| format!("cannot write the echo entry of {}", service.name))?;
            for backend in &service.backends {
                let key = EndpointKey::new(backend.ip.octets(), proto::ICMP, [0, 0]);
                if self.reverse.get(&key, 0).is_ok() {
                    continue;
                }
                let value = ReverseValue {
                    vip,
                    backend: backend.index,
                };
                self.reverse.insert(key, value, 0).with_context(|| {
                    format!("cannot write the echo reply entry of {}", backend.name)
                })?;
            }
        }
        for (vip, services) in vips {
            self.vips
                .insert(vip, VipInfo { services }, 0)
                .context("cannot write a VIP")?;
        }
        for iface in &plan.interfaces {
            self.tx_ports
                .insert(iface.ifindex, iface.ifindex, None, 0)
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
            self.ifaces.insert(iface.ifindex, value, 0)?;
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
            let key = EndpointKey::new(backend.ip.octets(), proto, port);
            self.reverse.insert(
                key,
                ReverseValue {
                    vip,
                    backend: backend.index,
                },
                0,
            )?;
        }
        let first = service.backends.first().map_or(NO_BACKEND, |b| b.index);
        self.set_active(service.id, first)?;
        let key = EndpointKey::new(vip, proto, port);
        self.services
            .insert(key, ServiceValue { id: service.id }, 0)
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
}
