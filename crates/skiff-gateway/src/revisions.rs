//! Resolution of `(function, qualifier)` to a launchable revision, cached so the invoke hot
//! path does not touch SQLite. Management calls that change what a qualifier means
//! (deploy, alias change, enable/disable, delete, secret change) invalidate the cache.
//!
//! A qualifier naming a weighted split is cached as the whole split; each request then picks
//! a revision: by the bucket of its sticky key ([`STICKY_HEADER`]) if it has one, else by a
//! weighted round robin that spreads the buckets so that every 100 consecutive requests
//! without a key split exactly by the weights (a 90/10 canary gets 10 of each 100, spread out,
//! not in a block). Whether the function is enabled is cached with it, so a disabled function
//! is refused without a query.

use crate::error::ApiError;
use crate::{blocking, AppState};
use axum::http::HeaderMap;
use parking_lot::RwLock;
use skiff_core::split::{self, Route};
use skiff_scheduler::Revision;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Request header whose value keeps a client on one revision of a split alias.
pub const STICKY_HEADER: &str = "x-skiff-sticky";

/// What a qualifier resolved to.
#[derive(Clone)]
pub(crate) struct Resolved {
    enabled: bool,
    /// One revision, or a split's revisions in route order with their weights.
    revisions: Box<[Arc<Revision>]>,
    routes: Box<[Route]>,
    /// Requests without a sticky key so far (shared by clones of this resolution).
    turns: Arc<AtomicU64>,
}

impl Resolved {
    fn checked_pick(
        &self,
        function: &str,
        sticky: Option<&[u8]>,
    ) -> Result<Arc<Revision>, ApiError> {
        if self.enabled {
            Ok(self.pick(sticky).clone())
        } else {
            Err(ApiError::disabled(function))
        }
    }

    /// The revision for a request with this sticky key (weighted round robin without one).
    fn pick(&self, sticky: Option<&[u8]>) -> &Arc<Revision> {
        if self.revisions.len() == 1 {
            return &self.revisions[0];
        }
        let bucket = match sticky {
            Some(key) => split::bucket_of(key),
            None => spread_bucket(self.turns.fetch_add(1, Ordering::Relaxed)),
        };
        &self.revisions[split::pick(&self.routes, bucket)]
    }
}

#[derive(Default)]
struct Inner {
    /// Function → qualifier (`""` = production) → resolution.
    map: HashMap<String, HashMap<String, Resolved>>,
    /// Bumped by every invalidation; a resolution computed across one is not cached.
    generation: u64,
}

/// Cache of resolved qualifiers, keyed by function then qualifier.
#[derive(Default)]
pub struct RevisionCache {
    inner: RwLock<Inner>,
}

impl RevisionCache {
    /// Forgets everything about one function.
    pub fn invalidate(&self, function: &str) {
        let mut inner = self.inner.write();
        inner.map.remove(function);
        inner.generation += 1;
    }

    /// Forgets everything (e.g. a secret changed).
    pub fn clear(&self) {
        let mut inner = self.inner.write();
        inner.map.clear();
        inner.generation += 1;
    }

    /// The cached pick for a request, or the generation to load under on a miss.
    fn get(
        &self,
        function: &str,
        qualifier: &str,
        sticky: Option<&[u8]>,
    ) -> Result<Result<Arc<Revision>, ApiError>, u64> {
        let inner = self.inner.read();
        match inner.map.get(function).and_then(|q| q.get(qualifier)) {
            Some(r) => Ok(r.checked_pick(function, sticky)),
            None => Err(inner.generation),
        }
    }
}

/// The bucket of the `n`th request without a sticky key: `n × 37 mod 100` visits every bucket
/// once in any 100 consecutive turns (37 is coprime to 100) and jumps across the range, so each
/// route's share arrives spread out.
fn spread_bucket(n: u64) -> u8 {
    ((n % split::BUCKETS as u64) * 37 % split::BUCKETS as u64) as u8
}

/// The sticky key of a request, if it sent one.
pub fn sticky_key(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(STICKY_HEADER)
        .map(|v| v.as_bytes())
        .filter(|k| !k.is_empty())
}

/// Resolves a qualifier (alias, revision number, `$LATEST`; none = `production`); a split
/// alias picks a revision by weighted round robin. 503 `function_disabled` if it is disabled.
pub async fn resolve(
    state: &Arc<AppState>,
    function: &str,
    qualifier: Option<&str>,
) -> Result<Arc<Revision>, ApiError> {
    resolve_sticky(state, function, qualifier, None).await
}

/// [`resolve`]; a split alias picks by the bucket of `sticky` when given (see
/// [`sticky_key`]), so the same key always runs the same revision while the split stands.
pub async fn resolve_sticky(
    state: &Arc<AppState>,
    function: &str,
    qualifier: Option<&str>,
    sticky: Option<&[u8]>,
) -> Result<Arc<Revision>, ApiError> {
    match state
        .revisions
        .get(function, qualifier.unwrap_or(""), sticky)
    {
        Ok(picked) => picked,
        Err(generation) => load(state, function, qualifier, generation)
            .await?
            .checked_pick(function, sticky),
    }
}

