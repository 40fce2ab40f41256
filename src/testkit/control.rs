//! Conformance of the operator's controls in the traits: the paused-queue flag and the queue
//! listing of the [`crate::Registry`], and the removal of dead letters and the
//! delayed count of the [`crate::Bus`]. The engine's use of them (workers that stop and
//! start claiming, requeue) is in [`engine_control`](super::engine_control).

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use crate::bundle::Backends;
use crate::bus::{Bus, Delivery, FetchOptions, OutgoingMessage};
use crate::model::{Limits, Priority, QueueName, Task, TaskState, TaskStatus};
use crate::testkit::{eventually, must};

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

fn task(q: &QueueName) -> Task {
    Task::new(
        q.clone(),
        json!({"n": 1}),
        Priority::DEFAULT,
        3,
        vec![],
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("building a test task: {e}"))
}

/// Fetches until `n` messages are in hand, within ten seconds.
async fn fetch_n(bus: &dyn Bus, q: &QueueName, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fetched only {} of {n} messages from {q}",
            got.len()
        );
        let options = FetchOptions {
            max: n - got.len(),
            wait: Duration::from_millis(500),
            lease: Duration::from_secs(30),
        };
        got.extend(must(format!("fetch from {q}"), bus.fetch(q, options)).await);
    }
    got
}

/// The paused flag is stored, reported as changed only when it changes, and listed until
/// cleared; other queues are not affected.
pub async fn paused_flag_is_stored_listed_and_cleared(b: &Backends) {
    let reg = b.registry.as_ref();
    let (a, other) = (queue("pause_a"), queue("pause_other"));
    let listed = must("paused_queues", reg.paused_queues()).await;
    assert!(
        listed.is_empty(),
        "a fresh namespace has paused queues: {listed:?}"
    );
    assert!(
        must("pause a", reg.set_queue_paused(&a, true)).await,
        "a first pause changes the flag"
    );
    assert!(
        !must("pause a again", reg.set_queue_paused(&a, true)).await,
        "a second pause changes nothing"
    );
    let listed = must("paused_queues", reg.paused_queues()).await;
    assert_eq!(
        listed.into_iter().collect::<Vec<_>>(),
        std::slice::from_ref(&a)
    );
    assert!(
        !must(
            "resume a queue never paused",
            reg.set_queue_paused(&other, false)
        )
        .await
    );
    assert!(must("pause other", reg.set_queue_paused(&other, true)).await);
    assert!(
        must("resume a", reg.set_queue_paused(&a, false)).await,
        "a resume of a paused queue changes the flag"
    );
    assert!(!must("resume a again", reg.set_queue_paused(&a, false)).await);
    let listed = must("paused_queues", reg.paused_queues()).await;
    assert_eq!(
        listed.into_iter().collect::<Vec<_>>(),
        std::slice::from_ref(&other)
    );
    assert!(must("resume other", reg.set_queue_paused(&other, false)).await);
    assert!(must("paused_queues", reg.paused_queues()).await.is_empty());
}

