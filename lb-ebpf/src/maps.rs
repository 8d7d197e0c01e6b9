//! Every map of the program, in one place, with the lookups the packet path makes.
//!
//! Sizes and value layouts come from `lb_common`, which the agent shares.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Backend, EndpointKey, Iface, Neighbor, ReverseValue, ServiceValue, Traffic, VipInfo,
    ACTIONS_ENTRIES, MAX_BACKENDS, MAX_CLIENTS, MAX_IFACES, MAX_SERVICES, NO_BACKEND,
    TRAFFIC_ENTRIES,
};

/// Service key → service id.
#[map]
pub static SERVICES: HashMap<EndpointKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES * 3, 0);

/// Service id → index of its active backend. The one entry a failover writes.
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

/// Backend index → where and how to send a packet to it.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend address and service port → the VIP its replies must carry.
#[map]
pub static REVERSE: HashMap<EndpointKey, ReverseValue> =
    HashMap::with_max_entries(MAX_BACKENDS * 2, 0);

/// Configured VIPs.
#[map]
pub static VIPS: HashMap<[u8; 4], VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// NICs the program serves.
#[map]
pub static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, 0);

/// Clients seen on the forward path, for sending replies back.
#[map]
pub static CLIENTS: LruHashMap<[u8; 4], Neighbor> = LruHashMap::with_max_entries(MAX_CLIENTS, 0);

/// Egress NICs for `XDP_REDIRECT`.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// Rewritten packets and bytes per backend and direction.
#[map]
pub static TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(TRAFFIC_ENTRIES, 0);

/// Packets per NIC slot and XDP action.
#[map]
pub static ACTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ACTIONS_ENTRIES, 0);

/// Frames dropped because their egress NIC was missing from `TX_PORTS` (one counter).
#[map]
pub static NO_PORT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The configuration of the NIC the frame arrived on, if the agent configured it.
#[inline(always)]
pub fn ingress_iface(ctx: &XdpContext) -> Option<Iface> {
    let ifindex = ctx.ingress_ifindex() as u32;
    IFACES.get_ptr(ifindex).map(|iface| {
        // SAFETY: a pointer from a successful map lookup is valid for this program run; the
        // value is copied out at once.
        unsafe { *iface }
    })
}

/// Whether `ip` is a configured VIP.
#[inline(always)]
pub fn is_vip(ip: &[u8; 4]) -> bool {
    VIPS.get_ptr(ip).is_some()
}

/// The value of the most specific key of `map` that matches `ip`, `protocol` and `port`.
#[inline(always)]
fn most_specific<V: Copy>(
    map: &HashMap<EndpointKey, V>,
    ip: [u8; 4],
    protocol: u8,
    port: [u8; 2],
) -> Option<V> {
    EndpointKey::candidates(ip, protocol, port)
        .iter()
        .find_map(|key| map.get_ptr(key))
        .map(|value| {
            // SAFETY: a pointer from a successful map lookup is valid for this program run;
            // the value is copied out at once.
            unsafe { *value }
        })
}

/// The service a packet to `vip` belongs to.
#[inline(always)]
pub fn service(vip: [u8; 4], protocol: u8, port: [u8; 2]) -> Option<u32> {
    most_specific(&SERVICES, vip, protocol, port).map(|service| service.id)
}

/// The active backend of service `id`, with its index; `None` when no backend is serving.
#[inline(always)]
pub fn active_backend(id: u32) -> Option<(u32, Backend)> {
    let index = *ACTIVE.get(id)?;
    if index == NO_BACKEND {
        return None;
    }
    BACKENDS.get(index).map(|backend| (index, *backend))
}

/// The VIP that replies from `ip:port` must carry, if that is a backend of a service.
#[inline(always)]
pub fn reverse(ip: [u8; 4], protocol: u8, port: [u8; 2]) -> Option<ReverseValue> {
    most_specific(&REVERSE, ip, protocol, port)
}

/// Where the client `ip` was last seen.
#[inline(always)]
pub fn client(ip: &[u8; 4]) -> Option<Neighbor> {
    CLIENTS.get_ptr(ip).map(|value| {
        // SAFETY: valid lookup result, copied out at once.
        unsafe { *value }
    })
}

/// Remembers where client `ip` is, writing only when it moved (most packets read only).
#[inline(always)]
pub fn learn_client(ip: &[u8; 4], seen: &Neighbor) {
    if client(ip).as_ref() != Some(seen) {
        // A full LRU map evicts its oldest entry; an error here only means the next
        // packet of this client tries again.
        let _ = CLIENTS.insert(ip, seen, 0);
    }
}
