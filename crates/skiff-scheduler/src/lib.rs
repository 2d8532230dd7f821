//! The scheduler owns instances: one warm pool per revision, up to `concurrency` in-flight
//! invocations per instance, new instances up to `scale.max`, idle instances stopped after
//! `scale.idle` (scale to zero), and timeouts. A timed-out, crashed or out-of-memory instance
//! is stopped and never reused. A streamed response keeps its instance busy until the stream
//! ends, under the same timeout. Nothing above the scheduler knows which tier runs a revision.
//!
//! Execution modes (`mode:` in function.yaml): `warm` (the default, above; with
//! [`SchedulerConfig::warm_pool_size`] routed revisions keep that many instances started),
//! `ephemeral` (a fresh instance per invocation), `persistent` (one instance per function,
//! never stopped for idleness, with a workspace directory that outlives it),
//! `checkpointed` (every instance is restored from a snapshot taken right after the
//! revision's first instance initialised) and `branched` (every invocation runs in a fresh
//! copy restored from that snapshot). Snapshots of running instances and the branches forked
//! from them live in [`branches`].

use parking_lot::Mutex;
use serde::Serialize;
use skiff_core::launch::{self, LaunchInfo};
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::{
    ErrorKind, FunctionError, FunctionSpec, Invocation, InvokeOutput, Mode, Outcome,
    ResponseStream, SandboxKind, StreamError, StreamSender,
};
use skiff_sandbox::{Instance, InstanceSpec, InvokeRequest, Sandbox, SandboxError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

pub mod branches;
mod metrics;
pub use branches::{BranchInfo, SnapshotTaken};
pub use metrics::Metrics;

/// Errors of the scheduler's snapshot and branch operations.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// Nothing of the function is running that could be snapshotted.
    #[error(
        "function `{function}` has no running instance to snapshot (invoke it first; \
         ephemeral and branched functions keep none running)"
    )]
    NoInstance { function: String },
    /// No branch has this id (never existed, deleted, or stopped after failing).
    #[error("branch `{0}` not found")]
    BranchNotFound(String),
    /// Too many branches are running on this server.
    #[error("{running} branches are running, the most this server holds ({max}); delete some")]
    TooManyBranches { running: usize, max: usize },
    /// The function's sandbox tier cannot take or restore snapshots.
    #[error("{0}")]
    Unsupported(String),
    /// The tier failed to checkpoint or restore.
    #[error("{0}")]
    Sandbox(SandboxError),
    /// An invocation of a branch did not complete (timeout, crash, throttled...).
    #[error("{}", .0.message)]
    Invoke(Outcome),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<SandboxError> for SchedError {
    fn from(e: SandboxError) -> SchedError {
        match e {
            SandboxError::Unsupported(m) => SchedError::Unsupported(m),
            e => SchedError::Sandbox(e),
        }
    }
}

/// The uid functions run as inside process sandboxes; owns persistent workspaces.
pub const SANDBOX_UID: u32 = 10001;

/// A deployed revision, ready to launch: spec, code location and resolved environment.
#[derive(Debug)]
pub struct Revision {
    pub function: String,
    pub number: u32,
    pub spec: FunctionSpec,
    pub code_dir: PathBuf,
    exec_mode: ExecMode,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    rootfs: Option<PathBuf>,
    /// How instances take requests, once the tier has prepared the code ([`Scheduler::exec_mode`]).
    prepared: std::sync::OnceLock<ExecMode>,
}

impl Revision {
    /// Prepares a revision: computes its program and complete environment once.
    pub fn new(
        number: u32,
        spec: FunctionSpec,
        code_dir: PathBuf,
        secrets: &[(String, String)],
        workspace: &str,
    ) -> Revision {
        let (exec_mode, mut argv) = launch::program(&spec);
        // As on Lambda's `provided` runtimes: when the handler does not name a file of the
        // package, the package's `bootstrap` runs and reads the handler from `_HANDLER`
        // (e.g. `handler: app.handler` with an awslambdaric bootstrap).
        if spec.runtime == skiff_core::Runtime::Provided
            && !code_dir.join(&spec.handler).is_file()
            && code_dir.join("bootstrap").is_file()
        {
            argv = vec![format!("{}/bootstrap", launch::TASK_ROOT)];
        }
        let env = launch::environment(&LaunchInfo {
            spec: &spec,
            revision: number,
            workspace,
            secrets,
            otel_endpoint: None,
        });
        Revision {
            function: spec.name.clone(),
            number,
            spec,
            code_dir,
            exec_mode,
            argv,
            env,
            rootfs: None,
            prepared: std::sync::OnceLock::new(),
        }
    }

    /// A synthetic revision that runs `argv` directly in command mode (payload on stdin,
    /// reply on stdout) with exactly `env`, optionally on a root image directory instead of
    /// the host's system dirs. Used for ad-hoc invocations (`mode: ephemeral` in `spec` gives
    /// each call a fresh sandbox). `function` and `number` key the warm pool, so ad-hoc
    /// callers must pick ones no deployed function uses.
    pub fn command(
        function: String,
        number: u32,
        spec: FunctionSpec,
        code_dir: PathBuf,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        rootfs: Option<PathBuf>,
    ) -> Revision {
        Revision {
            function,
            number,
            spec,
            code_dir,
            exec_mode: ExecMode::Command,
            argv,
            env,
            rootfs,
            prepared: ExecMode::Command.into(),
        }
    }
}

