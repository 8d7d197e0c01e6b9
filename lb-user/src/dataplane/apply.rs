//! Writing a plan into the maps: all of it into new maps, or as a diff into the maps of a
//! running dataplane (adopted from pins), so that nothing that did not change is rewritten
//! and every service stays on the backend it is on.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::{bail, Context, Result};
use lb_common::{
    iface_flags, proto, service_flags, vip_bit, Backend, EndpointKey, FlowKey, Iface, ServiceValue,
    VipInfo, KEEP_FOREVER, MAX_BACKENDS, MAX_IFINDEX, NO_BACKEND,
};

use super::{writer::PlanMaps, MapWriter};
use crate::{
    config::{Failback, Role},
    plan::{Numbering, Plan, PlannedService},
};

/// What [`MapWriter::apply_plan`] changed beyond the plan itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The backend index each service (by id) is on after the write
    /// ([`NO_BACKEND`] when none).
    pub active: HashMap<u32, u32>,
    /// The services (by id) that were left on the backend the running dataplane had them on.
    pub kept: HashSet<u32>,
    /// Flows removed because their service or backend is no longer in the plan.
    pub flows_removed: usize,
}

impl MapWriter {
    /// Backend `index` as the maps hold it.
    pub fn backend(&self, index: u32) -> Result<Backend> {
        Ok(self
            .backends
            .lock()
            .expect("BACKENDS map lock")
            .get(&index, 0)?)
    }

    /// Sets the MAC of backend `index` (found when it first answered): one map write.
    pub fn set_backend_mac(&self, index: u32, mac: [u8; 6]) -> Result<()> {
        let mut backends = self.backends.lock().expect("BACKENDS map lock");
        let mut backend = backends.get(&index, 0)?;
        backend.mac = mac;
        Ok(backends.set(index, backend, 0)?)
    }

    /// The numbers the maps already use, by identity (empty for new maps): what
    /// [`Plan::renumber`] keeps.
    pub fn numbering(&self) -> Result<Numbering> {
        let mut numbering = Numbering::default();
        let maps = self.plan_maps.lock().expect("plan maps lock");
        for entry in maps.services.iter() {
            let (key, value) = entry.context("cannot read the services map")?;
            if key.proto != proto::ICMP {
                numbering.services.insert(key, value.id);
            }
        }
        for index in 0..MAX_BACKENDS {
            let backend = self.backend(index)?;
            if backend != Backend::default() {
                numbering
                    .backends
                    .insert((backend.service, Ipv4Addr::from(backend.ip)), index);
            }
        }
        for ifindex in 0..MAX_IFINDEX {
            let iface = maps.ifaces.get(&ifindex, 0)?;
            if iface.flags != 0 {
                numbering.slots.insert(ifindex, iface.slot);
            }
        }
        Ok(numbering)
    }

    /// Writes the whole plan into new maps; each service starts on its first backend.
    pub fn write_plan(&self, plan: &Plan) -> Result<()> {
        self.apply_plan(plan, &Numbering::default(), false)?;
        Ok(())
    }

