use super::*;
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::FunctionSpec;

const WASI: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"#;

const WRITE: &str = r#"
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
"#;

/// A guest: the WASI imports and `$write` helper above around `body` (more imports,
/// memory, data, `_start`).
fn guest(body: &str) -> String {
    format!("(module {WASI} {body} {WRITE})")
}

fn hello() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/wasm-hello/hello.wat"),
    )
    .unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    inst: Arc<dyn Instance>,
}

async fn start_with(
    sandbox: &WasmSandbox,
    file: &str,
    code: &[u8],
    extra: &str,
) -> Result<Fixture, SandboxError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), code).unwrap();
    let spec =
        FunctionSpec::from_yaml(&format!("name: t\nruntime: wasm\nhandler: {file}\n{extra}"))
            .unwrap();
    let inst = sandbox
        .start(InstanceSpec {
            instance_id: "t-1".into(),
            function: "t".into(),
            revision: 1,
            spec,
            code_dir: dir.path().to_path_buf(),
            env: vec![("GREETING".into(), "hi".into())],
            exec_mode: ExecMode::Command,
            argv: vec![],
            rootfs: None,
            workspace: None,
        })
        .await?;
    Ok(Fixture { _dir: dir, inst })
}

async fn start(wat: &str) -> Fixture {
    start_with(&WasmSandbox::default(), "main.wat", wat.as_bytes(), "")
        .await
        .unwrap()
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
    f.inst.invoke(req(payload, Duration::from_secs(5))).await
}

fn json(r: &InvokeResult) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn hello_echoes_stdin_logs_stderr_and_isolates_requests() {
    let f = start(&hello()).await;
    let r = call(&f, r#"{"name":"ada"}"#).await.unwrap();
    assert_eq!(r.error_type, None);
    let v = json(&r);
    assert_eq!(v["message"], "Hello from Wasm!");
    assert_eq!(v["event"]["name"], "ada");
    assert_eq!(String::from_utf8_lossy(&r.logs), "wasm-hello: invoked\n");
    // A fresh store per request: nothing of the first event is left in the second reply.
    let r = call(&f, "7").await.unwrap();
    assert_eq!(json(&r)["event"], 7);
    assert_eq!(String::from_utf8_lossy(&r.body).matches("ada").count(), 0);
    assert!(f.inst.memory_peak().unwrap() >= 2 << 16);
}

#[tokio::test]
async fn binary_modules_and_env_work() {
    // environ_sizes_get + environ_get, then the NUL-separated block goes to stdout.
    let wat = guest(
        r#"
      (import "wasi_snapshot_preview1" "environ_sizes_get"
        (func $sizes (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (drop (call $sizes (i32.const 16) (i32.const 20)))
        (drop (call $get (i32.const 1024) (i32.const 4096)))
        (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 20))))"#,
    );
    let bin = wat::parse_str(&wat).unwrap();
    let f = start_with(&WasmSandbox::default(), "env.wasm", &bin, "")
        .await
        .unwrap();
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type, None);
    assert_eq!(String::from_utf8_lossy(&r.body), "GREETING=hi\0");
}

/// A component exporting `wasi:cli/run` whose `run` executes `body` (an `i32`: 0 = ok).
fn component(body: &str) -> String {
    format!(
        r#"(component
          (core module $m (func (export "run") (result i32) {body}))
          (core instance $i (instantiate $m))
          (func $run (result (result)) (canon lift (core func $i "run")))
          (instance $cli (export "run" (func $run)))
          (export "wasi:cli/run@0.2.0" (instance $cli)))"#
    )
}

