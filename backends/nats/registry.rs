//! [`NatsRegistry`]: tasks in a JetStream key-value bucket, changed by compare-and-set on the
//! revision.
//!
//! * `{prefix}orch_tasks`: one key per task (the id, `.`→`/`, `:`→`=`), the task as JSON, plus
//!   index headers (status, time of the last change, lease end, queue) on every revision. A task
//!   whose JSON does not fit in one message keeps its payload in the blob stream.
//! * `{prefix}orch_deps`: one key per parent with the JSON list of its dependents, appended by
//!   compare-and-set when a child is created (before the child itself, so a crash in between
//!   leaves at worst an edge to a task that does not exist, never a child nobody will release).
//!
//! A transition is one compare-and-set write when this process knows the task's current
//! revision (it read or wrote the task last, which is the engine's pattern: get, claim,
//! heartbeat, complete), else a direct get plus the write. Counts, lists and the stale-RUNNING
//! query are answered by the [`View`] (an index that follows the bucket), never by reading every
//! task.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::{join_all, try_join_all};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use super::blob::{BlobRef, Blobs, BLOB_HEADER};
use super::kv::{write_id, Bucket, Write};
use super::view::{
    Indexed, View, DEPS_HEADER, LEASE_HEADER, QUEUE_HEADER, STATUS_HEADER, UPDATED_HEADER,
};
use super::{Shared, BACKEND};
use crate::clock::micros;
use crate::error::{Error, Result};
use crate::model::{Expected, Task, TaskId, TaskState, TaskStatus};
use crate::registry::{
    check_transition, conflict, Registry, Retention, StatusCounts, TaskFilter, TaskPage,
};
use crate::task_queue::ClaimSpec;

/// Revisions remembered for the one-round-trip transition; cleared when full.
const CACHE_LIMIT: usize = 100_000;
/// Purged tasks whose leftovers (blob, dependents list) are cleaned up at once.
const PURGE_CONCURRENCY: usize = 256;
/// Compare-and-set attempts before giving up on a task that keeps changing.
const CAS_ATTEMPTS: usize = 16;
/// Writes in flight at once in batched calls (the JetStream context allows 5,000 unsettled
/// publishes in all; a batch that sent more before settling any would wait forever).
pub(crate) const PIPELINE: usize = 256;
/// How long the dependents flag of a task this process just finished answers `dependents`.
const FINISHED_MEMORY: std::time::Duration = std::time::Duration::from_secs(5);
/// Entries of that memory before it is cleared.
const MEMORY_LIMIT: usize = 100_000;

/// What this process last read or wrote of a task.
#[derive(Clone)]
struct Cached {
    revision: u64,
    task: Task,
    blob: Option<BlobRef>,
    /// The revision carries `Orch-Deps: 1` (some task may depend on this one), `Some(false)`
    /// for `0`, `None` for a revision written without the header (by an older version).
    deps: Option<bool>,
}

/// The NATS registry.
pub struct NatsRegistry {
    shared: Shared,
    tasks: Bucket,
    deps: Bucket,
    blobs: Arc<Blobs>,
    cache: Mutex<HashMap<TaskId, Cached>>,
    /// Tasks this process just moved to a terminal status: when, and whether the written
    /// revision said that no task depends on them (answers the engine's `dependents` call).
    finished: Mutex<HashMap<TaskId, std::time::Instant>>,
    view: OnceCell<View>,
}

impl std::fmt::Debug for NatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRegistry")
            .field("bucket", &self.tasks.bucket)
            .field("cached", &self.cache.lock().len())
            .finish_non_exhaustive()
    }
}

/// The ids of rows the view listed.
fn ids_of(rows: Vec<&Indexed>) -> Vec<TaskId> {
    rows.into_iter().map(|r| r.id.clone()).collect()
}

fn corrupt(id: &str, e: impl std::fmt::Display) -> Error {
    Error::permanent(BACKEND, format!("stored task {id} is not valid: {e}"), None)
}

