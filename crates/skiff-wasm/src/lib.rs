//! The `wasm` tier: Wasmtime inside the server process runs two kinds of guest (`.wasm` or
//! `.wat`):
//!
//! * a `wasi:http/proxy` component (exporting `wasi:http/incoming-handler`) serves HTTP
//!   ([`http`]): HTTP triggers hand it the request, other entry points POST the event as
//!   JSON and take the response body as the result;
//! * a WASI command (a preview-1 core module exporting `_start`, or a preview-2 component
//!   exporting `wasi:cli/run`) follows the `command` runtime's contract: the event on stdin,
//!   the reply on stdout, stderr into the invocation's logs, and a non-zero exit or a trap
//!   reported as a function error.
//!
//! One process-wide [`Engine`] (pooling allocator, copy-on-write memory images, epoch
//! interruption) compiles each guest once per content, ahead of time at deploy, keeping the
//! compiled code on disk ([`compile`]); the linked pre-instance is shared by the revision's
//! instances, and every request runs in a fresh [`Store`], so requests never share guest
//! state. Memory is bounded per store by a resource limiter, CPU time by epoch deadlines, and
//! the guest gets no preopened directories and no sockets.

mod compile;
mod http;

use async_trait::async_trait;
use parking_lot::Mutex;
use skiff_core::net::EgressPolicy;
use skiff_core::protocol::ExecMode;
use skiff_core::{FunctionSpec, Network, Runtime as SpecRuntime};
use skiff_sandbox::{
    HttpBody, Instance, InstanceSpec, InvokeRequest, InvokeResult, Sandbox, SandboxError,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the epoch ticks: the granularity of timeouts and stops.
const TICK: Duration = Duration::from_millis(10);
/// Extra time past the invocation's deadline before the guest is interrupted (the scheduler
/// times the invocation out and stops the instance first).
const DEADLINE_GRACE: Duration = Duration::from_millis(250);
/// Revisions whose compiled code is kept; the cache is cleared when it grows past this.
const CACHE_MAX: usize = 256;
/// Largest reply (stdout) a guest may write; one byte more marks it as too large.
const STDOUT_MAX: usize = skiff_core::MAX_PAYLOAD_BYTES;
/// Bytes of stderr kept per invocation.
const LOG_MAX: usize = 1 << 20;
/// Slots of the pooling allocator (linear memories, instances, async stacks): the most
/// requests in flight across all Wasm instances; past this, instantiation fails with a clear
/// error. Slots are address-space reservations, committed only while used.
const POOL_SLOTS: u32 = 1000;
/// Bytes of each freed memory, table and async stack slot kept resident (reset in place).
const KEEP_RESIDENT: usize = 64 << 10;
/// Freed slots whose remaining pages are returned to the kernel together.
const DECOMMIT_BATCH: usize = 32;

/// Errors of loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("handler `{0}` must be a relative path to a .wasm/.wat file inside the package")]
    BadHandler(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid WebAssembly text: {message}")]
    Wat { path: String, message: String },
    #[error(
        "{path} must export `wasi:http/incoming-handler` (a wasi:http/proxy component) or \
         `wasi:cli/run` (a WASI command); it exports: {exports}"
    )]
    NoEntry { path: String, exports: String },
    #[error("{path} does not compile: {message}")]
    Compile { path: String, message: String },
    #[error(
        "{path} must export `_start` (build it as a WASI command, e.g. --target wasm32-wasip1)"
    )]
    NoStart { path: String },
    #[error("{path} cannot be linked: {message}")]
    Link { path: String, message: String },
    #[error("the Wasm engine is not available: {0}")]
    Engine(String),
}

