//! The engine suite's part on queue limits: a rate and a concurrency cap hold across two
//! workers with connections of their own (as two processes have), tasks over the limit wait
//! in the broker at no attempt's cost, and a limit set at runtime reaches a running worker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;

use crate::bundle::Backends;
use crate::engine::{
    handler_fn, Control, DispatchOptions, Dispatcher, TaskContext, TaskError, Worker, WorkerConfig,
    WorkerHandle,
};
use crate::model::{QueueName, Task, TaskId, TaskStatus};
use crate::queue_limits::QueueLimits;
use crate::testkit::{another_process, eventually, must};

const LIMIT: Duration = Duration::from_secs(60);

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

fn config(id: &str, q: &QueueName, limits: Option<QueueLimits>) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_string(),
        concurrency: 8,
        lease: Duration::from_secs(10),
        fetch_wait: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(10),
        backend_retry_budget: Duration::from_secs(20),
        announce_every: Some(Duration::from_millis(100)),
        queue_limits: limits.into_iter().map(|l| (q.clone(), l)).collect(),
        ..WorkerConfig::default()
    }
}

/// Dispatches `n` tasks on `q` at once (a backlog).
async fn backlog(d: &Dispatcher, q: &QueueName, n: usize) -> Vec<TaskId> {
    let tasks: Vec<Task> = (0..n)
        .map(|i| {
            d.build(q.as_str(), json!({"i": i}), 5, &DispatchOptions::default())
                .unwrap_or_else(|e| panic!("build a task: {e}"))
        })
        .collect();
    must("dispatch the backlog", d.dispatch_many(tasks))
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("dispatch: {e}")))
        .collect()
}

/// Every task of `ids`: a COMPLETED one was charged exactly one attempt, any other none (it
/// waited in the broker, untouched).
async fn no_attempt_charged_by_waiting(d: &Dispatcher, ids: &[TaskId]) -> usize {
    let mut completed = 0;
    for id in ids {
        let t = must(format!("get {id}"), d.get(id)).await;
        match t.status() {
            TaskStatus::Completed => {
                completed += 1;
                assert_eq!(t.charged_attempts(), 1, "a limited task was charged: {t:?}");
            }
            _ => assert_eq!(t.charged_attempts(), 0, "a waiting task was charged: {t:?}"),
        }
    }
    completed
}

/// A worker on `b` whose handler records when each task starts (and returns at once).
fn recording_worker(
    b: &Backends,
    id: &str,
    q: &QueueName,
    limits: QueueLimits,
    starts: Arc<Mutex<Vec<Instant>>>,
) -> WorkerHandle {
    Worker::new(b.clone(), config(id, q, Some(limits)))
        .handle(
            q.as_str(),
            handler_fn(move |ctx: TaskContext| {
                starts.lock().push(Instant::now());
                async move { Ok::<_, TaskError>(ctx.task.payload) }
            }),
        )
        .unwrap()
        .start()
        .unwrap()
}

/// A rate of 10/s over two workers with connections of their own and a backlog of far more:
/// no window of one second holds more than 10 starts, the 10 s from the first start hold
/// 100 ± 10, and no task was charged an attempt for waiting.
pub async fn a_rate_limit_holds_across_two_workers(b: &Backends) {
    let q = queue("rate_limited");
    let limits = must("limits", async { QueueLimits::parse(Some("10/s"), None) }).await;
    let d = Dispatcher::new(b.clone());
    let ids = backlog(&d, &q, 160).await;
    let other = another_process(b).await;
    let starts = Arc::new(Mutex::new(Vec::new()));
    let w1 = recording_worker(b, "rate-1", &q, limits, starts.clone());
    let w2 = recording_worker(&other, "rate-2", &q, limits, starts.clone());
    let first = eventually("a first start", LIMIT, || async {
        starts.lock().first().copied().ok_or("none yet".to_string())
    })
    .await;
    // Past the 10 s measured, so that a start just before their end is recorded.
    tokio::time::sleep(
        (first + Duration::from_millis(10_500)).saturating_duration_since(Instant::now()),
    )
    .await;
    w1.shutdown().await;
    w2.shutdown().await;
    let mut starts = starts.lock().clone();
    starts.sort();
    let second = Duration::from_secs(1);
    for (i, s) in starts.iter().enumerate() {
        let within = starts[i..].iter().take_while(|t| **t - *s < second).count();
        assert!(
            within <= 10,
            "{within} starts in the second from {:?} after the first (rate 10/s)",
            *s - first
        );
    }
    let measured = starts
        .iter()
        .filter(|t| **t - first < Duration::from_secs(10))
        .count();
    assert!(
        (90..=110).contains(&measured),
        "{measured} starts in the 10 s from the first; 100 ± 10 expected at 10/s"
    );
    let completed = no_attempt_charged_by_waiting(&d, &ids).await;
    assert!(
        completed < ids.len(),
        "the whole backlog ran: the rate held nothing back"
    );
}

