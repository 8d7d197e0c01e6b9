//! End to end, the connection table with real hosts in network namespaces: a spoofed
//! packet cannot take a backend down, direct traffic to a backend is left alone, and TCP
//! connections opened during a failover survive the failback.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use lb_user::testbed::{
    tcp_responder::LineClient,
    topology::{lb_binary, Testbed, MASTER_IP, SLAVE_IP, TCP_PORT, UDP_PORT, VIP},
    Host,
};
use tests::agent::{metrics, start_agent, wait_active};

const LISTEN: &str = "127.0.0.1:9100";

#[test]
fn a_spoofed_packet_from_the_switchs_own_address_takes_nothing_down() {
    let mut bed = Testbed::new("lbc-spoof").expect("testbed");
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    // A hijacked check never gets its answer, however long it waits: a timeout well above
    // a loaded machine's stalls keeps those from failing the checks, not the attack.
    let health = r#"{ checks = [{ type = "udp", send = "check" }], interval = "5ms", timeout = "100ms", rise = 3, fall = 3 }"#;
    let config = format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("echo", "udp", UDP_PORT, health)
    );
    start_agent(&mut bed, &config, LISTEN);
    // Packets with the switch host's own address on the master's segment as their source,
    // from every port the health checks might use.
    tests::spoof::send_udp(
        &bed.client,
        "198.18.2.1".parse().unwrap(),
        32_768,
        VIP,
        UDP_PORT,
        2000,
    )
    .unwrap();
    // Three times the checks' detection time (3 × 5 ms + 100 ms) later, nothing has moved.
    std::thread::sleep(Duration::from_millis(350));
    let status = bed.agent_status(LISTEN).unwrap();
    let echo = &status.services[0];
    assert_eq!(echo.active.as_deref(), Some("master"));
    assert!(echo.last_change.is_none(), "{:?}", echo.last_change);
    assert!(echo.backends.iter().all(|b| b.up), "{:?}", echo.backends);
    assert_eq!(bed.udp_request_vip("still").unwrap().0, "master still");
    let text = metrics(&bed, LISTEN);
    assert!(
        text.contains("lb_dataplane_events_total{event=\"local_source\"} 2000"),
        "{text}"
    );
}

