//! The transactional service table: ids, the generation flip and the undo log.
//!
//! Every change is published so that a packet sees either the old or the new backend set:
//! the new selection table is written under the other generation, then the service entry is
//! replaced in one map update, then the old table is removed after a grace period. A change
//! that fails midway removes what it wrote and leaves the previous state in place.
//!
//! Ids are allocated from what the table read when it was opened, so two tables open at once
//! would hand out the same ids: callers hold the node lock (`crate::lock`) from open to drop.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
    path::Path,
    time::Duration,
};

use aya::maps::{MapData, MapError, PerCpuHashMap, PerCpuValues};
use dataplane_common::{
    Backend, Counters, Flow, FlowKey, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES,
    Service, ServiceCounters, ServiceKey, SlotKey, backend_state, proto, scheduler, service_flags,
};

use super::{
    MAX_LC_BACKENDS, Result, ServiceTableError, ipvsadm,
    model::{
        BackendInfo, BackendSpec, BackendState, SchedFlags, Scheduler, ServiceInfo, ServiceSpec,
        VirtualAddr, affinity_mask, affinity_netmask, backend_addr, new_backend,
    },
    parse_err,
    selection::selection_table,
    store::{MapStore, PerId, Store},
};
use crate::loader::ServiceMaps;

/// How long a replaced selection table stays in the map: packets that read the old service
/// entry may still index into it. A program run takes microseconds; this is ample.
pub const GRACE: Duration = Duration::from_millis(5);

/// One service as the user-space table knows it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) key: ServiceKey,
    pub(crate) value: Service,
    /// The `NodePort` face of the service: same value (with the NODEPORT flag), address zero.
    pub(crate) nodeport: Option<ServiceKey>,
    pub(crate) backends: Vec<(u32, Backend)>,
}

impl Entry {
    pub(crate) fn vaddr(&self) -> VirtualAddr {
        VirtualAddr::from_key(&self.key).expect("keys are written by this module")
    }

    fn find(&self, addr: SocketAddrV4) -> Option<usize> {
        self.backends
            .iter()
            .position(|(_, b)| backend_addr(b) == addr)
    }

    pub(crate) fn nodeport(&self) -> Option<u16> {
        self.nodeport.map(|k| u16::from_be(k.port))
    }

    /// The spec that would make this service again, a draining backend with weight 0 (IPVS's
    /// way of saying the same).
    pub(crate) fn spec(&self) -> ServiceSpec {
        ServiceSpec {
            vaddr: self.vaddr(),
            scheduler: Scheduler::from_code(self.value.scheduler),
            affinity_secs: self.value.affinity_secs,
            affinity_netmask: affinity_netmask(self.value.affinity_mask),
            sched_flags: SchedFlags::from_service_bits(self.value.flags),
            nodeport: self.nodeport(),
            backends: self
                .backends
                .iter()
                .map(|(_, b)| BackendSpec {
                    addr: backend_addr(b),
                    weight: if b.state == backend_state::DRAINING {
                        0
                    } else {
                        b.weight
                    },
                })
                .collect(),
        }
    }

    /// Writes the service entry, and its `NodePort` face, so new flows see the current table.
    fn publish(&self, store: &mut impl Store) -> Result<()> {
        store.put_service(self.key, self.value)?;
        if let Some(np) = self.nodeport {
            let value = Service {
                flags: self.value.flags | service_flags::NODEPORT,
                ..self.value
            };
            store.put_service(np, value)?;
        }
        Ok(())
    }
}

/// Something written to the maps by a change in progress, to remove if the change fails.
#[derive(Debug)]
enum Undo {
    Service(ServiceKey),
    Slot(SlotKey),
    Backend(u32),
    PerId(PerId, u32),
}

/// The service table, loaded from a [`Store`] (the pinned maps unless a test says otherwise).
pub struct ServiceTable<S: Store = MapStore> {
    pub(crate) store: S,
    pub(crate) entries: BTreeMap<VirtualAddr, Entry>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
    /// Old selection tables to remove once the grace period has passed.
    retired: Vec<SlotKey>,
    /// Flow removals a change owes, kept for the caller to run later when deferred
    /// ([`defer_flow_sweeps`](Self::defer_flow_sweeps)), else run at once.
    sweeps: Option<Vec<FlowSweep>>,
}

/// Tracked flows a change leaves behind: a removed service's, or a removed backend's (all of
/// them when forced, else its UDP flows, which have no end to wait for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowSweep {
    Service(u32),
    Backend { id: u32, all: bool },
}

impl FlowSweep {
    fn matches(&self, key: &FlowKey, flow: &Flow) -> bool {
        match *self {
            FlowSweep::Service(id) => flow.service_id == id,
            FlowSweep::Backend { id, all } => {
                flow.backend_id == id && (all || key.proto == proto::UDP)
            }
        }
    }
}

/// Runs owed flow removals against the maps pinned in `dir`, in one pass over each conntrack
/// table whatever their number (listing a large hash map costs the same, empty or not).
pub fn sweep_flows(dir: &Path, sweeps: &[FlowSweep]) -> Result<usize> {
    if sweeps.is_empty() {
        return Ok(0);
    }
    let mut store = MapStore::new(ServiceMaps::open(dir)?);
    Ok(store.remove_flows(&|k, f| sweeps.iter().any(|s| s.matches(k, f))))
}

