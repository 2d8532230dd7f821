//! The native tier: each instance is the Skiff agent running as PID 1 of fresh pid, mount,
//! network, ipc and uts namespaces, inside its own cgroups (memory, pids, cpu), on a read-only
//! tmpfs root with read-only binds of the host's `/usr` and a few `/etc` files, an unprivileged
//! uid, no capabilities, `no_new_privs` and a seccomp filter. Outbound networking (optional)
//! goes through slirp4netns; nothing can connect in.
//!
//! Requires root for now (cgroup and namespace setup), a kernel with `pidfd` support (5.3+),
//! and cgroup v1 (memory + pids) or a delegated cgroup v2 subtree.

pub(crate) mod cgroup;
mod instance;
pub(crate) mod net;
mod netns;
mod spawn;

pub(crate) use instance::HttpTarget;
pub use instance::NativeInstance;
pub(crate) use spawn::{clone_into_cgroups, dup_high};

use crate::{Instance, InstanceSpec, Sandbox, SandboxError};
use async_trait::async_trait;
use cgroup::{CgroupRoot, InstanceCgroup};
use skiff_core::launch::{HTTP_PORT, RUNTIME_API_PORT, RUNTIME_DIR, TASK_ROOT};
use skiff_core::protocol::{AgentConfig, Bind, ExecMode, Frame, Kind};
use skiff_core::{Mode, Network};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `/etc` entries made visible (read-only) inside every sandbox, when they exist on the host.
pub(crate) const ETC_WHITELIST: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "nsswitch.conf",
    "protocols",
    "services",
    "mime.types",
];

/// Top-level system directories bound when they are real directories on the host (on
/// merged-/usr hosts they are symlinks, recreated by the agent).
pub(crate) const SYSTEM_DIRS: &[&str] = &["bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// Read-only binds of the host's system: `/usr`, the top-level system dirs that are real
/// directories (not usr-merge symlinks) and the [`ETC_WHITELIST`] entries that exist.
pub(crate) fn system_binds() -> Vec<Bind> {
    let mut binds = vec![Bind {
        src: "/usr".into(),
        dst: "/usr".into(),
        rw: false,
    }];
    for d in SYSTEM_DIRS {
        let p = Path::new("/").join(d);
        if std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            binds.push(Bind {
                src: p.display().to_string(),
                dst: p.display().to_string(),
                rw: false,
            });
        }
    }
    for e in ETC_WHITELIST {
        let p = Path::new("/etc").join(e);
        if p.exists() {
            let s = p.display().to_string();
            binds.push(Bind {
                src: s.clone(),
                dst: s,
                rw: false,
            });
        }
    }
    binds
}

/// The files the agent writes into a sandbox's `/etc`: users, hosts, hostname, resolver.
pub(crate) fn etc_files(uid: u32, gid: u32, outbound: bool) -> Vec<(String, String)> {
    vec![
        (
            "passwd".to_string(),
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\nsbx_user:x:{uid}:{gid}::/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        ("group".to_string(), format!("root:x:0:\nsbx_user:x:{gid}:\nnogroup:x:65534:\n")),
        ("hosts".to_string(), "127.0.0.1 localhost skiff\n::1 localhost ip6-localhost\n".to_string()),
        ("hostname".to_string(), "skiff\n".to_string()),
        (
            "resolv.conf".to_string(),
            if outbound { "nameserver 10.0.2.3\n".to_string() } else { "# network: none\n".to_string() },
        ),
    ]
}

/// Configuration of the native tier.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    /// Executable that runs the agent (normally the `skiff` binary itself).
    pub agent_exe: PathBuf,
    /// Arguments that make `agent_exe` run the agent (`["__agent"]` for the `skiff` binary).
    pub agent_args: Vec<String>,
    /// Runtime state directory (e.g. `<data>/run`); `<state_dir>/root` is the (empty) mountpoint
    /// of each sandbox's root inside its own mount namespace.
    pub state_dir: PathBuf,
    /// Host directory mounted read-only at `/var/runtime` (runtime bootstraps).
    pub runtime_dir: PathBuf,
    /// Unprivileged uid functions run as.
    pub uid: u32,
    /// Unprivileged gid functions run as.
    pub gid: u32,
    /// Most tasks (processes and threads) per instance.
    pub pids_max: u32,
    /// Install the seccomp filter.
    pub seccomp: bool,
    /// Agents kept cloned, attached to their cgroups and exec'd ahead of demand, so a cold
    /// start does not wait for the cgroup migration (on cgroup v1 that waits for an RCU grace
    /// period: ~20 ms on an idle host). 0 disables the pool.
    pub prewarm: usize,
    /// slirp4netns binary for `network: outbound`; `None` disables outbound networking.
    pub slirp4netns: Option<PathBuf>,
}

