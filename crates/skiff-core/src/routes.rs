//! `routes:` in `function.yaml`: the route policy of a function's HTTP triggers (path prefixes,
//! methods, rewrite, auth, CORS, rate limit, timeout, body limit). Parsed and validated here;
//! compiled and enforced by the gateway. Errors name the field, e.g. `routes[0].rate_limit.rps`.

use crate::spec::{
    duration_value, err, int_value, kind, ser_duration, ser_size, size_value, SpecError,
};
use crate::MAX_PAYLOAD_BYTES;
use serde::Serialize;
use serde_json::{Map, Value};
use std::time::Duration;

/// Most routes a function may declare.
pub const ROUTES_MAX: usize = 64;
/// Default and largest `max_body` of a route.
pub const ROUTE_MAX_BODY_DEFAULT: u64 = MAX_PAYLOAD_BYTES as u64;
/// Largest `rate_limit.rps` and `rate_limit.burst`.
pub const RATE_MAX: u32 = 1_000_000;
/// Largest `cors.max_age`, seconds.
pub const CORS_MAX_AGE_MAX: u32 = 86_400;
/// Methods a route may list.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// One route of a function's HTTP triggers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Path prefix matched on whole segments, normalized without a trailing `/` (root is `/`).
    pub path_prefix: String,
    /// Allowed methods, upper case; empty = any method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Replaces the matched prefix in the `rawPath` the function sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Upstream timeout (≤ the function's `timeout`); `None` = the function's.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub timeout: Option<Duration>,
    /// Largest request body, bytes.
    #[serde(serialize_with = "ser_size")]
    pub max_body: u64,
}

impl Route {
    /// The route used when a spec has no `routes:`: `/`, any method, no checks.
    pub fn open_default() -> Route {
        Route {
            path_prefix: "/".into(),
            methods: Vec::new(),
            rewrite_prefix: None,
            auth: None,
            cors: None,
            rate_limit: None,
            timeout: None,
            max_body: ROUTE_MAX_BODY_DEFAULT,
        }
    }
}

/// Who may call a route. Secrets are kept only as SHA-256 digests (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RouteAuth {
    /// `Authorization: Bearer <token>` with `sha256(token)` in the list.
    Bearer { tokens_sha256: Vec<String> },
    /// Header `name` (stored lower case) whose value's digest is in the list.
    Header {
        name: String,
        values_sha256: Vec<String>,
    },
}

/// Cross-origin policy of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`) or `["*"]`.
    pub allow_origins: Vec<String>,
    /// Empty = the route's methods (or the common ones when the route allows any).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Lower case; `*` allows any requested header.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    pub allow_credentials: bool,
}

/// Token bucket: `rps` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub rps: u32,
    pub burst: u32,
}

fn ser_opt_duration<S: serde::Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn mapping<'a>(
    v: &'a Value,
    field: &str,
    allowed: &[&str],
) -> Result<&'a Map<String, Value>, SpecError> {
    let map = v.as_object().ok_or_else(|| {
        err(
            field,
            format!(
                "must be a mapping of {}, got {}",
                allowed.join(", "),
                kind(v)
            ),
        )
    })?;
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(err(
                format!("{field}.{key}"),
                format!("unknown field (allowed: {})", allowed.join(", ")),
            ));
        }
    }
    Ok(map)
}

fn present<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn string_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| err(field, format!("must be a list of strings, got {}", kind(v))))?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(format!("{field}[{i}]"), "must be a string"))
        })
        .collect()
}

