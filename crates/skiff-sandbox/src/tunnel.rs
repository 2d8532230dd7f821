//! Host side of HTTP connections carried over the agent channel (`http` mode on gVisor and
//! microVMs, whose network the host cannot enter; the protocol is at
//! [`skiff_core::protocol::ConnHeader`]). Each connection is one end of an in-memory duplex
//! handed to the gateway as an [`HttpConn`], and two tasks copying between the other end
//! and `Conn*` frames, within [`CONN_WINDOW`] bytes in flight each way.

use parking_lot::Mutex;
use skiff_core::protocol::{encode_parts, ConnHeader, Frame, Kind, CONN_CHUNK, CONN_WINDOW};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, Semaphore};

/// A connection to an `http` function's server: direct TCP into the sandbox's network
/// namespace (native), or tunnelled over the agent channel.
pub enum HttpConn {
    Tcp(tokio::net::TcpStream),
    Tunnel(DuplexStream),
}

impl AsyncRead for HttpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpConn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            HttpConn::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpConn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            HttpConn::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpConn::Tcp(s) => Pin::new(s).poll_flush(cx),
            HttpConn::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpConn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            HttpConn::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the agent sent on a connection.
enum Down {
    Data(Vec<u8>),
    /// The server's side ended (half-close).
    Eof,
    /// Aborted.
    Reset,
}

/// One open connection, as the channel reader sees it.
struct ConnEnd {
    down: mpsc::UnboundedSender<Down>,
    /// Bytes we may still send to the agent.
    credit: Arc<Semaphore>,
    /// Bytes the agent sent that the gateway has not taken yet: an agent that ignores the
    /// window gets the connection reset rather than host memory.
    unacked: Arc<AtomicUsize>,
}

/// The tunnelled connections of one instance.
pub(crate) struct Tunnels {
    next: AtomicU32,
    conns: Mutex<HashMap<u32, ConnEnd>>,
    /// Frames to the agent.
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

fn frame(kind: Kind, h: ConnHeader, body: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(&h).expect("header serializes");
    encode_parts(kind, &h, body)
}

fn header(conn: u32) -> ConnHeader {
    ConnHeader {
        conn,
        n: 0,
        reset: false,
    }
}

impl Tunnels {
    pub(crate) fn new(tx: mpsc::UnboundedSender<Vec<u8>>) -> Tunnels {
        Tunnels {
            next: AtomicU32::new(1),
            conns: Mutex::new(HashMap::new()),
            tx,
        }
    }

    /// Opens a connection to the server; bytes written before the agent has connected wait
    /// in the agent.
    pub(crate) fn open(self: &Arc<Self>) -> HttpConn {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (ours, theirs) = tokio::io::duplex(CONN_CHUNK);
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(CONN_WINDOW as usize));
        // Copy tasks still running; the last one to end forgets the connection.
        let halves = Arc::new(AtomicU8::new(2));
        let unacked = Arc::new(AtomicUsize::new(0));
        self.conns.lock().insert(
            conn,
            ConnEnd {
                down: down_tx,
                credit: credit.clone(),
                unacked: unacked.clone(),
            },
        );
        let _ = self.tx.send(frame(Kind::ConnOpen, header(conn), &[]));
        let (rd, wr) = tokio::io::split(ours);
        tokio::spawn(self.clone().up(conn, rd, credit, halves.clone()));
        tokio::spawn(self.clone().down(conn, wr, down_rx, unacked, halves));
        HttpConn::Tunnel(theirs)
    }

