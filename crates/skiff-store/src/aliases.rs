//! Aliases (named pointers to a revision or a weighted split across revisions), their
//! history (for rollback) and qualifier resolution.
//!
//! A split is stored as JSON in `aliases.routes`; `aliases.revision` holds its primary
//! (largest-weight) revision so the foreign key to `revisions` keeps holding. Every change of
//! an alias's value is appended to `alias_history` (newest [`HISTORY_KEPT`] kept per alias).

use crate::{
    check_alias_name, function_exists, function_nf, get_revision_in, now_ms, AliasRecord,
    RevisionRecord, Store, StoreError, LATEST, PRODUCTION,
};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;
use skiff_core::split::Route;

/// History entries kept per alias.
pub const HISTORY_KEPT: u32 = 100;

/// What an alias points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AliasTarget {
    Revision(u32),
    /// Validated routes (see [`skiff_core::split::validate`]), two or more.
    Split(Vec<Route>),
}

impl AliasTarget {
    /// A split of one route is just that revision.
    pub fn from_routes(routes: Vec<Route>) -> AliasTarget {
        match routes.as_slice() {
            [one] => AliasTarget::Revision(one.revision),
            _ => AliasTarget::Split(routes),
        }
    }

    /// The revision, or a split's largest-weight revision (first on ties).
    pub fn primary(&self) -> u32 {
        match self {
            AliasTarget::Revision(n) => *n,
            AliasTarget::Split(routes) => routes
                .iter()
                .rev()
                .max_by_key(|r| r.weight)
                .map_or(0, |r| r.revision),
        }
    }

    fn routes(&self) -> Option<&[Route]> {
        match self {
            AliasTarget::Revision(_) => None,
            AliasTarget::Split(r) => Some(r),
        }
    }

    fn routes_json(&self) -> Option<String> {
        self.routes()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
    }

    fn from_columns(revision: u32, routes: Option<String>) -> rusqlite::Result<AliasTarget> {
        match routes {
            None => Ok(AliasTarget::Revision(revision)),
            Some(json) => serde_json::from_str(&json)
                .map(AliasTarget::Split)
                .map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                }),
        }
    }
}

/// One past value of an alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AliasHistoryEntry {
    pub revision: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<Route>>,
    pub changed_at_ms: i64,
}

/// A qualifier resolved to what can run: one revision with weight 100, or a split's
/// revisions with their weights, in route order.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// Whether the function is enabled (`PATCH {"enabled": false}` disables it).
    pub enabled: bool,
    pub routes: Vec<(RevisionRecord, u8)>,
}

fn alias_row(row: &Row<'_>) -> rusqlite::Result<AliasRecord> {
    let target = AliasTarget::from_columns(row.get(2)?, row.get(3)?)?;
    Ok(AliasRecord {
        function: row.get(0)?,
        name: row.get(1)?,
        revision: target.primary(),
        routes: match target {
            AliasTarget::Revision(_) => None,
            AliasTarget::Split(r) => Some(r),
        },
        updated_at_ms: row.get(4)?,
    })
}

const ALIAS_SELECT: &str = "SELECT function, name, revision, routes, updated_at_ms FROM aliases";

fn current(
    conn: &Connection,
    function: &str,
    alias: &str,
) -> Result<Option<AliasTarget>, StoreError> {
    let t = conn
        .prepare_cached("SELECT revision, routes FROM aliases WHERE function = ?1 AND name = ?2")?
        .query_row([function, alias], |r| {
            AliasTarget::from_columns(r.get(0)?, r.get(1)?)
        })
        .optional()?;
    Ok(t)
}

/// Points `alias` at `target` (creating or moving it) and, if its value changed, appends it to
/// the history. The caller checks that the revisions exist.
pub(crate) fn upsert(
    conn: &Connection,
    function: &str,
    alias: &str,
    target: &AliasTarget,
    now: i64,
) -> Result<(), StoreError> {
    if current(conn, function, alias)?.as_ref() == Some(target) {
        return Ok(());
    }
    let routes = target.routes_json();
    conn.prepare_cached(
        "INSERT INTO aliases (function, name, revision, routes, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(function, name) DO UPDATE SET revision = excluded.revision,
            routes = excluded.routes, updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![function, alias, target.primary(), routes, now])?;
    conn.prepare_cached(
        "INSERT INTO alias_history (function, alias, revision, routes, changed_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![function, alias, target.primary(), routes, now])?;
    conn.prepare_cached(
        "DELETE FROM alias_history WHERE function = ?1 AND alias = ?2 AND id <= (
            SELECT id FROM alias_history WHERE function = ?1 AND alias = ?2
            ORDER BY id DESC LIMIT 1 OFFSET ?3)",
    )?
    .execute(params![function, alias, HISTORY_KEPT])?;
    Ok(())
}

