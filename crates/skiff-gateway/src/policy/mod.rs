//! Route policy of HTTP triggers (`routes:` in `function.yaml`), compiled once per revision
//! and checked per request in a few hundred nanoseconds: longest path-prefix match on whole
//! segments, CORS preflight, method, auth, rate limit, body limit, rewrite, upstream timeout.
//! The checks run in [`crate::apigw`] in that order; this module holds the compiled form.

pub mod auth;
pub mod cors;
pub mod ratelimit;

use axum::http::{HeaderValue, Method};
use parking_lot::RwLock;
use skiff_core::Route;
use skiff_scheduler::Revision;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// One bit per method a route can list; anything else (CONNECT, TRACE, extensions) is 128.
pub(crate) fn method_bit(m: &Method) -> u8 {
    match *m {
        Method::GET => 1,
        Method::HEAD => 2,
        Method::POST => 4,
        Method::PUT => 8,
        Method::PATCH => 16,
        Method::DELETE => 32,
        Method::OPTIONS => 64,
        _ => 128,
    }
}

/// The bit set of a method list; empty = every method.
pub(crate) fn methods_mask(methods: &[String]) -> u8 {
    if methods.is_empty() {
        return u8::MAX;
    }
    methods
        .iter()
        .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
        .fold(0, |acc, m| acc | method_bit(&m))
}

/// A route, compiled.
pub struct CompiledRoute {
    /// Position in `routes:` (for logs).
    pub index: usize,
    /// Path prefix without trailing `/`; the root is `""`.
    prefix: Box<str>,
    methods: u8,
    allow: HeaderValue,
    rewrite: Option<Box<str>>,
    pub auth: Option<auth::Check>,
    pub cors: Option<cors::CorsPolicy>,
    pub limiter: Option<ratelimit::TokenBucket>,
    pub timeout: Option<Duration>,
    pub max_body: usize,
}

impl CompiledRoute {
    fn compile(index: usize, r: &Route) -> CompiledRoute {
        let root = |p: &str| -> Box<str> {
            if p == "/" {
                "".into()
            } else {
                p.into()
            }
        };
        let allow = if r.methods.is_empty() {
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".to_string()
        } else {
            r.methods.join(", ")
        };
        CompiledRoute {
            index,
            prefix: root(&r.path_prefix),
            methods: methods_mask(&r.methods),
            allow: HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("")),
            rewrite: r.rewrite_prefix.as_deref().map(root),
            auth: r.auth.as_ref().map(auth::Check::compile),
            cors: r
                .cors
                .as_ref()
                .map(|c| cors::CorsPolicy::compile(c, &r.methods)),
            limiter: r
                .rate_limit
                .map(|rl| ratelimit::TokenBucket::new(rl.rps, rl.burst)),
            timeout: r.timeout,
            max_body: r.max_body as usize,
        }
    }

    fn matches(&self, path: &str) -> bool {
        path.starts_with(&*self.prefix)
            && matches!(path.as_bytes().get(self.prefix.len()), None | Some(b'/'))
    }

    /// Whether the route accepts `m`.
    pub fn allows(&self, m: &Method) -> bool {
        self.methods & method_bit(m) != 0
    }

    /// The `Allow` header of a 405.
    pub fn allow_header(&self) -> &HeaderValue {
        &self.allow
    }

    /// The path with the matched prefix replaced by `rewrite_prefix`; `None` if the route
    /// does not rewrite. `path` is the normalized path this route matched.
    pub fn rewrite(&self, path: &str) -> Option<String> {
        let to = self.rewrite.as_deref()?;
        let rest = &path[self.prefix.len()..];
        let mut out = String::with_capacity(to.len() + rest.len() + 1);
        out.push_str(to);
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }
}

/// The compiled route policy of one revision.
pub struct Policy {
    /// Longest prefix first, so the first match is the longest.
    routes: Box<[CompiledRoute]>,
}

