//! Skiff's persistence: function metadata in an embedded SQLite database
//! (`<data_dir>/skiff.db`) and a content-addressed artifact store on disk.
//!
//! Layout of the data directory:
//! - `skiff.db` (+ `-wal`, `-shm`): functions, revisions, aliases, invocation records, logs,
//!   API key digests, secrets and the async event queue. WAL mode; the metadata connection commits with
//!   `synchronous=FULL`, so an acknowledged deploy or alias change survives a crash.
//! - `artifacts/sha256/<hex>.tar.zst`: uploaded packages, named by their SHA-256.
//! - `code/<hex>/`: unpacked packages, mounted read-only into sandboxes.
//!
//! The API is synchronous; async callers should use `spawn_blocking` for writes.
//! Invocation records and logs go through a background writer ([`Store::record_invocation`])
//! and never block the caller.

mod aliases;
mod artifacts;
mod error;
mod queue;
mod schema;
mod snapshots;
mod writer;

pub use aliases::{AliasHistoryEntry, AliasTarget, Resolution};
pub use artifacts::{valid_sha256, PackageInfo, MAX_ENTRIES, MAX_UNPACKED_BYTES};
pub use error::StoreError;
pub use queue::{EventCounts, EventRecord, EventState, NewEvent};
pub use schema::SCHEMA_VERSION;
pub use snapshots::{valid_snapshot_id, SnapshotRecord};

use error::io_at;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use skiff_core::FunctionSpec;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The alias `resolve` uses when no qualifier is given, and the one `promote` moves.
pub const PRODUCTION: &str = "production";
/// The qualifier naming the newest revision.
pub const LATEST: &str = "$LATEST";
/// Largest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Uploaded packages not yet referenced by a revision are kept from gc this long.
const PENDING_GRACE: Duration = Duration::from_secs(3600);

/// Tunables; [`StoreOptions::default`] is what [`Store::open`] uses.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Log lines kept per function (newest first).
    pub log_retention: u32,
    /// Invocation records kept per function (newest first).
    pub invocation_retention: u32,
    /// Capacity of the invocation record queue; beyond it records are dropped (and counted).
    pub queue_capacity: usize,
    /// Group commit: at most this many records per transaction...
    pub batch_max: usize,
    /// ...and at most this long between the first queued record and its commit.
    pub batch_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            log_retention: 10_000,
            invocation_retention: 10_000,
            queue_capacity: 10_000,
            batch_max: 500,
            batch_interval: Duration::from_millis(50),
        }
    }
}

/// A function and a summary of its revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Newest revision number; 0 if none was deployed yet.
    pub latest_revision: u32,
    /// Revision the `production` alias points at.
    pub production_revision: Option<u32>,
    /// Runtime of the latest revision (or of the spec given to `create_function` before the
    /// first deploy).
    pub runtime: Option<String>,
    pub enabled: bool,
}

/// One immutable deploy of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    pub function: String,
    pub number: u32,
    #[serde(deserialize_with = "de_spec")]
    pub spec: FunctionSpec,
    pub package_sha256: String,
    pub package_size: u64,
    pub created_at_ms: i64,
}

fn de_spec<'de, D: Deserializer<'de>>(d: D) -> Result<FunctionSpec, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    FunctionSpec::from_value(&v).map_err(serde::de::Error::custom)
}

/// A named pointer to a revision (`production`, `staging`...), or a weighted split across
/// a few revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub function: String,
    pub name: String,
    /// The revision, or for a split the one with the largest weight (first on ties).
    pub revision: u32,
    /// The split, if this alias is one (weights sum to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<skiff_core::split::Route>>,
    pub updated_at_ms: i64,
}

/// One finished invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationRecord {
    pub request_id: String,
    pub function: String,
    pub revision: u32,
    pub started_at_ms: i64,
    pub duration_us: u64,
    /// `ok`, `function_error`, `timeout`, `out_of_memory`, `crashed`, `throttled`, ...
    pub status: String,
    pub cold: bool,
    pub error: Option<String>,
    /// Output of this invocation. Stored split into lines in the logs table; left empty by
    /// [`Store::list_invocations`], filled by [`Store::get_invocation`]. JSON: a string.
    #[serde(
        default,
        serialize_with = "ser_lossy",
        deserialize_with = "de_bytes",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub logs: Vec<u8>,
}

