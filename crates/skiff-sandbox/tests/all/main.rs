//! Integration tests of the process tiers (native, and gVisor when `runsc` is installed). They
//! build real sandboxes and need root. The tier-neutral cases (isolation, limits, runtime API)
//! run against both tiers; `gvisor_*` cases cover checkpoint/restore.
//!
//! The test binary doubles as the agent: started with `__agent` it runs `skiff_agent::main()`.
//! Run: `cargo test -p skiff-sandbox --test all [-- name-filter...]`.

use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::FunctionSpec;
use skiff_sandbox::{
    GvisorConfig, GvisorSandbox, Instance, InstanceSpec, InvokeRequest, InvokeResult, NativeConfig,
    NativeSandbox, Sandbox, SandboxError,
};

mod gvisor;
mod microvm;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type TestFn = fn(Arc<Ctx>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A tier under test, with what the checks need to see of it.
trait Tier: Sandbox {
    /// The host cgroup directories an instance id uses.
    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf>;
    fn doctor(&self) -> Vec<(String, bool, String)>;
}

impl Tier for NativeSandbox {
    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.instance_cgroup_dirs(id)
    }
    fn doctor(&self) -> Vec<(String, bool, String)> {
        self.diagnostics()
    }
}

impl Tier for skiff_sandbox::MicrovmSandbox {
    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.instance_cgroup_dirs(id)
    }
    fn doctor(&self) -> Vec<(String, bool, String)> {
        skiff_sandbox::MicrovmSandbox::check(self.config())
    }
}

impl Tier for GvisorSandbox {
    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.instance_cgroup_dirs(id)
    }
    fn doctor(&self) -> Vec<(String, bool, String)> {
        GvisorSandbox::check(self.config())
    }
}

struct Ctx {
    sb: Box<dyn Tier>,
    /// `native` or `gvisor`.
    tier: &'static str,
    uid: u32,
    _state: tempfile::TempDir,
    code: tempfile::TempDir,
    runtime: PathBuf,
    agent: PathBuf,
}

const UID: u32 = 10071;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__agent") {
        skiff_agent::main();
    }
    // SAFETY: getter.
    if unsafe { libc::geteuid() } != 0 {
        println!("native sandbox tests need root; skipped");
        return;
    }
    // A host variable that must not leak into sandboxes (set before any thread exists).
    std::env::set_var("SKIFF_TEST_HOST_SECRET", "leaked");
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let code = rt.block_on(run_all(filters));
    std::process::exit(code);
}

fn sandbox(agent: &Path, state: &Path, runtime: &Path, uid: u32) -> NativeSandbox {
    let mut cfg = NativeConfig::new(agent, state, runtime);
    cfg.agent_args = vec!["__agent".into()];
    cfg.uid = uid;
    cfg.gid = uid;
    NativeSandbox::new(cfg).expect("native sandbox")
}

async fn run_all(filters: Vec<String>) -> i32 {
    let runtime = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtimes");
    let agent = std::env::current_exe().unwrap();
    let mut tally = (0, 0);

    let state = tempfile::tempdir().unwrap();
    let runtime_dir = if runtime.is_dir() {
        runtime.canonicalize().unwrap()
    } else {
        state.path().join("runtime")
    };
    let sb = sandbox(&agent, state.path(), &runtime_dir, UID);
    let ctx = make_ctx(
        Box::new(sb),
        "native",
        state,
        runtime_dir.clone(),
        agent.clone(),
    );
    run_tier(&ctx, &filters, &mut tally).await;
    drop(ctx);

    match gvisor::tier(&agent, &runtime_dir, UID) {
        Ok((sb, state)) => {
            let ctx = make_ctx(
                Box::new(sb),
                "gvisor",
                state,
                runtime_dir.clone(),
                agent.clone(),
            );
            run_tier(&ctx, &filters, &mut tally).await;
        }
        Err(why) => println!("gvisor tier not tested: {why}"),
    }
    match microvm::tier(&agent, &runtime_dir, UID) {
        Ok((sb, state)) => {
            let t = Instant::now();
            match sb.image().await {
                Ok(img) => {
                    println!(
                        "  microvm guest image {} ({}) in {:.1} s",
                        img.dir.display(),
                        if img.built_in.is_some() {
                            "built"
                        } else {
                            "cached"
                        },
                        t.elapsed().as_secs_f64()
                    );
                    let ctx = make_ctx(Box::new(sb), "microvm", state, runtime_dir, agent);
                    run_tier(&ctx, &filters, &mut tally).await;
                }
                Err(e) => {
                    tally.1 += 1;
                    println!("FAIL microvm/image: {e}");
                }
            }
        }
        Err(why) => println!("microvm tier not tested: {why}"),
    }
    let (passed, failed) = tally;
    println!("{passed} passed, {failed} failed");
    i32::from(failed > 0)
}

fn make_ctx(
    sb: Box<dyn Tier>,
    tier: &'static str,
    state: tempfile::TempDir,
    runtime: PathBuf,
    agent: PathBuf,
) -> Arc<Ctx> {
    for (name, ok, detail) in sb.doctor() {
        println!(
            "  doctor ({tier}): {name:<12} {} {detail}",
            if ok { "ok " } else { "BAD" }
        );
    }
    let code = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        code.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    Arc::new(Ctx {
        sb,
        tier,
        uid: UID,
        _state: state,
        code,
        runtime,
        agent,
    })
}

/// Cases of the isolated tiers that do not apply inside a microVM: the host cgroup sees only
/// QEMU's threads (the guest kernel keeps its own processes).
const MICROVM_SKIPS: &[&str] = &["gvisor_fork_bomb"];

