//! [`RedisRegistry`]: one HASH per task in the lab's format, per-status and lease indexes
//! changed by the same Lua script as each compare-and-set.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use redis::{ScriptInvocation, Value};
use serde_json::Value as Json;

use super::codec::{self, hash_reply, micros, text};
use super::conn::{Conn, BACKEND};
use super::keys::{self, Layout, QueueKeys};
use super::scripts;
use crate::error::{Error, Result};
use crate::model::{Expected, Priority, QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::registry::{check_transition, Registry, Retention, StatusCounts, TaskFilter, TaskPage};
use crate::task_table::{decode_cursor, encode_cursor, slot};

/// Tasks deleted per purge script call (one call blocks Redis for about a millisecond).
const PURGE_BATCH: usize = 500;

/// Tasks whose immutable part is remembered at most (see [`Immutables`]).
const IMMUTABLE_CACHE_ENTRIES: usize = 16_384;
/// Payloads larger than this (bytes of JSON) are not remembered.
const IMMUTABLE_CACHE_MAX_PAYLOAD: usize = 16 * 1024;

/// What never changes in a task after `create` (the lab may rewrite `priority`: checked).
struct Immutable {
    queue: QueueName,
    payload: Json,
    priority: Priority,
    max_attempts: u32,
    depends_on: Vec<TaskId>,
    created_at: DateTime<Utc>,
    timeout: Option<std::time::Duration>,
    deadline: Option<DateTime<Utc>>,
    traceparent: Option<String>,
    /// `created_at` as stored, compared with what the transition script reads.
    created_at_text: String,
}

impl Immutable {
    fn of(task: &Task) -> Self {
        Immutable {
            queue: task.queue.clone(),
            payload: task.payload.clone(),
            priority: task.priority,
            max_attempts: task.max_attempts,
            depends_on: task.depends_on.clone(),
            created_at: task.created_at,
            timeout: task.timeout,
            deadline: task.deadline,
            traceparent: task.traceparent.clone(),
            created_at_text: codec::format_time(task.created_at),
        }
    }

    fn with_state(&self, id: &TaskId, state: TaskState) -> Task {
        Task {
            task_id: id.clone(),
            queue: self.queue.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            depends_on: self.depends_on.clone(),
            created_at: self.created_at,
            timeout: self.timeout,
            deadline: self.deadline,
            traceparent: self.traceparent.clone(),
            state,
        }
    }
}

/// A bounded memory of the immutable part of the tasks this process recently created or read,
/// so that a transition (claim, heartbeat, completion) does not send the whole task, payload
/// included, back from Redis. Entries leave when their task reaches a terminal status, or
/// oldest first past [`IMMUTABLE_CACHE_ENTRIES`]. A stale entry (the task was deleted and
/// created again under the same id, or the lab changed its priority) is detected by comparing
/// `created_at` and `priority` with what the script read, and then the task is read again.
#[derive(Default)]
struct Immutables {
    map: HashMap<TaskId, Arc<Immutable>>,
    order: VecDeque<TaskId>,
}

impl Immutables {
    fn remember(&mut self, task: &Task, payload_len: usize) {
        if payload_len > IMMUTABLE_CACHE_MAX_PAYLOAD || task.state.status.is_terminal() {
            return;
        }
        if self.map.contains_key(&task.task_id) {
            return;
        }
        while self.map.len() >= IMMUTABLE_CACHE_ENTRIES {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map
            .insert(task.task_id.clone(), Arc::new(Immutable::of(task)));
        self.order.push_back(task.task_id.clone());
        // Ids of entries removed early (terminal) linger in `order`; keep it bounded.
        if self.order.len() > 2 * IMMUTABLE_CACHE_ENTRIES {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }
}

/// The Redis registry.
pub struct RedisRegistry {
    conn: Conn,
    immutables: Mutex<Immutables>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("conn", &self.conn)
            .finish()
    }
}

/// The lease index score of a task in `state` (only RUNNING tasks are in that index; one
/// without a lease end counts as stale at once, as in the memory registry).
pub(crate) fn lease_score(state: &TaskState) -> String {
    if state.status == TaskStatus::Running {
        state
            .lease_until
            .map(|t| micros(t).to_string())
            .unwrap_or_else(|| "-inf".to_string())
    } else {
        String::new()
    }
}

/// The [`Error::Conflict`] for a script's `{'conflict', status, attempt}` reply (after the tag).
pub(crate) fn conflict_reply(
    id: &TaskId,
    expected: &Expected,
    mut rest: impl Iterator<Item = Value>,
) -> Result<Error> {
    let status = codec::parse_status(&rest.next().map(text).transpose()?.unwrap_or_default())?;
    let attempt = rest
        .next()
        .map(text)
        .transpose()?
        .and_then(|a| a.trim().parse::<u32>().ok())
        .unwrap_or(0);
    Ok(Error::Conflict {
        task_id: id.clone(),
        expected_status: expected.status,
        expected_attempt: expected.attempt,
        actual_status: status,
        actual_attempt: attempt,
    })
}

impl RedisRegistry {
    pub(crate) fn new(conn: Conn) -> Self {
        RedisRegistry {
            conn,
            immutables: Mutex::new(Immutables::default()),
        }
    }

    fn remember(&self, task: &Task, payload_len: usize) {
        self.immutables.lock().remember(task, payload_len);
    }

    pub(crate) fn decode_and_remember(
        &self,
        id: &TaskId,
        fields: HashMap<String, String>,
    ) -> Result<Task> {
        let payload_len = fields.get("payload").map_or(0, String::len);
        let task = codec::decode(id, &fields)?;
        self.remember(&task, payload_len);
        Ok(task)
    }

    /// The keys of `queue` and of its tasks.
    fn qk(&self, queue: &QueueName) -> QueueKeys {
        self.conn.queue_keys(queue)
    }

    /// The queue of task `id` (`None`: no such task): remembered from a recent read or
    /// create, else asked. On one server (the lab's layout) the hash's `queue` field (the lab
    /// wrote none: its default queue); on a cluster the id's pointer, checked against the hash
    /// it names, and when missing (a crash between the steps of a purge, or a hand edit) looked
    /// for in every queue and written again.
    pub(crate) async fn queue_of(&self, id: &TaskId) -> Result<Option<QueueName>> {
        if let Some(im) = self.immutables.lock().map.get(id) {
            return Ok(Some(im.queue.clone()));
        }
        let mut c = self.conn.manager();
        match self.conn.layout() {
            Layout::Lab => {
                let key = QueueKeys::new(self.prefix(), Layout::Lab, &default_queue()).task(id);
                let (queue, status): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("queue")
                    .arg("status")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("HMGET", e))?;
                match (queue, status) {
                    (None, None) => Ok(None),
                    (None, Some(_)) => Ok(Some(default_queue())),
                    (Some(q), _) => QueueName::parse(&q).map(Some).map_err(|e| {
                        Error::permanent(
                            BACKEND,
                            format!("task {id} names a bad queue {q:?}: {e}"),
                            None,
                        )
                    }),
                }
            }
            Layout::Sharded => {
                let named: Option<String> = redis::cmd("GET")
                    .arg(keys::task_queue(self.prefix(), id))
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("GET", e))?;
                if let Some(q) = named.and_then(|q| QueueName::parse(&q).ok()) {
                    return Ok(Some(q));
                }
                // No pointer: look in every queue (one EXISTS each, in one round trip).
                let queues = self.conn.task_queues().await?;
                let mut pipe = redis::pipe();
                for q in &queues {
                    pipe.cmd("EXISTS").arg(self.qk(q).task(id));
                }
                let found: Vec<i64> = pipe
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("EXISTS", e))?;
                let Some(q) = queues
                    .into_iter()
                    .zip(found)
                    .find(|(_, n)| *n == 1)
                    .map(|(q, _)| q)
                else {
                    return Ok(None);
                };
                let _: () = redis::cmd("SET")
                    .arg(keys::task_queue(self.prefix(), id))
                    .arg(q.as_str())
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("SET the task's queue", e))?;
                Ok(Some(q))
            }
        }
    }

    /// The hash of task `id`, if the task exists.
    async fn task_key(&self, id: &TaskId) -> Result<Option<(QueueName, String)>> {
        Ok(self.queue_of(id).await?.map(|q| {
            let key = self.qk(&q).task(id);
            (q, key)
        }))
    }

    /// Reads a task: the outer error is Redis's, the inner one says the stored hash cannot be
    /// decoded (edited by hand).
    pub(crate) async fn read(&self, id: &TaskId) -> Result<Result<Option<Task>>> {
        let key = match self.conn.layout() {
            // The lab's key needs no queue: one round trip.
            Layout::Lab => QueueKeys::new(self.prefix(), Layout::Lab, &default_queue()).task(id),
            Layout::Sharded => match self.task_key(id).await? {
                Some((_, key)) => key,
                None => return Ok(Ok(None)),
            },
        };
        let mut c = self.conn.manager();
        let reply: Value = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("HGETALL", e))?;
        Ok(hash_reply(reply).and_then(|fields| {
            if fields.is_empty() {
                return Ok(None);
            }
            self.decode_and_remember(id, fields).map(Some)
        }))
    }

    pub(crate) fn prefix(&self) -> &str {
        self.conn.prefix()
    }

    pub(crate) fn forget(&self, id: &TaskId) {
        self.immutables.lock().map.remove(id);
    }

    /// What must exist before tasks are written, in other slots than their queue's
    /// ("Steps that span queues" in docs/backends/redis.md): their queues in the set of queues,
    /// on a cluster the pointer from each id to its queue, and each task's entry in its
    /// parents' dependents sets. One result per task: `TaskExists` when the id is another
    /// queue's task (or named twice in the batch for different queues).
    pub(crate) async fn prepare(&self, tasks: &[&Task]) -> Result<Vec<Result<()>>> {
        let mut out: Vec<Result<()>> = tasks.iter().map(|_| Ok(())).collect();
        if tasks.is_empty() {
            return Ok(out);
        }
        self.conn
            .note_queues(tasks.iter().map(|t| &t.queue))
            .await?;
        let mut batch: HashMap<&TaskId, &QueueName> = HashMap::new();
        for (i, t) in tasks.iter().enumerate() {
            match batch.get(&t.task_id) {
                Some(q) if **q != t.queue => out[i] = Err(Error::TaskExists(t.task_id.clone())),
                _ => {
                    batch.insert(&t.task_id, &t.queue);
                }
            }
        }
        let mut c = self.conn.manager();
        if self.conn.layout() == Layout::Sharded {
            let todo: Vec<usize> = (0..tasks.len()).filter(|&i| out[i].is_ok()).collect();
            let mut pipe = redis::pipe();
            for &i in &todo {
                let t = tasks[i];
                pipe.cmd("SET")
                    .arg(keys::task_queue(self.prefix(), &t.task_id))
                    .arg(t.queue.as_str())
                    .arg("NX")
                    .arg("GET");
            }
            let before: Vec<Option<String>> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.conn.error("SET the tasks' queues", e))?;
            for (&i, old) in todo.iter().zip(before) {
                let t = tasks[i];
                let Some(old) = old else { continue };
                if old == t.queue.as_str() {
                    continue; // ours, or the same id in the same queue: the create script decides
                }
                // The id points at another queue: taken if that task exists, else a leftover.
                let other = QueueName::parse(&old).ok();
                let taken: i64 = match &other {
                    Some(q) => redis::cmd("EXISTS")
                        .arg(self.qk(q).task(&t.task_id))
                        .query_async(&mut c)
                        .await
                        .map_err(|e| self.conn.error("EXISTS", e))?,
                    None => 0,
                };
                if taken == 1 {
                    out[i] = Err(Error::TaskExists(t.task_id.clone()));
                } else {
                    let _: () = redis::cmd("SET")
                        .arg(keys::task_queue(self.prefix(), &t.task_id))
                        .arg(t.queue.as_str())
                        .query_async(&mut c)
                        .await
                        .map_err(|e| self.conn.error("SET the task's queue", e))?;
                }
            }
        }
        // Edges first: a crash before the task is written leaves an edge to a task that does
        // not exist, which the engine skips when the parent finishes.
        let mut pipe = redis::pipe();
        let mut edges = 0;
        for (i, t) in tasks.iter().enumerate() {
            if out[i].is_err() {
                continue;
            }
            for parent in &t.depends_on {
                let q = match batch.get(parent) {
                    Some(q) => (*q).clone(),
                    None => match self.queue_of(parent).await? {
                        Some(q) => q,
                        // No such parent: the engine fails the child for it.
                        None => continue,
                    },
                };
                pipe.cmd("ZADD")
                    .arg(self.qk(&q).dependents(parent))
                    .arg(micros(t.created_at))
                    .arg(t.task_id.as_str());
                edges += 1;
            }
        }
        if edges > 0 {
            let _: Vec<i64> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.conn.error("ZADD the dependents", e))?;
        }
        Ok(out)
    }

    /// The create script's invocation, and the size of the payload's JSON.
    fn create_invocation(&self, task: &Task) -> (ScriptInvocation<'static>, usize) {
        let k = self.qk(&task.queue);
        let id = task.task_id.as_str();
        let mut inv = scripts::TASK_CREATE.prepare();
        inv.key(k.task(&task.task_id))
            .key(k.status_index(task.state.status))
            .key(&k.leases);
        inv.arg(id)
            .arg(micros(task.state.updated_at))
            .arg(lease_score(&task.state));
        let mut payload_len = 0;
        for (name, value) in codec::task_fields(task) {
            if name == "payload" {
                payload_len = value.len();
            }
            inv.arg(name).arg(value);
        }
        (inv, payload_len)
    }

    /// Reads several tasks (their hash keys given) in one pipelined round trip (per node, on a
    /// cluster); `None` where a task is gone or cannot be read (logged).
    async fn get_many(&self, items: &[(TaskId, String)]) -> Result<Vec<Option<Task>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (_, key) in items {
            pipe.cmd("HGETALL").arg(key);
        }
        let mut c = self.conn.manager();
        let replies: Vec<Value> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("HGETALL", e))?;
        // For listings and the monitor's queries: a task that cannot be read (its hash edited
        // by hand) is skipped with a warning, so that it does not hide every other one (a
        // monitor pass stopped at it, recovering nothing). `get` still reports it.
        Ok(items
            .iter()
            .zip(replies)
            .map(|((id, _), v)| {
                let read = hash_reply(v).and_then(|fields| {
                    if fields.is_empty() {
                        Ok(None)
                    } else {
                        self.decode_and_remember(id, fields).map(Some)
                    }
                });
                read.unwrap_or_else(|e| {
                    tracing::warn!(task_id = %id, error = %e, "skipping a task that cannot be read");
                    None
                })
            })
            .collect())
    }

    /// The queues to look at: the filter's, or every queue that has tasks.
    async fn queues_for(&self, only: Option<&QueueName>) -> Result<Vec<QueueName>> {
        match only {
            Some(q) => Ok(vec![q.clone()]),
            None => self.conn.task_queues().await,
        }
    }

    /// Works off a queue's list of purged tasks: removes each from its parents' dependents
    /// sets and, on a cluster, deletes its id pointer (both in other slots than the queue's),
    /// then drops the entries done.
    async fn finish_purge(&self, k: &QueueKeys) -> Result<()> {
        let mut c = self.conn.manager();
        loop {
            let pending: Vec<String> = redis::cmd("LRANGE")
                .arg(&k.purged)
                .arg(0)
                .arg(2 * PURGE_BATCH - 1)
                .query_async(&mut c)
                .await
                .map_err(|e| self.conn.error("LRANGE", e))?;
            if pending.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            let mut n = 0;
            for pair in pending.chunks(2) {
                let Ok(id) = TaskId::parse(&pair[0]) else {
                    continue;
                };
                if self.conn.layout() == Layout::Sharded {
                    pipe.cmd("DEL").arg(keys::task_queue(self.prefix(), &id));
                    n += 1;
                }
                let parents: Vec<String> = pair
                    .get(1)
                    .filter(|d| !d.is_empty())
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default();
                for parent in parents.iter().filter_map(|p| TaskId::parse(p).ok()) {
                    if let Some(q) = self.queue_of(&parent).await? {
                        pipe.cmd("ZREM")
                            .arg(self.qk(&q).dependents(&parent))
                            .arg(id.as_str());
                        n += 1;
                    }
                }
            }
            if n > 0 {
                let _: Vec<i64> = pipe
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("clean up after a purge", e))?;
            }
            let _: () = redis::cmd("LTRIM")
                .arg(&k.purged)
                .arg(pending.len())
                .arg(-1)
                .query_async(&mut c)
                .await
                .map_err(|e| self.conn.error("LTRIM", e))?;
        }
    }
}

