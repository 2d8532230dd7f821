//! The one place where errors become HTTP responses: `{"error":{"code","message",…}}` for the
//! API, `{"message"}` (API Gateway's shape) for public HTTP triggers.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use skiff_core::{ErrorKind, Outcome, SpecError};
use skiff_store::StoreError;

/// How an error body is rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Shape {
    /// Skiff's API shape: `{"error":{"code","message",…}}`.
    #[default]
    Api,
    /// API Gateway's shape for public HTTP triggers: `{"message": …}`. Only errors in the
    /// request itself (400, 404, 413) keep their message; others say only their reason phrase,
    /// 5xx `Internal Server Error` / `Endpoint request timed out` (log tails, secret names and
    /// limits stay out of public replies). The code goes in `x-skiff-error`.
    Gateway,
    /// The seed-compatible API's shape: `{"error": message}`, plus `"field"` when one
    /// request field is at fault. The code goes in `x-skiff-error`.
    Seed,
    /// `POST /execute`'s shape: `{"success": false, "error": message}`, plus `"field"` when
    /// one request field is at fault. The code goes in `x-skiff-error`.
    Execute,
}

/// An API error with its status, stable code and human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub shape: Shape,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            headers: Vec::new(),
            shape: Shape::Api,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 409 `not_publishable`: revision `n` has publish blockers (listed with their codes).
    pub fn not_publishable(n: u32, blockers: &[skiff_core::publish::Blocker]) -> ApiError {
        let codes: Vec<&str> = blockers.iter().map(|b| b.code).collect();
        ApiError::new(
            StatusCode::CONFLICT,
            "not_publishable",
            format!(
                "revision {n} is not publishable: {} ({})",
                codes.join(", "),
                blockers
                    .iter()
                    .map(|b| b.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
        .with("revision", n)
        .with(
            "blockers",
            serde_json::to_value(blockers).unwrap_or_default(),
        )
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds the {} byte limit", limit),
        )
    }
    pub fn invalid_json(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    }
    /// The function is disabled (`PATCH /v1/functions/{name}` with `{"enabled": false}`): 503.
    pub fn disabled(function: &str) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "function_disabled",
            format!("function `{function}` is disabled (skiff enable {function})"),
        )
    }
    /// The function raised an error behind an HTTP trigger: 502, as API Gateway answers.
    pub fn function_error(error_type: String, message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "function_error", message)
            .header("x-skiff-function-error", error_type)
    }
    /// The function's reply is not a valid HTTP trigger response (see `apigw`): 502.
    pub fn invalid_reply(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "invalid_reply", reason)
    }
    /// A request field is invalid: 400 naming it (`field` in the error).
    pub fn invalid_field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message).with("field", field)
    }
    /// A feature this server was not set up for: 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// Too much running at once: 429 with `retry-after: 1`.
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", message)
            .header("retry-after", "1".into())
    }
    /// Renders this error in the seed-compatible API's shape.
    pub fn seed(mut self) -> ApiError {
        self.shape = Shape::Seed;
        self
    }
    /// Renders this error in `POST /execute`'s shape.
    pub fn execute(mut self) -> ApiError {
        self.shape = Shape::Execute;
        self
    }
    /// Renders this error in API Gateway's shape (public HTTP triggers).
    pub fn gateway(mut self) -> ApiError {
        self.shape = Shape::Gateway;
        self
    }
    /// Adds a field to the error object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_string(), value.into());
        self
    }
    /// Adds a response header (dropped if `value` is not a valid header value).
    pub fn header(mut self, name: &'static str, value: String) -> ApiError {
        if let Ok(v) = HeaderValue::try_from(value) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }
    /// Adds a prepared response header.
    pub fn header_value(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = match self.shape {
            Shape::Api => {
                let mut err = Map::new();
                err.insert("code".into(), Value::from(self.code));
                err.insert("message".into(), Value::from(self.message));
                err.extend(self.extra);
                (self.status, axum::Json(json!({ "error": err }))).into_response()
            }
            Shape::Seed | Shape::Execute => {
                let mut body = Map::new();
                if self.shape == Shape::Execute {
                    body.insert("success".into(), Value::from(false));
                }
                body.insert("error".into(), Value::from(self.message));
                if let Some(f) = self.extra.get("field") {
                    body.insert("field".into(), f.clone());
                }
                let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
                resp.headers_mut()
                    .insert("x-skiff-error", HeaderValue::from_static(self.code));
                resp
            }
            Shape::Gateway => {
                let message = match self.status {
                    StatusCode::BAD_REQUEST
                    | StatusCode::NOT_FOUND
                    | StatusCode::PAYLOAD_TOO_LARGE => &self.message,
                    StatusCode::GATEWAY_TIMEOUT => "Endpoint request timed out",
                    StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
                    s if s.is_server_error() => "Internal Server Error",
                    s => s.canonical_reason().unwrap_or("Error"),
                };
                let mut resp =
                    (self.status, axum::Json(json!({ "message": message }))).into_response();
                resp.headers_mut()
                    .insert("x-skiff-error", HeaderValue::from_static(self.code));
                resp
            }
        };
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string()).with("field", e.field)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            StoreError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Invalid { ref field, .. } => {
                let field = field.clone();
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string())
                    .with("field", field)
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::internal(other.to_string())
            }
        }
    }
}

