//! The AWS Lambda Invoke API (`POST /2015-03-31/functions/{FunctionName}/invocations`), so
//! AWS SDKs and the AWS CLI invoke Skiff functions unchanged: function names, `name:qualifier`
//! and full or partial ARNs; `RequestResponse`, `Event` and `DryRun`; `X-Amz-Log-Type: Tail`;
//! `X-Amz-Client-Context`; function errors as `200` + `X-Amz-Function-Error`; service errors
//! as Lambda's exceptions (see [`LambdaError`]).

use crate::error::{ApiError, LambdaError};
use crate::events::MAX_EVENT_PAYLOAD_BYTES;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use skiff_core::{ErrorKind, Invocation, MAX_PAYLOAD_BYTES};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of log tail returned by `X-Amz-Log-Type: Tail` (as on AWS).
const LOG_TAIL_BYTES: usize = 4096;
/// Largest `X-Amz-Client-Context` after decoding (AWS: 3583 bytes).
const MAX_CLIENT_CONTEXT_BYTES: usize = 3583;

#[derive(Deserialize)]
pub struct InvokeQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

/// `FunctionName` split into the function's name and the qualifier it carries, if any.
/// Accepts `name`, `name:qualifier`, `account:function:name[:qualifier]` and
/// `arn:aws:lambda:region:account:function:name[:qualifier]`.
pub fn parse_function_name(s: &str) -> Result<(&str, Option<&str>), LambdaError> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, qualifier) = match parts.as_slice() {
        [name] => (*name, None),
        [name, q] => (*name, Some(*q)),
        [_, "function", name] => (*name, None),
        [_, "function", name, q] => (*name, Some(*q)),
        ["arn", _, "lambda", _, _, "function", name] => (*name, None),
        ["arn", _, "lambda", _, _, "function", name, q] => (*name, Some(*q)),
        _ => {
            return Err(LambdaError::invalid_parameter(format!(
            "FunctionName `{s}` is not a function name, `name:qualifier` or a Lambda function ARN"
        )))
        }
    };
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_name {
        return Err(LambdaError::invalid_parameter(format!(
            "FunctionName: `{name}` is not a valid function name (1-64 of a-z, A-Z, 0-9, - and _)"
        )));
    }
    if let Some(q) = qualifier {
        check_qualifier(q)?;
    }
    Ok((name, qualifier))
}

