//! The microVM tier: each instance is a QEMU `microvm` guest (virtio-mmio devices, no PCI, no
//! firmware tables beyond ACPI) booted from a guest image built from Debian packages
//! ([`image`]): a cloud kernel, a small initramfs that loads the virtio modules and mounts the
//! disks, and a read-only ext4 root with the Skiff agent and the runtimes. The agent is the
//! guest's init; it talks to the host over a virtio-serial port backed by a unix socket pair,
//! with the same framed protocol as the other process tiers, and builds the same sandbox
//! inside the guest (tmpfs root, read-only binds, sized `/tmp`, uid 10001, seccomp).
//!
//! Acceleration is KVM where the host has working hardware virtualisation and TCG software
//! emulation otherwise ([`Accel::detect`]). QEMU runs in a host cgroup sized to the guest's
//! memory plus QEMU's own overhead, so a runaway guest cannot take the host down; inside, the
//! guest kernel's OOM killer is the function's memory limit.

pub mod image;
mod qmp;

use crate::native::cgroup::CgroupRoot;
use crate::native::net::find_in_path;
use crate::native::{
    etc_files, path_str, system_binds, valid_instance_id, HttpTarget, NativeInstance,
};
use crate::tunnel::HttpConn;
use crate::{Instance, InstanceSpec, InvokeRequest, InvokeResult, Sandbox, SandboxError};
use async_trait::async_trait;
use skiff_core::launch::{HTTP_PORT, RUNTIME_API_PORT, RUNTIME_DIR, TASK_ROOT};
use skiff_core::protocol::{AgentConfig, Bind, ExecMode, Frame, Kind, VmResume};
use skiff_core::{FunctionSpec, Mode, Network};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (the Tiny Code Generator): slower, works everywhere.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// KVM when `/dev/kvm` opens, answers API version 12 and is not the nested "PVM" flavour
    /// (`kvm_pvm`, on which stock guest kernels fail); TCG otherwise. Returns the reason too.
    pub fn detect() -> (Accel, String) {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                Accel::Tcg,
                "/dev/kvm is the nested PVM flavour (kvm_pvm), which stock guest kernels cannot use".into(),
            );
        }
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(f) => f,
            Err(e) => return (Accel::Tcg, format!("/dev/kvm: {e}")),
        };
        const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
        // SAFETY: an argument-less ioctl on an fd we own.
        let v = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), KVM_GET_API_VERSION) };
        if v != 12 {
            return (Accel::Tcg, format!("/dev/kvm answers API version {v}"));
        }
        (Accel::Kvm, "/dev/kvm works".into())
    }
}

/// Configuration of the microVM tier.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    pub accel: Accel,
    /// The agent executable put into the guest image (the `skiff` binary).
    pub agent_exe: PathBuf,
    /// Host directory with Skiff's runtime bootstraps (copied into the image).
    pub runtime_dir: PathBuf,
    /// Cache of guest images (`<data>/images`); several servers may share one.
    pub image_dir: PathBuf,
    /// A `linux-image-*-cloud-amd64` package to take the kernel from instead of
    /// downloading one (`None`: the cached or downloaded package).
    pub kernel_deb: Option<PathBuf>,
    /// State directory (`<data>/run/microvm`): per-instance sockets, code disks.
    pub state_dir: PathBuf,
    /// Unprivileged uid/gid functions run as inside the guest.
    pub uid: u32,
    pub gid: u32,
    /// Guest memory on top of the function's `memory`: the guest kernel, the agent and the
    /// page cache of the root image.
    pub guest_overhead: u64,
    /// Host memory on top of the guest's: QEMU itself and, under TCG, its code cache.
    pub host_overhead: u64,
    /// Most host tasks (QEMU threads) per instance.
    pub pids_max: u32,
    /// Most processes and threads of the function inside the guest.
    pub guest_pids_max: u32,
    /// Offer `network: outbound` (a virtio NIC on QEMU's user-mode network stack).
    pub outbound: bool,
    /// The host's TSC frequency in kHz, given to TCG guests (`tsc_early_khz=`): without it
    /// the guest's calibration under emulation is far off and boots stall.
    pub tsc_khz: Option<u64>,
    /// QEMU's `virtiofsd`, which shares a `persistent` function's workspace directory with
    /// its VM (`None`: persistent microVMs are refused).
    pub virtiofsd: Option<PathBuf>,
}

impl MicrovmConfig {
    /// Defaults: QEMU from `$PATH`, detected accelerator, uid/gid 10001, 64 MiB guest and
    /// 160 MiB host overhead, 64 host tasks, 256 guest processes.
    pub fn new(
        agent_exe: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        image_dir: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
    ) -> Self {
        MicrovmConfig {
            qemu: find_in_path("qemu-system-x86_64")
                .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into()),
            accel: Accel::detect().0,
            agent_exe: agent_exe.into(),
            runtime_dir: runtime_dir.into(),
            image_dir: image_dir.into(),
            kernel_deb: None,
            state_dir: state_dir.into(),
            uid: 10001,
            gid: 10001,
            guest_overhead: 64 << 20,
            host_overhead: 160 << 20,
            pids_max: 64,
            guest_pids_max: 256,
            outbound: true,
            tsc_khz: host_tsc_khz(),
            virtiofsd: find_virtiofsd(),
        }
    }

    fn image_config(&self) -> image::ImageConfig {
        image::ImageConfig {
            image_dir: self.image_dir.clone(),
            agent_exe: self.agent_exe.clone(),
            runtime_dir: self.runtime_dir.clone(),
            kernel: match &self.kernel_deb {
                Some(deb) => image::KernelSource::Deb(deb.clone()),
                None => image::KernelSource::Auto,
            },
        }
    }
}

