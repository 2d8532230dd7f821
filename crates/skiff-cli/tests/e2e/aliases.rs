//! Revisions and aliases: promotion, weighted splits (canary), sticky keys, rollback, and the
//! errors of the alias API.

use crate::harness::*;
use reqwest::blocking::Response;
use serde_json::{json, Value};
use std::collections::HashMap;

fn put(s: &Server, path: &str, body: &str) -> Response {
    s.http
        .put(format!("{}{path}", s.url))
        .body(body.to_string())
        .send()
        .unwrap()
}

/// Invokes `fx-echo` (optionally with a sticky key); returns the revision that ran.
fn revision_of(s: &Server, path: &str, sticky: Option<&str>) -> u32 {
    let mut r = s.http.post(format!("{}{path}", s.url)).body("{}");
    if let Some(k) = sticky {
        r = r.header("X-Skiff-Sticky", k);
    }
    let r = r.send().unwrap();
    assert_eq!(r.status(), 200, "{path}: {:?}", r.text());
    hdr(r.headers(), "x-skiff-revision").parse().unwrap()
}

fn cli_ok(s: &Server, args: &[&str]) -> String {
    let out = s.cli(args);
    assert!(out.status.success(), "skiff {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which revision a sticky key gets under a 90/10 split of revisions 1 and 2.
fn expected_sticky(key: &str) -> u32 {
    if skiff_core::split::bucket_of(key.as_bytes()) < 90 {
        1
    } else {
        2
    }
}

#[test]
fn canary_split_sticky_keys_and_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Server::start_in(&data, &[]);
    let f = fixture("fx-echo");
    s.deploy(&f);
    // `promote=false`: the revision waits, production stays on 1.
    let out = cli_ok(&s, &["deploy", f.to_str().unwrap(), "--no-promote"]);
    assert!(out.contains("revision 2"), "{out}");
    let invoke = "/v1/functions/fx-echo/invoke";
    assert_eq!(revision_of(&s, invoke, None), 1);
    assert_eq!(revision_of(&s, &format!("{invoke}?qualifier=2"), None), 2);
    // Promote it.
    assert_eq!(
        put(
            &s,
            "/v1/functions/fx-echo/aliases/production",
            r#"{"revision":2}"#
        )
        .status(),
        200
    );
    assert_eq!(revision_of(&s, invoke, None), 2);

    // Canary: 90 % on 1, 10 % on 2, measured over 1,000 requests.
    let out = cli_ok(&s, &["alias", "set", "fx-echo", "production", "1=90,2=10"]);
    assert!(out.contains("1 (90%), 2 (10%)"), "{out}");
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for _ in 0..1000 {
        *counts.entry(revision_of(&s, invoke, None)).or_default() += 1;
    }
    eprintln!("90/10 split over 1,000 requests: {counts:?}");
    let canary = counts.get(&2).copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<u32>(), 1000, "{counts:?}");
    assert!(
        (70..=130).contains(&canary),
        "10 % ± 3 % expected: {counts:?}"
    );
    let listed = cli_ok(&s, &["alias", "ls", "fx-echo"]);
    assert!(
        listed.contains("production") && listed.contains("2 (10%)"),
        "{listed}"
    );

    // A sticky key always gets the same revision, on every entry point, and keys spread.
    let keys: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
    let mut seen = HashMap::new();
    for k in &keys {
        let want = expected_sticky(k);
        for _ in 0..3 {
            assert_eq!(revision_of(&s, invoke, Some(k)), want, "key {k}");
        }
        let r = s
            .http
            .get(format!("{}/fn/fx-echo/", s.url))
            .header("X-Skiff-Sticky", k.as_str())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            hdr(r.headers(), "x-skiff-revision"),
            want.to_string(),
            "key {k}"
        );
        *seen.entry(want).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "100 keys should reach both revisions: {seen:?}"
    );

    // The split survives a restart and sticky keys keep their revision.
    drop(s);
    s = Server::start_in(&data, &[]);
    for k in keys.iter().take(20) {
        assert_eq!(
            revision_of(&s, invoke, Some(k)),
            expected_sticky(k),
            "key {k}"
        );
    }

    // Rollback: back to what production pointed at before the split (revision 2)...
    let out = cli_ok(&s, &["rollback", "fx-echo"]);
    assert!(out.contains("production -> 2"), "{out}");
    for _ in 0..20 {
        assert_eq!(revision_of(&s, invoke, None), 2);
    }
    // ...or to an explicit revision, effective on the very next request.
    cli_ok(&s, &["rollback", "fx-echo", "--to", "1"]);
    assert_eq!(revision_of(&s, invoke, None), 1);
    let hist: Value = s
        .get("/v1/functions/fx-echo/aliases/production/history")
        .json()
        .unwrap();
    let revs: Vec<u64> = hist["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revs, [1, 2, 1, 2, 1], "{hist}");
    assert!(hist["history"][2]["routes"].is_array(), "{hist}");
}

