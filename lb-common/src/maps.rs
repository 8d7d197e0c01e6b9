//! Keys, values and sizes of the BPF maps, and the names both sides know them by.

/// Name of the XDP program inside the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Name of the pass-through program for veth peers inside the object file.
pub const PASS_PROGRAM_NAME: &str = "lb_pass";

/// Upper bound on services (VIP, protocol, port) the dataplane holds.
pub const MAX_SERVICES: u32 = 16_384;
/// Upper bound on backends over all services. The per-CPU traffic counters take 16 bytes
/// per backend and direction on each CPU (1 MiB per CPU).
pub const MAX_BACKENDS: u32 = 32_768;
/// Upper bound on NICs the program is attached to.
pub const MAX_IFACES: u32 = 64;
/// Interface indexes below this can be served: `IFACES` is an array indexed by ifindex.
pub const MAX_IFINDEX: u32 = 65_536;
/// Upper bound on the switch host's own addresses (never accepted as clients).
pub const MAX_LOCAL_ADDRS: u32 = 4096;
/// Default size of the connection table (flows; the reply index has as many entries).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// `ACTIVE` value meaning "no backend is serving": the service's packets are dropped.
pub const NO_BACKEND: u32 = u32::MAX;

/// How often (ns) a busy flow's `seen_ns` and reply index entry are refreshed.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// `KEEP` value: the backend keeps its sticky flows for as long as they last.
pub const KEEP_FOREVER: u64 = u64::MAX;

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
    /// Backend index → monotonic time (ns) until which its sticky flows stay on it.
    pub const KEEP: &str = "KEEP";
    /// Backend index → [`admin_flags`](super::admin_flags) set by the operator
    /// (`lb drain`). The program does not read it: it is pinned with the dataplane so
    /// that a restarted agent finds what the operator decided.
    pub const ADMIN: &str = "ADMIN";
    /// VIP (network order bytes) → [`VipInfo`](super::VipInfo); answers ARP.
    pub const VIPS: &str = "VIPS";
    /// A bit per low 16 bits of an address, set for each VIP: the array lookup that tells
    /// most frames apart from VIP traffic before any hash lookup
    /// ([`vip_bit`](super::vip_bit)).
    pub const VIP_BITS: &str = "VIP_BITS";
    /// Ingress ifindex → [`Iface`](super::Iface) (an array: `flags == 0` is not served).
    pub const IFACES: &str = "IFACES";
    /// The switch host's own IPv4 addresses, which are never clients.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// The connection table: [`FlowKey`](super::FlowKey) as the client sends →
    /// [`Flow`](super::Flow).
    pub const FLOWS: &str = "FLOWS";
    /// The reply index: [`FlowKey`](super::FlowKey) as the backend answers →
    /// [`Reply`](super::Reply).
    pub const REPLIES: &str = "REPLIES";
    /// One [`FlowSettings`](super::FlowSettings): the connection table's timeouts.
    pub const SETTINGS: &str = "SETTINGS";
    /// Egress ifindex → ifindex, for `XDP_REDIRECT`.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Per-CPU [`Traffic`](super::Traffic), indexed by [`traffic_index`](super::traffic_index).
    pub const TRAFFIC: &str = "TRAFFIC";
    /// Per-CPU `u64` packet counts, indexed by [`action_index`](super::action_index).
    pub const ACTIONS: &str = "ACTIONS";
    /// Per-CPU `u64` counts of dataplane decisions, indexed by [`Event`](super::Event).
    pub const EVENTS: &str = "EVENTS";
    /// One `u32`: this switch host's [`host_role`](super::host_role) in a pair. Pinned, so
    /// a restarted agent keeps the role keepalived gave it.
    pub const ROLE: &str = "ROLE";
    /// Ring buffer: every flow the program writes, for the agent to stream to its pair peer.
    pub const FLOW_SYNC: &str = "FLOW_SYNC";
}