/// How [`Scheduler::invoke_opts`] runs an invocation.
#[derive(Debug, Clone, Copy)]
pub struct InvokeOptions {
    /// Wait (up to the timeout) for a free instance when all are busy at `scale.max`; false
    /// throttles at once (Lambda's semantics: 429, SDKs retry).
    pub wait_for_capacity: bool,
    /// A timeout shorter than the function's (an HTTP route's upstream timeout); longer
    /// values are capped at the function's. `None`: the function's.
    pub timeout: Option<Duration>,
}

impl Default for InvokeOptions {
    fn default() -> InvokeOptions {
        InvokeOptions {
            wait_for_capacity: true,
            timeout: None,
        }
    }
}

/// Observable state of one instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub revision: u32,
    pub state: &'static str,
    pub in_flight: u32,
    pub invocations: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub memory_bytes: Option<u64>,
}

struct Slot {
    inst: Arc<dyn Instance>,
    in_flight: u32,
    served: u64,
    created: Instant,
    last_used: Instant,
    /// Replaced by a restart: takes no new invocations, stopped once its last one finishes.
    retiring: bool,
}

#[derive(Default)]
struct PoolState {
    slots: Vec<Slot>,
    starting: u32,
    /// Bumped by every restart; an instance whose start began under an older generation
    /// joins the pool already retiring.
    generation: u64,
}

/// What [`Scheduler::restart`] / [`Scheduler::recycle`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Replaced {
    /// Idle instances stopped now.
    pub stopped: usize,
    /// Busy instances that finish their in-flight invocations and are then stopped.
    pub draining: usize,
}

/// Warm instances of one revision.
struct Pool {
    rev: Arc<Revision>,
    state: Mutex<PoolState>,
    freed: Notify,
    stops: Arc<Stops>,
    /// `checkpointed`/`branched`: the revision's snapshot image, built once (others wait).
    template: tokio::sync::Mutex<Template>,
    /// An alias routes to this revision: a warm one keeps `warm_pool_size` instances started.
    routed: AtomicBool,
    /// When starting a pre-warmed instance last failed (top-ups pause for a while).
    topup_failed: Mutex<Option<Instant>>,
}

/// The snapshot image a `checkpointed`/`branched` revision restores its instances from.
#[derive(Default)]
struct Template {
    /// The complete image directory, once known to exist.
    image: Option<PathBuf>,
    /// An instance was restored from it by this process (an image left by an earlier run
    /// that fails to restore is rebuilt once).
    verified: bool,
}

/// How long top-ups of a warm pool pause after an instance failed to start.
const TOPUP_BACKOFF: Duration = Duration::from_secs(10);

/// Instance stops running in the background, so shutdown can wait for them.
#[derive(Default)]
struct Stops {
    running: AtomicU64,
    idle: Notify,
}

