//! API-key authentication: `Authorization: Bearer <key>`. Keys are compared by SHA-256
//! digest; plaintext keys are never stored. With no keys configured (allowed only on a
//! loopback bind) the API is open for local development.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::RwLock;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Known key digests: those given on the command line plus those found in the store.
#[derive(Default)]
pub struct Auth {
    static_digests: HashSet<String>,
    known: RwLock<HashSet<String>>,
    store_has_keys: AtomicBool,
    checked_at_ms: AtomicU64,
}

use skiff_store::Store;

fn digest(key: &str) -> String {
    Store::key_digest(key)
}

impl Auth {
    /// `keys` are plaintext keys from `--api-key` / `SKIFF_API_KEYS`; only digests are kept.
    pub fn new(keys: &[String]) -> Auth {
        Auth {
            static_digests: keys.iter().map(|k| digest(k)).collect(),
            ..Default::default()
        }
    }

    /// Whether any key is configured (re-checks the store at most once a second, so keys
    /// created with `skiff keys create` take effect without a restart).
    pub fn required(&self, state: &AppState) -> bool {
        if !self.static_digests.is_empty() || self.store_has_keys.load(Ordering::Relaxed) {
            return true;
        }
        let now = skiff_core::units::now_ms() as u64;
        if now.saturating_sub(self.checked_at_ms.load(Ordering::Relaxed)) >= 1000 {
            self.checked_at_ms.store(now, Ordering::Relaxed);
            if state.store.has_api_keys().unwrap_or(true) {
                self.store_has_keys.store(true, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    fn valid(&self, state: &AppState, key: &str) -> bool {
        let d = digest(key);
        if self.static_digests.contains(&d) || self.known.read().contains(&d) {
            return true;
        }
        if state.store.api_key_exists(&d).unwrap_or(false) {
            self.known.write().insert(d);
            return true;
        }
        false
    }
}

/// Middleware: rejects requests without a valid key when keys are configured.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.auth.required(&state) {
        return Ok(next.run(req).await);
    }
    let key = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match key {
        Some(k) if state.auth.valid(&state, k) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        )
        .header("www-authenticate", "Bearer".into())),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
        )
        .header("www-authenticate", "Bearer".into())),
    }
}
