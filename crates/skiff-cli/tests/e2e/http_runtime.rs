//! `runtime: http`: the function is an HTTP server on `$PORT` inside its sandbox; HTTP
//! triggers proxy raw requests to it (streamed both ways, kept alive), `/v1` invoke POSTs the
//! event to `/`. Uses `fx-http` (network: none: the proxy needs no network path).

use crate::harness::*;
use reqwest::blocking::Response;
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::{Duration, Instant};

fn url(s: &Server, rest: &str) -> String {
    format!("{}/fn/{rest}", s.url)
}

fn get(s: &Server, rest: &str) -> Response {
    s.http.get(url(s, rest)).send().unwrap()
}

fn json_ok(r: Response) -> (reqwest::header::HeaderMap, Value) {
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().unwrap();
    assert_eq!(st, 200, "{text}");
    (h, serde_json::from_str(&text).unwrap())
}

/// The proxy contract for an `http` function `name` (a variant of `fx-http`) on any tier:
/// path, query and headers reach the server, hop-by-hop headers do not, forwarding headers are
/// set, a binary body makes the round trip byte-exact, the server's status and repeated
/// headers come back, connections are kept alive, `/v1` invoke POSTs the event, and the server
/// cannot reach the host (network: none). Returns the first response's headers.
pub(crate) fn assert_http_proxied(s: &Server, name: &str) -> reqwest::header::HeaderMap {
    // GET with a path and query string; status, headers and body come back.
    let r = s
        .http
        .get(url(
            s,
            &format!("{name}/echo/a%20b/c?x=1&y=two%20words&x=2"),
        ))
        .header("X-Custom", "v1")
        .header("Connection", "keep-alive, x-hop")
        .header("X-Hop", "dropped")
        .header("X-Forwarded-For", "203.0.113.9")
        .send()
        .unwrap();
    let h = r.headers().clone();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
    assert_eq!(hdr(&h, "x-echo-method"), "GET");
    assert_eq!(
        hdr(&h, "x-echo-path"),
        "/echo/a%20b/c?x=1&y=two%20words&x=2"
    );
    assert_eq!(hdr(&h, "x-skiff-cold-start"), "true");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"], "repeated headers pass back");
    let seen: Vec<(String, String)> = serde_json::from_str(&hdr(&h, "x-echo-headers")).unwrap();
    let get_h = |k: &str| seen.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get_h("x-custom"), Some("v1"));
    assert_eq!(
        get_h("x-hop"),
        None,
        "headers named by Connection are dropped"
    );
    assert_eq!(get_h("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(get_h("x-forwarded-proto"), Some("http"));
    let host = s.url.trim_start_matches("http://");
    assert_eq!(get_h("x-forwarded-host"), Some(host));
    assert_eq!(get_h("host"), Some(host));

    // POST with a binary body: byte-exact both ways; the function's status is passed back.
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let r = s
        .http
        .post(url(s, &format!("{name}/echo?status=201")))
        .header("Content-Type", "application/octet-stream")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(hdr(r.headers(), "x-echo-method"), "POST");
    assert_eq!(hdr(r.headers(), "x-skiff-cold-start"), "false");
    assert_eq!(r.bytes().unwrap().as_ref(), body.as_slice());

    // The function's own 404.
    let r = get(s, &format!("{name}/nope"));
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.text().unwrap(), r#"{"error":"not found"}"#);

    // Keep-alive: consecutive requests reach the same process over the same connection.
    let (h1, a) = json_ok(get(s, &format!("{name}/count")));
    let (h2, b) = json_ok(get(s, &format!("{name}/count")));
    assert_eq!(hdr(&h1, "x-skiff-instance"), hdr(&h2, "x-skiff-instance"));
    assert_eq!(a["pid"], b["pid"]);
    assert!(b["count"].as_u64() > a["count"].as_u64(), "{a} {b}");
    assert!(
        b["conn"].as_u64().unwrap() >= 2,
        "the connection to the instance is reused: {a} {b}"
    );

    // `/v1` invoke POSTs the event to `/`.
    let (v, hv) = s.invoke_ok(name, &json!({"hello": "world"}));
    assert_eq!(v["event"], json!({"hello": "world"}));
    assert_eq!(hdr(&hv, "x-skiff-instance"), hdr(&h1, "x-skiff-instance"));

    // The server cannot reach the host (network: none): not the gateway, not anything else.
    let port = s.url.rsplit(':').next().unwrap();
    let (_, v) = json_ok(get(s, &format!("{name}/probe?port={port}")));
    assert_ne!(v["127.0.0.1"], "connected", "{v}");
    assert_ne!(v["10.0.2.2"], "connected", "{v}");
    h
}

#[test]
fn http_runtime_proxies_requests() {
    let s = Server::start();
    s.deploy(&fixture("fx-http"));
    let h1 = assert_http_proxied(&s, "fx-http");

    // Warm proxied latency (client → gateway → instance → back), for the record.
    let mut lat: Vec<Duration> = (0..300)
        .map(|_| {
            let t = Instant::now();
            let r = get(&s, "fx-http/nope");
            assert_eq!(r.status().as_u16(), 404);
            r.bytes().unwrap();
            t.elapsed()
        })
        .collect();
    lat.sort();
    eprintln!(
        "http runtime warm request: p50 {:?}, p90 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10]
    );

    // Still the first instance.
    let (hc, _) = json_ok(get(&s, "fx-http/count"));
    assert_eq!(hdr(&hc, "x-skiff-instance"), hdr(&h1, "x-skiff-instance"));

    // The requests are recorded, with the server's output as logs.
    std::thread::sleep(Duration::from_millis(300));
    let recs: Value = s.get("/v1/functions/fx-http/invocations").json().unwrap();
    let recs = recs["invocations"].as_array().cloned().unwrap_or_default();
    assert!(recs.len() >= 5, "{recs:?}");
}

#[test]
fn http_runtime_streams_and_serves_in_parallel() {
    let s = Server::start();
    s.deploy(&fixture("fx-http"));
    // A streamed response: the first chunk arrives long before the last is written.
    let t0 = Instant::now();
    let r = get(&s, "fx-http/stream?n=5&delay=0.4");
    assert_eq!(r.status().as_u16(), 200);
    let mut lines = std::io::BufReader::new(r).lines();
    let first = lines.next().unwrap().unwrap();
    let t_first = t0.elapsed();
    assert!(first.starts_with("chunk 0"), "{first}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let t_all = t0.elapsed();
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(
        t_all - t_first >= Duration::from_millis(1400),
        "first chunk at {t_first:?}, last at {t_all:?}"
    );

    // concurrency 4, scale.max 1: four slow requests run at once on one instance.
    let t0 = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (c, u) = (s.http.clone(), url(&s, "fx-http/sleep?s=1"));
            std::thread::spawn(move || {
                let r = c.get(u).send().unwrap();
                assert_eq!(r.status().as_u16(), 200);
                hdr(r.headers(), "x-skiff-instance")
            })
        })
        .collect();
    let ids: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let took = t0.elapsed();
    assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");
    assert!(
        took < Duration::from_millis(1900),
        "ran in parallel: {took:?}"
    );
}

