//! What a hostile audit of the Redis backend found (issue 15, point 4), each kept fixed here: a
//! message the claim script and Rust would read differently, a task hash edited by hand, and a
//! dead-letter limit too large for Lua's numbers.
//!
//! The shared server comes from `ORCHESTRA_TEST_REDIS_URL`, else testcontainers, else
//! 127.0.0.1:6379 (see `agent_orchestra::testkit::harness`). Every test works under its own key
//! prefix and drops it with `connect::drop_namespace` (never FLUSHALL).
//!
//! Run: `cargo test --features redis,testkit --test redis_hardening`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use agent_orchestra::bus::{Delivery, FetchOptions, OutgoingMessage};
use agent_orchestra::task_queue::{Claim, ClaimSpec};
use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, BackendUrls, Backends, ConnectOptions, Error, Limits, Priority, QueueName, Task,
    TaskId, TaskStatus,
};
use serde_json::json;

const QUEUE: &str = "hardening";

fn queue() -> QueueName {
    QueueName::parse(QUEUE).expect("valid queue name")
}

fn options(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    }
}

/// Runs `test` with backends on the shared server under a fresh prefix, then drops the prefix.
fn on_redis<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Backends, String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix(name);
    let for_test = prefix.clone();
    agent_orchestra::testkit::run_suite_test(
        name,
        async move {
            let url = broker_url(BrokerKind::Redis).await;
            let b = connect(&BackendUrls::all(&url), &options(&for_test))
                .await
                .unwrap_or_else(|e| panic!("connect to the test Redis: {e}"));
            test(b, url, for_test).await;
        },
        async move {
            let url = broker_url(BrokerKind::Redis).await;
            connect::drop_namespace(&BackendUrls::all(&url), &options(&prefix), &[queue()])
                .await
                .expect("drop the test namespace");
        },
    );
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("test Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to the test Redis")
}

fn new_task() -> Task {
    Task::new(
        queue(),
        json!({"q": "what"}),
        Priority::default(),
        3,
        vec![],
        &Limits::default(),
    )
    .expect("valid task")
}

fn spec() -> ClaimSpec {
    ClaimSpec {
        worker_id: "w-hardening".into(),
        lease: Duration::from_secs(60),
    }
}

/// One fetch-and-claim of one message of the queue.
async fn fetch_claim_one(b: &Backends) -> (Delivery, Option<Claim>) {
    let options = FetchOptions {
        max: 1,
        wait: Duration::from_secs(5),
        lease: Duration::from_secs(60),
    };
    b.tasks()
        .fetch_claim(&queue(), options, &spec())
        .await
        .expect("fetch_claim")
        .pop()
        .expect("one delivery")
}

/// Puts a raw message body on the queue, ahead of the tasks' own (priority 1).
async fn enqueue_raw(b: &Backends, body: &str) {
    b.bus
        .enqueue(
            &queue(),
            OutgoingMessage::new(body.as_bytes().to_vec(), Priority::HIGHEST),
        )
        .await
        .expect("enqueue a raw message");
}

async fn status_of(b: &Backends, id: &TaskId) -> (TaskStatus, u32) {
    let t = b.registry.get(id).await.expect("get").expect("stored");
    (t.state.status, t.state.attempt)
}

/// A task hash as stored (bytes: a test edits one into text that is not UTF-8).
async fn hash_of(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> HashMap<Vec<u8>, Vec<u8>> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(con)
        .await
        .expect("HGETALL")
}

