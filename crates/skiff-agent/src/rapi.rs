//! `runtime_api` mode: long-running worker processes polling the Lambda Runtime API
//! (2018-06-01), served by the agent over HTTP/1.1 on `127.0.0.1:{port + i}` for worker `i`.
//! A response posted with `Lambda-Runtime-Function-Response-Mode: streaming` is forwarded to
//! the host chunk by chunk as `StreamStart`/`StreamChunk`/`StreamEnd` frames as it arrives.

use crate::serve::{decode_status, Agent, Mode};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff_core::protocol::{
    Done, Exit, InitError, Invoke, Kind, StreamChunk, StreamEnd, StreamStart,
};
use skiff_core::{MAX_PAYLOAD_BYTES, MAX_STREAM_BYTES};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::rc::Rc;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

const PREFIX: &str = "/2018-06-01/runtime/";
const LOG_CHUNK: usize = 64 * 1024;
/// Content type of a streamed response that starts with a JSON metadata prelude
/// (`{statusCode, headers, cookies}`) followed by 8 NUL bytes, as `lambda_runtime` sends it.
const HTTP_INTEGRATION: &str = "application/vnd.awslambda.http-integration-response";
/// Longest metadata prelude looked for; past it the bytes are passed through as body.
const MAX_PRELUDE: usize = 64 * 1024;

struct Job {
    inv: Invoke,
    payload: Bytes,
}

#[derive(Default)]
struct WorkerState {
    /// The invocation handed to this worker and not answered yet.
    current: Option<String>,
    /// The runtime is streaming the response of `current`.
    streaming: bool,
    /// A pending `GET next` waiting for work.
    waiter: Option<oneshot::Sender<Job>>,
    /// The runtime has asked for work at least once (its init is done).
    polled: bool,
}

struct Worker {
    /// The worker process (leader of its own process group).
    pid: std::cell::Cell<i32>,
    /// Read end of the worker's combined stdout/stderr pipe (non-blocking).
    log: AsyncFd<OwnedFd>,
    state: RefCell<WorkerState>,
}

