//! The `js` edge tier: ES modules in QuickJS isolates, through every layer of the real server.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// A function directory with this `function.yaml` tail and `index.js`.
fn js_function(name: &str, yaml: &str, source: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("name: {name}\nruntime: js\nhandler: index.js\n{yaml}");
    std::fs::write(dir.path().join("function.yaml"), spec).unwrap();
    std::fs::write(dir.path().join("index.js"), source).unwrap();
    dir
}

fn deploy(s: &Server, dir: &Path) {
    s.deploy(dir);
}

/// Held by the CPU-heavy many-invocation test and by the test whose 1 s timeout races a
/// memory hog, so on a small CI box the first cannot push the second past its timeout.
static CPU_HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cpu_heavy() -> std::sync::MutexGuard<'static, ()> {
    CPU_HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn js_example_v1_and_http_trigger_warm_reuse_logs_env() {
    let s = Server::start();
    deploy(&s, &example("js-hello"));
    let (v1, h1) = s.invoke_ok("js-hello", &json!({"name": "Skiff"}));
    assert_eq!(v1, json!({"message": "Hello, Skiff!", "calls": 1}));
    assert_eq!(hdr(&h1, "x-skiff-cold-start"), "true");
    let (v2, h2) = s.invoke_ok("js-hello", &json!({"name": "again"}));
    assert_eq!(v2["calls"], 2, "module state survives: same isolate");
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "false");
    assert_eq!(hdr(&h1, "x-skiff-instance"), hdr(&h2, "x-skiff-instance"));

    // The idle isolate's memory (QuickJS heap) is reported, and small.
    let rt: Value = s.get("/v1/functions/js-hello/runtime").json().unwrap();
    let mem = rt["instances"][0]["memory_bytes"].as_u64().unwrap_or(0);
    assert!(mem > 0 && mem < 2 << 20, "{rt}");

    // HTTP trigger: API Gateway v2 event in, reply object mapped to the HTTP response.
    let r = s
        .http
        .post(format!("{}/fn/js-hello/greet/x?name=edge", s.url))
        .body("ignored")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "content-type"), "text/plain");
    assert_eq!(hdr(r.headers(), "x-calls"), "3");
    assert_eq!(r.text().unwrap(), "Hello, edge! (POST /greet/x)");

    // console output is in the function's logs, with the [Function] prefix.
    let logs: Value = s.get("/v1/functions/js-hello/logs").json().unwrap();
    let text = logs.to_string();
    assert!(
        text.contains("[Function] invoked with name=Skiff"),
        "{text}"
    );
    assert!(
        text.contains("[Function] POST /greet/x name=edge"),
        "{text}"
    );
    assert!(s.healthy());
}

