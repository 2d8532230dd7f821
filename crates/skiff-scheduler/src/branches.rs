//! Snapshots of running instances and the branches forked from them.
//!
//! [`Scheduler::snapshot`] saves a running instance of a function (its `persistent` instance,
//! or a warm one) with [`Instance::checkpoint`], leaving it running. [`Scheduler::fork`]
//! restores copies of such a snapshot — branches — with [`skiff_sandbox::Sandbox::restore`];
//! each is an independent instance (memory, processes and `/tmp` as at the snapshot) that the
//! scheduler holds until it is deleted, dies, or stays idle for the function's `scale.idle`.
//! Branch invocations go through the same invoke path as pooled ones (timeouts, crashes and
//! streamed responses behave alike); a branch that times out or crashes is stopped.

use crate::{outcome, Lease, Owner, Revision, SchedError, Scheduler, Stops};
use parking_lot::Mutex;
use serde::Serialize;
use skiff_core::{ErrorKind, Invocation, InvokeOutput, Mode};
use skiff_sandbox::Instance;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Most branches one server holds at once.
pub const MAX_BRANCHES: usize = 256;

/// What [`Scheduler::snapshot`] saved.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotTaken {
    pub revision: u32,
    /// The instance that was saved (it keeps running).
    pub instance_id: String,
}

/// Observable state of one branch.
#[derive(Debug, Clone, Serialize)]
pub struct BranchInfo {
    pub id: String,
    pub snapshot: String,
    pub function: String,
    pub revision: u32,
    /// `idle`, `busy` or `dead`.
    pub state: &'static str,
    pub in_flight: u32,
    pub invocations: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub memory_bytes: Option<u64>,
}

#[derive(Default)]
struct Use {
    in_flight: u32,
    served: u64,
    /// Set once the branch was stopped after breaking; it is then dropped from the registry.
    gone: bool,
}

/// One restored copy of a snapshot.
pub(crate) struct Branch {
    id: String,
    snapshot: String,
    pub(crate) rev: Arc<Revision>,
    pub(crate) inst: Arc<dyn Instance>,
    created: Instant,
    last_used: Mutex<Instant>,
    uses: Mutex<Use>,
    stops: Arc<Stops>,
}

impl Branch {
    /// Takes a concurrency slot, if the branch has one free.
    fn take_slot(&self) -> bool {
        let mut u = self.uses.lock();
        if u.gone || u.in_flight >= self.rev.spec.concurrency || !self.inst.is_alive() {
            return false;
        }
        u.in_flight += 1;
        u.served += 1;
        true
    }

    /// Gives a slot back after an invocation; a broken branch is stopped.
    pub(crate) fn release(&self, broken: bool) {
        let stop = {
            let mut u = self.uses.lock();
            u.in_flight = u.in_flight.saturating_sub(1);
            *self.last_used.lock() = Instant::now();
            if (broken || !self.inst.is_alive()) && !u.gone {
                u.gone = true;
                true
            } else {
                false
            }
        };
        if stop {
            self.stops.spawn(self.inst.clone());
        }
    }

    fn info(&self, now: Instant) -> BranchInfo {
        let u = self.uses.lock();
        let last = *self.last_used.lock();
        BranchInfo {
            id: self.id.clone(),
            snapshot: self.snapshot.clone(),
            function: self.rev.function.clone(),
            revision: self.rev.number,
            state: if u.gone || !self.inst.is_alive() {
                "dead"
            } else if u.in_flight > 0 {
                "busy"
            } else {
                "idle"
            },
            in_flight: u.in_flight,
            invocations: u.served,
            age_ms: now.duration_since(self.created).as_millis() as u64,
            idle_ms: if u.in_flight > 0 {
                0
            } else {
                now.duration_since(last).as_millis() as u64
            },
            memory_bytes: self.inst.memory_usage(),
        }
    }
}

/// The branches a scheduler holds, by id.
#[derive(Default)]
pub(crate) struct Branches {
    map: Mutex<HashMap<String, Arc<Branch>>>,
}

impl Branches {
    /// Removes and returns the branches `f` selects (the caller stops them).
    pub(crate) fn remove_where(&self, f: impl Fn(&Branch) -> bool) -> Vec<Arc<Branch>> {
        let mut map = self.map.lock();
        let ids: Vec<String> = map
            .iter()
            .filter(|(_, b)| f(b))
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| map.remove(id)).collect()
    }

    /// Removes dead branches and those idle for their function's `scale.idle`; returns the
    /// instances to stop.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Arc<dyn Instance>> {
        let mut out = Vec::new();
        self.map.lock().retain(|_, b| {
            let u = b.uses.lock();
            if u.gone {
                return false; // already being stopped
            }
            let idle = u.in_flight == 0
                && now.duration_since(*b.last_used.lock()) >= b.rev.spec.scale.idle;
            if idle || (!b.inst.is_alive() && u.in_flight == 0) {
                out.push(b.inst.clone());
                return false;
            }
            true
        });
        out
    }

    fn get(&self, id: &str) -> Option<Arc<Branch>> {
        self.map
            .lock()
            .get(id)
            .filter(|b| !b.uses.lock().gone)
            .cloned()
    }
}