/// The runtime-API server and its workers.
pub(crate) struct Rapi {
    agent: Rc<Agent>,
    workers: Vec<Worker>,
    queue: RefCell<VecDeque<Job>>,
    /// Workers that finished their init (asked for `next` once).
    initialized: std::cell::Cell<usize>,
    /// Bumped by [`Mode::quiesce`]: every listener and connection of the Runtime API closes.
    gate: tokio::sync::watch::Sender<u64>,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid array for pipe2.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Binds the listeners and starts the workers.
pub(crate) fn start(agent: Rc<Agent>) -> Result<Rc<dyn Mode>, String> {
    let cfg = &agent.cfg;
    let n = cfg.workers.max(1) as usize;
    let argv0 = cfg.argv.first().ok_or("no program to run (empty argv)")?;
    let mut listeners = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    let mut write_ends = Vec::with_capacity(n);
    for i in 0..n {
        let port = cfg.runtime_api_port as usize + i;
        let port =
            u16::try_from(port).map_err(|_| format!("runtime API port {port} out of range"))?;
        let l = std::net::TcpListener::bind(("127.0.0.1", port))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| format!("runtime API listener on 127.0.0.1:{port}: {e}"))?;
        listeners.push(l);
        let (r, w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        // SAFETY: fcntl on our fd.
        unsafe {
            let fl = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        // SAFETY: an OwnedFd keeps its fd open and unchanged for the AsyncFd's lifetime.
        let log = unsafe { AsyncFd::register(r) }.map_err(|e| format!("log pipe: {e}"))?;
        workers.push(Worker {
            pid: std::cell::Cell::new(0),
            log,
            state: RefCell::new(WorkerState::default()),
        });
        write_ends.push(w);
    }
    let rapi = Rc::new(Rapi {
        agent: agent.clone(),
        workers,
        queue: RefCell::new(VecDeque::new()),
        initialized: std::cell::Cell::new(0),
        gate: tokio::sync::watch::Sender::new(0),
    });
    for (i, l) in listeners.into_iter().enumerate() {
        tokio::task::spawn_local(accept_loop(rapi.clone(), i, l));
    }
    for (i, w) in write_ends.into_iter().enumerate() {
        let api = format!("127.0.0.1:{}", cfg.runtime_api_port as usize + i);
        let (child, exit) = {
            let w2 = w.try_clone().map_err(|e| format!("dup: {e}"))?;
            let mut cmd = Command::new(argv0);
            cmd.args(&cfg.argv[1..])
                .env_clear()
                .envs(
                    cfg.env
                        .iter()
                        .filter(|(k, _)| k != "AWS_LAMBDA_RUNTIME_API")
                        .map(|(k, v)| (k, v)),
                )
                .env("AWS_LAMBDA_RUNTIME_API", &api)
                .current_dir(&cfg.cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::from(w))
                .stderr(Stdio::from(w2));
            agent
                .spawn(&mut cmd)
                .map_err(|e| format!("cannot start the function: {argv0}: {e}"))?
        };
        rapi.workers[i].pid.set(child.id() as i32);
        drop(child);
        tokio::task::spawn_local(log_pump(rapi.clone(), i));
        tokio::task::spawn_local(monitor(rapi.clone(), i, exit));
    }
    Ok(rapi)
}

/// Binds worker `i`'s Runtime API listener.
fn listen(port: u16, i: usize) -> Result<tokio::net::TcpListener, String> {
    let port = port as usize + i;
    let port = u16::try_from(port).map_err(|_| format!("runtime API port {port} out of range"))?;
    std::net::TcpListener::bind(("127.0.0.1", port))
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("runtime API listener on 127.0.0.1:{port}: {e}"))
}

impl Mode for Rapi {
    /// Closes the Runtime API (listeners and connections: gVisor cannot save a TCP socket
    /// that epoll watches) and lets the runtimes notice and back off. Only when every worker
    /// has initialised and nothing is in flight.
    fn quiesce(
        self: Rc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>> {
        Box::pin(async move {
            if self.initialized.get() < self.workers.len() {
                return Err("the function has not finished initialising".into());
            }
            if self
                .workers
                .iter()
                .any(|w| w.state.borrow().current.is_some())
                || !self.queue.borrow().is_empty()
            {
                return Err("the function is busy with an invocation".into());
            }
            self.gate.send_modify(|g| *g += 1);
            // The runtimes see their connection close and retry with a short back-off (no
            // socket open while they wait); give them time to close their side.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Ok(())
        })
    }

    fn resume(self: Rc<Self>) {
        let port = self.agent.cfg.runtime_api_port;
        for i in 0..self.workers.len() {
            match listen(port, i) {
                Ok(l) => {
                    tokio::task::spawn_local(accept_loop(self.clone(), i, l));
                }
                Err(e) => eprintln!("skiff-agent: resume: {e}"),
            }
        }
    }

    fn invoke(&self, inv: Invoke, payload: Vec<u8>) {
        self.agent.started();
        let mut job = Job {
            inv,
            payload: Bytes::from(payload),
        };
        for w in &self.workers {
            let tx = {
                let mut st = w.state.borrow_mut();
                if st.current.is_some() {
                    continue;
                }
                match st.waiter.take() {
                    Some(tx) => tx,
                    None => continue,
                }
            };
            w.state.borrow_mut().current = Some(job.inv.id.clone());
            match tx.send(job) {
                Ok(()) => return,
                Err(j) => {
                    // That poll was abandoned (connection closed); try the next worker.
                    w.state.borrow_mut().current = None;
                    job = j;
                }
            }
        }
        self.queue.borrow_mut().push_back(job);
    }
}

impl Rapi {
    fn emit_log(&self, i: usize, data: &[u8]) {
        let st = self.workers[i].state.borrow();
        self.agent.out.log(st.current.as_deref(), data);
    }