/// Values of the `ROLE` map: whether this switch host serves the VIPs.
pub mod host_role {
    /// Serves: answers ARP for the VIPs, forwards their traffic and the replies. The value
    /// of a map never written, so a host not in a pair is always active.
    pub const ACTIVE: u32 = 0;
    /// The standby of a pair: answers no ARP for a VIP and forwards nothing of theirs
    /// (dropped, counted as [`Event::Standby`](super::Event::Standby)); its connection
    /// table is kept, ready for a takeover.
    pub const STANDBY: u32 = 1;
}

/// An address, protocol and port: the key of services (the VIP and destination port).
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
    /// [`service_flags`] bits.
    pub flags: u32,
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// Graceful failback: TCP flows stay on the backend they started on while `KEEP`
    /// allows, instead of following the active backend at once.
    pub const GRACEFUL: u32 = 1 << 0;
}

/// Bits of a backend's `ADMIN` entry.
pub mod admin_flags {
    /// Taken out of service by the operator (`lb drain`): it gets no new flows.
    pub const DRAINED: u32 = 1 << 0;
}

/// A backend as the dataplane needs it to forward one packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network order.
    pub ip: [u8; 4],
    /// Backend MAC (or its next hop's): the new destination MAC, and the only source MAC
    /// its replies are accepted from.
    pub mac: [u8; 6],
    /// MAC of the NIC the backend is reached through, the new source MAC.
    pub egress_mac: [u8; 6],
    /// Ifindex of that NIC: the only NIC its replies are accepted on.
    pub ifindex: u32,
    /// Id of the service the backend belongs to. Not read by the program: it lets a
    /// restarted agent that adopts the pinned maps recognise each backend's index.
    pub service: u32,
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
    /// [`iface_flags`] bits; zero: not a NIC of ours.
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

/// One direction of a connection: addresses, ports and protocol as they are on the wire.
///
/// A flow is keyed as the client sends it (client → VIP) in `FLOWS`, and as its backend
/// answers (backend → client) in `REPLIES`. ICMP echo uses the identifier as the client's
/// port and 0 as the VIP's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Source port (network order; the echo identifier of an ICMP request, 0 in a reply).
    pub src_port: [u8; 2],
    /// Destination port (network order; 0 in an ICMP request, the identifier in a reply).
    pub dst_port: [u8; 2],
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

impl FlowKey {
    /// The key of `src:src_port → dst:dst_port` over `protocol`.
    #[inline(always)]
    pub const fn new(
        protocol: u8,
        src: [u8; 4],
        src_port: [u8; 2],
        dst: [u8; 4],
        dst_port: [u8; 2],
    ) -> Self {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            proto: protocol,
            pad: [0; 3],
        }
    }

    /// The key of the answers to this direction when they come from `peer` instead of
    /// `self.dst` (a flow's reply key, with its backend as `peer`).
    #[inline(always)]
    pub const fn answered_by(&self, peer: [u8; 4]) -> Self {
        Self::new(self.proto, peer, self.dst_port, self.src, self.src_port)
    }
}

/// A connection the program created: where its client is and which backend serves it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Monotonic time (ns, coarse clock) of its first packet.
    pub created_ns: u64,
    /// Monotonic time (ns, coarse clock) it was last seen, refreshed about once a second
    /// and on every change of state.
    pub seen_ns: u64,
    /// Index of its backend in `BACKENDS`.
    pub backend: u32,
    /// Its service (index into `ACTIVE`).
    pub service: u32,
    /// Ifindex of the NIC the client is behind.
    pub ifindex: u32,
    /// The client's MAC (or its router's): where replies go, and the only source MAC the
    /// flow's packets are accepted from.
    pub client_mac: [u8; 6],
    /// [`flow_state`].
    pub state: u8,
    /// [`flow_flags`] bits.
    pub flags: u8,
    /// Always zero.
    pub pad: u32,
}

