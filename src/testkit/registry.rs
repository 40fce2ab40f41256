//! [`Registry`] conformance: storage round trips, compare-and-set transitions with
//! the attempt as fencing token, counts, the stale-lease query, listing, dependents and retention.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{json, Value};

use super::{describe_difference, join_all, json_of_size, must, within, CALL_TIMEOUT};
use crate::model::Limits;
use crate::{
    Backends, Error, Expected, Priority, QueueName, Registry, Retention, Task, TaskFilter, TaskId,
    TaskState, TaskStatus,
};

fn tid(id: &str) -> TaskId {
    TaskId::parse(id).unwrap_or_else(|e| panic!("test task id {id:?}: {e}"))
}

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

/// A PENDING task (WAITING when it has parents) with a descriptive id.
fn task(id: &str, queue_name: &str, depends_on: &[&str]) -> Task {
    let mut t = Task::new(
        queue(queue_name),
        json!({"name": id}),
        Priority::DEFAULT,
        3,
        depends_on.iter().map(|d| tid(d)).collect(),
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("building test task {id}: {e}"));
    t.task_id = tid(id);
    t
}

fn expect(status: TaskStatus, attempt: u32) -> Expected {
    Expected { status, attempt }
}

/// `prev` claimed (or taken over) by `worker` as `attempt`, leased until `lease_until`.
fn running(prev: &TaskState, worker: &str, attempt: u32, lease_until: DateTime<Utc>) -> TaskState {
    let now = Utc::now();
    TaskState {
        status: TaskStatus::Running,
        attempt,
        worker_id: Some(worker.to_string()),
        lease_until: Some(lease_until),
        heartbeat_at: Some(now),
        started_at: Some(now),
        updated_at: now,
        ..prev.clone()
    }
}

/// `prev` moved to a terminal (or other) status at `at`.
fn finished(prev: &TaskState, status: TaskStatus, at: DateTime<Utc>) -> TaskState {
    TaskState {
        status,
        result: (status == TaskStatus::Completed).then(|| json!({"ok": true})),
        error: (status == TaskStatus::Failed).then(|| "conformance test failure".to_string()),
        lease_until: None,
        finished_at: status.is_terminal().then_some(at),
        updated_at: at,
        ..prev.clone()
    }
}

async fn create(reg: &dyn Registry, t: &Task) {
    must(format!("create task {}", t.task_id), reg.create(t)).await;
}

async fn transition(reg: &dyn Registry, id: &TaskId, from: Expected, next: TaskState) -> Task {
    let what = format!(
        "transition of task {id} from {} attempt {} to {} attempt {}",
        from.status, from.attempt, next.status, next.attempt
    );
    must(what, reg.transition(id, from, next)).await
}

async fn get(reg: &dyn Registry, id: &TaskId) -> Task {
    must(format!("get task {id}"), reg.get(id))
        .await
        .unwrap_or_else(|| panic!("task {id} should exist but get returned None"))
}

/// Creates `t` and moves it to `status` through legal transitions (claimed as attempt 1 by
/// `worker-1` when it passes through RUNNING); finished statuses are stamped `at`.
async fn create_in(reg: &dyn Registry, mut t: Task, status: TaskStatus, at: DateTime<Utc>) -> Task {
    if status == TaskStatus::Waiting {
        assert!(
            !t.depends_on.is_empty(),
            "a WAITING test task needs parents"
        );
        create(reg, &t).await;
        return t;
    }
    t.depends_on.clear();
    t.state.status = TaskStatus::Pending;
    create(reg, &t).await;
    let id = t.task_id.clone();
    match status {
        TaskStatus::Pending => t,
        TaskStatus::Cancelled => {
            transition(
                reg,
                &id,
                t.expect(),
                finished(&t.state, TaskStatus::Cancelled, at),
            )
            .await
        }
        _ => {
            let lease = Utc::now() + chrono::Duration::seconds(300);
            let r = transition(
                reg,
                &id,
                t.expect(),
                running(&t.state, "worker-1", 1, lease),
            )
            .await;
            if status == TaskStatus::Running {
                r
            } else {
                transition(reg, &id, r.expect(), finished(&r.state, status, at)).await
            }
        }
    }
}

