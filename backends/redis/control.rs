//! The operator's controls on Redis: the paused queues (a SET `{prefix}orchestra:paused`, which
//! `drop_namespace` deletes with the `orchestra:` family; empty, it does not exist), the queues'
//! runtime limits (a HASH `{prefix}orchestra:limits`, queue → JSON, same family), per-queue
//! task counts from the queue's status indexes, the delayed messages (`ZCARD` of the queue's
//! delayed ZSET) and the removal of dead letters (one Lua script per call, in the queue's slot).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use redis::Script;

use super::conn::Conn;
use super::keys::QueueKeys;
use crate::error::Result;
use crate::model::{QueueName, TaskStatus};
use crate::queue_limits::QueueLimits;
use crate::registry::StatusCounts;

/// KEYS: 1 dead (LIST of `id:d:p:dead_at:reason`, or a bare id written before 2026-11-25 whose
/// HASH `<queue>:m:<id>` holds the rest), 2 bodies (HASH by id). ARGV: the message ids.
/// Deletes each named dead letter with its body; returns the ids deleted. O(dead letters).
const REMOVE_DEAD_LETTERS: &str = r#"
local wanted = {}
for i = 1, #ARGV do wanted[ARGV[i]] = true end
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local out = {}
for i = 1, #entries do
  local e = entries[i]
  local id = string.match(e, '^(%d+):') or string.match(e, '^(%d+)$')
  if id and wanted[id] then
    wanted[id] = nil
    redis.call('LREM', KEYS[1], 1, e)
    redis.call('HDEL', KEYS[2], id)
    if e == id then
      redis.call('DEL', string.sub(KEYS[2], 1, -7) .. 'm:' .. id)
    end
    out[#out + 1] = id
  end
end
return out
"#;

static REMOVE: LazyLock<Script> = LazyLock::new(|| Script::new(REMOVE_DEAD_LETTERS));

/// KEYS: 1 the limits HASH. ARGV: 1 the queue, 2 its limits as JSON (empty: clear them).
/// Returns 1 when the stored limits changed.
const SET_LIMITS: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
if old == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

static SET_LIMITS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_LIMITS));

fn paused_key(conn: &Conn) -> String {
    format!("{}orchestra:paused", conn.prefix())
}

/// [`Registry::paused_queues`](crate::Registry::paused_queues): `SMEMBERS`; a member that is no
/// queue name (written by hand) is skipped.
pub(crate) async fn paused_queues(conn: &Conn) -> Result<BTreeSet<QueueName>> {
    let mut c = conn.manager();
    let names: Vec<String> = redis::cmd("SMEMBERS")
        .arg(paused_key(conn))
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("SMEMBERS the paused queues", e))?;
    Ok(names
        .iter()
        .filter_map(|n| QueueName::parse(n).ok())
        .collect())
}

/// [`Registry::set_queue_paused`](crate::Registry::set_queue_paused): `SADD` or `SREM`.
pub(crate) async fn set_paused(conn: &Conn, queue: &QueueName, paused: bool) -> Result<bool> {
    let mut c = conn.manager();
    let changed: i64 = redis::cmd(if paused { "SADD" } else { "SREM" })
        .arg(paused_key(conn))
        .arg(queue.as_str())
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("change the paused queues", e))?;
    Ok(changed == 1)
}

fn limits_key(conn: &Conn) -> String {
    format!("{}orchestra:limits", conn.prefix())
}

/// [`Registry::queue_limits`](crate::Registry::queue_limits): `HGETALL`; an entry that is no
/// queue name or no limits (written by hand) is skipped.
pub(crate) async fn queue_limits(conn: &Conn) -> Result<BTreeMap<QueueName, QueueLimits>> {
    let mut c = conn.manager();
    let stored: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(limits_key(conn))
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("HGETALL the queues' limits", e))?;
    Ok(stored
        .iter()
        .filter_map(|(q, l)| {
            let limits: QueueLimits = serde_json::from_str(l).ok()?;
            Some((QueueName::parse(q).ok()?, limits))
        })
        .collect())
}

/// [`Registry::set_queue_limits`](crate::Registry::set_queue_limits): one script compares and
/// writes (or deletes) the queue's entry.
pub(crate) async fn set_limits(
    conn: &Conn,
    queue: &QueueName,
    limits: &QueueLimits,
) -> Result<bool> {
    limits.validate()?;
    let json = match limits.is_unlimited() {
        true => String::new(),
        false => serde_json::to_string(limits).unwrap_or_default(),
    };
    let mut inv = SET_LIMITS_SCRIPT.prepare_invoke();
    inv.key(limits_key(conn)).arg(queue.as_str()).arg(json);
    let changed: i64 = conn.eval("set the queue's limits", &inv).await?;
    Ok(changed == 1)
}

/// [`Registry::queue_counts`](crate::Registry::queue_counts): the sizes of the queue's status
/// indexes, in one pipeline (one slot).
pub(crate) async fn queue_counts(conn: &Conn, keys: &QueueKeys) -> Result<StatusCounts> {
    let mut pipe = redis::pipe();
    for s in TaskStatus::ALL {
        pipe.cmd("ZCARD").arg(keys.status_index(s));
    }
    let mut c = conn.manager();
    let n: Vec<u64> = pipe
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("ZCARD the queue's status indexes", e))?;
    Ok(StatusCounts(
        TaskStatus::ALL
            .into_iter()
            .zip(n)
            .filter(|(_, n)| *n > 0)
            .collect(),
    ))
}

/// [`Bus::delayed`](crate::Bus::delayed): `ZCOUNT` of the delayed ZSET (scored by due time in
/// ms) from now on, so that a message due but not yet promoted by a fetch counts as ready.
pub(crate) async fn delayed(conn: &Conn, keys: &QueueKeys) -> Result<Option<u64>> {
    let mut c = conn.manager();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let n: u64 = redis::cmd("ZCOUNT")
        .arg(&keys.delayed)
        .arg(format!("({now_ms}"))
        .arg("+inf")
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("ZCARD the delayed messages", e))?;
    Ok(Some(n))
}

/// [`Bus::remove_dead_letters`](crate::Bus::remove_dead_letters).
pub(crate) async fn remove_dead_letters(
    conn: &Conn,
    keys: &QueueKeys,
    ids: &[String],
) -> Result<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = REMOVE.prepare_invoke();
    inv.key(&keys.dead).key(&keys.bodies);
    for id in ids {
        inv.arg(id);
    }
    conn.eval("remove dead letters", &inv).await
}
