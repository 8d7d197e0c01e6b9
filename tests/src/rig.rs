//! A loaded dataplane in a private namespace, and the crafted frames the
//! `BPF_PROG_TEST_RUN` tests feed it.
//!
//! Each rig lives in a namespace of its own holding one veth pair (`t-cli` for clients,
//! `t-bck` for backends, with the switch host's addresses `198.18.1.1` and `198.18.2.1`;
//! see `testrun::namespace`), so ifindexes, routes and local addresses are real.

use std::ops::Range;

use anyhow::Result;
use etherparse::PacketBuilder;
use lb_common::{FlowKey, EVENT_NAMES};
use lb_user::{
    dataplane::{flows::FlowRecord, Dataplane, MapWriter},
    plan::Plan,
    testbed::netns::Netns,
};

use crate::testrun::{self, interface, load, namespace, CLIENT_IF_MAC, CLIENT_MAC};

/// MAC of the slave backend.
pub const SLAVE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x02];
/// MAC of one-arm backend `a`.
pub const LOCAL_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0a];
/// The client.
pub const CLIENT: [u8; 4] = [198, 18, 1, 2];
/// A second client on the same segment.
pub const CLIENT_B: [u8; 4] = [198, 18, 1, 3];
/// The VIP of `web` and `dns`.
pub const VIP: [u8; 4] = [198, 18, 1, 100];
/// The VIP of `one-arm`.
pub const VIP_ONE_ARM: [u8; 4] = [198, 18, 1, 101];
/// The master backend.
pub const MASTER: [u8; 4] = [198, 18, 2, 2];
/// The slave backend.
pub const SLAVE: [u8; 4] = [198, 18, 3, 2];
/// One-arm backend `a`.
pub const LOCAL_A: [u8; 4] = [198, 18, 1, 10];
/// An address that is neither a VIP nor a backend.
pub const OTHER: [u8; 4] = [198, 18, 9, 9];
/// The switch host's own address on the client segment.
pub const SWITCH_CLIENT_SIDE: [u8; 4] = [198, 18, 1, 1];
/// The switch host's own address on the backends' segment.
pub const SWITCH_BACKEND_SIDE: [u8; 4] = [198, 18, 2, 1];

/// The config most rigs are planned with: `t-cli` for clients (and the one-arm service's
/// backends), `t-bck` for backends; `web` (TCP 80) and `dns` (UDP 53) on one VIP, `gone`
/// behind a NIC a test may delete, `one-arm` behind the client NIC.
pub fn standard_config() -> String {
    let interfaces = "[[interfaces]]\nname = \"t-cli\"\nrole = \"both\"\n\n\
                      [[interfaces]]\nname = \"t-bck\"\nrole = \"backend\"\n";
    let others = r#"
[[services]]
name = "gone"
vip = "198.18.1.102"
backends = [
  { name = "x", ip = "198.18.5.2", priority = 2, mac = "02:00:00:00:05:02", iface = "t-x" },
  { name = "y", ip = "198.18.5.3", priority = 1, mac = "02:00:00:00:05:03", iface = "t-x" },
]

[[services]]
name = "one-arm"
vip = "198.18.1.101"
backends = [
  { name = "a", ip = "198.18.1.10", priority = 2, mac = "02:00:00:00:01:0a", iface = "t-cli" },
  { name = "b", ip = "198.18.1.11", priority = 1, mac = "02:00:00:00:01:0b", iface = "t-cli" },
]
"#;
    format!(
        "{interfaces}{}{}{others}",
        service("web", "198.18.1.100", "tcp", 80, ""),
        service("dns", "198.18.1.100", "udp", 53, "")
    )
}

/// A config for the rig: client NIC `t-cli`, the given `[[services]]` tables (see
/// [`service`]) and `tail` (for example a `[flows]` table).
pub fn config(services: &[String], tail: &str) -> String {
    format!(
        "[[interfaces]]\nname = \"t-cli\"\nrole = \"client\"\n{}\n{tail}",
        services.concat()
    )
}

/// A `[[services]]` table: `name` on `vip`, `protocol` and `port`, with `extra` keys,
/// master and slave as backends behind `t-bck`.
pub fn service(name: &str, vip: &str, protocol: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
[[services]]
name = "{name}"
vip = "{vip}"
protocol = "{protocol}"
port = {port}
{extra}
backends = [
  {{ name = "master", ip = "198.18.2.2", priority = 100, mac = "02:00:00:00:02:02", iface = "t-bck" }},
  {{ name = "slave",  ip = "198.18.3.2", priority = 50,  mac = "02:00:00:00:03:02", iface = "t-bck" }},
]
"#
    )
}

/// A loaded dataplane with [`standard_config`] (or another config) written, inside a private
/// namespace.
pub struct Rig {
    /// The loaded program.
    pub dataplane: Dataplane,
    /// Its maps.
    pub maps: MapWriter,
    /// The plan written into them.
    pub plan: Plan,
    /// Ifindex of `t-cli`.
    pub client_if: u32,
    /// Ifindex of `t-bck`.
    pub backend_if: u32,
}

