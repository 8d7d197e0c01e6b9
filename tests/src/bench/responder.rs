//! The benchmark server: a UDP server, run as its own process inside a backend's namespace
//! so that a bench can kill it the way a crash would.
//!
//! - `seq N` (a client request): answered with `NAME seq N`; logged.
//! - `loss N …` (one datagram of a one-way stream): logged, not answered.
//! - anything else (a health probe): answered with `NAME`, not logged.
//!
//! The log has one line per datagram, `REALTIME_NS KIND N`, written with one `write(2)` right
//! after the answer (no user-space buffer), so a SIGKILL loses at most the line of the one
//! request being answered at that moment. All namespaces share
//! the clock, so logs of two servers can be compared.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

/// Options of `lb-bench responder`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Name put in every answer.
    #[arg(long)]
    pub name: String,
    /// UDP port.
    #[arg(long, default_value_t = lb_user::testbed::topology::UDP_PORT)]
    pub port: u16,
    /// Address to bind (bound with IP_FREEBIND, so a VIP that is not here yet works).
    #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
    pub bind: Ipv4Addr,
    /// Log of answered requests and received stream datagrams.
    #[arg(long)]
    pub log: PathBuf,
}

/// Serves until killed.
pub fn run(args: Args) -> Result<()> {
    let socket = bind_freely(SocketAddrV4::new(args.bind, args.port))?;
    // Appended to: a restarted server continues the log of the one that was killed.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .with_context(|| format!("cannot open {}", args.log.display()))?;
    let mut buf = [0u8; 2048];
    let mut line = Vec::with_capacity(64);
    loop {
        let (len, from) = socket.recv_from(&mut buf).context("recv")?;
        let request = &buf[..len];
        let (kind, rest, answer) = if let Some(rest) = request.strip_prefix(b"seq ") {
            ("seq", rest, true)
        } else if let Some(rest) = request.strip_prefix(b"loss ") {
            ("loss", rest, false)
        } else {
            let _ = socket.send_to(args.name.as_bytes(), from);
            continue;
        };
        let number = rest.split(|b| *b == b' ').next().unwrap_or_default();
        if answer {
            let mut reply = Vec::with_capacity(args.name.len() + len + 1);
            reply.extend_from_slice(args.name.as_bytes());
            reply.push(b' ');
            reply.extend_from_slice(request);
            let _ = socket.send_to(&reply, from);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        line.clear();
        write!(line, "{now} {kind} ")?;
        line.extend_from_slice(number);
        line.push(b'\n');
        log.write_all(&line).context("cannot write the log")?;
    }
}

/// A UDP socket bound with IP_FREEBIND: the address may not be local yet (a VRRP VIP that
/// keepalived has not moved here).
fn bind_freely(address: SocketAddrV4) -> Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("cannot open a UDP socket")?;
    socket.set_freebind_v4(true).context("IP_FREEBIND")?;
    give_room(&socket)?;
    socket
        .bind(&address.into())
        .with_context(|| format!("bind {address}"))?;
    Ok(socket.into())
}

/// Bytes of receive buffer for the bench's own UDP endpoints (client and servers).
const ENDPOINT_RCVBUF: usize = 8 << 20;

/// Gives `socket` a receive buffer of [`ENDPOINT_RCVBUF`] bytes (`SO_RCVBUFFORCE`, past
/// `net.core.rmem_max`; the bench runs as root; the kernel doubles the value for its own
/// bookkeeping). The bench's client and servers share two cores with the system measured: a
/// server kept off the CPU for a few milliseconds (while an agent starts, say) would
/// otherwise overflow the default buffer at 20 000 requests/s and count its own drops as the
/// system's losses.
pub fn give_room(socket: &impl std::os::fd::AsFd) -> Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &ENDPOINT_RCVBUF,
    )
    .context("cannot enlarge a bench socket's receive buffer (SO_RCVBUFFORCE; run as root)")
}

/// One line of a responder log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    /// CLOCK_REALTIME in nanoseconds.
    pub at_ns: u128,
    /// A request (`seq`) rather than a stream datagram (`loss`).
    pub request: bool,
    /// Its number.
    pub number: u64,
}

/// Reads what was appended to a responder log since byte `offset` (a missing file is an
/// empty log); returns the complete lines and the offset after the last of them.
pub fn read_log_since(path: &std::path::Path, offset: u64) -> Result<(Vec<Logged>, u64)> {
    use std::io::{Read as _, Seek as _};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let text = &text[..complete];
    let entries = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let at_ns = words.next()?.parse().ok()?;
            let request = words.next()? == "seq";
            let number = words.next()?.parse().ok()?;
            Some(Logged {
                at_ns,
                request,
                number,
            })
        })
        .collect();
    Ok((entries, offset + complete as u64))
}