fn check_revisions(conn: &Connection, name: &str, target: &AliasTarget) -> Result<(), StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT 1 FROM revisions WHERE function = ?1 AND number = ?2")?;
    let numbers: Vec<u32> = match target {
        AliasTarget::Revision(n) => vec![*n],
        AliasTarget::Split(r) => r.iter().map(|r| r.revision).collect(),
    };
    for n in numbers {
        if !stmt.exists(params![name, n])? {
            return Err(StoreError::not_found(format!(
                "revision {n} of function `{name}`"
            )));
        }
    }
    Ok(())
}

/// Resolves a qualifier to a revision number, or an alias to its target.
fn qualifier_target(conn: &Connection, name: &str, q: &str) -> Result<AliasTarget, StoreError> {
    let latest: u32 = conn
        .prepare_cached("SELECT latest_revision FROM functions WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| function_nf(name))?;
    if q == LATEST {
        if latest == 0 {
            return Err(StoreError::not_found(format!(
                "revision $LATEST of function `{name}` (nothing deployed yet)"
            )));
        }
        Ok(AliasTarget::Revision(latest))
    } else if !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit()) {
        q.parse::<u32>()
            .map(AliasTarget::Revision)
            .map_err(|_| StoreError::not_found(format!("revision {q} of function `{name}`")))
    } else {
        current(conn, name, q)?
            .ok_or_else(|| StoreError::not_found(format!("alias `{q}` of function `{name}`")))
    }
}

fn revision_nf(name: &str, number: u32) -> StoreError {
    StoreError::not_found(format!("revision {number} of function `{name}`"))
}

impl Store {
    /// Resolves a qualifier to one revision: `None` → alias `production`; `$LATEST` → newest
    /// revision; digits → that revision; anything else → that alias (for a split, its
    /// largest-weight revision; see [`Store::resolve_routes`] for the whole split).
    pub fn resolve(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<RevisionRecord, StoreError> {
        let conn = self.inner.conn.lock();
        let n = qualifier_target(&conn, name, qualifier.unwrap_or(PRODUCTION))?.primary();
        get_revision_in(&conn, name, n)?.ok_or_else(|| revision_nf(name, n))
    }

    /// Resolves a qualifier like [`Store::resolve`], keeping a split whole, and reports
    /// whether the function is enabled.
    pub fn resolve_routes(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<Resolution, StoreError> {
        let conn = self.inner.conn.lock();
        let target = qualifier_target(&conn, name, qualifier.unwrap_or(PRODUCTION))?;
        let enabled: bool = conn
            .prepare_cached("SELECT enabled FROM functions WHERE name = ?1")?
            .query_row([name], |r| r.get(0))?;
        let weighted: Vec<(u32, u8)> = match target {
            AliasTarget::Revision(n) => vec![(n, 100)],
            AliasTarget::Split(r) => r.iter().map(|r| (r.revision, r.weight)).collect(),
        };
        let mut routes = Vec::with_capacity(weighted.len());
        for (n, w) in weighted {
            let rec = get_revision_in(&conn, name, n)?.ok_or_else(|| revision_nf(name, n))?;
            routes.push((rec, w));
        }
        Ok(Resolution { enabled, routes })
    }

    /// Points `alias` at an existing revision (creating or moving it).
    pub fn set_alias(
        &self,
        name: &str,
        alias: &str,
        revision: u32,
    ) -> Result<AliasRecord, StoreError> {
        self.set_alias_target(name, alias, &AliasTarget::Revision(revision))
    }

    /// Points `alias` at a revision or a split; every revision must exist (`NotFound`).
    pub fn set_alias_target(
        &self,
        name: &str,
        alias: &str,
        target: &AliasTarget,
    ) -> Result<AliasRecord, StoreError> {
        check_alias_name(alias)?;
        let mut conn = self.inner.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !function_exists(&tx, name)? {
            return Err(function_nf(name));
        }
        check_revisions(&tx, name, target)?;
        let now = now_ms();
        upsert(&tx, name, alias, target, now)?;
        tx.execute(
            "UPDATE functions SET updated_at_ms = ?2 WHERE name = ?1",
            params![name, now],
        )?;
        let rec = tx
            .prepare_cached(&format!("{ALIAS_SELECT} WHERE function = ?1 AND name = ?2"))?
            .query_row([name, alias], alias_row)?;
        tx.commit()?;
        Ok(rec)
    }

    /// Moves `alias` back. With `to`, onto that revision. Without, onto the value it had
    /// before its current one (so a second rollback undoes the first, as `kubectl rollout
    /// undo` does); with no such history, onto the newest revision below the current one.
    /// `NotFound` if the alias or `to` does not exist, `Conflict` if there is nothing earlier.
    pub fn rollback_alias(
        &self,
        name: &str,
        alias: &str,
        to: Option<u32>,
    ) -> Result<AliasRecord, StoreError> {
        let target = {
            let conn = self.inner.conn.lock();
            if !function_exists(&conn, name)? {
                return Err(function_nf(name));
            }
            let cur = current(&conn, name, alias)?.ok_or_else(|| {
                StoreError::not_found(format!("alias `{alias}` of function `{name}`"))
            })?;
            match to {
                Some(n) => AliasTarget::Revision(n),
                None => self.previous_target(&conn, name, alias, &cur)?,
            }
        };
        // Another change may land in between; the rollback then applies on top of it, which
        // is what a later request would have done anyway.
        self.set_alias_target(name, alias, &target)
    }

    fn previous_target(
        &self,
        conn: &Connection,
        name: &str,
        alias: &str,
        cur: &AliasTarget,
    ) -> Result<AliasTarget, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT revision, routes FROM alias_history WHERE function = ?1 AND alias = ?2
             ORDER BY id DESC",
        )?;
        let mut rows = stmt.query([name, alias])?;
        while let Some(row) = rows.next()? {
            let t = AliasTarget::from_columns(row.get(0)?, row.get(1)?)?;
            if &t != cur {
                return Ok(t);
            }
        }
        let below: Option<u32> = conn
            .prepare_cached(
                "SELECT MAX(number) FROM revisions WHERE function = ?1 AND number < ?2",
            )?
            .query_row(params![name, cur.primary()], |r| r.get(0))?;
        below.map(AliasTarget::Revision).ok_or_else(|| {
            StoreError::Conflict(format!(
                "alias `{alias}` of function `{name}` has no earlier revision to roll back to"
            ))
        })
    }