fn check_qualifier(q: &str) -> Result<(), LambdaError> {
    let ok = !q.is_empty()
        && q.len() <= 128
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'$');
    if ok {
        Ok(())
    } else {
        Err(LambdaError::invalid_parameter(format!(
            "Qualifier: `{q}` is not a valid alias or version"
        )))
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Decodes a client context header (base64 of a JSON object, as `X-Amz-Client-Context`) to
/// the JSON text functions get. `Err` is a message naming the header.
pub(crate) fn client_context(h: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    let Some(raw) = h.get(name) else {
        return Ok(None);
    };
    let bad = |why: &str| format!("{name}: {why}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.as_bytes())
        .map_err(|_| bad("is not valid base64"))?;
    if bytes.len() > MAX_CLIENT_CONTEXT_BYTES {
        return Err(bad("exceeds 3583 bytes"));
    }
    let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 JSON"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| bad(&format!("is not valid JSON: {e}")))?;
    Ok(Some(text))
}

/// The invocation's log tail as AWS returns it: `START`, the function's output, `END` and a
/// `REPORT` line, cut to the last 4 KB.
#[allow(clippy::too_many_arguments)]
fn log_result(
    request_id: &str,
    version: u32,
    logs: &[u8],
    duration: Duration,
    memory_mb: u64,
    max_memory: Option<u64>,
    init: Option<Duration>,
    status: Option<(&str, &str)>,
) -> String {
    let head = format!("START RequestId: {request_id} Version: {version}\n");
    let ms = duration.as_secs_f64() * 1e3;
    let mut tail = format!("END RequestId: {request_id}\n");
    let _ = write!(
        tail,
        "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {} ms\t\
         Memory Size: {memory_mb} MB\tMax Memory Used: {} MB\t",
        ms.ceil().max(1.0) as u64,
        max_memory.map_or(0, |b| b.div_ceil(1 << 20)),
    );
    if let Some(init) = init {
        let _ = write!(tail, "Init Duration: {:.2} ms\t", init.as_secs_f64() * 1e3);
    }
    if let Some((status, error_type)) = status {
        let _ = write!(tail, "Status: {status}\tError Type: {error_type}\t");
    }
    tail.push('\n');
    let mut out = Vec::with_capacity(head.len() + logs.len() + tail.len() + 1);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(logs);
    if !logs.is_empty() && !logs.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(tail.as_bytes());
    let mut start = out.len().saturating_sub(LOG_TAIL_BYTES);
    // Do not start inside a UTF-8 sequence.
    while start < out.len() && (out[start] & 0xC0) == 0x80 {
        start += 1;
    }
    base64::engine::general_purpose::STANDARD.encode(&out[start..])
}

/// Lambda's error for `e`, with AWS's "Function not found: ARN" message for a missing
/// function, alias or revision.
fn lambda_not_found(e: ApiError, name: &str, qualifier: Option<&str>) -> LambdaError {
    let mut e = LambdaError::from(e);
    if e.name == "ResourceNotFoundException" {
        e.message = format!(
            "Function not found: {}",
            skiff_core::launch::function_arn(name, qualifier)
        );
    }
    e
}

fn hv(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("-"))
}

/// `POST /2015-03-31/functions/{FunctionName}/invocations`.
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(function_name): Path<String>,
    Query(q): Query<InvokeQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, LambdaError> {
    // The body first: an error answered with the body unread ends the connection (it cannot
    // be reused), and a client that reuses it meanwhile sees it reset.
    let inv_type = header_str(&headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    let limit = if inv_type == "Event" {
        MAX_EVENT_PAYLOAD_BYTES
    } else {
        MAX_PAYLOAD_BYTES
    };
    let payload = crate::invoke::read_body(&headers, body, limit)
        .await
        .map_err(|e| {
            let mut e = LambdaError::from(e);
            if e.name == "RequestTooLargeException" {
                e.message = format!(
                    "Request must be smaller than {limit} bytes for the {} operation",
                    if inv_type == "Event" {
                        "InvokeAsync"
                    } else {
                        "InvokeFunction"
                    }
                );
            }
            e
        })?;
    let (name, from_name) = parse_function_name(&function_name)?;
    let qualifier = match (from_name, q.qualifier.as_deref().filter(|q| !q.is_empty())) {
        (Some(a), Some(b)) if a != b => return Err(LambdaError::invalid_parameter(
            "The derived qualifier from the function name does not match the specified qualifier.",
        )),
        (Some(a), _) => Some(a),
        (None, Some(b)) => {
            check_qualifier(b)?;
            Some(b)
        }
        (None, None) => None,
    };
    if !matches!(inv_type, "RequestResponse" | "Event" | "DryRun") {
        return Err(LambdaError::invalid_parameter(format!(
            "X-Amz-Invocation-Type: `{inv_type}` is not one of RequestResponse, Event, DryRun"
        )));
    }
    let tail = match header_str(&headers, "x-amz-log-type") {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(LambdaError::invalid_parameter(format!(
                "X-Amz-Log-Type: `{other}` is not one of None, Tail"
            )))
        }
    };
    let not_found = |e: ApiError| lambda_not_found(e, name, qualifier);
    let sticky = crate::revisions::sticky_key(&headers);
    let rev = crate::revisions::resolve_sticky(&state, name, qualifier, sticky)
        .await
        .map_err(not_found)?;
    let client_context = client_context(&headers, "x-amz-client-context").map_err(|m| {
        LambdaError::new(StatusCode::BAD_REQUEST, "InvalidRequestContentException", m)
    })?;
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        bytes::Bytes::from_static(b"{}")
    } else {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
            return Err(LambdaError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                format!("Could not parse request body into json: {e}"),
            ));
        }
        payload
    };
    match inv_type {
        "DryRun" => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut()
                .insert("x-amz-executed-version", hv(rev.number));
            return Ok(r);
        }
        "Event" => {
            let id = crate::events::accept(
                &state,
                name,
                qualifier.map(str::to_string),
                payload,
                client_context,
            )
            .await
            .map_err(not_found)?;
            let mut r = StatusCode::ACCEPTED.into_response();
            r.headers_mut().insert("x-amzn-requestid", hv(id));
            return Ok(r);
        }
        _ => {}
    }
    let request_id = crate::exec::request_id();
    let inv = Invocation {
        request_id: request_id.clone(),
        function: name.to_string(),
        qualifier: qualifier.map(str::to_string),
        payload: payload.into(),
        client_context,
        trace_id: header_str(&headers, "x-amzn-trace-id").map(str::to_string),
    };
    let t0 = Instant::now();
    let memory_mb = rev.spec.memory >> 20;
    let (status, body, function_error, log) = match crate::exec::run_opts(
        &state,
        &rev,
        inv,
        skiff_scheduler::InvokeOptions {
            wait_for_capacity: false,
            timeout: None,
        },
    )
    .await
    {
        Ok(out) => {
            // The Invoke API returns whole payloads; a streamed one is collected.
            let out = out.collect().await;
            let fe = out.function_error.as_ref().map(|fe| {
                if fe.reported_as == "Handled" {
                    "Handled"
                } else {
                    "Unhandled"
                }
            });
            let log = tail.then(|| {
                log_result(
                    &request_id,
                    rev.number,
                    &out.logs,
                    out.duration,
                    memory_mb,
                    out.max_memory,
                    out.init_duration,
                    out.function_error
                        .as_ref()
                        .map(|fe| ("error", fe.error_type.as_str())),
                )
            });
            (StatusCode::OK, out.body, fe, log)
        }
        Err(o) => {
            // AWS reports sandbox failures of a synchronous call as an unhandled function
            // error (200); only throttling and service faults are HTTP errors.
            let (error_type, status) = match o.kind {
                ErrorKind::Timeout => ("Sandbox.Timedout", "timeout"),
                ErrorKind::OutOfMemory => ("Runtime.OutOfMemory", "error"),
                ErrorKind::Crashed => ("Runtime.ExitError", "error"),
                ErrorKind::Throttled => {
                    return Err(LambdaError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "TooManyRequestsException",
                        format!("Rate Exceeded: {}", o.message),
                    ))
                }
                ErrorKind::StartFailed => {
                    return Err(LambdaError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ServiceException",
                        o.message,
                    ))
                }
            };
            let body = serde_json::to_vec(&serde_json::json!({
                "errorType": error_type,
                "errorMessage": format!("RequestId: {request_id} Error: {}", o.message),
            }))
            .unwrap_or_default();
            let log = tail.then(|| {
                log_result(
                    &request_id,
                    rev.number,
                    o.log_tail.as_bytes(),
                    t0.elapsed(),
                    memory_mb,
                    None,
                    None,
                    Some((status, error_type)),
                )
            });
            (StatusCode::OK, body, Some("Unhandled"), log)
        }
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("x-amzn-requestid", hv(&request_id));
    h.insert("x-amz-executed-version", hv(rev.number));
    if let Some(fe) = function_error {
        h.insert("x-amz-function-error", HeaderValue::from_static(fe));
    }
    if let Some(log) = log {
        h.insert("x-amz-log-result", hv(log));
    }
    Ok(resp)
}