fn ser_lossy<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(v))
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    Ok(String::deserialize(d)?.into_bytes())
}

/// One line of function output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub id: i64,
    pub ts_ms: i64,
    pub function: String,
    pub revision: u32,
    pub request_id: String,
    pub line: String,
}

/// An API key as listed (the key itself is never stored, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub label: String,
    pub created_at_ms: i64,
}

struct Inner {
    data_dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    /// The async event queue's own `synchronous=FULL` connection (see `queue.rs`).
    queue: Mutex<Connection>,
    /// Packages uploaded but not yet referenced by a revision: protected from gc.
    pending: Mutex<HashMap<String, Instant>>,
    writer: writer::Writer,
}

/// Handle to the store. Cheap to clone; all clones share one database connection (plus the
/// background writer's).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

pub use skiff_core::units::now_ms;

fn function_nf(name: &str) -> StoreError {
    StoreError::not_found(format!("function `{name}`"))
}

fn check_function_name(name: &str) -> Result<(), StoreError> {
    if skiff_core::valid_name(name) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "name",
            "must match [a-z0-9-]{1,63} and not start or end with '-'",
        ))
    }
}

fn check_alias_name(alias: &str) -> Result<(), StoreError> {
    if !skiff_core::valid_name(alias) {
        return Err(StoreError::invalid(
            "alias",
            "must match [a-z0-9-]{1,63} and not start or end with '-'",
        ));
    }
    if alias.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::invalid(
            "alias",
            "must not be all digits (that names a revision)",
        ));
    }
    Ok(())
}

const FUNCTION_SELECT: &str =
    "SELECT f.name, f.created_at_ms, f.updated_at_ms, f.latest_revision, a.revision,
        COALESCE(r.runtime, f.runtime), f.enabled
     FROM functions f
     LEFT JOIN aliases a ON a.function = f.name AND a.name = 'production'
     LEFT JOIN revisions r ON r.function = f.name AND r.number = f.latest_revision";

fn function_row(row: &Row<'_>) -> rusqlite::Result<FunctionRecord> {
    Ok(FunctionRecord {
        name: row.get(0)?,
        created_at_ms: row.get(1)?,
        updated_at_ms: row.get(2)?,
        latest_revision: row.get(3)?,
        production_revision: row.get(4)?,
        runtime: row.get(5)?,
        enabled: row.get(6)?,
    })
}

const REVISION_SELECT: &str =
    "SELECT function, number, spec, package_sha256, package_size, created_at_ms FROM revisions";

/// A revision row before its spec JSON is validated.
struct RawRevision {
    function: String,
    number: u32,
    spec: String,
    package_sha256: String,
    package_size: u64,
    created_at_ms: i64,
}

fn revision_row(row: &Row<'_>) -> rusqlite::Result<RawRevision> {
    Ok(RawRevision {
        function: row.get(0)?,
        number: row.get(1)?,
        spec: row.get(2)?,
        package_sha256: row.get(3)?,
        package_size: row.get(4)?,
        created_at_ms: row.get(5)?,
    })
}

impl RawRevision {
    fn into_record(self) -> Result<RevisionRecord, StoreError> {
        let corrupt = |m: String| {
            StoreError::Corrupt(format!(
                "spec of revision {} of function `{}`: {m}",
                self.number, self.function
            ))
        };
        let value: serde_json::Value =
            serde_json::from_str(&self.spec).map_err(|e| corrupt(e.to_string()))?;
        let spec = FunctionSpec::from_value(&value).map_err(|e| corrupt(e.to_string()))?;
        Ok(RevisionRecord {
            function: self.function,
            number: self.number,
            spec,
            package_sha256: self.package_sha256,
            package_size: self.package_size,
            created_at_ms: self.created_at_ms,
        })
    }
}

fn function_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM functions WHERE name = ?1")?
        .exists([name])?)
}

