//! Building and checking raw frames for `BPF_PROG_TEST_RUN` tests.
//!
//! Checksums are computed from scratch here (RFC 1071), independently of the datapath, so a
//! test can tell whether the program's incremental updates left them right.

use std::net::SocketAddrV4;

/// Ethernet + IPv4 header lengths (no options).
pub const ETH: usize = 14;
pub const IP: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with these flags.
    Tcp(u8),
    /// UDP with a checksum.
    Udp,
    /// UDP sent without a checksum (field zero).
    UdpNoChecksum,
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An Ethernet/IPv4/TCP-or-UDP frame from `src` to `dst` with `payload`, checksums complete.
pub fn frame(src: SocketAddrV4, dst: SocketAddrV4, l4: L4, payload: &[u8]) -> Vec<u8> {
    let l4_len = match l4 {
        L4::Tcp(_) => 20,
        _ => 8,
    } + payload.len();
    let mut f = vec![0u8; ETH + IP + l4_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[ETH..ETH + IP];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP + l4_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = if matches!(l4, L4::Tcp(_)) { 6 } else { 17 };
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let l = &mut f[ETH + IP..];
    l[0..2].copy_from_slice(&src.port().to_be_bytes());
    l[2..4].copy_from_slice(&dst.port().to_be_bytes());
    if let L4::Tcp(flags) = l4 {
        l[4..8].copy_from_slice(&1000u32.to_be_bytes());
        l[12] = 5 << 4;
        l[13] = flags;
        l[14..16].copy_from_slice(&65535u16.to_be_bytes());
        l[20..].copy_from_slice(payload);
    } else {
        l[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l[8..].copy_from_slice(payload);
    }
    let ip_csum = fold(sum16(&f[ETH..ETH + IP]));
    f[ETH + 10..ETH + 12].copy_from_slice(&ip_csum.to_be_bytes());
    if l4 != L4::UdpNoChecksum {
        let off = ETH + IP + if matches!(l4, L4::Tcp(_)) { 16 } else { 6 };
        let mut c = fold(pseudo_sum(&f) + sum16(&f[ETH + IP..]));
        if c == 0 && l4 != L4::Tcp(0) {
            c = 0xffff;
        }
        f[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    f
}

fn pseudo_sum(f: &[u8]) -> u32 {
    let l4_len = (f.len() - ETH - IP) as u32;
    sum16(&f[ETH + 12..ETH + 20]) + u32::from(f[ETH + 9]) + l4_len
}

/// Source and destination of a frame built by [`frame`] (or rewritten from one).
pub fn endpoints(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let addr = |o: usize| std::net::Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    (
        SocketAddrV4::new(addr(ETH + 12), port(ETH + IP)),
        SocketAddrV4::new(addr(ETH + 16), port(ETH + IP + 2)),
    )
}

/// True when the IPv4 header checksum and the TCP/UDP checksum (over the pseudo-header) hold.
/// A UDP checksum of zero means "none" and passes.
pub fn checksums_ok(f: &[u8]) -> bool {
    let ip_ok = fold(sum16(&f[ETH..ETH + IP])) == 0;
    let csum_off = ETH + IP + if f[ETH + 9] == 6 { 16 } else { 6 };
    let stored = u16::from_be_bytes([f[csum_off], f[csum_off + 1]]);
    let l4_ok =
        (f[ETH + 9] == 17 && stored == 0) || fold(pseudo_sum(f) + sum16(&f[ETH + IP..])) == 0;
    ip_ok && l4_ok
}

/// The stored L4 checksum field.
pub fn l4_checksum(f: &[u8]) -> u16 {
    let off = ETH + IP + if f[ETH + 9] == 6 { 16 } else { 6 };
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// IP protocol number of ICMP.
pub const ICMP: u8 = 1;

/// An ICMP error from `from` to `to` (type `ty`, code `code`, the next-hop MTU for
/// "fragmentation needed") quoting `quoted`, an IP packet (a frame built by [`frame`] without
/// its Ethernet header, cut to `quote_len` bytes), checksums complete.
pub fn icmp_error(
    from: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
    ty: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let icmp_len = 8 + quoted.len();
    let mut f = vec![0u8; ETH + IP + icmp_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[ETH..ETH + IP];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP + icmp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = ICMP;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&to.octets());
    let ip_csum = fold(sum16(&f[ETH..ETH + IP]));
    f[ETH + 10..ETH + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let icmp = ETH + IP;
    f[icmp] = ty;
    f[icmp + 1] = code;
    f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    f[icmp + 8..].copy_from_slice(quoted);
    let c = fold(sum16(&f[icmp..]));
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// Checks an ICMP error frame: outer IP header, ICMP checksum, the quoted IP header, and, when
/// the whole quoted packet is there, its TCP/UDP checksum. Returns what is wrong.
pub fn icmp_checksums(f: &[u8]) -> Result<(), String> {
    if fold(sum16(&f[ETH..ETH + IP])) != 0 {
        return Err("outer IP checksum".into());
    }
    let icmp = ETH + IP;
    if fold(sum16(&f[icmp..])) != 0 {
        return Err("ICMP checksum".into());
    }
    let inner = &f[icmp + 8..];
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    if fold(sum16(&inner[..ihl])) != 0 {
        return Err("quoted IP checksum".into());
    }
    let total = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    if total == inner.len() {
        // The whole packet is quoted: check it as a frame of its own.
        let mut as_frame = vec![0u8; ETH];
        as_frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        as_frame.extend_from_slice(inner);
        if !checksums_ok(&as_frame) {
            return Err("quoted L4 checksum".into());
        }
    }
    Ok(())
}

/// Source and destination of the packet an ICMP error quotes.
pub fn quoted_endpoints(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    endpoints(&f[ETH + IP + 8 - ETH..])
}

/// Outer source and destination addresses of a frame.
pub fn addresses(f: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let addr = |o: usize| std::net::Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    (addr(ETH + 12), addr(ETH + 16))
}

/// Marks a frame built by [`frame`] as a fragment (more fragments to come, offset in 8-byte
/// units) and fixes its IP checksum.
pub fn set_fragment(f: &mut [u8], more: bool, offset: u16) {
    let field = if more { 0x2000 } else { 0 } | (offset & 0x1fff);
    f[ETH + 6..ETH + 8].copy_from_slice(&field.to_be_bytes());
    f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&f[ETH..ETH + IP]));
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

/// True when the IPv4 header checksum holds.
pub fn ip_checksum_ok(f: &[u8]) -> bool {
    fold(sum16(&f[ETH..ETH + IP])) == 0
}
