use super::*;
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::FunctionSpec;

struct Fixture {
    _dir: tempfile::TempDir,
    inst: Arc<dyn Instance>,
}

async fn start_with(source: &str, extra: &str) -> Result<Fixture, SandboxError> {
    start_in(JsSandbox::new(), source, extra).await
}

/// The spec of instance `t-{n}` of function `t` (revision 1) with its code in `dir`.
fn instance_spec(dir: &std::path::Path, n: u32, yaml: &str) -> InstanceSpec {
    InstanceSpec {
        instance_id: format!("t-{n}"),
        function: "t".into(),
        revision: 1,
        spec: FunctionSpec::from_yaml(&format!("name: t\nruntime: js\n{yaml}")).unwrap(),
        code_dir: dir.to_path_buf(),
        env: vec![("GREETING".into(), "hi".into())],
        exec_mode: ExecMode::Command,
        argv: vec![],
        rootfs: None,
        workspace: None,
    }
}

async fn start_in(tier: JsSandbox, source: &str, extra: &str) -> Result<Fixture, SandboxError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.js"), source).unwrap();
    let spec = instance_spec(dir.path(), 1, &format!("handler: index.js\n{extra}"));
    let inst = tier.start(spec).await?;
    Ok(Fixture { _dir: dir, inst })
}

async fn start(source: &str) -> Fixture {
    start_with(source, "").await.unwrap()
}

fn req(payload: &str, within: Duration) -> InvokeRequest {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    InvokeRequest {
        invoke: Invoke {
            id: "req-1".into(),
            deadline_ms: (now + within).as_millis() as u64,
            function_arn: "arn".into(),
            trace_id: "trace".into(),
            client_context: None,
            cognito_identity: None,
        },
        payload: payload.as_bytes().to_vec(),
    }
}

async fn call(f: &Fixture, payload: &str) -> Result<InvokeResult, SandboxError> {
    // As a task: on a multi-threaded runtime it runs on a worker, as the gateway's calls do.
    let inst = f.inst.clone();
    let req = req(payload, Duration::from_secs(5));
    tokio::spawn(async move { inst.invoke(req).await })
        .await
        .unwrap()
}

fn json(r: &InvokeResult) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Runs each test twice: on a current-thread runtime, where every invocation is queued for
/// the isolate's thread, and on a multi-threaded one, where a free isolate runs the
/// invocation inline on the caller's thread.
macro_rules! both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn queued() {
                super::$name().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn inline() {
                super::$name().await
            }
        }
    )*};
}

both_paths!(
    echoes_event_logs_and_reads_env,
    plain_values_non_json_payloads_and_timers,
    every_kind_of_result_is_answered,
    thrown_error_is_a_function_error_and_instance_survives,
    eval_function_import_require_are_unavailable,
    infinite_loop_is_interrupted_on_stop,
    memory_hog_is_out_of_memory,
    bad_modules_fail_to_start_with_the_reason,
    url_and_text_codecs,
    deep_recursion_is_a_function_error_not_a_crash,
    unsettled_promise_is_reported,
    bytecode_is_compiled_once_per_revision,
    fetch_reaches_a_local_server_only_with_the_test_override,
    fetch_obeys_network_none_and_the_timeout,
    invocations_interleave_with_their_own_results_and_logs,
    one_invocation_times_out_alone,
    timer_callback_errors_fail_only_their_invocation,
    a_runaway_loop_or_oom_fails_every_invocation_in_flight,
    stop_fails_pending_invocations_and_cleared_timers_never_fire,
    idle_heap_is_measured_once_idle,
);

