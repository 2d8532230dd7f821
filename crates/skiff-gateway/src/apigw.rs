//! HTTP triggers: `ANY /fn/{name}[/{*path}]`. The request becomes an API Gateway HTTP API
//! payload format 2.0 event ([`event_json`]), runs through [`crate::exec::run_opts`], and the reply is
//! mapped back by the 2.0 rules ([`reply_response`]), as API Gateway and Lambda function URLs do.
//!
//! Public by design, like a function URL with auth `NONE`: these routes sit outside the API-key
//! layer. The query string belongs to the function, so the alias or revision is chosen with the
//! [`QUALIFIER_HEADER`] header (default `production`); a split alias picks by the
//! `X-Skiff-Sticky` key when sent. Errors use API Gateway's `{"message"}`
//! shape ([`crate::error::Shape::Gateway`]).
//!
//! Function hosts (`{slug}.{domain}`, see [`crate::host`]) enter through [`host_trigger`] with
//! the whole path. Both run the revision's route policy ([`crate::policy`]) before invoking.

use crate::error::{ApiError, ApiResult};
use crate::invoke::{read_body, skiff_headers};
use crate::policy::CompiledRoute;
use crate::revisions::{resolve_sticky, sticky_key};
use crate::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use skiff_core::Invocation;
use std::borrow::Cow;
use std::collections::btree_map::{BTreeMap, Entry};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Request header that picks the alias or revision an HTTP trigger runs (default `production`).
pub const QUALIFIER_HEADER: &str = "x-skiff-qualifier";

/// Standard base64, padded on output, padding optional on input.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Connection-level headers that are never passed between client and function (plus those
/// named by `Connection`).
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The HTTP trigger routes. Mounted outside `auth::require_key`: no API key needed.
pub fn routes() -> Router<Arc<AppState>> {
    // `{*path}` does not match an empty rest, hence the two shorter routes.
    Router::new()
        .route("/fn/{name}", any(handle))
        .route("/fn/{name}/", any(handle))
        .route("/fn/{name}/{*path}", any(handle))
}

async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let request_id = crate::exec::request_id();
    let (parts, body) = req.into_parts();
    let target = split_path(parts.uri.path())
        .ok_or_else(|| ApiError::not_found("no such route"))
        .and_then(|(name, _)| {
            let qualifier = match parts.headers.get(QUALIFIER_HEADER) {
                None => None,
                Some(v) => Some(v.to_str().ok().filter(|q| !q.is_empty()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{QUALIFIER_HEADER} must name an alias or revision"
                    ))
                })?),
            };
            let rest_len = parts.uri.path().len() - "/fn/".len() - name.len();
            Ok((name.to_string(), qualifier.map(str::to_string), rest_len))
        });
    let result = match target {
        Ok((name, qualifier, rest_len)) => {
            trigger(
                &state,
                parts,
                body,
                &request_id,
                &name,
                qualifier.as_deref(),
                rest_len,
            )
            .await
        }
        Err(e) => Err(e),
    };
    finish(result, request_id)
}

/// Serves a request routed by its `Host` (`{slug}.{domain}` or `{alias}--{slug}.{domain}`):
/// the whole path goes to the function.
pub(crate) async fn host_trigger(
    state: &Arc<AppState>,
    req: Request,
    slug: &str,
    alias: Option<&str>,
) -> Response {
    let request_id = crate::exec::request_id();
    let (parts, body) = req.into_parts();
    let rest_len = parts.uri.path().len();
    let result = trigger(state, parts, body, &request_id, slug, alias, rest_len).await;
    finish(result, request_id)
}

fn finish(result: ApiResult<Response>, request_id: String) -> Response {
    match result {
        Ok(resp) => resp,
        Err(e) => e
            .gateway()
            .header("x-skiff-request-id", request_id)
            .into_response(),
    }
}

