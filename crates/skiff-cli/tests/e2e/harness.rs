//! Test harness: starts the real `skiff` binary on a loopback port with its own data dir and
//! talks to it over HTTP, as a user would.

use reqwest::blocking::{Client, Response};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn skiff_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skiff")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

pub fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

/// The compiled `provided` example, staged as a deployable directory (built once per run).
pub fn provided_example() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile_dir = Path::new(skiff_bin()).parent().unwrap().to_path_buf();
        let bootstrap = profile_dir.join("bootstrap");
        if !bootstrap.exists() {
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "-p", "provided-hello"])
                .current_dir(repo_root());
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("cargo build provided-hello");
            assert!(st.success(), "building provided-hello failed");
        }
        let dir = std::env::temp_dir().join(format!("skiff-provided-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&bootstrap, dir.join("bootstrap")).unwrap();
        std::fs::copy(
            example("provided-hello/function.yaml"),
            dir.join("function.yaml"),
        )
        .unwrap();
        dir
    })
    .clone()
}

/// A running `skiff serve`.
pub struct Server {
    pub child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: Client,
    pub key: Option<String>,
}

impl Server {
    /// Starts a server with a fresh data dir.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, args);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        let mut cmd = Command::new(skiff_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args);
        Server::spawn(cmd, data_dir)
    }

    /// Starts a server from a prepared `skiff serve` command and waits until it listens.
    pub fn spawn(mut cmd: Command, data_dir: &Path) -> Server {
        let mut child = cmd
            .env_remove("SKIFF_API_KEYS")
            .env("RUST_LOG", "skiff=info,warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skiff serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            assert!(Instant::now() < deadline, "server did not start");
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Server {
            child: Some(child),
            url,
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            http,
            key: None,
        }
    }

    pub fn get(&self, path: &str) -> Response {
        let mut r = self.http.get(format!("{}{path}", self.url));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    }

    pub fn post(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> Response {
        let mut r = self.http.post(format!("{}{path}", self.url)).body(body);
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    }

    pub fn invoke(&self, name: &str, event: &Value) -> Response {
        self.post(
            &format!("/v1/functions/{name}/invoke"),
            serde_json::to_vec(event).unwrap(),
        )
    }

    /// Invokes and expects 200; returns the JSON result and the response headers.
    pub fn invoke_ok(&self, name: &str, event: &Value) -> (Value, reqwest::header::HeaderMap) {
        let r = self.invoke(name, event);
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().unwrap();
        assert_eq!(status, 200, "invoke {name} failed: {text}");
        (
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    /// Runs the `skiff` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(skiff_bin());
        cmd.args(args)
            .env("SKIFF_SERVER", &self.url)
            .env_remove("SKIFF_API_KEY");
        if let Some(k) = &self.key {
            cmd.env("SKIFF_API_KEY", k);
        }
        cmd.output().unwrap()
    }

    /// Deploys a directory with `skiff deploy` and asserts success.
    pub fn deploy(&self, dir: &Path) {
        let out = self.cli(&["deploy", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "deploy {} failed: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn healthy(&self) -> bool {
        self.http
            .get(format!("{}/health", self.url))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    }

    /// SIGKILLs the server (no graceful shutdown).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Header value as a string.
pub fn hdr(h: &reqwest::header::HeaderMap, k: &str) -> String {
    h.get(k)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The `error` object of a JSON error response, with the status.
pub fn error_of(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let v: Value = r.json().expect("error body is JSON");
    (status, v["error"].clone())
}

/// Processes whose cgroup membership mentions `needle` (e.g. an instance id prefix).
pub fn processes_in_cgroup(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            if cg.contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// A private copy of a fixture with some `function.yaml` top-level fields replaced or added,
/// e.g. `&[("name", "fx-probe-net"), ("network", "outbound")]`.
pub fn fixture_variant(name: &str, fields: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        }
    }
    let yaml = std::fs::read_to_string(tmp.path().join("function.yaml")).unwrap();
    let mut lines: Vec<String> = yaml
        .lines()
        .filter(|l| !fields.iter().any(|(k, _)| l.starts_with(&format!("{k}:"))))
        .map(str::to_string)
        .collect();
    lines.extend(fields.iter().map(|(k, v)| format!("{k}: {v}")));
    std::fs::write(tmp.path().join("function.yaml"), lines.join("\n") + "\n").unwrap();
    tmp
}

/// Python packages for host-side test clients (boto3, …), installed once with
/// `pip install --target target/pydeps/<name>`; returns the directory to put on PYTHONPATH.
pub fn python_deps(name: &str, requirements: &[&str]) -> PathBuf {
    let dir = repo_root().join("target/pydeps").join(name);
    let stamp = dir.join(".installed");
    let want = requirements.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(&dir)
        .args(requirements)
        .output()
        .expect("python3 -m pip (run scripts/setup.sh to install python3-pip)");
    assert!(
        out.status.success(),
        "pip install {want} failed (run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&stamp, want).unwrap();
    dir
}

/// A built Wasm guest fixture (`hello-http`, `echo-http`, `py-http`, `js-http`): built once
/// per run by `scripts/build-wasm-guests.sh`, which caches by input hash.
pub fn wasm_guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let out = repo_root().join("target/wasm-guests");
        let st = Command::new("bash")
            .arg(repo_root().join("scripts/build-wasm-guests.sh"))
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("run scripts/build-wasm-guests.sh");
        assert!(st.success(), "scripts/build-wasm-guests.sh failed");
        out
    });
    let file = dir.join(format!("{name}.wasm"));
    assert!(file.is_file(), "{} was not built", file.display());
    file
}

/// A function directory: `function.yaml` from `yaml` (after `name:`) and the file `guest`
/// copied in as `handler`.
pub fn wasm_function(name: &str, guest: &Path, handler: &str, yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("function.yaml"),
        format!("name: {name}\nruntime: wasm\nhandler: {handler}\n{yaml}"),
    )
    .unwrap();
    std::fs::copy(guest, dir.path().join(handler)).unwrap();
    dir
}

/// Whether gVisor's `runsc` is on PATH (the gVisor tier's tests are skipped without it).
pub fn runsc_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.join("runsc"))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A python3 function directory: `function.yaml` = `name`, `runtime: python3`,
/// `handler: main.handler` plus `yaml`; `main.py` = `code`.
pub fn python_function(name: &str, yaml: &str, code: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("function.yaml"),
        format!("name: {name}\nruntime: python3\nhandler: main.handler\n{yaml}"),
    )
    .unwrap();
    std::fs::write(dir.path().join("main.py"), code).unwrap();
    dir
}

/// Uploads `dir` as a revision through the API; returns the status and JSON body.
pub fn upload(
    s: &Server,
    name: &str,
    dir: &std::path::Path,
    promote: bool,
) -> (u16, serde_json::Value) {
    let pkg = skiff_store::Store::pack_dir(dir, |_| {}).unwrap();
    let r = s.post(
        &format!("/v1/functions/{name}/revisions?promote={promote}"),
        pkg,
    );
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}
