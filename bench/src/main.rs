//! `skiff-bench`: starts the release `skiff` server on a temporary data dir, deploys the
//! examples and measures, in one run on one machine:
//! - warm invoke latency through the gateway (keep-alive HTTP/1.1, sequential);
//! - cold start through the gateway (`mode: ephemeral` gives every call a fresh sandbox);
//! - warm HTTP triggers (`/fn/`) without and with a route policy, interleaved;
//! - raw floors: `unshare --pid --fork --mount --net --ipc --uts BIN` and a plain fork+exec.
//!
//! Usage: `bench/run.sh` (builds release and runs this). Prints a Markdown table.

use skiff_bench::{arg, deploy, release_bin, start_server, workspace_root};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Route policy of the `b-http-policy` function: two routes, CORS, bearer auth
/// (`printf %s bench-token | sha256sum`) and a rate limit too high to trigger.
const BENCH_ROUTES: &str = "[{path_prefix: /api, methods: [GET, POST], \
    cors: {allow_origins: ['https://app.test'], allow_headers: [authorization], max_age: 600}, \
    auth: {type: bearer, tokens_sha256: [7137e16f75a1d75b6fd65930672814806cdc1a0d6e0aa38611afc996a402258b]}, \
    rate_limit: {rps: 1000000, burst: 1000000}}, {path_prefix: /health, methods: [GET]}]";

/// Minimal keep-alive HTTP/1.1 client, so client overhead stays out of the figures.
struct Conn {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    fn new(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        Conn {
            stream: BufReader::new(s),
            host: addr.to_string(),
        }
    }

    /// POSTs and returns (status, headers text, body).
    fn post(&mut self, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        self.request("POST", path, body)
    }

    /// Sends one request and returns (status, headers text, body).
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        self.request_with(method, path, "", body)
    }

    /// [`Conn::request`] with extra header lines (each ending in `\r\n`).
    fn request_with(
        &mut self,
        method: &str,
        path: &str,
        extra: &str,
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut headers = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            headers.push_str(&line);
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).unwrap();
        (status, headers, body)
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    n: usize,
}

fn stats(mut us: Vec<f64>) -> Stats {
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = us.len();
    let pct = |p: f64| us[((n as f64 * p).ceil() as usize).clamp(1, n) - 1];
    Stats {
        p50: pct(0.50),
        p99: pct(0.99),
        mean: us.iter().sum::<f64>() / n as f64,
        n,
    }
}

fn time_command(n: usize, mut make: impl FnMut() -> Command) -> Stats {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = make();
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let t = Instant::now();
        let st = c.status().expect("spawn");
        v.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(st.success(), "{c:?} failed");
    }
    stats(v)
}

/// Copies a function dir, rewriting `name:` and adding extra spec lines.
fn variant(src: &Path, dst: &Path, name: &str, extra: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        if e.file_type().unwrap().is_file() && e.file_name() != "function.yaml" {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let yaml = std::fs::read_to_string(src.join("function.yaml")).unwrap();
    let mut out: String = yaml
        .lines()
        .filter(|l| {
            !l.starts_with("name:") && !l.starts_with("mode:") && !l.starts_with("network:")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("name: {name}\n{extra}"));
    std::fs::write(dst.join("function.yaml"), out).unwrap();
}

fn measure(conn: &mut Conn, name: &str, n: usize, expect_cold: bool, pause: Duration) -> Stats {
    let path = format!("/v1/functions/{name}/invoke");
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        std::thread::sleep(pause);
        let body = format!("{{\"name\":\"bench-{i}\"}}");
        let t = Instant::now();
        let (status, headers, resp) = conn.post(&path, body.as_bytes());
        v.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&resp));
        let cold = headers.contains("x-skiff-cold-start: true");
        assert_eq!(cold, expect_cold, "{name} call {i}: cold={cold}");
    }
    stats(v)
}

fn row(what: &str, s: &Stats) {
    println!(
        "| {what} | {} | {:.0} | {:.0} | {:.0} |",
        s.n, s.p50, s.p99, s.mean
    );
}

