//! Empty on purpose: the datapath is the `dataplane-ebpf` binary (see `main.rs`); this target only
//! lets tools that expect a library (rust-analyzer, `cargo check --lib`) open the crate.

#![no_std]