impl NativeConfig {
    /// Defaults: agent args `["__agent"]`, uid/gid 10001, 256 tasks, seccomp on, slirp4netns
    /// from `$PATH`.
    pub fn new(
        agent_exe: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
    ) -> Self {
        NativeConfig {
            agent_exe: agent_exe.into(),
            agent_args: vec!["__agent".to_string()],
            state_dir: state_dir.into(),
            runtime_dir: runtime_dir.into(),
            uid: 10001,
            gid: 10001,
            pids_max: 256,
            seccomp: true,
            slirp4netns: net::find_in_path("slirp4netns"),
            prewarm: 2,
        }
    }
}

/// The native sandbox tier.
pub struct NativeSandbox {
    cfg: NativeConfig,
    root_dir: String,
    /// Host system binds common to every instance.
    system_binds: Vec<Bind>,
    spawner: Arc<Spawner>,
}

/// Clones agents into fresh namespaces and cgroups, and keeps a few ready ahead of demand.
struct Spawner {
    cgroups: CgroupRoot,
    exec: spawn::AgentExec,
    pids_max: u32,
    prewarm: usize,
    /// Pre-spawned agents waiting for their config.
    pool: parking_lot::Mutex<Vec<Prepared>>,
    /// Set while a background refill runs.
    refilling: std::sync::atomic::AtomicBool,
    /// Set at shutdown: no more pre-spawning.
    closed: std::sync::atomic::AtomicBool,
}

