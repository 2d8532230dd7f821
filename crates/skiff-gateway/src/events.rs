//! Placeholder until the durable event queue lands (replaced by the queue work).
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use std::sync::Arc;

pub async fn accept(
    _state: &Arc<AppState>,
    _function: &str,
    _qualifier: Option<String>,
    _payload: bytes::Bytes,
    _client_context: Option<String>,
) -> ApiResult<String> {
    Err(ApiError::internal(
        "asynchronous invocation is not available",
    ))
}
