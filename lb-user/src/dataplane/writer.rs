//! The map writer: the only code that changes what the XDP program does.
//!
//! [`MapWriter::apply_plan`] (in [`super::apply`]) writes a [`Plan`](crate::plan::Plan) into every map;
//! [`MapWriter::set_active`] is the failover itself — one write of one `u32` into the `ACTIVE` array, which the program reads
//! on every packet, so the packet after the write already goes to the new backend.
//! [`MapWriter::set_keep`] tells the program how long a backend that is no longer active
//! keeps its TCP connections (graceful failback and drain).
//! [`MapWriter::set_drained`] records the operator's drain in `ADMIN`, which only the agent
//! reads: pinned with the rest, it tells a restarted agent what the operator decided.
//! [`MapWriter::set_role`] makes this host the active or the standby host of a pair: one
//! write of one `u32` into `ROLE`.

use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, DevMap, HashMap, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    admin_flags, host_role, map_names, Backend, EndpointKey, Flow, FlowKey, FlowSettings, Iface,
    Reply, ServiceValue, Traffic, VipInfo,
};

use crate::config::{FlowsConfig, HostRole};

/// Owned handles on every map of the program.
///
/// Shared (`Arc`) between the failover engine, which flips `ACTIVE` and `KEEP` through
/// `&self`, the flow census, and the metrics and status readers.
pub struct MapWriter {
    /// The maps only a plan writes (see [`super::apply`]).
    pub(super) plan_maps: Mutex<PlanMaps>,
    pub(super) active: Mutex<Array<MapData, u32>>,
    pub(super) backends: Mutex<Array<MapData, Backend>>,
    pub(super) keep: Mutex<Array<MapData, u64>>,
    /// The operator's decisions per backend (`lb drain`), kept with the pins.
    pub(super) admin: Mutex<Array<MapData, u32>>,
    /// The connection table (read by [`super::flows`]).
    pub(super) flows: Mutex<HashMap<MapData, FlowKey, Flow>>,
    /// The reply index of the connection table.
    pub(super) replies: Mutex<HashMap<MapData, FlowKey, Reply>>,
    /// Per-backend traffic counters.
    pub traffic: PerCpuArray<MapData, Traffic>,
    /// Per-NIC action counters.
    pub actions: PerCpuArray<MapData, u64>,
    /// Counted dataplane decisions, indexed by `lb_common::Event`.
    pub events: PerCpuArray<MapData, u64>,
    /// This host's role in a pair.
    pub(super) role: Mutex<Array<MapData, u32>>,
}

/// The maps that change only when a plan is written: under one lock, so that a reload's
/// write and a reader never interleave.
pub(super) struct PlanMaps {
    pub(super) services: HashMap<MapData, EndpointKey, ServiceValue>,
    pub(super) vips: HashMap<MapData, [u8; 4], VipInfo>,
    pub(super) vip_bits: Array<MapData, u64>,
    pub(super) ifaces: Array<MapData, Iface>,
    pub(super) local_addrs: HashMap<MapData, [u8; 4], u8>,
    pub(super) settings: Array<MapData, FlowSettings>,
    pub(super) tx_ports: DevMap<MapData>,
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

/// The timeouts of `[flows]` as the program reads them; `sync`: whether the program
/// reports every flow it writes, for the pair peer.
pub fn flow_settings(flows: &FlowsConfig, sync: bool) -> FlowSettings {
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    FlowSettings {
        tcp_established_ns: ns(flows.tcp_established),
        tcp_handshake_ns: ns(flows.tcp_handshake),
        tcp_closing_ns: ns(flows.tcp_closing),
        udp_ns: ns(flows.udp),
        icmp_ns: ns(flows.icmp),
        sync: u64::from(sync),
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
            plan_maps: Mutex::new(PlanMaps {
                services: take(ebpf, map_names::SERVICES)?,
                vips: take(ebpf, map_names::VIPS)?,
                vip_bits: take(ebpf, map_names::VIP_BITS)?,
                ifaces: take(ebpf, map_names::IFACES)?,
                local_addrs: take(ebpf, map_names::LOCAL_ADDRS)?,
                settings: take(ebpf, map_names::SETTINGS)?,
                tx_ports: take(ebpf, map_names::TX_PORTS)?,
            }),
            active: Mutex::new(take(ebpf, map_names::ACTIVE)?),
            backends: Mutex::new(take(ebpf, map_names::BACKENDS)?),
            keep: Mutex::new(take(ebpf, map_names::KEEP)?),
            admin: Mutex::new(take(ebpf, map_names::ADMIN)?),
            flows: Mutex::new(take(ebpf, map_names::FLOWS)?),
            replies: Mutex::new(take(ebpf, map_names::REPLIES)?),
            traffic: take(ebpf, map_names::TRAFFIC)?,
            actions: take(ebpf, map_names::ACTIONS)?,
            events: take(ebpf, map_names::EVENTS)?,
            role: Mutex::new(take(ebpf, map_names::ROLE)?),
        })
    }

    /// Makes backend `backend` (a global index, or [`NO_BACKEND`](lb_common::NO_BACKEND)) the one serving service
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
    /// [`monotonic_ns`] clock: [`KEEP_FOREVER`](lb_common::KEEP_FOREVER) for as long as they last, 0 to move them to
    /// the active backend at their next packet. One map write.
    pub fn set_keep(&self, backend: u32, until: u64) -> Result<()> {
        self.keep
            .lock()
            .expect("KEEP map lock")
            .set(backend, until, 0)
            .with_context(|| format!("cannot write the keep deadline of backend {backend}"))
    }

    /// Records whether backend `backend` is drained by the operator. One map write.
    pub fn set_drained(&self, backend: u32, drained: bool) -> Result<()> {
        let flags = if drained { admin_flags::DRAINED } else { 0 };
        self.admin
            .lock()
            .expect("ADMIN map lock")
            .set(backend, flags, 0)
            .with_context(|| format!("cannot record the drain of backend {backend}"))
    }

    /// Whether backend `backend` is drained by the operator, as the maps record it.
    pub fn drained(&self, backend: u32) -> Result<bool> {
        let flags = self
            .admin
            .lock()
            .expect("ADMIN map lock")
            .get(&backend, 0)
            .with_context(|| format!("cannot read the drain of backend {backend}"))?;
        Ok(flags & admin_flags::DRAINED != 0)
    }

    /// Makes this host `role` in its pair: the next packet is served (active) or not
    /// (standby). One map write.
    pub fn set_role(&self, role: HostRole) -> Result<()> {
        let value = match role {
            HostRole::Active => host_role::ACTIVE,
            HostRole::Standby => host_role::STANDBY,
        };
        self.role
            .lock()
            .expect("ROLE map lock")
            .set(0, value, 0)
            .context("cannot write this host's role")
    }

    /// This host's role as the program reads it.
    pub fn role(&self) -> Result<HostRole> {
        let value = self
            .role
            .lock()
            .expect("ROLE map lock")
            .get(&0, 0)
            .context("cannot read this host's role")?;
        Ok(if value == host_role::STANDBY {
            HostRole::Standby
        } else {
            HostRole::Active
        })
    }
}