/// Loads a resolution from the store and caches it unless the cache was invalidated since
/// `generation`. Returns a copy for the caller's pick (a few `Arc`s).
async fn load(
    state: &Arc<AppState>,
    function: &str,
    qualifier: Option<&str>,
    generation: u64,
) -> Result<Resolved, ApiError> {
    let st = state.clone();
    let (f, qual) = (function.to_string(), qualifier.map(str::to_string));
    // An alias (not a revision number or `$LATEST`) tells the scheduler which revisions are
    // routed, for the warm pool (`FAAS_WARM_POOL_SIZE`).
    let is_alias = qualifier
        .is_none_or(|q| q != skiff_store::LATEST && !q.bytes().all(|b| b.is_ascii_digit()));
    let track_routes = is_alias && state.scheduler.warm_pool_size() > 0;
    let (resolved, routed) = blocking(move || {
        let routed = if track_routes {
            let mut numbers = Vec::new();
            for a in st.store.list_aliases(&f)? {
                match a.routes {
                    Some(routes) => numbers.extend(routes.iter().map(|r| r.revision)),
                    None => numbers.push(a.revision),
                }
            }
            Some(numbers)
        } else {
            None
        };
        let res = st.store.resolve_routes(&f, qual.as_deref())?;
        let mut revisions = Vec::with_capacity(res.routes.len());
        let mut routes = Vec::with_capacity(res.routes.len());
        for (rec, weight) in res.routes {
            routes.push(Route {
                revision: rec.number,
                weight,
            });
            revisions.push(prepare(&st, rec)?);
        }
        Ok((
            Resolved {
                enabled: res.enabled,
                revisions: revisions.into(),
                routes: routes.into(),
                turns: Arc::default(),
            },
            routed,
        ))
    })
    .await?;
    if let Some(numbers) = routed {
        let revs: &[Arc<Revision>] = if resolved.enabled {
            &resolved.revisions
        } else {
            &[]
        };
        state.scheduler.set_routed(function, &numbers, revs);
    }
    let mut inner = state.revisions.inner.write();
    if inner.generation == generation {
        inner
            .map
            .entry(function.to_string())
            .or_default()
            .insert(qualifier.unwrap_or("").to_string(), resolved.clone());
    }
    Ok(resolved)
}

/// Unpacks a revision's code and resolves its secrets into a launchable [`Revision`].
pub(crate) fn prepare(
    st: &AppState,
    rec: skiff_store::RevisionRecord,
) -> Result<Arc<Revision>, ApiError> {
    // A revision that cannot run here (publish blockers other than `not_public`) is refused
    // before anything is unpacked or started.
    let blockers = skiff_core::publish::blockers(&rec.spec);
    if blockers.iter().any(|b| !b.allows_invoke()) {
        return Err(ApiError::not_publishable(rec.number, &blockers));
    }
    let code_dir = st.store.unpack(&rec.package_sha256)?;
    let mut secrets = Vec::with_capacity(rec.spec.secrets.len());
    for name in &rec.spec.secrets {
        let value = st.store.get_secret(name)?.ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::FAILED_DEPENDENCY,
                "missing_secret",
                format!("secrets: secret `{name}` is not set (skiff secrets set {name} VALUE)"),
            )
            .with("field", "secrets")
        })?;
        secrets.push((name.clone(), value));
    }
    Ok(Arc::new(Revision::new(
        rec.number,
        rec.spec,
        code_dir,
        &secrets,
        st.scheduler.workspace(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_buckets_split_every_hundred_exactly() {
        let routes = [
            Route {
                revision: 3,
                weight: 90,
            },
            Route {
                revision: 4,
                weight: 10,
            },
        ];
        for start in [0u64, 17, 1_000_003] {
            let mut seen = [false; 100];
            let mut canary = 0;
            let mut longest_gap = 0;
            let mut gap = 0;
            for n in start..start + 100 {
                let b = spread_bucket(n) as usize;
                assert!(!seen[b], "bucket {b} twice");
                seen[b] = true;
                if split::pick(&routes, b as u8) == 1 {
                    canary += 1;
                    gap = 0;
                } else {
                    gap += 1;
                    longest_gap = longest_gap.max(gap);
                }
            }
            assert_eq!(canary, 10);
            assert!(
                longest_gap < 30,
                "canary turns are spread: gap {longest_gap}"
            );
        }
    }

    #[test]
    fn sticky_key_ignores_empty_values() {
        let mut h = HeaderMap::new();
        assert_eq!(sticky_key(&h), None);
        h.insert(STICKY_HEADER, "".parse().unwrap());
        assert_eq!(sticky_key(&h), None);
        h.insert(STICKY_HEADER, "user-1".parse().unwrap());
        assert_eq!(sticky_key(&h), Some(&b"user-1"[..]));
    }
}
