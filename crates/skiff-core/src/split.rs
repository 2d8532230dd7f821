//! Weighted alias splits (canary releases): an alias may send a share of its traffic to each
//! of a few revisions. Each request falls into a bucket `0..100`; the routes cover the buckets
//! in order (`[{3, 90}, {4, 10}]`: buckets 0–89 → revision 3, 90–99 → revision 4). A sticky key
//! is hashed to its bucket ([`bucket_of`]), so one client stays on one revision while the
//! weights do not change, and raising the last route's weight keeps its clients on it.

use serde::{Deserialize, Serialize};

/// Most routes one alias may split across.
pub const MAX_ROUTES: usize = 5;
/// Number of buckets; weights are whole percentages summing to this.
pub const BUCKETS: u8 = 100;

/// One target of a split: `weight` percent of the traffic goes to `revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub revision: u32,
    pub weight: u8,
}

/// Why a split was refused. The field is always `routes`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes: {0}")]
pub struct SplitError(pub String);

/// Checks a split: 1..=[`MAX_ROUTES`] routes, revisions positive and distinct, weights whole
/// numbers 1..=100 summing to 100. Takes wide integers so callers can pass what a client sent.
pub fn validate(routes: &[(i64, i64)]) -> Result<Vec<Route>, SplitError> {
    if routes.is_empty() {
        return Err(SplitError("must list at least one route".into()));
    }
    if routes.len() > MAX_ROUTES {
        return Err(SplitError(format!(
            "has {} routes; at most {MAX_ROUTES} allowed",
            routes.len()
        )));
    }
    let mut out = Vec::with_capacity(routes.len());
    let mut sum = 0i64;
    for (i, &(revision, weight)) in routes.iter().enumerate() {
        if revision <= 0 || revision > u32::MAX as i64 {
            return Err(SplitError(format!(
                "routes[{i}].revision must be a positive whole number (got {revision})"
            )));
        }
        if !(1..=100).contains(&weight) {
            return Err(SplitError(format!(
                "routes[{i}].weight must be a whole number from 1 to 100 (got {weight})"
            )));
        }
        if out.iter().any(|r: &Route| r.revision as i64 == revision) {
            return Err(SplitError(format!(
                "revision {revision} is listed more than once"
            )));
        }
        sum += weight;
        out.push(Route {
            revision: revision as u32,
            weight: weight as u8,
        });
    }
    if sum != BUCKETS as i64 {
        return Err(SplitError(format!("weights must sum to 100 (got {sum})")));
    }
    Ok(out)
}

/// Index of the route that serves `bucket` (`0..100`; larger buckets wrap). `routes` must be
/// valid (weights summing to 100); an empty slice gives 0.
pub fn pick(routes: &[Route], bucket: u8) -> usize {
    let bucket = bucket % BUCKETS;
    let mut upper = 0u8;
    for (i, r) in routes.iter().enumerate() {
        upper = upper.saturating_add(r.weight);
        if bucket < upper {
            return i;
        }
    }
    routes.len().saturating_sub(1)
}

/// The bucket (`0..100`) of a sticky key: FNV-1a then a 64-bit finaliser, so the value is the
/// same in every process and release (unlike `std`'s randomly keyed hasher).
pub fn bucket_of(key: &[u8]) -> u8 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // murmur3 fmix64: spreads FNV's weak low bits before the modulo.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % BUCKETS as u64) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            validate(&[(3, 90), (4, 10)]).unwrap(),
            vec![
                Route {
                    revision: 3,
                    weight: 90
                },
                Route {
                    revision: 4,
                    weight: 10
                }
            ]
        );
        assert!(validate(&[(3, 100)]).is_ok());
        for (routes, needle) in [
            (vec![], "at least one"),
            (vec![(3, 90), (4, 20)], "sum to 100 (got 110)"),
            (vec![(3, 50), (4, 40)], "sum to 100 (got 90)"),
            (vec![(3, 0), (4, 100)], "routes[0].weight"),
            (vec![(3, 101)], "routes[0].weight"),
            (vec![(3, -5), (4, 105)], "routes[0].weight"),
            (vec![(0, 50), (4, 50)], "routes[0].revision"),
            (vec![(3, 50), (-1, 50)], "routes[1].revision"),
            (vec![(3, 50), (3, 50)], "more than once"),
            (
                vec![(1, 20), (2, 20), (3, 20), (4, 20), (5, 10), (6, 10)],
                "at most 5",
            ),
        ] {
            let e = validate(&routes).unwrap_err().to_string();
            assert!(e.starts_with("routes: "), "{e}");
            assert!(e.contains(needle), "{routes:?}: {e}");
        }
    }

    #[test]
    fn buckets_map_onto_cumulative_weights() {
        let routes = validate(&[(3, 90), (4, 10)]).unwrap();
        assert_eq!(pick(&routes, 0), 0);
        assert_eq!(pick(&routes, 89), 0);
        assert_eq!(pick(&routes, 90), 1);
        assert_eq!(pick(&routes, 99), 1);
        let three = validate(&[(1, 1), (2, 98), (3, 1)]).unwrap();
        assert_eq!(pick(&three, 0), 0);
        assert_eq!(pick(&three, 1), 1);
        assert_eq!(pick(&three, 98), 1);
        assert_eq!(pick(&three, 99), 2);
        // Every bucket lands somewhere, and each route gets exactly its weight in buckets.
        let mut counts = [0u32; 3];
        for b in 0..100 {
            counts[pick(&three, b)] += 1;
        }
        assert_eq!(counts, [1, 98, 1]);
        assert_eq!(pick(&[], 5), 0);
    }

    #[test]
    fn sticky_buckets_are_stable_and_spread() {
        // Fixed values: the bucket of a key must never change between releases.
        assert_eq!(bucket_of(b"user-42"), bucket_of(b"user-42"));
        let pinned: Vec<u8> = [&b""[..], b"a", b"user-42", b"client-7"]
            .iter()
            .map(|k| bucket_of(k))
            .collect();
        assert_eq!(pinned, PINNED);
        // 10,000 sequential keys spread evenly over the 100 buckets (each within ±50 %).
        let mut counts = [0u32; 100];
        for i in 0..10_000 {
            counts[bucket_of(format!("user-{i}").as_bytes()) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (50..=150).contains(&c)),
            "{counts:?}"
        );
    }

    /// `bucket_of` of "", "a", "user-42", "client-7" (cross-checked with a Python version).
    const PINNED: [u8; 4] = [42, 15, 53, 23];
}
