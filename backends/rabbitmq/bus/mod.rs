//! [`RabbitBus`]: durable, prioritised work queues and fan-out events on RabbitMQ.
//!
//! * Work queue `{prefix}q.{queue}`: classic, durable, `x-max-priority` 10 (our priority 1 is
//!   AMQP priority 10). With `queue_type=quorum`, ten quorum queues ("lanes")
//!   `{prefix}q.{queue}.p{n}`, one per priority, since quorum queues have no priorities.
//!   Messages are persistent and published with `mandatory` under publisher confirms, so
//!   `enqueue` returns only once the broker has the message on disk.
//! * Fetch takes exactly the head of the queue: `max` pipelined `basic.get`s on one channel
//!   (one round trip for the batch), which RabbitMQ answers in priority order at that moment.
//!   Quorum: the lanes' ready counts in one round trip, then the gets from the most urgent
//!   lanes that hold messages in another.
//!   Nothing is prefetched, so no less urgent message can wait in this process while a more
//!   urgent one arrives. An empty queue is waited on with a short-lived consumer whose prefetch is
//!   1 (the first message to arrive is, by then, the only ready one), cancelled as soon as it
//!   fires or the wait ends.
//! * Leases are kept by this process ([`LeaseTable`]); an expired lease is handed back by
//!   republishing the message with its delivery count and acking the original. A dead channel or
//!   connection makes the broker requeue what it held.
//! * Delivery counting: header `x-orchestra-deliveries` (deliveries before this copy) plus one,
//!   plus one more when the broker flags the copy as redelivered (a consumer died holding it).
//! * Delays: per-delay TTL queues `{prefix}q.{queue}.delay.{ms}` that dead-letter back into the
//!   work queue through the default exchange; delays are rounded up to two significant digits.
//! * Dead letters: `{prefix}q.{queue}.dead`, reason, count and time in headers.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use parking_lot::Mutex;
use tokio::time::Instant;

mod control;
mod publish;
mod wire;

use self::wire::{
    ack_quietly, collect_gets, get_batch, header_text, header_u64, long, our_priority, release,
    work_properties, Scan, H_DEAD_AT, H_DELIVERIES, H_REASON,
};
use super::events::Events;
use super::leases::{HeldMessage, LeaseEntry, LeaseTable};
use super::link::{
    amqp_error, bounded, is_not_found, short, CachedChannel, Link, BACKEND, ROUND_TRIP_TIMEOUT,
};
use super::names::{Names, QueueType};
use crate::bus::{
    Bus, DeadLetter, Delivery, FetchOptions, OutgoingMessage, QueueStats, Subscription,
};
use crate::error::{Error, Result};
use crate::model::QueueName;

/// Confirm-mode channels that publishes are spread over.
const PUBLISHERS: usize = 4;
/// Channels that fetch (and hold the leased deliveries until they are acked).
const GETTERS: usize = 4;
/// Most dead letters `dead_letters` scans (it reads a queue from its oldest end).
const DEAD_SCAN_MAX: u64 = 10_000;
/// A delay queue lives this long after its last declaration, beyond its TTL.
const DELAY_QUEUE_SPARE: Duration = Duration::from_secs(120);
/// Delay queues are declared again before use when their last declaration is older than this.
const DELAY_REDECLARE: Duration = Duration::from_secs(30);

/// Which queue a message is published to (each knows its own declaration).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Target {
    /// A work queue: the queue and its lane ([`QueueType::lanes`]).
    Work(QueueName, u8),
    /// A delay queue: the queue, the lane it dead-letters into, and its TTL in ms.
    Delay(QueueName, u8, u64),
    Dead(QueueName),
}

/// A message to publish and where.
struct Outgoing<'a> {
    target: Target,
    payload: &'a [u8],
    properties: BasicProperties,
}

#[derive(Default)]
struct Declared {
    generation: u64,
    /// Work and dead-letter queues declared on `generation`.
    queues: HashSet<String>,
    /// Delay queues and when they were last declared (any generation: they are durable).
    delays: HashMap<String, Instant>,
    /// Delay buckets (lane, ms) this process has used, per work queue (counted by `stats`).
    buckets: HashMap<QueueName, BTreeSet<(u8, u64)>>,
}

