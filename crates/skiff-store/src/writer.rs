//! The background writer for invocation records and logs: a bounded queue drained by one
//! thread that group-commits on its own `synchronous=NORMAL` connection. After the first
//! record of a batch the thread collects for `batch_interval` without being woken per record
//! (it parks; only a flush unparks it), so a busy server pays one thread wake-up per batch,
//! not per request.

use crate::{InvocationRecord, StoreOptions};
use rusqlite::{params, Connection};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines longer than this are cut (with a marker).
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Prune at least this often while records are arriving.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

enum Msg {
    Record(InvocationRecord),
    Flush(SyncSender<()>),
}

pub(crate) struct Writer {
    tx: Option<SyncSender<Msg>>,
    handle: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    pub(crate) fn start(conn: Connection, opts: &StoreOptions) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::sync_channel(opts.queue_capacity.max(1));
        let opts = opts.clone();
        let handle = std::thread::Builder::new()
            .name("skiff-store-writer".into())
            .spawn(move || run(conn, rx, opts))?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Enqueues without ever blocking; counts the record as dropped if the queue is full.
    pub(crate) fn send(&self, rec: InvocationRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Record(rec)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "invocation record queue full; dropping records"
                    );
                }
            }
        }
    }

    /// Blocks until everything enqueued before this call is committed.
    pub(crate) fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if tx.send(Msg::Flush(done_tx)).is_ok() {
            self.wake();
            let _ = done_rx.recv();
        }
    }

    /// Ends the writer's collecting pause early.
    fn wake(&self) {
        if let Some(h) = &self.handle {
            h.thread().unpark();
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue makes the thread commit what is left and exit.
        self.tx.take();
        self.wake();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Msg>, opts: StoreOptions) {
    let mut touched: HashSet<String> = HashSet::new();
    let mut since_prune = 0usize;
    let mut last_prune = Instant::now();
    let mut disconnected = false;
    while !disconnected {
        let first = match rx.recv() {
            Ok(m) => m,
            Err(_) => break,
        };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let take = |m: Msg,
                    batch: &mut Vec<InvocationRecord>,
                    flushes: &mut Vec<SyncSender<()>>| match m {
            Msg::Record(r) => batch.push(r),
            Msg::Flush(done) => flushes.push(done),
        };
        take(first, &mut batch, &mut flushes);
        let deadline = Instant::now() + opts.batch_interval;
        'collect: loop {
            loop {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut batch, &mut flushes),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break 'collect;
                    }
                }
                if batch.len() >= opts.batch_max {
                    break 'collect;
                }
            }
            let now = Instant::now();
            if !flushes.is_empty() || now >= deadline {
                break;
            }
            // Senders do not wake a parked thread; a flush or drop unparks it.
            std::thread::park_timeout(deadline - now);
        }
        if !batch.is_empty() {
            since_prune += batch.len();
            if let Err(e) = commit(&mut conn, &batch, &opts, &mut touched) {
                tracing::error!(error = %e, records = batch.len(), "failed to write invocation records");
            }
        }
        let prune_due = !flushes.is_empty()
            || disconnected
            || since_prune >= 5_000
            || last_prune.elapsed() >= PRUNE_INTERVAL;
        if prune_due && !touched.is_empty() {
            if let Err(e) = prune(&mut conn, &touched, &opts) {
                tracing::error!(error = %e, "failed to prune invocation records and logs");
            }
            touched.clear();
            since_prune = 0;
            last_prune = Instant::now();
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
    if !touched.is_empty() {
        let _ = prune(&mut conn, &touched, &opts);
    }
}

fn commit(
    conn: &mut Connection,
    batch: &[InvocationRecord],
    opts: &StoreOptions,
    touched: &mut HashSet<String>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut exists = tx.prepare_cached("SELECT 1 FROM functions WHERE name = ?1")?;
        let mut ins = tx.prepare_cached(
            "INSERT INTO invocations (request_id, function, revision, started_at_ms, duration_us, status, cold, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut ins_log = tx.prepare_cached(
            "INSERT INTO logs (ts_ms, function, revision, request_id, line) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut known: Vec<(&str, bool)> = Vec::new();
        for rec in batch {
            let present = match known.iter().find(|(n, _)| *n == rec.function) {
                Some((_, p)) => *p,
                None => {
                    let p = exists.exists([&rec.function])?;
                    known.push((&rec.function, p));
                    p
                }
            };
            if !present {
                // Function deleted (or never existed): nothing to attach the record to.
                continue;
            }
            ins.execute(params![
                rec.request_id,
                rec.function,
                rec.revision,
                rec.started_at_ms,
                rec.duration_us.min(i64::MAX as u64) as i64,
                rec.status,
                rec.cold,
                rec.error,
            ])?;
            let lines = split_lines(&rec.logs);
            let skip = lines.len().saturating_sub(opts.log_retention as usize);
            for line in &lines[skip..] {
                ins_log.execute(params![
                    rec.started_at_ms,
                    rec.function,
                    rec.revision,
                    rec.request_id,
                    line
                ])?;
            }
            if !touched.contains(&rec.function) {
                touched.insert(rec.function.clone());
            }
        }
    }
    tx.commit()
}

fn prune(
    conn: &mut Connection,
    functions: &HashSet<String>,
    opts: &StoreOptions,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut logs = tx.prepare_cached(
            "DELETE FROM logs WHERE function = ?1 AND id <=
               (SELECT id FROM logs WHERE function = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )?;
        let mut invs = tx.prepare_cached(
            "DELETE FROM invocations WHERE function = ?1 AND id <=
               (SELECT id FROM invocations WHERE function = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )?;
        for f in functions {
            logs.execute(params![f, opts.log_retention])?;
            invs.execute(params![f, opts.invocation_retention])?;
        }
    }
    tx.commit()
}

/// Splits captured output into lines (lossy UTF-8, `\r\n` tolerated, long lines cut).
pub(crate) fn split_lines(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|b| *b == b'\n')
        .map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > MAX_LINE_BYTES {
                let mut s = String::from_utf8_lossy(&line[..MAX_LINE_BYTES]).into_owned();
                s.push_str(" …[truncated]");
                s
            } else {
                String::from_utf8_lossy(line).into_owned()
            }
        })
        .collect()
}