/// Lambda's `FunctionConfiguration` for one revision.
fn configuration(rec: &skiff_store::RevisionRecord, qualifier: Option<&str>) -> serde_json::Value {
    let spec = &rec.spec;
    let sha = hex_to_base64(&rec.package_sha256);
    // Lambda writes `2026-11-25T20:09:42.000+0000`.
    let modified = skiff_core::units::rfc3339_ms(rec.created_at_ms).replace('Z', "+0000");
    serde_json::json!({
        "FunctionName": rec.function,
        "FunctionArn": skiff_core::launch::function_arn(&rec.function, qualifier),
        "Runtime": spec.runtime.as_str(),
        "Handler": spec.handler,
        "CodeSize": rec.package_size,
        "CodeSha256": sha,
        "Description": "",
        "Timeout": spec.timeout.as_secs().max(1),
        "MemorySize": spec.memory >> 20,
        "LastModified": modified,
        "Version": rec.number.to_string(),
        "Environment": {"Variables": spec.env},
        "EphemeralStorage": {"Size": spec.tmp >> 20},
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": [std::env::consts::ARCH],
    })
}

fn hex_to_base64(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn revision_record(
    state: &Arc<AppState>,
    function_name: &str,
    query_qualifier: Option<&str>,
) -> Result<(skiff_store::RevisionRecord, Option<String>), LambdaError> {
    let (name, from_name) = parse_function_name(function_name)?;
    let qualifier = from_name.or(query_qualifier.filter(|q| !q.is_empty()));
    if let Some(q) = qualifier {
        check_qualifier(q)?;
    }
    let st = state.clone();
    let (n, q) = (name.to_string(), qualifier.map(str::to_string));
    let q2 = q.clone();
    let rec = crate::blocking(move || Ok(st.store.resolve(&n, q2.as_deref())?))
        .await
        .map_err(|e| lambda_not_found(e, name, qualifier))?;
    Ok((rec, q))
}

/// `GET /2015-03-31/functions/{FunctionName}` (GetFunction).
pub async fn get_function(
    State(state): State<Arc<AppState>>,
    Path(function_name): Path<String>,
    Query(q): Query<InvokeQuery>,
) -> Result<Response, LambdaError> {
    let (rec, qualifier) = revision_record(&state, &function_name, q.qualifier.as_deref()).await?;
    Ok(axum::Json(serde_json::json!({
        "Configuration": configuration(&rec, qualifier.as_deref()),
        "Code": {"RepositoryType": "Skiff"},
    }))
    .into_response())
}

/// `GET /2015-03-31/functions/{FunctionName}/configuration` (GetFunctionConfiguration).
pub async fn get_configuration(
    State(state): State<Arc<AppState>>,
    Path(function_name): Path<String>,
    Query(q): Query<InvokeQuery>,
) -> Result<Response, LambdaError> {
    let (rec, qualifier) = revision_record(&state, &function_name, q.qualifier.as_deref()).await?;
    Ok(axum::Json(configuration(&rec, qualifier.as_deref())).into_response())
}

/// `GET /2015-03-31/functions/` (ListFunctions): the `production` revision of every deployed
/// function, in one page.
pub async fn list_functions(State(state): State<Arc<AppState>>) -> Result<Response, LambdaError> {
    let st = state.clone();
    let recs = crate::blocking(move || {
        let mut out = Vec::new();
        for f in st.store.list_functions()? {
            if f.production_revision.is_some() {
                if let Ok(rec) = st.store.resolve(&f.name, None) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    })
    .await?;
    let functions: Vec<_> = recs.iter().map(|r| configuration(r, None)).collect();
    Ok(axum::Json(serde_json::json!({ "Functions": functions })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_and_arns() {
        assert_eq!(parse_function_name("f").unwrap(), ("f", None));
        assert_eq!(parse_function_name("f:prod").unwrap(), ("f", Some("prod")));
        assert_eq!(
            parse_function_name("123456789012:function:f:3").unwrap(),
            ("f", Some("3"))
        );
        assert_eq!(
            parse_function_name("arn:aws:lambda:us-east-1:123456789012:function:my-fn").unwrap(),
            ("my-fn", None)
        );
        assert_eq!(
            parse_function_name("arn:aws:lambda:us-east-1:1:function:my-fn:$LATEST").unwrap(),
            ("my-fn", Some("$LATEST"))
        );
        for bad in ["", "a:b:c", "f:", "bad name", "arn:aws:s3:::bucket", "f:q!"] {
            let e = parse_function_name(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.name, "InvalidParameterValueException");
        }
    }

    #[test]
    fn log_result_ends_with_report_and_keeps_4kb() {
        let decode = |s: &str| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
        };
        let s = decode(&log_result(
            "r1",
            3,
            b"hello\n",
            Duration::from_micros(1500),
            128,
            Some(10 << 20),
            Some(Duration::from_millis(4)),
            None,
        ));
        assert!(s.starts_with("START RequestId: r1 Version: 3\nhello\nEND RequestId: r1\n"));
        assert!(s.contains("REPORT RequestId: r1\tDuration: 1.50 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 10 MB\tInit Duration: 4.00 ms\t\n"), "{s}");
        let big = "é".repeat(5000);
        let s = decode(&log_result(
            "r2",
            1,
            big.as_bytes(),
            Duration::from_millis(1),
            128,
            None,
            None,
            Some(("timeout", "Sandbox.Timedout")),
        ));
        assert!(s.len() <= LOG_TAIL_BYTES);
        assert!(
            s.ends_with("Status: timeout\tError Type: Sandbox.Timedout\t\n"),
            "{s}"
        );
    }

    #[test]
    fn client_context_is_base64_json() {
        let mut h = HeaderMap::new();
        let client_context = |h: &HeaderMap| client_context(h, "x-amz-client-context");
        assert_eq!(client_context(&h).unwrap(), None);
        let b64 = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{"k":"v"}}"#);
        h.insert("x-amz-client-context", b64.parse().unwrap());
        assert_eq!(
            client_context(&h).unwrap().as_deref(),
            Some(r#"{"custom":{"k":"v"}}"#)
        );
        h.insert("x-amz-client-context", "!!!".parse().unwrap());
        assert!(client_context(&h)
            .unwrap_err()
            .starts_with("x-amz-client-context:"));
    }
}