/// QEMU's virtiofsd (Debian: `qemu-system-common` puts it in `/usr/lib/qemu`).
pub fn find_virtiofsd() -> Option<PathBuf> {
    ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_in_path("virtiofsd"))
}

/// The host CPU's frequency in kHz (`cpu MHz` of `/proc/cpuinfo`; the TSC runs at it on
/// the hosts we target).
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The microVM sandbox tier.
pub struct MicrovmSandbox(Arc<Tier>);

struct Tier {
    cfg: MicrovmConfig,
    cgroups: CgroupRoot,
    /// Built (or found in the cache) on first use.
    image: tokio::sync::OnceCell<Arc<image::GuestImage>>,
    /// Read-only ext4 disks of function code, by code directory.
    code_disks: PathBuf,
    /// Per-instance directories.
    vms: PathBuf,
    /// Prefix of this tier's guest RAM files in `/dev/shm` (unique per state directory).
    ram_prefix: String,
    /// A QEMU started ahead for the next restore, by snapshot image ([`Ahead`]).
    ahead: parking_lot::Mutex<HashMap<PathBuf, Ahead>>,
    ahead_seq: std::sync::atomic::AtomicU64,
}

/// A started QEMU process and what it was started with.
struct Spawned {
    inst: NativeInstance,
    pid: libc::pid_t,
    /// The instance's state directory (QMP socket).
    dir: PathBuf,
    machine: SnapshotMeta,
    /// A booted guest's shared RAM file.
    own_ram: PathBuf,
}

/// A QEMU started ahead of demand for the next restore of one snapshot image: waiting with
/// `-incoming defer`, its QMP session open and the migration capabilities set. A restore
/// then costs loading the snapshot, not QEMU's own start (≈ 80 ms here).
struct Ahead {
    spawned: Spawned,
    qmp: qmp::Qmp,
    /// [`Tier::ahead_key`] at start.
    key: String,
    id: String,
}

/// How long a QEMU started ahead waits for a restore before it is stopped.
const AHEAD_IDLE: Duration = Duration::from_secs(60);
/// CPU niceness of a QEMU starting ahead of demand (so it never slows a guest that serves);
/// back to 0 when a restore takes it.
const AHEAD_NICE: libc::c_int = 10;

/// Asks the QEMU listening on `sock` (if any) to quit, waiting at most about a second.
fn quit_leftover(sock: &Path) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        .is_ok()
    {
        tracing::info!(
            "stopping a QEMU left by an earlier server ({})",
            sock.display()
        );
        // Until QEMU closes the monitor (it has quit) or the timeout.
        let mut buf = [0u8; 4096];
        for _ in 0..8 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Sets the niceness of every thread of `pid` (threads have their own).
fn renice_all(pid: libc::pid_t, nice: libc::c_int) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Ok(tid) = t.file_name().to_string_lossy().parse::<libc::id_t>() {
            // SAFETY: setpriority on a thread of our own child.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        }
    }
}

/// Pause after a restore before the next QEMU is started ahead.
const AHEAD_DELAY: Duration = Duration::from_millis(150);

/// Where guest RAM files live: a tmpfs, so guest memory stays memory.
const SHM: &str = "/dev/shm";
/// virtiofsd's vhost-user socket in an instance's state directory.
const VIRTIOFS_SOCKET: &str = "virtiofs.sock";

/// What a snapshot image records besides the migration stream (`state`) and the guest RAM
/// (`ram`): restores must rebuild the very same machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SnapshotMeta {
    guest_mb: u64,
    vcpus: u64,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    code_disk: PathBuf,
    /// The RAM is in the image's `ram` file (else in the migration stream).
    ram_file: bool,
}

