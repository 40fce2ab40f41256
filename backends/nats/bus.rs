//! [`NatsBus`]: events over core NATS, work queues over JetStream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::{join_all, try_join_all};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::blob::{load_payload, store_payload, BlobRef, Blobs, BLOB_HEADER};
use super::errors::{boxed_err, nats_err};
use super::leases::LeaseKeeper;
use super::listeners::{is_probe, Listeners};
use super::queue::{
    header, instant_at_unix_ms, Epitaph, Puller, QueueHandle, DEAD_AT_HEADER, DELAYED,
    DELIVERIES_HEADER, DUE_HEADER, ID_HEADER, LEVELS, PRIORITY_HEADER, REASON_HEADER, TIMER_SLACK,
};
use super::registry::PIPELINE;
use super::{Shared, BACKEND};
use crate::bus::{
    Bus, DeadLetter, Delivery, FetchOptions, OutgoingMessage, QueueStats, Subscription,
};
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName};
use crate::wire::EVENTS_TOPIC;

/// Events buffered per subscriber before it starts missing them.
const SUBSCRIBER_BUFFER: usize = 65_536;
/// How long one JetStream pull may take before it counts as a connection problem.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);
/// Delayed messages moved per round.
const DELAYED_BATCH: usize = 256;
/// How long after being told of a new message a level of a replicated stream is asked again
/// when its consumer answers with nothing (see `fetch`).
const VISIBILITY_WAIT: Duration = Duration::from_millis(100);
/// Dead-letter sequences read at once by `dead_letters`.
const DEAD_READ_WINDOW: usize = 256;
/// How long [`server_has_processed`] waits for its own message to come back.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns once the server has processed everything `client` sent before the call.
///
/// `Client::flush` only writes the client's buffer to the socket; a subscription is in force
/// once the server has read its `SUB`, and a message another connection publishes before that
/// is not delivered to it. The server handles one connection's operations in order, so a
/// message this client publishes to a fresh subject of its own (`echo`) and receives back
/// proves every earlier operation (a `SUB`, a hello) done.
///
/// When the echo does not come back in time (an account without permission on `echo`, or the
/// connection down), this logs a warning and returns: the subscription is then in force as soon
/// as the server reads it, and async-nats renews it after a reconnect.
pub(crate) async fn server_has_processed(client: &async_nats::Client, echo: String) -> Result<()> {
    let mut sub = client
        .subscribe(echo.clone())
        .await
        .map_err(|e| nats_err("cannot subscribe", e))?;
    client
        .publish(echo.clone(), Vec::new().into())
        .await
        .map_err(|e| nats_err("cannot subscribe", e))?;
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, sub.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::temporary(
            BACKEND,
            "cannot subscribe: the connection closed before the server confirmed the subscription",
            None,
        )),
        Err(_) => {
            tracing::warn!(
                subject = %echo,
                "the server did not echo a message within {} s (no permission on this subject, \
                 or the connection is down); an event published elsewhere right now may miss \
                 the new subscription",
                ROUND_TRIP_TIMEOUT.as_secs()
            );
            Ok(())
        }
    }
}

/// The NATS bus. Cheap to share; queues' streams and consumers are created on first use and
/// cached.
pub struct NatsBus {
    shared: Shared,
    blobs: Arc<Blobs>,
    queues: Mutex<HashMap<QueueName, Arc<QueueHandle>>>,
    /// The leases of the deliveries this process holds.
    leases: LeaseKeeper,
    max_deliveries: u32,
    /// Numbers the messages this bus enqueues (their ids are the connection's origin and this).
    next_id: std::sync::atomic::AtomicU64,
    /// The subject of the engine's `events` topic, made once.
    events_subject: String,
    /// Who listens to it.
    listeners: Arc<Listeners>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("names", &self.shared.names)
            .field("queues", &self.queues.lock().len())
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

/// A message on its way to the dead letters.
struct Grave<'a> {
    /// Its ack subject (acked once the dead letter is stored).
    reply: &'a str,
    /// Its headers (a blob reference is carried over).
    headers: Option<&'a HeaderMap>,
    body: Vec<u8>,
    message_id: &'a str,
    priority: Priority,
    deliveries: u32,
    reason: &'a str,
}

/// What a receipt names: the ack subject and the blob to delete after the ack, if any.
struct Receipt<'a> {
    reply: &'a str,
    blob: Option<BlobRef>,
}

