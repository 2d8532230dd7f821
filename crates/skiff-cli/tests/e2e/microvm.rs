//! The microVM tier (`sandbox: microvm`) against the real binary and real QEMU (TCG on hosts
//! without usable KVM): the python and `provided` examples, the foundation's security and
//! limit cases, `runtime: http` through the agent's tunnel, `persistent` workspaces over
//! virtiofs, and the snapshot modes with the in-memory counter. Every server shares one
//! guest image cache under the target dir, so the image is built once per run. Skipped
//! (saying so) when QEMU is not installed.

use super::*;

/// Whether QEMU is on PATH.
fn qemu_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
}

/// A server whose guest images live in one cache shared by the whole run. The image is built
/// once, up front (`skiff image build`), so no invocation waits for it; the client allows for
/// cold boots under software emulation while other tests' VMs boot too.
fn server() -> Option<Server> {
    static IMAGES: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if !qemu_on_path() {
        eprintln!("skipping: qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)");
        return None;
    }
    let images = IMAGES.get_or_init(|| {
        let images = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("microvm-images");
        let data = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(skiff_bin())
            .args(["image", "build", "--image-dir"])
            .arg(&images)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skiff image build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        images
    });
    let mut s = Server::start_with(&["--image-dir", images.to_str().unwrap()]);
    s.http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    Some(s)
}

/// `fixture` renamed `name` (prefixed `vm-`, so that no other test's search for the fixture's
/// own instances, e.g. cgroups named `/fx-sleep-…`, matches these) with `sandbox: microvm`.
fn microvm_variant(fixture: &str, name: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let mut fields = vec![("name", name), ("sandbox", "microvm")];
    fields.extend_from_slice(extra);
    fixture_variant(fixture, &fields)
}

/// A copy of `dir` whose function.yaml also says `sandbox: microvm` and `name: name`.
fn in_microvm(dir: &std::path::Path, name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        }
    }
    let yaml = std::fs::read_to_string(tmp.path().join("function.yaml")).unwrap();
    let mut lines: Vec<String> = yaml
        .lines()
        .filter(|l| !l.starts_with("name:") && !l.starts_with("sandbox:"))
        .map(str::to_string)
        .collect();
    lines.push(format!("name: {name}"));
    lines.push("sandbox: microvm".into());
    std::fs::write(tmp.path().join("function.yaml"), lines.join("\n") + "\n").unwrap();
    tmp
}

#[test]
fn microvm_runs_the_python_and_provided_examples_cold_and_warm() {
    let Some(s) = server() else { return };
    let py = in_microvm(&example("python-hello"), "py-vm");
    let rust = in_microvm(&provided_example(), "rust-vm");
    s.deploy(py.path());
    s.deploy(rust.path());
    for name in ["py-vm", "rust-vm"] {
        let t = Instant::now();
        let (v, h) = s.invoke_ok(name, &json!({"name": "VM"}));
        let cold = t.elapsed();
        assert_eq!(hdr(&h, "x-skiff-cold-start"), "true", "{name}: {v}");
        assert!(v.to_string().contains("VM"), "{name}: {v}");
        let t = Instant::now();
        let (v2, h) = s.invoke_ok(name, &json!({"name": "again"}));
        let warm = t.elapsed();
        assert_eq!(hdr(&h, "x-skiff-cold-start"), "false", "{name}: {v2}");
        assert!(v2.to_string().contains("again"), "{name}: {v2}");
        eprintln!("{name}: cold {cold:?}, warm {warm:?}");
    }
    // The instance really is a QEMU guest: its host cgroup holds a qemu process.
    let comms: Vec<String> = processes_in_cgroup("/py-vm-")
        .iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default())
        .collect();
    assert!(
        comms.iter().any(|c| c.starts_with("qemu-system")),
        "no qemu in the instance's cgroup: {comms:?}"
    );
}

#[test]
fn microvm_confines_the_function() {
    let Some(s) = server() else { return };
    let f = microvm_variant("fx-probe", "vm-fx-probe", &[]);
    s.deploy(f.path());
    assert_confined(&s, "vm-fx-probe", false);
}

#[test]
fn microvm_network_policy_is_enforced() {
    let Some(s) = server() else { return };
    let none = microvm_variant("fx-probe", "vm-fx-probe-n", &[]);
    let out = microvm_variant("fx-probe", "vm-fx-probe-o", &[("network", "outbound")]);
    s.deploy(none.path());
    s.deploy(out.path());
    assert_network_policy(&s, "vm-fx-probe-n", "vm-fx-probe-o", 9);
}

#[test]
fn microvm_timeout_and_memory_limits() {
    let Some(s) = server() else { return };
    let sleep = microvm_variant("fx-sleep", "vm-fx-sleep", &[]);
    let hog = microvm_variant("fx-memhog", "vm-fx-memhog", &[]);
    s.deploy(sleep.path());
    s.deploy(hog.path());
    // The cold boot (about 7 s under TCG here, longer while other tests' VMs boot) comes
    // before the 1 s timeout starts.
    assert_timeout_kills(&s, "vm-fx-sleep", Duration::from_secs(60));
    assert_memory_limit(&s, "vm-fx-memhog");
}

