//! A streaming `provided` function on `lambda_runtime::streaming`: sends `{"chunks": N,
//! "delay_ms": D}` lines `chunk i` with a pause before each one after the first, so a test
//! can see them arrive one by one.

use lambda_runtime::streaming::{channel, Body, Response};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use std::time::Duration;

async fn handler(ev: LambdaEvent<Value>) -> Result<Response<Body>, Error> {
    let chunks = ev
        .payload
        .get("chunks")
        .and_then(Value::as_u64)
        .unwrap_or(3);
    let delay = ev
        .payload
        .get("delay_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let (mut tx, rx) = channel();
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if tx.send_data(format!("chunk {i}\n").into()).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::from(rx))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