impl MicrovmSandbox {
    /// Checks the platform (root, cgroups, QEMU) and prepares the state directories. The
    /// guest image is built on first use ([`MicrovmSandbox::image`]).
    pub fn new(cfg: MicrovmConfig) -> Result<Self, SandboxError> {
        // SAFETY: getter.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Start(
                "the microVM tier needs root (cgroups); run skiff as root".into(),
            ));
        }
        if !cfg.qemu.is_file() {
            return Err(SandboxError::Start(format!(
                "QEMU not found at {} (apt-get install qemu-system-x86)",
                cfg.qemu.display()
            )));
        }
        let cgroups = CgroupRoot::detect().map_err(SandboxError::Start)?;
        let code_disks = cfg.state_dir.join("code");
        let vms = cfg.state_dir.join("vms");
        for d in [&code_disks, &vms, &cfg.image_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| SandboxError::Start(format!("mkdir {}: {e}", d.display())))?;
        }
        // Instances of an earlier server on this state directory that was killed: a QEMU
        // outlives its server (one waiting for a snapshot, or a guest whose agent still
        // waits), so each is told to quit over its QMP socket; then their directories go.
        if let Ok(entries) = std::fs::read_dir(&vms) {
            for e in entries.flatten() {
                quit_leftover(&e.path().join("qmp.sock"));
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let ram_prefix = {
            use sha2::Digest;
            let key = sha2::Sha256::digest(cfg.state_dir.as_os_str().as_encoded_bytes());
            format!("skiff-vm-{}-", hex::encode(&key[..6]))
        };
        if let Ok(entries) = std::fs::read_dir(SHM) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&ram_prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(MicrovmSandbox(Arc::new(Tier {
            cfg,
            cgroups,
            image: tokio::sync::OnceCell::new(),
            code_disks,
            vms,
            ram_prefix,
            ahead: parking_lot::Mutex::new(HashMap::new()),
            ahead_seq: std::sync::atomic::AtomicU64::new(0),
        })))
    }

    /// The configuration this tier runs with.
    pub fn config(&self) -> &MicrovmConfig {
        &self.0.cfg
    }

    /// The guest image, built on first call (seconds; later calls and servers reuse it).
    pub async fn image(&self) -> Result<Arc<image::GuestImage>, SandboxError> {
        self.0.image().await
    }

    /// Platform checks for `skiff doctor`: `(name, ok, detail)`.
    pub fn check(cfg: &MicrovmConfig) -> Vec<(String, bool, String)> {
        let version = std::process::Command::new(&cfg.qemu)
            .arg("--version")
            .stdin(Stdio::null())
            .output();
        let qemu = match version {
            Ok(o) if o.status.success() => (
                true,
                format!(
                    "{} ({}), accelerator {} ({})",
                    cfg.qemu.display(),
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim(),
                    cfg.accel,
                    Accel::detect().1
                ),
            ),
            _ => (
                false,
                format!(
                    "{} not runnable; sandbox: microvm unavailable (apt-get install qemu-system-x86)",
                    cfg.qemu.display()
                ),
            ),
        };
        let mut out = vec![("qemu".to_string(), qemu.0, qemu.1)];
        for (tool, pkg) in [("mkfs.ext4", "e2fsprogs"), ("busybox", "busybox-static")] {
            let found = find_in_path(tool).or_else(|| {
                ["/sbin", "/usr/sbin", "/bin"]
                    .iter()
                    .map(|d| Path::new(d).join(tool))
                    .find(|p| p.is_file())
            });
            out.push(match found {
                Some(p) => (
                    tool.to_string(),
                    true,
                    format!("{} (guest image builds)", p.display()),
                ),
                None => (
                    tool.to_string(),
                    false,
                    format!("not found: guest images cannot be built (apt-get install {pkg})"),
                ),
            });
        }
        out.push(match &cfg.virtiofsd {
            Some(p) => (
                "virtiofsd".into(),
                true,
                format!("{} (mode: persistent workspaces)", p.display()),
            ),
            None => (
                "virtiofsd".into(),
                false,
                "not found: mode: persistent is refused on microVMs (apt-get install \
                 qemu-system-common)"
                    .into(),
            ),
        });
        out
    }

    /// The cgroup directories an instance with this id uses (for tests and diagnostics).
    pub fn instance_cgroup_dirs(&self, instance_id: &str) -> Vec<PathBuf> {
        self.0.cgroups.instance_dirs(instance_id)
    }
}

impl Tier {
    async fn image(&self) -> Result<Arc<image::GuestImage>, SandboxError> {
        self.image
            .get_or_try_init(|| async {
                let cfg = self.cfg.image_config();
                let img = tokio::task::spawn_blocking(move || image::build(&cfg))
                    .await
                    .map_err(|e| SandboxError::Start(format!("image build: {e}")))??;
                if let Some(t) = img.built_in {
                    tracing::info!(
                        "microvm: built guest image {} in {:.1} s",
                        img.dir.display(),
                        t.as_secs_f64()
                    );
                }
                Ok(Arc::new(img))
            })
            .await
            .cloned()
    }

    /// The read-only disk holding `code_dir`, made once per content: the key covers the
    /// directory and every entry's path, size and modification time (store code directories
    /// never change, but a directory given by hand may).
    async fn code_disk(&self, code_dir: &Path) -> Result<PathBuf, SandboxError> {
        let dir = code_dir.to_path_buf();
        let key = tokio::task::spawn_blocking(move || tree_fingerprint(&dir))
            .await
            .map_err(|e| SandboxError::Start(format!("code disk: {e}")))??;
        let disk = self.code_disks.join(format!("{key}.ext4"));
        if !disk.is_file() {
            let (dir, out) = (code_dir.to_path_buf(), disk.clone());
            tokio::task::spawn_blocking(move || image::code_disk(&dir, &out))
                .await
                .map_err(|e| SandboxError::Start(format!("code disk: {e}")))??;
        }
        Ok(disk)
    }

    fn check_spec(&self, spec: &InstanceSpec) -> Result<(), SandboxError> {
        if !valid_instance_id(&spec.instance_id) {
            return Err(SandboxError::Start(format!(
                "invalid instance id {:?}",
                spec.instance_id
            )));
        }
        if spec.spec.network == Network::Outbound && !self.cfg.outbound {
            return Err(SandboxError::Unsupported(
                "network: outbound is turned off for sandbox: microvm on this server".into(),
            ));
        }
        if spec.rootfs.is_some() {
            return Err(SandboxError::Unsupported(
                "root images are not available with sandbox: microvm yet".into(),
            ));
        }
        if spec.workspace.is_some() && self.cfg.virtiofsd.is_none() {
            return Err(SandboxError::Unsupported(
                "mode: persistent with sandbox: microvm needs virtiofsd, which is not \
                 installed (apt-get install qemu-system-common)"
                    .into(),
            ));
        }
        if !spec.code_dir.is_dir() {
            return Err(SandboxError::Start(format!(
                "code directory {} does not exist",
                spec.code_dir.display()
            )));
        }
        Ok(())
    }