/// Runs an HTTP trigger: `name`/`qualifier` pick the revision, the last `rest_len` bytes of the
/// URI path are the function's `rawPath`. The revision's route policy applies first.
async fn trigger(
    state: &Arc<AppState>,
    mut parts: Parts,
    body: Body,
    request_id: &str,
    name: &str,
    qualifier: Option<&str>,
    rest_len: usize,
) -> ApiResult<Response> {
    let rev = resolve_sticky(state, name, qualifier, sticky_key(&parts.headers)).await?;
    let policy = state.policies.get(&rev);
    let path = parts.uri.path();
    let raw_path = match &path[path.len() - rest_len..] {
        "" => "/",
        p => p,
    };
    let normalized = crate::policy::normalize(raw_path).map_err(ApiError::bad_request)?;
    let route = policy
        .route(&normalized)
        .ok_or_else(|| ApiError::not_found("no route matches this path"))?;
    let origin = match &route.cors {
        Some(_) => parts.headers.get(header::ORIGIN).cloned(),
        None => None,
    };
    if let (Some(cors), Some(origin)) = (&route.cors, &origin) {
        if parts.method == Method::OPTIONS {
            if let Some(want) = parts.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD) {
                let asked = parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
                let headers = cors.preflight(origin, want, asked).map_err(|reason| {
                    ApiError::new(StatusCode::FORBIDDEN, "cors_forbidden", reason)
                })?;
                let mut resp = StatusCode::NO_CONTENT.into_response();
                resp.headers_mut().extend(headers);
                return Ok(resp);
            }
        }
    }
    let rewritten = route.rewrite(&normalized);
    let raw_path = rewritten.as_deref().unwrap_or(raw_path).to_string();
    drop(normalized);
    let call = Call {
        rev: &rev,
        qualifier,
        route,
        request_id,
        raw_path: &raw_path,
    };
    let result = guarded(state, call, &mut parts, body).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => e
            .gateway()
            .header("x-skiff-request-id", request_id.to_string())
            .into_response(),
    };
    if let (Some(cors), Some(origin)) = (&route.cors, &origin) {
        cors.apply(origin, resp.headers_mut());
    }
    Ok(resp)
}

/// What a routed request runs: the revision, its matched route and the function's `rawPath`.
struct Call<'a> {
    rev: &'a Arc<skiff_scheduler::Revision>,
    qualifier: Option<&'a str>,
    route: &'a CompiledRoute,
    request_id: &'a str,
    raw_path: &'a str,
}

/// The checks after routing (method, auth, rate limit, body limit), then the invocation under
/// the route's timeout.
async fn guarded(
    state: &Arc<AppState>,
    call: Call<'_>,
    parts: &mut Parts,
    body: Body,
) -> ApiResult<Response> {
    let Call {
        rev,
        qualifier,
        route,
        request_id,
        raw_path,
    } = call;
    if !route.allows(&parts.method) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed here", parts.method),
        )
        .header_value(header::ALLOW, route.allow_header().clone()));
    }
    if let Some(check) = &route.auth {
        check.verify(&parts.headers, &rev.function).map_err(|d| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", d.message)
                .header("www-authenticate", d.challenge)
        })?;
    }
    if let Some(bucket) = &route.limiter {
        bucket.try_take().map_err(|wait| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "the route's rate limit is exceeded",
            )
            .header(
                "retry-after",
                crate::policy::ratelimit::retry_after_secs(wait).to_string(),
            )
        })?;
    }
    let mode = state
        .scheduler
        .exec_mode(rev)
        .await
        .map_err(ApiError::from)?;
    if mode == skiff_core::protocol::ExecMode::Http {
        // HTTP-server functions get the request itself, streamed (the proxy sets the
        // X-Forwarded-* headers and applies the function's timeout).
        let owned = std::mem::replace(parts, axum::http::Request::new(()).into_parts().0);
        return crate::proxy::forward(state, rev, raw_path.to_owned(), owned, body, request_id)
            .await;
    }
    let body = read_body(&parts.headers, body, route.max_body).await?;
    let source_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    reset_forwarded(
        &mut parts.headers,
        source_ip,
        parts.uri.authority().map(|a| a.as_str()),
    );
    let payload = event_json(
        &RequestInfo {
            function: &rev.function,
            method: parts.method.as_str(),
            raw_path,
            raw_query: parts.uri.query().unwrap_or(""),
            version: parts.version,
            headers: &parts.headers,
            authority: parts.uri.authority().map(|a| a.as_str()),
            source_ip,
            request_id,
            time_ms: skiff_core::units::now_ms(),
        },
        &body,
    );
    drop(body);
    let inv = Invocation {
        request_id: request_id.to_string(),
        function: rev.function.clone(),
        qualifier: qualifier.map(str::to_string),
        payload,
        client_context: None,
        trace_id: None,
    };
    // Replies are mapped whole (a streamed one is collected first).
    let opts = skiff_scheduler::InvokeOptions {
        wait_for_capacity: true,
        timeout: route.timeout,
    };
    let out = crate::exec::run_opts(state, rev, inv, opts)
        .await?
        .collect()
        .await;
    let name = rev.function.as_str();
    let mut resp = match out.function_error {
        Some(fe) => ApiError::function_error(fe.error_type, fe.message)
            .gateway()
            .into_response(),
        None => reply_response(out.body).unwrap_or_else(|reason| {
            tracing::warn!(
                function = name,
                request_id,
                "invalid HTTP trigger reply: {reason}"
            );
            ApiError::invalid_reply(reason).gateway().into_response()
        }),
    };
    skiff_headers(
        resp.headers_mut(),
        request_id,
        out.revision,
        &out.instance_id,
        out.cold,
        out.duration,
    );
    Ok(resp)
}

