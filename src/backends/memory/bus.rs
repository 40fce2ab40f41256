//! In-memory [`Bus`]: per-priority FIFO lanes, delayed messages, leases and dead letters.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::bus::{
    Bus, DeadLetter, Delivery, FetchOptions, OutgoingMessage, QueueStats, Subscription,
};
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName};

const BACKEND: &str = "memory";
/// Events buffered per subscriber before it starts missing them.
const SUBSCRIBER_BUFFER: usize = 65_536;
/// Dead letters kept per queue (the oldest are dropped past this, with a warning).
const DEAD_LETTERS_KEPT: usize = 100_000;

#[derive(Clone)]
struct Message {
    id: u64,
    payload: Arc<[u8]>,
    priority: Priority,
    deliveries: u32,
}

struct Leased {
    message: Message,
    generation: u64,
    lease_until: Instant,
}

#[derive(Default)]
struct QueueState {
    ready: [VecDeque<Message>; 10],
    ready_len: usize,
    delayed: BTreeMap<(Instant, u64), Message>,
    leased: HashMap<u64, Leased>,
    lease_index: BTreeMap<(Instant, u64), u64>,
    dead: VecDeque<DeadLetter>,
}

impl QueueState {
    fn push_ready(&mut self, m: Message) {
        self.ready[m.priority.index()].push_back(m);
        self.ready_len += 1;
    }

    /// Moves due delayed messages and expired leases back to the ready lanes.
    fn promote(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let m = entry.remove();
            self.push_ready(m);
        }
        while let Some(entry) = self.lease_index.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            if let Some(l) = self.leased.remove(&id) {
                tracing::debug!(message_id = id, "lease expired; message is ready again");
                // Redelivered ahead of its lane so the order of a lane is preserved.
                self.ready[l.message.priority.index()].push_front(l.message);
                self.ready_len += 1;
            }
        }
    }

    fn pop_ready(&mut self) -> Option<Message> {
        if self.ready_len == 0 {
            return None;
        }
        for lane in self.ready.iter_mut() {
            if let Some(m) = lane.pop_front() {
                self.ready_len -= 1;
                return Some(m);
            }
        }
        None
    }

    fn next_wake(&self) -> Option<Instant> {
        let d = self.delayed.keys().next().map(|k| k.0);
        let l = self.lease_index.keys().next().map(|k| k.0);
        match (d, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn bury(&mut self, queue: &QueueName, m: Message, reason: String) {
        tracing::warn!(queue = %queue, message_id = m.id, %reason, "message dead-lettered");
        if self.dead.len() >= DEAD_LETTERS_KEPT {
            self.dead.pop_front();
        }
        self.dead.push_back(DeadLetter {
            queue: queue.clone(),
            message_id: m.id.to_string(),
            payload: m.payload.to_vec(),
            reason,
            delivery_count: m.deliveries,
            dead_at: Utc::now(),
        });
    }
}

struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
}

/// The in-memory bus. Cheap to clone via `Arc`; all state lives in this process.
#[derive(Default)]
pub struct MemoryBus {
    queues: Mutex<HashMap<QueueName, Arc<Queue>>>,
    topics: Mutex<HashMap<String, Vec<mpsc::Sender<Vec<u8>>>>>,
    next_id: AtomicU64,
    max_deliveries: u32,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("queues", &self.queues.lock().len())
            .finish_non_exhaustive()
    }
}

impl MemoryBus {
    /// A new, empty bus that dead-letters after `max_deliveries` deliveries.
    pub fn new(max_deliveries: u32) -> Self {
        MemoryBus {
            max_deliveries: max_deliveries.max(1),
            ..Default::default()
        }
    }

    fn queue(&self, name: &QueueName) -> Arc<Queue> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(name) {
            return q.clone();
        }
        let q = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
        });
        queues.insert(name.clone(), q.clone());
        q
    }

    fn to_instant(delay: Duration) -> Instant {
        Instant::now() + crate::clock::capped(delay)
    }

    fn parse_receipt(receipt: &str) -> Result<(u64, u64)> {
        let bad = || {
            Error::invalid(
                "receipt",
                format!("{receipt:?} is not a memory bus receipt"),
            )
        };
        let (id, generation) = receipt.split_once(':').ok_or_else(bad)?;
        Ok((
            id.parse().map_err(|_| bad())?,
            generation.parse().map_err(|_| bad())?,
        ))
    }

    fn insert(&self, q: &Queue, message: OutgoingMessage) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let m = Message {
            id,
            payload: message.payload.into(),
            priority: message.priority,
            deliveries: 0,
        };
        let mut st = q.state.lock();
        if message.delay.is_zero() {
            st.push_ready(m);
        } else {
            st.delayed.insert((Self::to_instant(message.delay), id), m);
        }
        id.to_string()
    }

    /// Removes the lease named by `receipt` if it is still the current one.
    fn take_lease(q: &Queue, receipt: &str) -> Result<Option<Leased>> {
        let (id, generation) = Self::parse_receipt(receipt)?;
        let mut st = q.state.lock();
        match st.leased.get(&id) {
            Some(l) if l.generation == generation => {
                let l = st.leased.remove(&id).expect("present");
                st.lease_index.remove(&(l.lease_until, id));
                Ok(Some(l))
            }
            _ => Ok(None),
        }
    }
}

fn to_utc(at: Instant) -> DateTime<Utc> {
    let now = Instant::now();
    let delta = at.saturating_duration_since(now);
    crate::clock::after(Utc::now(), delta)
}

