//! Stable numbering: the ids of services, the indexes of backends and the counter slots of
//! NICs that a running dataplane already uses are kept when a plan is written over it.
//!
//! A flow in the connection table names its service and backend by number. A plan is
//! numbered densely from the config; [`Plan::renumber`] gives every service, backend and
//! NIC that the dataplane already knows the number it has there, and new ones numbers no
//! one used, so that a restarted agent with a changed config (or a reload) never lets a
//! flow point at another service's backend.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use lb_common::{EndpointKey, MAX_BACKENDS, MAX_IFACES, MAX_SERVICES};

use super::Plan;

/// The numbers a running dataplane uses, by identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Numbering {
    /// Service id by the service's endpoint (VIP, protocol, port).
    pub services: HashMap<EndpointKey, u32>,
    /// Backend index by (service id, backend address).
    pub backends: HashMap<(u32, Ipv4Addr), u32>,
    /// Counter slot by NIC index.
    pub slots: HashMap<u32, u32>,
}

/// Hands out numbers below a limit: first the ones neither kept nor used before, then (when
/// those run out) the ones used before.
struct Allocator {
    taken: HashSet<u32>,
    used_before: HashSet<u32>,
    limit: u32,
}

impl Allocator {
    fn new(used_before: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        Allocator {
            taken: HashSet::new(),
            used_before: used_before.into_iter().collect(),
            limit,
        }
    }

    fn keep(&mut self, number: u32) {
        self.taken.insert(number);
    }

    fn next(&mut self) -> u32 {
        let fresh =
            (0..self.limit).find(|n| !self.taken.contains(n) && !self.used_before.contains(n));
        let number = fresh
            .or_else(|| (0..self.limit).find(|n| !self.taken.contains(n)))
            .expect("the config's validation keeps counts below the dataplane's limits");
        self.taken.insert(number);
        number
    }
}

impl Plan {
    /// Renumbers the plan so that what `previous` knows keeps its number (see the module).
    pub fn renumber(&mut self, previous: &Numbering) {
        let mut ids = Allocator::new(previous.services.values().copied(), MAX_SERVICES);
        let kept: Vec<Option<u32>> = self
            .services
            .iter()
            .map(|s| previous.services.get(&s.endpoint_key()).copied())
            .collect();
        for id in kept.iter().flatten() {
            ids.keep(*id);
        }
        for (service, kept) in self.services.iter_mut().zip(kept) {
            service.id = kept.unwrap_or_else(|| ids.next());
        }

        let mut indexes = Allocator::new(previous.backends.values().copied(), MAX_BACKENDS);
        let mut fresh = Vec::new();
        for service in &mut self.services {
            for backend in &mut service.backends {
                match previous.backends.get(&(service.id, backend.ip)) {
                    Some(index) => {
                        backend.index = *index;
                        indexes.keep(*index);
                    }
                    None => fresh.push((service.id, backend.ip)),
                }
            }
        }
        for service in &mut self.services {
            for backend in &mut service.backends {
                if fresh.contains(&(service.id, backend.ip)) {
                    backend.index = indexes.next();
                }
            }
        }

        let mut slots = Allocator::new(previous.slots.values().copied(), MAX_IFACES);
        let kept: Vec<Option<u32>> = self
            .interfaces
            .iter()
            .map(|i| previous.slots.get(&i.ifindex).copied())
            .collect();
        for slot in kept.iter().flatten() {
            slots.keep(*slot);
        }
        for (iface, kept) in self.interfaces.iter_mut().zip(kept) {
            iface.slot = kept.unwrap_or_else(|| slots.next());
        }
    }
}
