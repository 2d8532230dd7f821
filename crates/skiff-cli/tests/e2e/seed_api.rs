//! The seed-compatible ad-hoc invoke API: `POST /functions/{id}/invoke` with a
//! `SandboxConfig`, answered by an `InvocationResult`; `.env` / `FAAS_*` configuration.

use crate::harness::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Posts a `SandboxConfig`; returns the status and the JSON reply.
fn call(s: &Server, config: &Value) -> (u16, Value) {
    let r = s.post(
        "/functions/fn-1/invoke",
        serde_json::to_vec(config).unwrap(),
    );
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

/// Posts a `SandboxConfig` and expects a 200 `InvocationResult`: (stdout, logs, error).
fn run(s: &Server, config: Value) -> (Vec<u8>, String, Option<String>) {
    let (status, v) = call(s, &config);
    assert_eq!(status, 200, "{config}: {v}");
    assert!(
        v["request_id"].as_str().is_some_and(|id| id.len() == 36),
        "{v}"
    );
    let dec = |k: &str| B64.decode(v[k].as_str().unwrap()).unwrap();
    let logs = String::from_utf8_lossy(&dec("logs_base64")).into_owned();
    (
        dec("response_base64"),
        logs,
        v["error"].as_str().map(str::to_string),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn py(code: &str) -> Value {
    json!(["/usr/bin/python3", "-c", code])
}

/// A world-readable file on the host outside anything a sandbox sees.
fn host_marker() -> PathBuf {
    let p = repo_root()
        .join("target")
        .join(format!("seed-marker-{}", std::process::id()));
    std::fs::write(&p, "host secret").unwrap();
    p
}

#[test]
fn seed_invoke_runs_argv_in_fresh_sandboxes() {
    let s = Server::start();
    // Binary payload round-trips byte-exact through stdin and stdout.
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let (status, v) = call(
        &s,
        &json!({"image": "", "command": ["cat"], "payload_base64": B64.encode(&payload)}),
    );
    assert_eq!((status, &v["error"]), (200, &Value::Null), "{v}");
    let out = B64.decode(v["response_base64"].as_str().unwrap()).unwrap();
    assert!(out == payload, "cat echoed {} bytes", out.len());
    let logs = B64.decode(v["logs_base64"].as_str().unwrap()).unwrap();
    assert!(logs == payload, "logs hold stdout");
    // No payload at all: empty stdin.
    let (out, _, err) = run(&s, json!({"command": ["cat"]}));
    assert_eq!((out.len(), err), (0, None));

    // env_vars are the command's environment (values may contain `=`); nothing from the host.
    let (out, _, _) = run(
        &s,
        json!({"image": "host", "command": ["env"], "env_vars": ["GREETING=hi=there", "EMPTY="]}),
    );
    let env = text(&out);
    assert!(env.lines().any(|l| l == "GREETING=hi=there"), "{env}");
    assert!(env.lines().any(|l| l == "EMPTY="), "{env}");
    assert!(
        !env.contains("SKIFF_DATA_DIR") && !env.contains("RUST_LOG"),
        "{env}"
    );

    // argv is executed directly and the payload is only ever data on stdin.
    let (out, _, _) = run(
        &s,
        json!({"command": ["echo", "$(id)", ";", "ls", "`id`"],
               "payload_base64": B64.encode("$(touch /tmp/pwned); rm -rf /")}),
    );
    assert_eq!(text(&out), "$(id) ; ls `id`\n");
    let (out, _, _) = run(
        &s,
        json!({"command": ["cat"], "payload_base64": B64.encode("$(touch /tmp/pwned)")}),
    );
    assert_eq!(text(&out), "$(touch /tmp/pwned)");

    // Non-zero exit: 200 with the error text, stderr (and stdout) in the logs.
    let (out, logs, err) = run(
        &s,
        json!({"command": py("import sys; print('partial'); sys.stderr.write('boom on stderr\\n'); sys.exit(3)")}),
    );
    assert_eq!(
        err.as_deref(),
        Some("Command exited with non-zero status: 3")
    );
    assert!(out.is_empty());
    assert!(
        logs.contains("boom on stderr") && logs.contains("partial"),
        "{logs}"
    );
    // stderr of a successful command is in the logs, after stdout.
    let (out, logs, err) = run(
        &s,
        json!({"command": py("import sys; print('out'); sys.stderr.write('err-line\\n')")}),
    );
    assert_eq!((text(&out).as_str(), err), ("out\n", None));
    assert_eq!(logs, "out\nerr-line\n");

    // Killed by a signal, timed out, program missing: 200 with a clear error.
    let (_, _, err) = run(
        &s,
        json!({"command": py("import os; os.kill(os.getpid(), 9)")}),
    );
    assert_eq!(err.as_deref(), Some("Command was killed by signal 9"));
    let (_, _, err) = run(&s, json!({"command": ["sleep", "10"], "timeout_secs": 1}));
    assert_eq!(err.as_deref(), Some("Task timed out after 1.00 seconds"));
    let (_, _, err) = run(&s, json!({"command": ["/no/such/program"]}));
    assert!(err.unwrap().contains("/no/such/program"));

    // Every call is a fresh sandbox: a new PID namespace (the command is PID 2, after the
    // agent) and a file written to /tmp is gone on the next call; the sandbox does not
    // outlive its call.
    let probe = py("import os; print(os.getpid(), os.path.exists('/tmp/left-behind')); open('/tmp/left-behind', 'w').write('x')");
    for _ in 0..3 {
        let (out, _, err) = run(&s, json!({"command": probe}));
        assert_eq!((text(&out).as_str(), err), ("2 False\n", None));
    }
    // memory_mb applies: 200 MiB does not fit in 64 MiB.
    let (_, _, err) = run(
        &s,
        json!({"command": py("b = bytearray(200 << 20); print(len(b))"), "memory_mb": 64}),
    );
    let err = err.expect("out of memory is an error");
    assert!(err.contains("memory"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let server_pid = s.child.as_ref().unwrap().id();
    assert!(
        processes_in_cgroup(&format!("s{server_pid}/_seed-")).is_empty(),
        "ad-hoc sandboxes are stopped after their call"
    );
}

#[test]
fn seed_invoke_rejects_bad_requests_naming_the_field() {
    let s = Server::start();
    for (body, field) in [
        (json!({}), "command"),
        (json!({"command": []}), "command"),
        (json!({"command": "cat"}), "command"),
        (json!({"command": ["cat", 7]}), "command"),
        (
            json!({"command": ["cat"], "env_vars": ["OK=1", "NOEQUALS"]}),
            "env_vars",
        ),
        (json!({"command": ["cat"], "env_vars": "A=1"}), "env_vars"),
        (
            json!({"command": ["cat"], "payload_base64": "not base64!"}),
            "payload_base64",
        ),
        (
            json!({"command": ["cat"], "image": "/no/such/rootfs"}),
            "image",
        ),
        (json!({"command": ["cat"], "image": "rel/dir"}), "image"),
        (json!({"command": ["cat"], "image": "/"}), "image"),
        (
            json!({"command": ["cat"], "memory_mb": 100000}),
            "memory_mb",
        ),
        (
            json!({"command": ["cat"], "timeout_secs": 0}),
            "timeout_secs",
        ),
    ] {
        let (status, v) = call(&s, &body);
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(msg.contains(field), "{body}: {msg:?} names {field}");
        assert_eq!(v["field"], field, "{v}");
    }
    let r = s.post("/functions/fn-1/invoke", "{\"command\": [");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
}

#[test]
fn seed_invoke_is_sandboxed() {
    let s = Server::start();
    let marker = host_marker();
    let (out, logs, err) = run(&s, json!({"command": ["cat", marker.to_str().unwrap()]}));
    assert!(
        err.is_some() && out.is_empty(),
        "host file visible: {}",
        text(&out)
    );
    assert!(logs.contains("No such file"), "{logs}");
    // Unprivileged, no network (only `lo`), cannot reach the host's loopback (the gateway).
    let port: u16 = s.url.rsplit(':').next().unwrap().parse().unwrap();
    let code = format!(
        r#"
import os, socket
print(os.getuid(), os.getgid())
print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('10.0.2.2', 80)]:
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(addr); print('connected', addr)
    except OSError as e:
        print('blocked', addr[0])
"#
    );
    let (out, _, err) = run(&s, json!({"command": py(&code)}));
    assert_eq!(err, None);
    assert_eq!(
        text(&out),
        "10001 10001\n['lo']\nblocked 127.0.0.1\nblocked 1.1.1.1\nblocked 10.0.2.2\n"
    );
    let _ = std::fs::remove_file(marker);
}

/// A tiny root image: `cat` and `env` with the libraries they link, plus a data file.
fn build_image(dir: &Path, host_file: &Path) {
    for bin in ["/usr/bin/cat", "/usr/bin/env"] {
        let out = Command::new("ldd").arg(bin).output().unwrap();
        let libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(PathBuf::from)
            .collect();
        for f in libs.iter().chain([&PathBuf::from(bin)]) {
            let dst = dir.join(f.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(f, &dst).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/hello.txt"), "from the image\n").unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/os-release"), "ID=seedimg\n").unwrap();
    // A symlink in the image must not pull a host file in.
    std::os::unix::fs::symlink(host_file, dir.join("etc/host-link")).unwrap();
}

fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        v.push(e.path().display().to_string());
        if e.file_type().unwrap().is_dir() {
            v.extend(tree(&e.path()));
        }
    }
    v.sort();
    v
}

#[test]
fn seed_invoke_on_a_rootfs_image() {
    let s = Server::start();
    let img = tempfile::tempdir().unwrap();
    let marker = host_marker();
    build_image(img.path(), &marker);
    let before = tree(img.path());
    let image = img.path().to_str().unwrap();

    let (out, _, err) = run(
        &s,
        json!({"image": image, "command": ["cat", "/data/hello.txt", "/etc/os-release"],
               "payload_base64": B64.encode("ignored")}),
    );
    assert_eq!(err, None);
    assert_eq!(text(&out), "from the image\nID=seedimg\n");
    // Payload through stdin works the same way.
    let (out, _, _) = run(
        &s,
        json!({"image": image, "command": ["/usr/bin/cat"], "payload_base64": B64.encode("img-echo")}),
    );
    assert_eq!(text(&out), "img-echo");
    // Only the image is the root: host programs, the host marker and a symlinked host file are
    // not visible; /proc, /tmp and the generated /etc/passwd are there.
    for path in [
        "/usr/bin/python3",
        marker.to_str().unwrap(),
        "/etc/host-link",
    ] {
        let (out, logs, err) = run(&s, json!({"image": image, "command": ["cat", path]}));
        assert!(
            err.is_some() && out.is_empty(),
            "{path} visible in the image sandbox: {}",
            text(&out)
        );
        assert!(logs.contains("No such file"), "{path}: {logs}");
    }
    let (out, _, err) = run(
        &s,
        json!({"image": image, "command": ["cat", "/proc/self/status", "/etc/passwd"]}),
    );
    assert_eq!(err, None);
    let out = text(&out);
    assert!(out.contains("Uid:\t10001"), "{out}");
    assert!(out.contains("sbx_user:x:10001"), "{out}");
    // Nothing was written into the image directory on the host.
    assert_eq!(tree(img.path()), before);
    let _ = std::fs::remove_file(marker);

    // FAAS_IMAGE_ROOT confines images to one directory.
    let confined = Server::start_with(&["--image-root", "/usr"]);
    let (status, v) = call(&confined, &json!({"image": image, "command": ["cat"]}));
    assert_eq!((status, &v["field"]), (400, &json!("image")), "{v}");
}

#[test]
fn seed_invoke_requires_the_api_key() {
    let key = "sk_seed_test_key";
    let mut s = Server::start_with(&["--api-key", key]);
    let (status, v) = call(&s, &json!({"command": ["cat"]}));
    assert_eq!(status, 401);
    assert!(v["error"].as_str().unwrap().contains("API key"), "{v}");
    s.key = Some("sk_wrong".into());
    let (status, v) = call(&s, &json!({"command": ["cat"]}));
    assert_eq!(status, 401, "{v}");
    s.key = Some(key.into());
    let (out, _, err) = run(
        &s,
        json!({"command": ["cat"], "payload_base64": B64.encode("ok")}),
    );
    assert_eq!((text(&out).as_str(), err), ("ok", None));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn seed_env_file_and_faas_variables() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "# seed-style configuration\nFAAS_GATEWAY_PORT={port}\nSKIFF_DATA_DIR={}\nFAAS_EXECUTOR_TYPE=kata\n",
            data.display()
        ),
    )
    .unwrap();
    let serve = || {
        let mut cmd = Command::new(skiff_bin());
        cmd.arg("serve")
            .current_dir(dir.path())
            .env_remove("SKIFF_LISTEN")
            .env_remove("SKIFF_DATA_DIR")
            .env_remove("FAAS_GATEWAY_PORT")
            .env_remove("FAAS_IMAGE_ROOT");
        cmd
    };
    // Values from the real environment win over `.env`.
    let mut cmd = serve();
    cmd.env("FAAS_EXECUTOR_TYPE", "native");
    let s = Server::spawn(cmd, &data);
    assert_eq!(s.url, format!("http://127.0.0.1:{port}"));
    assert!(data.join("skiff.db").exists(), "data dir from .env");
    let (out, _, err) = run(
        &s,
        json!({"command": ["cat"], "payload_base64": B64.encode("dotenv")}),
    );
    assert_eq!((text(&out).as_str(), err), ("dotenv", None));
    drop(s);

    // An unsupported executor from `.env` is a clear startup error.
    let out = serve()
        .env_remove("FAAS_EXECUTOR_TYPE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAAS_EXECUTOR_TYPE") && err.contains("kata") && err.contains("microvm"),
        "{err}"
    );
}
