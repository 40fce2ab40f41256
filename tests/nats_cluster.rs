//! The NATS backend on a 3-node JetStream cluster with every stream and bucket replicated 3
//! times: the conformance and engine suites, the replica count following the URL, and (with a
//! cluster of its own) the loss of a stream leader.
//!
//! The shared cluster comes from `ORCHESTRA_TEST_NATS_CLUSTER_URL`, else three local
//! `nats-server` nodes this binary starts once (see
//! `agent_orchestra::testkit::nats_cluster`).

use std::time::Duration;

use agent_orchestra::testkit::harness::unique_prefix;
use agent_orchestra::testkit::nats_cluster::cluster_url;
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions};
use async_nats::jetstream;
use futures::TryStreamExt;

mod support;

/// `url` with one more query parameter.
fn with_query(url: &str, q: &str) -> String {
    match url.contains('?') {
        true => format!("{url}&{q}"),
        false => format!("{url}?{q}"),
    }
}

fn opts(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        connect_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

/// A plain client of the cluster at `url` (its seed list, without the query).
async fn connect_plain(url: &str) -> async_nats::Client {
    let servers: Vec<String> = url
        .trim_start_matches("nats://")
        .split('?')
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    async_nats::connect(servers).await.expect("connect")
}

/// The replica count the suites run with: 3, unless the cluster's servers predate nats-server
/// 2.9.21. Before that release a clustered stream checks `Nats-Expected-Last-Subject-Sequence`
/// only before proposing a write, so concurrent compare-and-set writes can all be accepted
/// (nats-server issue 4320): seen here on 2.9.10 as 15 winners of one claim. The backend
/// refuses replicas above 1 on such a server, so the suites run with 1 replica there, and say
/// so; under CI (`CI` set) an old server is an error instead: `.ci/nats-server` installs a
/// newer one for the clusters (`ORCHESTRA_TEST_NATS_SERVER`).
async fn suite_replicas() -> usize {
    static REPLICAS: tokio::sync::OnceCell<usize> = tokio::sync::OnceCell::const_new();
    *REPLICAS
        .get_or_init(|| async {
            let url = cluster_url().await;
            let client = connect_plain(&url).await;
            let version = client.server_info().version;
            let parts: Vec<u64> = version
                .trim_start_matches('v')
                .split(['.', '-'])
                .take(3)
                .map(|p| p.parse().unwrap_or(0))
                .collect();
            if parts.as_slice() >= [2, 9, 21].as_slice() {
                return 3;
            }
            let why = format!(
                "nats-server {version} accepts concurrent compare-and-set writes on a replicated stream \
                 (nats-server issue 4320, fixed in 2.9.21)"
            );
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("{why}: CI must run the NATS clusters on a newer server (.ci/nats-server)");
            }
            eprintln!("{why}: the suites run with replicas=1 (run .ci/nats-server for a newer one)");
            1
        })
        .await
}

async fn make_backends(prefix: &str) -> Backends {
    let replicas = suite_replicas().await;
    let url = with_query(&cluster_url().await, &format!("replicas={replicas}"));
    connect(&BackendUrls::all(url), &opts(prefix))
        .await
        .expect("connect to the test NATS cluster")
}

async fn cleanup(prefix: &str) {
    support::nats_at(&cluster_url().await, prefix).await;
}

agent_orchestra::conformance_suite!(make_backends, cleanup);
agent_orchestra::engine_suite!(make_backends, cleanup);

/// The streams of the prefix on the cluster at `url`, with their replica counts.
async fn replicas_of(url: &str, prefix: &str) -> Vec<(String, usize)> {
    let client = connect_plain(url).await;
    let js = jetstream::new(client);
    let names: Vec<String> = js.stream_names().try_collect().await.expect("list streams");
    let mut out = Vec::new();
    for name in names {
        if name.starts_with(prefix) || name.starts_with(&format!("KV_{prefix}")) {
            let mut s = js.get_stream(&name).await.expect("stream");
            let info = s.info().await.expect("stream info");
            out.push((name, info.config.num_replicas));
        }
    }
    out.sort();
    out
}

