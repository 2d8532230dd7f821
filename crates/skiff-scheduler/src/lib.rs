//! The scheduler owns instances: one warm pool per revision, up to `concurrency` in-flight
//! invocations per instance, new instances up to `scale.max`, idle instances stopped after
//! `scale.idle` (scale to zero), and timeouts. A timed-out, crashed or out-of-memory instance
//! is stopped and never reused. Nothing above the scheduler knows which tier runs a revision.

use parking_lot::Mutex;
use serde::Serialize;
use skiff_core::launch::{self, LaunchInfo};
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::{ErrorKind, FunctionError, FunctionSpec, Invocation, InvokeOutput, Outcome};
use skiff_sandbox::{Instance, InstanceSpec, InvokeRequest, Sandbox, SandboxError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

mod metrics;
pub use metrics::Metrics;

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
        let (exec_mode, argv) = launch::program(&spec);
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
}

#[derive(Default)]
struct PoolState {
    slots: Vec<Slot>,
    starting: u32,
}

/// Warm instances of one revision.
struct Pool {
    rev: Arc<Revision>,
    state: Mutex<PoolState>,
    freed: Notify,
    stops: Arc<Stops>,
}

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
struct Lease {
    inst: Arc<dyn Instance>,
    cold: bool,
    init: Option<Duration>,
}

impl Pool {
    /// In-flight invocations one instance may take; 0 for ephemeral revisions, whose
    /// instances serve exactly the invocation that started them.
    fn capacity_per_instance(&self) -> u32 {
        if self.ephemeral() {
            0
        } else {
            self.rev.spec.concurrency
        }
    }

