//! Loading a build whose maps have a new layout over state pinned by an older one: entries are
//! carried over, an unknown layout is refused by name, and nothing is silently reset.

use std::{net::Ipv4Addr, path::Path, process::Command};

use bulkhead::loader::{Datapath, LogLevel, ServiceMaps};
use dataplane_common::{FlowKey, flow_dir, map, proto};
use tests::{BpffsDir, skip};

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates a map pinned at `dir/name` the way an older build did, with one entry.
fn old_map(dir: &Path, name: &str, kind: &str, key: &[u8], value: &[u8], entries: u32) {
    let path = dir.join(name);
    let path = path.to_str().unwrap();
    let (k, v, n) = (
        key.len().to_string(),
        value.len().to_string(),
        entries.to_string(),
    );
    bpftool(&[
        "map", "create", path, "type", kind, "key", &k, "value", &v, "entries", &n, "name", name,
    ]);
    let mut args = vec!["map", "update", "pinned", path, "key", "hex"];
    let (key_hex, value_hex) = (hex(key), hex(value));
    args.extend(key_hex.iter().map(String::as_str));
    args.push("value");
    args.push("hex");
    args.extend(value_hex.iter().map(String::as_str));
    bpftool(&args);
}

fn key_bytes(k: &FlowKey) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(k.saddr.to_ne_bytes());
    b.extend(k.daddr.to_ne_bytes());
    b.extend(k.sport.to_ne_bytes());
    b.extend(k.dport.to_ne_bytes());
    b.extend([k.proto, k.dir, 0, 0]);
    b
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

#[test]
fn maps_of_an_older_layout_are_migrated_not_reset() {
    if skip("maps_of_an_older_layout_are_migrated_not_reset") {
        return;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        eprintln!(
            "SKIP maps_of_an_older_layout_are_migrated_not_reset: no bpftool (cargo xtask setup installs it)"
        );
        return;
    }
    let pins = BpffsDir::new();
    // A flow entry and node settings as the first release laid them out: Flow without the
    // client-port field (24 bytes), NodeConfig without flags (32 bytes).
    let key = FlowKey {
        saddr: be(Ipv4Addr::new(198, 18, 0, 2)),
        daddr: be(Ipv4Addr::new(198, 19, 0, 10)),
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: proto::TCP,
        dir: flow_dir::ORIGINAL,
        _pad: 0,
    };
    let mut flow_v1 = Vec::new();
    flow_v1.extend(be(Ipv4Addr::new(198, 18, 0, 3)).to_ne_bytes());
    flow_v1.extend(8080u16.to_be().to_ne_bytes());
    flow_v1.extend([0, 1]); // kind: service, state: established
    flow_v1.extend(7u32.to_ne_bytes()); // service id
    flow_v1.extend(9u32.to_ne_bytes()); // backend id
    flow_v1.extend(123_456_789u64.to_ne_bytes()); // last seen
    old_map(
        pins.path(),
        map::CONNTRACK_TCP,
        "lru_hash",
        &key_bytes(&key),
        &flow_v1,
        262_144,
    );
    let mut config_v1 = Vec::new();
    for v in [11u32, 1234, 12, 13, 0, 0, 0, 0] {
        config_v1.extend(v.to_ne_bytes());
    }
    old_map(
        pins.path(),
        map::CONFIG,
        "array",
        &0u32.to_ne_bytes(),
        &config_v1,
        1,
    );

    let dp = Datapath::load(pins.path(), LogLevel::Off).expect("load over the old maps");
    let mut migrated = dp.migrated().clone();
    migrated.sort_unstable();
    assert_eq!(migrated, vec![(map::CONFIG, 1), (map::CONNTRACK_TCP, 1)]);
    let maps = ServiceMaps::open(pins.path()).unwrap();
    let flow = maps.conntrack[0].get(&key, 0).expect("the flow survived");
    assert_eq!(
        (
            flow.nat_addr,
            u16::from_be(flow.nat_port),
            flow.kind,
            flow.state,
            flow.service_id,
            flow.backend_id
        ),
        (be(Ipv4Addr::new(198, 18, 0, 3)), 8080, 0, 1, 7, 9)
    );
    assert_eq!((flow.last_seen_ns, flow.peer_port), (123_456_789, 0));
    let cfg = maps.config.get(&0, 0).unwrap();
    assert_eq!(
        (
            cfg.tcp_syn_timeout,
            cfg.tcp_established_timeout,
            cfg.tcp_closing_timeout,
            cfg.udp_timeout,
            cfg.flags
        ),
        (11, 1234, 12, 13, 0),
        "settings kept; the new field starts at its default"
    );
    // Loading again finds nothing to migrate.
    drop(maps);
    assert!(
        Datapath::load(pins.path(), LogLevel::Off)
            .unwrap()
            .migrated()
            .is_empty()
    );
}

#[test]
fn a_layout_no_build_ever_had_is_refused_by_name() {
    if skip("a_layout_no_build_ever_had_is_refused_by_name") {
        return;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        eprintln!(
            "SKIP a_layout_no_build_ever_had_is_refused_by_name: no bpftool (cargo xtask setup installs it)"
        );
        return;
    }
    let pins = BpffsDir::new();
    old_map(
        pins.path(),
        map::CONNTRACK_UDP,
        "lru_hash",
        &[0u8; 16],
        &[0u8; 20],
        1024,
    );
    let err = Datapath::load(pins.path(), LogLevel::Off)
        .err()
        .expect("a 20-byte flow layout must be refused");
    // The whole chain: the step, then the map and why.
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(
        text.contains("CONNTRACK_UDP") && text.contains("cannot migrate"),
        "{text}"
    );
    assert!(
        pins.path().join(map::CONNTRACK_UDP).exists(),
        "the old state stays where it was"
    );
}
