//! The `wasm` tier's `wasi:http/proxy` components — hand-written WAT (via `wit-component`),
//! Python (componentize-py) and JavaScript (componentize-js) — through the real server:
//! HTTP triggers, `/v1` and Lambda invokes, ahead-of-time compilation at deploy, limits and
//! isolation.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// The `.cwasm` files of a server's compile cache.
fn compiled(s: &Server) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let dir = s.data_dir.join("cache/wasm");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| (e.path(), e.metadata().unwrap().modified().unwrap()))
                .filter(|(p, _)| p.extension().is_some_and(|x| x == "cwasm"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn wasm_http_components_serve_triggers_and_invokes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Server::start_in(&data, &[]);
    let hello = wasm_function("hello-http", &wasm_guest("hello-http"), "hello.wasm", "");
    s.deploy(hello.path());
    // Compiled at deploy, before any request.
    let cache = compiled(&s);
    assert_eq!(cache.len(), 1, "{cache:?}");

    // HTTP trigger: the component's own status, headers and body.
    let r = s.get("/fn/hello-http/");
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "content-type"), "text/plain");
    assert_eq!(hdr(r.headers(), "x-skiff-revision"), "1");
    assert_eq!(r.text().unwrap(), "hello from wasm\n");
    let r = s.get("/fn/hello-http/any/path?x=1");
    assert_eq!(r.status(), 200);

    // The invoke entry points POST the event as JSON; the body is the result.
    let echo = wasm_function("echo-http", &wasm_guest("echo-http"), "echo.wasm", "");
    s.deploy(echo.path());
    let (v, h) = s.invoke_ok("echo-http", &json!({"a": 1, "b": [true]}));
    assert_eq!(v, json!({"a": 1, "b": [true]}));
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");
    let r = s.post(
        "/2015-03-31/functions/echo-http/invocations",
        r#"{"lambda":"api"}"#,
    );
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "x-amz-executed-version"), "1");
    assert_eq!(r.json::<Value>().unwrap(), json!({"lambda": "api"}));
    let r = s.post("/fn/echo-http/x", "raw body");
    assert_eq!(r.text().unwrap(), "raw body");

    // Many requests at once: each in its own fresh store.
    let url = format!("{}/fn/echo-http/c", s.url);
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let (http, url) = (s.http.clone(), url.clone());
            std::thread::spawn(move || http.post(url).body(format!("n{i}")).send().unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), format!("n{i}"));
    }

    // Broken code is refused at deploy with the field named; nothing is stored.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("function.yaml"),
        "name: hello-http\nruntime: wasm\nhandler: hello.wasm\n",
    )
    .unwrap();
    std::fs::write(bad.path().join("hello.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    let out = s.cli(&["deploy", bad.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("handler"), "{err}");
    std::fs::write(
        bad.path().join("hello.wasm"),
        "(component (core module (func (export \"f\"))))",
    )
    .unwrap();
    let out = s.cli(&["deploy", bad.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("wasi:http/incoming-handler"),
        "{err}"
    );
    let revs: Value = s.get("/v1/functions/hello-http/revisions").json().unwrap();
    assert_eq!(
        revs["revisions"].as_array().map(Vec::len),
        Some(1),
        "{revs}"
    );

    // After a restart the compiled code is mapped from the cache, not compiled again.
    let before = compiled(&s);
    s.kill9();
    let s = Server::start_in(&data, &[]);
    let r = s.get("/fn/hello-http/");
    assert_eq!(r.text().unwrap(), "hello from wasm\n");
    assert_eq!(compiled(&s), before);
    assert!(s.healthy());
}

/// A one-shot HTTP server on loopback answering `body`; returns its port.
fn upstream(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn wasm_http_python_guest_env_limits_and_isolation() {
    let s = Server::start_with(&["--allow-private-egress"]);
    let guest = wasm_guest("py-http");
    let yaml = "memory: 128Mi\ntimeout: 2s\nenv: {GREETING: hello-env}\n";
    let sealed = wasm_function(
        "py-sealed",
        &guest,
        "app.wasm",
        &format!("{yaml}network: none\n"),
    );
    s.deploy(sealed.path());
    let open = wasm_function(
        "py-open",
        &guest,
        "app.wasm",
        &format!("{yaml}network: outbound\n"),
    );
    s.deploy(open.path());
    // One compilation for both functions: the cache is keyed by content.
    assert_eq!(compiled(&s).len(), 1);

    let r = s.get("/fn/py-sealed/hello");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "hello from python");
    let r = s.get("/fn/py-sealed/env?name=GREETING");
    assert_eq!(r.text().unwrap(), "hello-env");

    // No host files: there are no preopened directories.
    let r = s.get("/fn/py-sealed/read?path=/etc/hostname");
    assert_eq!(r.status(), 500);
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let text = r.text().unwrap();
    assert!(
        host.trim().is_empty() || !text.contains(host.trim()),
        "{text}"
    );

    // Network: denied with `none`; allowed with `outbound` (private here only because the
    // server runs with --allow-private-egress).
    let port = upstream("from upstream");
    let fetch = format!("/fetch?url=http://127.0.0.1:{port}/");
    let r = s.get(&format!("/fn/py-sealed{fetch}"));
    assert_eq!(r.status(), 502, "network none must not reach the upstream");
    assert!(!r.text().unwrap().contains("from upstream"));
    let r = s.get(&format!("/fn/py-open{fetch}"));
    let text = r.text().unwrap();
    assert!(text.contains("from upstream"), "{text}");

    // An endless loop: 504 at the timeout; the server and the function stay usable.
    let t0 = Instant::now();
    let r = s.get("/fn/py-sealed/spin");
    assert_eq!(r.status(), 504);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(s.healthy());
    assert_eq!(s.get("/fn/py-sealed/hello").status(), 200);

    // Over the memory limit: 502 out_of_memory (HTTP triggers answer API Gateway-style; the
    // reason is in the header and the invocation record), then it works again.
    let r = s.get("/fn/py-sealed/alloc?mb=200");
    assert_eq!(r.status(), 502);
    assert_eq!(hdr(r.headers(), "x-skiff-error"), "out_of_memory");
    let oom_id = hdr(r.headers(), "x-skiff-request-id");
    assert_eq!(s.get("/fn/py-sealed/alloc?mb=10").status(), 200);

    // A trap: 502; the next request is served from a fresh store.
    let r = s.get("/fn/py-sealed/trap");
    assert_eq!(r.status(), 502);
    assert_eq!(hdr(r.headers(), "x-skiff-error"), "function_crashed");
    let trap_id = hdr(r.headers(), "x-skiff-request-id");
    assert_eq!(s.get("/fn/py-sealed/hello").status(), 200);
    let inv: Value = s.get("/v1/functions/py-sealed/invocations").json().unwrap();
    let error_of_request = |id: &str| {
        inv["invocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["request_id"] == id)
            .map(|i| i["error"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(error_of_request(&oom_id).contains("128 MiB"), "{inv}");
    assert!(
        error_of_request(&trap_id).contains("wasm trap: wasm `unreachable`"),
        "{inv}"
    );

    // The guest's prints are the function's logs.
    let logs: Value = s.get("/v1/functions/py-sealed/logs").json().unwrap();
    assert!(!logs["lines"].as_array().unwrap().is_empty(), "{logs}");
    assert!(s.healthy());
}

#[test]
fn wasm_http_js_guest_fresh_instance_per_request() {
    let s = Server::start();
    let dir = wasm_function("js-http", &wasm_guest("js-http"), "app.wasm", "");
    s.deploy(dir.path());
    // componentize-js components fail when an instance is reused; Skiff never reuses one.
    for _ in 0..3 {
        let r = s.get("/fn/js-http/");
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "hello from js");
    }
    let r = s.post("/fn/js-http/echo", "js echo");
    assert_eq!(r.text().unwrap(), "js echo");
    assert!(s.healthy());
}