    /// Writes `plan` over maps that hold `previous` (see [`MapWriter::numbering`]; the plan
    /// is renumbered after it). With `keep_active`, a service whose active backend in the
    /// maps is one of its backends stays on it; otherwise it starts on its first backend
    /// whose MAC is known.
    ///
    /// The order keeps the program consistent at every step: backends are written before
    /// the services that point at them, services and VIPs that go are taken out before
    /// their backends are cleared, and the NICs come last.
    pub fn apply_plan(
        &self,
        plan: &Plan,
        previous: &Numbering,
        keep_active: bool,
    ) -> Result<Applied> {
        let mut applied = Applied::default();
        let mut maps = self.plan_maps.lock().expect("plan maps lock");
        maps.settings
            .set(
                0,
                super::writer::flow_settings(&plan.flows, plan.syncs_flows()),
                0,
            )
            .context("cannot write the connection table's timeouts")?;
        maps.write_local_addresses(plan)?;

        let known_backends: HashSet<u32> = previous.backends.values().copied().collect();
        for service in &plan.services {
            for backend in &service.backends {
                let value = Backend {
                    ip: backend.ip.octets(),
                    mac: backend.mac,
                    egress_mac: backend.egress_mac,
                    ifindex: backend.ifindex,
                    service: service.id,
                };
                let mut backends = self.backends.lock().expect("BACKENDS map lock");
                if backends.get(&backend.index, 0)? != value {
                    backends.set(backend.index, value, 0)?;
                }
                drop(backends);
                if !keep_active || !known_backends.contains(&backend.index) {
                    self.set_keep(backend.index, KEEP_FOREVER)?;
                    self.set_drained(backend.index, false)?;
                }
            }
            let current = self.active(service.id)?;
            let active = if keep_active && service.backends.iter().any(|b| b.index == current) {
                applied.kept.insert(service.id);
                current
            } else {
                // The first backend that can be reached: one whose MAC is known.
                let first = service.backends.iter().find(|b| b.mac_known);
                let first = first.map_or(NO_BACKEND, |b| b.index);
                self.set_active(service.id, first)?;
                first
            };
            applied.active.insert(service.id, active);
        }
        maps.write_services(plan)?;

        // What the plan no longer has: no new flow reaches it (its services are gone from
        // `SERVICES`), the flows it had are removed, then its numbers are cleared.
        let ids: HashSet<u32> = plan.services.iter().map(|s| s.id).collect();
        let indexes: HashSet<u32> = plan
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.index))
            .collect();
        let gone_services: Vec<u32> = previous
            .services
            .values()
            .copied()
            .filter(|id| !ids.contains(id))
            .collect();
        let gone_backends: Vec<u32> = previous
            .backends
            .values()
            .copied()
            .filter(|index| !indexes.contains(index))
            .collect();
        for id in &gone_services {
            self.set_active(*id, NO_BACKEND)?;
        }
        for index in &gone_backends {
            self.set_keep(*index, 0)?;
            self.set_drained(*index, false)?;
        }
        if !gone_services.is_empty() || !gone_backends.is_empty() {
            applied.flows_removed = self.remove_flows(&gone_services, &gone_backends)?;
        }
        for index in &gone_backends {
            let mut backends = self.backends.lock().expect("BACKENDS map lock");
            backends.set(*index, Backend::default(), 0)?;
        }

        maps.write_vips(plan)?;
        maps.write_interfaces(plan, previous)?;
        Ok(applied)
    }

    /// Removes the flows of services `services` or on backends `backends`, and their reply
    /// index entries; returns how many flows went.
    ///
    /// The only deletion the agent makes in the table: these flows would otherwise be
    /// dropped (their service has no backend any more) or sent to a backend that is gone
    /// until they expire. A flow the program re-creates on the same tuple meanwhile (a
    /// packet of it arrived between the read and the delete) may go with them; its next
    /// packet starts it again.
    fn remove_flows(&self, services: &[u32], backends: &[u32]) -> Result<usize> {
        let services: HashSet<u32> = services.iter().copied().collect();
        let backends: HashSet<u32> = backends.iter().copied().collect();
        let gone: HashSet<FlowKey> = {
            let flows = self.flows.lock().expect("FLOWS map lock");
            flows
                .iter()
                .filter_map(|entry| entry.ok())
                .filter(|(_, flow)| {
                    services.contains(&flow.service) || backends.contains(&flow.backend)
                })
                .map(|(key, _)| key)
                .collect()
        };
        {
            let mut flows = self.flows.lock().expect("FLOWS map lock");
            for key in &gone {
                // Already gone (expired and evicted) is fine.
                let _ = flows.remove(key);
            }
        }
        let mut replies = self.replies.lock().expect("REPLIES map lock");
        let stale: Vec<FlowKey> = replies
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, reply)| backends.contains(&reply.backend) || gone.contains(&reply.flow))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = replies.remove(&key);
        }
        Ok(gone.len())
    }
}

impl PlanMaps {
    fn write_local_addresses(&mut self, plan: &Plan) -> Result<()> {
        let wanted: HashSet<[u8; 4]> = plan.local_addresses.iter().map(|a| a.octets()).collect();
        for ip in &wanted {
            self.local_addrs
                .insert(ip, 1, 0)
                .with_context(|| format!("cannot write local address {}", Ipv4Addr::from(*ip)))?;
        }
        let stale: Vec<[u8; 4]> = self
            .local_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for ip in stale {
            self.local_addrs.remove(&ip)?;
        }
        Ok(())
    }

