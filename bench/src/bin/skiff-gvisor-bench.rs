//! `skiff-gvisor-bench`: the gVisor tier (`sandbox: gvisor`, runsc) against the real release
//! `skiff serve` over loopback HTTP, with baselines measured in the same run.
//!
//! 1. Cold start: a python3 function with `mode: ephemeral` (every invoke starts a new
//!    sandbox) through the gateway, interleaved with raw `runsc run` of the same OCI bundle
//!    (`GvisorSandbox::write_bundle`): the Config frame and one Invoke frame on a socketpair as
//!    the container's stdin, timed until the agent's `Done` frame.
//! 2. Snapshots: a function whose init sleeps 0.4 s, `mode: ephemeral` (plain cold start) vs
//!    `mode: branched` (every invoke restores the post-init snapshot); the first branched
//!    invoke also builds the snapshot.
//! 3. Warm invoke: sequential keep-alive invokes of a warm gVisor function, and of the same
//!    function on the native tier.
//! 4. `--conc` (default 100) concurrent invokes of a function with `concurrency: 1` whose
//!    handler sleeps 3 s: one gVisor sandbox each; errors, wall time and the memory of the
//!    instance cgroups (`memory.usage_in_bytes`) and the RSS of their processes.
//!
//! Usage: `bench/gvisor.sh [--cold 20] [--snap 15] [--warm 500] [--conc 100]`. Needs root
//! and runsc.

use skiff_bench::{
    arg, connect, deploy, header, invoke, median, pct, raise_nofile, request, sorted, start_server,
};
use skiff_core::protocol::{read_frame, Done, Frame, Invoke, Kind};
use skiff_core::FunctionSpec;
use skiff_sandbox::gvisor::{GvisorConfig, GvisorSandbox};
use skiff_sandbox::InstanceSpec;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const TRIVIAL: &str = "def handler(event, context):\n    return {\"ok\": True}\n";
const SLOW_INIT: &str = "import time\ntime.sleep(0.4)  # init: 400 ms\n\ndef handler(event, context):\n    return {\"ok\": True}\n";
const SLEEP3: &str = "import time\n\ndef handler(event, context):\n    time.sleep(3)\n    return {\"i\": event.get(\"i\")}\n";

fn function(root: &Path, name: &str, yaml: &str, source: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("function.yaml"), function_yaml(name, yaml)).unwrap();
    std::fs::write(dir.join("main.py"), source).unwrap();
    dir
}

fn function_yaml(name: &str, yaml: &str) -> String {
    format!("name: {name}\nruntime: python3\nhandler: main.handler\nnetwork: none\n{yaml}")
}

/// The bundle of one function spec, run with plain `runsc` (no gateway, scheduler or cgroup).
struct Raw {
    sb: GvisorSandbox,
    spec: InstanceSpec,
    runsc: PathBuf,
    root: PathBuf,
    bundles: PathBuf,
    platform: String,
}

