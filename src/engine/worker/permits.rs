//! Permits of a limited queue ([`QueueLimits`]), taken through the lock manager so that they
//! hold across every worker, before the fetch: a task over the limit stays in the broker
//! untouched (no attempt charged, no delivery counted).
//!
//! * **Rate** `N/interval`: N slot locks `limit:rate:{queue}:{k}`. A start holds a slot from
//!   before its fetch until exactly `interval` after the handler started (the lease is extended
//!   to `interval` once the handler was first polled), so any window of `interval` holds at
//!   most N starts. A slot whose fetch brought nothing is released.
//!
//!   A worker **keeps** the slot of a task it started: up to [`LEAD`] before the slot ends, it
//!   extends it for its next task and waits for the end before that task's fetch. Otherwise
//!   every start of a slot waits for the lock's expiry, a look at the holders and a new
//!   acquisition (on RabbitMQ an exclusive queue and a lock-log record) before its fetch, and
//!   each such delay is rate lost. A kept slot's next start follows the interval's end by one
//!   fetch and claim. A slot kept but not needed ends with its lease; one whose extension
//!   fails is forgotten.
//! * **Concurrency** `N`: N slot locks `limit:running:{queue}:{k}` held for the run, renewed
//!   with the task's lease and released when the handler returns (or expiring with the lease
//!   when the worker dies).
//!
//! A permit first reads the holders of up to [`PROBE`] slots, starting at a random one (to
//! spread the contention), then acquires one that looks free. When none is, it tells how long
//! to wait: until the earliest rate slot ends, or a bounded backoff for the concurrency cap.

use chrono::Utc;
use futures::future::join_all;
use rand::Rng;

use super::*;
use crate::lock::{Lease, LockManager};
use crate::queue_limits::QueueLimits;

/// Most slots whose holders one attempt reads.
const PROBE: usize = 32;
/// How long past `interval + fetch_wait` a rate slot is first taken for: it must outlive the
/// fetch and the claim, until the handler starts and the slot is set to end `interval` later.
const RATE_START_SLACK: Duration = Duration::from_secs(5);
/// How long before a kept rate slot ends it is extended for the worker's next task: the
/// extension's round trip must arrive before the lock's own end.
const LEAD: Duration = Duration::from_millis(200);
/// The first wait for a concurrency slot; doubled each time none is free, up to
/// [`MAX_RUNNING_WAIT`].
const FIRST_RUNNING_WAIT: Duration = Duration::from_millis(20);
/// The longest wait for a concurrency slot between two looks.
const MAX_RUNNING_WAIT: Duration = Duration::from_millis(500);

/// The permit of one task of a limited queue. Dropped, it gives back what it still holds
/// (the rate slot unless its task started; the concurrency slot always), in the background.
pub(super) struct QueuePermit {
    locks: Arc<dyn LockManager>,
    /// The rate slot, until the task starts.
    rate: Option<RateHold>,
    /// The concurrency slot, for the run.
    running: Option<Lease>,
}

/// A rate slot held for one task.
struct RateHold {
    lease: Lease,
    interval: Duration,
    /// A kept slot: its last start's interval ends then, and no fetch under it may come before.
    not_before: Option<Instant>,
    /// Where the slot is kept once its task started.
    kept: Arc<KeptSlots>,
    queue: QueueName,
}

/// The rate slots of the tasks a worker started, kept for its next starts (see the module doc).
#[derive(Default)]
pub(super) struct KeptSlots(parking_lot::Mutex<HashMap<QueueName, Vec<Kept>>>);

/// A kept rate slot: its lease, and when its last start's interval ends.
struct Kept {
    lease: Lease,
    ends: Instant,
}

impl KeptSlots {
    /// Takes up to `want` of the slots of `queue` that end within `lead` (forgetting those
    /// already ended and those a smaller limit no longer has); with the end of the earliest
    /// one left.
    fn take_ready(
        &self,
        queue: &QueueName,
        count: u32,
        want: usize,
        lead: Duration,
    ) -> (Vec<Kept>, Option<Instant>) {
        let now = Instant::now();
        let soon = now + lead;
        let mut all = self.0.lock();
        let Some(slots) = all.get_mut(queue) else {
            return (Vec::new(), None);
        };
        slots.retain(|k| k.ends > now && slot_index(&k.lease.key).is_some_and(|i| i < count));
        slots.sort_by_key(|k| k.ends);
        let ready = slots
            .iter()
            .take_while(|k| k.ends <= soon)
            .count()
            .min(want);
        let taken: Vec<Kept> = slots.drain(..ready).collect();
        let next = slots.first().map(|k| k.ends);
        (taken, next)
    }

