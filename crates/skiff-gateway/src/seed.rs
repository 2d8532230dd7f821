//! Seed-compatible ad-hoc invoke (the Tangle FaaS API): `POST /functions/{function_id}/invoke`
//! with a `SandboxConfig` runs an argv in a fresh native sandbox and answers an
//! `InvocationResult`. The call is an invocation of a synthetic ephemeral revision in command
//! mode, so it goes through the scheduler and sandbox like every other invocation.

use crate::error::{seed_outcome, ApiError, ApiResult};
use crate::invoke::read_json;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use skiff_core::spec::{MEMORY_MAX, MEMORY_MIN, TIMEOUT_MAX};
use skiff_core::{
    FunctionSpec, Invocation, Mode, Network, Runtime, SandboxKind, Scale, MAX_PAYLOAD_BYTES,
};
use skiff_scheduler::Revision;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Default memory limit of an ad-hoc sandbox (`memory_mb` overrides, 64..=2048).
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// Default timeout (`timeout_secs` overrides, 1..=900).
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Size of the writable `/tmp`.
pub const TMP_BYTES: u64 = 64 << 20;
/// Ad-hoc sandboxes running at once; more are answered 429.
pub const MAX_CONCURRENT: usize = 64;
/// Pool key of ad-hoc revisions: not a valid function name, so it never meets a deployed one.
const POOL_FUNCTION: &str = "_seed";
/// Largest request body: the base64 of a maximal payload plus room for the rest.
const MAX_BODY: usize = MAX_PAYLOAD_BYTES / 3 * 4 + (64 << 10);

/// Server-side settings of the seed API, set once by `skiff serve`.
#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// Empty directory mounted read-only at `/var/task` (the working directory).
    pub code_dir: PathBuf,
    /// When set, `image` paths must lie under this directory.
    pub image_root: Option<PathBuf>,
}

/// Seed API state in [`AppState`].
pub struct SeedState {
    config: OnceLock<SeedConfig>,
    seq: AtomicU32,
    slots: tokio::sync::Semaphore,
}

impl Default for SeedState {
    fn default() -> Self {
        SeedState {
            config: OnceLock::new(),
            seq: AtomicU32::new(1),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT),
        }
    }
}

impl SeedState {
    /// Enables the seed API; creates the empty code directory. A second call is ignored.
    pub fn configure(&self, cfg: SeedConfig) -> std::io::Result<()> {
        std::fs::create_dir_all(&cfg.code_dir)?;
        let _ = self.config.set(cfg);
        Ok(())
    }
}

/// Reply of a seed invocation that ran (whatever the command's exit status).
#[derive(Debug, Serialize)]
pub struct InvocationResult {
    pub request_id: String,
    /// The command's stdout (empty when it failed: see `logs_base64`).
    pub response_base64: String,
    /// stdout followed by stderr (a failed command's stdout comes after its stderr).
    pub logs_base64: String,
    /// `None` on exit status 0, else why the command failed.
    pub error: Option<String>,
}

/// A validated `SandboxConfig`.
#[derive(Debug)]
struct AdHoc {
    rootfs: Option<PathBuf>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    payload: Vec<u8>,
    memory: u64,
    timeout: Duration,
}

fn field(name: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_field(name, message).seed()
}

fn string_list(v: &Value, name: &str) -> ApiResult<Vec<String>> {
    let Some(items) = v.as_array() else {
        return Err(field(name, format!("{name} must be an array of strings")));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.as_str() {
            Some(s) if s.contains('\0') => {
                Err(field(name, format!("{name}[{i}] contains a NUL character")))
            }
            Some(s) => Ok(s.to_string()),
            None => Err(field(name, format!("{name}[{i}] must be a string"))),
        })
        .collect()
}

fn bounded(v: &Value, name: &str, min: u64, max: u64) -> ApiResult<u64> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(field(
            name,
            format!("{name} must be an integer from {min} to {max}"),
        )),
    }
}