impl Stops {
    fn spawn(self: &Arc<Self>, inst: Arc<dyn Instance>) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let me = self.clone();
        tokio::spawn(async move {
            inst.stop().await;
            if me.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                me.idle.notify_waiters();
            }
        });
    }

    async fn wait(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A lease on an instance for one invocation.
/// Longest a cold start (sandbox boot and the function's init) may take before the
/// invocation's own timeout starts (Lambda allows 10 s of init; microVMs under software
/// emulation boot for seconds).
const INIT_LIMIT: Duration = Duration::from_secs(30);

struct Lease {
    inst: Arc<dyn Instance>,
    cold: bool,
    init: Option<Duration>,
}

impl Pool {
    /// In-flight invocations one instance may take; 0 for ephemeral (and branched)
    /// revisions, whose instances serve exactly the invocation that started them.
    fn capacity_per_instance(&self) -> u32 {
        if self.ephemeral() {
            0
        } else {
            self.rev.spec.concurrency
        }
    }

    /// One instance per invocation, stopped after it: `ephemeral`, and `branched` (each
    /// invocation a fresh copy of the snapshot).
    fn ephemeral(&self) -> bool {
        matches!(self.rev.spec.mode, Mode::Ephemeral | Mode::Branched)
    }

    fn persistent(&self) -> bool {
        self.rev.spec.mode == Mode::Persistent
    }

    /// Instances this revision may have at once: one for `persistent`, else `scale.max`.
    fn max_instances(&self) -> u32 {
        if self.persistent() {
            1
        } else {
            self.rev.spec.scale.max
        }
    }

    /// Instances kept through idle expiry: `scale.min`, or for a routed `warm` revision at
    /// least `warm_pool_size` (never more than `scale.max`).
    fn keep(&self, warm_pool_size: u32) -> u32 {
        let min = self.rev.spec.scale.min;
        if self.rev.spec.mode == Mode::Warm && self.routed.load(Ordering::Relaxed) {
            min.max(warm_pool_size).min(self.rev.spec.scale.max)
        } else {
            min
        }
    }

    /// Reserves starts for the instances a routed warm pool lacks (up to `target`); returns
    /// how many to start and the generation they start under.
    fn reserve_topup(&self, target: u32, now: Instant) -> (u32, u64) {
        if self
            .topup_failed
            .lock()
            .is_some_and(|t| now.duration_since(t) < TOPUP_BACKOFF)
        {
            return (0, 0);
        }
        let mut st = self.state.lock();
        let live = st
            .slots
            .iter()
            .filter(|s| !s.retiring && s.inst.is_alive())
            .count() as u32;
        let n = target.saturating_sub(live + st.starting);
        st.starting += n;
        (n, st.generation)
    }

    /// Adds a pre-started instance (reserved with [`Pool::reserve_topup`]) as idle; stops
    /// it instead when the pool was restarted meanwhile or is no longer `wanted` (function
    /// deleted, server shutting down).
    fn add_idle(
        &self,
        started: Result<Arc<dyn Instance>, SandboxError>,
        generation: u64,
        wanted: bool,
    ) {
        let mut st = self.state.lock();
        st.starting -= 1;
        match started {
            Ok(inst) => {
                let now = Instant::now();
                if !wanted || generation != st.generation {
                    drop(st);
                    self.stops.spawn(inst);
                    return;
                }
                st.slots.push(Slot {
                    inst,
                    in_flight: 0,
                    served: 0,
                    created: now,
                    last_used: now,
                    retiring: false,
                });
            }
            Err(e) => {
                drop(st);
                *self.topup_failed.lock() = Some(Instant::now());
                tracing::warn!(
                    function = %self.rev.function,
                    revision = self.rev.number,
                    error = %e,
                    "could not pre-start a warm instance"
                );
            }
        }
        self.freed.notify_one();
    }

    /// Takes a warm instance with spare concurrency, or starts one, or waits for capacity.
    async fn acquire(&self, sched: &Scheduler, deadline: Instant) -> Result<Lease, Outcome> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let start_new = {
                let mut st = self.state.lock();
                let cap = self.capacity_per_instance();
                // Most recently used first, so surplus instances go idle and expire.
                if let Some(slot) = st
                    .slots
                    .iter_mut()
                    .filter(|s| s.in_flight < cap && !s.retiring && s.inst.is_alive())
                    .max_by_key(|s| s.last_used)
                {
                    slot.in_flight += 1;
                    slot.served += 1;
                    return Ok(Lease {
                        inst: slot.inst.clone(),
                        cold: false,
                        init: None,
                    });
                }
                // Retiring instances do not count: a restart must not wait for them.
                let live = st.slots.iter().filter(|s| !s.retiring).count() as u32;
                if live + st.starting < self.max_instances() {
                    st.starting += 1;
                    Some(st.generation)
                } else {
                    None
                }
            };
            if let Some(generation) = start_new {
                let t0 = Instant::now();
                let started = sched.start_instance(self).await;
                let mut st = self.state.lock();
                st.starting -= 1;
                return match started {
                    Ok(inst) => {
                        let now = Instant::now();
                        let retiring = generation != st.generation;
                        st.slots.push(Slot {
                            inst: inst.clone(),
                            in_flight: 1,
                            served: 1,
                            created: now,
                            last_used: now,
                            retiring,
                        });
                        Ok(Lease {
                            inst,
                            cold: true,
                            init: Some(t0.elapsed()),
                        })
                    }
                    Err(e) => {
                        drop(st);
                        self.freed.notify_one();
                        Err(outcome(
                            &self.rev,
                            ErrorKind::StartFailed,
                            e.to_string(),
                            String::new(),
                            true,
                        ))
                    }
                };
            }
            if tokio::time::timeout_at(deadline.into(), freed)
                .await
                .is_err()
            {
                return Err(outcome(
                    &self.rev,
                    ErrorKind::Throttled,
                    if self.persistent() {
                        format!(
                            "the persistent instance of {} is busy (all {} of its concurrency \
                             slots)",
                            self.rev.function, self.rev.spec.concurrency
                        )
                    } else {
                        format!(
                            "all {} instances of {} are busy (scale.max reached)",
                            self.rev.spec.scale.max, self.rev.function
                        )
                    },
                    String::new(),
                    false,
                ));
            }
        }
    }

    /// Returns an instance after use; a broken one is removed and stopped.
    fn release(&self, inst: &Arc<dyn Instance>, broken: bool) {
        let removed = {
            let mut st = self.state.lock();
            let Some(i) = st.slots.iter().position(|s| Arc::ptr_eq(&s.inst, inst)) else {
                return;
            };
            let s = &st.slots[i];
            if broken || self.ephemeral() || !s.inst.is_alive() || (s.retiring && s.in_flight == 1)
            {
                Some(st.slots.swap_remove(i).inst)
            } else {
                let s = &mut st.slots[i];
                s.in_flight -= 1;
                s.last_used = Instant::now();
                None
            }
        };
        if let Some(inst) = removed {
            self.stops.spawn(inst);
        }
        self.freed.notify_one();
    }

    /// Removes instances idle past `scale.idle` (keeping [`Pool::keep`]; a `persistent`
    /// instance is never idle-expired) and dead ones.
    fn expire(&self, now: Instant, warm_pool_size: u32) -> Vec<Arc<dyn Instance>> {
        let keep = self.keep(warm_pool_size) as usize;
        let persistent = self.persistent();
        let mut st = self.state.lock();
        let idle = self.rev.spec.scale.idle;
        let mut out = Vec::new();
        let mut i = 0;
        while i < st.slots.len() {
            let s = &st.slots[i];
            let dead = !s.inst.is_alive() && s.in_flight == 0;
            let expired = !persistent
                && s.in_flight == 0
                && now.duration_since(s.last_used) >= idle
                && st.slots.len() > keep;
            if dead || expired {
                out.push(st.slots.swap_remove(i).inst);
            } else {
                i += 1;
            }
        }
        out
    }

    /// Stops idle instances (ignoring `scale.min`); with `retire_busy`, busy ones stop taking
    /// invocations and are stopped when their last one finishes.
    fn replace(&self, retire_busy: bool) -> Replaced {
        let mut out = Replaced::default();
        let idle: Vec<Arc<dyn Instance>> = {
            let mut st = self.state.lock();
            if retire_busy {
                st.generation += 1;
            }
            let mut idle = Vec::new();
            let mut i = 0;
            while i < st.slots.len() {
                if st.slots[i].in_flight == 0 {
                    idle.push(st.slots.swap_remove(i).inst);
                    continue;
                }
                if retire_busy && !st.slots[i].retiring {
                    st.slots[i].retiring = true;
                    out.draining += 1;
                }
                i += 1;
            }
            idle
        };
        out.stopped = idle.len();
        for inst in idle {
            self.stops.spawn(inst);
        }
        // Waiters may now start fresh instances in the freed capacity.
        self.freed.notify_waiters();
        out
    }

    fn drain(&self) -> Vec<Arc<dyn Instance>> {
        let mut st = self.state.lock();
        st.slots.drain(..).map(|s| s.inst).collect()
    }

    fn infos(&self, now: Instant) -> Vec<InstanceInfo> {
        let st = self.state.lock();
        st.slots
            .iter()
            .map(|s| InstanceInfo {
                id: s.inst.id().to_string(),
                revision: self.rev.number,
                state: if !s.inst.is_alive() {
                    "dead"
                } else if s.retiring {
                    "draining"
                } else if s.in_flight > 0 {
                    "busy"
                } else {
                    "idle"
                },
                in_flight: s.in_flight,
                invocations: s.served,
                age_ms: now.duration_since(s.created).as_millis() as u64,
                idle_ms: if s.in_flight > 0 {
                    0
                } else {
                    now.duration_since(s.last_used).as_millis() as u64
                },
                memory_bytes: s.inst.memory_usage(),
            })
            .collect()
    }
}

