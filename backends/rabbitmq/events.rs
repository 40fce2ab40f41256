//! Fan-out events: a durable direct exchange `{prefix}events`, routing key = topic, and one
//! exclusive, auto-delete, server-named queue per subscriber bound with its topic.
//!
//! A direct exchange rather than a topic exchange: topics are matched exactly, so a topic that
//! happens to contain `*`, `#` or `.` means itself, not a pattern. Events are published without
//! confirms (at-most-once, as the trait promises), each subscriber consumes with auto-ack, and a
//! subscriber's queue is capped (`x-max-length`, oldest dropped) so a stalled subscriber cannot
//! fill the broker.
//!
//! `publish` hands the event to a sender task and returns. The sender packs the events of one
//! topic that queued up while it was busy into one AMQP message (header
//! `x-orchestra-events: n`, body = n × (u32 big-endian length, bytes)), which subscribers
//! unpack; a lone event travels as a plain message. Order is kept per topic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use tokio::sync::mpsc;

use super::link::{amqp_error, short, CachedChannel, Link};
use crate::bus::Subscription;
use crate::error::{Error, Result};

/// Events buffered in this process per subscriber before it starts missing them.
const SUBSCRIBER_BUFFER: usize = 65_536;
/// Events buffered in the broker per subscriber queue (oldest dropped beyond).
const SUBSCRIBER_QUEUE_MAX: i64 = 100_000;
/// Events waiting to be sent before `publish` starts dropping them.
const OUTBOX: usize = 65_536;
/// Most events packed into one message, and the size past which a message stops growing.
const MAX_EVENTS_PER_MESSAGE: usize = 256;
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Header of a packed message: how many events it carries.
const H_EVENTS: &str = "x-orchestra-events";

pub(crate) struct Events {
    link: Arc<Link>,
    exchange: ShortString,
    outbox: mpsc::Sender<(ShortString, Vec<u8>)>,
    sender: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

impl Events {
    /// Must be called inside a Tokio runtime (it starts the sender task).
    pub(crate) fn new(link: Arc<Link>, exchange: String) -> Result<Self> {
        let exchange = short(exchange)?;
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let sender = tokio::spawn(send_events(link.clone(), exchange.clone(), rx));
        Ok(Events {
            link,
            exchange,
            outbox,
            sender,
        })
    }

    /// Queues one event for sending (at-most-once: an event that cannot be sent is dropped
    /// with a warning).
    pub(crate) async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        let key = topic_key(topic)?;
        match self.outbox.try_send((key, payload.to_vec())) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    topic,
                    "event outbox full (broker unreachable or too slow); event dropped"
                );
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::permanent(
                super::link::BACKEND,
                "the event sender stopped",
                None,
            )),
        }
    }

    /// Subscribes: the queue is bound before this returns, so every later event reaches it.
    pub(crate) async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        let key = topic_key(topic)?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let session = self.link.session().await?;
        let ch = session.channel(false).await?;
        let consumer = attach(&ch, &self.exchange, &key).await?;
        let subscriber = Subscriber {
            link: self.link.clone(),
            exchange: self.exchange.clone(),
            key,
            tx,
        };
        tokio::spawn(subscriber.run(ch, consumer));
        Ok(Subscription::new(rx))
    }
}

/// Sends queued events, packing those of one topic that queued up together.
async fn send_events(
    link: Arc<Link>,
    exchange: ShortString,
    mut rx: mpsc::Receiver<(ShortString, Vec<u8>)>,
) {
    let channel = CachedChannel::new(link, false, None);
    let declared_on = AtomicU64::new(0);
    let mut queued: Vec<(ShortString, Vec<u8>)> = Vec::new();
    loop {
        match rx.recv().await {
            Some(first) => queued.push(first),
            None => return,
        }
        let mut bytes = queued[0].1.len();
        while queued.len() < MAX_EVENTS_PER_MESSAGE && bytes < MAX_MESSAGE_BYTES {
            match rx.try_recv() {
                Ok(e) => {
                    bytes += e.1.len();
                    queued.push(e);
                }
                Err(_) => break,
            }
        }
        // Group by topic, keeping each topic's order.
        let mut groups: Vec<(ShortString, Vec<Vec<u8>>)> = Vec::new();
        for (topic, payload) in queued.drain(..) {
            match groups.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, events)) => events.push(payload),
                None => groups.push((topic, vec![payload])),
            }
        }
        for (topic, events) in groups {
            let n = events.len();
            if let Err(e) = send_one(&channel, &declared_on, &exchange, topic.clone(), events).await
            {
                tracing::warn!(topic = %topic, events = n, error = %e, "events dropped (at-most-once)");
            }
        }
    }
}

