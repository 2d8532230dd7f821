//! Host side of the JS tier's `fetch`: requests run on the server's tokio runtime with a shared
//! reqwest client (plain `http://` only: the build has no TLS stack), and their results go back
//! to the isolate thread as events on its queue (each completion is a macrotask of the
//! invocation that started the request).
//!
//! Policy: `network: none` refuses every request. Otherwise the destination — URL literals,
//! every DNS answer (checked in the resolver, so a name cannot rebind past the check) and every
//! redirect — must not be loopback, link-local, private (RFC 1918, CGNAT, ULA), unspecified,
//! multicast or broadcast, nor the gateway itself ([`skiff_core::net`]); `skiff serve
//! --allow-private-egress` lifts the address rule.

use skiff_core::net::EgressPolicy;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Largest response body kept (bytes); longer bodies fail the fetch.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Where `fetch` may connect: the server's [`EgressPolicy`], plus the HTTP client that
/// enforces it. Shared by the instances of one [`crate::JsSandbox`].
#[derive(Default)]
pub struct NetPolicy {
    egress: Arc<EgressPolicy>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl NetPolicy {
    /// `fetch` under the server's egress rules.
    pub fn new(egress: Arc<EgressPolicy>) -> NetPolicy {
        NetPolicy {
            egress,
            client: OnceLock::new(),
        }
    }

    /// A policy for tests that may reach local servers.
    pub fn allowing_private_for_tests() -> NetPolicy {
        NetPolicy::new(Arc::new(EgressPolicy::allowing_private()))
    }

    pub fn set_gateway(&self, addr: SocketAddr) {
        self.egress.set_gateway(addr);
    }

    /// Why `ip:port` may not be fetched, if it may not.
    pub fn refuse(&self, ip: IpAddr, port: Option<u16>) -> Option<String> {
        self.egress.refuse(ip, port)
    }

    fn client(self: &Arc<Self>) -> Result<reqwest::Client, String> {
        let policy = self.clone();
        self.client
            .get_or_init(|| {
                let redirects = policy.clone();
                reqwest::Client::builder()
                    .no_proxy()
                    .dns_resolver(Arc::new(Resolver(policy)))
                    .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                        if attempt.previous().len() >= 10 {
                            return attempt.error("too many redirects");
                        }
                        match check_url(&redirects, attempt.url()) {
                            Ok(()) => attempt.follow(),
                            Err(e) => attempt.error(e),
                        }
                    }))
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))
            })
            .clone()
    }
}

/// Scheme, and literal-address destination checks of a URL.
fn check_url(policy: &NetPolicy, url: &reqwest::Url) -> Result<(), String> {
    if url.scheme() == "https" {
        return Err("https URLs are not supported yet (this build has no TLS)".into());
    }
    if url.scheme() != "http" {
        return Err(format!("unsupported URL scheme `{}`", url.scheme()));
    }
    let port = url.port_or_known_default();
    let Some(host) = url.host_str() else {
        return Err("the URL has no host".into());
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(ip) = literal.parse::<IpAddr>() else {
        if host.eq_ignore_ascii_case("localhost")
            || host.to_ascii_lowercase().ends_with(".localhost")
        {
            if policy.egress.allows_private() {
                return Ok(());
            }
            return Err(format!("refusing to fetch {host}: loopback address"));
        }
        // Names: the gateway's port is refused when it listens on every address.
        if let (Some(g), Some(p)) = (policy.egress.gateway(), port) {
            if g.ip().is_unspecified() && g.port() == p {
                return Err(format!("refusing to fetch port {p}: the Skiff gateway"));
            }
        }
        return Ok(());
    };
    match policy.refuse(ip, port) {
        Some(why) => Err(format!("refusing to fetch {url}: {why}")),
        None => Ok(()),
    }
}

/// DNS through the system resolver, dropping refused answers.
struct Resolver(Arc<NetPolicy>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.refuse(a.ip(), None) {
                    Some(w) => {
                        why = Some(w);
                        false
                    }
                    None => true,
                })
                .collect();
            if ok.is_empty() {
                let why = why.unwrap_or_else(|| "no addresses".into());
                return Err(format!("refusing to fetch {host}: {why}").into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A finished fetch, sent back to the isolate thread.
pub(crate) struct Done {
    pub id: u32,
    pub result: Result<Reply, String>,
}

pub(crate) struct Reply {
    pub status: u16,
    pub status_text: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// One request from JS.
pub(crate) struct Request {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

/// Checks `req` and, if it may go, starts it on `rt`; `done` receives the result.
pub(crate) fn start(
    policy: &Arc<NetPolicy>,
    rt: &tokio::runtime::Handle,
    id: u32,
    req: Request,
    timeout: Duration,
    done: impl FnOnce(Done) + Send + 'static,
) -> Result<(), String> {
    let url = reqwest::Url::parse(&req.url).map_err(|e| format!("invalid URL {}: {e}", req.url))?;
    check_url(policy, &url)?;
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| format!("invalid method {}", req.method))?;
    let client = policy.client()?;
    let mut b = client.request(method, url).timeout(timeout);
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    if let Some(body) = req.body {
        b = b.body(body);
    }
    rt.spawn(async move {
        let result = async {
            let resp = b.send().await.map_err(describe)?;
            let status = resp.status();
            let url = resp.url().to_string();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            if resp
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
            {
                return Err(format!(
                    "the response body exceeds {MAX_RESPONSE_BYTES} bytes"
                ));
            }
            let bytes = resp.bytes().await.map_err(describe)?;
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(format!(
                    "the response body exceeds {MAX_RESPONSE_BYTES} bytes"
                ));
            }
            Ok(Reply {
                status: status.as_u16(),
                status_text: status.canonical_reason().unwrap_or("").to_string(),
                url,
                headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        }
        .await;
        done(Done { id, result });
    });
    Ok(())
}

/// The error and its sources in one line (reqwest hides the cause, e.g. a refused address).
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return "the request timed out".into();
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_follows_the_egress_policy() {
        let p = NetPolicy::default();
        assert!(p.refuse("10.1.2.3".parse().unwrap(), Some(80)).is_some());
        assert!(p.refuse("1.1.1.1".parse().unwrap(), Some(80)).is_none());
        let p = NetPolicy::allowing_private_for_tests();
        p.set_gateway("127.0.0.1:8080".parse().unwrap());
        assert!(p.refuse("127.0.0.1".parse().unwrap(), Some(8080)).is_some());
        assert!(p.refuse("127.0.0.1".parse().unwrap(), Some(8081)).is_none());
    }
}