/// Runs every case that applies to `ctx.tier`; names are `tier/case`.
async fn run_tier(ctx: &Arc<Ctx>, filters: &[String], tally: &mut (u32, u32)) {
    // (name, runs on gVisor too, test)
    let tests: Vec<(&str, bool, TestFn)> = vec![
        ("echo_round_trip", true, |c| Box::pin(echo_round_trip(c))),
        ("warm_reuse", true, |c| Box::pin(warm_reuse(c))),
        ("env_is_clean", true, |c| Box::pin(env_is_clean(c))),
        ("host_files_hidden", true, |c| {
            Box::pin(host_files_hidden(c))
        }),
        ("read_only_fs", true, |c| Box::pin(read_only_fs(c))),
        ("tmp_limit_and_wipe", true, |c| {
            Box::pin(tmp_limit_and_wipe(c))
        }),
        ("proc_shows_only_sandbox", true, |c| {
            Box::pin(proc_shows_only_sandbox(c))
        }),
        ("unprivileged_identity", true, |c| {
            Box::pin(unprivileged_identity(c))
        }),
        ("command_errors", true, |c| Box::pin(command_errors(c))),
        ("concurrency", true, |c| Box::pin(concurrency(c))),
        ("memory_hog_oom", true, |c| Box::pin(memory_hog_oom(c))),
        ("fork_bomb_contained", false, |c| {
            Box::pin(fork_bomb_contained(c))
        }),
        ("gvisor_fork_bomb", true, |c| Box::pin(gvisor::fork_bomb(c))),
        ("network_none", true, |c| Box::pin(network_none(c))),
        ("network_outbound", true, |c| Box::pin(network_outbound(c))),
        ("http_server", true, |c| Box::pin(http_server(c))),
        ("runtime_api", true, |c| Box::pin(runtime_api(c))),
        ("runtime_api_init_error", true, |c| {
            Box::pin(runtime_api_init_error(c))
        }),
        ("runtime_api_crash", true, |c| {
            Box::pin(runtime_api_crash(c))
        }),
        ("setup_failure_reported", false, |c| {
            Box::pin(setup_failure_reported(c))
        }),
        ("drop_cleans_up", true, |c| Box::pin(drop_cleans_up(c))),
        ("bad_agent_reported", false, |c| {
            Box::pin(bad_agent_reported(c))
        }),
        ("workspace_persists", true, |c| {
            Box::pin(gvisor::workspace_persists(c))
        }),
        ("gvisor_checkpoint_restore", true, |c| {
            Box::pin(gvisor::checkpoint_restore(c))
        }),
        ("gvisor_branches_independent", true, |c| {
            Box::pin(gvisor::branches_independent(c))
        }),
        ("measure_latency", false, |c| Box::pin(measure_latency(c))),
        ("nothing_left_behind", true, |c| {
            Box::pin(nothing_left_behind(c))
        }),
    ];
    let started = Instant::now();
    for (name, on_gvisor, f) in tests {
        let isolated = ctx.tier != "native";
        if isolated && !on_gvisor
            || ctx.tier != "gvisor" && name.starts_with("gvisor_")
            || ctx.tier == "microvm" && MICROVM_SKIPS.contains(&name)
        {
            continue;
        }
        let full = format!("{}/{name}", ctx.tier);
        if !filters.is_empty() && !filters.iter().any(|flt| full.contains(flt.as_str())) {
            continue;
        }
        let t = Instant::now();
        let res = match tokio::time::timeout(Duration::from_secs(60), f(ctx.clone())).await {
            Ok(r) => r,
            Err(_) => Err("timed out after 60 s".into()),
        };
        match res {
            Ok(()) => {
                tally.0 += 1;
                println!("ok   {full} ({} ms)", t.elapsed().as_millis());
            }
            Err(e) => {
                tally.1 += 1;
                println!("FAIL {full}: {e}");
            }
        }
    }
    println!(
        "{} tier done ({:.1} s)",
        ctx.tier,
        started.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------------------------------
// helpers

static NEXT: AtomicU64 = AtomicU64::new(1);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn fspec(extra: &str) -> FunctionSpec {
    FunctionSpec::from_yaml(&format!(
        "name: t\nruntime: command\nhandler: run\nnetwork: none\n{extra}"
    ))
    .unwrap()
}

fn env() -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("MY_VAR".into(), "from-spec".into()),
    ]
}

fn ispec(spec: FunctionSpec, mode: ExecMode, argv: &[&str], code: &Path) -> InstanceSpec {
    InstanceSpec {
        instance_id: unique("i"),
        function: spec.name.clone(),
        revision: 1,
        spec,
        code_dir: code.to_path_buf(),
        env: env(),
        exec_mode: mode,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        rootfs: None,
        workspace: None,
    }
}

/// A python3 function (the shipped Lambda bootstrap) in a code dir of its own.
pub(crate) fn python_spec(
    extra: &str,
    main_py: &str,
) -> Result<(InstanceSpec, tempfile::TempDir), String> {
    let code = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        code.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(code.path().join("main.py"), main_py).map_err(|e| e.to_string())?;
    let spec = FunctionSpec::from_yaml(&format!(
        "name: py\nruntime: python3\nhandler: main.handler\nnetwork: none\n{extra}"
    ))
    .map_err(|e| e.to_string())?;
    let (mode, argv) = skiff_core::launch::program(&spec);
    let env = skiff_core::launch::environment(&skiff_core::launch::LaunchInfo {
        spec: &spec,
        revision: 1,
        workspace: "default",
        secrets: &[],
        otel_endpoint: None,
    });
    let ispec = InstanceSpec {
        instance_id: unique("py"),
        function: "py".into(),
        revision: 1,
        spec,
        code_dir: code.path().to_path_buf(),
        env,
        exec_mode: mode,
        argv,
        rootfs: None,
        workspace: None,
    };
    Ok((ispec, code))
}

pub(crate) fn fresh_id(mut s: InstanceSpec) -> InstanceSpec {
    s.instance_id = unique("py");
    s
}

fn sh(script: &str) -> Vec<&str> {
    vec!["/usr/bin/sh", "-c", script]
}