async fn send_one(
    channel: &CachedChannel,
    declared_on: &AtomicU64,
    exchange: &ShortString,
    topic: ShortString,
    mut events: Vec<Vec<u8>>,
) -> Result<()> {
    let (ch, generation, fresh) = channel.get().await?;
    if fresh || declared_on.load(Ordering::Acquire) != generation {
        declare_exchange(&ch, exchange).await?;
        declared_on.store(generation, Ordering::Release);
    }
    let (body, properties) = if events.len() == 1 {
        (events.pop().unwrap_or_default(), BasicProperties::default())
    } else {
        let body = pack(&events);
        let mut headers = FieldTable::default();
        headers.insert(H_EVENTS.into(), AMQPValue::LongLongInt(events.len() as i64));
        (body, BasicProperties::default().with_headers(headers))
    };
    ch.basic_publish(
        exchange.clone(),
        topic,
        BasicPublishOptions::default(),
        &body,
        properties,
    )
    .await
    .map_err(|e| amqp_error("publish events", e))?;
    Ok(())
}

/// n × (u32 big-endian length, bytes).
fn pack(events: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 4).sum());
    for e in events {
        body.extend_from_slice(&u32::try_from(e.len()).unwrap_or(u32::MAX).to_be_bytes());
        body.extend_from_slice(e);
    }
    body
}

/// The events in a delivered message (several if it was packed).
fn unpack(delivery: lapin::message::Delivery) -> Vec<Vec<u8>> {
    let packed = delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(H_EVENTS));
    if packed {
        unpack_body(&delivery.data)
    } else {
        vec![delivery.data]
    }
}

fn unpack_body(body: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(event) = rest.get(4..4 + len) else {
            tracing::warn!("a packed event message is truncated; its remaining events are dropped");
            break;
        };
        out.push(event.to_vec());
        rest = &rest[4 + len..];
    }
    out
}

fn topic_key(topic: &str) -> Result<ShortString> {
    if topic.is_empty() {
        return Err(Error::invalid("topic", "must not be empty"));
    }
    ShortString::try_new(topic).map_err(|_| {
        Error::invalid(
            "topic",
            format!("is {} bytes; at most 255 are allowed", topic.len()),
        )
    })
}

async fn declare_exchange(ch: &Channel, exchange: &ShortString) -> Result<()> {
    ch.exchange_declare(
        exchange.clone(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("declare the events exchange", e))
}

/// Declares the subscriber's private queue, binds it and starts consuming.
async fn attach(ch: &Channel, exchange: &ShortString, key: &ShortString) -> Result<Consumer> {
    declare_exchange(ch, exchange).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(SUBSCRIBER_QUEUE_MAX),
    );
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| amqp_error("declare a subscriber queue", e))?;
    ch.queue_bind(
        queue.name().clone(),
        exchange.clone(),
        key.clone(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("bind a subscriber queue", e))?;
    ch.basic_consume(
        queue.name().clone(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("consume a subscriber queue", e))
}

struct Subscriber {
    link: Arc<Link>,
    exchange: ShortString,
    key: ShortString,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Subscriber {
    /// Forwards events until the subscription is dropped; re-attaches after a reconnect.
    async fn run(self, mut ch: Channel, mut consumer: Consumer) {
        loop {
            let ended = loop {
                tokio::select! {
                    _ = self.tx.closed() => {
                        let _ = ch.close(200, "unsubscribed".into()).await;
                        return;
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            for event in unpack(delivery) {
                                match self.tx.try_send(event) {
                                    Ok(()) => {}
                                    Err(mpsc::error::TrySendError::Full(_)) => {
                                        tracing::warn!(topic = %self.key, "slow subscriber missed an event");
                                    }
                                    Err(mpsc::error::TrySendError::Closed(_)) => {
                                        let _ = ch.close(200, "unsubscribed".into()).await;
                                        return;
                                    }
                                }
                            }
                        }
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    }
                }
            };
            tracing::info!(topic = %self.key, error = ?ended, "event subscription interrupted; re-subscribing");
            // Re-attach on a fresh channel (and connection, if that is what died).
            loop {
                let tx = &self.tx;
                let Some(session) = self.link.session_retrying(|| tx.is_closed()).await else {
                    return;
                };
                let attached = async {
                    let c = session.channel(false).await?;
                    let cons = attach(&c, &self.exchange, &self.key).await?;
                    Ok::<_, Error>((c, cons))
                }
                .await;
                match attached {
                    Ok((c, cons)) => {
                        ch = c;
                        consumer = cons;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.key, error = %e, "cannot re-subscribe yet");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_events_unpack_in_order() {
        let events = vec![
            b"{\"a\":1}".to_vec(),
            Vec::new(),
            "ünïcødé".as_bytes().to_vec(),
        ];
        assert_eq!(unpack_body(&pack(&events)), events);
        let mut truncated = pack(&events);
        truncated.truncate(truncated.len() - 2);
        assert_eq!(unpack_body(&truncated), events[..2].to_vec());
    }
}
