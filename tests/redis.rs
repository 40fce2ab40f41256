//! The conformance and engine suites on Redis, plus what only the Redis backend promises: the
//! lab's Python `TaskRegistry` reads our tasks and we read its tasks, a worker keeps consuming
//! across a Redis restart, subscribers resubscribe, TLS with a self-signed CA, AUTH with an ACL
//! user, and stale receipts.
//!
//! The shared server comes from `ORCHESTRA_TEST_REDIS_URL`, else testcontainers, else
//! 127.0.0.1:6379 (see `agent_orchestra::testkit::harness`). Every test works under its own key
//! prefix and deletes its keys with SCAN (never FLUSHALL). Tests that restart Redis, or need TLS
//! or ACLs, start their own `redis-server` on a free port.
//!
//! Run: `cargo test --features redis,testkit --test redis`. The interop tests need Python 3
//! with `redis` and `pydantic`: `python3 -m pip install -r tests/python/requirements.txt`.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent_orchestra::task_queue::{Claim, ClaimSpec, Settle};
use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, BackendUrls, Backends, ConnectOptions, Delivery, Error, Expected, FetchOptions,
    Limits, OutgoingMessage, Priority, QueueName, Task, TaskId, TaskState, TaskStatus,
};
use parking_lot::Mutex;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Opening and cleaning up

fn options(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    }
}

async fn open_url(url: &str, prefix: &str) -> Backends {
    connect(&BackendUrls::all(url), &options(prefix))
        .await
        .unwrap_or_else(|e| panic!("connect to the test Redis: {e}"))
}

mod support;

/// Opens the three roles on the shared test server under `prefix`.
async fn make_backends(prefix: &str) -> Backends {
    open_url(&broker_url(BrokerKind::Redis).await, prefix).await
}

/// Deletes every key that starts with `prefix` (SCAN + UNLINK; never FLUSHALL).
async fn cleanup(prefix: &str) {
    cleanup_at(&broker_url(BrokerKind::Redis).await, prefix).await;
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("test Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to the test Redis")
}

use support::redis_at as cleanup_at;

agent_orchestra::conformance_suite!(make_backends, cleanup);

mod engine {
    use super::{cleanup, make_backends};
    agent_orchestra::engine_suite!(make_backends, cleanup);
}

/// Runs a Redis-specific test on the shared server the way the suites do: fresh prefix,
/// cleanup afterwards even when the test fails.
fn on_shared_redis<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Backends, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix(name);
    let for_test = prefix.clone();
    agent_orchestra::testkit::run_suite_test(
        name,
        async move {
            let b = make_backends(&for_test).await;
            test(b, for_test).await;
        },
        async move { cleanup(&prefix).await },
    );
}

/// The size of a sorted set (an index), read directly.
async fn zcard(con: &mut redis::aio::MultiplexedConnection, key: String) -> u64 {
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(con)
        .await
        .expect("ZCARD")
}

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).expect("valid queue name")
}

fn new_task(payload: Value, priority: u8) -> Task {
    Task::new(
        queue("research"),
        payload,
        Priority::new(priority.into()).expect("priority"),
        3,
        vec![],
        &Limits::default(),
    )
    .expect("valid task")
}

// ---------------------------------------------------------------------------------------------
// The lab's Python TaskRegistry, run as a subprocess

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
        let pending = zcard(&mut con, format!("{prefix}orchestra:status:PENDING")).await;
        assert_eq!(pending, 1, "the status index is written with the task");
    });
}

// ---------------------------------------------------------------------------------------------
// Receipts

#[test]
fn stale_ack_does_not_remove_the_redelivered_message() {
    on_shared_redis("stale_ack", |b, _prefix| async move {
        let q = queue("stale_ack");
        b.bus
            .enqueue(
                &q,
                OutgoingMessage::new(&b"{\"n\":1}"[..], Priority::DEFAULT),
            )
            .await
            .expect("enqueue");
        let short = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_millis(200),
        };
        let first = b
            .bus
            .fetch(&q, short)
            .await
            .expect("fetch")
            .pop()
            .expect("delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let long = FetchOptions {
            lease: Duration::from_secs(30),
            ..short
        };
        let second = b
            .bus
            .fetch(&q, long)
            .await
            .expect("fetch")
            .pop()
            .expect("redelivered");
        assert_eq!(second.message_id, first.message_id);
        assert_eq!(second.delivery_count, 2);

        b.bus
            .ack(&first)
            .await
            .expect("a stale ack is not an error");
        assert!(
            b.bus.extend(&first, Duration::from_secs(5)).await.is_err(),
            "stale extend"
        );
        b.bus
            .nack(&first, Duration::ZERO)
            .await
            .expect("a stale nack is not an error");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!(
            (stats.waiting, stats.in_flight),
            (0, 1),
            "the new lease survived: {stats:?}"
        );

        b.bus.ack(&second).await.expect("ack");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
    });
}

