//! gVisor-specific cases: checkpoint/restore of a real Python runtime, copy-on-write branches,
//! and the persistent workspace (which also runs on the native tier).

use super::*;

/// The gVisor tier for the suite, or why it is not tested (no `runsc`).
pub(crate) fn tier(
    agent: &Path,
    runtime: &Path,
    uid: u32,
) -> Result<(GvisorSandbox, tempfile::TempDir), String> {
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cfg = GvisorConfig::new(agent, state.path(), runtime);
    if !cfg.runsc.is_file() {
        return Err(format!(
            "{} not found (apt-get install runsc)",
            cfg.runsc.display()
        ));
    }
    cfg.agent_args = vec!["__agent".into()];
    cfg.uid = uid;
    cfg.gid = uid;
    let sb = GvisorSandbox::new(cfg).map_err(|e| e.to_string())?;
    Ok((sb, state))
}

const COUNTER: &str = r#"
import os
count = 0
boot = os.urandom(4).hex()
print("init done", flush=True)
def handler(event, context):
    global count
    count += 1
    with open("/tmp/trail", "a") as f:
        f.write(event.get("mark", "-"))
    return {"count": count, "boot": boot, "trail": open("/tmp/trail").read()}
"#;

async fn json_call(inst: &Arc<dyn Instance>, mark: &str) -> Result<serde_json::Value, String> {
    let out = call_ok(inst, format!("{{\"mark\":\"{mark}\"}}").as_bytes()).await?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

/// A snapshot taken after init restores the in-memory state of that moment: every restored
/// copy starts from count 0, whatever the original did after the snapshot.
pub(crate) async fn checkpoint_restore(ctx: Arc<Ctx>) -> Result<(), String> {
    let (spec, _code) = python_spec("mode: checkpointed\n", COUNTER)?;
    let image = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let a = ctx
        .sb
        .start(fresh_id(spec.clone()))
        .await
        .map_err(|e| e.to_string())?;
    a.checkpoint(image.path(), Duration::from_secs(20), true)
        .await
        .map_err(|e| format!("checkpoint: {e}"))?;
    let snap_ms = t.elapsed().as_millis();
    let a1 = json_call(&a, "a").await?;
    let a2 = json_call(&a, "a").await?;
    check(a1["count"] == 1 && a2["count"] == 2, || {
        format!("original: {a1} {a2}")
    })?;

    let t = Instant::now();
    let b = ctx
        .sb
        .restore(fresh_id(spec.clone()), image.path())
        .await
        .map_err(|e| format!("restore: {e}"))?;
    let b1 = json_call(&b, "b").await?;
    let restore_ms = t.elapsed().as_millis();
    check(b1["count"] == 1, || {
        format!("restored copy saw later state: {b1}")
    })?;
    check(b1["boot"] == a1["boot"], || {
        format!("restored copy re-ran init: {b1} vs {a1}")
    })?;
    check(b1["trail"] == "b", || {
        format!("/tmp leaked across the snapshot: {b1}")
    })?;
    println!(
        "       python3 start+init+checkpoint {snap_ms} ms; restore to first reply {restore_ms} ms"
    );

    // Without leave_running the checkpointed instance is gone afterwards.
    a.checkpoint(image.path(), Duration::from_secs(5), false)
        .await
        .map_err(|e| format!("second checkpoint: {e}"))?;
    check(!a.is_alive(), || {
        "instance alive after a stopping checkpoint".into()
    })?;
    let c = ctx
        .sb
        .restore(fresh_id(spec), image.path())
        .await
        .map_err(|e| format!("restore 2: {e}"))?;
    let c1 = json_call(&c, "c").await?;
    check(c1["count"] == 3 && c1["trail"] == "aac", || {
        format!("second snapshot (taken at count 2) restored as {c1}")
    })?;
    let ids: Vec<String> = [&a, &b, &c].iter().map(|i| i.id().to_string()).collect();
    for i in [a, b, c] {
        i.stop().await;
    }
    for id in ids {
        assert_gone(&*ctx.sb, &id, ctx.uid).await?;
    }
    Ok(())
}

/// Branches restored from one snapshot at once do not see each other's writes.
pub(crate) async fn branches_independent(ctx: Arc<Ctx>) -> Result<(), String> {
    let (spec, _code) = python_spec("mode: branched\n", COUNTER)?;
    let image = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tmpl = ctx
        .sb
        .start(fresh_id(spec.clone()))
        .await
        .map_err(|e| e.to_string())?;
    tmpl.checkpoint(image.path(), Duration::from_secs(20), false)
        .await
        .map_err(|e| format!("checkpoint: {e}"))?;
    let t = Instant::now();
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let (ctx, s, img) = (
                ctx.clone(),
                fresh_id(spec.clone()),
                image.path().to_path_buf(),
            );
            tokio::spawn(async move { ctx.sb.restore(s, &img).await })
        })
        .collect();
    let mut branches: Vec<Arc<dyn Instance>> = Vec::new();
    for s in starts {
        branches.push(
            s.await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("restore: {e}"))?,
        );
    }
    let all_ms = t.elapsed().as_millis();
    let first = json_call(&branches[0], "x").await?;
    let second = json_call(&branches[0], "y").await?;
    let other = json_call(&branches[1], "z").await?;
    let third = json_call(&branches[2], "w").await?;
    println!("       3 branches restored concurrently in {all_ms} ms");
    for i in &branches {
        i.stop().await;
    }
    check(
        first["count"] == 1 && second["count"] == 2 && second["trail"] == "xy",
        || format!("branch 0: {first} {second}"),
    )?;
    check(other["count"] == 1 && other["trail"] == "z", || {
        format!("branch 1 saw branch 0's writes: {other}")
    })?;
    check(
        third["count"] == 1 && third["boot"] == first["boot"],
        || format!("branch 2: {third}"),
    )
}

