//! The durable queue of async invocations (events).
//!
//! An event moves `queued → running → done`, or back to `queued` (a retry, due at
//! `next_attempt_at_ms`) or on to `dead` (the dead-letter list) when it fails. Every state
//! change is a transaction on the queue's own `synchronous=FULL` connection, so an event is on
//! disk before [`Store::enqueue_event`] returns. Events left `running` by a crash go back to
//! `queued` with [`Store::requeue_running_events`]: delivery is at least once.

use crate::{function_exists, function_nf, StoreError};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;
use std::fmt;

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// Waiting to run (first attempt or a retry), due at `next_attempt_at_ms`.
    Queued,
    /// Claimed by a worker; an attempt is in progress.
    Running,
    /// Ran successfully.
    Done,
    /// Failed its last attempt (or can never run); in the dead-letter list.
    Dead,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Queued => "queued",
            EventState::Running => "running",
            EventState::Done => "done",
            EventState::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Option<EventState> {
        Some(match s {
            "queued" => EventState::Queued,
            "running" => EventState::Running,
            "done" => EventState::Done,
            "dead" => EventState::Dead,
            _ => return None,
        })
    }
}

impl fmt::Display for EventState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to enqueue.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// Event id; also the request id of every attempt.
    pub id: &'a str,
    pub function: &'a str,
    pub qualifier: Option<&'a str>,
    pub payload: &'a [u8],
    pub client_context: Option<&'a str>,
}

/// One queued, running, finished or dead event. `payload` is not serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    pub id: String,
    pub function: String,
    pub qualifier: Option<String>,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub client_context: Option<String>,
    /// Attempts started so far (a claim counts one).
    pub attempts: u32,
    pub state: EventState,
    pub next_attempt_at_ms: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Number of events per state (across functions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub dead: u64,
}

const EVENT_COLUMNS: &str = "id, function, qualifier, payload, client_context, attempts, state,
     next_attempt_at_ms, last_error, created_at_ms, updated_at_ms";

fn event_row(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    let state: String = r.get(6)?;
    Ok(EventRecord {
        id: r.get(0)?,
        function: r.get(1)?,
        qualifier: r.get(2)?,
        payload: r.get(3)?,
        client_context: r.get(4)?,
        attempts: r.get(5)?,
        state: EventState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                6,
                rusqlite::types::Type::Text,
                format!("unknown event state `{state}`").into(),
            )
        })?,
        next_attempt_at_ms: r.get(7)?,
        last_error: r.get(8)?,
        created_at_ms: r.get(9)?,
        updated_at_ms: r.get(10)?,
    })
}

/// Longest error message kept with an event.
const MAX_ERROR_BYTES: usize = 4096;

