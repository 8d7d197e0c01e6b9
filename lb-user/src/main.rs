//! `lb`: the command line of the XDP failover load balancer.

mod client;
mod demo;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_user::{
    agent::{self, RunOptions},
    config::{Config, HostRole, XdpModeSetting, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_PATH},
    plan::Plan,
};

/// How long `lb notify` waits for an agent that cannot be reached (one starting or
/// restarting) before it gives up.
const NOTIFY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the agent's control socket is, for the commands that talk to it.
#[derive(clap::Args)]
struct Socket {
    /// The agent's control socket.
    #[arg(long = "socket", env = "LB_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    path: PathBuf,
}

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
        /// The control socket; overrides `control_socket` from the config.
        #[arg(long, env = "LB_SOCKET")]
        control_socket: Option<PathBuf>,
    },
    /// Make the running agent read its config file again and apply the changes (services,
    /// VIPs, backends, checks) without disturbing what did not change; an invalid config is
    /// refused and nothing changes. SIGHUP does the same.
    Reload {
        #[command(flatten)]
        socket: Socket,
    },
    /// Stop for good: detach the program from every NIC and remove its pinned maps (the
    /// connection table and counters with them). A running agent is asked to do it through
    /// its control socket, and exits with status 3, which its service manager does not
    /// restart; without an agent, `lb down` removes the pins itself.
    Down {
        /// Take `pin_path` and `control_socket` from this config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory [default: the config's `pin_path`, else /sys/fs/bpf/lb].
        #[arg(long, env = "LB_PIN_PATH")]
        pin_path: Option<PathBuf>,
        /// The running agent's control socket [default: the config's `control_socket`,
        /// else /run/lb/lb.sock].
        #[arg(long = "socket", env = "LB_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Validate a config file and print the resolved plan.
    CheckConfig {
        /// The config file (TOML).
        config: PathBuf,
    },
    /// Print the state of the running agent.
    Status {
        #[command(flatten)]
        socket: Socket,
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
        #[command(flatten)]
        socket: Socket,
    },
    /// Take BACKEND of SERVICE out of service: no new flows; if it was active, the next
    /// backend takes over, and its TCP connections finish under the service's failback rules.
    Drain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        #[command(flatten)]
        socket: Socket,
    },
    /// Put a drained BACKEND of SERVICE back into service.
    Undrain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        #[command(flatten)]
        socket: Socket,
    },
    /// Make this switch host the active or the standby host of its pair (pair mode): the
    /// active one answers ARP for the VIPs and serves them, and announces them with
    /// gratuitous ARP when it becomes active; the standby serves nothing of them.
    Role {
        /// The role.
        #[arg(value_enum)]
        role: HostRole,
        #[command(flatten)]
        socket: Socket,
    },
    /// keepalived's notify script: `notify "/usr/local/bin/lb notify"` in a vrrp_instance
    /// or vrrp_sync_group; keepalived appends TYPE NAME STATE PRIORITY. MASTER makes this
    /// host active; BACKUP, FAULT and STOP make it standby. An agent that cannot be reached
    /// (starting, restarting) is waited for up to 10 s.
    Notify {
        /// `INSTANCE` or `GROUP`.
        kind: String,
        /// The instance's or group's name.
        name: String,
        /// `MASTER`, `BACKUP`, `FAULT`, `STOP` (or `DELETED`, which changes nothing).
        state: String,
        /// The priority (keepalived passes it; unused).
        priority: Option<String>,
        #[command(flatten)]
        socket: Socket,
    },
    /// Make BACKEND the active backend of SERVICE now (manual failover).
    Activate {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        #[command(flatten)]
        socket: Socket,
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
                control_socket,
            } => {
                let ended = agent::run(RunOptions {
                    config,
                    ifaces,
                    xdp_mode,
                    force,
                    pin_path,
                    control_socket,
                })
                .await?;
                if ended == agent::Ended::TakenDown {
                    // Everything is removed already; the status tells a service manager
                    // not to start the agent again.
                    std::process::exit(agent::EXIT_TAKEN_DOWN);
                }
                Ok(())
            }
            Command::CheckConfig { config } => check_config(&config).await,
            Command::Down {
                config,
                pin_path,
                socket,
            } => {
                let config = config.map(|path| Config::load(&path)).transpose()?;
                let pin_path = pin_path
                    .or_else(|| config.as_ref().map(|c| c.pin_path.clone()))
                    .unwrap_or_else(|| DEFAULT_PIN_PATH.into());
                let socket = socket
                    .or_else(|| config.as_ref().map(|c| c.control_socket.clone()))
                    .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
                down(&pin_path, &socket).await
            }
            Command::Demo { duration } => demo::run(std::time::Duration::from_secs(duration)).await,
            Command::Status { socket } => client::Agent::new(&socket.path)?.status().await,
            Command::Reload { socket } => client::Agent::new(&socket.path)?.reload().await,
            Command::Activate {
                service,
                backend,
                socket,
            } => {
                let agent = client::Agent::new(&socket.path)?;
                agent.act("activate", &service, &backend).await
            }
            Command::Drain {
                service,
                backend,
                socket,
            } => {
                let agent = client::Agent::new(&socket.path)?;
                agent.act("drain", &service, &backend).await
            }
            Command::Undrain {
                service,
                backend,
                socket,
            } => {
                let agent = client::Agent::new(&socket.path)?;
                agent.act("undrain", &service, &backend).await
            }
            Command::Role { role, socket } => {
                let agent = client::Agent::new(&socket.path)?;
                agent.role(role, "lb role").await
            }
            Command::Notify {
                kind,
                name,
                state,
                priority: _,
                socket,
            } => {
                let Some(role) = lb_user::pair::keepalived::role_for(&state)? else {
                    println!("keepalived {kind} {name} {state}: nothing to do");
                    return Ok(());
                };
                let agent = client::Agent::new(&socket.path)?;
                let why = format!("keepalived {kind} {name} {state}");
                agent.role_when_reachable(role, &why, NOTIFY_PATIENCE).await
            }
            Command::Flows {
                service,
                backend,
                socket,
            } => {
                let agent = client::Agent::new(&socket.path)?;
                agent.flows(service, backend).await
            }
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

/// `lb down`: through the running agent when there is one, else by itself.
async fn down(pin_path: &std::path::Path, socket: &std::path::Path) -> Result<()> {
    let text = if lb_user::dataplane::pins::in_use(pin_path)? {
        client::Agent::new(socket)?
            .down(pin_path)
            .await
            .with_context(|| {
                format!(
                    "an lb agent runs on pin directory {}, and it did not take the dataplane \
                     down (its control socket: --socket, LB_SOCKET or the config's \
                     control_socket)",
                    pin_path.display()
                )
            })?
    } else {
        agent::down(pin_path)?.describe(pin_path)
    };
    print!("{text}");
    Ok(())
}