/// Resolves `image`: absent, empty or `"host"` is the host's system dirs (`None`); anything
/// else must be an existing absolute directory (under `image_root` when configured).
fn image(v: Option<&Value>, cfg: &SeedConfig) -> ApiResult<Option<PathBuf>> {
    let s = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(field("image", "image must be a string")),
    };
    if s.is_empty() || s == "host" {
        return Ok(None);
    }
    if !s.starts_with('/') {
        return Err(field(
            "image",
            format!("image {s:?} must be \"host\" or an absolute path to a root directory"),
        ));
    }
    let dir = std::fs::canonicalize(s)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| field("image", format!("image {s:?} is not an existing directory")))?;
    if dir == std::path::Path::new("/") {
        return Err(field(
            "image",
            "image \"/\" would expose the whole host; use \"host\" for the usual read-only system dirs",
        ));
    }
    if let Some(root) = &cfg.image_root {
        if !dir.starts_with(root) {
            return Err(field(
                "image",
                format!(
                    "image {s:?} is outside the allowed image root {}",
                    root.display()
                ),
            ));
        }
    }
    Ok(Some(dir))
}

fn parse(body: &Value, cfg: &SeedConfig) -> ApiResult<AdHoc> {
    let Some(obj) = body.as_object() else {
        return Err(field(
            "body",
            "request body must be a JSON object (SandboxConfig)",
        ));
    };
    let argv = match obj.get("command") {
        None | Some(Value::Null) => return Err(field("command", "command is required")),
        Some(v) => string_list(v, "command")?,
    };
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(field(
            "command",
            "command must be a non-empty array whose first element names the program",
        ));
    }
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("HOME".to_string(), "/tmp".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ];
    if let Some(v) = obj.get("env_vars").filter(|v| !v.is_null()) {
        for (i, kv) in string_list(v, "env_vars")?.into_iter().enumerate() {
            let Some((k, val)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                return Err(field(
                    "env_vars",
                    format!("env_vars[{i}] must have the form NAME=VALUE"),
                ));
            };
            match env.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = val.to_string(),
                None => env.push((k.to_string(), val.to_string())),
            }
        }
    }
    let payload = match obj.get("payload_base64") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => STANDARD.decode(s.trim()).map_err(|e| {
            field(
                "payload_base64",
                format!("payload_base64 is not valid base64: {e}"),
            )
        })?,
        Some(_) => return Err(field("payload_base64", "payload_base64 must be a string")),
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(ApiError::too_large(MAX_PAYLOAD_BYTES).seed());
    }
    let memory_mb = match obj.get("memory_mb").filter(|v| !v.is_null()) {
        Some(v) => bounded(v, "memory_mb", MEMORY_MIN >> 20, MEMORY_MAX >> 20)?,
        None => DEFAULT_MEMORY_MB,
    };
    let timeout_secs = match obj.get("timeout_secs").filter(|v| !v.is_null()) {
        Some(v) => bounded(v, "timeout_secs", 1, TIMEOUT_MAX.as_secs())?,
        None => DEFAULT_TIMEOUT_SECS,
    };
    Ok(AdHoc {
        rootfs: image(obj.get("image"), cfg)?,
        argv,
        env,
        payload,
        memory: memory_mb << 20,
        timeout: Duration::from_secs(timeout_secs),
    })
}

fn spec_for(call: &AdHoc) -> FunctionSpec {
    FunctionSpec {
        name: "seed".into(),
        runtime: Runtime::Command,
        handler: call.argv[0].clone(),
        sandbox: SandboxKind::Native,
        memory: call.memory,
        timeout: call.timeout,
        concurrency: 1,
        scale: Scale {
            min: 0,
            max: 1,
            idle: Duration::from_secs(1),
        },
        env: Default::default(),
        secrets: Vec::new(),
        network: Network::None,
        tmp: TMP_BYTES,
        mode: Mode::Ephemeral,
        routes: None,
    }
}

