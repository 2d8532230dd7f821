//! Agent side of HTTP connections tunnelled over the channel (`http` mode on tiers whose
//! network the host cannot enter; protocol at [`skiff_core::protocol::ConnHeader`]): for each
//! [`Kind::ConnOpen`] the agent connects to the function's server on `127.0.0.1:{port}` and
//! copies bytes both ways, sending at most [`CONN_WINDOW`] unacknowledged bytes to the host.

use crate::serve::Out;
use skiff_core::protocol::{ConnHeader, Frame, Kind, CONN_CHUNK, CONN_WINDOW};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Semaphore};

/// First and longest pause before an idle connection is read directly, in case its waker
/// missed the server's data or end of stream.
const EOF_POLL_MIN: std::time::Duration = std::time::Duration::from_millis(20);
const EOF_POLL_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A non-blocking read straight from the socket; `None` when nothing is there.
fn recv_now(rd: &OwnedReadHalf, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
    use std::os::fd::AsRawFd;
    // SAFETY: reading into a valid buffer of `buf.len()` bytes from a socket we own.
    let n = unsafe {
        libc::recv(
            rd.as_ref().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Some(Ok(n as usize));
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
        _ => Some(Err(e)),
    }
}

/// What the host sent on a connection.
enum Down {
    Data(Vec<u8>),
    /// The host's side ended (half-close).
    Eof,
}

struct Conn {
    down: mpsc::UnboundedSender<Down>,
    /// Bytes we may still send to the host.
    credit: Rc<Semaphore>,
    /// Bytes the host sent that are not written to the server yet.
    unacked: Rc<Cell<usize>>,
}

/// The open tunnelled connections.
pub(crate) struct Tunnels {
    port: u16,
    out: Out,
    conns: RefCell<HashMap<u32, Conn>>,
}

/// The connection was aborted (and the host told, where it did not abort it itself).
struct Reset;

impl Tunnels {
    pub(crate) fn new(port: u16, out: Out) -> Rc<Tunnels> {
        Rc::new(Tunnels {
            port,
            out,
            conns: RefCell::new(HashMap::new()),
        })
    }

    fn send(&self, kind: Kind, conn: u32, n: u32, reset: bool, body: &[u8]) {
        self.out.json(kind, &ConnHeader { conn, n, reset }, body);
    }

    /// Handles a `Conn*` frame from the host.
    pub(crate) fn on_frame(self: &Rc<Self>, f: Frame) {
        let Ok(h) = f.header::<ConnHeader>() else {
            return;
        };
        match f.kind {
            Kind::ConnOpen => self.open(h.conn),
            Kind::ConnData => {
                let over = match self.conns.borrow().get(&h.conn) {
                    Some(c) => {
                        let n = c.unacked.get() + f.body.len();
                        c.unacked.set(n);
                        let over = n > CONN_WINDOW as usize;
                        if !over {
                            let _ = c.down.send(Down::Data(f.body));
                        }
                        over
                    }
                    None => false,
                };
                if over {
                    self.conns.borrow_mut().remove(&h.conn);
                    self.send(Kind::ConnClose, h.conn, 0, true, b"window overrun");
                }
            }
            Kind::ConnAck => {
                if let Some(c) = self.conns.borrow().get(&h.conn) {
                    let room = CONN_WINDOW as usize - c.credit.available_permits();
                    c.credit.add_permits((h.n as usize).min(room));
                }
            }
            // Forgetting the connection drops its sender: its task ends and closes the socket.
            Kind::ConnClose if h.reset => drop(self.conns.borrow_mut().remove(&h.conn)),
            Kind::ConnClose => {
                if let Some(c) = self.conns.borrow().get(&h.conn) {
                    let _ = c.down.send(Down::Eof);
                }
            }
            _ => {}
        }
    }

    /// Starts connection `id` (replacing one of the same number, which a VM restored from a
    /// snapshot may still hold).
    fn open(self: &Rc<Self>, id: u32) {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Rc::new(Semaphore::new(CONN_WINDOW as usize));
        let unacked = Rc::new(Cell::new(0));
        self.conns.borrow_mut().insert(
            id,
            Conn {
                down: tx,
                credit: credit.clone(),
                unacked: unacked.clone(),
            },
        );
        tokio::task::spawn_local(self.clone().run(id, rx, credit, unacked));
    }

    async fn run(
        self: Rc<Self>,
        id: u32,
        rx: mpsc::UnboundedReceiver<Down>,
        credit: Rc<Semaphore>,
        unacked: Rc<Cell<usize>>,
    ) {
        match tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
            Ok(sock) => {
                let _ = sock.set_nodelay(true);
                let (rd, wr) = sock.into_split();
                let up = std::pin::pin!(self.up(id, rd, &credit));
                let down = std::pin::pin!(self.down(id, wr, rx, &unacked));
                let (mut up, mut down) = (up, down);
                let (mut up_done, mut down_done) = (false, false);
                // Until both directions ended, or either was reset (dropping the socket).
                while !(up_done && down_done) {
                    tokio::select! {
                        r = &mut up, if !up_done => {
                            up_done = true;
                            if r.is_err() { break }
                        }
                        r = &mut down, if !down_done => {
                            down_done = true;
                            if r.is_err() { break }
                        }
                    }
                }
            }
            Err(e) => {
                let msg = format!("cannot connect to 127.0.0.1:{}: {e}", self.port);
                self.send(Kind::ConnClose, id, 0, true, msg.as_bytes());
            }
        }
        let mut conns = self.conns.borrow_mut();
        if conns
            .get(&id)
            .is_some_and(|c| Rc::ptr_eq(&c.credit, &credit))
        {
            conns.remove(&id);
        }
    }

    /// Server → host.
    async fn up(&self, id: u32, mut rd: OwnedReadHalf, credit: &Semaphore) -> Result<(), Reset> {
        let mut buf = vec![0u8; CONN_CHUNK];
        let mut idle = EOF_POLL_MIN;
        loop {
            let read = tokio::select! {
                r = rd.read(&mut buf) => r,
                // gVisor's netstack may not wake an edge-triggered waiter for a FIN that
                // follows the last data: while idle, read directly now and then (backing off).
                () = tokio::time::sleep(idle) => match recv_now(&rd, &mut buf) {
                    Some(r) => r,
                    None => {
                        idle = (idle * 2).min(EOF_POLL_MAX);
                        continue;
                    }
                },
            };
            idle = EOF_POLL_MIN;
            match read {
                Ok(0) => {
                    self.send(Kind::ConnClose, id, 0, false, &[]);
                    return Ok(());
                }
                Ok(n) => {
                    match credit.acquire_many(n as u32).await {
                        Ok(p) => p.forget(),
                        Err(_) => return Err(Reset),
                    }
                    self.send(Kind::ConnData, id, 0, false, &buf[..n]);
                }
                Err(e) => {
                    self.send(Kind::ConnClose, id, 0, true, e.to_string().as_bytes());
                    return Err(Reset);
                }
            }
        }
    }

    /// Host → server.
    async fn down(
        &self,
        id: u32,
        mut wr: OwnedWriteHalf,
        mut rx: mpsc::UnboundedReceiver<Down>,
        unacked: &Cell<usize>,
    ) -> Result<(), Reset> {
        loop {
            match rx.recv().await {
                Some(Down::Data(b)) => {
                    if let Err(e) = wr.write_all(&b).await {
                        self.send(Kind::ConnClose, id, 0, true, e.to_string().as_bytes());
                        return Err(Reset);
                    }
                    unacked.set(unacked.get().saturating_sub(b.len()));
                    self.send(Kind::ConnAck, id, b.len() as u32, false, &[]);
                }
                Some(Down::Eof) => {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                // The host reset the connection and forgot it.
                None => return Err(Reset),
            }
        }
    }
}
