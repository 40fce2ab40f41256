//! Per-task dispatch options end to end: timeouts, deadlines and unique keys, on a given set of
//! backends (listed in [`engine_suite!`](crate::engine_suite)).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use crate::bundle::Backends;
use crate::engine::{
    handler_fn, Backoff, DispatchOptions, Dispatcher, TaskContext, TaskError, Worker, WorkerConfig,
    WorkerHandle,
};
use crate::error::Error;
use crate::model::{TaskId, TaskStatus};
use crate::registry::TaskFilter;
use crate::testkit::eventually;

const LIMIT: Duration = Duration::from_secs(60);

fn config(id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_string(),
        concurrency: 4,
        lease: Duration::from_secs(5),
        fetch_wait: Duration::from_millis(200),
        retry: Backoff {
            base: Duration::from_millis(50),
            factor: 2.0,
            max: Duration::from_millis(200),
            jitter: 0.0,
        },
        cancel_grace: Duration::from_millis(300),
        shutdown_timeout: Duration::from_secs(10),
        backend_retry_budget: Duration::from_secs(20),
        ..WorkerConfig::default()
    }
}

fn start(
    b: &Backends,
    cfg: WorkerConfig,
    queue: &str,
    h: Arc<dyn crate::engine::Handler>,
) -> WorkerHandle {
    Worker::new(b.clone(), cfg)
        .handle(queue, h)
        .unwrap()
        .start()
        .unwrap()
}

async fn finished(d: &Dispatcher, id: &TaskId) -> crate::Task {
    d.wait(id, LIMIT)
        .await
        .unwrap_or_else(|e| panic!("task {id} did not finish: {e}"))
}

fn error_of(t: &crate::Task) -> &str {
    t.state.error.as_deref().unwrap_or("")
}

/// A task's own timeout stops an attempt that runs over it: the handler's signal is set (a
/// handler that listens returns, and what it returns is discarded), the attempt fails
/// retryably, and the next attempt runs and completes. A handler that ignores the signal is
/// dropped after the grace, and with no attempt left the task fails with the reason.
pub async fn a_task_over_its_timeout_is_stopped_and_retried(b: &Backends) {
    let saw_signal = Arc::new(AtomicU32::new(0));
    let saw = saw_signal.clone();
    let h = handler_fn(move |ctx: TaskContext| {
        let saw = saw.clone();
        async move {
            match (ctx.task.payload["mode"].as_str(), ctx.task.state.attempt) {
                (Some("listens"), 1) => {
                    ctx.cancelled().await;
                    saw.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, TaskError>(json!("a result after the timeout"))
                }
                (Some("stubborn"), _) => {
                    std::future::pending::<()>().await;
                    Ok(json!("never"))
                }
                _ => Ok(json!("in time")),
            }
        }
    });
    let w = start(b, config("timeout-worker"), "timeouts", h);
    let d = Dispatcher::new(b.clone());
    let id = d
        .task("timeouts")
        .json(json!({"mode": "listens"}))
        .timeout(Duration::from_millis(300))
        .max_attempts(3)
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.get(&id).await.unwrap().timeout,
        Some(Duration::from_millis(300)),
        "the timeout is stored with the task"
    );
    let done = finished(&d, &id).await;
    assert_eq!(done.status(), TaskStatus::Completed, "{done:?}");
    assert_eq!(done.state.attempt, 2, "attempt 1 timed out, attempt 2 ran");
    assert_eq!(done.state.result, Some(json!("in time")));
    assert_eq!(
        saw_signal.load(Ordering::SeqCst),
        1,
        "the handler saw its signal"
    );

    let id = d
        .task("timeouts")
        .json(json!({"mode": "stubborn"}))
        .timeout(Duration::from_millis(200))
        .max_attempts(1)
        .send()
        .await
        .unwrap();
    let failed = finished(&d, &id).await;
    assert_eq!(failed.status(), TaskStatus::Failed, "{failed:?}");
    assert!(
        error_of(&failed).starts_with("timed out after 200ms")
            && error_of(&failed).contains("dropped"),
        "{failed:?}"
    );
    assert_eq!(w.metrics().timed_out, 2);
    w.shutdown().await;
}

