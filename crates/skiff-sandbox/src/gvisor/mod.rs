//! The gVisor tier: each instance is a `runsc` container (an OCI bundle generated from the
//! revision, [`bundle`]) whose process is the same Skiff agent as the native tier, talking to
//! the host over the container's stdin (a unix socket). The user-space kernel (the sentry)
//! stands between the function and the host kernel; the whole sandbox (`runsc`, sentry,
//! gofer) runs in a host cgroup with the instance's memory (+ [`GvisorConfig::overhead`]),
//! pids and CPU share, so an over-limit function takes down only its own sandbox.
//!
//! Instances can be checkpointed (`runsc checkpoint`: the sentry serialises the whole
//! sandbox, memory included) and restored (`runsc restore`) any number of times: the base of
//! the `checkpointed` and `branched` modes and of the snapshots API.
//!
//! Known limits of the Debian `runsc` (20221219) on these hosts, handled here: the KVM platform
//! hangs (the default platform is `ptrace`); for `network: outbound` runsc must start in a
//! private mount namespace with a tmpfs over `/proc/sys/net`, or it believes it runs in the
//! host's network namespace and refuses.

mod bundle;

use crate::native::cgroup::CgroupRoot;
use crate::native::net::{find_in_path, Slirp};
use crate::native::{valid_instance_id, HttpTarget, NativeInstance};
use crate::tunnel::HttpConn;
use crate::{Instance, InstanceSpec, InvokeRequest, InvokeResult, Sandbox, SandboxError};
use async_trait::async_trait;
use skiff_core::launch::HTTP_PORT;
use skiff_core::protocol::{AgentConfig, ExecMode, Frame, Kind};
use skiff_core::{FunctionSpec, Mode, Network};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Configuration of the gVisor tier.
#[derive(Debug, Clone)]
pub struct GvisorConfig {
    /// The `runsc` binary.
    pub runsc: PathBuf,
    /// `runsc --platform`: `ptrace` (works everywhere), `systrap` (newer runsc), `kvm`.
    pub platform: String,
    /// Executable that runs the agent (the `skiff` binary); bound read-only into every sandbox.
    pub agent_exe: PathBuf,
    /// Arguments that make `agent_exe` run the agent (`["__agent"]`).
    pub agent_args: Vec<String>,
    /// State directory (e.g. `<data>/run/gvisor`): bundles, runsc's state, the shared root.
    pub state_dir: PathBuf,
    /// Host directory mounted read-only at `/var/runtime`.
    pub runtime_dir: PathBuf,
    /// Unprivileged uid/gid functions run as (inside the sandbox).
    pub uid: u32,
    pub gid: u32,
    /// Most host tasks per sandbox (sentry and gofer threads, one stub per guest process).
    pub pids_max: u32,
    /// Memory the sentry and gofer need on top of the function's `memory`, added to the
    /// sandbox cgroup's limit.
    pub overhead: u64,
    /// slirp4netns binary for `network: outbound`; `None` disables outbound networking.
    pub slirp4netns: Option<PathBuf>,
    /// Offer `network: outbound` (runsc's netstack on a slirp4netns tap in a network
    /// namespace of the instance's own). On by default.
    pub outbound: bool,
}

impl GvisorConfig {
    /// Defaults: `runsc` from `$PATH` (or `/usr/bin/runsc`), platform `ptrace`, agent args
    /// `["__agent"]`, uid/gid 10001, 1024 host tasks, 64 MiB overhead.
    pub fn new(
        agent_exe: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
    ) -> Self {
        GvisorConfig {
            runsc: find_in_path("runsc").unwrap_or_else(|| "/usr/bin/runsc".into()),
            platform: "ptrace".into(),
            agent_exe: agent_exe.into(),
            agent_args: vec!["__agent".into()],
            state_dir: state_dir.into(),
            runtime_dir: runtime_dir.into(),
            uid: 10001,
            gid: 10001,
            pids_max: 1024,
            overhead: 64 << 20,
            slirp4netns: find_in_path("slirp4netns"),
            outbound: true,
        }
    }
}

