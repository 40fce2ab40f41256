//! One work queue on NATS: its stream, its consumers and the wake-up state of its levels.
//!
//! Stream `{prefix}ORCH_Q_<queue>` (work-queue retention, file storage) holds subjects
//! `{prefix}orch.q.<queue>.1` ..= `.10` (one per priority level) and `.delayed`, and no other
//! (a publish to any other subject under the queue's is refused: nothing would read it). Each has one
//! durable pull consumer with explicit acks (`p1` ..= `p10`, `delayed`); work-queue streams allow
//! only one consumer per subject, and competing workers share it. Enqueuers and the delayed
//! mover send a core-NATS wake-up to `{prefix}orch.wake.<queue>.<level>`; each process
//! subscribes once per queue and keeps one "may have ready messages" bit per level, so a fetch
//! only asks the server about levels that may have something.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, message::PublishMessage as Publish, stream};
use async_nats::{HeaderMap, StatusCode};
use futures::future::try_join_all;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;

use super::blob::BLOB_HEADER;
use super::errors::nats_err;
use super::leases::ACK_WAIT;
use super::{Shared, BACKEND};
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName};

/// Priority levels.
pub(crate) const LEVELS: usize = 10;
/// Bit index of the delayed subject in the wake mask.
pub(crate) const DELAYED: usize = LEVELS;
const ALL: u16 = (1 << (LEVELS + 1)) - 1;
/// Every level is re-checked at least this often: covers messages that become ready without a
/// wake-up (a lease that ended in another process, a nack with delay in another process).
pub(crate) const RESCAN: Duration = Duration::from_millis(250);
/// Timers are rounded up to this, so a burst of deliveries makes few timer entries.
const TIMER_GRAIN: Duration = Duration::from_millis(10);
/// Slack added to timers so the server has made the message available when they fire.
pub(crate) const TIMER_SLACK: Duration = Duration::from_millis(15);
/// Acknowledgement wait of the consumer that moves delayed messages.
const DELAYED_ACK_WAIT: Duration = Duration::from_secs(30);

/// Header with the message id (stable across redeliveries and moves).
pub(crate) const ID_HEADER: &str = "Orch-Id";
/// Header with the priority (on delayed and dead messages; levels are in the subject).
pub(crate) const PRIORITY_HEADER: &str = "Orch-Priority";
/// Header with the due time of a delayed message, in Unix milliseconds.
pub(crate) const DUE_HEADER: &str = "Orch-Due";
/// Header of a wake-up naming the queue handle that sent it.
const ORIGIN_HEADER: &str = "Orch-Origin";
/// Header with the dead-letter reason.
pub(crate) const REASON_HEADER: &str = "Orch-Reason";
/// Header with the delivery count at the time of dead-lettering.
pub(crate) const DELIVERIES_HEADER: &str = "Orch-Deliveries";
/// Header with the time of dead-lettering (RFC 3339).
pub(crate) const DEAD_AT_HEADER: &str = "Orch-Dead-At";

/// A header's value, if the message has the header.
pub(crate) fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// A header value cannot hold CR or LF; long reasons are cut.
fn header_safe(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if s.len() > 4096 {
        let mut cut = 4096;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What a dead letter records.
pub(crate) struct Epitaph<'a> {
    /// The message's headers (a blob reference is carried over).
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) body: Vec<u8>,
    pub(crate) message_id: &'a str,
    pub(crate) priority: Priority,
    pub(crate) deliveries: u32,
    pub(crate) reason: &'a str,
}

/// Which levels may have ready messages.
#[derive(Debug)]
pub(crate) struct WakeState {
    maybe: u16,
    gens: [u64; LEVELS + 1],
    /// When each level was last told of a new message (a local enqueue or a wake-up), as
    /// opposed to a rescan or a timer: see [`WakeState::told_within`].
    told: [Option<Instant>; LEVELS + 1],
    timers: BTreeMap<Instant, u16>,
    next_rescan: Instant,
}

impl WakeState {
    fn new() -> Self {
        WakeState {
            maybe: ALL,
            gens: [0; LEVELS + 1],
            told: [None; LEVELS + 1],
            timers: BTreeMap::new(),
            next_rescan: Instant::now() + RESCAN,
        }
    }