async fn start_cmd(ctx: &Ctx, extra: &str, argv: &[&str]) -> Result<Arc<dyn Instance>, String> {
    let spec = ispec(fspec(extra), ExecMode::Command, argv, ctx.code.path());
    ctx.sb.start(spec).await.map_err(|e| format!("start: {e}"))
}

fn request(payload: &[u8]) -> InvokeRequest {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    InvokeRequest {
        invoke: Invoke {
            id: unique("req"),
            deadline_ms: now + 30_000,
            function_arn: "arn:aws:lambda:local:000000000000:function:t".into(),
            trace_id: "Root=1-00000000-000000000000000000000000".into(),
            client_context: None,
            cognito_identity: None,
        },
        payload: payload.to_vec(),
    }
}

async fn call(inst: &Arc<dyn Instance>, payload: &[u8]) -> Result<InvokeResult, SandboxError> {
    inst.invoke(request(payload)).await
}

async fn call_ok(inst: &Arc<dyn Instance>, payload: &[u8]) -> Result<String, String> {
    let r = call(inst, payload)
        .await
        .map_err(|e| format!("invoke: {e:?}"))?;
    if let Some(t) = &r.error_type {
        return Err(format!(
            "function error {t}: {} (logs: {})",
            String::from_utf8_lossy(&r.body),
            String::from_utf8_lossy(&r.logs)
        ));
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

/// Runs one command in a fresh instance and returns its stdout.
async fn once(ctx: &Ctx, extra: &str, script: &str) -> Result<String, String> {
    let inst = start_cmd(ctx, extra, &sh(script)).await?;
    let r = call_ok(&inst, b"").await;
    inst.stop().await;
    r
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn processes_of_uid(uid: u32) -> Vec<String> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real_uid == Some(uid) {
            v.push(format!("{name}: {}", status.lines().next().unwrap_or("")));
        }
    }
    v
}

async fn assert_gone(sb: &dyn Tier, id: &str, uid: u32) -> Result<(), String> {
    for d in sb.cgroup_dirs(id) {
        check(!d.exists(), || {
            format!("cgroup {} still exists", d.display())
        })?;
    }
    let left = processes_of_uid(uid);
    check(left.is_empty(), || {
        format!("processes of uid {uid} left: {left:?}")
    })
}

// ------------------------------------------------------------------------------------------
// tests

async fn echo_round_trip(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(&ctx, "", &sh("echo to-stderr >&2; cat")).await?;
    let r = call(&inst, b"{\"hello\":\"world\"}")
        .await
        .map_err(|e| e.to_string())?;
    check(r.error_type.is_none(), || {
        format!("error: {:?}", r.error_type)
    })?;
    check(r.body == b"{\"hello\":\"world\"}", || {
        format!("body {:?}", String::from_utf8_lossy(&r.body))
    })?;
    check(
        String::from_utf8_lossy(&r.logs).contains("to-stderr"),
        || format!("logs {:?}", r.logs),
    )?;
    // A large payload round-trips too.
    let big = vec![b'x'; 3 << 20];
    let r = call(&inst, &big).await.map_err(|e| e.to_string())?;
    check(r.body.len() == big.len(), || {
        format!("big body {} bytes", r.body.len())
    })?;
    let id = inst.id().to_string();
    inst.stop().await;
    check(!inst.is_alive(), || "alive after stop".into())?;
    inst.stop().await; // idempotent
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}

async fn warm_reuse(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(&ctx, "", &sh("read x; echo \"got $x\"")).await?;
    let a = call_ok(&inst, b"one\n").await?;
    let b = call_ok(&inst, b"two\n").await?;
    check(a.trim() == "got one" && b.trim() == "got two", || {
        format!("{a:?} {b:?}")
    })?;
    check(inst.is_alive(), || "instance died".into())?;
    let mem = inst.memory_usage();
    check(mem.is_some_and(|m| m > 0), || {
        format!("memory usage {mem:?}")
    })?;
    inst.stop().await;
    Ok(())
}

async fn env_is_clean(ctx: Arc<Ctx>) -> Result<(), String> {
    let out = once(&ctx, "", "env; echo cwd=$(pwd); echo host=$(hostname)").await?;
    check(out.contains("MY_VAR=from-spec"), || {
        format!("spec env missing: {out}")
    })?;
    check(!out.contains("SKIFF_TEST_HOST_SECRET"), || {
        format!("host env leaked: {out}")
    })?;
    check(!out.contains("CARGO"), || format!("host env leaked: {out}"))?;
    check(out.contains("cwd=/var/task"), || format!("cwd: {out}"))?;
    check(out.contains("host=skiff"), || format!("hostname: {out}"))
}

async fn host_files_hidden(ctx: Arc<Ctx>) -> Result<(), String> {
    let marker = format!("/root/skiff-marker-{}", std::process::id());
    std::fs::write(&marker, "top-secret-marker").map_err(|e| e.to_string())?;
    let out = once(
        &ctx,
        "",
        &format!(
            "cat {marker} 2>&1; for d in /root /home /var/lib /srv /opt /run /etc/shadow /etc/hostname /work; do test -e $d && echo present:$d; done; echo /etc/*; echo /*"
        ),
    )
    .await;
    let _ = std::fs::remove_file(&marker);
    let out = out?;
    check(!out.contains("top-secret-marker"), || {
        format!("marker readable: {out}")
    })?;
    for d in [
        "/root",
        "/home",
        "/var/lib",
        "/srv",
        "/opt",
        "/run",
        "/etc/shadow",
        "/work",
    ] {
        check(!out.contains(&format!("present:{d}\n")), || {
            format!("{d} visible in sandbox: {out}")
        })?;
    }
    check(
        out.contains("passwd") && out.contains("resolv.conf"),
        || format!("/etc: {out}"),
    )
}

async fn read_only_fs(ctx: Arc<Ctx>) -> Result<(), String> {
    let out = once(
        &ctx,
        "",
        "for f in /var/task/x /var/runtime/x /usr/x /x /etc/x /dev/x; do touch $f 2>/dev/null && echo writable:$f; done; \
         touch /tmp/x && echo tmp-ok; echo hi > /dev/null && echo devnull-ok; head -c 4 /dev/urandom | wc -c",
    )
    .await?;
    check(!out.contains("writable:"), || {
        format!("writable paths: {out}")
    })?;
    check(out.contains("tmp-ok") && out.contains("devnull-ok"), || {
        out.to_string()
    })?;
    check(out.trim_end().ends_with('4'), || format!("urandom: {out}"))
}

async fn tmp_limit_and_wipe(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(
        &ctx,
        "tmp: 1Mi",
        &sh("test -e /tmp/keep && echo kept; echo x > /tmp/keep; mkdir -p /tmp/d/e; \
             dd if=/dev/zero of=/tmp/big bs=1024 count=2048 2>/dev/null || echo full; du -sk /tmp | cut -f1"),
    )
    .await?;
    let a = call_ok(&inst, b"").await?;
    let b = call_ok(&inst, b"").await?;
    inst.stop().await;
    check(a.contains("full") && !a.contains("kept"), || {
        format!("first: {a}")
    })?;
    let used: u64 = a
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(u64::MAX);
    check(used <= 1024, || format!("/tmp holds {used} KiB > 1 MiB"))?;
    check(!b.contains("kept"), || {
        format!("/tmp not wiped between invocations: {b}")
    })
}

async fn proc_shows_only_sandbox(ctx: Arc<Ctx>) -> Result<(), String> {
    let out = once(&ctx, "", "cd /proc && echo [0-9]*; ps -e | wc -l").await?;
    let mut lines = out.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    check(pids.contains(&1), || format!("pid 1 not visible: {out}"))?;
    check(pids.len() <= 6 && pids.iter().all(|&p| p < 100), || {
        format!("too many pids visible: {pids:?}")
    })?;
    let ps: usize = lines.next().unwrap_or("").trim().parse().unwrap_or(999);
    check(ps <= 7, || format!("ps shows {ps} lines: {out}"))
}

async fn unprivileged_identity(ctx: Arc<Ctx>) -> Result<(), String> {
    let out = once(&ctx, "", "cat /proc/self/status; readlink /proc/self/fd/* | grep -c socket: ; cat /proc/1/environ 2>&1 | head -c 100").await?;
    check(out.contains("\n0\n"), || {
        format!("sockets (the host channel?) visible to the function: {out}")
    })?;
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let uid = field("Uid:");
    check(
        uid.split_whitespace().all(|u| u == ctx.uid.to_string()),
        || format!("Uid: {uid}"),
    )?;
    check(field("CapEff:") == "0000000000000000", || {
        format!("CapEff: {}", field("CapEff:"))
    })?;
    check(field("CapPrm:") == "0000000000000000", || {
        format!("CapPrm: {}", field("CapPrm:"))
    })?;
    check(field("CapBnd:") == "0000000000000000", || {
        format!("CapBnd: {}", field("CapBnd:"))
    })?;
    check(field("Seccomp:") == "2", || {
        format!("Seccomp: {}", field("Seccomp:"))
    })?;
    // gVisor's /proc does not show the flag (its sentry enforces it all the same).
    if ctx.tier != "gvisor" {
        check(field("NoNewPrivs:") == "1", || {
            format!("NoNewPrivs: {}", field("NoNewPrivs:"))
        })?;
    }
    // Namespace creation is refused (user namespaces would otherwise be allowed unprivileged).
    let out = once(&ctx, "", "/usr/bin/unshare -U true 2>&1 || echo unshare-denied; /usr/bin/python3 -c 'import ctypes; c = ctypes.CDLL(None, use_errno=True); print(\"unshare\", c.unshare(0x10000000), ctypes.get_errno())'").await?;
    check(
        out.contains("unshare-denied") && out.contains("unshare -1 1"),
        || format!("unshare: {out}"),
    )
}

async fn command_errors(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(
        &ctx,
        "",
        &sh("echo partial; echo oops-on-stderr >&2; exit 3"),
    )
    .await?;
    let r = call(&inst, b"").await.map_err(|e| e.to_string())?;
    inst.stop().await;
    check(r.error_type.as_deref() == Some("Runtime.ExitError"), || {
        format!("{:?}", r.error_type)
    })?;
    let body: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    check(
        body["errorMessage"] == "Command exited with non-zero status: 3",
        || body.to_string(),
    )?;
    check(
        body["stackTrace"].to_string().contains("oops-on-stderr"),
        || body.to_string(),
    )?;

    let inst = start_cmd(&ctx, "", &sh("kill -TERM $$")).await?;
    let r = call(&inst, b"").await.map_err(|e| e.to_string())?;
    check(
        String::from_utf8_lossy(&r.body).contains("killed by signal 15"),
        || format!("{:?}", r),
    )?;
    // A missing program is a function error, not a dead instance.
    inst.stop().await;
    let inst = start_cmd(&ctx, "", &["/var/task/missing"]).await?;
    let r = call(&inst, b"").await.map_err(|e| e.to_string())?;
    inst.stop().await;
    check(
        r.error_type.as_deref() == Some("Runtime.InvalidEntrypoint"),
        || format!("{r:?}"),
    )
}

async fn concurrency(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(&ctx, "concurrency: 3", &sh("sleep 0.5; cat")).await?;
    // The instance is up (a microVM boots for seconds) before the clock starts.
    call(&inst, b"warm")
        .await
        .map_err(|e| format!("warm-up: {e:?}"))?;
    // One call alone gives the tier's own cost of a call (process start, emulation).
    let t = Instant::now();
    call(&inst, b"one")
        .await
        .map_err(|e| format!("single call: {e:?}"))?;
    let one = t.elapsed();
    let t = Instant::now();
    let calls = (0..6).map(|i| {
        let inst = inst.clone();
        async move { call(&inst, format!("n{i}").as_bytes()).await }
    });
    let results = futures_join(calls.collect()).await;
    let elapsed = t.elapsed();
    let agent_output = inst.take_output();
    inst.stop().await;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.map_err(|e| format!("call {i}: {e:?}"))?;
        let body = String::from_utf8_lossy(&r.body);
        check(r.error_type.is_none() && body == format!("n{i}"), || {
            format!(
                "call {i}: {body:?} (error {:?}, logs {:?}, agent {:?})",
                r.error_type,
                String::from_utf8_lossy(&r.logs),
                String::from_utf8_lossy(&agent_output)
            )
        })?;
    }
    // 6 calls, 3 at a time: about 2 single calls' time (1 s + process starts, which are slow
    // under gVisor's ptrace and a microVM's emulation, where they share one vCPU).
    // Six calls in a row take 6 × `one`; overlapping their sleeps must save at least 1 s.
    check(elapsed + Duration::from_secs(1) < one * 6, || {
        format!("took {elapsed:?}; one call alone {one:?}")
    })
}

