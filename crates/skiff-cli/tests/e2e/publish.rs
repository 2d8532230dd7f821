//! Publish blockers: revisions that cannot serve are stored only to wait, are never promoted
//! or started, and say why.

use crate::harness::*;
use serde_json::{json, Value};

fn codes(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["code"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn publish_blockers_refuse_promotion_and_say_why() {
    // A server without the microVM tier (no QEMU where it looks).
    let s = Server::start_with(&["--qemu", "/nonexistent/qemu-system-x86_64"]);
    s.deploy(&fixture("fx-echo"));
    // A publishable revision says so.
    let rev: Value = s.get("/v1/functions/fx-echo/revisions/1").json().unwrap();
    assert_eq!(
        (rev["publishable"].as_bool(), codes(&rev["blockers"]).len()),
        (Some(true), 0)
    );

    // `routes: []` → not_public; promoting is refused and nothing is stored.
    let closed = fixture_variant("fx-echo", &[("routes", "[]")]);
    let (st, e) = upload(&s, "fx-echo", closed.path(), true);
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "not_publishable");
    assert_eq!(codes(&e["error"]["blockers"]), ["not_public"]);
    assert_eq!(e["error"]["revision"], 2);
    let revs: Value = s.get("/v1/functions/fx-echo/revisions").json().unwrap();
    assert_eq!(revs["revisions"].as_array().unwrap().len(), 1, "{revs}");
    // Stored to wait with promote=false: listed with its blockers, can be invoked directly
    // (not over HTTP), and no alias may point at it.
    let (st, r) = upload(&s, "fx-echo", closed.path(), false);
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["number"], 2);
    assert_eq!(r["publishable"], false);
    assert_eq!(codes(&r["blockers"]), ["not_public"]);
    let got: Value = s.get("/v1/functions/fx-echo/revisions/2").json().unwrap();
    assert_eq!(codes(&got["blockers"]), ["not_public"]);
    let r = s.post("/v1/functions/fx-echo/invoke?qualifier=2", "{}");
    assert_eq!(r.status(), 200);
    let put = |body: Value| {
        s.http
            .put(format!("{}/v1/functions/fx-echo/aliases/production", s.url))
            .body(body.to_string())
            .send()
            .unwrap()
    };
    let (st, e) = error_of(put(json!({"revision": 2})));
    assert_eq!(st, 409, "{e}");
    assert_eq!(codes(&e["blockers"]), ["not_public"]);
    let (st, e) = error_of(put(
        json!({"routes": [{"revision": 1, "weight": 90}, {"revision": 2, "weight": 10}]}),
    ));
    assert_eq!(
        (st, e["code"].as_str()),
        (409, Some("not_publishable")),
        "{e}"
    );
    // Production is untouched.
    let (_, h) = s.invoke_ok("fx-echo", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");

    // An `http` function without its command → missing_command; runtimes and modes this
    // server cannot start → missing_runtime / manual_runtime. Such revisions never start.
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("fx-web", "runtime: http\n", "missing_command"),
        (
            "fx-gv",
            "runtime: command\nhandler: cat\nsandbox: microvm\n",
            "missing_runtime",
        ),
        (
            "fx-pers",
            "runtime: python3\nmode: checkpointed\n",
            "manual_runtime",
        ),
    ];
    for (name, yaml, code) in cases {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("function.yaml"), format!("name: {name}\n{yaml}")).unwrap();
        std::fs::write(d.join("main.py"), "def handler(e, c):\n    return 1\n").unwrap();
        let (st, e) = upload(&s, name, &d, true);
        assert_eq!(st, 409, "{name}: {e}");
        assert_eq!(codes(&e["error"]["blockers"]), [code], "{name}: {e}");
        let (st, r) = upload(&s, name, &d, false);
        assert_eq!(st, 201, "{name}: {r}");
        let r = s.post(&format!("/v1/functions/{name}/invoke?qualifier=1"), "{}");
        let (st, e) = error_of(r);
        assert_eq!(
            (st, e["code"].as_str()),
            (409, Some("not_publishable")),
            "{name}: {e}"
        );
    }
    // The CLI's deploy shows the refusal.
    let out = s.cli(&["deploy", closed.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_public"),
        "{out:?}"
    );
    assert!(s.healthy());
}
