//! Points `loader.rs` at the eBPF object to embed.
//!
//! `cargo xtask build` sets `BULKHEAD_EBPF_OBJ` to the object it built with nightly. A plain
//! `cargo build`/`check` without it still works (no nightly needed) and embeds an empty object;
//! such a binary says so when asked to load the datapath.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=BULKHEAD_EBPF_OBJ");
    let object = if let Some(path) = env::var_os("BULKHEAD_EBPF_OBJ") {
        let path = PathBuf::from(path);
        println!("cargo::rerun-if-changed={}", path.display());
        path
    } else {
        let empty =
            PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("empty.o");
        fs::write(&empty, b"").expect("write the empty placeholder object");
        empty
    };
    println!("cargo::rustc-env=BULKHEAD_EBPF_OBJECT={}", object.display());
}
