//! The `js` edge tier: a function is an ES module (`export default async (req) => ...`) run in
//! a QuickJS isolate inside the server process. Each instance owns one QuickJS runtime and
//! context, and a thread that runs its event loop and takes invocations over a channel (or
//! lets callers run them inline, below). The prelude
//! and the user's module are compiled to bytecode once — the module once per revision, shared
//! by that revision's instances — and instances run in a context without the `Eval` intrinsic,
//! so `eval`, `new Function` and friends throw at the engine level. Memory is bounded by the
//! runtime's allocator limit, CPU time by the interrupt handler.
//!
//! # Many invocations per isolate
//!
//! The instance thread is an event loop, like a Workers isolate: it serves up to the spec's
//! `concurrency` invocations at once and interleaves them. Work arrives as *macrotasks* —
//! an invocation's handler call, a due `setTimeout` callback, a finished `fetch` — and after
//! each one the microtask (promise job) queue is drained, so while one handler awaits a timer
//! or a request the others start and progress. Module state is shared by all invocations of
//! an isolate. Per invocation the isolate keeps:
//!
//! - its **result**: the prelude reports each handler's settled promise to the host
//!   (`__skiff_settle`), which answers exactly that invocation;
//! - its **deadline**: an invocation still pending past its deadline (plus a short grace,
//!   so the scheduler's own timeout answers first) fails alone with an "interrupted" error; JS
//!   *running* past the deadline of the invocation whose macrotask it is gets interrupted,
//!   which — like running out of memory — fails the whole isolate and every invocation in it
//!   (a runaway loop blocks the thread for everyone);
//! - its **logs**: `console.*` output goes to the invocation whose macrotask is running. Timers
//!   and fetches remember the invocation that created them, so output after `await`ing them
//!   lands in the right log. The attribution is causal per macrotask: a continuation that is
//!   resumed by *another* invocation's macrotask (e.g. two handlers awaiting one shared promise
//!   that the second one resolves) logs into that other invocation. Timers and fetches an
//!   invocation leaves behind are dropped when it finishes (as they were with one invocation
//!   per isolate).
//!
//! With `concurrency: 1` the loop serves one invocation at a time, as before.
//!
//! # Inline invocations
//!
//! The isolate (runtime, context, the prelude's entry points) sits behind a lock, not inside
//! its thread. A caller on a multi-threaded tokio runtime that finds the lock free runs its
//! invocation's first macrotask right there, on its own thread: the handler call and every
//! promise job it queues. Most handlers settle within that macrotask, and the caller answers
//! without a thread hand-off in either direction (each costs tens of µs on a virtual machine
//! whose idle vCPUs halt). Only what is left — an invocation awaiting a timer or a `fetch` —
//! goes on in the isolate's thread, which is told to look again. A caller that finds the lock
//! taken queues its invocation for the thread as before, and under concurrent load (anything
//! queued, or taken from the queue in the last `QUEUE_LINGER`) every caller does.
//!
//! JS running inline holds a runtime worker. Past `INLINE_BUDGET` the interrupt handler
//! hands that worker's other tasks to a new thread (`block_in_place`), so a CPU-heavy handler
//! never stalls the gateway. Inline, nothing else can time the invocation out while its JS
//! runs, so its JS is interrupted at the deadline itself (not after the grace) and the caller
//! waits a moment before answering, letting its own timeout (the scheduler's) report a timeout.

use async_trait::async_trait;
use parking_lot::Mutex;
use rquickjs::context::intrinsic;
use rquickjs::module::WriteOptions;
use rquickjs::prelude::Rest;
use rquickjs::{Context, Ctx, Function, Module, Object, Persistent, Promise, Runtime, Value};
use skiff_core::{Network, Runtime as SpecRuntime};
use skiff_sandbox::{Instance, InstanceSpec, InvokeRequest, InvokeResult, Sandbox, SandboxError};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
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
    /// The interrupt handler stopped running JS: the isolate cannot go on.
    fired: AtomicBool,
    /// The isolate failed (out of memory, interrupted) and runs nothing more.
    dead: AtomicBool,
    /// Nanoseconds after `base` at which the invocation running inline on a caller's thread
    /// started; 0 = none.
    inline_since: AtomicU64,
    /// That inline invocation has already handed its runtime worker's tasks away.
    handed_off: AtomicBool,
    /// Invocations ran since the heap was last measured.
    dirty: AtomicBool,
    /// Nanoseconds after `base` of the last invocation activity (measuring waits for quiet).
    active: AtomicU64,
    /// Invocations started inline on their caller's thread.
    inline_runs: AtomicU64,
    /// Invocations queued for the isolate thread and not yet started by it.
    queued: AtomicU64,
    /// Nanoseconds after `base` until which callers queue rather than run inline: the
    /// isolate thread took queued invocations recently (there is concurrent load).
    queue_until: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Shared {
            stop: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            memory: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            inline_since: AtomicU64::new(0),
            handed_off: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            active: AtomicU64::new(0),
            inline_runs: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queue_until: AtomicU64::new(0),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }

    /// The interrupt handler: whether running JS must stop. Also hands an inline
    /// invocation's runtime worker away once it has run past [`INLINE_BUDGET`].
    fn should_interrupt(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        let d = self.deadline.load(Ordering::Relaxed);
        let since = self.inline_since.load(Ordering::Relaxed);
        if d == 0 && since == 0 {
            return false;
        }
        let now = self.nanos(Instant::now());
        if d != 0 && now > d {
            return true;
        }
        if since != 0
            && now.saturating_sub(since) > INLINE_BUDGET.as_nanos() as u64
            && !self.handed_off.swap(true, Ordering::Relaxed)
        {
            hand_off_worker();
        }
        false
    }

    /// Interrupt JS still running at `at` (`None`: no limit).
    fn interrupt_at(&self, at: Option<Instant>) {
        let nanos = at.map_or(0, |at| self.nanos(at).max(1));
        self.deadline.store(nanos, Ordering::SeqCst);
    }

    /// Notes invocation activity at `at` (nanoseconds after `base`); true if the heap was
    /// clean until now (the instance thread must be told, so it measures once things are
    /// quiet).
    fn touch(&self, at: u64) -> bool {
        self.active.store(at, Ordering::Relaxed);
        !self.dirty.swap(true, Ordering::Relaxed)
    }
}

