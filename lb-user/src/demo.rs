//! `lb demo`: the agent on a namespace testbed, with a client asking the VIP once a second.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_user::{
    agent::shutdown_signal,
    testbed::{
        topology::{lb_binary, CLIENT_IP, MASTER_IP, SLAVE_IP, VIP},
        Host, Testbed,
    },
};

const LISTEN: &str = lb_user::config::DEFAULT_LISTEN;
const PREFIX: &str = "lbdemo";
const WEB_HEALTH: &str = r#"health = { checks = [{ type = "link" }, { type = "tcp" }], interval = "10ms", rise = 3, fall = 3 }"#;
const ECHO_HEALTH: &str = r#"health = { checks = [{ type = "link" }, { type = "udp", send = "health" }], interval = "10ms", rise = 3, fall = 3 }"#;

/// Runs the demo until Ctrl-C, SIGTERM or `duration`.
pub async fn run(duration: Duration) -> Result<()> {
    // Installed first: a Ctrl-C during the set-up still tears everything down.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut bed = Testbed::new(PREFIX).context("cannot build the demo network (needs root)")?;
    bed.start_web_server(Host::Master, "master")?;
    bed.start_web_server(Host::Slave, "slave")?;
    bed.start_udp_responder(Host::Master, "master")?;
    bed.start_udp_responder(Host::Slave, "slave")?;
    let config_text = bed.config_with(LISTEN, WEB_HEALTH, ECHO_HEALTH);
    let config = bed.write_file("lb.toml", &config_text)?;
    let agent = bed.start_lb(&["run", "--config", &config.to_string_lossy()])?;
    bed.wait_for_agent(agent, LISTEN)?;
    let lb = lb_binary()?;
    let socket = format!("--socket {}", bed.control_socket().display());
    let sw = format!("ip netns exec {PREFIX}-switch");
    let www = bed.web_root("master").display().to_string();
    println!(
        "\nDemo network ready (namespaces {PREFIX}-client, -switch, -master, -slave):\n  \
         client {CLIENT_IP}  →  VIP {VIP}  →  master {MASTER_IP} (preferred) | slave {SLAVE_IP}\n  \
         health checks: link + TCP connect (web), link + UDP request (echo), every 10 ms\n\n\
         The client below asks http://{VIP}/ once a second. In another shell, try:\n  \
         {sw} ip link set m0 down          # pull the master's cable: traffic moves to the slave at once\n  \
         {sw} ip link set m0 up            # plug it back: traffic returns after 3 good checks\n  \
         ip netns exec {PREFIX}-master pkill -f {www}   # kill the master's web server\n  \
         {lb} status {socket}\n  \
         {lb} activate web slave {socket}     # fail over by hand\n  \
         {sw} curl -s {LISTEN}/metrics | grep lb_failovers\n\n\
         Config in use: {}\nCtrl-C tears it all down.\n",
        config.display()
    );
    let deadline = Instant::now() + duration;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < deadline {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {
                match bed.http_get_vip() {
                    Ok(body) => println!("GET http://{VIP}/ answered by {body}"),
                    Err(e) => println!("GET http://{VIP}/ failed: {e:#}"),
                }
            }
        }
    }
    println!("tearing the demo network down");
    bed.processes[agent].terminate()?;
    drop(bed);
    Ok(())
}