impl Policy {
    /// Compiles `routes:`; none = one open route `/`.
    pub fn compile(routes: Option<&[Route]>) -> Policy {
        let default = [Route::open_default()];
        let routes = routes.unwrap_or(&default);
        let mut compiled: Vec<CompiledRoute> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| CompiledRoute::compile(i, r))
            .collect();
        compiled.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Policy {
            routes: compiled.into(),
        }
    }

    /// The route for a normalized path (see [`normalize`]): the longest prefix that matches
    /// on whole segments.
    pub fn route(&self, path: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The form of a raw request path that routes are matched on, so that `/%61pi` or `//api`
/// cannot slip past the policy of `/api`: `%XX` escapes of unreserved characters decoded,
/// repeated `/` merged. `Err` for `.` or `..` segments (decoded too), which the gateway
/// refuses rather than guess how the function would resolve them. Borrows when unchanged.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    let b = raw.as_bytes();
    let plain = !raw.contains('%') && !raw.contains("//");
    let path: Cow<str> = if plain {
        Cow::Borrowed(raw)
    } else {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'%' {
                if let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) {
                    let d = hi << 4 | lo;
                    if unreserved(d) {
                        out.push(d);
                        i += 3;
                        continue;
                    }
                }
            }
            if !(c == b'/' && out.last() == Some(&b'/')) {
                out.push(c);
            }
            i += 1;
        }
        // Only ASCII bytes were decoded, so this stays valid UTF-8.
        Cow::Owned(String::from_utf8(out).map_err(|_| "path is not valid UTF-8")?)
    };
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("path must not contain `.` or `..` segments");
    }
    Ok(path)
}

/// Compiled policies by (function, revision). Revisions are immutable, so an entry stays valid
/// (with its rate-limit state) until the function is deleted.
#[derive(Default)]
pub struct PolicyCache {
    map: RwLock<HashMap<String, HashMap<u32, Arc<Policy>>>>,
}

impl PolicyCache {
    /// The policy of `rev`, compiled on first use.
    pub fn get(&self, rev: &Revision) -> Arc<Policy> {
        if let Some(p) = self
            .map
            .read()
            .get(&rev.function)
            .and_then(|m| m.get(&rev.number))
        {
            return p.clone();
        }
        let compiled = Arc::new(Policy::compile(rev.spec.routes.as_deref()));
        self.map
            .write()
            .entry(rev.function.clone())
            .or_default()
            .entry(rev.number)
            .or_insert(compiled)
            .clone()
    }

    /// Forgets a deleted function's policies (its revision numbers may be reused).
    pub fn forget(&self, function: &str) {
        self.map.write().remove(function);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(routes: serde_json::Value) -> Policy {
        let spec = skiff_core::FunctionSpec::from_value(
            &json!({"name": "fx", "runtime": "python3", "routes": routes}),
        )
        .unwrap();
        Policy::compile(spec.routes.as_deref())
    }

    fn prefix_of(p: &Policy, path: &str) -> Option<usize> {
        p.route(path).map(|r| r.index)
    }

    #[test]
    fn longest_prefix_on_whole_segments() {
        let p = policy(json!([
            {"path_prefix": "/api"},
            {"path_prefix": "/api/admin/"},
            {"path_prefix": "/static"},
        ]));
        assert_eq!(prefix_of(&p, "/api"), Some(0));
        assert_eq!(prefix_of(&p, "/api/"), Some(0));
        assert_eq!(prefix_of(&p, "/api/x"), Some(0));
        assert_eq!(prefix_of(&p, "/api/admin"), Some(1));
        assert_eq!(prefix_of(&p, "/api/admin/users"), Some(1));
        assert_eq!(prefix_of(&p, "/api/administrator"), Some(0));
        assert_eq!(prefix_of(&p, "/apix"), None);
        assert_eq!(prefix_of(&p, "/"), None);
        let with_root = policy(json!([{"path_prefix": "/"}, {"path_prefix": "/api"}]));
        assert_eq!(prefix_of(&with_root, "/apix"), Some(0));
        assert_eq!(prefix_of(&with_root, "/api/v"), Some(1));
        // No routes: one open route for everything.
        let open = Policy::compile(None);
        let r = open.route("/anything/at/all").unwrap();
        assert!(r.allows(&Method::DELETE) && r.auth.is_none() && r.limiter.is_none());
        assert_eq!(r.max_body, skiff_core::MAX_PAYLOAD_BYTES);
    }

    #[test]
    fn methods_and_allow() {
        let p = policy(json!([{"path_prefix": "/", "methods": ["GET", "post"]}]));
        let r = p.route("/").unwrap();
        assert!(r.allows(&Method::GET) && r.allows(&Method::POST));
        assert!(!r.allows(&Method::PUT) && !r.allows(&Method::OPTIONS));
        assert!(!r.allows(&Method::from_bytes(b"PURGE").unwrap()));
        assert_eq!(r.allow_header(), "GET, POST");
    }

    #[test]
    fn rewrites() {
        let p = policy(json!([
            {"path_prefix": "/api", "rewrite_prefix": "/v2/"},
            {"path_prefix": "/old", "rewrite_prefix": "/"},
            {"path_prefix": "/", "rewrite_prefix": "/app"},
            {"path_prefix": "/keep"},
        ]));
        let rw = |path: &str| p.route(path).unwrap().rewrite(path);
        assert_eq!(rw("/api").as_deref(), Some("/v2"));
        assert_eq!(rw("/api/users/1").as_deref(), Some("/v2/users/1"));
        assert_eq!(rw("/old").as_deref(), Some("/"));
        assert_eq!(rw("/old/x").as_deref(), Some("/x"));
        assert_eq!(rw("/x/y").as_deref(), Some("/app/x/y"));
        assert_eq!(rw("/").as_deref(), Some("/app/"));
        assert_eq!(rw("/keep/z"), None);
    }

    #[test]
    fn normalized_paths() {
        assert!(matches!(normalize("/api/x"), Ok(Cow::Borrowed("/api/x"))));
        assert_eq!(normalize("/%61pi/%7Euser").unwrap(), "/api/~user");
        assert_eq!(normalize("//api///x").unwrap(), "/api/x");
        // Reserved escapes stay escaped: `%2F` is not a separator.
        assert_eq!(normalize("/a%2Fb%20c").unwrap(), "/a%2Fb%20c");
        assert!(normalize("/a/../admin").is_err());
        assert!(normalize("/a/%2e%2E/admin").is_err());
        assert!(normalize("/./a").is_err());
        assert_eq!(normalize("/a..b/.c").unwrap(), "/a..b/.c");
        let p = policy(json!([{"path_prefix": "/api", "methods": ["GET"]}, {"path_prefix": "/"}]));
        assert_eq!(p.route(&normalize("/%61pi/x").unwrap()).unwrap().index, 0);
    }
}

/// The per-request policy work of a warm HTTP trigger, measured in-process:
/// `cargo test --release -p skiff-gateway policy_cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;
    use axum::http::HeaderMap;
    use serde_json::json;
    use std::time::Instant;

