//! Client commands: talk to a Skiff server over its HTTP API.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Body, Client as Http, RequestBuilder, Response};
use serde_json::Value;
use skiff_core::FunctionSpec;
use skiff_store::Store;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Client {
    base: String,
    key: Option<String>,
    http: Http,
}

/// Turns a non-2xx response into an error carrying the server's message.
fn check(resp: Response) -> Result<Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    let msg = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    bail!("{} {}", status.as_u16(), msg)
}

/// Wraps a reader and draws upload progress on stderr.
struct Progress<R> {
    inner: R,
    done: u64,
    total: u64,
    last: Instant,
    tty: bool,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.tty
            && (self.last.elapsed() > Duration::from_millis(80)
                || n == 0
                || self.done == self.total)
        {
            self.last = Instant::now();
            let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!(
                "\r  uploading [{bar:<25}] {pct:>3}% {}/{} KiB",
                self.done / 1024,
                self.total / 1024
            );
            let _ = std::io::stderr().flush();
        }
        Ok(n)
    }
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Result<Client> {
        let http = Http::builder().timeout(Duration::from_secs(960)).build()?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            key,
            http,
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn send(&self, r: RequestBuilder) -> Result<Response> {
        check(
            r.send()
                .with_context(|| format!("cannot reach the Skiff server at {}", self.base))?,
        )
    }

    pub fn deploy(&self, dir: &Path, promote: bool) -> Result<()> {
        let yaml_path = dir.join("function.yaml");
        let yaml = std::fs::read_to_string(&yaml_path)
            .with_context(|| format!("reading {}", yaml_path.display()))?;
        let spec =
            FunctionSpec::from_yaml(&yaml).map_err(|e| anyhow!("{}: {e}", yaml_path.display()))?;
        let t0 = Instant::now();
        let tty = std::io::stderr().is_terminal();
        if tty {
            eprint!("  packing {} ...", dir.display());
        }
        let package = Store::pack_dir(dir, |_| {})?;
        let total = package.len() as u64;
        let reader = Progress {
            inner: std::io::Cursor::new(package),
            done: 0,
            total,
            last: Instant::now(),
            tty,
        };
        let resp = self.send(
            self.req(
                reqwest::Method::POST,
                &format!("/v1/functions/{}/revisions?promote={promote}", spec.name),
            )
            .header("content-type", "application/zstd")
            .body(Body::sized(reader, total)),
        );
        if tty {
            eprintln!();
        }
        let rev: Value = resp?.json()?;
        println!(
            "deployed {} revision {} ({} bytes, sha256 {}) in {} ms{}",
            spec.name,
            rev["number"],
            total,
            rev["package_sha256"]
                .as_str()
                .map(|s| &s[..12.min(s.len())])
                .unwrap_or("?"),
            t0.elapsed().as_millis(),
            if promote {
                "; production now points at it"
            } else {
                ""
            }
        );
        Ok(())
    }

    pub fn invoke(
        &self,
        name: &str,
        data: Option<&str>,
        qualifier: Option<&str>,
        verbose: bool,
        asynchronous: bool,
    ) -> Result<()> {
        let body = match data {
            Some(d) if d.starts_with('@') => {
                std::fs::read(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?
            }
            Some(d) => d.as_bytes().to_vec(),
            None => b"{}".to_vec(),
        };
        let mut req = self.req(
            reqwest::Method::POST,
            &format!("/v1/functions/{name}/invoke"),
        );
        if let Some(q) = qualifier {
            req = req.query(&[("qualifier", q)]);
        }
        if asynchronous {
            let v: Value = self
                .send(
                    req.header("x-skiff-invocation-type", "Event")
                        .header("content-type", "application/json")
                        .body(body),
                )?
                .json()?;
            let id = v["event_id"]
                .as_str()
                .ok_or_else(|| anyhow!("server answered without an event id: {v}"))?;
            if verbose {
                eprintln!("queued; follow it with GET /v1/functions/{name}/events/{id}");
            }
            println!("{id}");
            return Ok(());
        }
        let t0 = Instant::now();
        let resp = req
            .header("content-type", "application/json")
            .body(body)
            .send()
            .with_context(|| format!("cannot reach the Skiff server at {}", self.base))?;
        let h = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        if verbose {
            eprintln!(
                "revision {} · cold start {} · function {} ms · round trip {} ms · request {}",
                h("x-skiff-revision"),
                h("x-skiff-cold-start"),
                h("x-skiff-duration-ms"),
                t0.elapsed().as_millis(),
                h("x-skiff-request-id")
            );
        }
        let resp = check(resp)?;
        let text = resp.text()?;
        println!("{text}");
        Ok(())
    }

    pub fn ls(&self) -> Result<()> {
        let v: Value = self
            .send(self.req(reqwest::Method::GET, "/v1/functions"))?
            .json()?;
        let rows: Vec<[String; 5]> = v["functions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| {
                        let s = |k: &str| match &f[k] {
                            Value::Null => "-".to_string(),
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        [
                            s("name"),
                            s("runtime"),
                            s("latest_revision"),
                            s("production_revision"),
                            age(f["updated_at_ms"].as_i64()),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print_table(
            &["NAME", "RUNTIME", "LATEST", "PRODUCTION", "UPDATED"],
            &rows,
        );
        Ok(())
    }

    pub fn logs(&self, name: &str, follow: bool) -> Result<()> {
        let mut after = 0i64;
        loop {
            let v: Value = self
                .send(self.req(
                    reqwest::Method::GET,
                    &format!("/v1/functions/{name}/logs?after={after}&limit=1000"),
                ))?
                .json()?;
            let lines = v["lines"].as_array().cloned().unwrap_or_default();
            for l in &lines {
                println!(
                    "{} r{} {} {}",
                    l["ts_ms"]
                        .as_i64()
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    l["revision"],
                    l["request_id"]
                        .as_str()
                        .map(|s| &s[..8.min(s.len())])
                        .unwrap_or(""),
                    l["line"].as_str().unwrap_or("")
                );
            }
            if let Some(n) = v["next"].as_i64() {
                after = n;
            }
            if !follow {
                return Ok(());
            }
            if lines.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    pub fn dlq(&self, name: &str, json: bool) -> Result<()> {
        let v: Value = self
            .send(self.req(reqwest::Method::GET, &format!("/v1/functions/{name}/dlq")))?
            .json()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v["events"])?);
            return Ok(());
        }
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            println!("(no dead-lettered events for {name})");
            return Ok(());
        }
        let rows: Vec<[String; 5]> = events
            .iter()
            .map(|e| {
                let payload = match (&e["payload"], &e["payload_base64"]) {
                    (Value::Null, Value::String(b)) => format!("base64:{b}"),
                    (p, _) => p.to_string(),
                };
                [
                    e["id"].as_str().unwrap_or("-").to_string(),
                    e["attempts"].to_string(),
                    age(e["updated_at_ms"].as_i64()),
                    clip_cell(e["error"].as_str().unwrap_or("-"), 60),
                    clip_cell(&payload, 40),
                ]
            })
            .collect();
        print_table(&["EVENT", "ATTEMPTS", "FAILED", "ERROR", "PAYLOAD"], &rows);
        Ok(())
    }

    pub fn dlq_retry(&self, name: &str, id: &str) -> Result<()> {
        self.send(self.req(
            reqwest::Method::POST,
            &format!("/v1/functions/{name}/dlq/{id}/retry"),
        ))?;
        println!("requeued {id}");
        Ok(())
    }

    pub fn dlq_rm(&self, name: &str, id: &str) -> Result<()> {
        self.send(self.req(
            reqwest::Method::DELETE,
            &format!("/v1/functions/{name}/dlq/{id}"),
        ))?;
        println!("deleted {id}");
        Ok(())
    }

    pub fn rm(&self, name: &str) -> Result<()> {
        self.send(self.req(reqwest::Method::DELETE, &format!("/v1/functions/{name}")))?;
        println!("deleted {name}");
        Ok(())
    }

    pub fn alias_set(&self, name: &str, alias: &str, target: &str) -> Result<()> {
        let body = alias_body(target)?;
        let a: Value = self
            .send(
                self.req(
                    reqwest::Method::PUT,
                    &format!("/v1/functions/{name}/aliases/{alias}"),
                )
                .json(&body),
            )?
            .json()?;
        println!("{name}:{alias} -> {}", describe_alias(&a));
        Ok(())
    }

    pub fn alias_ls(&self, name: &str) -> Result<()> {
        let v: Value = self
            .send(self.req(
                reqwest::Method::GET,
                &format!("/v1/functions/{name}/aliases"),
            ))?
            .json()?;
        let rows: Vec<[String; 3]> = v["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                [
                    a["name"].as_str().unwrap_or_default().to_string(),
                    describe_alias(a),
                    age(a["updated_at_ms"].as_i64()),
                ]
            })
            .collect();
        print_table(&["ALIAS", "REVISION", "UPDATED"], &rows);
        Ok(())
    }

    pub fn alias_rm(&self, name: &str, alias: &str) -> Result<()> {
        self.send(self.req(
            reqwest::Method::DELETE,
            &format!("/v1/functions/{name}/aliases/{alias}"),
        ))?;
        println!("deleted {name}:{alias}");
        Ok(())
    }

    pub fn rollback(&self, name: &str, alias: &str, to: Option<u32>) -> Result<()> {
        let a: Value = self
            .send(
                self.req(
                    reqwest::Method::POST,
                    &format!("/v1/functions/{name}/aliases/{alias}/rollback"),
                )
                .json(&serde_json::json!({ "to": to })),
            )?
            .json()?;
        println!("{name}:{alias} -> {}", describe_alias(&a));
        Ok(())
    }

    pub fn restart(&self, name: &str, idle_only: bool) -> Result<()> {
        let op = if idle_only { "recycle" } else { "restart" };
        let v: Value = self
            .send(self.req(
                reqwest::Method::POST,
                &format!("/v1/functions/{name}/runtime/{op}"),
            ))?
            .json()?;
        let stopped = v["stopped"].as_u64().unwrap_or(0);
        match v["draining"].as_u64() {
            Some(d) => println!(
                "{name}: {stopped} idle instance(s) stopped, {d} draining; new invocations start fresh instances"
            ),
            None => println!("{name}: {stopped} idle instance(s) stopped"),
        }
        Ok(())
    }

    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.send(
            self.req(reqwest::Method::PATCH, &format!("/v1/functions/{name}"))
                .json(&serde_json::json!({ "enabled": enabled })),
        )?;
        println!("{name} {}", if enabled { "enabled" } else { "disabled" });
        Ok(())
    }

    pub fn secret_set(&self, name: &str, value: &str) -> Result<()> {
        self.send(
            self.req(reqwest::Method::PUT, &format!("/v1/secrets/{name}"))
                .json(&serde_json::json!({ "value": value })),
        )?;
        println!("secret {name} set");
        Ok(())
    }

    pub fn secret_ls(&self) -> Result<()> {
        let v: Value = self
            .send(self.req(reqwest::Method::GET, "/v1/secrets"))?
            .json()?;
        for n in v["secrets"].as_array().into_iter().flatten() {
            println!("{}", n.as_str().unwrap_or_default());
        }
        Ok(())
    }

    pub fn secret_rm(&self, name: &str) -> Result<()> {
        self.send(self.req(reqwest::Method::DELETE, &format!("/v1/secrets/{name}")))?;
        println!("secret {name} deleted");
        Ok(())
    }
}

