//! [`TaskQueue`](crate::TaskQueue) conformance: the dispatcher's and the worker's hot path
//! (submit, fetch and claim, record and settle) behaves like
//! [`Composed`](crate::task_queue::Composed) on every backend, whether the backend fuses the
//! steps into fewer round trips or not.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{must, must_within, within, CALL_TIMEOUT};
use crate::bus::{Delivery, FetchOptions, OutgoingMessage};
use crate::model::Limits;
use crate::task_queue::{Claim, ClaimSpec, Settle};
use crate::wire::TaskMessage;
use crate::wire::{TaskEvent, EVENTS_TOPIC};
use crate::{
    Backends, Error, Priority, QueueName, Subscription, Task, TaskId, TaskState, TaskStatus,
};

const LEASE: Duration = Duration::from_secs(60);

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

fn task(id: &str, q: &QueueName, priority: i64, max_attempts: u32) -> Task {
    let mut t = Task::new(
        q.clone(),
        json!({"name": id, "n": [1, 2, 3]}),
        Priority::new(priority).expect("test priority"),
        max_attempts,
        Vec::new(),
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("building test task {id}: {e}"));
    t.task_id = TaskId::parse(id).expect("test task id");
    t
}

fn spec(worker: &str) -> ClaimSpec {
    ClaimSpec {
        worker_id: worker.into(),
        lease: LEASE,
    }
}

async fn submit_all(b: &Backends, tasks: &[Task]) {
    for (t, r) in tasks
        .iter()
        .zip(must("submit", b.tasks().submit(tasks)).await)
    {
        if let Err(e) = r {
            panic!("submitting {} failed: {e}", t.task_id);
        }
    }
}

/// Fetches up to `max` deliveries of `q` and claims each (in the fetch or with `claim`).
async fn fetch_and_claim(
    b: &Backends,
    q: &QueueName,
    max: usize,
    spec: &ClaimSpec,
) -> Vec<(Delivery, Claim)> {
    let options = FetchOptions {
        max,
        wait: Duration::from_secs(5),
        lease: LEASE,
    };
    let got = must_within(
        format!("fetch_claim(max = {max}) from {q}"),
        options.wait + CALL_TIMEOUT,
        b.tasks().fetch_claim(q, options, spec),
    )
    .await;
    let mut out = Vec::new();
    for (d, c) in got {
        let c = match c {
            Some(c) => c,
            None => must("claim", b.tasks().claim(&d, spec)).await,
        };
        out.push((d, c));
    }
    out
}

/// Fetches up to `max` deliveries of `q` with the bus alone (no claim), waiting up to 5 s.
async fn fetch_plain(b: &Backends, q: &QueueName, max: usize) -> Vec<Delivery> {
    let options = FetchOptions {
        max,
        wait: Duration::from_secs(5),
        lease: LEASE,
    };
    must_within(
        format!("fetch(max = {max}) from {q}"),
        options.wait + CALL_TIMEOUT,
        b.bus.fetch(q, options),
    )
    .await
}

async fn claim_one(b: &Backends, q: &QueueName, spec: &ClaimSpec) -> (Delivery, Claim) {
    let mut got = fetch_and_claim(b, q, 1, spec).await;
    assert_eq!(got.len(), 1, "expected one delivery from {q}");
    got.pop().expect("one delivery")
}

fn claimed(c: Claim) -> Task {
    match c {
        Claim::Claimed(t) => t,
        other => panic!("expected the task to be claimed, got {other:?}"),
    }
}

/// The next event about `id` on `sub`, within the call timeout.
/// The next event of task `id` with `status`. Earlier events of the task are skipped: one
/// published just before the subscription may still arrive after it where pub/sub crosses
/// nodes (a Redis Cluster forwards a `PUBLISH` over its cluster bus).
async fn event_for(sub: &mut Subscription, id: &TaskId, status: TaskStatus) -> TaskEvent {
    within(format!("a {status} event for {id}"), CALL_TIMEOUT, async {
        loop {
            let bytes = sub.recv().await.expect("the subscription stays open");
            if let Some(ev) = TaskEvent::decode(&bytes) {
                if ev.task_id == *id && ev.status == status {
                    return ev;
                }
            }
        }
    })
    .await
}

