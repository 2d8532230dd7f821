//! A running native sandbox: the agent process, its channel, cgroups and network helper.

use super::cgroup::InstanceCgroup;
use super::net::Slirp;
use super::netns;
use crate::tunnel::{HttpConn, Tunnels};
use crate::{Instance, InvokeRequest, InvokeResult, SandboxError};
use async_trait::async_trait;
use parking_lot::Mutex;
use skiff_core::launch::HTTP_PORT;
use skiff_core::protocol::{
    Done, Exit, Frame, HttpReady, InitError, Kind, Log, Ready, StreamChunk, StreamEnd, StreamStart,
};
use skiff_core::{ResponseStream, StreamError, StreamSender};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes of output kept for crash messages.
const TAIL_BYTES: usize = 4096;
/// Output not tagged with an invocation (runtime init) kept for the next invocation's logs.
const UNATTRIBUTED_MAX: usize = 256 * 1024;
const P_PIDFD: libc::idtype_t = 3;
/// Chunks of a streamed response buffered before the channel reader waits for the consumer.
const STREAM_BUFFER: usize = 64;

/// A stream item the channel reader delivers after `on_frame` (awaiting the consumer).
type Delivery = (StreamSender, Result<bytes::Bytes, StreamError>);

/// How the agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// Go-style wording, as Lambda reports runtime exits.
    fn describe(code: Option<i32>, signal: Option<i32>) -> String {
        match (code, signal) {
            (_, Some(sig)) => format!("signal: {}", signal_name(sig)),
            (Some(c), None) => format!("exit status {c}"),
            (None, None) => "unknown status".to_string(),
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGBUS => "bus error".into(),
        libc::SIGFPE => "floating point exception".into(),
        libc::SIGILL => "illegal instruction".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGSYS => "bad system call".into(),
        n => format!("signal {n}"),
    }
}

/// A byte ring keeping the last `TAIL_BYTES` of output.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            self.0.clear();
            self.0.extend_from_slice(&data[data.len() - TAIL_BYTES..]);
            return;
        }
        self.0.extend_from_slice(data);
        if self.0.len() > 2 * TAIL_BYTES {
            let cut = self.0.len() - TAIL_BYTES;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let s = &self.0[self.0.len().saturating_sub(TAIL_BYTES)..];
        String::from_utf8_lossy(s).into_owned()
    }
}

struct Pending {
    tx: oneshot::Sender<Result<InvokeResult, SandboxError>>,
    logs: Vec<u8>,
}

/// Why the instance can no longer serve.
enum Dead {
    Stopped,
    Oom,
    Crashed(String),
    Init {
        body: Vec<u8>,
        error_type: String,
        logs: Vec<u8>,
    },
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    /// Invocations whose response is being streamed, by id.
    streams: HashMap<String, StreamSender>,
    dead: Option<Dead>,
    tail: Tail,
    unattributed: Vec<u8>,
    oom_seen: u64,
    /// OOM kills a microVM's agent reported ([`Kind::OomKill`]): the guest kernel's, which
    /// the host cgroup never sees.
    guest_ooms: u64,
}

/// How the host reaches an `http` instance's server (on `127.0.0.1:{HTTP_PORT}` inside the
/// sandbox).
pub(crate) enum HttpTarget {
    /// By connecting from inside the sandbox's network namespace (`/proc/<agent>/ns/net`,
    /// opened at start): native sandboxes.
    Netns(Arc<OwnedFd>),
    /// Through the agent, over the channel ([`crate::tunnel`]): sandboxes with their own
    /// network stack (gVisor, microVMs).
    Tunnel,
}

/// Readiness of an `http` instance's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpState {
    /// The sandbox is not up yet (no [`Kind::Ready`]; a microVM boots for seconds).
    Booting,
    /// The sandbox is up and the server starting.
    Starting,
    Ready,
    Dead,
}

/// State shared between the instance handle and its background tasks.
pub(crate) struct Shared {
    http: watch::Sender<HttpState>,
    /// `http` connections carried over the channel.
    tunnels: Arc<Tunnels>,
    /// The agent reported [`Kind::Initialized`].
    initialized: watch::Sender<bool>,
    /// Waiting for the answer to a [`Kind::Quiesce`].
    quiesced: Mutex<Option<oneshot::Sender<String>>>,
    id: String,
    state: Mutex<State>,
    alive: AtomicBool,
    cgroup: Arc<InstanceCgroup>,
    limit_mb: u64,
    agent_stderr: Mutex<Tail>,
}

