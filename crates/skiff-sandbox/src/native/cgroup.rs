//! Per-instance cgroups: v1 (memory, pids, cpu hierarchies) or v2 (unified), nested under the
//! server's own cgroup as `<own>/skiff/<instance_id>`.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where instance cgroups are created.
#[derive(Debug, Clone)]
pub(crate) enum CgroupRoot {
    /// Legacy hierarchies: `<mount><own path>/skiff` per controller.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    /// Unified hierarchy: `<mount><own path>/skiff`.
    V2 { base: PathBuf, cpu: bool },
}

/// The cgroups of one instance.
#[derive(Debug)]
pub(crate) struct InstanceCgroup {
    v2: bool,
    /// Every directory created (memory first).
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, opened before the agent is cloned.
    pub(crate) procs: Vec<OwnedFd>,
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    superopts: String,
}

/// Undoes the `\040`-style escapes of /proc/self/mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> io::Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        v.push(Mount {
            root: unescape(pre[3]),
            point: PathBuf::from(unescape(pre[4])),
            fstype: post[0].to_string(),
            superopts: post[2].to_string(),
        });
    }
    Ok(v)
}

/// `mountpoint + (own_path relative to the mount's root)`.
fn join_mount(m: &Mount, own: &str) -> PathBuf {
    let rel = if m.root == "/" {
        own
    } else {
        own.strip_prefix(m.root.as_str()).unwrap_or(own)
    };
    m.point.join(rel.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display())))
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("mkdir {}: {e}", path.display()),
        )),
    }
}

/// Creates an instance cgroup; it must not exist yet (two instances never share one).
fn mkdir_new(path: &Path) -> io::Result<()> {
    fs::create_dir(path)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))
}

fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let p = dir.join("cgroup.procs");
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: valid path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("open {}: {e}", p.display()),
        ));
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This server's directory under `skiff/` in each hierarchy.
fn server_dir_name() -> String {
    format!("s{}", std::process::id())
}

/// CPU weight proportional to memory: 1769 MiB = one full CPU (as on Lambda).
pub(crate) fn cpu_shares(memory: u64) -> u64 {
    ((memory >> 20) * 1024 / 1769).max(2)
}

