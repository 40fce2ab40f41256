//! A replicated state machine on a RabbitMQ stream: every change is appended to the stream as a
//! record, every process follows the stream from its first offset and applies the records in log
//! order to an in-process view. Since all replicas apply the same records in the same order with
//! the same deterministic rules, they agree on every outcome; the writer of a record learns its
//! outcome when its own replica applies it (each record carries a unique id).
//!
//! Writes are group-committed by a [`Writer`] (see `writer.rs`).
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
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::link::{amqp_error, CachedChannel, Link, Session, BACKEND};
use super::writer::Item;
pub(crate) use super::writer::{Writer, MAX_RECORDS_PER_MESSAGE};
use crate::error::{Error, Result};

/// Records delivered to the follower before it must ack (streams require a prefetch).
const PREFETCH: u16 = 500;
/// How long a writer waits for its own record to come back before giving up (temporary error).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sync keeps retrying to append its marker (the broker unreachable) before it
/// returns a temporary error: reads should fail fast while the broker is away.
const SYNC_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// How long a follower waits for a stream's first message when it checks skipped offsets.
const FIRST_OFFSET_TIMEOUT: Duration = Duration::from_secs(5);
/// A record awaited this long without the follower receiving anything makes it re-subscribe
/// (and a marker is appended): on a RabbitMQ 3.10 cluster a stream consumer was seen to
/// receive nothing at all although its records were confirmed (cause not found; see
/// docs/backends/rabbitmq.md, "A follower that stalls is re-subscribed").
const STALL_AFTER: Duration = Duration::from_secs(5);
/// Where a follower starts reading a stream when it has applied nothing yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// The stream's first record still held.
    First,
    /// The first chunk written at or after this Unix time, in seconds.
    Since(u64),
}

/// The deterministic rules a log's records are applied with.
pub(crate) trait Machine: Send + Sync + 'static {
    /// A record's content.
    type Op: Serialize + DeserializeOwned + Send + Sync;
    /// What applying a record decided (sent to its writer).
    type Outcome: Send + 'static;
    /// Applies `op`, found at `position` in the log: the stream offset of its message times
    /// [`MAX_RECORDS_PER_MESSAGE`] plus its index in the message. Positions grow strictly in log
    /// order.
    fn apply(&mut self, position: u64, op: Self::Op) -> Self::Outcome;
}

/// One record as stored: its id and its operation (`None` for a sync marker).
#[derive(Deserialize)]
pub(crate) struct Envelope<Op> {
    pub(crate) rid: String,
    pub(crate) op: Option<Op>,
}

enum Applied<O> {
    Op(O),
    Marker,
}

struct Shared<M: Machine> {
    link: Arc<Link>,
    stream: ShortString,
    arguments: FieldTable,
    writer_id: String,
    seq: AtomicU64,
    /// Where to start while nothing was applied.
    origin: Start,
    machine: RwLock<M>,
    waiters: Mutex<HashMap<String, oneshot::Sender<Applied<M::Outcome>>>>,
    /// Offset of the last message applied (None before the first).
    applied: Mutex<Option<u64>>,
    /// Times the follower found records removed by retention before it read them.
    missing: AtomicU64,
    /// When the follower last received a message (or subscribed).
    last_delivery: Mutex<tokio::time::Instant>,
    /// Raised by a waiter whose record is late: the follower re-subscribes if it has received
    /// nothing for [`STALL_AFTER`].
    stalled: tokio::sync::Notify,
    /// Times the follower re-subscribed because it received nothing while a record was late.
    stall_restarts: AtomicU64,
    /// The writer's queue, for the markers appended when a record is late.
    nudge: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Item>>,
    /// Test hook: the current subscription drops what it receives (a stalled consumer).
    #[cfg(test)]
    deaf: std::sync::atomic::AtomicBool,
}

/// A stream-backed replicated state machine. Dropping it stops following the stream.
pub(crate) struct Log<M: Machine> {
    shared: Arc<Shared<M>>,
    writer: Writer,
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
            .field("applied_offset", &*self.shared.applied.lock())
            .finish_non_exhaustive()
    }
}

