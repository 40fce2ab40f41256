//! Fan-out events: a durable direct exchange `{prefix}events`, routing key = topic, and one
//! exclusive, auto-delete, server-named queue per subscriber bound with its topic.
//!
//! A direct exchange rather than a topic exchange: topics are matched exactly, so a topic that
//! happens to contain `*`, `#` or `.` means itself, not a pattern. Events are published without
//! confirms (at-most-once, as the trait promises), each subscriber consumes with auto-ack, and a
//! subscriber's queue is capped (`x-max-length`, oldest dropped) so a stalled subscriber cannot
//! fill the broker.

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

pub(crate) struct Events {
    link: Arc<Link>,
    exchange: ShortString,
    channel: CachedChannel,
    declared_on: AtomicU64,
}

impl Events {
    pub(crate) fn new(link: Arc<Link>, exchange: String) -> Result<Self> {
        Ok(Events {
            channel: CachedChannel::new(link.clone(), false, None),
            exchange: short(exchange)?,
            link,
            declared_on: AtomicU64::new(0),
        })
    }

    /// Publishes one event (no confirm: at-most-once).
    pub(crate) async fn publish(&self, topic: &str, payload: &[u8]) -> Result<()> {
        let key = topic_key(topic)?;
        let (ch, generation, fresh) = self.channel.get().await?;
        if fresh || self.declared_on.load(Ordering::Acquire) != generation {
            declare_exchange(&ch, &self.exchange).await?;
            self.declared_on.store(generation, Ordering::Release);
        }
        ch.basic_publish(
            self.exchange.clone(),
            key,
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default(),
        )
        .await
        .map_err(|e| amqp_error("publish an event", e))?;
        Ok(())
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
                        Some(Ok(delivery)) => match self.tx.try_send(delivery.data) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                tracing::warn!(topic = %self.key, "slow subscriber missed an event");
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                let _ = ch.close(200, "unsubscribed".into()).await;
                                return;
                            }
                        },
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
