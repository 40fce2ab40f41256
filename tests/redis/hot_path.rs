//! The hot path's batching (submit, record) and its events: batches that name an id twice,
//! records of one task at once, keys spoiled by hand, pattern subscribers.

use std::time::Duration;

use agent_orchestra::bus::{Delivery, FetchOptions};
use agent_orchestra::task_queue::{Claim, ClaimSpec, Settle};
use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{Backends, Error, Task, TaskId, TaskState, TaskStatus};
use serde_json::{json, Value};

use crate::{new_task, on_shared_redis, queue, raw_connection, zcard};

/// Fetches and claims up to `max` messages of the queue `research` (one fetch_claim).
pub(crate) async fn fetch_claim_research(
    b: &Backends,
    max: usize,
) -> Vec<(Delivery, Option<Claim>)> {
    let options = FetchOptions {
        max,
        wait: Duration::from_secs(5),
        lease: Duration::from_secs(60),
    };
    let spec = ClaimSpec {
        worker_id: "w-batch".into(),
        lease: Duration::from_secs(60),
    };
    b.tasks()
        .fetch_claim(&queue("research"), options, &spec)
        .await
        .expect("fetch_claim")
}

/// Submits `t` to the queue `research` and claims it in a fetch.
async fn submit_and_claim(b: &Backends, t: &Task) -> (Delivery, Task) {
    b.tasks()
        .submit(std::slice::from_ref(t))
        .await
        .expect("submit");
    let (d, c) = fetch_claim_research(b, 1)
        .await
        .pop()
        .expect("one delivery");
    match c {
        Some(Claim::Claimed(running)) => (d, running),
        other => panic!("claimed in the fetch: {other:?}"),
    }
}

pub(crate) fn completed_with(running: &Task, result: Value) -> TaskState {
    TaskState {
        status: TaskStatus::Completed,
        result: Some(result),
        lease_until: None,
        finished_at: Some(chrono::Utc::now()),
        ..running.state.clone()
    }
}

/// One submit batch that names an id twice creates it once (the batch's single EXISTS cannot
/// see the first copy, which the script creates itself).
#[test]
fn submit_batch_naming_one_id_twice_creates_it_once() {
    on_shared_redis("submit_dup", |b, _prefix| async move {
        let t = new_task(json!({"once": true}), 5);
        let other = new_task(json!({"other": true}), 5);
        let r = b
            .tasks()
            .submit(&[t.clone(), other.clone(), t.clone()])
            .await
            .expect("submit");
        assert!(r[0].is_ok() && r[1].is_ok(), "{r:?}");
        assert!(
            matches!(&r[2], Err(Error::TaskExists(id)) if *id == t.task_id),
            "{r:?}"
        );
        let s = b.bus.stats(&queue("research")).await.expect("stats");
        assert_eq!(s.waiting, 2, "one message per created task: {s:?}");
    });
}

/// Two records of one task made at the same moment (a retry after a lost reply while the first
/// is still queued) never share a script: the first applies, the second is a replay.
#[test]
fn two_records_of_one_task_at_once_are_applied_once() {
    on_shared_redis("record_dup", |b, _prefix| async move {
        let t = new_task(json!({}), 5);
        let (d, running) = submit_and_claim(&b, &t).await;
        let next = completed_with(&running, json!("done"));
        let (a, z) = tokio::join!(
            b.tasks().record(&d, &running, next.clone(), Settle::Ack),
            b.tasks().record(&d, &running, next.clone(), Settle::Ack),
        );
        assert_eq!(a.expect("first").task.state, next);
        assert_eq!(z.expect("second: a replay").task.state, next);
        let stored = b
            .registry
            .get(&t.task_id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.state, next);
        let s = b.bus.stats(&queue("research")).await.expect("stats");
        assert_eq!((s.waiting, s.in_flight), (0, 0), "{s:?}");
    });
}