/// A [`Log`] on a stream without retention, opened on first use and then kept: the operator's
/// small replicated sets (the paused queues and limits, the schedules).
pub(crate) struct LazyLog<M: Machine> {
    link: Arc<Link>,
    stream: String,
    log: tokio::sync::OnceCell<Log<M>>,
}

impl<M: Machine + Default> LazyLog<M> {
    pub(crate) fn new(link: Arc<Link>, stream: String) -> Self {
        LazyLog {
            link,
            stream,
            log: tokio::sync::OnceCell::new(),
        }
    }

    /// The log, opened (and caught up with) the first time.
    pub(crate) async fn get(&self) -> Result<&Log<M>> {
        self.log
            .get_or_try_init(|| {
                Log::open(
                    self.link.clone(),
                    self.stream.clone(),
                    stream_arguments(&[]),
                    M::default(),
                )
            })
            .await
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
        Self::open_from(link, stream, arguments, machine, None).await
    }

    /// Like [`Log::open`], starting from offset `start` with `machine` as the state the records
    /// before it built (a snapshot).
    pub(crate) async fn open_from(
        link: Arc<Link>,
        stream: String,
        arguments: FieldTable,
        machine: M,
        start: Option<u64>,
    ) -> Result<Self> {
        Self::open_at(link, stream, arguments, machine, start, Start::First).await
    }

    /// Like [`Log::open_from`]; with `start` None, the follower begins at `origin` (a
    /// timestamp) instead of the first record.
    pub(crate) async fn open_at(
        link: Arc<Link>,
        stream: String,
        arguments: FieldTable,
        machine: M,
        start: Option<u64>,
        origin: Start,
    ) -> Result<Self> {
        let stream = super::link::short(stream)?;
        let shared = Arc::new(Shared {
            link: link.clone(),
            stream: stream.clone(),
            arguments,
            writer_id: uuid::Uuid::new_v4().simple().to_string(),
            seq: AtomicU64::new(0),
            origin,
            machine: RwLock::new(machine),
            waiters: Mutex::new(HashMap::new()),
            applied: Mutex::new(None),
            missing: AtomicU64::new(0),
            last_delivery: Mutex::new(tokio::time::Instant::now()),
            stalled: tokio::sync::Notify::new(),
            stall_restarts: AtomicU64::new(0),
            nudge: std::sync::OnceLock::new(),
            #[cfg(test)]
            deaf: std::sync::atomic::AtomicBool::new(false),
        });
        let session = shared.link.session().await?;
        let ch = session.channel(false).await?;
        shared.declare(&ch, false).await?;
        let _ = ch.close(200, "declared".into()).await;
        let follower = tokio::spawn(follow(shared.clone(), start));
        let writer = Writer::new(stream, CachedChannel::new(link, true, None));
        let _ = shared.nudge.set(writer.tx.clone());
        let log = Log {
            shared,
            writer,
            follower,
        };
        log.sync().await?;
        Ok(log)
    }

    /// A writer publishing this log's records on another confirm channel (for records that
    /// must travel on a particular connection).
    pub(crate) fn writer_on(&self, publisher: CachedChannel) -> Writer {
        Writer::new(self.shared.stream.clone(), publisher)
    }

    /// How many times the follower found records that retention had removed before this
    /// process read them (each logged as an error).
    #[cfg(test)]
    pub(crate) fn missing_reports(&self) -> u64 {
        self.shared.missing.load(Ordering::Relaxed)
    }

