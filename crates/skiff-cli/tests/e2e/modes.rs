//! Execution modes (`mode:` ephemeral, warm, persistent, checkpointed, branched), the warm
//! pool (`FAAS_WARM_POOL_SIZE`), the default tier (`FAAS_RUNTIME`) and the snapshots and
//! branches API. The gVisor cases need `runsc` on PATH and are skipped (saying so) without it.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A function with an in-memory counter set at import (init) time, that can also write and
/// read files: `{"write": path, "data": text}`, `{"read": path}`.
const COUNTER: &str = r#"
import os
COUNT = 0

def handler(event, context):
    global COUNT
    COUNT += 1
    out = {"count": COUNT, "pid": os.getpid()}
    if "write" in event:
        with open(event["write"], "w") as f:
            f.write(event["data"])
    if "read" in event:
        p = event["read"]
        out["data"] = open(p).read() if os.path.exists(p) else None
    return out
"#;

fn count(s: &Server, name: &str) -> u64 {
    s.invoke_ok(name, &json!({})).0["count"].as_u64().unwrap()
}

fn runtime_instances(s: &Server, name: &str) -> Vec<Value> {
    let v: Value = s
        .get(&format!("/v1/functions/{name}/runtime"))
        .json()
        .unwrap();
    v["instances"].as_array().unwrap().clone()
}

/// Polls until `f` holds (at most `secs`).
fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post_json(s: &Server, path: &str, body: &Value) -> reqwest::blocking::Response {
    s.post(path, body.to_string())
}

fn delete(s: &Server, path: &str) -> reqwest::blocking::Response {
    s.http.delete(format!("{}{path}", s.url)).send().unwrap()
}

#[test]
fn persistent_workspace_and_tmp_survive_restarts_and_idleness() {
    let s = Server::start();
    let f = python_function("fx-pers", "mode: persistent\nscale: {idle: 1s}\n", COUNTER);
    s.deploy(f.path());
    let (v, h) = s.invoke_ok(
        "fx-pers",
        &json!({"write": "/workspace/notes.txt", "data": "kept"}),
    );
    assert_eq!(v["count"], 1, "{v}");
    let first = hdr(&h, "x-skiff-instance");
    // The workspace is a host directory owned by the sandbox uid.
    let host = s.data_dir.join("workspaces/default/fx-pers");
    assert_eq!(
        std::fs::read_to_string(host.join("notes.txt")).unwrap(),
        "kept"
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&host).unwrap().uid(), 10001);
    }
    // /tmp is not wiped between invocations of a persistent instance.
    s.invoke_ok("fx-pers", &json!({"write": "/tmp/t", "data": "tmp"}));
    let (v, _) = s.invoke_ok("fx-pers", &json!({"read": "/tmp/t"}));
    assert_eq!(v["data"], "tmp", "{v}");
    // Idle well past scale.idle (1s): a persistent instance is never reaped.
    std::thread::sleep(Duration::from_millis(2500));
    let inst = runtime_instances(&s, "fx-pers");
    assert_eq!(inst.len(), 1, "{inst:?}");
    assert_eq!(inst[0]["id"], first.as_str());
    let (v, h) = s.invoke_ok("fx-pers", &json!({"read": "/workspace/notes.txt"}));
    assert_eq!(
        (v["count"].as_u64(), hdr(&h, "x-skiff-instance")),
        (Some(4), first.clone())
    );

    // A restart replaces the instance; the workspace stays.
    let r = s.post("/v1/functions/fx-pers/runtime/restart", "");
    assert_eq!(r.status(), 200);
    let (v, h) = s.invoke_ok("fx-pers", &json!({"read": "/workspace/notes.txt"}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    assert_ne!(hdr(&h, "x-skiff-instance"), first);
    assert_eq!(v["count"], 1, "fresh process: {v}");
    assert_eq!(v["data"], "kept", "{v}");
    // Concurrent calls never start a second instance (one per function).
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (s.http.clone(), s.url.clone());
            std::thread::spawn(move || {
                client
                    .post(format!("{url}/v1/functions/fx-pers/invoke"))
                    .body("{}")
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.join().unwrap(), 200);
    }
    assert_eq!(runtime_instances(&s, "fx-pers").len(), 1);

    // Deleting the function removes its workspace.
    assert_eq!(delete(&s, "/v1/functions/fx-pers").status(), 204);
    assert!(!host.exists());
}

#[test]
fn ephemeral_invocations_never_see_each_others_tmp() {
    let s = Server::start();
    let f = python_function("fx-eph", "mode: ephemeral\n", COUNTER);
    s.deploy(f.path());
    let (v1, h1) = s.invoke_ok("fx-eph", &json!({"write": "/tmp/left", "data": "x"}));
    let (v2, h2) = s.invoke_ok("fx-eph", &json!({"read": "/tmp/left"}));
    assert_eq!(v1["count"], 1);
    assert_eq!(v2["count"], 1, "a fresh process: {v2}");
    assert_eq!(v2["data"], Value::Null, "{v2}");
    assert_ne!(hdr(&h1, "x-skiff-instance"), hdr(&h2, "x-skiff-instance"));
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "true");
    eventually("ephemeral instances to stop", 5, || {
        runtime_instances(&s, "fx-eph").is_empty()
    });
}

