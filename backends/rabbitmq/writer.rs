//! Group commit for the log streams: a [`Writer`] sends one stream message at a time and packs
//! the records submitted while the previous message awaits its confirm into the next one (a
//! JSON array of `{"rid", "op"}`), so that under load the broker handles a few large messages
//! instead of many small ones. Records keep their submission order.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::BasicProperties;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::link::{amqp_error, bounded, CachedChannel, BACKEND, ROUND_TRIP_TIMEOUT};
use crate::error::{Error, Result};

/// Stream messages a writer has published but not yet had confirmed; further records wait and
/// are packed into the next message.
const WRITES_IN_FLIGHT: usize = 1;
/// Most records packed into one stream message (also bounds positions within a message).
pub(crate) const MAX_RECORDS_PER_MESSAGE: usize = 512;
/// A message stops growing past this many bytes (one record may exceed it on its own).
const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// A record waiting to be published, with where to report the publish outcome.
pub(crate) struct Item {
    pub(crate) rid: String,
    /// The operation's JSON (empty for a marker).
    pub(crate) op: Vec<u8>,
    pub(crate) published: oneshot::Sender<std::result::Result<(), (bool, String)>>,
}

/// Publishes records to the stream in batches, on one confirm channel.
pub(crate) struct Writer {
    pub(crate) tx: mpsc::UnboundedSender<Item>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Writer {
    /// A writer publishing to `stream` on `publisher` (a confirm-mode channel).
    pub(crate) fn new(stream: ShortString, publisher: CachedChannel) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_batches(stream, publisher, rx));
        Writer { tx, task }
    }

    /// Appends records nobody waits to see applied (snapshot parts), in order; returns once
    /// the broker confirmed them all.
    pub(crate) async fn append(&self, ops: Vec<Vec<u8>>) -> Result<()> {
        let batch = uuid::Uuid::new_v4().simple().to_string();
        let mut confirms = Vec::with_capacity(ops.len());
        for (n, op) in ops.into_iter().enumerate() {
            let (published, rx) = oneshot::channel();
            let item = Item {
                rid: format!("{batch}-{n}"),
                op,
                published,
            };
            if self.tx.send(item).is_err() {
                return Err(Error::permanent(BACKEND, "the log writer stopped", None));
            }
            confirms.push(rx);
        }
        for rx in confirms {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err((temporary, e))) => {
                    let message = format!("log append failed: {e}");
                    return Err(if temporary {
                        Error::temporary(BACKEND, message, None)
                    } else {
                        Error::permanent(BACKEND, message, None)
                    });
                }
                Err(_) => return Err(Error::permanent(BACKEND, "the log writer stopped", None)),
            }
        }
        Ok(())
    }
}

/// Packs `batch` into one message body: `[{"rid":"…","op":…},…]` (record ids are hex and
/// dashes: no escaping needed).
fn encode(batch: &[Item]) -> Vec<u8> {
    let size: usize = batch.iter().map(|i| i.op.len() + i.rid.len() + 20).sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (n, item) in batch.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"rid\":\"");
        out.extend_from_slice(item.rid.as_bytes());
        out.extend_from_slice(b"\",\"op\":");
        if item.op.is_empty() {
            out.extend_from_slice(b"null");
        } else {
            out.extend_from_slice(&item.op);
        }
        out.push(b'}');
    }
    out.push(b']');
    out
}

async fn write_batches(
    stream: ShortString,
    publisher: CachedChannel,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    let in_flight = Arc::new(Semaphore::new(WRITES_IN_FLIGHT));
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        // While earlier batches await their confirms, later records pile up in `rx`: they go
        // out together as soon as a slot frees (group commit).
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.op.len();
        let mut batch = vec![first];
        while batch.len() < MAX_RECORDS_PER_MESSAGE && bytes < MAX_MESSAGE_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    if bytes + item.op.len() > MAX_MESSAGE_BYTES {
                        carry = Some(item);
                        break;
                    }
                    bytes += item.op.len();
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        let body = encode(&batch);
        let sent = async {
            let (ch, _, _) = publisher.get().await?;
            let publishing = async {
                ch.basic_publish(
                    ShortString::default(),
                    stream.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    BasicProperties::default(),
                )
                .await
                .map_err(|e| amqp_error("append to the log", e))
            };
            let confirm = bounded(&ch, "append to the log", ROUND_TRIP_TIMEOUT, publishing).await?;
            Ok::<_, Error>((ch, confirm))
        }
        .await;
        let (ch, confirm) = match sent {
            Ok(sent) => sent,
            Err(e) => {
                report(batch, Err((e.is_temporary(), e.to_string())));
                continue;
            }
        };
        let stream = stream.clone();
        tokio::spawn(async move {
            // A confirm that never comes would hold the writer's only slot, and every later
            // append, forever: past the limit the batch fails (temporary; whether it reached
            // the log is settled by the caller's sync) and the channel is replaced.
            let confirmed = bounded(
                &ch,
                "wait for a log append confirm",
                ROUND_TRIP_TIMEOUT,
                async { Ok(confirm.await) },
            );
            let outcome = match confirmed.await {
                Err(e) => Err((true, e.to_string())),
                Ok(Ok(c)) => {
                    let nacked = c.is_nack();
                    if c.take_message().is_some() {
                        Err((
                            true,
                            format!("the log stream {stream} does not exist (deleted?)"),
                        ))
                    } else if nacked {
                        Err((true, "the broker refused a log append".to_string()))
                    } else {
                        Ok(())
                    }
                }
                Ok(Err(e)) => Err((true, format!("waiting for a log append confirm: {e}"))),
            };
            report(batch, outcome);
            drop(permit);
        });
    }
}

fn report(batch: Vec<Item>, outcome: std::result::Result<(), (bool, String)>) {
    for item in batch {
        let _ = item.published.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_encode_as_a_json_array_of_envelopes() {
        let item = |rid: &str, op: &[u8]| {
            let (tx, _rx) = oneshot::channel();
            Item {
                rid: rid.to_string(),
                op: op.to_vec(),
                published: tx,
            }
        };
        let body = encode(&[item("w-1", br#"{"a":1}"#), item("w-2", b"")]);
        let back: Vec<crate::backends::rabbitmq::log::Envelope<serde_json::Value>> =
            serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].rid, "w-1");
        assert_eq!(back[0].op, Some(serde_json::json!({"a": 1})));
        assert_eq!(back[1].rid, "w-2");
        assert!(back[1].op.is_none(), "an empty op is a marker");
    }
}
