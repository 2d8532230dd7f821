//! The Lambda Runtime API inside the sandbox, driven by real clients built or installed during
//! the test run: a Rust function on the `lambda_runtime` crate (`examples/rust-lambda`), a
//! python function run by AWS's `awslambdaric` (`fx-ric-python`, vendored by its `vendor.sh`),
//! and a raw HTTP runtime for streaming and the API's corner cases (`fx-rapi-raw`).

use crate::harness::*;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Client context sent by the tests (as `X-Skiff-Client-Context`, base64 JSON like AWS).
const CLIENT_CONTEXT: &str = r#"{"client":{"installation_id":"inst-1","app_title":"skiff-e2e","app_version_name":"1.0","app_version_code":"1","app_package_name":"dev.skiff"},"custom":{"k":"v"},"env":{"platform":"linux"}}"#;

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Invokes with a client context; returns status, headers and the JSON body.
fn invoke_with_context(
    s: &Server,
    path: &str,
    event: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = s
        .http
        .post(format!("{}{path}", s.url))
        .header("x-skiff-client-context", b64(CLIENT_CONTEXT))
        .body(event.to_string())
        .send()
        .unwrap();
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().unwrap();
    (
        st,
        h,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// `fx-ric-python` with awslambdaric vendored (installed once per checkout, see `vendor.sh`).
fn ric_fixture() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fixture("fx-ric-python");
        let st = Command::new(dir.join("vendor.sh"))
            .status()
            .expect("run vendor.sh");
        assert!(st.success(), "vendoring awslambdaric failed");
        dir
    })
    .clone()
}

/// The `rust-lambda` binaries (built once per run if missing), staged as deployable
/// directories: `(buffered, streaming)`.
fn rust_lambda() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let profile_dir = Path::new(skiff_bin()).parent().unwrap().to_path_buf();
        let bins = [
            profile_dir.join("rust-lambda"),
            profile_dir.join("rust-lambda-stream"),
        ];
        if bins.iter().any(|b| !b.exists()) {
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "-p", "rust-lambda"])
                .current_dir(repo_root());
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            assert!(cmd.status().expect("cargo build rust-lambda").success());
        }
        let yaml = std::fs::read_to_string(example("rust-lambda/function.yaml")).unwrap();
        let stage = |bin: &Path, name: &str| {
            let dir = std::env::temp_dir().join(format!("skiff-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(bin, dir.join("bootstrap")).unwrap();
            let y = yaml.replace("name: rust-lambda", &format!("name: {name}"));
            std::fs::write(dir.join("function.yaml"), y).unwrap();
            dir
        };
        (
            stage(&bins[0], "rust-lambda"),
            stage(&bins[1], "rust-lambda-stream"),
        )
    })
}

