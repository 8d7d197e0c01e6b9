//! Health probes: each attempt one real request to a backend, independent of the others in
//! flight; [`pipeline`] sends them on schedule and decides each by its deadline, on the
//! prober thread ([`thread`]) with a precise timer ([`timer`]). The `link` probe reads the
//! carrier table that carrier events ([`crate::net::events`]) keep current: a carrier loss
//! turns the backend down at once (the engine acts on the event itself), a carrier return
//! counts like any passed probe, so it needs `rise` of them.

pub mod icmp;
pub mod pipeline;
mod schedule;
pub mod stagger;
pub mod thread;
pub mod timer;
pub mod udp;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::BoxFuture;
use tokio::net::TcpStream;

use crate::config::CheckConfig;
use icmp::IcmpProbe;
use udp::UdpProbe;

/// Carrier of every NIC the agent uses, kept current by carrier events.
pub type Carriers = Arc<HashMap<u32, AtomicBool>>;

/// A probe of one check of one backend: each [`Probe::attempt`] is one request, independent
/// of the attempts still in flight.
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
        /// Shared client: keeps connections alive between attempts.
        client: reqwest::Client,
        /// Full URL.
        url: Arc<str>,
        /// Expected status.
        status: u16,
    },
    /// UDP request and reply, the reply read at the schedule's ticks.
    Udp(UdpProbe),
    /// ICMP echo on the agent's one ICMP socket, the reply read at the schedule's ticks.
    Icmp(IcmpProbe),
}

/// One attempt as the schedule follows it.
pub enum Attempt {
    /// Decided as it was made (the link check reads its carrier table; a send that failed).
    Decided(Result<()>),
    /// Decides itself (a connect, a GET): the schedule wakes when it completes.
    Awaited(BoxFuture<'static, Result<()>>),
    /// A request sent whose answer waits in its socket until the schedule's next tick reads
    /// it (UDP): no wake-up per answer.
    Polled(udp::Sent),
    /// An echo request sent, its reply read from the shared ICMP socket at the schedule's
    /// next tick.
    Echoed(icmp::Sent),
}

/// The one ICMP socket the probes of an engine share, opened by the first ICMP check.
#[derive(Default)]
pub struct IcmpSocket(Mutex<Option<Arc<icmp::Socket>>>);

impl IcmpSocket {
    fn get(&self) -> Result<Arc<icmp::Socket>> {
        let mut socket = self.0.lock().expect("ICMP socket lock");
        if let Some(socket) = &*socket {
            return Ok(socket.clone());
        }
        let opened = icmp::Socket::open()?;
        *socket = Some(opened.clone());
        Ok(opened)
    }
}

impl Probe {
    /// Builds the probe of `check` for the backend at `ip`, reached through NIC `ifindex`;
    /// an ICMP check pings on `icmp`. Attempts carry no timeout of their own: the schedule
    /// ([`pipeline`]) decides each by its deadline and cancels it.
    pub async fn new(
        check: &CheckConfig,
        ip: Ipv4Addr,
        ifindex: u32,
        carriers: &Carriers,
        icmp: &IcmpSocket,
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
                    .no_proxy()
                    .build()
                    .context("cannot build the HTTP client")?,
                url: format!("http://{ip}:{}{path}", port(p)?).into(),
                status: *status,
            },
            CheckConfig::Udp {
                port: p,
                send,
                expect,
            } => Probe::Udp(UdpProbe::new(
                SocketAddr::new(ip.into(), port(p)?),
                send.clone().into_bytes(),
                expect.clone().map(String::into_bytes),
            )),
            CheckConfig::Icmp => Probe::Icmp(IcmpProbe::new(icmp.get()?, ip)),
        })
    }

    /// Starts one attempt. An awaited one owns what it needs, so attempts overlap; the
    /// caller bounds each by its deadline (dropping it cancels it).
    pub fn attempt(&mut self) -> Attempt {
        match self {
            Probe::Link { carriers, ifindex } => Attempt::Decided(
                match carriers.get(ifindex).map(|c| c.load(Ordering::Relaxed)) {
                    Some(true) => Ok(()),
                    _ => Err(anyhow!("no carrier on interface {ifindex}")),
                },
            ),
            Probe::Udp(udp) => match udp.send() {
                Ok(sent) => Attempt::Polled(sent),
                Err(e) => Attempt::Decided(Err(e)),
            },
            Probe::Tcp(target) => {
                let target = *target;
                Attempt::Awaited(Box::pin(async move {
                    let stream = TcpStream::connect(target)
                        .await
                        .with_context(|| format!("connect {target}"))?;
                    // Closed with a reset: a probe leaves no TIME_WAIT behind (at 1 ms
                    // checks a normal close would keep tens of thousands of sockets waiting).
                    stream.set_zero_linger()?;
                    Ok(())
                }))
            }
            Probe::Http {
                client,
                url,
                status,
            } => {
                let (client, url, status) = (client.clone(), url.clone(), *status);
                Attempt::Awaited(Box::pin(async move {
                    let response = client
                        .get(&*url)
                        .send()
                        .await
                        .with_context(|| format!("GET {url}"))?;
                    let got = response.status().as_u16();
                    // Read the body so the connection can be reused.
                    let _ = response.bytes().await;
                    if got != status {
                        bail!("GET {url}: status {got}, expected {status}");
                    }
                    Ok(())
                }))
            }
            Probe::Icmp(echo) => match echo.send() {
                Ok(sent) => Attempt::Echoed(sent),
                Err(e) => Attempt::Decided(Err(e)),
            },
        }
    }
}
