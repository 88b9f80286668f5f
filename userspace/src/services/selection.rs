//! Selection tables: the backend ids a service's scheduler indexes into, rebuilt whenever its
//! backends change. Weighted sequences interleave as smooth weighted round robin does; Maglev
//! tables (for `maglev`/`mh`) keep most entries in place when a backend comes or goes.

use std::net::SocketAddrV4;

use dataplane_common::MAX_TABLE;

use super::Scheduler;

/// Longest weighted sequence; larger weight sums are scaled down to fit.
pub const MAX_SEQUENCE: u32 = 4096;

/// The backend ids of a selection table, for the scheduler of a service.
///
/// `backends` are (id, weight) pairs of the backends that take new flows.
pub fn selection_table(sched: Scheduler, backends: &[(u32, SocketAddrV4, u16)]) -> Vec<u32> {
    let usable: Vec<&(u32, SocketAddrV4, u16)> = backends.iter().filter(|b| b.2 > 0).collect();
    if usable.is_empty() {
        return Vec::new();
    }
    match sched {
        // lc weighs connections itself, so it needs each backend exactly once.
        s if s.scans() => usable.iter().map(|b| b.0).collect(),
        // IPVS rr: every usable backend once, whatever its weight.
        Scheduler::Rr => usable.iter().map(|b| b.0).collect(),
        Scheduler::Maglev | Scheduler::Mh => {
            let named: Vec<(String, u16)> = usable.iter().map(|b| (b.1.to_string(), b.2)).collect();
            let size = maglev_size(usable.len());
            maglev_table(&named, size)
                .into_iter()
                .map(|i| usable[i].0)
                .collect()
        }
        _ => {
            let weights: Vec<u16> = usable.iter().map(|b| b.2).collect();
            weighted_sequence(&weights)
                .into_iter()
                .map(|i| usable[i].0)
                .collect()
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Indices into `weights`, each appearing in proportion to its weight, interleaved as smooth
/// weighted round robin does (weights 5,1,1 give a a b a c a a, not a a a a a b c).
pub fn weighted_sequence(weights: &[u16]) -> Vec<usize> {
    let mut w: Vec<u32> = weights.iter().map(|&w| u32::from(w)).collect();
    let g = w.iter().copied().fold(0, gcd).max(1);
    for x in &mut w {
        *x /= g;
    }
    let total: u32 = w.iter().sum();
    if total > MAX_SEQUENCE {
        // Scale down, keeping every backend at least once.
        for x in &mut w {
            *x = (u64::from(*x) * u64::from(MAX_SEQUENCE) / u64::from(total)).max(1) as u32;
        }
    }
    let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
    let mut current = vec![0i64; w.len()];
    (0..total)
        .map(|_| {
            current
                .iter_mut()
                .zip(&w)
                .for_each(|(c, &x)| *c += i64::from(x));
            let best = (0..current.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .unwrap_or(0);
            current[best] -= total;
            best
        })
        .collect()
}

const MAGLEV_PRIMES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Maglev table size: the smallest listed prime at least 100 times the backend count, so each
/// backend's share is within about 1% of its target.
pub fn maglev_size(backends: usize) -> u32 {
    let want = backends.saturating_mul(100) as u64;
    MAGLEV_PRIMES
        .into_iter()
        .find(|&p| u64::from(p) >= want)
        .unwrap_or(MAX_TABLE)
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4) of prime `size`, with weights:
/// in each round a backend takes `weight / max_weight` of a turn, so shares follow weights.
/// Entry `i` holds an index into `backends` (named, so the table depends only on the set).
pub fn maglev_table(backends: &[(String, u16)], size: u32) -> Vec<usize> {
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(name, _)| {
            (
                fnv1a(0x5bd1_e995, name.as_bytes()) % m,
                fnv1a(0x1b87_3593, name.as_bytes()) % (m - 1) + 1,
            )
        })
        .collect();
    let max_w = backends
        .iter()
        .map(|b| u64::from(b.1))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![usize::MAX; size as usize];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let w = u64::from(backends[i].1);
            let turns = (round + 1) * w / max_w - round * w / max_w;
            for _ in 0..turns {
                let mut c = (offset + next[i] * skip) % m;
                while table[c as usize] != usize::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c as usize] = i;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
        round += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn shares(seq: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in seq {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn weighted_sequence_follows_weights_and_interleaves() {
        let check = |weights: &[u16], want: &[usize]| {
            let seq = weighted_sequence(weights);
            assert_eq!(shares(&seq, weights.len()), want, "{weights:?}: {seq:?}");
        };
        check(&[1, 1, 1], &[1, 1, 1]);
        check(&[2, 4, 6], &[1, 2, 3]);
        check(&[5, 1, 1], &[5, 1, 1]);
        // Smooth: the heavy backend never takes more than its share in a row.
        assert_eq!(weighted_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        // Huge weight sums are scaled to fit, keeping every backend.
        let seq = weighted_sequence(&[65535, 1]);
        assert!(seq.len() <= MAX_SEQUENCE as usize + 1 && seq.contains(&1));
    }

    #[test]
    fn maglev_tables_are_balanced_weighted_and_stable() {
        let names: Vec<(String, u16)> = (0..5)
            .map(|i| (format!("198.18.0.{}:80", i + 2), 1))
            .collect();
        let m = maglev_size(names.len());
        assert_eq!(m, 509);
        let table = maglev_table(&names, m);
        for (i, c) in shares(&table, 5).iter().enumerate() {
            assert!((101..=102).contains(c), "backend {i} has {c} of {m}");
        }
        // Removing one backend moves only the entries that were its own (plus a few).
        let fewer = maglev_table(&names[1..], m);
        let moved = table
            .iter()
            .zip(&fewer)
            .filter(|(a, b)| **a != 0 && **a != **b + 1)
            .count();
        assert!(moved < (m as usize) / 20, "{moved} of {m} entries moved");
        // Weights 1:3.
        let weighted = vec![("a:1".to_owned(), 1), ("b:1".to_owned(), 3)];
        let s = shares(&maglev_table(&weighted, 251), 2);
        assert!((60..=66).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn selection_tables_skip_weight_zero() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 80);
        assert_eq!(
            selection_table(Scheduler::Hash, &[(7, a, 1), (9, b, 0)]),
            vec![7]
        );
        assert_eq!(
            selection_table(Scheduler::Lc, &[(7, a, 5), (9, b, 1)]),
            vec![7, 9]
        );
        assert!(selection_table(Scheduler::Rr, &[(7, a, 0)]).is_empty());
    }
}