/// Names pre-spawned agents' cgroups uniquely within the process (all sandboxes of one
/// process share its `s<pid>` cgroup directory).
static POOL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An agent cloned ahead of demand: fresh namespaces, its own cgroups (`pool-…` until it is
/// given an instance), exec'd and blocked reading its config.
struct Prepared {
    cg: InstanceCgroup,
    host: std::os::unix::net::UnixStream,
    err_r: OwnedFd,
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

impl Prepared {
    /// Kills and reaps the agent and removes its cgroups (pool entries never served).
    fn discard(self) {
        // SAFETY: signalling and reaping our own, not yet reaped, child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, 0);
        }
        self.cg.remove_blocking(std::time::Duration::from_secs(1));
    }
}

fn is_root() -> bool {
    // SAFETY: getter.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn path_str(p: &Path) -> Result<String, SandboxError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| SandboxError::Start(format!("path is not UTF-8: {}", p.display())))
}

impl NativeSandbox {
    /// Checks the platform (root, cgroups) and prepares the state directories.
    pub fn new(cfg: NativeConfig) -> Result<Self, SandboxError> {
        if !is_root() {
            return Err(SandboxError::Start(
                "the native sandbox tier needs root for now (cgroups and namespaces); run skiff as root".into(),
            ));
        }
        if !cfg.agent_exe.is_file() {
            return Err(SandboxError::Start(format!(
                "agent executable {} not found",
                cfg.agent_exe.display()
            )));
        }
        let cgroups = CgroupRoot::detect().map_err(SandboxError::Start)?;
        cgroups.cleanup_stale();
        let root = cfg.state_dir.join("root");
        std::fs::create_dir_all(&root)
            .and_then(|_| std::fs::create_dir_all(&cfg.runtime_dir))
            .map_err(|e| SandboxError::Start(format!("create state directories: {e}")))?;
        let exec = spawn::AgentExec::new(&cfg.agent_exe, &cfg.agent_args)?;

        let system_binds = system_binds();
        tracing::info!("native sandbox: cgroups {}", cgroups.describe());
        let spawner = Arc::new(Spawner {
            cgroups,
            exec,
            pids_max: cfg.pids_max,
            prewarm: cfg.prewarm,
            pool: parking_lot::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        spawner.refill();
        Ok(NativeSandbox {
            root_dir: path_str(&root)?,
            cfg,
            system_binds,
            spawner,
        })
    }

    /// Platform checks for `skiff doctor`, without needing a constructed sandbox:
    /// `(name, ok, detail)`.
    pub fn check(cfg: &NativeConfig) -> Vec<(String, bool, String)> {
        let mut v = Vec::new();
        // SAFETY: getter.
        let euid = unsafe { libc::geteuid() };
        v.push((
            "root".to_string(),
            euid == 0,
            if euid == 0 {
                "running as root".to_string()
            } else {
                format!("running as uid {euid}; the native tier needs root for now")
            },
        ));
        let cg = if euid == 0 {
            CgroupRoot::detect()
        } else {
            Err("not checked (needs root)".to_string())
        };
        v.push(match cg {
            Ok(c) => ("cgroups".to_string(), true, c.describe()),
            Err(e) => ("cgroups".to_string(), false, e),
        });
        // SAFETY: pidfd_open on ourselves; closed right away.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        if fd >= 0 {
            // SAFETY: fresh fd.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        v.push((
            "pidfd".to_string(),
            fd >= 0,
            if fd >= 0 {
                "pidfd_open works".to_string()
            } else {
                format!(
                    "pidfd_open: {} (kernel 5.3+ needed)",
                    std::io::Error::last_os_error()
                )
            },
        ));
        v.push((
            "agent".to_string(),
            cfg.agent_exe.is_file(),
            format!("{} {}", cfg.agent_exe.display(), cfg.agent_args.join(" ")),
        ));
        v.push(match &cfg.slirp4netns {
            Some(p) if p.is_file() => ("slirp4netns".to_string(), true, p.display().to_string()),
            Some(p) => (
                "slirp4netns".to_string(),
                false,
                format!("{} not found; network: outbound unavailable", p.display()),
            ),
            None => (
                "slirp4netns".to_string(),
                false,
                "not found on PATH; network: outbound unavailable (apt-get install slirp4netns)"
                    .to_string(),
            ),
        });
        v.push((
            "seccomp".to_string(),
            cfg.seccomp,
            if cfg.seccomp {
                "filter enabled".to_string()
            } else {
                "disabled by configuration".to_string()
            },
        ));
        v
    }

    /// Platform checks for `skiff doctor`: `(name, ok, detail)`.
    pub fn diagnostics(&self) -> Vec<(String, bool, String)> {
        let mut v = Self::check(&self.cfg);
        v.push((
            "state_dir".to_string(),
            Path::new(&self.root_dir).is_dir(),
            self.root_dir.clone(),
        ));
        v
    }

    /// The cgroup directories an instance with this id uses (for tests and diagnostics).
    pub fn instance_cgroup_dirs(&self, instance_id: &str) -> Vec<PathBuf> {
        self.spawner.cgroups.instance_dirs(instance_id)
    }

    fn agent_config(&self, spec: &InstanceSpec) -> Result<AgentConfig, SandboxError> {
        // With a root image the agent binds the image instead of the host's system dirs.
        let (mut binds, rootfs) = match &spec.rootfs {
            Some(dir) => (Vec::new(), Some(path_str(dir)?)),
            None => (self.system_binds.clone(), None),
        };
        binds.push(Bind {
            src: path_str(&spec.code_dir)?,
            dst: TASK_ROOT.into(),
            rw: false,
        });
        binds.push(Bind {
            src: path_str(&self.cfg.runtime_dir)?,
            dst: RUNTIME_DIR.into(),
            rw: false,
        });
        if let Some(ws) = &spec.workspace {
            binds.push(Bind {
                src: path_str(ws)?,
                dst: crate::WORKSPACE_DIR.into(),
                rw: true,
            });
        }
        let (uid, gid) = (self.cfg.uid, self.cfg.gid);
        let outbound = spec.spec.network == Network::Outbound;
        let etc_files = etc_files(uid, gid, outbound);
        Ok(AgentConfig {
            exec_mode: spec.exec_mode,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: TASK_ROOT.to_string(),
            workers: spec.spec.concurrency.max(1),
            runtime_api_port: RUNTIME_API_PORT,
            uid,
            gid,
            hostname: "skiff".to_string(),
            root_dir: self.root_dir.clone(),
            binds,
            etc_files,
            tmp_bytes: spec.spec.tmp,
            wipe_tmp: matches!(spec.spec.mode, Mode::Warm | Mode::Ephemeral),
            wait_for_network: outbound,
            seccomp: self.cfg.seccomp,
            rootfs,
            http_port: HTTP_PORT,
            prebuilt_root: false,
            blocking_channel: false,
            vm: false,
            max_procs: 0,
        })
    }
}

impl Drop for NativeSandbox {
    fn drop(&mut self) {
        self.spawner.drain();
    }
}

impl Spawner {
    /// Clones an agent into fresh namespaces and cgroups named `cgroup_id`. The parent returns
    /// at once; the child joins the cgroups and execs the agent, which then waits for its config.
    fn prepare(&self, cgroup_id: &str, memory: u64) -> Result<Prepared, SandboxError> {
        let mut cg = self
            .cgroups
            .create(cgroup_id, memory, self.pids_max)
            .map_err(|e| SandboxError::Start(format!("cgroup: {e}")))?;
        let spawned = (|| -> std::io::Result<_> {
            let (host, child) = std::os::unix::net::UnixStream::pair()?;
            let (err_r, err_w) = pipe()?;
            let devnull: OwnedFd = std::fs::File::open("/dev/null")?.into();
            let child: OwnedFd = child.into();
            let (pid, pidfd) = spawn::clone_agent(&self.exec, &cg.procs, &child, &devnull, &err_w)?;
            Ok((host, err_r, pid, pidfd))
        })();
        cg.procs.clear();
        match spawned {
            Ok((host, err_r, pid, pidfd)) => Ok(Prepared {
                cg,
                host,
                err_r,
                pid,
                pidfd,
            }),
            Err(e) => {
                cg.remove_blocking(std::time::Duration::from_millis(500));
                Err(SandboxError::Start(format!(
                    "cannot start the sandbox agent: {e}"
                )))
            }
        }
    }

    /// A pre-spawned agent for an instance, renamed and sized for it, or a freshly cloned one.
    fn take_or_prepare(&self, spec: &InstanceSpec) -> Result<Prepared, SandboxError> {
        let pooled = self.pool.lock().pop();
        match pooled {
            Some(mut p) => {
                p.cg.rename(&spec.instance_id);
                if let Err(e) = p.cg.set_memory(spec.spec.memory) {
                    p.discard();
                    return Err(SandboxError::Start(format!("cgroup memory limit: {e}")));
                }
                Ok(p)
            }
            None => self.prepare(&spec.instance_id, spec.spec.memory),
        }
    }

    /// Tops the pool up to `prewarm` entries on a background thread (one refill at a time).
    fn refill(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.prewarm == 0
            || self.closed.load(Ordering::Acquire)
            || self.pool.lock().len() >= self.prewarm
        {
            return;
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            while me.pool.lock().len() < me.prewarm && !me.closed.load(Ordering::Acquire) {
                let n = POOL_SEQ.fetch_add(1, Ordering::Relaxed);
                match me.prepare(&format!("pool-{n}"), skiff_core::spec::MEMORY_DEFAULT) {
                    Ok(p) => {
                        let mut pool = me.pool.lock();
                        if me.closed.load(Ordering::Acquire) {
                            drop(pool);
                            p.discard();
                        } else {
                            pool.push(p);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("pre-spawning a sandbox failed: {e}");
                        break;
                    }
                }
            }
            me.refilling.store(false, Ordering::Release);
        });
    }

    /// Discards every pre-spawned agent and removes this server's cgroup directories.
    fn drain(&self) {
        use std::sync::atomic::Ordering;
        self.closed.store(true, Ordering::Release);
        // A refill in progress may still be cloning an agent: let it finish (it discards it).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.refilling.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let pooled: Vec<Prepared> = self.pool.lock().drain(..).collect();
        for p in pooled {
            p.discard();
        }
        self.cgroups.remove_server_dirs();
    }
}

pub(crate) fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[async_trait]
impl Sandbox for NativeSandbox {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        if !valid_instance_id(&spec.instance_id) {
            return Err(SandboxError::Start(format!(
                "invalid instance id {:?}",
                spec.instance_id
            )));
        }
        if spec.argv.is_empty() {
            return Err(SandboxError::Start("nothing to run: empty argv".into()));
        }
        if !spec.code_dir.is_dir() {
            return Err(SandboxError::Start(format!(
                "code directory {} does not exist",
                spec.code_dir.display()
            )));
        }
        if let Some(dir) = &spec.rootfs {
            if !dir.is_absolute() || !dir.is_dir() {
                return Err(SandboxError::Start(format!(
                    "root image {} is not an absolute path to a directory",
                    dir.display()
                )));
            }
        }
        let slirp_bin = match spec.spec.network {
            Network::Outbound => match &self.cfg.slirp4netns {
                Some(p) => Some(p.clone()),
                None => {
                    return Err(SandboxError::Start(
                        "network: outbound needs slirp4netns (apt-get install slirp4netns); or set network: none".into(),
                    ))
                }
            },
            Network::None => None,
        };
        let cfg = self.agent_config(&spec)?;
        let header = serde_json::to_vec(&cfg)
            .map_err(|e| SandboxError::Start(format!("agent config: {e}")))?;
        let config_frame = Frame {
            kind: Kind::Config,
            header,
            body: Vec::new(),
        }
        .encode();

        let Prepared {
            cg,
            host,
            err_r,
            pid,
            pidfd,
        } = self.spawner.take_or_prepare(&spec)?;
        self.spawner.refill();
        let cg = Arc::new(cg);
        // The agent is not reaped before `launch` watches it, so the pid is still its own.
        let http = match spec.exec_mode {
            ExecMode::Http => netns::open_ns(&format!("/proc/{pid}/ns/net"))
                .map(|ns| Some(instance::HttpTarget::Netns(Arc::new(ns))))
                .map_err(|e| format!("cannot open the sandbox's network namespace: {e}")),
            _ => Ok(None),
        };
        let launched = http.and_then(|http| {
            NativeInstance::launch(
                spec.instance_id.clone(),
                pidfd,
                host,
                err_r,
                cg.clone(),
                spec.spec.memory_mb(),
                config_frame,
            )
            .map(|i| i.with_http(http))
            .map_err(|e| format!("cannot watch the sandbox agent: {e}"))
        });
        let inst = match launched {
            Ok(i) => i,
            Err(e) => {
                // Dropping the pidfd does not kill: do it by pid (not reaped yet, so no reuse).
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let mut st = 0;
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid, &mut st, 0) };
                cg.remove().await;
                return Err(SandboxError::Start(e));
            }
        };
        if let Some(bin) = slirp_bin {
            match net::Slirp::start(&bin, pid).await {
                Ok(s) => {
                    inst.set_slirp(s);
                    inst.send_bare(Kind::NetReady);
                }
                Err(e) => {
                    inst.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(inst))
    }

    async fn shutdown(&self) {
        let sp = self.spawner.clone();
        let _ = tokio::task::spawn_blocking(move || sp.drain()).await;
    }
}

pub(crate) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
