//! A minimal client of the QEMU Machine Protocol (line-delimited JSON over a unix socket):
//! what snapshots need (stop, continue, migrate to and from a file, and their status).

use crate::SandboxError;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A QMP session in command mode.
pub(crate) struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

fn err(what: &str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Crashed {
        message: format!("QMP {what}: {e}"),
        log_tail: String::new(),
    }
}

impl Qmp {
    /// Connects (retrying for up to `within` while QEMU creates the socket) and leaves
    /// capabilities negotiation.
    pub(crate) async fn connect(sock: &Path, within: Duration) -> Result<Qmp, SandboxError> {
        let deadline = tokio::time::Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(sock).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(err(&format!("connect {}", sock.display()), e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (rd, wr) = stream.into_split();
        let mut q = Qmp {
            rd: BufReader::new(rd),
            wr,
        };
        // The greeting, then qmp_capabilities.
        q.read_msg().await?;
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_msg(&mut self) -> Result<Value, SandboxError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .rd
                .read_line(&mut line)
                .await
                .map_err(|e| err("read", e))?;
            if n == 0 {
                return Err(err("read", "QEMU closed the monitor"));
            }
            let v: Value = serde_json::from_str(line.trim()).map_err(|e| err("reply", e))?;
            // Asynchronous events (STOP, RESUME, MIGRATION...) are not replies.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub(crate) async fn execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
    ) -> Result<Value, SandboxError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| err(cmd, e))?;
        bytes.push(b'\n');
        self.wr
            .write_all(&bytes)
            .await
            .map_err(|e| err("write", e))?;
        let reply = self.read_msg().await?;
        if let Some(e) = reply.get("error") {
            return Err(err(
                cmd,
                e.get("desc").and_then(Value::as_str).unwrap_or("failed"),
            ));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Waits (polling `query-migrate`) until the running migration completed.
    pub(crate) async fn wait_migration(&mut self, within: Duration) -> Result<(), SandboxError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let st = self.execute("query-migrate", None).await?;
            match st.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(err(
                        "migrate",
                        st.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed"),
                    ))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(err("migrate", "did not complete in time"))
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Turns migration capabilities on.
    pub(crate) async fn capabilities(&mut self, caps: &[&str]) -> Result<(), SandboxError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|c| json!({ "capability": c, "state": true }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
        .map(|_| ())
    }
}
