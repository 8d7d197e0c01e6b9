//! Keys, values and sizes of the BPF maps, and the names both sides know them by.

/// Name of the XDP program inside the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Name of the pass-through program for veth peers inside the object file.
pub const PASS_PROGRAM_NAME: &str = "lb_pass";

/// Upper bound on services (VIP, protocol, port) the dataplane holds.
pub const MAX_SERVICES: u32 = 1024;
/// Upper bound on backends over all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Upper bound on NICs the program is attached to.
pub const MAX_IFACES: u32 = 64;
/// Clients whose MAC and NIC are remembered for the reverse path (LRU).
pub const MAX_CLIENTS: u32 = 65_536;

/// `ACTIVE` value meaning "no backend is serving": the service's packets are dropped.
pub const NO_BACKEND: u32 = u32::MAX;

/// IP protocol numbers the dataplane rewrites.
pub mod proto {
    /// ICMP (echo request and reply only).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// Wildcard in an [`EndpointKey`](super::EndpointKey).
    pub const ANY: u8 = 0;
}

/// Map names, as written in the object file and looked up by the agent.
pub mod map_names {
    /// [`EndpointKey`](super::EndpointKey) of a VIP → [`ServiceValue`](super::ServiceValue).
    pub const SERVICES: &str = "SERVICES";
    /// Service id → index of the active backend (one `u32`: a flip is one map write).
    pub const ACTIVE: &str = "ACTIVE";
    /// Backend index → [`Backend`](super::Backend).
    pub const BACKENDS: &str = "BACKENDS";
    /// [`EndpointKey`](super::EndpointKey) of a backend → [`ReverseValue`](super::ReverseValue).
    pub const REVERSE: &str = "REVERSE";
    /// VIP (network order bytes) → [`VipInfo`](super::VipInfo); answers ARP, fast non-VIP exit.
    pub const VIPS: &str = "VIPS";
    /// Ingress ifindex → [`Iface`](super::Iface).
    pub const IFACES: &str = "IFACES";
    /// Client IPv4 → [`Neighbor`](super::Neighbor), learned on the forward path.
    pub const CLIENTS: &str = "CLIENTS";
    /// Egress ifindex → ifindex, for `XDP_REDIRECT`.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Per-CPU [`Traffic`](super::Traffic), indexed by [`traffic_index`](super::traffic_index).
    pub const TRAFFIC: &str = "TRAFFIC";
    /// Per-CPU `u64` packet counts, indexed by [`action_index`](super::action_index).
    pub const ACTIONS: &str = "ACTIONS";
}

/// An address, protocol and port: the key of services (the VIP and destination port) and of
/// replies (a backend's address and source port).
///
/// Lookups go from the most to the least specific key, as [`EndpointKey::candidates`] lists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 address, network order.
    pub ip: [u8; 4],
    /// Port, network order; `[0, 0]` matches every port.
    pub port: [u8; 2],
    /// IP protocol ([`proto`]); `ANY` matches every protocol the program rewrites.
    pub proto: u8,
    /// Always zero (keys are compared byte by byte).
    pub pad: u8,
}

impl EndpointKey {
    /// The key for `ip`, `protocol` and `port`.
    #[inline(always)]
    pub const fn new(ip: [u8; 4], protocol: u8, port: [u8; 2]) -> Self {
        EndpointKey {
            ip,
            port,
            proto: protocol,
            pad: 0,
        }
    }

    /// The keys a packet may match, most specific first: `(ip, proto, port)`,
    /// `(ip, proto, any port)`, `(ip, any protocol, any port)`.
    #[inline(always)]
    pub const fn candidates(ip: [u8; 4], protocol: u8, port: [u8; 2]) -> [Self; 3] {
        [
            Self::new(ip, protocol, port),
            Self::new(ip, protocol, [0, 0]),
            Self::new(ip, proto::ANY, [0, 0]),
        ]
    }
}

/// What a service's [`EndpointKey`] maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into `ACTIVE`.
    pub id: u32,
}

