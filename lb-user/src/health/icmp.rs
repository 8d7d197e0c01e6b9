//! The ICMP check: echo requests on the agent's one raw ICMP socket, sent in the schedule's
//! own pass and their replies read when the schedule next ticks, as for UDP ([`super::udp`]).
//!
//! The socket is not watched: a hundred services' echoes answered together cost the prober
//! one read per reply at its next tick, and no wake-up each. Every send is a plain
//! non-blocking `sendto` made by the schedule itself, so the schedule can judge the deadlines
//! between two sends of a long burst ([`super::pipeline`]). The kernel stamps each reply on
//! arrival (`SO_TIMESTAMPNS`), so its round trip is exact however late the tick that reads
//! it.
//!
//! A reply counts for the attempt whose address, identifier and sequence number it carries,
//! while that attempt waits: each check has an identifier of its own and numbers its echoes,
//! so a late reply to an expired attempt, a reply to another check, or someone else's ping
//! counts for nothing. The socket lets only echo replies in (`ICMP_FILTER`).

use std::{
    collections::HashMap,
    io::IoSliceMut,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use nix::{
    cmsg_space,
    errno::Errno,
    sys::{
        socket::{
            recvmsg, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag,
            SockProtocol, SockType, SockaddrIn,
        },
        time::TimeSpec,
    },
};
use pnet_packet::{
    icmp::{
        echo_reply::EchoReplyPacket, echo_request::MutableEchoRequestPacket, IcmpCode, IcmpPacket,
        IcmpTypes,
    },
    ipv4::Ipv4Packet,
    Packet as _,
};

use super::udp::{arrival, stamp_of};

/// What every echo request carries after its header.
const PAYLOAD: &[u8] = b"lb health check";
/// Receive buffer of the socket: room for the replies of a burst of checks between ticks.
const RECEIVE_BUFFER: usize = 1 << 20;
/// `SOL_RAW`'s `ICMP_FILTER` option (linux/icmp.h): a bit set per ICMP type kept out.
const ICMP_FILTER: libc::c_int = 1;

/// An attempt's identity on the wire: the backend, the check's identifier, the echo's
/// sequence number.
type Key = (Ipv4Addr, u16, u16);

/// The agent's one ICMP socket and the attempts waiting for a reply on it.
pub struct Socket {
    fd: OwnedFd,
    /// Attempts sent and not claimed yet, with their reply's arrival once read.
    waiting: Mutex<HashMap<Key, Option<Instant>>>,
}

impl Socket {
    /// Opens the raw ICMP socket (root or `CAP_NET_RAW`), letting only echo replies in.
    pub fn open() -> Result<Arc<Self>> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .context("cannot open the ICMP socket of the icmp checks (needs root or CAP_NET_RAW)")?;
        let only_echo_replies: u32 = !(1u32 << IcmpTypes::EchoReply.0);
        // SAFETY: setsockopt(2) on an open raw ICMP socket, with a pointer to a u32 that
        // lives across the call and its exact size (struct icmp_filter).
        let filtered = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_RAW,
                ICMP_FILTER,
                std::ptr::from_ref(&only_echo_replies).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if filtered != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot filter the ICMP socket to echo replies");
        }
        setsockopt(&fd, sockopt::ReceiveTimestampns, &true)
            .context("cannot ask for receive timestamps on the ICMP socket")?;
        // A smaller buffer is kept if the host caps it; the checks still work.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER);
        Ok(Arc::new(Socket {
            fd,
            waiting: Mutex::new(HashMap::new()),
        }))
    }

    /// Reads every reply that has come and notes the arrival of those an attempt waits for.
    pub fn drain(&self, now: Instant) {
        let mut buf = [0u8; 1500];
        let mut waiting = self.waiting.lock().expect("ICMP attempts lock");
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = cmsg_space!(TimeSpec);
            let (len, stamp) = match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(message) => (message.bytes, stamp_of(&message)),
                // EAGAIN: nothing more; anything else (an error queued on the socket) ends
                // this read too, and the attempts decide by their deadlines.
                Err(_) => return,
            };
            let Some(key) = reply_key(&buf[..len]) else {
                continue;
            };
            if let Some(arrived @ None) = waiting.get_mut(&key) {
                *arrived = Some(stamp.map_or(now, |ts| arrival(ts, now)));
            }
        }
    }
}