/// The gVisor sandbox tier.
pub struct GvisorSandbox(Arc<Tier>);

/// What instances share with their tier (a checkpoint that keeps the instance running
/// relaunches it).
struct Tier {
    cfg: GvisorConfig,
    cgroups: CgroupRoot,
    rootfs: PathBuf,
    /// `runsc --root`: runsc's own container state.
    runsc_root: PathBuf,
    bundles: PathBuf,
    resolv_none: PathBuf,
    resolv_outbound: PathBuf,
}

impl GvisorSandbox {
    /// Checks the platform (root, cgroups, runsc) and prepares the state directories.
    pub fn new(cfg: GvisorConfig) -> Result<Self, SandboxError> {
        // SAFETY: getter.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Start(
                "the gVisor tier needs root (runsc and cgroups); run skiff as root".into(),
            ));
        }
        if !cfg.runsc.is_file() {
            return Err(SandboxError::Start(format!(
                "runsc not found at {} (apt-get install runsc)",
                cfg.runsc.display()
            )));
        }
        if !cfg.agent_exe.is_file() {
            return Err(SandboxError::Start(format!(
                "agent executable {} not found",
                cfg.agent_exe.display()
            )));
        }
        let cgroups = CgroupRoot::detect().map_err(SandboxError::Start)?;
        let rootfs = cfg.state_dir.join("rootfs");
        let runsc_root = cfg.state_dir.join("runsc");
        let bundles = cfg.state_dir.join("bundles");
        for d in [&runsc_root, &bundles, &cfg.runtime_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| SandboxError::Start(format!("mkdir {}: {e}", d.display())))?;
        }
        bundle::build_rootfs(&rootfs, cfg.uid, cfg.gid)?;
        let resolv_none = cfg.state_dir.join("resolv-none.conf");
        let resolv_outbound = cfg.state_dir.join("resolv-outbound.conf");
        for (p, text) in [
            (&resolv_none, "# network: none\n"),
            (&resolv_outbound, "nameserver 10.0.2.3\n"),
        ] {
            std::fs::write(p, text)
                .map_err(|e| SandboxError::Start(format!("write {}: {e}", p.display())))?;
        }
        let sb = Tier {
            cfg,
            cgroups,
            rootfs,
            runsc_root,
            bundles,
            resolv_none,
            resolv_outbound,
        };
        sb.cleanup_stale();
        Ok(GvisorSandbox(Arc::new(sb)))
    }

    /// Platform checks for `skiff doctor`: `(name, ok, detail)`.
    pub fn check(cfg: &GvisorConfig) -> Vec<(String, bool, String)> {
        let version = std::process::Command::new(&cfg.runsc)
            .arg("--version")
            .stdin(Stdio::null())
            .output();
        let runsc = match version {
            Ok(o) if o.status.success() => (
                true,
                format!(
                    "{} ({}), platform {}",
                    cfg.runsc.display(),
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim(),
                    cfg.platform
                ),
            ),
            _ => (
                false,
                format!(
                    "{} not runnable; sandbox: gvisor unavailable (apt-get install runsc)",
                    cfg.runsc.display()
                ),
            ),
        };
        vec![("runsc".to_string(), runsc.0, runsc.1)]
    }

    /// The configuration this tier runs with.
    pub fn config(&self) -> &GvisorConfig {
        &self.0.cfg
    }

    /// Writes the OCI bundle an instance of `spec` runs from into `dir` (network `none`) and
    /// returns the config frame its agent expects first on stdin: what `runsc run --bundle
    /// dir` needs to run the same sandbox without Skiff (the benchmarks' baseline).
    pub fn write_bundle(&self, spec: &InstanceSpec, dir: &Path) -> Result<Vec<u8>, SandboxError> {
        let t = &self.0;
        let b = bundle::BundleSpec {
            rootfs: &t.rootfs,
            agent_exe: &t.cfg.agent_exe,
            agent_args: &t.cfg.agent_args,
            code_dir: &spec.code_dir,
            runtime_dir: &t.cfg.runtime_dir,
            resolv_conf: &t.resolv_none,
            workspace: spec.workspace.as_deref(),
            tmp_bytes: spec.spec.tmp,
            netns: None,
        };
        bundle::write(dir, &bundle::spec(&b)?)?;
        Ok(Frame {
            kind: Kind::Config,
            header: serde_json::to_vec(&t.agent_config(spec))
                .map_err(|e| SandboxError::Start(format!("agent config: {e}")))?,
            body: Vec::new(),
        }
        .encode())
    }

    /// The cgroup directories an instance with this id uses (for tests and diagnostics).
    pub fn instance_cgroup_dirs(&self, instance_id: &str) -> Vec<PathBuf> {
        self.0.cgroups.instance_dirs(instance_id)
    }
}