impl Raw {
    fn new(skiff: &Path, state: &Path, runtime_dir: &Path, yaml: &str, code: &Path) -> Raw {
        let cfg = GvisorConfig::new(skiff, state.join("tier"), runtime_dir);
        let (runsc, platform) = (cfg.runsc.clone(), cfg.platform.clone());
        let sb = GvisorSandbox::new(cfg).expect("gVisor tier for the raw baseline");
        let fspec = FunctionSpec::from_yaml(yaml).unwrap();
        let (mode, argv) = skiff_core::launch::program(&fspec);
        let env = skiff_core::launch::environment(&skiff_core::launch::LaunchInfo {
            spec: &fspec,
            revision: 1,
            workspace: "default",
            secrets: &[],
            otel_endpoint: None,
        });
        let spec = InstanceSpec {
            instance_id: String::new(),
            function: fspec.name.clone(),
            revision: 1,
            spec: fspec,
            code_dir: code.to_path_buf(),
            env,
            exec_mode: mode,
            argv,
            rootfs: None,
            workspace: None,
        };
        let root = state.join("runsc-root");
        let bundles = state.join("bundles");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&bundles).unwrap();
        Raw {
            sb,
            spec,
            runsc,
            root,
            bundles,
            platform,
        }
    }

    /// Writes a bundle, then times `runsc run` from spawn to the agent's `Done` for one
    /// invoke; returns (ms to Done, ms spent writing the bundle, ms to the agent's `Ready`,
    /// ms to `Initialized`). Tears down untimed.
    async fn run(&self, i: usize) -> (f64, f64, f64, f64) {
        let id = format!("raw-{}-{i}", std::process::id());
        let dir = self.bundles.join(&id);
        let mut spec = self.spec.clone();
        spec.instance_id = id.clone();
        let tb = Instant::now();
        let config = self.sb.write_bundle(&spec, &dir).expect("write_bundle");
        let bundle_ms = tb.elapsed().as_secs_f64() * 1e3;
        let invoke = Frame::new(
            Kind::Invoke,
            &Invoke {
                id: "raw".into(),
                deadline_ms: (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    + 30_000) as u64,
                function_arn: skiff_core::launch::function_arn(&spec.function, None),
                trace_id: "Root=1-00000000-000000000000000000000000".into(),
                client_context: None,
                cognito_identity: None,
            },
            b"{\"x\":1}".to_vec(),
        )
        .encode();

        let t = Instant::now();
        let (host, child) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut proc = Command::new(&self.runsc)
            .arg(format!("--root={}", self.root.display()))
            .arg(format!("--platform={}", self.platform))
            .args(["--network=none", "--ignore-cgroups", "run", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(child)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn runsc");
        host.set_nonblocking(true).unwrap();
        let mut host = tokio::net::UnixStream::from_std(host).unwrap();
        host.write_all(&config).await.unwrap();
        host.write_all(&invoke).await.unwrap();
        let (mut ready_ms, mut init_ms) = (f64::NAN, f64::NAN);
        let ms = loop {
            let f = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut host))
                .await
                .expect("raw runsc: no Done within 60 s")
                .unwrap()
                .expect("raw runsc: channel closed before Done");
            match f.kind {
                Kind::Done => {
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let d: Done = f.header().unwrap();
                    assert!(
                        d.error_type.is_none(),
                        "raw invoke failed: {}",
                        String::from_utf8_lossy(&f.body)
                    );
                    break ms;
                }
                Kind::Ready => ready_ms = t.elapsed().as_secs_f64() * 1e3,
                Kind::Initialized => init_ms = t.elapsed().as_secs_f64() * 1e3,
                Kind::SetupFailed | Kind::InitError | Kind::Exit => panic!(
                    "raw runsc: {:?} {}",
                    f.kind,
                    String::from_utf8_lossy(&f.body)
                ),
                _ => {}
            }
        };
        // Teardown (untimed): ask the agent to exit, then make sure runsc is gone.
        let _ = host
            .write_all(&Frame::bare(Kind::Shutdown, Vec::new()).encode())
            .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if proc.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = proc.kill();
                let _ = proc.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(host);
        if self.root.join(format!("{id}_sandbox:{id}.state")).exists() {
            let _ = Command::new(&self.runsc)
                .arg(format!("--root={}", self.root.display()))
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for ext in ["state", "lock"] {
            let _ = std::fs::remove_file(self.root.join(format!("{id}_sandbox:{id}.{ext}")));
        }
        let _ = std::fs::remove_dir_all(&dir);
        (ms, bundle_ms, ready_ms, init_ms)
    }
}