    /// Applies due timers and the periodic rescan; returns the levels to look at and the
    /// generation of each (to clear a bit only if no wake-up came in between).
    pub(crate) fn poll(&mut self, now: Instant) -> (u16, [u64; LEVELS + 1]) {
        while let Some(entry) = self.timers.first_entry() {
            if *entry.key() > now {
                break;
            }
            let bits = entry.remove();
            self.mark_bits(bits);
        }
        if now >= self.next_rescan {
            self.mark_bits(ALL);
            self.next_rescan = now + RESCAN;
        }
        (self.maybe, self.gens)
    }

    pub(crate) fn mark_bits(&mut self, bits: u16) {
        self.maybe |= bits;
        for (i, g) in self.gens.iter_mut().enumerate() {
            if bits & (1 << i) != 0 {
                *g += 1;
            }
        }
    }

    /// Marks `bits` for a message just enqueued (here or, through a wake-up, elsewhere).
    pub(crate) fn mark_told(&mut self, bits: u16, now: Instant) {
        self.mark_bits(bits);
        for (i, t) in self.told.iter_mut().enumerate() {
            if bits & (1 << i) != 0 {
                *t = Some(now);
            }
        }
    }

    /// Whether `level` was told of a new message less than `window` ago: on a replicated
    /// stream the consumer may not see that message yet.
    pub(crate) fn told_within(&self, level: usize, now: Instant, window: Duration) -> bool {
        self.told[level].is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    /// Forgets a level's bit unless a wake-up for it arrived since `gen` was read.
    pub(crate) fn clear_if(&mut self, level: usize, gen: u64) {
        if self.gens[level] == gen {
            self.maybe &= !(1 << level);
        }
    }

    /// Marks `level` at `at` (rounded up to the timer grain).
    pub(crate) fn add_timer(&mut self, at: Instant, level: usize) {
        let grain = TIMER_GRAIN.as_millis() as u64;
        let base = self.next_rescan - RESCAN;
        let offset = at.saturating_duration_since(base).as_millis() as u64;
        let rounded = base + Duration::from_millis(offset.div_ceil(grain) * grain);
        *self.timers.entry(rounded).or_insert(0) |= 1 << level;
    }

    /// When the next timer or rescan is due.
    pub(crate) fn next_wake(&self) -> Instant {
        self.timers
            .keys()
            .next()
            .map_or(self.next_rescan, |t| (*t).min(self.next_rescan))
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pulls from one consumer through one long-lived inbox subscription (`<inbox>.*`), instead of
/// a subscription made and dropped for every pull (which costs the server a SUB and an UNSUB,
/// and a cache flush of its subject index, per fetch). Pulls on one consumer take turns; the
/// engine has one fetch loop per queue, so they rarely wait for each other.
pub(crate) struct Puller {
    client: async_nats::Client,
    context: jetstream::Context,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    request_subject: String,
    state: tokio::sync::Mutex<PullState>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("request_subject", &self.request_subject)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct PullState {
    /// The inbox prefix and its subscription; made again after a pull that did not finish.
    sub: Option<(String, async_nats::Subscriber)>,
    /// Number of the last pull; its reply subject is `<inbox>.<number>`.
    last: u64,
    /// A pull was sent and did not finish (timed out, or its future was dropped): messages for
    /// it may still arrive, so the next pull uses a new inbox.
    dirty: bool,
}

impl Puller {
    fn new(shared: &Shared, consumer: &PullConsumer) -> Self {
        let info = consumer.cached_info();
        Puller {
            client: shared.client.clone(),
            context: shared.js.clone(),
            request_subject: format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                info.stream_name, info.name
            ),
            state: tokio::sync::Mutex::new(PullState::default()),
        }
    }

    /// A no-wait pull of at most `n` messages: what is ready now, possibly nothing.
    pub(crate) async fn pull(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<jetstream::Message>> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        if st.dirty {
            st.sub = None; // dropping the subscriber unsubscribes
            st.dirty = false;
        }
        let (inbox, sub) = match &mut st.sub {
            Some(s) => s,
            None => {
                let inbox = self.client.new_inbox();
                let sub = self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map_err(|e| nats_err("cannot fetch", e))?;
                st.sub.insert((inbox, sub))
            }
        };
        st.last += 1;
        let reply = format!("{inbox}.{}", st.last);
        let body = format!(r#"{{"batch":{n},"no_wait":true}}"#);
        st.dirty = true;
        self.client
            .publish_with_reply(self.request_subject.clone(), reply.clone(), body.into())
            .await
            .map_err(|e| nats_err("cannot fetch", e))?;
        let got = tokio::time::timeout(timeout, receive(sub, &reply, n, &self.context))
            .await
            .map_err(|_| Error::temporary(BACKEND, "fetch timed out", None))??;
        st.dirty = false;
        Ok(got)
    }
}

/// Reads the answer to one pull: up to `n` messages, ended early by a status (404 no
/// messages, 408 request expired). Statuses of earlier pulls (another reply subject) are
/// skipped.
async fn receive(
    sub: &mut async_nats::Subscriber,
    reply: &str,
    n: usize,
    context: &jetstream::Context,
) -> Result<Vec<jetstream::Message>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(m) = sub.next().await else {
            return Err(Error::temporary(BACKEND, "fetch subscription closed", None));
        };
        match m.status {
            None | Some(StatusCode::OK) => out.push(jetstream::Message {
                message: m,
                context: context.clone(),
            }),
            Some(_) if m.subject.as_str() != reply => {}
            Some(StatusCode::NOT_FOUND) | Some(StatusCode::TIMEOUT) => break,
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(code) => {
                return Err(Error::temporary(
                    BACKEND,
                    format!(
                        "fetch answered with status {code}: {}",
                        m.description.as_deref().unwrap_or("")
                    ),
                    None,
                ))
            }
        }
    }
    Ok(out)
}

/// The consumers of a queue, created on its first fetch.
#[derive(Debug)]
pub(crate) struct Consumers {
    pub(crate) levels: Vec<Puller>,
    pub(crate) delayed: Puller,
    _wake: AbortOnDrop,
}

/// A queue's handles, cached by the bus.
#[derive(Debug)]
pub(crate) struct QueueHandle {
    pub(crate) name: QueueName,
    shared: Shared,
    subject_base: String,
    stream: OnceCell<stream::Stream>,
    dead: OnceCell<stream::Stream>,
    consumers: OnceCell<Consumers>,
    pub(crate) wake: Mutex<WakeState>,
    pub(crate) notify: Notify,
    /// Names this handle in its wake-ups, so that it skips its own.
    origin: String,
}

impl QueueHandle {
    pub(crate) fn new(shared: Shared, name: QueueName) -> Arc<Self> {
        Arc::new(QueueHandle {
            subject_base: shared.names.work_subject_base(&name),
            name,
            shared,
            stream: OnceCell::new(),
            dead: OnceCell::new(),
            consumers: OnceCell::new(),
            wake: Mutex::new(WakeState::new()),
            notify: Notify::new(),
            origin: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// The subject of a level (0-based) or of the delayed messages.
    pub(crate) fn subject(&self, level: usize) -> String {
        if level == DELAYED {
            format!("{}.delayed", self.subject_base)
        } else {
            format!("{}.{}", self.subject_base, level + 1)
        }
    }

    /// The subjects a queue's consumers read: its levels and its delayed messages. The work
    /// stream holds exactly these, so that a message on any other subject is refused at
    /// publish time instead of being stored where nothing reads it.
    pub(crate) fn subjects(&self) -> Vec<String> {
        (0..LEVELS)
            .chain([DELAYED])
            .map(|l| self.subject(l))
            .collect()
    }

    /// The work stream, created if missing. A stream made by an older version is brought up
    /// to date: its republish rule dropped, its subjects narrowed to [`Self::subjects`] (it
    /// took every subject under the queue's), and the messages it holds on the subjects no
    /// consumer reads moved to the dead letters.
    pub(crate) async fn stream(&self) -> Result<&stream::Stream> {
        self.stream
            .get_or_try_init(|| async {
                let names = &self.shared.names;
                let config = stream::Config {
                    name: names.work_stream(&self.name),
                    subjects: self.subjects(),
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    ..Default::default()
                };
                let what = || format!("cannot open the stream of queue {}", self.name);
                let stream = super::streams::open(
                    &self.shared,
                    config.clone(),
                    &format!("the stream of queue {}", self.name),
                )
                .await?;
                let found = &stream.cached_info().config;
                // Made by an older version, which woke fetchers by republishing every stored
                // message (4-5x the cost of a plain publish on 2.9): wake-ups are core-NATS
                // messages sent by the enqueuer now.
                let republish = found.republish.is_some();
                let wider: Vec<String> = found
                    .subjects
                    .iter()
                    .filter(|s| !config.subjects.contains(s))
                    .cloned()
                    .collect();
                if !republish && wider.is_empty() && found.subjects == config.subjects {
                    return Ok(stream);
                }
                // The stream's other settings (an operator's limits) are kept.
                let mut update = found.clone();
                update.republish = None;
                update.subjects = config.subjects.clone();
                self.shared
                    .js
                    .update_stream(&update)
                    .await
                    .map_err(|e| nats_err(&what(), e))?;
                let stream = self
                    .shared
                    .js
                    .get_stream(config.name)
                    .await
                    .map_err(|e| nats_err(&what(), e))?;
                self.bury_unread(&stream, &wider).await?;
                Ok(stream)
            })
            .await
    }

    /// Moves the messages a stream holds on the subjects matching `filters` but outside
    /// [`Self::subjects`] to the dead letters (stored there first, then deleted, so a crash
    /// in between leaves a duplicate dead letter, never a lost message).
    async fn bury_unread(&self, stream: &stream::Stream, filters: &[String]) -> Result<()> {
        let what = || format!("cannot clear the unread subjects of queue {}", self.name);
        let read = self.subjects();
        for filter in filters {
            let mut counts = stream
                .info_with_subjects(filter)
                .await
                .map_err(|e| nats_err(&what(), e))?;
            let mut unread = Vec::new();
            while let Some(entry) = counts.next().await {
                let (subject, _) = entry.map_err(|e| nats_err(&what(), e))?;
                if !read.contains(&subject) {
                    unread.push(subject);
                }
            }
            for subject in unread {
                let mut next = 1;
                loop {
                    let m = match stream
                        .raw_message_builder()
                        .sequence(next)
                        .next_by_subject(subject.clone())
                        .send()
                        .await
                    {
                        Ok(m) => m,
                        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                        Err(e) => return Err(nats_err(&what(), e)),
                    };
                    next = m.sequence + 1;
                    let headers = Some(&m.headers);
                    let seq = m.sequence.to_string();
                    let reason = format!(
                        "published on {subject}, which no consumer reads (a queue's subjects \
                         are .1 to .{LEVELS} and .delayed)"
                    );
                    self.store_dead_letter(Epitaph {
                        headers,
                        body: m.payload.to_vec(),
                        message_id: header(headers, ID_HEADER).unwrap_or(&seq),
                        priority: header(headers, PRIORITY_HEADER)
                            .and_then(|p| p.parse::<i64>().ok())
                            .and_then(|p| Priority::new(p).ok())
                            .unwrap_or_default(),
                        deliveries: 0,
                        reason: &reason,
                    })
                    .await?;
                    stream
                        .delete_message(m.sequence)
                        .await
                        .map_err(|e| nats_err(&what(), e))?;
                }
            }
        }
        Ok(())
    }

    /// The core-NATS wake-up subject of a level (0-based) or of the delayed messages.
    fn wake_subject(&self, level: usize) -> String {
        let base = self.shared.names.wake_subject_base(&self.name);
        if level == DELAYED {
            format!("{base}.delayed")
        } else {
            format!("{base}.{}", level + 1)
        }
    }

    /// Tells every process's fetchers of this queue that the levels in `levels` have new
    /// messages and that delayed messages fall due at `due` (Unix ms). Core NATS, at most
    /// once, nothing awaited: a lost wake-up is covered by the periodic rescan. This process's
    /// own fetchers are told directly, and skip their own wake-ups.
    pub(crate) async fn announce(&self, levels: u16, due: &[i64]) {
        {
            let mut wake = self.wake.lock();
            wake.mark_told(levels, Instant::now());
            for at in due {
                wake.add_timer(instant_at_unix_ms(*at) + TIMER_SLACK, DELAYED);
            }
        }
        self.notify.notify_waiters();
        let mut sends: Vec<(String, async_nats::HeaderMap)> = Vec::new();
        for level in 0..LEVELS {
            if levels & (1 << level) != 0 {
                let mut h = async_nats::HeaderMap::new();
                h.insert(ORIGIN_HEADER, self.origin.as_str());
                sends.push((self.wake_subject(level), h));
            }
        }
        let mut dues: Vec<i64> = due.to_vec();
        dues.sort_unstable();
        dues.dedup();
        for at in dues {
            let mut h = async_nats::HeaderMap::new();
            h.insert(ORIGIN_HEADER, self.origin.as_str());
            h.insert(DUE_HEADER, at.to_string().as_str());
            sends.push((self.wake_subject(DELAYED), h));
        }
        for (subject, headers) in sends {
            if let Err(e) = self
                .shared
                .client
                .publish_with_headers(subject, headers, Vec::new().into())
                .await
            {
                tracing::debug!(queue = %self.name, error = %e, "cannot send a wake-up");
            }
        }
    }

    /// The dead-letter stream, created if missing (limits retention, newest 100,000 kept).
    pub(crate) async fn dead_stream(&self) -> Result<&stream::Stream> {
        self.dead
            .get_or_try_init(|| async {
                let names = &self.shared.names;
                let config = stream::Config {
                    name: names.dead_stream(&self.name),
                    subjects: vec![names.dead_subject(&self.name)],
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    max_messages: 100_000,
                    discard: stream::DiscardPolicy::Old,
                    allow_direct: true,
                    ..Default::default()
                };
                super::streams::open(
                    &self.shared,
                    config,
                    &format!("the dead-letter stream of queue {}", self.name),
                )
                .await
            })
            .await
    }

    /// Stores a dead letter in the queue's dead-letter stream and waits for the server to
    /// confirm it.
    pub(crate) async fn store_dead_letter(&self, e: Epitaph<'_>) -> Result<()> {
        self.dead_stream().await?;
        tracing::warn!(
            queue = %self.name,
            message_id = e.message_id,
            reason = e.reason,
            "message dead-lettered"
        );
        let mut publish = Publish::build()
            .payload(e.body.into())
            .header(ID_HEADER, e.message_id)
            .header(PRIORITY_HEADER, e.priority.get().to_string().as_str())
            .header(REASON_HEADER, header_safe(e.reason).as_str())
            .header(DELIVERIES_HEADER, e.deliveries.to_string().as_str())
            .header(DEAD_AT_HEADER, chrono::Utc::now().to_rfc3339().as_str());
        if let Some(b) = header(e.headers, BLOB_HEADER) {
            publish = publish.header(BLOB_HEADER, b);
        }
        // With a `Nats-Msg-Id` of its own, so that a resend after a lost answer (a stream
        // just created whose subject a node does not route yet, a leader lost) is stored once.
        let publish = publish.message_id(uuid::Uuid::new_v4().simple().to_string().as_str());
        super::retry::within_budget("dead-letter", || async {
            self.shared
                .js
                .send_publish(self.shared.names.dead_subject(&self.name), publish.clone())
                .await
                .map_err(|e| nats_err("cannot dead-letter", e))?
                .await
                .map_err(|e| nats_err("cannot dead-letter", e))
        })
        .await?;
        Ok(())
    }

    fn level_config(&self, level: usize, ack_wait: Duration) -> pull::Config {
        pull::Config {
            durable_name: Some(if level == DELAYED {
                "delayed".to_string()
            } else {
                format!("p{}", level + 1)
            }),
            filter_subject: self.subject(level),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait,
            // Never give up: the bus moves a message to the dead letters itself when it sees
            // one delivery too many, so the server never drops anything silently.
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        }
    }

    /// The consumers, created (and the wake-up subscription started) on first use. Existing
    /// consumers with another configuration are updated to this one.
    pub(crate) async fn consumers(self: &Arc<Self>) -> Result<&Consumers> {
        let me = self.clone();
        self.consumers
            .get_or_try_init(|| async move {
                let stream = me.stream().await?;
                let wake_subject = format!("{}.>", me.shared.names.wake_subject_base(&me.name));
                let mut sub = me
                    .shared
                    .client
                    .subscribe(wake_subject)
                    .await
                    .map_err(|e| nats_err("cannot subscribe to wake-ups", e))?;
                let levels = try_join_all((0..LEVELS).map(|l| {
                    let config = me.level_config(l, ACK_WAIT);
                    async move {
                        stream
                            .create_consumer(config)
                            .await
                            .map_err(|e| nats_err("cannot create a consumer", e))
                    }
                }))
                .await?;
                let delayed = stream
                    .create_consumer(me.level_config(DELAYED, DELAYED_ACK_WAIT))
                    .await
                    .map_err(|e| nats_err("cannot create the delayed consumer", e))?;
                let weak: Weak<QueueHandle> = Arc::downgrade(&me);
                let task = tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let Some(q) = weak.upgrade() else { break };
                        q.on_wake(&msg);
                    }
                });
                Ok(Consumers {
                    levels: levels.iter().map(|c| Puller::new(&me.shared, c)).collect(),
                    delayed: Puller::new(&me.shared, &delayed),
                    _wake: AbortOnDrop(task),
                })
            })
            .await
    }

    fn on_wake(&self, msg: &async_nats::Message) {
        let origin = msg.headers.as_ref().and_then(|h| h.get(ORIGIN_HEADER));
        if origin.is_some_and(|o| o.as_str() == self.origin) {
            return; // ours: already applied by `announce`
        }
        let Some(token) = msg.subject.as_str().rsplit('.').next() else {
            return;
        };
        if token == "delayed" {
            let due = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(DUE_HEADER))
                .and_then(|v| v.as_str().parse::<i64>().ok());
            if let Some(due) = due {
                let at = instant_at_unix_ms(due) + TIMER_SLACK;
                self.wake.lock().add_timer(at, DELAYED);
                // Waiters recompute their sleep to include the new timer.
                self.notify.notify_waiters();
            }
            return;
        }
        if let Ok(level) = token.parse::<usize>() {
            if (1..=LEVELS).contains(&level) {
                self.wake.lock().mark_told(1 << (level - 1), Instant::now());
                self.notify.notify_waiters();
            }
        }
    }
}

/// The local instant matching a Unix time in milliseconds.
pub(crate) fn instant_at_unix_ms(ms: i64) -> Instant {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let now = Instant::now();
    if ms <= now_ms {
        now
    } else {
        now + Duration::from_millis((ms - now_ms) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_bit_survives_a_wake_up_that_raced_with_its_poll() {
        let mut w = WakeState::new();
        let (mask, gens) = w.poll(Instant::now());
        assert_eq!(mask, ALL);
        w.mark_bits(1 << 3);
        w.clear_if(3, gens[3]);
        w.clear_if(4, gens[4]);
        let (mask, _) = w.poll(Instant::now());
        assert!(mask & (1 << 3) != 0);
        assert!(mask & (1 << 4) == 0);
    }

    #[tokio::test]
    async fn timers_mark_their_level_when_due() {
        tokio::time::pause();
        let mut w = WakeState::new();
        let now = Instant::now();
        let (_, gens) = w.poll(now);
        for (l, g) in gens.iter().enumerate() {
            w.clear_if(l, *g);
        }
        w.add_timer(now + Duration::from_millis(30), 2);
        assert!(w.next_wake() >= now + Duration::from_millis(30));
        assert_eq!(w.poll(now + Duration::from_millis(5)).0, 0);
        assert_eq!(w.poll(now + Duration::from_millis(40)).0, 1 << 2);
    }
}