/// How long JS may run inline on a runtime worker before the worker's other tasks are handed
/// to another thread.
const INLINE_BUDGET: Duration = Duration::from_millis(1);
/// How long callers keep queueing invocations for the isolate thread after it last took one:
/// under concurrent load the thread takes them in batches while the callers' workers go on
/// with HTTP, which beats contending for the isolate.
const QUEUE_LINGER: Duration = Duration::from_millis(2);
/// How long a caller whose inline invocation was interrupted at its deadline waits before
/// answering, so that its own timeout (due at the same moment) reports it.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);
/// Longest wait for another thread to take over a runtime worker's tasks.
const HAND_OFF_WAIT: Duration = Duration::from_millis(5);

/// Whether an invocation may run inline on this thread: only on a worker of a multi-threaded
/// tokio runtime, whose tasks can be handed to another thread if the JS runs long.
fn inline_allowed() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Called from the interrupt handler while JS runs inline past its budget: moves this
/// runtime worker's tasks to another thread (`block_in_place`), waiting until some worker
/// runs a probe task, so the runtime keeps serving while the JS goes on here.
fn hand_off_worker() {
    if !inline_allowed() {
        return;
    }
    let handle = tokio::runtime::Handle::current();
    let ran = Arc::new(AtomicBool::new(false));
    let probe = ran.clone();
    // `block_in_place` panics where blocking is not allowed (which `inline_allowed` rules
    // out); a panic must not unwind through QuickJS.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| {
            handle.spawn(async move { probe.store(true, Ordering::SeqCst) });
            let until = Instant::now() + HAND_OFF_WAIT;
            while !ran.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    }));
    tracing::debug!("js: a handler ran past its inline budget; its runtime worker was handed off");
}

/// Work for an instance thread.
enum Event {
    Invoke(
        InvokeRequest,
        oneshot::Sender<Result<InvokeResult, SandboxError>>,
    ),
    /// A `fetch` finished on the host.
    Fetched(fetch::Done),
    /// Look again: an invocation that ran inline left work (or an unmeasured heap) behind.
    Wake,
    /// Fail what is in flight and exit.
    Stop,
    /// The handle was dropped: finish what is in flight, then exit.
    Closed,
}

/// A running isolate.
pub struct JsInstance {
    id: String,
    tx: Mutex<Option<mpsc::Sender<Event>>>,
    exited: Mutex<Option<oneshot::Receiver<()>>>,
    setup: Arc<Setup>,
    /// The isolate, while it lives (its thread takes it out when it exits).
    core: Arc<Mutex<Option<Core>>>,
    host: Arc<Mutex<Host>>,
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
    /// The thread's own queue, for `fetch` completions.
    events: mpsc::Sender<Event>,
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
        let inst: Arc<dyn Instance> = self.start_isolate(spec, None, "default".into()).await?;
        Ok(inst)
    }
}

impl JsSandbox {
    async fn start_isolate(
        &self,
        spec: InstanceSpec,
        bytecode: Option<Arc<Vec<u8>>>,
        export: String,
    ) -> Result<Arc<JsInstance>, SandboxError> {
        let shared = Arc::new(Shared::new());
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel::<()>();
        let id = spec.instance_id.clone();
        let setup = Arc::new(Setup {
            spec,
            cache: self.cache.clone(),
            shared: shared.clone(),
            bytecode,
            export,
            net: self.net.clone(),
            rt: tokio::runtime::Handle::try_current().ok(),
            events: tx.clone(),
        });
        let core: Arc<Mutex<Option<Core>>> = Arc::default();
        let host: Arc<Mutex<Host>> = Arc::default();
        let thread = Thread {
            setup: setup.clone(),
            core: core.clone(),
            host: host.clone(),
        };
        std::thread::Builder::new()
            .name(format!("js-{id}"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let shared = thread.setup.shared.clone();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    thread.run(rx, ready_tx)
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
            setup,
            core,
            host,
        }))
    }
}

/// How an inline run ended.
enum Inline {
    /// It ran; `timed_out`: its JS was interrupted at its deadline.
    Ran { timed_out: bool },
    /// The isolate was busy (or this thread may not run it): queue it for the isolate thread.
    Busy(
        InvokeRequest,
        oneshot::Sender<Result<InvokeResult, SandboxError>>,
    ),
}

impl JsInstance {
    /// Runs `req`'s first macrotask on this thread if the isolate is free (see the module
    /// docs); whatever it leaves pending goes on in the isolate thread.
    fn run_inline(
        &self,
        req: InvokeRequest,
        reply: oneshot::Sender<Result<InvokeResult, SandboxError>>,
    ) -> Inline {
        // Under concurrent load (invocations queued, or taken by the isolate thread in the
        // last [`QUEUE_LINGER`]) join the queue: see there.
        let shared = &self.setup.shared;
        let now = shared.nanos(Instant::now()).max(1);
        if shared.queued.load(Ordering::Relaxed) != 0
            || shared.queue_until.load(Ordering::Relaxed) > now
            || shared.stop.load(Ordering::Relaxed)
            || !inline_allowed()
        {
            return Inline::Busy(req, reply);
        }
        let Some(mut guard) = self.core.try_lock() else {
            return Inline::Busy(req, reply);
        };
        let Some(core) = guard.as_mut().filter(|c| !c.dead) else {
            return Inline::Busy(req, reply);
        };
        shared.inline_runs.fetch_add(1, Ordering::Relaxed);
        shared.handed_off.store(false, Ordering::Relaxed);
        shared.inline_since.store(now, Ordering::Relaxed);
        let setup = &self.setup;
        let failed = core.enter(&self.host, true, |iso| {
            let fatal = iso.start(setup, req, reply).err()?;
            let timed_out =
                matches!(fatal, Fatal::Interrupted) && !shared.stop.load(Ordering::SeqCst);
            iso.die(setup, fatal);
            Some(timed_out)
        });
        shared.inline_since.store(0, Ordering::Relaxed);
        if failed.is_some() {
            core.dead = true;
        }
        let pending = !self.host.lock().invs.is_empty();
        let wake = shared.touch(now) || pending || failed.is_some();
        drop(guard);
        if wake {
            if let Some(tx) = self.tx.lock().as_ref() {
                let _ = tx.send(Event::Wake);
            }
        }
        Inline::Ran {
            timed_out: failed.unwrap_or(false),
        }
    }
}