/// Validates a path or prefix: `/`-rooted, visible ASCII, no `?`/`#`, no empty, `.` or `..`
/// segments. Returns it without a trailing `/` (the root stays `/`).
fn path_value(v: Option<&Value>, field: &str) -> Result<Option<String>, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let s = v
        .as_str()
        .ok_or_else(|| err(field, format!("must be a path like /api, got {}", kind(v))))?;
    if !s.starts_with('/') || s.len() > 1024 {
        return Err(err(
            field,
            "must start with `/` and be at most 1024 characters",
        ));
    }
    if s.bytes()
        .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#' || b == b'%')
    {
        return Err(err(
            field,
            "must be plain visible ASCII without `?`, `#` or `%`",
        ));
    }
    let trimmed = if s.len() > 1 {
        s.strip_suffix('/').unwrap_or(s)
    } else {
        s
    };
    if trimmed != "/"
        && trimmed[1..]
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(err(field, "must not contain empty, `.` or `..` segments"));
    }
    Ok(Some(trimmed.to_string()))
}

fn method_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, SpecError> {
    let present = v.is_some_and(|v| !v.is_null());
    let mut out: Vec<String> = Vec::new();
    for (i, m) in string_list(v, field)?.into_iter().enumerate() {
        let up = m.to_ascii_uppercase();
        if !METHODS.contains(&up.as_str()) {
            return Err(err(
                format!("{field}[{i}]"),
                format!("`{m}` is not one of {}", METHODS.join(", ")),
            ));
        }
        if !out.contains(&up) {
            out.push(up);
        }
    }
    if present && out.is_empty() {
        return Err(err(
            field,
            "must list at least one method (leave it out to allow any)",
        ));
    }
    Ok(out)
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn header_list(v: Option<&Value>, field: &str, star: bool) -> Result<Vec<String>, SpecError> {
    let list = string_list(v, field)?;
    let mut out = Vec::with_capacity(list.len());
    for (i, h) in list.into_iter().enumerate() {
        if !(valid_header_name(&h) || star && h == "*") {
            return Err(err(
                format!("{field}[{i}]"),
                format!("`{h}` is not a valid header name"),
            ));
        }
        out.push(h.to_ascii_lowercase());
    }
    Ok(out)
}

fn digest_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, SpecError> {
    if v.is_none_or(Value::is_null) {
        return Err(err(
            field,
            "is required: SHA-256 digests (hex) of the accepted secrets, from `printf %s SECRET | sha256sum`",
        ));
    }
    let list = string_list(v, field)?;
    if list.is_empty() {
        return Err(err(field, "must list at least one SHA-256 digest"));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, d)| {
            if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(d.to_ascii_lowercase())
            } else {
                Err(err(
                    format!("{field}[{i}]"),
                    "must be a SHA-256 digest, 64 hex characters (`printf %s SECRET | sha256sum`); plaintext secrets are not accepted",
                ))
            }
        })
        .collect()
}

fn parse_auth(v: &Value, field: &str) -> Result<RouteAuth, SpecError> {
    let map = mapping(
        v,
        field,
        &["type", "tokens_sha256", "name", "values_sha256"],
    )?;
    let ty = match present(map, "type") {
        Some(Value::String(t)) => t.as_str(),
        _ => {
            return Err(err(
                format!("{field}.type"),
                "is required: bearer or header",
            ))
        }
    };
    let only = |allowed: &[&str]| -> Result<(), SpecError> {
        for key in map.keys() {
            if key != "type" && !allowed.contains(&key.as_str()) {
                return Err(err(
                    format!("{field}.{key}"),
                    format!("is not a field of auth type `{ty}`"),
                ));
            }
        }
        Ok(())
    };
    match ty {
        "bearer" => {
            only(&["tokens_sha256"])?;
            Ok(RouteAuth::Bearer {
                tokens_sha256: digest_list(
                    map.get("tokens_sha256"),
                    &format!("{field}.tokens_sha256"),
                )?,
            })
        }
        "header" => {
            only(&["name", "values_sha256"])?;
            let name = match present(map, "name") {
                Some(Value::String(n)) if valid_header_name(n) => n.to_ascii_lowercase(),
                _ => {
                    return Err(err(
                        format!("{field}.name"),
                        "is required: a header name such as X-Api-Key",
                    ))
                }
            };
            Ok(RouteAuth::Header {
                name,
                values_sha256: digest_list(
                    map.get("values_sha256"),
                    &format!("{field}.values_sha256"),
                )?,
            })
        }
        other => Err(err(
            format!("{field}.type"),
            format!("`{other}` is not one of bearer, header"),
        )),
    }
}

fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

fn parse_cors(v: &Value, field: &str, route_methods: &[String]) -> Result<Cors, SpecError> {
    let map = mapping(
        v,
        field,
        &[
            "allow_origins",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
        ],
    )?;
    let f = |k: &str| format!("{field}.{k}");
    let origins = string_list(map.get("allow_origins"), &f("allow_origins"))?;
    if origins.is_empty() {
        return Err(err(
            f("allow_origins"),
            "is required: a list of origins such as https://app.example.com, or [\"*\"]",
        ));
    }
    let any = origins.iter().any(|o| o == "*");
    if any && origins.len() > 1 {
        return Err(err(f("allow_origins"), "`*` must be the only entry"));
    }
    let mut allow_origins = Vec::with_capacity(origins.len());
    for (i, o) in origins.into_iter().enumerate() {
        if !any && !valid_origin(&o) {
            return Err(err(
                format!("{}[{i}]", f("allow_origins")),
                format!("`{o}` is not an origin like https://app.example.com (no path)"),
            ));
        }
        allow_origins.push(o.to_ascii_lowercase());
    }
    let allow_methods = method_list(map.get("allow_methods"), &f("allow_methods"))?;
    if !route_methods.is_empty() {
        if let Some((i, m)) = allow_methods
            .iter()
            .enumerate()
            .find(|(_, m)| !route_methods.contains(m))
        {
            return Err(err(
                format!("{}[{i}]", f("allow_methods")),
                format!("`{m}` is not one of the route's methods"),
            ));
        }
    }
    let allow_headers = header_list(map.get("allow_headers"), &f("allow_headers"), true)?;
    let expose_headers = header_list(map.get("expose_headers"), &f("expose_headers"), false)?;
    let max_age = match present(map, "max_age") {
        None => None,
        Some(v) => Some(int_value(Some(v), &f("max_age"), 0, 0, CORS_MAX_AGE_MAX)?),
    };
    let allow_credentials = match present(map, "allow_credentials") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err(f("allow_credentials"), "must be true or false")),
    };
    if allow_credentials && any {
        return Err(err(
            f("allow_credentials"),
            "cannot be true with allow_origins [\"*\"]: list the origins",
        ));
    }
    Ok(Cors {
        allow_origins,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
    })
}

fn parse_route(v: &Value, field: &str, fn_timeout: Duration) -> Result<Route, SpecError> {
    let map = mapping(
        v,
        field,
        &[
            "path_prefix",
            "methods",
            "rewrite_prefix",
            "auth",
            "cors",
            "rate_limit",
            "timeout",
            "max_body",
        ],
    )?;
    let f = |k: &str| format!("{field}.{k}");
    let path_prefix = path_value(map.get("path_prefix"), &f("path_prefix"))?
        .ok_or_else(|| err(f("path_prefix"), "is required (e.g. / or /api)"))?;
    let methods = method_list(map.get("methods"), &f("methods"))?;
    let rewrite_prefix = path_value(map.get("rewrite_prefix"), &f("rewrite_prefix"))?;
    let auth = present(map, "auth")
        .map(|v| parse_auth(v, &f("auth")))
        .transpose()?;
    let cors = present(map, "cors")
        .map(|v| parse_cors(v, &f("cors"), &methods))
        .transpose()?;
    let rate_limit = match present(map, "rate_limit") {
        None => None,
        Some(v) => {
            let rl = f("rate_limit");
            let m = mapping(v, &rl, &["rps", "burst"])?;
            if present(m, "rps").is_none() {
                return Err(err(format!("{rl}.rps"), "is required"));
            }
            let rps = int_value(m.get("rps"), &format!("{rl}.rps"), 1, 1, RATE_MAX)?;
            let burst = int_value(m.get("burst"), &format!("{rl}.burst"), rps, 1, RATE_MAX)?;
            Some(RateLimit { rps, burst })
        }
    };
    let timeout = match present(map, "timeout") {
        None => None,
        Some(v) => Some(duration_value(
            Some(v),
            &f("timeout"),
            fn_timeout,
            Duration::from_millis(1),
            fn_timeout,
        )?),
    };
    let max_body = size_value(
        map.get("max_body"),
        &f("max_body"),
        ROUTE_MAX_BODY_DEFAULT,
        0,
        ROUTE_MAX_BODY_DEFAULT,
    )?;
    Ok(Route {
        path_prefix,
        methods,
        rewrite_prefix,
        auth,
        cors,
        rate_limit,
        timeout,
        max_body,
    })
}