/// Per-store state: the WASI context (preview 1, which also serves preview 2) and the memory
/// limiter.
struct Host {
    wasi: WasiP1Ctx,
    limits: Limits,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// Bounds a store's linear memories and tables; remembers when it refused to grow memory.
struct Limits {
    memory: usize,
    hit: bool,
    peak: usize,
}

impl Limits {
    fn new(memory: u64) -> Limits {
        Limits {
            memory: usize::try_from(memory).unwrap_or(usize::MAX),
            hit: false,
            peak: 0,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The process-wide engine, and the thread that advances its epoch.
fn engine() -> Result<&'static Engine, LoadError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut cfg = Config::new();
            cfg.epoch_interruption(true).memory_init_cow(true);
            let mut pool = PoolingAllocationConfig::new();
            pool.total_memories(POOL_SLOTS)
                .total_core_instances(POOL_SLOTS)
                .total_tables(POOL_SLOTS)
                .total_stacks(POOL_SLOTS)
                .total_component_instances(POOL_SLOTS)
                .max_memory_size(skiff_core::spec::MEMORY_MAX as usize)
                // Reset the first pages of a freed slot in place instead of returning them to
                // the kernel, and return the rest in batches: most per-request cost was page
                // faults and `madvise` calls (see docs/benchmarks.md).
                .linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(KEEP_RESIDENT)
                .async_stack_keep_resident(KEEP_RESIDENT)
                .decommit_batch_size(DECOMMIT_BATCH);
            cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            let engine = Engine::new(&cfg).or_else(|e| {
                // E.g. a small address-space limit: fall back to on-demand allocation.
                tracing::warn!("wasm: pooling allocator unavailable ({e}); allocating on demand");
                cfg.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&cfg)
            });
            let engine = engine.map_err(|e| e.to_string())?;
            let ticker = engine.weak();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while let Some(e) = ticker.upgrade() {
                        e.increment_epoch();
                        drop(e);
                        std::thread::sleep(TICK);
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(engine)
        })
        .as_ref()
        .map_err(|e| LoadError::Engine(e.clone()))
}

/// Compiled and linked code of one guest.
enum Guest {
    /// A preview-1 core module; runs `_start`.
    Module(InstancePre<Host>),
    /// A preview-2 command component; runs `wasi:cli/run`.
    Component(CommandPre<Host>),
    /// A `wasi:http/proxy` component; serves HTTP.
    Http(wasmtime_wasi_http::p2::bindings::ProxyPre<http::HttpHost>),
}

type Prepared = Arc<Guest>;
/// Linked guests by (package directory, handler); package directories are named by the
/// package's content hash, so a key never changes meaning.
type Cache = Mutex<HashMap<(PathBuf, String), Arc<tokio::sync::OnceCell<Prepared>>>>;

/// The Wasm tier. Holds the linked code of the guests it has loaded.
pub struct WasmSandbox {
    cache: Cache,
    /// Where compiled code is kept across restarts; `None` compiles in memory only.
    cache_dir: Option<PathBuf>,
    egress: Arc<EgressPolicy>,
}

impl Default for WasmSandbox {
    fn default() -> Self {
        WasmSandbox::new(None, Arc::default())
    }
}

impl WasmSandbox {
    /// A tier keeping compiled code under `cache_dir`, whose guests' outbound HTTP follows
    /// `egress`.
    pub fn new(cache_dir: Option<PathBuf>, egress: Arc<EgressPolicy>) -> Self {
        WasmSandbox {
            cache: Mutex::default(),
            cache_dir,
            egress,
        }
    }

    /// The linked guest for `handler` in `code_dir`, loading it once (concurrent callers
    /// wait for the one load).
    async fn guest(&self, code_dir: &Path, handler: &str) -> Result<Prepared, SandboxError> {
        let cell = {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                // Forget loaded guests (running instances hold their own `Arc`); loads in
                // progress stay, so their waiters still share one load.
                cache.retain(|_, c| c.get().is_none());
            }
            cache
                .entry((code_dir.to_path_buf(), handler.to_string()))
                .or_default()
                .clone()
        };
        cell.get_or_try_init(|| async {
            let (cache_dir, dir, handler) = (
                self.cache_dir.clone(),
                code_dir.to_path_buf(),
                handler.to_string(),
            );
            let loaded = tokio::task::spawn_blocking(move || {
                compile::load(cache_dir.as_deref(), &dir, &handler)
            })
            .await
            .map_err(|e| SandboxError::Start(format!("wasm compile task failed: {e}")))?;
            loaded.map(Arc::new).map_err(|e| SandboxError::Crashed {
                message: format!("cannot load the Wasm module: {e}"),
                log_tail: String::new(),
            })
        })
        .await
        .cloned()
    }

