//! Host routing: with a function domain configured (`skiff serve --function-domain
//! fn.example.com`), a request for `{slug}.{domain}` runs the function's `production` alias
//! and `{alias}--{slug}.{domain}` another alias, the whole path passed through. Other hosts
//! (the plain server address) reach the normal router, `/v1` included. Runs as middleware
//! in front of the router; like `/fn/…`, it needs no API key.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// What a `Host` means under the function domain.
#[derive(Debug, PartialEq, Eq)]
pub enum HostMatch<'a> {
    /// Not under the function domain: the normal router.
    Plain,
    /// A function (and alias; `None` = `production`).
    Function {
        slug: &'a str,
        alias: Option<&'a str>,
    },
    /// Under the domain but not a valid function label.
    Invalid,
}

/// Classifies a lower-case `Host` value (port ignored, one trailing `.` allowed) against
/// `domain` (lower case, no leading or trailing `.`).
pub fn classify<'a>(host: &'a str, domain: &str) -> HostMatch<'a> {
    if host.starts_with('[') {
        return HostMatch::Plain; // an IPv6 literal
    }
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let Some(label_len) = host.len().checked_sub(domain.len() + 1) else {
        return HostMatch::Plain;
    };
    if !host.is_char_boundary(label_len)
        || host.as_bytes()[label_len] != b'.'
        || !host[label_len + 1..].eq_ignore_ascii_case(domain)
    {
        return HostMatch::Plain;
    }
    let label = &host[..label_len];
    // Callers lower-case the host first; anything else is not a function name.
    if label.bytes().any(|b| b.is_ascii_uppercase()) {
        return HostMatch::Invalid;
    }
    let (alias, slug) = match label.split_once("--") {
        Some((a, s)) => (Some(a), s),
        None => (None, label),
    };
    if skiff_core::valid_name(slug) && alias.is_none_or(skiff_core::valid_name) {
        HostMatch::Function { slug, alias }
    } else {
        HostMatch::Invalid
    }
}

/// Middleware: serves function hosts, passes everything else on.
pub async fn route_by_host(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(domain) = state.function_domain.as_deref() else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    // Host names are case-insensitive; function names are lower case.
    let lower;
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        lower = host.to_ascii_lowercase();
        lower.as_str()
    } else {
        host
    };
    match classify(host, domain) {
        HostMatch::Plain => next.run(req).await,
        HostMatch::Invalid => ApiError::not_found(format!("no function at host `{host}`"))
            .gateway()
            .into_response(),
        HostMatch::Function { slug, alias } => {
            let (slug, alias) = (slug.to_string(), alias.map(str::to_string));
            crate::apigw::host_trigger(&state, req, &slug, alias.as_deref()).await
        }
    }
}

/// Normalizes a `--function-domain` value; `Err` says why it is not a DNS name.
pub fn parse_domain(s: &str) -> Result<String, String> {
    let d = s.trim().trim_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(d)
    } else {
        Err(format!("`{s}` is not a DNS name such as fn.example.com"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let d = "fn.localhost";
        let f = |slug, alias| HostMatch::Function { slug, alias };
        assert_eq!(classify("fx.fn.localhost", d), f("fx", None));
        assert_eq!(classify("fx.fn.localhost:8080", d), f("fx", None));
        assert_eq!(classify("fx.FN.localhost.", d), f("fx", None));
        assert_eq!(
            classify("staging--fx.fn.localhost", d),
            f("fx", Some("staging"))
        );
        assert_eq!(classify("a--b--c.fn.localhost", d), f("b--c", Some("a")));
        assert_eq!(classify("fn.localhost", d), HostMatch::Plain);
        assert_eq!(classify("127.0.0.1:8080", d), HostMatch::Plain);
        assert_eq!(classify("xfn.localhost", d), HostMatch::Plain);
        assert_eq!(classify("", d), HostMatch::Plain);
        assert_eq!(classify("[::1]:8080", d), HostMatch::Plain);
        assert_eq!(classify("a.b.fn.localhost", d), HostMatch::Invalid);
        assert_eq!(classify("FX.fn.localhost", d), HostMatch::Invalid);
        assert_eq!(classify("-x.fn.localhost", d), HostMatch::Invalid);
        assert_eq!(classify("--fx.fn.localhost", d), HostMatch::Invalid);
        assert_eq!(classify("under_score.fn.localhost", d), HostMatch::Invalid);
    }

    #[test]
    fn domains() {
        assert_eq!(parse_domain(".FN.localhost.").unwrap(), "fn.localhost");
        assert!(parse_domain("").is_err());
        assert!(parse_domain("a..b").is_err());
        assert!(parse_domain("a b").is_err());
    }
}
