//! `skiff-microvm-bench`: the microVM tier (`sandbox: microvm`, QEMU `microvm`) against the
//! real release `skiff serve` over loopback HTTP, with baselines measured in the same run.
//!
//! 1. Boot to first reply: a python3 function with `mode: ephemeral` (every invoke boots a new
//!    VM), against the same function on the native tier.
//! 2. Restore to first reply: the same function with `mode: branched` (every invoke restores
//!    the post-init snapshot into a new VM); the first invoke also builds the snapshot.
//! 3. Warm invoke: sequential keep-alive invokes of a warm microVM function, and of the same
//!    function on the native tier.
//! 4. Memory of idle VMs: `--idle` (default 3) booted instances and as many restored ones
//!    (`mode: checkpointed`), idle; the RSS and PSS of their QEMU processes (PSS splits pages
//!    shared between restored copies of one snapshot).
//!
//! Usage: `bench/microvm.sh [--boot 5] [--restore 15] [--warm 300] [--idle 3] [--pause-ms 300]`. Needs root and
//! QEMU; the guest image is built first (or taken from `SKIFF_IMAGE_DIR`).

use skiff_bench::{
    arg, connect, deploy, invoke, median, pct, raise_nofile, release_bin, sorted, start_server,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TRIVIAL: &str = "def handler(event, context):\n    return {\"ok\": True}\n";
const SLEEP: &str =
    "import time\n\ndef handler(event, context):\n    time.sleep(event.get(\"s\", 0))\n    return {\"ok\": True}\n";

fn function(root: &Path, name: &str, yaml: &str, source: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("function.yaml"),
        format!("name: {name}\nruntime: python3\nhandler: main.handler\nnetwork: none\ntimeout: 60s\n{yaml}"),
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), source).unwrap();
    dir
}

/// `n` sequential invokes of `name`, `pause` apart (0: back to back); their latencies
/// (ms), sorted.
async fn series(addr: &str, name: &str, n: usize, cold: Option<bool>, pause: Duration) -> Vec<f64> {
    let mut conn = connect(addr).await;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(invoke(&mut conn, addr, name, b"{}", cold).await);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    sorted(v)
}

/// (RSS, PSS) in KiB of the QEMU processes whose `-name` is `skiff-<function>-…`.
fn qemu_memory(function: &str) -> Vec<(u64, u64)> {
    // Instance ids are `<function>-<revision>-…`; revision 1 here.
    let needle = format!("skiff-{function}-1-");
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with("/usr/bin/qemu-system") && !cmd.contains("qemu-system-x86_64\0") {
            continue;
        }
        if !cmd.split('\0').any(|a| a.starts_with(&needle)) {
            continue;
        }
        let rollup = std::fs::read_to_string(e.path().join("smaps_rollup")).unwrap_or_default();
        let field = |name: &str| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0u64)
        };
        out.push((field("Rss:"), field("Pss:")));
    }
    out
}