/// Client-sent `X-Forwarded-*` and `Forwarded` headers are not trusted: they are removed and
/// set by the gateway (`X-Forwarded-For` = the peer's address, `-Proto`, `-Host`).
fn reset_forwarded(h: &mut HeaderMap, peer: Option<IpAddr>, authority: Option<&str>) {
    let is_forwarded =
        |n: &HeaderName| n.as_str().starts_with("x-forwarded-") || *n == header::FORWARDED;
    if h.keys().any(is_forwarded) {
        let names: Vec<HeaderName> = h.keys().filter(|n| is_forwarded(n)).cloned().collect();
        for n in names {
            h.remove(n);
        }
    }
    if let Some(ip) = peer {
        if let Ok(v) = HeaderValue::from_str(&ip.to_canonical().to_string()) {
            h.insert("x-forwarded-for", v);
        }
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let host = h
        .get(header::HOST)
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a).ok()));
    if let Some(host) = host {
        h.insert("x-forwarded-host", host);
    }
}

/// Splits `/fn/{name}/rest` into the function name and the raw path after it (`/` if none).
pub(crate) fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/fn/")?;
    Some(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The parts of an HTTP request that go into its event, borrowed from the request.
pub struct RequestInfo<'a> {
    pub function: &'a str,
    pub method: &'a str,
    /// The path after `/fn/{name}`, as received, starting with `/`.
    pub raw_path: &'a str,
    /// The query string as received (without `?`).
    pub raw_query: &'a str,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The request target's authority, for absolute-form requests without `Host`.
    pub authority: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub request_id: &'a str,
    pub time_ms: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    version: &'static str,
    route_key: &'static str,
    raw_path: &'a str,
    raw_query_string: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cookies: Vec<Cow<'a, str>>,
    headers: Headers<'a>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    query_string_parameters: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
    request_context: RequestContext<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Cow<'a, str>>,
    is_base64_encoded: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestContext<'a> {
    account_id: &'static str,
    api_id: &'a str,
    domain_name: &'a str,
    domain_prefix: &'a str,
    http: HttpContext<'a>,
    request_id: &'a str,
    route_key: &'static str,
    stage: &'static str,
    time: String,
    time_epoch: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpContext<'a> {
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    source_ip: String,
    user_agent: Cow<'a, str>,
}

/// Serialises forwarded headers as one string each, repeated values joined with `,`.
struct Headers<'a>(&'a HeaderMap);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for name in self.0.keys() {
            if *name == header::COOKIE || !forwarded(name, self.0) {
                continue;
            }
            let mut values = self.0.get_all(name).iter();
            let Some(first) = values.next() else { continue };
            match values.next() {
                None => map.serialize_entry(name.as_str(), &text(first))?,
                Some(second) => {
                    let mut joined = text(first).into_owned();
                    for v in std::iter::once(second).chain(values) {
                        joined.push(',');
                        joined.push_str(&text(v));
                    }
                    map.serialize_entry(name.as_str(), &joined)?;
                }
            }
        }
        map.end()
    }
}

