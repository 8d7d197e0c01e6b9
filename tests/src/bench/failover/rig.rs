//! One system under test on the testbed: `lb` (XDP) or keepalived VRRP, with the benchmark
//! servers on master and slave, iperf3 servers, and the logs the measurements come from.

use std::{
    net::UdpSocket,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_user::testbed::{
    process::Process,
    topology::{TCP_PORT, UDP_PORT, VIP},
    Host, Testbed,
};

use super::super::{
    interrupt, keepalived,
    responder::{read_log_since, Logged},
};
use super::tuning::Tuning;
use crate::procfs::{stat_fields, udp_rcvbuf_errors};

/// The iperf3 port (control over TCP, data over UDP).
pub const IPERF_PORT: u16 = 5201;
/// Where the agent serves its metrics inside the switch namespace.
pub const LISTEN: &str = "127.0.0.1:9100";
/// Which system moves the traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `lb`: the XDP program on the switch, health checks every millisecond.
    Lb(Tuning),
    /// keepalived VRRP on master and slave with this advertisement interval; the switch is
    /// an L2 bridge.
    Keepalived(Duration),
}

impl Kind {
    /// The name in the report.
    pub fn label(&self) -> String {
        match self {
            Kind::Lb(tuning) => format!(
                "lb (XDP, link + 1 ms UDP checks, {} ms timeout{})",
                tuning.timeout_ms,
                tuning.prober.label()
            ),
            Kind::Keepalived(advert) => {
                format!("keepalived VRRP, advert_int {} s", advert.as_secs_f64())
            }
        }
    }

    /// The file name of the picture of this system's client view.
    pub fn picture(&self) -> String {
        match self {
            Kind::Lb(Tuning::DEFAULT) => "failover-lb.svg".into(),
            Kind::Lb(tuning) => format!(
                "failover-lb-{}ms{}.svg",
                tuning.timeout_ms,
                tuning.prober.file_suffix()
            ),
            Kind::Keepalived(advert) => {
                format!("failover-keepalived-{}.svg", advert.as_secs_f64())
            }
        }
    }

    /// How long a stream runs on after the fault: long enough for this system to move the
    /// traffic, with a margin.
    pub fn settle(&self) -> Duration {
        match self {
            // Room for the kernel to bring a port back up and for the checks to pass `rise`
            // times on a loaded machine.
            Kind::Lb(_) => Duration::from_millis(1500),
            Kind::Keepalived(advert) => *advert * 4 + Duration::from_millis(1500),
        }
    }
}

/// One move of the `requests` service, as the agent logged it.
#[derive(Debug, Clone)]
pub struct Flip {
    /// Deciding event → map write done, in µs.
    pub us: f64,
    /// Of it, deciding event → the agent acting on it (its prober woken late), in µs.
    pub waited_us: f64,
    /// What decided it.
    pub cause: String,
}

/// A built testbed with one system running on it. Fields drop in order: processes first,
/// then the testbed (namespaces).
pub struct Rig {
    master_server: Option<Process>,
    _slave_server: Process,
    daemons: Vec<Process>,
    /// The hosts.
    pub testbed: Testbed,
    /// The system.
    pub kind: Kind,
    exe: PathBuf,
    master_log: LogTail,
    slave_log: LogTail,
    lb_log: Option<PathBuf>,
    /// Where the system's control plane runs: the agent's index in the testbed's
    /// processes (`lb`), or the master's keepalived's index in `daemons` and its config.
    control: Control,
}

/// The process that decides where the traffic goes, as the restart experiments stop and
/// start it.
enum Control {
    /// Not started yet.
    None,
    /// `lb`'s agent: its index in the testbed's processes.
    Agent(usize),
    /// keepalived on the master: its index in `daemons` and its config.
    MasterKeepalived(usize, String),
}

/// How the control plane is stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// SIGTERM, and wait for the exit: a restart by an operator or a service manager.
    Term,
    /// SIGKILL of every process of it: a crash.
    Kill,
}

