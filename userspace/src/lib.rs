//! The `bulkhead` library: everything the CLI does, callable from the integration tests.
//!
//! `main.rs` is a thin wrapper around [`cli::main`]. Modules are named after the kernel concept
//! they own; only [`loader`] touches the eBPF object.

pub mod bpffs;
pub mod cli;
pub mod doctor;
pub mod link;
pub mod loader;
pub mod lock;
pub mod migrate;
pub mod netns;
pub mod node;
pub mod sandbox;
pub mod services;