    /// Gateway → agent.
    async fn up(
        self: Arc<Self>,
        conn: u32,
        mut rd: tokio::io::ReadHalf<DuplexStream>,
        credit: Arc<Semaphore>,
        halves: Arc<AtomicU8>,
    ) {
        let mut buf = vec![0u8; CONN_CHUNK];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = self.tx.send(frame(Kind::ConnClose, header(conn), &[]));
                    break;
                }
                Ok(n) => n,
                Err(_) => {
                    self.reset(conn);
                    break;
                }
            };
            match credit.acquire_many(n as u32).await {
                Ok(p) => p.forget(),
                Err(_) => break, // reset by the agent
            }
            let _ = self.tx.send(frame(Kind::ConnData, header(conn), &buf[..n]));
        }
        self.half_done(conn, &halves);
    }

    /// Agent → gateway.
    async fn down(
        self: Arc<Self>,
        conn: u32,
        mut wr: tokio::io::WriteHalf<DuplexStream>,
        mut rx: mpsc::UnboundedReceiver<Down>,
        unacked: Arc<AtomicUsize>,
        halves: Arc<AtomicU8>,
    ) {
        while let Some(d) = rx.recv().await {
            match d {
                Down::Data(b) => {
                    if wr.write_all(&b).await.is_err() {
                        // The gateway dropped the connection.
                        self.reset(conn);
                        break;
                    }
                    unacked.fetch_sub(b.len(), Ordering::AcqRel);
                    let ack = ConnHeader {
                        conn,
                        n: b.len() as u32,
                        reset: false,
                    };
                    let _ = self.tx.send(frame(Kind::ConnAck, ack, &[]));
                }
                Down::Eof => {
                    let _ = wr.shutdown().await;
                    break;
                }
                Down::Reset => break,
            }
        }
        // Ends the gateway's reads (EOF) even while `up` still holds the read half.
        let _ = wr.shutdown().await;
        self.half_done(conn, &halves);
    }

    fn half_done(&self, conn: u32, halves: &AtomicU8) {
        if halves.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conns.lock().remove(&conn);
        }
    }

    /// Aborts `conn` on both sides.
    fn reset(&self, conn: u32) {
        let h = ConnHeader {
            conn,
            n: 0,
            reset: true,
        };
        let _ = self.tx.send(frame(Kind::ConnClose, h, &[]));
        self.abort_local(conn);
    }

    fn abort_local(&self, conn: u32) {
        if let Some(c) = self.conns.lock().get(&conn) {
            let _ = c.down.send(Down::Reset);
            c.credit.close();
        }
    }

    /// Handles a `Conn*` frame from the agent.
    pub(crate) fn on_frame(&self, f: Frame) {
        let Ok(h) = f.header::<ConnHeader>() else {
            return;
        };
        match f.kind {
            Kind::ConnData => {
                let over = match self.conns.lock().get(&h.conn) {
                    Some(c) => {
                        let n = c.unacked.fetch_add(f.body.len(), Ordering::AcqRel);
                        let over = n + f.body.len() > CONN_WINDOW as usize;
                        if !over {
                            let _ = c.down.send(Down::Data(f.body));
                        }
                        over
                    }
                    None => false,
                };
                if over {
                    tracing::warn!(
                        conn = h.conn,
                        "agent overran a tunnelled connection's window"
                    );
                    self.reset(h.conn);
                }
            }
            Kind::ConnAck => {
                if let Some(c) = self.conns.lock().get(&h.conn) {
                    // Never more than the window, whatever the agent claims.
                    let room = CONN_WINDOW as usize - c.credit.available_permits();
                    c.credit.add_permits((h.n as usize).min(room));
                }
            }
            Kind::ConnClose if h.reset => {
                if !f.body.is_empty() {
                    tracing::debug!(
                        conn = h.conn,
                        "tunnelled connection reset by the agent: {}",
                        String::from_utf8_lossy(&f.body)
                    );
                }
                self.abort_local(h.conn);
            }
            Kind::ConnClose => {
                if let Some(c) = self.conns.lock().get(&h.conn) {
                    let _ = c.down.send(Down::Eof);
                }
            }
            _ => {}
        }
    }

    /// The instance died: every connection ends.
    pub(crate) fn close_all(&self) {
        for c in self.conns.lock().values() {
            let _ = c.down.send(Down::Reset);
            c.credit.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the agent: decodes the frames the host side sends.
    fn decode(bytes: &[u8]) -> Frame {
        let n = Frame::rest_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, bytes.len() - 4);
        Frame::decode_rest(bytes[4..].to_vec()).unwrap()
    }

    fn agent_frame(kind: Kind, h: ConnHeader, body: &[u8]) -> Frame {
        decode(&frame(kind, h, body))
    }

    #[test]
    fn frames_carry_header_and_body() {
        let f = decode(&frame(Kind::ConnData, header(9), b"hello"));
        assert_eq!(f.kind, Kind::ConnData);
        assert_eq!(f.header::<ConnHeader>().unwrap().conn, 9);
        assert_eq!(f.body, b"hello");
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_within_the_window_and_close_cleanly() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Arc::new(Tunnels::new(tx));
        let mut conn = t.open();
        let open = decode(&rx.recv().await.unwrap());
        assert_eq!(open.kind, Kind::ConnOpen);
        let id = open.header::<ConnHeader>().unwrap().conn;

        // Gateway → agent: more than the window; the host stops at the window until acked.
        let big = vec![7u8; CONN_WINDOW as usize + 3 * CONN_CHUNK];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                conn.write_all(&big).await.unwrap();
                conn.shutdown().await.unwrap();
                conn
            })
        };
        let mut got = Vec::new();
        let mut granted = CONN_WINDOW as usize;
        let mut closed = false;
        while !closed {
            let f = match tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv())
                .await
            {
                Ok(f) => decode(&f.unwrap()),
                Err(_) => {
                    // Stalled: never more than granted.
                    assert!(got.len() <= granted, "sent past the window");
                    assert!(
                        got.len() + CONN_CHUNK > granted,
                        "stalled inside the window"
                    );
                    granted += CONN_WINDOW as usize;
                    t.on_frame(agent_frame(
                        Kind::ConnAck,
                        ConnHeader {
                            conn: id,
                            n: CONN_WINDOW,
                            reset: false,
                        },
                        &[],
                    ));
                    continue;
                }
            };
            match f.kind {
                Kind::ConnData => got.extend_from_slice(&f.body),
                Kind::ConnClose => closed = true,
                k => panic!("unexpected {k:?}"),
            }
            assert!(got.len() <= granted, "sent past the window");
        }
        assert_eq!(got, big);
        let mut conn = writer.await.unwrap();

        // Agent → gateway, then the agent's EOF.
        t.on_frame(agent_frame(
            Kind::ConnData,
            header(id),
            b"HTTP/1.1 200 OK\r\n",
        ));
        t.on_frame(agent_frame(Kind::ConnClose, header(id), &[]));
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"HTTP/1.1 200 OK\r\n");
        let ack = decode(&rx.recv().await.unwrap());
        assert_eq!(ack.kind, Kind::ConnAck);
        assert_eq!(ack.header::<ConnHeader>().unwrap().n, 17);
        // Both directions ended: the connection is forgotten.
        for _ in 0..100 {
            if t.conns.lock().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(t.conns.lock().is_empty());
    }

    #[tokio::test]
    async fn a_reset_or_a_dead_instance_ends_the_connection() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Arc::new(Tunnels::new(tx));
        let mut a = t.open();
        let ida = decode(&rx.recv().await.unwrap())
            .header::<ConnHeader>()
            .unwrap()
            .conn;
        let mut b = t.open();
        let _ = rx.recv().await.unwrap();
        t.on_frame(agent_frame(
            Kind::ConnClose,
            ConnHeader {
                conn: ida,
                n: 0,
                reset: true,
            },
            b"connection refused",
        ));
        let mut buf = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), a.read_to_end(&mut buf))
            .await
            .expect("reset ends the gateway's reads");
        assert_eq!(n.unwrap_or(0), 0);
        t.close_all();
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), b.read_to_end(&mut buf))
            .await
            .expect("a dead instance ends the gateway's reads");
        assert_eq!(n.unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn an_agent_overrunning_the_window_gets_a_reset() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Arc::new(Tunnels::new(tx));
        let _c = t.open(); // nobody reads: nothing is acked
        let id = decode(&rx.recv().await.unwrap())
            .header::<ConnHeader>()
            .unwrap()
            .conn;
        let chunk = vec![0u8; CONN_CHUNK];
        for _ in 0..(CONN_WINDOW as usize / CONN_CHUNK + 2) {
            t.on_frame(agent_frame(Kind::ConnData, header(id), &chunk));
        }
        let mut reset = false;
        while let Ok(Some(f)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await
        {
            let f = decode(&f);
            reset |= f.kind == Kind::ConnClose && f.header::<ConnHeader>().unwrap().reset;
        }
        assert!(reset);
    }

    #[tokio::test]
    async fn the_gateway_dropping_a_connection_resets_it_at_the_agent() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Arc::new(Tunnels::new(tx));
        let c = t.open();
        let id = decode(&rx.recv().await.unwrap())
            .header::<ConnHeader>()
            .unwrap()
            .conn;
        drop(c);
        // The agent still sends: the host cannot deliver it and resets.
        t.on_frame(agent_frame(Kind::ConnData, header(id), b"late"));
        let mut kinds = Vec::new();
        while let Ok(Some(f)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await
        {
            let f = decode(&f);
            kinds.push((f.kind, f.header::<ConnHeader>().unwrap().reset));
        }
        assert!(kinds.contains(&(Kind::ConnClose, true)), "{kinds:?}");
    }
}
