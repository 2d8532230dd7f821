//! The scheduler's own bookkeeping for the execution modes, against a recording in-test
//! [`Sandbox`]: which tier calls happen, when, and with what. How real instances behave in
//! each mode is tested end to end against the real binary (`skiff-cli/tests/e2e/modes.rs`).

use super::*;
use async_trait::async_trait;
use skiff_sandbox::InvokeResult;
use std::sync::atomic::AtomicBool;

/// Records every call; instances answer `{"instance": id}`.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    specs: Mutex<Vec<InstanceSpec>>,
    no_snapshots: bool,
    started: AtomicU64,
    /// Instances answer at once instead of after 5 ms.
    instant: bool,
}

struct FakeInstance {
    id: String,
    alive: AtomicBool,
    sandbox: Arc<Fake>,
}

impl Fake {
    fn log(&self, s: String) {
        self.calls.lock().push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }
    fn count(&self, prefix: &str) -> usize {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }
}

/// `Arc<Fake>` as the scheduler's sandbox, keeping a handle for assertions.
struct Shared(Arc<Fake>);

#[async_trait]
impl Sandbox for Shared {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        self.0.log(format!("start {}", spec.instance_id));
        self.instance(spec).await
    }
    async fn restore(
        &self,
        spec: InstanceSpec,
        image: &Path,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        if self.0.no_snapshots {
            return Err(SandboxError::Unsupported("no snapshots here".into()));
        }
        assert!(
            image.join("pages").is_file(),
            "restored from a complete image"
        );
        self.0.log(format!("restore {}", image.display()));
        self.instance(spec).await
    }
}

impl Shared {
    async fn instance(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        // Starting takes a moment, so concurrent cold starts overlap.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.started.fetch_add(1, Ordering::Relaxed);
        let id = spec.instance_id.clone();
        self.0.specs.lock().push(spec);
        Ok(Arc::new(FakeInstance {
            id,
            alive: AtomicBool::new(true),
            sandbox: self.0.clone(),
        }))
    }
}