impl ServiceTable<MapStore> {
    /// Reads the current table from the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::load(MapStore::new(ServiceMaps::open(dir)?))
    }

    /// Every service with its backends and counters, ordered by virtual address.
    pub fn list(&self) -> Vec<ServiceInfo> {
        let maps = &self.store.maps;
        let sum = |v: Result<PerCpuValues<ServiceCounters>, MapError>| {
            let mut total = ServiceCounters::default();
            if let Ok(v) = v {
                v.iter().for_each(|c| total.add(c));
            }
            total
        };
        let out = |m: &Option<PerCpuHashMap<MapData, u32, Counters>>, id: u32| {
            let mut total = Counters::default();
            if let Some(Ok(v)) = m.as_ref().map(|m| m.get(&id, 0)) {
                for c in v.iter() {
                    total.packets += c.packets;
                    total.bytes += c.bytes;
                }
            }
            total
        };
        self.entries
            .values()
            .map(|e| {
                let c = sum(maps.service_stats.get(&e.value.id, 0));
                let o = out(&maps.service_out_stats, e.value.id);
                ServiceInfo {
                    service: e.vaddr(),
                    nodeport: e.nodeport(),
                    scheduler: Scheduler::from_code(e.value.scheduler),
                    affinity_secs: e.value.affinity_secs,
                    affinity_netmask: affinity_netmask(e.value.affinity_mask),
                    sched_flags: SchedFlags::from_service_bits(e.value.flags)
                        .canonical(Scheduler::from_code(e.value.scheduler)),
                    packets: c.packets,
                    bytes: c.bytes,
                    out_packets: o.packets,
                    out_bytes: o.bytes,
                    new_flows: c.new_flows,
                    backends: e
                        .backends
                        .iter()
                        .map(|(id, b)| {
                            let c = sum(maps.backend_stats.get(id, 0));
                            let o = out(&maps.backend_out_stats, *id);
                            BackendInfo {
                                addr: backend_addr(b),
                                weight: b.weight,
                                state: if b.state == backend_state::DRAINING {
                                    BackendState::Draining
                                } else {
                                    BackendState::Active
                                },
                                connections: maps.backend_conns.get(id, 0).unwrap_or(0),
                                packets: c.packets,
                                bytes: c.bytes,
                                out_packets: o.packets,
                                out_bytes: o.bytes,
                                new_flows: c.new_flows,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

impl<S: Store> ServiceTable<S> {
    /// Reads the current table from `store`.
    pub fn load(store: S) -> Result<Self> {
        let mut by_service: HashMap<u32, Vec<(u32, Backend)>> = HashMap::new();
        let mut backend_ids = BTreeSet::new();
        for (id, b) in store.backends()? {
            backend_ids.insert(id);
            by_service.entry(b.service_id).or_default().push((id, b));
        }
        let mut entries = BTreeMap::new();
        let mut service_ids = BTreeSet::new();
        let mut nodeports = HashMap::new();
        for (key, value) in store.services()? {
            if value.flags & service_flags::NODEPORT != 0 {
                nodeports.insert(value.id, key);
                continue;
            }
            let Some(vaddr) = VirtualAddr::from_key(&key) else {
                continue;
            };
            service_ids.insert(value.id);
            let mut backends = by_service.remove(&value.id).unwrap_or_default();
            backends.sort_by_key(|(id, _)| *id);
            entries.insert(
                vaddr,
                Entry {
                    key,
                    value,
                    nodeport: None,
                    backends,
                },
            );
        }
        for entry in entries.values_mut() {
            entry.nodeport = nodeports.remove(&entry.value.id);
        }
        Ok(ServiceTable {
            store,
            entries,
            service_ids,
            backend_ids,
            retired: Vec::new(),
            sweeps: None,
        })
    }

    /// The services as specs, ordered by virtual address.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.entries.values().map(Entry::spec).collect()
    }

    /// The datapath's id of a service (for filtering flows).
    pub fn service_id(&self, vaddr: &VirtualAddr) -> Result<u32> {
        Ok(self.entry(vaddr)?.value.id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Creates a service; nothing is left behind when it fails.
    pub fn add(&mut self, spec: &ServiceSpec) -> Result<()> {
        let mut undo = Vec::new();
        let result = self.add_inner(spec, &mut undo);
        if result.is_err() {
            self.rollback(undo);
        }
        result
    }

    fn validate(&self, spec: &ServiceSpec) -> Result<()> {
        if self.entries.contains_key(&spec.vaddr) {
            return Err(ServiceTableError::Duplicate {
                service: spec.vaddr,
            });
        }
        self.validate_with(spec, None)
    }

    /// Checks `spec` against the limits and the other services (`replacing` is the one it
    /// replaces, whose `NodePort` it may keep).
    fn validate_with(&self, spec: &ServiceSpec, replacing: Option<&VirtualAddr>) -> Result<()> {
        let max = max_backends(spec.scheduler.code());
        if spec.backends.len() > max {
            return Err(ServiceTableError::TooManyBackends {
                service: spec.vaddr,
                count: spec.backends.len(),
                max,
            });
        }
        if let Some(port) = spec.nodeport {
            if port == 0 {
                return Err(parse_err("node port", "0", "port 0 is not a valid port"));
            }
            let clash = self.entries.values().find(|e| {
                e.nodeport() == Some(port)
                    && e.key.proto == spec.vaddr.key().proto
                    && Some(&e.vaddr()) != replacing
            });
            if let Some(e) = clash {
                return Err(ServiceTableError::NodePortInUse {
                    port,
                    proto: spec.vaddr.proto,
                    service: e.vaddr(),
                });
            }
        }
        let mut seen = BTreeSet::new();
        for b in &spec.backends {
            if !seen.insert(b.addr) {
                return Err(ServiceTableError::DuplicateBackend {
                    service: spec.vaddr,
                    backend: b.addr,
                });
            }
        }
        Ok(())
    }

    fn add_inner(&mut self, spec: &ServiceSpec, undo: &mut Vec<Undo>) -> Result<()> {
        self.validate(spec)?;
        let id = allocate(&self.service_ids, MAX_SERVICES).ok_or(ServiceTableError::Full {
            what: "services",
            max: MAX_SERVICES,
        })?;
        let mut entry = Entry {
            key: spec.vaddr.key(),
            value: Service {
                id,
                table_len: 0,
                generation: 0,
                affinity_secs: spec.affinity_secs,
                scheduler: spec.scheduler.code(),
                flags: spec.sched_flags.service_bits(),
                backend_count: 0,
                affinity_mask: affinity_mask(spec.affinity_netmask),
            },
            nodeport: spec.nodeport.map(|port| ServiceKey {
                addr: 0,
                port: port.to_be(),
                ..spec.vaddr.key()
            }),
            backends: Vec::new(),
        };
        self.store.reset(PerId::ServiceStats, id)?;
        undo.push(Undo::PerId(PerId::ServiceStats, id));
        self.service_ids.insert(id);
        if spec.scheduler.uses_cursor() {
            self.store.reset(PerId::RrCursor, id)?;
            undo.push(Undo::PerId(PerId::RrCursor, id));
        }
        for b in &spec.backends {
            let bid = self.insert_backend(b, id, undo)?;
            entry.backends.push((bid, new_backend(b, id)));
        }
        let table = self.write_table(&mut entry, undo)?;
        entry.value.table_len = table.len() as u32;
        entry.value.backend_count = entry.backends.len() as u16;
        undo.push(Undo::Service(entry.key));
        if let Some(np) = entry.nodeport {
            undo.push(Undo::Service(np));
        }
        entry.publish(&mut self.store)?;
        self.entries.insert(spec.vaddr, entry);
        Ok(())
    }

    fn insert_backend(
        &mut self,
        spec: &BackendSpec,
        service_id: u32,
        undo: &mut Vec<Undo>,
    ) -> Result<u32> {
        let id = allocate(&self.backend_ids, MAX_BACKENDS).ok_or(ServiceTableError::Full {
            what: "backends",
            max: MAX_BACKENDS,
        })?;
        self.store.reset(PerId::BackendStats, id)?;
        undo.push(Undo::PerId(PerId::BackendStats, id));
        self.store.reset(PerId::BackendConns, id)?;
        undo.push(Undo::PerId(PerId::BackendConns, id));
        self.store.put_backend(id, new_backend(spec, service_id))?;
        undo.push(Undo::Backend(id));
        self.backend_ids.insert(id);
        Ok(id)
    }

    /// Writes the selection table for `entry`'s backends under the next generation, and sets
    /// `entry.value`'s generation to it (the caller publishes the service entry).
    fn write_table(&mut self, entry: &mut Entry, undo: &mut Vec<Undo>) -> Result<Vec<u32>> {
        let usable: Vec<(u32, SocketAddrV4, u16)> = entry
            .backends
            .iter()
            .filter(|(_, b)| b.state == backend_state::ACTIVE)
            .map(|(id, b)| (*id, backend_addr(b), b.weight))
            .collect();
        let table = selection_table(Scheduler::from_code(entry.value.scheduler), &usable);
        let generation = if entry.value.table_len == 0 {
            entry.value.generation
        } else {
            entry.value.generation ^ 1
        };
        for (slot, id) in table.iter().enumerate() {
            let key = SlotKey {
                service_id: entry.value.id,
                generation,
                slot: slot as u32,
            };
            self.store.put_slot(key, *id)?;
            undo.push(Undo::Slot(key));
        }
        if entry.value.table_len != 0 && generation != entry.value.generation {
            let old = entry.value.generation;
            self.retired
                .extend((0..entry.value.table_len).map(|slot| SlotKey {
                    service_id: entry.value.id,
                    generation: old,
                    slot,
                }));
        }
        entry.value.generation = generation;
        Ok(table)
    }

    /// Rebuilds and publishes the table of the service at `vaddr` after its backends changed.
    fn republish(&mut self, vaddr: VirtualAddr, mut entry: Entry) -> Result<()> {
        let mut undo = Vec::new();
        let retired_before = self.retired.len();
        let old_value = entry.value;
        let result = self.write_table(&mut entry, &mut undo).and_then(|table| {
            entry.value.table_len = table.len() as u32;
            entry.value.backend_count = entry.backends.len() as u16;
            entry.publish(&mut self.store)
        });
        if let Err(e) = result {
            self.retired.truncate(retired_before);
            self.rollback(undo);
            entry.value = old_value;
            self.entries.insert(vaddr, entry);
            return Err(e);
        }
        self.entries.insert(vaddr, entry);
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            let _ = match u {
                Undo::Service(k) => self.store.remove_service(&k),
                Undo::Slot(k) => self.store.remove_slot(&k),
                Undo::Backend(id) => {
                    self.backend_ids.remove(&id);
                    self.store.remove_backend(id)
                }
                Undo::PerId(what, id) => {
                    if what == PerId::ServiceStats {
                        self.service_ids.remove(&id);
                    }
                    self.store.remove(what, id)
                }
            };
        }
    }

    fn entry(&self, vaddr: &VirtualAddr) -> Result<Entry> {
        self.entries
            .get(vaddr)
            .cloned()
            .ok_or(ServiceTableError::Unknown { service: *vaddr })
    }

    /// Deletes a service, its backends, its counters and its tracked flows.
    pub fn delete(&mut self, vaddr: &VirtualAddr) -> Result<()> {
        let entry = self.entry(vaddr)?;
        // Unpublish first, so no new flow picks it while the rest goes.
        self.store.remove_service(&entry.key)?;
        if let Some(np) = entry.nodeport {
            let _ = self.store.remove_service(&np);
        }
        self.entries.remove(vaddr);
        self.retired
            .extend((0..entry.value.table_len).map(|slot| SlotKey {
                service_id: entry.value.id,
                generation: entry.value.generation,
                slot,
            }));
        let id = entry.value.id;
        self.owe_sweep(FlowSweep::Service(id));
        for (id, _) in &entry.backends {
            self.forget_backend(*id);
        }
        let _ = self.store.remove(PerId::ServiceStats, id);
        let _ = self.store.remove(PerId::RrCursor, id);
        self.service_ids.remove(&id);
        Ok(())
    }

    fn forget_backend(&mut self, id: u32) {
        let _ = self.store.remove_backend(id);
        let _ = self.store.remove(PerId::BackendStats, id);
        let _ = self.store.remove(PerId::BackendConns, id);
        self.backend_ids.remove(&id);
    }

    /// Adds a backend to a service, or changes its weight (and reactivates it) if it is there.
    pub fn add_backend(&mut self, vaddr: &VirtualAddr, spec: &BackendSpec) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        if let Some(i) = entry.find(spec.addr) {
            let (id, b) = &mut entry.backends[i];
            b.weight = spec.weight;
            b.state = backend_state::ACTIVE;
            self.store.put_backend(*id, *b)?;
            return self.republish(*vaddr, entry);
        }
        let max = max_backends(entry.value.scheduler);
        if entry.backends.len() >= max {
            return Err(ServiceTableError::TooManyBackends {
                service: *vaddr,
                count: entry.backends.len() + 1,
                max,
            });
        }
        let mut undo = Vec::new();
        let id = match self.insert_backend(spec, entry.value.id, &mut undo) {
            Ok(id) => id,
            Err(e) => {
                self.rollback(undo);
                return Err(e);
            }
        };
        entry.backends.push((id, new_backend(spec, entry.value.id)));
        if let Err(e) = self.republish(*vaddr, entry) {
            self.rollback(undo);
            if let Some(e) = self.entries.get_mut(vaddr) {
                e.backends.retain(|(b, _)| *b != id);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Takes a backend out of the selection table but keeps it listed (as IPVS weight 0):
    /// established flows continue, new flows avoid it. `add_backend` reactivates it.
    pub fn drain_backend(&mut self, vaddr: &VirtualAddr, addr: SocketAddrV4) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        let i = entry.find(addr).ok_or(ServiceTableError::UnknownBackend {
            service: *vaddr,
            backend: addr,
        })?;
        let (id, b) = &mut entry.backends[i];
        b.state = backend_state::DRAINING;
        self.store.put_backend(*id, *b)?;
        self.republish(*vaddr, entry)
    }

    /// Removes a backend. Established TCP connections keep going to it unless `force`, which
    /// also drops their conntrack entries (their next packets pick a new backend, or are reset
    /// by it); UDP flows pinned to it are always dropped, so they move on their next datagram.
    pub fn delete_backend(
        &mut self,
        vaddr: &VirtualAddr,
        addr: SocketAddrV4,
        force: bool,
    ) -> Result<()> {
        let mut entry = self.entry(vaddr)?;
        let i = entry.find(addr).ok_or(ServiceTableError::UnknownBackend {
            service: *vaddr,
            backend: addr,
        })?;
        let (id, _) = entry.backends.remove(i);
        self.republish(*vaddr, entry)?;
        // UDP has no end of flow to wait for: a client that keeps its socket (a DNS resolver)
        // would send to the removed backend until the entry times out, which is kube-proxy's
        // longest-standing bug. Its next datagram picks a live backend instead.
        self.owe_sweep(FlowSweep::Backend { id, all: force });
        self.forget_backend(id);
        Ok(())
    }

    /// Makes the service at `spec.vaddr` match `spec` (scheduler, affinity, `NodePort` and
    /// backend set, weight 0 meaning drained) with one generation flip, so a packet sees the
    /// old service or the new one, never a mix. Removed backends are treated as by
    /// [`delete_backend`](Self::delete_backend): established TCP flows continue unless `force`.
    /// Nothing changes when it fails. Returns whether anything differed.
    pub fn update(&mut self, spec: &ServiceSpec, force: bool) -> Result<bool> {
        let old = self.entry(&spec.vaddr)?;
        if same_spec(&old.spec(), spec) {
            return Ok(false);
        }
        self.validate_with(spec, Some(&spec.vaddr))?;
        let mut entry = old.clone();
        entry.value.scheduler = spec.scheduler.code();
        entry.value.flags =
            (entry.value.flags & !service_flags::SCHED_MASK) | spec.sched_flags.service_bits();
        entry.value.affinity_secs = spec.affinity_secs;
        entry.value.affinity_mask = affinity_mask(spec.affinity_netmask);
        entry.nodeport = spec.nodeport.map(|port| ServiceKey {
            addr: 0,
            port: port.to_be(),
            ..spec.vaddr.key()
        });
        let mut undo = Vec::new();
        let mut removed = Vec::new();
        entry.backends.retain(|(id, b)| {
            let keep = spec.backends.iter().any(|s| s.addr == backend_addr(b));
            if !keep {
                removed.push(*id);
            }
            keep
        });
        let mut restore = Vec::new();
        let result = (|| {
            for b in &spec.backends {
                if let Some(i) = entry.find(b.addr) {
                    let (id, cur) = &mut entry.backends[i];
                    let weight = if cur.state == backend_state::DRAINING {
                        0
                    } else {
                        cur.weight
                    };
                    if weight != b.weight {
                        restore.push((*id, *cur));
                        cur.weight = b.weight;
                        cur.state = backend_state::ACTIVE;
                        self.store.put_backend(*id, *cur)?;
                    }
                } else {
                    let id = self.insert_backend(b, entry.value.id, &mut undo)?;
                    entry.backends.push((id, new_backend(b, entry.value.id)));
                }
            }
            if spec.scheduler.uses_cursor()
                && !Scheduler::from_code(old.value.scheduler).uses_cursor()
            {
                self.store.reset(PerId::RrCursor, entry.value.id)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (id, b) in restore {
                let _ = self.store.put_backend(id, b);
            }
            self.rollback(undo);
            return Err(e);
        }
        if let Err(e) = self.republish(spec.vaddr, entry) {
            for (id, b) in restore {
                let _ = self.store.put_backend(id, b);
            }
            self.rollback(undo);
            self.entries.insert(spec.vaddr, old);
            return Err(e);
        }
        if let Some(np) = old
            .nodeport
            .filter(|np| Some(*np) != self.entries[&spec.vaddr].nodeport)
        {
            let _ = self.store.remove_service(&np);
        }
        for id in removed {
            self.owe_sweep(FlowSweep::Backend { id, all: force });
            self.forget_backend(id);
        }
        Ok(true)
    }

    /// From now on, flow removals a change owes are kept for [`take_flow_sweeps`] instead of
    /// run at once: a long-lived owner (the agent) runs them off the change's path, batched.
    ///
    /// [`take_flow_sweeps`]: Self::take_flow_sweeps
    pub fn defer_flow_sweeps(&mut self) {
        self.sweeps.get_or_insert_with(Vec::new);
    }

    /// The flow removals owed since the last call (see [`sweep_flows`]).
    pub fn take_flow_sweeps(&mut self) -> Vec<FlowSweep> {
        self.sweeps.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn owe_sweep(&mut self, s: FlowSweep) {
        match &mut self.sweeps {
            Some(owed) => owed.push(s),
            None => {
                self.store.remove_flows(&|k, f| s.matches(k, f));
            }
        }
    }

    /// The spec of one service, if there is one at `vaddr`.
    pub fn spec_of(&self, vaddr: &VirtualAddr) -> Option<ServiceSpec> {
        self.entries.get(vaddr).map(Entry::spec)
    }

    /// Removes what a change cut short by a crash left behind: backends, counters and
    /// connection counts of services that were never published. Returns how many backends.
    pub fn remove_orphans(&mut self) -> usize {
        let live: BTreeSet<u32> = self
            .entries
            .values()
            .flat_map(|e| e.backends.iter().map(|(id, _)| *id))
            .collect();
        let orphans: Vec<u32> = self.backend_ids.difference(&live).copied().collect();
        for id in &orphans {
            self.forget_backend(*id);
        }
        orphans.len()
    }

    /// Removes tracked flows (both directions) that match; returns how many flows.
    pub fn flush_flows(&mut self, matches: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
        self.store.remove_flows(&matches)
    }

    /// ipvsadm `--save` format, one service then its backends, so `restore` reads it back.
    pub fn save(&self) -> String {
        ipvsadm::format(&self.specs())
    }

    /// Reads ipvsadm `--save` lines and adds them all, or nothing: the whole text is checked
    /// first, and a failure while writing removes every service added so far. Returns how many
    /// services were added. `-C` (clear) first deletes every existing service.
    pub fn restore(&mut self, text: &str) -> Result<usize> {
        let (clear, specs) = ipvsadm::parse(text)?;
        if clear {
            let all: Vec<VirtualAddr> = self.entries.keys().copied().collect();
            for v in all {
                self.delete(&v)?;
            }
        }
        for (line, spec) in &specs {
            self.validate(spec)
                .map_err(|e| ServiceTableError::Restore {
                    line: *line,
                    source: Box::new(e),
                })?;
        }
        let mut added = Vec::new();
        for (line, spec) in &specs {
            if let Err(e) = self.add(spec) {
                for v in added {
                    let _ = self.delete(&v);
                }
                return Err(ServiceTableError::Restore {
                    line: *line,
                    source: Box::new(e),
                });
            }
            added.push(spec.vaddr);
        }
        Ok(specs.len())
    }

    /// Starts the counters of one service (and its backends), or of every service, from zero
    /// again (ipvsadm's `-Z`). Open-connection counts are live state, not counters, and stay.
    pub fn zero(&mut self, vaddr: Option<&VirtualAddr>) -> Result<()> {
        let entries: Vec<Entry> = match vaddr {
            Some(v) => vec![self.entry(v)?],
            None => self.entries.values().cloned().collect(),
        };
        for e in entries {
            self.store.reset(PerId::ServiceStats, e.value.id)?;
            for (id, _) in &e.backends {
                self.store.reset(PerId::BackendStats, *id)?;
            }
        }
        Ok(())
    }

    /// Removes replaced selection tables once no packet can still be reading them.
    pub fn commit(&mut self) {
        if self.has_retired() {
            std::thread::sleep(GRACE);
            self.remove_retired();
        }
    }

    /// Whether a change left selection tables that [`GRACE`] must pass before removal.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Removes the replaced selection tables now: the caller waited [`GRACE`] since the
    /// change, holding off every other change meanwhile (a next change of the same service
    /// writes the generation these slots belong to).
    pub fn remove_retired(&mut self) {
        for key in std::mem::take(&mut self.retired) {
            let _ = self.store.remove_slot(&key);
        }
    }
}

impl<S: Store> Drop for ServiceTable<S> {
    fn drop(&mut self) {
        self.commit();
    }
}

/// Whether two specs describe the same service, backends compared as a set.
pub(crate) fn same_spec(a: &ServiceSpec, b: &ServiceSpec) -> bool {
    let sorted = |s: &ServiceSpec| {
        let mut v: Vec<(SocketAddrV4, u16)> =
            s.backends.iter().map(|b| (b.addr, b.weight)).collect();
        v.sort_unstable();
        v
    };
    a.vaddr == b.vaddr
        && a.scheduler == b.scheduler
        && a.affinity_secs == b.affinity_secs
        && a.affinity_netmask == b.affinity_netmask
        && a.sched_flags == b.sched_flags
        && a.nodeport == b.nodeport
        && sorted(a) == sorted(b)
}

/// Most backends a service with this scheduler code may have.
fn max_backends(scheduler_code: u8) -> usize {
    if scheduler::scans(scheduler_code) {
        MAX_LC_BACKENDS
    } else {
        MAX_BACKENDS_PER_SERVICE as usize
    }
}

/// A free id: one past the highest in use, or, once the top of the range is taken, the lowest
/// gap. Freed ids are thus not reused at once, so conntrack entries of a deleted backend cannot
/// be credited to its successor.
fn allocate(used: &BTreeSet<u32>, max: u32) -> Option<u32> {
    match used.last() {
        None => Some(0).filter(|_| max > 0),
        Some(&last) if last + 1 < max => Some(last + 1),
        Some(_) => (0..max)
            .zip(used.iter().copied().chain(std::iter::once(max)))
            .find(|(want, have)| want != have)
            .map(|(want, _)| want),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane_common::flow_dir;

    use super::*;
    use crate::services::store::FakeStore;

    fn spec(vip: &str, backends: &[&str], scheduler: Scheduler) -> ServiceSpec {
        ServiceSpec {
            vaddr: vip.parse().unwrap(),
            scheduler,
            affinity_secs: 0,
            affinity_netmask: Ipv4Addr::BROADCAST,
            sched_flags: SchedFlags::default(),
            nodeport: None,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    /// The live selection table of `vip`, as backend addresses, read from the store the way
    /// the datapath would.
    fn live_table(t: &ServiceTable<FakeStore>, vip: &str) -> Vec<String> {
        let v: VirtualAddr = vip.parse().unwrap();
        let (_, service) = t.store.services[&(v.key().addr, v.key().port, v.key().proto)];
        (0..service.table_len)
            .map(|slot| {
                let id = t.store.slots[&(service.id, service.generation, slot)];
                let b = t.store.backends[&id];
                assert_eq!(b.service_id, service.id, "slot of another service");
                backend_addr(&b).to_string()
            })
            .collect()
    }

    fn flow(service_id: u32, backend_id: u32, proto: u8, dir: u8) -> (FlowKey, Flow) {
        let key = FlowKey {
            proto,
            dir,
            ..FlowKey::default()
        };
        let flow = Flow {
            service_id,
            backend_id,
            ..Flow::default()
        };
        (key, flow)
    }

    /// The store's contents, without its write counter and failure point.
    fn contents(s: &FakeStore) -> String {
        format!(
            "{:?} {:?} {:?} {:?}",
            s.services, s.slots, s.backends, s.per_id
        )
    }

    /// A table with one service in it, changes committed.
    fn one_service() -> ServiceTable<FakeStore> {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        t.add(&spec(
            "198.19.0.1:80/tcp",
            &["198.18.0.2:80"],
            Scheduler::Hash,
        ))
        .unwrap();
        t.commit();
        t
    }

    #[test]
    fn ids_are_unique_and_tables_point_at_their_own_backends() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        for i in 1..=20 {
            let vip = format!("198.19.0.{i}:80/tcp");
            let b1 = format!("198.18.{i}.1:80");
            let b2 = format!("198.18.{i}.2:80");
            t.add(&spec(&vip, &[&b1, &b2], Scheduler::Rr)).unwrap();
        }
        let ids: BTreeSet<u32> = t.entries.values().map(|e| e.value.id).collect();
        assert_eq!(ids.len(), 20);
        for i in 1..=20 {
            let vip = format!("198.19.0.{i}:80/tcp");
            let table = live_table(&t, &vip);
            assert_eq!(table.len(), 2);
            assert!(
                table.iter().all(|b| b.starts_with(&format!("198.18.{i}."))),
                "{table:?}"
            );
        }
        // A second table over the same store sees the same ids in use.
        let store = std::mem::take(&mut t.store);
        drop(t);
        let mut again = ServiceTable::load(store).unwrap();
        again
            .add(&spec(
                "198.19.1.1:80/tcp",
                &["198.18.99.1:80"],
                Scheduler::Hash,
            ))
            .unwrap();
        assert_eq!(
            again
                .service_id(&"198.19.1.1:80/tcp".parse().unwrap())
                .unwrap(),
            20
        );
    }

    #[test]
    fn a_change_flips_the_generation_and_retires_the_old_table_after_commit() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        let vip: VirtualAddr = "198.19.0.1:80/tcp".parse().unwrap();
        t.add(&spec(
            "198.19.0.1:80/tcp",
            &["198.18.0.2:80"],
            Scheduler::Wrr,
        ))
        .unwrap();
        let gen0 = t.entries[&vip].value.generation;
        t.add_backend(&vip, &"198.18.0.3:80@2".parse().unwrap())
            .unwrap();
        let gen1 = t.entries[&vip].value.generation;
        assert_ne!(gen0, gen1);
        assert_eq!(live_table(&t, "198.19.0.1:80/tcp").len(), 3);
        // The old generation is still there for packets that read the old entry...
        let id = t.entries[&vip].value.id;
        assert!(t.store.slots.contains_key(&(id, gen0, 0)));
        t.commit();
        // ...and gone after the grace period.
        assert!(t.store.slots.keys().all(|(s, g, _)| *s != id || *g == gen1));
    }

    #[test]
    fn a_failed_add_leaves_the_store_as_it_was_at_every_failure_point() {
        let new = spec(
            "198.19.0.2:80/tcp",
            &["198.18.0.3:80", "198.18.0.4:80@3"],
            Scheduler::Rr,
        );
        let mut failures = 0;
        for n in 0.. {
            let mut t = one_service();
            t.store.fail_at = Some(t.store.writes + n);
            let before = contents(&t.store);
            if t.add(&new).is_ok() {
                break;
            }
            failures += 1;
            t.commit();
            assert_eq!(
                contents(&t.store),
                before,
                "a failure at write {n} left something behind"
            );
            assert_eq!(t.len(), 1);
            // The ids it had taken are free again.
            t.store.fail_at = None;
            t.add(&new).unwrap();
            assert_eq!(t.service_id(&new.vaddr).unwrap(), 1);
        }
        assert!(
            failures >= 5,
            "an add makes at least five writes: {failures}"
        );
    }

    #[test]
    fn a_failed_backend_add_keeps_the_previous_table_live() {
        let vip: VirtualAddr = "198.19.0.1:80/tcp".parse().unwrap();
        for n in 0..4 {
            let mut t = one_service();
            t.store.fail_at = Some(t.store.writes + n);
            let before = contents(&t.store);
            if t.add_backend(&vip, &"198.18.0.9:80".parse().unwrap())
                .is_ok()
            {
                continue;
            }
            t.commit();
            assert_eq!(contents(&t.store), before, "failure at write {n}");
            assert_eq!(live_table(&t, "198.19.0.1:80/tcp"), vec!["198.18.0.2:80"]);
        }
    }

    #[test]
    fn deleting_removes_everything_of_the_service_and_its_flows_only() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        t.add(&spec(
            "198.19.0.1:80/tcp",
            &["198.18.0.2:80"],
            Scheduler::Rr,
        ))
        .unwrap();
        t.add(&spec(
            "198.19.0.2:80/tcp",
            &["198.18.0.3:80"],
            Scheduler::Hash,
        ))
        .unwrap();
        let (a, b) = (
            t.service_id(&"198.19.0.1:80/tcp".parse().unwrap()).unwrap(),
            t.service_id(&"198.19.0.2:80/tcp".parse().unwrap()).unwrap(),
        );
        t.store.flows = vec![
            flow(a, 0, proto::TCP, flow_dir::ORIGINAL),
            flow(a, 0, proto::TCP, flow_dir::REPLY),
            flow(b, 1, proto::TCP, flow_dir::ORIGINAL),
        ];
        t.delete(&"198.19.0.1:80/tcp".parse().unwrap()).unwrap();
        t.commit();
        assert_eq!(t.store.flows.len(), 1);
        assert_eq!(t.store.services.len(), 1);
        assert!(t.store.slots.keys().all(|(s, _, _)| *s == b));
        assert!(t.store.backends.values().all(|x| x.service_id == b));
        assert!(t.store.per_id.keys().all(|(_, id)| *id != a || *id == 1));
    }

    #[test]
    fn removing_a_backend_moves_udp_flows_and_keeps_tcp_unless_forced() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        let vip: VirtualAddr = "198.19.0.1:80/tcp".parse().unwrap();
        t.add(&spec(
            "198.19.0.1:80/tcp",
            &["198.18.0.2:80", "198.18.0.3:80"],
            Scheduler::Hash,
        ))
        .unwrap();
        let sid = t.service_id(&vip).unwrap();
        let gone = t.entries[&vip].backends[0].0;
        t.store.flows = vec![
            flow(sid, gone, proto::TCP, flow_dir::ORIGINAL),
            flow(sid, gone, proto::UDP, flow_dir::ORIGINAL),
        ];
        t.delete_backend(&vip, "198.18.0.2:80".parse().unwrap(), false)
            .unwrap();
        assert_eq!(
            t.store.flows.len(),
            1,
            "the UDP flow moves, the TCP one stays"
        );
        assert_eq!(t.store.flows[0].0.proto, proto::TCP);
        assert_eq!(live_table(&t, "198.19.0.1:80/tcp"), vec!["198.18.0.3:80"]);
        t.add_backend(&vip, &"198.18.0.4:80".parse().unwrap())
            .unwrap();
        let other = t.entries[&vip].backends[1].0;
        t.store.flows = vec![flow(sid, other, proto::TCP, flow_dir::ORIGINAL)];
        t.delete_backend(&vip, "198.18.0.4:80".parse().unwrap(), true)
            .unwrap();
        assert!(t.store.flows.is_empty(), "--force drops established flows");
    }

    #[test]
    fn deferred_sweeps_leave_the_flows_for_later_and_say_which() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        t.defer_flow_sweeps();
        let vip: VirtualAddr = "198.19.0.1:80/udp".parse().unwrap();
        t.add(&spec(
            "198.19.0.1:80/udp",
            &["198.18.0.2:80", "198.18.0.3:80"],
            Scheduler::Hash,
        ))
        .unwrap();
        let sid = t.service_id(&vip).unwrap();
        let gone = t.entries[&vip].backends[0].0;
        t.store.flows = vec![flow(sid, gone, proto::UDP, flow_dir::ORIGINAL)];
        t.delete_backend(&vip, "198.18.0.2:80".parse().unwrap(), false)
            .unwrap();
        t.delete(&vip).unwrap();
        assert_eq!(
            t.store.flows.len(),
            1,
            "nothing removed on the change's path"
        );
        let owed = t.take_flow_sweeps();
        assert_eq!(
            owed,
            vec![
                FlowSweep::Backend {
                    id: gone,
                    all: false
                },
                FlowSweep::Service(sid)
            ]
        );
        assert!(owed[0].matches(&t.store.flows[0].0, &t.store.flows[0].1));
        assert!(t.take_flow_sweeps().is_empty());
    }

    #[test]
    fn draining_keeps_the_backend_listed_out_of_the_table() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        let vip: VirtualAddr = "198.19.0.1:80/tcp".parse().unwrap();
        t.add(&spec(
            "198.19.0.1:80/tcp",
            &["198.18.0.2:80", "198.18.0.3:80"],
            Scheduler::Rr,
        ))
        .unwrap();
        t.drain_backend(&vip, "198.18.0.2:80".parse().unwrap())
            .unwrap();
        assert_eq!(live_table(&t, "198.19.0.1:80/tcp"), vec!["198.18.0.3:80"]);
        assert!(t.save().contains("-r 198.18.0.2:80 -m -w 0"));
        t.add_backend(&vip, &"198.18.0.2:80".parse().unwrap())
            .unwrap();
        assert_eq!(live_table(&t, "198.19.0.1:80/tcp").len(), 2);
    }

    #[test]
    fn a_failed_restore_adds_nothing() {
        let mut t = ServiceTable::load(FakeStore::default()).unwrap();
        let text = "-A -t 198.19.0.1:80 -s rr\n-a -t 198.19.0.1:80 -r 198.18.0.2:80 -m -w 1\n\
                    -A -t 198.19.0.2:80 -s rr\n-a -t 198.19.0.2:80 -r 198.18.0.3:80 -m -w 1\n";
        t.store.fail_at = Some(7);
        let err = t.restore(text).unwrap_err();
        assert!(err.to_string().starts_with("line "), "{err}");
        t.commit();
        assert!(t.is_empty());
        assert!(t.store.services.is_empty() && t.store.slots.is_empty());
        assert!(t.store.backends.is_empty() && t.store.per_id.is_empty());
    }

    #[test]
    fn allocates_past_the_highest_then_the_lowest_gap() {
        assert_eq!(allocate(&BTreeSet::new(), 10), Some(0));
        assert_eq!(allocate(&[0, 1, 3].into(), 10), Some(4));
        assert_eq!(allocate(&[0, 1, 3, 9].into(), 10), Some(2));
        assert_eq!(allocate(&[1, 9].into(), 10), Some(0));
        assert_eq!(allocate(&(0..4).collect(), 4), None);
    }
}
