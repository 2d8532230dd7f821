//! `skiff image build`: builds (or finds in the cache) the microVM guest image.

use anyhow::Result;
use clap::{Args, Subcommand};
use skiff_sandbox::microvm::image::{self, ImageConfig, KernelSource};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build the microVM guest image (kernel, initramfs, root filesystem), or report the
    /// cached one.
    Build(BuildArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// Image cache dir (default: <data-dir>/images).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Use this Debian linux-image .deb instead of downloading linux-image-cloud-amd64.
    #[arg(long, conflicts_with = "kernel_dir")]
    kernel_deb: Option<PathBuf>,
    /// Use this unpacked linux-image package root (boot/vmlinuz-*, lib/modules/<ver>/).
    #[arg(long)]
    kernel_dir: Option<PathBuf>,
    #[arg(long, env = "SKIFF_DATA_DIR", default_value = ".skiff")]
    data_dir: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Build(args) => build(args),
    }
}

fn build(args: BuildArgs) -> Result<()> {
    let runtime_dir = args.data_dir.join("runtimes");
    crate::serve::write_runtimes(&runtime_dir)?;
    let kernel = match (args.kernel_deb, args.kernel_dir) {
        (Some(f), _) => KernelSource::Deb(f),
        (None, Some(d)) => KernelSource::Dir(d),
        (None, None) => KernelSource::Auto,
    };
    let cfg = ImageConfig {
        image_dir: args
            .image_dir
            .unwrap_or_else(|| args.data_dir.join("images")),
        agent_exe: std::env::current_exe()?,
        runtime_dir,
        kernel,
    };
    let img = image::build(&cfg)?;
    let (k, i, r) = img.sizes();
    if args.json {
        let v = serde_json::json!({
            "dir": img.dir,
            "kernel": img.kernel,
            "kernel_bytes": k,
            "initrd": img.initrd,
            "initrd_bytes": i,
            "rootfs": img.rootfs,
            "rootfs_bytes": r,
            "kernel_version": img.kernel_version,
            "hash": img.hash,
            "cached": img.built_in.is_none(),
            "built_in_ms": img.built_in.map(|d| d.as_millis() as u64),
        });
        println!("{v}");
        return Ok(());
    }
    let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
    println!("kernel  {} ({:.1} MiB)", img.kernel.display(), mib(k));
    println!("initrd  {} ({:.1} MiB)", img.initrd.display(), mib(i));
    println!("rootfs  {} ({:.1} MiB)", img.rootfs.display(), mib(r));
    println!("kernel version {}", img.kernel_version);
    println!("hash {}", img.hash);
    match img.built_in {
        Some(d) => println!("built in {:.1} s", d.as_secs_f64()),
        None => println!("cached"),
    }
    Ok(())
}