fn main() {
    let root = workspace_root();
    let skiff = release_bin("skiff");
    let bootstrap = release_bin("bootstrap");
    assert!(
        skiff.exists() && bootstrap.exists(),
        "build first: cargo build --release -p skiff-cli -p provided-hello"
    );
    let warm_n = arg("--warm", 2000);
    let cold_n = arg("--cold", 200);
    let tmp = std::env::temp_dir().join(format!("skiff-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    // Stage the compiled example.
    let provided = tmp.join("provided");
    std::fs::create_dir_all(&provided).unwrap();
    std::fs::copy(&bootstrap, provided.join("bootstrap")).unwrap();
    std::fs::copy(
        root.join("examples/provided-hello/function.yaml"),
        provided.join("function.yaml"),
    )
    .unwrap();
    let python = root.join("examples/python-hello");
    let js = root.join("examples/js-hello");
    let wasm = root.join("examples/wasm-hello");
    let fns = [
        ("b-provided", &provided, "network: none\n", false),
        (
            "b-provided-cold",
            &provided,
            "network: none\nmode: ephemeral\n",
            true,
        ),
        ("b-python", &python, "network: none\n", false),
        (
            "b-python-cold",
            &python,
            "network: none\nmode: ephemeral\n",
            true,
        ),
        (
            "b-provided-net-cold",
            &provided,
            "network: outbound\nmode: ephemeral\n",
            true,
        ),
        ("b-js", &js, "", false),
        ("b-js-cold", &js, "mode: ephemeral\n", true),
        ("b-wasm", &wasm, "", false),
        ("b-wasm-cold", &wasm, "mode: ephemeral\n", true),
    ];
    let (mut server, addr) = start_server(&skiff, &tmp.join("data"));
    for (name, src, extra, _) in &fns {
        let dir = tmp.join(name);
        variant(src, &dir, name, extra);
        deploy(&skiff, &addr, &dir);
    }
    // The same function behind HTTP triggers, without and with a route policy.
    for (name, extra) in [
        ("b-http-open", "network: none\n".to_string()),
        (
            "b-http-policy",
            format!("network: none\nroutes: {BENCH_ROUTES}\n"),
        ),
    ] {
        let dir = tmp.join(name);
        variant(&provided, &dir, name, &extra);
        deploy(&skiff, &addr, &dir);
    }
    println!("| path | n | p50 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|---|");
    // Raw floors, same binary the provided example uses (it exits at once with --exit).
    let floor_fork = time_command(cold_n, || {
        let mut c = Command::new(&bootstrap);
        c.arg("--exit");
        c
    });
    row("floor: fork+exec of the bootstrap binary", &floor_fork);
    let floor_unshare = time_command(cold_n, || {
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--mount", "--net", "--ipc", "--uts"])
            .arg(&bootstrap)
            .arg("--exit");
        c
    });
    row(
        "floor: unshare --pid --fork --mount --net --ipc --uts bootstrap",
        &floor_unshare,
    );
    let mut conn = Conn::new(&addr);
    // HTTP floor: the same client and server, no function.
    let health = {
        let mut v = Vec::with_capacity(warm_n);
        for _ in 0..warm_n {
            let t = Instant::now();
            let (status, _, _) = conn.request("GET", "/health", b"");
            v.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(status, 200);
        }
        stats(v)
    };
    row(
        "floor: GET /health through the gateway (HTTP round trip)",
        &health,
    );
    let mut results = Vec::new();
    for (name, _, _, cold) in &fns {
        let n = if *cold { cold_n } else { warm_n };
        if !cold {
            // First call is the cold start; then warm up.
            let _ = conn.post(&format!("/v1/functions/{name}/invoke"), b"{}");
            for _ in 0..50 {
                let _ = conn.post(&format!("/v1/functions/{name}/invoke"), b"{}");
            }
        }
        let n = if name.contains("python-cold") {
            n.min(100)
        } else {
            n
        };
        let s = measure(&mut conn, name, n, *cold, Duration::ZERO);
        let label = match *name {
            "b-provided" => "warm invoke, provided (compiled) example",
            "b-provided-cold" => "cold start, provided example (network none)",
            "b-python" => "warm invoke, python example",
            "b-python-cold" => "cold start, python example (network none)",
            "b-js" => "warm invoke, js example (QuickJS isolate)",
            "b-js-cold" => "cold start, js example (new isolate + module + call)",
            "b-wasm" => "warm invoke, wasm example (fresh Wasmtime store per call)",
            "b-wasm-cold" => "cold start, wasm example (new instance, module cached)",
            _ => "cold start, provided example (network outbound, slirp4netns)",
        };
        row(label, &s);
        results.push((name.to_string(), s));
        // Let ephemeral instances finish tearing down between series.
        std::thread::sleep(Duration::from_millis(300));
    }
    // The same warm function through the Lambda Invoke API (what boto3 calls).
    {
        let path = "/2015-03-31/functions/b-provided/invocations";
        let mut v = Vec::with_capacity(warm_n);
        for i in 0..warm_n {
            let body = format!("{{\"name\":\"bench-{i}\"}}");
            let t = Instant::now();
            let (status, headers, resp) = conn.post(path, body.as_bytes());
            v.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(
                status,
                200,
                "lambda api: {}",
                String::from_utf8_lossy(&resp)
            );
            assert!(headers.contains("x-amz-executed-version: 1"), "{headers}");
        }
        row(
            "warm invoke, provided, via the Lambda Invoke API",
            &stats(v),
        );
    }
    // HTTP triggers without and with a route policy, interleaved so drift hits both alike.
    // Both get the same request (CORS origin and bearer token), so only the policy differs.
    {
        let extra = "Origin: https://app.test\r\nAuthorization: Bearer bench-token\r\n";
        let paths = ["/fn/b-http-open/api/items", "/fn/b-http-policy/api/items"];
        for path in paths {
            for _ in 0..50 {
                let _ = conn.request_with("GET", path, extra, b"");
            }
        }
        // The policy is really applied: CORS headers with the token, 401 without.
        let (_, headers, _) = conn.request_with("GET", paths[1], extra, b"");
        assert!(
            headers.contains("access-control-allow-origin: https://app.test"),
            "{headers}"
        );
        let (status, _, _) = conn.request("GET", paths[1], b"");
        assert_eq!(status, 401);
        let mut samples = [Vec::with_capacity(warm_n), Vec::with_capacity(warm_n)];
        let mut diffs = Vec::with_capacity(warm_n);
        for i in 0..warm_n {
            // Alternate which goes first, so neither always follows the other.
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut pair = [0.0; 2];
            for k in order {
                let t = Instant::now();
                let (status, headers, resp) = conn.request_with("GET", paths[k], extra, b"");
                pair[k] = t.elapsed().as_secs_f64() * 1e6;
                assert_eq!(
                    status,
                    200,
                    "{}: {}",
                    paths[k],
                    String::from_utf8_lossy(&resp)
                );
                assert!(headers.contains("x-skiff-cold-start: false"), "{headers}");
            }
            samples[0].push(pair[0]);
            samples[1].push(pair[1]);
            diffs.push(pair[1] - pair[0]);
        }
        diffs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let paired_median = diffs[diffs.len() / 2];
        let [open, policy] = samples.map(stats);
        row("warm HTTP trigger (/fn/), provided, no route policy", &open);
        row(
            "warm HTTP trigger (/fn/), provided, route policy (2 routes, CORS, bearer auth, rate limit)",
            &policy,
        );
        println!(
            "route policy cost: p50 {:+.1} µs, median of paired differences {:+.1} µs (budget ≤ 20 µs p50)",
            policy.p50 - open.p50,
            paired_median
        );
    }
    // Cold starts on a host that was idle for a moment (no back-to-back warm-up effects).
    let idle = measure(
        &mut conn,
        "b-provided-cold",
        cold_n.min(100),
        true,
        Duration::from_millis(100),
    );
    row(
        "cold start, provided example, each after 100 ms idle",
        &idle,
    );
    let idle_py = measure(
        &mut conn,
        "b-python-cold",
        cold_n.min(50),
        true,
        Duration::from_millis(100),
    );
    row(
        "cold start, python example, each after 100 ms idle",
        &idle_py,
    );
    // Memory of idle warm instances (whole sandbox: agent + runtime process).
    for name in ["b-provided", "b-python"] {
        let (_, _, body) = conn.request("GET", &format!("/v1/functions/{name}/runtime"), b"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if let Some(m) = v["instances"][0]["memory_bytes"].as_u64() {
            println!(
                "idle warm instance memory ({name}, cgroup usage incl. page cache): {:.1} MiB",
                m as f64 / 1048576.0
            );
        }
    }
    let cold = &results
        .iter()
        .find(|(n, _)| n == "b-provided-cold")
        .unwrap()
        .1;
    println!();
    println!(
        "cold provided p50 / unshare floor p50 = {:.2}x; budget 1.5x floor + 10 ms = {:.0} µs → {}",
        cold.p50 / floor_unshare.p50,
        1.5 * floor_unshare.p50 + 10_000.0,
        if cold.p50 <= 1.5 * floor_unshare.p50 + 10_000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let warm = &results.iter().find(|(n, _)| n == "b-provided").unwrap().1;
    println!(
        "warm provided p50 = {:.0} µs (target ≤ 1000 µs) → {}",
        warm.p50,
        if warm.p50 <= 1000.0 { "met" } else { "NOT met" }
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}
