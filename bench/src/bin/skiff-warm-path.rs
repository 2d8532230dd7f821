//! `skiff-warm-path`: the warm invoke path through the gateway against the gateway's own floor,
//! in one run: `GET /health`, a js warm invoke (`examples/js-hello`) and, when the compiled
//! `provided` example is built, a `provided` warm invoke — interleaved in blocks over one
//! keep-alive connection each, so every path sees the same machine load.
//!
//! Usage: `bench/warm-path.sh [--n 2000] [--block 100] [--no-provided]`, or against a running
//! server: `skiff-warm-path --server 127.0.0.1:PORT` (functions must be deployed already under
//! the names `b-js-warm` / `b-provided-warm`; useful with `perf record -p`); `--server A,B`
//! measures several servers block by block under the same load (e.g. two builds).
//! Prints p50/p99 per path, the overhead of each invoke over the floor (p50 − p50 of
//! `/health`) and the load average.

use skiff_bench::{
    arg, connect, deploy, invoke, pct, release_bin, request, sorted, start_server, workspace_root,
};
use std::time::Instant;

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn opt(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n = arg("--n", 2000);
    let block = arg("--block", 100).max(1);
    let root = workspace_root();
    let skiff = release_bin("skiff");
    let bootstrap = release_bin("bootstrap");
    let tmp = std::env::temp_dir().join(format!("skiff-warm-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    let mut server = None;
    let addr = match opt("--server") {
        Some(a) => a,
        None => {
            assert!(
                skiff.exists(),
                "build first: cargo build --release -p skiff-cli"
            );
            let (child, addr) = start_server(&skiff, &tmp.join("data"));
            server = Some(child);
            // The js example under a fixed name.
            let js = tmp.join("js");
            std::fs::create_dir_all(&js).unwrap();
            std::fs::copy(root.join("examples/js-hello/index.js"), js.join("index.js")).unwrap();
            std::fs::write(
                js.join("function.yaml"),
                "name: b-js-warm\nruntime: js\nhandler: index.js\nmemory: 128Mi\ntimeout: 10s\nenv: {GREETING: Hello}\n",
            )
            .unwrap();
            deploy(&skiff, &addr, &js);
            if !flag("--no-provided") && bootstrap.exists() {
                let p = tmp.join("provided");
                std::fs::create_dir_all(&p).unwrap();
                std::fs::copy(&bootstrap, p.join("bootstrap")).unwrap();
                std::fs::write(
                    p.join("function.yaml"),
                    "name: b-provided-warm\nruntime: provided\nhandler: bootstrap\nmemory: 64Mi\ntimeout: 10s\nnetwork: none\n",
                )
                .unwrap();
                deploy(&skiff, &addr, &p);
            }
            if let Some(pid) = server.as_ref().map(|c| c.id()) {
                println!("server pid {pid} at {addr}");
            }
            addr
        }
    };
    let with_provided = !flag("--no-provided") && (opt("--server").is_some() || bootstrap.exists());

    // `--server A,B`: several servers measured side by side (block by block), e.g. two builds.
    let addrs: Vec<String> = addr.split(',').map(str::to_string).collect();
    let mut conns = Vec::new();
    for a in &addrs {
        conns.push([
            connect(a).await,
            connect(a).await,
            connect(a).await,
            connect(a).await,
        ]);
    }
    // Warm-up: start the instances, let the first calls pay their one-off costs.
    for (a, [h, j, e, p]) in addrs.iter().zip(conns.iter_mut()) {
        for i in 0..200 {
            let body = format!("{{\"name\":\"warm-{i}\"}}");
            invoke(j, a, "b-js-warm", body.as_bytes(), None).await;
            invoke(e, a, "b-js-warm", b"", None).await;
            if with_provided {
                invoke(p, a, "b-provided-warm", body.as_bytes(), None).await;
            }
            request(h, a, "GET", "/health", b"", false).await.unwrap();
        }
    }

    let load_before = loadavg();
    let mut health = vec![Vec::new(); addrs.len()];
    let mut js = vec![Vec::new(); addrs.len()];
    let mut js_empty = vec![Vec::new(); addrs.len()];
    let mut provided = vec![Vec::new(); addrs.len()];
    let mut i = 0;
    let mut done = 0;
    while done < n {
        let k = block.min(n - done);
        done += k;
        for (s, (a, [h, j, e, p])) in addrs.iter().zip(conns.iter_mut()).enumerate() {
            for _ in 0..k {
                let t = Instant::now();
                let r = request(h, a, "GET", "/health", b"", false).await.unwrap();
                health[s].push(t.elapsed().as_secs_f64() * 1e6);
                assert_eq!(r.status, 200);
            }
            for _ in 0..k {
                i += 1;
                let body = format!("{{\"name\":\"bench-{i}\"}}");
                let ms = invoke(j, a, "b-js-warm", body.as_bytes(), Some(false)).await;
                js[s].push(ms * 1e3);
            }
            for _ in 0..k {
                let ms = invoke(e, a, "b-js-warm", b"", Some(false)).await;
                js_empty[s].push(ms * 1e3);
            }
            if with_provided {
                for _ in 0..k {
                    i += 1;
                    let body = format!("{{\"name\":\"bench-{i}\"}}");
                    let ms = invoke(p, a, "b-provided-warm", body.as_bytes(), Some(false)).await;
                    provided[s].push(ms * 1e3);
                }
            }
        }
    }
    println!(
        "load average before: {load_before}; after: {}; {} cores",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("\n| path | n | p50 µs | p99 µs | p50 − floor µs |\n|---|---:|---:|---:|---:|");
    for s in 0..addrs.len() {
        let tag = if addrs.len() > 1 {
            format!("[{}] ", addrs[s])
        } else {
            String::new()
        };
        let h = sorted(std::mem::take(&mut health[s]));
        let floor = pct(&h, 0.5);
        let row = |what: &str, v: &[f64]| {
            println!(
                "| {tag}{what} | {} | {:.0} | {:.0} | {:.0} |",
                v.len(),
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 0.5) - floor
            );
        };
        row("floor: `GET /health`", &h);
        row(
            "warm invoke, js (`examples/js-hello`)",
            &sorted(std::mem::take(&mut js[s])),
        );
        row(
            "warm invoke, js, empty request body",
            &sorted(std::mem::take(&mut js_empty[s])),
        );
        if with_provided {
            row(
                "warm invoke, `provided` (`examples/provided-hello`)",
                &sorted(std::mem::take(&mut provided[s])),
            );
        }
    }
    if let Some(mut s) = server {
        if flag("--hold") {
            println!("holding the server; Ctrl-C to end");
            let _ = s.wait();
        }
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