#[tokio::test]
async fn components_run_wasi_cli_run() {
    let f = start(&component("(i32.const 0)")).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type, None, "{}", String::from_utf8_lossy(&r.body));

    let f = start(&component("(i32.const 1)")).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("Runtime.ExitError"));
    assert_eq!(
        json(&r)["errorMessage"],
        "Command exited with non-zero status: 1"
    );

    let f = start(&component("unreachable")).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("Runtime.Trap"));
    assert!(json(&r)["errorMessage"]
        .as_str()
        .unwrap()
        .contains("unreachable"));

    let f = start(&component("(loop $l (br $l)) (i32.const 0)")).await;
    let e = f
        .inst
        .invoke(req("", Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
}

#[tokio::test]
async fn exit_codes_follow_the_command_contract() {
    let wat = guest(
        r#"(memory (export "memory") 1)
      (data (i32.const 64) "partial")
      (func (export "_start")
        (call $write (i32.const 1) (i32.const 64) (i32.const 7))
        (call $proc_exit (i32.const 3)))"#,
    );
    let f = start(&wat).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("Runtime.ExitError"));
    let v = json(&r);
    assert_eq!(v["errorMessage"], "Command exited with non-zero status: 3");
    // The failed guest's stdout is kept as logs, not returned as a reply.
    assert_eq!(String::from_utf8_lossy(&r.logs), "partial");

    let ok = guest(
        r#"(memory (export "memory") 1)
      (func (export "_start") (call $proc_exit (i32.const 0)))"#,
    );
    let f = start(&ok).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type, None);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn trap_is_a_function_error_with_the_trap_message() {
    let wat = guest(
        r#"(memory (export "memory") 1)
      (data (i32.const 64) "about to fail\n")
      (func $boom unreachable)
      (func (export "_start")
        (call $write (i32.const 2) (i32.const 64) (i32.const 14))
        (call $boom))"#,
    );
    let f = start(&wat).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type.as_deref(), Some("Runtime.Trap"));
    let v = json(&r);
    let msg = v["errorMessage"].as_str().unwrap();
    assert!(msg.contains("unreachable"), "{v}");
    let stack = v["stackTrace"].to_string();
    assert!(stack.contains("about to fail"), "{v}");
    assert!(String::from_utf8_lossy(&r.logs).contains("about to fail"));
    // The instance keeps serving (each request has its own store).
    assert!(f.inst.is_alive());
    assert!(call(&f, "").await.unwrap().error_type.is_some());
}

#[tokio::test]
async fn infinite_loop_is_interrupted_at_the_deadline_and_by_stop() {
    let wat = guest(
        r#"(memory (export "memory") 1)
      (func (export "_start") (loop $l (br $l)))"#,
    );
    let f = start(&wat).await;
    let t0 = Instant::now();
    let e = f
        .inst
        .invoke(req("", Duration::from_secs(1)))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(e, SandboxError::Crashed { .. }), "{e}");
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{took:?}"
    );

    // Stopping the instance interrupts a running guest at once.
    let inst = f.inst.clone();
    let running = tokio::spawn(async move { inst.invoke(req("", Duration::from_secs(30))).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    f.inst.stop().await;
    let e = running.await.unwrap().unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(500), "{e}");
    assert!(!f.inst.is_alive());
    assert!(matches!(call(&f, "").await, Err(SandboxError::Gone)));
}

