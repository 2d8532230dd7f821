//! `command` mode: one process per invocation. Payload on stdin, response on stdout, stderr
//! streamed as logs. Up to `workers` run at once; the rest queue.

use crate::serve::{decode_status, Agent, Mode};
use skiff_core::protocol::{Done, Invoke, Kind};
use skiff_core::MAX_PAYLOAD_BYTES;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

const LOG_CHUNK: usize = 64 * 1024;
/// How much of stderr is kept for the error's stack trace.
const STDERR_TAIL: usize = 4096;
/// Longest the agent reads a finished command's remaining output (until EOF).
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The command runner.
pub(crate) struct Cmd {
    agent: Rc<Agent>,
    running: Cell<u32>,
    queue: RefCell<VecDeque<(Invoke, Vec<u8>)>>,
}

impl Cmd {
    pub(crate) fn new(agent: Rc<Agent>) -> Rc<Cmd> {
        Rc::new(Cmd {
            agent,
            running: Cell::new(0),
            queue: RefCell::new(VecDeque::new()),
        })
    }
}

/// `Rc<Cmd>` is what the agent holds; the runner tasks need their own handle.
impl Mode for Rc<Cmd> {
    fn invoke(&self, inv: Invoke, payload: Vec<u8>) {
        self.agent.started();
        if self.running.get() < self.agent.cfg.workers.max(1) {
            self.running.set(self.running.get() + 1);
            tokio::task::spawn_local(self.clone().runner(inv, payload));
        } else {
            self.queue.borrow_mut().push_back((inv, payload));
        }
    }
}

impl Cmd {
    async fn runner(self: Rc<Self>, mut inv: Invoke, mut payload: Vec<u8>) {
        loop {
            self.run_one(&inv.id, payload).await;
            self.agent.finished();
            let next = self.queue.borrow_mut().pop_front();
            match next {
                Some((i, p)) => {
                    inv = i;
                    payload = p;
                }
                None => break,
            }
        }
        self.running.set(self.running.get() - 1);
    }

    fn done(&self, id: &str, error_type: Option<&str>, body: &[u8]) {
        let h = Done {
            id: id.to_string(),
            error_type: error_type.map(str::to_string),
        };
        self.agent.out.json(Kind::Done, &h, body);
    }

    fn fail(&self, id: &str, ty: &str, msg: &str, stack: Vec<String>) {
        let body = serde_json::json!({"errorMessage": msg, "errorType": ty, "stackTrace": stack});
        self.done(id, Some(ty), body.to_string().as_bytes());
    }