#[test]
fn snapshot_modes_on_native_are_refused_naming_mode() {
    let s = Server::start();
    for mode in ["checkpointed", "branched"] {
        let name = format!("fx-{mode}");
        let f = python_function(&name, &format!("mode: {mode}\n"), COUNTER);
        let (st, e) = upload(&s, &name, f.path(), true);
        assert_eq!(st, 409, "{e}");
        assert_eq!(e["error"]["code"], "not_publishable");
        let b = &e["error"]["blockers"][0];
        assert_eq!(b["field"], "mode", "{e}");
        assert!(b["message"].as_str().unwrap().starts_with("mode:"), "{e}");
        assert!(
            b["message"].as_str().unwrap().contains("sandbox: gvisor"),
            "{e}"
        );
        // Stored to wait, it still never starts.
        assert_eq!(upload(&s, &name, f.path(), false).0, 201);
        let (st, e) = error_of(s.post(&format!("/v1/functions/{name}/invoke?qualifier=1"), "{}"));
        assert_eq!(
            (st, e["code"].as_str()),
            (409, Some("not_publishable")),
            "{e}"
        );
    }
}

#[test]
fn snapshots_and_branches_api_errors() {
    let s = Server::start();
    // Unknown things are 404s.
    let (st, e) = error_of(s.post("/v1/functions/nope/snapshots", ""));
    assert_eq!((st, e["code"].as_str()), (404, Some("not_found")), "{e}");
    for path in ["/v1/snapshots/snap-none", "/v1/branches/br-none"] {
        assert_eq!(error_of(s.get(path)).0, 404, "GET {path}");
        assert_eq!(error_of(delete(&s, path)).0, 404, "DELETE {path}");
    }
    assert_eq!(error_of(s.post("/v1/branches/br-none/invoke", "{}")).0, 404);
    assert_eq!(
        error_of(post_json(
            &s,
            "/v1/snapshots/snap-none/fork",
            &json!({"count": 2})
        ))
        .0,
        404
    );
    // A bad count is a 400 naming `count`, whatever the snapshot.
    for bad in [
        json!({"count": 0}),
        json!({"count": 65}),
        json!({"count": "2"}),
    ] {
        let (st, e) = error_of(post_json(&s, "/v1/snapshots/snap-none/fork", &bad));
        assert_eq!(
            (st, e["field"].as_str()),
            (400, Some("count")),
            "{bad}: {e}"
        );
        assert!(e["message"].as_str().unwrap().starts_with("count:"), "{e}");
    }
    // Nothing running: 409.
    let f = python_function("fx-snap", "", COUNTER);
    s.deploy(f.path());
    let (st, e) = error_of(s.post("/v1/functions/fx-snap/snapshots", ""));
    assert_eq!(
        (st, e["code"].as_str()),
        (409, Some("no_running_instance")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("fx-snap"), "{e}");
    // Running on native, which cannot snapshot: 409 naming `sandbox`, and nothing is kept.
    s.invoke_ok("fx-snap", &json!({}));
    let (st, e) = error_of(s.post("/v1/functions/fx-snap/snapshots", ""));
    assert_eq!((st, e["field"].as_str()), (409, Some("sandbox")), "{e}");
    let list: Value = s.get("/v1/snapshots").json().unwrap();
    assert_eq!(list["snapshots"], json!([]), "{list}");
    let leftovers = std::fs::read_dir(s.data_dir.join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);
    // The instance keeps serving.
    assert_eq!(count(&s, "fx-snap"), 2);
    let branches: Value = s.get("/v1/branches").json().unwrap();
    assert_eq!(branches["branches"], json!([]));
}

#[test]
fn default_sandbox_comes_from_faas_runtime() {
    // microvm without QEMU is refused at startup.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(skiff_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .args(["--qemu", "/nonexistent/qemu-system-x86_64"])
        .env("FAAS_RUNTIME", "microvm")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAAS_RUNTIME") && err.contains("microvm"),
        "{err}"
    );

    // gvisor: revisions that do not choose a tier are stored with `sandbox: gvisor`; those
    // that do keep theirs. Without runsc the server refuses to start with it.
    let data = tmp.path().join("gv");
    if !runsc_on_path() {
        let out = std::process::Command::new(skiff_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("FAAS_RUNTIME", "gvisor")
            .output()
            .unwrap();
        assert!(!out.status.success());
        eprintln!("skipping the FAAS_RUNTIME=gvisor deploys: runsc is not on PATH");
        return;
    }
    let mut cmd = std::process::Command::new(skiff_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("FAAS_RUNTIME", "gvisor");
    let s = Server::spawn(cmd, &data);
    let f = python_function("fx-dflt", "", COUNTER);
    let (st, r) = upload(&s, "fx-dflt", f.path(), false);
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["spec"]["sandbox"], "gvisor", "{r}");
    let native = python_function("fx-nat", "sandbox: native\n", COUNTER);
    s.deploy(native.path());
    let rev: Value = s.get("/v1/functions/fx-nat/revisions/1").json().unwrap();
    assert_eq!(rev["spec"]["sandbox"], "native", "{rev}");
    assert_eq!(count(&s, "fx-nat"), 1);
}

#[test]
fn warm_pool_keeps_routed_revisions_started() {
    let s = Server::start_with(&["--warm-pool-size", "2"]);
    let f = python_function("fx-pool", "scale: {idle: 1s}\n", COUNTER);
    s.deploy(f.path());
    // The first request routes the revision: the pool fills up to 2 in the background.
    s.invoke_ok("fx-pool", &json!({}));
    eventually("two warm instances", 20, || {
        runtime_instances(&s, "fx-pool")
            .iter()
            .filter(|i| i["state"] == "idle")
            .count()
            >= 2
    });
    // Idle expiry never goes below the pool size.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(runtime_instances(&s, "fx-pool").len(), 2);
    let (_, h) = s.invoke_ok("fx-pool", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "false");
    // Stopped by hand, they are topped up again.
    let r: Value = s
        .post("/v1/functions/fx-pool/runtime/recycle", "")
        .json()
        .unwrap();
    assert_eq!(r["stopped"], 2, "{r}");
    eventually("the pool to refill", 20, || {
        runtime_instances(&s, "fx-pool").len() == 2
    });
    // A revision no alias routes to any more falls back to scale.min (0).
    let f2 = python_function("fx-pool", "scale: {idle: 1s}\nenv: {V: '2'}\n", COUNTER);
    s.deploy(f2.path());
    s.invoke_ok("fx-pool", &json!({}));
    eventually("revision 1's instances to expire", 10, || {
        runtime_instances(&s, "fx-pool")
            .iter()
            .all(|i| i["revision"] == 2)
    });
}

// ---------------------------------------------------------------- gVisor

fn gvisor_server() -> Option<Server> {
    if !runsc_on_path() {
        eprintln!("skipping: runsc is not on PATH (install gVisor to run the gVisor mode tests)");
        return None;
    }
    Some(Server::start())
}

#[test]
fn gvisor_warm_counts_up() {
    let Some(s) = gvisor_server() else { return };
    let f = python_function("fx-gv-warm", "sandbox: gvisor\nnetwork: none\n", COUNTER);
    s.deploy(f.path());
    let counts: Vec<u64> = (0..3).map(|_| count(&s, "fx-gv-warm")).collect();
    assert_eq!(counts, [1, 2, 3]);
}

#[test]
fn gvisor_checkpointed_cold_starts_restore_the_init_state() {
    let Some(s) = gvisor_server() else { return };
    let f = python_function(
        "fx-gv-ckpt",
        "sandbox: gvisor\nnetwork: none\nmode: checkpointed\ntimeout: 60s\n",
        COUNTER,
    );
    s.deploy(f.path());
    let (v, h) = s.invoke_ok("fx-gv-ckpt", &json!({}));
    assert_eq!(
        (v["count"].as_u64(), hdr(&h, "x-skiff-cold-start").as_str()),
        (Some(1), "true")
    );
    assert_eq!(count(&s, "fx-gv-ckpt"), 2);
    assert_eq!(count(&s, "fx-gv-ckpt"), 3);
    let image = s.data_dir.join("snapshots/rev/default-fx-gv-ckpt-1");
    assert!(image.is_dir(), "the revision snapshot is kept on disk");
    // A new cold start restores the checkpoint (count 0), not the later state (3).
    assert_eq!(
        s.post("/v1/functions/fx-gv-ckpt/runtime/restart", "")
            .status(),
        200
    );
    let (v, h) = s.invoke_ok("fx-gv-ckpt", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(delete(&s, "/v1/functions/fx-gv-ckpt").status(), 204);
    assert!(!image.exists());
}

#[test]
fn gvisor_branched_invocations_each_start_from_the_snapshot() {
    let Some(s) = gvisor_server() else { return };
    let f = python_function(
        "fx-gv-br",
        "sandbox: gvisor\nnetwork: none\nmode: branched\ntimeout: 60s\n",
        COUNTER,
    );
    s.deploy(f.path());
    let (a, _) = s.invoke_ok("fx-gv-br", &json!({"write": "/tmp/mine", "data": "a"}));
    let (b, _) = s.invoke_ok("fx-gv-br", &json!({"read": "/tmp/mine"}));
    assert_eq!(
        (a["count"].as_u64(), b["count"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(b["data"], Value::Null, "{b}");
}

#[test]
fn gvisor_snapshot_of_persistent_instance_forks_independent_branches() {
    let Some(s) = gvisor_server() else { return };
    let f = python_function(
        "fx-gv-pers",
        "sandbox: gvisor\nnetwork: none\nmode: persistent\ntimeout: 60s\nscale: {idle: 10m}\n",
        COUNTER,
    );
    s.deploy(f.path());
    let (v, _) = s.invoke_ok(
        "fx-gv-pers",
        &json!({"write": "/workspace/w", "data": "gv"}),
    );
    assert_eq!(v["count"], 1, "{v}");
    let host = s.data_dir.join("workspaces/default/fx-gv-pers/w");
    assert_eq!(
        std::fs::read_to_string(host).unwrap(),
        "gv",
        "the workspace is bound"
    );
    assert_eq!(count(&s, "fx-gv-pers"), 2);
    let r = s.post("/v1/functions/fx-gv-pers/snapshots", "");
    assert_eq!(r.status(), 201);
    let snap: Value = r.json().unwrap();
    let id = snap["id"].as_str().unwrap().to_string();
    assert_eq!(
        (snap["function"].as_str(), snap["revision"].as_u64()),
        (Some("fx-gv-pers"), Some(1))
    );
    assert!(snap["size_bytes"].as_u64().unwrap() > 0, "{snap}");
    assert!(snap["created_at"].is_string(), "{snap}");
    let got: Value = s.get(&format!("/v1/snapshots/{id}")).json().unwrap();
    assert_eq!(got["id"], id.as_str());
    // The snapshotted instance keeps running where it was.
    assert_eq!(count(&s, "fx-gv-pers"), 3);

    let r = post_json(
        &s,
        &format!("/v1/snapshots/{id}/fork"),
        &json!({"count": 2}),
    );
    assert_eq!(r.status(), 201);
    let forked: Value = r.json().unwrap();
    let ids: Vec<String> = forked["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert_eq!(b["snapshot"], id.as_str());
            b["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
    let invoke = |b: &str, event: Value| -> Value {
        let r = post_json(&s, &format!("/v1/branches/{b}/invoke"), &event);
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    };
    // Each branch starts from the snapshot: two invocations had run, so this is the third.
    for b in &ids {
        assert_eq!(invoke(b, json!({}))["count"], 3, "branch {b}");
    }
    // What branch A does stays in branch A.
    let a = invoke(&ids[0], json!({"write": "/tmp/branch", "data": "A"}));
    assert_eq!(a["count"], 4);
    let b = invoke(&ids[1], json!({"read": "/tmp/branch"}));
    assert_eq!(
        (b["count"].as_u64(), &b["data"]),
        (Some(4), &Value::Null),
        "{b}"
    );
    let listed: Value = s.get("/v1/branches").json().unwrap();
    assert_eq!(listed["branches"].as_array().unwrap().len(), 2, "{listed}");

    assert_eq!(
        delete(&s, &format!("/v1/branches/{}", ids[0])).status(),
        204
    );
    assert_eq!(
        error_of(s.post(&format!("/v1/branches/{}/invoke", ids[0]), "{}")).0,
        404
    );
    // Deleting the snapshot stops its other branch and removes the image.
    assert_eq!(delete(&s, &format!("/v1/snapshots/{id}")).status(), 204);
    assert!(!s.data_dir.join("snapshots").join(&id).exists());
    assert_eq!(error_of(s.get(&format!("/v1/branches/{}", ids[1]))).0, 404);
    assert_eq!(count(&s, "fx-gv-pers"), 4);
}
