//! Running a handler under a lease renewed by heartbeats.

use super::*;

/// The shortest time between two progress writes of one attempt.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub(super) enum Outcome {
    /// The handler returned; with the attempt's last progress report.
    Done(std::result::Result<Value, TaskError>, Option<Value>),
    LeaseLost,
    Abandoned,
    /// An operator cancelled the task while it ran (the registry says CANCELLED at this
    /// attempt); `dropped` when the handler did not return within the grace.
    Cancelled {
        dropped: bool,
    },
}

/// Runs the handler while renewing both leases; stops early if the lease is lost or the
/// worker abandons running tasks at its shutdown deadline. A cancellation (a notice, or a
/// heartbeat that finds the task CANCELLED at this attempt) sets the handler's signal and gives
/// it `cancel_grace` to return; so does the attempt's timeout (the task's own, else the
/// worker's `handler_timeout`), after which the attempt fails retryably whatever the handler
/// returns.
pub(super) async fn run_with_lease(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    running: &Task,
    d: &Delivery,
    mut abandon: watch::Receiver<bool>,
    queue_permit: &mut QueuePermit,
) -> Outcome {
    let (_reachable, cancel_tx, signal) = Reachable::enter(inner, running);
    let mut notice = cancel_tx.subscribe();
    let (progress_tx, mut progress) = watch::channel(running.state.progress.clone());
    let ctx = TaskContext::new(
        running.clone(),
        inner.worker_id.clone(),
        inner.backends.registry.clone(),
    )
    .with_cancellation(signal)
    .with_progress(Arc::new(progress_tx));
    let metrics = inner.metrics.clone();
    // A rate slot counts the start from the handler's first poll on (see `permits`).
    let mut start = queue_permit.started();
    let work = async move {
        let mut fut = AssertUnwindSafe(handler.handle(ctx)).catch_unwind();
        let fut = futures::future::poll_fn(move |cx| {
            let polled = fut.poll_unpin(cx);
            if let Some(mark) = start.take() {
                mark.fire();
            }
            polled
        });
        fut.await.unwrap_or_else(|panic| {
            // Counted here, where the panic is caught: a handler's own error that happens to
            // say "panicked" is not a panic.
            WorkerMetrics::inc(&metrics.panics);
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
    // The task's own timeout, else the worker's: when the attempt is stopped.
    let timeout = running.timeout.or(inner.config.handler_timeout);
    let timeout_at = timeout.map(|t| tokio::time::Instant::now() + crate::clock::capped(t));
    // Set once the attempt is being stopped (cancelled, or over its timeout): why, and when
    // the handler is dropped if it has not returned.
    let mut stopping: Option<(Stop, tokio::time::Instant)> = None;
    // A progress report waits for its write until then (at most one a second).
    let mut progress_due: Option<tokio::time::Instant> = None;
    let mut progress_written = tokio::time::Instant::now() - PROGRESS_EVERY;
    loop {
        let cancelling = matches!(stopping, Some((Stop::Cancelled, _)));
        let grace_until = stopping.map(|(_, until)| until);
        tokio::select! {
            // The signal, not `stopping`: a handler may return on a signal whose notice
            // branch has not run yet.
            r = &mut work => return match (stopping, *cancel_tx.borrow()) {
                (Some((Stop::TimedOut(t), _)), _) => timed_out(t, false, progress.borrow().clone()),
                (_, true) => Outcome::Cancelled { dropped: false },
                (_, false) => Outcome::Done(r, progress.borrow().clone()),
            },
            _ = abandoned(&mut abandon) => return Outcome::Abandoned,
            _ = tokio::time::sleep_until(grace_until.unwrap_or_else(tokio::time::Instant::now)), if grace_until.is_some() => {
                tracing::warn!(task_id = %running.task_id, attempt = running.state.attempt, grace = ?inner.config.cancel_grace, "stopped handler did not return within its grace; dropping it");
                return match stopping {
                    Some((Stop::TimedOut(t), _)) => timed_out(t, true, progress.borrow().clone()),
                    _ => Outcome::Cancelled { dropped: true },
                };
            }
            _ = tokio::time::sleep_until(timeout_at.unwrap_or_else(tokio::time::Instant::now)), if timeout_at.is_some() && stopping.is_none() => {
                let t = timeout.unwrap_or_default();
                // A cancel whose notice set the signal first wins: the task is CANCELLED.
                let why = match *cancel_tx.borrow() {
                    true => Stop::Cancelled,
                    false => Stop::TimedOut(t),
                };
                if let Stop::TimedOut(_) = why {
                    WorkerMetrics::inc(&inner.metrics.timed_out);
                    tracing::warn!(task_id = %running.task_id, attempt = running.state.attempt, timeout = ?t, "attempt ran over its timeout; signalling the handler");
                }
                let _ = cancel_tx.send(true);
                stopping = Some((why, tokio::time::Instant::now() + inner.config.cancel_grace));
            }
            _ = signalled(&mut notice), if stopping.is_none() => {
                // The notice is sent after the registry's change: the attempt is fenced off.
                stopping = Some((Stop::Cancelled, tokio::time::Instant::now() + inner.config.cancel_grace));
            }
            _ = reported(&mut progress), if !cancelling && progress_due.is_none() => {
                progress_due = Some(progress_written + PROGRESS_EVERY);
            }
            _ = tokio::time::sleep_until(progress_due.unwrap_or_else(tokio::time::Instant::now)), if !cancelling && progress_due.is_some() => {
                // Written as an early heartbeat: it renews the lease too.
                progress_due = None;
                progress_written = tokio::time::Instant::now();
                beat.reset();
                let report = progress.borrow_and_update().clone();
                match heartbeat(inner, &current, d, report).await {
                    Ok(t) => {
                        current = t;
                        crate::bus::publish_event(inner.backends.bus.as_ref(), &current).await;
                    }
                    Err(Error::Conflict { .. }) | Err(Error::TaskNotFound(_)) => {
                        if cancelled_at(inner, &current).await {
                            let _ = cancel_tx.send(true);
                            stopping = Some((Stop::Cancelled, grace_until.unwrap_or_else(|| tokio::time::Instant::now() + inner.config.cancel_grace)));
                        } else {
                            return Outcome::LeaseLost;
                        }
                    }
                    Err(e) => {
                        WorkerMetrics::inc(&inner.metrics.backend_errors);
                        tracing::warn!(task_id = %running.task_id, error = %e, "progress write failed; the next heartbeat carries it");
                    }
                }
            }
            // Also while a timed-out handler has its grace: the attempt still holds the task.
            _ = beat.tick(), if !cancelling => {
                let report = progress.borrow().clone();
                match heartbeat(inner, &current, d, report).await {
                    Ok(t) => {
                        current = t;
                        queue_permit.renew(inner.config.lease).await;
                    }
                    Err(Error::Conflict { .. }) | Err(Error::TaskNotFound(_)) => {
                        if cancelled_at(inner, &current).await {
                            tracing::info!(task_id = %running.task_id, attempt = running.state.attempt, "cancelled by an operator (seen at a heartbeat); signalling the handler");
                            let _ = cancel_tx.send(true);
                            stopping = Some((Stop::Cancelled, grace_until.unwrap_or_else(|| tokio::time::Instant::now() + inner.config.cancel_grace)));
                        } else {
                            return Outcome::LeaseLost;
                        }
                    }
                    Err(e) => {
                        WorkerMetrics::inc(&inner.metrics.backend_errors);
                        tracing::warn!(task_id = %running.task_id, error = %e, "heartbeat failed; will try again");
                    }
                }
            }
        }
    }
}

/// Why a running attempt is being stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// An operator cancelled the task (the registry says CANCELLED at this attempt).
    Cancelled,
    /// The attempt ran over its timeout (the task's own, else the worker's).
    TimedOut(Duration),
}

/// The outcome of an attempt stopped at its timeout: a retryable failure, whatever the
/// handler returned in its grace (its work was cut short).
fn timed_out(t: Duration, dropped: bool, progress: Option<Value>) -> Outcome {
    let how = match dropped {
        true => " (the handler did not return within its grace and was dropped)",
        false => "",
    };
    Outcome::Done(
        Err(TaskError::retryable(format!(
            "timed out after {}{how}",
            crate::clock::format_duration(t)
        ))),
        progress,
    )
}

/// Resolves when the handler reports progress; never once its context is gone.
async fn reported(rx: &mut watch::Receiver<Option<Value>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when the attempt's cancellation signal is set (never if its sender is gone).
async fn signalled(rx: &mut watch::Receiver<bool>) {
    let gone = rx.wait_for(|set| *set).await.is_err();
    if gone {
        std::future::pending::<()>().await;
    }
}

/// Whether the registry says the task was cancelled while this attempt ran (a read that fails
/// answers no: the attempt is then treated as having lost its lease, which it has).
async fn cancelled_at(inner: &Inner, current: &Task) -> bool {
    match inner.backends.registry.get(&current.task_id).await {
        Ok(Some(t)) => {
            t.state.status == TaskStatus::Cancelled && t.state.attempt == current.state.attempt
        }
        _ => false,
    }
}

/// Resolves when the worker abandons running tasks; never when the signal's sender is gone
/// (a dropped or killed worker must not hand anything back: it behaves like a crash).
pub(super) async fn abandoned(signal: &mut watch::Receiver<bool>) {
    loop {
        if *signal.borrow_and_update() {
            return;
        }
        if signal.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub(super) async fn heartbeat(
    inner: &Inner,
    current: &Task,
    d: &Delivery,
    progress: Option<Value>,
) -> Result<Task> {
    let now = Utc::now();
    let lease = inner.config.lease;
    let next = TaskState {
        lease_until: Some(crate::clock::after(now, lease)),
        heartbeat_at: Some(now),
        updated_at: now,
        progress,
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
