//! The [`Bus`] trait: fan-out events and durable work queues with competing consumers.
//!
//! Two very different things travel on a bus, and the trait keeps them apart:
//!
//! * **Events** ([`Bus::publish`] / [`Bus::subscribe`]): the lab's pub/sub. Fire-and-forget,
//!   every current subscriber gets every event, nobody gets events published while they were
//!   not subscribed. Used for task state changes, so waiters react without polling.
//! * **Work queues** ([`Bus::enqueue`] / [`Bus::fetch`] / [`Bus::ack`] ...): durable,
//!   at-least-once, each message to one consumer at a time, strictly by priority. A message
//!   published while no worker listens waits for one (the lab lost it).
//!
//! **For backend authors; not a stable API yet.** An application uses these traits through
//! [`Backends`](crate::Backends) and the engine ([`Dispatcher`](crate::Dispatcher),
//! [`Worker`](crate::Worker), [`Monitor`](crate::Monitor)); a backend implements them and checks
//! itself with the conformance suite (feature `testkit`). Their methods may still change
//! between 0.x releases.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::model::{Priority, QueueName, Task};

/// A message to put on a work queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The bytes to deliver (the engine sends `{"task_id": "..."}`).
    pub payload: Vec<u8>,
    /// 1 (most urgent) ..= 10.
    pub priority: Priority,
    /// Deliver no earlier than this long from now (zero: at once).
    pub delay: Duration,
}

impl OutgoingMessage {
    /// A message ready at once.
    pub fn new(payload: impl Into<Vec<u8>>, priority: Priority) -> Self {
        OutgoingMessage {
            payload: payload.into(),
            priority,
            delay: Duration::ZERO,
        }
    }

    /// The same message, delivered after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A message handed to a consumer, leased until it is acked, nacked, dead-lettered or the lease
/// ends (after which it is delivered again, to this consumer or another).
#[derive(Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The queue it came from.
    pub queue: QueueName,
    /// The message's id, stable across redeliveries.
    pub message_id: String,
    /// The bytes enqueued.
    pub payload: Vec<u8>,
    /// Its priority.
    pub priority: Priority,
    /// 1 on first delivery, then +1 for each redelivery (lease expiry or nack).
    pub delivery_count: u32,
    /// Backend-private handle used by ack / nack / extend / dead_letter (a stream entry id, an
    /// ack subject, a channel and delivery tag...). Opaque to the engine.
    pub receipt: String,
    /// When the lease ends unless extended.
    pub lease_until: DateTime<Utc>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("message_id", &self.message_id)
            .field("payload_len", &self.payload.len())
            .field("priority", &self.priority)
            .field("delivery_count", &self.delivery_count)
            .field("lease_until", &self.lease_until)
            .finish()
    }
}

/// How to fetch from a work queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchOptions {
    /// At most this many messages (the caller's free slots: the prefetch). At least 1; a
    /// value over [`FETCH_MAX`] fetches at most that many.
    pub max: usize,
    /// Wait up to this long for the first message when none is ready; return an empty batch
    /// then. Backends may return earlier, never much later.
    pub wait: Duration,
    /// How long the lease on each delivered message lasts.
    pub lease: Duration,
}

/// The most messages one fetch delivers, whatever [`FetchOptions::max`] asks (a caller that
/// wants more fetches again).
pub const FETCH_MAX: usize = 1_000;

/// A message moved to a queue's dead letters, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The original queue.
    pub queue: QueueName,
    /// The message id.
    pub message_id: String,
    /// The original bytes.
    pub payload: Vec<u8>,
    /// Why it was dead-lettered (`malformed message: ...`, `exceeded 10 deliveries`, ...).
    pub reason: String,
    /// How many times it had been delivered.
    pub delivery_count: u32,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// Sizes of a work queue, as far as the backend can tell cheaply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Messages ready or delayed, not leased.
    pub waiting: u64,
    /// Messages leased to a consumer.
    pub in_flight: u64,
    /// Messages in the dead letters.
    pub dead: u64,
}

/// A live subscription to an event topic. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Vec<u8>>,
}

impl Subscription {
    /// Wraps the receiving end that a backend's listener task feeds. The backend stops feeding
    /// (and unsubscribes) when it sees the sender closed.
    pub fn new(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        Subscription { rx }
    }

    /// The next event, or `None` once the bus has closed the subscription for good.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

/// Fan-out events and durable, prioritised work queues.
///
/// Implementations must be cheap to share (`Arc<dyn Bus>`) and safe to call concurrently.
/// Every method returns temporary errors for connection trouble (the engine retries them) and
/// permanent ones for misuse.
#[async_trait]
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// The backend's name (`memory`, `redis`, `nats`, `rabbitmq`).
    fn backend(&self) -> &'static str;

    /// Sends `payload` to every current subscriber of `topic`. At-most-once: a subscriber that
    /// is not connected at that moment misses it. Never blocks on slow subscribers for long
    /// (they may miss events instead).
    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()>;

