//! `skiff-js-load`: the JS tier under many in-flight invocations, against the real release
//! `skiff serve` over loopback HTTP.
//!
//! 1. Latency: a js function's warm invoke (sequential, keep-alive) and cold start
//!    (`mode: ephemeral`: new isolate + module from cached bytecode + call) p50/p99 through the
//!    gateway, and an idle isolate's heap (`memory_bytes` of `/v1/functions/{name}/runtime`).
//! 2. Concurrency: `--n` (default 10,000) concurrent requests, one connection each, to a
//!    function whose handler awaits a 1 s `setTimeout`, served by ONE instance
//!    (`concurrency: 10000`, `scale.max: 1`). Reports errors, wall time, p50/p99 latency, the
//!    server's RSS (VmRSS before / peak during / after, VmHWM) and memory per in-flight
//!    invocation.
//!
//! Usage: `bench/js-concurrency.sh [--n 10000] [--warm 2000] [--cold 200]`.

use skiff_bench::{arg, deploy, header, pct, raise_nofile, request, start_server};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

fn function(root: &Path, name: &str, yaml: &str, source: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("function.yaml"),
        format!("name: {name}\nruntime: js\nhandler: index.js\n{yaml}"),
    )
    .unwrap();
    std::fs::write(dir.join("index.js"), source).unwrap();
    dir
}

/// `VmRSS` and `VmHWM` of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `GET /v1/functions/{name}/runtime` (its instances), or `null`.
async fn runtime(addr: &str, name: &str) -> serde_json::Value {
    let mut conn = tokio::io::BufReader::new(TcpStream::connect(addr).await.unwrap());
    let path = format!("/v1/functions/{name}/runtime");
    let r = request(&mut conn, addr, "GET", &path, b"", true)
        .await
        .unwrap();
    serde_json::from_slice(&r.body).unwrap_or_default()
}