impl Shared {
    fn dead_result(&self, dead: &Dead, st: &State) -> Result<InvokeResult, SandboxError> {
        match dead {
            Dead::Stopped => Err(SandboxError::Gone),
            Dead::Oom => Err(SandboxError::OutOfMemory {
                limit_mb: self.limit_mb,
                log_tail: st.tail.text(),
            }),
            Dead::Crashed(m) => Err(SandboxError::Crashed {
                message: m.clone(),
                log_tail: st.tail.text(),
            }),
            Dead::Init {
                body,
                error_type,
                logs,
            } => Ok(InvokeResult {
                body: body.clone(),
                stream: None,
                error_type: Some(error_type.clone()),
                logs: logs.clone(),
            }),
        }
    }

    /// True (once per kill) if the OOM killer fired since we last looked.
    fn oom_fired(&self, st: &mut State) -> bool {
        let n = self.cgroup.oom_kills() + st.guest_ooms;
        if n > st.oom_seen {
            st.oom_seen = n;
            true
        } else {
            false
        }
    }

    /// Marks the instance dead (first cause wins) and fails every pending invocation.
    fn die(&self, dead: Dead) {
        let mut st = self.state.lock();
        if st.dead.is_some() {
            return;
        }
        self.alive.store(false, Ordering::Release);
        self.http.send_replace(HttpState::Dead);
        self.tunnels.close_all();
        let dead = match dead {
            Dead::Crashed(_) if self.oom_fired(&mut st) => Dead::Oom,
            d => d,
        };
        if let Dead::Crashed(m) = &dead {
            tracing::debug!(instance = %self.id, "instance died: {m}");
        }
        let pending: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            let _ = p.tx.send(self.dead_result(&dead, &st));
        }
        let message = match &dead {
            Dead::Stopped => "the instance was stopped".to_string(),
            Dead::Oom => format!(
                "function exceeded its memory limit of {} MiB and was killed",
                self.limit_mb
            ),
            Dead::Crashed(m) => m.clone(),
            Dead::Init { .. } => "the runtime failed to initialise".to_string(),
        };
        for (_, tx) in st.streams.drain() {
            fail_stream(tx, StreamError::new("Runtime.ExitError", message.clone()));
        }
        st.dead = Some(dead);
    }

    /// Handles one frame from the agent; a streamed chunk is returned for the reader to
    /// deliver (it waits for the consumer, outside the lock).
    fn on_frame(&self, f: Frame) -> Option<Delivery> {
        match f.kind {
            Kind::ConnData | Kind::ConnAck | Kind::ConnClose => self.tunnels.on_frame(f),
            Kind::OomKill => self.state.lock().guest_ooms += 1,
            Kind::Log => {
                let Ok(h) = f.header::<Log>() else {
                    return None;
                };
                let mut st = self.state.lock();
                st.tail.push(&f.body);
                match h.id {
                    Some(id) => {
                        if let Some(p) = st.pending.get_mut(&id) {
                            p.logs.extend_from_slice(&f.body);
                        }
                    }
                    None => {
                        if st.unattributed.len() + f.body.len() <= UNATTRIBUTED_MAX {
                            st.unattributed.extend_from_slice(&f.body);
                        }
                    }
                }
            }
            Kind::Done => {
                let Ok(h) = f.header::<Done>() else {
                    return None;
                };
                let mut st = self.state.lock();
                let p = st.pending.remove(&h.id)?;
                let mut logs = std::mem::take(&mut st.unattributed);
                if logs.is_empty() {
                    logs = p.logs;
                } else {
                    logs.extend_from_slice(&p.logs);
                }
                let result = if h.error_type.is_some() && self.oom_fired(&mut st) {
                    Err(SandboxError::OutOfMemory {
                        limit_mb: self.limit_mb,
                        log_tail: st.tail.text(),
                    })
                } else {
                    Ok(InvokeResult {
                        body: f.body,
                        stream: None,
                        error_type: h.error_type,
                        logs,
                    })
                };
                let _ = p.tx.send(result);
            }
            Kind::StreamStart => {
                let Ok(h) = f.header::<StreamStart>() else {
                    return None;
                };
                let mut st = self.state.lock();
                let p = st.pending.remove(&h.id)?;
                let mut logs = std::mem::take(&mut st.unattributed);
                logs.extend_from_slice(&p.logs);
                let (tx, stream) = ResponseStream::channel(STREAM_BUFFER, h.content_type);
                st.streams.insert(h.id, tx);
                let _ = p.tx.send(Ok(InvokeResult {
                    body: Vec::new(),
                    stream: Some(stream),
                    error_type: None,
                    logs,
                }));
            }
            Kind::StreamChunk => {
                let h = f.header::<StreamChunk>().ok()?;
                let tx = self.state.lock().streams.get(&h.id)?.clone();
                return Some((tx, Ok(f.body.into())));
            }
            Kind::StreamEnd => {
                let h = f.header::<StreamEnd>().ok()?;
                let tx = self.state.lock().streams.remove(&h.id)?;
                let ty = h.error_type?;
                let message = serde_json::from_slice::<serde_json::Value>(&f.body)
                    .ok()
                    .and_then(|v| v.get("errorMessage")?.as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&f.body).into_owned());
                return Some((tx, Err(StreamError::new(ty, message))));
            }
            Kind::HttpReady => {
                if let Ok(r) = f.header::<HttpReady>() {
                    tracing::debug!(instance = %self.id, ready_us = r.ready_us, "http server ready");
                }
                self.http.send_if_modified(|s| {
                    let starting = matches!(*s, HttpState::Booting | HttpState::Starting);
                    if starting {
                        *s = HttpState::Ready;
                    }
                    starting
                });
            }
            Kind::Quiesced => {
                if let Some(tx) = self.quiesced.lock().take() {
                    let _ = tx.send(String::from_utf8_lossy(&f.body).into_owned());
                }
            }
            Kind::Initialized => {
                self.initialized.send_replace(true);
            }
            Kind::Ready => {
                if let Ok(r) = f.header::<Ready>() {
                    tracing::debug!(instance = %self.id, setup_us = r.setup_us, "sandbox ready");
                }
                self.http.send_if_modified(|s| {
                    let booting = *s == HttpState::Booting;
                    if booting {
                        *s = HttpState::Starting;
                    }
                    booting
                });
            }
            Kind::Exit => {
                let h: Exit = f.header().unwrap_or(Exit {
                    id: None,
                    code: None,
                    signal: None,
                });
                self.die(Dead::Crashed(format!(
                    "Runtime exited with error: {}",
                    ExitStatus::describe(h.code, h.signal)
                )));
            }
            Kind::InitError => {
                let h: InitError = f.header().unwrap_or(InitError { error_type: None });
                let logs = std::mem::take(&mut self.state.lock().unattributed);
                self.die(Dead::Init {
                    body: f.body,
                    error_type: h
                        .error_type
                        .unwrap_or_else(|| "Runtime.InitError".to_string()),
                    logs,
                });
            }
            Kind::SetupFailed => {
                self.die(Dead::Crashed(String::from_utf8_lossy(&f.body).into_owned()));
            }
            _ => {}
        }
        None
    }
}

