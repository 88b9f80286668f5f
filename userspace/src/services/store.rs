//! The maps a service change reads and writes, behind a narrow trait: [`MapStore`] is the
//! datapath's pinned maps, [`FakeStore`] an in-memory stand-in, so the table's id allocation,
//! generation flip and undo log run as plain host unit tests (aya does the same with
//! `aya/src/sys/fake.rs`).
//!
//! The trait has one method per kind of write a change makes, and no reads of counters: the
//! listings that need counters read the maps directly ([`MapStore::maps`]).

use std::{collections::BTreeMap, time::Duration};

use aya::maps::{MapError, PerCpuValues};
use dataplane_common::{
    Backend, Flow, FlowKey, Service, ServiceKey, SlotKey, ct_event, flow_dir, flow_kind, map, proto,
};

use super::{Result, ServiceTableError, map_err};
use crate::loader::ServiceMaps;

/// Per-id state created with a service or backend and removed with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PerId {
    /// A service's packet, byte and new-flow counters.
    ServiceStats,
    /// A backend's counters.
    BackendStats,
    /// A backend's open-connection count (for `lc`).
    BackendConns,
    /// An `rr` service's per-CPU position in its sequence.
    RrCursor,
}

impl PerId {
    /// The datapath map that holds it.
    pub fn map_name(self) -> &'static str {
        match self {
            PerId::ServiceStats => map::SERVICE_STATS,
            PerId::BackendStats => map::BACKEND_STATS,
            PerId::BackendConns => map::BACKEND_CONNS,
            PerId::RrCursor => map::RR_CURSORS,
        }
    }
}

/// What a service change writes.
pub trait Store {
    /// Every service entry, `NodePort` faces included.
    fn services(&self) -> Result<Vec<(ServiceKey, Service)>>;
    /// Every backend by id.
    fn backends(&self) -> Result<Vec<(u32, Backend)>>;
    fn put_service(&mut self, key: ServiceKey, value: Service) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<()>;
    fn remove_slot(&mut self, key: &SlotKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<()>;
    fn remove_backend(&mut self, id: u32) -> Result<()>;
    /// Makes the per-id state `what` of `id` start from zero.
    fn reset(&mut self, what: PerId, id: u32) -> Result<()>;
    fn remove(&mut self, what: PerId, id: u32) -> Result<()>;
    /// Removes both entries of every tracked flow that `matches` (called on original and reply
    /// entries alike), keeping the open-connection counts right; returns how many flows.
    fn remove_flows(&mut self, matches: &dyn Fn(&FlowKey, &Flow) -> bool) -> usize;
}

/// Runs a map update, retrying while the kernel answers ENOMEM.
///
/// Maps without preallocation take their elements from the BPF memory allocator, whose per-CPU
/// caches are refilled asynchronously (`irq_work`); a burst of updates from user space, such as a
/// restore of thousands of services, can drain them and get a transient ENOMEM with plenty of
/// memory free (seen on 6.18; amazon-linux-2023 issue 1129 describes the same on 6.12). A short
/// pause lets the refill run.
fn retrying<T>(mut update: impl FnMut() -> Result<T, MapError>) -> Result<T, MapError> {
    let mut pause = Duration::from_micros(50);
    for _ in 0..200 {
        match update() {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOMEM) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            other => return other,
        }
    }
    update()
}

/// The datapath's pinned maps.
pub struct MapStore {
    pub maps: ServiceMaps,
}

impl MapStore {
    pub fn new(maps: ServiceMaps) -> Self {
        MapStore { maps }
    }

    /// Adds to the user-space removal counter of conntrack table `t` (kept on CPU 0's slot;
    /// only user space writes it, one writer at a time under the node lock).
    fn count_user_removals(&mut self, t: usize, n: u64) {
        if n == 0 {
            return;
        }
        let slot = ct_event::USER_REMOVALS + t as u32;
        if let Ok(values) = self.maps.ct_events.get(&slot, 0) {
            let mut v: Vec<u64> = values.iter().copied().collect();
            v[0] += n;
            if let Ok(values) = PerCpuValues::try_from(v) {
                let _ = self.maps.ct_events.set(slot, values, 0);
            }
        }
    }
}

