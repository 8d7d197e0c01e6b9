//! One request stream of the failover bench, with a fault in it, and what it measured: the
//! servers' view of the move the fault caused, the client's view, and where lost requests
//! went.

use std::time::Duration;

use anyhow::{Context, Result};
use lb_user::testbed::topology::{UDP_PORT, VIP};

use super::{
    super::{
        interrupt,
        responder::{self, Logged},
    },
    client::{self, now_ns, StreamResult},
    rig::Rig,
    BEFORE_FAULT,
};

/// One trial of a downtime or failback experiment.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Server view: first answer of the new backend − last answer of the old one (s).
    pub server_gap: Option<f64>,
    /// Client view: longest time without an answer (s).
    pub client_gap: f64,
    /// Requests without an answer.
    pub lost: u64,
    /// Requests sent.
    pub sent: u64,
    /// Requests per second the client achieved.
    pub achieved_rate: f64,
    /// The client's longest pause between two sends (s).
    pub largest_send_gap: f64,
    /// Requests the client's socket refused (counted in `lost`).
    pub send_errors: u64,
    /// Of the lost requests, those a server logged: answered, and the answer not received
    /// by the client. No server logged the rest.
    pub lost_after_server: u64,
    /// Datagrams of any kind (requests, answers, health probes) that the bench's own
    /// sockets, the client's and the servers', dropped for a full receive buffer during the
    /// stream: a sign that the bench's endpoints, not the system measured, lost some of
    /// `lost`.
    pub socket_drops: u64,
}

/// A request stream and what happened around it.
pub struct Streamed {
    /// What the client saw.
    pub result: StreamResult,
    /// When the fault was applied (CLOCK_REALTIME ns).
    pub fault_ns: u128,
    /// Datagrams the client's and servers' sockets dropped for a full receive buffer
    /// meanwhile.
    pub socket_drops: u64,
}

/// Runs a request stream with `fault` applied `BEFORE_FAULT` after it starts.
pub fn stream(
    rig: &mut Rig,
    next_seq: &mut u64,
    rate: u32,
    length: Duration,
    fault: impl FnOnce(&mut Rig) -> Result<()>,
) -> Result<Streamed> {
    interrupt::check()?;
    rig.new_log_entries()?;
    let drops_before = rig.endpoint_socket_drops()?;
    let first = *next_seq;
    *next_seq += (rate as f64 * length.as_secs_f64()) as u64 + 1000;
    let socket = client_socket(rig)?;
    let mut fault_ns = 0;
    let result = client::request_stream(
        socket,
        VIP,
        UDP_PORT,
        first,
        rate,
        length,
        BEFORE_FAULT,
        || {
            fault_ns = now_ns();
            fault(rig)
        },
    )?;
    let socket_drops = rig.endpoint_socket_drops()?.saturating_sub(drops_before);
    Ok(Streamed {
        result,
        fault_ns,
        socket_drops,
    })
}

/// A UDP socket in the client's namespace, its receive buffer enlarged like the servers'.
pub fn client_socket(rig: &Rig) -> Result<std::net::UdpSocket> {
    let socket = rig
        .testbed
        .client
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))?
        .context("cannot open a UDP socket on the client")?;
    responder::give_room(&socket)?;
    Ok(socket)
}

/// Which way the fault of a stream moves the traffic.
#[derive(Clone, Copy, PartialEq)]
pub enum Direction {
    /// From the master to the slave.
    Failover,
    /// From the slave back to the master.
    Failback,
}

/// The server and client views of one stream. The server view is of the move the fault
/// caused: the new backend's first answer after the fault, and the old backend's last
/// answer to a request sent before that one. A move without cause earlier or later in the
/// stream (checks failing on a healthy backend) is not taken for it.
pub fn measure(rig: &mut Rig, stream: &Streamed, direction: Direction) -> Result<Trial> {
    let Streamed {
        result,
        fault_ns,
        socket_drops,
    } = stream;
    let (master, slave) = rig.new_log_entries()?;
    let answered = distinct_in_range(
        &master,
        &slave,
        result.first,
        result.first + result.sent,
        true,
    );
    let range = result.first..result.first + result.sent;
    let answers = |log: &[Logged]| -> Vec<(u64, u128)> {
        log.iter()
            .filter(|e| e.request && range.contains(&e.number))
            .map(|e| (e.number, e.at_ns))
            .collect()
    };
    let (old, new) = match direction {
        Direction::Failover => (answers(&master), answers(&slave)),
        Direction::Failback => (answers(&slave), answers(&master)),
    };
    let first_new = new
        .iter()
        .filter(|(_, at)| at >= fault_ns)
        .min_by_key(|(_, at)| *at);
    let server_gap = first_new.and_then(|(moved, first)| {
        let last_old = old
            .iter()
            .filter(|(number, _)| number < moved)
            .map(|(_, at)| *at)
            .max()?;
        Some((*first as f64 - last_old as f64) / 1e9)
    });
    Ok(Trial {
        server_gap,
        client_gap: result.longest_gap(),
        lost: result.lost(),
        sent: result.sent,
        achieved_rate: result.achieved_rate,
        largest_send_gap: result.largest_send_gap,
        send_errors: result.send_errors,
        lost_after_server: answered.saturating_sub(result.replies.len() as u64),
        socket_drops: *socket_drops,
    })
}

/// Distinct numbers of stream datagrams (or requests) in `first..end` that either server
/// logged.
pub fn distinct_in_range(
    master: &[Logged],
    slave: &[Logged],
    first: u64,
    end: u64,
    requests: bool,
) -> u64 {
    let mut seen = std::collections::HashSet::new();
    for entry in master.iter().chain(slave) {
        if entry.request == requests && (first..end).contains(&entry.number) {
            seen.insert(entry.number);
        }
    }
    seen.len() as u64
}
