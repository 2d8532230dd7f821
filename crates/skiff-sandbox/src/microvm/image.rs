//! Guest image for microVMs: owns the kernel (from a Debian `linux-image-*-cloud-amd64`
//! package), the initramfs (busybox, the virtio drivers and [`init.sh`](../init.sh) as
//! `/init`), the read-only ext4 root filesystem (agent, runtimes, python3, node and their
//! libraries, copied from the host) and the per-function code disks.
//!
//! Images are cached by content under `<image_dir>/microvm-<hash>`; older image dirs are left
//! in place (delete them by hand when no server uses them any more).

use crate::SandboxError;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Disk serial of the root filesystem (QEMU `-device virtio-blk-device,serial=...`).
pub const ROOT_SERIAL: &str = "skiff-root";
/// Disk serial of the function's code disk.
pub const CODE_SERIAL: &str = "skiff-code";
/// virtio-serial port name of the agent channel (QEMU `-device virtserialport,name=...`).
pub const CHANNEL_NAME: &str = "skiff";
/// Where the agent executable lives inside the root filesystem.
pub const GUEST_AGENT: &str = "/opt/skiff/skiff";
/// Where Skiff's runtime bootstraps live inside the root filesystem.
pub const GUEST_RUNTIME_DIR: &str = "/opt/skiff/runtime";
/// The agent builds the sandbox root on a tmpfs mounted here.
pub const GUEST_ROOT_DIR: &str = "/mnt/root";
/// The code disk is mounted here (read-only).
pub const GUEST_CODE_DIR: &str = "/mnt/code";
/// A `persistent` function's workspace (virtiofs, tag [`WORKSPACE_TAG`]) is mounted here.
pub const GUEST_WORKSPACE_DIR: &str = "/mnt/workspace";
/// virtiofs tag of the workspace share.
pub const WORKSPACE_TAG: &str = "skiff-ws";

/// Bump when the image layout changes (part of the cache key).
const FORMAT: u32 = 4;
const INIT_SH: &str = include_str!("init.sh");
/// Drivers loaded by `/init`, with their dependencies resolved from the kernel's modules.
const MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "virtiofs",
];
const MIB: u64 = 1 << 20;

/// What to build an image from.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Cache root, e.g. `<data>/images` (shared by servers; tests point several servers at one).
    pub image_dir: PathBuf,
    /// The agent executable to put in the guest (normally the running `skiff` binary).
    pub agent_exe: PathBuf,
    /// Host dir with Skiff's runtime bootstraps (python/, node/...), mounted at /var/runtime
    /// in sandboxes.
    pub runtime_dir: PathBuf,
    /// Where the kernel comes from.
    pub kernel: KernelSource,
}

/// The kernel package to use.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// The host distribution's `linux-image-cloud-amd64` (downloaded with apt once, cached in
    /// `<image_dir>/debs`).
    Auto,
    /// A `linux-image-*.deb` file.
    Deb(PathBuf),
    /// An unpacked linux-image deb root (has `boot/vmlinuz-*` and `lib/modules/<ver>/`).
    Dir(PathBuf),
}

/// A built (or cached) guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The image's directory, `<image_dir>/microvm-<hash prefix>`.
    pub dir: PathBuf,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// The root filesystem (ext4).
    pub rootfs: PathBuf,
    /// The kernel's release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// Hex SHA-256 of everything the image was built from.
    pub hash: String,
    /// How long the build took; `None` when the image came from the cache.
    pub built_in: Option<Duration>,
}

impl GuestImage {
    /// Sizes in bytes of the kernel, initrd and rootfs.
    pub fn sizes(&self) -> (u64, u64, u64) {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (size(&self.kernel), size(&self.initrd), size(&self.rootfs))
    }
}

