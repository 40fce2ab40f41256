//! The wire format of work messages: headers, priorities, properties, and the low-level
//! get/ack/release helpers.

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use super::super::leases::LeaseEntry;
use super::super::link::{amqp_error, bounded, short, ROUND_TRIP_TIMEOUT};
use crate::error::Result;
use crate::model::Priority;

/// Deliveries of this message before the copy that carries the header.
pub(super) const H_DELIVERIES: &str = "x-orchestra-deliveries";
/// Why a dead letter died.
pub(super) const H_REASON: &str = "x-orchestra-reason";
/// When a dead letter died (Unix milliseconds).
pub(super) const H_DEAD_AT: &str = "x-orchestra-dead-at-ms";

pub(super) fn amqp_priority(p: Priority) -> u8 {
    11 - p.get()
}

pub(super) fn our_priority(amqp: Option<u8>) -> Priority {
    amqp.and_then(|a| Priority::new(11 - i64::from(a.clamp(1, 10))).ok())
        .unwrap_or_default()
}

pub(super) fn header_u64(headers: Option<&FieldTable>, key: &str) -> Option<u64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

pub(super) fn header_text(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub(super) fn long(v: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Properties of a work message carrying `deliveries` past deliveries.
pub(super) fn work_properties(
    message_id: &str,
    priority: Priority,
    deliveries: u32,
) -> Result<BasicProperties> {
    let mut headers = FieldTable::default();
    headers.insert(H_DELIVERIES.into(), long(u64::from(deliveries)));
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_priority(amqp_priority(priority))
        .with_message_id(short(message_id)?)
        .with_headers(headers))
}

/// Acks a held delivery; a poisoned acker (dead channel) means the broker requeued it already.
pub(super) async fn ack_quietly(entry: &LeaseEntry) {
    match entry.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(message_id = %entry.message.message_id, "ack after the channel closed; the broker requeued the message")
        }
        Err(e) => {
            tracing::warn!(message_id = %entry.message.message_id, error = %e, "ack failed; the message will be delivered again")
        }
    }
}

/// Gives deliveries that will not be leased back to the broker.
pub(super) async fn release(deliveries: Vec<AmqpDelivery>) {
    for d in deliveries {
        let _ = d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
}

/// `n` pipelined `basic.get`s on one channel: one round trip, answered in queue order.
/// A read of a queue from its oldest end on a private channel, in batches of `basic.get`s,
/// until the queue has nothing more for this channel (what it read stays unacked, so nothing
/// is read twice) or `max` messages were read. The count `queue.declare` answers is not the
/// bound: a quorum queue's count follows its log a moment later, so a queue it calls empty
/// may hold the dead letter just confirmed.
pub(super) struct Scan {
    name: ShortString,
    read: u64,
    max: u64,
    done: bool,
}

/// `basic.get`s sent at once by a [`Scan`].
const SCAN_BATCH: u64 = 64;

impl Scan {
    pub(super) fn new(name: ShortString, max: u64) -> Self {
        Scan {
            name,
            read: 0,
            max,
            done: false,
        }
    }

    /// The next messages, none when the scan is over.
    pub(super) async fn next(&mut self, ch: &Channel) -> Result<Vec<AmqpDelivery>> {
        if self.done || self.read >= self.max {
            return Ok(Vec::new());
        }
        let n = (self.max - self.read).min(SCAN_BATCH) as usize;
        let got = bounded(
            ch,
            "read dead letters",
            ROUND_TRIP_TIMEOUT,
            get_batch(ch, &self.name, n),
        )
        .await?;
        // A get that came back empty found the queue drained for this channel.
        self.done = got.len() < n;
        self.read += got.len() as u64;
        Ok(got)
    }
}

pub(super) async fn get_batch(
    ch: &Channel,
    queue: &ShortString,
    n: usize,
) -> Result<Vec<AmqpDelivery>> {
    let gets = (0..n).map(|_| ch.basic_get(queue.clone(), BasicGetOptions::default()));
    collect_gets(futures::future::join_all(gets).await).await
}

/// The messages of answered `basic.get`s; on any failure, those received are given back and
/// the first error returned.
pub(super) async fn collect_gets(
    answers: Vec<lapin::Result<Option<lapin::message::BasicGetMessage>>>,
) -> Result<Vec<AmqpDelivery>> {
    let mut got = Vec::with_capacity(answers.len());
    let mut failure = None;
    for r in answers {
        match r {
            Ok(Some(m)) => got.push(m.delivery),
            Ok(None) => {}
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        release(got).await;
        return Err(amqp_error("get messages", e));
    }
    Ok(got)
}