    fn agent_config(&self, spec: &InstanceSpec) -> Result<AgentConfig, SandboxError> {
        let mut binds = system_binds();
        binds.push(Bind {
            src: image::GUEST_CODE_DIR.into(),
            dst: TASK_ROOT.into(),
            rw: false,
        });
        binds.push(Bind {
            src: image::GUEST_RUNTIME_DIR.into(),
            dst: RUNTIME_DIR.into(),
            rw: false,
        });
        if spec.workspace.is_some() {
            binds.push(Bind {
                src: image::GUEST_WORKSPACE_DIR.into(),
                dst: crate::WORKSPACE_DIR.into(),
                rw: true,
            });
        }
        let (uid, gid) = (self.cfg.uid, self.cfg.gid);
        Ok(AgentConfig {
            exec_mode: spec.exec_mode,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: TASK_ROOT.to_string(),
            workers: spec.spec.concurrency.max(1),
            runtime_api_port: RUNTIME_API_PORT,
            uid,
            gid,
            hostname: "skiff".to_string(),
            root_dir: image::GUEST_ROOT_DIR.to_string(),
            binds,
            etc_files: etc_files(uid, gid, spec.spec.network == Network::Outbound),
            tmp_bytes: spec.spec.tmp,
            wipe_tmp: matches!(spec.spec.mode, Mode::Warm | Mode::Ephemeral),
            // The initramfs configured the NIC before the agent started.
            wait_for_network: false,
            seccomp: true,
            rootfs: None,
            http_port: HTTP_PORT,
            prebuilt_root: false,
            // A character device: read and written by two blocking threads.
            blocking_channel: true,
            vm: true,
            max_procs: self.cfg.guest_pids_max,
        })
    }

    /// The machine of an instance of `spec` booted from `img`.
    fn machine(
        &self,
        spec: &InstanceSpec,
        img: &image::GuestImage,
        code_disk: PathBuf,
    ) -> SnapshotMeta {
        // One vCPU per 1769 MiB of memory (Lambda's ratio), at least one, at most the host's.
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        SnapshotMeta {
            guest_mb: (spec.spec.memory + self.cfg.guest_overhead).div_ceil(1 << 20),
            vcpus: (spec.spec.memory_mb() / 1769 + 1).min(host_cpus).max(1),
            kernel: img.kernel.clone(),
            initrd: img.initrd.clone(),
            rootfs: img.rootfs.clone(),
            code_disk,
            ram_file: true,
        }
    }

