//! Async invocations: the durable queue, retries, the dead-letter list and `kill -9`.

use crate::harness::*;
use crate::python_function;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A function that prints its request id (= the event id) and sleeps `sleep` seconds.
fn announcer(name: &str, extra_yaml: &str, sleep: f64) -> tempfile::TempDir {
    python_function(
        name,
        extra_yaml,
        &format!(
            "import time\ndef handler(event, context):\n    print('EVENT', context.aws_request_id, flush=True)\n    time.sleep({sleep})\n    return {{'got': event}}\n"
        ),
    )
}

/// Queues an event through the native invoke API and returns its id (asserting the 202).
fn enqueue(s: &Server, name: &str, event: &Value) -> String {
    let r = s
        .http
        .post(format!("{}/v1/functions/{name}/invoke", s.url))
        .header("x-skiff-invocation-type", "Event")
        .body(serde_json::to_vec(event).unwrap())
        .send()
        .unwrap();
    let status = r.status();
    let request_id = hdr(r.headers(), "x-skiff-request-id");
    let v: Value = r.json().unwrap();
    assert_eq!(status, 202, "{v}");
    let id = v["event_id"].as_str().expect("event_id").to_string();
    assert_eq!(request_id, id);
    id
}

fn event(s: &Server, name: &str, id: &str) -> Value {
    let r = s.get(&format!("/v1/functions/{name}/events/{id}"));
    assert_eq!(r.status(), 200, "event {id}");
    r.json().unwrap()
}

