//! The framed channel between the host and the agent (PID 1 inside a process sandbox).
//!
//! Wire format of one frame: `u32 LE length-of-rest | u8 kind | u32 LE header-length |
//! header (JSON) | body (raw bytes)`. Payloads travel in the raw body, never base64.
//! The host sends [`AgentConfig`] first, then [`Invoke`]s; the agent answers with
//! [`Done`] per invocation and streams [`Log`] chunks tagged with the invocation id. A runtime
//! that streams its response (`Lambda-Runtime-Function-Response-Mode: streaming`) is answered
//! with [`StreamStart`], any number of [`Kind::StreamChunk`]s and one [`StreamEnd`] instead of
//! a `Done`.

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (payload limit plus headroom).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → agent, first frame: [`AgentConfig`].
    Config = 1,
    /// Host → agent: [`Invoke`] header, payload body.
    Invoke = 2,
    /// Host → agent: the network is configured; start the function processes.
    NetReady = 3,
    /// Host → agent: stop everything and exit.
    Shutdown = 4,
    /// Host → agent: get ready for a snapshot (the function is idle): close every TCP socket
    /// of the agent and pause the function processes; answered by [`Kind::Quiesced`].
    Quiesce = 5,
    /// Host → agent: the snapshot is taken (or this is a copy restored from one): reopen the
    /// Runtime API and continue the function processes.
    Resume = 6,
    /// Host → agent (`http` mode): open tunnelled connection [`ConnHeader::conn`] to the
    /// function's server (see [`ConnHeader`]).
    ConnOpen = 7,
    /// Agent → host: sandbox set up ([`Ready`]).
    Ready = 10,
    /// Agent → host: [`Done`] header, response or error-JSON body.
    Done = 11,
    /// Agent → host: [`Log`] header, output bytes body.
    Log = 12,
    /// Agent → host: a function process exited unexpectedly ([`Exit`]).
    Exit = 13,
    /// Agent → host: the runtime reported an init error ([`InitError`]); body is error JSON.
    InitError = 14,
    /// Agent → host: the agent could not set up the sandbox; body is a message. Fatal.
    SetupFailed = 15,
    /// Agent → host: the response of invocation [`StreamStart::id`] is streamed; no body.
    StreamStart = 16,
    /// Agent → host: [`StreamChunk`] header, response bytes body.
    StreamChunk = 17,
    /// Agent → host: the stream ended ([`StreamEnd`]); body is error JSON when it failed.
    StreamEnd = 18,
    /// Agent → host (`http` mode): the function's server accepts connections ([`HttpReady`]).
    HttpReady = 19,
    /// Agent → host: the function finished initialising and is idle, waiting for its first
    /// invocation (every Runtime API worker asked for `next`, the HTTP server accepts, or at
    /// once in `command` mode). Sent once; a snapshot taken after it skips the init.
    Initialized = 20,
    /// Agent → host: answer to [`Kind::Quiesce`]; the body is an error message when the
    /// agent could not get ready (empty when it is).
    Quiesced = 21,
    /// Agent → host (microVMs): the guest kernel's OOM killer killed a process; sent before
    /// the frame that reports the death, so the host reports it as a memory error.
    OomKill = 22,
    /// Either way: bytes of tunnelled connection [`ConnHeader::conn`] (the body).
    ConnData = 23,
    /// Either way: the receiver passed [`ConnHeader::n`] bytes of the connection on, so the
    /// sender may send that many more (flow control, see [`CONN_WINDOW`]).
    ConnAck = 24,
    /// Either way: the sender sends no more bytes on the connection (its side of a TCP
    /// half-close); with [`ConnHeader::reset`] the connection is aborted in both directions,
    /// and the body may say why.
    ConnClose = 25,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Config,
            2 => Kind::Invoke,
            3 => Kind::NetReady,
            4 => Kind::Shutdown,
            5 => Kind::Quiesce,
            6 => Kind::Resume,
            7 => Kind::ConnOpen,
            10 => Kind::Ready,
            11 => Kind::Done,
            12 => Kind::Log,
            13 => Kind::Exit,
            14 => Kind::InitError,
            15 => Kind::SetupFailed,
            16 => Kind::StreamStart,
            17 => Kind::StreamChunk,
            18 => Kind::StreamEnd,
            19 => Kind::HttpReady,
            20 => Kind::Initialized,
            21 => Kind::Quiesced,
            22 => Kind::OomKill,
            23 => Kind::ConnData,
            24 => Kind::ConnAck,
            25 => Kind::ConnClose,
            _ => return None,
        })
    }
}

