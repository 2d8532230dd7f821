//! Host routing (`{slug}.{function-domain}`, `{alias}--{slug}.…`) and route policy
//! (`routes:`: prefixes, methods, CORS, auth, rate limit, rewrite, timeout, body limit),
//! through the real binary over HTTP.

use crate::harness::*;
use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `printf %s good-token | sha256sum`
const TOKEN_SHA: &str = "461caa80a52104436e34006189430d13aba103b2c4344d446ea3d9324b0de1c0";
/// `printf %s key-1 | sha256sum`
const KEY_SHA: &str = "be2974546978e3739e6d6da85c4be9f334ce32df2b9fd4b6ff1b55c0d57e9d44";

fn routes_yaml() -> String {
    format!(
        "[{{path_prefix: /api, methods: [GET, POST], rewrite_prefix: /echo, \
           cors: {{allow_origins: ['https://app.test'], allow_headers: [authorization, content-type], \
                   expose_headers: [x-skiff-request-id], max_age: 600}}}}, \
          {{path_prefix: /private, rewrite_prefix: /echo, auth: {{type: bearer, tokens_sha256: [{TOKEN_SHA}]}}}}, \
          {{path_prefix: /key, auth: {{type: header, name: X-Api-Key, values_sha256: [{KEY_SHA}]}}}}, \
          {{path_prefix: /limited, rewrite_prefix: /echo, rate_limit: {{rps: 1, burst: 3}}}}, \
          {{path_prefix: /sleep, timeout: 1s}}, \
          {{path_prefix: /small, rewrite_prefix: /echo, max_body: 1Ki}}, \
          {{path_prefix: /echo}}]"
    )
}

/// Status, headers and JSON body.
fn parts(r: Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (st, h, v)
}