/// `mode: persistent`: the workspace is writable and outlives the instance; `/tmp` is kept.
pub(crate) async fn workspace_persists(ctx: Arc<Ctx>) -> Result<(), String> {
    let ws = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(ws.path(), Some(ctx.uid), Some(ctx.uid)).map_err(|e| e.to_string())?;
    let mk = || {
        let mut s = ispec(
            fspec("mode: persistent"),
            ExecMode::Command,
            &sh("n=$(cat /workspace/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /workspace/n; \
                 echo x >> /tmp/t; echo \"$n $(wc -l < /tmp/t)\"; touch /var/task/x 2>/dev/null && echo code-writable; true"),
            ctx.code.path(),
        );
        s.workspace = Some(ws.path().to_path_buf());
        s
    };
    let a = ctx.sb.start(mk()).await.map_err(|e| e.to_string())?;
    let one = call_ok(&a, b"").await?;
    let two = call_ok(&a, b"").await?;
    a.stop().await;
    let b = ctx.sb.start(mk()).await.map_err(|e| e.to_string())?;
    let three = call_ok(&b, b"").await?;
    b.stop().await;
    check(one.trim() == "1 1" && two.trim() == "2 2", || {
        format!("first instance: {one:?} {two:?}")
    })?;
    check(three.trim() == "3 1", || {
        format!("after a restart (workspace kept, /tmp fresh): {three:?}")
    })?;
    let on_host = std::fs::read_to_string(ws.path().join("n")).map_err(|e| e.to_string())?;
    check(on_host.trim() == "3", || format!("host copy: {on_host:?}"))
}

/// A fork bomb inside gVisor fills the sandbox's host pids limit (each guest process is a
/// host stub under ptrace) or the sentry's own; the host and other sandboxes are unaffected
/// and stopping it leaves nothing behind.
pub(crate) async fn fork_bomb(ctx: Arc<Ctx>) -> Result<(), String> {
    let inst = start_cmd(&ctx, "", &sh("(b(){ b|b& }; b) 2>/dev/null; exec sleep 10")).await?;
    let id = inst.id().to_string();
    let pids_dir = ctx.sb.cgroup_dirs(&id)[1].clone();
    let mut max = 0u32;
    let invoke = {
        let inst = inst.clone();
        tokio::spawn(async move { call(&inst, b"").await })
    };
    for _ in 0..60 {
        let n = std::fs::read_to_string(pids_dir.join("pids.current")).unwrap_or_default();
        max = max.max(n.trim().parse().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let limit: u32 = std::fs::read_to_string(pids_dir.join("pids.max"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    // Meanwhile another sandbox still works.
    let other = once(&ctx, "", "echo alive").await?;
    let t = Instant::now();
    inst.stop().await;
    invoke.abort();
    println!(
        "       gvisor fork bomb: peak {max} host tasks (limit {limit}), stop took {} ms",
        t.elapsed().as_millis()
    );
    check(other.trim() == "alive", || {
        format!("other sandbox: {other}")
    })?;
    check(max <= limit && limit > 0, || {
        format!("peak {max} over limit {limit}")
    })?;
    assert_gone(&*ctx.sb, &id, ctx.uid).await
}
