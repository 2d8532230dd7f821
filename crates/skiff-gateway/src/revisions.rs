//! Resolution of `(function, qualifier)` to a launchable revision, cached so the invoke hot
//! path does not touch SQLite. Management calls that change what a qualifier means
//! (deploy, alias change, delete, secret change) invalidate the cache.

use crate::error::ApiError;
use crate::{blocking, AppState};
use parking_lot::RwLock;
use skiff_scheduler::Revision;
use std::collections::HashMap;
use std::sync::Arc;

/// Cache of resolved revisions, keyed by function then qualifier (`""` = production).
#[derive(Default)]
pub struct RevisionCache {
    map: RwLock<HashMap<String, HashMap<String, Arc<Revision>>>>,
}

impl RevisionCache {
    /// Forgets everything about one function.
    pub fn invalidate(&self, function: &str) {
        self.map.write().remove(function);
    }

    /// Forgets everything (e.g. a secret changed).
    pub fn clear(&self) {
        self.map.write().clear();
    }

    fn get(&self, function: &str, qualifier: &str) -> Option<Arc<Revision>> {
        self.map.read().get(function)?.get(qualifier).cloned()
    }
}

/// Resolves a qualifier (alias, revision number, `$LATEST`; none = `production`).
pub async fn resolve(
    state: &Arc<AppState>,
    function: &str,
    qualifier: Option<&str>,
) -> Result<Arc<Revision>, ApiError> {
    let q = qualifier.unwrap_or("");
    if let Some(rev) = state.revisions.get(function, q) {
        return Ok(rev);
    }
    let st = state.clone();
    let (f, qual) = (function.to_string(), qualifier.map(str::to_string));
    let rev = blocking(move || {
        let rec = st.store.resolve(&f, qual.as_deref())?;
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
    })
    .await?;
    state
        .revisions
        .map
        .write()
        .entry(function.to_string())
        .or_default()
        .insert(q.to_string(), rev.clone());
    Ok(rev)
}