impl Tier {
    /// Containers and bundles left behind by an earlier server that was killed.
    fn cleanup_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.bundles) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            runsc_delete(&self.cfg.runsc, &self.runsc_root, &id);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }

    fn agent_config(&self, spec: &InstanceSpec) -> AgentConfig {
        AgentConfig {
            exec_mode: spec.exec_mode,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: skiff_core::launch::TASK_ROOT.to_string(),
            workers: spec.spec.concurrency.max(1),
            runtime_api_port: skiff_core::launch::RUNTIME_API_PORT,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            hostname: "skiff".to_string(),
            root_dir: String::new(),
            binds: Vec::new(),
            etc_files: Vec::new(),
            tmp_bytes: spec.spec.tmp,
            wipe_tmp: matches!(spec.spec.mode, Mode::Warm | Mode::Ephemeral),
            wait_for_network: false,
            seccomp: true,
            rootfs: None,
            http_port: HTTP_PORT,
            prebuilt_root: true,
            // After a restore, epoll on the restored channel never wakes.
            blocking_channel: true,
            vm: false,
            max_procs: 0,
        }
    }

    fn check_spec(&self, spec: &InstanceSpec) -> Result<(), SandboxError> {
        if !valid_instance_id(&spec.instance_id) {
            return Err(SandboxError::Start(format!(
                "invalid instance id {:?}",
                spec.instance_id
            )));
        }
        if spec.spec.network == Network::Outbound && !self.cfg.outbound {
            return Err(SandboxError::Unsupported(
                "network: outbound is turned off for sandbox: gvisor on this server \
                 (use network: none, or sandbox: native)"
                    .into(),
            ));
        }
        if spec.rootfs.is_some() {
            return Err(SandboxError::Unsupported(
                "root images are not available with sandbox: gvisor yet".into(),
            ));
        }
        if !spec.code_dir.is_dir() {
            return Err(SandboxError::Start(format!(
                "code directory {} does not exist",
                spec.code_dir.display()
            )));
        }
        Ok(())
    }

    /// Writes the bundle, starts `runsc run` (or `restore` from `image`) in the instance's
    /// cgroup, and wires it up like a native agent.
    async fn launch(
        &self,
        spec: &InstanceSpec,
        id: &str,
        image: Option<&Path>,
    ) -> Result<NativeInstance, SandboxError> {
        self.check_spec(spec)?;
        let outbound = spec.spec.network == Network::Outbound;
        let slirp_bin = match (outbound, &self.cfg.slirp4netns) {
            (false, _) => None,
            (true, Some(p)) => Some(p.clone()),
            (true, None) => {
                return Err(SandboxError::Start(
                    "network: outbound needs slirp4netns (apt-get install slirp4netns); or set network: none".into(),
                ))
            }
        };
        let id = id.to_string();
        let bundle_dir = self.bundles.join(&id);
        let mut bspec = bundle::BundleSpec {
            rootfs: &self.rootfs,
            agent_exe: &self.cfg.agent_exe,
            agent_args: &self.cfg.agent_args,
            code_dir: &spec.code_dir,
            runtime_dir: &self.cfg.runtime_dir,
            resolv_conf: if outbound {
                &self.resolv_outbound
            } else {
                &self.resolv_none
            },
            workspace: spec.workspace.as_deref(),
            tmp_bytes: spec.spec.tmp,
            netns: None,
        };
        // Outbound: the bundle names runsc's own network namespace (made by the spawned
        // child before it execs runsc), written once its pid is known.
        if !outbound {
            bundle::write(&bundle_dir, &bundle::spec(&bspec)?)?;
        }
        let cleanup = {
            let (root, dir, id) = (self.runsc_root.clone(), bundle_dir.clone(), id.clone());
            let procs: Vec<PathBuf> = self
                .cgroups
                .instance_dirs(&id)
                .into_iter()
                .map(|d| d.join("cgroup.procs"))
                .collect();
            move || {
                // `runsc run` is gone and its attached sandbox and gofer die with it; kill
                // whatever of the sandbox might linger, then drop runsc's state by hand
                // (`runsc delete` spends over a second probing the dead sandbox).
                for p in &procs {
                    for pid in std::fs::read_to_string(p).unwrap_or_default().lines() {
                        if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                            // SAFETY: SIGKILL to a process of this instance's own cgroup.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                }
                forget_container(&root, &id);
                let _ = std::fs::remove_dir_all(&dir);
            }
        };
        let config_frame = match image {
            // A restored agent already has its config.
            Some(_) => Vec::new(),
            None => Frame {
                kind: Kind::Config,
                header: serde_json::to_vec(&self.agent_config(spec))
                    .map_err(|e| SandboxError::Start(format!("agent config: {e}")))?,
                body: Vec::new(),
            }
            .encode(),
        };

        let mut argv: Vec<String> = vec![
            self.cfg.runsc.display().to_string(),
            format!("--root={}", self.runsc_root.display()),
            format!("--platform={}", self.cfg.platform),
            format!("--network={}", if outbound { "sandbox" } else { "none" }),
            "--ignore-cgroups".into(),
        ];
        match image {
            None => argv.push("run".into()),
            Some(img) => {
                argv.push("restore".into());
                argv.push(format!("--image-path={}", img.display()));
            }
        }
        argv.push(format!("--bundle={}", bundle_dir.display()));
        argv.push(id.clone());

        let crate::monitor::Monitored { inst, pid, go } = crate::monitor::launch(
            &self.cgroups,
            &id,
            spec.spec.memory + self.cfg.overhead,
            self.cfg.pids_max,
            &argv,
            outbound,
            spec.spec.memory_mb(),
            config_frame,
            "runsc",
            cleanup,
        )
        .await?;
        let inst = inst.with_http((spec.exec_mode == ExecMode::Http).then_some(HttpTarget::Tunnel));
        if let Some(bin) = slirp_bin {
            // runsc waits for `go` in its fresh network namespace until the tap is there.
            let ns = format!("/proc/{pid}/ns/net");
            bspec.netns = Some(&ns);
            let ready = match bundle::spec(&bspec).and_then(|o| bundle::write(&bundle_dir, &o)) {
                Ok(()) => Slirp::start(&bin, pid).await,
                Err(e) => Err(e),
            };
            match ready {
                Ok(s) => inst.set_slirp(s),
                Err(e) => {
                    inst.stop().await;
                    return Err(e);
                }
            }
        }
        if let Some(go) = go {
            // SAFETY: writing one byte from a valid buffer to our pipe.
            unsafe {
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&go),
                    b"g".as_ptr().cast(),
                    1,
                )
            };
        }
        if image.is_some() {
            // The restored agent is quiesced, as it was when the snapshot was taken (after
            // the function's init).
            inst.mark_initialized();
            inst.send_bare(Kind::Resume);
        }
        Ok(inst)
    }

    /// Starts (or restores) an instance under its own id.
    async fn instance(
        self: &Arc<Self>,
        spec: InstanceSpec,
        image: Option<&Path>,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        let inst = self.launch(&spec, &spec.instance_id, image).await?;
        Ok(Arc::new(GvisorInstance {
            tier: self.clone(),
            spec,
            current: parking_lot::RwLock::new(Arc::new(inst)),
            generation: std::sync::atomic::AtomicU32::new(0),
            snapshotting: tokio::sync::Mutex::new(()),
        }))
    }
}