    fn keep(&self, queue: QueueName, kept: Kept) {
        self.0.lock().entry(queue).or_default().push(kept);
    }
}

/// The `k` of a slot key `…:{k}`.
fn slot_index(key: &str) -> Option<u32> {
    key.rsplit(':').next()?.parse().ok()
}

/// The time from now until `at` (zero when it has passed).
fn until(at: Instant) -> Duration {
    at.saturating_duration_since(Instant::now())
}

impl std::fmt::Debug for QueuePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePermit")
            .field("rate", &self.rate.as_ref().map(|r| &r.lease.key))
            .field("running", &self.running.as_ref().map(|l| &l.key))
            .finish()
    }
}

impl QueuePermit {
    /// The permit of an unlimited queue: holds nothing.
    pub(super) fn none(locks: Arc<dyn LockManager>) -> Self {
        QueuePermit {
            locks,
            rate: None,
            running: None,
        }
    }

    /// The task starts: what, called right after the handler's first poll, keeps the rate slot
    /// for exactly its interval from then (never released: it counts the start).
    pub(super) fn started(&mut self) -> Option<StartMark> {
        self.rate.take().map(|hold| StartMark {
            locks: self.locks.clone(),
            hold,
        })
    }

    /// When the fetch under this permit may be sent: the end of a kept rate slot's last
    /// interval, if it has not passed.
    pub(super) fn not_before(&self) -> Option<Instant> {
        self.rate
            .as_ref()
            .and_then(|r| r.not_before)
            .filter(|t| *t > Instant::now())
    }

    /// Renews the concurrency slot with the task's lease.
    pub(super) async fn renew(&mut self, ttl: Duration) {
        let Some(lease) = &self.running else { return };
        match self.locks.extend(lease, ttl).await {
            Ok(l) => self.running = Some(l),
            Err(e) => {
                tracing::warn!(key = %lease.key, error = %e, "could not renew a concurrency slot; the queue's cap may be passed until this task ends");
            }
        }
    }
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        // A kept rate slot whose last interval has not ended is given back only at its end:
        // another worker could otherwise start under it too early.
        let rate_after = self.not_before().map(until).unwrap_or_default();
        let rate = self.rate.take().map(|r| r.lease);
        let running = self.running.take();
        if rate.is_none() && running.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime any more: the slots end with their TTL
        };
        let locks = self.locks.clone();
        runtime.spawn(async move {
            let rate = match rate {
                Some(lease) if !rate_after.is_zero() => {
                    let locks = locks.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(rate_after).await;
                        if let Err(e) = locks.release(&lease).await {
                            tracing::debug!(key = %lease.key, error = %e, "could not give back a rate slot; it ends with its TTL");
                        }
                    });
                    None
                }
                other => other,
            };
            for lease in rate.into_iter().chain(running) {
                if let Err(e) = locks.release(&lease).await {
                    tracing::debug!(key = %lease.key, error = %e, "could not give back a queue slot; it ends with its TTL");
                }
            }
        });
    }
}

/// A rate slot whose task started: [`StartMark::fire`] sets it to end one interval from now.
pub(super) struct StartMark {
    locks: Arc<dyn LockManager>,
    hold: RateHold,
}

impl StartMark {
    /// Extends the slot in the background (the handler runs meanwhile) and keeps it for the
    /// worker's next start.
    pub(super) fn fire(self) {
        // The monotonic clock: a step of the wall clock must not shorten an interval.
        let ends = Instant::now() + self.hold.interval;
        tokio::spawn(async move {
            let RateHold {
                lease,
                interval,
                kept,
                queue,
                ..
            } = self.hold;
            match self.locks.extend(&lease, interval).await {
                Ok(lease) => kept.keep(queue, Kept { lease, ends }),
                Err(e) => {
                    tracing::warn!(key = %lease.key, error = %e, "could not mark a rate slot with its task's start; the slot ends earlier than the start's interval");
                }
            }
        });
    }
}

/// What a look at a queue's slots found: the slots taken (at most the number wanted) and,
/// when some were held, the one ending first and in how long.
struct Look {
    taken: Vec<Lease>,
    earliest: Option<(Duration, String)>,
}