async fn futures_join<T: Send + 'static>(
    futs: Vec<impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn memory_hog_oom(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(
        &ctx,
        "memory: 128Mi",
        &["/usr/bin/python3", "-c", "import sys; print('allocating', file=sys.stderr, flush=True); b = b'x' * (300 << 20); print(len(b))"],
    )
    .await?;
    let r = call(&inst, b"").await;
    let id = inst.id().to_string();
    inst.stop().await;
    match r {
        Err(SandboxError::OutOfMemory {
            limit_mb: 128,
            log_tail,
        }) => {
            check(log_tail.contains("allocating"), || {
                format!("log tail: {log_tail:?}")
            })?;
        }
        other => return Err(format!("expected OutOfMemory, got {other:?}")),
    }
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}

/// `http` mode: the host connects to the server on the sandbox's loopback (network none):
/// natively through a socket made in the sandbox's network namespace, on gVisor and microVMs
/// through the agent's tunnel. A body larger than the tunnel's window makes the round trip
/// both ways; a deaf server is reported.
async fn http_server(ctx: Arc<Ctx>) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = "import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n    def do_GET(self):\n        b = ('hi ' + self.path).encode()\n        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)\n    def do_POST(self):\n        b = self.rfile.read(int(self.headers['Content-Length']))[::-1]\n        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)\nprint('up', flush=True)\nh.HTTPServer(('127.0.0.1', 8080), H).serve_forever()\n";
    let spec = ispec(
        fspec(""),
        ExecMode::Http,
        &["/usr/bin/python3", "-c", server],
        ctx.code.path(),
    );
    let inst = ctx.sb.start(spec).await.map_err(|e| e.to_string())?;
    let mut conn = inst
        .connect_http(Duration::from_secs(40))
        .await
        .map_err(|e| format!("connect_http: {e}"))?;
    conn.write_all(b"GET /x?y=1 HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    check(
        resp.starts_with("HTTP/1.0 200") && resp.ends_with("hi /x?y=1"),
        || resp.clone(),
    )?;
    // 1 MiB up and back: four times the tunnel's window.
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let conn = inst
        .connect_http(Duration::from_secs(5))
        .await
        .map_err(|e| format!("connect_http: {e}"))?;
    let head = format!(
        "POST /echo HTTP/1.0\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (mut rd, mut wr) = tokio::io::split(conn);
    let up = {
        let body = body.clone();
        tokio::spawn(async move {
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(&body).await?;
            Ok::<_, std::io::Error>(wr)
        })
    };
    let mut resp = Vec::new();
    rd.read_to_end(&mut resp).await.map_err(|e| e.to_string())?;
    let _ = up
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {} bytes", resp.len()))?;
    let reversed: Vec<u8> = body.iter().rev().copied().collect();
    check(
        resp.starts_with(b"HTTP/1.0 200") && resp[split + 4..] == reversed[..],
        || {
            format!(
                "{} bytes back: {:?}",
                resp.len(),
                String::from_utf8_lossy(&resp[..split])
            )
        },
    )?;
    let id = inst.id().to_string();
    inst.stop().await;
    assert_gone(&*ctx.sb, &id, ctx.uid).await?;

    let spec = ispec(
        fspec(""),
        ExecMode::Http,
        &sh("echo deaf; sleep 60"),
        ctx.code.path(),
    );
    let inst = ctx.sb.start(spec).await.map_err(|e| e.to_string())?;
    // Long enough for a microVM to boot and the script to speak.
    let wait = if ctx.tier == "microvm" { 15_000 } else { 500 };
    let err = inst.connect_http(Duration::from_millis(wait)).await.err();
    let shown = format!("{err:?}");
    check(
        matches!(&err, Some(SandboxError::NotListening { log_tail, .. }) if log_tail.contains("deaf")),
        || shown.clone(),
    )?;
    inst.stop().await;
    Ok(())
}

