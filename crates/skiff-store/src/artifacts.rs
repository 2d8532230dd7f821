//! The content-addressed artifact store: packages (`.tar.zst`) under `artifacts/sha256/`, and
//! their unpacked trees under `code/<sha>/`. Unpacking is hardened against hostile archives.

use crate::error::io_at;
use crate::StoreError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skiff_core::FunctionSpec;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Largest total size of a package's files once unpacked.
pub const MAX_UNPACKED_BYTES: u64 = 250 << 20;
/// Most entries (files, dirs, links) a package may hold.
pub const MAX_ENTRIES: u64 = 100_000;
/// Largest `function.yaml` read from a package.
const MAX_SPEC_BYTES: u64 = 1 << 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// What [`crate::Store::read_spec_from_package`] learned about a package besides its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageInfo {
    /// `function.yaml` as found in the package.
    pub spec_yaml: String,
    /// Number of archive entries (files, directories, links).
    pub entries: u64,
    /// Total size of the files once unpacked.
    pub unpacked_bytes: u64,
}

/// Whether `s` is a lowercase SHA-256 hex digest.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn bad_package(message: impl Into<String>) -> StoreError {
    StoreError::invalid("package", message)
}

fn random_suffix() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// fsyncs a directory so a rename/creation inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Writes `bytes` atomically and durably at `dest` (tmp file in `tmp_dir`, fsync, rename,
/// fsync of the destination directory).
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tmp_dir.join(format!("{name}.{}.part", random_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        f.write_all(bytes).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        drop(f);
        fs::rename(&tmp, dest).map_err(io_at(dest))?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Turns an archive path into a clean relative path; `None` for the archive root itself.
fn safe_rel_path(p: &Path) -> Result<Option<PathBuf>, StoreError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad_package(format!(
                    "entry `{}` contains `..`",
                    p.display()
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad_package(format!(
                    "entry `{}` is an absolute path",
                    p.display()
                )));
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Checks that a symlink at `link` (relative to the root) with `target` stays inside the root,
/// judged lexically.
fn check_symlink_target(link: &Path, target: &Path) -> Result<(), StoreError> {
    let outside = || {
        bad_package(format!(
            "symlink `{}` points outside the package (-> {})",
            link.display(),
            target.display()
        ))
    };
    if target.as_os_str().is_empty() {
        return Err(bad_package(format!(
            "symlink `{}` has an empty target",
            link.display()
        )));
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .into_iter()
        .flat_map(|p| p.components())
        .filter_map(|c| match c {
            Component::Normal(x) => Some(x),
            _ => None,
        })
        .collect();
    for c in target.components() {
        match c {
            Component::Normal(x) => depth.push(x),
            Component::CurDir => {}
            Component::ParentDir => {
                depth.pop().ok_or_else(outside)?;
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    Ok(())
}

/// Makes sure every directory of `rel` (itself included) exists under `root` as a real
/// directory (never through a symlink), creating missing ones with mode 0755.
fn ensure_dirs(root: &Path, rel: &Path) -> Result<(), StoreError> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(bad_package(format!(
                    "entry path `{}` goes through a symlink",
                    rel.display()
                )));
            }
            Ok(_) => {
                return Err(bad_package(format!(
                    "`{}` is both a file and a directory",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(io_at(&cur))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(io_at(&cur))?;
            }
            Err(e) => return Err(io_at(&cur)(e)),
        }
    }
    Ok(())
}

/// Removes whatever non-directory sits at `path` so a new entry can take its place.
fn clear_slot(path: &Path, rel: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Err(bad_package(format!(
            "`{}` is both a directory and a file",
            rel.display()
        ))),
        Ok(_) => fs::remove_file(path).map_err(io_at(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Result of walking an archive.
struct Scan {
    entries: u64,
    bytes: u64,
    spec_yaml: Option<String>,
}

/// Walks a tar.zst stream, validating every entry; extracts into `dest` when given (which
/// must be an existing empty directory).
fn scan_archive<R: Read>(reader: R, dest: Option<&Path>) -> Result<Scan, StoreError> {
    let not_archive = |e: io::Error| bad_package(format!("not a valid tar.zst archive: {e}"));
    let decoder = zstd::Decoder::new(reader).map_err(not_archive)?;
    let mut archive = tar::Archive::new(decoder);
    let mut scan = Scan {
        entries: 0,
        bytes: 0,
        spec_yaml: None,
    };
    let mut buf = vec![0u8; 64 * 1024];
    for entry in archive.entries().map_err(not_archive)? {
        let mut entry = entry.map_err(not_archive)?;
        scan.entries += 1;
        if scan.entries > MAX_ENTRIES {
            return Err(bad_package(format!("has more than {MAX_ENTRIES} entries")));
        }
        let raw_path = entry.path().map_err(not_archive)?.into_owned();
        let rel = safe_rel_path(&raw_path)?;
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous => {
                let rel = rel.ok_or_else(|| bad_package("a file entry has an empty path"))?;
                let size = entry.header().size().map_err(not_archive)?;
                if scan.bytes.saturating_add(size) > MAX_UNPACKED_BYTES {
                    return Err(too_big());
                }
                let executable = entry
                    .header()
                    .mode()
                    .map(|m| m & 0o111 != 0)
                    .unwrap_or(false);
                let is_spec = rel == Path::new("function.yaml");
                let mut spec_buf = Vec::new();
                let mut file = match dest {
                    Some(root) => {
                        if let Some(parent) = rel.parent() {
                            ensure_dirs(root, parent)?;
                        }
                        let path = root.join(&rel);
                        clear_slot(&path, &rel)?;
                        let f = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&path)
                            .map_err(io_at(&path))?;
                        Some((f, path))
                    }
                    None => None,
                };
                loop {
                    let n = entry.read(&mut buf).map_err(not_archive)?;
                    if n == 0 {
                        break;
                    }
                    scan.bytes += n as u64;
                    if scan.bytes > MAX_UNPACKED_BYTES {
                        return Err(too_big());
                    }
                    if let Some((f, path)) = file.as_mut() {
                        f.write_all(&buf[..n]).map_err(io_at(path))?;
                    }
                    if is_spec && (spec_buf.len() as u64) < MAX_SPEC_BYTES + 1 {
                        spec_buf.extend_from_slice(&buf[..n]);
                    }
                }
                if let Some((f, path)) = file {
                    let mode = if executable { 0o755 } else { 0o644 };
                    f.set_permissions(fs::Permissions::from_mode(mode))
                        .map_err(io_at(&path))?;
                }
                if is_spec {
                    if spec_buf.len() as u64 > MAX_SPEC_BYTES {
                        return Err(bad_package("function.yaml is larger than 1 MiB"));
                    }
                    let text = String::from_utf8(spec_buf)
                        .map_err(|_| StoreError::invalid("function.yaml", "is not valid UTF-8"))?;
                    scan.spec_yaml = Some(text);
                }
            }
            T::Directory => {
                if let (Some(root), Some(rel)) = (dest, rel) {
                    ensure_dirs(root, &rel)?;
                }
            }
            T::Symlink => {
                let rel = rel.ok_or_else(|| bad_package("a symlink entry has an empty path"))?;
                let target = entry
                    .link_name()
                    .map_err(not_archive)?
                    .ok_or_else(|| {
                        bad_package(format!("symlink `{}` has no target", rel.display()))
                    })?
                    .into_owned();
                check_symlink_target(&rel, &target)?;
                if let Some(root) = dest {
                    if let Some(parent) = rel.parent() {
                        ensure_dirs(root, parent)?;
                    }
                    let path = root.join(&rel);
                    clear_slot(&path, &rel)?;
                    std::os::unix::fs::symlink(&target, &path).map_err(io_at(&path))?;
                }
            }
            T::Link => {
                let rel = rel.ok_or_else(|| bad_package("a hard link entry has an empty path"))?;
                let target = entry
                    .link_name()
                    .map_err(not_archive)?
                    .ok_or_else(|| {
                        bad_package(format!("hard link `{}` has no target", rel.display()))
                    })?
                    .into_owned();
                let target_rel = safe_rel_path(&target)?.ok_or_else(|| {
                    bad_package(format!(
                        "hard link `{}` points at the package root",
                        rel.display()
                    ))
                })?;
                if let Some(root) = dest {
                    if let Some(parent) = target_rel.parent() {
                        ensure_dirs(root, parent)?;
                    }
                    let src = root.join(&target_rel);
                    match fs::symlink_metadata(&src) {
                        Ok(m) if m.file_type().is_file() => {}
                        _ => {
                            return Err(bad_package(format!(
                                "hard link `{}` must point at a regular file earlier in the package (-> {})",
                                rel.display(),
                                target.display()
                            )));
                        }
                    }
                    if let Some(parent) = rel.parent() {
                        ensure_dirs(root, parent)?;
                    }
                    let path = root.join(&rel);
                    clear_slot(&path, &rel)?;
                    fs::hard_link(&src, &path).map_err(io_at(&path))?;
                }
            }
            // Metadata entries the tar reader may surface; they carry no file.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            T::Char | T::Block | T::Fifo => {
                return Err(bad_package(format!(
                    "entry `{}` is a device or FIFO; only files, directories and links are allowed",
                    raw_path.display()
                )));
            }
            other => {
                return Err(bad_package(format!(
                    "entry `{}` has unsupported type {other:?}",
                    raw_path.display()
                )));
            }
        }
    }
    Ok(scan)
}

fn too_big() -> StoreError {
    bad_package(format!(
        "unpacks to more than {} MiB",
        MAX_UNPACKED_BYTES >> 20
    ))
}

/// Validates a whole package and parses its `function.yaml`.
pub(crate) fn read_spec(bytes: &[u8]) -> Result<(FunctionSpec, PackageInfo), StoreError> {
    if bytes.len() < 4 || bytes[..4] != ZSTD_MAGIC {
        return Err(bad_package("not a tar.zst archive (missing zstd header)"));
    }
    let scan = scan_archive(bytes, None)?;
    let yaml = scan
        .spec_yaml
        .ok_or_else(|| bad_package("no function.yaml at the archive root"))?;
    let spec = FunctionSpec::from_yaml(&yaml)?;
    Ok((
        spec,
        PackageInfo {
            spec_yaml: yaml,
            entries: scan.entries,
            unpacked_bytes: scan.bytes,
        },
    ))
}

/// A reader that hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Extracts package `sha` (at `package`) into `code_dir/<sha>` unless already there.
pub(crate) fn unpack(package: &Path, code_dir: &Path, sha: &str) -> Result<PathBuf, StoreError> {
    let dest = code_dir.join(sha);
    if dest.is_dir() {
        return Ok(dest);
    }
    let file = match File::open(package) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::not_found(format!("package {sha}")));
        }
        Err(e) => return Err(io_at(package)(e)),
    };
    let tmp = code_dir.join(format!(".tmp-{sha}-{}", random_suffix()));
    fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let result = (|| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io_at(&tmp))?;
        let mut reader = HashingReader {
            inner: io::BufReader::new(file),
            hasher: Sha256::new(),
        };
        scan_archive(&mut reader, Some(&tmp))?;
        io::copy(&mut reader, &mut io::sink()).map_err(io_at(package))?;
        let actual = hex::encode(reader.hasher.finalize());
        if actual != sha {
            return Err(StoreError::Corrupt(format!(
                "package {sha} on disk hashes to {actual}; delete it and deploy again"
            )));
        }
        sync_fs(&tmp)?;
        match fs::rename(&tmp, &dest) {
            Ok(()) => sync_dir(code_dir),
            // Someone else unpacked it meanwhile.
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(io_at(&dest)(e)),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| dest)
}

/// Flushes the file system holding `path` (one call instead of an fsync per unpacked file).
fn sync_fs(path: &Path) -> Result<(), StoreError> {
    let f = File::open(path).map_err(io_at(path))?;
    // SAFETY: plain syscall on a valid, open file descriptor.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if rc != 0 {
        return Err(io_at(path)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `pack_dir` leaves this entry out.
fn skipped(parent_rel: &Path, name: &std::ffi::OsStr, is_dir: bool) -> bool {
    if !is_dir {
        return false;
    }
    let at_root = parent_rel.as_os_str().is_empty();
    name == ".git"
        || name == "__pycache__"
        || (at_root && name == "target")
        || (name == ".cache"
            && parent_rel.file_name() == Some(std::ffi::OsStr::new("node_modules")))
}

/// Packs a directory into a deterministic tar.zst (see [`crate::Store::pack_dir`]).
pub(crate) fn pack_dir(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<Vec<u8>, StoreError> {
    let meta = fs::metadata(dir).map_err(io_at(dir))?;
    if !meta.is_dir() {
        return Err(StoreError::invalid(
            "dir",
            format!("{} is not a directory", dir.display()),
        ));
    }
    let encoder = zstd::Encoder::new(Vec::new(), 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut total = 0u64;
    let mut entries = 0u64;
    pack_walk(
        dir,
        Path::new(""),
        &mut builder,
        &mut total,
        &mut entries,
        progress,
    )?;
    let encoder = builder.into_inner()?;
    Ok(encoder.finish()?)
}

fn base_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn pack_walk(
    abs: &Path,
    rel: &Path,
    builder: &mut tar::Builder<zstd::Encoder<'static, Vec<u8>>>,
    total: &mut u64,
    entries: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    let mut children: Vec<fs::DirEntry> = fs::read_dir(abs)
        .map_err(io_at(abs))?
        .collect::<Result<_, _>>()
        .map_err(io_at(abs))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let name = child.file_name();
        let child_abs = child.path();
        let child_rel = rel.join(&name);
        let ft = child.file_type().map_err(io_at(&child_abs))?;
        if skipped(rel, &name, ft.is_dir()) {
            continue;
        }
        if ft.is_dir() || ft.is_file() || ft.is_symlink() {
            *entries += 1;
            if *entries > MAX_ENTRIES {
                return Err(bad_package(format!(
                    "{} has more than {MAX_ENTRIES} entries",
                    abs.display()
                )));
            }
        }
        if ft.is_dir() {
            let mut h = base_header(tar::EntryType::Directory, 0o755, 0);
            builder.append_data(&mut h, &child_rel, io::empty())?;
            pack_walk(&child_abs, &child_rel, builder, total, entries, progress)?;
        } else if ft.is_file() {
            let data = fs::read(&child_abs).map_err(io_at(&child_abs))?;
            let meta = child.metadata().map_err(io_at(&child_abs))?;
            *total += data.len() as u64;
            if *total > MAX_UNPACKED_BYTES {
                return Err(bad_package(format!(
                    "{} holds more than {} MiB",
                    abs.display(),
                    MAX_UNPACKED_BYTES >> 20
                )));
            }
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut h = base_header(tar::EntryType::Regular, mode, data.len() as u64);
            builder.append_data(&mut h, &child_rel, data.as_slice())?;
            progress(*total);
        } else if ft.is_symlink() {
            let target = fs::read_link(&child_abs).map_err(io_at(&child_abs))?;
            check_symlink_target(&child_rel, &target)?;
            let mut h = base_header(tar::EntryType::Symlink, 0o777, 0);
            builder.append_link(&mut h, &child_rel, &target)?;
        } else {
            tracing::debug!(path = %child_abs.display(), "pack: skipping special file");
        }
    }
    Ok(())
}

/// Total size of the files under `path` (not following symlinks).
pub(crate) fn du(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| du(&e.path()))
        .sum()
}
