//! Outbound networking through slirp4netns: a user-mode TCP/IP stack attached to a tap device
//! in the sandbox's network namespace. The sandbox gets 10.0.2.100/24, gateway 10.0.2.2, DNS
//! 10.0.2.3; host loopback is unreachable and nothing can connect in (no port forwards).

use crate::SandboxError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// How long slirp4netns may take to configure the interface.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// A running slirp4netns process.
pub(crate) struct Slirp {
    child: tokio::process::Child,
    /// Closing this makes slirp4netns exit (`--exit-fd`).
    _exit_w: OwnedFd,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Finds `name` on `$PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Slirp {
    /// Starts slirp4netns for the network namespace of `pid` and waits until it is configured.
    pub(crate) async fn start(bin: &Path, pid: libc::pid_t) -> Result<Slirp, SandboxError> {
        let io =
            |what: &str, e: std::io::Error| SandboxError::Start(format!("network: {what}: {e}"));
        let (ready_r, ready_w) = pipe().map_err(|e| io("pipe", e))?;
        let (exit_r, exit_w) = pipe().map_err(|e| io("pipe", e))?;
        let (rw, er): (RawFd, RawFd) = (ready_w.as_raw_fd(), exit_r.as_raw_fd());
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--configure")
            .arg("--mtu=65520")
            .arg("--disable-host-loopback")
            .arg("--enable-sandbox")
            .arg("--enable-seccomp")
            .arg(format!("--ready-fd={rw}"))
            .arg(format!("--exit-fd={er}"))
            .arg(pid.to_string())
            .arg("tap0")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: fcntl is async-signal-safe; the fds are open in the child (same numbers).
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(rw, libc::F_SETFD, 0);
                libc::fcntl(er, libc::F_SETFD, 0);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io(&format!("cannot run {}", bin.display()), e))?;
        drop(ready_w);
        drop(exit_r);

        let stderr_tail = Arc::new(parking_lot::Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(target: "skiff::slirp4netns", "{line}");
                    let mut t = tail.lock();
                    if t.len() < 4096 {
                        t.push_str(&line);
                        t.push('\n');
                    }
                }
            });
        }

        let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)
            .map_err(|e| io("ready pipe", e))?;
        let mut byte = [0u8; 1];
        let outcome = tokio::time::timeout(READY_TIMEOUT, ready.read(&mut byte)).await;
        match outcome {
            Ok(Ok(1)) => Ok(Slirp {
                child,
                _exit_w: exit_w,
            }),
            other => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                // Give the stderr reader a moment to collect the reason.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let why = match other {
                    Err(_) => "timed out waiting for it to configure the interface".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => "it exited before configuring the interface".to_string(),
                };
                let tail = stderr_tail.lock().trim().to_string();
                Err(SandboxError::Start(format!(
                    "network: slirp4netns failed: {why}: {tail}"
                )))
            }
        }
    }

    /// Kills and reaps it.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
