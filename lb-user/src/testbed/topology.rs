//! The reference topology, built from network namespaces and veth pairs:
//!
//! ```text
//!  client ──eth0───c0── switch ──m0───eth0── master   198.18.2.2
//! 198.18.1.2        (lb, XDP)  ──s0───eth0── slave    198.18.3.2
//!                              ──b0───eth0── backup   198.18.4.2  (optional)
//!          VIP 198.18.1.100 on the client segment, answered by XDP
//! ```
//!
//! Hosts send with checksum offload off (so rewritten frames carry complete checksums), and
//! their end of each veth runs the pass-through XDP program: veth delivers frames sent with
//! `XDP_TX` or `XDP_REDIRECT` only to a peer that runs XDP.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub use super::tcp_responder::TCP_PORT;
use super::{
    netns::{veth, Netns},
    process::Process,
    tcp_responder::TcpResponder,
};

/// The VIP of the testbed.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The master's address.
pub const MASTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The slave's address.
pub const SLAVE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// The master's MAC.
pub const MASTER_MAC: &str = "02:00:00:00:02:02";
/// The slave's MAC.
pub const SLAVE_MAC: &str = "02:00:00:00:03:02";
/// The backup's address (third backend, when the testbed has one).
pub const BACKUP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 2);
/// The backup's MAC.
pub const BACKUP_MAC: &str = "02:00:00:00:04:02";
/// The environment variable `lb run` and `lb down` read their pin directory from.
pub const PIN_PATH_ENV: &str = "LB_PIN_PATH";
/// The environment variable `lb` reads the agent's control socket from.
pub const SOCKET_ENV: &str = "LB_SOCKET";
/// The UDP port of the testbed's request/response service.
pub const UDP_PORT: u16 = 5353;

/// Four hosts, each a namespace; everything goes away on drop.
pub struct Testbed {
    /// Processes (servers, agents), stopped before the namespaces go.
    pub processes: Vec<Process>,
    responders: Vec<(Host, UdpResponder)>,
    tcp_responders: Vec<TcpResponder>,
    veth_peers: Vec<crate::dataplane::PassProgram>,
    /// The client host.
    pub client: Netns,
    /// The switch host, where `lb` runs.
    pub switch: Netns,
    /// The master backend.
    pub master: Netns,
    /// The slave backend.
    pub slave: Netns,
    /// The third backend, if built.
    pub backup: Option<Netns>,
    web_servers: Vec<(Host, usize)>,
    /// Private directory for configs and web roots, removed on drop.
    files: tempfile::TempDir,
}

