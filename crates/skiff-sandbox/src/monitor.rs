//! Sandboxes run by a monitor process (`runsc` for gVisor, QEMU for microVMs): starting it
//! from a multi-threaded process with a fork-like `clone` whose child joins the instance's
//! cgroups, wires stdin (the agent channel) and stdout/stderr, and, for runsc's outbound
//! networking, enters a fresh network and mount namespace (tmpfs over `/proc/sys/net`) and
//! waits for the host to attach slirp4netns before it execs; then [`launch`] wires the
//! monitor up as a [`NativeInstance`] (frames, logs, OOM, death).

use crate::native::cgroup::CgroupRoot;
use crate::native::{clone_into_cgroups, dup_high, pipe, NativeInstance};
use crate::SandboxError;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// Everything the child needs, prepared before the clone (the child may not allocate).
pub(crate) struct Exec {
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
}

impl Exec {
    pub(crate) fn new(argv: &[String]) -> io::Result<Exec> {
        let argv = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "NUL in a monitor argument")
            })?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        Ok(Exec {
            _argv: argv,
            argv_ptrs,
        })
    }
}

/// A started monitor.
pub(crate) struct Spawned {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: OwnedFd,
    /// Outbound networking: a byte written here lets the child exec runsc (the network of
    /// its namespace is ready); dropping it unwritten makes the child give up.
    pub(crate) go: Option<OwnedFd>,
}

/// Clones and execs the monitor (`argv[0]`) with an empty environment. Exit codes of the child
/// before exec: 126 cgroup join, 125 fds, 124 namespaces, 127 exec.
pub(crate) fn spawn(
    exec: &Exec,
    cgroup_procs: &[OwnedFd],
    channel: &OwnedFd,
    stderr: &OwnedFd,
    own_netns: bool,
) -> io::Result<Spawned> {
    let chan = dup_high(channel.as_raw_fd())?;
    let err = dup_high(stderr.as_raw_fd())?;
    let (go_r, go_w, ns_r, ns_w) = if own_netns {
        let (r, w) = pipe()?;
        let (nr, nw) = pipe()?;
        (Some(r), Some(w), Some(nr), Some(nw))
    } else {
        (None, None, None, None)
    };
    let go_fd = go_r.as_ref().map_or(-1, |f| f.as_raw_fd());
    let ns_fd = ns_w.as_ref().map_or(-1, |f| f.as_raw_fd());
    let procs: Vec<RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    let (chan_fd, err_fd) = (chan.as_raw_fd(), err.as_raw_fd());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let root = c"/";
    let proc_sys_net = c"/proc/sys/net";
    let tmpfs = c"tmpfs";
    // SAFETY: the child only makes async-signal-safe calls on memory prepared before the
    // clone, then execs or _exits.
    let Some((pid, pidfd)) = (unsafe { clone_into_cgroups(0, &procs)? }) else {
        // SAFETY: async-signal-safe calls only; never returns.
        unsafe {
            if go_fd >= 0 {
                if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        tmpfs.as_ptr(),
                        proc_sys_net.as_ptr(),
                        tmpfs.as_ptr(),
                        0,
                        std::ptr::null(),
                    ) != 0
                {
                    libc::_exit(124);
                }
                if libc::write(ns_fd, b"n".as_ptr().cast(), 1) != 1 {
                    libc::_exit(124);
                }
                // Wait until the host attached the network (it writes a byte; EOF if it
                // gave up). Forked copies of the write end elsewhere make EOF unreliable.
                let mut b = 0u8;
                loop {
                    let n = libc::read(go_fd, (&mut b as *mut u8).cast(), 1);
                    if n == 1 {
                        break;
                    }
                    if n == 0 {
                        libc::_exit(124);
                    }
                }
            }
            if libc::dup2(chan_fd, 0) < 0 || libc::dup2(err_fd, 1) < 0 || libc::dup2(err_fd, 2) < 0
            {
                libc::_exit(125);
            }
            libc::execve(exec.argv_ptrs[0], exec.argv_ptrs.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    };
    drop((chan, err, go_r, ns_w));
    if let Some(ns_r) = ns_r {
        // The child's namespaces exist once it wrote a byte (EOF: it failed, exit code 124).
        let mut b = 0u8;
        // SAFETY: reading one byte into a valid buffer from our own pipe.
        let n = loop {
            let n = unsafe { libc::read(ns_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        if n != 1 {
            // SAFETY: reaping our own child, which exited.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            return Err(io::Error::other(
                "could not create the network namespace for runsc",
            ));
        }
    }
    Ok(Spawned {
        pid,
        pidfd,
        go: go_w,
    })
}

/// A monitor started in its instance's cgroup and wired up as an instance.
pub(crate) struct Monitored {
    pub(crate) inst: NativeInstance,
    pub(crate) pid: libc::pid_t,
    /// See [`Spawned::go`].
    pub(crate) go: Option<OwnedFd>,
}

/// Creates the instance's cgroup (`memory` bytes, `pids_max` tasks), starts the monitor
/// `argv` in it with the agent channel on its stdin and its output as the agent's stderr,
/// and sends `config_frame` (unless empty). `cleanup` runs (blocking) once the monitor is
/// gone, or here when the start fails. `what` names the monitor in errors.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn launch(
    cgroups: &CgroupRoot,
    id: &str,
    memory: u64,
    pids_max: u32,
    argv: &[String],
    own_netns: bool,
    limit_mb: u64,
    config_frame: Vec<u8>,
    what: &str,
    cleanup: impl FnOnce() + Send + 'static,
) -> Result<Monitored, SandboxError> {
    let cg = match cgroups.create(id, memory, pids_max) {
        Ok(cg) => cg,
        Err(e) => {
            cleanup();
            return Err(SandboxError::Start(format!("cgroup: {e}")));
        }
    };
    let spawned = (|| -> io::Result<_> {
        let (host, child) = std::os::unix::net::UnixStream::pair()?;
        let (err_r, err_w) = pipe()?;
        let child: OwnedFd = child.into();
        let exec = Exec::new(argv)?;
        let s = spawn(&exec, &cg.procs, &child, &err_w, own_netns)?;
        Ok((host, err_r, s))
    })();
    let mut cg = cg;
    cg.procs.clear();
    let (host, err_r, spawned) = match spawned {
        Ok(s) => s,
        Err(e) => {
            cg.remove_blocking(Duration::from_millis(500));
            cleanup();
            return Err(SandboxError::Start(format!("cannot run {what}: {e}")));
        }
    };
    let cg = Arc::new(cg);
    let Spawned { pid, pidfd, go } = spawned;
    match NativeInstance::launch(
        id.to_string(),
        pidfd,
        host,
        err_r,
        cg.clone(),
        limit_mb,
        config_frame,
    ) {
        Ok(inst) => {
            inst.on_exit(cleanup);
            Ok(Monitored { inst, pid, go })
        }
        Err(e) => {
            // SAFETY: signalling and reaping our own child (not reaped yet: no pid reuse).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            cg.remove().await;
            cleanup();
            Err(SandboxError::Start(format!("cannot watch {what}: {e}")))
        }
    }
}
