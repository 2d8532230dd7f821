//! Publish blockers: why a revision cannot be promoted to serve traffic. A revision with
//! blockers can be stored (`promote=false`) and inspected, but no alias may point at it and it
//! is never started. Codes follow Sandbox0's service model, mapped onto `function.yaml`.

use crate::spec::{FunctionSpec, Mode, Runtime, SandboxKind};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};

/// One reason a revision is not publishable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// Stable code: `not_public`, `missing_runtime`, `manual_runtime`, `missing_command`
    /// (`missing_warm_process_name` does not arise: the handler is the process).
    pub code: &'static str,
    /// What to change, naming the `function.yaml` field.
    pub message: String,
}

impl Blocker {
    /// Whether the revision could still run for direct (non-HTTP) invocations.
    pub fn allows_invoke(&self) -> bool {
        self.code == "not_public"
    }
}

static WASM_AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Declares whether this server runs `runtime: wasm` (set once at startup by the server when
/// its Wasm tier is compiled in).
pub fn set_wasm_available(available: bool) {
    WASM_AVAILABLE.store(available, Ordering::Relaxed);
}

/// The blockers of a revision with this spec on this server (empty = publishable).
pub fn blockers(spec: &FunctionSpec) -> Vec<Blocker> {
    blockers_with(spec, WASM_AVAILABLE.load(Ordering::Relaxed))
}

/// [`blockers`] for a server that does (`wasm`) or does not run `runtime: wasm`.
pub fn blockers_with(spec: &FunctionSpec, wasm: bool) -> Vec<Blocker> {
    let mut out = Vec::new();
    if spec.routes.as_ref().is_some_and(Vec::is_empty) {
        out.push(Blocker {
            code: "not_public",
            message: "routes: is empty, so no request path reaches the function (omit `routes` \
                      for the open default route `/`)"
                .into(),
        });
    }
    if spec.runtime == Runtime::Wasm && !wasm {
        out.push(Blocker {
            code: "missing_runtime",
            message: format!(
                "runtime: `{}` is not available on this server (available: python3, node, \
                 provided, command, http, js)",
                spec.runtime
            ),
        });
    }
    // js and wasm run in-process; `sandbox` applies to the process tiers only.
    if spec.sandbox != SandboxKind::Native && !matches!(spec.runtime, Runtime::Js | Runtime::Wasm) {
        out.push(Blocker {
            code: "missing_runtime",
            message: format!(
                "sandbox: `{}` is not available on this server (available: native)",
                spec.sandbox
            ),
        });
    }
    if !matches!(spec.mode, Mode::Warm | Mode::Ephemeral) {
        out.push(Blocker {
            code: "manual_runtime",
            message: format!(
                "mode: `{}` instances cannot be started on demand by this server yet \
                 (available: warm, ephemeral)",
                spec.mode
            ),
        });
    }
    if spec.handler.trim().is_empty() {
        out.push(Blocker {
            code: "missing_command",
            message: format!(
                "handler: runtime `{}` needs the command that starts the function",
                spec.runtime
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(yaml: &str) -> Vec<&'static str> {
        blockers(&FunctionSpec::from_yaml(yaml).unwrap())
            .into_iter()
            .map(|b| b.code)
            .collect()
    }

    #[test]
    fn blockers_by_spec() {
        assert!(codes("name: a\nruntime: python3\n").is_empty());
        assert!(codes("name: a\nruntime: http\nhandler: ./server\n").is_empty());
        assert!(codes("name: a\nruntime: js\nhandler: index.js\n").is_empty());
        assert_eq!(codes("name: a\nruntime: http\n"), ["missing_command"]);
        assert_eq!(
            codes("name: a\nruntime: python3\nroutes: []\n"),
            ["not_public"]
        );
        assert_eq!(
            codes("name: a\nruntime: wasm\nhandler: app.wasm\n"),
            ["missing_runtime"]
        );
        let wasm = FunctionSpec::from_yaml("name: a\nruntime: wasm\nhandler: app.wat\n").unwrap();
        assert!(blockers_with(&wasm, true).is_empty());
        assert_eq!(
            codes("name: a\nruntime: python3\nmode: persistent\n"),
            ["manual_runtime"]
        );
        let b =
            blockers(&FunctionSpec::from_yaml("name: a\nruntime: python3\nroutes: []\n").unwrap());
        assert!(b[0].allows_invoke());
        assert!(b[0].message.starts_with("routes:"));
    }
}