/// A concurrency cap of 3 over two workers of 4 slots each with connections of their own:
/// never more than 3 handlers run at once, and 3 do.
pub async fn a_concurrency_cap_holds_across_two_workers(b: &Backends) {
    let q = queue("capped");
    let limits = must("limits", async { QueueLimits::parse(None, Some(3)) }).await;
    let d = Dispatcher::new(b.clone());
    let ids = backlog(&d, &q, 18).await;
    let other = another_process(b).await;
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let worker = |b: &Backends, id: &str| {
        let (running, most) = (running.clone(), most.clone());
        let mut cfg = config(id, &q, Some(limits));
        cfg.concurrency = 4;
        Worker::new(b.clone(), cfg)
            .handle(
                q.as_str(),
                handler_fn(move |ctx: TaskContext| {
                    let (running, most) = (running.clone(), most.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, TaskError>(ctx.task.payload)
                    }
                }),
            )
            .unwrap()
            .start()
            .unwrap()
    };
    let w1 = worker(b, "capped-1");
    let w2 = worker(&other, "capped-2");
    for id in &ids {
        let t = must(format!("wait {id}"), d.wait(id, LIMIT)).await;
        assert_eq!(t.status(), TaskStatus::Completed, "{t:?}");
    }
    w1.shutdown().await;
    w2.shutdown().await;
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} tasks ran at once under a cap of 3");
    assert_eq!(
        most, 3,
        "the cap of 3 was never reached (8 slots, 18 tasks)"
    );
    assert_eq!(no_attempt_charged_by_waiting(&d, &ids).await, ids.len());
}

/// A limit set at runtime reaches a worker that runs unlimited: it then runs one task at a
/// time; cleared, it runs several at once again.
pub async fn a_limit_set_at_runtime_reaches_a_running_worker(b: &Backends) {
    let q = queue("limited_live");
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let (r, m) = (running.clone(), most.clone());
    let w = Worker::new(b.clone(), config("limited-live", &q, None))
        .handle(
            q.as_str(),
            handler_fn(move |ctx: TaskContext| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, TaskError>(ctx.task.payload)
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let control = Control::new(b.clone());
    let one = must("limits", async { QueueLimits::parse(None, Some(1)) }).await;
    assert!(must("set the limit", control.set_limits(&q, &one)).await);
    assert_eq!(must("limits", control.limits()).await.get(&q), Some(&one));
    eventually("the worker sees the limit", LIMIT, || async {
        match w.queue_limits(&q) {
            Some(l) if l == one => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let d = Dispatcher::new(b.clone());
    let ids = backlog(&d, &q, 6).await;
    for id in &ids {
        must(format!("wait {id}"), d.wait(id, LIMIT)).await;
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "ran several at once under a cap of 1"
    );
    assert!(must("clear", control.set_limits(&q, &QueueLimits::default())).await);
    eventually("the worker sees the limit cleared", LIMIT, || async {
        match w.queue_limits(&q) {
            None => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let ids = backlog(&d, &q, 6).await;
    for id in &ids {
        must(format!("wait {id}"), d.wait(id, LIMIT)).await;
    }
    w.shutdown().await;
    assert!(
        most.load(Ordering::SeqCst) > 1,
        "cleared, the limit still held the worker to one task at a time"
    );
}
