//! The lab's Python `TaskRegistry` (tests/python/lab_registry.py, run as a subprocess) reads
//! the tasks written here, and the tasks it writes are read and claimed here.

use std::path::{Path, PathBuf};
use std::process::Command;

use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{TaskId, TaskStatus};
use serde_json::{json, Value};

use crate::{new_task, on_shared_redis, raw_connection, zcard};

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// Runs tests/python/lab_registry.py and returns its `RESULT:` JSON. Fails (never skips) with
/// the installation hint when Python or its modules are missing.
fn lab(url: &str, prefix: &str, args: &[&str]) -> Value {
    let script = python_dir().join("lab_registry.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(url)
        .arg(prefix)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}); the lab interop tests need Python 3 with the packages of \
                 tests/python/requirements.txt: python3 -m pip install -r tests/python/requirements.txt"
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!(
            "the lab interop test needs Python packages: {stderr}\nInstall them with: \
             python3 -m pip install -r tests/python/requirements.txt"
        );
    }
    assert!(
        out.status.success(),
        "lab_registry.py {args:?} failed ({}): {stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT:"))
        .unwrap_or_else(|| panic!("lab_registry.py printed no result: {stdout} / {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("lab result {line:?} is not JSON: {e}"))
}

fn parse_iso(s: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s.as_str().expect("a time string"))
        .unwrap_or_else(|e| panic!("{s} is not ISO-8601: {e}"))
        .with_timezone(&chrono::Utc)
}

#[test]
fn lab_task_registry_reads_a_task_written_here() {
    on_shared_redis("lab_reads_ours", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let mut task = new_task(
            json!({"topic": "LangGraph와 CrewAI의 차이점", "user_id": "user_123"}),
            3,
        );
        task.task_id = TaskId::parse("task_interop1").expect("id");
        b.registry.create(&task).await.expect("create");

        let seen = tokio::task::spawn_blocking({
            let (url, prefix) = (url.clone(), prefix.clone());
            move || lab(&url, &prefix, &["get", "task_interop1"])
        })
        .await
        .expect("python");
        assert_eq!(seen["task_id"], "task_interop1");
        assert_eq!(seen["status"], "PENDING");
        assert_eq!(seen["payload"], task.payload);
        assert_eq!(seen["priority"], 3);
        assert_eq!(seen["result"], Value::Null);
        assert_eq!(seen["worker_id"], Value::Null);
        assert_eq!(parse_iso(&seen["created_at"]), task.created_at);
        assert_eq!(parse_iso(&seen["updated_at"]), task.state.updated_at);

        // Claimed and completed here, with a non-string result: the lab reads a string.
        let mut running = task.state.clone();
        running.status = TaskStatus::Running;
        running.attempt = 1;
        running.worker_id = Some("crewai_worker_01".into());
        running.lease_until = Some(chrono::Utc::now() + chrono::Duration::seconds(30));
        running.updated_at = chrono::Utc::now();
        let t = b
            .registry
            .transition(&task.task_id, task.expect(), running)
            .await
            .expect("claim");
        let mut done = t.state.clone();
        done.status = TaskStatus::Completed;
        done.result = Some(json!({"summary": "LangGraph는 유연한 제어 흐름", "sources": 2}));
        done.lease_until = None;
        done.finished_at = Some(chrono::Utc::now());
        done.updated_at = chrono::Utc::now();
        let t = b
            .registry
            .transition(&task.task_id, t.expect(), done)
            .await
            .expect("complete");

        let seen =
            tokio::task::spawn_blocking(move || lab(&url, &prefix, &["get", "task_interop1"]))
                .await
                .expect("python");
        assert_eq!(seen["status"], "COMPLETED");
        assert_eq!(seen["worker_id"], "crewai_worker_01");
        let result_text = seen["result"]
            .as_str()
            .expect("the lab reads the result as a string");
        let result: Value = serde_json::from_str(result_text).expect("result text is its JSON");
        assert_eq!(Some(result), t.state.result);
    });
}

#[test]
fn task_registered_by_the_lab_is_readable_and_claimable_here() {
    on_shared_redis("ours_reads_lab", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let payload = json!({"topic": "LangGraph와 CrewAI의 차이점", "user_id": "user_123"});
        let registered = tokio::task::spawn_blocking({
            let (url, prefix, payload) = (url.clone(), prefix.clone(), payload.to_string());
            move || lab(&url, &prefix, &["register", &payload, "3"])
        })
        .await
        .expect("python");
        let id = TaskId::parse(registered["task_id"].as_str().expect("task_id")).expect("lab id");

        let t = b
            .registry
            .get(&id)
            .await
            .expect("get")
            .expect("the lab's task is found");
        assert_eq!(t.task_id, id);
        assert_eq!(
            t.status(),
            TaskStatus::Pending,
            "the lab stores TaskStatus.PENDING"
        );
        assert_eq!(t.payload, payload);
        assert_eq!(t.priority.get(), 3);
        assert_eq!(t.state.result, None, "the lab stores the string None");
        assert_eq!(t.state.worker_id, None);
        assert_eq!(t.created_at, parse_iso(&registered["created_at"]));
        assert_eq!(t.state.attempt, 0);

        // Our compare-and-set works on it, and the lab then reads what we wrote.
        let mut running = t.state.clone();
        running.status = TaskStatus::Running;
        running.attempt = 1;
        running.worker_id = Some("rust_worker".into());
        running.lease_until = Some(chrono::Utc::now() + chrono::Duration::seconds(30));
        running.updated_at = chrono::Utc::now();
        b.registry
            .transition(&id, t.expect(), running)
            .await
            .expect("claim the lab's task");

        // The lab completes it with its own update_task_status; we read its result.
        let seen = tokio::task::spawn_blocking({
            let id = id.to_string();
            move || {
                lab(
                    &url,
                    &prefix,
                    &["update", &id, "COMPLETED", "done by python"],
                )
            }
        })
        .await
        .expect("python");
        assert_eq!(seen["status"], "COMPLETED");
        assert_eq!(seen["worker_id"], "rust_worker");
        let t = b
            .registry
            .get(&id)
            .await
            .expect("get")
            .expect("still there");
        assert_eq!(t.status(), TaskStatus::Completed);
        assert_eq!(t.state.result, Some(json!("done by python")));
    });
}

#[test]
fn task_hash_uses_the_lab_field_names_and_encodings() {
    on_shared_redis("lab_fields", |b, prefix| async move {
        let url = broker_url(BrokerKind::Redis).await;
        let task = new_task(json!({"n": 1}), 7);
        b.registry.create(&task).await.expect("create");
        let mut con = raw_connection(&url).await;
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{prefix}task_registry:{}", task.task_id))
            .query_async(&mut con)
            .await
            .expect("HGETALL");
        assert_eq!(fields["task_id"], task.task_id.as_str());
        assert_eq!(fields["status"], "PENDING");
        assert_eq!(
            serde_json::from_str::<Value>(&fields["payload"]).unwrap(),
            json!({"n": 1})
        );
        assert_eq!(fields["priority"], "7");
        assert!(
            fields["created_at"].ends_with("+00:00"),
            "{}",
            fields["created_at"]
        );
        assert!(
            fields["updated_at"].ends_with("+00:00"),
            "{}",
            fields["updated_at"]
        );
        assert!(
            !fields.contains_key("result"),
            "no result yet: absent, not 'None'"
        );
        let pending = zcard(&mut con, format!("{prefix}q:{{research}}:status:PENDING")).await;
        assert_eq!(pending, 1, "the status index is written with the task");
    });
}
