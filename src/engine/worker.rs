//! The [`Worker`]: serves queues with N concurrent slots, claims by compare-and-set, keeps its
//! lease alive, records outcomes, retries with backoff, and shuts down gracefully.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::backends::Backends;
use crate::bus::{Delivery, FetchOptions};
use crate::error::{Error, Result};
use crate::model::{QueueName, Task, TaskState, TaskStatus};
use crate::task_queue::{Claim, ClaimSpec, Recorded, Settle};

use super::flow;
use super::handler::{Handler, TaskContext, TaskError};
use super::metrics::{MetricsSnapshot, WorkerMetrics};
use super::retry::{with_backend_retry, Backoff};

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
    /// Fails an attempt that runs longer than this (retryable), if set.
    pub handler_timeout: Option<Duration>,
    /// How long a graceful shutdown waits for running tasks before handing them back.
    pub shutdown_timeout: Duration,
    /// How long one backend call is retried through temporary errors before the worker gives
    /// up on that step (the message is then redelivered when its lease ends).
    pub backend_retry_budget: Duration,
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
        }
    }
}

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
                    crate::config::format_duration(self.lease)
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
        self.retry.validate("worker.retry")
    }

    fn heartbeat_every(&self) -> Duration {
        self.heartbeat.unwrap_or(self.lease / 3)
    }
}

/// What happened to a task this worker finished or gave up on; passed to
/// [`Worker::on_finished`] observers.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The task as stored after the change (COMPLETED, FAILED or PENDING for a retry).
    pub task: Task,
    /// When the worker saw the outcome.
    pub at: Instant,
}

type Observer = Arc<dyn Fn(&Finished) + Send + Sync>;

struct Inner {
    backends: Backends,
    config: WorkerConfig,
    worker_id: Arc<str>,
    handlers: HashMap<QueueName, Arc<dyn Handler>>,
    metrics: Arc<WorkerMetrics>,
    observer: Option<Observer>,
    in_progress: std::sync::atomic::AtomicUsize,
    claim: ClaimSpec,
    /// Outcomes being recorded (at most `concurrency`): taken when a handler returns, before
    /// its slot is given back.
    recording: Arc<Semaphore>,
}

