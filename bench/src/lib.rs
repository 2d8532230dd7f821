//! Helpers shared by the benchmark binaries: arguments, starting a real `skiff serve`,
//! deploying, and the open-file limit.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The value after `--name` on the command line, or `default`.
/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A release binary of this workspace (`$CARGO_TARGET_DIR/release/<name>`, else the
/// workspace's `target/release/<name>`).
pub fn release_bin(name: &str) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace_root().join("target"))
        .join("release")
        .join(name)
}

pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts `skiff serve` on a free loopback port with `data` as its data dir; returns the
/// process and its `host:port`. The server's warnings and errors are echoed to stderr.
pub fn start_server(skiff: &Path, data: &Path) -> (Child, String) {
    let mut child = Command::new(skiff)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if l.contains("ERROR") || l.contains("WARN") {
                eprintln!("server: {l}");
            }
        }
    });
    (child, addr)
}

/// Deploys a function directory with `skiff deploy`; panics with its output on failure.
pub fn deploy(skiff: &Path, addr: &str, dir: &Path) {
    let out = Command::new(skiff)
        .args(["deploy"])
        .arg(dir)
        .env("SKIFF_SERVER", format!("http://{addr}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// One response: status, headers (lower-cased), body.
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

/// Sends one HTTP/1.1 request on `r`'s stream and reads the response (by Content-Length).
pub async fn request(
    r: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<Reply> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    // One write, as HTTP clients send a small request: head and body written separately go
    // out as two segments (no Nagle), and the server would wake up once for each.
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    r.get_mut().write_all(&msg).await?;
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers = String::new();
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        headers.push_str(&l);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The value of header `name` (lower-case) in `headers` as [`request`] returns them.
pub fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `v` sorted ascending.
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `p` quantile (0..=1, nearest rank) of sorted values; NaN when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    sorted[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]
}

/// The median of sorted values (mean of the middle two for an even count); NaN when empty.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A keep-alive connection to the gateway at `addr`, without Nagle.
pub async fn connect(addr: &str) -> tokio::io::BufReader<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    tokio::io::BufReader::new(s)
}

/// One `POST /v1/functions/{name}/invoke` of `body` on a keep-alive connection; its latency in
/// ms. Panics unless it answered 200 and, when `cold` is given, the cold-start header says so.
pub async fn invoke(
    conn: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    addr: &str,
    name: &str,
    body: &[u8],
    cold: Option<bool>,
) -> f64 {
    let path = format!("/v1/functions/{name}/invoke");
    let t = std::time::Instant::now();
    let r = request(conn, addr, "POST", &path, body, false)
        .await
        .unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        r.status,
        200,
        "{name}: {}",
        String::from_utf8_lossy(&r.body)
    );
    if let Some(c) = cold {
        let got = header(&r.headers, "x-skiff-cold-start") == Some("true");
        assert_eq!(got, c, "{name}: cold-start header");
    }
    ms
}
