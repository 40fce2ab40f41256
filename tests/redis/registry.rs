//! Registry details beyond the suite: what a purge removes, `create_many`'s answer per task, and
//! a task edited by hand into something unreadable.

use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{Error, Expected, Task, TaskStatus};
use serde_json::json;

use crate::{abandoned_task, new_task, on_shared_redis, raw_connection, zcard};

#[test]
fn purge_removes_the_hash_the_indexes_and_the_dependents_entries() {
    on_shared_redis("purge_all_traces", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let parent = new_task(json!({"p": 1}), 5);
        b.registry.create(&parent).await.expect("create parent");
        let mut child = new_task(json!({"c": 1}), 5);
        child.depends_on = vec![parent.task_id.clone()];
        child.state.status = TaskStatus::Waiting;
        b.registry.create(&child).await.expect("create child");
        assert_eq!(
            b.registry.dependents(&parent.task_id).await.expect("deps"),
            vec![child.task_id.clone()]
        );

        // Child fails (parent failed) and is purged: the parent's dependents forget it.
        let mut failed = child.state.clone();
        failed.status = TaskStatus::Failed;
        failed.error = Some("parent failed".into());
        failed.updated_at = chrono::Utc::now();
        b.registry
            .transition(&child.task_id, child.expect(), failed)
            .await
            .expect("fail");
        let purged = b
            .registry
            .purge_finished(&agent_orchestra::Retention {
                max_age: None,
                max_count: Some(0),
            })
            .await
            .expect("purge");
        assert_eq!(purged, 1);
        assert!(b.registry.get(&child.task_id).await.expect("get").is_none());
        assert!(b
            .registry
            .dependents(&parent.task_id)
            .await
            .expect("deps")
            .is_empty());
        let mut con = raw_connection(&url).await;
        let failed_index = zcard(&mut con, format!("{prefix}q:{{research}}:status:FAILED")).await;
        assert_eq!(failed_index, 0);
        assert_eq!(
            b.registry
                .counts()
                .await
                .expect("counts")
                .get(TaskStatus::Pending),
            1
        );
    });
}

#[test]
fn create_many_reports_each_existing_task_on_its_own() {
    on_shared_redis("create_many", |b, _prefix| async move {
        let tasks: Vec<Task> = (0..50).map(|i| new_task(json!({"i": i}), 5)).collect();
        b.registry
            .create(&tasks[7])
            .await
            .expect("create one first");
        let results = b.registry.create_many(&tasks).await.expect("create_many");
        for (i, r) in results.iter().enumerate() {
            if i == 7 {
                assert!(matches!(r, Err(Error::TaskExists(_))), "{r:?}");
            } else {
                assert!(r.is_ok(), "task {i}: {r:?}");
            }
        }
        assert_eq!(
            b.registry
                .counts()
                .await
                .expect("counts")
                .get(TaskStatus::Pending),
            50
        );
        let t = &tasks[3];
        let got = b
            .registry
            .get(&t.task_id)
            .await
            .expect("get")
            .expect("found");
        assert_eq!(&got, t);
        let conflict = b
            .registry
            .transition(
                &t.task_id,
                Expected {
                    status: TaskStatus::Pending,
                    attempt: 9,
                },
                t.state.clone(),
            )
            .await;
        assert!(
            matches!(
                conflict,
                Err(Error::Conflict {
                    actual_attempt: 0,
                    ..
                })
            ),
            "{conflict:?}"
        );
    });
}

/// A task whose hash was edited by hand into something unreadable does not stop the monitor:
/// the pass skips it (with a warning) and recovers the other stale task; `list` shows the
/// readable ones. Before, the whole pass failed at it, every interval.
#[test]
fn an_unreadable_task_does_not_stop_the_monitor() {
    use agent_orchestra::engine::{Monitor, MonitorConfig};
    use agent_orchestra::{TaskFilter, TaskStatus};
    on_shared_redis("unreadable_task", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut con = raw_connection(&url).await;
        let good = abandoned_task(&b, "corrupt_q").await;
        let bad = abandoned_task(&b, "corrupt_q").await;
        let _: () = redis::cmd("HSET")
            .arg(format!("{prefix}task_registry:{bad}"))
            .arg("attempt")
            .arg("not a number")
            .query_async(&mut con)
            .await
            .expect("corrupt a task by hand");
        assert!(b.registry.get(&bad).await.is_err(), "get still reports it");
        let monitor = Monitor::new(
            b.clone(),
            MonitorConfig {
                reannounce_pending_after: None,
                ..MonitorConfig::default()
            },
        );
        let report = monitor.tick().await.expect("the pass succeeds");
        assert_eq!(report.recovered, 1, "{report:?}");
        let t = b.registry.get(&good).await.unwrap().unwrap();
        assert_eq!(t.state.status, TaskStatus::Pending, "{t:?}");
        let page = b
            .registry
            .list(&TaskFilter::default(), None, 10)
            .await
            .expect("list");
        let ids: Vec<_> = page.tasks.iter().map(|t| t.task_id.clone()).collect();
        assert_eq!(ids, vec![good], "the readable task only");
        monitor.step_down().await.expect("release the lock");
    });
}