impl Store for MapStore {
    fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        self.maps
            .services
            .iter()
            .map(|r| r.map_err(map_err("read", "SERVICES")))
            .collect()
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        self.maps
            .backends
            .iter()
            .map(|r| r.map_err(map_err("read", "BACKENDS")))
            .collect()
    }

    fn put_service(&mut self, key: ServiceKey, value: Service) -> Result<()> {
        retrying(|| self.maps.services.insert(key, value, 0))
            .map_err(map_err("write service", "SERVICES"))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.maps
            .services
            .remove(key)
            .map_err(map_err("delete service", "SERVICES"))
    }

    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<()> {
        retrying(|| self.maps.slots.insert(key, backend_id, 0))
            .map_err(map_err("write selection table", "SLOTS"))
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<()> {
        self.maps
            .slots
            .remove(key)
            .map_err(map_err("delete selection slot", "SLOTS"))
    }

    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        retrying(|| self.maps.backends.insert(id, backend, 0))
            .map_err(map_err("write backend", "BACKENDS"))
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.maps
            .backends
            .remove(&id)
            .map_err(map_err("delete backend", "BACKENDS"))
    }

    fn reset(&mut self, what: PerId, id: u32) -> Result<()> {
        // The per-CPU entries are the datapath's to create (see the datapath's
        // `counters::count_service`): zero is their absence.
        let absent_ok = |r: Result<(), MapError>| match r {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            other => other.map_err(map_err("reset per-id state", what.map_name())),
        };
        let out = match what {
            PerId::ServiceStats => self.maps.service_out_stats.as_mut(),
            PerId::BackendStats => self.maps.backend_out_stats.as_mut(),
            _ => None,
        };
        if let Some(out) = out {
            absent_ok(out.remove(&id))?;
        }
        absent_ok(match what {
            PerId::ServiceStats => self.maps.service_stats.remove(&id),
            PerId::BackendStats => self.maps.backend_stats.remove(&id),
            PerId::RrCursor => self.maps.rr_cursors.remove(&id),
            // An array element cannot be removed: zero it.
            PerId::BackendConns => self.maps.backend_conns.set(id, 0, 0),
        })
    }

    /// Here the same as [`reset`](Store::reset): with the entries the datapath's to create,
    /// starting from zero and removing are one thing.
    fn remove(&mut self, what: PerId, id: u32) -> Result<()> {
        self.reset(what, id)
    }

    fn remove_flows(&mut self, matches: &dyn Fn(&FlowKey, &Flow) -> bool) -> usize {
        let mut flows = 0;
        for t in 0..2 {
            let doomed: Vec<(FlowKey, Flow)> = self.maps.conntrack[t]
                .iter()
                .filter_map(std::result::Result::ok)
                .filter(|(k, f)| matches(k, f))
                .collect();
            let mut removed = 0u64;
            for (k, f) in &doomed {
                if self.maps.conntrack[t].remove(k).is_err() {
                    continue;
                }
                removed += 1;
                if k.dir == flow_dir::ORIGINAL {
                    flows += 1;
                    if still_counted(k, f)
                        && let Ok(n) = self.maps.backend_conns.get(&f.backend_id, 0)
                    {
                        let _ = self
                            .maps
                            .backend_conns
                            .set(f.backend_id, n.saturating_sub(1), 0);
                    }
                }
            }
            self.count_user_removals(t, removed);
        }
        flows
    }
}

/// True for an open TCP flow, which counts against its backend until it closes.
fn still_counted(key: &FlowKey, flow: &Flow) -> bool {
    flow.kind & flow_kind::CLOSE_COUNTED == 0 && key.proto == proto::TCP
}

/// An in-memory [`Store`] for host unit tests, with a failure to inject: the write numbered
/// `fail_at` (counting from 0) fails as the kernel's ENOMEM would.
#[derive(Debug, Default)]
pub struct FakeStore {
    pub services: BTreeMap<(u32, u16, u8), (ServiceKey, Service)>,
    pub slots: BTreeMap<(u32, u32, u32), u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub per_id: BTreeMap<(PerId, u32), u64>,
    pub flows: Vec<(FlowKey, Flow)>,
    pub writes: usize,
    pub fail_at: Option<usize>,
}

impl FakeStore {
    fn write(&mut self, map: &'static str) -> Result<()> {
        let n = self.writes;
        self.writes += 1;
        if self.fail_at == Some(n) {
            return Err(ServiceTableError::Map {
                action: "write (injected failure)",
                map,
                source: MapError::IoError(std::io::Error::from_raw_os_error(libc::ENOMEM)),
            });
        }
        Ok(())
    }
}

fn service_index(key: &ServiceKey) -> (u32, u16, u8) {
    (key.addr, key.port, key.proto)
}

impl Store for FakeStore {
    fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        Ok(self.services.values().copied().collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        Ok(self.backends.iter().map(|(id, b)| (*id, *b)).collect())
    }

    fn put_service(&mut self, key: ServiceKey, value: Service) -> Result<()> {
        self.write("SERVICES")?;
        self.services.insert(service_index(&key), (key, value));
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(&service_index(key));
        Ok(())
    }

    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<()> {
        self.write("SLOTS")?;
        self.slots
            .insert((key.service_id, key.generation, key.slot), backend_id);
        Ok(())
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<()> {
        self.slots
            .remove(&(key.service_id, key.generation, key.slot));
        Ok(())
    }

    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.write("BACKENDS")?;
        self.backends.insert(id, backend);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        Ok(())
    }

    fn reset(&mut self, what: PerId, id: u32) -> Result<()> {
        self.write("counters")?;
        self.per_id.insert((what, id), 0);
        Ok(())
    }

    fn remove(&mut self, what: PerId, id: u32) -> Result<()> {
        self.per_id.remove(&(what, id));
        Ok(())
    }

    fn remove_flows(&mut self, matches: &dyn Fn(&FlowKey, &Flow) -> bool) -> usize {
        let originals = |flows: &[(FlowKey, Flow)]| {
            flows
                .iter()
                .filter(|(k, _)| k.dir == flow_dir::ORIGINAL)
                .count()
        };
        let before = originals(&self.flows);
        self.flows.retain(|(k, f)| !matches(k, f));
        before - originals(&self.flows)
    }
}
