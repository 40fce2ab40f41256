//! The engine suite's part on the operator's controls ([`Control`]): workers of a paused queue
//! claim nothing until it is resumed, also after a restart, while what they run finishes; dead
//! letters are requeued (their tasks PENDING again and run) or deleted.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::bundle::Backends;
use crate::bus::{FetchOptions, OutgoingMessage};
use crate::engine::{
    handler_fn, Backoff, Control, DeadLetterOutcome, DeadLetterSelection, DispatchOptions,
    Dispatcher, TaskContext, TaskError, Worker, WorkerConfig, WorkerHandle,
};
use crate::model::{Priority, QueueName, TaskId, TaskStatus};
use crate::testkit::{eventually, must};

const LIMIT: Duration = Duration::from_secs(60);

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

/// A worker that reads the paused queues every 100 ms.
fn config(id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_string(),
        concurrency: 2,
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
        announce_every: Some(Duration::from_millis(100)),
        ..WorkerConfig::default()
    }
}

fn echo_worker(b: &Backends, id: &str, q: &str) -> WorkerHandle {
    Worker::new(b.clone(), config(id))
        .handle(
            q,
            handler_fn(|ctx: TaskContext| async move { Ok::<_, TaskError>(ctx.task.payload) }),
        )
        .unwrap()
        .start()
        .unwrap()
}

