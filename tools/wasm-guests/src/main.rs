//! `wasm-guests`: builds Skiff's hand-written WebAssembly guest fixtures.
//!
//! There is no wasm32 Rust target on the build machines, so the minimal guests
//! (`hello-http`, `echo-http`) are written as core-module WAT against the
//! canonical ABI of `wasi:http/proxy`, and this tool turns them into
//! components:
//!
//! ```text
//! wasm-guests component --wit <dir> --world <world> <core.wat|core.wasm> -o <out.wasm>
//! wasm-guests exports <file.wasm>
//! wasm-guests imports <file.wasm>
//! wasm-guests abi --wit <dir> --world <world>
//! ```
//!
//! `component` parses the core module, embeds the component-type metadata of
//! `<world>` (resolved from the WIT package directory `<dir>`, e.g.
//! `tests/fixtures/wasm/wit` with world `wasi:http/proxy@0.2.12`) and encodes
//! a validated component. `exports`/`imports` print the top-level
//! export/import names of a component, one per line. `abi` prints (as WAT) a
//! dummy core module for the world, i.e. the exact canonical-ABI import and
//! export names and signatures a hand-written core module has to use.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use wasmparser::{Parser, Payload};
use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::Resolve;

const USAGE: &str = "usage:
  wasm-guests component --wit <dir> --world <world> <core.wat|core.wasm> -o <out.wasm>
  wasm-guests exports [-v] <component.wasm>     (-v: also print the item kind)
  wasm-guests imports [-v] <component.wasm>
  wasm-guests abi --wit <dir> --world <world>   (print the core-module imports/exports a guest must match, as WAT)";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-guests: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        bail!("missing subcommand\n{USAGE}");
    };
    match cmd.as_str() {
        "component" => component(rest),
        "exports" => list_names(rest, Which::Exports),
        "imports" => list_names(rest, Which::Imports),
        "abi" => abi(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown subcommand `{other}`\n{USAGE}"),
    }
}

fn component(args: &[String]) -> Result<()> {
    let mut wit: Option<PathBuf> = None;
    let mut world: Option<String> = None;
    let mut out: Option<PathBuf> = None;
    let mut input: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--wit" => wit = Some(value("--wit")?.into()),
            "--world" => world = Some(value("--world")?),
            "-o" | "--output" => out = Some(value("-o")?.into()),
            s if s.starts_with('-') => bail!("unknown flag `{s}`\n{USAGE}"),
            s => {
                if input.replace(s.into()).is_some() {
                    bail!("more than one input module given\n{USAGE}");
                }
            }
        }
    }
    let wit = wit.context("--wit <dir> is required")?;
    let world = world.context("--world <world> is required")?;
    let out = out.context("-o <out.wasm> is required")?;
    let input = input.context("an input core module (.wat or .wasm) is required")?;

    // `wat::parse_file` accepts both the text and the binary format.
    let mut module =
        wat::parse_file(&input).with_context(|| format!("parsing {}", input.display()))?;

    let (resolve, world_id) = load_world(&wit, &world)?;

    wit_component::embed_component_metadata(&mut module, &resolve, world_id, StringEncoding::UTF8)
        .context("embedding component-type metadata")?;

    let component = ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .context("decoding core module + metadata")?
        .encode()
        .with_context(|| format!("encoding {} as a `{world}` component", input.display()))?;

    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &component).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn load_world(wit: &std::path::Path, world: &str) -> Result<(Resolve, wit_parser::WorldId)> {
    let mut resolve = Resolve::default();
    let (pkg, _sources) = resolve
        .push_path(wit)
        .with_context(|| format!("loading WIT from {}", wit.display()))?;
    let world_id = resolve
        .select_world(&[pkg], Some(world))
        .with_context(|| format!("selecting world `{world}`"))?;
    Ok((resolve, world_id))
}

fn abi(args: &[String]) -> Result<()> {
    let (wit, world) = match args {
        [a, wit, b, world] if a == "--wit" && b == "--world" => (wit, world),
        [b, world, a, wit] if a == "--wit" && b == "--world" => (wit, world),
        _ => bail!("expected --wit <dir> --world <world>\n{USAGE}"),
    };
    let (resolve, world_id) = load_world(wit.as_ref(), world)?;
    let module = wit_component::dummy_module(
        &resolve,
        world_id,
        wit_parser::ManglingAndAbi::Legacy(wit_parser::LiftLowerAbi::Sync),
    );
    print!("{}", wasmprinter::print_bytes(&module)?);
    Ok(())
}

#[derive(Clone, Copy)]
enum Which {
    Exports,
    Imports,
}

fn list_names(args: &[String], which: Which) -> Result<()> {
    let (verbose, path) = match args {
        [path] => (false, path),
        [flag, path] if flag == "-v" || flag == "--kinds" => (true, path),
        _ => bail!("expected exactly one file\n{USAGE}"),
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    for (name, kind) in top_level_names(&bytes, which)? {
        if verbose {
            println!("{name}\t{kind}");
        } else {
            println!("{name}");
        }
    }
    Ok(())
}

/// Names of the outermost component's imports or exports (nested modules and
/// components are skipped).
fn top_level_names(bytes: &[u8], which: Which) -> Result<Vec<(String, String)>> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut saw_component = false;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.context("parsing wasm")? {
            Payload::Version { encoding, .. } => {
                depth += 1;
                if depth == 1 {
                    if encoding != wasmparser::Encoding::Component {
                        bail!("not a component (core module?)");
                    }
                    saw_component = true;
                }
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(r) if depth == 1 => {
                if let Which::Exports = which {
                    for e in r {
                        let e = e.context("parsing export")?;
                        names.push((
                            e.name.name.to_string(),
                            format!("{:?}", e.kind).to_lowercase(),
                        ));
                    }
                }
            }
            Payload::ComponentImportSection(r) if depth == 1 => {
                if let Which::Imports = which {
                    for i in r {
                        let i = i.context("parsing import")?;
                        let kind = match i.ty {
                            wasmparser::ComponentTypeRef::Module(_) => "module",
                            wasmparser::ComponentTypeRef::Func(_) => "func",
                            wasmparser::ComponentTypeRef::Value(_) => "value",
                            wasmparser::ComponentTypeRef::Type(_) => "type",
                            wasmparser::ComponentTypeRef::Instance(_) => "instance",
                            wasmparser::ComponentTypeRef::Component(_) => "component",
                        };
                        names.push((i.name.name.to_string(), kind.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    if !saw_component {
        bail!("empty input");
    }
    Ok(names)
}