    /// Route, CORS, method, auth, rate limit and rewrite, in `apigw`'s order.
    fn check(p: &Policy, method: &Method, headers: &HeaderMap, raw: &str) -> usize {
        let path = normalize(raw).unwrap();
        let route = p.route(&path).unwrap();
        let mut out = HeaderMap::new();
        if let (Some(cors), Some(origin)) = (&route.cors, headers.get("origin")) {
            cors.apply(origin, &mut out);
        }
        assert!(route.allows(method));
        if let Some(a) = &route.auth {
            a.verify(headers, "fx").unwrap();
        }
        if let Some(b) = &route.limiter {
            b.try_take().unwrap();
        }
        route.rewrite(&path).map_or(0, |s| s.len()) + out.len()
    }

    #[test]
    #[ignore = "timing; run in release"]
    fn policy_cost() {
        let spec = skiff_core::FunctionSpec::from_value(&json!({"name": "fx", "runtime": "python3",
            "routes": [{"path_prefix": "/api", "methods": ["GET", "POST"],
                "cors": {"allow_origins": ["https://app.test"], "allow_headers": ["authorization"]},
                "auth": {"type": "bearer", "tokens_sha256": ["7137e16f75a1d75b6fd65930672814806cdc1a0d6e0aa38611afc996a402258b"]},
                "rate_limit": {"rps": 1000000, "burst": 1000000}},
                {"path_prefix": "/health", "methods": ["GET"]}]}))
        .unwrap();
        let policy = Policy::compile(spec.routes.as_deref());
        let open = Policy::compile(None);
        let mut h = HeaderMap::new();
        h.insert("origin", "https://app.test".parse().unwrap());
        h.insert("authorization", "Bearer bench-token".parse().unwrap());
        let n = 200_000;
        for (label, p) in [("open default", &open), ("policy", &policy)] {
            let t = Instant::now();
            let mut sink = 0;
            for _ in 0..n {
                sink += check(p, &Method::GET, &h, std::hint::black_box("/api/items"));
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("{label}: {ns:.0} ns per request ({sink})");
        }
    }
}