/// Serves one or more queues.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use agent_orchestra::{Backends, engine::{Dispatcher, DispatchOptions, Worker, WorkerConfig, handler_fn, TaskError}};
/// let backends = Backends::memory();
/// let worker = Worker::new(backends.clone(), WorkerConfig::default())
///     .handle("echo", handler_fn(|ctx| async move { Ok::<_, TaskError>(ctx.task.payload) }))
///     .unwrap()
///     .start()
///     .unwrap();
/// let d = Dispatcher::new(backends);
/// let id = d.dispatch("echo", serde_json::json!({"hi": 1}), 5, DispatchOptions::default()).await.unwrap();
/// let done = d.wait(&id, Duration::from_secs(5)).await.unwrap();
/// assert_eq!(done.state.result, Some(serde_json::json!({"hi": 1})));
/// worker.shutdown().await;
/// # });
/// ```
pub struct Worker {
    inner: Inner,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.inner.worker_id)
            .field("queues", &self.inner.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Worker {
    /// A worker with no queues yet.
    pub fn new(backends: Backends, config: WorkerConfig) -> Self {
        Worker {
            inner: Inner {
                backends,
                worker_id: Arc::from(config.worker_id.as_str()),
                handlers: HashMap::new(),
                metrics: Arc::new(WorkerMetrics::default()),
                observer: None,
                in_progress: Default::default(),
                recording: Arc::new(Semaphore::new(
                    config.concurrency.min(Semaphore::MAX_PERMITS),
                )),
                claim: ClaimSpec {
                    worker_id: Arc::from(config.worker_id.as_str()),
                    lease: config.lease,
                },
                config,
            },
        }
    }

    /// Serves `queue` with `handler`. Errors on a malformed queue name.
    pub fn handle(mut self, queue: &str, handler: Arc<dyn Handler>) -> Result<Self> {
        let q = QueueName::parse(queue)?;
        self.inner.handlers.insert(q, handler);
        Ok(self)
    }

    /// Calls `f` after each attempt this worker finished (COMPLETED, FAILED, or PENDING again
    /// for a retry), once the outcome is recorded and the message acked or nacked.
    pub fn on_finished(mut self, f: impl Fn(&Finished) + Send + Sync + 'static) -> Self {
        self.inner.observer = Some(Arc::new(f));
        self
    }

    /// Starts serving in background tasks of the current tokio runtime.
    pub fn start(self) -> Result<WorkerHandle> {
        self.inner.config.validate()?;
        if self.inner.handlers.is_empty() {
            return Err(Error::config(
                "worker.queues",
                "a worker needs at least one queue to serve",
            ));
        }
        let inner = Arc::new(self.inner);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let (kill_tx, kill_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(inner.config.concurrency));
        let mut loops = Vec::new();
        for queue in inner.handlers.keys() {
            loops.push(tokio::spawn(supervised_fetch_loop(
                inner.clone(),
                queue.clone(),
                slots.clone(),
                stop_rx.clone(),
                abandon_rx.clone(),
                kill_rx.clone(),
            )));
        }
        tracing::info!(
            worker_id = %inner.worker_id,
            queues = ?inner.handlers.keys().map(|q| q.as_str()).collect::<Vec<_>>(),
            concurrency = inner.config.concurrency,
            "worker started"
        );
        Ok(WorkerHandle {
            inner,
            slots,
            loops,
            stop_tx,
            abandon_tx,
            kill_tx,
        })
    }
}

/// A running worker. Dropping it without [`WorkerHandle::shutdown`] kills it like a crash.
pub struct WorkerHandle {
    inner: Arc<Inner>,
    slots: Arc<Semaphore>,
    loops: Vec<tokio::task::JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    abandon_tx: watch::Sender<bool>,
    kill_tx: watch::Sender<bool>,
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
    /// Tasks that were still running at the deadline and were handed back to their queue.
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
        let before = self
            .inner
            .metrics
            .handed_back
            .load(std::sync::atomic::Ordering::Relaxed);
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
        for l in self.loops.iter() {
            l.abort();
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
        for l in &self.loops {
            l.abort();
        }
        tracing::warn!(worker_id = %self.inner.worker_id, "worker killed");
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.kill_tx.send(true);
        for l in &self.loops {
            l.abort();
        }
    }
}

/// Runs [`fetch_loop`] for `queue`, starting it again after a panic (a bug in a backend or in
/// the engine: without this the queue would silently no longer be served while the worker
/// looked alive). The permits the loop held are released by the unwinding; a fetch it had on
/// its way is left to its lease, as after a crash.
async fn supervised_fetch_loop(
    inner: Arc<Inner>,
    queue: QueueName,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
    kill: watch::Receiver<bool>,
) {
    let mut restarts = 0u32;
    loop {
        let run = AssertUnwindSafe(fetch_loop(
            inner.clone(),
            queue.clone(),
            slots.clone(),
            stop.clone(),
            abandon.clone(),
            kill.clone(),
        ))
        .catch_unwind()
        .await;
        let Err(panic) = run else { return };
        restarts += 1;
        WorkerMetrics::inc(&inner.metrics.fetch_restarts);
        tracing::error!(
            worker_id = %inner.worker_id,
            queue = %queue,
            panic = %panic_text(panic.as_ref()),
            "the fetch loop panicked (a bug: please report it); starting it again"
        );
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Backoff::backend().delay(restarts)) => {}
        }
    }
}

/// The message of a panic's payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

