//! Seed-compatible ad-hoc JavaScript: `POST /execute` (fresh QuickJS isolate per call) and the
//! `GET /health` shape, against the real binary over HTTP.

use crate::harness::*;
use serde_json::{json, Value};

/// POSTs `body` to `/execute`; returns the status and the JSON reply.
fn exec(s: &Server, body: &Value) -> (u16, Value) {
    let r = s.post("/execute", serde_json::to_vec(body).unwrap());
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

/// Expects a `{success: false, error, stack, duration}` reply with status 200.
fn failed(s: &Server, body: &Value) -> (String, String) {
    let (status, v) = exec(s, body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], false, "{v}");
    assert!(v.get("result").is_none(), "{v}");
    assert!(v["duration"].is_u64(), "{v}");
    (
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string(),
        v["stack"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string(),
    )
}

#[test]
fn execute_success_request_and_env_fields() {
    let s = Server::start();
    let code = r#"
      export async function handle(req) {
        await new Promise((r) => setTimeout(r, 10));
        return {
          statusCode: 201,
          headers: { "content-type": "application/json", "x-method": req.method },
          body: JSON.stringify({
            url: req.url, q: req.query.q, h: req.headers["x-in"], body: req.body,
            secret: env.SECRET, missing: env.OTHER === undefined,
          }),
        };
      }"#;
    let (status, v) = exec(
        &s,
        &json!({
            "code": code,
            "handler": "handle",
            "request": {"method": "PUT", "url": "/a/b?q=1", "headers": {"x-in": "hdr"},
                        "body": "payload", "query": {"q": "1"}},
            "envVars": {"SECRET": "s3cret"},
            "timeout": 5,
            "memory": 64,
        }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true, "{v}");
    assert!(v["duration"].is_u64(), "{v}");
    let r = &v["result"];
    assert_eq!(r["statusCode"], 201, "{v}");
    assert_eq!(r["headers"]["content-type"], "application/json");
    assert_eq!(r["headers"]["x-method"], "PUT");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"url": "/a/b?q=1", "q": "1", "h": "hdr", "body": "payload",
               "secret": "s3cret", "missing": true})
    );

    // Default export; a plain value becomes a 200 body; defaults fill the request.
    let (status, v) = exec(
        &s,
        &json!({"code": "export default (req) => ({ m: req.method, u: req.url });"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["result"],
        json!({"statusCode": 200, "headers": {}, "body": "{\"m\":\"GET\",\"u\":\"/\"}"})
    );

    // Fresh isolate per call: module state never carries over.
    let counter = json!({"code": "let n = 0; export default () => ({ statusCode: 200, body: String(++n) });"});
    for _ in 0..2 {
        let (_, v) = exec(&s, &counter);
        assert_eq!(v["result"]["body"], "1", "{v}");
    }
}

#[test]
fn execute_bad_code_is_200_with_error_and_stack() {
    let s = Server::start();
    let (error, stack) = failed(&s, &json!({"code": "export default (req) => {"}));
    assert!(!error.is_empty());
    assert!(stack.starts_with("SyntaxError"), "{stack}");

    let (error, _) = failed(
        &s,
        &json!({"code": "export const x = 1;", "handler": "main"}),
    );
    assert!(error.contains("`main`"), "{error}");
    let (error, _) = failed(&s, &json!({"code": "export const x = 1;"}));
    assert!(error.contains("export default"), "{error}");

    let (error, stack) = failed(
        &s,
        &json!({"code": "function deep() { throw new RangeError('boom ' + 7); }\nexport default () => deep();"}),
    );
    assert_eq!(error, "boom 7");
    assert!(stack.starts_with("RangeError: boom 7"), "{stack}");
    assert!(stack.contains("deep"), "{stack}");

    // No code generation, no CommonJS, no imports.
    let (error, _) = failed(&s, &json!({"code": "export default () => eval('1 + 1');"}));
    assert!(error.to_lowercase().contains("eval"), "{error}");
    let (error, _) = failed(
        &s,
        &json!({"code": "export default () => new Function('return 1')();"}),
    );
    assert!(!error.is_empty());
    let (error, stack) = failed(&s, &json!({"code": "export default () => require('fs');"}));
    assert!(error.contains("require"), "{error}");
    assert!(stack.starts_with("ReferenceError"), "{stack}");
    let (error, _) = failed(
        &s,
        &json!({"code": "import fs from 'fs';\nexport default () => 1;"}),
    );
    assert!(error.contains("import"), "{error}");

    // Timeout 1 s: the loop is stopped and reported.
    let t = std::time::Instant::now();
    let (status, v) = exec(
        &s,
        &json!({"code": "export default () => { for (;;) {} };", "timeout": 1}),
    );
    assert_eq!((status, &v["success"]), (200, &json!(false)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("timed out"), "{v}");
    assert!(v["duration"].as_u64().unwrap() >= 1000, "{v}");
    assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());

    // 64 MB: a hog hits the allocator limit.
    let (error, _) = failed(
        &s,
        &json!({"code": "export default () => { const a = []; for (;;) a.push('x'.repeat(1 << 20) + a.length); };", "memory": 64}),
    );
    assert!(
        error.contains("Out of memory") && error.contains("64 MB"),
        "{error}"
    );
    assert!(s.healthy());
}

#[test]
fn execute_request_errors_are_400_naming_the_field() {
    let s = Server::start();
    for (field, value) in [
        ("timeout", json!(0)),
        ("timeout", json!(31)),
        ("memory", json!(32)),
        ("memory", json!(1024)),
        ("code", json!(42)),
        ("envVars", json!([1])),
    ] {
        let mut body = json!({"code": "export default () => 1;"});
        body[field] = value;
        let (status, v) = exec(&s, &body);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["success"], false, "{v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{v}");
    }
    let r = s.post("/execute", "{not json");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["success"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
}

#[test]
fn health_shape_and_execute_requires_the_api_key() {
    let key = "sk_execute_test_key";
    let mut s = Server::start_with(&["--api-key", key]);
    // /health is open and has the seed's fields.
    let r = s.http.get(format!("{}/health", s.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["status"], "healthy", "{v}");
    let ts = v["timestamp"].as_str().unwrap();
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
        "{ts}"
    );

    let body = json!({"code": "export default () => 'ok';"});
    let (status, v) = exec(&s, &body);
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["success"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("API key"), "{v}");
    s.key = Some("sk_wrong".into());
    assert_eq!(exec(&s, &body).0, 401);
    s.key = Some(key.into());
    let (status, v) = exec(&s, &body);
    assert_eq!((status, &v["result"]["body"]), (200, &json!("ok")), "{v}");
}