/// States of a [`Flow`].
pub mod flow_state {
    /// Only the client has sent (TCP: handshake under way, or picked up mid-stream).
    pub const NEW: u8 = 0;
    /// The backend has answered.
    pub const REPLIED: u8 = 1;
    /// TCP: the client acknowledged the backend's answer.
    pub const ESTABLISHED: u8 = 2;
    /// TCP: both sides sent a FIN, or one sent a RST.
    pub const CLOSING: u8 = 3;
    /// Names, indexed by state.
    pub const NAMES: [&str; 4] = ["new", "replied", "established", "closing"];
}

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// The flow stays on its backend while that backend's `KEEP` deadline allows
    /// (graceful failback), instead of following the active backend.
    pub const STICKY: u8 = 1 << 0;
    /// TCP: the client sent a FIN.
    pub const FIN_CLIENT: u8 = 1 << 1;
    /// TCP: the backend sent a FIN.
    pub const FIN_BACKEND: u8 = 1 << 2;
}

/// What a reply key maps to: the flow it answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// The flow's key in `FLOWS` (its destination is the VIP replies must carry).
    pub flow: FlowKey,
    /// The backend the reply must come from (index in `BACKENDS`).
    pub backend: u32,
}

/// Timeouts of the connection table, in nanoseconds: a flow idle for longer than its
/// timeout is gone (its next packet starts a new flow; a reply to it is not rewritten).
/// Every timeout is at least [`FLOW_REFRESH_NS`]: a flow seen within that time is live
/// without looking them up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// TCP after the handshake.
    pub tcp_established_ns: u64,
    /// TCP during the handshake (also a connection picked up mid-stream, until answered).
    pub tcp_handshake_ns: u64,
    /// TCP after FINs of both sides, or a RST.
    pub tcp_closing_ns: u64,
    /// UDP.
    pub udp_ns: u64,
    /// ICMP echo.
    pub icmp_ns: u64,
    /// Nonzero when the program reports every flow it writes on `FLOW_SYNC` (pair mode
    /// with a peer to stream the connection table to); zero costs nothing per packet.
    pub sync: u64,
}

impl FlowSettings {
    /// How long a flow of `protocol` in `state` may stay idle.
    #[inline(always)]
    pub const fn timeout(&self, protocol: u8, state: u8) -> u64 {
        match protocol {
            proto::TCP => match state {
                flow_state::ESTABLISHED => self.tcp_established_ns,
                flow_state::CLOSING => self.tcp_closing_ns,
                _ => self.tcp_handshake_ns,
            },
            proto::UDP => self.udp_ns,
            _ => self.icmp_ns,
        }
    }
}

/// Decisions of the dataplane that are counted in `EVENTS` (per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A flow was created (a client's first packet, or one after its flow expired).
    FlowCreated = 0,
    /// A TCP packet without SYN and without a flow started one (picked up mid-stream).
    FlowPickedUp,
    /// A flow followed its service's active backend (its own is down or drained).
    FlowMoved,
    /// A flow could not be written to the table: its packet was dropped.
    FlowTableError,
    /// A packet to a VIP from one of the switch host's own addresses: dropped.
    LocalSource,
    /// A packet to a VIP from an address no client can have (a VIP, 0/8, 127/8,
    /// multicast, reserved, broadcast): dropped.
    BadSource,
    /// A packet to a VIP whose source the switch host would not route back out of the NIC
    /// it arrived on, or whose source MAC is not that route's neighbour: dropped.
    SpoofedSource,
    /// A new flow whose reply key another live flow holds (the same client port toward
    /// the same backend through another VIP): dropped.
    FlowCollision,
    /// A packet of a known flow from another MAC or NIC than the flow's client: dropped.
    ClientMismatch,
    /// A reply-shaped frame of a known flow on a NIC that is not its backend's: passed.
    ReplyWrongNic,
    /// A reply-shaped frame of a known flow from another MAC than its backend's: passed.
    ReplyWrongMac,
    /// A reply to a flow that has expired or was evicted: passed.
    ReplyNoFlow,
    /// An 802.1Q-tagged frame: not served, passed.
    VlanTagged,
    /// A packet to a VIP on a protocol or port no service names: passed.
    NoService,
    /// A packet to a VIP that cannot be checked completely (options, fragment, bad
    /// checksum, truncated, ICMP other than echo): passed.
    Unparsable,
    /// A packet of a service with no backend serving: dropped.
    NoBackend,
    /// A rewritten frame whose egress NIC is missing from `TX_PORTS`: dropped.
    NoRedirectPort,
    /// VIP traffic on the standby host of a pair (an ARP request for a VIP: passed, not
    /// answered; a packet to a VIP, a backend's reply, an ICMP error about a flow: dropped).
    Standby,
    /// A written flow could not be reported on `FLOW_SYNC` (the ring was full: the agent
    /// fell behind); the pair peer learns of it at the flow's next write.
    FlowSyncLost,
}