    /// The QEMU command line of an instance: `m` is the machine, `ram` its memory file
    /// (shared: the instance writes it; or private: a restored copy of a snapshot's), and
    /// `incoming` makes QEMU wait for a migration stream instead of booting.
    fn qemu_argv(
        &self,
        spec: &InstanceSpec,
        m: &SnapshotMeta,
        ram: Option<(&Path, bool)>,
        dir: &Path,
        incoming: bool,
    ) -> Result<Vec<String>, SandboxError> {
        let mut append = String::from(
            "console=ttyS0 quiet loglevel=1 rdinit=/init panic=-1 pci=off nomodeset \
             i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on",
        );
        let mut argv = vec![self.cfg.qemu.display().to_string()];
        let mut push = |a: &[&str]| argv.extend(a.iter().map(|s| s.to_string()));
        push(&["-name", &format!("skiff-{}", spec.instance_id)]);
        let mut machine = String::from("microvm,pit=on,pic=on,rtc=on");
        if let Some((file, shared)) = ram {
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                    m.guest_mb,
                    path_str(file)?,
                    if shared { "on" } else { "off" }
                ),
            ]);
            machine.push_str(",memory-backend=mem");
        }
        push(&["-M", &machine]);
        match self.cfg.accel {
            // Some hosts' KVM rejects the guest reading IA32_ARCH_CAPABILITIES.
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
            Accel::Tcg => {
                push(&["-accel", "tcg,tb-size=32"]);
                if let Some(khz) = self.cfg.tsc_khz {
                    append.push_str(&format!(" tsc_early_khz={khz}"));
                }
                // An emulated CPU does not speculate: the guest's Spectre-class mitigations
                // only cost time (about 10 % of a boot here).
                append.push_str(" mitigations=off");
            }
        }
        push(&[
            "-m",
            &format!("{}M", m.guest_mb),
            "-smp",
            &m.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        if spec.workspace.is_some() {
            append.push_str(" skiff.workspace=1");
        }
        push(&["-kernel", &path_str(&m.kernel)?]);
        push(&["-initrd", &path_str(&m.initrd)?]);
        push(&["-append", &append]);
        // The guest console (kernel and agent messages) goes to our stderr pipe.
        push(&["-chardev", "file,id=ser,path=/proc/self/fd/2"]);
        push(&["-serial", "chardev:ser"]);
        for (id, file, serial) in [
            ("root", &m.rootfs, image::ROOT_SERIAL),
            ("code", &m.code_disk, image::CODE_SERIAL),
        ] {
            push(&[
                "-drive",
                &format!(
                    "id={id},file={},format=raw,if=none,readonly=on",
                    path_str(file)?
                ),
                "-device",
                &format!("virtio-blk-device,drive={id},serial={serial}"),
            ]);
        }
        // The agent channel: QEMU's end of our socket pair is its stdin.
        push(&["-device", "virtio-serial-device,max_ports=2"]);
        push(&["-chardev", "socket,id=chan,fd=0"]);
        push(&[
            "-device",
            &format!("virtserialport,chardev=chan,name={}", image::CHANNEL_NAME),
        ]);
        if spec.workspace.is_some() {
            // virtiofsd (started by `launch`) serves the workspace; vhost-user needs the
            // guest's RAM shared, which a booted guest's is, and modern (v2) virtio-mmio
            // devices (microvm's default is legacy).
            push(&["-global", "virtio-mmio.force-legacy=false"]);
            push(&[
                "-chardev",
                &format!(
                    "socket,id=ws,path={}",
                    path_str(&dir.join(VIRTIOFS_SOCKET))?
                ),
                "-device",
                &format!(
                    "vhost-user-fs-device,chardev=ws,tag={}",
                    image::WORKSPACE_TAG
                ),
            ]);
        }
        if spec.spec.network == Network::Outbound {
            push(&["-netdev", "user,id=n0,ipv6=off"]);
            push(&["-device", "virtio-net-device,netdev=n0"]);
        }
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                path_str(&dir.join("qmp.sock"))?
            ),
        ]);
        if incoming {
            push(&["-incoming", "defer"]);
        }
        Ok(argv)
    }

    /// Starts virtiofsd serving the workspace `ws` on the instance's socket in `dir`, and
    /// waits (at most 5 s) for the socket QEMU connects to.
    async fn start_virtiofsd(
        &self,
        dir: &Path,
        ws: &Path,
    ) -> Result<std::process::Child, SandboxError> {
        let bin = self
            .cfg
            .virtiofsd
            .as_ref()
            .ok_or_else(|| SandboxError::Unsupported("virtiofsd is not installed".into()))?;
        let sock = dir.join(VIRTIOFS_SOCKET);
        // Its own namespaces, pivoted into the workspace: it sees nothing else of the host.
        let mut child = std::process::Command::new(bin)
            .arg(format!("--socket-path={}", path_str(&sock)?))
            .args(["-o", &format!("source={}", path_str(ws)?)])
            .args([
                "-o",
                "sandbox=namespace",
                "-o",
                "cache=auto",
                "-o",
                "log_level=err",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| SandboxError::Start(format!("cannot run {}: {e}", bin.display())))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if sock.exists() {
                return Ok(child);
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(SandboxError::Start(format!(
                    "virtiofsd for the workspace {} exited ({st})",
                    ws.display()
                )));
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SandboxError::Start(
                    "virtiofsd did not open its socket within 5 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Boots an instance, or restores it from the snapshot in `image`.
    async fn launch(
        self: &Arc<Self>,
        spec: InstanceSpec,
        image: Option<&Path>,
    ) -> Result<MicrovmInstance, SandboxError> {
        self.check_spec(&spec)?;
        let Some(img) = image else {
            let s = self.spawn(&spec, None, false).await?;
            return Ok(self.instance(spec, s, true));
        };
        if spec.workspace.is_some() {
            return Err(SandboxError::Unsupported(
                "a microVM with a workspace cannot be restored from a snapshot".into(),
            ));
        }
        // A QEMU started ahead for this image, else a new one.
        let t = std::time::Instant::now();
        let (s, mut q, ahead) = match self.take_ahead(&spec, img) {
            Some(a) => {
                renice_all(a.spawned.pid, 0);
                (a.spawned, a.qmp, true)
            }
            None => {
                let s = self.spawn(&spec, Some(img), false).await?;
                match incoming_ready(&s.dir, s.machine.ram_file).await {
                    Ok(q) => (s, q, false),
                    Err(e) => {
                        s.inst.stop().await;
                        return Err(e);
                    }
                }
            }
        };
        let ready_ms = t.elapsed().as_secs_f64() * 1e3;
        let loaded = incoming_load(&mut q, img).await;
        tracing::debug!(
            instance = %spec.instance_id,
            "microvm restore: QEMU ready after {ready_ms:.1} ms (started ahead: {ahead}), \
             snapshot loaded and running after {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        if let Err(e) = loaded {
            s.inst.stop().await;
            return Err(e);
        }
        // The restored agent was idle and initialised when the snapshot was taken; its clock
        // and RNG are the snapshot's until it applies these.
        s.inst.mark_initialized();
        s.inst.send_body(Kind::Resume, resume_body());
        self.start_ahead(&spec, img);
        Ok(self.instance(spec, s, false))
    }

    fn instance(self: &Arc<Self>, spec: InstanceSpec, s: Spawned, booted: bool) -> MicrovmInstance {
        MicrovmInstance {
            tier: self.clone(),
            spec,
            inner: s.inst,
            dir: s.dir,
            machine: s.machine,
            shared_ram: booted.then_some(s.own_ram),
            snapshotting: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts QEMU for `spec` (under `spec.instance_id`): booting, or (`image`) waiting for
    /// that snapshot's migration stream.
    /// `background`: started ahead of demand, at a lower CPU priority.
    async fn spawn(
        self: &Arc<Self>,
        spec: &InstanceSpec,
        image: Option<&Path>,
        background: bool,
    ) -> Result<Spawned, SandboxError> {
        let machine = match image {
            None => {
                let img = self.image().await?;
                let code_disk = self.code_disk(&spec.code_dir).await?;
                self.machine(spec, &img, code_disk)
            }
            Some(dir) => {
                let meta = std::fs::read(dir.join("vm.json")).map_err(|e| {
                    SandboxError::Start(format!("no microVM snapshot in {}: {e}", dir.display()))
                })?;
                let m: SnapshotMeta = serde_json::from_slice(&meta)
                    .map_err(|e| SandboxError::Start(format!("snapshot metadata: {e}")))?;
                for f in [&m.kernel, &m.initrd, &m.rootfs, &m.code_disk] {
                    if !f.is_file() {
                        return Err(SandboxError::Start(format!(
                            "the snapshot needs {}, which is gone (guest image rebuilt?); \
                             take a new snapshot",
                            f.display()
                        )));
                    }
                }
                m
            }
        };
        let id = spec.instance_id.clone();
        let dir = self.vms.join(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| SandboxError::Start(format!("mkdir {}: {e}", dir.display())))?;
        let virtiofsd = match &spec.workspace {
            Some(ws) => match self.start_virtiofsd(&dir, ws).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            },
            None => None,
        };
        // A booted guest's RAM is a shared file we can copy for snapshots; a restored one maps
        // the snapshot's privately (copy on write: restores share its unchanged pages).
        let own_ram = PathBuf::from(SHM).join(format!("{}{id}.ram", self.ram_prefix));
        let ram: Option<(PathBuf, bool)> = match image {
            None => Some((own_ram.clone(), true)),
            Some(img) if machine.ram_file => Some((img.join("ram"), false)),
            Some(_) => None,
        };
        let argv = self.qemu_argv(
            spec,
            &machine,
            ram.as_ref().map(|(p, s)| (p.as_path(), *s)),
            &dir,
            image.is_some(),
        )?;
        let config_frame = match image {
            // A restored agent already has its config.
            Some(_) => Vec::new(),
            None => Frame {
                kind: Kind::Config,
                header: serde_json::to_vec(&self.agent_config(spec)?)
                    .map_err(|e| SandboxError::Start(format!("agent config: {e}")))?,
                body: Vec::new(),
            }
            .encode(),
        };
        let cleanup = {
            let (dir, ram) = (dir.clone(), own_ram.clone());
            let mut virtiofsd = virtiofsd;
            move || {
                if let Some(c) = virtiofsd.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(&ram);
            }
        };
        let m = crate::monitor::launch(
            &self.cgroups,
            &id,
            spec.spec.memory + self.cfg.guest_overhead + self.cfg.host_overhead,
            self.cfg.pids_max,
            &argv,
            false,
            spec.spec.memory_mb(),
            config_frame,
            "QEMU",
            cleanup,
        )
        .await?;
        if background {
            // Before QEMU starts its threads (they inherit it), while it loads its libraries.
            // SAFETY: setpriority on our own child.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, m.pid as libc::id_t, AHEAD_NICE) };
        }
        let inst = m
            .inst
            .with_http((spec.exec_mode == ExecMode::Http).then_some(HttpTarget::Tunnel));
        Ok(Spawned {
            inst,
            pid: m.pid,
            dir,
            machine,
            own_ram,
        })
    }

    /// What a QEMU started ahead must match to serve a restore of `spec` from `img`: the
    /// machine comes from the image; the rest of the command line from the spec. The RAM
    /// file's identity guards against an image rebuilt in place.
    fn ahead_key(spec: &InstanceSpec, img: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let ram = std::fs::metadata(img.join("ram")).ok();
        let state = std::fs::metadata(img.join("state")).ok()?;
        Some(format!(
            "{:?} {:?} {} {:?} {:?} {}",
            spec.spec.network,
            spec.exec_mode,
            spec.spec.memory,
            ram.map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec())),
            (state.dev(), state.ino()),
            state.mtime_nsec()
        ))
    }

    /// The QEMU started ahead for restores of `img`, if it fits `spec`.
    fn take_ahead(&self, spec: &InstanceSpec, img: &Path) -> Option<Ahead> {
        let key = Self::ahead_key(spec, img)?;
        let a = self.ahead.lock().remove(img)?;
        // One that does not fit is dropped (its Drop stops QEMU).
        (a.key == key && a.spawned.inst.is_alive()).then_some(a)
    }

    /// Starts (in the background) a QEMU for the next restore of `img`, unless one is there.
    /// It waits at most [`AHEAD_IDLE`], then stops: only images restored recently keep one.
    fn start_ahead(self: &Arc<Self>, spec: &InstanceSpec, img: &Path) {
        let Some(key) = Self::ahead_key(spec, img) else {
            return;
        };
        if self.ahead.lock().contains_key(img) {
            return;
        }
        let seq = self
            .ahead_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Named after the function's instances (`<function>-<revision>-…`), so that it is
        // recognisable in process and cgroup listings.
        let base = spec
            .instance_id
            .rsplit_once('-')
            .map_or(spec.instance_id.as_str(), |(b, _)| b);
        let mut spec = spec.clone();
        spec.instance_id = format!("{base}-a{seq}");
        let (tier, img) = (self.clone(), img.to_path_buf());
        tokio::spawn(async move {
            // Not while the restore that asked for it answers its first request (QEMU's start
            // takes CPU time that request needs).
            tokio::time::sleep(AHEAD_DELAY).await;
            if tier.ahead.lock().contains_key(&img) {
                return;
            }
            let Ok(s) = tier.spawn(&spec, Some(&img), true).await else {
                return;
            };
            let qmp = match incoming_ready(&s.dir, s.machine.ram_file).await {
                Ok(q) => q,
                Err(_) => return s.inst.stop().await,
            };
            let id = spec.instance_id.clone();
            let a = Ahead {
                spawned: s,
                qmp,
                key,
                id: id.clone(),
            };
            let lost = {
                let mut map = tier.ahead.lock();
                if map.contains_key(&img) {
                    Some(a)
                } else {
                    map.insert(img.clone(), a);
                    None
                }
            };
            if let Some(a) = lost {
                return a.spawned.inst.stop().await;
            }
            tokio::time::sleep(AHEAD_IDLE).await;
            let expired = {
                let mut map = tier.ahead.lock();
                match map.get(&img) {
                    Some(a) if a.id == id => map.remove(&img),
                    _ => None,
                }
            };
            if let Some(a) = expired {
                a.spawned.inst.stop().await;
            }
        });
    }
}

/// Feeds a QEMU started with `-incoming defer` the migration stream of the snapshot in
/// `image` and waits until the guest runs.
/// Connects to a QEMU started with `-incoming defer` and sets the migration capabilities the
/// snapshot was taken with: ready for [`incoming_load`].
async fn incoming_ready(dir: &Path, ram_file: bool) -> Result<qmp::Qmp, SandboxError> {
    let mut q = qmp::Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10)).await?;
    if ram_file {
        q.capabilities(&["x-ignore-shared"]).await?;
    }
    Ok(q)
}

