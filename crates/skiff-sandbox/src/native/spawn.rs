//! Cloning the agent into fresh namespaces from a multi-threaded process.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Everything the child needs, prepared before the clone (the child may not allocate).
pub(crate) struct AgentExec {
    exe: CString,
    /// Keeps the strings `argv_ptrs` points into alive.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into `_argv`, which is owned and never mutated.
unsafe impl Send for AgentExec {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for AgentExec {}

impl AgentExec {
    pub(crate) fn new(exe: &std::path::Path, args: &[String]) -> io::Result<AgentExec> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "NUL byte in agent path or argument",
            )
        };
        let exe_c = CString::new(exe.as_os_str().as_bytes()).map_err(bad)?;
        let mut argv = vec![CString::new("skiff-agent").map_err(bad)?];
        for a in args {
            argv.push(CString::new(a.as_bytes()).map_err(bad)?);
        }
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        Ok(AgentExec {
            exe: exe_c,
            _argv: argv,
            argv_ptrs,
        })
    }
}

/// Duplicates `fd` to a number ≥ 10 (close-on-exec), so the child's `dup2`s onto 0..=3 can
/// never clobber a source.
pub(crate) fn dup_high(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a valid fd.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Clones the agent as PID 1 of new pid/mount/net/ipc/uts namespaces. In the child: joins the
/// cgroups, wires fd 0 (`/dev/null`), 1 and 2 (`stderr`), 3 (`channel`), and execs the agent
/// with an empty environment. Returns the child's pid (in our namespace) and a pidfd for it.
pub(crate) fn clone_agent(
    exec: &AgentExec,
    cgroup_procs: &[OwnedFd],
    channel: &OwnedFd,
    devnull: &OwnedFd,
    stderr: &OwnedFd,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let chan = dup_high(channel.as_raw_fd())?;
    let null = dup_high(devnull.as_raw_fd())?;
    let err = dup_high(stderr.as_raw_fd())?;
    let procs: Vec<RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    let (chan_fd, null_fd, err_fd) = (chan.as_raw_fd(), null.as_raw_fd(), err.as_raw_fd());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: the child only makes async-signal-safe calls on memory prepared before the
    // clone, then execs or _exits.
    let Some((pid, pidfd)) = (unsafe { clone_into_cgroups(flags, &procs)? }) else {
        // Child.
        // SAFETY: async-signal-safe calls only; never returns.
        unsafe {
            if libc::dup2(null_fd, 0) < 0
                || libc::dup2(err_fd, 1) < 0
                || libc::dup2(err_fd, 2) < 0
                || libc::dup2(chan_fd, 3) < 0
            {
                libc::_exit(125);
            }
            libc::execve(exec.exe.as_ptr(), exec.argv_ptrs.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    };
    drop((chan, null, err));
    Ok((pid, pidfd))
}

/// A fork-like `clone` (`CLONE_PIDFD | SIGCHLD` plus `extra_flags`: namespaces) whose child
/// clears its signal mask and joins the cgroups whose `cgroup.procs` are `cgroup_procs`
/// (exit code 126 if it cannot). Returns the child's pid and pidfd in the parent, `None` in
/// the child.
///
/// # Safety
/// Like `fork` in a multi-threaded process: in the child (`None`) the caller may only make
/// async-signal-safe calls on memory prepared before, then must `execve` or `_exit`.
pub(crate) unsafe fn clone_into_cgroups(
    extra_flags: libc::c_int,
    cgroup_procs: &[RawFd],
) -> io::Result<Option<(libc::pid_t, OwnedFd)>> {
    let flags = extra_flags | libc::CLONE_PIDFD | libc::SIGCHLD;
    let mut pidfd: libc::c_int = -1;
    // SAFETY: no CLONE_VM and no new stack: the child gets a copy of this address space, as
    // with fork.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for &fd in cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(126);
                }
            }
        }
        return Ok(None);
    }
    // SAFETY: CLONE_PIDFD stored a fresh fd (close-on-exec) for the child.
    Ok(Some((pid as libc::pid_t, unsafe {
        OwnedFd::from_raw_fd(pidfd)
    })))
}
