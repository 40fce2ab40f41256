//! The conformance and engine suites on Redis, plus what only the Redis backend promises, one
//! module a theme: the lab's Python `TaskRegistry` reads our tasks and we read its tasks
//! ([`lab_interop`]), keys written by hand or by an older version ([`stored_layout`]), stale
//! receipts ([`receipts`]), a restart of Redis ([`restarts`]), TLS, ACL users and ports that are
//! no Redis ([`connection`]), registry details ([`registry`]), the hot path's batching and events
//! ([`hot_path`]) and the CLI on Redis ([`cli`]).
//!
//! The shared server comes from `ORCHESTRA_TEST_REDIS_URL`, else testcontainers, else
//! 127.0.0.1:6379 (see `agent_orchestra::testkit::harness`). Every test works under its own key
//! prefix and deletes its keys with SCAN (never FLUSHALL). Tests that restart Redis, or need TLS
//! or ACLs, start their own `redis-server` on a free port.
//!
//! Run: `cargo test --features redis,testkit --test redis`. The interop tests need Python 3
//! with `redis` and `pydantic`: `python3 -m pip install -r tests/python/requirements.txt`.
//! The cost measurements are a benchmark: `cargo bench --features redis,testkit --bench
//! redis_costs`.

use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, BackendUrls, Backends, ConnectOptions, Limits, Priority, QueueName, Task, TaskId,
    TaskState, TaskStatus,
};
use serde_json::{json, Value};

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod connection;
mod hot_path;
mod lab_interop;
mod receipts;
mod registry;
mod restarts;
mod stored_layout;

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

use crate::support::redis_at as cleanup_at;

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