struct BusInner {
    link: Arc<Link>,
    names: Names,
    queue_type: QueueType,
    max_deliveries: u32,
    instance: String,
    publishers: Vec<CachedChannel>,
    getters: Vec<CachedChannel>,
    topology: CachedChannel,
    round_robin: AtomicUsize,
    consumer_tags: AtomicU64,
    declared: Mutex<Declared>,
    leases: LeaseTable,
    events: Events,
}

/// The RabbitMQ [`Bus`]. See the module documentation and docs/backends/rabbitmq.md.
pub struct RabbitBus {
    inner: Arc<BusInner>,
    reaper: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RabbitBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBus")
            .field("link", &self.inner.link)
            .field("prefix", &self.inner.names.prefix())
            .field("queue_type", &self.inner.queue_type)
            .field("max_deliveries", &self.inner.max_deliveries)
            .finish_non_exhaustive()
    }
}

impl Drop for RabbitBus {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl RabbitBus {
    /// A bus on `link` (connected lazily), dead-lettering after `max_deliveries` deliveries.
    /// Must be called inside a Tokio runtime (it starts the lease reaper).
    pub(crate) fn new(
        link: Arc<Link>,
        names: Names,
        queue_type: QueueType,
        max_deliveries: u32,
    ) -> Result<Self> {
        let inner = Arc::new(BusInner {
            publishers: (0..PUBLISHERS)
                .map(|_| CachedChannel::new(link.clone(), true, None))
                .collect(),
            getters: (0..GETTERS)
                .map(|_| CachedChannel::new(link.clone(), false, Some(1)))
                .collect(),
            topology: CachedChannel::new(link.clone(), false, None),
            events: Events::new(link.clone(), names.events())?,
            link,
            names,
            queue_type,
            max_deliveries: max_deliveries.max(1),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            round_robin: AtomicUsize::new(0),
            consumer_tags: AtomicU64::new(0),
            declared: Mutex::new(Declared::default()),
            leases: LeaseTable::default(),
        });
        let reaper = tokio::spawn(reap_expired_leases(inner.clone()));
        Ok(RabbitBus { inner, reaper })
    }
}

/// Hands back every message whose lease ended without an ack, for as long as the bus lives.
async fn reap_expired_leases(inner: Arc<BusInner>) {
    loop {
        for entry in inner.leases.take_expired(Instant::now()) {
            tracing::debug!(queue = %entry.queue, message_id = %entry.message.message_id, "lease ended without an ack; handing the message back");
            inner.hand_back(entry).await;
        }
        inner.leases.wait_for_expiry(Duration::from_secs(1)).await;
    }
}

fn to_utc(at: Instant) -> DateTime<Utc> {
    let ahead = at.saturating_duration_since(Instant::now());
    crate::clock::after(Utc::now(), ahead)
}

impl BusInner {
    fn receipt(&self, lease: u64) -> String {
        format!("{}:{lease}", self.instance)
    }

    /// The lease id of a receipt issued by this bus; `None` for another bus's receipt (its
    /// lease cannot be acted on from here: it ends by itself).
    fn lease_of(&self, receipt: &str) -> Result<Option<u64>> {
        let bad = || {
            Error::invalid(
                "receipt",
                format!("{receipt:?} is not a RabbitMQ bus receipt"),
            )
        };
        let (instance, id) = receipt.split_once(':').ok_or_else(bad)?;
        let id: u64 = id.parse().map_err(|_| bad())?;
        Ok((instance == self.instance).then_some(id))
    }

    fn take_lease(&self, delivery: &Delivery) -> Result<Option<LeaseEntry>> {
        Ok(match self.lease_of(&delivery.receipt)? {
            Some(id) => self.leases.take(id),
            None => {
                tracing::debug!(message_id = %delivery.message_id, "receipt from another bus instance; its lease ends by itself");
                None
            }
        })
    }

    /// Publishes a copy of a held message (with its delivery count) to `target`, then acks the
    /// original. If publishing fails the entry is returned so the caller can keep the lease.
    async fn move_message(
        &self,
        entry: LeaseEntry,
        target: Target,
    ) -> std::result::Result<(), (LeaseEntry, Error)> {
        let m = &entry.message;
        let properties = match work_properties(&m.message_id, m.priority, m.deliveries) {
            Ok(p) => p,
            Err(e) => return Err((entry, e)),
        };
        let sent = self
            .send(vec![Outgoing {
                target,
                payload: &m.payload,
                properties,
            }])
            .await;
        match sent {
            Ok(()) => {
                ack_quietly(&entry).await;
                Ok(())
            }
            Err(e) => Err((entry, e)),
        }
    }

