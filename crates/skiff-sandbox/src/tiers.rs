//! [`Tiers`]: one [`Sandbox`] that hands each instance to the tier its runtime and `sandbox:`
//! need, so the scheduler never knows which tier runs a revision.

use crate::{Instance, InstanceSpec, Sandbox, SandboxError};
use async_trait::async_trait;
use skiff_core::protocol::ExecMode;
use skiff_core::{FunctionSpec, Runtime, SandboxKind};
use std::path::Path;
use std::sync::Arc;

/// The tiers of this server: process runtimes go to `native`, `gvisor` or `microvm` (by
/// `sandbox:`), `runtime: js` to `js`, `runtime: wasm` to `wasm`.
pub struct Tiers {
    pub native: Arc<dyn Sandbox>,
    /// The gVisor tier; `None` refuses `sandbox: gvisor` instances.
    pub gvisor: Option<Arc<dyn Sandbox>>,
    /// The microVM tier; `None` refuses `sandbox: microvm` instances.
    pub microvm: Option<Arc<dyn Sandbox>>,
    /// The JS isolate tier; `None` refuses `runtime: js` instances.
    pub js: Option<Arc<dyn Sandbox>>,
    /// The WebAssembly tier; `None` refuses `runtime: wasm` instances.
    pub wasm: Option<Arc<dyn Sandbox>>,
}

#[async_trait]
impl Sandbox for Tiers {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        match spec.spec.runtime {
            Runtime::Js => match &self.js {
                Some(js) => js.start(spec).await,
                None => Err(SandboxError::Unsupported(
                    "runtime js is not available on this server".into(),
                )),
            },
            Runtime::Wasm => match &self.wasm {
                Some(wasm) => wasm.start(spec).await,
                None => Err(SandboxError::Unsupported(
                    "runtime wasm is not available on this server".into(),
                )),
            },
            _ => self.process_tier(spec.spec.sandbox)?.start(spec).await,
        }
    }

    async fn prepare(
        &self,
        spec: &FunctionSpec,
        code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        match (spec.runtime, &self.js, &self.wasm) {
            (Runtime::Js, Some(t), _) | (Runtime::Wasm, _, Some(t)) => {
                t.prepare(spec, code_dir).await
            }
            (Runtime::Js | Runtime::Wasm, _, _) => Err(SandboxError::Unsupported(format!(
                "runtime {} is not available on this server",
                spec.runtime
            ))),
            _ => {
                self.process_tier(spec.sandbox)?
                    .prepare(spec, code_dir)
                    .await
            }
        }
    }

    async fn restore(
        &self,
        spec: InstanceSpec,
        image: &Path,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        self.process_tier(spec.spec.sandbox)?
            .restore(spec, image)
            .await
    }

    async fn shutdown(&self) {
        if let Some(js) = &self.js {
            js.shutdown().await;
        }
        if let Some(wasm) = &self.wasm {
            wasm.shutdown().await;
        }
        if let Some(gvisor) = &self.gvisor {
            gvisor.shutdown().await;
        }
        if let Some(microvm) = &self.microvm {
            microvm.shutdown().await;
        }
        self.native.shutdown().await;
    }
}

impl Tiers {
    /// The process tier for `sandbox:`.
    fn process_tier(&self, kind: SandboxKind) -> Result<&Arc<dyn Sandbox>, SandboxError> {
        match kind {
            SandboxKind::Native => Ok(&self.native),
            SandboxKind::Gvisor => self.gvisor.as_ref().ok_or_else(|| {
                SandboxError::Unsupported(
                    "sandbox gvisor is not available on this server (runsc not found; \
                     apt-get install runsc)"
                        .into(),
                )
            }),
            SandboxKind::Microvm => self.microvm.as_ref().ok_or_else(|| {
                SandboxError::Unsupported(
                    "sandbox microvm is not available on this server (QEMU not found; \
                     apt-get install qemu-system-x86)"
                        .into(),
                )
            }),
        }
    }
}
