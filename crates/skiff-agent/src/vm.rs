//! What the agent does only as the init of a microVM: take its channel from a virtio-serial
//! port, report the guest kernel's OOM kills, and keep one small privileged helper process
//! that sets the clock and reseeds the kernel RNG when a guest is restored from a snapshot
//! (every copy of a snapshot would otherwise share the RNG state and run with the snapshot's
//! time). The helper is forked before the agent drops its privileges and only reads a pipe
//! that the agent alone holds.

use skiff_core::protocol::VmResume;
use std::cell::Cell;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// Argument that names the agent's virtio-serial port (`--vm-channel /dev/vport1p1`).
pub const VM_CHANNEL_ARG: &str = "--vm-channel";

/// Write end of the pipe to the privileged helper.
static HELPER: OnceLock<std::fs::File> = OnceLock::new();

/// Opens the virtio-serial port named after [`VM_CHANNEL_ARG`] as the agent's channel (fd 3).
/// Returns `None` when the argument is absent.
pub(crate) fn take_channel_arg() -> Option<Result<(), String>> {
    let mut args = std::env::args().skip_while(|a| a != VM_CHANNEL_ARG);
    args.next()?;
    let Some(path) = args.next() else {
        return Some(Err(format!("{VM_CHANNEL_ARG} needs a device path")));
    };
    let c = match std::ffi::CString::new(path.clone()) {
        Ok(c) => c,
        Err(_) => return Some(Err("bad channel path".into())),
    };
    // SAFETY: plain syscalls on a valid path and fds we own.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return Some(Err(format!(
                "open {path}: {}",
                std::io::Error::last_os_error()
            )));
        }
        if fd != crate::CHANNEL_FD {
            if libc::dup2(fd, crate::CHANNEL_FD) < 0 {
                return Some(Err(format!("dup2: {}", std::io::Error::last_os_error())));
            }
            libc::close(fd);
        }
        // No function process may inherit the console as its stdin.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
    Some(Ok(()))
}

/// Moves the agent into a fresh pid namespace (call as the guest's init, single-threaded,
/// before the config is read): the init forks the agent as PID 1 of that namespace, so the
/// function's `/proc` shows only the sandbox, not the guest kernel's threads, and stays
/// behind only to reap and to end the VM when the agent ends. Returns in the agent.
pub(crate) fn enter_pid_namespace() -> Result<(), String> {
    // SAFETY: unshare and fork in a single-threaded process; the parent never returns.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(format!("unshare(pid): {}", std::io::Error::last_os_error()));
        }
        match libc::fork() {
            -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => Ok(()),
            agent => {
                // The guest's init: nothing but the agent and orphans; the channel is the
                // agent's alone.
                libc::close(crate::CHANNEL_FD);
                loop {
                    let mut st = 0;
                    let pid = libc::waitpid(-1, &mut st, 0);
                    if pid == agent || (pid < 0 && *libc::__errno_location() == libc::ECHILD) {
                        // Init exiting ends the VM (the host sees QEMU exit).
                        libc::_exit(0);
                    }
                }
            }
        }
    }
}

/// Guest kernel settings for a function VM (call while still root): allocations may exceed
/// the guest's RAM, as under a host memory cgroup, so a function over its memory is
/// OOM-killed (reported as such) rather than failing an early `malloc` with its own error.
pub(crate) fn tune_kernel() {
    let _ = std::fs::write("/proc/sys/vm/overcommit_memory", b"1");
}

/// Forks the privileged helper (call while still root, single-threaded).
pub(crate) fn start_helper() -> Result<(), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 into a valid array; fork in a single-threaded process.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        match libc::fork() {
            -1 => return Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => {
                libc::close(fds[1]);
                helper_loop(fds[0]);
            }
            _ => {
                libc::close(fds[0]);
                let _ = HELPER.set(std::fs::File::from(OwnedFd::from_raw_fd(fds[1])));
            }
        }
    }
    Ok(())
}

/// Hands a [`VmResume`] body to the helper (ignored when malformed or without a helper).
pub(crate) fn resume(body: &[u8]) {
    if VmResume::decode(body).is_none() {
        return;
    }
    if let Some(mut f) = HELPER.get() {
        let _ = f.write_all(body);
    }
}

/// The helper: applies each [`VmResume`] it reads. Never returns.
fn helper_loop(fd: i32) -> ! {
    let mut buf = [0u8; 8 + VmResume::SEED_LEN];
    loop {
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reading into the unfilled part of our buffer.
            let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            if n <= 0 {
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                // The agent is gone.
                // SAFETY: process exit.
                unsafe { libc::_exit(0) };
            }
            got += n as usize;
        }
        if let Some((nanos, seed)) = VmResume::decode(&buf) {
            apply(nanos, &seed);
        }
    }
}

/// `struct rand_pool_info` with a 32-byte buffer.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; VmResume::SEED_LEN],
}

const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn apply(unix_nanos: u64, seed: &[u8; VmResume::SEED_LEN]) {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    let info = RandPoolInfo {
        entropy_count: (VmResume::SEED_LEN * 8) as libc::c_int,
        buf_size: VmResume::SEED_LEN as libc::c_int,
        buf: *seed,
    };
    // SAFETY: syscalls with valid pointers to initialised structs.
    unsafe {
        libc::clock_settime(libc::CLOCK_REALTIME, &ts);
        let fd = libc::open(c"/dev/urandom".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::ioctl(fd, RNDADDENTROPY, &info as *const RandPoolInfo);
            libc::ioctl(fd, RNDRESEEDCRNG);
            libc::close(fd);
        }
    }
}

/// Watches the guest kernel's OOM-kill counter (`/proc/vmstat` `oom_kill`).
pub(crate) struct OomWatch {
    seen: Cell<u64>,
}

impl OomWatch {
    pub(crate) fn new() -> Self {
        OomWatch {
            seen: Cell::new(oom_kills()),
        }
    }

    /// True once per increase of the counter since the last call.
    pub(crate) fn fired(&self) -> bool {
        let n = oom_kills();
        if n > self.seen.get() {
            self.seen.set(n);
            true
        } else {
            false
        }
    }
}

fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}
