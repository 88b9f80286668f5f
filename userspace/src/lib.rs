//! The `bulkhead` library: everything the CLI does, callable from the integration tests.
//!
//! The binary (`main.rs`, `cli.rs`) parses the command line and prints what these modules
//! return. Modules are named after the concept they own; only [`loader`] touches the eBPF
//! object.

pub mod agent;
pub mod bpffs;
pub mod cni;
pub mod doctor;
pub mod ipvsadm;
pub mod link;
pub mod loader;
pub mod lock;
pub mod migrate;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod sandbox;
pub mod services;
pub mod subnet;

/// An error and its sources on one line, `: `-separated, as `anyhow`'s `{:#}` prints them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