#[test]
fn js_errors_timeouts_and_memory_are_contained() {
    let _heavy = cpu_heavy();
    let s = Server::start();
    let src = r#"export default async (req) => {
      if (req.op === "throw") throw new RangeError("bad op: " + req.op);
      if (req.op === "loop") for (;;) {}
      if (req.op === "hog") { const a = []; for (;;) a.push("x".repeat(1 << 20) + a.length); }
      return { ok: true, secret: env.TOKEN };
    };"#;
    let dir = js_function(
        "js-limits",
        "timeout: 1s\nmemory: 64Mi\nenv: {TOKEN: t0k}\n",
        src,
    );
    deploy(&s, dir.path());
    let (v, _) = s.invoke_ok("js-limits", &json!({}));
    assert_eq!(v, json!({"ok": true, "secret": "t0k"}));

    // A thrown error: 500 function_error with the message; the isolate survives.
    let r = s.invoke("js-limits", &json!({"op": "throw"}));
    assert_eq!(hdr(r.headers(), "x-skiff-function-error"), "RangeError");
    let (st, e) = error_of(r);
    assert_eq!(st, 500, "{e}");
    assert_eq!(e["code"], "function_error");
    assert_eq!(e["type"], "RangeError");
    assert!(
        e["message"].as_str().unwrap().contains("bad op: throw"),
        "{e}"
    );
    let (_, h) = s.invoke_ok("js-limits", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");

    // An infinite loop: 504 after the timeout, the instance is dropped, the server is fine.
    let t0 = Instant::now();
    let (st, e) = error_of(s.invoke("js-limits", &json!({"op": "loop"})));
    assert_eq!(st, 504, "{e}");
    assert_eq!(e["message"], "Task timed out after 1.00 seconds");
    assert!(
        t0.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
    assert!(s.healthy());
    let (_, h) = s.invoke_ok("js-limits", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");

    // A memory hog: 502 out_of_memory naming the limit, then a fresh isolate works.
    let (st, e) = error_of(s.invoke("js-limits", &json!({"op": "hog"})));
    assert_eq!(st, 502, "{e}");
    assert_eq!(e["code"], "out_of_memory", "{e}");
    assert!(e["message"].as_str().unwrap().contains("64 MiB"), "{e}");
    assert!(s.healthy());
    let (v, h) = s.invoke_ok("js-limits", &json!({}));
    assert_eq!(v["ok"], true);
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
}

#[test]
fn js_has_no_eval_function_import_or_require() {
    let s = Server::start();
    let src = r#"const tries = {
      eval: () => eval("1+1"),
      newFunction: () => new Function("return 1")(),
      ctor: () => (() => {}).constructor("return 1")(),
      require: () => require("fs"),
      process: () => process.exit(1),
    };
    export default async () => {
      const out = {};
      for (const [k, f] of Object.entries(tries)) {
        try { f(); out[k] = "allowed"; } catch (e) { out[k] = e.name; }
      }
      try { await import("./index.js"); out.import = "allowed"; } catch (e) { out.import = e.name; }
      out.globals = ["setTimeout", "URL", "URLSearchParams", "TextEncoder", "TextDecoder", "JSON"]
        .filter((g) => typeof globalThis[g] === "undefined");
      out.uuid = /^[0-9a-f-]{36}$/.test(crypto.randomUUID());
      return out;
    };"#;
    let dir = js_function("js-deny", "", src);
    deploy(&s, dir.path());
    let (v, _) = s.invoke_ok("js-deny", &json!({}));
    for k in [
        "eval",
        "newFunction",
        "ctor",
        "require",
        "process",
        "import",
    ] {
        assert!(
            v[k].as_str().is_some_and(|e| e != "allowed"),
            "{k} must throw: {v}"
        );
    }
    assert_eq!(v["require"], "ReferenceError");
    assert_eq!(v["globals"], json!([]), "{v}");
    assert_eq!(v["uuid"], true);
}

#[test]
fn js_spec_limits_are_validated() {
    let s = Server::start();
    let dir = js_function("js-big", "memory: 1Gi\n", "export default async () => 1;");
    let out = s.cli(&["deploy", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("memory"), "{err}");
}

/// `fetch` from the handler; answers `{status}` or `{error}`.
const FETCH_SRC: &str = r#"export default async (req) => {
  try {
    const r = await fetch(req.url);
    return { status: r.status, body: await r.text() };
  } catch (e) {
    return { error: `${e.name}: ${e.message}` };
  }
};"#;

#[test]
fn js_fetch_obeys_network_none_and_refuses_loopback() {
    let s = Server::start();
    let none = js_function("js-fetch-none", "network: none\n", FETCH_SRC);
    deploy(&s, none.path());
    let open = js_function("js-fetch-out", "network: outbound\n", FETCH_SRC);
    deploy(&s, open.path());

    let (v, _) = s.invoke_ok("js-fetch-none", &json!({"url": "http://example.com/"}));
    assert_eq!(
        v["error"],
        "TypeError: fetch failed: fetch is not allowed: the function's network is `none`",
        "{v}"
    );

    // Outbound, but never the host's loopback: not the gateway, not another local port,
    // not by name, not the metadata address.
    let port = s.url.rsplit(':').next().unwrap().to_string();
    for url in [
        format!("{}/health", s.url),
        format!("http://localhost:{port}/health"),
        "http://127.0.0.1:9/".to_string(),
        "http://[::1]/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let (v, _) = s.invoke_ok("js-fetch-out", &json!({"url": url}));
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{url}: {v}"));
        assert!(
            e.starts_with("TypeError: fetch failed: refusing"),
            "{url}: {e}"
        );
    }

    // Ad-hoc /execute code has no network.
    let r = s.post(
        "/execute",
        serde_json::to_vec(&json!({"code": FETCH_SRC, "request": {"url": "http://example.com/"}}))
            .unwrap(),
    );
    let v: Value = r.json().unwrap();
    assert_eq!(v["success"], true, "{v}");
    let body: Value = serde_json::from_str(v["result"]["body"].as_str().unwrap()).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("network is `none`"),
        "{body}"
    );
    assert!(s.healthy());
}

/// Raises this process's soft open-file limit to the hard one (many sockets at once).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Awaits a timer, logs before and after it, and answers who it was.
const SLEEPER_SRC: &str = r#"let started = 0;
export default async (req, ctx) => {
  started += 1;
  console.log(`start i=${req.i} id=${ctx.awsRequestId}`);
  await new Promise((r) => setTimeout(r, req.ms));
  console.log(`done i=${req.i} id=${ctx.awsRequestId}`);
  return { i: req.i, id: ctx.awsRequestId, started };
};"#;

