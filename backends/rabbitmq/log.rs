//! A replicated state machine on a RabbitMQ stream: every change is appended to the stream as a
//! record, every process follows the stream from its first offset and applies the records in log
//! order to an in-process view. Since all replicas apply the same records in the same order with
//! the same deterministic rules, they agree on every outcome; the writer of a record learns its
//! outcome when its own replica applies it (records carry a unique id in `message_id`).
//!
//! Reads are served from the local view, which lags the log by the time it takes to deliver the
//! newest records. [`Log::sync`] is the read-your-writes barrier: it appends an empty marker
//! record and waits until the view has applied it, so everything appended before the call is in
//! the view when it returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::link::{amqp_error, short, CachedChannel, Link, Session, BACKEND};
use crate::error::{Error, Result};

/// Records delivered to the follower before it must ack (streams require a prefetch).
const PREFETCH: u16 = 1000;
/// How long a writer waits for its own record to come back before giving up (temporary error).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The deterministic rules a log's records are applied with.
pub(crate) trait Machine: Send + Sync + 'static {
    /// A record's content.
    type Op: Serialize + DeserializeOwned + Send + Sync;
    /// What applying a record decided (sent to its writer).
    type Outcome: Send + 'static;
    /// Applies `op`, found at `offset` in the log.
    fn apply(&mut self, offset: u64, op: Self::Op) -> Self::Outcome;
}

enum Applied<O> {
    Op(O),
    Marker,
    Undecodable(String),
}

struct Shared<M: Machine> {
    link: Arc<Link>,
    stream: ShortString,
    arguments: FieldTable,
    writer: String,
    seq: AtomicU64,
    machine: RwLock<M>,
    waiters: Mutex<HashMap<String, oneshot::Sender<Applied<M::Outcome>>>>,
    /// Offset of the last record applied (None before the first).
    applied: Mutex<Option<u64>>,
    publisher: CachedChannel,
}

/// A stream-backed replicated state machine. Dropping it stops following the stream.
pub(crate) struct Log<M: Machine> {
    shared: Arc<Shared<M>>,
    follower: tokio::task::JoinHandle<()>,
}

impl<M: Machine> Drop for Log<M> {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl<M: Machine> std::fmt::Debug for Log<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("stream", &self.shared.stream.as_str())
            .field("applied", &*self.shared.applied.lock())
            .finish_non_exhaustive()
    }
}

/// Arguments that make a queue a stream. `extra` adds retention settings; every process must
/// declare a stream with the same arguments (RabbitMQ refuses a mismatch).
pub(crate) fn stream_arguments(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    args
}