/// Counts invocations in memory; reports the guest's clock and fresh kernel randomness.
const COUNTER: &str = r#"
import os, time
COUNT = 0
BOOT = os.urandom(8).hex()

def handler(event, context):
    global COUNT
    COUNT += 1
    return {"count": COUNT, "boot": BOOT, "rand": os.urandom(8).hex(), "now": time.time()}
"#;

/// `mode: persistent` in a microVM: `/workspace` is the host's workspace directory (shared
/// over virtiofs), written through at once, so it outlives a killed VM; snapshots of such a
/// VM are refused with a clear error.
#[test]
fn microvm_persistent_workspace_is_the_host_directory_and_outlives_the_vm() {
    let Some(s) = server() else { return };
    let f = python_function(
        "vm-pers",
        "sandbox: microvm\nnetwork: none\nmode: persistent\ntimeout: 60s\n",
        r#"
import os
def handler(event, context):
    p = "/workspace/n"
    n = int(open(p).read()) + 1 if os.path.exists(p) else 1
    with open(p, "w") as f:
        f.write(str(n))
    return {"n": n, "uid": os.getuid(), "owner": os.stat(p).st_uid}
"#,
    );
    s.deploy(f.path());
    let host = s.data_dir.join("workspaces/default/vm-pers");
    let (v, h) = s.invoke_ok("vm-pers", &json!({}));
    assert_eq!(
        (v["n"].as_u64(), v["owner"].as_u64()),
        (Some(1), v["uid"].as_u64()),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(host.join("n")).unwrap(), "1");
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(host.join("n")).unwrap().uid();
        assert_eq!(
            owner, 10001,
            "the file is the sandbox uid's on the host too"
        );
    }
    // The host's changes are the guest's (its attribute cache lasts 1 s: virtiofs cache=auto).
    std::fs::write(host.join("n"), "41").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.invoke_ok("vm-pers", &json!({})).0["n"], 42);
    let r = s.post("/v1/functions/vm-pers/snapshots", "");
    let st = r.status().as_u16();
    let body = r.text().unwrap();
    assert!(
        (400..500).contains(&st) && body.contains("virtiofs"),
        "{st} {body}"
    );
    // A restart kills the VM; the new one continues from the host directory.
    assert_eq!(
        s.post("/v1/functions/vm-pers/runtime/restart", "").status(),
        200
    );
    let (v, h2) = s.invoke_ok("vm-pers", &json!({}));
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "true");
    assert_ne!(hdr(&h2, "x-skiff-instance"), hdr(&h, "x-skiff-instance"));
    assert_eq!(v["n"], 43, "{v}");
}

