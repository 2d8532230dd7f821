//! API-key authentication: `Authorization: Bearer <key>`. Keys are compared by SHA-256
//! digest; plaintext keys are never stored. With no keys configured (allowed only on a
//! loopback bind) the API is open for local development.

use crate::error::{ApiError, LambdaError};
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

/// The key a request presents: `Authorization: Bearer <key>`, or the access key id of an
/// AWS SigV4 `Authorization` header (`AWS4-HMAC-SHA256 Credential=<key>/<date>/…`), so AWS
/// SDKs authenticate with a Skiff API key as their access key id. The SigV4 signature itself
/// is not verified (Skiff never stores the plaintext key it would need).
fn presented_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    if let Some(k) = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(k.trim());
    }
    let rest = v.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let cred = rest
        .split(',')
        .find_map(|p| p.trim().strip_prefix("Credential="))?;
    cred.split('/').next().filter(|k| !k.is_empty())
}

/// Checks the request's key when keys are configured.
pub fn check(state: &AppState, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if !state.auth.required(state) {
        return Ok(());
    }
    match presented_key(headers) {
        Some(k) if state.auth.valid(state, k) => Ok(()),
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

/// Middleware: rejects requests without a valid key when keys are configured.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, req.headers())?;
    Ok(next.run(req).await)
}

/// [`require_key`] for the seed-compatible API: failures in its `{"error": "…"}` shape.
pub async fn require_key_seed(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, req.headers()).map_err(ApiError::seed)?;
    Ok(next.run(req).await)
}

/// [`require_key`] for `POST /execute`: failures in its `{"success": false, "error"}` shape.
pub async fn require_key_execute(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, req.headers()).map_err(ApiError::execute)?;
    Ok(next.run(req).await)
}

/// [`require_key`] for the Lambda API: failures in Lambda's error shape (403
/// `UnrecognizedClientException`, as AWS answers an unknown access key).
pub async fn require_key_lambda(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, LambdaError> {
    check(&state, req.headers()).map_err(|e| {
        let mut e = LambdaError::from(e);
        e.message = "The security token included in the request is invalid: use a Skiff API key as the access key id".into();
        e
    })?;
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_bearer_and_sigv4() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("authorization", "Bearer sk_abc ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk_abc"));
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=sk_live/20261125/us-east-1/lambda/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abcd"
                .parse()
                .unwrap(),
        );
        assert_eq!(presented_key(&h), Some("sk_live"));
        h.insert("authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
        assert_eq!(presented_key(&h), None);
    }
}