/// A task's timeout overrides the worker's `handler_timeout`, both ways: a longer one lets a
/// task outlive the worker's, and a task without one gets the worker's.
pub async fn a_task_timeout_overrides_the_workers(b: &Backends) {
    let h = handler_fn(|ctx: TaskContext| async move {
        let ms = ctx.task.payload["sleep_ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, TaskError>(json!("slept"))
    });
    let mut cfg = config("override-worker");
    cfg.handler_timeout = Some(Duration::from_millis(200));
    let w = start(b, cfg, "override", h);
    let d = Dispatcher::new(b.clone());
    let own = d
        .task("override")
        .json(json!({"sleep_ms": 1000}))
        .timeout(Duration::from_secs(60))
        .max_attempts(1)
        .send()
        .await
        .unwrap();
    let workers = d
        .task("override")
        .json(json!({"sleep_ms": 30_000}))
        .max_attempts(1)
        .send()
        .await
        .unwrap();
    let own = finished(&d, &own).await;
    assert_eq!(own.status(), TaskStatus::Completed, "{own:?}");
    let workers = finished(&d, &workers).await;
    assert_eq!(workers.status(), TaskStatus::Failed, "{workers:?}");
    assert!(
        error_of(&workers).starts_with("timed out after 200ms"),
        "{workers:?}"
    );
    w.shutdown().await;
}

/// A task whose deadline passed before any worker claimed it fails with the reason and its
/// handler never runs.
pub async fn a_task_past_its_deadline_fails_unrun(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let deadline = Utc::now() + chrono::Duration::milliseconds(1500);
    let id = d.task("deadlines").deadline(deadline).send().await.unwrap();
    assert_eq!(d.get(&id).await.unwrap().deadline, Some(deadline));
    eventually("the deadline passed", LIMIT, || async {
        match Utc::now() > deadline {
            true => Ok(()),
            false => Err("not yet".to_string()),
        }
    })
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let h = handler_fn(move |_ctx: TaskContext| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, TaskError>(json!("ran late")) }
    });
    let w = start(b, config("deadline-worker"), "deadlines", h);
    let failed = finished(&d, &id).await;
    assert_eq!(failed.status(), TaskStatus::Failed, "{failed:?}");
    assert!(
        error_of(&failed).contains("passed before a worker started it"),
        "{failed:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran a late task"
    );
    // Counted once the outcome is recorded, which `wait` may see first.
    eventually("the worker counted the late task", LIMIT, || async {
        match w.metrics().expired_deadline {
            1 => Ok(()),
            n => Err(format!("expired_deadline = {n}")),
        }
    })
    .await;
    w.shutdown().await;
}

/// A failed attempt is not retried when the retry would start after the task's deadline.
pub async fn a_retry_after_the_deadline_is_not_made(b: &Backends) {
    let h = handler_fn(|_ctx: TaskContext| async {
        Err::<serde_json::Value, _>(TaskError::retryable("flaky"))
    });
    let mut cfg = config("late-retry-worker");
    cfg.retry = Backoff {
        base: Duration::from_secs(3600),
        factor: 1.0,
        max: Duration::from_secs(3600),
        jitter: 0.0,
    };
    let w = start(b, cfg, "late_retries", h);
    let d = Dispatcher::new(b.clone());
    let id = d
        .task("late_retries")
        .deadline(Utc::now() + chrono::Duration::minutes(10))
        .max_attempts(5)
        .send()
        .await
        .unwrap();
    let failed = finished(&d, &id).await;
    assert_eq!(failed.status(), TaskStatus::Failed, "{failed:?}");
    assert_eq!(failed.state.attempt, 1);
    assert!(
        error_of(&failed).starts_with("flaky; not retried: the retry would start after"),
        "{failed:?}"
    );
    w.shutdown().await;
}