fn assert_same_task(want: &Task, got: &Task, context: &str) {
    let id = &want.task_id;
    assert_eq!(got.task_id, want.task_id, "{context}: task_id");
    assert_eq!(got.queue, want.queue, "{context}: queue of {id}");
    if got.payload != want.payload {
        let (w, g) = (want.payload.to_string(), got.payload.to_string());
        let diff = describe_difference(w.as_bytes(), g.as_bytes()).unwrap_or_default();
        panic!("{context}: payload of {id} changed: {diff}");
    }
    assert_eq!(got.priority, want.priority, "{context}: priority of {id}");
    assert_eq!(
        got.max_attempts, want.max_attempts,
        "{context}: max_attempts of {id}"
    );
    assert_eq!(
        got.depends_on, want.depends_on,
        "{context}: depends_on of {id}"
    );
    assert_eq!(
        got.created_at, want.created_at,
        "{context}: created_at of {id}"
    );
    assert_eq!(got.timeout, want.timeout, "{context}: timeout of {id}");
    assert_eq!(got.deadline, want.deadline, "{context}: deadline of {id}");
    assert_eq!(
        got.traceparent, want.traceparent,
        "{context}: traceparent of {id}"
    );
    let (w, g) = (&want.state, &got.state);
    assert_eq!(g.status, w.status, "{context}: status of {id}");
    assert_eq!(g.attempt, w.attempt, "{context}: attempt of {id}");
    assert_eq!(g.worker_id, w.worker_id, "{context}: worker_id of {id}");
    assert_eq!(g.result, w.result, "{context}: result of {id}");
    assert_eq!(g.error, w.error, "{context}: error of {id}");
    assert_eq!(
        g.lease_until, w.lease_until,
        "{context}: lease_until of {id}"
    );
    assert_eq!(
        g.heartbeat_at, w.heartbeat_at,
        "{context}: heartbeat_at of {id}"
    );
    assert_eq!(g.started_at, w.started_at, "{context}: started_at of {id}");
    assert_eq!(
        g.finished_at, w.finished_at,
        "{context}: finished_at of {id}"
    );
    assert_eq!(g.updated_at, w.updated_at, "{context}: updated_at of {id}");
}

/// Every field of a task survives create then get (timestamps at millisecond precision), for a
/// task with every optional field set and for one with none.
pub async fn create_then_get_round_trips_every_field(b: &Backends) {
    let reg = &*b.registry;
    let t0 = Utc::now().trunc_subsecs(3);
    let secs = chrono::Duration::seconds;
    let full = Task {
        task_id: tid("roundtrip_full"),
        queue: queue("roundtrip_queue"),
        payload: json!({
            "topic": "quantum computing — 量子",
            "nested": {"list": [1, 2.5, -7, null, false, {"deep": ["✓", {"deeper": {}}]}]},
            "quote": "she said \"hi\"\n\ttab\\slash",
        }),
        priority: Priority::new(3).unwrap_or_default(),
        max_attempts: 7,
        depends_on: vec![tid("roundtrip_parent_a"), tid("roundtrip_parent_b")],
        created_at: t0 - secs(60),
        timeout: Some(Duration::from_millis(90_250)),
        deadline: Some(t0 + secs(3600)),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string()),
        state: TaskState {
            status: TaskStatus::Waiting,
            attempt: 2,
            handed_back: 1,
            worker_id: Some("worker-ü-1".to_string()),
            result: Some(json!({"summary": "résumé 📄", "score": 0.75, "tags": ["a", "b"]})),
            error: Some("previous attempt: boom — 💥".to_string()),
            lease_until: Some(t0 + secs(30)),
            heartbeat_at: Some(t0 - secs(5)),
            started_at: Some(t0 - secs(10)),
            finished_at: Some(t0 - secs(1)),
            ready_at: Some(t0 + secs(45)),
            progress: Some(json!({"step": "résumé", "done": 2, "of": 5})),
            updated_at: t0,
        },
    };
    let mut minimal = task("roundtrip_minimal", "roundtrip_queue", &[]);
    minimal.payload = json!("a plain string payload");
    minimal.priority = Priority::LOWEST;
    minimal.max_attempts = 1;
    minimal.created_at = t0;
    minimal.state.updated_at = t0;
    for t in [&full, &minimal] {
        create(reg, t).await;
        let got = get(reg, &t.task_id).await;
        assert_same_task(t, &got, "create then get");
    }
}

/// Creating a task whose id exists fails with `TaskExists` and leaves the stored task unchanged.
pub async fn create_twice_fails_with_task_exists(b: &Backends) {
    let reg = &*b.registry;
    let original = task("created_twice", "dup_queue", &[]);
    create(reg, &original).await;
    let mut impostor = task("created_twice", "dup_queue", &[]);
    impostor.payload = json!({"impostor": true});
    match within("second create", CALL_TIMEOUT, reg.create(&impostor)).await {
        Err(Error::TaskExists(id)) => {
            assert_eq!(id, original.task_id, "TaskExists names another id")
        }
        other => {
            panic!("creating task created_twice twice should fail with TaskExists, got {other:?}")
        }
    }
    let stored = get(reg, &original.task_id).await;
    assert_eq!(
        stored.payload, original.payload,
        "a failed create overwrote the stored task"
    );
}