    fn ephemeral(&self) -> bool {
        self.rev.spec.mode == skiff_core::Mode::Ephemeral
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
                    .filter(|s| s.in_flight < cap && s.inst.is_alive())
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
                if (st.slots.len() as u32 + st.starting) < self.rev.spec.scale.max {
                    st.starting += 1;
                    true
                } else {
                    false
                }
            };
            if start_new {
                let t0 = Instant::now();
                let started = sched.start_instance(&self.rev).await;
                let mut st = self.state.lock();
                st.starting -= 1;
                return match started {
                    Ok(inst) => {
                        let now = Instant::now();
                        st.slots.push(Slot {
                            inst: inst.clone(),
                            in_flight: 1,
                            served: 1,
                            created: now,
                            last_used: now,
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
                    format!(
                        "all {} instances of {} are busy (scale.max reached)",
                        self.rev.spec.scale.max, self.rev.function
                    ),
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
            if broken || self.ephemeral() || !st.slots[i].inst.is_alive() {
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

    /// Removes instances idle past `scale.idle` (keeping `scale.min`) and dead ones.
    fn expire(&self, now: Instant) -> Vec<Arc<dyn Instance>> {
        let mut st = self.state.lock();
        let idle = self.rev.spec.scale.idle;
        let min = self.rev.spec.scale.min as usize;
        let mut out = Vec::new();
        let mut i = 0;
        while i < st.slots.len() {
            let s = &st.slots[i];
            let dead = !s.inst.is_alive() && s.in_flight == 0;
            let expired =
                s.in_flight == 0 && now.duration_since(s.last_used) >= idle && st.slots.len() > min;
            if dead || expired {
                out.push(st.slots.swap_remove(i).inst);
            } else {
                i += 1;
            }
        }
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

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Reported to functions as `SKIFF_WORKSPACE_NAME`.
    pub workspace: String,
    /// How often idle instances are looked for.
    pub reap_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            workspace: "default".into(),
            reap_interval: Duration::from_millis(250),
        }
    }
}

/// Places invocations on instances.
pub struct Scheduler {
    sandbox: Arc<dyn Sandbox>,
    pools: Mutex<HashMap<(String, u32), Arc<Pool>>>,
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
            }
        });
        s
    }

    /// Workspace name functions see.
    pub fn workspace(&self) -> &str {
        &self.config.workspace
    }

    async fn start_instance(&self, rev: &Revision) -> Result<Arc<dyn Instance>, SandboxError> {
        let n = self.next_instance.fetch_add(1, Ordering::Relaxed);
        let spec = InstanceSpec {
            instance_id: format!("{}-{}-{:x}-{n}", rev.function, rev.number, self.epoch),
            function: rev.function.clone(),
            revision: rev.number,
            spec: rev.spec.clone(),
            code_dir: rev.code_dir.clone(),
            env: rev.env.clone(),
            exec_mode: rev.exec_mode,
            argv: rev.argv.clone(),
        };
        let inst = self.sandbox.start(spec).await?;
        self.metrics
            .instances_started
            .fetch_add(1, Ordering::Relaxed);
        Ok(inst)
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
                })
            })
            .clone()
    }

    /// Runs one invocation of `rev`. `Err` is a platform outcome (timeout, OOM, crash,
    /// throttled); a function's own error is `Ok` with `function_error` set.
    pub async fn invoke(
        &self,
        rev: &Arc<Revision>,
        inv: Invocation,
    ) -> Result<InvokeOutput, Outcome> {
        self.invoke_with(rev, inv, true).await
    }

    /// [`Scheduler::invoke`]; with `wait_for_capacity` false, an invocation that finds every
    /// instance busy at `scale.max` is throttled at once (Lambda's semantics) instead of
    /// waiting up to the function's timeout for a free instance.
    pub async fn invoke_with(
        &self,
        rev: &Arc<Revision>,
        inv: Invocation,
        wait_for_capacity: bool,
    ) -> Result<InvokeOutput, Outcome> {
        self.invoke_within(rev, inv, wait_for_capacity, rev.spec.timeout)
            .await
    }

    /// [`Scheduler::invoke_with`] under a `timeout` shorter than the function's (an HTTP
    /// route's upstream timeout); longer values are capped at the function's.
    pub async fn invoke_within(
        &self,
        rev: &Arc<Revision>,
        inv: Invocation,
        wait_for_capacity: bool,
        timeout: Duration,
    ) -> Result<InvokeOutput, Outcome> {
        let t0 = Instant::now();
        let timeout = timeout.min(rev.spec.timeout);
        let pool = self.pool(rev);
        // Waiting for capacity is bounded by the function's timeout.
        let wait = if wait_for_capacity {
            timeout
        } else {
            Duration::ZERO
        };
        let lease = pool
            .acquire(self, t0 + wait)
            .await
            .inspect_err(|o| self.metrics.count_outcome(o))?;
        if lease.cold {
            self.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
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
                pool.release(&lease.inst, true);
                Err(outcome(
                    rev,
                    ErrorKind::Timeout,
                    format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
                    String::new(),
                    lease.cold,
                ))
            }
            Ok(Err(e)) => {
                pool.release(&lease.inst, true);
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
            Ok(Ok(r)) => {
                pool.release(&lease.inst, false);
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
                    function_error,
                    revision: rev.number,
                    instance_id: lease.inst.id().to_string(),
                    cold: lease.cold,
                    duration,
                    init_duration: lease.init,
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

    /// Stops idle-expired and dead instances.
    async fn reap(&self, now: Instant) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        let mut victims = Vec::new();
        for p in &pools {
            victims.extend(p.expire(now));
        }
        for v in victims {
            v.stop().await;
        }
        // Forget empty pools of revisions nobody invokes.
        self.pools.lock().retain(|_, p| {
            let st = p.state.lock();
            !st.slots.is_empty() || st.starting > 0 || Arc::strong_count(p) > 1
        });
    }

    /// Stops every instance of a function (all revisions), e.g. when it is deleted.
    pub async fn remove_function(&self, name: &str) {
        let pools: Vec<Arc<Pool>> = {
            let mut map = self.pools.lock();
            let keys: Vec<_> = map.keys().filter(|(f, _)| f == name).cloned().collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for p in pools {
            for inst in p.drain() {
                inst.stop().await;
            }
        }
    }

    /// Stops every instance and releases what the tier holds (server shutdown).
    pub async fn shutdown(&self) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().drain().map(|(_, p)| p).collect();
        for p in pools {
            for inst in p.drain() {
                inst.stop().await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stops.wait()).await;
        self.sandbox.shutdown().await;
    }

    /// Instances of a function, all revisions.
    pub fn instances(&self, name: &str) -> Vec<InstanceInfo> {
        let now = Instant::now();
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .iter()
            .filter(|((f, _), _)| f == name)
            .map(|(_, p)| p.clone())
            .collect();
        pools.iter().flat_map(|p| p.infos(now)).collect()
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
