//! Functions that take HTTP (their revision's `ExecMode::Http`): requests are handed to them
//! instead of becoming events. A `runtime: http` function is an HTTP server inside its sandbox,
//! reached over a connection; a `wasi:http` Wasm component answers in-process
//! ([`skiff_sandbox::Instance::serve_http`]) — everything else below is shared.
//!
//! * HTTP triggers ([`forward`]): the raw request (method, the path after `/fn/{name}` plus the
//!   query, headers without hop-by-hop ones, the body streamed) goes to the server; its status,
//!   headers (without hop-by-hop ones) and streamed body come back. `X-Forwarded-For` (appended),
//!   `X-Forwarded-Proto` and `X-Forwarded-Host` are set.
//! * Every other entry point ([`invoke`], through [`crate::exec::run_opts`]): the JSON event is
//!   POSTed to `/` and the response body is the result; a 5xx status is a function error.
//!
//! Each request holds a scheduler [`InstanceLease`] (one unit of the function's
//! `concurrency`) until its response body has been sent or dropped. Connections (server
//! functions) are made from
//! the host inside the sandbox's network namespace ([`skiff_sandbox::Instance::connect_http`])
//! and kept alive: idle HTTP/1.1 connections are pooled per instance. The function's `timeout`
//! covers the whole response once a connection is made (504, or a cut body once it has
//! started); a timeout or a broken connection stops the instance. A cold instance's sandbox
//! must come up within [`skiff_sandbox::BOOT_LIMIT`] and its server then accept connections
//! within [`START_TIMEOUT`] (Lambda's init limit), else 502 with its output.

use crate::apigw::HOP_BY_HOP;
use crate::error::{ApiError, ApiResult};
use crate::exec::status_name;
use crate::AppState;
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use skiff_core::{ErrorKind, FunctionError, Invocation, InvokeOutput, Outcome, MAX_PAYLOAD_BYTES};
use skiff_sandbox::{BoxError, HttpBody};
use skiff_scheduler::{InstanceLease, Revision};
use skiff_store::InvocationRecord;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Longest wait for a new instance's server to accept its first connection once its sandbox
/// is up (the init phase of an `http` function; Lambda's init limit). Not part of the
/// function's timeout.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle keep-alive connections per instance id.
static IDLE: LazyLock<Mutex<HashMap<String, Vec<SendRequest<Body>>>>> =
    LazyLock::new(Mutex::default);

/// A ready connection to the lease's instance: a pooled idle one, else a new one.
async fn checkout(
    lease: &InstanceLease,
    ready_within: Duration,
) -> Result<SendRequest<Body>, Outcome> {
    let id = lease.instance().id();
    loop {
        let idle = IDLE.lock().get_mut(id).and_then(Vec::pop);
        let Some(mut conn) = idle else { break };
        if !conn.is_closed() && conn.ready().await.is_ok() {
            return Ok(conn);
        }
    }
    let stream = lease
        .instance()
        .connect_http(ready_within)
        .await
        .map_err(|e| {
            lease.fail();
            let kind = match e {
                skiff_sandbox::SandboxError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
                _ => ErrorKind::Crashed,
            };
            lease.outcome(kind, e.to_string(), e.log_tail().to_string())
        })?;
    let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            lease.fail();
            lease.outcome(
                ErrorKind::Crashed,
                format!("HTTP handshake with the function's server failed: {e}"),
                String::new(),
            )
        })?;
    tokio::spawn(async move {
        let _ = driver.await;
    });
    Ok(conn)
}

/// Returns a connection whose exchange completed to its instance's idle pool.
fn checkin(instance_id: &str, conn: SendRequest<Body>, max_idle: usize) {
    if conn.is_closed() {
        return;
    }
    let mut idle = IDLE.lock();
    if idle.len() > 64 {
        // Forget instances whose connections all died (stopped instances).
        idle.retain(|_, v| {
            v.retain(|c| !c.is_closed());
            !v.is_empty()
        });
    }
    let v = idle.entry(instance_id.to_string()).or_default();
    if v.len() < max_idle.max(1) {
        v.push(conn);
    }
}

/// How a response reached the gateway.
enum Conn {
    /// Over this keep-alive connection to the instance's server (pooled again once the
    /// exchange completes).
    Server(SendRequest<Body>),
    /// From the instance itself ([`skiff_sandbox::Instance::serve_http`]).
    InProcess,
}

