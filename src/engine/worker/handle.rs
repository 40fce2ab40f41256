//! A running worker: [`WorkerHandle`], its metrics and its graceful shutdown.

use super::*;

/// A running worker. Dropping it without [`WorkerHandle::shutdown`] kills it like a crash.
pub struct WorkerHandle {
    pub(super) inner: Arc<Inner>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) loops: Vec<tokio::task::JoinHandle<()>>,
    pub(super) announcer: Option<tokio::task::JoinHandle<()>>,
    /// Listens for cancellations of running tasks (until the end of the shutdown).
    pub(super) canceller: Option<tokio::task::JoinHandle<()>>,
    pub(super) stop_tx: watch::Sender<bool>,
    pub(super) abandon_tx: watch::Sender<bool>,
    pub(super) kill_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker_id", &self.inner.worker_id)
            .finish()
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Tasks handed back to their queue by the shutdown: those still running at the deadline,
    /// and those a fetch on its way had claimed.
    pub handed_back: u64,
    /// True if every running task finished or was handed back in time, and every fetch loop
    /// ended normally (a fetch loop that panics is started again: see
    /// `metrics.fetch_restarts`).
    pub clean: bool,
    /// True if tasks were still running at the deadline (they were handed back: see
    /// `handed_back`).
    pub deadline_passed: bool,
    /// The worker's counters at the end.
    pub metrics: MetricsSnapshot,
}

impl WorkerHandle {
    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The worker's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// The worker's live counters, shared: for an exporter that reads them while the worker
    /// runs (they stay readable after [`WorkerHandle::shutdown`] consumed the handle).
    pub fn live_metrics(&self) -> Arc<WorkerMetrics> {
        self.inner.metrics.clone()
    }

    /// The limits this worker enforces on `queue` now: set at runtime (as it last read them
    /// from the registry), else configured; `None`: unlimited.
    pub fn queue_limits(&self, queue: &QueueName) -> Option<crate::queue_limits::QueueLimits> {
        self.inner.limits_of(queue)
    }

    /// This worker's queues that are paused, as it last read them from the registry; `None`
    /// before its first read (it claims nothing until then). See
    /// [`Control::pause`](crate::engine::Control::pause).
    pub fn paused_queues(&self) -> Option<Vec<QueueName>> {
        let known = self.inner.paused.borrow();
        let set = known.as_ref()?;
        let mut mine: Vec<QueueName> = self
            .inner
            .handlers
            .keys()
            .filter(|q| set.contains(*q))
            .cloned()
            .collect();
        mine.sort();
        Some(mine)
    }

    /// Deliveries being processed right now (claimed or being claimed, running, or being
    /// recorded); slots merely reserved by a waiting fetch are not counted.
    pub fn running(&self) -> usize {
        self.inner
            .in_progress
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Graceful shutdown: stops fetching (a fetch already on its way is awaited, and the tasks
    /// it brought are handed back unrun), lets running tasks finish until
    /// `shutdown_timeout`, then hands the rest back to their queues (RUNNING → PENDING, message
    /// released) so that another worker runs them. Nothing is lost.
    pub async fn shutdown(self) -> ShutdownReport {
        let timeout = self.inner.config.shutdown_timeout;
        self.shutdown_within(timeout).await
    }

    /// [`shutdown`](Self::shutdown) with an explicit deadline for running tasks.
    pub async fn shutdown_within(mut self, timeout: Duration) -> ShutdownReport {
        // Counted from here: what a fetch on its way brought is handed back while the fetch
        // loops end, possibly before they have all ended.
        let before = self
            .inner
            .metrics
            .handed_back
            .load(std::sync::atomic::Ordering::Relaxed);
        let _ = self.stop_tx.send(true);
        // The fetch loops end once a fetch on its way has answered (at most `fetch_wait` and a
        // round trip) and what it brought is being handed back; the running tasks' deadline
        // starts after that, so a short deadline never cuts such a fetch off.
        let bound = crate::clock::capped(self.inner.config.fetch_wait)
            + crate::clock::capped(self.inner.config.backend_retry_budget);
        let ended =
            tokio::time::timeout(bound, futures::future::join_all(self.loops.iter_mut())).await;
        let panicked = ended.map_or(0, |all| {
            all.iter()
                .filter(|r| r.as_ref().is_err_and(|e| e.is_panic()))
                .count()
        });
        if panicked > 0 {
            tracing::error!(worker_id = %self.inner.worker_id, panicked, "a fetch loop had stopped on a panic (a bug: please report it); its queue was no longer served");
        }
        let total = self.inner.config.concurrency as u32;
        let mut clean = tokio::time::timeout(timeout, self.idle(total))
            .await
            .is_ok();
        let deadline_passed = !clean;
        if deadline_passed {
            tracing::warn!(worker_id = %self.inner.worker_id, running = self.running(), "shutdown deadline reached; handing running tasks back");
            let _ = self.abandon_tx.send(true);
            clean = tokio::time::timeout(self.inner.config.backend_retry_budget, self.idle(total))
                .await
                .is_ok();
        }
        for l in self.loops.iter().chain(&self.canceller) {
            l.abort();
        }
        if let Some(a) = self.announcer.take() {
            a.abort();
            // Listeners drop the worker now instead of after its interval.
            self.inner.announce(true).await;
        }
        let after = self
            .inner
            .metrics
            .handed_back
            .load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(worker_id = %self.inner.worker_id, handed_back = after - before, clean, "worker stopped");
        ShutdownReport {
            handed_back: after - before,
            clean: clean && panicked == 0,
            deadline_passed,
            metrics: self.inner.metrics.snapshot(),
        }
    }

    /// Resolves when no slot runs a task and no outcome is being recorded (the fetch loops
    /// are stopped first, so none starts again).
    async fn idle(&self, total: u32) {
        let _slots = self.slots.acquire_many(total).await;
        let _recording = self.inner.recording.acquire_many(total).await;
    }

    /// Stops everything at once without recording anything, as if the process had crashed:
    /// running tasks stay RUNNING until their lease ends and the monitor (or a redelivery)
    /// hands them to another worker. For tests and demonstrations.
    pub fn kill(self) {
        let _ = self.kill_tx.send(true);
        for l in self
            .loops
            .iter()
            .chain(&self.announcer)
            .chain(&self.canceller)
        {
            l.abort();
        }
        tracing::warn!(worker_id = %self.inner.worker_id, "worker killed");
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.kill_tx.send(true);
        for l in self
            .loops
            .iter()
            .chain(&self.announcer)
            .chain(&self.canceller)
        {
            l.abort();
        }
    }
}
