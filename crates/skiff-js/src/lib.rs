//! The `js` edge tier: a function is an ES module (`export default async (req) => ...`) run in
//! a QuickJS isolate inside the server process. Each instance owns one QuickJS runtime and
//! context on a dedicated thread (QuickJS is `!Send`) and is driven over a channel. The prelude
//! and the user's module are compiled to bytecode once — the module once per revision, shared
//! by that revision's instances — and instances run in a context without the `Eval` intrinsic,
//! so `eval`, `new Function` and friends throw at the engine level. Memory is bounded by the
//! runtime's allocator limit, CPU time by the interrupt handler.

use async_trait::async_trait;
use parking_lot::Mutex;
use rquickjs::context::intrinsic;
use rquickjs::module::WriteOptions;
use rquickjs::prelude::Rest;
use rquickjs::{Context, Ctx, Function, Module, Object, Promise, Runtime, Value};
use skiff_core::{Network, Runtime as SpecRuntime};
use skiff_sandbox::{Instance, InstanceSpec, InvokeRequest, InvokeResult, Sandbox, SandboxError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Memory bounds for `runtime: js` (bytes); the spec's `memory` must lie within.
pub const MEMORY_MIN: u64 = 64 << 20;
pub const MEMORY_MAX: u64 = 512 << 20;
/// Longest `timeout` for `runtime: js`.
pub const TIMEOUT_MAX: Duration = Duration::from_secs(30);

const PRELUDE_SRC: &str = include_str!("prelude.js");
/// Stack QuickJS may use; the thread gets more so the engine's own check fires first.
const JS_STACK: usize = 1 << 20;
const THREAD_STACK: usize = 4 << 20;
/// Extra time past the invocation's deadline before the isolate interrupts itself (the
/// scheduler times the invocation out and stops the instance first).
const DEADLINE_GRACE: Duration = Duration::from_millis(250);
/// Revisions whose bytecode is kept; the cache is cleared when it grows past this.
const CACHE_MAX: usize = 512;
/// Bytes of output kept per invocation.
const LOG_MAX: usize = 1 << 20;

/// Errors of compiling a module.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("handler `{0}` must be a relative path to a .js/.mjs file inside the package")]
    BadHandler(String),
    #[error("{0}")]
    Syntax(String),
}

/// Module bytecode per (function, revision, code dir).
type BytecodeCache = Arc<Mutex<HashMap<(String, u32, PathBuf), Arc<Vec<u8>>>>>;

/// The JS tier. Cheap to create; holds the bytecode cache and the `fetch` policy.
#[derive(Default)]
pub struct JsSandbox {
    cache: BytecodeCache,
    net: Arc<NetPolicy>,
}

impl JsSandbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tier whose `fetch` follows `net` (tests use [`NetPolicy::allowing_private_for_tests`]).
    pub fn with_net(net: NetPolicy) -> Self {
        JsSandbox {
            cache: BytecodeCache::default(),
            net: Arc::new(net),
        }
    }

    /// The `fetch` policy, e.g. to tell it the gateway's address once bound.
    pub fn net(&self) -> &Arc<NetPolicy> {
        &self.net
    }
}

/// Module resolver and loader that refuse everything: a function is one self-contained
/// module, and neither `import` statements nor dynamic `import()` can load code.
struct NoImports;

impl rquickjs::loader::Resolver for NoImports {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<rquickjs::loader::ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        Err(rquickjs::Error::new_resolving_message(
            base,
            name,
            "imports are not available in the js tier (bundle the function into one module)",
        ))
    }
}

impl rquickjs::loader::Loader for NoImports {
    fn load<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<rquickjs::loader::ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, rquickjs::module::Declared>> {
        Err(rquickjs::Error::new_loading(name))
    }
}

/// State shared between an instance handle and its thread.
struct Shared {
    stop: AtomicBool,
    exited: AtomicBool,
    base: Instant,
    /// Nanoseconds after `base` at which running JS is interrupted; 0 = no deadline.
    deadline: AtomicU64,
    memory: AtomicU64,
    peak: AtomicU64,
}