fn err(msg: impl Into<String>) -> SandboxError {
    SandboxError::Start(msg.into())
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> SandboxError {
    err(format!("{what}: {e}"))
}

/// Builds the image or returns the cached one (blocking; seconds on a cold cache). Safe to
/// call concurrently from several processes: builds run under an flock on
/// `<image_dir>/.lock`, in a temp dir inside `image_dir` renamed into place when complete.
pub fn build(cfg: &ImageConfig) -> Result<GuestImage, SandboxError> {
    let started = Instant::now();
    let image_dir = &cfg.image_dir;
    std::fs::create_dir_all(image_dir)
        .map_err(|e| io_err(format_args!("creating {}", image_dir.display()), e))?;
    if !cfg.agent_exe.is_file() {
        return Err(err(format!(
            "agent executable {} not found",
            cfg.agent_exe.display()
        )));
    }

    // flock locks conflict between descriptors even within one process: take it once.
    let mut held: Option<Lock> = None;
    let kernel_src = match &cfg.kernel {
        KernelSource::Dir(d) => KernelPkg::Dir(d.clone()),
        KernelSource::Deb(f) => KernelPkg::Deb(f.clone()),
        KernelSource::Auto => {
            // Downloading needs the lock (the debs dir is shared).
            match cached_kernel_deb(image_dir) {
                Some(f) => KernelPkg::Deb(f),
                None => {
                    held = Some(lock(image_dir)?);
                    KernelPkg::Deb(download_kernel_deb(image_dir)?)
                }
            }
        }
    };

    let plan = Plan::collect(cfg)?;
    let hash = cache_key(cfg, &kernel_src, &plan)?;
    let dir = image_dir.join(format!("microvm-{}", &hash[..16]));
    if let Some(img) = cached(&dir, &hash) {
        return Ok(img);
    }
    if held.is_none() {
        held = Some(lock(image_dir)?);
    }
    let _held = held;
    if let Some(img) = cached(&dir, &hash) {
        return Ok(img);
    }
    remove_stale_builds(image_dir);

    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(image_dir)
        .map_err(|e| io_err("creating a build dir", e))?;
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).map_err(|e| io_err("creating a build dir", e))?;

    // Kernel.
    let kroot = match &kernel_src {
        KernelPkg::Dir(d) => d.clone(),
        KernelPkg::Deb(f) => {
            let k = tmp.path().join("kernel");
            run(
                Command::new("dpkg-deb").arg("-x").arg(f).arg(&k),
                "dpkg-deb",
            )?;
            k
        }
    };
    let (version, vmlinuz) = find_kernel(&kroot)?;
    let kernel = out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel)
        .map_err(|e| io_err(format_args!("copying {}", vmlinuz.display()), e))?;

    // Initramfs.
    let modules = resolve_modules(&kroot.join("lib/modules").join(&version))?;
    let initrd = out.join("initrd.cpio");
    write_initramfs(&initrd, &modules)?;

    // Root filesystem.
    let staging = tmp.path().join("root");
    let (bytes, count) = plan.stage(cfg, &staging)?;
    let rootfs = out.join("rootfs.ext4");
    let size = round_mib(bytes + bytes * 15 / 100 + 32 * MIB);
    mkfs(&staging, &rootfs, ROOT_SERIAL, count + 1024, size)?;

    let built_in = started.elapsed();
    let sz = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let meta = serde_json::json!({
        "format": FORMAT,
        "hash": hash,
        "kernel_version": version,
        "kernel_bytes": sz(&kernel),
        "initrd_bytes": sz(&initrd),
        "rootfs_bytes": sz(&rootfs),
        "build_ms": built_in.as_millis() as u64,
        "created_at": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "modules": modules.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
        "included": plan.top_level(),
    });
    std::fs::write(out.join("image.json"), meta.to_string())
        .map_err(|e| io_err("writing image.json", e))?;
    if dir.exists() {
        // An incomplete dir (no image.json) from an interrupted older build.
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::rename(&out, &dir)
        .map_err(|e| io_err(format_args!("renaming into {}", dir.display()), e))?;
    prune(image_dir, &dir, KEEP_IMAGES);
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        rootfs: dir.join("rootfs.ext4"),
        dir,
        kernel_version: version,
        hash,
        built_in: Some(built_in),
    })
}

/// Writes a read-only ext4 disk image of a function's code directory to `out` (atomically:
/// temp file + rename); does nothing if `out` exists.
pub fn code_disk(code_dir: &Path, out: &Path) -> Result<(), SandboxError> {
    if out.exists() {
        return Ok(());
    }
    if !code_dir.is_dir() {
        return Err(err(format!(
            "code directory {} not found",
            code_dir.display()
        )));
    }
    let (bytes, count) = du(code_dir)?;
    let size = round_mib((bytes + bytes * 3 / 10 + 4 * MIB).max(8 * MIB));
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| io_err(format_args!("creating {}", parent.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".code-")
        .suffix(".ext4")
        .tempfile_in(parent)
        .map_err(|e| io_err("creating a temp file", e))?;
    mkfs(code_dir, tmp.path(), CODE_SERIAL, count + 64, size)?;
    std::fs::set_permissions(tmp.path(), PermissionsExt::from_mode(0o644))
        .map_err(|e| io_err("chmod code disk", e))?;
    tmp.persist(out)
        .map_err(|e| io_err(format_args!("writing {}", out.display()), e.error))?;
    Ok(())
}

fn round_mib(n: u64) -> u64 {
    n.div_ceil(MIB) * MIB
}

/// Runs `mkfs.ext4 -d` over `src`.
fn mkfs(src: &Path, img: &Path, label: &str, inodes: u64, size: u64) -> Result<(), SandboxError> {
    let mkfs = which("mkfs.ext4").ok_or_else(|| {
        err("mkfs.ext4 not found (apt-get install e2fsprogs; it must support -d)")
    })?;
    let mut c = Command::new(mkfs);
    c.args(["-q", "-F", "-d"])
        .arg(src)
        .args(["-O", "^has_journal", "-E", "root_owner=0:0"])
        .arg("-N")
        .arg(inodes.to_string())
        .args(["-L", label])
        .arg(img)
        .arg(format!("{}k", size / 1024));
    run(&mut c, "mkfs.ext4")
}

/// Bytes (in 4 KiB blocks, like `du`) and inode count of a tree, not following symlinks.
fn du(dir: &Path) -> Result<(u64, u64), SandboxError> {
    let mut bytes = 4096;
    let mut count = 1;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| io_err(format_args!("{}", d.display()), e))?;
        for e in rd {
            let e = e.map_err(|e| io_err(format_args!("{}", d.display()), e))?;
            let m = std::fs::symlink_metadata(e.path())
                .map_err(|x| io_err(format_args!("{}", e.path().display()), x))?;
            count += 1;
            bytes += m.len().div_ceil(4096).max(1) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, count))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command, turning a failure into an error with its stderr.