/// A transition succeeds only from the expected status and attempt, returns and stores the new
/// state, and otherwise fails with `Conflict` naming what it found.
pub async fn transition_is_a_compare_and_set(b: &Backends) {
    let reg = &*b.registry;
    let t = task("cas_task", "cas_queue", &[]);
    create(reg, &t).await;
    let lease = Utc::now() + chrono::Duration::seconds(60);
    let next = running(&t.state, "worker-a", 1, lease);
    let after = transition(
        reg,
        &t.task_id,
        expect(TaskStatus::Pending, 0),
        next.clone(),
    )
    .await;
    assert_eq!(
        after.state.status,
        TaskStatus::Running,
        "transition returned the wrong status"
    );
    assert_eq!(
        after.state.attempt, 1,
        "transition returned the wrong attempt"
    );
    assert_eq!(
        after.state.worker_id.as_deref(),
        Some("worker-a"),
        "transition returned the wrong worker"
    );
    let stored = get(reg, &t.task_id).await;
    assert_eq!(
        (
            stored.state.status,
            stored.state.attempt,
            stored.state.worker_id.as_deref()
        ),
        (TaskStatus::Running, 1, Some("worker-a")),
        "get after a successful transition"
    );
    assert_eq!(
        stored.payload, t.payload,
        "a transition changed the payload"
    );

    for (stale, label) in [
        (expect(TaskStatus::Pending, 0), "the old status and attempt"),
        (
            expect(TaskStatus::Running, 5),
            "the right status but another attempt",
        ),
    ] {
        let next = running(&t.state, "worker-b", stale.attempt + 1, lease);
        match within(
            "stale transition",
            CALL_TIMEOUT,
            reg.transition(&t.task_id, stale, next),
        )
        .await
        {
            Err(Error::Conflict {
                task_id,
                expected_status,
                expected_attempt,
                actual_status,
                actual_attempt,
            }) => {
                assert_eq!(task_id, t.task_id, "Conflict names another task");
                assert_eq!(
                    (expected_status, expected_attempt),
                    (stale.status, stale.attempt),
                    "Conflict must echo what the caller expected"
                );
                assert_eq!(
                    (actual_status, actual_attempt),
                    (TaskStatus::Running, 1),
                    "Conflict must report the state actually found"
                );
            }
            other => {
                panic!("a transition expecting {label} should fail with Conflict, got {other:?}")
            }
        }
    }
    let stored = get(reg, &t.task_id).await;
    assert_eq!(
        stored.state.worker_id.as_deref(),
        Some("worker-a"),
        "a failed transition changed the task"
    );
}

/// A transition the task model forbids fails with `IllegalTransition` and changes nothing.
pub async fn illegal_transition_is_rejected(b: &Backends) {
    let reg = &*b.registry;
    let t = task("illegal_moves", "illegal_queue", &[]);
    create(reg, &t).await;
    let done = finished(&t.state, TaskStatus::Completed, Utc::now());
    match within(
        "PENDING -> COMPLETED",
        CALL_TIMEOUT,
        reg.transition(&t.task_id, t.expect(), done),
    )
    .await
    {
        Err(Error::IllegalTransition { task_id, from, to }) => {
            assert_eq!(
                (task_id, from, to),
                (
                    t.task_id.clone(),
                    TaskStatus::Pending,
                    TaskStatus::Completed
                ),
                "IllegalTransition fields"
            );
        }
        other => panic!("PENDING -> COMPLETED should fail with IllegalTransition, got {other:?}"),
    }
    let stored = get(reg, &t.task_id).await;
    assert_eq!(
        (stored.state.status, stored.state.attempt),
        (TaskStatus::Pending, 0),
        "an illegal transition changed the task"
    );

    let completed = create_in(
        reg,
        task("illegal_after_done", "illegal_queue", &[]),
        TaskStatus::Completed,
        Utc::now(),
    )
    .await;
    let again = running(&completed.state, "worker-z", 2, Utc::now());
    match within(
        "COMPLETED -> RUNNING",
        CALL_TIMEOUT,
        reg.transition(&completed.task_id, completed.expect(), again),
    )
    .await
    {
        Err(Error::IllegalTransition { from, to, .. }) => {
            assert_eq!(
                (from, to),
                (TaskStatus::Completed, TaskStatus::Running),
                "IllegalTransition fields"
            );
        }
        other => panic!("COMPLETED -> RUNNING should fail with IllegalTransition, got {other:?}"),
    }
    let stored = get(reg, &completed.task_id).await;
    assert_eq!(
        stored.state.status,
        TaskStatus::Completed,
        "an illegal transition changed a finished task"
    );
}