impl From<Outcome> for ApiError {
    fn from(o: Outcome) -> ApiError {
        let (status, code) = match o.kind {
            ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorKind::OutOfMemory => (StatusCode::BAD_GATEWAY, "out_of_memory"),
            ErrorKind::Crashed => (StatusCode::BAD_GATEWAY, "function_crashed"),
            ErrorKind::Throttled => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
            ErrorKind::StartFailed => (StatusCode::INTERNAL_SERVER_ERROR, "sandbox_start_failed"),
        };
        let mut e = ApiError::new(status, code, o.message)
            .header("x-skiff-revision", o.revision.to_string())
            .header("x-skiff-cold-start", o.cold.to_string());
        if !o.log_tail.is_empty() {
            e = e.with("logs", o.log_tail);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            e = e.header("retry-after", "1".into());
        }
        e
    }
}

impl From<skiff_scheduler::SchedError> for ApiError {
    fn from(e: skiff_scheduler::SchedError) -> ApiError {
        use skiff_scheduler::SchedError;
        match e {
            SchedError::NoInstance { .. } => {
                ApiError::new(StatusCode::CONFLICT, "no_running_instance", e.to_string())
            }
            SchedError::BranchNotFound(_) => ApiError::not_found(e.to_string()),
            SchedError::TooManyBranches { .. } => ApiError::busy(e.to_string()),
            // The function's tier cannot snapshot: a property of its spec.
            SchedError::Unsupported(m) => ApiError::new(
                StatusCode::CONFLICT,
                "snapshot_unsupported",
                format!("sandbox: snapshots need `sandbox: gvisor` or `microvm` ({m})"),
            )
            .with("field", "sandbox"),
            SchedError::Sandbox(se) => {
                let tail = se.log_tail().to_string();
                let mut e = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "snapshot_failed",
                    format!("snapshot or restore failed: {se}"),
                );
                if !tail.is_empty() {
                    e = e.with("logs", tail);
                }
                e
            }
            SchedError::Invoke(o) => ApiError::from(o),
            SchedError::Io(io) => ApiError::internal(format!("snapshot i/o: {io}")),
        }
    }
}

/// Seed API: how a platform outcome of an ad-hoc invocation is reported. A timeout, an
/// out-of-memory kill or a crash is the command's doing: `Ok(text)` for the 200
/// `InvocationResult`'s `error`. Throttling and sandbox start failures are the platform's: an
/// HTTP error in the seed shape.
pub fn seed_outcome(o: Outcome) -> Result<String, ApiError> {
    match o.kind {
        ErrorKind::Timeout | ErrorKind::OutOfMemory | ErrorKind::Crashed => Ok(o.message),
        ErrorKind::Throttled | ErrorKind::StartFailed => Err(ApiError::from(o).seed()),
    }
}

/// An error in the AWS Lambda API's shape, for the `/2015-03-31` routes: the error name in
/// `X-Amzn-ErrorType` and `{"Type","Message"}` as body, so SDKs raise their modelled
/// exceptions (`ResourceNotFoundException`, …).
#[derive(Debug)]
pub struct LambdaError {
    pub status: StatusCode,
    /// Lambda's exception name, e.g. `ResourceNotFoundException`.
    pub name: &'static str,
    pub message: String,
}

impl LambdaError {
    pub fn new(status: StatusCode, name: &'static str, message: impl Into<String>) -> LambdaError {
        LambdaError {
            status,
            name,
            message: message.into(),
        }
    }
    /// `InvalidParameterValueException` (400).
    pub fn invalid_parameter(message: impl Into<String>) -> LambdaError {
        LambdaError::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message,
        )
    }
}