#[async_trait]
impl Instance for FakeInstance {
    fn id(&self) -> &str {
        &self.id
    }
    async fn invoke(&self, _req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        if !self.sandbox.instant {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(InvokeResult {
            body: format!(r#"{{"instance":"{}"}}"#, self.id).into_bytes(),
            ..Default::default()
        })
    }
    async fn stop(&self) {
        if self.alive.swap(false, Ordering::AcqRel) {
            self.sandbox.log(format!("stop {}", self.id));
        }
    }
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
    fn memory_usage(&self) -> Option<u64> {
        None
    }
    async fn checkpoint(
        &self,
        image: &Path,
        _init_within: Duration,
        leave_running: bool,
    ) -> Result<(), SandboxError> {
        if self.sandbox.no_snapshots {
            return Err(SandboxError::Unsupported("no snapshots here".into()));
        }
        assert!(image.is_dir(), "the image directory exists");
        std::fs::write(image.join("pages"), b"memory").unwrap();
        self.sandbox.log(format!(
            "checkpoint {} {} leave_running={leave_running}",
            self.id,
            image.display()
        ));
        if !leave_running {
            self.alive.store(false, Ordering::Release);
        }
        Ok(())
    }
}

struct Setup {
    sched: Arc<Scheduler>,
    fake: Arc<Fake>,
    data: tempfile::TempDir,
}

fn setup(fake: Fake, warm_pool_size: u32) -> Setup {
    let fake = Arc::new(fake);
    let data = tempfile::tempdir().unwrap();
    let sched = Scheduler::new(
        Arc::new(Shared(fake.clone())),
        SchedulerConfig {
            data_dir: Some(data.path().to_path_buf()),
            warm_pool_size,
            // Reaping is driven by the tests.
            reap_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    Setup { sched, fake, data }
}

fn rev(number: u32, yaml: &str) -> Arc<Revision> {
    let spec = FunctionSpec::from_yaml(&format!("name: f\nruntime: python3\ntimeout: 5s\n{yaml}"))
        .unwrap();
    Arc::new(Revision::new(
        number,
        spec,
        PathBuf::from("/nonexistent"),
        &[],
        "default",
    ))
}

fn inv() -> Invocation {
    Invocation {
        request_id: "r".into(),
        function: "f".into(),
        qualifier: None,
        payload: b"{}".to_vec(),
        client_context: None,
        trace_id: None,
    }
}

async fn instance_of(sched: &Arc<Scheduler>, rev: &Arc<Revision>) -> (String, bool) {
    let out = sched.invoke(rev, inv()).await.expect("invocation succeeds");
    (out.instance_id, out.cold)
}

#[tokio::test]
async fn checkpointed_builds_one_snapshot_before_serving_and_restores_every_cold_start() {
    let Setup { sched, fake, data } = setup(Fake::default(), 0);
    let r = rev(1, "mode: checkpointed\nsandbox: gvisor\nscale: {max: 3}\n");
    // Three concurrent first calls: one template build, three restores.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (s, r) = (sched.clone(), r.clone());
            tokio::spawn(async move { instance_of(&s, &r).await })
        })
        .collect();
    for c in calls {
        assert!(c.await.unwrap().1, "each was a cold start");
    }
    let image = data.path().join("snapshots/rev/default-f-1");
    assert_eq!(fake.count("start "), 1, "{:?}", fake.calls());
    assert_eq!(fake.count("checkpoint "), 1, "{:?}", fake.calls());
    assert_eq!(fake.count("restore "), 3, "{:?}", fake.calls());
    let calls = fake.calls();
    assert!(
        calls[0].contains("-tpl-"),
        "the template instance: {calls:?}"
    );
    assert_eq!(
        calls[1],
        format!(
            "checkpoint {} {} leave_running=false",
            &calls[0][6..],
            image.with_extension("partial").display()
        ),
        "checkpointed before serving anything, then stopped"
    );
    assert!(image.join("pages").is_file());
    assert!(!image.with_extension("partial").exists());
    // The template instance served nothing: every invocation ran on a restored one.
    assert!(sched.instances("f").iter().all(|i| !i.id.contains("-tpl-")));

    // After a restart the next cold start restores again; no new build.
    sched.restart("f");
    let (_, cold) = instance_of(&sched, &r).await;
    assert!(cold);
    assert_eq!((fake.count("start "), fake.count("restore ")), (1, 4));

    // Deleting the function removes its revision snapshot.
    sched.remove_function("f").await;
    assert!(!image.exists());
}

#[tokio::test]
async fn branched_restores_a_fresh_copy_per_invocation_and_stops_it() {
    let Setup { sched, fake, .. } = setup(Fake::default(), 0);
    let r = rev(1, "mode: branched\nsandbox: gvisor\n");
    let (a, cold_a) = instance_of(&sched, &r).await;
    let (b, cold_b) = instance_of(&sched, &r).await;
    assert_ne!(a, b);
    assert!(cold_a && cold_b);
    assert_eq!((fake.count("start "), fake.count("restore ")), (1, 2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        fake.calls().contains(&format!("stop {a}")),
        "{:?}",
        fake.calls()
    );
    assert!(sched.instances("f").is_empty());
}

#[tokio::test]
async fn a_tier_without_snapshots_fails_the_revision_clearly() {
    let Setup { sched, fake, data } = setup(
        Fake {
            no_snapshots: true,
            ..Default::default()
        },
        0,
    );
    let r = rev(1, "mode: checkpointed\n");
    let err = sched.invoke(&r, inv()).await.unwrap_err();
    assert!(matches!(err.kind, ErrorKind::StartFailed));
    assert!(
        err.message.contains("mode: `checkpointed`"),
        "{}",
        err.message
    );
    assert!(err.message.contains("gvisor"), "{}", err.message);
    // The template instance was stopped and nothing half-written is left.
    assert_eq!(fake.count("stop "), 1, "{:?}", fake.calls());
    let rev_dir = data.path().join("snapshots/rev");
    assert_eq!(std::fs::read_dir(rev_dir).unwrap().count(), 0);
}

#[tokio::test]
async fn persistent_has_one_instance_with_its_workspace_and_is_never_idle_reaped() {
    let Setup { sched, fake, data } = setup(Fake::default(), 3);
    let r = rev(1, "mode: persistent\nscale: {max: 5, idle: 1s}\n");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (s, r) = (sched.clone(), r.clone());
            tokio::spawn(async move { instance_of(&s, &r).await.0 })
        })
        .collect();
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one instance: {ids:?}");
    let ws = data.path().join("workspaces/default/f");
    assert_eq!(
        fake.specs.lock()[0].workspace.as_deref(),
        Some(ws.as_path())
    );
    assert!(ws.is_dir());
    // Routed or not, a persistent revision has no warm pool and is not reaped when idle.
    sched.set_routed("f", &[1], std::slice::from_ref(&r));
    sched.reap(Instant::now() + Duration::from_secs(3600)).await;
    assert_eq!(sched.instances("f").len(), 1);
    assert_eq!(fake.count("start "), 1);
    // A new revision's instance replaces it (one per function).
    let r2 = rev(2, "mode: persistent\n");
    instance_of(&sched, &r2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let left = sched.instances("f");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].revision, 2);
    assert_eq!(
        fake.specs.lock()[1].workspace.as_deref(),
        Some(ws.as_path())
    );
    sched.remove_function("f").await;
    assert!(!ws.exists(), "deleting the function removes its workspace");
}