    /// A cheap hint: false when publishing on `topic` right now certainly reaches nobody, so
    /// the engine may skip encoding the event. Backends that cannot tell cheaply keep the
    /// default, true. Publishing remains at-most-once either way.
    fn may_have_subscribers(&self, _topic: &str) -> bool {
        true
    }

    /// Subscribes to `topic`. Events published after this returns are delivered in publish
    /// order (per publisher). Backends resubscribe by themselves after a reconnect; events
    /// published while disconnected are lost.
    async fn subscribe(&self, topic: &str) -> Result<Subscription>;

    /// Durably adds a message to a work queue. When this returns `Ok`, the message survives a
    /// restart of this process (and of the broker, where the broker persists). The queue is
    /// created on first use.
    async fn enqueue(&self, queue: &QueueName, message: OutgoingMessage) -> Result<String>;

    /// Enqueues several messages; backends batch them into fewer round trips. Returns the
    /// message ids in order. Not atomic: on error, a prefix may have been enqueued.
    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            ids.push(self.enqueue(queue, m).await?);
        }
        Ok(ids)
    }

    /// Leases up to `options.max` ready messages from `queue`, most urgent first: a message of
    /// priority p is never delivered while a ready message of priority < p sits in the queue
    /// (FIFO within one priority). Messages whose delay has not passed are not ready. A message
    /// whose lease ended without an ack is ready again, with `delivery_count` + 1. A message
    /// that would be delivered more than the bus's maximum deliveries goes to the dead letters
    /// instead, with a reason naming the limit.
    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>>;

    /// Removes a delivered message for good. Acking a message whose lease already ended (and
    /// which may have been redelivered) is not an error; it removes the message if the backend
    /// can still identify it.
    async fn ack(&self, delivery: &Delivery) -> Result<()>;

    /// Gives a delivered message back, ready again after `delay`, counting as one delivery.
    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()>;

    /// Extends the lease of a delivered message to `lease` from now, so that a long handler
    /// keeps it. Returns the new end of the lease.
    async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<DateTime<Utc>>;

    /// Moves a delivered message to the queue's dead letters with `reason`.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()>;

    /// The most recent dead letters of `queue`, up to `limit`.
    async fn dead_letters(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Queue sizes.
    async fn stats(&self, queue: &QueueName) -> Result<QueueStats>;

    /// The maximum number of deliveries before a message is dead-lettered.
    fn max_deliveries(&self) -> u32;

    /// How many of `queue`'s waiting messages ([`QueueStats::waiting`]) wait for a delay (a
    /// delayed dispatch, a retry's backoff), when the backend can tell cheaply; `None` when it
    /// cannot (the default).
    async fn delayed(&self, queue: &QueueName) -> Result<Option<u64>> {
        let _ = queue;
        Ok(None)
    }

    /// Deletes the dead letters of `queue` whose message ids are in `ids`, for good; returns
    /// the ids it deleted (an id that is not among the dead letters is left out, so that two
    /// concurrent calls never both report one). Each dead letter goes in one atomic step; the
    /// call as a whole is not atomic (on error, some may be gone). The engine's requeue
    /// enqueues a dead letter's message again *before* deleting it, so a failure in between
    /// leaves a duplicate (which the claim's compare-and-set makes harmless), never a loss.
    /// The default: [`Error::Unsupported`](crate::Error::Unsupported).
    async fn remove_dead_letters(&self, queue: &QueueName, ids: &[String]) -> Result<Vec<String>> {
        let _ = (queue, ids);
        Err(crate::error::Error::Unsupported {
            backend: self.backend(),
            operation: "removing dead letters",
        })
    }

    /// The longest delay [`OutgoingMessage::delay`] this bus keeps exactly (`None`: no limit
    /// below the 100 years every duration is capped at). A longer one is refused at enqueue;
    /// the dispatcher refuses it before it registers the task.
    fn max_delay(&self) -> Option<Duration> {
        None
    }
}

/// Publishes `task`'s new state as a [`TaskEvent`](crate::wire::TaskEvent) on
/// [`EVENTS_TOPIC`](crate::wire::EVENTS_TOPIC). Events are at-most-once by design: a failure is logged, not
/// returned, because the registry (not the event) is the source of truth.
pub(crate) async fn publish_event(bus: &dyn Bus, task: &Task) {
    if !bus.may_have_subscribers(crate::wire::EVENTS_TOPIC) {
        return;
    }
    let s = &task.state;
    let bytes = crate::wire::encode_parts(
        &task.task_id,
        &task.queue,
        s.status,
        s.attempt,
        s.worker_id.as_deref(),
        s.updated_at,
    );
    if let Err(e) = bus.publish(crate::wire::EVENTS_TOPIC, &bytes).await {
        tracing::warn!(task_id = %task.task_id, error = %e, "could not publish a task event");
    }
}