/// The cases every real Runtime API client must pass: echo with the right environment and
/// context, client context, handler error, warm reuse, timeout. `error_type` is the type the
/// function's error reports.
fn conformance(s: &Server, name: &str, error_type: &str) {
    // Success, through an explicit qualifier so the ARN carries it.
    let path = format!("/v1/functions/{name}/invoke?qualifier=1");
    let (st, h1, v) = invoke_with_context(s, &path, &json!({"hello": "world"}));
    assert_eq!(st, 200, "{name}: {v}");
    assert_eq!(v["event"], json!({"hello": "world"}), "{name}: {v}");
    assert_eq!(hdr(&h1, "x-skiff-cold-start"), "true");
    let env = &v["env"];
    let expect = [
        ("GREETING", "hi"),
        ("WITH_EQUALS", "a=b=c"),
        ("TZ", ":UTC"),
        (
            "_HANDLER",
            if name == "fx-ric-python" {
                "app.handler"
            } else {
                "bootstrap"
            },
        ),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("LAMBDA_RUNTIME_DIR", "/var/runtime"),
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_REGION", "local"),
        ("AWS_DEFAULT_REGION", "local"),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_provided"),
        ("AWS_LAMBDA_FUNCTION_NAME", name),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            if name == "fx-ric-python" { "128" } else { "64" },
        ),
        ("AWS_LAMBDA_LOG_GROUP_NAME", &format!("/aws/lambda/{name}")),
        ("AWS_LAMBDA_LOG_STREAM_NAME", &format!("skiff/{name}/1")),
    ];
    for (k, want) in expect {
        assert_eq!(env[k], want, "{name}: env {k} in {env}");
    }
    assert_eq!(
        v["arn"],
        format!("arn:aws:lambda:local:000000000000:function:{name}:1"),
        "{name}"
    );
    assert_eq!(v["request_id"], hdr(&h1, "x-skiff-request-id"), "{name}");
    // The deadline is the function's timeout (2 s) from the start of the invocation.
    let remaining = v["remaining_ms"].as_i64().unwrap();
    assert!(
        (1000..=2000).contains(&remaining),
        "{name}: remaining {remaining} ms"
    );
    let cc = &v["client_context"];
    assert_eq!(cc["custom"], json!({"k": "v"}), "{name}: {cc}");
    if name == "rust-lambda" {
        // lambda_runtime reads the client app (and names the env map `environment`, not
        // Lambda's `env`, so it comes out empty).
        assert_eq!(cc["app_title"], "skiff-e2e", "{name}: {cc}");
    } else {
        assert_eq!(cc["env"], json!({"platform": "linux"}), "{name}: {cc}");
    }
    // Without a client context the function sees none.
    let (v0, _) = s.invoke_ok(name, &json!({}));
    assert!(v0["client_context"].is_null(), "{name}: {v0}");
    // Warm: the same process served both, and this one is not a cold start.
    let (v2, h2) = s.invoke_ok(name, &json!({"n": 2}));
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "false", "{name}");
    assert_eq!(
        hdr(&h1, "x-skiff-instance"),
        hdr(&h2, "x-skiff-instance"),
        "{name}"
    );
    assert_eq!(v2["invocations"], 3, "{name}: {v2}");
    // A handler error is the function's, and leaves the instance usable.
    let r = s.invoke(name, &json!({"fail": true}));
    assert_eq!(
        hdr(r.headers(), "x-skiff-function-error"),
        error_type,
        "{name}"
    );
    let (st, e) = error_of(r);
    assert_eq!(
        (st, e["code"].as_str()),
        (500, Some("function_error")),
        "{name}: {e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("boom: asked to fail"),
        "{name}: {e}"
    );
    let (v3, h3) = s.invoke_ok(name, &json!({}));
    assert_eq!(
        hdr(&h3, "x-skiff-instance"),
        hdr(&h1, "x-skiff-instance"),
        "{name}: {v3}"
    );
    // Timeout: 504 with Lambda's message, the instance is replaced.
    let sleep = json!({"sleep": 5, "sleep_ms": 5000});
    let t0 = Instant::now();
    let (st, e) = error_of(s.invoke(name, &sleep));
    assert_eq!(st, 504, "{name}: {e}");
    assert_eq!(e["message"], "Task timed out after 2.00 seconds", "{name}");
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "{name}: {:?}",
        t0.elapsed()
    );
    let (_, h4) = s.invoke_ok(name, &json!({}));
    assert_eq!(hdr(&h4, "x-skiff-cold-start"), "true", "{name}");
}

#[test]
fn awslambdaric_python_function() {
    let s = Server::start();
    s.deploy(&ric_fixture());
    conformance(&s, "fx-ric-python", "BadInput");
    // Init error: a handler module that does not exist fails the invocation with the error
    // the client reported from init.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&ric_fixture(), tmp.path());
    let yaml = std::fs::read_to_string(tmp.path().join("function.yaml"))
        .unwrap()
        .replace("name: fx-ric-python", "name: fx-ric-broken")
        .replace("handler: app.handler", "handler: no_such_module.handler");
    std::fs::write(tmp.path().join("function.yaml"), yaml).unwrap();
    s.deploy(tmp.path());
    let r = s.invoke("fx-ric-broken", &json!({}));
    assert_eq!(
        hdr(r.headers(), "x-skiff-function-error"),
        "Runtime.ImportModuleError"
    );
    let (st, e) = error_of(r);
    assert_eq!(st, 500, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("no_such_module"),
        "{e}"
    );
    assert!(s.healthy());
}