#[async_trait]
impl Bus for MemoryBus {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        let mut topics = self.topics.lock();
        if let Some(subs) = topics.get_mut(topic) {
            subs.retain(|tx| match tx.try_send(payload.to_vec()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(topic, "slow subscriber missed an event");
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
        Ok(())
    }

    fn may_have_subscribers(&self, topic: &str) -> bool {
        self.topics
            .lock()
            .get(topic)
            .is_some_and(|subs| subs.iter().any(|tx| !tx.is_closed()))
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        self.topics
            .lock()
            .entry(topic.to_string())
            .or_default()
            .push(tx);
        Ok(Subscription::new(rx))
    }

    async fn enqueue(&self, queue: &QueueName, message: OutgoingMessage) -> Result<String> {
        let q = self.queue(queue);
        let id = self.insert(&q, message);
        q.notify.notify_waiters();
        Ok(id)
    }

    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        let q = self.queue(queue);
        let ids = messages.into_iter().map(|m| self.insert(&q, m)).collect();
        q.notify.notify_waiters();
        Ok(ids)
    }

    async fn fetch(&self, queue: &QueueName, options: FetchOptions) -> Result<Vec<Delivery>> {
        if options.max == 0 {
            return Err(Error::invalid("fetch max", "must be at least 1"));
        }
        let q = self.queue(queue);
        let deadline = Instant::now() + crate::clock::capped(options.wait);
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake = {
                let now = Instant::now();
                let mut st = q.state.lock();
                st.promote(now);
                let lease_until = now + crate::clock::capped(options.lease);
                let mut out = Vec::new();
                while out.len() < options.max {
                    let Some(mut m) = st.pop_ready() else { break };
                    if m.deliveries >= self.max_deliveries {
                        let reason = format!(
                            "exceeded the maximum of {} deliveries without an ack",
                            self.max_deliveries
                        );
                        st.bury(queue, m, reason);
                        continue;
                    }
                    m.deliveries += 1;
                    let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
                    out.push(Delivery {
                        queue: queue.clone(),
                        message_id: m.id.to_string(),
                        payload: m.payload.to_vec(),
                        priority: m.priority,
                        delivery_count: m.deliveries,
                        receipt: format!("{}:{}", m.id, generation),
                        lease_until: to_utc(lease_until),
                    });
                    st.lease_index.insert((lease_until, m.id), m.id);
                    st.leased.insert(
                        m.id,
                        Leased {
                            message: m,
                            generation,
                            lease_until,
                        },
                    );
                }
                if !out.is_empty() || now >= deadline {
                    return Ok(out);
                }
                st.next_wake().map_or(deadline, |w| w.min(deadline))
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let q = self.queue(&delivery.queue);
        if Self::take_lease(&q, &delivery.receipt)?.is_none() {
            tracing::debug!(message_id = %delivery.message_id, "ack of a lease that already ended");
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let q = self.queue(&delivery.queue);
        if let Some(l) = Self::take_lease(&q, &delivery.receipt)? {
            let mut st = q.state.lock();
            if delay.is_zero() {
                st.push_ready(l.message);
            } else {
                let id = l.message.id;
                st.delayed.insert((Self::to_instant(delay), id), l.message);
            }
            drop(st);
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<DateTime<Utc>> {
        let q = self.queue(&delivery.queue);
        let (id, generation) = Self::parse_receipt(&delivery.receipt)?;
        let mut st = q.state.lock();
        let until = Instant::now() + crate::clock::capped(lease);
        let old = match st.leased.get_mut(&id) {
            Some(l) if l.generation == generation => std::mem::replace(&mut l.lease_until, until),
            _ => {
                return Err(Error::permanent(
                    BACKEND,
                    format!(
                        "lease on message {} already ended; it may have been redelivered",
                        delivery.message_id
                    ),
                    None,
                ))
            }
        };
        st.lease_index.remove(&(old, id));
        st.lease_index.insert((until, id), id);
        Ok(to_utc(until))
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let q = self.queue(&delivery.queue);
        if let Some(l) = Self::take_lease(&q, &delivery.receipt)? {
            q.state
                .lock()
                .bury(&delivery.queue, l.message, reason.to_string());
        }
        Ok(())
    }

    async fn dead_letters(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadLetter>> {
        let q = self.queue(queue);
        let st = q.state.lock();
        Ok(st.dead.iter().rev().take(limit).cloned().collect())
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let q = self.queue(queue);
        let mut st = q.state.lock();
        st.promote(Instant::now());
        Ok(QueueStats {
            waiting: (st.ready_len + st.delayed.len()) as u64,
            in_flight: st.leased.len() as u64,
            dead: st.dead.len() as u64,
        })
    }

    fn max_deliveries(&self) -> u32 {
        self.max_deliveries
    }

    async fn delayed(&self, queue: &QueueName) -> Result<Option<u64>> {
        let q = self.queue(queue);
        let mut st = q.state.lock();
        st.promote(Instant::now());
        Ok(Some(st.delayed.len() as u64))
    }

    async fn remove_dead_letters(&self, queue: &QueueName, ids: &[String]) -> Result<Vec<String>> {
        let wanted: std::collections::BTreeSet<&str> = ids.iter().map(|i| i.as_str()).collect();
        let q = self.queue(queue);
        let mut st = q.state.lock();
        let mut removed = Vec::new();
        st.dead.retain(|l| {
            let hit = wanted.contains(l.message_id.as_str());
            if hit {
                removed.push(l.message_id.clone());
            }
            !hit
        });
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscriber_hint_follows_live_subscriptions() {
        let bus = MemoryBus::new(3);
        assert!(!bus.may_have_subscribers("events"));
        let mut sub = bus.subscribe("events").await.unwrap();
        assert!(bus.may_have_subscribers("events"));
        bus.publish("events", b"one").await.unwrap();
        assert_eq!(sub.recv().await.as_deref(), Some(&b"one"[..]));
        drop(sub);
        assert!(!bus.may_have_subscribers("events"));
    }
}