fn outcome(
    rev: &Revision,
    kind: ErrorKind,
    message: String,
    log_tail: String,
    cold: bool,
) -> Outcome {
    Outcome {
        kind,
        message,
        log_tail,
        revision: rev.number,
        cold,
    }
}

/// Chunks buffered between a streaming instance and the caller.
const STREAM_BUFFER: usize = 16;

/// Moves a streamed response from the instance to the caller under the invocation's
/// deadline, then returns the instance to its pool. A caller that stops reading leaves the
/// rest to be drained (the instance is reused only after its stream ended); past the deadline
/// the caller gets a `Sandbox.Timedout` error and the instance is stopped.
async fn forward_stream(
    owner: Owner,
    inst: Arc<dyn Instance>,
    mut from: ResponseStream,
    to: StreamSender,
    deadline: Instant,
    timeout: Duration,
) {
    let mut to = Some(to);
    let timed_out = loop {
        let item = match tokio::time::timeout_at(deadline.into(), from.next()).await {
            Err(_) => break true,
            Ok(None) => break false,
            Ok(Some(item)) => item,
        };
        let Some(tx) = &to else { continue };
        match tokio::time::timeout_at(deadline.into(), tx.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => to = None, // the caller went away: drain the rest
            Err(_) => break true,
        }
    };
    if timed_out {
        if let Some(tx) = to {
            let err = StreamError::new(
                "Sandbox.Timedout",
                format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
            );
            // Delivered once the caller reads on (or dropped with it); never blocks the stop.
            tokio::spawn(async move {
                let _ = tx.send(Err(err)).await;
            });
        }
    }
    owner.release(&inst, timed_out);
}

/// Where an instance goes back after an invocation: its revision's pool, or the branch it is.
#[derive(Clone)]
enum Owner {
    Pool(Arc<Pool>),
    Branch(Arc<branches::Branch>),
}

impl Owner {
    fn release(&self, inst: &Arc<dyn Instance>, broken: bool) {
        match self {
            Owner::Pool(p) => p.release(inst, broken),
            Owner::Branch(b) => b.release(broken),
        }
    }
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Reported to functions as `SKIFF_WORKSPACE_NAME`.
    pub workspace: String,
    /// How often idle instances are looked for.
    pub reap_interval: Duration,
    /// The server's data directory: `persistent` workspaces live in
    /// `workspaces/<workspace>/<function>`, `checkpointed`/`branched` revision snapshots in
    /// `snapshots/rev/<workspace>-<function>-<revision>`. `None`: those modes cannot start.
    pub data_dir: Option<PathBuf>,
    /// Instances kept started for each `warm` revision an alias routes to (`FAAS_WARM_POOL_SIZE`),
    /// capped by its `scale.max`; 0 = start on demand only.
    pub warm_pool_size: u32,
    /// The tier of functions whose function.yaml does not say `sandbox:` (`FAAS_RUNTIME`);
    /// applied by the gateway when a revision is deployed.
    pub default_sandbox: SandboxKind,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            workspace: "default".into(),
            reap_interval: Duration::from_millis(250),
            data_dir: None,
            warm_pool_size: 0,
            default_sandbox: SandboxKind::Native,
        }
    }
}

/// Places invocations on instances.
pub struct Scheduler {
    sandbox: Arc<dyn Sandbox>,
    pools: Mutex<HashMap<(String, u32), Arc<Pool>>>,
    branches: branches::Branches,
    /// Set by [`Scheduler::shutdown`]: no more pre-started instances.
    closing: AtomicBool,
    stops: Arc<Stops>,
    next_instance: AtomicU64,
    epoch: u64,
    pub metrics: Metrics,
    config: SchedulerConfig,
}