/// How the agent runs the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecMode {
    /// Long-running runtime process(es) polling the Lambda Runtime API served by the agent.
    RuntimeApi,
    /// One process per invocation: payload on stdin, reply on stdout, logs on stderr.
    Command,
    /// One long-running HTTP server listening on `127.0.0.1:{http_port}`; the host proxies
    /// requests to it over sockets it creates in the sandbox's network namespace.
    Http,
}

/// A bind mount into the sandbox root, read-only unless `rw`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Host path.
    pub src: String,
    /// Path inside the sandbox.
    pub dst: String,
    /// Writable (a `persistent` function's workspace).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rw: bool,
}

/// Everything the agent needs to build the sandbox and start the function.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub exec_mode: ExecMode,
    /// Program and arguments, as paths inside the sandbox.
    pub argv: Vec<String>,
    /// The function's complete environment (nothing from the host leaks in).
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (`/var/task`).
    pub cwd: String,
    /// Runtime-API worker processes (= the spec's concurrency). Worker `i` is served on
    /// `127.0.0.1:{runtime_api_port + i}`.
    pub workers: u32,
    pub runtime_api_port: u16,
    /// Unprivileged identity the function (and the agent after setup) runs as.
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// Host directory, empty, on which the agent mounts the new root (inside its own mount ns).
    pub root_dir: String,
    /// Read-only binds (host system dirs, code at /var/task, runtimes at /var/runtime).
    pub binds: Vec<Bind>,
    /// Files written into the new root's /etc (name → content), e.g. passwd, hosts, resolv.conf.
    pub etc_files: Vec<(String, String)>,
    /// Size of the writable tmpfs at /tmp, in bytes.
    pub tmp_bytes: u64,
    /// Wipe /tmp after every invocation (warm instances).
    pub wipe_tmp: bool,
    /// Wait for [`Kind::NetReady`] before starting the function (outbound networking).
    pub wait_for_network: bool,
    /// Install the seccomp filter.
    pub seccomp: bool,
    /// Host directory used as the root image instead of the host's system dirs: its entries
    /// are bound read-only into the new root (`/etc` and `/var` entry by entry, so generated
    /// files and mountpoints stay on the tmpfs).
    #[serde(default)]
    pub rootfs: Option<String>,
    /// `http` mode: the port the function's server listens on (on 127.0.0.1).
    #[serde(default)]
    pub http_port: u16,
    /// The tier already built the root filesystem, hostname and loopback (gVisor: `runsc`
    /// from an OCI bundle): the agent skips building its root, but still drops privileges.
    #[serde(default)]
    pub prebuilt_root: bool,
    /// Read and write the channel from two threads with blocking calls instead of on the
    /// event loop (gVisor: after a restore, epoll on the restored channel never wakes).
    #[serde(default)]
    pub blocking_channel: bool,
    /// The agent is the init of a microVM: the whole guest kernel is this sandbox's, so the
    /// agent reports the kernel's OOM kills ([`Kind::OomKill`]) and, on [`Kind::Resume`] with
    /// a body ([`VmResume`]), sets the clock and reseeds the RNG of a restored guest.
    #[serde(default)]
    pub vm: bool,
    /// Most processes and threads the function's uid may have (`RLIMIT_NPROC`; 0: no limit):
    /// the pids limit inside a microVM, whose guest has no pids cgroup.
    #[serde(default)]
    pub max_procs: u32,
}

/// Body of [`Kind::Resume`] for a microVM restored from a snapshot: the host's wall clock
/// (Unix nanoseconds, little-endian u64) followed by fresh random seed bytes.
pub struct VmResume;

impl VmResume {
    /// Bytes of seed that follow the clock.
    pub const SEED_LEN: usize = 32;
    /// Encodes the body.
    pub fn encode(unix_nanos: u64, seed: &[u8; Self::SEED_LEN]) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + Self::SEED_LEN);
        b.extend_from_slice(&unix_nanos.to_le_bytes());
        b.extend_from_slice(seed);
        b
    }
    /// Decodes a body written by [`VmResume::encode`].
    pub fn decode(body: &[u8]) -> Option<(u64, [u8; Self::SEED_LEN])> {
        if body.len() != 8 + Self::SEED_LEN {
            return None;
        }
        let nanos = u64::from_le_bytes(body[..8].try_into().ok()?);
        Some((nanos, body[8..].try_into().ok()?))
    }
}