impl Rig {
    /// Builds the testbed `PREFIX-…` and starts `kind` on it; returns once the master
    /// answers requests to the VIP.
    pub fn new(prefix: &str, kind: Kind) -> Result<Rig> {
        let testbed = Testbed::new(prefix)?;
        let exe = std::env::current_exe().context("cannot find the lb-bench executable")?;
        let dir = testbed.dir().to_path_buf();
        let bind = match kind {
            Kind::Lb(_) => None,
            Kind::Keepalived(_) => Some(VIP),
        };
        let master_log = LogTail::new(dir.join("master.log"));
        let slave_log = LogTail::new(dir.join("slave.log"));
        let slave_server = start_server(&testbed, &exe, Host::Slave, &slave_log.path, bind)?;
        let master_server = start_server(&testbed, &exe, Host::Master, &master_log.path, bind)?;
        let mut rig = Rig {
            master_server: Some(master_server),
            _slave_server: slave_server,
            daemons: Vec::new(),
            testbed,
            kind,
            exe,
            master_log,
            slave_log,
            lb_log: None,
            control: Control::None,
        };
        rig.testbed.start_tcp_responder(Host::Master, "master")?;
        rig.testbed.start_tcp_responder(Host::Slave, "slave")?;
        for host in [Host::Master, Host::Slave] {
            let mut command = rig.testbed.host(host).command("iperf3");
            command
                .args(["-s", "-p", &IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            rig.daemons.push(Process::spawn(command, "iperf3 server")?);
        }
        match kind {
            Kind::Lb(tuning) => rig.start_lb(tuning)?,
            Kind::Keepalived(advert) => rig.start_keepalived(advert)?,
        }
        rig.wait_master_serving(Duration::from_secs(30))?;
        Ok(rig)
    }

    fn start_lb(&mut self, tuning: Tuning) -> Result<()> {
        let config = lb_config(tuning);
        self.testbed.write_file("lb.toml", &config)?;
        let log = self.testbed.dir().join("lb.log");
        self.lb_log = Some(log);
        self.spawn_agent()
    }

    /// Starts the agent with the written config, its log appended to `lb.log` (the flip
    /// durations are read from it at the end), and waits until it serves.
    fn spawn_agent(&mut self) -> Result<()> {
        let config = self.testbed.dir().join("lb.toml");
        let log = self.testbed.dir().join("lb.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut command = self.testbed.lb_command()?;
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .stdout(file.try_clone()?)
            .stderr(file);
        let process = Process::spawn(command, "lb")?;
        let index = match self.control {
            Control::Agent(index) => {
                self.testbed.processes[index] = process;
                index
            }
            _ => {
                self.testbed.processes.push(process);
                self.testbed.processes.len() - 1
            }
        };
        self.control = Control::Agent(index);
        self.testbed.wait_for_agent(index, LISTEN)
    }

    fn start_keepalived(&mut self, advert: Duration) -> Result<()> {
        keepalived::bridge(&self.testbed)?;
        let dir = self.testbed.dir().to_path_buf();
        // The master's server, by its log path on its command line: unique to this testbed
        // (pgrep sees every namespace's processes).
        let check = format!("/usr/bin/pgrep -f {}", self.master_log.path.display());
        let master = keepalived::config("master", 150, advert, Some(&check));
        let slave = keepalived::config("slave", 100, advert, None);
        self.daemons
            .push(keepalived::start(&self.testbed, Host::Slave, &dir, &slave)?);
        self.daemons.push(keepalived::start(
            &self.testbed,
            Host::Master,
            &dir,
            &master,
        )?);
        self.control = Control::MasterKeepalived(self.daemons.len() - 1, master);
        keepalived::wait_holder(
            &self.testbed,
            Host::Master,
            Host::Slave,
            Duration::from_secs(30),
        )
    }

    /// Turns the master's switch port off or on.
    pub fn set_master_link(&self, up: bool) -> Result<()> {
        self.testbed.set_link(Host::Master, up)
    }

    /// Makes the master host silent (every frame to and from its NIC dropped, as for a hung
    /// machine or one behind a failed switch; its carrier stays up), or speaking again.
    pub fn set_master_silent(&self, silent: bool) -> Result<()> {
        self.testbed.set_silent(Host::Master, silent)?;
        if !silent && matches!(self.kind, Kind::Keepalived(_)) {
            // Both VRRP routers held the VIP while they could not hear each other; the one
            // that gives it up sends no gratuitous ARP, so the client would go on asking the
            // slave until its neighbour entry ages out. Not part of any measurement.
            self.testbed.client.ip(&["neigh", "flush", "dev", "eth0"])?;
        }
        Ok(())
    }

    /// Freezes the master's server (SIGSTOP: its socket stays open, nothing answers, the
    /// kernel refuses nothing), or thaws it (SIGCONT).
    pub fn freeze_master_server(&self, frozen: bool) -> Result<()> {
        self.master_server
            .as_ref()
            .context("the master's server is not running")?
            .freeze(frozen)
    }

    /// Kills the master's server (SIGKILL); its link stays up.
    pub fn kill_master_server(&mut self) {
        if let Some(mut server) = self.master_server.take() {
            server.kill();
        }
    }

    /// Starts the master's server again.
    pub fn restart_master_server(&mut self) -> Result<()> {
        if self.master_server.is_none() {
            let bind = match self.kind {
                Kind::Lb(_) => None,
                Kind::Keepalived(_) => Some(VIP),
            };
            self.master_server = Some(start_server(
                &self.testbed,
                &self.exe,
                Host::Master,
                &self.master_log.path,
                bind,
            )?);
        }
        Ok(())
    }

    /// Stops the control plane (`lb`'s agent, or keepalived on the master) as `how` says.
    /// `lb`'s dataplane stays pinned and forwards on; keepalived's slave takes the VIP over.
    pub fn stop_control_plane(&mut self, how: Stop) -> Result<()> {
        let process = match &self.control {
            Control::Agent(index) => &mut self.testbed.processes[*index],
            Control::MasterKeepalived(index, _) => &mut self.daemons[*index],
            Control::None => bail!("no control plane is running"),
        };
        match how {
            Stop::Term => {
                process.terminate()?;
            }
            Stop::Kill => kill_with_children(process),
        }
        Ok(())
    }

    /// Starts the control plane stopped by [`Rig::stop_control_plane`] again; for `lb`, waits
    /// until the agent serves (it adopts the pinned dataplane).
    pub fn start_control_plane(&mut self) -> Result<()> {
        match &self.control {
            Control::Agent(_) => self.spawn_agent(),
            Control::MasterKeepalived(index, config) => {
                let process =
                    keepalived::start(&self.testbed, Host::Master, self.testbed.dir(), config)?;
                self.daemons[*index] = process;
                Ok(())
            }
            Control::None => bail!("no control plane was started"),
        }
    }

    /// Waits until 20 requests in a row to the VIP are answered by the master.
    pub fn wait_master_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let socket = self
            .testbed
            .client
            .enter(|| UdpSocket::bind("0.0.0.0:0"))??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut in_a_row = 0;
        let mut buf = [0u8; 256];
        let mut last_answer = String::from("none");
        while Instant::now() < deadline {
            interrupt::check()?;
            socket.send_to(b"ready?", (VIP, UDP_PORT))?;
            let answered_by_master = match socket.recv_from(&mut buf) {
                Ok((len, _)) => {
                    last_answer = String::from_utf8_lossy(&buf[..len]).into_owned();
                    &buf[..len] == b"master"
                }
                Err(_) => false,
            };
            in_a_row = if answered_by_master { in_a_row + 1 } else { 0 };
            if in_a_row >= 20 {
                self.master_log.skip()?;
                self.slave_log.skip()?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "{}: the master did not serve the VIP again within {timeout:?} (last answer: {})",
            self.kind.label(),
            last_answer
        )
    }

    /// What both servers logged since the last call: (master, slave).
    pub fn new_log_entries(&mut self) -> Result<(Vec<Logged>, Vec<Logged>)> {
        Ok((self.master_log.read()?, self.slave_log.read()?))
    }

    /// Datagrams the UDP sockets of the client and both backends have dropped so far for a
    /// full receive buffer (their namespaces' `RcvbufErrors`, summed): a loss of the bench's
    /// own endpoints, starved of CPU, and not of the system measured.
    pub fn endpoint_socket_drops(&self) -> Result<u64> {
        let mut sum = 0;
        for host in [
            &self.testbed.client,
            &self.testbed.master,
            &self.testbed.slave,
        ] {
            sum += host.enter(udp_rcvbuf_errors)??;
        }
        Ok(sum)
    }

    /// The pid of `lb`'s agent, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        match self.control {
            Control::Agent(index) => self.testbed.processes[index].pid(),
            _ => None,
        }
    }

    /// The flips the agent logged so far for moves of the `requests` service from one
    /// backend to another (not its first activation), for `lb` only.
    pub fn flips(&self) -> Result<Vec<Flip>> {
        let Some(path) = &self.lb_log else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the agent's log {}", path.display()))?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| {
                let fields = &entry["fields"];
                let moved = fields["service"] == "requests"
                    && fields["from"].as_str().is_some_and(|from| from != "none");
                moved.then_some(())?;
                Some(Flip {
                    us: fields["flip_us"].as_f64()?,
                    waited_us: fields["waited_us"].as_f64().unwrap_or(0.0),
                    cause: fields["cause"].as_str().unwrap_or("").to_string(),
                })
            })
            .collect())
    }
}