/// Ends a stream with an error, without blocking: waits for room on a task when it is full.
fn fail_stream(tx: StreamSender, err: StreamError) {
    if let Err(mpsc::error::TrySendError::Full(item)) = tx.try_send(Err(err)) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tx.send(item).await;
            });
        }
    }
}

/// One running native sandbox.
pub struct NativeInstance {
    shared: Arc<Shared>,
    pidfd: OwnedFd,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    exited: watch::Receiver<Option<ExitStatus>>,
    slirp: Mutex<Option<Slirp>>,
    http: Option<HttpTarget>,
    /// Set once `stop` finished cleaning up.
    stopped: tokio::sync::Mutex<bool>,
    /// Runs (blocking) once the agent process is gone: tier-specific cleanup.
    on_exit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

fn io_err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Io(io::Error::other(e.to_string()))
}

/// Waits on a pidfd for the process to exit and reaps it.
fn reap(pidfd: i32, nohang: bool) -> Option<ExitStatus> {
    loop {
        // SAFETY: zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
        // SAFETY: waitid on a pidfd we own.
        let rc = unsafe { libc::waitid(P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        if rc < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
        // SAFETY: filled in by waitid for a child state change.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return None; // WNOHANG and still running
        }
        return Some(if info.si_code == libc::CLD_EXITED {
            ExitStatus::Code(status)
        } else {
            ExitStatus::Signal(status)
        });
    }
}

impl NativeInstance {
    /// Wires up the tasks for a freshly started agent and sends `config_frame` (none when
    /// empty: an agent restored from a snapshot already has its config).
    pub(crate) fn launch(
        id: String,
        pidfd: OwnedFd,
        chan: std::os::unix::net::UnixStream,
        stderr: OwnedFd,
        cgroup: Arc<InstanceCgroup>,
        limit_mb: u64,
        config_frame: Vec<u8>,
    ) -> io::Result<NativeInstance> {
        chan.set_nonblocking(true)?;
        let (rd, wr) = tokio::net::UnixStream::from_std(chan)?.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            http: watch::Sender::new(HttpState::Booting),
            tunnels: Arc::new(Tunnels::new(tx.clone())),
            initialized: watch::Sender::new(false),
            quiesced: Mutex::new(None),
            id,
            state: Mutex::new(State::default()),
            alive: AtomicBool::new(true),
            cgroup,
            limit_mb,
            agent_stderr: Mutex::new(Tail::default()),
        });
        if !config_frame.is_empty() {
            let _ = tx.send(config_frame);
        }
        tokio::spawn(writer(wr, rx));

        let (exit_tx, exited) = watch::channel(None);
        let watch_fd = pidfd.try_clone()?;
        // SAFETY: the OwnedFd stays open and unchanged while registered.
        let afd = unsafe { AsyncFd::register(watch_fd) }.map_err(|e| e.into_parts().1)?;
        tokio::spawn(async move {
            let _ = afd.readable().await;
            let status = reap(afd.get_ref().as_raw_fd(), false);
            let _ = exit_tx.send(status.or(Some(ExitStatus::Code(-1))));
        });

        let err_pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)?;
        tokio::spawn(agent_stderr(shared.clone(), err_pipe));
        tokio::spawn(reader(shared.clone(), rd, exited.clone()));

        Ok(NativeInstance {
            shared,
            pidfd,
            tx,
            exited,
            slirp: Mutex::new(None),
            http: None,
            stopped: tokio::sync::Mutex::new(false),
            on_exit: Mutex::new(None),
        })
    }

    /// Sets the cleanup to run (blocking) once the agent process has exited.
    pub(crate) fn on_exit(&self, f: impl FnOnce() + Send + 'static) {
        *self.on_exit.lock() = Some(Box::new(f));
    }

    /// Records that the function is initialised (an instance restored from a snapshot taken
    /// after its init).
    pub(crate) fn mark_initialized(&self) {
        self.shared.initialized.send_replace(true);
        if self.http.is_some() {
            // An `http` function is initialised once its server accepts.
            self.shared.http.send_replace(HttpState::Ready);
        }
    }

    /// Asks the agent to get ready for a snapshot ([`Kind::Quiesce`]) and waits for it.
    pub(crate) async fn quiesce(&self, within: Duration) -> Result<(), SandboxError> {
        let (tx, rx) = oneshot::channel();
        *self.shared.quiesced.lock() = Some(tx);
        self.send_bare(Kind::Quiesce);
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(msg)) if msg.is_empty() => Ok(()),
            Ok(Ok(msg)) => Err(SandboxError::Unsupported(format!(
                "cannot snapshot now: {msg}"
            ))),
            Ok(Err(_)) => Err(self.dead_error()),
            Err(_) => Err(SandboxError::Crashed {
                message: "the agent did not get ready for the snapshot in time".into(),
                log_tail: String::new(),
            }),
        }
    }

    /// Waits until the function reported [`Kind::Initialized`], at most `within`.
    pub(crate) async fn wait_initialized(&self, within: Duration) -> Result<(), SandboxError> {
        let mut rx = self.shared.initialized.subscribe();
        let alive = self.shared.http.subscribe();
        let waited = tokio::time::timeout(within, async {
            let mut alive = alive;
            loop {
                if *rx.borrow_and_update() {
                    return Ok(());
                }
                if !self.is_alive() {
                    return Err(self.dead_error());
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return Err(self.dead_error()) },
                    r = alive.changed() => if r.is_err() { return Err(self.dead_error()) },
                }
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => Err(SandboxError::Crashed {
                message: format!(
                    "the function did not finish initialising within {:.1} s",
                    within.as_secs_f64()
                ),
                log_tail: self.shared.state.lock().tail.text(),
            }),
        }
    }

    /// Makes this an `http` instance whose server is reached at `target`.
    pub(crate) fn with_http(mut self, target: Option<HttpTarget>) -> Self {
        self.http = target;
        self
    }

    pub(crate) fn set_slirp(&self, s: Slirp) {
        *self.slirp.lock() = Some(s);
    }

    /// Sends a bare frame (e.g. `NetReady`).
    pub(crate) fn send_bare(&self, kind: Kind) {
        self.send_body(kind, Vec::new());
    }

    /// Sends a frame with an empty header and `body`.
    pub(crate) fn send_body(&self, kind: Kind, body: Vec<u8>) {
        let _ = self.tx.send(Frame::bare(kind, body).encode());
    }

    fn kill(&self) {
        // SAFETY: pidfd_send_signal on our pidfd (no pid-reuse race).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            );
        }
    }

    /// Why the instance cannot serve (it is dead).
    fn dead_error(&self) -> SandboxError {
        let st = self.shared.state.lock();
        match &st.dead {
            None => SandboxError::Gone,
            Some(d) => match self.shared.dead_result(d, &st) {
                Err(e) => e,
                Ok(_) => SandboxError::Crashed {
                    message: "the runtime failed to initialise".into(),
                    log_tail: st.tail.text(),
                },
            },
        }
    }

    /// The cgroup directories of this instance.
    pub fn cgroup_dirs(&self) -> Vec<std::path::PathBuf> {
        self.shared.cgroup.dirs().to_vec()
    }
}