/// The key of an echo reply in `datagram` (its IPv4 header first, as a raw socket gives it).
fn reply_key(datagram: &[u8]) -> Option<Key> {
    let ip = Ipv4Packet::new(datagram)?;
    let header = usize::from(ip.get_header_length()) * 4;
    let reply = EchoReplyPacket::new(datagram.get(header..)?)?;
    (reply.get_icmp_type() == IcmpTypes::EchoReply).then(|| {
        (
            ip.get_source(),
            reply.get_identifier(),
            reply.get_sequence_number(),
        )
    })
}

/// One ICMP check of one backend.
pub struct IcmpProbe {
    socket: Arc<Socket>,
    target: Ipv4Addr,
    identifier: u16,
    sequence: u16,
}

/// An echo request sent and not answered yet; dropping it stops the wait for its reply.
pub struct Sent {
    socket: Arc<Socket>,
    key: Key,
}

impl Drop for Sent {
    fn drop(&mut self) {
        self.socket
            .waiting
            .lock()
            .expect("ICMP attempts lock")
            .remove(&self.key);
    }
}

/// Identifier of the next ICMP check (each has its own).
static NEXT_IDENTIFIER: AtomicU16 = AtomicU16::new(0x4c42);

impl IcmpProbe {
    /// A check pinging `target` on `socket`.
    pub fn new(socket: Arc<Socket>, target: Ipv4Addr) -> Self {
        IcmpProbe {
            socket,
            target,
            identifier: NEXT_IDENTIFIER.fetch_add(1, Ordering::Relaxed),
            sequence: 0,
        }
    }

    /// The socket its replies come to (the schedule reads it once per tick).
    pub fn socket(&self) -> &Arc<Socket> {
        &self.socket
    }

    /// Sends one echo request.
    pub fn send(&mut self) -> Result<Sent> {
        self.sequence = self.sequence.wrapping_add(1);
        let key = (self.target, self.identifier, self.sequence);
        let mut request = [0u8; MutableEchoRequestPacket::minimum_packet_size() + PAYLOAD.len()];
        let mut echo = MutableEchoRequestPacket::new(&mut request)
            .ok_or_else(|| anyhow!("an echo request does not fit its buffer"))?;
        echo.set_icmp_type(IcmpTypes::EchoRequest);
        echo.set_icmp_code(IcmpCode(0));
        echo.set_identifier(self.identifier);
        echo.set_sequence_number(self.sequence);
        echo.set_payload(PAYLOAD);
        let checksum = IcmpPacket::new(echo.packet()).map(|p| pnet_packet::icmp::checksum(&p));
        echo.set_checksum(checksum.unwrap_or_default());
        // Waiting before it leaves: a reply read by a drain in between is not missed.
        self.socket
            .waiting
            .lock()
            .expect("ICMP attempts lock")
            .insert(key, None);
        let sent = Sent {
            socket: self.socket.clone(),
            key,
        };
        let to = SockaddrIn::from(SocketAddrV4::new(self.target, 0));
        match sendto(
            self.socket.fd.as_raw_fd(),
            &request,
            &to,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(_) => Ok(sent),
            Err(Errno::EAGAIN) => Err(anyhow!(
                "echo to {}: the ICMP socket's send buffer is full",
                self.target
            )),
            Err(e) => {
                Err(anyhow!(std::io::Error::from(e)).context(format!("echo to {}", self.target)))
            }
        }
    }

    /// When the reply to `sent` arrived, if it has been read; the attempt is then done.
    pub fn read(&self, sent: &mut Option<Sent>) -> Option<Instant> {
        let key = sent.as_ref()?.key;
        let arrived = *self
            .socket
            .waiting
            .lock()
            .expect("ICMP attempts lock")
            .get(&key)?;
        if arrived.is_some() {
            *sent = None;
        }
        arrived
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_reply_is_keyed_by_its_source_identifier_and_sequence() {
        // IPv4 header (20 bytes, from 198.18.0.2) and an echo reply, ident 0x4c42, seq 7.
        let mut datagram = vec![
            0x45, 0, 0, 43, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1,
        ];
        datagram.extend_from_slice(&[0, 0, 0, 0, 0x4c, 0x42, 0, 7]);
        datagram.extend_from_slice(PAYLOAD);
        assert_eq!(
            reply_key(&datagram),
            Some((Ipv4Addr::new(198, 18, 0, 2), 0x4c42, 7))
        );
        // The same as an echo request (type 8) is no reply.
        datagram[20] = 8;
        assert_eq!(reply_key(&datagram), None);
        // Truncated.
        assert_eq!(reply_key(&datagram[..24]), None);
    }
}