impl Testbed {
    /// Builds the topology with namespaces named `PREFIX-client` … `PREFIX-slave`.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::build(prefix, false)
    }

    /// The same with a third backend, `PREFIX-backup`.
    pub fn with_backup(prefix: &str) -> Result<Self> {
        Self::build(prefix, true)
    }

    fn build(prefix: &str, backup: bool) -> Result<Self> {
        let mut testbed = Testbed {
            processes: Vec::new(),
            responders: Vec::new(),
            tcp_responders: Vec::new(),
            veth_peers: Vec::new(),
            client: Netns::new(&format!("{prefix}-client"))?,
            switch: Netns::new(&format!("{prefix}-switch"))?,
            master: Netns::new(&format!("{prefix}-master"))?,
            slave: Netns::new(&format!("{prefix}-slave"))?,
            backup: if backup {
                Some(Netns::new(&format!("{prefix}-backup"))?)
            } else {
                None
            },
            web_servers: Vec::new(),
            files: tempfile::Builder::new()
                .prefix(&format!("{prefix}-"))
                .tempdir()
                .context("cannot create a temporary directory")?,
        };
        let (c, s, m, v) = (
            &testbed.client,
            &testbed.switch,
            &testbed.master,
            &testbed.slave,
        );
        veth(c, "eth0", "02:00:00:00:01:02", s, "c0", "02:00:00:00:01:01")?;
        veth(m, "eth0", MASTER_MAC, s, "m0", "02:00:00:00:02:01")?;
        veth(v, "eth0", SLAVE_MAC, s, "s0", "02:00:00:00:03:01")?;
        c.ip(&["addr", "add", "198.18.1.2/24", "dev", "eth0"])?;
        s.ip(&["addr", "add", "198.18.1.1/24", "dev", "c0"])?;
        s.ip(&["addr", "add", "198.18.2.1/24", "dev", "m0"])?;
        s.ip(&["addr", "add", "198.18.3.1/24", "dev", "s0"])?;
        m.ip(&["addr", "add", "198.18.2.2/24", "dev", "eth0"])?;
        v.ip(&["addr", "add", "198.18.3.2/24", "dev", "eth0"])?;
        c.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        m.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        v.ip(&["route", "add", "default", "via", "198.18.3.1"])?;
        for host in [c, m, v] {
            host.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])?;
        }
        if let Some(b) = &testbed.backup {
            veth(b, "eth0", BACKUP_MAC, s, "b0", "02:00:00:00:04:01")?;
            s.ip(&["addr", "add", "198.18.4.1/24", "dev", "b0"])?;
            b.ip(&["addr", "add", "198.18.4.2/24", "dev", "eth0"])?;
            b.ip(&["route", "add", "default", "via", "198.18.4.1"])?;
            b.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])?;
        }
        let mut hosts = vec![Host::Client, Host::Master, Host::Slave];
        if testbed.backup.is_some() {
            hosts.push(Host::Backup);
        }
        for host in hosts {
            let peer = testbed
                .host(host)
                .enter(|| crate::dataplane::PassProgram::attach("eth0"))??;
            testbed.veth_peers.push(peer);
        }
        Ok(testbed)
    }

    /// The agent config for this testbed: service `web` (TCP 80) and `echo` (UDP), master
    /// preferred, default health checks.
    pub fn config(&self, listen: &str) -> String {
        self.config_with(listen, "", "")
    }

    /// The config with extra keys for the `web` and `echo` services (health checks,
    /// policy), each a TOML fragment such as `health = { checks = [{ type = "link" }] }`.
    pub fn config_with(&self, listen: &str, web_extra: &str, echo_extra: &str) -> String {
        let backends = Self::backend_lines(self.backup.is_some());
        let head = Self::config_head(listen);
        format!(
            r#"{head}
[[services]]
name = "web"
vip = "{VIP}"
protocol = "tcp"
port = 80
{web_extra}
backends = [
{backends}]

[[services]]
name = "echo"
vip = "{VIP}"
protocol = "udp"
port = {UDP_PORT}
{echo_extra}
backends = [
{backends}]
"#
        )
    }

    /// The head of an agent config for the testbed: `metrics_listen` and the client-facing
    /// NIC `c0`.
    pub fn config_head(listen: &str) -> String {
        format!(
            "metrics_listen = \"{listen}\"\n\n[[interfaces]]\nname = \"c0\"\nrole = \"client\"\n"
        )
    }

    /// The backends of a service on the testbed, as the lines inside `backends = [ … ]`:
    /// master (priority 100) through `m0`, slave (50) through `s0`, and with `backup` the
    /// backup (10) through `b0`.
    pub fn backend_lines(backup: bool) -> String {
        let mut lines = format!(
            "  {{ name = \"master\", ip = \"{MASTER_IP}\", priority = 100, mac = \"{MASTER_MAC}\", iface = \"m0\" }},\n  \
             {{ name = \"slave\",  ip = \"{SLAVE_IP}\",  priority = 50,  mac = \"{SLAVE_MAC}\",  iface = \"s0\" }},\n"
        );
        if backup {
            lines.push_str(&format!(
                "  {{ name = \"backup\", ip = \"{BACKUP_IP}\", priority = 10, mac = \"{BACKUP_MAC}\", iface = \"b0\" }},\n"
            ));
        }
        lines
    }

    /// A `[[services]]` table for the VIP: `protocol` (`"udp"` or `"tcp"`) `port`, health
    /// checks `health` (an inline TOML table), master and slave as backends.
    pub fn service_toml(name: &str, protocol: &str, port: u16, health: &str) -> String {
        format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{VIP}\"\nprotocol = \"{protocol}\"\n\
             port = {port}\nhealth = {health}\nbackends = [\n{}]\n",
            Self::backend_lines(false)
        )
    }

    /// Writes `text` to a file removed with the testbed; returns its path.
    pub fn write_file(&mut self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.files.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The testbed's private directory (removed with it), for logs and configs.
    pub fn dir(&self) -> &std::path::Path {
        self.files.path()
    }

    /// The directory the web server of backend `name` serves (unique to this testbed).
    pub fn web_root(&self, name: &str) -> PathBuf {
        self.files.path().join(format!("www-{name}"))
    }

    /// Starts a real web server (Python's http.server) on port 80 of `host`, serving a page
    /// that says `name`, and waits until it answers.
    pub fn start_web_server(&mut self, host: Host, name: &str) -> Result<()> {
        let dir = self.web_root(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("index.html"), format!("{name}\n"))?;
        let ns = self.host(host);
        let mut command = ns.command("python3");
        command
            .args([
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(&dir);
        command
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let process = Process::spawn(command, &format!("web server on {name}"))?;
        self.processes.push(process);
        self.web_servers.push((host, self.processes.len() - 1));
        let ns = self.host(host);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let ok = ns
                .command("curl")
                .args(["-sf", "--max-time", "1", "http://127.0.0.1/"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the web server on {name} did not start within 15 s")
    }

    /// Kills the web server of `host` (its link stays up).
    pub fn kill_web_server(&mut self, host: Host) -> Result<()> {
        let index = self
            .web_servers
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, i)| *i)
            .context("no web server on that host")?;
        self.processes[index].kill();
        Ok(())
    }

    /// Stops the UDP responder of `host`: its port then answers "unreachable".
    pub fn stop_udp_responder(&mut self, host: Host) {
        self.responders.retain(|(h, _)| *h != host);
    }

    /// Turns the switch port of backend `host` off or on, as the reference study injected
    /// faults: the backend's link goes down (the agent sees the carrier go), the backend
    /// itself keeps its addresses and routes.
    pub fn set_link(&self, host: Host, up: bool) -> Result<()> {
        let port = match host {
            Host::Master => "m0",
            Host::Slave => "s0",
            Host::Backup => "b0",
            Host::Client => "c0",
            Host::Switch => bail!("the switch has no switch port"),
        };
        self.switch
            .ip(&["link", "set", port, if up { "up" } else { "down" }])
    }

    /// Starts a UDP responder on `host`: every datagram to port [`UDP_PORT`] is answered
    /// with `name` followed by the request.
    pub fn start_udp_responder(&mut self, host: Host, name: &str) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let name = name.to_string();
        let socket = self.host(host).enter(move || -> Result<UdpSocket> {
            let socket = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(socket)
        })??;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let mut reply = name.as_bytes().to_vec();
                    reply.push(b' ');
                    reply.extend_from_slice(&buf[..len]);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        let responder = UdpResponder {
            stop,
            thread: Some(thread),
        };
        self.responders.push((host, responder));
        Ok(())
    }

    /// Starts a TCP responder on `host` (port [`TCP_PORT`]): every line a client sends on a
    /// connection is answered with `name`.
    pub fn start_tcp_responder(&mut self, host: Host, name: &str) -> Result<()> {
        let responder = TcpResponder::start(self.host(host), name)?;
        self.tcp_responders.push(responder);
        Ok(())
    }

    /// The namespace of `host`.
    pub fn host(&self, host: Host) -> &Netns {
        match host {
            Host::Client => &self.client,
            Host::Switch => &self.switch,
            Host::Master => &self.master,
            Host::Slave => &self.slave,
            Host::Backup => self
                .backup
                .as_ref()
                .expect("testbed built without a backup"),
        }
    }

    /// `curl` from the client to `http://VIP/`: the body, or an error.
    pub fn http_get_vip(&self) -> Result<String> {
        let output = self
            .client
            .command("curl")
            .args(["-sS", "--max-time", "3", &format!("http://{VIP}/")])
            .output()?;
        if !output.status.success() {
            bail!(
                "curl http://{VIP}/ failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// One UDP request from the client to the VIP: (answer, address it came from).
    pub fn udp_request_vip(&self, payload: &str) -> Result<(String, SocketAddrV4)> {
        let payload = payload.to_string();
        self.client
            .enter(move || -> Result<(String, SocketAddrV4)> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.send_to(payload.as_bytes(), (VIP, UDP_PORT))?;
                let mut buf = [0u8; 2048];
                let (len, from) = socket
                    .recv_from(&mut buf)
                    .context("no UDP answer within 2 s")?;
                let std::net::SocketAddr::V4(from) = from else {
                    bail!("answer from {from}")
                };
                Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
            })?
    }

    /// Starts a client stream in the background: `count` UDP requests to the VIP, one every
    /// `period`, recording who answered each and when. Bounded: it ends `count × period`
    /// plus 300 ms after it starts.
    pub fn udp_stream(
        &self,
        count: u32,
        period: Duration,
    ) -> Result<std::thread::JoinHandle<Result<Vec<Answer>>>> {
        self.client.spawn(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect((VIP, UDP_PORT))?;
            let start = Instant::now();
            let mut answers: Vec<Answer> = (0..count)
                .map(|seq| Answer {
                    seq,
                    sent: start + period * seq,
                    by: None,
                    received: None,
                })
                .collect();
            let mut buf = [0u8; 512];
            let mut receive_until = |deadline: Instant, answers: &mut Vec<Answer>| loop {
                let now = Instant::now();
                if now >= deadline {
                    return;
                }
                let wait = (deadline - now).max(Duration::from_micros(50));
                let _ = socket.set_read_timeout(Some(wait));
                let Ok(len) = socket.recv(&mut buf) else {
                    continue;
                };
                let received = Instant::now();
                let text = String::from_utf8_lossy(&buf[..len]);
                let mut words = text.split_whitespace();
                let (Some(by), Some("seq"), Some(seq)) = (words.next(), words.next(), words.next())
                else {
                    continue;
                };
                if let Some(answer) = seq.parse::<usize>().ok().and_then(|s| answers.get_mut(s)) {
                    answer.by = Some(by.to_string());
                    answer.received = Some(received);
                }
            };
            for seq in 0..count {
                receive_until(start + period * seq, &mut answers);
                let _ = socket.send(format!("seq {seq}").as_bytes());
            }
            receive_until(Instant::now() + Duration::from_millis(300), &mut answers);
            Ok(answers)
        })
    }

    /// Runs `program args…` in `host` and returns (success, stdout, stderr).
    pub fn output(
        &self,
        host: Host,
        program: &str,
        args: &[&str],
    ) -> Result<(bool, String, String)> {
        let mut command = self.host(host).command(program);
        if host == Host::Switch {
            command
                .env(PIN_PATH_ENV, self.pin_path())
                .env(SOCKET_ENV, self.control_socket());
        }
        let output: std::process::Output = command.args(args).output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// The bpffs directory the testbed's agents pin their dataplane in (given to every `lb`
    /// started on the switch through `LB_PIN_PATH`), removed with the testbed.
    pub fn pin_path(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.switch.name()))
    }

    /// The control socket of the testbed's agent (given to every `lb` started on the
    /// switch through `LB_SOCKET`).
    pub fn control_socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/lb/{}.sock", self.switch.name()))
    }

    /// A command running `lb` on the switch, with the testbed's pin directory and control
    /// socket.
    pub fn lb_command(&self) -> Result<std::process::Command> {
        let mut command = self.switch.command(&lb_binary()?);
        command
            .env(PIN_PATH_ENV, self.pin_path())
            .env(SOCKET_ENV, self.control_socket());
        Ok(command)
    }

    /// Starts `lb ARGS…` on the switch.
    pub fn start_lb(&mut self, args: &[&str]) -> Result<usize> {
        let mut command = self.lb_command()?;
        command.args(args);
        self.processes.push(Process::spawn(command, "lb")?);
        Ok(self.processes.len() - 1)
    }

    /// Waits until the agent on the switch answers on `listen`.
    pub fn wait_for_agent(&mut self, index: usize, listen: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !self.processes[index].is_running() {
                bail!("lb exited before it was ready");
            }
            let (ok, _, _) = self.output(
                Host::Switch,
                "curl",
                &[
                    "-sf",
                    "--max-time",
                    "1",
                    &format!("http://{listen}/healthz"),
                ],
            )?;
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("lb did not answer on {listen} within 20 s")
    }

    /// The state of the agent listening on `listen` in the switch, from its `/status`.
    pub fn agent_status(&self, listen: &str) -> Result<crate::control::Status> {
        let (ok, text, err) = self.output(
            Host::Switch,
            "curl",
            &["-sf", "--max-time", "2", &format!("http://{listen}/status")],
        )?;
        if !ok {
            bail!("cannot read the agent's status on {listen}: {}", err.trim());
        }
        serde_json::from_str(&text).context("cannot parse the agent's /status")
    }

    /// Whether any NIC of the switch still carries an XDP program.
    pub fn switch_has_xdp(&self) -> Result<bool> {
        let (_, links, _) = self.output(Host::Switch, "ip", &["link", "show"])?;
        Ok(links.contains("xdp"))
    }
}

