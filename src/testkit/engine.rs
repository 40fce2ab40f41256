//! The engine's end-to-end suite: dispatcher, workers and monitor on a given set of backends.
//!
//! Each function takes fresh [`Backends`] (isolated by a prefix) and proves one behaviour of the
//! whole engine; [`engine_suite!`](crate::engine_suite) turns them into `#[tokio::test]`s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::bundle::Backends;
use crate::engine::{
    handler_fn, typed, Backoff, DispatchOptions, Dispatcher, Monitor, MonitorConfig, TaskContext,
    TaskError, Worker, WorkerConfig, WorkerHandle,
};
use crate::model::{QueueName, TaskId, TaskStatus};
use crate::testkit::eventually;

const LIMIT: Duration = Duration::from_secs(60);

fn quick_config(id: &str, concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_string(),
        concurrency,
        lease: Duration::from_secs(5),
        fetch_wait: Duration::from_millis(200),
        retry: Backoff {
            base: Duration::from_millis(50),
            factor: 2.0,
            max: Duration::from_millis(200),
            jitter: 0.0,
        },
        shutdown_timeout: Duration::from_secs(10),
        backend_retry_budget: Duration::from_secs(20),
        ..WorkerConfig::default()
    }
}

fn echo() -> Arc<dyn crate::engine::Handler> {
    handler_fn(|ctx: TaskContext| async move { Ok::<_, TaskError>(ctx.task.payload) })
}

async fn wait_done(d: &Dispatcher, id: &TaskId) -> crate::Task {
    d.wait(id, LIMIT)
        .await
        .unwrap_or_else(|e| panic!("task {id} did not finish: {e}"))
}

