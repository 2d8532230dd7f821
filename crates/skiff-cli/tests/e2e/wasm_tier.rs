//! The `wasm` tier: WASI command modules in Wasmtime, through every layer of the real server.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[test]
fn wasm_example_v1_http_trigger_warm_path_and_logs() {
    let s = Server::start();
    s.deploy(&example("wasm-hello"));
    let (v1, h1) = s.invoke_ok("wasm-hello", &json!({"name": "Skiff"}));
    assert_eq!(
        v1,
        json!({"message": "Hello from Wasm!", "event": {"name": "Skiff"}})
    );
    assert_eq!(hdr(&h1, "x-skiff-cold-start"), "true");
    let (v2, h2) = s.invoke_ok("wasm-hello", &json!([1, 2]));
    assert_eq!(v2["event"], json!([1, 2]));
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "false");
    assert_eq!(hdr(&h1, "x-skiff-instance"), hdr(&h2, "x-skiff-instance"));

    // HTTP trigger: the API Gateway v2 event on stdin; the guest's JSON is the 200 body.
    let r = s
        .http
        .post(format!("{}/fn/wasm-hello/greet/x?name=edge", s.url))
        .body("payload")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "content-type"), "application/json");
    let v: Value = r.json().unwrap();
    assert_eq!(v["message"], "Hello from Wasm!");
    assert_eq!(v["event"]["rawPath"], "/greet/x", "{v}");
    assert_eq!(
        v["event"]["requestContext"]["http"]["method"], "POST",
        "{v}"
    );
    assert_eq!(v["event"]["queryStringParameters"]["name"], "edge", "{v}");

    // Warm path through the gateway.
    let mut times = Vec::new();
    for i in 0..100 {
        let t0 = Instant::now();
        let (v, _) = s.invoke_ok("wasm-hello", &json!({ "i": i }));
        times.push(t0.elapsed());
        assert_eq!(v["event"]["i"], i);
    }
    times.sort();
    let p50 = times[times.len() / 2];
    eprintln!("wasm warm p50 via /v1: {p50:?} (p90 {:?})", times[90]);
    assert!(p50 < Duration::from_millis(100), "{p50:?}");

    // stderr is in the function's logs.
    let logs: Value = s.get("/v1/functions/wasm-hello/logs").json().unwrap();
    assert!(logs.to_string().contains("wasm-hello: invoked"), "{logs}");
    assert!(s.healthy());
}

/// A guest switching on the event's second byte: `"loop"`, `"trap"`, `"hog"`, `"env"`;
/// anything else replies `{"ok":true}`.
const LIMITS_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"ok\":true}")
  (data (i32.const 96) "trapping now\n")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (local $op i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $op (i32.load8_u (i32.const 1025)))
    (if (i32.eq (local.get $op) (i32.const 108)) ;; l
      (then (loop $l (br $l))))
    (if (i32.eq (local.get $op) (i32.const 116)) ;; t
      (then (call $write (i32.const 2) (i32.const 96) (i32.const 13)) unreachable))
    (if (i32.eq (local.get $op) (i32.const 104)) ;; h
      (then (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
            unreachable))
    (if (i32.eq (local.get $op) (i32.const 101)) ;; e: the environment block
      (then
        (drop (call $sizes (i32.const 16) (i32.const 20)))
        (drop (call $get (i32.const 4096) (i32.const 8192)))
        (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 20)))
        return))
    (call $write (i32.const 1) (i32.const 64) (i32.const 11))))
"#;

#[test]
fn wasm_errors_timeouts_and_memory_are_contained() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("function.yaml"),
        "name: wasm-limits\nruntime: wasm\nhandler: guest.wat\ntimeout: 1s\nmemory: 64Mi\n\
         env: {TOKEN: t0k}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("guest.wat"), LIMITS_WAT).unwrap();
    s.deploy(dir.path());
    let (v, _) = s.invoke_ok("wasm-limits", &json!({}));
    assert_eq!(v, json!({"ok": true}));

    // Env (and secrets) arrive through WASI env.
    let (v, _) = s.invoke_ok("wasm-limits", &json!("env"));
    let env = v.as_str().unwrap_or_default().to_string();
    assert!(env.split('\0').any(|kv| kv == "TOKEN=t0k"), "{v}");

    // A trap: a function error carrying the trap message; the instance keeps serving.
    let r = s.invoke("wasm-limits", &json!("trap"));
    assert_eq!(hdr(r.headers(), "x-skiff-function-error"), "Runtime.Trap");
    let (st, e) = error_of(r);
    assert_eq!(st, 500, "{e}");
    assert_eq!(e["code"], "function_error");
    assert!(
        e["message"].as_str().unwrap().contains("unreachable"),
        "{e}"
    );
    let (_, h) = s.invoke_ok("wasm-limits", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");

    // An infinite loop: 504 after the timeout, the server stays healthy.
    let t0 = Instant::now();
    let (st, e) = error_of(s.invoke("wasm-limits", &json!("loop")));
    assert_eq!(st, 504, "{e}");
    assert_eq!(e["message"], "Task timed out after 1.00 seconds");
    assert!(
        t0.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
    assert!(s.healthy());
    let (v, _) = s.invoke_ok("wasm-limits", &json!({}));
    assert_eq!(v["ok"], true);

    // Growing memory until refused: 502 out_of_memory naming the limit, then it works again.
    let (st, e) = error_of(s.invoke("wasm-limits", &json!("hog")));
    assert_eq!(st, 502, "{e}");
    assert_eq!(e["code"], "out_of_memory", "{e}");
    assert!(e["message"].as_str().unwrap().contains("64 MiB"), "{e}");
    assert!(s.healthy());
    let (v, _) = s.invoke_ok("wasm-limits", &json!({}));
    assert_eq!(v["ok"], true);
}