fn run(c: &mut Command, what: &str) -> Result<(), SandboxError> {
    let o = c
        .output()
        .map_err(|e| io_err(format_args!("running {what}"), e))?;
    if !o.status.success() {
        return Err(err(format!(
            "{what} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// An flock on `<image_dir>/.lock`, released when the file closes (on drop).
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(image_dir: &Path) -> Result<Lock, SandboxError> {
    use std::os::fd::AsRawFd;
    let path = image_dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(format_args!("opening {}", path.display()), e))?;
    loop {
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Lock(f));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io_err(format_args!("locking {}", path.display()), e));
        }
    }
}

/// Removes `.build-*` dirs left by builds that died (only called under the lock).
/// Images kept in an image dir: the one just built and the most recent others (a server or
/// snapshot of an older `skiff` binary may still use them; each binary makes its own image).
const KEEP_IMAGES: usize = 3;

/// Deletes all but the `keep` most recently built images (never `current`).
fn prune(image_dir: &Path, current: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(image_dir) else {
        return;
    };
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("microvm-") && e.path() != current)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    others.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in others.into_iter().skip(keep.saturating_sub(1)) {
        let _ = std::fs::remove_dir_all(p);
    }
}

fn remove_stale_builds(image_dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(image_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".build-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn cached(dir: &Path, hash: &str) -> Option<GuestImage> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("image.json")).ok()?).ok()?;
    if meta["hash"].as_str() != Some(hash) {
        return None;
    }
    Some(GuestImage {
        dir: dir.to_path_buf(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        rootfs: dir.join("rootfs.ext4"),
        kernel_version: meta["kernel_version"].as_str()?.to_string(),
        hash: hash.to_string(),
        built_in: None,
    })
}

// ---- kernel ----

enum KernelPkg {
    Deb(PathBuf),
    Dir(PathBuf),
}

fn cached_kernel_deb(image_dir: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(image_dir.join("debs")).ok()?;
    let mut debs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("linux-image-")
                && n.contains("-cloud-amd64")
                && !n.contains("-dbg")
                && n.ends_with(".deb")
        })
        .collect();
    debs.sort();
    debs.pop()
}

/// Resolves `linux-image-cloud-amd64` to its versioned package and downloads it with apt.
fn download_kernel_deb(image_dir: &Path) -> Result<PathBuf, SandboxError> {
    if let Some(f) = cached_kernel_deb(image_dir) {
        return Ok(f);
    }
    if which("apt-get").is_none() || which("apt-cache").is_none() {
        return Err(err(
            "apt-get not found: pass a kernel package with --kernel-deb (a Debian linux-image-*-cloud-amd64 .deb)",
        ));
    }
    let resolve = || -> Option<String> {
        let o = Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            let p = l.trim().strip_prefix("Depends:")?.trim();
            (p.starts_with("linux-image-") && p.ends_with("-cloud-amd64")).then(|| p.to_string())
        })
    };
    let debs = image_dir.join("debs");
    std::fs::create_dir_all(&debs)
        .map_err(|e| io_err(format_args!("creating {}", debs.display()), e))?;
    let download = |pkg: &str| -> Result<PathBuf, SandboxError> {
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&debs)
            .map_err(|e| io_err("creating a download dir", e))?;
        run(
            Command::new("apt-get")
                .args(["download", "-qq", pkg])
                .current_dir(tmp.path()),
            &format!("apt-get download {pkg}"),
        )?;
        let f = std::fs::read_dir(tmp.path())
            .map_err(|e| io_err("reading the download dir", e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| err(format!("apt-get download {pkg} produced no .deb")))?;
        let dst = debs.join(f.file_name().unwrap_or_default());
        std::fs::rename(&f, &dst).map_err(|e| io_err("moving the kernel package", e))?;
        Ok(dst)
    };
    let mut updated = false;
    loop {
        let attempt = match resolve() {
            Some(pkg) => download(&pkg),
            None => Err(err("apt-cache knows no linux-image-cloud-amd64")),
        };
        match attempt {
            Ok(f) => return Ok(f),
            Err(_) if !updated => {
                updated = true;
                run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
            }
            Err(e) => {
                return Err(err(format!(
                    "{e} (run `apt-get update && apt-get download linux-image-cloud-amd64`, or pass --kernel-deb)"
                )))
            }
        }
    }
}

