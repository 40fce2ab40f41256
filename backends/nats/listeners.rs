//! Whether anyone listens to the engine's events (see [`crate::presence`]), so that a process
//! nobody listens to does not publish its three events per task (measured: about 10 µs of
//! client and 6 µs of server CPU per task, see docs/performance.md).
//!
//! - The probe is a core-NATS request on the events subject with the header `Orch-Probe`,
//!   sent every [`PROBE_EVERY`]: the server answers "no responders" at once when the subject
//!   has no subscriber. Our subscriptions answer probes (and do not pass them on); any other
//!   subscriber (the `nats` tool, another library) gets them as an empty message with that
//!   header and lets the request time out, which counts as "somebody".
//! - The hello: a subscription to the events subject publishes an empty message on
//!   `{prefix}orch.listeners.events` before its `subscribe` returns. Publishers subscribe to
//!   that subject and look at what arrived before each decision, so an event a publisher sends
//!   after it received anything the subscriber sent after subscribing is published (one server
//!   orders both).
//! - Hellos and probe answers are applied under one lock, in arrival order. An answer older
//!   than [`TRUST_ANSWER_FOR`], or hellos that can no longer be followed, mean "maybe".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, Request, RequestErrorKind, Subscriber};
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;

use crate::presence::{LocalListener, Presence};

/// The header that marks a probe.
pub(crate) const PROBE_HEADER: &str = "Orch-Probe";
/// How often publishers ask the server whether anyone listens.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe waits for an answer; a subscriber that does not answer counts as one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe answer is trusted; past that (the probe stopped), every event is published.
const TRUST_ANSWER_FOR: Duration = Duration::from_secs(5);

/// One bus's view of who listens to its events subject.
#[derive(Debug)]
pub(crate) struct Listeners {
    presence: Arc<Presence>,
    client: Client,
    events: String,
    hello: String,
    /// The hello subscription. Every hello is noted, and every probe answer applied, while
    /// holding this lock, so that a hello can never be overwritten by an answer that came
    /// before it.
    hellos: Mutex<Option<Subscriber>>,
    started: AtomicBool,
    /// Set for good when hellos cannot be followed (then every event is published).
    blind: AtomicBool,
    /// When the last probe was answered, in ms since `born` (0: never).
    answered_ms: AtomicU64,
    born: Instant,
}

/// Whether a message is a probe, to be answered rather than delivered.
pub(crate) fn is_probe(m: &Message) -> bool {
    m.reply.is_some()
        && m.headers
            .as_ref()
            .is_some_and(|h| h.get(PROBE_HEADER).is_some())
}

impl Listeners {
    pub(crate) fn new(client: Client, events: String, hello: String) -> Arc<Self> {
        Arc::new(Listeners {
            presence: Arc::new(Presence::default()),
            client,
            events,
            hello,
            hellos: Mutex::new(None),
            started: AtomicBool::new(false),
            blind: AtomicBool::new(false),
            answered_ms: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// Whether `subject` is the one these listeners are about.
    pub(crate) fn covers(&self, subject: &str) -> bool {
        subject == self.events
    }

    /// A subscription of this process to the events subject: counted at once, and announced to
    /// other processes (sent before the caller's flush).
    pub(crate) async fn subscribed(&self) -> Result<LocalListener, async_nats::PublishError> {
        let guard = self.presence.local();
        self.client
            .publish(self.hello.clone(), Vec::new().into())
            .await?;
        Ok(guard)
    }

    /// Whether an event published now may reach someone. Starts the probe on first use.
    pub(crate) fn any(self: &Arc<Self>) -> bool {
        if !self.started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(probe_loop(Arc::downgrade(self)));
                }
                Err(_) => {
                    self.started.store(false, Ordering::Release);
                    return true;
                }
            }
        }
        if self.blind.load(Ordering::Acquire) || self.stale() {
            return true;
        }
        self.take_hellos(None);
        self.presence.any()
    }

    /// Whether the last probe answer is too old to trust (the probe stopped: its runtime shut
    /// down, or the server does not answer).
    fn stale(&self) -> bool {
        let last = self.answered_ms.load(Ordering::Acquire);
        let now = self.born.elapsed().as_millis() as u64;
        last == 0 || now.saturating_sub(last) > TRUST_ANSWER_FOR.as_millis() as u64
    }

    /// Notes the hellos that have arrived (without waiting), then, under the same lock, the
    /// probe answer `answer` (its token and whether anybody answered), if any.
    fn take_hellos(&self, answer: Option<(u64, bool)>) {
        let mut slot = self.hellos.lock();
        if let Some(sub) = slot.as_mut() {
            loop {
                // Unconstrained: a task that used up its budget would see Pending instead.
                match tokio::task::unconstrained(sub.next()).now_or_never() {
                    Some(Some(_)) => self.presence.hello(),
                    Some(None) => {
                        // The subscription ended for good: nobody can be ruled out any more.
                        *slot = None;
                        self.blind.store(true, Ordering::Release);
                        self.presence.hello();
                        return;
                    }
                    None => break,
                }
            }
        }
        if let Some((token, anybody)) = answer {
            self.presence.probed(token, anybody);
            let now = self.born.elapsed().as_millis().max(1) as u64;
            self.answered_ms.store(now, Ordering::Release);
        }
    }
}

/// Subscribes to hellos, then probes every [`PROBE_EVERY`] until the bus is dropped.
async fn probe_loop(listeners: Weak<Listeners>) {
    {
        let Some(l) = listeners.upgrade() else { return };
        match l.client.subscribe(l.hello.clone()).await {
            Ok(sub) => *l.hellos.lock() = Some(sub),
            Err(e) => {
                // Without hellos, "nobody" could hide a new subscriber: stay at "maybe".
                tracing::warn!(error = %e, "cannot follow event subscribers; publishing every event");
                l.blind.store(true, Ordering::Release);
                return;
            }
        }
        if let Err(e) = l.client.flush().await {
            tracing::debug!(error = %e, "flush before the first event probe failed");
        }
    }
    loop {
        let Some(l) = listeners.upgrade() else { return };
        if l.blind.load(Ordering::Acquire) {
            return;
        }
        let token = l.presence.probing();
        let mut headers = HeaderMap::new();
        headers.insert(PROBE_HEADER, "1");
        let request = Request::new().headers(headers).timeout(Some(PROBE_TIMEOUT));
        let anybody = match l.client.send_request(l.events.clone(), request).await {
            Ok(_) => true,
            Err(e) => e.kind() != RequestErrorKind::NoResponders,
        };
        // Hellos the server sent before its answer are in by now; they are noted first.
        l.take_hellos(Some((token, anybody)));
        drop(l);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