    /// Sends whatever output of worker `i` is already readable.
    fn drain(&self, i: usize) {
        let fd = self.workers[i].log.get_ref().as_raw_fd();
        let mut buf = [0u8; LOG_CHUNK];
        loop {
            // SAFETY: reading into a valid buffer from a non-blocking fd we own.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            self.emit_log(i, &buf[..n as usize]);
        }
    }

    /// Answers worker `i`'s current invocation `id`. False if it is not its current one.
    fn complete(&self, i: usize, id: &str, error_type: Option<String>, body: &[u8]) -> bool {
        if self.workers[i].state.borrow().current.as_deref() != Some(id) {
            return false;
        }
        // The invocation's output must reach the host before its Done.
        self.drain(i);
        self.workers[i].state.borrow_mut().current = None;
        self.agent.out.json(
            Kind::Done,
            &Done {
                id: id.to_string(),
                error_type,
            },
            body,
        );
        self.agent.finished();
        true
    }

    async fn handle(self: Rc<Self>, i: usize, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(rest) = req.uri().path().strip_prefix(PREFIX) else {
            return not_found();
        };
        let is_post = req.method() == Method::POST;
        if rest == "invocation/next" && req.method() == Method::GET {
            return self.next(i).await;
        }
        if rest == "init/error" && is_post {
            return self.init_error(i, req).await;
        }
        if let (true, Some(r)) = (is_post, rest.strip_prefix("invocation/")) {
            if let Some(id) = r.strip_suffix("/response") {
                let id = id.to_string();
                let streaming = req
                    .headers()
                    .get("lambda-runtime-function-response-mode")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"streaming"));
                if streaming {
                    return self.stream(i, id, req).await;
                }
                return self.answer(i, id, req, false).await;
            }
            if let Some(id) = r.strip_suffix("/error") {
                let id = id.to_string();
                return self.answer(i, id, req, true).await;
            }
        }
        not_found()
    }

