//! Per-delivery leases on top of a fixed consumer AckWait.
//!
//! JetStream's AckWait is one duration per consumer, and a work-queue stream allows one consumer
//! per subject, so it cannot be the lease of each fetch. Instead the consumers' AckWait is a
//! fixed crash-detection timeout ([`ACK_WAIT`]) and this process keeps each delivery's own
//! lease: when a lease ends without an ack, nack or extension, the keeper sends a NAK, so the
//! message is delivered again at once (counting one delivery, as a lease expiry does); while a
//! lease outlives the server's AckWait, the keeper sends in-progress acks (`+WPI`) to hold the
//! message. If this process dies, its leases end at the server's AckWait instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::queue::QueueHandle;

/// The AckWait of every level consumer: how long a message stays with a process that died.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(30);
/// In-progress acks are sent when the server's AckWait has this much left.
const KEEPALIVE_MARGIN: Duration = Duration::from_secs(10);

struct Held {
    reply: String,
    deadline: Instant,
    /// When the server's AckWait for it ends (delivery or last `+WPI` plus [`ACK_WAIT`]).
    server_until: Instant,
    queue: Weak<QueueHandle>,
    level: usize,
    slot: (Instant, u64),
}

impl Held {
    fn next_action(&self) -> Instant {
        let keepalive = self.server_until - KEEPALIVE_MARGIN;
        self.deadline.min(keepalive)
    }
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    timeline: BTreeMap<(Instant, u64), String>,
    next_id: u64,
}

impl State {
    fn schedule(&mut self, receipt: &str) {
        let Some(h) = self.held.get_mut(receipt) else {
            return;
        };
        self.timeline.remove(&h.slot);
        self.next_id += 1;
        h.slot = (h.next_action(), self.next_id);
        self.timeline.insert(h.slot, receipt.to_string());
    }

    fn remove(&mut self, receipt: &str) -> Option<Held> {
        let h = self.held.remove(receipt)?;
        self.timeline.remove(&h.slot);
        Some(h)
    }
}

/// Keeps the leases of the deliveries this process holds.
pub(crate) struct LeaseKeeper {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("held", &self.state.lock().held.len())
            .finish()
    }
}

impl LeaseKeeper {
    pub(crate) fn start(client: async_nats::Client) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn(run(client, state.clone(), changed.clone()));
        LeaseKeeper {
            state,
            changed,
            task,
        }
    }

    /// Starts keeping a delivery, delivered at `delivered_at`, until `deadline`.
    pub(crate) fn hold(
        &self,
        receipt: &str,
        reply: String,
        delivered_at: Instant,
        deadline: Instant,
        queue: Weak<QueueHandle>,
        level: usize,
    ) {
        let mut st = self.state.lock();
        let earliest = st.timeline.keys().next().map(|k| k.0);
        st.remove(receipt);
        st.held.insert(
            receipt.to_string(),
            Held {
                reply,
                deadline,
                server_until: delivered_at + ACK_WAIT,
                queue,
                level,
                slot: (deadline, 0),
            },
        );
        st.schedule(receipt);
        let first = st.timeline.keys().next().map(|k| k.0);
        drop(st);
        if first != earliest {
            self.changed.notify_one();
        }
    }

    /// Stops keeping a delivery (acked, nacked, dead-lettered). Returns whether it was held.
    pub(crate) fn release(&self, receipt: &str) -> bool {
        self.state.lock().remove(receipt).is_some()
    }

    /// Whether this process holds `receipt` with a lease that has not ended.
    pub(crate) fn is_held(&self, receipt: &str) -> bool {
        self.state
            .lock()
            .held
            .get(receipt)
            .is_some_and(|h| h.deadline > Instant::now())
    }

    /// Moves a held lease's end to `deadline`; the server's AckWait restarted at `progress_at`
    /// (an in-progress ack was just confirmed). Returns false if the lease had already ended.
    pub(crate) fn extend(&self, receipt: &str, deadline: Instant, progress_at: Instant) -> bool {
        let mut st = self.state.lock();
        match st.held.get_mut(receipt) {
            Some(h) if h.deadline > Instant::now() => {
                h.deadline = deadline;
                h.server_until = progress_at + ACK_WAIT;
            }
            _ => return false,
        }
        st.schedule(receipt);
        drop(st);
        self.changed.notify_one();
        true
    }
}

async fn run(client: async_nats::Client, state: Arc<Mutex<State>>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut st = state.lock();
            while let Some(entry) = st.timeline.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let receipt = entry.remove();
                let Some(h) = st.held.get_mut(&receipt) else {
                    continue;
                };
                if h.deadline <= now {
                    if let Some(h) = st.held.remove(&receipt) {
                        due.push((h.reply, false, h.queue, h.level));
                    }
                } else {
                    h.server_until = now + ACK_WAIT;
                    due.push((h.reply.clone(), true, Weak::new(), h.level));
                    st.schedule(&receipt);
                }
            }
            st.timeline.keys().next().map(|k| k.0)
        };
        for (reply, keepalive, queue, level) in due {
            let body: &'static [u8] = if keepalive { b"+WPI" } else { b"-NAK" };
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::warn!(error = %e, "cannot send a lease keep-alive or expiry");
            }
            if !keepalive {
                tracing::debug!(
                    level = level + 1,
                    "lease ended without an ack; message handed back"
                );
                if let Some(q) = queue.upgrade() {
                    q.wake.lock().mark_bits(1 << level);
                    q.notify.notify_waiters();
                }
            }
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => notified.await,
        }
    }
}
