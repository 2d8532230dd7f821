//! Async invocations ("events"): accepted into the store's durable queue before the caller
//! gets its 202, then run by a bounded set of workers through [`crate::exec::run`].
//!
//! A failed attempt (function error, timeout, out of memory, crash, throttled, sandbox start
//! failure) is retried after `retry_base`, then `2 × retry_base`; after
//! [`EventConfig::max_attempts`] it is dead-lettered with its last error. An event whose
//! function or qualifier no longer resolves is dead-lettered at once. Events left running by a
//! crash or shutdown are requeued at the next start, so delivery is at least once.

use crate::error::{ApiError, ApiResult};
use crate::invoke::read_body;
use crate::revisions::resolve;
use crate::{blocking, AppState};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use skiff_core::units::now_ms;
use skiff_core::Invocation;
use skiff_store::{EventRecord, NewEvent};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

/// Largest event payload accepted (413 beyond it), as for Lambda async invocations.
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 1 << 20;
/// Done events kept for `GET .../events/{id}` (newest, across functions).
const KEEP_DONE: u32 = 10_000;
/// Dead events kept per function (newest).
const KEEP_DEAD: u32 = 10_000;
/// How often done/dead events beyond those bounds are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Worker settings.
#[derive(Debug, Clone)]
pub struct EventConfig {
    /// Events run at once (across functions).
    pub workers: usize,
    /// Attempts before an event is dead-lettered (Lambda: 3, i.e. two retries).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles for each further one.
    pub retry_base: Duration,
    /// Longest sleep between looks at the queue when nothing wakes the workers.
    pub poll_interval: Duration,
}