#[test]
fn acking_after_the_lease_ended_but_before_redelivery_still_removes_the_message() {
    on_shared_redis("late_ack", |b, _prefix| async move {
        let q = queue("late_ack");
        b.bus
            .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
            .await
            .expect("enqueue");
        let opts = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_millis(100),
        };
        let d = b
            .bus
            .fetch(&q, opts)
            .await
            .expect("fetch")
            .pop()
            .expect("delivered");
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.bus
            .stats(&q)
            .await
            .expect("stats (promotes the expired lease)");
        b.bus.ack(&d).await.expect("late ack");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// A redis-server of our own

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` this test started, on a free port, with its own directory; killed on drop.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts `redis-server` with `args(port, dir)`.
    async fn start(args: impl FnOnce(u16, &Path) -> Vec<String>) -> OwnRedis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let args = args(port, dir.path());
        let mut server = OwnRedis {
            port,
            dir,
            args,
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("log file");
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if std::time::Instant::now() > deadline {
                panic!(
                    "redis-server did not listen on {}: {}",
                    self.port,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no final save (what Redis kept is what it had fsynced).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn plain_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.to_string_lossy(),
        "--save",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_consuming_across_a_redis_restart_and_loses_nothing() {
    let mut server = OwnRedis::start(|port, dir| {
        plain_args(
            port,
            dir,
            &["--appendonly", "yes", "--appendfsync", "always"],
        )
    })
    .await;
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let b = open_url(&url, "t_restart_").await;
    let q = queue("restart");
    let batch = |from: usize| -> Vec<OutgoingMessage> {
        (from..from + 200)
            .map(|i| OutgoingMessage::new(format!("{{\"n\":{i}}}").into_bytes(), Priority::DEFAULT))
            .collect()
    };
    b.bus
        .enqueue_many(&q, batch(0))
        .await
        .expect("enqueue before the restart");

    let consumed: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = {
        let (bus, q, consumed, errors) =
            (b.bus.clone(), q.clone(), consumed.clone(), errors.clone());
        tokio::spawn(async move {
            let opts = FetchOptions {
                max: 8,
                wait: Duration::from_millis(500),
                lease: Duration::from_secs(5),
            };
            loop {
                let got = match bus.fetch(&q, opts).await {
                    Ok(got) => got,
                    Err(e) if e.is_temporary() => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => panic!("fetch failed permanently: {e}"),
                };
                for d in got {
                    // Slow enough that the restart happens mid-stream.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // Processed once the ack returns, even with an error: an ack whose reply
                    // the restart cut off may still have removed the message. One whose ack
                    // was lost comes again after its lease and is acked then (checked below).
                    let acked = bus.ack(&d).await;
                    consumed.lock().insert(d.payload.clone());
                    match acked {
                        Ok(()) => {}
                        Err(e) if e.is_temporary() => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("ack failed permanently: {e}"),
                    }
                }
            }
        })
    };
    let wait_for = |n: usize, what: &'static str| {
        let consumed = consumed.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while consumed.lock().len() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: only {} of {n} messages consumed",
                    consumed.lock().len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(20, "before the restart").await;
    server.kill();
    let at_kill = consumed.lock().len();
    assert!(
        at_kill < 200,
        "the restart should come mid-stream ({at_kill} consumed)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.spawn().await;

    // Enqueue more once Redis is back (the first calls may see it still loading).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match b.bus.enqueue_many(&q, batch(200)).await {
            Ok(_) => break,
            Err(e) if e.is_temporary() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("enqueue after the restart: {e}"),
        }
    }
    wait_for(400, "after the restart").await;
    let all: HashSet<Vec<u8>> = (0..400)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect();
    assert_eq!(
        *consumed.lock(),
        all,
        "every message Redis kept was consumed"
    );
    // A message whose ack the restart lost is delivered again once its 5 s lease ends, and
    // acked: the queue empties while the worker runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = b.bus.stats(&q).await.expect("stats");
        if stats.waiting + stats.in_flight == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never emptied: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.abort();
    eprintln!(
        "restart: {at_kill} consumed when Redis was killed, {} temporary errors seen by the worker",
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resubscribes_after_a_redis_restart() {
    let mut server = OwnRedis::start(|port, dir| plain_args(port, dir, &[])).await;
    let url = format!("redis://127.0.0.1:{}", server.port);
    let b = open_url(&url, "t_resub_").await;
    let mut sub = b.bus.subscribe("events").await.expect("subscribe");
    b.bus.publish("events", b"before").await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("event before the restart");
    assert_eq!(got.as_deref(), Some(&b"before"[..]));

    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.spawn().await;

    // Events published while the subscription is down are lost (the contract); keep
    // publishing until one arrives through the resubscribed connection.
    let publisher = {
        let bus = b.bus.clone();
        tokio::spawn(async move {
            loop {
                let _ = bus.publish("events", b"after").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match sub.recv().await {
                Some(e) if e == b"after" => return Some(e),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    publisher.abort();
    assert_eq!(
        got.expect("an event after the restart within 30 s")
            .as_deref(),
        Some(&b"after"[..]),
        "the subscription was closed instead of resubscribed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password_come_from_the_url_and_are_never_shown() {
    let server = OwnRedis::start(|port, dir| {
        plain_args(
            port,
            dir,
            &[
                "--requirepass",
                "default-pass-9f3",
                "--user",
                "alice",
                "on",
                ">wonderland-7c1",
                "~*",
                "&*",
                "+@all",
            ],
        )
    })
    .await;
    let port = server.port;

    let b = open_url(
        &format!("redis://alice:wonderland-7c1@127.0.0.1:{port}/2"),
        "t_acl_",
    )
    .await;
    let t = new_task(json!({"who": "alice"}), 5);
    b.registry.create(&t).await.expect("create as alice");
    let mut con = raw_connection(&format!("redis://alice:wonderland-7c1@127.0.0.1:{port}/2")).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("t_acl_task_registry:{}", t.task_id))
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 1, "the database number came from the URL path");

    let b = open_url(
        &format!("redis://:default-pass-9f3@127.0.0.1:{port}"),
        "t_acl_",
    )
    .await;
    assert!(b
        .locks
        .acquire("k", "me", Duration::from_secs(5))
        .await
        .expect("acquire")
        .is_some());

    for url in [
        format!("redis://alice:hunter2-wrong@127.0.0.1:{port}"),
        format!("redis://:hunter2-wrong@127.0.0.1:{port}"),
    ] {
        let err = connect(&BackendUrls::all(&url), &options("t_acl_"))
            .await
            .expect_err("a wrong password is refused");
        let shown = format!("{err} / {err:?}");
        assert!(
            !shown.contains("hunter2-wrong"),
            "the password leaked: {shown}"
        );
        assert!(
            !err.is_temporary(),
            "a wrong password is permanent: {shown}"
        );
    }
}

/// The scripts ask `PUBSUB` whether anyone listens before publishing an event. An ACL user
/// that may not run `PUBSUB` still runs the whole lifecycle: a refused `PUBSUB` counts as
/// someone listening (before, the claim script stopped after its first write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_without_pubsub_runs_the_whole_lifecycle() {
    let server = OwnRedis::start(|port, dir| {
        plain_args(
            port,
            dir,
            &[
                "--user",
                "bob",
                "on",
                ">no-pubsub-4e2",
                "~*",
                "&*",
                "+@all",
                "-pubsub",
            ],
        )
    })
    .await;
    let url = format!("redis://bob:no-pubsub-4e2@127.0.0.1:{}", server.port);
    let mut raw = raw_connection(&url).await;
    let refused = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async::<i64>(&mut raw)
        .await;
    assert!(refused.is_err(), "bob may not run PUBSUB: {refused:?}");
    let b = open_url(&url, "t_nopubsub_").await;
    let tasks: Vec<Task> = (0..4).map(|i| new_task(json!({ "i": i }), 5)).collect();
    for r in b.tasks().submit(&tasks).await.expect("submit") {
        r.expect("each task submitted");
    }
    let got = fetch_claim_research(&b, 4).await;
    assert_eq!(got.len(), 4);
    for (d, c) in got {
        let running = match c {
            Some(Claim::Claimed(t)) => t,
            other => panic!("claimed, got {other:?}"),
        };
        b.tasks()
            .record(
                &d,
                &running,
                completed_with(&running, json!("done")),
                Settle::Ack,
            )
            .await
            .expect("record");
    }
    let counts = b.registry.counts().await.expect("counts");
    assert_eq!(counts.get(TaskStatus::Completed), 4, "{counts:?}");
    assert_eq!(counts.get(TaskStatus::Running), 0, "{counts:?}");
    let stats = b.bus.stats(&queue("research")).await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_temporary_error() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        ..options("t_refused_")
    };
    let err = connect(&BackendUrls::all(&url), &opts)
        .await
        .expect_err("nothing listens there");
    assert!(err.is_temporary(), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// TLS against our own server with a self-signed CA

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (needed to make a test certificate): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=orchestra test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_with_a_self_signed_ca_works_for_every_role() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certificates(certs.path());
    let c = certs.path().to_path_buf();
    let server = OwnRedis::start(move |port, dir| {
        let f = |n: &str| c.join(n).to_string_lossy().into_owned();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
            "--save".into(),
            "".into(),
            "--tls-cert-file".into(),
            f("server.crt"),
            "--tls-key-file".into(),
            f("server.key"),
            "--tls-ca-cert-file".into(),
            f("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            "tls-pass-51".into(),
        ]
    })
    .await;
    let ca = certs.path().join("ca.crt");
    let url = format!(
        "rediss://:tls-pass-51@127.0.0.1:{}/0?tls_ca_file={}",
        server.port,
        ca.display()
    );
    let b = open_url(&url, "t_tls_").await;

    let q = queue("tls");
    let mut sub = b.bus.subscribe("events").await.expect("subscribe over TLS");
    b.bus
        .enqueue(
            &q,
            OutgoingMessage::new(&b"{\"tls\":true}"[..], Priority::HIGHEST),
        )
        .await
        .expect("enqueue over TLS");
    let d = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 1,
                wait: Duration::from_secs(5),
                lease: Duration::from_secs(5),
            },
        )
        .await
        .expect("fetch over TLS")
        .pop()
        .expect("delivered");
    b.bus.ack(&d).await.expect("ack");
    b.bus.publish("events", b"over tls").await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("event");
    assert_eq!(got.as_deref(), Some(&b"over tls"[..]));
    let t = new_task(json!({"secure": "✓"}), 2);
    b.registry.create(&t).await.expect("create over TLS");
    assert_eq!(
        b.registry
            .get(&t.task_id)
            .await
            .expect("get")
            .expect("found"),
        t
    );
    assert!(b
        .locks
        .acquire("tls", "me", Duration::from_secs(5))
        .await
        .expect("lock")
        .is_some());

    // Without the CA the server's certificate is not trusted: a permanent error.
    let err = connect(
        &BackendUrls::all(format!("rediss://:tls-pass-51@127.0.0.1:{}/0", server.port)),
        &ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            ..options("t_tls_")
        },
    )
    .await
    .expect_err("an untrusted certificate is refused");
    assert!(!format!("{err:?}").contains("tls-pass-51"), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Registry details beyond the suite

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
        let failed_index = zcard(&mut con, format!("{prefix}orchestra:status:FAILED")).await;
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

// ---------------------------------------------------------------------------------------------
// The hot path's batching (submit, record) and its events

/// Fetches and claims up to `max` messages of the queue `research` (one fetch_claim).
async fn fetch_claim_research(b: &Backends, max: usize) -> Vec<(Delivery, Option<Claim>)> {
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

fn completed_with(running: &Task, result: Value) -> TaskState {
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
            format!("{prefix}orchestra:status:COMPLETED"),
            format!("{prefix}orchestra:dependents:{}", running[2].1.task_id),
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
        let leases = zcard(&mut raw, format!("{prefix}orchestra:leases")).await;
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

// ---------------------------------------------------------------------------------------------
// Cost per operation (a measurement, not a test: run it by name with --ignored --nocapture)

async fn redis_cpu_seconds(con: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(con)
        .await
        .expect("INFO cpu");
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            matches!(k, "used_cpu_user" | "used_cpu_sys").then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// Microseconds Redis spent in all commands so far, and in scripts (`INFO commandstats`).
async fn redis_command_micros(con: &mut redis::aio::MultiplexedConnection) -> (f64, f64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .expect("INFO commandstats");
    let (mut all, mut scripts) = (0.0, 0.0);
    for line in info.lines() {
        let Some((name, stats)) = line.trim().split_once(':') else {
            continue;
        };
        let usec = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("usec="))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if name.starts_with("cmdstat_eval") {
            scripts += usec;
        } else if name.starts_with("cmdstat_") && name != "cmdstat_info" {
            all += usec;
        }
    }
    (all, scripts)
}

/// Prints, for each operation of a task's life, the Redis CPU time per call and the calls per
/// second with 16 callers at once, on the shared server. Build in release mode for client
/// numbers that mean something: `cargo test --release --features redis,testkit --test redis
/// -- --ignored --nocapture cost_per_operation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints a table"]
async fn cost_per_operation() {
    const N: usize = 20_000;
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("cost");
    let b = open_url(&url, &prefix).await;
    let mut con = raw_connection(&url).await;
    let q = queue("cost");
    let tasks: Vec<Task> = (0..N).map(|i| new_task(json!({"i": i}), 5)).collect();

    phase("create_many (batches of 500)", &mut con, N, || async {
        for chunk in tasks.chunks(500) {
            b.registry.create_many(chunk).await.expect("create_many");
        }
    })
    .await;
    phase("enqueue_many (batches of 500)", &mut con, N, || async {
        for chunk in tasks.chunks(500) {
            let msgs = chunk
                .iter()
                .map(|t| {
                    OutgoingMessage::new(
                        format!("{{\"task_id\":\"{}\"}}", t.task_id).into_bytes(),
                        Priority::DEFAULT,
                    )
                })
                .collect();
            b.bus.enqueue_many(&q, msgs).await.expect("enqueue_many");
        }
    })
    .await;
    let deliveries = Arc::new(Mutex::new(Vec::with_capacity(N)));
    phase("fetch (max 16, 16 callers)", &mut con, N, || {
        let (bus, q, deliveries) = (b.bus.clone(), q.clone(), deliveries.clone());
        each((0..N / 16).collect(), move |_| {
            let (bus, q, deliveries) = (bus.clone(), q.clone(), deliveries.clone());
            async move {
                let got = bus
                    .fetch(
                        &q,
                        FetchOptions {
                            max: 16,
                            wait: Duration::ZERO,
                            lease: Duration::from_secs(60),
                        },
                    )
                    .await
                    .expect("fetch");
                deliveries.lock().extend(got);
            }
        })
    })
    .await;
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.task_id.clone()).collect();
    phase("get", &mut con, N, || {
        let reg = b.registry.clone();
        each(ids.clone(), move |id| {
            let reg = reg.clone();
            async move {
                reg.get(&id).await.expect("get");
            }
        })
    })
    .await;
    let running = Arc::new(Mutex::new(Vec::with_capacity(N)));
    phase("transition PENDING -> RUNNING", &mut con, N, || {
        let (reg, running) = (b.registry.clone(), running.clone());
        each(tasks.clone(), move |t| {
            let (reg, running) = (reg.clone(), running.clone());
            async move {
                let mut s = t.state.clone();
                s.status = TaskStatus::Running;
                s.attempt = 1;
                s.worker_id = Some("w".into());
                s.lease_until = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
                s.updated_at = chrono::Utc::now();
                let claimed = reg
                    .transition(&t.task_id, t.expect(), s)
                    .await
                    .expect("claim");
                running.lock().push(claimed);
            }
        })
    })
    .await;
    phase("publish (an event)", &mut con, N, || {
        let bus = b.bus.clone();
        each((0..N).collect(), move |i: usize| {
            let bus = bus.clone();
            async move {
                bus.publish("events", format!("{{\"n\":{i}}}").as_bytes())
                    .await
                    .expect("publish");
            }
        })
    })
    .await;
    let running = std::mem::take(&mut *running.lock());
    phase("transition RUNNING -> COMPLETED", &mut con, N, || {
        let reg = b.registry.clone();
        each(running, move |t: Task| {
            let reg = reg.clone();
            async move {
                let mut s = t.state.clone();
                s.status = TaskStatus::Completed;
                s.result = Some(json!("ok"));
                s.lease_until = None;
                s.finished_at = Some(chrono::Utc::now());
                s.updated_at = chrono::Utc::now();
                reg.transition(&t.task_id, t.expect(), s)
                    .await
                    .expect("complete");
            }
        })
    })
    .await;
    let deliveries = std::mem::take(&mut *deliveries.lock());
    phase("ack", &mut con, N, || {
        let bus = b.bus.clone();
        each(deliveries, move |d| {
            let bus = bus.clone();
            async move {
                bus.ack(&d).await.expect("ack");
            }
        })
    })
    .await;
    phase("dependents", &mut con, N, || {
        let reg = b.registry.clone();
        each(ids.clone(), move |id| {
            let reg = reg.clone();
            async move {
                reg.dependents(&id).await.expect("dependents");
            }
        })
    })
    .await;
    cleanup_at(&url, &prefix).await;
}

/// Runs `run` (`calls` calls) and prints calls/s and Redis CPU per call.
async fn phase<F, Fut>(
    name: &str,
    con: &mut redis::aio::MultiplexedConnection,
    calls: usize,
    run: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let cpu = redis_cpu_seconds(con).await;
    let (inner, scripts) = redis_command_micros(con).await;
    let start = std::time::Instant::now();
    run().await;
    let wall = start.elapsed().as_secs_f64();
    let cpu = redis_cpu_seconds(con).await - cpu;
    let (inner2, scripts2) = redis_command_micros(con).await;
    // Commands run by scripts are counted both in their own stats and in the script's.
    let per = |x: f64| x / calls as f64;
    println!(
        "{name:<34} {calls:>6} calls  {:>8.0} calls/s  redis {:>6.1} µs/call \
         (scripts {:>5.1}, commands in them {:>5.1})",
        calls as f64 / wall,
        cpu * 1e6 / calls as f64,
        per(scripts2 - scripts),
        per(inner2 - inner),
    );
}
/// Runs `f` over `items`, 16 at a time.
async fn each<T, F, Fut>(items: Vec<T>, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let items = Arc::new(Mutex::new(items));
    let f = Arc::new(f);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (items, f) = (items.clone(), f.clone());
            tokio::spawn(async move {
                loop {
                    let next = items.lock().pop();
                    match next {
                        Some(x) => f(x).await,
                        None => break,
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
}

/// Prints the Redis CPU cost of the fused hot path ([`TaskQueue`] on Redis: one script per
/// step) the way `cost_per_operation` does for the separate calls. A measurement, not a test:
/// `cargo test --release --features redis,testkit --test redis -- --ignored --nocapture
/// cost_per_task_queue_step`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints a table"]
async fn cost_per_task_queue_step() {
    const N: usize = 20_000;
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("cost_tq");
    let b = open_url(&url, &prefix).await;
    let mut con = raw_connection(&url).await;
    let q = queue("research");
    let tasks: Vec<Task> = (0..N).map(|i| new_task(json!({"i": i}), 5)).collect();
    phase("submit (batches of 500)", &mut con, N, || async {
        for chunk in tasks.chunks(500) {
            for r in b.tasks().submit(chunk).await.expect("submit") {
                r.expect("created");
            }
        }
    })
    .await;
    let claimed = Arc::new(Mutex::new(Vec::with_capacity(N)));
    phase("fetch_claim (max 16, 16 callers)", &mut con, N, || {
        let (tq, q, claimed) = (b.tasks().clone(), q.clone(), claimed.clone());
        each((0..N / 16).collect(), move |_| {
            let (tq, q, claimed) = (tq.clone(), q.clone(), claimed.clone());
            async move {
                let spec = ClaimSpec {
                    worker_id: "w".into(),
                    lease: Duration::from_secs(60),
                };
                let options = FetchOptions {
                    max: 16,
                    wait: Duration::ZERO,
                    lease: Duration::from_secs(60),
                };
                for (d, c) in tq
                    .fetch_claim(&q, options, &spec)
                    .await
                    .expect("fetch_claim")
                {
                    match c {
                        Some(Claim::Claimed(t)) => claimed.lock().push((d, t)),
                        other => panic!("expected a claim, got {other:?}"),
                    }
                }
            }
        })
    })
    .await;
    let claimed = std::mem::take(&mut *claimed.lock());
    assert_eq!(claimed.len(), N, "every submitted task is claimed once");
    phase("record COMPLETED + ack", &mut con, N, || {
        let tq = b.tasks().clone();
        each(claimed, move |(d, t): (Delivery, Task)| {
            let tq = tq.clone();
            async move {
                let now = chrono::Utc::now();
                let next = TaskState {
                    status: TaskStatus::Completed,
                    result: Some(json!("ok")),
                    lease_until: None,
                    finished_at: Some(now),
                    updated_at: now,
                    ..t.state.clone()
                };
                tq.record(&d, &t, next, Settle::Ack).await.expect("record");
            }
        })
    })
    .await;
    cleanup_at(&url, &prefix).await;
}

/// Prints how long a message takes from `enqueue` to a consumer already waiting in `fetch`, on
/// an idle queue (the wake-up path: PUBLISH from the enqueue script, the pub/sub connection,
/// one fetch script). A measurement, not a test: run it by name with --ignored --nocapture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints percentiles"]
async fn enqueue_to_waiting_fetch_latency() {
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("latency");
    let b = open_url(&url, &prefix).await;
    let q = queue("latency");
    let mut samples = Vec::new();
    for _ in 0..200 {
        let consumer = {
            let (bus, q) = (b.bus.clone(), q.clone());
            tokio::spawn(async move {
                let opts = FetchOptions {
                    max: 1,
                    wait: Duration::from_secs(10),
                    lease: Duration::from_secs(5),
                };
                let d = bus
                    .fetch(&q, opts)
                    .await
                    .expect("fetch")
                    .pop()
                    .expect("a message");
                let at = std::time::Instant::now();
                bus.ack(&d).await.expect("ack");
                at
            })
        };
        // Let the consumer reach its wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = std::time::Instant::now();
        b.bus
            .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
            .await
            .expect("enqueue");
        let got = consumer.await.expect("consumer");
        samples.push(got.duration_since(sent));
    }
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "enqueue -> waiting fetch: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        pct(50),
        pct(90),
        pct(99),
        samples[samples.len() - 1]
    );
    cleanup_at(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_namespace_deletes_everything_under_the_prefix_and_nothing_else() {
    let url = broker_url(BrokerKind::Redis).await;
    let keys = |p: String| {
        let url = url.clone();
        async move { support::redis_keys(&url, &p).await }
    };
    let make = |p: String| async move { make_backends(&p).await };
    support::check_drop(&url, make, keys, |_| false).await;
    // An empty prefix would mean everything: refused.
    let err = agent_orchestra::connect::drop_namespace(
        &BackendUrls::all(url.clone()),
        &ConnectOptions::default(),
        &[],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("prefix"), "{err}");
}

/// A task a dead worker left RUNNING (its lease over, its message gone), under a fresh prefix.
async fn abandoned_task(b: &Backends, queue: &str) -> TaskId {
    use agent_orchestra::engine::{DispatchOptions, Dispatcher};
    let task = Dispatcher::new(b.clone())
        .build(queue, json!({"n": 1}), 5, &DispatchOptions::default())
        .expect("build");
    b.registry.create(&task).await.expect("create");
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    let running = TaskState {
        status: TaskStatus::Running,
        attempt: 1,
        worker_id: Some("a-worker-that-died".into()),
        lease_until: Some(past),
        heartbeat_at: Some(past),
        started_at: Some(past),
        updated_at: past,
        ..task.state.clone()
    };
    b.registry
        .transition(&task.task_id, task.expect(), running)
        .await
        .expect("to RUNNING");
    task.task_id
}

/// Runs the CLI's worker on `queue` for 4 s under `prefix`, with `extra` flags.
fn run_cli_worker(url: &str, prefix: &str, queue: &str, extra: &[&str]) -> String {
    let spec = format!("{queue}=echo");
    let mut args = vec![
        "--url", url, "--prefix", prefix, "worker", "-q", &spec, "--for", "4s", "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_orchestra"))
        .args(&args)
        .env("ORCHESTRA_MONITOR_INTERVAL", "200ms")
        .output()
        .expect("run orchestra worker");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "orchestra worker failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_worker_with_monitor_recovers_a_task_its_dead_worker_left_running() {
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("cli_monitor");
    let b = make_backends(&prefix).await;

    // Without --monitor nothing brings the task back: it has no message left.
    let stuck = abandoned_task(&b, "rescue").await;
    let (u, p) = (url.clone(), prefix.clone());
    tokio::task::spawn_blocking(move || run_cli_worker(&u, &p, "rescue", &[]))
        .await
        .unwrap();
    let t = b.registry.get(&stuck).await.unwrap().unwrap();
    assert_eq!(t.state.status, TaskStatus::Running, "{t:?}");

    // With --monitor the worker's own monitor hands it back and the worker completes it.
    let (u, p) = (url.clone(), prefix.clone());
    let stdout =
        tokio::task::spawn_blocking(move || run_cli_worker(&u, &p, "rescue", &["--monitor"]))
            .await
            .unwrap();
    let t = b.registry.get(&stuck).await.unwrap().unwrap();
    assert_eq!(t.state.status, TaskStatus::Completed, "{t:?}\n{stdout}");
    assert_eq!(t.state.attempt, 2);
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("\"event\":\"monitor\"") && l.contains("\"recovered\":1")),
        "{stdout}"
    );
    cleanup(&prefix).await;
}

// ---------------------------------------------------------------------------------------------
// The CLI on Redis: what an operator's Ctrl-C, a missed deadline and `monitor --once` leave

/// The `orchestra` binary against the shared test Redis under `prefix`, with `env` set.
fn orchestra(url: &str, prefix: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = support::orchestra_command(&["--url", url, "--prefix", prefix]);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs it to the end: (exit code, stdout, stderr).
fn orchestra_run(url: &str, prefix: &str, args: &[&str]) -> (i32, String, String) {
    let out = orchestra(url, prefix, args, &[])
        .output()
        .expect("the orchestra binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends SIGINT (an operator's Ctrl-C) to `child`, then waits at most a minute for its exit:
/// (exit code, stdout, stderr).
fn interrupt(mut child: Child) -> (i32, String, String) {
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("orchestra did not stop within a minute of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `monitor --once` releases the monitor lock as it exits: a second one right after acts too
/// (before, it was on standby for the lock's TTL, three intervals).
#[test]
fn monitor_once_releases_the_monitor_lock() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_monitor_once");
    for round in 0..2 {
        let (code, stdout, stderr) = orchestra_run(&url, &prefix, &["--json", "monitor", "--once"]);
        assert_eq!(code, 0, "round {round}: {stdout}\n{stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).expect("the report as JSON");
        assert_eq!(report["leader"], true, "round {round}: {report}");
    }
    let left = rt.block_on(support::redis_keys(&url, &prefix));
    // (its fencing counter stays: tokens only grow)
    assert!(
        !left.iter().any(|k| k.ends_with("lock:{monitor}")),
        "the monitor lock is gone: {left:?}"
    );
    rt.block_on(cleanup(&prefix));
}

/// Dispatches a one-minute `sleep` task `id` on queue `slow`, starts a CLI worker for it with
/// `worker.shutdown_timeout` at `shutdown_timeout`, and returns once the task is RUNNING.
fn worker_running_a_slow_task(url: &str, prefix: &str, id: &str, shutdown_timeout: &str) -> Child {
    let (code, out, err) = orchestra_run(
        url,
        prefix,
        &["dispatch", "slow", r#"{"ms": 60000}"#, "--id", id],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let worker = orchestra(
        url,
        prefix,
        &["worker", "-q", "slow=sleep"],
        &[("ORCHESTRA_SHUTDOWN_TIMEOUT", shutdown_timeout)],
    )
    .spawn()
    .expect("the worker starts");
    let started = std::time::Instant::now();
    loop {
        let (_, out, _) = orchestra_run(url, prefix, &["--json", "task", "get", id]);
        if out.contains("\"RUNNING\"") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the task did not start: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    worker
}

/// A worker whose running task outlives `worker.shutdown_timeout` hands it back and exits 1
/// saying so (docs/cli.md), and the task is PENDING again for another worker.
#[test]
fn a_worker_that_misses_its_shutdown_deadline_exits_1() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_deadline");
    let worker = worker_running_a_slow_task(&url, &prefix, "long_one", "1s");
    let (code, stdout, stderr) = interrupt(worker);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("deadline passed"), "{stdout}");
    assert!(
        stderr.contains("the shutdown deadline (1s) passed: 1 running task(s) were handed back"),
        "{stderr}"
    );
    let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "task", "get", "long_one"]);
    assert!(out.contains("\"PENDING\""), "handed back: {out}");
    rt.block_on(cleanup(&prefix));
}

/// Ctrl-C during a bench or the demo stops it, deletes its namespace (as a finished run does)
/// and exits 130; before, everything it had created stayed.
#[test]
fn ctrl_c_during_the_bench_or_the_demo_leaves_nothing_behind() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    for (name, args) in [
        (
            "cli_bench_int",
            &["bench", "-n", "100000", "-c", "4", "--rate", "300"][..],
        ),
        ("cli_demo_int", &["demo"][..]),
    ] {
        let prefix = unique_prefix(name);
        let child = orchestra(&url, &prefix, args, &[])
            .spawn()
            .expect("orchestra starts");
        // Until it has written something under its prefix.
        let started = std::time::Instant::now();
        while rt.block_on(support::redis_keys(&url, &prefix)).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} wrote nothing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let (code, stdout, stderr) = interrupt(child);
        assert_eq!(code, 130, "{name}: {stdout}\n{stderr}");
        assert!(stderr.contains("interrupted"), "{name}: {stderr}");
        let left = rt.block_on(support::redis_keys(&url, &prefix));
        assert!(left.is_empty(), "{name} left {} keys: {left:?}", left.len());
    }
}

/// A redis:// URL naming a port where something else answers is one clear line, not the
/// client's multi-line parser dump.
#[tokio::test]
async fn a_port_that_does_not_speak_redis_is_one_clear_error() {
    let port = support::wrong_protocol_server();
    let url = format!("redis://127.0.0.1:{port}");
    let e = match connect(&BackendUrls::all(&url), &options("t_wrongport_")).await {
        Ok(_) => panic!("connected to a server that is not Redis"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("not the Redis protocol") && !e.contains('\n'),
        "{e}"
    );
}

/// A second Ctrl-C during a graceful shutdown stops the worker at once (exit 130): its running
/// task is left RUNNING, as a crash would leave it, for its lease to hand it on.
#[test]
fn a_second_ctrl_c_stops_the_worker_at_once() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_cold");
    let worker = worker_running_a_slow_task(&url, &prefix, "cold_one", "60s");
    let first = Command::new("kill")
        .args(["-INT", &worker.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(first.success());
    // The graceful shutdown now waits up to 60 s for the task; the second signal ends it.
    std::thread::sleep(Duration::from_millis(1000));
    let asked = std::time::Instant::now();
    let (code, stdout, stderr) = interrupt(worker);
    assert_eq!(code, 130, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("a second signal: stopped at once"),
        "{stderr}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "stopped {:?} after the second signal",
        asked.elapsed()
    );
    let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "task", "get", "cold_one"]);
    assert!(out.contains("\"RUNNING\""), "left for its lease: {out}");
    rt.block_on(cleanup(&prefix));
}

/// bench and demo add `<kind>_<8 hex>_` to the prefix: a prefix too long for that is refused
/// with how long it may be, before anything is created.
#[test]
fn bench_and_demo_say_how_long_the_prefix_may_be() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = format!("t_long_{}", "x".repeat(53));
    for (args, room) in [(&["bench", "-n", "10"][..], 49), (&["demo"][..], 50)] {
        let (code, out, err) = orchestra_run(&url, &prefix, args);
        assert_eq!(code, 2, "{args:?}: {out}\n{err}");
        assert!(
            err.contains(&format!("at most {room} characters here, not 60")),
            "{args:?}: {err}"
        );
    }
    assert!(rt.block_on(support::redis_keys(&url, "t_long_")).is_empty());
}

/// `dispatch --depends-on` a task that was cancelled (or failed) says that the new task failed
/// at once, with exit 1, instead of "dispatched".
#[test]
fn dispatch_after_a_cancelled_dependency_reports_the_failure() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_dep_cancelled");
    let (code, out, err) = orchestra_run(&url, &prefix, &["dispatch", "q", "{}", "--id", "par"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(&url, &prefix, &["cancel", "par"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &["dispatch", "q", "{}", "--id", "kid", "--depends-on", "par"],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("task kid FAILED: dependency par CANCELLED"),
        "{err}"
    );
    assert!(!out.contains("dispatched"), "{out}");
    // A dependency still pending: dispatched as usual.
    let (code, out, err) = orchestra_run(&url, &prefix, &["dispatch", "q", "{}", "--id", "p2"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &["dispatch", "q", "{}", "--id", "k2", "--depends-on", "p2"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("dispatched k2"), "{out}");
    rt.block_on(cleanup(&prefix));
}

/// `drop-namespace` deletes everything under the prefix, only with `--yes`, and nothing of a
/// neighbouring prefix.
#[test]
fn drop_namespace_deletes_the_prefix_only_when_asked() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_drop");
    let neighbour = unique_prefix("cli_drop_keep");
    for p in [&prefix, &neighbour] {
        let (code, out, err) = orchestra_run(&url, p, &["dispatch", "q", "{}"]);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let before = rt.block_on(support::redis_keys(&url, &prefix));
    assert!(!before.is_empty());
    let (code, out, err) = orchestra_run(&url, &prefix, &["drop-namespace"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("add --yes"), "{err}");
    assert_eq!(rt.block_on(support::redis_keys(&url, &prefix)), before);
    let (code, out, err) = orchestra_run(&url, &prefix, &["drop-namespace", "--yes"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("deleted everything under the prefix"), "{out}");
    assert!(rt.block_on(support::redis_keys(&url, &prefix)).is_empty());
    assert!(!rt
        .block_on(support::redis_keys(&url, &neighbour))
        .is_empty());
    // An empty prefix is refused, whatever --yes says.
    let (code, _, err) = orchestra_run(&url, "", &["drop-namespace", "--yes"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --prefix"), "{err}");
    rt.block_on(cleanup(&neighbour));
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

/// Inspecting a namespace (`stats`, `task get`, `tasks list`, `dead-letters`) writes no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_only_read_write_no_key() {
    let url = broker_url(BrokerKind::Redis).await;
    let keys = |p: String| {
        let url = url.clone();
        async move { support::redis_keys(&url, &p).await }
    };
    support::check_read_only_commands(&url, false, keys).await;
}

/// `worker --metrics` and `monitor --metrics` serve Prometheus' text format: the worker's
/// counters, tasks by status and the queue's sizes, read from Redis at each scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_monitor_serve_prometheus_metrics() {
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("metrics");
    let base = ["--url", url.as_str(), "--prefix", prefix.as_str()];
    let mut cmd = support::orchestra_command(&base);
    cmd.args([
        "--json",
        "worker",
        "--queue",
        "mq",
        "--quiet",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (worker, worker_url) = support::start_with_metrics(cmd);
    let mut cmd = support::orchestra_command(&base);
    cmd.args([
        "--json",
        "monitor",
        "--interval",
        "1s",
        "--metrics",
        "127.0.0.1:0",
        "--queue",
        "mq",
    ]);
    let (monitor, monitor_url) = support::start_with_metrics(cmd);
    for i in 0..3 {
        let out = orchestra_run(
            &url,
            &prefix,
            &["dispatch", "mq", &format!("{{\"i\": {i}}}")],
        );
        assert_eq!(out.0, 0, "dispatch: {}", out.2);
    }
    let want = [
        "orchestra_tasks{status=\"COMPLETED\"} 3",
        "orchestra_queue_messages{queue=\"mq\",state=\"waiting\"} 0",
        "orchestra_queue_messages{queue=\"mq\",state=\"in_flight\"} 0",
        "orchestra_registry_up 1",
        "orchestra_bus_up 1",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut w, mut m) = (String::new(), String::new());
    while std::time::Instant::now() < deadline {
        let (status, body) = support::http_get(&worker_url);
        assert_eq!(status, "HTTP/1.1 200 OK");
        w = body;
        m = support::http_get(&monitor_url).1;
        let done = w.lines().any(|l| {
            l.starts_with("orchestra_worker_completed_total{worker=\"") && l.ends_with("} 3")
        });
        if done && want.iter().all(|x| w.contains(x) && m.contains(x)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for x in want {
        assert!(w.contains(x), "worker's metrics lack {x}:\n{w}");
        assert!(m.contains(x), "monitor's metrics lack {x}:\n{m}");
    }
    assert!(
        w.contains("# TYPE orchestra_worker_completed counter"),
        "{w}"
    );
    assert!(
        !m.contains("orchestra_worker_"),
        "the monitor runs no worker:\n{m}"
    );
    let (status, _) = support::http_get(&worker_url.replace("/metrics", "/"));
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert_eq!(support::terminate(worker), Some(0));
    assert_eq!(support::terminate(monitor), Some(0));
    cleanup(&prefix).await;
}

/// `backend_gauges` while Redis is down: `orchestra_registry_up 0` and `orchestra_bus_up 0`
/// (the errors are logged), and no task or queue gauge (no zeros that would read as an empty
/// system); back to 1 once Redis is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gauges_say_when_redis_cannot_be_read() {
    use agent_orchestra::engine::backend_gauges;
    let mut server = OwnRedis::start(|port, dir| plain_args(port, dir, &[])).await;
    let url = format!("redis://127.0.0.1:{}", server.port);
    let b = open_url(&url, "t_gauges_").await;
    let q = QueueName::parse("gq").unwrap();
    let up = backend_gauges(&b, std::slice::from_ref(&q)).await;
    assert!(up.contains("orchestra_registry_up 1"), "{up}");
    assert!(up.contains("orchestra_bus_up 1"), "{up}");
    assert!(up.contains("orchestra_tasks{status=\"PENDING\"} 0"), "{up}");
    server.kill();
    let down = tokio::time::timeout(
        Duration::from_secs(120),
        backend_gauges(&b, std::slice::from_ref(&q)),
    )
    .await
    .expect("the gauges within 2 minutes of Redis going down");
    assert!(down.contains("orchestra_registry_up 0"), "{down}");
    assert!(down.contains("orchestra_bus_up 0"), "{down}");
    assert!(!down.contains("orchestra_tasks{"), "{down}");
    assert!(!down.contains("orchestra_queue_messages{"), "{down}");
    server.spawn().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let again = backend_gauges(&b, std::slice::from_ref(&q)).await;
        if again.contains("orchestra_registry_up 1") && again.contains("orchestra_bus_up 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still down a minute after Redis came back: {again}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