#[tokio::test]
async fn warm_pool_fills_routed_revisions_and_keeps_them_through_idle_expiry() {
    let Setup { sched, fake, .. } = setup(Fake::default(), 2);
    let r1 = rev(1, "scale: {idle: 1s}\n");
    sched.set_routed("f", &[1], std::slice::from_ref(&r1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.count("start "), 2, "pre-started when routed");
    let (_, cold) = instance_of(&sched, &r1).await;
    assert!(!cold, "served by a pre-started instance");
    let later = Instant::now() + Duration::from_secs(60);
    sched.reap(later).await;
    assert_eq!(sched.instances("f").len(), 2, "never below the pool size");
    // Instances that died are replaced on the next reap.
    sched.recycle("f");
    sched.reap(Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sched.instances("f").len(), 2);
    assert_eq!(fake.count("start "), 4);
    // Once no alias routes to it, it shrinks to scale.min (0)...
    let r2 = rev(2, "scale: {idle: 1s}\n");
    sched.set_routed("f", &[2], std::slice::from_ref(&r2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    sched.reap(Instant::now() + Duration::from_secs(60)).await;
    let revs: Vec<u32> = sched.instances("f").iter().map(|i| i.revision).collect();
    assert_eq!(revs, [2, 2]);
    // ...and non-warm modes never get a pool.
    let e = rev(3, "mode: ephemeral\n");
    sched.set_routed("f", &[3], &[e]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.count("start "), 6);
}

#[tokio::test]
async fn snapshot_and_fork_bookkeeping() {
    let Setup { sched, fake, data } = setup(Fake::default(), 0);
    let r = rev(1, "scale: {idle: 1s}\n");
    let image = data.path().join("snapshots/s1");
    assert!(matches!(
        sched.snapshot("f", &image).await,
        Err(SchedError::NoInstance { .. })
    ));
    let (id, _) = instance_of(&sched, &r).await;
    let taken = sched.snapshot("f", &image).await.unwrap();
    assert_eq!(
        (taken.revision, taken.instance_id.as_str()),
        (1, id.as_str())
    );
    assert!(fake.calls().contains(&format!(
        "checkpoint {id} {} leave_running=true",
        image.display()
    )));
    // The instance keeps serving, idle again.
    assert_eq!(instance_of(&sched, &r).await, (id.clone(), false));

    let branches = sched.fork(&r, "s1", &image, 3).await.unwrap();
    assert_eq!(branches.len(), 3);
    assert_eq!(fake.count("restore "), 3);
    let ids: Vec<String> = branches.iter().map(|b| b.id.clone()).collect();
    let out = sched.invoke_branch(&ids[0], inv()).await.unwrap();
    assert!(!out.cold);
    assert_eq!(sched.branch(&ids[0]).unwrap().invocations, 1);
    assert_eq!(sched.branches().len(), 3);
    assert!(sched.delete_branch(&ids[0]).await);
    assert!(!sched.delete_branch(&ids[0]).await);
    assert!(matches!(
        sched.invoke_branch(&ids[0], inv()).await,
        Err(SchedError::BranchNotFound(_))
    ));
    // Branches outlive the function's idle time only while used; then they are stopped.
    sched.reap(Instant::now() + Duration::from_secs(2)).await;
    assert!(sched.branches().is_empty());
    assert_eq!(fake.count("stop "), 4, "{:?}", fake.calls()); // 3 branches + the warm one
}

/// What the scheduler itself costs per warm invocation (pool lookup, lease, timeout, request
/// building, release, metrics) against an instance that answers at once:
/// `cargo test --release -p skiff-scheduler scheduler_path_cost -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn scheduler_path_cost() {
    let Setup { sched, .. } = setup(
        Fake {
            instant: true,
            ..Fake::default()
        },
        0,
    );
    let r = rev(1, "");
    instance_of(&sched, &r).await;
    let n = 200_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let out = sched.invoke(&r, inv()).await.unwrap();
        assert!(!out.cold);
    }
    println!(
        "scheduler path: {:.2} µs per warm invocation",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
