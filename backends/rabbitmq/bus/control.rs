//! [`Bus::remove_dead_letters`](crate::Bus::remove_dead_letters) on RabbitMQ: reads the queue's
//! dead letters from the oldest on a private channel, acks the named ones (which deletes them)
//! and closes the channel, which puts every other one read back in its place. O(dead letters,
//! up to the scan limit).

use std::collections::BTreeSet;

use lapin::options::BasicAckOptions;

use super::wire::Scan;
use super::{RabbitBus, Target, DEAD_SCAN_MAX};
use crate::error::Result;
use crate::model::QueueName;

use super::super::link::{amqp_error, short};

impl RabbitBus {
    pub(super) async fn remove_dead(
        &self,
        queue: &QueueName,
        ids: &[String],
    ) -> Result<Vec<String>> {
        let mut wanted: BTreeSet<&str> = ids.iter().map(|s| s.as_str()).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let target = Target::Dead(queue.clone());
        inner.ensure(&target, false).await?;
        let session = inner.link.session().await?;
        let ch = session.channel(false).await?;
        inner.declare(&ch, &target).await?;
        let mut scan = Scan::new(short(inner.names.dead(queue))?, DEAD_SCAN_MAX);
        let mut removed = Vec::new();
        while !wanted.is_empty() {
            let got = scan.next(&ch).await?;
            if got.is_empty() {
                break;
            }
            for d in got {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                if wanted.remove(id.as_str()) {
                    ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                        .await
                        .map_err(|e| amqp_error("ack a dead letter to delete it", e))?;
                    removed.push(id);
                }
            }
        }
        // The acks are applied before the close completes; what was read and not acked goes
        // back in its place.
        ch.close(200, "dead letters removed".into())
            .await
            .map_err(|e| amqp_error("close the channel that removed dead letters", e))?;
        Ok(removed)
    }
}
