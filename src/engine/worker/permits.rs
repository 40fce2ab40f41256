//! Permits of a limited queue ([`QueueLimits`]), taken through the lock manager so that they
//! hold across every worker, before the fetch: a task over the limit stays in the broker
//! untouched (no attempt charged, no delivery counted).
//!
//! * **Rate** `N/interval`: N slot locks `limit:rate:{queue}:{k}`. A start holds a slot from
//!   before its fetch until exactly `interval` after the handler started (the lease is extended
//!   to `interval` once the handler was first polled), so any window of `interval` holds at
//!   most N starts. A slot whose fetch brought nothing is released.
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
/// The first wait for a concurrency slot; doubled each time none is free, up to
/// [`MAX_RUNNING_WAIT`].
const FIRST_RUNNING_WAIT: Duration = Duration::from_millis(20);
/// The longest wait for a concurrency slot between two looks.
const MAX_RUNNING_WAIT: Duration = Duration::from_millis(500);

/// The permit of one task of a limited queue. Dropped, it gives back what it still holds
/// (the rate slot unless its task started; the concurrency slot always), in the background.
pub(super) struct QueuePermit {
    locks: Arc<dyn LockManager>,
    /// The rate slot and the interval, until the task starts.
    rate: Option<(Lease, Duration)>,
    /// The concurrency slot, for the run.
    running: Option<Lease>,
}

impl std::fmt::Debug for QueuePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePermit")
            .field("rate", &self.rate.as_ref().map(|(l, _)| &l.key))
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
        self.rate.take().map(|(lease, interval)| StartMark {
            locks: self.locks.clone(),
            lease,
            interval,
        })
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
        let leases: Vec<Lease> = self
            .rate
            .take()
            .map(|(l, _)| l)
            .into_iter()
            .chain(self.running.take())
            .collect();
        if leases.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime any more: the slots end with their TTL
        };
        let locks = self.locks.clone();
        runtime.spawn(async move {
            for lease in leases {
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
    lease: Lease,
    interval: Duration,
}

impl StartMark {
    /// Extends the slot in the background (the handler runs meanwhile).
    pub(super) fn fire(self) {
        tokio::spawn(async move {
            if let Err(e) = self.locks.extend(&self.lease, self.interval).await {
                tracing::warn!(key = %self.lease.key, error = %e, "could not mark a rate slot with its task's start; the slot ends earlier than the start's interval");
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
/// before looking again), reading each limit's slots once.
pub(super) async fn take_permits(
    inner: &Inner,
    queue: &QueueName,
    limits: &QueueLimits,
    want: usize,
    looks: u32,
    hint: &mut Option<String>,
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
        let look = take_slots(
            locks,
            &family,
            rate.count(),
            permits.len(),
            &inner.worker_id,
            ttl,
            rate.interval(),
            hint.take().as_deref(),
        )
        .await?;
        if look.taken.is_empty() {
            // Until the earliest slot ends (then tried first); a little later for the other
            // workers waiting for it too (at most a tenth of the time between two starts, or
            // 20 ms), and never less than that: no busy polling. The permits taken for the
            // concurrency cap are given back as they drop.
            let between = rate.interval() / rate.count();
            let spread = (between / 10).min(FIRST_RUNNING_WAIT);
            let wait = match look.earliest {
                Some((left, key)) => {
                    *hint = Some(key);
                    left
                }
                None => between,
            };
            let extra = spread.mul_f64(rand::rng().random_range(0.0..=1.0));
            return Ok(Err(wait.max(spread) + extra));
        }
        // Those beyond the rate slots taken give back their concurrency slot as they drop.
        permits.truncate(look.taken.len());
        for (p, lease) in permits.iter_mut().zip(look.taken) {
            p.rate = Some((lease, rate.interval()));
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
        Some(limits) => match take_permits(inner, queue, &limits, n, 0, &mut None).await {
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
