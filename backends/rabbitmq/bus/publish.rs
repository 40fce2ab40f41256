//! Declaring the bus's queues (once per connection, delay queues again before they could
//! expire) and publishing to them under confirms.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;
use tokio::time::Instant;

use lapin::protocol::AMQPSoftError;

use super::super::link::{
    amqp_error, bounded, is_not_found, short, soft_error, BACKEND, ROUND_TRIP_TIMEOUT,
};
use super::super::names::{delay_bucket_ms, QueueType};
use super::wire::long;
use super::{BusInner, Outgoing, Target, DELAY_QUEUE_SPARE, DELAY_REDECLARE, PUBLISHERS};

/// How long a declaration waits for a queue whose home node is down to come back (a node that
/// restarts recovers its queues within a few seconds after it accepts connections).
const HOME_NODE_WAIT: Duration = Duration::from_secs(5);

/// NOT_FOUND "home node '...' of durable queue '...' in vhost '...' is down or inaccessible".
fn is_home_node_down(e: &Error) -> bool {
    is_not_found(e) && e.to_string().contains("home node")
}
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName};

impl BusInner {
    pub(super) fn queue_name(&self, target: &Target) -> String {
        match target {
            Target::Work(q, lane) => self.names.work_lane(q, *lane),
            Target::Delay(q, lane, ms) => self.names.delay_lane(q, *lane, *ms),
            Target::Dead(q) => self.names.dead(q),
        }
    }

    pub(super) fn queue_arguments(&self, target: &Target) -> FieldTable {
        let mut args = FieldTable::default();
        let quorum = self.queue_type == QueueType::Quorum;
        if quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        match target {
            Target::Work(..) => {
                if !quorum {
                    args.insert("x-max-priority".into(), AMQPValue::LongLongInt(10));
                    args.insert("x-queue-version".into(), AMQPValue::LongLongInt(2));
                }
            }
            Target::Delay(q, lane, ms) => {
                args.insert("x-message-ttl".into(), long(*ms));
                args.insert(
                    "x-expires".into(),
                    long(*ms + DELAY_QUEUE_SPARE.as_millis() as u64),
                );
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString("".into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(self.names.work_lane(q, *lane).into()),
                );
                if quorum {
                    // A quorum queue dead-letters at most once unless told otherwise: an expired
                    // message would be lost if its work queue had no leader at that moment.
                    args.insert(
                        "x-dead-letter-strategy".into(),
                        AMQPValue::LongString("at-least-once".into()),
                    );
                    args.insert(
                        "x-overflow".into(),
                        AMQPValue::LongString("reject-publish".into()),
                    );
                }
            }
            Target::Dead(_) => {}
        }
        args
    }

    /// Declares `target` (durable, with its arguments) and returns its ready-message count.
    pub(super) async fn declare(&self, ch: &Channel, target: &Target) -> Result<u64> {
        let name = self.queue_name(target);
        let q = ch
            .queue_declare(
                short(name.clone())?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(target),
            )
            .await
            .map_err(|e| self.declare_error(&name, e))?;
        Ok(u64::from(q.message_count()))
    }

