//! The agent's async part: frame writer, PID-1 reaper, signal forwarding, and dispatch of host
//! frames to the execution mode. Everything runs on one thread (current-thread runtime plus a
//! `LocalSet`), so shared state is `Rc<RefCell<_>>`.

use crate::frames::encode;
use crate::{command, http, rapi};
use serde::Serialize;
use skiff_core::protocol::{AgentConfig, ConnHeader, ExecMode, Frame, Invoke, Kind};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

/// Messages for the single writer of the host channel.
pub(crate) enum OutMsg {
    Frame(Vec<u8>),
    /// Flush everything queued before, then exit the agent (and with it the sandbox).
    Exit(i32),
}

/// Handle for sending frames to the host; order is preserved.
#[derive(Clone)]
pub(crate) struct Out(mpsc::UnboundedSender<OutMsg>);

impl Out {
    pub(crate) fn raw(&self, kind: Kind, header: &[u8], body: &[u8]) {
        let _ = self.0.send(OutMsg::Frame(encode(kind, header, body)));
    }

    pub(crate) fn json<H: Serialize>(&self, kind: Kind, header: &H, body: &[u8]) {
        let h = serde_json::to_vec(header).unwrap_or_else(|_| b"{}".to_vec());
        self.raw(kind, &h, body);
    }

    /// Sends function output, tagged with the invocation it belongs to.
    pub(crate) fn log(&self, id: Option<&str>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match id {
            Some(id) => {
                let mut h = Vec::with_capacity(id.len() + 10);
                h.extend_from_slice(b"{\"id\":");
                let _ = serde_json::to_writer(&mut h, id);
                h.push(b'}');
                self.raw(Kind::Log, &h, data);
            }
            None => self.raw(Kind::Log, b"{}", data),
        }
    }

    pub(crate) fn exit(&self, code: i32) {
        let _ = self.0.send(OutMsg::Exit(code));
    }
}

/// State shared by the whole agent.
pub(crate) struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) out: Out,
    /// Our own children (workers, commands) by pid, waiting for their wait status.
    children: RefCell<HashMap<i32, oneshot::Sender<i32>>>,
    /// Invocations received and not yet answered.
    in_flight: Cell<usize>,
    /// SIGTERM/SIGINT received: children exiting is expected.
    pub(crate) terminating: Cell<bool>,
}

impl Agent {
    pub(crate) fn started(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    /// An invocation was answered; wipes /tmp when nothing else is in flight.
    pub(crate) fn finished(&self) {
        let n = self.in_flight.get().saturating_sub(1);
        self.in_flight.set(n);
        if n == 0 && self.cfg.wipe_tmp {
            wipe_tmp();
        }
    }

    /// Spawns a function process and registers it with the reaper. The child runs in its own
    /// session, with OOM score 0 and default signal handling.
    pub(crate) fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<i32>)> {
        // SAFETY: child_setup only makes async-signal-safe calls.
        unsafe { cmd.pre_exec(child_setup) };
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        // No await between spawn and insert: the reaper cannot have run yet.
        self.children.borrow_mut().insert(child.id() as i32, tx);
        Ok((child, rx))
    }
}

/// Set when the agent could not lower its own OOM score (no CAP_SYS_RESOURCE): function
/// processes then raise theirs so the OOM killer still prefers them.
pub(crate) static CHILD_OOM_SCORE_ADJ_RAISED: AtomicBool = AtomicBool::new(false);

/// Runs in the forked child before exec.
fn child_setup() -> io::Result<()> {
    let adj: &[u8] = if CHILD_OOM_SCORE_ADJ_RAISED.load(Ordering::Relaxed) {
        b"500"
    } else {
        b"0"
    };
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        libc::setsid();
        // Non-dumpable processes cannot write their own /proc files; exec resets it anyway.
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, adj.as_ptr().cast(), adj.len());
            libc::close(fd);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
    Ok(())
}

/// Removes everything inside /tmp (not /tmp itself).
fn wipe_tmp() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let _ = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

/// Decodes a wait status into (exit code, signal).
pub(crate) fn decode_status(st: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(st) {
        (Some(libc::WEXITSTATUS(st)), None)
    } else if libc::WIFSIGNALED(st) {
        (None, Some(libc::WTERMSIG(st)))
    } else {
        (None, None)
    }
}