/// Finds `boot/vmlinuz-<ver>` with a matching `lib/modules/<ver>`.
fn find_kernel(root: &Path) -> Result<(String, PathBuf), SandboxError> {
    let boot = root.join("boot");
    let rd = std::fs::read_dir(&boot).map_err(|e| {
        io_err(
            format_args!("{} is not an unpacked linux-image package", root.display()),
            e,
        )
    })?;
    let mut found: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let v = n.strip_prefix("vmlinuz-")?.to_string();
            root.join("lib/modules")
                .join(&v)
                .is_dir()
                .then(|| (v, e.path()))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        err(format!(
            "no boot/vmlinuz-<ver> with lib/modules/<ver> in {}",
            root.display()
        ))
    })
}

/// The modules `/init` loads, deps first: `(file name, path)`.
fn resolve_modules(moddir: &Path) -> Result<Vec<(String, PathBuf)>, SandboxError> {
    let builtin: BTreeSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let graph = match std::fs::read_to_string(moddir.join("modules.dep")) {
        Ok(text) => parse_modules_dep(&text),
        Err(_) => modinfo_graph(moddir)?,
    };
    let order = module_order(&graph, MODULES, &builtin)?;
    Ok(order
        .into_iter()
        .map(|rel| {
            let file = Path::new(&rel)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (file, moddir.join(&rel))
        })
        .collect())
}

/// `kernel/drivers/char/hw_random/virtio-rng.ko` → `virtio_rng`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// Module name → (relative path, dependency names).
type ModGraph = HashMap<String, (String, Vec<String>)>;

fn parse_modules_dep(text: &str) -> ModGraph {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            let m = m.trim();
            Some((
                module_name(m),
                (
                    m.to_string(),
                    deps.split_whitespace().map(module_name).collect(),
                ),
            ))
        })
        .collect()
}

/// Builds the graph from the modules' own `.modinfo` sections (for packages shipped without
/// `modules.dep`, which depmod writes at install time): only modules reachable from
/// [`MODULES`] are read.
fn modinfo_graph(moddir: &Path) -> Result<ModGraph, SandboxError> {
    let mut paths = HashMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(moddir) {
                let rel = rel.to_string_lossy().into_owned();
                if rel.contains(".ko") {
                    paths.insert(module_name(&rel), rel);
                }
            }
        }
    }
    let mut graph = ModGraph::new();
    let mut todo: Vec<String> = MODULES.iter().map(|s| s.to_string()).collect();
    while let Some(name) = todo.pop() {
        if graph.contains_key(&name) {
            continue;
        }
        let Some(rel) = paths.get(&name) else {
            continue; // built in, or missing: module_order decides
        };
        if !rel.ends_with(".ko") {
            return Err(err(format!(
                "kernel module {rel} is compressed; only plain .ko modules are supported"
            )));
        }
        let data = std::fs::read(moddir.join(rel))
            .map_err(|e| io_err(format_args!("reading {rel}"), e))?;
        let deps =
            modinfo_depends(&data).ok_or_else(|| err(format!("{rel}: no .modinfo section")))?;
        todo.extend(deps.iter().cloned());
        graph.insert(name, (rel.clone(), deps));
    }
    Ok(graph)
}

/// The `depends=` list of an ELF64 kernel module's `.modinfo` section.
fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(h)?,
            usize::try_from(u64_at(h + 0x18)?).ok()?,
            usize::try_from(u64_at(h + 0x20)?).ok()?,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = strtab.get(name as usize..)?;
        if name.starts_with(b".modinfo\0") {
            let data = elf.get(off..off.checked_add(size)?)?;
            let mut deps = Vec::new();
            for kv in data.split(|&b| b == 0) {
                if let Some(d) = kv.strip_prefix(b"depends=") {
                    deps.extend(
                        String::from_utf8_lossy(d)
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(|s| s.replace('-', "_")),
                    );
                }
            }
            return Some(deps);
        }
    }
    None
}

