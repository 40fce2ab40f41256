//! Running a handler under a lease renewed by heartbeats.

use super::*;

pub(super) enum Outcome {
    Done(std::result::Result<Value, TaskError>),
    LeaseLost,
    Abandoned,
}

/// Runs the handler while renewing both leases; stops early if the lease is lost or the
/// worker abandons running tasks at its shutdown deadline.
pub(super) async fn run_with_lease(
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
    let metrics = inner.metrics.clone();
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
    loop {
        tokio::select! {
            r = &mut work => return Outcome::Done(r),
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

pub(super) async fn heartbeat(inner: &Inner, current: &Task, d: &Delivery) -> Result<Task> {
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
