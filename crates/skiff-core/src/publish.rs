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
    /// The `function.yaml` field to change (`routes`, `runtime`, `sandbox`, `mode`, `handler`).
    pub field: &'static str,
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
static GVISOR_AVAILABLE: AtomicBool = AtomicBool::new(false);
static MICROVM_AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Declares whether this server runs `runtime: wasm` (set once at startup by the server when
/// its Wasm tier is compiled in).
pub fn set_wasm_available(available: bool) {
    WASM_AVAILABLE.store(available, Ordering::Relaxed);
}

/// Declares whether this server runs `sandbox: gvisor` (set once at startup when `runsc` is
/// usable).
pub fn set_gvisor_available(available: bool) {
    GVISOR_AVAILABLE.store(available, Ordering::Relaxed);
}

/// Declares whether this server runs `sandbox: microvm` (set once at startup when QEMU is
/// usable).
pub fn set_microvm_available(available: bool) {
    MICROVM_AVAILABLE.store(available, Ordering::Relaxed);
}

/// Whether this server runs `sandbox: microvm`.
pub fn microvm_available() -> bool {
    MICROVM_AVAILABLE.load(Ordering::Relaxed)
}

/// Whether this server runs `sandbox: gvisor`.
pub fn gvisor_available() -> bool {
    GVISOR_AVAILABLE.load(Ordering::Relaxed)
}

/// What a server offers beyond the always-present tiers, for [`blockers_on`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Available {
    /// `runtime: wasm` (the Wasm tier is compiled in).
    pub wasm: bool,
    /// `sandbox: gvisor` (`runsc` found).
    pub gvisor: bool,
    /// `sandbox: microvm` (QEMU found).
    pub microvm: bool,
}

/// The blockers of a revision with this spec on this server (empty = publishable).
pub fn blockers(spec: &FunctionSpec) -> Vec<Blocker> {
    blockers_on(
        spec,
        Available {
            wasm: WASM_AVAILABLE.load(Ordering::Relaxed),
            gvisor: gvisor_available(),
            microvm: microvm_available(),
        },
    )
}

/// [`blockers`] for a server that does (`wasm`) or does not run `runtime: wasm`.
pub fn blockers_with(spec: &FunctionSpec, wasm: bool) -> Vec<Blocker> {
    blockers_on(
        spec,
        Available {
            wasm,
            gvisor: gvisor_available(),
            microvm: microvm_available(),
        },
    )
}

