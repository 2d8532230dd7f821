//! A function's streamed response as an HTTP body: chunks are sent to the client as they
//! arrive (chunked transfer encoding), nothing is buffered. A stream that fails (mid-stream
//! function error, timeout, crash) aborts the response, so the client sees a truncated body
//! rather than a complete-looking one.

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use skiff_core::{ResponseStream, StreamError};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Called once when the stream is over: `None` when it completed, else why it did not.
pub(crate) type OnEnd = Box<dyn FnOnce(Option<&StreamError>) + Send>;

/// The body for a streamed response; `on_end` runs when it completes, fails, or the client
/// goes away.
pub(crate) fn body(stream: ResponseStream, on_end: OnEnd) -> Body {
    Body::new(StreamBody {
        stream,
        on_end: Some(on_end),
        failed: None,
    })
}

struct StreamBody {
    stream: ResponseStream,
    on_end: Option<OnEnd>,
    /// An error held back for one poll, so the server flushes the chunks before it aborts.
    failed: Option<StreamError>,
}

impl StreamBody {
    fn end(&mut self, err: Option<&StreamError>) {
        if let Some(f) = self.on_end.take() {
            f(err);
        }
    }
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let me = self.get_mut();
        if let Some(e) = me.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if me.on_end.is_none() {
            return Poll::Ready(None);
        }
        match me.stream.poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!("streamed response failed: {e}");
                me.end(Some(&e));
                // hyper drops unflushed output when a body fails; a pending poll flushes it.
                me.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                me.end(None);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.on_end.is_none() && self.failed.is_none()
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.end(Some(&StreamError::new(
            "Client.Disconnected",
            "the client went away before the stream ended",
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn chunks_pass_through_and_errors_abort() {
        let ended = Arc::new(Mutex::new(Vec::new()));
        let log = |ended: &Arc<Mutex<Vec<Option<String>>>>| -> OnEnd {
            let ended = ended.clone();
            Box::new(move |e| ended.lock().unwrap().push(e.map(|e| e.error_type.clone())))
        };
        let (tx, rx) = ResponseStream::channel(4, None);
        let mut b = body(rx, log(&ended));
        tx.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        let f = b.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "one");
        tx.send(Ok(Bytes::from_static(b"two"))).await.unwrap();
        drop(tx);
        assert_eq!(b.collect().await.unwrap().to_bytes(), "two");

        let (tx, rx) = ResponseStream::channel(4, None);
        let b = body(rx, log(&ended));
        tx.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
        tx.send(Err(StreamError::new("Sandbox.Timedout", "late")))
            .await
            .unwrap();
        assert!(b.collect().await.is_err());

        let (_tx, rx) = ResponseStream::channel(4, None);
        drop(body(rx, log(&ended)));
        assert_eq!(
            *ended.lock().unwrap(),
            [
                None,
                Some("Sandbox.Timedout".to_string()),
                Some("Client.Disconnected".to_string())
            ]
        );
    }
}