/// The queue holds no message, once the acks have been applied: an ack may be sent without
/// waiting for the broker (NATS), and a replicated stream applies it through its Raft group a
/// moment later, so its counts are awaited (a message that stays fails the test).
async fn queue_is_empty(b: &Backends, q: &QueueName) {
    super::eventually(
        format!("queue {q} holds no message"),
        Duration::from_secs(10),
        || async {
            match b.bus.stats(q).await {
                Ok(s) if (s.waiting, s.in_flight) == (0, 0) => Ok(()),
                Ok(s) => Err(format!("{s:?}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// Submitted tasks are stored PENDING, their events published, and announced by priority; a
/// taken id is refused with `TaskExists` and announced no second time.
pub async fn submit_stores_publishes_and_announces(b: &Backends) {
    let q = queue("submit");
    let mut sub = must("subscribe", b.bus.subscribe(EVENTS_TOPIC)).await;
    let tasks = vec![task("s-low", &q, 9, 1), task("s-urgent", &q, 1, 1)];
    submit_all(b, &tasks).await;
    for t in &tasks {
        let ev = event_for(&mut sub, &t.task_id, TaskStatus::Pending).await;
        assert_eq!((ev.status, ev.attempt), (TaskStatus::Pending, 0));
        let stored = must("get", b.registry.get(&t.task_id))
            .await
            .expect("stored");
        assert_eq!(&stored, t, "the stored task is the submitted one");
    }
    let again = must("submit again", b.tasks().submit(&tasks[..1])).await;
    assert!(
        matches!(again.as_slice(), [Err(Error::TaskExists(_))]),
        "a taken id gives TaskExists, got {again:?}"
    );
    let got = fetch_plain(b, &q, 10).await;
    let ids: Vec<TaskId> = got
        .iter()
        .map(|d| {
            TaskMessage::decode(&d.payload)
                .expect("a task message")
                .task_id
        })
        .collect();
    assert_eq!(
        ids,
        vec![tasks[1].task_id.clone(), tasks[0].task_id.clone()],
        "one message per created task, most urgent first"
    );
}

/// A PENDING task is claimed: RUNNING, attempt 1, this worker, leased, its event published.
pub async fn fetch_claim_claims_pending_tasks(b: &Backends) {
    let q = queue("claim");
    let t = task("c-1", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&t)).await;
    let mut sub = must("subscribe", b.bus.subscribe(EVENTS_TOPIC)).await;
    let before = Utc::now();
    let (d, c) = claim_one(b, &q, &spec("worker-a")).await;
    let running = claimed(c);
    assert_eq!(running.task_id, t.task_id);
    assert_eq!(running.payload, t.payload, "the claim carries the payload");
    assert_eq!(running.state.status, TaskStatus::Running);
    assert_eq!(running.state.attempt, 1);
    assert_eq!(running.state.worker_id.as_deref(), Some("worker-a"));
    let lease_until = running.state.lease_until.expect("a lease");
    assert!(
        lease_until >= before + chrono::Duration::seconds(59),
        "leased for about a minute: {lease_until} (claimed after {before})"
    );
    assert!(running.state.started_at.is_some() && running.state.finished_at.is_none());
    let stored = must("get", b.registry.get(&t.task_id))
        .await
        .expect("stored");
    assert_eq!(stored, running, "the claim returns the task as stored");
    let counts = must("counts", b.registry.counts()).await;
    assert_eq!(
        (
            counts.get(TaskStatus::Pending),
            counts.get(TaskStatus::Running)
        ),
        (0, 1)
    );
    let ev = event_for(&mut sub, &t.task_id, TaskStatus::Running).await;
    assert_eq!(
        (ev.status, ev.attempt, ev.worker_id.as_deref()),
        (TaskStatus::Running, 1, Some("worker-a"))
    );
    assert_eq!(d.delivery_count, 1);
}

/// Only PENDING tasks, and RUNNING ones whose lease ended with attempts left, are claimed; a
/// message naming no task, or no task message at all, says so.
pub async fn claim_refuses_what_is_not_claimable(b: &Backends) {
    let q = queue("refuse");
    let announce =
        |id: &str| OutgoingMessage::new(format!("{{\"task_id\":\"{id}\"}}"), Priority::DEFAULT);
    // Live lease: not claimable.
    let live = task("r-live", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&live)).await;
    let live = claimed(claim_one(b, &q, &spec("w1")).await.1);
    must("announce again", b.bus.enqueue(&q, announce("r-live"))).await;
    match claim_one(b, &q, &spec("w2")).await.1 {
        Claim::Unclaimable(t) => assert_eq!(t, live, "returned as found"),
        other => panic!("a task under a live lease is not claimable, got {other:?}"),
    }
    // Expired lease, attempts left: taken over with the next attempt.
    let expired_state = |t: &Task| TaskState {
        lease_until: Some(Utc::now() - chrono::Duration::seconds(5)),
        updated_at: Utc::now(),
        ..t.state.clone()
    };
    let dead = must(
        "expire the lease",
        b.registry
            .transition(&live.task_id, live.expect(), expired_state(&live)),
    )
    .await;
    must("announce again", b.bus.enqueue(&q, announce("r-live"))).await;
    let taken = claimed(claim_one(b, &q, &spec("w3")).await.1);
    assert_eq!(
        (taken.state.attempt, taken.state.worker_id.as_deref()),
        (dead.state.attempt + 1, Some("w3")),
        "a takeover is the next attempt"
    );
    // Expired lease and no attempt left: not claimable.
    let last = task("r-last", &q, 5, 1);
    submit_all(b, std::slice::from_ref(&last)).await;
    let last = claimed(claim_one(b, &q, &spec("w1")).await.1);
    must(
        "expire the lease",
        b.registry
            .transition(&last.task_id, last.expect(), expired_state(&last)),
    )
    .await;
    must("announce again", b.bus.enqueue(&q, announce("r-last"))).await;
    match claim_one(b, &q, &spec("w2")).await.1 {
        Claim::Unclaimable(t) => {
            assert_eq!((t.state.status, t.state.attempt), (TaskStatus::Running, 1))
        }
        other => panic!("a task with no attempt left is not claimable, got {other:?}"),
    }
    // Missing and malformed.
    must("announce a ghost", b.bus.enqueue(&q, announce("r-ghost"))).await;
    match claim_one(b, &q, &spec("w1")).await.1 {
        Claim::Missing(id) => assert_eq!(id.as_str(), "r-ghost"),
        other => panic!("a message naming no task gives Missing, got {other:?}"),
    }
    for garbage in [
        "not json",
        "{\"task_id\": 42}",
        "{\"task_id\": \"has space\"}",
    ] {
        must(
            "enqueue garbage",
            b.bus
                .enqueue(&q, OutgoingMessage::new(garbage, Priority::DEFAULT)),
        )
        .await;
        match claim_one(b, &q, &spec("w1")).await.1 {
            Claim::Malformed(why) => assert!(!why.is_empty()),
            other => panic!("{garbage:?} is no task message, got {other:?}"),
        }
    }
}

fn completed(running: &Task) -> TaskState {
    let now = Utc::now();
    TaskState {
        status: TaskStatus::Completed,
        result: Some(json!({"ok": true})),
        lease_until: None,
        finished_at: Some(now),
        updated_at: now,
        ..running.state.clone()
    }
}

/// A terminal outcome is stored, the message acked, the event published, and the dependents
/// listed.
pub async fn record_completes_acks_and_lists_dependents(b: &Backends) {
    let q = queue("record");
    let parent = task("p-1", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&parent)).await;
    let mut child = task("p-1-child", &queue("other"), 5, 3);
    child.depends_on = vec![parent.task_id.clone()];
    child.state.status = TaskStatus::Waiting;
    must("create the child", b.registry.create(&child)).await;
    let (d, c) = claim_one(b, &q, &spec("w1")).await;
    let running = claimed(c);
    let mut sub = must("subscribe", b.bus.subscribe(EVENTS_TOPIC)).await;
    let next = completed(&running);
    let r = must(
        "record",
        b.tasks().record(&d, &running, next.clone(), Settle::Ack),
    )
    .await;
    assert_eq!(r.task.state, next);
    assert_eq!(r.dependents, vec![child.task_id.clone()]);
    let stored = must("get", b.registry.get(&parent.task_id))
        .await
        .expect("stored");
    assert_eq!(stored, r.task, "returns the task as stored");
    let ev = event_for(&mut sub, &parent.task_id, TaskStatus::Completed).await;
    assert_eq!((ev.status, ev.attempt), (TaskStatus::Completed, 1));
    queue_is_empty(b, &q).await;
    // A childless task lists none.
    let lone = task("p-2", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&lone)).await;
    let (d, c) = claim_one(b, &q, &spec("w1")).await;
    let running = claimed(c);
    let r = must(
        "record",
        b.tasks()
            .record(&d, &running, completed(&running), Settle::Ack),
    )
    .await;
    assert!(r.dependents.is_empty());
}

/// A retry is stored PENDING and the message comes back (after its delay); the same call made
/// again (a lost reply) settles nothing twice.
pub async fn record_with_nack_gives_the_message_back_once(b: &Backends) {
    let q = queue("retry");
    let t = task("n-1", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&t)).await;
    let (d, c) = claim_one(b, &q, &spec("w1")).await;
    let running = claimed(c);
    let next = TaskState {
        status: TaskStatus::Pending,
        error: Some("try again".into()),
        lease_until: None,
        updated_at: Utc::now(),
        ..running.state.clone()
    };
    let r = must(
        "record a retry",
        b.tasks()
            .record(&d, &running, next.clone(), Settle::Nack(Duration::ZERO)),
    )
    .await;
    assert_eq!(r.task.state, next);
    assert!(r.dependents.is_empty());
    let again = must(
        "the same record again",
        b.tasks()
            .record(&d, &running, next.clone(), Settle::Nack(Duration::ZERO)),
    )
    .await;
    assert_eq!(again.task.state, next, "a replay returns the stored state");
    let back = fetch_and_claim(b, &q, 10, &spec("w2")).await;
    assert_eq!(back.len(), 1, "the message came back exactly once");
    let (d2, c2) = back.into_iter().next().expect("one");
    assert_eq!(d2.delivery_count, 2);
    let second = claimed(c2);
    assert_eq!(
        (second.state.attempt, second.state.error.as_deref()),
        (2, Some("try again"))
    );
}

/// An outcome from an attempt that lost its lease is refused with `Conflict`, changes nothing,
/// and its message is acked; a completion made again after a lost reply is accepted once.
pub async fn record_from_a_lost_attempt_conflicts_and_acks(b: &Backends) {
    let q = queue("lost");
    let t = task("l-1", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&t)).await;
    let (d, c) = claim_one(b, &q, &spec("w1")).await;
    let running = claimed(c);
    // Another worker took it over (attempt 2).
    let now = Utc::now();
    let takeover = TaskState {
        attempt: 2,
        worker_id: Some("w2".into()),
        lease_until: Some(now + chrono::Duration::seconds(60)),
        updated_at: now,
        ..running.state.clone()
    };
    let current = must(
        "take over",
        b.registry
            .transition(&t.task_id, running.expect(), takeover),
    )
    .await;
    match b
        .tasks()
        .record(&d, &running, completed(&running), Settle::Ack)
        .await
    {
        Err(Error::Conflict {
            actual_status,
            actual_attempt,
            ..
        }) => assert_eq!((actual_status, actual_attempt), (TaskStatus::Running, 2)),
        other => panic!("a lost attempt's outcome conflicts, got {other:?}"),
    }
    let stored = must("get", b.registry.get(&t.task_id))
        .await
        .expect("stored");
    assert_eq!(stored, current, "nothing changed");
    queue_is_empty(b, &q).await;
    // The winner completes; the same completion again (a lost reply) is accepted.
    must(
        "announce",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(TaskMessage::encode(&t.task_id), Priority::DEFAULT),
        ),
    )
    .await;
    let got = fetch_plain(b, &q, 1).await;
    let d2 = got.into_iter().next().expect("the announcement");
    let done = completed(&current);
    must(
        "complete",
        b.tasks().record(&d2, &current, done.clone(), Settle::Ack),
    )
    .await;
    let replay = must(
        "complete again",
        b.tasks().record(&d2, &current, done.clone(), Settle::Ack),
    )
    .await;
    assert_eq!(replay.task.state, done);
    queue_is_empty(b, &q).await;
}