/// Whether a request header reaches the function: not hop-by-hop, not named by `Connection`.
fn forwarded(name: &HeaderName, headers: &HeaderMap) -> bool {
    !HOP_BY_HOP.contains(&name.as_str())
        && !headers.get_all(header::CONNECTION).iter().any(|v| {
            text(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
        })
}

/// A header value as text (not valid UTF-8 → lossy).
fn text(v: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(v.as_bytes())
}

/// The HTTP API payload 2.0 event for a request, serialised.
pub fn event_json(req: &RequestInfo<'_>, body: &[u8]) -> Vec<u8> {
    let h = req.headers;
    let domain_name = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(req.authority)
        .unwrap_or("");
    let (body, is_base64_encoded) = event_body(h, body);
    let event = Event {
        version: "2.0",
        route_key: "$default",
        raw_path: req.raw_path,
        raw_query_string: req.raw_query,
        cookies: cookies(h),
        headers: Headers(h),
        query_string_parameters: query_params(req.raw_query),
        request_context: RequestContext {
            account_id: "anonymous",
            api_id: req.function,
            domain_name,
            domain_prefix: domain_prefix(domain_name),
            http: HttpContext {
                method: req.method,
                path: req.raw_path,
                protocol: protocol(req.version),
                source_ip: req
                    .source_ip
                    .map(|ip| ip.to_canonical().to_string())
                    .unwrap_or_default(),
                user_agent: h.get(header::USER_AGENT).map(text).unwrap_or_default(),
            },
            request_id: req.request_id,
            route_key: "$default",
            stage: "$default",
            time: skiff_core::units::clf_time(req.time_ms),
            time_epoch: req.time_ms,
        },
        body,
        is_base64_encoded,
    };
    // Serialising borrowed strings and string maps into a Vec cannot fail.
    serde_json::to_vec(&event).unwrap_or_default()
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// First label of the host name (`api` of `api.example.com:8080`); an IP address whole.
fn domain_prefix(domain: &str) -> &str {
    let host = match domain.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => domain.split(':').next().unwrap_or(domain),
    };
    if host.parse::<IpAddr>().is_ok() {
        return host;
    }
    host.split('.').next().unwrap_or(host)
}

/// Cookies from all `Cookie` headers, split on `;`.
fn cookies(h: &HeaderMap) -> Vec<Cow<'_, str>> {
    let mut out = Vec::new();
    for v in h.get_all(header::COOKIE) {
        match text(v) {
            Cow::Borrowed(s) => out.extend(
                s.split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(Cow::Borrowed),
            ),
            Cow::Owned(s) => out.extend(
                s.split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| Cow::Owned(c.to_string())),
            ),
        }
    }
    out
}

/// Percent-decoded query parameters; repeated keys joined with `,`. `+` stays `+`.
fn query_params(raw: &str) -> BTreeMap<Cow<'_, str>, Cow<'_, str>> {
    let mut map: BTreeMap<Cow<str>, Cow<str>> = BTreeMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match map.entry(percent_decode(k)) {
            Entry::Vacant(e) => {
                e.insert(v);
            }
            Entry::Occupied(mut e) => {
                let joined = e.get_mut().to_mut();
                joined.push(',');
                joined.push_str(&v);
            }
        }
    }
    map
}

/// Decodes `%XX` escapes; malformed escapes stay as they are, invalid UTF-8 becomes U+FFFD.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// The event body: UTF-8 text of a textual content type as is, anything else base64.
fn event_body<'a>(h: &HeaderMap, body: &'a [u8]) -> (Option<Cow<'a, str>>, bool) {
    if body.is_empty() {
        return (None, false);
    }
    if is_text(h.get(header::CONTENT_TYPE)) {
        if let Ok(s) = std::str::from_utf8(body) {
            return (Some(Cow::Borrowed(s)), false);
        }
    }
    (Some(Cow::Owned(B64.encode(body))), true)
}

/// Whether a content type is text (no content type counts as text; the bytes decide).
fn is_text(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type else { return true };
    let mime = String::from_utf8_lossy(ct.as_bytes());
    let mime = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((ty, sub)) = mime.split_once('/') else {
        return false;
    };
    ty == "text"
        || matches!(
            sub,
            "json"
                | "xml"
                | "javascript"
                | "ecmascript"
                | "yaml"
                | "x-yaml"
                | "x-www-form-urlencoded"
                | "graphql"
        )
        || sub.ends_with("+json")
        || sub.ends_with("+xml")
        || sub.ends_with("+yaml")
}

/// A reply in the structured form; present fields decide, unknown ones are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    status_code: Option<Value>,
    headers: Option<Value>,
    multi_value_headers: Option<Value>,
    cookies: Option<Value>,
    body: Option<Value>,
    is_base64_encoded: Option<Value>,
}