impl Scheduler {
    /// Creates the scheduler and starts its idle reaper on the current tokio runtime.
    pub fn new(sandbox: Arc<dyn Sandbox>, config: SchedulerConfig) -> Arc<Scheduler> {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let s = Arc::new(Scheduler {
            sandbox,
            pools: Mutex::new(HashMap::new()),
            branches: branches::Branches::default(),
            closing: AtomicBool::new(false),
            stops: Arc::default(),
            next_instance: AtomicU64::new(1),
            epoch,
            metrics: Metrics::default(),
            config,
        });
        let weak = Arc::downgrade(&s);
        let every = s.config.reap_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                s.reap(Instant::now()).await;
                drop(s);
            }
        });
        s
    }

    /// Checks and readies a function's code with its tier before it is stored (see
    /// [`Sandbox::prepare`]); the error says what is wrong with the code.
    pub async fn check_code(
        &self,
        spec: &FunctionSpec,
        code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        self.sandbox.prepare(spec, code_dir).await
    }

    /// How the revision's instances take requests: as events ([`Scheduler::invoke_opts`]) or
    /// as HTTP ([`Scheduler::lease`]). Asks the tier once per revision (compiling its code if
    /// it has to).
    pub async fn exec_mode(&self, rev: &Revision) -> Result<ExecMode, Outcome> {
        if let Some(mode) = rev.prepared.get() {
            return Ok(*mode);
        }
        // Concurrent first requests may both ask; the tier caches its work by content.
        let prepared = self.sandbox.prepare(&rev.spec, &rev.code_dir).await;
        prepared
            .inspect(|mode| {
                let _ = rev.prepared.set(*mode);
            })
            .map_err(|e| {
                let kind = match e {
                    SandboxError::Start(_) | SandboxError::Unsupported(_) => ErrorKind::StartFailed,
                    _ => ErrorKind::Crashed,
                };
                outcome(rev, kind, e.to_string(), e.log_tail().to_string(), true)
            })
    }

    /// Workspace name functions see.
    pub fn workspace(&self) -> &str {
        &self.config.workspace
    }

    /// The tier of functions that do not choose one (`FAAS_RUNTIME`).
    pub fn default_sandbox(&self) -> SandboxKind {
        self.config.default_sandbox
    }

    /// The directory a `persistent` function's instance has at `/workspace`.
    pub fn workspace_dir(&self, function: &str) -> Option<PathBuf> {
        self.config.data_dir.as_ref().map(|d| {
            d.join("workspaces")
                .join(&self.config.workspace)
                .join(function)
        })
    }

    /// Where a `checkpointed`/`branched` revision's snapshot image lives.
    fn template_dir(&self, rev: &Revision) -> Result<PathBuf, SandboxError> {
        let data = self.config.data_dir.as_ref().ok_or_else(|| {
            SandboxError::Start(format!(
                "mode: `{}` needs the server's data directory for its snapshot",
                rev.spec.mode
            ))
        })?;
        Ok(data.join("snapshots/rev").join(format!(
            "{}-{}-{}",
            self.config.workspace, rev.function, rev.number
        )))
    }

    /// What the tier needs to start (or restore) an instance of `rev`. A `persistent`
    /// function gets its workspace directory, created and owned by the sandbox uid.
    fn instance_spec(&self, rev: &Revision, tag: &str) -> Result<InstanceSpec, SandboxError> {
        let n = self.next_instance.fetch_add(1, Ordering::Relaxed);
        let workspace = if rev.spec.mode == Mode::Persistent {
            let dir = self.workspace_dir(&rev.function).ok_or_else(|| {
                SandboxError::Start(
                    "mode: `persistent` needs the server's data directory for the workspace".into(),
                )
            })?;
            std::fs::create_dir_all(&dir)?;
            std::os::unix::fs::chown(&dir, Some(SANDBOX_UID), Some(SANDBOX_UID))?;
            Some(dir)
        } else {
            None
        };
        Ok(InstanceSpec {
            instance_id: format!("{}-{}-{:x}-{tag}{n}", rev.function, rev.number, self.epoch),
            function: rev.function.clone(),
            revision: rev.number,
            spec: rev.spec.clone(),
            code_dir: rev.code_dir.clone(),
            env: rev.env.clone(),
            exec_mode: rev.exec_mode,
            argv: rev.argv.clone(),
            rootfs: rev.rootfs.clone(),
            workspace,
        })
    }

    /// Starts an instance for `pool` as its revision's mode says: restored from the
    /// revision's snapshot (`checkpointed`, `branched`), or started fresh (with the workspace
    /// for `persistent`, after retiring the instances of the function's other revisions).
    async fn start_instance(&self, pool: &Pool) -> Result<Arc<dyn Instance>, SandboxError> {
        let rev = &pool.rev;
        let inst = match rev.spec.mode {
            Mode::Checkpointed | Mode::Branched => self.restore_from_template(pool).await?,
            mode => {
                if mode == Mode::Persistent {
                    // One instance per function: an older revision's gives way.
                    for other in self.function_pools(&rev.function) {
                        if other.rev.number != rev.number {
                            other.replace(true);
                        }
                    }
                }
                self.sandbox.start(self.instance_spec(rev, "")?).await?
            }
        };
        self.metrics
            .instances_started
            .fetch_add(1, Ordering::Relaxed);
        Ok(inst)
    }

    /// Restores an instance of a `checkpointed`/`branched` revision from its snapshot,
    /// building the snapshot first if there is none. An image left by an earlier server run
    /// that does not restore is rebuilt once.
    async fn restore_from_template(&self, pool: &Pool) -> Result<Arc<dyn Instance>, SandboxError> {
        let rev = &pool.rev;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (image, verified) = self.template(pool).await?;
            match self
                .sandbox
                .restore(self.instance_spec(rev, "")?, &image)
                .await
            {
                Ok(inst) => {
                    pool.template.lock().await.verified = true;
                    return Ok(inst);
                }
                Err(e @ SandboxError::Unsupported(_)) => return Err(e),
                Err(e) if verified || attempt > 1 => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        function = %rev.function,
                        revision = rev.number,
                        error = %e,
                        "snapshot image does not restore; building it again"
                    );
                    let mut t = pool.template.lock().await;
                    if t.image.as_deref() == Some(image.as_path()) && !t.verified {
                        t.image = None;
                        let _ = std::fs::remove_dir_all(&image);
                    }
                }
            }
        }
    }

    /// The revision's snapshot image (and whether this process restored from it already),
    /// built now if missing: one build at a time per revision, concurrent cold starts wait.
    async fn template(&self, pool: &Pool) -> Result<(PathBuf, bool), SandboxError> {
        let rev = &pool.rev;
        let mut t = pool.template.lock().await;
        if let Some(image) = &t.image {
            return Ok((image.clone(), t.verified));
        }
        let image = self.template_dir(rev)?;
        if image.is_dir() {
            t.image = Some(image.clone());
            return Ok((image, false));
        }
        let partial = image.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        let built = async {
            let inst = self.sandbox.start(self.instance_spec(rev, "tpl-")?).await?;
            // Before it serves anything: every restored copy starts from the state right
            // after the function's initialisation.
            let r = inst.checkpoint(&partial, rev.spec.timeout, false).await;
            inst.stop().await;
            r.map_err(|e| match e {
                SandboxError::Unsupported(m) => SandboxError::Unsupported(format!(
                    "mode: `{}` needs a sandbox tier that takes snapshots (sandbox: gvisor): {m}",
                    rev.spec.mode
                )),
                e => e,
            })
        }
        .await;
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &image)?;
        tracing::info!(
            function = %rev.function,
            revision = rev.number,
            image = %image.display(),
            "built revision snapshot"
        );
        t.image = Some(image.clone());
        Ok((image, true))
    }

    fn pool(&self, rev: &Arc<Revision>) -> Arc<Pool> {
        let mut pools = self.pools.lock();
        let key = (rev.function.clone(), rev.number);
        pools
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Pool {
                    rev: rev.clone(),
                    state: Mutex::default(),
                    freed: Notify::new(),
                    stops: self.stops.clone(),
                    template: Default::default(),
                    routed: AtomicBool::new(false),
                    topup_failed: Mutex::new(None),
                })
            })
            .clone()
    }

    /// A slot on an instance of `pool`: waits for capacity up to `timeout` (not at all
    /// without `wait_for_capacity`), counting cold starts and throttles.
    async fn acquire(
        &self,
        pool: &Arc<Pool>,
        wait_for_capacity: bool,
        timeout: Duration,
    ) -> Result<Lease, Outcome> {
        let wait = if wait_for_capacity {
            timeout
        } else {
            Duration::ZERO
        };
        let lease = pool
            .acquire(self, Instant::now() + wait)
            .await
            .inspect_err(|o| self.metrics.count_outcome(o))?;
        if lease.cold {
            self.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(lease)
    }

    /// Runs one invocation of `rev`. `Err` is a platform outcome (timeout, OOM, crash,
    /// throttled); a function's own error is `Ok` with `function_error` set.
    pub async fn invoke(
        &self,
        rev: &Arc<Revision>,
        inv: Invocation,
    ) -> Result<InvokeOutput, Outcome> {
        self.invoke_opts(rev, inv, InvokeOptions::default()).await
    }

    /// [`Scheduler::invoke`] with [`InvokeOptions`] (Lambda's immediate throttling, a route's
    /// shorter upstream timeout).
    pub async fn invoke_opts(
        &self,
        rev: &Arc<Revision>,
        inv: Invocation,
        opts: InvokeOptions,
    ) -> Result<InvokeOutput, Outcome> {
        let InvokeOptions {
            wait_for_capacity,
            timeout,
        } = opts;
        let timeout = timeout.map_or(rev.spec.timeout, |t| t.min(rev.spec.timeout));
        let pool = self.pool(rev);
        let lease = self.acquire(&pool, wait_for_capacity, timeout).await?;
        self.run_lease(rev, Owner::Pool(pool), lease, inv, timeout)
            .await
    }

    /// Runs `inv` on a leased instance under `timeout`, then gives the instance back to
    /// `owner` (stopping it when it timed out or broke).
    async fn run_lease(
        &self,
        rev: &Revision,
        owner: Owner,
        lease: Lease,
        inv: Invocation,
        timeout: Duration,
    ) -> Result<InvokeOutput, Outcome> {
        // As on Lambda, the function's timeout covers its invocation; a cold start (a
        // microVM's boot, the runtime's init) has a limit of its own. An instance that died
        // meanwhile reports why on the invoke below.
        let mut init = lease.init;
        if lease.cold {
            let t = Instant::now();
            let _ = lease.inst.initialized(INIT_LIMIT).await;
            init = init.map(|d| d + t.elapsed());
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let deadline_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64
            + timeout.as_millis() as u64;
        let req = InvokeRequest {
            invoke: Invoke {
                function_arn: launch::function_arn(&rev.function, inv.qualifier.as_deref()),
                trace_id: inv.trace_id.unwrap_or_else(|| {
                    format!("Root=1-{:08x}-{}", deadline_ms / 1000, &inv.request_id)
                }),
                id: inv.request_id,
                deadline_ms,
                client_context: inv.client_context,
                cognito_identity: None,
            },
            payload: inv.payload,
        };
        let result = tokio::time::timeout_at(deadline.into(), lease.inst.invoke(req)).await;
        let duration = started.elapsed();
        let res = match result {
            Err(_) => {
                owner.release(&lease.inst, true);
                Err(outcome(
                    rev,
                    ErrorKind::Timeout,
                    format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
                    String::new(),
                    lease.cold,
                ))
            }
            Ok(Err(e)) => {
                owner.release(&lease.inst, true);
                let kind = match e {
                    SandboxError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
                    _ => ErrorKind::Crashed,
                };
                Err(outcome(
                    rev,
                    kind,
                    e.to_string(),
                    e.log_tail().to_string(),
                    lease.cold,
                ))
            }
            Ok(Ok(mut r)) => {
                let stream = r.stream.take().map(|from| {
                    let (tx, to) =
                        ResponseStream::channel(STREAM_BUFFER, from.content_type.clone());
                    tokio::spawn(forward_stream(
                        owner.clone(),
                        lease.inst.clone(),
                        from,
                        tx,
                        deadline,
                        timeout,
                    ));
                    to
                });
                if stream.is_none() {
                    owner.release(&lease.inst, false);
                }
                let function_error = r.error_type.map(|reported_as| {
                    let (error_type, message) = error_details(&r.body);
                    FunctionError {
                        error_type: error_type.unwrap_or_else(|| reported_as.clone()),
                        message,
                        reported_as,
                    }
                });
                Ok(InvokeOutput {
                    body: r.body,
                    stream,
                    function_error,
                    revision: rev.number,
                    instance_id: lease.inst.id().to_string(),
                    cold: lease.cold,
                    duration,
                    init_duration: init,
                    logs: r.logs,
                    max_memory: lease.inst.memory_peak(),
                })
            }
        };
        match &res {
            Ok(o) => self.metrics.count_ok(o.function_error.is_some(), duration),
            Err(o) => self.metrics.count_outcome(o),
        }
        res
    }

    /// Leases an instance of `rev` for a request the caller delivers itself (an `http`
    /// function's proxied request), under the same capacity rules as [`Scheduler::invoke_opts`]:
    /// a warm instance with a free slot, else a new one up to `scale.max`, else waiting up to
    /// the function's timeout (or not at all without `wait_for_capacity`) → `throttled`. The
    /// slot is held until the [`InstanceLease`] is dropped; see [`InstanceLease::fail`].
    pub async fn lease(
        &self,
        rev: &Arc<Revision>,
        wait_for_capacity: bool,
    ) -> Result<InstanceLease, Outcome> {
        let pool = self.pool(rev);
        let lease = self
            .acquire(&pool, wait_for_capacity, rev.spec.timeout)
            .await?;
        Ok(InstanceLease {
            pool,
            inst: lease.inst,
            cold: lease.cold,
            init: lease.init,
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Counts a request served through an [`InstanceLease`] in the metrics: `Ok` with
    /// whether the function answered with an error, or the platform outcome.
    pub fn record(&self, result: Result<bool, &Outcome>, duration: Duration) {
        match result {
            Ok(function_error) => self.metrics.count_ok(function_error, duration),
            Err(o) => self.metrics.count_outcome(o),
        }
    }

    /// Stops idle-expired and dead instances (and branches), and tops up routed warm pools.
    async fn reap(self: &Arc<Self>, now: Instant) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        let mut victims = Vec::new();
        for p in &pools {
            victims.extend(p.expire(now, self.config.warm_pool_size));
        }
        victims.extend(self.branches.expire(now));
        for v in victims {
            v.stop().await;
        }
        for p in &pools {
            self.top_up(p, now);
        }
        // Forget empty pools of revisions nobody invokes or routes to.
        self.pools.lock().retain(|_, p| {
            let st = p.state.lock();
            !st.slots.is_empty()
                || st.starting > 0
                || Arc::strong_count(p) > 1
                || p.routed.load(Ordering::Relaxed)
        });
    }

    /// Starts, in the background, the instances a routed warm pool lacks to have
    /// `warm_pool_size` (see [`Scheduler::set_routed`]).
    fn top_up(self: &Arc<Self>, pool: &Arc<Pool>, now: Instant) {
        if self.config.warm_pool_size == 0
            || self.closing.load(Ordering::Relaxed)
            || pool.rev.spec.mode != Mode::Warm
            || !pool.routed.load(Ordering::Relaxed)
        {
            return;
        }
        let (n, generation) = pool.reserve_topup(pool.keep(self.config.warm_pool_size), now);
        for _ in 0..n {
            let (me, pool) = (self.clone(), pool.clone());
            tokio::spawn(async move {
                let started = me.start_instance(&pool).await;
                let key = (pool.rev.function.clone(), pool.rev.number);
                let wanted = !me.closing.load(Ordering::Relaxed)
                    && me
                        .pools
                        .lock()
                        .get(&key)
                        .is_some_and(|p| Arc::ptr_eq(p, &pool));
                pool.add_idle(started, generation, wanted);
            });
        }
    }

    /// Says which revisions of `function` aliases route to (`numbers`; the gateway calls it
    /// whenever it resolves an alias of the function, with the resolved revisions as `revs`).
    /// With [`SchedulerConfig::warm_pool_size`] > 0, each routed `warm` revision gets that many
    /// instances started now and kept through idle expiry; revisions no longer routed fall
    /// back to `scale.min`.
    pub fn set_routed(self: &Arc<Self>, function: &str, numbers: &[u32], revs: &[Arc<Revision>]) {
        for p in self.function_pools(function) {
            if !numbers.contains(&p.rev.number) {
                p.routed.store(false, Ordering::Relaxed);
            }
        }
        if self.config.warm_pool_size == 0 {
            return;
        }
        let now = Instant::now();
        for rev in revs
            .iter()
            .filter(|r| r.spec.mode == Mode::Warm && numbers.contains(&r.number))
        {
            let pool = self.pool(rev);
            pool.routed.store(true, Ordering::Relaxed);
            self.top_up(&pool, now);
        }
    }

    /// Instances kept started per routed warm revision (`FAAS_WARM_POOL_SIZE`).
    pub fn warm_pool_size(&self) -> u32 {
        self.config.warm_pool_size
    }

    /// Stops every instance and branch of a function (all revisions), e.g. when it is
    /// deleted, and removes its `persistent` workspace and revision snapshots.
    pub async fn remove_function(&self, name: &str) {
        let pools: Vec<Arc<Pool>> = {
            let mut map = self.pools.lock();
            let keys: Vec<_> = map.keys().filter(|(f, _)| f == name).cloned().collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for p in &pools {
            for inst in p.drain() {
                inst.stop().await;
            }
        }
        for b in self.branches.remove_where(|b| b.rev.function == name) {
            b.inst.stop().await;
        }
        if let Some(dir) = self.workspace_dir(name) {
            remove_dir_logged(&dir);
        }
        // Revision snapshots are named `<workspace>-<function>-<revision>`; function names
        // may contain `-`, so match the revision part exactly.
        if let Some(data) = &self.config.data_dir {
            let prefix = format!("{}-{name}-", self.config.workspace);
            if let Ok(entries) = std::fs::read_dir(data.join("snapshots/rev")) {
                for e in entries.flatten() {
                    let file = e.file_name().to_string_lossy().into_owned();
                    let rest = file.strip_prefix(&prefix).unwrap_or("");
                    let number = rest.strip_suffix(".partial").unwrap_or(rest);
                    if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
                        remove_dir_logged(&e.path());
                    }
                }
            }
        }
    }

    fn function_pools(&self, name: &str) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .iter()
            .filter(|((f, _), _)| f == name)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Graceful restart of a function (all revisions): idle instances are stopped now, busy
    /// ones finish their in-flight invocations and are then stopped, and every new invocation
    /// goes to a fresh instance.
    pub fn restart(&self, name: &str) -> Replaced {
        self.function_pools(name)
            .iter()
            .map(|p| p.replace(true))
            .fold(Replaced::default(), |a, b| Replaced {
                stopped: a.stopped + b.stopped,
                draining: a.draining + b.draining,
            })
    }

    /// Stops a function's idle instances now (all revisions, ignoring `scale.min`).
    pub fn recycle(&self, name: &str) -> usize {
        self.function_pools(name)
            .iter()
            .map(|p| p.replace(false).stopped)
            .sum()
    }

    /// Stops every instance and branch and releases what the tier holds (server shutdown).
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let pools: Vec<Arc<Pool>> = self.pools.lock().drain().map(|(_, p)| p).collect();
        for p in pools {
            for inst in p.drain() {
                inst.stop().await;
            }
        }
        for b in self.branches.remove_where(|_| true) {
            b.inst.stop().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stops.wait()).await;
        self.sandbox.shutdown().await;
    }

    /// Instances of a function, all revisions.
    pub fn instances(&self, name: &str) -> Vec<InstanceInfo> {
        let now = Instant::now();
        let mut out: Vec<InstanceInfo> = self
            .function_pools(name)
            .iter()
            .flat_map(|p| p.infos(now))
            .collect();
        out.sort_by(|a, b| a.revision.cmp(&b.revision).then(b.age_ms.cmp(&a.age_ms)));
        out
    }

    /// Number of live instances across all functions.
    pub fn instance_count(&self) -> usize {
        self.pools
            .lock()
            .values()
            .map(|p| p.state.lock().slots.len())
            .sum()
    }
}

/// One slot of an instance, held for a request the caller delivers itself. Dropping it returns
/// the slot (the instance stays warm), unless [`InstanceLease::fail`] was called: then the
/// instance is removed from its pool and stopped.
pub struct InstanceLease {
    pool: Arc<Pool>,
    inst: Arc<dyn Instance>,
    cold: bool,
    init: Option<Duration>,
    broken: std::sync::atomic::AtomicBool,
}

impl InstanceLease {
    pub fn instance(&self) -> &Arc<dyn Instance> {
        &self.inst
    }
    /// True when the instance was started for this lease.
    pub fn cold(&self) -> bool {
        self.cold
    }
    /// How long starting the instance took, for a cold lease.
    pub fn init_duration(&self) -> Option<Duration> {
        self.init
    }
    pub fn revision(&self) -> u32 {
        self.pool.rev.number
    }
    /// The instance must not be reused (timed out, connection broken, server gone): it is
    /// stopped when the lease is dropped.
    pub fn fail(&self) {
        self.broken.store(true, Ordering::Release);
    }
    /// A platform outcome for this lease's revision, for the caller's error reply.
    pub fn outcome(&self, kind: ErrorKind, message: String, log_tail: String) -> Outcome {
        outcome(&self.pool.rev, kind, message, log_tail, self.cold)
    }
}

impl Drop for InstanceLease {
    fn drop(&mut self) {
        self.pool
            .release(&self.inst, self.broken.load(Ordering::Acquire));
    }
}

/// Removes a directory tree, logging (not failing on) errors other than its absence.
fn remove_dir_logged(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove directory");
        }
    }
}

/// Pulls `errorType` and `errorMessage` out of an error JSON body; the message falls back to
/// the raw text.
fn error_details(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(rename = "errorType")]
        error_type: Option<String>,
        #[serde(rename = "errorMessage")]
        error_message: Option<String>,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(E {
            error_type,
            error_message: Some(m),
        }) => (error_type, m),
        Ok(E { error_type, .. }) => (
            error_type,
            String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned(),
        ),
        Err(_) => (
            None,
            String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned(),
        ),
    }
}

#[cfg(test)]
mod tests;
