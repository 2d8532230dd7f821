//! The one place where errors become HTTP responses: `{"error":{"code","message",…}}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use skiff_core::{ErrorKind, Outcome, SpecError};
use skiff_store::StoreError;

/// An API error with its status, stable code and human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
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
    /// Adds a field to the error object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_string(), value.into());
        self
    }
    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = Map::new();
        err.insert("code".into(), Value::from(self.code));
        err.insert("message".into(), Value::from(self.message));
        err.extend(self.extra);
        let mut resp = (self.status, axum::Json(json!({ "error": err }))).into_response();
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
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
            "conflict" => (StatusCode::CONFLICT, "ResourceConflictException"),
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
