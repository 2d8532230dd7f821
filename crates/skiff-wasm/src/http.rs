//! `wasi:http/proxy` components: each request is handed to the component's
//! `wasi:http/incoming-handler` in a fresh store, instantiated from the revision's
//! [`ProxyPre`] by the pooling allocator, and run asynchronously on the server's tokio
//! threads (epoch ticks yield, so a busy guest cannot hog a thread). The response head comes
//! back as soon as the guest sets it; its body streams while the guest keeps running.
//!
//! Outbound requests (`wasi:http/outgoing-handler`) go through [`Egress`]: refused when the
//! function's `network` is `none`, otherwise checked against the server's
//! [`EgressPolicy`] before connecting. The guest gets its environment and nothing else: no
//! preopened directories, no sockets.

use crate::{Limits, WasmInstance, DEADLINE_GRACE, LOG_MAX};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use skiff_core::net::EgressPolicy;
use skiff_sandbox::{BoxError, HttpBody, SandboxError};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

/// Per-request store state.
pub(crate) struct HttpHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    egress: Egress,
    limits: Limits,
}

impl WasiView for HttpHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

/// The guest's outbound HTTP: denied without `network: outbound`, and only to destinations
/// the server's policy allows.
pub(crate) struct Egress {
    pub(crate) allowed: bool,
    pub(crate) policy: Arc<EgressPolicy>,
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        drop(fut);
        if !self.allowed {
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let policy = self.policy.clone();
        Box::new(async move {
            let uri = request.uri();
            let host = uri
                .host()
                .ok_or(HttpError::HttpRequestUriInvalid)?
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
            let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| HttpError::DnsError {
                    rcode: Some("address not found".into()),
                    info_code: None,
                })?
                .collect();
            // Every address the name resolves to must be allowed (the connection may use any).
            if addrs.is_empty()
                || addrs
                    .iter()
                    .any(|a| policy.refuse(a.ip(), Some(port)).is_some())
            {
                return Err(HttpError::DestinationIpProhibited);
            }
            let (resp, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                resp.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// Guest stdout/stderr: appended to the instance's log buffer as it is written.
#[derive(Clone)]
pub(crate) struct LogSink(pub(crate) Arc<Mutex<Vec<u8>>>);

impl LogSink {
    fn push(&self, buf: &[u8]) {
        let mut out = self.0.lock();
        let room = LOG_MAX.saturating_sub(out.len());
        out.extend_from_slice(&buf[..buf.len().min(room)]);
    }
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How a request's guest run ended.
enum RunEnd {
    Returned,
    Trapped(wasmtime::Error),
    /// Past the deadline, or the instance was stopped.
    Interrupted,
}

impl WasmInstance {
    /// A fresh store for one request: WASI with the function's environment and the guest's
    /// output into the instance's logs, `wasi:http` with the egress rules, the memory
    /// limiter, and an epoch callback that yields while time is left and interrupts past
    /// `deadline` or on stop.
    pub(crate) fn new_store(&self, deadline: Instant) -> Result<Store<HttpHost>, SandboxError> {
        let engine = crate::engine().map_err(|e| SandboxError::Start(e.to_string()))?;
        let logs = LogSink(self.output.clone());
        let wasi = WasiCtxBuilder::new()
            .stdout(logs.clone())
            .stderr(logs)
            .envs(&self.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            engine,
            HttpHost {
                wasi,
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                egress: Egress {
                    allowed: self.outbound,
                    policy: self.egress.clone(),
                },
                limits: Limits::new(self.memory_limit),
            },
        );
        store.limiter(|h| &mut h.limits);
        crate::arm_deadline(&mut store, &self.shared, deadline, true);
        Ok(store)
    }

    /// Serves one request with `pre` in a fresh store.
    pub(crate) async fn serve(
        &self,
        pre: &ProxyPre<HttpHost>,
        req: http::Request<HttpBody>,
    ) -> Result<http::Response<HttpBody>, SandboxError> {
        let deadline = Instant::now() + self.timeout + DEADLINE_GRACE;
        let mut store = self.new_store(deadline)?;
        let bad = |e: wasmtime::Error| SandboxError::Crashed {
            message: format!("cannot hand the request to the Wasm guest: {e:#}"),
            log_tail: String::new(),
        };
        let req = req.map(|b| {
            b.map_err(|e| HttpError::InternalError(Some(e.to_string())))
                .boxed_unsync()
        });
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(bad)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let out = store
            .data_mut()
            .http()
            .new_response_outparam(tx)
            .map_err(bad)?;
        let pre = pre.clone();
        let mut stop = self.shared.stop.subscribe();
        let shared = self.shared.clone();
        // The guest runs in its own task: it may keep writing the body after the head is
        // sent. Dropping the task's future drops the store and frees its pool slot.
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            let end = tokio::select! {
                r = run => match r {
                    Ok(()) => RunEnd::Returned,
                    Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => RunEnd::Interrupted,
                    Err(e) => RunEnd::Trapped(e),
                },
                _ = tokio::time::sleep_until(deadline.into()) => RunEnd::Interrupted,
                _ = stop.wait_for(|s| *s) => RunEnd::Interrupted,
            };
            let limits = &store.data().limits;
            let peak = limits.peak as u64;
            shared.memory.store(peak, Ordering::Relaxed);
            shared.peak.fetch_max(peak, Ordering::Relaxed);
            (end, limits.hit)
        });
        match rx.await {
            Ok(Ok(resp)) => Ok(resp.map(|b| {
                b.map_err(|e| -> BoxError { e.to_string().into() })
                    .boxed_unsync()
            })),
            Ok(Err(code)) => Err(SandboxError::Crashed {
                message: format!("the Wasm guest answered with an error: {code:?}"),
                log_tail: self.log_tail(),
            }),
            // The guest never set a response: its run says why.
            Err(_) => {
                let (end, memory_hit) = task.await.map_err(|e| SandboxError::Crashed {
                    message: format!("the Wasm guest's task failed: {e}"),
                    log_tail: String::new(),
                })?;
                let log_tail = self.log_tail();
                Err(match end {
                    _ if memory_hit => SandboxError::OutOfMemory {
                        limit_mb: self.memory_limit >> 20,
                        log_tail,
                    },
                    RunEnd::Returned => SandboxError::Crashed {
                        message: "the Wasm guest returned without setting a response".into(),
                        log_tail,
                    },
                    RunEnd::Trapped(e) => SandboxError::Crashed {
                        message: crate::trap_message(&e),
                        log_tail,
                    },
                    RunEnd::Interrupted => SandboxError::Crashed {
                        message: "the Wasm guest was interrupted (time limit or stop)".into(),
                        log_tail,
                    },
                })
            }
        }
    }

    /// The last lines the instance's guests wrote.
    fn log_tail(&self) -> String {
        let out = self.output.lock();
        let text = String::from_utf8_lossy(&out[out.len().saturating_sub(4096)..]);
        text.into_owned()
    }
}