/// Every stream and bucket the backend makes (work, dead letters, blobs, tasks, dependents,
/// locks) takes the URL's replica count; reopened with another count, the existing ones are
/// changed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_and_bucket_takes_the_replica_count_of_the_url() {
    use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
    use agent_orchestra::{Priority, QueueName};
    let url = cluster_url().await;
    let prefix = unique_prefix("replicas_follow");
    let q = QueueName::parse("work").unwrap();
    let touch_everything = |b: Backends| {
        let q = q.clone();
        async move {
            b.bus
                .enqueue(
                    &q,
                    OutgoingMessage {
                        // Larger than a message: the payload goes to the blob stream.
                        payload: vec![b'x'; 2 * 1024 * 1024],
                        priority: Priority::default(),
                        delay: Duration::ZERO,
                    },
                )
                .await
                .expect("enqueue a large message");
            // Dead-lettered: the dead-letter stream is created on first use.
            let got = b
                .bus
                .fetch(
                    &q,
                    FetchOptions {
                        max: 1,
                        wait: Duration::from_secs(5),
                        lease: Duration::from_secs(30),
                    },
                )
                .await
                .expect("fetch");
            for d in &got {
                b.bus.dead_letter(d, "test").await.expect("dead letter");
            }
            b.locks
                .acquire("k", "me", Duration::from_secs(5))
                .await
                .expect("lock");
        }
    };
    let counts: &[usize] = match suite_replicas().await {
        1 => {
            // A server with the compare-and-set race: replicas above 1 are refused, saying why.
            let refused = connect(
                &BackendUrls::all(with_query(&url, "replicas=3")),
                &opts(&prefix),
            )
            .await
            .expect_err("replicas=3 on a server with the CAS race");
            assert!(refused.to_string().contains("2.9.21"), "{refused}");
            &[1]
        }
        _ => &[3, 1, 3],
    };
    for &replicas in counts {
        let b = connect(
            &BackendUrls::all(with_query(&url, &format!("replicas={replicas}"))),
            &opts(&prefix),
        )
        .await
        .unwrap_or_else(|e| panic!("open with replicas={replicas}: {e}"));
        touch_everything(b).await;
        let found = replicas_of(&url, &prefix).await;
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        for kind in [
            "ORCH_Q_work",
            "ORCH_DLQ_work",
            "ORCH_BLOBS",
            "orch_tasks",
            "orch_tasks_deps",
            "orch_locks",
        ] {
            assert!(
                names.iter().any(|n| n.ends_with(kind)),
                "no stream for {kind} in {names:?}"
            );
        }
        assert!(
            found.iter().all(|(_, r)| *r == replicas),
            "replicas={replicas}: {found:?}"
        );
    }
    cleanup(&prefix).await;
}

/// Several seed servers in one URL (`nats://a:4222,b:4222`): one of them down is not an
/// error, the client connects through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_several_seeds_connects_while_one_is_down() {
    let url = cluster_url().await;
    let dead = agent_orchestra::testkit::brokers::free_port();
    let first = url.trim_start_matches("nats://");
    let seeds = format!("nats://127.0.0.1:{dead},{first}");
    let prefix = unique_prefix("seeds");
    let b = connect(&BackendUrls::all(&seeds), &opts(&prefix))
        .await
        .unwrap_or_else(|e| panic!("connect through {seeds}: {e}"));
    assert_eq!(b.registry.counts().await.expect("counts").total(), 0);
    cleanup(&prefix).await;
}

