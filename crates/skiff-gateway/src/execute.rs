//! Seed-compatible ad-hoc JavaScript (the Kalpana edge runtime API): `POST /execute` runs the
//! ES module in `code` once, in a fresh QuickJS isolate ([`skiff_js::execute`]), calling the
//! export `handler` with `request`.
//!
//! Replies: `200 {success: true, result: {statusCode, headers, body}, duration}`; problems of
//! the code itself (syntax error, missing export, a throw, the timeout, the memory limit) are
//! also 200, as `{success: false, error, stack, duration}` — the request was served, the code
//! failed. Problems of the request (bad JSON, a field out of range) are 400 `{success: false,
//! error, field}`. `duration` is milliseconds.

use crate::error::{ApiError, ApiResult};
use crate::invoke::read_json;
use axum::body::Body;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Map, Value};
use skiff_core::MAX_PAYLOAD_BYTES;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Default and bounds of `timeout` (seconds).
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
pub const TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=30;
/// Default and bounds of `memory` (MB).
pub const DEFAULT_MEMORY_MB: u64 = 128;
pub const MEMORY_MB: std::ops::RangeInclusive<u64> = 64..=512;
/// Isolates running at once for `/execute`; more are answered 429.
pub const MAX_CONCURRENT: usize = 16;
const MAX_BODY: usize = MAX_PAYLOAD_BYTES + (64 << 10);

static SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT);

/// `POST /execute`.
pub async fn execute(headers: HeaderMap, body: Body) -> ApiResult<Json<Value>> {
    let body: Value = read_json(&headers, body, MAX_BODY)
        .await
        .map_err(ApiError::execute)?;
    let job = parse(&body).map_err(ApiError::execute)?;
    let Ok(_slot) = SLOTS.try_acquire() else {
        return Err(
            ApiError::busy(format!("{MAX_CONCURRENT} executions are already running")).execute(),
        );
    };
    let started = Instant::now();
    let outcome = skiff_js::execute(job).await;
    let duration = started.elapsed().as_millis() as u64;
    Ok(Json(match outcome {
        Ok(text) => {
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            json!({"success": true, "result": response_of(value), "duration": duration})
        }
        Err(e) => json!({
            "success": false,
            "error": e.message,
            "stack": e.stack,
            "duration": duration,
        }),
    }))
}

/// Validates the request into a job; errors name the field.
fn parse(body: &Value) -> Result<skiff_js::AdHoc, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    let code = match obj.get("code") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(ApiError::invalid_field(
                "code",
                "code must be a non-empty string (an ES module)",
            ))
        }
    };
    let export = match obj.get("handler") {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) if is_identifier(s) => s.clone(),
        _ => {
            return Err(ApiError::invalid_field(
                "handler",
                "handler must name an exported function (an identifier, default `default`)",
            ))
        }
    };
    let request = match obj.get("request") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        _ => {
            return Err(ApiError::invalid_field(
                "request",
                "request must be an object {method, url, headers, body, query}",
            ))
        }
    };
    let mut arg = Map::new();
    arg.insert("method".into(), json!("GET"));
    arg.insert("url".into(), json!("/"));
    arg.insert("headers".into(), json!({}));
    arg.insert("body".into(), Value::Null);
    arg.insert("query".into(), json!({}));
    arg.extend(request);
    let env = match obj.get("envVars") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => {
            let mut env = Vec::with_capacity(m.len());
            for (k, v) in m {
                let Some(v) = v.as_str() else {
                    return Err(ApiError::invalid_field(
                        "envVars",
                        format!("envVars.{k} must be a string"),
                    ));
                };
                env.push((k.clone(), v.to_string()));
            }
            env
        }
        _ => {
            return Err(ApiError::invalid_field(
                "envVars",
                "envVars must be an object of strings",
            ))
        }
    };
    let timeout = bounded(
        obj,
        "timeout",
        DEFAULT_TIMEOUT_SECS,
        TIMEOUT_SECS,
        "seconds",
    )?;
    let memory = bounded(obj, "memory", DEFAULT_MEMORY_MB, MEMORY_MB, "MB")?;
    Ok(skiff_js::AdHoc {
        code,
        export,
        arg_json: Value::Object(arg).to_string(),
        env,
        timeout: Duration::from_secs(timeout),
        memory: memory << 20,
    })
}

/// An optional integer field within `range`.
fn bounded(
    obj: &Map<String, Value>,
    field: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> Result<u64, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(n),
            _ => Err(ApiError::invalid_field(
                field,
                format!(
                    "{field} must be an integer from {} to {} ({unit}), got {v}",
                    range.start(),
                    range.end()
                ),
            )),
        },
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// The handler's return value as `{statusCode, headers, body}`: an object with `statusCode`
/// keeps its fields (`headers` default `{}`, a non-string `body` is JSON-encoded); any other
/// value is a 200 whose body is the value (JSON-encoded unless it is a string).
fn response_of(value: Value) -> Value {
    let text = |v: Value| match v {
        Value::String(s) => Value::String(s),
        Value::Null => Value::String(String::new()),
        v => Value::String(v.to_string()),
    };
    match value {
        Value::Object(mut m) if m.contains_key("statusCode") => {
            let status = m
                .get("statusCode")
                .and_then(Value::as_u64)
                .filter(|s| (100..=599).contains(s))
                .unwrap_or(200);
            let headers = match m.remove("headers") {
                Some(Value::Object(h)) => Value::Object(h),
                _ => json!({}),
            };
            let body = text(m.remove("body").unwrap_or(Value::Null));
            json!({"statusCode": status, "headers": headers, "body": body})
        }
        v => json!({"statusCode": 200, "headers": {}, "body": text(v)}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_defaults_and_bounds() {
        let job = parse(&json!({"code": "export default () => 1"})).unwrap();
        assert_eq!(job.export, "default");
        assert_eq!(job.timeout, Duration::from_secs(10));
        assert_eq!(job.memory, 128 << 20);
        let arg: Value = serde_json::from_str(&job.arg_json).unwrap();
        assert_eq!(arg["method"], "GET");
        for (field, v) in [
            ("timeout", json!(0)),
            ("timeout", json!(31)),
            ("memory", json!(63)),
            ("memory", json!(513)),
            ("handler", json!("a b")),
            ("envVars", json!({"A": 1})),
        ] {
            let mut body = json!({"code": "x"});
            body[field] = v;
            let e = parse(&body).unwrap_err();
            assert_eq!(e.extra["field"], field);
        }
    }

    #[test]
    fn response_shapes() {
        assert_eq!(
            response_of(json!({"statusCode": 201, "body": {"a": 1}})),
            json!({"statusCode": 201, "headers": {}, "body": "{\"a\":1}"})
        );
        assert_eq!(
            response_of(json!("hi")),
            json!({"statusCode": 200, "headers": {}, "body": "hi"})
        );
    }
}