/// The queue of a task the lab wrote without one.
fn default_queue() -> QueueName {
    QueueName::parse(codec::LAB_DEFAULT_QUEUE).expect("a valid queue name")
}

fn ids_of(members: Vec<String>) -> Vec<TaskId> {
    members
        .into_iter()
        .filter_map(|m| match TaskId::parse(&m) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(member = %m, error = %e, "ignoring a malformed id in a registry index");
                None
            }
        })
        .collect()
}

#[async_trait]
impl Registry for RedisRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create(&self, task: &Task) -> Result<()> {
        self.prepare(&[task]).await?.remove(0)?;
        let (inv, payload_len) = self.create_invocation(task);
        let created: i64 = self.conn.eval("create task", &inv).await?;
        if created == 1 {
            self.remember(task, payload_len);
            Ok(())
        } else {
            Err(Error::TaskExists(task.task_id.clone()))
        }
    }

    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let refs: Vec<&Task> = tasks.iter().collect();
        let mut out = self.prepare(&refs).await?;
        let todo: Vec<usize> = (0..tasks.len()).filter(|&i| out[i].is_ok()).collect();
        let (invocations, payload_lens): (Vec<ScriptInvocation<'static>>, Vec<usize>) = todo
            .iter()
            .map(|&i| self.create_invocation(&tasks[i]))
            .unzip();
        let results = self
            .conn
            .pipeline_each(
                "create tasks",
                |pipe, i| {
                    pipe.invoke_script(&invocations[i]);
                },
                invocations.len(),
            )
            .await?;
        for ((&i, r), payload_len) in todo.iter().zip(results).zip(payload_lens) {
            let task = &tasks[i];
            out[i] = match r {
                Ok(Value::Int(1)) => {
                    self.remember(task, payload_len);
                    Ok(())
                }
                Ok(Value::Int(0)) => Err(Error::TaskExists(task.task_id.clone())),
                Ok(other) => Err(Error::permanent(
                    BACKEND,
                    format!("create script returned {other:?}"),
                    None,
                )),
                Err(e) => {
                    let e = self.conn.error("create task", e);
                    if e.is_temporary() {
                        return Err(e);
                    }
                    Err(e)
                }
            };
        }
        Ok(out)
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        self.read(id).await?
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let Some(queue) = self.queue_of(id).await? else {
            return Err(Error::TaskNotFound(id.clone()));
        };
        // A task the lab wrote enters our indexes here: its queue must be listed (once per
        // process and queue).
        self.conn.note_queues([&queue]).await?;
        let k = self.qk(&queue);
        let known = self.immutables.lock().map.get(id).cloned();
        let (set, del) = codec::state_fields(&next);
        let mut inv = scripts::TASK_TRANSITION.prepare();
        inv.key(k.task(id))
            .key(&k.leases)
            .key(k.status_index(expected.status))
            .key(k.status_index(next.status))
            .arg(id.as_str())
            .arg(expected.status.as_str())
            .arg(expected.attempt)
            .arg(micros(next.updated_at))
            .arg(lease_score(&next))
            .arg(if known.is_some() { "0" } else { "1" })
            .arg(set.len());
        for (name, value) in set {
            inv.arg(name).arg(value);
        }
        for name in del {
            inv.arg(name);
        }
        let reply: Vec<Value> = self.conn.eval("transition", &inv).await?;
        let mut it = reply.into_iter();
        let tag = it.next().map(text).transpose()?.unwrap_or_default();
        match tag.as_str() {
            "all" => {
                let fields = codec::field_map(it.collect())?;
                let task = self.decode_and_remember(id, fields)?;
                if task.state.status.is_terminal() {
                    self.forget(id);
                }
                Ok(task)
            }
            "ok" => {
                let created_at = it.next().map(text).transpose()?.unwrap_or_default();
                let priority = it.next().map(text).transpose()?.unwrap_or_default();
                let terminal = next.status.is_terminal();
                match known {
                    Some(im)
                        if im.created_at_text == created_at
                            && im.priority.get().to_string() == priority =>
                    {
                        if terminal {
                            self.forget(id);
                        }
                        Ok(im.with_state(id, next))
                    }
                    _ => {
                        // Our copy was stale (deleted and created again, or re-prioritised by
                        // the lab): the change is made; read the task as it now is.
                        self.forget(id);
                        self.get(id)
                            .await?
                            .ok_or_else(|| Error::TaskNotFound(id.clone()))
                    }
                }
            }
            "missing" => Err(Error::TaskNotFound(id.clone())),
            "conflict" => Err(conflict_reply(id, &expected, it)?),
            other => Err(Error::permanent(
                BACKEND,
                format!("transition script returned {other:?}"),
                None,
            )),
        }
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage> {
        let after = cursor.map(decode_cursor).transpose()?;
        let mut tasks: Vec<Task> = Vec::new();
        let mut last: Option<(usize, i64, TaskId)> = None;
        if limit == 0 {
            return Ok(TaskPage::default());
        }
        let statuses: Vec<TaskStatus> = match filter.status {
            Some(s) => vec![s],
            None => TaskStatus::ALL.to_vec(),
        };
        let queues = self.queues_for(filter.queue.as_ref()).await?;
        let batch = limit.clamp(16, 500);
        'statuses: for status in statuses {
            let slot = slot(status);
            let from = match &after {
                Some((cs, _, _)) if slot < *cs => continue,
                Some((cs, score, id)) if slot == *cs => Some((*score, id.as_str().to_string())),
                _ => None,
            };
            // Each queue's index of the status, read in score order and merged here.
            let mut sources: Vec<IndexReader> = queues
                .iter()
                .map(|q| IndexReader::new(q.clone(), self.qk(q).status_index(status), &from))
                .collect();
            loop {
                let need = limit - tasks.len();
                let mut picked: Vec<(TaskId, String, i64)> = Vec::with_capacity(need);
                while picked.len() < need {
                    for src in sources.iter_mut() {
                        src.fill(self, batch).await?;
                    }
                    let Some(best) = sources
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.head().map(|h| (i, h)))
                        .min_by(|(_, (ai, asc)), (_, (bi, bsc))| {
                            asc.cmp(bsc).then_with(|| ai.cmp(bi))
                        })
                        .map(|(i, _)| i)
                    else {
                        break;
                    };
                    let src = &mut sources[best];
                    let (id, score) = src.pop().expect("a head");
                    picked.push((id.clone(), self.qk(&src.queue).task(&id), score));
                }
                if picked.is_empty() {
                    break;
                }
                let items: Vec<(TaskId, String)> = picked
                    .iter()
                    .map(|(id, key, _)| (id.clone(), key.clone()))
                    .collect();
                let found = self.get_many(&items).await?;
                for ((id, _, score), task) in picked.into_iter().zip(found) {
                    let Some(task) = task else { continue };
                    if task.state.status != status {
                        continue; // moved on since the index was read
                    }
                    if filter.queue.as_ref().is_some_and(|q| *q != task.queue) {
                        continue;
                    }
                    tasks.push(task);
                    last = Some((slot, score, id));
                    if tasks.len() == limit {
                        break 'statuses;
                    }
                }
            }
        }
        let next_cursor = if tasks.len() == limit {
            last.map(|(slot, score, id)| encode_cursor(slot, score, &id))
        } else {
            None
        };
        Ok(TaskPage { tasks, next_cursor })
    }

    async fn counts(&self) -> Result<StatusCounts> {
        let queues = self.conn.task_queues().await?;
        let mut totals: Vec<u64> = vec![0; TaskStatus::ALL.len()];
        if !queues.is_empty() {
            let mut pipe = redis::pipe();
            for q in &queues {
                let k = self.qk(q);
                for s in TaskStatus::ALL {
                    pipe.cmd("ZCARD").arg(k.status_index(s));
                }
            }
            let mut c = self.conn.manager();
            let n: Vec<u64> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.conn.error("ZCARD", e))?;
            for (i, v) in n.into_iter().enumerate() {
                totals[i % TaskStatus::ALL.len()] += v;
            }
        }
        Ok(StatusCounts(
            TaskStatus::ALL.into_iter().zip(totals).collect(),
        ))
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let queues = self.conn.task_queues().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for q in &queues {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(&self.qk(q).leases)
                .arg("-inf")
                .arg(format!("({}", micros(before)))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let mut c = self.conn.manager();
        let per_queue: Vec<Vec<(String, f64)>> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("ZRANGEBYSCORE", e))?;
        // The most overdue first, over every queue.
        let mut all: Vec<(f64, TaskId, String)> = Vec::new();
        for (q, members) in queues.iter().zip(per_queue) {
            let k = self.qk(q);
            for (m, score) in members {
                for id in ids_of(vec![m]) {
                    let key = k.task(&id);
                    all.push((score, id, key));
                }
            }
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        all.truncate(limit);
        let items: Vec<(TaskId, String)> = all.into_iter().map(|(_, id, key)| (id, key)).collect();
        let found = self.get_many(&items).await?;
        // A task may have been renewed or finished between the two reads.
        Ok(found
            .into_iter()
            .flatten()
            .filter(|t| {
                t.state.status == TaskStatus::Running
                    && t.state.lease_until.is_none_or(|u| u < before)
            })
            .collect())
    }

    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        let Some(queue) = self.queue_of(parent).await? else {
            return Ok(Vec::new());
        };
        let mut c = self.conn.manager();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.qk(&queue).dependents(parent))
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("ZRANGE", e))?;
        Ok(ids_of(members))
    }

    async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
        if retention.max_age.is_none() && retention.max_count.is_none() {
            return Ok(0);
        }
        let cut = match retention.max_age {
            Some(age) => micros(crate::clock::before(Utc::now(), age)).to_string(),
            None => String::new(),
        };
        // The count kept is per queue: a namespace-wide count would need a cross-slot merge
        // of every queue's index for each deletion (docs/backends/redis.md).
        let keep = retention
            .max_count
            .map(|n| n.to_string())
            .unwrap_or_default();
        let mut total = 0u64;
        for queue in self.conn.task_queues().await? {
            let k = self.qk(&queue);
            // What a pass that died between its two steps left.
            self.finish_purge(&k).await?;
            for status in [
                TaskStatus::Completed,
                TaskStatus::Failed,
                TaskStatus::Cancelled,
            ] {
                loop {
                    let mut inv = scripts::TASK_PURGE.prepare();
                    inv.key(k.status_index(status))
                        .key(&k.leases)
                        .key(&k.purged)
                        .arg(&k.task_prefix)
                        .arg(&cut)
                        .arg(&keep)
                        .arg(PURGE_BATCH)
                        .arg(&k.dependents_prefix);
                    let n: u64 = self.conn.eval("purge finished tasks", &inv).await?;
                    total += n;
                    if n > 0 {
                        self.finish_purge(&k).await?;
                    }
                    if n < PURGE_BATCH as u64 {
                        break;
                    }
                }
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "purged finished tasks");
        }
        Ok(total)
    }

    // The operator's controls: backends/redis/control.rs.
    async fn queues(&self) -> Result<Vec<QueueName>> {
        self.conn.task_queues().await
    }
    async fn queue_counts(&self, queue: &QueueName) -> Result<StatusCounts> {
        super::control::queue_counts(&self.conn, &self.qk(queue)).await
    }
    async fn paused_queues(&self) -> Result<std::collections::BTreeSet<QueueName>> {
        super::control::paused_queues(&self.conn).await
    }
    async fn set_queue_paused(&self, queue: &QueueName, paused: bool) -> Result<bool> {
        super::control::set_paused(&self.conn, queue, paused).await
    }
    async fn queue_limits(
        &self,
    ) -> Result<std::collections::BTreeMap<QueueName, crate::queue_limits::QueueLimits>> {
        super::control::queue_limits(&self.conn).await
    }
    async fn set_queue_limits(
        &self,
        queue: &QueueName,
        limits: &crate::queue_limits::QueueLimits,
    ) -> Result<bool> {
        super::control::set_limits(&self.conn, queue, limits).await
    }

    // Schedules: backends/redis/schedules.rs.
    async fn schedules(&self) -> Result<Vec<crate::schedule::Schedule>> {
        super::schedules::schedules(&self.conn).await
    }
    async fn put_schedule(&self, schedule: &crate::schedule::Schedule) -> Result<bool> {
        super::schedules::put(&self.conn, schedule).await
    }
    async fn remove_schedule(&self, name: &crate::schedule::ScheduleName) -> Result<bool> {
        super::schedules::remove(&self.conn, name).await
    }
}

