//! [`RedisTaskQueue`]: the worker's hot path ([`TaskQueue`]) in one Lua script per step when
//! one Redis server holds both the bus and the registry: a fetch that also claims each task
//! (`fetch_claim.lua`), and an outcome recorded with its message settled, its event published
//! and its dependents read (`record.lua`). What each script does is what
//! [`Composed`] does with separate calls.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use redis::Value;

use super::bus::{fetch_reply, millis, parse_receipt, RedisBus};
use super::codec::{self, micros, text};
use super::conn::{Conn, BACKEND};
use super::keys;
use super::records::Records;
use super::registry::{conflict_reply, lease_score, RedisRegistry};
use super::scripts;
use crate::bus::{Delivery, FetchOptions};
use crate::error::{Error, Result};
use crate::model::{Expected, QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::registry::check_transition;
use crate::task_queue::{Claim, ClaimSpec, Composed, Recorded, Settle, TaskQueue};
use crate::wire::TaskMessage;
use crate::wire::{around_attempt, encode_parts};

/// The Redis [`TaskQueue`]. Built by `open` when one URL opens both the bus and the registry.
#[derive(Debug)]
pub struct RedisTaskQueue {
    conn: Conn,
    bus: Arc<RedisBus>,
    registry: Arc<RedisRegistry>,
    composed: Composed,
    records: Records,
}

impl RedisTaskQueue {
    pub(crate) fn new(conn: Conn, bus: Arc<RedisBus>, registry: Arc<RedisRegistry>) -> Self {
        let composed = Composed::new(bus.clone(), registry.clone());
        RedisTaskQueue {
            records: Records::new(conn.clone(), bus.clone()),
            conn,
            bus,
            registry,
            composed,
        }
    }

    /// Reads one entry of the fetch-and-claim script's claims; `claimed` is the state the script
    /// wrote over a claimed task.
    fn claim_of(
        &self,
        d: &Delivery,
        reply: Value,
        claimed: impl FnOnce(&TaskState) -> TaskState,
    ) -> Result<ClaimReply> {
        // The script puts the tag last.
        let (tag, mut it) = match reply {
            Value::Array(mut v) => (v.pop(), v.into_iter()),
            other => {
                return Err(Error::permanent(
                    BACKEND,
                    format!("fetch_claim returned {other:?} for a claim"),
                    None,
                ))
            }
        };
        let tag = tag.map(text).transpose()?.unwrap_or_default();
        // The script read the id only from the canonical forms, which serde_json reads alike;
        // read it again here, with the model's rules. A message it did not read is decoded
        // here alone: what this side cannot read is dead-lettered, untouched by the script.
        let id = match TaskMessage::decode(&d.payload) {
            Ok(m) => m.task_id,
            Err(e) => return Ok(ClaimReply::Claim(Claim::Malformed(e.to_string()))),
        };
        let corrupt = |why: &dyn std::fmt::Display| {
            Claim::Malformed(format!(
                "the registry entry of task {id} is corrupt ({why}); the task is left as it is"
            ))
        };
        let claim = match tag.as_str() {
            "claimed" => {
                // Kept until decoded: a claim over a hash that cannot be is undone with it.
                let (fields, found) = match claim_fields(it.collect()) {
                    Ok(fields) => {
                        let found = codec::decode(&id, &fields);
                        (fields, found)
                    }
                    Err(old) => {
                        let utf8 = |b: &[u8]| std::str::from_utf8(b).is_ok();
                        let why = old
                            .iter()
                            .find(|(k, v)| !utf8(k) || !utf8(v))
                            .map(|(k, _)| {
                                let name = String::from_utf8_lossy(k);
                                format!("stored task field `{name}`: is not UTF-8")
                            })
                            .unwrap_or_default();
                        return Ok(ClaimReply::Undo { id, old, why });
                    }
                };
                match found {
                    Ok(found) => Claim::Claimed(Task {
                        state: claimed(&found.state),
                        ..found
                    }),
                    Err(e) => {
                        let old = fields
                            .into_iter()
                            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                            .collect();
                        let why = e.to_string();
                        return Ok(ClaimReply::Undo { id, old, why });
                    }
                }
            }
            "unclaimable" => {
                match codec::field_map(it.collect()).and_then(|f| codec::decode(&id, &f)) {
                    Ok(found) => Claim::Unclaimable(found),
                    Err(e) => corrupt(&e),
                }
            }
            "missing" => Claim::Missing(id),
            "unreadable" => {
                let why = it.nth(1).map(text).transpose()?.unwrap_or_default();
                Claim::Malformed(format!(
                    "the registry entry of task {id} cannot be read: {why}"
                ))
            }
            "corrupt" => corrupt(&it.nth(1).map(text).transpose()?.unwrap_or_default()),
            "noncanonical" => return Ok(ClaimReply::Generic),
            other => {
                return Err(Error::permanent(
                    BACKEND,
                    format!("fetch_claim returned the claim {other:?}"),
                    None,
                ))
            }
        };
        Ok(ClaimReply::Claim(claim))
    }

    /// Undoes the claim the fetch-and-claim script made at `now` over task `id`, whose hash
    /// was `old` (field, value pairs) before it and cannot be decoded here; the claim's
    /// message is then dead-lettered with `why`. True when undone.
    async fn undo_claim(
        &self,
        queue: &QueueName,
        id: &TaskId,
        old: RawFields,
        spec: &ClaimSpec,
        now: chrono::DateTime<Utc>,
    ) -> Result<bool> {
        let k = self.bus.keys(queue);
        let field = |name: &str| -> Option<&str> {
            old.iter()
                .find(|(k, _)| k == name.as_bytes())
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        // task_check.lua read the status before claiming: it is one of ours.
        let status = field("status")
            .and_then(|s| codec::parse_status(s).ok())
            .unwrap_or(TaskStatus::Pending);
        let time = |name: &str| field(name).and_then(|t| codec::parse_time(name, t).ok());
        // The index score as the registry writes it: the lease end (the lease index) or the
        // last change (a status index); when that field is the unreadable one, an expired
        // lease or now.
        let score = match status {
            TaskStatus::Running => {
                time("lease_until").map_or("-inf".to_string(), |t| micros(t).to_string())
            }
            _ => micros(
                time("updated_at")
                    .or_else(|| time("created_at"))
                    .unwrap_or(now),
            )
            .to_string(),
        };
        let mut inv = scripts::CLAIM_UNDO.prepare();
        inv.key(k.task(id))
            .key(&k.leases)
            .key(k.status_index(status))
            .arg(id.as_str())
            .arg(&*spec.worker_id)
            .arg(codec::format_time(now))
            .arg(score);
        for (k, v) in &old {
            inv.arg(k.as_slice()).arg(v.as_slice());
        }
        let undone: i64 = self.conn.eval("claim_undo", &inv).await?;
        Ok(undone == 1)
    }

    async fn fetch_claim_once(
        &self,
        queue: &QueueName,
        k: Arc<keys::QueueKeys>,
        options: FetchOptions,
        spec: &ClaimSpec,
    ) -> Result<(Vec<(Delivery, Option<Claim>)>, Option<std::time::Duration>)> {
        let now = Utc::now();
        let lease_until = crate::clock::after(now, spec.lease);
        let (before, after) =
            around_attempt(queue, TaskStatus::Running, Some(&spec.worker_id), now);
        let mut inv = self
            .bus
            .fetch_command(&scripts::FETCH_CLAIM, &k, options.max, options.lease);
        inv.arg(&k.task_prefix)
            .arg(&k.status_prefix)
            .arg(&k.leases)
            .arg(micros(now))
            .arg(micros(lease_until))
            .arg(&*spec.worker_id)
            .arg(codec::format_time(now))
            .arg(codec::format_time(lease_until))
            .arg(self.conn.script_events_channel())
            .arg(before)
            .arg(after);
        let reply: Vec<Value> = self.conn.eval_cmd("fetch_claim", &inv).await?;
        let mut parts = reply.into_iter();
        let short = || Error::permanent(BACKEND, "fetch_claim returned a short reply", None);
        let fetched = match parts.next().ok_or_else(short)? {
            Value::Array(v) => v,
            _ => return Err(short()),
        };
        let claims = match parts.next().ok_or_else(short)? {
            Value::Array(v) => v,
            _ => return Err(short()),
        };
        let (deliveries, next) = fetch_reply(queue, fetched)?;
        if claims.len() != deliveries.len() {
            return Err(short());
        }
        let mut out = Vec::with_capacity(deliveries.len());
        for (d, c) in deliveries.into_iter().zip(claims) {
            let claim = match self.claim_of(&d, c, |found| spec.claimed_state(found, now)) {
                Ok(ClaimReply::Claim(c)) => Some(c),
                Ok(ClaimReply::Generic) => None,
                Ok(ClaimReply::Undo { id, old, why }) => {
                    let undone = self.undo_claim(queue, &id, old, spec, now).await;
                    if !matches!(undone, Ok(true)) {
                        tracing::error!(task_id = %id, undone = ?undone, "a claim over an unreadable task could not be undone; it stays RUNNING until its lease ends");
                    }
                    Some(Claim::Malformed(format!(
                        "the registry entry of task {id} is corrupt ({why}); the task is left as it is"
                    )))
                }
                // A claim reply this side cannot read is left to `claim` (the generic path).
                Err(e) => {
                    tracing::warn!(message_id = %d.message_id, error = %e, "unreadable claim reply; claiming again");
                    None
                }
            };
            out.push((d, claim));
        }
        Ok((out, next))
    }
}

/// What one entry of the fetch-and-claim script's claims says to do.
// Lives a moment on the stack, once per claim: boxing the large variant would allocate per claim.
#[allow(clippy::large_enum_variant)]
enum ClaimReply {
    /// The claim.
    Claim(Claim),
    /// The script left the message to [`TaskQueue::claim`] (a task message in a form it does
    /// not read).
    Generic,
    /// The script claimed a task whose hash (`old`, as it was) cannot be decoded here: undo the
    /// claim, dead-letter the message with `why`.
    Undo {
        id: TaskId,
        old: RawFields,
        why: String,
    },
}

/// The (field, value) pairs of a claim reply as text, moved without a copy; when one is not
/// UTF-8, every pair as bytes (for the undo of the claim).
fn claim_fields(values: Vec<Value>) -> std::result::Result<HashMap<String, String>, RawFields> {
    fn bytes(v: Value) -> Vec<u8> {
        match v {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.into_bytes(),
            Value::Int(i) => i.to_string().into_bytes(),
            Value::VerbatimString { text, .. } => text.into_bytes(),
            _ => Vec::new(),
        }
    }
    let back = |r: std::result::Result<String, std::string::FromUtf8Error>| {
        r.map_or_else(|e| e.into_bytes(), String::into_bytes)
    };
    let mut fields = HashMap::with_capacity(values.len() / 2);
    let mut it = values.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match (String::from_utf8(bytes(k)), String::from_utf8(bytes(v))) {
            (Ok(k), Ok(v)) => {
                fields.insert(k, v);
            }
            (k, v) => {
                let mut raw: RawFields = fields
                    .into_iter()
                    .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                    .collect();
                raw.push((back(k), back(v)));
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    raw.push((bytes(k), bytes(v)));
                }
                return Err(raw);
            }
        }
    }
    Ok(fields)
}

