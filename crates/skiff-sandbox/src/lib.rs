//! Process isolation tiers. This crate owns the [`Sandbox`] and [`Instance`] traits that the
//! scheduler drives, and the `native` tier: Linux namespaces, cgroups (v1 or v2), an
//! unprivileged uid, `no_new_privs`, seccomp, a read-only root and a tmpfs `/tmp`, with the
//! Skiff agent as PID 1 talking to the host over one framed channel.

use async_trait::async_trait;
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::{FunctionSpec, ResponseStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod gvisor;
pub mod microvm;
mod monitor;
pub mod native;
pub mod tiers;
mod tunnel;

pub use gvisor::{GvisorConfig, GvisorSandbox};
pub use microvm::{Accel, MicrovmConfig, MicrovmSandbox};
pub use native::{NativeConfig, NativeSandbox};
pub use tiers::Tiers;
pub use tunnel::HttpConn;

/// Everything needed to start one instance of a revision.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Unique id of this instance (used for cgroup and directory names).
    pub instance_id: String,
    pub function: String,
    pub revision: u32,
    /// Limits and policy: memory, tmp, network, concurrency (= worker processes), mode.
    pub spec: FunctionSpec,
    /// Host directory holding the unpacked package; mounted read-only at `/var/task`.
    pub code_dir: PathBuf,
    /// The function's complete environment.
    pub env: Vec<(String, String)>,
    pub exec_mode: ExecMode,
    /// Program and arguments, as paths inside the sandbox.
    pub argv: Vec<String>,
    /// Root image directory on the host; `None` uses the host's system dirs (`/usr`, …).
    pub rootfs: Option<PathBuf>,
    /// Host directory mounted writable at [`WORKSPACE_DIR`] (`mode: persistent`); it outlives
    /// the instance.
    pub workspace: Option<PathBuf>,
}

/// Where a `persistent` function's workspace appears inside its sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";

/// The error type of [`HttpBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body exchanged with an instance that serves HTTP in-process.
pub type HttpBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// One invocation sent to an instance.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    pub invoke: Invoke,
    pub payload: Vec<u8>,
}

/// What the function answered.
#[derive(Debug, Default)]
pub struct InvokeResult {
    /// Response body, or error JSON `{errorMessage, errorType, stackTrace}` if `error_type`.
    /// Empty when the response is streamed.
    pub body: Vec<u8>,
    /// The response, when the runtime streams it. The instance is busy with this invocation
    /// until the stream has ended (or the instance is stopped).
    pub stream: Option<ResponseStream>,
    /// Set when the function reported an error (handler raised, command failed, init error).
    pub error_type: Option<String>,
    /// Output (stdout and stderr) the function wrote during this invocation (until its
    /// stream started, for streamed responses).
    pub logs: Vec<u8>,
}

/// Errors of the sandbox tiers.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The sandbox could not be created (platform or configuration problem).
    #[error("sandbox failed to start: {0}")]
    Start(String),
    /// The function was killed for exceeding its memory limit.
    #[error("function exceeded its memory limit of {limit_mb} MiB and was killed")]
    OutOfMemory { limit_mb: u64, log_tail: String },
    /// The function process or the sandbox died without answering.
    #[error("{message}")]
    Crashed { message: String, log_tail: String },
    /// An `http` function's server did not accept connections in time.
    #[error("{message}")]
    NotListening { message: String, log_tail: String },
    /// The tier or the instance's mode does not offer this operation.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The instance was already stopped.
    #[error("instance is no longer running")]
    Gone,
    #[error("i/o error talking to the sandbox: {0}")]
    Io(#[from] std::io::Error),
}

impl SandboxError {
    /// The function's last output, when the error carries it.
    pub fn log_tail(&self) -> &str {
        match self {
            SandboxError::OutOfMemory { log_tail, .. }
            | SandboxError::Crashed { log_tail, .. }
            | SandboxError::NotListening { log_tail, .. } => log_tail,
            _ => "",
        }
    }
}

