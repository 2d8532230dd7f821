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

/// The body for a streamed response. How the stream ended is reported through the
/// stream's own [`ResponseStream::on_end`] hook (the invoke path records the invocation there).
pub(crate) fn body(stream: ResponseStream) -> Body {
    Body::new(StreamBody {
        stream,
        done: false,
        failed: None,
    })
}

struct StreamBody {
    stream: ResponseStream,
    done: bool,
    /// An error held back for one poll, so the server flushes the chunks before it aborts.
    failed: Option<StreamError>,
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
        if me.done {
            return Poll::Ready(None);
        }
        match me.stream.poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!("streamed response failed: {e}");
                me.done = true;
                // hyper drops unflushed output when a body fails; a pending poll flushes it.
                me.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                me.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.failed.is_none()
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
        let log = |ended: &Arc<Mutex<Vec<Option<String>>>>| -> skiff_core::OnStreamEnd {
            let ended = ended.clone();
            Box::new(move |e| ended.lock().unwrap().push(e.map(|e| e.error_type.clone())))
        };
        let (tx, mut rx) = ResponseStream::channel(4, None);
        rx.on_end(log(&ended));
        let mut b = body(rx);
        tx.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        let f = b.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "one");
        tx.send(Ok(Bytes::from_static(b"two"))).await.unwrap();
        drop(tx);
        assert_eq!(b.collect().await.unwrap().to_bytes(), "two");

        let (tx, mut rx) = ResponseStream::channel(4, None);
        rx.on_end(log(&ended));
        let b = body(rx);
        tx.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
        tx.send(Err(StreamError::new("Sandbox.Timedout", "late")))
            .await
            .unwrap();
        assert!(b.collect().await.is_err());

        let (_tx, mut rx) = ResponseStream::channel(4, None);
        rx.on_end(log(&ended));
        drop(body(rx));
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