impl Rig {
    /// Loads the program and writes `config` (run inside the rig's namespace).
    pub fn new(config: &str) -> Result<Self> {
        let (plan, dataplane, maps) = load(config)?;
        Ok(Rig {
            client_if: interface(&plan, "t-cli")?.ifindex,
            backend_if: interface(&plan, "t-bck")?.ifindex,
            dataplane,
            maps,
            plan,
        })
    }

    /// Runs the program on `frame` as if it arrived on `ifindex`: (action, frame after).
    pub fn run(&mut self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, _, out) = testrun::run(self.dataplane.program()?, ifindex, frame, 1)?;
        Ok((action, out))
    }

    /// Makes `backend` the active backend of `service` (one `ACTIVE` write, nothing else).
    pub fn activate(&mut self, service: &str, backend: &str) -> Result<()> {
        let svc = self.plan.service(service)?;
        let index = svc.backend(backend)?.index;
        self.maps.set_active(svc.id, index)
    }

    /// Sets the `KEEP` deadline of `backend` of `service`.
    pub fn keep(&mut self, service: &str, backend: &str, until: u64) -> Result<()> {
        let index = self.plan.service(service)?.backend(backend)?.index;
        self.maps.set_keep(index, until)
    }

    /// How often event `name` was counted.
    pub fn event(&self, name: &str) -> Result<u64> {
        let at = EVENT_NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no event {name}"));
        Ok(self.maps.events()?[at])
    }

    /// Every entry of the connection table.
    pub fn flows(&self) -> Vec<FlowRecord> {
        self.maps.read_flows(1 << 20)
    }

    /// The flow with `key`, if the table holds it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowRecord> {
        self.flows().into_iter().find(|f| f.key == *key)
    }
}

/// Runs `test` on a fresh [`Rig`] with [`standard_config`] inside a fresh namespace called `name`.
pub fn with_rig(name: &str, test: impl FnOnce(&mut Rig) -> Result<()> + Send + 'static) {
    with_rig_config(name, standard_config(), test)
}

/// Runs `test` on a fresh [`Rig`] with `config` inside a fresh namespace called `name`.
pub fn with_rig_config(
    name: &str,
    config: String,
    test: impl FnOnce(&mut Rig) -> Result<()> + Send + 'static,
) {
    let ns: Netns = namespace(name).expect("create namespace");
    ns.ip(&["link", "add", "t-x", "type", "veth", "peer", "name", "t-y"])
        .expect("create veth pair");
    ns.enter(move || {
        let mut rig = Rig::new(&config)?;
        test(&mut rig)
    })
    .expect("enter namespace")
    .expect("test body");
}

/// A TCP segment with `flags` (etherparse builder calls) from `src:sport` to `dst:dport`.
pub fn tcp_with(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    flags: &str,
) -> Vec<u8> {
    let mut frame = Vec::new();
    let mut builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 0x1234_5678, 64_000);
    for flag in flags.chars() {
        builder = match flag {
            'S' => builder.syn(),
            'A' => builder.ack(0x0102_0304),
            'F' => builder.fin(),
            'R' => builder.rst(),
            'P' => builder.psh(),
            other => panic!("unknown TCP flag {other}"),
        };
    }
    builder.write(&mut frame, b"hello vip").unwrap();
    frame
}

/// A TCP SYN from `src:sport` to `dst:dport`.
pub fn tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    tcp_with(src_mac, dst_mac, (src, sport), (dst, dport), "S")
}

/// A UDP datagram from `src:sport` to `dst:dport`.
pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut frame, b"query")
        .unwrap();
    frame
}

/// A broadcast ARP request for `target_ip` from `sender_ip` at `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&sender_ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target_ip);
    frame
}

/// An ICMP error of `kind` from `src` to `dst` quoting `quoted`, sent from `mac` (source,
/// destination).
pub fn icmp_error(
    mac: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4(src, dst, 64)
        .icmpv4(kind)
        .write(&mut frame, quoted)
        .unwrap();
    frame
}

/// An ICMP echo request (identifier 7) from the client's MAC.
pub fn echo_request(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_IF_MAC)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut frame, b"ping payload")
        .unwrap();
    frame
}

/// IPv4 header checksum in an untagged Ethernet/IPv4 frame.
pub const IP_CHECK: Range<usize> = 24..26;
/// IPv4 source address.
pub const IP_SRC: Range<usize> = 26..30;
/// IPv4 destination address.
pub const IP_DST: Range<usize> = 30..34;
/// TCP checksum.
pub const TCP_CHECK: Range<usize> = 50..52;
/// UDP checksum.
pub const UDP_CHECK: Range<usize> = 40..42;

/// Asserts that `after` differs from `before` exactly in the byte ranges `changed`.
pub fn assert_only_changed(before: &[u8], after: &[u8], changed: &[Range<usize>]) {
    assert_eq!(before.len(), after.len(), "frame length changed");
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if !changed.iter().any(|r| r.contains(&i)) {
            assert_eq!(b, a, "byte {i} changed but should not have");
        }
    }
}