async fn wait_paused(w: &WorkerHandle, q: &QueueName, paused: bool) {
    eventually(
        format!("worker {} sees {q} paused={paused}", w.worker_id()),
        LIMIT,
        || async {
            match w.paused_queues() {
                Some(p) if p.contains(q) == paused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

async fn status(d: &Dispatcher, id: &TaskId) -> crate::Task {
    must(format!("get {id}"), d.get(id)).await
}

/// Waits `for_` and checks that `id` is still PENDING and its message still queued.
async fn stays_pending(b: &Backends, d: &Dispatcher, id: &TaskId, q: &QueueName, for_: Duration) {
    tokio::time::sleep(for_).await;
    let t = status(d, id).await;
    assert_eq!(
        t.status(),
        TaskStatus::Pending,
        "a paused queue's task ran: {t:?}"
    );
    // A fetch on its way when the pause was read may have claimed it: handed back, unrun, at
    // no attempt's cost.
    assert_eq!(
        t.charged_attempts(),
        0,
        "a paused queue's task was charged an attempt: {t:?}"
    );
    assert!(
        t.state.error.is_none()
            || t.state.error.as_deref() == Some("handed back by a worker whose queue was paused"),
        "{t:?}"
    );
    let stats = must("stats", b.bus.stats(q)).await;
    assert_eq!(
        stats.waiting + stats.in_flight,
        1,
        "the message left the queue: {stats:?}"
    );
}

/// A paused queue: the running task finishes and is recorded, nothing new is claimed while
/// paused (the message stays queued), and a resume lets the same worker run it.
pub async fn paused_queue_finishes_what_runs_and_claims_nothing_more(b: &Backends) {
    let q = queue("paused_live");
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (r, s) = (release.clone(), started.clone());
    let w = Worker::new(b.clone(), config("pausing-worker"))
        .handle(
            q.as_str(),
            handler_fn(move |ctx: TaskContext| {
                let (r, s) = (r.clone(), s.clone());
                async move {
                    if ctx.task.payload["block"] == json!(true) {
                        s.notify_one();
                        r.notified().await;
                    }
                    Ok::<_, TaskError>(ctx.task.payload)
                }
            }),
        )
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let control = Control::new(b.clone());
    let running = d
        .dispatch(
            q.as_str(),
            json!({"block": true}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, started.notified())
        .await
        .expect("the blocking task never started");
    assert!(must("pause", control.pause(&q)).await);
    wait_paused(&w, &q, true).await;
    let waiting = d
        .dispatch(q.as_str(), json!({"n": 2}), 5, DispatchOptions::default())
        .await
        .unwrap();
    // The running task finishes and is recorded while the queue is paused.
    release.notify_one();
    let done = d.wait(&running, LIMIT).await.unwrap();
    assert_eq!(
        (done.status(), done.state.attempt),
        (TaskStatus::Completed, 1)
    );
    stays_pending(b, &d, &waiting, &q, Duration::from_millis(800)).await;
    let listed = must("queues", control.queues(&[])).await;
    let info = listed
        .iter()
        .find(|i| i.queue == q)
        .expect("the queue is listed");
    assert!(info.paused, "{info:?}");
    assert_eq!(info.tasks.get(TaskStatus::Pending), 1, "{info:?}");
    assert_eq!(info.tasks.get(TaskStatus::Completed), 1, "{info:?}");
    assert!(must("resume", control.resume(&q)).await);
    let done = d.wait(&waiting, LIMIT).await.unwrap();
    assert_eq!(
        (done.status(), done.charged_attempts()),
        (TaskStatus::Completed, 1)
    );
    assert!(!must("queues", control.queues(&[]))
        .await
        .iter()
        .any(|i| i.paused));
    w.shutdown().await;
}

/// The pause is stored in the backend: a worker started after it claims nothing from the
/// queue (it reads the flag before its first fetch) until the queue is resumed.
pub async fn pause_holds_for_a_worker_started_later(b: &Backends) {
    let q = queue("paused_restart");
    let d = Dispatcher::new(b.clone());
    let control = Control::new(b.clone());
    assert!(must("pause", control.pause(&q)).await);
    let id = d
        .dispatch(q.as_str(), json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let w = echo_worker(b, "late-worker", q.as_str());
    wait_paused(&w, &q, true).await;
    stays_pending(b, &d, &id, &q, Duration::from_millis(800)).await;
    w.shutdown().await;
    // Another worker, later still: the flag is there as long as nobody resumes.
    let w = echo_worker(b, "later-worker", q.as_str());
    wait_paused(&w, &q, true).await;
    stays_pending(b, &d, &id, &q, Duration::from_millis(300)).await;
    assert!(must("resume", control.resume(&q)).await);
    let done = d.wait(&id, LIMIT).await.unwrap();
    assert_eq!(
        (done.status(), done.state.attempt),
        (TaskStatus::Completed, 1)
    );
    w.shutdown().await;
}

/// Moves the one message of `q` to the dead letters, as the bus does after too many
/// deliveries, and returns its message id.
async fn bury_one(b: &Backends, q: &QueueName) -> String {
    let options = FetchOptions {
        max: 1,
        wait: Duration::from_secs(5),
        lease: Duration::from_secs(30),
    };
    let d = must("fetch", b.bus.fetch(q, options))
        .await
        .pop()
        .expect("a message to bury");
    must("dead_letter", b.bus.dead_letter(&d, "buried by the test")).await;
    d.message_id
}

/// Requeue: a dead letter of a PENDING task and one of a CANCELLED task go back as new
/// messages (the CANCELLED task PENDING again, its attempts kept) and run; one of a COMPLETED
/// task is left with the reason; an unknown id is reported; one that is not a task message is
/// put back as it was.
pub async fn requeued_dead_letters_run_their_tasks(b: &Backends) {
    let q = queue("requeued");
    let d = Dispatcher::new(b.clone());
    let control = Control::new(b.clone());
    let pending = d
        .dispatch(
            q.as_str(),
            json!({"k": "pending"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    let pending_msg = bury_one(b, &q).await;
    let cancelled = d
        .dispatch(
            q.as_str(),
            json!({"k": "cancelled"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    let cancelled_msg = bury_one(b, &q).await;
    must("cancel", d.cancel(&cancelled)).await;
    // A task that ran to completion, whose (duplicate) message was buried.
    let w = echo_worker(b, "requeue-worker-1", q.as_str());
    let completed = d
        .dispatch(
            q.as_str(),
            json!({"k": "done"}),
            5,
            DispatchOptions::default(),
        )
        .await
        .unwrap();
    d.wait(&completed, LIMIT).await.unwrap();
    w.shutdown().await;
    let dup = OutgoingMessage::new(
        crate::wire::TaskMessage::encode(&completed),
        Priority::DEFAULT,
    );
    must("enqueue a duplicate", b.bus.enqueue(&q, dup)).await;
    let completed_msg = bury_one(b, &q).await;

    let named = DeadLetterSelection::Ids(vec![
        pending_msg.clone(),
        cancelled_msg.clone(),
        completed_msg.clone(),
        "no-such-dead-letter".to_string(),
    ]);
    let outcomes = must("requeue", control.requeue_dead_letters(&q, &named)).await;
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    for (o, (msg, task)) in outcomes
        .iter()
        .zip([(&pending_msg, &pending), (&cancelled_msg, &cancelled)])
    {
        match o {
            DeadLetterOutcome::Requeued {
                message_id,
                task_id,
                task_status,
                ..
            } => {
                assert_eq!((message_id, task_id.as_ref()), (msg, Some(task)));
                assert_eq!(*task_status, Some(TaskStatus::Pending));
            }
            other => panic!("expected {msg} requeued, got {other:?}"),
        }
    }
    assert!(
        matches!(&outcomes[2], DeadLetterOutcome::Skipped { message_id, reason, .. } if message_id == &completed_msg && reason.contains("COMPLETED")),
        "{:?}",
        outcomes[2]
    );
    assert!(outcomes[3].is_not_found(), "{:?}", outcomes[3]);
    let left = must("dead_letters", b.bus.dead_letters(&q, 10)).await;
    assert_eq!(
        left.iter().map(|l| &l.message_id).collect::<Vec<_>>(),
        [&completed_msg]
    );
    assert_eq!(status(&d, &cancelled).await.status(), TaskStatus::Pending);

    // A message that names no task (on a queue of its own) goes back as it was.
    let raw_q = queue("requeued_raw");
    let raw = OutgoingMessage::new(b"not a task message".to_vec(), Priority::DEFAULT);
    must("enqueue raw", b.bus.enqueue(&raw_q, raw)).await;
    let raw_msg = bury_one(b, &raw_q).await;
    let outcomes = must(
        "requeue raw",
        control.requeue_dead_letters(&raw_q, &DeadLetterSelection::Ids(vec![raw_msg.clone()])),
    )
    .await;
    assert!(
        matches!(
            &outcomes[..],
            [DeadLetterOutcome::Requeued { task_id: None, .. }]
        ),
        "{outcomes:?}"
    );
    assert!(must("dead_letters", b.bus.dead_letters(&raw_q, 10))
        .await
        .is_empty());

    let echo =
        || handler_fn(|ctx: TaskContext| async move { Ok::<_, TaskError>(ctx.task.payload) });
    let w = Worker::new(b.clone(), config("requeue-worker-2"))
        .handle(q.as_str(), echo())
        .unwrap()
        .handle(raw_q.as_str(), echo())
        .unwrap()
        .start()
        .unwrap();
    for id in [&pending, &cancelled] {
        let done = d.wait(id, LIMIT).await.unwrap();
        assert_eq!(
            (done.status(), done.state.attempt),
            (TaskStatus::Completed, 1),
            "{id}"
        );
    }
    // The raw message is dead-lettered again by the worker (it names no task).
    eventually("the raw message is buried again", LIMIT, || async {
        let dead = b
            .bus
            .dead_letters(&raw_q, 10)
            .await
            .map_err(|e| e.to_string())?;
        match dead.iter().any(|l| l.payload == b"not a task message") {
            true => Ok(()),
            false => Err(format!("{dead:?}")),
        }
    })
    .await;
    w.shutdown().await;
}

/// `--all`: requeue takes every dead letter there when it starts; delete removes them for good
/// and leaves their tasks as they are.
pub async fn all_dead_letters_are_requeued_or_deleted(b: &Backends) {
    let q = queue("all_dead");
    let d = Dispatcher::new(b.clone());
    let control = Control::new(b.clone());
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            d.dispatch(q.as_str(), json!({"i": i}), 5, DispatchOptions::default())
                .await
                .unwrap(),
        );
        bury_one(b, &q).await;
    }
    assert_eq!(must("stats", b.bus.stats(&q)).await.dead, 3);
    let outcomes = must(
        "requeue all",
        control.requeue_dead_letters(&q, &DeadLetterSelection::All),
    )
    .await;
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, DeadLetterOutcome::Requeued { .. })),
        "{outcomes:?}"
    );
    assert_eq!(must("stats", b.bus.stats(&q)).await.dead, 0);
    // Bury them again and delete them all: the tasks stay as they are (PENDING).
    for _ in 0..3 {
        bury_one(b, &q).await;
    }
    let outcomes = must(
        "delete all",
        control.delete_dead_letters(&q, &DeadLetterSelection::All),
    )
    .await;
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, DeadLetterOutcome::Deleted { .. })),
        "{outcomes:?}"
    );
    assert!(must("dead_letters", b.bus.dead_letters(&q, 10))
        .await
        .is_empty());
    for id in &ids {
        assert_eq!(status(&d, id).await.status(), TaskStatus::Pending);
    }
    let outcomes = must(
        "delete a gone one",
        control.delete_dead_letters(&q, &DeadLetterSelection::Ids(vec!["gone".into()])),
    )
    .await;
    assert!(outcomes[0].is_not_found(), "{outcomes:?}");
    assert!(matches!(
        control
            .delete_dead_letters(&q, &DeadLetterSelection::Ids(vec![]))
            .await,
        Err(crate::Error::InvalidInput { .. })
    ));
}

/// Pausing one queue of a worker leaves its other queues served.
pub async fn pausing_one_queue_leaves_the_others_served(b: &Backends) {
    let (paused, served) = (queue("one_paused"), queue("one_served"));
    let echo =
        || handler_fn(|ctx: TaskContext| async move { Ok::<_, TaskError>(ctx.task.payload) });
    let w = Worker::new(b.clone(), config("two-queue-worker"))
        .handle(paused.as_str(), echo())
        .unwrap()
        .handle(served.as_str(), echo())
        .unwrap()
        .start()
        .unwrap();
    let d = Dispatcher::new(b.clone());
    let control = Control::new(b.clone());
    must("pause", control.pause(&paused)).await;
    wait_paused(&w, &paused, true).await;
    assert_eq!(w.paused_queues(), Some(vec![paused.clone()]));
    let held = d
        .dispatch(paused.as_str(), json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    let ran = d
        .dispatch(served.as_str(), json!({}), 5, DispatchOptions::default())
        .await
        .unwrap();
    assert_eq!(
        d.wait(&ran, LIMIT).await.unwrap().status(),
        TaskStatus::Completed
    );
    stays_pending(b, &d, &held, &paused, Duration::from_millis(300)).await;
    must("resume", control.resume(&paused)).await;
    assert_eq!(
        d.wait(&held, LIMIT).await.unwrap().status(),
        TaskStatus::Completed
    );
    w.shutdown().await;
}