#[test]
fn direct_traffic_to_a_backend_is_untouched_while_the_client_uses_the_vip() {
    let mut bed = Testbed::new("lbc-direct").expect("testbed");
    bed.start_web_server(Host::Master, "master").unwrap();
    bed.start_web_server(Host::Slave, "slave").unwrap();
    bed.start_udp_responder(Host::Master, "master").unwrap();
    bed.start_udp_responder(Host::Slave, "slave").unwrap();
    // A routed switch host: what is not VIP traffic, its kernel forwards.
    bed.switch
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let config = bed.config(LISTEN);
    start_agent(&mut bed, &config, LISTEN);
    assert_eq!(bed.http_get_vip().unwrap(), "master");
    assert_eq!(bed.udp_request_vip("via vip").unwrap().0, "master via vip");
    // Connected UDP sockets to the backends' own addresses: the answers must come from
    // those addresses, or the kernel would reject them.
    let answers = bed
        .client
        .enter(|| -> Result<Vec<String>> {
            let mut answers = Vec::new();
            for ip in [SLAVE_IP, MASTER_IP] {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.connect(SocketAddrV4::new(ip, UDP_PORT))?;
                socket.send(b"direct")?;
                let mut buf = [0u8; 512];
                let len = socket.recv(&mut buf).context("no direct UDP answer")?;
                answers.push(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
            Ok(answers)
        })
        .unwrap()
        .unwrap();
    assert_eq!(answers, ["slave direct", "master direct"]);
    // Direct HTTP to each backend, and the VIP again.
    for (ip, name) in [(SLAVE_IP, "slave"), (MASTER_IP, "master")] {
        let url = format!("http://{ip}/");
        let (ok, body, err) = bed
            .output(Host::Client, "curl", &["-sS", "--max-time", "3", &url])
            .unwrap();
        assert!(ok, "direct HTTP to {ip}: {err}");
        assert_eq!(body.trim(), name);
    }
    assert_eq!(bed.http_get_vip().unwrap(), "master");
}

/// A long-lived TCP connection from the client to the VIP's port [`TCP_PORT`].
fn connect(bed: &Testbed) -> Result<LineClient> {
    let vip = SocketAddrV4::new(VIP, TCP_PORT);
    LineClient::open(&bed.client, vip, Duration::from_secs(3))
}

#[test]
fn tcp_connections_opened_during_a_failover_survive_the_failback() {
    let mut bed = Testbed::new("lbc-graceful").expect("testbed");
    bed.start_tcp_responder(Host::Master, "master").unwrap();
    bed.start_tcp_responder(Host::Slave, "slave").unwrap();
    let health = r#"{ checks = [{ type = "link" }, { type = "tcp" }], interval = "10ms", rise = 3, fall = 3 }"#;
    let config = format!(
        "{}{}",
        Testbed::config_head(LISTEN),
        Testbed::service_toml("hold", "tcp", TCP_PORT, health)
    );
    start_agent(&mut bed, &config, LISTEN);
    let mut before = connect(&bed).unwrap();
    assert_eq!(before.ask().unwrap(), "master");

    // The master's switch port goes down: new connections reach the slave.
    bed.set_link(Host::Master, false).unwrap();
    wait_active(&bed, LISTEN, "hold", "slave").unwrap();
    let mut during: Vec<LineClient> = (0..20).map(|_| connect(&bed).unwrap()).collect();
    for connection in &mut during {
        assert_eq!(connection.ask().unwrap(), "slave");
    }

    // The master comes back: the service fails back, and every connection made during the
    // outage stays on the slave while a new one reaches the master.
    bed.set_link(Host::Master, true).unwrap();
    wait_active(&bed, LISTEN, "hold", "master").unwrap();
    for (i, connection) in during.iter_mut().enumerate() {
        assert_eq!(
            connection.ask().unwrap(),
            "slave",
            "connection {i} after failback"
        );
    }
    let mut after = connect(&bed).unwrap();
    assert_eq!(after.ask().unwrap(), "master");

    // `lb flows` lists them on the slave.
    let lb = lb_binary().unwrap();
    let (ok, listing, err) = bed
        .output(
            Host::Switch,
            &lb,
            &["flows", "--service", "hold", "--backend", "slave"],
        )
        .unwrap();
    assert!(ok, "{err}");
    assert!(listing.contains("20 flows"), "{listing}");
    assert!(listing.contains("established"), "{listing}");

    // Draining the master by hand: new connections go to the slave, the master's own
    // finish there; undrained, it takes new connections again.
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["drain", "hold", "master"])
        .unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("master -> slave"), "{out}");
    assert_eq!(connect(&bed).unwrap().ask().unwrap(), "slave");
    assert_eq!(
        after.ask().unwrap(),
        "master",
        "a drained backend keeps its connections"
    );
    let status = bed.agent_status(LISTEN).unwrap();
    assert!(status.services[0].backends[0].drained);
    let (ok, out, err) = bed
        .output(Host::Switch, &lb, &["undrain", "hold", "master"])
        .unwrap();
    assert!(ok, "{out}{err}");
    wait_active(&bed, LISTEN, "hold", "master").unwrap();
    assert_eq!(connect(&bed).unwrap().ask().unwrap(), "master");
    for connection in &mut during {
        assert_eq!(connection.ask().unwrap(), "slave");
    }
    drop(before);
}

#[test]
fn a_large_download_through_the_vip_crosses_a_smaller_mtu_with_path_mtu_discovery() {
    let mut bed = Testbed::new("lbc-pmtu").expect("testbed");
    // A far client behind the client host, which routes for it over a link of 1400 bytes
    // on its side (the far client's own MTU, and so its MSS, stay those of Ethernet).
    let far = lb_user::testbed::netns::Netns::new("lbc-pmtu-far").unwrap();
    lb_user::testbed::netns::veth(
        &far,
        "eth0",
        "02:00:00:00:06:02",
        &bed.client,
        "f0",
        "02:00:00:00:06:01",
    )
    .unwrap();
    far.ip(&["addr", "add", "198.18.6.2/24", "dev", "eth0"])
        .unwrap();
    far.ip(&["route", "add", "default", "via", "198.18.6.1"])
        .unwrap();
    bed.client
        .ip(&["addr", "add", "198.18.6.1/24", "dev", "f0"])
        .unwrap();
    bed.client
        .ip(&["link", "set", "f0", "mtu", "1400"])
        .unwrap();
    for (ns, dev) in [(&far, "eth0"), (&bed.client, "f0")] {
        ns.exec("ethtool", &["-K", dev, "tx", "off"]).unwrap();
    }
    bed.client
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    bed.start_web_server(Host::Master, "master").unwrap();
    let size = 4 << 20;
    std::fs::write(bed.web_root("master").join("big.bin"), vec![0x5a; size]).unwrap();
    let config = bed.config(LISTEN);
    start_agent(&mut bed, &config, LISTEN);

    let url = format!("http://{VIP}/big.bin");
    let output = far
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "--max-time",
            "20",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "download through the VIP failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        metrics(&bed, LISTEN)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), size.to_string());
    // The master learnt the smaller MTU from the error the program carried to it.
    let (_, route, _) = bed
        .output(Host::Master, "ip", &["route", "get", "198.18.6.2"])
        .unwrap();
    assert!(route.contains("mtu 1400"), "{route}");
}