async fn fork_bomb_contained(ctx: Arc<Ctx>) -> Result<(), String> {
    // Own sandbox (uid) so the leftover-process check is exact.
    let uid = 10072;
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sb = sandbox(&ctx.agent, state.path(), &ctx.runtime, uid);
    let counter = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork failed after', n, 'errno', e.errno)\n";
    let spec = ispec(
        fspec(""),
        ExecMode::Command,
        &["/usr/bin/python3", "-c", counter],
        ctx.code.path(),
    );
    let inst = sb.start(spec).await.map_err(|e| e.to_string())?;
    let out = call_ok(&inst, b"").await?;
    let n: u32 = out
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX);
    check(n < 256 && out.contains("errno 11"), || {
        format!("fork counter: {out}")
    })?;
    // The sleeping children died with their command's process group.
    let out = call_ok(&inst, b"").await?;
    check(out.contains("fork failed"), || out.clone())?;
    let id = inst.id().to_string();
    inst.stop().await;
    assert_gone(&sb, &id, uid).await?;

    // A real fork bomb, left running, then stopped.
    let spec = ispec(
        fspec(""),
        ExecMode::Command,
        // The bomb runs in a subshell forked while the pids limit is still empty, and the top
        // shell `exec`s: it never needs a fork once the bomb has filled the limit.
        &sh("(b(){ b|b& }; b) 2>/dev/null; exec sleep 10"),
        ctx.code.path(),
    );
    let inst = sb.start(spec).await.map_err(|e| e.to_string())?;
    let pids_dir = sb.instance_cgroup_dirs(inst.id())[1].clone();
    let sampler = tokio::spawn(async move {
        let mut max = 0u32;
        for _ in 0..150 {
            let n = std::fs::read_to_string(pids_dir.join("pids.current")).unwrap_or_default();
            max = max.max(n.trim().parse().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        max
    });
    let bomb = tokio::time::timeout(Duration::from_secs(2), call(&inst, b"")).await;
    check(bomb.is_err(), || format!("fork bomb returned: {bomb:?}"))?;
    let max_tasks = sampler.await.unwrap_or(0);
    let host_ok = Command::new("/usr/bin/true")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let id = inst.id().to_string();
    let t = Instant::now();
    inst.stop().await;
    let stop_ms = t.elapsed().as_millis();
    check(host_ok, || {
        "host could not spawn a process during the fork bomb".into()
    })?;
    check(max_tasks > 100 && max_tasks <= 256, || {
        format!("peak pids.current {max_tasks}")
    })?;
    println!("       fork bomb: peak {max_tasks} tasks (limit 256), stop took {stop_ms} ms");
    assert_gone(&sb, &id, uid).await
}

async fn network_none(ctx: Arc<Ctx>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket\nfor host in ['127.0.0.1', '10.0.2.2', '1.1.1.1']:\n    try:\n        socket.create_connection((host, {port}), timeout=2)\n        print('CONNECTED', host)\n    except OSError as e:\n        print('FAIL', host, e)\n"
    );
    let out = once(&ctx, "", &format!("/usr/bin/python3 -c \"{script}\"; cat /etc/resolv.conf; cat /sys/class/net/*/operstate 2>&1 | head -3")).await?;
    drop(listener);
    check(!out.contains("CONNECTED"), || {
        format!("sandbox reached the network: {out}")
    })?;
    check(out.matches("FAIL").count() == 3, || out.clone())
}