/// Bad timeouts, deadlines and unique keys are `InvalidInput` naming the option, and nothing
/// is registered.
pub async fn bad_timeouts_deadlines_and_unique_keys_are_typed_errors(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let hour = Duration::from_secs(3600);
    let cases: Vec<(DispatchOptions, &str)> = vec![
        (
            DispatchOptions::default().timeout(Duration::ZERO),
            "timeout",
        ),
        (
            DispatchOptions::default().timeout(Duration::from_micros(10)),
            "timeout",
        ),
        (
            DispatchOptions::default().timeout(Duration::from_secs(400 * 86_400)),
            "timeout",
        ),
        (
            DispatchOptions::default().deadline(Utc::now() - chrono::Duration::seconds(1)),
            "deadline",
        ),
        (
            DispatchOptions::default()
                .delay(Duration::from_secs(600))
                .deadline(Utc::now() + chrono::Duration::seconds(60)),
            "deadline",
        ),
        (DispatchOptions::default().unique("", hour), "unique_key"),
        (
            DispatchOptions::default().unique("k".repeat(193), hour),
            "unique_key",
        ),
        (
            DispatchOptions::default().unique("has space", hour),
            "unique_key",
        ),
        (
            DispatchOptions::default().unique("ok-key", Duration::ZERO),
            "unique_for",
        ),
        (
            DispatchOptions::default().unique("ok-key", Duration::from_secs(400 * 86_400)),
            "unique_for",
        ),
    ];
    for (options, want) in cases {
        let shown = format!("{options:?}");
        match d.dispatch("bad_options", json!({}), 5, options).await {
            Err(Error::InvalidInput { field, .. }) if field == want => {}
            other => panic!("{shown}: expected InvalidInput on {want}, got {other:?}"),
        }
    }
    let page = b
        .registry
        .list(&TaskFilter::default(), None, 10)
        .await
        .unwrap();
    assert!(
        page.tasks.is_empty(),
        "a refused dispatch registered {:?}",
        page.tasks
    );
}

/// A second dispatch with a live unique key registers nothing and returns the first id; another
/// key makes another task.
pub async fn a_duplicate_unique_key_returns_the_first_id(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let once = |key: &str| DispatchOptions::default().unique(key, Duration::from_secs(600));
    let first = d
        .dispatch("unique_q", json!({"n": 1}), 5, once("report-1"))
        .await
        .unwrap();
    let again = d
        .dispatch("unique_q", json!({"n": 2}), 5, once("report-1"))
        .await
        .unwrap();
    assert_eq!(again, first);
    let other = d
        .dispatch("unique_q", json!({"n": 3}), 5, once("report-2"))
        .await
        .unwrap();
    assert_ne!(other, first);
    let page = b
        .registry
        .list(&TaskFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 2, "{:?}", page.tasks);
    assert_eq!(d.get(&first).await.unwrap().payload, json!({"n": 1}));
}

/// Ten dispatches with one key at once make one task, and all ten get its id.
pub async fn concurrent_dispatches_with_one_unique_key_make_one_task(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let all = futures::future::join_all((0..10).map(|i| {
        let d = d.clone();
        async move {
            d.dispatch(
                "unique_race",
                json!({"i": i}),
                5,
                DispatchOptions::default().unique("race-key", Duration::from_secs(600)),
            )
            .await
            .unwrap()
        }
    }))
    .await;
    assert!(all.iter().all(|id| *id == all[0]), "{all:?}");
    let page = b
        .registry
        .list(&TaskFilter::default(), None, 20)
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1, "{:?}", page.tasks);
    assert_eq!(page.tasks[0].task_id, all[0]);
}

/// Once its TTL has passed, a unique key makes a new task.
pub async fn a_unique_key_makes_a_new_task_after_its_ttl(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let once = || DispatchOptions::default().unique("short-lived", Duration::from_secs(1));
    let first = d
        .dispatch("unique_ttl", json!({}), 5, once())
        .await
        .unwrap();
    let second = eventually("the key lets a new task through", LIMIT, || async {
        let id = d
            .dispatch("unique_ttl", json!({}), 5, once())
            .await
            .map_err(|e| e.to_string())?;
        match id != first {
            true => Ok(id),
            false => Err(format!("still {id}")),
        }
    })
    .await;
    for id in [&first, &second] {
        assert_eq!(d.get(id).await.unwrap().status(), TaskStatus::Pending);
    }
}

/// A dispatch that took a key and then failed to register its task frees the key: the next
/// dispatch with it makes a task instead of returning an id that names nothing.
pub async fn a_failed_unique_dispatch_frees_its_key(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let once = || DispatchOptions::default().unique("freed-key", Duration::from_secs(600));
    let missing = TaskId::parse("no_such_parent").unwrap();
    let err = d
        .dispatch("unique_fail", json!({}), 5, once().after([missing]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                field: "depends_on",
                ..
            }
        ),
        "{err:?}"
    );
    let id = d
        .dispatch("unique_fail", json!({}), 5, once())
        .await
        .unwrap();
    assert_eq!(d.get(&id).await.unwrap().status(), TaskStatus::Pending);
}
