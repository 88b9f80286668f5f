//! The `cargo xtask build-and-run` demo: a node with a bridge and two pods, the datapath
//! attached, real traffic between the pods, and the counters read back through `bulkhead`.
//!
//! Everything lives in namespaces this program creates and removes; it exits non-zero when
//! the counters do not match the traffic it sent.

use std::{net::SocketAddrV4, process::ExitCode};

use tests::{Node, recv_count};

const PAYLOAD: &[u8] = &[0x42; 100];
/// Ethernet + IPv4 + UDP headers in front of the payload, as tc counts bytes.
const OVERHEAD: u64 = 14 + 20 + 8;

fn main() -> ExitCode {
    if let Some(reason) = tests::skip_reason() {
        eprintln!("demo: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    let (a_to_b, b_to_a) = (100, 40);
    let mut node = Node::new();
    node.add_pod(2);
    node.add_pod(3);
    node.pin_neighbors();
    let (a, b) = (&node.pods[0], &node.pods[1]);
    println!("demo: node netns {}, bridge {}", node.ns.name(), node.bridge);
    println!("demo: pod A {} (host side {}), pod B {} (host side {})", a.addr, a.host_if, b.addr, b.host_if);

    let sink_b = b.udp_socket(7000);
    let sink_a = a.udp_socket(7001);
    a.send_udp(SocketAddrV4::new(b.addr, 7000), PAYLOAD, a_to_b);
    b.send_udp(SocketAddrV4::new(a.addr, 7001), PAYLOAD, b_to_a);
    let (got_b, got_a) = (recv_count(&sink_b, a_to_b), recv_count(&sink_a, b_to_a));
    println!("demo: sent {a_to_b} datagrams A->B ({got_b} arrived), {b_to_a} B->A ({got_a} arrived)\n");
    print!("{}", node.bulkhead_ok(&["stats"]));

    let frame = PAYLOAD.len() as u64 + OVERHEAD;
    let expect = [
        (&a.host_if, "ingress", a_to_b),
        (&b.host_if, "egress", a_to_b),
        (&b.host_if, "ingress", b_to_a),
        (&a.host_if, "egress", b_to_a),
    ];
    let mut ok = got_a == b_to_a && got_b == a_to_b;
    for (ifname, hook, n) in expect {
        let got = node.counters(ifname, hook);
        let want = (n as u64, n as u64 * frame);
        if got != want {
            eprintln!("demo: {ifname} {hook}: counted {got:?}, sent {want:?}");
            ok = false;
        }
    }
    println!("\ndemo: {}", if ok { "counters match the traffic sent" } else { "MISMATCH" });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
