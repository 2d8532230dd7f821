//! Runtime operations: inspect instances, graceful restart, recycle, disable/enable, delete.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn runtime(s: &Server, name: &str) -> Value {
    s.get(&format!("/v1/functions/{name}/runtime"))
        .json()
        .unwrap()
}

fn instances(rt: &Value) -> &Vec<Value> {
    rt["instances"].as_array().unwrap()
}

fn cli_ok(s: &Server, args: &[&str]) -> String {
    let out = s.cli(args);
    assert!(out.status.success(), "skiff {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls until `f` holds (at most 5 s).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runtime_lists_instances_per_revision() {
    let s = Server::start();
    s.deploy(&fixture("fx-echo"));
    s.deploy(&fixture("fx-echo"));
    s.invoke_ok("fx-echo", &json!({}));
    s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(
        s.post("/v1/functions/fx-echo/invoke?qualifier=1", "{}")
            .status(),
        200
    );
    let rt = runtime(&s, "fx-echo");
    assert_eq!(rt["enabled"], true);
    let revs = rt["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2, "{rt}");
    assert_eq!(revs[0]["revision"], 1);
    assert_eq!(revs[1]["revision"], 2);
    let i2 = &revs[1]["instances"][0];
    assert_eq!(i2["state"], "idle", "{rt}");
    assert_eq!(i2["invocations"], 2, "{rt}");
    assert!(i2["age_ms"].as_u64().is_some(), "{rt}");
    // A python runtime uses megabytes; the cgroup reports its current usage.
    assert!(i2["memory_bytes"].as_u64().unwrap() > 1 << 20, "{rt}");
    assert_eq!(revs[0]["instances"][0]["invocations"], 1, "{rt}");
    assert_eq!(instances(&rt).len(), 2);
    assert_eq!(error_of(s.get("/v1/functions/nope/runtime")).0, 404);
}

#[test]
fn restart_is_graceful_and_recycle_stops_idle() {
    let s = Server::start();
    let slow = fixture_variant("fx-sleep", &[("timeout", "20s")]);
    s.deploy(slow.path());
    let (_, h) = s.invoke_ok("fx-sleep", &json!({"seconds": 0}));
    let old = hdr(&h, "x-skiff-instance");
    // A slow call in flight on the old instance...
    let url = format!("{}/v1/functions/fx-sleep/invoke", s.url);
    let client = s.http.clone();
    let slow_call = std::thread::spawn(move || {
        let r = client.post(url).body(r#"{"seconds": 1.5}"#).send().unwrap();
        (
            r.status().as_u16(),
            hdr(r.headers(), "x-skiff-instance"),
            r.text().unwrap(),
        )
    });
    eventually("the slow call to be in flight", || {
        instances(&runtime(&s, "fx-sleep"))
            .iter()
            .any(|i| i["state"] == "busy")
    });
    // ...survives a restart, which drains it.
    let r: Value = s
        .post("/v1/functions/fx-sleep/runtime/restart", "")
        .json()
        .unwrap();
    assert_eq!(r, json!({"stopped": 0, "draining": 1}));
    let rt = runtime(&s, "fx-sleep");
    assert_eq!(instances(&rt)[0]["state"], "draining", "{rt}");
    // New calls go to a fresh instance meanwhile.
    let (_, h) = s.invoke_ok("fx-sleep", &json!({"seconds": 0}));
    let new = hdr(&h, "x-skiff-instance");
    assert_ne!(new, old);
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    let (status, ran_on, body) = slow_call.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(ran_on, old, "the in-flight call finished where it started");
    // The old instance is stopped once its call is done; later calls stay on the new one.
    eventually("the drained instance to go", || {
        let rt = runtime(&s, "fx-sleep");
        instances(&rt).len() == 1 && instances(&rt)[0]["id"] == new.as_str()
    });
    eventually("the drained instance's processes to exit", || {
        processes_in_cgroup(&old).is_empty()
    });
    let (_, h) = s.invoke_ok("fx-sleep", &json!({"seconds": 0}));
    assert_eq!(hdr(&h, "x-skiff-instance"), new);
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");

    // Recycle: idle instances stop now (fx-sleep keeps them for the default 10 minutes).
    let out = cli_ok(&s, &["restart", "fx-sleep", "--idle-only"]);
    assert!(out.contains("1 idle instance(s) stopped"), "{out}");
    assert!(instances(&runtime(&s, "fx-sleep")).is_empty());
    eventually("the recycled instance's processes to exit", || {
        processes_in_cgroup(&new).is_empty()
    });
    let (_, h) = s.invoke_ok("fx-sleep", &json!({"seconds": 0}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    // The CLI restart replaces the idle one too.
    let out = cli_ok(&s, &["restart", "fx-sleep"]);
    assert!(
        out.contains("1 idle instance(s) stopped, 0 draining"),
        "{out}"
    );
    assert_eq!(
        error_of(s.post("/v1/functions/nope/runtime/restart", "")).0,
        404
    );
}

#[test]
fn disabled_functions_answer_503_everywhere() {
    let s = Server::start();
    s.deploy(&fixture("fx-echo"));
    s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(instances(&runtime(&s, "fx-echo")).len(), 1);
    cli_ok(&s, &["disable", "fx-echo"]);
    // Idle instances are stopped.
    let rt = runtime(&s, "fx-echo");
    assert!(instances(&rt).is_empty(), "{rt}");
    assert_eq!(rt["enabled"], false);
    let f: Value = s.get("/v1/functions/fx-echo").json().unwrap();
    assert_eq!(f["function"]["enabled"], false);

    let (st, e) = error_of(s.invoke("fx-echo", &json!({})));
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("function_disabled")),
        "{e}"
    );
    let (st, e) = error_of(s.post("/v1/functions/fx-echo/invoke?async=true", "{}"));
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("function_disabled")),
        "{e}"
    );
    let (st, e) = error_of(s.post("/v1/functions/fx-echo/invoke?qualifier=1", "{}"));
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("function_disabled")),
        "{e}"
    );
    let r = s.http.get(format!("{}/fn/fx-echo/", s.url)).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(hdr(r.headers(), "x-skiff-error"), "function_disabled");
    assert_eq!(
        r.json::<Value>().unwrap(),
        json!({"message": "Service Unavailable"})
    );
    let r = s.post("/2015-03-31/functions/fx-echo/invocations", "{}");
    assert_eq!(r.status(), 409);
    assert_eq!(
        hdr(r.headers(), "x-amzn-errortype"),
        "ResourceConflictException"
    );
    let r = s.post("/2015-03-31/functions/fx-echo/invocations", "{}");
    let v: Value = r.json().unwrap();
    assert!(v["Message"].as_str().unwrap().contains("disabled"), "{v}");
    assert!(instances(&runtime(&s, "fx-echo")).is_empty());

    // Bad bodies name the field.
    let patch = |body: &str| {
        s.http
            .patch(format!("{}/v1/functions/fx-echo", s.url))
            .body(body.to_string())
            .send()
            .unwrap()
    };
    let (st, e) = error_of(patch(r#"{"enabled": "yes"}"#));
    assert_eq!((st, e["field"].as_str()), (400, Some("enabled")));
    let (st, e) = error_of(patch(r#"{"enabled": true, "memory": 1}"#));
    assert_eq!((st, e["field"].as_str()), (400, Some("memory")));
    assert_eq!(error_of(patch("{oops")).0, 400);
    let r = s
        .http
        .patch(format!("{}/v1/functions/nope", s.url))
        .body(r#"{"enabled": true}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    cli_ok(&s, &["enable", "fx-echo"]);
    let (_, h) = s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    let r = s.http.get(format!("{}/fn/fx-echo/", s.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.post("/2015-03-31/functions/fx-echo/invocations", "{}")
            .status(),
        200
    );
}

#[test]
fn delete_removes_unreferenced_artifacts() {
    let s = Server::start();
    let echo = fixture("fx-echo");
    s.deploy(&echo);
    s.deploy(&echo); // same package: two revisions, one artifact
    let other = fixture_variant("fx-echo", &[("name", "other")]);
    s.deploy(other.path());
    let (_, h) = s.invoke_ok("fx-echo", &json!({}));
    let instance = hdr(&h, "x-skiff-instance");
    s.invoke_ok("other", &json!({}));
    let sha = |name: &str| -> String {
        let v: Value = s
            .get(&format!("/v1/functions/{name}/revisions/1"))
            .json()
            .unwrap();
        v["package_sha256"].as_str().unwrap().to_string()
    };
    let (mine, theirs) = (sha("fx-echo"), sha("other"));
    assert_ne!(mine, theirs);
    let pkg = |sha: &str| s.data_dir.join(format!("artifacts/sha256/{sha}.tar.zst"));
    let code = |sha: &str| s.data_dir.join(format!("code/{sha}"));
    assert!(pkg(&mine).exists() && code(&mine).exists());
    cli_ok(&s, &["rm", "fx-echo"]);
    assert!(!pkg(&mine).exists(), "package left behind");
    assert!(!code(&mine).exists(), "unpacked code left behind");
    assert!(pkg(&theirs).exists() && code(&theirs).exists());
    assert!(
        processes_in_cgroup(&instance).is_empty(),
        "instance {instance} still runs"
    );
    assert_eq!(error_of(s.get("/v1/functions/fx-echo")).0, 404);
    assert_eq!(
        error_of(s.get("/v1/functions/fx-echo/aliases/production")).0,
        404
    );
    assert_eq!(error_of(s.invoke("fx-echo", &json!({}))).0, 404);
    assert_eq!(
        s.http
            .delete(format!("{}/v1/functions/fx-echo", s.url))
            .send()
            .unwrap()
            .status(),
        404
    );
    // The other function is untouched; a redeploy of the deleted one works from scratch.
    s.invoke_ok("other", &json!({}));
    s.deploy(&echo);
    let (_, h) = s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");
    assert!(pkg(&mine).exists());
}