/// The lab's Researcher → Writer pipeline, without polling: the Writer's task waits in WAITING
/// until the Researcher's completes, then builds on its result.
pub async fn research_pipeline_runs_writer_after_researcher(b: &Backends) {
    let researcher = handler_fn(|ctx: TaskContext| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let topic = ctx.task.payload["topic"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        Ok::<_, TaskError>(json!({"summary": format!("findings about {topic}")}))
    });
    let writer = handler_fn(|ctx: TaskContext| async move {
        let parents = ctx
            .parent_results()
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        let findings = parents[0].1["summary"].as_str().unwrap_or("").to_string();
        Ok::<_, TaskError>(json!({"report": format!("## Report\n{findings}")}))
    });
    let w = Worker::new(b.clone(), quick_config("pipeline-worker", 4))
        .handle("research_tasks", researcher)
        .unwrap()
        .handle("writing_tasks", writer)
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let r = d
        .dispatch(
            "research_tasks",
            json!({"topic": "AI agents"}),
            3,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    let wr = d
        .dispatch(
            "writing_tasks",
            json!({"style": "formal"}),
            5,
            DispatchOptions::default().after([r.clone()]),
        )
        .await
        .unwrap();
    let writer_task = d.get(&wr).await.unwrap();
    assert!(
        matches!(
            writer_task.status(),
            TaskStatus::Waiting | TaskStatus::Pending | TaskStatus::Running | TaskStatus::Completed
        ),
        "writer task in unexpected state {}",
        writer_task.status()
    );
    let research_done = wait_done(&d, &r).await;
    let writing_done = wait_done(&d, &wr).await;
    assert_eq!(research_done.status(), TaskStatus::Completed);
    assert_eq!(
        writing_done.status(),
        TaskStatus::Completed,
        "writer: {:?}",
        writing_done.state.error
    );
    assert_eq!(
        writing_done.state.result,
        Some(json!({"report": "## Report\nfindings about AI agents"}))
    );
    assert!(
        writing_done.state.started_at.unwrap() >= research_done.state.finished_at.unwrap(),
        "the writer started before the researcher finished"
    );
    w.shutdown().await;
}

/// A parent that fails makes its WAITING dependents fail with a reason naming it.
pub async fn failed_parent_fails_its_dependents(b: &Backends) {
    let w = Worker::new(b.clone(), quick_config("failing-parent", 2))
        .handle(
            "parents",
            handler_fn(|_ctx| async {
                Err::<Value, _>(TaskError::permanent("source unavailable"))
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let p = d
        .dispatch("parents", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let child = d
        .dispatch(
            "children",
            json!({}),
            5,
            DispatchOptions::default().after([p.clone()]),
        )
        .await
        .unwrap();
    let grandchild = d
        .dispatch(
            "children",
            json!({}),
            5,
            DispatchOptions::default().after([child.clone()]),
        )
        .await
        .unwrap();
    assert_eq!(wait_done(&d, &p).await.status(), TaskStatus::Failed);
    let c = wait_done(&d, &child).await;
    assert_eq!(c.status(), TaskStatus::Failed);
    let why = c.state.error.unwrap_or_default();
    assert!(
        why.contains(p.as_str()) && why.contains("FAILED"),
        "reason: {why}"
    );
    assert_eq!(
        wait_done(&d, &grandchild).await.status(),
        TaskStatus::Failed
    );
    w.shutdown().await;
}

/// With a backlog of mixed priorities and one slot, urgent tasks finish first.
pub async fn urgent_tasks_finish_first_under_a_backlog(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let priorities = [8, 3, 10, 1, 5, 7, 2, 9, 4, 6, 1, 10, 5, 3, 8, 2, 7, 4, 9, 6];
    let mut ids = Vec::new();
    for (i, p) in priorities.iter().enumerate() {
        ids.push(
            d.dispatch("backlog", json!({"i": i}), *p, DispatchOptions::default())
                .await
                .unwrap(),
        );
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = order.clone();
    let w = Worker::new(b.clone(), quick_config("backlog-worker", 1))
        .handle("backlog", echo())
        .unwrap()
        .on_finished(move |f| seen.lock().push(f.task.priority.get()))
        .start()
        .unwrap();
    for id in &ids {
        assert_eq!(wait_done(&d, id).await.status(), TaskStatus::Completed);
    }
    w.shutdown().await;
    let got = order.lock().clone();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted, "completion order by priority");
    assert_eq!(got.len(), priorities.len());
}

/// A worker that dies mid-task leaves it RUNNING; when its lease ends the monitor hands it
/// back and another worker completes it, exactly once.
pub async fn killed_workers_task_is_recovered_and_completed_once(b: &Backends) {
    let started = Arc::new(AtomicU32::new(0));
    let completions = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let hang = handler_fn(move |_ctx| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, TaskError>(json!("never"))
        }
    });
    let mut cfg = quick_config("doomed-worker", 1);
    cfg.lease = Duration::from_secs(1);
    let doomed = Worker::new(b.clone(), cfg)
        .handle("crashy", hang)
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("crashy", json!({"job": "x"}), 5, DispatchOptions::default())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first worker never started the task");
    doomed.kill();
    let t = d.get(&id).await.unwrap();
    assert_eq!(t.status(), TaskStatus::Running);
    assert_eq!(t.state.worker_id.as_deref(), Some("doomed-worker"));

    let c = completions.clone();
    let mut cfg = quick_config("rescuer", 2);
    cfg.lease = Duration::from_secs(2);
    let rescuer = Worker::new(b.clone(), cfg)
        .handle(
            "crashy",
            handler_fn(move |_ctx| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, TaskError>(json!("done by rescuer"))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let monitor = Monitor::new(
        b.clone(),
        MonitorConfig {
            interval: Duration::from_millis(200),
            ..MonitorConfig::default()
        },
    )
    .start(|_| {})
    .unwrap();
    let done = wait_done(&d, &id).await;
    assert_eq!(done.status(), TaskStatus::Completed);
    assert_eq!(done.state.result, Some(json!("done by rescuer")));
    assert_eq!(done.state.worker_id.as_deref(), Some("rescuer"));
    assert_eq!(
        done.state.attempt, 2,
        "one attempt died, the second completed"
    );
    // Give any duplicate delivery time to show up, then check the handler ran once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        completions.load(Ordering::SeqCst),
        1,
        "completed more than once"
    );
    monitor.shutdown().await;
    rescuer.shutdown().await;
}

/// A worker dies holding a task, and the broker gives its message to another worker at once,
/// before the dead attempt's lease ends (RabbitMQ requeues a dead connection's messages at once;
/// NATS redelivers after an ack wait shorter than the lease). Without any monitor, that
/// redelivery is given back until the lease ends and then takes the task over: the task
/// completes, on its second attempt, once.
pub async fn an_early_redelivery_recovers_a_dead_workers_task_without_a_monitor(b: &Backends) {
    use crate::bus::FetchOptions;
    use crate::task_queue::{Claim, ClaimSpec};
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("orphaned", json!({"job": 1}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let queue = QueueName::parse("orphaned").unwrap();
    // The worker that dies: it fetched and claimed the task with a 3 s lease...
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while got.is_empty() {
            got = b
                .bus
                .fetch(
                    &queue,
                    FetchOptions {
                        max: 1,
                        wait: Duration::from_millis(500),
                        lease: Duration::from_secs(60),
                    },
                )
                .await
                .unwrap();
        }
    })
    .await
    .expect("the message was never delivered");
    let delivery = got.pop().unwrap();
    let spec = ClaimSpec {
        worker_id: "dead-worker".into(),
        lease: Duration::from_secs(3),
    };
    match b.tasks().claim(&delivery, &spec).await.unwrap() {
        Claim::Claimed(t) => assert_eq!(t.state.attempt, 1),
        other => panic!("the first claim: {other:?}"),
    }
    // ...and its message goes back to the queue at once, as the broker does for a dead
    // connection.
    b.bus.nack(&delivery, Duration::ZERO).await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let rescuer = Worker::new(b.clone(), quick_config("rescuer", 2))
        .handle(
            "orphaned",
            handler_fn(move |_ctx| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, TaskError>(json!("rescued"))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let done = d
        .wait(&id, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the task was not recovered without a monitor: {e}"));
    assert_eq!(done.status(), TaskStatus::Completed);
    assert_eq!(done.state.worker_id.as_deref(), Some("rescuer"));
    assert_eq!(
        done.state.attempt, 2,
        "the dead attempt, then the rescuer's"
    );
    assert!(
        rescuer.metrics().deferred >= 1,
        "the early redelivery should have been given back: {:?}",
        rescuer.metrics()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran more than once");
    rescuer.shutdown().await;
}

/// `Dispatcher::wait` sees a task finish whose event was lost even while other tasks' events
/// keep arriving: those do not put its re-read off.
pub async fn wait_sees_a_finish_whose_event_was_lost_on_a_busy_bus(b: &Backends) {
    use crate::wire::EVENTS_TOPIC;
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("nobody_serves", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    // Other tasks' events, every 100 ms, for the whole wait.
    let bus = b.bus.clone();
    let chatter = tokio::spawn(async move {
        loop {
            let _ = bus
                .publish(EVENTS_TOPIC, br#"{"event":"other task"}"#)
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let waiter = {
        let d = d.clone();
        let id = id.clone();
        tokio::spawn(async move { d.wait(&id, Duration::from_secs(40)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Finished without an event (as if it was lost).
    let task = d.get(&id).await.unwrap();
    let now = chrono::Utc::now();
    let next = crate::model::TaskState {
        status: TaskStatus::Cancelled,
        finished_at: Some(now),
        updated_at: now,
        ..task.state.clone()
    };
    b.registry
        .transition(&id, task.expect(), next)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("wait did not see the finish within 20 s (its re-read kept being put off)")
        .unwrap()
        .unwrap();
    chatter.abort();
    assert_eq!(got.status(), TaskStatus::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A handler that keeps failing is retried with backoff until its attempts are spent, then
/// the task FAILS with the error kept.
pub async fn failing_task_is_retried_then_failed(b: &Backends) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let w = Worker::new(b.clone(), quick_config("flaky", 2))
        .handle(
            "flaky",
            handler_fn(move |ctx: TaskContext| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err::<Value, _>(TaskError::retryable(format!(
                        "upstream 503 on attempt {}",
                        ctx.task.state.attempt
                    )))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch(
            "flaky",
            json!({}),
            5,
            DispatchOptions::default().max_attempts(3),
        )
        .await
        .unwrap();
    let t = wait_done(&d, &id).await;
    assert_eq!(t.status(), TaskStatus::Failed);
    assert_eq!(t.state.attempt, 3);
    assert_eq!(t.state.error.as_deref(), Some("upstream 503 on attempt 3"));
    assert!(t.state.finished_at.is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // The worker counts an outcome after recording it, so a waiter can see the task FAILED
    // a moment before the counter moves.
    eventually(
        "the worker counted 2 retries and 1 failure",
        Duration::from_secs(10),
        || {
            let m = w.metrics();
            async move {
                if (m.retried, m.failed, m.completed) == (2, 1, 0) {
                    Ok(())
                } else {
                    Err(format!("{m:?}"))
                }
            }
        },
    )
    .await;
    w.shutdown().await;
}

/// A panicking handler is an error like any other: the next attempt runs.
pub async fn handler_panic_is_caught_and_retried(b: &Backends) {
    let w = Worker::new(b.clone(), quick_config("panicky", 1))
        .handle(
            "panicky",
            handler_fn(|ctx: TaskContext| async move {
                if ctx.task.state.attempt == 1 {
                    panic!("boom on the first attempt");
                }
                Ok::<_, TaskError>(json!("recovered"))
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("panicky", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let t = wait_done(&d, &id).await;
    assert_eq!(t.status(), TaskStatus::Completed);
    assert_eq!(t.state.attempt, 2);
    assert_eq!(w.metrics().panics, 1);
    w.shutdown().await;
}

/// A typed handler FAILS a task whose payload does not fit its input at once (no retry).
pub async fn typed_handler_fails_bad_payload_without_retry(b: &Backends) {
    #[derive(serde::Deserialize)]
    struct Research {
        topic: String,
    }
    let w = Worker::new(b.clone(), quick_config("typed", 1))
        .handle(
            "typed",
            typed(|input: Research, _ctx: TaskContext| async move {
                Ok::<_, TaskError>(json!({"topic": input.topic}))
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let good = d
        .dispatch(
            "typed",
            json!({"topic": "rust"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    let bad = d
        .dispatch(
            "typed",
            json!({"subject": 42}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_done(&d, &good).await.state.result,
        Some(json!({"topic": "rust"}))
    );
    let t = wait_done(&d, &bad).await;
    assert_eq!(t.status(), TaskStatus::Failed);
    assert_eq!(t.state.attempt, 1);
    assert!(
        t.state
            .error
            .as_deref()
            .unwrap_or("")
            .contains("payload does not match"),
        "{:?}",
        t.state.error
    );
    w.shutdown().await;
}

/// A malformed message on a queue is dead-lettered with a clear reason and the worker keeps
/// serving the queue.
pub async fn malformed_message_is_dead_lettered_and_worker_keeps_running(b: &Backends) {
    let queue = QueueName::parse("mixed_input").unwrap();
    b.bus
        .enqueue(
            &queue,
            crate::bus::OutgoingMessage::new(
                b"this is not json".to_vec(),
                crate::Priority::HIGHEST,
            ),
        )
        .await
        .unwrap();
    b.bus
        .enqueue(
            &queue,
            crate::bus::OutgoingMessage::new(
                br#"{"task_id":"task_that_does_not_exist"}"#.to_vec(),
                crate::Priority::HIGHEST,
            ),
        )
        .await
        .unwrap();
    let w = Worker::new(b.clone(), quick_config("robust", 2))
        .handle("mixed_input", echo())
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch(
            "mixed_input",
            json!({"ok": true}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(wait_done(&d, &id).await.status(), TaskStatus::Completed);
    let dead = tokio::time::timeout(LIMIT, async {
        loop {
            let dl = b.bus.dead_letters(&queue, 10).await.unwrap();
            if dl.len() >= 2 {
                return dl;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the malformed messages were not dead-lettered");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("malformed message")),
        "reasons: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not in the registry")),
        "reasons: {reasons:?}"
    );
    assert!(dead.iter().any(|d| d.payload == b"this is not json"));
    eventually(
        "the worker counted 2 dead letters",
        Duration::from_secs(10),
        || {
            let n = w.metrics().dead_lettered;
            async move {
                if n == 2 {
                    Ok(())
                } else {
                    Err(format!("{n} counted"))
                }
            }
        },
    )
    .await;
    w.shutdown().await;
}

/// Graceful shutdown: a worker stopped with work running finishes or hands back everything;
/// a second worker completes the rest; nothing is lost and nothing runs twice to completion.
pub async fn graceful_shutdown_loses_nothing(b: &Backends) {
    let completions: Arc<Mutex<HashMap<TaskId, u32>>> = Arc::default();
    let make_handler = |completions: Arc<Mutex<HashMap<TaskId, u32>>>| {
        handler_fn(move |ctx: TaskContext| {
            let completions = completions.clone();
            async move {
                let ms = ctx.task.payload["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                *completions
                    .lock()
                    .entry(ctx.task.task_id.clone())
                    .or_default() += 1;
                Ok::<_, TaskError>(json!("ok"))
            }
        })
    };
    let d = Dispatcher::new(b.clone());
    let mut ids = Vec::new();
    for i in 0..24 {
        // Some quick tasks, and some that outlive the shutdown deadline.
        let ms = if i % 4 == 0 { 5_000 } else { 100 };
        ids.push(
            d.dispatch(
                "shutdown_q",
                json!({"ms": ms}),
                5,
                DispatchOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    let first: WorkerHandle = Worker::new(b.clone(), quick_config("leaving", 4))
        .handle("shutdown_q", make_handler(completions.clone()))
        .unwrap()
        .start()
        .unwrap();
    // Until a 5 s task runs (not a fixed pause: on a replicated cluster the first claims
    // take longer than on one server).
    let long = ids[0].clone();
    eventually("a 5 s task running", LIMIT, || {
        let (d, long) = (&d, long.clone());
        async move {
            match d.get(&long).await {
                Ok(t) if t.status() == TaskStatus::Running => Ok(()),
                Ok(t) => Err(format!("{long} is {}", t.status())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    let report = first.shutdown_within(Duration::from_millis(300)).await;
    assert!(report.clean, "{report:?}");
    assert!(
        report.deadline_passed && report.handed_back > 0,
        "5 s tasks were running at the 300 ms deadline: {report:?}"
    );
    let second = Worker::new(b.clone(), quick_config("staying", 8))
        .handle("shutdown_q", make_handler(completions.clone()))
        .unwrap()
        .start()
        .unwrap();
    for id in &ids {
        assert_eq!(wait_done(&d, id).await.status(), TaskStatus::Completed);
    }
    second.shutdown().await;
    let c = completions.lock();
    assert_eq!(c.len(), ids.len(), "every task ran to completion");
    assert!(c.values().all(|n| *n == 1), "a task completed twice: {c:?}");
}

/// A slot is free as soon as its handler returns, while the outcome is still being recorded:
/// a graceful shutdown waits for those records too, so every task whose handler returned is
/// COMPLETED when it returns (none is left RUNNING for another worker to run again).
pub async fn shutdown_waits_for_the_outcomes_being_recorded(b: &Backends) {
    let ran: Arc<Mutex<Vec<TaskId>>> = Arc::default();
    let handler = {
        let ran = ran.clone();
        handler_fn(move |ctx: TaskContext| {
            let ran = ran.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                ran.lock().push(ctx.task.task_id.clone());
                Ok::<_, TaskError>(json!("ok"))
            }
        })
    };
    let d = Dispatcher::new(b.clone());
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            d.dispatch("record_q", json!({ "i": i }), 5, DispatchOptions::default())
                .await
                .unwrap(),
        );
    }
    let w = Worker::new(b.clone(), quick_config("recorder", 4))
        .handle("record_q", handler)
        .unwrap()
        .start()
        .unwrap();
    eventually("4 tasks running", LIMIT, || async {
        match w.running() {
            4 => Ok(()),
            n => Err(format!("{n} running")),
        }
    })
    .await;
    let report = w.shutdown_within(Duration::from_secs(10)).await;
    assert!(report.clean && !report.deadline_passed, "{report:?}");
    let ran = ran.lock().clone();
    assert!(
        !ran.is_empty(),
        "the handlers ran before the shutdown ended"
    );
    for id in &ids {
        let t = b.registry.get(id).await.unwrap().expect("stored");
        let want = if ran.contains(id) {
            TaskStatus::Completed
        } else {
            TaskStatus::Pending
        };
        assert_eq!(t.status(), want, "task {id} after the shutdown");
    }
}

/// A fetch loop that panics (a bug) is started again: the worker keeps serving its queue, counts
/// the restart, and still shuts down cleanly. Before, the queue was silently no longer served.
pub async fn a_fetch_loop_that_panics_is_started_again(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            d.dispatch(
                "panicky_q",
                json!({ "i": i }),
                5,
                DispatchOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    let panicky = Arc::new(FetchHook {
        inner: b.tasks().clone(),
        hook: Hook::PanicFirst(AtomicU32::new(0)),
    });
    let w = Worker::new(
        b.clone().with_task_queue(panicky),
        quick_config("panicky", 2),
    )
    .handle("panicky_q", echo())
    .unwrap()
    .start()
    .unwrap();
    for id in &ids {
        assert_eq!(wait_done(&d, id).await.status(), TaskStatus::Completed);
    }
    assert_eq!(w.metrics().fetch_restarts, 1);
    let report = w.shutdown().await;
    assert!(report.clean, "{report:?}");
}

/// What a [`FetchHook`] does to the fetches of the hot path it wraps.
#[derive(Debug)]
enum Hook {
    /// The first fetch panics before asking the backend (a bug in a backend or in the engine,
    /// simulated); later fetches work.
    PanicFirst(AtomicU32),
    /// Replies with tasks are held back until `release`: the fetch has leased and claimed its
    /// tasks on the backend, and the worker is still waiting for the answer.
    HoldReply {
        fetched: tokio::sync::Notify,
        release: tokio::sync::Notify,
    },
}

/// A hot path around `inner` whose fetches behave as `hook` says; everything else passes
/// through.
#[derive(Debug)]
struct FetchHook {
    inner: Arc<dyn crate::task_queue::TaskQueue>,
    hook: Hook,
}

#[async_trait::async_trait]
impl crate::task_queue::TaskQueue for FetchHook {
    async fn submit(&self, tasks: &[crate::model::Task]) -> crate::Result<Vec<crate::Result<()>>> {
        self.inner.submit(tasks).await
    }

    async fn fetch_claim(
        &self,
        queue: &QueueName,
        options: crate::bus::FetchOptions,
        spec: &crate::task_queue::ClaimSpec,
    ) -> crate::Result<Vec<(crate::bus::Delivery, Option<crate::task_queue::Claim>)>> {
        if let Hook::PanicFirst(fetches) = &self.hook {
            if fetches.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a simulated bug in the first fetch");
            }
        }
        let r = self.inner.fetch_claim(queue, options, spec).await;
        if let Hook::HoldReply { fetched, release } = &self.hook {
            if matches!(&r, Ok(d) if !d.is_empty()) {
                fetched.notify_one();
                release.notified().await;
            }
        }
        r
    }

    async fn claim(
        &self,
        delivery: &crate::bus::Delivery,
        spec: &crate::task_queue::ClaimSpec,
    ) -> crate::Result<crate::task_queue::Claim> {
        self.inner.claim(delivery, spec).await
    }

    async fn record(
        &self,
        delivery: &crate::bus::Delivery,
        current: &crate::model::Task,
        next: crate::model::TaskState,
        settle: crate::task_queue::Settle,
    ) -> crate::Result<crate::task_queue::Recorded> {
        self.inner.record(delivery, current, next, settle).await
    }
}

/// A shutdown that comes while a fetch's reply is on its way waits for it and hands the tasks
/// it brought back unrun, at no attempt's cost: none is left RUNNING until its lease ends, and
/// another worker completes them all.
pub async fn shutdown_hands_back_what_a_fetch_on_its_way_claimed(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            d.dispatch("late_q", json!({ "i": i }), 5, DispatchOptions::default())
                .await
                .unwrap(),
        );
    }
    let late = Arc::new(FetchHook {
        inner: b.tasks().clone(),
        hook: Hook::HoldReply {
            fetched: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        },
    });
    let slow = b.clone().with_task_queue(late.clone());
    let ran = Arc::new(AtomicU32::new(0));
    let handler = {
        let ran = ran.clone();
        handler_fn(move |_ctx: TaskContext| {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, TaskError>(json!("ran"))
            }
        })
    };
    let w = Worker::new(slow, quick_config("late-reply", 3))
        .handle("late_q", handler.clone())
        .unwrap()
        .start()
        .unwrap();
    let Hook::HoldReply { fetched, release } = &late.hook else {
        unreachable!("built as HoldReply above")
    };
    tokio::time::timeout(LIMIT, fetched.notified())
        .await
        .expect("the worker fetched");
    // The shutdown's first step (the stop) is taken on its first poll; only then does the
    // fetch's reply arrive. A deadline shorter than the fetch's wait must not cut it off.
    let mut shutdown = Box::pin(w.shutdown_within(Duration::ZERO));
    assert!(futures::poll!(shutdown.as_mut()).is_pending());
    release.notify_one();
    let report = shutdown.await;
    assert!(report.clean, "{report:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "no handler ran");
    let mut handed_back = 0;
    for id in &ids {
        let t = d.get(id).await.unwrap();
        assert_ne!(
            t.status(),
            TaskStatus::Running,
            "task {id} was left RUNNING"
        );
        if t.state.attempt > 0 {
            assert_eq!(t.status(), TaskStatus::Pending, "task {id}");
            assert_eq!(
                t.charged_attempts(),
                0,
                "task {id}: a hand-back costs no attempt"
            );
            handed_back += 1;
        }
    }
    // Claimed by the fetch itself only where the backend claims in the same step.
    assert_eq!(report.handed_back, handed_back);
    let w2 = Worker::new(b.clone(), quick_config("after-late-reply", 3))
        .handle("late_q", handler)
        .unwrap()
        .start()
        .unwrap();
    for id in &ids {
        let t = d.wait(id, LIMIT).await.unwrap();
        assert_eq!(t.status(), TaskStatus::Completed, "task {id}");
    }
    w2.shutdown().await;
    assert_eq!(ran.load(Ordering::SeqCst), 3, "each task ran once");
}

/// A task handed back by a worker shutting down keeps all its attempts: with `max_attempts` 2,
/// a hand-back and then one failure still leave the retry that completes it.
pub async fn hand_back_on_shutdown_costs_no_attempt(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch(
            "handback_q",
            json!({}),
            5,
            DispatchOptions::default().max_attempts(2),
        )
        .await
        .unwrap();
    let hang = handler_fn(|_ctx| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, TaskError>(json!("never"))
    });
    let first = Worker::new(b.clone(), quick_config("leaving", 1))
        .handle("handback_q", hang)
        .unwrap()
        .start()
        .unwrap();
    eventually("the first worker claims the task", LIMIT, || async {
        match d.get(&id).await.unwrap().status() {
            TaskStatus::Running => Ok(()),
            other => Err(format!("{other}")),
        }
    })
    .await;
    let report = first.shutdown_within(Duration::from_millis(200)).await;
    assert_eq!(report.handed_back, 1, "{report:?}");
    let t = d.get(&id).await.unwrap();
    assert_eq!(t.status(), TaskStatus::Pending);
    assert_eq!((t.state.attempt, t.state.handed_back), (1, 1));
    assert_eq!(t.charged_attempts(), 0);
    assert!(t.attempts_left());

    let calls = Arc::new(AtomicU32::new(0));
    let flaky = {
        let calls = calls.clone();
        handler_fn(move |_ctx| {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(TaskError::retryable("first try fails"))
                } else {
                    Ok(json!("done"))
                }
            }
        })
    };
    let second = Worker::new(b.clone(), quick_config("staying", 1))
        .handle("handback_q", flaky)
        .unwrap()
        .start()
        .unwrap();
    let t = wait_done(&d, &id).await;
    second.shutdown().await;
    assert_eq!(
        t.status(),
        TaskStatus::Completed,
        "the hand-back was charged as an attempt: {:?}",
        t.state.error
    );
    assert_eq!((t.state.attempt, t.state.handed_back), (3, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Cancelling a PENDING task stops it from running.
pub async fn cancelled_task_never_runs(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("cancel_q", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let keep = d
        .dispatch("cancel_q", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let c = d.cancel(&id).await.unwrap();
    assert_eq!(c.status(), TaskStatus::Cancelled);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let r = ran.clone();
    let w = Worker::new(b.clone(), quick_config("canceller", 1))
        .handle(
            "cancel_q",
            handler_fn(move |ctx: TaskContext| {
                let r = r.clone();
                async move {
                    r.lock().push(ctx.task.task_id.clone());
                    Ok::<_, TaskError>(json!(null))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(wait_done(&d, &keep).await.status(), TaskStatus::Completed);
    w.shutdown().await;
    assert_eq!(*ran.lock(), vec![keep]);
    assert_eq!(d.get(&id).await.unwrap().status(), TaskStatus::Cancelled);
    let retried = d.retry(&id).await.unwrap();
    assert_eq!(retried.status(), TaskStatus::Pending);
}

/// `dispatch_many` refuses, per task, what would wait forever: a dependency on itself, on a
/// task that does not exist, on a later task of the batch (a cycle), or on a task refused in
/// the same batch; the rest of the batch is registered, and its pipeline runs.
pub async fn dispatch_many_refuses_tasks_that_would_wait_forever(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let id = |s: &str| TaskId::parse(s).unwrap();
    let task = |name: &str, deps: &[&str]| {
        d.build(
            "batch_deps",
            json!({"name": name}),
            5,
            &DispatchOptions {
                task_id: Some(id(name)),
                depends_on: deps.iter().map(|p| id(p)).collect(),
                ..DispatchOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("build {name}: {e}"))
    };
    let mut itself = task("bd_itself", &[]);
    itself.depends_on = vec![id("bd_itself")];
    let batch = vec![
        task("bd_a", &[]),
        task("bd_b", &["bd_a"]),
        itself,
        task("bd_orphan", &["bd_nobody"]),
        task("bd_before", &["bd_after"]),
        task("bd_after", &["bd_before"]),
        task("bd_heir", &["bd_orphan"]),
    ];
    let results = d.dispatch_many(batch).await.expect("dispatch_many");
    let ok: Vec<bool> = results.iter().map(|r| r.is_ok()).collect();
    assert_eq!(
        ok,
        vec![true, true, false, false, false, false, false],
        "{results:?}"
    );
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r, crate::Error::InvalidInput { .. }), "{r}");
    }
    for refused in ["bd_itself", "bd_orphan", "bd_before", "bd_after", "bd_heir"] {
        assert!(
            b.registry.get(&id(refused)).await.unwrap().is_none(),
            "{refused} was registered"
        );
    }
    let w = Worker::new(b.clone(), quick_config("batch-deps", 2))
        .handle("batch_deps", echo())
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(
        wait_done(&d, &id("bd_b")).await.state.status,
        TaskStatus::Completed
    );
    w.shutdown().await;
}

/// Bad input to the dispatcher is a typed error, never a panic.
pub async fn dispatcher_rejects_bad_input_with_typed_errors(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let o = DispatchOptions::default;
    let e = d.dispatch("q", json!({}), 0, o()).await.unwrap_err();
    assert!(e.to_string().contains("priority"), "{e}");
    let e = d
        .dispatch("bad queue!", json!({}), 5, o())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("queue"), "{e}");
    let e = d.dispatch("", json!({}), 5, o()).await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = d
        .dispatch("q", json!({}), 5, o().max_attempts(0))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("max_attempts"), "{e}");
    let ghost = TaskId::parse("task_ghost").unwrap();
    let e = d
        .dispatch("q", json!({}), 5, o().after([ghost]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let big = json!({"blob": "x".repeat(3 * 1024 * 1024)});
    let e = d.dispatch("q", big, 5, o()).await.unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    let id = d.dispatch("q", json!({}), 5, o()).await.unwrap();
    let dup = DispatchOptions {
        task_id: Some(id.clone()),
        ..o()
    };
    // The same request again is idempotent; another request under a taken id is refused.
    assert_eq!(
        d.dispatch("q", json!({}), 5, dup.clone()).await.unwrap(),
        id
    );
    assert!(matches!(
        d.dispatch("q", json!({"other": 1}), 5, dup)
            .await
            .unwrap_err(),
        crate::Error::TaskExists(_)
    ));
    let missing = TaskId::parse("task_missing").unwrap();
    assert!(matches!(
        d.get(&missing).await.unwrap_err(),
        crate::Error::TaskNotFound(_)
    ));
    // More attempts than the bus delivers a message: it would be dead-lettered with attempts
    // left, the task stranded in PENDING. Refused, alone and in a batch, before registering.
    let max = b.bus.max_deliveries();
    let over = || o().max_attempts(max + 1);
    let id = TaskId::parse("task_too_many_attempts").unwrap();
    let e = d
        .dispatch(
            "q",
            json!({}),
            5,
            DispatchOptions {
                task_id: Some(id.clone()),
                ..over()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, crate::Error::InvalidInput { .. }), "{e:?}");
    assert!(
        e.to_string().contains("max_attempts") && e.to_string().contains("max_deliveries"),
        "{e}"
    );
    assert!(
        b.registry.get(&id).await.unwrap().is_none(),
        "registered anyway"
    );
    let mut too_many = d.build("q", json!({}), 5, &o()).unwrap();
    too_many.max_attempts = max + 1;
    let fine = d.build("q", json!({}), 5, &o().max_attempts(max)).unwrap();
    let results = d
        .dispatch_many(vec![too_many.clone(), fine.clone()])
        .await
        .unwrap();
    assert!(
        matches!(&results[0], Err(crate::Error::InvalidInput { .. })),
        "{results:?}"
    );
    assert_eq!(results[1].as_ref().unwrap(), &fine.task_id);
    assert!(b.registry.get(&too_many.task_id).await.unwrap().is_none());
    // A batch's tasks are built by the caller (public fields): each is checked as `build`
    // checks, and only the bad ones are refused, naming their field.
    let bad = |field: &'static str, spoil: &dyn Fn(&mut crate::model::Task)| {
        let mut t = d.build("q", json!({}), 5, &o()).unwrap();
        spoil(&mut t);
        (field, t)
    };
    let spoiled = [
        bad("max_attempts", &|t| t.max_attempts = 0),
        bad("timeout", &|t| t.timeout = Some(Duration::ZERO)),
        bad("deadline", &|t| {
            t.deadline = Some(chrono::Utc::now() - chrono::Duration::seconds(1))
        }),
        bad("traceparent", &|t| {
            t.traceparent = Some("00-zz".to_string())
        }),
        bad("payload", &|t| t.payload = json!("x".repeat(2 << 20))),
    ];
    let good = d.build("q", json!({"good": 1}), 5, &o()).unwrap();
    let mut batch: Vec<_> = spoiled.iter().map(|(_, t)| t.clone()).collect();
    batch.push(good.clone());
    let results = d.dispatch_many(batch).await.unwrap();
    for ((field, t), r) in spoiled.iter().zip(&results) {
        match r {
            Err(e @ crate::Error::InvalidInput { .. }) => {
                assert!(e.to_string().contains(field), "{field}: {e}")
            }
            other => panic!("a task with a bad {field} was not refused: {other:?}"),
        }
        assert!(
            b.registry.get(&t.task_id).await.unwrap().is_none(),
            "a task with a bad {field} was registered"
        );
    }
    assert_eq!(results[spoiled.len()].as_ref().unwrap(), &good.task_id);
    // A delay with dependencies (the task is announced when they complete) is refused.
    let e = d
        .dispatch(
            "q",
            json!({}),
            5,
            o().after([fine.task_id.clone()])
                .delay(Duration::from_secs(60)),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("delay"), "{e}");
}

/// An operator's `retry` of a PENDING task whose message was lost announces it again.
pub async fn retry_announces_a_pending_task_whose_message_was_lost(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let task = d
        .build("stranded", json!({"n": 1}), 5, &DispatchOptions::default())
        .unwrap();
    b.registry.create(&task).await.unwrap(); // registered, never enqueued
    let w = Worker::new(b.clone(), quick_config("stranded-runner", 1))
        .handle("stranded", echo())
        .unwrap()
        .start()
        .unwrap();
    let retried = d.retry(&task.task_id).await.unwrap();
    assert_eq!(retried.status(), TaskStatus::Pending);
    let t = wait_done(&d, &task.task_id).await;
    assert_eq!(t.status(), TaskStatus::Completed);
    assert_eq!(t.state.attempt, 1);
    // A RUNNING or finished task is still refused.
    assert!(matches!(
        d.retry(&task.task_id).await.unwrap_err(),
        crate::Error::IllegalTransition { .. }
    ));
    w.shutdown().await;
}

/// A task registered but never announced (its dispatcher died in between) is re-announced by
/// the monitor once its queue is idle, and then runs.
pub async fn monitor_reannounces_a_pending_task_whose_message_was_lost(b: &Backends) {
    let d = Dispatcher::new(b.clone());
    let task = d
        .build(
            "orphans",
            json!({"lost": true}),
            5,
            &DispatchOptions::default(),
        )
        .unwrap();
    b.registry.create(&task).await.unwrap(); // registered, never enqueued
    let w = Worker::new(b.clone(), quick_config("orphan-runner", 1))
        .handle("orphans", echo())
        .unwrap()
        .start()
        .unwrap();
    let monitor = Monitor::new(
        b.clone(),
        MonitorConfig {
            interval: Duration::from_millis(200),
            reannounce_pending_after: Some(Duration::ZERO),
            ..MonitorConfig::default()
        },
    );
    let report = monitor.tick().await.unwrap();
    assert!(report.leader);
    assert_eq!(report.reannounced, 1, "{report:?}");
    let t = wait_done(&d, &task.task_id).await;
    assert_eq!(t.status(), TaskStatus::Completed);
    assert_eq!(t.state.result, Some(json!({"lost": true})));
    w.shutdown().await;
}

/// A task whose worker died on its last attempt is FAILED by the monitor with a timeout error.
pub async fn monitor_fails_a_stale_task_with_no_attempts_left(b: &Backends) {
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let mut cfg = quick_config("last-chance", 1);
    cfg.lease = Duration::from_secs(1);
    let doomed = Worker::new(b.clone(), cfg)
        .handle(
            "last_chance",
            handler_fn(move |_ctx| {
                let s = s.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<_, TaskError>(json!(null))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch(
            "last_chance",
            json!({}),
            5,
            DispatchOptions::default().max_attempts(1),
        )
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the task never started");
    doomed.kill();
    let monitor = Monitor::new(b.clone(), MonitorConfig::default());
    let report = tokio::time::timeout(LIMIT, async {
        loop {
            let r = monitor.tick().await.unwrap();
            if r.timed_out > 0 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the monitor never failed the stale task");
    assert_eq!(report.timed_out, 1);
    let t = d.get(&id).await.unwrap();
    assert_eq!(t.status(), TaskStatus::Failed);
    assert!(
        t.state.error.as_deref().unwrap_or("").contains("timeout"),
        "{:?}",
        t.state.error
    );
}

/// A bus whose enqueues fail while `refuse` is set (a broker that cannot take a message);
/// everything else passes through.
#[derive(Debug)]
struct RefusingBus {
    inner: Arc<dyn crate::bus::Bus>,
    refuse: std::sync::atomic::AtomicBool,
}

impl RefusingBus {
    fn check(&self) -> crate::Result<()> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(crate::Error::temporary(
                self.inner.backend(),
                "the test's broker refuses every message",
                None,
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::bus::Bus for RefusingBus {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn publish(&self, topic: &str, payload: &[u8]) -> crate::Result<()> {
        self.inner.publish(topic, payload).await
    }
    async fn subscribe(&self, topic: &str) -> crate::Result<crate::bus::Subscription> {
        self.inner.subscribe(topic).await
    }
    async fn enqueue(
        &self,
        queue: &QueueName,
        message: crate::bus::OutgoingMessage,
    ) -> crate::Result<String> {
        self.check()?;
        self.inner.enqueue(queue, message).await
    }
    async fn enqueue_many(
        &self,
        queue: &QueueName,
        messages: Vec<crate::bus::OutgoingMessage>,
    ) -> crate::Result<Vec<String>> {
        self.check()?;
        self.inner.enqueue_many(queue, messages).await
    }
    async fn fetch(
        &self,
        queue: &QueueName,
        options: crate::bus::FetchOptions,
    ) -> crate::Result<Vec<crate::bus::Delivery>> {
        self.inner.fetch(queue, options).await
    }
    async fn ack(&self, delivery: &crate::bus::Delivery) -> crate::Result<()> {
        self.inner.ack(delivery).await
    }
    async fn nack(&self, delivery: &crate::bus::Delivery, delay: Duration) -> crate::Result<()> {
        self.inner.nack(delivery, delay).await
    }
    async fn extend(
        &self,
        delivery: &crate::bus::Delivery,
        lease: Duration,
    ) -> crate::Result<chrono::DateTime<chrono::Utc>> {
        self.inner.extend(delivery, lease).await
    }
    async fn dead_letter(
        &self,
        delivery: &crate::bus::Delivery,
        reason: &str,
    ) -> crate::Result<()> {
        self.inner.dead_letter(delivery, reason).await
    }
    async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> crate::Result<Vec<crate::bus::DeadLetter>> {
        self.inner.dead_letters(queue, limit).await
    }
    async fn stats(&self, queue: &QueueName) -> crate::Result<crate::bus::QueueStats> {
        self.inner.stats(queue).await
    }
    fn max_deliveries(&self) -> u32 {
        self.inner.max_deliveries()
    }
    fn max_delay(&self) -> Option<Duration> {
        self.inner.max_delay()
    }
}

/// A dispatch whose message cannot be sent leaves no PENDING task behind (its registration is
/// undone), alone, delayed and in a batch; the caller's retry with the same id, once the broker
/// takes messages again, runs each task exactly once. A task registered by a dispatcher that
/// died before announcing it is announced by the same dispatch repeated.
pub async fn a_failed_dispatch_leaves_no_orphan_and_can_be_repeated(b: &Backends) {
    let bus = Arc::new(RefusingBus {
        inner: b.bus.clone(),
        refuse: std::sync::atomic::AtomicBool::new(true),
    });
    let faulty = Backends::new(bus.clone(), b.registry.clone(), b.locks.clone());
    let d = Dispatcher::new(faulty);
    let with_id = |id: &str| DispatchOptions {
        task_id: Some(TaskId::parse(id).unwrap()),
        ..DispatchOptions::default()
    };
    let now = with_id("task_refused_now");
    let later = DispatchOptions {
        delay: Duration::from_millis(200),
        ..with_id("task_refused_later")
    };
    let batch = || {
        ["task_refused_b1", "task_refused_b2"]
            .map(|id| {
                d.build("refused", json!({"id": id}), 3, &with_id(id))
                    .unwrap()
            })
            .to_vec()
    };
    let ids: Vec<TaskId> = [
        "task_refused_now",
        "task_refused_later",
        "task_refused_b1",
        "task_refused_b2",
    ]
    .map(|id| TaskId::parse(id).unwrap())
    .to_vec();

    let e = d
        .dispatch("refused", json!({"n": 1}), 5, now.clone())
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "a refused enqueue is worth retrying: {e}");
    let e = d
        .dispatch("refused", json!({"n": 2}), 5, later.clone())
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "{e}");
    let results = d.dispatch_many(batch()).await.unwrap();
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    for id in &ids {
        let t = d.get(id).await.unwrap();
        assert_eq!(t.status(), TaskStatus::Failed, "{id} left as {t:?}");
        assert_eq!(t.state.attempt, 0, "{t:?}");
        let why = t.state.error.as_deref().unwrap_or("");
        assert!(why.starts_with("not announced"), "{id}: {why}");
    }
    let counts = b.registry.counts().await.unwrap();
    assert_eq!(
        counts.get(TaskStatus::Pending),
        0,
        "an orphan is left: {counts:?}"
    );

    // A dispatcher that died between registering and announcing: the task is PENDING with no
    // message, and its caller repeats the dispatch.
    let stranded = d
        .build("refused", json!({"n": 3}), 5, &with_id("task_stranded"))
        .unwrap();
    b.registry.create(&stranded).await.unwrap();

    bus.refuse.store(false, Ordering::SeqCst);
    let w = Worker::new(b.clone(), quick_config("refused-runner", 2))
        .handle("refused", echo())
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(
        d.dispatch("refused", json!({"n": 1}), 5, now.clone())
            .await
            .unwrap(),
        ids[0]
    );
    assert_eq!(
        d.dispatch("refused", json!({"n": 2}), 5, later)
            .await
            .unwrap(),
        ids[1]
    );
    let again: Vec<TaskId> = d
        .dispatch_many(batch())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(again, ids[2..]);
    assert_eq!(
        d.dispatch("refused", json!({"n": 3}), 5, with_id("task_stranded"))
            .await
            .unwrap(),
        stranded.task_id
    );
    for id in ids.iter().chain([&stranded.task_id]) {
        let t = wait_done(&d, id).await;
        assert_eq!(t.status(), TaskStatus::Completed, "{t:?}");
        assert_eq!(t.state.attempt, 1, "{id} ran more than once: {t:?}");
        assert_eq!(t.state.error, None, "{t:?}");
    }
    // Repeating a finished task's dispatch changes nothing; another request under its id is
    // refused.
    assert_eq!(
        d.dispatch("refused", json!({"n": 1}), 5, now.clone())
            .await
            .unwrap(),
        ids[0]
    );
    assert!(matches!(
        d.dispatch("refused", json!({"n": 9}), 5, now)
            .await
            .unwrap_err(),
        crate::Error::TaskExists(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await; // any extra message would run now
    let t = d.get(&ids[0]).await.unwrap();
    assert_eq!(
        (t.status(), t.state.attempt),
        (TaskStatus::Completed, 1),
        "{t:?}"
    );
    w.shutdown().await;
}

/// A worker announces itself on the bus: `list_workers` hears its id, queues and the task it
/// is running; after a shutdown it is no longer listed.
pub async fn workers_announce_themselves_with_their_running_tasks(b: &Backends) {
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (r, s) = (release.clone(), started.clone());
    let mut cfg = quick_config("announced-worker", 2);
    cfg.announce_every = Some(Duration::from_millis(100));
    let w = Worker::new(b.clone(), cfg)
        .handle(
            "announced",
            handler_fn(move |ctx: TaskContext| {
                let (r, s) = (r.clone(), s.clone());
                async move {
                    s.notify_one();
                    r.notified().await;
                    Ok::<_, TaskError>(ctx.task.payload)
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("announced", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, started.notified())
        .await
        .expect("the task never started");
    let heard = crate::engine::list_workers(b.bus.as_ref(), Duration::from_secs(2))
        .await
        .unwrap();
    let me = heard
        .iter()
        .find(|w| w.worker_id == "announced-worker")
        .unwrap_or_else(|| panic!("the worker was not heard: {heard:?}"));
    assert_eq!(me.queues, [QueueName::parse("announced").unwrap()]);
    assert_eq!(me.concurrency, 2);
    assert_eq!(me.pid, std::process::id());
    assert!(!me.stopping);
    let running: Vec<&TaskId> = me.running.iter().map(|r| &r.task_id).collect();
    assert_eq!(running, [&id], "{me:?}");
    assert_eq!(me.running[0].attempt, 1);
    release.notify_one();
    assert_eq!(wait_done(&d, &id).await.status(), TaskStatus::Completed);
    w.shutdown().await;
    let heard = crate::engine::list_workers(b.bus.as_ref(), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        heard.iter().all(|w| w.worker_id != "announced-worker"),
        "a stopped worker is still listed: {heard:?}"
    );
    // Nonsense windows are refused.
    assert!(matches!(
        crate::engine::list_workers(b.bus.as_ref(), Duration::ZERO).await,
        Err(crate::Error::InvalidInput { .. })
    ));
}

/// Expands to one test per function of this module, each on fresh backends made by
/// `$make(prefix)` and cleaned by `$cleanup(prefix)` afterwards (also when the test fails), like
/// [`conformance_suite!`](crate::conformance_suite).
#[macro_export]
macro_rules! engine_suite {
    ($make:path, $cleanup:path $(,)?) => {
        $crate::__suite_tests! {
            $make, $cleanup;
            engine: [
                research_pipeline_runs_writer_after_researcher,
                failed_parent_fails_its_dependents,
                urgent_tasks_finish_first_under_a_backlog,
                killed_workers_task_is_recovered_and_completed_once,
                an_early_redelivery_recovers_a_dead_workers_task_without_a_monitor,
                wait_sees_a_finish_whose_event_was_lost_on_a_busy_bus,
                failing_task_is_retried_then_failed,
                handler_panic_is_caught_and_retried,
                typed_handler_fails_bad_payload_without_retry,
                malformed_message_is_dead_lettered_and_worker_keeps_running,
                graceful_shutdown_loses_nothing,
                shutdown_waits_for_the_outcomes_being_recorded,
                hand_back_on_shutdown_costs_no_attempt,
                shutdown_hands_back_what_a_fetch_on_its_way_claimed,
                a_fetch_loop_that_panics_is_started_again,
                cancelled_task_never_runs,
                dispatcher_rejects_bad_input_with_typed_errors,
                dispatch_many_refuses_tasks_that_would_wait_forever,
                monitor_reannounces_a_pending_task_whose_message_was_lost,
                retry_announces_a_pending_task_whose_message_was_lost,
                monitor_fails_a_stale_task_with_no_attempts_left,
                a_failed_dispatch_leaves_no_orphan_and_can_be_repeated,
                workers_announce_themselves_with_their_running_tasks,
                a_running_task_is_cancelled_and_its_handler_stopped,
                a_running_task_reports_its_progress,
            ];
            engine_control: [
                paused_queue_finishes_what_runs_and_claims_nothing_more,
                pause_holds_for_a_worker_started_later,
                requeued_dead_letters_run_their_tasks,
                all_dead_letters_are_requeued_or_deleted,
                pausing_one_queue_leaves_the_others_served,
            ];
            options: [
                a_task_over_its_timeout_is_stopped_and_retried,
                a_task_timeout_overrides_the_workers,
                a_task_past_its_deadline_fails_unrun,
                a_retry_after_the_deadline_is_not_made,
                bad_timeouts_deadlines_and_unique_keys_are_typed_errors,
                a_duplicate_unique_key_returns_the_first_id,
                concurrent_dispatches_with_one_unique_key_make_one_task,
                a_unique_key_makes_a_new_task_after_its_ttl,
                a_failed_unique_dispatch_frees_its_key,
            ];
            engine_limits: [
                a_rate_limit_holds_across_two_workers,
                a_concurrency_cap_holds_across_two_workers,
                a_limit_set_at_runtime_reaches_a_running_worker,
            ];
            schedule: [
                schedules_are_stored_listed_replaced_and_removed,
                bad_schedules_are_refused_with_typed_errors,
                a_schedule_fires_each_occurrence_once_across_a_killed_monitor,
                late_occurrences_follow_the_catch_up_policy,
                a_paused_schedule_fires_nothing_and_resumes_without_the_past,
            ];
        }
    };
}

/// Cancelling a RUNNING task: the task is CANCELLED at once and its dependents fail; a handler
/// that awaits its signal sees it and what it returns is refused; a handler that ignores it is
/// dropped after the grace, freeing its slot; a worker that missed the notice (here: none was
/// sent, the registry was changed directly) finds out at its next heartbeat.
pub async fn a_running_task_is_cancelled_and_its_handler_stopped(b: &Backends) {
    let started = Arc::new(tokio::sync::Notify::new());
    let saw_cancel = Arc::new(AtomicU32::new(0));
    let (st, saw) = (started.clone(), saw_cancel.clone());
    let mut cfg = quick_config("cancel-running", 1);
    cfg.cancel_grace = Duration::from_millis(300);
    let w = Worker::new(b.clone(), cfg)
        .handle(
            "cancel_running",
            handler_fn(move |ctx: TaskContext| {
                let (st, saw) = (st.clone(), saw.clone());
                async move {
                    match ctx.task.payload["mode"].as_str() {
                        Some("cooperative") => {
                            st.notify_one();
                            ctx.cancelled().await;
                            saw.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, TaskError>(json!("a result after the cancel"))
                        }
                        Some("stubborn") => {
                            st.notify_one();
                            std::future::pending::<()>().await;
                            Ok(json!("never"))
                        }
                        _ => Ok(json!("quick")),
                    }
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());

    // A handler that listens: cancelled through the dispatcher (a notice on the bus).
    let id = d
        .dispatch(
            "cancel_running",
            json!({"mode": "cooperative"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    let child = d
        .dispatch(
            "cancel_running",
            json!({}),
            5,
            DispatchOptions {
                depends_on: vec![id.clone()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, started.notified())
        .await
        .expect("the cooperative task never started");
    let cancelled = d.cancel(&id).await.unwrap();
    assert_eq!(cancelled.status(), TaskStatus::Cancelled);
    assert!(
        cancelled
            .state
            .error
            .as_deref()
            .is_some_and(|e| e.contains("while running (attempt 1 on worker cancel-running)")),
        "{cancelled:?}"
    );
    eventually("the handler saw its cancellation signal", LIMIT, || async {
        match saw_cancel.load(Ordering::SeqCst) {
            1 => Ok(()),
            n => Err(format!("seen {n} times")),
        }
    })
    .await;
    eventually("the worker ended the cancelled attempt", LIMIT, || async {
        match w.metrics().cancelled {
            1 => Ok(()),
            n => Err(format!("cancelled = {n}")),
        }
    })
    .await;
    let t = d.get(&id).await.unwrap();
    assert_eq!(t.status(), TaskStatus::Cancelled, "{t:?}");
    assert_eq!(
        t.state.result, None,
        "the cancelled attempt's result was recorded"
    );
    assert_eq!(wait_done(&d, &child).await.status(), TaskStatus::Failed);
    // A finished task cannot be cancelled.
    assert!(matches!(
        d.cancel(&id).await,
        Err(crate::Error::IllegalTransition { .. })
    ));

    // A handler that ignores the signal, on a worker that hears of the cancel only at its
    // heartbeat: dropped after the grace, and its only slot runs the next task.
    let stubborn = d
        .dispatch(
            "cancel_running",
            json!({"mode": "stubborn"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, started.notified())
        .await
        .expect("the stubborn task never started");
    let running = eventually("the stubborn task is RUNNING", LIMIT, || async {
        let t = d.get(&stubborn).await.map_err(|e| e.to_string())?;
        match t.status() {
            TaskStatus::Running => Ok(t),
            s => Err(format!("{s}")),
        }
    })
    .await;
    let now = chrono::Utc::now();
    let next = crate::model::TaskState {
        status: TaskStatus::Cancelled,
        lease_until: None,
        finished_at: Some(now),
        updated_at: now,
        ..running.state.clone()
    };
    b.registry
        .transition(&stubborn, running.expect(), next)
        .await
        .unwrap();
    let after = d
        .dispatch("cancel_running", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let done = wait_done(&d, &after).await;
    assert_eq!(done.status(), TaskStatus::Completed);
    assert_eq!(w.metrics().cancelled, 2);
    assert_eq!(
        d.get(&stubborn).await.unwrap().status(),
        TaskStatus::Cancelled
    );
    w.shutdown().await;
}

/// A handler's progress reports reach the registry while it runs (the latest one wins, at most
/// one write a second) and the last one stays on the finished task; a report too large is
/// refused and changes nothing.
pub async fn a_running_task_reports_its_progress(b: &Backends) {
    let release = Arc::new(tokio::sync::Notify::new());
    let refused = Arc::new(Mutex::new(None));
    let (r, bad) = (release.clone(), refused.clone());
    let w = Worker::new(b.clone(), quick_config("progress-worker", 1))
        .handle(
            "progress_q",
            handler_fn(move |ctx: TaskContext| {
                let (r, bad) = (r.clone(), bad.clone());
                async move {
                    ctx.progress(json!({"step": 0}))?;
                    ctx.progress(json!({"step": 1, "of": 2}))?;
                    *bad.lock() = Some(ctx.progress("x".repeat(5000)));
                    r.notified().await;
                    ctx.progress(json!({"step": 2, "of": 2}))?;
                    Ok::<_, TaskError>(json!("done"))
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let id = d
        .dispatch("progress_q", json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let seen = eventually(
        "the first progress report is on the task",
        LIMIT,
        || async {
            let t = d.get(&id).await.map_err(|e| e.to_string())?;
            match &t.state.progress {
                Some(p) if *p == json!({"step": 1, "of": 2}) => Ok(t),
                other => Err(format!("{} with progress {other:?}", t.status())),
            }
        },
    )
    .await;
    assert_eq!(seen.status(), TaskStatus::Running);
    assert!(matches!(
        refused.lock().take(),
        Some(Err(crate::Error::InvalidInput { .. }))
    ));
    release.notify_one();
    let done = wait_done(&d, &id).await;
    assert_eq!(done.status(), TaskStatus::Completed);
    assert_eq!(done.state.progress, Some(json!({"step": 2, "of": 2})));
    assert_eq!(done.state.result, Some(json!("done")));
    w.shutdown().await;
}