/// The server's instance cgroups in the memory hierarchy (`…/skiff/s<pid>/<instance>`) of
/// function `function` (instance ids start with `<function>-`).
fn instance_cgroups(server_pid: u32, function: &str) -> Vec<PathBuf> {
    let prefix = format!("{function}-");
    let want = format!("s{server_pid}");
    let mut found = Vec::new();
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup/memory"), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if e.file_name().to_string_lossy() == want
                && d.file_name().is_some_and(|n| n == "skiff")
            {
                found.extend(
                    std::fs::read_dir(&p)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        .map(|e| e.path())
                        .filter(|p| p.is_dir()),
                );
            } else if depth < 6 {
                stack.push((p, depth + 1));
            }
        }
    }
    found
}

/// Of `function`'s instances: (instances, Σ memory.usage_in_bytes, Σ VmRSS of their processes in bytes, processes).
fn sample_memory(server_pid: u32, function: &str) -> (usize, u64, u64, usize) {
    let (mut n, mut usage, mut rss, mut procs) = (0, 0, 0, 0);
    for cg in instance_cgroups(server_pid, function) {
        let u: u64 = std::fs::read_to_string(cg.join("memory.usage_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let pids = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        if pids.trim().is_empty() {
            continue;
        }
        n += 1;
        usage += u;
        for pid in pids.lines() {
            procs += 1;
            let s =
                std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap_or_default();
            rss += s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    (n, usage, rss, procs)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn row(what: &str, v: &[f64]) {
    println!(
        "| {what} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        v.len(),
        median(v),
        pct(v, 0.9),
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let cold_n = arg("--cold", 20);
    let snap_n = arg("--snap", 15);
    let warm_n = arg("--warm", 500);
    let conc = arg("--conc", 100);
    let pause = Duration::from_millis(arg("--pause-ms", 300) as u64);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let skiff = root.join("target/release/skiff");
    assert!(
        skiff.exists(),
        "build first: cargo build --release -p skiff-cli"
    );
    raise_nofile();
    let runsc_version = Command::new("runsc")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "runsc not found".into());
    println!("{runsc_version}, platform ptrace (skiff serve's default)");
    let tmp = std::env::temp_dir().join(format!("skiff-gvisor-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (mut server, addr) = start_server(&skiff, &data);
    let server_pid = server.id();
    let fns = tmp.join("fns");
    let gv = "sandbox: gvisor\n";
    let cold_yaml = format!("{gv}mode: ephemeral\n");
    deploy(
        &skiff,
        &addr,
        &function(&fns, "gv-cold", &cold_yaml, TRIVIAL),
    );
    deploy(
        &skiff,
        &addr,
        &function(&fns, "gv-plain", &cold_yaml, SLOW_INIT),
    );
    deploy(
        &skiff,
        &addr,
        &function(
            &fns,
            "gv-branched",
            &format!("{gv}mode: branched\n"),
            SLOW_INIT,
        ),
    );
    deploy(&skiff, &addr, &function(&fns, "gv-warm", gv, TRIVIAL));
    deploy(
        &skiff,
        &addr,
        &function(&fns, "nat-warm", "sandbox: native\n", TRIVIAL),
    );
    deploy(
        &skiff,
        &addr,
        &function(
            &fns,
            "gv-conc",
            &format!("{gv}concurrency: 1\nscale: {{max: {conc}}}\ntimeout: 120s\n"),
            SLEEP3,
        ),
    );
    let mut failed = false;

    // 1. Cold start through Skiff vs raw runsc, interleaved.
    {
        let code = tmp.join("raw-code");
        std::fs::create_dir_all(&code).unwrap();
        std::fs::set_permissions(&code, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(code.join("main.py"), TRIVIAL).unwrap();
        let raw = Raw::new(
            &skiff,
            &tmp.join("raw"),
            &data.join("runtimes"),
            &function_yaml("gv-cold", &cold_yaml),
            &code,
        );
        // One untimed round of each (page cache, rootfs).
        let mut conn = connect(&addr).await;
        invoke(&mut conn, &addr, "gv-cold", b"{\"x\":1}", Some(true)).await;
        raw.run(usize::MAX).await;
        let (mut skiff_ms, mut raw_ms, mut bundle_ms) = (vec![], vec![], vec![]);
        let (mut ready_ms, mut init_ms) = (vec![], vec![]);
        for i in 0..cold_n {
            for first_skiff in [i % 2 == 0, i % 2 == 1] {
                tokio::time::sleep(pause).await;
                if first_skiff {
                    skiff_ms
                        .push(invoke(&mut conn, &addr, "gv-cold", b"{\"x\":1}", Some(true)).await);
                } else {
                    let (r, b, ready, init) = raw.run(i).await;
                    raw_ms.push(r);
                    bundle_ms.push(b);
                    ready_ms.push(ready);
                    init_ms.push(init);
                }
            }
        }
        let (s, r, b) = (sorted(skiff_ms), sorted(raw_ms), sorted(bundle_ms));
        println!("\n## 1. gVisor cold start, python3 trivial handler (ms)\n");
        println!("| path | n | median | p90 | min | max |\n|---|---:|---:|---:|---:|---:|");
        row("Skiff: `mode: ephemeral` invoke through the gateway", &s);
        row("raw `runsc run` of the same bundle, to `Done`", &r);
        row(
            "  raw: spawn to the agent's `Ready` (runsc up, agent set up)",
            &sorted(ready_ms),
        );
        row(
            "  raw: spawn to `Initialized` (python bootstrap + main.py imported)",
            &sorted(init_ms),
        );
        println!(
            "\nratio Skiff/raw (medians): {:.2}× (target ≤ 1.1×); writing the bundle (untimed in raw): median {:.2} ms",
            median(&s) / median(&r),
            median(&b)
        );
    }

    // 2. Branched (restore from the post-init snapshot) vs plain cold start.
    {
        let mut conn = connect(&addr).await;
        tokio::time::sleep(pause).await;
        let first = invoke(&mut conn, &addr, "gv-branched", b"{\"x\":1}", Some(true)).await;
        invoke(&mut conn, &addr, "gv-plain", b"{\"x\":1}", Some(true)).await;
        let (mut plain, mut branched) = (vec![], vec![]);
        for i in 0..snap_n {
            for plain_first in [i % 2 == 0, i % 2 == 1] {
                tokio::time::sleep(pause).await;
                if plain_first {
                    plain
                        .push(invoke(&mut conn, &addr, "gv-plain", b"{\"x\":1}", Some(true)).await);
                } else {
                    branched.push(
                        invoke(&mut conn, &addr, "gv-branched", b"{\"x\":1}", Some(true)).await,
                    );
                }
            }
        }
        let (p, b) = (sorted(plain), sorted(branched));
        println!("\n## 2. Snapshot restore vs plain cold start, python3 with a 400 ms init (ms)\n");
        println!("| path | n | median | p90 | min | max |\n|---|---:|---:|---:|---:|---:|");
        row("plain cold start (`mode: ephemeral`)", &p);
        row("restore from post-init snapshot (`mode: branched`)", &b);
        println!(
            "\nratio branched/plain (medians): {:.2}× (target ≤ 0.7×); first branched invoke (start + init + checkpoint + restore): {:.0} ms, i.e. snapshot creation ≈ {:.0} ms over a restore",
            median(&b) / median(&p),
            first,
            first - median(&b)
        );
    }

    // 3. Warm invoke, gVisor vs native, sequential keep-alive.
    {
        let mut res = vec![];
        for name in ["gv-warm", "nat-warm"] {
            let mut conn = connect(&addr).await;
            invoke(&mut conn, &addr, name, b"{\"x\":1}", Some(true)).await;
            for _ in 0..50 {
                invoke(&mut conn, &addr, name, b"{\"x\":1}", Some(false)).await;
            }
            let mut v = Vec::with_capacity(warm_n);
            for _ in 0..warm_n {
                v.push(invoke(&mut conn, &addr, name, b"{\"x\":1}", Some(false)).await);
            }
            res.push((name, sorted(v)));
        }
        println!("\n## 3. Warm invoke, python3 trivial handler, sequential keep-alive (ms)\n");
        println!("| tier | n | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|");
        for (name, v) in &res {
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                if *name == "gv-warm" {
                    "gvisor"
                } else {
                    "native"
                },
                v.len(),
                pct(v, 0.5),
                pct(v, 0.9),
                pct(v, 0.99),
                v.last().copied().unwrap_or(f64::NAN)
            );
        }
        println!(
            "\ngvisor p50 {:.3} ms (target ≤ 2 ms); gvisor/native p50 {:.2}×",
            pct(&res[0].1, 0.5),
            pct(&res[0].1, 0.5) / pct(&res[1].1, 0.5)
        );
    }

    // 4. Many concurrent gVisor instances.
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let peak = Arc::new(peak::Peak::default());
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    peak.record(sample_memory(server_pid, "gv-conc"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|i| {
                let addr = addr.clone();
                tokio::spawn(async move {
                    let mut conn = connect(&addr).await;
                    let t = Instant::now();
                    let body = format!("{{\"i\":{i}}}");
                    let r = request(
                        &mut conn,
                        &addr,
                        "POST",
                        "/v1/functions/gv-conc/invoke",
                        body.as_bytes(),
                        true,
                    )
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                    let took = t.elapsed().as_secs_f64();
                    let want = format!("{{\"i\":{i}}}");
                    let got: serde_json::Value =
                        serde_json::from_slice(&r.body).unwrap_or_default();
                    if r.status != 200
                        || got != serde_json::from_str::<serde_json::Value>(&want).unwrap()
                    {
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
        let mut lat = vec![];
        let mut errors = vec![];
        let mut instances = std::collections::BTreeSet::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok((d, inst)) => {
                    lat.push(d);
                    instances.insert(inst);
                }
                Err(e) => errors.push(e),
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        sampling.store(false, Ordering::Relaxed);
        sampler.join().unwrap();
        let lat = sorted(lat);
        let (pn, pusage, prss, pprocs) = peak.get();
        println!("\n## 4. {conc} concurrent invokes, `concurrency: 1`, handler sleeps 3 s\n");
        println!("| metric | value |\n|---|---:|");
        println!("| errors | {} |", errors.len());
        println!("| distinct instances that answered | {} |", instances.len());
        println!("| wall time, all {conc} answered (s) | {wall:.1} |");
        println!(
            "| latency p50 / p90 / max (s) | {:.1} / {:.1} / {:.1} |",
            median(&lat),
            pct(&lat, 0.9),
            lat.last().copied().unwrap_or(f64::NAN)
        );
        println!("| most instance cgroups with processes at once | {pn} |");
        println!(
            "| at that moment: Σ memory.usage_in_bytes (MiB) | {:.0} |",
            mib(pusage)
        );
        println!(
            "| per instance: memory.usage_in_bytes (MiB) | {:.1} |",
            mib(pusage) / pn.max(1) as f64
        );
        println!(
            "| per instance: Σ VmRSS of its {:.1} host processes (MiB, shared pages counted per process) | {:.1} |",
            pprocs as f64 / pn.max(1) as f64,
            mib(prss) / pn.max(1) as f64
        );
        for e in errors.iter().take(5) {
            println!("error e.g.: {e}");
        }
        failed |= !errors.is_empty();
    }

    // Stop the server gracefully so it tears its sandboxes down.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server_pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&tmp);
    if failed {
        std::process::exit(1);
    }
}

/// The sample with the most live instances (ties: the larger memory).
mod peak {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Peak(Mutex<(usize, u64, u64, usize)>);

    impl Peak {
        pub fn record(&self, s: (usize, u64, u64, usize)) {
            let mut p = self.0.lock().unwrap();
            if (s.0, s.1) > (p.0, p.1) {
                *p = s;
            }
        }
        pub fn get(&self) -> (usize, u64, u64, usize) {
            *self.0.lock().unwrap()
        }
    }
}