/// A task hash's (field, value) pairs as stored.
type RawFields = Vec<(Vec<u8>, Vec<u8>)>;

/// The fields a record writes and deletes: only those that differ from `current`, the state
/// the compare-and-set on (status, attempt) finds stored. (A heartbeat may have renewed the
/// lease fields since; a record keeps what it does not change, so a later heartbeat time is
/// not set back.) Writing the unchanged fields again, as a generic transition does, costs
/// Redis a field lookup in the task's hash per field.
fn changed_fields(
    current: &TaskState,
    next: &TaskState,
) -> (Vec<(&'static str, String)>, Vec<&'static str>) {
    let (was, _) = codec::state_fields(current);
    let (set, del) = codec::state_fields(next);
    let set = set
        .into_iter()
        .filter(|(name, value)| !was.iter().any(|(n, v)| n == name && v == value))
        .collect();
    let del = del
        .into_iter()
        .filter(|name| was.iter().any(|(n, _)| n == name))
        .collect();
    (set, del)
}

/// One record's arguments to record.lua (after the script's fixed ones).
fn record_args(
    d: &Delivery,
    current: &Task,
    expected: &Expected,
    next: &TaskState,
    settle: Settle,
) -> redis::Cmd {
    let id = &current.task_id;
    let event = encode_parts(
        id,
        &current.queue,
        next.status,
        next.attempt,
        next.worker_id.as_deref(),
        next.updated_at,
    );
    let (set, del) = changed_fields(&current.state, next);
    let mut args = redis::Cmd::new();
    args.arg(id.as_str())
        .arg(expected.status.as_str())
        .arg(expected.attempt)
        .arg(micros(next.updated_at))
        .arg(lease_score(next))
        .arg(next.status.as_str())
        .arg(next.attempt)
        .arg(&d.receipt)
        .arg(match settle {
            Settle::Ack => -1i64,
            Settle::Nack(delay) => i64::try_from(millis(delay)).unwrap_or(i64::MAX),
        })
        .arg(event)
        .arg(set.len())
        .arg(del.len());
    for (name, value) in set {
        args.arg(name).arg(value);
    }
    for name in del {
        args.arg(name);
    }
    args
}

/// Most tasks, and most argument bytes, per submit script, so that one script stays short.
const SUBMIT_BATCH_MAX: usize = 500;
const SUBMIT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A task as the submit script takes it: its fields, and their size.
struct SubmitRow<'a> {
    task: &'a Task,
    fields: Vec<(&'static str, String)>,
    bytes: usize,
}

impl<'a> SubmitRow<'a> {
    fn new(task: &'a Task) -> Self {
        let fields = codec::task_fields(task);
        let bytes = fields.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>() + 256;
        SubmitRow {
            task,
            fields,
            bytes,
        }
    }
}

impl RedisTaskQueue {
    /// One submit script for tasks of one queue (already sized by the caller).
    async fn submit_batch(
        &self,
        queue: &QueueName,
        rows: &[SubmitRow<'_>],
    ) -> Result<Vec<Result<()>>> {
        let k = self.bus.keys(queue);
        let mut inv = scripts::SUBMIT.evalsha(4);
        inv.arg(&k.ready)
            .arg(&k.seq)
            .arg(&k.bodies)
            .arg(k.status_index(TaskStatus::Pending))
            .arg(&k.wake)
            .arg(&k.task_prefix)
            .arg(self.conn.script_events_channel());
        for row in rows {
            let t = row.task;
            inv.arg(t.task_id.as_str())
                .arg(micros(t.state.updated_at))
                .arg(t.priority.get())
                .arg(encode_parts(
                    &t.task_id,
                    &t.queue,
                    t.state.status,
                    t.state.attempt,
                    t.state.worker_id.as_deref(),
                    t.state.updated_at,
                ))
                .arg(row.fields.len());
            for (name, value) in &row.fields {
                inv.arg(*name).arg(value.as_str());
            }
        }
        let created: Vec<i64> = self
            .conn
            .eval_cmd_replicated("submit", &k.ready, &inv)
            .await?;
        if created.len() != rows.len() {
            return Err(Error::permanent(
                BACKEND,
                "submit returned a short reply",
                None,
            ));
        }
        Ok(rows
            .iter()
            .zip(created)
            .map(|(row, c)| {
                if c == 1 {
                    Ok(())
                } else {
                    Err(Error::TaskExists(row.task.task_id.clone()))
                }
            })
            .collect())
    }
}

#[async_trait]
impl TaskQueue for RedisTaskQueue {
    async fn submit(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        if tasks
            .iter()
            .any(|t| t.state.status != TaskStatus::Pending || !t.depends_on.is_empty())
        {
            return self.composed.submit(tasks).await;
        }
        // Queue names, and on a cluster the id pointers, first (other slots than the queues').
        let refs: Vec<&Task> = tasks.iter().collect();
        let prepared = self.registry.prepare(&refs).await?;
        let mut out: Vec<Option<Result<()>>> = (0..tasks.len()).map(|_| None).collect();
        let mut by_queue: std::collections::BTreeMap<&QueueName, Vec<(usize, SubmitRow)>> =
            Default::default();
        for (i, (t, ready)) in tasks.iter().zip(prepared).enumerate() {
            if let Err(e) = ready {
                out[i] = Some(Err(e));
                continue;
            }
            by_queue
                .entry(&t.queue)
                .or_default()
                .push((i, SubmitRow::new(t)));
        }
        for (queue, rows) in by_queue {
            let (indexes, rows): (Vec<usize>, Vec<SubmitRow>) = rows.into_iter().unzip();
            let mut start = 0;
            while start < rows.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < rows.len()
                    && end - start < SUBMIT_BATCH_MAX
                    && (end == start || bytes + rows[end].bytes <= SUBMIT_BATCH_BYTES)
                {
                    bytes += rows[end].bytes;
                    end += 1;
                }
                let results = self.submit_batch(queue, &rows[start..end]).await?;
                for (&i, r) in indexes[start..end].iter().zip(results) {
                    out[i] = Some(r);
                }
                start = end;
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn fetch_claim(
        &self,
        queue: &QueueName,
        options: FetchOptions,
        spec: &ClaimSpec,
    ) -> Result<Vec<(Delivery, Option<Claim>)>> {
        self.bus
            .fetch_waiting(queue, options.max, options.wait, |k| {
                self.fetch_claim_once(queue, k, options, spec)
            })
            .await
    }

    async fn claim(&self, delivery: &Delivery, spec: &ClaimSpec) -> Result<Claim> {
        // The generic claim reads the task with `Registry::get`, whose error for a hash edited
        // by hand is permanent and would come back at every redelivery: such a task's message
        // is dead-lettered here, as the claim script does, and the task left as it is.
        if let Ok(m) = TaskMessage::decode(&delivery.payload) {
            if let Err(e) = self.registry.read(&m.task_id).await? {
                return Ok(Claim::Malformed(format!(
                    "the registry entry of task {} is corrupt ({e}); the task is left as it is",
                    m.task_id
                )));
            }
        }
        self.composed.claim(delivery, spec).await
    }

    async fn record(
        &self,
        d: &Delivery,
        current: &Task,
        next: TaskState,
        settle: Settle,
    ) -> Result<Recorded> {
        let id = &current.task_id;
        let expected = current.expect();
        check_transition(id, &expected, &next)?;
        parse_receipt(&d.receipt)?;
        let args = record_args(d, current, &expected, &next, settle);
        let reply = self.records.run(&d.queue, id, args).await?;
        let mut it = match reply {
            Value::Array(v) => v.into_iter(),
            other => {
                return Err(Error::permanent(
                    BACKEND,
                    format!("record returned {other:?} for a record"),
                    None,
                ))
            }
        };
        let tag = it.next().map(text).transpose()?.unwrap_or_default();
        match tag.as_str() {
            "ok" | "ok_unread" => {
                let rest = it.map(text).collect::<Result<Vec<String>>>()?;
                let dependents = if tag == "ok" {
                    rest.iter().filter_map(|m| TaskId::parse(m).ok()).collect()
                } else {
                    tracing::warn!(task_id = %id, error = %rest.join(" "), "outcome recorded, but the task's dependents set is unreadable; the monitor moves its dependents on");
                    Vec::new()
                };
                if next.status.is_terminal() {
                    self.registry.forget(id);
                }
                Ok(Recorded {
                    task: Task {
                        state: next,
                        ..current.clone()
                    },
                    dependents,
                })
            }
            "missing" => Err(Error::TaskNotFound(id.clone())),
            "conflict" => Err(conflict_reply(id, &expected, it)?),
            "error" => Err(Error::permanent(
                BACKEND,
                format!(
                    "record of task {id}: {}",
                    it.next().map(text).transpose()?.unwrap_or_default()
                ),
                None,
            )),
            other => Err(Error::permanent(
                BACKEND,
                format!("record script returned {other:?}"),
                None,
            )),
        }
    }
}