/// Sequential keep-alive invokes of `name`; latencies in µs (sorted).
async fn sequential(addr: &str, name: &str, n: usize, expect_cold: bool) -> Vec<f64> {
    let mut conn = tokio::io::BufReader::new(TcpStream::connect(addr).await.unwrap());
    conn.get_ref().set_nodelay(true).unwrap();
    let path = format!("/v1/functions/{name}/invoke");
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("{{\"name\":\"bench-{i}\"}}");
        let t = Instant::now();
        let r = request(&mut conn, addr, "POST", &path, body.as_bytes(), false)
            .await
            .unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let cold = header(&r.headers, "x-skiff-cold-start") == Some("true");
        assert_eq!(cold, expect_cold, "{name} call {i}");
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = arg("--n", 10_000);
    let warm_n = arg("--warm", 2000);
    let cold_n = arg("--cold", 200);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let skiff = root.join("target/release/skiff");
    assert!(
        skiff.exists(),
        "build first: cargo build --release -p skiff-cli"
    );
    let nofile = raise_nofile();
    println!(
        "client open-file limit: {nofile}; machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if nofile < n as u64 + 64 {
        eprintln!("warning: the open-file limit {nofile} is below --n {n}; expect errors");
    }
    let tmp = std::env::temp_dir().join(format!("skiff-js-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (mut server, addr) = start_server(&skiff, &tmp.join("data"));
    let pid = server.id();
    let hello = "export default async (req) => ({ message: `Hello, ${req.name}!` });";
    deploy(&skiff, &addr, &function(&tmp, "b-js-warm", "", hello));
    deploy(
        &skiff,
        &addr,
        &function(&tmp, "b-js-cold", "mode: ephemeral\n", hello),
    );
    deploy(
        &skiff,
        &addr,
        &function(
            &tmp,
            "b-js-wait",
            "concurrency: 10000\nscale: {max: 1}\nmemory: 512Mi\ntimeout: 30s\n",
            "export default async (req) => { await new Promise((r) => setTimeout(r, 1000)); return req.i; };",
        ),
    );

    // 1. Latency through the gateway.
    sequential(&addr, "b-js-warm", 1, true).await;
    let warm = sequential(&addr, "b-js-warm", warm_n, false).await;
    let cold = sequential(&addr, "b-js-cold", cold_n, true).await;
    let rt = runtime(&addr, "b-js-warm").await;
    let idle = rt["instances"][0]["memory_bytes"].as_u64().unwrap_or(0);
    println!("\n| path | n | p50 µs | p99 µs |\n|---|---:|---:|---:|");
    println!(
        "| warm invoke, js, `/v1/functions/{{name}}/invoke` (keep-alive) | {} | {:.0} | {:.0} |",
        warm.len(),
        pct(&warm, 0.5),
        pct(&warm, 0.99)
    );
    println!(
        "| cold start, js, `mode: ephemeral` (new isolate + module + call) | {} | {:.0} | {:.0} |",
        cold.len(),
        pct(&cold, 0.5),
        pct(&cold, 0.99)
    );
    println!(
        "idle isolate heap (QuickJS malloc_size): {:.0} KiB",
        idle as f64 / 1024.0
    );

    // 2. Many in flight on one instance.
    sequential(&addr, "b-js-wait", 1, true).await; // start the instance
    let rounds = arg("--rounds", 2);
    let mut failed = false;
    for round in 1..=rounds {
        println!("\nround {round} of {rounds}:");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss_before, _) = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(rss_before));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid).0, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        // All connections are opened first (paced: the listener's accept queue is finite and the
        // accept loop shares two cores with the isolate), then every request is sent at once.
        let connecting = Arc::new(tokio::sync::Semaphore::new(64));
        let go = Arc::new(tokio::sync::Notify::new());
        let released = Arc::new(AtomicBool::new(false));
        let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let in_flight = Arc::new(AtomicU64::new(0));
        let max_in_flight = Arc::new(AtomicU64::new(0));
        let tc = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let addr = addr.clone();
                let connecting = connecting.clone();
                let (go, released, connected) =
                    (go.clone(), released.clone(), connected_tx.clone());
                let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
                tokio::spawn(async move {
                    let permit = connecting.acquire_owned().await.unwrap();
                    let s = TcpStream::connect(&addr).await;
                    drop(permit);
                    let _ = connected.send(());
                    let s = s.map_err(|e| format!("connect: {e}"))?;
                    s.set_nodelay(true).ok();
                    let mut conn = tokio::io::BufReader::new(s);
                    let wait = go.notified();
                    if !released.load(Ordering::SeqCst) {
                        wait.await;
                    }
                    let t = Instant::now();
                    let body = format!("{{\"i\":{i}}}");
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    let r = request(
                        &mut conn,
                        &addr,
                        "POST",
                        "/v1/functions/b-js-wait/invoke",
                        body.as_bytes(),
                        true,
                    )
                    .await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let r = r.map_err(|e| format!("request: {e}"))?;
                    let took = t.elapsed();
                    if r.status != 200 || r.body != i.to_string().as_bytes() {
                        return Err(format!(
                            "status {}: {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ));
                    }
                    let inst = header(&r.headers, "x-skiff-instance")
                        .unwrap_or("")
                        .to_string();
                    Ok::<_, String>((took, inst))
                })
            })
            .collect();
        drop(connected_tx);
        for _ in 0..n {
            connected_rx.recv().await;
        }
        let connect_time = tc.elapsed();
        // Give the server's accept loop a moment to take the last connections off the queue.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss_connected, _) = rss_kib(pid);
        let t0 = Instant::now();
        released.store(true, Ordering::SeqCst);
        go.notify_waiters();
        let mut lat = Vec::with_capacity(n);
        let mut errors = Vec::new();
        let mut instances = std::collections::BTreeSet::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok((d, inst)) => {
                    lat.push(d.as_secs_f64() * 1e3);
                    instances.insert(inst);
                }
                Err(e) => errors.push(e),
            }
        }
        let wall = t0.elapsed();
        sampling.store(false, Ordering::Relaxed);
        sampler.join().unwrap();
        let peak = peak.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss_after, hwm) = rss_kib(pid);
        lat.sort_by(|a, b| a.total_cmp(b));
        println!("\n{n} concurrent requests, handler awaits setTimeout(1000), one instance:");
        println!("- errors: {}", errors.len());
        for e in errors.iter().take(5) {
            println!("  e.g. {e}");
        }
        println!("- instances used: {}", instances.len());
        println!(
            "- connections opened first in {:.2} s; requests in flight at once (client side): {}",
            connect_time.as_secs_f64(),
            max_in_flight.load(Ordering::SeqCst)
        );
        println!("- wall time: {:.3} s", wall.as_secs_f64());
        println!(
            "- latency ms: p50 {:.0}, p99 {:.0}, max {:.0}",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
        println!(
            "- server RSS MiB: before {:.1}, with {n} idle connections {:.1}, peak during {:.1}, after (2 s later) {:.1}, VmHWM {:.1}",
            rss_before as f64 / 1024.0,
            rss_connected as f64 / 1024.0,
            peak as f64 / 1024.0,
            rss_after as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        println!(
            "- memory per in-flight invocation: (peak − before) / n = {:.1} KiB, of which the open connection accounts for (connected − before) / n = {:.1} KiB",
            peak.saturating_sub(rss_before) as f64 / n as f64,
            rss_connected.saturating_sub(rss_before) as f64 / n as f64
        );
        let rt = runtime(&addr, "b-js-wait").await;
        println!("- the instance after the round: {}", rt["instances"][0]);
        failed |= !errors.is_empty();
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&tmp);
    if failed {
        std::process::exit(1);
    }
}