#[test]
fn lambda_runtime_rust_function() {
    let s = Server::start();
    let (buffered, _) = rust_lambda();
    s.deploy(buffered);
    conformance(&s, "rust-lambda", "HandlerError");
}

/// Reads a streamed body, noting when each piece arrived (relative to `t0`).
fn read_timed(
    mut r: reqwest::blocking::Response,
    t0: Instant,
) -> (Vec<(Duration, String)>, Option<String>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (seen, None),
            Ok(n) => seen.push((
                t0.elapsed(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            )),
            Err(e) => return (seen, Some(e.to_string())),
        }
    }
}

fn joined(seen: &[(Duration, String)]) -> String {
    seen.iter().map(|(_, s)| s.as_str()).collect()
}

/// The time the text `needle` had fully arrived.
fn arrival(seen: &[(Duration, String)], needle: &str) -> Duration {
    let mut acc = String::new();
    for (t, s) in seen {
        acc.push_str(s);
        if acc.contains(needle) {
            return *t;
        }
    }
    panic!("{needle:?} never arrived: {acc:?}");
}

#[test]
fn streamed_responses_arrive_as_they_are_produced() {
    let s = Server::start();
    let (_, streaming) = rust_lambda();
    s.deploy(streaming);
    s.deploy(&fixture("fx-rapi-raw"));
    // lambda_runtime::streaming: 3 chunks, 400 ms apart.
    for (name, event) in [
        ("rust-lambda-stream", json!({"chunks": 3, "delay_ms": 400})),
        (
            "fx-rapi-raw",
            json!({"stream": {"chunks": 3, "delay_ms": 400}}),
        ),
    ] {
        let t0 = Instant::now();
        let r = s.invoke(name, &event);
        assert_eq!(r.status(), 200, "{name}");
        assert!(
            r.headers().get("content-length").is_none(),
            "{name}: streamed, not buffered"
        );
        let ct = hdr(r.headers(), "content-type");
        let (seen, err) = read_timed(r, t0);
        assert_eq!(err, None, "{name}");
        assert_eq!(joined(&seen), "chunk 0\nchunk 1\nchunk 2\n", "{name}");
        let (first, last) = (arrival(&seen, "chunk 0"), arrival(&seen, "chunk 2"));
        assert!(
            last >= first + Duration::from_millis(700),
            "{name}: chunks were buffered (first at {first:?}, last at {last:?})"
        );
        if name == "fx-rapi-raw" {
            assert_eq!(ct, "text/plain", "{name}");
        } else {
            // lambda_runtime's metadata prelude was taken off the body; its content type kept.
            assert_eq!(ct, "application/octet-stream", "{name}");
        }
    }
    // The instance is released once the stream ended: the next call is warm.
    let (_, h) = s.invoke_ok("fx-rapi-raw", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");
}

#[test]
fn stream_errors_timeouts_and_abandoned_streams() {
    let s = Server::start();
    s.deploy(&fixture("fx-rapi-raw"));
    // A mid-stream error (trailers) aborts the body after the chunks sent before it.
    let t0 = Instant::now();
    let r = s.invoke(
        "fx-rapi-raw",
        &json!({"stream": {"chunks": 3, "fail_after": 2}}),
    );
    assert_eq!(r.status(), 200);
    let inst = hdr(r.headers(), "x-skiff-instance");
    let (seen, err) = read_timed(r, t0);
    assert_eq!(joined(&seen), "chunk 0\nchunk 1\n");
    assert!(err.is_some(), "a failed stream must not look complete");
    // The runtime got its 202, the instance stays in service.
    let (v, h) = s.invoke_ok("fx-rapi-raw", &json!({"report": true}));
    assert_eq!(hdr(&h, "x-skiff-instance"), inst);
    assert!(v["stream_reply"].as_str().unwrap().contains("202"), "{v}");
    let rec: Value = s
        .get("/v1/functions/fx-rapi-raw/invocations")
        .json()
        .unwrap();
    assert!(rec.to_string().contains("failed mid-stream"), "{rec}");

    // A consumer that goes away: the instance is not reused mid-stream, and is reused after.
    let r = s.invoke(
        "fx-rapi-raw",
        &json!({"stream": {"chunks": 4, "delay_ms": 300}}),
    );
    assert_eq!(hdr(r.headers(), "x-skiff-instance"), inst);
    drop(r);
    let (_, h) = s.invoke_ok("fx-rapi-raw", &json!({}));
    assert_ne!(hdr(&h, "x-skiff-instance"), inst, "reused mid-stream");
    std::thread::sleep(Duration::from_millis(1200));
    let rt: Value = s.get("/v1/functions/fx-rapi-raw/runtime").json().unwrap();
    let ids: Vec<&str> = rt["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "idle")
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert!(ids.contains(&inst.as_str()), "drained and kept: {rt}");

    // Timeout while streaming: the body ends with an error at the deadline, the instance is
    // stopped.
    let t0 = Instant::now();
    let r = s.invoke(
        "fx-rapi-raw",
        &json!({"stream": {"chunks": 3, "hang_after": 1}}),
    );
    assert_eq!(r.status(), 200);
    let hung = hdr(r.headers(), "x-skiff-instance");
    let (seen, err) = read_timed(r, t0);
    assert_eq!(joined(&seen), "chunk 0\n");
    assert!(err.is_some(), "timed-out stream must not look complete");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3500),
        "took {took:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let rt: Value = s.get("/v1/functions/fx-rapi-raw/runtime").json().unwrap();
    assert!(
        !rt.to_string().contains(&hung),
        "timed-out instance kept: {rt}"
    );
    assert!(processes_in_cgroup(&hung).is_empty());
    assert!(s.healthy());
}

#[test]
fn runtime_api_corner_cases() {
    let s = Server::start();
    s.deploy(&fixture("fx-rapi-raw"));
    // A second answer for one invocation is an invalid state transition (403).
    let (v, h1) = s.invoke_ok("fx-rapi-raw", &json!({"probe": "double"}));
    assert_eq!(v, json!({"first": true}));
    // A response over 6 MB: 413 to the runtime, an error to the caller.
    let r = s.invoke("fx-rapi-raw", &json!({"probe": "big"}));
    assert_eq!(
        hdr(r.headers(), "x-skiff-function-error"),
        "Function.ResponseSizeTooLarge"
    );
    assert_eq!(r.status(), 500);
    let path = "/v1/functions/fx-rapi-raw/invoke?qualifier=1";
    let (st, h2, v) = invoke_with_context(&s, path, &json!({"report": true}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h1, "x-skiff-instance"), hdr(&h2, "x-skiff-instance"));
    assert_eq!(v["double"][0], 202, "{v}");
    assert_eq!(v["double"][1], json!({"status": "OK"}), "{v}");
    assert_eq!(v["double"][2], 403, "{v}");
    assert_eq!(v["double"][3]["errorType"], "InvalidStateTransition", "{v}");
    assert_eq!(v["big"][0], 413, "{v}");
    // The invocation headers as the runtime got them.
    let h = &v["headers"];
    assert_eq!(
        h["lambda-runtime-aws-request-id"],
        hdr(&h2, "x-skiff-request-id")
    );
    assert_eq!(
        h["lambda-runtime-invoked-function-arn"],
        "arn:aws:lambda:local:000000000000:function:fx-rapi-raw:1"
    );
    assert!(
        h["lambda-runtime-trace-id"]
            .as_str()
            .unwrap()
            .starts_with("Root=1-"),
        "{h}"
    );
    let cc: Value =
        serde_json::from_str(h["lambda-runtime-client-context"].as_str().unwrap()).unwrap();
    assert_eq!(cc, serde_json::from_str::<Value>(CLIENT_CONTEXT).unwrap());
    let deadline: i64 = h["lambda-runtime-deadline-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let left = deadline - v["now_ms"].as_i64().unwrap();
    assert!(
        (1000..=2000).contains(&left),
        "deadline {left} ms ahead (timeout 2s)"
    );
    assert!(h.get("lambda-runtime-cognito-identity").is_none(), "{h}");
    // A bad client context header is the caller's error.
    let r = s
        .http
        .post(format!("{}/v1/functions/fx-rapi-raw/invoke", s.url))
        .header("x-skiff-client-context", "not base64!")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(error_of(r).0, 400);
}