/// Looks for free slots among `count` named `{family}:{k}` and takes up to `want` of them for
/// `ttl`, reading the holders once. A held slot is counted as ending within `longest` at the
/// latest (a rate slot whose task has not started yet is held longer, until its start marks
/// it to end one interval later).
#[allow(clippy::too_many_arguments)]
async fn take_slots(
    locks: &dyn LockManager,
    family: &str,
    count: u32,
    want: usize,
    owner: &str,
    ttl: Duration,
    longest: Duration,
    first_try: Option<&str>,
) -> Result<Look> {
    let mut look = Look {
        taken: Vec::new(),
        earliest: None,
    };
    // The slot found ending first by the last look, tried before reading any holder (reading
    // one is a round trip, and on some backends more).
    if let Some(key) = first_try.filter(|k| k.starts_with(family)) {
        if let Some(lease) = locks.acquire(key, owner, ttl).await? {
            look.taken.push(lease);
            if look.taken.len() >= want {
                return Ok(look);
            }
        }
    }
    let count = count.max(1) as usize;
    let first = rand::rng().random_range(0..count);
    let keys: Vec<String> = (0..count.min(PROBE))
        .map(|i| format!("{family}:{}", (first + i) % count))
        .filter(|k| !look.taken.iter().any(|l| &l.key == k))
        .collect();
    let holders = join_all(keys.iter().map(|k| locks.holder(k))).await;
    let now = Utc::now();
    for (key, holder) in keys.iter().zip(holders) {
        let left = match holder? {
            Some(h) if h.expires_at > now => (h.expires_at - now)
                .to_std()
                .unwrap_or_default()
                .min(longest),
            _ => match locks.acquire(key, owner, ttl).await? {
                Some(lease) => {
                    look.taken.push(lease);
                    if look.taken.len() >= want {
                        return Ok(look);
                    }
                    continue;
                }
                // Taken by another worker since its holder was read (or being freed).
                None => Duration::ZERO,
            },
        };
        if look.earliest.as_ref().is_none_or(|(e, _)| left < *e) {
            look.earliest = Some((left, key.clone()));
        }
    }
    Ok(look)
}

/// The wait for a concurrency slot after `looks` looks found none.
fn running_wait(looks: u32) -> Duration {
    FIRST_RUNNING_WAIT
        .saturating_mul(1 << looks.min(8))
        .min(MAX_RUNNING_WAIT)
}

/// Between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Takes up to `want` permits of `queue` under `limits` (at least one, or how long to wait
/// before looking again), reading each limit's slots once. With `reuse`, the worker's kept rate
/// slots come first; a permit on one may have to wait for [`QueuePermit::not_before`].
pub(super) async fn take_permits(
    inner: &Inner,
    queue: &QueueName,
    limits: &QueueLimits,
    want: usize,
    looks: u32,
    hint: &mut Option<String>,
    reuse: bool,
) -> Result<std::result::Result<Vec<QueuePermit>, Duration>> {
    let locks = inner.backends.locks.as_ref();
    let permit = || QueuePermit::none(inner.backends.locks.clone());
    let mut permits: Vec<QueuePermit> = (0..want.max(1)).map(|_| permit()).collect();
    if let Some(cap) = limits.concurrency {
        let family = format!("limit:running:{queue}");
        let lease = inner.config.lease;
        let look = take_slots(
            locks,
            &family,
            cap,
            permits.len(),
            &inner.worker_id,
            lease,
            lease,
            None,
        )
        .await?;
        if look.taken.is_empty() {
            return Ok(Err(jitter(running_wait(looks))));
        }
        permits.truncate(look.taken.len());
        for (p, lease) in permits.iter_mut().zip(look.taken) {
            p.running = Some(lease);
        }
    }
    if let Some(rate) = limits.rate {
        let family = format!("limit:rate:{queue}");
        let ttl = rate.interval() + inner.config.fetch_wait + RATE_START_SLACK;
        let hold = |lease: Lease, not_before: Option<Instant>| RateHold {
            lease,
            interval: rate.interval(),
            not_before,
            kept: inner.kept_slots.clone(),
            queue: queue.clone(),
        };
        let mut held: Vec<RateHold> = Vec::new();
        let mut next_kept = None;
        if reuse {
            let (ready, next) =
                inner
                    .kept_slots
                    .take_ready(queue, rate.count(), permits.len(), LEAD);
            next_kept = next;
            for k in ready {
                // Held until the interval's end, then for a fetch and a claim as any slot.
                match locks.extend(&k.lease, until(k.ends) + ttl).await {
                    Ok(lease) => held.push(hold(lease, Some(k.ends))),
                    Err(e) => {
                        tracing::debug!(key = %k.lease.key, error = %e, "a kept rate slot could not be extended; it ends with its lease");
                    }
                }
            }
        }
        let mut look = Look {
            taken: Vec::new(),
            earliest: None,
        };
        if held.len() < permits.len() {
            let taken = take_slots(
                locks,
                &family,
                rate.count(),
                permits.len() - held.len(),
                &inner.worker_id,
                ttl,
                rate.interval(),
                hint.take().as_deref(),
            )
            .await;
            look = match taken {
                Ok(look) => look,
                Err(e) => {
                    // The kept slots extended above are given back (each at its interval's
                    // end) as their permits drop.
                    for hold in held {
                        drop(QueuePermit {
                            locks: inner.backends.locks.clone(),
                            rate: Some(hold),
                            running: None,
                        });
                    }
                    return Err(e);
                }
            };
        }
        held.extend(look.taken.drain(..).map(|l| hold(l, None)));
        if held.is_empty() {
            // Until the earliest slot ends (then tried first); a little later for the other
            // workers waiting for it too (at most a tenth of the time between two starts, or
            // 20 ms), and never less than that: no busy polling. The permits taken for the
            // concurrency cap are given back as they drop.
            let between = rate.interval() / rate.count();
            let spread = (between / 10).min(FIRST_RUNNING_WAIT);
            let mut wait = match look.earliest {
                Some((left, key)) => {
                    *hint = Some(key);
                    left
                }
                None => between,
            };
            // A kept slot is taken again `LEAD` before it ends.
            if let Some(ends) = next_kept {
                wait = wait.min(until(ends).saturating_sub(LEAD));
            }
            let extra = spread.mul_f64(rand::rng().random_range(0.0..=1.0));
            return Ok(Err(wait.max(spread) + extra));
        }
        // Those beyond the rate slots taken give back their concurrency slot as they drop.
        permits.truncate(held.len());
        for (p, hold) in permits.iter_mut().zip(held) {
            p.rate = Some(hold);
        }
    }
    Ok(Ok(permits))
}

