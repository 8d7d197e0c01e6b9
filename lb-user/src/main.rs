//! `lb`: the command line of the XDP failover load balancer.

mod demo;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_user::{
    agent::{self, RunOptions},
    config::{Config, XdpModeSetting, DEFAULT_LISTEN, DEFAULT_PIN_PATH},
    control::{Change, Status},
    flows::FlowView,
    plan::Plan,
};

/// XDP failover load balancer: keeps each VIP on its best backend.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the program to the NICs and serve the configured VIPs until SIGINT/SIGTERM
    /// (which stop the agent alone: the dataplane forwards on, and the next `lb run`
    /// adopts it; `lb down` removes it).
    Run {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// A further NIC to attach to (repeatable); NICs of backends are added automatically.
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        /// Attachment mode; overrides `xdp_mode` from the config.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeSetting>,
        /// Replace an XDP program another tool attached to one of the NICs (a program held
        /// by another running `lb` is never taken over).
        #[arg(long)]
        force: bool,
        /// The pin directory; overrides `pin_path` from the config.
        #[arg(long, env = "LB_PIN_PATH")]
        pin_path: Option<PathBuf>,
    },
    /// Remove the dataplane for good: detach the program from every NIC and remove its
    /// pinned maps (the connection table and counters with them). `lb run` leaves the
    /// dataplane forwarding when it stops; this is how it goes. Refused while an agent runs.
    Down {
        /// Take `pin_path` from this config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory [default: the config's `pin_path`, else /sys/fs/bpf/lb].
        #[arg(long, env = "LB_PIN_PATH")]
        pin_path: Option<PathBuf>,
    },
    /// Validate a config file and print the resolved plan.
    CheckConfig {
        /// The config file (TOML).
        config: PathBuf,
    },
    /// Print the state of the running agent.
    Status {
        /// The agent's endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        endpoint: String,
    },
    /// Build a small namespace network (client, switch, master, slave with web servers), run
    /// the agent on it and show who answers the VIP; Ctrl-C tears it all down.
    Demo {
        /// Stop by itself after this many seconds.
        #[arg(long, default_value_t = 600)]
        duration: u64,
    },
    /// List the connections in the dataplane's table (like `conntrack -L`).
    Flows {
        /// Only the flows of this service.
        #[arg(long)]
        service: Option<String>,
        /// Only the flows on this backend (with --service).
        #[arg(long, requires = "service")]
        backend: Option<String>,
        /// The agent's endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        endpoint: String,
    },
    /// Take BACKEND of SERVICE out of service: no new flows; if it was active, the next
    /// backend takes over, and its TCP connections finish under the service's failback rules.
    Drain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// The agent's endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        endpoint: String,
    },
    /// Put a drained BACKEND of SERVICE back into service.
    Undrain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// The agent's endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        endpoint: String,
    },
    /// Make BACKEND the active backend of SERVICE now (manual failover).
    Activate {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// The agent's endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        endpoint: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One thread: probes, carrier events and the endpoint are short tasks, and a single
    // thread wakes up for each of them without handing work between threads (a third of the
    // CPU time of 1 ms health checks).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                ifaces,
                xdp_mode,
                force,
                pin_path,
            } => {
                let mut config = Config::load(&config)?;
                if let Some(pin_path) = pin_path {
                    config.pin_path = pin_path;
                }
                agent::run(
                    config,
                    RunOptions {
                        ifaces,
                        xdp_mode,
                        force,
                    },
                )
                .await
            }
            Command::CheckConfig { config } => check_config(&config).await,
            Command::Down { config, pin_path } => {
                let pin_path = match (pin_path, config) {
                    (Some(pin_path), _) => pin_path,
                    (None, Some(config)) => Config::load(&config)?.pin_path,
                    (None, None) => DEFAULT_PIN_PATH.into(),
                };
                down(&pin_path)
            }
            Command::Demo { duration } => demo::run(std::time::Duration::from_secs(duration)).await,
            Command::Status { endpoint } => {
                tokio::task::spawn_blocking(move || status(&endpoint)).await?
            }
            Command::Activate {
                service,
                backend,
                endpoint,
            } => {
                tokio::task::spawn_blocking(move || act(&endpoint, "activate", &service, &backend))
                    .await?
            }
            Command::Drain {
                service,
                backend,
                endpoint,
            } => {
                tokio::task::spawn_blocking(move || act(&endpoint, "drain", &service, &backend))
                    .await?
            }
            Command::Undrain {
                service,
                backend,
                endpoint,
            } => {
                tokio::task::spawn_blocking(move || act(&endpoint, "undrain", &service, &backend))
                    .await?
            }
            Command::Flows {
                service,
                backend,
                endpoint,
            } => tokio::task::spawn_blocking(move || flows(&endpoint, service, backend)).await?,
        }
    })
}