/// Fifty workers claim one PENDING task at the same moment: exactly one wins, the 49 others get
/// `Conflict` reporting the winner's RUNNING attempt 1, and the stored worker is the winner.
pub async fn only_one_of_fifty_concurrent_claimers_wins(b: &Backends) {
    const CLAIMERS: usize = 50;
    let t = task("claim_race", "claim_queue", &[]);
    create(&*b.registry, &t).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    let lease = Utc::now() + chrono::Duration::seconds(60);
    let mut handles = Vec::new();
    for i in 0..CLAIMERS {
        let (reg, barrier, t) = (b.registry.clone(), barrier.clone(), t.clone());
        handles.push(tokio::spawn(async move {
            let worker = format!("claimer-{i:02}");
            let next = running(&t.state, &worker, 1, lease);
            barrier.wait().await;
            let outcome = within(
                format!("{worker}'s claim"),
                CALL_TIMEOUT,
                reg.transition(&t.task_id, expect(TaskStatus::Pending, 0), next),
            )
            .await;
            (worker, outcome)
        }));
    }
    let outcomes = within(
        "50 concurrent claims",
        CALL_TIMEOUT * 3,
        join_all("claimer", handles),
    )
    .await;
    let mut winners = Vec::new();
    let mut conflicts = 0;
    let mut others = Vec::new();
    for (worker, outcome) in outcomes {
        match outcome {
            Ok(task) => {
                assert_eq!(
                    task.state.worker_id.as_deref(),
                    Some(worker.as_str()),
                    "the winner's returned task"
                );
                winners.push(worker);
            }
            Err(Error::Conflict {
                actual_status,
                actual_attempt,
                ..
            }) => {
                assert_eq!(
                    (actual_status, actual_attempt),
                    (TaskStatus::Running, 1),
                    "{worker} lost, so it must have found the winner's claim"
                );
                conflicts += 1;
            }
            Err(e) => others.push(format!("{worker}: {e}")),
        }
    }
    assert!(
        others.is_empty(),
        "claims failed with errors other than Conflict: {others:?}"
    );
    assert_eq!(
        winners.len(),
        1,
        "exactly one claim must win, winners: {winners:?}"
    );
    assert_eq!(
        conflicts,
        CLAIMERS - 1,
        "every other claim must fail with Conflict"
    );
    let stored = get(&*b.registry, &t.task_id).await;
    assert_eq!(
        (
            stored.state.status,
            stored.state.attempt,
            stored.state.worker_id.clone()
        ),
        (TaskStatus::Running, 1, Some(winners[0].clone())),
        "the stored task must be the winner's claim"
    );
}

/// A worker whose attempt was taken over (its lease was lost) cannot complete the task: its
/// RUNNING attempt-1 → COMPLETED fails with `Conflict`, the task stays with attempt 2, which can
/// complete.
pub async fn stale_attempt_cannot_complete_after_a_takeover(b: &Backends) {
    let reg = &*b.registry;
    let t = task("taken_over", "takeover_queue", &[]);
    create(reg, &t).await;
    let past = Utc::now() - chrono::Duration::seconds(5);
    let first = transition(
        reg,
        &t.task_id,
        t.expect(),
        running(&t.state, "worker-slow", 1, past),
    )
    .await;
    let lease = Utc::now() + chrono::Duration::seconds(60);
    let second = transition(
        reg,
        &t.task_id,
        first.expect(),
        running(&first.state, "worker-rescuer", 2, lease),
    )
    .await;
    assert_eq!(second.state.attempt, 2);
    let late = finished(&first.state, TaskStatus::Completed, Utc::now());
    match within(
        "the stale attempt's completion",
        CALL_TIMEOUT,
        reg.transition(&t.task_id, first.expect(), late),
    )
    .await
    {
        Err(Error::Conflict {
            actual_status,
            actual_attempt,
            ..
        }) => assert_eq!(
            (actual_status, actual_attempt),
            (TaskStatus::Running, 2),
            "Conflict must report the attempt that replaced the stale one"
        ),
        other => panic!(
            "attempt 1 completing after attempt 2 took over must fail with Conflict, got {other:?}"
        ),
    }
    let stored = get(reg, &t.task_id).await;
    assert_eq!(
        (
            stored.state.status,
            stored.state.attempt,
            stored.state.worker_id.as_deref()
        ),
        (TaskStatus::Running, 2, Some("worker-rescuer")),
        "the stale completion changed the task"
    );
    let done = transition(
        reg,
        &t.task_id,
        second.expect(),
        finished(&second.state, TaskStatus::Completed, Utc::now()),
    )
    .await;
    assert_eq!(done.state.status, TaskStatus::Completed);
}