/// `runtime: http` in a microVM: the native tier's proxy contract, over the agent's tunnel;
/// then a `checkpointed` copy whose every cold start is a restored VM with its server already
/// listening.
#[test]
fn microvm_runs_an_http_server_function_and_restores_it_from_a_checkpoint() {
    let Some(s) = server() else { return };
    let f = microvm_variant("fx-http", "vm-fx-http", &[]);
    s.deploy(f.path());
    crate::http_runtime::assert_http_proxied(&s, "vm-fx-http");

    let f = microvm_variant(
        "fx-http",
        "vm-fx-http-ckpt",
        &[("mode", "checkpointed"), ("timeout", "30s")],
    );
    s.deploy(f.path());
    let count = |s: &Server| -> (Value, String) {
        let r = s
            .http
            .get(format!("{}/fn/vm-fx-http-ckpt/count", s.url))
            .send()
            .unwrap();
        let cold = hdr(r.headers(), "x-skiff-cold-start");
        assert_eq!(r.status().as_u16(), 200);
        (r.json().unwrap(), cold)
    };
    let (a, cold) = count(&s);
    assert_eq!(cold, "true");
    let (b, _) = count(&s);
    assert_eq!(
        b["count"].as_u64(),
        a["count"].as_u64().map(|n| n + 1),
        "{a} {b}"
    );
    assert_eq!(
        s.post("/v1/functions/vm-fx-http-ckpt/runtime/restart", "")
            .status(),
        200
    );
    // Restored: the server process of the snapshot (same pid), at the snapshot's count.
    let (c, cold) = count(&s);
    assert_eq!(cold, "true");
    assert_eq!(
        (c["pid"].clone(), c["count"].clone()),
        (a["pid"].clone(), a["count"].clone()),
        "{a} {c}"
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn microvm_checkpointed_restores_the_init_state_with_a_fresh_clock_and_rng() {
    let Some(s) = server() else { return };
    let f = python_function(
        "fx-vm-ckpt",
        "sandbox: microvm\nnetwork: none\nmode: checkpointed\ntimeout: 60s\n",
        COUNTER,
    );
    s.deploy(f.path());
    let (v, h) = s.invoke_ok("fx-vm-ckpt", &json!({}));
    assert_eq!(
        (v["count"].as_u64(), hdr(&h, "x-skiff-cold-start").as_str()),
        (Some(1), "true"),
        "{v}"
    );
    let first = v;
    assert_eq!(s.invoke_ok("fx-vm-ckpt", &json!({})).0["count"], 2);
    assert_eq!(s.invoke_ok("fx-vm-ckpt", &json!({})).0["count"], 3);
    let image = s.data_dir.join("snapshots/rev/default-fx-vm-ckpt-1");
    assert!(
        image.join("state").is_file(),
        "the revision snapshot is kept on disk"
    );
    std::thread::sleep(Duration::from_secs(2));
    // A new cold start restores the checkpoint (count 0 → 1), not the later state (3)...
    assert_eq!(
        s.post("/v1/functions/fx-vm-ckpt/runtime/restart", "")
            .status(),
        200
    );
    let (v, h) = s.invoke_ok("fx-vm-ckpt", &json!({}));
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    assert_eq!(v["count"], 1, "{v}");
    // ...the same init (same BOOT value: memory came from the snapshot)...
    assert_eq!(v["boot"], first["boot"], "{v} vs {first}");
    // ...but the guest's clock is today's, not the snapshot's, and its RNG was reseeded.
    let skew = (v["now"].as_f64().unwrap() - unix_now()).abs();
    assert!(skew < 1.5, "guest clock off by {skew:.1} s: {v}");
    assert_ne!(v["rand"], first["rand"], "same randomness after restore");
    let mut r = s.http.delete(format!("{}/v1/functions/fx-vm-ckpt", s.url));
    if let Some(k) = &s.key {
        r = r.bearer_auth(k);
    }
    assert_eq!(r.send().unwrap().status(), 204);
    assert!(!image.exists());
}

#[test]
fn microvm_branched_invocations_each_start_from_the_snapshot() {
    let Some(s) = server() else { return };
    let f = python_function(
        "fx-vm-br",
        "sandbox: microvm\nnetwork: none\nmode: branched\ntimeout: 60s\n",
        COUNTER,
    );
    s.deploy(f.path());
    let (a, _) = s.invoke_ok("fx-vm-br", &json!({}));
    let (b, _) = s.invoke_ok("fx-vm-br", &json!({}));
    assert_eq!(
        (a["count"].as_u64(), b["count"].as_u64()),
        (Some(1), Some(1)),
        "{a} {b}"
    );
    assert_eq!(a["boot"], b["boot"], "both branches come from one snapshot");
    assert_ne!(a["rand"], b["rand"], "branches share their randomness");
}

#[test]
fn microvm_snapshot_of_a_warm_instance_forks_branches_and_keeps_it_running() {
    let Some(s) = server() else { return };
    let f = python_function(
        "fx-vm-snap",
        "sandbox: microvm\nnetwork: none\ntimeout: 60s\nscale: {idle: 10m}\n",
        COUNTER,
    );
    s.deploy(f.path());
    assert_eq!(s.invoke_ok("fx-vm-snap", &json!({})).0["count"], 1);
    assert_eq!(s.invoke_ok("fx-vm-snap", &json!({})).0["count"], 2);
    let r = s.post("/v1/functions/fx-vm-snap/snapshots", "");
    assert_eq!(r.status(), 201);
    let snap: Value = r.json().unwrap();
    let id = snap["id"].as_str().unwrap().to_string();
    assert!(snap["size_bytes"].as_u64().unwrap() > 0, "{snap}");
    // The snapshotted VM continues where it was.
    let (v, h) = s.invoke_ok("fx-vm-snap", &json!({}));
    assert_eq!(
        (v["count"].as_u64(), hdr(&h, "x-skiff-cold-start").as_str()),
        (Some(3), "false")
    );
    let r = s.post(
        &format!("/v1/snapshots/{id}/fork"),
        json!({"count": 2}).to_string(),
    );
    assert_eq!(r.status(), 201);
    let forked: Value = r.json().unwrap();
    let ids: Vec<String> = forked["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{forked}");
    // Each branch resumes the snapshot: two invocations had run, so this is the third.
    let mut rands = vec![];
    for b in &ids {
        let r = s.post(&format!("/v1/branches/{b}/invoke"), "{}");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        assert_eq!(v["count"], 3, "branch {b}: {v}");
        rands.push(v["rand"].clone());
    }
    assert_ne!(rands[0], rands[1], "branches share their randomness");
    let mut r = s.http.delete(format!("{}/v1/snapshots/{id}", s.url));
    if let Some(k) = &s.key {
        r = r.bearer_auth(k);
    }
    assert_eq!(r.send().unwrap().status(), 204);
    assert_eq!(s.invoke_ok("fx-vm-snap", &json!({})).0["count"], 4);
}