    async fn next(&self, i: usize) -> Response<Full<Bytes>> {
        let w = &self.workers[i];
        if w.state.borrow().streaming {
            return error_response(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "the runtime asked for the next invocation while streaming a response",
            );
        }
        if !std::mem::replace(&mut w.state.borrow_mut().polled, true) {
            let n = self.initialized.get() + 1;
            self.initialized.set(n);
            if n == self.workers.len() {
                self.agent.out.raw(Kind::Initialized, b"{}", &[]);
            }
        }
        let unanswered = w.state.borrow().current.clone();
        if let Some(id) = unanswered {
            let body = serde_json::json!({
                "errorMessage": "The runtime asked for the next invocation without answering this one",
                "errorType": "Runtime.InvalidStateTransition",
            });
            self.complete(
                i,
                &id,
                Some("Runtime.InvalidStateTransition".into()),
                body.to_string().as_bytes(),
            );
        }
        let queued = self.queue.borrow_mut().pop_front();
        let job = match queued {
            Some(job) => {
                w.state.borrow_mut().current = Some(job.inv.id.clone());
                job
            }
            None => {
                let (tx, rx) = oneshot::channel();
                w.state.borrow_mut().waiter = Some(tx);
                match rx.await {
                    Ok(job) => job,
                    Err(_) => {
                        return error_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "ServiceException",
                            "superseded",
                        )
                    }
                }
            }
        };
        next_response(job)
    }

    async fn answer(
        &self,
        i: usize,
        id: String,
        req: Request<Incoming>,
        is_error: bool,
    ) -> Response<Full<Bytes>> {
        let holds = {
            let st = self.workers[i].state.borrow();
            st.current.as_deref() == Some(id.as_str()) && !st.streaming
        };
        if !holds {
            // Read it first: a client that writes its whole body before reading keeps its
            // connection.
            let _ = read_body(req.into_body()).await;
            return error_response(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                &format!("invocation {id} is not in progress on this runtime"),
            );
        }
        let header_type = error_type_header(&req);
        let body = match read_body(req.into_body()).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) => {
                let msg = format!(
                    "Response payload size exceeded maximum allowed payload size ({MAX_PAYLOAD_BYTES} bytes)."
                );
                let body = serde_json::json!({"errorMessage": msg, "errorType": "Function.ResponseSizeTooLarge"});
                self.complete(
                    i,
                    &id,
                    Some("Function.ResponseSizeTooLarge".into()),
                    body.to_string().as_bytes(),
                );
                return error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    &msg,
                );
            }
            Err(ReadError::Broken(e)) => {
                return error_response(StatusCode::BAD_REQUEST, "InvalidRequest", &e)
            }
        };
        let ok = if is_error {
            let (ty, body) = error_body(header_type, &body, "Unhandled");
            self.complete(i, &id, Some(ty), &body)
        } else {
            self.complete(i, &id, None, &body)
        };
        if !ok {
            return error_response(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                &format!("invocation {id} was already answered"),
            );
        }
        accepted()
    }

    /// Forwards a streamed response to the host as it arrives. Mid-stream errors come as the
    /// HTTP trailers `Lambda-Runtime-Function-Error-Type` / `-Body` (base64 error JSON).
    async fn stream(&self, i: usize, id: String, req: Request<Incoming>) -> Response<Full<Bytes>> {
        {
            let mut st = self.workers[i].state.borrow_mut();
            if st.current.as_deref() != Some(id.as_str()) || st.streaming {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    &format!("invocation {id} is not in progress on this runtime"),
                );
            }
            st.streaming = true;
        }
        let declared = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut prelude = declared
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case(HTTP_INTEGRATION))
            .then(Vec::new);
        let mut content_type = if prelude.is_some() { None } else { declared };
        let mut body = req.into_body();
        let mut started = false;
        let mut sent = 0usize;
        let mut failure: Option<(String, Vec<u8>)> = None;
        let mut reply = accepted();
        loop {
            let data = match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    failure = Some(stream_failure(
                        "Runtime.StreamError",
                        &format!("the runtime broke off the response stream: {e}"),
                    ));
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            failure = trailer_error(&trailers);
                        }
                        continue;
                    }
                },
            };
            let data = match prelude.as_mut() {
                None => data,
                Some(buf) => {
                    buf.extend_from_slice(&data);
                    match split_prelude(buf) {
                        Some((ct, rest)) => {
                            content_type = ct;
                            prelude = None;
                            rest
                        }
                        None if buf.len() > MAX_PRELUDE => {
                            Bytes::from(prelude.take().unwrap_or_default())
                        }
                        None => continue,
                    }
                }
            };
            if !started {
                self.start_stream(&id, content_type.take());
                started = true;
            }
            sent += data.len();
            if sent > MAX_STREAM_BYTES {
                let msg = format!(
                    "Response payload size exceeded maximum allowed payload size ({MAX_STREAM_BYTES} bytes)."
                );
                failure = Some(stream_failure("Function.ResponseSizeTooLarge", &msg));
                reply =
                    error_response(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", &msg);
                break;
            }
            if !data.is_empty() {
                self.agent
                    .out
                    .json(Kind::StreamChunk, &StreamChunk { id: id.clone() }, &data);
            }
        }
        if !started {
            self.start_stream(&id, content_type.take());
            // A prelude without its delimiter was body after all.
            if let Some(buf) = prelude.filter(|b| !b.is_empty()) {
                self.agent
                    .out
                    .json(Kind::StreamChunk, &StreamChunk { id: id.clone() }, &buf);
            }
        }
        // The invocation's output must reach the host before its end.
        self.drain(i);
        let (error_type, err_body) = match failure {
            Some((ty, body)) => (Some(ty), body),
            None => (None, Vec::new()),
        };
        self.agent
            .out
            .json(Kind::StreamEnd, &StreamEnd { id, error_type }, &err_body);
        {
            let mut st = self.workers[i].state.borrow_mut();
            st.current = None;
            st.streaming = false;
        }
        self.agent.finished();
        reply
    }

    fn start_stream(&self, id: &str, content_type: Option<String>) {
        let h = StreamStart {
            id: id.to_string(),
            content_type,
        };
        self.agent.out.json(Kind::StreamStart, &h, &[]);
    }

    async fn init_error(&self, i: usize, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let header_type = error_type_header(&req);
        let body = match Limited::new(req.into_body(), MAX_PAYLOAD_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, "InvalidRequest", &e.to_string())
            }
        };
        let (ty, body) = error_body(header_type, &body, "Runtime.InitError");
        self.drain(i);
        self.agent.out.json(
            Kind::InitError,
            &InitError {
                error_type: Some(ty),
            },
            &body,
        );
        accepted()
    }
}