/// A tier that can start instances.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// Starts an instance: sandbox built, function process(es) launched. Initialisation of the
    /// function itself may still be running when this returns; the first invoke waits for it.
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError>;

    /// Checks and readies the code of a function before instances of it start (e.g. compiles
    /// it ahead of time, once per content), and says how its instances take requests. Called
    /// at deploy time, where an error rejects the package, and before a revision's first
    /// request. The default: as the runtime's launch plan says.
    async fn prepare(
        &self,
        spec: &FunctionSpec,
        code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        let _ = code_dir;
        Ok(skiff_core::launch::program(spec).0)
    }

    /// Starts an instance from a snapshot `image` (a directory written by
    /// [`Instance::checkpoint`] of an instance of the same revision): memory, processes and
    /// `/tmp` as they were at the checkpoint. `spec` says which revision and limits.
    async fn restore(
        &self,
        spec: InstanceSpec,
        image: &Path,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        let _ = (spec, image);
        Err(SandboxError::Unsupported(
            "this sandbox tier cannot restore snapshots".into(),
        ))
    }

    /// Releases what the tier holds besides instances (e.g. pre-spawned sandboxes).
    async fn shutdown(&self) {}
}

/// Longest wait for a new instance's sandbox to come up (a microVM's boot) before its
/// function's own start limits apply.
pub const BOOT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A running sandbox serving invocations of one revision.
#[async_trait]
pub trait Instance: Send + Sync {
    fn id(&self) -> &str;
    /// Runs one invocation. Up to `spec.concurrency` may run at once. Cancel-safe: dropping
    /// the future abandons the invocation (the caller then stops the instance).
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError>;
    /// Kills every process of the instance and removes its cgroups and directories.
    /// Idempotent; when it returns nothing of the instance is left on the host.
    async fn stop(&self);
    /// False once the agent has exited or the instance was stopped.
    fn is_alive(&self) -> bool;
    /// Current memory use of the whole sandbox in bytes, when known.
    fn memory_usage(&self) -> Option<u64>;
    /// Peak memory use of the whole sandbox since it started, in bytes, when known.
    fn memory_peak(&self) -> Option<u64> {
        None
    }
    /// `http` mode: a new connection to the function's server. Waits until the sandbox is up
    /// (at most [`BOOT_LIMIT`]), then until the server first accepted a connection, at most
    /// `ready_within` (then [`SandboxError::NotListening`] with the server's output); fails at
    /// once when the instance died.
    async fn connect_http(
        &self,
        _ready_within: std::time::Duration,
    ) -> Result<HttpConn, SandboxError> {
        Err(SandboxError::Unsupported(
            "this sandbox tier cannot proxy HTTP yet".into(),
        ))
    }
    /// True when the instance answers HTTP requests itself ([`Instance::serve_http`]) rather
    /// than through a connection to a server process ([`Instance::connect_http`]).
    fn serves_http(&self) -> bool {
        false
    }
    /// `http` mode, in-process tiers: serves one request. The response head comes back once
    /// the function has produced it; its body may still be streaming.
    async fn serve_http(
        &self,
        _req: http::Request<HttpBody>,
    ) -> Result<http::Response<HttpBody>, SandboxError> {
        Err(SandboxError::Unsupported(
            "this sandbox tier serves HTTP through a connection".into(),
        ))
    }
    /// Output the function wrote outside of any invocation (an `http` server's logs) since
    /// the last call; taken, so each byte is returned once.
    fn take_output(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Waits, at most `within`, until the function has initialised: the sandbox is up (a
    /// microVM has booted) and the runtime waits for work. At once for tiers without such a
    /// phase. `Err` when the instance died meanwhile (its next invoke reports why).
    async fn initialized(&self, within: std::time::Duration) -> Result<(), SandboxError> {
        let _ = within;
        Ok(())
    }
    /// Saves the whole instance (memory, processes, `/tmp`) into the directory `image`, for
    /// [`Sandbox::restore`]. Waits first (at most `init_within`) until the function has
    /// initialised; call it before the instance serves anything when every restored copy
    /// should start from a clean, initialised state. Unless `leave_running`, the instance is
    /// stopped afterwards.
    async fn checkpoint(
        &self,
        image: &Path,
        init_within: std::time::Duration,
        leave_running: bool,
    ) -> Result<(), SandboxError> {
        let _ = (image, init_within, leave_running);
        Err(SandboxError::Unsupported(
            "this sandbox tier cannot take snapshots".into(),
        ))
    }
}
