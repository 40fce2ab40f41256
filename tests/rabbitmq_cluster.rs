//! The RabbitMQ backend on a 3-node cluster with quorum queues: the conformance and engine
//! suites, and a node killed (SIGKILL) while a producer and two workers run.
//!
//! The cluster is `ORCHESTRA_TEST_AMQP_CLUSTER_URL` (every node in the URL:
//! `amqp://u:p@h1:5672,h2:5672,h3:5672/vhost`) or three local nodes that the harness boots from
//! the installed RabbitMQ (`agent_orchestra::testkit::rabbitmq_cluster`), once for this binary.
//! The node-loss test boots a cluster of its own (it kills one of its nodes, which would disturb
//! the suite tests running beside it), stopped when the test ends.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_orchestra::bundle::Roles;
use agent_orchestra::bus::{Bus, FetchOptions, OutgoingMessage};
use agent_orchestra::testkit::harness::unique_prefix;
use agent_orchestra::testkit::rabbitmq_cluster::{cluster_url, with_quorum, RabbitCluster};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions, Priority, QueueName};

fn options(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    }
}

async fn url() -> String {
    tokio::task::spawn_blocking(cluster_url)
        .await
        .expect("cluster boot task")
}

async fn make_backends(prefix: &str) -> Backends {
    connect(&BackendUrls::all(url().await), &options(prefix))
        .await
        .expect("connect to the test RabbitMQ cluster")
}

/// Deletes what a test created under `prefix`: every queue a node lists when the cluster is
/// the harness's (else the queues whose names are known without listing), and the events
/// exchange.
async fn cleanup(prefix: &str) {
    let prefix_owned = prefix.to_string();
    tokio::task::spawn_blocking(move || clean_blocking(&prefix_owned))
        .await
        .expect("cleanup task");
}

fn clean_blocking(prefix: &str) {
    use lapin::{Connection, ConnectionProperties};
    let external = std::env::var("ORCHESTRA_TEST_AMQP_CLUSTER_URL").is_ok_and(|u| !u.is_empty());
    let mut names: Vec<String> = Vec::new();
    let mut node_urls = Vec::new();
    if !external {
        let cluster = RabbitCluster::shared();
        let listed = cluster.ctl(0, &["list_queues", "-q", "--no-table-headers", "name"]);
        names.extend(
            listed
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with(prefix))
                .map(str::to_string),
        );
        node_urls = cluster
            .ports()
            .iter()
            .map(|p| format!("amqp://guest:guest@127.0.0.1:{p}/%2f"))
            .collect();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cleanup runtime");
    rt.block_on(async {
        if external {
            // Only the library knows how to reach a node of a multi-host URL.
            let queues: Vec<QueueName> = Vec::new();
            let url = url().await;
            agent_orchestra::connect::drop_namespace(
                &BackendUrls::all(url),
                &options(prefix),
                &queues,
            )
            .await
            .unwrap_or_else(|e| panic!("cannot drop the namespace {prefix}: {e}"));
            return;
        }
        let mut conn = None;
        for u in &node_urls {
            if let Ok(c) = Connection::connect(u, ConnectionProperties::default()).await {
                conn = Some(c);
                break;
            }
        }
        let conn = conn.expect("a cleanup connection to some node of the cluster");
        support::rabbitmq_delete(conn, prefix, names).await;
    });
}

agent_orchestra::conformance_suite!(make_backends, cleanup);

mod engine {
    use super::{cleanup, make_backends};
    agent_orchestra::engine_suite!(make_backends, cleanup);
}

/// Retries `call` on any error every 100 ms for at most `limit` (a client riding out a node
/// loss does the same).
async fn retry<T, F, Fut>(limit: Duration, what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = agent_orchestra::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what} kept failing for {limit:?}: {e}"),
        }
    }
}