/// The agent config: the request service, the TCP connection service and the iperf3 ports,
/// each moved by the master's link and (for the request service) a UDP check every
/// millisecond with the `tuning`'s timeout, fall 3, rise 3; the prober scheduled as the
/// `tuning` says.
pub fn lb_config(tuning: Tuning) -> String {
    let fast = format!(
        "interval = \"1ms\", timeout = \"{}ms\", rise = 3, fall = 3",
        tuning.timeout_ms
    );
    let link = format!("{{ checks = [{{ type = \"link\" }}], {fast} }}");
    let link_udp = format!(
        "{{ checks = [{{ type = \"link\" }}, {{ type = \"udp\", send = \"probe\" }}], {fast} }}"
    );
    Testbed::config_head(LISTEN)
        + &Testbed::service_toml("requests", "udp", UDP_PORT, &link_udp)
        + &Testbed::service_toml("connections", "tcp", TCP_PORT, &link)
        + &Testbed::service_toml("iperf-control", "tcp", IPERF_PORT, &link)
        + &Testbed::service_toml("iperf-data", "udp", IPERF_PORT, &link)
        + &tuning.prober.config_table()
}

/// SIGKILL to `process` and every child it forked, as a crash of the whole daemon.
/// keepalived runs its VRRP instance in a child, which its parent would start again, or which
/// would stop gracefully when its parent dies; so the parent is stopped first (SIGSTOP), the
/// children killed, then the parent.
/// The killed children come to this process (made a subreaper) once their parent is gone,
/// and are reaped here: a zombie's pid still looks alive to the daemon's next start.
fn kill_with_children(process: &mut Process) {
    // SAFETY: prctl(2) with an integer argument; it only marks this process as a subreaper.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let children = process.pid().map(children_of).unwrap_or_default();
    if let Some(parent) = process.pid() {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(parent as i32, libc::SIGSTOP) };
    }
    for child in &children {
        // SAFETY: kill(2) on a pid just read from /proc as a child of our own child, which
        // is stopped and so cannot reap it (the pid cannot be reused meanwhile).
        unsafe { libc::kill(*child as i32, libc::SIGKILL) };
    }
    process.kill();
    for child in children {
        // SAFETY: waitpid(2) on a killed process that is now our child.
        unsafe { libc::waitpid(child as i32, std::ptr::null_mut(), 0) };
    }
}

