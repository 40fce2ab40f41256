//! What the bus makes of keys written by hand or by an older version: ten thousand dead
//! letters, the message layout before 2026-11-25, a header with a priority out of range.

use std::time::Duration;

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::Priority;

use crate::{on_shared_redis, queue, raw_connection, zcard};

/// `dead_letters` with a limit beyond what one Lua `unpack` takes (about 8,000 values).
#[test]
fn dead_letters_lists_ten_thousand() {
    on_shared_redis("many_dead", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut con = raw_connection(&url).await;
        let base = format!("{prefix}q:{{many_dead}}");
        let mut pipe = redis::pipe();
        for id in 1..=10_000u32 {
            pipe.cmd("HSET")
                .arg(format!("{base}:bodies"))
                .arg(id)
                .arg(format!("body {id}"))
                .ignore();
            pipe.cmd("LPUSH")
                .arg(format!("{base}:dead"))
                .arg(format!("{id}:3:5:1700000000000:too many"))
                .ignore();
        }
        let () = pipe
            .query_async(&mut con)
            .await
            .expect("write dead letters");
        let dead = b
            .bus
            .dead_letters(&queue("many_dead"), 20_000)
            .await
            .expect("dead letters");
        assert_eq!(dead.len(), 10_000);
        assert_eq!(
            (dead[0].message_id.as_str(), dead[0].payload.as_slice()),
            ("10000", b"body 10000".as_slice()),
            "newest first"
        );
        assert_eq!(dead[9_999].payload, b"body 1".to_vec());
    });
}

