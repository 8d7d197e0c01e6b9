//! Child processes that cannot outlive the test that started them.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// A running child, sent SIGTERM (then killed) on drop.
pub struct Process {
    child: Option<Child>,
    what: String,
}

impl Process {
    /// Starts `command`, with stdout and stderr inherited (shown when a test fails).
    pub fn spawn(mut command: Command, what: &str) -> Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Process {
            child: Some(child),
            what: what.to_string(),
        })
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> Result<bool> {
        let Some(pid) = self.pid() else {
            return Ok(false);
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet. SIGCONT after
        // SIGTERM: a frozen child takes its SIGTERM when thawed.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
            libc::kill(pid as i32, libc::SIGCONT);
        }
        match self.wait_exit(std::time::Duration::from_secs(10)) {
            Ok(status) => Ok(status.success()),
            Err(_) => {
                self.kill();
                anyhow::bail!("{} did not stop within 10 s of SIGTERM", self.what)
            }
        }
    }

    /// Waits up to `within` for the child to exit by itself; its exit status (the child is
    /// then gone from this process: dropping it signals nothing).
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} is not running", self.what))?;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{} did not exit within {within:?}", self.what);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Freezes the child (SIGSTOP: it runs no more, what it holds stays open, as for a hung
    /// process), or thaws it (SIGCONT).
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.what))?;
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot signal {}", self.what));
        }
        Ok(())
    }

    /// Kills the child at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The child's pid while it runs (`nsenter` runs its program in place, so this is the
    /// program's own pid).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.terminate() {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