/// A backend as the dataplane needs it to forward one packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network order.
    pub ip: [u8; 4],
    /// Backend MAC (or its next hop's), the new destination MAC.
    pub mac: [u8; 6],
    /// MAC of the NIC the backend is reached through, the new source MAC.
    pub egress_mac: [u8; 6],
    /// Ifindex of that NIC.
    pub ifindex: u32,
}

/// What a backend's [`EndpointKey`] maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    /// The VIP the reply must appear to come from, network order.
    pub vip: [u8; 4],
    /// Index of the backend in `BACKENDS`, for counters.
    pub backend: u32,
}

/// Per-VIP facts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Number of services on this VIP (informational; non-zero for a configured VIP).
    pub services: u32,
}

/// A NIC the program is attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// The NIC's own MAC.
    pub mac: [u8; 6],
    /// [`iface_flags`] bits.
    pub flags: u16,
    /// Dense slot number of this NIC, for the `ACTIONS` counters.
    pub slot: u32,
}

/// Bits of [`Iface::flags`].
pub mod iface_flags {
    /// Clients are behind this NIC: ARP requests for a VIP are answered here.
    pub const CLIENT: u16 = 1 << 0;
    /// Backends are behind this NIC: their replies are rewritten back to the VIP.
    pub const BACKEND: u16 = 1 << 1;
}

/// Where a client was last seen: how to send a reply back to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Neighbor {
    /// The client's MAC (or its router's), the reply's destination MAC.
    pub mac: [u8; 6],
    /// MAC of the NIC the client was seen on, the reply's source MAC.
    pub iface_mac: [u8; 6],
    /// Ifindex of that NIC.
    pub ifindex: u32,
}

/// Packet and byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames).
    pub bytes: u64,
}

/// Direction of a rewritten packet, for [`traffic_index`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → VIP → backend.
    Forward = 0,
    /// Backend → VIP → client.
    Reverse = 1,
}

/// Entries of the `TRAFFIC` map.
pub const TRAFFIC_ENTRIES: u32 = MAX_BACKENDS * 2;

/// Index of a backend's counters for one direction in `TRAFFIC`.
#[inline(always)]
pub const fn traffic_index(backend: u32, direction: Direction) -> u32 {
    backend * 2 + direction as u32
}

/// Number of XDP actions counted per NIC (`XDP_ABORTED` ..= `XDP_REDIRECT`).
pub const XDP_ACTIONS: u32 = 5;
/// Entries of the `ACTIONS` map.
pub const ACTIONS_ENTRIES: u32 = MAX_IFACES * XDP_ACTIONS;

/// Index of one NIC slot's counter for one XDP action in `ACTIONS`.
#[inline(always)]
pub const fn action_index(slot: u32, action: u32) -> u32 {
    slot * XDP_ACTIONS + action
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `#[repr(C)]`, `Copy`, has no padding and is valid for any bytes.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReverseValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Iface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Neighbor {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Traffic {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_padding() {
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 4);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<ReverseValue>(), 8);
        assert_eq!(size_of::<Iface>(), 12);
        assert_eq!(size_of::<Neighbor>(), 16);
        assert_eq!(size_of::<Traffic>(), 16);
    }

    #[test]
    fn candidates_go_from_specific_to_wildcard() {
        let [exact, any_port, any] = EndpointKey::candidates([1, 2, 3, 4], proto::TCP, [0, 80]);
        assert_eq!((exact.proto, exact.port), (proto::TCP, [0, 80]));
        assert_eq!((any_port.proto, any_port.port), (proto::TCP, [0, 0]));
        assert_eq!((any.proto, any.port), (proto::ANY, [0, 0]));
    }

    #[test]
    fn counter_indexes_do_not_overlap() {
        assert_eq!(traffic_index(0, Direction::Forward), 0);
        assert_eq!(traffic_index(0, Direction::Reverse), 1);
        assert_eq!(
            traffic_index(MAX_BACKENDS - 1, Direction::Reverse),
            TRAFFIC_ENTRIES - 1
        );
        assert_eq!(
            action_index(MAX_IFACES - 1, XDP_ACTIONS - 1),
            ACTIONS_ENTRIES - 1
        );
    }
}