impl Shared {
    fn should_interrupt(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        let d = self.deadline.load(Ordering::Relaxed);
        d != 0 && self.base.elapsed().as_nanos() as u64 > d
    }
}

enum Cmd {
    Invoke(
        InvokeRequest,
        oneshot::Sender<Result<InvokeResult, SandboxError>>,
    ),
}

/// A running isolate.
pub struct JsInstance {
    id: String,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    exited: Mutex<Option<oneshot::Receiver<()>>>,
    shared: Arc<Shared>,
}

/// What an instance thread needs to start.
struct Setup {
    spec: InstanceSpec,
    cache: BytecodeCache,
    shared: Arc<Shared>,
    /// Precompiled module (ad-hoc [`execute`]); `None` reads `spec.handler` from `code_dir`.
    bytecode: Option<Arc<Vec<u8>>>,
    /// The module export to call.
    export: String,
    net: Arc<NetPolicy>,
    /// Runtime that runs `fetch` requests (`None` outside tokio: `fetch` rejects).
    rt: Option<tokio::runtime::Handle>,
}

#[async_trait]
impl Sandbox for JsSandbox {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        if spec.spec.runtime != SpecRuntime::Js {
            return Err(SandboxError::Unsupported(format!(
                "the js tier cannot run runtime `{}`",
                spec.spec.runtime
            )));
        }
        self.start_isolate(spec, None, "default".into()).await
    }
}

impl JsSandbox {
    async fn start_isolate(
        &self,
        spec: InstanceSpec,
        bytecode: Option<Arc<Vec<u8>>>,
        export: String,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            memory: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel::<()>();
        let id = spec.instance_id.clone();
        let setup = Setup {
            spec,
            cache: self.cache.clone(),
            shared: shared.clone(),
            bytecode,
            export,
            net: self.net.clone(),
            rt: tokio::runtime::Handle::try_current().ok(),
        };
        std::thread::Builder::new()
            .name(format!("js-{id}"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let shared = setup.shared.clone();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_isolate(setup, rx, ready_tx)
                }));
                shared.exited.store(true, Ordering::SeqCst);
                drop(exit_tx);
            })
            .map_err(|e| SandboxError::Start(format!("cannot spawn isolate thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(SandboxError::Crashed {
                    message: "the JS isolate failed while starting".into(),
                    log_tail: String::new(),
                })
            }
        }
        Ok(Arc::new(JsInstance {
            id,
            tx: Mutex::new(Some(tx)),
            exited: Mutex::new(Some(exit_rx)),
            shared,
        }))
    }
}

#[async_trait]
impl Instance for JsInstance {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.tx.lock();
            let sender = guard.as_ref().ok_or(SandboxError::Gone)?;
            sender
                .send(Cmd::Invoke(req, tx))
                .map_err(|_| SandboxError::Gone)?;
        }
        rx.await.unwrap_or_else(|_| {
            Err(SandboxError::Crashed {
                message: "the JS isolate exited without answering".into(),
                log_tail: String::new(),
            })
        })
    }

    async fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        let exited = self.exited.lock().take();
        if let Some(rx) = exited {
            // The thread sees the closed channel, or the interrupt handler the stop flag.
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    fn is_alive(&self) -> bool {
        !self.shared.stop.load(Ordering::Relaxed) && !self.shared.exited.load(Ordering::Relaxed)
    }

    fn memory_usage(&self) -> Option<u64> {
        Some(self.shared.memory.load(Ordering::Relaxed))
    }

    fn memory_peak(&self) -> Option<u64> {
        Some(self.shared.peak.load(Ordering::Relaxed))
    }
}

/// Resolves `handler` inside `code_dir`, refusing paths that leave it.
fn module_path(code_dir: &Path, handler: &str) -> Result<PathBuf, CompileError> {
    skiff_core::launch::package_file(code_dir, handler, &["js", "mjs"])
        .ok_or_else(|| CompileError::BadHandler(handler.to_string()))
}

