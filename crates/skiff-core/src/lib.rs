//! Skiff domain types shared by every crate: the function spec (`function.yaml`) and its
//! validation, size/duration units, invocations and their outcomes, and the framed protocol
//! spoken between the host and the agent inside a process sandbox. This crate does no I/O.

pub mod invocation;
pub mod launch;
pub mod net;
pub mod protocol;
pub mod publish;
pub mod routes;
pub mod spec;
pub mod split;
pub mod units;

pub use invocation::{
    ErrorKind, FunctionError, Invocation, InvokeOutput, OnStreamEnd, Outcome, ResponseStream,
    StreamError, StreamSender,
};
pub use routes::{Cors, RateLimit, Route, RouteAuth};
pub use spec::{FunctionSpec, Mode, Network, Runtime, SandboxKind, Scale, SpecError};
pub use units::{format_size, parse_duration, parse_size};

/// Largest synchronous invocation payload (request or response), as on AWS Lambda.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// Largest streamed response, as on AWS Lambda (response streaming's 20 MB limit).
pub const MAX_STREAM_BYTES: usize = 20 * 1024 * 1024;

/// Validates a function or alias name: `[a-z0-9-]{1,63}`, not starting or ending with `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
