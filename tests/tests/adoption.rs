//! A plan written over the maps of a running dataplane, as a restarted agent writes its
//! config over the pinned maps: services and backends keep their numbers and flows, a
//! service stays on its active backend, a new service gets a number nobody used, and the
//! flows of a removed service go with it.

use lb_common::{proto, FlowKey};
use lb_user::{config::Config, plan::Plan};
use tests::{
    rig::*,
    testrun::{CLIENT_IF_MAC, CLIENT_MAC, XDP_PASS, XDP_REDIRECT},
};

/// The destination address of an IPv4 frame.
fn destination(frame: &[u8]) -> [u8; 4] {
    frame[30..34].try_into().expect("an IPv4 frame")
}

/// `standard_config` with a new service in front and `web` removed.
fn changed_config() -> String {
    standard_config().replace(
        &service("web", "198.18.1.100", "tcp", 80, ""),
        &service("new", "198.18.1.103", "udp", 9000, ""),
    )
}

#[test]
fn a_changed_plan_over_running_maps_keeps_numbers_flows_and_active_backends() {
    with_rig("lba-diff", |b| {
        let dns_frame = udp(CLIENT_MAC, CLIENT_IF_MAC, CLIENT, VIP, 40_000, 53);
        assert_eq!(b.run(b.client_if, &dns_frame)?.0, XDP_REDIRECT);
        let web = tcp_with(CLIENT_MAC, CLIENT_IF_MAC, (CLIENT, 40_001), (VIP, 80), "S");
        assert_eq!(b.run(b.client_if, &web)?.0, XDP_REDIRECT);
        b.activate("dns", "slave")?;
        let dns_key = FlowKey::new(proto::UDP, CLIENT, 40_000u16.to_be_bytes(), VIP, [0, 53]);
        let web_key = FlowKey::new(proto::TCP, CLIENT, 40_001u16.to_be_bytes(), VIP, [0, 80]);
        let created = b.flow(&dns_key).expect("the dns flow").flow.created_ns;

        let previous = b.maps.numbering()?;
        let text = changed_config();
        assert!(text.contains("name = \"new\"") && !text.contains("name = \"web\""));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut plan = runtime.block_on(Plan::resolve(&Config::parse(&text)?, &[]))?;
        plan.renumber(&previous);
        let applied = b.maps.apply_plan(&plan, &previous, true)?;

        // Numbers: kept for what stayed, fresh for what is new.
        let old_dns = b.plan.service("dns")?;
        let dns = plan.service("dns")?;
        assert_eq!(dns.id, old_dns.id);
        for (new, old) in dns.backends.iter().zip(&old_dns.backends) {
            assert_eq!(
                (new.name.as_str(), new.index),
                (old.name.as_str(), old.index)
            );
        }
        let fresh = plan.service("new")?;
        assert!(!previous.services.values().any(|id| *id == fresh.id));
        assert!(fresh
            .backends
            .iter()
            .all(|nb| !previous.backends.values().any(|index| *index == nb.index)));

        // dns stays on the slave; its flow is the same flow, and follows it.
        assert!(applied.kept.contains(&dns.id));
        let slave = dns.backend("slave")?.index;
        assert_eq!(b.maps.active(dns.id)?, slave);
        let (action, out) = b.run(b.client_if, &dns_frame)?;
        assert_eq!((action, destination(&out)), (XDP_REDIRECT, SLAVE));
        assert_eq!(
            b.flow(&dns_key).expect("the dns flow").flow.created_ns,
            created
        );

        // web is gone, with its flow; its port is the kernel's again.
        assert_eq!(applied.flows_removed, 1);
        assert!(b.flow(&web_key).is_none());
        let (action, out) = b.run(b.client_if, &web)?;
        assert_eq!((action, out), (XDP_PASS, web.clone()));

        // The new service serves on its own VIP.
        let new = udp(
            CLIENT_MAC,
            CLIENT_IF_MAC,
            CLIENT,
            [198, 18, 1, 103],
            40_002,
            9000,
        );
        let (action, out) = b.run(b.client_if, &new)?;
        assert_eq!((action, destination(&out)), (XDP_REDIRECT, MASTER));

        // Written again unchanged, nothing moves.
        let again = b.maps.numbering()?;
        let applied = b.maps.apply_plan(&plan, &again, true)?;
        assert_eq!(applied.flows_removed, 0);
        assert_eq!(applied.kept.len(), plan.services.len());
        b.plan = plan;
        Ok(())
    })
}
