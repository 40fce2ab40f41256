//! One fetch loop per queue, supervised: fetch, claim, and hand each delivery to a free slot.

use super::*;

/// Runs [`fetch_loop`] for `queue`, starting it again after a panic (a bug in a backend or in
/// the engine: without this the queue would silently no longer be served while the worker
/// looked alive). The permits the loop held are released by the unwinding; a fetch it had on
/// its way is left to its lease, as after a crash.
pub(super) async fn supervised_fetch_loop(
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
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

pub(super) async fn fetch_loop(
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
pub(super) async fn return_unstarted(
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
