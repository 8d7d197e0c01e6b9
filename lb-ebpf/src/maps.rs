//! Every map of the program, in one place, with the lookups the packet path makes.
//!
//! Sizes and value layouts come from `lb_common`, which the agent shares; the agent may
//! resize `FLOWS` and `REPLIES` when it loads the program.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, EndpointKey, Flow, FlowKey, FlowSettings, Iface, Reply, ServiceValue, Traffic,
    VipInfo, ACTIONS_ENTRIES, DEFAULT_MAX_FLOWS, EVENTS as EVENT_COUNT, FLOW_SYNC_BYTES,
    MAX_BACKENDS, MAX_IFINDEX, MAX_LOCAL_ADDRS, MAX_SERVICES, NO_BACKEND, TRAFFIC_ENTRIES,
    VIP_BITS_ENTRIES,
};

/// Service key → service id and flags (each service's own key, plus echo keys).
#[map]
pub static SERVICES: HashMap<EndpointKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES * 2, 0);

/// Service id → index of its active backend. The one entry a failover writes.
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

/// Backend index → where and how to send a packet to it.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend index → until when (monotonic ns) its sticky flows may stay on it.
#[map]
pub static KEEP: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend index → the operator's decisions about it (`lb_common::admin_flags`). Only the
/// agent reads it; it is here so that it is pinned, and so kept, with the rest.
#[map]
pub static ADMIN: Array<u32> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Configured VIPs.
#[map]
pub static VIPS: HashMap<[u8; 4], VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// One bit per low 16 bits of an address, set for each VIP.
#[map]
pub static VIP_BITS: Array<u64> = Array::with_max_entries(VIP_BITS_ENTRIES, 0);

/// NICs the program serves, indexed by ifindex.
#[map]
pub static IFACES: Array<Iface> = Array::with_max_entries(MAX_IFINDEX, 0);

/// The switch host's own addresses: never clients.
#[map]
pub static LOCAL_ADDRS: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// The connection table, keyed as the client sends.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// The reply index, keyed as the backend answers.
#[map]
pub static REPLIES: LruHashMap<FlowKey, Reply> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// The connection table's timeouts (one entry, written by the agent).
#[map]
pub static SETTINGS: Array<FlowSettings> = Array::with_max_entries(1, 0);

/// Egress NICs for `XDP_REDIRECT`.
#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(MAX_IFINDEX, 0);

/// Rewritten packets and bytes per backend and direction.
#[map]
pub static TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(TRAFFIC_ENTRIES, 0);

/// Packets per NIC slot and XDP action.
#[map]
pub static ACTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ACTIONS_ENTRIES, 0);

/// Counted decisions, indexed by `lb_common::Event`.
#[map]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

/// This host's role in a pair (`lb_common::host_role`; one entry).
#[map]
pub static ROLE: Array<u32> = Array::with_max_entries(1, 0);

/// Every flow the program writes (`lb_common::FlowUpdate`), while `SETTINGS` asks for it:
/// the agent streams them to its pair peer.
#[map]
pub static FLOW_SYNC: RingBuf = RingBuf::with_byte_size(FLOW_SYNC_BYTES, 0);

/// Copies out the value a successful lookup pointed to.
#[inline(always)]
fn copy<T: Copy>(value: *const T) -> T {
    // SAFETY: every pointer passed here comes from a successful map lookup, valid for the
    // rest of this program run; the value is copied out at once.
    unsafe { *value }
}

/// The configuration of NIC `ifindex`, if the agent configured it.
#[inline(always)]
pub fn iface(ifindex: u32) -> Option<Iface> {
    let iface = copy(IFACES.get_ptr(ifindex)?);
    (iface.flags != 0).then_some(iface)
}

/// Whether this host is the standby of a pair, which serves no VIP.
#[inline(always)]
pub fn standby() -> bool {
    ROLE.get_ptr(0)
        .is_some_and(|role| copy(role) == lb_common::host_role::STANDBY)
}

/// Whether `ip` is a configured VIP.
#[inline(always)]
pub fn is_vip(ip: &[u8; 4]) -> bool {
    VIPS.get_ptr(ip).is_some()
}

