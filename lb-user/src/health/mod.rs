//! Health probes: one real request to a backend per call, each bounded by the check's
//! timeout. The `link` probe reads the carrier table that carrier events
//! ([`crate::net::carrier`]) keep current: a carrier loss turns the backend down at once
//! (the engine acts on the event itself), a carrier return counts like any passed probe, so
//! it needs `rise` of them.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::{net::TcpStream, time::timeout};

use crate::config::CheckConfig;

/// Carrier of every NIC the agent uses, kept current by carrier events.
pub type Carriers = Arc<HashMap<u32, AtomicBool>>;

/// A probe of one check of one backend, ready to run repeatedly.
pub enum Probe {
    /// Carrier of the NIC the backend is reached through.
    Link {
        /// The table.
        carriers: Carriers,
        /// The NIC.
        ifindex: u32,
    },
    /// TCP connect.
    Tcp(SocketAddr),
    /// HTTP GET expecting a status.
    Http {
        /// Reused client: keeps the connection alive between probes.
        client: reqwest::Client,
        /// Full URL.
        url: String,
        /// Expected status.
        status: u16,
    },
    /// UDP request and reply.
    Udp {
        /// Backend address and port.
        target: SocketAddr,
        /// Connected socket kept between probes (a new one after a failure).
        socket: Option<tokio::net::UdpSocket>,
        /// Request payload.
        send: Vec<u8>,
        /// Expected start of the reply.
        expect: Option<Vec<u8>>,
    },
    /// ICMP echo.
    Icmp {
        /// Pinger bound to the backend, on the agent's one ICMP socket.
        pinger: Box<surge_ping::Pinger>,
        /// Keeps the socket and its receiving task open: they close with the last handle.
        _client: surge_ping::Client,
        /// Sequence numbers, shared by every pinger of the socket.
        sequence: Arc<AtomicU16>,
    },
}

/// The one ICMP socket the probes of an engine share, opened by the first ICMP check.
///
/// Replies on a shared socket are told apart by address and sequence number (the kernel sets
/// the identifier of a ping socket itself), so every pinger takes its sequence numbers from
/// one counter: two checks of one address never wait for the same reply.
#[derive(Default)]
pub struct IcmpSocket(tokio::sync::OnceCell<(surge_ping::Client, Arc<AtomicU16>)>);

impl IcmpSocket {
    async fn get(&self) -> Result<&(surge_ping::Client, Arc<AtomicU16>)> {
        self.0
            .get_or_try_init(|| async {
                let client = surge_ping::Client::new(&surge_ping::Config::default())
                    .context("cannot open an ICMP socket (needs root or CAP_NET_RAW)")?;
                Ok((client, Arc::new(AtomicU16::new(0))))
            })
            .await
    }
}

/// One UDP request and its reply over `socket` (opened and connected to `target` when
/// `None`; kept for the next probe, which costs two system calls instead of eight).
async fn udp_request(
    socket: &mut Option<tokio::net::UdpSocket>,
    target: SocketAddr,
    send: &[u8],
    expect: Option<&[u8]>,
) -> Result<()> {
    let socket = match socket {
        Some(socket) => socket,
        None => {
            let fresh = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            fresh.connect(target).await?;
            socket.insert(fresh)
        }
    };
    let mut buf = [0u8; 2048];
    // A reply that arrived after an earlier probe gave up must not pass this one, nor an
    // error queued by an earlier send (ICMP unreachable) fail it: drain both, up to a bound.
    for _ in 0..64 {
        match socket.try_recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            _ => continue,
        }
    }
    socket
        .send(send)
        .await
        .with_context(|| format!("send to {target}"))?;
    let len = socket
        .recv(&mut buf)
        .await
        .with_context(|| format!("reply from {target}"))?;
    match expect {
        Some(expect) if !buf[..len].starts_with(expect) => {
            bail!("unexpected reply from {target}")
        }
        _ => Ok(()),
    }
}

