//! The OCI bundle of a gVisor instance: the shared read-only root directory and the
//! per-instance `config.json` (built with the `oci-spec` crate).

use crate::native::{ETC_WHITELIST, SYSTEM_DIRS};
use crate::SandboxError;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use skiff_core::launch::{RUNTIME_DIR, TASK_ROOT};
use std::path::{Path, PathBuf};

/// Where the agent binary appears inside the sandbox.
pub(crate) const AGENT_PATH: &str = "/.skiff/agent";

/// What goes into one instance's `config.json`.
pub(crate) struct BundleSpec<'a> {
    /// The shared root directory ([`build_rootfs`]).
    pub rootfs: &'a Path,
    pub agent_exe: &'a Path,
    pub agent_args: &'a [String],
    pub code_dir: &'a Path,
    pub runtime_dir: &'a Path,
    /// `resolv.conf` for the instance's network mode.
    pub resolv_conf: &'a Path,
    pub workspace: Option<&'a Path>,
    pub tmp_bytes: u64,
    /// A network namespace to run in (outbound networking), instead of a new empty one.
    pub netns: Option<&'a str>,
}

fn oci_err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Start(format!("OCI bundle: {e}"))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> SandboxError {
    SandboxError::Start(format!("{what} {}: {e}", path.display()))
}

/// A read-only bind mount of `src` at `dst`.
fn bind(src: &Path, dst: &str, writable: bool) -> Result<Mount, SandboxError> {
    MountBuilder::default()
        .destination(dst)
        .typ("bind")
        .source(src)
        .options(vec![
            "rbind".to_string(),
            if writable { "rw" } else { "ro" }.to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
        ])
        .build()
        .map_err(oci_err)
}

/// Builds (idempotently) the root directory every gVisor instance shares, read-only: empty
/// mountpoints, the merged-/usr symlinks of the host, a generated `/etc` (passwd, group,
/// hosts, hostname) with mountpoints for the host files bound in from [`ETC_WHITELIST`].
pub(crate) fn build_rootfs(dir: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let mk = |p: PathBuf| std::fs::create_dir_all(&p).map_err(|e| io_err("mkdir", &p, e));
    for d in [
        "usr",
        "proc",
        "dev",
        "sys",
        "tmp",
        "etc",
        "var/task",
        "var/runtime",
        "workspace",
        ".skiff",
    ] {
        mk(dir.join(d))?;
    }
    for d in SYSTEM_DIRS {
        let host = Path::new("/").join(d);
        let ours = dir.join(d);
        let Ok(md) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if md.is_symlink() {
            let target = std::fs::read_link(&host).map_err(|e| io_err("readlink", &host, e))?;
            if std::fs::read_link(&ours).ok().as_deref() != Some(target.as_path()) {
                let _ = std::fs::remove_file(&ours);
                std::os::unix::fs::symlink(&target, &ours)
                    .map_err(|e| io_err("symlink", &ours, e))?;
            }
        } else if md.is_dir() {
            mk(ours)?;
        }
    }
    let touch = |p: PathBuf| -> Result<(), SandboxError> {
        if !p.exists() {
            std::fs::write(&p, b"").map_err(|e| io_err("create", &p, e))?;
        }
        Ok(())
    };
    touch(dir.join(AGENT_PATH.trim_start_matches('/')))?;
    touch(dir.join("etc/resolv.conf"))?;
    for e in ETC_WHITELIST {
        let host = Path::new("/etc").join(e);
        if host.is_dir() {
            mk(dir.join("etc").join(e))?;
        } else if host.exists() {
            touch(dir.join("etc").join(e))?;
        }
    }
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\nsbx_user:x:{uid}:{gid}::/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        ("group", format!("root:x:0:\nsbx_user:x:{gid}:\nnogroup:x:65534:\n")),
        (
            "hosts",
            "127.0.0.1 localhost skiff\n::1 localhost ip6-localhost\n".to_string(),
        ),
        ("hostname", "skiff\n".to_string()),
    ];
    for (name, text) in files {
        let p = dir.join("etc").join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&p, text).map_err(|e| io_err("write", &p, e))?;
        }
    }
    Ok(())
}

/// The OCI runtime spec of one instance. The agent starts as root *inside* the sandbox (the
/// sentry's own user namespace, never host root) with the few capabilities it needs to drop
/// to the function's uid, exactly as in the native tier.
pub(crate) fn spec(b: &BundleSpec) -> Result<Spec, SandboxError> {
    let mut mounts = vec![
        MountBuilder::default()
            .destination("/proc")
            .typ("proc")
            .source("proc")
            .build()
            .map_err(oci_err)?,
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                format!("size={}", b.tmp_bytes.max(4096)),
                "mode=1777".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
            ])
            .build()
            .map_err(oci_err)?,
        bind(Path::new("/usr"), "/usr", false)?,
    ];
    for d in SYSTEM_DIRS {
        let host = Path::new("/").join(d);
        if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            mounts.push(bind(&host, &format!("/{d}"), false)?);
        }
    }
    for e in ETC_WHITELIST {
        let host = Path::new("/etc").join(e);
        if host.exists() {
            mounts.push(bind(&host, &format!("/etc/{e}"), false)?);
        }
    }
    mounts.push(bind(b.resolv_conf, "/etc/resolv.conf", false)?);
    mounts.push(bind(b.code_dir, TASK_ROOT, false)?);
    mounts.push(bind(b.runtime_dir, RUNTIME_DIR, false)?);
    mounts.push(bind(b.agent_exe, AGENT_PATH, false)?);
    if let Some(ws) = b.workspace {
        mounts.push(bind(ws, crate::WORKSPACE_DIR, true)?);
    }

    let caps: oci_spec::runtime::Capabilities = [
        Capability::Setuid,
        Capability::Setgid,
        Capability::Setpcap,
        Capability::SysResource,
        Capability::Kill,
    ]
    .into_iter()
    .collect();
    let mut args = vec![AGENT_PATH.to_string()];
    args.extend(b.agent_args.iter().cloned());
    args.push(skiff_agent_stdio_arg().to_string());
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(oci_err)?,
        )
        .args(args)
        .env(Vec::<String>::new())
        .cwd("/")
        .no_new_privileges(false)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(oci_err)?,
        )
        .build()
        .map_err(oci_err)?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .map(|t| match (t, b.netns) {
        (LinuxNamespaceType::Network, Some(path)) => {
            LinuxNamespaceBuilder::default().typ(t).path(path).build()
        }
        _ => LinuxNamespaceBuilder::default().typ(t).build(),
    })
    .collect::<Result<Vec<_>, _>>()
    .map_err(oci_err)?;
    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(b.rootfs)
                .readonly(true)
                .build()
                .map_err(oci_err)?,
        )
        .hostname("skiff")
        .mounts(mounts)
        .process(process)
        .linux(
            LinuxBuilder::default()
                .namespaces(namespaces)
                .build()
                .map_err(oci_err)?,
        )
        .build()
        .map_err(oci_err)
}

/// The agent's "channel on stdin" argument (see `skiff_agent::STDIO_CHANNEL_ARG`; the
/// sandbox crate does not depend on the agent crate).
fn skiff_agent_stdio_arg() -> &'static str {
    "--stdio-channel"
}

/// Writes `config.json` into the (new) bundle directory `dir`.
pub(crate) fn write(dir: &Path, spec: &Spec) -> Result<(), SandboxError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", dir, e))?;
    spec.save(dir.join("config.json")).map_err(oci_err)
}