impl CgroupRoot {
    /// Finds our own cgroup and prepares `<own>/skiff` in each hierarchy we use.
    pub(crate) fn detect() -> Result<CgroupRoot, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
        let mounts = mounts().map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
        // hierarchy-id:controllers:path
        let own_v1 = |ctrl: &str| -> Option<String> {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == ctrl)
                    .then(|| path.to_string())
            })
        };
        let v1_dir = |ctrl: &str| -> Option<PathBuf> {
            let path = own_v1(ctrl)?;
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.superopts.split(',').any(|o| o == ctrl))?;
            Some(join_mount(m, &path).join("skiff").join(server_dir_name()))
        };
        if let Some(memory) = v1_dir("memory") {
            let pids =
                v1_dir("pids").ok_or("cgroup v1 memory controller found but no pids controller")?;
            let cpu = v1_dir("cpu");
            for d in [Some(&memory), Some(&pids), cpu.as_ref()]
                .into_iter()
                .flatten()
            {
                fs::create_dir_all(d).map_err(|e| format!("create cgroup {}: {e}", d.display()))?;
            }
            return Ok(CgroupRoot::V1 { memory, pids, cpu });
        }
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or(
            "no usable cgroup: no v1 memory controller and no cgroup v2 entry in /proc/self/cgroup",
        )?;
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .ok_or("no usable cgroup: cgroup2 is not mounted")?;
        let own_dir = join_mount(m, path);
        let available = fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|x| x == c);
        if !has("memory") || !has("pids") {
            return Err(format!(
                "cgroup v2 at {} does not delegate the memory and pids controllers (available: {:?})",
                own_dir.display(),
                available.trim()
            ));
        }
        let cpu = has("cpu");
        let ctrls = if cpu {
            "+memory +pids +cpu"
        } else {
            "+memory +pids"
        };
        enable_subtree(&own_dir, ctrls)?;
        let skiff = own_dir.join("skiff");
        mkdir(&skiff).map_err(|e| e.to_string())?;
        write(&skiff.join("cgroup.subtree_control"), ctrls).map_err(|e| e.to_string())?;
        let base = skiff.join(server_dir_name());
        mkdir(&base).map_err(|e| e.to_string())?;
        write(&base.join("cgroup.subtree_control"), ctrls).map_err(|e| e.to_string())?;
        Ok(CgroupRoot::V2 { base, cpu })
    }

    /// One line for diagnostics.
    pub(crate) fn describe(&self) -> String {
        match self {
            CgroupRoot::V1 { memory, pids, cpu } => format!(
                "v1: memory {}, pids {}, cpu {}",
                memory.display(),
                pids.display(),
                cpu.as_ref()
                    .map_or("(none)".to_string(), |c| c.display().to_string())
            ),
            CgroupRoot::V2 { base, cpu } => format!(
                "v2: {} (cpu {})",
                base.display(),
                if *cpu { "yes" } else { "no" }
            ),
        }
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            CgroupRoot::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.as_path(), pids.as_path()];
                v.extend(cpu.as_deref());
                v
            }
            CgroupRoot::V2 { base, .. } => vec![base.as_path()],
        }
    }

    /// The directories an instance's cgroups live in (whether or not they exist).
    pub(crate) fn instance_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(id)).collect()
    }

    /// Removes what servers that are no longer running left behind: each server keeps its
    /// instances under `skiff/s<pid>`, so a live server's cgroups are never touched. Agents of a
    /// dead server exit when their channel closes; their cgroups are then empty.
    pub(crate) fn cleanup_stale(&self) {
        for server_dir in self.parents() {
            let Some(skiff) = server_dir.parent() else {
                continue;
            };
            let Ok(rd) = fs::read_dir(skiff) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let Some(pid) = name.strip_prefix('s').and_then(|p| p.parse::<u32>().ok()) else {
                    // Not a server directory (an older layout): removed only if empty.
                    let _ = fs::remove_dir(e.path());
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() || !e.path().is_dir() {
                    continue;
                }
                if let Ok(children) = fs::read_dir(e.path()) {
                    for c in children.flatten().filter(|c| c.path().is_dir()) {
                        let _ = fs::remove_dir(c.path());
                    }
                }
                let _ = fs::remove_dir(e.path());
            }
        }
    }

    /// Removes this server's own (by then empty) cgroup directories, at shutdown.
    pub(crate) fn remove_server_dirs(&self) {
        for d in self.parents() {
            if let Err(e) = fs::remove_dir(d) {
                let left: Vec<_> = fs::read_dir(d)
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| e.file_name())
                            .collect()
                    })
                    .unwrap_or_default();
                // Other sandboxes of this process may still use it.
                tracing::debug!("keeping {}: {e} (in use: {left:?})", d.display());
            }
        }
    }

    /// Creates and configures the cgroups of an instance and opens their `cgroup.procs`.
    pub(crate) fn create(
        &self,
        id: &str,
        memory: u64,
        pids_max: u32,
    ) -> io::Result<InstanceCgroup> {
        let mut cg = InstanceCgroup {
            v2: matches!(self, CgroupRoot::V2 { .. }),
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        match self.configure(&mut cg, id, memory, pids_max) {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.procs.clear();
                cg.remove_blocking(Duration::from_millis(100));
                Err(e)
            }
        }
    }

    fn configure(
        &self,
        cg: &mut InstanceCgroup,
        id: &str,
        memory: u64,
        pids_max: u32,
    ) -> io::Result<()> {
        let mem = memory.to_string();
        match self {
            CgroupRoot::V1 {
                memory: mroot,
                pids,
                cpu,
            } => {
                // Recreated if another tier of this process removed it at its shutdown.
                for root in [Some(mroot), Some(pids), cpu.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    fs::create_dir_all(root)?;
                }
                let d = mroot.join(id);
                mkdir_new(&d)?;
                cg.dirs.push(d.clone());
                write(&d.join("memory.limit_in_bytes"), &mem)?;
                // memsw after the plain limit (it may never be below it); absent without swap
                // accounting.
                let memsw = d.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &mem)?;
                }
                let _ = fs::write(d.join("memory.swappiness"), "0");
                let p = pids.join(id);
                mkdir_new(&p)?;
                cg.dirs.push(p.clone());
                write(&p.join("pids.max"), &pids_max.to_string())?;
                if let Some(cpu) = cpu {
                    let c = cpu.join(id);
                    mkdir_new(&c)?;
                    cg.dirs.push(c.clone());
                    let _ = fs::write(c.join("cpu.shares"), cpu_shares(memory).to_string());
                }
            }
            CgroupRoot::V2 { base, cpu } => {
                let d = base.join(id);
                mkdir_new(&d)?;
                cg.dirs.push(d.clone());
                write(&d.join("memory.max"), &mem)?;
                let _ = fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &pids_max.to_string())?;
                if *cpu {
                    // weight 100 (the default) = one CPU's worth of memory (1769 MiB).
                    let w = ((memory >> 20) * 100 / 1769).clamp(1, 10_000);
                    let _ = fs::write(d.join("cpu.weight"), w.to_string());
                }
            }
        }
        for d in &cg.dirs {
            cg.procs.push(open_procs(d)?);
        }
        Ok(())
    }
}