    /// Moves a held message to its queue's dead letters with `reason`, then acks the original.
    async fn bury(
        &self,
        entry: LeaseEntry,
        reason: &str,
    ) -> std::result::Result<(), (LeaseEntry, Error)> {
        tracing::warn!(queue = %entry.queue, message_id = %entry.message.message_id, %reason, "message dead-lettered");
        let m = &entry.message;
        let mut headers = FieldTable::default();
        headers.insert(H_DELIVERIES.into(), long(u64::from(m.deliveries)));
        headers.insert(H_REASON.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            H_DEAD_AT.into(),
            long(u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)),
        );
        let properties = match short(m.message_id.clone()) {
            Ok(id) => BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id)
                .with_headers(headers),
            Err(e) => return Err((entry, e)),
        };
        let sent = self
            .send(vec![Outgoing {
                target: Target::Dead(entry.queue.clone()),
                payload: &m.payload,
                properties,
            }])
            .await;
        match sent {
            Ok(()) => {
                ack_quietly(&entry).await;
                Ok(())
            }
            Err(e) => Err((entry, e)),
        }
    }

    /// Returns a message whose lease ended: republished with its count, or (if that fails while
    /// the channel lives) requeued by the broker.
    async fn hand_back(&self, entry: LeaseEntry) {
        if !entry.acker.usable() {
            return; // Its channel died: the broker already requeued it.
        }
        let target = self.target_for(&entry.queue, entry.message.priority, Duration::ZERO);
        if let Err((entry, e)) = self.move_message(entry, target).await {
            tracing::warn!(error = %e, message_id = %entry.message.message_id, "cannot republish an expired lease; asking the broker to requeue it");
            let _ = entry
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }

    /// Turns fetched deliveries into leases; buries those past the delivery limit.
    async fn admit(
        &self,
        queue: &QueueName,
        got: Vec<AmqpDelivery>,
        lease: Duration,
    ) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(got.len());
        let deadline = Instant::now() + crate::clock::capped(lease);
        for d in got {
            let props = &d.properties;
            let before = header_u64(props.headers().as_ref(), H_DELIVERIES).unwrap_or(0);
            let deliveries = u32::try_from(before.saturating_add(1 + u64::from(d.redelivered)))
                .unwrap_or(u32::MAX);
            let message_id = props
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|| format!("amqp-{}", uuid::Uuid::new_v4().simple()));
            let entry = LeaseEntry {
                queue: queue.clone(),
                acker: d.acker,
                deadline,
                message: HeldMessage {
                    message_id,
                    payload: d.data,
                    priority: our_priority(*props.priority()),
                    deliveries,
                },
            };
            if deliveries > self.max_deliveries {
                let reason = format!(
                    "exceeded the maximum of {} deliveries without an ack",
                    self.max_deliveries
                );
                if let Err((entry, e)) = self.bury(entry, &reason).await {
                    tracing::warn!(error = %e, "cannot dead-letter a message; the broker will offer it again");
                    let _ = entry
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await;
                }
                continue;
            }
            let m = entry.message.clone();
            let id = self.leases.insert(entry);
            out.push(Delivery {
                queue: queue.clone(),
                message_id: m.message_id,
                payload: m.payload,
                priority: m.priority,
                delivery_count: m.deliveries,
                receipt: self.receipt(id),
                lease_until: to_utc(deadline),
            });
        }
        // Within a batch, most urgent first (stable: FIFO within a priority).
        out.sort_by_key(|d| d.priority);
        out
    }

    /// Waits (up to `deadline`) for the first message to arrive in an empty queue (any of its
    /// lanes), with one consumer per lane whose prefetch is 1, all cancelled before returning.
    /// May return up to one message per lane (those that arrived together).
    async fn wait_for_first(
        &self,
        ch: &Channel,
        lanes: &[ShortString],
        deadline: Instant,
    ) -> Result<Vec<AmqpDelivery>> {
        let mut tags = Vec::with_capacity(lanes.len());
        let mut consumers = Vec::with_capacity(lanes.len());
        let mut failure = None;
        for lane in lanes {
            let tag = short(format!(
                "orchestra-wait-{}-{}",
                self.instance,
                self.consumer_tags.fetch_add(1, Ordering::Relaxed)
            ))?;
            match ch
                .basic_consume(
                    lane.clone(),
                    tag.clone(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
            {
                Ok(c) => {
                    tags.push(tag);
                    consumers.push(c);
                }
                Err(e) => {
                    failure = Some(amqp_error("wait for a message", e));
                    break;
                }
            }
        }
        let mut got = Vec::new();
        if failure.is_none() {
            let mut any = futures::stream::select_all(consumers.iter_mut());
            match tokio::time::timeout_at(deadline, any.next()).await {
                Ok(Some(Ok(d))) => got.push(d),
                Ok(Some(Err(e))) => failure = Some(amqp_error("wait for a message", e)),
                Ok(None) | Err(_) => {}
            }
        }
        for tag in tags {
            if let Err(e) = ch.basic_cancel(tag, BasicCancelOptions::default()).await {
                failure = failure.or(Some(amqp_error("stop waiting for messages", e)));
            }
        }
        // A delivery that raced the cancel is buffered before the stream ends: take it too,
        // or it would stay unacked on the channel with nobody to ack it.
        for consumer in &mut consumers {
            while let Some(Some(next)) = consumer.next().now_or_never() {
                match next {
                    Ok(d) => got.push(d),
                    Err(e) => failure = failure.or(Some(amqp_error("wait for a message", e))),
                }
            }
        }
        if let Some(e) = failure {
            release(got).await;
            return Err(e);
        }
        Ok(got)
    }

    /// Up to `max` of the most urgent ready messages of a queue's `lanes` (most urgent lane
    /// first). One lane (classic): `max` pipelined gets, answered in priority order. Several
    /// (quorum): the lanes' ready counts in one round trip, then, in one more, as many gets
    /// from each lane, most urgent first, as it holds and the batch still has room for.
    async fn get_lanes(
        &self,
        ch: &Channel,
        lanes: &[ShortString],
        max: usize,
    ) -> Result<Vec<AmqpDelivery>> {
        if let [only] = lanes {
            return get_batch(ch, only, max).await;
        }
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let counts = futures::future::join_all(
            lanes
                .iter()
                .map(|name| ch.queue_declare(name.clone(), passive, FieldTable::default())),
        )
        .await;
        let mut plan = Vec::new();
        let mut room = max;
        for (name, count) in lanes.iter().zip(counts) {
            let ready = count
                .map_err(|e| amqp_error(&format!("count the messages of queue {name}"), e))?
                .message_count() as usize;
            let take = ready.min(room);
            if take > 0 {
                plan.push((name, take));
                room -= take;
            }
        }
        let gets = plan.iter().flat_map(|(name, take)| {
            (0..*take).map(|_| ch.basic_get((*name).clone(), BasicGetOptions::default()))
        });
        collect_gets(futures::future::join_all(gets).await).await
    }

    /// The names of a queue's work lanes, most urgent first, declared on this connection.
    async fn lanes(&self, queue: &QueueName) -> Result<Vec<ShortString>> {
        let lanes = self.queue_type.lanes();
        let targets: Vec<Target> = lanes
            .clone()
            .map(|lane| Target::Work(queue.clone(), lane))
            .collect();
        futures::future::try_join_all(targets.iter().map(|t| self.ensure(t, false))).await?;
        lanes
            .map(|lane| short(self.names.work_lane(queue, lane)))
            .collect()
    }

    /// Fetch (see [`Bus::fetch`]): pipelined gets, or a wait for the first message.
    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>> {
        let lanes = self.lanes(queue).await?;
        let deadline = Instant::now() + crate::clock::capped(options.wait);
        let max = options.max.min(crate::bus::FETCH_MAX);
        let mut passed_over = 0u32;
        loop {
            let slot = self.round_robin.fetch_add(1, Ordering::Relaxed) % GETTERS;
            let (ch, _, _) = self.getters[slot].get().await?;
            let got = bounded(
                &ch,
                "get messages",
                ROUND_TRIP_TIMEOUT,
                self.get_lanes(&ch, &lanes, max),
            )
            .await?;
            let fetched_any = !got.is_empty();
            let out = self.admit(queue, got, options.lease).await;
            if !out.is_empty() {
                return Ok(out);
            }
            if fetched_any {
                // Everything fetched was dead-lettered: look again, within the wait. When
                // that keeps happening (a dead-lettering that fails, its message requeued at
                // the head), not in a tight loop.
                let now = Instant::now();
                if now >= deadline {
                    return Ok(Vec::new());
                }
                passed_over += 1;
                if passed_over > 1 {
                    tokio::time::sleep(Duration::from_millis(50).min(deadline - now)).await;
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tracing::trace!(queue = %queue, "queue empty; waiting for the first message");
            // The wait itself ends at `deadline`; the consume and cancel round trips around it
            // are bounded too.
            let waiting = deadline.saturating_duration_since(Instant::now());
            let mut got = bounded(
                &ch,
                "wait for a message",
                waiting + 2 * ROUND_TRIP_TIMEOUT,
                self.wait_for_first(&ch, &lanes, deadline),
            )
            .await?;
            if got.is_empty() {
                return Ok(Vec::new());
            }
            if got.len() > max {
                // Several lanes delivered at once: keep the most urgent, give back the rest.
                got.sort_by_key(|d| our_priority(*d.properties.priority()));
                release(got.split_off(max)).await;
            }
            if max > got.len() {
                let more = bounded(
                    &ch,
                    "get messages",
                    ROUND_TRIP_TIMEOUT,
                    self.get_lanes(&ch, &lanes, max - got.len()),
                );
                match more.await {
                    Ok(more) => got.extend(more),
                    Err(e) => {
                        release(got).await;
                        return Err(e);
                    }
                }
            }
            let out = self.admit(queue, got, options.lease).await;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// The longest delay a message can wait on RabbitMQ: `u32::MAX` ms, about 49.7 days. A longer
/// `enqueue` delay is refused; a longer `nack` delay (a retry's backoff) waits this long.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

#[async_trait]
impl Bus for RabbitBus {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        self.inner.events.publish(topic, payload).await
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        self.inner.events.subscribe(topic).await
    }

    async fn enqueue(&self, queue: &QueueName, message: OutgoingMessage) -> Result<String> {
        let mut ids = self.enqueue_many(queue, vec![message]).await?;
        ids.pop()
            .ok_or_else(|| Error::permanent(BACKEND, "enqueue produced no message id", None))
    }

    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        let ids: Vec<String> = messages
            .iter()
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let mut items = Vec::with_capacity(messages.len());
        for (m, id) in messages.iter().zip(&ids) {
            // A delay queue's TTL is a 32-bit number of milliseconds: a longer delay would be
            // cut short, and the message delivered early.
            if m.delay > MAX_DELAY {
                return Err(Error::invalid(
                    "delay",
                    format!(
                        "at most {} on RabbitMQ (a queue's x-message-ttl is a 32-bit number of milliseconds), got {}",
                        crate::clock::format_duration(MAX_DELAY),
                        crate::clock::format_duration(m.delay)
                    ),
                ));
            }
            items.push(Outgoing {
                target: self.inner.target_for(queue, m.priority, m.delay),
                payload: &m.payload,
                properties: work_properties(id, m.priority, 0)?,
            });
        }
        self.inner.send(items).await?;
        Ok(ids)
    }

    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>> {
        if options.max == 0 {
            return Err(Error::invalid("fetch max", "must be at least 1"));
        }
        let result = self.inner.fetch(queue, options).await;
        if let Err(e) = &result {
            if is_not_found(e) {
                // The queue was deleted under us: declare it again next time.
                for lane in self.inner.queue_type.lanes() {
                    self.inner.forget(&Target::Work(queue.clone(), lane));
                }
            }
        }
        result
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        match self.inner.take_lease(delivery)? {
            Some(entry) => ack_quietly(&entry).await,
            None => {
                tracing::debug!(message_id = %delivery.message_id, "ack of a lease that already ended")
            }
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let Some(entry) = self.inner.take_lease(delivery)? else {
            tracing::debug!(message_id = %delivery.message_id, "nack of a lease that already ended");
            return Ok(());
        };
        if !entry.acker.usable() {
            return Ok(()); // its channel died: the broker requeued it already
        }
        if delay > MAX_DELAY {
            tracing::warn!(message_id = %delivery.message_id, ?delay, "a nack delay longer than RabbitMQ's longest (about 49.7 days) waits that long instead");
        }
        let target = self
            .inner
            .target_for(&delivery.queue, delivery.priority, delay);
        match self.inner.move_message(entry, target).await {
            Ok(()) => Ok(()),
            Err((entry, e)) => {
                self.inner.leases.restore(entry);
                Err(e)
            }
        }
    }

    async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<DateTime<Utc>> {
        let deadline = Instant::now() + crate::clock::capped(lease);
        let extended = match self.inner.lease_of(&delivery.receipt)? {
            Some(id) => self.inner.leases.extend(id, deadline),
            None => false,
        };
        if extended {
            Ok(to_utc(deadline))
        } else {
            Err(Error::permanent(
                BACKEND,
                format!(
                    "lease on message {} already ended; it may have been redelivered",
                    delivery.message_id
                ),
                None,
            ))
        }
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let Some(entry) = self.inner.take_lease(delivery)? else {
            tracing::debug!(message_id = %delivery.message_id, "dead_letter of a lease that already ended");
            return Ok(());
        };
        if !entry.acker.usable() {
            tracing::warn!(message_id = %delivery.message_id, "cannot dead-letter: the connection holding the message was lost and the broker requeued it");
            return Ok(());
        }
        match self.inner.bury(entry, reason).await {
            Ok(()) => Ok(()),
            Err((entry, e)) => {
                self.inner.leases.restore(entry);
                Err(e)
            }
        }
    }

    async fn dead_letters(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let target = Target::Dead(queue.clone());
        inner.ensure(&target, false).await?;
        // A private channel: closing it puts every message read back in its place.
        let session = inner.link.session().await?;
        let ch = session.channel(false).await?;
        inner.declare(&ch, &target).await?;
        let mut scan = Scan::new(short(inner.names.dead(queue))?, DEAD_SCAN_MAX);
        let mut newest: VecDeque<DeadLetter> = VecDeque::with_capacity(limit.min(1024));
        loop {
            let got = scan.next(&ch).await?;
            if got.is_empty() {
                break;
            }
            for d in got {
                let headers = d.properties.headers().as_ref();
                let dead_at = header_u64(headers, H_DEAD_AT)
                    .and_then(|ms| {
                        Utc.timestamp_millis_opt(i64::try_from(ms).unwrap_or(0))
                            .single()
                    })
                    .unwrap_or_else(Utc::now);
                newest.push_back(DeadLetter {
                    queue: queue.clone(),
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    reason: header_text(headers, H_REASON).unwrap_or_default(),
                    delivery_count: u32::try_from(header_u64(headers, H_DELIVERIES).unwrap_or(0))
                        .unwrap_or(u32::MAX),
                    dead_at,
                    payload: d.data,
                });
                if newest.len() > limit {
                    newest.pop_front();
                }
            }
        }
        if let Err(e) = ch.close(200, "dead letters read".into()).await {
            tracing::debug!(error = %e, "closing the dead-letter reading channel");
        }
        Ok(newest.into_iter().rev().collect())
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let inner = &self.inner;
        let buckets: Vec<(u8, u64)> = inner
            .declared
            .lock()
            .buckets
            .get(queue)
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        let (ch, _, _) = inner.topology.get().await?;
        let mut targets = vec![Target::Dead(queue.clone())];
        targets.extend(
            inner
                .queue_type
                .lanes()
                .map(|lane| Target::Work(queue.clone(), lane)),
        );
        targets.extend(
            buckets
                .into_iter()
                .map(|(lane, ms)| Target::Delay(queue.clone(), lane, ms)),
        );
        let counting = async {
            Ok(futures::future::join_all(targets.iter().map(|t| inner.declare(&ch, t))).await)
        };
        let counts = bounded(&ch, "count messages", ROUND_TRIP_TIMEOUT, counting).await?;
        let mut counts = counts.into_iter();
        let dead = counts.next().unwrap_or(Ok(0))?;
        // Ready work (every lane) plus what waits in the delay queues this process used.
        let mut waiting = 0;
        for c in counts {
            waiting += c?;
        }
        Ok(QueueStats {
            waiting,
            in_flight: inner.leases.in_flight(queue),
            dead,
        })
    }

    fn max_deliveries(&self) -> u32 {
        self.inner.max_deliveries
    }

    fn max_delay(&self) -> Option<Duration> {
        Some(MAX_DELAY)
    }

    // The operator's controls: bus/control.rs.
    async fn remove_dead_letters(&self, queue: &QueueName, ids: &[String]) -> Result<Vec<String>> {
        self.remove_dead(queue, ids).await
    }
}