/// `POST /functions/{function_id}/invoke`.
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(function_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<InvocationResult>> {
    let Some(cfg) = state.seed.config.get() else {
        return Err(ApiError::unavailable("the seed API is not enabled on this server").seed());
    };
    let body: Value = read_json(&headers, body, MAX_BODY)
        .await
        .map_err(ApiError::seed)?;
    let call = parse(&body, cfg)?;
    let Ok(_slot) = state.seed.slots.try_acquire() else {
        return Err(ApiError::busy(format!(
            "{MAX_CONCURRENT} ad-hoc sandboxes are already running"
        ))
        .seed());
    };
    let number = state.seed.seq.fetch_add(1, Ordering::Relaxed);
    let spec = spec_for(&call);
    let rev = Arc::new(Revision::command(
        POOL_FUNCTION.to_string(),
        number,
        spec,
        cfg.code_dir.clone(),
        call.argv,
        call.env,
        call.rootfs,
    ));
    let request_id = crate::exec::request_id();
    tracing::debug!(%function_id, %request_id, "seed ad-hoc invoke");
    let inv = Invocation {
        request_id: request_id.clone(),
        function: POOL_FUNCTION.to_string(),
        qualifier: None,
        payload: call.payload,
        client_context: None,
        trace_id: None,
    };
    let (response, logs, error) = match state.scheduler.invoke(&rev, inv).await {
        Ok(out) => match out.function_error {
            None => {
                let mut logs = out.body.clone();
                logs.extend_from_slice(&out.logs);
                (out.body, logs, None)
            }
            Some(fe) => (Vec::new(), out.logs, Some(fe.message)),
        },
        Err(outcome) => {
            let logs = outcome.log_tail.clone().into_bytes();
            (Vec::new(), logs, Some(seed_outcome(outcome)?))
        }
    };
    Ok(Json(InvocationResult {
        request_id,
        response_base64: STANDARD.encode(response),
        logs_base64: STANDARD.encode(logs),
        error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> SeedConfig {
        SeedConfig {
            code_dir: PathBuf::from("/nonexistent"),
            image_root: None,
        }
    }

    fn bad(v: Value) -> (u16, String, String) {
        let e = parse(&v, &cfg()).unwrap_err();
        let f = e.extra.get("field").and_then(|f| f.as_str()).unwrap_or("");
        (e.status.as_u16(), f.to_string(), e.message)
    }

    #[test]
    fn parses_a_full_config() {
        let v = json!({"image": "host", "command": ["cat", "-"], "env_vars": ["A=b=c", "PATH=/x"],
                       "payload_base64": "aGk=", "memory_mb": 256, "timeout_secs": 5});
        let c = parse(&v, &cfg()).unwrap();
        assert_eq!(c.argv, ["cat", "-"]);
        assert_eq!(c.payload, b"hi");
        assert!(c.env.contains(&("A".into(), "b=c".into())));
        assert!(c.env.contains(&("PATH".into(), "/x".into())));
        assert_eq!((c.memory, c.timeout.as_secs()), (256 << 20, 5));
        assert!(c.rootfs.is_none());
    }

    #[test]
    fn names_the_bad_field() {
        for (v, want) in [
            (json!({}), "command"),
            (json!({"command": []}), "command"),
            (json!({"command": [""]}), "command"),
            (json!({"command": "ls"}), "command"),
            (json!({"command": ["ls", 1]}), "command"),
            (
                json!({"command": ["ls"], "env_vars": ["NOEQUALS"]}),
                "env_vars",
            ),
            (json!({"command": ["ls"], "env_vars": ["=v"]}), "env_vars"),
            (
                json!({"command": ["ls"], "payload_base64": "%%%"}),
                "payload_base64",
            ),
            (json!({"command": ["ls"], "image": "relative/dir"}), "image"),
            (
                json!({"command": ["ls"], "image": "/nonexistent-image"}),
                "image",
            ),
            (json!({"command": ["ls"], "image": "/"}), "image"),
            (json!({"command": ["ls"], "memory_mb": 1}), "memory_mb"),
            (
                json!({"command": ["ls"], "timeout_secs": 0}),
                "timeout_secs",
            ),
            (json!([1]), "body"),
        ] {
            let (status, f, msg) = bad(v.clone());
            assert_eq!((status, f.as_str()), (400, want), "{v}: {msg}");
            assert!(msg.contains(want), "{v}: message {msg:?} names {want}");
        }
    }
}