async fn bus_at(url: &str, prefix: &str) -> Arc<dyn Bus> {
    let roles = Roles {
        bus: true,
        ..Roles::default()
    };
    agent_orchestra::connect::open(url, &roles, &options(prefix))
        .await
        .expect("open a bus on the cluster")
        .bus
        .expect("a bus")
}

/// The node (index) that hosts most of this prefix's connections, from `list_connections`
/// (a connection's pid names its node; the connection's name carries the prefix).
fn busiest_node(cluster: &RabbitCluster, prefix: &str) -> usize {
    let names = cluster.node_names();
    let listed = cluster.ctl(
        0,
        &[
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ],
    );
    let mut per_node = vec![0usize; names.len()];
    for line in listed.lines().filter(|l| l.contains(prefix)) {
        if let Some(i) = names.iter().position(|n| line.contains(&format!("<{n}."))) {
            per_node[i] += 1;
        }
    }
    eprintln!("connections of {prefix} per node: {per_node:?}");
    assert!(
        per_node.iter().sum::<usize>() > 0,
        "no connection of {prefix} found: {listed}"
    );
    (0..names.len())
        .max_by_key(|&i| per_node[i])
        .expect("nodes")
}

const MESSAGES: u64 = 1500;

/// SIGKILL to the node most of the clients are connected to while a producer enqueues and two
/// workers fetch and ack: every enqueue the broker confirmed is delivered (duplicates are
/// allowed: a confirm or an ack lost with the node), the clients carry on on the surviving
/// nodes without being told, and strict priority holds afterwards.
///
/// Ignored by default. Before publisher channels were reopened after a nack, three of six runs
/// failed (2 of 1,500 confirmed messages not delivered 120 s after the kill; publishes nacked for
/// over 120 s; a hang past the 7 minutes). Since that fix and the 15 s bound on every broker
/// round trip, six runs by hand passed, but the first run inside a full CI run (2026-12-07, on
/// the loaded 2-core machine) failed again. Run it with `--ignored`; docs/backends/rabbitmq.md
/// has the details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "passed 6 runs by hand, failed inside a full CI run; see the doc comment"]
async fn a_killed_node_loses_nothing_acknowledged_and_clients_move_on() {
    // Bounded as a whole: booting its cluster, the run, stopping the cluster.
    tokio::time::timeout(Duration::from_secs(420), node_loss())
        .await
        .expect("the node-loss test finishes within 7 minutes");
}

