//! The [`Worker`]: serves queues with N concurrent slots, claims by compare-and-set, keeps its
//! lease alive, records outcomes, retries with backoff, and shuts down gracefully.
//!
//! - `config`: [`WorkerConfig`] and the worker's id;
//! - this file: building a [`Worker`] and starting it;
//! - `handle`: the running [`WorkerHandle`] and its graceful shutdown;
//! - `fetch`: one supervised fetch loop per queue;
//! - `process`: one delivery, from claim to recorded outcome;
//! - `lease`: running the handler under a renewed lease;
//! - `permits`: the permits of a limited queue (rate, concurrency cap across workers).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::bundle::Backends;
use crate::bus::{Delivery, FetchOptions};
use crate::error::{Error, Result};
use crate::model::{QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::queue_limits::QueueLimits;
use crate::task_queue::{Claim, ClaimSpec, Recorded, Settle};

use super::control::{pause_read_every, CONTROL_TOPIC};
use super::flow;
use super::handler::{Cancellation, Handler, TaskContext, TaskError};
use super::metrics::{MetricsSnapshot, WorkerMetrics};
use super::retry::{with_backend_retry, Backoff};
use super::roster::{host_name, RunningTask, WorkerInfo, WORKERS_TOPIC};

mod cancel;
mod config;
mod fetch;
mod handle;
mod lease;
mod permits;
mod process;

pub use cancel::{CancelNotice, CANCELS_TOPIC};
pub use config::{default_worker_id, WorkerConfig};
pub use handle::{ShutdownReport, WorkerHandle};

use cancel::*;
use fetch::*;
use lease::*;
use permits::*;
use process::*;

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
    /// The tasks running now, for the worker's announcements.
    running: parking_lot::Mutex<BTreeMap<TaskId, RunningTask>>,
    /// The cancellation signals of the running attempts.
    cancels: Signals,
    /// When the worker was created.
    started_at: chrono::DateTime<Utc>,
    /// The paused queues as last read from the registry; `None` until the first read.
    paused: watch::Sender<Option<Arc<BTreeSet<QueueName>>>>,
    /// The limits set at runtime as last read from the registry (read before the paused
    /// queues, so a fetch loop that waited for those knows these).
    limits: watch::Sender<Arc<BTreeMap<QueueName, QueueLimits>>>,
    /// The rate slots of started tasks, kept for the next starts (see `permits`).
    kept_slots: Arc<KeptSlots>,
}

impl Inner {
    /// What this worker says about itself now.
    fn info(&self, stopping: bool) -> WorkerInfo {
        let mut running: Vec<RunningTask> = self.running.lock().values().cloned().collect();
        running.sort_by_key(|r| r.since);
        let mut queues: Vec<QueueName> = self.handlers.keys().cloned().collect();
        queues.sort();
        WorkerInfo {
            worker_id: self.worker_id.to_string(),
            host: host_name(),
            pid: std::process::id(),
            queues,
            concurrency: self.config.concurrency,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at,
            seen_at: Utc::now(),
            every_ms: self
                .config
                .announce_every
                .map_or(0, |d| d.as_millis() as u64),
            running,
            stopping,
        }
    }

    /// Publishes this worker's announcement (at-most-once, like every event).
    async fn announce(&self, stopping: bool) {
        let bus = self.backends.bus.as_ref();
        if !bus.may_have_subscribers(WORKERS_TOPIC) {
            return;
        }
        if let Err(e) = bus
            .publish(WORKERS_TOPIC, &self.info(stopping).encode())
            .await
        {
            tracing::debug!(worker_id = %self.worker_id, error = %e, "could not announce the worker");
        }
    }
}

impl Inner {
    /// Whether `queue` is paused, as last read (not paused before the first read).
    fn is_paused(&self, queue: &QueueName) -> bool {
        self.paused
            .borrow()
            .as_ref()
            .is_some_and(|set| set.contains(queue))
    }

    /// The limits `queue` is under now: set at runtime, else configured; `None`: unlimited.
    fn limits_of(&self, queue: &QueueName) -> Option<QueueLimits> {
        let runtime = self.limits.borrow().get(queue).copied();
        runtime
            .or_else(|| self.config.queue_limits.get(queue).copied())
            .filter(|l| !l.is_unlimited())
    }