/// Status of a GET sent as is (reqwest would resolve `..` in the URL).
fn raw_status(s: &Server, path: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = s.url.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn req(s: &Server, method: &str, rest: &str) -> RequestBuilder {
    s.http.request(
        method.parse().unwrap(),
        format!("{}/fn/fx-routes{rest}", s.url),
    )
}

#[test]
fn route_policy_statuses() {
    let s = Server::start();
    let dir = fixture_variant(
        "fx-apigw",
        &[("name", "fx-routes"), ("routes", &routes_yaml())],
    );
    s.deploy(dir.path());
    // Warm the instance so timing-sensitive checks below see warm invocations.
    let (st, _, v) = parts(req(&s, "GET", "/echo").send().unwrap());
    assert_eq!(st, 200, "{v}");

    // No matching route: 404 in the gateway shape; prefixes match whole segments.
    for path in ["/nothing", "/apix", "/"] {
        let (st, h, v) = parts(req(&s, "GET", path).send().unwrap());
        assert_eq!(st, 404, "{path}: {v}");
        assert_eq!(v, json!({"message": "no route matches this path"}));
        assert_eq!(hdr(&h, "x-skiff-error"), "not_found");
    }

    // Wrong method: 405 with Allow.
    let (st, h, v) = parts(req(&s, "DELETE", "/api/x").send().unwrap());
    assert_eq!(st, 405, "{v}");
    assert_eq!(hdr(&h, "allow"), "GET, POST");

    // CORS preflight, allowed: 204 from the gateway with the policy's headers.
    let r = req(&s, "OPTIONS", "/api/x")
        .header("Origin", "https://app.test")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "Authorization, Content-Type",
        )
        .send()
        .unwrap();
    let (st, h, _) = parts(r);
    assert_eq!(st, 204);
    assert_eq!(hdr(&h, "access-control-allow-origin"), "https://app.test");
    assert_eq!(hdr(&h, "access-control-allow-methods"), "GET, POST");
    assert_eq!(
        hdr(&h, "access-control-allow-headers"),
        "authorization, content-type"
    );
    assert_eq!(hdr(&h, "access-control-max-age"), "600");
    assert!(h.get("x-skiff-request-id").is_none(), "no invocation ran");
    // Disallowed origin, method or header: 403.
    for (origin, method, headers) in [
        ("https://evil.test", "GET", ""),
        ("https://app.test", "DELETE", ""),
        ("https://app.test", "GET", "x-secret"),
    ] {
        let r = req(&s, "OPTIONS", "/api/x")
            .header("Origin", origin)
            .header("Access-Control-Request-Method", method)
            .header("Access-Control-Request-Headers", headers)
            .send()
            .unwrap();
        let (st, h, v) = parts(r);
        assert_eq!(st, 403, "{origin} {method} {headers}: {v}");
        assert_eq!(v, json!({"message": "Forbidden"}));
        assert!(h.get("access-control-allow-origin").is_none());
    }
    // An actual cross-origin request: CORS headers on the function's reply, and the rewrite
    // of /api to /echo is what the function sees.
    let r = req(&s, "GET", "/api/users/7?x=1")
        .header("Origin", "https://app.test")
        .send()
        .unwrap();
    let (st, h, v) = parts(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h, "access-control-allow-origin"), "https://app.test");
    assert_eq!(
        hdr(&h, "access-control-expose-headers"),
        "x-skiff-request-id"
    );
    assert_eq!(v["event"]["rawPath"], "/echo/users/7");
    assert_eq!(
        v["event"]["requestContext"]["http"]["path"],
        "/echo/users/7"
    );
    assert_eq!(v["event"]["rawQueryString"], "x=1");
    // Another origin gets the reply without CORS headers (the browser withholds it).
    let r = req(&s, "GET", "/api/users")
        .header("Origin", "https://other.test")
        .send()
        .unwrap();
    let (st, h, _) = parts(r);
    assert_eq!(st, 200);
    assert!(h.get("access-control-allow-origin").is_none());

    // Bearer auth: 401 with a challenge unless the token's digest is listed.
    let (st, h, v) = parts(req(&s, "GET", "/private").send().unwrap());
    assert_eq!((st, &v), (401, &json!({"message": "Unauthorized"})));
    assert_eq!(hdr(&h, "www-authenticate"), "Bearer realm=\"fx-routes\"");
    let r = req(&s, "GET", "/private")
        .bearer_auth("bad-token")
        .send()
        .unwrap();
    let (st, h, _) = parts(r);
    assert_eq!(st, 401);
    assert!(hdr(&h, "www-authenticate").contains("invalid_token"));
    // The digest is not the token.
    let r = req(&s, "GET", "/private")
        .bearer_auth(TOKEN_SHA)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = req(&s, "GET", "/private/x")
        .bearer_auth("good-token")
        .send()
        .unwrap();
    let (st, _, v) = parts(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["event"]["rawPath"], "/echo/x");
    // An escaped path does not dodge the route: /%70rivate is /private.
    let (st, _, _) = parts(req(&s, "GET", "/%70rivate/x").send().unwrap());
    assert_eq!(st, 401);
    // Dot segments (which clients normally resolve) are refused, not guessed at.
    for path in ["/echo/../private", "/echo/%2e%2E/private"] {
        assert_eq!(
            raw_status(&s, &format!("/fn/fx-routes{path}")),
            400,
            "{path}"
        );
    }
    // API-key header auth.
    let r = req(&s, "GET", "/key")
        .header("X-Api-Key", "key-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = req(&s, "GET", "/key")
        .header("X-Api-Key", "key-2")
        .send()
        .unwrap();
    let (st, h, _) = parts(r);
    assert_eq!(st, 401);
    assert!(hdr(&h, "www-authenticate").contains("x-api-key"));

    // Rate limit (1 rps, burst 3): quick requests get the burst (plus at most a refill or two
    // on a slow machine), then 429 with Retry-After; a token is back a second later.
    let mut ok = 0;
    let limited = loop {
        let (st, h, v) = parts(req(&s, "GET", "/limited").send().unwrap());
        match st {
            200 => ok += 1,
            429 => break (h, v),
            _ => panic!("{st}: {v}"),
        }
        assert!(ok < 8, "no 429 after {ok} requests");
    };
    assert!((3..=5).contains(&ok), "{ok} requests passed before the 429");
    let (h, v) = limited;
    assert_eq!(v, json!({"message": "Too Many Requests"}));
    assert_eq!(hdr(&h, "retry-after"), "1");
    assert_eq!(hdr(&h, "x-skiff-error"), "rate_limited");
    std::thread::sleep(Duration::from_millis(1100));
    let (st, _, v) = parts(req(&s, "GET", "/limited").send().unwrap());
    assert_eq!(st, 200, "after waiting: {v}");
    // Other routes have their own limits (none here).
    for _ in 0..5 {
        assert_eq!(req(&s, "GET", "/echo").send().unwrap().status(), 200);
    }

    // Route timeout 1s, shorter than the function's 3s: 504.
    let t = Instant::now();
    let (st, _, v) = parts(req(&s, "GET", "/sleep?s=2.5").send().unwrap());
    assert_eq!(
        (st, &v),
        (504, &json!({"message": "Endpoint request timed out"}))
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2400),
        "{took:?}"
    );

    // Body limit of 1 KiB: 413 above, fine below.
    let r = req(&s, "POST", "/small")
        .body(vec![b'x'; 2048])
        .send()
        .unwrap();
    let (st, _, v) = parts(r);
    assert_eq!(st, 413, "{v}");
    assert!(v["message"].as_str().unwrap().contains("1024"), "{v}");
    let r = req(&s, "POST", "/small")
        .body(vec![b'x'; 1000])
        .send()
        .unwrap();
    let (st, _, v) = parts(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["event"]["body"].as_str().unwrap().len(), 1000);

    // X-Forwarded-* and Forwarded from the client are replaced by the gateway's.
    let r = req(&s, "GET", "/echo")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Host", "evil.test")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Port", "1")
        .header("Forwarded", "for=6.6.6.6")
        .send()
        .unwrap();
    let (st, _, v) = parts(r);
    assert_eq!(st, 200, "{v}");
    let headers = &v["event"]["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], headers["host"]);
    assert!(headers.get("x-forwarded-port").is_none(), "{headers}");
    assert!(headers.get("forwarded").is_none(), "{headers}");
}