impl<M: Machine> Log<M> {
    /// Declares the stream, starts following it from its first record, and returns once the
    /// view has caught up with everything appended before this call.
    pub(crate) async fn open(
        link: Arc<Link>,
        stream: String,
        arguments: FieldTable,
        machine: M,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            publisher: CachedChannel::new(link.clone(), true, None),
            link,
            stream: short(stream)?,
            arguments,
            writer: uuid::Uuid::new_v4().simple().to_string(),
            seq: AtomicU64::new(0),
            machine: RwLock::new(machine),
            waiters: Mutex::new(HashMap::new()),
            applied: Mutex::new(None),
        });
        let session = shared.link.session().await?;
        let ch = session.channel(false).await?;
        shared.declare(&ch, false).await?;
        let _ = ch.close(200, "declared".into()).await;
        let follower = tokio::spawn(follow(shared.clone()));
        let log = Log { shared, follower };
        log.sync().await?;
        Ok(log)
    }

    /// Reads the view.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.shared.machine.read())
    }

    /// Appends one record and returns what applying it decided.
    pub(crate) async fn submit(&self, op: &M::Op) -> Result<M::Outcome> {
        self.submit_on(&self.shared.publisher, std::slice::from_ref(op))
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(Error::permanent(
                    BACKEND,
                    "a log append produced no outcome",
                    None,
                ))
            })
    }

    /// Appends several records in order (pipelined, one confirm round) and returns each one's
    /// outcome.
    pub(crate) async fn submit_many(&self, ops: &[M::Op]) -> Result<Vec<Result<M::Outcome>>> {
        self.submit_on(&self.shared.publisher, ops).await
    }

    /// Like [`Log::submit_many`], publishing on `publisher` (a confirm-mode channel, possibly on
    /// another connection).
    pub(crate) async fn submit_on(
        &self,
        publisher: &CachedChannel,
        ops: &[M::Op],
    ) -> Result<Vec<Result<M::Outcome>>> {
        let mut bodies = Vec::with_capacity(ops.len());
        for op in ops {
            bodies.push(serde_json::to_vec(op).map_err(|e| {
                Error::permanent(
                    BACKEND,
                    format!("cannot encode a log record: {e}"),
                    Some(Box::new(e) as _),
                )
            })?);
        }
        let mut pending = Vec::with_capacity(ops.len());
        for body in &bodies {
            let (rid, rx) = self.shared.expect_record();
            pending.push((rid, rx, body));
        }
        let published = self.shared.publish_all(publisher, &pending).await;
        let mut out = Vec::with_capacity(pending.len());
        match published {
            Ok(()) => {
                for (rid, rx, _) in pending {
                    out.push(self.shared.outcome(&rid, rx, APPLY_TIMEOUT).await);
                }
            }
            Err(e) => {
                // Some records may have reached the log before the failure. Once a marker
                // appended after the failure is applied, each record has either been applied
                // (its waiter fired) or is lost for good.
                tracing::warn!(error = %e, stream = %self.shared.stream, "log append interrupted; checking what reached the log");
                let synced = self.sync().await;
                for (rid, rx, _) in pending {
                    let r = match self.shared.outcome(&rid, rx, Duration::ZERO).await {
                        Ok(o) => Ok(o),
                        Err(_) => Err(match &synced {
                            Ok(()) => Error::temporary(
                                BACKEND,
                                format!("log append failed and did not reach the log: {e}"),
                                None,
                            ),
                            Err(s) => Error::temporary(
                                BACKEND,
                                format!("log append failed ({e}); whether it reached the log is unknown ({s})"),
                                None,
                            ),
                        }),
                    };
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Waits until every record appended before this call is in the view (read-your-writes
    /// across processes). One marker append and its delivery.
    pub(crate) async fn sync(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
        loop {
            let (rid, rx) = self.shared.expect_record();
            let body: &[u8] = &[];
            let published = self
                .shared
                .publish_all(&self.shared.publisher, &[(rid.clone(), (), &body.to_vec())])
                .await;
            match published {
                Ok(()) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    return self.shared.applied(&rid, rx, left).await.map(|_| ());
                }
                Err(e) => {
                    self.shared.waiters.lock().remove(&rid);
                    if tokio::time::Instant::now() >= deadline || !e.is_temporary() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "sync marker not appended yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl<M: Machine> Shared<M> {
    async fn declare(&self, ch: &lapin::Channel, passive: bool) -> Result<()> {
        ch.queue_declare(
            self.stream.clone(),
            QueueDeclareOptions {
                durable: true,
                passive,
                ..QueueDeclareOptions::default()
            },
            if passive {
                FieldTable::default()
            } else {
                self.arguments.clone()
            },
        )
        .await
        .map_err(|e| amqp_error(&format!("declare stream {}", self.stream), e))?;
        Ok(())
    }

    fn expect_record(&self) -> (String, oneshot::Receiver<Applied<M::Outcome>>) {
        let rid = format!(
            "{}-{}",
            self.writer,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(rid.clone(), tx);
        (rid, rx)
    }

    /// Publishes records (`(record id, _, body)`) in order and waits for all confirms.
    async fn publish_all<T>(
        &self,
        publisher: &CachedChannel,
        records: &[(String, T, &Vec<u8>)],
    ) -> Result<()> {
        let (ch, _, _) = publisher.get().await?;
        let mut confirms = Vec::with_capacity(records.len());
        for (rid, _, body) in records {
            let confirm = ch
                .basic_publish(
                    ShortString::default(),
                    self.stream.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    BasicProperties::default().with_message_id(short(rid.clone())?),
                )
                .await
                .map_err(|e| amqp_error("append to the log", e))?;
            confirms.push(confirm);
        }
        for outcome in futures::future::join_all(confirms).await {
            let c = outcome.map_err(|e| amqp_error("wait for a log append confirm", e))?;
            let nacked = c.is_nack();
            if c.take_message().is_some() {
                return Err(Error::temporary(
                    BACKEND,
                    format!("the log stream {} does not exist (deleted?)", self.stream),
                    None,
                ));
            }
            if nacked {
                return Err(Error::temporary(
                    BACKEND,
                    "the broker refused a log append",
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Waits up to `wait` for the record `rid` to be applied (zero: only looks).
    async fn applied(
        &self,
        rid: &str,
        rx: oneshot::Receiver<Applied<M::Outcome>>,
        wait: Duration,
    ) -> Result<Applied<M::Outcome>> {
        let got = if wait.is_zero() {
            rx.now_or_never()
        } else {
            tokio::time::timeout(wait, rx).await.ok()
        };
        match got {
            Some(Ok(applied)) => Ok(applied),
            Some(Err(_)) | None => {
                self.waiters.lock().remove(rid);
                Err(Error::temporary(
                    BACKEND,
                    format!(
                        "the log stream {} did not deliver record {rid} back within {wait:?}",
                        self.stream
                    ),
                    None,
                ))
            }
        }
    }

    /// The outcome of an operation record.
    async fn outcome(
        &self,
        rid: &str,
        rx: oneshot::Receiver<Applied<M::Outcome>>,
        wait: Duration,
    ) -> Result<M::Outcome> {
        match self.applied(rid, rx, wait).await? {
            Applied::Op(o) => Ok(o),
            Applied::Marker => Err(Error::permanent(
                BACKEND,
                "an operation record came back as a marker",
                None,
            )),
            Applied::Undecodable(e) => Err(Error::permanent(
                BACKEND,
                format!("own log record could not be decoded: {e}"),
                None,
            )),
        }
    }

    /// Applies one delivered record.
    fn apply(&self, offset: u64, rid: Option<&str>, body: &[u8]) {
        let applied = if body.is_empty() {
            Applied::Marker
        } else {
            match serde_json::from_slice::<M::Op>(body) {
                Ok(op) => Applied::Op(self.machine.write().apply(offset, op)),
                Err(e) => {
                    tracing::warn!(stream = %self.stream, offset, error = %e, "skipping a log record that does not decode");
                    Applied::Undecodable(e.to_string())
                }
            }
        };
        *self.applied.lock() = Some(offset);
        if let Some(rid) = rid.filter(|r| r.starts_with(&self.writer)) {
            if let Some(tx) = self.waiters.lock().remove(rid) {
                let _ = tx.send(applied);
            }
        }
    }

    /// Consumes from `next` (or the first record) until the consumer fails; advances `next`.
    async fn consume(&self, session: &Session, next: &mut Option<u64>) -> Result<()> {
        let ch = session.channel(false).await?;
        ch.basic_qos(PREFETCH, Default::default())
            .await
            .map_err(|e| amqp_error("set the log prefetch", e))?;
        // After the first connection, never re-create a deleted stream: following an empty new
        // stream from an old offset would silently skip its records.
        self.declare(&ch, next.is_some()).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            match next {
                Some(o) => AMQPValue::LongLongInt(i64::try_from(*o).unwrap_or(i64::MAX)),
                None => AMQPValue::LongString("first".into()),
            },
        );
        let mut consumer = ch
            .basic_consume(
                self.stream.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| amqp_error("follow the log", e))?;
        let mut unacked: Option<u64> = None;
        let mut unacked_count = 0u16;
        loop {
            let item = match consumer.next().now_or_never() {
                Some(item) => item,
                None => {
                    if let Some(tag) = unacked.take() {
                        ack_up_to(&ch, tag).await?;
                        unacked_count = 0;
                    }
                    consumer.next().await
                }
            };
            let d = match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(amqp_error("follow the log", e)),
                None => {
                    return Err(Error::temporary(
                        BACKEND,
                        format!("the broker cancelled the follower of {}", self.stream),
                        None,
                    ))
                }
            };
            let offset = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-stream-offset"))
                .and_then(|v| match v {
                    AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
                    AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
                    AMQPValue::LongUInt(o) => Some(u64::from(*o)),
                    _ => None,
                });
            match offset {
                // Streams deliver from the start of a chunk: skip what was applied already.
                Some(o) if next.is_some_and(|n| o < n) => {}
                Some(o) => {
                    let rid = d.properties.message_id().as_ref().map(|s| s.as_str());
                    self.apply(o, rid, &d.data);
                    *next = Some(o + 1);
                }
                None => {
                    tracing::warn!(stream = %self.stream, "a log record without x-stream-offset; skipped")
                }
            }
            unacked = Some(d.delivery_tag);
            unacked_count += 1;
            if unacked_count >= PREFETCH / 2 {
                ack_up_to(&ch, d.delivery_tag).await?;
                unacked = None;
                unacked_count = 0;
            }
        }
    }
}

async fn ack_up_to(ch: &lapin::Channel, tag: u64) -> Result<()> {
    ch.basic_ack(tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| amqp_error("ack log records", e))
}

/// Follows the stream for as long as the log lives, resuming after the last applied offset
/// after any interruption (a lost connection, a cancelled consumer).
async fn follow<M: Machine>(shared: Arc<Shared<M>>) {
    let mut next: Option<u64> = None;
    loop {
        let Some(session) = shared.link.session_retrying(|| false).await else {
            return;
        };
        if let Err(e) = shared.consume(&session, &mut next).await {
            tracing::warn!(stream = %shared.stream, error = %e, resume_at = ?next, "log follower interrupted; resuming");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