    /// Past values of an alias, newest first (the first is its current value).
    pub fn alias_history(
        &self,
        name: &str,
        alias: &str,
    ) -> Result<Vec<AliasHistoryEntry>, StoreError> {
        let conn = self.inner.conn.lock();
        if !function_exists(&conn, name)? {
            return Err(function_nf(name));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT revision, routes, changed_at_ms FROM alias_history
             WHERE function = ?1 AND alias = ?2 ORDER BY id DESC",
        )?;
        let rows = stmt
            .query_map([name, alias], |r| {
                let t = AliasTarget::from_columns(r.get(0)?, r.get(1)?)?;
                Ok(AliasHistoryEntry {
                    revision: t.primary(),
                    routes: t.routes().map(<[Route]>::to_vec),
                    changed_at_ms: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn get_alias(&self, name: &str, alias: &str) -> Result<Option<AliasRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        let rec = conn
            .prepare_cached(&format!("{ALIAS_SELECT} WHERE function = ?1 AND name = ?2"))?
            .query_row([name, alias], alias_row)
            .optional()?;
        Ok(rec)
    }

    /// Aliases of a function, by name. `NotFound` if the function does not exist.
    pub fn list_aliases(&self, name: &str) -> Result<Vec<AliasRecord>, StoreError> {
        let conn = self.inner.conn.lock();
        if !function_exists(&conn, name)? {
            return Err(function_nf(name));
        }
        let mut stmt =
            conn.prepare_cached(&format!("{ALIAS_SELECT} WHERE function = ?1 ORDER BY name"))?;
        let rows = stmt
            .query_map([name], alias_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Removes an alias and its history. Returns false if it did not exist.
    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<bool, StoreError> {
        let mut conn = self.inner.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM aliases WHERE function = ?1 AND name = ?2",
            [name, alias],
        )?;
        tx.execute(
            "DELETE FROM alias_history WHERE function = ?1 AND alias = ?2",
            [name, alias],
        )?;
        tx.commit()?;
        Ok(n > 0)
    }
}