impl Scheduler {
    /// Saves a running instance of `function` into the directory `image` (created if
    /// missing), leaving it running: its `persistent` instance, else an idle warm one, else a
    /// busy one (the checkpoint waits at most the function's timeout for initialisation).
    /// The instance takes no other invocation while it is being saved.
    pub async fn snapshot(
        &self,
        function: &str,
        image: &Path,
    ) -> Result<SnapshotTaken, SchedError> {
        let mut pools = self.function_pools(function);
        pools.retain(|p| !p.ephemeral());
        // The persistent instance first, then the newest revision.
        pools.sort_by_key(|p| (p.rev.spec.mode != Mode::Persistent, u32::MAX - p.rev.number));
        let picked = pools.iter().find_map(|p| {
            let mut st = p.state.lock();
            let slot = st
                .slots
                .iter_mut()
                .filter(|s| !s.retiring && s.inst.is_alive())
                .min_by_key(|s| s.in_flight)?;
            slot.in_flight += 1;
            Some((p.clone(), slot.inst.clone()))
        });
        let Some((pool, inst)) = picked else {
            return Err(SchedError::NoInstance {
                function: function.to_string(),
            });
        };
        let taken = async {
            std::fs::create_dir_all(image)?;
            inst.checkpoint(image, pool.rev.spec.timeout, true)
                .await
                .map_err(SchedError::from)
        }
        .await;
        // A failed checkpoint may leave the instance paused or half-saved: replace it.
        let broken = matches!(taken, Err(SchedError::Sandbox(_)));
        pool.release(&inst, broken);
        taken?;
        Ok(SnapshotTaken {
            revision: pool.rev.number,
            instance_id: inst.id().to_string(),
        })
    }

    /// Restores `count` branches of snapshot `snapshot` (image directory `image`, taken from
    /// an instance of `rev`) at once. All or nothing: if one fails, the others are stopped.
    pub async fn fork(
        &self,
        rev: &Arc<Revision>,
        snapshot: &str,
        image: &Path,
        count: u32,
    ) -> Result<Vec<BranchInfo>, SchedError> {
        let running = self.branches.map.lock().len();
        if running + count as usize > MAX_BRANCHES {
            return Err(SchedError::TooManyBranches {
                running,
                max: MAX_BRANCHES,
            });
        }
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..count {
            let spec = self.instance_spec(rev, "br-")?;
            let (sandbox, image) = (self.sandbox.clone(), image.to_path_buf());
            tasks.spawn(async move { sandbox.restore(spec, &image).await });
        }
        let mut started = Vec::new();
        let mut failed = None;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(inst)) => started.push(inst),
                Ok(Err(e)) => failed = Some(SchedError::from(e)),
                Err(e) => failed = Some(SchedError::Io(std::io::Error::other(e.to_string()))),
            }
        }
        if let Some(e) = failed {
            for inst in started {
                inst.stop().await;
            }
            return Err(e);
        }
        let now = Instant::now();
        let mut out = Vec::with_capacity(started.len());
        let mut map = self.branches.map.lock();
        for inst in started {
            self.metrics
                .instances_started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("br-{}", inst.id().rsplit('-').next().unwrap_or("0"));
            let id = if map.contains_key(&id) {
                format!("{id}-{}", map.len())
            } else {
                id
            };
            let b = Arc::new(Branch {
                id: id.clone(),
                snapshot: snapshot.to_string(),
                rev: rev.clone(),
                inst,
                created: now,
                last_used: Mutex::new(now),
                uses: Mutex::default(),
                stops: self.stops.clone(),
            });
            out.push(b.info(now));
            map.insert(id, b);
        }
        Ok(out)
    }

    /// Runs one invocation on a branch, under its function's timeout. A branch whose
    /// concurrency slots are all taken throttles at once.
    pub async fn invoke_branch(
        &self,
        id: &str,
        inv: Invocation,
    ) -> Result<InvokeOutput, SchedError> {
        let b = self
            .branches
            .get(id)
            .ok_or_else(|| SchedError::BranchNotFound(id.to_string()))?;
        if !b.take_slot() {
            let o = outcome(
                &b.rev,
                ErrorKind::Throttled,
                if b.inst.is_alive() {
                    format!(
                        "branch {id} is busy (all {} of its concurrency slots)",
                        b.rev.spec.concurrency
                    )
                } else {
                    format!("branch {id} is no longer running")
                },
                String::new(),
                false,
            );
            self.metrics.count_outcome(&o);
            return Err(SchedError::Invoke(o));
        }
        let lease = Lease {
            inst: b.inst.clone(),
            cold: false,
            init: None,
        };
        let timeout = b.rev.spec.timeout;
        self.run_lease(&b.rev.clone(), Owner::Branch(b), lease, inv, timeout)
            .await
            .map_err(SchedError::Invoke)
    }

    /// Branches, oldest first.
    pub fn branches(&self) -> Vec<BranchInfo> {
        let now = Instant::now();
        let mut out: Vec<BranchInfo> = self
            .branches
            .map
            .lock()
            .values()
            .map(|b| b.info(now))
            .collect();
        out.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.id.cmp(&b.id)));
        out
    }

    /// One branch.
    pub fn branch(&self, id: &str) -> Option<BranchInfo> {
        self.branches.get(id).map(|b| b.info(Instant::now()))
    }

    /// Stops a branch; false if there is none with this id.
    pub async fn delete_branch(&self, id: &str) -> bool {
        let removed = self.branches.remove_where(|b| b.id == id);
        let found = !removed.is_empty();
        for b in removed {
            b.inst.stop().await;
        }
        found
    }

    /// Stops the branches of a snapshot (before its image is removed); returns how many.
    pub async fn remove_snapshot_branches(&self, snapshot: &str) -> usize {
        let removed = self.branches.remove_where(|b| b.snapshot == snapshot);
        let n = removed.len();
        for b in removed {
            b.inst.stop().await;
        }
        n
    }
}
