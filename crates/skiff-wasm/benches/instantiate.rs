//! Per-request cost of the Wasm tier's fast path, in process (no HTTP server, no gateway):
//! instantiating the hello `wasi:http` component in a fresh store from the shared
//! pre-instance, and a whole in-process request (store, instance, handler, body).
//!
//! `cargo bench -p skiff-wasm` after `scripts/build-wasm-guests.sh` (or with
//! `SKIFF_WASM_GUEST=/path/to/component.wasm`).

use http_body_util::BodyExt;
use skiff_core::protocol::ExecMode;
use skiff_core::FunctionSpec;
use skiff_sandbox::{BoxError, InstanceSpec, Sandbox};
use skiff_wasm::WasmSandbox;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn guest() -> PathBuf {
    std::env::var_os("SKIFF_WASM_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/wasm-guests/hello-http.wasm")
        })
}

fn summary(name: &str, mut t: Vec<Duration>) {
    t.sort();
    let q = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
    println!(
        "{name:<34} n={:<6} p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}",
        t.len(),
        q(0.5),
        q(0.9),
        q(0.99)
    );
}

fn main() {
    // `cargo test --all-targets` builds benches too; only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let path = guest();
    assert!(
        path.is_file(),
        "build it first: scripts/build-wasm-guests.sh ({})",
        path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&path, dir.path().join("g.wasm")).unwrap();
    let spec = FunctionSpec::from_yaml("name: b\nruntime: wasm\nhandler: g.wasm\n").unwrap();
    let ispec = InstanceSpec {
        instance_id: "b-1".into(),
        function: "b".into(),
        revision: 1,
        spec,
        code_dir: dir.path().to_path_buf(),
        env: vec![],
        exec_mode: ExecMode::Http,
        argv: vec![],
        rootfs: None,
        workspace: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tier = WasmSandbox::default();
        tier.bench_instantiate(ispec.clone(), 2000).await.unwrap();
        summary(
            "instantiate (fresh store)",
            tier.bench_instantiate(ispec.clone(), 20000).await.unwrap(),
        );
        let inst = tier.start(ispec).await.unwrap();
        let mut times = Vec::with_capacity(20000);
        for i in 0..22000 {
            let req = http::Request::builder()
                .uri("http://localhost/")
                .body(
                    http_body_util::Empty::<bytes::Bytes>::new()
                        .map_err(|e| -> BoxError { match e {} })
                        .boxed_unsync(),
                )
                .unwrap();
            let t0 = Instant::now();
            let resp = inst.serve_http(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let dt = t0.elapsed();
            assert!(!body.is_empty());
            if i >= 2000 {
                times.push(dt);
            }
        }
        summary("request in process (serve_http)", times);
    });
}
