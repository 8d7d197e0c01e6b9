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

const LISTEN: &str = "127.0.0.1:9100";
const PREFIX: &str = "lbdemo";

/// Runs the demo until Ctrl-C, SIGTERM or `duration`.
pub async fn run(duration: Duration) -> Result<()> {
    let mut bed = Testbed::new(PREFIX).context("cannot build the demo network (needs root)")?;
    bed.start_web_server(Host::Master, "master")?;
    bed.start_web_server(Host::Slave, "slave")?;
    bed.start_udp_responder(Host::Master, "master")?;
    bed.start_udp_responder(Host::Slave, "slave")?;
    let config_text = bed.config(LISTEN);
    let config = bed.write_file("lb.toml", &config_text)?;
    let agent = bed.start_lb(&["run", "--config", &config.to_string_lossy()])?;
    bed.wait_for_agent(agent, LISTEN)?;
    let lb = lb_binary()?;
    println!(
        "\nDemo network ready (namespaces {PREFIX}-client, -switch, -master, -slave):\n  \
         client {CLIENT_IP}  →  VIP {VIP}  →  master {MASTER_IP} (active) | slave {SLAVE_IP}\n\n\
         The client below asks http://{VIP}/ once a second. In another shell, try:\n  \
         ip netns exec {PREFIX}-switch {lb} activate web slave     # fail over by hand\n  \
         ip netns exec {PREFIX}-switch {lb} activate web master    # and back\n  \
         ip netns exec {PREFIX}-switch {lb} status\n  \
         ip netns exec {PREFIX}-client curl http://{VIP}/\n\n\
         Config in use: {}\nCtrl-C tears it all down.\n",
        config.display()
    );
    let deadline = Instant::now() + duration;
    let stop = shutdown_signal();
    tokio::pin!(stop);
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