/// Compiles an ES module to QuickJS bytecode (in a throwaway runtime that has `eval`).
pub fn compile(name: &str, source: &str) -> Result<Vec<u8>, CompileError> {
    let rt = Runtime::new().map_err(|e| CompileError::Syntax(e.to_string()))?;
    rt.set_loader(NoImports, NoImports);
    let ctx = Context::full(&rt).map_err(|e| CompileError::Syntax(e.to_string()))?;
    ctx.with(|ctx| {
        let declared = Module::declare(ctx.clone(), name, source)
            .map_err(|e| CompileError::Syntax(exception_text(&ctx, e)))?;
        declared
            .write(WriteOptions::default())
            .map_err(|e| CompileError::Syntax(exception_text(&ctx, e)))
    })
}

fn prelude_bytecode() -> &'static [u8] {
    static PRELUDE: OnceLock<Vec<u8>> = OnceLock::new();
    PRELUDE.get_or_init(|| compile("skiff:prelude", PRELUDE_SRC).expect("the prelude compiles"))
}

/// The module's bytecode, from the cache or compiled now.
fn module_bytecode(setup: &Setup) -> Result<Arc<Vec<u8>>, CompileError> {
    if let Some(b) = &setup.bytecode {
        return Ok(b.clone());
    }
    let spec = &setup.spec;
    let key = (spec.function.clone(), spec.revision, spec.code_dir.clone());
    if let Some(b) = setup.cache.lock().get(&key) {
        return Ok(b.clone());
    }
    let path = module_path(&spec.code_dir, &spec.spec.handler)?;
    let source = std::fs::read_to_string(&path).map_err(|source| CompileError::Read {
        path: spec.spec.handler.clone(),
        source,
    })?;
    let name = spec.spec.handler.trim().trim_start_matches("./");
    let bytes = Arc::new(compile(name, &source)?);
    let mut cache = setup.cache.lock();
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, bytes.clone());
    Ok(bytes)
}

/// Text of a failed operation: the pending exception's message and stack, if any.
fn exception_text(ctx: &Ctx<'_>, e: rquickjs::Error) -> String {
    if !matches!(e, rquickjs::Error::Exception) {
        return e.to_string();
    }
    let v = ctx.catch();
    if let Some(o) = v.as_object() {
        let name: String = o.get("name").unwrap_or_else(|_| "Error".into());
        let msg: String = o.get("message").unwrap_or_default();
        let stack: String = o.get("stack").unwrap_or_default();
        let head = format!("{name}: {msg}");
        if stack.trim().is_empty() {
            head
        } else {
            format!("{head}\n{}", stack.trim_end())
        }
    } else {
        v.as_string()
            .and_then(|s| s.to_string().ok())
            .unwrap_or_else(|| format!("{v:?}"))
    }
}

fn is_oom_text(s: &str) -> bool {
    s.contains("out of memory")
}