/// Messages queued by a version before 2026-11-25 (a bare id in the sets and a hash per
/// message) are delivered after the upgrade, with their bodies, priorities and delivery counts;
/// an old dead letter still lists.
#[test]
fn messages_of_the_previous_layout_survive_the_upgrade() {
    on_shared_redis("legacy_layout", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut con = raw_connection(&url).await;
        let base = format!("{prefix}q:{{legacy}}");
        let old = |id: u32| format!("{base}:m:{id}");
        let p = 562_949_953_421_312u64;
        let mut pipe = redis::pipe();
        // Ready (priority 2), delayed and already due, leased with an ended lease (one
        // delivery so far), and a dead letter.
        pipe.cmd("HSET")
            .arg(old(1))
            .arg(&["body", "ready", "p", "2", "s", "1", "d", "0", "l", "0"]);
        pipe.cmd("ZADD")
            .arg(format!("{base}:ready"))
            .arg(2 * p + 1)
            .arg(1);
        pipe.cmd("HSET")
            .arg(old(2))
            .arg(&["body", "delayed", "p", "5", "s", "2", "d", "0", "l", "0"]);
        pipe.cmd("ZADD")
            .arg(format!("{base}:delayed"))
            .arg(1)
            .arg(2);
        pipe.cmd("HSET")
            .arg(old(3))
            .arg(&["body", "leased", "p", "5", "s", "3", "d", "1", "l", "1"]);
        pipe.cmd("ZADD")
            .arg(format!("{base}:inflight"))
            .arg(1)
            .arg(3);
        pipe.cmd("HSET").arg(old(4)).arg(&[
            "body",
            "dead",
            "p",
            "7",
            "s",
            "4",
            "d",
            "3",
            "l",
            "0",
            "reason",
            "too many",
            "dead_at",
            "1700000000000",
        ]);
        pipe.cmd("LPUSH").arg(format!("{base}:dead")).arg(4);
        pipe.cmd("SET").arg(format!("{base}:seq")).arg(4);
        let () = pipe
            .query_async(&mut con)
            .await
            .expect("write the old layout");

        let q = queue("legacy");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!(
            (stats.waiting, stats.in_flight, stats.dead),
            (3, 0, 1),
            "{stats:?}"
        );
        let got = b
            .bus
            .fetch(
                &q,
                FetchOptions {
                    max: 10,
                    wait: Duration::ZERO,
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("fetch");
        let seen: Vec<(String, Vec<u8>, u8, u32)> = got
            .iter()
            .map(|d| {
                (
                    d.message_id.clone(),
                    d.payload.clone(),
                    d.priority.get(),
                    d.delivery_count,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("1".to_string(), b"ready".to_vec(), 2, 1),
                ("3".to_string(), b"leased".to_vec(), 5, 2),
                ("2".to_string(), b"delayed".to_vec(), 5, 1),
            ],
            "by priority, then the old lease's place, then the promoted delayed message"
        );
        for d in &got {
            b.bus.ack(d).await.expect("ack");
        }
        let dead = b.bus.dead_letters(&q, 10).await.expect("dead letters");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(
            (
                dead[0].message_id.as_str(),
                dead[0].payload.as_slice(),
                dead[0].delivery_count
            ),
            ("4", b"dead".as_slice(), 3)
        );
        assert_eq!(dead[0].reason, "too many");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!(
            (stats.waiting, stats.in_flight, stats.dead),
            (0, 0, 1),
            "{stats:?}"
        );
        for id in 1..=3 {
            let exists: bool = redis::cmd("EXISTS")
                .arg(old(id))
                .query_async(&mut con)
                .await
                .expect("EXISTS");
            assert!(!exists, "old hash {id} moved to the new layout");
        }
    });
}

/// A ready message whose header has a priority out of 1..=10 (written by hand, or a legacy
/// message with `p` 0) is delivered with the nearest priority and can be acked: before, it
/// failed the whole fetch after the script had leased and claimed the batch, whose tasks then
/// burned attempts without running.
#[test]
fn a_header_with_a_priority_out_of_range_does_not_fail_the_batch() {
    on_shared_redis("prio_out_of_range", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut con = raw_connection(&url).await;
        let q = queue("odd_prio");
        b.bus
            .enqueue(
                &q,
                OutgoingMessage::new(b"normal".to_vec(), Priority::new(5).unwrap()),
            )
            .await
            .expect("enqueue");
        let base = format!("{prefix}q:{{odd_prio}}");
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(format!("{base}:bodies"))
            .arg("900")
            .arg("odd")
            .ignore()
            .cmd("ZADD")
            .arg(format!("{base}:ready"))
            .arg(0)
            .arg("900:0:0:900")
            .ignore()
            .query_async(&mut con)
            .await
            .expect("write a header by hand");
        let got = b
            .bus
            .fetch(
                &q,
                FetchOptions {
                    max: 10,
                    wait: Duration::from_secs(1),
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("the fetch succeeds");
        let payloads: Vec<&[u8]> = got.iter().map(|d| d.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"odd"[..], &b"normal"[..]]);
        assert_eq!(got[0].priority, Priority::new(1).unwrap());
        for d in &got {
            b.bus.ack(d).await.expect("ack");
        }
        assert_eq!(zcard(&mut con, format!("{base}:inflight")).await, 0);
    });
}

/// A namespace written by the layout before 2026-12-07, whose registry indexes were global
/// (`orchestra:status:<S>`, `orchestra:leases`, `orchestra:dependents:<parent>`), is moved to
/// the per-queue keys when a registry opens on it: counts, the stale-lease scan and a parent's
/// dependents see its tasks again, and the old keys are gone.
#[test]
fn a_namespace_of_the_global_index_layout_is_migrated_at_open() {
    use agent_orchestra::engine::{DispatchOptions, Dispatcher};
    use agent_orchestra::TaskStatus;
    on_shared_redis("global_layout", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let d = Dispatcher::new(b.clone());
        let parent = d
            .build(
                "research",
                serde_json::json!({"n": 1}),
                5,
                &DispatchOptions::default(),
            )
            .expect("build");
        b.registry.create(&parent).await.expect("create parent");
        let child = d
            .dispatch(
                "research",
                serde_json::json!({"n": 2}),
                5,
                DispatchOptions {
                    depends_on: vec![parent.task_id.clone()],
                    ..DispatchOptions::default()
                },
            )
            .await
            .expect("dispatch child");
        let running = crate::abandoned_task(&b, "writing").await;
        drop(d);
        drop(b);
        // Rewrite today's per-queue indexes into the old global keys, as that version left them.
        let mut con = raw_connection(&url).await;
        let moves = [
            ("research", "status:PENDING", "orchestra:status:PENDING"),
            ("research", "status:WAITING", "orchestra:status:WAITING"),
            ("writing", "leases", "orchestra:leases"),
        ];
        for (q, new, old) in moves {
            let new = format!("{prefix}q:{{{q}}}:{new}");
            let old = format!("{prefix}{old}");
            let _: i64 = redis::cmd("ZUNIONSTORE")
                .arg(&old)
                .arg(2)
                .arg(&old)
                .arg(&new)
                .query_async(&mut con)
                .await
                .expect("ZUNIONSTORE");
            let _: i64 = redis::cmd("DEL")
                .arg(&new)
                .query_async(&mut con)
                .await
                .expect("DEL");
        }
        let _: () = redis::cmd("RENAME")
            .arg(format!(
                "{prefix}q:{{research}}:dependents:{}",
                parent.task_id
            ))
            .arg(format!("{prefix}orchestra:dependents:{}", parent.task_id))
            .query_async(&mut con)
            .await
            .expect("RENAME the dependents set");
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{prefix}orchestra:queues"))
            .query_async(&mut con)
            .await
            .expect("DEL");

        let b = crate::make_backends(&prefix).await;
        let counts = b.registry.counts().await.expect("counts");
        assert_eq!(
            (
                counts.get(TaskStatus::Pending),
                counts.get(TaskStatus::Waiting),
                counts.get(TaskStatus::Running)
            ),
            (1, 1, 1),
            "{counts:?}"
        );
        assert_eq!(
            b.registry
                .dependents(&parent.task_id)
                .await
                .expect("dependents"),
            vec![child]
        );
        let stale = b
            .registry
            .stale_running(chrono::Utc::now(), 10)
            .await
            .expect("stale");
        assert_eq!(
            stale.iter().map(|t| &t.task_id).collect::<Vec<_>>(),
            vec![&running]
        );
        let left: i64 = redis::cmd("EXISTS")
            .arg(format!("{prefix}orchestra:status:PENDING"))
            .arg(format!("{prefix}orchestra:status:WAITING"))
            .arg(format!("{prefix}orchestra:leases"))
            .arg(format!("{prefix}orchestra:dependents:{}", parent.task_id))
            .query_async(&mut con)
            .await
            .expect("EXISTS");
        assert_eq!(left, 0, "the old keys are gone");
    });
}
