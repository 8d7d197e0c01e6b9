//! The switch set up for the kernel's own forwarding: nftables DNAT of the VIP to the
//! master (conntrack turns the replies' source back into the VIP), or an ingress drop that
//! measures what the generator can offer at all. Each set-up is a guard that undoes itself
//! on drop, also on error and interrupt.

use std::{io::Write as _, process::Stdio};

use anyhow::{bail, Context, Result};
use lb_user::testbed::{
    netns::{self, Netns},
    topology::{MASTER_IP, VIP},
};

/// Name of the nftables table of the DNAT set-up.
const NAT_TABLE: &str = "lbt_nat";
/// Name of the nftables table of the ingress drop.
const DROP_TABLE: &str = "lbt_drop";

/// Runs an nftables script inside namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<()> {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (is nftables installed? `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Sets sysctl `key` to `value` inside namespace `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    netns::ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
}

/// Turns IPv4 forwarding of `switch` on or off (a routed switch host has it on).
pub fn forwarding(switch: &Netns, on: bool) -> Result<()> {
    sysctl(
        switch.name(),
        "net.ipv4.ip_forward",
        if on { "1" } else { "0" },
    )
}

/// Whether nftables can offload flows to a flowtable on `switch`'s ports: `None` if it
/// can, otherwise what refused it (a kernel built without `CONFIG_NF_FLOW_TABLE` refuses
/// the flowtable).
pub fn flowtable_refusal(switch: &Netns) -> Option<String> {
    const TABLE: &str = "lbt_ft_probe";
    let made = nft(
        switch.name(),
        &format!(
            "table ip {TABLE} {{\n\tflowtable ft {{\n\t\thook ingress priority 0; devices = {{ c0, m0 }};\n\t}}\n}}\n"
        ),
    );
    let _ = nft(switch.name(), &format!("delete table ip {TABLE}\n"));
    made.err().map(|e| {
        format!("{e:#}")
            .lines()
            .find(|l| l.contains("Error"))
            .unwrap_or("refused")
            .trim()
            .to_string()
    })
}

/// nftables DNAT of `VIP:port/udp` to the master on the switch, with routing on and the
/// VIP answered (ARP) on the client port `c0`. Undone on drop.
pub struct NftNat {
    switch: String,
}

impl NftNat {
    /// Sets it up on `switch` for UDP port `port`.
    pub fn new(switch: &Netns, port: u16) -> Result<Self> {
        let guard = NftNat {
            switch: switch.name().to_string(),
        };
        sysctl(&guard.switch, "net.ipv4.ip_forward", "1")?;
        switch.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "c0"])?;
        nft(
            &guard.switch,
            &format!(
                "table ip {NAT_TABLE} {{\n\
                 \tchain prerouting {{\n\
                 \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                 \t\tip daddr {VIP} udp dport {port} dnat to {MASTER_IP}\n\
                 \t}}\n\
                 }}\n"
            ),
        )?;
        Ok(guard)
    }
}

impl Drop for NftNat {
    fn drop(&mut self) {
        let _ = nft(&self.switch, &format!("delete table ip {NAT_TABLE}\n"));
        let _ = netns::ip(&[
            "-n",
            &self.switch,
            "addr",
            "del",
            &format!("{VIP}/32"),
            "dev",
            "c0",
        ]);
        if let Err(e) = sysctl(&self.switch, "net.ipv4.ip_forward", "0") {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Every frame arriving on the switch's ports `c0` and `m0` dropped at the ingress hook:
/// the generator then runs against a switch that does nothing, which is the most it can
/// offer. Undone on drop.
pub struct IngressDrop {
    switch: String,
}

impl IngressDrop {
    /// Sets it up on `switch`.
    pub fn new(switch: &Netns) -> Result<Self> {
        let guard = IngressDrop {
            switch: switch.name().to_string(),
        };
        let chain = |dev: &str| {
            format!(
                "\tchain {dev} {{\n\t\ttype filter hook ingress device \"{dev}\" priority 0; policy drop;\n\t}}\n"
            )
        };
        nft(
            &guard.switch,
            &format!(
                "table netdev {DROP_TABLE} {{\n{}{}}}\n",
                chain("c0"),
                chain("m0")
            ),
        )?;
        Ok(guard)
    }
}

impl Drop for IngressDrop {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.switch, &format!("delete table netdev {DROP_TABLE}\n")) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Lets the switch poll its ports `c0` and `m0` from kernel threads (threaded NAPI, GRO
/// on so that veth uses NAPI without XDP too): the switch's work can then run on the other
/// core than the generator; with `cpu`, their threads are pinned to it. Lasts as long as
/// the namespace.
pub fn threaded_napi(switch: &Netns, cpu: Option<usize>) -> Result<()> {
    for dev in ["c0", "m0"] {
        switch.exec("ethtool", &["-K", dev, "gro", "on"])?;
        switch.exec(
            "sh",
            &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
        )?;
    }
    if let Some(cpu) = cpu {
        for pid in napi_threads(&["c0", "m0"])? {
            super::generator::pin(pid, cpu)?;
        }
    }
    Ok(())
}

/// Counts, then drops, the measured frames at the ingress of a receiving host's `eth0`
/// (nftables netdev hook, before the IP stack): `rewritten` and `not_rewritten` are
/// nftables matches; the receiver's own cost stays small and the same in every mode.
/// Removed on drop.
pub struct RxCount {
    ns: String,
}

/// Name of the nftables table of [`RxCount`].
const RX_TABLE: &str = "lbt_rx";

impl RxCount {
    /// Sets it up in `ns`.
    pub fn new(ns: &Netns, rewritten: &str, not_rewritten: &str) -> Result<Self> {
        let guard = RxCount {
            ns: ns.name().to_string(),
        };
        nft(
            &guard.ns,
            &format!(
                "table netdev {RX_TABLE} {{\n\
                 \tcounter good {{ }}\n\
                 \tcounter bad {{ }}\n\
                 \tchain rx {{\n\
                 \t\ttype filter hook ingress device \"eth0\" priority 0; policy accept;\n\
                 \t\t{rewritten} counter name \"good\" drop\n\
                 \t\t{not_rewritten} counter name \"bad\" drop\n\
                 \t}}\n\
                 }}\n"
            ),
        )?;
        Ok(guard)
    }

    /// (rewritten, not rewritten) packets counted so far.
    pub fn read(&self) -> Result<(u64, u64)> {
        Ok((self.counter("good")?, self.counter("bad")?))
    }

    fn counter(&self, name: &str) -> Result<u64> {
        let output = std::process::Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "list", "counter", "netdev", RX_TABLE, name,
            ])
            .output()
            .context("cannot run nft")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let mut words = text.split_whitespace();
        while let Some(word) = words.next() {
            if word == "packets" {
                if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                    return Ok(n);
                }
            }
        }
        bail!(
            "no packet count in `nft list counter netdev {RX_TABLE} {name}`: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

impl Drop for RxCount {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.ns, &format!("delete table netdev {RX_TABLE}\n")) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// The kernel threads that poll NICs `devs` (threaded NAPI names them `napi/DEV-ID`).
pub fn napi_threads(devs: &[&str]) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot read /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if devs
            .iter()
            .any(|dev| comm.trim().starts_with(&format!("napi/{dev}-")))
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}