async fn node_loss() {
    // A cluster of its own, stopped (by PID) when dropped, also when the test fails.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(RabbitCluster::boot)
            .await
            .expect("cluster boot"),
    );
    let url = with_quorum(&cluster.url());
    let prefix = unique_prefix("node_loss");
    let queue = QueueName::parse("nl").expect("queue");
    let producer = bus_at(&url, &prefix).await;
    let workers = [bus_at(&url, &prefix).await, bus_at(&url, &prefix).await];
    let limit = Duration::from_secs(120);

    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let received: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let produced = tokio::sync::watch::channel(0u64);
    let produce = {
        let (bus, q, acked, tx) = (producer.clone(), queue.clone(), acked.clone(), produced.0);
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let m = || OutgoingMessage {
                    payload: n.to_string().into_bytes(),
                    priority: Priority::DEFAULT,
                    delay: Duration::ZERO,
                };
                let started = std::time::Instant::now();
                retry(limit, "enqueue", || bus.enqueue(&q, m())).await;
                let took = started.elapsed();
                if took > Duration::from_millis(500) {
                    eprintln!("enqueue {n} took {took:.1?} (retries included)");
                }
                acked.lock().unwrap().insert(n);
                let _ = tx.send(n + 1);
            }
        })
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut consumers = Vec::new();
    for bus in &workers {
        let (bus, q, received, done) = (bus.clone(), queue.clone(), received.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let opts = FetchOptions {
                    max: 10,
                    wait: Duration::from_millis(500),
                    lease: Duration::from_secs(30),
                };
                let got = match bus.fetch(&q, opts).await {
                    Ok(got) => got,
                    Err(e) => {
                        eprintln!("worker fetch: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                for d in got {
                    let n: u64 = String::from_utf8_lossy(&d.payload)
                        .parse()
                        .expect("payload");
                    if let Err(e) = bus.ack(&d).await {
                        eprintln!("worker ack: {e} (the message comes back)");
                        continue;
                    }
                    received.lock().unwrap().insert(n);
                }
            }
        }));
    }

    // Kill a node once a third has been produced.
    let mut progress = produced.1.clone();
    progress
        .wait_for(|&n| n >= MESSAGES / 3)
        .await
        .expect("producer alive");
    let victim = {
        let c = cluster.clone();
        let p = prefix.clone();
        tokio::task::spawn_blocking(move || busiest_node(&c, &p))
            .await
            .expect("list connections")
    };
    eprintln!(
        "killing node {} ({})",
        victim + 1,
        cluster.node_names()[victim]
    );
    cluster.kill_node(victim);
    let killed_at = std::time::Instant::now();
    let at_kill = *produced.1.borrow();

    tokio::time::timeout(Duration::from_secs(120), produce)
        .await
        .expect("the producer finishes within 120 s of the node loss")
        .expect("producer task");
    let wanted = acked.lock().unwrap().clone();
    assert_eq!(wanted.len() as u64, MESSAGES);
    let all_in = |limit: Duration| {
        let (received, wanted) = (received.clone(), wanted.clone());
        async move {
            tokio::time::timeout(limit, async {
                loop {
                    if received.lock().unwrap().is_superset(&wanted) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .is_ok()
        }
    };
    let missing = || -> Vec<u64> {
        let got = received.lock().unwrap();
        wanted.difference(&got).copied().collect()
    };
    // Messages that a client on the lost node had fetched and not acked may stay with the
    // queue until that node is back (RabbitMQ 3.10): bring it back, then nothing may be
    // missing.
    let mut held_by_the_lost_node = Vec::new();
    if !all_in(Duration::from_secs(60)).await {
        held_by_the_lost_node = missing();
        eprintln!(
            "not delivered 60 s after the node loss: {held_by_the_lost_node:?}; restarting the killed node"
        );
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart_node(victim))
            .await
            .expect("restart the killed node");
    }
    assert!(
        all_in(Duration::from_secs(120)).await,
        "acknowledged messages never delivered after the node loss (then {held_by_the_lost_node:?}): {:?}",
        missing()
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in consumers {
        c.await.expect("worker task");
    }
    eprintln!(
        "node {} killed after {at_kill} enqueues; all {MESSAGES} delivered {:.1?} after the kill \
         ({} of them only once the node was back)",
        victim + 1,
        killed_at.elapsed(),
        held_by_the_lost_node.len()
    );

    // Strict priority afterwards, on the surviving nodes: a backlog of every priority, taken
    // one at a time, comes out most urgent first.
    let mut backlog = Vec::new();
    for round in 0..3u64 {
        for p in [7i64, 2, 10, 5, 1, 9, 3, 6, 4, 8] {
            backlog.push(OutgoingMessage {
                payload: format!("{p}/{round}").into_bytes(),
                priority: Priority::new(p).expect("priority"),
                delay: Duration::ZERO,
            });
        }
    }
    let count = backlog.len();
    retry(limit, "enqueue the backlog", || {
        producer.enqueue_many(&queue, backlog.clone())
    })
    .await;
    let mut seen = Vec::new();
    while seen.len() < count {
        let opts = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_secs(30),
        };
        let got = retry(limit, "fetch the backlog", || {
            workers[0].fetch(&queue, opts)
        })
        .await;
        assert!(!got.is_empty(), "the backlog ran dry after {seen:?}");
        for d in got {
            seen.push(d.priority.get());
            workers[0].ack(&d).await.expect("ack");
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "priority order after the node loss");

    drop((producer, workers));
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop the cluster");
}
