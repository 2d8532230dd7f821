//! A `provided` function on the real `lambda_runtime` crate. It echoes the event with what the
//! runtime saw: the environment, the context (ARN, request id, deadline, client context) and
//! per-process state. Events: `{"fail": true}` returns a handler error, `{"sleep_ms": N}`
//! sleeps first (for timeouts).

use lambda_runtime::{service_fn, Diagnostic, Error, LambdaEvent};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static INVOCATIONS: AtomicU64 = AtomicU64::new(0);

const ENV_KEYS: &[&str] = &[
    "GREETING",
    "WITH_EQUALS",
    "TZ",
    "_HANDLER",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
];

/// The handler's own error, reported with a readable `errorType`.
#[derive(Debug)]
struct HandlerError(String);

impl From<HandlerError> for Diagnostic {
    fn from(e: HandlerError) -> Diagnostic {
        Diagnostic {
            error_type: "HandlerError".into(),
            error_message: e.0,
        }
    }
}

async fn handler(ev: LambdaEvent<Value>) -> Result<Value, HandlerError> {
    let n = INVOCATIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let (event, ctx) = ev.into_parts();
    if event.get("fail").and_then(Value::as_bool) == Some(true) {
        return Err(HandlerError("boom: asked to fail".into()));
    }
    if let Some(ms) = event.get("sleep_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let remaining_ms = ctx
        .deadline()
        .duration_since(SystemTime::now())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let env: serde_json::Map<String, Value> = ENV_KEYS
        .iter()
        .map(|k| {
            (
                k.to_string(),
                std::env::var(k).map_or(Value::Null, Value::from),
            )
        })
        .collect();
    let client_context = ctx.client_context.as_ref().map(
        |cc| json!({"custom": cc.custom, "env": cc.environment, "app_title": cc.client.app_title}),
    );
    Ok(json!({
        "event": event,
        "env": env,
        "pid": std::process::id(),
        "invocations": n,
        "request_id": ctx.request_id,
        "arn": ctx.invoked_function_arn,
        "trace_id": ctx.xray_trace_id,
        "deadline_ms": ctx.deadline,
        "now_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "remaining_ms": remaining_ms,
        "client_context": client_context,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
