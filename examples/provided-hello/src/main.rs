//! Example `provided` function: a compiled `bootstrap` speaking the Lambda Runtime API
//! (2018-06-01) over one keep-alive HTTP/1.1 connection, with the standard library only.
//!
//! For each invocation it replies `{"message":"Hello, <name>!","runtime":"provided"}`, where
//! `<name>` is the event's top-level `"name"` string (default `world`).

use std::env;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

const API: &str = "/2018-06-01/runtime";

fn main() -> ExitCode {
    // `--exit`: start and exit at once; the benchmark uses it as the raw process floor.
    if env::args().nth(1).as_deref() == Some("--exit") {
        return ExitCode::SUCCESS;
    }
    let Ok(addr) = env::var("AWS_LAMBDA_RUNTIME_API") else {
        eprintln!("bootstrap: AWS_LAMBDA_RUNTIME_API is not set");
        return ExitCode::FAILURE;
    };
    let mut client = Client { addr, conn: None };
    loop {
        let next = match client.request("GET", &format!("{API}/invocation/next"), &[], b"") {
            Ok(r) if r.status == 200 => r,
            Ok(r) => {
                eprintln!("bootstrap: next invocation: HTTP {}", r.status);
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("bootstrap: next invocation: {e}");
                return ExitCode::FAILURE;
            }
        };
        let Some(request_id) = next
            .header("lambda-runtime-aws-request-id")
            .map(str::to_string)
        else {
            eprintln!("bootstrap: invocation without a request id");
            return ExitCode::FAILURE;
        };
        let name = top_level_string(&next.body, "name").unwrap_or_else(|| "world".to_string());
        let reply = format!(
            "{{\"message\":\"Hello, {}!\",\"runtime\":\"provided\"}}",
            json_escape(&name)
        );
        let path = format!("{API}/invocation/{request_id}/response");
        match client.request(
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            reply.as_bytes(),
        ) {
            Ok(r) if r.status < 300 => {}
            Ok(r) => eprintln!("bootstrap: posting response: HTTP {}", r.status),
            Err(e) => {
                eprintln!("bootstrap: posting response: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one persistent connection, reopened when the server closed it.

struct Client {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut attempt = 0;
        loop {
            let reused = self.conn.is_some();
            let result = self.try_request(method, path, headers, body);
            match result {
                Ok(resp) => {
                    if resp
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        self.conn = None;
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    self.conn = None;
                    // A kept-alive connection may have been closed under us: retry once fresh.
                    if !reused || attempt > 0 {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr)?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        conn.get_mut().write_all(&out)?;
        read_response(conn)
    }
}

fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let (status, headers) = loop {
        let status_line = read_line(r)?;
        let mut parts = status_line.split_whitespace();
        let version = parts.next().unwrap_or("");
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        if !version.starts_with("HTTP/") {
            return Err(bad(format!("bad status line {status_line:?}")));
        }
        let mut headers = Vec::new();
        loop {
            let line = read_line(r)?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if !(100..200).contains(&status) {
            break (status, headers); // 1xx: an interim response; the real one follows
        }
    };
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked")) {
        loop {
            let size_line = read_line(r)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                while !read_line(r)?.is_empty() {} // trailers
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?; // CRLF after the chunk
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad content-length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut body)?; // no framing: the body runs to the end of the connection
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

// ------------------------------------------------------------------------------------------
// Just enough JSON: find a top-level string member of an object; escape a string.

/// The value of `key` in the top-level JSON object `json`, if it is a string.
fn top_level_string(json: &[u8], key: &str) -> Option<String> {
    let mut p = Parser { s: json, i: 0 };
    p.ws();
    if !p.eat(b'{') {
        return None;
    }
    p.ws();
    if p.eat(b'}') {
        return None;
    }
    loop {
        p.ws();
        let k = p.string()?;
        p.ws();
        if !p.eat(b':') {
            return None;
        }
        p.ws();
        if k == key && p.peek() == Some(b'"') {
            return p.string();
        }
        p.skip_value(0)?;
        p.ws();
        if p.eat(b',') {
            continue;
        }
        return None;
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    }

    fn string(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi)
                                && self.s.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xD800) << 10) + (lo.wrapping_sub(0xDC00) & 0x3FF)
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{FFFD}')
                        }
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
    }

    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > 128 {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            open @ (b'{' | b'[') => {
                self.i += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                self.ws();
                if self.eat(close) {
                    return Some(());
                }
                loop {
                    self.ws();
                    if open == b'{' {
                        self.string()?;
                        self.ws();
                        if !self.eat(b':') {
                            return None;
                        }
                        self.ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    if self.eat(b',') {
                        continue;
                    }
                    return if self.eat(close) { Some(()) } else { None };
                }
            }
            _ => {
                // number, true, false, null
                let start = self.i;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.'))
                {
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_top_level_name() {
        assert_eq!(
            top_level_string(br#"{"name":"Ada"}"#, "name").as_deref(),
            Some("Ada")
        );
        assert_eq!(
            top_level_string(br#" { "x": {"name": "no"}, "l": [1, "a", {"b": null}], "n": -1.5e3, "name" : "Bo\"b\u00e9\ud83d\ude00" } "#, "name").as_deref(),
            Some("Bo\"b\u{e9}\u{1F600}")
        );
        assert_eq!(top_level_string(br#"{"name": 3}"#, "name"), None);
        assert_eq!(top_level_string(br#"[{"name":"x"}]"#, "name"), None);
        assert_eq!(top_level_string(b"", "name"), None);
        assert_eq!(top_level_string(br#"{"name""#, "name"), None);
    }

    #[test]
    fn escapes() {
        assert_eq!(json_escape("a\"b\\c\n\u{1}é"), "a\\\"b\\\\c\\n\\u0001é");
    }
}