/// Parses `routes:`; `fn_timeout` bounds each route's `timeout`.
pub(crate) fn parse_routes(
    v: Option<&Value>,
    fn_timeout: Duration,
) -> Result<Option<Vec<Route>>, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = v.as_array().ok_or_else(|| {
        err(
            "routes",
            format!("must be a list of routes, got {}", kind(v)),
        )
    })?;
    if list.len() > ROUTES_MAX {
        return Err(err(
            "routes",
            format!("has {} routes; at most {ROUTES_MAX} allowed", list.len()),
        ));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = format!("routes[{i}]");
        let route = parse_route(item, &field, fn_timeout)?;
        if let Some(j) = routes
            .iter()
            .position(|r| r.path_prefix == route.path_prefix)
        {
            return Err(err(
                format!("{field}.path_prefix"),
                format!("`{}` is already routes[{j}]", route.path_prefix),
            ));
        }
        routes.push(route);
    }
    Ok(Some(routes))
}

#[cfg(test)]
mod tests {
    use crate::spec::FunctionSpec;
    use serde_json::json;

    const D: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn spec(routes: serde_json::Value) -> Result<FunctionSpec, crate::SpecError> {
        FunctionSpec::from_value(&json!({
            "name": "fx", "runtime": "python3", "timeout": "3s", "routes": routes
        }))
    }

    #[test]
    fn full_routes_round_trip() {
        let s = spec(json!([
            {"path_prefix": "/api/", "methods": ["get", "POST"], "rewrite_prefix": "/v2",
             "auth": {"type": "bearer", "tokens_sha256": [D.to_uppercase()]},
             "cors": {"allow_origins": ["https://App.example.com"], "allow_methods": ["GET"],
                      "allow_headers": ["Authorization", "X-Trace"], "expose_headers": ["x-skiff-request-id"],
                      "max_age": 600, "allow_credentials": true},
             "rate_limit": {"rps": 5}, "timeout": "500ms", "max_body": "1Mi"},
            {"path_prefix": "/", "auth": {"type": "header", "name": "X-Api-Key", "values_sha256": [D]}},
        ]))
        .unwrap();
        let r = s.routes.as_ref().unwrap();
        assert_eq!(r[0].path_prefix, "/api");
        assert_eq!(r[0].methods, ["GET", "POST"]);
        assert_eq!(r[0].rate_limit.unwrap().burst, 5, "burst defaults to rps");
        assert_eq!(r[0].max_body, 1 << 20);
        assert_eq!(r[1].max_body, super::ROUTE_MAX_BODY_DEFAULT);
        match &r[0].auth {
            Some(super::RouteAuth::Bearer { tokens_sha256 }) => assert_eq!(tokens_sha256[0], D),
            other => panic!("{other:?}"),
        }
        let again = FunctionSpec::from_value(&s.to_value()).unwrap();
        assert_eq!(s, again);
        // No routes key: absent from the stored form too.
        let plain = FunctionSpec::from_value(&json!({"name": "fx", "runtime": "python3"})).unwrap();
        assert!(plain.routes.is_none());
        assert!(plain.to_value().get("routes").is_none());
    }