/// Relative paths of `wanted` and their dependencies, dependencies first; built-in modules
/// are skipped.
fn module_order(
    graph: &ModGraph,
    wanted: &[&str],
    builtin: &BTreeSet<String>,
) -> Result<Vec<String>, SandboxError> {
    fn visit(
        name: &str,
        graph: &ModGraph,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), SandboxError> {
        if seen.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if depth > 64 {
            return Err(err(format!("kernel module dependency cycle at {name}")));
        }
        let (rel, deps) = graph.get(name).ok_or_else(|| {
            err(format!(
                "kernel module {name} not found in the kernel package"
            ))
        })?;
        for d in deps {
            visit(d, graph, builtin, seen, out, depth + 1)?;
        }
        seen.insert(name.to_string());
        out.push(rel.clone());
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for w in wanted {
        visit(&w.replace('-', "_"), graph, builtin, &mut seen, &mut out, 0)?;
    }
    Ok(out)
}

// ---- initramfs ----

fn write_initramfs(path: &Path, modules: &[(String, PathBuf)]) -> Result<(), SandboxError> {
    let busybox = Path::new("/bin/busybox");
    let bb = std::fs::read(busybox)
        .map_err(|_| err("/bin/busybox not found (apt-get install busybox-static)"))?;
    if !is_static_elf(&bb) {
        return Err(err(
            "/bin/busybox is dynamically linked (apt-get install busybox-static)",
        ));
    }
    let mut c = Cpio::default();
    for d in ["dev", "proc", "sys", "newroot", "bin", "lib", "lib/modules"] {
        c.dir(d, 0o755);
    }
    // The kernel opens /dev/console for init's stdio before /init mounts devtmpfs.
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("init", 0o755, INIT_SH.as_bytes());
    c.file("bin/busybox", 0o755, &bb);
    let mut order = String::new();
    for (file, p) in modules {
        let data =
            std::fs::read(p).map_err(|e| io_err(format_args!("reading {}", p.display()), e))?;
        c.file(&format!("lib/modules/{file}"), 0o644, &data);
        order.push_str(file);
        order.push('\n');
    }
    c.file("lib/modules/order", 0o644, order.as_bytes());
    std::fs::write(path, c.finish()).map_err(|e| io_err("writing the initramfs", e))
}

/// An ELF without a `PT_INTERP` program header.
fn is_static_elf(elf: &[u8]) -> bool {
    let get = |o: usize, n: usize| elf.get(o..o + n);
    let Some(b"\x7fELF\x02") = get(0, 5) else {
        return false;
    };
    let rd = |o: usize, n: usize| -> Option<u64> {
        let b = get(o, n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let h = phoff.saturating_add(i.saturating_mul(phentsize)) as usize;
        rd(h, 4).is_some_and(|t| t != 3)
    })
}

/// A minimal writer for the `newc` cpio format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32), nlink: u32) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let _ = write!(self.buf, "070701");
        for f in fields {
            let _ = write!(self.buf, "{f:08x}");
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, 0o040000 | perm, &[], (0, 0), 2);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0), 1);
    }
    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, &[], (major, minor), 1);
    }
    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0), 1);
        self.buf
    }
}

// ---- root filesystem ----

/// What goes into the root filesystem from the host: absolute host paths, with the parent
/// directories canonicalised (so `/lib/x` becomes `/usr/lib/x` on a usr-merged host).
struct Plan {
    /// Host path → how to copy it.
    entries: BTreeMap<PathBuf, Entry>,
    /// Top-level symlinks of the host root (`/bin -> usr/bin`...).
    root_links: Vec<(String, PathBuf)>,
    top: Vec<String>,
}

#[derive(Clone, PartialEq)]
enum Entry {
    File,
    Dir,
    Symlink(PathBuf),
    /// A symlink copied as the file it points to.
    Resolved,
}

impl Plan {
    fn collect(cfg: &ImageConfig) -> Result<Plan, SandboxError> {
        let mut p = Plan {
            entries: BTreeMap::new(),
            root_links: Vec::new(),
            top: vec![
                "kernel modules".into(),
                "busybox (initramfs)".into(),
                "agent".into(),
                "runtime".into(),
            ],
        };
        for l in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            if let Ok(t) = std::fs::read_link(Path::new("/").join(l)) {
                p.root_links.push((l.to_string(), t));
            }
        }
        let mut elves: Vec<PathBuf> = vec![cfg.agent_exe.clone()];