    /// Reads the limits set at runtime; keeps the last known ones when the read fails (a
    /// backend that cannot store limits has none).
    async fn read_limits(&self) -> Result<()> {
        let map = match self.backends.registry.queue_limits().await {
            Ok(map) => map,
            Err(Error::Unsupported { .. }) => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        self.limits.send_if_modified(|known| {
            if **known == map {
                return false;
            }
            for q in self.handlers.keys() {
                if known.get(q) != map.get(q) {
                    let now = map.get(q).map_or("none".to_string(), |l| l.to_string());
                    tracing::info!(worker_id = %self.worker_id, queue = %q, limits = %now, "queue limits read");
                }
            }
            *known = Arc::new(map);
            true
        });
        Ok(())
    }
}

/// Reads the queues' limits and the paused queues at once, then every `every` and whenever a
/// pause or limit change is published on [`CONTROL_TOPIC`], until `stop` or `kill` flips. A failed read keeps the last
/// known set and is tried again sooner (the fetch loops wait for the first successful one).
async fn pause_loop(
    inner: Arc<Inner>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    mut kill: watch::Receiver<bool>,
) {
    let mut hints = match inner.backends.bus.subscribe(CONTROL_TOPIC).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(worker_id = %inner.worker_id, error = %e, "no pause hints; reading the paused queues every {every:?} only");
            None
        }
    };
    let mut failures = 0u32;
    loop {
        let read = match inner.read_limits().await {
            Ok(()) => inner.backends.registry.paused_queues().await,
            Err(e) => Err(e),
        };
        let wait = match read {
            Ok(set) => {
                failures = 0;
                let set = Arc::new(set);
                inner.paused.send_if_modified(|known| {
                    if known.as_deref() == Some(&*set) {
                        return false;
                    }
                    for q in inner.handlers.keys() {
                        let now = set.contains(q);
                        if known.as_ref().map(|k| k.contains(q)) != Some(now) {
                            tracing::info!(worker_id = %inner.worker_id, queue = %q, paused = now, "queue pause state read");
                        }
                    }
                    *known = Some(set.clone());
                    true
                });
                every
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(worker_id = %inner.worker_id, error = %e, "could not read the paused queues or the queues' limits; keeping the last known");
                Backoff::backend().delay(failures).min(every)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = next_hint(&mut hints) => {}
            _ = stop.changed() => return,
            _ = kill.changed() => return,
        }
    }
}

/// The next pause hint; never, without a subscription (or once it closed).
async fn next_hint(hints: &mut Option<crate::bus::Subscription>) {
    match hints {
        Some(sub) => {
            if sub.recv().await.is_none() {
                *hints = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Announces the worker every `every` until `stop` or `kill` flips.
async fn announce_loop(
    inner: Arc<Inner>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    mut kill: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => inner.announce(false).await,
            _ = stop.changed() => return,
            _ = kill.changed() => return,
        }
    }
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
                running: Default::default(),
                cancels: Default::default(),
                started_at: Utc::now(),
                paused: watch::channel(None).0,
                limits: watch::channel(Arc::new(BTreeMap::new())).0,
                kept_slots: Default::default(),
                claim: ClaimSpec {
                    worker_id: Arc::from(config.worker_id.as_str()),
                    lease: config.lease,
                },
                config,
            },
        }
    }

    /// Serves `queue` with `handler`. Errors on a malformed queue name, and on a queue this
    /// worker already serves (the second handler would silently replace the first).
    pub fn handle(mut self, queue: &str, handler: Arc<dyn Handler>) -> Result<Self> {
        let q = QueueName::parse(queue)?;
        if self.inner.handlers.contains_key(&q) {
            return Err(Error::invalid(
                "queue",
                format!(
                    "queue {q} already has a handler on this worker; one handler serves a queue"
                ),
            ));
        }
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
        loops.push(tokio::spawn(pause_loop(
            inner.clone(),
            pause_read_every(inner.config.announce_every, inner.config.heartbeat_every()),
            stop_rx.clone(),
            kill_rx.clone(),
        )));
        let announcer = inner.config.announce_every.map(|every| {
            tokio::spawn(announce_loop(
                inner.clone(),
                every,
                stop_rx.clone(),
                kill_rx.clone(),
            ))
        });
        let canceller = Some(tokio::spawn(cancel::listen(inner.clone(), kill_rx.clone())));
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
            announcer,
            canceller,
            stop_tx,
            abandon_tx,
            kill_tx,
        })
    }
}