/// Polls an event until it reaches `state` (panics after `within`).
fn wait_state(s: &Server, name: &str, id: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let ev = event(s, name, id);
        if ev["state"] == state {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} not {state} in time: {ev}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Invocation records of a function: (request id, status, started_at_ms), oldest first.
fn invocations(s: &Server, name: &str) -> Vec<(String, String, i64)> {
    let v: Value = s
        .get(&format!("/v1/functions/{name}/invocations?limit=10000"))
        .json()
        .unwrap();
    let mut out: Vec<_> = v["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["request_id"].as_str().unwrap().to_string(),
                i["status"].as_str().unwrap().to_string(),
                i["started_at_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    out.reverse();
    out
}

#[test]
fn async_invoke_runs_once_and_is_recorded() {
    let s = Server::start();
    let f = announcer("announcer", "", 0.0);
    s.deploy(f.path());
    let id = enqueue(&s, "announcer", &json!({"n": 1}));
    let ev = wait_state(&s, "announcer", &id, "done", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 1, "{ev}");
    assert_eq!(ev["payload"], json!({"n": 1}), "{ev}");
    assert!(ev["error"].is_null(), "{ev}");
    // The function ran with the event id as its request id, and said so in its logs.
    let recs = invocations(&s, "announcer");
    assert_eq!(
        recs.iter().filter(|r| r.0 == id).count(),
        1,
        "ran exactly once: {recs:?}"
    );
    assert!(recs.iter().any(|r| r.0 == id && r.1 == "ok"), "{recs:?}");
    let logs: Value = s.get("/v1/functions/announcer/logs").json().unwrap();
    assert!(
        logs["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["line"] == format!("EVENT {id}") && l["request_id"] == id.as_str()),
        "{logs}"
    );

    // `?async=true` with a qualifier, and the CLI's `--async`.
    let r = s.post(
        "/v1/functions/announcer/invoke?async=true&qualifier=1",
        r#"{"via":"query"}"#,
    );
    assert_eq!(r.status(), 202);
    let id2 = r.json::<Value>().unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ev = wait_state(&s, "announcer", &id2, "done", Duration::from_secs(30));
    assert_eq!(ev["qualifier"], "1", "{ev}");
    let out = s.cli(&[
        "invoke",
        "announcer",
        "--async",
        "--data",
        r#"{"via":"cli"}"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let id3 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id3.len(), 36, "prints the event id: {id3}");
    let ev = wait_state(&s, "announcer", &id3, "done", Duration::from_secs(30));
    assert_eq!(ev["payload"], json!({"via": "cli"}));

    let metrics = s.get("/metrics").text().unwrap();
    assert!(
        metrics.contains("skiff_events_accepted_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("skiff_events_succeeded_total 3"),
        "{metrics}"
    );
}

#[test]
fn failing_events_are_retried_then_dead_lettered() {
    let s = Server::start_with(&["--event-retry-base", "300ms"]);
    s.deploy(&fixture("fx-error"));
    s.deploy(&fixture("fx-sleep"));
    let err_id = enqueue(&s, "fx-error", &json!({"order": 7}));
    // fx-sleep has a 1 s timeout: a platform failure, retried the same way.
    let slow_id = enqueue(&s, "fx-sleep", &json!({"seconds": 5}));

    let ev = wait_state(&s, "fx-error", &err_id, "dead", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 3, "{ev}");
    let msg = ev["error"].as_str().unwrap();
    assert!(msg.contains("ValueError") && msg.contains("boom"), "{ev}");
    // Exactly three attempts, all with the event id, spaced by the backoff (300 ms, 600 ms).
    let runs: Vec<_> = invocations(&s, "fx-error")
        .into_iter()
        .filter(|r| r.0 == err_id)
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.iter().all(|r| r.1 == "function_error"), "{runs:?}");
    let (gap1, gap2) = (runs[1].2 - runs[0].2, runs[2].2 - runs[1].2);
    assert!(gap1 >= 300, "first retry after {gap1} ms");
    assert!(gap2 >= 600, "second retry after {gap2} ms");

    let ev = wait_state(&s, "fx-sleep", &slow_id, "dead", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 3, "{ev}");
    assert!(
        ev["error"]
            .as_str()
            .unwrap()
            .starts_with("timeout: Task timed out"),
        "{ev}"
    );

    // The dead-letter list, over the API and the CLI.
    let dlq: Value = s.get("/v1/functions/fx-error/dlq").json().unwrap();
    let events = dlq["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{dlq}");
    assert_eq!(events[0]["id"], err_id.as_str());
    assert_eq!(events[0]["payload"], json!({"order": 7}));
    assert_eq!(events[0]["attempts"], 3);
    let out = s.cli(&["dlq", "fx-error"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(table.starts_with("EVENT"), "{table}");
    assert!(
        table.contains(&err_id) && table.contains("ValueError") && table.contains("\"order\":7"),
        "{table}"
    );
    let out = s.cli(&["dlq", "fx-error", "--json"]);
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed[0]["id"], err_id.as_str());

    // Redrive: three fresh attempts, then dead again; then discard it.
    let out = s.cli(&["dlq", "fx-error", "--retry", &err_id]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(100));
    let ev = wait_state(&s, "fx-error", &err_id, "dead", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 3, "{ev}");
    let runs = invocations(&s, "fx-error")
        .into_iter()
        .filter(|r| r.0 == err_id)
        .count();
    assert_eq!(runs, 6);
    let out = s.cli(&["dlq", "fx-error", "--rm", &err_id]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["dlq", "fx-error"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no dead-lettered events"),
        "{out:?}"
    );
    assert_eq!(
        s.get(&format!("/v1/functions/fx-error/events/{err_id}"))
            .status(),
        404
    );
    let (st, e) = error_of(s.post(&format!("/v1/functions/fx-error/dlq/{err_id}/retry"), ""));
    assert_eq!(st, 404, "{e}");
}

#[test]
fn async_invoke_rejects_bad_requests() {
    let s = Server::start();
    let f = announcer("announcer", "", 0.0);
    s.deploy(f.path());
    let post_event = |name: &str, body: Vec<u8>| {
        s.http
            .post(format!("{}/v1/functions/{name}/invoke", s.url))
            .header("x-skiff-invocation-type", "Event")
            .body(body)
            .send()
            .unwrap()
    };
    // The limit is 1 MiB: exactly that is accepted, one byte more is a 413.
    let limit = 1 << 20;
    let mut big = br#"{"s":""#.to_vec();
    big.resize(limit - 2, b'a');
    big.extend_from_slice(br#""}"#);
    assert_eq!(post_event("announcer", big.clone()).status(), 202);
    big.insert(6, b'a');
    let (st, e) = error_of(post_event("announcer", big));
    assert_eq!(
        (st, e["code"].as_str()),
        (413, Some("payload_too_large")),
        "{e}"
    );

    let (st, e) = error_of(post_event("nope", b"{}".to_vec()));
    assert_eq!(st, 404, "{e}");
    let (st, e) = error_of(s.post("/v1/functions/announcer/invoke?async=1&qualifier=9", "{}"));
    assert_eq!(st, 404, "{e}");
    let (st, e) = error_of(post_event("announcer", b"{nope".to_vec()));
    assert_eq!((st, e["code"].as_str()), (400, Some("invalid_json")), "{e}");
    let (st, e) = error_of(s.post("/v1/functions/announcer/invoke?async=maybe", "{}"));
    assert_eq!((st, e["field"].as_str()), (400, Some("async")), "{e}");
    let (st, e) = error_of(
        s.http
            .post(format!("{}/v1/functions/announcer/invoke", s.url))
            .header("x-skiff-invocation-type", "Later")
            .body("{}")
            .send()
            .unwrap(),
    );
    assert_eq!(
        (st, e["field"].as_str()),
        (400, Some("X-Skiff-Invocation-Type")),
        "{e}"
    );
    assert_eq!(s.get("/v1/functions/announcer/events/bogus").status(), 404);
    assert_eq!(s.get("/v1/functions/nope/dlq").status(), 404);
    let out = s.cli(&["dlq", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

#[test]
fn accepted_events_survive_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = ["--event-workers", "2", "--event-retry-base", "200ms"];
    let mut s = Server::start_in(&data, &args);
    let f = announcer("slowpoke", "timeout: 10s\nscale: {max: 2}\n", 0.3);
    s.deploy(f.path());
    let ids: Vec<String> = (0..30)
        .map(|i| enqueue(&s, "slowpoke", &json!({ "i": i })))
        .collect();
    // No graceful anything: queued and in-flight events are in the store or nowhere.
    s.kill9();

    let s = Server::start_in(&data, &args);
    let pending = ids
        .iter()
        .filter(|id| event(&s, "slowpoke", id)["state"] != "done")
        .count();
    assert!(
        pending > 0,
        "the kill came after everything ran; the test proves nothing"
    );
    let attempts: Vec<u64> = ids
        .iter()
        .map(|id| {
            wait_state(&s, "slowpoke", id, "done", Duration::from_secs(60))["attempts"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // Events that were mid-attempt when the server died were requeued and ran again.
    let rerun = attempts.iter().filter(|&&a| a >= 2).count();
    assert!(
        rerun >= 1,
        "no event was in flight at the kill: {attempts:?}"
    );
    // Every accepted event ran (at least once) to success, under its own id.
    let ok: HashSet<String> = invocations(&s, "slowpoke")
        .into_iter()
        .filter(|r| r.1 == "ok")
        .map(|r| r.0)
        .collect();
    for id in &ids {
        assert!(ok.contains(id), "event {id} has no successful invocation");
    }
    eprintln!(
        "kill -9 with 30 accepted events: {pending} not done at restart, {rerun} interrupted mid-attempt; all ran"
    );
}

#[test]
fn events_whose_target_is_gone_are_not_retried() {
    let s = Server::start_with(&["--event-workers", "1", "--event-retry-base", "100ms"]);
    let f = announcer("blocker", "timeout: 10s\n", 1.5);
    s.deploy(f.path());
    let r = s
        .http
        .put(format!("{}/v1/functions/blocker/aliases/staging", s.url))
        .body(r#"{"revision": 1}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The single worker is busy with the first event while the alias disappears.
    let first = enqueue(&s, "blocker", &json!({}));
    let r = s.post(
        "/v1/functions/blocker/invoke?async=true&qualifier=staging",
        "{}",
    );
    assert_eq!(r.status(), 202);
    let orphan = r.json::<Value>().unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .http
        .delete(format!("{}/v1/functions/blocker/aliases/staging", s.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(event(&s, "blocker", &orphan)["state"], "queued");
    let ev = wait_state(&s, "blocker", &orphan, "dead", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 1, "dead-lettered without retries: {ev}");
    assert!(
        ev["error"].as_str().unwrap().contains("alias `staging`"),
        "{ev}"
    );
    assert_eq!(event(&s, "blocker", &first)["state"], "done");

    // Deleting the function drops its queued events instead of running them.
    let busy = enqueue(&s, "blocker", &json!({}));
    wait_state(&s, "blocker", &busy, "running", Duration::from_secs(10));
    let queued: Vec<String> = (0..3).map(|_| enqueue(&s, "blocker", &json!({}))).collect();
    let out = s.cli(&["rm", "blocker"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.get("/v1/functions/blocker/dlq").status(), 404);
    std::thread::sleep(Duration::from_millis(300));
    s.deploy(f.path());
    std::thread::sleep(Duration::from_millis(500));
    for id in queued.iter().chain([&busy]) {
        assert_eq!(
            s.get(&format!("/v1/functions/blocker/events/{id}"))
                .status(),
            404
        );
    }
    let recs = invocations(&s, "blocker");
    assert!(
        !recs.iter().any(|r| queued.contains(&r.0)),
        "dropped events never ran: {recs:?}"
    );
    let dlq: Value = s.get("/v1/functions/blocker/dlq").json().unwrap();
    assert_eq!(dlq["events"], json!([]));
    assert!(s.healthy());
}

#[test]
fn graceful_shutdown_keeps_unfinished_events() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = ["--event-workers", "1"];
    let mut s = Server::start_in(&data, &args);
    let f = announcer("lingerer", "timeout: 30s\n", 5.0);
    s.deploy(f.path());
    let ids: Vec<String> = (0..3)
        .map(|_| enqueue(&s, "lingerer", &json!({})))
        .collect();
    wait_state(&s, "lingerer", &ids[0], "running", Duration::from_secs(10));
    // SIGTERM while the first event is mid-attempt (it needs 5 s; shutdown waits 3 s).
    let mut child = s.child.take().unwrap();
    let t0 = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t0.elapsed()
    );
    drop(s);

    // The interrupted attempt was not judged a failure: after a restart it runs again.
    let s = Server::start_in(&data, &args);
    let ev = event(&s, "lingerer", &ids[0]);
    assert!(ev["error"].is_null(), "{ev}");
    assert_ne!(ev["state"], "dead", "{ev}");
    let ev = wait_state(&s, "lingerer", &ids[0], "done", Duration::from_secs(30));
    assert_eq!(ev["attempts"], 2, "{ev}");
    for id in &ids[1..] {
        assert_ne!(event(&s, "lingerer", id)["state"], "dead");
    }
}
