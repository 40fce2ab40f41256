//! The Redis backend on a Redis Cluster: the conformance and engine suites, a plain `redis://`
//! URL that reaches a cluster node, a failover under load, and the CLI (`demo`,
//! `drop-namespace` on every shard).
//!
//! The cluster is `ORCHESTRA_TEST_REDIS_CLUSTER_URL` when set, else six local `redis-server`
//! nodes started once for this test binary (`testkit::redis_cluster`); the failover test starts
//! a cluster of its own, since it kills a master. Every test works under its own prefix and
//! deletes its keys with `drop_namespace` (SCAN on every master + UNLINK).
//!
//! Run: `cargo test --features full --test redis_cluster`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_orchestra::engine::{DispatchOptions, Dispatcher};
use agent_orchestra::testkit::harness::unique_prefix;
use agent_orchestra::testkit::redis_cluster::{cli, shared_cluster_url, RedisCluster};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions, Error, TaskStatus};

#[path = "support/mod.rs"]
mod support;

fn options(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    }
}

async fn open_url(url: &str, prefix: &str) -> Backends {
    connect(&BackendUrls::all(url), &options(prefix))
        .await
        .unwrap_or_else(|e| panic!("connect to the test cluster {url}: {e}"))
}

async fn cluster_url() -> String {
    tokio::task::spawn_blocking(shared_cluster_url)
        .await
        .expect("start the test cluster")
}

/// Opens the three roles on the shared test cluster under `prefix`.
async fn make_backends(prefix: &str) -> Backends {
    open_url(&cluster_url().await, prefix).await
}

/// Deletes every key under `prefix` on every master of the cluster.
async fn cleanup(prefix: &str) {
    support::drop_at(&cluster_url().await, prefix).await;
}

agent_orchestra::conformance_suite!(make_backends, cleanup);

mod engine {
    use super::{cleanup, make_backends};
    agent_orchestra::engine_suite!(make_backends, cleanup);
}

/// The ports of the cluster's masters, from the first seed of `url`.
fn master_ports(url: &str) -> Vec<u16> {
    let seed = url
        .trim_start_matches("redis+cluster://")
        .split([',', '/', '?'])
        .next()
        .expect("a seed");
    let port: u16 = seed
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("a seed port");
    let nodes = cli(port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
    nodes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2].contains("master") && !f[2].contains("fail"))
                .then(|| f[1].split('@').next()?.rsplit_once(':')?.1.parse().ok())
                .flatten()
        })
        .collect()
}