async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
    }
}

async fn agent_stderr(shared: Arc<Shared>, pipe: tokio::net::unix::pipe::Receiver) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(instance = %shared.id, "agent: {line}");
        let mut t = shared.agent_stderr.lock();
        t.push(line.as_bytes());
        t.push(b"\n");
    }
}

async fn reader(
    shared: Arc<Shared>,
    rd: OwnedReadHalf,
    mut exited: watch::Receiver<Option<ExitStatus>>,
) {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut heard = false;
    loop {
        match skiff_core::protocol::read_frame(&mut rd).await {
            Ok(Some(f)) => {
                heard = true;
                if let Some((tx, item)) = shared.on_frame(f) {
                    // A consumer that went away just stops receiving.
                    let _ = tx.send(item).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(instance = %shared.id, "bad frame from agent: {e}");
                break;
            }
        }
    }
    // The channel closed: the agent is gone or going. Report how it ended.
    let status = tokio::time::timeout(Duration::from_secs(1), exited.wait_for(|s| s.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|s| *s));
    let how = match status {
        Some(ExitStatus::Code(c)) => ExitStatus::describe(Some(c), None),
        Some(ExitStatus::Signal(s)) => ExitStatus::describe(None, Some(s)),
        None => "no exit status".to_string(),
    };
    let stderr = shared.agent_stderr.lock().text();
    // Exit codes of the clone child before the agent ran (see spawn.rs).
    let early = match status {
        Some(ExitStatus::Code(125)) if !heard => Some("could not set up its file descriptors"),
        Some(ExitStatus::Code(126)) if !heard => Some("could not join its cgroups"),
        Some(ExitStatus::Code(127)) if !heard => Some("could not exec the agent executable"),
        _ => None,
    };
    let msg = if let Some(why) = early {
        format!("sandbox agent failed to start: {why}")
    } else if stderr.trim().is_empty() {
        format!("Runtime exited with error: {how}")
    } else {
        format!("Runtime exited with error: {how}: {}", stderr.trim())
    };
    shared.die(Dead::Crashed(msg));
}

/// Removes a pending entry when the invoking future is dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().pending.remove(&self.id);
    }
}

