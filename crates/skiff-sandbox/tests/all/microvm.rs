//! The microVM tier for the suite: QEMU `microvm` guests (TCG here) booted from a guest image
//! built once per test binary into the target dir and reused by later runs.

use super::*;
use skiff_sandbox::{MicrovmConfig, MicrovmSandbox};

/// The microVM tier for the suite, or why it is not tested (no QEMU).
pub(crate) fn tier(
    agent: &Path,
    runtime: &Path,
    uid: u32,
) -> Result<(MicrovmSandbox, tempfile::TempDir), String> {
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR")).join("microvm-images");
    let mut cfg = MicrovmConfig::new(agent, state.path(), images, runtime);
    if !cfg.qemu.is_file() {
        return Err(format!(
            "{} not found (apt-get install qemu-system-x86)",
            cfg.qemu.display()
        ));
    }
    cfg.uid = uid;
    cfg.gid = uid;
    let sb = MicrovmSandbox::new(cfg).map_err(|e| e.to_string())?;
    Ok((sb, state))
}
