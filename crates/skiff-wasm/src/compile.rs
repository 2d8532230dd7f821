//! Turning a guest file into linked code: WAT or binary, core module or component, compiled
//! once per content. Compiled code is kept on disk as `.cwasm` (Wasmtime's precompiled
//! format, from the same engine) under the cache directory, named by the SHA-256 of the
//! guest's bytes and the engine's compatibility hash, and loaded back with a memory map —
//! so a deploy compiles, and later cold starts (also after a restart) only map the file.

use crate::{engine, Guest, Host, LoadError};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::{Engine, Linker, Module};
use wasmtime_wasi::p2::bindings::sync::CommandPre;

/// Export of a `wasi:http/proxy` component (any 0.2.x).
const HTTP_HANDLER: &str = "wasi:http/incoming-handler@0.2";
/// Export of a WASI command component (any 0.2.x).
const CLI_RUN: &str = "wasi:cli/run@0.2";

/// The `.cwasm` file for `bytes` under `dir`.
fn cache_file(engine: &Engine, dir: &Path, bytes: &[u8], component: bool) -> PathBuf {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let digest = hex::encode(Sha256::digest(bytes));
    let kind = if component { "component" } else { "module" };
    dir.join(format!("{digest}-{:016x}.{kind}.cwasm", compat.finish()))
}

/// How a compiled image becomes code: from a cached file (memory-mapped) or from memory.
struct Loader<P, F, B> {
    precompile: P,
    from_file: F,
    from_bytes: B,
}

/// Compiles `bytes`, or maps their compilation cached under `dir`, storing it there first
/// when it is missing.
fn compile_cached<T, P, F, B>(
    dir: Option<&Path>,
    bytes: &[u8],
    component: bool,
    l: Loader<P, F, B>,
) -> Result<T, String>
where
    P: FnOnce(&Engine, &[u8]) -> wasmtime::Result<Vec<u8>>,
    F: Fn(&Engine, &Path) -> wasmtime::Result<T>,
    B: FnOnce(&Engine, &[u8]) -> wasmtime::Result<T>,
{
    let engine = engine().map_err(|e| e.to_string())?;
    let file = dir.map(|d| cache_file(engine, d, bytes, component));
    if let Some(file) = file.as_ref().filter(|f| f.is_file()) {
        match (l.from_file)(engine, file) {
            Ok(t) => return Ok(t),
            // A truncated or foreign file: compile again over it.
            Err(e) => tracing::warn!("wasm: ignoring cached {}: {e:#}", file.display()),
        }
    }
    let compiled = (l.precompile)(engine, bytes).map_err(|e| format!("{e:#}"))?;
    if let Some(file) = &file {
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let stored = file
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &compiled).is_ok()
            && std::fs::rename(&tmp, file).is_ok();
        if stored {
            if let Ok(t) = (l.from_file)(engine, file) {
                return Ok(t);
            }
        } else {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("wasm: cannot store compiled code at {}", file.display());
        }
    }
    (l.from_bytes)(engine, &compiled).map_err(|e| format!("{e:#}"))
}

/// Resolves `handler` inside `code_dir`, refusing paths that leave it.
pub(crate) fn guest_path(code_dir: &Path, handler: &str) -> Result<PathBuf, LoadError> {
    skiff_core::launch::package_file(code_dir, handler, &["wasm", "wat"])
        .ok_or_else(|| LoadError::BadHandler(handler.to_string()))
}

/// Compiles (or maps from `cache_dir`) a guest and links it: a component exporting
/// `wasi:http/incoming-handler` against `wasi:http/proxy`, one exporting `wasi:cli/run`
/// against WASI preview 2 (with `wasi:http`), a core module exporting `_start` against
/// preview 1.
pub(crate) fn load(
    cache_dir: Option<&Path>,
    code_dir: &Path,
    handler: &str,
) -> Result<Guest, LoadError> {
    let engine = engine()?;
    let path = guest_path(code_dir, handler)?;
    let name = handler.trim().trim_start_matches("./").to_string();
    let raw = std::fs::read(&path).map_err(|source| LoadError::Read {
        path: name.clone(),
        source,
    })?;
    let bytes = wat::parse_bytes(&raw).map_err(|e| LoadError::Wat {
        path: name.clone(),
        message: e.to_string(),
    })?;
    let compile_err = |message: String| LoadError::Compile {
        path: name.clone(),
        message,
    };
    let link_err = |e: wasmtime::Error| LoadError::Link {
        path: name.clone(),
        message: format!("{e:#}"),
    };
    if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0] {
        let component = compile_cached(
            cache_dir,
            &bytes,
            true,
            Loader {
                precompile: |e: &Engine, b: &[u8]| e.precompile_component(b),
                // SAFETY: the image was made by `precompile_component` of an engine with the
                // same compatibility hash (the file name says so), in Skiff's own cache
                // directory or in memory just now.
                from_file: |e: &Engine, f: &Path| unsafe { Component::deserialize_file(e, f) },
                from_bytes: |e: &Engine, b: &[u8]| unsafe { Component::deserialize(e, b) },
            },
        )
        .map_err(compile_err)?;
        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
        if exports.iter().any(|n| n.starts_with(HTTP_HANDLER)) {
            let mut linker = wasmtime::component::Linker::<crate::http::HttpHost>::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
            wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link_err)?;
            let pre = linker.instantiate_pre(&component).map_err(link_err)?;
            let pre = wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre).map_err(link_err)?;
            return Ok(Guest::Http(pre));
        }
        if !exports.iter().any(|n| n.starts_with(CLI_RUN)) {
            return Err(LoadError::NoEntry {
                path: name,
                exports: if exports.is_empty() {
                    "nothing".into()
                } else {
                    exports.join(", ")
                },
            });
        }
        let mut linker = wasmtime::component::Linker::<Host>::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link_err)?;
        let pre = linker.instantiate_pre(&component).map_err(link_err)?;
        let pre = CommandPre::new(pre).map_err(link_err)?;
        return Ok(Guest::Component(pre));
    }
    let module = compile_cached(
        cache_dir,
        &bytes,
        false,
        Loader {
            precompile: |e: &Engine, b: &[u8]| e.precompile_module(b),
            // SAFETY: as for components above.
            from_file: |e: &Engine, f: &Path| unsafe { Module::deserialize_file(e, f) },
            from_bytes: |e: &Engine, b: &[u8]| unsafe { Module::deserialize(e, b) },
        },
    )
    .map_err(compile_err)?;
    if !matches!(
        module.get_export("_start"),
        Some(wasmtime::ExternType::Func(_))
    ) {
        return Err(LoadError::NoStart { path: name });
    }
    let mut linker: Linker<Host> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |h: &mut Host| &mut h.wasi)
        .map_err(link_err)?;
    Ok(Guest::Module(
        linker.instantiate_pre(&module).map_err(link_err)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_differ_by_content_and_kind() {
        let engine = engine().unwrap();
        let dir = Path::new("/c");
        let a = cache_file(engine, dir, b"a", true);
        assert_ne!(a, cache_file(engine, dir, b"b", true));
        assert_ne!(a, cache_file(engine, dir, b"a", false));
        assert_eq!(a, cache_file(engine, dir, b"a", true));
        assert!(a.to_string_lossy().ends_with(".component.cwasm"));
    }
}
