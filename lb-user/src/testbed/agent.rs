//! `lb` on the testbed's switch: started with the testbed's own pin directory and control
//! socket (so that tests never touch the host's), waited for, and asked for its state.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    process::Process,
    topology::{Host, Testbed, PIN_PATH_ENV, SOCKET_ENV},
};

impl Testbed {
    /// The bpffs directory the testbed's agents pin their dataplane in (given to every `lb`
    /// started on the switch through `LB_PIN_PATH`), removed with the testbed.
    pub fn pin_path(&self) -> PathBuf {
        self.pin_path_of(Host::Switch)
    }

    /// The pin directory of the agent on switch host `switch` (the switch, or the peer of a
    /// pair testbed).
    pub fn pin_path_of(&self, switch: Host) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.host(switch).name()))
    }

    /// The control socket of the testbed's agent (given to every `lb` started on the
    /// switch through `LB_SOCKET`).
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket_of(Host::Switch)
    }

    /// The control socket of the agent on switch host `switch`.
    pub fn control_socket_of(&self, switch: Host) -> PathBuf {
        PathBuf::from(format!("/run/lb/{}.sock", self.host(switch).name()))
    }

    /// A command running `lb` on the switch, with the testbed's pin directory and control
    /// socket.
    pub fn lb_command(&self) -> Result<std::process::Command> {
        self.lb_command_on(Host::Switch)
    }

    /// A command running `lb` on switch host `switch`, with its pin directory and control
    /// socket.
    pub fn lb_command_on(&self, switch: Host) -> Result<std::process::Command> {
        let mut command = self.host(switch).command(&lb_binary()?);
        command
            .env(PIN_PATH_ENV, self.pin_path_of(switch))
            .env(SOCKET_ENV, self.control_socket_of(switch));
        Ok(command)
    }

    /// Starts `lb ARGS…` on the switch.
    pub fn start_lb(&mut self, args: &[&str]) -> Result<usize> {
        self.start_lb_on(Host::Switch, args)
    }

    /// Starts `lb ARGS…` on switch host `switch`.
    pub fn start_lb_on(&mut self, switch: Host, args: &[&str]) -> Result<usize> {
        let mut command = self.lb_command_on(switch)?;
        command.args(args);
        self.processes.push(Process::spawn(command, "lb")?);
        Ok(self.processes.len() - 1)
    }

    /// Stops the agent started as process `index` for good, as an operator does: `lb down`,
    /// which the agent answers by removing its dataplane and exiting with
    /// [`crate::agent::EXIT_TAKEN_DOWN`] (it is removed from the processes). The switch's
    /// NICs are back on the kernel's own path.
    pub fn stop_lb_for_good(&mut self, index: usize) -> Result<()> {
        let mut agent = self.processes.remove(index);
        let down = self
            .lb_command()?
            .arg("down")
            .output()
            .context("cannot run lb down")?;
        if !down.status.success() {
            bail!(
                "lb down failed ({}): {}",
                down.status,
                String::from_utf8_lossy(&down.stderr)
            );
        }
        let status = agent.wait_exit(Duration::from_secs(10))?;
        if status.code() != Some(crate::agent::EXIT_TAKEN_DOWN) {
            bail!("lb exited with {status} after lb down");
        }
        Ok(())
    }

    /// Waits until the agent on the switch answers on `listen`.
    pub fn wait_for_agent(&mut self, index: usize, listen: &str) -> Result<()> {
        self.wait_for_agent_on(Host::Switch, index, listen)
    }

    /// Waits until the agent on switch host `switch` answers on `listen`.
    pub fn wait_for_agent_on(&mut self, switch: Host, index: usize, listen: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !self.processes[index].is_running() {
                bail!("lb exited before it was ready");
            }
            let (ok, _, _) = self.output(
                switch,
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
        self.agent_status_on(Host::Switch, listen)
    }

    /// The state of the agent listening on `listen` in switch host `switch`.
    pub fn agent_status_on(&self, switch: Host, listen: &str) -> Result<crate::control::Status> {
        let (ok, text, err) = self.output(
            switch,
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