fn parse_receipt(receipt: &str) -> Result<Receipt<'_>> {
    let (reply, blob) = match receipt.split_once('#') {
        Some((r, b)) => (r, Some(BlobRef::parse(b)?)),
        None => (receipt, None),
    };
    if !reply.starts_with("$JS.ACK.") {
        return Err(Error::invalid(
            "receipt",
            format!("{receipt:?} is not a NATS bus receipt"),
        ));
    }
    Ok(Receipt { reply, blob })
}

fn to_utc(at: Instant) -> DateTime<Utc> {
    let delta = at.saturating_duration_since(Instant::now());
    crate::clock::after(Utc::now(), delta)
}

impl NatsBus {
    pub(crate) fn new(shared: Shared, max_deliveries: u32) -> Self {
        NatsBus {
            blobs: Blobs::new(shared.clone()),
            leases: LeaseKeeper::start(shared.client.clone()),
            queues: Mutex::new(HashMap::new()),
            max_deliveries: max_deliveries.max(1),
            next_id: std::sync::atomic::AtomicU64::new(0),
            events_subject: shared.names.event_subject(EVENTS_TOPIC),
            listeners: Listeners::new(
                shared.client.clone(),
                shared.names.event_subject(EVENTS_TOPIC),
                shared.names.listener_subject(EVENTS_TOPIC),
            ),
            shared,
        }
    }

    fn queue(&self, name: &QueueName) -> Arc<QueueHandle> {
        self.queues
            .lock()
            .entry(name.clone())
            .or_insert_with(|| QueueHandle::new(self.shared.clone(), name.clone()))
            .clone()
    }

    /// Forgets a queue's cached handles (after its stream vanished under us).
    fn forget(&self, q: &Arc<QueueHandle>) {
        let mut queues = self.queues.lock();
        if queues.get(&q.name).is_some_and(|h| Arc::ptr_eq(h, q)) {
            queues.remove(&q.name);
        }
    }