    /// A refused declaration. PRECONDITION_FAILED means the queue exists with other arguments:
    /// almost always declared by a process with the other `queue_type`, which is a setting to
    /// fix, not a broker failure.
    fn declare_error(&self, name: &str, e: lapin::Error) -> Error {
        if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
            return Error::config(
                "queue_type",
                format!(
                    "queue {name} already exists with other arguments than queue_type={} gives it ({e}); \
                     every process of this prefix must use the same queue_type (drain and delete the \
                     old queues to change it)",
                    self.queue_type.as_str()
                ),
            );
        }
        amqp_error(&format!("declare queue {name}"), e)
    }

    /// Declares `target` on the topology channel and returns the connection's generation. A
    /// queue whose home node is down answers NOT_FOUND "home node ... is down": a classic queue
    /// for the first seconds after its node restarted (queues are recovered after the listener
    /// opens), or for good while that node is lost. It is asked again every 100 ms for up to
    /// [`HOME_NODE_WAIT`]; then the error says which of the two it may be.
    async fn declare_waiting(&self, target: &Target) -> Result<u64> {
        let deadline = Instant::now() + HOME_NODE_WAIT;
        loop {
            let (ch, generation, _) = self.topology.get().await?;
            let what = format!("declare queue {}", self.queue_name(target));
            let declared = bounded(&ch, &what, ROUND_TRIP_TIMEOUT, self.declare(&ch, target));
            let e = match declared.await {
                Ok(_) => return Ok(generation),
                Err(e) if is_home_node_down(&e) => e,
                Err(e) => return Err(e),
            };
            if Instant::now() >= deadline {
                return Err(Error::temporary(
                    BACKEND,
                    format!(
                        "queue {} is unavailable: its home node is down ({e}); the broker is still \
                         starting, or, in a cluster, that node is lost: a classic queue lives on one \
                         node (queue_type=quorum replicates the queues)",
                        self.queue_name(target)
                    ),
                    None,
                ));
            }
            tracing::debug!(queue = %self.queue_name(target), "the queue's home node is down; asking again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Declares `target` unless this connection already did (`force` declares anyway). A delay
    /// queue dead-letters into its work queue, which is declared first.
    pub(super) async fn ensure(&self, target: &Target, force: bool) -> Result<()> {
        match target {
            Target::Delay(q, lane, _) => {
                self.ensure_one(&Target::Work(q.clone(), *lane), force)
                    .await?
            }
            // The dead-letter queue has the same name whatever the queue type: declaring it
            // with every work queue makes a process with the other `queue_type` fail at once
            // (PRECONDITION_FAILED) instead of filling queues that nobody reads.
            Target::Work(q, _) => self.ensure_one(&Target::Dead(q.clone()), force).await?,
            Target::Dead(_) => {}
        }
        self.ensure_one(target, force).await
    }

    pub(super) async fn ensure_one(&self, target: &Target, force: bool) -> Result<()> {
        let name = self.queue_name(target);
        if !force {
            let d = self.declared.lock();
            let fresh = match target {
                Target::Delay(..) => d
                    .delays
                    .get(&name)
                    .is_some_and(|at| at.elapsed() < DELAY_REDECLARE),
                _ => d.generation == self.link.generation() && d.queues.contains(&name),
            };
            if fresh {
                return Ok(());
            }
        }
        let generation = self.declare_waiting(target).await?;
        let mut d = self.declared.lock();
        match target {
            Target::Delay(q, lane, ms) => {
                d.delays.insert(name, Instant::now());
                d.buckets.entry(q.clone()).or_default().insert((*lane, *ms));
            }
            _ => {
                if d.generation != generation {
                    d.generation = generation;
                    d.queues.clear();
                }
                d.queues.insert(name);
            }
        }
        Ok(())
    }

    /// Publishes `items` in order on one confirm channel and waits for every confirm. A message
    /// the broker returns as unroutable (its queue was deleted) is published again once after
    /// declaring the queue.
    pub(super) async fn send(&self, items: Vec<Outgoing<'_>>) -> Result<()> {
        let mut targets: Vec<&Target> = Vec::new();
        for item in &items {
            if !targets.contains(&&item.target) {
                targets.push(&item.target);
            }
        }
        for t in targets {
            self.ensure(t, false).await?;
        }
        let mut pending: Vec<usize> = (0..items.len()).collect();
        for attempt in 0..2 {
            let slot = self.round_robin.fetch_add(1, Ordering::Relaxed) % PUBLISHERS;
            let (ch, _, _) = self.publishers[slot].get().await?;
            let publish_all = async {
                let mut confirms = Vec::with_capacity(pending.len());
                for &i in &pending {
                    let item = &items[i];
                    let confirm = ch
                        .basic_publish(
                            ShortString::default(),
                            short(self.queue_name(&item.target))?,
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            item.payload,
                            item.properties.clone(),
                        )
                        .await
                        .map_err(|e| amqp_error("publish", e))?;
                    confirms.push(confirm);
                }
                Ok(futures::future::join_all(confirms).await)
            };
            // No confirm in time: the messages may or may not be in the queue (at-least-once:
            // the caller retries, a duplicate is harmless).
            let outcomes = bounded(
                &ch,
                "publish and wait for confirms",
                ROUND_TRIP_TIMEOUT,
                publish_all,
            )
            .await?;
            let mut returned = Vec::new();
            for (&i, outcome) in pending.iter().zip(outcomes) {
                let confirmation =
                    outcome.map_err(|e| amqp_error("wait for a publisher confirm", e))?;
                let nacked = confirmation.is_nack();
                if confirmation.take_message().is_some() {
                    returned.push(i);
                } else if nacked {
                    // On RabbitMQ 3.10 a channel's quorum-queue client can keep addressing a
                    // leader that was lost, and nack every publish for minutes: a new channel
                    // starts from the queue's current leader. Closing this one makes the next
                    // send open a new one (other sends in flight on it fail and are retried).
                    if let Err(e) = ch.close(200, "a publish was nacked".into()).await {
                        tracing::debug!(error = %e, "closing a publisher channel after a nack");
                    }
                    return Err(Error::temporary(
                        BACKEND,
                        "the broker refused (nacked) a published message",
                        None,
                    ));
                }
            }
            if returned.is_empty() {
                return Ok(());
            }
            tracing::info!(
                attempt,
                count = returned.len(),
                "published messages were unroutable; declaring their queues again"
            );
            let mut again: Vec<&Target> = Vec::new();
            for &i in &returned {
                if !again.contains(&&items[i].target) {
                    again.push(&items[i].target);
                }
            }
            for t in again {
                self.ensure(t, true).await?;
            }
            pending = returned;
        }
        Err(Error::temporary(
            BACKEND,
            "messages stayed unroutable: their queue keeps disappearing",
            None,
        ))
    }

    /// Forgets that `target` was declared (it was found missing), so the next use declares it.
    pub(super) fn forget(&self, target: &Target) {
        let name = self.queue_name(target);
        let mut d = self.declared.lock();
        d.queues.remove(&name);
        d.delays.remove(&name);
    }

    /// Where a message of `priority` goes after `delay`.
    pub(super) fn target_for(
        &self,
        queue: &QueueName,
        priority: Priority,
        delay: Duration,
    ) -> Target {
        let lane = self.queue_type.lane_of(priority);
        if delay.is_zero() {
            Target::Work(queue.clone(), lane)
        } else {
            Target::Delay(queue.clone(), lane, delay_bucket_ms(delay))
        }
    }
}