#[test]
fn split_aliases_work_on_every_entry_point() {
    let s = Server::start();
    let f = fixture("fx-echo");
    s.deploy(&f);
    s.deploy(&f);
    let r = put(
        &s,
        "/v1/functions/fx-echo/aliases/canary",
        r#"{"routes":[{"revision":1,"weight":50},{"revision":2,"weight":50}]}"#,
    );
    assert_eq!(r.status(), 200);
    let a: Value = r.json().unwrap();
    assert_eq!(a["routes"][1], json!({"revision": 2, "weight": 50}), "{a}");
    let got: Value = s
        .get("/v1/functions/fx-echo/aliases/canary")
        .json()
        .unwrap();
    assert_eq!(got["routes"], a["routes"]);
    let mut by_entry: Vec<std::collections::HashSet<String>> = vec![Default::default(); 3];
    for _ in 0..40 {
        let r = s.post("/v1/functions/fx-echo/invoke?qualifier=canary", "{}");
        assert_eq!(r.status(), 200);
        by_entry[0].insert(hdr(r.headers(), "x-skiff-revision"));
        let r = s
            .http
            .post(format!("{}/fn/fx-echo/x", s.url))
            .header("X-Skiff-Qualifier", "canary")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        by_entry[1].insert(hdr(r.headers(), "x-skiff-revision"));
        let r = s.post("/2015-03-31/functions/fx-echo:canary/invocations", "{}");
        assert_eq!(r.status(), 200);
        by_entry[2].insert(hdr(r.headers(), "x-amz-executed-version"));
    }
    for (i, seen) in by_entry.iter().enumerate() {
        assert_eq!(seen.len(), 2, "entry point {i} saw {seen:?}");
    }
    // Async invocations accept the split alias too.
    let r = s.post(
        "/v1/functions/fx-echo/invoke?qualifier=canary&async=true",
        "{}",
    );
    assert_eq!(r.status(), 202);
}

