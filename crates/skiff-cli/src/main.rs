//! `skiff`: one binary for the server and the client. When exec'd as `skiff __agent` it is
//! the agent (PID 1) inside a process sandbox.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod client;
mod image;
mod serve;

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Skiff: run functions in locked-down sandboxes behind an HTTP gateway"
)]
struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "SKIFF_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API key for client commands (sent as `Authorization: Bearer`).
    #[arg(
        long = "key",
        global = true,
        env = "SKIFF_API_KEY",
        hide_env_values = true
    )]
    key: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
// Parsed once per process; boxing the server's arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the Skiff server.
    Serve(serve::ServeArgs),
    /// Deploy a function directory (with function.yaml) as a new revision.
    Deploy {
        dir: PathBuf,
        /// Create the revision without moving the `production` alias to it.
        #[arg(long)]
        no_promote: bool,
    },
    /// Invoke a function and print its result.
    Invoke {
        name: String,
        /// JSON event, or @file to read it from a file.
        #[arg(long, short)]
        data: Option<String>,
        /// Alias or revision number (default: production).
        #[arg(long, short)]
        qualifier: Option<String>,
        /// Print revision, cold start and timing to stderr.
        #[arg(long, short)]
        verbose: bool,
        /// Queue the invocation and print its event id instead of waiting for the result.
        #[arg(long = "async")]
        asynchronous: bool,
    },
    /// Show a function's dead-letter list (async invocations that failed every attempt).
    Dlq {
        name: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Requeue this dead event with a fresh attempt budget.
        #[arg(long, value_name = "EVENT_ID", conflicts_with = "rm")]
        retry: Option<String>,
        /// Discard this dead event.
        #[arg(long, value_name = "EVENT_ID")]
        rm: Option<String>,
    },
    /// List functions.
    Ls,
    /// Print a function's logs.
    Logs {
        name: String,
        /// Keep printing new lines as they arrive.
        #[arg(long, short)]
        follow: bool,
    },
    /// Delete a function, its revisions and instances.
    Rm { name: String },
    /// Manage aliases (named pointers to a revision, or weighted splits).
    Alias {
        #[command(subcommand)]
        cmd: AliasCmd,
    },
    /// Move an alias (default `production`) back: to `--to N`, or to its previous value.
    Rollback {
        name: String,
        /// Revision to move to.
        #[arg(long)]
        to: Option<u32>,
        #[arg(long, default_value = "production")]
        alias: String,
    },
    /// Replace a function's instances gracefully (in-flight invocations finish first).
    Restart {
        name: String,
        /// Only stop idle instances now; leave busy ones serving.
        #[arg(long)]
        idle_only: bool,
    },
    /// Disable a function: every invoke answers 503 until it is enabled again.
    Disable { name: String },
    /// Re-enable a disabled function.
    Enable { name: String },
    /// Manage API keys (written directly to the server's data dir).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        #[arg(long, global = true, env = "SKIFF_DATA_DIR", default_value = ".skiff")]
        data_dir: PathBuf,
    },
    /// Manage secrets exposed to functions as environment variables.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Check this host for what the sandbox tiers need.
    Doctor,
    /// Manage the microVM guest image.
    Image {
        #[command(subcommand)]
        cmd: image::ImageCmd,
    },
    /// Internal: run as the agent inside a sandbox.
    #[command(name = "__agent", hide = true)]
    Agent,
}

#[derive(Subcommand)]
enum AliasCmd {
    /// Point ALIAS at a revision (`3`) or split traffic by weight (`3=90,4=10`).
    Set {
        name: String,
        alias: String,
        /// `N`, or `N=WEIGHT,M=WEIGHT,...` with weights summing to 100.
        target: String,
    },
    /// List a function's aliases.
    Ls { name: String },
    /// Delete an alias.
    Rm { name: String, alias: String },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key; it is printed once and stored only as a SHA-256 digest.
    Create {
        #[arg(long, default_value = "default")]
        label: String,
    },
    /// List keys (labels and ids only).
    Ls,
    /// Revoke a key by id.
    Revoke { id: i64 },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Set a secret value.
    Set { name: String, value: String },
    /// List secret names.
    Ls,
    /// Delete a secret.
    Rm { name: String },
}

fn main() -> Result<()> {
    // The agent must not pay for argument parsing or a multi-threaded runtime.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__agent") {
        skiff_agent::main();
    }
    // `.env` in the working directory; variables already in the environment win.
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("reading .env: {e}"),
    }
    let cli = Cli::parse();
    let c = || client::Client::new(&cli.server, cli.key.clone());
    match cli.cmd {
        Cmd::Serve(args) => serve::run(args),
        Cmd::Deploy { dir, no_promote } => c()?.deploy(&dir, !no_promote),
        Cmd::Invoke {
            name,
            data,
            qualifier,
            verbose,
            asynchronous,
        } => c()?.invoke(
            &name,
            data.as_deref(),
            qualifier.as_deref(),
            verbose,
            asynchronous,
        ),
        Cmd::Dlq {
            name,
            json,
            retry,
            rm,
        } => match (retry, rm) {
            (Some(id), _) => c()?.dlq_retry(&name, &id),
            (None, Some(id)) => c()?.dlq_rm(&name, &id),
            (None, None) => c()?.dlq(&name, json),
        },
        Cmd::Ls => c()?.ls(),
        Cmd::Logs { name, follow } => c()?.logs(&name, follow),
        Cmd::Rm { name } => c()?.rm(&name),
        Cmd::Alias { cmd } => match cmd {
            AliasCmd::Set {
                name,
                alias,
                target,
            } => c()?.alias_set(&name, &alias, &target),
            AliasCmd::Ls { name } => c()?.alias_ls(&name),
            AliasCmd::Rm { name, alias } => c()?.alias_rm(&name, &alias),
        },
        Cmd::Rollback { name, to, alias } => c()?.rollback(&name, &alias, to),
        Cmd::Restart { name, idle_only } => c()?.restart(&name, idle_only),
        Cmd::Disable { name } => c()?.set_enabled(&name, false),
        Cmd::Enable { name } => c()?.set_enabled(&name, true),
        Cmd::Secrets { cmd } => match cmd {
            SecretsCmd::Set { name, value } => c()?.secret_set(&name, &value),
            SecretsCmd::Ls => c()?.secret_ls(),
            SecretsCmd::Rm { name } => c()?.secret_rm(&name),
        },
        Cmd::Keys { cmd, data_dir } => {
            let store = skiff_store::Store::open(&data_dir)?;
            match cmd {
                KeysCmd::Create { label } => {
                    let (key, rec) = store.create_api_key(&label)?;
                    eprintln!(
                        "created key {} ({}); it is shown only once:",
                        rec.id, rec.label
                    );
                    println!("{key}");
                }
                KeysCmd::Ls => {
                    for k in store.list_api_keys()? {
                        println!("{}\t{}\t{}", k.id, k.label, k.created_at_ms);
                    }
                }
                KeysCmd::Revoke { id } => {
                    if !store.revoke_api_key(id)? {
                        anyhow::bail!("no key with id {id}");
                    }
                }
            }
            Ok(())
        }
        Cmd::Doctor => serve::doctor(),
        Cmd::Image { cmd } => image::run(cmd),
        Cmd::Agent => unreachable!("handled above"),
    }
}
