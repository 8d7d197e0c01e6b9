//! One throughput measurement: the generator offers frames spread over many client flows
//! for a fixed time, the receiving host counts (and drops) at its NIC's ingress what
//! arrived rewritten.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::trafficgen::{spread_field, Spread, HEADER_LEN};
use lb_user::testbed::{
    topology::{MASTER_IP, MASTER_MAC, UDP_PORT, VIP},
    Testbed,
};

use super::{
    generator::{self, Flow},
    live::{self, Generator},
    nat::RxCount,
};
use crate::bench::interrupt;

/// The client's MAC.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// The switch's port towards the client.
const C0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// The switch's port towards the master.
const M0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// The first client address of the measured flows; the switch routes
/// [`CLIENTS`] through the client host.
pub const FIRST_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The clients' network.
pub const CLIENTS: &str = "198.19.0.0/16";
/// The first client source port of the measured flows.
pub const CLIENT_PORT: u16 = 40_000;

/// Which way the traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Client → VIP, rewritten to the master.
    Forward,
    /// Master → client, rewritten to come from the VIP.
    Return,
}

impl Way {
    /// Label for the report.
    pub fn label(self) -> &'static str {
        match self {
            Way::Forward => "forward (client → VIP → master)",
            Way::Return => "return (master → client, from the VIP)",
        }
    }
}

/// Timing and sizing of the measurements.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Sending before the window opens.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
    /// Client addresses the frames are spread over.
    pub addrs: u32,
    /// Source ports per client address.
    pub ports: u32,
    /// CPU the generator is pinned to.
    pub cpu: Option<usize>,
}

/// What one measurement saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Length of the measured window, seconds.
    pub secs: f64,
    /// Length of the window over which arrivals were counted, seconds.
    pub arrived_secs: f64,
    /// Frames the kernel took from the generator in the window.
    pub sent: u64,
    /// Frames that arrived at the receiver's NIC rewritten.
    pub arrived: u64,
    /// Frames of the flow that arrived at the receiver's NIC not rewritten (still to the
    /// VIP, or from the master's own address); should be 0.
    pub not_rewritten: u64,
}

impl Sample {
    /// Offered frames per second.
    pub fn offered_pps(&self) -> f64 {
        self.sent as f64 / self.secs
    }
    /// Delivered (rewritten) frames per second.
    pub fn delivered_pps(&self) -> f64 {
        if self.arrived_secs > 0.0 {
            self.arrived as f64 / self.arrived_secs
        } else {
            0.0
        }
    }
}

fn forward_flow() -> Flow {
    Flow {
        src_mac: CLIENT_MAC,
        dst_mac: C0_MAC,
        src_ip: FIRST_CLIENT,
        dst_ip: VIP,
        src_port: CLIENT_PORT,
        dst_port: UDP_PORT,
    }
}

fn return_flow() -> Result<Flow> {
    Ok(Flow {
        src_mac: lb_user::net::parse_mac(MASTER_MAC)?,
        dst_mac: M0_MAC,
        src_ip: MASTER_IP,
        dst_ip: FIRST_CLIENT,
        src_port: UDP_PORT,
        dst_port: CLIENT_PORT,
    })
}

/// The flows of the measurement, varied at the client's end of `way`, over frame `frame`.
fn spread(way: Way, timing: &Timing, frame: &[u8]) -> Spread {
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&frame[..HEADER_LEN]);
    Spread {
        header,
        tail: [0; 2],
        field: match way {
            Way::Forward => spread_field::SOURCE,
            Way::Return => spread_field::DESTINATION,
        },
        addrs: timing.addrs,
        ports: timing.ports,
        first_addr: FIRST_CLIENT.octets(),
        first_port: CLIENT_PORT.to_be_bytes(),
        pad: [0; 2],
    }
}

/// Makes the switch know every flow before the measurement: one frame of each from the
/// clients (the XDP program creates the flow; conntrack the NAT binding), one reply of each
/// from the master (conntrack's entry becomes established, which a flowtable needs), and
/// one more from the clients (which a flowtable's `flow add` offloads).
pub fn prime(bed: &Testbed, timing: &Timing) -> Result<()> {
    let flows = timing.addrs * timing.ports;
    for (ns, flow, way) in [
        (&bed.client, forward_flow(), Way::Forward),
        (&bed.master, return_flow()?, Way::Return),
        (&bed.client, forward_flow(), Way::Forward),
    ] {
        let frame = generator::frame(&flow, 64)?;
        let spread = spread(way, timing, &frame);
        live::send_paced(ns, "eth0", frame, spread, flows)?;
        interrupt::sleep(Duration::from_millis(50))?;
    }
    Ok(())
}

/// Measures one way with frames of `len` bytes. `receive`: count arrivals (false when the
/// switch drops everything and only the offered rate matters).
pub fn measure(
    bed: &Testbed,
    way: Way,
    len: usize,
    timing: Timing,
    receive: bool,
) -> Result<Sample> {
    interrupt::check()?;
    let (sender, receiver, flow) = match way {
        Way::Forward => (&bed.client, &bed.master, forward_flow()),
        Way::Return => (&bed.master, &bed.client, return_flow()?),
    };
    let counter = if receive {
        Some(match way {
            Way::Forward => RxCount::new(
                receiver,
                &format!("ip daddr {MASTER_IP} udp dport {UDP_PORT}"),
                &format!("ip daddr {VIP} udp dport {UDP_PORT}"),
            )?,
            Way::Return => RxCount::new(
                receiver,
                &format!("ip saddr {VIP} udp sport {UDP_PORT}"),
                &format!("ip saddr {MASTER_IP} udp sport {UDP_PORT}"),
            )?,
        })
    } else {
        None
    };
    let read = || -> Result<(u64, u64)> { counter.as_ref().map_or(Ok((0, 0)), RxCount::read) };
    let frame = generator::frame(&flow, len)?;
    let limit = timing.warmup + timing.window + Duration::from_secs(5);
    if receive {
        prime(bed, &timing)?;
    }
    let spread = spread(way, &timing, &frame);
    let generator = Generator::start(sender, "eth0", frame, spread, limit, timing.cpu)?;
    interrupt::sleep(timing.warmup)?;
    // Each counter reading runs nft (milliseconds): the arrivals' window runs from the
    // middle of one reading to the middle of the other.
    let timed_read = || -> Result<((u64, u64), Instant)> {
        let t0 = Instant::now();
        let counts = read()?;
        Ok((counts, t0 + t0.elapsed() / 2))
    };
    let (before, read_before) = timed_read()?;
    let (start, sent_before) = (Instant::now(), generator.sent());
    interrupt::sleep(timing.window)?;
    let (secs, sent_after) = (start.elapsed().as_secs_f64(), generator.sent());
    let (after, read_after) = timed_read()?;
    generator.stop()?;
    Ok(Sample {
        secs,
        arrived_secs: (read_after - read_before).as_secs_f64(),
        sent: sent_after - sent_before,
        arrived: after.0 - before.0,
        not_rewritten: after.1 - before.1,
    })
}