    async fn run_one(&self, id: &str, payload: Vec<u8>) {
        let cfg = &self.agent.cfg;
        let Some(argv0) = cfg.argv.first() else {
            return self.fail(
                id,
                "Runtime.InvalidEntrypoint",
                "no program to run (empty argv)",
                Vec::new(),
            );
        };
        let mut cmd = Command::new(argv0);
        cmd.args(&cfg.argv[1..])
            .env_clear()
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cfg.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, mut exit) = match self.agent.spawn(&mut cmd) {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("cannot run {argv0}: {e}");
                return self.fail(id, "Runtime.InvalidEntrypoint", &msg, Vec::new());
            }
        };
        drop(cmd);
        let pid = child.id() as i32;
        let conv = |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
        let stdout = conv(child.stdout.take().map(OwnedFd::from));
        let stderr = conv(child.stderr.take().map(OwnedFd::from));
        let stdin = child.stdin.take().map(OwnedFd::from);
        drop(child);
        let (Some(mut stdout), Some(mut stderr)) = (stdout, stderr) else {
            // SAFETY: killing our own child's group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            return self.fail(
                id,
                "Runtime.ExitError",
                "cannot set up the command's pipes",
                Vec::new(),
            );
        };
        let feeder = stdin.and_then(|fd| feed(fd, payload));

        let mut out = Vec::new();
        let mut too_large = false;
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; LOG_CHUNK];
        let (mut out_open, mut err_open) = (true, true);
        let status = loop {
            tokio::select! {
                r = stdout.read_buf(&mut out), if out_open && !too_large => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(_) => if out.len() > MAX_PAYLOAD_BYTES {
                        too_large = true;
                        // SAFETY: killing our own child's process group.
                        unsafe { libc::kill(-pid, libc::SIGKILL) };
                    },
                },
                r = stderr.read(&mut buf), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => self.stderr_chunk(id, &buf[..n], &mut tail),
                },
                st = &mut exit => break st.unwrap_or(0),
            }
        };
        // Background processes the command left behind were killed by the reaper.
        if let Some(f) = feeder {
            f.abort();
        }
        // Output written before the exit but not read yet: read to EOF. `try_read` is not
        // enough: it answers WouldBlock until the event loop has seen the pipe readable, which
        // may come after the exit (seen under emulation: the reply came back empty). The
        // command's process group is dead, so EOF follows at once; the bound is a safeguard
        // against a descendant that escaped its group and holds the pipe open.
        let drain = async {
            while out_open && !too_large {
                match stdout.read_buf(&mut out).await {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(_) if out.len() > MAX_PAYLOAD_BYTES => too_large = true,
                    Ok(_) => {}
                }
            }
            while err_open {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => self.stderr_chunk(id, &buf[..n], &mut tail),
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_WITHIN, drain).await;

        if too_large {
            let msg = format!("Response payload size exceeded maximum allowed payload size ({MAX_PAYLOAD_BYTES} bytes).");
            return self.fail(id, "Function.ResponseSizeTooLarge", &msg, Vec::new());
        }
        let status = decode_status(status);
        if status != (Some(0), None) && !out.is_empty() {
            // A failed command's stdout is not a reply; keep it as logs rather than lose it.
            self.agent.out.log(Some(id), &out);
        }
        match status {
            (Some(0), _) => self.done(id, None, &out),
            (Some(code), _) => {
                let msg = format!("Command exited with non-zero status: {code}");
                self.fail(id, "Runtime.ExitError", &msg, stack(&tail));
            }
            (None, Some(sig)) => {
                let msg = format!("Command was killed by signal {sig}");
                self.fail(id, "Runtime.ExitError", &msg, stack(&tail));
            }
            (None, None) => self.fail(
                id,
                "Runtime.ExitError",
                "Command ended abnormally",
                stack(&tail),
            ),
        }
    }

    fn stderr_chunk(&self, id: &str, data: &[u8], tail: &mut Vec<u8>) {
        self.agent.out.log(Some(id), data);
        tail.extend_from_slice(data);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
}

/// The last few lines of stderr, for the error's `stackTrace`.
fn stack(tail: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(tail);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(10);
    lines[from..].iter().map(|l| l.to_string()).collect()
}

/// Writes the payload to the command's stdin on the event loop; if the pipe cannot be
/// registered with it (seen under gVisor with several commands at once), with blocking writes
/// on a thread of its own, so the payload is never lost.
fn feed(fd: OwnedFd, payload: Vec<u8>) -> Option<tokio::task::JoinHandle<()>> {
    let raw = match fd.try_clone() {
        Ok(dup) => dup,
        Err(e) => {
            eprintln!("skiff-agent: command stdin: {e}");
            return None;
        }
    };
    match pipe::Sender::from_owned_fd(fd) {
        Ok(mut s) => Some(tokio::task::spawn_local(async move {
            let _ = s.write_all(&payload).await;
        })),
        Err(e) => {
            eprintln!(
                "skiff-agent: command stdin on the event loop: {e}; writing it from a thread"
            );
            let _ = std::thread::Builder::new()
                .name("stdin-feed".into())
                .spawn(move || {
                    use std::io::Write;
                    // Blocking writes: the event loop may have left the pipe non-blocking.
                    // SAFETY: fcntl on our own fd.
                    unsafe {
                        let fl = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&raw), libc::F_GETFL);
                        libc::fcntl(
                            std::os::fd::AsRawFd::as_raw_fd(&raw),
                            libc::F_SETFL,
                            fl & !libc::O_NONBLOCK,
                        );
                    }
                    let _ = std::fs::File::from(raw).write_all(&payload);
                });
            None
        }
    }
}