/// Loads the snapshot in `image` (device state; the RAM is mapped from its file) and waits
/// until the guest runs.
async fn incoming_load(q: &mut qmp::Qmp, image: &Path) -> Result<(), SandboxError> {
    q.execute(
        "migrate-incoming",
        Some(serde_json::json!({
            "uri": format!("exec:cat {}", shell_quote(&image.join("state"))?)
        })),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = q.execute("query-status", None).await?;
        if st.get("running").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(());
        }
        let status = st
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if status == "paused" || status == "postmigrate" {
            // Loaded but not started (older QEMUs): start it.
            q.execute("cont", None).await?;
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SandboxError::Crashed {
                message: format!("the snapshot did not load in time (QEMU status {status})"),
                log_tail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `path` quoted for the shell QEMU runs `exec:` migrations with.
fn shell_quote(path: &Path) -> Result<String, SandboxError> {
    let s = path_str(path)?;
    Ok(format!("'{}'", s.replace('\'', "'\\''")))
}

/// A hex digest of a directory tree's paths, sizes and modification times.
fn tree_fingerprint(root: &Path) -> Result<String, SandboxError> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut h = sha2::Sha256::new();
    h.update(root.as_os_str().as_encoded_bytes());
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| SandboxError::Start(format!("code directory {}: {e}", dir.display())))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            seen += 1;
            if seen > 200_000 {
                return Err(SandboxError::Start(format!(
                    "code directory {} has too many entries",
                    root.display()
                )));
            }
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            h.update(e.path().as_os_str().as_encoded_bytes());
            h.update(md.size().to_le_bytes());
            h.update(md.mtime().to_le_bytes());
            h.update(md.mtime_nsec().to_le_bytes());
            h.update(md.mode().to_le_bytes());
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// A [`Kind::Resume`] body for a restored guest: the host's clock and fresh entropy.
fn resume_body() -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut seed = [0u8; VmResume::SEED_LEN];
    // SAFETY: getrandom into a valid buffer of that length.
    unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    VmResume::encode(now, &seed)
}

/// Copies the allocated parts of `src` into a new sparse file `dst` (guest RAM files are
/// mostly holes).
fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = std::fs::File::create(dst)?;
    to.set_len(len)?;
    let fi = from.as_raw_fd();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on our own fds.
        let data = unsafe { libc::lseek(fi, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // only a hole is left
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        copy_range(&from, &to, data as u64, (end - data) as u64)?;
        pos = end;
    }
    Ok(())
}

/// Copies `len` bytes at `off` from `from` to the same offset of `to` (in the kernel when
/// both are on one filesystem, else through a buffer).
fn copy_range(from: &std::fs::File, to: &std::fs::File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out) = (off as i64, off as i64);
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: copy_file_range between our own fds with valid offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        if n > 0 {
            left -= n as usize;
            continue;
        }
        if n == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS)
            | Some(libc::EOPNOTSUPP) => break,
            _ => return Err(e),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = off_in as u64;
    while left > 0 {
        let n = left.min(buf.len());
        from.read_exact_at(&mut buf[..n], pos)?;
        to.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
        left -= n;
    }
    Ok(())
}

