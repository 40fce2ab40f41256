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
use super::keys;
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

    /// Reads a task: the outer error is Redis's, the inner one says the stored hash cannot be
    /// decoded (edited by hand).
    pub(crate) async fn read(&self, id: &TaskId) -> Result<Result<Option<Task>>> {
        let mut c = self.conn.manager();
        let reply: Value = redis::cmd("HGETALL")
            .arg(keys::task(self.prefix(), id))
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

    /// The create script's invocation, and the size of the payload's JSON.
    fn create_invocation(&self, task: &Task) -> (ScriptInvocation<'static>, usize) {
        let p = self.prefix();
        let id = task.task_id.as_str();
        let mut inv = scripts::TASK_CREATE.prepare();
        inv.key(keys::task(p, &task.task_id))
            .key(keys::status_index(p, task.state.status))
            .key(keys::lease_index(p));
        for parent in &task.depends_on {
            inv.key(keys::dependents(p, parent));
        }
        inv.arg(id)
            .arg(micros(task.state.updated_at))
            .arg(lease_score(&task.state))
            .arg(micros(task.created_at));
        let mut payload_len = 0;
        for (name, value) in codec::task_fields(task) {
            if name == "payload" {
                payload_len = value.len();
            }
            inv.arg(name).arg(value);
        }
        (inv, payload_len)
    }

    /// Reads several tasks in one pipelined round trip; `None` where a task is gone or cannot
    /// be read (logged).
    async fn get_many(&self, ids: &[TaskId]) -> Result<Vec<Option<Task>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(keys::task(self.prefix(), id));
        }
        let mut c = self.conn.manager();
        let replies: Vec<Value> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("HGETALL", e))?;
        // For listings and the monitor's queries: a task that cannot be read (its hash edited
        // by hand) is skipped with a warning, so that it does not hide every other one (a
        // monitor pass stopped at it, recovering nothing). `get` still reports it.
        Ok(ids
            .iter()
            .zip(replies)
            .map(|(id, v)| {
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
        let (invocations, payload_lens): (Vec<ScriptInvocation<'static>>, Vec<usize>) =
            tasks.iter().map(|t| self.create_invocation(t)).unzip();
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
        let mut out = Vec::with_capacity(tasks.len());
        for ((task, r), payload_len) in tasks.iter().zip(results).zip(payload_lens) {
            match r {
                Ok(Value::Int(1)) => {
                    self.remember(task, payload_len);
                    out.push(Ok(()))
                }
                Ok(Value::Int(0)) => out.push(Err(Error::TaskExists(task.task_id.clone()))),
                Ok(other) => out.push(Err(Error::permanent(
                    BACKEND,
                    format!("create script returned {other:?}"),
                    None,
                ))),
                Err(e) => {
                    let e = self.conn.error("create task", e);
                    if e.is_temporary() {
                        return Err(e);
                    }
                    out.push(Err(e));
                }
            }
        }
        Ok(out)
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        self.read(id).await?
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let p = self.prefix();
        let known = self.immutables.lock().map.get(id).cloned();
        let (set, del) = codec::state_fields(&next);
        let mut inv = scripts::TASK_TRANSITION.prepare();
        inv.key(keys::task(p, id))
            .key(keys::lease_index(p))
            .key(keys::status_index(p, expected.status))
            .key(keys::status_index(p, next.status))
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
        let batch = limit.clamp(16, 500);
        let mut c = self.conn.manager();
        'statuses: for status in statuses {
            let slot = slot(status);
            let from = match &after {
                Some((cs, _, _)) if slot < *cs => continue,
                Some((cs, score, id)) if slot == *cs => Some((*score, id.as_str().to_string())),
                _ => None,
            };
            // A RUNNING task without a lease end has the score -inf (read back as i64::MIN).
            let min = from
                .as_ref()
                .filter(|(s, _)| *s != i64::MIN)
                .map_or_else(|| "-inf".to_string(), |(s, _)| s.to_string());
            let index = keys::status_index(self.prefix(), status);
            let mut offset = 0usize;
            loop {
                let entries: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                    .arg(&index)
                    .arg(&min)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(offset)
                    .arg(batch)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.error("ZRANGEBYSCORE", e))?;
                let fetched = entries.len();
                offset += fetched;
                let entries: Vec<(TaskId, i64)> = entries
                    .into_iter()
                    .map(|(m, s)| (m, s as i64))
                    .filter(|(m, s)| match &from {
                        Some((fs, fid)) => *s > *fs || (*s == *fs && m.as_str() > fid.as_str()),
                        None => true,
                    })
                    .filter_map(|(m, s)| TaskId::parse(&m).ok().map(|id| (id, s)))
                    .collect();
                let ids: Vec<TaskId> = entries.iter().map(|(id, _)| id.clone()).collect();
                let found = self.get_many(&ids).await?;
                for ((id, score), task) in entries.into_iter().zip(found) {
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
                if fetched < batch {
                    break;
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
        let mut pipe = redis::pipe();
        for s in TaskStatus::ALL {
            pipe.cmd("ZCARD").arg(keys::status_index(self.prefix(), s));
        }
        let mut c = self.conn.manager();
        let n: Vec<u64> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("ZCARD", e))?;
        Ok(StatusCounts(TaskStatus::ALL.into_iter().zip(n).collect()))
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.conn.manager();
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::lease_index(self.prefix()))
            .arg("-inf")
            .arg(format!("({}", micros(before)))
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.error("ZRANGEBYSCORE", e))?;
        let ids = ids_of(members);
        let found = self.get_many(&ids).await?;
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
        let mut c = self.conn.manager();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::dependents(self.prefix(), parent))
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
        let keep = retention
            .max_count
            .map(|n| n.to_string())
            .unwrap_or_default();
        let mut total = 0u64;
        for status in [
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            loop {
                let mut inv = scripts::TASK_PURGE.prepare();
                inv.key(keys::status_index(self.prefix(), status))
                    .key(keys::lease_index(self.prefix()))
                    .arg(self.prefix())
                    .arg(&cut)
                    .arg(&keep)
                    .arg(PURGE_BATCH);
                let n: u64 = self.conn.eval("purge finished tasks", &inv).await?;
                total += n;
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "purged finished tasks");
        }
        Ok(total)
    }
}