/// Host → agent: run one invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invoke {
    pub id: String,
    /// Deadline as Unix epoch milliseconds.
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognito_identity: Option<String>,
}

/// Agent → host: the sandbox is built and the function processes started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// Microseconds the agent spent on setup (mounts, privileges, seccomp).
    pub setup_us: u64,
}

/// Agent → host (`http` mode): the server accepted its first connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpReady {
    /// Microseconds from starting the server process to its first accepted connection.
    pub ready_us: u64,
}

/// Bytes of one tunnelled connection either side may send before the other acknowledges
/// them ([`Kind::ConnAck`]): bounds the memory a connection holds on both sides.
pub const CONN_WINDOW: u32 = 256 * 1024;
/// Largest body of one [`Kind::ConnData`] frame.
pub const CONN_CHUNK: usize = 64 * 1024;

/// Header of the `Conn*` frames. In `http` mode on tiers whose sandbox network the host cannot
/// enter (gVisor, microVMs), each connection to the function's server is carried over the
/// channel: the host opens it ([`Kind::ConnOpen`]), the agent connects to the server inside
/// the sandbox and both sides then copy bytes ([`Kind::ConnData`]), each granting the other
/// [`CONN_WINDOW`] bytes in flight ([`Kind::ConnAck`]), until both have sent
/// [`Kind::ConnClose`] or either has reset the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnHeader {
    /// Connection number, chosen by the host.
    pub conn: u32,
    /// [`Kind::ConnAck`]: bytes passed on.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n: u32,
    /// [`Kind::ConnClose`]: abort rather than end the sender's direction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Agent → host: an invocation finished. Body: the response, or an error JSON
/// `{errorMessage, errorType, stackTrace}` when `error_type` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
}

/// Agent → host: the runtime started streaming the response of an invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamStart {
    pub id: String,
    /// Content type of the streamed body (from the metadata prelude of an
    /// `application/vnd.awslambda.http-integration-response`, else the request's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Agent → host: the next bytes of a streamed response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamChunk {
    pub id: String,
}

/// Agent → host: a streamed response is complete. `error_type` is set when it ended with an
/// error (the runtime's `Lambda-Runtime-Function-Error-Type` trailer, a broken stream, or the
/// size limit); the body is then the error JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEnd {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
}

/// Agent → host: function output. `id` is the invocation it belongs to, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Log {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Agent → host: a function process died outside of a clean reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exit {
    /// The invocation it was serving, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Agent → host: `/runtime/init/error` was posted. Body: error JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
}

/// A decoded frame: kind, JSON header bytes, raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub header: Vec<u8>,
    pub body: Vec<u8>,
}

/// Protocol violations.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("bad frame header: {0}")]
    Header(#[from] serde_json::Error),
}

impl Frame {
    /// Builds a frame with a serialized header.
    pub fn new<H: Serialize>(kind: Kind, header: &H, body: Vec<u8>) -> Frame {
        Frame {
            kind,
            header: serde_json::to_vec(header).expect("header serializes"),
            body,
        }
    }

    /// A frame with an empty header (`{}`).
    pub fn bare(kind: Kind, body: Vec<u8>) -> Frame {
        Frame {
            kind,
            header: b"{}".to_vec(),
            body,
        }
    }

    /// Parses the JSON header.
    pub fn header<H: for<'de> Deserialize<'de>>(&self) -> Result<H, ProtocolError> {
        Ok(serde_json::from_slice(&self.header)?)
    }