#[test]
fn http_runtime_failures() {
    let s = Server::start();
    s.deploy(&fixture("fx-http"));
    let (h0, _) = json_ok(get(&s, "fx-http/count"));
    let first = hdr(&h0, "x-skiff-instance");

    // Over the timeout (3 s): 504, and the instance is replaced.
    let t0 = Instant::now();
    let r = get(&s, "fx-http/sleep?s=20");
    assert_eq!(r.status().as_u16(), 504);
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let (h1, _) = json_ok(get(&s, "fx-http/count"));
    assert_eq!(hdr(&h1, "x-skiff-cold-start"), "true");
    let second = hdr(&h1, "x-skiff-instance");
    assert_ne!(first, second, "timed-out instance replaced");

    // The server exits under a request: 502; the next request cold-starts a new instance.
    let r = get(&s, "fx-http/exit");
    assert_eq!(r.status().as_u16(), 502);
    let (h2, _) = json_ok(get(&s, "fx-http/count"));
    assert_eq!(hdr(&h2, "x-skiff-cold-start"), "true");
    assert_ne!(hdr(&h2, "x-skiff-instance"), second);

    // A server that never listens: 502 after the start limit (10 s, not the 3 s timeout: a
    // server's start is its init), with its output in the error (API) and in the record.
    let deaf = fixture_variant(
        "fx-http",
        &[("name", "fx-http-deaf"), ("env", "{FX_MODE: deaf}")],
    );
    s.deploy(deaf.path());
    let t0 = Instant::now();
    let r = get(&s, "fx-http-deaf/");
    assert_eq!(r.status().as_u16(), 502);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(9900) && took < Duration::from_secs(14),
        "{took:?}"
    );
    let (st, e) = error_of(s.invoke("fx-http-deaf", &json!({})));
    assert_eq!(st, 502, "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("did not accept connections"), "{e}");
    assert!(
        e["logs"].as_str().unwrap_or("").contains("never listening"),
        "{e}"
    );
}