/// The instance thread: builds the isolate, then serves invocations until the channel closes,
/// the instance is stopped, or the isolate ran out of memory or time.
fn run_isolate(
    setup: Setup,
    rx: mpsc::Receiver<Cmd>,
    ready: oneshot::Sender<Result<(), SandboxError>>,
) {
    let fail = |message: String| SandboxError::Crashed {
        message,
        log_tail: String::new(),
    };
    let limit = setup.spec.spec.memory;
    let limit_mb = limit >> 20;
    let rt = match Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(SandboxError::Start(e.to_string())));
            return;
        }
    };
    rt.set_loader(NoImports, NoImports);
    rt.set_memory_limit(limit as usize);
    rt.set_max_stack_size(JS_STACK);
    let shared = setup.shared.clone();
    rt.set_interrupt_handler(Some(Box::new(move || shared.should_interrupt())));
    let ctx = match Context::custom::<(
        intrinsic::Date,
        intrinsic::RegExpCompiler,
        intrinsic::RegExp,
        intrinsic::Json,
        intrinsic::Proxy,
        intrinsic::MapSet,
        intrinsic::TypedArrays,
        intrinsic::Promise,
        intrinsic::Performance,
        intrinsic::WeakRef,
        intrinsic::DOMException,
    )>(&rt)
    {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(SandboxError::Start(e.to_string())));
            return;
        }
    };
    let code = match module_bytecode(&setup) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(fail(format!("cannot load the JS module: {e}"))));
            return;
        }
    };
    let logs: Rc<RefCell<Vec<u8>>> = Rc::default();
    ctx.with(|ctx| {
        let isolate = match Isolate::init(&ctx, &setup, &code, logs.clone()) {
            Ok(i) => i,
            Err(msg) => {
                let logs = String::from_utf8_lossy(&logs.borrow()).into_owned();
                let err = if is_oom_text(&msg) {
                    SandboxError::OutOfMemory {
                        limit_mb,
                        log_tail: logs,
                    }
                } else {
                    SandboxError::Crashed {
                        message: format!("the JS module failed to initialise: {msg}"),
                        log_tail: logs,
                    }
                };
                let _ = ready.send(Err(err));
                return;
            }
        };
        setup.shared.record_memory(&ctx);
        if ready.send(Ok(())).is_err() {
            return;
        }
        while let Ok(Cmd::Invoke(req, reply)) = rx.recv() {
            let result = isolate.invoke(&ctx, &setup, req);
            setup.shared.deadline.store(0, Ordering::SeqCst);
            let fatal = result.is_err();
            let _ = reply.send(result);
            if fatal || setup.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            setup.shared.record_memory(&ctx);
        }
    });
    drop(ctx);
    drop(rt);
}

impl Shared {
    fn record_memory(&self, ctx: &Ctx<'_>) {
        let used = unsafe {
            let mut mu = std::mem::zeroed::<rquickjs::qjs::JSMemoryUsage>();
            rquickjs::qjs::JS_ComputeMemoryUsage(
                rquickjs::qjs::JS_GetRuntime(ctx.as_raw().as_ptr()),
                &mut mu,
            );
            mu.malloc_size.max(0) as u64
        };
        self.memory.store(used, Ordering::Relaxed);
        self.peak.fetch_max(used, Ordering::Relaxed);
    }
}

/// The loaded prelude and user module of one isolate.
struct Isolate<'js> {
    handler: Function<'js>,
    invoke: Function<'js>,
    describe: Function<'js>,
    timer_wait: Function<'js>,
    run_timers: Function<'js>,
    reset_timers: Function<'js>,
    fetch_done: Function<'js>,
    fetches: Fetches,
    logs: Rc<RefCell<Vec<u8>>>,
}

/// Requests of one isolate in flight on the host.
struct Fetches {
    rx: mpsc::Receiver<fetch::Done>,
    inflight: Rc<Cell<usize>>,
}