#[async_trait]
impl Instance for NativeInstance {
    fn id(&self) -> &str {
        &self.shared.id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        let InvokeRequest { invoke, payload } = req;
        let header = serde_json::to_vec(&invoke).map_err(io_err)?;
        let id = invoke.id;
        let rx = {
            let mut st = self.shared.state.lock();
            if let Some(dead) = &st.dead {
                return self.shared.dead_result(dead, &st);
            }
            if st.pending.contains_key(&id) {
                return Err(SandboxError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invocation {id} is already running on this instance"),
                )));
            }
            let (tx, rx) = oneshot::channel();
            st.pending.insert(
                id.clone(),
                Pending {
                    tx,
                    logs: Vec::new(),
                },
            );
            rx
        };
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let buf = skiff_core::protocol::encode_parts(Kind::Invoke, &header, &payload);
        drop(payload);
        // If the writer is gone the reader fails the pending entry.
        let _ = self.tx.send(buf);
        rx.await.unwrap_or(Err(SandboxError::Gone))
    }

    async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return;
        }
        self.shared.die(Dead::Stopped);
        self.kill();
        let mut exited = self.exited.clone();
        if tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|s| s.is_some()))
            .await
            .is_err()
        {
            tracing::warn!(instance = %self.shared.id, "agent did not exit within 5 s of SIGKILL");
        }
        let slirp = self.slirp.lock().take();
        if let Some(s) = slirp {
            s.stop().await;
        }
        let on_exit = self.on_exit.lock().take();
        if let Some(f) = on_exit {
            let _ = tokio::task::spawn_blocking(f).await;
        }
        self.shared.cgroup.remove().await;
        *stopped = true;
    }

    async fn initialized(&self, within: Duration) -> Result<(), SandboxError> {
        self.wait_initialized(within).await
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    fn memory_usage(&self) -> Option<u64> {
        self.shared.cgroup.memory_usage()
    }

    fn memory_peak(&self) -> Option<u64> {
        self.shared.cgroup.memory_peak()
    }

    async fn connect_http(&self, ready_within: Duration) -> Result<HttpConn, SandboxError> {
        let Some(target) = &self.http else {
            return Err(SandboxError::Unsupported(
                "the instance does not run an HTTP server".into(),
            ));
        };
        let mut state = self.shared.http.subscribe();
        // The sandbox coming up has a limit of its own, as a function's init has.
        let booted = tokio::time::timeout(
            crate::BOOT_LIMIT,
            state.wait_for(|s| *s != HttpState::Booting),
        )
        .await
        .is_ok();
        if !booted {
            return Err(SandboxError::Crashed {
                message: format!(
                    "the sandbox did not come up within {} s",
                    crate::BOOT_LIMIT.as_secs()
                ),
                log_tail: self.shared.agent_stderr.lock().text(),
            });
        }
        match tokio::time::timeout(ready_within, state.wait_for(|s| *s != HttpState::Starting))
            .await
        {
            Err(_) => {
                return Err(SandboxError::NotListening {
                    message: format!(
                        "the HTTP server did not accept connections on 127.0.0.1:{HTTP_PORT} within {:.2} s",
                        ready_within.as_secs_f64()
                    ),
                    log_tail: self.shared.state.lock().tail.text(),
                })
            }
            Ok(Ok(s)) if *s == HttpState::Ready => {}
            Ok(_) => return Err(self.dead_error()),
        }
        let netns = match target {
            HttpTarget::Tunnel => return Ok(self.shared.tunnels.open()),
            HttpTarget::Netns(ns) => ns,
        };
        match netns::connect(netns, HTTP_PORT).await {
            Ok(c) => Ok(HttpConn::Tcp(c)),
            Err(_) if !self.is_alive() => Err(self.dead_error()),
            Err(e) => Err(SandboxError::Crashed {
                message: format!("cannot connect to the HTTP server on 127.0.0.1:{HTTP_PORT}: {e}"),
                log_tail: self.shared.state.lock().tail.text(),
            }),
        }
    }

    fn take_output(&self) -> Vec<u8> {
        std::mem::take(&mut self.shared.state.lock().unattributed)
    }
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        if *self.stopped.get_mut() {
            return;
        }
        self.shared.die(Dead::Stopped);
        self.kill();
        // Dropping the Child kills slirp4netns (kill_on_drop); tokio reaps it.
        drop(self.slirp.lock().take());
        let cgroup = self.shared.cgroup.clone();
        let exited = self.exited.clone();
        let pidfd = self.pidfd.try_clone().ok();
        let on_exit = self.on_exit.lock().take();
        let _ = std::thread::Builder::new()
            .name("skiff-sandbox-cleanup".into())
            .spawn(move || {
                for _ in 0..400 {
                    if exited.borrow().is_some() {
                        break;
                    }
                    match &pidfd {
                        Some(fd) if reap(fd.as_raw_fd(), true).is_none() => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        _ => break,
                    }
                }
                if let Some(f) = on_exit {
                    f();
                }
                cgroup.remove_blocking(Duration::from_secs(2));
            });
    }
}