async fn echoes_event_logs_and_reads_env() {
    let f = start(
        r#"let n = 0;
        export default async (req, ctx) => {
          console.log("got", req.name, {a: 1});
          console.error("bad");
          n += 1;
          return { n, name: req.name, greeting: env.GREETING, id: ctx.awsRequestId,
                   uuid: crypto.randomUUID().length };
        };"#,
    )
    .await;
    let r = call(&f, r#"{"name":"ada"}"#).await.unwrap();
    assert_eq!(r.error_type, None);
    let v = json(&r);
    assert_eq!(v["name"], "ada");
    assert_eq!(v["greeting"], "hi");
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["uuid"], 36);
    assert_eq!(v["n"], 1);
    let logs = String::from_utf8(r.logs).unwrap();
    assert_eq!(logs, "[Function] got ada {\"a\":1}\n[Function] ERROR bad\n");
    // Warm: same isolate, module state kept, logs per invocation.
    let r = call(&f, r#"{"name":"bob"}"#).await.unwrap();
    assert_eq!(json(&r)["n"], 2);
    assert!(!String::from_utf8(r.logs).unwrap().contains("ada"));
    assert!(f.inst.memory_usage().unwrap() > 0);
    f.inst.stop().await;
    assert!(!f.inst.is_alive());
}

async fn plain_values_non_json_payloads_and_timers() {
    let f = start(
        r#"export default async (req) => {
          await new Promise((r) => setTimeout(r, 20));
          if (req === "undef") return undefined;
          return typeof req === "string" ? "text:" + req : 42;
        };"#,
    )
    .await;
    let t = Instant::now();
    assert_eq!(call(&f, "{}").await.unwrap().body, b"42");
    assert!(t.elapsed() >= Duration::from_millis(19)); // Date.now() has ms granularity
    assert_eq!(call(&f, "hello").await.unwrap().body, br#""text:hello""#);
    assert_eq!(call(&f, r#""undef""#).await.unwrap().body, b"null");
}

/// Whatever the handler returns — a plain value, a settled or pending promise, a thenable —
/// is answered the same way, and so is what cannot be serialised or what rejects.
async fn every_kind_of_result_is_answered() {
    let f = start(
        r#"export default (req) => {
          switch (req.kind) {
            case "sync": return { n: 1 };
            case "undefined": return undefined;
            case "fn": return () => 1;
            case "later": return new Promise((r) => setTimeout(() => r({ n: 2 }), 5));
            case "thenable": return { then(ok) { ok({ n: 3 }); } };
            case "cycle": { const a = {}; a.self = a; return a; }
            case "later-cycle": return new Promise((r) => setTimeout(() => { const a = []; a.push(a); r(a); }, 5));
            case "bigint": return Promise.resolve(1n);
            case "throw": throw new SyntaxError("sync");
            case "reject": return Promise.reject(new RangeError("async"));
            case "reject-later": return new Promise((_, no) => setTimeout(() => no(new URIError("late")), 5));
          }
        };"#,
    )
    .await;
    let ok = |kind: &'static str, want: &'static str| {
        let f = &f;
        async move {
            let r = call(f, &format!(r#"{{"kind":"{kind}"}}"#)).await.unwrap();
            assert_eq!(
                r.error_type,
                None,
                "{kind}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(String::from_utf8_lossy(&r.body), want, "{kind}");
        }
    };
    ok("sync", r#"{"n":1}"#).await;
    ok("undefined", "null").await;
    ok("fn", "null").await;
    ok("later", r#"{"n":2}"#).await;
    ok("thenable", r#"{"n":3}"#).await;
    for (kind, ty, msg) in [
        ("cycle", "TypeError", "circular"),
        ("later-cycle", "TypeError", "circular"),
        ("bigint", "TypeError", "BigInt"),
        ("throw", "SyntaxError", "sync"),
        ("reject", "RangeError", "async"),
        ("reject-later", "URIError", "late"),
    ] {
        let r = call(&f, &format!(r#"{{"kind":"{kind}"}}"#)).await.unwrap();
        assert_eq!(r.error_type.as_deref(), Some(ty), "{kind}");
        let doc = json(&r);
        assert!(
            doc["errorMessage"].as_str().unwrap().contains(msg),
            "{kind}: {doc}"
        );
    }
    assert!(f.inst.is_alive());
}

async fn thrown_error_is_a_function_error_and_instance_survives() {
    let f = start(
        r#"export default async (req) => {
          if (req.fail) throw new TypeError("boom " + req.fail);
          return "ok";
        };"#,
    )
    .await;
    let r = call(&f, r#"{"fail":"x"}"#).await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("TypeError"));
    let v = json(&r);
    assert_eq!(v["errorMessage"], "boom x");
    assert!(v["stackTrace"].to_string().contains("index.js"), "{v}");
    assert_eq!(call(&f, "{}").await.unwrap().body, br#""ok""#);
}

async fn eval_function_import_require_are_unavailable() {
    let f = start(
        r#"const tries = {
          eval: () => eval("1+1"),
          indirectEval: () => (0, globalThis.eval)("1+1"),
          newFunction: () => new Function("return 1")(),
          fnCtor: () => (function () {}).constructor("return 1")(),
          asyncCtor: () => (async function () {}).constructor("return 1")(),
          require: () => require("fs"),
          process: () => process.env,
        };
        export default async () => {
          const out = {};
          for (const [k, f] of Object.entries(tries)) {
            try { f(); out[k] = "allowed"; } catch (e) { out[k] = e.name + ": " + e.message; }
          }
          try { await import("./other.js"); out.import = "allowed"; }
          catch (e) { out.import = e.name + ": " + e.message; }
          try { await import("./index.js"); out.selfImport = "allowed"; }
          catch (e) { out.selfImport = e.name + ": " + e.message; }
          return out;
        };"#,
    )
    .await;
    let v = json(&call(&f, "{}").await.unwrap());
    for k in [
        "eval",
        "indirectEval",
        "newFunction",
        "fnCtor",
        "asyncCtor",
        "require",
        "process",
        "import",
        "selfImport",
    ] {
        let s = v[k].as_str().unwrap();
        assert_ne!(s, "allowed", "{k} must throw: {v}");
    }
}

async fn infinite_loop_is_interrupted_on_stop() {
    let f = start("export default async () => { for (;;) {} };").await;
    let inst = f.inst.clone();
    let fut = tokio::spawn(async move { inst.invoke(req("{}", Duration::from_millis(200))).await });
    // The isolate interrupts itself past the deadline (+ grace) even without a stop.
    let r = tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .expect("interrupted")
        .unwrap();
    assert!(matches!(r, Err(SandboxError::Crashed { .. })), "{r:?}");
    let t = Instant::now();
    f.inst.stop().await;
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(!f.inst.is_alive());
}

async fn memory_hog_is_out_of_memory() {
    let f = start_with(
        r#"export default async () => { const a = []; for (;;) a.push("x".repeat(1 << 20) + a.length); };"#,
        "memory: 64Mi\n",
    )
    .await
    .unwrap();
    let r = call(&f, "{}").await;
    assert!(
        matches!(r, Err(SandboxError::OutOfMemory { limit_mb: 64, .. })),
        "{r:?}"
    );
    assert!(!f.inst.is_alive() || call(&f, "{}").await.is_err());
}

async fn bad_modules_fail_to_start_with_the_reason() {
    let e = start_with("export default async () => {", "")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("SyntaxError"), "{e}");
    let e = start_with("import x from './x.js'; export default x;", "")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("imports are not available"), "{e}");
    let e = start_with("export const x = 1;", "").await.err().unwrap();
    assert!(e.to_string().contains("export default"), "{e}");
    let e = start_with("throw new Error('init boom');", "")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("init boom"), "{e}");
}

async fn url_and_text_codecs() {
    let f = start(
        r#"export default async () => {
          const u = new URL("https://Example.com:443/a/./b/../c?x=1&y=two+words#frag");
          u.searchParams.append("z", "a&b");
          const bytes = new TextEncoder().encode("héllo €");
          return { host: u.host, path: u.pathname, y: u.searchParams.get("y"), href: u.href,
                   len: bytes.length, back: new TextDecoder().decode(bytes) };
        };"#,
    )
    .await;
    let v = json(&call(&f, "{}").await.unwrap());
    assert_eq!(v["host"], "example.com");
    assert_eq!(v["path"], "/a/c");
    assert_eq!(v["y"], "two words");
    assert_eq!(
        v["href"],
        "https://example.com/a/c?x=1&y=two+words&z=a%26b#frag"
    );
    assert_eq!(v["len"], 10);
    assert_eq!(v["back"], "héllo €");
}

#[test]
fn handler_paths_stay_inside_the_package() {
    let d = Path::new("/code");
    assert!(module_path(d, "index.js").is_ok());
    assert!(module_path(d, "./src/app.mjs").is_ok());
    for bad in ["../x.js", "/etc/x.js", "index.py", "", "a/../../b.js"] {
        assert!(module_path(d, bad).is_err(), "{bad}");
    }
}

/// Tier overhead without the gateway (inline calls from runtime workers):
/// `cargo test --release -p skiff-js -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_tier_overhead() {
    let src = "export default async (req) => ({ message: `Hello, ${req.name}!` });";
    let mut cold = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let f = start(src).await;
        call(&f, r#"{"name":"x"}"#).await.unwrap();
        cold.push(t.elapsed());
        f.inst.stop().await;
    }
    let f = start(src).await;
    // One task on a runtime worker makes every call, as a gateway connection task does.
    let inst = f.inst.clone();
    let mut warm = tokio::spawn(async move {
        let mut warm = Vec::new();
        for _ in 0..2000 {
            let r = req(r#"{"name":"x"}"#, Duration::from_secs(5));
            let t = Instant::now();
            inst.invoke(r).await.unwrap();
            warm.push(t.elapsed());
        }
        warm
    })
    .await
    .unwrap();
    cold.sort();
    warm.sort();
    println!(
        "js tier: cold p50 {:?}, warm p50 {:?} p99 {:?}, idle isolate {} KiB",
        cold[cold.len() / 2],
        warm[warm.len() / 2],
        warm[warm.len() * 99 / 100],
        f.inst.memory_usage().unwrap() / 1024
    );
}

async fn deep_recursion_is_a_function_error_not_a_crash() {
    let f = start(
        r#"const down = (n) => down(n + 1) + 1;
        export default async (req) => { if (req.deep) return down(0); return "ok"; };"#,
    )
    .await;
    let r = call(&f, r#"{"deep":true}"#).await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("RangeError"), "{:?}", r.body);
    let body = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(body.contains("stack"), "{body}");
    assert_eq!(call(&f, "{}").await.unwrap().body, br#""ok""#);
}

async fn unsettled_promise_is_reported() {
    let f = start("export default () => new Promise(() => {});").await;
    let r = call(&f, "{}").await;
    assert!(
        matches!(&r, Err(SandboxError::Crashed { message, .. }) if message.contains("never settled")),
        "{r:?}"
    );
}

async fn bytecode_is_compiled_once_per_revision() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.js"),
        "export default async () => 'v1';",
    )
    .unwrap();
    let sandbox = JsSandbox::new();
    let spec = |n: u32| instance_spec(dir.path(), n, "");
    let a = sandbox.start(spec(1)).await.unwrap();
    // A changed file is not read again: the revision's second instance loads the cached bytecode.
    std::fs::write(
        dir.path().join("index.js"),
        "export default async () => 'v2';",
    )
    .unwrap();
    let b = sandbox.start(spec(2)).await.unwrap();
    assert_eq!(sandbox.cache.lock().len(), 1);
    for inst in [&a, &b] {
        let r = inst
            .invoke(req("{}", Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(r.body, br#""v1""#);
    }
    assert_ne!(a.id(), b.id());
}

/// A one-shot-per-connection HTTP server on loopback answering every request with a JSON echo
/// of its request line, `x-in` header and body.
fn echo_server() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let (mut len, mut x_in) = (0usize, String::new());
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or(("", ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "x-in" => x_in = v.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let reply = serde_json::json!({
                "line": line.trim(), "x_in": x_in, "body": String::from_utf8_lossy(&body),
            })
            .to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-out: yes\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    addr
}

const FETCH_SRC: &str = r#"export default async (req) => {
  try {
    const r = await fetch(req.url, { method: "POST", headers: { "X-In": "hi" }, body: "payload" });
    return { status: r.status, ok: r.ok, out: r.headers.get("X-Out"), json: await r.json() };
  } catch (e) {
    return { error: `${e.name}: ${e.message}` };
  }
};"#;

/// An instance of `FETCH_SRC` (spec tail `extra`) whose `fetch` may reach local servers.
async fn fetcher(extra: &str) -> Fixture {
    start_in(
        JsSandbox::with_net(NetPolicy::allowing_private_for_tests()),
        FETCH_SRC,
        extra,
    )
    .await
    .unwrap()
}

async fn fetch_reaches_a_local_server_only_with_the_test_override() {
    let addr = echo_server();
    let payload = serde_json::json!({ "url": format!("http://{addr}/p?q=1") }).to_string();
    let f = fetcher("").await;
    let v = json(&call(&f, &payload).await.unwrap());
    assert_eq!(v["status"], 201, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["out"], "yes");
    assert_eq!(v["json"]["line"], "POST /p?q=1 HTTP/1.1");
    assert_eq!(v["json"]["x_in"], "hi");
    assert_eq!(v["json"]["body"], "payload");

    // The default policy refuses loopback (literal and `localhost`) and link-local.
    let f = start(FETCH_SRC).await;
    for url in [
        format!("http://{addr}/"),
        format!("http://localhost:{}/", addr.port()),
        "http://[::1]/".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let payload = serde_json::json!({ "url": url }).to_string();
        let v = json(&call(&f, &payload).await.unwrap());
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{url}: {v}"));
        assert!(
            e.starts_with("TypeError: fetch failed: refusing"),
            "{url}: {e}"
        );
    }
    // The gateway's own address is refused even with the override.
    let tier = JsSandbox::with_net(NetPolicy::allowing_private_for_tests());
    tier.net().set_gateway(addr);
    let f = start_in(tier, FETCH_SRC, "").await.unwrap();
    let payload = serde_json::json!({ "url": format!("http://{addr}/") }).to_string();
    let v = json(&call(&f, &payload).await.unwrap());
    assert!(v["error"].as_str().unwrap().contains("gateway"), "{v}");
}

async fn fetch_obeys_network_none_and_the_timeout() {
    let addr = echo_server();
    let payload = serde_json::json!({ "url": format!("http://{addr}/") }).to_string();
    let f = fetcher("network: none\n").await;
    let v = json(&call(&f, &payload).await.unwrap());
    assert_eq!(
        v["error"],
        "TypeError: fetch failed: fetch is not allowed: the function's network is `none`"
    );

    // A server that never answers: the fetch fails at the invocation's deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", silent.local_addr().unwrap());
    let f = fetcher("").await;
    let t = Instant::now();
    let payload = serde_json::json!({ "url": url }).to_string();
    let r = f
        .inst
        .invoke(req(&payload, Duration::from_millis(800)))
        .await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    match r {
        Ok(r) => assert!(
            json(&r)["error"].as_str().unwrap().contains("timed out"),
            "{:?}",
            r.body
        ),
        Err(e) => assert!(e.to_string().contains("interrupted"), "{e}"),
    }
    drop(silent);
}

fn req_as(id: &str, payload: &str, within: Duration) -> InvokeRequest {
    let mut r = req(payload, within);
    r.invoke.id = id.into();
    r
}

/// Runs `n` invocations of `f` at once; payload `{"i": k}`, request id `r<k>`.
async fn call_many(
    f: &Fixture,
    n: usize,
    within: Duration,
) -> Vec<Result<InvokeResult, SandboxError>> {
    let calls = (0..n).map(|k| {
        let inst = f.inst.clone();
        tokio::spawn(async move {
            inst.invoke(req_as(&format!("r{k}"), &format!(r#"{{"i":{k}}}"#), within))
                .await
        })
    });
    let mut out = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        out.push(c.await.unwrap());
    }
    out
}

const SLEEPER: &str = r#"let started = 0;
export default async (req, ctx) => {
  started += 1;
  console.log("start", req.i, ctx.awsRequestId);
  await new Promise((r) => setTimeout(r, req.ms ?? 300));
  console.log("after timer", req.i);
  await null;
  console.log("after microtask", req.i);
  return { i: req.i, id: ctx.awsRequestId, seen: started };
};"#;

async fn invocations_interleave_with_their_own_results_and_logs() {
    let f = start(SLEEPER).await;
    let t = Instant::now();
    let out = call_many(&f, 50, Duration::from_secs(5)).await;
    let took = t.elapsed();
    // 50 handlers each waiting 300 ms: serially 15 s, interleaved about 0.3 s.
    assert!(took < Duration::from_secs(3), "{took:?}");
    let mut max_seen = 0;
    for (k, r) in out.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.error_type, None);
        let v = json(&r);
        assert_eq!(v["i"], k);
        assert_eq!(v["id"], format!("r{k}"));
        max_seen = max_seen.max(v["seen"].as_u64().unwrap());
        let logs = String::from_utf8(r.logs).unwrap();
        assert_eq!(
            logs,
            format!(
                "[Function] start {k} r{k}\n[Function] after timer {k}\n[Function] after microtask {k}\n"
            ),
            "invocation {k}"
        );
    }
    // Module state is shared: later handlers saw the earlier ones start.
    assert_eq!(max_seen, 50);
    assert!(f.inst.is_alive());
}

async fn one_invocation_times_out_alone() {
    let f = start(SLEEPER).await;
    let slow = {
        let inst = f.inst.clone();
        tokio::spawn(async move {
            inst.invoke(req_as(
                "slow",
                r#"{"i":1,"ms":60000}"#,
                Duration::from_millis(400),
            ))
            .await
        })
    };
    let fast = call_many(&f, 5, Duration::from_secs(5)).await;
    let t = Instant::now();
    let slow = slow.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    match slow {
        Err(SandboxError::Crashed { message, log_tail }) => {
            assert!(message.contains("interrupted"), "{message}");
            assert_eq!(log_tail, "[Function] start 1 slow\n");
        }
        r => panic!("{r:?}"),
    }
    for r in fast {
        assert_eq!(r.unwrap().error_type, None);
    }
    // The isolate goes on serving.
    assert!(f.inst.is_alive());
    assert_eq!(json(&call(&f, r#"{"i":9,"ms":1}"#).await.unwrap())["i"], 9);
}

async fn timer_callback_errors_fail_only_their_invocation() {
    let f = start(
        r#"export default (req) => new Promise((resolve) => {
          setTimeout(() => { if (req.bad) throw new TypeError("tick " + req.i); resolve(req.i); }, 50);
        });"#,
    )
    .await;
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let inst = f.inst.clone();
            let p = format!(r#"{{"i":{i},"bad":{}}}"#, i % 2 == 1);
            tokio::spawn(async move { inst.invoke(req(&p, Duration::from_secs(5))).await })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let r = c.await.unwrap().unwrap();
        if i % 2 == 1 {
            assert_eq!(r.error_type.as_deref(), Some("TypeError"));
            assert_eq!(json(&r)["errorMessage"], format!("tick {i}"));
        } else {
            assert_eq!(r.error_type, None);
            assert_eq!(json(&r), i);
        }
    }
}

async fn a_runaway_loop_or_oom_fails_every_invocation_in_flight() {
    let f = start(
        r#"export default async (req) => {
          if (req.loop) for (;;) {}
          if (req.hog) { const a = []; for (;;) a.push("x".repeat(1 << 20) + a.length); }
          await new Promise((r) => setTimeout(r, 10000));
        };"#,
    )
    .await;
    let waiter = {
        let inst = f.inst.clone();
        tokio::spawn(async move { inst.invoke(req("{}", Duration::from_secs(20))).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = f
        .inst
        .invoke(req(r#"{"loop":true}"#, Duration::from_millis(300)))
        .await;
    assert!(matches!(r, Err(SandboxError::Crashed { .. })), "{r:?}");
    let w = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter is answered")
        .unwrap();
    assert!(matches!(w, Err(SandboxError::Crashed { .. })), "{w:?}");
    assert!(call(&f, "{}").await.is_err());

    let f = start_with(
        r#"export default async (req) => {
          if (req.hog) { const a = []; for (;;) a.push("x".repeat(1 << 20) + a.length); }
          await new Promise((r) => setTimeout(r, 10000));
        };"#,
        "memory: 64Mi\n",
    )
    .await
    .unwrap();
    let waiter = {
        let inst = f.inst.clone();
        tokio::spawn(async move { inst.invoke(req("{}", Duration::from_secs(20))).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = call(&f, r#"{"hog":true}"#).await;
    assert!(
        matches!(r, Err(SandboxError::OutOfMemory { limit_mb: 64, .. })),
        "{r:?}"
    );
    let w = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter is answered")
        .unwrap();
    assert!(matches!(w, Err(SandboxError::OutOfMemory { .. })), "{w:?}");
}

async fn stop_fails_pending_invocations_and_cleared_timers_never_fire() {
    let f = start(
        r#"let fired = 0;
        export default async (req) => {
          if (req.count) return fired;
          const t = setTimeout(() => { fired += 1; }, 20);
          if (req.clear) clearTimeout(t);
          await new Promise((r) => setTimeout(r, 60));
          return "ok";
        };"#,
    )
    .await;
    call(&f, r#"{"clear":true}"#).await.unwrap();
    assert_eq!(json(&call(&f, r#"{"count":true}"#).await.unwrap()), 0);
    call(&f, "{}").await.unwrap();
    assert_eq!(json(&call(&f, r#"{"count":true}"#).await.unwrap()), 1);
    // Two invocations waiting on their timers when the instance is stopped.
    let pending: Vec<_> = (0..2)
        .map(|_| {
            let inst = f.inst.clone();
            tokio::spawn(async move { inst.invoke(req("{}", Duration::from_secs(20))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    f.inst.stop().await;
    for p in pending {
        let r = p.await.unwrap();
        assert!(
            matches!(&r, Err(SandboxError::Crashed { message, .. }) if message.contains("interrupted")),
            "{r:?}"
        );
    }
    assert!(!f.inst.is_alive());
}

/// Many in-flight invocations per isolate, in process:
/// `cargo test --release -p skiff-js -- --ignored --nocapture many_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn many_in_flight() {
    let f = start_with(
        "export default async () => { await new Promise((r) => setTimeout(r, 1000)); return 1; };",
        "memory: 512Mi\n",
    )
    .await
    .unwrap();
    let idle = f.inst.memory_usage().unwrap();
    let t = Instant::now();
    let out = call_many(&f, 10_000, Duration::from_secs(20)).await;
    let took = t.elapsed();
    let errors = out.iter().filter(|r| r.is_err()).count();
    println!(
        "10000 in flight on one isolate: {took:?}, errors {errors}, heap idle {} KiB, peak {} KiB",
        idle / 1024,
        f.inst.memory_peak().unwrap() / 1024
    );
    assert_eq!(errors, 0);
}

/// Quick and slow answers, one at a time and concurrent, each come back with its own result;
/// a caller that gives up does not disturb the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_slow_concurrent_and_abandoned_invocations() {
    let f = start(
        r#"export default async (req) => {
          if (req.wait) await new Promise((r) => setTimeout(r, req.wait));
          return req.n;
        };"#,
    )
    .await;
    let one = |n: u32, wait: u32| {
        let inst = f.inst.clone();
        async move {
            let r = inst
                .invoke(req(
                    &format!(r#"{{"n":{n},"wait":{wait}}}"#),
                    Duration::from_secs(5),
                ))
                .await
                .unwrap();
            assert_eq!(json(&r), serde_json::json!(n));
        }
    };
    for n in 0..50 {
        one(n, 0).await;
    }
    one(50, 20).await;
    one(51, 0).await;
    for n in 52..60 {
        one(n, 0).await;
    }
    let mixed: Vec<_> = (60..100)
        .map(|n| tokio::spawn(one(n, if n % 3 == 0 { 10 } else { 0 })))
        .collect();
    for m in mixed {
        m.await.unwrap();
    }
    // Abandoned mid-wait.
    let inst = f.inst.clone();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(5),
        inst.invoke(req(r#"{"n":0,"wait":50}"#, Duration::from_secs(5))),
    )
    .await;
    assert!(abandoned.is_err());
    one(100, 0).await;
}

/// The heap of an idle isolate is measured shortly after it goes idle (not after every
/// invocation), so what it keeps shows in `memory_usage`.
async fn idle_heap_is_measured_once_idle() {
    let f = start(
        r#"const keep = [];
        export default async () => { keep.push(new Array(200000).fill(7)); return keep.length; };"#,
    )
    .await;
    let before = f.inst.memory_usage().unwrap();
    call(&f, "{}").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = f.inst.memory_usage().unwrap();
        if now > before + (1 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "heap still reported as {now} (before: {before})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts `source` as the concrete instance type (its counters are visible to tests).
async fn start_js(source: &str) -> (tempfile::TempDir, Arc<JsInstance>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.js"), source).unwrap();
    let inst = JsSandbox::new()
        .start_isolate(
            instance_spec(dir.path(), 1, "handler: index.js\n"),
            None,
            "default".into(),
        )
        .await
        .unwrap();
    (dir, inst)
}

fn inline_runs(inst: &JsInstance) -> u64 {
    inst.setup.shared.inline_runs.load(Ordering::Relaxed)
}

/// On runtime workers, a free isolate runs the invocation on the caller's thread, also when
/// it then awaits a timer (the isolate's thread finishes it); a current-thread runtime always
/// queues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_isolate_runs_the_invocation_on_the_callers_thread() {
    let (_dir, inst) = start_js(
        r#"let n = 0;
        export default async (req) => {
          n += 1;
          if (req.wait) await new Promise((r) => setTimeout(r, req.wait));
          return n;
        };"#,
    )
    .await;
    for i in 1..=20u64 {
        let inst = inst.clone();
        let r = tokio::spawn(async move { inst.invoke(req("{}", Duration::from_secs(5))).await })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(json(&r), i);
    }
    // (A call may meet the isolate's thread measuring the heap, and queue.)
    assert!(
        inline_runs(&inst) >= 18,
        "{} of 20 inline",
        inline_runs(&inst)
    );
    let r = inst
        .invoke(req(r#"{"wait":30}"#, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(json(&r), 21);

    let queued = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let (_dir, inst) = start_js("export default async () => 1;").await;
                for _ in 0..5 {
                    inst.invoke(req("{}", Duration::from_secs(5)))
                        .await
                        .unwrap();
                }
                inline_runs(&inst)
            })
    })
    .join()
    .unwrap();
    assert_eq!(queued, 0);
}

/// A handler busy for longer than the inline budget must not stall the runtime worker it
/// runs on: with a single worker, a ticker task keeps ticking while the handler runs.
#[test]
fn a_long_inline_handler_hands_its_worker_off() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (_dir, inst) = start_js(
            r#"export default async () => {
              const end = Date.now() + 600; let spins = 0;
              while (Date.now() < end) spins++;
              return spins > 0;
            };"#,
        )
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut last = Instant::now();
                let mut worst = Duration::ZERO;
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                }
                worst
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let call = {
            let inst = inst.clone();
            tokio::spawn(async move { inst.invoke(req("{}", Duration::from_secs(5))).await })
        };
        let r = call.await.unwrap().unwrap();
        stop.store(true, Ordering::SeqCst);
        let worst = ticker.await.unwrap();
        assert_eq!(json(&r), true);
        assert_eq!(inline_runs(&inst), 1);
        assert!(
            worst < Duration::from_millis(200),
            "the ticker stalled for {worst:?} while the handler ran"
        );
    });
}

/// Inline, a runaway handler is interrupted at its deadline, and the caller's own timeout
/// (the scheduler's) reports it, as it does for a queued invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_runaway_ends_at_its_deadline_as_the_callers_timeout() {
    let (_dir, inst) = start_js("export default async () => { for (;;) {} };").await;
    let within = Duration::from_millis(300);
    let t = Instant::now();
    let r = {
        let inst = inst.clone();
        tokio::spawn(
            async move { tokio::time::timeout(within, inst.invoke(req("{}", within))).await },
        )
        .await
        .unwrap()
    };
    let took = t.elapsed();
    assert!(r.is_err(), "the caller's timeout answers: {r:?}");
    assert!(
        took < within + DEADLINE_GRACE / 2,
        "interrupted after {took:?}"
    );
    assert_eq!(inline_runs(&inst), 1);
    assert!(!inst.is_alive());
    // Without a timeout of its own, the caller gets the interruption.
    let (_dir, inst) = start_js("export default async () => { for (;;) {} };").await;
    let r = inst.invoke(req("{}", within)).await;
    assert!(
        matches!(&r, Err(SandboxError::Crashed { message, .. }) if message.contains("interrupted")),
        "{r:?}"
    );
}
