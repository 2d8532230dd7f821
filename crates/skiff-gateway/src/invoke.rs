//! `POST /v1/functions/{name}/invoke`: JSON event in, the handler's result out (streamed with
//! chunked encoding when the function streams its response; with
//! `X-Skiff-Invocation-Type: Event` / `?async=true`, a 202 and an event id, see `events.rs`).

use crate::error::{ApiError, ApiResult};
use crate::revisions::{resolve_sticky, sticky_key};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use skiff_core::{Invocation, InvokeOutput, MAX_PAYLOAD_BYTES};
use std::sync::Arc;

#[derive(Deserialize)]
pub struct InvokeQuery {
    qualifier: Option<String>,
    /// `true` runs the invocation asynchronously (as `X-Skiff-Invocation-Type: Event`).
    #[serde(rename = "async")]
    asynchronous: Option<String>,
}

/// Reads a request body up to `limit` bytes; larger bodies are a 413.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> ApiResult<bytes::Bytes> {
    if let Some(len) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            drain(body).await;
            return Err(ApiError::too_large(limit));
        }
    }
    match Limited::new(&mut body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            drain(body).await;
            Err(ApiError::too_large(limit))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read request body: {e}"
        ))),
    }
}

/// Reads and discards the rest of a rejected body (at most 64 MiB, for at most 5 s), so a
/// client still uploading sees the error reply instead of a reset connection.
async fn drain(mut body: Body) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut left = 64usize << 20;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len());
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => break,
            }
        }
    })
    .await;
}

fn header(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("-"))
}

/// Sets the `x-skiff-*` headers that tell a caller which invocation answered.
pub(crate) fn skiff_headers(
    h: &mut HeaderMap,
    request_id: &str,
    revision: u32,
    instance_id: &str,
    cold: bool,
    duration: std::time::Duration,
) {
    h.insert("x-skiff-request-id", header(request_id));
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

/// Reads an invocation payload: JSON up to [`MAX_PAYLOAD_BYTES`] (413 beyond), `{}` when
/// the body is empty.
pub(crate) async fn read_payload(headers: &HeaderMap, body: Body) -> ApiResult<Vec<u8>> {
    let payload = read_body(headers, body, MAX_PAYLOAD_BYTES).await?;
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(b"{}".to_vec());
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
        return Err(ApiError::invalid_json(e));
    }
    Ok(payload.into())
}

pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<InvokeQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if crate::events::is_async(&headers, q.asynchronous.as_deref())? {
        return crate::events::invoke_async(&state, &name, q.qualifier, &headers, body).await;
    }
    let sticky = sticky_key(&headers);
    let rev = resolve_sticky(&state, &name, q.qualifier.as_deref(), sticky).await?;
    let payload = read_payload(&headers, body).await?;
    let client_context = crate::lambda::client_context(&headers, "x-skiff-client-context")
        .map_err(|m| ApiError::bad_request(m).with("field", "X-Skiff-Client-Context"))?;
    let request_id = crate::exec::request_id();
    let inv = Invocation {
        request_id: request_id.clone(),
        function: name,
        qualifier: q.qualifier,
        payload,
        client_context,
        trace_id: None,
    };
    let result = crate::exec::run(&state, &rev, inv).await;
    output_response(&request_id, result)
}

/// The reply to a `/v1` invocation: the function's result (streamed when it streams), its
/// error as a 500 `function_error`, or the platform outcome; with the `x-skiff-*` headers.
pub(crate) fn output_response(
    request_id: &str,
    result: Result<InvokeOutput, skiff_core::Outcome>,
) -> ApiResult<Response> {
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
                ..
            } = out;
            let content_type = match &stream {
                Some(s) => header(
                    s.content_type
                        .as_deref()
                        .unwrap_or("application/octet-stream"),
                ),
                None => HeaderValue::from_static("application/json"),
            };
            let mut resp = match function_error {
                None => match stream {
                    Some(s) => (StatusCode::OK, crate::stream::body(s)).into_response(),
                    None => (StatusCode::OK, body).into_response(),
                },
                Some(fe) => {
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
            skiff_headers(h, request_id, revision, &instance_id, cold, duration);
            Ok(resp)
        }
        Err(outcome) => {
            Err(ApiError::from(outcome).header("x-skiff-request-id", request_id.to_string()))
        }
    }
}
