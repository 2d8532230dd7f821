//! The Skiff agent: PID 1 inside a native or gVisor sandbox, and the init of a microVM.
//!
//! The native tier starts it in fresh pid/mount/net/ipc/uts namespaces, already inside the
//! instance's cgroups, with the framed channel on fd 3 (see [`skiff_core::protocol`]); the
//! gVisor tier starts it as the container's process with the channel on stdin
//! ([`STDIO_CHANNEL_ARG`]) and a root `runsc` already built (`prebuilt_root`); a microVM's
//! initramfs execs it with its channel on a virtio-serial port ([`VM_CHANNEL_ARG`]). The
//! agent reads its [`AgentConfig`], builds the sandbox (a tmpfs root with read-only binds,
//! `/dev`, `/proc`, a sized `/tmp`, `pivot_root`), drops every privilege (capability bounding
//! set, uid/gid, `no_new_privs`, seccomp), reports `Ready`, then runs the function: either
//! Lambda Runtime API workers it serves over HTTP on loopback, or one process per invocation
//! (`command` mode). As PID 1 it also reaps every orphan of the sandbox.
//!
//! The agent is normally not a separate binary: the `skiff` server re-executes itself with an
//! argument such as `__agent` and calls [`main`].

mod command;
mod frames;
mod http;
mod rapi;
mod seccomp;
mod serve;
mod setup;
mod tunnel;
mod vm;

pub use vm::VM_CHANNEL_ARG;

use skiff_core::protocol::{AgentConfig, Kind, Ready};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::Instant;

/// File descriptor of the framed channel to the host.
pub const CHANNEL_FD: i32 = 3;

/// Runs the agent and exits the process. Never returns.
///
/// Expects to be PID 1 of a fresh pid namespace with the host channel on fd 3, as set up by
/// `skiff_sandbox::NativeSandbox`; run any other way it fails on the first frame read.
pub fn main() -> ! {
    let code = run();
    // SAFETY: terminating the process; nothing needs unwinding.
    unsafe { libc::_exit(code) }
}

/// Argument that makes the agent take its channel from stdin (fd 0) instead of fd 3: gVisor
/// containers get exactly stdin, stdout and stderr from the host.
pub const STDIO_CHANNEL_ARG: &str = "--stdio-channel";

fn run() -> i32 {
    let started = Instant::now();
    if std::env::args().any(|a| a == STDIO_CHANNEL_ARG) {
        // SAFETY: plain syscalls on fds we own; /dev/null replaces stdin so no function
        // process inherits the channel.
        unsafe {
            if libc::dup2(0, CHANNEL_FD) < 0 {
                return 2;
            }
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::close(null);
            }
        }
    }
    match vm::take_channel_arg() {
        Some(Err(e)) => {
            eprintln!("skiff-agent: {e}");
            return 2;
        }
        Some(Ok(())) => {
            if let Err(e) = vm::enter_pid_namespace() {
                eprintln!("skiff-agent: {e}");
                return 2;
            }
        }
        None => {}
    }
    // Nothing but fds 0..=3 may leak in from the host; fd 3 must not leak into the function.
    // SAFETY: plain syscalls on fds we own.
    unsafe {
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        libc::fcntl(CHANNEL_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: fd 3 is the channel handed to us by the host; we are its only owner.
    let mut chan = unsafe { File::from_raw_fd(CHANNEL_FD) };
    let cfg: AgentConfig = match frames::read_blocking(&mut chan) {
        Ok(Some(f)) if f.kind == Kind::Config => match f.header() {
            Ok(c) => c,
            Err(e) => return fail(&mut chan, &format!("bad agent config: {e}")),
        },
        Ok(_) => return fail(&mut chan, "expected the config frame first"),
        Err(e) => {
            eprintln!("skiff-agent: cannot read config from fd 3: {e}");
            return 2;
        }
    };

    if !cfg.prebuilt_root {
        if let Err(e) = setup::build_root(&cfg) {
            return fail(&mut chan, &format!("sandbox setup failed: {e}"));
        }
    }
    // Frames that arrive while we wait for the network (normally none) are replayed later.
    let mut early = Vec::new();
    if cfg.wait_for_network {
        loop {
            match frames::read_blocking(&mut chan) {
                Ok(Some(f)) if f.kind == Kind::NetReady => break,
                Ok(Some(f)) if f.kind == Kind::Shutdown => return 0,
                Ok(Some(f)) => early.push(f),
                Ok(None) | Err(_) => return 0,
            }
        }
    }
    if cfg.vm {
        vm::tune_kernel();
        if let Err(e) = vm::start_helper() {
            return fail(&mut chan, &format!("sandbox setup failed: {e}"));
        }
    }
    if let Err(e) = setup::drop_privileges(&cfg) {
        return fail(&mut chan, &format!("sandbox setup failed: {e}"));
    }
    if cfg.seccomp {
        if let Err(e) = seccomp::install() {
            return fail(&mut chan, &format!("sandbox setup failed: seccomp: {e}"));
        }
    }
    let setup_us = started.elapsed().as_micros() as u64;
    let ready = serde_json::to_vec(&Ready { setup_us }).unwrap_or_default();
    if frames::write_blocking(&mut chan, &frames::encode(Kind::Ready, &ready, &[])).is_err() {
        return 0;
    }
    serve::run(cfg, chan, early)
}

/// Reports a fatal setup error to the host and returns the exit code.
fn fail(chan: &mut File, msg: &str) -> i32 {
    eprintln!("skiff-agent: {msg}");
    let _ = frames::write_blocking(
        chan,
        &frames::encode(Kind::SetupFailed, b"{}", msg.as_bytes()),
    );
    1
}