/// Node loss: a producer dispatching one task after another and a worker running them while
/// the leader of the queue's stream, then the leader of the task bucket, is killed with SIGKILL
/// and started again. No dispatch fails (the backend retries within its budget), every
/// dispatch that returned an id is COMPLETED, and nothing is dead-lettered (a claim never took
/// a read that raced an election for "the task is not in the registry").
///
/// A cluster of its own: the suites' shared one must keep its nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_stream_leaders_fails_no_caller_and_loses_no_task() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use agent_orchestra::engine::{
        handler_fn, DispatchOptions, Dispatcher, TaskContext, TaskError, Worker, WorkerConfig,
    };
    use agent_orchestra::testkit::nats_cluster::NatsCluster;
    use agent_orchestra::{QueueName, TaskStatus};
    use parking_lot::Mutex;

    /// Longest the test waits for progress, or for a task to finish.
    const LIMIT: Duration = Duration::from_secs(120);

    if suite_replicas().await == 1 {
        eprintln!("SKIPPED: node loss needs replicas=3, refused on this nats-server (.ci/nats-server installs a newer one)");
        return;
    }
    let mut cluster = NatsCluster::start(3).await;
    let url = with_query(&cluster.url(), "replicas=3");
    let prefix = unique_prefix("node_loss");
    let b = connect(&BackendUrls::all(&url), &opts(&prefix))
        .await
        .expect("connect to the cluster");
    let worker = Worker::new(
        b.clone(),
        WorkerConfig {
            worker_id: "node-loss".into(),
            concurrency: 4,
            lease: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(200),
            backend_retry_budget: Duration::from_secs(60),
            ..WorkerConfig::default()
        },
    )
    .handle(
        "work",
        handler_fn(|ctx: TaskContext| async move { Ok::<_, TaskError>(ctx.task.payload) }),
    )
    .expect("handler")
    .start()
    .expect("worker starts");

    let dispatched = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let d = Dispatcher::new(b.clone());
        let (dispatched, failures, stop) = (dispatched.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let started = std::time::Instant::now();
                match d
                    .dispatch(
                        "work",
                        serde_json::json!({ "n": n }),
                        5,
                        DispatchOptions::default(),
                    )
                    .await
                {
                    Ok(id) => dispatched.lock().push(id),
                    Err(e) => failures.lock().push(format!(
                        "dispatch {n} failed after {:?}: {e}",
                        started.elapsed()
                    )),
                }
            }
        })
    };
    let progress = |more: usize, what: &'static str| {
        let dispatched = dispatched.clone();
        async move {
            let target = dispatched.lock().len() + more;
            tokio::time::timeout(LIMIT, async {
                while dispatched.lock().len() < target {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {more} more dispatches within {LIMIT:?} {what}"));
        }
    };

    progress(20, "before any node was killed").await;
    let work_stream = format!("{prefix}ORCH_Q_work");
    let task_stream = format!("KV_{prefix}orch_tasks");
    for stream in [&work_stream, &task_stream] {
        let leader = cluster
            .leader_of(stream)
            .await
            .unwrap_or_else(|| panic!("no leader found for {stream}"));
        cluster.kill(leader);
        progress(20, "while a stream leader was down").await;
        cluster.restart(leader).await;
        cluster.wait_ready().await;
        progress(20, "after the node came back").await;
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.expect("producer");

    let failures = failures.lock().clone();
    assert!(failures.is_empty(), "callers got errors: {failures:#?}");
    let d = Dispatcher::new(b.clone());
    let ids = dispatched.lock().clone();
    for id in &ids {
        let t = d
            .wait(id, LIMIT)
            .await
            .unwrap_or_else(|e| panic!("task {id} did not finish: {e}"));
        assert_eq!(
            t.status(),
            TaskStatus::Completed,
            "task {id}: {:?}",
            t.state.error
        );
    }
    let q = QueueName::parse("work").unwrap();
    let dead = b.bus.dead_letters(&q, 100).await.expect("dead letters");
    assert!(dead.is_empty(), "dead letters: {dead:#?}");
    worker.shutdown().await;
    drop(b);
    drop(cluster);
}
