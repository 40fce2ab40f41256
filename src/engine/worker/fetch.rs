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
    let mut pauses = inner.paused.subscribe();
    let mut limit_changes = inner.limits.subscribe();
    // Looks at the queue's slots in a row that found none free.
    let mut looks = 0u32;
    // The rate slot found ending first by the last look, tried first by the next.
    let mut hint: Option<String> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if !wait_while_paused(&inner, &queue, &mut pauses, &mut stop).await {
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
        // A limited queue's permits come before the fetch: a task over the limit stays in the
        // broker untouched (no attempt charged, no delivery counted).
        let limits_taken = inner.limits_of(&queue);
        let mut queue_permits = match limits_taken {
            None => (0..permits.len())
                .map(|_| QueuePermit::none(inner.backends.locks.clone()))
                .collect(),
            Some(limits) => {
                match take_permits(
                    &inner,
                    &queue,
                    &limits,
                    permits.len(),
                    looks,
                    &mut hint,
                    true,
                )
                .await
                {
                    Ok(Ok(taken)) => {
                        looks = 0;
                        permits.truncate(taken.len());
                        // A kept rate slot is taken a little before its last interval ends;
                        // its fetch waits for the end.
                        if let Some(at) = taken.iter().filter_map(QueuePermit::not_before).max() {
                            let left = at.saturating_duration_since(Instant::now());
                            tokio::select! {
                                _ = stop.changed() => return,
                                _ = tokio::time::sleep(left) => {}
                            }
                        }
                        taken
                    }
                    Ok(Err(wait)) => {
                        // The worker's slots are free for its other queues meanwhile.
                        looks += 1;
                        drop(permits);
                        let began = Instant::now();
                        limit_changes.borrow_and_update();
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = limit_changes.changed() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                        inner.metrics.record_limit_wait(began.elapsed());
                        continue;
                    }
                    Err(e) => {
                        errors += 1;
                        WorkerMetrics::inc(&inner.metrics.backend_errors);
                        tracing::warn!(queue = %queue, error = %e, "could not take the queue's permits; retrying");
                        drop(permits);
                        tokio::time::sleep(Backoff::backend().delay(errors)).await;
                        continue;
                    }
                }
            }
        };
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
        // Paused while the fetch was on its way: what it brought is handed back unrun.
        let paused = inner.is_paused(&queue);
        // Limited (or limited otherwise) while the fetch was on its way: its tasks run only
        // with permits of the limits now; the others are handed back unrun.
        let mut queue_permits: Vec<Option<QueuePermit>> =
            match inner.limits_of(&queue) == limits_taken {
                true => queue_permits.drain(..).map(Some).collect(),
                false => {
                    drop(queue_permits);
                    permits_now(&inner, &queue, deliveries.len()).await
                }
            };
        // Permits left over (the fetch brought fewer tasks) are given back as they drop.
        let held = permits.drain(..).zip(queue_permits.drain(..));
        for ((delivery, claim), (permit, queue_permit)) in deliveries.into_iter().zip(held) {
            let inner = inner.clone();
            if stopping || paused || queue_permit.is_none() {
                let handler = handler.clone();
                let why = if stopping {
                    SHUTTING_DOWN
                } else if paused {
                    QUEUE_PAUSED
                } else {
                    QUEUE_LIMITED
                };
                let queue_permit =
                    queue_permit.unwrap_or_else(|| QueuePermit::none(inner.backends.locks.clone()));
                tokio::spawn(async move {
                    let _busy = InProgress::enter(&inner.in_progress);
                    return_unstarted(&inner, handler, delivery, claim, permit, queue_permit, why)
                        .await;
                });
                continue;
            }
            let queue_permit =
                queue_permit.unwrap_or_else(|| QueuePermit::none(inner.backends.locks.clone()));
            let handler = handler.clone();
            let abandon = abandon.clone();
            let mut kill = kill.clone();
            tokio::spawn(async move {
                let _busy = InProgress::enter(&inner.in_progress);
                tokio::select! {
                    _ = kill.changed() => {}
                    // Boxed: the processing future is large, and tokio moves a spawned future
                    // several times; moving a pointer instead is measurably cheaper.
                    _ = Box::pin(process(&inner, handler, delivery, claim, abandon, permit, queue_permit)) => {}
                }
            });
        }
    }
}

/// Waits until the paused queues have been read once and `queue` is not among them. Returns
/// false when the worker stops meanwhile.
async fn wait_while_paused(
    inner: &Inner,
    queue: &QueueName,
    pauses: &mut watch::Receiver<Option<Arc<std::collections::BTreeSet<QueueName>>>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut logged = false;
    loop {
        let state = pauses.borrow_and_update().clone();
        match state {
            Some(set) if !set.contains(queue) => return true,
            Some(_) if !logged => {
                tracing::info!(worker_id = %inner.worker_id, queue = %queue, "queue paused; claiming nothing from it until it is resumed");
                logged = true;
            }
            _ => {}
        }
        tokio::select! {
            changed = pauses.changed() => if changed.is_err() { return !*stop.borrow() },
            _ = stop.changed() => return false,
        }
    }
}

/// A delivery fetched while the worker was stopping (or its queue paused): its task is handed back unrun (a claimed
/// task goes back to PENDING at no attempt's cost, an unclaimed message is released at once);
/// deliveries that would not run a handler anyway (malformed, missing or unclaimable tasks)
/// are settled as usual.
pub(super) async fn return_unstarted(
    inner: &Inner,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    claim: Option<Claim>,
    slot: OwnedSemaphorePermit,
    queue_permit: QueuePermit,
    why: &'static str,
) {
    let result = match claim {
        Some(Claim::Claimed(running)) => hand_back(inner, &delivery, &running, why).await,
        None => {
            let bus = inner.backends.bus.as_ref();
            step(inner, "release", || bus.nack(&delivery, Duration::ZERO)).await
        }
        Some(other) => {
            // Settled without running the handler (only a claimed task runs it).
            let (_, abandon) = watch::channel(true);
            process(
                inner,
                handler,
                delivery,
                Some(other),
                abandon,
                slot,
                queue_permit,
            )
            .await;
            return;
        }
    };
    drop(slot);
    drop(queue_permit);
    if let Err(e) = result {
        tracing::error!(queue = %delivery.queue, message_id = %delivery.message_id, error = %e, "could not hand back a task fetched by {why}; it will be redelivered when its lease ends");
    }
}