    /// `SERVICES`: every service's key, plus an ICMP echo key per VIP, which goes to the
    /// first service on that VIP unless one takes every protocol (its wildcard key already
    /// matches echo). Keys no longer wanted are removed.
    fn write_services(&mut self, plan: &Plan) -> Result<()> {
        let mut wanted: Vec<(EndpointKey, ServiceValue, &str)> = plan
            .services
            .iter()
            .map(|s| (s.endpoint_key(), service_value(s), s.name.as_str()))
            .collect();
        for service in &plan.services {
            let echo = EndpointKey::new(service.vip.octets(), proto::ICMP, [0, 0]);
            let taken = plan
                .services
                .iter()
                .any(|s| s.vip == service.vip && s.protocol.is_none())
                || wanted.iter().any(|(key, _, _)| *key == echo);
            if !taken {
                wanted.push((echo, service_value(service), service.name.as_str()));
            }
        }
        for (key, value, name) in &wanted {
            if self.services.get(key, 0).ok() != Some(*value) {
                self.services
                    .insert(key, value, 0)
                    .with_context(|| format!("cannot write service {name}"))?;
            }
        }
        let stale: Vec<EndpointKey> = self
            .services
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.iter().any(|(key, _, _)| key == k))
            .collect();
        for key in stale {
            self.services.remove(&key)?;
        }
        Ok(())
    }

    /// `VIPS` and `VIP_BITS`: set for the plan's VIPs, cleared for any other.
    fn write_vips(&mut self, plan: &Plan) -> Result<()> {
        let mut vips: BTreeMap<[u8; 4], u32> = BTreeMap::new();
        for service in &plan.services {
            *vips.entry(service.vip.octets()).or_default() += 1;
        }
        let old: Vec<[u8; 4]> = self.vips.keys().filter_map(|k| k.ok()).collect();
        let mut bits: BTreeMap<u32, u64> = BTreeMap::new();
        for vip in &old {
            bits.entry(vip_bit(vip).0).or_default();
        }
        for (vip, services) in &vips {
            self.vips
                .insert(
                    vip,
                    VipInfo {
                        services: *services,
                    },
                    0,
                )
                .context("cannot write a VIP")?;
            let (entry, bit) = vip_bit(vip);
            *bits.entry(entry).or_default() |= bit;
        }
        for (entry, value) in bits {
            if self.vip_bits.get(&entry, 0)? != value {
                self.vip_bits
                    .set(entry, value, 0)
                    .context("cannot write a VIP's bit")?;
            }
        }
        for vip in old.iter().filter(|vip| !vips.contains_key(*vip)) {
            self.vips.remove(vip)?;
        }
        Ok(())
    }

    /// `TX_PORTS` and `IFACES`; a NIC that left the plan is no longer served.
    fn write_interfaces(&mut self, plan: &Plan, previous: &Numbering) -> Result<()> {
        for iface in &plan.interfaces {
            if iface.ifindex >= MAX_IFINDEX {
                bail!(
                    "interface {} has index {}; the dataplane serves indexes below {MAX_IFINDEX}",
                    iface.name,
                    iface.ifindex
                );
            }
            self.tx_ports
                .set(iface.ifindex, iface.ifindex, None, 0)
                .with_context(|| format!("cannot add {} to the redirect map", iface.name))?;
        }
        for iface in &plan.interfaces {
            let flags = match iface.role {
                Role::Client => iface_flags::CLIENT,
                Role::Backend => iface_flags::BACKEND,
                Role::Both => iface_flags::CLIENT | iface_flags::BACKEND,
            };
            let value = Iface {
                mac: iface.mac,
                flags,
                slot: iface.slot,
            };
            if self.ifaces.get(&iface.ifindex, 0)? != value {
                self.ifaces.set(iface.ifindex, value, 0)?;
            }
        }
        for ifindex in previous.slots.keys() {
            if !plan.interfaces.iter().any(|i| i.ifindex == *ifindex) {
                self.ifaces.set(*ifindex, Iface::default(), 0)?;
            }
        }
        Ok(())
    }
}

fn service_value(service: &PlannedService) -> ServiceValue {
    let flags = match service.policy.failback {
        Failback::Graceful => service_flags::GRACEFUL,
        Failback::Immediate => 0,
    };
    ServiceValue {
        id: service.id,
        flags,
    }
}