/// Reads one queue's index of one status in score order, in batches, after a cursor.
struct IndexReader {
    queue: QueueName,
    key: String,
    min: String,
    from: Option<(i64, String)>,
    offset: usize,
    done: bool,
    buf: VecDeque<(TaskId, i64)>,
}

impl IndexReader {
    fn new(queue: QueueName, key: String, from: &Option<(i64, String)>) -> Self {
        // A RUNNING task without a lease end has the score -inf (read back as i64::MIN).
        let min = from
            .as_ref()
            .filter(|(s, _)| *s != i64::MIN)
            .map_or_else(|| "-inf".to_string(), |(s, _)| s.to_string());
        IndexReader {
            queue,
            key,
            min,
            from: from.clone(),
            offset: 0,
            done: false,
            buf: VecDeque::new(),
        }
    }

    /// Reads batches until there is a head or the index is read to its end.
    async fn fill(&mut self, r: &RedisRegistry, batch: usize) -> Result<()> {
        let mut c = r.conn.manager();
        while self.buf.is_empty() && !self.done {
            let entries: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(&self.key)
                .arg(&self.min)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(self.offset)
                .arg(batch)
                .query_async(&mut c)
                .await
                .map_err(|e| r.conn.error("ZRANGEBYSCORE", e))?;
            self.offset += entries.len();
            self.done = entries.len() < batch;
            let from = &self.from;
            self.buf.extend(
                entries
                    .into_iter()
                    .map(|(m, s)| (m, s as i64))
                    .filter(|(m, s)| match from {
                        Some((fs, fid)) => *s > *fs || (*s == *fs && m.as_str() > fid.as_str()),
                        None => true,
                    })
                    .filter_map(|(m, s)| TaskId::parse(&m).ok().map(|id| (id, s))),
            );
        }
        Ok(())
    }

    fn head(&self) -> Option<(&TaskId, i64)> {
        self.buf.front().map(|(id, s)| (id, *s))
    }

    fn pop(&mut self) -> Option<(TaskId, i64)> {
        self.buf.pop_front()
    }
}