async fn fetch_loop(
    inner: Arc<Inner>,
    queue: QueueName,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
    kill: watch::Receiver<bool>,
) {
    let handler = inner.handlers[&queue].clone();
    let wait = if inner.handlers.len() > 1 {
        inner.config.fetch_wait.min(Duration::from_millis(100))
    } else {
        inner.config.fetch_wait
    };
    let mut errors = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let first = tokio::select! {
            _ = stop.changed() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let options = FetchOptions {
            max: permits.len(),
            wait,
            lease: inner.config.lease,
        };
        // Not cancelled by a stop: once sent, the fetch may already have leased and claimed
        // tasks (a script that ran, a reply on its way), and dropping it would leave them
        // RUNNING until their lease ends. A stop waits for it (at most `fetch_wait` and a
        // round trip) and hands what it brought back below.
        let fetched = inner
            .backends
            .tasks()
            .fetch_claim(&queue, options, &inner.claim)
            .await;
        let deliveries = match fetched {
            Ok(d) => {
                errors = 0;
                d
            }
            Err(e) => {
                errors += 1;
                WorkerMetrics::inc(&inner.metrics.backend_errors);
                let pause = Backoff::backend().delay(errors);
                if e.is_temporary() {
                    tracing::warn!(queue = %queue, error = %e, "fetch failed; retrying");
                } else {
                    tracing::error!(queue = %queue, error = %e, "fetch failed with a permanent error; retrying");
                }
                drop(permits);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        inner.metrics.fetched.fetch_add(
            deliveries.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let stopping = *stop.borrow();
        for ((delivery, claim), permit) in deliveries.into_iter().zip(permits.drain(..)) {
            let inner = inner.clone();
            if stopping {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let _busy = InProgress::enter(&inner.in_progress);
                    return_unstarted(&inner, handler, delivery, claim, permit).await;
                });
                continue;
            }
            let handler = handler.clone();
            let abandon = abandon.clone();
            let mut kill = kill.clone();
            tokio::spawn(async move {
                let _busy = InProgress::enter(&inner.in_progress);
                tokio::select! {
                    _ = kill.changed() => {}
                    // Boxed: the processing future is large, and tokio moves a spawned future
                    // several times; moving a pointer instead is measurably cheaper.
                    _ = Box::pin(process(&inner, handler, delivery, claim, abandon, permit)) => {}
                }
            });
        }
    }
}

/// A delivery fetched while the worker was stopping: its task is handed back unrun (a claimed
/// task goes back to PENDING at no attempt's cost, an unclaimed message is released at once);
/// deliveries that would not run a handler anyway (malformed, missing or unclaimable tasks)
/// are settled as usual.
async fn return_unstarted(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    claim: Option<Claim>,
    slot: OwnedSemaphorePermit,
) {
    let result = match claim {
        Some(Claim::Claimed(running)) => hand_back(inner, &delivery, &running).await,
        None => {
            let bus = inner.backends.bus.as_ref();
            step(inner, "release", || bus.nack(&delivery, Duration::ZERO)).await
        }
        Some(other) => {
            // Settled without running the handler (only a claimed task runs it).
            let (_, abandon) = watch::channel(true);
            process(inner, handler, delivery, Some(other), abandon, slot).await;
            return;
        }
    };
    drop(slot);
    if let Err(e) = result {
        tracing::error!(queue = %delivery.queue, message_id = %delivery.message_id, error = %e, "could not hand back a task fetched during shutdown; it will be redelivered when its lease ends");
    }
}

/// How long after a running attempt's lease ends a redelivery given back meanwhile comes again
/// (clocks of different machines differ a little).
const REDELIVERY_MARGIN: Duration = Duration::from_secs(1);

/// Whether delivery `d` of a task found unclaimable is a redelivery (the delivery before it was
/// not settled: its worker may have died) made while another attempt's lease still runs, and
/// not the last delivery the bus allows.
fn redelivered_early(bus: &dyn crate::bus::Bus, d: &Delivery, task: &Task) -> bool {
    task.state.status == TaskStatus::Running
        && !task.lease_expired(Utc::now())
        && d.delivery_count > 1
        && d.delivery_count < bus.max_deliveries()
}

/// Hands a claimed task back to its queue (RUNNING → PENDING, message released at once) without
/// charging the attempt: a worker shutting down.
async fn hand_back(inner: &Inner, d: &Delivery, running: &Task) -> Result<()> {
    let next = TaskState {
        status: TaskStatus::Pending,
        handed_back: running.state.handed_back.saturating_add(1),
        error: Some("handed back by a worker shutting down".into()),
        lease_until: None,
        updated_at: Utc::now(),
        ..running.state.clone()
    };
    if record(inner, d, running, next, Settle::Nack(Duration::ZERO))
        .await?
        .is_some()
    {
        WorkerMetrics::inc(&inner.metrics.handed_back);
        tracing::info!(task_id = %running.task_id, "handed back on shutdown");
    }
    Ok(())
}

/// Counts a delivery as being processed while alive.
struct InProgress<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InProgress<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InProgress(counter)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a backend step through temporary errors (bounded by the worker's budget).
async fn step<T, F, Fut>(inner: &Inner, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let r = with_backend_retry(what, inner.config.backend_retry_budget, op).await;
    if let Err(e) = &r {
        if e.is_temporary() || matches!(e, Error::Timeout(_)) {
            WorkerMetrics::inc(&inner.metrics.backend_errors);
        }
    }
    r
}

async fn process(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    claim: Option<Claim>,
    abandon: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
    if let Err(e) = process_inner(inner, handler, &delivery, claim, abandon, slot).await {
        // The message was neither acked nor nacked: its lease will end and it will be
        // delivered again; the registry lease likewise lets the monitor recover the task.
        tracing::error!(
            queue = %delivery.queue,
            message_id = %delivery.message_id,
            error = %e,
            "giving up on a delivery for now; it will be redelivered when its lease ends"
        );
    }
}

async fn process_inner(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    d: &Delivery,
    claim: Option<Claim>,
    abandon: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) -> Result<()> {
    let bus = inner.backends.bus.as_ref();
    let tasks = inner.backends.tasks().as_ref();
    let claim = match claim {
        Some(c) => c,
        None => step(inner, "claim", || tasks.claim(d, &inner.claim)).await?,
    };
    let running = match claim {
        Claim::Claimed(t) => t,
        Claim::Malformed(reason) => {
            WorkerMetrics::inc(&inner.metrics.dead_lettered);
            return step(inner, "dead-letter", || bus.dead_letter(d, &reason)).await;
        }
        Claim::Missing(id) => {
            WorkerMetrics::inc(&inner.metrics.dead_lettered);
            let reason = format!("task {id} is not in the registry");
            return step(inner, "dead-letter", || bus.dead_letter(d, &reason)).await;
        }
        Claim::Unclaimable(task) if task.lease_expired(Utc::now()) && !task.attempts_left() => {
            // RUNNING under an expired lease with no attempt left: the task fails for good. (A
            // lease that ended just after the claim looked at it, with attempts left, is only
            // acked below: the monitor hands the stale task on.)
            return fail_expired(inner, d, &task).await;
        }
        Claim::Unclaimable(task) if redelivered_early(bus, d, &task) => {
            // A redelivery while another attempt's lease still runs: its worker may have died
            // (RabbitMQ requeues a dead connection's messages at once; NATS redelivers after
            // its ack wait, which may be shorter than the lease). Dropping it would leave the
            // task to the monitor; given back until the lease ends, it finds the task
            // claimable then (or failed for good: no attempt left), or renewed by a live
            // worker and comes back again, until its last allowed delivery, which is dropped
            // as below rather than dead-lettered.
            let wait = task
                .state
                .lease_until
                .map(|l| (l - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or_default()
                + REDELIVERY_MARGIN;
            WorkerMetrics::inc(&inner.metrics.deferred);
            tracing::debug!(task_id = %task.task_id, attempt = task.state.attempt, wait_ms = wait.as_millis() as u64, "redelivered while another attempt's lease runs; given back until it ends");
            return step(inner, "nack", || bus.nack(d, wait)).await;
        }
        Claim::Unclaimable(task) => {
            WorkerMetrics::inc(&inner.metrics.skipped);
            tracing::debug!(task_id = %task.task_id, status = %task.state.status, "delivery for a task that is not claimable; dropping it");
            return step(inner, "ack", || bus.ack(d)).await;
        }
    };
    let id = running.task_id.clone();
    let attempt = running.state.attempt;
    WorkerMetrics::inc(&inner.metrics.claimed);
    tracing::debug!(task_id = %id, attempt, "claimed");

    let started = Instant::now();
    let outcome = run_with_lease(inner, handler, &running, d, abandon).await;
    inner.metrics.record_attempt(started.elapsed());
    // The handler is done: the slot runs the next task while this outcome is recorded (the
    // recording permit bounds how many are, and a shutdown waits for them).
    let _recording = inner.recording.clone().acquire_owned().await;
    drop(slot);
    let now = Utc::now();
    match outcome {
        Outcome::LeaseLost => {
            WorkerMetrics::inc(&inner.metrics.lease_lost);
            tracing::warn!(task_id = %id, attempt, "lease lost to a newer attempt; discarding this attempt");
            step(inner, "ack", || bus.ack(d)).await
        }
        Outcome::Abandoned => hand_back(inner, d, &running).await,
        Outcome::Done(Ok(result)) => {
            let next = TaskState {
                status: TaskStatus::Completed,
                result: Some(result),
                error: None,
                lease_until: None,
                finished_at: Some(now),
                updated_at: now,
                ..running.state.clone()
            };
            if let Some(r) = record(inner, d, &running, next, Settle::Ack).await? {
                WorkerMetrics::inc(&inner.metrics.completed);
                finished(inner, r).await;
            }
            Ok(())
        }
        Outcome::Done(Err(err)) => {
            let retry = err.retryable && running.attempts_left();
            let backoff = inner.config.retry.delay(running.charged_attempts());
            let next = TaskState {
                status: if retry {
                    TaskStatus::Pending
                } else {
                    TaskStatus::Failed
                },
                error: Some(err.message.clone()),
                lease_until: None,
                finished_at: (!retry).then_some(now),
                // The monitor must not take a task whose retry waits out its backoff for one
                // whose message was lost.
                ready_at: match retry && !backoff.is_zero() {
                    true => Some(crate::clock::after(now, backoff)),
                    false => running.state.ready_at,
                },
                updated_at: now,
                ..running.state.clone()
            };
            let settle = if retry {
                Settle::Nack(backoff)
            } else {
                Settle::Ack
            };
            tracing::info!(task_id = %id, attempt, retry, error = %err.message, "attempt failed");
            if let Some(r) = record(inner, d, &running, next, settle).await? {
                if retry {
                    WorkerMetrics::inc(&inner.metrics.retried);
                } else {
                    WorkerMetrics::inc(&inner.metrics.failed);
                }
                finished(inner, r).await;
            }
            Ok(())
        }
    }
}

/// Records an outcome by compare-and-set and settles the message ([`TaskQueue::record`]).
/// `None` when the task changed under this attempt (its lease was lost): the message was acked
/// and the outcome discarded.
async fn record(
    inner: &Inner,
    d: &Delivery,
    current: &Task,
    next: TaskState,
    settle: Settle,
) -> Result<Option<Recorded>> {
    let tasks = inner.backends.tasks().as_ref();
    match step(inner, "record outcome", || {
        tasks.record(d, current, next.clone(), settle)
    })
    .await
    {
        Ok(r) => Ok(Some(r)),
        Err(Error::Conflict { .. }) => {
            WorkerMetrics::inc(&inner.metrics.lease_lost);
            tracing::warn!(task_id = %current.task_id, "the task changed under this attempt (lease lost); outcome discarded");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// After an outcome is recorded: notify the observer, move dependents on.
async fn finished(inner: &Inner, r: Recorded) {
    if !r.dependents.is_empty() {
        if let Err(e) = flow::move_dependents_on(&inner.backends, &r.dependents).await {
            tracing::warn!(task_id = %r.task.task_id, error = %e, "could not update dependents now; the monitor will");
        }
    }
    if let Some(obs) = &inner.observer {
        obs(&Finished {
            task: r.task,
            at: Instant::now(),
        });
    }
}

/// Fails a RUNNING task whose lease expired with no attempts left, and acks its message.
async fn fail_expired(inner: &Inner, d: &Delivery, task: &Task) -> Result<()> {
    let now = Utc::now();
    let next = TaskState {
        status: TaskStatus::Failed,
        error: Some(format!(
            "lease expired on attempt {} of {} (worker {} died or hung)",
            task.charged_attempts(),
            task.max_attempts,
            task.state.worker_id.as_deref().unwrap_or("?")
        )),
        lease_until: None,
        finished_at: Some(now),
        updated_at: now,
        ..task.state.clone()
    };
    let tasks = inner.backends.tasks().as_ref();
    match step(inner, "fail expired", || {
        tasks.record(d, task, next.clone(), Settle::Ack)
    })
    .await
    {
        Ok(r) => {
            WorkerMetrics::inc(&inner.metrics.failed);
            finished(inner, r).await;
            Ok(())
        }
        // Someone else moved it on; the message was acked.
        Err(Error::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

enum Outcome {
    Done(std::result::Result<Value, TaskError>),
    LeaseLost,
    Abandoned,
}

/// Runs the handler while renewing both leases; stops early if the lease is lost or the
/// worker abandons running tasks at its shutdown deadline.
async fn run_with_lease(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    running: &Task,
    d: &Delivery,
    mut abandon: watch::Receiver<bool>,
) -> Outcome {
    let ctx = TaskContext::new(
        running.clone(),
        inner.worker_id.clone(),
        inner.backends.registry.clone(),
    );
    let timeout = inner.config.handler_timeout;
    let work = async move {
        let fut = AssertUnwindSafe(handler.handle(ctx)).catch_unwind();
        let r = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(TaskError::retryable(format!(
                        "handler timed out after {t:?}"
                    )))
                }
            },
            None => fut.await,
        };
        r.unwrap_or_else(|panic| {
            Err(TaskError::retryable(format!(
                "handler panicked: {}",
                panic_text(panic.as_ref())
            )))
        })
    };
    tokio::pin!(work);
    let every = inner.config.heartbeat_every();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut current = running.clone();
    loop {
        tokio::select! {
            r = &mut work => {
                if let Err(e) = &r {
                    if e.message.starts_with("handler panicked") {
                        WorkerMetrics::inc(&inner.metrics.panics);
                    }
                }
                return Outcome::Done(r);
            }
            _ = abandoned(&mut abandon) => return Outcome::Abandoned,
            _ = beat.tick() => {
                match heartbeat(inner, &current, d).await {
                    Ok(t) => current = t,
                    Err(Error::Conflict { .. }) | Err(Error::TaskNotFound(_)) => return Outcome::LeaseLost,
                    Err(e) => {
                        WorkerMetrics::inc(&inner.metrics.backend_errors);
                        tracing::warn!(task_id = %running.task_id, error = %e, "heartbeat failed; will try again");
                    }
                }
            }
        }
    }
}

/// Resolves when the worker abandons running tasks; never when the signal's sender is gone
/// (a dropped or killed worker must not hand anything back: it behaves like a crash).
async fn abandoned(signal: &mut watch::Receiver<bool>) {
    loop {
        if *signal.borrow_and_update() {
            return;
        }
        if signal.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn heartbeat(inner: &Inner, current: &Task, d: &Delivery) -> Result<Task> {
    let now = Utc::now();
    let lease = inner.config.lease;
    let next = TaskState {
        lease_until: Some(crate::clock::after(now, lease)),
        heartbeat_at: Some(now),
        updated_at: now,
        ..current.state.clone()
    };
    let t = inner
        .backends
        .registry
        .transition(&current.task_id, current.expect(), next)
        .await?;
    if let Err(e) = inner.backends.bus.extend(d, lease).await {
        tracing::warn!(task_id = %current.task_id, error = %e, "could not extend the message lease");
    }
    Ok(t)
}