/// Maps a function's JSON reply to the HTTP response (payload format 2.0). An object with
/// `statusCode` gives status, `headers`, `multiValueHeaders`, `cookies` (→ `Set-Cookie`) and
/// `body` (base64-decoded if `isBase64Encoded`); any other JSON value is a 200
/// `application/json` response with the reply as its body. `Err` says why the reply is invalid.
pub fn reply_response(reply: Vec<u8>) -> Result<Response, String> {
    let is_object = reply.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let structured = if is_object {
        let r: Reply =
            serde_json::from_slice(&reply).map_err(|e| format!("reply is not valid JSON: {e}"))?;
        r.status_code.is_some().then_some(r)
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(&reply)
            .map_err(|e| format!("reply is not valid JSON: {e}"))?;
        None
    };
    let Some(r) = structured else {
        let mut resp = Response::new(Body::from(reply));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    };
    let status = r
        .status_code
        .as_ref()
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("statusCode must be an integer from 200 to 599")?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Some(headers) = r.headers {
        let Value::Object(map) = headers else {
            return Err("headers must be an object".into());
        };
        for (k, v) in map {
            if let Some(name) = reply_header_name(&k)? {
                h.insert(name, header_value(&k, v)?);
            }
        }
    }
    if let Some(headers) = r.multi_value_headers {
        let Value::Object(map) = headers else {
            return Err("multiValueHeaders must be an object".into());
        };
        for (k, vs) in map {
            let Value::Array(vs) = vs else {
                return Err(format!("multiValueHeaders.{k} must be an array"));
            };
            if let Some(name) = reply_header_name(&k)? {
                h.remove(&name);
                for v in vs {
                    h.append(&name, header_value(&k, v)?);
                }
            }
        }
    }
    if let Some(cookies) = r.cookies {
        let Value::Array(cookies) = cookies else {
            return Err("cookies must be an array of strings".into());
        };
        for c in cookies {
            let Value::String(c) = c else {
                return Err("cookies must be an array of strings".into());
            };
            let v = HeaderValue::try_from(c).map_err(|_| "a cookie has an invalid character")?;
            h.append(header::SET_COOKIE, v);
        }
    }
    let base64 = match r.is_base64_encoded {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("isBase64Encoded must be a boolean".into()),
    };
    let body = match r.body {
        None => Vec::new(),
        Some(Value::String(s)) if base64 => B64
            .decode(s.as_bytes())
            .map_err(|e| format!("body is not valid base64: {e}"))?,
        Some(Value::String(s)) => s.into_bytes(),
        Some(_) => return Err("body must be a string".into()),
    };
    *resp.body_mut() = Body::from(body);
    Ok(resp)
}

/// A reply header's name; `None` for headers the gateway owns (hop-by-hop, `content-length`).
fn reply_header_name(k: &str) -> Result<Option<HeaderName>, String> {
    let name = HeaderName::from_bytes(k.as_bytes())
        .map_err(|_| format!("header name `{k}` is not valid"))?;
    let owned = name == header::CONTENT_LENGTH || HOP_BY_HOP.contains(&name.as_str());
    Ok((!owned).then_some(name))
}