/// Number of [`Event`]s.
pub const EVENTS: u32 = 19;

/// Names of the [`Event`]s, as exported in metrics, indexed by event.
pub const EVENT_NAMES: [&str; EVENTS as usize] = [
    "flow_created",
    "flow_picked_up",
    "flow_moved",
    "flow_table_error",
    "local_source",
    "bad_source",
    "spoofed_source",
    "flow_collision",
    "client_mismatch",
    "reply_wrong_nic",
    "reply_wrong_mac",
    "reply_no_flow",
    "vlan_tagged",
    "no_service",
    "unparsable",
    "no_backend",
    "no_redirect_port",
    "standby",
    "flow_sync_lost",
];

/// One flow as the program wrote it, reported on `FLOW_SYNC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowUpdate {
    /// The flow's key, as the client sends.
    pub key: FlowKey,
    /// The flow, after the write.
    pub flow: Flow,
}

/// Size in bytes of the `FLOW_SYNC` ring (a power of two, pages): 16 384 updates of 56
/// bytes and their 8-byte headers.
pub const FLOW_SYNC_BYTES: u32 = 1 << 20;

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

/// Entries of the `VIP_BITS` array (64 bits each: one bit per value of an address's low
/// 16 bits).
pub const VIP_BITS_ENTRIES: u32 = 1024;

/// Where the bit of address `ip` is in `VIP_BITS`: (entry, bit mask). Set for every VIP;
/// an address whose bit is clear is not a VIP.
#[inline(always)]
pub const fn vip_bit(ip: &[u8; 4]) -> (u32, u64) {
    let low = u16::from_be_bytes([ip[2], ip[3]]);
    ((low >> 6) as u32, 1u64 << (low & 63))
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
    unsafe impl aya::Pod for VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Iface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Reply {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Traffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowUpdate {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_padding() {
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<Iface>(), 12);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<Flow>(), 40);
        assert_eq!(size_of::<Reply>(), 20);
        assert_eq!(size_of::<FlowSettings>(), 48);
        assert_eq!(size_of::<FlowUpdate>(), 56);
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
    fn a_reply_key_mirrors_the_flow_key() {
        let (client, vip, master) = ([198, 18, 1, 2], [198, 18, 1, 100], [198, 18, 2, 2]);
        let forward = FlowKey::new(proto::TCP, client, [0x9c, 0x40], vip, [0, 80]);
        let reply = FlowKey::new(proto::TCP, master, [0, 80], client, [0x9c, 0x40]);
        assert_eq!(forward.answered_by(master), reply);
    }

    #[test]
    fn every_event_has_a_name() {
        assert_eq!(Event::FlowSyncLost as u32 + 1, EVENTS);
        assert_eq!(EVENT_NAMES[Event::Standby as usize], "standby");
        assert_eq!(
            EVENT_NAMES[Event::ReplyWrongMac as usize],
            "reply_wrong_mac"
        );
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
