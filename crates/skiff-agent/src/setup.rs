//! Building the sandbox root and dropping privileges. Runs single-threaded, as root, in the
//! new namespaces, before the async runtime exists.

use skiff_core::protocol::AgentConfig;
use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

type Res = Result<(), String>;

fn cs(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("path contains NUL: {s:?}"))
}

fn errno_msg(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Res {
    let t = target.to_str().ok_or("non-UTF-8 mount target")?;
    let src_c = src.map(cs).transpose()?;
    let t_c = cs(t)?;
    let fs_c = fstype.map(cs).transpose()?;
    let data_c = data.map(cs).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            p(&src_c),
            t_c.as_ptr(),
            p(&fs_c),
            flags,
            p(&data_c) as *const libc::c_void,
        )
    };
    if rc != 0 {
        return Err(errno_msg(&format!(
            "mount {} on {t}",
            src.or(fstype).unwrap_or("(remount)")
        )));
    }
    Ok(())
}

/// `struct mount_attr` for `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// Makes a bind mount (and everything below it) read-only, nosuid, nodev.
fn make_readonly(target: &Path) -> Res {
    let t = cs(target.to_str().ok_or("non-UTF-8 path")?)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid path and attr struct of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            t.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Older kernels: remount the top mount only.
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// `root_dir` + an absolute sandbox path.
fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn mkdirs(p: &Path) -> Res {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// Creates the mountpoint for a bind of `src` (a directory or an empty file).
fn mountpoint_for(src: &Path, dst: &Path) -> Res {
    let md = std::fs::metadata(src).map_err(|e| format!("bind source {}: {e}", src.display()))?;
    if md.is_dir() {
        mkdirs(dst)
    } else {
        if let Some(parent) = dst.parent() {
            mkdirs(parent)?;
        }
        if !dst.exists() {
            std::fs::File::create(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
        }
        Ok(())
    }
}

/// Builds the new root and pivots into it; sets the hostname and brings up `lo`.
pub(crate) fn build_root(cfg: &AgentConfig) -> Res {
    let root = Path::new(&cfg.root_dir);
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=4m,nr_inodes=4096,mode=0755"),
    )?;

    if let Some(image) = &cfg.rootfs {
        bind_image(Path::new(image), root, &cfg.etc_files)?;
    }
    for b in &cfg.binds {
        let dst = under(root, &b.dst);
        let src = Path::new(&b.src);
        mountpoint_for(src, &dst)?;
        mount(Some(&b.src), &dst, None, libc::MS_BIND | libc::MS_REC, None)?;
        if !b.rw {
            make_readonly(&dst)?;
        }
    }
    // Merged-/usr hosts: /bin → usr/bin etc., unless the host bound real directories.
    for name in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
        let link = root.join(name);
        if std::fs::symlink_metadata(&link).is_err() && root.join("usr").join(name).is_dir() {
            std::os::unix::fs::symlink(format!("usr/{name}"), &link)
                .map_err(|e| format!("symlink {}: {e}", link.display()))?;
        }
    }

    let etc = root.join("etc");
    mkdirs(&etc)?;
    for (name, content) in &cfg.etc_files {
        if name.contains('/') || name.starts_with('.') {
            return Err(format!("bad etc file name {name:?}"));
        }
        std::fs::write(etc.join(name), content).map_err(|e| format!("write /etc/{name}: {e}"))?;
    }

    build_dev(root)?;

    let proc_dir = root.join("proc");
    mkdirs(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    let tmp = root.join("tmp");
    mkdirs(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("size={},mode=1777", cfg.tmp_bytes.max(4096))),
    )?;
    for d in ["var/task", "var/runtime"] {
        mkdirs(&root.join(d))?;
    }

    pivot(root)?;
    // The root tmpfs itself becomes read-only; /tmp, /dev/shm stay writable.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;

    let host = cfg.hostname.as_bytes();
    // SAFETY: valid buffer and length.
    if unsafe { libc::sethostname(host.as_ptr() as *const libc::c_char, host.len()) } != 0 {
        return Err(errno_msg("sethostname"));
    }
    loopback_up()
}

/// Top-level image entries never taken from the image: Skiff mounts its own there.
const IMAGE_SKIP: &[&str] = &["proc", "dev", "tmp", "sys"];
/// Image directories recreated on the tmpfs and filled entry by entry, because Skiff adds
/// files (`/etc`) or mountpoints (`/var/task`, `/var/runtime`) inside them.
const IMAGE_SPLIT: &[&str] = &["etc", "var"];

/// Populates the new root from a root image: each entry of `image` is bound read-only (a
/// symlink is recreated, never followed, so it cannot pull in host files); `/etc` and `/var`
/// are recreated and filled one level down, skipping the generated `/etc` files and
/// `/var/task`, `/var/runtime`.
fn bind_image(image: &Path, root: &Path, etc_files: &[(String, String)]) -> Res {
    populate(image, root, &|name| {
        IMAGE_SKIP.contains(&name) || IMAGE_SPLIT.contains(&name)
    })?;
    for d in IMAGE_SPLIT {
        let src = image.join(d);
        if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let dst = root.join(d);
        mkdirs(&dst)?;
        populate(&src, &dst, &|name| {
            (*d == "etc" && etc_files.iter().any(|(n, _)| n == name))
                || (*d == "var" && (name == "task" || name == "runtime"))
        })?;
    }
    Ok(())
}

/// Opens `path` itself (`O_PATH|O_NOFOLLOW`, plus `extra` flags), never a symlink's target.
fn pin(path: &Path, extra: libc::c_int) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | extra)
        .open(path)
        .map_err(|e| format!("root image {}: {e}", path.display()))
}

