//! Invocations and their outcomes: what every entry point turns a request into, and what the
//! scheduler hands back.

use serde::Serialize;
use std::time::Duration;

/// One call of a function, independent of the API it came through.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    pub function: String,
    /// Alias name or revision number; `None` means `production`.
    pub qualifier: Option<String>,
    pub payload: Vec<u8>,
    pub client_context: Option<String>,
    pub trace_id: Option<String>,
}

/// Error returned by the function itself (handler raised / command failed). The body is the
/// error JSON `{errorMessage, errorType, stackTrace}`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionError {
    /// The error's type as the function reported it (`errorType`, e.g. `ValueError`).
    pub error_type: String,
    pub message: String,
    /// How the runtime classified it (`Lambda-Runtime-Function-Error-Type`: `Unhandled`,
    /// `Handled`, `Runtime.ImportModuleError`, …).
    pub reported_as: String,
}

/// A finished invocation.
#[derive(Debug, Clone)]
pub struct InvokeOutput {
    /// Response body, or the error JSON when `function_error` is set.
    pub body: Vec<u8>,
    pub function_error: Option<FunctionError>,
    pub revision: u32,
    pub instance_id: String,
    pub cold: bool,
    pub duration: Duration,
    /// Time to start the instance, on cold starts.
    pub init_duration: Option<Duration>,
    /// Function output captured during this invocation.
    pub logs: Vec<u8>,
    /// Peak memory of the instance so far (bytes), when the sandbox reports it.
    pub max_memory: Option<u64>,
}

/// Why an invocation produced no output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Ran past its timeout; the instance was killed.
    Timeout,
    /// Exceeded its memory limit; the instance was killed.
    OutOfMemory,
    /// The function process or sandbox died.
    Crashed,
    /// No instance could be had in time (scale.max reached, queue full).
    Throttled,
    /// The sandbox could not be started (platform problem).
    StartFailed,
}

/// The result of an invocation that did not complete normally.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: ErrorKind,
    pub message: String,
    /// Tail of the function's logs, for crashes.
    pub log_tail: String,
    pub revision: u32,
    pub cold: bool,
}
