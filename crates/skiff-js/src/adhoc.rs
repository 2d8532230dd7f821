//! Ad-hoc execution (`POST /execute`): caller-supplied module source run once in a fresh
//! isolate — same globals and restrictions as a deployed function, never cached or reused.

use super::{compile, CompileError, JsSandbox};
use skiff_core::protocol::{ExecMode, Invoke};
use skiff_core::FunctionSpec;
use skiff_sandbox::{Instance, InstanceSpec, InvokeRequest, SandboxError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One ad-hoc run.
#[derive(Debug, Clone)]
pub struct AdHoc {
    /// ES module source.
    pub code: String,
    /// Name of the exported function to call (`default` for `export default`).
    pub export: String,
    /// The handler's argument, as JSON text.
    pub arg_json: String,
    /// The isolate's `env`.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Allocator limit in bytes (within [`crate::MEMORY_MIN`]..=[`crate::MEMORY_MAX`]).
    pub memory: u64,
}

/// Why an ad-hoc run failed: the message and, when known, the JS stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdHocError {
    pub message: String,
    pub stack: String,
}

impl AdHocError {
    /// Splits `"Type: message\n    at …"` into the message (without the type) and the
    /// whole text as the stack.
    fn from_text(text: &str) -> AdHocError {
        let first = text.lines().next().unwrap_or("").trim();
        let message = match first.split_once(": ") {
            Some((ty, rest)) if is_error_name(ty) => rest.to_string(),
            _ => first.to_string(),
        };
        AdHocError {
            message,
            stack: text.trim_end().to_string(),
        }
    }
}

fn is_error_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.ends_with("Error")
}

/// Runs `job` in a fresh isolate and answers the export's return value as JSON text.
/// Syntax errors, a missing export, a throw or rejection, the timeout and the memory limit
/// are all [`AdHocError`]s; the isolate is stopped afterwards in every case.
pub async fn execute(job: AdHoc) -> Result<String, AdHocError> {
    let AdHoc {
        code,
        export,
        arg_json,
        env,
        timeout,
        memory,
    } = job;
    let bytecode = tokio::task::spawn_blocking(move || compile("handler.js", &code))
        .await
        .map_err(|e| AdHocError::from_text(&format!("Error: compiler failed: {e}")))?
        .map_err(|e| match e {
            CompileError::Syntax(t) => AdHocError::from_text(&t),
            e => AdHocError::from_text(&e.to_string()),
        })?;
    let mut spec = FunctionSpec::from_yaml("name: execute\nruntime: js\nhandler: handler.js\n")
        .map_err(|e| AdHocError::from_text(&e.to_string()))?;
    spec.memory = memory;
    spec.timeout = timeout;
    // Ad-hoc code has no owner whose network policy could allow `fetch`.
    spec.network = skiff_core::Network::None;
    let id = uuid::Uuid::new_v4().to_string();
    let inst = JsSandbox::new()
        .start_isolate(
            InstanceSpec {
                instance_id: format!("execute-{id}"),
                function: "execute".into(),
                revision: 0,
                spec,
                code_dir: Default::default(),
                env,
                exec_mode: ExecMode::Command,
                argv: vec![],
                rootfs: None,
                workspace: None,
            },
            Some(Arc::new(bytecode)),
            export,
        )
        .await
        .map_err(|e| sandbox_error(e, timeout))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let req = InvokeRequest {
        invoke: Invoke {
            id,
            deadline_ms: (now + timeout).as_millis() as u64,
            function_arn: "arn:skiff:execute".into(),
            trace_id: String::new(),
            client_context: None,
            cognito_identity: None,
        },
        payload: arg_json.into_bytes(),
    };
    // The isolate interrupts itself shortly after the deadline; this bounds the wait anyway.
    let result = tokio::time::timeout(timeout + Duration::from_secs(2), inst.invoke(req)).await;
    inst.stop().await;
    let result = match result {
        Ok(r) => r.map_err(|e| sandbox_error(e, timeout))?,
        Err(_) => return Err(timed_out(timeout)),
    };
    let body = String::from_utf8_lossy(&result.body).into_owned();
    if result.error_type.is_none() {
        return Ok(body);
    }
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let ty = doc["errorType"].as_str().unwrap_or("Error");
    let message = doc["errorMessage"].as_str().unwrap_or("unknown error");
    let mut stack = format!("{ty}: {message}");
    for l in doc["stackTrace"].as_array().into_iter().flatten() {
        stack.push_str("\n    ");
        stack.push_str(l.as_str().unwrap_or(""));
    }
    Err(AdHocError {
        message: message.to_string(),
        stack,
    })
}

fn timed_out(timeout: Duration) -> AdHocError {
    let message = format!(
        "Execution timed out after {} seconds",
        timeout.as_secs_f64()
    );
    AdHocError {
        stack: format!("TimeoutError: {message}"),
        message,
    }
}

fn sandbox_error(e: SandboxError, timeout: Duration) -> AdHocError {
    match e {
        SandboxError::OutOfMemory { limit_mb, .. } => {
            let message = format!("Out of memory: the isolate exceeded its {limit_mb} MB limit");
            AdHocError {
                stack: format!("RangeError: {message}"),
                message,
            }
        }
        SandboxError::Crashed { message, .. } if message.contains("interrupted") => {
            timed_out(timeout)
        }
        SandboxError::Crashed { message, .. } => {
            let text = message
                .strip_prefix("the JS module failed to initialise: ")
                .unwrap_or(&message);
            if text.contains("did not finish within the timeout") {
                return timed_out(timeout);
            }
            AdHocError::from_text(text)
        }
        e => AdHocError::from_text(&e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(code: &str, export: &str) -> AdHoc {
        AdHoc {
            code: code.into(),
            export: export.into(),
            arg_json: r#"{"method":"POST","body":"hi"}"#.into(),
            env: vec![("K".into(), "v".into())],
            timeout: Duration::from_secs(1),
            memory: crate::MEMORY_MIN,
        }
    }

    #[tokio::test]
    async fn execute_success_and_failures() {
        let ok = execute(job(
            "export async function main(req) { return { statusCode: 201, body: req.method + env.K }; }",
            "main",
        ))
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(v, serde_json::json!({"statusCode": 201, "body": "POSTv"}));

        let e = execute(job("export default (req) => {", "default"))
            .await
            .unwrap_err();
        assert!(e.stack.starts_with("SyntaxError"), "{e:?}");

        let e = execute(job("export default () => 1;", "nope"))
            .await
            .unwrap_err();
        assert!(e.message.contains("`nope`"), "{e:?}");

        let e = execute(job(
            "function inner() { throw new RangeError('boom'); }\nexport default () => inner();",
            "default",
        ))
        .await
        .unwrap_err();
        assert_eq!(e.message, "boom");
        assert!(
            e.stack.starts_with("RangeError: boom") && e.stack.contains("inner"),
            "{e:?}"
        );

        let e = execute(job("export default () => { for (;;) {} };", "default"))
            .await
            .unwrap_err();
        assert!(e.message.contains("timed out"), "{e:?}");

        // A generous timeout: under load the hog must still reach the memory limit first.
        let e = execute(AdHoc {
            timeout: Duration::from_secs(20),
            ..job(
                "export default () => { const a = []; for (;;) a.push('x'.repeat(1 << 20) + a.length); };",
                "default",
            )
        })
        .await
        .unwrap_err();
        assert!(e.message.contains("Out of memory"), "{e:?}");
    }
}