/// A reply header value: a string, number or boolean.
fn header_value(k: &str, v: Value) -> Result<HeaderValue, String> {
    let s = match v {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return Err(format!("header `{k}` must be a string")),
    };
    HeaderValue::try_from(s).map_err(|_| format!("header `{k}` has an invalid value"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn event(h: &HeaderMap, query: &str, body: &[u8]) -> Value {
        let req = RequestInfo {
            function: "fx",
            method: "POST",
            raw_path: "/a/b%20c",
            raw_query: query,
            version: Version::HTTP_11,
            headers: h,
            authority: None,
            source_ip: Some("::ffff:10.1.2.3".parse().unwrap()),
            request_id: "req-1",
            time_ms: 1_583_348_638_390,
        };
        serde_json::from_slice(&event_json(&req, body)).unwrap()
    }

    async fn body_of(resp: Response) -> Vec<u8> {
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[test]
    fn routes_build() {
        let _ = routes();
    }

    #[test]
    fn split_paths() {
        assert_eq!(split_path("/fn/hello"), Some(("hello", "/")));
        assert_eq!(split_path("/fn/hello/"), Some(("hello", "/")));
        assert_eq!(split_path("/fn/hello/a/b"), Some(("hello", "/a/b")));
        assert_eq!(split_path("/v1/x"), None);
    }

    #[test]
    fn event_has_the_documented_shape() {
        let h = headers(&[
            ("host", "api.example.com:8080"),
            ("user-agent", "curl/8"),
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("cookie", "a=1; b=2"),
            ("cookie", "c=3"),
        ]);
        let e = event(&h, "x=1&y=%2Fz&x=2&flag&p=a+b", b"");
        assert_eq!(e["version"], "2.0");
        assert_eq!(e["routeKey"], "$default");
        assert_eq!(e["rawPath"], "/a/b%20c");
        assert_eq!(e["rawQueryString"], "x=1&y=%2Fz&x=2&flag&p=a+b");
        assert_eq!(e["cookies"], json!(["a=1", "b=2", "c=3"]));
        assert_eq!(e["headers"]["x-multi"], "a,b");
        assert_eq!(e["headers"]["host"], "api.example.com:8080");
        assert!(e["headers"].get("cookie").is_none(), "{e}");
        assert_eq!(
            e["queryStringParameters"],
            json!({"x": "1,2", "y": "/z", "flag": "", "p": "a+b"})
        );
        let rc = &e["requestContext"];
        assert_eq!(rc["accountId"], "anonymous");
        assert_eq!(rc["apiId"], "fx");
        assert_eq!(rc["domainName"], "api.example.com:8080");
        assert_eq!(rc["domainPrefix"], "api");
        assert_eq!(
            rc["http"],
            json!({"method": "POST", "path": "/a/b%20c", "protocol": "HTTP/1.1",
                   "sourceIp": "10.1.2.3", "userAgent": "curl/8"})
        );
        assert_eq!(rc["requestId"], "req-1");
        assert_eq!(rc["stage"], "$default");
        assert_eq!(rc["time"], "04/Mar/2020:19:03:58 +0000");
        assert_eq!(rc["timeEpoch"], 1_583_348_638_390_i64);
        assert!(e.get("body").is_none());
        assert_eq!(e["isBase64Encoded"], false);
        assert!(e.get("pathParameters").is_none());
        assert!(e.get("stageVariables").is_none());
    }

    #[test]
    fn no_cookies_no_query_means_omitted() {
        let e = event(&HeaderMap::new(), "", b"");
        assert!(e.get("cookies").is_none(), "{e}");
        assert!(e.get("queryStringParameters").is_none(), "{e}");
        assert_eq!(e["rawQueryString"], "");
        assert_eq!(e["headers"], json!({}));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-private", "secret"),
            ("x-kept", "yes"),
        ]);
        let e = event(&h, "", b"");
        assert_eq!(e["headers"], json!({"x-kept": "yes"}));
    }

    #[test]
    fn bodies_text_or_base64() {
        let json_ct = headers(&[("content-type", "application/json; charset=utf-8")]);
        let e = event(&json_ct, "", br#"{"a":1}"#);
        assert_eq!(
            (e["body"].as_str(), &e["isBase64Encoded"]),
            (Some(r#"{"a":1}"#), &json!(false))
        );
        // No content type: UTF-8 stays text.
        let e = event(&HeaderMap::new(), "", "héllo".as_bytes());
        assert_eq!(
            (e["body"].as_str(), &e["isBase64Encoded"]),
            (Some("héllo"), &json!(false))
        );
        // Binary content type: base64 even when the bytes are valid UTF-8.
        let bin = headers(&[("content-type", "application/octet-stream")]);
        let e = event(&bin, "", b"abc");
        assert_eq!(
            (e["body"].as_str(), &e["isBase64Encoded"]),
            (Some("YWJj"), &json!(true))
        );
        // Text content type but not UTF-8: base64.
        let text = headers(&[("content-type", "text/plain")]);
        let all: Vec<u8> = (0..=255).collect();
        let e = event(&text, "", &all);
        assert_eq!(e["isBase64Encoded"], true);
        assert_eq!(B64.decode(e["body"].as_str().unwrap()).unwrap(), all);
    }

    #[test]
    fn domain_prefixes() {
        assert_eq!(domain_prefix("api.example.com"), "api");
        assert_eq!(domain_prefix("api.example.com:443"), "api");
        assert_eq!(domain_prefix("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(domain_prefix("[::1]:8080"), "::1");
        assert_eq!(domain_prefix("localhost"), "localhost");
        assert_eq!(domain_prefix(""), "");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }

    #[tokio::test]
    async fn plain_json_values_are_200_json() {
        for reply in [
            &br#"{"hello":"world"}"#[..],
            b"[1,2]",
            b"\"text\"",
            b"42",
            b"null",
        ] {
            let resp = reply_response(reply.to_vec()).unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(body_of(resp).await, reply);
        }
        // An array is a plain value even though serde could read it as a struct.
        let resp = reply_response(b"[200, {}, null, \"x\"]".to_vec()).unwrap();
        assert_eq!(body_of(resp).await, b"[200, {}, null, \"x\"]");
    }

    #[tokio::test]
    async fn structured_reply_sets_status_headers_cookies() {
        let reply = json!({
            "statusCode": 201,
            "headers": {"content-type": "text/plain", "x-num": 5, "x-multi": "dropped",
                        "content-length": "999", "connection": "close"},
            "multiValueHeaders": {"x-multi": ["a", "b"]},
            "cookies": ["s=1; Path=/", "t=2; HttpOnly"],
            "body": "created",
        });
        let resp = reply_response(serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(resp.status(), 201);
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-num"], "5");
        let multi: Vec<_> = h.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["s=1; Path=/", "t=2; HttpOnly"]);
        assert!(h.get("content-length").is_none() && h.get("connection").is_none());
        assert_eq!(body_of(resp).await, b"created");
    }

    #[tokio::test]
    async fn base64_reply_body_is_decoded() {
        let all: Vec<u8> = (0..=255).collect();
        let reply = json!({"statusCode": 200, "isBase64Encoded": true, "body": B64.encode(&all)});
        let resp = reply_response(serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(body_of(resp).await, all);
        // Unpadded input is accepted too.
        let reply = json!({"statusCode": 200, "isBase64Encoded": true, "body": "YWI"});
        let resp = reply_response(serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(body_of(resp).await, b"ab");
        // No body: empty.
        let resp = reply_response(br#"{"statusCode": 204}"#.to_vec()).unwrap();
        assert_eq!(resp.status(), 204);
        assert!(body_of(resp).await.is_empty());
    }

    #[test]
    fn invalid_replies_say_why() {
        let cases = [
            (&b"not json"[..], "not valid JSON"),
            (b"{\"statusCode\": 200", "not valid JSON"),
            (br#"{"statusCode": "200"}"#, "statusCode"),
            (br#"{"statusCode": 99}"#, "statusCode"),
            (br#"{"statusCode": 700}"#, "statusCode"),
            (
                br#"{"statusCode": 200, "headers": []}"#,
                "headers must be an object",
            ),
            (
                br#"{"statusCode": 200, "headers": {"x": {}}}"#,
                "header `x`",
            ),
            (
                br#"{"statusCode": 200, "headers": {"bad name": "v"}}"#,
                "`bad name`",
            ),
            (
                br#"{"statusCode": 200, "headers": {"x": "a\nb"}}"#,
                "invalid value",
            ),
            (
                br#"{"statusCode": 200, "multiValueHeaders": {"x": "a"}}"#,
                "must be an array",
            ),
            (br#"{"statusCode": 200, "cookies": "a=1"}"#, "cookies"),
            (br#"{"statusCode": 200, "cookies": [1]}"#, "cookies"),
            (
                br#"{"statusCode": 200, "body": {"a": 1}}"#,
                "body must be a string",
            ),
            (
                br#"{"statusCode": 200, "isBase64Encoded": "yes"}"#,
                "isBase64Encoded",
            ),
            (
                br#"{"statusCode": 200, "isBase64Encoded": true, "body": "%%%"}"#,
                "base64",
            ),
        ];
        for (reply, want) in cases {
            let err = reply_response(reply.to_vec())
                .err()
                .unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(reply)));
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[tokio::test]
    async fn object_without_status_code_is_plain() {
        let reply = br#"{"body": "x", "headers": {"a": "b"}}"#;
        let resp = reply_response(reply.to_vec()).unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("a").is_none());
        assert_eq!(body_of(resp).await, reply);
    }
}