    /// An instance of `spec` running `pre`.
    fn instance(&self, spec: InstanceSpec, pre: Prepared) -> WasmInstance {
        WasmInstance {
            id: spec.instance_id,
            pre,
            argv0: spec
                .spec
                .handler
                .trim()
                .trim_start_matches("./")
                .to_string(),
            env: spec.env,
            memory_limit: spec.spec.memory,
            timeout: spec.spec.timeout,
            outbound: spec.spec.network == Network::Outbound,
            egress: self.egress.clone(),
            output: Arc::default(),
            shared: Arc::new(Shared {
                stopped: AtomicBool::new(false),
                stop: tokio::sync::watch::channel(false).0,
                memory: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    /// Times per-request instantiation of a `wasi:http` guest, `n` times: a fresh store and
    /// an instance from the shared pre-instance, then dropping both (returning the pool
    /// slot). For `cargo bench -p skiff-wasm`.
    #[doc(hidden)]
    pub async fn bench_instantiate(
        &self,
        spec: InstanceSpec,
        n: usize,
    ) -> Result<Vec<Duration>, SandboxError> {
        let pre = self.guest(&spec.code_dir, &spec.spec.handler).await?;
        let inst = self.instance(spec, pre);
        let Guest::Http(pre) = &*inst.pre else {
            return Err(SandboxError::Unsupported("not a wasi:http guest".into()));
        };
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let mut store = inst.new_store(deadline)?;
            pre.instantiate_async(&mut store)
                .await
                .map_err(|e| SandboxError::Start(format!("{e:#}")))?;
            drop(store);
            times.push(t0.elapsed());
        }
        Ok(times)
    }
}

/// State shared by an instance handle and its running invocations.
struct Shared {
    stopped: AtomicBool,
    /// Becomes true on stop; wakes requests waiting in host calls.
    stop: tokio::sync::watch::Sender<bool>,
    memory: AtomicU64,
    peak: AtomicU64,
}

/// An instance of a revision: the shared linked code, and the limits and environment each
/// invocation's fresh store gets.
#[derive(Clone)]
pub struct WasmInstance {
    id: String,
    pre: Prepared,
    argv0: String,
    env: Vec<(String, String)>,
    memory_limit: u64,
    timeout: Duration,
    /// `network: outbound`.
    outbound: bool,
    egress: Arc<EgressPolicy>,
    /// Output of HTTP guests since it was last taken.
    output: Arc<Mutex<Vec<u8>>>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Sandbox for WasmSandbox {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        if spec.spec.runtime != SpecRuntime::Wasm {
            return Err(SandboxError::Unsupported(format!(
                "the wasm tier cannot run runtime `{}`",
                spec.spec.runtime
            )));
        }
        let pre = self.guest(&spec.code_dir, &spec.spec.handler).await?;
        Ok(Arc::new(self.instance(spec, pre)))
    }

    async fn prepare(
        &self,
        spec: &FunctionSpec,
        code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        if spec.runtime != SpecRuntime::Wasm {
            return Err(SandboxError::Unsupported(format!(
                "the wasm tier cannot run runtime `{}`",
                spec.runtime
            )));
        }
        Ok(match *self.guest(code_dir, &spec.handler).await? {
            Guest::Http(_) => ExecMode::Http,
            Guest::Module(_) | Guest::Component(_) => ExecMode::Command,
        })
    }
}

/// How one run of the guest ended.
enum Ended {
    /// The guest could not be instantiated (e.g. its initial memory is over the limit).
    NotStarted(wasmtime::Error),
    Exited(i32),
    Trapped(wasmtime::Error),
    /// Past its deadline, or the instance was stopped.
    Interrupted,
}

/// What a finished run left behind.
struct Run {
    ended: Ended,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    memory_hit: bool,
    memory_peak: usize,
}

impl WasmInstance {
    /// Runs the guest once in a fresh store (blocking; call off the async threads).
    fn run(&self, payload: Vec<u8>, deadline: Instant) -> Result<Run, SandboxError> {
        let engine = engine().map_err(|e| SandboxError::Start(e.to_string()))?;
        let stdout = MemoryOutputPipe::new(STDOUT_MAX + 1);
        let stderr = MemoryOutputPipe::new(LOG_MAX);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(payload))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&[&self.argv0])
            .envs(&self.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build_p1();
        let mut store = Store::new(
            engine,
            Host {
                wasi,
                limits: Limits::new(self.memory_limit),
            },
        );
        store.limiter(|h| &mut h.limits);
        arm_deadline(&mut store, &self.shared, deadline, false);
        let result = match &*self.pre {
            Guest::Module(pre) => pre
                .instantiate(&mut store)
                .and_then(|i| i.get_typed_func::<(), ()>(&mut store, "_start"))
                .map_err(Err)
                .and_then(|start| start.call(&mut store, ()).map(|()| 0).map_err(Ok)),
            Guest::Component(pre) => pre
                .instantiate(&mut store)
                .map_err(Err)
                .and_then(|command| {
                    let ok = command.wasi_cli_run().call_run(&mut store).map_err(Ok)?;
                    Ok(if ok.is_ok() { 0 } else { 1 })
                }),
            Guest::Http(_) => {
                return Err(SandboxError::Unsupported(
                    "a wasi:http component takes HTTP requests, not events".into(),
                ))
            }
        };
        // `Err(Err(_))`: instantiation failed; `Err(Ok(_))`: the run trapped or exited.
        let ended = match result {
            Ok(code) => Ended::Exited(code),
            Err(Err(e)) => Ended::NotStarted(e),
            Err(Ok(e)) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    Ended::Exited(exit.0)
                } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    Ended::Interrupted
                } else {
                    Ended::Trapped(e)
                }
            }
        };
        let limits = &store.data().limits;
        Ok(Run {
            ended,
            memory_hit: limits.hit,
            memory_peak: limits.peak,
            stdout: stdout.contents().to_vec(),
            stderr: stderr.contents().to_vec(),
        })
    }
}