#[test]
fn revisions_are_immutable_and_alias_errors_are_clear() {
    let s = Server::start();
    let f = fixture("fx-echo");
    s.deploy(&f);
    let r1: Value = s.get("/v1/functions/fx-echo/revisions/1").json().unwrap();
    let bigger = fixture_variant("fx-echo", &[("memory", "256Mi")]);
    s.deploy(bigger.path());
    let revs: Value = s.get("/v1/functions/fx-echo/revisions").json().unwrap();
    assert_eq!(revs["revisions"].as_array().unwrap().len(), 2);
    assert_eq!(
        revs["revisions"][0], r1,
        "revision 1 unchanged by a later deploy"
    );
    assert_ne!(revs["revisions"][1]["package_sha256"], r1["package_sha256"]);
    assert_eq!(revs["revisions"][1]["spec"]["memory"], "256Mi", "{revs}");

    let alias = "/v1/functions/fx-echo/aliases/beta";
    let cases: &[(&str, u16, Option<&str>)] = &[
        (r#"{"revision": 9}"#, 404, None),
        (
            r#"{"routes":[{"revision":1,"weight":50},{"revision":9,"weight":50}]}"#,
            404,
            None,
        ),
        (
            r#"{"routes":[{"revision":1,"weight":90},{"revision":2,"weight":20}]}"#,
            400,
            Some("routes"),
        ),
        (
            r#"{"routes":[{"revision":1,"weight":50},{"revision":2,"weight":40}]}"#,
            400,
            Some("routes"),
        ),
        (
            r#"{"routes":[{"revision":1,"weight":100.5}]}"#,
            400,
            Some("routes"),
        ),
        (
            r#"{"routes":[{"revision":0,"weight":50},{"revision":2,"weight":50}]}"#,
            400,
            Some("routes"),
        ),
        (r#"{"routes":[]}"#, 400, Some("routes")),
        (r#"{"revision": 0}"#, 400, Some("revision")),
        (r#"{"revision": -3}"#, 400, Some("revision")),
        (r#"{"revision": "2"}"#, 400, Some("revision")),
        (r#"{"revision": 1, "routes": []}"#, 400, Some("routes")),
        (r#"{}"#, 400, Some("revision")),
        (r#"{"revison": 1}"#, 400, Some("revison")),
    ];
    for (body, status, field) in cases {
        let (st, e) = error_of(put(&s, alias, body));
        assert_eq!(st, *status, "{body}: {e}");
        if let Some(field) = field {
            assert_eq!(e["field"].as_str(), Some(*field), "{body}: {e}");
        }
    }
    let (st, e) = error_of(put(&s, alias, "{not json"));
    assert_eq!((st, e["code"].as_str()), (400, Some("invalid_json")), "{e}");
    let (st, e) = error_of(put(
        &s,
        "/v1/functions/fx-echo/aliases/123",
        r#"{"revision":1}"#,
    ));
    assert_eq!((st, e["field"].as_str()), (400, Some("alias")));
    // Nothing above created the alias.
    assert_eq!(error_of(s.get(alias)).0, 404);
    assert_eq!(error_of(s.get("/v1/functions/fx-echo/revisions/9")).0, 404);
    assert_eq!(error_of(s.get("/v1/functions/fx-echo/revisions/0")).0, 400);
    assert_eq!(error_of(s.get("/v1/functions/nope/aliases/beta")).0, 404);
    assert_eq!(
        error_of(s.post("/v1/functions/fx-echo/invoke?qualifier=beta", "{}")).0,
        404
    );
    assert_eq!(
        error_of(s.post("/v1/functions/fx-echo/aliases/beta/rollback", "")).0,
        404
    );
    let (st, e) = error_of(s.post(
        "/v1/functions/fx-echo/aliases/production/rollback",
        r#"{"to": 0}"#,
    ));
    assert_eq!((st, e["field"].as_str()), (400, Some("to")));
    // A function with one revision has nothing to roll back to.
    let solo = fixture_variant("fx-echo", &[("name", "solo")]);
    s.deploy(solo.path());
    let (st, e) = error_of(s.post("/v1/functions/solo/aliases/production/rollback", ""));
    assert_eq!((st, e["code"].as_str()), (409, Some("conflict")), "{e}");
    assert_eq!(
        put(
            &s,
            "/v1/functions/fx-echo/aliases/production",
            r#"{"revision":1}"#
        )
        .status(),
        200
    );
    // Duplicate function name.
    let spec = r#"{"name":"dup","runtime":"python3","handler":"main.handler"}"#;
    assert_eq!(s.post("/v1/functions", spec).status(), 201);
    let (st, e) = error_of(s.post("/v1/functions", spec));
    assert_eq!((st, e["code"].as_str()), (409, Some("conflict")), "{e}");
    // Every error above left the server healthy and production untouched.
    let (_, h) = s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");
}