        if Path::new("/usr/bin/python3").exists() {
            p.add("/usr/bin/python3");
            let real = std::fs::canonicalize("/usr/bin/python3")
                .map_err(|e| io_err("resolving /usr/bin/python3", e))?;
            let ver = real
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let lib = Path::new("/usr/lib").join(&ver);
            if lib.is_dir() {
                let skip = ["test", "idlelib", "tkinter", "turtledemo", "ensurepip"];
                p.add_tree(&lib, &|rel: &Path| {
                    rel.components().count() == 1 && skip.iter().any(|s| rel.as_os_str() == *s)
                })?;
                if let Ok(rd) = std::fs::read_dir(lib.join("lib-dynload")) {
                    elves.extend(rd.flatten().map(|e| e.path()));
                }
            }
            elves.push(real);
            p.top.push(format!("python ({ver})"));
        } else {
            tracing::info!("microvm image: no /usr/bin/python3 on the host; python left out");
        }
        if Path::new("/usr/bin/node").exists() {
            p.add("/usr/bin/node");
            if std::fs::symlink_metadata("/usr/bin/nodejs").is_ok() {
                p.add("/usr/bin/nodejs");
            }
            elves.push("/usr/bin/node".into());
            p.top.push("node".into());
        } else {
            tracing::info!("microvm image: no /usr/bin/node on the host; node left out");
        }
        // The everyday command-line tools, from the host's Debian packages (their dpkg file
        // lists), as `command` functions and shell-script runtimes expect them.
        let mut tools: BTreeSet<PathBuf> = TOOLS
            .iter()
            .map(|t| Path::new("/usr/bin").join(t))
            .collect();
        for pkg in TOOL_PACKAGES {
            let list = std::fs::read_to_string(format!("/var/lib/dpkg/info/{pkg}.list"))
                .or_else(|_| {
                    std::fs::read_to_string(format!("/var/lib/dpkg/info/{pkg}:amd64.list"))
                })
                .unwrap_or_default();
            for l in list.lines() {
                let l = l.trim();
                if ["/bin/", "/usr/bin/", "/sbin/", "/usr/sbin/"]
                    .iter()
                    .any(|d| {
                        l.strip_prefix(d)
                            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
                    })
                {
                    tools.insert(PathBuf::from(l));
                }
            }
        }
        for path in tools {
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if md.is_dir() {
                continue;
            }
            p.add(&path);
            if is_elf(&path) {
                elves.push(path);
            }
        }
        p.top.push(format!("tools ({})", TOOL_PACKAGES.join(", ")));
        for lib in ldd(&elves)? {
            p.add(&lib);
        }
        // The native tier's `/etc` whitelist: the agent binds exactly these in every sandbox
        // (`/etc/localtime` is copied as the file it points to, below).
        for e in crate::native::ETC_WHITELIST
            .iter()
            .filter(|e| **e != "localtime")
        {
            let path = Path::new("/etc").join(e);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => p.add_tree(&path, &|_: &Path| false)?,
                Ok(_) => p.add(&path),
                Err(_) => {}
            }
        }
        if Path::new("/etc/localtime").exists() {
            p.entries.insert("/etc/localtime".into(), Entry::Resolved);
        }
        if Path::new("/usr/share/ca-certificates").is_dir() {
            p.add_tree(Path::new("/usr/share/ca-certificates"), &|_: &Path| false)?;
        }
        p.top.push("etc".into());
        Ok(p)
    }

    /// Canonicalises the parent directories of `path` (not the file itself).
    fn normalize(path: &Path) -> Option<PathBuf> {
        let parent = std::fs::canonicalize(path.parent()?).ok()?;
        Some(parent.join(path.file_name()?))
    }

    /// Adds a file or symlink (and, for a symlink, the chain it points through).
    fn add(&mut self, path: impl AsRef<Path>) {
        let mut next = Self::normalize(path.as_ref());
        let mut hops = 0;
        while let Some(p) = next.take() {
            if self.entries.contains_key(&p) || hops > 40 {
                break;
            }
            hops += 1;
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                break;
            };
            if m.file_type().is_symlink() {
                let Ok(t) = std::fs::read_link(&p) else {
                    break;
                };
                let abs = p.parent().unwrap_or(Path::new("/")).join(&t);
                self.entries.insert(p, Entry::Symlink(t));
                next = Self::normalize(&abs);
            } else if m.is_file() {
                self.entries.insert(p, Entry::File);
            }
        }
    }

    /// Adds a directory tree (symlinks as symlinks; their targets only when inside the tree).
    fn add_tree(&mut self, root: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<(), SandboxError> {
        let Some(root) = std::fs::canonicalize(root).ok() else {
            return Ok(());
        };
        self.entries.insert(root.clone(), Entry::Dir);
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let rd =
                std::fs::read_dir(&d).map_err(|e| io_err(format_args!("{}", d.display()), e))?;
            for e in rd.flatten() {
                let p = e.path();
                if skip(p.strip_prefix(&root).unwrap_or(&p)) {
                    continue;
                }
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if m.file_type().is_symlink() {
                    if let Ok(t) = std::fs::read_link(&p) {
                        self.entries.insert(p, Entry::Symlink(t));
                    }
                } else if m.is_dir() {
                    self.entries.insert(p.clone(), Entry::Dir);
                    stack.push(p);
                } else if m.is_file() {
                    self.entries.insert(p, Entry::File);
                }
            }
        }
        Ok(())
    }

    fn top_level(&self) -> Vec<String> {
        self.top.clone()
    }

    /// Feeds the host file list (path, size, mtime) into the cache key.
    fn hash_into(&self, h: &mut Sha256) {
        for (p, e) in &self.entries {
            h.update(p.as_os_str().as_encoded_bytes());
            let m = if *e == Entry::Resolved {
                std::fs::metadata(p)
            } else {
                std::fs::symlink_metadata(p)
            };
            if let Ok(m) = m {
                h.update(m.len().to_le_bytes());
                h.update(m.mtime().to_le_bytes());
                h.update(m.mtime_nsec().to_le_bytes());
            }
            if let Entry::Symlink(t) = e {
                h.update(t.as_os_str().as_encoded_bytes());
            }
            h.update([0]);
        }
        for (l, t) in &self.root_links {
            h.update(l.as_bytes());
            h.update(t.as_os_str().as_encoded_bytes());
            h.update([0]);
        }
    }

    /// Writes the tree into `staging`; returns its size in bytes (4 KiB blocks) and inode
    /// count.
    fn stage(&self, cfg: &ImageConfig, staging: &Path) -> Result<(u64, u64), SandboxError> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|e| io_err(format_args!("{}", p.display()), e))
        };
        mkdir(staging)?;
        for (l, t) in &self.root_links {
            std::os::unix::fs::symlink(t, staging.join(l))
                .map_err(|e| io_err(format_args!("symlink /{l}"), e))?;
        }
        for d in [
            "dev",
            "proc",
            "sys",
            "tmp",
            "mnt/root",
            "mnt/code",
            "mnt/workspace",
            "var/task",
            "var/runtime",
            "root",
            "opt/skiff",
            "etc",
        ] {
            mkdir(&staging.join(d))?;
        }
        let _ = std::fs::set_permissions(staging.join("tmp"), PermissionsExt::from_mode(0o1777));
        let _ = std::fs::set_permissions(staging.join("root"), PermissionsExt::from_mode(0o700));

        for (p, e) in &self.entries {
            let dst = staging.join(p.strip_prefix("/").unwrap_or(p));
            if let Some(parent) = dst.parent() {
                mkdir(parent)?;
            }
            let r = match e {
                Entry::Dir => std::fs::create_dir_all(&dst).and_then(|_| {
                    let mode = std::fs::metadata(p)?.permissions().mode();
                    std::fs::set_permissions(&dst, PermissionsExt::from_mode(mode))
                }),
                Entry::File | Entry::Resolved => copy_file(p, &dst),
                Entry::Symlink(t) => std::os::unix::fs::symlink(t, &dst),
            };
            r.map_err(|x| io_err(format_args!("copying {}", p.display()), x))?;
        }

        // The agent, without its debug info when `strip` is there.
        let agent = staging.join(GUEST_AGENT.trim_start_matches('/'));
        let stripped = which("strip").is_some_and(|s| {
            Command::new(s)
                .arg("--strip-debug")
                .arg("-o")
                .arg(&agent)
                .arg(&cfg.agent_exe)
                .status()
                .is_ok_and(|st| st.success())
        });
        if !stripped {
            std::fs::copy(&cfg.agent_exe, &agent)
                .map_err(|e| io_err(format_args!("copying {}", cfg.agent_exe.display()), e))?;
        }
        std::fs::set_permissions(&agent, PermissionsExt::from_mode(0o755))
            .map_err(|e| io_err("chmod agent", e))?;

        let runtime = staging.join(GUEST_RUNTIME_DIR.trim_start_matches('/'));
        copy_tree(&cfg.runtime_dir, &runtime)?;
        du(staging)
    }
}