#[test]
fn host_routing_and_routes_api() {
    let mut s = Server::start_with(&["--function-domain", "fn.localhost", "--api-key", "k1"]);
    s.key = Some("k1".into());
    let dir = fixture_variant("fx-apigw", &[("name", "fx")]);
    s.deploy(dir.path());
    s.deploy(dir.path()); // revision 2 is production
    let r = s
        .http
        .put(format!("{}/v1/functions/fx/aliases/canary", s.url))
        .bearer_auth("k1")
        .json(&json!({"revision": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let host = |h: &str, path: &str| {
        s.http
            .get(format!("{}{path}", s.url))
            .header("Host", h)
            .send()
            .unwrap()
    };

    // `{slug}.{domain}` is production, whole path passed through, no API key, port ignored.
    let (st, h, v) = parts(host("fx.fn.localhost:9999", "/hello/world?q=1"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h, "x-skiff-revision"), "2");
    assert_eq!(v["event"]["rawPath"], "/hello/world");
    assert_eq!(v["event"]["rawQueryString"], "q=1");
    assert_eq!(
        v["event"]["headers"]["x-forwarded-host"],
        "fx.fn.localhost:9999"
    );
    // Paths that mean something on the plain host belong to the function here.
    let (st, _, v) = parts(host("fx.fn.localhost", "/v1/functions"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["event"]["rawPath"], "/v1/functions");
    // `{alias}--{slug}` picks the alias.
    let (st, h, v) = parts(host("Canary--FX.fn.LocalHost", "/x"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(hdr(&h, "x-skiff-revision"), "1");
    assert_eq!(v["version"], "1");
    // Unknown function, alias or label under the domain: 404 JSON.
    for h in [
        "nope.fn.localhost",
        "gone--fx.fn.localhost",
        "a.b.fn.localhost",
        "Bad_Name.fn.localhost",
    ] {
        let (st, _, v) = parts(host(h, "/"));
        assert_eq!(st, 404, "{h}: {v}");
        assert!(v["message"].is_string(), "{h}: {v}");
    }
    // The plain host keeps the API (with its key) and /health.
    let plain = s
        .http
        .get(format!("{}/v1/functions", s.url))
        .send()
        .unwrap();
    assert_eq!(plain.status(), 401);
    assert_eq!(s.get("/v1/functions").status(), 200);
    assert!(s.healthy());
    // /fn/ keeps working.
    let r = s.http.get(format!("{}/fn/fx/y", s.url)).send().unwrap();
    assert_eq!(r.status(), 200);

    // Routes through the API: a new revision, same package, promoted.
    let put = |body: Value, query: &str| {
        s.http
            .put(format!("{}/v1/functions/fx/routes{query}", s.url))
            .bearer_auth("k1")
            .json(&body)
            .send()
            .unwrap()
    };
    let (st, v) = error_of(put(
        json!({"routes": [{"path_prefix": "/hello", "rate_limit": {"rps": 0}}]}),
        "",
    ));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["field"], "routes[0].rate_limit.rps");
    let (st, v) = error_of(put(json!({"routes": [], "extra": 1}), ""));
    assert_eq!((st, &v["field"]), (400, &json!("extra")));
    let (st, v) = error_of(put(
        json!({"routes": [{"path_prefix": "/", "auth": {"type": "bearer", "tokens_sha256": ["good-token"]}}]}),
        "",
    ));
    assert_eq!(st, 400);
    assert_eq!(v["field"], "routes[0].auth.tokens_sha256[0]");
    let r = put(
        json!({"routes": [{"path_prefix": "/hello", "methods": ["GET"]}]}),
        "",
    );
    assert_eq!(r.status(), 201);
    let rev: Value = r.json().unwrap();
    assert_eq!(rev["number"], 3);
    let revs: Value = s.get("/v1/functions/fx/revisions").json().unwrap();
    let revs = revs["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 3);
    assert_eq!(revs[2]["package_sha256"], revs[1]["package_sha256"]);
    assert!(
        revs[1]["spec"].get("routes").is_none(),
        "revision 2 unchanged"
    );
    let got: Value = s.get("/v1/functions/fx/routes").json().unwrap();
    assert_eq!(got["revision"], 3);
    assert_eq!(got["routes"][0]["path_prefix"], "/hello");
    assert_eq!(got["routes"][0]["methods"], json!(["GET"]));
    // The new policy applies to host-routed requests at once.
    let (st, h, _) = parts(host("fx.fn.localhost", "/hello/x"));
    assert_eq!((st, hdr(&h, "x-skiff-revision")), (200, "3".into()));
    let (st, _, _) = parts(host("fx.fn.localhost", "/other"));
    assert_eq!(st, 404);
    let r = s
        .http
        .post(format!("{}/", s.url))
        .header("Host", "fx.fn.localhost")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .post(format!("{}/hello", s.url))
        .header("Host", "fx.fn.localhost")
        .send()
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), hdr(r.headers(), "allow")),
        (405, "GET".into())
    );
    // The canary alias keeps its revision's (open) policy.
    let (st, _, _) = parts(host("canary--fx.fn.localhost", "/other"));
    assert_eq!(st, 200);
    // promote=false: a revision, production unmoved.
    let r = put(json!({"routes": null}), "?promote=false");
    assert_eq!(r.status(), 201);
    let got: Value = s.get("/v1/functions/fx/routes").json().unwrap();
    assert_eq!(got["revision"], 3);
    let got: Value = s.get("/v1/functions/fx/routes?qualifier=4").json().unwrap();
    assert_eq!(
        (&got["revision"], &got["routes"]),
        (&json!(4), &Value::Null)
    );
}
