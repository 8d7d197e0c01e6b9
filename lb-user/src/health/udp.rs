//! The UDP check: a request on a connected socket of its own, and its answer read when the
//! schedule next ticks rather than when it arrives.
//!
//! Its socket is not watched for answers, so an answer costs no wake-up of the prober: at
//! 1 ms checks the prober wakes once per tick for every check instead of once more per
//! answer. The kernel stamps each answer on arrival (`SO_TIMESTAMPNS`), so its round trip
//! and whether it beat its deadline are exact however late the tick that reads it. A
//! refusal (ICMP port unreachable) is different: it is the evidence of a dead server, so
//! the sockets sit in an epoll set that reports errors only ([`Refusals`]), and a refusal
//! wakes the prober at once.

use std::{
    io::{ErrorKind, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Context, Result};
use nix::{
    cmsg_space,
    errno::Errno,
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
        socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, RecvMsg},
        time::TimeSpec,
    },
};
use tokio::io::{unix::AsyncFd, Interest};

/// A UDP check's target and the connected sockets of its finished attempts.
///
/// An attempt takes a socket of its own (from `idle`, or a new one), so that an answer is
/// always its own request's: one arriving after its attempt gave up finds the socket
/// closed. A socket goes back to `idle` only after its answer was read, so an idle socket
/// has nothing pending; at a steady pace one socket does all the work, one `send` and one
/// `recvmsg` per attempt.
pub struct UdpProbe {
    target: SocketAddr,
    send: Vec<u8>,
    expect: Option<Vec<u8>>,
    idle: Vec<UdpSocket>,
    /// Where its sockets report refusals, once the schedule watches them.
    refusals: Option<Arc<Epoll>>,
}

/// A request sent and not answered yet.
pub struct Sent {
    socket: UdpSocket,
}

/// What reading a sent request's socket found.
pub struct Answer {
    /// Passed, or why not (refused, unexpected content).
    pub result: Result<()>,
    /// When the kernel received it (when the reading found it, for a refusal).
    pub arrived: Instant,
}

impl UdpProbe {
    /// A check sending `send` to `target`, expecting an answer that starts with `expect`
    /// (any answer when `None`).
    pub fn new(target: SocketAddr, send: Vec<u8>, expect: Option<Vec<u8>>) -> Self {
        UdpProbe {
            target,
            send,
            expect,
            idle: Vec::new(),
            refusals: None,
        }
    }

    /// Reports the refusals of every socket it opens from now on to `refusals`.
    pub fn report_refusals_to(&mut self, refusals: &Refusals) {
        self.refusals = Some(refusals.set.get_ref().0.clone());
    }

    /// Sends one request on a socket of its own.
    pub fn send(&mut self) -> Result<Sent> {
        let socket = match self.idle.pop() {
            Some(socket) => socket,
            None => self.open()?,
        };
        socket
            .send(&self.send)
            .with_context(|| format!("send to {}", self.target))?;
        Ok(Sent { socket })
    }

    /// The answer to `sent`, if one has come; the socket goes back to the idle ones after an
    /// answer that passed.
    pub fn read(&mut self, sent: &mut Option<Sent>) -> Option<Answer> {
        let socket = &sent.as_ref()?.socket;
        let mut buf = [0u8; 2048];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = cmsg_space!(TimeSpec);
        let got = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        );
        let now = Instant::now();
        let (len, stamp) = match got {
            Err(Errno::EAGAIN) => return None,
            Err(e) => {
                let error = std::io::Error::from(e);
                let why = if error.kind() == ErrorKind::ConnectionRefused {
                    anyhow!("{} refused the request (port unreachable)", self.target)
                } else {
                    anyhow!(error).context(format!("reply from {}", self.target))
                };
                *sent = None;
                return Some(Answer {
                    result: Err(why),
                    arrived: now,
                });
            }
            Ok(message) => (message.bytes, stamp_of(&message)),
        };
        let arrived = stamp.map_or(now, |ts| arrival(ts, now));
        let result = match &self.expect {
            Some(expect) if !buf[..len].starts_with(expect) => {
                Err(anyhow!("unexpected reply from {}", self.target))
            }
            _ => Ok(()),
        };
        let socket = sent.take().map(|s| s.socket)?;
        if result.is_ok() {
            self.idle.push(socket);
        }
        Some(Answer { result, arrived })
    }

    fn open(&self) -> Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0").context("cannot open a UDP check socket")?;
        socket
            .connect(self.target)
            .with_context(|| format!("cannot connect a UDP check socket to {}", self.target))?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::ReceiveTimestampns, &true)
            .context("cannot ask for receive timestamps on a UDP check socket")?;
        if let Some(refusals) = &self.refusals {
            // No events asked for: epoll reports errors (EPOLLERR) always, answers never.
            refusals
                .add(&socket, EpollEvent::new(EpollFlags::EPOLLET, 0))
                .context("cannot watch a UDP check socket for refusals")?;
        }
        Ok(socket)
    }
}

/// The epoll set of every UDP check socket of a schedule, asked for no events: the kernel
/// still reports errors, so the set turns readable when a backend refuses a request (and
/// not when it answers), and tokio's reactor watches the set.
pub struct Refusals {
    set: AsyncFd<Set>,
}

/// The epoll set, as tokio's reactor takes it.
struct Set(Arc<Epoll>);

impl AsRawFd for Set {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_fd().as_raw_fd()
    }
}

impl Refusals {
    /// Makes the set; must be called inside the tokio runtime that will wait on it.
    pub fn new() -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .context("cannot create the epoll set of the UDP checks")?;
        // SAFETY: `Set` owns the epoll descriptor (shared only with the probes, which add
        // to it), so it stays open and the same for as long as the `AsyncFd` holding it.
        let set =
            unsafe { AsyncFd::register_with_interest(Set(Arc::new(epoll)), Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("cannot watch the epoll set of the UDP checks")?;
        Ok(Refusals { set })
    }

    /// Waits until a socket of the set was refused something (its error is then read with
    /// its answer).
    pub async fn wait(&self) -> Result<()> {
        let mut guard = self
            .set
            .readable()
            .await
            .context("cannot wait on the epoll set of the UDP checks")?;
        let mut events = [EpollEvent::empty(); 16];
        while guard
            .get_inner()
            .0
            .wait(&mut events, EpollTimeout::ZERO)
            .context("cannot read the epoll set of the UDP checks")?
            == events.len()
        {}
        guard.clear_ready();
        Ok(())
    }
}

/// The kernel's arrival stamp of a message read with `SO_TIMESTAMPNS` on.
pub(super) fn stamp_of(message: &RecvMsg<'_, '_, ()>) -> Option<TimeSpec> {
    message.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::ScmTimestampns(ts) => Some(ts),
            _ => None,
        })
    })
}

/// The instant the kernel stamped `stamp` (on the real-time clock), seen from `now`: an
/// answer cannot have come after it was read, and a clock step turns into "now".
pub(super) fn arrival(stamp: TimeSpec, now: Instant) -> Instant {
    let stamped = SystemTime::UNIX_EPOCH + Duration::from(stamp);
    let age = SystemTime::now()
        .duration_since(stamped)
        .unwrap_or_default();
    now.checked_sub(age).unwrap_or(now)
}