#[async_trait]
impl Instance for JsInstance {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        let (tx, mut rx) = oneshot::channel();
        match self.run_inline(req, tx) {
            Inline::Ran { timed_out } => {
                if let Ok(r) = rx.try_recv() {
                    if timed_out {
                        // Let the caller's own timeout, due by now (give or take the clocks'
                        // millisecond granularity), report it as one.
                        tokio::time::sleep(TIMEOUT_SLACK).await;
                    }
                    return r;
                }
            }
            Inline::Busy(req, tx) => {
                let guard = self.tx.lock();
                let sender = guard.as_ref().ok_or(SandboxError::Gone)?;
                self.setup.shared.queued.fetch_add(1, Ordering::Relaxed);
                if sender.send(Event::Invoke(req, tx)).is_err() {
                    self.setup.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    return Err(SandboxError::Gone);
                }
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(SandboxError::Crashed {
                message: "the JS isolate exited without answering".into(),
                log_tail: String::new(),
            })
        })
    }

    async fn stop(&self) {
        self.setup.shared.stop.store(true, Ordering::SeqCst);
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(Event::Stop);
        }
        let exited = self.exited.lock().take();
        if let Some(rx) = exited {
            // The thread sees the stop event, or the interrupt handler the stop flag.
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    fn is_alive(&self) -> bool {
        !self.setup.shared.stop.load(Ordering::Relaxed)
            && !self.setup.shared.exited.load(Ordering::Relaxed)
            && !self.setup.shared.dead.load(Ordering::Relaxed)
    }

    fn memory_usage(&self) -> Option<u64> {
        Some(self.setup.shared.memory.load(Ordering::Relaxed))
    }

    fn memory_peak(&self) -> Option<u64> {
        Some(self.setup.shared.peak.load(Ordering::Relaxed))
    }
}

impl Drop for JsInstance {
    fn drop(&mut self) {
        // The thread holds a sender of its own (for fetches), so tell it explicitly.
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(Event::Closed);
        }
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

/// The error of an in-flight invocation when the isolate is stopped or interrupted, or the
/// invocation passed its deadline (`execute` maps "interrupted" to its timeout error).
const INTERRUPTED: &str = "the JS isolate was interrupted (time limit or stop)";
const NEVER_SETTLED: &str = "the handler's promise never settled (nothing left to wait for)";
/// Events handled per loop turn before due timers and deadlines get their turn.
const EVENT_BATCH: usize = 1024;
/// How often the isolate's memory is measured while invocations are in flight.
const MEMORY_EVERY: Duration = Duration::from_millis(100);
/// How long an isolate stays idle before its heap is measured.
const IDLE_MEASURE_AFTER: Duration = Duration::from_millis(2);
/// How soon to look again when a measurement found the isolate busy with inline invocations.
const IDLE_RECHECK: Duration = Duration::from_millis(20);

/// The isolate: its runtime and context and the prelude's entry points, owned by whichever
/// thread holds [`JsInstance::core`]'s lock (the instance thread, or a caller running an
/// invocation inline).
struct Core {
    // Field order is drop order: the saved functions before their context and runtime.
    fns: Fns,
    ctx: Context,
    _rt: Runtime,
    /// The isolate failed: nothing may run in it again.
    dead: bool,
}

// SAFETY: `Runtime` and `Context` are `Send` (rquickjs's `parallel` feature: every use goes
// through the runtime's lock). The saved functions are plain values of that runtime, only
// restored inside `Context::with` and dropped before it; they are not `Send` merely because
// they hold a raw runtime pointer. A `Core` is only reached through its mutex.
unsafe impl Send for Core {}

/// Declares the isolate's JS entry points (the user's handler and the prelude's exports the
/// host calls) once: live in a context as [`Entry`], saved across lock holders as [`Fns`].
macro_rules! entry_points {
    ($($name:ident),* $(,)?) => {
        /// The user's handler and the prelude's exports, live in a context.
        struct Entry<'js> {
            $($name: Function<'js>,)*
        }

        /// [`Entry`] saved across lock holders.
        struct Fns {
            $($name: Persistent<Function<'static>>,)*
        }

        impl Fns {
            fn save<'js>(ctx: &Ctx<'js>, e: &Entry<'js>) -> Fns {
                Fns { $($name: Persistent::save(ctx, e.$name.clone()),)* }
            }

            fn restore<'js>(&self, ctx: &Ctx<'js>) -> Entry<'js> {
                Entry {
                    $($name: self.$name.clone().restore(ctx).expect("saved from this isolate's runtime"),)*
                }
            }
        }
    };
}

entry_points!(
    handler,
    watch,
    describe,
    fire,
    forget,
    reset_timers,
    fetch_done
);