#[tokio::test]
async fn memory_growth_past_the_limit_is_out_of_memory() {
    // 64 MiB limit; growing by 2000 pages (125 MiB) fails, and the guest traps on failure.
    let wat = guest(
        r#"(memory (export "memory") 1)
      (func (export "_start")
        (if (i32.eq (memory.grow (i32.const 2000)) (i32.const -1)) (then unreachable)))"#,
    );
    let sandbox = WasmSandbox::default();
    let f = start_with(&sandbox, "mem.wat", wat.as_bytes(), "memory: 64Mi\n")
        .await
        .unwrap();
    let e = call(&f, "").await.unwrap_err();
    assert!(
        matches!(e, SandboxError::OutOfMemory { limit_mb: 64, .. }),
        "{e}"
    );
    // Initial memory over the limit: the store refuses it at instantiation.
    let big = guest(r#"(memory (export "memory") 2000) (func (export "_start"))"#);
    let f = start_with(&sandbox, "big.wat", big.as_bytes(), "memory: 64Mi\n")
        .await
        .unwrap();
    let e = call(&f, "").await.unwrap_err();
    assert!(
        matches!(e, SandboxError::OutOfMemory { limit_mb: 64, .. }),
        "{e}"
    );
    // Within the limit the same growth works.
    let f = start_with(&sandbox, "mem.wat", wat.as_bytes(), "memory: 256Mi\n")
        .await
        .unwrap();
    let r = call(&f, "").await.unwrap();
    assert_eq!(r.error_type, None);
    assert!(f.inst.memory_peak().unwrap() >= 2001 << 16);
}

#[tokio::test]
async fn host_files_are_not_reachable() {
    // No preopens: fd 3 is not a directory, so opening `/etc/passwd` (or anything) fails.
    let wat = guest(
        r#"(import "wasi_snapshot_preview1" "fd_prestat_get"
        (func $prestat (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "path_open"
        (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "/etc/passwd")
      (data (i32.const 96) "opened")
      (data (i32.const 112) "denied")
      (func (export "_start")
        (if (i32.eqz (call $prestat (i32.const 3) (i32.const 200)))
          (then (call $write (i32.const 1) (i32.const 96) (i32.const 6)) (return)))
        (if (i32.eqz (call $open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 11)
                         (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 300)))
          (then (call $write (i32.const 1) (i32.const 96) (i32.const 6)))
          (else (call $write (i32.const 1) (i32.const 112) (i32.const 6)))))"#,
    );
    let f = start(&wat).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.body), "denied");
}

#[tokio::test]
async fn bad_guests_fail_to_start_with_a_clear_message() {
    let sandbox = WasmSandbox::default();
    let cases: [(&str, &[u8], &str); 4] = [
        ("a.wat", b"(module", "not valid WebAssembly text"),
        (
            "a.wat",
            b"(module (func (export \"main\")))",
            "must export `_start`",
        ),
        (
            "a.wat",
            b"(module (import \"env\" \"nope\" (func)) (func (export \"_start\")))",
            "cannot be linked",
        ),
        (
            "a.wasm",
            b"\0asm\x0d\0\x01\0",
            "or `wasi:cli/run` (a WASI command); it exports: nothing",
        ),
    ];
    for (file, code, want) in cases {
        let e = match start_with(&sandbox, file, code, "").await {
            Ok(_) => panic!("{file} started"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[tokio::test]
async fn compiled_once_per_revision_and_fast_per_request() {
    let sandbox = WasmSandbox::default();
    let f = start_with(&sandbox, "hello.wat", hello().as_bytes(), "")
        .await
        .unwrap();
    let g = start_with(&sandbox, "hello.wat", hello().as_bytes(), "")
        .await
        .unwrap();
    assert_eq!(sandbox.cache.lock().len(), 2, "keyed by code dir too");
    let _ = call(&f, "1").await.unwrap();
    let mut times = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        let r = call(&g, r#"{"k":1}"#).await.unwrap();
        times.push(t0.elapsed());
        assert_eq!(r.error_type, None);
    }
    times.sort();
    let p50 = times[times.len() / 2];
    eprintln!("wasm instantiate+run p50: {p50:?}, p99: {:?}", times[198]);
    assert!(p50 < Duration::from_millis(20), "{p50:?}");
}

#[tokio::test]
async fn oversized_replies_are_refused() {
    // 7 MiB of zeros on stdout: over the 6 MiB payload limit.
    let wat = guest(
        r#"(memory (export "memory") 120)
      (func (export "_start") (call $write (i32.const 1) (i32.const 1024) (i32.const 7340032)))"#,
    );
    let f = start(&wat).await;
    let r = call(&f, "").await.unwrap();
    assert_eq!(
        r.error_type.as_deref(),
        Some("Function.ResponseSizeTooLarge")
    );
    assert!(r.body.len() < 1024);
}