impl Default for EventConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        EventConfig {
            workers: 2 * cores,
            max_attempts: 3,
            retry_base: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl EventConfig {
    /// Delay after failed attempt number `attempt` (1-based): base, 2×base, 4×base…
    fn backoff(&self, attempt: u32) -> Duration {
        self.retry_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
    }
}

/// Shared state between `accept`, the workers and shutdown (lives in [`AppState`]).
pub struct EventQueue {
    wake: Notify,
    stop: watch::Sender<bool>,
    in_flight: AtomicUsize,
    accepted: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Default for EventQueue {
    fn default() -> Self {
        EventQueue {
            wake: Notify::new(),
            stop: watch::channel(false).0,
            in_flight: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
        }
    }
}

impl EventQueue {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops claiming events and waits up to `grace` for running attempts to finish. Attempts
    /// still running afterwards stay `running` in the store and are requeued at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.send_replace(true);
        let deadline = Instant::now() + grace;
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Prometheus lines for the event counters.
    pub fn render_metrics(&self) -> String {
        let mut out = String::with_capacity(512);
        for (name, help, v) in [
            (
                "skiff_events_accepted_total",
                "Async invocations accepted.",
                &self.accepted,
            ),
            (
                "skiff_events_succeeded_total",
                "Async invocations that ran successfully.",
                &self.succeeded,
            ),
            (
                "skiff_events_retried_total",
                "Failed attempts scheduled for a retry.",
                &self.retried,
            ),
            (
                "skiff_events_dead_lettered_total",
                "Async invocations moved to the dead-letter list.",
                &self.dead_lettered,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE skiff_events_in_flight gauge\nskiff_events_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out
    }
}

/// Accepts an async invocation: checks that `function`/`qualifier` resolve, stores the event
/// durably (fsynced) and wakes the workers. Returns the event id, which is also the request id
/// of each attempt. 413 if the payload exceeds [`MAX_EVENT_PAYLOAD_BYTES`].
pub async fn accept(
    state: &Arc<AppState>,
    function: &str,
    qualifier: Option<String>,
    payload: bytes::Bytes,
    client_context: Option<String>,
) -> ApiResult<String> {
    if payload.len() > MAX_EVENT_PAYLOAD_BYTES {
        return Err(ApiError::too_large(MAX_EVENT_PAYLOAD_BYTES));
    }
    resolve(state, function, qualifier.as_deref()).await?;
    let id = crate::exec::request_id();
    let st = state.clone();
    let (f, event_id) = (function.to_string(), id.clone());
    blocking(move || {
        st.store.enqueue_event(
            &NewEvent {
                id: &event_id,
                function: &f,
                qualifier: qualifier.as_deref(),
                payload: &payload,
                client_context: client_context.as_deref(),
            },
            now_ms(),
        )?;
        Ok(())
    })
    .await?;
    state.events.accepted.fetch_add(1, Ordering::Relaxed);
    state.events.wake.notify_one();
    Ok(id)
}

/// Starts the event workers: requeues events a previous run left `running`, then claims due
/// events whenever fewer than `cfg.workers` are running. Wakes on [`accept`], on a scheduled
/// retry coming due, and at least every `cfg.poll_interval`.
pub fn spawn_workers(state: Arc<AppState>, cfg: EventConfig) {
    tokio::spawn(dispatch(state, cfg));
}

async fn dispatch(state: Arc<AppState>, cfg: EventConfig) {
    let workers = cfg.workers.max(1);
    let cfg = Arc::new(cfg);
    let st = state.clone();
    match blocking(move || Ok(st.store.requeue_running_events(now_ms())?)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            events = n,
            "requeued events interrupted by the last shutdown"
        ),
        Err(e) => tracing::error!(error = %e.message, "could not requeue running events"),
    }
    let slots = Arc::new(Semaphore::new(workers));
    let mut stop = state.events.stop.subscribe();
    let mut last_prune: Option<Instant> = None;
    while !*stop.borrow() {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let want = permits.len();
        let st = state.clone();
        let claimed = match blocking(move || Ok(st.store.claim_events(want, now_ms())?)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e.message, "could not claim events");
                Vec::new()
            }
        };
        let caught_up = claimed.len() < want;
        for ev in claimed {
            let permit = permits.pop().expect("one permit per claimed event");
            state.events.in_flight.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(run_event(state.clone(), cfg.clone(), ev, permit));
        }
        drop(permits);
        if !caught_up {
            continue;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            let st = state.clone();
            if let Err(e) = blocking(move || Ok(st.store.prune_events(KEEP_DONE, KEEP_DEAD)?)).await
            {
                tracing::warn!(error = %e.message, "could not prune events");
            }
        }
        let st = state.clone();
        let next_due = blocking(move || Ok(st.store.next_event_due_ms()?))
            .await
            .ok()
            .flatten();
        let wait = next_due.map_or(cfg.poll_interval, |at| {
            Duration::from_millis((at - now_ms()).max(0) as u64).min(cfg.poll_interval)
        });
        tokio::select! {
            _ = state.events.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
}

/// Why an attempt failed, and whether another attempt could help.
struct Failure {
    message: String,
    retryable: bool,
}

async fn attempt(state: &Arc<AppState>, ev: EventRecord) -> Result<(), Failure> {
    let rev = resolve(state, &ev.function, ev.qualifier.as_deref())
        .await
        .map_err(|e| Failure {
            // The function, alias or revision is gone: retrying cannot help.
            retryable: e.status != StatusCode::NOT_FOUND,
            message: e.message,
        })?;
    let inv = Invocation {
        request_id: ev.id,
        function: ev.function,
        qualifier: ev.qualifier,
        payload: ev.payload,
        client_context: ev.client_context,
        trace_id: None,
    };
    match crate::exec::run(state, &rev, inv).await {
        // A streamed reply counts once it is over (a mid-stream error is a failure).
        Ok(out) => match out.collect().await.function_error {
            None => Ok(()),
            Some(fe) => Err(Failure {
                message: format!("{}: {}", fe.error_type, fe.message),
                retryable: true,
            }),
        },
        Err(o) => Err(Failure {
            message: format!("{}: {}", crate::exec::status_name(&o.kind), o.message),
            retryable: true,
        }),
    }
}

async fn run_event(
    state: Arc<AppState>,
    cfg: Arc<EventConfig>,
    ev: EventRecord,
    _slot: OwnedSemaphorePermit,
) {
    /// Counts the attempt out of `in_flight` however the task ends.
    struct InFlight<'a>(&'a AtomicUsize);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let q = &state.events;
    let _in_flight = InFlight(&q.in_flight);
    let (id, attempts) = (ev.id.clone(), ev.attempts);
    let result = attempt(&state, ev).await;
    if result.is_err() && q.stopping() {
        // Most likely killed by the shutdown itself: leave it `running` so the next start
        // requeues it without this attempt being judged.
        return;
    }
    let st = state.clone();
    let now = now_ms();
    let outcome = match result {
        Ok(()) => {
            q.succeeded.fetch_add(1, Ordering::Relaxed);
            blocking(move || {
                // `done` promises the attempt's invocation record is stored too.
                st.store.flush();
                Ok(st.store.complete_event(&id, now)?)
            })
            .await
        }
        Err(f) => {
            let retry_at = (f.retryable && attempts < cfg.max_attempts)
                .then(|| now + cfg.backoff(attempts).as_millis() as i64);
            let counter = if retry_at.is_some() {
                &q.retried
            } else {
                &q.dead_lettered
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::info!(event = %id, attempts, error = %f.message, retry = retry_at.is_some(), "event attempt failed");
            let r =
                blocking(move || Ok(st.store.fail_event(&id, &f.message, retry_at, now)?)).await;
            if retry_at.is_some() {
                // The dispatcher may be sleeping past this retry's due time.
                q.wake.notify_one();
            }
            r
        }
    };
    if let Err(e) = outcome {
        tracing::error!(error = %e.message, "could not record an event's outcome; it will be retried after a restart");
    }
}

// ------------------------------------------------------------------------ HTTP handlers

/// How `POST /v1/functions/{name}/invoke` should run: from `X-Skiff-Invocation-Type`
/// (`RequestResponse` | `Event`) or `?async=true|false`. 400 naming the field otherwise.
pub(crate) fn is_async(headers: &HeaderMap, async_query: Option<&str>) -> ApiResult<bool> {
    let mut asynchronous = false;
    if let Some(v) = headers.get("x-skiff-invocation-type") {
        asynchronous = match v.to_str().unwrap_or("") {
            "Event" | "event" => true,
            "RequestResponse" | "request-response" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "X-Skiff-Invocation-Type: `{other}` is not one of Event, RequestResponse"
                ))
                .with("field", "X-Skiff-Invocation-Type"))
            }
        };
    }
    match async_query {
        None => {}
        Some("true" | "1") => asynchronous = true,
        Some("false" | "0") => {}
        Some(other) => {
            return Err(
                ApiError::bad_request(format!("async: `{other}` is not true or false"))
                    .with("field", "async"),
            )
        }
    }
    Ok(asynchronous)
}

