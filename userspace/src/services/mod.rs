//! Services: virtual addresses, their backends and selection tables, in the datapath's maps.
//!
//! One file per concept:
//! [`model`] (what a user names: addresses, schedulers, specs, the listing types),
//! [`selection`] (the tables schedulers index into: weighted sequences, Maglev),
//! [`ipvsadm`] (the `--save` text format, read and written),
//! [`store`] (the narrow set of map writes a service change makes, and an in-memory fake),
//! [`table`] (the transactional table: ids, the generation flip, the undo log),
//! [`flows`] (the conntrack view: listing, statistics).
//!
//! Only this module converts between `std::net` types and map keys, so byte order is handled
//! here (and in `loader::Endpoints` for pods) and nowhere else: map fields are network order,
//! see `dataplane-common`.

pub mod desired;
pub mod flows;
pub mod ipvsadm;
pub mod model;
pub mod selection;
pub mod store;
pub mod table;

use std::{fmt, net::SocketAddrV4};

use aya::maps::MapError;

pub use self::{
    flows::{ConntrackStats, FlowInfo},
    model::{
        BackendInfo, BackendSpec, BackendState, Proto, SchedFlags, Scheduler, ServiceInfo,
        ServiceSpec, VirtualAddr,
    },
    table::ServiceTable,
};
use crate::loader::LoaderError;

/// `lc` scans its table on every new flow, so it takes at most this many backends (the
/// datapath's `LC_SCAN`).
pub const MAX_LC_BACKENDS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ServiceTableError {
    #[error("invalid {what} {input:?}: {why}")]
    Parse {
        what: &'static str,
        input: String,
        why: String,
    },
    #[error("service {service} already exists")]
    Duplicate { service: VirtualAddr },
    #[error("node port {port}/{proto} is already used by {service}")]
    NodePortInUse {
        port: u16,
        proto: Proto,
        service: VirtualAddr,
    },
    #[error("no service {service}")]
    Unknown { service: VirtualAddr },
    #[error("service {service} has no backend {backend}")]
    UnknownBackend {
        service: VirtualAddr,
        backend: SocketAddrV4,
    },
    #[error("backend {backend} is listed twice for {service}")]
    DuplicateBackend {
        service: VirtualAddr,
        backend: SocketAddrV4,
    },
    #[error("service {service} would have {count} backends; the limit is {max}")]
    TooManyBackends {
        service: VirtualAddr,
        count: usize,
        max: usize,
    },
    #[error("the datapath holds at most {max} {what}")]
    Full { what: &'static str, max: u32 },
    #[error("cannot {action} in map {map}")]
    Map {
        action: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("line {line}: {source}")]
    Restore {
        line: usize,
        #[source]
        source: Box<ServiceTableError>,
    },
    #[error("cannot open the datapath's maps")]
    Loader(#[from] LoaderError),
}

pub(crate) type Result<T, E = ServiceTableError> = std::result::Result<T, E>;

pub(crate) fn parse_err(
    what: &'static str,
    input: &str,
    why: impl fmt::Display,
) -> ServiceTableError {
    ServiceTableError::Parse {
        what,
        input: input.to_owned(),
        why: why.to_string(),
    }
}

pub(crate) fn map_err(
    action: &'static str,
    map: &'static str,
) -> impl FnOnce(MapError) -> ServiceTableError {
    move |source| ServiceTableError::Map {
        action,
        map,
        source,
    }
}
