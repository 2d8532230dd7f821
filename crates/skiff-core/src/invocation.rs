//! Invocations and their outcomes: what every entry point turns a request into, and what the
//! scheduler hands back.

use bytes::Bytes;
use serde::Serialize;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

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

/// Why a streamed response ended before it was complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct StreamError {
    /// `Sandbox.Timedout`, the runtime's error type (mid-stream error trailer),
    /// `Runtime.StreamError` (the runtime broke the stream), `Runtime.ExitError` (it died), …
    pub error_type: String,
    pub message: String,
}

impl StreamError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> StreamError {
        StreamError {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// The error as Lambda's error JSON `{errorMessage, errorType}`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::json!({"errorMessage": self.message, "errorType": self.error_type})
            .to_string()
            .into_bytes()
    }
}

/// A response body the function streams: chunks arrive as the function writes them; an
/// `Err` item is the last one and means the stream failed. Dropping it abandons the rest
/// (the producer drains or stops the instance; it is never reused mid-stream).
pub struct ResponseStream {
    rx: mpsc::Receiver<Result<Bytes, StreamError>>,
    /// Content type the function declared for the stream, if any.
    pub content_type: Option<String>,
    on_end: Option<OnStreamEnd>,
}

/// Called once when a stream is over: `None` when it completed, else why it did not
/// (`Client.Disconnected` when the consumer dropped it early).
pub type OnStreamEnd = Box<dyn FnOnce(Option<&StreamError>) + Send>;

impl std::fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

/// The producing half of a [`ResponseStream`].
pub type StreamSender = mpsc::Sender<Result<Bytes, StreamError>>;

impl ResponseStream {
    /// A stream and its sender, buffering at most `capacity` chunks.
    pub fn channel(
        capacity: usize,
        content_type: Option<String>,
    ) -> (StreamSender, ResponseStream) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            tx,
            ResponseStream {
                rx,
                content_type,
                on_end: None,
            },
        )
    }

    /// Runs `f` once when the stream completes, fails, or is dropped before its end (after
    /// any hook set earlier).
    pub fn on_end(&mut self, f: OnStreamEnd) {
        self.on_end = Some(match self.on_end.take() {
            None => f,
            Some(first) => Box::new(move |e| {
                first(e);
                f(e);
            }),
        });
    }

    fn ended(&mut self, item: &Option<Result<Bytes, StreamError>>) {
        match item {
            None => {
                if let Some(f) = self.on_end.take() {
                    f(None)
                }
            }
            Some(Err(e)) => {
                if let Some(f) = self.on_end.take() {
                    f(Some(e))
                }
            }
            Some(Ok(_)) => {}
        }
    }

    /// The next chunk; `None` once the stream is complete.
    pub async fn next(&mut self) -> Option<Result<Bytes, StreamError>> {
        let item = self.rx.recv().await;
        self.ended(&item);
        item
    }

    /// Poll form of [`ResponseStream::next`], for adapting to body types.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        let r = self.rx.poll_recv(cx);
        if let Poll::Ready(item) = &r {
            self.ended(item);
        }
        r
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(Some(&StreamError::new(
                "Client.Disconnected",
                "the client went away before the stream ended",
            )));
        }
    }
}

/// A finished invocation.
#[derive(Debug)]
pub struct InvokeOutput {
    /// Response body, or the error JSON when `function_error` is set. Empty when `stream` is.
    pub body: Vec<u8>,
    /// The response, when the function streams it: read it from here, not from `body`.
    pub stream: Option<ResponseStream>,
    pub function_error: Option<FunctionError>,
    pub revision: u32,
    pub instance_id: String,
    pub cold: bool,
    pub duration: Duration,
    /// Time to start the instance, on cold starts.
    pub init_duration: Option<Duration>,
    /// Function output captured during this invocation (until its stream started, if any).
    pub logs: Vec<u8>,
    /// Peak memory of the instance so far (bytes), when the sandbox reports it.
    pub max_memory: Option<u64>,
}

impl InvokeOutput {
    /// Buffers a streamed response into `body`, for callers that need the whole body. A stream
    /// that failed becomes a function error carrying the [`StreamError`] (and the partial body
    /// is dropped). Outputs without a stream are returned as they are.
    pub async fn collect(mut self) -> InvokeOutput {
        let Some(mut stream) = self.stream.take() else {
            return self;
        };
        let mut body = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(e) => {
                    self.body = e.to_json();
                    self.function_error = Some(FunctionError {
                        error_type: e.error_type.clone(),
                        message: e.message,
                        reported_as: e.error_type,
                    });
                    return self;
                }
            }
        }
        self.body = body;
        self
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stream: Option<ResponseStream>) -> InvokeOutput {
        InvokeOutput {
            body: b"buffered".to_vec(),
            stream,
            function_error: None,
            revision: 1,
            instance_id: "i".into(),
            cold: false,
            duration: Duration::ZERO,
            init_duration: None,
            logs: Vec::new(),
            max_memory: None,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn collect_buffers_a_stream_and_turns_its_error_into_a_function_error() {
        let out = block_on(output(None).collect());
        assert_eq!(out.body, b"buffered");
        let (tx, rx) = ResponseStream::channel(4, None);
        tx.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"cd"))).unwrap();
        drop(tx);
        let out = block_on(output(Some(rx)).collect());
        assert_eq!(
            (out.body.as_slice(), out.function_error.is_none()),
            (&b"abcd"[..], true)
        );
        let (tx, rx) = ResponseStream::channel(4, None);
        tx.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Err(StreamError::new("Sandbox.Timedout", "too slow")))
            .unwrap();
        drop(tx);
        let out = block_on(output(Some(rx)).collect());
        let fe = out.function_error.unwrap();
        assert_eq!(
            (fe.error_type.as_str(), fe.message.as_str()),
            ("Sandbox.Timedout", "too slow")
        );
        let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["errorType"], "Sandbox.Timedout");
    }
}