/// How invocations are executed.
pub(crate) trait Mode {
    fn invoke(&self, inv: Invoke, payload: Vec<u8>);
    /// Gets ready for a snapshot ([`Kind::Quiesce`]): no TCP socket of the sandbox may be
    /// watched by anyone (gVisor refuses to save such sockets). Default: nothing to do.
    fn quiesce(
        self: Rc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>> {
        Box::pin(async { Ok(()) })
    }
    /// Undoes [`Mode::quiesce`] ([`Kind::Resume`]).
    fn resume(self: Rc<Self>) {}
    /// A tunnelled connection frame (`Conn*`); only `http` mode serves them.
    fn conn(&self, out: &Out, f: Frame) {
        if f.kind == Kind::ConnOpen {
            if let Ok(mut h) = f.header::<ConnHeader>() {
                h.reset = true;
                out.json(
                    Kind::ConnClose,
                    &h,
                    b"the function does not run an HTTP server",
                );
            }
        }
    }
}

/// Starts the async runtime and serves until the host goes away. Returns the exit code.
pub(crate) fn run(cfg: AgentConfig, chan: File, early: Vec<Frame>) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiff-agent: runtime: {e}");
            return 1;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(cfg, chan, early))
}

/// Where host frames come from.
enum Incoming {
    /// Read on the event loop.
    Async(BufReader<tokio::net::unix::OwnedReadHalf>),
    /// Read by a thread with blocking reads (see [`serve`]).
    Thread(mpsc::UnboundedReceiver<Frame>),
}

impl Incoming {
    async fn next(&mut self) -> Option<Frame> {
        match self {
            Incoming::Async(rd) => skiff_core::protocol::read_frame(rd).await.ok().flatten(),
            Incoming::Thread(rx) => rx.recv().await,
        }
    }
}

async fn serve(cfg: AgentConfig, chan: File, early: Vec<Frame>) -> i32 {
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = if cfg.blocking_channel {
        match channel_threads(chan, rx) {
            Ok(frames) => Incoming::Thread(frames),
            Err(e) => {
                eprintln!("skiff-agent: channel: {e}");
                return 1;
            }
        }
    } else {
        let chan = UnixStream::from(std::os::fd::OwnedFd::from(chan));
        let stream = match chan
            .set_nonblocking(true)
            .and_then(|_| tokio::net::UnixStream::from_std(chan))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skiff-agent: channel: {e}");
                return 1;
            }
        };
        let (rd, wr) = stream.into_split();
        tokio::task::spawn_local(writer(wr, rx));
        Incoming::Async(BufReader::with_capacity(64 * 1024, rd))
    };
    let out = Out(tx);

    // Register for SIGCHLD before the first child exists.
    let sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skiff-agent: SIGCHLD: {e}");
            return 1;
        }
    };
    let agent = Rc::new(Agent {
        cfg,
        out: out.clone(),
        children: RefCell::new(HashMap::new()),
        in_flight: Cell::new(0),
        terminating: Cell::new(false),
    });
    tokio::task::spawn_local(reaper(agent.clone(), sigchld));
    tokio::task::spawn_local(forward_termination(agent.clone()));

    let started = match agent.cfg.exec_mode {
        ExecMode::RuntimeApi => rapi::start(agent.clone()),
        ExecMode::Http => http::start(agent.clone()),
        ExecMode::Command => {
            // Nothing to initialise: each invocation starts its own process.
            out.raw(Kind::Initialized, b"{}", &[]);
            Ok(Rc::new(command::Cmd::new(agent.clone())) as Rc<dyn Mode>)
        }
    };
    let mode: Rc<dyn Mode> = match started {
        Ok(m) => m,
        Err(msg) => {
            eprintln!("skiff-agent: {msg}");
            out.raw(Kind::SetupFailed, b"{}", msg.as_bytes());
            out.exit(1);
            return pending().await;
        }
    };
    for f in early {
        dispatch(&mode, &out, f);
    }
    let mut incoming = incoming;
    loop {
        match incoming.next().await {
            Some(f) => {
                if !dispatch(&mode, &out, f) {
                    break;
                }
            }
            None => {
                out.exit(0);
                break;
            }
        }
    }
    pending().await
}