/// Hosts of the testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The client.
    Client,
    /// The switch.
    Switch,
    /// The master backend.
    Master,
    /// The slave backend.
    Slave,
    /// The third backend.
    Backup,
}

/// One request of [`Testbed::udp_stream`].
#[derive(Debug, Clone)]
pub struct Answer {
    /// Sequence number.
    pub seq: u32,
    /// When it was sent.
    pub sent: Instant,
    /// Who answered it, if anyone.
    pub by: Option<String>,
    /// When the answer arrived.
    pub received: Option<Instant>,
}

/// Who answered, in the order the requests were sent, with repeats folded:
/// `["master", "slave"]`. (In arrival order, a request sent just before a flip and answered
/// by the old backend a little after a newer one was answered by the new backend would look
/// like a flap.)
pub fn answer_runs(answers: &[Answer]) -> Vec<String> {
    let mut received: Vec<&Answer> = answers.iter().filter(|a| a.received.is_some()).collect();
    received.sort_by_key(|a| a.seq);
    let mut runs: Vec<String> = Vec::new();
    for answer in received {
        let by = answer.by.clone().unwrap_or_default();
        if runs.last() != Some(&by) {
            runs.push(by);
        }
    }
    runs
}

/// The longest time between two consecutive answers.
pub fn longest_gap(answers: &[Answer]) -> Duration {
    let mut times: Vec<Instant> = answers.iter().filter_map(|a| a.received).collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Requests that got no answer.
pub fn unanswered(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.received.is_none()).count()
}

struct UdpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.processes.clear();
        // The agents are gone; what they pinned goes too (the namespaces, and the NICs the
        // program was attached to, go with the fields below).
        if let Err(e) = crate::dataplane::pins::remove(&self.pin_path()) {
            eprintln!("cleanup: {e:#}");
        }
        let _ = std::fs::remove_file(self.control_socket());
        self.responders.clear();
        self.tcp_responders.clear();
        self.veth_peers.clear();
    }
}

/// Path of the `lb` binary: `$LB_BIN`; else this executable when it is `lb`; else
/// `target/debug/lb` of this workspace.
pub fn lb_binary() -> Result<String> {
    let path = match std::env::var("LB_BIN") {
        Ok(path) => PathBuf::from(path),
        Err(_) => match std::env::current_exe() {
            Ok(exe) if exe.file_name().is_some_and(|n| n == "lb") => exe,
            _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb"),
        },
    };
    if !path.exists() {
        bail!(
            "the lb binary is not built at {} (run `cargo xtask test`, or `cargo build -p lb-user` first, or set LB_BIN)",
            path.display()
        );
    }
    Ok(path.canonicalize()?.to_string_lossy().into_owned())
}