/// Identifier of the next ICMP pinger (each check gets its own).
static NEXT_ICMP_ID: AtomicU16 = AtomicU16::new(0x4c42);

impl Probe {
    /// Builds the probe of `check` for the backend at `ip`, reached through NIC `ifindex`;
    /// an ICMP check pings on `icmp`.
    pub async fn new(
        check: &CheckConfig,
        ip: Ipv4Addr,
        ifindex: u32,
        carriers: &Carriers,
        icmp: &IcmpSocket,
        timeout: Duration,
    ) -> Result<Self> {
        let port = |port: &Option<u16>| {
            port.ok_or_else(|| anyhow!("{} check without a port", check.name()))
        };
        Ok(match check {
            CheckConfig::Link => Probe::Link {
                carriers: carriers.clone(),
                ifindex,
            },
            CheckConfig::Tcp { port: p } => Probe::Tcp(SocketAddr::new(ip.into(), port(p)?)),
            CheckConfig::Http {
                port: p,
                path,
                status,
            } => Probe::Http {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .build()
                    .context("cannot build the HTTP client")?,
                url: format!("http://{ip}:{}{path}", port(p)?),
                status: *status,
            },
            CheckConfig::Udp {
                port: p,
                send,
                expect,
            } => Probe::Udp {
                target: SocketAddr::new(ip.into(), port(p)?),
                socket: None,
                send: send.clone().into_bytes(),
                expect: expect.clone().map(String::into_bytes),
            },
            CheckConfig::Icmp => {
                let (client, sequence) = icmp.get().await?;
                // The identifier matters only where the socket is raw (no ping sockets).
                let id = surge_ping::PingIdentifier(NEXT_ICMP_ID.fetch_add(1, Ordering::Relaxed));
                let mut pinger = client.pinger(IpAddr::V4(ip), id).await;
                pinger.timeout(timeout);
                Probe::Icmp {
                    pinger: Box::new(pinger),
                    _client: client.clone(),
                    sequence: sequence.clone(),
                }
            }
        })
    }

    /// Runs the probe once; `Ok` when the backend passed, an error saying why not.
    pub async fn run(&mut self, limit: Duration) -> Result<()> {
        let result = match timeout(limit, self.run_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!("no answer within {limit:?}")),
        };
        if result.is_err() {
            // After any failure the next UDP probe starts on a fresh socket.
            if let Probe::Udp { socket, .. } = self {
                *socket = None;
            }
        }
        result
    }

    async fn run_unbounded(&mut self) -> Result<()> {
        match self {
            Probe::Link { carriers, ifindex } => {
                match carriers.get(ifindex).map(|c| c.load(Ordering::Relaxed)) {
                    Some(true) => Ok(()),
                    _ => bail!("no carrier on interface {ifindex}"),
                }
            }
            Probe::Tcp(target) => {
                let stream = TcpStream::connect(*target)
                    .await
                    .with_context(|| format!("connect {target}"))?;
                // Closed with a reset: a probe leaves no TIME_WAIT behind (at 1 ms checks
                // a normal close would keep tens of thousands of sockets waiting).
                stream.set_zero_linger()?;
                Ok(())
            }
            Probe::Http {
                client,
                url,
                status,
            } => {
                let response = client
                    .get(url.as_str())
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                let got = response.status().as_u16();
                // Read the body so the connection can be reused.
                let _ = response.bytes().await;
                if got != *status {
                    bail!("GET {url}: status {got}, expected {status}");
                }
                Ok(())
            }
            Probe::Udp {
                target,
                socket,
                send,
                expect,
            } => udp_request(socket, *target, send, expect.as_deref()).await,
            Probe::Icmp {
                pinger, sequence, ..
            } => {
                let sequence = sequence.fetch_add(1, Ordering::Relaxed);
                pinger
                    .ping(surge_ping::PingSequence(sequence), b"lb health check")
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("echo: {e}"))
            }
        }
    }
}