/// Copies a directory tree (files, dirs and symlinks).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(dst).map_err(|e| io_err(format_args!("{}", dst.display()), e))?;
    let rd = std::fs::read_dir(src).map_err(|e| io_err(format_args!("{}", src.display()), e))?;
    for e in rd.flatten() {
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let m = std::fs::symlink_metadata(&s)
            .map_err(|x| io_err(format_args!("{}", s.display()), x))?;
        let r = if m.file_type().is_symlink() {
            std::fs::read_link(&s).and_then(|t| std::os::unix::fs::symlink(t, &d))
        } else if m.is_dir() {
            copy_tree(&s, &d)?;
            Ok(())
        } else {
            copy_file(&s, &d)
        };
        r.map_err(|x| io_err(format_args!("copying {}", s.display()), x))?;
    }
    Ok(())
}

/// Copies a file with its modification time: Python trusts a `__pycache__/*.pyc` only while
/// its source's mtime matches the one recorded in it. Without that, every import in the guest
/// would compile from source (seconds per cold start under TCG), as the read-only root cannot
/// take new `.pyc` files either.
fn copy_file(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::copy(src, dst)?;
    let m = std::fs::metadata(src)?;
    let times = std::fs::FileTimes::new()
        .set_accessed(m.accessed()?)
        .set_modified(m.modified()?);
    // Best effort: a copy without its time is still a correct image, only a slower one.
    if let Ok(f) = std::fs::File::options().write(true).open(dst) {
        let _ = f.set_times(times);
    }
    Ok(())
}

/// The shared libraries (and the dynamic loader) the given executables load, from `ldd`.
/// Tools always included when the host has them (even without dpkg file lists).
const TOOLS: &[&str] = &[
    "sh", "dash", "env", "cat", "ls", "sleep", "true", "false", "echo", "id", "head",
];

/// Debian packages whose programs go into the image.
const TOOL_PACKAGES: &[&str] = &[
    "coreutils",
    "dash",
    "bash",
    "grep",
    "sed",
    "findutils",
    "gzip",
    "tar",
    "util-linux",
    "procps",
    "mawk",
    "hostname",
];