/// `{"task_id":"x","task_id":"<real id>"}`: cjson in the claim script read the last key and
/// claimed the real task, serde_json refused the duplicate, so the message was dead-lettered,
/// the task left RUNNING and its own message then dropped as a duplicate. Now the script reads
/// only the canonical forms and hands anything else to Rust untouched: the message is
/// dead-lettered before any task is touched, and the task's own message claims it.
#[test]
fn a_message_with_a_duplicated_task_id_is_dead_lettered_before_it_touches_the_task() {
    on_redis("dup_task_id", |b, _url, _prefix| async move {
        let task = new_task();
        b.tasks()
            .submit(std::slice::from_ref(&task))
            .await
            .expect("submit")
            .pop()
            .expect("one result")
            .expect("created");
        let id = task.task_id.as_str();
        for body in [
            format!(r#"{{"task_id":"x","task_id":"{id}"}}"#),
            format!(r#"{{"task_id": "x", "task_id": "{id}"}}"#),
            // Escaped key: cjson and serde_json both read it, but the script must not.
            format!(r#"{{"task_id":"x","\u0074ask_id":"{id}"}}"#),
        ] {
            enqueue_raw(&b, &body).await;
            let (d, claim) = fetch_claim_one(&b).await;
            assert_eq!(d.payload, body.as_bytes());
            match claim {
                Some(Claim::Malformed(why)) => assert!(why.contains("duplicate"), "{why}"),
                other => panic!("{body}: expected a malformed claim, got {other:?}"),
            }
            assert_eq!(
                status_of(&b, &task.task_id).await,
                (TaskStatus::Pending, 0),
                "{body} touched the task"
            );
            b.bus.dead_letter(&d, "test").await.expect("dead-letter");
        }
        // The task's own message claims it.
        let (_, claim) = fetch_claim_one(&b).await;
        match claim {
            Some(Claim::Claimed(t)) => assert_eq!((t.task_id, t.state.attempt), (task.task_id, 1)),
            other => panic!("expected the task's own message to claim it, got {other:?}"),
        }
    });
}

/// The lab's form with spaces is claimed by the script; a message serde_json reads but the
/// script does not (an extra field) is left to the generic claim, which claims it.
#[test]
fn messages_in_other_forms_are_claimed_by_whichever_side_reads_them() {
    on_redis("message_forms", |b, _url, _prefix| async move {
        let tasks = [new_task(), new_task()];
        for t in &tasks {
            b.registry.create(t).await.expect("create");
        }
        enqueue_raw(&b, &format!("{{\"task_id\": \"{}\"}}\n", tasks[0].task_id)).await;
        let (_, claim) = fetch_claim_one(&b).await;
        assert!(
            matches!(&claim, Some(Claim::Claimed(t)) if t.task_id == tasks[0].task_id),
            "{claim:?}"
        );
        enqueue_raw(
            &b,
            &format!(r#"{{"task_id":"{}","from":"lab"}}"#, tasks[1].task_id),
        )
        .await;
        let (d, claim) = fetch_claim_one(&b).await;
        assert!(claim.is_none(), "left to the generic claim: {claim:?}");
        assert_eq!(
            status_of(&b, &tasks[1].task_id).await,
            (TaskStatus::Pending, 0)
        );
        match b.tasks().claim(&d, &spec()).await.expect("claim") {
            Claim::Claimed(t) => assert_eq!(t.task_id, tasks[1].task_id),
            other => panic!("expected a claim, got {other:?}"),
        }
    });
}

/// A task hash edited by hand into something Rust cannot decode: its message is dead-lettered
/// (the claim is malformed, naming the field) at once, and the hash is left exactly as it was.
/// Before, the script set such a task RUNNING, or Rust failed on it, and the message came back
/// at every lease.
#[test]
fn a_task_hash_corrupted_by_hand_is_dead_lettered_at_once_and_left_as_it_is() {
    on_redis("corrupt_hash", |b, url, prefix| async move {
        let mut con = raw(&url).await;
        // (field, Some(value) to set or None to delete)
        let cases: &[(&str, Option<&str>)] = &[
            ("attempt", Some("not a number")),
            ("attempt", Some("4294967296")),
            ("max_attempts", Some("-1")),
            ("handed_back", Some("1.5")),
            ("priority", Some("11")),
            ("status", Some("BOGUS")),
            ("status", None),
            ("payload", Some("{not json")),
            ("payload", None),
            ("created_at", None),
            ("created_at", Some("yesterday")),
            ("lease_until", Some("2026-02-30T00:00:00+00:00")),
            ("updated_at", Some("2026-01-01T25:00:00")),
            ("queue", Some("no spaces allowed")),
            ("task_id", Some("someone_else")),
            ("depends_on", Some("{}")),
            ("depends_on", Some("[\"ok\", \"not ok\"]")),
        ];
        for &(field, value) in cases {
            let task = new_task();
            b.tasks()
                .submit(std::slice::from_ref(&task))
                .await
                .expect("submit");
            let key = format!("{prefix}task_registry:{}", task.task_id);
            let edit = match value {
                Some(v) => {
                    let mut c = redis::cmd("HSET");
                    c.arg(&key).arg(field).arg(v);
                    c
                }
                None => {
                    let mut c = redis::cmd("HDEL");
                    c.arg(&key).arg(field);
                    c
                }
            };
            let _: i64 = edit.query_async(&mut con).await.expect("edit by hand");
            let before = hash_of(&mut con, &key).await;
            let (d, claim) = fetch_claim_one(&b).await;
            match claim {
                Some(Claim::Malformed(why)) => {
                    assert!(why.contains(task.task_id.as_str()), "{field}: {why}");
                    assert!(why.contains(&format!("`{field}`")), "{field}: {why}");
                }
                other => panic!("{field}={value:?}: expected a malformed claim, got {other:?}"),
            }
            assert_eq!(hash_of(&mut con, &key).await, before, "{field}: touched");
            // The generic claim (a message the script leaves to Rust) says the same.
            match b.tasks().claim(&d, &spec()).await.expect("claim") {
                Claim::Malformed(why) => assert!(why.contains(&format!("`{field}`")), "{why}"),
                other => panic!("{field}={value:?}: generic claim gave {other:?}"),
            }
            assert_eq!(hash_of(&mut con, &key).await, before, "{field}: touched");
            b.bus.dead_letter(&d, "test").await.expect("dead-letter");
        }
    });
}

/// The lab's own encodings and what the model's readers tolerate still claim: `TaskStatus.`
/// prefix, lower-case status, ASCII spaces around a number.
#[test]
fn lenient_but_readable_hashes_are_still_claimed() {
    on_redis("lenient_hash", |b, url, prefix| async move {
        let mut con = raw(&url).await;
        for (field, value) in [
            ("status", "TaskStatus.PENDING"),
            ("status", "pending"),
            ("attempt", " 1 "),
            ("max_attempts", "+5"),
        ] {
            let task = new_task();
            b.tasks()
                .submit(std::slice::from_ref(&task))
                .await
                .expect("submit");
            let key = format!("{prefix}task_registry:{}", task.task_id);
            let _: i64 = redis::cmd("HSET")
                .arg(&key)
                .arg(field)
                .arg(value)
                .query_async(&mut con)
                .await
                .expect("edit by hand");
            let (_, claim) = fetch_claim_one(&b).await;
            assert!(
                matches!(&claim, Some(Claim::Claimed(t)) if t.task_id == task.task_id),
                "{field}={value:?}: {claim:?}"
            );
            assert_eq!(status_of(&b, &task.task_id).await.0, TaskStatus::Running);
        }
    });
}

/// A dead-letter limit beyond what a queue keeps is invalid input (the CLI's exit 2), not a
/// Lua error about a float that LRANGE refuses.
#[test]
fn a_dead_letter_limit_too_large_is_invalid_input() {
    on_redis("dead_letter_limit", |b, url, prefix| async move {
        for limit in [usize::MAX, 100_001] {
            match b.bus.dead_letters(&queue(), limit).await {
                Err(Error::InvalidInput { field: "limit", .. }) => {}
                other => panic!("limit {limit}: expected invalid input, got {other:?}"),
            }
        }
        assert!(b
            .bus
            .dead_letters(&queue(), 100_000)
            .await
            .expect("the largest limit")
            .is_empty());
        // The queue must exist for the CLI to ask the bus.
        enqueue_raw(&b, "{}").await;
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_orchestra"))
                .args(["--url", &url, "--prefix", &prefix, "dead-letters", QUEUE])
                .args(["--limit", "18446744073709551615"])
                .output()
                .expect("run orchestra dead-letters")
        })
        .await
        .expect("join");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("limit"), "{stderr}");
    });
}

/// The same through a running worker: the duplicated-key message and the corrupt task's own
/// message are dead-lettered at once with their reasons, the real task runs once and completes,
/// and the corrupt hash is left as it was.
#[test]
fn a_worker_dead_letters_what_the_two_sides_cannot_agree_on_and_runs_the_rest() {
    use agent_orchestra::engine::{handler_fn, TaskContext, TaskError, Worker, WorkerConfig};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    on_redis("worker_dead_letters", |b, url, prefix| async move {
        let mut con = raw(&url).await;
        let (real, corrupt) = (new_task(), new_task());
        b.tasks()
            .submit(&[real.clone(), corrupt.clone()])
            .await
            .expect("submit");
        let key = format!("{prefix}task_registry:{}", corrupt.task_id);
        let _: i64 = redis::cmd("HSET")
            .arg(&key)
            .arg("attempt")
            .arg("not a number")
            .query_async(&mut con)
            .await
            .expect("edit by hand");
        let before = hash_of(&mut con, &key).await;
        enqueue_raw(
            &b,
            &format!(r#"{{"task_id":"x","task_id":"{}"}}"#, real.task_id),
        )
        .await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let handler = handler_fn(move |_ctx: TaskContext| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, TaskError>(json!("done"))
            }
        });
        let config = WorkerConfig {
            worker_id: "w-hardening".into(),
            fetch_wait: Duration::from_millis(200),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(b.clone(), config)
            .handle(QUEUE, handler)
            .expect("handler")
            .start()
            .expect("start");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let dead = loop {
            let dead = b
                .bus
                .dead_letters(&queue(), 10)
                .await
                .expect("dead letters");
            let done = status_of(&b, &real.task_id).await.0 == TaskStatus::Completed;
            if (dead.len() == 2 && done) || tokio::time::Instant::now() > deadline {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        worker.shutdown().await;
        assert_eq!(
            status_of(&b, &real.task_id).await,
            (TaskStatus::Completed, 1)
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the handler ran for the real task only"
        );
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert!(
            dead.iter().all(|d| d.delivery_count == 1),
            "at once: {dead:?}"
        );
        assert!(
            dead.iter().any(|d| d.reason.contains("duplicate")),
            "{dead:?}"
        );
        assert!(
            dead.iter()
                .any(|d| d.reason.contains(corrupt.task_id.as_str())
                    && d.reason.contains("`attempt`")),
            "{dead:?}"
        );
        assert_eq!(
            hash_of(&mut con, &key).await,
            before,
            "the corrupt hash was touched"
        );
    });
}

async fn score(con: &mut redis::aio::MultiplexedConnection, key: &str, id: &TaskId) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg(key)
        .arg(id.as_str())
        .query_async(con)
        .await
        .expect("ZSCORE")
}

/// The claim script parses no JSON (cjson would disagree with serde_json: it reads NaN, 0x10,
/// 01 and raw tabs in strings), so a payload that is no JSON gets past its checks: the claim is
/// undone, hash and indexes exactly as they were, and the message dead-lettered naming the
/// field.
#[test]
fn a_claim_over_a_payload_rust_cannot_read_is_undone() {
    on_redis("claim_undo", |b, url, prefix| async move {
        let mut con = raw(&url).await;
        let pending = format!("{prefix}q:{{{QUEUE}}}:status:PENDING");
        let leases = format!("{prefix}q:{{{QUEUE}}}:leases");
        for raw_payload in [
            &b"{\"a\":\"tab\tinside\"}"[..],
            b"{\"a\": NaN}",
            b"[0x10]",
            b"01",
            b"1.",
            b"{\"a\":\"\xff\"}",
        ] {
            let payload = String::from_utf8_lossy(raw_payload);
            let task = new_task();
            b.tasks()
                .submit(std::slice::from_ref(&task))
                .await
                .expect("submit");
            let key = format!("{prefix}task_registry:{}", task.task_id);
            let _: i64 = redis::cmd("HSET")
                .arg(&key)
                .arg("payload")
                .arg(raw_payload)
                .query_async(&mut con)
                .await
                .expect("edit by hand");
            let before = hash_of(&mut con, &key).await;
            let index_before = score(&mut con, &pending, &task.task_id).await;
            assert!(index_before.is_some());
            let (d, claim) = fetch_claim_one(&b).await;
            match claim {
                Some(Claim::Malformed(why)) => {
                    assert!(why.contains("`payload`"), "{payload}: {why}");
                    assert!(why.contains(task.task_id.as_str()), "{payload}: {why}");
                }
                other => panic!("{payload}: expected a malformed claim, got {other:?}"),
            }
            assert_eq!(
                hash_of(&mut con, &key).await,
                before,
                "{payload}: not undone"
            );
            assert_eq!(score(&mut con, &pending, &task.task_id).await, index_before);
            assert_eq!(score(&mut con, &leases, &task.task_id).await, None);
            b.bus.dead_letter(&d, "test").await.expect("dead-letter");
        }
    });
}

/// The undo of a takeover (a RUNNING task whose lease ended) puts the task back as it was:
/// RUNNING under its old, expired lease, with its old score in the lease index.
#[test]
fn an_undone_takeover_leaves_the_task_running_under_its_old_lease() {
    on_redis("undo_takeover", |b, url, prefix| async move {
        let mut con = raw(&url).await;
        let leases = format!("{prefix}q:{{{QUEUE}}}:leases");
        let task = new_task();
        b.tasks()
            .submit(std::slice::from_ref(&task))
            .await
            .expect("submit");
        let short = ClaimSpec {
            worker_id: "w-short".into(),
            lease: Duration::from_millis(50),
        };
        let options = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_secs(60),
        };
        let (d, claim) = b
            .tasks()
            .fetch_claim(&queue(), options, &short)
            .await
            .expect("fetch_claim")
            .pop()
            .expect("one delivery");
        assert!(matches!(claim, Some(Claim::Claimed(_))), "{claim:?}");
        // The worker dies; its message comes back, its registry lease ends.
        b.bus.nack(&d, Duration::ZERO).await.expect("nack");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = format!("{prefix}task_registry:{}", task.task_id);
        let _: i64 = redis::cmd("HSET")
            .arg(&key)
            .arg("payload")
            .arg("{not json")
            .query_async(&mut con)
            .await
            .expect("edit by hand");
        let before = hash_of(&mut con, &key).await;
        let lease_before = score(&mut con, &leases, &task.task_id).await;
        assert!(lease_before.is_some());
        let (_, claim) = fetch_claim_one(&b).await;
        match claim {
            Some(Claim::Malformed(why)) => assert!(why.contains("`payload`"), "{why}"),
            other => panic!("expected a malformed claim, got {other:?}"),
        }
        assert_eq!(hash_of(&mut con, &key).await, before, "not undone");
        assert_eq!(score(&mut con, &leases, &task.task_id).await, lease_before);
    });
}
