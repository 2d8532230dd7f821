//! TEMPORARY stub of the contract (the real builder lands from the `image` branch).
use crate::SandboxError;
use std::path::{Path, PathBuf};

pub struct ImageConfig {
    pub image_dir: PathBuf,
    pub agent_exe: PathBuf,
    pub runtime_dir: PathBuf,
    pub kernel: KernelSource,
}
pub enum KernelSource {
    Auto,
    Deb(PathBuf),
    Dir(PathBuf),
}
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub kernel_version: String,
    pub hash: String,
    pub built_in: Option<std::time::Duration>,
}
pub const ROOT_SERIAL: &str = "skiff-root";
pub const CODE_SERIAL: &str = "skiff-code";
pub const CHANNEL_NAME: &str = "skiff";
pub const GUEST_AGENT: &str = "/opt/skiff/skiff";
pub const GUEST_RUNTIME_DIR: &str = "/opt/skiff/runtime";
pub const GUEST_ROOT_DIR: &str = "/mnt/root";
pub const GUEST_CODE_DIR: &str = "/mnt/code";
pub fn build(_cfg: &ImageConfig) -> Result<GuestImage, SandboxError> {
    Err(SandboxError::Start("stub".into()))
}
pub fn code_disk(_code_dir: &Path, _out: &Path) -> Result<(), SandboxError> {
    Err(SandboxError::Start("stub".into()))
}
