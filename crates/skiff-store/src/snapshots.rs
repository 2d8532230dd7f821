//! Snapshots of running instances (`POST /v1/functions/{name}/snapshots`): one row per
//! snapshot, the image itself in `<data>/snapshots/<id>/` (written by the sandbox tier).
//! Rows go with their revision (and function); the caller removes the directories.

use crate::error::io_at;
use crate::{now_ms, Store, StoreError};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One saved snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub function: String,
    pub revision: u32,
    pub created_at_ms: i64,
    /// Size of the image directory on disk.
    pub size_bytes: u64,
}

const SELECT: &str = "SELECT id, function, revision, created_at_ms, size_bytes FROM snapshots";

fn row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.get(0)?,
        function: r.get(1)?,
        revision: r.get(2)?,
        created_at_ms: r.get(3)?,
        size_bytes: r.get::<_, i64>(4)? as u64,
    })
}

/// Whether `id` is a well-formed snapshot id (so it is safe as a directory name).
pub fn valid_snapshot_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Store {
    /// Where the image of snapshot `id` lives (`<data>/snapshots/<id>`). Refuses ids that are
    /// not [`valid_snapshot_id`].
    pub fn snapshot_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_snapshot_id(id) {
            return Err(StoreError::invalid("id", "must match [a-z0-9-]{1,64}"));
        }
        Ok(self.inner.data_dir.join("snapshots").join(id))
    }

    /// Records a snapshot whose image is complete on disk. The revision must exist.
    pub fn insert_snapshot(
        &self,
        id: &str,
        function: &str,
        revision: u32,
        size_bytes: u64,
    ) -> Result<SnapshotRecord, StoreError> {
        if !valid_snapshot_id(id) {
            return Err(StoreError::invalid("id", "must match [a-z0-9-]{1,64}"));
        }
        let rec = SnapshotRecord {
            id: id.to_string(),
            function: function.to_string(),
            revision,
            created_at_ms: now_ms(),
            size_bytes,
        };
        let conn = self.inner.conn.lock();
        let exists = conn
            .prepare_cached("SELECT 1 FROM revisions WHERE function = ?1 AND number = ?2")?
            .exists(params![function, revision])?;
        if !exists {
            return Err(StoreError::not_found(format!(
                "revision {revision} of function `{function}`"
            )));
        }
        conn.prepare_cached(
            "INSERT INTO snapshots (id, function, revision, created_at_ms, size_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            rec.id,
            rec.function,
            rec.revision,
            rec.created_at_ms,
            rec.size_bytes as i64
        ])
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::Conflict(format!("snapshot `{id}` already exists"))
            }
            e => e.into(),
        })?;
        Ok(rec)
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let rec = conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
            .query_row([id], row)
            .optional()?;
        Ok(rec)
    }

    /// Snapshots, newest first; only `function`'s when given.
    pub fn list_snapshots(
        &self,
        function: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let rows = match function {
            Some(f) => conn
                .prepare_cached(&format!(
                    "{SELECT} WHERE function = ?1 ORDER BY created_at_ms DESC, id"
                ))?
                .query_map([f], row)?
                .collect::<Result<Vec<_>, _>>()?,
            None => conn
                .prepare_cached(&format!("{SELECT} ORDER BY created_at_ms DESC, id"))?
                .query_map([], row)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// Deletes a snapshot's row and its image directory. Returns the record, `None` if there
    /// was no such snapshot.
    pub fn delete_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let rec = {
            let conn = self.inner.conn.lock();
            let rec = conn
                .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
                .query_row([id], row)
                .optional()?;
            conn.prepare_cached("DELETE FROM snapshots WHERE id = ?1")?
                .execute([id])?;
            rec
        };
        if rec.is_some() {
            self.remove_snapshot_dir(id)?;
        }
        Ok(rec)
    }

    /// Removes a snapshot image directory (if present), e.g. of a deleted function's
    /// snapshots or of one whose checkpoint failed.
    pub fn remove_snapshot_dir(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.snapshot_dir(id)?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(&dir)(e)),
            _ => Ok(()),
        }
    }
}