#[test]
fn js_isolate_interleaves_many_invocations_with_own_results_and_logs() {
    use base64::Engine as _;
    let s = Server::start();
    let dir = js_function(
        "js-sleep",
        "concurrency: 100\nscale: {max: 1}\ntimeout: 10s\n",
        SLEEPER_SRC,
    );
    deploy(&s, dir.path());
    s.invoke_ok("js-sleep", &json!({"i": -1, "ms": 1})); // cold start out of the way
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let out: Vec<(usize, u16, reqwest::header::HeaderMap, String)> = tokio_rt().block_on(async {
        let calls = (0..50usize).map(|i| {
            let http = http.clone();
            // Half through the native invoke API (instance header), half through the Lambda
            // Invoke API with the invocation's own log tail.
            let url = if i % 2 == 0 {
                format!("{}/v1/functions/js-sleep/invoke", s.url)
            } else {
                format!("{}/2015-03-31/functions/js-sleep/invocations", s.url)
            };
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .header("x-amz-log-type", "Tail")
                    .body(json!({"i": i, "ms": 500}).to_string())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                (i, status, headers, r.text().await.unwrap())
            })
        });
        let mut out = Vec::new();
        for c in calls.collect::<Vec<_>>() {
            out.push(c.await.unwrap());
        }
        out
    });
    let took = t0.elapsed();
    // Serially this is 50 × 0.5 s = 25 s; interleaved on one isolate about 0.5 s.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mut instances = std::collections::BTreeSet::new();
    let mut max_started = 0;
    for (i, status, h, body) in out {
        assert_eq!(status, 200, "call {i}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["i"], i, "{v}");
        max_started = max_started.max(v["started"].as_u64().unwrap());
        if i % 2 == 0 {
            instances.insert(hdr(&h, "x-skiff-instance"));
            assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");
        } else {
            let id = hdr(&h, "x-amzn-requestid");
            assert_eq!(v["id"], id.as_str());
            let tail = base64::engine::general_purpose::STANDARD
                .decode(hdr(&h, "x-amz-log-result"))
                .unwrap();
            let tail = String::from_utf8(tail).unwrap();
            let mine: Vec<&str> = tail
                .lines()
                .filter(|l| l.starts_with("[Function]"))
                .collect();
            assert_eq!(
                mine,
                [
                    format!("[Function] start i={i} id={id}"),
                    format!("[Function] done i={i} id={id}")
                ],
                "call {i}: {tail}"
            );
        }
    }
    assert_eq!(instances.len(), 1, "{instances:?}");
    // Module state is shared by the interleaved invocations: 50 (+ the warm-up) started.
    assert_eq!(max_started, 51);
    let rt: Value = s.get("/v1/functions/js-sleep/runtime").json().unwrap();
    assert_eq!(rt["instances"].as_array().map(Vec::len), Some(1), "{rt}");
    assert!(s.healthy());
}

#[test]
fn js_one_instance_holds_1000_in_flight_invocations() {
    let _heavy = cpu_heavy();
    let n = 1000;
    assert!(raise_nofile() > n as u64 + 100, "open-file limit too low");
    let s = Server::start();
    let dir = js_function(
        "js-wait",
        "concurrency: 10000\nscale: {max: 1}\nmemory: 256Mi\ntimeout: 20s\n",
        "export default async (req) => { await new Promise((r) => setTimeout(r, 1000)); return req.i; };",
    );
    deploy(&s, dir.path());
    s.invoke_ok("js-wait", &json!({"i": -1}));
    let url = format!("{}/v1/functions/js-wait/invoke", s.url);
    let t0 = Instant::now();
    let (errors, instances) = tokio_rt().block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let http = http.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let r = http
                        .post(url)
                        .body(json!({ "i": i }).to_string())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let inst = hdr(r.headers(), "x-skiff-instance");
                    let status = r.status();
                    let body = r.text().await.map_err(|e| e.to_string())?;
                    if status != 200 || body != i.to_string() {
                        return Err(format!("call {i}: {status} {body}"));
                    }
                    Ok(inst)
                })
            })
            .collect();
        let mut errors = Vec::new();
        let mut instances = std::collections::BTreeSet::new();
        for c in calls {
            match c.await.unwrap() {
                Ok(inst) => {
                    instances.insert(inst);
                }
                Err(e) => errors.push(e),
            }
        }
        (errors, instances)
    });
    let took = t0.elapsed();
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..1]
    );
    assert_eq!(instances.len(), 1, "{instances:?}");
    // 1000 one-second waits in flight at once: about a second, not 1000.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(s.healthy());
}