    /// Reads the view.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.shared.machine.read())
    }

    /// Changes the view outside the log (used to take a replayed snapshot catalog apart).
    pub(crate) fn read_mut<R>(&self, f: impl FnOnce(&mut M) -> R) -> R {
        f(&mut self.shared.machine.write())
    }

    /// Reads the view together with the offset of the last message applied to it (a
    /// consistent cut: the follower cannot apply anything while `f` runs).
    pub(crate) fn read_at<R>(&self, f: impl FnOnce(&M, Option<u64>) -> R) -> R {
        let machine = self.shared.machine.read();
        let offset = *self.shared.applied.lock();
        f(&machine, offset)
    }

    /// Appends one record and returns what applying it decided.
    pub(crate) async fn submit(&self, op: &M::Op) -> Result<M::Outcome> {
        self.submit_via(&self.writer, std::slice::from_ref(op))
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

    /// Appends several records in order and returns each one's outcome.
    pub(crate) async fn submit_many(&self, ops: &[M::Op]) -> Result<Vec<Result<M::Outcome>>> {
        self.submit_via(&self.writer, ops).await
    }

    /// Like [`Log::submit_many`], through `writer`.
    pub(crate) async fn submit_via(
        &self,
        writer: &Writer,
        ops: &[M::Op],
    ) -> Result<Vec<Result<M::Outcome>>> {
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            let body = serde_json::to_vec(op).map_err(|e| {
                Error::permanent(
                    BACKEND,
                    format!("cannot encode a log record: {e}"),
                    Some(Box::new(e) as _),
                )
            })?;
            pending.push(self.enqueue(writer, body)?);
        }
        let mut out = Vec::with_capacity(pending.len());
        let mut failed: Option<(bool, String)> = None;
        let mut awaiting = Vec::with_capacity(pending.len());
        for (rid, published, applied) in pending {
            match published.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some((true, "the log writer stopped".to_string()))),
            }
            awaiting.push((rid, applied));
        }
        match failed {
            None => {
                for (rid, applied) in awaiting {
                    out.push(self.shared.outcome(&rid, applied, APPLY_TIMEOUT).await);
                }
            }
            Some((temporary, e)) => {
                // Some records may have reached the log before the failure. Once a marker
                // appended after it is applied, each record has either been applied (its waiter
                // fired) or is lost for good.
                tracing::warn!(error = %e, stream = %self.shared.stream, "log append interrupted; checking what reached the log");
                let synced = self.sync().await;
                for (rid, applied) in awaiting {
                    let r = match self.shared.outcome(&rid, applied, Duration::ZERO).await {
                        Ok(o) => Ok(o),
                        Err(_) => {
                            let message = match &synced {
                                Ok(()) => format!("log append failed and did not reach the log: {e}"),
                                Err(s) => format!("log append failed ({e}); whether it reached the log is unknown ({s})"),
                            };
                            Err(if temporary {
                                Error::temporary(BACKEND, message, None)
                            } else {
                                Error::permanent(BACKEND, message, None)
                            })
                        }
                    };
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Registers a record and hands it to `writer`.
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        writer: &Writer,
        op: Vec<u8>,
    ) -> Result<(
        String,
        oneshot::Receiver<std::result::Result<(), (bool, String)>>,
        oneshot::Receiver<Applied<M::Outcome>>,
    )> {
        let rid = format!(
            "{}-{}",
            self.shared.writer_id,
            self.shared.seq.fetch_add(1, Ordering::Relaxed)
        );
        let (applied_tx, applied_rx) = oneshot::channel();
        self.shared.waiters.lock().insert(rid.clone(), applied_tx);
        let (published_tx, published_rx) = oneshot::channel();
        let item = Item {
            rid: rid.clone(),
            op,
            published: published_tx,
        };
        if writer.tx.send(item).is_err() {
            self.shared.waiters.lock().remove(&rid);
            return Err(Error::permanent(BACKEND, "the log writer stopped", None));
        }
        Ok((rid, published_rx, applied_rx))
    }

    /// Waits until every record appended before this call is in the view (read-your-writes
    /// across processes): one marker record (packed with other records under load) and its
    /// delivery.
    pub(crate) async fn sync(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
        let retry_until = tokio::time::Instant::now() + SYNC_RETRY_BUDGET;
        loop {
            let (rid, published, applied) = self.enqueue(&self.writer, Vec::new())?;
            let failure = match published.await {
                Ok(Ok(())) => None,
                Ok(Err((temporary, e))) => Some((temporary, e)),
                Err(_) => Some((false, "the log writer stopped".to_string())),
            };
            match failure {
                None => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    return self.shared.applied(&rid, applied, left).await.map(|_| ());
                }
                Some((temporary, e)) => {
                    self.shared.waiters.lock().remove(&rid);
                    if tokio::time::Instant::now() >= retry_until || !temporary {
                        let message = format!("log sync failed: {e}");
                        return Err(if temporary {
                            Error::temporary(BACKEND, message, None)
                        } else {
                            Error::permanent(BACKEND, message, None)
                        });
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
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = rx;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(left.min(STALL_AFTER), &mut rx).await {
                    Ok(got) => break Some(got),
                    Err(_) if left <= STALL_AFTER => break None,
                    Err(_) => self.stall_suspected(rid),
                }
            }
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

    /// A record is late: wakes the follower (which re-subscribes if it has received nothing
    /// lately) and appends a marker nobody waits for, so that a consumer waiting for the
    /// stream's next write gets one (in the stall reproduced so far neither helped alone; the
    /// re-attach from the first record did the rest).
    fn stall_suspected(&self, rid: &str) {
        tracing::debug!(stream = %self.stream, rid, "a log record is late; checking the follower");
        self.stalled.notify_one();
        if let Some(tx) = self.nudge.get() {
            let (published, _) = oneshot::channel();
            let _ = tx.send(Item {
                rid: "nudge".to_string(),
                op: Vec::new(),
                published,
            });
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
        }
    }

    /// Applies one delivered message (a batch of records) at `offset`.
    fn apply(&self, offset: u64, body: &[u8]) {
        let records: Vec<Envelope<M::Op>> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(stream = %self.stream, offset, error = %e, "skipping a log message that does not decode");
                *self.applied.lock() = Some(offset);
                return;
            }
        };
        let mut resolved = Vec::new();
        {
            let mut machine = self.machine.write();
            *self.applied.lock() = Some(offset);
            for (index, record) in records.into_iter().enumerate() {
                let position = offset
                    .saturating_mul(MAX_RECORDS_PER_MESSAGE as u64)
                    .saturating_add(index as u64);
                let applied = match record.op {
                    Some(op) => Applied::Op(machine.apply(position, op)),
                    None => Applied::Marker,
                };
                if record.rid.starts_with(&self.writer_id) {
                    resolved.push((record.rid, applied));
                }
            }
        }
        if !resolved.is_empty() {
            let mut waiters = self.waiters.lock();
            for (rid, applied) in resolved {
                if let Some(tx) = waiters.remove(&rid) {
                    let _ = tx.send(applied);
                }
            }
        }
    }

    /// The offsets from `expected` to `got` (excluded) were not delivered. That alone does not
    /// mean records are missing: a stream also stores entries that are not messages and take
    /// up offsets, which a consumer never sees (RabbitMQ's stream store, osiris, starts every
    /// new segment with a writer-tracking chunk: one skipped offset per segment, e.g. every
    /// 1 MB of the lock log). Records are missing only if retention removed them, that is if
    /// the stream's first message now lies past `expected`; this asks the stream for it.
    async fn check_gap(&self, session: &Session, expected: u64, got: u64) {
        match self.first_offset(session).await {
            Ok(first) if first <= expected => {
                tracing::debug!(stream = %self.stream, expected, got, first, "offsets without a message (stream bookkeeping); nothing is missing");
            }
            Ok(first) => {
                self.missing.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream = %self.stream, expected, got, first, "log records are missing (removed by retention before this process read them); the view may be incomplete");
            }
            Err(e) => {
                tracing::warn!(stream = %self.stream, expected, got, error = %e, "offsets were skipped and the stream's first offset could not be read: records may be missing (removed by retention)");
            }
        }
    }

    /// The offset of the first message the stream still holds, read with a one-message
    /// consumer from `first` on a channel of its own.
    async fn first_offset(&self, session: &Session) -> Result<u64> {
        let ch = session.channel(false).await?;
        let result = async {
            ch.basic_qos(1, Default::default())
                .await
                .map_err(|e| amqp_error("set the prefetch of a stream probe", e))?;
            let mut args = FieldTable::default();
            args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
            let mut consumer = ch
                .basic_consume(
                    self.stream.clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .map_err(|e| amqp_error("read the first offset of a stream", e))?;
            let first = tokio::time::timeout(FIRST_OFFSET_TIMEOUT, consumer.next()).await;
            match first {
                Ok(Some(Ok(d))) => delivery_offset(&d).ok_or_else(|| {
                    Error::temporary(BACKEND, "a stream message without x-stream-offset", None)
                }),
                Ok(Some(Err(e))) => Err(amqp_error("read the first offset of a stream", e)),
                Ok(None) => Err(Error::temporary(
                    BACKEND,
                    "the broker cancelled a stream probe",
                    None,
                )),
                Err(_) => Err(Error::temporary(
                    BACKEND,
                    format!("the stream sent no message within {FIRST_OFFSET_TIMEOUT:?}"),
                    None,
                )),
            }
        }
        .await;
        let _ = ch.close(200, "probed".into()).await;
        result
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
            match (*next, self.origin) {
                (Some(o), _) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
                (None, Start::First) => AMQPValue::LongString("first".into()),
                // A timestamp subscription that stalled before delivering anything is made
                // again from the first record: on RabbitMQ 3.10 a reader attached by timestamp
                // to a stream created a moment ago can wait forever (seen about once in 80
                // connects on a loaded 3-node cluster); reading from the first record costs
                // more but is always right.
                (None, Start::Since(_)) if self.stall_restarts.load(Ordering::Relaxed) > 0 => {
                    AMQPValue::LongString("first".into())
                }
                (None, Start::Since(seconds)) => AMQPValue::Timestamp(seconds),
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
        *self.last_delivery.lock() = tokio::time::Instant::now();
        #[cfg(test)]
        self.deaf.store(false, Ordering::Relaxed);
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
                    tokio::select! {
                        item = consumer.next() => item,
                        () = self.stalled.notified() => {
                            if self.last_delivery.lock().elapsed() < STALL_AFTER {
                                continue;
                            }
                            self.stall_restarts.fetch_add(1, Ordering::Relaxed);
                            let _ = ch.close(200, "re-subscribing".into()).await;
                            return Err(Error::temporary(
                                BACKEND,
                                format!(
                                    "the follower of {} received nothing for {STALL_AFTER:?} while a record was awaited; re-subscribing",
                                    self.stream
                                ),
                                None,
                            ));
                        }
                    }
                }
            };
            #[cfg(test)]
            if self.deaf.load(Ordering::Relaxed) {
                continue;
            }
            if matches!(item, Some(Ok(_))) {
                *self.last_delivery.lock() = tokio::time::Instant::now();
            }
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
            match delivery_offset(&d) {
                // Streams deliver from the start of a chunk: skip what was applied already.
                Some(o) if next.is_some_and(|n| o < n) => {}
                Some(o) => {
                    if let Some(n) = next.filter(|n| o > *n) {
                        self.check_gap(session, n, o).await;
                    }
                    self.apply(o, &d.data);
                    *next = Some(o + 1);
                }
                None => {
                    tracing::warn!(stream = %self.stream, "a log message without x-stream-offset; skipped")
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

/// A stream message's offset (its `x-stream-offset` header).
fn delivery_offset(d: &lapin::message::Delivery) -> Option<u64> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
            AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
            AMQPValue::LongUInt(o) => Some(u64::from(*o)),
            _ => None,
        })
}

async fn ack_up_to(ch: &lapin::Channel, tag: u64) -> Result<()> {
    ch.basic_ack(tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| amqp_error("ack log records", e))
}

/// Follows the stream for as long as the log lives, resuming after the last applied offset
/// after any interruption (a lost connection, a cancelled consumer).
async fn follow<M: Machine>(shared: Arc<Shared<M>>, start: Option<u64>) {
    let mut next: Option<u64> = start;
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(session) = shared.link.session_retrying(|| false).await else {
            return;
        };
        let before = next;
        if let Err(e) = shared.consume(&session, &mut next).await {
            tracing::warn!(stream = %shared.stream, error = %e, resume_at = ?next, "log follower interrupted; resuming");
            // Back off while nothing progresses (a deleted stream, a broker refusing us).
            pause = if next != before {
                Duration::from_millis(50)
            } else {
                (pause * 2).min(Duration::from_secs(5))
            };
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::harness::{broker_url, unique_prefix, BrokerKind};

    /// Remembers the stream offset of every record applied.
    #[derive(Default)]
    struct Offsets(Vec<u64>);

    impl Machine for Offsets {
        type Op = String;
        type Outcome = ();
        fn apply(&mut self, position: u64, _op: String) {
            self.0.push(position / MAX_RECORDS_PER_MESSAGE as u64);
        }
    }

    async fn link(prefix: &str) -> Arc<Link> {
        let url = url::Url::parse(&broker_url(BrokerKind::Amqp).await).expect("test URL");
        let opts = crate::bundle::ConnectOptions {
            prefix: prefix.to_string(),
            ..Default::default()
        };
        super::super::link_for(&url, &opts, "log-test")
            .expect("link")
            .0
    }

    async fn delete_stream(link: &Link, stream: &str) {
        let session = link.session().await.expect("session");
        let ch = session.channel(false).await.expect("channel");
        ch.queue_delete(stream.into(), Default::default())
            .await
            .expect("delete the test stream");
    }

    /// Appends `n` records of about 200 bytes, one stream message each.
    async fn append(log: &Log<Offsets>, n: usize) {
        for i in 0..n {
            log.submit(&format!("{i:0>200}")).await.expect("append");
        }
    }

    /// A stream whose segments are small rolls over often; each new segment starts with a
    /// bookkeeping entry that takes an offset and is never delivered. The follower skips those
    /// offsets without reporting missing records (it used to log a false ERROR at each roll).
    #[tokio::test]
    async fn offsets_skipped_at_a_segment_roll_are_not_missing_records() {
        let prefix = unique_prefix("log_gap");
        let link = link(&prefix).await;
        let stream = format!("{prefix}gaps");
        let args = stream_arguments(&[(
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(4_000),
        )]);
        let log = Log::open(link.clone(), stream.clone(), args, Offsets::default())
            .await
            .expect("open the log");
        append(&log, 200).await;
        log.sync().await.expect("sync");
        let offsets = log.read(|m| m.0.clone());
        let gaps = offsets.windows(2).filter(|w| w[1] > w[0] + 1).count();
        let missing = log.missing_reports();
        drop(log);
        delete_stream(&link, &stream).await;
        assert_eq!(offsets.len(), 200, "every record was applied");
        assert!(
            gaps > 0,
            "the segments rolled over without skipping an offset: {offsets:?}"
        );
        assert_eq!(
            missing, 0,
            "{gaps} segment rolls were reported as missing records"
        );
    }

    /// A follower whose subscription stops delivering (a replica that missed the notice of
    /// its committed offset) is re-subscribed once a record is late: the append completes
    /// instead of failing after the 30 s apply timeout.
    #[tokio::test]
    async fn a_stalled_follower_resubscribes_and_the_late_record_applies() {
        let prefix = unique_prefix("log_stall");
        let link = link(&prefix).await;
        let stream = format!("{prefix}stall");
        let log = Log::open(
            link.clone(),
            stream.clone(),
            stream_arguments(&[]),
            Offsets::default(),
        )
        .await
        .expect("open the log");
        append(&log, 3).await;
        log.shared.deaf.store(true, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let late = log.submit(&"late".to_string()).await;
        let took = started.elapsed();
        let applied = log.read(|m| m.0.len());
        drop(log);
        delete_stream(&link, &stream).await;
        late.unwrap_or_else(|e| panic!("the late record failed after {took:?}: {e}"));
        assert_eq!(applied, 4, "every record was applied once");
    }

    /// Records really removed by retention before the follower read them are still reported:
    /// a follower starting at offset 0 of a stream whose first segments are gone.
    #[tokio::test]
    async fn records_removed_by_retention_are_reported_missing() {
        let prefix = unique_prefix("log_retention");
        let link = link(&prefix).await;
        let stream = format!("{prefix}retained");
        let args = || {
            stream_arguments(&[
                (
                    "x-stream-max-segment-size-bytes",
                    AMQPValue::LongLongInt(4_000),
                ),
                ("x-max-length-bytes", AMQPValue::LongLongInt(12_000)),
            ])
        };
        let writer = Log::open(link.clone(), stream.clone(), args(), Offsets::default())
            .await
            .expect("open the log");
        append(&writer, 200).await;
        writer.sync().await.expect("sync");
        let late = Log::open_from(
            link.clone(),
            stream.clone(),
            args(),
            Offsets::default(),
            Some(0),
        )
        .await
        .expect("open the log from offset 0");
        let first = late.read(|m| m.0.first().copied());
        let missing = late.missing_reports();
        drop((writer, late));
        delete_stream(&link, &stream).await;
        assert!(
            first.is_some_and(|f| f > 0),
            "retention removed nothing (first offset read: {first:?})"
        );
        assert_eq!(missing, 1, "the removed records were not reported");
    }
}