/// Sends one request on the lease's instance. The function's timeout starts once a
/// connection to its server is made (a cold sandbox's boot and its server's start have
/// limits of their own, as a Lambda init has); the response head arrives before the returned
/// deadline.
async fn exchange(
    lease: &InstanceLease,
    rev: &Revision,
    req: Request<Body>,
) -> Result<(Conn, Response<HttpBody>, Instant), Outcome> {
    if lease.instance().serves_http() {
        let deadline = Instant::now() + rev.spec.timeout;
        let req = req.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync());
        return match tokio::time::timeout_at(deadline.into(), lease.instance().serve_http(req))
            .await
        {
            Err(_) => {
                lease.fail();
                Err(timeout_outcome(lease, rev))
            }
            // The request failed (a trap, its memory limit); the instance serves the next one
            // from a fresh state.
            Ok(Err(e)) => {
                let kind = match e {
                    skiff_sandbox::SandboxError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
                    _ => ErrorKind::Crashed,
                };
                Err(lease.outcome(kind, e.to_string(), e.log_tail().to_string()))
            }
            Ok(Ok(resp)) => Ok((Conn::InProcess, resp, deadline)),
        };
    }
    let mut conn = checkout(lease, START_TIMEOUT).await?;
    let deadline = Instant::now() + rev.spec.timeout;
    match tokio::time::timeout_at(deadline.into(), conn.send_request(req)).await {
        Err(_) => {
            lease.fail();
            Err(timeout_outcome(lease, rev))
        }
        Ok(Err(e)) => {
            lease.fail();
            let inst = lease.instance();
            // The server died under the request: report how (exit status, OOM).
            let dead = if inst.is_alive() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                !inst.is_alive()
            } else {
                true
            };
            let message = if dead {
                inst.connect_http(Duration::ZERO)
                    .await
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| format!("the function's server failed: {e}"))
            } else {
                format!("the function's server broke the connection: {e}")
            };
            let tail = String::from_utf8_lossy(&inst.take_output()).into_owned();
            Err(lease.outcome(ErrorKind::Crashed, message, tail))
        }
        Ok(Ok(resp)) => Ok((
            Conn::Server(conn),
            resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
            deadline,
        )),
    }
}

fn timeout_outcome(lease: &InstanceLease, rev: &Revision) -> Outcome {
    lease.outcome(
        ErrorKind::Timeout,
        format!(
            "Task timed out after {:.2} seconds",
            rev.spec.timeout.as_secs_f64()
        ),
        String::new(),
    )
}