impl Core {
    /// Runs `f` on the isolate (`inline`: on a caller's thread, see the module docs).
    fn enter<R>(
        &mut self,
        host: &Arc<Mutex<Host>>,
        inline: bool,
        f: impl FnOnce(&mut Isolate<'_>) -> R,
    ) -> R {
        let fns = &self.fns;
        self.ctx.with(|ctx| {
            let mut iso = Isolate {
                js: fns.restore(&ctx),
                ctx,
                host: host.clone(),
                inline,
            };
            f(&mut iso)
        })
    }
}

/// The instance thread's share of an instance.
struct Thread {
    setup: Arc<Setup>,
    core: Arc<Mutex<Option<Core>>>,
    host: Arc<Mutex<Host>>,
}

impl Thread {
    /// Builds the isolate, then runs its event loop until the instance is stopped or dropped,
    /// or the isolate ran out of memory or time; the isolate is dropped on this thread.
    fn run(&self, rx: mpsc::Receiver<Event>, ready: oneshot::Sender<Result<(), SandboxError>>) {
        let core = match self.build(&rx) {
            Ok(core) => core,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        *self.core.lock() = Some(core);
        if ready.send(Ok(())).is_ok() {
            self.serve(&rx);
        }
        let core = self.core.lock().take();
        drop(core);
    }

    /// Creates the runtime and context and loads the prelude and the user's module.
    fn build(&self, rx: &mpsc::Receiver<Event>) -> Result<Core, SandboxError> {
        let setup = &*self.setup;
        let limit = setup.spec.spec.memory;
        let limit_mb = limit >> 20;
        let rt = Runtime::new().map_err(|e| SandboxError::Start(e.to_string()))?;
        rt.set_loader(NoImports, NoImports);
        rt.set_memory_limit(limit as usize);
        rt.set_max_stack_size(JS_STACK);
        let shared = setup.shared.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            let stop = shared.should_interrupt();
            if stop {
                shared.fired.store(true, Ordering::SeqCst);
            }
            stop
        })));
        let ctx = Context::custom::<(
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
        .map_err(|e| SandboxError::Start(e.to_string()))?;
        let code = module_bytecode(setup).map_err(|e| SandboxError::Crashed {
            message: format!("cannot load the JS module: {e}"),
            log_tail: String::new(),
        })?;
        let fns = ctx.with(|ctx| {
            let isolate = Isolate::init(&ctx, setup, &code, self.host.clone(), rx);
            match isolate {
                Ok(iso) => {
                    setup.shared.record_memory(&ctx);
                    Ok(Fns::save(&iso.ctx, &iso.js))
                }
                Err(msg) => {
                    let logs = String::from_utf8_lossy(&self.host.lock().init_logs).into_owned();
                    Err(if is_oom_text(&msg) {
                        SandboxError::OutOfMemory {
                            limit_mb,
                            log_tail: logs,
                        }
                    } else {
                        SandboxError::Crashed {
                            message: format!("the JS module failed to initialise: {msg}"),
                            log_tail: logs,
                        }
                    })
                }
            }
        })?;
        Ok(Core {
            fns,
            ctx,
            _rt: rt,
            dead: false,
        })
    }

    /// The event loop: queued invocations, due timers, finished fetches, deadlines and the
    /// idle heap measurement, until the instance is stopped (or dropped and idle) or the
    /// isolate fails. The isolate's lock is held only while there is work.
    fn serve(&self, rx: &mpsc::Receiver<Event>) {
        let setup = &*self.setup;
        let shared = &setup.shared;
        let mut closed = false;
        let mut measured = Instant::now();
        // The last wake-up to measure found the isolate busy (inline invocations).
        let mut busy = false;
        loop {
            let (wake, idle) = {
                let h = self.host.lock();
                (h.next_wake(), h.invs.is_empty())
            };
            if closed && idle {
                return;
            }
            // An idle isolate's heap is measured once it has stayed quiet for a moment, not
            // after every invocation: walking the heap costs as much as a small invocation.
            let dirty = shared.dirty.load(Ordering::Relaxed);
            let measure_at = (idle && dirty).then(|| {
                let quiet =
                    shared.instant(shared.active.load(Ordering::Relaxed)) + IDLE_MEASURE_AFTER;
                if busy {
                    quiet.max(Instant::now() + IDLE_RECHECK)
                } else {
                    quiet
                }
            });
            let wake = match (wake, measure_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = match wake {
                None => Some(rx.recv().unwrap_or(Event::Closed)),
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(e) => Some(e),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Event::Closed),
                },
            };
            // Only take the isolate's lock when there is work for it, so inline callers
            // (which never wait for the lock) mostly find it free.
            let mut measure = false;
            match &first {
                // An inline invocation ran: measure later. If it left itself pending, take a
                // turn (deadlines, stuck invocations); if it killed the isolate, exit below.
                Some(Event::Wake)
                    if !shared.dead.load(Ordering::SeqCst) && self.host.lock().invs.is_empty() =>
                {
                    continue
                }
                Some(_) => {}
                None => {
                    let now = Instant::now();
                    let (due, idle) = {
                        let h = self.host.lock();
                        (h.next_wake().is_some_and(|at| at <= now), h.invs.is_empty())
                    };
                    let dirty = shared.dirty.load(Ordering::Relaxed);
                    let quiet = shared.instant(shared.active.load(Ordering::Relaxed))
                        + IDLE_MEASURE_AFTER
                        <= now;
                    busy = idle && dirty && !quiet;
                    measure = idle && dirty && (quiet || measured.elapsed() >= MEMORY_EVERY);
                    if !due && !measure {
                        continue;
                    }
                }
            }
            let mut guard = self.core.lock();
            let Some(core) = guard.as_mut().filter(|c| !c.dead) else {
                return;
            };
            let go_on = core.enter(&self.host, false, |iso| {
                let r = iso.turn(setup, first, rx, &mut closed);
                if let Err(f) = r {
                    iso.die(setup, f);
                    return false;
                }
                // Quiet at last, or busy for a while: measure.
                if measure
                    || (shared.dirty.load(Ordering::Relaxed) && measured.elapsed() >= MEMORY_EVERY)
                {
                    busy = false;
                    shared.dirty.store(false, Ordering::Relaxed);
                    shared.record_memory(&iso.ctx);
                    measured = Instant::now();
                }
                true
            });
            if !go_on {
                core.dead = true;
                return;
            }
        }
    }
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

/// Why an isolate cannot go on; every invocation in flight fails with it.
#[derive(Debug)]
enum Fatal {
    OutOfMemory,
    Interrupted,
    Engine(String),
}

/// How an invocation's promise settled, as reported by the prelude.
enum Outcome {
    /// The reply as JSON text.
    Ok(String),
    /// The Lambda error document of what it threw.
    Threw(String),
    Fatal(Fatal),
}

/// An invocation in flight.
struct Inv {
    reply: oneshot::Sender<Result<InvokeResult, SandboxError>>,
    /// When the isolate gives up on it: its deadline plus [`DEADLINE_GRACE`].
    expires: Instant,
    logs: Vec<u8>,
    timers: HashSet<u32>,
    fetches: HashSet<u32>,
}

/// Isolate-thread state shared by the event loop and the host functions the prelude calls.
#[derive(Default)]
struct Host {
    /// The invocation whose macrotask is running; 0 while the module initialises.
    current: u64,
    invs: HashMap<u64, Inv>,
    /// Output of module initialisation (the log tail of a failed start).
    init_logs: Vec<u8>,
    /// Pending timers in firing order (due, id) with their invocation.
    queue: BTreeMap<(Instant, u32), u64>,
    timers: HashMap<u32, Instant>,
    /// Fetches running on the host: id → invocation.
    fetches: HashMap<u32, u64>,
    /// (expires, id) of the invocations in flight, soonest first.
    expiries: BTreeSet<(Instant, u64)>,
    /// Invocations whose promise settled since the loop last looked.
    settled: Vec<(u64, Outcome)>,
    /// The id of the last invocation started.
    next_id: u64,
}