/// Brings `k` instances of `name` up at once (each invoke sleeps so none is reused).
async fn scale_to(addr: &str, name: &str, k: usize) {
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let addr = addr.to_string();
            let name = name.to_string();
            tokio::spawn(async move {
                let mut c = connect(&addr).await;
                invoke(&mut c, &addr, &name, b"{\"s\": 2}", None).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn row(what: &str, v: &[f64]) {
    println!(
        "| {what} | {} | {:.1} | {:.1} | {:.1} |",
        v.len(),
        median(v),
        pct(v, 0.9),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let boot_n = arg("--boot", 5);
    let restore_n = arg("--restore", 15);
    let warm_n = arg("--warm", 300);
    let idle = arg("--idle", 3);
    // Between cold starts: the previous VM's teardown (freeing its RAM) settles.
    let pause = Duration::from_millis(arg("--pause-ms", 300) as u64);
    let none = Duration::ZERO;
    let skiff = release_bin("skiff");
    assert!(
        skiff.exists(),
        "build first: cargo build --release -p skiff-cli"
    );
    raise_nofile();
    let tmp = std::env::temp_dir().join(format!("skiff-microvm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("data")).unwrap();
    let images = std::env::var_os("SKIFF_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.join("images"));
    // The guest image first, so no measurement includes building it.
    let t = Instant::now();
    let out = Command::new(&skiff)
        .args(["image", "build", "--image-dir"])
        .arg(&images)
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("guest image ready in {:.1} s:", t.elapsed().as_secs_f64());
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {l}");
    }
    std::env::set_var("SKIFF_IMAGE_DIR", &images);
    let (mut server, addr) = start_server(&skiff, &tmp.join("data"));
    let fns = tmp.join("fns");
    let vm = "sandbox: microvm\n";
    for (name, yaml, src) in [
        ("vm-boot", format!("{vm}mode: ephemeral\n"), TRIVIAL),
        (
            "nat-boot",
            "sandbox: native\nmode: ephemeral\n".to_string(),
            TRIVIAL,
        ),
        ("vm-restore", format!("{vm}mode: branched\n"), TRIVIAL),
        ("vm-warm", vm.to_string(), TRIVIAL),
        ("nat-warm", "sandbox: native\n".to_string(), TRIVIAL),
        (
            "vm-idle",
            format!("{vm}scale: {{max: {idle}, idle: 10m}}\n"),
            SLEEP,
        ),
        (
            "vm-idle-restored",
            format!("{vm}mode: checkpointed\nscale: {{max: {idle}, idle: 10m}}\n"),
            SLEEP,
        ),
    ] {
        deploy(&skiff, &addr, &function(&fns, name, &yaml, src));
    }

    println!("\n## 1–2. Cold start to first reply (ms, through the gateway)\n");
    println!("| what | n | p50 | p90 | max |\n|---|---:|---:|---:|---:|");
    let boot = series(&addr, "vm-boot", boot_n, Some(true), pause).await;
    let nat = series(&addr, "nat-boot", boot_n.max(10), Some(true), pause).await;
    // The first branched invoke boots the VM and takes the snapshot.
    let first = series(&addr, "vm-restore", 1, Some(true), pause).await;
    let restore = series(&addr, "vm-restore", restore_n, Some(true), pause).await;
    let b2b = series(&addr, "vm-restore", restore_n, Some(true), none).await;
    row("microVM boot (`mode: ephemeral`)", &boot);
    row("native cold start (baseline)", &nat);
    row("microVM first branched invoke (boot + snapshot)", &first);
    row("microVM restore (`mode: branched`)", &restore);
    row(
        "microVM restore, back to back (previous VM still tearing down)",
        &b2b,
    );
    println!(
        "\nrestore / boot (medians): {:.3}; restore / native cold: {:.2}",
        median(&restore) / median(&boot),
        median(&restore) / median(&nat)
    );

    println!("\n## 3. Warm invoke (ms, sequential, keep-alive)\n");
    println!("| what | n | p50 | p90 | max |\n|---|---:|---:|---:|---:|");
    series(&addr, "vm-warm", 3, None, none).await;
    series(&addr, "nat-warm", 3, None, none).await;
    let vw = series(&addr, "vm-warm", warm_n, Some(false), none).await;
    let nw = series(&addr, "nat-warm", warm_n, Some(false), none).await;
    row("microVM warm", &vw);
    row("native warm (baseline)", &nw);
    println!(
        "\nmicroVM / native (medians): {:.2}",
        median(&vw) / median(&nw)
    );

    println!("\n## 4. Memory of idle VMs ({idle} each; KiB of the QEMU process)\n");
    scale_to(&addr, "vm-idle", idle).await;
    scale_to(&addr, "vm-idle-restored", idle).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("| instances | n | RSS mean | PSS mean |\n|---|---:|---:|---:|");
    for name in ["vm-idle", "vm-idle-restored"] {
        let m = qemu_memory(name);
        let n = m.len().max(1) as u64;
        println!(
            "| {name} | {} | {} | {} |",
            m.len(),
            m.iter().map(|x| x.0).sum::<u64>() / n,
            m.iter().map(|x| x.1).sum::<u64>() / n
        );
    }
    // SIGTERM: the server stops its VMs (a SIGKILLed server would leave its QEMUs running,
    // skewing whatever runs next).
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while server.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(tmp.join("data"));
}