    /// Encodes the frame onto the end of `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_parts_into(self.kind, &self.header, &self.body, out);
    }

    /// Encodes the frame into a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Length of the rest of the frame from its 4-byte prefix, checked against [`MAX_FRAME`].
    pub fn rest_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
        let n = u32::from_le_bytes(prefix) as usize;
        if n > MAX_FRAME {
            return Err(ProtocolError::TooLarge(n));
        }
        if n < 5 {
            return Err(ProtocolError::Malformed(
                "frame shorter than its fixed header",
            ));
        }
        Ok(n)
    }

    /// Decodes the rest of a frame (everything after the 4-byte length prefix).
    pub fn decode_rest(mut rest: Vec<u8>) -> Result<Frame, ProtocolError> {
        if rest.len() < 5 {
            return Err(ProtocolError::Malformed(
                "frame shorter than its fixed header",
            ));
        }
        let kind = Kind::from_u8(rest[0]).ok_or(ProtocolError::UnknownKind(rest[0]))?;
        let hlen = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if 5 + hlen > rest.len() {
            return Err(ProtocolError::Malformed("header length past end of frame"));
        }
        let body = rest.split_off(5 + hlen);
        let header = rest[5..].to_vec();
        Ok(Frame { kind, header, body })
    }
}

/// Encodes a frame from its parts (`u32 LE len | kind | u32 LE header len | header | body`)
/// onto the end of `out`, without building a [`Frame`].
pub fn encode_parts_into(kind: Kind, header: &[u8], body: &[u8], out: &mut Vec<u8>) {
    let rest = 1 + 4 + header.len() + body.len();
    out.reserve(4 + rest);
    out.extend_from_slice(&(rest as u32).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
}

/// [`encode_parts_into`] a new buffer.
pub fn encode_parts(kind: Kind, header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_parts_into(kind, header, body, &mut v);
    v
}

/// Reads one frame from an async stream; `Ok(None)` on a clean end of stream.
#[cfg(feature = "io")]
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> std::io::Result<Option<Frame>> {
    use std::io::{Error, ErrorKind};
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; 4];
    match rd.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = Frame::rest_len(prefix).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    let mut rest = vec![0u8; n];
    rd.read_exact(&mut rest).await?;
    Frame::decode_rest(rest)
        .map(Some)
        .map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let inv = Invoke {
            id: "abc".into(),
            deadline_ms: 42,
            function_arn: "arn".into(),
            trace_id: "t".into(),
            client_context: None,
            cognito_identity: None,
        };
        let f = Frame::new(Kind::Invoke, &inv, b"{\"x\":1}".to_vec());
        let bytes = f.encode();
        let n = Frame::rest_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, bytes.len() - 4);
        let g = Frame::decode_rest(bytes[4..].to_vec()).unwrap();
        assert_eq!(f, g);
        let h: Invoke = g.header().unwrap();
        assert_eq!(h.id, "abc");
    }

    #[test]
    fn stream_frames_round_trip() {
        for (kind, n) in [
            (Kind::StreamStart, 16),
            (Kind::StreamChunk, 17),
            (Kind::StreamEnd, 18),
            (Kind::OomKill, 22),
            (Kind::ConnOpen, 7),
            (Kind::ConnData, 23),
            (Kind::ConnAck, 24),
            (Kind::ConnClose, 25),
        ] {
            assert_eq!(Kind::from_u8(n), Some(kind));
        }
        let f = Frame::new(
            Kind::StreamEnd,
            &StreamEnd {
                id: "r1".into(),
                error_type: Some("Boom".into()),
            },
            b"{}".to_vec(),
        );
        let g = Frame::decode_rest(f.encode()[4..].to_vec()).unwrap();
        let h: StreamEnd = g.header().unwrap();
        assert_eq!(
            (h.id.as_str(), h.error_type.as_deref()),
            ("r1", Some("Boom"))
        );
        let s: StreamStart = serde_json::from_str(r#"{"id":"x"}"#).unwrap();
        assert_eq!(s.content_type, None);
    }

    #[test]
    fn conn_header_is_compact_and_round_trips() {
        let data = ConnHeader {
            conn: 7,
            n: 0,
            reset: false,
        };
        assert_eq!(serde_json::to_string(&data).unwrap(), r#"{"conn":7}"#);
        let ack = ConnHeader {
            conn: 7,
            n: 4096,
            reset: false,
        };
        let back: ConnHeader = serde_json::from_str(&serde_json::to_string(&ack).unwrap()).unwrap();
        assert_eq!(back, ack);
        let reset: ConnHeader = serde_json::from_str(r#"{"conn":1,"reset":true}"#).unwrap();
        assert!(reset.reset && reset.n == 0);
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(Frame::rest_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert!(Frame::decode_rest(vec![99, 0, 0, 0, 0]).is_err());
        assert!(Frame::decode_rest(vec![2, 50, 0, 0, 0, b'{']).is_err());
    }
}