impl Host {
    fn log_sink(&mut self) -> Option<&mut Vec<u8>> {
        match self.current {
            0 => Some(&mut self.init_logs),
            id => self.invs.get_mut(&id).map(|i| &mut i.logs),
        }
    }

    fn add_timer(&mut self, id: u32, at: Instant) {
        let owner = self.current;
        self.queue.insert((at, id), owner);
        self.timers.insert(id, at);
        if let Some(inv) = self.invs.get_mut(&owner) {
            inv.timers.insert(id);
        }
    }

    fn remove_timer(&mut self, id: u32) -> Option<u64> {
        let at = self.timers.remove(&id)?;
        let owner = self.queue.remove(&(at, id))?;
        if let Some(inv) = self.invs.get_mut(&owner) {
            inv.timers.remove(&id);
        }
        Some(owner)
    }

    /// The first timer due at `now`, taken off the queue, with its invocation.
    fn pop_due(&mut self, now: Instant) -> Option<(u32, u64)> {
        let (&(at, id), _) = self.queue.first_key_value()?;
        if at > now {
            return None;
        }
        self.remove_timer(id).map(|owner| (id, owner))
    }

    /// Takes invocation `id` out of flight, dropping its timers and fetches.
    fn finish(&mut self, id: u64) -> Option<Inv> {
        let inv = self.invs.remove(&id)?;
        self.expiries.remove(&(inv.expires, id));
        for t in &inv.timers {
            if let Some(at) = self.timers.remove(t) {
                self.queue.remove(&(at, *t));
            }
        }
        for f in &inv.fetches {
            self.fetches.remove(f);
        }
        Some(inv)
    }