impl<'js> Isolate<'js> {
    fn init(
        ctx: &Ctx<'js>,
        setup: &Setup,
        code: &[u8],
        logs: Rc<RefCell<Vec<u8>>>,
    ) -> Result<Self, String> {
        let err = |e| exception_text(ctx, e);
        let g = ctx.globals();
        let sink = logs.clone();
        let log = Function::new(ctx.clone(), move |level: String, text: String| {
            let mut buf = sink.borrow_mut();
            if buf.len() < LOG_MAX {
                for line in text.split('\n') {
                    buf.extend_from_slice(b"[Function] ");
                    buf.extend_from_slice(level.as_bytes());
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
            }
        })
        .map_err(err)?;
        g.set("__skiff_log", log).map_err(err)?;
        let uuid = Function::new(ctx.clone(), |_: Rest<Value>| {
            uuid::Uuid::new_v4().to_string()
        })
        .map_err(err)?;
        g.set("__skiff_uuid", uuid).map_err(err)?;
        let env = Object::new(ctx.clone()).map_err(err)?;
        for (k, v) in &setup.spec.env {
            env.set(k.as_str(), v.as_str()).map_err(err)?;
        }
        g.set("__skiff_env", env).map_err(err)?;
        let (fetch_tx, fetch_rx) = mpsc::channel();
        let inflight: Rc<Cell<usize>> = Rc::default();
        let host_fetch = {
            let inflight = inflight.clone();
            let network = setup.spec.spec.network;
            let net = setup.net.clone();
            let rt = setup.rt.clone();
            let shared = setup.shared.clone();
            let fallback = setup.spec.spec.timeout;
            Function::new(
                ctx.clone(),
                move |id: u32,
                      url: String,
                      method: String,
                      headers: String,
                      body: Option<String>|
                      -> String {
                    if network == Network::None {
                        return "fetch is not allowed: the function's network is `none`".into();
                    }
                    let Some(rt) = &rt else {
                        return "fetch is not available here".into();
                    };
                    let headers: Vec<(String, String)> =
                        serde_json::from_str(&headers).unwrap_or_default();
                    let req = fetch::Request {
                        url,
                        method,
                        headers,
                        body,
                    };
                    let timeout = shared.remaining().unwrap_or(fallback);
                    match fetch::start(&net, rt, id, req, timeout, fetch_tx.clone()) {
                        Ok(()) => {
                            inflight.set(inflight.get() + 1);
                            String::new()
                        }
                        Err(e) => e,
                    }
                },
            )
            .map_err(err)?
        };
        g.set("__skiff_fetch", host_fetch).map_err(err)?;

        // SAFETY: the bytecode was produced by `compile` with this QuickJS build.
        let prelude = unsafe { Module::load(ctx.clone(), prelude_bytecode()) }.map_err(err)?;
        let (prelude, done) = prelude.eval().map_err(err)?;
        done.finish::<()>().map_err(err)?;
        // SAFETY: as above; the cache only holds output of `compile`.
        let user = unsafe { Module::load(ctx.clone(), code) }.map_err(err)?;
        let (user, done) = user.eval().map_err(err)?;
        let isolate_get = |name: &str| prelude.get::<_, Function>(name).map_err(err);
        let invoke = isolate_get("invoke")?;
        let iso = Isolate {
            // Replaced by the module's default export once it has been evaluated.
            handler: invoke.clone(),
            invoke,
            describe: isolate_get("describe")?,
            timer_wait: isolate_get("timerWait")?,
            run_timers: isolate_get("runTimers")?,
            reset_timers: isolate_get("resetTimers")?,
            fetch_done: isolate_get("fetchDone")?,
            fetches: Fetches {
                rx: fetch_rx,
                inflight,
            },
            logs,
        };
        // Top-level await may wait on timers: drive them like an invocation.
        setup.shared.set_deadline(setup.spec.spec.timeout);
        let r = iso.settle(ctx, setup, done);
        setup.shared.deadline.store(0, Ordering::SeqCst);
        match r {
            Settled::Ok(_) => {}
            Settled::Threw(v) => return Err(iso.describe_text(ctx, v)),
            Settled::Fatal(Fatal::OutOfMemory) => return Err("out of memory".into()),
            Settled::Fatal(Fatal::Interrupted) => {
                return Err(format!(
                    "module evaluation did not finish within the timeout of {:.2} seconds",
                    setup.spec.spec.timeout.as_secs_f64()
                ))
            }
            Settled::Fatal(Fatal::Engine(e)) => return Err(e),
        }
        let handler: Value = user.get(setup.export.as_str()).map_err(err)?;
        let Some(handler) = handler.into_function() else {
            if setup.export != "default" {
                return Err(format!(
                    "TypeError: the module has no exported function named `{}`",
                    setup.export
                ));
            }
            return Err(format!(
                "{} must `export default` a function, e.g. `export default async (req) => ({{ statusCode: 200, body: \"ok\" }})`",
                setup.spec.spec.handler
            ));
        };
        Ok(Isolate { handler, ..iso })
    }

    fn describe_text(&self, ctx: &Ctx<'js>, v: Value<'js>) -> String {
        let doc: Option<String> = self.describe.call((v,)).ok();
        let _ = ctx.catch();
        match doc.and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok()) {
            Some(d) => {
                let mut s = format!(
                    "{}: {}",
                    d["errorType"].as_str().unwrap_or("Error"),
                    d["errorMessage"].as_str().unwrap_or("")
                );
                for l in d["stackTrace"].as_array().into_iter().flatten() {
                    s.push_str("\n    ");
                    s.push_str(l.as_str().unwrap_or(""));
                }
                s
            }
            None => "unknown error".into(),
        }
    }

