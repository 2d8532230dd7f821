//! `POST /v1/functions/{name}/invoke`: JSON event in, the handler's result out (streamed with
//! chunked encoding when the function streams its response).

use crate::error::{ApiError, ApiResult};
use crate::revisions::resolve;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use skiff_core::{Invocation, InvokeOutput, MAX_PAYLOAD_BYTES};
use skiff_store::InvocationRecord;
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
pub struct InvokeQuery {
    qualifier: Option<String>,
}

/// Reads a request body up to `limit` bytes; larger bodies are a 413.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<bytes::Bytes> {
    if let Some(len) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read request body: {e}"
        ))),
    }
}

fn header(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("-"))
}

/// Reads a JSON request body of at most `limit` bytes into `T`.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> ApiResult<T> {
    let bytes = read_body(headers, body, limit).await?;
    serde_json::from_slice(&bytes).map_err(ApiError::invalid_json)
}

/// `X-Skiff-Client-Context`: base64 of the client context JSON, as Lambda's
/// `X-Amz-Client-Context`; handed to the function decoded.
fn client_context(headers: &HeaderMap) -> ApiResult<Option<String>> {
    use base64::Engine;
    let Some(v) = headers.get("x-skiff-client-context") else {
        return Ok(None);
    };
    let bad = |why: String| ApiError::bad_request(format!("X-Skiff-Client-Context: {why}"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_bytes())
        .map_err(|e| bad(format!("not base64: {e}")))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&raw)
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    String::from_utf8(raw)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<InvokeQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let rev = resolve(&state, &name, q.qualifier.as_deref()).await?;
    let payload = read_body(&headers, body, MAX_PAYLOAD_BYTES).await?;
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".to_vec()
    } else {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
            return Err(ApiError::invalid_json(e));
        }
        payload.into()
    };
    let client_context = client_context(&headers)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let inv = Invocation {
        request_id: request_id.clone(),
        function: name,
        qualifier: q.qualifier,
        payload,
        client_context,
        trace_id: None,
    };
    let started_at_ms = skiff_core::units::now_ms();
    let result = state.scheduler.invoke(&rev, inv).await;
    let record =
        |status: &str, error: Option<String>, cold: bool, duration: Duration, logs: Vec<u8>| {
            InvocationRecord {
                request_id: request_id.clone(),
                function: rev.function.clone(),
                revision: rev.number,
                started_at_ms,
                duration_us: duration.as_micros() as u64,
                status: status.to_string(),
                cold,
                error,
                logs,
            }
        };
    match result {
        Ok(out) => {
            let InvokeOutput {
                body,
                stream,
                function_error,
                revision,
                instance_id,
                cold,
                duration,
                logs,
                ..
            } = out;
            let status = if function_error.is_some() {
                "function_error"
            } else {
                "ok"
            };
            let err_msg = function_error.as_ref().map(|e| e.message.clone());
            let rec = record(status, err_msg, cold, duration, logs);
            let content_type = match &stream {
                Some(s) => s
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
                None => "application/json",
            };
            let content_type = header(content_type);
            let mut resp = match (function_error, stream) {
                (None, Some(s)) => {
                    // Recorded when the stream is over, with how it ended.
                    let st = state.clone();
                    let body = crate::stream::body(
                        s,
                        Box::new(move |err| {
                            let mut rec = rec;
                            if let Some(e) = err {
                                rec.status = "stream_error".into();
                                rec.error = Some(e.to_string());
                            }
                            st.store.record_invocation(rec);
                        }),
                    );
                    (StatusCode::OK, body).into_response()
                }
                (None, None) => {
                    state.store.record_invocation(rec);
                    (StatusCode::OK, body).into_response()
                }
                (Some(fe), _) => {
                    state.store.record_invocation(rec);
                    let details: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    let mut e = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "function_error",
                        fe.message,
                    )
                    .with("type", fe.error_type.clone())
                    .header("x-skiff-function-error", fe.error_type);
                    if let Some(st) = details.get("stackTrace") {
                        e = e.with("stack_trace", st.clone());
                    }
                    e.into_response()
                }
            };
            let h = resp.headers_mut();
            h.insert(axum::http::header::CONTENT_TYPE, content_type);
            h.insert("x-skiff-request-id", header(&request_id));
            h.insert("x-skiff-revision", header(revision));
            h.insert(
                "x-skiff-cold-start",
                HeaderValue::from_static(if cold { "true" } else { "false" }),
            );
            h.insert("x-skiff-instance", header(instance_id));
            h.insert(
                "x-skiff-duration-ms",
                header(format!("{:.3}", duration.as_secs_f64() * 1e3)),
            );
            Ok(resp)
        }
        Err(outcome) => {
            let status = match outcome.kind {
                skiff_core::ErrorKind::Timeout => "timeout",
                skiff_core::ErrorKind::OutOfMemory => "out_of_memory",
                skiff_core::ErrorKind::Crashed => "crashed",
                skiff_core::ErrorKind::Throttled => "throttled",
                skiff_core::ErrorKind::StartFailed => "start_failed",
            };
            state.store.record_invocation(record(
                status,
                Some(outcome.message.clone()),
                outcome.cold,
                Duration::ZERO,
                outcome.log_tail.clone().into_bytes(),
            ));
            Err(ApiError::from(outcome).header("x-skiff-request-id", request_id))
        }
    }
}