/// `counts` reports the number of tasks in each status after a mix of creations and transitions.
pub async fn counts_reflect_each_status(b: &Backends) {
    let reg = &*b.registry;
    let empty = must("counts of an empty registry", reg.counts()).await;
    assert_eq!(
        empty.total(),
        0,
        "a fresh registry (prefix) must count no tasks: {empty}"
    );
    let plan = [
        (TaskStatus::Waiting, 2),
        (TaskStatus::Pending, 3),
        (TaskStatus::Running, 2),
        (TaskStatus::Completed, 4),
        (TaskStatus::Failed, 1),
        (TaskStatus::Cancelled, 1),
    ];
    for (status, n) in plan {
        for i in 0..n {
            let id = format!("count_{}_{i}", status.as_str().to_ascii_lowercase());
            let t = task(&id, "count_queue", &["count_parent"]);
            create_in(reg, t, status, Utc::now()).await;
        }
    }
    let counts = must("counts", reg.counts()).await;
    for (status, n) in plan {
        assert_eq!(
            counts.get(status),
            n,
            "count of {status} (all counts: {counts})"
        );
    }
    assert_eq!(counts.total(), 13, "total count ({counts})");
}

/// `stale_running` returns exactly the RUNNING tasks whose lease ended before the cutoff, oldest
/// lease first, at most `limit`: not renewed, finished or pending ones.
pub async fn stale_running_returns_expired_leases_oldest_first(b: &Backends) {
    let reg = &*b.registry;
    let now = Utc::now();
    let ago = |s: i64| now - chrono::Duration::seconds(s);
    // Created in an order that differs from the lease order.
    for (id, lease_end) in [
        ("stale_30s_ago", ago(30)),
        ("stale_50s_ago", ago(50)),
        ("fresh_in_60s", ago(-60)),
        ("stale_40s_ago", ago(40)),
        ("fresh_in_120s", ago(-120)),
    ] {
        let t = task(id, "stale_queue", &[]);
        create(reg, &t).await;
        transition(
            reg,
            &t.task_id,
            t.expect(),
            running(&t.state, "worker-stale", 1, lease_end),
        )
        .await;
    }
    // Expired once, then renewed by a heartbeat: no longer stale.
    let renewed = task("renewed_lease", "stale_queue", &[]);
    create(reg, &renewed).await;
    let r = transition(
        reg,
        &renewed.task_id,
        renewed.expect(),
        running(&renewed.state, "w", 1, ago(45)),
    )
    .await;
    transition(
        reg,
        &renewed.task_id,
        r.expect(),
        running(&r.state, "w", 1, ago(-60)),
    )
    .await;
    // Expired, then finished: not RUNNING any more.
    let done = task("finished_after_expiry", "stale_queue", &[]);
    create(reg, &done).await;
    let r = transition(
        reg,
        &done.task_id,
        done.expect(),
        running(&done.state, "w", 1, ago(55)),
    )
    .await;
    transition(
        reg,
        &done.task_id,
        r.expect(),
        finished(&r.state, TaskStatus::Completed, now),
    )
    .await;
    // Pending: never leased.
    create(reg, &task("still_pending", "stale_queue", &[])).await;

    let ids = |tasks: Vec<Task>| {
        tasks
            .into_iter()
            .map(|t| t.task_id.to_string())
            .collect::<Vec<_>>()
    };
    let all = ids(must("stale_running(now, 100)", reg.stale_running(now, 100)).await);
    assert_eq!(
        all,
        ["stale_50s_ago", "stale_40s_ago", "stale_30s_ago"],
        "stale_running(now) must be exactly the expired RUNNING tasks, oldest lease first"
    );
    let limited = ids(must("stale_running(now, 2)", reg.stale_running(now, 2)).await);
    assert_eq!(
        limited,
        ["stale_50s_ago", "stale_40s_ago"],
        "stale_running must respect its limit"
    );
    let earlier = ids(must(
        "stale_running(now - 35 s, 100)",
        reg.stale_running(ago(35), 100),
    )
    .await);
    assert_eq!(
        earlier,
        ["stale_50s_ago", "stale_40s_ago"],
        "stale_running must only return leases that ended before the cutoff"
    );
}