async fn check_config(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    let plan = Plan::resolve(&config, &[]).await?;
    println!("config {} is valid", path.display());
    for iface in &plan.interfaces {
        println!(
            "interface {} (ifindex {}, {}): {:?}",
            iface.name,
            iface.ifindex,
            lb_user::net::format_mac(&iface.mac),
            iface.role
        );
    }
    for service in &plan.services {
        let proto = service
            .protocol
            .map_or("any".into(), |p| format!("{p:?}").to_lowercase());
        let port = service.port.map_or("any".into(), |p| p.to_string());
        println!(
            "service {}: vip {} protocol {proto} port {port}",
            service.name, service.vip
        );
        println!(
            "  preempt {}, failback_delay {:?}, all backends down: {:?}",
            service.policy.preempt, service.policy.failback_delay, service.policy.all_down
        );
        for (rank, b) in service.backends.iter().enumerate() {
            let checks: Vec<_> = b.health.checks.iter().map(|c| c.name()).collect();
            println!(
                "  {}. {} {} priority {} via {} to {}; checks {} every {:?} (timeout {:?}, rise {}, fall {}){}",
                rank + 1,
                b.name,
                b.ip,
                b.priority,
                b.iface,
                lb_user::net::format_mac(&b.mac),
                checks.join("+"),
                b.health.interval,
                b.health.timeout,
                b.health.rise,
                b.health.fall,
                if rank == 0 { " (preferred)" } else { "" }
            );
        }
    }
    Ok(())
}

fn down(pin_path: &std::path::Path) -> Result<()> {
    let removed = agent::down(pin_path)?;
    if removed.links.is_empty() && removed.maps.is_empty() {
        println!("nothing pinned in {}", pin_path.display());
        return Ok(());
    }
    for iface in &removed.links {
        println!("detached from {iface}");
    }
    println!(
        "removed {} maps and {}",
        removed.maps.len(),
        pin_path.display()
    );
    Ok(())
}

fn endpoint_url(endpoint: &str, path: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.starts_with("http://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

fn status(endpoint: &str) -> Result<()> {
    let url = endpoint_url(endpoint, "/status");
    let status: Status = ureq::get(&url)
        .call()
        .with_context(|| {
            format!("cannot reach the agent at {url}; is `lb run` running (metrics_listen)?")
        })?
        .body_mut()
        .read_json()
        .context("the agent's /status answer is not valid")?;
    for iface in &status.interfaces {
        println!("interface {} ({})", iface.name, iface.mode);
    }
    for service in &status.services {
        println!(
            "service {} vip {} {}{}: active {}",
            service.name,
            service.vip,
            service.protocol.as_deref().unwrap_or("any"),
            service.port.map(|p| format!("/{p}")).unwrap_or_default(),
            service.active.as_deref().unwrap_or("none (dropping)")
        );
        for b in &service.backends {
            println!(
                "  {} {} {} via {} priority {}: {}{} ({}); {} flows; {} packets forward, {} reverse",
                if b.active { "*" } else { " " },
                b.name,
                b.ip,
                b.iface,
                b.priority,
                if b.up { "up" } else { "DOWN" },
                if b.drained { ", drained" } else { "" },
                b.health_cause,
                b.flows,
                b.packets_forward,
                b.packets_reverse
            );
        }
        if let Some(change) = &service.last_change {
            println!(
                "  last change: {} -> {} ({}), flip {:.1} us",
                change.from.as_deref().unwrap_or("-"),
                change.to.as_deref().unwrap_or("-"),
                change.cause,
                change.flip_us
            );
        }
    }
    Ok(())
}

/// Sends manual action `action` (`activate`, `drain`, `undrain`) for a backend.
fn act(endpoint: &str, action: &str, service: &str, backend: &str) -> Result<()> {
    let url = endpoint_url(endpoint, &format!("/services/{service}/{action}/{backend}"));
    let mut response = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_empty()
        .with_context(|| format!("cannot reach the agent at {url}; is `lb run` running?"))?;
    if !response.status().is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        bail!("the agent refused: {}", text.trim());
    }
    let change: Change = response.body_mut().read_json()?;
    println!(
        "service {service}: {} -> {} ({}; map write {:.1} us)",
        change.from.as_deref().unwrap_or("-"),
        change.to.as_deref().unwrap_or("-"),
        change.cause,
        change.flip_us
    );
    Ok(())
}

fn flows(endpoint: &str, service: Option<String>, backend: Option<String>) -> Result<()> {
    let mut url = endpoint_url(endpoint, "/flows");
    let filters: Vec<String> = [("service", service), ("backend", backend)]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
        .collect();
    if !filters.is_empty() {
        url = format!("{url}?{}", filters.join("&"));
    }
    let mut response = ureq::get(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .with_context(|| format!("cannot reach the agent at {url}; is `lb run` running?"))?;
    if !response.status().is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        bail!("the agent refused: {}", text.trim());
    }
    let flows: Vec<FlowView> = response
        .body_mut()
        .read_json()
        .context("the agent's /flows answer is not valid")?;
    println!(
        "{:<12} {:<5} {:<21} {:<21} {:<12} {:<12} {:>9} {:>7}",
        "SERVICE", "PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "AGE", "IDLE"
    );
    for f in &flows {
        println!(
            "{:<12} {:<5} {:<21} {:<21} {:<12} {:<12} {:>8.1}s {:>6.1}s",
            f.service,
            f.protocol,
            f.client.to_string(),
            f.vip.to_string(),
            f.backend,
            f.state,
            f.age_s,
            f.idle_s
        );
    }
    println!("{} flows", flows.len());
    Ok(())
}