    #[test]
    fn route_errors_name_the_field() {
        let cases = [
            (json!({}), "routes"),
            (json!([{"methods": ["GET"]}]), "routes[0].path_prefix"),
            (json!([{"path_prefix": "api"}]), "routes[0].path_prefix"),
            (json!([{"path_prefix": "/a/../b"}]), "routes[0].path_prefix"),
            (json!([{"path_prefix": "/a%2f"}]), "routes[0].path_prefix"),
            (json!([{"path_prefix": "/", "bogus": 1}]), "routes[0].bogus"),
            (
                json!([{"path_prefix": "/"}, {"path_prefix": "/"}]),
                "routes[1].path_prefix",
            ),
            (
                json!([{"path_prefix": "/", "methods": ["FETCH"]}]),
                "routes[0].methods[0]",
            ),
            (
                json!([{"path_prefix": "/", "methods": []}]),
                "routes[0].methods",
            ),
            (
                json!([{"path_prefix": "/", "rate_limit": {"rps": 0}}]),
                "routes[0].rate_limit.rps",
            ),
            (
                json!([{"path_prefix": "/", "rate_limit": {"burst": 2}}]),
                "routes[0].rate_limit.rps",
            ),
            (
                json!([{"path_prefix": "/", "rate_limit": {"rps": 1, "burst": -1}}]),
                "routes[0].rate_limit.burst",
            ),
            (
                json!([{"path_prefix": "/", "timeout": "4s"}]),
                "routes[0].timeout",
            ),
            (
                json!([{"path_prefix": "/", "max_body": "7Mi"}]),
                "routes[0].max_body",
            ),
            (
                json!([{"path_prefix": "/", "auth": {"type": "basic"}}]),
                "routes[0].auth.type",
            ),
            (
                json!([{"path_prefix": "/", "auth": {"type": "bearer", "tokens_sha256": ["hunter2"]}}]),
                "routes[0].auth.tokens_sha256[0]",
            ),
            (
                json!([{"path_prefix": "/", "auth": {"type": "bearer"}}]),
                "routes[0].auth.tokens_sha256",
            ),
            (
                json!([{"path_prefix": "/", "auth": {"type": "bearer", "name": "x", "tokens_sha256": [D]}}]),
                "routes[0].auth.name",
            ),
            (
                json!([{"path_prefix": "/", "auth": {"type": "header", "values_sha256": [D]}}]),
                "routes[0].auth.name",
            ),
            (
                json!([{"path_prefix": "/", "cors": {}}]),
                "routes[0].cors.allow_origins",
            ),
            (
                json!([{"path_prefix": "/", "cors": {"allow_origins": ["*", "https://a.b"]}}]),
                "routes[0].cors.allow_origins",
            ),
            (
                json!([{"path_prefix": "/", "cors": {"allow_origins": ["https://a.b/path"]}}]),
                "routes[0].cors.allow_origins[0]",
            ),
            (
                json!([{"path_prefix": "/", "cors": {"allow_origins": ["*"], "allow_credentials": true}}]),
                "routes[0].cors.allow_credentials",
            ),
            (
                json!([{"path_prefix": "/", "cors": {"allow_origins": ["*"], "max_age": 100000}}]),
                "routes[0].cors.max_age",
            ),
            (
                json!([{"path_prefix": "/", "methods": ["GET"], "cors": {"allow_origins": ["*"], "allow_methods": ["PUT"]}}]),
                "routes[0].cors.allow_methods[0]",
            ),
            (
                json!([{"path_prefix": "/", "cors": {"allow_origins": ["*"], "allow_headers": ["bad header"]}}]),
                "routes[0].cors.allow_headers[0]",
            ),
        ];
        for (routes, field) in cases {
            let e = spec(routes.clone()).unwrap_err();
            assert_eq!(e.field, field, "{routes} gave {e}");
        }
        let e = spec(json!([{"path_prefix": "/", "timeout": "4s"}])).unwrap_err();
        assert!(e.message.contains("3s"), "{e}");
    }
}