/// A task that another writer (the monitor handing an expired lease back) already moved to the
/// status and attempt of a worker's retry is not taken for the worker's own earlier write: the
/// worker's record conflicts, changes nothing, and its message is acked.
pub async fn record_does_not_take_another_writers_state_for_its_own(b: &Backends) {
    let q = queue("other_writer");
    let t = task("o-1", &q, 5, 3);
    submit_all(b, std::slice::from_ref(&t)).await;
    let (d, c) = claim_one(b, &q, &spec("w1")).await;
    let running = claimed(c);
    let handed_back = TaskState {
        status: TaskStatus::Pending,
        error: Some("lease expired".into()),
        lease_until: None,
        updated_at: Utc::now(),
        ..running.state.clone()
    };
    let current = must(
        "the monitor hands the task back",
        b.registry
            .transition(&t.task_id, running.expect(), handed_back),
    )
    .await;
    let retry = TaskState {
        status: TaskStatus::Pending,
        error: Some("try again".into()),
        lease_until: None,
        updated_at: current.state.updated_at + chrono::Duration::milliseconds(3),
        ..running.state.clone()
    };
    match b
        .tasks()
        .record(&d, &running, retry, Settle::Nack(Duration::ZERO))
        .await
    {
        Err(Error::Conflict {
            actual_status,
            actual_attempt,
            ..
        }) => assert_eq!((actual_status, actual_attempt), (TaskStatus::Pending, 1)),
        other => panic!("another writer's state is no replay of this record, got {other:?}"),
    }
    let stored = must("get", b.registry.get(&t.task_id))
        .await
        .expect("stored");
    assert_eq!(stored, current, "nothing changed");
    queue_is_empty(b, &q).await;
}