    /// When the loop must look again without an event: the next timer or deadline.
    fn next_wake(&self) -> Option<Instant> {
        let timer = self.queue.first_key_value().map(|(&(at, _), _)| at);
        let expiry = self.expiries.first().map(|&(at, _)| at);
        match (timer, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The loaded prelude and user module of one isolate, and its event loop.
struct Isolate<'js> {
    ctx: Ctx<'js>,
    js: Entry<'js>,
    host: Arc<Mutex<Host>>,
    /// Running on a caller's thread (see the module docs), not the isolate thread.
    inline: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl<'js> Isolate<'js> {
    fn init(
        ctx: &Ctx<'js>,
        setup: &Setup,
        code: &[u8],
        host: Arc<Mutex<Host>>,
        rx: &mpsc::Receiver<Event>,
    ) -> Result<Self, String> {
        let err = |e| exception_text(ctx, e);
        let g = ctx.globals();
        let sink = host.clone();
        let log = Function::new(ctx.clone(), move |level: String, text: String| {
            let mut h = sink.lock();
            let Some(buf) = h.log_sink() else { return };
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
        let timers = host.clone();
        let timer = Function::new(ctx.clone(), move |id: u32, ms: f64| {
            let ms = if ms.is_finite() {
                ms.clamp(0.0, 1e12)
            } else {
                0.0
            };
            let at = Instant::now() + Duration::from_secs_f64(ms / 1000.0);
            timers.lock().add_timer(id, at);
        })
        .map_err(err)?;
        g.set("__skiff_timer", timer).map_err(err)?;
        let timers = host.clone();
        let untimer = Function::new(ctx.clone(), move |id: u32| {
            timers.lock().remove_timer(id);
        })
        .map_err(err)?;
        g.set("__skiff_untimer", untimer).map_err(err)?;
        let results = host.clone();
        let settle = Function::new(
            ctx.clone(),
            move |id: f64, ok: bool, v: Value<'js>, doc: Option<String>| {
                let outcome = if ok {
                    Outcome::Ok(
                        v.as_string()
                            .and_then(|s| s.to_string().ok())
                            .unwrap_or_else(|| "null".into()),
                    )
                } else if is_oom_value(&v) {
                    Outcome::Fatal(Fatal::OutOfMemory)
                } else if is_interrupt_value(&v) {
                    Outcome::Fatal(Fatal::Interrupted)
                } else {
                    Outcome::Threw(doc.unwrap_or_else(|| UNKNOWN_ERROR.into()))
                };
                results.lock().settled.push((id as u64, outcome));
            },
        )
        .map_err(err)?;
        g.set("__skiff_settle", settle).map_err(err)?;
        let host_fetch = {
            let host = host.clone();
            let network = setup.spec.spec.network;
            let net = setup.net.clone();
            let rt = setup.rt.clone();
            let events = setup.events.clone();
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
                    let mut h = host.lock();
                    let owner = h.current;
                    // The invocation's own deadline (without the grace) bounds the request.
                    let timeout = h.invs.get(&owner).map_or(fallback, |inv| {
                        (inv.expires
                            .saturating_duration_since(Instant::now())
                            .saturating_sub(DEADLINE_GRACE))
                        .max(Duration::from_millis(1))
                    });
                    let events = events.clone();
                    let done = move |d| {
                        let _ = events.send(Event::Fetched(d));
                    };
                    match fetch::start(&net, rt, id, req, timeout, done) {
                        Ok(()) => {
                            h.fetches.insert(id, owner);
                            if let Some(inv) = h.invs.get_mut(&owner) {
                                inv.fetches.insert(id);
                            }
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
        let watch = isolate_get("watch")?;
        let js = Entry {
            // Replaced by the module's default export once it has been evaluated.
            handler: watch.clone(),
            watch,
            describe: isolate_get("describe")?,
            fire: isolate_get("fire")?,
            forget: isolate_get("forget")?,
            reset_timers: isolate_get("resetTimers")?,
            fetch_done: isolate_get("fetchDone")?,
        };
        let mut iso = Isolate {
            ctx: ctx.clone(),
            js,
            host,
            inline: false,
        };
        // Top-level await may wait on timers and fetches: drive them like an invocation.
        let r = iso.settle_init(setup, done, rx);
        setup.shared.interrupt_at(None);
        // Timers and fetches left over by initialisation never run (as before: they were
        // dropped when the first invocation started).
        let _ = iso.js.reset_timers.call::<_, ()>(());
        {
            let mut h = iso.host.lock();
            h.queue.clear();
            h.timers.clear();
            h.fetches.clear();
        }
        r?;
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
        iso.js.handler = handler;
        Ok(iso)
    }

    /// Runs module evaluation's jobs, timers and fetches until `done` settles.
    fn settle_init(
        &mut self,
        setup: &Setup,
        done: Promise<'js>,
        rx: &mpsc::Receiver<Event>,
    ) -> Result<(), String> {
        let timeout = setup.spec.spec.timeout;
        let too_long = || {
            format!(
                "module evaluation did not finish within the timeout of {:.2} seconds",
                timeout.as_secs_f64()
            )
        };
        let fatal = |f: Fatal| match f {
            Fatal::OutOfMemory => "out of memory".to_string(),
            Fatal::Interrupted => too_long(),
            Fatal::Engine(e) => e,
        };
        let expires = Instant::now() + timeout + DEADLINE_GRACE;
        setup.shared.interrupt_at(Some(expires));
        self.host.lock().current = 0;
        loop {
            self.drain(setup).map_err(fatal)?;
            match done.result::<Value>() {
                Some(Ok(_)) => return Ok(()),
                Some(Err(rquickjs::Error::Exception)) => {
                    let v = self.ctx.catch();
                    if is_oom_value(&v) {
                        return Err("out of memory".into());
                    }
                    if is_interrupt_value(&v) {
                        return Err(too_long());
                    }
                    return Err(self.describe_text(v));
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => {}
            }
            let now = Instant::now();
            if now >= expires {
                return Err(too_long());
            }
            let due = self.host.lock().pop_due(now);
            if let Some((id, _)) = due {
                if let Err(e) = self.js.fire.call::<_, ()>((id,)) {
                    return Err(match self.classify(e) {
                        Err(f) => fatal(f),
                        Ok(v) => self.describe_text(v),
                    });
                }
                continue;
            }
            let (next, fetching) = {
                let h = self.host.lock();
                (h.next_wake(), !h.fetches.is_empty())
            };
            if next.is_none() && !fetching {
                return Err(NEVER_SETTLED.into());
            }
            let wait = next.unwrap_or(expires).min(expires);
            match rx.recv_timeout(wait.saturating_duration_since(now)) {
                Ok(Event::Fetched(d)) => {
                    if self.host.lock().fetches.remove(&d.id).is_some() {
                        if let Err(e) = self.deliver(d) {
                            return Err(match self.classify(e) {
                                Err(f) => fatal(f),
                                Ok(v) => self.describe_text(v),
                            });
                        }
                    }
                }
                // Nobody holds the instance yet, so nobody can invoke or stop it.
                Ok(Event::Invoke(_, reply)) => {
                    let _ = reply.send(Err(SandboxError::Gone));
                }
                Ok(Event::Stop | Event::Closed) => return Err("the instance was stopped".into()),
                Ok(Event::Wake) | Err(_) => {}
            }
        }
    }

    /// One turn of the event loop: `first` and the events queued behind it, then due timers,
    /// deadlines and stuck invocations. `Err`: the isolate cannot go on.
    fn turn(
        &mut self,
        setup: &Setup,
        first: Option<Event>,
        rx: &mpsc::Receiver<Event>,
        closed: &mut bool,
    ) -> Result<(), Fatal> {
        let shared = &setup.shared;
        let mut next = first;
        let mut handled = 0;
        let mut worked = false;
        let mut took = false;
        while let Some(ev) = next {
            match ev {
                Event::Invoke(req, reply) => {
                    shared.queued.fetch_sub(1, Ordering::Relaxed);
                    worked = true;
                    took = true;
                    self.start(setup, req, reply)?
                }
                Event::Fetched(done) => {
                    worked = true;
                    self.fetched(setup, done)?
                }
                Event::Wake => {}
                Event::Stop => return Err(Fatal::Interrupted),
                Event::Closed => *closed = true,
            }
            handled += 1;
            next = if handled < EVENT_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if took {
            let until = shared.nanos(Instant::now() + QUEUE_LINGER);
            shared.queue_until.store(until, Ordering::Relaxed);
        }
        if shared.stop.load(Ordering::SeqCst) {
            return Err(Fatal::Interrupted);
        }
        // Deadlines first: a timer of an invocation past its deadline must not run (its
        // JS would be interrupted at once, failing the whole isolate).
        let now = Instant::now();
        self.expire(now);
        loop {
            let due = self.host.lock().pop_due(now);
            let Some((id, owner)) = due else { break };
            worked = true;
            self.macrotask(setup, owner, |iso| iso.js.fire.call((id,)).map(|()| None))?;
        }
        self.expire(Instant::now());
        if handled < EVENT_BATCH {
            self.unstick();
        }
        if worked || !self.host.lock().invs.is_empty() {
            shared.touch(shared.nanos(Instant::now()));
        }
        Ok(())
    }

    /// Starts an invocation: its handler call is a macrotask of its own.
    fn start(
        &mut self,
        setup: &Setup,
        req: InvokeRequest,
        reply: oneshot::Sender<Result<InvokeResult, SandboxError>>,
    ) -> Result<(), Fatal> {
        if reply.is_closed() {
            return Ok(()); // the caller gave up while it was queued
        }
        let id = {
            let mut h = self.host.lock();
            h.next_id += 1;
            h.next_id
        };
        let within = Duration::from_millis(req.invoke.deadline_ms.saturating_sub(unix_ms()));
        let expires = Instant::now() + within + DEADLINE_GRACE;
        {
            let mut h = self.host.lock();
            h.invs.insert(
                id,
                Inv {
                    reply,
                    expires,
                    logs: Vec::new(),
                    timers: HashSet::new(),
                    fetches: HashSet::new(),
                },
            );
            h.expiries.insert((expires, id));
        }
        let payload = String::from_utf8_lossy(&req.payload);
        self.macrotask(setup, id, |iso| {
            let context = Object::new(iso.ctx.clone())?;
            context.set("awsRequestId", req.invoke.id.as_str())?;
            context.set("functionName", setup.spec.function.as_str())?;
            context.set("functionVersion", setup.spec.revision.to_string())?;
            context.set("invokedFunctionArn", req.invoke.function_arn.as_str())?;
            context.set("deadlineMs", req.invoke.deadline_ms as f64)?;
            // The event is the payload parsed as JSON, or the payload itself if it is not JSON.
            let event = match iso.ctx.json_parse(payload.as_bytes()) {
                Ok(v) => v,
                Err(_) => {
                    let _ = iso.ctx.catch();
                    rquickjs::String::from_str(iso.ctx.clone(), &payload)?.into_value()
                }
            };
            let out: Value = iso.js.handler.call((event, context))?;
            Ok(Some(out))
        })
    }

    /// Hands a finished `fetch` to the invocation that started it.
    fn fetched(&mut self, setup: &Setup, done: fetch::Done) -> Result<(), Fatal> {
        let owner = {
            let mut h = self.host.lock();
            let Some(owner) = h.fetches.remove(&done.id) else {
                return Ok(()); // its invocation already finished
            };
            if let Some(inv) = h.invs.get_mut(&owner) {
                inv.fetches.remove(&done.id);
            }
            owner
        };
        self.macrotask(setup, owner, |iso| iso.deliver(done).map(|()| None))
    }

    /// Runs `f` on behalf of invocation `owner` (its logs, timers and fetches are attributed
    /// to it, JS is interrupted past its deadline), then every job it queued, then answers
    /// the invocations that settled. `f` may return a handler's result for `owner`, which
    /// is settled once those jobs have run (see [`Isolate::settle`]).
    fn macrotask(
        &mut self,
        setup: &Setup,
        owner: u64,
        f: impl FnOnce(&Self) -> rquickjs::Result<Option<Value<'js>>>,
    ) -> Result<(), Fatal> {
        let expires = {
            let mut h = self.host.lock();
            h.current = owner;
            h.invs.get(&owner).map(|i| i.expires)
        };
        let now = Instant::now();
        let expires = match expires {
            // Past its deadline: `expire` fails it; running its JS now would only be
            // interrupted, and that fails every invocation in the isolate.
            Some(at) if at <= now => return Ok(()),
            Some(at) => at,
            None => now + setup.spec.spec.timeout + DEADLINE_GRACE,
        };
        // Inline, nothing else can time the invocation out while its JS runs here, so the
        // JS is interrupted at the deadline itself.
        let interrupt = if self.inline {
            expires - DEADLINE_GRACE
        } else {
            expires
        };
        setup.shared.interrupt_at(Some(interrupt));
        let r = self.run_task(setup, owner, f);
        setup.shared.interrupt_at(None);
        r?;
        self.answer()
    }

    fn run_task(
        &mut self,
        setup: &Setup,
        owner: u64,
        f: impl FnOnce(&Self) -> rquickjs::Result<Option<Value<'js>>>,
    ) -> Result<(), Fatal> {
        let out = match f(self) {
            Ok(out) => out,
            Err(e) => {
                // What a handler, timer or fetch callback throws fails its invocation.
                let v = self.classify(e)?;
                let doc = self.doc_of(v);
                self.host.lock().settled.push((owner, Outcome::Threw(doc)));
                None
            }
        };
        self.drain(setup)?;
        if let Some(out) = out {
            self.settle(owner, out)?;
            // Resolving a thenable is a job of its own.
            self.drain(setup)?;
        }
        Ok(())
    }

    /// Settles invocation `id` with what its handler returned when that is known now: a
    /// plain value, or a promise the jobs run so far have settled — the common case, which
    /// needs no promise reactions. A pending promise (or another thenable) is handed to the
    /// prelude, which settles the invocation through the host when it settles.
    fn settle(&self, id: u64, out: Value<'js>) -> Result<(), Fatal> {
        let outcome = match out.as_promise() {
            Some(p) => match p.result::<Value>() {
                None => return self.watch(id, out),
                Some(Ok(v)) => self.reply_of(v)?,
                Some(Err(e)) => {
                    let reason = self.classify(e)?;
                    Outcome::Threw(self.doc_of(reason))
                }
            },
            None if is_thenable(&out) => return self.watch(id, out),
            None => self.reply_of(out)?,
        };
        self.host.lock().settled.push((id, outcome));
        Ok(())
    }

    /// The prelude settles invocation `id` when `promise` (or thenable) settles.
    fn watch(&self, id: u64, promise: Value<'js>) -> Result<(), Fatal> {
        match self.js.watch.call::<_, ()>((id as f64, promise)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let v = self.classify(e)?;
                let doc = self.doc_of(v);
                self.host.lock().settled.push((id, Outcome::Threw(doc)));
                Ok(())
            }
        }
    }

    /// The reply to a handler's result `v`: `v` as JSON text (`null` for what JSON cannot
    /// represent), or the error serialising it threw (a cycle, a BigInt).
    fn reply_of(&self, v: Value<'js>) -> Result<Outcome, Fatal> {
        match self.ctx.json_stringify(v) {
            Ok(Some(s)) => s
                .to_string()
                .map(Outcome::Ok)
                .map_err(|e| Fatal::Engine(e.to_string())),
            Ok(None) => Ok(Outcome::Ok("null".into())),
            Err(e) => {
                let v = self.classify(e)?;
                Ok(Outcome::Threw(self.doc_of(v)))
            }
        }
    }

    /// Runs promise jobs until none is left.
    fn drain(&self, setup: &Setup) -> Result<(), Fatal> {
        // SAFETY: the runtime outlives `self.ctx`; this isolate has one context, so a failed
        // job leaves its exception on `self.ctx`.
        let rt = unsafe { rquickjs::qjs::JS_GetRuntime(self.ctx.as_raw().as_ptr()) };
        loop {
            let mut job_ctx = std::mem::MaybeUninit::<*mut rquickjs::qjs::JSContext>::uninit();
            let r = unsafe { rquickjs::qjs::JS_ExecutePendingJob(rt, job_ctx.as_mut_ptr()) };
            if r == 0 {
                break;
            }
            if r < 0 {
                let v = self.ctx.catch();
                if is_oom_value(&v) {
                    return Err(Fatal::OutOfMemory);
                }
                if is_interrupt_value(&v) {
                    return Err(Fatal::Interrupted);
                }
            }
            if setup.shared.fired.load(Ordering::SeqCst) {
                return Err(Fatal::Interrupted);
            }
        }
        if setup.shared.fired.load(Ordering::SeqCst) {
            return Err(Fatal::Interrupted);
        }
        Ok(())
    }

    /// Answers the invocations whose promise settled.
    fn answer(&mut self) -> Result<(), Fatal> {
        loop {
            let settled = std::mem::take(&mut self.host.lock().settled);
            if settled.is_empty() {
                return Ok(());
            }
            for (id, outcome) in settled {
                let outcome = match outcome {
                    Outcome::Fatal(f) => return Err(f),
                    o => o,
                };
                let Some(inv) = self.finish(id) else { continue };
                let result = match outcome {
                    Outcome::Ok(body) => InvokeResult {
                        body: body.into_bytes(),
                        logs: inv.logs,
                        ..Default::default()
                    },
                    Outcome::Threw(doc) => InvokeResult {
                        error_type: Some(error_type_of(&doc)),
                        body: doc.into_bytes(),
                        logs: inv.logs,
                        ..Default::default()
                    },
                    Outcome::Fatal(_) => unreachable!("handled above"),
                };
                let _ = inv.reply.send(Ok(result));
            }
        }
    }

    /// Takes invocation `id` out of flight and drops its timers and fetches in the prelude.
    fn finish(&mut self, id: u64) -> Option<Inv> {
        let inv = self.host.lock().finish(id)?;
        for &t in &inv.timers {
            let _ = self.js.forget.call::<_, ()>((t, 0));
        }
        for &f in &inv.fetches {
            let _ = self.js.forget.call::<_, ()>((0, f));
        }
        if !inv.timers.is_empty() || !inv.fetches.is_empty() {
            let _ = self.ctx.catch();
        }
        Some(inv)
    }

    /// Fails the invocations pending past their deadline (plus the grace).
    fn expire(&mut self, now: Instant) {
        loop {
            let first = self.host.lock().expiries.first().copied();
            let Some((at, id)) = first.filter(|&(at, _)| at <= now) else {
                return;
            };
            match self.finish(id) {
                Some(inv) => {
                    let _ = inv.reply.send(Err(SandboxError::Crashed {
                        message: INTERRUPTED.into(),
                        log_tail: String::from_utf8_lossy(&inv.logs).into_owned(),
                    }));
                }
                None => {
                    self.host.lock().expiries.remove(&(at, id));
                }
            }
        }
    }

    /// Fails the pending invocations when nothing (no timer, no fetch) can settle them.
    fn unstick(&mut self) {
        let stuck = {
            let h = self.host.lock();
            !h.invs.is_empty() && h.queue.is_empty() && h.fetches.is_empty()
        };
        if !stuck {
            return;
        }
        let ids: Vec<u64> = self.host.lock().invs.keys().copied().collect();
        for id in ids {
            if let Some(inv) = self.finish(id) {
                let _ = inv.reply.send(Err(SandboxError::Crashed {
                    message: NEVER_SETTLED.into(),
                    log_tail: String::from_utf8_lossy(&inv.logs).into_owned(),
                }));
            }
        }
    }

    /// Fails every invocation in flight with `fatal`; the thread then exits.
    fn die(&mut self, setup: &Setup, fatal: Fatal) {
        setup.shared.dead.store(true, Ordering::SeqCst);
        let limit_mb = setup.spec.spec.memory >> 20;
        let invs: Vec<Inv> = {
            let mut h = self.host.lock();
            h.expiries.clear();
            h.invs.drain().map(|(_, inv)| inv).collect()
        };
        for inv in invs {
            let log_tail = String::from_utf8_lossy(&inv.logs).into_owned();
            let e = match &fatal {
                Fatal::OutOfMemory => SandboxError::OutOfMemory { limit_mb, log_tail },
                Fatal::Interrupted => SandboxError::Crashed {
                    message: INTERRUPTED.into(),
                    log_tail,
                },
                Fatal::Engine(message) => SandboxError::Crashed {
                    message: message.clone(),
                    log_tail,
                },
            };
            let _ = inv.reply.send(Err(e));
        }
    }

    fn describe_text(&self, v: Value<'js>) -> String {
        let doc: Option<String> = self.js.describe.call((v,)).ok();
        let _ = self.ctx.catch();
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

    /// The Lambda error document of a thrown value.
    fn doc_of(&self, v: Value<'js>) -> String {
        let doc: Option<String> = self.js.describe.call((v,)).ok();
        let _ = self.ctx.catch();
        doc.unwrap_or_else(|| UNKNOWN_ERROR.into())
    }

    /// Hands a finished `fetch` to the prelude, which settles its promise.
    fn deliver(&self, done: fetch::Done) -> rquickjs::Result<()> {
        match done.result {
            Ok(r) => {
                let headers = serde_json::to_string(&r.headers).unwrap_or_else(|_| "[]".into());
                self.js.fetch_done.call::<_, ()>((
                    done.id,
                    rquickjs::Null,
                    r.status,
                    r.status_text,
                    r.url,
                    headers,
                    r.body,
                ))
            }
            Err(e) => self.js.fetch_done.call::<_, ()>((done.id, e)),
        }
    }

    /// A failed call into JS: the thrown value, or why the isolate cannot go on.
    fn classify(&self, e: rquickjs::Error) -> Result<Value<'js>, Fatal> {
        match e {
            rquickjs::Error::Exception => {
                let v = self.ctx.catch();
                if is_oom_value(&v) {
                    Err(Fatal::OutOfMemory)
                } else if is_interrupt_value(&v) {
                    Err(Fatal::Interrupted)
                } else {
                    Ok(v)
                }
            }
            e if e.to_string().contains("memory") => Err(Fatal::OutOfMemory),
            e => Err(Fatal::Engine(e.to_string())),
        }
    }
}

const UNKNOWN_ERROR: &str =
    r#"{"errorMessage":"unknown error","errorType":"Error","stackTrace":[]}"#;

/// `errorType` of a Lambda error document.
fn error_type_of(doc: &str) -> String {
    serde_json::from_str::<serde_json::Value>(doc)
        .ok()
        .and_then(|d| d["errorType"].as_str().map(str::to_string))
        .unwrap_or_else(|| "Error".into())
}
fn error_message(v: &Value<'_>) -> Option<String> {
    v.as_object()?.get::<_, String>("message").ok()
}

fn is_oom_value(v: &Value<'_>) -> bool {
    v.is_null() || error_message(v).is_some_and(|m| is_oom_text(&m))
}

/// An object with a callable `then` that is not a native promise.
fn is_thenable(v: &Value<'_>) -> bool {
    v.as_object()
        .and_then(|o| o.get::<_, Value>("then").ok())
        .is_some_and(|t| t.is_function())
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