/// A task key that holds no hash (written by hand) fails only what touches it: the claim of its
/// message comes back malformed (the worker dead-letters it) while the other messages of the
/// fetch are claimed, and its record fails alone while the records sent with it apply in full.
#[test]
fn a_task_key_that_is_no_hash_fails_only_its_own_claim_and_record() {
    on_shared_redis("wrongtype", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut raw = raw_connection(&url).await;
        let spoil = |id: &TaskId| {
            let mut set = redis::cmd("SET");
            set.arg(format!("{prefix}task_registry:{id}"))
                .arg("not a hash");
            set
        };
        // A claim: one of three messages names a task whose key is a string.
        let tasks: Vec<Task> = (0..3).map(|i| new_task(json!({ "i": i }), 5)).collect();
        b.tasks().submit(&tasks).await.expect("submit");
        spoil(&tasks[1].task_id)
            .exec_async(&mut raw)
            .await
            .expect("SET");
        let got = fetch_claim_research(&b, 3).await;
        assert_eq!(got.len(), 3);
        let mut running = Vec::new();
        for (d, c) in got {
            match c {
                Some(Claim::Claimed(t)) => running.push((d, t)),
                Some(Claim::Malformed(why)) => {
                    assert!(why.contains(tasks[1].task_id.as_str()), "{why}");
                    assert!(why.contains("WRONGTYPE"), "{why}");
                }
                other => panic!("unexpected claim {other:?}"),
            }
        }
        assert_eq!(running.len(), 2, "the two readable tasks are claimed");
        // Records: the first task's key is spoiled after its claim; three records at once.
        let (d0, t0) = &running[0];
        let (d1, t1) = &running[1];
        let extra = new_task(json!({}), 5);
        let (d2, t2) = submit_and_claim(&b, &extra).await;
        spoil(&t0.task_id).exec_async(&mut raw).await.expect("SET");
        let (r0, r1, r2) = tokio::join!(
            b.tasks()
                .record(d0, t0, completed_with(t0, json!(0)), Settle::Ack),
            b.tasks()
                .record(d1, t1, completed_with(t1, json!(1)), Settle::Ack),
            b.tasks()
                .record(&d2, &t2, completed_with(&t2, json!(2)), Settle::Ack),
        );
        match r0 {
            Err(e) => assert!(e.to_string().contains("WRONGTYPE"), "{e}"),
            Ok(r) => panic!("a record over a string key succeeded: {r:?}"),
        }
        for (r, t) in [(r1, t1), (r2, &t2)] {
            let r = r.expect("the other records apply");
            let stored = b
                .registry
                .get(&t.task_id)
                .await
                .expect("get")
                .expect("stored");
            assert_eq!(stored, r.task);
        }
        let counts = b.registry.counts().await.expect("counts");
        assert_eq!(counts.get(TaskStatus::Completed), 2, "{counts:?}");
    });
}

/// A status index or a dependents set whose key holds another type (written by hand) does not
/// stop a batch of records half-way: the outcomes are stored and their messages acked, the index
/// key is passed over (logged by Redis), and a record whose dependents cannot be read is
/// recorded all the same (the worker logs it; the monitor's sweep moves its dependents on).
#[test]
fn a_spoiled_index_key_does_not_stop_a_batch_half_way() {
    on_shared_redis("spoiled_index", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut raw = raw_connection(&url).await;
        let tasks: Vec<Task> = (0..3).map(|i| new_task(json!({ "i": i }), 5)).collect();
        b.tasks().submit(&tasks).await.expect("submit");
        let got = fetch_claim_research(&b, 3).await;
        let running: Vec<(Delivery, Task)> = got
            .into_iter()
            .map(|(d, c)| match c {
                Some(Claim::Claimed(t)) => (d, t),
                other => panic!("claimed, got {other:?}"),
            })
            .collect();
        for key in [
            format!("{prefix}q:{{research}}:status:COMPLETED"),
            format!("{prefix}q:{{research}}:dependents:{}", running[2].1.task_id),
        ] {
            redis::cmd("SET")
                .arg(key)
                .arg("not a sorted set")
                .exec_async(&mut raw)
                .await
                .expect("SET");
        }
        let records = running.iter().map(|(d, t)| {
            b.tasks()
                .record(d, t, completed_with(t, json!("done")), Settle::Ack)
        });
        let results = futures::future::join_all(records).await;
        for r in &results {
            let r = r.as_ref().expect("recorded");
            assert_eq!(r.task.status(), TaskStatus::Completed);
            assert!(r.dependents.is_empty(), "{r:?}");
        }
        for (_, t) in &running {
            let stored = b
                .registry
                .get(&t.task_id)
                .await
                .expect("get")
                .expect("stored");
            assert_eq!(stored.status(), TaskStatus::Completed, "{}", t.task_id);
        }
        let stats = b.bus.stats(&queue("research")).await.expect("stats");
        assert_eq!(
            (stats.waiting, stats.in_flight),
            (0, 0),
            "every message acked: {stats:?}"
        );
        let leases = zcard(&mut raw, format!("{prefix}q:{{research}}:leases")).await;
        assert_eq!(leases, 0, "the lease index was cleared");
    });
}

/// The scripts publish an event only when someone listens, and a pattern subscriber counts:
/// a client subscribed to `<prefix>events*` (no channel subscriber at all) gets the events of a
/// submit, a claim and a record.
#[test]
fn a_pattern_subscriber_gets_the_events() {
    on_shared_redis("events_pattern", |b, prefix| async move {
        use futures::StreamExt;
        let url = broker_url(BrokerKind::Redis).await;
        let mut ps = redis::Client::open(url.as_str())
            .expect("url")
            .get_async_pubsub()
            .await
            .expect("pubsub connection");
        ps.psubscribe(format!("{prefix}events*"))
            .await
            .expect("psubscribe");
        let mut messages = ps.into_on_message();
        let t = new_task(json!({}), 5);
        let (d, running) = submit_and_claim(&b, &t).await;
        let next = completed_with(&running, json!(1));
        b.tasks()
            .record(&d, &running, next, Settle::Ack)
            .await
            .expect("record");
        let mut statuses = Vec::new();
        while statuses.len() < 3 {
            let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .unwrap_or_else(|_| panic!("events so far: {statuses:?}"))
                .expect("the subscription stays open");
            let ev: Value = serde_json::from_slice(m.get_payload_bytes()).expect("an event");
            assert_eq!(ev["task_id"], json!(t.task_id.as_str()));
            statuses.push(ev["status"].as_str().unwrap_or_default().to_string());
        }
        assert_eq!(statuses, ["PENDING", "RUNNING", "COMPLETED"]);
    });
}
