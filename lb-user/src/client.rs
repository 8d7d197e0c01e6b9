//! The commands that talk to a running agent through its control socket: `lb status`,
//! `lb flows`, `lb activate`, `lb drain`, `lb undrain`, `lb reload`, `lb role`, `lb notify`,
//! and `lb down` while an agent runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lb_user::{
    config::HostRole,
    control::{Change, Status},
    flows::FlowView,
};

/// An HTTP client of the agent's control socket.
pub struct Agent {
    client: reqwest::Client,
    socket: PathBuf,
}

impl Agent {
    /// A client of the agent listening on control socket `socket`.
    pub fn new(socket: &Path) -> Result<Self> {
        let client = reqwest::Client::builder()
            .unix_socket(socket)
            .build()
            .context("cannot build the control socket client")?;
        Ok(Agent {
            client,
            socket: socket.to_path_buf(),
        })
    }

    /// Sends `request` for `path`; the body of a success, or the agent's refusal as error.
    async fn call(&self, method: reqwest::Method, path: &str) -> Result<String> {
        self.call_with(method, path, &[]).await
    }

    /// [`Agent::call`] with a query string of `query`.
    async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<String> {
        let url = format!("http://lb{path}");
        let response = self
            .client
            .request(method, &url)
            .query(query)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the agent on {}: is `lb run` running (control_socket), and \
                     are you root?",
                    self.socket.display()
                )
            })?;
        let ok = response.status().is_success();
        let text = response.text().await.unwrap_or_default();
        if !ok {
            bail!("the agent refused: {}", text.trim());
        }
        Ok(text)
    }

    /// `lb status`.
    pub async fn status(&self) -> Result<()> {
        let text = self.call(reqwest::Method::GET, "/status").await?;
        let status: Status =
            serde_json::from_str(&text).context("the agent's /status answer is not valid")?;
        print_status(&status);
        Ok(())
    }

    /// `lb activate|drain|undrain SERVICE BACKEND`.
    pub async fn act(&self, action: &str, service: &str, backend: &str) -> Result<()> {
        let path = format!("/services/{service}/{action}/{backend}");
        let text = self.call(reqwest::Method::POST, &path).await?;
        let change: Change = serde_json::from_str(&text)?;
        println!(
            "service {service}: {} ({}; map write {:.1} us)",
            transition(&change),
            change.cause,
            change.flip_us
        );
        Ok(())
    }

    /// `lb reload`.
    pub async fn reload(&self) -> Result<()> {
        let text = self.call(reqwest::Method::POST, "/reload").await?;
        println!("{}", text.trim());
        Ok(())
    }

    /// `lb down` while the agent runs: asks it to remove the dataplane pinned in `pin_path`
    /// and stop; what it removed.
    pub async fn down(&self, pin_path: &Path) -> Result<String> {
        let pin_path = pin_path.to_string_lossy();
        self.call_with(reqwest::Method::POST, "/down", &[("pin_path", &pin_path)])
            .await
    }

    /// `lb role ROLE` and `lb notify`: makes the agent's host `role`; `why` goes to its log.
    pub async fn role(&self, role: HostRole, why: &str) -> Result<()> {
        let text = self
            .call_with(
                reqwest::Method::POST,
                &format!("/role/{role}"),
                &[("why", why)],
            )
            .await?;
        println!("{}", text.trim());
        Ok(())
    }

    /// `lb notify`: [`Agent::role`], waiting up to `patience` for an agent that cannot be
    /// reached (starting, or restarting): keepalived runs its notify script once per change
    /// of state and never again, so a change the agent missed would stay missed.
    pub async fn role_when_reachable(
        &self,
        role: HostRole,
        why: &str,
        patience: std::time::Duration,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + patience;
        let mut said = false;
        loop {
            match self.role(role, why).await {
                // No HTTP error inside: the agent answered (and refused).
                Err(e)
                    if e.chain().any(|c| c.is::<reqwest::Error>())
                        && std::time::Instant::now() < deadline =>
                {
                    if !said {
                        eprintln!("{e:#}; trying again for up to {patience:?}");
                        said = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// `lb flows [--service S [--backend B]]`.
    pub async fn flows(&self, service: Option<String>, backend: Option<String>) -> Result<()> {
        let filters: Vec<String> = [("service", service), ("backend", backend)]
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
            .collect();
        let mut path = "/flows".to_string();
        if !filters.is_empty() {
            path = format!("{path}?{}", filters.join("&"));
        }
        let text = self.call(reqwest::Method::GET, &path).await?;
        let flows: Vec<FlowView> =
            serde_json::from_str(&text).context("the agent's /flows answer is not valid")?;
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
}

fn print_status(status: &Status) {
    if let Some(role) = status.role {
        let pair = if status.pair { " (pair mode)" } else { "" };
        println!("host role {role}{pair}");
    }
    if let Some(peer) = &status.peer {
        let role = peer.role.map_or("not heard".to_string(), |r| r.to_string());
        let stream = if peer.streaming { "up" } else { "down" };
        let split = if peer.split_brain {
            "; SPLIT BRAIN: both hosts active"
        } else {
            ""
        };
        println!(
            "pair peer {}: {role}, flow stream {stream}{split}",
            peer.address
        );
    }
    for iface in &status.interfaces {
        let adopted = if iface.adopted { ", adopted" } else { "" };
        println!("interface {} ({}{adopted})", iface.name, iface.mode);
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
            let checks: Vec<String> = b
                .checks
                .iter()
                .map(|c| match (c.ok, c.ago_ms) {
                    (Some(true), Some(ago)) => format!("{} ok {ago:.1} ms ago", c.check),
                    (Some(false), Some(ago)) => format!(
                        "{} FAILED {ago:.1} ms ago ({})",
                        c.check,
                        c.error.as_deref().unwrap_or("")
                    ),
                    _ => format!("{} not run yet", c.check),
                })
                .collect();
            if !checks.is_empty() {
                println!("      checks: {}", checks.join("; "));
            }
        }
        if let Some(change) = &service.last_change {
            let waited = if change.waited_us >= 0.05 {
                format!(" ({:.1} us of it waiting to run)", change.waited_us)
            } else {
                String::new()
            };
            println!(
                "  last change: {} ({}), flip {:.1} us{waited}",
                transition(change),
                change.cause,
                change.flip_us
            );
        }
    }
}

/// `from -> to` of a change of active backend.
fn transition(change: &Change) -> String {
    format!(
        "{} -> {}",
        change.from.as_deref().unwrap_or("-"),
        change.to.as_deref().unwrap_or("-")
    )
}