/// Whether `path` (followed) is an ELF file.
fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn ldd(files: &[PathBuf]) -> Result<BTreeSet<PathBuf>, SandboxError> {
    let mut libs = BTreeSet::new();
    let o = Command::new("ldd")
        .args(files)
        .output()
        .map_err(|e| io_err("running ldd (apt-get install libc-bin)", e))?;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        if !l.contains("(0x") {
            continue;
        }
        let l = l.trim();
        let path = match l.split_once("=> ") {
            Some((_, r)) => r,
            None => l,
        };
        let path = path.split(" (0x").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs)
}

// ---- cache key ----

fn sha256_file(p: &Path) -> Result<[u8; 32], SandboxError> {
    let mut f =
        std::fs::File::open(p).map_err(|e| io_err(format_args!("reading {}", p.display()), e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)
        .map_err(|e| io_err(format_args!("reading {}", p.display()), e))?;
    Ok(h.finalize().into())
}

fn cache_key(cfg: &ImageConfig, kernel: &KernelPkg, plan: &Plan) -> Result<String, SandboxError> {
    let mut h = Sha256::new();
    h.update(format!("skiff-microvm-image/{FORMAT}\0"));
    match kernel {
        KernelPkg::Deb(f) => {
            let m = std::fs::metadata(f)
                .map_err(|e| io_err(format_args!("kernel package {}", f.display()), e))?;
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(m.len().to_le_bytes());
        }
        KernelPkg::Dir(d) => {
            let (_, vmlinuz) = find_kernel(d)?;
            h.update(sha256_file(&vmlinuz)?);
        }
    }
    h.update([0]);
    h.update(INIT_SH);
    h.update(sha256_file(&cfg.agent_exe)?);
    // Runtime bootstraps: names and contents.
    let mut stack = vec![cfg.runtime_dir.clone()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| io_err(format_args!("runtime dir {}", d.display()), e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        h.update(
            f.strip_prefix(&cfg.runtime_dir)
                .unwrap_or(&f)
                .as_os_str()
                .as_encoded_bytes(),
        );
        h.update([0]);
        h.update(std::fs::read(&f).unwrap_or_default());
        h.update([0]);
    }
    plan.hash_into(&mut h);
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_cpio(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            assert_eq!((off + next) % 4, 0);
            off += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, rmaj, rmin));
        }
    }

    #[test]
    fn cpio_newc_roundtrip() {
        let mut c = Cpio::default();
        c.dir("dev", 0o755);
        c.char_dev("dev/console", 0o600, 5, 1);
        c.file("init", 0o755, b"#!/bin/sh\n");
        c.file("a/b", 0o644, b"12345");
        let buf = c.finish();
        assert_eq!(buf.len() % 4, 0);
        let e = parse_cpio(&buf);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].0, "dev");
        assert_eq!(e[0].1, 0o040755);
        assert_eq!((e[1].1, e[1].3, e[1].4), (0o020600, 5, 1));
        assert_eq!((e[2].0.as_str(), e[2].1), ("init", 0o100755));
        assert_eq!(e[2].2, b"#!/bin/sh\n");
        assert_eq!(e[3].2, b"12345");
    }

    #[test]
    fn module_order_deps_first() {
        let dep = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/virtio_scsi.ko: kernel/drivers/virtio/virtio.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
";
        let g = parse_modules_dep(dep);
        let order = module_order(&g, MODULES, &BTreeSet::new()).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng",
                "fuse",
                "virtiofs"
            ]
        );
        // Every module comes after its dependencies.
        for (i, p) in order.iter().enumerate() {
            for d in &g[&module_name(p)].1 {
                let j = names.iter().position(|n| n == d).unwrap();
                assert!(j < i, "{d} must load before {p}");
            }
        }
        assert_eq!(names.len(), 11);
        assert_eq!(names.last().unwrap(), "virtiofs");
        assert!(order[8].ends_with("virtio-rng.ko"));
        assert!(!names.contains(&"virtio_scsi".to_string()));

        // Built-in modules are skipped; missing ones are an error.
        let builtin: BTreeSet<String> = ["virtio".to_string()].into();
        let order = module_order(&g, &["virtio_blk"], &builtin).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko"
            ]
        );
        assert!(module_order(&g, &["nope"], &BTreeSet::new()).is_err());
    }

    #[test]
    fn code_disk_is_written_once() {
        if which("mkfs.ext4").is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let code = t.path().join("code");
        std::fs::create_dir_all(code.join("sub")).unwrap();
        std::fs::write(code.join("main.py"), "print(1)\n").unwrap();
        let out = t.path().join("disks/code.ext4");
        code_disk(&code, &out).unwrap();
        let len = std::fs::metadata(&out).unwrap().len();
        assert_eq!(len, 8 * MIB);
        let mtime = std::fs::metadata(&out).unwrap().modified().unwrap();
        code_disk(&code, &out).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), mtime);
        assert!(code_disk(&t.path().join("missing"), &t.path().join("x.ext4")).is_err());
    }
}