/// Checks the store's guest at every epoch tick: interrupted once the instance is stopped or
/// `deadline` has passed, else it runs on — yielding to the async executor first when
/// `yield_to_host` (async guests), so a busy guest never holds a server thread for long.
fn arm_deadline<T: 'static>(
    store: &mut Store<T>,
    shared: &Arc<Shared>,
    deadline: Instant,
    yield_to_host: bool,
) {
    let shared = shared.clone();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(
            if shared.stopped.load(Ordering::Relaxed) || Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else if yield_to_host {
                UpdateDeadline::Yield(1)
            } else {
                UpdateDeadline::Continue(1)
            },
        )
    });
}

/// What a trap (or a host error that ended the guest) says.
fn trap_message(e: &wasmtime::Error) -> String {
    let text = match e.downcast_ref::<Trap>() {
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    if text.starts_with("wasm trap") {
        text
    } else {
        format!("wasm trap: {text}")
    }
}

/// A function-error reply in the Lambda shape.
fn function_error(ty: &str, message: &str, stack: Vec<String>, logs: Vec<u8>) -> InvokeResult {
    let body = serde_json::json!({"errorMessage": message, "errorType": ty, "stackTrace": stack});
    InvokeResult {
        body: body.to_string().into_bytes(),
        error_type: Some(ty.to_string()),
        logs,
        ..Default::default()
    }
}

/// The last non-empty lines of `text`.
fn tail_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[async_trait]
impl Instance for WasmInstance {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        if self.shared.stopped.load(Ordering::Relaxed) {
            return Err(SandboxError::Gone);
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let within = Duration::from_millis(req.invoke.deadline_ms.saturating_sub(now_ms));
        let deadline = Instant::now() + within + DEADLINE_GRACE;
        let this = self.clone();
        let run = tokio::task::spawn_blocking(move || this.run(req.payload, deadline))
            .await
            .map_err(|e| SandboxError::Crashed {
                message: format!("the Wasm guest's thread failed: {e}"),
                log_tail: String::new(),
            })??;
        let peak = run.memory_peak as u64;
        self.shared.memory.store(peak, Ordering::Relaxed);
        self.shared.peak.fetch_max(peak, Ordering::Relaxed);
        let Run {
            ended,
            stdout,
            mut stderr,
            memory_hit,
            ..
        } = run;
        if !matches!(ended, Ended::Exited(0)) && !stdout.is_empty() {
            // A failed guest's stdout is not a reply; keep it as logs rather than lose it.
            stderr.extend_from_slice(&stdout);
        }
        let log_text = String::from_utf8_lossy(&stderr).into_owned();
        match ended {
            Ended::Exited(0) if stdout.len() > STDOUT_MAX => Ok(function_error(
                "Function.ResponseSizeTooLarge",
                &format!(
                    "Response payload size exceeded maximum allowed payload size ({STDOUT_MAX} bytes)."
                ),
                Vec::new(),
                stderr,
            )),
            Ended::Exited(0) => Ok(InvokeResult {
                body: stdout,
                logs: stderr,
                ..Default::default()
            }),
            _ if memory_hit => Err(SandboxError::OutOfMemory {
                limit_mb: self.memory_limit >> 20,
                log_tail: log_text,
            }),
            Ended::NotStarted(e) => Err(SandboxError::Crashed {
                message: format!("cannot instantiate the Wasm guest: {e:#}"),
                log_tail: log_text,
            }),
            Ended::Exited(code) => Ok(function_error(
                "Runtime.ExitError",
                &format!("Command exited with non-zero status: {code}"),
                tail_lines(&log_text, 10),
                stderr,
            )),
            Ended::Trapped(e) => {
                let message = trap_message(&e);
                let mut stack: Vec<String> = e
                    .downcast_ref::<wasmtime::WasmBacktrace>()
                    .map(|bt| {
                        bt.to_string()
                            .lines()
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                stack.extend(tail_lines(&log_text, 10));
                Ok(function_error("Runtime.Trap", &message, stack, stderr))
            }
            Ended::Interrupted => Err(SandboxError::Crashed {
                message: "the Wasm guest was interrupted (time limit or stop)".into(),
                log_tail: log_text,
            }),
        }
    }

    async fn stop(&self) {
        // Running guests trap at their next epoch tick; those waiting in host calls wake.
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.stop.send_replace(true);
    }

    fn serves_http(&self) -> bool {
        matches!(*self.pre, Guest::Http(_))
    }

    async fn serve_http(
        &self,
        req: ::http::Request<HttpBody>,
    ) -> Result<::http::Response<HttpBody>, SandboxError> {
        if self.shared.stopped.load(Ordering::Relaxed) {
            return Err(SandboxError::Gone);
        }
        match &*self.pre {
            Guest::Http(pre) => self.serve(pre, req).await,
            _ => Err(SandboxError::Unsupported(
                "this Wasm guest is a command, not a wasi:http component".into(),
            )),
        }
    }

    fn take_output(&self) -> Vec<u8> {
        std::mem::take(&mut *self.output.lock())
    }

    fn is_alive(&self) -> bool {
        !self.shared.stopped.load(Ordering::Relaxed)
    }

    fn memory_usage(&self) -> Option<u64> {
        Some(self.shared.memory.load(Ordering::Relaxed))
    }

    fn memory_peak(&self) -> Option<u64> {
        Some(self.shared.peak.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests;