/// The pids whose parent is `parent`, from `/proc/*/stat`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The parent's pid is field 4 of proc(5).
            stat_fields(&format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|fields| fields.get(4 - 3)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

fn start_server(
    testbed: &Testbed,
    exe: &std::path::Path,
    host: Host,
    log: &std::path::Path,
    bind: Option<std::net::Ipv4Addr>,
) -> Result<Process> {
    let name = format!("{host:?}").to_lowercase();
    let mut command = testbed.host(host).command(&exe.to_string_lossy());
    command
        .args(["responder", "--name", &name, "--log"])
        .arg(log);
    if let Some(bind) = bind {
        command.args(["--bind", &bind.to_string()]);
    }
    let process = Process::spawn(command, &format!("server on {name}"))?;
    // The server is ready once its log exists.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.exists() {
        if Instant::now() > deadline {
            bail!("the server on {name} did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(process)
}

/// A growing log read piece by piece.
struct LogTail {
    path: PathBuf,
    offset: u64,
}

impl LogTail {
    fn new(path: PathBuf) -> Self {
        LogTail { path, offset: 0 }
    }

    fn read(&mut self) -> Result<Vec<Logged>> {
        let (entries, offset) = read_log_since(&self.path, self.offset)?;
        self.offset = offset;
        Ok(entries)
    }

    fn skip(&mut self) -> Result<()> {
        self.read().map(|_| ())
    }
}
