//! One delivery, from its claim to its recorded outcome and settled message.

use super::*;
use tracing::Instrument;

/// How long after a running attempt's lease ends a redelivery given back meanwhile comes again
/// (clocks of different machines differ a little).
pub(super) const REDELIVERY_MARGIN: Duration = Duration::from_secs(1);

/// Whether delivery `d` of a task found unclaimable is a redelivery (the delivery before it was
/// not settled: its worker may have died) made while another attempt's lease still runs, and
/// not the last delivery the bus allows.
pub(super) fn redelivered_early(bus: &dyn crate::bus::Bus, d: &Delivery, task: &Task) -> bool {
    task.state.status == TaskStatus::Running
        && !task.lease_expired(Utc::now())
        && d.delivery_count > 1
        && d.delivery_count < bus.max_deliveries()
}

/// Why a task is handed back: its worker shuts down.
pub(super) const SHUTTING_DOWN: &str = "a worker shutting down";
/// Why a task is handed back: its queue was paused while the fetch that claimed it was on its
/// way.
pub(super) const QUEUE_PAUSED: &str = "a worker whose queue was paused";

/// Why a task is handed back: its queue's limits changed while the fetch that claimed it was
/// on its way, and no permit of the new ones was free.
pub(super) const QUEUE_LIMITED: &str = "a worker whose queue's limits changed";

/// Hands a claimed task back to its queue (RUNNING → PENDING, message released at once) without
/// charging the attempt: a worker shutting down ([`SHUTTING_DOWN`]), or a queue paused while a
/// fetch was on its way ([`QUEUE_PAUSED`]).
pub(super) async fn hand_back(
    inner: &Inner,
    d: &Delivery,
    running: &Task,
    why: &'static str,
) -> Result<()> {
    let next = TaskState {
        status: TaskStatus::Pending,
        handed_back: running.state.handed_back.saturating_add(1),
        error: Some(format!("handed back by {why}")),
        lease_until: None,
        updated_at: Utc::now(),
        ..running.state.clone()
    };
    if record(inner, d, running, next, Settle::Nack(Duration::ZERO))
        .await?
        .is_some()
    {
        WorkerMetrics::inc(&inner.metrics.handed_back);
        tracing::info!(task_id = %running.task_id, "handed back by {why}");
    }
    Ok(())
}

/// Lists a claimed task among the worker's running tasks while alive.
struct Listed<'a>(&'a Inner, TaskId);

impl<'a> Listed<'a> {
    fn enter(inner: &'a Inner, task: &Task) -> Self {
        inner.running.lock().insert(
            task.task_id.clone(),
            RunningTask {
                task_id: task.task_id.clone(),
                queue: task.queue.clone(),
                attempt: task.state.attempt,
                since: task.state.started_at.unwrap_or_else(Utc::now),
            },
        );
        Listed(inner, task.task_id.clone())
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.0.running.lock().remove(&self.1);
    }
}

/// Counts a delivery as being processed while alive.
pub(super) struct InProgress<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InProgress<'a> {
    pub(super) fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
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
pub(super) async fn step<T, F, Fut>(inner: &Inner, what: &str, op: F) -> Result<T>
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

pub(super) async fn process(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    claim: Option<Claim>,
    abandon: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
    queue_permit: QueuePermit,
) {
    if let Err(e) = process_inner(
        inner,
        handler,
        &delivery,
        claim,
        abandon,
        slot,
        queue_permit,
    )
    .await
    {
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

pub(super) async fn process_inner(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    d: &Delivery,
    claim: Option<Claim>,
    abandon: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
    mut queue_permit: QueuePermit,
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
    if running.past_deadline(running.state.started_at.unwrap_or_else(Utc::now)) {
        // Claimed too late: failed unrun rather than started after its deadline.
        return fail_late(inner, d, &running).await;
    }
    let _listed = Listed::enter(inner, &running);
    WorkerMetrics::inc(&inner.metrics.claimed);
    tracing::debug!(task_id = %id, attempt, "claimed");

    let started = Instant::now();
    let span = crate::engine::trace::process_span(bus.backend(), &running);
    let outcome = run_with_lease(inner, handler, &running, d, abandon, &mut queue_permit)
        .instrument(span.clone())
        .await;
    if matches!(outcome, Outcome::Done(Err(_), _)) {
        crate::engine::trace::failed(&span);
    }
    inner.metrics.record_attempt(started.elapsed());
    // The queue's concurrency slot is free again as the handler returned.
    drop(queue_permit);
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
        Outcome::Abandoned => hand_back(inner, d, &running, SHUTTING_DOWN).await,
        Outcome::Cancelled { dropped } => {
            // The registry already says CANCELLED (that is how the worker learned it); its
            // dependents were failed by the canceller. Only the message is left to settle.
            WorkerMetrics::inc(&inner.metrics.cancelled);
            tracing::info!(task_id = %id, attempt, dropped, "cancelled while running; attempt ended");
            step(inner, "ack", || bus.ack(d)).await
        }
        Outcome::Done(Ok(result), progress) => {
            let next = TaskState {
                status: TaskStatus::Completed,
                result: Some(result),
                progress,
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
        Outcome::Done(Err(err), progress) => {
            let backoff = inner.config.retry.delay(running.charged_attempts());
            let late = running.past_deadline(crate::clock::after(now, backoff));
            let retry = err.retryable && running.attempts_left() && !late;
            let message = match err.retryable && running.attempts_left() && late {
                true => format!(
                    "{}; not retried: the retry would start after the task's deadline {}",
                    err.message,
                    running.deadline.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
                false => err.message.clone(),
            };
            let next = TaskState {
                status: if retry {
                    TaskStatus::Pending
                } else {
                    TaskStatus::Failed
                },
                error: Some(message.clone()),
                progress,
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
            tracing::info!(task_id = %id, attempt, retry, error = %message, "attempt failed");
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
pub(super) async fn record(
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
pub(super) async fn finished(inner: &Inner, r: Recorded) {
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

/// Fails a task claimed after its deadline without running it, and acks its message.
pub(super) async fn fail_late(inner: &Inner, d: &Delivery, running: &Task) -> Result<()> {
    let now = Utc::now();
    let deadline = running.deadline.map(|t| t.to_rfc3339()).unwrap_or_default();
    let next = TaskState {
        status: TaskStatus::Failed,
        error: Some(format!(
            "deadline {deadline} passed before a worker started it (claimed at {}); not run",
            running.state.started_at.unwrap_or(now).to_rfc3339()
        )),
        lease_until: None,
        finished_at: Some(now),
        updated_at: now,
        ..running.state.clone()
    };
    tracing::info!(task_id = %running.task_id, %deadline, "claimed after its deadline; failed unrun");
    if let Some(r) = record(inner, d, running, next, Settle::Ack).await? {
        WorkerMetrics::inc(&inner.metrics.expired_deadline);
        WorkerMetrics::inc(&inner.metrics.failed);
        finished(inner, r).await;
    }
    Ok(())
}

/// Fails a RUNNING task whose lease expired with no attempts left, and acks its message.
pub(super) async fn fail_expired(inner: &Inner, d: &Delivery, task: &Task) -> Result<()> {
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