/// `3` → `{"revision": 3}`; `3=90,4=10` → `{"routes": [...]}` (the server validates weights).
fn alias_body(target: &str) -> Result<Value> {
    let num = |s: &str, what: &str| -> Result<i64> {
        s.trim()
            .parse::<i64>()
            .map_err(|_| anyhow!("{what} `{s}` is not a whole number (expected N or N=W,M=W)"))
    };
    if !target.contains('=') {
        return Ok(serde_json::json!({ "revision": num(target, "revision")? }));
    }
    let mut routes = Vec::new();
    for part in target.split(',') {
        let (rev, weight) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("`{part}` is not REVISION=WEIGHT"))?;
        routes.push(serde_json::json!({
            "revision": num(rev, "revision")?,
            "weight": num(weight, "weight")?,
        }));
    }
    Ok(serde_json::json!({ "routes": routes }))
}

/// `3`, or `3 (90%), 4 (10%)` for a split.
fn describe_alias(a: &Value) -> String {
    match a["routes"].as_array() {
        Some(routes) => routes
            .iter()
            .map(|r| format!("{} ({}%)", r["revision"], r["weight"]))
            .collect::<Vec<_>>()
            .join(", "),
        None => a["revision"].to_string(),
    }
}

fn age(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// One line of at most `max` characters for a table cell.
fn clip_cell(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max - 1).collect();
    out.push('…');
    out
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut w: [usize; N] = header.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        if header[0] == "NAME" {
            println!("(no functions; deploy one with `skiff deploy DIR`)");
        } else {
            println!("(none)");
        }
    }
}
