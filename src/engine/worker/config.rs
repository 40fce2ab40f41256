//! How a worker behaves: [`WorkerConfig`], and the worker's default id.

use super::*;
use crate::queue_limits::QueueLimits;

/// How a worker behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// This worker's id, recorded as `worker_id` on the tasks it claims.
    pub worker_id: String,
    /// Tasks run at once (slots), across all queues. Also the most messages fetched at once
    /// for running. A slot is free again as soon as its handler returns: the outcome is
    /// recorded while the slot runs the next task, so up to `concurrency` more messages (of
    /// finished tasks whose outcome is on its way) can be held at a time.
    pub concurrency: usize,
    /// How long a claim lasts without a heartbeat (bus lease and registry lease).
    pub lease: Duration,
    /// How often a running task renews its lease (default: a third of `lease`).
    pub heartbeat: Option<Duration>,
    /// How long one fetch waits for work before looking again.
    pub fetch_wait: Duration,
    /// Backoff between a task's attempts.
    pub retry: Backoff,
    /// Stops an attempt that runs longer than this, if set: the handler's cancellation signal
    /// is set ([`TaskContext::cancelled`]), it is dropped after `cancel_grace` if it has not
    /// returned, and the attempt fails retryably ("timed out after T"). A task's own
    /// [`timeout`](crate::Task::timeout) overrides it.
    pub handler_timeout: Option<Duration>,
    /// How long a graceful shutdown waits for running tasks before handing them back.
    pub shutdown_timeout: Duration,
    /// How long one backend call is retried through temporary errors before the worker gives
    /// up on that step (the message is then redelivered when its lease ends).
    pub backend_retry_budget: Duration,
    /// How often the worker announces itself (id, host, queues, running tasks) on the bus, for
    /// `orchestra workers` and [`list_workers`](crate::engine::list_workers); `None`: never.
    pub announce_every: Option<Duration>,
    /// How long a handler whose task was cancelled while running, or whose attempt ran over its
    /// timeout, may take to return after its cancellation signal is set
    /// ([`TaskContext::cancelled`]); then it is dropped (its future is not polled again). What
    /// it returns either way is discarded: the task is CANCELLED, or the attempt timed out.
    pub cancel_grace: Duration,
    /// Limits of the served queues that hold across every worker (a rate, a concurrency cap),
    /// enforced through the lock manager. A limit set at runtime
    /// ([`Control::set_limits`](crate::engine::Control::set_limits)) replaces a queue's entry
    /// here; every worker of a queue should be configured alike.
    pub queue_limits: BTreeMap<QueueName, QueueLimits>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: default_worker_id(),
            concurrency: 8,
            lease: Duration::from_secs(30),
            heartbeat: None,
            fetch_wait: Duration::from_secs(1),
            retry: Backoff::default(),
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
            backend_retry_budget: Duration::from_secs(60),
            announce_every: Some(DEFAULT_ANNOUNCE_EVERY),
            cancel_grace: DEFAULT_CANCEL_GRACE,
            queue_limits: BTreeMap::new(),
        }
    }
}

/// How often a worker announces itself by default.
pub const DEFAULT_ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// How long a cancelled handler may take to return by default.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The longest grace a cancelled handler may be given.
pub const MAX_CANCEL_GRACE: Duration = Duration::from_secs(3600);

/// `worker-<pid>-<4 hex>`.
pub fn default_worker_id() -> String {
    format!(
        "worker-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..4]
    )
}

/// The longest lease a worker takes on a task (a longer one would only delay the recovery of a
/// crashed worker's tasks: a running task's lease is extended by heartbeats).
pub const MAX_LEASE: Duration = Duration::from_secs(7 * 86_400);

impl WorkerConfig {
    /// Checks the numbers; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.worker_id.trim().is_empty() {
            return Err(Error::config("worker.id", "must not be empty"));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(Error::config(
                "worker.concurrency",
                format!("must be between 1 and 10000, got {}", self.concurrency),
            ));
        }
        if self.lease < Duration::from_millis(100) || self.lease > MAX_LEASE {
            return Err(Error::config(
                "worker.lease",
                format!(
                    "must be between 100ms and 7d, got {}",
                    crate::clock::format_duration(self.lease)
                ),
            ));
        }
        if let Some(hb) = self.heartbeat {
            if hb.is_zero() || hb >= self.lease {
                return Err(Error::config(
                    "worker.heartbeat",
                    "must be greater than zero and shorter than worker.lease",
                ));
            }
        }
        if let Some(every) = self.announce_every {
            if every < Duration::from_millis(50) || every > Duration::from_secs(3600) {
                return Err(Error::config(
                    "worker.announce_every",
                    format!(
                        "must be between 50ms and 1h, got {}",
                        crate::clock::format_duration(every)
                    ),
                ));
            }
        }
        if self.cancel_grace > MAX_CANCEL_GRACE {
            return Err(Error::config(
                "worker.cancel_grace",
                format!(
                    "must be at most 1h, got {}",
                    crate::clock::format_duration(self.cancel_grace)
                ),
            ));
        }
        for (queue, limits) in &self.queue_limits {
            limits
                .validate()
                .map_err(|e| Error::config("queues", format!("queue {queue}: {e}")))?;
        }
        self.retry.validate("worker.retry")
    }

    pub(super) fn heartbeat_every(&self) -> Duration {
        self.heartbeat.unwrap_or(self.lease / 3)
    }
}
