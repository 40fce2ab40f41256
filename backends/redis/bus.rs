//! [`RedisBus`]: events over PUBLISH/SUBSCRIBE, work queues in sorted sets moved by Lua.
//!
//! Each queue is a ready ZSET (priority, then sequence), a delayed ZSET (due time) and an
//! in-flight ZSET (lease end) of message headers, and one HASH of message bodies, all under the
//! queue's hash tag; every operation is one script, so one round trip (see
//! docs/backends/redis.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use parking_lot::Mutex;
use redis::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::codec::text;
use super::conn::{Conn, LuaScript, BACKEND};
use super::keys::{self, QueueKeys};
use super::pubsub::PubSub;
use super::scripts;
use crate::bus::{
    Bus, DeadLetter, Delivery, FetchOptions, OutgoingMessage, QueueStats, Subscription,
};
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName};

/// Dead letters kept per queue; past this the oldest are deleted (as in the memory bus).
pub(crate) const DEAD_LETTERS_KEPT: usize = 100_000;
/// Most messages one fetch script takes (a larger `max` gets this many; callers loop).
const FETCH_BATCH_MAX: usize = crate::bus::FETCH_MAX;
/// Most messages per enqueue script, and most payload bytes, so one script stays short.
const ENQUEUE_BATCH_MAX: usize = 500;
const ENQUEUE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// A waiting fetch looks again at least this often even without a wake-up (a safety net for
/// a lost notification, and how a waiting consumer notices a lease that ended elsewhere).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The Redis bus. Cheap to share; every clone of the `Arc` uses the same connections.
pub struct RedisBus {
    conn: Conn,
    max_deliveries: u32,
    queues: Mutex<HashMap<QueueName, Arc<QueueKeys>>>,
    pubsub: OnceCell<Arc<PubSub>>,
    dead_reason: String,
    /// Queues whose last waiting fetch emptied the ready set (see `fetch_waiting`).
    drained: Mutex<HashMap<QueueName, Drained>>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("conn", &self.conn)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

/// A receipt is the delivery's header `id:d:p:s` (message id, delivery number, priority,
/// sequence number), the member of the in-flight set that the delivery holds. Returns the
/// message id, the delivery number and the priority.
pub(crate) fn parse_receipt(receipt: &str) -> Result<(&str, u32, Priority)> {
    let bad = || Error::invalid("receipt", format!("{receipt:?} is not a redis bus receipt"));
    let mut parts = receipt.split(':');
    let mut next = || {
        parts
            .next()
            .filter(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(bad)
    };
    let (id, d, p, _s) = (next()?, next()?, next()?, next()?);
    if parts.next().is_some() {
        return Err(bad());
    }
    // Out of range is read as the nearest value, not refused: a header written by hand (or a
    // legacy message with `p` 0) reaches the caller in a batch the fetch script has already
    // leased and claimed, and refusing it would throw the whole batch away.
    let d = u32::try_from(d.parse::<u64>().map_err(|_| bad())?).unwrap_or(u32::MAX);
    let p = p.parse::<u64>().map_err(|_| bad())?.clamp(1, 10);
    let p = Priority::new(p as i64).map_err(|_| bad())?;
    Ok((id, d, p))
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms_to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

fn int(v: Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(i),
        other => text(other)?
            .parse()
            .map_err(|_| Error::permanent(BACKEND, "a script returned a non-number", None)),
    }
}

fn bulk(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(Error::permanent(
            BACKEND,
            format!("unexpected reply {other:?} where bytes were expected"),
            None,
        )),
    }
}

impl RedisBus {
    pub(crate) fn new(conn: Conn, max_deliveries: u32) -> Self {
        let max_deliveries = max_deliveries.max(1);
        RedisBus {
            conn,
            max_deliveries,
            queues: Mutex::new(HashMap::new()),
            pubsub: OnceCell::new(),
            dead_reason: format!(
                "exceeded the maximum of {max_deliveries} deliveries without an ack"
            ),
            drained: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn keys(&self, queue: &QueueName) -> Arc<QueueKeys> {
        let mut queues = self.queues.lock();
        if let Some(k) = queues.get(queue) {
            return k.clone();
        }
        let k = Arc::new(self.conn.queue_keys(queue));
        queues.insert(queue.clone(), k.clone());
        k
    }

    async fn pubsub(&self) -> Result<&Arc<PubSub>> {
        self.pubsub
            .get_or_try_init(|| PubSub::open(&self.conn))
            .await
    }

    /// One enqueue script for a batch (already sized by the caller).
    async fn enqueue_batch(&self, k: &QueueKeys, batch: &[OutgoingMessage]) -> Result<Vec<String>> {
        let mut inv = scripts::ENQUEUE.prepare();
        inv.key(&k.ready)
            .key(&k.delayed)
            .key(&k.seq)
            .key(&k.bodies)
            .arg(&k.wake);
        for m in batch {
            inv.arg(millis(m.delay))
                .arg(m.priority.get())
                .arg(&m.payload);
        }
        let ids: Vec<i64> = self.conn.eval("enqueue", &inv).await?;
        Ok(ids.into_iter().map(|i| i.to_string()).collect())
    }

    /// The `EVALSHA` of `script` (FETCH or FETCH_CLAIM) with the fetch's keys and arguments.
    pub(crate) fn fetch_command(
        &self,
        script: &'static LuaScript,
        k: &QueueKeys,
        max: usize,
        lease: Duration,
    ) -> redis::Cmd {
        let mut cmd = script.evalsha(6);
        cmd.arg(&k.ready)
            .arg(&k.delayed)
            .arg(&k.inflight)
            .arg(&k.seq)
            .arg(&k.dead)
            .arg(&k.bodies)
            .arg(max.min(FETCH_BATCH_MAX))
            .arg(millis(lease).max(1))
            .arg(self.max_deliveries)
            .arg(&self.dead_reason)
            .arg(DEAD_LETTERS_KEPT)
            .arg(&k.wake);
        cmd
    }

    async fn fetch_once(
        &self,
        queue: &QueueName,
        k: Arc<QueueKeys>,
        max: usize,
        lease: Duration,
    ) -> Result<(Vec<Delivery>, Option<Duration>)> {
        let cmd = self.fetch_command(&scripts::FETCH, &k, max, lease);
        let reply: Vec<Value> = self.conn.eval_cmd("fetch", &cmd).await?;
        fetch_reply(queue, reply)
    }

    /// A fetch that waits up to `wait` for messages: runs `once` (one fetch script), and while
    /// it gives nothing, waits for a wake-up on the queue's channel (or the time the script
    /// said the next delayed message or lease end is due) and runs it again.
    pub(crate) async fn fetch_waiting<T, F, Fut>(
        &self,
        queue: &QueueName,
        max: usize,
        wait: Duration,
        once: F,
    ) -> Result<Vec<T>>
    where
        F: Fn(Arc<QueueKeys>) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<T>, Option<Duration>)>>,
    {
        if max == 0 {
            return Err(Error::invalid("fetch max", "must be at least 1"));
        }
        let k = self.keys(queue);
        if wait.is_zero() {
            return Ok(once(k).await?.0);
        }
        let deadline = Instant::now() + crate::clock::capped(wait);
        let wake = self.pubsub().await?.wake(&k.wake).await?;
        loop {
            // Registered before the script runs: a wake-up published after the script saw an
            // empty queue is never missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            // The last fetch of this queue emptied its ready set, and no wake-up came since
            // that script was sent: the set is still empty (everything that fills it publishes
            // a wake-up, but what the hint's due time covers), so wait for the wake-up instead
            // of asking Redis again. One fetch a task less when tasks come one at a time.
            let skip =
                self.drained.lock().remove(queue).and_then(|d| {
                    (d.generation == wake.generation() && now < d.due).then_some(d.due)
                });
            if let Some(due) = skip {
                let until = deadline.min(due).min(now + IDLE_RECHECK);
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
                // The script runs next (the hint is gone), also at the deadline: a fetch never
                // returns empty without having looked.
                continue;
            }
            let generation = wake.generation();
            let (got, next) = once(k.clone()).await?;
            let now = Instant::now();
            if !got.is_empty() {
                // `next` with deliveries: the script emptied the ready set (fetch_reply).
                if let Some(next) = next {
                    self.drained.lock().insert(
                        queue.clone(),
                        Drained {
                            generation,
                            due: now + next,
                        },
                    );
                }
                return Ok(got);
            }
            if now >= deadline {
                return Ok(got);
            }
            let mut until = deadline.min(now + IDLE_RECHECK);
            if let Some(next) = next {
                until = until.min(now + next);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

/// What a fetch that emptied a queue's ready set learnt: the wake-up count when its script was
/// sent, and when the next delayed or leased message is due (an hour when none is).
struct Drained {
    generation: u64,
    due: Instant,
}

/// Decodes a fetch script's reply: the deliveries, and how long until something is due when
/// nothing was delivered, or (with deliveries) when the fetch emptied the ready set (`None`:
/// it may hold more).
pub(crate) fn fetch_reply(
    queue: &QueueName,
    reply: Vec<Value>,
) -> Result<(Vec<Delivery>, Option<Duration>)> {
    let mut it = reply.into_iter();
    let short = || Error::permanent(BACKEND, "fetch script returned a short reply", None);
    let _now = int(it.next().ok_or_else(short)?)?;
    let lease_until = ms_to_utc(int(it.next().ok_or_else(short)?)?);
    let wait_ms = int(it.next().ok_or_else(short)?)?;
    let mut out = Vec::new();
    while let Some(header) = it.next() {
        let receipt = text(header)?;
        let payload = bulk(it.next().ok_or_else(short)?)?;
        let (id, delivery_count, priority) = parse_receipt(&receipt)?;
        out.push(Delivery {
            queue: queue.clone(),
            message_id: id.to_string(),
            payload,
            priority,
            delivery_count,
            receipt,
            lease_until,
        });
    }
    let next = (wait_ms >= 0).then(|| Duration::from_millis(wait_ms as u64));
    Ok((out, next))
}

#[async_trait]
impl Bus for RedisBus {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        let channel = keys::events(self.conn.prefix(), topic);
        let mut c = self.conn.manager();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut c)
            .await
            .map_err(|e| self.conn.error("PUBLISH", e))?;
        Ok(())
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        let channel = keys::events(self.conn.prefix(), topic);
        self.pubsub().await?.subscribe(channel).await
    }

    async fn enqueue(&self, queue: &QueueName, message: OutgoingMessage) -> Result<String> {
        let k = self.keys(queue);
        let mut ids = self
            .enqueue_batch(&k, std::slice::from_ref(&message))
            .await?;
        ids.pop()
            .ok_or_else(|| Error::permanent(BACKEND, "enqueue script returned no id", None))
    }

    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        let k = self.keys(queue);
        let mut ids = Vec::with_capacity(messages.len());
        let mut start = 0;
        while start < messages.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < messages.len()
                && end - start < ENQUEUE_BATCH_MAX
                && (end == start || bytes + messages[end].payload.len() <= ENQUEUE_BATCH_BYTES)
            {
                bytes += messages[end].payload.len();
                end += 1;
            }
            ids.extend(self.enqueue_batch(&k, &messages[start..end]).await?);
            start = end;
        }
        Ok(ids)
    }

    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>> {
        self.fetch_waiting(queue, options.max, options.wait, |k| {
            self.fetch_once(queue, k, options.max, options.lease)
        })
        .await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let (id, _, _) = parse_receipt(&delivery.receipt)?;
        let k = self.keys(&delivery.queue);
        let mut inv = scripts::ACK.prepare();
        inv.key(&k.ready)
            .key(&k.inflight)
            .key(&k.bodies)
            .arg(&delivery.receipt);
        let done: i64 = self.conn.eval("ack", &inv).await?;
        if done == 0 {
            tracing::debug!(queue = %delivery.queue, message_id = id, "ack of a delivery that was already redelivered or settled");
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let (id, _, _) = parse_receipt(&delivery.receipt)?;
        let k = self.keys(&delivery.queue);
        let mut inv = scripts::NACK.prepare();
        inv.key(&k.ready)
            .key(&k.delayed)
            .key(&k.inflight)
            .key(&k.seq)
            .arg(&delivery.receipt)
            .arg(millis(delay))
            .arg(&k.wake);
        let done: i64 = self.conn.eval("nack", &inv).await?;
        if done == 0 {
            tracing::debug!(queue = %delivery.queue, message_id = id, "nack of a delivery that was already redelivered or settled");
        }
        Ok(())
    }

    async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<DateTime<Utc>> {
        parse_receipt(&delivery.receipt)?;
        let k = self.keys(&delivery.queue);
        let mut inv = scripts::EXTEND.prepare();
        inv.key(&k.inflight)
            .arg(&delivery.receipt)
            .arg(millis(lease).max(1));
        let until: i64 = self.conn.eval("extend", &inv).await?;
        if until < 0 {
            return Err(Error::permanent(
                BACKEND,
                format!(
                    "lease on message {} of queue {} already ended; it may have been redelivered",
                    delivery.message_id, delivery.queue
                ),
                None,
            ));
        }
        Ok(ms_to_utc(until))
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let (id, _, _) = parse_receipt(&delivery.receipt)?;
        let k = self.keys(&delivery.queue);
        let mut inv = scripts::DEAD_LETTER.prepare();
        inv.key(&k.ready)
            .key(&k.inflight)
            .key(&k.dead)
            .key(&k.bodies)
            .arg(&delivery.receipt)
            .arg(reason)
            .arg(DEAD_LETTERS_KEPT);
        let done: i64 = self.conn.eval("dead_letter", &inv).await?;
        if done == 1 {
            tracing::warn!(queue = %delivery.queue, message_id = id, reason, "message dead-lettered");
        } else {
            tracing::debug!(queue = %delivery.queue, message_id = id, "dead_letter of a delivery that was already redelivered or settled");
        }
        Ok(())
    }

    async fn dead_letters(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // No more are kept; and a larger number would reach the script as a float (Lua's
        // numbers are doubles) that LRANGE refuses.
        if limit > DEAD_LETTERS_KEPT {
            return Err(Error::invalid(
                "limit",
                format!(
                    "a queue keeps at most {DEAD_LETTERS_KEPT} dead letters; ask for 1 to {DEAD_LETTERS_KEPT}, got {limit}"
                ),
            ));
        }
        let k = self.keys(queue);
        let mut inv = scripts::DEAD_LETTERS.prepare();
        inv.key(&k.dead).key(&k.bodies).arg(limit);
        let reply: Vec<Value> = self.conn.eval("dead_letters", &inv).await?;
        let mut out = Vec::with_capacity(reply.len() / 6);
        let mut it = reply.into_iter();
        let short =
            || Error::permanent(BACKEND, "dead_letters script returned a short reply", None);
        while let Some(id) = it.next() {
            let message_id = text(id)?;
            let payload = bulk(it.next().ok_or_else(short)?)?;
            let _priority = it.next().ok_or_else(short)?;
            let delivery_count = u32::try_from(int(it.next().ok_or_else(short)?)?).unwrap_or(0);
            let reason = text(it.next().ok_or_else(short)?)?;
            let dead_at = ms_to_utc(int(it.next().ok_or_else(short)?)?);
            out.push(DeadLetter {
                queue: queue.clone(),
                message_id,
                payload,
                reason,
                delivery_count,
                dead_at,
            });
        }
        Ok(out)
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let k = self.keys(queue);
        let mut inv = scripts::STATS.prepare();
        inv.key(&k.ready)
            .key(&k.delayed)
            .key(&k.inflight)
            .key(&k.seq)
            .key(&k.dead)
            .key(&k.bodies);
        let (waiting, in_flight, dead): (u64, u64, u64) = self.conn.eval("stats", &inv).await?;
        Ok(QueueStats {
            waiting,
            in_flight,
            dead,
        })
    }

    fn max_deliveries(&self) -> u32 {
        self.max_deliveries
    }

    // The operator's controls: backends/redis/control.rs.
    async fn delayed(&self, queue: &QueueName) -> Result<Option<u64>> {
        super::control::delayed(&self.conn, &self.keys(queue)).await
    }
    async fn remove_dead_letters(&self, queue: &QueueName, ids: &[String]) -> Result<Vec<String>> {
        super::control::remove_dead_letters(&self.conn, &self.keys(queue), ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_parse_and_reject_garbage() {
        assert_eq!(
            parse_receipt("42:3:7:1234").unwrap(),
            ("42", 3, Priority::new(7).unwrap())
        );
        for bad in [
            "",
            "42",
            "42:3",
            "42:3:7",
            "42:3:7:1:2",
            "x:3:7:1",
            "42:x:7:1",
            "42:3:7:",
            ":3:7:1",
            "42:3:7:123456789012345678901",
        ] {
            assert!(parse_receipt(bad).is_err(), "{bad}");
        }
        // Numbers out of range (written by hand) are read as the nearest value.
        assert_eq!(
            parse_receipt("42:3:11:1").unwrap().2,
            Priority::new(10).unwrap()
        );
        assert_eq!(
            parse_receipt("42:3:0:1").unwrap().2,
            Priority::new(1).unwrap()
        );
        assert_eq!(parse_receipt("42:99999999999:7:1").unwrap().1, u32::MAX);
    }
}
