//! What each Redis operation costs: Redis CPU per call, calls per second with 16 callers, and
//! the latency from `enqueue` to a consumer already waiting in `fetch`. Measurements that print
//! tables, not tests: nothing here asserts a speed.
//!
//! Run all three, or those whose name contains NAME, on the Redis of `ORCHESTRA_TEST_REDIS_URL`
//! (else testcontainers, else 127.0.0.1:6379; see `agent_orchestra::testkit::harness`):
//!
//! ```text
//! cargo bench --features redis,testkit --bench redis_costs [-- NAME]
//! ```
//!
//! `cargo bench` builds in release mode, so the client's numbers mean something. Each
//! measurement works under its own prefix and deletes it afterwards (never FLUSHALL). Run them one
//! at a time on a machine that is otherwise idle for numbers worth writing down.

use std::sync::Arc;
use std::time::Duration;

use agent_orchestra::bus::{Delivery, FetchOptions, OutgoingMessage};
use agent_orchestra::task_queue::{Claim, ClaimSpec, Settle};
use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, BackendUrls, Backends, ConnectOptions, Limits, Priority, QueueName, Task, TaskId,
    TaskState, TaskStatus,
};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// The measurements, by name.
const MEASUREMENTS: &[&str] = &[
    "cost_per_operation",
    "cost_per_task_queue_step",
    "enqueue_to_waiting_fetch_latency",
];

fn main() {
    // `cargo bench` passes `--bench`; other flags are ignored too. A bare word picks the
    // measurements whose name contains it.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let chosen: Vec<&str> = MEASUREMENTS
        .iter()
        .copied()
        .filter(|m| filters.is_empty() || filters.iter().any(|f| m.contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        eprintln!("no measurement matches {filters:?}; there are: {MEASUREMENTS:?}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the Tokio runtime");
    for name in chosen {
        println!("== {name}");
        runtime.block_on(async {
            match name {
                "cost_per_operation" => cost_per_operation().await,
                "cost_per_task_queue_step" => cost_per_task_queue_step().await,
                "enqueue_to_waiting_fetch_latency" => enqueue_to_waiting_fetch_latency().await,
                other => unreachable!("{other} is listed in MEASUREMENTS"),
            }
        });
    }
}

async fn open_url(url: &str, prefix: &str) -> Backends {
    let opts = ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    };
    connect(&BackendUrls::all(url), &opts)
        .await
        .unwrap_or_else(|e| panic!("connect to Redis: {e}"))
}

/// Deletes everything under `prefix` (SCAN + UNLINK; never FLUSHALL).
async fn drop_namespace(url: &str, prefix: &str) {
    let opts = ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    };
    agent_orchestra::connect::drop_namespace(&BackendUrls::all(url), &opts, &[])
        .await
        .unwrap_or_else(|e| panic!("cannot drop the namespace {prefix}: {e}"));
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to Redis")
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
/// second with 16 callers at once.
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
    drop_namespace(&url, &prefix).await;
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

/// Prints the Redis CPU cost of the fused hot path (`TaskQueue` on Redis: one script per step)
/// the way `cost_per_operation` does for the separate calls.
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
    drop_namespace(&url, &prefix).await;
}

/// Prints how long a message takes from `enqueue` to a consumer already waiting in `fetch`, on
/// an idle queue (the wake-up path: PUBLISH from the enqueue script, the pub/sub connection,
/// one fetch script).
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
    drop_namespace(&url, &prefix).await;
}