/// A running microVM.
pub struct MicrovmInstance {
    tier: Arc<Tier>,
    spec: InstanceSpec,
    inner: NativeInstance,
    dir: PathBuf,
    machine: SnapshotMeta,
    /// The guest's RAM file when it is shared (booted guests); restored guests map a
    /// snapshot's privately.
    shared_ram: Option<PathBuf>,
    /// One snapshot at a time.
    snapshotting: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Instance for MicrovmInstance {
    fn id(&self) -> &str {
        &self.spec.instance_id
    }

    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, SandboxError> {
        self.inner.invoke(req).await
    }

    async fn stop(&self) {
        self.inner.stop().await
    }

    fn is_alive(&self) -> bool {
        self.inner.is_alive()
    }

    async fn initialized(&self, within: Duration) -> Result<(), SandboxError> {
        self.inner.wait_initialized(within).await
    }

    fn memory_usage(&self) -> Option<u64> {
        self.inner.memory_usage()
    }

    fn memory_peak(&self) -> Option<u64> {
        self.inner.memory_peak()
    }

    fn take_output(&self) -> Vec<u8> {
        self.inner.take_output()
    }

    async fn connect_http(&self, ready_within: Duration) -> Result<HttpConn, SandboxError> {
        self.inner.connect_http(ready_within).await
    }

    /// Pauses the guest, saves its device state (QEMU migration to a file) and its RAM (a
    /// sparse copy of the shared RAM file, or inside the stream for a restored guest), then
    /// continues it (`leave_running`) or stops it. No quiesce is needed: the guest kernel's
    /// sockets and processes are saved as they are.
    async fn checkpoint(
        &self,
        image: &Path,
        init_within: Duration,
        leave_running: bool,
    ) -> Result<(), SandboxError> {
        if self.spec.workspace.is_some() {
            return Err(SandboxError::Unsupported(
                "a persistent microVM cannot be snapshotted: QEMU cannot migrate its \
                 virtiofs workspace share"
                    .into(),
            ));
        }
        let _one = self.snapshotting.lock().await;
        self.inner.wait_initialized(init_within).await?;
        let _ = &self.tier;
        std::fs::create_dir_all(image)?;
        for f in ["vm.json", "state", "ram"] {
            match std::fs::remove_file(image.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        let mut q = qmp::Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_secs(5)).await?;
        q.execute("stop", None).await?;
        let saved = async {
            if self.shared_ram.is_some() {
                q.capabilities(&["x-ignore-shared"]).await?;
            }
            q.execute(
                "migrate",
                Some(serde_json::json!({
                    "uri": format!("exec:cat > {}", shell_quote(&image.join("state"))?)
                })),
            )
            .await?;
            q.wait_migration(Duration::from_secs(60)).await?;
            if let Some(ram) = &self.shared_ram {
                let (src, dst) = (ram.clone(), image.join("ram"));
                tokio::task::spawn_blocking(move || copy_sparse(&src, &dst))
                    .await
                    .map_err(|e| SandboxError::Io(std::io::Error::other(e)))??;
            }
            let meta = SnapshotMeta {
                ram_file: self.shared_ram.is_some(),
                ..self.machine.clone()
            };
            std::fs::write(
                image.join("vm.json"),
                serde_json::to_vec(&meta).map_err(std::io::Error::other)?,
            )?;
            Ok::<(), SandboxError>(())
        }
        .await;
        if leave_running && saved.is_ok() {
            q.execute("cont", None).await?;
        } else {
            drop(q);
            self.inner.stop().await;
        }
        saved
    }
}

#[async_trait]
impl Sandbox for MicrovmSandbox {
    async fn start(&self, spec: InstanceSpec) -> Result<Arc<dyn Instance>, SandboxError> {
        Ok(Arc::new(self.0.launch(spec, None).await?))
    }

    async fn restore(
        &self,
        spec: InstanceSpec,
        image: &Path,
    ) -> Result<Arc<dyn Instance>, SandboxError> {
        Ok(Arc::new(self.0.launch(spec, Some(image)).await?))
    }

    async fn prepare(
        &self,
        spec: &FunctionSpec,
        code_dir: &Path,
    ) -> Result<ExecMode, SandboxError> {
        if code_dir.is_dir() {
            self.0.code_disk(code_dir).await?;
        }
        Ok(skiff_core::launch::program(spec).0)
    }

    async fn shutdown(&self) {
        let ahead: Vec<Ahead> = self.0.ahead.lock().drain().map(|(_, a)| a).collect();
        for a in ahead {
            a.spawned.inst.stop().await;
        }
        self.0.cgroups.remove_server_dirs();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn copy_sparse_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("ram"), dir.path().join("copy"));
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        copy_sparse(&src, &dst).unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        // Holes stay holes: far less is allocated than the file's length.
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 8 << 20, "{blocks} bytes allocated");
    }