/// Removes runsc's state files of a container whose processes are gone.
fn forget_container(root: &Path, id: &str) {
    for ext in ["state", "lock"] {
        let _ = std::fs::remove_file(root.join(format!("{id}_sandbox:{id}.{ext}")));
    }
}

/// `runsc delete --force ID`: kills the container if it still runs and removes its state
/// (for containers left by an earlier server; slow, so not used on the stop path).
fn runsc_delete(runsc: &Path, root: &Path, id: &str) {
    let _ = std::process::Command::new(runsc)
        .arg(format!("--root={}", root.display()))
        .args(["delete", "--force", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[async_trait]
impl Sandbox for GvisorSandbox {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        self.0.instance(spec, None).await
    }

    async fn prepare(
        &self,
        spec: &FunctionSpec,
        _code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        Ok(skiff_core::launch::program(spec).0)
    }

    async fn restore(
        &self,
        spec: InstanceSpec,
        image: &Path,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        if !image.join("checkpoint.img").is_file() {
            return Err(SandboxError::Start(format!(
                "no snapshot image in {}",
                image.display()
            )));
        }
        self.0.instance(spec, Some(image)).await
    }

    async fn shutdown(&self) {
        self.0.cgroups.remove_server_dirs();
    }
}

/// A running gVisor instance: a native-style agent connection to the current container.
/// A checkpoint that keeps the instance running replaces the container by one restored
/// from the image just taken (this `runsc` cannot resume a checkpointed container in place).
pub struct GvisorInstance {
    tier: Arc<Tier>,
    spec: InstanceSpec,
    current: parking_lot::RwLock<Arc<NativeInstance>>,
    /// Containers this instance has had (names the next one).
    generation: std::sync::atomic::AtomicU32,
    /// One snapshot at a time.
    snapshotting: tokio::sync::Mutex<()>,
}

impl GvisorInstance {
    fn current(&self) -> Arc<NativeInstance> {
        self.current.read().clone()
    }
}

#[async_trait]
impl Instance for GvisorInstance {
    fn id(&self) -> &str {
        &self.spec.instance_id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        self.current().invoke(req).await
    }

    async fn stop(&self) {
        self.current().stop().await
    }

    fn is_alive(&self) -> bool {
        self.current().is_alive()
    }

    async fn initialized(&self, within: Duration) -> Result<(), SandboxError> {
        self.current().wait_initialized(within).await
    }

    fn memory_usage(&self) -> Option<u64> {
        self.current().memory_usage()
    }

    fn memory_peak(&self) -> Option<u64> {
        self.current().memory_peak()
    }

    fn take_output(&self) -> Vec<u8> {
        self.current().take_output()
    }

    async fn connect_http(&self, ready_within: Duration) -> Result<HttpConn, SandboxError> {
        self.current().connect_http(ready_within).await
    }

    async fn checkpoint(
        &self,
        image: &Path,
        init_within: Duration,
        leave_running: bool,
    ) -> Result<(), SandboxError> {
        let _one = self.snapshotting.lock().await;
        let inner = self.current();
        inner.wait_initialized(init_within).await?;
        inner.quiesce(Duration::from_secs(5)).await?;
        std::fs::create_dir_all(image)?;
        // A new snapshot replaces the one in `image` (restored sandboxes do not keep it open).
        match std::fs::remove_file(image.join("checkpoint.img")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let out = tokio::process::Command::new(&self.tier.cfg.runsc)
            .arg(format!("--root={}", self.tier.runsc_root.display()))
            .arg("checkpoint")
            .arg(format!("--image-path={}", image.display()))
            .arg(inner.id())
            .stdin(Stdio::null())
            .output()
            .await?;
        // The container exits after a checkpoint: that is not a crash.
        inner.stop().await;
        if !out.status.success() {
            return Err(SandboxError::Crashed {
                message: format!(
                    "runsc checkpoint failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                log_tail: String::new(),
            });
        }
        if leave_running {
            let n = self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            let id = format!("{}.r{n}", self.spec.instance_id);
            let next = self.tier.launch(&self.spec, &id, Some(image)).await?;
            *self.current.write() = Arc::new(next);
        }
        Ok(())
    }
}
