//! Sockets inside a sandbox's network namespace, created from the host.
//!
//! A socket belongs for life to the network namespace it was created in, so the host can reach
//! a server on the sandbox's loopback without any network path into the sandbox: one helper
//! thread (shared by all instances, started on first use) enters the instance's namespace
//! with `setns`, creates a non-blocking TCP socket, and returns to the host's namespace. The
//! caller connects it with tokio like any other socket. Only socket creation crosses threads;
//! connections are meant to be pooled by the caller.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, OnceLock};
use tokio::sync::oneshot;

type Job = (Arc<OwnedFd>, oneshot::Sender<io::Result<OwnedFd>>);

static FACTORY: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();

fn factory() -> io::Result<&'static mpsc::Sender<Job>> {
    FACTORY
        .get_or_init(|| {
            let host = open_ns("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("skiff-netns".into())
                .spawn(move || {
                    for (ns, reply) in rx {
                        let _ = reply.send(socket_in(&ns, &host));
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(tx)
        })
        .as_ref()
        .map_err(|e| io::Error::other(format!("netns helper: {e}")))
}

/// Opens a namespace file (e.g. `/proc/<pid>/ns/net`).
pub(crate) fn open_ns(path: &str) -> io::Result<OwnedFd> {
    let f = std::fs::File::open(path)?;
    Ok(f.into())
}

/// On the helper thread: enter `ns`, create the socket, go back to `host`.
fn socket_in(ns: &OwnedFd, host: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: setns/socket on fds we own; the thread only ever runs this function.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        let err = io::Error::last_os_error();
        // Leave the instance's namespace so the thread does not keep it alive.
        if libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            tracing::warn!(
                "netns helper cannot return to the host namespace: {}",
                io::Error::last_os_error()
            );
        }
        if fd < 0 {
            return Err(err);
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Connects to `127.0.0.1:port` inside the network namespace `ns`.
pub(crate) async fn connect(ns: &Arc<OwnedFd>, port: u16) -> io::Result<tokio::net::TcpStream> {
    let (tx, rx) = oneshot::channel();
    factory()?
        .send((ns.clone(), tx))
        .map_err(|_| io::Error::other("netns helper is gone"))?;
    let fd = rx
        .await
        .map_err(|_| io::Error::other("netns helper is gone"))??;
    let std = std::net::TcpStream::from(fd);
    let sock = tokio::net::TcpSocket::from_std_stream(std);
    let stream = sock
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