/// Binds (read-only) or re-links every entry of `src` into `dst`, except those `skip` names.
fn populate(src: &Path, dst: &Path, skip: &dyn Fn(&str) -> bool) -> Res {
    // Pin the directory too (not a symlink) and resolve entries through its fd.
    let dir = pin(src, libc::O_DIRECTORY)?;
    let base = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let entries =
        std::fs::read_dir(&base).map_err(|e| format!("root image {}: {e}", src.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("root image {}: {e}", src.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if skip(name) {
            continue;
        }
        let from = base.join(name);
        let to = dst.join(name);
        // Pin the entry itself (never a symlink's target) and mount what was checked, so an
        // entry swapped for a symlink meanwhile cannot redirect the bind to a host path.
        let pinned = pin(&from, 0)?;
        let md = pinned
            .metadata()
            .map_err(|e| format!("root image {}/{name}: {e}", src.display()))?;
        if md.file_type().is_symlink() {
            let target = std::fs::read_link(&from)
                .map_err(|e| format!("root image {}/{name}: {e}", src.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| format!("symlink {}: {e}", to.display()))?;
        } else if md.is_dir() || md.is_file() {
            if md.is_dir() {
                mkdirs(&to)?;
            } else {
                std::fs::File::create(&to).map_err(|e| format!("create {}: {e}", to.display()))?;
            }
            let src = format!("/proc/self/fd/{}", pinned.as_raw_fd());
            mount(Some(&src), &to, None, libc::MS_BIND | libc::MS_REC, None)?;
            make_readonly(&to)?;
        }
        // Sockets, fifos and device nodes of the image are left out.
    }
    Ok(())
}

fn build_dev(root: &Path) -> Res {
    let dev = root.join("dev");
    mkdirs(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = format!("/dev/{name}");
        if std::fs::metadata(&src).is_err() {
            continue;
        }
        let dst = dev.join(name);
        std::fs::File::create(&dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
        mount(Some(&src), &dst, None, libc::MS_BIND, None)?;
        mount(
            None,
            &dst,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC,
            None,
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| format!("symlink /dev/{link}: {e}"))?;
    }
    let shm = dev.join("shm");
    mkdirs(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=64m,mode=1777"),
    )?;
    mount(
        None,
        &dev,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}

/// `pivot_root(".", ".")` into `root`, then detaches the old root stacked on top of it.
fn pivot(root: &Path) -> Res {
    let r = cs(root.to_str().ok_or("non-UTF-8 root")?)?;
    let dot = c".";
    // SAFETY: valid NUL-terminated paths.
    unsafe {
        if libc::chdir(r.as_ptr()) != 0 {
            return Err(errno_msg("chdir to new root"));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(errno_msg("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(errno_msg("detach old root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(errno_msg("chdir /"));
        }
    }
    Ok(())
}

fn loopback_up() -> Res {
    // SAFETY: ioctl on a socket we own with a properly initialised ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno_msg("socket"));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = (rc != 0).then(|| errno_msg("bring up lo"));
        libc::close(fd);
        err.map_or(Ok(()), Err)
    }
}

/// Lowers the agent's OOM priority, then drops every privilege: bounding set, supplementary
/// groups, uid/gid (real, effective, saved), and sets `no_new_privs`.
pub(crate) fn drop_privileges(cfg: &AgentConfig) -> Res {
    // The OOM killer must pick a function process, never the agent. Children reset it to 0.
    // Lowering needs CAP_SYS_RESOURCE; without it the children raise theirs instead.
    if std::fs::write("/proc/self/oom_score_adj", b"-1000").is_err() {
        crate::serve::CHILD_OOM_SCORE_ADJ_RAISED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let last_cap: libc::c_ulong = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // SAFETY: plain prctl/set*id syscalls.
    unsafe {
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &core);
        if cfg.max_procs > 0 {
            let n = libc::rlimit {
                rlim_cur: cfg.max_procs.into(),
                rlim_max: cfg.max_procs.into(),
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &n) != 0 {
                return Err(errno_msg("RLIMIT_NPROC"));
            }
        }
        for cap in 0..=last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(errno_msg(&format!("drop capability {cap}")));
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(errno_msg("setgroups"));
        }
        if libc::setresgid(cfg.gid, cfg.gid, cfg.gid) != 0 {
            return Err(errno_msg("setresgid"));
        }
        if libc::setresuid(cfg.uid, cfg.uid, cfg.uid) != 0 {
            return Err(errno_msg("setresuid"));
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno_msg("no_new_privs"));
        }
        // Keep the agent's /proc entries root-owned: functions (same uid) cannot touch it.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    if cfg.uid != 0 {
        // SAFETY: getters.
        let ok = unsafe { libc::geteuid() == cfg.uid && libc::getegid() == cfg.gid };
        if !ok {
            return Err("identity change did not take effect".into());
        }
    }
    Ok(())
}
