//! `bulkhead up`/`down`/`attach`: what they create, and that `down` removes all of it.

use tests::{Node, skip};

#[test]
fn down_removes_pins_links_bridge_and_record() {
    if skip("down_removes_pins_links_bridge_and_record") {
        return;
    }
    let mut node = Node::new();
    node.add_pod(2);
    let pins = node.bpffs().leftovers();
    for expected in ["IFACE_STATS", "REASONS", "links", "progs"] {
        assert!(
            pins.iter().any(|p| p == expected),
            "{expected} not pinned: {pins:?}"
        );
    }
    let links = node.ns.ip(&["-d", "link", "show", "master", &node.bridge]);
    assert!(links.contains(&node.pods[0].host_if));

    node.bulkhead_ok(&["down"]);
    assert_eq!(
        node.bpffs().leftovers(),
        Vec::<String>::new(),
        "pins left after down"
    );
    let bridges = node.ns.ip(&["link", "show", "type", "bridge"]);
    assert!(
        !bridges.contains(&node.bridge),
        "bridge left after down: {bridges}"
    );
    let again = node.bulkhead(&["down"]);
    assert!(
        !again.status.success(),
        "a second down should say the node is not up"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("not up"));
}

#[test]
fn attach_to_a_missing_interface_fails_and_changes_nothing() {
    if skip("attach_to_a_missing_interface_fails_and_changes_nothing") {
        return;
    }
    let node = Node::new();
    let before = node.bulkhead_ok(&["stats", "--json"]);
    let out = node.bulkhead(&["attach", "nosuchif0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nosuchif0") && stderr.contains("does not exist"),
        "unclear error: {stderr}"
    );
    assert_eq!(node.bulkhead_ok(&["stats", "--json"]), before);
}

#[test]
fn commands_before_up_say_so() {
    if skip("commands_before_up_say_so") {
        return;
    }
    let node = Node::new();
    node.bulkhead_ok(&["down"]);
    for args in [&["attach", "lo"][..], &["stats"][..]] {
        let out = node.bulkhead(args);
        assert!(
            !out.status.success(),
            "{args:?} succeeded on a node that is down"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("bulkhead up"),
            "{args:?}: error does not point at `bulkhead up`: {stderr}"
        );
    }
    // Bring it back so the guard's `down` has something to remove.
    node.bulkhead_ok(&["up", "--bridge", &node.bridge]);
}