/// A network namespace standing in for a host on the internet: 10.213.0.2 behind a veth.
struct TestNet {
    ns: String,
    veth: String,
    listener: Option<std::process::Child>,
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    check(out.status.success(), || {
        format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn test_net(port: u16) -> Result<TestNet, String> {
    let pid = std::process::id();
    let mut net = TestNet {
        ns: format!("skiff-t-{pid}"),
        veth: format!("skt{pid}a"),
        listener: None,
    };
    let peer = format!("skt{pid}b");
    ip(&["netns", "add", &net.ns])?;
    ip(&[
        "link", "add", &net.veth, "type", "veth", "peer", "name", &peer,
    ])?;
    ip(&["link", "set", &peer, "netns", &net.ns])?;
    ip(&["addr", "add", "10.213.0.1/30", "dev", &net.veth])?;
    ip(&["link", "set", &net.veth, "up"])?;
    ip(&[
        "netns",
        "exec",
        &net.ns,
        "ip",
        "addr",
        "add",
        "10.213.0.2/30",
        "dev",
        &peer,
    ])?;
    ip(&["netns", "exec", &net.ns, "ip", "link", "set", &peer, "up"])?;
    ip(&["netns", "exec", &net.ns, "ip", "link", "set", "lo", "up"])?;
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('10.213.0.2', {port}))\ns.listen(8)\nprint('ready', flush=True)\nwhile True:\n    c, a = s.accept()\n    c.sendall(b'hello-from-ns ' + a[0].encode())\n    c.close()\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.ns, "/usr/bin/python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    net.listener = Some(child);
    check(line.trim() == "ready", || format!("listener: {line:?}"))?;
    Ok(net)
}

async fn network_outbound(ctx: Arc<Ctx>) -> Result<(), String> {
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let host_port = host_listener.local_addr().unwrap().port();
    let port = 18000 + (std::process::id() % 1000) as u16;
    let _net = test_net(port)?;
    let script = format!(
        "import socket\ntry:\n    c = socket.create_connection(('10.213.0.2', {port}), timeout=3)\n    print('GOT', c.recv(100).decode())\nexcept OSError as e:\n    print('OUT-FAIL', e)\nfor host in ['10.0.2.2', '127.0.0.1']:\n    try:\n        socket.create_connection((host, {host_port}), timeout=2)\n        print('HOST-CONNECTED', host)\n    except OSError as e:\n        print('HOST-FAIL', host, e)\n"
    );
    let t = Instant::now();
    let inst = start_cmd(
        &ctx,
        "network: outbound",
        &["/usr/bin/python3", "-c", &script],
    )
    .await?;
    let start_ms = t.elapsed().as_millis();
    let out = call_ok(&inst, b"").await;
    let id = inst.id().to_string();
    inst.stop().await;
    drop(host_listener);
    let out = out?;
    println!("       outbound start (incl. slirp4netns): {start_ms} ms");
    check(out.contains("GOT hello-from-ns"), || {
        format!("outbound connection failed: {out}")
    })?;
    check(out.matches("HOST-FAIL").count() == 2, || {
        format!("host loopback reachable: {out}")
    })?;
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}

const WORKER: &str = r#"
import http.client, json, os, sys
api = os.environ["AWS_LAMBDA_RUNTIME_API"]
host, port = api.split(":")
conn = http.client.HTTPConnection(host, int(port))
def req(method, path, body=None, headers=None):
    conn.request(method, "/2018-06-01/runtime" + path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r, r.read()
if os.environ.get("INIT_FAIL"):
    print("init is failing", flush=True)
    req("POST", "/init/error", json.dumps({"errorMessage": "boom at init", "errorType": "InitBoom"}),
        {"Lambda-Runtime-Function-Error-Type": "InitBoom"})
    sys.exit(1)
print("init ok", flush=True)
while True:
    r, body = req("GET", "/invocation/next")
    rid = r.getheader("Lambda-Runtime-Aws-Request-Id")
    ev = json.loads(body or b"{}")
    print("handling", rid, flush=True)
    if ev.get("crash"):
        os._exit(3)
    if ev.get("fail"):
        r2, b2 = req("POST", "/invocation/%s/error" % rid, json.dumps({"errorMessage": "bad input", "errorType": "BadInput"}),
                     {"Lambda-Runtime-Function-Error-Type": "BadInput"})
        continue
    if ev.get("raw_error"):
        req("POST", "/invocation/%s/error" % rid, "plain text failure")
        continue
    if ev.get("twice"):
        req("POST", "/invocation/%s/response" % rid, "1")
        r2, b2 = req("POST", "/invocation/%s/response" % rid, "2")
        req("POST", "/invocation/other/response", "3")
        continue
    out = {"echo": ev, "deadline": r.getheader("Lambda-Runtime-Deadline-Ms"),
           "arn": r.getheader("Lambda-Runtime-Invoked-Function-Arn"), "pid": os.getpid()}
    req("POST", "/invocation/%s/response" % rid, json.dumps(out))
"#;

async fn start_rapi(
    ctx: &Ctx,
    extra: &str,
    env_extra: &[(&str, &str)],
) -> Result<Arc<dyn Instance>, String> {
    std::fs::write(ctx.code.path().join("worker.py"), WORKER).map_err(|e| e.to_string())?;
    let mut spec = ispec(
        fspec(extra),
        ExecMode::RuntimeApi,
        &["/usr/bin/python3", "-u", "/var/task/worker.py"],
        ctx.code.path(),
    );
    for (k, v) in env_extra {
        spec.env.push((k.to_string(), v.to_string()));
    }
    ctx.sb.start(spec).await.map_err(|e| format!("start: {e}"))
}

async fn runtime_api(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_rapi(&ctx, "", &[]).await?;
    let r = call(&inst, br#"{"n":1}"#)
        .await
        .map_err(|e| e.to_string())?;
    check(r.error_type.is_none(), || format!("{r:?}"))?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    check(
        v["echo"]["n"] == 1 && v["arn"].as_str().unwrap_or("").contains("function:t"),
        || v.to_string(),
    )?;
    let logs = String::from_utf8_lossy(&r.logs).into_owned();
    check(
        logs.contains("init ok") && logs.contains("handling"),
        || format!("logs {logs:?}"),
    )?;
    let pid = v["pid"].clone();
    let r = call(&inst, br#"{"n":2}"#)
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    check(v["echo"]["n"] == 2 && v["pid"] == pid, || {
        format!("second: {v} (pid was {pid})")
    })?;
    check(
        !String::from_utf8_lossy(&r.logs).contains("init ok"),
        || "init logs repeated".into(),
    )?;

    let r = call(&inst, br#"{"fail":true}"#)
        .await
        .map_err(|e| e.to_string())?;
    check(r.error_type.as_deref() == Some("BadInput"), || {
        format!("{r:?}")
    })?;
    check(
        String::from_utf8_lossy(&r.body).contains("bad input"),
        || format!("{r:?}"),
    )?;
    let r = call(&inst, br#"{"raw_error":true}"#)
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    check(
        r.error_type.as_deref() == Some("Unhandled") && v["errorMessage"] == "plain text failure",
        || format!("{r:?}"),
    )?;
    let r = call(&inst, br#"{"twice":true}"#)
        .await
        .map_err(|e| e.to_string())?;
    check(r.body == b"1", || format!("{r:?}"))?;
    let r = call(&inst, br#"{"n":3}"#)
        .await
        .map_err(|e| e.to_string())?;
    check(r.error_type.is_none(), || {
        format!("after double answer: {r:?}")
    })?;
    check(inst.is_alive(), || "instance died".into())?;
    inst.stop().await;
    Ok(())
}

async fn runtime_api_init_error(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_rapi(&ctx, "", &[("INIT_FAIL", "1")]).await?;
    let r = call(&inst, b"{}").await.map_err(|e| e.to_string())?;
    check(r.error_type.as_deref() == Some("InitBoom"), || {
        format!("{r:?}")
    })?;
    check(
        String::from_utf8_lossy(&r.body).contains("boom at init"),
        || format!("{r:?}"),
    )?;
    check(
        String::from_utf8_lossy(&r.logs).contains("init is failing"),
        || format!("{r:?}"),
    )?;
    check(!inst.is_alive(), || {
        "instance still alive after init error".into()
    })?;
    let again = call(&inst, b"{}").await.map_err(|e| e.to_string())?;
    check(again.error_type.as_deref() == Some("InitBoom"), || {
        format!("{again:?}")
    })?;
    inst.stop().await;
    Ok(())
}

async fn runtime_api_crash(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_rapi(&ctx, "concurrency: 2", &[]).await?;
    call_ok(&inst, b"{}").await?;
    let r = call(&inst, br#"{"crash":true}"#).await;
    match &r {
        Err(SandboxError::Crashed { message, log_tail }) => {
            check(
                message == "Runtime exited with error: exit status 3",
                || message.clone(),
            )?;
            check(log_tail.contains("handling"), || log_tail.clone())?;
        }
        other => return Err(format!("expected Crashed, got {other:?}")),
    }
    check(!inst.is_alive(), || "alive after crash".into())?;
    let again = call(&inst, b"{}").await;
    check(matches!(again, Err(SandboxError::Crashed { .. })), || {
        format!("{again:?}")
    })?;
    let id = inst.id().to_string();
    inst.stop().await;
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}

async fn setup_failure_reported(ctx: Arc<Ctx>) -> Result<(), String> {
    // A runtime-API program that does not exist: the agent reports it, the instance is dead.
    let spec = ispec(
        fspec(""),
        ExecMode::RuntimeApi,
        &["/var/task/nope"],
        ctx.code.path(),
    );
    let inst = ctx.sb.start(spec).await.map_err(|e| e.to_string())?;
    let r = call(&inst, b"{}").await;
    inst.stop().await;
    match r {
        Err(SandboxError::Crashed { message, .. }) if message.contains("/var/task/nope") => Ok(()),
        other => Err(format!(
            "expected Crashed naming the program, got {other:?}"
        )),
    }
}

async fn drop_cleans_up(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(&ctx, "", &sh("sleep 30")).await?;
    let id = inst.id().to_string();
    // An invocation in flight, abandoned, then the last handle dropped without stop().
    let _ = tokio::time::timeout(Duration::from_millis(100), call(&inst, b"")).await;
    drop(inst);
    for _ in 0..100 {
        if ctx.sb.cgroup_dirs(&id).iter().all(|d| !d.exists()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}

async fn bad_agent_reported(ctx: Arc<Ctx>) -> Result<(), String> {
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let not_exec = state.path().join("agent");
    std::fs::write(&not_exec, "not a program").map_err(|e| e.to_string())?;
    let sb = sandbox(&not_exec, state.path(), &ctx.runtime, 10073);
    let inst = sb
        .start(ispec(
            fspec(""),
            ExecMode::Command,
            &["/usr/bin/true"],
            ctx.code.path(),
        ))
        .await
        .map_err(|e| e.to_string())?;
    let r = call(&inst, b"").await;
    let id = inst.id().to_string();
    inst.stop().await;
    match r {
        Err(SandboxError::Crashed { message, .. })
            if message.contains("could not exec the agent") => {}
        other => return Err(format!("expected a clear crash, got {other:?}")),
    }
    assert_gone(&sb, &id, 10073).await
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

async fn measure_latency(ctx: Arc<Ctx>) -> Result<(), String> {
    // Cold: start + first invoke of a trivial command.
    let mut cold = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let inst = start_cmd(&ctx, "", &["/usr/bin/true"]).await?;
        call_ok(&inst, b"").await?;
        cold.push(t.elapsed());
        inst.stop().await;
    }
    let inst = start_cmd(&ctx, "", &["/usr/bin/true"]).await?;
    let mut warm = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        call_ok(&inst, b"").await?;
        warm.push(t.elapsed());
    }
    let t = Instant::now();
    inst.stop().await;
    let stop = t.elapsed();
    println!(
        "       command /usr/bin/true: cold {:?} (median of 20), warm {:?} median / {:?} p99 (200), stop {:?}",
        median(cold),
        median(warm.clone()),
        p99(warm),
        stop
    );

    // Runtime API: the test worker (http.client) and, if present, the real Python bootstrap.
    let mut cold = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let inst = start_rapi(&ctx, "", &[]).await?;
        call_ok(&inst, b"{}").await?;
        cold.push(t.elapsed());
        inst.stop().await;
    }
    let inst = start_rapi(&ctx, "", &[]).await?;
    let mut warm = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        call_ok(&inst, b"{\"a\":1}").await?;
        warm.push(t.elapsed());
    }
    inst.stop().await;
    println!(
        "       runtime-api python worker: cold {:?} (median of 10), warm {:?} median / {:?} p99 (200)",
        median(cold),
        median(warm.clone()),
        p99(warm)
    );

    let bootstrap = ctx.runtime.join("python/bootstrap.py");
    if bootstrap.is_file() {
        let (spec, _code) = python_spec(
            "",
            "def handler(event, context):\n    return {'ok': True}\n",
        )?;
        let mk = || fresh_id(spec.clone());
        let mut cold = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let inst = ctx.sb.start(mk()).await.map_err(|e| e.to_string())?;
            let out = call_ok(&inst, b"{}").await?;
            cold.push(t.elapsed());
            inst.stop().await;
            check(out.contains("ok"), || out.clone())?;
        }
        let inst = ctx.sb.start(mk()).await.map_err(|e| e.to_string())?;
        let mut warm = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            call_ok(&inst, b"{}").await?;
            warm.push(t.elapsed());
        }
        inst.stop().await;
        println!(
            "       python3 runtime (runtimes/python/bootstrap.py): cold {:?} (median of 10), warm {:?} median / {:?} p99 (200)",
            median(cold),
            median(warm.clone()),
            p99(warm)
        );
    }
    Ok(())
}

async fn nothing_left_behind(ctx: Arc<Ctx>) -> Result<(), String> {
    // Every test stopped its instances: no sandbox process, no instance cgroup, no slirp4netns.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let left = processes_of_uid(ctx.uid);
    check(left.is_empty(), || {
        format!("sandbox processes left: {left:?}")
    })?;
    let parents: Vec<std::path::PathBuf> = ctx
        .sb
        .cgroup_dirs("x")
        .iter()
        .filter_map(|d| d.parent().map(|p| p.to_path_buf()))
        .collect();
    for parent in &parents {
        let children: Vec<String> = std::fs::read_dir(parent)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        // Only pre-spawned agents (not yet given to any instance) may remain.
        check(children.iter().all(|c| c.starts_with("pool-")), || {
            format!("cgroups left under {}: {children:?}", parent.display())
        })?;
    }
    // Shutting the tier down removes the pre-spawned agents and this server's cgroup dirs.
    ctx.sb.shutdown().await;
    for parent in &parents {
        check(!parent.exists(), || {
            format!("{} left after shutdown", parent.display())
        })?;
    }
    let me = std::process::id().to_string();
    let out = Command::new("pgrep")
        .args(["-P", &me])
        .output()
        .map_err(|e| e.to_string())?;
    let kids = String::from_utf8_lossy(&out.stdout).trim().to_string();
    check(kids.is_empty(), || {
        format!("child processes of the test left: {kids}")
    })?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    check(!mounts.contains(&ctx.sb_state_root()), || {
        "sandbox root mounted on the host".into()
    })
}

impl Ctx {
    fn sb_state_root(&self) -> String {
        self._state.path().join("root").display().to_string()
    }
}