/// Enables controllers for the children of `dir`. cgroup v2 forbids that while `dir` itself
/// holds processes, so on `EBUSY` we move ourselves into a `supervisor` leaf first.
fn enable_subtree(dir: &Path, ctrls: &str) -> Result<(), String> {
    let ctl = dir.join("cgroup.subtree_control");
    match fs::write(&ctl, ctrls) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = dir.join("supervisor");
            mkdir(&leaf).map_err(|e| e.to_string())?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(|e| e.to_string())?;
            fs::write(&ctl, ctrls).map_err(|e| {
                format!(
                    "enable {ctrls} in {}: {e} (other processes share our cgroup; run skiff in its own cgroup)",
                    ctl.display()
                )
            })
        }
        Err(e) => Err(format!("enable {ctrls} in {}: {e}", ctl.display())),
    }
}

impl InstanceCgroup {
    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// How many times the OOM killer fired in this instance.
    pub(crate) fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = fs::read_to_string(self.memory_dir().join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Current memory use in bytes.
    pub(crate) fn memory_usage(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(self.memory_dir().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Peak memory use in bytes since the cgroup was created (v1 `max_usage_in_bytes`,
    /// v2 `memory.peak`).
    pub(crate) fn memory_peak(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        fs::read_to_string(self.memory_dir().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Renames the cgroups (a pre-spawned agent's `pool-N` becomes the instance id). cgroup v1
    /// allows renaming within the same parent; where that fails (v2) the old name is kept.
    pub(crate) fn rename(&mut self, id: &str) {
        for d in &mut self.dirs {
            let to = d.with_file_name(id);
            match fs::rename(&*d, &to) {
                Ok(()) => *d = to,
                Err(e) => tracing::debug!("keeping cgroup name {}: {e}", d.display()),
            }
        }
    }

    /// Sets the memory limit (and the CPU weight that follows it) of a live cgroup.
    pub(crate) fn set_memory(&self, memory: u64) -> io::Result<()> {
        let mem = memory.to_string();
        let dir = self.memory_dir();
        if self.v2 {
            write(&dir.join("memory.max"), &mem)?;
            if let Some(cpu_dir) = self.dirs.first().filter(|d| d.join("cpu.weight").exists()) {
                let w = ((memory >> 20) * 100 / 1769).clamp(1, 10_000);
                let _ = fs::write(cpu_dir.join("cpu.weight"), w.to_string());
            }
            return Ok(());
        }
        // v1 keeps memsw >= limit at all times: raise memsw first when growing.
        let limit = dir.join("memory.limit_in_bytes");
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        let current: u64 = fs::read_to_string(&limit)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let order: [&Path; 2] = if memory > current {
            [&memsw, &limit]
        } else {
            [&limit, &memsw]
        };
        for f in order {
            if f.exists() {
                write(f, &mem)?;
            }
        }
        if let Some(cpu) = self.dirs.iter().find(|d| d.join("cpu.shares").exists()) {
            let _ = fs::write(cpu.join("cpu.shares"), cpu_shares(memory).to_string());
        }
        Ok(())
    }

    /// Removes the directories, retrying `EBUSY` while the kernel finishes killing tasks.
    pub(crate) async fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!("rmdir {}: {e}; retrying", d.display());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => {
                        tracing::warn!("cannot remove cgroup {}: {e}", d.display());
                        break;
                    }
                }
            }
        }
    }

    /// Blocking variant of [`remove`](Self::remove), for `Drop` and error paths.
    pub(crate) fn remove_blocking(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => {
                        tracing::warn!("cannot remove cgroup {}: {e}", d.display());
                        break;
                    }
                }
            }
        }
    }
}