    #[test]
    fn tree_fingerprint_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), "x = 1\n").unwrap();
        let one = tree_fingerprint(dir.path()).unwrap();
        assert_eq!(one, tree_fingerprint(dir.path()).unwrap());
        std::fs::create_dir(dir.path().join("pkg")).unwrap();
        std::fs::write(dir.path().join("pkg/b.py"), "y = 2\n").unwrap();
        let two = tree_fingerprint(dir.path()).unwrap();
        assert_ne!(one, two);
        std::fs::write(dir.path().join("pkg/b.py"), "y = 22\n").unwrap();
        assert_ne!(two, tree_fingerprint(dir.path()).unwrap());
    }

    #[test]
    fn resume_body_carries_clock_and_fresh_seed() {
        let (a, b) = (resume_body(), resume_body());
        let (ta, sa) = VmResume::decode(&a).unwrap();
        let (tb, sb) = VmResume::decode(&b).unwrap();
        assert!(tb >= ta && ta > 1_700_000_000_000_000_000);
        assert_ne!(sa, sb);
    }

    #[test]
    fn a_qemu_started_ahead_fits_only_the_same_spec_and_snapshot_files() {
        let spec = |network: &str| InstanceSpec {
            instance_id: "f-1-x-1".into(),
            function: "f".into(),
            revision: 1,
            spec: FunctionSpec::from_yaml(&format!(
                "name: f\nruntime: python3\nnetwork: {network}\n"
            ))
            .unwrap(),
            code_dir: "/nonexistent".into(),
            env: Vec::new(),
            exec_mode: ExecMode::RuntimeApi,
            argv: Vec::new(),
            rootfs: None,
            workspace: None,
        };
        let img = tempfile::tempdir().unwrap();
        assert!(
            Tier::ahead_key(&spec("none"), img.path()).is_none(),
            "no snapshot"
        );
        std::fs::write(img.path().join("state"), b"s").unwrap();
        std::fs::write(img.path().join("ram"), b"r").unwrap();
        let key = Tier::ahead_key(&spec("none"), img.path()).unwrap();
        assert_eq!(Tier::ahead_key(&spec("none"), img.path()).unwrap(), key);
        assert_ne!(Tier::ahead_key(&spec("outbound"), img.path()).unwrap(), key);
        // A snapshot rebuilt in place (new files under the same names) is another snapshot.
        std::fs::remove_file(img.path().join("ram")).unwrap();
        std::fs::write(img.path().join("ram.new"), b"r").unwrap();
        std::fs::rename(img.path().join("ram.new"), img.path().join("ram")).unwrap();
        assert_ne!(Tier::ahead_key(&spec("none"), img.path()).unwrap(), key);
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(
            shell_quote(Path::new("/a b/it's")).unwrap(),
            r"'/a b/it'\''s'"
        );
    }
}