fn clip(s: &str) -> &str {
    if s.len() <= MAX_ERROR_BYTES {
        return s;
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl crate::Store {
    /// Durably enqueues an event (committed and fsynced when this returns). `NotFound` if the
    /// function does not exist, `Conflict` if the id is taken.
    pub fn enqueue_event(&self, ev: &NewEvent<'_>, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.inner.queue.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !function_exists(&tx, ev.function)? {
            return Err(function_nf(ev.function));
        }
        let n = tx
            .prepare_cached(
                "INSERT INTO events (id, function, qualifier, payload, client_context, attempts, state,
                    next_attempt_at_ms, created_at_ms, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, 'queued', ?6, ?6, ?6) ON CONFLICT(id) DO NOTHING",
            )?
            .execute(params![
                ev.id,
                ev.function,
                ev.qualifier,
                ev.payload,
                ev.client_context,
                now_ms
            ])?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "event `{}` already exists",
                ev.id
            )));
        }
        tx.commit()?;
        Ok(())
    }

    /// Atomically claims up to `limit` queued events due at `now_ms` (oldest due first): marks
    /// them `running` and counts an attempt. Returns them with their payloads.
    pub fn claim_events(&self, limit: usize, now_ms: i64) -> Result<Vec<EventRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.inner.queue.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "UPDATE events SET state = 'running', attempts = attempts + 1, updated_at_ms = ?2
             WHERE seq IN (SELECT seq FROM events WHERE state = 'queued' AND next_attempt_at_ms <= ?2
                           ORDER BY next_attempt_at_ms, seq LIMIT ?1)
             RETURNING {EVENT_COLUMNS}, seq"
        ))?;
        let mut rows: Vec<(EventRecord, i64)> = stmt
            .query_map(params![limit as i64, now_ms], |r| {
                Ok((event_row(r)?, r.get(11)?))
            })?
            .collect::<Result<_, _>>()?;
        // RETURNING order is unspecified.
        rows.sort_by_key(|(e, seq)| (e.next_attempt_at_ms, *seq));
        Ok(rows.into_iter().map(|(e, _)| e).collect())
    }

    /// Marks a running event done. Returns false if it is not running (deleted, or requeued).
    pub fn complete_event(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let conn = self.inner.queue.lock();
        let n = conn
            .prepare_cached(
                "UPDATE events SET state = 'done', last_error = NULL, updated_at_ms = ?2
                 WHERE id = ?1 AND state = 'running'",
            )?
            .execute(params![id, now_ms])?;
        Ok(n > 0)
    }

    /// Records a failed attempt of a running event: back to `queued` due at `retry_at_ms`, or
    /// `dead` if `None`. Returns false if the event is not running.
    pub fn fail_event(
        &self,
        id: &str,
        error: &str,
        retry_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.inner.queue.lock();
        let n = match retry_at_ms {
            Some(at) => conn
                .prepare_cached(
                    "UPDATE events SET state = 'queued', next_attempt_at_ms = ?3, last_error = ?2,
                        updated_at_ms = ?4 WHERE id = ?1 AND state = 'running'",
                )?
                .execute(params![id, clip(error), at, now_ms])?,
            None => conn
                .prepare_cached(
                    "UPDATE events SET state = 'dead', last_error = ?2, updated_at_ms = ?3
                     WHERE id = ?1 AND state = 'running'",
                )?
                .execute(params![id, clip(error), now_ms])?,
        };
        Ok(n > 0)
    }

    /// Puts events left `running` (by a crash or a shutdown mid-attempt) back to `queued`, due
    /// now. Call once at start, before any worker claims. Returns how many.
    pub fn requeue_running_events(&self, now_ms: i64) -> Result<usize, StoreError> {
        let conn = self.inner.queue.lock();
        Ok(conn.execute(
            "UPDATE events SET state = 'queued', next_attempt_at_ms = ?1, updated_at_ms = ?1
             WHERE state = 'running'",
            [now_ms],
        )?)
    }

    /// When the next queued event is due (None if nothing is queued).
    pub fn next_event_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let conn = self.inner.queue.lock();
        let at = conn
            .prepare_cached("SELECT MIN(next_attempt_at_ms) FROM events WHERE state = 'queued'")?
            .query_row([], |r| r.get(0))?;
        Ok(at)
    }

    /// One event of a function, with its payload.
    pub fn get_event(&self, function: &str, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let conn = self.inner.queue.lock();
        let ev = conn
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE id = ?1 AND function = ?2"
            ))?
            .query_row([id, function], event_row)
            .optional()?;
        Ok(ev)
    }

    /// The dead-letter list of a function, oldest first, at most `limit`. `NotFound` if the
    /// function does not exist.
    pub fn list_dead_events(
        &self,
        function: &str,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let conn = self.inner.queue.lock();
        if !function_exists(&conn, function)? {
            return Err(function_nf(function));
        }
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE function = ?1 AND state = 'dead'
             ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![function, limit], event_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Sends a dead event back to the queue with a fresh attempt budget. `NotFound` unless
    /// the function has a dead event with this id.
    pub fn redrive_event(&self, function: &str, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let conn = self.inner.queue.lock();
        let n = conn
            .prepare_cached(
                "UPDATE events SET state = 'queued', attempts = 0, next_attempt_at_ms = ?3,
                    updated_at_ms = ?3
                 WHERE id = ?1 AND function = ?2 AND state = 'dead'",
            )?
            .execute(params![id, function, now_ms])?;
        if n == 0 {
            return Err(dead_nf(function, id));
        }
        Ok(())
    }

    /// Deletes a dead event. `NotFound` unless the function has a dead event with this id.
    pub fn delete_dead_event(&self, function: &str, id: &str) -> Result<(), StoreError> {
        let conn = self.inner.queue.lock();
        let n = conn
            .prepare_cached(
                "DELETE FROM events WHERE id = ?1 AND function = ?2 AND state = 'dead'",
            )?
            .execute([id, function])?;
        if n == 0 {
            return Err(dead_nf(function, id));
        }
        Ok(())
    }

    /// Bounds the table: keeps the newest `keep_done` done events overall and the newest
    /// `keep_dead` dead events per function. Returns how many rows were removed.
    pub fn prune_events(&self, keep_done: u32, keep_dead: u32) -> Result<usize, StoreError> {
        let mut conn = self.inner.queue.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = tx.execute(
            "DELETE FROM events WHERE state = 'done' AND seq <=
               (SELECT seq FROM events WHERE state = 'done' ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
            [keep_done],
        )?;
        let over: Vec<String> = tx
            .prepare(
                "SELECT function FROM events WHERE state = 'dead' GROUP BY function
                 HAVING COUNT(*) > ?1",
            )?
            .query_map([keep_dead], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for f in over {
            n += tx.execute(
                "DELETE FROM events WHERE function = ?1 AND state = 'dead' AND seq <=
                   (SELECT seq FROM events WHERE function = ?1 AND state = 'dead'
                    ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                params![f, keep_dead],
            )?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// How many events are in each state.
    pub fn event_counts(&self) -> Result<EventCounts, StoreError> {
        let conn = self.inner.queue.lock();
        let mut c = EventCounts::default();
        let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM events GROUP BY state")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let n = r.get::<_, i64>(1)?.max(0) as u64;
            match EventState::parse(&r.get::<_, String>(0)?) {
                Some(EventState::Queued) => c.queued = n,
                Some(EventState::Running) => c.running = n,
                Some(EventState::Done) => c.done = n,
                Some(EventState::Dead) => c.dead = n,
                None => {}
            }
        }
        Ok(c)
    }
}

fn dead_nf(function: &str, id: &str) -> StoreError {
    StoreError::not_found(format!(
        "dead-lettered event `{id}` of function `{function}`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{spawn_kill_child, KILL_CHILD_ENV};
    use crate::Store;
    use skiff_core::FunctionSpec;
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;

    fn open_with_function(name: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        create(&store, name);
        (dir, store)
    }

    fn create(store: &Store, name: &str) {
        let spec = FunctionSpec::from_yaml(&format!(
            "name: {name}\nruntime: python3\nhandler: main.handler\n"
        ))
        .unwrap();
        store.create_function(&spec).unwrap();
    }

    fn enqueue(store: &Store, function: &str, id: &str, payload: &[u8], now: i64) {
        store
            .enqueue_event(
                &NewEvent {
                    id,
                    function,
                    qualifier: Some("2"),
                    payload,
                    client_context: Some("ctx"),
                },
                now,
            )
            .unwrap();
    }

    #[test]
    fn lifecycle_claim_complete() {
        let (_d, store) = open_with_function("f");
        enqueue(&store, "f", "e1", b"{\"a\":1}", 1000);
        enqueue(&store, "f", "e2", b"\x00\xff", 1001);
        let ev = store.get_event("f", "e1").unwrap().unwrap();
        assert_eq!(
            (ev.state, ev.attempts, ev.qualifier.as_deref()),
            (EventState::Queued, 0, Some("2"))
        );
        // Not due before its time.
        assert!(store.claim_events(10, 999).unwrap().is_empty());
        let claimed = store.claim_events(1, 2000).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, "e1", "oldest first");
        assert_eq!(claimed[0].payload, b"{\"a\":1}");
        assert_eq!(claimed[0].client_context.as_deref(), Some("ctx"));
        assert_eq!(
            (claimed[0].state, claimed[0].attempts),
            (EventState::Running, 1)
        );
        let rest = store.claim_events(10, 2000).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].payload, b"\x00\xff");
        // Nothing left to claim: a running event is never handed out twice.
        assert!(store.claim_events(10, 9999).unwrap().is_empty());
        assert!(store.complete_event("e1", 2100).unwrap());
        assert!(!store.complete_event("e1", 2100).unwrap(), "already done");
        let ev = store.get_event("f", "e1").unwrap().unwrap();
        assert_eq!((ev.state, ev.updated_at_ms), (EventState::Done, 2100));
        assert!(store.get_event("other", "e1").unwrap().is_none());
        let c = store.event_counts().unwrap();
        assert_eq!((c.queued, c.running, c.done, c.dead), (0, 1, 1, 0));
    }

    #[test]
    fn enqueue_checks_function_and_id() {
        let (_d, store) = open_with_function("f");
        let ev = NewEvent {
            id: "x",
            function: "nope",
            qualifier: None,
            payload: b"{}",
            client_context: None,
        };
        assert!(store.enqueue_event(&ev, 1).unwrap_err().is_not_found());
        enqueue(&store, "f", "x", b"{}", 1);
        let dup = NewEvent {
            function: "f",
            ..ev
        };
        assert!(matches!(
            store.enqueue_event(&dup, 2),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn retries_then_dead_letter_and_redrive() {
        let (_d, store) = open_with_function("f");
        enqueue(&store, "f", "e", b"{}", 0);
        let e = &store.claim_events(5, 0).unwrap()[0];
        assert_eq!(e.attempts, 1);
        assert!(store.fail_event("e", "boom 1", Some(1000), 10).unwrap());
        let ev = store.get_event("f", "e").unwrap().unwrap();
        assert_eq!(ev.state, EventState::Queued);
        assert_eq!(ev.last_error.as_deref(), Some("boom 1"));
        assert_eq!(store.next_event_due_ms().unwrap(), Some(1000));
        assert!(store.claim_events(5, 999).unwrap().is_empty(), "backoff");
        assert_eq!(store.claim_events(5, 1000).unwrap()[0].attempts, 2);
        assert!(!store.fail_event("nope", "x", None, 1).unwrap());
        assert!(store.fail_event("e", "boom 2", None, 1100).unwrap());
        assert_eq!(store.next_event_due_ms().unwrap(), None);
        let dead = store.list_dead_events("f", 100).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].attempts, dead[0].last_error.as_deref()),
            (2, Some("boom 2"))
        );
        assert!(store.claim_events(5, 99_999).unwrap().is_empty());
        assert!(store
            .list_dead_events("nope", 10)
            .unwrap_err()
            .is_not_found());

        // Redrive: queued again with a fresh attempt budget.
        assert!(store
            .redrive_event("f", "missing", 0)
            .unwrap_err()
            .is_not_found());
        store.redrive_event("f", "e", 2000).unwrap();
        assert!(
            store.redrive_event("f", "e", 2000).is_err(),
            "only dead events"
        );
        let again = store.claim_events(5, 2000).unwrap();
        assert_eq!(again[0].attempts, 1);
        store.fail_event("e", "boom 3", None, 2100).unwrap();
        store.delete_dead_event("f", "e").unwrap();
        assert!(store
            .delete_dead_event("f", "e")
            .unwrap_err()
            .is_not_found());
        assert!(store.get_event("f", "e").unwrap().is_none());
    }

    #[test]
    fn long_errors_are_clipped_on_a_char_boundary() {
        let (_d, store) = open_with_function("f");
        enqueue(&store, "f", "e", b"{}", 0);
        store.claim_events(1, 0).unwrap();
        let long = "é".repeat(MAX_ERROR_BYTES);
        store.fail_event("e", &long, None, 1).unwrap();
        let err = store
            .get_event("f", "e")
            .unwrap()
            .unwrap()
            .last_error
            .unwrap();
        assert!(err.len() <= MAX_ERROR_BYTES && err.len() >= MAX_ERROR_BYTES - 1);
    }

    #[test]
    fn requeue_running_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            create(&store, "f");
            for i in 0..3 {
                enqueue(&store, "f", &format!("e{i}"), b"{}", 0);
            }
            assert_eq!(store.claim_events(2, 0).unwrap().len(), 2);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.requeue_running_events(50).unwrap(), 2);
        let all = store.claim_events(10, 50).unwrap();
        let mut ids: Vec<_> = all.iter().map(|e| (e.id.as_str(), e.attempts)).collect();
        ids.sort();
        // The interrupted attempts still count.
        assert_eq!(ids, [("e0", 2), ("e1", 2), ("e2", 1)]);
    }

    #[test]
    fn deleting_the_function_drops_its_events() {
        let (_d, store) = open_with_function("f");
        create(&store, "g");
        enqueue(&store, "f", "a", b"{}", 0);
        enqueue(&store, "g", "b", b"{}", 0);
        store.claim_events(1, 0).unwrap();
        assert!(store.delete_function("f").unwrap());
        assert!(store.get_event("f", "a").unwrap().is_none());
        assert!(!store.complete_event("a", 1).unwrap());
        assert_eq!(store.claim_events(10, 1).unwrap()[0].id, "b");
    }

    #[test]
    fn prune_keeps_newest_done_and_dead() {
        let (_d, store) = open_with_function("f");
        create(&store, "g");
        for i in 0..6 {
            enqueue(&store, "f", &format!("ok{i}"), b"{}", 0);
        }
        for e in store.claim_events(10, 0).unwrap() {
            store.complete_event(&e.id, 1).unwrap();
        }
        for (f, n) in [("f", 4), ("g", 2)] {
            for i in 0..n {
                enqueue(&store, f, &format!("{f}-bad{i}"), b"{}", 2);
            }
        }
        enqueue(&store, "f", "waiting", b"{}", 1_000_000);
        for e in store.claim_events(10, 2).unwrap() {
            store.fail_event(&e.id, "x", None, 3).unwrap();
        }
        assert_eq!(store.prune_events(2, 2).unwrap(), 4 + 2);
        let c = store.event_counts().unwrap();
        assert_eq!((c.done, c.dead, c.queued), (2, 4, 1));
        assert!(store.get_event("f", "ok5").unwrap().is_some());
        assert!(store.get_event("f", "ok3").unwrap().is_none());
        let f_dead: Vec<_> = store
            .list_dead_events("f", 10)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(f_dead, ["f-bad2", "f-bad3"]);
        assert_eq!(store.list_dead_events("g", 10).unwrap().len(), 2);
    }

    /// Not a real test on its own: run by `enqueued_events_survive_sigkill` in a child process.
    #[test]
    fn kill_child_enqueues_events() {
        let Ok(dir) = std::env::var(KILL_CHILD_ENV) else {
            return;
        };
        let store = Store::open(Path::new(&dir)).unwrap();
        create(&store, "victim");
        let mut out = std::io::stdout().lock();
        for i in 0u32.. {
            let id = format!("ev-{i}");
            enqueue(&store, "victim", &id, id.as_bytes(), 0);
            if i % 3 == 0 {
                // Some are mid-attempt when the process dies.
                store.claim_events(1, 0).unwrap();
            }
            writeln!(out, "ACK {i}").unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn enqueued_events_survive_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_kill_child("queue::tests::kill_child_enqueues_events", dir.path());
        let mut acked = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            if let Some(n) = line.unwrap().strip_prefix("ACK ") {
                let n: u32 = n.parse().unwrap();
                acked = Some(n);
                if n == 40 {
                    child.kill().unwrap();
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(acked, Some(40), "child did not get far enough");
        let store = Store::open(dir.path()).unwrap();
        let running = store.requeue_running_events(1).unwrap();
        assert!(running >= 1, "some events were running");
        let claimed = store.claim_events(1000, 1).unwrap();
        for i in 0..=40u32 {
            let id = format!("ev-{i}");
            let ev = claimed
                .iter()
                .find(|e| e.id == id)
                .unwrap_or_else(|| panic!("acknowledged event {id} lost"));
            assert_eq!(ev.payload, id.as_bytes());
        }
    }
}
