//! `http` mode: the function is one long-running HTTP server, started with the handler's
//! command line and listening on `127.0.0.1:{http_port}` (`$PORT`). Its stdout and stderr share
//! one pipe and go to the host as untagged `Log` frames. The agent connects to the port every
//! few milliseconds until the server accepts, then reports [`Kind::HttpReady`]. A native
//! sandbox's host then opens its own connections from inside the sandbox's network namespace
//! (the agent is not on the request path); on gVisor and microVMs, whose network stack the
//! host cannot enter, connections are tunnelled through the agent ([`crate::tunnel`]). The
//! server exiting ends the sandbox (`Exit` frame). Invocation frames
//! are answered with an error: requests never travel over the channel in this mode.

use crate::serve::{decode_status, Agent, Mode, Out};
use crate::tunnel::Tunnels;
use skiff_core::protocol::{Done, Exit, Frame, HttpReady, Invoke, Kind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

const LOG_CHUNK: usize = 64 * 1024;
/// Pause between readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(2);

/// The running server.
pub(crate) struct Http {
    agent: Rc<Agent>,
    tunnels: Rc<Tunnels>,
}

/// Starts the server and the readiness probe.
pub(crate) fn start(agent: Rc<Agent>) -> Result<Rc<dyn Mode>, String> {
    let cfg = &agent.cfg;
    let argv0 = cfg.argv.first().ok_or("no program to run (empty argv)")?;
    if cfg.http_port == 0 {
        return Err("http mode without a port".into());
    }
    let (r, w) = pipe_pair().map_err(|e| format!("pipe: {e}"))?;
    let w2 = w.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut cmd = Command::new(argv0);
    cmd.args(&cfg.argv[1..])
        .env_clear()
        .envs(cfg.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cfg.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2));
    let started = Instant::now();
    let (child, exit) = agent
        .spawn(&mut cmd)
        .map_err(|e| format!("cannot start the function: {argv0}: {e}"))?;
    drop(cmd); // closes our copies of the write ends
    drop(child);
    let log = pipe::Receiver::from_owned_fd(r).map_err(|e| format!("log pipe: {e}"))?;
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::task::spawn_local(log_pump(agent.clone(), log, closed_tx));
    tokio::task::spawn_local(monitor(agent.clone(), exit, closed_rx));
    tokio::task::spawn_local(probe(agent.clone(), cfg.http_port, started));
    let tunnels = Tunnels::new(cfg.http_port, agent.out.clone());
    Ok(Rc::new(Http { agent, tunnels }))
}

impl Mode for Http {
    fn quiesce(
        self: Rc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>> {
        Box::pin(async { Err("http functions cannot be snapshotted yet".to_string()) })
    }

    fn conn(&self, _out: &Out, f: Frame) {
        self.tunnels.on_frame(f);
    }

    fn invoke(&self, inv: Invoke, _payload: Vec<u8>) {
        let ty = "Runtime.InvalidMode";
        let body = serde_json::json!({
            "errorMessage": "an http function is reached through the HTTP proxy, not invocations",
            "errorType": ty,
        });
        let h = Done {
            id: inv.id,
            error_type: Some(ty.to_string()),
        };
        self.agent
            .out
            .json(Kind::Done, &h, body.to_string().as_bytes());
    }
}

/// Connects to the port until the server accepts, then reports readiness (once).
async fn probe(agent: Rc<Agent>, port: u16, started: Instant) {
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let ready_us = started.elapsed().as_micros() as u64;
            agent
                .out
                .json(Kind::HttpReady, &HttpReady { ready_us }, &[]);
            agent.out.raw(Kind::Initialized, b"{}", &[]);
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Streams the server's output to the host; signals when the pipe closed.
async fn log_pump(agent: Rc<Agent>, mut log: pipe::Receiver, closed: oneshot::Sender<()>) {
    let mut buf = vec![0u8; LOG_CHUNK];
    loop {
        match log.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => agent.out.log(None, &buf[..n]),
        }
    }
    let _ = closed.send(());
}

/// The server exited: forward its last output, report the exit and end the sandbox.
async fn monitor(agent: Rc<Agent>, exit: oneshot::Receiver<i32>, closed: oneshot::Receiver<()>) {
    let Ok(status) = exit.await else { return };
    // The reaper killed the server's process group, so the pipe closes promptly.
    let _ = tokio::time::timeout(Duration::from_millis(200), closed).await;
    if agent.terminating.get() {
        return;
    }
    let (code, signal) = decode_status(status);
    agent.out.json(
        Kind::Exit,
        &Exit {
            id: None,
            code,
            signal,
        },
        &[],
    );
    agent.out.exit(1);
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid array for pipe2.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own fd.
    unsafe {
        let fl = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((r, w))
}
