//! `skiff serve`: opens the store, prepares the sandbox tier and serves the gateway.

use anyhow::{bail, Context, Result};
use clap::Args;
use skiff_gateway::events::EventConfig;
use skiff_gateway::{AppState, Auth};
use skiff_sandbox::{
    Accel, GvisorConfig, GvisorSandbox, MicrovmConfig, MicrovmSandbox, NativeConfig, NativeSandbox,
    Tiers,
};
use skiff_scheduler::{Scheduler, SchedulerConfig};
use skiff_store::Store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Runtime bootstraps shipped inside the binary and mounted at `/var/runtime`.
const RUNTIME_FILES: &[(&str, &str)] = &[
    (
        "python/bootstrap.py",
        include_str!("../../../runtimes/python/bootstrap.py"),
    ),
    (
        "node/bootstrap.js",
        include_str!("../../../runtimes/node/bootstrap.js"),
    ),
];

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080, or 127.0.0.1:$FAAS_GATEWAY_PORT). A
    /// non-loopback address requires API keys.
    #[arg(long, env = "SKIFF_LISTEN")]
    listen: Option<SocketAddr>,
    /// Port on 127.0.0.1 when --listen is not given (seed-compatible configuration).
    #[arg(long, env = "FAAS_GATEWAY_PORT")]
    gateway_port: Option<u16>,
    /// Seed name of `--default-sandbox` (`native`, `gvisor`, `microvm` or its seed alias
    /// `firecracker`); used when FAAS_RUNTIME is not.
    #[arg(long, env = "FAAS_EXECUTOR_TYPE")]
    executor: Option<String>,
    /// Sandbox tier of functions whose function.yaml does not set `sandbox:`: `native`,
    /// `gvisor`, `microvm`, or `hybrid` (= native by default, each function picks with
    /// `sandbox:`). Fixed into each revision at deploy.
    #[arg(long, env = "FAAS_RUNTIME", default_value = "native")]
    default_sandbox: String,
    /// Instances kept started for each `warm` revision an alias routes to (capped by its
    /// `scale.max`); 0 starts instances on demand only.
    #[arg(long, env = "FAAS_WARM_POOL_SIZE", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    warm_pool_size: u32,
    /// Restrict the seed API's `image` directories to this directory (default: any directory).
    #[arg(long, env = "FAAS_IMAGE_ROOT")]
    image_root: Option<PathBuf>,
    /// Where metadata (SQLite), packages and instance state live.
    #[arg(long, env = "SKIFF_DATA_DIR", default_value = ".skiff")]
    data_dir: PathBuf,
    /// API key accepted by the server (repeatable). Also `SKIFF_API_KEYS=k1,k2`.
    #[arg(
        long = "api-key",
        env = "SKIFF_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Workspace name reported to functions.
    #[arg(long, default_value = "default")]
    workspace: String,
    /// Maximum processes/threads per sandbox.
    #[arg(long, default_value_t = 256)]
    pids_max: u32,
    /// Sandboxes kept pre-spawned (namespaces and cgroups ready) to cut cold starts.
    #[arg(long, default_value_t = 2)]
    prewarm: usize,
    /// The `runsc` binary of the gVisor tier (`sandbox: gvisor`); default: `runsc` on `$PATH`.
    /// Without it the tier is off and such functions are refused at deploy.
    #[arg(long, env = "SKIFF_RUNSC")]
    runsc: Option<PathBuf>,
    /// `runsc --platform` for the gVisor tier: `ptrace` (works everywhere, the default),
    /// `systrap` (newer runsc) or `kvm` (needs working hardware virtualisation).
    #[arg(long, env = "SKIFF_RUNSC_PLATFORM", default_value = "ptrace")]
    runsc_platform: String,
    /// The QEMU binary of the microVM tier (`sandbox: microvm`); default:
    /// `qemu-system-x86_64` on `$PATH`. Without it the tier is off.
    #[arg(long, env = "SKIFF_QEMU")]
    qemu: Option<PathBuf>,
    /// microVM acceleration: `auto` (KVM when the host has working hardware virtualisation,
    /// else TCG software emulation), `kvm` or `tcg`.
    #[arg(long, env = "SKIFF_MICROVM_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    microvm_accel: String,
    /// Cache of microVM guest images (kernel, initramfs, root filesystem), shareable between
    /// servers; default `<data-dir>/images`.
    #[arg(long, env = "SKIFF_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Take the guest kernel from this `linux-image-*-cloud-amd64` package instead of
    /// downloading it with apt.
    #[arg(long, env = "SKIFF_KERNEL_DEB")]
    kernel_deb: Option<PathBuf>,
    /// Let in-process functions (`js`, `wasm`) with `network: outbound` reach loopback and
    /// private addresses too (internal services); by default only public ones.
    #[arg(long, env = "SKIFF_ALLOW_PRIVATE_EGRESS")]
    allow_private_egress: bool,
    /// Async invocations run at once (default: 2 × CPU cores).
    #[arg(long)]
    event_workers: Option<usize>,
    /// Delay before the first retry of a failed async invocation; doubles for the next
    /// (Lambda uses 1m; `500ms`, `1s`, `2m`… accepted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    event_retry_base: Duration,
    /// Attempts of an async invocation before it is dead-lettered.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    event_max_attempts: u32,
    /// Serve functions on `{name}.DOMAIN` and `{alias}--{name}.DOMAIN` hosts (e.g.
    /// fn.localhost); off when unset.
    #[arg(long, env = "SKIFF_FUNCTION_DOMAIN", value_parser = skiff_gateway::host::parse_domain)]
    function_domain: Option<String>,
}