/// Removes hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// An HTTP trigger request for an `http` function: proxied to its server.
pub(crate) async fn forward(
    state: &Arc<AppState>,
    rev: &Arc<Revision>,
    raw_path: String,
    parts: Parts,
    body: Body,
    request_id: &str,
) -> ApiResult<axum::response::Response> {
    let started_at_ms = skiff_core::units::now_ms();
    let t0 = Instant::now();
    let mut record = InvocationRecord {
        request_id: request_id.to_string(),
        function: rev.function.clone(),
        revision: rev.number,
        started_at_ms,
        duration_us: 0,
        status: "ok".into(),
        cold: false,
        error: None,
        logs: Vec::new(),
    };
    let lease = match state.scheduler.lease(rev, true).await {
        Ok(l) => l,
        Err(o) => return Err(fail(state, record, o)),
    };
    record.cold = lease.cold();

    let mut uri = String::with_capacity(raw_path.len() + 64);
    uri.push_str(&raw_path);
    if let Some(q) = parts.uri.query() {
        uri.push('?');
        uri.push_str(q);
    }
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let host = headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let client_ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    forwarded_headers(&mut headers, client_ip, host.as_ref());
    if !headers.contains_key(header::HOST) {
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1"));
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.headers_mut() = headers;
    *req.uri_mut() = match uri.parse() {
        Ok(u) => u,
        Err(_) => return Err(ApiError::bad_request("invalid request path")),
    };

    let (conn, resp, deadline) = match exchange(&lease, rev, req).await {
        Ok(x) => x,
        Err(o) => {
            drop(lease);
            return Err(fail(state, record, o));
        }
    };
    let (mut head, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    crate::invoke::skiff_headers(
        &mut head.headers,
        request_id,
        lease.revision(),
        lease.instance().id(),
        lease.cold(),
        t0.elapsed(),
    );
    let body = ProxyBody {
        inner: incoming,
        deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
        finish: Some(Finish {
            state: state.clone(),
            max_idle: rev.spec.concurrency as usize,
            timeout: rev.spec.timeout,
            lease,
            conn,
            record,
            t0,
        }),
    };
    Ok(Response::from_parts(head, Body::new(body)))
}

/// Records a request that failed before its response started and maps the outcome.
fn fail(state: &AppState, mut record: InvocationRecord, o: Outcome) -> ApiError {
    record.status = status_name(&o.kind).into();
    record.error = Some(o.message.clone());
    record.cold = o.cold;
    record.logs = o.log_tail.clone().into_bytes();
    state.scheduler.record(Err(&o), Duration::ZERO);
    state.store.record_invocation(record);
    o.into()
}

/// Sets `X-Forwarded-For` (appending the client's address), `-Proto` and `-Host`.
fn forwarded_headers(h: &mut HeaderMap, client: Option<IpAddr>, host: Option<&HeaderValue>) {
    if let Some(ip) = client {
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
            _ => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match host {
        Some(v) => {
            h.insert("x-forwarded-host", v.clone());
        }
        None => {
            h.remove("x-forwarded-host");
        }
    }
}

/// What happens when a proxied response is over.
struct Finish {
    state: Arc<AppState>,
    lease: InstanceLease,
    conn: Conn,
    record: InvocationRecord,
    max_idle: usize,
    timeout: Duration,
    t0: Instant,
}

enum End {
    Complete,
    Timeout,
    Broken(String),
    /// The client went away before the end: the connection is dropped, the instance kept.
    Abandoned,
}

impl Finish {
    fn end(self, how: End) {
        let Finish {
            state,
            lease,
            conn,
            mut record,
            max_idle,
            timeout,
            t0,
        } = self;
        let duration = t0.elapsed();
        record.duration_us = duration.as_micros() as u64;
        record.logs = lease.instance().take_output();
        match how {
            End::Complete => {
                if let Conn::Server(conn) = conn {
                    checkin(lease.instance().id(), conn, max_idle);
                }
                state.scheduler.record(Ok(false), duration);
            }
            End::Abandoned => {
                record.status = "stream_error".into();
                record.error = Some("the client went away before the response ended".into());
                state.scheduler.record(Ok(false), duration);
            }
            End::Timeout => {
                lease.fail();
                let msg = format!("Task timed out after {:.2} seconds", timeout.as_secs_f64());
                let o = lease.outcome(ErrorKind::Timeout, msg, String::new());
                record.status = status_name(&o.kind).into();
                record.error = Some(o.message.clone());
                state.scheduler.record(Err(&o), duration);
            }
            End::Broken(msg) => {
                lease.fail();
                let o = lease.outcome(ErrorKind::Crashed, msg, String::new());
                record.status = "stream_error".into();
                record.error = Some(o.message.clone());
                state.scheduler.record(Err(&o), duration);
            }
        }
        state.store.record_invocation(record);
        // Dropping the lease frees its slot (or stops a failed instance).
    }
}

/// The server's response body on its way to the client, under the function's deadline. It
/// holds the lease until it ends or is dropped.
struct ProxyBody {
    inner: HttpBody,
    deadline: Pin<Box<tokio::time::Sleep>>,
    finish: Option<Finish>,
}

impl ProxyBody {
    fn end(&mut self, how: End) {
        if let Some(f) = self.finish.take() {
            f.end(how);
        }
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finish.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.end(End::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(Some(Err(e))) => {
                this.end(End::Broken(format!(
                    "the function's server broke the response: {e}"
                )));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.end(End::Timeout);
                    Poll::Ready(Some(Err("the function timed out".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finish.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let how = if self.inner.is_end_stream() {
            End::Complete
        } else {
            End::Abandoned
        };
        self.end(how);
    }
}

/// Reads a whole body of at most `limit` bytes. (`http_body_util::Limited` + `collect` over
/// the boxed body makes the handler futures fail rustc's higher-ranked `Send` check.)
async fn collect_limited(mut body: HttpBody, limit: usize) -> Result<Vec<u8>, BoxError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if out.len() + data.len() > limit {
                return Err(Box::new(std::io::Error::other(format!(
                    "the response is larger than {limit} bytes"
                ))));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// An invocation of an `http` function from a non-HTTP entry point (`/v1` invoke, Lambda
/// API, async events): the payload is POSTed to `/` as JSON and the response body (up to the
/// payload limit) is the result. A 5xx status is a function error `HTTP.<status>`.
pub(crate) async fn invoke(
    state: &AppState,
    rev: &Arc<Revision>,
    inv: Invocation,
    wait_for_capacity: bool,
) -> Result<InvokeOutput, Outcome> {
    let lease = state.scheduler.lease(rev, wait_for_capacity).await?;
    let started = Instant::now();
    let mut req = Request::new(Body::from(inv.payload));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = axum::http::Uri::from_static("/");
    let h = req.headers_mut();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&inv.request_id) {
        h.insert("x-skiff-request-id", v);
    }
    let result = async {
        let (conn, resp, deadline) = exchange(&lease, rev, req).await?;
        let status = resp.status();
        let collected = tokio::time::timeout_at(
            deadline.into(),
            collect_limited(resp.into_body(), MAX_PAYLOAD_BYTES),
        )
        .await;
        let body = match collected {
            Err(_) => {
                lease.fail();
                return Err(timeout_outcome(&lease, rev));
            }
            Ok(Err(e)) => {
                lease.fail();
                return Err(lease.outcome(
                    ErrorKind::Crashed,
                    format!("reading the function's response failed: {e}"),
                    String::new(),
                ));
            }
            Ok(Ok(b)) => b,
        };
        if let Conn::Server(conn) = conn {
            checkin(lease.instance().id(), conn, rev.spec.concurrency as usize);
        }
        let function_error = status.is_server_error().then(|| FunctionError {
            error_type: format!("HTTP.{}", status.as_u16()),
            message: String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned(),
            reported_as: format!("HTTP.{}", status.as_u16()),
        });
        Ok(InvokeOutput {
            body,
            stream: None,
            function_error,
            revision: rev.number,
            instance_id: lease.instance().id().to_string(),
            cold: lease.cold(),
            duration: started.elapsed(),
            init_duration: lease.init_duration(),
            logs: lease.instance().take_output(),
            max_memory: lease.instance().memory_peak(),
        })
    }
    .await;
    state.scheduler.record(
        result.as_ref().map(|o| o.function_error.is_some()),
        started.elapsed(),
    );
    result
}