/// [`blockers`] for a server offering `available`.
pub fn blockers_on(spec: &FunctionSpec, available: Available) -> Vec<Blocker> {
    let wasm = available.wasm;
    let mut out = Vec::new();
    if spec.routes.as_ref().is_some_and(Vec::is_empty) {
        out.push(Blocker {
            code: "not_public",
            field: "routes",
            message: "routes: is empty, so no request path reaches the function (omit `routes` \
                      for the open default route `/`)"
                .into(),
        });
    }
    if spec.runtime == Runtime::Wasm && !wasm {
        out.push(Blocker {
            code: "missing_runtime",
            field: "runtime",
            message: format!(
                "runtime: `{}` is not available on this server (available: python3, node, \
                 provided, command, http, js)",
                spec.runtime
            ),
        });
    }
    // js and wasm run in-process; `sandbox` applies to the process tiers only.
    let process = !matches!(spec.runtime, Runtime::Js | Runtime::Wasm);
    let sandbox_ok = match spec.sandbox {
        SandboxKind::Native => true,
        SandboxKind::Gvisor => available.gvisor,
        SandboxKind::Microvm => available.microvm,
    };
    if process && !sandbox_ok {
        out.push(Blocker {
            code: "missing_runtime",
            field: "sandbox",
            message: format!(
                "sandbox: `{}` is not available on this server (available: native{}{})",
                spec.sandbox,
                if available.gvisor { ", gvisor" } else { "" },
                if available.microvm { ", microvm" } else { "" }
            ),
        });
    }
    match spec.mode {
        Mode::Warm | Mode::Ephemeral => {}
        Mode::Persistent if !process => out.push(Blocker {
            code: "manual_runtime",
            field: "mode",
            message: format!(
                "mode: `persistent` needs a process runtime (python3, node, provided, command, \
                 http), not `{}`",
                spec.runtime
            ),
        }),
        Mode::Persistent => {}
        Mode::Checkpointed | Mode::Branched => {
            if !process || spec.sandbox == SandboxKind::Native {
                out.push(Blocker {
                    code: "manual_runtime",
                    field: "mode",
                    message: format!(
                        "mode: `{}` restores instances from a memory snapshot, which needs \
                         `sandbox: gvisor` or `microvm` and a process runtime (this function has runtime \
                         `{}`, sandbox `{}`)",
                        spec.mode, spec.runtime, spec.sandbox
                    ),
                });
            }
        }
    }
    if spec.handler.trim().is_empty() {
        out.push(Blocker {
            code: "missing_command",
            field: "handler",
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
        assert!(codes("name: a\nruntime: python3\nmode: persistent\n").is_empty());
        assert_eq!(
            codes("name: a\nruntime: js\nhandler: i.js\nmode: persistent\n"),
            ["manual_runtime"]
        );
        for mode in ["checkpointed", "branched"] {
            let native =
                FunctionSpec::from_yaml(&format!("name: a\nruntime: python3\nmode: {mode}\n"))
                    .unwrap();
            let b = blockers_on(&native, Available::default());
            assert_eq!(b.len(), 1, "{b:?}");
            assert_eq!((b[0].code, b[0].field), ("manual_runtime", "mode"));
            assert!(b[0].message.starts_with("mode:"), "{}", b[0].message);
            assert!(b[0].message.contains("sandbox: gvisor"), "{}", b[0].message);
            let gv = FunctionSpec::from_yaml(&format!(
                "name: a\nruntime: python3\nmode: {mode}\nsandbox: gvisor\n"
            ))
            .unwrap();
            let with_gvisor = Available {
                gvisor: true,
                ..Available::default()
            };
            assert!(blockers_on(&gv, with_gvisor).is_empty());
            // Without runsc the tier is what is missing.
            let b = blockers_on(&gv, Available::default());
            assert_eq!((b.len(), b[0].field), (1, "sandbox"), "{b:?}");
        }
        let gv = FunctionSpec::from_yaml("name: a\nruntime: python3\nsandbox: gvisor\n").unwrap();
        assert_eq!(
            blockers_on(&gv, Available::default())[0].code,
            "missing_runtime"
        );
        assert!(blockers_on(
            &gv,
            Available {
                gvisor: true,
                ..Available::default()
            }
        )
        .is_empty());
        let mv_on = Available {
            microvm: true,
            ..Available::default()
        };
        let pers = FunctionSpec::from_yaml(
            "name: a\nruntime: python3\nsandbox: microvm\nmode: persistent\n",
        )
        .unwrap();
        assert!(blockers_on(&pers, mv_on).is_empty(), "persistent microVMs");
        assert!(blockers_on(
            &FunctionSpec::from_yaml("name: a\nruntime: python3\nsandbox: microvm\n").unwrap(),
            mv_on
        )
        .is_empty());
        let mv = FunctionSpec::from_yaml("name: a\nruntime: python3\nsandbox: microvm\n").unwrap();
        assert_eq!(
            blockers_on(
                &mv,
                Available {
                    wasm: true,
                    gvisor: true,
                    microvm: false,
                }
            )[0]
            .field,
            "sandbox"
        );
        let b =
            blockers(&FunctionSpec::from_yaml("name: a\nruntime: python3\nroutes: []\n").unwrap());
        assert!(b[0].allows_invoke());
        assert!(b[0].message.starts_with("routes:"));
    }
}