/// `FAAS_RUNTIME` / `--default-sandbox`: the tier of functions that do not choose one.
fn parse_default_sandbox(s: &str) -> Result<skiff_core::SandboxKind> {
    use skiff_core::SandboxKind;
    match s {
        "native" | "hybrid" => Ok(SandboxKind::Native),
        "gvisor" => Ok(SandboxKind::Gvisor),
        "microvm" | "firecracker" => Ok(SandboxKind::Microvm),
        other => bail!(
            "FAAS_RUNTIME / --default-sandbox `{other}` is not a sandbox tier (native, gvisor, \
             microvm, hybrid)"
        ),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    skiff_core::units::parse_duration(s)
        .ok_or_else(|| format!("`{s}` is not a duration such as 500ms, 1s or 2m"))
}

pub(crate) fn write_runtimes(dir: &Path) -> Result<()> {
    for (rel, text) in RUNTIME_FILES {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every in-flight HTTP request holds a
/// socket, and `runtime: js` instances serve thousands of invocations at once.
fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return Some(want.rlim_cur);
            }
        }
    }
    Some(lim.rlim_cur)
}

pub fn run(mut args: ServeArgs) -> Result<()> {
    let nofile = raise_nofile_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "skiff=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!(?nofile, "open file limit");
    let default_sandbox = match &args.executor {
        Some(e) if args.default_sandbox == "native" => parse_default_sandbox(e)
            .with_context(|| format!("FAAS_EXECUTOR_TYPE / --executor `{e}`"))?,
        _ => parse_default_sandbox(&args.default_sandbox)?,
    };
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.gateway_port.unwrap_or(8080))));
    let image_root = args
        .image_root
        .as_deref()
        .map(std::fs::canonicalize)
        .transpose()
        .context("--image-root / FAAS_IMAGE_ROOT")?;
    let api_keys: Vec<String> = std::mem::take(&mut args.api_keys)
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    let store = Store::open(&args.data_dir)
        .with_context(|| format!("opening data dir {}", args.data_dir.display()))?;
    let keys_configured = !api_keys.is_empty() || store.has_api_keys()?;
    if !listen.ip().is_loopback() && !keys_configured {
        bail!(
            "refusing to listen on {} without API keys: anyone who can reach it could run code. \
             Pass --api-key (or SKIFF_API_KEYS), create one with `skiff keys create`, \
             or listen on a loopback address such as 127.0.0.1",
            listen
        );
    }
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let runtime_dir = data_dir.join("runtimes");
    write_runtimes(&runtime_dir)?;
    let exe = std::env::current_exe().context("locating the skiff binary")?;
    let mut cfg = NativeConfig::new(&exe, data_dir.join("run"), &runtime_dir);
    cfg.pids_max = args.pids_max;
    cfg.prewarm = args.prewarm;
    let native = NativeSandbox::new(cfg).context("preparing the native sandbox")?;
    let egress = Arc::new(skiff_core::net::EgressPolicy::default());
    egress.set_allow_private(args.allow_private_egress);
    let js = Arc::new(skiff_js::JsSandbox::with_net(
        skiff_js::fetch::NetPolicy::new(egress.clone()),
    ));
    let gvisor = gvisor_tier(
        &exe,
        &data_dir,
        &runtime_dir,
        args.runsc.as_deref(),
        &args.runsc_platform,
        args.pids_max,
    );
    let microvm = microvm_tier(&exe, &data_dir, &runtime_dir, &args);
    if default_sandbox == skiff_core::SandboxKind::Microvm && microvm.is_none() {
        bail!(
            "FAAS_RUNTIME=microvm needs the microVM tier, which is not available here \
             (apt-get install qemu-system-x86; see `skiff doctor`)"
        );
    }
    if default_sandbox == skiff_core::SandboxKind::Gvisor && gvisor.is_none() {
        bail!(
            "FAAS_RUNTIME=gvisor needs the gVisor tier, which is not available here \
             (apt-get install runsc; see `skiff doctor`)"
        );
    }
    let sandbox = Tiers {
        native: Arc::new(native),
        gvisor,
        microvm,
        js: Some(js as Arc<dyn skiff_sandbox::Sandbox>),
        wasm: wasm_tier(data_dir.join("cache/wasm"), egress.clone()),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // JS edge functions run inline on the workers, with up to 1 MiB of QuickJS stack.
        .thread_stack_size(8 << 20)
        .build()?;
    rt.block_on(async move {
        let scheduler = Scheduler::new(
            Arc::new(sandbox),
            SchedulerConfig {
                workspace: args.workspace,
                data_dir: Some(data_dir.clone()),
                warm_pool_size: args.warm_pool_size,
                default_sandbox,
                ..Default::default()
            },
        );
        let state = AppState::with_options(
            store.clone(),
            scheduler.clone(),
            Auth::new(&api_keys),
            skiff_gateway::Options {
                function_domain: args.function_domain.clone(),
            },
        );
        state
            .seed
            .configure(skiff_gateway::seed::SeedConfig {
                code_dir: data_dir.join("run/seed-task"),
                image_root,
            })
            .context("preparing the seed API")?;
        let mut events = EventConfig {
            retry_base: args.event_retry_base,
            max_attempts: args.event_max_attempts,
            ..EventConfig::default()
        };
        if let Some(n) = args.event_workers {
            events.workers = n.max(1);
        }
        skiff_gateway::events::spawn_workers(state.clone(), events);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        // In-process functions (JS `fetch`, wasi:http) must never call back into this gateway.
        egress.set_gateway(addr);
        let mode = if keys_configured {
            "API keys required"
        } else {
            "open: loopback, no API keys"
        };
        eprintln!(
            "skiff listening on http://{addr} ({mode}); data in {}",
            data_dir.display()
        );
        if let Some(d) = &args.function_domain {
            eprintln!("functions served on http://{{name}}.{d} and http://{{alias}}--{{name}}.{d}");
        }
        // Connection info gives HTTP triggers the client's address (`sourceIp`).
        let app = skiff_gateway::router(state.clone())
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        // No Nagle: a streamed (or proxied) response writes its head before its body, and
        // Nagle would hold the body back until the client's delayed ACK (≈40 ms).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        eprintln!("skiff shutting down: finishing running events, stopping instances");
        // Unfinished events stay `running` in the store and are requeued at the next start.
        state.events.shutdown(Duration::from_secs(3)).await;
        scheduler.shutdown().await;
        store.flush();
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The gVisor tier when `runsc` is there (declares `sandbox: gvisor` publishable), else `None`.
fn gvisor_tier(
    exe: &Path,
    data_dir: &Path,
    runtime_dir: &Path,
    runsc: Option<&Path>,
    platform: &str,
    pids_max: u32,
) -> Option<Arc<dyn skiff_sandbox::Sandbox>> {
    let mut cfg = GvisorConfig::new(exe, data_dir.join("run/gvisor"), runtime_dir);
    if let Some(r) = runsc {
        cfg.runsc = r.to_path_buf();
    }
    cfg.platform = platform.to_string();
    // Every guest process is a host task under ptrace, and the sentry and gofer have threads
    // of their own: the function's --pids-max plus room for them.
    cfg.pids_max = pids_max + 256;
    if !cfg.runsc.is_file() {
        tracing::info!(
            "gVisor tier off: {} not found (apt-get install runsc)",
            cfg.runsc.display()
        );
        return None;
    }
    match GvisorSandbox::new(cfg) {
        Ok(sb) => {
            skiff_core::publish::set_gvisor_available(true);
            Some(Arc::new(sb))
        }
        Err(e) => {
            tracing::warn!("gVisor tier off: {e}");
            None
        }
    }
}

/// The microVM tier's configuration from the server's arguments.
fn microvm_config(
    exe: &Path,
    data_dir: &Path,
    runtime_dir: &Path,
    args: &ServeArgs,
) -> MicrovmConfig {
    let image_dir = args
        .image_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("images"));
    let mut cfg = MicrovmConfig::new(exe, data_dir.join("run/microvm"), image_dir, runtime_dir);
    if let Some(q) = &args.qemu {
        cfg.qemu = q.clone();
    }
    match args.microvm_accel.as_str() {
        "kvm" => cfg.accel = Accel::Kvm,
        "tcg" => cfg.accel = Accel::Tcg,
        _ => {}
    }
    cfg.kernel_deb = args.kernel_deb.clone();
    cfg.guest_pids_max = args.pids_max;
    cfg
}

/// The microVM tier when QEMU is there (declares `sandbox: microvm` publishable), else
/// `None`. The guest image is built on the first microVM start.
fn microvm_tier(
    exe: &Path,
    data_dir: &Path,
    runtime_dir: &Path,
    args: &ServeArgs,
) -> Option<Arc<dyn skiff_sandbox::Sandbox>> {
    let cfg = microvm_config(exe, data_dir, runtime_dir, args);
    if !cfg.qemu.is_file() {
        tracing::info!(
            "microVM tier off: {} not found (apt-get install qemu-system-x86)",
            cfg.qemu.display()
        );
        return None;
    }
    match MicrovmSandbox::new(cfg) {
        Ok(sb) => {
            tracing::info!("microVM tier: accelerator {}", sb.config().accel);
            skiff_core::publish::set_microvm_available(true);
            Some(Arc::new(sb))
        }
        Err(e) => {
            tracing::warn!("microVM tier off: {e}");
            None
        }
    }
}

/// `skiff doctor`: what this host offers the sandbox tiers.
pub fn doctor() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("skiff-doctor-{}", std::process::id()));
    let exe = std::env::current_exe()?;
    let mut cfg = NativeConfig::new(exe, tmp.join("run"), tmp.join("runtimes"));
    cfg.prewarm = 0;
    let mut ok_all = true;
    match NativeSandbox::new(cfg) {
        Ok(sb) => {
            for (name, ok, detail) in sb.diagnostics() {
                ok_all &= ok;
                println!("{} {name}: {detail}", if ok { "ok  " } else { "FAIL" });
            }
        }
        Err(e) => {
            ok_all = false;
            println!("FAIL native sandbox: {e}");
        }
    }
    for (name, ok, detail) in GvisorSandbox::check(&GvisorConfig::new(
        std::env::current_exe()?,
        tmp.join("run/gvisor"),
        tmp.join("runtimes"),
    )) {
        println!("{} {name}: {detail}", if ok { "ok  " } else { "warn" });
    }
    for (name, ok, detail) in MicrovmSandbox::check(&MicrovmConfig::new(
        std::env::current_exe()?,
        tmp.join("run/microvm"),
        tmp.join("images"),
        tmp.join("runtimes"),
    )) {
        println!("{} {name}: {detail}", if ok { "ok  " } else { "warn" });
    }
    for (bin, why) in [
        ("/usr/bin/python3", "runtime python3"),
        ("/usr/bin/node", "runtime node"),
    ] {
        let ok = Path::new(bin).exists();
        println!(
            "{} {why}: {bin}{}",
            if ok { "ok  " } else { "warn" },
            if ok { "" } else { " not found" }
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !ok_all {
        bail!("some checks failed");
    }
    Ok(())
}

/// The Wasm tier, when compiled in, keeping compiled code in `cache_dir`; declares
/// `runtime: wasm` publishable.
#[cfg(feature = "wasm")]
fn wasm_tier(
    cache_dir: std::path::PathBuf,
    egress: Arc<skiff_core::net::EgressPolicy>,
) -> Option<Arc<dyn skiff_sandbox::Sandbox>> {
    skiff_core::publish::set_wasm_available(true);
    Some(Arc::new(skiff_wasm::WasmSandbox::new(
        Some(cache_dir),
        egress,
    )))
}

#[cfg(not(feature = "wasm"))]
fn wasm_tier(
    _cache_dir: std::path::PathBuf,
    _egress: Arc<skiff_core::net::EgressPolicy>,
) -> Option<Arc<dyn skiff_sandbox::Sandbox>> {
    None
}
