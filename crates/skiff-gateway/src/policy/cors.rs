//! CORS of a route: preflight answers (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) given by the gateway, and the `Access-Control-*` headers
//! added to every other response for an allowed origin. Header values are built once per
//! revision.

use super::{method_bit, methods_mask};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use skiff_core::Cors;

/// Methods a route that allows any method offers cross-origin by default.
const DEFAULT_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// A compiled CORS policy.
pub struct CorsPolicy {
    any_origin: bool,
    origins: Box<[Box<str>]>,
    methods: u8,
    allow_methods: HeaderValue,
    any_header: bool,
    allow_headers: Box<[Box<str>]>,
    allow_headers_value: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
}

fn value(s: &str) -> HeaderValue {
    // Parts are validated header names, methods and numbers.
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""))
}

impl CorsPolicy {
    /// `route_methods` are the route's methods (empty = any).
    pub fn compile(c: &Cors, route_methods: &[String]) -> CorsPolicy {
        let methods: &[String] = if c.allow_methods.is_empty() {
            route_methods
        } else {
            &c.allow_methods
        };
        let (mask, text) = if methods.is_empty() {
            (
                methods_mask(&[]) & !method_bit(&Method::OPTIONS),
                DEFAULT_METHODS.to_string(),
            )
        } else {
            (methods_mask(methods), methods.join(", "))
        };
        let any_header = c.allow_headers.iter().any(|h| h == "*");
        CorsPolicy {
            any_origin: c.allow_origins.iter().any(|o| o == "*"),
            origins: c.allow_origins.iter().map(|o| o.as_str().into()).collect(),
            methods: mask,
            allow_methods: value(&text),
            any_header,
            allow_headers: c.allow_headers.iter().map(|h| h.as_str().into()).collect(),
            allow_headers_value: (!c.allow_headers.is_empty() && !any_header)
                .then(|| value(&c.allow_headers.join(", "))),
            expose_headers: (!c.expose_headers.is_empty())
                .then(|| value(&c.expose_headers.join(", "))),
            max_age: c.max_age.map(|s| value(&s.to_string())),
            credentials: c.allow_credentials,
        }
    }

    /// Whether `origin` may call this route.
    pub fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || self
                .origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
    }

    fn allow_origin(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        if self.any_origin && !self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Answers a preflight: the headers of the 204, or why it is refused (→ 403).
    pub fn preflight(
        &self,
        origin: &HeaderValue,
        method: &HeaderValue,
        request_headers: Option<&HeaderValue>,
    ) -> Result<HeaderMap, &'static str> {
        if !self.origin_allowed(origin) {
            return Err("origin not allowed");
        }
        let allowed = Method::from_bytes(method.as_bytes())
            .map(|m| self.methods & method_bit(&m) != 0)
            .unwrap_or(false);
        if !allowed {
            return Err("method not allowed by CORS");
        }
        let requested = request_headers
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty());
        if !self.any_header {
            for h in requested {
                if !self.allow_headers.iter().any(|a| a.eq_ignore_ascii_case(h)) {
                    return Err("request header not allowed by CORS");
                }
            }
        }
        let mut h = HeaderMap::new();
        self.allow_origin(origin, &mut h);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        let allow_headers = match (&self.allow_headers_value, self.any_header) {
            (Some(v), _) => Some(v.clone()),
            // `*` reflects what was asked (a literal `*` is not honoured with credentials).
            (None, true) => request_headers.cloned(),
            (None, false) => None,
        };
        if let Some(v) = allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Ok(h)
    }

    /// Adds the response headers of a simple or actual request from `origin`, if allowed.
    pub fn apply(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        if !self.origin_allowed(origin) {
            return;
        }
        self.allow_origin(origin, h);
        if let Some(v) = &self.expose_headers {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], methods: &[&str], headers: &[&str], creds: bool) -> Cors {
        Cors {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_methods: methods.iter().map(|s| s.to_string()).collect(),
            allow_headers: headers.iter().map(|s| s.to_string()).collect(),
            expose_headers: vec!["x-skiff-request-id".into()],
            max_age: Some(600),
            allow_credentials: creds,
        }
    }

    fn v(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn preflight_decisions() {
        let p = CorsPolicy::compile(
            &cors(
                &["https://app.example.com"],
                &["GET", "POST"],
                &["authorization", "content-type"],
                true,
            ),
            &[],
        );
        let origin = v("https://APP.example.com");
        let h = p
            .preflight(&origin, &v("POST"), Some(&v("Authorization, Content-Type")))
            .unwrap();
        assert_eq!(h["access-control-allow-origin"], "https://APP.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization, content-type"
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert!(h.get_all("vary").iter().any(|x| x == "Origin"));
        assert_eq!(
            p.preflight(&v("https://evil.example"), &v("POST"), None),
            Err("origin not allowed")
        );
        assert_eq!(
            p.preflight(&origin, &v("DELETE"), None),
            Err("method not allowed by CORS")
        );
        assert_eq!(
            p.preflight(&origin, &v("GET"), Some(&v("x-other"))),
            Err("request header not allowed by CORS")
        );
    }

    #[test]
    fn star_origin_and_headers() {
        let p = CorsPolicy::compile(&cors(&["*"], &[], &["*"], false), &["GET".into()]);
        let h = p
            .preflight(&v("https://x.test"), &v("GET"), Some(&v("x-a, x-b")))
            .unwrap();
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-allow-methods"], "GET");
        assert_eq!(h["access-control-allow-headers"], "x-a, x-b");
        assert!(h.get("access-control-allow-credentials").is_none());
        // Methods default to the route's.
        assert!(p.preflight(&v("https://x.test"), &v("PUT"), None).is_err());
        // A route open to any method offers the common ones.
        let any = CorsPolicy::compile(&cors(&["*"], &[], &[], false), &[]);
        let h = any
            .preflight(&v("https://x.test"), &v("DELETE"), None)
            .unwrap();
        assert_eq!(h["access-control-allow-methods"], DEFAULT_METHODS);
        assert!(any
            .preflight(&v("https://x.test"), &v("GET"), Some(&v("x-a")))
            .is_err());
    }

    #[test]
    fn actual_responses() {
        let p = CorsPolicy::compile(&cors(&["https://a.test"], &[], &[], false), &[]);
        let mut h = HeaderMap::new();
        p.apply(&v("https://a.test"), &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://a.test");
        assert_eq!(h["access-control-expose-headers"], "x-skiff-request-id");
        assert_eq!(h["vary"], "Origin");
        let mut h = HeaderMap::new();
        p.apply(&v("https://b.test"), &mut h);
        assert!(h.is_empty(), "disallowed origin gets no CORS headers");
    }
}