/// Bytes of an oversized response read (and dropped) before answering 413, so that a client
/// that writes its whole body before reading the reply sees the 413 and not a reset.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

enum ReadError {
    /// Over [`MAX_PAYLOAD_BYTES`].
    TooLarge,
    /// The connection broke off.
    Broken(String),
}

/// Reads a buffered response of at most [`MAX_PAYLOAD_BYTES`].
async fn read_body(mut body: Incoming) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Broken(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= MAX_PAYLOAD_BYTES {
            buf.extend_from_slice(&data);
        } else if seen > DRAIN_MAX {
            break;
        }
    }
    if seen > MAX_PAYLOAD_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(buf.freeze())
}

fn error_type_header(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Error type as reported (the `Lambda-Runtime-Function-Error-Type` header; `default`, e.g.
/// `Unhandled`, when it is missing, as on Lambda) and the error JSON body (passed through when
/// it is a JSON object, wrapped otherwise). The body's own `errorType` is read by the host.
fn error_body(header_type: Option<String>, body: &[u8], default: &str) -> (String, Vec<u8>) {
    let parsed = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|v| v.is_object());
    let ty = header_type.unwrap_or_else(|| default.to_string());
    match parsed {
        Some(_) => (ty, body.to_vec()),
        None => {
            let wrapped = serde_json::json!({
                "errorMessage": String::from_utf8_lossy(body),
                "errorType": default,
            });
            (ty, wrapped.to_string().into_bytes())
        }
    }
}

/// An error type and its JSON body for a stream that ended badly.
fn stream_failure(ty: &str, msg: &str) -> (String, Vec<u8>) {
    let body = serde_json::json!({"errorMessage": msg, "errorType": ty});
    (ty.to_string(), body.to_string().into_bytes())
}

/// The mid-stream error reported in trailers, if any.
fn trailer_error(trailers: &hyper::HeaderMap) -> Option<(String, Vec<u8>)> {
    let ty = trailers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())?
        .to_string();
    let body = trailers
        .get("lambda-runtime-function-error-body")
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
        })
        .unwrap_or_default();
    Some(error_body(Some(ty), &body, "Unhandled"))
}

/// Splits a complete metadata prelude (`{json}` + 8 NULs) off the front of `buf`: the
/// declared content type and the body bytes after it. `None` while the delimiter is missing.
fn split_prelude(buf: &[u8]) -> Option<(Option<String>, Bytes)> {
    let end = buf.windows(8).position(|w| w == [0u8; 8])?;
    let content_type = serde_json::from_slice::<serde_json::Value>(&buf[..end])
        .ok()
        .and_then(|v| {
            let headers = v.get("headers")?.as_object()?;
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .and_then(|(_, v)| v.as_str().map(str::to_string))
        });
    Some((content_type, Bytes::copy_from_slice(&buf[end + 8..])))
}

