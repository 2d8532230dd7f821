//! The invoke path every entry point shares (`/v1/.../invoke`, the Lambda Invoke API, HTTP
//! triggers, async event workers): run an [`Invocation`] of a resolved revision on the
//! scheduler and record it (status, duration, logs) in the store.

use crate::AppState;
use skiff_core::protocol::ExecMode;
use skiff_core::{ErrorKind, Invocation, InvokeOutput, Outcome};
use skiff_scheduler::{InvokeOptions, Revision};
use skiff_store::InvocationRecord;
use std::sync::Arc;
use std::time::Duration;

/// A fresh request id (UUID v4, as Lambda uses).
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Stable status name of a platform outcome, as stored in invocation records.
pub fn status_name(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Timeout => "timeout",
        ErrorKind::OutOfMemory => "out_of_memory",
        ErrorKind::Crashed => "crashed",
        ErrorKind::Throttled => "throttled",
        ErrorKind::StartFailed => "start_failed",
    }
}

/// Runs `inv` on `rev` and records the invocation. `Err` is a platform outcome (timeout,
/// out of memory, crash, throttled); a function's own error is `Ok` with `function_error`.
pub async fn run(
    state: &AppState,
    rev: &Arc<Revision>,
    inv: Invocation,
) -> Result<InvokeOutput, Outcome> {
    run_opts(state, rev, inv, InvokeOptions::default()).await
}

/// [`run`] with [`InvokeOptions`] (immediate throttling, a route's shorter timeout).
pub async fn run_opts(
    state: &AppState,
    rev: &Arc<Revision>,
    inv: Invocation,
    opts: InvokeOptions,
) -> Result<InvokeOutput, Outcome> {
    let request_id = inv.request_id.clone();
    let started_at_ms = skiff_core::units::now_ms();
    let mut result = match state.scheduler.exec_mode(rev).await {
        Ok(ExecMode::Http) => crate::proxy::invoke(state, rev, inv, opts.wait_for_capacity).await,
        Ok(_) => state.scheduler.invoke_opts(rev, inv, opts).await,
        Err(o) => Err(o),
    };
    record(state, rev, request_id, started_at_ms, &mut result);
    result
}

/// Writes the invocation record of a finished (or, for a streamed response, started)
/// invocation of `rev`; a streamed one is recorded when its stream ends.
pub(crate) fn record(
    state: &AppState,
    rev: &Revision,
    request_id: String,
    started_at_ms: i64,
    result: &mut Result<InvokeOutput, Outcome>,
) {
    record_as(
        state,
        &rev.function,
        rev.number,
        request_id,
        started_at_ms,
        result,
    );
}

/// [`record`] for an invocation of revision `revision` of `function`.
pub(crate) fn record_as(
    state: &AppState,
    function: &str,
    revision: u32,
    request_id: String,
    started_at_ms: i64,
    result: &mut Result<InvokeOutput, Outcome>,
) {
    let (status, error, cold, duration, logs) = match &*result {
        Ok(out) => (
            if out.function_error.is_some() {
                "function_error"
            } else {
                "ok"
            },
            out.function_error.as_ref().map(|e| e.message.clone()),
            out.cold,
            out.duration,
            out.logs.clone(),
        ),
        Err(o) => (
            status_name(&o.kind),
            Some(o.message.clone()),
            o.cold,
            Duration::ZERO,
            o.log_tail.clone().into_bytes(),
        ),
    };
    let mut record = InvocationRecord {
        request_id,
        function: function.to_string(),
        revision,
        started_at_ms,
        duration_us: duration.as_micros() as u64,
        status: status.to_string(),
        cold,
        error,
        logs,
    };
    match result.as_mut().ok().and_then(|o| o.stream.as_mut()) {
        // A streamed response is recorded when the stream is over, with how it ended.
        Some(stream) => {
            let store = state.store.clone();
            stream.on_end(Box::new(move |err| {
                if let Some(e) = err {
                    record.status = "stream_error".into();
                    record.error = Some(e.to_string());
                }
                record.duration_us =
                    (skiff_core::units::now_ms() - started_at_ms).max(0) as u64 * 1000;
                store.record_invocation(record);
            }));
        }
        None => state.store.record_invocation(record),
    }
}
