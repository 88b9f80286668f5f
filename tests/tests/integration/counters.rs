//! The datapath is attached on both hooks of every veth and counts exactly the packets sent.

use std::net::SocketAddrV4;

use tests::{Node, recv_count, skip};

const PAYLOAD: &[u8] = &[7; 200];
/// Ethernet + IPv4 + UDP in front of the payload.
const FRAME: u64 = 14 + 20 + 8 + 200;

/// Sends `ab` datagrams from pod 0 to pod 1 and `ba` back, checks they arrived, and returns the
/// node's counter deltas for (a ingress, a egress, b ingress, b egress).
fn exchange(node: &Node, ab: usize, ba: usize) -> [(u64, u64); 4] {
    let (a, b) = (&node.pods[0], &node.pods[1]);
    let read = || {
        [
            node.counters(&a.host_if, "ingress"),
            node.counters(&a.host_if, "egress"),
            node.counters(&b.host_if, "ingress"),
            node.counters(&b.host_if, "egress"),
        ]
    };
    let before = read();
    let (sink_a, sink_b) = (a.udp_socket(0), b.udp_socket(0));
    let port = |s: &std::net::UdpSocket| s.local_addr().unwrap().port();
    a.send_udp(SocketAddrV4::new(b.addr, port(&sink_b)), PAYLOAD, ab);
    b.send_udp(SocketAddrV4::new(a.addr, port(&sink_a)), PAYLOAD, ba);
    assert_eq!(recv_count(&sink_b, ab), ab, "datagrams A->B lost");
    assert_eq!(recv_count(&sink_a, ba), ba, "datagrams B->A lost");
    let after = read();
    std::array::from_fn(|i| (after[i].0 - before[i].0, after[i].1 - before[i].1))
}

fn expected(ab: u64, ba: u64) -> [(u64, u64); 4] {
    [
        (ab, ab * FRAME),
        (ba, ba * FRAME),
        (ba, ba * FRAME),
        (ab, ab * FRAME),
    ]
}

/// Exchanges traffic until the counter deltas match exactly, at most three times: the kernel's
/// own control traffic (a late IGMP or neighbour message) can land in a window now and then,
/// and is counted like any packet. A datapath that miscounts fails every attempt.
fn assert_counts(node: &Node, ab: usize, ba: usize) {
    let want = expected(ab as u64, ba as u64);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = exchange(node, ab, ba);
        if got == want {
            return;
        }
        seen.push(got);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    panic!("counters never matched {want:?}: {seen:?}");
}

fn two_pod_node(env: &[(&str, &str)]) -> Node {
    let mut node = Node::with_env(env);
    node.add_pod(2);
    node.add_pod(3);
    node.pin_neighbors();
    node
}

fn counts_exactly(test: &str, mode: &str) {
    if skip(test) {
        return;
    }
    let node = two_pod_node(&[("BULKHEAD_TC_MODE", mode)]);
    assert_counts(&node, 50, 20);
}

#[test]
fn counts_packets_on_both_veths_with_tcx() {
    counts_exactly("counts_packets_on_both_veths_with_tcx", "tcx");
}

#[test]
fn counts_packets_on_both_veths_with_netlink_tc() {
    counts_exactly("counts_packets_on_both_veths_with_netlink_tc", "netlink");
}

/// A second `up` (a restart, or an upgrade to a new build) swaps the programs in place: still
/// one program per hook, so nothing is counted twice, and the pinned counters carry on.
fn reup_keeps_one_attachment(test: &str, mode: &str) {
    if skip(test) {
        return;
    }
    let node = two_pod_node(&[("BULKHEAD_TC_MODE", mode)]);
    assert_counts(&node, 10, 5);
    let total_before = node.counters(&node.pods[0].host_if, "ingress");
    node.bulkhead_ok(&["up", "--bridge", &node.bridge]);
    assert_eq!(
        node.counters(&node.pods[0].host_if, "ingress"),
        total_before,
        "counters were reset"
    );
    assert_counts(&node, 30, 7);
}

#[test]
fn reup_swaps_programs_in_place_with_tcx() {
    reup_keeps_one_attachment("reup_swaps_programs_in_place_with_tcx", "tcx");
}

#[test]
fn reup_swaps_programs_in_place_with_netlink_tc() {
    reup_keeps_one_attachment("reup_swaps_programs_in_place_with_netlink_tc", "netlink");
}

#[test]
fn detach_stops_counting_on_that_interface_only() {
    if skip("detach_stops_counting_on_that_interface_only") {
        return;
    }
    let node = two_pod_node(&[]);
    let a_if = node.pods[0].host_if.clone();
    node.bulkhead_ok(&["detach", &a_if]);
    let deltas = exchange(&node, 12, 4);
    assert_eq!(deltas[0], (0, 0), "A ingress still counted after detach");
    assert_eq!(deltas[1], (0, 0), "A egress still counted after detach");
    assert_eq!(&deltas[2..], &expected(12, 4)[2..]);
}