/// The async branch of `POST /v1/functions/{name}/invoke`: 202 `{"event_id"}`.
pub(crate) async fn invoke_async(
    state: &Arc<AppState>,
    name: &str,
    qualifier: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<axum::response::Response> {
    resolve(state, name, qualifier.as_deref()).await?;
    let payload = read_body(headers, body, MAX_EVENT_PAYLOAD_BYTES).await?;
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        bytes::Bytes::from_static(b"{}")
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(&payload)
            .map_err(ApiError::invalid_json)?;
        payload
    };
    let id = accept(state, name, qualifier, payload, None).await?;
    let mut resp = (StatusCode::ACCEPTED, Json(json!({ "event_id": id }))).into_response();
    if let Ok(v) = id.parse() {
        resp.headers_mut().insert("x-skiff-request-id", v);
    }
    Ok(resp)
}

/// An event as the API shows it. The payload is JSON when it parses, else `payload_base64`.
fn event_json(ev: &EventRecord) -> Value {
    let mut v = json!({
        "id": ev.id,
        "function": ev.function,
        "qualifier": ev.qualifier,
        "state": ev.state,
        "attempts": ev.attempts,
        "error": ev.last_error,
        "next_attempt_at_ms": ev.next_attempt_at_ms,
        "created_at_ms": ev.created_at_ms,
        "updated_at_ms": ev.updated_at_ms,
    });
    match serde_json::from_slice::<Value>(&ev.payload) {
        Ok(p) => v["payload"] = p,
        Err(_) => v["payload_base64"] = Value::String(base64(&ev.payload)),
    }
    if let Some(c) = &ev.client_context {
        v["client_context"] = Value::String(c.clone());
    }
    v
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Deserialize)]
pub struct DlqQuery {
    limit: Option<u32>,
}

/// `GET /v1/functions/{name}/dlq`: dead-lettered events, oldest first.
pub async fn list_dlq(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<DlqQuery>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let dead = blocking(move || Ok(st.store.list_dead_events(&name, limit)?)).await?;
    let events: Vec<Value> = dead.iter().map(event_json).collect();
    Ok(Json(json!({ "events": events })))
}

/// `GET /v1/functions/{name}/events/{id}`: one event's state, attempts and last error.
pub async fn get_event(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let ev = blocking(move || {
        st.store.get_event(&name, &id)?.ok_or_else(|| {
            ApiError::not_found(format!("event `{id}` of function `{name}` not found"))
        })
    })
    .await?;
    Ok(Json(event_json(&ev)))
}

/// `POST /v1/functions/{name}/dlq/{id}/retry`: requeues a dead event with a fresh attempt
/// budget; 202 `{"event_id"}`.
pub async fn redrive(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let event_id = id.clone();
    blocking(move || Ok(st.store.redrive_event(&name, &event_id, now_ms())?)).await?;
    state.events.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(json!({ "event_id": id }))))
}

/// `DELETE /v1/functions/{name}/dlq/{id}`: discards a dead event.
pub async fn delete_dead(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    blocking(move || Ok(st.store.delete_dead_event(&name, &id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\xff\x00\xfe", "/wD+"),
        ] {
            assert_eq!(base64(raw), enc);
        }
    }

    #[test]
    fn backoff_doubles() {
        let cfg = EventConfig {
            retry_base: Duration::from_millis(100),
            ..Default::default()
        };
        assert_eq!(cfg.backoff(1), Duration::from_millis(100));
        assert_eq!(cfg.backoff(2), Duration::from_millis(200));
        assert_eq!(cfg.backoff(3), Duration::from_millis(400));
    }

    #[test]
    fn invocation_type_parsing() {
        let mut h = HeaderMap::new();
        assert!(!is_async(&h, None).unwrap());
        assert!(is_async(&h, Some("true")).unwrap());
        h.insert("x-skiff-invocation-type", "Event".parse().unwrap());
        assert!(is_async(&h, None).unwrap());
        h.insert("x-skiff-invocation-type", "Bogus".parse().unwrap());
        let e = is_async(&h, None).unwrap_err();
        assert_eq!(
            (e.status, e.extra["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("X-Skiff-Invocation-Type"))
        );
        let e = is_async(&HeaderMap::new(), Some("maybe")).unwrap_err();
        assert_eq!(e.extra["field"], "async");
    }
}
