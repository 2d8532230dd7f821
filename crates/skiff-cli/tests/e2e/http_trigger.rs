//! HTTP triggers (`ANY /fn/{name}/{*path}`): requests arrive as API Gateway payload 2.0 events,
//! replies are mapped back to HTTP; public (no API key), errors in API Gateway's shape.

use crate::harness::*;
use reqwest::blocking::Response;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn url(s: &Server, rest: &str) -> String {
    format!("{}/fn/{rest}", s.url)
}

fn get(s: &Server, rest: &str) -> Response {
    s.http.get(url(s, rest)).send().unwrap()
}

/// Status, headers and JSON body of a reply.
fn json_of(r: Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (st, h, v)
}

#[test]
fn http_trigger_event_shape() {
    let s = Server::start();
    s.deploy(&fixture("fx-apigw"));
    let before = skiff_now_ms();
    let r = s
        .http
        .get(url(
            &s,
            "fx-apigw/echo/a%20b/c?x=1&y=two%20words&x=2&empty=&q=%2Fslash",
        ))
        .header("X-Custom", "v1")
        .header("X-Custom", "v2")
        .header("Cookie", "a=1; b=2")
        .header("User-Agent", "skiff-e2e/1")
        .header("Connection", "keep-alive, x-hop")
        .header("X-Hop", "dropped")
        .send()
        .unwrap();
    let (st, h, v) = json_of(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h, "content-type"), "application/json");
    let e = &v["event"];
    assert_eq!(e["version"], "2.0");
    assert_eq!(e["routeKey"], "$default");
    assert_eq!(e["rawPath"], "/echo/a%20b/c");
    assert_eq!(
        e["rawQueryString"],
        "x=1&y=two%20words&x=2&empty=&q=%2Fslash"
    );
    assert_eq!(
        e["queryStringParameters"],
        json!({"x": "1,2", "y": "two words", "empty": "", "q": "/slash"})
    );
    assert_eq!(e["cookies"], json!(["a=1", "b=2"]));
    let headers = &e["headers"];
    assert_eq!(headers["x-custom"], "v1,v2", "{headers}");
    assert_eq!(headers["user-agent"], "skiff-e2e/1");
    assert!(headers.get("cookie").is_none(), "{headers}");
    assert!(headers.get("connection").is_none(), "{headers}");
    assert!(headers.get("x-hop").is_none(), "{headers}");
    assert!(headers["host"].as_str().unwrap().starts_with("127.0.0.1:"));
    let rc = &e["requestContext"];
    assert_eq!(rc["apiId"], "fx-apigw");
    assert_eq!(rc["accountId"], "anonymous");
    assert_eq!(rc["domainName"], headers["host"]);
    assert_eq!(rc["domainPrefix"], "127.0.0.1");
    assert_eq!(rc["stage"], "$default");
    assert_eq!(rc["routeKey"], "$default");
    assert_eq!(
        rc["http"],
        json!({"method": "GET", "path": "/echo/a%20b/c", "protocol": "HTTP/1.1",
               "sourceIp": "127.0.0.1", "userAgent": "skiff-e2e/1"})
    );
    // The request id is the invocation's, and the one in the headers.
    assert_eq!(rc["requestId"], v["request_id"]);
    assert_eq!(
        rc["requestId"].as_str(),
        Some(hdr(&h, "x-skiff-request-id").as_str())
    );
    let epoch = rc["timeEpoch"].as_i64().unwrap();
    assert!(epoch >= before && epoch <= skiff_now_ms(), "{rc}");
    let time = rc["time"].as_str().unwrap();
    assert!(time.ends_with(" +0000") && time.len() == 26, "{time}");
    assert!(e.get("body").is_none(), "{e}");
    assert_eq!(e["isBase64Encoded"], false);
    assert!(e.get("pathParameters").is_none() && e.get("stageVariables").is_none());

    // The function root, with and without a trailing slash.
    for rest in ["fx-apigw", "fx-apigw/"] {
        let (st, _, v) = json_of(get(&s, rest));
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["event"]["rawPath"], "/", "{rest}");
        assert!(v["event"].get("queryStringParameters").is_none());
        assert!(v["event"].get("cookies").is_none());
    }

    // A JSON POST body arrives as text.
    let body = r#"{"hello": "world", "n": [1, 2]}"#;
    let r = s
        .http
        .post(url(&s, "fx-apigw/echo"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let (st, _, v) = json_of(r);
    assert_eq!(st, 200, "{v}");
    let e = &v["event"];
    assert_eq!(e["requestContext"]["http"]["method"], "POST");
    assert_eq!(e["body"], body);
    assert_eq!(e["isBase64Encoded"], false);
    assert_eq!(e["headers"]["content-type"], "application/json");
}

#[test]
fn http_trigger_qualifier_header() {
    let s = Server::start();
    s.deploy(&fixture("fx-apigw"));
    s.deploy(&fixture("fx-apigw")); // revision 2 is production
    let (_, h, v) = json_of(get(&s, "fx-apigw/echo"));
    assert_eq!(
        (hdr(&h, "x-skiff-revision"), &v["version"]),
        ("2".into(), &json!("2"))
    );
    let r = s
        .http
        .get(url(&s, "fx-apigw/echo?qualifier=ignored"))
        .header("X-Skiff-Qualifier", "1")
        .send()
        .unwrap();
    let (st, h, v) = json_of(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");
    assert_eq!(v["version"], "1");
    assert_eq!(v["event"]["rawQueryString"], "qualifier=ignored");
    let r = s
        .http
        .get(url(&s, "fx-apigw/echo"))
        .header("X-Skiff-Qualifier", "nope")
        .send()
        .unwrap();
    let (st, h, v) = json_of(r);
    assert_eq!(st, 404, "{v}");
    assert_eq!(hdr(&h, "x-skiff-error"), "not_found");
}

#[test]
fn http_trigger_binary_round_trip() {
    let s = Server::start();
    s.deploy(&fixture("fx-apigw"));
    let all: Vec<u8> = (0..=255u8).collect();
    let r = s
        .http
        .post(url(&s, "fx-apigw/binary"))
        .header("content-type", "application/octet-stream")
        .body(all.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "content-type"), "application/octet-stream");
    assert_eq!(hdr(r.headers(), "x-was-base64"), "true");
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        &all[..],
        "byte-exact round trip"
    );
    // Invalid UTF-8 without a content type is base64 too; a larger body survives intact.
    let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    let r = s
        .http
        .put(url(&s, "fx-apigw/binary"))
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(r.headers(), "x-was-base64"), "true");
    assert!(r.bytes().unwrap().as_ref() == &big[..], "3 MiB round trip");
}