/// Whether `ip` may be a VIP: false for almost every other address, at the cost of an
/// array lookup (no hash).
#[inline(always)]
pub fn may_be_vip(ip: &[u8; 4]) -> bool {
    let (entry, bit) = lb_common::vip_bit(ip);
    VIP_BITS
        .get_ptr(entry)
        .is_some_and(|bits| copy(bits) & bit != 0)
}

/// Whether `ip` is one of the switch host's own addresses.
#[inline(always)]
pub fn is_local(ip: &[u8; 4]) -> bool {
    LOCAL_ADDRS.get_ptr(ip).is_some()
}

/// The service a packet to `vip` belongs to: the most specific of its keys that exists.
#[inline(always)]
pub fn service(vip: [u8; 4], protocol: u8, port: [u8; 2]) -> Option<ServiceValue> {
    EndpointKey::candidates(vip, protocol, port)
        .iter()
        .find_map(|key| SERVICES.get_ptr(key))
        .map(copy)
}

/// Index of the active backend of service `id`; `None` when no backend is serving.
#[inline(always)]
pub fn active(id: u32) -> Option<u32> {
    let index = copy(ACTIVE.get_ptr(id)?);
    (index != NO_BACKEND).then_some(index)
}

/// Backend `index`.
#[inline(always)]
pub fn backend(index: u32) -> Option<Backend> {
    BACKENDS.get_ptr(index).map(copy)
}

/// Until when sticky flows may stay on backend `index` (0: not at all).
#[inline(always)]
pub fn keep_until(index: u32) -> u64 {
    KEEP.get_ptr(index).map_or(0, copy)
}

/// The connection table's timeouts.
#[inline(always)]
pub fn settings() -> Option<FlowSettings> {
    SETTINGS.get_ptr(0).map(copy)
}

/// Whether the agent asked for every flow the program writes (`FlowSettings::sync`): one
/// field read, not a copy of the settings.
#[inline(always)]
pub fn reporting_flows() -> bool {
    SETTINGS.get(0).is_some_and(|settings| settings.sync != 0)
}

/// The flow `key` belongs to, for reading and updating in place.
#[inline(always)]
pub fn flow(key: &FlowKey) -> Option<*mut Flow> {
    FLOWS.get_ptr_mut(key)
}

/// The flow a reply with `key` answers.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Option<Reply> {
    REPLIES.get_ptr(key).map(copy)
}

/// Writes flow `key` (served by the backend at `backend_ip`) and its reply index entry.
#[inline(always)]
pub fn insert_flow(key: &FlowKey, flow: &Flow, backend_ip: [u8; 4]) -> Result<(), i32> {
    FLOWS.insert(key, flow, 0)?;
    insert_reply(key, flow.backend, backend_ip)
}

/// Writes (or refreshes) the reply index entry of flow `key` served by backend `index`.
#[inline(always)]
pub fn insert_reply(key: &FlowKey, index: u32, backend_ip: [u8; 4]) -> Result<(), i32> {
    let reply = Reply {
        flow: *key,
        backend: index,
    };
    REPLIES.insert(key.answered_by(backend_ip), reply, 0)
}

/// Whether flow `key` may take the reply key its answers from `backend_ip` carry: it is
/// free, already the flow's, or left by a flow that is gone or has expired at `now`. Two
/// live flows cannot share one (their replies could not be told apart).
#[inline(always)]
pub fn reply_key_free(key: &FlowKey, backend_ip: [u8; 4], now: u64) -> bool {
    let Some(holder) = reply(&key.answered_by(backend_ip)) else {
        return true;
    };
    if holder.flow == *key {
        return true;
    }
    let Some(other) = FLOWS.get_ptr(holder.flow).map(copy) else {
        return true;
    };
    let idle = now.saturating_sub(other.seen_ns);
    settings().is_some_and(|s| idle > s.timeout(holder.flow.proto, other.state))
}

/// Now, on the monotonic coarse clock (the agent's `CLOCK_MONOTONIC_COARSE`).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: the helper takes no arguments and has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}