/// A queue's limits are stored, reported as changed only when they change, listed (also by
/// another connection) until cleared, and independent of the pause flag and of other queues.
pub async fn queue_limits_are_stored_listed_and_cleared(b: &Backends) {
    use crate::queue_limits::QueueLimits;
    let reg = b.registry.as_ref();
    let (a, other) = (queue("limit_a"), queue("limit_other"));
    let limits = |rate: Option<&str>, cap: Option<u32>| {
        QueueLimits::parse(rate, cap).unwrap_or_else(|e| panic!("limits: {e}"))
    };
    assert!(must("queue_limits", reg.queue_limits()).await.is_empty());
    assert!(
        !must(
            "clear limits never set",
            reg.set_queue_limits(&a, &QueueLimits::default())
        )
        .await
    );
    let first = limits(Some("10/s"), Some(2));
    assert!(must("limit a", reg.set_queue_limits(&a, &first)).await);
    assert!(!must("limit a again", reg.set_queue_limits(&a, &first)).await);
    let second = limits(Some("60/min"), None);
    assert!(must("limit other", reg.set_queue_limits(&other, &second)).await);
    let listed = must("queue_limits", reg.queue_limits()).await;
    assert_eq!(listed.get(&a), Some(&first), "{listed:?}");
    assert_eq!(listed.get(&other), Some(&second), "{listed:?}");
    assert!(
        must("paused_queues", reg.paused_queues()).await.is_empty(),
        "a limit paused its queue"
    );
    let changed = limits(None, Some(5));
    assert!(must("change a", reg.set_queue_limits(&a, &changed)).await);
    let elsewhere = crate::testkit::another_process(b).await;
    eventually(
        "another connection reads the limits",
        Duration::from_secs(30),
        || async {
            let seen = must("queue_limits", elsewhere.registry.queue_limits()).await;
            match (seen.get(&a), seen.get(&other)) {
                (Some(x), Some(y)) if *x == changed && *y == second => Ok(()),
                _ => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
    assert!(must("clear a", reg.set_queue_limits(&a, &QueueLimits::default())).await);
    assert!(
        !must(
            "clear a again",
            reg.set_queue_limits(&a, &QueueLimits::default())
        )
        .await
    );
    let listed = must("queue_limits", reg.queue_limits()).await;
    assert_eq!(listed.keys().collect::<Vec<_>>(), vec![&other]);
}

/// `queues` lists the queues that have tasks, sorted, and `queue_counts` counts a queue's tasks
/// by status, leaving other queues' out.
pub async fn queues_and_their_counts_follow_the_tasks(b: &Backends) {
    let reg = b.registry.as_ref();
    let (x, y) = (queue("counted_x"), queue("counted_y"));
    assert!(must("queues", reg.queues()).await.is_empty());
    for _ in 0..3 {
        must("create", reg.create(&task(&y))).await;
    }
    let t = task(&x);
    must("create", reg.create(&t)).await;
    let now = Utc::now();
    let cancelled = TaskState {
        status: TaskStatus::Cancelled,
        finished_at: Some(now),
        updated_at: now,
        ..t.state.clone()
    };
    must("cancel", reg.transition(&t.task_id, t.expect(), cancelled)).await;
    must("create", reg.create(&task(&x))).await;
    assert_eq!(must("queues", reg.queues()).await, [x.clone(), y.clone()]);
    let cx = must("queue_counts x", reg.queue_counts(&x)).await;
    assert_eq!(
        (
            cx.get(TaskStatus::Pending),
            cx.get(TaskStatus::Cancelled),
            cx.total()
        ),
        (1, 1, 2),
        "{cx}"
    );
    let cy = must("queue_counts y", reg.queue_counts(&y)).await;
    assert_eq!((cy.get(TaskStatus::Pending), cy.total()), (3, 3), "{cy}");
    let none = must(
        "queue_counts of a queue with no task",
        reg.queue_counts(&queue("counted_none")),
    )
    .await;
    assert_eq!(none.total(), 0);
}

/// `remove_dead_letters` deletes exactly the named dead letters, reports those it deleted (not
/// the unknown ones, nor one already gone), and leaves the others listed with their reason.
pub async fn removed_dead_letters_are_gone_and_the_others_stay(b: &Backends) {
    let bus = b.bus.as_ref();
    let q = queue("buried");
    for i in 0..3 {
        let m = OutgoingMessage::new(format!("{{\"n\":{i}}}").into_bytes(), Priority::DEFAULT);
        must("enqueue", bus.enqueue(&q, m)).await;
    }
    let got = fetch_n(bus, &q, 3).await;
    for d in &got {
        must(
            "dead_letter",
            bus.dead_letter(d, &format!("reason {}", d.message_id)),
        )
        .await;
    }
    let ids: Vec<String> = got.iter().map(|d| d.message_id.clone()).collect();
    // The newest goes first, at once: a count that lags the queue must not hide it, and the
    // gap it leaves must not hide the older ones from a listing.
    let removed = must(
        "remove one known and one unknown",
        bus.remove_dead_letters(&q, &[ids[2].clone(), "no-such-dead-letter".to_string()]),
    )
    .await;
    assert_eq!(removed, [ids[2].clone()]);
    let again = must(
        "remove it again",
        bus.remove_dead_letters(&q, &[ids[2].clone()]),
    )
    .await;
    assert!(
        again.is_empty(),
        "a dead letter was removed twice: {again:?}"
    );
    let left = must("dead_letters", bus.dead_letters(&q, 2)).await;
    let mut left_ids: Vec<&str> = left.iter().map(|l| l.message_id.as_str()).collect();
    left_ids.sort();
    let mut want: Vec<&str> = ids[..2].iter().map(|s| s.as_str()).collect();
    want.sort();
    assert_eq!(left_ids, want);
    for l in &left {
        assert_eq!(l.reason, format!("reason {}", l.message_id));
        assert!(l.delivery_count >= 1, "{l:?}");
    }
    // A quorum queue's counts (RabbitMQ) follow its log a moment later: wait for them.
    crate::testkit::eventually(
        "the dead count to be 2",
        Duration::from_secs(20),
        || async {
            match bus.stats(&q).await {
                Ok(st) if st.dead == 2 => Ok(()),
                Ok(st) => Err(format!("dead = {}", st.dead)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let removed = must("remove the rest", bus.remove_dead_letters(&q, &ids)).await;
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(must("dead_letters", bus.dead_letters(&q, 10))
        .await
        .is_empty());
    assert_eq!(must("stats", bus.stats(&q)).await.dead, 0);
}

/// A bus that reports its delayed messages counts them exactly (one that cannot tell says
/// `None`).
pub async fn delayed_count_is_exact_when_reported(b: &Backends) {
    let bus = b.bus.as_ref();
    let q = queue("delayed_count");
    let ready = OutgoingMessage::new(b"{}".to_vec(), Priority::DEFAULT);
    must("enqueue", bus.enqueue(&q, ready)).await;
    for _ in 0..2 {
        let later = OutgoingMessage::new(b"{}".to_vec(), Priority::DEFAULT)
            .delayed(Duration::from_secs(600));
        must("enqueue delayed", bus.enqueue(&q, later)).await;
    }
    if let Some(n) = must("delayed", bus.delayed(&q)).await {
        assert_eq!(n, 2, "delayed messages of {q}");
    }
}

/// Removing dead letters from a queue that never had any is no error and removes nothing.
pub async fn removing_from_a_queue_without_dead_letters_removes_nothing(b: &Backends) {
    let bus = b.bus.as_ref();
    let q = queue("never_buried");
    let m = OutgoingMessage::new(b"{}".to_vec(), Priority::DEFAULT);
    must("enqueue", bus.enqueue(&q, m)).await;
    let removed = must("remove", bus.remove_dead_letters(&q, &["1".to_string()])).await;
    assert!(removed.is_empty(), "{removed:?}");
    let stats = must("stats", bus.stats(&q)).await;
    assert_eq!((stats.waiting, stats.dead), (1, 0), "{stats:?}");
}