#[test]
fn http_trigger_reply_mapping() {
    let s = Server::start();
    s.deploy(&fixture("fx-apigw"));
    // Status, headers, multi-value headers and cookies from the reply.
    let r = get(&s, "fx-apigw/custom?status=418");
    assert_eq!(r.status(), 418);
    let h = r.headers().clone();
    assert_eq!(hdr(&h, "content-type"), "text/plain");
    assert_eq!(hdr(&h, "x-custom"), "yes");
    let multi: Vec<_> = h.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["session=abc; Path=/; HttpOnly", "theme=dark"]);
    assert!(!hdr(&h, "x-skiff-request-id").is_empty());
    assert_eq!(r.text().unwrap(), "created");
    // Any other JSON value: 200 application/json with the value as the body.
    let (st, h, v) = json_of(get(&s, "fx-apigw/value"));
    assert_eq!(st, 200);
    assert_eq!(hdr(&h, "content-type"), "application/json");
    assert_eq!(v, json!([1, "two", null, {"k": true}]));
    // The function raised: 502 like API Gateway, the details stay in the logs.
    let (st, h, v) = json_of(get(&s, "fx-apigw/error"));
    assert_eq!(st, 502);
    assert_eq!(v, json!({"message": "Internal Server Error"}));
    assert_eq!(hdr(&h, "x-skiff-function-error"), "ValueError");
    assert_eq!(hdr(&h, "x-skiff-error"), "function_error");
    let rid = hdr(&h, "x-skiff-request-id");
    assert!(!rid.is_empty());
    assert!(!hdr(&h, "x-skiff-instance").is_empty());
    let inv: Value = s.get("/v1/functions/fx-apigw/invocations").json().unwrap();
    let rec = inv["invocations"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["request_id"] == rid.as_str()))
        .unwrap_or_else(|| panic!("no record of {rid}: {inv}"));
    assert_eq!(rec["status"], "function_error", "{rec}");
    assert!(rec.to_string().contains("boom: bad request"), "{rec}");
    // A reply that is not a valid response: 502 too.
    let (st, h, v) = json_of(get(&s, "fx-apigw/invalid"));
    assert_eq!(
        (st, &v),
        (502, &json!({"message": "Internal Server Error"}))
    );
    assert_eq!(hdr(&h, "x-skiff-error"), "invalid_reply");
    // Unknown function: 404 JSON.
    let (st, h, v) = json_of(get(&s, "nope/x"));
    assert_eq!(st, 404);
    assert!(v["message"].as_str().unwrap().contains("nope"), "{v}");
    assert_eq!(hdr(&h, "x-skiff-error"), "not_found");
    // Body over 6 MB: 413 JSON (the rest of the upload is drained, so the client sees it).
    let (st, h, v) = json_of(
        s.http
            .post(url(&s, "fx-apigw/echo"))
            .body(vec![b'a'; 7 << 20])
            .send()
            .unwrap(),
    );
    assert_eq!(st, 413, "{v}");
    assert_eq!(hdr(&h, "x-skiff-error"), "payload_too_large");
    assert!(v["message"].as_str().unwrap().contains("limit"), "{v}");
    // Without a declared length (chunked), the limit holds while reading.
    let body = reqwest::blocking::Body::new(std::io::Read::take(std::io::repeat(b'a'), 8 << 20));
    let r = s
        .http
        .post(url(&s, "fx-apigw/echo"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(s.healthy());
}

#[test]
fn http_trigger_platform_errors_are_public_safe() {
    let s = Server::start();
    s.deploy(&fixture("fx-apigw"));
    // A crash is a 502 whose body does not leak the function's logs.
    let r = get(&s, "fx-apigw/crash");
    assert_eq!(r.status(), 502);
    assert_eq!(hdr(r.headers(), "x-skiff-error"), "function_crashed");
    assert!(!hdr(r.headers(), "x-skiff-request-id").is_empty());
    let text = r.text().unwrap();
    assert_eq!(text, r#"{"message":"Internal Server Error"}"#);
    // Past the 3 s timeout: 504.
    let t0 = Instant::now();
    let (st, h, v) = json_of(get(&s, "fx-apigw/sleep?s=10"));
    assert_eq!(st, 504, "{v}");
    assert_eq!(v, json!({"message": "Endpoint request timed out"}));
    assert_eq!(hdr(&h, "x-skiff-error"), "timeout");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    // The function recovers.
    assert_eq!(get(&s, "fx-apigw/value").status(), 200);
}

#[test]
fn http_trigger_needs_no_api_key() {
    let mut s = Server::start_with(&["--api-key", "k-trigger-1"]);
    s.key = Some("k-trigger-1".into());
    s.deploy(&fixture("fx-apigw"));
    s.key = None;
    // The management API still needs the key...
    let (st, _) = error_of(s.get("/v1/functions"));
    assert_eq!(st, 401);
    assert_eq!(s.invoke("fx-apigw", &json!({})).status(), 401);
    // ...the HTTP trigger does not, and the caller's Authorization reaches the function.
    let r = s
        .http
        .get(url(&s, "fx-apigw/echo"))
        .header("Authorization", "Bearer user-token")
        .send()
        .unwrap();
    let (st, _, v) = json_of(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["event"]["headers"]["authorization"], "Bearer user-token");
}

fn skiff_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