/// Follows `next_cursor` to the end; checks pages, duplicates and the filter on the way.
async fn list_all(reg: &dyn Registry, filter: &TaskFilter, limit: usize) -> Vec<Task> {
    let mut out: Vec<Task> = Vec::new();
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    for page_no in 0.. {
        assert!(
            page_no < 200,
            "list({filter:?}, limit {limit}) never reached its end"
        );
        let page = must(
            format!("list({filter:?}, page {page_no}, limit {limit})"),
            reg.list(filter, cursor.as_deref(), limit),
        )
        .await;
        assert!(
            page.tasks.len() <= limit,
            "list page {page_no} has {} tasks, more than the limit {limit}",
            page.tasks.len()
        );
        for t in page.tasks {
            assert!(
                seen.insert(t.task_id.clone()),
                "list({filter:?}) returned task {} twice (page {page_no})",
                t.task_id
            );
            if let Some(status) = filter.status {
                assert_eq!(
                    t.status(),
                    status,
                    "list({filter:?}) returned a task in another status"
                );
            }
            if let Some(q) = &filter.queue {
                assert_eq!(
                    &t.queue, q,
                    "list({filter:?}) returned a task of another queue"
                );
            }
            out.push(t);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    out
}

/// `list` by status and queue, in small pages, returns every matching task exactly once (oldest
/// status change first when filtered by status), and nothing else.
pub async fn list_paginates_by_status_and_queue(b: &Backends) {
    let reg = &*b.registry;
    let mut pending_alpha = BTreeSet::new();
    let mut pending_beta = BTreeSet::new();
    let mut running_alpha = BTreeSet::new();
    for i in 0..23 {
        let t = task(&format!("list_alpha_pending_{i:02}"), "list_alpha", &[]);
        create(reg, &t).await;
        pending_alpha.insert(t.task_id);
    }
    for i in 0..7 {
        let t = task(&format!("list_beta_pending_{i:02}"), "list_beta", &[]);
        create(reg, &t).await;
        pending_beta.insert(t.task_id);
    }
    for i in 0..4 {
        let t = create_in(
            reg,
            task(&format!("list_alpha_running_{i}"), "list_alpha", &[]),
            TaskStatus::Running,
            Utc::now(),
        )
        .await;
        running_alpha.insert(t.task_id);
    }
    // RUNNING without a lease end (made so by create, not by a claim): they sort first.
    let mut running_gamma = BTreeSet::new();
    for i in 0..3 {
        let mut t = task(&format!("list_gamma_unleased_{i}"), "list_gamma", &[]);
        t.state.status = TaskStatus::Running;
        t.state.attempt = 1;
        t.state.worker_id = Some("w".into());
        create(reg, &t).await;
        running_gamma.insert(t.task_id);
    }
    let union = |sets: &[&BTreeSet<TaskId>]| -> BTreeSet<TaskId> {
        sets.iter().flat_map(|s| s.iter().cloned()).collect()
    };
    let cases = [
        (
            Some(TaskStatus::Pending),
            Some("list_alpha"),
            5,
            pending_alpha.clone(),
        ),
        (
            Some(TaskStatus::Pending),
            None,
            4,
            union(&[&pending_alpha, &pending_beta]),
        ),
        (
            Some(TaskStatus::Running),
            Some("list_alpha"),
            3,
            running_alpha.clone(),
        ),
        (
            None,
            Some("list_alpha"),
            6,
            union(&[&pending_alpha, &running_alpha]),
        ),
        (
            None,
            None,
            7,
            union(&[
                &pending_alpha,
                &pending_beta,
                &running_alpha,
                &running_gamma,
            ]),
        ),
        (
            Some(TaskStatus::Running),
            Some("list_beta"),
            5,
            BTreeSet::new(),
        ),
        (
            Some(TaskStatus::Running),
            Some("list_gamma"),
            1,
            running_gamma.clone(),
        ),
        (Some(TaskStatus::Completed), None, 5, BTreeSet::new()),
    ];
    for (status, q, limit, want) in cases {
        let filter = TaskFilter {
            status,
            queue: q.map(queue),
        };
        let got = list_all(reg, &filter, limit).await;
        if status.is_some() {
            for pair in got.windows(2) {
                assert!(
                    pair[0].state.updated_at <= pair[1].state.updated_at,
                    "list({filter:?}) must return the oldest status change first: {} ({}) came before {} ({})",
                    pair[0].task_id,
                    pair[0].state.updated_at,
                    pair[1].task_id,
                    pair[1].state.updated_at
                );
            }
        }
        let got: BTreeSet<TaskId> = got.into_iter().map(|t| t.task_id).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "list({filter:?}, limit {limit}): missing {missing:?}, unexpected {extra:?}"
        );
    }
}

/// `dependents` returns the tasks created with a parent in their `depends_on`, and nothing for a
/// task without children or an unknown id.
pub async fn dependents_lists_the_children_of_a_parent(b: &Backends) {
    let reg = &*b.registry;
    create(reg, &task("dep_parent", "dep_queue", &[])).await;
    create(reg, &task("dep_other_parent", "dep_queue", &[])).await;
    create(reg, &task("dep_child_a", "dep_queue", &["dep_parent"])).await;
    create(reg, &task("dep_child_b", "dep_queue", &["dep_parent"])).await;
    create(
        reg,
        &task(
            "dep_child_both",
            "dep_queue",
            &["dep_parent", "dep_other_parent"],
        ),
    )
    .await;
    create(reg, &task("dep_unrelated", "dep_queue", &[])).await;
    let children = |id: &'static str| async move {
        let got = must(format!("dependents({id})"), reg.dependents(&tid(id))).await;
        let set: BTreeSet<String> = got.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            set.len(),
            got.len(),
            "dependents({id}) returned duplicates: {got:?}"
        );
        set
    };
    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        children("dep_parent").await,
        set(&["dep_child_a", "dep_child_b", "dep_child_both"]),
        "dependents of dep_parent"
    );
    assert_eq!(
        children("dep_other_parent").await,
        set(&["dep_child_both"]),
        "dependents of dep_other_parent"
    );
    assert_eq!(
        children("dep_unrelated").await,
        set(&[]),
        "dependents of a task without children"
    );
    assert_eq!(
        children("dep_never_created").await,
        set(&[]),
        "dependents of an unknown id"
    );
}

