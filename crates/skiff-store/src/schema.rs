//! Connection setup and schema migrations (`PRAGMA user_version`).

use crate::StoreError;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// How long a connection waits for the other one's write lock before failing with BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Migrations, in order. Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: initial schema.
    r#"
    CREATE TABLE functions (
        name           TEXT PRIMARY KEY NOT NULL,
        created_at_ms  INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL,
        latest_revision INTEGER NOT NULL DEFAULT 0,
        runtime        TEXT,
        enabled        INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE revisions (
        function       TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
        number         INTEGER NOT NULL,
        spec           TEXT NOT NULL,
        runtime        TEXT NOT NULL,
        package_sha256 TEXT NOT NULL,
        package_size   INTEGER NOT NULL,
        created_at_ms  INTEGER NOT NULL,
        PRIMARY KEY (function, number)
    );
    CREATE INDEX revisions_by_package ON revisions(package_sha256);
    CREATE TABLE aliases (
        function      TEXT NOT NULL,
        name          TEXT NOT NULL,
        revision      INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (function, name),
        FOREIGN KEY (function, revision) REFERENCES revisions(function, number) ON DELETE CASCADE
    );
    CREATE INDEX aliases_by_revision ON aliases(function, revision);
    CREATE TABLE invocations (
        id            INTEGER PRIMARY KEY,
        request_id    TEXT NOT NULL,
        function      TEXT NOT NULL,
        revision      INTEGER NOT NULL,
        started_at_ms INTEGER NOT NULL,
        duration_us   INTEGER NOT NULL,
        status        TEXT NOT NULL,
        cold          INTEGER NOT NULL,
        error         TEXT
    );
    CREATE INDEX invocations_by_function ON invocations(function, id);
    CREATE INDEX invocations_by_request ON invocations(request_id);
    CREATE TABLE logs (
        id         INTEGER PRIMARY KEY,
        ts_ms      INTEGER NOT NULL,
        function   TEXT NOT NULL,
        revision   INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        line       TEXT NOT NULL
    );
    CREATE INDEX logs_by_function ON logs(function, id);
    CREATE INDEX logs_by_request ON logs(request_id);
    CREATE TABLE api_keys (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        label         TEXT NOT NULL,
        digest        TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE secrets (
        name          TEXT PRIMARY KEY NOT NULL,
        value         TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    "#,
    // 1 -> 2: the durable queue of async invocations (see `queue.rs`).
    r#"
    CREATE TABLE events (
        seq                INTEGER PRIMARY KEY,
        id                 TEXT NOT NULL UNIQUE,
        function           TEXT NOT NULL,
        qualifier          TEXT,
        payload            BLOB NOT NULL,
        client_context     TEXT,
        attempts           INTEGER NOT NULL DEFAULT 0,
        state              TEXT NOT NULL,
        next_attempt_at_ms INTEGER NOT NULL,
        last_error         TEXT,
        created_at_ms      INTEGER NOT NULL,
        updated_at_ms      INTEGER NOT NULL
    );
    CREATE INDEX events_due ON events(state, next_attempt_at_ms, seq);
    CREATE INDEX events_by_function ON events(function, state, seq);
    "#,
    // 2 -> 3: weighted alias splits and alias history (see `aliases.rs`). `aliases.revision`
    // stays the primary (largest-weight) revision of a split, so the foreign key still holds.
    r#"
    ALTER TABLE aliases ADD COLUMN routes TEXT;
    CREATE TABLE alias_history (
        id            INTEGER PRIMARY KEY,
        function      TEXT NOT NULL,
        alias         TEXT NOT NULL,
        revision      INTEGER NOT NULL,
        routes        TEXT,
        changed_at_ms INTEGER NOT NULL
    );
    CREATE INDEX alias_history_by_alias ON alias_history(function, alias, id);
    INSERT INTO alias_history (function, alias, revision, routes, changed_at_ms)
        SELECT function, name, revision, NULL, updated_at_ms FROM aliases;
    "#,
    // 3 -> 4: snapshots of running instances (see `snapshots.rs`); the image is a directory
    // `<data>/snapshots/<id>/`.
    r#"
    CREATE TABLE snapshots (
        id            TEXT PRIMARY KEY NOT NULL,
        function      TEXT NOT NULL,
        revision      INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        size_bytes    INTEGER NOT NULL,
        FOREIGN KEY (function, revision) REFERENCES revisions(function, number) ON DELETE CASCADE
    );
    CREATE INDEX snapshots_by_function ON snapshots(function, created_at_ms);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Which durability a connection gets.
#[derive(Clone, Copy)]
pub(crate) enum Sync {
    /// `synchronous=FULL`: every commit is fsynced before it returns.
    Full,
    /// `synchronous=NORMAL`: WAL commits are durable at the next checkpoint/fsync.
    Normal,
}

/// Opens a connection with the store's pragmas.
pub(crate) fn connect(path: &Path, sync: Sync) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "{}: could not switch to WAL journal mode (got {mode})",
            path.display()
        )));
    }
    let level = match sync {
        Sync::Full => "FULL",
        Sync::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per migration.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this build supports ({SCHEMA_VERSION}); upgrade skiff"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        // Re-check under the lock: another process may have migrated meanwhile.
        let now: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now as usize > i {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "migrated store schema");
    }
    Ok(())
}