/// Starts a reader and a writer thread for the channel (blocking I/O).
fn channel_threads(
    chan: File,
    out: mpsc::UnboundedReceiver<OutMsg>,
) -> io::Result<mpsc::UnboundedReceiver<Frame>> {
    let mut rd = chan.try_clone()?;
    let mut wr = chan;
    let (tx, frames) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("chan-read".into())
        .spawn(move || {
            while let Ok(Some(f)) = crate::frames::read_blocking(&mut rd) {
                if tx.send(f).is_err() {
                    return;
                }
            }
        })?;
    std::thread::Builder::new()
        .name("chan-write".into())
        .spawn(move || {
            let mut out = out;
            while let Some(msg) = out.blocking_recv() {
                match msg {
                    OutMsg::Frame(bytes) => {
                        if crate::frames::write_blocking(&mut wr, &bytes).is_err() {
                            // SAFETY: process exit; the host is gone.
                            unsafe { libc::_exit(0) };
                        }
                    }
                    // SAFETY: process exit; as PID 1 this takes the whole sandbox down.
                    OutMsg::Exit(code) => unsafe { libc::_exit(code) },
                }
            }
        })?;
    Ok(frames)
}

/// Waits forever (the writer task exits the process).
async fn pending() -> i32 {
    std::future::pending::<()>().await;
    0
}

/// Handles one host frame; false when the agent should stop reading.
fn dispatch(mode: &Rc<dyn Mode>, out: &Out, f: Frame) -> bool {
    match f.kind {
        Kind::Quiesce => {
            let (mode, out) = (mode.clone(), out.clone());
            tokio::task::spawn_local(async move {
                let msg = match mode.quiesce().await {
                    Ok(()) => String::new(),
                    Err(e) => e,
                };
                out.raw(Kind::Quiesced, b"{}", msg.as_bytes());
            });
        }
        Kind::Resume => {
            if !f.body.is_empty() {
                crate::vm::resume(&f.body);
            }
            mode.clone().resume()
        }
        Kind::Invoke => match f.header::<Invoke>() {
            Ok(inv) => mode.invoke(inv, f.body),
            Err(e) => eprintln!("skiff-agent: bad invoke header: {e}"),
        },
        Kind::Shutdown => {
            out.exit(0);
            return false;
        }
        Kind::ConnOpen | Kind::ConnData | Kind::ConnAck | Kind::ConnClose => mode.conn(out, f),
        _ => {}
    }
    true
}

async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<OutMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            OutMsg::Frame(bytes) => {
                if wr.write_all(&bytes).await.is_err() {
                    // The host is gone: nothing left to do.
                    // SAFETY: process exit.
                    unsafe { libc::_exit(0) };
                }
            }
            OutMsg::Exit(code) => {
                let _ = wr.flush().await;
                // SAFETY: process exit; as PID 1 this takes the whole sandbox down.
                unsafe { libc::_exit(code) };
            }
        }
    }
}

/// PID 1 duty: reap every child; hand our own children's statuses to their waiters.
async fn reaper(agent: Rc<Agent>, mut sigchld: tokio::signal::unix::Signal) {
    let oom = agent.cfg.vm.then(crate::vm::OomWatch::new);
    loop {
        loop {
            let mut st = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let waiter = agent.children.borrow_mut().remove(&pid);
            if let Some(tx) = waiter {
                // Our child led its own session: whatever it left running in its process
                // group dies with it. Done right here, before anything else can run, so the
                // group id cannot have been reused.
                // SAFETY: signalling a process group we created.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                // In a microVM the guest kernel's OOM killer is the memory limit; the host
                // hears of it before the death it caused.
                if libc::WIFSIGNALED(st) && oom.as_ref().is_some_and(|o| o.fired()) {
                    agent.out.raw(Kind::OomKill, b"{}", &[]);
                }
                let _ = tx.send(st);
            }
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// SIGTERM/SIGINT: forward to every child's process group, exit once they are gone.
async fn forward_termination(agent: Rc<Agent>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    agent.terminating.set(true);
    let pids: Vec<i32> = agent.children.borrow().keys().copied().collect();
    for pid in pids {
        // SAFETY: signalling our own children's process groups.
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
        }
    }
    for _ in 0..60 {
        if agent.children.borrow().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.out.exit(0);
}