/// `purge_finished` with `max_count` keeps the most recently finished tasks of each finished
/// status and deletes the older ones; PENDING and RUNNING tasks are left alone.
pub async fn purge_finished_by_count_keeps_the_most_recent(b: &Backends) {
    let reg = &*b.registry;
    let base = Utc::now() - chrono::Duration::minutes(10);
    let at = |i: i64| base + chrono::Duration::seconds(i);
    for i in 0..5 {
        create_in(
            reg,
            task(&format!("purge_count_completed_{i}"), "purge_queue", &[]),
            TaskStatus::Completed,
            at(i),
        )
        .await;
    }
    for i in 0..3 {
        create_in(
            reg,
            task(&format!("purge_count_failed_{i}"), "purge_queue", &[]),
            TaskStatus::Failed,
            at(10 + i),
        )
        .await;
    }
    create_in(
        reg,
        task("purge_count_pending", "purge_queue", &[]),
        TaskStatus::Pending,
        base,
    )
    .await;
    create_in(
        reg,
        task("purge_count_running", "purge_queue", &[]),
        TaskStatus::Running,
        base,
    )
    .await;
    let deleted = must(
        "purge_finished(max_count = 2)",
        reg.purge_finished(&Retention {
            max_age: None,
            max_count: Some(2),
        }),
    )
    .await;
    assert_eq!(
        deleted, 4,
        "3 of 5 COMPLETED and 1 of 3 FAILED should have been deleted"
    );
    for (id, kept) in [
        ("purge_count_completed_0", false),
        ("purge_count_completed_1", false),
        ("purge_count_completed_2", false),
        ("purge_count_completed_3", true),
        ("purge_count_completed_4", true),
        ("purge_count_failed_0", false),
        ("purge_count_failed_1", true),
        ("purge_count_failed_2", true),
        ("purge_count_pending", true),
        ("purge_count_running", true),
    ] {
        let found = must(format!("get {id}"), reg.get(&tid(id))).await;
        assert_eq!(
            found.is_some(),
            kept,
            "after purging to 2 per status, {id} should be {}",
            if kept { "kept" } else { "deleted" }
        );
    }
    let counts = must("counts", reg.counts()).await;
    assert_eq!(
        [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Completed,
            TaskStatus::Failed
        ]
        .map(|s| counts.get(s)),
        [1, 1, 2, 2],
        "counts after the purge ({counts})"
    );
}