    /// Builds the publish of one message: subject, headers and body (payload stored as a blob
    /// when it is too large for one message).
    /// The level is `Ok(level)`, or `Err(due in Unix ms)` for a delayed message.
    async fn prepare(
        &self,
        q: &QueueHandle,
        m: OutgoingMessage,
    ) -> Result<(std::result::Result<usize, i64>, String, Publish, String)> {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}{n:016x}", self.shared.origin);
        let (body, blob) = store_payload(&self.blobs, m.payload).await?;
        // `Nats-Msg-Id` too: a batch sent again after a lost answer is not stored twice.
        let mut publish = Publish::build()
            .payload(body.into())
            .message_id(id.as_str())
            .header(ID_HEADER, id.as_str());
        if let Some(b) = blob {
            publish = publish.header(BLOB_HEADER, b.header_value().as_str());
        }
        if m.delay.is_zero() {
            let level = m.priority.index();
            return Ok((Ok(level), q.subject(level), publish, id));
        }
        let due = crate::clock::after(Utc::now(), m.delay).timestamp_millis();
        publish = publish
            .header(DUE_HEADER, due.to_string().as_str())
            .header(PRIORITY_HEADER, m.priority.get().to_string().as_str());
        Ok((Err(due), q.subject(DELAYED), publish, id))
    }

    /// Publishes every message with all acks in flight at once.
    async fn publish_all(
        &self,
        q: &Arc<QueueHandle>,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        q.stream().await?;
        let mut prepared = Vec::with_capacity(messages.len());
        for m in messages {
            prepared.push(self.prepare(q, m).await?);
        }
        let mut ids = Vec::with_capacity(prepared.len());
        let mut levels = 0u16;
        let mut due: Vec<i64> = Vec::new();
        for (level, _, _, id) in &prepared {
            match level {
                Ok(l) => levels |= 1 << l,
                Err(at) => due.push(*at),
            }
            ids.push(id.clone());
        }
        // A batch whose answers did not all come (a stream leader lost, a node restarting) is
        // sent again whole within the retry budget: the messages stored already are answered
        // as duplicates of their `Nats-Msg-Id`.
        let lost_stream = std::sync::atomic::AtomicBool::new(false);
        super::retry::within_budget("enqueue", || async {
            if lost_stream.swap(false, std::sync::atomic::Ordering::Relaxed) {
                // No stream answered: opened again (created if it was deleted meanwhile; during
                // an election the lookup fails and the whole attempt is retried).
                self.queue(&q.name).stream().await?;
            }
            for chunk in prepared.chunks(PIPELINE) {
                // At most PIPELINE acks outstanding: the JetStream context allows 5,000 in all.
                let mut acks = Vec::with_capacity(chunk.len());
                for (_, subject, publish, _) in chunk {
                    let ack = self
                        .shared
                        .js
                        .send_publish(subject.clone(), publish.clone())
                        .await
                        .map_err(|e| nats_err("cannot enqueue", e))?;
                    acks.push(ack);
                }
                let results = join_all(acks.into_iter().map(|a| async move { a.await })).await;
                for r in results {
                    if let Err(e) = r {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            self.forget(q);
                            lost_stream.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        return Err(nats_err(&format!("cannot enqueue on queue {}", q.name), e));
                    }
                }
            }
            Ok(())
        })
        .await?;
        // This process's fetchers learn at once, other processes through one core-NATS
        // wake-up per level (and per due time) of the batch.
        q.announce(levels, &due).await;
        Ok(ids)
    }

    /// Moves due delayed messages to their level; gives the others back until they are due.
    /// Returns how many messages the pull returned.
    async fn promote_delayed(&self, q: &Arc<QueueHandle>, consumer: &Puller) -> Result<usize> {
        let msgs = consumer.pull(DELAYED_BATCH, PULL_TIMEOUT).await?;
        let n = msgs.len();
        let now_ms = Utc::now().timestamp_millis();
        let mut moving = Vec::new();
        for m in msgs {
            let headers = m.headers.as_ref();
            let due = header(headers, DUE_HEADER).and_then(|v| v.parse::<i64>().ok());
            match due {
                Some(due) if due > now_ms => {
                    let wait = Duration::from_millis((due - now_ms) as u64);
                    m.ack_with(jetstream::AckKind::Nak(Some(wait)))
                        .await
                        .map_err(|e| boxed_err("cannot postpone a delayed message", e))?;
                    q.wake
                        .lock()
                        .add_timer(instant_at_unix_ms(due) + TIMER_SLACK, DELAYED);
                }
                _ => moving.push(m),
            }
        }
        if moving.is_empty() {
            return Ok(n);
        }
        let mut acks = Vec::with_capacity(moving.len());
        let mut moved = 0u16;
        for m in &moving {
            let headers = m.headers.as_ref();
            let level = header(headers, PRIORITY_HEADER)
                .and_then(|p| p.parse::<i64>().ok())
                .and_then(|p| Priority::new(p).ok())
                .unwrap_or_default()
                .index();
            moved |= 1 << level;
            let seq = m
                .info()
                .map_err(|e| boxed_err("malformed ack subject", e))?
                .stream_sequence;
            // A mover that dies between the publish and the ack leaves the delayed copy to be
            // moved again: the duplicate window drops the second publish. Keyed by the stored
            // copy's sequence, not by its `Orch-Id`, which a message published by another
            // program may lack or share with others (each would then be dropped as a
            // "duplicate" of the first).
            let mut publish = Publish::build()
                .payload(m.payload.clone())
                .message_id(format!("mv-{seq}"));
            if let Some(id) = header(headers, ID_HEADER).filter(|id| !id.is_empty()) {
                publish = publish.header(ID_HEADER, id);
            }
            if let Some(b) = header(headers, BLOB_HEADER) {
                publish = publish.header(BLOB_HEADER, b);
            }
            acks.push(
                self.shared
                    .js
                    .send_publish(q.subject(level), publish)
                    .await
                    .map_err(|e| nats_err("cannot move a delayed message", e))?,
            );
        }
        try_join_all(acks.into_iter().map(|a| async move {
            a.await
                .map_err(|e| nats_err("cannot move a delayed message", e))
        }))
        .await?;
        q.announce(moved, &[]).await;
        try_join_all(moving.iter().map(|m| async move {
            m.double_ack()
                .await
                .map_err(|e| boxed_err("cannot ack a moved delayed message", e))
        }))
        .await?;
        Ok(n)
    }

    /// Moves a delivered message to the queue's dead letters, then acks it.
    async fn bury(&self, q: &QueueHandle, grave: Grave<'_>) -> Result<()> {
        let Grave {
            reply,
            headers,
            body,
            message_id,
            priority,
            deliveries,
            reason,
        } = grave;
        q.store_dead_letter(Epitaph {
            headers,
            body,
            message_id,
            priority,
            deliveries,
            reason,
        })
        .await?;
        self.confirm(
            reply,
            jetstream::AckKind::Ack,
            "cannot ack a dead-lettered message",
        )
        .await
    }

    /// Sends an ack of `kind` to `reply` and waits for the server to confirm it.
    async fn confirm(&self, reply: &str, kind: jetstream::AckKind, what: &str) -> Result<()> {
        self.shared
            .client
            .request(reply.to_string(), kind.into())
            .await
            .map_err(|e| nats_err(what, e))?;
        Ok(())
    }

    /// Turns pulled messages into deliveries, dead-lettering those delivered too often.
    async fn deliver(
        &self,
        q: &Arc<QueueHandle>,
        level: usize,
        msgs: Vec<jetstream::Message>,
        sent_at: Instant,
        lease: Duration,
        out: &mut Vec<Delivery>,
    ) -> Result<()> {
        let priority = Priority::new(level as i64 + 1)?;
        for m in msgs {
            let reply = m.reply.as_ref().map(|r| r.to_string()).ok_or_else(|| {
                Error::permanent(BACKEND, "pulled message has no ack subject", None)
            })?;
            let (delivered, seq) = {
                let info = m
                    .info()
                    .map_err(|e| boxed_err("malformed ack subject", e))?;
                (info.delivered.max(1) as u32, info.stream_sequence)
            };
            let headers = m.headers.as_ref();
            let message_id = header(headers, ID_HEADER)
                .map(str::to_string)
                .unwrap_or_else(|| seq.to_string());
            // Dead-lettered instead of delivered: a message delivered too often, or one whose
            // blob header is malformed or names chunks that are not there (another program's
            // message, or its chunks purged), which would otherwise fail every fetch of the
            // queue until its deliveries ran out. (reason, deliveries to record)
            let loaded = if delivered > self.max_deliveries {
                Err((
                    format!(
                        "exceeded the maximum of {} deliveries without an ack",
                        self.max_deliveries
                    ),
                    delivered - 1,
                ))
            } else {
                let read = match BlobRef::from_headers(headers) {
                    Ok(blob) => load_payload(&self.blobs, headers, &m.payload)
                        .await
                        .map(|payload| (blob, payload)),
                    Err(e) => Err(e),
                };
                match read {
                    Ok(read) => Ok(read),
                    Err(e) if !e.is_temporary() => {
                        Err((format!("malformed message: {e}"), delivered))
                    }
                    Err(e) => return Err(e),
                }
            };
            let (blob, payload) = match loaded {
                Ok(loaded) => loaded,
                Err((reason, deliveries)) => {
                    let grave = Grave {
                        reply: &reply,
                        headers,
                        body: m.payload.to_vec(),
                        message_id: &message_id,
                        priority,
                        deliveries,
                        reason: &reason,
                    };
                    self.bury(q, grave).await?;
                    continue;
                }
            };
            let receipt = match &blob {
                Some(b) => format!("{reply}#{}", b.header_value()),
                None => reply.clone(),
            };
            let lease_until = sent_at + crate::clock::capped(lease);
            self.leases.hold(
                &receipt,
                reply,
                sent_at,
                lease_until,
                Arc::downgrade(q),
                level,
            );
            out.push(Delivery {
                queue: q.name.clone(),
                message_id,
                payload,
                priority,
                delivery_count: delivered,
                receipt,
                lease_until: to_utc(lease_until),
            });
        }
        Ok(())
    }

    /// One pass over the levels that may have ready messages, most urgent first.
    async fn fetch_round(
        &self,
        q: &Arc<QueueHandle>,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>> {
        let consumers = q.consumers().await?;
        let (mask, gens) = q.wake.lock().poll(Instant::now());
        if mask & (1 << DELAYED) != 0 {
            let n = self.promote_delayed(q, &consumers.delayed).await?;
            if n < DELAYED_BATCH {
                q.wake.lock().clear_if(DELAYED, gens[DELAYED]);
            }
        }
        let mut out = Vec::new();
        if let Err(e) = self.fetch_levels(q, consumers, max, lease, &mut out).await {
            if out.is_empty() {
                return Err(e);
            }
            // What was delivered before the failure is leased to this caller: hand it over
            // rather than leave it to wait for its lease to end.
            tracing::debug!(error = %e, delivered = out.len(), "a pull failed after others delivered");
        }
        Ok(out)
    }

    /// The levels' pulls of [`NatsBus::fetch_round`], most urgent first, into `out`.
    async fn fetch_levels(
        &self,
        q: &Arc<QueueHandle>,
        consumers: &super::queue::Consumers,
        max: usize,
        lease: Duration,
        out: &mut Vec<Delivery>,
    ) -> Result<()> {
        for level in 0..LEVELS {
            if out.len() >= max {
                break;
            }
            // Re-read: the delayed mover or a wake-up may have set a bit meanwhile.
            let (mask, gens) = q.wake.lock().poll(Instant::now());
            if mask & (1 << level) == 0 {
                continue;
            }
            while out.len() < max {
                let want = max - out.len();
                let sent_at = Instant::now();
                let mut msgs = consumers.levels[level].pull(want, PULL_TIMEOUT).await?;
                // A replicated stream's consumer sees a message a moment after its enqueue
                // was confirmed: a level just told of one is asked again for a short while
                // before the lower levels are served, or a lower-priority message would go
                // first (strict priority).
                while msgs.is_empty()
                    && self.shared.replicas > 1
                    && q.wake
                        .lock()
                        .told_within(level, Instant::now(), VISIBILITY_WAIT)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    msgs = consumers.levels[level].pull(want, PULL_TIMEOUT).await?;
                }
                let got = msgs.len();
                self.deliver(q, level, msgs, sent_at, lease, out).await?;
                if got < want {
                    q.wake.lock().clear_if(level, gens[level]);
                    break;
                }
            }
        }
        Ok(())
    }

    fn lease_ended(message_id: &str) -> Error {
        Error::permanent(
            BACKEND,
            format!("lease on message {message_id} already ended; it may have been redelivered"),
            None,
        )
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// For the events topic, whether a subscriber is known or a recent probe found one (see
    /// `listeners.rs`); true for any other topic.
    fn may_have_subscribers(&self, topic: &str) -> bool {
        topic != EVENTS_TOPIC || self.listeners.any()
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        let subject = if topic == EVENTS_TOPIC {
            self.events_subject.clone()
        } else {
            self.shared.names.event_subject(topic)
        };
        self.shared
            .client
            .publish(subject, payload.to_vec().into())
            .await
            .map_err(|e| nats_err("cannot publish an event", e))
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        let subject = self.shared.names.event_subject(topic);
        let mut sub = self
            .shared
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| nats_err("cannot subscribe", e))?;
        // Counted by this process's publishers at once, announced to the others.
        let listening = if self.listeners.covers(&subject) {
            Some(
                self.listeners
                    .subscribed()
                    .await
                    .map_err(|e| nats_err("cannot subscribe", e))?,
            )
        } else {
            None
        };
        // Make sure the server has the interest (and the hello) before returning, so events
        // published after this call, from any connection, are delivered.
        server_has_processed(&self.shared.client, self.shared.names.echo_subject()).await?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let client = self.shared.client.clone();
        tokio::spawn(async move {
            let _listening = listening;
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    msg = sub.next() => match msg {
                        Some(m) if is_probe(&m) => {
                            if let Some(reply) = m.reply {
                                let _ = client.publish(reply, Vec::new().into()).await;
                            }
                        }
                        Some(m) => match tx.try_send(m.payload.to_vec()) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                tracing::warn!(subject = %subject, "slow subscriber missed an event");
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        },
                        None => break,
                    },
                }
            }
            let _ = sub.unsubscribe().await;
        });
        Ok(Subscription::new(rx))
    }

    async fn enqueue(&self, queue: &QueueName, message: OutgoingMessage) -> Result<String> {
        let q = self.queue(queue);
        let mut ids = self.publish_all(&q, vec![message]).await?;
        ids.pop()
            .ok_or_else(|| Error::permanent(BACKEND, "enqueue returned no id", None))
    }

    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let q = self.queue(queue);
        self.publish_all(&q, messages).await
    }

    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>> {
        if options.max == 0 {
            return Err(Error::invalid("fetch max", "must be at least 1"));
        }
        if options.lease.is_zero() {
            return Err(Error::invalid("fetch lease", "must be greater than zero"));
        }
        let q = self.queue(queue);
        let deadline = Instant::now() + crate::clock::capped(options.wait);
        // A pull answered 503 or not at all (the consumer has no leader yet: just created on
        // a replicated stream, or its node restarting) or a dropped connection is retried
        // within the fetch's wait, never past it: a worker's stop waits for its fetch, and the
        // worker's fetch loop retries failed fetches itself.
        let mut pause = Duration::from_millis(50);
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let max = options.max.min(crate::bus::FETCH_MAX);
            let out = match self.fetch_round(&q, max, options.lease).await {
                Ok(out) => out,
                Err(e) if e.is_temporary() => {
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(queue = %queue, error = %e, "fetch failed for now; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            pause = Duration::from_millis(50);
            let now = Instant::now();
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            let wake = q.wake.lock().next_wake().min(deadline);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let r = parse_receipt(&delivery.receipt)?;
        self.leases.release(&delivery.receipt);
        // Sent without waiting for the server's confirmation: the ack is on the wire in order
        // with everything this connection sends next, and a lost ack only means a redelivery
        // (at-least-once), which the registry's compare-and-set makes harmless. Saves one round
        // trip per task.
        self.shared
            .client
            .publish(r.reply.to_string(), jetstream::AckKind::Ack.into())
            .await
            .map_err(|e| nats_err("cannot ack", e))?;
        if let Some(b) = r.blob {
            self.blobs.delete(&b).await?;
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let r = parse_receipt(&delivery.receipt)?;
        let kind = if delay.is_zero() {
            jetstream::AckKind::Nak(None)
        } else {
            jetstream::AckKind::Nak(Some(delay))
        };
        if !self.leases.release(&delivery.receipt) {
            // The lease already ended (the message was handed back) or was never ours.
            tracing::debug!(message_id = %delivery.message_id, "nack of a lease that already ended");
            return Ok(());
        }
        self.confirm(r.reply, kind, "cannot nack").await?;
        let q = self.queue(&delivery.queue);
        if delay.is_zero() {
            q.wake.lock().mark_bits(1 << delivery.priority.index());
            q.notify.notify_waiters();
        } else {
            q.wake.lock().add_timer(
                Instant::now() + crate::clock::capped(delay) + TIMER_SLACK,
                delivery.priority.index(),
            );
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<DateTime<Utc>> {
        let r = parse_receipt(&delivery.receipt)?;
        if !self.leases.is_held(&delivery.receipt) {
            return Err(Self::lease_ended(&delivery.message_id));
        }
        let sent_at = Instant::now();
        // Restarts the server's AckWait too, and proves the connection works.
        self.confirm(
            r.reply,
            jetstream::AckKind::Progress,
            "cannot extend a lease",
        )
        .await?;
        let until = sent_at + crate::clock::capped(lease);
        if !self.leases.extend(&delivery.receipt, until, sent_at) {
            return Err(Self::lease_ended(&delivery.message_id));
        }
        Ok(to_utc(until))
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let r = parse_receipt(&delivery.receipt)?;
        let q = self.queue(&delivery.queue);
        self.leases.release(&delivery.receipt);
        let mut headers = HeaderMap::new();
        let body = match &r.blob {
            Some(b) => {
                headers.insert(BLOB_HEADER, b.header_value().as_str());
                Vec::new()
            }
            None => delivery.payload.clone(),
        };
        let grave = Grave {
            reply: r.reply,
            headers: Some(&headers),
            body,
            message_id: &delivery.message_id,
            priority: delivery.priority,
            deliveries: delivery.delivery_count,
            reason,
        };
        self.bury(&q, grave).await?;
        Ok(())
    }

    async fn dead_letters(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let name = self.shared.names.dead_stream(queue);
        let mut stream = match self.shared.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if js_not_found(&e.kind()) => return Ok(Vec::new()),
            Err(e) => return Err(nats_err("cannot read dead letters", e)),
        };
        let state = stream
            .info()
            .await
            .map_err(|e| nats_err("cannot read dead letters", e))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        // Newest first, a window of sequences at a time: removed dead letters leave gaps, so
        // the `limit` newest are not always in the last `limit` sequences.
        let first = state.first_sequence.max(1);
        let want = limit.min(usize::try_from(state.messages).unwrap_or(usize::MAX));
        let stream = &stream;
        let mut got = Vec::new();
        let mut hi = state.last_sequence;
        while got.len() < want && hi >= first {
            let lo = hi
                .saturating_sub((want - got.len()).min(DEAD_READ_WINDOW) as u64 - 1)
                .max(first);
            let window = join_all((lo..=hi).rev().map(|seq| async move {
                match stream.direct_get(seq).await {
                    Ok(m) => Ok(Some(m)),
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(nats_err("cannot read a dead letter", e)),
                }
            }))
            .await;
            for m in window {
                if let Some(m) = m? {
                    got.push(m);
                }
            }
            if lo == first {
                break;
            }
            hi = lo - 1;
        }
        got.truncate(want);
        let mut out = Vec::new();
        for m in got {
            let h = Some(&m.headers);
            let mut reason = header(h, REASON_HEADER).unwrap_or_default().to_string();
            // A dead letter whose blob cannot be read (buried for that reason) is listed with
            // its own bytes and why, not allowed to hide every other dead letter.
            let payload = match load_payload(&self.blobs, h, &m.payload).await {
                Ok(p) => p,
                Err(e) if !e.is_temporary() => {
                    if !reason.contains("malformed message") {
                        reason = format!("{reason}; payload unreadable: {e}");
                    }
                    m.payload.to_vec()
                }
                Err(e) => return Err(e),
            };
            out.push(DeadLetter {
                queue: queue.clone(),
                message_id: header(h, ID_HEADER).unwrap_or_default().to_string(),
                payload,
                reason,
                delivery_count: header(h, DELIVERIES_HEADER)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                dead_at: header(h, DEAD_AT_HEADER)
                    .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                    .map_or_else(Utc::now, |t| t.with_timezone(&Utc)),
            });
        }
        Ok(out)
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let names = &self.shared.names;
        let js = &self.shared.js;
        let work = async {
            let mut stream = match js.get_stream(names.work_stream(queue)).await {
                Ok(s) => s,
                Err(e) if js_not_found(&e.kind()) => return Ok((0, 0)),
                Err(e) => return Err(nats_err("cannot read queue stats", e)),
            };
            let info = stream
                .info()
                .await
                .map_err(|e| nats_err("cannot read queue stats", e))?
                .clone();
            let stream = &stream;
            let in_flight: Vec<u64> = try_join_all((1..=LEVELS).map(|l| async move {
                match stream.consumer_info(format!("p{l}")).await {
                    Ok(c) => Ok(c.num_ack_pending as u64),
                    Err(e) if js_not_found(&e.kind()) => Ok(0),
                    Err(e) => Err(nats_err("cannot read queue stats", e)),
                }
            }))
            .await?;
            let in_flight: u64 = in_flight.into_iter().sum();
            Ok((info.state.messages.saturating_sub(in_flight), in_flight))
        };
        let dead = async {
            match js.get_stream(names.dead_stream(queue)).await {
                Ok(mut s) => Ok(s
                    .info()
                    .await
                    .map_err(|e| nats_err("cannot read queue stats", e))?
                    .state
                    .messages),
                Err(e) if js_not_found(&e.kind()) => Ok(0),
                Err(e) => Err(nats_err("cannot read queue stats", e)),
            }
        };
        let (work, dead) = futures::join!(work, dead);
        let (waiting, in_flight) = work?;
        Ok(QueueStats {
            waiting,
            in_flight,
            dead: dead?,
        })
    }

    fn max_deliveries(&self) -> u32 {
        self.max_deliveries
    }

    // The operator's controls: backends/nats/control.rs.
    async fn remove_dead_letters(&self, queue: &QueueName, ids: &[String]) -> Result<Vec<String>> {
        super::control::remove_dead_letters(&self.shared, &self.blobs, queue, ids).await
    }
}

/// True for "stream not found" / "consumer not found" API errors.
pub(crate) fn js_not_found<K: std::fmt::Debug>(kind: &K) -> bool {
    use async_nats::jetstream::ErrorCode;
    format!("{kind:?}") == "NotFound"
        || matches!(
            super::errors::js_code(kind),
            Some(c) if c == ErrorCode::STREAM_NOT_FOUND.0 || c == ErrorCode::CONSUMER_NOT_FOUND.0
        )
}