    /// Runs jobs and timers until `p` settles, the deadline passes or the instance stops.
    fn settle(&self, ctx: &Ctx<'js>, setup: &Setup, p: Promise<'js>) -> Settled<'js> {
        let shared = &setup.shared;
        loop {
            while ctx.execute_pending_job() {}
            if shared.should_interrupt() {
                return Settled::Fatal(Fatal::Interrupted);
            }
            match p.result::<Value>() {
                Some(Ok(v)) => return Settled::Ok(v),
                Some(Err(rquickjs::Error::Exception)) => {
                    let v = ctx.catch();
                    if is_oom_value(&v) {
                        return Settled::Fatal(Fatal::OutOfMemory);
                    }
                    if is_interrupt_value(&v) || shared.should_interrupt() {
                        return Settled::Fatal(Fatal::Interrupted);
                    }
                    return Settled::Threw(v);
                }
                Some(Err(e)) => return Settled::Fatal(Fatal::Engine(e.to_string())),
                None => {}
            }
            let wait: f64 = match self.timer_wait.call(()) {
                Ok(w) => w,
                Err(e) => return self.failed(ctx, e),
            };
            let fetching = self.fetches.inflight.get() > 0;
            if wait < 0.0 && !fetching {
                return Settled::Fatal(Fatal::Engine(
                    "the handler's promise never settled (nothing left to wait for)".into(),
                ));
            }
            let until =
                (wait >= 0.0).then(|| Instant::now() + Duration::from_secs_f64(wait / 1000.0));
            let mut fetched = None;
            while until.is_none_or(|u| Instant::now() < u) {
                if shared.should_interrupt() {
                    return Settled::Fatal(Fatal::Interrupted);
                }
                let step = until.map_or(Duration::from_millis(5), |u| {
                    (u - Instant::now()).min(Duration::from_millis(5))
                });
                if fetching {
                    if let Ok(done) = self.fetches.rx.recv_timeout(step) {
                        fetched = Some(done);
                        break;
                    }
                } else {
                    std::thread::sleep(step);
                }
            }
            if let Some(done) = fetched {
                if let Err(e) = self.deliver(done) {
                    return self.failed(ctx, e);
                }
                continue;
            }
            if let Err(e) = self.run_timers.call::<_, ()>(()) {
                return self.failed(ctx, e);
            }
        }
    }

    /// Hands a finished `fetch` to the prelude, which settles its promise.
    fn deliver(&self, done: fetch::Done) -> rquickjs::Result<()> {
        self.fetches
            .inflight
            .set(self.fetches.inflight.get().saturating_sub(1));
        match done.result {
            Ok(r) => {
                let headers = serde_json::to_string(&r.headers).unwrap_or_else(|_| "[]".into());
                self.fetch_done.call::<_, ()>((
                    done.id,
                    rquickjs::Null,
                    r.status,
                    r.status_text,
                    r.url,
                    headers,
                    r.body,
                ))
            }
            Err(e) => self.fetch_done.call::<_, ()>((done.id, e)),
        }
    }

    fn failed(&self, ctx: &Ctx<'js>, e: rquickjs::Error) -> Settled<'js> {
        match e {
            rquickjs::Error::Exception => {
                let v = ctx.catch();
                if is_oom_value(&v) {
                    Settled::Fatal(Fatal::OutOfMemory)
                } else if is_interrupt_value(&v) {
                    Settled::Fatal(Fatal::Interrupted)
                } else {
                    Settled::Threw(v)
                }
            }
            e if e.to_string().contains("memory") => Settled::Fatal(Fatal::OutOfMemory),
            e => Settled::Fatal(Fatal::Engine(e.to_string())),
        }
    }

    fn invoke(
        &self,
        ctx: &Ctx<'js>,
        setup: &Setup,
        req: InvokeRequest,
    ) -> Result<InvokeResult, SandboxError> {
        let limit_mb = setup.spec.spec.memory >> 20;
        self.logs.borrow_mut().clear();
        let _ = self.reset_timers.call::<_, ()>(());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        setup.shared.set_deadline(Duration::from_millis(
            req.invoke.deadline_ms.saturating_sub(now_ms),
        ));
        let settled = (|| {
            let context = Object::new(ctx.clone())?;
            context.set("awsRequestId", req.invoke.id.as_str())?;
            context.set("functionName", setup.spec.function.as_str())?;
            context.set("functionVersion", setup.spec.revision.to_string())?;
            context.set("invokedFunctionArn", req.invoke.function_arn.as_str())?;
            context.set("deadlineMs", req.invoke.deadline_ms as f64)?;
            let payload = String::from_utf8_lossy(&req.payload);
            self.invoke
                .call::<_, Promise>((self.handler.clone(), payload.as_ref(), context))
        })();
        let settled = match settled {
            Ok(p) => self.settle(ctx, setup, p),
            Err(e) => self.failed(ctx, e),
        };
        let logs = std::mem::take(&mut *self.logs.borrow_mut());
        match settled {
            Settled::Ok(v) => {
                let body = v
                    .as_string()
                    .and_then(|s| s.to_string().ok())
                    .unwrap_or_else(|| "null".into());
                Ok(InvokeResult {
                    body: body.into_bytes(),
                    logs,
                    ..Default::default()
                })
            }
            Settled::Threw(v) => {
                let doc: Option<String> = self.describe.call((v,)).ok();
                let _ = ctx.catch();
                let doc = doc.unwrap_or_else(|| {
                    r#"{"errorMessage":"unknown error","errorType":"Error","stackTrace":[]}"#.into()
                });
                let error_type = serde_json::from_str::<serde_json::Value>(&doc)
                    .ok()
                    .and_then(|d| d["errorType"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "Error".into());
                Ok(InvokeResult {
                    body: doc.into_bytes(),
                    error_type: Some(error_type),
                    logs,
                    ..Default::default()
                })
            }
            Settled::Fatal(Fatal::OutOfMemory) => Err(SandboxError::OutOfMemory {
                limit_mb,
                log_tail: String::from_utf8_lossy(&logs).into_owned(),
            }),
            Settled::Fatal(Fatal::Interrupted) => Err(SandboxError::Crashed {
                message: "the JS isolate was interrupted (time limit or stop)".into(),
                log_tail: String::from_utf8_lossy(&logs).into_owned(),
            }),
            Settled::Fatal(Fatal::Engine(message)) => Err(SandboxError::Crashed {
                message,
                log_tail: String::from_utf8_lossy(&logs).into_owned(),
            }),
        }
    }
}

impl Shared {
    /// Time left before the invocation's deadline (without the grace), if one is set.
    fn remaining(&self) -> Option<Duration> {
        let d = self.deadline.load(Ordering::Relaxed);
        if d == 0 {
            return None;
        }
        let left = Duration::from_nanos(d).saturating_sub(self.base.elapsed() + DEADLINE_GRACE);
        Some(left.max(Duration::from_millis(1)))
    }

    fn set_deadline(&self, within: Duration) {
        let at = self.base.elapsed() + within + DEADLINE_GRACE;
        self.deadline
            .store(at.as_nanos().max(1) as u64, Ordering::SeqCst);
    }
}

enum Settled<'js> {
    Ok(Value<'js>),
    Threw(Value<'js>),
    Fatal(Fatal),
}

enum Fatal {
    OutOfMemory,
    Interrupted,
    Engine(String),
}

fn error_message(v: &Value<'_>) -> Option<String> {
    v.as_object()?.get::<_, String>("message").ok()
}

fn is_oom_value(v: &Value<'_>) -> bool {
    v.is_null() || error_message(v).is_some_and(|m| is_oom_text(&m))
}

fn is_interrupt_value(v: &Value<'_>) -> bool {
    error_message(v).is_some_and(|m| m == "interrupted")
}

mod adhoc;
pub mod fetch;
pub use adhoc::{execute, AdHoc, AdHocError};
pub use fetch::NetPolicy;

#[cfg(test)]
mod tests;