/// `purge_finished` with `max_age` deletes the tasks that finished longer ago than that, and
/// leaves recently finished and unfinished tasks (however old) alone.
pub async fn purge_finished_by_age_leaves_unfinished_tasks_alone(b: &Backends) {
    let reg = &*b.registry;
    let now = Utc::now();
    let two_hours_ago = now - chrono::Duration::hours(2);
    for (id, status, at) in [
        (
            "purge_age_completed_old_a",
            TaskStatus::Completed,
            two_hours_ago,
        ),
        (
            "purge_age_completed_old_b",
            TaskStatus::Completed,
            two_hours_ago,
        ),
        ("purge_age_failed_old", TaskStatus::Failed, two_hours_ago),
        (
            "purge_age_cancelled_old",
            TaskStatus::Cancelled,
            two_hours_ago,
        ),
        ("purge_age_completed_new_a", TaskStatus::Completed, now),
        ("purge_age_completed_new_b", TaskStatus::Completed, now),
    ] {
        create_in(reg, task(id, "purge_queue", &[]), status, at).await;
    }
    let mut old_pending = task("purge_age_pending_old", "purge_queue", &[]);
    old_pending.created_at = two_hours_ago;
    old_pending.state.updated_at = two_hours_ago;
    create(reg, &old_pending).await;
    let mut old_running = task("purge_age_running_old", "purge_queue", &[]);
    old_running.created_at = two_hours_ago;
    old_running.state.updated_at = two_hours_ago;
    create(reg, &old_running).await;
    let mut claim = running(&old_running.state, "worker-old", 1, two_hours_ago);
    claim.updated_at = two_hours_ago;
    claim.started_at = Some(two_hours_ago);
    transition(reg, &old_running.task_id, old_running.expect(), claim).await;

    let deleted = must(
        "purge_finished(max_age = 1 h)",
        reg.purge_finished(&Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_count: None,
        }),
    )
    .await;
    assert_eq!(
        deleted, 4,
        "the 4 tasks finished 2 h ago should have been deleted"
    );
    for (id, kept) in [
        ("purge_age_completed_old_a", false),
        ("purge_age_completed_old_b", false),
        ("purge_age_failed_old", false),
        ("purge_age_cancelled_old", false),
        ("purge_age_completed_new_a", true),
        ("purge_age_completed_new_b", true),
        ("purge_age_pending_old", true),
        ("purge_age_running_old", true),
    ] {
        let found = must(format!("get {id}"), reg.get(&tid(id))).await;
        assert_eq!(
            found.is_some(),
            kept,
            "after purging by age, {id} should be {}",
            if kept { "kept" } else { "deleted" }
        );
    }
    let counts = must("counts", reg.counts()).await;
    assert_eq!(
        TaskStatus::ALL.map(|s| counts.get(s)),
        [0, 1, 1, 2, 0, 0],
        "counts after the purge ({counts})"
    );
}

/// An id that was never created: `get` returns `None`, `transition` fails with `TaskNotFound`.
pub async fn unknown_task_is_not_found(b: &Backends) {
    let reg = &*b.registry;
    let id = tid("never_created_task");
    let got = must("get of an unknown id", reg.get(&id)).await;
    assert!(got.is_none(), "get of an unknown id returned {got:?}");
    let ghost = task("never_created_task", "ghost_queue", &[]);
    let next = running(&ghost.state, "worker-ghost", 1, Utc::now());
    match within(
        "transition of an unknown id",
        CALL_TIMEOUT,
        reg.transition(&id, ghost.expect(), next),
    )
    .await
    {
        Err(Error::TaskNotFound(missing)) => {
            assert_eq!(missing, id, "TaskNotFound names another id")
        }
        other => {
            panic!("transition of an unknown task should fail with TaskNotFound, got {other:?}")
        }
    }
    let after = must("get after the failed transition", reg.get(&id)).await;
    assert!(
        after.is_none(),
        "a failed transition created the task: {after:?}"
    );
}

/// Task payloads and results survive the registry unchanged: unicode, nested JSON, and a 1 MiB
/// payload.
pub async fn task_payload_round_trips_through_the_registry(b: &Backends) {
    let reg = &*b.registry;
    let big = String::from_utf8(json_of_size(1024 * 1024)).unwrap_or_default();
    let big: Value = serde_json::from_str(&big).unwrap_or(Value::Null);
    let payloads = [
        (
            "payload_unicode",
            json!("héllo wörld — 你好 — Привет — 🎻🚀 \u{0}\u{1f} \"quotes\" \\"),
        ),
        (
            "payload_nested",
            json!({"a": {"b": {"c": [1, [2, [3, {"d": "✓"}]]], "e": null}}, "f": -1.5e-7, "g": u64::MAX}),
        ),
        ("payload_one_mib", big),
    ];
    for (id, payload) in payloads {
        let mut t = Task::new(
            queue("payload_queue"),
            payload.clone(),
            Priority::DEFAULT,
            3,
            vec![],
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("building task {id}: {e}"));
        t.task_id = tid(id);
        create(reg, &t).await;
        let got = get(reg, &t.task_id).await;
        if got.payload != payload {
            let (w, g) = (payload.to_string(), got.payload.to_string());
            panic!(
                "the payload of {id} changed in the registry: {}",
                describe_difference(w.as_bytes(), g.as_bytes()).unwrap_or_default()
            );
        }
        // The result travels the same way on completion.
        let claimed = transition(
            reg,
            &t.task_id,
            t.expect(),
            running(&t.state, "worker-p", 1, Utc::now()),
        )
        .await;
        let mut done = finished(&claimed.state, TaskStatus::Completed, Utc::now());
        done.result = Some(payload.clone());
        transition(reg, &t.task_id, claimed.expect(), done).await;
        let got = get(reg, &t.task_id).await;
        if got.state.result.as_ref() != Some(&payload) {
            panic!("the result of {id} changed in the registry");
        }
    }
}