/// The index headers and the JSON body of one revision of a task. `deps`: whether some task
/// may depend on this one (`Orch-Deps`).
fn encode(task: &Task, deps: bool) -> Result<(HeaderMap, Vec<u8>)> {
    let mut h = HeaderMap::new();
    h.insert(DEPS_HEADER, if deps { "1" } else { "0" });
    h.insert(STATUS_HEADER, task.state.status.as_str());
    h.insert(
        UPDATED_HEADER,
        micros(task.state.updated_at).to_string().as_str(),
    );
    if task.state.status == TaskStatus::Running {
        if let Some(l) = task.state.lease_until {
            h.insert(LEASE_HEADER, micros(l).to_string().as_str());
        }
    }
    h.insert(QUEUE_HEADER, task.queue.as_str());
    let body = serde_json::to_vec(task)
        .map_err(|e| Error::permanent(BACKEND, format!("cannot encode task: {e}"), None))?;
    Ok((h, body))
}

impl NatsRegistry {
    /// Claims `id` from the copy this process last wrote or read, if that copy is PENDING: one
    /// compare-and-set at its revision, with the state `spec` gives. `None` when there is no
    /// such copy or it was not the latest revision (another process changed the task): the
    /// caller then reads the task and decides as usual. A claim that succeeds here is exactly
    /// the one a fresh read would have led to, since the revision it expected was the latest.
    pub(crate) async fn claim_cached(&self, id: &TaskId, spec: &ClaimSpec) -> Option<Result<Task>> {
        let current = self.cache.lock().get(id).cloned()?;
        if current.task.state.status != TaskStatus::Pending {
            return None;
        }
        let mut task = current.task.clone();
        task.state = spec.claimed_state(&task.state, Utc::now());
        match self.put_at(id, &current, &task).await {
            Ok(Some(c)) => {
                self.remember(id, Some(c));
                Some(Ok(task))
            }
            Ok(None) => {
                self.cache.lock().remove(id);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Writes `task` over `current` if the bucket still holds `current.revision`: the new copy
    /// (not yet remembered), or `None` when another writer got there first. Keeps the record's
    /// `Orch-Deps` mark; a revision read without the header (an older version wrote it) may have
    /// dependents in the bucket, so from now on it says so.
    async fn put_at(&self, id: &TaskId, current: &Cached, task: &Task) -> Result<Option<Cached>> {
        let deps = current.deps != Some(false);
        let (h, body, blob) = self.stored_form(task, deps).await?;
        match self
            .tasks
            .put(id.as_str(), h, body, current.revision)
            .await?
        {
            Write::Done(revision) => {
                self.drop_blob(current.blob.as_ref()).await;
                Ok(Some(Cached {
                    revision,
                    task: task.clone(),
                    blob,
                    deps: Some(deps),
                }))
            }
            Write::Stale => {
                self.drop_blob(blob.as_ref()).await;
                Ok(None)
            }
        }
    }

    pub(crate) async fn open(shared: Shared) -> Result<Self> {
        let names = shared.names.clone();
        let (tasks, deps) = futures::try_join!(
            Bucket::open(shared.clone(), names.task_bucket(), None),
            Bucket::open(
                shared.clone(),
                format!("{}_deps", names.task_bucket()),
                None
            ),
        )?;
        Ok(NatsRegistry {
            blobs: Blobs::new(shared.clone()),
            shared,
            tasks,
            deps,
            cache: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            view: OnceCell::new(),
        })
    }

    async fn view(&self) -> Result<&View> {
        let view = self
            .view
            .get_or_init(|| async { View::start(self.tasks.clone(), self.shared.client.clone()) })
            .await;
        view.sync().await?;
        Ok(view)
    }

    /// Notes that this process wrote a terminal revision of `id` saying that no task depends on
    /// it (or forgets an older note).
    fn note_finished(&self, id: &TaskId, c: &Cached) {
        let mut finished = self.finished.lock();
        if c.task.state.status.is_terminal() && c.deps == Some(false) {
            if finished.len() >= MEMORY_LIMIT {
                finished.clear();
            }
            finished.insert(id.clone(), std::time::Instant::now());
        } else {
            finished.remove(id);
        }
    }

    fn remember(&self, id: &TaskId, c: Option<Cached>) {
        let mut cache = self.cache.lock();
        match c {
            Some(c) if !c.task.state.status.is_terminal() => {
                if cache.len() >= CACHE_LIMIT && !cache.contains_key(id) {
                    cache.clear();
                }
                cache.insert(id.clone(), c);
            }
            _ => {
                cache.remove(id);
            }
        }
    }

    /// [`load`](Self::load) for listings and the monitor's queries: a task that cannot be read
    /// (a corrupt entry, a missing payload chunk) is skipped with a warning instead of hiding
    /// every other one. `get` still reports it.
    async fn load_listed(&self, id: &TaskId) -> Result<Option<Cached>> {
        match self.load(id).await {
            Err(e) if !e.is_temporary() => {
                tracing::warn!(task_id = %id, error = %e, "skipping a task that cannot be read");
                Ok(None)
            }
            r => r,
        }
    }

    /// Reads a task with its revision.
    async fn load(&self, id: &TaskId) -> Result<Option<Cached>> {
        let Some(entry) = self.tasks.get(id.as_str()).await? else {
            return Ok(None);
        };
        if !entry.live {
            return Ok(None);
        }
        let blob = BlobRef::from_headers(Some(entry.headers()))?;
        let task: Task = match &blob {
            Some(b) => serde_json::from_slice(&self.blobs.get(b).await?),
            None => serde_json::from_slice(entry.value()),
        }
        .map_err(|e| corrupt(id.as_str(), e))?;
        let deps = entry.headers().get(DEPS_HEADER).map(|v| v.as_str() != "0");
        Ok(Some(Cached {
            revision: entry.revision(),
            task,
            blob,
            deps,
        }))
    }

    /// Marks `parent`'s record with `Orch-Deps: 1` (compare-and-set, retried on contention), so
    /// that whoever finishes it knows to look up its dependents. Nothing to do for a parent
    /// that is already marked or does not exist.
    async fn mark_parent(&self, parent: &TaskId) -> Result<()> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = self.load(parent).await? else {
                return Ok(());
            };
            if current.deps == Some(true) {
                self.remember(parent, Some(current));
                return Ok(());
            }
            let (h, body, blob) = self.stored_form(&current.task, true).await?;
            match self
                .tasks
                .put(parent.as_str(), h, body, current.revision)
                .await?
            {
                Write::Done(revision) => {
                    self.drop_blob(current.blob.as_ref()).await;
                    let c = Cached {
                        revision,
                        deps: Some(true),
                        blob,
                        ..current
                    };
                    self.note_finished(parent, &c);
                    self.remember(parent, Some(c));
                    return Ok(());
                }
                Write::Stale => self.drop_blob(blob.as_ref()).await,
            }
        }
        Err(Error::temporary(
            BACKEND,
            format!("task {parent} kept changing while marking it as a parent"),
            None,
        ))
    }

    /// Adds `child` to the dependents of `parent` (compare-and-set, retried on contention),
    /// after marking the parent's record.
    async fn add_dependent(&self, parent: &TaskId, child: &TaskId) -> Result<()> {
        self.mark_parent(parent).await?;
        for _ in 0..CAS_ATTEMPTS {
            let (mut list, expected) = match self.deps.get(parent.as_str()).await? {
                Some(e) if e.live => (
                    serde_json::from_slice::<Vec<TaskId>>(e.value())
                        .map_err(|err| corrupt(parent.as_str(), err))?,
                    e.revision(),
                ),
                Some(e) => (Vec::new(), e.revision()),
                None => (Vec::new(), 0),
            };
            if list.contains(child) {
                return Ok(());
            }
            list.push(child.clone());
            let body = serde_json::to_vec(&list).map_err(|e| {
                Error::permanent(BACKEND, format!("cannot encode dependents: {e}"), None)
            })?;
            if let Write::Done(_) = self
                .deps
                .put(parent.as_str(), HeaderMap::new(), body, expected)
                .await?
            {
                return Ok(());
            }
        }
        Err(Error::temporary(
            BACKEND,
            format!("too much contention on the dependents of {parent}"),
            None,
        ))
    }

    /// The stored form of a task: inline JSON, or (when it does not fit in one message) an
    /// empty body and a blob with the whole JSON.
    async fn stored_form(
        &self,
        task: &Task,
        deps: bool,
    ) -> Result<(HeaderMap, Vec<u8>, Option<BlobRef>)> {
        let (mut h, body) = encode(task, deps)?;
        if !self.blobs.too_large(body.len()) {
            return Ok((h, body, None));
        }
        let blob = self.blobs.put(&body).await?;
        h.insert(BLOB_HEADER, blob.header_value().as_str());
        Ok((h, Vec::new(), Some(blob)))
    }

    /// Deletes a blob that is no longer referenced, logging (not failing) on error.
    async fn drop_blob(&self, blob: Option<&BlobRef>) {
        if let Some(b) = blob {
            if let Err(e) = self.blobs.delete(b).await {
                tracing::warn!(blob = %b.id, error = %e, "cannot delete an unreferenced task blob");
            }
        }
    }

    /// Creates `task` with the write id `id`; `maybe_written`: an earlier send of this write
    /// (same id) got no answer (see [`Bucket::put_as`]).
    async fn create_as(&self, task: &Task, id: &str, maybe_written: bool) -> Result<()> {
        for parent in &task.depends_on {
            self.add_dependent(parent, &task.task_id).await?;
        }
        let (h, body, blob) = self.stored_form(task, false).await?;
        let write = self
            .tasks
            .create(task.task_id.as_str(), h, body, id, maybe_written)
            .await?;
        self.created(task, write, blob).await
    }

    async fn created(&self, task: &Task, write: Write, blob: Option<BlobRef>) -> Result<()> {
        match write {
            Write::Done(revision) => {
                self.remember(
                    &task.task_id,
                    Some(Cached {
                        revision,
                        task: task.clone(),
                        blob,
                        deps: Some(false),
                    }),
                );
                Ok(())
            }
            Write::Stale => {
                self.drop_blob(blob.as_ref()).await;
                Err(Error::TaskExists(task.task_id.clone()))
            }
        }
    }
}

#[async_trait]
impl Registry for NatsRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create(&self, task: &Task) -> Result<()> {
        self.create_as(task, &write_id(), false).await
    }

    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        // Plain tasks: up to PIPELINE creates in flight at once. Tasks with dependencies or
        // large payloads take the one-by-one path.
        let mut out: Vec<Option<Result<()>>> = (0..tasks.len()).map(|_| None).collect();
        // Each task's write id, and whether a send of it got no answer (it may be stored).
        let ids: Vec<String> = (0..tasks.len()).map(|_| write_id()).collect();
        let mut unanswered = vec![false; tasks.len()];
        let plain: Vec<usize> = (0..tasks.len())
            .filter(|&i| tasks[i].depends_on.is_empty())
            .collect();
        for chunk in plain.chunks(PIPELINE) {
            let mut pending = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let t = &tasks[i];
                let (h, body) = encode(t, false)?;
                if self.blobs.too_large(body.len()) {
                    continue;
                }
                match self
                    .tasks
                    .send(t.task_id.as_str(), h, body, 0, &ids[i])
                    .await
                {
                    Ok(ack) => pending.push((i, ack)),
                    // The one-by-one path retries it within the budget.
                    Err(e) if e.is_temporary() => unanswered[i] = true,
                    Err(e) => return Err(e),
                }
            }
            let settled = join_all(pending.into_iter().map(|(i, ack)| async move {
                (i, self.tasks.settle(tasks[i].task_id.as_str(), ack).await)
            }))
            .await;
            for (i, r) in settled {
                match r {
                    Ok(Write::Done(rev)) => {
                        self.created(&tasks[i], Write::Done(rev), None).await?;
                        out[i] = Some(Ok(()));
                    }
                    // Exists, or a deleted key: the one-by-one path tells which.
                    Ok(Write::Stale) => {}
                    // No answer (a leader lost): the one-by-one path sends it again with the
                    // same id, which the server does not store twice.
                    Err(e) if e.is_temporary() => unanswered[i] = true,
                    Err(e) => return Err(e),
                }
            }
        }
        let mut results = Vec::with_capacity(tasks.len());
        for (i, r) in out.into_iter().enumerate() {
            match r {
                Some(r) => results.push(r),
                None => match self.create_as(&tasks[i], &ids[i], unanswered[i]).await {
                    Err(e) if e.is_temporary() => return Err(e),
                    r => results.push(r),
                },
            }
        }
        Ok(results)
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        let loaded = self.load(id).await?;
        let task = loaded.as_ref().map(|c| c.task.clone());
        self.remember(id, loaded);
        Ok(task)
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let mut cached = self.cache.lock().get(id).cloned();
        for _ in 0..CAS_ATTEMPTS {
            let from_cache = cached.is_some();
            let current = match cached.take() {
                Some(c) => c,
                None => self
                    .load(id)
                    .await?
                    .ok_or_else(|| Error::TaskNotFound(id.clone()))?,
            };
            if current.task.state.status != expected.status
                || current.task.state.attempt != expected.attempt
            {
                if from_cache {
                    continue; // our copy may be old: read the real one
                }
                self.remember(id, Some(current.clone()));
                return Err(conflict(id, &expected, &current.task.state));
            }
            let mut task = current.task.clone();
            task.state = next.clone();
            match self.put_at(id, &current, &task).await? {
                Some(c) => {
                    self.note_finished(id, &c);
                    self.remember(id, Some(c));
                    return Ok(task);
                }
                None => continue,
            }
        }
        Err(Error::temporary(
            BACKEND,
            format!("task {id} kept changing during {CAS_ATTEMPTS} compare-and-set attempts"),
            None,
        ))
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage> {
        let view = self.view().await?;
        let (ids, next_cursor) = view.read(|idx| {
            let (rows, next) = idx.table.page(filter, cursor, limit)?;
            Ok::<_, Error>((ids_of(rows), next))
        })?;
        let loaded = try_join_all(ids.iter().map(|id| self.load_listed(id))).await?;
        let tasks = loaded
            .into_iter()
            .flatten()
            .map(|c| c.task)
            .filter(|t| filter.status.is_none_or(|s| s == t.state.status))
            .collect();
        Ok(TaskPage { tasks, next_cursor })
    }

    async fn counts(&self) -> Result<StatusCounts> {
        let view = self.view().await?;
        Ok(view.read(|idx| idx.table.counts()))
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        let view = self.view().await?;
        let ids = view.read(|idx| ids_of(idx.table.expired(before, limit)));
        let loaded = try_join_all(ids.iter().map(|id| self.load_listed(id))).await?;
        Ok(loaded
            .into_iter()
            .flatten()
            .map(|c| c.task)
            .filter(|t| {
                t.state.status == TaskStatus::Running
                    && t.state.lease_until.is_none_or(|l| l < before)
            })
            .collect())
    }

    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        // Asked by the engine right after it finished `parent`: the revision this process wrote
        // said that nobody depends on it. A child whose edge is added after that write finds
        // the parent finished when its creator checks the parents.
        let known_none = self
            .finished
            .lock()
            .remove(parent)
            .is_some_and(|at| at.elapsed() < FINISHED_MEMORY);
        if known_none {
            return Ok(Vec::new());
        }
        match self.deps.get(parent.as_str()).await? {
            Some(e) if e.live => {
                serde_json::from_slice(e.value()).map_err(|err| corrupt(parent.as_str(), err))
            }
            _ => Ok(Vec::new()),
        }
    }

    async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
        let view = self.view().await?;
        let now = Utc::now();
        let doomed: Vec<(TaskId, u64, Option<String>, bool)> = view.read(|idx| {
            idx.table
                .beyond_retention(retention, now)
                .into_iter()
                .map(|t| {
                    (
                        t.id.clone(),
                        t.revision,
                        t.blob.clone(),
                        t.deps != Some(false),
                    )
                })
                .collect()
        });
        let mut purged = 0;
        let mut gone: Vec<(TaskId, Option<String>, bool)> = Vec::new();
        for chunk in doomed.chunks(PIPELINE) {
            let mut acks = Vec::with_capacity(chunk.len());
            for (id, revision, _, _) in chunk {
                // Expecting the revision the index saw: a task retried meanwhile is kept.
                acks.push(self.tasks.send_delete(id.as_str(), *revision).await?);
            }
            let settled = join_all(
                chunk
                    .iter()
                    .zip(acks)
                    .map(|((id, _, _, _), ack)| self.tasks.settle(id.as_str(), ack)),
            )
            .await;
            for ((id, _, blob, deps), r) in chunk.iter().zip(settled) {
                if let Write::Done(_) = r? {
                    purged += 1;
                    self.cache.lock().remove(id);
                    gone.push((id.clone(), blob.clone(), *deps));
                }
            }
        }
        // The purged tasks' payloads and dependents lists, many at once (a task whose last
        // revision said that nobody depends on it has no list).
        futures::stream::iter(gone)
            .map(|(id, blob, deps): (TaskId, Option<String>, bool)| async move {
                if let Some(b) = &blob {
                    if let Err(e) = async { self.blobs.delete(&BlobRef::parse(b)?).await }.await {
                        tracing::warn!(task_id = %id, error = %e, "cannot delete a purged task's payload");
                    }
                }
                if !deps {
                    return Ok(());
                }
                if let Some(e) = self.deps.get(id.as_str()).await? {
                    if e.live {
                        let ack = self.deps.send_delete(id.as_str(), e.revision()).await?;
                        self.deps.settle(id.as_str(), ack).await?;
                    }
                }
                Ok::<(), Error>(())
            })
            .buffer_unordered(PURGE_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok(purged)
    }

    // The operator's controls: backends/nats/control.rs.
    async fn paused_queues(&self) -> Result<std::collections::BTreeSet<crate::model::QueueName>> {
        super::control::paused_queues(&self.shared).await
    }
    async fn set_queue_paused(
        &self,
        queue: &crate::model::QueueName,
        paused: bool,
    ) -> Result<bool> {
        super::control::set_paused(&self.shared, queue, paused).await
    }
    async fn queue_limits(
        &self,
    ) -> Result<std::collections::BTreeMap<crate::model::QueueName, crate::queue_limits::QueueLimits>>
    {
        super::control::queue_limits(&self.shared).await
    }
    async fn set_queue_limits(
        &self,
        queue: &crate::model::QueueName,
        limits: &crate::queue_limits::QueueLimits,
    ) -> Result<bool> {
        super::control::set_limits(&self.shared, queue, limits).await
    }

    // Schedules: backends/nats/schedules.rs.
    async fn schedules(&self) -> Result<Vec<crate::schedule::Schedule>> {
        super::schedules::schedules(&self.shared).await
    }
    async fn put_schedule(&self, schedule: &crate::schedule::Schedule) -> Result<bool> {
        super::schedules::put(&self.shared, schedule).await
    }
    async fn remove_schedule(&self, name: &crate::schedule::ScheduleName) -> Result<bool> {
        super::schedules::remove(&self.shared, name).await
    }
}