impl IntoResponse for LambdaError {
    fn into_response(self) -> Response {
        // Lambda's own errors say `User` for client faults and `Service` for its own.
        let kind = if self.status.is_server_error() {
            "Service"
        } else {
            "User"
        };
        let mut resp = (
            self.status,
            axum::Json(json!({"Type": kind, "Message": self.message, "message": self.message})),
        )
            .into_response();
        resp.headers_mut()
            .insert("x-amzn-errortype", HeaderValue::from_static(self.name));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<ApiError> for LambdaError {
    /// Maps Skiff's error codes onto Lambda's exception names and statuses.
    fn from(e: ApiError) -> LambdaError {
        let (status, name) = match e.code {
            "not_found" => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            "invalid_json" => (StatusCode::BAD_REQUEST, "InvalidRequestContentException"),
            "payload_too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException"),
            "throttled" => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
            "unauthorized" => (StatusCode::FORBIDDEN, "UnrecognizedClientException"),
            "missing_secret" => (StatusCode::BAD_GATEWAY, "ResourceNotReadyException"),
            "conflict" | "not_publishable" => (StatusCode::CONFLICT, "ResourceConflictException"),
            // Lambda has no "disabled"; a function that cannot run in its current state is
            // `ResourceConflictException` (409), which SDKs raise without retrying.
            "function_disabled" => (StatusCode::CONFLICT, "ResourceConflictException"),
            _ if e.status.is_client_error() => {
                (StatusCode::BAD_REQUEST, "InvalidParameterValueException")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
        };
        LambdaError::new(status, name, e.message)
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn render(e: ApiError) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = e.into_response();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    fn outcome(kind: ErrorKind) -> Outcome {
        Outcome {
            kind,
            message: "detail: secret internals".into(),
            log_tail: "a log line".into(),
            revision: 3,
            cold: true,
        }
    }

    #[tokio::test]
    async fn gateway_shape_hides_details_of_platform_errors() {
        for (kind, status, message) in [
            (ErrorKind::Crashed, 502, "Internal Server Error"),
            (ErrorKind::OutOfMemory, 502, "Internal Server Error"),
            (ErrorKind::StartFailed, 500, "Internal Server Error"),
            (ErrorKind::Timeout, 504, "Endpoint request timed out"),
            (ErrorKind::Throttled, 429, "Too Many Requests"),
        ] {
            let (st, h, v) = render(ApiError::from(outcome(kind)).gateway()).await;
            assert_eq!(st.as_u16(), status);
            assert_eq!(v, json!({ "message": message }));
            assert!(!h["x-skiff-error"].is_empty());
            assert_eq!(h["x-skiff-revision"], "3");
        }
        let (st, h, v) =
            render(ApiError::function_error("ValueError".into(), "x".into()).gateway()).await;
        assert_eq!(
            (st.as_u16(), &v),
            (502, &json!({"message": "Internal Server Error"}))
        );
        assert_eq!(h["x-skiff-function-error"], "ValueError");
        assert_eq!(h["x-skiff-error"], "function_error");
    }

    #[tokio::test]
    async fn seed_shape_and_outcomes() {
        let (st, h, v) =
            render(ApiError::invalid_field("env_vars", "env_vars[0] bad").seed()).await;
        assert_eq!(st, 400);
        assert_eq!(v, json!({"error": "env_vars[0] bad", "field": "env_vars"}));
        assert_eq!(h["x-skiff-error"], "invalid_request");
        let (_, _, v) = render(ApiError::too_large(10).seed()).await;
        assert!(v["error"].as_str().unwrap().contains("10 byte"), "{v}");
        assert!(v.get("field").is_none());
        for kind in [
            ErrorKind::Timeout,
            ErrorKind::OutOfMemory,
            ErrorKind::Crashed,
        ] {
            assert_eq!(
                seed_outcome(outcome(kind)).unwrap(),
                "detail: secret internals"
            );
        }
        for (kind, status) in [(ErrorKind::Throttled, 429), (ErrorKind::StartFailed, 500)] {
            let (st, _, v) = render(seed_outcome(outcome(kind)).unwrap_err()).await;
            assert_eq!(st.as_u16(), status);
            assert!(v["error"].is_string(), "{v}");
        }
    }

    #[tokio::test]
    async fn gateway_shape_keeps_request_error_messages() {
        let (st, h, v) = render(ApiError::not_found("function `x` not found").gateway()).await;
        assert_eq!(
            (st.as_u16(), &v),
            (404, &json!({"message": "function `x` not found"}))
        );
        assert_eq!(h["x-skiff-error"], "not_found");
        let secret = ApiError::new(
            StatusCode::FAILED_DEPENDENCY,
            "missing_secret",
            "db-password",
        );
        let (_, _, v) = render(secret.gateway()).await;
        assert_eq!(v, json!({"message": "Failed Dependency"}));
        // The API shape is unchanged.
        let (_, _, v) = render(ApiError::from(outcome(ErrorKind::Crashed))).await;
        assert_eq!(v["error"]["code"], "function_crashed");
        assert_eq!(v["error"]["logs"], "a log line");
    }
}