/// Every key under `prefix` on every master, sorted.
fn cluster_keys(url: &str, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for port in master_ports(url) {
        let listed =
            cli(port, &["--scan", "--pattern", &format!("{prefix}*")]).expect("redis-cli --scan");
        out.extend(
            listed
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_redis_url_to_a_cluster_node_names_the_cluster_form() {
    let url = cluster_url().await;
    let port = master_ports(&url)[0];
    let err = connect(
        &BackendUrls::all(format!("redis://127.0.0.1:{port}")),
        &options(&unique_prefix("plain_url")),
    )
    .await
    .unwrap_err();
    match &err {
        Error::UnsupportedUrl { reason, .. } => {
            assert!(reason.contains("redis+cluster://"), "{reason}")
        }
        other => panic!("expected UnsupportedUrl, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_different_queues_spread_over_the_masters() {
    let url = cluster_url().await;
    let prefix = unique_prefix("spread");
    let b = open_url(&url, &prefix).await;
    let d = Dispatcher::new(b.clone());
    for i in 0..16 {
        d.dispatch(
            &format!("q{i}"),
            serde_json::json!({ "i": i }),
            5,
            DispatchOptions::default(),
        )
        .await
        .expect("dispatch");
    }
    let holding: Vec<usize> = master_ports(&url)
        .into_iter()
        .map(|port| {
            cli(port, &["--scan", "--pattern", &format!("{prefix}q:*")])
                .unwrap_or_default()
                .lines()
                .count()
        })
        .collect();
    assert!(
        holding.iter().filter(|n| **n > 0).count() >= 2,
        "sixteen queues' keys on one master: {holding:?}"
    );
    let counts = b.registry.counts().await.expect("counts");
    assert_eq!(counts.get(TaskStatus::Pending), 16, "{counts:?}");
    drop(b);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_namespace_cleans_every_shard_and_nothing_else() {
    let url = cluster_url().await;
    let keys = |p: String| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || cluster_keys(&url, &p))
                .await
                .expect("list keys")
        }
    };
    let make = |p: String| {
        let url = url.clone();
        async move { open_url(&url, &p).await }
    };
    let had = support::check_drop(&url, make, keys, |_| false).await;
    assert!(
        had.iter().any(|k| k.contains(":task:")),
        "the drop test wrote no task hash: {had:?}"
    );
}

#[test]
fn cli_demo_and_drop_namespace_work_on_the_cluster() {
    let url = shared_cluster_url();
    let prefix = unique_prefix("cli_demo");
    let out = support::orchestra_command(&["--url", &url, "--prefix", &prefix, "demo"])
        .output()
        .expect("run orchestra demo");
    assert!(
        out.status.success(),
        "orchestra demo failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Tasks on several queues (so on several masters), one depending on another queue's.
    let mut first = String::new();
    for q in ["alpha", "beta", "gamma", "delta"] {
        let mut args = vec![
            "--url",
            &url,
            "--prefix",
            &prefix,
            "dispatch",
            q,
            "{\"n\": 1}",
        ];
        if !first.is_empty() {
            args.extend(["--depends-on", first.as_str()]);
        }
        let out = support::orchestra_command(&args)
            .output()
            .expect("run orchestra dispatch");
        assert!(
            out.status.success(),
            "orchestra dispatch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if first.is_empty() {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            first = text
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .find(|w| w.starts_with("task_"))
                .unwrap_or_else(|| panic!("no task id in {text:?}"))
                .to_string();
        }
    }
    let before = cluster_keys(&url, &prefix);
    assert!(
        master_ports(&url)
            .into_iter()
            .filter(
                |port| cli(*port, &["--scan", "--pattern", &format!("{prefix}*")])
                    .is_some_and(|l| !l.trim().is_empty())
            )
            .count()
            >= 2,
        "the dispatched tasks landed on one master: {before:?}"
    );
    let out = support::orchestra_command(&[
        "--url",
        &url,
        "--prefix",
        &prefix,
        "drop-namespace",
        "--yes",
    ])
    .output()
    .expect("run orchestra drop-namespace");
    assert!(
        out.status.success(),
        "orchestra drop-namespace failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster_keys(&url, &prefix), Vec::<String>::new());
}

/// A worker consumes and a producer dispatches while the master that owns the queue's slot is
/// killed (SIGKILL); its replica is promoted, and both carry on by themselves. Every dispatch
/// that returned Ok ends COMPLETED: the URL asks each dispatch to wait for one replica
/// (`wait_replicas=1`), so an acknowledged task is on the replica that gets promoted.
#[test]
fn failover_loses_no_acknowledged_dispatch() {
    let mut cluster = RedisCluster::start();
    let url = format!("{}?wait_replicas=1", cluster.url());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = unique_prefix("failover");
    let queue = "fo";
    let victim = cluster.master_of(&format!("{{{queue}}}"));
    // Dispatches acknowledged so far, read while the producer runs.
    let acked = Arc::new(AtomicUsize::new(0));
    let (b, stop, producer, worker) = rt.block_on(async {
        let b = open_url(&url, &prefix).await;
        let stop = Arc::new(AtomicBool::new(false));
        let worker = agent_orchestra::engine::Worker::new(
            b.clone(),
            agent_orchestra::engine::WorkerConfig {
                worker_id: "failover-worker".into(),
                concurrency: 4,
                lease: Duration::from_secs(3),
                fetch_wait: Duration::from_millis(500),
                backend_retry_budget: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .handle(
            queue,
            agent_orchestra::engine::handler_fn(
                |ctx: agent_orchestra::engine::TaskContext| async move {
                    Ok::<_, agent_orchestra::engine::TaskError>(ctx.task.payload)
                },
            ),
        )
        .expect("handler")
        .start()
        .expect("start the worker");
        let producer = {
            let d = Dispatcher::new(b.clone());
            let stop = stop.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (Vec::new(), Vec::new());
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match d
                        .dispatch(
                            queue,
                            serde_json::json!({ "i": i }),
                            5,
                            DispatchOptions::default(),
                        )
                        .await
                    {
                        Ok(id) => {
                            ok.push(id);
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (ok, failed)
            })
        };
        (b, stop, producer, worker)
    });
    std::thread::sleep(Duration::from_secs(2));
    cluster.nodes[victim].kill();
    // The replica is promoted within a few node timeouts.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cluster
        .serving(&format!("{{{queue}}}"))
        .is_none_or(|m| m == victim)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no replica was promoted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The dead node comes back as the new master's replica, so that `WAIT 1` is answered again
    // (until then dispatches to this queue fail: no replica would have them).
    cluster.nodes[victim].restart();
    cluster.wait_until_ok(deadline);
    // The producer carries on by itself: more dispatches are acknowledged after the failover
    // (counted, not timed: the machine's speed decides how many).
    let before = acked.load(Ordering::Relaxed);
    let carry_on = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < before + 20 {
        assert!(
            std::time::Instant::now() < carry_on,
            "the producer did not carry on after the failover: {} acknowledged before, {} now",
            before,
            acked.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        let (ok, failed) = producer.await.expect("producer");
        assert!(
            ok.len() >= before + 20,
            "too few dispatches: {} ok, {} failed: {:?}",
            ok.len(),
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        // Every acknowledged task completes (the worker carries on by itself).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut left = Vec::new();
            for id in &ok {
                let t = b.registry.get(id).await.ok().flatten();
                if t.as_ref().map(|t| t.state.status) != Some(TaskStatus::Completed) {
                    left.push((id.clone(), t.map(|t| t.state.status)));
                }
            }
            if left.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} acknowledged tasks did not complete: {:?}",
                left.len(),
                ok.len(),
                &left[..left.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "failover: {} dispatches acknowledged and completed, {} refused during the failover: {:?}",
            ok.len(),
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        worker.shutdown().await;
    });
    drop(rt);
    drop(cluster);
}