/// Outcomes recorded at the same moment by many worker slots (which a backend may send in one
/// batch) each get their own reply and their own effect: completions, retries and the
/// conflicts of attempts that lost their lease, for tasks of one queue.
pub async fn records_made_at_once_each_get_their_own_outcome(b: &Backends) {
    let q = queue("wave");
    let tasks: Vec<Task> = (0..24)
        .map(|i| task(&format!("wave-{i}"), &q, 1 + i % 10, 3))
        .collect();
    submit_all(b, &tasks).await;
    let mut got = Vec::new();
    while got.len() < tasks.len() {
        let more = fetch_and_claim(b, &q, tasks.len() - got.len(), &spec("w1")).await;
        assert!(!more.is_empty(), "{} of 24 tasks delivered", got.len());
        got.extend(more);
    }
    let running: Vec<(Delivery, Task)> = got.into_iter().map(|(d, c)| (d, claimed(c))).collect();
    // By position: 0..12 complete, 12..18 fail and retry at once, 18..24 record from an attempt
    // that is not the stored one (a lost lease): Conflict, and the message is acked.
    let calls = running.iter().enumerate().map(|(i, (d, t))| async move {
        let r = match i {
            0..=11 => b.tasks().record(d, t, completed(t), Settle::Ack).await,
            12..=17 => {
                let next = TaskState {
                    status: TaskStatus::Pending,
                    error: Some(format!("again {i}")),
                    lease_until: None,
                    updated_at: Utc::now(),
                    ..t.state.clone()
                };
                b.tasks()
                    .record(d, t, next, Settle::Nack(Duration::ZERO))
                    .await
            }
            _ => {
                let stale = Task {
                    state: TaskState {
                        attempt: 9,
                        ..t.state.clone()
                    },
                    ..t.clone()
                };
                b.tasks()
                    .record(d, &stale, completed(&stale), Settle::Ack)
                    .await
            }
        };
        (i, t, r)
    });
    let results = within(
        "24 records at once",
        CALL_TIMEOUT,
        futures::future::join_all(calls),
    )
    .await;
    for (i, t, r) in results {
        let stored = must("get", b.registry.get(&t.task_id))
            .await
            .expect("stored");
        match (i, r) {
            (0..=11, Ok(r)) => {
                assert_eq!(r.task.state.status, TaskStatus::Completed, "record {i}");
                assert_eq!(stored, r.task, "record {i}: returns the task as stored");
            }
            (12..=17, Ok(r)) => {
                assert_eq!(
                    (r.task.state.status, r.task.state.error.clone()),
                    (TaskStatus::Pending, Some(format!("again {i}"))),
                    "record {i}"
                );
                assert_eq!(stored, r.task, "record {i}: returns the task as stored");
            }
            (
                18..,
                Err(Error::Conflict {
                    actual_status,
                    actual_attempt,
                    ..
                }),
            ) => {
                assert_eq!((actual_status, actual_attempt), (TaskStatus::Running, 1));
                assert_eq!(&stored, t, "record {i}: a conflict changes nothing");
            }
            (i, other) => panic!("record {i}: unexpected {other:?}"),
        }
    }
    let counts = must("counts", b.registry.counts()).await;
    assert_eq!(
        (
            counts.get(TaskStatus::Completed),
            counts.get(TaskStatus::Pending),
            counts.get(TaskStatus::Running)
        ),
        (12, 6, 6),
        "the status indexes follow every record: {counts:?}"
    );
    // A retry given back at once is waiting, or still counted in flight where the broker
    // redelivers on its own schedule (JetStream); everything else is acked.
    let s = must("stats", b.bus.stats(&q)).await;
    assert_eq!(
        s.waiting + s.in_flight,
        6,
        "only the retries are left: {s:?}"
    );
    let mut ids: Vec<String> = Vec::new();
    while ids.len() < 6 {
        let back = fetch_and_claim(b, &q, 24, &spec("w2")).await;
        assert!(!back.is_empty(), "{} of 6 retries came back", ids.len());
        for (_, c) in back {
            let t = claimed(c);
            assert_eq!(t.state.attempt, 2, "{}", t.task_id);
            ids.push(t.task_id.to_string());
        }
    }
    ids.sort();
    let mut want: Vec<String> = (12..18).map(|i| running[i].1.task_id.to_string()).collect();
    want.sort();
    assert_eq!(ids, want, "exactly the retried tasks come back");
}