fn next_response(job: Job) -> Response<Full<Bytes>> {
    let inv = &job.inv;
    let mut resp = Response::new(Full::new(job.payload.clone()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("lambda-runtime-aws-request-id", &inv.id);
    put("lambda-runtime-deadline-ms", &inv.deadline_ms.to_string());
    put("lambda-runtime-invoked-function-arn", &inv.function_arn);
    put("lambda-runtime-trace-id", &inv.trace_id);
    if let Some(cc) = &inv.client_context {
        put("lambda-runtime-client-context", cc);
    }
    if let Some(ci) = &inv.cognito_identity {
        put("lambda-runtime-cognito-identity", ci);
    }
    resp
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn accepted() -> Response<Full<Bytes>> {
    json_response(StatusCode::ACCEPTED, r#"{"status":"OK"}"#.to_string())
}

fn error_response(status: StatusCode, ty: &str, msg: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        serde_json::json!({"errorMessage": msg, "errorType": ty}).to_string(),
    )
}

fn not_found() -> Response<Full<Bytes>> {
    error_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "unknown runtime API path",
    )
}

/// Serves worker `i`'s Runtime API until the next [`Mode::quiesce`] closes it.
async fn accept_loop(rapi: Rc<Rapi>, i: usize, listener: tokio::net::TcpListener) {
    let mut gate = rapi.gate.subscribe();
    gate.mark_unchanged();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gate.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let r = rapi.clone();
        let mut conn_gate = gate.clone();
        tokio::task::spawn_local(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = r.clone();
                async move { Ok::<_, Infallible>(r.handle(i, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = conn_gate.changed() => {}
            }
        });
    }
}

/// Streams worker `i`'s output to the host as `Log` frames.
async fn log_pump(rapi: Rc<Rapi>, i: usize) {
    let mut buf = vec![0u8; LOG_CHUNK];
    loop {
        let Ok(mut guard) = rapi.workers[i].log.readable().await else {
            return;
        };
        let res = guard.try_io(|fd| {
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => rapi.emit_log(i, &buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return,
            Err(_would_block) => {}
        }
    }
}

/// A worker exited: report it (with the invocation it was serving) and end the sandbox.
async fn monitor(rapi: Rc<Rapi>, i: usize, exit: oneshot::Receiver<i32>) {
    let Ok(status) = exit.await else { return };
    rapi.drain(i);
    if rapi.agent.terminating.get() {
        return;
    }
    let (code, signal) = decode_status(status);
    let id = rapi.workers[i].state.borrow().current.clone();
    rapi.agent
        .out
        .json(Kind::Exit, &Exit { id, code, signal }, &[]);
    rapi.agent.out.exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_error_type_header_means_unhandled() {
        let (ty, body) = error_body(
            None,
            br#"{"errorMessage":"x","errorType":"Custom"}"#,
            "Unhandled",
        );
        assert_eq!(ty, "Unhandled");
        assert_eq!(body, br#"{"errorMessage":"x","errorType":"Custom"}"#);
        let (ty, body) = error_body(Some("Handled".into()), b"plain text", "Unhandled");
        assert_eq!(ty, "Handled");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorMessage"], "plain text");
    }

    #[test]
    fn prelude_is_split_off() {
        assert!(split_prelude(b"{\"statusCode\":200}\0\0\0").is_none());
        let (ct, rest) = split_prelude(
            b"{\"statusCode\":200,\"headers\":{\"Content-Type\":\"text/plain\"}}\0\0\0\0\0\0\0\0hello",
        )
        .unwrap();
        assert_eq!(
            (ct.as_deref(), &rest[..]),
            (Some("text/plain"), &b"hello"[..])
        );
        let (ct, rest) = split_prelude(b"not json\0\0\0\0\0\0\0\0").unwrap();
        assert_eq!((ct, rest.len()), (None, 0));
    }

    #[test]
    fn trailers_carry_the_error() {
        let mut t = hyper::HeaderMap::new();
        assert!(trailer_error(&t).is_none());
        t.insert(
            "lambda-runtime-function-error-type",
            HeaderValue::from_static("Oops"),
        );
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(br#"{"errorMessage":"mid","errorType":"Oops"}"#);
        t.insert(
            "lambda-runtime-function-error-body",
            HeaderValue::from_str(&b64).unwrap(),
        );
        let (ty, body) = trailer_error(&t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (ty.as_str(), v["errorMessage"].as_str()),
            ("Oops", Some("mid"))
        );
    }
}