/// Permits for `n` tasks fetched under limits that changed meanwhile: of the queue's limits
/// now, taken without waiting; `None` for each task no permit is free for now.
pub(super) async fn permits_now(
    inner: &Inner,
    queue: &QueueName,
    n: usize,
) -> Vec<Option<QueuePermit>> {
    let mut out: Vec<Option<QueuePermit>> = match inner.limits_of(queue) {
        None => (0..n)
            .map(|_| Some(QueuePermit::none(inner.backends.locks.clone())))
            .collect(),
        // Not the kept slots: these tasks are fetched already and start at once.
        Some(limits) => match take_permits(inner, queue, &limits, n, 0, &mut None, false).await {
            Ok(Ok(taken)) => taken.into_iter().map(Some).collect(),
            Ok(Err(_)) => Vec::new(),
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "could not take the queue's permits; handing the tasks back");
                Vec::new()
            }
        },
    };
    out.resize_with(n, || None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(k: u32, ends_in_ms: i64) -> Kept {
        let now = Instant::now();
        let d = Duration::from_millis(ends_in_ms.unsigned_abs());
        let ends = if ends_in_ms < 0 { now - d } else { now + d };
        Kept {
            lease: Lease {
                key: format!("limit:rate:q:{k}"),
                owner: "w".into(),
                token: format!("t{k}"),
                fencing_token: 1,
                expires_at: Utc::now(),
            },
            ends,
        }
    }

    fn keys(taken: &[Kept]) -> Vec<&str> {
        taken.iter().map(|k| k.lease.key.as_str()).collect()
    }

    /// Only slots ending within the lead are handed out, earliest first and at most as many as
    /// wanted; ended slots and slots a smaller limit no longer has are forgotten; the end of
    /// the earliest slot left is told.
    #[test]
    fn kept_slots_are_taken_when_about_to_end() {
        let q = QueueName::parse("q").unwrap();
        let slots = KeptSlots::default();
        for (k, ms) in [(0, 150), (1, 50), (2, 5_000), (3, -10), (12, 20), (4, 100)] {
            slots.keep(q.clone(), kept(k, ms));
        }
        let lead = Duration::from_millis(200);
        let (taken, next) = slots.take_ready(&q, 10, 2, lead);
        assert_eq!(keys(&taken), ["limit:rate:q:1", "limit:rate:q:4"]);
        assert!(next.is_some_and(|n| n < Instant::now() + Duration::from_millis(200)));
        let (taken, next) = slots.take_ready(&q, 10, 8, lead);
        assert_eq!(keys(&taken), ["limit:rate:q:0"]);
        let next = next.expect("slot 2 is left");
        assert!(next > Instant::now() + Duration::from_secs(4));
        let (taken, _) = slots.take_ready(&q, 10, 8, lead);
        assert!(taken.is_empty(), "slot 2 is not about to end");
        let other = QueueName::parse("other").unwrap();
        assert!(slots.take_ready(&other, 10, 8, lead).0.is_empty());
        assert_eq!(slot_index("limit:rate:q:x:17"), Some(17));
        assert_eq!(slot_index("limit:rate:q:x"), None);
    }
}