fn get_revision_in(
    conn: &Connection,
    name: &str,
    number: u32,
) -> Result<Option<RevisionRecord>, StoreError> {
    let raw = conn
        .prepare_cached(&format!(
            "{REVISION_SELECT} WHERE function = ?1 AND number = ?2"
        ))?
        .query_row(params![name, number], revision_row)
        .optional()?;
    raw.map(RawRevision::into_record).transpose()
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`: the directory itself, `artifacts/`,
    /// `code/` and `skiff.db`, migrated to the current schema.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(data_dir, StoreOptions::default())
    }

    /// [`Store::open`] with explicit tunables.
    pub fn open_with(data_dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        for dir in [
            data_dir.to_path_buf(),
            data_dir.join("artifacts").join("sha256"),
            data_dir.join("artifacts").join("tmp"),
            data_dir.join("code"),
        ] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let data_dir = fs::canonicalize(data_dir).map_err(io_at(data_dir))?;
        cleanup_temporaries(&data_dir);
        let db_path = data_dir.join("skiff.db");
        let mut conn = schema::connect(&db_path, schema::Sync::Full)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Secrets live in here: owner-only.
            fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600))
                .map_err(io_at(&db_path))?;
        }
        schema::migrate(&mut conn)?;
        let queue = schema::connect(&db_path, schema::Sync::Full)?;
        let writer_conn = schema::connect(&db_path, schema::Sync::Normal)?;
        let writer = writer::Writer::start(writer_conn, &opts)?;
        Ok(Store {
            inner: Arc::new(Inner {
                data_dir,
                db_path,
                conn: Mutex::new(conn),
                queue: Mutex::new(queue),
                pending: Mutex::new(HashMap::new()),
                writer,
            }),
        })
    }

    /// The (canonicalized) data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Path of the SQLite database file.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    // ---------------------------------------------------------------- functions

    /// Creates a function without any revision. `Conflict` if the name is taken.
    pub fn create_function(&self, spec: &FunctionSpec) -> Result<FunctionRecord, StoreError> {
        check_function_name(&spec.name)?;
        let conn = self.inner.conn.lock();
        let now = now_ms();
        let inserted = conn.execute(
            "INSERT INTO functions (name, created_at_ms, updated_at_ms, latest_revision, runtime, enabled)
             VALUES (?1, ?2, ?2, 0, ?3, 1) ON CONFLICT(name) DO NOTHING",
            params![spec.name, now, spec.runtime.as_str()],
        )?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "function `{}` already exists",
                spec.name
            )));
        }
        Ok(FunctionRecord {
            name: spec.name.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            latest_revision: 0,
            production_revision: None,
            runtime: Some(spec.runtime.as_str().to_string()),
            enabled: true,
        })
    }

    pub fn get_function(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let rec = conn
            .prepare_cached(&format!("{FUNCTION_SELECT} WHERE f.name = ?1"))?
            .query_row([name], function_row)
            .optional()?;
        Ok(rec)
    }

    /// All functions, by name.
    pub fn list_functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let mut stmt = conn.prepare_cached(&format!("{FUNCTION_SELECT} ORDER BY f.name"))?;
        let rows = stmt
            .query_map([], function_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Enables or disables a function. Returns false if it does not exist.
    pub fn set_function_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let conn = self.inner.conn.lock();
        let n = conn.execute(
            "UPDATE functions SET enabled = ?2, updated_at_ms = ?3 WHERE name = ?1",
            params![name, enabled, now_ms()],
        )?;
        Ok(n > 0)
    }

    /// Deletes a function with its revisions, aliases, invocation records, logs and events
    /// (queued, running or dead: a deleted function's events are dropped), in one transaction.
    /// Artifacts are left for [`Store::gc_artifacts`]. Returns false if it did not exist.
    pub fn delete_function(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.delete_function_packages(name)?.is_some())
    }

    /// [`Store::delete_function`], returning the package digests its revisions used (`None`
    /// if it did not exist), for [`Store::remove_unreferenced_packages`].
    pub fn delete_function_packages(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let mut conn = self.inner.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let packages = tx
            .prepare_cached("SELECT DISTINCT package_sha256 FROM revisions WHERE function = ?1")?
            .query_map([name], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
        // Cascades cover revisions and aliases; be explicit anyway.
        tx.execute("DELETE FROM aliases WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM alias_history WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM revisions WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM invocations WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM logs WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM events WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM snapshots WHERE function = ?1", [name])?;
        tx.commit()?;
        Ok((n > 0).then_some(packages))
    }

    // ---------------------------------------------------------------- revisions

    /// Records a deploy as revision N+1 of `spec.name`, in one durable transaction: creates
    /// the function if missing, inserts the revision and, if `promote`, points `production`
    /// at it. The package must already be stored ([`Store::put_package`]) with that size.
    pub fn create_revision(
        &self,
        spec: &FunctionSpec,
        package_sha256: &str,
        package_size: u64,
        promote: bool,
    ) -> Result<RevisionRecord, StoreError> {
        check_function_name(&spec.name)?;
        if !valid_sha256(package_sha256) {
            return Err(StoreError::invalid(
                "package_sha256",
                "must be 64 lowercase hex characters",
            ));
        }
        let path = self.package_path(package_sha256);
        match fs::metadata(&path) {
            Ok(m) if m.len() == package_size => {}
            Ok(m) => {
                return Err(StoreError::invalid(
                    "package_size",
                    format!(
                        "is {package_size} but the stored package is {} bytes",
                        m.len()
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::invalid(
                    "package_sha256",
                    format!("package {package_sha256} has not been uploaded"),
                ));
            }
            Err(e) => return Err(io_at(&path)(e)),
        }
        let spec_json = spec.to_value().to_string();
        let name = spec.name.as_str();
        let runtime = spec.runtime.as_str();
        let now = now_ms();
        let number = {
            let mut conn = self.inner.conn.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO functions (name, created_at_ms, updated_at_ms, latest_revision, runtime, enabled)
                 VALUES (?1, ?2, ?2, 0, ?3, 1) ON CONFLICT(name) DO NOTHING",
                params![name, now, runtime],
            )?;
            let number: u32 = tx.query_row(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM revisions WHERE function = ?1",
                [name],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO revisions (function, number, spec, runtime, package_sha256, package_size, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![name, number, spec_json, runtime, package_sha256, package_size, now],
            )?;
            tx.execute(
                "UPDATE functions SET latest_revision = ?2, runtime = ?3, updated_at_ms = ?4 WHERE name = ?1",
                params![name, number, runtime, now],
            )?;
            if promote {
                aliases::upsert(&tx, name, PRODUCTION, &AliasTarget::Revision(number), now)?;
            }
            tx.commit()?;
            number
        };
        self.inner.pending.lock().remove(package_sha256);
        Ok(RevisionRecord {
            function: name.to_string(),
            number,
            spec: spec.clone(),
            package_sha256: package_sha256.to_string(),
            package_size,
            created_at_ms: now,
        })
    }

    pub fn get_revision(
        &self,
        name: &str,
        number: u32,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        get_revision_in(&conn, name, number)
    }

    /// All revisions of a function, oldest first. `NotFound` if the function does not exist.
    pub fn list_revisions(&self, name: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        if !function_exists(&conn, name)? {
            return Err(function_nf(name));
        }
        let mut stmt = conn.prepare_cached(&format!(
            "{REVISION_SELECT} WHERE function = ?1 ORDER BY number"
        ))?;
        let raws = stmt
            .query_map([name], revision_row)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawRevision::into_record).collect()
    }

    // ---------------------------------------------------------------- artifacts

    /// Stores a package under its SHA-256 (tmp file, fsync, rename, fsync dir) and returns the
    /// digest. Idempotent. Does not validate the contents; see [`Store::read_spec_from_package`].
    pub fn put_package(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let sha = artifacts::sha256_hex(bytes);
        // Protect it from a concurrent gc until a revision references it.
        self.inner
            .pending
            .lock()
            .insert(sha.clone(), Instant::now());
        let dest = self.package_path(&sha);
        if let Ok(m) = fs::metadata(&dest) {
            if m.len() == bytes.len() as u64 {
                return Ok(sha);
            }
        }
        artifacts::write_atomic(
            &self.inner.data_dir.join("artifacts").join("tmp"),
            &dest,
            bytes,
        )?;
        Ok(sha)
    }

    /// Where package `sha` is (or would be) stored.
    pub fn package_path(&self, sha: &str) -> PathBuf {
        self.inner
            .data_dir
            .join("artifacts")
            .join("sha256")
            .join(format!("{sha}.tar.zst"))
    }

    /// Where package `sha` is (or would be) unpacked.
    pub fn code_path(&self, sha: &str) -> PathBuf {
        self.inner.data_dir.join("code").join(sha)
    }

    /// Reads a stored package's bytes.
    pub fn read_package(&self, sha: &str) -> Result<Vec<u8>, StoreError> {
        if !valid_sha256(sha) {
            return Err(StoreError::invalid(
                "sha256",
                "must be 64 lowercase hex characters",
            ));
        }
        let path = self.package_path(sha);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::not_found(format!("package {sha}")))
            }
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Unpacks package `sha` into `code/<sha>/` (once; later calls return the directory).
    /// Extraction goes to a temporary directory that is renamed into place, so the directory
    /// is either complete or absent. Hostile archives are rejected (`Invalid{field:"package"}`):
    /// absolute paths, `..`, paths through symlinks, symlinks/hard links leading outside,
    /// devices/FIFOs, more than [`MAX_UNPACKED_BYTES`] or [`MAX_ENTRIES`]. Files get mode 0644
    /// (0755 if any x bit was set), directories 0755; everything is owned by the server's user
    /// (root in production). The package bytes are checked against `sha` (`Corrupt`).
    pub fn unpack(&self, sha: &str) -> Result<PathBuf, StoreError> {
        if !valid_sha256(sha) {
            return Err(StoreError::invalid(
                "sha256",
                "must be 64 lowercase hex characters",
            ));
        }
        artifacts::unpack(
            &self.package_path(sha),
            &self.inner.data_dir.join("code"),
            sha,
        )
    }

    /// Validates a package (same rules as [`Store::unpack`], without writing anything) and
    /// parses the `function.yaml` at its root. Spec errors come back as
    /// `Invalid{field, message}` naming the spec field; archive problems as
    /// `Invalid{field:"package"}`.
    pub fn read_spec_from_package(bytes: &[u8]) -> Result<(FunctionSpec, PackageInfo), StoreError> {
        artifacts::read_spec(bytes)
    }

    /// Packs a directory as a deterministic tar.zst (zstd level 3): entries sorted, relative
    /// paths, mtime 0, uid/gid 0, modes normalized to 0644/0755. Skips `.git` and
    /// `__pycache__` anywhere, `target/` at the top level, and `node_modules/.cache`.
    /// `progress` is called with the running total of file bytes packed.
    pub fn pack_dir(dir: &Path, mut progress: impl FnMut(u64)) -> Result<Vec<u8>, StoreError> {
        artifacts::pack_dir(dir, &mut progress)
    }

    /// Removes packages and unpacked code that no revision references (packages uploaded in
    /// the last hour by this process and not yet deployed are kept). Returns bytes freed.
    pub fn gc_artifacts(&self) -> Result<u64, StoreError> {
        let referenced: HashSet<String> = {
            let conn = self.inner.conn.lock();
            let mut stmt = conn.prepare("SELECT DISTINCT package_sha256 FROM revisions")?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            rows
        };
        let mut freed = 0u64;
        let sha_dir = self.inner.data_dir.join("artifacts").join("sha256");
        let code_dir = self.inner.data_dir.join("code");
        let mut candidates = Vec::new();
        for entry in fs::read_dir(&sha_dir).map_err(io_at(&sha_dir))?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(sha) = file_name.strip_suffix(".tar.zst") {
                if valid_sha256(sha) && !referenced.contains(sha) {
                    candidates.push((sha.to_string(), entry.path()));
                }
            }
        }
        for entry in fs::read_dir(&code_dir).map_err(io_at(&code_dir))?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if valid_sha256(&file_name) && !referenced.contains(&file_name) {
                candidates.push((file_name, entry.path()));
            }
        }
        for (sha, path) in candidates {
            let mut pending = self.inner.pending.lock();
            pending.retain(|_, at| at.elapsed() < PENDING_GRACE);
            if pending.contains_key(&sha) {
                continue;
            }
            freed += remove_path(&path)?;
        }
        Ok(freed)
    }

    /// Removes the stored package and unpacked code of each digest in `shas` that no revision
    /// references and no upload in progress holds. Returns the bytes freed.
    pub fn remove_unreferenced_packages(&self, shas: &[String]) -> Result<u64, StoreError> {
        let mut freed = 0u64;
        for sha in shas.iter().filter(|s| valid_sha256(s)) {
            // Lock order: pending, then the connection. Holding `pending` across the check and
            // the removal keeps a concurrent upload or deploy of the same digest safe.
            let mut pending = self.inner.pending.lock();
            pending.retain(|_, at| at.elapsed() < PENDING_GRACE);
            if pending.contains_key(sha.as_str()) {
                continue;
            }
            let referenced = self
                .inner
                .conn
                .lock()
                .prepare_cached("SELECT 1 FROM revisions WHERE package_sha256 = ?1")?
                .exists([sha])?;
            if referenced {
                continue;
            }
            for path in [self.package_path(sha), self.code_path(sha)] {
                freed += remove_path(&path)?;
            }
        }
        Ok(freed)
    }

    // ---------------------------------------------------------------- invocations and logs

    /// Queues an invocation record (and its output, split into log lines) for the background
    /// writer. Never blocks: if the queue is full the record is dropped and counted
    /// ([`Store::dropped_invocations`]). Records of functions that no longer exist are discarded.
    pub fn record_invocation(&self, rec: InvocationRecord) {
        self.inner.writer.send(rec);
    }

    /// Blocks until everything queued by `record_invocation` so far is committed.
    pub fn flush(&self) {
        self.inner.writer.flush();
    }

    /// Invocation records dropped because the queue was full.
    pub fn dropped_invocations(&self) -> u64 {
        self.inner.writer.dropped()
    }

    /// The newest `limit` invocation records of a function, newest first (`logs` left empty).
    pub fn list_invocations(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<InvocationRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        if !function_exists(&conn, name)? {
            return Err(function_nf(name));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, function, revision, started_at_ms, duration_us, status, cold, error
             FROM invocations WHERE function = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![name, limit], invocation_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One invocation by request id, with its logs re-joined.
    pub fn get_invocation(&self, request_id: &str) -> Result<Option<InvocationRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let rec = conn
            .prepare_cached(
                "SELECT request_id, function, revision, started_at_ms, duration_us, status, cold, error
                 FROM invocations WHERE request_id = ?1 ORDER BY id DESC LIMIT 1",
            )?
            .query_row([request_id], invocation_row)
            .optional()?;
        let Some(mut rec) = rec else { return Ok(None) };
        let mut stmt = conn.prepare_cached(
            "SELECT line FROM logs WHERE request_id = ?1 AND function = ?2 ORDER BY id",
        )?;
        let mut rows = stmt.query(params![request_id, rec.function])?;
        while let Some(row) = rows.next()? {
            let line: String = row.get(0)?;
            rec.logs.extend_from_slice(line.as_bytes());
            rec.logs.push(b'\n');
        }
        Ok(Some(rec))
    }

    /// Log lines of a function with `id > after_id`, oldest first, at most `limit`.
    pub fn logs(&self, name: &str, after_id: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        let conn = self.inner.conn.lock();
        if !function_exists(&conn, name)? {
            return Err(function_nf(name));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT id, ts_ms, function, revision, request_id, line FROM logs
             WHERE function = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![name, after_id, limit], |r| {
                Ok(LogLine {
                    id: r.get(0)?,
                    ts_ms: r.get(1)?,
                    function: r.get(2)?,
                    revision: r.get(3)?,
                    request_id: r.get(4)?,
                    line: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    // ---------------------------------------------------------------- API keys

    /// Creates an API key. Returns the plaintext (`sk_` + 40 hex chars; show it once, it is
    /// not stored) and its record; only the SHA-256 digest is kept.
    pub fn create_api_key(&self, label: &str) -> Result<(String, ApiKeyRecord), StoreError> {
        if label.chars().count() > 128 || label.chars().any(char::is_control) {
            return Err(StoreError::invalid(
                "label",
                "must be at most 128 characters, without control characters",
            ));
        }
        let key = format!("sk_{}", hex::encode(rand::random::<[u8; 20]>()));
        let digest = Self::key_digest(&key);
        let now = now_ms();
        let conn = self.inner.conn.lock();
        conn.execute(
            "INSERT INTO api_keys (label, digest, created_at_ms) VALUES (?1, ?2, ?3)",
            params![label, digest, now],
        )?;
        let id = conn.last_insert_rowid();
        Ok((
            key,
            ApiKeyRecord {
                id,
                label: label.to_string(),
                created_at_ms: now,
            },
        ))
    }

    /// Whether a key with this SHA-256 hex digest exists (see [`Store::key_digest`]).
    pub fn api_key_exists(&self, digest_hex: &str) -> Result<bool, StoreError> {
        let conn = self.inner.conn.lock();
        let found = conn
            .prepare_cached("SELECT 1 FROM api_keys WHERE digest = ?1")?
            .exists([digest_hex])?;
        Ok(found)
    }

    pub fn has_api_keys(&self) -> Result<bool, StoreError> {
        let conn = self.inner.conn.lock();
        let any = conn
            .prepare_cached("SELECT 1 FROM api_keys LIMIT 1")?
            .exists([])?;
        Ok(any)
    }

    /// API keys, oldest first.
    pub fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let mut stmt =
            conn.prepare_cached("SELECT id, label, created_at_ms FROM api_keys ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ApiKeyRecord {
                    id: r.get(0)?,
                    label: r.get(1)?,
                    created_at_ms: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes an API key. Returns false if there was none with that id.
    pub fn revoke_api_key(&self, id: i64) -> Result<bool, StoreError> {
        let conn = self.inner.conn.lock();
        Ok(conn.execute("DELETE FROM api_keys WHERE id = ?1", [id])? > 0)
    }

    /// SHA-256 hex digest of an API key, as stored.
    pub fn key_digest(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    // ---------------------------------------------------------------- secrets

    /// Creates or replaces a secret. The value is never logged.
    pub fn set_secret(&self, name: &str, value: &str) -> Result<(), StoreError> {
        if !skiff_core::spec::valid_secret_name(name) {
            return Err(StoreError::invalid("name", "must match [a-z0-9_-]{1,63}"));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(StoreError::invalid(
                "value",
                format!(
                    "is {} bytes; at most {MAX_SECRET_BYTES} allowed",
                    value.len()
                ),
            ));
        }
        if value.contains('\0') {
            return Err(StoreError::invalid("value", "must not contain NUL"));
        }
        let conn = self.inner.conn.lock();
        conn.execute(
            "INSERT INTO secrets (name, value, created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
            params![name, value, now_ms()],
        )?;
        Ok(())
    }

    pub fn get_secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        let conn = self.inner.conn.lock();
        let v = conn
            .prepare_cached("SELECT value FROM secrets WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        Ok(v)
    }

    /// Secret names, sorted (never the values).
    pub fn list_secrets(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.inner.conn.lock();
        let mut stmt = conn.prepare_cached("SELECT name FROM secrets ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes a secret. Returns false if it did not exist.
    pub fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let conn = self.inner.conn.lock();
        Ok(conn.execute("DELETE FROM secrets WHERE name = ?1", [name])? > 0)
    }
}

fn invocation_row(r: &Row<'_>) -> rusqlite::Result<InvocationRecord> {
    Ok(InvocationRecord {
        request_id: r.get(0)?,
        function: r.get(1)?,
        revision: r.get(2)?,
        started_at_ms: r.get(3)?,
        duration_us: r.get::<_, i64>(4)?.max(0) as u64,
        status: r.get(5)?,
        cold: r.get(6)?,
        error: r.get(7)?,
        logs: Vec::new(),
    })
}

/// Removes leftovers of interrupted uploads and unpacks.
fn cleanup_temporaries(data_dir: &Path) {
    let tmp = data_dir.join("artifacts").join("tmp");
    for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let _ = fs::remove_file(e.path());
    }
    let code = data_dir.join("code");
    for e in fs::read_dir(&code).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests;

/// Removes a file or directory tree; returns the bytes freed (0 if it was already gone).
fn remove_path(path: &std::path::Path) -> Result<u64, StoreError> {
    let size = artifacts::du(path);
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Ok(()) => Ok(size),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_at(path)(e)),
    }
}
